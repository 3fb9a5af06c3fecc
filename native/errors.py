"""Errors of the native layer, and the messages they carry: each names the operation, errno and arguments.

The message builders (a device node's mode and owner, why userfaultfd was denied) live here, so the
native layer names a missing capability without importing the host probe (native.host imports the
native layer, never the other way round).
"""

from __future__ import annotations

import os
import sys


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

    ``reason`` says what is missing and how it was probed, ``fix`` what to paste to get it (native.fixes); the
    message is both.
    """

    def __init__(self, reason: str, capabilities: tuple[str, ...] = (), fix: str = "") -> None:
        super().__init__(f"{reason}; {fix}" if fix else reason)
        self.reason = reason
        self.fix = fix
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


# -- message builders -------------------------------------------------------------------------

CAP_SYS_PTRACE = 19


def uid() -> int:
    """This process's effective uid (-1 on Windows)."""
    if sys.platform == "win32":
        return -1
    return os.geteuid()


def device_node(path: str) -> str:
    """A node's mode, owner and group (``crw------- root:root``): what a permission skip must name."""
    import stat

    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot stat: {e.strerror}"
    owner, group = str(st.st_uid), str(st.st_gid)
    if sys.platform != "win32":
        import contextlib
        import grp
        import pwd

        with contextlib.suppress(KeyError):  # ids without a name: the numbers say it
            owner, group = pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name
    return f"{stat.filemode(st.st_mode)} {owner}:{group}"


def has_capability(bit: int) -> bool:
    """Whether this process holds capability ``bit`` in its effective set (/proc/self/status CapEff)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False


def uffd_denied(err_name: str) -> str:
    """Why userfaultfd with kernel-mode faults was refused, naming each way in and its state here (the
    commands that open one are native.fixes.uffd_access)."""
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            sysctl = f.read().strip()
    except OSError:
        sysctl = "absent"
    ptrace = "with" if has_capability(CAP_SYS_PTRACE) else "without"
    node = "/dev/userfaultfd"
    if not os.path.exists(node):
        dev = f"{node} absent"
    else:
        ok = os.access(node, os.R_OK | os.W_OK)
        dev = f"{node} {'readable+writable' if ok else 'not readable+writable'} ({device_node(node)})"
    return (f"userfaultfd for kernel-mode faults denied ({err_name}) for uid {uid()}: "
            f"vm.unprivileged_userfaultfd = {sysctl}, {ptrace} CAP_SYS_PTRACE, {dev}; root or CAP_SYS_PTRACE has it")
