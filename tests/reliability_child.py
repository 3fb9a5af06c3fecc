"""Child programs of the reliability self-tests: ``python -m tests.reliability_child COMMAND [ARGS]``.

Signal points. With ``SNAPPROOF_SIGNAL_AT=POINT`` and ``SNAPPROOF_SIGNAL=SIGINT|SIGTERM|SIGHUP`` in its
environment, a child sends itself that signal (``kill(getpid())``, as a CI system's cancel would) the
first time it reaches POINT, after printing ``SIGNAL <name> at <POINT>``. A point is a boundary of
the snapshot path, so where the signal lands does not depend on how fast the host is:

- ``enter Class.method`` / ``leave Class.method``: just before a call into the native API starts, or
  just as it returns (Class: one of WRAPPABLE below);
- ``stage NAME``: as a phase enters its report stage NAME;
- pytest's own boundaries (as a pytest plugin): ``setup``, ``call``, ``teardown`` (before the test's
  fixtures are torn down), ``between tests``, ``session finish``, ``after the record``;
- ``after capture`` (interrupted-capture): the capture has returned, the file is sealed.

interrupted-capture PATH
    A live snapshot of a running storm guest (two vCPUs) into the snapshot file PATH by
    ``native.capture.capture_to_file``, the runner stopped after it. Exits 0 when nothing interrupted
    it, 128 + the signal number when a signal did. Its last words, in a ``finally``, are
    ``LAST {json}``: where it was, the pages still carrying PM_UFFD_WP, and the process gauges next
    to those of the start (``START {json}``).

As a pytest plugin (``-p tests.reliability_child``) it prints ``START {json}`` (the process gauges)
when the session starts, ``CALL nodeid`` as each test's call begins, ``FINISH {json}`` (the vCPU runner
threads still alive) as the session finishes, before its last teardown, and ``LAST {json}`` at
pytest_unconfigure, after every fixture was torn down: what an interrupted pytest leaves behind.

probe
    ``PROBE {json}``: what an unprivileged process is told: the host probe's skip reasons for
    ``kvm`` and ``uffd``, and the errors Vm.create() and the uffd open raise.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

SIGNAL_AT = "SNAPPROOF_SIGNAL_AT"
SIGNAL = "SNAPPROOF_SIGNAL"

# The classes whose calls are signal points: (module, class).
WRAPPABLE = {
    "VcpuRunner": ("snapproof.native.live", "VcpuRunner"),
    "WpSnapshot": ("snapproof.native.wp", "WpSnapshot"),
    "SnapshotWriter": ("snapproof.native.image", "SnapshotWriter"),
    "Vm": ("snapproof.native.kvm", "Vm"),
    "GuestMemory": ("snapproof.native.memory", "GuestMemory"),
}

CAPTURE_SIZE = 4 << 20
GUEST_TIMEOUT_S = 60.0


def _say(tag: str, payload: dict[str, Any]) -> None:
    print(f"{tag} {json.dumps(payload)}", flush=True)


class SignalPoint:
    """The one point this child signals itself at (from its environment), or none."""

    def __init__(self) -> None:
        self.point = os.environ.get(SIGNAL_AT, "")
        self.name = os.environ.get(SIGNAL, "SIGINT")
        self.fired = False
        if self.point and not hasattr(signal, self.name):
            raise ValueError(f"{SIGNAL}={self.name!r}: not a signal of this platform")

    def reached(self, point: str) -> None:
        """Send the signal if ``point`` is this child's point and it was not sent yet."""
        if point != self.point or self.fired:
            return
        self.fired = True
        print(f"SIGNAL {self.name} at {point}", flush=True)
        # Process-directed, as kill(1) from outside: Python runs its handler as soon as this call returns.
        os.kill(os.getpid(), getattr(signal, self.name))

    def install(self) -> None:
        """Wrap the one native method (or report stage) the point names."""
        verb, _, what = self.point.partition(" ")
        if verb in ("enter", "leave") and "." in what:
            cls_name, method = what.split(".", 1)
            if cls_name not in WRAPPABLE:
                raise ValueError(f"{SIGNAL_AT}={self.point!r}: {cls_name} is not one of {sorted(WRAPPABLE)}")
            module, attr = WRAPPABLE[cls_name]
            self._wrap(getattr(importlib.import_module(module), attr), method, verb)
        elif verb == "stage":
            self._wrap_stage(what)

    def _wrap(self, cls: type, method: str, verb: str) -> None:
        real = getattr(cls, method)
        point = self.point

        @functools.wraps(real)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if verb == "enter":
                self.reached(point)
            result = real(*args, **kwargs)
            if verb == "leave":
                self.reached(point)
            return result

        setattr(cls, method, wrapped)

    def _wrap_stage(self, name: str) -> None:
        import contextlib

        from snapproof.results.record import CaseReport

        real = CaseReport.stage
        point = self.point

        @contextlib.contextmanager
        def stage(report: CaseReport, stage_name: str) -> Iterator[Any]:
            if stage_name == name:
                self.reached(point)
            with real(report, stage_name) as st:
                yield st

        CaseReport.stage = stage  # type: ignore[method-assign]


# -- interrupted-capture --------------------------------------------------------------------------


def _raise_keyboard_interrupt(received: list[int]) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    return handler


def interrupted_capture(path: str) -> int:
    # Handlers first: this child may have inherited SIGINT ignored (a background job), and SIGTERM and
    # SIGHUP would end it without its cleanup. All three become the KeyboardInterrupt it cleans up after.
    received: list[int] = []
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signal.signal(getattr(signal, name), _raise_keyboard_interrupt(received))

    from snapproof.guests import storm
    from snapproof.native.capture import capture_to_file
    from snapproof.native.kvm import Vm
    from snapproof.native.live import VcpuRunner
    from snapproof.native.memory import GuestMemory
    from snapproof.native.wp import read_pagemap

    from snapproof import guests
    from tests.reliability_support import Gauges, threads_settled, wait_for

    point = SignalPoint()
    point.install()
    start = Gauges.now()
    _say("START", start.as_dict())
    stage = "setup"
    mem = GuestMemory.memfd(CAPTURE_SIZE)
    try:
        mem.write(guests.FLAT32_LOAD_GPA, guests.load("storm32"))
        npages = (CAPTURE_SIZE - guests.DATA_REGION_GPA) // 4096 // 2
        blocks = []
        with Vm.create() as vm:
            vm.map_memory(mem)
            for i in range(2):
                p = storm.StormParams.from_seed(0x5EED + i, region_gpa=guests.DATA_REGION_GPA + i * npages * 4096,
                                                npages=npages, generations=0)
                block = guests.PARAM_BLOCK_GPA + guests.PARAM_BLOCK_STRIDE * i
                blocks.append(block)
                mem.write(block, p.pack())
                vm.add_vcpu().set_flat32(eip=guests.FLAT32_LOAD_GPA, esp=0x7000 - 0x400 * i, esi=block)
            # Nesting is the cleanup order: the vCPUs stop, then the VM goes; capture_to_file releases the
            # engine and seals (or, interrupted, aborts) the file itself.
            with VcpuRunner(vm.vcpus, timeout=GUEST_TIMEOUT_S) as runner:
                stage = "guest running"
                runner.start()
                # A condition, not a time: every vCPU is inside its sweep, writing, when the capture starts.
                wait_for(lambda: all(storm.read_progress(mem.read(b, storm.BLOCK_SIZE)).cur_gen >= 1
                                     for b in blocks), "both storm vCPUs writing", GUEST_TIMEOUT_S)
                stage = "capture"
                capture_to_file(path, mem, runner=runner)
                stage = "captured"
                point.reached("after capture")
                runner.stop()
                stage = "done"
    except KeyboardInterrupt:
        pass
    finally:
        wp_left = sum(read_pagemap(mem.addr, mem.size // 4096)[1])
        mem.close()
        threads = threads_settled(start.threads)
        end = Gauges.now()
        _say("LAST", {"stage": stage, "signal": signal.Signals(received[0]).name if received else None,
                      "wp_pages_left": wp_left, **end.as_dict(), "threads": threads})
    return 128 + received[0] if received else 0


def probe() -> int:
    from snapproof.native import fixes
    from snapproof.native.errors import CapabilityMissing
    from snapproof.native.host import probe as host_probe
    from snapproof.native.kvm import Vm
    from snapproof.native.wp import supported_features

    rep = host_probe()
    out: dict[str, Any] = {"missing_kvm": rep.missing("kvm"), "missing_uffd": rep.missing("uffd"),
                           "kvm_fix": fixes.kvm_access(), "uffd_fix": fixes.uffd_access()}
    try:
        Vm.create().close()
        out["vm_create"] = "ok"
    except CapabilityMissing as e:
        out["vm_create"] = str(e)
    try:
        supported_features()
        out["uffd_open"] = "ok"
    except CapabilityMissing as e:
        out["uffd_open"] = str(e)
    _say("PROBE", out)
    return 0


# -- as a pytest plugin ---------------------------------------------------------------------------

_session_start: dict[str, int] = {}
_point = SignalPoint()


def pytest_configure(config: pytest.Config) -> None:
    _point.install()


def pytest_sessionstart(session: pytest.Session) -> None:
    from tests.reliability_support import Gauges

    _session_start.update(Gauges.now().as_dict())
    _say("START", _session_start)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _point.reached("setup")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    print(f"CALL {item.nodeid}", flush=True)
    _point.reached("call")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    _point.reached("teardown")  # before any of the test's fixtures is torn down


def pytest_runtest_logfinish(nodeid: str) -> None:
    _point.reached("between tests")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    import threading

    from snapproof.native.live import THREAD_NAME_PREFIX

    # Before the session's last teardown: a runner the code that started it did not stop runs its guest on until
    # its VM is closed there, taking CPU from the interrupt's reports and record.
    print(flush=True)  # off the line of pytest's progress dots
    running = sorted(t.name for t in threading.enumerate() if t.name.startswith(THREAD_NAME_PREFIX))
    _say("FINISH", {"vcpu_threads": running})
    _point.reached("session finish")  # before the session's last teardown, the reports and the record


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any) -> None:
    _point.reached("after the record")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    from tests.reliability_support import Gauges, threads_settled

    threads = threads_settled(_session_start.get("threads", 1))
    _say("LAST", {**Gauges.now().as_dict(), "threads": threads})


def main(argv: list[str]) -> int:
    if argv[:1] == ["interrupted-capture"] and len(argv) == 2:
        return interrupted_capture(argv[1])
    if argv == ["probe"]:
        return probe()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
