"""The snapshot file format (native/image.py): writing, reading back, and every
way the loader refuses a bad file. Negatives corrupt one field with
``rewrite_header`` (checksum kept valid, so that field's own check is reached)
and check the error names the field and what it saw."""

import ctypes
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from native import image
from native.image import Arch, SnapshotFormatError, SnapshotImage, VcpuKind, rewrite_header

REPO = Path(__file__).resolve().parents[1]
MEMORY_SIZE = 4 * image.PAGE_SIZE
KVM_STATE_SIZE = 872  # kvm_regs + kvm_sregs + kvm_fpu on x86_64; opaque to the format


def pattern(size: int) -> bytes:
    """Memory whose every page differs, so a misplaced page cannot go unseen."""
    return bytes((i * 7 + i // image.PAGE_SIZE) & 0xFF for i in range(size))


@pytest.fixture
def snap(tmp_path) -> Path:
    """A valid, complete snapshot: 4 pages, two KVM vCPU states."""
    path = tmp_path / "valid.snap"
    SnapshotImage.write(path, pattern(MEMORY_SIZE), vcpu_states=[b"\x11" * KVM_STATE_SIZE, b"\x22" * 100])
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
    assert img.vcpu_states == (b"\x11" * KVM_STATE_SIZE, b"\x22" * 100)
    assert img.vcpu_kinds == (VcpuKind.KVM_X86, VcpuKind.KVM_X86)
    assert img.verified


def test_header_fields_describe_the_file(snap):
    """The header records arch, hypervisor, sizes, COMPLETE and the sha256 of the image."""
    img = SnapshotImage.open(snap)
    assert (img.arch, img.hypervisor, img.page_size) == (Arch.X86_64, "kvm", 4096)
    assert (img.memory_offset, img.memory_size) == (0x1000, MEMORY_SIZE)
    assert img.complete and img.flags == image.FLAG_COMPLETE
    assert img.content_hash == hashlib.sha256(pattern(MEMORY_SIZE)).digest()
    assert img.path == str(snap) and img.file_length == 0x1000 + MEMORY_SIZE


def test_stripping_the_header_page_leaves_the_raw_memory_image(snap):
    """The image sits at offset 4096, so the file minus one page is plain raw memory."""
    assert snap.read_bytes()[4096:] == pattern(MEMORY_SIZE)


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


def test_four_kvm_vcpu_states_fit_in_the_header_page(tmp_path):
    """The vCPU area holds four 872-byte KVM states (the documented capacity)."""
    states = [bytes([i]) * KVM_STATE_SIZE for i in range(4)]
    assert SnapshotImage.write(tmp_path / "4.snap", bytes(4096), vcpu_states=states).vcpu_states == tuple(states)


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


def test_vcpu_states_too_big_for_the_header_are_refused_before_sealing(tmp_path):
    """Five KVM states overflow the vCPU area: ValueError, and the file is still incomplete."""
    path = tmp_path / "big.snap"
    with SnapshotImage.create(path, MEMORY_SIZE) as w, pytest.raises(ValueError, match="do not fit the header"):
        w.finalize([bytes(KVM_STATE_SIZE)] * 5)
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
    rewrite_header(snap, format_version=2)
    rejected(snap, "format_version", "saw 2")


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
    rewrite_header(snap, memory_size=MEMORY_SIZE + 4096)
    err = rejected(snap, "memory_size", f"saw {MEMORY_SIZE + 4096:#x}")
    assert "truncated" in str(err)


def test_truncated_memory_image_rejected(snap):
    with open(snap, "r+b") as f:
        f.truncate(4096 + MEMORY_SIZE - 4096)
    err = rejected(snap, "memory_size", f"at most {MEMORY_SIZE - 4096:#x}")
    assert str(err).startswith("snapshot file truncated")


def test_truncated_header_rejected(snap):
    with open(snap, "r+b") as f:
        f.truncate(100)
    err = rejected(snap, "file length", "saw 0x64 bytes")
    assert str(err).startswith("snapshot file truncated")


def test_empty_file_rejected(tmp_path):
    (tmp_path / "empty.snap").write_bytes(b"")
    rejected(tmp_path / "empty.snap", "file length", "saw 0x0 bytes")


def test_vcpu_count_beyond_the_area_rejected(snap):
    rewrite_header(snap, vcpu_count=2**32 - 1)
    rejected(snap, "vcpu_count", "saw 4294967295")


def test_vcpu_count_larger_than_the_records_present_rejected(snap):
    rewrite_header(snap, vcpu_count=3)
    rejected(snap, "vcpu[2].kind", "saw 0 (unknown)")


def test_vcpu_record_length_beyond_the_area_rejected(snap):
    area = bytearray(image.pack_vcpu_area([b"x" * 8], [VcpuKind.KVM_X86]))
    area[4:8] = (image.VCPU_AREA_SIZE).to_bytes(4, "little")
    rewrite_header(snap, vcpu_count=1, vcpu_area=bytes(area))
    rejected(snap, "vcpu[0].length", f"saw {image.VCPU_AREA_SIZE}")


def test_unknown_vcpu_kind_rejected(snap):
    area = bytearray(image.pack_vcpu_area([b"s"], [VcpuKind.KVM_X86]))
    area[0:4] = (9).to_bytes(4, "little")
    rewrite_header(snap, vcpu_count=1, vcpu_area=bytes(area))
    rejected(snap, "vcpu[0].kind", "saw 9 (unknown)")


def test_bytes_after_the_last_vcpu_record_rejected(snap):
    area = bytearray(image.VCPU_AREA_SIZE)
    area[-1] = 0xEE
    rewrite_header(snap, vcpu_count=0, vcpu_area=bytes(area))
    rejected(snap, "vcpu_area", "non-zero bytes")


def test_header_checksum_mismatch_rejected(snap):
    with open(snap, "r+b") as f:  # flip one bit of a vCPU state: no field check can see it
        f.seek(image.VCPU_AREA_OFFSET + 8)
        byte = f.read(1)[0]
        f.seek(image.VCPU_AREA_OFFSET + 8)
        f.write(bytes([byte ^ 0x01]))
    rejected(snap, "header_checksum", "saw ")


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
    good = {"magic": image.MAGIC, "format_version": 1, "header_size": 4096, "flags": 1, "arch": 1,
            "page_size": 4096, "memory_offset": 4096, "hash_algo": 1, "hypervisor": "kvm",
            "reserved": bytes(28), "memory_size": MEMORY_SIZE}
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


# --- python -m native.image info ----------------------------------------------

def test_info_prints_the_header_in_plain_words(snap, capsys):
    """`info` shows one field a line: sizes in hex and units, hash, vCPUs, complete, verification."""
    assert image.main(["info", str(snap)]) == 0
    out = capsys.readouterr().out
    for line in ("complete         yes", "architecture     x86_64", "hypervisor       kvm",
                 "page size        0x1000 (4 KiB)", "memory size      0x4000 (16 KiB), 4 pages",
                 f"content hash     sha256 {hashlib.sha256(pattern(MEMORY_SIZE)).hexdigest()}",
                 "vCPUs            2", "  vCPU 0         kvm_x86 state, 872 bytes",
                 "content check    verifies"):
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
    """`python -m native.image info FILE` on a corrupt file: exit 1, the loader's message on stderr."""
    rewrite_header(snap, page_size=8192)
    run = subprocess.run([sys.executable, "-m", "native.image", "info", str(snap)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run
    assert "page_size: expected 0x1000, saw 0x2000" in run.stderr, run.stderr
