"""Phase 5 can fail: with the engine's copy-before-write switched off, the WP strategy's snapshot fails the
oracles while the strategies that do not use the engine still pass, and the table says which.

A strategy this host cannot run (native.strategies.STRATEGY_NEEDS: WP_ASYNC and PAGEMAP_SCAN before kernel
6.7) is left out of the child's comparison, which must say why; its control case here is deselected naming
the same capability.
"""

from __future__ import annotations

import pytest

from native.strategies import STRATEGIES, STRATEGY_NEEDS, WP_COPY_BEFORE_WRITE
from tests.phase_runner import PhaseRun, run_phase

PHASE5 = "test_phase5_snapshot_strategies.py"
COMPARISON = "test_every_strategy_snapshots_the_running_guest_consistently[64MiB]"
ORACLES = ("exact oracle", "instant oracle")

pytestmark = pytest.mark.needs(*STRATEGY_NEEDS[WP_COPY_BEFORE_WRITE])


@pytest.fixture(scope="module")
def control() -> PhaseRun:
    """The 64 MiB comparison with no switch set, run once for every strategy's control case."""
    return run_phase(PHASE5, "-k", "consistently and 64MiB")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_phase5_passes_without_injection(control, strategy):
    """The control: the 64 MiB comparison passes with no switch set, this strategy exact and at one instant."""
    assert control.returncode == 0, control.output
    assert control.outcome(COMPARISON) == "passed", control.failure(COMPARISON)
    facts = control.cases()[COMPARISON]["facts"]
    rows = {r["strategy"]: r for r in facts["strategies"]}
    assert strategy in rows, f"{strategy}: not in the comparison's table; left out: {facts.get('strategies_left_out')}"
    assert (rows[strategy]["exact"], rows[strategy]["instant"]) == (True, True), rows[strategy]


def test_phase5_names_each_strategy_it_left_out(control, host, unavailable):
    """The comparison compares every strategy this host can run and names, with the missing capability, each
    one it cannot: none is dropped silently."""
    facts = control.cases()[COMPARISON]["facts"]
    left_out = facts.get("strategies_left_out", {})
    for strategy in STRATEGIES:
        why = unavailable(*STRATEGY_NEEDS[strategy])
        if why is None:
            assert strategy not in left_out, f"{strategy}: this host can run it, the child left it out: {left_out}"
            continue
        missing = [n for n in STRATEGY_NEEDS[strategy] if host.missing(n)]
        assert strategy in left_out and all(n in left_out[strategy] for n in missing), (
            f"{strategy}: this host lacks {missing}; expected the child to leave it out naming them, saw {left_out}")
        print(f"{strategy}: left out by the child: {left_out[strategy]}")
    compared = [r["strategy"] for r in facts["strategies"]]
    assert sorted(compared + list(left_out)) == sorted(STRATEGIES), f"compared {compared}, left out {list(left_out)}"


def test_phase5_puts_qemu_beside_the_strategies_or_says_why_not(control, unavailable):
    """Where QEMU runs, the comparison has its row (every byte of RAM sent) and each strategy's total over QEMU's;
    where it does not, the comparison names what is missing, and has no QEMU row."""
    facts = control.cases()[COMPARISON]["facts"]
    why = unavailable("qemu")
    if why is not None:
        assert "qemu" not in facts and "qemu" in facts.get("qemu_left_out", ""), facts.get("qemu_left_out")
        print(f"QEMU left out by the child: {facts['qemu_left_out']}")
        return
    row = facts.get("qemu")
    assert row is not None, f"this host runs QEMU, the child's comparison has no QEMU row: {sorted(facts)}"
    assert row["strategy"] == "qemu-background-snapshot" and row["bytes_ratio"] >= 1 and row["guest_writes"] > 0, row
    compared = [r["strategy"] for r in facts["strategies"]]
    assert sorted(facts["total_ratio_to_qemu"]) == sorted(compared), facts["total_ratio_to_qemu"]


def test_phase5_catches_a_wp_engine_without_copy_before_write():
    """no-copy-before-write: the WP strategy's stage fails at an oracle, the other strategies' stages pass."""
    run = run_phase(PHASE5, "-k", "consistently and 64MiB", inject="no-copy-before-write")
    case = run.cases()[COMPARISON]
    assert case["outcome"] == "failed", run.output
    assert "wp-copy-before-write" in case["failure"] and any(o in case["failure"] for o in ORACLES), case["failure"]
    stages = {s["name"]: s["ok"] for s in case["stages"]}
    assert stages[WP_COPY_BEFORE_WRITE] is False
    left_out = case["facts"].get("strategies_left_out", {})
    others = [s for s in STRATEGIES if s != WP_COPY_BEFORE_WRITE and s not in left_out]
    assert all(stages[s] for s in others), stages
    wp_row = next(r for r in case["facts"]["strategies"] if r["strategy"] == WP_COPY_BEFORE_WRITE)
    assert not (wp_row["exact"] and wp_row["instant"]), wp_row
