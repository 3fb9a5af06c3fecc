"""Phase 2 — a live snapshot equals guest memory at the arm instant, while the guest keeps writing.

The original proofs copied memory of a guest that was not running. Here every
vCPU runs storm32 (a write storm stamping (generation, page) into the first and
last 8 bytes of each page) throughout: the engine pauses the vCPUs, arms WP,
resumes them, bulk-copies while they write, and copies any page they write
first. Two oracles judge the snapshot:

- exact: a reference copy taken during the pause (test mode only) equals it byte for byte;
- instant: knowing each vCPU's write order, every page's stamps are what the region held at
  one single point of that vCPU's write stream, with no torn page but the one in flight.

On memory backed by transparent huge pages (anonymous THP, shmem THP) the same holds while the huge
pages are split (each WP fault un-protects 4 KiB of a huge mapping) and collapsed (a host thread asks
for MADV_COLLAPSE over the whole mapping throughout the snapshot, as khugepaged would).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

import guests
from guests import storm
from native.compare import describe_difference, differing_pages, exact_oracle
from native.kvm import ExitReason
from native.live import VcpuRunner, take_live_snapshot
from native.memory import PAGE_SIZE
from native.points import SlowPoints
from native.races import FIRST_WRITE, SECOND_WRITE, WRITE_OFFSET, GuestWrite, Lineup, Window
from native.thp import PMD_SIZE, CollapseLoop
from native.wp import ENGINE_NEEDS
from results.record import LIMIT_SLACK, fmt_bytes
from results.stats import median

pytestmark = [pytest.mark.phase(2, "live snapshot consistency"), pytest.mark.needs("kvm", *ENGINE_NEEDS)]

GUEST_TIMEOUT_S = 60.0
# Rounds of the bulk-copy benchmark: the gate's rank test needs more than 5 a side to tell a shift at p < 0.01.
BULK_COPY_ROUNDS = 10


def _gbps(nbytes: int, ns: float) -> float:
    return nbytes / ns if ns else 0.0


def every_vcpu_swept_once(storm_vm) -> bool:
    return all(storm_vm.progress(i).done_gen >= 1 for i in range(len(storm_vm.params)))


def live_snapshot_procedure(report, storm_vm, make_memory, make_wp, inject, host_limits, at_marks: bool = False,
                            alongside: Callable[[], Any] = contextlib.nullcontext):
    """The phase's procedure, shared by every backing and size: run, snapshot live, stop, judge.

    ``alongside()`` is a context manager held around the live snapshot (the THP cases' collapser).

    With ``at_marks`` each vCPU first runs in this thread to its mark (a sync the guest writes a chosen
    number of pages into its first sweep, make_storm_vm's ``mark``); the runner then holds it parked, so
    the snapshot pins exactly that point at any guest speed. Otherwise the runner runs the guest freely
    until every vCPU completed its first sweep, and the live protocol's kick lands wherever the guest is
    then: any instant will do, the oracles pin whichever it was.
    """
    mem = storm_vm.memory
    size = mem.size
    nvcpus = len(storm_vm.params)

    with report.stage("storm guest running") as st:
        snapshot = make_memory("anonymous", size)
        reference = make_memory("anonymous", size)
        snapshot.populate()  # destinations warm: the copy rate is not a first-touch figure
        reference.populate()
        snap = make_wp(mem, snapshot.mm)
        if at_marks:
            for i, (p, ex) in enumerate(zip(storm_vm.params, storm_vm.run_to_marks(GUEST_TIMEOUT_S), strict=True)):
                st.check(ex.reason is ExitReason.SYNC and ex.last_sync == p.mark_sync,
                         f"vCPU {i} stopped at its mark, {p.mark_pages} of {p.npages} pages into its first sweep",
                         f"vCPU {i}: expected its mark sync {p.mark_sync:#x}, saw {ex.describe()} "
                         f"(sync {ex.last_sync:#x})")
            runner = VcpuRunner(storm_vm.vm.vcpus, timeout=GUEST_TIMEOUT_S).start(paused=True)
            started = "every vCPU parked at its mark, to be resumed by the live protocol after the arm"
        else:
            runner = VcpuRunner(storm_vm.vm.vcpus, timeout=GUEST_TIMEOUT_S).start()
            started = "every vCPU completed its first sweep"
            storm_vm.wait(lambda: every_vcpu_swept_once(storm_vm), started, timeout=GUEST_TIMEOUT_S)
        st.check(not runner.finished, f"{nvcpus} storm vCPU(s) over {fmt_bytes(size)} {mem.backing}: {started}",
                 f"a vCPU stopped early: {runner.exits}")

    with report.stage("live snapshot") as st:
        try:
            # The copy starts once the resumed guest has taken two WP faults a vCPU (the first may be the page
            # it was paused in): copy and guest writes overlap at any size.
            with alongside():
                live = take_live_snapshot(runner, snap, reference=reference.mm, overlap_faults=2 * nvcpus)
        finally:
            exits = runner.stop()
        stats = live.stats
        st.check(stats.handler_err == 0, "the fault handler ran throughout",
                 f"the fault handler stopped with errno {stats.handler_err}")
        st.check(stats.bulk_pages + stats.fault_pages == snap.npages,
                 f"{snap.npages} pages captured: {stats.bulk_pages} by bulk copy, {stats.fault_pages} by fault",
                 f"{stats.bulk_pages} bulk + {stats.fault_pages} by fault != {snap.npages} pages")
        memcpy = host_limits["memcpy_bytes_per_s"]
        rate = _gbps(size, live.bulk_ns) * 1e9
        if live.paused:
            st.timing("pause window", live.pause_ns, f"{live.pause_ns / max(live.arm_ns, 1):.2f}x the arm; "
                      f"kick->stopped {live.stop_ns / 1e3:.0f} µs")
        st.timing("arm", live.arm_ns)
        st.timing("bulk copy", live.bulk_ns, f"{rate / 1e9:.2f} GB/s = {rate / memcpy:.2f}x warm memcpy "
                  f"({memcpy / 1e9:.1f} GB/s), guest running; populated destination")
        st.timing("finalize", live.finalize_ns, "un-protect the region + join the handler")
        if stats.faults:
            st.timing("fault service p50", stats.service_percentile_us(0.5) * 1000)
        cpus = ", ".join(f"CPU {c}: {n}" for c, n in sorted(stats.handler_cpus.items())) or "no faults"
        st.note(f"faults served on {cpus}")
        report.fact("pages_by_fault", stats.fault_pages)
        report.fact("pages_by_bulk_copy", stats.bulk_pages)
        report.fact("pause_ns", live.pause_ns)
        report.fact("copy_rate_ratio_to_memcpy", round(rate / memcpy, 3))
        report.fact("copy_rate_bytes_per_s", round(rate))
        report.fact("mem_size", size)
        if stats.faults:
            report.fact("fault_service_hist_us", {us: n for us, n in enumerate(stats.hist_us) if n})

    with report.stage("the guest kept writing") as st:
        for i, ex in sorted(exits.items()):
            st.check(ex.reason is ExitReason.KICKED, f"vCPU {i} was still running when stopped",
                     f"vCPU {i} ended with {ex.describe()} before it was stopped")
        changed = differing_pages(mem.mm, reference.mm)
        st.check(len(changed) > 0, f"{len(changed)} pages changed after the arm instant",
                 "no page changed after the arm: the guest wrote nothing during the snapshot, nothing was proved")

    with report.stage("instant oracle") as st:
        for i, p in enumerate(storm_vm.params):
            # The instant the vCPU was paused at, read off the state saved in the pause (none when the arm did not
            # pause): a snapshot of one instant, but not that one, is stale.
            at = storm.instant_of_vcpu_state(p, live.vcpu_states[i]) if live.vcpu_states else None
            # Read in place: a copy of the region would be one more guest-sized buffer (3 GiB with --sizes 4G).
            with storm_vm.region_view(snapshot.mm, i) as region:
                verdict = storm.check_instant(p, region, at=at)
            pinned = "" if at is None else ", the instant its registers were paused at"
            st.check(bool(verdict), f"vCPU {i}: {verdict.message}{pinned}", f"vCPU {i}: {verdict.message}")
    with report.stage("exact oracle") as st:
        exact = exact_oracle(snapshot.mm, reference.mm, "memory at the arm instant")
        st.check(bool(exact), f"snapshot {exact.message} (the reference copied during the pause)", exact.message)

    return live, snapshot, reference


@pytest.mark.sizes(1 << 20, 64 << 20, 256 << 20)
@pytest.mark.parametrize("vcpus", [1, 2], ids=["1vcpu", "2vcpus"])
def test_live_snapshot_of_memfd_is_memory_at_the_arm_instant(report, make_storm_vm, make_memory, make_wp, inject,
                                                              host_limits, mem_size, vcpus):
    """With vCPUs writing throughout, the memfd snapshot is exactly guest memory at the arm instant."""
    storm_vm = make_storm_vm("memfd", mem_size, vcpus)
    # The snapshot waits for the first sweep anyway; populated memory makes it a steady-rate sweep, not a
    # first-touch one (4 GiB: 10 s instead of 30 s on a software KVM). First touch has its own case below.
    storm_vm.memory.populate()
    live_snapshot_procedure(report, storm_vm, make_memory, make_wp, inject, host_limits)


@pytest.mark.parametrize(("backing", "mem_size"), [("anonymous", 64 << 20), ("hugetlb", 16 << 20)],
                         ids=["anonymous-64MiB", "hugetlb-16MiB"])
def test_live_snapshot_of_other_backings_is_memory_at_the_arm_instant(report, make_storm_vm, make_memory, make_wp,
                                                                       inject, host_limits, backing, mem_size):
    """Anonymous and hugetlb guest memory snapshot as consistently as memfd (hugetlb WP is 2 MiB granular)."""
    storm_vm = make_storm_vm(backing, mem_size, 2)
    live_snapshot_procedure(report, storm_vm, make_memory, make_wp, inject, host_limits)


@pytest.mark.parametrize("backing", ["anonymous-thp", "memfd-thp"])
def test_live_snapshot_of_thp_memory_is_memory_at_the_arm_instant_while_huge_pages_split_and_collapse(
        report, make_storm_vm, make_memory, make_wp, inject, host_limits, backing):
    """On huge pages, split by the guest's WP faults and collapsed by a host thread throughout, the live snapshot is
    still exactly guest memory at the arm instant."""
    storm_vm = make_storm_vm(backing, 16 << 20, 2)
    mem = storm_vm.memory
    with report.stage(f"guest memory on huge pages ({mem.label})") as st:
        mem.populate()
        folio = mem.folio_at(storm_vm.params[0].region_gpa)
        huge = mem.huge_bytes()
        st.check(huge > 0, f"{fmt_bytes(huge)} of {fmt_bytes(mem.size)} mapped by huge page entries (smaps); the storm "
                 f"region starts in {folio.describe() if folio else 'a folio not readable here'}",
                 f"no huge page entries in the {mem.label} mapping (smaps): nothing to split or collapse")
        if folio is not None:
            st.equal(folio.size, PMD_SIZE, "folio size at the start of the storm region", fmt_bytes)
        collapser = CollapseLoop(mem)

    live_snapshot_procedure(report, storm_vm, make_memory, make_wp, inject, host_limits, alongside=lambda: collapser)

    with report.stage("huge pages during the snapshot") as st:
        st.check(sum(collapser.outcomes.values()) > 0, f"MADV_COLLAPSE over the whole mapping while the snapshot ran: "
                 f"{collapser.describe()}", "no MADV_COLLAPSE call finished while the snapshot ran")
        st.note(f"after the snapshot: {fmt_bytes(mem.huge_bytes())} mapped by huge page entries")
        report.fact("collapse_outcomes", {str(k): v for k, v in collapser.outcomes.items()})


@pytest.mark.parametrize("backing", ["memfd", "anonymous"])
def test_live_snapshot_during_first_touch_is_memory_at_the_arm_instant(report, make_storm_vm, make_memory, make_wp,
                                                                        inject, host_limits, backing):
    """Taken while the guest still writes never-populated pages, the snapshot holds them as they were: empty."""
    # The mark an eighth into the first sweep: pages behind the guest populated, pages ahead still holes.
    storm_vm = make_storm_vm(backing, 64 << 20, 1, mark=lambda npages: npages // 8)
    if backing == "anonymous":
        # With THP the first touch populates 2 MiB at once and there are no 4 KiB holes left to test.
        storm_vm.memory.no_thp()
    p = storm_vm.params[0]

    _, _, reference = live_snapshot_procedure(report, storm_vm, make_memory, make_wp, inject, host_limits,
                                              at_marks=True)
    with report.stage("holes at the arm instant") as st:
        st.equal(storm_vm.progress(0, image=reference.mm).done_gen, 0, "sweeps completed at the arm", str)
        region = storm_vm.region(reference.mm, 0)
        at_arm = storm.check_instant(p, region)
        st.check(at_arm.ok and at_arm.lo == at_arm.hi == p.mark_position,
                 f"memory at the arm is the mark's instant: {at_arm.message}",
                 f"memory at the arm: expected {storm.describe_instant(p, p.mark_position)}, saw {at_arm.message}")
        holes = sum(1 for k in range(p.npages) if region[k * PAGE_SIZE:k * PAGE_SIZE + 4] == bytes(4))
        st.equal(holes, p.npages - p.mark_pages, f"storm pages never written at the arm instant (of {p.npages})", str)


# -- host writers racing the copier (hypothesis) --------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pages=hs.lists(hs.integers(min_value=0, max_value=255), min_size=1, max_size=64),
       writers=hs.integers(min_value=1, max_value=3), batch=hs.sampled_from([1, 8, 64, 512]),
       value=hs.integers(min_value=1, max_value=255))
def test_host_writers_racing_the_copier_never_change_the_snapshot(report, make_memory, make_wp, pages, writers,
                                                                   batch, value):
    """Whatever pages host threads write, in whatever order, while the copier runs, the snapshot is the arm instant."""
    mem = make_memory("memfd", 1 << 20)
    for p in range(0, mem.size, PAGE_SIZE):
        mem.write(p, (p // PAGE_SIZE).to_bytes(4, "little"))
    at_arm = mem.snapshot_bytes()
    dst = bytearray(mem.size)
    snap = make_wp(mem, dst)
    snap.arm()
    chunks = [pages[i::writers] for i in range(writers)]

    def write(chunk: list[int]) -> None:
        for page in chunk:
            mem.write(page * PAGE_SIZE + 100, bytes([value]) * 16)

    threads = [threading.Thread(target=write, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    snap.bulk_copy(batch=batch)
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "a host writer is still blocked 10 s after the copy"
    snap.finalize()
    diffs = differing_pages(dst, at_arm)
    assert not diffs, f"pages {[hex(d * PAGE_SIZE) for d in diffs[:8]]} differ from memory at the arm instant"
    for page in pages:
        assert mem.read(page * PAGE_SIZE + 100, 1)[0] == value, f"host write to page {page:#x} was lost"


# -- races lined up on one page (the engine's named points) --------------------------------------

RACE_PAGE = 5  # a host write's page: any but the first, so the copier's first batch holds pages on both sides of it


@pytest.mark.parametrize("writer", ["host-write", "guest-write"])
@pytest.mark.parametrize("window", list(Window), ids=[w.value for w in Window])
def test_a_race_lined_up_on_one_page_leaves_the_snapshot_at_the_arm_instant(report, make_memory, make_wp,
                                                                              make_marker16_vm, window, writer):
    """Held at its named points, the engine meets a write (a host thread's, or the guest's store through KVM), its
    fault capture and its bulk copier on one page in the order that breaks a wrong engine, every time; the
    snapshot is still memory at the arm, byte for byte."""
    with report.stage("labelled memory, engine with named points") as st:
        mem = make_memory("memfd", 1 << 20)
        for page in range(mem.size // PAGE_SIZE):
            mem.write(page * PAGE_SIZE, page.to_bytes(4, "little"))
        if writer == "guest-write":
            # marker16's one store, 0x42 at 0x1000 over the BEFORE marker 0xBE, is the write the race is about.
            _, vcpu = make_marker16_vm(mem)
            guest = GuestWrite(vcpu)
            page, where, racing = guests.MARKER_GPA // PAGE_SIZE, guests.MARKER_GPA, guests.MARKER_AFTER
            first_write = lambda: guest  # noqa: E731 (the lineup starts it when the race calls for it)
        else:
            page, where, racing, first_write = RACE_PAGE, RACE_PAGE * PAGE_SIZE + WRITE_OFFSET, FIRST_WRITE, None
        at_arm = mem.snapshot_bytes()
        dst = bytearray(mem.size)
        points = SlowPoints()
        snap = make_wp(mem, dst, points=points)
        st.note(f"{snap.engine.label()}; the race at page {page:#x} ({writer}): {window.what}")

    with report.stage(f"arm, line up {window.value}") as st:
        snap.arm()
        race = Lineup(window, snap, points, page, first_write=first_write).run()
        for step in race.steps:
            st.note(step)
        st.check(race.lined_up, f"lined up: {window.what}", race.problem)
        if window is Window.FINALIZE_DURING_FAULT_CAPTURE:
            st.check(not race.finalized_early, "finalize did not call the snapshot complete mid-capture",
                     f"{race.steps[-1]}: {window.bug}")
        if writer == "guest-write":
            st.check(guest.exit is not None and guest.exit.reason is ExitReason.HLT, "the guest's store went through: "
                     "marker16 halted", f"marker16 did not halt: {guest.exit.describe() if guest.exit else 'no exit'}")
        report.fact("named_points_called", points.census())

    with report.stage("finalize") as st:
        stats = snap.stats() if snap.finalized else snap.finalize()
        st.equal(stats.fault_pages + stats.bulk_pages, snap.npages, "pages captured (by fault + by bulk copy)", str)

    with report.stage("snapshot vs memory at the arm") as st:
        st.check(dst == at_arm, "the snapshot equals memory at the arm instant, byte for byte",
                 f"{describe_difference(at_arm, dst)}; at {where:#x} it holds {dst[where]:#04x}, memory at the arm "
                 f"{at_arm[where]:#04x} (the racing writes were {racing:#04x}, {SECOND_WRITE:#04x} at "
                 f"{page * PAGE_SIZE + WRITE_OFFSET:#x}): {window.bug}")
        landed = mem.byte(where)
        st.check(landed == racing, f"the racing write landed in live memory ({landed:#04x} at {where:#x})",
                 f"live memory at {where:#x}: expected the racing write {racing:#04x}, saw {landed:#04x}")


# -- benchmark ------------------------------------------------------------------------------------


@pytest.mark.sizes(64 << 20, 256 << 20, extendable=False)
def test_benchmark_bulk_copy_rate(report, benchmark, make_memory, make_wp, mem_size):
    """The engine's bulk copy (nothing else running) against a warm memcpy of the same memory, round by round."""
    from native._lib import lib
    from native.memory import copy_timed

    mem = make_memory("memfd", mem_size)
    dst = make_memory("anonymous", mem_size)
    mem.populate()
    dst.populate()
    snap = make_wp(mem, dst.mm)
    copies: list[int] = []
    floors: list[int] = []
    copied: list[int] = []

    def arm() -> None:
        # The floor, measured beside each round on the same two buffers: a host's memory state that makes
        # copies slower in one run than in another slows both alike, so their ratio stays.
        floors.append(copy_timed(dst.mm, mem))
        snap.arm()

    def copy() -> None:
        t0 = lib.sp_now_ns()
        copied.append(snap.bulk_copy())
        copies.append(lib.sp_now_ns() - t0)

    with report.stage("bulk copy, quiet engine") as st:
        benchmark.pedantic(copy, setup=arm, rounds=BULK_COPY_ROUNDS, iterations=1)
        floor = median(floors)
        report.figure("memcpy_ns", floors, "ns", what=f"a warm memcpy of the {fmt_bytes(mem_size)} (floor)")
        report.figure("bulk_copy_ns", copies, "ns", what="the engine's bulk copy, un-protecting each batch")
        ratio = median(report.figure("copy_rate_ratio_to_memcpy", [floor / c for c in copies], "x", better="higher",
                                     what="the bulk copy's rate over the warm memcpy's (median), same buffers, same "
                                          "run").samples)
        rate = mem_size / (median(copies) / 1e9)
        st.timing("bulk copy median", median(copies), f"{rate / 1e9:.2f} GB/s = {ratio:.2f}x warm memcpy "
                  f"({mem_size / floor:.1f} GB/s); includes un-protecting each copied batch")
        if ratio > LIMIT_SLACK:
            why = (f"a copy {ratio:.2f}x as fast as this host's warm memcpy of the same buffers "
                   f"({mem_size / floor:.1f} GB/s, same run) is past what the host can copy (limit {LIMIT_SLACK}x)")
            st.note(f"MEASUREMENT ERROR: {why}")
            report.measurement_error("copy_rate_ratio_to_memcpy", ratio, why)
        # The work each round timed: every page of the region copied (a round that copied less timed less).
        st.check(all(c == snap.npages for c in copied), f"every round copied all {snap.npages} pages",
                 f"pages copied per round: {copied}, expected {snap.npages} each: a round timed less than the copy")
