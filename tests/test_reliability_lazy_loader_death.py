"""A lazy loader that stops serving mid-restore fails closed: the guest stops, the run names the loader's death.

What the kernel does, measured here with a MISSING-mode uffd that nobody serves (kvm_pvm on 6.18.44 and
kvm_amd on 6.1, nested; peek16 reads GPA 0x1000 and 0x2000, pages never installed):

- closing the uffd releases it: the vCPU waiting on the fault resumes within about 2 ms (1.2 ms on kvm_pvm
  with a memfd, 0.2 ms anonymous; 29 ms on 6.1 under TCG), reads zeros from both pages and halts, no
  error anywhere (ORIGINS.md: fcvm PR #739 saw the same on 6.18);
- with the uffd left open, a kick and the run's deadline signal do not free the vCPU: it stays in
  KVM_RUN (10 s watched on both kernels) until the fault resolves;
- fencing the missing pages (mprotect PROT_NONE) and then waking the waiters stops the vCPU at the
  fenced page instead: a KVM_EXIT_MMIO read at GPA 0x1000 on kvm_pvm (an instruction fetch from a fenced
  page ends in KVM_EXIT_INTERNAL_ERROR, emulation), KVM_RUN failing with EFAULT, RIP on the load, on
  kvm_amd 6.1 (6.8+ adds KVM_EXIT_MEMORY_FAULT with the GPA).

So the lazy loader (native/linux/uffd_lazy.c) fences every page still missing whenever it stops serving
(its handler dies, its uffd is closed, it is released early) before anyone waiting is woken, and
native/restore.py turns the next run of the VM into LoaderDied naming why. The fault injection
LAZY_UFFD_CLOSES_MID_RESTORE closes the loader's uffd at the guest's first fault, as a handler process
that dies would; LAZY_UFFD_UNGUARDED removes the fence and the error, and the guest reads zeros again.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from snapproof.native.errors import LoaderDied
from snapproof.native.inject import FaultInjection
from snapproof.native.kvm import ExitReason

from snapproof import guests
from tests.reliability_support import Gauges, UnservedMissing, VcpuThread, threads_settled, uffd_fds

pytestmark = [pytest.mark.platform("linux"), pytest.mark.needs("kvm", "uffd", "uffd.MISSING_SHMEM")]

FAULT_WITHIN_S = 10.0  # peek16 reads 0x1000 at its first instruction: this only bounds a failure (TCG is slow)
FREED_WITHIN_S = 3.0   # a woken waiter returns in milliseconds; this only bounds a failure
SETTLE_S = 0.05        # the waiter is asleep in handle_userfault by then, not merely on its way
WATCH_S = 1.0          # how long a vCPU on an unserved fault is watched past its kick and deadline
RUN_DEADLINE_S = 0.3
PEEK_CODE = 0x100      # peek16's first instruction: mov 0x1000, %al
FIRST, SECOND = 0x1000, 0x2000   # the two pages peek16 reads
FILE_FIRST, FILE_SECOND = 0x11, 0x22  # what the snapshot file holds there
FENCED_EXITS = (ExitReason.MMIO, ExitReason.EFAULT, ExitReason.MEMORY_FAULT, ExitReason.INTERNAL)
BACKINGS = ["memfd", "anonymous"]


def peek16_vm(make_memory, make_vm, backing: str):
    """peek16 at 0:0x100 in 1 MiB of ``backing`` memory, page 0 populated, 0x1000 and 0x2000 never touched."""
    mem = make_memory(backing, 1 << 20)
    mem.write(guests.REAL_MODE_LOAD_GPA, guests.load("peek16"))
    vcpu = make_vm(mem).add_vcpu()
    vcpu.set_real_mode(ip=guests.REAL_MODE_LOAD_GPA)
    return mem, vcpu


# -- what the kernel does with a MISSING fault nobody serves ----------------------------------------------


@pytest.mark.parametrize("backing", BACKINGS)
def test_closing_the_uffd_lets_a_waiting_vcpu_read_zeros(make_memory, make_vm, record_property, backing):
    """close(uffd) with the guest's read of a never-installed page pending: the guest reads 0x00 there and at
    0x2000 and halts, no error anywhere. The hazard the lazy loader's fence exists for."""
    mem, vcpu = peek16_vm(make_memory, make_vm, backing)
    with UnservedMissing(mem) as uffd:
        runner = VcpuThread(vcpu, 5.0).start()
        try:
            assert uffd.fault_pending(FAULT_WITHIN_S), f"peek16's read of {FIRST:#x} raised no MISSING fault"
            time.sleep(SETTLE_S)
            assert not runner.join(0), f"the vCPU left KVM_RUN with its fault unserved: {runner.exit}"
            t0 = time.monotonic()
            uffd.close()
            freed = runner.join(FREED_WITHIN_S)
        finally:
            uffd.close()
            runner.join(FREED_WITHIN_S)
    assert freed, f"vCPU still in KVM_RUN {FREED_WITHIN_S} s after the uffd was closed"
    assert runner.error is None, f"the run raised {runner.error!r}"
    assert runner.exit.reason is ExitReason.HLT, f"expected HLT, saw {runner.exit.describe()}"
    assert runner.exit.debug == b"\x00\x00", (f"bytes the guest read at {FIRST:#x} and {SECOND:#x}: expected "
                                              f"00 00 (zero pages), saw {runner.exit.debug.hex(' ')}")
    woke_ms = (runner.ended - t0) * 1e3
    record_property("zeros_read_after_close_ms", round(woke_ms, 3))
    print(f"{backing}: close(uffd) -> the guest read 00 00 and halted {woke_ms:.3f} ms later")


def test_a_vcpu_on_an_unserved_missing_fault_outlasts_its_kick_and_deadline(make_memory, make_vm, record_property):
    """With the uffd left open, neither a kick nor the run's deadline frees the vCPU: it stays in KVM_RUN until the
    fault resolves. A watchdog that only kicks cannot stop a guest whose loader died."""
    mem, vcpu = peek16_vm(make_memory, make_vm, "memfd")
    with UnservedMissing(mem) as uffd:
        runner = VcpuThread(vcpu, RUN_DEADLINE_S).start()
        try:
            assert uffd.fault_pending(FAULT_WITHIN_S), f"peek16's read of {FIRST:#x} raised no MISSING fault"
            vcpu.kick()
            time.sleep(max(0.0, runner.started + RUN_DEADLINE_S - time.monotonic()))
            stayed = not runner.join(WATCH_S)
            # Freed onto a fence, not by the close: nothing reads zeros here.
            uffd.fence(FIRST, mem.size - FIRST)
            uffd.wake()
            freed = runner.join(FREED_WITHIN_S)
        finally:
            uffd.close()
            runner.join(FREED_WITHIN_S)
    assert stayed, f"the vCPU left KVM_RUN after its kick and deadline, its fault unserved: {runner.exit.describe()}"
    assert freed, f"vCPU still in KVM_RUN {FREED_WITHIN_S} s after the fence and wake"
    record_property("kick_and_deadline_freed_it", False)
    print(f"kicked, deadline {RUN_DEADLINE_S} s passed {WATCH_S} s ago: still in KVM_RUN; fenced + woken: "
          f"{runner.exit.describe()}")


@pytest.mark.parametrize("backing", BACKINGS)
def test_fencing_the_missing_pages_then_waking_stops_the_vcpu_at_them(make_memory, make_vm, record_property,
                                                                      backing):
    """mprotect(PROT_NONE) over the pages never installed, then UFFDIO_WAKE: the vCPU leaves KVM_RUN at the fenced
    page with a memory exit, having read nothing."""
    mem, vcpu = peek16_vm(make_memory, make_vm, backing)
    with UnservedMissing(mem) as uffd:
        runner = VcpuThread(vcpu, 5.0).start()
        try:
            assert uffd.fault_pending(FAULT_WITHIN_S), f"peek16's read of {FIRST:#x} raised no MISSING fault"
            time.sleep(SETTLE_S)
            t0 = time.monotonic()
            uffd.fence(FIRST, mem.size - FIRST)
            uffd.wake()
            freed = runner.join(FREED_WITHIN_S)
        finally:
            uffd.close()
            runner.join(FREED_WITHIN_S)
    assert freed, f"vCPU still in KVM_RUN {FREED_WITHIN_S} s after the fence and wake"
    assert runner.error is None, f"the run raised {runner.error!r}"
    ex = runner.exit
    assert ex.reason in FENCED_EXITS, f"expected one of {[r.name for r in FENCED_EXITS]}, saw {ex.describe()}"
    assert ex.debug == b"", f"the guest read {ex.debug.hex(' ')} from a fenced page"
    if ex.reason is ExitReason.MMIO:
        assert (ex.mmio_gpa, ex.mmio_is_write) == (FIRST, False), f"expected an MMIO read at {FIRST:#x}, saw " \
                                                                  f"{ex.describe()}"
    if ex.reason in (ExitReason.EFAULT, ExitReason.MEMORY_FAULT):
        assert ex.rip == PEEK_CODE, f"guest RIP after the fenced read: expected {PEEK_CODE:#x}, saw {ex.describe()}"
    record_property("fenced_exit", ex.reason.name)
    print(f"{backing}: fenced + woken -> {ex.describe()} after {(runner.ended - t0) * 1e3:.3f} ms")


# -- the lazy loader fails closed ---------------------------------------------------------------------------


@pytest.fixture
def peek16_file(tmp_path: Path) -> Path:
    """A 1 MiB snapshot file: peek16 at 0x100, 0x11 at GPA 0x1000, 0x22 at GPA 0x2000, no vCPU state."""
    from snapproof.native.image import SnapshotImage

    with SnapshotImage.create(tmp_path / "peek16.snap", 1 << 20) as w:
        code = guests.load("peek16")
        w.memory[guests.REAL_MODE_LOAD_GPA:guests.REAL_MODE_LOAD_GPA + len(code)] = code
        w.memory[FIRST], w.memory[SECOND] = FILE_FIRST, FILE_SECOND
        return Path(w.finalize().path)


def enter_peek16(vcpu) -> None:
    vcpu.set_real_mode(ip=guests.REAL_MODE_LOAD_GPA)


@pytest.mark.parametrize("backing", BACKINGS)
def test_lazy_uffd_closed_at_the_guests_first_fault_stops_the_guest_and_names_it(make_restored_vm, peek16_file,
                                                                                 backing):
    """LAZY_UFFD_CLOSES_MID_RESTORE: the run fails with LoaderDied naming the closed uffd, every page never
    restored is fenced, the prefetch and host reads of those pages refuse the same way, nothing leaks."""
    before = Gauges.settled()
    restored = make_restored_vm(peek16_file, "lazy-uffd", verify=False, reset=enter_peek16, lazy_backing=backing,
                                inject=FaultInjection.LAZY_UFFD_CLOSES_MID_RESTORE)
    restored.memory.read(0, 1)  # page 0 (the code) installed by a host read: the guest's first fault is at 0x1000
    with pytest.raises(LoaderDied, match=r"the vCPU run ended with .*: the lazy loader stopped serving guest memory "
                                         r"mid-restore: its userfaultfd was closed under it") as died:
        restored.vcpu.run(timeout=5.0)
    s = restored.lazy.stats()
    npages = restored.memory.size // 4096
    assert (s.end.name, s.fenced_pages, s.fence_err) == ("UFFD_CLOSED", npages - 1, 0), \
        f"expected the uffd closed and {npages - 1} pages fenced, saw {s.end.name}, {s.fenced_pages} fenced, " \
        f"fence errno {s.fence_err}"
    assert "fault injection LAZY_UFFD_CLOSES_MID_RESTORE" in str(died.value), str(died.value)
    with pytest.raises(LoaderDied, match=r"prefetch the rest: the lazy loader stopped serving"):
        restored.lazy.prefetch_all()
    with pytest.raises(LoaderDied, match=r"host access to memory \[0x1000, 0x1001\): the lazy loader stopped"):
        restored.memory.byte(FIRST)
    assert restored.memory.read(guests.REAL_MODE_LOAD_GPA, 1) == guests.load("peek16")[:1], "page 0 no longer reads"
    print(f"{backing}: {died.value}")
    restored.close()
    assert uffd_fds() == before.uffds, f"userfaultfds: expected {before.uffds} after close, saw {uffd_fds()}"
    threads = threads_settled(before.threads)
    assert threads == before.threads, f"threads: expected {before.threads} after close, saw {threads}"


def test_the_unguarded_loader_lets_the_guest_read_zeros_where_the_file_has_data(make_restored_vm, peek16_file):
    """LAZY_UFFD_UNGUARDED with the same close: no fence, no error; peek16 reads 00 00 where the file holds 11 22,
    and zero_filled_pages() names both pages. What the guard prevents, shown."""
    restored = make_restored_vm(peek16_file, "lazy-uffd", verify=False, reset=enter_peek16,
                                inject=FaultInjection.LAZY_UFFD_CLOSES_MID_RESTORE | FaultInjection.LAZY_UFFD_UNGUARDED)
    restored.memory.read(0, 1)
    ex = restored.vcpu.run(timeout=5.0)
    assert ex.reason is ExitReason.HLT, f"expected the unguarded guest to run on and halt, saw {ex.describe()}"
    assert ex.debug == b"\x00\x00", (f"bytes peek16 read at {FIRST:#x} and {SECOND:#x}: expected 00 00 with the guard "
                                     f"removed (the file holds {FILE_FIRST:02x} {FILE_SECOND:02x}), saw "
                                     f"{ex.debug.hex(' ')}")
    filled = restored.restored.zero_filled_pages()
    assert filled == [FIRST, SECOND], f"zero-filled pages: expected {[hex(FIRST), hex(SECOND)]}, saw " \
                                      f"{[hex(o) for o in filled]}"


def test_a_lazy_loader_released_with_pages_missing_fences_them(make_restored_vm, peek16_file):
    """release() with 0x2000 never restored: the page is fenced, the guest reads 0x11 at 0x1000 and stops at 0x2000,
    and the run fails naming the early release; a host read of it refuses the same way."""
    restored = make_restored_vm(peek16_file, "lazy-uffd", verify=False, reset=enter_peek16)
    assert restored.memory.read(0, 1) == b"\x00" and restored.memory.byte(FIRST) == FILE_FIRST
    restored.lazy.release()
    s = restored.lazy.stats()
    npages = restored.memory.size // 4096
    assert (s.end.name, s.fenced_pages) == ("RELEASED", npages - 2), \
        f"expected RELEASED with {npages - 2} pages fenced, saw {s.end.name} with {s.fenced_pages}"
    with pytest.raises(LoaderDied, match=r"the vCPU run ended with (?!HLT).*: the lazy loader stopped serving guest "
                                         r"memory mid-restore: it was released with pages still missing") as died:
        restored.vcpu.run(timeout=5.0)
    with pytest.raises(LoaderDied, match=r"host access to memory \[0x2000, 0x2001\)"):
        restored.memory.byte(SECOND)
    print(died.value)


def test_a_lazy_loader_released_whole_leaves_plain_memory_and_the_guest_runs(make_restored_vm, peek16_file):
    """The control: prefetched, then released, nothing is fenced, and peek16 reads the file's 11 22 and halts."""
    restored = make_restored_vm(peek16_file, "lazy-uffd", verify=False, reset=enter_peek16)
    restored.lazy.prefetch_all()
    restored.lazy.release()
    s = restored.lazy.stats()
    assert (s.end.name, s.fenced_pages) == ("RELEASED", 0), f"saw {s.end.name} with {s.fenced_pages} pages fenced"
    ex = restored.vcpu.run(timeout=5.0)
    assert ex.reason is ExitReason.HLT and ex.debug == bytes([FILE_FIRST, FILE_SECOND]), ex.describe()
