"""A pre-armed snapshot by the built-in engine (native.wp.WpSnapshot.prearm / arm_prearmed), at its edges: the
pages written after the pre-arm are writable until the arm and protected again by it, a run of pages in one call;
a round protects them again early; a fault read before the arm and served after it (held at the engine's named
point SPE_POINT_FAULT_PREARMED: a fault in flight when the pause begins) is captured before its write lands; what
is refused is refused naming why. Each switch of the bug a check exists for (prearm-forgets-written,
prearm-decides-at-read) is caught by the same checks.

Host writes only (no VM): phase 5 proves the strategy under a running guest, by its oracles.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.platform("linux"), pytest.mark.needs("uffd", "uffd.PAGEFAULT_FLAG_WP", "uffd.THREAD_ID",
                                                               "uffd.WP_HUGETLBFS_SHMEM")]

PAGE = 4096
# Written after the pre-arm: a run of eight (one call), two pages 8 apart (bridged into one call: fewer than the
# engine's SP_REPROTECT_BRIDGE pages between), and one far from the rest: three calls for 11 pages.
WRITTEN = [*range(10, 18), 40, 48, 200]
CALLS = 3
WRITER_S = 10.0  # a host write blocked on a WP fault is served in microseconds once released; this is a hang's ceiling
IN_FLIGHT = 77  # the page whose fault is in flight across the arm


def _write(mem, page: int, value: int) -> None:
    mem.write(page * PAGE + 0x100, bytes([value]))


def _read(image, page: int) -> int:
    return image[page * PAGE + 0x100]


def _writable(snap) -> list[int]:
    """The pages of the region not write-protected (pagemap's PM_UFFD_WP clear)."""
    return [page for page, wp in enumerate(snap.protection()[1]) if not wp]


def _prearmed_then_written(make_memory, inject):
    from snapproof.native.wp import WpSnapshot

    mem = make_memory("memfd", 1 << 20)
    mem.populate()
    dst = bytearray(mem.size)
    snap = WpSnapshot(mem, dst, inject=inject)
    assert snap.prearm() == snap.npages
    assert _writable(snap) == [], f"pages writable right after the pre-arm: {_writable(snap)}"
    for page in WRITTEN:
        _write(mem, page, 0xA1)  # a fault each: recorded, made writable, the write goes on
    return mem, snap, dst


def test_the_arm_protects_again_just_the_pages_written_since_the_prearm(make_memory):
    """Each page written after the pre-arm is writable until the arm, which protects them all again (runs of pages
    in one call each) and nothing else is touched; a write after the arm is captured first."""
    from snapproof.native.inject import FaultInjection

    mem, snap, dst = _prearmed_then_written(make_memory, FaultInjection.NONE)
    with snap:
        assert _writable(snap) == WRITTEN, f"writable after the pre-arm and the writes: {_writable(snap)}"
        at_arm = mem.snapshot_bytes()
        st = snap.arm_prearmed()
        assert (st.recorded_pages, st.reprotected_pages, st.reprotect_calls) == (len(WRITTEN), len(WRITTEN), CALLS), st
        assert _writable(snap) == [], f"pages left writable by the arm: {_writable(snap)}"
        _write(mem, 12, 0xB2)  # after the instant: the snapshot keeps 0xA1
        snap.bulk_copy()
        snap.finalize()
    assert _read(dst, 12) == 0xA1 and _read(mem.snapshot_bytes(), 12) == 0xB2
    differ = [p for p in range(mem.size // PAGE) if dst[p * PAGE:(p + 1) * PAGE] != at_arm[p * PAGE:(p + 1) * PAGE]]
    assert differ == [], f"pages of the snapshot that differ from memory at the arm: {differ}"


def test_a_round_protects_the_pages_written_again_and_leaves_the_arm_less(make_memory):
    """A second pre-arm call, the guest still running, protects the pages written since the first again: the arm
    then has none left to protect, and a page written after the round is recorded anew."""
    from snapproof.native.inject import FaultInjection

    mem, snap, dst = _prearmed_then_written(make_memory, FaultInjection.NONE)
    with snap:
        assert snap.prearm() == len(WRITTEN)
        assert _writable(snap) == [], f"pages left writable by the round: {_writable(snap)}"
        _write(mem, 99, 0xC3)
        st = snap.arm_prearmed()
        assert (st.recorded_pages, st.reprotected_pages, st.reprotect_calls) == (1, 1, 1), st
        assert _writable(snap) == []


def test_the_forgetful_arm_leaves_the_written_pages_writable_and_the_snapshot_wrong(make_memory):
    """prearm-forgets-written: the checks above catch it: the pages written since the pre-arm stay writable after
    the arm, and a write after the instant lands in the snapshot."""
    from snapproof.native.inject import FaultInjection

    mem, snap, dst = _prearmed_then_written(make_memory, FaultInjection.PREARM_FORGETS_WRITTEN)
    with snap:
        st = snap.arm_prearmed()
        assert (st.recorded_pages, st.reprotected_pages) == (len(WRITTEN), 0), st
        assert _writable(snap) == WRITTEN
        _write(mem, 12, 0xB2)
        snap.bulk_copy()
        snap.finalize()
        assert _read(dst, 12) == 0xB2, "the write after the instant did not reach the snapshot"


def _fault_in_flight_across_the_arm(make_memory, inject):
    """A host write to IN_FLIGHT after the pre-arm, its fault read by the handler and held there (before it is
    served) until the arm has passed: (memory at the arm, the snapshot, the arm's stats)."""
    from snapproof.native.points import Point, SlowPoints, first_of
    from snapproof.native.races import HostWriter
    from snapproof.native.wp import WpSnapshot

    mem = make_memory("memfd", 1 << 20)
    mem.populate()
    dst = bytearray(mem.size)
    points = SlowPoints()
    with WpSnapshot(mem, dst, inject=inject, points=points) as snap:
        snap.prearm()
        held = points.hold(Point.FAULT_PREARMED, IN_FLIGHT)
        # In C, the GIL released: the write blocked on its fault blocks only its own thread.
        writer = HostWriter(mem, IN_FLIGHT * PAGE + 0x100, 0xD4, "in-flight-writer").start()
        assert first_of({"held": lambda: points.reached(held)}, WRITER_S) == "held", \
            f"the write's fault never reached {held}"
        at_arm = mem.snapshot_bytes()  # the write waits on its fault: memory at the instant holds the old byte
        st = snap.arm_prearmed()
        points.release(held)
        assert writer.join(WRITER_S), f"the host write still blocked {WRITER_S} s after the arm"
        snap.bulk_copy()
        snap.finalize()
    return at_arm, dst, st


def test_a_fault_in_flight_across_the_arm_is_captured_before_its_write_lands(make_memory):
    """A fault read while pre-armed but served after the arm (its page not recorded, still protected) is captured
    first: the snapshot holds the page as it was at the arm, the write lands after."""
    from snapproof.native.inject import FaultInjection

    at_arm, dst, st = _fault_in_flight_across_the_arm(make_memory, FaultInjection.NONE)
    assert st.recorded_pages == 0, f"the page in flight was recorded before the arm: {st}"
    assert _read(dst, IN_FLIGHT) == _read(at_arm, IN_FLIGHT) == 0, \
        f"page {IN_FLIGHT}: snapshot {_read(dst, IN_FLIGHT):#04x}, memory at the arm {_read(at_arm, IN_FLIGHT):#04x}"
    assert bytes(dst) == at_arm, "the snapshot differs from memory at the arm"


def test_the_handler_deciding_at_read_lets_the_fault_in_flight_land_in_the_snapshot(make_memory):
    """prearm-decides-at-read: the check above catches it: the fault in flight is served as the pre-arm's (no
    capture), and the write after the instant reaches the snapshot."""
    from snapproof.native.inject import FaultInjection

    at_arm, dst, _ = _fault_in_flight_across_the_arm(make_memory, FaultInjection.PREARM_DECIDES_AT_READ)
    assert _read(at_arm, IN_FLIGHT) == 0 and _read(dst, IN_FLIGHT) == 0xD4, (
        f"page {IN_FLIGHT}: snapshot {_read(dst, IN_FLIGHT):#04x}, memory at the arm {_read(at_arm, IN_FLIGHT):#04x}")


def test_what_a_prearm_cannot_do_is_refused_naming_why(make_memory):
    """An arm with no pre-arm, a pre-arm of an armed engine and a bulk copy before the instant are refused, each naming
    the rule; an engine without the capability is refused before any call; a release un-protects a pre-armed region."""
    from snapproof.native.engine import repo_engine
    from snapproof.native.errors import NativeError
    from snapproof.native.wp import WpSnapshot

    mem = make_memory("memfd", 1 << 20)
    with WpSnapshot(mem, bytearray(mem.size)) as snap:
        with pytest.raises(NativeError, match=r"not pre-armed: sp_wp_prearm first.*errno 22"):
            snap.arm_prearmed()
        snap.arm()
        with pytest.raises(NativeError, match=r"armed already: finalize or release first.*errno 16"):
            snap.prearm()
    with WpSnapshot(mem, bytearray(mem.size)) as snap:
        snap.prearm()
        with pytest.raises(NativeError, match=r"pre-armed, not armed: sp_wp_arm_prearmed first.*errno 22"):
            snap.bulk_copy()
        snap.release()
        assert len(_writable(snap)) == snap.npages, "pages still write-protected after releasing a pre-armed engine"
    with WpSnapshot(mem, bytearray(mem.size), engine=repo_engine("naive-fixed")) as snap, \
            pytest.raises(ValueError, match=r"pre-arm WP: engine naive-fixed 0.1 .* does not offer prearmed snapshots"):
        snap.prearm()
