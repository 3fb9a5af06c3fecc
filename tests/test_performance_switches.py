"""The performance switches are regressions, not bugs: with all three on, every snapshot is still right.

So the phases that prove a snapshot pass under them, and only the release gate (their figures) can
catch them: results/README.md, "The gate's teeth".
"""

from __future__ import annotations

import pytest
from snapproof.native.inject import PERFORMANCE, FaultInjection

from tests.phase_runner import run_phase

ALL_THREE = "unprotect-per-page,extra-copy-per-fault,arm-per-page"


def test_the_performance_switches_are_the_three_named():
    """PERFORMANCE is exactly the switches named here (a new one joins the teeth measurement in results/ab.py)."""
    from snapproof.results.ab import PERF_SWITCHES

    names = {m.name.lower().replace("_", "-") for m in FaultInjection if m.value and m in PERFORMANCE}
    assert names == set(ALL_THREE.split(",")) == set(PERF_SWITCHES)


@pytest.mark.parametrize("module", ["test_phase1_wp_catches_writes.py", "test_phase2_live_consistency.py"])
def test_snapshots_stay_right_under_every_performance_switch(module):
    """Phases 1 and 2 (faults caught at the page, snapshots equal to memory at the arm) pass with all three on."""
    run = run_phase(module, "-k", "not benchmark", inject=ALL_THREE)
    # A case skipped for a missing host capability (hugepages not reserved) proves nothing either way.
    bad = {t: c.get("failure") for t, c in run.cases().items() if c["outcome"] in ("failed", "error")}
    ran = [t for t, c in run.cases().items() if c["outcome"] == "passed"]
    assert run.returncode == 0 and not bad and ran, f"{module} under {ALL_THREE}: {bad}\n{run.output[-3000:]}"
