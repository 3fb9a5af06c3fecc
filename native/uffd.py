"""userfaultfd facts and the handshake: feature bits by name (from the kernel UAPI, not the build host's
headers), the UFFDIO_API handshake and the feature checks every uffd user shares.

Importable on every platform: the C layer is imported only when a handshake runs (Linux).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator

# include/uapi/linux/userfaultfd.h. forkd asked for 1 << 9 (MINOR_HUGETLBFS) meaning
# WP_HUGETLBFS_SHMEM (1 << 12): the names live here once, next to their values.
FEATURES: dict[str, int] = {
    "PAGEFAULT_FLAG_WP": 1 << 0,
    "EVENT_FORK": 1 << 1,
    "EVENT_REMAP": 1 << 2,
    "EVENT_REMOVE": 1 << 3,
    "MISSING_HUGETLBFS": 1 << 4,
    "MISSING_SHMEM": 1 << 5,
    "EVENT_UNMAP": 1 << 6,
    "SIGBUS": 1 << 7,
    "THREAD_ID": 1 << 8,
    "MINOR_HUGETLBFS": 1 << 9,
    "MINOR_SHMEM": 1 << 10,
    "EXACT_ADDRESS": 1 << 11,
    "WP_HUGETLBFS_SHMEM": 1 << 12,
    "WP_UNPOPULATED": 1 << 13,
    "POISON": 1 << 14,
    "WP_ASYNC": 1 << 15,
    "MOVE": 1 << 16,
}
# The kernel version that introduced each feature the phases rely on (for hints).
SINCE = {"WP_HUGETLBFS_SHMEM": "5.19", "WP_UNPOPULATED": "6.4", "WP_ASYNC": "6.7", "MOVE": "6.8",
         "PAGEFAULT_FLAG_WP": "5.7", "THREAD_ID": "4.14", "MISSING_SHMEM": "4.11"}

PAGEFAULT_FLAG_WRITE = 1 << 0
PAGEFAULT_FLAG_WP = 1 << 1
PAGEFAULT_FLAG_MINOR = 1 << 2

REGISTER_MODE_MISSING = 1 << 0
REGISTER_MODE_WP = 1 << 1


def feature_names(mask: int) -> list[str]:
    return [name for name, bit in FEATURES.items() if mask & bit]


def mask_of(*names: str) -> int:
    m = 0
    for n in names:
        m |= FEATURES[n]
    return m


# -- the handshake and feature checks (Linux; the C layer is imported when first used) -----------

_probe_cache: int | None = None


def supported_features() -> int:
    """The uffd feature mask this kernel returns from UFFDIO_API (probed once)."""
    global _probe_cache
    if _probe_cache is None:
        with open_uffd(0) as (_, supported):
            _probe_cache = supported
    return _probe_cache


def require_features(need: int, what: str) -> int:
    """The kernel's uffd feature mask, or CapabilityMissing naming each bit of ``need`` it lacks (and its kernel)."""
    from snapproof.native.errors import CapabilityMissing

    supported = supported_features()
    missing = need & ~supported
    if missing:
        lacking = feature_names(missing)
        names = ", ".join(f"UFFD_FEATURE_{n} (kernel {SINCE.get(n, '?')})" for n in lacking)
        raise CapabilityMissing(f"{what} needs {names}: not in the kernel's mask {supported:#x}",
                                tuple(f"uffd.{n}" for n in lacking))
    return supported


@contextlib.contextmanager
def open_uffd(features: int) -> Iterator[tuple[int, int]]:
    """A userfaultfd after the UFFDIO_API handshake asking ``features``: (fd, the kernel's mask); closed after."""
    from snapproof.native._lib import check, ffi, lib

    via = ffi.new("int *")
    fd = lib.sp_uffd_open(via)
    if fd < 0:
        raise uffd_open_error(-fd)
    try:
        sup = ffi.new("uint64_t *")
        ioctls = ffi.new("uint64_t *")
        check(lib.sp_uffd_api(fd, features, sup, ioctls), "UFFDIO_API", features=features)
        yield fd, int(sup[0])
    finally:
        os.close(fd)


def release_clears_wp() -> bool:
    """Whether closing a uffd clears the write-protect bits it set, probed on one page of anonymous memory.

    Only kernels with "mm/userfaultfd: reset ptes when close() for wr-protected ones" (Linux 6.9; stable 6.1
    after 6.1.176) do. Elsewhere a process that closes its uffd without un-protecting first keeps those pages
    marked (pagemap's PM_UFFD_WP; khugepaged warns on such PTEs): an engine must un-protect before it closes,
    as snapproof's does.
    """
    if sys.platform == "win32":
        raise NotImplementedError("userfaultfd is Linux's")
    from snapproof.native._lib import check, ffi, lib
    from snapproof.native.memory import GuestMemory
    from snapproof.native.pagemap import write_protected

    with GuestMemory.anonymous(4096) as page:
        page.populate()  # WP needs a present page where WP_UNPOPULATED is absent (6.1)
        with open_uffd(mask_of("PAGEFAULT_FLAG_WP")) as (fd, _):
            ioctls = ffi.new("uint64_t *")
            check(lib.sp_uffd_register(fd, page.addr, page.size, REGISTER_MODE_WP, ioctls), "UFFDIO_REGISTER")
            check(lib.sp_uffd_writeprotect(fd, page.addr, page.size, 1), "UFFDIO_WRITEPROTECT")
            armed = write_protected(page.addr)
        if not armed:  # the probe itself would be void
            raise AssertionError("release_clears_wp: the probe page was not write-protected after UFFDIO_WRITEPROTECT")
        return not write_protected(page.addr)


def uffd_open_error(err: int) -> Exception:
    """What a failed userfaultfd(2) (and /dev/userfaultfd) means: a missing capability, named, or an error."""
    from snapproof.native.errors import CapabilityMissing, NativeError, uffd_denied
    from snapproof.native.fixes import uffd_access

    if err in (errno.EPERM, errno.EACCES):
        return CapabilityMissing(uffd_denied(errno.errorcode[err]), fix=uffd_access())
    if err == errno.ENOSYS:
        return CapabilityMissing("userfaultfd(2) not available (kernel built without CONFIG_USERFAULTFD)")
    return NativeError("userfaultfd", err)
