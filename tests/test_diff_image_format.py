"""The diff file format and chains (native/diff_image.py): writing, reading back, the pinned layout, and
every way a loader refuses a bad diff or a chain that does not fit together. Negatives corrupt one field
with ``rewrite_diff_header`` (checksum kept valid, so that field's own check is reached) and check the
error names the field and what it saw."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from snapproof.native import diff_image
from snapproof.native.diff_image import (
    ChainError,
    DiffImage,
    bitmap_of,
    count,
    open_chain,
    pages_in,
    rewrite_diff_header,
)
from snapproof.native.image import SnapshotFormatError, SnapshotImage, VcpuKind

from tests.sample_states import kvm_x86_state

PAGE = diff_image.PAGE_SIZE
MEMORY_SIZE = 70 * PAGE  # more than one u64 word of bitmap, not a whole number of them
NPAGES = MEMORY_SIZE // PAGE
PAGES = [0, 3, 4, 63, 64, 69]
STATES = [kvm_x86_state(0x11)]
BREAKS_SAVED_DIFFS = ("changing this breaks every saved diff file: bump diff_image.FORMAT_VERSION instead of just "
                      "editing the value, and update this pin in the same change")


def pattern(size: int, seed: int = 0) -> bytes:
    """Memory whose every page differs, so a misplaced page cannot go unseen."""
    return bytes((i * 7 + i // PAGE + seed) & 0xFF for i in range(size))


@pytest.fixture
def base(tmp_path) -> Path:
    path = tmp_path / "base.snap"
    SnapshotImage.write(path, pattern(MEMORY_SIZE), vcpu_states=STATES)
    return path


@pytest.fixture
def diff(tmp_path, base) -> Path:
    """A valid diff of PAGES over the base, with one vCPU state."""
    path = tmp_path / "d1.diff"
    parent = SnapshotImage.open(base).content_hash
    DiffImage.write(path, parent, pattern(MEMORY_SIZE, 1), bitmap_of(PAGES, NPAGES), vcpu_states=STATES)
    return path


def rejected(path, field: str, seen: str, verify: bool = True) -> SnapshotFormatError:
    """Open must fail on ``field``, naming it and what the file holds."""
    with pytest.raises(SnapshotFormatError) as info:
        DiffImage.open(path, verify=verify)
    err = info.value
    assert err.field == field, f"expected the error to name {field!r}, it named {err.field!r}: {err}"
    assert field in str(err) and seen in str(err), f"error should name {field!r} and show {seen!r}: {err}"
    return err


# -- round trip and layout --------------------------------------------------------------------------


def test_round_trip_keeps_the_pages_the_bitmap_names_and_the_vcpu_states(diff, base):
    """A diff reads back with its pages, in page order, its parent's hash and its vCPU states."""
    d = DiffImage.open(diff)
    new = pattern(MEMORY_SIZE, 1)
    assert d.pages() == PAGES and d.page_count == len(PAGES)
    assert [d.read_page(k) for k in range(len(PAGES))] == [new[p * PAGE:(p + 1) * PAGE] for p in PAGES]
    assert d.parent_hash == SnapshotImage.open(base).content_hash
    assert d.vcpu_states == tuple(STATES) and d.vcpu_kinds == (VcpuKind.KVM_X86,)
    assert d.verified and d.complete and d.memory_size == MEMORY_SIZE


def test_content_hash_covers_the_parent_hash_the_bitmap_and_the_pages(diff):
    """content_hash = sha256(parent_hash || bitmap || pages): it names the diff and, through its parent, the chain."""
    d = DiffImage.open(diff)
    data = diff.read_bytes()
    want = hashlib.sha256(d.parent_hash + d.bitmap + data[d.pages_offset:d.vcpu_offset]).digest()
    assert d.content_hash == want


def test_bitmap_then_page_aligned_pages_then_the_vcpu_section_end_the_file(diff):
    """Header page, bitmap at 4096, the pages from the next page boundary, the vCPU section last."""
    d = DiffImage.open(diff)
    words = (NPAGES + 63) // 64
    assert (d.pages_offset, d.vcpu_offset) == (0x2000, 0x2000 + len(PAGES) * PAGE)
    assert diff.read_bytes()[0x1000:0x1000 + 8 * words] == d.bitmap == bitmap_of(PAGES, NPAGES)
    assert d.file_length == d.vcpu_offset + d.vcpu_size == diff.stat().st_size


def test_a_diff_of_no_pages_is_a_valid_diff(tmp_path, base):
    """Nothing written since the parent: a diff of 0 pages still names its parent and carries the vCPU states."""
    d = DiffImage.write(tmp_path / "empty.diff", SnapshotImage.open(base).content_hash, bytes(MEMORY_SIZE),
                        bitmap_of([], NPAGES), vcpu_states=STATES)
    assert (d.page_count, d.pages(), d.map_pages()) == (0, [], None)
    assert DiffImage.open(d.path).verified


def test_page_bitmaps_use_kvms_dirty_log_layout():
    """Bit i of u64 word i/64 is page i: a KVM_GET_DIRTY_LOG bitmap is a diff's bitmap as it comes."""
    bitmap = bitmap_of([0, 9, 64, 69], NPAGES)
    assert bytes(bitmap) == (0x201).to_bytes(8, "little") + (0x21).to_bytes(8, "little")
    assert list(pages_in(bitmap)) == [0, 9, 64, 69] and count(bitmap) == 4


def test_an_incomplete_diff_is_refused(tmp_path, base):
    """A writer that never finalized leaves a file marked incomplete, and open says so."""
    path = tmp_path / "cut.diff"
    with DiffImage.create(path, MEMORY_SIZE, SnapshotImage.open(base).content_hash, bitmap_of(PAGES, NPAGES)):
        pass  # left without finalize: an abort
    err = rejected(path, "flags", "did not finish")
    assert str(err).startswith("diff incomplete")


# -- tripwires --------------------------------------------------------------------------------------


def test_format_constants_are_pinned():
    assert (diff_image.MAGIC, diff_image.FORMAT_VERSION, diff_image.HEADER_SIZE, diff_image.PAGE_SIZE,
            diff_image.BITMAP_OFFSET) == (b"SNAPDIFF", 1, 4096, 4096, 4096), BREAKS_SAVED_DIFFS


def test_field_offsets_are_pinned():
    assert diff_image.FIELDS == {
        "magic": (0x000, "8s"), "format_version": (0x008, "<I"), "header_size": (0x00C, "<I"),
        "arch": (0x010, "<I"), "page_size": (0x014, "<I"), "memory_size": (0x018, "<Q"), "flags": (0x020, "<I"),
        "hash_algo": (0x024, "<I"), "hypervisor": (0x028, "16s"), "parent_hash": (0x038, "32s"),
        "content_hash": (0x058, "32s"), "bitmap_offset": (0x078, "<Q"), "bitmap_size": (0x080, "<Q"),
        "page_count": (0x088, "<Q"), "pages_offset": (0x090, "<Q"), "vcpu_count": (0x098, "<I"),
        "vcpu_state_version": (0x09C, "<I"), "vcpu_offset": (0x0A0, "<Q"), "vcpu_size": (0x0A8, "<Q"),
        "vcpu_hash": (0x0B0, "32s"), "reserved": (0x0D0, "3856s"), "header_checksum": (0xFE0, "32s"),
    }, BREAKS_SAVED_DIFFS


def test_fields_tile_the_header_page():
    """No gap and no overlap: every byte of the header page belongs to exactly one field."""
    import struct

    spans = sorted((off, off + struct.calcsize(fmt)) for off, fmt in diff_image.FIELDS.values())
    assert spans[0][0] == 0 and spans[-1][1] == diff_image.HEADER_SIZE
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False)), spans


# -- one corrupted field, named ---------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "field", "seen"), [
    ({"magic": b"SNAPXXXX"}, "magic", "b'SNAPXXXX'"),
    ({"magic": b"SNAPPROF"}, "magic", "a full snapshot file, not a diff"),
    ({"format_version": 2}, "format_version", "saw 2"),
    ({"header_size": 8192}, "header_size", "0x2000"),
    ({"flags": 0x3}, "flags", "0x3"),
    ({"arch": 7}, "arch", "7 (unknown)"),
    ({"page_size": 8192}, "page_size", "0x2000"),
    ({"hash_algo": 9}, "hash_algo", "9 (unknown)"),
    ({"hash_algo": 2}, "hash_algo", "expected 1 (sha256), saw 2 (blake3)"),  # a snapshot file's, never a diff's
    ({"hypervisor": "xen"}, "hypervisor", "xen"),
    ({"reserved": b"\x01" + bytes(3855)}, "reserved", "byte 0x01 at header offset 0xd0"),
    ({"memory_size": MEMORY_SIZE + 1}, "memory_size", hex(MEMORY_SIZE + 1)),
    ({"bitmap_offset": 0x2000}, "bitmap_offset", "0x2000"),
    ({"bitmap_size": 8}, "bitmap_size", "saw 0x8"),
    ({"page_count": NPAGES + 1}, "page_count", str(NPAGES + 1)),
    ({"pages_offset": 0x3000}, "pages_offset", "0x3000"),
    ({"vcpu_offset": 0x2000 + len(PAGES) * PAGE + 8}, "vcpu_offset", hex(0x2000 + len(PAGES) * PAGE + 8)),
    ({"vcpu_size": 12}, "vcpu_size", "0xc"),
    ({"vcpu_state_version": 2}, "vcpu_state_version", "saw 2"),
    ({"vcpu_hash": bytes(32)}, "vcpu_hash", "of the vCPU section"),
    ({"content_hash": bytes(32)}, "content_hash", "of parent_hash, the bitmap and the pages"),
])
def test_one_corrupted_field_is_refused_naming_it(diff, fields, field, seen):
    rewrite_diff_header(diff, **fields)
    rejected(diff, field, seen)


def test_a_header_whose_checksum_does_not_match_is_refused(diff):
    """A field no other check looks at (parent_hash) changed without the checksum: the checksum names it."""
    rewrite_diff_header(diff, fix_checksum=False, parent_hash=bytes(32))
    rejected(diff, "header_checksum", "expected")


def test_a_vcpu_section_longer_than_the_file_is_refused_as_truncated(diff):
    d = DiffImage.open(diff)
    rewrite_diff_header(diff, vcpu_size=d.vcpu_size + 8)
    err = rejected(diff, "file length", hex(d.file_length))
    assert str(err).startswith("diff file truncated")


def test_a_bitmap_bit_past_the_last_page_is_refused(diff):
    """Memory of 70 pages: bit 70 of the bitmap names no page."""
    with open(diff, "r+b") as f:
        f.seek(0x1000 + 8)
        word = int.from_bytes(f.read(8), "little") | 1 << (NPAGES - 64)
        f.seek(0x1000 + 8)
        f.write(word.to_bytes(8, "little"))
    rejected(diff, "bitmap", f"page {NPAGES:#x} set")


def test_a_bitmap_that_disagrees_with_page_count_is_refused(diff):
    with open(diff, "r+b") as f:
        f.seek(0x1000)
        first = f.read(1)[0]
        f.seek(0x1000)
        f.write(bytes([first | 0x02]))  # page 1 too, which the diff does not hold
    rejected(diff, "page_count", f"expected {len(PAGES) + 1} (the bits set in the bitmap)")


def test_a_flipped_page_byte_fails_the_verified_open_only(diff):
    """The pages are covered by content_hash: a verified open refuses a flipped byte, an unverified one opens."""
    with open(diff, "r+b") as f:
        f.seek(0x2000 + 100)
        b = f.read(1)[0]
        f.seek(0x2000 + 100)
        f.write(bytes([b ^ 1]))
    DiffImage.open(diff, verify=False)
    rejected(diff, "content_hash", "(from header)")


# -- chains -----------------------------------------------------------------------------------------


@pytest.fixture
def chain(tmp_path, base):
    """base -> d1 -> d2, each diff of the pages its writes changed."""
    paths = [base]
    parent = SnapshotImage.open(base).content_hash
    for k, pages in ((1, [1, 2]), (2, [2, 65])):
        d = DiffImage.write(tmp_path / f"c{k}.diff", parent, pattern(MEMORY_SIZE, 10 * k), bitmap_of(pages, NPAGES),
                            vcpu_states=[kvm_x86_state(k)])
        paths.append(Path(d.path))
        parent = d.content_hash
    return paths


def test_a_chain_opens_with_each_diff_naming_the_file_before_it(chain):
    c = open_chain(chain[0], chain[1:])
    assert [d.parent_hash for d in c.diffs] == [c.base.content_hash, c.diffs[0].content_hash]
    assert c.head is c.diffs[-1]
    head = c.head_image()
    assert head.vcpu_states == (kvm_x86_state(2),) and head.path == c.base.path and c.base.vcpu_states == tuple(STATES)


def test_a_diff_of_another_chain_is_refused_naming_both(tmp_path, chain):
    other = tmp_path / "other.snap"
    SnapshotImage.write(other, pattern(MEMORY_SIZE, 5))
    with pytest.raises(ChainError) as info:
        open_chain(other, chain[1:2])
    err = str(info.value)
    assert info.value.field == "diff[1].parent_hash"
    assert SnapshotImage.open(other).content_hash.hex() in err and str(other) in err
    assert SnapshotImage.open(chain[0]).content_hash.hex() in err and str(chain[1]) in err
    assert "the diff's parent is missing (or from another chain)" in err


def test_a_chain_missing_a_diff_is_refused_naming_both(chain):
    with pytest.raises(ChainError, match=r"diff\[1\]\.parent_hash: expected [0-9a-f]{64} \(the content_hash of its "
                                         r"parent in the chain, base .*base\.snap\), saw [0-9a-f]{64} \(no file of "
                                         r"this chain has it"):
        open_chain(chain[0], chain[2:])


def test_diffs_out_of_order_are_refused_naming_where_the_parent_is(chain):
    with pytest.raises(ChainError, match=r"that is diff\[2\] .*c1\.diff, later in the chain: the diffs are out of "
                                         r"order"):
        open_chain(chain[0], [chain[2], chain[1]])


def test_a_diff_between_two_files_left_out_is_named(chain, tmp_path):
    """base, d1, d1 again: the second d1 names the base, which is in the chain but not right before it."""
    with pytest.raises(ChainError, match=r"diff\[2\]\.parent_hash: .*that is base .*: a diff between it and this one "
                                         r"is missing"):
        open_chain(chain[0], [chain[1], chain[1]])


def test_a_diff_of_memory_of_another_size_is_refused(tmp_path, chain):
    small = tmp_path / "small.snap"
    SnapshotImage.write(small, pattern(MEMORY_SIZE - PAGE))
    with pytest.raises(ChainError, match=rf"diff\[1\]\.memory_size: expected {MEMORY_SIZE - PAGE:#x} \(the base's"):
        open_chain(small, chain[1:2])


def test_a_full_snapshot_given_as_a_diff_is_refused(chain):
    with pytest.raises(SnapshotFormatError, match="a full snapshot file, not a diff"):
        open_chain(chain[0], [chain[0]])
