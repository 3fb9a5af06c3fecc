"""Hypervisor-level copy-on-write load on KVM: the snapshot mapped read-only into the guest, each page
the guest writes copied into private memory at its first write and mapped writable in its place.

Why (ORIGINS.md, hyperlight): the OS-level load maps the file private and writable (MAP_PRIVATE here,
PAGE_WRITECOPY on Windows), and the kernel charges commit for the whole mapping, per VM, whether the
guest writes it or not: Linux accounts a private writable mapping in Committed_AS at mmap, as Windows
charges a WRITECOPY view. Here nothing writable maps the file:

- The file is mapped PROT_READ, MAP_SHARED (``GuestMemory.file_readonly``): page cache shared by every
  VM of the file and charged to none. KVM maps it through KVM_MEM_READONLY slots
  (KVM_CAP_READONLY_MEM), so KVM itself refuses a guest write to it and exits with KVM_EXIT_MMIO, on
  every KVM, emulating or not, naming the GPA, the length and the bytes stored.
- Private pages live in one memfd the size of guest memory (the overlay), MAP_SHARED. A page is put in
  it at its first write only (pwrite of the file's page), so a VM pays memory and commit per page
  written: memfd_create's shmem is VM_NORESERVE, charged a page at a time as pages are allocated, and
  pwrite reports a refused charge as ENOSPC where a store into the mapping would take SIGBUS.
  Anonymous MAP_PRIVATE memory would be charged whole at mmap, the cost this load exists to avoid;
  MAP_NORESERVE would hide its pages from Committed_AS altogether (and is ignored under
  vm.overcommit_memory=2).
- A write exit is served on the vCPU's thread (``Vm.mmio_write_handler``): copy the page from the file
  view into the overlay, change the memslots so that the page's GPA is the overlay's page, writable,
  then apply the MMIO data to it. KVM completed the instruction as an MMIO write (RIP is past the
  store), so those bytes exist nowhere else; the next KVM_RUN resumes the guest after the store, and
  its later writes to the page go straight to memory with no exit.

The memslot layout (``SlotLayout``): KVM slots cannot overlap, and a slot's size and host address
cannot change (KVM_SET_USER_MEMORY_REGION refuses with EINVAL), so a private page inside a read-only
slot means deleting that slot and adding the pieces around the page. Guest memory is kept as
alternating segments, read-only gaps over the file view and writable runs over the overlay; a page next
to a run joins it, so a working set of k separate runs needs 2k + 1 slots whatever its size, and a
first write costs at most 4 ioctls (delete the gap holding the page and the run it extends, add the
grown run and what is left of the gap). A slot per written page (3 ioctls, no merging) was the
alternative: it spends 2 slots per page written, so KVM_CAP_NR_MEMSLOTS (32764 on 6.1 and 6.18 x86, 509
on x86 kernels until 2021) caps a VM at 16k written pages or far fewer; merging keeps a contiguous
working set at a handful of slots. When slots run out all the same, the load refuses with
``MemslotsExhausted``, naming KVM_CAP_NR_MEMSLOTS, before it touches a slot.

One vCPU: KVM cannot replace a memslot atomically, so between deleting a slot and adding its pieces
that range has no memory, and a vCPU inside KVM_RUN then would take a spurious MMIO exit. The vCPU whose
exit is served is out of KVM_RUN; serving refuses a VM with more than one.

Guest RAM is one range at ``gpa`` (0 by default) in slots from ``first_slot``: a layout with RAM split
around the 32-bit hole takes one HypervisorCowMemory per range, each with its own slot range.
Linux only (KVM).
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    raise ImportError("native.hv_cow is the KVM half of the hypervisor-level copy-on-write load: Linux only")

import bisect
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from snapproof.native.errors import CapabilityMissing
from snapproof.native.inject import FaultInjection
from snapproof.native.kvm import KVM_CAP_NR_MEMSLOTS, KVM_CAP_READONLY_MEM, KVM_MEM_READONLY, Exit, Vm
from snapproof.native.memory import PAGE_SIZE, GuestMemory


class MemslotsExhausted(RuntimeError):
    """A page cannot be made private: the layout would need more memslots than KVM offers."""


@dataclass(frozen=True)
class Segment:
    """Pages [first, end) of guest memory in one memslot: a read-only gap over the file view, or a
    writable run over the private overlay."""

    first: int
    end: int
    writable: bool
    slot: int

    @property
    def npages(self) -> int:
        return self.end - self.first


@dataclass(frozen=True)
class LayoutChange:
    """What making one page private does to the slots: delete these, then add these (ids may be reused)."""

    page: int
    deleted: tuple[Segment, ...]
    added: tuple[Segment, ...]
    at: int  # index of the first deleted segment in the layout

    @property
    def ioctls(self) -> int:
        return len(self.deleted) + len(self.added)


class SlotLayout:
    """The memslots of guest memory under the hypervisor-level COW load, as alternating segments: read-only
    gaps and writable runs, neighbours merged. Pure bookkeeping: ``plan_private`` says which slots change
    (refusing with MemslotsExhausted when they would not fit), ``apply`` records it once KVM took it."""

    def __init__(self, npages: int, first_slot: int = 0) -> None:
        if npages <= 0:
            raise ValueError(f"a slot layout needs at least one page, got {npages}")
        self.npages = npages
        self.first_slot = first_slot
        self.capacity: int | None = None  # slots KVM offers from first_slot; None until a VM says
        self.capacity_source = ""
        self._segments = [Segment(0, npages, False, first_slot)]
        self._firsts = [0]
        self._free: list[int] = []        # ids below the highest in use that are free, lowest first
        self._next = first_slot + 1       # the lowest id never used
        self.peak = 1

    @property
    def segments(self) -> tuple[Segment, ...]:
        return tuple(self._segments)

    @property
    def slots(self) -> int:
        return len(self._segments)

    def runs(self) -> list[Segment]:
        return [s for s in self._segments if s.writable]

    def private_pages(self) -> int:
        return sum(s.npages for s in self._segments if s.writable)

    def segment_at(self, page: int) -> Segment:
        return self._segments[self._index(page)]

    def is_private(self, page: int) -> bool:
        return self.segment_at(page).writable

    def _index(self, page: int) -> int:
        if not 0 <= page < self.npages:
            raise ValueError(f"page {page:#x} outside guest memory of {self.npages:#x} pages")
        return bisect.bisect_right(self._firsts, page) - 1

    def set_capacity(self, capacity: int, source: str) -> None:
        """How many slots KVM offers from ``first_slot`` on (``source`` says how that is known)."""
        if self.slots > capacity:
            raise MemslotsExhausted(f"the layout already holds {self.slots} memslots, more than the {capacity} "
                                    f"{source} offers")
        self.capacity, self.capacity_source = capacity, source

    def plan_private(self, page: int) -> LayoutChange:
        """The slot change that makes ``page`` private: the read-only gap holding it splits around it, and
        the page joins a run it touches on either side. Nothing changes here until ``apply``."""
        i = self._index(page)
        gap = self._segments[i]
        if gap.writable:
            return LayoutChange(page, (), (), i)
        # Segments alternate, so a gap's neighbours are runs: the page joins the one it touches.
        left = self._segments[i - 1] if page == gap.first and i > 0 else None
        right = self._segments[i + 1] if page == gap.end - 1 and i + 1 < len(self._segments) else None
        deleted = tuple(s for s in (left, gap, right) if s is not None)
        pieces = []
        if page > gap.first:
            pieces.append((gap.first, page, False))
        pieces.append((left.first if left else page, right.end if right else page + 1, True))
        if page + 1 < gap.end:
            pieces.append((page + 1, gap.end, False))
        after = self.slots - len(deleted) + len(pieces)
        if self.capacity is not None and after > self.capacity:
            raise MemslotsExhausted(
                f"page {page:#x} cannot be made private: the layout would need {after} memslots "
                f"({len(self.runs())} separate private runs so far, read-only gaps between them), but KVM "
                f"offers {self.capacity} ({self.capacity_source}); a guest writing this scattered needs larger "
                "runs (copy more than the page written) or another load")
        ids = self._take_ids(len(pieces), [s.slot for s in deleted])
        added = tuple(Segment(a, b, w, slot) for (a, b, w), slot in zip(pieces, ids, strict=True))
        return LayoutChange(page, deleted, added, i - (1 if left else 0))

    def _take_ids(self, n: int, freed: list[int]) -> list[int]:
        """The lowest free slot ids, counting those this change frees: below capacity whenever the count fits."""
        pool = sorted(self._free + freed)
        fresh = self._next
        while len(pool) < n:
            pool.append(fresh)
            fresh += 1
        return pool[:n]

    def apply(self, change: LayoutChange) -> None:
        """Record a planned change that KVM has taken."""
        if not change.deleted:
            return
        used = {s.slot for s in change.added}
        freed = [s.slot for s in change.deleted]
        self._next = max([self._next, *(slot + 1 for slot in used)])
        self._free = sorted(set(self._free + freed) - used)
        self._segments[change.at:change.at + len(change.deleted)] = list(change.added)
        self._firsts = [s.first for s in self._segments]
        self.peak = max(self.peak, self.slots)

    def check(self) -> None:
        """The layout's invariants: contiguous cover of guest memory, gaps and runs alternating, ids distinct."""
        segs = self._segments
        assert segs[0].first == 0 and segs[-1].end == self.npages, f"segments do not cover the memory: {segs}"
        for a, b in zip(segs, segs[1:], strict=False):
            assert a.end == b.first, f"segments not contiguous: {a} then {b}"
            assert a.writable != b.writable, f"neighbours not merged: {a} then {b}"
        ids = [s.slot for s in segs]
        assert len(set(ids)) == len(ids), f"a slot id used twice: {ids}"


@dataclass
class HvCowStats:
    """What the load did, for the report: exits and slot changes per page made private."""

    write_exits: int = 0             # KVM_EXIT_MMIO writes served
    exits_on_private_pages: int = 0  # of those, on a page already private (the rest of a store KVM split up)
    guest_pages: int = 0             # pages made private by a guest write
    host_pages: int = 0              # pages made private by a host write (``write``)
    slot_ioctls: int = 0             # KVM_SET_USER_MEMORY_REGION calls after the attach (deletes and adds)
    pages_after_attach: int = 0      # pages made private with the VM attached (each changed slots)
    slots: int = 1                   # memslots in use now
    slots_peak: int = 1
    capacity: int | None = None      # memslots KVM offers this load (KVM_CAP_NR_MEMSLOTS less first_slot)
    service_ns: list[int] = field(default_factory=list)      # per served exit: exit read -> data applied
    slot_change_ns: list[int] = field(default_factory=list)  # per page made private after attach: its ioctls

    @property
    def exits_per_written_page(self) -> float:
        return self.write_exits / self.guest_pages if self.guest_pages else 0.0

    @property
    def slot_ioctls_per_page(self) -> float:
        return self.slot_ioctls / self.pages_after_attach if self.pages_after_attach else 0.0

    def describe(self) -> str:
        svc, slots = sorted(self.service_ns), sorted(self.slot_change_ns)
        median = (f"; exit service median {svc[len(svc) // 2] / 1e3:.1f} µs, max {svc[-1] / 1e3:.1f} µs, of which "
                  f"the slot change median {slots[len(slots) // 2] / 1e3:.1f} µs") if svc and slots else ""
        return (f"{self.write_exits} write exits for {self.guest_pages} pages the guest made private "
                f"({self.exits_per_written_page:.2f} per page, {self.exits_on_private_pages} on a page already "
                f"private), {self.host_pages} made private by the host; {self.slot_ioctls} slot ioctls "
                f"({self.slot_ioctls_per_page:.2f} per page), {self.slots} memslots now, peak {self.slots_peak}"
                f"{median}")


class HypervisorCowMemory:
    """Guest memory loaded copy-on-write by the hypervisor (see the module docstring). Reads and writes
    like GuestMemory (``read``, ``write``, ``snapshot_bytes``); ``attach(vm)`` puts it in the VM's slots
    and serves the VM's write exits. Close the VM first; ``close()`` is idempotent."""

    backing = "hypervisor-cow"

    def __init__(self, path: str | os.PathLike[str], offset: int, size: int, *,
                 inject: FaultInjection = FaultInjection.NONE, gpa: int = 0, first_slot: int = 0,
                 max_slots: int | None = None) -> None:
        self.view = GuestMemory.file_readonly(path, offset, size)
        try:
            self.overlay = GuestMemory.memfd(size, name="snapproof-hv-cow")
        except BaseException:
            self.view.close()
            raise
        self.path = Path(path)
        self.size = size
        self.gpa = gpa
        self.inject = inject
        self.max_slots = max_slots  # below KVM's own count: to meet MemslotsExhausted in a test
        self.layout = SlotLayout(size // PAGE_SIZE, first_slot)
        self.stats = HvCowStats()
        self.vm: Vm | None = None
        self.broken = ""  # why the slots no longer match the layout (an ioctl failed mid-change)

    # -- the VM side ----------------------------------------------------------------------------------
    def attach(self, vm: Vm) -> None:
        """Register the layout's slots in ``vm`` (read-only gaps over the file, runs made private so far by
        ``write``) and serve its write exits from now on."""
        if self.vm is not None:
            raise ValueError("hypervisor-level COW memory is attached to a VM already")
        readonly = vm.check_extension(KVM_CAP_READONLY_MEM)
        if not readonly:
            raise CapabilityMissing("KVM_CAP_READONLY_MEM = 0 (KVM_CHECK_EXTENSION on /dev/kvm): this KVM has no "
                                    "read-only memslots, so it cannot map the snapshot read-only into the guest")
        nr = vm.check_extension(KVM_CAP_NR_MEMSLOTS)
        capacity = nr - self.layout.first_slot
        source = f"KVM_CAP_NR_MEMSLOTS = {nr}, from slot {self.layout.first_slot}"
        if self.max_slots is not None and self.max_slots < capacity:
            capacity, source = self.max_slots, f"max_slots = {self.max_slots} of KVM_CAP_NR_MEMSLOTS = {nr}"
        self.layout.set_capacity(capacity, source)  # refuses a layout that ``write`` already grew past it
        self.stats.capacity = capacity
        for seg in self.layout.segments:
            self._set_slot(vm, seg)
        self.vm = vm
        vm.mmio_write_handler = self.serve

    def serve(self, ex: Exit) -> bool:
        """A KVM_EXIT_MMIO write: when it hit guest memory, make its page private and apply the stored bytes
        (True: the guest may go on); False for any other GPA (a device's MMIO, not ours)."""
        t0 = time.perf_counter_ns()
        off = ex.mmio_gpa - self.gpa
        if not (ex.mmio_is_write and 0 <= off < self.size):
            return False
        vm = self.vm
        if vm is None:
            raise ValueError("hypervisor-level COW memory serving an exit while attached to no VM")
        if len(vm.vcpus) > 1:
            raise RuntimeError(f"hypervisor-level COW serves one vCPU, this VM has {len(vm.vcpus)}: a slot change "
                               "leaves its range without memory between delete and add, and another vCPU in "
                               "KVM_RUN would take a spurious MMIO exit there")
        if off % PAGE_SIZE + ex.mmio_len > PAGE_SIZE or len(ex.mmio_data) != ex.mmio_len:
            raise RuntimeError(f"KVM_EXIT_MMIO write at GPA {ex.mmio_gpa:#x} of {ex.mmio_len} bytes with "
                               f"{len(ex.mmio_data)} bytes of data: KVM splits MMIO at pages, 8 bytes an exit")
        page = off // PAGE_SIZE
        if self.layout.is_private(page):
            self.stats.exits_on_private_pages += 1
        else:
            self._make_private(page, by_guest=True)
        if not self.inject & FaultInjection.HV_COW_DROPS_STORE:
            # KVM completed the store as MMIO: these bytes are the store; without them it is lost.
            self.overlay.write(off, ex.mmio_data)
        self.stats.write_exits += 1
        self.stats.service_ns.append(time.perf_counter_ns() - t0)
        return True

    def _make_private(self, page: int, by_guest: bool) -> None:
        if self.broken:
            raise RuntimeError(f"hypervisor-level COW memory is broken: {self.broken}")
        change = self.layout.plan_private(page)  # MemslotsExhausted here leaves everything as it was
        off = page * PAGE_SIZE
        fd = self.overlay.fd
        if fd is None:
            raise ValueError("hypervisor-level COW memory is closed")
        if self.inject & FaultInjection.HV_COW_NO_COPY:
            os.posix_fallocate(fd, off, PAGE_SIZE)  # a zero page where the file's should be
        else:
            n = os.pwrite(fd, self.view.mm[off:off + PAGE_SIZE], off)
            if n != PAGE_SIZE:
                raise OSError(f"pwrite of page {page:#x} into the private overlay wrote {n} of {PAGE_SIZE} bytes")
        if self.vm is not None:
            t0 = time.perf_counter_ns()
            try:
                for seg in change.deleted:
                    self._set_slot(self.vm, seg, delete=True)
                for seg in change.added:
                    self._set_slot(self.vm, seg)
            except BaseException as e:
                self.broken = f"a slot change for page {page:#x} failed half done ({e})"
                raise
            self.stats.slot_change_ns.append(time.perf_counter_ns() - t0)
            self.stats.slot_ioctls += change.ioctls
            self.stats.pages_after_attach += 1
        self.layout.apply(change)
        if by_guest:
            self.stats.guest_pages += 1
        else:
            self.stats.host_pages += 1
        self.stats.slots, self.stats.slots_peak = self.layout.slots, self.layout.peak

    def _set_slot(self, vm: Vm, seg: Segment, delete: bool = False) -> None:
        backing = self.overlay if seg.writable else self.view
        vm.set_memslot(seg.slot, self.gpa + seg.first * PAGE_SIZE, 0 if delete else seg.npages * PAGE_SIZE,
                       backing.addr + seg.first * PAGE_SIZE, 0 if seg.writable else KVM_MEM_READONLY)

    # -- the host side: GuestMemory's reads and writes ---------------------------------------------------
    def _bounds(self, gpa: int, n: int) -> None:
        if gpa < 0 or n < 0 or gpa + n > self.size:
            raise ValueError(f"guest range [{gpa:#x}, {gpa + n:#x}) outside memory of size {self.size:#x}")

    def read(self, gpa: int, n: int) -> bytes:
        """Guest memory as the guest sees it: private pages from the overlay, the rest from the file."""
        self._bounds(gpa, n)
        out = bytearray()
        while n:
            take = min(n, PAGE_SIZE - gpa % PAGE_SIZE)
            src = self.overlay if self.layout.is_private(gpa // PAGE_SIZE) else self.view
            out += src.mm[gpa:gpa + take]
            gpa, n = gpa + take, n - take
        return bytes(out)

    def byte(self, gpa: int) -> int:
        return self.read(gpa, 1)[0]

    def write(self, gpa: int, data: bytes) -> None:
        """A host write: each page it touches is made private first, as a guest write would make it. With
        a VM attached, only while no vCPU runs (the slot change needs them out of KVM_RUN)."""
        self._bounds(gpa, len(data))
        for page in range(gpa // PAGE_SIZE, (gpa + len(data) + PAGE_SIZE - 1) // PAGE_SIZE):
            if not self.layout.is_private(page):
                self._make_private(page, by_guest=False)
        self.overlay.write(gpa, data)

    def snapshot_bytes(self) -> bytes:
        image = bytearray(self.view.mm[:])
        for run in self.layout.runs():
            a, b = run.first * PAGE_SIZE, run.end * PAGE_SIZE
            image[a:b] = self.overlay.mm[a:b]
        return bytes(image)

    @property
    def writable(self) -> bool:
        return False  # nothing writable maps the file; the guest's writes go to the overlay

    # -- what it costs -------------------------------------------------------------------------------
    def private_pages(self) -> int:
        return self.layout.private_pages()

    def cow_bytes(self) -> int:
        """Memory this VM holds as its own (smaps): ``Private_Dirty`` of the overlay (the copied pages: no
        other process maps its memfd) plus ``Anonymous`` of the file view (none: it is never written)."""
        return self.overlay.private_dirty_bytes() + self.view.cow_bytes()

    def rss_bytes(self) -> int:
        return self.overlay.rss_bytes() + self.view.rss_bytes()

    def allocated_bytes(self) -> int:
        """The overlay memfd's pages (st_blocks), mapped in this process or not."""
        return self.overlay.allocated_bytes()

    def commit_bytes(self) -> int:
        """Committed_AS charged for this VM's memory: the overlay's allocated pages (the PROT_READ view of
        the file charges nothing), by ``GuestMemory.commit_bytes``."""
        return self.overlay.commit_bytes() + self.view.commit_bytes()

    def close(self) -> None:
        if self.vm is not None and self.vm.mmio_write_handler == self.serve:
            self.vm.mmio_write_handler = None
        self.vm = None
        self.overlay.close()
        self.view.close()

    def __enter__(self) -> HypervisorCowMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"HypervisorCowMemory({self.path}, size={self.size:#x}, {self.layout.private_pages()} private pages "
                f"in {self.layout.slots} memslots)")
