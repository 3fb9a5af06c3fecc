"""The switch names and values are one contract between the command line, Python and the C engine."""

from __future__ import annotations

import sys

import pytest

from native.inject import C_SWITCHES, FaultInjection, known_names, parse


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the C engine is the Linux backend")
def test_c_engine_switch_values_match_python():
    """FaultInjection's C-level bits are exactly the engine's enum sp_inject."""
    from native._lib import lib

    assert FaultInjection.NO_COPY_BEFORE_WRITE.value == lib.SP_INJECT_NO_COPY_BEFORE_WRITE
    assert FaultInjection.SINGLE_FLAG_RACE.value == lib.SP_INJECT_SINGLE_FLAG_RACE
    assert FaultInjection.HANDLER_DIES.value == lib.SP_INJECT_HANDLER_DIES
    in_c = [m for m in FaultInjection if m.value & C_SWITCHES]
    assert len(in_c) == 3, f"a new C-level switch needs a line above: {in_c}"


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
