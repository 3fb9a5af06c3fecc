"""Phase 1 can fail: each engine switch that reproduces a real bug makes the phase FAIL, naming it."""

from __future__ import annotations

from tests.phase_runner import run_phase

PHASE1 = "test_phase1_wp_catches_writes.py"
EXACT_PAGE = "test_guest_write_is_caught_at_the_exact_page_before_it_lands[1MiB]"
ANON_HOLE = "test_write_to_a_never_populated_page_is_caught[anonymous]"


def test_phase1_passes_without_injection(host):
    """The control: the same selection passes with no switch set, the hole caught by the mechanism this kernel
    offers (WP_UNPOPULATED's pte marker, or the engine populating holes before the arm)."""
    run = run_phase(PHASE1, "-k", "1MiB or anonymous")
    assert run.returncode == 0, run.output
    assert run.outcome(EXACT_PAGE) == "passed"
    assert run.outcome(ANON_HOLE) == "passed", run.failure(ANON_HOLE)
    want = "WP_UNPOPULATED" if host.missing("uffd.WP_UNPOPULATED") is None else "POPULATE_BEFORE_ARM"
    seen = run.cases()[ANON_HOLE]["facts"].get("hole_protection")
    assert seen == want, f"hole protection proven: expected {want} on this kernel, saw {seen}"


def test_no_copy_before_write_fails_the_snapshot_check():
    """Un-protecting without capturing lets 0x42 land first: the snapshot no longer holds 0xBE."""
    run = run_phase(PHASE1, "-k", "1MiB", inject="no-copy-before-write")
    assert run.returncode == 1, run.output
    assert run.outcome(EXACT_PAGE) == "failed"
    assert "snapshot[0x1000] (BEFORE): expected 0xbe, saw 0x0" in run.failure(EXACT_PAGE)
    # The failed case's record carries the evidence: the vCPU's registers and the engine's handler stats.
    facts = run.cases()[EXACT_PAGE]["facts"]
    regs = next(v for k, v in facts.items() if k.endswith("_regs"))
    assert regs["eip"] == "0x106", f"marker16 halted after its hlt at 0x105: expected EIP 0x106, saw {regs['eip']}"
    wp = next(v for k, v in facts.items() if k.endswith("_stats"))
    assert wp["faults"] == 1 and wp["fault_pages"] == 0, f"expected 1 fault that captured nothing, saw {wp}"
    # ... and the report says what that evidence means.
    assert "1 write-protect fault was served but no page was copied before the write" in run.why(EXACT_PAGE)


def test_arm_without_wp_unpopulated_fails_the_hole_check():
    """Arming without WP_UNPOPULATED and without pre-populating leaves the anonymous hole unprotected, on a kernel
    with WP_UNPOPULATED and on one without it alike."""
    run = run_phase(PHASE1, "-k", "anonymous", inject="skip-unpopulated")
    assert run.returncode == 1, run.output
    assert run.outcome(ANON_HOLE) == "failed"
    assert "the hole at 0x1000 is not write-protected" in run.failure(ANON_HOLE)
    assert "(hole_protection: NONE): a never-populated page has no page table entry" in run.why(ANON_HOLE)


def test_dead_handler_fails_phase1_naming_it_without_hanging():
    """A handler thread that dies at the first fault fails the phase, naming the dead handler: the case ends on the
    engine's error, not at the child's per-test time-out, which is what would end a hung case."""
    run = run_phase(PHASE1, "-k", EXACT_PAGE.split("[")[0] + " and 1MiB", inject="handler-dies")
    assert run.returncode == 1, run.output
    assert run.outcome(EXACT_PAGE) == "failed"
    assert "the WP fault handler thread died mid-snapshot" in run.failure(EXACT_PAGE), run.failure(EXACT_PAGE)
    assert "the engine's fault handler thread stopped with errno 125 (ECANCELED" in run.why(EXACT_PAGE)
