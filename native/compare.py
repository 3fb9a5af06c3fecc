"""Where two memory images differ, said in guest terms: pages, GPA, expected vs seen.

Platform-neutral. Equal stretches are skipped a chunk at a time (a C compare of memoryview
slices), so a GiB image that matches costs about a memcmp.
"""

from __future__ import annotations

from typing import Any

from native.layout import gpa_of, offset_of

PAGE_SIZE = 4096
_CHUNK = 1 << 20


def differing_pages(a: Any, b: Any, page: int = PAGE_SIZE) -> list[int]:
    """Indexes of the ``page``-sized pages where two equal-sized images differ."""
    va, vb = memoryview(a).cast("B"), memoryview(b).cast("B")
    if len(va) != len(vb):
        raise ValueError(f"images differ in size: {len(va):#x} and {len(vb):#x} bytes")
    pages: list[int] = []
    for c in range(0, len(va), _CHUNK):
        if va[c:c + _CHUNK] == vb[c:c + _CHUNK]:
            continue
        for p in range(c, min(c + _CHUNK, len(va)), page):
            if va[p:p + page] != vb[p:p + page]:
                pages.append(p // page)
    return pages


def describe_difference(want: Any, got: Any, base: int = 0) -> str:
    """"" when the images are equal; otherwise how many pages differ and the first differing u32 (in hex, at
    its GPA: ``base`` is the GPA of the image's first byte; an image of all of guest memory continues at
    4 GiB past the 32-bit hole, native.layout), expected vs seen."""
    vw, vg = memoryview(want).cast("B"), memoryview(got).cast("B")
    if len(vw) != len(vg):
        return f"images differ in size: expected {len(vw):#x} bytes, saw {len(vg):#x}"
    pages = differing_pages(vw, vg)
    if not pages:
        return ""
    start = pages[0] * PAGE_SIZE
    off = next(i for i in range(start, start + PAGE_SIZE) if vw[i] != vg[i]) & ~3
    w, g = (int.from_bytes(bytes(v[off:off + 4]), "little") for v in (vw, vg))
    gpa = gpa_of(offset_of(base) + off)
    return f"{len(pages)} pages differ, first at GPA {gpa:#x}: expected u32 {w:#010x}, saw {g:#010x}"
