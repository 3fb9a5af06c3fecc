"""Self-tests of what the plots show (results/plotdata.py), checked as data, not pixels: latency buckets and
their percentiles, ratios to each record's own floor, a note for every missing point naming why, plain words in
every legend, and which run and baseline a plot names. Records are built one case at a time."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
from snapproof.results.load import load_record
from snapproof.results.plotdata import (
    BUCKETS_PER_OCTAVE,
    NOT_SELECTED,
    OVERFLOW_US,
    arm_series,
    baseline_refusal,
    bucket_edges,
    case_key,
    copy_series,
    describe,
    hist_mark,
    latency_panels,
    log_buckets,
    missing_notes,
    pause_series,
    restore_series,
)
from snapproof.results.record import SCHEMA
from snapproof.results.stats import percentile

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "results" / "baselines" / "kvm_pvm.yaml"


def _figure(samples: list[float], unit: str = "x") -> dict:
    s = sorted(samples)
    return {"unit": unit, "better": "lower", "what": "w", "median": s[len(s) // 2], "samples": list(samples)}


def _case(test: str, outcome: str = "passed", figures: dict | None = None, facts: dict | None = None, **kw) -> dict:
    return {"test": test, "nodeid": f"phases/x.py::{test}", "claim": "c", "outcome": outcome, "duration_ns": 10,
            "stages": [], "figures": figures or {}, "facts": facts or {}, **kw}


def _record(phases: dict[int, list[dict]], deselected: dict[int, list[dict]] | None = None,
            commit: str = "abc1234", host_class: str = "kvm-software") -> dict:
    return {
        "schema": SCHEMA,
        "run": {"started": "2026-11-23T10:00:00+00:00", "duration_s": 1.0, "argv": [], "strict_host": True,
                "inject": "none", "engine": None, "git_commit": commit, "policy": {}, "background_load": {},
                "status": "complete", "tests": {"selected": 1, "finished": 1}, "record": "/r/run.yaml"},
        "host": {"hostname": "h1", "kvm_module": "kvm_pvm", "kernel": "6.18", "platform": "linux",
                 "host_class": host_class},
        "capabilities": [],
        "phases": [{"phase": n, "title": "t", "outcome": "PASS", "duration_ns": 10, "cases": cases,
                    "deselected": (deselected or {}).get(n, [])} for n, cases in phases.items()],
        "benchmarks": [],
    }


def _arm(size: str, ratio: float, floor_ns: float) -> dict:
    return _case(f"test_benchmark_arm_cost[{size}]", figures={
        "arm_ratio_to_raw_ioctl": _figure([ratio * f for f in (0.98, 1.0, 1.02)]),
        "raw_writeprotect_ns": _figure([floor_ns] * 3, "ns"),
        "arm_ns": _figure([ratio * floor_ns] * 3, "ns")})


# -- fault service latency -----------------------------------------------------------------------------------------


def test_latency_buckets_are_log_spaced_whole_microseconds_up_to_the_overflow():
    edges = bucket_edges()
    assert edges[0] == 1 and edges[-1] == OVERFLOW_US and edges == sorted(set(edges))
    assert all(isinstance(e, int) for e in edges), "edges must fall on the engine's 1 µs bucket boundaries"
    step = 2 ** (1 / BUCKETS_PER_OCTAVE)
    # From 8 µs on each edge is one step above the last (whole microseconds: within rounding); below, one µs each.
    for lo, hi in zip(edges, edges[1:], strict=False):
        if lo >= 8 and hi < OVERFLOW_US:
            assert abs(hi / lo - step) <= 1 / lo, f"edges {lo} -> {hi}: not {step:.3f}x apart"
        elif lo < 8:
            assert hi - lo == 1, f"edges {lo} -> {hi}: below 8 µs a bucket is one 1 µs bucket"
    assert sum(1 for e in edges if 64 <= e < 128) == BUCKETS_PER_OCTAVE


def test_every_fault_lands_in_the_log_bucket_holding_its_service_time():
    hist = {0: 1, 1: 2, 7: 3, 9: 4, 100: 5, 1000: 6, OVERFLOW_US: 7}
    buckets = log_buckets(hist)
    assert sum(b.count for b in buckets) == sum(hist.values())
    for us, n in hist.items():
        holding = [b for b in buckets if b.low <= us < b.high]
        assert len(holding) == 1 and holding[0].count >= n, (us, buckets)
    assert buckets[0].what == "< 1 µs" and buckets[0].count == 1 and 0 < buckets[0].drawn[0] < 1
    assert buckets[-1].what.startswith(f">= {OVERFLOW_US}") and buckets[-1].count == 7
    assert [b.count for b in buckets if b.low <= 5000 < b.high] == [7], "the overflow holds every longer service"
    assert [b.count for b in buckets if b.low <= 9 < b.high] == [4], "9 µs shares no bucket with 7 µs"
    with pytest.raises(ValueError, match="negative"):
        log_buckets({-1: 1})


def test_p50_and_p99_are_the_faults_percentiles_and_are_drawn_inside_their_bucket():
    hist = {1: 50, 10: 49, 500: 1}   # 100 faults: the 51st is at 10 µs, the 100th at 500 µs
    p50, p99 = hist_mark(hist, 0.5), hist_mark(hist, 0.99)
    assert (p50.bucket_us, p99.bucket_us) == (10, 500)
    assert (p50.label, p99.label) == ("p50 10-11 µs", "p99 500-501 µs")
    assert 10 < p50.x < 11 and 500 < p99.x < 501
    samples = [us for us, n in hist.items() for _ in range(n)]
    assert [p50.bucket_us, p99.bucket_us] == [percentile(samples, 0.5), percentile(samples, 0.99)]
    over = hist_mark({2: 1, OVERFLOW_US: 99}, 0.5)
    assert over.label == f"p50 >= {OVERFLOW_US} µs" and over.x > OVERFLOW_US
    under = hist_mark({0: 3, 5: 1}, 0.5)
    assert under.label == "p50 < 1 µs" and under.x < 1


def test_latency_panels_keep_each_handler_placement_apart_and_merge_the_live_captures():
    trip = "test_benchmark_guest_wp_fault_round_trip"
    rec = _record({1: [_case(f"{trip}[same-cpu]", facts={"fault_service_hist_us": {1: 10}}),
                       _case(f"{trip}[other-cpu]", "skipped", skip_reason="for uffd: absent")],
                   2: [_case("test_live_snapshot_of_memfd_is_memory_at_the_arm_instant[1MiB-1vcpu]",
                             facts={"fault_service_hist_us": {2: 3, 9: 1}}),
                       _case("test_live_snapshot_of_memfd_is_memory_at_the_arm_instant[64MiB-1vcpu]",
                             facts={"fault_service_hist_us": {2: 1}})]})
    panels, notes = latency_panels(rec)
    assert [(p.label, p.faults, p.cases) for p in panels] == [
        ("guest write's WP fault, handler on the vCPU's CPU", 10, 1),
        ("live captures, storm guest writing (every phase 2 case)", 5, 2)]
    assert notes == ["guest write's WP fault, handler on another CPU: skipped: for uffd: absent"]


# -- ratios to each run's own floor ---------------------------------------------------------------------------


def test_a_ratio_point_is_over_the_floor_of_its_own_run_and_the_baselines_over_the_baselines():
    run = _record({1: [_arm("1GiB", 1.1, 20e6)]})
    base = _record({1: [_arm("1GiB", 2.0, 50e6)]})
    (r,), (b,) = arm_series(run), arm_series(base)
    got_run, got_base = r.points[1 << 30], b.points[1 << 30]
    assert (got_run.value, got_run.floor, got_run.absolute) == (1.1, 20e6, 1.1 * 20e6)
    assert (got_base.value, got_base.floor) == (2.0, 50e6)
    assert got_run.low is not None and got_run.high is not None and got_run.low < 1.1 < got_run.high


def test_a_ratio_the_case_marked_a_measurement_error_is_no_point_and_says_why():
    case = _arm("64MiB", 0.4, 1e6)
    case["facts"]["measurement_errors"] = [{"figure": "arm_ratio_to_raw_ioctl", "value": 0.4,
                                            "why": "an arm at 0.40x the bare ioctl"}]
    (s,) = arm_series(_record({1: [case]}))
    assert s.points == {} and s.missing == {64 << 20: "measurement error: an arm at 0.40x the bare ioctl"}


def test_a_copy_faster_than_the_hosts_own_memcpy_is_no_point():
    live = "test_live_snapshot_of_other_backings_is_memory_at_the_arm_instant"
    rec = _record({2: [_case(f"{live}[hugetlb-16MiB]", facts={"copy_rate_ratio_to_memcpy": 82.4}),
                       _case(f"{live}[anonymous-64MiB]", facts={"copy_rate_ratio_to_memcpy": 0.3})]})
    by = {s.label: s for s in copy_series(rec)}
    assert by["live capture of anonymous memory"].points[64 << 20].value == 0.3
    hugetlb = by["live capture of hugetlbfs memory"]
    assert hugetlb.points == {} and "82.4, past the host's own limit" in hugetlb.missing[16 << 20]


# -- missing points: a note naming why --------------------------------------------------------------------------


def _pause(size: str, strategy: str, outcome: str = "passed", **kw) -> dict:
    figures = {"pause_ratio_to_memcpy": _figure([0.5] * 6), "pause_ns": _figure([1e6] * 6, "ns"),
               "memcpy_ns": _figure([2e6] * 6, "ns")} if outcome == "passed" else {}
    return _case(f"test_benchmark_pause_window[{size}-{strategy}]", outcome, figures, **kw)


def test_each_missing_point_gets_a_note_naming_the_reason_the_record_gives():
    rec = _record({5: [_pause("64MiB", "stop-and-copy"), _pause("1GiB", "stop-and-copy"),
                       _pause("1GiB", "wp-copy-before-write", "skipped", skip_reason="for uffd.WP: absent"),
                       _pause("64MiB", "wp-copy-before-write", "failed", failure="[stage 2] pause\nmore"),
                       _pause("1GiB", "precopy-kvm-dirty-log")]},
                  deselected={5: [{"test": "test_benchmark_pause_window[64MiB-precopy-wp-async]", "nodeid": "n",
                                   "reason": "uffd.WP_ASYNC unavailable, not required by host class 'kvm-software'"}]})
    notes = missing_notes(pause_series(rec))
    assert notes == [
        "WP copy-before-write at 64 MiB: failed: [stage 2] pause",
        "pre-copy, WP_ASYNC dirty tracking at 64 MiB: left out: uffd.WP_ASYNC unavailable, not required by host "
        "class 'kvm-software'",
        "pre-copy, KVM dirty log at 64 MiB: " + NOT_SELECTED,
        "WP copy-before-write at 1 GiB: skipped: for uffd.WP: absent",
        "pre-copy, WP_ASYNC dirty tracking at 1 GiB: " + NOT_SELECTED,
    ]


def test_one_reason_at_many_sizes_is_one_note_naming_every_size():
    why = "uffd.WP_ASYNC unavailable"
    rec = _record({5: [_pause(size, "stop-and-copy") for size in ("64MiB", "256MiB", "1GiB")]},
                  deselected={5: [{"test": f"test_benchmark_pause_window[{size}-precopy-wp-async]", "nodeid": "n",
                                   "reason": why} for size in ("64MiB", "256MiB", "1GiB")]})
    assert missing_notes(pause_series(rec)) == [
        f"pre-copy, WP_ASYNC dirty tracking at 64 MiB, 256 MiB and 1 GiB: left out: {why}"]


def test_the_baselines_missing_1GiB_restore_lines_each_get_a_note():
    """The baseline ran read-copy's first instruction and every working set at 1 MiB and 64 MiB only."""
    first, ws = restore_series(load_record(BASELINE))
    by = {s.key[1]: s for s in first}
    assert 1 << 30 in by["map-private"].points and by["read-copy"].missing == {1 << 30: NOT_SELECTED}
    assert all(s.missing == {1 << 30: NOT_SELECTED} for s in ws) and len(ws) == 3
    assert missing_notes(ws, "full working set, ", "loaders") == [
        f"full working set, all 3 loaders at 1 GiB: {NOT_SELECTED}"]


def test_a_series_present_in_every_size_has_no_note():
    rec = _record({5: [_pause(size, s) for size in ("64MiB", "1GiB") for s in ("stop-and-copy", "precopy-wp-async")]})
    assert missing_notes(pause_series(rec)) == []


# -- plain words ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("test", "want"), [
    ("test_benchmark_pause_window[64MiB-stop-and-copy]", ("test_benchmark_pause_window", "stop-and-copy", 64 << 20)),
    ("test_benchmark_time_to_first_instruction[read-copy-1GiB]",
     ("test_benchmark_time_to_first_instruction", "read-copy", 1 << 30)),
    ("test_live_snapshot_of_memfd_is_memory_at_the_arm_instant[256MiB-2vcpus]",
     ("test_live_snapshot_of_memfd_is_memory_at_the_arm_instant", "2vcpus", 256 << 20)),
    ("test_benchmark_guest_wp_fault_round_trip[same-cpu]", ("test_benchmark_guest_wp_fault_round_trip", "same-cpu",
                                                            None)),
])
def test_a_case_splits_into_its_series_and_its_size(test, want):
    got = case_key(test)
    assert (got.function, got.variant, got.size) == want


def test_every_series_the_baseline_plots_has_plain_words_not_test_name_fragments():
    rec = load_record(BASELINE)
    first, ws = restore_series(rec)
    labels = [s.label for group in (arm_series(rec), copy_series(rec), pause_series(rec), first, ws) for s in group]
    labels += [p.label for p in latency_panels(rec)[0]]
    assert len(labels) >= 20
    fragments = [label for label in labels if "test_" in label or "_is_" in label or "[" in label]
    assert fragments == [], "add these to results/plotdata.py WORDS"
    assert "live capture of memfd, 2 vCPUs writing" in labels


# -- which run, which baseline ---------------------------------------------------------------------------------


def test_a_plot_names_its_run_and_baseline_by_file_time_commit_and_host():
    rec = _record({})
    text = describe(rec, "results/baselines/kvm_pvm.yaml")
    assert text.startswith("results/baselines/kvm_pvm.yaml (run 2026-11-23 10:00:00 UTC, commit abc1234, h1 (kvm_pvm")
    assert "NOT A WHOLE RUN" not in text
    partial = copy.deepcopy(rec)
    partial["run"].update(status="incomplete", tests={"selected": 5, "finished": 2}, inject="no-copy")
    text = describe(partial)
    assert text.startswith("/r/run.yaml") and "NOT A WHOLE RUN: status incomplete" in text
    assert "fault injection no-copy" in text


def test_a_baseline_of_another_host_class_is_refused_naming_both():
    why = baseline_refusal(_record({}), _record({}, host_class="kvm-hardware"))
    assert why is not None and "'kvm-hardware'" in why and "'kvm-software'" in why
    assert baseline_refusal(_record({}), _record({})) is None


def test_plots_command_refuses_a_baseline_of_another_class_with_exit_2(tmp_path, capsys):
    import yaml
    from snapproof.results.cli import main

    run, base = tmp_path / "run.yaml", tmp_path / "base.yaml"
    run.write_text(yaml.safe_dump(_record({})))
    base.write_text(yaml.safe_dump(_record({}, host_class="kvm-hardware")))
    assert main(["plots", str(run), "--baseline", str(base), "--out", str(tmp_path / "out")]) == 2
    assert "host class 'kvm-hardware'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bucket_edges_double_every_four_buckets():
    edges = bucket_edges()
    for k in range(3, 9):   # 8 µs to 512 µs (the last doubling ends at the overflow, 1023 µs)
        assert sum(1 for e in edges if 2 ** k <= e < 2 ** (k + 1)) == BUCKETS_PER_OCTAVE, k
    assert math.isclose(edges[-2] / edges[-6], 2, rel_tol=0.01)
