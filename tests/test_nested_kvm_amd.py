"""The suite on real KVM: phases 0-4 and 6 and the self-tests that drive KVM, run strictly on the kvm_amd module.

The nested host (nested/kvm_amd.py) is Debian's stock 6.1 kernel under QEMU TCG with SVM and nested
paging, so every guest write goes through real nested page tables and uffd has no WP_UNPOPULATED,
WP_ASYNC or PAGEMAP_SCAN: what a Debian 12 fleet host looks like. kvm_amd runs once with npt=1 (the
phases and the KVM self-tests) and once with npt=0 (phases 0-4 on shadow paging), sizes up to 64 MiB. Each run's record
comes back beside this run's own and must name kvm_amd, nested, and the npt setting it ran with.

Opt-in (``--nested``): it needs qemu-system-x86 and busybox-static, downloads the kernel package
once, and takes minutes; ``.ci/run`` runs it. Figures from it are TCG figures, never baselines.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from nested import kvm_amd as nested
from tests.reliability_support import processes_naming

pytestmark = [pytest.mark.nested, pytest.mark.platform("linux")]

# Phase 5 is left out: its sizes start at 64 MiB copied several times per strategy, hours under TCG,
# and two of its four strategies need WP_ASYNC and PAGEMAP_SCAN, which 6.1 does not have.
PHASES = ["phases/test_phase0_host.py", "phases/test_phase1_wp_catches_writes.py",
          "phases/test_phase2_live_consistency.py", "phases/test_phase3_round_trip_restore.py",
          "phases/test_phase4_cow_load.py"]
# Phase 6 (incremental snapshots) runs its KVM dirty-log and soft-dirty trackers there; WP_ASYNC's is left out
# for the host class, named in the record.
INCREMENTAL = ["phases/test_phase6_incremental.py"]
KVM_SELF_TESTS = ["tests/test_phase1_fails_under_injected_bugs.py", "tests/test_phase2_fails_under_injected_bugs.py",
                  "tests/test_phase3_fails_under_injected_bugs.py", "tests/test_phase4_fails_under_injected_bugs.py",
                  "tests/test_guests_on_kvm.py", "tests/test_live_runner.py", "tests/test_restore_loaders.py",
                  "tests/test_reliability_dead_handler.py", "tests/test_reliability_guest_exits.py",
                  "tests/test_reliability_uffd_close.py", "tests/test_hv_cow.py",
                  "tests/test_guest_memory_layout.py", "tests/test_reliability_interrupt.py",
                  "tests/test_reliability_cycles.py"]
SELECTION = {1: PHASES + INCREMENTAL + KVM_SELF_TESTS, 0: PHASES}
# A nested run is stopped as hung when its console has been silent this long: the nested pytest draws a running
# case's progress several times a second, so silence means the nested host or its pytest stopped, whatever the
# host's speed. It is longer than a case's own ceiling (below), so a case that hangs is ended and named by that
# ceiling first, and it leaves minutes for booting and collecting.
NESTED_SILENCE_S = 720.0
# A backstop only, for a nested host that keeps printing and never finishes. The run's time is not bounded
# otherwise: a whole loaded run on a slow host has taken past 6000 s with every case making progress (each case
# has its own ceiling, below).
NESTED_BACKSTOP_S = 8 * 3600.0
# Every instruction of the nested host and of its guests is emulated: a test's hang ceiling there is five
# times the suite's own 120 s, still far below the whole run's.
NESTED_TEST_CEILING_S = 600
# The phases' two smallest sizes (1 and 64 MiB): past them an emulated host adds minutes, not proof.
NESTED_MAX_SIZE = "64M"


def nested_pytest(npt: int) -> list[str]:
    """The command the nested host runs: the selection, strictly, its record and JUnit XML into /out."""
    present = [p for p in SELECTION[npt] if Path(nested.REPO, p).exists()]
    # --thp: the THP cases run there too (Debian's 6.1 has anonymous THP on, shmem THP off by default).
    return [sys.executable, "-m", "pytest", *present, "--strict-host", "--thp", "--reports", "short", "-p",
            "no:cacheprovider", "-rfE", f"--timeout={NESTED_TEST_CEILING_S}", f"--max-size={NESTED_MAX_SIZE}",
            "--results-dir=/out/runs", "--junitxml=/out/junit.xml"]


@pytest.mark.parametrize("npt", [pytest.param(n, id=f"npt{n}", marks=pytest.mark.timeout(NESTED_BACKSTOP_S + 120))
                                 for n in (1, 0)])
def test_phases_pass_strictly_on_the_real_kvm_amd_module(request, record_property, npt):
    """On kvm_amd (nested under QEMU TCG) every selected phase and KVM self-test passes with --strict-host."""
    if need := nested.missing_host_tools():
        pytest.fail(f"--nested needs {', '.join(need)}: apt-get install -y {' '.join(need)}", pytrace=False)
    out = Path(request.config.getoption("results_dir") or "results/runs") / f"nested-kvm_amd-npt{npt}"
    shutil.rmtree(out, ignore_errors=True)

    run = nested.run(nested_pytest(npt), out, npt=bool(npt), timeout=NESTED_BACKSTOP_S, silence=NESTED_SILENCE_S,
                     kernel_package=request.config.getoption("nested_kernel"))
    record_property("nested_seconds", round(run.seconds))
    records = sorted((out / "runs").glob("*.yaml"))
    record_property("nested_record", str(records[-1]) if records else "")
    summary = [line for line in run.console.splitlines() if " passed" in line or " failed" in line][-1:]

    assert run.rc == 0, f"pytest on kvm_amd npt={npt} exited {run.rc}: {' '.join(summary)} (console: {out}/console.log)"
    assert len(records) == 1, f"expected one run record from the nested host in {out}/runs, found {len(records)}"
    rec = yaml.safe_load(records[0].read_text())
    host = rec["host"]
    assert host.get("kvm_module") == "kvm_amd", f"record's KVM module: expected kvm_amd, saw {host.get('kvm_module')!r}"
    seen_npt = host.get("kvm_params", {}).get("npt")
    assert seen_npt in (("Y", "1") if npt else ("N", "0")), f"record's kvm_amd npt: expected {npt}, saw {seen_npt!r}"
    assert host.get("virtualization") == "nested", \
        f"record's virtualization: expected nested (CPUID hypervisor bit set), saw {host.get('virtualization')!r}"
    not_passed = [f"phase {p['phase']}: {p['outcome']}" for p in rec["phases"] if p["outcome"] != "PASS"]
    assert not not_passed, f"phases that did not pass on kvm_amd npt={npt}: {not_passed}"


def test_a_nested_host_that_stops_printing_is_stopped_as_stalled(request, tmp_path):
    """A nested host whose console goes silent is killed and named stalled once the silence bound runs out,
    however long its job would take, and its QEMU does not outlive the run."""
    out = tmp_path / "out"
    with pytest.raises(nested.NestedError, match=r"printed nothing for 30 s \(stalled\)"):
        nested.run(["sleep", "3600"], out, silence=30.0, timeout=NESTED_BACKSTOP_S, echo=False,
                   kernel_package=request.config.getoption("nested_kernel"))
    # QEMU's command line names the run's shared folder, which no other process on the host does.
    assert not processes_naming(str(out).encode()), "QEMU outlived the stalled nested run"
