"""Guest memory backings: the mappings a memslot points at.

memfd (MAP_SHARED shmem, what a snapshotting VMM uses), anonymous, hugetlb
memfd, a file mapped MAP_PRIVATE (copy-on-write load) and a file mapped
read-only (the negative control of the original bug). memfd and anonymous
memory come with transparent huge pages on request (``thp=True``): the
mapping starts on a 2 MiB boundary and is marked MADV_HUGEPAGE, so a first
touch may populate a whole huge page; ``huge_bytes()`` and ``folio_at()``
say whether it did (native/thp.py has the knobs that decide).
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    raise ImportError("native.memory is the Linux (KVM) backend: on Windows, guest memory is native.whp.FileView")

import mmap
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from snapproof.native._lib import ffi
from snapproof.native.thp import THP_BACKING_NEEDS, Folio

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 << 20
MFD_HUGETLB = 0x0004
MADV_POPULATE_WRITE = 23
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_COLLAPSE = 25  # 6.1: collapse a range into huge pages now, as khugepaged would in its own time

# What a backing needs of the host beyond the WP engine's own needs (native.host capability names); the
# plugin reads it at collection, for a ``backing`` parameter: an unmet need deselects the case naming it.
BACKING_NEEDS: dict[str, tuple[str, ...]] = {"hugetlb": ("hugepages",), **THP_BACKING_NEEDS}


def check_size(size: int, unit: int = PAGE_SIZE, what: str = "guest memory size") -> int:
    if not isinstance(size, int) or isinstance(size, bool):
        raise TypeError(f"{what} must be an int, got {type(size).__name__}")
    if size <= 0 or size % unit:
        raise ValueError(f"{what} {size:#x} is not a positive multiple of {unit:#x}")
    return size


class GuestMemory:
    """One host mapping of guest memory. Use as a context manager; close() is idempotent."""

    def __init__(self, mm: mmap.mmap, size: int, backing: str, fd: int | None = None,
                 path: Path | None = None, writable: bool = True, window: int | None = None) -> None:
        # ``window``: guest memory is [window, window + size) of ``mm`` (a mapping made larger to start on a
        # 2 MiB boundary); the object then works on a view of that part alone.
        self._map = mm
        self._offset = window or 0
        self._mm: mmap.mmap | memoryview | None = mm if window is None else memoryview(mm)[window:window + size]
        self.thp = False  # MADV_HUGEPAGE on a 2 MiB aligned mapping (anonymous(thp=True), memfd(thp=True))
        self.size = size
        self.backing = backing
        self.fd = fd
        # The fd is closed with the last reference should close() never run (the mapping closes itself then).
        self._fd_finalizer = None if fd is None else weakref.finalize(self, os.close, fd)
        self.path = path
        self.writable = writable
        self._ptr = ffi.from_buffer("char[]", self._mm, require_writable=False)
        self.addr = int(ffi.cast("uintptr_t", self._ptr))
        # Called with (offset, length) before this object touches guest memory for the host. A lazy loader
        # sets it: a page it never restored may be fenced (PROT_NONE), and a host read of it would be SIGSEGV,
        # so the guard raises LoaderDied first.
        self.access_guard: Callable[[int, int], None] | None = None

    # -- constructors -------------------------------------------------------
    @classmethod
    def memfd(cls, size: int, name: str = "snapproof-guest", thp: bool = False) -> GuestMemory:
        """Shared memory (shmem) behind a memfd, MAP_SHARED: what a snapshotting VMM backs guests with.

        ``thp``: MADV_HUGEPAGE, so shmem THP (shmem_enabled=advise) may back it with 2 MiB pages. The kernel
        places a shmem mapping on a 2 MiB boundary itself when shmem THP is on (measured: 6.1 and 6.18), and
        a huge page needs file offset and address aligned alike, so a mapping it did not align is refused.
        """
        mem = cls._memfd(check_size(size), name, os.MFD_CLOEXEC, "memfd")
        if thp:
            if mem.addr % HUGE_PAGE_SIZE:
                mem.close()
                from snapproof.native.errors import CapabilityMissing
                from snapproof.native.thp import shmem_missing

                raise CapabilityMissing(f"shmem THP: the kernel placed the memfd mapping at {mem.addr:#x}, not on a "
                                        f"2 MiB boundary ({shmem_missing() or 'shmem THP is on'})")
            mem._hugepage_advice(MADV_HUGEPAGE)
            mem.thp = True
        return mem

    @classmethod
    def anonymous(cls, size: int, thp: bool = False) -> GuestMemory:
        """Private anonymous memory. ``thp``: mapped 2 MiB larger and used from its first 2 MiB boundary (6.1
        places anonymous mappings on any page; 6.7+ aligns large ones itself), marked MADV_HUGEPAGE."""
        check_size(size)
        extra = HUGE_PAGE_SIZE if thp else 0
        mm = mmap.mmap(-1, size + extra, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
        if not thp:
            return cls(mm, size, "anonymous")
        try:
            start = _address_of(mm)
            mem = cls(mm, size, "anonymous", window=-start % HUGE_PAGE_SIZE)
        except BaseException:
            mm.close()
            raise
        mem._hugepage_advice(MADV_HUGEPAGE)
        mem.thp = True
        return mem

    @classmethod
    def hugetlb(cls, size: int, name: str = "snapproof-guest-huge") -> GuestMemory:
        """A hugetlb memfd (2 MiB pages from the reserved pool), MAP_SHARED."""
        return cls._memfd(check_size(size, HUGE_PAGE_SIZE, "hugetlb guest memory size"), name,
                          os.MFD_CLOEXEC | MFD_HUGETLB, "hugetlb")

    @classmethod
    def _memfd(cls, size: int, name: str, flags: int, backing: str) -> GuestMemory:
        fd = os.memfd_create(name, flags)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(mm, size, backing, fd=fd)

    @classmethod
    def file_private(cls, path: str | os.PathLike[str], offset: int, size: int) -> GuestMemory:
        """The file mapped copy-on-write: guest writes stay in this mapping, the file never changes."""
        return cls._file(path, offset, size, private=True)

    @classmethod
    def file_readonly(cls, path: str | os.PathLike[str], offset: int, size: int) -> GuestMemory:
        """The file mapped PROT_READ: the mapping of the original bug (a guest write cannot land)."""
        return cls._file(path, offset, size, private=False)

    @classmethod
    def _file(cls, path: str | os.PathLike[str], offset: int, size: int, private: bool) -> GuestMemory:
        check_size(size)
        if offset < 0 or offset % PAGE_SIZE:
            raise ValueError(f"file offset {offset:#x} is not a page-aligned offset")
        p = Path(path)
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        try:
            length = os.fstat(fd).st_size
            if offset + size > length:
                raise ValueError(f"{p}: mapping [{offset:#x}, {offset + size:#x}) runs past the file end {length:#x}")
            if private:
                mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=offset)
            else:
                mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=offset)
        except BaseException:
            os.close(fd)
            raise
        return cls(mm, size, "file-private" if private else "file-readonly", fd=fd, path=p, writable=private)

    # -- access -------------------------------------------------------------
    @property
    def mm(self) -> mmap.mmap | memoryview:
        """The mapping itself (a view of its guest part for THP anonymous memory), for callers that work on
        it whole (buffers, views, slices): guarded as all of it."""
        return self._guarded(0, self.size)

    def _guarded(self, gpa: int, n: int) -> mmap.mmap | memoryview:
        if self._mm is None:
            raise ValueError(f"{self.backing} guest memory is closed")
        if self.access_guard is not None:
            self.access_guard(gpa, n)
        return self._mm

    def _bounds(self, gpa: int, n: int) -> None:
        if gpa < 0 or n < 0 or gpa + n > self.size:
            raise ValueError(f"guest range [{gpa:#x}, {gpa + n:#x}) outside memory of size {self.size:#x}")

    def read(self, gpa: int, n: int) -> bytes:
        self._bounds(gpa, n)
        return bytes(self._guarded(gpa, n)[gpa:gpa + n])

    def write(self, gpa: int, data: bytes) -> None:
        self._bounds(gpa, len(data))
        self._guarded(gpa, len(data))[gpa:gpa + len(data)] = data

    def byte(self, gpa: int) -> int:
        self._bounds(gpa, 1)
        return self._guarded(gpa, 1)[gpa]

    def snapshot_bytes(self) -> bytes:
        """A copy of all of guest memory (a reference image for the exact oracle)."""
        return bytes(self.mm[:])

    def second_mapping(self) -> GuestMemory:
        """Another shared mapping of this memfd's pages, at another address and with a descriptor of its own: a
        uffd registers a mapping, not its pages, so a second uffd can hold this one while another holds the
        first, and both see the same pages (their placement, their huge pages)."""
        if self.fd is None or self.backing not in ("memfd", "hugetlb") or self._offset:
            raise ValueError(f"a second mapping needs a memfd mapped from its start, not {self!r}")
        fd = os.dup(self.fd)
        try:
            mm = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return GuestMemory(mm, self.size, self.backing, fd=fd)

    def populate(self, offset: int = 0, size: int | None = None) -> None:
        """Fault every page (of ``size`` bytes from ``offset``, page-aligned) in for writing
        (MADV_POPULATE_WRITE), outside any timed section."""
        size = self.size - offset if size is None else size
        self._bounds(offset, size)
        self._guarded(offset, size)
        self._hugepage_advice(MADV_POPULATE_WRITE, offset, size)

    def _hugepage_advice(self, advice: int, offset: int = 0, size: int | None = None) -> None:
        """madvise() over the guest part of the mapping (all of it, or ``size`` bytes from ``offset``)."""
        if self._mm is None:
            raise ValueError(f"{self.backing} guest memory is closed")
        self._map.madvise(advice, self._offset + offset, self.size - offset if size is None else size)

    def cow_bytes(self) -> int:
        """Pages this mapping holds as its own copies (smaps ``Anonymous``): for a MAP_PRIVATE file mapping,
        the pages copied on write. ``Private_*`` would also count file pages merely mapped only here."""
        return _smaps_field_sum(self.addr, ("Anonymous",), self.size)

    def rss_bytes(self) -> int:
        return _smaps_field_sum(self.addr, ("Rss",), self.size)

    def private_dirty_bytes(self) -> int:
        """smaps ``Private_Dirty``: pages mapped only here and written (for a memfd nobody else maps, every
        page put in it: shmem pages are dirty from their first write)."""
        return _smaps_field_sum(self.addr, ("Private_Dirty",), self.size)

    def allocated_bytes(self) -> int:
        """Bytes the memfd behind this mapping holds (st_blocks): its pages, mapped here or not; 0 for a
        mapping without a memfd."""
        return os.fstat(self.fd).st_blocks * 512 if self.backing == "memfd" and self.fd is not None else 0

    def commit_bytes(self) -> int:
        """What this mapping charges to Committed_AS (/proc/meminfo), read from its own state rather than
        the system-wide counter other processes move: the whole mapping when the kernel accounted it at
        mmap (smaps VmFlags ``ac``: private and writable, as MAP_PRIVATE of a file or anonymous memory is),
        plus the pages allocated in a memfd (memfd_create's shmem is VM_NORESERVE, charged a page at a
        time as pages are allocated). A PROT_READ or MAP_SHARED file mapping charges nothing."""
        accounted = self.size if "ac" in _smaps_vmflags(self.addr) else 0
        return accounted + self.allocated_bytes()

    def no_thp(self) -> None:
        """Keep transparent huge pages off this mapping: a first touch then populates 4 KiB, not 2 MiB."""
        self._hugepage_advice(MADV_NOHUGEPAGE)

    def allow_thp(self) -> None:
        """MADV_HUGEPAGE again (after ``no_thp``): khugepaged may collapse the mapping into huge pages."""
        self._hugepage_advice(MADV_HUGEPAGE)

    # -- transparent huge pages ----------------------------------------------
    def huge_bytes(self) -> int:
        """Bytes of this mapping mapped by huge page table entries (smaps AnonHugePages, ShmemPmdMapped,
        FilePmdMapped). Smaller anonymous folios (mTHP) are mapped by 4 KiB entries: ``folio_at`` sees them."""
        return _smaps_field_sum(self.addr, ("AnonHugePages", "ShmemPmdMapped", "FilePmdMapped"), self.size)

    def folio_at(self, offset: int) -> Folio | None:
        """The folio behind the page at ``offset`` (its size; a THP?), or None: not present, or frames and
        /proc/kpageflags not readable here (native.thp.folio_of). Faults nothing in."""
        from snapproof.native.thp import folio_of

        self._bounds(offset, 1)
        return folio_of(self.addr + offset - offset % PAGE_SIZE)

    def collapse(self, offset: int = 0, size: int | None = None) -> int:
        """MADV_COLLAPSE over [offset, offset + size): what khugepaged does in its own time, done now. 0 when
        the kernel collapsed the range into huge pages, else the errno it refused with."""
        n = self.size - offset if size is None else size
        self._bounds(offset, n)
        try:
            self._map.madvise(MADV_COLLAPSE, self._offset + offset, n)
        except OSError as e:
            return e.errno or -1
        return 0

    def collapse_each(self, unit: int = HUGE_PAGE_SIZE) -> list[int]:
        """``collapse()`` of every ``unit`` of the mapping in turn: one answer per unit (0 collapsed, else the
        errno). One MADV_COLLAPSE over several units answers with an error if any unit was refused, while the
        others stay collapsed: only per unit does the answer say what the kernel did."""
        return [self.collapse(at, min(unit, self.size - at)) for at in range(0, self.size, unit)]

    def close(self) -> None:
        if self._mm is None:
            return
        ffi.release(self._ptr)
        if isinstance(self._mm, memoryview):
            self._mm.release()
        self._map.close()
        self._mm = None
        self.fd = None
        if self._fd_finalizer is not None:
            self._fd_finalizer()  # at most once: an interrupted close() never closes a reused fd number

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def label(self) -> str:
        """The backing as reports name it: ``memfd``, ``anonymous+thp``, ..."""
        return f"{self.backing}+thp" if self.thp else self.backing

    def __repr__(self) -> str:
        return f"GuestMemory({self.label}, size={self.size:#x}, addr={self.addr:#x})"


def buffer_address(buf: object) -> tuple[Any, int]:
    """(cffi handle, address) of a writable buffer; release the handle with ``ffi.release``."""
    h = ffi.from_buffer("char[]", buf, require_writable=True)
    return h, int(ffi.cast("uintptr_t", h))


def copy_timed(dst: object, src: GuestMemory, rounds: int = 1) -> int:
    """memcpy all of ``src`` into the writable buffer ``dst`` in C; returns the best time in ns."""
    from snapproof.native._lib import check, lib

    h, addr = buffer_address(dst)
    try:
        if len(h) < src.size:
            raise ValueError(f"copy destination is {len(h):#x} bytes, source {src.size:#x}")
        best = ffi.new("uint64_t *")
        check(lib.sp_memcpy_timed(addr, src.addr, src.size, rounds, best), "memcpy")
        return int(best[0])
    finally:
        ffi.release(h)


def warm_memcpy_bandwidth(size: int, rounds: int = 5) -> float:
    """This host's warm memcpy rate (bytes/s) between two populated buffers of ``size``: the copy limit."""
    with GuestMemory.anonymous(size) as src, GuestMemory.anonymous(size) as dst:
        src.populate()
        dst.populate()
        ns = copy_timed(dst.mm, src, rounds=rounds)
    return size / (ns / 1e9)


def _smaps_entry(addr: int, size: int = 1) -> list[tuple[str, str]]:
    """The (field, value) lines of the /proc/self/smaps entries that start in [addr, addr + size): the one
    at ``addr`` by default; a mapping that madvise() or mprotect() split into several VMAs, all of them."""
    lines: list[tuple[str, str]] = []
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                start = int(head.split("-", 1)[0], 16)
                if inside and not addr <= start < addr + size:
                    break
                inside = addr <= start < addr + size
            elif inside:
                name, _, rest = line.partition(":")
                lines.append((name, rest.strip()))
    return lines


def _smaps_field_sum(addr: int, fields: tuple[str, ...], size: int = 1) -> int:
    """Sum of the named kB fields of the /proc/self/smaps entries that start in [addr, addr + size), in bytes."""
    return sum(int(value.split()[0]) * 1024 for name, value in _smaps_entry(addr, size) if name in fields)


def _address_of(mm: mmap.mmap) -> int:
    """Where the kernel placed a mapping."""
    h = ffi.from_buffer("char[]", mm, require_writable=False)
    try:
        return int(ffi.cast("uintptr_t", h))
    finally:
        ffi.release(h)


def _smaps_vmflags(addr: int) -> set[str]:
    """The two-letter VmFlags of the smaps entry at ``addr`` (``ac``: accounted, ``sh``: shared, ...)."""
    return {flag for name, value in _smaps_entry(addr) if name == "VmFlags" for flag in value.split()}
