"""Phase 6 can fail: a diff that trusts its tracker alone (``--inject diff-trusts-dirty-log``: the VMM's own
writes into guest memory, as device emulation makes them, are left out) restores to the wrong memory when the
tracker is KVM's dirty log, Firecracker's inconsistent diff snapshots (issue #1997), and the phase says which
pages are missing and who wrote them. The trackers that see the host's writes themselves still pass."""

from __future__ import annotations

import pytest

from tests.phase_runner import run_phase

PHASE6 = "test_phase6_incremental.py"
CHAIN = "test_chain_restores_to_the_full_snapshot_at_the_same_instant"
SELECT = "chain_restores and 1MiB"
KVM_CASE = f"{CHAIN}[1MiB-kvm-dirty-log]"
pytestmark = [pytest.mark.platform("linux")]


def tracker_cases(run) -> dict[str, dict]:
    return {name: case for name, case in run.cases().items() if name.startswith(CHAIN)}


def test_phase6_passes_without_injection():
    """The control: every tracker this host has restores its chain exactly; KVM's dirty log sees none of the
    host's writes, and the diffs hold them all the same."""
    run = run_phase(PHASE6, "-k", SELECT)
    assert run.returncode == 0, run.output
    cases = tracker_cases(run)
    assert run.outcome(KVM_CASE) == "passed", run.failure(KVM_CASE)
    outcomes = {name: case["outcome"] for name, case in cases.items()}
    assert all(o in ("passed", "skipped") for o in outcomes.values()), outcomes
    sees = cases[KVM_CASE]["facts"]["tracker_sees"]
    assert sees["host"][0] == 0 and sees["host_never_populated"][0] == 0 and sees["host"][1] > 0, sees
    assert sees["guest"][0] == sees["guest"][1] > 0, sees
    assert all(row["missing"] == 0 for row in cases[KVM_CASE]["facts"]["diffs"])


def test_diffs_without_the_vmms_own_writes_fail_the_kvm_dirty_log_chain_naming_them():
    """diff-trusts-dirty-log: KVM's dirty log case fails at its first restore, naming the host-written pages the
    diff lacks; every tracker that sees host writes itself still passes."""
    run = run_phase(PHASE6, "-k", SELECT, inject="diff-trusts-dirty-log")
    assert run.returncode == 1, run.output
    assert run.outcome(KVM_CASE) == "failed", f"{KVM_CASE}: {run.outcome(KVM_CASE)} with the host's writes left out"
    failure = run.failure(KVM_CASE)
    assert "restore (read-copy)" in failure and "restored by read-copy vs the full snapshot at pause 1" in failure \
        and "diff 1 lacks 16 pages written since its parent (16 by the host's device emulation, 0 by the guest; " \
            "8 never populated before)" in failure, failure
    rows = tracker_cases(run)[KVM_CASE]["facts"]["diffs"]
    assert [r["missing"] for r in rows] == [16, 16, 16], rows
    for name, case in tracker_cases(run).items():
        if name != KVM_CASE:
            assert case["outcome"] in ("passed", "skipped"), f"{name}: {case['outcome']}: {case.get('failure')}"
            if case["outcome"] == "passed":
                sees = case["facts"]["tracker_sees"]
                assert sees["host"][0] == sees["host"][1] > 0, f"{name} passed without seeing the host's writes: {sees}"
