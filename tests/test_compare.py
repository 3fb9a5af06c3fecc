"""Image comparison finds every differing page and names the first difference in guest terms."""

from __future__ import annotations

import pytest
from snapproof.native.compare import describe_difference, differing_pages


def test_equal_images_have_no_difference():
    """Equal images: no page, no description."""
    a = bytes(range(256)) * 64 * 8
    assert differing_pages(a, bytearray(a)) == []
    assert describe_difference(a, a) == ""


def test_one_byte_in_the_last_chunk_is_found():
    """A single flipped byte past the first MiB is found at its page, with its GPA and both u32 values."""
    size = (1 << 20) + 8192
    want = bytearray(size)
    got = bytearray(size)
    got[(1 << 20) + 4096 + 6] = 0xAB
    assert differing_pages(want, got) == [257]
    assert describe_difference(want, got, base=0x10000) == (
        "1 pages differ, first at GPA 0x111004: expected u32 0x00000000, saw 0x00ab0000")


def test_images_of_different_sizes_are_said_to_differ_in_size():
    """Comparing images of different sizes says so instead of comparing a prefix."""
    assert describe_difference(bytes(4096), bytes(8192)) == "images differ in size: expected 0x1000 bytes, saw 0x2000"
    with pytest.raises(ValueError, match="images differ in size: 0x1000 and 0x2000 bytes"):
        differing_pages(bytes(4096), bytes(8192))
