"""Dropping a userfaultfd while faults are pending wakes the faulting threads; the engine does not rely on it.

What the kernel does (kernel 6.18.44, kvm_pvm, measured here with a uffd nobody reads): closing
the last fd releases the context (userfaultfd_release), which wakes every waiter, pending or read,
and un-registers the range. A vCPU inside KVM_RUN and a host thread both resume in well under a
millisecond, and their writes land (never captured: the snapshot would be torn).

Whether the release also clears the pages' write-protect bits depends on the kernel: only since
"mm/userfaultfd: reset ptes when close() for wr-protected ones" (Linux 6.9, backported to stable
6.1 between Debian's 6.1.0-50 (6.1.176), where all 256 pages of the 1 MiB test range keep
PM_UFFD_WP after the close, and 6.1.0-57 (6.1.192), where none do; measured on kvm_amd nested). So
the bare close is judged on the wake alone and reports what it left; the engine's close path does
not depend on the kernel for either: sp_wp_destroy() un-protects the whole region first (which
alone wakes every waiter and clears every bit), joins the handler, un-registers, and only then
closes the uffd. Both orders are tested, and the engine's leaves no bit on every kernel.
"""

from __future__ import annotations

import time

import pytest
from snapproof.native.kvm import ExitReason
from snapproof.native.uffd import release_clears_wp

from snapproof import guests
from tests.reliability_support import Gauges, HostWriter, UnservedWp, VcpuThread, threads_settled, uffd_fds

pytestmark = pytest.mark.needs("kvm", "uffd", "uffd.WP_HUGETLBFS_SHMEM")

FREED_WITHIN_S = 3.0
# How long the first WP fault may take to arrive: a hang ceiling, not a speed (TCG runs the guest emulated).
FAULT_ARRIVES_WITHIN_S = 30.0
HOST_TARGET = 5 * 4096
SETTLE_S = 0.05  # the waiter is asleep in handle_userfault by then, not merely on its way


def _blocked_vcpu(make_memory, make_marker16_vm):
    mem = make_memory("memfd", 1 << 20)
    vm, vcpu = make_marker16_vm(mem)
    mem.populate()
    return mem, vcpu


def test_closing_the_uffd_wakes_a_vcpu_waiting_on_a_wp_fault(make_memory, make_marker16_vm, record_property):
    """close(uffd) alone frees a vCPU on an unread WP fault: HLT, the write landed (the WP bits it leaves are the
    kernel's to clear, and only kernels with the 2024 fix do: reported, not judged)."""
    mem, vcpu = _blocked_vcpu(make_memory, make_marker16_vm)
    with UnservedWp(mem) as wp:
        runner = VcpuThread(vcpu, 5.0).start()
        try:
            assert wp.fault_pending(timeout=FAULT_ARRIVES_WITHIN_S), \
                f"marker16's write raised no WP fault within {FAULT_ARRIVES_WITHIN_S} s"
            time.sleep(SETTLE_S)
            assert not runner.join(0), f"the vCPU left KVM_RUN with its fault unserved: {runner.exit}"
            t0 = time.monotonic()
            wp.close()
            freed = runner.join(FREED_WITHIN_S)
        finally:
            wp.close()
            runner.join(FREED_WITHIN_S)
        assert freed, f"vCPU still in KVM_RUN {FREED_WITHIN_S} s after the uffd was closed"
        woke_ms = (runner.ended - t0) * 1e3
        assert runner.exit.reason is ExitReason.HLT, f"expected HLT, saw {runner.exit.describe()}"
        assert mem.byte(guests.MARKER_GPA) == guests.MARKER_AFTER, (
            f"mem[0x1000]: expected {guests.MARKER_AFTER:#04x}, saw {mem.byte(guests.MARKER_GPA):#04x}")
        left = wp.wp_pages()
    # Reported, not judged; but it must be the kernel's one answer, the host table's probe's (an anonymous page
    # with no fault pending): all of the memfd's pages cleared, or none.
    clears = release_clears_wp()
    npages = mem.size // 4096
    assert left == (0 if clears else npages), (
        f"after close(uffd) {left} of {npages} pages keep PM_UFFD_WP, but the host probe says the release "
        f"{'clears every bit' if clears else 'keeps every bit'}")
    record_property("vcpu_woken_by_close_ms", round(woke_ms, 3))
    record_property("wp_pages_left_by_bare_close", left)
    kept = (f"{left} pages keep PM_UFFD_WP: this kernel lacks \"mm/userfaultfd: reset ptes when close() for "
            "wr-protected ones\" (6.9; stable 6.1 after 6.1.176); the engine un-protects before it closes"
            if left else "0 pages keep PM_UFFD_WP")
    print(f"close(uffd) -> vCPU out of KVM_RUN in {woke_ms:.3f} ms; write landed; {kept}")


def test_closing_the_uffd_wakes_a_host_thread_waiting_on_a_wp_fault(make_memory, record_property):
    """A host thread's write waiting on an unread WP fault completes once the uffd is closed."""
    mem = make_memory("memfd", 1 << 20)
    mem.populate()
    with UnservedWp(mem) as wp:
        writer = HostWriter(mem, HOST_TARGET, 0x42).start()
        try:
            assert wp.fault_pending(timeout=FAULT_ARRIVES_WITHIN_S), \
                f"the host write raised no WP fault within {FAULT_ARRIVES_WITHIN_S} s"
            time.sleep(SETTLE_S)
            assert not writer.join(0), "the host write completed with its fault unserved"
            t0 = time.monotonic()
            wp.close()
            freed = writer.join(FREED_WITHIN_S)
        finally:
            wp.close()
            writer.join(FREED_WITHIN_S)
        assert freed, f"host writer still blocked {FREED_WITHIN_S} s after the uffd was closed"
        assert mem.byte(HOST_TARGET) == 0x42, f"GPA {HOST_TARGET:#x}: expected 0x42, saw {mem.byte(HOST_TARGET):#04x}"
    woke_ms = (writer.done_at - t0) * 1e3
    record_property("host_writer_woken_by_close_ms", round(woke_ms, 3))
    print(f"close(uffd) -> host writer done in {woke_ms:.3f} ms")


def test_unprotect_alone_wakes_the_waiter_before_the_uffd_is_dropped(make_memory, make_marker16_vm):
    """The engine's order: un-protecting wakes the vCPU while the uffd is still open; the close comes after."""
    mem, vcpu = _blocked_vcpu(make_memory, make_marker16_vm)
    with UnservedWp(mem) as wp:
        runner = VcpuThread(vcpu, 5.0).start()
        try:
            assert wp.fault_pending(timeout=FAULT_ARRIVES_WITHIN_S), \
                f"marker16's write raised no WP fault within {FAULT_ARRIVES_WITHIN_S} s"
            time.sleep(SETTLE_S)
            wp.unprotect()
            freed = runner.join(FREED_WITHIN_S)
            still_open = wp.fd is not None
        finally:
            wp.close()
            runner.join(FREED_WITHIN_S)
    assert still_open, "the uffd was closed before the check"
    assert freed, f"vCPU still in KVM_RUN {FREED_WITHIN_S} s after the un-protect"
    assert runner.exit.reason is ExitReason.HLT, f"expected HLT, saw {runner.exit.describe()}"


def test_engine_close_mid_snapshot_unprotects_joins_and_drops_the_uffd(make_memory):
    """Closing a half-copied WpSnapshot leaves no WP page, uffd or handler thread; writes go through."""
    from snapproof.native.wp import WpSnapshot

    before = Gauges.settled()
    mem = make_memory("memfd", 1 << 20)
    mem.populate()
    snap = WpSnapshot(mem, bytearray(mem.size))
    snap.arm()
    snap.bulk_copy(0, snap.npages // 2)  # half captured, half still protected
    _, wp_bits = snap.protection()
    assert sum(wp_bits) == snap.npages - snap.npages // 2, f"expected {snap.npages // 2} protected pages " \
                                                           f"mid-snapshot, saw {sum(wp_bits)}"
    snap.close()
    from snapproof.native.wp import read_pagemap

    left = sum(read_pagemap(mem.addr, mem.size // 4096)[1])
    assert left == 0, f"expected no PM_UFFD_WP after close, {left} pages keep it"
    # At most as many uffds as before: an earlier test's may still be closed by the collector meanwhile. The
    # threads started settled (no earlier VM's worker or joined handler left to go), so the count is exact.
    assert uffd_fds() <= before.uffds, f"userfaultfds: expected at most {before.uffds}, saw {uffd_fds()}"
    threads = threads_settled(before.threads)
    assert threads == before.threads, f"threads: expected {before.threads} after close, saw {threads}"
    writer = HostWriter(mem, mem.size - 4096, 0x42).start()
    assert writer.join(FREED_WITHIN_S), "a write to the last page blocked after the engine was closed"
