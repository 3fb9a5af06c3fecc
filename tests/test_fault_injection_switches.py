"""The switch names and values are one contract between the command line, Python and the C engine."""

from __future__ import annotations

import sys

import pytest
from snapproof.native.image import VcpuPart
from snapproof.native.inject import C_SWITCHES, DROPPED_PART, FaultInjection, dropped_parts, known_names, parse


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the C engine is the Linux backend")
def test_c_engine_switch_values_match_python():
    """FaultInjection's C-level bits are exactly the engine's enum sp_inject, name for name, and no C switch
    is missing on either side."""
    from snapproof.native._lib import ffi, lib

    in_python = {m.name: m.value for m in FaultInjection if m.value & C_SWITCHES}
    in_c = {name.removeprefix("SP_INJECT_"): value for name, value in ffi.typeof("enum sp_inject").relements.items()
            if name != "SP_INJECT_NONE"}
    assert in_python == in_c, f"Python's C-level switches {in_python}, the engine's enum sp_inject {in_c}"
    assert C_SWITCHES == lib.SP_INJECT_ALL, f"C_SWITCHES {C_SWITCHES:#x}, the C layer's {lib.SP_INJECT_ALL:#x}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the C engine is the Linux backend")
def test_bulk_batch_is_one_constant_in_c_and_python():
    """The bulk copier's batch (pages per un-protect) is SP_BULK_BATCH, and Python's default is that constant."""
    import inspect

    from snapproof.native._lib import lib
    from snapproof.native.wp import BULK_BATCH, WpSnapshot

    assert BULK_BATCH == lib.SP_BULK_BATCH == 512
    assert inspect.signature(WpSnapshot.bulk_copy).parameters["batch"].default == BULK_BATCH


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the C layer is the Linux backend")
def test_vcpu_state_part_ids_match_the_c_enum_and_its_struct_sizes():
    """The file's part ids are the C layer's enum sp_vcpu_part, and image.py's sizes are the kernel's."""
    from snapproof.native import image
    from snapproof.native._lib import lib

    assert {p.name: p.value for p in VcpuPart} == {p.name: getattr(lib, f"SP_PART_{p.name}") for p in VcpuPart}
    for part in VcpuPart:
        want = image.FIXED_PART_SIZES.get(part, 0)
        assert lib.sp_vcpu_part_size(part) == want, f"{part.label}: C says {lib.sp_vcpu_part_size(part)}, image {want}"


def test_each_drop_switch_names_one_vcpu_state_part():
    """Every DROP_* vCPU-state switch skips exactly its own part, and only those switches skip any."""
    # DROP_VCPU_STATE is the capture's switch (no state in the file at all), not a restore's.
    drops = [m for m in FaultInjection
             if m.name and m.name.startswith("DROP_") and m is not FaultInjection.DROP_VCPU_STATE]
    assert sorted(m.name for m in drops) == sorted(m.name for m in DROPPED_PART)
    for switch, part in DROPPED_PART.items():
        assert dropped_parts(switch) == {part}, f"{switch.name}: skips {dropped_parts(switch)}"
        assert switch.name == f"DROP_{part.name}", f"{switch.name} drops {part.label}: name it after the part"
    assert dropped_parts(FaultInjection.SAME_VCPU_STATE | FaultInjection.DROP_VCPU_STATE) == frozenset()
    assert len(set(DROPPED_PART.values())) == len(DROPPED_PART)


def test_switches_parse_from_their_command_line_names():
    """Every switch round-trips through its --inject name; several combine with commas."""
    for name in known_names():
        assert parse(name) is FaultInjection[name.upper().replace("-", "_")]
    both = parse("no-copy-before-write,arm-while-running")
    assert both == FaultInjection.NO_COPY_BEFORE_WRITE | FaultInjection.ARM_WHILE_RUNNING
    assert parse("none") == FaultInjection.NONE


def test_unknown_switch_is_a_clear_error():
    """A typo names the switch and lists the known ones."""
    with pytest.raises(ValueError, match=r"unknown fault-injection switch 'no-copy' \(known: no-copy-before-write"):
        parse("no-copy")
