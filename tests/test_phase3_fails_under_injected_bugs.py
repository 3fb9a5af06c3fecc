"""Phase 3 can fail: a snapshot without its vCPU state fails the mid-execution check, a restore that drops any
one part of a vCPU's state (or gives every vCPU vCPU 0's) fails the two-vCPU whole-state check, a lazy loader
whose userfaultfd is closed mid-restore fails every lazy case naming its death (and, its guard removed, the
check that the guest never saw a zero page where the file holds data), a flipped byte fails the load.

The first two run the phase in a child pytest with ``--inject drop-vcpu-state`` (the capture writes the
file without vCPU state; the restore falls back to counter32's entry, re-running iterations whose
writes the snapshot already holds and signalling the snapshot point a second time), or one of the
restore's vCPU-state switches (drop-xsave, drop-xcrs, drop-msrs, drop-vcpu-events, drop-mp-state,
drop-debugregs, same-vcpu-state). The last corrupts one byte of a real snapshot's memory image and
loads it, verified and not.
"""

from __future__ import annotations

from functools import partial

import pytest
from snapproof.native.restore import LOADERS

from snapproof import guests
from tests.phase_runner import PhaseRun, run_phase

PHASE3 = "test_phase3_round_trip_restore.py"
MID = "test_mid_execution_snapshot_resumes_to_the_uninterrupted_result"
SELECT = "mid_execution and 1MiB"
# One loader is enough here: the vCPU state is loaded the same way whichever loader filled memory.
WHOLE_STATE = "test_two_vcpus_resume_each_with_its_own_whole_state"
WHOLE_STATE_CASE = f"{WHOLE_STATE}[read-copy]"
WHOLE_STATE_SELECT = "two_vcpus and read-copy"
RESULTS = "each vCPU ends as the model and the uninterrupted run: results vs the model: "
READ_BACK = "each restored vCPU held the file's state, part by part: "
pytestmark = [pytest.mark.platform("linux")]


def mid_case(loader: str) -> str:
    return f"{MID}[1MiB-{loader}]"


# One child run each, shared by every loader's case: a loader this host cannot run (native.restore.LOADER_NEEDS)
# is deselected here, naming the capability, as the child deselects its phase 3 case.
@pytest.fixture(scope="module")
def control() -> PhaseRun:
    return run_phase(PHASE3, "-k", SELECT)


@pytest.fixture(scope="module")
def dropped_vcpu_state() -> PhaseRun:
    return run_phase(PHASE3, "-k", SELECT, inject="drop-vcpu-state")


@pytest.mark.parametrize("loader", LOADERS)
def test_phase3_mid_execution_passes_without_injection(control, loader):
    """The control: the same case passes with no switch set."""
    assert control.returncode == 0, control.output
    assert control.outcome(mid_case(loader)) == "passed", control.failure(mid_case(loader))


@pytest.mark.parametrize("loader", LOADERS)
def test_dropped_vcpu_state_fails_the_mid_execution_check(dropped_vcpu_state, loader):
    """Without its vCPU state the restored counter restarts from its entry: its first exit is the snapshot
    point's sync again, not the working set's, and the phase says so for every loader."""
    run, case = dropped_vcpu_state, mid_case(loader)
    assert run.returncode == 1, run.output
    assert run.outcome(case) == "failed", f"{case}: {run.outcome(case)} with the vCPU state dropped"
    failure = run.failure(case)
    assert "+ resume to the working set: expected the working-set sync " in failure and \
           "the snapshot point's sync again: the guest re-ran iterations it had run before the snapshot" \
           in failure and f"restore ({loader})" in failure, failure
    notes = [n for s in run.cases()[case]["stages"] for n in s["notes"]]
    assert "vCPU states: 1 taken, 0 written to the file" in notes, notes
    assert any("no vCPU state in the file" in n for n in notes), notes


# -- a restore that drops one part of each vCPU's state, or gives every vCPU vCPU 0's -------------------


def test_phase3_whole_state_passes_without_injection():
    """The control: the two-vCPU whole-state case passes with no switch set."""
    run = run_phase(PHASE3, "-k", WHOLE_STATE_SELECT)
    assert run.returncode == 0, run.output
    assert run.outcome(WHOLE_STATE_CASE) == "passed", run.failure(WHOLE_STATE_CASE)


@pytest.mark.parametrize(("switch", "named"), [
    # The guest's own result shows these: its XMM0 and MM0, its SYSENTER_EIP, its NMI, its DR0-DR3.
    ("drop-xsave", [RESULTS + "vCPU 0 XMM0: expected ", "vCPU 0 MM0 (x87 R0): expected "]),
    ("drop-msrs", [RESULTS + "vCPU 0 XMM0: expected ", "vCPU 0 SYSENTER_EIP (MSR 0x176): expected "]),
    ("drop-vcpu-events", [RESULTS + "vCPU 0 NMIs taken: expected 0x1, saw 0x0; vCPU 0 NMI after iteration: "
                                    "expected 0x258, saw 0x0"]),
    ("drop-debugregs", [RESULTS + "vCPU 0 DR0-DR3: expected "]),
    ("same-vcpu-state", [RESULTS + "vCPU 0 NMIs taken: expected 0x1, saw 0x2", "vCPU 1 XMM0: expected "]),
    # These the guest cannot see: XCR0 shows in the state read back, the MP state (always RUNNABLE without
    # an in-kernel LAPIC) in the parts the restore wrote.
    ("drop-xcrs", [READ_BACK + "vCPU 0 state read back after the restore vs the file: xcrs: xcrs[0].value "
                               "expected 0x0000000000000003, saw 0x0000000000000001"]),
    ("drop-mp-state", [READ_BACK + "vCPU 0: parts the restore wrote, in order (not written: ['mp_state'])"]),
])
def test_restore_without_one_part_of_the_vcpu_state_fails_the_whole_state_check(require, switch, named):
    """With the restore dropping one part of each vCPU's state (or giving all of them vCPU 0's), the two-vCPU
    case fails and its message names what differed."""
    require("kvm")
    if switch == "drop-xcrs":
        from snapproof.native.kvm import Vm

        with Vm.create() as vm:
            if not vm.has_xcrs():
                pytest.skip("KVM_CHECK_EXTENSION(KVM_CAP_XCRS) is 0 here (no XSAVE on the host CPU): no XCRs to drop")
    run = run_phase(PHASE3, "-k", WHOLE_STATE_SELECT, inject=switch)
    assert run.returncode == 1, run.output
    assert run.outcome(WHOLE_STATE_CASE) == "failed", f"{switch}: {run.outcome(WHOLE_STATE_CASE)}"
    failure = run.failure(WHOLE_STATE_CASE)
    for words in named:
        assert words in failure, f"{switch}: expected {words!r} in the failure: {failure}"


# -- the lazy loader's userfaultfd closed mid-restore --------------------------------------------------

# Every sequence of the phase, once each, 1 MiB: the original re-run, the mid-execution resume, the two vCPUs.
SEQUENCES = "(not benchmark and 1MiB) or two_vcpus"
LAZY_CASES = [f"{MID}[1MiB-lazy-uffd]", "test_original_sequence_reruns_in_a_fresh_vm_from_the_file[1MiB-lazy-uffd]",
              f"{WHOLE_STATE}[lazy-uffd]"]
DEAD_LOADER = ("snapproof.native.errors.LoaderDied: the vCPU run ended with ",
               ": the lazy loader stopped serving guest memory mid-restore: its userfaultfd was closed under it "
               "(handler stopped with errno 125 ECANCELED",
               "pages it never restored are fenced (PROT_NONE), so the guest stopped at them instead of reading zeros; "
               "fault injection LAZY_UFFD_CLOSES_MID_RESTORE")
ZEROS_SEEN = ("page(s) the guest reached hold zeros where the file holds data, never restored by lazy-uffd: first at "
              "GPA ", "the guest ran on memory the loader never restored")


def test_phase3_sequences_pass_without_injection():
    """The control: every sequence passes, with every loader, with no switch set."""
    run = run_phase(PHASE3, "-k", SEQUENCES)
    assert run.returncode == 0, run.output
    for case in LAZY_CASES:
        assert run.outcome(case) == "passed", run.failure(case)


def test_lazy_uffd_closed_mid_restore_fails_every_lazy_case_naming_the_dead_loader():
    """With the lazy loader's userfaultfd closed at the guest's first fault, every lazy-uffd sequence fails with the
    loader's death named and the pages it never restored fenced; the other loaders pass in the same run."""
    run = run_phase(PHASE3, "-k", SEQUENCES, inject="lazy-uffd-closes-mid-restore")
    assert run.returncode == 1, run.output
    for case in LAZY_CASES:
        assert run.outcome(case) == "failed", f"{case}: {run.outcome(case)} with the uffd closed mid-restore"
        failure = run.failure(case)
        for words in DEAD_LOADER:
            assert words in failure, f"{case}: expected {words!r} in the failure: {failure}"
    others = {c: r["outcome"] for c, r in run.cases().items() if c not in LAZY_CASES}
    assert others and set(others.values()) == {"passed"}, f"the other loaders under the lazy loader's switch: {others}"


def test_lazy_uffd_closed_mid_restore_without_the_guard_fails_the_zero_page_check():
    """The guard removed (no fence, no LoaderDied), the same close lets the kernel fill the guest's page with zeros:
    every lazy sequence then fails the check that the guest never saw a zero page where the file holds data."""
    run = run_phase(PHASE3, "-k", f"({SEQUENCES}) and lazy",
                    inject="lazy-uffd-closes-mid-restore,lazy-uffd-unguarded")
    assert run.returncode == 1, run.output
    for case in LAZY_CASES:
        assert run.outcome(case) == "failed", f"{case}: {run.outcome(case)} with the lazy loader unguarded"
        failure = run.failure(case)
        assert "LoaderDied" not in failure, f"{case}: the unguarded loader still named its death: {failure}"
        for words in ZEROS_SEEN:
            assert words in failure, f"{case}: expected {words!r} in the failure: {failure}"


# -- the lazy loader into THP-backed memory without its huge-page guard -----------------------------------------

THP_LAZY_CASE = ("test_restore_into_thp_memory_collapsed_mid_restore_resumes_to_the_uninterrupted_result"
                 "[lazy-uffd-memfd-thp]")
THP_LAZY_SELECT = "thp and lazy-uffd-memfd"


def test_lazy_uffd_into_thp_memory_without_its_guard_fails_where_the_kernel_fills_holes(record_property):
    """With huge pages left on while pages are missing, the kernel's collapse of the half-restored memfd fills the
    pages not yet restored with zeros where it does so (measured: 6.1), and the phase fails naming them; where the
    kernel refuses such a collapse itself (6.18: EBUSY) the phase passes and the record says the guard had nothing
    to stop. Both runs set the THP knobs themselves (--thp) and restore them."""
    control = run_phase(PHASE3, "-k", THP_LAZY_SELECT, "--thp")
    outcome = control.outcome(THP_LAZY_CASE)
    if outcome == "skipped":
        pytest.skip(f"the THP case skipped even with --thp: {control.failure(THP_LAZY_CASE) or control.output[-500:]}")
    assert outcome == "passed", f"the control (guard in place): {outcome}: {control.failure(THP_LAZY_CASE)}"
    assert control.cases()[THP_LAZY_CASE]["facts"]["collapse_mid_restore"].startswith("refused for all"), \
        f"with the guard every unit's collapse must be refused: {control.cases()[THP_LAZY_CASE]['facts']}"

    run = run_phase(PHASE3, "-k", THP_LAZY_SELECT, "--thp", inject="lazy-uffd-thp-unguarded")
    case = run.cases()[THP_LAZY_CASE]
    collapse = case["facts"]["collapse_mid_restore"]
    record_property("collapse_without_the_guard", collapse)
    if collapse.startswith("collapsed"):
        assert case["outcome"] == "failed", f"the kernel {collapse} with holes in them; the phase {case['outcome']}"
        failure = run.failure(THP_LAZY_CASE)
        assert ZEROS_SEEN[0] in failure, failure
        print(f"without the guard the kernel collapsed the half-restored memory and the phase failed: {failure}")
    else:
        assert case["outcome"] == "passed", f"the kernel refused the collapse ({collapse}), yet the phase " \
                                            f"{case['outcome']}: {run.failure(THP_LAZY_CASE)}"
        print(f"this kernel refuses the collapse of a half-restored range itself ({collapse}): the guard has nothing "
              "to stop here, and the phase passes without it")


# -- one flipped byte in the memory image -----------------------------------------------------------


@pytest.fixture
def marker16_snapshot(make_memory, make_marker16_vm, capture_snapshot):
    """A real snapshot file: marker16 run to HLT, the marker reset to 0xBE, captured by the engine."""
    mem = make_memory("memfd", 1 << 20)
    _, vcpu = make_marker16_vm(mem)
    ex = vcpu.run(timeout=5.0)
    assert ex.reason.name == "HLT", f"marker16 did not halt: {ex.describe()}"
    mem.write(guests.MARKER_GPA, bytes([guests.MARKER_BEFORE]))
    return capture_snapshot(mem, "marker16").image


def flip_memory_byte(image, gpa: int) -> tuple[int, int]:
    """Flip the low bit of guest byte ``gpa`` in the file's memory image; returns (before, after)."""
    with open(image.path, "r+b") as f:
        f.seek(image.memory_offset + gpa)
        before = f.read(1)[0]
        f.seek(image.memory_offset + gpa)
        f.write(bytes([before ^ 0x01]))
    return before, before ^ 0x01


def test_flipped_memory_byte_fails_the_verified_load(marker16_snapshot):
    """One flipped bit at GPA 0x1000 makes the verified open fail, naming the content hash."""
    from snapproof.native.image import SnapshotFormatError, SnapshotImage

    SnapshotImage.open(marker16_snapshot.path, verify=True)  # the control: the file as captured verifies
    before, after = flip_memory_byte(marker16_snapshot, guests.MARKER_GPA)
    assert (before, after) == (0xBE, 0xBF)
    with pytest.raises(SnapshotFormatError, match=r"snapshot header: content_hash: expected [0-9a-f]{64} \(from "
                                                  r"header\), saw [0-9a-f]{64} \(of the memory image\)"):
        SnapshotImage.open(marker16_snapshot.path, verify=True)


@pytest.mark.parametrize("loader", LOADERS)
def test_flipped_memory_byte_stops_a_verified_restore_and_shows_in_an_unverified_one(marker16_snapshot,
                                                                                    make_restored_vm, enter_guest,
                                                                                    loader):
    """A verified restore refuses the corrupted file; an unverified one runs with the flipped byte (0xBF)."""
    from snapproof.native.image import SnapshotFormatError

    flip_memory_byte(marker16_snapshot, guests.MARKER_GPA)
    with pytest.raises(SnapshotFormatError, match="content_hash"):
        make_restored_vm(marker16_snapshot.path, loader, verify=True)
    restored = make_restored_vm(marker16_snapshot.path, loader, verify=False, reset=partial(enter_guest, "marker16"))
    seen = restored.memory.byte(guests.MARKER_GPA)
    assert seen == 0xBF, f"unverified {loader} restore: mem[0x1000] expected the flipped 0xbf, saw {seen:#04x}"
