"""A userfaultfd write-protect snapshot, taken by a snapshot engine (native/snapproof_engine.h).

One ``WpSnapshot`` takes one snapshot of one GuestMemory into one destination buffer with one engine:
snapproof's built-in engine unless another is given (``pytest --engine PATH``): ``arm()`` write-protects
the region, the engine's handler thread copies a page before un-protecting it when anything writes it,
``bulk_copy()`` captures the rest, ``finalize()`` checks every page is captured, un-protects the region
and joins the handler. ``close()`` always un-protects before the uffd goes. With an engine offering
"prearmed" snapshots the arm takes two steps instead: ``prearm()`` write-protects the region while the
guest runs (a write then only makes the engine record its page and un-protect it), and ``arm_prearmed()``,
at the instant, protects again just the pages written since. ``WpSnapshots`` takes several snapshots with
one engine object, each into its own destination: a second armed while the first is still
copying (overlapping), or one after another (consecutive), for an engine that offers it (the ABI's optional
spe_snapshot_* calls, ``Engine.capabilities``).

The suite prepares what its proofs rely on before the engine exists, the same for every engine: the
uffd features to ask for (each checked against the kernel's mask), and the protection of never-populated
pages (WP_UNPOPULATED where the kernel has it, else every page populated before the arm).

The engine is handed the address of a cffi view of the destination (``ffi.from_buffer``) and may copy
into it until ``finalize()`` or ``release()`` has returned; the view is dropped right then (or at
``close()``), so a destination with a release rule of its own (a snapshot file's ``writer.memory``,
which ``writer.finalize()`` unmaps) is free the moment the engine is finalized.
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    raise ImportError("native.wp (userfaultfd) is Linux-only: Windows has no userfaultfd")

import contextlib
import enum
import errno
import os
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from snapproof.native import uffd
from snapproof.native._lib import check, lib
from snapproof.native._lib import ffi as c_ffi
from snapproof.native.engine import Engine, builtin_engine, ffi
from snapproof.native.errors import HandlerDied, NativeError
from snapproof.native.inject import C_SWITCHES, FaultInjection
from snapproof.native.memory import HUGE_PAGE_SIZE, PAGE_SIZE, GuestMemory
from snapproof.native.pagemap import PM_PRESENT, PM_SWAP, PM_UFFD_WP, pagemap_entry, read_pagemap
from snapproof.native.points import SlowPoints
from snapproof.native.uffd import open_uffd, require_features, supported_features

# The uffd handshake lives in native.uffd and pagemap reading in native.pagemap; modules that reach them
# through native.wp (native.restore, the reliability tests) still find them here.
__all__ = ["BULK_BATCH", "ENGINE_NEEDS", "EngineObject", "FaultRecord", "HoleProtection", "PrearmStats",
           "SnapshotStats", "WpSnapshot", "WpSnapshots", "WpStats", "batched_copy_floor", "raw_writeprotect_samples",
           "PM_PRESENT", "PM_SWAP", "PM_UFFD_WP", "pagemap_entry", "read_pagemap", "require_features",
           "supported_features"]

# Pages the bulk copier un-protects at once: one UFFDIO_WRITEPROTECT per 2 MiB of 4 KiB pages (the built-in
# engine's SP_BULK_BATCH, its batch when given 0; a self-test pins the two).
BULK_BATCH = 512
# What every engine needs of the host on the suite's memory (native.host capability names), the one table
# of it: the phases that drive an engine declare it (``needs``), phase 5's WP strategy adds "kvm". WP on
# shmem needs WP_HUGETLBFS_SHMEM; never-populated pages are covered without WP_UNPOPULATED (populated
# before the arm instead).
ENGINE_NEEDS: tuple[str, ...] = ("uffd", "uffd.PAGEFAULT_FLAG_WP", "uffd.THREAD_ID", "uffd.WP_HUGETLBFS_SHMEM")
_SHMEM_BACKINGS = {"memfd", "hugetlb"}


class HoleProtection(enum.Enum):
    """How the suite makes sure a write into a never-populated page (a hole) is caught after the arm.

    A plain UFFDIO_WRITEPROTECT skips anonymous holes (no page table entry to mark): a write there lands
    uncaught. The value is what the report and the run record show.
    """

    WP_UNPOPULATED = "UFFD_FEATURE_WP_UNPOPULATED"          # kernel 6.4+: the arm leaves a pte marker in each hole
    POPULATE_BEFORE_ARM = "pre-populated (MADV_POPULATE_WRITE)"  # the fallback: every page faulted in first
    NONE = "none (fault injection)"                          # SKIP_UNPOPULATED: forkd's bug, holes go unprotected


@dataclass(frozen=True)
class FaultRecord:
    offset: int
    flags: int
    service_ns: int
    tid: int
    handler_cpu: int
    copied: bool


@dataclass(frozen=True)
class WpStats:
    arm_ns: int
    faults: int
    fault_pages: int
    bulk_pages: int
    waited_on_copier: int
    other_events: int
    service_ns_total: int
    service_ns_max: int
    hist_us: list[int]
    handler_cpus: dict[int, int]
    log: list[FaultRecord]
    handler_err: int
    handler_alive: bool
    features_requested: int = 0
    features_supported: int = 0
    unpopulated_policy: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def handler_died(self) -> bool:
        """The handler exited without being asked to (a normal stop leaves handler_err 0)."""
        return not self.handler_alive and self.handler_err != 0

    @property
    def captured_pages(self) -> int:
        return self.fault_pages + self.bulk_pages

    def service_percentile_us(self, q: float) -> float:
        """Percentile of fault service time from the 1 µs histogram (bucket upper edge)."""
        total = sum(self.hist_us)
        if not total:
            return 0.0
        want = q * total
        seen = 0
        for us, n in enumerate(self.hist_us):
            seen += n
            if seen >= want:
                return float(us + 1)
        return float(len(self.hist_us))


class EngineObject:
    """One engine object (``spe_create``) over one GuestMemory: what every snapshot the suite takes with it
    shares. The uffd features asked for, how never-populated pages are protected, the engine's errors named,
    its stats, and a teardown that un-protects before the uffd goes. ``WpSnapshot`` takes one snapshot with
    it, into the destination given here; ``WpSnapshots`` several, each armed with its own."""

    def __init__(self, memory: GuestMemory, destination: object | None, *, engine: Engine | None,
                 inject: FaultInjection, handler_cpu: int | None, points: SlowPoints | None) -> None:
        self.memory = memory
        self.inject = inject
        self.engine = builtin_engine() if engine is None else engine
        self.points = points
        switches = inject.value & C_SWITCHES
        if switches and not self.engine.builtin:
            raise ValueError(f"fault-injection switches {inject!r} act inside the built-in engine; engine "
                             f"{self.engine.label()} has none of its own")
        # hugetlb pages are protected and faulted whole: the engine's page is the huge page.
        self.page_size = HUGE_PAGE_SIZE if memory.backing == "hugetlb" else PAGE_SIZE
        self.npages = memory.size // self.page_size
        need = uffd.mask_of("PAGEFAULT_FLAG_WP", "THREAD_ID")
        if memory.backing in _SHMEM_BACKINGS:
            need |= uffd.FEATURES["WP_HUGETLBFS_SHMEM"]
        supported = require_features(need, f"uffd WP on {memory.backing} memory")
        # Never-populated pages are skipped by a plain arm; WP_UNPOPULATED (6.4) marks them,
        # otherwise every page is faulted in here, before the arm, so no hole is left to miss (the
        # write-fault contents are zeros, what the hole reads as). The injection does neither (forkd's bug).
        if inject & FaultInjection.SKIP_UNPOPULATED:
            self.hole_protection = HoleProtection.NONE
        elif supported & uffd.FEATURES["WP_UNPOPULATED"]:
            need |= uffd.FEATURES["WP_UNPOPULATED"]
            self.hole_protection = HoleProtection.WP_UNPOPULATED
        else:
            memory.populate()
            self.hole_protection = HoleProtection.POPULATE_BEFORE_ARM
        self.unpopulated_policy = self.hole_protection.value
        self.features_requested = need
        self.features_supported = supported
        # The cffi views of the destinations the engine may copy into; each is let go once the engine no longer
        # does (a finalize), and every one at teardown.
        self._views: list[Any] = []
        view = None if destination is None else self._view(destination)
        cfg = ffi.new("struct spe_config *")
        cfg.abi_version = self.engine.abi_version
        cfg.struct_size = ffi.sizeof("struct spe_config")
        cfg.mem, cfg.mem_size, cfg.page_size = memory.addr, memory.size, self.page_size
        cfg.mem_fd = -1 if memory.fd is None else memory.fd
        cfg.mem_fd_offset = 0
        cfg.handler_cpu = -1 if handler_cpu is None else handler_cpu
        cfg.dst, cfg.dst_size = (0, 0) if view is None else (int(ffi.cast("uintptr_t", view)), len(view))
        cfg.uffd_features = need
        cfg.switches = switches
        if points is not None:
            cfg.point = ffi.cast("spe_point_fn", points.hook)
            cfg.point_ctx = ffi.cast("void *", points.context)
        out = ffi.new("struct spe_engine **")
        rc = self.engine.lib.spe_create(cfg, out)
        if rc < 0:
            self._drop_views()
            self._raise(rc, "create", mem=memory.addr, size=memory.size, features=need)
        self._e: Any = out[0]
        # Destroyed when the last reference goes should close() never run (an interrupt landing just as
        # the cleanup that calls it starts): no handler thread, uffd or WP may outlive this object.
        self._finalizer = weakref.finalize(self, _destroy_engine, self.engine, self._e, self._views, points)
        self.armed = False
        self.handler_dead = False

    def _view(self, destination: object) -> Any:
        """A cffi view of a destination, checked for size; held until the engine no longer copies into it."""
        view = ffi.from_buffer("char[]", destination, require_writable=True)
        if len(view) < self.memory.size:
            ffi.release(view)
            raise ValueError(f"snapshot destination is {len(view):#x} bytes, guest memory {self.memory.size:#x}")
        self._views.append(view)
        return view

    def _let_go(self, view: Any) -> None:
        """The engine copies into this destination no more: release our view of it."""
        for i, v in enumerate(self._views):
            if v is view:
                del self._views[i]
                ffi.release(view)
                return

    def _drop_views(self) -> None:
        """Released or finalized for good: the engine copies into no destination any more."""
        while self._views:
            ffi.release(self._views.pop())  # claimed first: a second call (an interrupt in between) does nothing

    @property
    def handle(self) -> Any:
        if self._e is None:
            raise ValueError("WP snapshot is closed")
        return self._e

    def _raise(self, rc: int, what: str, **args: object) -> None:
        """NativeError naming the engine, the call and the engine's own message; HandlerDied for EOWNERDEAD."""
        if rc == -errno.EOWNERDEAD:
            raise self._handler_died(what)
        said = self.engine.last_error()
        raise NativeError(f"engine {self.engine.name}: {what}" + (f": {said}" if said else ""), -rc, **args)

    def _check(self, rc: int, what: str, **args: object) -> int:
        if rc < 0:
            self._raise(rc, what, **args)
        return rc

    def _handler_died(self, what: str) -> HandlerDied:
        # The dying handler un-protected the region itself (uffd_wp.c, handler_exit); releasing again
        # here makes sure of it and joins the thread, so nothing of this engine is left waiting.
        release_rc = self.engine.lib.spe_release(self.handle, int(5e9))
        self.armed = False
        self.handler_dead = True
        self._drop_views()  # released: the engine copies nothing more
        err = self.stats().handler_err
        name = errno.errorcode.get(err, str(err))
        why = "; fault injection HANDLER_DIES" if self.inject & FaultInjection.HANDLER_DIES else ""
        released = "un-protected" if release_rc == 0 else f"NOT un-protected (release errno {-release_rc})"
        return HandlerDied(f"{what}: the WP fault handler thread died mid-snapshot (errno {err} {name}: "
                           f"{os.strerror(err)}{why}); the region is {released}, so no writer stays "
                           f"blocked; this snapshot is void")

    def raise_if_handler_died(self, what: str) -> None:
        """Raise HandlerDied, naming ``what``, if the handler thread has exited unasked."""
        if self.stats().handler_died:
            raise self._handler_died(what)

    def release(self, timeout: float = 5.0) -> None:
        """Un-protect everything and stop the handler, whatever state the snapshot is in."""
        rc = self.engine.lib.spe_release(self.handle, int(timeout * 1e9))
        self.armed = False
        self._drop_views()
        self._check(rc, "release WP")

    def protection(self) -> tuple[bytes, bytes]:
        """(present, uffd_wp) per page, read from /proc/self/pagemap (PM_UFFD_WP is bit 57)."""
        return read_pagemap(self.memory.addr, self.memory.size // PAGE_SIZE)

    def stats(self) -> WpStats:
        s = ffi.new("struct spe_stats *")
        self.engine.lib.spe_get_stats(self.handle, s)
        log = [FaultRecord(r.offset, r.flags, r.service_ns, r.tid, r.handler_cpu, bool(r.copied))
               for r in s.log[0:min(s.log_len, len(s.log))]]
        cpus = {i: int(n) for i, n in enumerate(s.handler_cpu) if n}
        return WpStats(
            arm_ns=s.arm_ns, faults=s.faults, fault_pages=s.fault_pages, bulk_pages=s.bulk_pages,
            waited_on_copier=s.waited_on_copier, other_events=s.other_events,
            service_ns_total=s.service_ns_total, service_ns_max=s.service_ns_max,
            hist_us=list(s.hist_us), handler_cpus=cpus, log=log, handler_err=s.handler_err,
            handler_alive=bool(s.handler_alive), features_requested=int(s.features_requested),
            features_supported=int(s.features_granted), unpopulated_policy=self.unpopulated_policy,
        )

    def evidence(self) -> dict[str, Any]:
        """What a failed test's record gets of this engine: which engine, its counters, the points it reached."""
        out: dict[str, Any] = {"engine": self.engine.label()}
        if self._e is not None:
            st = self.stats()
            out.update({"faults": st.faults, "fault_pages": st.fault_pages, "bulk_pages": st.bulk_pages,
                        "handler_alive": st.handler_alive, "handler_err": st.handler_err, "arm_ns": st.arm_ns})
        if self.points is not None:
            out["named_points_called"] = self.points.census()
        return out

    def close(self) -> None:
        """Un-protect, join the handler, close the uffd, drop the destination views; idempotent.

        The finalizer runs the destroy at most once, whoever calls it first (this, or the garbage
        collector after an interrupted close), so no handle is ever freed twice.
        """
        self._e = None
        self._finalizer()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WpSnapshot(EngineObject):
    """One snapshot of one GuestMemory into one destination (the ABI's spe_arm / spe_bulk_copy / spe_finalize)."""

    def __init__(self, memory: GuestMemory, destination: object, *, engine: Engine | None = None,
                 inject: FaultInjection = FaultInjection.NONE, handler_cpu: int | None = None,
                 points: SlowPoints | None = None) -> None:
        super().__init__(memory, destination, engine=engine, inject=inject, handler_cpu=handler_cpu, points=points)
        self.finalized = False

    def arm(self) -> int:
        """Write-protect the whole region; returns the arm time in ns."""
        self._require_destination("arm WP")
        self._check(self.engine.lib.spe_arm(self.handle), "arm WP", mem=self.memory.addr, size=self.memory.size)
        self.armed = True
        return self.stats().arm_ns

    def prearm(self) -> int:
        """Write-protect the whole region with the guest running, capturing nothing yet: until ``arm_prearmed()``
        a write only makes the engine record its page and un-protect it. Called again, a round: the pages written
        since protected again, the guest running, so that fewer are left for the pause. Returns the pages protected."""
        self._require_prearmed_engine("pre-arm WP")
        pages = self._check(self.engine.lib.spe_prearm(self.handle), "pre-arm WP", mem=self.memory.addr,
                            size=self.memory.size)
        self.armed = True
        return pages

    def arm_prearmed(self) -> PrearmStats:
        """The snapshot instant (call it with the vCPUs paused): the engine protects again the pages written since
        ``prearm()``; from here the snapshot goes on as after ``arm()``."""
        self._require_prearmed_engine("arm a pre-armed snapshot")
        self._check(self.engine.lib.spe_arm_prearmed(self.handle), "arm a pre-armed snapshot")
        return self.prearm_stats()

    def prearm_stats(self) -> PrearmStats:
        s = ffi.new("struct spe_prearm_stats *")
        self.engine.lib.spe_prearm_get_stats(self.handle, s)
        return PrearmStats(prearm_ns=int(s.prearm_ns), recorded_pages=int(s.recorded_pages),
                           reprotected_pages=int(s.reprotected_pages), reprotect_calls=int(s.reprotect_calls),
                           arm_ns=int(s.arm_ns))

    def _require_prearmed_engine(self, what: str) -> None:
        self._require_destination(what)
        if why := self.engine.lacks("prearmed"):
            raise ValueError(f"{what}: {why}")

    def rearm(self, first_page: int, npages: int = 1) -> None:
        """Protect a page range again, its pages uncaptured (the round-trip benchmark re-arms one page)."""
        self._require_destination("re-arm WP")
        self._check(self.engine.lib.spe_rearm(self.handle, first_page, npages), "re-arm WP", first=first_page,
                    npages=npages)
        self.armed = True

    def disarm(self) -> None:
        """Un-protect the whole region, keeping the handler, so ``arm()`` can run again."""
        self._check(self.engine.lib.spe_disarm(self.handle), "disarm WP")
        self.armed = False

    def bulk_copy(self, first_page: int = 0, npages: int | None = None, batch: int = BULK_BATCH) -> int:
        """Capture every page still uncaptured in the range; returns how many this call copied."""
        n = self.npages - first_page if npages is None else npages
        self._require_destination("bulk copy")
        return self._check(self.engine.lib.spe_bulk_copy(self.handle, first_page, n, batch), "bulk copy",
                           first=first_page, npages=n)

    def _require_destination(self, what: str) -> None:
        _ = self.handle  # a closed engine says so first
        if self.handler_dead:  # the snapshot is void: say why, whatever is asked of it
            raise self._handler_died(what)
        if not self._views:
            raise ValueError(f"{what}: this WP snapshot is finalized or released and no longer holds its "
                             "destination; a new snapshot needs a new WpSnapshot")

    def try_finalize(self, timeout: float = 5.0) -> int:
        """``finalize()``'s raw twin: 0 when the engine finalized, else the errno it returned (nothing raised)."""
        rc = int(self.engine.lib.spe_finalize(self.handle, int(timeout * 1e9)))
        if rc == 0:
            self.finalized = True
            self.armed = False
            self._drop_views()
        return -rc

    def finalize(self, timeout: float = 5.0) -> WpStats:
        """Check every page is captured, un-protect the region, join the handler."""
        err = self.try_finalize(timeout)
        if err:
            stats = self.stats()
            self._raise(-err, "finalize WP snapshot", pages_not_captured=self.npages - stats.captured_pages)
        return self.stats()

    def evidence(self) -> dict[str, Any]:
        out = super().evidence()
        if self._e is not None and not self.engine.lacks("prearmed"):
            out["prearm"] = vars(self.prearm_stats())
        return out

    def __enter__(self) -> WpSnapshot:
        return self


@dataclass(frozen=True)
class PrearmStats:
    """A pre-armed snapshot's arm (``struct spe_prearm_stats``): what the pause protected again, and how."""

    prearm_ns: int          # the whole region protected, the guest running (outside the pause)
    recorded_pages: int     # pages written between the pre-arm and the arm, as the engine recorded them
    reprotected_pages: int  # pages the arm protected again
    reprotect_calls: int    # UFFDIO_WRITEPROTECT calls that took: a run of contiguous pages is one
    arm_ns: int             # the arm at the instant, whole


@dataclass(frozen=True)
class SnapshotStats:
    """One snapshot of a WpSnapshots (``struct spe_snapshot_stats``)."""

    id: int
    arm_ns: int
    fault_pages: int
    bulk_pages: int
    shared_fault_pages: int  # of fault_pages: faults that captured the page into another live snapshot too
    live: bool

    @property
    def captured_pages(self) -> int:
        return self.fault_pages + self.bulk_pages


class WpSnapshots(EngineObject):
    """Several snapshots of one GuestMemory by one engine object (the ABI's optional spe_snapshot_* calls):
    armed while earlier ones are still copying (an engine offering "overlapping"), or one after another
    (finalize, arm again: "consecutive"). ``arm(destination)`` returns the new snapshot's id; the engine copies
    into that destination until ``finalize(id)`` returns. Calls for different snapshots may come from
    different threads at once (a copier thread each, an arm while another copies)."""

    def __init__(self, memory: GuestMemory, *, engine: Engine | None = None,
                 inject: FaultInjection = FaultInjection.NONE, handler_cpu: int | None = None,
                 points: SlowPoints | None = None) -> None:
        engine = builtin_engine() if engine is None else engine
        if engine.lacks("overlapping") and engine.lacks("consecutive"):
            raise ValueError(f"{engine.lacks('consecutive')}; nor overlapping: one snapshot per engine object")
        self._live: dict[int, Any] = {}  # live snapshot id -> the view of its destination
        super().__init__(memory, None, engine=engine, inject=inject, handler_cpu=handler_cpu, points=points)

    @property
    def live(self) -> list[int]:
        """The ids of the snapshots armed and not yet finalized."""
        return sorted(self._live)

    def arm(self, destination: object) -> int:
        """A new snapshot of guest memory as it is now (call it with the vCPUs paused); returns its id."""
        _ = self.handle
        if self.handler_dead:
            raise self._handler_died("arm a snapshot")
        view = self._view(destination)
        rc = int(self.engine.lib.spe_snapshot_arm(self.handle, int(ffi.cast("uintptr_t", view)), len(view)))
        if rc < 0:
            self._let_go(view)
            self._raise(rc, "arm a snapshot", live=len(self._live))
        self._live[rc] = view
        self.armed = True
        return rc

    def _require_live(self, sid: int, what: str) -> None:
        _ = self.handle
        if self.handler_dead:
            raise self._handler_died(what)
        if sid not in self._live:
            raise ValueError(f"{what}: snapshot {sid} is not live (live: {self.live})")

    def bulk_copy(self, sid: int, first_page: int = 0, npages: int | None = None, batch: int = BULK_BATCH) -> int:
        """Capture into snapshot ``sid`` every page of the range it does not hold yet; returns the pages copied."""
        n = self.npages - first_page if npages is None else npages
        self._require_live(sid, "bulk copy")
        return self._check(self.engine.lib.spe_snapshot_bulk_copy(self.handle, sid, first_page, n, batch),
                           f"bulk copy of snapshot {sid}", first=first_page, npages=n)

    def try_finalize(self, sid: int, timeout: float = 5.0) -> int:
        """``finalize()``'s raw twin: 0 when snapshot ``sid`` is complete and let go, else the errno."""
        self._require_live(sid, "finalize")
        rc = int(self.engine.lib.spe_snapshot_finalize(self.handle, sid, int(timeout * 1e9)))
        if rc == 0:
            self._let_go(self._live.pop(sid))
            self.armed = bool(self._live)
        return -rc

    def finalize(self, sid: int, timeout: float = 5.0) -> SnapshotStats:
        """Check snapshot ``sid`` holds every page; it is then no longer live and its destination the caller's."""
        err = self.try_finalize(sid, timeout)
        if err:
            st = self.snapshot_stats(sid)
            self._raise(-err, f"finalize snapshot {sid}", pages_not_captured=self.npages - st.captured_pages)
        return self.snapshot_stats(sid)

    def snapshot_stats(self, sid: int) -> SnapshotStats:
        s = ffi.new("struct spe_snapshot_stats *")
        self.engine.lib.spe_snapshot_get_stats(self.handle, sid, s)
        return SnapshotStats(id=sid, arm_ns=int(s.arm_ns), fault_pages=int(s.fault_pages),
                             bulk_pages=int(s.bulk_pages), shared_fault_pages=int(s.shared_fault_pages),
                             live=bool(s.live))

    def _drop_views(self) -> None:
        self._live.clear()  # released, or its handler died: no snapshot is live any more
        super()._drop_views()

    def evidence(self) -> dict[str, Any]:
        out = super().evidence()
        if self._e is not None:
            out["live_snapshots"] = {sid: vars(self.snapshot_stats(sid)) for sid in self.live}
        return out

    def __enter__(self) -> WpSnapshots:
        return self


def _destroy_engine(engine: Engine, e: object, views: list[Any], points: SlowPoints | None) -> None:
    """Let every held engine thread go, close the engine (un-protect, join, close the uffd, free), then drop
    the views of the destinations it copied into (none left when every snapshot was finalized)."""
    if points is not None:
        points.close()
    engine.lib.spe_close(e)
    while views:
        ffi.release(views.pop())


@contextlib.contextmanager
def _registered_for_wp(memory: GuestMemory) -> Iterator[int]:
    """A uffd of its own with ``memory`` registered for WP, as the engine registers it: the floors' region."""
    feats = uffd.mask_of("PAGEFAULT_FLAG_WP")
    if memory.backing in _SHMEM_BACKINGS:
        feats |= uffd.FEATURES["WP_HUGETLBFS_SHMEM"]
    if supported_features() & uffd.FEATURES["WP_UNPOPULATED"]:
        feats |= uffd.FEATURES["WP_UNPOPULATED"]
    with open_uffd(feats) as (fd, _):
        ioctls = c_ffi.new("uint64_t *")
        check(lib.sp_uffd_register(fd, memory.addr, memory.size, uffd.REGISTER_MODE_WP, ioctls), "UFFDIO_REGISTER")
        try:
            yield fd
        finally:
            check(lib.sp_uffd_unregister(fd, memory.addr, memory.size), "UFFDIO_UNREGISTER")


def raw_writeprotect_samples(memory: GuestMemory, rounds: int = 20) -> list[int]:
    """Times (ns) of the bare UFFDIO_WRITEPROTECT ioctl over the region: the floor the engine's arm is held to."""
    with _registered_for_wp(memory) as fd:
        samples = []
        for _ in range(rounds):
            t0 = lib.sp_now_ns()
            check(lib.sp_uffd_writeprotect(fd, memory.addr, memory.size, 1), "UFFDIO_WRITEPROTECT")
            samples.append(int(lib.sp_now_ns() - t0))
            check(lib.sp_uffd_writeprotect(fd, memory.addr, memory.size, 0), "UFFDIO_WRITEPROTECT")
        return samples


@contextlib.contextmanager
def batched_copy_floor(memory: GuestMemory, batch: int = BULK_BATCH) -> Iterator[Callable[[object], int]]:
    """The host's limit for a bulk copy that un-protects as it goes: ``time(dst)`` write-protects all of
    ``memory`` (untimed), then times a C loop that copies ``batch`` pages into ``dst`` with the memcpy calls the
    built-in copier makes and un-protects them, batch by batch, with nothing else to do (ns). ``memory`` needs a
    uffd of its own: not the engine's region."""
    from snapproof.native.memory import buffer_address

    with _registered_for_wp(memory) as fd:
        def time(dst: object) -> int:
            h, addr = buffer_address(dst)
            try:
                if len(h) < memory.size:
                    raise ValueError(f"copy destination is {len(h):#x} bytes, source {memory.size:#x}")
                check(lib.sp_uffd_writeprotect(fd, memory.addr, memory.size, 1), "UFFDIO_WRITEPROTECT")
                ns = c_ffi.new("uint64_t *")
                check(lib.sp_batched_copy_unprotect_timed(fd, addr, memory.addr, memory.size, batch * PAGE_SIZE,
                                                          lib.sp_copy_run_pages() * PAGE_SIZE, ns),
                      "batched copy + un-protect")
                return int(ns[0])
            finally:
                c_ffi.release(h)

        yield time
