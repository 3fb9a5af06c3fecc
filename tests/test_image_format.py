"""The snapshot file format (native/image.py): writing, reading back, and every
way the loader refuses a bad file. Negatives corrupt one field with
``rewrite_header`` (checksum kept valid, so that field's own check is reached)
and check the error names the field and what it saw."""

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import blake3
import pytest
from snapproof.native import image
from snapproof.native.image import (
    PART_HEAD,
    Arch,
    SnapshotFormatError,
    SnapshotImage,
    VcpuKind,
    VcpuPart,
    read_vcpu_section,
    rewrite_header,
    rewrite_vcpu_section,
)

from tests.sample_states import kvm_x86_parts, kvm_x86_state
from tests.test_capture_hashing import file_reads  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[1]
# Written by the version 2 writer: 2 pages of pattern(), one KVM x86 state (kvm_x86_state(0x11)); pinned in
# tests/test_image_tripwires.py.
VERSION_2_FILE = REPO / "tests" / "data" / "format-v2.snap"
MEMORY_SIZE = 4 * image.PAGE_SIZE
STATES = [kvm_x86_state(0x11), kvm_x86_state(0x22, msrs=5, cpuid_entries=3)]


def pattern(size: int) -> bytes:
    """Memory whose every page differs, so a misplaced page cannot go unseen."""
    return bytes((i * 7 + i // image.PAGE_SIZE) & 0xFF for i in range(size))


@pytest.fixture
def snap(tmp_path) -> Path:
    """A valid, complete snapshot: 4 pages, two KVM vCPU states."""
    path = tmp_path / "valid.snap"
    SnapshotImage.write(path, pattern(MEMORY_SIZE), vcpu_states=STATES)
    return path


def rejected(path, field: str, seen: str, verify: bool = True) -> SnapshotFormatError:
    """Open must fail on `field`, naming it and what the file holds."""
    with pytest.raises(SnapshotFormatError) as info:
        SnapshotImage.open(path, verify=verify)
    err = info.value
    assert err.field == field, f"expected the error to name {field!r}, it named {err.field!r}: {err}"
    assert field in str(err) and seen in str(err), f"error should name {field!r} and show {seen!r}: {err}"
    return err


# --- round trip -------------------------------------------------------------

def test_round_trip_preserves_memory_and_vcpu_states(snap):
    """What was written reads back byte for byte, with its vCPU states in order."""
    img = SnapshotImage.open(snap)
    assert img.read_memory() == pattern(MEMORY_SIZE)
    assert img.vcpu_states == tuple(STATES)
    assert img.vcpu_kinds == (VcpuKind.KVM_X86, VcpuKind.KVM_X86)
    assert img.vcpu_parts(1) == kvm_x86_parts(0x22, msrs=5, cpuid_entries=3)
    assert img.verified


def test_vcpu_section_follows_the_memory_image_and_ends_the_file(snap):
    """vcpu_offset = 4096 + memory_size, the file ends after vcpu_size bytes, vcpu_hash is their sha256."""
    img = SnapshotImage.open(snap)
    section = image.pack_vcpu_section(STATES, [VcpuKind.KVM_X86] * 2)
    assert (img.vcpu_offset, img.vcpu_size, img.vcpu_state_version) == (0x1000 + MEMORY_SIZE, len(section), 1)
    assert snap.read_bytes()[img.vcpu_offset:] == section
    assert img.vcpu_hash == hashlib.sha256(section).digest()


def test_header_fields_describe_the_file(snap):
    """The header records version 3, arch, hypervisor, sizes, COMPLETE and the blake3 of the image."""
    img = SnapshotImage.open(snap)
    assert (img.format_version, img.hash_algo) == (3, image.HashAlgo.BLAKE3)
    assert (img.arch, img.hypervisor, img.page_size) == (Arch.X86_64, "kvm", 4096)
    assert (img.memory_offset, img.memory_size) == (0x1000, MEMORY_SIZE)
    assert img.complete and img.flags == image.FLAG_COMPLETE
    assert img.content_hash == blake3.blake3(pattern(MEMORY_SIZE)).digest()


def test_content_hash_is_blake3_of_the_raw_image_bytes_in_the_file(snap):
    """What the format description promises a verifier: b3sum of the memory_size bytes at 4096 is content_hash."""
    img = SnapshotImage.open(snap)
    raw = snap.read_bytes()[img.memory_offset:img.memory_offset + img.memory_size]
    assert blake3.blake3(raw).digest() == img.content_hash
    assert img.path == str(snap) and img.file_length == 0x1000 + MEMORY_SIZE + img.vcpu_size


def test_the_memory_image_is_raw_memory_at_offset_4096(snap):
    """memory_size bytes from offset 4096 are plain raw memory: mappable, or cut out with dd."""
    assert snap.read_bytes()[4096:4096 + MEMORY_SIZE] == pattern(MEMORY_SIZE)


def test_read_memory_reads_a_range_and_refuses_one_outside_the_image(snap):
    """read_memory(offset, size) returns that slice; a range past the end is a ValueError."""
    img = SnapshotImage.open(snap)
    assert img.read_memory(0x1000, 16) == pattern(MEMORY_SIZE)[0x1000:0x1010]
    with pytest.raises(ValueError, match="outside the memory image"):
        img.read_memory(MEMORY_SIZE - 8, 16)


def test_whp_file_tags_its_vcpu_states_as_whp(tmp_path):
    """A WHP snapshot records hypervisor 'whp' and WHP-kind vCPU states."""
    img = SnapshotImage.write(tmp_path / "w.snap", bytes(4096), vcpu_states=[b"r" * 64], hypervisor="whp")
    assert (img.hypervisor, img.vcpu_kinds) == ("whp", (VcpuKind.WHP_X86,))


def test_many_full_size_vcpu_states_fit(tmp_path):
    """The section has no fixed capacity: 64 vCPUs with 256 CPUID entries and 100 MSRs each round-trip."""
    states = [kvm_x86_state(i, msrs=100, cpuid_entries=256) for i in range(64)]
    assert SnapshotImage.write(tmp_path / "64.snap", bytes(4096), vcpu_states=states).vcpu_states == tuple(states)


# --- the writer ---------------------------------------------------------------

def test_create_presizes_the_file_and_maps_its_memory_region(tmp_path):
    """create() sizes the file to 4096 + memory_size; writes to .memory land in the file."""
    path = tmp_path / "w.snap"
    with SnapshotImage.create(path, MEMORY_SIZE) as w:
        assert path.stat().st_size == 0x1000 + MEMORY_SIZE
        assert len(w.memory) == MEMORY_SIZE and not w.memory.readonly
        w.memory[0x1000] = 0x42
        w.finalize()
    assert path.read_bytes()[0x1000 + 0x1000] == 0x42


def test_abort_leaves_the_file_marked_incomplete(tmp_path):
    """An aborted capture keeps its file, and open() names it incomplete."""
    path = tmp_path / "a.snap"
    w = SnapshotImage.create(path, MEMORY_SIZE)
    w.memory[:4] = b"half"
    w.abort()
    err = rejected(path, "flags", "did not finish")
    assert str(err).startswith("snapshot incomplete")


def test_exception_inside_with_block_leaves_the_file_incomplete(tmp_path):
    """An exception during capture propagates unchanged and the file stays incomplete."""
    path = tmp_path / "x.snap"
    with pytest.raises(RuntimeError, match="capture died"), SnapshotImage.create(path, MEMORY_SIZE):
        raise RuntimeError("capture died")
    rejected(path, "flags", "did not finish")


def test_with_block_without_finalize_leaves_the_file_incomplete(tmp_path):
    """Forgetting finalize() is an abort, not a silently complete file."""
    path = tmp_path / "f.snap"
    with SnapshotImage.create(path, MEMORY_SIZE) as w:
        w.memory[0] = 1
    rejected(path, "flags", "did not finish")


def test_incomplete_file_header_is_readable_for_diagnostics(tmp_path):
    """allow_incomplete=True parses an incomplete header (for `info`), with complete=False."""
    path = tmp_path / "i.snap"
    SnapshotImage.create(path, MEMORY_SIZE).abort()
    img = SnapshotImage.open(path, verify=False, allow_incomplete=True)
    assert not img.complete and img.memory_size == MEMORY_SIZE


def test_finalize_with_a_live_cffi_pointer_raises_clearly_and_can_be_retried(tmp_path):
    """An unreleased ffi.from_buffer() pointer makes finalize raise BufferError saying so; release, retry."""
    cffi = pytest.importorskip("cffi", reason="cffi (a snapproof dependency) is not installed")
    ffi = cffi.FFI()
    path = tmp_path / "p.snap"
    with SnapshotImage.create(path, MEMORY_SIZE) as w:
        pointer = ffi.from_buffer(w.memory)
        pointer[0] = b"\x42"
        with pytest.raises(BufferError, match="still in use"):
            w.finalize()
        rejected(path, "flags", "did not finish")  # nothing was sealed by the failed attempt
        ffi.release(pointer)
        img = w.finalize()
    assert img.read_memory(0, 1) == b"\x42" and SnapshotImage.open(path).verified


def test_finalize_with_a_live_ctypes_pointer_raises_clearly_and_can_be_retried(tmp_path):
    """A ctypes from_buffer() array over .memory pins the mapping: finalize says so; delete it, retry."""
    path = tmp_path / "ct.snap"
    with SnapshotImage.create(path, MEMORY_SIZE) as w:
        pointer = (ctypes.c_char * MEMORY_SIZE).from_buffer(w.memory)
        pointer[0] = b"\x42"
        with pytest.raises(BufferError, match="still in use"):
            w.finalize()
        del pointer
        img = w.finalize()
    assert img.read_memory(0, 1) == b"\x42" and SnapshotImage.open(path).verified


def test_finalize_with_a_live_derived_view_raises_clearly_and_can_be_retried(tmp_path):
    """A memoryview taken from .memory pins the mapping: finalize says so, and works once it is released."""
    path = tmp_path / "v.snap"
    with SnapshotImage.create(path, MEMORY_SIZE) as w:
        derived = memoryview(w.memory)[:16]
        with pytest.raises(BufferError, match="still in use"):
            w.finalize()
        rejected(path, "flags", "did not finish")  # nothing was sealed by the failed attempt
        w.memory[1] = 0x43  # the writer is still usable
        derived.release()
        w.finalize()
    assert SnapshotImage.open(path).read_memory(1, 1) == b"\x43"


def test_finalize_after_cffi_pointer_released_does_not_raise(tmp_path):
    """The native engine's path: ffi.from_buffer(), copy, ffi.release(), finalize."""
    cffi = pytest.importorskip("cffi", reason="cffi (a snapproof dependency) is not installed")
    ffi = cffi.FFI()
    path = tmp_path / "c.snap"
    with SnapshotImage.create(path, MEMORY_SIZE) as w:
        dst = ffi.from_buffer(w.memory)
        ffi.memmove(dst, pattern(MEMORY_SIZE), MEMORY_SIZE)
        ffi.release(dst)
        w.finalize()
    assert SnapshotImage.open(path).read_memory() == pattern(MEMORY_SIZE)


def test_abort_with_a_live_pointer_does_not_raise(tmp_path):
    """Abort is the error path, so it never raises BufferError (cffi or ctypes); the file stays incomplete."""
    cffi = pytest.importorskip("cffi", reason="cffi (a snapproof dependency) is not installed")
    ffi = cffi.FFI()
    path = tmp_path / "ap.snap"
    w = SnapshotImage.create(path, MEMORY_SIZE)
    direct, derived = ffi.from_buffer(w.memory), (ctypes.c_char * 16).from_buffer(w.memory)
    w.abort()
    del direct, derived
    rejected(path, "flags", "did not finish")


def test_a_malformed_kvm_state_is_refused_before_sealing(tmp_path):
    """A KVM state without its msrs part is a ValueError naming it, and the file is still incomplete."""
    parts = kvm_x86_parts(0x33)
    del parts[VcpuPart.MSRS]
    path = tmp_path / "bad.snap"
    with SnapshotImage.create(path, MEMORY_SIZE) as w, pytest.raises(ValueError, match=r"vcpu\[1\]: expected parts "
                                                                            r"regs, .*, saw no msrs"):
        w.finalize([kvm_x86_state(0x11), image.pack_kvm_x86_state(parts)])
    rejected(path, "flags", "did not finish")


@pytest.mark.parametrize("size", [0, 100, 4096 + 1])
def test_create_refuses_a_memory_size_that_is_not_whole_pages(tmp_path, size):
    """The image is whole pages: zero or a partial page is a ValueError naming memory_size."""
    with pytest.raises(ValueError, match="memory_size"):
        SnapshotImage.create(tmp_path / "s.snap", size)


def test_create_refuses_an_unknown_hypervisor(tmp_path):
    """Only the documented hypervisor tags can be written."""
    with pytest.raises(ValueError, match="hypervisor"):
        SnapshotImage.create(tmp_path / "h.snap", MEMORY_SIZE, hypervisor="xen")


# --- rejections, in the loader's check order ----------------------------------

def test_wrong_magic_rejected(snap):
    rewrite_header(snap, magic=b"NOTASNAP")
    rejected(snap, "magic", "saw b'NOTASNAP'")


def test_wrong_format_version_rejected(snap):
    rewrite_header(snap, format_version=4)
    rejected(snap, "format_version", "expected 3 or 2, saw 4")


def test_version_1_file_is_refused_naming_the_versions_read(snap):
    """A version 1 file (regs + sregs + FPU per vCPU in the header) is refused, saying why."""
    rewrite_header(snap, format_version=1)
    err = rejected(snap, "format_version", "expected 3 or 2, saw 1 (a version 1 file holds only regs + sregs + FPU")
    assert "capture it again" in str(err)


def test_wrong_header_size_rejected(snap):
    rewrite_header(snap, header_size=8192)
    rejected(snap, "header_size", "saw 0x2000")


def test_unknown_flag_bits_rejected(snap):
    rewrite_header(snap, flags=image.FLAG_COMPLETE | 0x80)
    rejected(snap, "flags", "saw 0x81")


def test_incomplete_file_rejected(snap):
    rewrite_header(snap, flags=0)
    err = rejected(snap, "flags", "did not finish")
    assert "incomplete" in str(err)


def test_wrong_arch_rejected(snap):
    rewrite_header(snap, arch=7)
    rejected(snap, "arch", "saw 7 (unknown)")


def test_wrong_page_size_rejected(snap):
    rewrite_header(snap, page_size=8192)
    rejected(snap, "page_size", "expected 0x1000, saw 0x2000")


def test_wrong_memory_offset_rejected(snap):
    rewrite_header(snap, memory_offset=0x2000)
    rejected(snap, "memory_offset", "saw 0x2000")


def test_unknown_hash_algo_rejected(snap):
    rewrite_header(snap, hash_algo=9)
    rejected(snap, "hash_algo", "saw 9 (unknown)")


def test_version_3_file_claiming_sha256_rejected(snap):
    """A version 3 header must say blake3: one claiming version 2's sha256 is refused naming hash_algo."""
    rewrite_header(snap, hash_algo=image.HashAlgo.SHA256)
    rejected(snap, "hash_algo", "expected 2 (blake3), the hash of format version 3, saw 1 (sha256)")


def test_version_2_file_claiming_blake3_rejected(tmp_path):
    """A version 2 header must say sha256: version 2 writers knew no other hash."""
    path = tmp_path / "v2.snap"
    shutil.copy(VERSION_2_FILE, path)
    rewrite_header(path, hash_algo=image.HashAlgo.BLAKE3)
    rejected(path, "hash_algo", "expected 1 (sha256), the hash of format version 2, saw 2 (blake3)")


def test_unknown_hypervisor_rejected(snap):
    rewrite_header(snap, hypervisor="xen")
    rejected(snap, "hypervisor", "xen")


def test_nonzero_reserved_bytes_rejected(snap):
    rewrite_header(snap, reserved=b"\x01")
    rejected(snap, "reserved", "01")


def test_memory_size_not_whole_pages_rejected(snap):
    rewrite_header(snap, memory_size=MEMORY_SIZE - 1)
    rejected(snap, "memory_size", f"saw {MEMORY_SIZE - 1:#x}")


def test_memory_size_smaller_than_the_file_rejected(snap):
    rewrite_header(snap, memory_size=MEMORY_SIZE - 4096)
    rejected(snap, "memory_size", f"expected {MEMORY_SIZE:#x}")


def test_memory_size_larger_than_the_file_rejected(snap):
    rewrite_header(snap, memory_size=MEMORY_SIZE + 0x10000)
    err = rejected(snap, "memory_size", f"saw {MEMORY_SIZE + 0x10000:#x}")
    assert "truncated" in str(err)


def test_truncated_memory_image_rejected(snap):
    with open(snap, "r+b") as f:
        f.truncate(4096 + MEMORY_SIZE - 4096)
    err = rejected(snap, "memory_size", f"at most {MEMORY_SIZE - 4096:#x}")
    assert str(err).startswith("snapshot file truncated")


def test_truncated_vcpu_section_rejected(snap):
    """The memory image is whole but the vCPU states after it are cut: vcpu_size names it."""
    with open(snap, "r+b") as f:
        f.truncate(4096 + MEMORY_SIZE + 16)
    err = rejected(snap, "vcpu_size", "expected at most 0x10")
    assert str(err).startswith("snapshot file truncated")


def test_vcpu_size_not_whole_records_rejected(snap):
    rewrite_header(snap, vcpu_size=SnapshotImage.open(snap).vcpu_size - 4)
    rejected(snap, "vcpu_size", "a multiple of 8")


def test_vcpu_offset_not_after_the_image_rejected(snap):
    rewrite_header(snap, vcpu_offset=0x1000)
    rejected(snap, "vcpu_offset", f"expected {0x1000 + MEMORY_SIZE:#x} (memory_offset + memory_size), saw 0x1000")


def test_unknown_vcpu_state_version_rejected(snap):
    rewrite_header(snap, vcpu_state_version=2)
    rejected(snap, "vcpu_state_version", "expected 1, saw 2")


def test_truncated_header_rejected(snap):
    with open(snap, "r+b") as f:
        f.truncate(100)
    err = rejected(snap, "file length", "saw 0x64 bytes")
    assert str(err).startswith("snapshot file truncated")


def test_empty_file_rejected(tmp_path):
    (tmp_path / "empty.snap").write_bytes(b"")
    rejected(tmp_path / "empty.snap", "file length", "saw 0x0 bytes")


def test_vcpu_count_beyond_the_section_rejected(snap):
    rewrite_header(snap, vcpu_count=2**32 - 1)
    rejected(snap, "vcpu_count", "saw 4294967295")


def test_vcpu_count_larger_than_the_records_present_rejected(snap):
    rewrite_header(snap, vcpu_count=3)
    rejected(snap, "vcpu[2]", "the section ends at record offset")


def test_vcpu_record_length_beyond_the_section_rejected(snap):
    section = bytearray(image.pack_vcpu_section([b"x" * 8], [VcpuKind.WHP_X86]))
    section[4:8] = (64).to_bytes(4, "little")
    rewrite_vcpu_section(snap, bytes(section), vcpu_count=1)
    rejected(snap, "vcpu[0].length", "saw 64")


def test_unknown_vcpu_kind_rejected(snap):
    section = bytearray(image.pack_vcpu_section([b"s"], [VcpuKind.WHP_X86]))
    section[0:4] = (9).to_bytes(4, "little")
    rewrite_vcpu_section(snap, bytes(section), vcpu_count=1)
    rejected(snap, "vcpu[0].kind", "saw 9 (unknown)")


def test_bytes_after_the_last_vcpu_record_rejected(snap):
    rewrite_vcpu_section(snap, read_vcpu_section(snap) + bytes(8))
    rejected(snap, "vcpu_size", "bytes after the last record")


def test_header_checksum_mismatch_rejected(snap):
    with open(snap, "r+b") as f:  # flip one bit of vcpu_hash: no field check can see it
        f.seek(image.FIELDS["vcpu_hash"][0])
        byte = f.read(1)[0]
        f.seek(image.FIELDS["vcpu_hash"][0])
        f.write(bytes([byte ^ 0x01]))
    rejected(snap, "header_checksum", "saw ")


def test_vcpu_hash_mismatch_rejected(snap):
    """One flipped bit in a vCPU state, verified or not: the section's hash names it."""
    with open(snap, "r+b") as f:
        f.seek(4096 + MEMORY_SIZE + 100)
        byte = f.read(1)[0]
        f.seek(4096 + MEMORY_SIZE + 100)
        f.write(bytes([byte ^ 0x01]))
    rejected(snap, "vcpu_hash", "(of the vCPU section)", verify=False)


# --- one field of one vCPU state part wrong (the section re-hashed, so the part's own check is reached) ---


def rewrite_vcpu_state(path, index: int, state: bytes) -> None:
    """Replace vCPU ``index``'s state in a file, keeping the others, the section hash and the checksum valid.
    The records are packed here, unchecked: pack_vcpu_section refuses the malformed states these tests need."""
    img = SnapshotImage.open(path, verify=False)
    states = list(img.vcpu_states)
    states[index] = state
    section = bytearray()
    for kind, one in zip(img.vcpu_kinds, states, strict=True):
        section += image.VCPU_RECORD_HEAD.pack(kind, len(one)) + one + bytes(-len(one) % 8)
    rewrite_vcpu_section(path, bytes(section))


def corrupt_part_head(state: bytes, part: VcpuPart, *, ident: int | None = None, length: int | None = None) -> bytes:
    """``state`` with the id or length of ``part``'s header changed, the bytes left where they were."""
    out = bytearray(state)
    pos = 0
    while True:
        seen, size = PART_HEAD.unpack_from(out, pos)
        if seen == part:
            PART_HEAD.pack_into(out, pos, seen if ident is None else ident, size if length is None else length)
            return bytes(out)
        pos += PART_HEAD.size + (size + 7) // 8 * 8


@pytest.mark.parametrize(("part", "length", "field", "seen"), [
    (VcpuPart.REGS, 140, "vcpu[1].regs.length", "expected 144 (the kernel struct), saw 140"),
    (VcpuPart.SREGS, 320, "vcpu[1].sregs.length", "expected 312 (the kernel struct), saw 320"),
    (VcpuPart.VCPU_EVENTS, 56, "vcpu[1].vcpu_events.length", "expected 64 (the kernel struct), saw 56"),
    (VcpuPart.DEBUGREGS, 0, "vcpu[1].debugregs.length", "expected 128 (the kernel struct), saw 0"),
    (VcpuPart.XSAVE, 2048, "vcpu[1].xsave.length", "at least 4096 (struct kvm_xsave), saw 2048"),
    (VcpuPart.MSRS, 72, "vcpu[1].msrs.length", "a multiple of 16 (struct kvm_msr_entry), saw 72"),
    (VcpuPart.MP_STATE, 2**32 - 1, "vcpu[1].mp_state.length", "(what is left of the state), saw 4294967295"),
])
def test_vcpu_state_part_of_the_wrong_length_rejected(snap, part, length, field, seen):
    """A part whose length is not its struct's is refused naming the vCPU and the part."""
    rewrite_vcpu_state(snap, 1, corrupt_part_head(STATES[1], part, length=length))
    rejected(snap, field, seen)


def test_unknown_vcpu_state_part_rejected(snap):
    rewrite_vcpu_state(snap, 0, corrupt_part_head(STATES[0], VcpuPart.DEBUGREGS, ident=42))
    rejected(snap, "vcpu[0].part[5].id", "9 (cpuid), saw 42")


def test_repeated_vcpu_state_part_rejected(snap):
    rewrite_vcpu_state(snap, 0, corrupt_part_head(STATES[0], VcpuPart.XCRS, ident=VcpuPart.REGS))
    rejected(snap, "vcpu[0].regs", "expected once, saw it again as part[2]")


def test_missing_vcpu_state_part_rejected(snap):
    parts = kvm_x86_parts(0x11)
    del parts[VcpuPart.VCPU_EVENTS]
    rewrite_vcpu_state(snap, 0, image.pack_kvm_x86_state(parts))
    rejected(snap, "vcpu[0]", "saw no vcpu_events")


def test_a_state_without_the_optional_xcrs_part_loads(snap):
    """XCRs are optional (KVM_CAP_XCRS needs a host CPU with XSAVE); every other part is required."""
    parts = kvm_x86_parts(0x11)
    del parts[VcpuPart.XCRS]
    rewrite_vcpu_state(snap, 0, image.pack_kvm_x86_state(parts))
    assert VcpuPart.XCRS not in SnapshotImage.open(snap).vcpu_parts(0)


def test_cpuid_part_whose_entry_count_disagrees_with_its_length_rejected(snap):
    parts = kvm_x86_parts(0x22, msrs=5, cpuid_entries=3)
    parts[VcpuPart.CPUID] = image.CPUID_HEAD.pack(4, 0) + parts[VcpuPart.CPUID][8:]
    rewrite_vcpu_state(snap, 1, image.pack_kvm_x86_state(parts))
    rejected(snap, "vcpu[1].cpuid.nent", "expected 3 (length 128 = 8 + 40 * nent), saw 4")


def test_nonzero_vcpu_state_part_padding_rejected(snap):
    parts = kvm_x86_parts(0x11)
    state = bytearray(image.pack_kvm_x86_state({VcpuPart.MP_STATE: parts.pop(VcpuPart.MP_STATE), **parts}))
    state[PART_HEAD.size + 4] = 0x01  # mp_state is 4 bytes, padded to 8
    rewrite_vcpu_state(snap, 0, bytes(state))
    rejected(snap, "vcpu[0].mp_state padding", "saw 01000000")


def test_truncated_vcpu_state_part_header_rejected(snap):
    rewrite_vcpu_state(snap, 0, STATES[0] + PART_HEAD.pack(VcpuPart.REGS, 0)[:4])
    rejected(snap, "vcpu[0].part[9]", "expected a 8-byte part header at state offset")


def test_content_hash_mismatch_rejected_on_verified_load(snap):
    with open(snap, "r+b") as f:
        f.seek(4096 + 0x2345)
        f.write(b"\xff")
    rejected(snap, "content_hash", "(of the memory image)", verify=True)


def test_unverified_load_of_a_changed_image_succeeds(snap):
    """verify=False skips only the content hash: the same file as above loads."""
    with open(snap, "r+b") as f:
        f.seek(4096 + 0x2345)
        f.write(b"\xff")
    img = SnapshotImage.open(snap, verify=False)
    assert not img.verified and img.read_memory(0x2345, 1) == b"\xff"


def test_first_failing_check_wins_in_documented_order(snap):
    """With several fields wrong, the error names the earliest check: magic, version, ..."""
    bad = {"magic": b"XXXXXXXX", "format_version": 9, "header_size": 1, "flags": 0, "arch": 9,
           "page_size": 1, "memory_offset": 1, "hash_algo": 9, "hypervisor": "x", "reserved": b"\x01",
           "memory_size": 2**63}
    good = {"magic": image.MAGIC, "format_version": 3, "header_size": 4096, "flags": 1, "arch": 1,
            "page_size": 4096, "memory_offset": 4096, "hash_algo": 2, "hypervisor": "kvm",
            "reserved": bytes(3912), "memory_size": MEMORY_SIZE}
    rewrite_header(snap, **bad)
    seen = []
    for field in bad:
        with pytest.raises(SnapshotFormatError) as info:
            SnapshotImage.open(snap)
        seen.append(info.value.field)
        rewrite_header(snap, **{field: good[field]})
    assert seen == list(bad)
    SnapshotImage.open(snap)


def test_format_error_is_a_value_error_naming_field_expected_and_seen(snap):
    """SnapshotFormatError reads 'snapshot header: <field>: expected X, saw Y (<path>)'."""
    rewrite_header(snap, page_size=8192)
    err = rejected(snap, "page_size", "saw 0x2000")
    assert isinstance(err, ValueError)
    assert str(err) == f"snapshot header: page_size: expected 0x1000, saw 0x2000 ({snap})"


# --- files of earlier versions -------------------------------------------------

def test_a_version_2_file_loads_and_verifies_by_sha256():
    """A file the version 2 writer wrote loads, its sha256 content hash verified, memory and vCPU state intact."""
    img = SnapshotImage.open(VERSION_2_FILE)
    assert (img.format_version, img.hash_algo, img.verified) == (2, image.HashAlgo.SHA256, True)
    assert img.content_hash == hashlib.sha256(pattern(2 * image.PAGE_SIZE)).digest()
    assert img.read_memory() == pattern(2 * image.PAGE_SIZE)
    assert img.vcpu_states == (kvm_x86_state(0x11),)


def test_a_changed_byte_in_a_version_2_image_is_caught_by_its_sha256(tmp_path):
    """The old files' content check still bites: one flipped byte, and a verified load names content_hash."""
    path = tmp_path / "v2.snap"
    shutil.copy(VERSION_2_FILE, path)
    with open(path, "r+b") as f:
        f.seek(4096 + 0x1234)
        f.write(b"\xff")
    rejected(path, "content_hash", "(of the memory image)")


# --- hashing as the image is written ------------------------------------------

HASH_STEP = image._HASH_STEP
# Two whole hashing pieces and a page: pieces meet at HASH_STEP and 2 * HASH_STEP.
PIECES_SIZE = 2 * HASH_STEP + image.PAGE_SIZE


def pieces_pattern() -> bytes:
    page = bytes(range(256)) * (image.PAGE_SIZE // 256)
    return b"".join(i.to_bytes(4, "little") + page[4:] for i in range(PIECES_SIZE // image.PAGE_SIZE))


@pytest.fixture(scope="module")
def pieces_file(tmp_path_factory) -> Path:
    """A version 3 file hashed piece by piece as it was written (SnapshotImage.write marks each piece final)."""
    path = tmp_path_factory.mktemp("pieces") / "pieces.snap"
    SnapshotImage.write(path, pieces_pattern(), vcpu_states=[kvm_x86_state(0x11)])
    return path


@pytest.mark.parametrize("offset", [0, HASH_STEP - 1, HASH_STEP, 2 * HASH_STEP - 1, 2 * HASH_STEP, PIECES_SIZE - 1],
                         ids=["first-byte", "end-of-piece-0", "start-of-piece-1", "end-of-piece-1",
                              "start-of-the-last-page", "last-byte"])
def test_a_changed_byte_at_a_piece_boundary_is_caught(pieces_file, tmp_path, offset):
    """The image is hashed in pieces as it is written; a byte changed on either side of a seam is still caught."""
    path = tmp_path / "changed.snap"
    shutil.copy(pieces_file, path)
    SnapshotImage.open(path)  # verifies as written
    with open(path, "r+b") as f:
        f.seek(4096 + offset)
        was = f.read(1)[0]
        f.seek(4096 + offset)
        f.write(bytes([was ^ 0x01]))
    rejected(path, "content_hash", "(of the memory image)")


def test_write_hashes_each_byte_once_as_it_lands_and_never_reads_the_file(tmp_path, file_reads):  # noqa: F811
    """SnapshotImage.write marks each piece final as it copies it: the thread hashes all of it, finalize reads
    nothing back from the file (the bytes it would hash from there are counted: none)."""
    memory = pieces_pattern()
    with SnapshotImage.create(tmp_path / "w.snap", len(memory)) as w:
        for start in range(0, len(memory), HASH_STEP):
            w.memory[start:start + HASH_STEP] = memory[start:start + HASH_STEP]
            w.mark_final(min(start + HASH_STEP, len(memory)))
        img = w.finalize()
    assert w.stats is not None
    assert (w.stats.hashed_as_final, w.stats.hashed_at_finalize, sum(file_reads)) == (len(memory), 0, 0)
    assert img.content_hash == blake3.blake3(memory).digest() and SnapshotImage.open(img.path).verified


def test_what_is_never_marked_final_is_hashed_from_the_file_at_finalize(tmp_path, file_reads):  # noqa: F811
    """The counters are what happened: half marked final is hashed by the thread, the other half read back."""
    memory = pieces_pattern()
    half = HASH_STEP
    with SnapshotImage.create(tmp_path / "half.snap", len(memory)) as w:
        w.memory[:] = memory
        w.mark_final(half)
        img = w.finalize()
    assert w.stats is not None
    assert (w.stats.hashed_as_final, w.stats.hashed_at_finalize, sum(file_reads)) == \
        (half, len(memory) - half, len(memory) - half)
    assert img.content_hash == blake3.blake3(memory).digest() and SnapshotImage.open(img.path).verified


def test_writeback_starts_for_each_hashed_piece_once_covering_the_image(tmp_path, monkeypatch):
    """Each piece the thread hashed has its writeback started, in order, without gaps or overlaps."""
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(image, "_writeback_starter",
                        lambda fd, mapping: lambda offset, size: started.append((offset, size)))
    SnapshotImage.write(tmp_path / "wb.snap", pieces_pattern())
    ends = [image.MEMORY_OFFSET]
    for offset, size in started:
        assert offset == ends[-1], f"writeback started at {offset:#x}, the previous piece ended at {ends[-1]:#x}"
        ends.append(offset + size)
    assert ends[-1] == image.MEMORY_OFFSET + PIECES_SIZE, f"writeback ranges {started} do not cover the image"


@pytest.mark.platform("linux")
def test_a_piece_is_unmapped_before_its_writeback_starts_and_the_rest_stays_mapped(tmp_path):
    """Writeback of a still-mapped page write-protects it, one TLB flush per page on every CPU of this process (a
    running vCPU's too): the thread drops a hashed piece's mapping first. The bytes stay; only that piece goes."""
    memory = pieces_pattern()
    pages = HASH_STEP // image.PAGE_SIZE
    with SnapshotImage.create(tmp_path / "zap.snap", len(memory)) as w:
        w.memory[:] = memory
        assert mapped_pages(w, 0, 2 * pages) == b"\1" * (2 * pages), "the copied image is mapped to begin with"
        w.mark_final(HASH_STEP)
        # The thread's progress has no public signal: the condition is the pages' own state, polled to a deadline.
        deadline = time.monotonic() + 30
        while mapped_pages(w, 0, pages) != bytes(pages):
            assert time.monotonic() < deadline, "the hashed piece is still mapped 30 s after it was marked final"
            time.sleep(0.01)
        assert mapped_pages(w, pages, pages) == b"\1" * pages, "a piece not yet final was unmapped"
        assert bytes(w.memory[:HASH_STEP]) == memory[:HASH_STEP], "the unmapped piece lost its bytes"
        img = w.finalize()
    assert SnapshotImage.open(img.path).read_memory() == memory


def mapped_pages(writer, first: int, count: int) -> bytes:
    """Whether each of ``count`` pages of the writer's image from page ``first`` is mapped now (pagemap's present
    bit), one byte each (Linux)."""
    from snapproof.native._lib import ffi
    from snapproof.native.memory import buffer_address
    from snapproof.native.pagemap import read_pagemap

    handle, addr = buffer_address(writer.memory)
    ffi.release(handle)  # the address outlives the handle: the writer's mapping stays until finalize
    return read_pagemap(addr + first * image.PAGE_SIZE, count)[0]


@pytest.mark.platform("linux")
@pytest.mark.parametrize("populate", [True, False], ids=["populated", "sparse"])
def test_a_populated_writer_has_its_image_mapped_before_any_write(tmp_path, populate):
    """populate=True allocates and maps the image's page cache at create (a capture writes every page); without
    it nothing is mapped until written, and an image never written stays a hole in the file."""
    pages = PIECES_SIZE // image.PAGE_SIZE
    with SnapshotImage.create(tmp_path / "pop.snap", PIECES_SIZE, populate=populate) as w:
        present = mapped_pages(w, 0, pages)
        img = w.finalize()
    assert present == (b"\1" * pages if populate else bytes(pages)), f"{sum(present)} of {pages} pages mapped"
    assert SnapshotImage.open(img.path).read_memory() == bytes(PIECES_SIZE)


def test_a_failed_early_writeback_is_reported_and_the_file_still_completes(tmp_path, monkeypatch):
    """Early writeback is a head start only: its error is reported in stats, the fsyncs write everything."""
    def fails(offset, size):
        raise OSError(5, f"sync_file_range(offset {offset:#x}): Input/output error")

    monkeypatch.setattr(image, "_writeback_starter", lambda fd, mapping: fails)
    path = tmp_path / "wbfail.snap"
    with SnapshotImage.create(path, MEMORY_SIZE) as w:
        w.memory[:] = pattern(MEMORY_SIZE)
        w.mark_final(MEMORY_SIZE)
        w.finalize()
    assert w.stats is not None and "sync_file_range(offset 0x1000): Input/output error" in w.stats.writeback_error
    assert SnapshotImage.open(path).read_memory() == pattern(MEMORY_SIZE)


def test_a_hash_that_fails_on_the_thread_fails_finalize_and_leaves_the_file_incomplete(tmp_path, monkeypatch):
    """An error on the hashing thread is not lost: finalize raises it, naming the hasher, and nothing is sealed."""
    class Broken:
        def update(self, data):
            raise MemoryError("hash state lost")

        def digest(self):
            return bytes(32)

    monkeypatch.setattr(image, "content_hasher", lambda algo: Broken())
    path = tmp_path / "broken.snap"
    with SnapshotImage.create(path, MEMORY_SIZE) as w:
        w.memory[:] = pattern(MEMORY_SIZE)
        w.mark_final(MEMORY_SIZE)
        with pytest.raises(RuntimeError, match=r"the snapshot image hasher failed after 0x0 bytes: "
                                               r"MemoryError\('hash state lost'\)"):
            w.finalize()
    rejected(path, "flags", "did not finish")


def test_a_writer_dropped_without_finalize_stops_its_hashing_thread(tmp_path):
    """Forgetting both finalize() and abort() leaves no thread behind once the writer is collected (an image large
    enough to get a hashing thread)."""
    import gc
    import threading

    w = SnapshotImage.create(tmp_path / "dropped.snap", PIECES_SIZE)
    w.memory[:] = pieces_pattern()
    w.mark_final(PIECES_SIZE)
    thread = next(t for t in threading.enumerate() if t.name == "snapshot-hasher")
    del w
    gc.collect()
    thread.join(10)
    assert not thread.is_alive(), "the dropped writer's hashing thread still runs"


@pytest.mark.platform("linux")
def test_a_full_file_system_is_named_when_a_populated_writer_is_created(tmp_path, monkeypatch):
    """A writer that will write every page (``populate``) has the image's blocks allocated at create: a file system
    without room for them is an ENOSPC there, naming the file and the image's size, not a SIGBUS in the copy into
    its mapping. (Simulated: the allocation refuses, as a full file system does.)"""
    import errno

    def no_room(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    path = tmp_path / "full.snap"
    with pytest.raises(OSError, match=rf"{path}: no room on its file system for the 0x400000-byte memory image "
                                      r"\(No space left on device\)") as raised:
        SnapshotImage.create(path, 4 << 20, populate=True)
    assert raised.value.errno == errno.ENOSPC
    SnapshotImage.create(tmp_path / "sparse.snap", 4 << 20).abort()  # a sparse writer allocates nothing


@pytest.mark.platform("linux")
@pytest.mark.parametrize("refusal", ["EOPNOTSUPP", "EINVAL"])
def test_a_file_system_that_cannot_allocate_ahead_still_gets_a_populated_writer(tmp_path, monkeypatch, refusal):
    """Allocating the image's blocks ahead is a speed-up and an early ENOSPC, not a need: where the file system
    refuses it, the writer is made as before and its file holds what is written."""
    import errno

    def cannot(fd, offset, size):
        raise OSError(getattr(errno, refusal), os.strerror(getattr(errno, refusal)))

    monkeypatch.setattr(os, "posix_fallocate", cannot)
    data = pattern(MEMORY_SIZE)
    with SnapshotImage.create(tmp_path / "no-fallocate.snap", MEMORY_SIZE, populate=True) as w:
        w.memory[:] = data
        w.mark_final(MEMORY_SIZE)
        img = w.finalize()
    assert SnapshotImage.open(img.path).read_memory() == data


@pytest.mark.parametrize("end", [-1, MEMORY_SIZE + 1])
def test_mark_final_refuses_a_range_outside_the_image(tmp_path, end):
    with SnapshotImage.create(tmp_path / "r.snap", MEMORY_SIZE) as w, \
            pytest.raises(ValueError, match=f"mark_final: end {end:#x} outside the memory image"):
        w.mark_final(end)


# --- python -m snapproof.native.image info ----------------------------------------------

def test_info_prints_the_header_in_plain_words(snap, capsys):
    """`info` shows one field a line: sizes in hex and units, hash, vCPUs, complete, verification."""
    assert image.main(["info", str(snap)]) == 0
    out = capsys.readouterr().out
    for line in ("complete         yes", "architecture     x86_64", "hypervisor       kvm",
                 "page size        0x1000 (4 KiB)", "memory size      0x4000 (16 KiB), 4 pages",
                 "format           snapproof snapshot, version 3",
                 f"content hash     blake3 {blake3.blake3(pattern(MEMORY_SIZE)).hexdigest()}",
                 "vCPUs            2, state layout version 1, ",
                 f"  vCPU 0         kvm_x86 state, {len(STATES[0])} bytes: regs 144, sregs 312, xcrs 392, "
                 "vcpu_events 64, mp_state 4, debugregs 128, xsave 4096, msrs 32, cpuid 8 (2 MSRs)",
                 "content check    verifies (blake3 of 0x4000 (16 KiB) matches the header)"):
        assert line in out, f"missing {line!r} in:\n{out}"


def test_info_of_a_version_2_file_names_sha256(capsys):
    """An old file shows its version and its algorithm, and verifies by it."""
    assert image.main(["info", str(VERSION_2_FILE)]) == 0
    out = capsys.readouterr().out
    for line in ("format           snapproof snapshot, version 2",
                 f"content hash     sha256 {hashlib.sha256(pattern(2 * image.PAGE_SIZE)).hexdigest()}",
                 "content check    verifies (sha256 of 0x2000 (8 KiB) matches the header)"):
        assert line in out, f"missing {line!r} in:\n{out}"


def test_info_reports_a_content_mismatch_and_exits_1(snap, capsys):
    with open(snap, "r+b") as f:
        f.seek(4096)
        f.write(b"\x00\x01")
    assert image.main(["info", str(snap)]) == 1
    captured = capsys.readouterr()
    assert "content check    MISMATCH" in captured.out and "content_hash" in captured.err


def test_info_shows_an_incomplete_file_as_incomplete_and_exits_1(tmp_path, capsys):
    path = tmp_path / "i.snap"
    SnapshotImage.create(path, MEMORY_SIZE).abort()
    assert image.main(["info", str(path)]) == 1
    captured = capsys.readouterr()
    assert "complete         NO" in captured.out and "snapshot incomplete" in captured.err


def test_info_as_a_module_exits_1_with_the_error_on_a_bad_file(snap):
    """`python -m snapproof.native.image info FILE` on a corrupt file: exit 1, the loader's message on stderr."""
    rewrite_header(snap, page_size=8192)
    run = subprocess.run([sys.executable, "-m", "snapproof.native.image", "info", str(snap)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run
    assert "page_size: expected 0x1000, saw 0x2000" in run.stderr, run.stderr
