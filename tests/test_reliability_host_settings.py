"""The suite never changes host settings behind the user's back: hugepages are reserved only with
--reserve-hugepages, transparent huge pages turned on only with --thp, and every setting is back where
it was when the run ends.

A child pytest reports the settings as its tests see them (tests/reliability_child_cases.py,
test_report_host_settings); the parent reads them before and after. Another run reserving
hugepages at the same moment on this host would disturb the figures: CI runs one suite at a time.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.reliability_support import HOST_SETTINGS, child_env, host_settings, run_child

NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
RESERVE = 2


def _child_run(tmp_path, *extra: str) -> dict:
    out = tmp_path / f"settings{len(extra)}.json"
    run = run_child(["-m", "pytest", "tests/reliability_child_cases.py", "-q", "-p", "no:randomly",
                     "--results-dir", "", "-k", "test_report_host_settings", *extra],
                    timeout=120, env=child_env(SNAPPROOF_SETTINGS_OUT=str(out)))
    assert run.returncode == 0, f"child pytest {extra} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_no_option_changes_no_host_setting(tmp_path):
    """Without --reserve-hugepages, every watched setting is the same before, during and after a run."""
    before = host_settings()
    during = _child_run(tmp_path)["settings"]
    after = host_settings()
    changed = {k: (before[k], during[k], after[k]) for k in HOST_SETTINGS if not before[k] == during[k] == after[k]}
    assert not changed, f"settings changed (before, during, after): {changed}"


@pytest.mark.skipif(os.geteuid() != 0, reason="writing vm.nr_hugepages needs root (without it the option only checks)")
def test_reserve_hugepages_raises_nr_hugepages_for_the_run_and_restores_it(tmp_path):
    """--reserve-hugepages 2: vm.nr_hugepages is 2 higher while the run's tests see it, and as before once it ends."""
    before = host_settings()
    child = _child_run(tmp_path, "--reserve-hugepages", str(RESERVE))
    after = host_settings()
    during = child["settings"]
    want = int(before[NR_HUGEPAGES]) + RESERVE
    print(f"vm.nr_hugepages: before {before[NR_HUGEPAGES]}, during {during[NR_HUGEPAGES]}, after {after[NR_HUGEPAGES]}")
    assert child["reserve_hugepages"] == RESERVE, f"the child saw --reserve-hugepages {child['reserve_hugepages']}"
    assert int(during[NR_HUGEPAGES]) == want, f"vm.nr_hugepages during the run: expected {want}, " \
                                              f"saw {during[NR_HUGEPAGES]}"
    assert after[NR_HUGEPAGES] == before[NR_HUGEPAGES], (
        f"vm.nr_hugepages after the run: expected {before[NR_HUGEPAGES]} as before, saw {after[NR_HUGEPAGES]}")
    others = {k: (before[k], during[k], after[k]) for k in HOST_SETTINGS
              if k != NR_HUGEPAGES and "hugepages-2048kB" not in k and not before[k] == during[k] == after[k]}
    assert not others, f"settings other than the hugepage count changed (before, during, after): {others}"


THP_KNOBS = ("/sys/kernel/mm/transparent_hugepage/enabled", "/sys/kernel/mm/transparent_hugepage/shmem_enabled")


def _chosen(value: str) -> str:
    return value.split("[", 1)[1].split("]", 1)[0] if "[" in value else value


@pytest.mark.skipif(os.geteuid() != 0, reason="writing the THP knobs needs root (without it the option only checks)")
def test_thp_turns_huge_pages_on_for_the_run_and_restores_every_knob(tmp_path):
    """--thp: anonymous and shmem THP are on for MADV_HUGEPAGE memory while the run's tests see them, and every THP
    knob, the per-size mTHP ones a case sets for itself included, is as before once the run ends."""
    from snapproof.native.thp import ANON_ON, SHMEM_ON

    before = host_settings()
    during = _child_run(tmp_path, "--thp")["settings"]
    after = host_settings()
    anon, shmem = (_chosen(during[k]) for k in THP_KNOBS)
    print(f"during --thp: enabled {anon}, shmem_enabled {shmem}; before: "
          f"{', '.join(_chosen(before[k]) for k in THP_KNOBS)}")
    assert anon in ANON_ON and shmem in SHMEM_ON, f"THP knobs during the run: enabled {anon}, shmem_enabled {shmem}"
    changed = {k: (before[k], after[k]) for k in HOST_SETTINGS if before[k] != after[k]}
    assert not changed, f"settings not restored after the run (before, after): {changed}"
    # A run of the mTHP cases, each of which sets one size alone for its own duration.
    run = run_child(["-m", "pytest", "phases/test_phase1_wp_catches_writes.py", "-q", "-p", "no:randomly",
                     "--results-dir", "", "--thp", "-k", "mthp_folio"], timeout=120)
    assert run.returncode == 0, f"the mTHP cases failed under --thp:\n{run.stdout[-3000:]}"
    after = host_settings()
    changed = {k: (before[k], after[k]) for k in HOST_SETTINGS if before[k] != after[k]}
    assert not changed, f"settings not restored after the mTHP cases (before, after): {changed}"
