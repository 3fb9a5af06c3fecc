"""Fuzzing the snapshot loader: whatever the header bytes say, SnapshotImage.open()
ends in SnapshotFormatError or a valid image, never another exception, and a
header claiming a huge size costs no more memory than a sane one.

Examples per test: 500 by default, ``--fuzz-examples N`` for more (10,000 for a
release run)."""

import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from snapproof.native import image
from snapproof.native.image import (
    SnapshotFormatError,
    SnapshotImage,
    read_vcpu_section,
    rewrite_header,
    rewrite_vcpu_section,
)

from tests.sample_states import kvm_x86_state

MEMORY_SIZE = 4 * image.PAGE_SIZE
# Opening a small file reads one header page and hashes through a buffer no
# bigger than the image; anything near this bound means a size was trusted.
OPEN_PEAK_BOUND = 256 * 1024
INTERESTING_INTS = [0, 1, 7, 8, 0xFFF, 0x1000, 0x1001, 0x2000, MEMORY_SIZE - 0x1000, MEMORY_SIZE,
                    MEMORY_SIZE + 0x1000, 2**31, 2**32 - 1, 2**32, 2**40, 2**63, 2**64 - 1]


# Written by the version 2 writer (pinned in tests/test_image_tripwires.py): the loader's sha256 path.
VERSION_2_FILE = Path(__file__).parent / "data" / "format-v2.snap"


@pytest.fixture(scope="module", params=["version-3", "version-2"])
def valid_bytes(request, tmp_path_factory) -> bytes:
    """A small valid snapshot as raw bytes: one written now (4 pages, two KVM x86 vCPU states), and the saved
    version 2 file (2 pages, one state)."""
    if request.param == "version-2":
        return VERSION_2_FILE.read_bytes()
    path = tmp_path_factory.mktemp("fuzz-seed") / "seed.snap"
    memory = bytes(range(256)) * (MEMORY_SIZE // 256)
    SnapshotImage.write(path, memory, vcpu_states=[kvm_x86_state(0x5A), kvm_x86_state(0xA5, msrs=3, cpuid_entries=2)])
    return path.read_bytes()


@pytest.fixture
def fuzz_settings(request):
    """Hypothesis settings with max_examples from --fuzz-examples (default 500)."""
    return settings(max_examples=request.config.getoption("fuzz_examples", default=500), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def traced_open(path: Path) -> tuple[SnapshotImage | SnapshotFormatError, int]:
    """open(verify=True) under tracemalloc: (the image or the format error, bytes of peak growth).
    Tracing only the open keeps hypothesis's own allocations out of the count, and fast."""
    already = tracemalloc.is_tracing()
    if already:
        tracemalloc.reset_peak()
    else:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        try:
            result = SnapshotImage.open(path, verify=True)
        except SnapshotFormatError as err:
            result = err
        return result, tracemalloc.get_traced_memory()[1] - before
    finally:
        if not already:
            tracemalloc.stop()


def open_ends_cleanly(path: Path) -> None:
    """The fuzz oracle: a clean rejection naming a field, or an image whose claims hold, and
    either way no more memory than a sane header costs."""
    result, peak = traced_open(path)
    assert peak < OPEN_PEAK_BOUND, f"open() peaked at {peak} bytes for a {path.stat().st_size}-byte file"
    if isinstance(result, SnapshotFormatError):
        assert result.field and str(result).startswith("snapshot"), f"unhelpful error: {result!r}"
        event(f"rejected: {result.field}")
        return
    event("valid image")
    length = path.stat().st_size
    assert result.memory_offset + result.memory_size + result.vcpu_size == length, \
        f"{result} accepted for a {length:#x}-byte file"
    assert result.verified and len(result.read_memory()) == result.memory_size


def field_value(name: str):
    """Any value of the field's width, weighted towards edges and huge sizes."""
    fmt = image.FIELDS[name][1]
    size = struct.calcsize(fmt)
    if fmt.endswith("s"):
        return st.binary(max_size=size)
    top = 2 ** (8 * size) - 1
    return st.one_of(st.sampled_from([v for v in INTERESTING_INTS if v <= top]), st.integers(0, top),
                     st.integers(0, top).map(lambda v: v & ~(image.PAGE_SIZE - 1)))  # passes "whole pages"


# The section's record and part headers: where a trusted length would index past the state.
RECORD_OR_PART_LENGTHS = st.one_of(st.integers(0, 5000), st.sampled_from([2**31, 2**32 - 1]))


@st.composite
def section_edits(draw, section: bytes):
    """The seed's vCPU section with some u32 words (kinds, part ids, lengths, nent) set to near-miss or wild
    values, and bytes flipped."""
    data = bytearray(section)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) // 4 - 1)) * 4
        value = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]), RECORD_OR_PART_LENGTHS))
        struct.pack_into("<I", data, at, value)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] ^= draw(st.integers(1, 255))
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    return bytes(data if cut is None else data[:cut])


header_edits = st.lists(
    st.tuples(st.sampled_from(["xor", "set"]), st.integers(0, image.HEADER_SIZE - 1), st.integers(1, 255)),
    min_size=1, max_size=16)
# The sizes and vCPU records are where a trusted value would do harm: drawn more often.
field_names = st.sampled_from(sorted(image.FIELDS) + ["memory_size", "vcpu_size"] * 4 + ["vcpu_count"] * 2)
field_sets = st.lists(field_names.flatmap(lambda name: st.tuples(st.just(name), field_value(name))),
                      min_size=1, max_size=4)
file_lengths = st.one_of(st.none(), st.integers(0, image.HEADER_SIZE + MEMORY_SIZE + 2 * image.PAGE_SIZE))


# 10,000 examples (--fuzz-examples 10000) take about half a minute here; the suite's 120 s
# ceiling is for hangs, so these two get a ceiling that fits a slow CI machine too.
FUZZ_TIMEOUT = pytest.mark.timeout(900)


@FUZZ_TIMEOUT
def test_fuzzed_header_bytes_end_in_format_error_or_valid_image(valid_bytes, fuzz_settings, tmp_path):
    """Random byte flips and overwrites in the header, and random file lengths."""
    path = tmp_path / "fuzz.snap"

    @fuzz_settings
    @given(edits=header_edits, length=file_lengths)
    def run(edits, length):
        data = bytearray(valid_bytes)
        for op, offset, byte in edits:
            data[offset] = data[offset] ^ byte if op == "xor" else byte
        if length is not None:
            data = data[:length] + bytes(max(0, length - len(data)))
        path.write_bytes(data)
        open_ends_cleanly(path)

    run()


@FUZZ_TIMEOUT
def test_fuzzed_field_values_with_valid_checksum_end_in_format_error_or_valid_image(
        valid_bytes, fuzz_settings, tmp_path):
    """Random field values (huge sizes included) behind a valid checksum, so every check is reached;
    memory use while opening stays bounded whatever size the header claims."""
    path = tmp_path / "fuzz.snap"

    @fuzz_settings
    @given(fields=field_sets, fix_checksum=st.sampled_from([True, True, True, False]))
    def run(fields, fix_checksum):
        path.write_bytes(valid_bytes)
        for name, value in fields:
            rewrite_header(path, fix_checksum=fix_checksum, **{name: value})
        open_ends_cleanly(path)

    run()


@FUZZ_TIMEOUT
def test_fuzzed_vcpu_section_behind_a_valid_hash_ends_in_format_error_or_valid_image(valid_bytes, fuzz_settings,
                                                                                      tmp_path):
    """Records and parts with wrong kinds, ids, lengths and counts (the section re-hashed, the checksum kept
    valid, so the record and part checks are reached): a clean error naming the vCPU, or a valid image."""
    path = tmp_path / "fuzz.snap"
    path.write_bytes(valid_bytes)
    section = read_vcpu_section(path)

    @fuzz_settings
    @given(edited=section_edits(section), count=st.sampled_from([None, 0, 1, 2, 3, 2**32 - 1]))
    def run(edited, count):
        path.write_bytes(valid_bytes)
        rewrite_vcpu_section(path, edited, **({} if count is None else {"vcpu_count": count}))
        open_ends_cleanly(path)

    run()


@pytest.mark.parametrize("claimed", [2**63, 2**64 - 1, 2**40, 2**64 - 4096])
def test_huge_claimed_memory_size_is_rejected_without_allocating(valid_bytes, tmp_path, claimed):
    """A header claiming an enormous image (checksum valid) is refused before anything is sized by it."""
    path = tmp_path / "huge.snap"
    path.write_bytes(valid_bytes)
    rewrite_header(path, memory_size=claimed)
    err, peak = traced_open(path)
    assert isinstance(err, SnapshotFormatError) and err.field == "memory_size", f"expected memory_size: {err}"
    assert peak < OPEN_PEAK_BOUND, f"rejecting memory_size {claimed:#x} peaked at {peak} bytes"


def test_verified_load_hashes_a_large_image_in_bounded_memory(tmp_path):
    """Verifying a 64 MiB image reads it through one fixed buffer, not all at once."""
    path = tmp_path / "large.snap"
    size = 64 << 20
    with SnapshotImage.create(path, size) as w:
        w.memory[size - 1] = 0x42
        w.finalize()
    img, peak = traced_open(path)
    assert isinstance(img, SnapshotImage) and img.verified, f"expected a verified image: {img}"
    assert peak < 2 * (1 << 20), f"verifying {size:#x} bytes peaked at {peak} bytes"
