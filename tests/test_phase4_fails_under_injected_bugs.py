"""Phase 4 can fail: loading the snapshot through a read-only mapping fails it, naming the original bug."""

from __future__ import annotations

from tests.phase_runner import run_phase

PHASE4 = "test_phase4_cow_load.py"
MAIN = "test_guest_sees_its_writes_and_the_file_never_changes"


def test_phase4_passes_with_a_copy_on_write_mapping():
    """The control: the copy-on-write load passes."""
    run = run_phase(PHASE4, "-k", MAIN)
    assert run.returncode == 0, run.output
    assert run.outcome(MAIN) == "passed"


def test_read_only_mapping_fails_phase4_naming_the_original_bug():
    """Mapped read-only, the guest's first write exits as MMIO and the failure names hyperlight's bug."""
    run = run_phase(PHASE4, "-k", MAIN, inject="read-only-mapping")
    assert run.returncode == 1, run.output
    assert run.outcome(MAIN) == "failed"
    failure = run.failure(MAIN)
    assert "exited as KVM_EXIT_MMIO" in failure, failure
    assert "the original PAGE_READONLY + FILE_MAP_READ bug" in failure, failure
