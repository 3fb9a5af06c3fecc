"""Named points: holding an engine's thread at one page so a test lines a race up on purpose, not by luck.

Every engine calls the hook it was given at the named points of native/snapproof_engine.h (enum
spe_point). A ``SlowPoints`` is the suite's side of that hook (C in native/linux/slow_points.c, so
nothing of Python runs on the engine's threads): a test ``hold``s (point, page), waits until the
engine's thread is there, does its part (a write, a bulk copy), and releases it. Every hold is bounded
(``hold_max``), and closing releases every hold and ignores every later call, so no engine ever stays
blocked by a test that failed. Linux only.
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    raise ImportError("native.points serves the Linux engines' named points")

import enum
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from snapproof.native._lib import check, ffi, lib


class Point(enum.IntEnum):
    """The ABI's named points (enum spe_point), each with what the engine is doing there."""

    FAULT_CAPTURE = lib.SP_POINT_FAULT_CAPTURE
    FAULT_WAIT = lib.SP_POINT_FAULT_WAIT
    BULK_CAPTURE = lib.SP_POINT_BULK_CAPTURE
    BULK_WAIT = lib.SP_POINT_BULK_WAIT
    BULK_UNPROTECT = lib.SP_POINT_BULK_UNPROTECT
    FAULT_PREARMED = lib.SP_POINT_FAULT_PREARMED

    @property
    def abi_name(self) -> str:
        return f"SPE_POINT_{self.name}"

    @property
    def meaning(self) -> str:
        return _MEANING[self]


_MEANING = {
    Point.FAULT_CAPTURE: "the fault handler has claimed the page for capture and not yet copied it",
    Point.FAULT_WAIT: "the fault handler found the page mid-copy by the bulk copier and waits for that copy",
    Point.BULK_CAPTURE: "the bulk copier has claimed the page and not yet copied it",
    Point.BULK_WAIT: "the bulk copier found the page mid-capture by the fault handler and waits for that capture",
    Point.BULK_UNPROTECT: "the bulk copier is about to un-protect the page",
    Point.FAULT_PREARMED: "the fault handler has read a write fault while pre-armed and not yet served it",
}

# A hold lasts at most this long: longer than any lined-up race needs, shorter than a test's ceiling.
HOLD_MAX_S = 30.0


@dataclass(frozen=True)
class Watch:
    """One watched (point, page): the slot the C side keeps its state in."""

    slot: int
    point: Point
    page: int
    hold: bool

    def __str__(self) -> str:
        return f"{self.point.abi_name} at page {self.page:#x}"


class SlowPoints:
    """The hook an engine gets (``hook``, ``context``), and the holds and watches a test sets on it."""

    def __init__(self, hold_max: float = HOLD_MAX_S) -> None:
        out = ffi.new("struct sp_points **")
        check(lib.sp_points_create(int(hold_max * 1e9), out), "create named points")
        self._p = out[0]
        self._finalizer = weakref.finalize(self, _destroy, self._p)
        self.watches: list[Watch] = []

    # -- what an engine gets --------------------------------------------------------------------------
    @property
    def hook(self) -> int:
        """Address of the C hook (``spe_point_fn``)."""
        return int(ffi.cast("uintptr_t", ffi.addressof(lib, "sp_points_hook")))

    @property
    def context(self) -> int:
        return int(ffi.cast("uintptr_t", self._p))

    # -- what a test does -----------------------------------------------------------------------------
    def hold(self, point: Point, page: int) -> Watch:
        """Hold the first engine thread that reaches ``point`` at ``page`` there, until ``release``."""
        return self._watch(point, page, hold=True)

    def watch(self, point: Point, page: int) -> Watch:
        """Note when an engine thread first reaches ``point`` at ``page``, without holding it."""
        return self._watch(point, page, hold=False)

    def _watch(self, point: Point, page: int, hold: bool) -> Watch:
        slot = check(lib.sp_points_watch(self._p, int(point), page, int(hold)), "watch a named point",
                     point=int(point), page=page)
        w = Watch(slot, point, page, hold)
        self.watches.append(w)
        return w

    def reached(self, w: Watch) -> bool:
        return bool(lib.sp_points_state(self._p, w.slot) & lib.SP_POINTS_REACHED)

    def expired(self, w: Watch) -> bool:
        """The hold ran out (``hold_max``) before the test released it."""
        return bool(lib.sp_points_state(self._p, w.slot) & lib.SP_POINTS_EXPIRED)

    def release(self, w: Watch) -> None:
        lib.sp_points_release(self._p, w.slot)

    def calls(self, point: Point) -> int:
        """How many times the engine called ``point``, any page."""
        return int(lib.sp_points_calls(self._p, int(point)))

    def census(self) -> dict[str, int]:
        """Calls per point, by ABI name: the evidence of which points an engine announces."""
        return {p.abi_name: self.calls(p) for p in Point}

    def close(self) -> None:
        """Release every hold and pass every later call through; the C side goes once no engine can call it."""
        if self._p is not None:
            lib.sp_points_disable(self._p)

    def destroy(self) -> None:
        """Free the C side: only once every engine given this hook is closed."""
        self._p = None
        self._finalizer()


def _destroy(p: object) -> None:
    lib.sp_points_disable(p)
    lib.sp_points_destroy(p)


def first_of(conditions: dict[str, Callable[[], bool]], timeout: float, poll: float = 0.0005) -> str | None:
    """Wait until one of ``conditions`` holds; its name, or None when none did within ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        for name, cond in conditions.items():
            if cond():
                return name
        if time.monotonic() > end:
            return None
        time.sleep(poll)
