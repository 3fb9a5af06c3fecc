"""Bad input gets a clear error that names the problem: sizes, time-outs, destinations, missing devices."""

from __future__ import annotations

import errno

import pytest
from snapproof.native.errors import CapabilityMissing
from snapproof.native.host import parse_size


@pytest.mark.parametrize(("size", "shown"), [(0, "0x0"), (4097, "0x1001"), (-4096, "-0x1000")])
def test_guest_memory_size_must_be_a_positive_page_multiple(size, shown):
    """A zero, negative or unaligned size is a ValueError naming the size in hex."""
    from snapproof.native.memory import GuestMemory

    with pytest.raises(ValueError, match=f"guest memory size {shown} is not a positive multiple of 0x1000"):
        GuestMemory.memfd(size)


def test_hugetlb_size_must_be_a_huge_page_multiple():
    """hugetlb memory comes in 2 MiB pages: 1 MiB is refused before any syscall."""
    from snapproof.native.memory import GuestMemory

    with pytest.raises(ValueError, match="hugetlb guest memory size 0x100000 is not a positive multiple of 0x200000"):
        GuestMemory.hugetlb(1 << 20)


def test_file_mapping_past_the_end_of_the_file_is_refused(tmp_path):
    """Mapping more than the file holds names the file, the range and its end."""
    from snapproof.native.memory import GuestMemory

    path = tmp_path / "short.img"
    path.write_bytes(bytes(8192))
    with pytest.raises(ValueError, match=r"mapping \[0x1000, 0x3000\) runs past the file end 0x2000"):
        GuestMemory.file_private(path, 0x1000, 0x2000)
    with pytest.raises(ValueError, match="file offset 0x800 is not a page-aligned offset"):
        GuestMemory.file_private(path, 0x800, 0x1000)


def test_guest_memory_access_outside_the_mapping_is_refused():
    """Reads and writes past the end name the range and the size."""
    from snapproof.native.memory import GuestMemory

    with GuestMemory.anonymous(0x1000) as mem:
        with pytest.raises(ValueError, match=r"guest range \[0xff0, 0x1010\) outside memory of size 0x1000"):
            mem.read(0xFF0, 0x20)
        with pytest.raises(ValueError, match=r"guest range \[0x1000, 0x1001\) outside"):
            mem.write(0x1000, b"x")


def test_snapshot_destination_smaller_than_memory_is_refused(require):
    """The engine refuses a destination that cannot hold the whole region, naming both sizes."""
    require("uffd")
    from snapproof.native.memory import GuestMemory
    from snapproof.native.wp import WpSnapshot

    with GuestMemory.memfd(0x10000) as mem, \
            pytest.raises(ValueError, match="snapshot destination is 0x1000 bytes, guest memory 0x10000"):
        WpSnapshot(mem, bytearray(0x1000))


def test_run_time_out_must_be_positive(require, make_memory, make_marker16_vm):
    """A vCPU run without a positive time-out is refused: every wait has one."""
    require("kvm")
    _, vcpu = make_marker16_vm(make_memory("memfd", 1 << 20))
    with pytest.raises(ValueError, match="run timeout must be positive, got 0"):
        vcpu.run(timeout=0)


def test_malformed_vcpu_state_is_refused_naming_the_part(require, make_memory, make_marker16_vm):
    """Loading a vCPU state whose regs part has the wrong length names the vCPU, the part and both lengths;
    nothing is written to the vCPU."""
    require("kvm")
    from snapproof.native.image import PART_HEAD, VcpuPart, split_kvm_x86_state

    _, vcpu = make_marker16_vm(make_memory("memfd", 1 << 20))
    before = vcpu.save_state()
    bad = PART_HEAD.pack(VcpuPart.REGS, 136) + bytes(136)
    with pytest.raises(ValueError, match=r"vCPU state: vCPU 0 state\.regs\.length: expected 144 \(the kernel "
                                         r"struct\), saw 136"):
        vcpu.load_state(bad)
    with pytest.raises(ValueError, match=r"vCPU 0 state: expected parts regs, sregs, .*, saw no regs, sregs"):
        vcpu.load_state(bytes(0))
    after = split_kvm_x86_state(vcpu.save_state())
    for part in (VcpuPart.REGS, VcpuPart.SREGS):
        assert after[part] == split_kvm_x86_state(before)[part], f"a refused state changed the vCPU's {part.label}"


@pytest.mark.parametrize(("err", "words"), [
    (errno.ENOENT, "/dev/kvm does not exist"),
    (errno.EACCES, "/dev/kvm: permission denied for uid"),
])
def test_kvm_open_errors_name_the_device_and_the_cause(err, words):
    """No /dev/kvm, or no permission on it, is a capability skip naming the device (never a crash)."""
    from snapproof.native.kvm import _kvm_open_error

    e = _kvm_open_error(err)
    assert isinstance(e, CapabilityMissing), f"{e!r} is not a capability skip"
    assert words in str(e), str(e)


@pytest.mark.parametrize(("text", "value"), [("64M", 64 << 20), ("1G", 1 << 30), ("4096", 4096), ("2GiB", 2 << 30)])
def test_sizes_option_accepts_binary_units(text, value):
    """--sizes takes numbers with K/M/G suffixes."""
    assert parse_size(text) == value


def test_sizes_option_rejects_garbage():
    """A size that is not a number with a unit says which text it could not read."""
    with pytest.raises(ValueError, match="size '64Q' is not a number with an optional K/M/G suffix"):
        parse_size("64Q")


def test_a_build_folder_that_cannot_be_made_is_a_build_error_naming_it(tmp_path, monkeypatch):
    """An install whose per-user cache cannot be created fails its build naming the folder and the variable that
    moves it (a regular file in the way: refused to root as well)."""
    from snapproof.native import build

    (tmp_path / "cache").write_text("a file, not a folder")
    monkeypatch.setattr(build, "output_dir", lambda: tmp_path / "cache" / "snapproof" / "0.1.0")
    with pytest.raises(build.BuildError, match=f"cannot create the build folder {tmp_path}/cache/snapproof/0.1.0 "
                                               f".*point {build.CACHE_VARIABLE} at a writable folder"):
        build.build_module()
