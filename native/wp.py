"""The userfaultfd write-protect snapshot engine (C handler thread + bulk copier).

One ``WpSnapshot`` takes one snapshot of one GuestMemory into one destination
buffer: ``arm()`` write-protects the region, the handler thread copies a page
before un-protecting it when anything writes it, ``bulk_copy()`` captures the
rest, ``finalize()`` checks every page is captured, un-protects the region
and joins the handler. ``close()`` always un-protects before dropping the uffd.
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    raise ImportError("native.wp (userfaultfd) is Linux-only: Windows has no userfaultfd")

import contextlib
import enum
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from native import uffd
from native._lib import check, ffi, lib
from native.errors import CapabilityMissing, HandlerDied, NativeError
from native.inject import C_SWITCHES, FaultInjection
from native.memory import HUGE_PAGE_SIZE, PAGE_SIZE, GuestMemory


class PageState(enum.IntEnum):
    CLEAN = lib.SP_PAGE_CLEAN
    COPYING = lib.SP_PAGE_COPYING
    CAPTURED = lib.SP_PAGE_CAPTURED


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


_SHMEM_BACKINGS = {"memfd", "hugetlb"}
# Pages the bulk copier copies, then un-protects with one ioctl (the C engine's SP_BULK_BATCH; a self-test pins it).
BULK_BATCH = 512
_probe_cache: int | None = None


def supported_features() -> int:
    """The uffd feature mask this kernel returns from UFFDIO_API (probed once)."""
    global _probe_cache
    if _probe_cache is None:
        with open_uffd(0) as (_, supported):
            _probe_cache = supported
    return _probe_cache


def require_features(need: int, what: str) -> int:
    """The kernel's uffd feature mask, or CapabilityMissing naming each bit of ``need`` it lacks (and its kernel)."""
    supported = supported_features()
    missing = need & ~supported
    if missing:
        names = ", ".join(f"UFFD_FEATURE_{n} (kernel {uffd.SINCE.get(n, '?')})" for n in uffd.feature_names(missing))
        raise CapabilityMissing(f"{what} needs {names}: not in the kernel's mask {supported:#x}")
    return supported


@contextlib.contextmanager
def open_uffd(features: int) -> Iterator[tuple[int, int]]:
    """A userfaultfd after the UFFDIO_API handshake asking ``features``: (fd, the kernel's mask); closed after."""
    via = ffi.new("int *")
    fd = lib.sp_uffd_open(via)
    if fd < 0:
        raise _uffd_open_error(-fd)
    try:
        sup = ffi.new("uint64_t *")
        ioctls = ffi.new("uint64_t *")
        check(lib.sp_uffd_api(fd, features, sup, ioctls), "UFFDIO_API", features=features)
        yield fd, int(sup[0])
    finally:
        os.close(fd)


def _uffd_open_error(err: int) -> Exception:
    if err in (errno.EPERM, errno.EACCES):
        from native.host import uffd_denied

        return CapabilityMissing(uffd_denied(errno.errorcode[err]))
    if err == errno.ENOSYS:
        return CapabilityMissing("userfaultfd(2) not available (kernel built without CONFIG_USERFAULTFD)")
    return NativeError("userfaultfd", err)


class WpSnapshot:
    def __init__(self, memory: GuestMemory, destination: object, *,
                 inject: FaultInjection = FaultInjection.NONE, handler_cpu: int | None = None,
                 race_window_ns: int = 0) -> None:
        self.memory = memory
        self.inject = inject
        # hugetlb pages are protected and faulted whole: the engine's page is the huge page.
        self.page_size = HUGE_PAGE_SIZE if memory.backing == "hugetlb" else PAGE_SIZE
        self.npages = memory.size // self.page_size
        need = uffd.mask_of("PAGEFAULT_FLAG_WP", "THREAD_ID")
        if memory.backing in _SHMEM_BACKINGS:
            need |= uffd.FEATURES["WP_HUGETLBFS_SHMEM"]
        supported = require_features(need, f"uffd WP on {memory.backing} memory")
        # Never-populated pages are skipped by a plain arm; WP_UNPOPULATED (6.4) marks them,
        # otherwise every page is faulted in first. The injection does neither (forkd's bug).
        if inject & FaultInjection.SKIP_UNPOPULATED:
            self.unpopulated_policy = "none (fault injection)"
        elif supported & uffd.FEATURES["WP_UNPOPULATED"]:
            need |= uffd.FEATURES["WP_UNPOPULATED"]
            self.unpopulated_policy = "UFFD_FEATURE_WP_UNPOPULATED"
        else:
            memory.populate()
            self.unpopulated_policy = "pre-populated (MADV_POPULATE_WRITE)"
        self.features_requested = need
        self._dst = ffi.from_buffer("char[]", destination, require_writable=True)
        if len(self._dst) < memory.size:
            ffi.release(self._dst)
            raise ValueError(f"snapshot destination is {len(self._dst):#x} bytes, guest memory {memory.size:#x}")
        out = ffi.new("struct sp_wp **")
        sup = ffi.new("uint64_t *")
        rc = lib.sp_wp_create(memory.addr, memory.size, self.page_size, need, inject.value & C_SWITCHES, race_window_ns,
                              -1 if handler_cpu is None else handler_cpu, out, sup)
        if rc < 0:
            ffi.release(self._dst)
            check(rc, "WP engine create", mem=memory.addr, size=memory.size, features=need)
        self.features_supported = int(sup[0])
        self._w = out[0]
        check(lib.sp_wp_set_destination(self._w, int(ffi.cast("uintptr_t", self._dst))), "set destination")
        self.armed = False
        self.finalized = False

    @property
    def handle(self) -> object:
        if self._w is None:
            raise ValueError("WP snapshot is closed")
        return self._w

    def _check(self, rc: int, what: str, **args: object) -> int:
        """``check()``, but a dead handler (EOWNERDEAD from the engine) raises HandlerDied naming it."""
        if rc == -errno.EOWNERDEAD:
            raise self._handler_died(what)
        return check(rc, what, **args)

    def _handler_died(self, what: str) -> HandlerDied:
        # The dying handler un-protected the region itself (uffd_wp.c, handler_exit); releasing again
        # here makes sure of it and joins the thread, so nothing of this engine is left waiting.
        release_rc = lib.sp_wp_release(self.handle, int(5e9))
        self.armed = False
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

    def arm(self) -> int:
        """Write-protect the whole region; returns the arm time in ns."""
        self._check(lib.sp_wp_arm(self.handle), "arm WP", mem=self.memory.addr, size=self.memory.size)
        self.armed = True
        return self.stats().arm_ns

    def rearm(self, first_page: int, npages: int = 1) -> None:
        """Protect a page range again, its pages CLEAN (the round-trip benchmark re-arms one page)."""
        self._check(lib.sp_wp_rearm_range(self.handle, first_page, npages), "re-arm WP", first=first_page,
                    npages=npages)
        self.armed = True

    def disarm(self) -> None:
        """Un-protect the whole region, keeping the handler, so ``arm()`` can run again."""
        check(lib.sp_wp_disarm(self.handle), "disarm WP")
        self.armed = False

    def bulk_copy(self, first_page: int = 0, npages: int | None = None, batch: int = BULK_BATCH) -> int:
        """Capture every page still CLEAN in the range; returns how many this call copied."""
        n = self.npages - first_page if npages is None else npages
        return self._check(lib.sp_wp_bulk_copy(self.handle, first_page, n, batch), "bulk copy",
                           first=first_page, npages=n)

    def pages_in_state(self, state: PageState) -> int:
        return int(lib.sp_wp_pages_in_state(self.handle, int(state)))

    def finalize(self, timeout: float = 5.0) -> WpStats:
        """Check every page is captured, un-protect the region, join the handler."""
        rc = lib.sp_wp_finalize(self.handle, int(timeout * 1e9))
        if rc == -errno.EOWNERDEAD:
            raise self._handler_died("finalize WP snapshot")
        if rc < 0:
            missing = self.npages - self.pages_in_state(PageState.CAPTURED)
            check(rc, "finalize WP snapshot", pages_not_captured=missing)
        self.finalized = True
        self.armed = False
        return self.stats()

    def release(self, timeout: float = 5.0) -> None:
        """Un-protect everything and stop the handler, whatever state the snapshot is in."""
        check(lib.sp_wp_release(self.handle, int(timeout * 1e9)), "release WP")
        self.armed = False

    def protection(self) -> tuple[bytes, bytes]:
        """(present, uffd_wp) per page, read from /proc/self/pagemap (PM_UFFD_WP is bit 57)."""
        return read_pagemap(self.memory.addr, self.memory.size // PAGE_SIZE)

    def stats(self) -> WpStats:
        s = ffi.new("struct sp_wp_stats *")
        lib.sp_wp_get_stats(self.handle, s)
        log = [FaultRecord(r.offset, r.flags, r.service_ns, r.tid, r.handler_cpu, bool(r.copied))
               for r in s.log[0:s.log_len]]
        cpus = {i: int(n) for i, n in enumerate(s.handler_cpu) if n}
        return WpStats(
            arm_ns=s.arm_ns, faults=s.faults, fault_pages=s.fault_pages, bulk_pages=s.bulk_pages,
            waited_on_copier=s.waited_on_copier, other_events=s.other_events,
            service_ns_total=s.service_ns_total, service_ns_max=s.service_ns_max,
            hist_us=list(s.hist_us), handler_cpus=cpus, log=log, handler_err=s.handler_err,
            handler_alive=bool(s.handler_alive), features_requested=self.features_requested,
            features_supported=self.features_supported, unpopulated_policy=self.unpopulated_policy,
        )

    def close(self) -> None:
        if self._w is None:
            return
        lib.sp_wp_destroy(self._w)
        self._w = None
        ffi.release(self._dst)

    def __enter__(self) -> WpSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_pagemap(addr: int, npages: int) -> tuple[bytes, bytes]:
    present = ffi.new("uint8_t[]", npages)
    wp = ffi.new("uint8_t[]", npages)
    check(lib.sp_pagemap_scan_wp(addr, npages, present, wp), "read /proc/self/pagemap", addr=addr)
    return bytes(ffi.buffer(present, npages)), bytes(ffi.buffer(wp, npages))


def raw_writeprotect_samples(memory: GuestMemory, rounds: int = 20) -> list[int]:
    """Times (ns) of the bare UFFDIO_WRITEPROTECT ioctl over the region: the floor the engine's arm is held to."""
    feats = uffd.mask_of("PAGEFAULT_FLAG_WP")
    if memory.backing in _SHMEM_BACKINGS:
        feats |= uffd.FEATURES["WP_HUGETLBFS_SHMEM"]
    if supported_features() & uffd.FEATURES["WP_UNPOPULATED"]:
        feats |= uffd.FEATURES["WP_UNPOPULATED"]
    with open_uffd(feats) as (fd, _):
        ioctls = ffi.new("uint64_t *")
        check(lib.sp_uffd_register(fd, memory.addr, memory.size, uffd.REGISTER_MODE_WP, ioctls), "UFFDIO_REGISTER")
        samples = []
        for _ in range(rounds):
            t0 = lib.sp_now_ns()
            check(lib.sp_uffd_writeprotect(fd, memory.addr, memory.size, 1), "UFFDIO_WRITEPROTECT")
            samples.append(int(lib.sp_now_ns() - t0))
            check(lib.sp_uffd_writeprotect(fd, memory.addr, memory.size, 0), "UFFDIO_WRITEPROTECT")
        check(lib.sp_uffd_unregister(fd, memory.addr, memory.size), "UFFDIO_UNREGISTER")
        return samples


PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_PRESENT = 1 << 3


def pagemap_scan(addr: int, size: int, category_mask: int, return_mask: int, flags: int = 0,
                 max_regions: int = 4096) -> list[tuple[int, int, int]]:
    """PAGEMAP_SCAN over [addr, addr + size): (start, end, categories) regions."""
    vec = ffi.new("struct sp_page_region[]", max_regions)
    walk_end = ffi.new("uint64_t *")
    n = check(lib.sp_pagemap_scan(addr, addr + size, flags, category_mask, return_mask, vec, max_regions,
                                  walk_end), "PAGEMAP_SCAN", start=addr, size=size)
    return [(int(vec[i].start), int(vec[i].end), int(vec[i].categories)) for i in range(n)]


def pagemap_scan_probe() -> None:
    """Raise NativeError unless PAGEMAP_SCAN answers on a populated page of our own."""
    from native.memory import GuestMemory

    with GuestMemory.anonymous(PAGE_SIZE) as m:
        m.populate()
        regions = pagemap_scan(m.addr, PAGE_SIZE, PAGE_IS_PRESENT, PAGE_IS_PRESENT)
        if regions != [(m.addr, m.addr + PAGE_SIZE, PAGE_IS_PRESENT)]:
            raise NativeError("PAGEMAP_SCAN (unexpected answer)", 5, regions=str(regions))
