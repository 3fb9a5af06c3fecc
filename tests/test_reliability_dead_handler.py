"""A WP fault-handler thread that dies mid-snapshot never leaves a writer blocked, and the run goes on.

What the kernel does with a vCPU whose write waits on a WP fault nobody serves, when the run loop's
deadline signal (SIGRTMIN+4 + immediate_exit) arrives (the first test here measures it and says which):

- kvm_pvm (kernel 6.18.44, an emulating KVM): the signal ends the sleep in handle_userfault, the
  emulator retries the write at once, and the thread spins in the kernel at 100% CPU, the signal
  pending, until the page is un-protected;
- kvm_amd on 6.1: the thread sleeps in KVM_RUN (state D, no CPU) until the page is un-protected;
  then the pending signal ends KVM_RUN before the guest retries its store (TIMEOUT, RIP on it);
- hardware KVM from about 6.2 (faults taken interruptibly): KVM_RUN returns EINTR at the deadline,
  the store not done.

So a time-out never frees a writer by completing its write, and on kvm_pvm not even by ending the
run: a handler that exits unasked un-protects the whole region on its way out
(native/linux/uffd_wp.c, handler_exit), which wakes every waiter, and from then on the engine
refuses to arm, copy or finalize (EOWNERDEAD -> native.errors.HandlerDied naming it).
"""

from __future__ import annotations

import errno
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import pytest
from snapproof.native.errors import HandlerDied
from snapproof.native.inject import FaultInjection
from snapproof.native.kvm import ExitReason

from snapproof import guests
from tests.phase_runner import run_phase
from tests.reliability_support import (
    Gauges,
    HostWriter,
    UnservedWp,
    VcpuThread,
    thread_cpu_seconds,
    threads_settled,
    uffd_fds,
)

pytestmark = pytest.mark.needs("kvm", "uffd", "uffd.WP_HUGETLBFS_SHMEM")

RUN_DEADLINE_S = 0.3
FAULT_WITHIN_S = 10.0  # marker16 stores at its second instruction: this only bounds a failure (TCG is slow)
FREED_WITHIN_S = 3.0   # a woken waiter returns in well under a millisecond; this only bounds a failure
# marker16 (guests/marker16.S) at 0:0x100: mov $0x42,%al (2 bytes); mov %al,0x1000 (3 bytes); hlt.
MARKER16_STORE_IP = guests.REAL_MODE_LOAD_GPA + 2
MARKER16_HLT_IP = MARKER16_STORE_IP + 3
STATE_SAMPLE_S = 0.05  # how often the watch past the deadline reads the vCPU thread's scheduler state
# How the live protocol ends when a vCPU stays blocked on a fault no one serves (native/live.py, GuestTimeout): a
# phase that fails naming the dead handler must not have ended this way.
LIVE_PROTOCOL_TIMED_OUT = "did not stop within"
PHASE2 = "test_phase2_live_consistency.py"
PHASE2_SMALL = "test_live_snapshot_of_memfd_is_memory_at_the_arm_instant[1MiB-2vcpus]"
FOLLOW_UP = "test_engine_and_guest_work_after_a_dead_handler"
DIED = "the WP fault handler thread died mid-snapshot (errno 125 ECANCELED"


def test_vcpu_waiting_on_an_unserved_wp_fault_completes_its_store_once_the_page_is_unprotected(
        make_memory, make_marker16_vm, record_property):
    """Past its deadline a vCPU on an unserved WP fault has not stored; un-protected, its store lands and it halts."""
    mem = make_memory("memfd", 1 << 20)
    vm, vcpu = make_marker16_vm(mem)
    mem.populate()
    with UnservedWp(mem) as wp:
        runner = VcpuThread(vcpu, RUN_DEADLINE_S).start()
        try:
            assert wp.fault_pending(timeout=FAULT_WITHIN_S), \
                f"marker16's write to 0x1000 raised no WP fault within {FAULT_WITHIN_S} s"
            # Let the deadline pass, then watch the thread for half a second.
            time.sleep(max(0.0, runner.started + RUN_DEADLINE_S + 0.2 - time.monotonic()))
            behaviour = watch_past_the_deadline(runner, 0.5)
            print(f"deadline {RUN_DEADLINE_S} s passed 0.7 s ago: {behaviour.observed}")
            record_property("deadline_behaviour", behaviour.kind)
            record_property("observed", behaviour.observed)
            marker = mem.byte(guests.MARKER_GPA)
            assert marker == guests.MARKER_BEFORE, (
                f"mem[0x1000] with the fault unserved: expected {guests.MARKER_BEFORE:#04x}, saw {marker:#04x}")
            wp.unprotect()
            t0 = time.monotonic()
            assert runner.join(FREED_WITHIN_S), f"vCPU still in KVM_RUN {FREED_WITHIN_S} s after the un-protect"
        finally:
            wp.close()  # releasing the uffd wakes any waiter too (tests/test_reliability_uffd_close.py)
            runner.join(FREED_WITHIN_S)
    assert runner.error is None, f"the run raised {runner.error!r}"
    first = runner.exit
    if not behaviour.left_kvm_run:
        print(f"un-protect -> KVM_RUN returned in {(runner.ended - t0) * 1e3:.2f} ms: {first.describe()}")
    assert first.reason in (ExitReason.HLT, ExitReason.TIMEOUT), f"first run: expected HLT or TIMEOUT, saw " \
                                                                  f"{first.describe()}"
    record_property("first_run_exit", first.reason.name)
    if first.reason is ExitReason.TIMEOUT:
        # The deadline's signal ended the run: before the store (RIP on it, nothing written) or after it.
        eip, marker = vcpu.regs()["eip"], mem.byte(guests.MARKER_GPA)
        want = {MARKER16_STORE_IP: guests.MARKER_BEFORE, MARKER16_HLT_IP: guests.MARKER_AFTER}
        assert eip in want, f"first run ended in TIMEOUT at IP {eip:#x}: expected the store at " \
                            f"{MARKER16_STORE_IP:#x} or the hlt at {MARKER16_HLT_IP:#x}"
        assert marker == want[eip], f"IP {eip:#x} after the first run: expected mem[0x1000] {want[eip]:#04x}, " \
                                    f"saw {marker:#04x}"
        again = vcpu.run(timeout=FREED_WITHIN_S)
        assert again.reason is ExitReason.HLT, f"second run, the page un-protected: expected HLT, saw " \
                                               f"{again.describe()}"
        store = "in a second run (the first ended in TIMEOUT still on the store)" if eip == MARKER16_STORE_IP \
            else "in the first run, which then ended in TIMEOUT before the hlt"
    else:
        store = "in the first run, which halted"
    print(f"the store landed {store}")
    record_property("store_landed", store)
    assert mem.byte(guests.MARKER_GPA) == guests.MARKER_AFTER, (
        f"mem[0x1000]: expected {guests.MARKER_AFTER:#04x} once freed, saw {mem.byte(guests.MARKER_GPA):#04x}")


@dataclass(frozen=True)
class DeadlineBehaviour:
    """What a vCPU thread on an unserved fault did after its run's deadline: which of the known kernel
    behaviours (module docstring) it showed, and the evidence."""

    kind: str
    left_kvm_run: bool
    observed: str


def watch_past_the_deadline(runner: VcpuThread, window: float) -> DeadlineBehaviour:
    """Watch the vCPU thread for ``window`` seconds: gone from KVM_RUN, or in it spinning (it ran: its CPU time
    grew or it was seen running) or asleep (neither). How much CPU it got says nothing here: the host is shared."""
    cpu0, state = thread_cpu_seconds(runner.tid)
    states = {state}
    end = time.monotonic() + window
    while time.monotonic() < end and not runner.join(0):
        time.sleep(STATE_SAMPLE_S)
        if not runner.join(0):
            states.add(thread_cpu_seconds(runner.tid)[1])
    if runner.join(0):
        return DeadlineBehaviour("left KVM_RUN at the deadline (EINTR)", True,
                                 f"vCPU thread left KVM_RUN: {runner.exit.describe()}")
    cpu1, state = thread_cpu_seconds(runner.tid)
    states.add(state)
    ran = cpu1 > cpu0 or "R" in states
    kind = "stayed in KVM_RUN, spinning (an emulating KVM)" if ran else "stayed in KVM_RUN, asleep"
    return DeadlineBehaviour(kind, False, f"vCPU thread still in KVM_RUN, states seen {''.join(sorted(states))}, "
                                          f"{cpu1 - cpu0:.2f} s of CPU over {window} s: {kind}")


def test_dead_handler_unprotects_the_region_so_the_guest_completes(make_memory, make_marker16_vm):
    """HANDLER_DIES: the dying handler un-protects all, the guest halts, the void snapshot is refused."""
    from snapproof.native.wp import WpSnapshot

    before = Gauges.settled()
    mem = make_memory("memfd", 1 << 20)
    vm, vcpu = make_marker16_vm(mem)
    snapshot = bytearray(mem.size)
    snap = WpSnapshot(mem, snapshot, inject=FaultInjection.HANDLER_DIES)
    try:
        snap.arm()
        runner = VcpuThread(vcpu, 5.0).start()
        freed = runner.join(FREED_WITHIN_S)
        if not freed:
            snap.release()  # free it before failing: a stuck KVM_RUN must not outlive the test
            runner.join(FREED_WITHIN_S)
        assert freed, f"guest still blocked {FREED_WITHIN_S} s after its handler died"
        assert runner.exit.reason is ExitReason.HLT, f"expected HLT, saw {runner.exit.describe()}"
        stats = snap.stats()
        assert stats.handler_died and stats.handler_err == errno.ECANCELED, (
            f"expected a dead handler with errno {errno.ECANCELED}, saw alive={stats.handler_alive}, "
            f"errno {stats.handler_err}")
        _, wp_bits = snap.protection()
        assert sum(wp_bits) == 0, f"expected the dying handler to un-protect all {snap.npages} pages, " \
                                  f"{sum(wp_bits)} still carry PM_UFFD_WP"
        assert mem.byte(guests.MARKER_GPA) == guests.MARKER_AFTER, "the guest's write did not land"
        for call in (snap.bulk_copy, snap.finalize, snap.arm):
            with pytest.raises(HandlerDied, match=DIED.replace("(", r"\(")):
                call()
    finally:
        snap.close()
        vm.close()  # its KVM worker thread goes with it
    assert uffd_fds() == before.uffds, f"userfaultfds: expected {before.uffds} after close, saw {uffd_fds()}"
    threads = threads_settled(before.threads)
    assert threads == before.threads, f"threads: expected {before.threads} after close, saw {threads}"


def test_dead_handler_frees_a_host_thread_blocked_on_its_write(make_memory, make_wp):
    """A host thread's write held by the fault the handler died on completes: the dying handler woke it."""
    mem = make_memory("memfd", 1 << 20)
    snap = make_wp(mem, bytearray(mem.size), inject=FaultInjection.HANDLER_DIES)
    snap.arm()
    writer = HostWriter(mem, 5 * 4096, 0x42).start()
    freed = writer.join(FREED_WITHIN_S)
    if not freed:
        snap.release()
        writer.join(FREED_WITHIN_S)
    assert freed, f"host writer still blocked {FREED_WITHIN_S} s after the handler died"
    assert snap.stats().handler_died, "expected the injected handler death"
    assert mem.byte(5 * 4096) == 0x42, f"GPA 0x5000: expected 0x42, saw {mem.byte(5 * 4096):#04x}"


def test_phase2_fails_naming_the_dead_handler_and_the_child_runs_the_next_test(tmp_path, record_property):
    """Phase 2 under handler-dies fails naming the dead handler, on the engine's error rather than at the live
    protocol's time-out (how long the case took is recorded, never judged); the same child then passes the next
    test."""
    junit = tmp_path / "child.xml"
    t0 = time.monotonic()
    run = run_phase(PHASE2, "tests/reliability_child_cases.py", "-k", f"1MiB-2vcpus or {FOLLOW_UP}",
                    f"--junitxml={junit}", inject="handler-dies")
    child_s = time.monotonic() - t0
    assert run.outcome(PHASE2_SMALL) == "failed", f"expected phase 2 to fail, saw {run.outcome(PHASE2_SMALL)}: " \
                                                  f"{run.output[-2000:]}"
    failure = run.failure(PHASE2_SMALL)
    assert DIED in failure and "HANDLER_DIES" in failure, f"failure does not name the dead handler: {failure}"
    assert LIVE_PROTOCOL_TIMED_OUT not in failure, f"phase 2 ended at the live protocol's time-out: {failure}"
    case_s = run.cases()[PHASE2_SMALL]["duration_ns"] / 1e9
    cases = [(c.get("name"), "failed" if c.find("failure") is not None or c.find("error") is not None
              else "skipped" if c.find("skipped") is not None else "passed")
             for c in ET.parse(junit).getroot().iter("testcase")]
    names = [n for n, _ in cases]
    assert names == [PHASE2_SMALL, FOLLOW_UP], f"expected the phase 2 case then {FOLLOW_UP}, the child ran {names}"
    assert cases[1][1] == "passed", f"the next test in the same child: expected passed, saw {cases[1][1]}:\n" \
                                    f"{run.output[-3000:]}"
    record_property("phase2_failed_after_s", round(case_s, 4))
    print(f"phase 2 failed after {case_s * 1e3:.1f} ms: {failure}\nnext test in the same child: passed "
          f"(child {child_s:.1f} s)")
