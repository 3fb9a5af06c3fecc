"""The vCPU runner's pause is a real pause: after pause() returns, no vCPU executes until resume()."""

from __future__ import annotations

import time

import pytest
from snapproof.native.live import VcpuRunner

pytestmark = pytest.mark.needs("kvm")


def test_pause_right_after_resume_stops_the_guest_before_returning(make_storm_vm):
    """pause() straight after resume() waits for a fresh park: guest memory holds still while paused."""
    storm_vm = make_storm_vm("memfd", 1 << 20, 1)
    p = storm_vm.params[0]
    with VcpuRunner(storm_vm.vm.vcpus, timeout=60).start() as runner:
        storm_vm.wait(lambda: storm_vm.progress(0).done_gen >= 1, "the first sweep")
        moved = 0
        for _ in range(300):
            runner.resume()
            runner.pause()
            before = storm_vm.memory.read(p.region_gpa, p.region_size)
            time.sleep(0.0005)  # a running storm guest rewrites a stamp well within this
            after = storm_vm.memory.read(p.region_gpa, p.region_size)
            if before != after:
                moved += 1
        runner.stop()
    assert moved == 0, f"guest memory changed while 'paused' in {moved} of 300 pause() calls"


def test_a_runner_started_parked_runs_nothing_until_resumed(make_storm_vm):
    """start(paused=True) holds every vCPU before its first instruction; resume() lets it run."""
    storm_vm = make_storm_vm("memfd", 1 << 20, 1)
    with VcpuRunner(storm_vm.vm.vcpus, timeout=60).start(paused=True) as runner:
        runner.pause()
        time.sleep(0.01)
        assert storm_vm.progress(0).cur_gen == 0, "the guest ran while the runner held it parked"
        runner.resume()
        storm_vm.wait(lambda: storm_vm.progress(0).cur_gen >= 1, "the guest's first sweep")
        runner.stop()
