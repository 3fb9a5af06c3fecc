"""Well-formed KVM x86 vCPU states for the file-format tests: every part present, made of filler bytes.

The format checks a state's part structure (ids, sizes, padding, required parts), never what the
kernel structs hold, so filler is enough; a real state comes from ``Vcpu.save_state()``.
"""

from __future__ import annotations

from snapproof.native import image
from snapproof.native.image import VcpuPart


def kvm_x86_parts(fill: int, msrs: int = 2, cpuid_entries: int = 0) -> dict[VcpuPart, bytes]:
    """Every part of a KVM x86 state, in save order, each made of ``fill`` bytes."""
    parts = {part: bytes([fill]) * size for part, size in image.FIXED_PART_SIZES.items()}
    parts[VcpuPart.XSAVE] = bytes([fill]) * image.XSAVE_MIN_SIZE
    parts[VcpuPart.MSRS] = b"".join(image.MSR_ENTRY.pack(0x174 + i, 0, fill) for i in range(msrs))
    parts[VcpuPart.CPUID] = image.CPUID_HEAD.pack(cpuid_entries, 0) + bytes([fill]) * (40 * cpuid_entries)
    return parts


def kvm_x86_state(fill: int, **kw: int) -> bytes:
    """A well-formed KVM x86 state (``kvm_x86_parts`` packed)."""
    return image.pack_kvm_x86_state(kvm_x86_parts(fill, **kw))
