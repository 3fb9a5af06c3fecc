"""/proc/self/pagemap: what the kernel says of each page of a mapping (present, uffd-wp), and PAGEMAP_SCAN.

The only evidence that write-protection took effect: UFFDIO_WRITEPROTECT succeeds even where it
protected nothing (unpopulated shmem pages without WP_UNPOPULATED). Linux only.
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    raise ImportError("native.pagemap reads /proc/self/pagemap: Linux only")

import errno
import os

from snapproof.native._lib import check, ffi, lib
from snapproof.native.errors import NativeError

PAGE_SIZE = 4096

# /proc/self/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst). A uffd-wp pte marker in a hole
# reads as PM_SWAP | PM_UFFD_WP: swapped-or-marked, not PM_PRESENT.
PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_UFFD_WP = 1 << 57

# PAGEMAP_SCAN categories (include/uapi/linux/fs.h, kernel 6.7).
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_PRESENT = 1 << 3


def pagemap_entry(addr: int) -> int:
    """The raw /proc/self/pagemap entry of the page at ``addr``: tells a populated page (PM_PRESENT) from a
    hole that carries only a marker, which ``read_pagemap``'s "present" (present or swapped) does not."""
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        raw = os.pread(f.fileno(), 8, addr // PAGE_SIZE * 8)
    if len(raw) != 8:
        raise NativeError("pread(/proc/self/pagemap) (short read)", errno.EIO, addr=addr)
    return int.from_bytes(raw, "little")


def read_pagemap(addr: int, npages: int) -> tuple[bytes, bytes]:
    """(present, uffd_wp) per page of [addr, addr + npages pages), one byte each."""
    present = ffi.new("uint8_t[]", npages)
    wp = ffi.new("uint8_t[]", npages)
    check(lib.sp_pagemap_scan_wp(addr, npages, present, wp), "read /proc/self/pagemap", addr=addr)
    return bytes(ffi.buffer(present, npages)), bytes(ffi.buffer(wp, npages))


def write_protected(addr: int) -> bool:
    """Whether the page at ``addr`` carries PM_UFFD_WP now."""
    return bool(pagemap_entry(addr) & PM_UFFD_WP)


def pagemap_scan(addr: int, size: int, category_mask: int, return_mask: int, flags: int = 0,
                 max_regions: int = 4096) -> list[tuple[int, int, int]]:
    """PAGEMAP_SCAN over [addr, addr + size): (start, end, categories) regions."""
    vec = ffi.new("struct sp_page_region[]", max_regions)
    walk_end = ffi.new("uint64_t *")
    n = check(lib.sp_pagemap_scan(addr, addr + size, flags, category_mask, return_mask, vec, max_regions,
                                  walk_end), "PAGEMAP_SCAN", start=addr, size=size)
    return [(int(vec[i].start), int(vec[i].end), int(vec[i].categories)) for i in range(n)]


def pagemap_scan_probe() -> None:
    """Raise NativeError unless PAGEMAP_SCAN answers on a populated page of our own."""
    from snapproof.native.memory import GuestMemory

    with GuestMemory.anonymous(PAGE_SIZE) as m:
        m.populate()
        regions = pagemap_scan(m.addr, PAGE_SIZE, PAGE_IS_PRESENT, PAGE_IS_PRESENT)
        if regions != [(m.addr, m.addr + PAGE_SIZE, PAGE_IS_PRESENT)]:
            raise NativeError("PAGEMAP_SCAN (unexpected answer)", 5, regions=str(regions))
