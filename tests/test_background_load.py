"""``--background-load``: the run starts its own busy neighbour, names it in the record, and leaves none behind."""

from __future__ import annotations

import pytest

from tests.phase_runner import run_phase
from tests.reliability_support import processes_naming

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
    assert run.record["run"]["background_load"] == {"kinds": ["cpu", "memory"], "memory_fraction": 0.02}, \
        run.record["run"].get("background_load")
    assert load_processes() == [], f"load processes still running after the run: {load_processes()}"


def test_an_unknown_load_is_a_usage_error_naming_it():
    """``--background-load disk`` stops the run at once, naming the load and the ones there are."""
    run = run_phase("test_phase0_host.py", "--background-load", "disk")
    assert run.returncode == 4, run.output
    assert "--background-load: unknown load disk (choose from cpu, memory)" in run.output, run.output
