"""The hypervisor-level copy-on-write load below the phase: the memslot layout's bookkeeping (gaps split,
neighbours merged, ioctls per page, the refusal when slots run out), and on KVM the refusals and the
release that phase 4 does not reach.
"""

from __future__ import annotations

import os
import random

import pytest
from snapproof.guests import counter
from snapproof.native.image import SnapshotImage

from snapproof import guests

pytestmark = [pytest.mark.platform("linux")]
PAGE = 4096


def layout(npages: int = 16, capacity: int | None = None, first_slot: int = 0):
    from snapproof.native.hv_cow import SlotLayout

    lay = SlotLayout(npages, first_slot)
    if capacity is not None:
        lay.set_capacity(capacity, f"KVM_CAP_NR_MEMSLOTS = {capacity}")
    return lay


def make_private(lay, page: int):
    change = lay.plan_private(page)
    lay.apply(change)
    lay.check()
    return change


def spans(lay) -> list[tuple[int, int, str]]:
    return [(s.first, s.end, "rw" if s.writable else "ro") for s in lay.segments]


# -- the layout: pure bookkeeping --------------------------------------------------------------------


def test_first_write_splits_the_read_only_slot_around_the_page():
    """Page 5 of 16: delete the one read-only slot, add [0,5) read-only, [5,6) writable, [6,16) read-only."""
    lay = layout()
    change = make_private(lay, 5)
    assert [(s.first, s.end) for s in change.deleted] == [(0, 16)]
    assert spans(lay) == [(0, 5, "ro"), (5, 6, "rw"), (6, 16, "ro")]
    assert change.ioctls == 4, f"ioctls for a page inside a gap: expected 4, saw {change.ioctls}"


def test_a_page_at_either_end_of_memory_needs_one_ioctl_less():
    """No read-only piece is left on the far side of page 0 or of the last page."""
    lay = layout()
    assert make_private(lay, 0).ioctls == 3
    assert make_private(lay, 15).ioctls == 3
    assert spans(lay) == [(0, 1, "rw"), (1, 15, "ro"), (15, 16, "rw")]


def test_neighbouring_pages_merge_into_one_run():
    """A page beside a run joins it (4 ioctls: the gap and the run out, the grown run and the rest in); a page
    filling the one-page gap between two runs joins all three into one."""
    lay = layout()
    make_private(lay, 5)
    assert make_private(lay, 6).ioctls == 4
    assert make_private(lay, 4).ioctls == 4
    assert spans(lay) == [(0, 4, "ro"), (4, 7, "rw"), (7, 16, "ro")]
    make_private(lay, 8)
    change = make_private(lay, 7)
    assert [(s.first, s.end) for s in change.deleted] == [(4, 7), (7, 8), (8, 9)]
    assert spans(lay) == [(0, 4, "ro"), (4, 9, "rw"), (9, 16, "ro")]
    assert lay.slots == 3 and lay.private_pages() == 5


def test_a_private_page_changes_nothing():
    lay = layout()
    make_private(lay, 3)
    change = lay.plan_private(3)
    assert change.ioctls == 0 and spans(lay) == [(0, 3, "ro"), (3, 4, "rw"), (4, 16, "ro")]


def test_every_page_in_any_order_ends_as_one_writable_slot():
    """Whatever the order, the invariants hold at every step and all of memory ends as one run in one slot."""
    rng = random.Random(0x51075)
    for _ in range(20):
        lay = layout(64)
        pages = list(range(64))
        rng.shuffle(pages)
        for p in pages:
            make_private(lay, p)
            assert lay.is_private(p)
        assert spans(lay) == [(0, 64, "rw")]


def test_running_out_of_slots_is_refused_before_anything_changes():
    """With 3 slots, one private page fits (gap, run, gap); a second page apart from it would need 5: refused,
    naming KVM_CAP_NR_MEMSLOTS, the layout as it was. A page beside the run still fits."""
    from snapproof.native.hv_cow import MemslotsExhausted

    lay = layout(capacity=3)
    make_private(lay, 5)
    before = spans(lay)
    with pytest.raises(MemslotsExhausted, match=r"page 0xa cannot be made private: the layout would need 5 "
                                                r"memslots \(1 separate private runs so far.*KVM offers 3 "
                                                r"\(KVM_CAP_NR_MEMSLOTS = 3\)"):
        lay.plan_private(10)
    assert spans(lay) == before, "a refused page changed the layout"
    make_private(lay, 6)
    assert spans(lay) == [(0, 5, "ro"), (5, 7, "rw"), (7, 16, "ro")]


def test_slot_ids_stay_inside_the_capacity_while_the_count_fits():
    """Scattered pages until the refusal: every slot id ever used lies in [first_slot, first_slot + capacity)."""
    from snapproof.native.hv_cow import MemslotsExhausted

    rng = random.Random(7)
    for capacity in (3, 5, 9, 17):
        lay = layout(256, capacity=capacity, first_slot=2)
        pages = list(range(256))
        rng.shuffle(pages)
        for p in pages:
            try:
                make_private(lay, p)
            except MemslotsExhausted:
                continue
            ids = [s.slot for s in lay.segments]
            assert all(2 <= i < 2 + capacity for i in ids), f"capacity {capacity}: slot ids {ids}"
        assert lay.peak <= capacity


# -- on KVM ----------------------------------------------------------------------------------------------


@pytest.fixture
def counter_image(tmp_path):
    """1 MiB: counter32 and its parameters (4 pages at 0x10000) in the file."""
    params = counter.CounterParams(region_gpa=guests.DATA_REGION_GPA, npages=4, iterations=16, sync_every=0)
    with SnapshotImage.create(tmp_path / "counter.snap", 1 << 20) as w:
        code = guests.load("counter32")
        w.memory[guests.FLAT32_LOAD_GPA:guests.FLAT32_LOAD_GPA + len(code)] = code
        w.memory[guests.PARAM_BLOCK_GPA:guests.PARAM_BLOCK_GPA + counter.BLOCK_SIZE] = params.pack()
        return w.finalize(), params


def hv_cow_counter(image, make_vm, **kw):
    from snapproof.native.hv_cow import HypervisorCowMemory

    mem = HypervisorCowMemory(image.path, image.memory_offset, image.memory_size, **kw)
    try:
        vm = make_vm(mem)
        vcpu = vm.add_vcpu()
        vcpu.set_flat32(eip=guests.FLAT32_LOAD_GPA, esp=0x7000, esi=guests.PARAM_BLOCK_GPA)
    except BaseException:
        mem.close()
        raise
    return mem, vm, vcpu


@pytest.mark.needs("kvm", "kvm.readonly_mem")
def test_guest_writes_past_the_memslot_limit_are_refused_naming_KVM_CAP_NR_MEMSLOTS(counter_image, make_vm):
    """With 3 slots, counter32's first region page fits; its parameter block page, apart from it, would need 5:
    the run raises naming KVM_CAP_NR_MEMSLOTS, with no slot changed and no page copied for it."""
    from snapproof.native.hv_cow import MemslotsExhausted

    image, params = counter_image
    mem, vm, vcpu = hv_cow_counter(image, make_vm, max_slots=3)
    try:
        with pytest.raises(MemslotsExhausted, match=r"page 0x8 cannot be made private: the layout would need 5 "
                                                     r"memslots .* KVM offers 3 \(max_slots = 3 of "
                                                     r"KVM_CAP_NR_MEMSLOTS = \d+\)"):
            vcpu.run(timeout=10.0)
        first = params.word_gpa(1) // PAGE
        assert spans(mem.layout) == [(0, first, "ro"), (first, first + 1, "rw"), (first + 1, 256, "ro")]
        assert mem.allocated_bytes() == PAGE, f"overlay: expected one page copied, holds {mem.allocated_bytes():#x}"
        assert mem.stats.slot_ioctls == 4, mem.stats.describe()
    finally:
        vm.close()
        mem.close()


@pytest.mark.needs("kvm", "kvm.readonly_mem")
def test_a_vm_with_two_vcpus_is_refused_at_its_first_write_exit(counter_image, make_vm):
    """A slot change leaves its range without memory for a moment: with a second vCPU the load refuses."""
    image, _ = counter_image
    mem, vm, vcpu = hv_cow_counter(image, make_vm)
    try:
        vm.add_vcpu()
        with pytest.raises(RuntimeError, match="hypervisor-level COW serves one vCPU, this VM has 2"):
            vcpu.run(timeout=10.0)
        assert mem.private_pages() == 0
    finally:
        vm.close()
        mem.close()


def test_an_mmio_write_outside_guest_memory_is_left_to_the_caller(counter_image):
    """A write to a device's GPA (above guest memory) or an MMIO read is not the load's: not served."""
    from snapproof.native.hv_cow import HypervisorCowMemory
    from snapproof.native.kvm import Exit, ExitReason

    image, _ = counter_image
    base = dict(reason=ExitReason.MMIO, kvm_exit_reason=6, err=0, cpu=0, io_port=0, io_value=0, mmio_len=4,
                hw_reason=0, sync_count=0, last_sync=0, debug=b"", run_ns=0, kvm_runs=1)
    with HypervisorCowMemory(image.path, image.memory_offset, image.memory_size) as mem:
        assert not mem.serve(Exit(mmio_gpa=0xFEE00000, mmio_is_write=True, mmio_data=b"\0" * 4, **base))
        assert not mem.serve(Exit(mmio_gpa=0x10000, mmio_is_write=False, **base))
        assert mem.stats.write_exits == 0 and mem.private_pages() == 0


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.mark.needs("kvm", "kvm.readonly_mem")
def test_load_run_and_close_leave_no_fd_or_mapping_behind(counter_image):
    """Three loads, each run to HLT and closed (VM first): the process has the fds and mappings it had."""
    from snapproof.native.hv_cow import HypervisorCowMemory
    from snapproof.native.kvm import ExitReason, Vm

    image, params = counter_image
    fds, maps = _fds(), _maps()
    for _ in range(3):
        with HypervisorCowMemory(image.path, image.memory_offset, image.memory_size) as mem:
            with Vm.create() as vm:
                mem.attach(vm)
                vcpu = vm.add_vcpu()
                vcpu.set_flat32(eip=guests.FLAT32_LOAD_GPA, esp=0x7000, esi=guests.PARAM_BLOCK_GPA)
                ex = vcpu.run(timeout=10.0)
                assert ex.reason is ExitReason.HLT, ex.describe()
                assert mem.stats.guest_pages == params.npages + 1, mem.stats.describe()
            mem.close()
            mem.close()  # idempotent
    assert (_fds(), _maps()) == (fds, maps), f"(fds, mappings): expected {(fds, maps)}, saw {(_fds(), _maps())}"
