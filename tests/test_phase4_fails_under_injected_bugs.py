"""Phase 4 can fail: a read-only mapping fails the OS-level load naming the original bug; the hypervisor-level
load fails naming its two real bugs, a private page not copied from the file and a served store not applied."""

from __future__ import annotations

import pytest

from tests.phase_runner import run_phase

pytestmark = [pytest.mark.platform("linux")]  # the cases below select phase 4's KVM tests
PHASE4 = "test_phase4_cow_load.py"
MAIN = "test_guest_sees_its_writes_and_the_file_never_changes"
MAP_PRIVATE = f"{MAIN}[map-private]"
HYPERVISOR_COW = f"{MAIN}[hypervisor-cow]"
# How each KVM reports the refused write, as Exit.describe() words it: an emulating KVM (kvm_pvm)
# exits with MMIO; hardware KVM fails KVM_RUN with EFAULT, and from 6.8 adds KVM_EXIT_MEMORY_FAULT.
REFUSED_WRITE_SIGNATURES = ("KVM_EXIT_MMIO write at GPA", "KVM_RUN failed with EFAULT",
                            "and KVM_EXIT_MEMORY_FAULT")


def test_phase4_passes_with_either_copy_on_write_load():
    """The control: both loads pass with no switch set."""
    run = run_phase(PHASE4, "-k", MAIN)
    assert run.returncode == 0, run.output
    for case in (MAP_PRIVATE, HYPERVISOR_COW):
        assert run.outcome(case) == "passed", f"{case}: {run.outcome(case)}: {run.failure(case)}"


def test_read_only_mapping_fails_phase4_naming_the_original_bug(record_property):
    """Mapped read-only, KVM refuses the guest's first write; the failure names how, and hyperlight's bug."""
    run = run_phase(PHASE4, "-k", f"{MAIN} and map", inject="read-only-mapping")
    assert run.returncode == 1, run.output
    assert run.outcome(MAP_PRIVATE) == "failed"
    failure = run.failure(MAP_PRIVATE)
    assert "KVM refused the guest's write" in failure, failure
    assert "the original PAGE_READONLY + FILE_MAP_READ bug" in failure, failure
    seen = [sig for sig in REFUSED_WRITE_SIGNATURES if sig in failure]
    assert len(seen) == 1, f"expected the failure to name exactly one of {REFUSED_WRITE_SIGNATURES}, saw {seen}: " \
                           f"{failure}"
    record_property("refused_write_signature", seen[0])


def test_private_page_not_copied_from_the_file_fails_phase4_naming_the_zeros():
    """The loader maps a written page writable without copying the file's page in: the guest reads zeros
    (counter32 finds its iteration count zero and stops), and the failure says the copy did not start from
    the file."""
    run = run_phase(PHASE4, "-k", f"{MAIN} and hypervisor", inject="hv-cow-no-copy")
    assert run.returncode == 1, run.output
    assert run.outcome(HYPERVISOR_COW) == "failed"
    failure = run.failure(HYPERVISOR_COW)
    # The first page the guest made private that holds file data is its parameter block (GPA 0x8000).
    assert "the guest saw its writes" in failure, failure
    assert "first at GPA 0x8000: expected u32 0x00010000, saw 0x00000000: zero where the file holds 0x00010000" \
           in failure, failure
    assert "the private copy of the page did not start from the file's page" in failure, failure


def test_store_not_applied_after_the_write_exit_fails_phase4_naming_the_lost_write():
    """The loader maps the page but drops the MMIO data of the exit that made it private: KVM completed that
    store as MMIO, so it is lost, and the failure names the word that misses it."""
    run = run_phase(PHASE4, "-k", f"{MAIN} and hypervisor", inject="hv-cow-drops-store")
    assert run.returncode == 1, run.output
    assert run.outcome(HYPERVISOR_COW) == "failed"
    failure = run.failure(HYPERVISOR_COW)
    # Each region page loses its first store: page 0's is iteration 16's, at word 13 * 16 mod 1024 = 208.
    assert "16 pages differ, first at GPA 0x10340: expected u32 0x00000010, saw 0x00000000" in failure, failure
    assert "the guest's write is missing" in failure, failure
