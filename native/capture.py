"""Capture guest memory straight into a snapshot file: the WP engine's destination is the file itself.

``capture_to_file`` creates the file at its final size (``SnapshotImage.create``),
points the engine at the writer's shared mapping of the memory image, takes
the snapshot, drops the engine's pointer into the mapping and finalizes the
file with the vCPU states. Two ways to take it:

- the VM is stopped (halted, or never started): save the vCPU states, arm,
  bulk copy, finalize;
- the VM is running under a ``VcpuRunner``: the live protocol of
  ``native.live.take_live_snapshot`` (pause, save states, arm, resume, copy
  while the guest runs).

Either way the bulk copy runs in pieces (``copy_into_file``): after each, the
prefix of the image known final is handed to the writer, whose thread hashes it
(blake3, while the bytes are still in the CPU's cache) and starts its writeback,
as the copier goes on with the next piece on the other CPU. The image is read
once, by that hash; the file's finalize has only the hash's tail and a sync of
what writeback has not yet written left to do.

Nothing here sleeps or waits on a poll time-out: the engine's handler stops
through an eventfd (forkd's finalize spent about 100 ms of its 162.6 ms round
trip in fixed sleeps and poll time-outs). With ``FaultInjection.DROP_VCPU_STATE``
the file is written without its vCPU states, the bug a mid-execution restore
must catch. Linux only.
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    raise ImportError("native.capture (the uffd WP engine) is Linux-only")

import errno
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from snapproof.native.engine import Engine
from snapproof.native.image import ImageWay, SnapshotImage, SnapshotWriter, StagingMemory, WriteStats, start_writeback
from snapproof.native.inject import FaultInjection
from snapproof.native.kvm import Vcpu
from snapproof.native.live import LiveSnapshot, VcpuRunner, take_live_snapshot
from snapproof.native.memory import PAGE_SIZE, GuestMemory
from snapproof.native.pagemap import read_pagemap
from snapproof.native.wp import BULK_BATCH, WpSnapshot, WpStats

# The bulk copy's piece: after each, what is final goes to the writer's hashing thread. One un-protect batch
# (2 MiB) is still in the cache when the hash reads it, and costs one engine call, one pagemap read and one
# hand-over (16 MiB pieces hashed slower here, from memory; 1, 2 and 4 MiB alike).
COPY_PIECE = BULK_BATCH * PAGE_SIZE


def final_end(memory: GuestMemory, start: int, end: int) -> int:
    """The end of the final prefix of guest memory [start, end) in the destination: the first page there that
    still carries PM_UFFD_WP, or ``end``.

    After a bulk copy of a range a page may still be the handler's, its capture in flight: the engine ABI
    lets the copier leave such a page to the handler, which un-protects it only once its copy is done. A page
    no longer write-protected is captured, and its destination bytes never change again."""
    _, wp = read_pagemap(memory.addr + start, (end - start) // PAGE_SIZE)
    protected = wp.find(1)
    return end if protected < 0 else start + protected * PAGE_SIZE


def copy_into_file(snap: WpSnapshot, writer: SnapshotWriter, batch: int = BULK_BATCH,
                   piece: int = COPY_PIECE, progress: Callable[[int], None] | None = None) -> int:
    """Bulk copy the whole region piece by piece, marking the writer's image final as far as it is after
    each; returns the pages copied. A page still protected holds the mark back until a later piece's check
    (or the writer's finalize) finds it captured. ``progress`` is told the bytes of each piece gone through."""
    pages = max(1, piece // snap.page_size)
    copied, final = 0, 0
    for first in range(0, snap.npages, pages):
        n = min(pages, snap.npages - first)
        copied += snap.bulk_copy(first, n, batch=batch)
        final = final_end(snap.memory, final, (first + n) * snap.page_size)
        writer.mark_final(final)
        if progress is not None:
            progress(n * snap.page_size)
    return copied


@dataclass(frozen=True)
class FileCapture:
    """One capture into one file, and what each part of it took (ns)."""

    image: SnapshotImage
    stats: WpStats
    live: LiveSnapshot | None
    vcpu_states_taken: int    # states the capture saved
    vcpu_states_written: int  # states in the file (0 under DROP_VCPU_STATE)
    create_ns: int            # file created at its size, header written, image memory mapped and allocated
    engine_ns: int            # engine set up, arm, bulk copy, finalize (+ the pause, when live)
    arm_ns: int
    bulk_ns: int
    finalize_ns: int          # engine: un-protect the region, join the handler (eventfd, no time-out)
    file_ns: int              # writer's finalize: the hash's tail, vCPU section, sync, header with COMPLETE, sync
    write: WriteStats         # how the image was hashed (as the copy went, or at finalize) and synced

    @property
    def total_ns(self) -> int:
        return self.create_ns + self.engine_ns + self.file_ns


def capture_to_file(path: str | os.PathLike[str], memory: GuestMemory, *, vcpus: Sequence[Vcpu] = (),
                    runner: VcpuRunner | None = None, inject: FaultInjection = FaultInjection.NONE,
                    handler_cpu: int | None = None, timeout: float = 10.0, engine: Engine | None = None,
                    progress: Callable[[int], None] | None = None, way: ImageWay = ImageWay.MAPPING,
                    staging: StagingMemory | None = None) -> FileCapture:
    """Snapshot ``memory`` (and the vCPUs' states) into a new snapshot file at ``path``.

    Without ``runner`` the vCPUs in ``vcpus`` must be stopped; with it, its vCPUs are paused, saved
    and resumed by the live protocol and ``vcpus`` is ignored. ``engine`` takes the snapshot (the
    built-in one by default); ``progress`` is told the bytes copied (and so hashed) as the copy goes. ``way``: how
    the image reaches the file (``ImageWay``): the engine copies into the file's mapping, or into anonymous memory
    (``staging``, kept by the caller from one capture to the next, or the writer's own) that a thread of the
    writer writes as it becomes final; ``write.way`` says which way it took.
    A failure leaves the file marked incomplete (the writer's abort), never a file that loads.
    """
    clock = time.perf_counter_ns
    t0 = clock()
    # The copy writes every page of the image: its memory (page cache, or anonymous) is allocated here (unless kept),
    # before the pause, in one call, rather than one fault a page while the guest runs and its copy-before-write
    # faults wait on the copier.
    with SnapshotImage.create(path, memory.size, populate=True, way=way, staging=staging) as writer:
        t1 = clock()
        snap = WpSnapshot(memory, writer.memory, engine=engine, inject=inject, handler_cpu=handler_cpu)
        try:
            live: LiveSnapshot | None = None
            if runner is not None:
                live = take_live_snapshot(runner, snap, timeout=timeout,
                                          bulk_copy=lambda: copy_into_file(snap, writer, progress=progress))
                states = list(live.vcpu_states)
                arm_ns, bulk_ns, finalize_ns = live.arm_ns, live.bulk_ns, live.finalize_ns
            else:
                states = [v.save_state() for v in vcpus]
                arm_ns = snap.arm()
                t_bulk = clock()
                copy_into_file(snap, writer, progress=progress)
                t_fin = clock()
                snap.finalize(timeout)
                bulk_ns, finalize_ns = t_fin - t_bulk, clock() - t_fin
            stats = snap.stats()
        finally:
            # A finalized engine has dropped its view of writer.memory already; on any other way out
            # (an error, an interrupt) close() drops it, so the writer's abort can unmap the file.
            snap.close()
        t2 = clock()
        written = [] if inject & FaultInjection.DROP_VCPU_STATE else states
        image = writer.finalize(written)
        t3 = clock()
        assert writer.stats is not None  # set by finalize
    return FileCapture(image=image, stats=stats, live=live, vcpu_states_taken=len(states),
                       vcpu_states_written=len(written), create_ns=t1 - t0, engine_ns=t2 - t1, arm_ns=arm_ns,
                       bulk_ns=bulk_ns, finalize_ns=finalize_ns, file_ns=t3 - t2, write=writer.stats)


# The plain durable write's piece: written, then (through the page cache) its writeback started while the next is
# written.
DURABLE_WRITE_PIECE = 8 << 20
# The plain durable write in words, for the reports that measure against it.
DURABLE_WRITE_HOW = ("the faster of two plain writes into a new file: pwrite piece by piece through the page cache, "
                     "each one's writeback started as the next is written, then fsync; and the same pieces by "
                     "O_DIRECT pwrite, then fsync")


@dataclass(frozen=True)
class DurableWrite:
    """One plain way to make some memory durable in a new file, timed (ns): no WP, no hash."""

    copy_ns: int  # pwrite of each piece (into the page cache, its writeback started; or O_DIRECT, to the device)
    sync_ns: int  # fsync: what writeback had not written yet, and the file's metadata
    direct: bool  # O_DIRECT, not the page cache

    @property
    def total_ns(self) -> int:
        return self.copy_ns + self.sync_ns

    @property
    def way(self) -> str:
        return "O_DIRECT" if self.direct else "page cache"


@dataclass(frozen=True)
class DurableFloor:
    """This host's floor for a durable capture of some memory: the plain durable write both ways, back to back,
    and the faster of them. Through the page cache (pwrite, each piece's writeback started as the next is written)
    beat a copy into the file's mapping then fsync (at 1 GiB in quiet runs of phase 5 here, 0.90 s against
    1.18 s). Neither it nor O_DIRECT always wins: at 1 GiB in quiet runs of phase 5 here O_DIRECT took 0.41-0.51 s
    and the page cache way 0.36-1.80 s, O_DIRECT the faster in 3 to 6 rounds of 6. ``refused`` says why O_DIRECT
    was not measured, where the file system refuses it (tmpfs before Linux 6.6)."""

    cached: DurableWrite
    direct: DurableWrite | None
    refused: str = ""

    @property
    def best(self) -> DurableWrite:
        if self.direct is not None and self.direct.total_ns < self.cached.total_ns:
            return self.direct
        return self.cached

    @property
    def total_ns(self) -> int:
        return self.best.total_ns


def durable_write(path: str | os.PathLike[str], memory: GuestMemory, *, direct: bool = False,
                  piece: int = DURABLE_WRITE_PIECE) -> DurableWrite:
    """Write ``memory`` into a new plain file at ``path`` piece by piece, fsync it, delete it. Through the page cache
    each piece's writeback starts as the next is written; ``direct`` writes with O_DIRECT from the memory itself
    (page-aligned, as guest memory is), so an OSError (EINVAL) where the file system refuses it."""
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o600)
    try:
        with memoryview(memory.mm) as source:
            t0 = time.perf_counter_ns()
            for offset in range(0, memory.size, piece):
                size = min(piece, memory.size - offset)
                with source[offset:offset + size] as part:
                    written = os.pwrite(fd, part, offset)
                if written != size:
                    raise OSError(f"{path}: pwrite wrote {written:#x} of {size:#x} bytes at {offset:#x}")
                if not direct:
                    start_writeback(fd, offset, size)
            t1 = time.perf_counter_ns()
            os.fsync(fd)
            t2 = time.perf_counter_ns()
    finally:
        os.close(fd)
        os.unlink(path)
    return DurableWrite(copy_ns=t1 - t0, sync_ns=t2 - t1, direct=direct)


def durable_floor(path: str | os.PathLike[str], memory: GuestMemory) -> DurableFloor:
    """This host's floor for a durable capture of ``memory`` into a file beside ``path``: both plain ways, measured
    one after the other (each file deleted before the next), the faster as ``best``."""
    cached = durable_write(path, memory)
    try:
        direct = durable_write(path, memory, direct=True)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return DurableFloor(cached, None, refused=f"O_DIRECT refused by the file system: {e.strerror}")
    return DurableFloor(cached, direct)


def floor_words(floors: Sequence[DurableFloor], fmt_ns: Callable[[float], str]) -> str:
    """A benchmark's plain durable writes in words, times written by the report's ``fmt_ns``: each way's median,
    and how often O_DIRECT was the faster."""
    def way(writes: Sequence[DurableWrite]) -> str:
        def med(part: Callable[[DurableWrite], int]) -> str:
            return fmt_ns(statistics.median([part(w) for w in writes]))

        return (f"{writes[0].way} {med(lambda w: w.total_ns)} (the writes {med(lambda w: w.copy_ns)}, fsync "
                f"{med(lambda w: w.sync_ns)})")

    cached = way([f.cached for f in floors])
    direct = [f.direct for f in floors if f.direct is not None]
    if not direct:
        return f"{cached}; O_DIRECT not measured: {floors[0].refused}"
    won = sum(f.best.direct for f in floors)
    return f"{cached}; {way(direct)}; O_DIRECT the faster in {won} of {len(floors)}"
