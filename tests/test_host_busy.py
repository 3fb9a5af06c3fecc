"""results/hostbusy.py: what others took of the host while a phase case ran, so a busy figure is never judged.

The accounting is proven on samples made by hand (the run's own processes and the kernel's threads left out, the
run's load counted, a reaped neighbour counted once, the thresholds, steal); the whole path on a child run whose
case waits until a real neighbour, its own ``--background-load cpu``, has spent CPU beside it.
"""

from __future__ import annotations

import os

import pytest
from snapproof.results import hostbusy
from snapproof.results.hostbusy import MIN_TICKS, TICK_HZ, Proc, Sample, measure, parse_stat
from snapproof.results.load import load_record
from snapproof.results.record import busy_count, render_phase
from snapproof.results.schema import RECORD, problems

from tests.results_child import run_tiny_phase, write_tiny_phase

RUN = 100  # the run's own pid in the hand-made samples


def proc(pid: int, ppid: int, ticks: int, name: str = "p", kthread: bool = False, start: int = 1) -> Proc:
    return Proc(pid, ppid, name, ticks, start, kthread)


def host(at: float, *procs: Proc, steal: int = 0) -> Sample:
    return Sample(at, {p.pid: p for p in procs}, steal)


def test_stat_is_read_past_a_name_holding_spaces_and_parentheses():
    """The name is whatever the process set: fields are counted after its last ')'."""
    fields = ["S", "7", *["0"] * 4, str(hostbusy.PF_KTHREAD), *["0"] * 4, "10", "20", "30", "40", *["0"] * 4, "555"]
    got = parse_stat(f"42 (a) b (c) {' '.join(fields)}")
    assert got == Proc(pid=42, ppid=7, name="a) b (c", ticks=100, start=555, kthread=True)


def test_the_runs_own_processes_and_kernel_threads_are_left_out_and_its_load_counted():
    """The run, its QEMU child and a kernel thread spend CPU; the run's load (its child too) and a stranger are
    counted, and only they are named."""
    before = host(0.0, proc(RUN, 1, 0), proc(101, RUN, 0, "qemu"), proc(102, RUN, 0, "load"),
                  proc(2, 0, 0, "kswapd0", kthread=True), proc(300, 1, 0, "stranger"))
    after = host(1.0, proc(RUN, 1, 90), proc(101, RUN, 80, "qemu"), proc(102, RUN, 60, "load"),
                 proc(2, 0, 70, "kswapd0", kthread=True), proc(300, 1, 20, "stranger"))
    got = measure(before, after, root=RUN, neighbours={102})
    assert got["other_cpus"] == round(80 / TICK_HZ, 3) and got["busy"]
    assert [(b["pid"], b["name"]) for b in got["busiest"]] == [(102, "load"), (300, "stranger")]


def test_a_neighbour_reaped_in_the_window_is_counted_once_through_its_parent():
    """A job that ran 30 ticks before the window and 10 in it, then was reaped: its parent's waited-for time grows
    by all 40, of which only the 10 in the window are counted; a pid reused by a new process starts from zero."""
    before = host(0.0, proc(RUN, 1, 0), proc(200, 1, 5, "make"), proc(201, 200, 30, "cc"),
                  proc(300, 1, 50, "old", start=1))
    after = host(1.0, proc(RUN, 1, 0), proc(200, 1, 5 + 40, "make"), proc(300, 1, 7, "new", start=99))
    got = measure(before, after, root=RUN, neighbours=set())
    assert {b["pid"]: b["cpu_s"] for b in got["busiest"]} == {200: round(10 / TICK_HZ, 3), 300: round(7 / TICK_HZ, 3)}


# The longest case over which MIN_TICKS are still a busy share of a CPU.
FLOOR_WALL = MIN_TICKS / TICK_HZ / hostbusy.BUSY_CPUS


@pytest.mark.parametrize(("wall", "ticks", "steal", "busy"), [
    (FLOOR_WALL / 100, MIN_TICKS - 1, 0, False),  # under the tick floor, whatever the share
    (FLOOR_WALL * 2, MIN_TICKS, 0, False),        # over the floor, under the share of a CPU
    (FLOOR_WALL, MIN_TICKS, 0, True),
    (FLOOR_WALL, 0, MIN_TICKS, True),             # a hypervisor below taking the CPUs is busy too
])
def test_busy_needs_both_a_share_of_a_cpu_and_the_tick_floor(wall, ticks, steal, busy):
    before = host(0.0, proc(RUN, 1, 0), proc(300, 1, 0))
    after = host(wall, proc(RUN, 1, 0), proc(300, 1, ticks), steal=steal)
    got = measure(before, after, root=RUN, neighbours=set())
    assert got["busy"] is busy, got
    assert got["busy_from_cpus"] == hostbusy.BUSY_CPUS and got["steal_cpus"] == round(steal / TICK_HZ / wall, 3)


def test_a_sample_of_this_host_finds_this_process_and_no_kernel_thread_in_its_tree():
    """The real /proc: this process is there, named, and its own tree holds no kernel thread."""
    now = hostbusy.sample()
    assert now is not None and os.getpid() in now.procs
    tree = hostbusy.own_tree(now.procs, os.getpid(), set())
    assert not [p for p in tree if now.procs[p].kthread]


def test_a_case_shorter_than_a_tenth_of_a_second_is_not_said_to_last_0_0_s():
    busy = {"wall_s": 0.038, "other_cpus": 1.05, "steal_cpus": 0.0, "busy": True, "busy_from_cpus": 0.1,
            "busiest": [{"pid": 4242, "name": "cc1plus", "cpu_s": 0.04}]}
    assert hostbusy.summary(busy).startswith("others took 1.05 CPU over 0.038 s (busy from 0.1 CPU)"), \
        hostbusy.summary(busy)


def test_the_report_says_host_busy_only_for_a_case_that_measured_something():
    """A busy case with a figure is drawn HOST BUSY naming who; one that timed nothing is only in the record."""
    busy = {"wall_s": 2.0, "other_cpus": 0.9, "steal_cpus": 0.0, "busy": True, "busy_from_cpus": 0.1,
            "busiest": [{"pid": 4242, "name": "cc1plus", "cpu_s": 1.8}]}
    case = {"test": "test_x", "nodeid": "n", "claim": "c", "outcome": "passed", "duration_ns": 1, "stages": [],
            "host_busy": busy}
    phase = {"phase": 9, "title": "t", "outcome": "PASS", "duration_ns": 1, "cases": [case]}
    assert "HOST BUSY" not in render_phase(phase)
    case["figures"] = {"round_ns": {"unit": "ns", "better": "lower", "median": 1.0, "samples": [1.0]}}
    assert "HOST BUSY: others took 0.90 CPU over 2.0 s (busy from 0.1 CPU): cc1plus (pid 4242) 1.80 s" in \
        " ".join(render_phase(phase).split())
    assert busy_count([phase]) == (1, 1)


# A phase case that waits until the run's own cpu load has spent LOAD_TICKS beside it: a neighbour for certain.
BESIDE_A_LOAD = """
import pytest
from snapproof.results.hostbusy import parse_stat
from snapproof.results.hostload import LOADS

from tests.reliability_support import wait_for

pytestmark = pytest.mark.phase(9, "a case beside a busy neighbour")


def test_beside_the_load(request, report):
    (load,) = request.config.stash[LOADS]

    def ticks() -> int:
        with open(f"/proc/{{load.proc.pid}}/stat") as f:
            return parse_stat(f.read()).ticks

    start = ticks()
    wait_for(lambda: ticks() - start >= {ticks}, "the load spending {ticks} ticks", timeout=60, interval=0.05)
    report.fact("load", {{"pid": load.proc.pid, "ticks": ticks() - start}})
    report.figure("round_trip_ns", [1, 2, 3], "ns")
"""
LOAD_TICKS = 50


def test_a_case_beside_a_busy_neighbour_is_recorded_busy_and_reported(tmp_path):
    """A child run with a cpu load, whose one case lasts until the load spent 50 ticks: the record's case is busy,
    others' CPU at least those ticks (less the record's rounding), the load named; the report says HOST BUSY and
    the run's end counts the case."""
    run = run_tiny_phase(write_tiny_phase(tmp_path, BESIDE_A_LOAD.format(ticks=LOAD_TICKS)),
                         "--background-load", "cpu", "--results-dir", "runs", "--reports", "full")
    assert run.returncode == 0, run.stdout + run.stderr
    rec = load_record(tmp_path / "runs" / "latest")
    assert problems(rec, RECORD) == []
    (case,) = rec["phases"][0]["cases"]
    busy = case["host_busy"]
    # Each of other_cpus and wall_s is rounded to 3 decimals: their product may fall short by that much.
    slack = 0.0005 * busy["wall_s"] + 0.0005 * busy["other_cpus"] + 0.0005 ** 2
    assert busy["busy"] and busy["other_cpus"] * busy["wall_s"] >= LOAD_TICKS / TICK_HZ - slack, busy
    # The load is named, unless a busier stranger on this host (another run) pushed it out of the busiest.
    load = case["facts"]["load"]
    assert load["pid"] in [b["pid"] for b in busy["busiest"]] or \
        min(b["cpu_s"] for b in busy["busiest"]) * TICK_HZ >= load["ticks"], (load, busy)
    said = " ".join(run.stdout.split())
    assert "HOST BUSY: others took" in said and "the gate judges none of its figures" in said, run.stdout
    assert "host busy during 1 of the 1 phase cases that measured something" in said, run.stdout
