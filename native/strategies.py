"""Snapshot strategies side by side, each in one place, all driven by one protocol.

A strategy takes one snapshot of a running guest's memory into a destination
buffer in three steps, so the pause window can be measured (and benchmarked)
on its own:

- ``prepare()``: work done while the guest runs, before the pause;
- ``pause_window(reference=None)``: kick every vCPU out of KVM_RUN, do what must
  happen while they are stopped, optionally copy all of memory into
  ``reference`` (the exact oracle; test mode only, not counted), resume;
- ``complete()``: work done after the resume; returns a ``StrategySnapshot``.

The strategies:

- ``stop-and-copy``: pause, copy everything, resume.
- ``wp-copy-before-write``: the engine under test (native.wp; the built-in one unless
  ``pytest --engine``): pause, arm WP,
  resume, bulk copy while the guest runs; a written page is copied first.
- ``wp-prearmed``: the same engine, its arm split in two (an engine offering "prearmed" snapshots):
  write-protect the whole region while the guest runs, where a write fault only makes the engine record
  its page and un-protect it; then rounds, as pre-copy's, each protecting again the pages written since the
  last, the guest running; the pause protects again just the pages written since the last round (the
  engine's own record, runs of contiguous pages in one call each), so it grows with the pages written, not
  with memory; from there as wp-copy-before-write.
- ``precopy-wp-async``: iterative pre-copy while the guest runs: register the
  region with UFFD_FEATURE_WP_ASYNC, protect it, copy everything, then in
  rounds get-and-clear the written pages with PAGEMAP_SCAN
  (PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC) and copy them; the pause
  copies what is still dirty.
- ``precopy-kvm-dirty-log``: the same rounds with KVM_GET_DIRTY_LOG on every
  memslot over guest memory (one below the 32-bit hole, one past it for a
  guest larger than the space below it), registered with KVM_MEM_LOG_DIRTY_PAGES.

Pre-copy stops iterating when a round finds at most ``stop_pages`` dirty pages
(default: 1/256 of memory), when a round no longer shrinks the dirty set below
3/4 of the previous one (the guest dirties as fast as we copy), or after
``max_rounds``. The pre-armed rounds stop by the same rule, with ``stop_pages``
1/4096 of memory by default (64 pages at 1 GiB): each page left for the pause
can cost it a UFFDIO_WRITEPROTECT call of its own where the writes are scattered
(about 1 us each on kvm_pvm), twice what copying a page costs pre-copy's pause.
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    raise ImportError("native.strategies drives KVM and userfaultfd: Linux only")

import time
from dataclasses import dataclass, field

from snapproof.native import uffd
from snapproof.native._lib import check, ffi, lib
from snapproof.native.engine import Engine
from snapproof.native.inject import FaultInjection
from snapproof.native.kvm import KVM_MEM_LOG_DIRTY_PAGES, Vm
from snapproof.native.live import VcpuRunner
from snapproof.native.memory import PAGE_SIZE, GuestMemory, buffer_address, copy_timed
from snapproof.native.uffd import require_features
from snapproof.native.wp import ENGINE_NEEDS, PrearmStats, WpSnapshot, WpStats

STOP_AND_COPY: str = "stop-and-copy"
WP_COPY_BEFORE_WRITE: str = "wp-copy-before-write"
PRECOPY_WP_ASYNC: str = "precopy-wp-async"
PRECOPY_KVM_DIRTY_LOG: str = "precopy-kvm-dirty-log"
WP_PREARMED: str = "wp-prearmed"
STRATEGIES: tuple[str, ...] = (STOP_AND_COPY, WP_COPY_BEFORE_WRITE, WP_PREARMED, PRECOPY_WP_ASYNC,
                               PRECOPY_KVM_DIRTY_LOG)
# The strategies the engine under test takes (``pytest --engine``); the others need no engine.
ENGINE_STRATEGIES: tuple[str, ...] = (WP_COPY_BEFORE_WRITE, WP_PREARMED)
PRECOPIES: tuple[str, ...] = (PRECOPY_WP_ASYNC, PRECOPY_KVM_DIRTY_LOG)
# What each strategy needs of the host (native.host capability names) on memfd guest memory, the one table of
# it: the plugin reads it at collection, for a ``strategy`` parameter, and deselects a case whose strategy
# needs what the host lacks, naming it (--strict-host fails it instead when the gate policy requires it);
# phase 5's comparison leaves such a strategy out of its table and says why. The WP engine's own needs are
# native.wp.ENGINE_NEEDS (it never needs WP_ASYNC).
STRATEGY_NEEDS: dict[str, tuple[str, ...]] = {
    STOP_AND_COPY: ("kvm",),
    WP_COPY_BEFORE_WRITE: ("kvm", *ENGINE_NEEDS),
    PRECOPY_WP_ASYNC: ("kvm", "uffd", "uffd.PAGEFAULT_FLAG_WP", "uffd.WP_HUGETLBFS_SHMEM", "uffd.WP_ASYNC",
                       "pagemap_scan"),
    PRECOPY_KVM_DIRTY_LOG: ("kvm",),
    WP_PREARMED: ("kvm", *ENGINE_NEEDS),
}
# What a strategy needs of the engine under test beyond ABI 1's required functions: an optional capability
# (native.engine.CAPABILITIES). A need of another kind than the host's: no host class requires it, so --strict-host
# never fails it; an engine without it has the strategy's cases deselected and the comparison leaves it out, each
# naming the engine and what it lacks.
STRATEGY_ENGINE_OFFERS: dict[str, tuple[str, ...]] = {WP_PREARMED: ("prearmed",)}


@dataclass(frozen=True)
class Round:
    """One pre-copy round: the dirty pages found and copied, and what finding and copying them took."""

    pages: int
    scan_ns: int   # PAGEMAP_SCAN walk(s) / KVM_GET_DIRTY_LOG
    copy_ns: int


@dataclass
class StrategySnapshot:
    """What one snapshot took. ``pause_ns`` spans kick -> resume, less the test-only reference copy;
    ``total_ns`` spans the first step of ``prepare`` to the end of ``complete``, less it too."""

    strategy: str
    size: int
    pause_ns: int = 0
    stop_ns: int = 0
    total_ns: int = 0
    bytes_copied: int = 0
    reference_ns: int = 0
    paused_pages: int = 0          # pages copied while the vCPUs were stopped
    rounds: list[Round] = field(default_factory=list)  # pre-copy: round 0 is the full copy
    vcpu_states: list[bytes] = field(default_factory=list)
    wp_stats: WpStats | None = None
    faults_at_instant: int = 0   # wp strategies: the engine's WP faults by the instant (wp-prearmed's pre-arm took
                                 # some); the copy starts once the running guest has taken one more
    prearm: PrearmStats | None = None  # wp-prearmed: what its pause protected again
    prearm_rounds: list[int] = field(default_factory=list)  # wp-prearmed: pages protected per pre-arm call, the
                                                             # whole region first

    @property
    def bytes_ratio(self) -> float:
        return self.bytes_copied / self.size

    @property
    def faults_after_instant(self) -> int | None:
        """wp strategies: the WP faults the running guest took after the instant (None for the others)."""
        return None if self.wp_stats is None else self.wp_stats.faults - self.faults_at_instant


class Snapshotter:
    """Base of the strategies: the pause protocol and the accounting; subclasses fill in three hooks."""

    name = ""

    def __init__(self, memory: GuestMemory, destination: object, runner: VcpuRunner) -> None:
        self.memory = memory
        self.runner = runner
        self._dst_handle, self.dst_addr = buffer_address(destination)
        if len(self._dst_handle) < memory.size:
            ffi.release(self._dst_handle)
            raise ValueError(f"snapshot destination is {len(self._dst_handle):#x} bytes, memory {memory.size:#x}")
        self.destination = destination
        self.result = StrategySnapshot(self.name, memory.size)
        self._t0 = 0
        self._closed = False

    # -- the three steps ---------------------------------------------------------------------------
    def prepare(self) -> None:
        self.result = StrategySnapshot(self.name, self.memory.size)
        self._t0 = time.perf_counter_ns()
        self._before_pause()

    def pause_window(self, reference: object | None = None, timeout: float = 10.0) -> int:
        r = self.result
        t0 = time.perf_counter_ns()
        r.stop_ns = self.runner.pause(timeout)
        try:
            r.vcpu_states = [v.save_state() for v in self.runner.vcpus]
            self._while_paused()
            if reference is not None:
                r.reference_ns = copy_timed(reference, self.memory)
        finally:
            self.runner.resume()
        r.pause_ns = time.perf_counter_ns() - t0 - r.reference_ns
        return r.pause_ns

    def complete(self) -> StrategySnapshot:
        self._after_resume()
        r = self.result
        r.total_ns = time.perf_counter_ns() - self._t0 - r.reference_ns
        return r

    def take(self, reference: object | None = None) -> StrategySnapshot:
        """prepare, pause_window, complete: one snapshot."""
        self.prepare()
        self.pause_window(reference)
        return self.complete()

    # -- hooks -------------------------------------------------------------------------------------
    def _before_pause(self) -> None:
        pass

    def _while_paused(self) -> None:
        raise NotImplementedError

    def _after_resume(self) -> None:
        pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            ffi.release(self._dst_handle)

    def __enter__(self) -> Snapshotter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StopAndCopy(Snapshotter):
    name = STOP_AND_COPY

    def _while_paused(self) -> None:
        copy_timed(self.destination, self.memory)
        self.result.paused_pages = self.memory.size // PAGE_SIZE
        self.result.bytes_copied = self.memory.size


# How long wp-copy-before-write's copy waits for the guest's first WP fault after the resume (a storm guest's comes
# within microseconds), and how often it looks.
FIRST_FAULT_WAIT_S = 2.0
FIRST_FAULT_POLL_S = 0.0002


class WpCopyBeforeWrite(Snapshotter):
    """A snapshot engine (native.wp) with the live protocol of native.live.take_live_snapshot, split in steps."""

    name = WP_COPY_BEFORE_WRITE

    def __init__(self, memory: GuestMemory, destination: object, runner: VcpuRunner,
                 inject: FaultInjection = FaultInjection.NONE, engine_lib: Engine | None = None) -> None:
        super().__init__(memory, destination, runner)
        self.inject = inject
        self.engine_lib = engine_lib
        self.engine: WpSnapshot | None = None

    def _before_pause(self) -> None:
        # A fresh engine (uffd, handler thread) per snapshot; creating it is not part of the pause.
        self.engine = WpSnapshot(self.memory, self.destination, engine=self.engine_lib, inject=self.inject)

    def _while_paused(self) -> None:
        engine = self.engine
        assert engine is not None
        self._arm(engine)
        self.result.faults_at_instant = engine.stats().faults

    def _arm(self, engine: WpSnapshot) -> None:
        engine.arm()

    def _after_resume(self) -> None:
        engine = self.engine
        assert engine is not None
        try:
            # The copy starts once the running guest has taken a WP fault after the instant (or after
            # FIRST_FAULT_WAIT_S): every snapshot then exercises copy-before-write, whatever CPU the guest got; on a
            # loaded host the copy could otherwise end before the guest's first write, and an engine without it pass.
            deadline = time.monotonic() + FIRST_FAULT_WAIT_S
            while engine.stats().faults == self.result.faults_at_instant and time.monotonic() < deadline:
                time.sleep(FIRST_FAULT_POLL_S)
            engine.bulk_copy()
            stats = engine.finalize()
        finally:
            engine.close()
            self.engine = None
        self.result.wp_stats = stats
        self.result.bytes_copied = (stats.bulk_pages + stats.fault_pages) * engine.page_size

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        super().close()


def rounds_done(pages: list[int], stop_pages: int, max_rounds: int) -> bool:
    """The rule that ends rounds (pre-copy's and the pre-arm's): the last found at most ``stop_pages``, or no longer
    shrank below 3/4 of the one before (the guest writes as fast as a round goes), or ``max_rounds`` were run
    after the first, whole one (``pages[0]``)."""
    return (len(pages) > max_rounds or (len(pages) > 1 and (pages[-1] <= stop_pages
                                                            or pages[-1] * 4 > pages[-2] * 3)))


class WpPrearmed(WpCopyBeforeWrite):
    """The engine's arm split around the pause: the pre-arm (the whole region protected) and its rounds while the
    guest runs, and at the instant only the pages written since the last round protected again. Bulk copy and
    finalize as wp-copy-before-write."""

    name = WP_PREARMED

    def __init__(self, memory: GuestMemory, destination: object, runner: VcpuRunner,
                 inject: FaultInjection = FaultInjection.NONE, engine_lib: Engine | None = None,
                 stop_pages: int | None = None, max_rounds: int = 16) -> None:
        super().__init__(memory, destination, runner, inject=inject, engine_lib=engine_lib)
        self.stop_pages = max(1, memory.size // PAGE_SIZE // 4096) if stop_pages is None else stop_pages
        self.max_rounds = max_rounds

    def _before_pause(self) -> None:
        super()._before_pause()
        engine = self.engine
        assert engine is not None
        rounds = self.result.prearm_rounds
        rounds.append(engine.prearm())
        while not rounds_done(rounds, self.stop_pages, self.max_rounds):
            rounds.append(engine.prearm())

    def _arm(self, engine: WpSnapshot) -> None:
        self.result.prearm = engine.arm_prearmed()


class _PreCopy(Snapshotter):
    """Iterative pre-copy: full copy, rounds of dirty pages while the guest runs, the rest while paused."""

    def __init__(self, memory: GuestMemory, destination: object, runner: VcpuRunner,
                 stop_pages: int | None = None, max_rounds: int = 16) -> None:
        super().__init__(memory, destination, runner)
        self.npages = memory.size // PAGE_SIZE
        self.stop_pages = max(1, self.npages // 256) if stop_pages is None else stop_pages
        self.max_rounds = max_rounds

    # subclass: start tracking (every page clean from here), and one get-and-clear + copy round
    def _start_tracking(self) -> None:
        raise NotImplementedError

    def _round(self) -> Round:
        raise NotImplementedError

    def _stop_tracking(self) -> None:
        pass

    def _before_pause(self) -> None:
        r = self.result
        self._start_tracking()
        # Round 0: everything. A page written from here on is dirty again and is copied in a later round.
        r.rounds.append(Round(self.npages, 0, copy_timed(self.destination, self.memory)))
        while not rounds_done([x.pages for x in r.rounds], self.stop_pages, self.max_rounds):
            r.rounds.append(self._round())

    def _while_paused(self) -> None:
        last = self._round()
        self.result.paused_pages = last.pages
        self.result.bytes_copied = (sum(x.pages for x in self.result.rounds) + last.pages) * PAGE_SIZE

    def _after_resume(self) -> None:
        self._stop_tracking()

    def close(self) -> None:
        self._stop_tracking()
        super().close()


class PreCopyWpAsync(_PreCopy):
    name = PRECOPY_WP_ASYNC

    def __init__(self, memory: GuestMemory, destination: object, runner: VcpuRunner, **kw: int | None) -> None:
        super().__init__(memory, destination, runner, **kw)  # type: ignore[arg-type]
        self._t: object | None = None

    def _start_tracking(self) -> None:
        need = uffd.mask_of("PAGEFAULT_FLAG_WP", "WP_ASYNC")
        if self.memory.backing in ("memfd", "hugetlb"):
            need |= uffd.FEATURES["WP_HUGETLBFS_SHMEM"]
        supported = require_features(need, f"pre-copy with uffd WP_ASYNC on {self.memory.backing} memory")
        # Holes (never-populated pages) must be tracked too: a guest write into one is a dirty page.
        need |= supported & uffd.FEATURES["WP_UNPOPULATED"]
        out = ffi.new("struct sp_wpasync **")
        sup = ffi.new("uint64_t *")
        check(lib.sp_wpasync_create(self.memory.addr, self.memory.size, need, out, sup),
              "uffd WP_ASYNC register", mem=self.memory.addr, size=self.memory.size, features=need)
        self._t = out[0]
        check(lib.sp_wpasync_protect_all(self._t), "UFFDIO_WRITEPROTECT (WP_ASYNC)")

    def _round(self) -> Round:
        scan, copy, regions = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
        pages = check(lib.sp_wpasync_collect(self._t, self.dst_addr, scan, copy, regions),
                      "PAGEMAP_SCAN get-and-clear written pages")
        return Round(int(pages), int(scan[0]), int(copy[0]))

    def _stop_tracking(self) -> None:
        if self._t is not None:
            lib.sp_wpasync_destroy(self._t)
            self._t = None


class PreCopyKvmDirtyLog(_PreCopy):
    """KVM's dirty log has one bitmap per memslot: each round reads every slot over guest memory and copies
    its dirty pages at the slot's own memory offset (slot 1 starts at native.layout.LOW_RAM_END)."""

    name = PRECOPY_KVM_DIRTY_LOG

    def __init__(self, memory: GuestMemory, destination: object, runner: VcpuRunner, vm: Vm,
                 **kw: int | None) -> None:
        super().__init__(memory, destination, runner, **kw)  # type: ignore[arg-type]
        self.vm = vm
        self.slots = vm.slots_of(memory)
        covered = sum(s.size for s in self.slots)
        unlogged = [s.slot for s in self.slots if not s.flags & KVM_MEM_LOG_DIRTY_PAGES]
        if covered != memory.size or unlogged:
            ffi.release(self._dst_handle)
            raise ValueError(f"pre-copy by KVM's dirty log needs every byte of guest memory ({memory.size:#x}) in "
                             f"memslots with KVM_MEM_LOG_DIRTY_PAGES: slots cover {covered:#x} bytes, "
                             f"slots {unlogged} do not log")

    def _start_tracking(self) -> None:
        for s in self.slots:
            self.vm.dirty_log(s.slot)  # get-and-clear: what was dirtied before now is in the full copy

    def _round(self) -> Round:
        t0 = lib.sp_now_ns()
        bitmaps = [self.vm.dirty_log(s.slot) for s in self.slots]
        t1 = lib.sp_now_ns()
        pages = 0
        for s, bitmap in zip(self.slots, bitmaps, strict=True):
            pages += lib.sp_copy_pages_bitmap(self.dst_addr + s.offset, self.memory.addr + s.offset,
                                              ffi.from_buffer("uint64_t[]", bitmap), s.npages)
        return Round(int(pages), int(t1 - t0), int(lib.sp_now_ns() - t1))


def make_snapshotter(strategy: str, memory: GuestMemory, destination: object, runner: VcpuRunner, vm: Vm,
                     inject: FaultInjection = FaultInjection.NONE, engine: Engine | None = None) -> Snapshotter:
    """The strategy by name (STRATEGIES); for the KVM dirty log, the VM's memslots over ``memory`` must log
    dirty pages (``Vm.map_memory(memory, flags=KVM_MEM_LOG_DIRTY_PAGES)``). ``engine`` takes the WP strategy's
    snapshots (the built-in one by default)."""
    if strategy == STOP_AND_COPY:
        return StopAndCopy(memory, destination, runner)
    if strategy == WP_COPY_BEFORE_WRITE:
        return WpCopyBeforeWrite(memory, destination, runner, inject=inject, engine_lib=engine)
    if strategy == WP_PREARMED:
        return WpPrearmed(memory, destination, runner, inject=inject, engine_lib=engine)
    if strategy == PRECOPY_WP_ASYNC:
        return PreCopyWpAsync(memory, destination, runner)
    if strategy == PRECOPY_KVM_DIRTY_LOG:
        return PreCopyKvmDirtyLog(memory, destination, runner, vm)
    raise ValueError(f"unknown snapshot strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
