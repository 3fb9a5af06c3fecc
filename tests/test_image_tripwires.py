"""Tripwires: the snapshot file format's constants and layout, pinned.

Every snapshot already on disk was written with these values. If one of these
tests fails, do not just update the expected value: that silently breaks every
saved snapshot. Bump FORMAT_VERSION instead (and keep reading the old layout if
old files matter), then update the pins in the same change."""

import hashlib
import struct
from pathlib import Path

from snapproof.native import image

BREAKS_SAVED_SNAPSHOTS = (
    "changing this breaks every saved snapshot file: bump image.FORMAT_VERSION instead of "
    "just editing the value, and update this pin in the same change")


def test_magic_is_pinned():
    assert image.MAGIC == b"SNAPPROF", BREAKS_SAVED_SNAPSHOTS


def test_format_version_is_pinned():
    # 2: the vCPU states left the header page for a section after the image, as self-describing parts.
    # 3: the content hash is blake3, hashed while the capture copies; the layout is version 2's.
    assert image.FORMAT_VERSION == 3, BREAKS_SAVED_SNAPSHOTS


def test_each_readable_version_keeps_its_hash_algorithm():
    """Version 2 files hold sha256 content hashes, version 3 files blake3: the loader reads both, each its own way."""
    assert image.HASH_ALGO_OF_VERSION == {2: image.HashAlgo.SHA256, 3: image.HashAlgo.BLAKE3}, \
        BREAKS_SAVED_SNAPSHOTS


def test_vcpu_state_version_is_pinned():
    assert image.VCPU_STATE_VERSION == 1, BREAKS_SAVED_SNAPSHOTS


def test_header_size_is_pinned():
    assert image.HEADER_SIZE == 4096, BREAKS_SAVED_SNAPSHOTS


def test_memory_offset_is_pinned():
    assert image.MEMORY_OFFSET == 4096, BREAKS_SAVED_SNAPSHOTS


def test_page_size_is_pinned():
    assert image.PAGE_SIZE == 4096, BREAKS_SAVED_SNAPSHOTS


def test_field_offsets_are_pinned():
    assert image.FIELDS == {
        "magic": (0x000, "8s"),
        "format_version": (0x008, "<I"),
        "header_size": (0x00C, "<I"),
        "arch": (0x010, "<I"),
        "page_size": (0x014, "<I"),
        "memory_offset": (0x018, "<Q"),
        "memory_size": (0x020, "<Q"),
        "flags": (0x028, "<I"),
        "hash_algo": (0x02C, "<I"),
        "hypervisor": (0x030, "16s"),
        "content_hash": (0x040, "32s"),
        "vcpu_count": (0x060, "<I"),
        "vcpu_state_version": (0x064, "<I"),
        "vcpu_offset": (0x068, "<Q"),
        "vcpu_size": (0x070, "<Q"),
        "vcpu_hash": (0x078, "32s"),
        "reserved": (0x098, "3912s"),
        "header_checksum": (0xFE0, "32s"),
    }, BREAKS_SAVED_SNAPSHOTS


def test_vcpu_record_head_is_pinned():
    assert image.VCPU_RECORD_HEAD.format == "<II", BREAKS_SAVED_SNAPSHOTS


def test_vcpu_state_part_layout_is_pinned():
    """Part header, ids and the kernel struct sizes of a KVM x86 vCPU state (vcpu_state_version 1)."""
    layout = {
        "part_head": image.PART_HEAD.format,
        "parts": {p.name: p.value for p in image.VcpuPart},
        "fixed_sizes": {p.name: n for p, n in image.FIXED_PART_SIZES.items()},
        "xsave_min": image.XSAVE_MIN_SIZE,
        "msr_entry": image.MSR_ENTRY.format,
        "cpuid": (image.CPUID_HEAD.format, image.CPUID_ENTRY_SIZE),
        "optional": sorted(p.name for p in image.OPTIONAL_PARTS),
    }
    assert layout == {
        "part_head": "<II",
        "parts": {"REGS": 1, "SREGS": 2, "XSAVE": 3, "XCRS": 4, "MSRS": 5, "VCPU_EVENTS": 6, "MP_STATE": 7,
                  "DEBUGREGS": 8, "CPUID": 9},
        "fixed_sizes": {"REGS": 144, "SREGS": 312, "XCRS": 392, "VCPU_EVENTS": 64, "MP_STATE": 4, "DEBUGREGS": 128},
        "xsave_min": 4096,
        "msr_entry": "<IIQ",
        "cpuid": ("<II", 40),
        "optional": ["XCRS"],
    }, BREAKS_SAVED_SNAPSHOTS


def test_enum_codes_are_pinned():
    codes = {
        "arch": {a.name: a.value for a in image.Arch},
        "hash_algo": {h.name: h.value for h in image.HashAlgo},
        "vcpu_kind": {k.name: k.value for k in image.VcpuKind},
        "flag_complete": image.FLAG_COMPLETE,
        "hypervisors": image.HYPERVISORS,
    }
    assert codes == {
        "arch": {"X86_64": 1},
        "hash_algo": {"SHA256": 1, "BLAKE3": 2},
        "vcpu_kind": {"KVM_X86": 1, "WHP_X86": 2},
        "flag_complete": 1,
        "hypervisors": ("kvm", "whp"),
    }, BREAKS_SAVED_SNAPSHOTS


# sha256 of pack_header() and pack_vcpu_section() for the inputs below, computed when format version 3 was set
# (version 2's header for the same inputs, f243c4fc..., differed only in format_version, hash_algo and the checksum).
PINNED_HEADER_SHA256 = "ea1f15d1b43ab5da88ad243cacb665e6b36bf059ba0419cd82e4018477795524"
PINNED_SECTION_SHA256 = "4d030167a8907ff5e7cdb96186843b28092c7f735b775a5c1b8e7a2cecec4d2a"


def fixed_kvm_x86_state(fill: int) -> bytes:
    """A well-formed KVM x86 state whose every part is ``fill`` bytes (two MSRs, no CPUID entries)."""
    parts = {part: bytes([fill]) * size for part, size in image.FIXED_PART_SIZES.items()}
    parts[image.VcpuPart.XSAVE] = bytes([fill]) * image.XSAVE_MIN_SIZE
    parts[image.VcpuPart.MSRS] = image.MSR_ENTRY.pack(0x176, 0, fill) + image.MSR_ENTRY.pack(0x10, 0, fill)
    parts[image.VcpuPart.CPUID] = image.CPUID_HEAD.pack(0, 0)
    return image.pack_kvm_x86_state(parts)


def test_header_and_vcpu_section_bytes_for_fixed_inputs_are_pinned():
    """The whole header page and vCPU section for fixed inputs, as digests: catches any layout or checksum change."""
    states, kinds = [fixed_kvm_x86_state(0xAA), b"\x55" * 5], [image.VcpuKind.KVM_X86, image.VcpuKind.WHP_X86]
    header = image.pack_header(memory_size=0x100000, arch=image.Arch.X86_64, hypervisor="kvm", complete=True,
                               content_hash=bytes(range(32)), vcpu_states=states, vcpu_kinds=kinds)
    section = image.pack_vcpu_section(states, kinds)
    assert (hashlib.sha256(header).hexdigest(), hashlib.sha256(section).hexdigest()) == \
        (PINNED_HEADER_SHA256, PINNED_SECTION_SHA256), BREAKS_SAVED_SNAPSHOTS


# tests/data/format-v2.snap: written by the version 2 writer (2 pages, one KVM x86 vCPU state), kept as it was.
VERSION_2_FILE = Path(__file__).parent / "data" / "format-v2.snap"
PINNED_VERSION_2_FILE_SHA256 = "4b3f3b6e16812b5cee595d1aa91e8e11657549948e2a86d758d93cd18279efc7"


def test_the_saved_version_2_file_is_pinned():
    """The old file the loader's compatibility tests read must stay the one the old writer wrote."""
    assert hashlib.sha256(VERSION_2_FILE.read_bytes()).hexdigest() == PINNED_VERSION_2_FILE_SHA256, \
        "tests/data/format-v2.snap changed: it stands for the version 2 files already saved; never rewrite it"


# --- invariants the pins rely on (not tripwires: these must simply hold) ------

def test_fields_tile_the_header_page_without_gap_or_overlap():
    """Each field starts where the previous one ends, and the last ends at 4096."""
    end = 0
    for name, (offset, fmt) in image.FIELDS.items():
        assert offset == end, f"{name}: starts at {offset:#x}, previous field ends at {end:#x}"
        end = offset + struct.calcsize(fmt)
    assert end == image.HEADER_SIZE, f"fields end at {end:#x}, header page is {image.HEADER_SIZE:#x}"


def test_memory_image_starts_on_a_page_boundary():
    """The image must be mappable in place (MAP_PRIVATE / FILE_MAP_COPY need page-aligned offsets)."""
    assert image.MEMORY_OFFSET % image.PAGE_SIZE == 0
