"""A guest that never halts, and one that triple-faults, fail clearly and within the run's time-out.

spin16 (`jmp .`) and triple32 (IDT limit 0, then `ud2`) are in guests/. The failure text checked
is the one a phase prints: ``st.check(ex.reason is HLT, ..., f"guest did not halt: {ex.describe()}")``.
"""

from __future__ import annotations

import re
import time

import pytest
from snapproof.native.kvm import ExitReason
from snapproof.native.live import VcpuRunner

from snapproof import guests

pytestmark = pytest.mark.needs("kvm")

DEADLINE_S = 0.5
# Tells "returned at its deadline" from "hung": a bound on a time-out, not a performance figure.
LATE_S = 5.0
KVM_EXIT_SHUTDOWN = 8  # include/uapi/linux/kvm.h


def _spin16_vm(make_memory, make_vm, mode: str):
    mem = make_memory("memfd", 1 << 20)
    vcpu = make_vm(mem).add_vcpu()
    code = guests.load("spin16")
    if mode == "real-mode":
        mem.write(guests.REAL_MODE_LOAD_GPA, code)
        vcpu.set_real_mode(ip=guests.REAL_MODE_LOAD_GPA)
    else:  # EB FE is `jmp .` in 32-bit mode too
        mem.write(guests.FLAT32_LOAD_GPA, code)
        vcpu.set_flat32(eip=guests.FLAT32_LOAD_GPA, esp=0x7000)
    return vcpu


def _triple32_vm(make_memory, make_vm):
    mem = make_memory("memfd", 1 << 20)
    mem.write(guests.FLAT32_LOAD_GPA, guests.load("triple32"))
    vcpu = make_vm(mem).add_vcpu()
    vcpu.set_flat32(eip=guests.FLAT32_LOAD_GPA, esp=0x7000)
    return vcpu


def _phase_failure(report, what: str, ex) -> str:
    """The message a phase's "guest halted" check fails with for this exit."""
    with pytest.raises(AssertionError) as failed, report.stage(what) as st:
        st.check(ex.reason is ExitReason.HLT, "guest halted", f"guest did not halt: {ex.describe()}")
    return str(failed.value)


@pytest.mark.parametrize("mode", ["real-mode", "flat32"])
def test_guest_that_never_halts_ends_at_its_deadline_naming_the_time_out(make_memory, make_vm, report, mode):
    """spin16 runs until the deadline; the run returns TIMEOUT on time and the phase failure says so."""
    vcpu = _spin16_vm(make_memory, make_vm, mode)
    t0 = time.monotonic()
    ex = vcpu.run(timeout=DEADLINE_S)
    took = time.monotonic() - t0
    assert ex.reason is ExitReason.TIMEOUT, f"expected TIMEOUT, saw {ex.describe()}"
    assert DEADLINE_S <= took <= DEADLINE_S + LATE_S, f"run returned after {took:.3f} s, deadline {DEADLINE_S} s"
    failure = _phase_failure(report, "run spin16", ex)
    assert re.search(r"guest did not halt: TIMEOUT after \d+\.\d{3} s", failure), f"unclear failure: {failure}"


def test_guest_that_triple_faults_fails_naming_kvm_exit_shutdown(make_memory, make_vm, report):
    """triple32 shuts the vCPU down at once: SHUTDOWN, KVM exit 8, long before the deadline, named in the failure."""
    vcpu = _triple32_vm(make_memory, make_vm)
    t0 = time.monotonic()
    ex = vcpu.run(timeout=5.0)
    took = time.monotonic() - t0
    assert ex.reason is ExitReason.SHUTDOWN, f"expected SHUTDOWN, saw {ex.describe()}"
    assert ex.kvm_exit_reason == KVM_EXIT_SHUTDOWN, f"kvm_run->exit_reason: expected {KVM_EXIT_SHUTDOWN}, " \
                                                    f"saw {ex.kvm_exit_reason}"
    print(f"triple fault came back in {took * 1e3:.1f} ms")  # SHUTDOWN, not TIMEOUT, is the proof
    failure = _phase_failure(report, "run triple32", ex)
    assert "guest did not halt: SHUTDOWN: KVM_EXIT_SHUTDOWN (exit reason 8), the guest triple-faulted" in failure, \
        f"unclear failure: {failure}"


def test_runner_ends_a_never_halting_guest_at_its_deadline(make_memory, make_vm):
    """A VcpuRunner's deadline ends spin16's thread on time, with TIMEOUT recorded and the thread joined."""
    vcpu = _spin16_vm(make_memory, make_vm, "flat32")
    runner = VcpuRunner([vcpu], timeout=DEADLINE_S).start()
    assert runner.wait_finished(DEADLINE_S + LATE_S + 1.0), "the runner's vCPU thread outlived its deadline"
    exits = runner.stop(timeout=1.0)
    assert exits[0].reason is ExitReason.TIMEOUT, f"expected TIMEOUT, saw {exits[0].describe()}"


def test_runner_stop_ends_a_never_halting_guest_at_once(make_memory, make_vm):
    """stop() kicks spin16 out of KVM_RUN and joins its thread within its own time-out."""
    vcpu = _spin16_vm(make_memory, make_vm, "real-mode")
    runner = VcpuRunner([vcpu], timeout=60.0).start()
    time.sleep(0.05)
    t0 = time.monotonic()
    exits = runner.stop(timeout=2.0)
    took = time.monotonic() - t0
    assert exits[0].reason is ExitReason.KICKED, f"expected KICKED, saw {exits[0].describe()}"
    print(f"stop took {took * 1e3:.1f} ms")  # bounded by stop(timeout=2.0), which raises on a hang


def test_runner_of_a_triple_faulted_guest_still_pauses(make_memory, make_vm):
    """A vCPU that shut down counts as stopped: pause(), the live snapshot's first step, returns."""
    vcpu = _triple32_vm(make_memory, make_vm)
    with VcpuRunner([vcpu], timeout=5.0).start() as runner:
        assert runner.wait_finished(2.0), "triple32's thread still running 2 s after start"
        runner.pause(timeout=1.0)
        assert runner.exits[0].reason is ExitReason.SHUTDOWN, f"expected SHUTDOWN, saw {runner.exits[0].describe()}"
