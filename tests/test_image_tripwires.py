"""Tripwires: the snapshot file format's constants and layout, pinned.

Every snapshot already on disk was written with these values. If one of these
tests fails, do not just update the expected value: that silently breaks every
saved snapshot. Bump FORMAT_VERSION instead (and keep reading the old layout if
old files matter), then update the pins in the same change."""

import hashlib
import struct

from native import image

BREAKS_SAVED_SNAPSHOTS = (
    "changing this breaks every saved snapshot file: bump image.FORMAT_VERSION instead of "
    "just editing the value, and update this pin in the same change")


def test_magic_is_pinned():
    assert image.MAGIC == b"SNAPPROF", BREAKS_SAVED_SNAPSHOTS


def test_format_version_is_pinned():
    assert image.FORMAT_VERSION == 1, BREAKS_SAVED_SNAPSHOTS


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
        "reserved": (0x064, "28s"),
        "vcpu_area": (0x080, "3936s"),
        "header_checksum": (0xFE0, "32s"),
    }, BREAKS_SAVED_SNAPSHOTS


def test_vcpu_record_head_is_pinned():
    assert image.VCPU_RECORD_HEAD.format == "<II", BREAKS_SAVED_SNAPSHOTS


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
        "hash_algo": {"SHA256": 1},
        "vcpu_kind": {"KVM_X86": 1, "WHP_X86": 2},
        "flag_complete": 1,
        "hypervisors": ("kvm", "whp"),
    }, BREAKS_SAVED_SNAPSHOTS


# sha256 of pack_header() for the inputs below, computed when format version 1 was set.
PINNED_HEADER_SHA256 = "dbaf3f621f1849a242e138881972a73fbe642af19d107249952f568bf90731dc"


def test_header_bytes_for_fixed_inputs_are_pinned():
    """The whole header page for fixed inputs, as a digest: catches any layout or checksum change."""
    header = image.pack_header(memory_size=0x100000, arch=image.Arch.X86_64, hypervisor="kvm", complete=True,
                               content_hash=bytes(range(32)), vcpu_states=[b"\xaa" * 872, b"\x55" * 5],
                               vcpu_kinds=[image.VcpuKind.KVM_X86] * 2)
    assert hashlib.sha256(header).hexdigest() == PINNED_HEADER_SHA256, BREAKS_SAVED_SNAPSHOTS


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
