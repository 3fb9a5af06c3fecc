"""The ways a snapshot writer's image reaches its file besides its mapping (``ImageWay``, Linux): the image is
copied into anonymous memory and a thread writes each final piece beside the hash, with pwrite into the page cache
(PWRITE) or with O_DIRECT (DIRECT, the device reads the pages); ``StagingMemory`` is that anonymous memory kept from
one capture to the next.

Each test reads the file back through a fresh open, from the device: what was written is what the header's hash
and the caller's bytes say, whatever way it went.
"""

from __future__ import annotations

import errno
import os
import threading

import blake3
import pytest
from snapproof.native import image
from snapproof.native.image import ImageWay, SnapshotImage, StagingMemory

from tests.test_capture_hashing import file_reads, fill  # noqa: F401 (file_reads: a fixture)

pytestmark = pytest.mark.platform("linux")

PAGE = image.PAGE_SIZE
SIZE = 4 * image._WRITE_STEP + 3 * PAGE  # pieces of the writing thread's step and a short tail
SMALL = image._ON_CALLER_UP_TO  # the largest image a writer goes over on the caller's thread
FROM_MEMORY = [ImageWay.PWRITE, ImageWay.DIRECT]  # the ways that write from anonymous memory


def pattern(size: int, seed: int = 0) -> bytes:
    """Each page stamped with its number and ``seed``: a page written at the wrong offset, or stale, shows."""
    return b"".join(((page << 8) | seed).to_bytes(8, "little") * (PAGE // 8) for page in range(size // PAGE))


def write_pieces(writer, data: bytes, upto: int) -> None:
    """Copy ``data`` into the writer's memory and mark it final piece by piece as far as ``upto``."""
    writer.memory[:] = data
    for end in range(image._HASH_STEP, upto, image._HASH_STEP):
        writer.mark_final(end)
    writer.mark_final(upto)


def refuse_o_direct(monkeypatch) -> None:
    """Every open with O_DIRECT fails as tmpfs before Linux 6.6 fails it, with EINVAL; other opens go through."""
    real_open = os.open

    def refuse(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse)


def assert_covers_the_image(ranges: list[tuple[int, int]], what: str) -> None:
    """(file offset, size) ranges, in the order they came, cover the image exactly: no gap, no overlap."""
    end = image.MEMORY_OFFSET
    for offset, size in ranges:
        assert offset == end, f"{what} at {offset:#x}, the previous one ended at {end:#x}: {ranges}"
        end += size
    assert end == image.MEMORY_OFFSET + SIZE, f"{what} ended at {end:#x}, the image at {image.MEMORY_OFFSET + SIZE:#x}"


def writer_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("snapshot-")}


@pytest.mark.parametrize("way", FROM_MEMORY, ids=[w.value for w in FROM_MEMORY])
@pytest.mark.parametrize("marked", [SIZE, SIZE // 2 - 5, 0], ids=["all-marked", "half-marked", "none-marked"])
def test_a_writer_from_memory_writes_its_way_and_the_file_reads_back_the_same(tmp_path, monkeypatch,
                                                                              file_reads, way,  # noqa: F811
                                                                              marked):
    """What was marked final was written beside the hash, in order, each byte once (its writeback started,
    through the page cache; none by O_DIRECT); the rest (an unaligned mark included) at finalize, from memory,
    never read back from the file. The file verifies and holds the bytes, its threads are gone."""
    writes: list[tuple[int, int]] = []
    started: list[tuple[int, int]] = []
    real_pwrite, real_start = os.pwrite, image.start_writeback
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: (writes.append((offset, len(data))),
                                                                real_pwrite(fd, data, offset))[1])
    monkeypatch.setattr(image, "start_writeback", lambda fd, offset, size: (started.append((offset, size)),
                                                                            real_start(fd, offset, size))[1])
    data = pattern(SIZE)
    with SnapshotImage.create(tmp_path / "d.snap", SIZE, way=way) as w:
        write_pieces(w, data, marked)
        img = w.finalize()
    s = w.stats
    assert s is not None and s.way is way and s.way_refused == "" and s.writeback_error == "", s
    assert_covers_the_image(writes, "pwrite")
    if way is ImageWay.PWRITE:
        assert_covers_the_image(started, "writeback started")
    else:
        assert not started, f"O_DIRECT left nothing to write back, yet writeback was started for {started}"
    assert (s.hashed_as_final, s.hashed_at_finalize, sum(file_reads)) == (marked, SIZE - marked, 0), s
    assert img.content_hash == blake3.blake3(data).digest()
    assert SnapshotImage.open(img.path).verified and SnapshotImage.open(img.path).read_memory() == data
    assert os.path.getsize(img.path) == image.MEMORY_OFFSET + SIZE + img.vcpu_size
    assert not writer_threads(), f"threads left: {writer_threads()}"


def test_a_file_system_that_refuses_o_direct_gets_the_page_cache_way_and_says_why(tmp_path, monkeypatch):
    """tmpfs before Linux 6.6 (the nested 6.1 host's root) refuses O_DIRECT with EINVAL: the writer writes its
    anonymous memory through the page cache instead (PWRITE) and names the refusal. Simulated here (this host's
    tmpfs takes O_DIRECT): the open refuses."""
    refuse_o_direct(monkeypatch)
    data = pattern(SIZE, seed=1)
    with SnapshotImage.create(tmp_path / "r.snap", SIZE, way=ImageWay.DIRECT) as w:
        write_pieces(w, data, SIZE)
        img = w.finalize()
    s = w.stats
    assert s is not None and s.way is ImageWay.PWRITE and "refuses O_DIRECT (EINVAL)" in s.way_refused, s
    assert s.how == f"{ImageWay.PWRITE.words} (its file system refuses O_DIRECT (EINVAL))", s.how
    assert SnapshotImage.open(img.path).read_memory() == data


@pytest.mark.parametrize("size", [SIZE, SMALL], ids=["on-a-thread", "on-the-caller"])
@pytest.mark.parametrize("way", FROM_MEMORY, ids=[w.value for w in FROM_MEMORY])
def test_a_failed_write_fails_finalize_and_leaves_the_file_incomplete(tmp_path, monkeypatch, way, size):
    """The device's error is not lost, on the writing thread or on the caller's (a small image): finalize raises
    it, naming the writer, and the header never says COMPLETE."""
    def fails(fd, data, offset):
        raise OSError(errno.EIO, f"pwrite at {offset:#x}: {os.strerror(errno.EIO)}")

    path = tmp_path / "eio.snap"
    with SnapshotImage.create(path, size, way=way) as w:
        monkeypatch.setattr(os, "pwrite", fails)
        write_pieces(w, pattern(size), size)
        with pytest.raises(RuntimeError, match=r"the snapshot image writer failed after 0x0 bytes: "
                                               r"OSError\(5, 'pwrite at 0x1000: Input/output error'\)"):
            w.finalize()
    monkeypatch.undo()
    with pytest.raises(image.SnapshotFormatError, match="flags"):
        SnapshotImage.open(path)
    assert not writer_threads(), f"threads left: {writer_threads()}"


@pytest.mark.parametrize("way", list(ImageWay), ids=[w.value for w in ImageWay])
@pytest.mark.parametrize("size", [SMALL, SMALL + PAGE], ids=["small", "a-page-more"])
def test_a_small_image_is_hashed_and_written_as_it_is_marked_final_on_the_callers_thread(tmp_path, file_reads,  # noqa: F811
                                                                               way, size):
    """Up to ``_ON_CALLER_UP_TO`` the writer starts no thread: marking the image final hashes it (and writes it,
    from anonymous memory) there and then, on the caller's thread; the stats say so. A page more, and its threads
    take each final piece. Either way each byte is hashed once as it was marked, and the file holds the bytes,
    never read back from it."""
    small = size <= image._ON_CALLER_UP_TO
    data = pattern(size, seed=3)
    with SnapshotImage.create(tmp_path / "s.snap", size, way=way) as w:
        write_pieces(w, data, size)
        started = writer_threads()
        if small and way is not ImageWay.MAPPING:
            with open(w.path, "rb") as f:
                f.seek(image.MEMORY_OFFSET)
                assert f.read(size) == data, "the marked image was not written when mark_final returned"
        img = w.finalize()
    s = w.stats
    assert s is not None and s.on_caller is small, s
    assert bool(started) is not small, f"threads started while the image was marked final: {started}"
    assert (s.hashed_as_final, s.hashed_at_finalize, sum(file_reads)) == (size, 0, 0), s
    assert s.where.startswith("on the thread that marked it final" if small else "on the writer's threads"), s.where
    assert img.content_hash == blake3.blake3(data).digest()
    assert SnapshotImage.open(img.path).read_memory() == data
    assert not writer_threads(), f"threads left: {writer_threads()}"


@pytest.mark.parametrize("way", FROM_MEMORY, ids=[w.value for w in FROM_MEMORY])
def test_staging_memory_is_lent_to_one_writer_at_a_time_and_kept_between_them(tmp_path, way):
    """Two writers one after the other copy into the same memory (the second overwrites every page, as a
    capture does) and each file holds its own bytes; a second writer while the first holds it, another size, or
    closing it while lent is refused, naming the writer that holds it."""
    with StagingMemory(SIZE) as kept:
        for seed in (1, 2):
            path = tmp_path / f"kept-{seed}.snap"
            with SnapshotImage.create(path, SIZE, way=way, staging=kept) as w:
                assert kept.lent_to == str(path)
                with pytest.raises(ValueError, match=f"in use by the writer of {path}"):
                    SnapshotImage.create(tmp_path / "second.snap", SIZE, way=way, staging=kept)
                with pytest.raises(BufferError, match=f"still in use by the writer of {path}"):
                    kept.close()
                write_pieces(w, pattern(SIZE, seed), SIZE)
                w.finalize()
            assert w.stats is not None and w.stats.way is way and kept.lent_to == ""
            assert SnapshotImage.open(path).read_memory() == pattern(SIZE, seed)
        with pytest.raises(ValueError, match=rf"{SIZE - PAGE:#x} bytes cannot use StagingMemory of {SIZE:#x}"):
            SnapshotImage.create(tmp_path / "small.snap", SIZE - PAGE, way=way, staging=kept)
        with SnapshotImage.create(tmp_path / "aborted.snap", SIZE, way=way, staging=kept):
            pass  # an abort gives it back too
        assert kept.lent_to == ""
    assert kept.mm.closed
    with pytest.raises(ValueError, match="StagingMemory size: expected a positive multiple of 0x1000, got 12345"):
        StagingMemory(12345)


@pytest.mark.needs("uffd", "uffd.PAGEFAULT_FLAG_WP", "uffd.THREAD_ID", "uffd.WP_HUGETLBFS_SHMEM")
@pytest.mark.parametrize("way", FROM_MEMORY, ids=[w.value for w in FROM_MEMORY])
def test_a_capture_from_staging_memory_writes_guest_memory_and_reads_nothing_back(make_memory, tmp_path, way,
                                                                                  file_reads):  # noqa: F811
    """16 MiB captured twice by the engine into one kept StagingMemory: every byte copied, hashed and written as
    the copy went, nothing read back; each file holds guest memory as it was at its capture."""
    from snapproof.native.capture import capture_to_file

    mem = make_memory("memfd", 16 << 20)
    with StagingMemory(mem.size) as kept:
        for name in ("first", "second"):
            memory = fill(mem)
            file_reads.clear()  # the last round's verified open read its file back, as a loader does
            cap = capture_to_file(tmp_path / f"{name}.snap", mem, way=way, staging=kept)
            w = cap.write
            assert (w.way, cap.stats.bulk_pages * PAGE, w.hashed_as_final, sum(file_reads)) == \
                (way, mem.size, mem.size, 0), (cap.stats, w)
            assert cap.image.content_hash == blake3.blake3(memory).digest()
            assert SnapshotImage.open(cap.image.path).read_memory() == memory
            mem.write(0, b"\xee" * PAGE)  # the second capture must see its own memory, not the kept bytes


def test_the_durable_floor_measures_both_plain_ways_and_takes_the_faster(make_memory, tmp_path):
    """The host's floor for a durable capture: the page cache way and the O_DIRECT way, each into a new file
    deleted after it, and the faster of the two as ``best``."""
    from snapproof.native.capture import durable_floor

    mem = make_memory("memfd", 4 << 20)
    floor = durable_floor(tmp_path / "plain.raw", mem)
    assert floor.direct is not None and floor.direct.direct and not floor.cached.direct and floor.refused == ""
    assert floor.best is min(floor.cached, floor.direct, key=lambda w: w.total_ns)
    assert floor.total_ns == floor.best.total_ns > 0 and floor.cached.sync_ns > 0 and floor.direct.sync_ns > 0
    assert not list(tmp_path.iterdir()), f"files left: {list(tmp_path.iterdir())}"


def test_the_durable_floor_names_a_refused_o_direct_and_keeps_the_page_cache_way(make_memory, tmp_path,
                                                                                 monkeypatch):
    """Where the file system refuses O_DIRECT (tmpfs before Linux 6.6; simulated: this host's takes it), the floor
    is the page cache way, and the words a report prints say why O_DIRECT was not measured."""
    from snapproof.native.capture import durable_floor, floor_words

    mem = make_memory("memfd", 1 << 20)
    refuse_o_direct(monkeypatch)
    floor = durable_floor(tmp_path / "plain.raw", mem)
    assert floor.direct is None and floor.best is floor.cached
    assert floor.refused == "O_DIRECT refused by the file system: Invalid argument", floor.refused
    words = floor_words([floor], lambda ns: f"{ns:.0f} ns")
    assert words.startswith("page cache ") and words.endswith(
        "; O_DIRECT not measured: O_DIRECT refused by the file system: Invalid argument"), words
    assert not list(tmp_path.iterdir()), f"files left: {list(tmp_path.iterdir())}"


def test_a_writer_dropped_without_finalize_gives_its_staging_memory_back(tmp_path):
    """Forgetting both finalize() and abort(): once the writer is collected its threads are gone and the kept
    memory is free for the next writer, not lent forever to one nobody holds."""
    import gc

    with StagingMemory(SIZE) as kept:
        w = SnapshotImage.create(tmp_path / "dropped.snap", SIZE, way=ImageWay.PWRITE, staging=kept)
        write_pieces(w, pattern(SIZE), SIZE)
        del w
        gc.collect()
        assert kept.lent_to == "", kept.lent_to
        for t in threading.enumerate():
            if t.name.startswith("snapshot-"):
                t.join(10)
        assert not writer_threads(), f"threads left: {writer_threads()}"


def test_staging_memory_is_refused_for_the_mapping_way(tmp_path):
    """The mapping way copies into the file's own mapping: staging memory given with it is a mistake, named, and
    no file is made."""
    with StagingMemory(SIZE) as kept, pytest.raises(ValueError, match=r"staging: memory to copy into is for "
                                                                       r"ImageWay.PWRITE or ImageWay.DIRECT, not "
                                                                       r"ImageWay.MAPPING"):
        SnapshotImage.create(tmp_path / "m.snap", SIZE, staging=kept)
    assert not (tmp_path / "m.snap").exists()
