"""Phase 5 can fail: with the engine's copy-before-write switched off, the WP strategy's snapshot fails the
oracles while the three strategies that do not use the engine still pass, and the table says which."""

from __future__ import annotations

from tests.phase_runner import run_phase

PHASE5 = "test_phase5_snapshot_strategies.py"
COMPARISON = "test_every_strategy_snapshots_the_running_guest_consistently[64MiB]"
ORACLES = ("exact oracle", "instant oracle")


def test_phase5_passes_without_injection():
    """The control: the 64 MiB comparison passes with no switch set, every strategy exact and at one instant."""
    run = run_phase(PHASE5, "-k", "consistently and 64MiB")
    assert run.returncode == 0, run.output
    rows = run.cases()[COMPARISON]["facts"]["strategies"]
    assert [(r["strategy"], r["exact"], r["instant"]) for r in rows] == [
        (s, True, True) for s in ("stop-and-copy", "wp-copy-before-write", "precopy-wp-async", "precopy-kvm-dirty-log")]


def test_phase5_catches_a_wp_engine_without_copy_before_write():
    """no-copy-before-write: the WP strategy's stage fails at an oracle, the other strategies' stages pass."""
    run = run_phase(PHASE5, "-k", "consistently and 64MiB", inject="no-copy-before-write")
    case = run.cases()[COMPARISON]
    assert case["outcome"] == "failed", run.output
    assert "wp-copy-before-write" in case["failure"] and any(o in case["failure"] for o in ORACLES), case["failure"]
    stages = {s["name"]: s["ok"] for s in case["stages"]}
    assert stages["wp-copy-before-write"] is False
    assert all(stages[s] for s in ("stop-and-copy", "precopy-wp-async", "precopy-kvm-dirty-log")), stages
    wp_row = next(r for r in case["facts"]["strategies"] if r["strategy"] == "wp-copy-before-write")
    assert not (wp_row["exact"] and wp_row["instant"]), wp_row
