"""Thousands of snapshot cycles leak nothing: open fds, RSS and threads end where the first cycles left them.

One cycle: a memfd and a VM with marker16, WP armed with the engine writing straight into a
snapshot file (SnapshotImage writer), the guest's write caught, bulk copy, finalize, the file
sealed; then a fresh VM over a MAP_PRIVATE mapping of the file re-runs the guest; everything is
closed and the file deleted. 100 cycles by default, 1,000 with --long.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import guests
from native.image import MEMORY_OFFSET, SnapshotImage
from native.kvm import ExitReason, Vm
from native.memory import GuestMemory
from native.wp import WpSnapshot
from tests.reliability_support import Gauges, threads_settled

pytestmark = pytest.mark.needs("kvm", "uffd", "uffd.WP_HUGETLBFS_SHMEM")

MEM_SIZE = 1 << 20
RUN_TIMEOUT_S = 5.0
WARMUP_CYCLES = 10      # allocator arenas, caches and lazy imports settle in these
# RSS may wobble by allocator noise; a leak of one guest page per cycle would already exceed this at 100 cycles.
RSS_SLACK = 512 << 10


def snapshot_cycle(workdir: Path) -> None:
    """Create, arm, capture to file, restore, run, destroy: every resource closed before returning."""
    path = workdir / "cycle.snap"
    code = guests.load("marker16")
    try:
        with GuestMemory.memfd(MEM_SIZE) as mem, Vm.create() as vm:
            mem.write(guests.REAL_MODE_LOAD_GPA, code)
            mem.write(guests.MARKER_GPA, bytes([guests.MARKER_BEFORE]))
            vm.map_memory(mem)
            vcpu = vm.add_vcpu()
            vcpu.set_real_mode(ip=guests.REAL_MODE_LOAD_GPA)
            with SnapshotImage.create(path, MEM_SIZE) as writer:
                # The engine's pointer into writer.memory must be gone before the writer seals the file.
                with WpSnapshot(mem, writer.memory) as snap:
                    snap.arm()
                    ex = vcpu.run(timeout=RUN_TIMEOUT_S)
                    assert ex.reason is ExitReason.HLT, f"source guest: expected HLT, saw {ex.describe()}"
                    snap.bulk_copy()
                    stats = snap.finalize()
                    assert stats.fault_pages == 1, f"expected 1 page captured by fault, saw {stats.fault_pages}"
                writer.finalize()
        with GuestMemory.file_private(path, MEMORY_OFFSET, MEM_SIZE) as restored, Vm.create() as vm:
            seen = restored.byte(guests.MARKER_GPA)
            assert seen == guests.MARKER_BEFORE, (
                f"snapshot[0x1000]: expected {guests.MARKER_BEFORE:#04x}, saw {seen:#04x}")
            vm.map_memory(restored)
            vcpu = vm.add_vcpu()
            vcpu.set_real_mode(ip=guests.REAL_MODE_LOAD_GPA)
            ex = vcpu.run(timeout=RUN_TIMEOUT_S)
            assert ex.reason is ExitReason.HLT, f"restored guest: expected HLT, saw {ex.describe()}"
            seen = restored.byte(guests.MARKER_GPA)
            assert seen == guests.MARKER_AFTER, (
                f"restored mem[0x1000]: expected {guests.MARKER_AFTER:#04x}, saw {seen:#04x}")
    finally:
        path.unlink(missing_ok=True)


def run_cycles(workdir: Path, cycles: int, record_property) -> None:
    start = Gauges.now()
    t0 = time.perf_counter()
    for _ in range(WARMUP_CYCLES):
        snapshot_cycle(workdir)
    warm = Gauges.now()
    for _ in range(cycles - WARMUP_CYCLES):
        snapshot_cycle(workdir)
    per_cycle_ms = (time.perf_counter() - t0) * 1e3 / cycles
    end = Gauges.now()
    threads = threads_settled(start.threads)
    figures = (f"{cycles} cycles, {per_cycle_ms:.2f} ms each: fds {start.fds} -> {warm.fds} -> {end.fds}; "
               f"RSS {start.rss >> 10} -> {warm.rss >> 10} -> {end.rss >> 10} KiB; threads {start.threads} -> "
               f"{threads} (Python {start.python_threads} -> {end.python_threads}); uffds {end.uffds}")
    print(figures)
    record_property("figures", figures)
    record_property("ms_per_cycle", round(per_cycle_ms, 3))
    assert end.fds == warm.fds, f"open fds: expected {warm.fds} (after {WARMUP_CYCLES} cycles), saw {end.fds}"
    assert end.uffds == 0, f"userfaultfds open after {cycles} cycles: {end.uffds}"
    assert end.rss - warm.rss <= RSS_SLACK, (
        f"VmRSS grew {(end.rss - warm.rss) >> 10} KiB over cycles {WARMUP_CYCLES + 1}..{cycles} "
        f"({warm.rss >> 10} -> {end.rss >> 10} KiB), at most {RSS_SLACK >> 10} KiB expected")
    assert threads == start.threads, f"threads (kernel count): expected {start.threads} as at the start, saw {threads}"
    assert end.python_threads == start.python_threads, (
        f"Python threads: expected {start.python_threads}, saw {end.python_threads}")


def test_snapshot_cycles_leak_no_fds_memory_or_threads(tmp_path, record_property):
    """100 capture/restore cycles: fds and RSS end as after the first cycles, threads as at the start."""
    run_cycles(tmp_path, 100, record_property)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_thousand_snapshot_cycles_leak_no_fds_memory_or_threads(tmp_path, record_property):
    """1,000 cycles (--long): the same gauges, ten times the chance for a slow leak to show."""
    run_cycles(tmp_path, 1000, record_property)
