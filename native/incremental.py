"""Incremental snapshots as a VMM takes and restores them: a full base, then diffs of the pages written since.

Taking, at pauses the caller makes (every vCPU out of KVM_RUN, the VMM's devices quiet):

- ``base(vcpu_states)``: the dirty-page tracker starts (every page clean from this instant) and all of
  guest memory goes into a full snapshot file (native/image.py). Only the memfd's data extents are read
  (pread, SEEK_DATA): a never-populated page stays a hole in guest memory and in the file.
- ``diff(vcpu_states)``: the tracker's written pages, together with the pages the VMM itself wrote into
  guest memory since the parent (``HostWrites``: device emulation's plain writes outside KVM_RUN, which
  KVM's dirty log never sees), go into a diff file (native/diff_image.py) naming its parent by content
  hash. With ``FaultInjection.DIFF_TRUSTS_DIRTY_LOG`` the VMM's own writes are left out: Firecracker's
  first diff snapshots (issue #1997), whose restored guests found device data missing.

Restoring: ``restore_chain`` opens the chain (``open_chain`` refuses a wrong or missing parent), loads
the base with any loader of native/restore.py and the head's vCPU states, then puts each diff's pages in
place, newest first (``apply_diffs``): a memcpy into read-copy and map-private memory, UFFDIO_COPY into
lazy-uffd memory, so the lazy loader never fetches from the base a page a diff replaces. Linux only.
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    raise ImportError("native.incremental drives KVM memory and its loaders: Linux only")

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from snapproof.native._lib import check, ffi, lib
from snapproof.native.diff_image import Chain, DiffImage, count, empty_bitmap, open_chain, union
from snapproof.native.dirty import DirtyTracker
from snapproof.native.image import SnapshotImage, data_extents
from snapproof.native.inject import FaultInjection
from snapproof.native.memory import PAGE_SIZE, GuestMemory
from snapproof.native.restore import RestoredMemory, RestoredVm, restore_vm

# One read(2) moves at most 0x7ffff000 bytes on Linux: 1 GiB reads stay whole.
_READ_CHUNK = 1 << 30


class HostWrites:
    """The VMM's own writes into guest memory (device emulation: a plain copy through the VMM's mapping,
    outside KVM_RUN), and the log of the pages they touched: what a diff must add to a tracker that cannot
    see them."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.npages = memory.size // PAGE_SIZE
        self._log = empty_bitmap(self.npages)

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at memory offset ``offset`` and log its pages."""
        self.memory.write(offset, data)
        for page in range(offset // PAGE_SIZE, (offset + max(len(data), 1) - 1) // PAGE_SIZE + 1):
            self._log[page >> 3] |= 1 << (page & 7)

    def take(self) -> bytearray:
        """The pages written since the last take, as a bitmap; the log starts empty again."""
        log, self._log = self._log, empty_bitmap(self.npages)
        return log


@dataclass(frozen=True)
class FullSnapshot:
    image: SnapshotImage
    data_bytes: int   # bytes of the memfd's data extents copied; the rest is holes, in memory and in the file
    ns: int


def write_full_snapshot(path: str | os.PathLike[str], memory: GuestMemory,
                        vcpu_states: Sequence[bytes] = ()) -> FullSnapshot:
    """All of ``memory`` (a memfd) and the vCPU states into a new snapshot file, read through the memfd so no
    page is populated or touched in the page tables a tracker watches. The guest must not run meanwhile."""
    if memory.fd is None:
        raise ValueError(f"a full snapshot is read through the memfd; {memory.backing} guest memory has none")
    t0 = time.perf_counter_ns()
    copied = 0
    with SnapshotImage.create(path, memory.size) as writer:
        for start, end in data_extents(memory.fd, 0, memory.size):
            pos = start
            while pos < end:
                with writer.memory[pos:min(end, pos + _READ_CHUNK)] as part:
                    n = os.preadv(memory.fd, [part], pos)
                if n <= 0:
                    raise OSError(f"pread of guest memory at {pos:#x}: {n} bytes (the memfd shrank)")
                pos += n
            copied += end - start
        image = writer.finalize(vcpu_states)
    return FullSnapshot(image, copied, time.perf_counter_ns() - t0)


@dataclass(frozen=True)
class DiffTaken:
    """One diff and what it was made of: the tracker's pages and the VMM's own (each a bitmap)."""

    image: DiffImage
    tracked: bytearray
    host: bytearray
    collect_ns: int   # the tracker's get-and-clear
    write_ns: int     # the diff file: pages gathered, hashed, vCPU states, header, fsync

    @property
    def pages(self) -> int:
        return self.image.page_count


class IncrementalSnapshots:
    """One guest memory's chain: a base file, then diff files, in ``folder``; each call at a pause."""

    def __init__(self, memory: GuestMemory, tracker: DirtyTracker, host_writes: HostWrites,
                 folder: str | os.PathLike[str], inject: FaultInjection = FaultInjection.NONE) -> None:
        if memory.fd is None:
            raise ValueError(f"incremental snapshots read guest memory through its memfd; {memory.backing} has none")
        self.memory = memory
        self.tracker = tracker
        self.host_writes = host_writes
        self.folder = Path(folder)
        self.inject = inject
        self.base_image: SnapshotImage | None = None
        self.diffs: list[DiffImage] = []

    @property
    def paths(self) -> list[str]:
        """The chain's files, oldest first: the base, then each diff."""
        return ([self.base_image.path] if self.base_image else []) + [d.path for d in self.diffs]

    def base(self, vcpu_states: Sequence[bytes]) -> FullSnapshot:
        """Start tracking and write the base: both at this one pause, so the first diff starts where it ends."""
        self.tracker.start()
        self.host_writes.take()  # what the VMM wrote before now is in the base
        full = write_full_snapshot(self.folder / "base.snap", self.memory, vcpu_states)
        self.base_image, self.diffs = full.image, []
        return full

    def diff(self, vcpu_states: Sequence[bytes]) -> DiffTaken:
        """The pages written since the parent (the tracker's, and the VMM's own) into the next diff file."""
        if self.base_image is None:
            raise RuntimeError("diff() before base(): a diff needs a parent")
        parent = self.diffs[-1] if self.diffs else self.base_image
        tracked = self.tracker.collect()
        host = self.host_writes.take()
        pages = tracked if self.inject & FaultInjection.DIFF_TRUSTS_DIRTY_LOG else union(tracked, host)
        t0 = time.perf_counter_ns()
        with DiffImage.create(self.folder / f"diff-{len(self.diffs) + 1}.diff", self.memory.size,
                              parent.content_hash, pages) as writer:
            if count(pages):
                with ffi.from_buffer("char[]", writer.pages, require_writable=True) as dst, \
                        ffi.from_buffer("uint64_t[]", pages) as words:
                    check(lib.sp_gather_pages(self.memory.fd, 0, self.memory.addr, words, self.tracker.npages,
                                              int(ffi.cast("uintptr_t", dst))), "gather the diff's pages")
            image = writer.finalize(vcpu_states)
        self.diffs.append(image)
        return DiffTaken(image, tracked, host, self.tracker.collect_ns, time.perf_counter_ns() - t0)


# -- restoring a chain ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AppliedDiffs:
    pages: int       # pages put in place (each once: the newest diff holding it)
    installed: int   # of them, installed by UFFDIO_COPY into lazily loaded memory
    ns: int


def apply_diffs(chain: Chain, restored: RestoredMemory) -> AppliedDiffs:
    """Put each diff's pages into memory restored from the chain's base, newest diff first, each page once.
    Before any vCPU runs: a lazily loaded page a diff replaces is installed from the diff, never the base."""
    t0 = time.perf_counter_ns()
    npages = chain.memory_size // PAGE_SIZE
    done = empty_bitmap(npages)
    uffd = lib.sp_lazy_uffd(restored.lazy.handle) if restored.lazy is not None else -1
    installed = ffi.new("uint64_t *")
    pages = 0
    for d in reversed(chain.diffs):
        mm = d.map_pages()
        if mm is None:
            continue
        try:
            with ffi.from_buffer("char[]", mm) as src, ffi.from_buffer("uint64_t[]", d.bitmap) as bits, \
                    ffi.from_buffer("uint64_t[]", done) as done_bits:
                pages += check(lib.sp_scatter_pages(uffd, restored.memory.addr, int(ffi.cast("uintptr_t", src)), bits,
                                                    npages, done_bits, installed), f"apply {d.path}")
        finally:
            mm.close()
    return AppliedDiffs(pages, int(installed[0]), time.perf_counter_ns() - t0)


@dataclass
class RestoredChain:
    """A fresh VM restored from a chain: the base by one loader, the diffs applied, the head's vCPU states."""

    chain: Chain
    vm: RestoredVm
    applied: AppliedDiffs
    open_ns: int   # the chain opened: headers read, parents checked (hashes verified when asked)

    @property
    def ready_ns(self) -> int:
        """From the start of the restore until the vCPUs could enter the guest."""
        return self.open_ns + self.vm.ready_ns + self.applied.ns

    @property
    def memory(self) -> GuestMemory:
        return self.vm.memory

    def close(self) -> None:
        self.vm.close()

    def __enter__(self) -> RestoredChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def restore_chain(paths: Sequence[str | os.PathLike[str]], loader: str, *, verify: bool = True,
                  restore: Callable[..., RestoredVm] = restore_vm, **restore_kw: object) -> RestoredChain:
    """A fresh VM restored from a chain: ``paths[0]`` the base, then its diffs oldest first. The chain is opened
    first and refused (ChainError) when a diff does not name the file before it as its parent, before anything
    is loaded; then ``restore`` (native.restore.restore_vm, or a factory wrapping it) loads the base by ``loader``
    with the head's vCPU states, and the diffs' pages are put in place before any vCPU runs."""
    if not paths:
        raise ValueError("a chain needs at least its base")
    t0 = time.perf_counter_ns()
    chain = open_chain(paths[0], paths[1:], verify=verify)
    t1 = time.perf_counter_ns()
    restored = restore(chain.head_image(), loader, **restore_kw)
    try:
        applied = apply_diffs(chain, restored.restored)
    except BaseException:
        restored.close()
        raise
    return RestoredChain(chain, restored, applied, t1 - t0)
