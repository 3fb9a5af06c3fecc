"""Loads the compiled Linux module, building it first when it is missing or stale."""

from __future__ import annotations

import sys

if sys.platform == "win32":
    raise ImportError("native._lib loads the Linux (KVM) C module: on Windows the backend is native.whp")

from snapproof.native.build import ensure_built

ensure_built()

from snapproof.native._linux import ffi, lib  # noqa: E402  (must follow the build)
from snapproof.native.errors import NativeError  # noqa: E402


def check(rc: int, what: str, **args: object) -> int:
    """Return ``rc`` when it is not negative; otherwise raise naming the failing call."""
    if rc < 0:
        op = ffi.string(lib.sp_last_op()).decode() or what
        raise NativeError(op if op == what else f"{what}: {op}", -rc, **args)
    return rc


__all__ = ["ffi", "lib", "check"]
