"""A capture into a snapshot file hashes the image as the bulk copy goes (native/capture.py): each byte is
hashed once, by the writer's thread, right after the engine copied it, and nothing is read back from the
file at finalize; a page the engine may still be capturing (still write-protected) holds the hashing back
until it is captured.

Host writes only (no VM): phase 3 captures guests into files and restores them.
"""

from __future__ import annotations

import blake3
import pytest

pytestmark = [pytest.mark.platform("linux"), pytest.mark.needs("uffd", "uffd.PAGEFAULT_FLAG_WP", "uffd.THREAD_ID",
                                                               "uffd.WP_HUGETLBFS_SHMEM")]

PAGE = 4096


def fill(mem) -> bytes:
    """Every page of ``mem`` stamped with its number, so a misplaced or stale page changes the hash."""
    for page in range(mem.size // PAGE):
        mem.write(page * PAGE, page.to_bytes(4, "little") * 4)
    return mem.read(0, mem.size)


@pytest.fixture
def file_reads(monkeypatch) -> list[int]:
    """Bytes the writer's finalize hashes by reading the file back, one entry a call."""
    from snapproof.native import image

    reads: list[int] = []
    real = image._hash_file_range

    def counted(f, offset, size, h, progress=None):
        reads.append(size)
        real(f, offset, size, h, progress)

    monkeypatch.setattr(image, "_hash_file_range", counted)
    return reads


def test_a_capture_hashes_each_byte_once_as_the_copy_goes_and_reads_nothing_back(make_memory, tmp_path, file_reads):
    """16 MiB captured into a file: the engine copied every byte, the writer's thread hashed every byte as it was
    marked final, finalize read none back, and the header's blake3 is that of guest memory."""
    from snapproof.native import image
    from snapproof.native.capture import capture_to_file
    from snapproof.native.image import HashAlgo, SnapshotImage

    mem = make_memory("memfd", 16 << 20)
    memory = fill(mem)
    cap = capture_to_file(tmp_path / "c.snap", mem)
    copied, w = cap.stats.bulk_pages * PAGE, cap.write
    assert (copied, w.hashed_as_final, w.hashed_at_finalize, sum(file_reads)) == (mem.size, mem.size, 0, 0), \
        (f"copied {copied:#x}, hashed as final {w.hashed_as_final:#x}, at finalize {w.hashed_at_finalize:#x}, "
         f"read back {sum(file_reads):#x} of {mem.size:#x}")
    assert (w.hash_algo, cap.image.content_hash) == (HashAlgo.BLAKE3, blake3.blake3(memory).digest())
    assert SnapshotImage.open(cap.image.path).verified
    # Linux has sync_file_range: each hashed piece's writeback was started, none failed.
    assert image._sync_file_range() is not None and w.writeback_error == "", w.writeback_error


def test_final_end_stops_at_the_first_page_still_write_protected(make_memory, make_wp):
    """The capture's test of "final" reads the kernel's PM_UFFD_WP: armed, nothing is final; after a bulk copy of
    pages 0-3, those are; a page protected again (its capture as if in flight) stops the final prefix there."""
    from snapproof.native.capture import final_end

    mem = make_memory("memfd", 8 * PAGE)
    fill(mem)
    snap = make_wp(mem, bytearray(mem.size))
    snap.arm()
    assert final_end(mem, 0, mem.size) == 0
    snap.bulk_copy(0, 4)
    assert final_end(mem, 0, mem.size) == 4 * PAGE
    snap.bulk_copy(4, 4)
    assert final_end(mem, 0, mem.size) == mem.size
    snap.rearm(2)
    assert final_end(mem, 0, mem.size) == 2 * PAGE
    assert final_end(mem, 3 * PAGE, mem.size) == mem.size


class HoldsPageOne:
    """A WpSnapshot whose page 1 stays the engine's after the first piece (protected again, as a fault capture
    still in flight leaves it) until the bulk copy of ``release_at`` captures it."""

    def __init__(self, snap, release_at: int | None):
        self.snap, self.release_at = snap, release_at
        self.page_size, self.npages, self.memory = snap.page_size, snap.npages, snap.memory

    def bulk_copy(self, first: int, npages: int, batch: int) -> int:
        copied = self.snap.bulk_copy(first, npages, batch=batch)
        if first == 0:
            self.snap.rearm(1)
        if first == self.release_at:
            copied += self.snap.bulk_copy(1, 1)
        return copied


@pytest.mark.parametrize(("release_at", "hashed_as_final"), [(8, 16 * PAGE), (None, PAGE)],
                         ids=["captured-during-the-copy", "captured-after-it"])
def test_a_page_still_protected_holds_the_hashing_back_until_it_is_captured(make_memory, make_wp, tmp_path, file_reads,
                                                                           release_at, hashed_as_final):
    """Pieces of 4 pages; page 1 is protected again after the first. Captured during a later piece, the hashing
    catches up with the copy; captured only after the copy, everything from page 1 on is hashed at finalize from
    the file. Either way the file verifies and holds guest memory."""
    from snapproof.native.capture import copy_into_file
    from snapproof.native.image import SnapshotImage

    mem = make_memory("memfd", 16 * PAGE)
    memory = fill(mem)
    with SnapshotImage.create(tmp_path / "held.snap", mem.size) as writer:
        snap = make_wp(mem, writer.memory)
        snap.arm()
        copy_into_file(HoldsPageOne(snap, release_at), writer, piece=4 * PAGE)
        if release_at is None:
            snap.bulk_copy(1, 1)
        snap.finalize()
        img = writer.finalize()
    w = writer.stats
    assert (w.hashed_as_final, w.hashed_at_finalize, sum(file_reads)) == \
        (hashed_as_final, mem.size - hashed_as_final, mem.size - hashed_as_final)
    assert img.read_memory() == memory and SnapshotImage.open(img.path).verified
