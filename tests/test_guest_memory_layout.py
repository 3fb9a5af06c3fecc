"""Guest RAM stays out of the x86 32-bit hole: one memslot below it, the rest at 4 GiB, KVM's pages in the hole.

The pure half checks native.layout's arithmetic. The KVM half builds a VM whose memory crosses the
hole and asks the two parties that translate GPAs where that memory is. The guest (store32, flat
32-bit) stores the last word below the hole, which must land at the same memory offset, then the
hole's first word, which must exit as MMIO: no RAM there. Past 4 GiB no flat 32-bit guest can reach
(this host's software KVM runs no paged 32-bit guest either), so KVM itself writes there: its pvclock
wall clock, set to a GPA above 4 GiB, must land at memory offset LOW_RAM_END + the same distance and
show in slot 1's dirty log, KVM's own account of the page it wrote.
"""

from __future__ import annotations

import struct

import pytest
from snapproof.native import layout
from snapproof.native.layout import HIGH_RAM_BASE, LOW_RAM_END, RamRange, gpa_of, offset_of, ram_ranges

from snapproof import guests

MiB = 1 << 20

# -- the layout's arithmetic ----------------------------------------------------------------------


@pytest.mark.parametrize(("size", "want"), [
    (MiB, (RamRange(0, 0, 0, MiB),)),
    (LOW_RAM_END, (RamRange(0, 0, 0, LOW_RAM_END),)),
    (LOW_RAM_END + 4096, (RamRange(0, 0, 0, LOW_RAM_END), RamRange(1, LOW_RAM_END, HIGH_RAM_BASE, 4096))),
    (4 << 30, (RamRange(0, 0, 0, LOW_RAM_END), RamRange(1, LOW_RAM_END, HIGH_RAM_BASE, (4 << 30) - LOW_RAM_END))),
], ids=["1MiB", "exactly-below-the-hole", "one-page-past", "4GiB"])
def test_memory_below_the_hole_is_one_range_and_the_rest_starts_at_4gib(size: int, want) -> None:
    """Up to LOW_RAM_END one range from GPA 0; past it a second range from GPA 4 GiB, dense in memory."""
    got = ram_ranges(size)
    assert got == want, f"ram_ranges({size:#x}): expected {want}, saw {got}"
    assert sum(r.size for r in got) == size, f"ram_ranges({size:#x}) covers {sum(r.size for r in got):#x} bytes"


def test_offsets_and_gpas_convert_both_ways_around_the_hole() -> None:
    """Below the hole a GPA is its memory offset; from LOW_RAM_END on, the offset is seen at 4 GiB on."""
    for offset, gpa in [(0, 0), (0x1000, 0x1000), (LOW_RAM_END - 4, LOW_RAM_END - 4),
                        (LOW_RAM_END, HIGH_RAM_BASE), (LOW_RAM_END + 0x1234, HIGH_RAM_BASE + 0x1234)]:
        assert gpa_of(offset) == gpa, f"gpa_of({offset:#x}): expected {gpa:#x}, saw {gpa_of(offset):#x}"
        assert offset_of(gpa) == offset, f"offset_of({gpa:#x}): expected {offset:#x}, saw {offset_of(gpa):#x}"


@pytest.mark.parametrize("gpa", [LOW_RAM_END, layout.IOAPIC_GPA, layout.TSS_GPA, HIGH_RAM_BASE - 1])
def test_a_gpa_in_the_hole_is_no_memory_offset(gpa: int) -> None:
    """offset_of refuses a GPA in the hole, naming it and the hole."""
    with pytest.raises(ValueError, match=f"GPA {gpa:#x} is not RAM: it lies in the 32-bit hole"):
        offset_of(gpa)


@pytest.mark.parametrize(("name", "start", "size"), [
    ("identity map", layout.IDENTITY_MAP_GPA, layout.IDENTITY_MAP_SIZE),
    ("TSS", layout.TSS_GPA, layout.TSS_SIZE),
    ("KVM's default identity map", layout.KVM_DEFAULT_IDENTITY_MAP_GPA, layout.IDENTITY_MAP_SIZE),
    ("IOAPIC", layout.IOAPIC_GPA, 4096),
    ("LAPIC", layout.LAPIC_GPA, 4096),
])
def test_kvm_pages_and_platform_mmio_lie_in_the_hole(name: str, start: int, size: int) -> None:
    """KVM's private pages and the APICs are inside [LOW_RAM_END, 4 GiB), where no RAM ever is."""
    assert start >= LOW_RAM_END and start + size <= HIGH_RAM_BASE, (
        f"{name} [{start:#x}, {start + size:#x}) is outside the hole [{LOW_RAM_END:#x}, {HIGH_RAM_BASE:#x})")


def test_identity_map_and_tss_are_adjacent_and_apart_from_the_apics() -> None:
    """The identity-map page, then the three TSS pages; neither overlaps the IOAPIC or LAPIC page."""
    assert layout.TSS_GPA == layout.IDENTITY_MAP_GPA + 4096 and layout.TSS_SIZE == 3 * 4096
    kvm_pages = range(layout.IDENTITY_MAP_GPA, layout.TSS_GPA + layout.TSS_SIZE)
    for name, page in (("IOAPIC", layout.IOAPIC_GPA), ("LAPIC", layout.LAPIC_GPA)):
        assert page not in kvm_pages and page + 4095 not in kvm_pages, (
            f"{name} page {page:#x} overlaps KVM's pages [{kvm_pages.start:#x}, {kvm_pages.stop:#x})")


# -- on KVM: the slots as registered, and where writes through them land ----------------------------

BLOCK = guests.PARAM_BLOCK_GPA
LAST_VALUE, HOLE_VALUE = 0x4C41_5354, 0x484F_4C45  # "TSAL", "ELOH" as little-endian u32
WALL_CLOCK_AT = 0x3040  # from GPA 4 GiB: page 3 of slot 1, not at a page start


def dirty_pages(bitmap: bytes) -> list[int]:
    return [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]


def hex_rows(rows: list[tuple[int, ...]]) -> str:
    return str([tuple(hex(x) for x in row) for row in rows])


@pytest.mark.platform("linux")
def test_memory_crossing_the_hole_is_below_it_and_at_4gib_and_never_in_it(make_memory, make_vm) -> None:
    """Two memslots: the guest's store below the hole lands in place, its store into the hole exits as MMIO, and
    KVM's own write at GPA 4 GiB + x lands at memory offset LOW_RAM_END + x, in slot 1's dirty log."""
    from snapproof.native.kvm import KVM_MEM_LOG_DIRTY_PAGES, ExitReason

    # 1. Memory 2 MiB past the hole (a sparse memfd: only pages written are ever allocated), dirty-logged.
    size = LOW_RAM_END + 2 * MiB
    mem = make_memory("memfd", size)
    mem.write(guests.FLAT32_LOAD_GPA, guests.load("store32"))
    mem.write(BLOCK, struct.pack("<4I", LOW_RAM_END - 4, LAST_VALUE, LOW_RAM_END, HOLE_VALUE))
    vm = make_vm(mem, flags=KVM_MEM_LOG_DIRTY_PAGES)

    # 2. The slots as registered with KVM, and KVM's own pages placed in the hole.
    slots = [(s.slot, s.gpa, s.offset, s.size, s.hva) for s in vm.slots_of(mem)]
    want = [(0, 0, 0, LOW_RAM_END, mem.addr), (1, HIGH_RAM_BASE, LOW_RAM_END, 2 * MiB, mem.addr + LOW_RAM_END)]
    assert slots == want, f"memslots (slot, GPA, offset, size, HVA): expected {hex_rows(want)}, saw {hex_rows(slots)}"
    assert (vm.identity_map_gpa, vm.tss_gpa) == (layout.IDENTITY_MAP_GPA, layout.TSS_GPA), (
        f"identity map / TSS: expected {layout.IDENTITY_MAP_GPA:#x} / {layout.TSS_GPA:#x}, "
        f"saw {vm.identity_map_gpa:#x} / {vm.tss_gpa:#x}")
    for s in vm.slots_of(mem):
        vm.dirty_log(s.slot)  # get-and-clear: from here on, the logs hold only what follows

    # 3. The guest: the last word below the hole, then the hole's first word, where KVM finds no memory.
    vcpu = vm.add_vcpu()
    vcpu.set_flat32(eip=guests.FLAT32_LOAD_GPA, esp=0x7000, esi=BLOCK)
    ex = vcpu.run(timeout=30.0)
    assert ex.reason is ExitReason.MMIO and ex.mmio_is_write and ex.mmio_len == 4, (
        f"expected a 4-byte MMIO write in the hole, saw {ex.describe()}")
    assert ex.mmio_gpa == LOW_RAM_END, f"MMIO write: expected GPA {LOW_RAM_END:#x}, saw {ex.mmio_gpa:#x}"
    seen = struct.unpack("<I", mem.read(LOW_RAM_END - 4, 4))[0]
    assert seen == LAST_VALUE, f"memory offset {LOW_RAM_END - 4:#x} (GPA {LOW_RAM_END - 4:#x}): expected " \
                               f"{LAST_VALUE:#010x}, saw {seen:#010x}"
    # Hardware KVM may also log pages the guest only read or fetched: a first access maps the page writable
    # when the host mapping is, and logs it then (seen on kvm_amd: the code and parameter-block pages). So the
    # store's page must be logged, and anything else only among the pages the guest used at all.
    low_dirty = set(dirty_pages(vm.dirty_log(0)))
    stored = LOW_RAM_END // 4096 - 1
    used = {guests.FLAT32_LOAD_GPA // 4096, BLOCK // 4096, (0x7000 - 4) // 4096, stored}
    assert stored in low_dirty and low_dirty <= used, (
        f"slot 0 dirty pages: expected {stored:#x} (the guest's one store), and else only pages it read "
        f"({sorted(hex(p) for p in used - {stored})}), saw {sorted(hex(p) for p in low_dirty)}")

    # 4. KVM writes at GPA 4 GiB + WALL_CLOCK_AT: memory offset LOW_RAM_END + WALL_CLOCK_AT, nowhere else past it.
    assert mem.read(LOW_RAM_END, 2 * MiB) == bytes(2 * MiB), "memory past the hole was written before KVM's write"
    vcpu.kvm_write_wall_clock(HIGH_RAM_BASE + WALL_CLOCK_AT)
    at = offset_of(HIGH_RAM_BASE + WALL_CLOCK_AT)
    version, sec, _nsec = struct.unpack("<3I", mem.read(at, 12))
    assert version and version % 2 == 0 and sec, (
        f"memory offset {at:#x} (GPA {HIGH_RAM_BASE + WALL_CLOCK_AT:#x}): expected KVM's wall clock (even version, "
        f"seconds), saw {mem.read(at, 12).hex(' ')}")
    past = bytearray(mem.read(LOW_RAM_END, 2 * MiB))
    past[WALL_CLOCK_AT:WALL_CLOCK_AT + 12] = bytes(12)
    assert past == bytes(2 * MiB), "KVM's write landed elsewhere past the hole too"
    high_dirty = dirty_pages(vm.dirty_log(1))
    assert high_dirty == [WALL_CLOCK_AT // 4096], (
        f"slot 1 dirty pages: expected [{WALL_CLOCK_AT // 4096}] (GPA {HIGH_RAM_BASE + WALL_CLOCK_AT:#x}), saw "
        f"{high_dirty}")


@pytest.mark.platform("linux")
def test_memory_below_the_hole_is_one_slot_from_gpa_0(make_memory, make_vm) -> None:
    """A guest that fits below the hole gets exactly one memslot, all of its memory from GPA 0."""
    mem = make_memory("memfd", MiB)
    vm = make_vm(mem)
    slots = [(s.slot, s.gpa, s.offset, s.size) for s in vm.slots_of(mem)]
    assert slots == [(0, 0, 0, MiB)], (
        f"memslots (slot, GPA, offset, size): expected {hex_rows([(0, 0, 0, MiB)])}, saw {hex_rows(slots)}")
