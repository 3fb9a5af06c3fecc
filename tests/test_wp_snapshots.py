"""Several snapshots by one object of the built-in engine (native.wp.WpSnapshots), at their edges: a handler
that dies voids every live snapshot and leaves nothing protected, the engine's limit of live snapshots is refused
naming it, and a finalized snapshot's destination is never written again, whatever later snapshots of the same
object capture.

Host writes only (no VM): phase 2 proves the same object consistent under a running guest.
"""

from __future__ import annotations

import threading

import pytest

pytestmark = [pytest.mark.platform("linux"), pytest.mark.needs("uffd", "uffd.PAGEFAULT_FLAG_WP", "uffd.THREAD_ID",
                                                               "uffd.WP_HUGETLBFS_SHMEM")]

PAGE = 4096
WRITER_S = 10.0  # a host write blocked on a WP fault is served in microseconds; this is a hang's ceiling


def _write(mem, page: int, value: int) -> None:
    mem.write(page * PAGE + 0x100, bytes([value]))


def test_a_dying_handler_voids_every_live_snapshot_and_leaves_nothing_protected(make_memory):
    """With two snapshots live, the handler's death un-protects the region (its writer goes on), and each snapshot
    then raises HandlerDied naming it; none is live any more."""
    from snapproof.native.errors import HandlerDied
    from snapproof.native.inject import FaultInjection
    from snapproof.native.wp import WpSnapshots

    mem = make_memory("memfd", 1 << 20)
    with WpSnapshots(mem, inject=FaultInjection.HANDLER_DIES) as snaps:
        a, b = snaps.arm(bytearray(mem.size)), snaps.arm(bytearray(mem.size))
        writer = threading.Thread(target=_write, args=(mem, 3, 0xA1), daemon=True)
        writer.start()
        writer.join(WRITER_S)
        assert not writer.is_alive(), f"the host write still blocked {WRITER_S} s after the handler died"
        for sid in (a, b):
            with pytest.raises(HandlerDied, match=r"bulk copy.*: the WP fault handler thread died mid-snapshot"):
                snaps.bulk_copy(sid)
        assert snaps.live == [], f"live after the handler died: {snaps.live}"
        assert sum(snaps.protection()[1]) == 0, "pages still write-protected after the handler died"


def test_a_snapshot_past_the_engines_limit_is_refused_naming_it(make_memory):
    """The built-in engine holds four live snapshots; a fifth arm is EBUSY, naming the limit, and the four stay live."""
    from snapproof.native.errors import NativeError
    from snapproof.native.wp import WpSnapshots

    mem = make_memory("memfd", 1 << 20)
    with WpSnapshots(mem) as snaps:
        ids = [snaps.arm(bytearray(mem.size)) for _ in range(4)]
        with pytest.raises(NativeError, match=r"sp_wp_snap_arm\(every snapshot slot is live\).*errno 16"):
            snaps.arm(bytearray(mem.size))
        assert snaps.live == sorted(ids) == [0, 1, 2, 3]
        with pytest.raises(ValueError, match=r"bulk copy: snapshot 7 is not live \(live: \[0, 1, 2, 3\]\)"):
            snaps.bulk_copy(7)


def test_a_finalized_snapshot_is_never_written_again(make_memory):
    """A finalized while B is live, then C armed after both on the same object: writes captured for B and C leave
    A's (and then B's) destination exactly as its finalize left it, and each equals memory at its own arm."""
    from snapproof.native.wp import WpSnapshots

    mem = make_memory("memfd", 1 << 20)
    for page in range(mem.size // PAGE):
        mem.write(page * PAGE, page.to_bytes(4, "little"))
    dst = {k: bytearray(mem.size) for k in "ABC"}
    at: dict[str, bytes] = {}
    with WpSnapshots(mem) as snaps:
        at["A"] = mem.snapshot_bytes()
        a = snaps.arm(dst["A"])
        _write(mem, 1, 1)
        at["B"] = mem.snapshot_bytes()
        b = snaps.arm(dst["B"])
        snaps.bulk_copy(a)
        snaps.finalize(a)
        frozen_a = bytes(dst["A"])
        for page in (1, 2, 3):  # B lacks them: each write faults and is captured into B alone
            _write(mem, page, 2)
        snaps.bulk_copy(b)
        snaps.finalize(b)
        frozen_b = bytes(dst["B"])
        at["C"] = mem.snapshot_bytes()
        c = snaps.arm(dst["C"])
        for page in (1, 2, 3, 4):
            _write(mem, page, 3)
        snaps.bulk_copy(c)
        snaps.finalize(c)
        assert snaps.stats().faults >= 7, f"writes under a live snapshot that never faulted: {snaps.stats()}"
    assert bytes(dst["A"]) == frozen_a == at["A"], "A's destination changed after its finalize"
    assert bytes(dst["B"]) == frozen_b == at["B"], "B's destination changed after its finalize"
    assert bytes(dst["C"]) == at["C"], "C is not memory at its own arm"
