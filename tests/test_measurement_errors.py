"""A benchmark that silently stops doing its work must not report a record.

Each benchmark round checks it did the work it timed (pages copied equal the pages in range, faults equal
writes, every page protected), and a figure past this host's own limit measured in the same run (a copy
faster than warm memcpy by LIMIT_SLACK) is marked a measurement error in the report and the record; the
gate refuses a run that has one.
"""

from __future__ import annotations

import pytest
from snapproof.native.engine import engine_path
from snapproof.native.wp import ENGINE_NEEDS
from snapproof.results.gate import evaluate, load_policy
from snapproof.results.record import MEASUREMENT_ERRORS, SCHEMA, CaseReport, render_phase
from snapproof.results.schema import POLICY_SCHEMA, RECORD, problems

from tests.phase_runner import run_phase

BULK = "test_benchmark_bulk_copy_rate[64MiB]"


def _record_with(case: dict) -> dict:
    return {"schema": SCHEMA,
            "run": {"started": "2026-12-01T00:00:00+00:00", "duration_s": 1.0, "argv": [], "strict_host": True,
                    "inject": "none", "engine": None, "git_commit": "abc", "policy": {}, "background_load": {},
                    "status": "complete", "tests": {"selected": 1, "finished": 1}},
            "host": {"hostname": "h", "kvm_module": "kvm_pvm", "kernel": "6.18", "platform": "linux"},
            "capabilities": [{"name": "kvm", "status": "PASS", "detail": ""}],
            "phases": [{"phase": 2, "title": "live snapshot consistency", "outcome": "PASS", "duration_ns": 1,
                        "cases": [case]}],
            "benchmarks": []}


def test_a_measurement_error_is_shown_recorded_and_refused_by_the_gate(tmp_path):
    """A case that marks a figure a measurement error shows it in the report even when it passed, keeps it in the
    record, and the gate fails the run naming it."""
    case = CaseReport("n", BULK, outcome="passed", duration_ns=1)
    case.fact("copy_rate_ratio_to_memcpy", 4.7)
    case.measurement_error("copy_rate_ratio_to_memcpy", 4.7, "a copy 4.70x as fast as this host's warm memcpy")
    record = _record_with(case.to_dict())
    assert problems(record, RECORD) == [], problems(record, RECORD)
    assert record["phases"][0]["cases"][0]["facts"][MEASUREMENT_ERRORS] == [
        {"figure": "copy_rate_ratio_to_memcpy", "value": 4.7, "why": "a copy 4.70x as fast as this host's warm memcpy"}]
    shown = render_phase(record["phases"][0], verbose=False)
    assert ("MEASUREMENT ERROR: copy_rate_ratio_to_memcpy = 4.7: a copy 4.70x as fast as this host's warm memcpy"
            in shown), shown
    policy = tmp_path / "gate.yaml"
    policy.write_text(f"schema: {POLICY_SCHEMA}\nclasses:\n  - name: sw\n    match: {{kvm_module: kvm_pvm}}\n"
                      "    required_phases: [2]\n")
    _, findings = evaluate(record, None, load_policy(policy))
    refused = [f.text for f in findings if not f.ok]
    assert refused == [f"phase 2 [{BULK}]: copy_rate_ratio_to_memcpy = 4.7 is a measurement error (a copy 4.70x as "
                       "fast as this host's warm memcpy): refused, not a record"], refused


@pytest.mark.needs("kvm", *ENGINE_NEEDS)
def test_a_bulk_copy_benchmark_that_stops_copying_is_caught():
    """An engine whose second arm leaves every page captured copies nothing in the benchmark's later rounds: the
    case fails naming the rounds that timed no work, and marks its copy rate a measurement error."""
    run = run_phase("test_phase2_live_consistency.py", "-k", "bulk_copy_rate and 64MiB", benchmarks=True,
                    engine=str(engine_path("naive-fixed-arm-keeps-captured")))
    assert run.outcome(BULK) == "failed", run.output[-3000:]
    failure = run.failure(BULK)
    # The first round copies every page; the arm that follows leaves them captured, so no later round copies any.
    assert "pages copied per round: [16384, 0, 0, 0, 0, 0, 0, 0, 0, 0], expected 16384 each: a round timed less " \
           "than the copy" in failure, failure
    # Marked by the rounds' own count, not by how fast they ran: on a loaded host the empty rounds' un-protect
    # ioctls can take long enough that the rate no longer looks past memcpy (seen under --background-load).
    errors = run.cases()[BULK]["facts"][MEASUREMENT_ERRORS]
    assert errors[0]["figure"] == "copy_rate_ratio_to_memcpy", errors
    assert "copied fewer than the 16384 pages they timed" in errors[0]["why"], errors
    print(f"{failure}\nmeasurement error: {errors[0]}")
