"""``--background-load``: the run starts its own busy neighbour, names it in the record, and leaves none behind."""

from __future__ import annotations

import pytest
from snapproof.results.load import load_record

from tests.phase_runner import run_phase
from tests.reliability_support import processes_naming
from tests.results_child import run_tiny_phase, write_tiny_phase

pytestmark = [pytest.mark.platform("linux")]

# An odd lifetime marks this test's load processes among every process on the host.
MARK_SECONDS = "3599.25"


def load_processes() -> list[int]:
    """Processes whose command line carries this test's load lifetime."""
    return processes_naming(b"time.monotonic() + " + MARK_SECONDS.encode())


def test_a_loaded_run_names_its_load_and_leaves_none_behind():
    """A phase run with ``--background-load cpu,memory`` passes, its record names the load, no load outlives it."""
    run = run_phase("test_phase0_host.py", "-k", "command_line", "--background-load", "cpu,memory",
                    "--background-load-memory", "0.02", "--background-load-seconds", MARK_SECONDS)
    assert run.returncode == 0, run.output
    assert run.record["run"]["background_load"] == {"kinds": ["cpu", "memory"], "seconds": float(MARK_SECONDS),
                                                    "memory_fraction": 0.02}, run.record["run"].get("background_load")
    assert load_processes() == [], f"load processes still running after the run: {load_processes()}"


def test_an_unknown_load_is_a_usage_error_naming_it():
    """``--background-load disk`` stops the run at once, naming the load and the ones there are."""
    run = run_phase("test_phase0_host.py", "--background-load", "disk")
    assert run.returncode == 4, run.output
    assert "--background-load: unknown load disk (choose from cpu, memory)" in run.output, run.output


# A case that outlives its run's load: it waits, with a deadline, until the load process has exited by itself.
OUTLIVES_ITS_LOAD = """
import time

import pytest
from snapproof.results.hostload import LOADS

pytestmark = pytest.mark.phase(9, "a run longer than its load's bound")


def test_outlives_the_load(request):
    loads = request.config.stash[LOADS]
    deadline = time.monotonic() + 60
    while any(load.proc.poll() is None for load in loads):
        assert time.monotonic() < deadline, "the load did not end by itself within 60 s of a 0.5 s bound"
        time.sleep(0.05)
"""


def test_a_load_that_ends_before_the_run_is_named_in_the_record_and_at_the_end(tmp_path):
    """A 0.5 s load under a run that goes on past it: the record lists it as ended, seen gone no sooner than its
    bound, with its exit status; the run's end says the rest ran unloaded."""
    run = run_tiny_phase(write_tiny_phase(tmp_path, OUTLIVES_ITS_LOAD), "--background-load", "cpu",
                         "--background-load-seconds", "0.5", "--results-dir", "runs")
    assert run.returncode == 0, run.stdout + run.stderr
    load = load_record(tmp_path / "runs" / "latest")["run"]["background_load"]
    assert [(e["kind"], e["returncode"]) for e in load.get("ended", [])] == [("cpu", 0)], load
    assert load["ended"][0]["seen_gone_after_s"] >= 0.5, load
    said = " ".join(run.stdout.split())
    assert "background load: cpu" in said and "before the run did: what ran after it ran unloaded" in said, \
        run.stdout


def test_a_bound_that_is_not_a_positive_time_is_a_usage_error_naming_it():
    """``--background-load-seconds 0`` would start a load that is gone at once: the run stops, naming the option."""
    run = run_phase("test_phase0_host.py", "--background-load", "cpu", "--background-load-seconds", "0")
    assert run.returncode == 4, run.output
    assert "--background-load-seconds 0.0: the load's bound must be a positive time" in run.output, run.output
