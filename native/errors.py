"""Errors of the native layer: each names the operation, errno and arguments."""

from __future__ import annotations

import os


class NativeError(OSError):
    """A system call or ioctl failed; the message names it, errno and the arguments in hex."""

    def __init__(self, op: str, err: int, **args: object) -> None:
        self.op = op
        shown = ", ".join(f"{k}={v:#x}" if isinstance(v, int) else f"{k}={v}" for k, v in args.items())
        where = f" ({shown})" if shown else ""
        super().__init__(err, f"{op} failed{where}: errno {err} ({os.strerror(err)})")


class CapabilityMissing(Exception):
    """The host lacks something a test needs; the message is the skip reason, naming it exactly.

    ``capabilities`` names the missing ones as native.host does (``uffd.WP_ASYNC``) when the raiser knows
    them: the plugin then fails it under --strict-host only if the host's class requires one of them.
    """

    def __init__(self, reason: str, capabilities: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.capabilities = capabilities


class GuestTimeout(TimeoutError):
    """A guest did not reach the expected exit within its time-out."""


class HandlerDied(RuntimeError):
    """A uffd fault-handler thread exited mid-snapshot without being asked to; the message names it.

    The engine un-protects the region as the handler goes, so no writer stays blocked; the
    snapshot is void (writes it never served landed uncaptured).
    """


class LoaderDied(RuntimeError):
    """A lazy loader stopped serving guest memory with pages still missing; the message names why.

    Its handler died, its userfaultfd was closed, or it was released early. The pages it never
    restored are fenced (PROT_NONE) before anyone waiting on them is woken, so the guest stops at
    them instead of reading zeros; this error is how a run, or a host access, says so.
    """
