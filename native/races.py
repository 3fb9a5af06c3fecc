"""Races lined up on one page on purpose: a write, a fault capture and the bulk copier, in the order a test picks.

A race whose window is a microsecond (the copier un-protecting a page whose fault capture is still in
flight) is never reliably hit by chance. The engine's named points (native/snapproof_engine.h, held
through native.points) make it certain: the test holds one side of the engine at the page, lets the
other side run into the page, and only then lets the first go on. Each ``Window`` is one such race; a
correct engine keeps the page's first copy whatever the order, so the snapshot equals memory at the arm.

Every wait is bounded. The lineup waits for the side it let run to show what it did: the correct
engine's wait (a ``*_WAIT`` point), or the incorrect engine's un-protect, a landed write, a returned
call. An engine that never calls a point the lineup holds fails naming the point; one that waits
without announcing it (no ``*_WAIT`` call) is given ``SETTLE_S`` and then judged the same way. Linux only.
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    raise ImportError("native.races lines up userfaultfd races: Linux only")

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from snapproof.native._lib import ffi, lib
from snapproof.native.memory import GuestMemory
from snapproof.native.pagemap import write_protected
from snapproof.native.points import Point, SlowPoints, first_of
from snapproof.native.wp import WpSnapshot

# How long a lineup waits for the engine to reach the point it holds, or for a thread it let go to finish.
REACH_S = 10.0
# How long a lineup waits for the side it let run when that side gives no sign (a correct engine that waits
# without calling its *_WAIT point): long past any copy of the suite's memory, short of a test's ceiling.
SETTLE_S = 2.0
# A finalize asked during a held capture gets this long: it must not report the snapshot complete.
FINALIZE_TIMEOUT_S = 1.0
# Where the racing writes land in the page: off the page's label, so what the snapshot holds says whose it is.
WRITE_OFFSET = 0x100
FIRST_WRITE = 0xA1   # the write whose fault the handler serves
SECOND_WRITE = 0xB2  # a write that arrives while that page's capture is held


class Window(enum.Enum):
    """One race on one page: what the test lines up, and what an engine that loses it did wrong."""

    WRITE_DURING_BULK_COPY = "write-during-bulk-copy"
    BULK_DURING_FAULT_CAPTURE = "bulk-during-fault-capture"
    WRITE_DURING_FAULT_CAPTURE = "write-during-fault-capture"
    FINALIZE_DURING_FAULT_CAPTURE = "finalize-during-fault-capture"

    @property
    def what(self) -> str:
        return _WHAT[self]

    @property
    def bug(self) -> str:
        """The engine bug a failure in this window means, in the proof's terms."""
        return _BUG[self]


_WHAT = {
    Window.WRITE_DURING_BULK_COPY: "a write to a page the bulk copier has claimed and not yet copied",
    Window.BULK_DURING_FAULT_CAPTURE: "the bulk copier reaching a page whose fault capture is still in flight",
    Window.WRITE_DURING_FAULT_CAPTURE: "the writer and a second write while the handler still copies the page",
    Window.FINALIZE_DURING_FAULT_CAPTURE: "finalize called while the handler still copies a page",
}
_BUG = {
    Window.WRITE_DURING_BULK_COPY: (
        "the write landed while the copier had claimed the page but not yet copied it: a fault on a page being "
        "copied must wait for that copy before un-protecting it (forkd's single 'captured' flag, set before the "
        "copy)"),
    Window.BULK_DURING_FAULT_CAPTURE: (
        "the bulk copier un-protected the page while the fault handler was still capturing it, and a write landed "
        "before that capture: the copier must leave a page mid-capture protected until the capture ends"),
    Window.WRITE_DURING_FAULT_CAPTURE: (
        "the handler made the page writable (waking the writer) before its copy of the page ended: a write landed "
        "first; un-protect and wake only after the copy"),
    Window.FINALIZE_DURING_FAULT_CAPTURE: (
        "finalize went ahead while the fault handler was still copying a page: it called the snapshot complete, "
        "or un-protected the region and let the write land, before that copy was made; finalize must wait for "
        "captures in flight and join the handler, not sleep a fixed time (forkd's finalize slept 50 ms)"),
}


class HostWriter:
    """One byte written into guest memory by a host thread in C, the GIL released: a write that blocks on a
    WP fault blocks only its own thread, never the test lining the race up."""

    def __init__(self, memory: GuestMemory, offset: int, value: int, name: str) -> None:
        self._src = ffi.new("uint8_t[1]", [value])
        self._best = ffi.new("uint64_t *")
        self._dst = memory.addr + offset
        self._src_addr = int(ffi.cast("uintptr_t", self._src))
        self.value = value
        self.thread = threading.Thread(target=self._write, name=name, daemon=True)

    def _write(self) -> None:
        lib.sp_memcpy_timed(self._dst, self._src_addr, 1, 1, self._best)

    def start(self) -> HostWriter:
        self.thread.start()
        return self

    @property
    def landed(self) -> bool:
        return self.thread.ident is not None and not self.thread.is_alive()

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


class GuestWrite:
    """A guest's store through KVM as the racing write: a vCPU run (to its HLT) on a thread of its own, the GIL
    released in KVM_RUN, so a store that blocks on a WP fault blocks only that vCPU thread."""

    def __init__(self, vcpu: Any, timeout: float = REACH_S) -> None:
        self.vcpu = vcpu
        self.exit: Any = None
        self.thread = threading.Thread(target=self._run, args=(timeout,), name="vcpu-writer", daemon=True)

    def _run(self, timeout: float) -> None:
        self.exit = self.vcpu.run(timeout=timeout)

    def start(self) -> GuestWrite:
        self.thread.start()
        return self

    @property
    def landed(self) -> bool:
        return self.thread.ident is not None and not self.thread.is_alive()

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


Writer = HostWriter | GuestWrite


class Call:
    """An engine call on a thread of its own (the call runs in C, the GIL released): its result or error."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as e:  # re-raised by the lineup: a thread never fails silently
            self.error = e

    def start(self) -> Call:
        self.thread.start()
        return self

    @property
    def returned(self) -> bool:
        return self.thread.ident is not None and not self.thread.is_alive()

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


@dataclass
class Race:
    """What one lineup did and saw, step by step (the report's notes), and whether it lined up at all."""

    window: Window
    page: int
    steps: list[str] = field(default_factory=list)
    lined_up: bool = True
    problem: str = ""             # why it could not be lined up (the engine never reached a point), or hung
    finalized_early: bool = False  # FINALIZE_DURING_FAULT_CAPTURE: finalize said complete mid-capture

    def step(self, text: str) -> None:
        self.steps.append(text)

    def fail(self, text: str) -> Race:
        self.lined_up = False
        self.problem = text
        return self


class Lineup:
    """Lines ``window`` up on ``page`` of an armed WpSnapshot built with ``points``; ``run()`` -> Race.

    The write whose fault the race is about is a host thread's (FIRST_WRITE at WRITE_OFFSET in the page), or
    ``first_write()``'s: a GuestWrite of a vCPU whose next store hits the page. The snapshot is left with every
    page captured or the failure named; the caller finalizes (unless the window is finalize's own) and compares
    the destination with memory at the arm.
    """

    def __init__(self, window: Window, snap: WpSnapshot, points: SlowPoints, page: int,
                 first_write: Callable[[], Writer] | None = None) -> None:
        if snap.points is not points:
            raise ValueError("the lineup needs the WpSnapshot built with these points (make_wp(..., points=))")
        self.window, self.snap, self.points, self.page = window, snap, points, page
        self.offset = page * snap.page_size + WRITE_OFFSET
        self.race = Race(window, page)
        self._first_write = first_write
        self._threads: list[Writer | Call] = []

    def run(self) -> Race:
        try:
            {Window.WRITE_DURING_BULK_COPY: self._write_during_bulk_copy,
             Window.BULK_DURING_FAULT_CAPTURE: self._bulk_during_fault_capture,
             Window.WRITE_DURING_FAULT_CAPTURE: self._write_during_fault_capture,
             Window.FINALIZE_DURING_FAULT_CAPTURE: self._finalize_during_fault_capture}[self.window]()
        finally:
            self._let_go()
        return self.race

    # -- the windows -------------------------------------------------------------------------------------
    def _write_during_bulk_copy(self) -> None:
        held = self.points.hold(Point.BULK_CAPTURE, self.page)
        waits = self.points.watch(Point.FAULT_WAIT, self.page)
        copier = self._call(self.snap.bulk_copy, "bulk-copier")
        if not self._reached(held):
            return
        writer = self._first()
        seen = first_of({f"the handler waits for the copier's copy ({waits})": lambda: self.points.reached(waits),
                         "the write landed while the copy was held": lambda: writer.landed}, SETTLE_S)
        self.race.step(seen or f"no sign from the engine within {SETTLE_S} s (a wait without {waits.point.abi_name})")
        self.points.release(held)
        self._join(copier, writer)

    def _bulk_during_fault_capture(self) -> None:
        held = self.points.hold(Point.FAULT_CAPTURE, self.page)
        waits = self.points.watch(Point.BULK_WAIT, self.page)
        writer = self._first()
        if not self._reached(held):
            return
        copier = self._call(self.snap.bulk_copy, "bulk-copier")
        unprotected = self._unprotected
        seen = first_of({f"the copier waits for the capture ({waits})": lambda: self.points.reached(waits),
                         "the copier un-protected the page mid-capture": unprotected,
                         "the copier returned": lambda: copier.returned}, SETTLE_S)
        self.race.step(seen or f"no sign from the engine within {SETTLE_S} s (a wait without {waits.point.abi_name})")
        second = self._second_write_if_unprotected()
        self.points.release(held)
        self._join(copier, writer, *second)

    def _write_during_fault_capture(self) -> None:
        held = self.points.hold(Point.FAULT_CAPTURE, self.page)
        writer = self._first()
        if not self._reached(held):
            return
        second = self._second_write_if_unprotected()
        if not second:
            self.race.step("the page stays write-protected while its capture is held: the writer waits")
        self.points.release(held)
        self._join(writer, *second)
        self._join(self._call(self.snap.bulk_copy, "bulk-copier"))

    def _finalize_during_fault_capture(self) -> None:
        held = self.points.hold(Point.FAULT_CAPTURE, self.page)
        writer = self._first()
        if not self._reached(held):
            return
        # Every other page captured, so only the held capture stands between the snapshot and complete.
        self.snap.bulk_copy(0, self.page)
        self.snap.bulk_copy(self.page + 1, self.snap.npages - self.page - 1)
        t0 = time.monotonic()
        err = self.snap.try_finalize(FINALIZE_TIMEOUT_S)
        took = time.monotonic() - t0
        if err == 0:
            self.race.finalized_early = True
            self.race.step(f"finalize reported the snapshot complete after {took * 1e3:.0f} ms with page "
                           f"{self.page:#x}'s capture still held at {held.point.abi_name}")
        else:
            self.race.step(f"finalize refused while the capture was held: errno {err} after {took * 1e3:.0f} ms")
        self.points.release(held)
        self._join(writer)

    # -- helpers -----------------------------------------------------------------------------------------
    def _first(self) -> Writer:
        """The write whose fault the race is about: the caller's (a guest store), else a host thread's."""
        if self._first_write is None:
            return self._writer(FIRST_WRITE, "writer")
        w = self._first_write().start()
        self._threads.append(w)
        return w

    def _writer(self, value: int, name: str) -> HostWriter:
        w = HostWriter(self.snap.memory, self.offset, value, name).start()
        self._threads.append(w)
        return w

    def _call(self, fn: Callable[[], Any], name: str) -> Call:
        c = Call(fn, name).start()
        self._threads.append(c)
        return c

    def _unprotected(self) -> bool:
        return not write_protected(self.snap.memory.addr + self.page * self.snap.page_size)

    def _reached(self, held: Any) -> bool:
        if first_of({"reached": lambda: self.points.reached(held)}, REACH_S) is None:
            self.race.fail(f"the engine never reached {held} within {REACH_S} s: the ABI's named point "
                           f"({held.point.meaning}) is how this race is lined up; an engine that never calls it "
                           "cannot have it proven")
            return False
        self.race.step(f"held the engine at {held}: {held.point.meaning}")
        return True

    def _second_write_if_unprotected(self) -> list[HostWriter]:
        if not self._unprotected():
            return []
        self.race.step(f"page {self.page:#x} is writable while its capture is held: a second write "
                       f"({SECOND_WRITE:#04x}) goes in")
        second = self._writer(SECOND_WRITE, "second-writer")
        if not second.join(REACH_S):
            self.race.fail(f"the second write to the un-protected page {self.page:#x} did not land within {REACH_S} s")
        return [second]

    def _join(self, *threads: Writer | Call) -> None:
        for t in threads:
            if not t.join(REACH_S):
                self.race.fail(f"{t.thread.name} still blocked {REACH_S} s after the lineup let the engine go")
            elif isinstance(t, Call) and t.error is not None:
                raise t.error

    def _let_go(self) -> None:
        """Whatever happened: no hold stays, no thread of ours outlives the lineup unbounded."""
        self.points.close()
        for t in self._threads:
            t.join(REACH_S)
