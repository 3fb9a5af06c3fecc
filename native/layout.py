"""Where guest memory sits in guest-physical space (x86): RAM below the 32-bit hole, the rest from 4 GiB.

A ``GuestMemory`` is one dense mapping, and a snapshot image is that mapping byte for byte: offsets
into either are *memory offsets*. The guest sees the same bytes as RAM in at most two pieces, one
memslot each::

    memory offset                 GPA
    [0, LOW_RAM_END)          ->  [0, LOW_RAM_END)                                  slot 0
    [LOW_RAM_END, size)       ->  [HIGH_RAM_BASE, HIGH_RAM_BASE + size - LOW_RAM_END)  slot 1

so below LOW_RAM_END a GPA *is* the memory offset (every guest's code, blocks and data regions sit
there), and past it they differ by the hole's size. ``[LOW_RAM_END, 4 GiB)`` is never RAM: it holds
what a PC keeps under 4 GiB, KVM's private pages (the identity-map page and the real-mode TSS that
VMX without unrestricted guest needs) and the platform's MMIO (IOAPIC, LAPIC). One slot from GPA 0
over a 4 GiB guest would cover them; KVM then fails to add its private TSS slot over the user slot.

Pure Python, for both platforms: ``native.kvm.Vm.map_memory`` applies it on Linux; phases and
oracles use ``gpa_of`` / ``offset_of`` where they name a GPA for a memory offset or back.
"""

from __future__ import annotations

from dataclasses import dataclass

PAGE_SIZE = 4096
GiB = 1 << 30

# 3 GiB, QEMU's choice for a PC with more RAM than fits below the hole (and cloud-hypervisor's start
# of its 32-bit reserved area): a 1 GiB hole for MMIO and KVM's pages, and both RAM pieces start on
# a 1 GiB boundary, so a guest backed by huge pages keeps them whole on either side of the split.
LOW_RAM_END = 0xC000_0000
HIGH_RAM_BASE = 0x1_0000_0000  # 4 GiB: where RAM continues, past everything a 32-bit GPA can name

# What lives in the hole, so the self-tests can check nothing there is RAM.
IOAPIC_GPA = 0xFEC0_0000
LAPIC_GPA = 0xFEE0_0000
# KVM's private pages, placed explicitly (KVM_SET_IDENTITY_MAP_ADDR, KVM_SET_TSS_ADDR) where QEMU puts
# them: the identity-map page, then the three TSS pages right after it, ending just below the top
# 16 MiB that a PC keeps for its firmware flash, above the LAPIC page.
IDENTITY_MAP_GPA = 0xFEFF_C000
IDENTITY_MAP_SIZE = PAGE_SIZE
TSS_GPA = IDENTITY_MAP_GPA + IDENTITY_MAP_SIZE
TSS_SIZE = 3 * PAGE_SIZE
# Where KVM puts the identity map when never told (VMX_EPT_IDENTITY_PAGETABLE_ADDR): in the hole too,
# so a KVM without KVM_CAP_SET_IDENTITY_MAP_ADDR still gets a layout with no RAM under it.
KVM_DEFAULT_IDENTITY_MAP_GPA = 0xFFFB_C000


@dataclass(frozen=True)
class RamRange:
    """One contiguous piece of guest RAM: ``size`` bytes from memory offset ``offset``, seen at ``gpa``."""

    slot: int
    offset: int
    gpa: int
    size: int

    @property
    def gpa_end(self) -> int:
        return self.gpa + self.size

    @property
    def offset_end(self) -> int:
        return self.offset + self.size


def ram_ranges(size: int) -> tuple[RamRange, ...]:
    """Where ``size`` bytes of guest memory appear as RAM: one range up to LOW_RAM_END, a second from 4 GiB."""
    if size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"guest memory size {size:#x} is not a positive multiple of {PAGE_SIZE:#x}")
    low = RamRange(slot=0, offset=0, gpa=0, size=min(size, LOW_RAM_END))
    if size <= LOW_RAM_END:
        return (low,)
    return low, RamRange(slot=1, offset=LOW_RAM_END, gpa=HIGH_RAM_BASE, size=size - LOW_RAM_END)


def gpa_of(offset: int) -> int:
    """The GPA at which the guest sees memory offset ``offset``."""
    if offset < 0:
        raise ValueError(f"memory offset {offset:#x} is negative")
    return offset if offset < LOW_RAM_END else HIGH_RAM_BASE + (offset - LOW_RAM_END)


def offset_of(gpa: int) -> int:
    """The memory offset the guest reaches at ``gpa``; a GPA in the 32-bit hole is no memory at all."""
    if gpa < 0:
        raise ValueError(f"GPA {gpa:#x} is negative")
    if gpa < LOW_RAM_END:
        return gpa
    if gpa >= HIGH_RAM_BASE:
        return LOW_RAM_END + (gpa - HIGH_RAM_BASE)
    raise ValueError(f"GPA {gpa:#x} is not RAM: it lies in the 32-bit hole [{LOW_RAM_END:#x}, "
                     f"{HIGH_RAM_BASE:#x}) (MMIO, KVM's TSS and identity map)")
