"""Cases the reliability self-tests run in a child pytest, after or beside the case under test.

Not collected by the suite (the name does not match test_*.py): tests/test_reliability_*.py pass
this file to the child explicitly and select a case with -k.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest
from snapproof.native.inject import FaultInjection
from snapproof.native.kvm import ExitReason

from snapproof import guests
from tests.reliability_support import Gauges, host_settings, threads_settled

RUN_TIMEOUT_S = 5.0
SETTINGS_OUT = "SNAPPROOF_SETTINGS_OUT"


def test_engine_and_guest_work_after_a_dead_handler(make_memory, make_marker16_vm):
    """Run after a case whose handler died: no uffd or C thread is left over, and a fresh engine catches a write."""
    from snapproof.native.wp import WpSnapshot

    before = Gauges.now()
    assert before.uffds == 0, f"expected no userfaultfd left open by the dead engine, saw {before.uffds}"
    # Python counts its own threads; the kernel also counts C handler threads: equal means none is left.
    threads = threads_settled(before.python_threads)
    assert threads == before.python_threads, (
        f"expected no C thread left over, saw {threads} kernel threads vs {before.python_threads} Python threads")
    mem = make_memory("memfd", 1 << 20)
    vm, vcpu = make_marker16_vm(mem)
    snapshot = bytearray(mem.size)
    with WpSnapshot(mem, snapshot, inject=FaultInjection.NONE) as snap:
        snap.arm()
        ex = vcpu.run(timeout=RUN_TIMEOUT_S)
        assert ex.reason is ExitReason.HLT, f"expected HLT, saw {ex.describe()}"
        stats = snap.stats()
        assert stats.faults == 1 and stats.handler_alive, f"expected 1 fault, a live handler; saw {stats.faults}, " \
                                                          f"alive={stats.handler_alive}"
        snap.bulk_copy()
        snap.finalize()
    assert snapshot[guests.MARKER_GPA] == guests.MARKER_BEFORE, (
        f"snapshot[0x1000]: expected {guests.MARKER_BEFORE:#04x}, saw {snapshot[guests.MARKER_GPA]:#04x}")


@pytest.mark.needs("kvm")
def test_needs_kvm():
    """Skips (or fails under --strict-host) naming why /dev/kvm is unusable."""


@pytest.mark.needs("uffd")
def test_needs_uffd():
    """Skips (or fails under --strict-host) naming why userfaultfd is unusable."""


def test_report_host_settings(pytestconfig):
    """Writes the host settings as this run sees them (after pytest_configure) to $SNAPPROOF_SETTINGS_OUT."""
    out = os.environ[SETTINGS_OUT]
    Path(out).write_text(json.dumps({"settings": host_settings(),
                                     "reserve_hugepages": pytestconfig.getoption("reserve_hugepages")}))


def test_swallows_the_interrupt_it_gets():
    """Sends itself SIGTERM and swallows the KeyboardInterrupt, as code catching BaseException would."""
    with contextlib.suppress(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs as this call returns


def test_after_the_swallowed_interrupt():
    """Selected after the swallowing case: an interrupted run must not get here."""
