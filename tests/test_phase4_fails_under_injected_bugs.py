"""Phase 4 can fail: loading the snapshot through a read-only mapping fails it, naming the original bug."""

from __future__ import annotations

from tests.phase_runner import run_phase

PHASE4 = "test_phase4_cow_load.py"
MAIN = "test_guest_sees_its_writes_and_the_file_never_changes"
# How each KVM reports the refused write, as Exit.describe() words it: an emulating KVM (kvm_pvm)
# exits with MMIO; hardware KVM fails KVM_RUN with EFAULT, and from 6.8 adds KVM_EXIT_MEMORY_FAULT.
REFUSED_WRITE_SIGNATURES = ("KVM_EXIT_MMIO write at GPA", "KVM_RUN failed with EFAULT",
                            "and KVM_EXIT_MEMORY_FAULT")


def test_phase4_passes_with_a_copy_on_write_mapping():
    """The control: the copy-on-write load passes."""
    run = run_phase(PHASE4, "-k", MAIN)
    assert run.returncode == 0, run.output
    assert run.outcome(MAIN) == "passed"


def test_read_only_mapping_fails_phase4_naming_the_original_bug(record_property):
    """Mapped read-only, KVM refuses the guest's first write; the failure names how, and hyperlight's bug."""
    run = run_phase(PHASE4, "-k", MAIN, inject="read-only-mapping")
    assert run.returncode == 1, run.output
    assert run.outcome(MAIN) == "failed"
    failure = run.failure(MAIN)
    assert "KVM refused the guest's write" in failure, failure
    assert "the original PAGE_READONLY + FILE_MAP_READ bug" in failure, failure
    seen = [sig for sig in REFUSED_WRITE_SIGNATURES if sig in failure]
    assert len(seen) == 1, f"expected the failure to name exactly one of {REFUSED_WRITE_SIGNATURES}, saw {seen}: " \
                           f"{failure}"
    record_property("refused_write_signature", seen[0])
