"""Restore a snapshot file into fresh guest memory, three ways behind one interface.

=============  =====================================================================================
loader         how guest memory is filled
=============  =====================================================================================
read-copy      a fresh memfd, filled by reading the file's memory image: every byte is copied
               (and every destination page first-touched) before the first guest instruction
map-private    the memory image mapped MAP_PRIVATE (``GuestMemory.file_private``): pages come from
               the page cache at first touch, guest writes stay private, the file never changes
lazy-uffd      a fresh memfd (or anonymous mapping) registered with userfaultfd in MISSING mode:
               the C handler (native/linux/uffd_lazy.c) installs each page from the file with
               UFFDIO_COPY at the guest's first touch; ``prefetch_all()`` installs the rest
=============  =====================================================================================

Into memory backed by transparent huge pages (``thp=True``) the lazy loader keeps huge pages off the
mapping (MADV_NOHUGEPAGE) while any page is missing and turns them back on once every page is there: a
collapse of a 2 MiB range with pages still missing (khugepaged, or MADV_COLLAPSE) fills them with zeros
on 6.1 for shmem (measured; 6.18 refuses), exposing not-yet-restored neighbours as zeros, the class of
cloud-hypervisor issue #8663. Its own 4 KiB UFFDIO_COPY never installs more than the page (measured on
both kernels, anonymous and shmem).

The lazy loader fails closed. Should it stop serving with pages still missing (its handler dies, its
userfaultfd is closed, it is released early), the kernel would fill each such page with zeros at its next
touch and the guest would run on them. The C loader fences those pages (PROT_NONE) before anyone waiting
on them is woken, so KVM fails the guest's access and the vCPU stops; the VM's ``run_guard`` then turns
the run into ``LoaderDied`` naming why, and the memory's ``access_guard`` refuses host accesses to fenced
pages the same way.

``restore_memory(image, loader)`` returns a ``RestoredMemory``; ``restore_vm(image, loader)`` adds a
fresh VM whose vCPUs carry the file's saved states. Both are context managers whose ``close()``
releases everything in reverse order (VM, then the lazy handler, then the memory) and is idempotent.
Linux only (KVM, userfaultfd).
"""

from __future__ import annotations

import sys

# Before the platform guard: the names are plain data that a phase's parameters use on every host.
LOADERS: tuple[str, ...] = ("read-copy", "map-private", "lazy-uffd")
# What each loader needs of the host (native.host capability names): the plugin reads it at collection, for
# a ``loader`` parameter, and deselects a case whose loader needs what the host lacks, naming it (--strict-host
# fails it instead when the gate policy requires the capability). lazy-uffd serves MISSING faults into a memfd
# (its default backing): shmem needs MISSING_SHMEM; into anonymous memory it would need no feature bit.
LOADER_NEEDS: dict[str, tuple[str, ...]] = {
    "read-copy": ("kvm",),
    "map-private": ("kvm",),
    "lazy-uffd": ("kvm", "uffd", "uffd.MISSING_SHMEM"),
}

if sys.platform == "win32":
    raise ImportError("native.restore (KVM, userfaultfd) is Linux-only")

import enum
import errno
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from snapproof.native import uffd
from snapproof.native._lib import check, ffi, lib
from snapproof.native.errors import LoaderDied
from snapproof.native.image import SnapshotFormatError, SnapshotImage, VcpuKind, VcpuPart
from snapproof.native.inject import C_SWITCHES, FaultInjection, dropped_parts
from snapproof.native.kvm import Exit, Vcpu, Vm
from snapproof.native.memory import PAGE_SIZE, GuestMemory
from snapproof.native.wp import read_pagemap, require_features

LAZY_BACKINGS = ("memfd", "anonymous")
# One read(2) moves at most 0x7ffff000 bytes on Linux; 1 GiB chunks keep each call whole.
_READ_CHUNK = 1 << 30


# -- lazy loading: userfaultfd MISSING faults served from the file --------------------------------


def _hist_percentile_us(hist: list[int], q: float) -> float:
    """Percentile of a 1 µs histogram (bucket upper edge)."""
    total = sum(hist)
    if not total:
        return 0.0
    want, seen = q * total, 0
    for us, n in enumerate(hist):
        seen += n
        if seen >= want:
            return float(us + 1)
    return float(len(hist))


class LazyEnd(enum.IntEnum):
    """Why a lazy loader stopped serving (SERVING while it serves): native/linux/snapproof.h, enum sp_lazy_end."""

    SERVING = lib.SP_LAZY_SERVING
    HANDLER_DIED = lib.SP_LAZY_HANDLER_DIED
    UFFD_CLOSED = lib.SP_LAZY_UFFD_CLOSED
    RELEASED = lib.SP_LAZY_RELEASED


@dataclass(frozen=True)
class LazyStats:
    faults: int            # MISSING faults served
    fault_pages: int       # pages the handler installed
    fault_eexist: int      # faults whose page was installed first by the prefetcher (woken only)
    prefetch_pages: int    # pages prefetch_all() installed
    prefetch_eexist: int   # pages prefetch_all() found installed already
    other_events: int
    service_ns_total: int
    service_ns_max: int
    first_fault_ns: int    # sp_now_ns() (CLOCK_MONOTONIC) when the first fault was read; 0 if none
    last_fault_ns: int
    hist_us: list[int]
    handler_cpus: dict[int, int]
    handler_err: int
    handler_alive: bool
    end: LazyEnd = LazyEnd.SERVING
    fenced_pages: int = 0  # pages made PROT_NONE when the loader stopped with them missing
    fence_ns: int = 0
    fence_err: int = 0     # errno of a fence that failed, 0 if none
    fenced_whole: bool = False  # too many runs for vm.max_map_count: the whole region was fenced
    features_requested: int = 0
    features_supported: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def service_ns_mean(self) -> float:
        return self.service_ns_total / self.faults if self.faults else 0.0

    def service_percentile_us(self, q: float) -> float:
        return _hist_percentile_us(self.hist_us, q)


class LazyUffd:
    """The lazy loader's engine over one destination mapping. ``close()`` stops the handler (eventfd,
    bounded join), fences the pages still missing, unregisters the range and unmaps the file; it is
    idempotent. While it exists it guards ``memory``'s host accesses (``GuestMemory.access_guard``)."""

    def __init__(self, memory: GuestMemory, path: str | os.PathLike[str], offset: int, *,
                 handler_cpu: int | None = None, inject: FaultInjection = FaultInjection.NONE) -> None:
        if memory.backing not in LAZY_BACKINGS:
            raise ValueError(f"lazy loading serves 4 KiB pages into {' or '.join(LAZY_BACKINGS)} memory, "
                             f"not {memory.backing}")
        self.memory = memory
        self.path = Path(path)
        self.inject = inject
        # MISSING on anonymous memory needs no feature bit; on shmem (a memfd) it needs MISSING_SHMEM.
        need = uffd.FEATURES["MISSING_SHMEM"] if memory.backing == "memfd" else 0
        if inject & FaultInjection.LAZY_UFFD_CLOSES_MID_RESTORE:
            need |= uffd.FEATURES["THREAD_ID"]  # the injected death waits for a guest's fault: who faulted
        require_features(need, f"uffd MISSING faults on {memory.backing} memory")
        self.features_requested = need
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            length = os.fstat(fd).st_size
            if offset < 0 or offset % PAGE_SIZE or offset + memory.size > length:
                raise ValueError(f"{self.path}: image [{offset:#x}, {offset + memory.size:#x}) is not a page-aligned "
                                 f"range inside the file ({length:#x} bytes)")
            out = ffi.new("struct sp_lazy **")
            sup = ffi.new("uint64_t *")
            # The C side maps the file PROT_READ itself; that mapping keeps the file, so fd can go.
            check(lib.sp_lazy_create(memory.addr, memory.size, fd, offset, need, inject.value & C_SWITCHES,
                                     -1 if handler_cpu is None else handler_cpu, out, sup),
                  "lazy loader create", mem=memory.addr, size=memory.size, offset=offset, features=need)
        finally:
            os.close(fd)
        self.features_supported = int(sup[0])
        self._l = out[0]
        self.npages = memory.size // PAGE_SIZE
        self._closed_fenced = 0  # pages fenced when close() destroyed the engine: still PROT_NONE in memory
        memory.access_guard = self._guard_host_access
        # Huge pages off while pages are missing (the module's docstring says why); back on when all are there.
        self.thp_guard = memory.thp and not inject & FaultInjection.LAZY_UFFD_THP_UNGUARDED
        if self.thp_guard:
            memory.no_thp()

    @property
    def handle(self) -> object:
        if self._l is None:
            raise ValueError("lazy loader is closed")
        return self._l

    def prefetch_all(self, batch: int = 512) -> int:
        """Install every page still missing (UFFDIO_COPY, ``batch`` pages a call); returns how many.
        LoaderDied once the loader stopped serving (its handler died, its uffd was closed)."""
        rc = lib.sp_lazy_prefetch_all(self.handle, batch)
        if rc == -errno.EOWNERDEAD:
            raise self._died("prefetch the rest")
        installed = check(rc, "lazy prefetch", batch=batch)
        if self.thp_guard and self.pages_present() == self.npages:
            self.memory.allow_thp()  # nothing missing any more: a collapse now holds only restored pages
        return installed

    # -- failing closed: the loader's death named, never zeros ---------------------------------------

    @property
    def guarded(self) -> bool:
        """False only under the fault injection that removes the guard (LAZY_UFFD_UNGUARDED)."""
        return not self.inject & FaultInjection.LAZY_UFFD_UNGUARDED

    def end(self) -> LazyEnd:
        """SERVING, or why the loader stopped serving."""
        return LazyEnd(lib.sp_lazy_end(self.handle))

    def _died(self, what: str) -> LoaderDied:
        s = self.stats()
        if s.end is LazyEnd.HANDLER_DIED:
            why = f"its fault handler thread died ({_errno_text(s.handler_err)})"
        elif s.end is LazyEnd.UFFD_CLOSED:
            why = f"its userfaultfd was closed under it (handler stopped with {_errno_text(s.handler_err)})"
        else:
            why = "it was released with pages still missing"
        if s.fence_err:
            fence = (f"the fence of the pages it never restored FAILED ({_errno_text(s.fence_err)}): they may "
                     "read as zeros")
        elif s.fenced_whole:
            fence = (f"all {self.npages} pages are fenced (PROT_NONE; {s.fenced_pages} never restored, too many "
                     "runs for vm.max_map_count), so the guest stopped instead of reading zeros")
        else:
            fence = (f"the {s.fenced_pages} pages it never restored are fenced (PROT_NONE), so the guest stopped "
                     "at them instead of reading zeros")
        injected = [m.name for m in (FaultInjection.LAZY_UFFD_CLOSES_MID_RESTORE,) if m.name and self.inject & m]
        how = f"; fault injection {', '.join(injected)}" if injected else ""
        return LoaderDied(f"{what}: the lazy loader stopped serving guest memory mid-restore: {why}; {fence}{how}")

    def raise_if_died(self, what: str) -> None:
        """LoaderDied naming ``what`` when the loader stopped serving other than by a clean release."""
        if not self.guarded:
            return
        s = self.stats()
        if s.end in (LazyEnd.HANDLER_DIED, LazyEnd.UFFD_CLOSED) or (s.end is LazyEnd.RELEASED and s.fenced_pages):
            raise self._died(what)

    def check_run(self, ex: Exit) -> None:
        """The VM's run guard (``Vm.run_guard``): a run of a VM whose loader died fails naming it, whatever the exit
        (the fenced access itself ends as KVM_RUN EFAULT, MEMORY_FAULT or an MMIO exit at the GPA)."""
        if self._l is not None:
            self.raise_if_died(f"the vCPU run ended with {ex.describe()}")

    def _guard_host_access(self, offset: int, n: int) -> None:
        """GuestMemory's access guard: a host access to a fenced page would be SIGSEGV; LoaderDied instead."""
        if not self.guarded:
            return
        what = f"host access to memory [{offset:#x}, {offset + n:#x})"
        if self._l is None:
            if self._closed_fenced:
                raise LoaderDied(f"{what}: the lazy loader is closed and {self._closed_fenced} pages it never "
                                 "restored are fenced (PROT_NONE)")
            return
        first = offset // PAGE_SIZE
        pages = (offset + max(n, 1) + PAGE_SIZE - 1) // PAGE_SIZE - first
        if lib.sp_lazy_fenced_in(self._l, first, pages):
            raise self._died(what)

    def pages_present(self) -> int:
        return int(lib.sp_lazy_pages_present(self.handle))

    def page_states(self) -> bytes:
        """Each page's state (SP_LAZY_MISSING, SP_LAZY_PRESENT: installed from the file, SP_LAZY_FENCED)."""
        out = ffi.new("uint8_t[]", self.npages)
        n = lib.sp_lazy_page_states(self.handle, out, self.npages)
        return bytes(ffi.buffer(out, n))

    def release(self, timeout: float = 5.0) -> None:
        """Stop the handler and unregister: the memory stays, a plain mapping (prefetch first to keep the image)."""
        check(lib.sp_lazy_release(self.handle, int(timeout * 1e9)), "lazy loader release")

    def stats(self) -> LazyStats:
        s = ffi.new("struct sp_lazy_stats *")
        lib.sp_lazy_get_stats(self.handle, s)
        return LazyStats(
            faults=s.faults, fault_pages=s.fault_pages, fault_eexist=s.fault_eexist,
            prefetch_pages=s.prefetch_pages, prefetch_eexist=s.prefetch_eexist, other_events=s.other_events,
            service_ns_total=s.service_ns_total, service_ns_max=s.service_ns_max,
            first_fault_ns=s.first_fault_ns, last_fault_ns=s.last_fault_ns, hist_us=list(s.hist_us),
            handler_cpus={i: int(n) for i, n in enumerate(s.handler_cpu) if n}, handler_err=s.handler_err,
            handler_alive=bool(s.handler_alive), end=LazyEnd(s.end), fenced_pages=s.fenced_pages,
            fence_ns=s.fence_ns, fence_err=s.fence_err, fenced_whole=bool(s.fenced_whole),
            features_requested=self.features_requested, features_supported=self.features_supported,
        )

    def close(self) -> None:
        if self._l is None:
            return
        engine, self._l = self._l, None
        # Released first (stop, fence what is missing, unregister), so the count of fenced pages is known
        # before the engine goes: the memory keeps them PROT_NONE and its guard must go on refusing them.
        lib.sp_lazy_release(engine, int(5e9))
        s = ffi.new("struct sp_lazy_stats *")
        lib.sp_lazy_get_stats(engine, s)
        self._closed_fenced = self.npages if s.fenced_whole else int(s.fenced_pages)
        lib.sp_lazy_destroy(engine)

    def __enter__(self) -> LazyUffd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _errno_text(err: int) -> str:
    return f"errno {err} {errno.errorcode.get(err, '?')}: {os.strerror(err)}"


# -- the three loaders ----------------------------------------------------------------------------


class RestoredMemory:
    """Guest memory restored from a snapshot file by one loader. ``memory`` is the GuestMemory a
    memslot points at; ``lazy`` is the lazy loader's engine (None for the others)."""

    def __init__(self, image: SnapshotImage, loader: str, memory: GuestMemory, lazy: LazyUffd | None,
                 load_ns: int) -> None:
        self.image = image
        self.loader = loader
        self.memory = memory
        self.lazy = lazy
        self.load_ns = load_ns

    def zero_filled_pages(self) -> list[int]:
        """Memory offsets of the pages mapped here whose bytes did not come from the file where it holds data.

        What a guest that ran on a page no loader restored would have seen: a userfaultfd closed under a lazy
        loader lets the kernel fill the faulting page with zeros. For the lazy loader the answer is exact:
        pages mapped (/proc/self/pagemap) that it never installed, though the file holds data there. The
        other loaders put every page there from the file by construction; for them a page mapped here that
        reads all zeros where the file holds data counts (snapproof's guests never clear a whole page). Only
        mapped pages are read, so the check itself faults nothing in.
        """
        npages = self.memory.size // PAGE_SIZE
        mapped, _ = read_pagemap(self.memory.addr, npages)
        installed = self.lazy.page_states() if self.lazy is not None else None
        zero = bytes(PAGE_SIZE)
        found = []
        with open(self.image.path, "rb") as f, \
                mmap.mmap(f.fileno(), self.image.memory_size, prot=mmap.PROT_READ,
                          offset=self.image.memory_offset) as file_image:
            for page in range(npages):
                at = page * PAGE_SIZE
                if not mapped[page] or file_image[at:at + PAGE_SIZE] == zero:
                    continue
                if installed is not None:
                    if installed[page] != lib.SP_LAZY_PRESENT:
                        found.append(at)
                elif self.memory.read(at, PAGE_SIZE) == zero:
                    found.append(at)
        return found

    def close(self) -> None:
        # The handler goes before the mapping it fills.
        if self.lazy is not None:
            self.lazy.close()
        self.memory.close()

    def __enter__(self) -> RestoredMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RestoredMemory({self.loader}, {self.memory!r}, from {self.image.path!r})"


def _read_copy(image: SnapshotImage, memory: GuestMemory, progress: Callable[[int], None] | None = None) -> None:
    """read(2) the memory image into ``memory``: the kernel copies it, first-touching each page; ``progress`` is
    told the bytes read after each read."""
    fd = os.open(image.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with memoryview(memory.mm) as view:
            done = 0
            while done < image.memory_size:
                with view[done:done + _READ_CHUNK] as part:
                    n = os.preadv(fd, [part], image.memory_offset + done)
                if n <= 0:
                    raise SnapshotFormatError("memory_size", f"{image.memory_size:#x} bytes of memory image",
                                              f"the file end {done:#x} bytes in (file shrank after open)",
                                              image.path, prefix="snapshot file truncated")
                done += n
                if progress is not None:
                    progress(n)
    finally:
        os.close(fd)


def restore_memory(image: SnapshotImage, loader: str, *, lazy_backing: str = "memfd", thp: bool = False,
                   handler_cpu: int | None = None, inject: FaultInjection = FaultInjection.NONE,
                   progress: Callable[[int], None] | None = None) -> RestoredMemory:
    """Fresh guest memory holding ``image``'s memory, by ``loader`` (one of ``LOADERS``). ``inject``: the
    lazy loader's switches (LAZY_UFFD_*) act there; ``progress`` is told the bytes read-copy has read.

    ``thp``: the destination backed by transparent huge pages (memfd or anonymous, ``GuestMemory(thp=True)``);
    for map-private the file mapping is marked MADV_HUGEPAGE, and the kernel maps the page cache's huge
    folios where it can (6.18 on ext4 does; what it did is ``memory.huge_bytes()``)."""
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r} (known: {', '.join(LOADERS)})")
    t0 = time.perf_counter_ns()
    size = image.memory_size
    lazy: LazyUffd | None = None
    if loader == "map-private":
        memory = GuestMemory.file_private(image.path, offset=image.memory_offset, size=size)
        if thp:
            memory.allow_thp()
            memory.thp = True
    else:
        memory = GuestMemory.memfd(size, name="snapproof-restore", thp=thp) if loader == "read-copy" or \
            lazy_backing == "memfd" else GuestMemory.anonymous(size, thp=thp)
        try:
            if loader == "read-copy":
                _read_copy(image, memory, progress)
            else:
                lazy = LazyUffd(memory, image.path, image.memory_offset, handler_cpu=handler_cpu, inject=inject)
        except BaseException:
            memory.close()
            raise
    return RestoredMemory(image, loader, memory, lazy, time.perf_counter_ns() - t0)


# -- a fresh VM over restored memory --------------------------------------------------------------


@dataclass
class RestoredVm:
    """A fresh VM over restored memory, its vCPUs loaded with the file's states (or reset). Times in ns."""

    restored: RestoredMemory
    vm: Vm
    vcpus: list[Vcpu]
    from_saved_state: bool
    applied_parts: list[tuple[VcpuPart, ...]]  # per vCPU: the state parts written, in the order written
    open_ns: int    # the header read and checked (plus the content hash when verified)
    load_ns: int    # the loader
    vm_ns: int      # KVM_CREATE_VM + memslots
    state_ns: int   # vCPUs created and their states loaded (or reset)

    @property
    def ready_ns(self) -> int:
        """From the start of the restore until the vCPUs could enter the guest."""
        return self.open_ns + self.load_ns + self.vm_ns + self.state_ns

    @property
    def memory(self) -> GuestMemory:
        return self.restored.memory

    @property
    def lazy(self) -> LazyUffd | None:
        return self.restored.lazy

    @property
    def image(self) -> SnapshotImage:
        return self.restored.image

    @property
    def vcpu(self) -> Vcpu:
        return self.vcpus[0]

    def close(self) -> None:
        self.vm.close()
        self.restored.close()

    def __enter__(self) -> RestoredVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def restore_vm(image: SnapshotImage | str | os.PathLike[str], loader: str, *, verify: bool = True,
               reset: Callable[[Vcpu], None] | None = None, inject: FaultInjection = FaultInjection.NONE,
               **loader_kw: object) -> RestoredVm:
    """A fresh VM restored from a snapshot file: memory by ``loader``, one vCPU per saved state.

    ``image`` is a path (opened here, the content hash checked when ``verify``) or an opened
    SnapshotImage. vCPU i is created with id i and loaded with state i (``Vcpu.load_state``: every
    part, in RESTORE_ORDER). A file without vCPU state gets one vCPU, set up by ``reset`` when given
    (a guest's entry point) and left in KVM's power-on state otherwise. ``inject``: the DROP_* switches
    skip a part of every state, SAME_VCPU_STATE gives every vCPU vCPU 0's state, the LAZY_UFFD_* ones
    act in the lazy loader (bugs to be caught).

    A lazy loader guards the VM's runs (``Vm.run_guard``): once it stops serving with pages missing,
    every run ends in ``LoaderDied`` naming why.
    """
    clock = time.perf_counter_ns
    t0 = clock()
    img = image if isinstance(image, SnapshotImage) else SnapshotImage.open(image, verify=verify)
    for i, kind in enumerate(img.vcpu_kinds):
        if kind != VcpuKind.KVM_X86:
            raise SnapshotFormatError(f"vcpu[{i}].kind", f"{int(VcpuKind.KVM_X86)} (kvm_x86) to restore on KVM",
                                      f"{kind} (written by a {img.hypervisor} host)", img.path,
                                      prefix="snapshot not restorable here")
    t1 = clock()
    restored = restore_memory(img, loader, inject=inject, **loader_kw)  # type: ignore[arg-type]
    vm: Vm | None = None
    try:
        t2 = clock()
        vm = Vm.create()
        vm.map_memory(restored.memory)
        if restored.lazy is not None:
            vm.run_guard = restored.lazy.check_run
        t3 = clock()
        vcpus, applied = [], []
        states = list(img.vcpu_states)
        if inject & FaultInjection.SAME_VCPU_STATE:
            states = states[:1] * len(states)
        skip = dropped_parts(inject)
        for state in states:
            vcpu = vm.add_vcpu()
            applied.append(vcpu.load_state(state, skip=skip))
            vcpus.append(vcpu)
        if not vcpus:
            vcpu = vm.add_vcpu()
            if reset is not None:
                reset(vcpu)
            vcpus.append(vcpu)
        t4 = clock()
    except BaseException:
        if vm is not None:
            vm.close()
        restored.close()
        raise
    return RestoredVm(restored, vm, vcpus, from_saved_state=bool(img.vcpu_states), applied_parts=applied,
                      open_ns=t1 - t0,
                      load_ns=t2 - t1, vm_ns=t3 - t2, state_ns=t4 - t3)
