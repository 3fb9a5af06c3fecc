"""The run record's life (results/plugin.py): its path fixed and printed at the start, written from the start
as incomplete and as each case finishes, complete and pointed at by ``latest`` only at a whole run's end;
pytest-xdist refused while a record is wanted; and every record a run writes valid against results/schema.py.

Most tests run a child pytest over a tiny phase of its own in tmp_path (the results plugins alone, no KVM
needed), so a time-out's ``os._exit`` ends the child, never this run; one runs real phases, so a key the
plugin writes that the schema does not know (or the reverse) fails here, not in a release gate.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from snapproof.native.wp import ENGINE_NEEDS
from snapproof.results.load import incompleteness, load_record
from snapproof.results.schema import RECORD, problems

from tests.phase_runner import run_phase
from tests.results_child import run_tiny_phase, write_tiny_phase

PHASE = '''
import time

import pytest

pytestmark = pytest.mark.phase(9, "record self-test")


def test_first_case_finishes(report):
    """Passes, with a figure."""
    report.figure("round_trip_ns", [10, 11, 12, 11, 10], "ns")


def test_second_case_hangs():
    """Sleeps past the child's --timeout: pytest-timeout's thread method ends the process with os._exit(1)."""
    time.sleep(60)


def test_third_case_never_starts():
    """Would pass, had the run got here."""
'''


def _child(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run_tiny_phase(project, "--reports", "none", *args)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write_tiny_phase(tmp_path, PHASE)


def test_a_run_ended_by_a_time_out_leaves_its_record_incomplete_with_what_finished(project):
    """pytest-timeout's os._exit ends the run mid-case: the record printed at the start holds the finished case,
    the rest 'not run', status incomplete; no 'latest' points at it, and the gate's reader says why."""
    proc = _child(project, "--timeout", "3", "--timeout-method", "thread", "--results-dir", "runs")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    started = [i for i, line in enumerate(lines) if line.startswith("run record: runs/")]
    # The path whole on its line (to be pasted); what follows it on the same line or, wrapped, the next.
    assert len(started) == 1 and "written now as incomplete" in " ".join(lines[started[0]:started[0] + 2]), \
        proc.stdout
    started = [lines[started[0]]]
    path = project / started[0].split()[2]
    rec = load_record(path)
    assert rec["run"]["status"] == "incomplete" and rec["run"]["tests"] == {"selected": 3, "finished": 1}
    cases = {c["test"]: c for c in rec["phases"][0]["cases"]}
    assert cases["test_first_case_finishes"]["outcome"] == "passed"
    assert cases["test_first_case_finishes"]["figures"]["round_trip_ns"]["samples"] == [10, 11, 12, 11, 10]
    assert cases["test_second_case_hangs"]["outcome"] == "not run"
    assert rec["phases"][0]["outcome"] == "INCOMPLETE"
    assert not (project / "runs" / "latest").exists(), "an incomplete run moved the 'latest' pointer"
    why = incompleteness(rec)
    assert why is not None and why.startswith("status incomplete") and "1 of 3 tests finished" in why \
        and "test_second_case_hangs" in why, why


def test_only_a_complete_run_moves_latest_and_results_file_names_the_record(project):
    """--results-file fixes the record's path, printed at the start and the end; a complete run points 'latest'
    at it, and a later incomplete run beside it does not move the pointer."""
    proc = _child(project, "-k", "not hangs", "--results-file", "runs/whole.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("run record:")] == \
        ["runs/whole.yaml", "runs/whole.yaml"], proc.stdout
    latest = project / "runs" / "latest"
    assert latest.is_symlink() and os.readlink(latest) == "whole.yaml"
    rec = yaml.safe_load(latest.read_text())
    assert rec["run"]["status"] == "complete" and rec["run"]["tests"] == {"selected": 2, "finished": 2}
    assert rec["run"]["record"] == str(project / "runs" / "whole.yaml")

    proc = _child(project, "--timeout", "3", "--timeout-method", "thread", "--results-file", "runs/cut.yaml")
    assert proc.returncode == 1 and load_record(project / "runs" / "cut.yaml")["run"]["status"] == "incomplete"
    assert os.readlink(latest) == "whole.yaml"


def test_xdist_is_refused_at_the_start_while_a_record_is_wanted(project):
    """-n 2 with a record to write stops at once (usage error, exit 4) saying why; with no record it runs."""
    pytest.importorskip("xdist", reason="pytest-xdist (the dev extra) is not installed")
    proc = _child(project, "-n", "2", "-k", "not hangs", "--results-dir", "runs")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "pytest-xdist (-n/--dist) and a run record do not mix" in proc.stderr, proc.stderr
    assert not (project / "runs").exists()
    proc = _child(project, "-n", "2", "-k", "not hangs", "--results-dir", "")
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.needs("kvm", *ENGINE_NEEDS)
def test_a_real_run_of_phases_writes_a_record_valid_against_the_schema():
    """Phases 0, 1 and 6 run for real (a benchmark's figures, the engine, the host's policy class, a background
    load and what others took of the host, and on a host that lacks a capability its class does not require,
    deselected cases): the record the plugin writes is a complete run and valid against results/schema.py, key for
    key."""
    run = run_phase("test_phase0_host.py", "phases/test_phase1_wp_catches_writes.py",
                    "phases/test_phase6_incremental.py", "-k", "phase0 or (arm_cost and 1MiB) or (phase6 and 1MiB)",
                    "--background-load", "cpu", benchmarks=True)
    assert run.returncode == 0, run.output[-3000:]
    bad = problems(run.record, RECORD)
    assert bad == [], "the plugin wrote keys the schema does not know, or left out what it requires:\n  " + \
        "\n  ".join(bad)
    rec = run.record["run"]
    assert rec["status"] == "complete" and rec["engine"]["builtin"] is True and rec["background_load"] == \
        {"kinds": ["cpu"], "seconds": 3600.0}, rec
    assert not [c["test"] for c in run.cases().values() if c["outcome"] != "not run" and "host_busy" not in c], \
        "a phase case that ran has no host_busy"
    arm = run.cases()["test_benchmark_arm_cost[1MiB]"]
    assert {"arm_ns", "arm_ratio_to_raw_ioctl", "raw_writeprotect_ns", "round_ns"} <= set(arm["figures"]), arm
    print(f"validated: {len(run.cases())} cases, deselected for this host: {sorted(run.deselected()) or 'none'}")


def test_latest_goes_back_when_its_record_is_rewritten_as_not_complete(tmp_path):
    """A signal after the end's complete record (results/interrupts.py: the session's last moments) rewrites it
    as interrupted: 'latest' then names the complete run before it again, or nothing when there was none."""
    from snapproof.results.plugin import _point_latest, _unpoint_latest

    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("first\n")
    second.write_text("second\n")
    latest = tmp_path / "latest"
    assert _point_latest(first) == "" and os.readlink(latest) == "first.yaml"
    before = _point_latest(second)
    assert before == "first.yaml" and os.readlink(latest) == "second.yaml"
    _unpoint_latest(second, before)
    assert os.readlink(latest) == "first.yaml", "the pointer did not go back to the last complete run"
    _unpoint_latest(second, "")  # names another record now: left alone
    assert os.readlink(latest) == "first.yaml"
    _unpoint_latest(first, "")
    assert not latest.exists() and not latest.is_symlink(), "a pointer to no complete run was left behind"
