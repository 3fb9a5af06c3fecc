"""The phase reports a person reads: each case's claim, why a failed check failed (results/explain.py), performance
targets drawn MISSED, every line within the terminal's width, and progress while a long stage runs
(results/progress.py, on a fake clock).

The evidence shapes below are copied from the run records of the injected-bug self-tests (their ``wp<N>_stats``
and facts), so each explanation is shown firing on what a real bug leaves, and silent on a correct run's numbers.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from snapproof.results.explain import EXPLANATIONS, explain
from snapproof.results.progress import Progress, ProgressDisplay, progress_line
from snapproof.results.record import FAIL_MARK, SCHEMA, TARGETS, CaseReport, PhaseReport, render_phase
from snapproof.results.schema import RECORD, problems

from tests.results_child import run_tiny_phase, write_tiny_phase

ROOT = Path(__file__).resolve().parent.parent
BASELINES = sorted((ROOT / "results" / "baselines").glob("*.yaml"))
ENGINE = "snapproof-builtin 1.0 (libsnapproof-builtin.so, sha256 a219ca939eb6)"


def _case(facts: dict, outcome: str = "failed") -> dict:
    return {"test": "test_x[1MiB]", "nodeid": "phases/test_phase9.py::test_x[1MiB]", "claim": "c", "outcome": outcome,
            "duration_ns": 1, "stages": [], "facts": facts, "failure": "AssertionError: [stage 5] ..."}


def _stats(**counters: object) -> dict:
    return {"engine": ENGINE, "faults": 1, "fault_pages": 1, "bulk_pages": 0, "handler_alive": True,
            "handler_err": 0, "arm_ns": 31887, **counters}


# -- why a check failed --------------------------------------------------------------------------------------------

# Each explanation: the evidence a real injected bug left (the self-test and switch it came from), words it must
# say, and evidence a correct run leaves, on which it must stay silent.
EVIDENCE = {
    "fault served without a copy": (
        # phase 1, --inject no-copy-before-write: the exact-page case
        _case({"handler_cpu": 1, "vcpu_cpu": 0, "wp1_stats": _stats(fault_pages=0)}),
        "1 write-protect fault was served but no page was copied before the write",
        [_case({"wp1_stats": _stats()}),  # the same case, fault captured
         # a lined-up race with a correct engine: the fault waited for the copier, which captured every page
         _case({"wp0_stats": _stats(bulk_pages=256, fault_pages=0, handler_alive=False)})]),
    "fault handler stopped": (
        # phase 1, --inject handler-dies
        _case({"wp1_stats": _stats(faults=0, fault_pages=0, handler_alive=False, handler_err=125)}),
        "fault handler thread stopped with errno 125 (ECANCELED: Operation canceled",
        [_case({"wp1_stats": _stats(handler_alive=False)})]),  # finalized: stopped, asked to
    "holes left unprotected": (
        # phase 1, --inject skip-unpopulated: the anonymous hole case
        _case({"hole_protection": "NONE", "wp1_stats": _stats(faults=0, fault_pages=0)}),
        "neither UFFD_FEATURE_WP_UNPOPULATED nor the holes populated first (hole_protection: NONE)",
        [_case({"hole_protection": "WP_UNPOPULATED"}), _case({"hole_protection": "POPULATE_BEFORE_ARM"})]),
    "armed without a pause": (
        # phase 2, --inject arm-while-running: the 64 MiB memfd case
        _case({"pages_by_fault": 318, "pages_by_bulk_copy": 16066, "pause_ns": 0, "mem_size": 67108864,
               "wp1_stats": _stats(faults=326, fault_pages=318, bulk_pages=16066, handler_alive=False)}),
        "the vCPUs were not paused around the arm (pause_ns: 0)",
        [_case({"pages_by_fault": 0, "pages_by_bulk_copy": 256, "pause_ns": 1237927, "mem_size": 1048576}),
         # phase 5's table names a pause per strategy
         _case({"pause_ns": {"stop-and-copy": 17501636, "wp-copy-before-write": 7024717}})]),
}


def test_every_explanation_in_the_table_is_shown_firing_and_silent():
    assert sorted(EVIDENCE) == sorted(e.name for e in EXPLANATIONS)


@pytest.mark.parametrize("name", sorted(EVIDENCE))
def test_an_explanation_fires_on_its_evidence_and_stays_silent_on_a_correct_runs(name):
    entry = next(e for e in EXPLANATIONS if e.name == name)
    fires, words, consistent = EVIDENCE[name]
    said = entry.says(fires)
    assert len(said) == 1 and words in said[0], said
    assert words in " ".join(explain(fires))
    for case in consistent:
        assert entry.says(case) == [], f"{name} spoke on consistent evidence {case['facts']}: {entry.says(case)}"


def test_explanations_are_for_failures_only_and_name_the_engine_object_when_there_are_several():
    fires = EVIDENCE["fault served without a copy"][0]
    assert explain({**fires, "outcome": "passed"}) == []
    two = _case({"wp0_stats": _stats(), "wp3_stats": _stats(fault_pages=0)})
    assert [s.split(":")[0] for s in explain(two)] == ["engine object wp3"], explain(two)


def test_a_failure_shows_its_explanation_under_it_in_the_report():
    case = copy.deepcopy(EVIDENCE["fault served without a copy"][0])
    text = render_phase({"phase": 1, "title": "WP catches writes", "outcome": "FAIL", "duration_ns": 1,
                         "cases": [case]})
    lines = text.splitlines()
    failure = next(i for i, line in enumerate(lines) if line.strip().startswith("failure:"))
    assert lines[failure + 1].strip().startswith("why: 1 write-protect fault was served"), text


# -- the claim -------------------------------------------------------------------------------------------------------

def _phase(*cases: dict, outcome: str = "PASS") -> dict:
    return {"phase": 3, "title": "round-trip restore", "outcome": outcome, "duration_ns": 1, "cases": list(cases)}


def test_the_claim_is_printed_under_its_case_proven_when_it_passed():
    passed = CaseReport("n1", "test_passes", doc="The snapshot file restores into a fresh VM.", outcome="passed")
    failed = CaseReport("n2", "test_fails", doc="The file never changes.", outcome="failed", failure="x")
    phase = _phase(passed.to_dict(), failed.to_dict(), outcome="FAIL")
    full = render_phase(phase).splitlines()
    assert full[full.index(next(x for x in full if "test_passes" in x)) + 1] == \
        "    proven: The snapshot file restores into a fresh VM."
    assert "    claim: The file never changes." in full
    # Short: a passed case is one line; a failed one still says what it set out to prove.
    short = render_phase(phase, verbose=False)
    assert "proven:" not in short and "    claim: The file never changes." in short.splitlines()


# -- targets ---------------------------------------------------------------------------------------------------------

def test_a_missed_target_is_drawn_missed_in_its_stage_and_counted_yet_the_phase_passes():
    case = CaseReport("n", "test_sequence[1MiB]", doc="c", outcome="passed")
    with case.stage("re-run") as st:
        st.timing("sequence", 7.3e6)
        assert st.target("capture to re-run at 1 MiB", 7.3e6, 5e6, "ns") is False
    with case.stage("comparison") as st:
        assert st.target("stop-and-copy's pause over WP's", 31.2, 20, "x", better="higher") is True
    phase = PhaseReport(3, "round-trip restore", [case]).to_dict()
    assert phase["outcome"] == "PASS"
    lines = render_phase(phase).splitlines()
    assert "PASS, 1 target MISSED" in lines[0] and lines[1] == "  (1 passed; 1 target MISSED)", lines[:2]
    missed = next(i for i, x in enumerate(lines) if "MISSED target:" in x)
    assert "[stage 1] re-run" in lines[missed - 1] or "[stage 1] re-run" in lines[missed - 2], lines
    assert lines[missed].strip() == "MISSED target: capture to re-run at 1 MiB <= 5.0 ms, saw 7.3 ms"
    assert any(x.strip() == "target met: stop-and-copy's pause over WP's >= 20x, saw 31.2x" for x in lines), lines
    # Short: the passed case is one line, and its missed target under it.
    short = render_phase(phase, verbose=False).splitlines()
    assert short[3].strip().startswith("MISSED target: capture to re-run") and "target met" not in " ".join(short)
    # The record keeps them in the case's facts (an open mapping of the schema): nothing new to validate.
    assert [t["met"] for t in case.facts[TARGETS]] == [False, True] and case.facts[TARGETS][0]["stage"] == 1


def test_a_target_refuses_what_it_cannot_judge():
    case = CaseReport("n", "t")
    with pytest.raises(ValueError, match="target unit 'ms'"):
        case.target("x", 1, 2, "ms")
    with pytest.raises(ValueError, match="better='faster'"):
        case.target("x", 1, 2, "ns", better="faster")
    with pytest.raises(ValueError, match="finite"):
        case.target("x", float("nan"), 2, "ns")


# -- the terminal's width --------------------------------------------------------------------------------------------

def _long_case() -> dict:
    """Everything a case line can carry, each part longer than a line."""
    case = CaseReport("phases/test_phase2.py::x", "test_a_race_lined_up_on_one_page_leaves_the_snapshot_at_the_arm_"
                      "instant[write-during-bulk-copy-host-write]", doc="A race " * 40, outcome="failed",
                      failure="AssertionError: [stage 4] snapshot vs memory at the arm: " + "1 pages differ " * 20)
    with case.stage("a stage whose name is longer than its column in the report") as st:
        st.check(True, "a check whose text runs on: " + "pages carrying PM_UFFD_WP in /proc/self/pagemap, " * 5)
        st.timing("bulk copy", 1.07e9, "1.00 GB/s = 0.12x warm memcpy (8.4 GB/s), guest running; " * 3)
        st.note("sha256 " + "a219ca939eb63227c7a36b3e70327e5d" * 4)  # a word longer than any line
        st.note(f"{'strategy':<22}{'pause':>9}{'total':>9}{'bytes/mem':>10}  exact  instant")
        st.target("time to the first instruction at 4 GiB (median)", 9e6, 5e6, "ns",
                  source="Firecracker's restore target, flat as size grows")
    case.fact("wp1_stats", _stats(fault_pages=0))
    case.measurement_error("copy_rate_ratio_to_memcpy", 4.7, "a copy 4.70x as fast as this host's warm memcpy " * 2)
    return case.to_dict()


@pytest.mark.parametrize("width", [60, 80, 120])
@pytest.mark.parametrize("verbose", [True, False], ids=["full", "short"])
def test_every_report_line_fits_the_width(width, verbose):
    """The committed baseline's every phase, and a failed case carrying every part at its longest."""
    phases = [p for path in BASELINES for p in yaml.safe_load(path.read_text())["phases"]]
    phases.append({**_phase(_long_case(), outcome="FAIL"),
                   "deselected": [{"test": "test_benchmark_pause_window[64MiB-precopy-wp-async]", "nodeid": "n",
                                   "reason": "uffd.WP_ASYNC unavailable, not required by host class " * 5}]})
    assert phases and BASELINES, "no committed baseline to render"
    for phase in phases:
        text = render_phase(phase, verbose=verbose, width=width)
        over = [line for line in text.splitlines() if len(line) > width]
        assert not over, f"phase {phase['phase']}: {len(over)} lines past {width} columns, first: {over[0]!r}"
    wrapped = render_phase(phases[-1], width=width)
    assert "why: 1 write-protect fault" in wrapped and "MISSED target:" in wrapped and FAIL_MARK not in wrapped


PHASE = '''
import pytest

pytestmark = pytest.mark.phase(9, "report self-test with a title long enough to need every column it can get")


@pytest.mark.parametrize("p", ["with-parameters"])
def test_a_case_whose_name_is_longer_than_any_terminal_line_the_report_may_be_printed_on(report, p):
    """This case proves that a claim longer than one line wraps under its label, indented, instead of running off."""
    with report.stage("a stage whose name does not fit the label column") as st:
        st.check(True, "a check whose text is long enough to wrap at eighty columns and then some more words")
        st.target("restore to the first instruction", 9e6, 5e6, "ns")


def test_fails_with_the_engines_evidence(report):
    """A fault served without its page copied is explained in words."""
    report.fact("wp1_stats", {"faults": 1, "fault_pages": 0, "bulk_pages": 0, "handler_err": 0})
    with report.stage("snapshot vs live") as st:
        st.equal(0x0, 0xBE, "snapshot[0x1000] (BEFORE)")
'''


def test_a_run_prints_its_report_within_the_terminals_width(tmp_path):
    """A child pytest at COLUMNS=80 (pytest's own width): every line of its phase report fits, the claim, the missed
    target and the explanation included; the explanation is in pytest's failure report too."""
    proc = run_tiny_phase(write_tiny_phase(tmp_path, PHASE), "--reports", "full", "--results-dir", "runs",
                          COLUMNS="80")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failures, report = proc.stdout.split("snapproof phase reports")
    assert "why: 1 write-protect fault was served but no page was copied before the write" in failures, failures
    lines = report.split("short test summary")[0].splitlines()[1:]
    over = [line for line in lines if len(line) > 80]
    assert not over, f"{len(over)} report lines past 80 columns: {over}"
    text = " ".join(" ".join(lines).split())  # wrapped lines joined again
    assert "proven: This case proves that a claim longer than one line wraps" in text, text
    assert "MISSED target: restore to the first instruction <= 5.0 ms, saw 9.0 ms" in text, text
    assert "why: 1 write-protect fault" in text and "FAIL, 1 target MISSED" in text, text
    records = list((tmp_path / "runs").glob("*.yaml"))
    assert len(records) == 1 and problems(yaml.safe_load(records[0].read_text()), RECORD) == []


# -- progress --------------------------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _display(tty: bool, column: int = 7) -> tuple[ProgressDisplay, Clock, list[str]]:
    clock, out = Clock(), []
    return ProgressDisplay(out.append, tty, width=lambda: 120, column=lambda: column, clock=clock), clock, out


def test_progress_on_a_terminal_waits_the_grace_then_redraws_in_place_at_most_4_times_a_second():
    display, clock, out = _display(tty=True)
    display.now_running("test_live[4GiB-1vcpu]", "[stage 1] storm guest running")
    progress = Progress(4 << 30, "first sweep", clock=clock)
    display.attach(progress)
    clock.now += 2.9
    display.tick()
    assert out == [], "drawn before the stage ran a few seconds"
    clock.now += 0.1
    progress(1 << 30)  # the first count starts the rate's clock
    clock.now += 1.0
    display.tick()
    assert len(out) == 1 and out[0].startswith("\n  test_live[4GiB-1vcpu] [stage 1] storm guest running: first sweep "
                                               "1.00/4.00 GiB (25%), 1.07 GB/s, 4 s"), out
    for _ in range(10):  # ticked far more often than it may draw: a redraw at the 5th and the 10th tick
        clock.now += 0.06
        display.tick()
    assert len(out) == 3 and all(line.startswith("\r") for line in out[1:]), out
    display.now_running("test_live[4GiB-1vcpu]", "after [stage 1]")
    assert out[-1] == "\r\x1b[2K\x1b[1A\x1b[8G", "the line is erased and the cursor put back after pytest's 7 columns"
    display.tick()
    assert len(out) == 4, "a new activity waits its own grace"


def test_progress_into_a_log_writes_one_line_every_10_s_at_most_and_none_for_a_short_stage():
    display, clock, out = _display(tty=False)
    display.now_running("test_x", "[stage 2] short")
    clock.now += 9.9
    display.tick()
    display.now_running("test_x", "[stage 3] long")
    for _ in range(305):  # 30.5 s in ticks of 0.1 s
        clock.now += 0.1
        display.tick()
    assert len(out) == 3, out
    assert out[0].startswith("\n  test_x [stage 3] long: 10 s") and out[1] == "  test_x [stage 3] long: 20 s\n", out
    assert all("\x1b" not in line and "\r" not in line for line in out), "cursor movement into a log"
    display.idle()
    assert len(out) == 3, "nothing to erase in a log"


def test_a_polled_progress_is_asked_by_the_display_and_a_failing_poll_only_loses_the_bytes():
    display, clock, out = _display(tty=True)
    display.now_running("t", "[stage 2] live snapshot")
    captured = [0]
    display.attach(Progress(1 << 30, "captured", poll=lambda: captured[0], clock=clock))
    captured[0] = 256 << 20
    clock.now += 4
    display.tick()
    assert "captured 0.25/1.00 GiB (25%), 67 MB/s, 4 s" in out[-1], out

    def broken() -> int:
        raise ValueError("WP snapshot is closed")

    display.attach(Progress(1 << 30, "captured", poll=broken, clock=clock))
    clock.now += 1
    display.tick()
    assert out[-1].endswith("[stage 2] live snapshot: 5 s\x1b[K"), out


def test_a_progress_line_fits_the_width_shortening_the_case_name_first():
    p = Progress(4 << 30, "hashed", clock=lambda: 0.0)
    p.done = 3 << 30
    line = progress_line("test_original_sequence_reruns_in_a_fresh_vm_from_the_file[4GiB-read-copy]",
                         "[stage 3] content check", 12.0, p.done, p, 6.0, 100)
    assert len(line) == 99 and line.startswith("  test_") and line.endswith(
        "...[4GiB-read-copy] [stage 3] content check: hashed 3.00/4.00 GiB (75%), 537 MB/s, 12 s"), line
    narrow = progress_line("test_original_sequence_reruns_in_a_fresh_vm_from_the_file[4GiB-read-copy]",
                           "[stage 3] content check", 12.0, p.done, p, 6.0, 60)
    assert len(narrow) == 59 and narrow.startswith("   [stage 3] content check: hashed 3.00/4.00 GiB"), narrow


def test_a_stage_tells_the_display_what_runs_and_hands_out_its_progress():
    display, clock, out = _display(tty=True)
    case = CaseReport("n", "test_restore[4GiB]", display=display)
    with case.stage("restore (read-copy)") as st:
        progress = st.progress(4 << 30, "read")
        progress(1 << 30)
        clock.now += 5
        display.tick()
        assert "test_restore[4GiB] [stage 1] restore (read-copy): read 1.00/4.00 GiB (25%)" in out[-1], out
    assert out[-1].startswith("\r\x1b[2K"), "the stage's end erases its line"
    assert display._running is not None and display._running.activity == "after [stage 1]"
    # Without a display (a report outside a run) a progress still counts, and nothing is drawn.
    bare = CaseReport("n", "t")
    with bare.stage("s") as st:
        counted = st.progress(10)
        counted(4)
    assert counted.done == 4


def test_the_display_thread_ends_with_stop():
    display, _, out = _display(tty=True)
    display.start()
    thread = display._thread
    assert thread is not None and thread.is_alive()
    display.stop()
    assert not thread.is_alive() and out == []


def test_a_record_with_targets_is_valid_against_the_schema():
    case = CaseReport("n", "t", outcome="passed")
    case.target("x", 1.0, 2.0, "x")
    record = {"schema": SCHEMA,
              "run": {"started": "2026-12-01T00:00:00+00:00", "duration_s": 1.0, "argv": [], "strict_host": True,
                      "inject": "none", "engine": None, "git_commit": "abc", "policy": {}, "background_load": {},
                      "status": "complete", "tests": {"selected": 1, "finished": 1}},
              "host": {"hostname": "h"}, "capabilities": [],
              "phases": [PhaseReport(3, "t", [case]).to_dict()], "benchmarks": []}
    assert problems(record, RECORD) == []
