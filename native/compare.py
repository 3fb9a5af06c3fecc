"""Where two memory images differ, said in guest terms: pages, GPA, expected vs seen; the exact oracle.

Platform-neutral. Equal stretches are skipped a chunk at a time (a C compare of memoryview
slices), so a GiB image that matches costs about a memcmp. ``first_difference`` is the one
first-differing-byte search (the C layer's on Linux, the same walk in Python elsewhere), and
``exact_oracle`` the one judge of "this snapshot equals that memory, byte for byte" the phases share.
Each has known-answer self-tests (tests/test_judges.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from snapproof.native.layout import gpa_of, offset_of

PAGE_SIZE = 4096
_CHUNK = 1 << 20


def differing_pages(a: Any, b: Any, page: int = PAGE_SIZE, progress: Callable[[int], None] | None = None) -> list[int]:
    """Indexes of the ``page``-sized pages where two equal-sized images differ; ``progress`` is told the bytes
    compared after each chunk (a report's progress over GiB images)."""
    va, vb = memoryview(a).cast("B"), memoryview(b).cast("B")
    if len(va) != len(vb):
        raise ValueError(f"images differ in size: {len(va):#x} and {len(vb):#x} bytes")
    pages: list[int] = []
    for c in range(0, len(va), _CHUNK):
        if progress is not None:
            progress(min(_CHUNK, len(va) - c))
        if va[c:c + _CHUNK] == vb[c:c + _CHUNK]:
            continue
        for p in range(c, min(c + _CHUNK, len(va)), page):
            if va[p:p + page] != vb[p:p + page]:
                pages.append(p // page)
    return pages


def _first_difference(vw: memoryview, vg: memoryview) -> tuple[int, int]:
    """(pages that differ, offset of the first differing u32); (0, -1) when equal."""
    pages = differing_pages(vw, vg)
    if not pages:
        return 0, -1
    start = pages[0] * PAGE_SIZE
    return len(pages), next(i for i in range(start, start + PAGE_SIZE) if vw[i] != vg[i]) & ~3


def _u32(v: memoryview, off: int) -> int:
    return int.from_bytes(bytes(v[off:off + 4]), "little")


def describe_difference(want: Any, got: Any, base: int = 0) -> str:
    """"" when the images are equal; otherwise how many pages differ and the first differing u32 (in hex, at
    its GPA: ``base`` is the GPA of the image's first byte; an image of all of guest memory continues at
    4 GiB past the 32-bit hole, native.layout), expected vs seen."""
    vw, vg = memoryview(want).cast("B"), memoryview(got).cast("B")
    if len(vw) != len(vg):
        return f"images differ in size: expected {len(vw):#x} bytes, saw {len(vg):#x}"
    npages, off = _first_difference(vw, vg)
    if not npages:
        return ""
    gpa = gpa_of(offset_of(base) + off)
    return (f"{npages} pages differ, first at GPA {gpa:#x}: expected u32 {_u32(vw, off):#010x}, "
            f"saw {_u32(vg, off):#010x}")


def describe_cow_difference(original: Any, want: Any, got: Any, base: int = 0) -> str:
    """describe_difference for a copy-on-write load, whose expected image ``want`` is ``original`` (the
    snapshot file's memory) plus the guest's writes. Of the first differing u32 it also says the file's
    value, and which of the two ways a copy-on-write goes wrong it looks like: zero where the file holds
    data (the private copy did not start from the file's page), or the file's value where the guest
    stored another (the guest's write is missing)."""
    diff = describe_difference(want, got, base)
    if not diff or diff.startswith("images differ in size"):
        return diff
    vo, vw, vg = (memoryview(x).cast("B") for x in (original, want, got))
    _, off = _first_difference(vw, vg)
    o, w, g = _u32(vo, off), _u32(vw, off), _u32(vg, off)
    if g == 0 and o != 0 and w == o:
        return (f"{diff}: zero where the file holds {o:#010x}, a value the guest never changed: the private "
                "copy of the page did not start from the file's page")
    if g == o and w != o:
        return (f"{diff}: the file's value {o:#010x}, where the guest's writes leave {w:#010x}: the guest's write "
                "is missing")
    return f"{diff} (the file holds {o:#010x})"


def first_difference(a: Any, b: Any) -> int:
    """Offset of the first byte where two equal-sized images differ, or -1: the C layer's compare (memcmp speed)
    on Linux, the same chunked walk in Python elsewhere."""
    va, vb = memoryview(a).cast("B"), memoryview(b).cast("B")
    if len(va) != len(vb):
        raise ValueError(f"images differ in size: {len(va):#x} and {len(vb):#x} bytes")
    return c_first_difference(va, vb) if sys.platform.startswith("linux") else py_first_difference(va, vb)


def c_first_difference(va: memoryview, vb: memoryview) -> int:
    """The C layer's search (native/linux/dirty_tracking.c, sp_first_difference): memcmp a MiB at a time, then
    the bytes of the chunk that differs. Linux only; equal-sized byte views."""
    from snapproof.native._lib import ffi, lib

    ha, hb = ffi.from_buffer("char[]", va), ffi.from_buffer("char[]", vb)
    try:
        pa, pb = (int(ffi.cast("uintptr_t", h)) for h in (ha, hb))
        return int(lib.sp_first_difference(pa, pb, len(va)))
    finally:
        ffi.release(ha)
        ffi.release(hb)


def py_first_difference(va: memoryview, vb: memoryview) -> int:
    """The same search in Python, for hosts without the C layer: equal-sized byte views."""
    for c in range(0, len(va), _CHUNK):
        if va[c:c + _CHUNK] != vb[c:c + _CHUNK]:
            return next(i for i in range(c, min(c + _CHUNK, len(va))) if va[i] != vb[i])
    return -1


@dataclass(frozen=True)
class ExactVerdict:
    """The exact oracle's answer: equal, or how many pages differ and the first differing byte in guest terms."""

    ok: bool
    message: str
    first: int = -1   # memory offset of the first differing byte
    pages: int = 0

    def __bool__(self) -> bool:
        return self.ok


def exact_oracle(snapshot: Any, reference: Any, what: str = "memory at the pause") -> ExactVerdict:
    """Whether a snapshot of all of guest memory equals ``reference`` (memory copied while the vCPUs were stopped),
    byte for byte; otherwise the pages that differ and the first differing byte at its GPA, expected vs seen."""
    off = first_difference(snapshot, reference)
    if off < 0:
        return ExactVerdict(True, f"equals {what}, byte for byte")
    pages = differing_pages(snapshot, reference)
    vs, vr = memoryview(snapshot).cast("B"), memoryview(reference).cast("B")
    return ExactVerdict(False, f"{len(pages)} pages differ from {what}, first at GPA {gpa_of(off):#x}: expected "
                               f"{vr[off]:#04x}, saw {vs[off]:#04x}", off, len(pages))
