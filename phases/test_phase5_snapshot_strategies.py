"""Phase 5 — snapshot strategies side by side: one running guest, five ways to snapshot it, the same oracles.

An engineer choosing a snapshot design sees the trade-offs measured on their
own host. One storm32 vCPU writes at full speed throughout (the second core is
the copier's); its memslots log dirty pages (KVM_MEM_LOG_DIRTY_PAGES, which
KVM's dirty log needs from slot creation on). The same guest is snapshotted
five times in turn (native/strategies.py):

- stop-and-copy: pause, copy everything, resume;
- wp-copy-before-write: this suite's engine: pause, arm WP, resume, copy while it runs;
- wp-prearmed: the same engine, WP armed while the guest runs (a write only records its page and
  un-protects it); the pause protects again just the pages written since, then as wp-copy-before-write;
- precopy-wp-async: copy while it runs, then rounds of the pages written since
  (UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN get-and-clear), the last dirty pages in the pause;
- precopy-kvm-dirty-log: the same rounds with KVM_GET_DIRTY_LOG, one bitmap per memslot.

Each snapshot is judged by the two oracles of phase 2: exact (it equals a
reference copied while the vCPUs were stopped at the strategy's pause) and
instant (guests/storm.check_instant). The report's table gives pause window,
total time and bytes copied per strategy, and the pages wp-prearmed's pause
protected again; timings are reported, never asserted. A pre-armed snapshot whose
guest rewrote every page between the pre-arm and the pause, and writes on after
it, is judged by the same oracles: every page it wrote must be protected again.

What each strategy needs of the host is native.strategies.STRATEGY_NEEDS. On a
host without one that its class does not require (WP_ASYNC and PAGEMAP_SCAN
before kernel 6.7), that strategy's benchmark cases are deselected naming it,
and the comparison leaves it out of its table, saying why, while the others,
the WP engine's included, are judged as everywhere. The same goes for an engine
under test (--engine) that does not offer what a strategy needs of it
(STRATEGY_ENGINE_OFFERS: wp-prearmed needs "prearmed" snapshots).
"""

from __future__ import annotations

import pytest

from guests import storm
from native.compare import exact_oracle
from native.kvm import KVM_MEM_LOG_DIRTY_PAGES, ExitReason
from native.layout import offset_of
from native.live import VcpuRunner
from native.memory import copy_timed
from native.strategies import (
    PRECOPIES,
    PRECOPY_KVM_DIRTY_LOG,
    PRECOPY_WP_ASYNC,
    STOP_AND_COPY,
    STRATEGIES,
    STRATEGY_ENGINE_OFFERS,
    STRATEGY_NEEDS,
    WP_COPY_BEFORE_WRITE,
    WP_PREARMED,
    make_snapshotter,
)
from native.wp import raw_writeprotect_samples
from results.record import LIMIT_SLACK, fmt_bytes, fmt_ns
from results.stats import median

pytestmark = [pytest.mark.phase(5, "snapshot strategies"),
              pytest.mark.needs("kvm", "uffd", "uffd.WP_HUGETLBFS_SHMEM")]

VCPUS = 1
GUEST_TIMEOUT_S = 120.0
# The snapshots start once the guest has written this many pages of its first sweep (or all of them):
# memory is populated up front, so the storm is writing at its steady rate by then.
WARM_PAGES = 4096
# Snapshots per strategy and size in the pause-window benchmark: the gate's rank test needs at least 5 a side to
# reach p < 0.01 at all (3 against 3: p >= 0.05), and one more leaves it room for a tie.
BENCH_ROUNDS = 6


@pytest.fixture
def snapshotters(engine):
    """Factory: ``snapshotters(strategy, storm_vm, runner, destination, inject)``; the WP row is the engine under
    test (``--engine``); each closed at teardown."""
    made = []

    def _make(strategy, storm_vm, runner, destination, inject):
        s = make_snapshotter(strategy, storm_vm.memory, destination, runner, storm_vm.vm, inject=inject,
                             engine=engine)
        made.append(s)
        return s

    yield _make
    for s in reversed(made):
        s.close()


def start_storm(st, make_storm_vm, make_memory, size: int, with_reference: bool = True, before_start=None):
    """storm32 on one vCPU over ``size`` of memfd (its RAM below the 32-bit hole; dirty-logged memslots), running;
    a warm snapshot buffer and, ``with_reference``, a warm reference buffer. ``before_start(memory)`` runs on the
    populated memory first."""
    storm_vm = make_storm_vm("memfd", size, VCPUS, slot_flags=KVM_MEM_LOG_DIRTY_PAGES)
    storm_vm.memory.populate()  # a running guest's memory is populated: first touch stays out of every figure
    if before_start is not None:
        before_start(storm_vm.memory)
    snapshot = make_memory("anonymous", size)
    snapshot.populate()
    reference = None
    if with_reference:
        reference = make_memory("anonymous", size)
        reference.populate()
    p = storm_vm.params[0]
    mark = storm.write_order(p, 1)[min(WARM_PAGES, p.npages - 1)]
    runner = VcpuRunner(storm_vm.vm.vcpus, timeout=GUEST_TIMEOUT_S).start()
    storm_vm.wait(lambda: storm_vm.memory.read(p.page_gpa(mark), 4) != bytes(4),
                  f"{WARM_PAGES} pages of the first sweep written")
    st.check(not runner.finished, f"storm32 writing over {fmt_bytes(size)} memfd ({p.npages} pages, 1 vCPU), "
             "slot logging dirty pages", f"the vCPU stopped early: {runner.exits}")
    return storm_vm, runner, snapshot, reference


def judge(storm_vm, snapshot, reference, states):
    """Both oracles on one snapshot: (exact ok, what differs, instant verdict per vCPU)."""
    exact = exact_oracle(snapshot.mm, reference.mm)
    detail = "" if exact else f"exact oracle: {exact.message}"
    return bool(exact), detail, [instant(storm_vm, i, snapshot, states) for i in range(len(storm_vm.params))]


def instant(storm_vm, i, snapshot, states):
    """guests/storm.check_instant on vCPU i's region of the snapshot, read in place (no copy of it), at the instant
    its registers say it was paused at (``states``: the vCPU states the strategy saved in its pause)."""
    p = storm_vm.params[i]
    with storm_vm.region_view(snapshot.mm, i) as region:
        return storm.check_instant(p, region, at=storm.instant_of_vcpu_state(p, states[i]))


def cannot_run(strategy, unavailable, engine) -> str | None:
    """Why this host (STRATEGY_NEEDS) or the engine under test (STRATEGY_ENGINE_OFFERS) cannot run ``strategy``;
    None when both can."""
    lacking = [why for c in STRATEGY_ENGINE_OFFERS.get(strategy, ()) if (why := engine.lacks(c))]
    return unavailable(*STRATEGY_NEEDS[strategy]) or "; ".join(lacking) or None


def memcpy_ns(size: int, host_limits) -> float:
    """What one warm memcpy of ``size`` takes at this host's rate: the floor of any full copy."""
    return size / host_limits["memcpy_bytes_per_s"] * 1e9


def rounds_text(snap) -> str:
    return ", ".join(f"{r.pages}" for r in snap.rounds) + f" | paused {snap.paused_pages}"


def strategy_stage(report, strategy, storm_vm, runner, snapshot, reference, snapshotters, inject, floor, raw_arm,
                   rows) -> None:
    """One strategy's snapshot of the running guest, its figures, its table row, then both oracles."""
    mem_size = snapshot.size
    with report.stage(strategy) as st:
        snap = snapshotters(strategy, storm_vm, runner, snapshot.mm, inject).take(reference=reference.mm)
        st.timing("pause window", snap.pause_ns, f"{snap.pause_ns / floor:.3f}x a warm memcpy of "
                  f"{fmt_bytes(mem_size)}; kick->stopped {fmt_ns(snap.stop_ns)}")
        st.timing("total", snap.total_ns, f"{snap.total_ns / floor:.2f}x a warm memcpy")
        st.check(snap.bytes_copied >= mem_size, f"copied {snap.bytes_copied / (1 << 20):.1f} MiB = "
                 f"{snap.bytes_ratio:.3f}x memory", f"copied {snap.bytes_copied:#x} bytes, less than "
                 f"memory {mem_size:#x}: some page never reached the snapshot")
        if snap.wp_stats is not None:
            st.note(f"arm {fmt_ns(snap.wp_stats.arm_ns)} = {snap.wp_stats.arm_ns / raw_arm:.2f}x the bare "
                    f"ioctl on a quiet memfd; "
                    f"{snap.wp_stats.fault_pages} pages by fault, {snap.wp_stats.bulk_pages} by bulk copy")
        if snap.prearm is not None:
            st.note(f"pages protected per pre-arm round, the guest running: {', '.join(map(str, snap.prearm_rounds))}"
                    f" | paused {snap.prearm.reprotected_pages} in {snap.prearm.reprotect_calls} calls "
                    f"({snap.prearm.recorded_pages} recorded written since), {fmt_ns(snap.prearm.arm_ns)}")
        if snap.rounds:
            dirty_rate = snap.rounds[1].pages / (snap.rounds[0].copy_ns / 1e9) if len(snap.rounds) > 1 else 0
            st.note(f"pages per round: {rounds_text(snap)}; dirty rate during the full copy "
                    f"{dirty_rate / 1e3:.0f}k pages/s")
        exact_ok, detail, verdicts = judge(storm_vm, snapshot, reference, snap.vcpu_states)
        rows.append({"strategy": strategy, "size": mem_size, "pause_ns": snap.pause_ns,
                     "stop_ns": snap.stop_ns, "total_ns": snap.total_ns, "bytes_copied": snap.bytes_copied,
                     "bytes_ratio": round(snap.bytes_ratio, 4), "paused_pages": snap.paused_pages,
                     "rounds": [r.pages for r in snap.rounds], "exact": exact_ok, "instant": all(verdicts),
                     "reprotected_pages": None if snap.prearm is None else snap.prearm.reprotected_pages,
                     "pause_ratio_to_memcpy": round(snap.pause_ns / floor, 4)})
        st.check(exact_ok, "exact oracle: equals the reference copied while the vCPUs were stopped", detail)
        for i, v in enumerate(verdicts):
            st.check(bool(v), f"instant oracle, vCPU {i}: {v.message}", f"instant oracle, vCPU {i}: {v.message}")


@pytest.mark.sizes(64 << 20, 256 << 20, 1 << 30)
def test_every_strategy_snapshots_the_running_guest_consistently(report, unavailable, make_storm_vm, make_memory,
                                                                   snapshotters, inject, host_limits, engine,
                                                                   mem_size):
    """Stop-and-copy, WP copy-before-write, pre-armed WP and both pre-copies each snapshot the writing guest at one
    instant."""
    left_out = {s: why for s in STRATEGIES if (why := cannot_run(s, unavailable, engine))}
    compared = [s for s in STRATEGIES if s not in left_out]
    raw_arm: list[int] = []
    with report.stage("storm guest running") as st:
        # The bare ioctl is timed on the guest's populated memory before it runs: no strategy's uffd is there yet.
        storm_vm, runner, snapshot, reference = start_storm(
            st, make_storm_vm, make_memory, mem_size,
            before_start=lambda mem: raw_arm.extend(sorted(raw_writeprotect_samples(mem, rounds=5))))
        floor = memcpy_ns(mem_size, host_limits)
        st.timing("warm memcpy of all memory", floor, f"{host_limits['memcpy_bytes_per_s'] / 1e9:.1f} GB/s, "
                  "this host's copy limit")
        st.timing("bare UFFDIO_WRITEPROTECT", raw_arm[2], "median of 5 on the guest's memory before it ran")
        for strategy, why in left_out.items():
            st.note(f"{strategy}: left out, this host or engine lacks what it needs: {why}")
        if left_out:
            report.fact("strategies_left_out", left_out)

    rows = []
    failures = []
    try:
        for strategy in compared:
            try:
                strategy_stage(report, strategy, storm_vm, runner, snapshot, reference, snapshotters, inject,
                               floor, raw_arm[2], rows)
            except AssertionError as e:  # the table is still printed with every strategy; the test fails below
                failures.append(str(e))
    finally:
        exits = runner.stop()

    with report.stage("comparison") as st:
        st.note(f"{'strategy':<24}{'pause':>10}{'total':>11}{'bytes copied':>22}{'re-protected':>14}  exact  instant")
        for r in rows:
            mark = {True: "\u2713", False: "\u2717"}
            copied = f"{r['bytes_copied'] / (1 << 20):.1f} MiB ({r['bytes_ratio']:.3f}x)"
            reprotected = "-" if r["reprotected_pages"] is None else f"{r['reprotected_pages']} pages"
            st.note(f"{r['strategy']:<24}{fmt_ns(r['pause_ns']):>10}{fmt_ns(r['total_ns']):>11}{copied:>22}"
                    f"{reprotected:>14}  {mark[r['exact']]:^5}  {mark[r['instant']]:^7}")
        by = {r["strategy"]: r for r in rows}
        report.fact("strategies", rows)
        report.fact("pause_ns", {r["strategy"]: r["pause_ns"] for r in rows})
        report.fact("bytes_ratio", {r["strategy"]: r["bytes_ratio"] for r in rows})
        if STOP_AND_COPY in by and WP_COPY_BEFORE_WRITE in by:
            factor = by[STOP_AND_COPY]["pause_ns"] / by[WP_COPY_BEFORE_WRITE]["pause_ns"]
            st.note(f"target: WP pause window >= 20x shorter than stop-and-copy (at 1 GiB): "
                    f"{factor:.1f}x at {fmt_bytes(mem_size)}")
            report.fact("wp_pause_shorter_than_stop_and_copy_x", round(factor, 2))
        if WP_PREARMED in by and (compared_precopies := [s for s in PRECOPIES if s in by]):
            # The pre-armed pause over each pre-copy's, the same guest and buffers, one after the other in this run.
            to_precopy = {s: round(by[WP_PREARMED]["pause_ns"] / by[s]["pause_ns"], 3) for s in compared_precopies}
            st.note("target: pre-armed WP pause within 2x of the pre-copy pauses (at 1 GiB): "
                    + ", ".join(f"{x:.2f}x {s}'s" for s, x in to_precopy.items()) + f" at {fmt_bytes(mem_size)}")
            report.fact("prearmed_pause_to_precopy_x", to_precopy)
        precopies = [by[s]["bytes_ratio"] for s in (PRECOPY_WP_ASYNC, PRECOPY_KVM_DIRTY_LOG) if s in by]
        if precopies:
            st.note(f"target: pre-copy bytes within 1.5x of memory: {max(precopies):.3f}x at worst")
        st.check(not failures, f"all {len(compared)} snapshots passed both oracles"
                 + (f" ({', '.join(left_out)} left out: see stage 1)" if left_out else ""), "; ".join(failures))
        st.check(all(ex.reason is ExitReason.KICKED for ex in exits.values()),
                 f"the guest wrote throughout all {len(compared)} snapshots (still running when stopped)",
                 f"the guest ended early: {[ex.describe() for ex in exits.values()]}")


@pytest.mark.sizes(64 << 20, 256 << 20, 1 << 30)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_benchmark_pause_window(report, benchmark, make_storm_vm, make_memory, snapshotters, inject,
                                strategy, mem_size):
    """Each strategy's pause window (kick -> resume) on the writing guest, every round's snapshot at one instant."""
    # What the strategy needs (STRATEGY_NEEDS) is checked at collection: a case it lacks here is deselected.
    with report.stage("storm guest running") as st:
        storm_vm, runner, snapshot, _ = start_storm(st, make_storm_vm, make_memory, mem_size, with_reference=False)
        snapper = snapshotters(strategy, storm_vm, runner, snapshot.mm, inject)

    with report.stage(f"{strategy}: {BENCH_ROUNDS} snapshots, the pause window timed") as st:
        done = []
        pending = []
        floors: list[int] = []

        def prepare() -> None:
            # The floor beside each round, untimed: a warm memcpy of the guest's memory into the same snapshot
            # buffer (every strategy overwrites all of it), the guest paused as in a stop-and-copy, so nothing
            # competes with it. A host's memory state that slows copies in one run slows both alike, so the
            # pause window's ratio to it stays.
            runner.pause()
            try:
                floors.append(copy_timed(snapshot.mm, storm_vm.memory))
            finally:
                runner.resume()
            snapper.prepare()
            pending.append(True)

        def complete() -> None:
            pending.clear()
            snap = snapper.complete()
            done.append(snap)
            # The work the round timed: every byte of memory reached the snapshot at least once.
            st.check(snap.bytes_copied >= mem_size, f"round {len(done)}: copied {snap.bytes_ratio:.3f}x memory",
                     f"round {len(done)}: copied {snap.bytes_copied:#x} bytes, less than memory {mem_size:#x}: the "
                     "round timed less than a snapshot")
            for i in range(len(storm_vm.params)):
                verdict = instant(storm_vm, i, snapshot, snap.vcpu_states)
                st.check(bool(verdict), f"round {len(done)}, vCPU {i}: one instant",
                         f"round {len(done)}, vCPU {i}: {verdict.message}")

        try:
            benchmark.pedantic(snapper.pause_window, setup=prepare, teardown=complete, rounds=BENCH_ROUNDS)
            if pending:  # --benchmark-disable runs setup and target only
                complete()
        finally:
            runner.stop()
        floor = median(floors)
        report.figure("memcpy_ns", floors, "ns", what=f"a memcpy of the guest's {fmt_bytes(mem_size)} into the "
                      "snapshot buffer, the guest paused (floor)")
        pauses = report.figure("pause_ns", [s.pause_ns for s in done], "ns", what="kick -> resume, the guest stopped")
        ratio = report.figure("pause_ratio_to_memcpy", [s.pause_ns / floor for s in done], "x",
                              what="each pause window over the memcpy's median, same buffers, same run")
        copied = report.figure("bytes_ratio", [s.bytes_ratio for s in done], "number",
                               what="bytes copied over memory size")
        st.timing("pause window median", median(pauses.samples), f"{median(ratio.samples):.3f}x a warm memcpy of "
                  f"{fmt_bytes(mem_size)}")
        total = median([s.total_ns for s in done])
        st.timing("total median", total)
        st.note(f"bytes copied: {max(copied.samples):.3f}x memory at most")
        if strategy == WP_PREARMED:
            reprotected = report.figure("reprotected_pages", [s.prearm.reprotected_pages for s in done if s.prearm],
                                        "number", what="pages the pause protected again: written since the pre-arm")
            # Where each pause went: stopping the vCPU (one mid-fault is served first) and the arm itself.
            st.note(f"pages protected again per pause: {', '.join(str(int(n)) for n in reprotected.samples)}; "
                    f"kick->stopped {', '.join(fmt_ns(s.stop_ns) for s in done)}; the arm "
                    f"{', '.join(fmt_ns(s.prearm.arm_ns) for s in done if s.prearm)}")
        if total * LIMIT_SLACK < floor:
            # Every strategy copies all of memory at least once per snapshot (checked above, round by round).
            why = (f"a whole snapshot in {fmt_ns(total)}, {floor / total:.2f}x as fast as this host's warm memcpy of "
                   f"{fmt_bytes(mem_size)} ({fmt_ns(floor)}, same run), which it contains (limit {LIMIT_SLACK}x)")
            st.note(f"MEASUREMENT ERROR: {why}")
            report.measurement_error("total_median_ns", total, why)


# The pre-armed case's guest: its sweep of every page between the pre-arm and the pause is one WP fault per page.
PREARMED_SWEEP_SIZE = 16 << 20


@pytest.mark.sizes(PREARMED_SWEEP_SIZE, extendable=False)
@pytest.mark.parametrize("strategy", [WP_PREARMED])
def test_prearmed_wp_protects_again_every_page_written_since_the_prearm(report, make_storm_vm, make_memory,
                                                                         snapshotters, inject, strategy, mem_size):
    """A pre-armed WP snapshot whose guest rewrote every page after the pre-arm, and writes on after the pause,
    equals memory at the pause."""
    with report.stage("storm guest running") as st:
        storm_vm, runner, snapshot, reference = start_storm(st, make_storm_vm, make_memory, mem_size)
        p = storm_vm.params[0]
        snapper = snapshotters(strategy, storm_vm, runner, snapshot.mm, inject)

    try:
        with report.stage("pre-armed, then every page of the region written") as st:
            snapper.prepare()
            gen = storm_vm.progress(0).cur_gen
            # Generation gen + 1 starts after the pre-arm: once it is done, every page was written since.
            storm_vm.wait(lambda: storm_vm.progress(0).done_gen > gen, f"sweep {gen + 1}, begun after the pre-arm",
                          timeout=GUEST_TIMEOUT_S)
            st.note(f"the guest swept its {p.npages} pages (generation {gen + 1}) after the pre-arm: each write's page "
                    "made writable again and recorded")

        with report.stage("the pause: the pages written since the pre-arm protected again") as st:
            snapper.pause_window(reference=reference.mm)
            snap, prearm = snapper.result, snapper.result.prearm
            assert prearm is not None
            st.timing("pause window", snap.pause_ns, f"{prearm.reprotected_pages} pages protected again in "
                      f"{prearm.reprotect_calls} calls")
            st.check(prearm.recorded_pages >= p.npages, f"the engine recorded {prearm.recorded_pages} pages written "
                     f"since the pre-arm, the region's {p.npages} among them",
                     f"the engine recorded {prearm.recorded_pages} pages written since the pre-arm; the guest wrote "
                     f"all {p.npages} of its region")

        with report.stage("the guest writes on after the pause") as st:
            # Its next write goes to a page it wrote before the pause: one left writable lands uncaught.
            nxt = storm.stream_point(p, storm.instant_of_vcpu_state(p, snap.vcpu_states[0]))
            assert nxt is not None  # the storm runs forever
            at = offset_of(p.page_gpa(nxt.page)) + 4 * storm.SLOT_WORDS[nxt.slot][0]
            # At least its generation: a guest whose writes no longer fault sweeps on faster than this polls.
            storm_vm.wait(lambda: int.from_bytes(storm_vm.memory.read(at, 4), "little") >= nxt.generation,
                          f"the guest's first write after the pause ({nxt})", timeout=GUEST_TIMEOUT_S)
            st.note(f"landed: {nxt}")
            snap = snapper.complete()
            assert snap.wp_stats is not None
            st.note(f"then {snap.wp_stats.fault_pages} pages captured by fault, {snap.wp_stats.bulk_pages} by the bulk "
                    "copy")
    finally:
        runner.stop()

    with report.stage("both oracles") as st:
        exact_ok, detail, verdicts = judge(storm_vm, snapshot, reference, snap.vcpu_states)
        st.check(exact_ok, "exact oracle: equals the reference copied while the vCPUs were stopped", detail)
        for i, v in enumerate(verdicts):
            st.check(bool(v), f"instant oracle, vCPU {i}: {v.message}", f"instant oracle, vCPU {i}: {v.message}")
