"""The vCPU runner's pause is a real pause: after pause() returns, no vCPU executes until resume(); and its block
stops every vCPU on every way out."""

from __future__ import annotations

import threading
import time

import pytest
from snapproof.native.errors import GuestTimeout
from snapproof.native.live import THREAD_NAME_PREFIX, VcpuRunner

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


def test_a_runner_left_by_an_interrupt_stops_its_vcpus_on_the_way_out(make_storm_vm):
    """An interrupt inside the runner's block: every vCPU thread is stopped and joined before it propagates."""
    storm_vm = make_storm_vm("memfd", 1 << 20, 2)
    with pytest.raises(KeyboardInterrupt), VcpuRunner(storm_vm.vm.vcpus, timeout=60) as runner:
        runner.start()
        storm_vm.wait(lambda: all(storm_vm.progress(i).cur_gen >= 1 for i in range(2)), "both vCPUs sweeping")
        raise KeyboardInterrupt("as a signal's handler raises it")
    assert runner.finished == {0, 1}, f"vCPUs still running after the block: {({0, 1} - runner.finished)}"
    left = [t.name for t in threading.enumerate() if t.name.startswith(THREAD_NAME_PREFIX)]
    assert not left, f"vCPU threads {left} outlived their block"


def test_an_interrupt_between_the_thread_starts_leaves_nothing_running(make_storm_vm, monkeypatch):
    """Interrupted inside start(), after the first vCPU's thread started and before the second's: the way out
    stops the one that runs and passes over the one that never started."""
    storm_vm = make_storm_vm("memfd", 1 << 20, 2)
    runner = VcpuRunner(storm_vm.vm.vcpus, timeout=60)

    def interrupted() -> None:
        raise KeyboardInterrupt("between the thread starts")

    monkeypatch.setattr(runner._threads[1], "start", interrupted)
    with pytest.raises(KeyboardInterrupt, match="between the thread starts"), runner:
        runner.start()
    assert runner.finished == {0}, f"expected vCPU 0 stopped and vCPU 1 never run, saw finished {runner.finished}"


def test_a_failing_stop_on_the_way_out_is_a_note_on_the_exception_in_flight(make_storm_vm):
    """The block's own exception is what propagates; a stop that fails on the way out is added to it as a note."""
    storm_vm = make_storm_vm("memfd", 1 << 20, 1)
    runner = VcpuRunner(storm_vm.vm.vcpus, timeout=60)
    real_stop = runner.stop

    def stop_then_fail(timeout: float = 5.0) -> None:
        real_stop(timeout)
        raise GuestTimeout("vCPU threads ['vcpu0'] did not stop within 5.0 s")

    runner.stop = stop_then_fail  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="a failed check") as caught, runner:
        runner.start()
        raise ValueError("a failed check")
    assert any("did not stop within" in n for n in getattr(caught.value, "__notes__", [])), (
        f"the stop's failure is not a note on the exception in flight: {getattr(caught.value, '__notes__', None)}")
