"""WHP: Windows file views of a snapshot and a one-vCPU partition that runs from them.

The Windows half of the copy-on-write loads (phase 4), two ways::

    with FileView.copy(path) as view, WhpVm(view) as vm:   # OS level: PAGE_WRITECOPY + FILE_MAP_COPY at GPA 0
        ex = vm.run(timeout=2.0)                           # CS=0 IP=0x100, real mode
        assert ex.reason is ExitReason.HLT
        vm.read(0x1000, 1)                                 # the guest's write, in this view only

    with CowMemory.open(path) as mem, WhpVm(mem) as vm:    # hypervisor level: a PAGE_READONLY view mapped
        ex = vm.run(timeout=2.0)                           # Read|Execute; each first write to a page exits and
        mem.stats().private_pages                          # the run loop gives the guest a private copy of it

One partition with mapped memory per process: real WHP refuses a second
partition's WHvMapGpaRange with ERROR_VID_PARTITION_ALREADY_EXISTS while the
first exists. Close one WhpVm before the next maps memory (the memory itself,
a view or a CowMemory, can stay), or run the second in a child process.

``FileView.readonly`` mapped Read|Write|Execute is the load hyperlight first
shipped (PAGE_READONLY + FILE_MAP_READ); the guest's store then fails, by an
access violation on the host thread, a write memory-access exit or a failed
run call depending on the host, so it only runs in a child:
``readonly_load_in_child``, whose exit status names the outcome.

This module imports anywhere (the shared code must import on Windows and on
Linux alike); the compiled ``native._windows`` loads on first use, on Windows.
``whp_absent_reason()`` says why WHP cannot run, in the words the C self-test
prints: the text lives once, in ``native/windows/snapproof_win.h``.

Checked and raw twins, after the KVM selftests: ``map`` raises naming the
call and arguments, ``try_map`` returns the HRESULT.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import platform
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapproof.native.errors import CapabilityMissing, NativeError

from snapproof import IMPORT_ROOT

# The snapshot file's memory image starts after one header page (native/image.py).
IMAGE_OFFSET = 4096
PAGE_SIZE = 4096
REAL_MODE_IP = 0x100
REAL_MODE_SP = 0xFFF0
REG_NAMES = ("eax", "ebx", "ecx", "edx", "esi", "edi", "esp", "ebp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "eip", "eflags")
DEBUG_CAP = 4096
STATUS_ACCESS_VIOLATION = 0xC0000005
# Windows page protections, as VirtualQuery reports them.
PROTECTION_NAMES = {0x01: "PAGE_NOACCESS", 0x02: "PAGE_READONLY", 0x04: "PAGE_READWRITE",
                    0x08: "PAGE_WRITECOPY", 0x20: "PAGE_EXECUTE_READ", 0x40: "PAGE_EXECUTE_READWRITE",
                    0x80: "PAGE_EXECUTE_WRITECOPY"}


# Values of the C enums in snapproof_win.h. Spelled out so this module imports where the
# compiled module cannot exist; _load() checks them against the C before first use.
class ExitReason(enum.IntEnum):
    HLT = 1
    SYNC = 2
    CANCELED = 3
    TIMEOUT = 4
    IO = 5
    MEMORY_ACCESS = 6
    OTHER = 10
    ERROR = 11


class ViewMode(enum.IntEnum):
    COPY = 1      # CreateFileMapping(PAGE_WRITECOPY) + MapViewOfFile(FILE_MAP_COPY)
    READONLY = 2  # CreateFileMapping(PAGE_READONLY) + MapViewOfFile(FILE_MAP_READ): the original bug


class MapFlags(enum.IntFlag):
    """WHvMapGpaRange flags (the documented WHV_MAP_GPA_RANGE_FLAGS values)."""

    READ = 1
    WRITE = 2
    EXECUTE = 4
    RWX = 7


class Probe(enum.IntEnum):
    """enum sp_whp_probe: why WHP is (not) usable."""

    PRESENT = 0
    NO_DLL = 1
    NO_EXPORT = 2
    CAPABILITY_FAILED = 3
    NOT_PRESENT = 4
    CREATE_FAILED = 5    # the probe's throwaway partition: WHvCreatePartition
    PROPERTY_FAILED = 6  # ... WHvSetPartitionProperty(ProcessorCount = 1)
    SETUP_FAILED = 7     # ... WHvSetupPartition


class Feature(enum.IntFlag):
    """WHV_CAPABILITY_FEATURES bits snapproof depends on (enum sp_whp_feature)."""

    PARTIAL_UNMAP = 1  # WHvUnmapGpaRange may unmap part of a mapped range: the hypervisor-level COW load needs it


class MemoryAccessType(enum.IntEnum):
    """WHV_MEMORY_ACCESS_TYPE."""

    READ = 0
    WRITE = 1
    EXECUTE = 2


_C_CONSTANTS: dict[str, int] = {
    **{f"SP_WHP_EXIT_{r.name}": r.value for r in ExitReason},
    **{f"SP_VIEW_{m.name}": m.value for m in ViewMode},
    **{f"SP_WHP_MAP_{f.name}": f.value for f in (MapFlags.READ, MapFlags.WRITE, MapFlags.EXECUTE)},
    **{f"SP_WHP_{p.name}": p.value for p in Probe},
    **{f"SP_WHP_FEATURE_{f.name}": f.value for f in Feature if f.name},
    "SP_WHP_RUN_STOP_ON_SYNC": 1,
}

# ERROR_VID_PARTITION_ALREADY_EXISTS: a second partition of this process mapped memory while the first existed.
VID_PARTITION_ALREADY_EXISTS = 0xC0370008

_native: tuple[Any, Any] | None = None
_native_lock = threading.Lock()


def _load() -> tuple[Any, Any]:
    """The compiled module (built first if missing or stale); Windows only."""
    global _native
    if _native is not None:
        return _native
    with _native_lock:
        if _native is None:
            if sys.platform != "win32":
                raise CapabilityMissing(_not_windows_reason())
            problem = unsupported_interpreter()
            if problem is not None:
                raise WhpUnavailable(problem)
            from snapproof.native.build import ensure_built

            ensure_built()
            from snapproof.native._windows import ffi, lib  # type: ignore[import-not-found,unused-ignore]

            wrong = {name: (want, getattr(lib, name)) for name, want in _C_CONSTANTS.items()
                     if getattr(lib, name) != want}
            if wrong:
                shown = ", ".join(f"{n}: Python {p}, C {c}" for n, (p, c) in sorted(wrong.items()))
                raise RuntimeError(f"native/whp.py and snapproof_win.h disagree: {shown}")
            _native = (ffi, lib)
        return _native


def _not_windows_reason() -> str:
    return f"WHP absent: not a Windows host (sys.platform = {sys.platform!r}); WHP needs Windows 10 or later"


class WhpUnavailable(RuntimeError):
    """This interpreter cannot load the WHP layer at all (not a 64-bit x64 Python): broken, not missing."""


def unsupported_interpreter() -> str | None:
    """Why this Python cannot run the WHP layer, or None: it is x64-only (its exit layouts and guests are x86-64)."""
    machine = platform.machine() or "unknown"
    bits = 64 if sys.maxsize > 2**32 else 32
    # A 32-bit Python on 64-bit Windows still reports AMD64 here: the pointer size tells them apart.
    if bits != 64 or machine.upper() not in ("AMD64", "X86_64"):
        return (f"this Python is a {bits}-bit {machine} interpreter ({sys.executable}); snapproof's WHP layer is "
                "x64 only (x86-64 WHP exit layouts and guests): use a 64-bit x64 Python")
    return None


class WhpError(NativeError):
    """A Win32 or WHP call failed: names the call, the Win32 error or HRESULT in hex, and the arguments."""

    def __init__(self, op: str, code: int, *, hresult: bool, **args: object) -> None:
        self.op = op
        self.code = code
        self.is_hresult = hresult
        shown = ", ".join(f"{k}={v:#x}" if isinstance(v, int) else f"{k}={v}" for k, v in args.items())
        where = f" ({shown})" if shown else ""
        what = f"HRESULT {code:#010x}" if hresult else f"Win32 error {code} ({code:#x})"
        # Not NativeError.__init__: it reads the code as an errno, and a Win32 error or HRESULT is not one.
        OSError.__init__(self, code, f"{op} failed{where}: {what}")


def _check(rc: int, what: str, **args: object) -> None:
    if rc < 0:
        ffi, lib = _load()
        op = ffi.string(lib.sp_win_last_op()).decode() or what
        raise WhpError(op if op == what else f"{what}: {op}", int(lib.sp_win_last_error()),
                       hresult=bool(lib.sp_win_last_is_hresult()), **args)


def whp_absent_reason() -> str | None:
    """Why WHP cannot run here, naming what was probed and how; None when it can.

    On Windows this is the C probe's own text (LoadLibraryExW, GetProcAddress,
    WHvGetCapability(HypervisorPresent)), byte for byte what selftest.exe prints.
    """
    if sys.platform != "win32":
        return _not_windows_reason()
    ffi, lib = _load()
    reason = lib.sp_whp_absent_reason()
    return None if reason == ffi.NULL else ffi.string(reason).decode()


def whp_probe() -> Probe | None:
    """Which branch of the WHP probe this host takes (Probe.PRESENT when usable); None off Windows."""
    if sys.platform != "win32":
        return None
    _, lib = _load()
    return Probe(lib.sp_whp_probe())


def whp_probe_hresult() -> int:
    """The HRESULT of the probe call that failed (0 when none did, or off Windows)."""
    if sys.platform != "win32":
        return 0
    _, lib = _load()
    return int(lib.sp_whp_probe_hresult())


def whp_features() -> Feature:
    """WHvGetCapability(WHvCapabilityCodeFeatures), the bits snapproof names (others kept as raw bits)."""
    ffi, lib = _load()
    out = ffi.new("uint64_t *")
    _check(lib.sp_whp_features(out), "WHvGetCapability(WHvCapabilityCodeFeatures)")
    return Feature(int(out[0]))


def partial_unmap_missing() -> str | None:
    """Why the hypervisor-level copy-on-write load cannot run here, or None."""
    reason = whp_absent_reason()
    if reason is not None:
        return reason
    features = whp_features()
    if Feature.PARTIAL_UNMAP not in features:
        return (f"WHvGetCapability(WHvCapabilityCodeFeatures) = {int(features):#x}: PartialUnmap = 0, so "
                "WHvUnmapGpaRange cannot take one page out of the read-only mapping to serve a copy-on-write fault")
    return None


def private_usage() -> int:
    """This process's commit charge in bytes (GetProcessMemoryInfo PrivateUsage).

    A FILE_MAP_COPY view is charged in full when mapped, touched or not: the
    per-VM density cost of the copy-on-write load on Windows.
    """
    ffi, lib = _load()
    out = ffi.new("uint64_t *")
    _check(lib.sp_win_private_usage(out), "GetProcessMemoryInfo")
    return int(out[0])


def quiet_crashes() -> None:
    """No Windows Error Reporting dialog for this process: a negative control is meant to crash."""
    _, lib = _load()
    lib.sp_win_quiet_crashes()


class FileView:
    """``size`` bytes of a file from ``offset`` (page aligned), mapped copy-on-write or read-only.

    MapViewOfFile needs offsets on the 64 KiB allocation granularity, the
    snapshot image sits at 4096: the view starts lower and ``addr`` points at
    ``offset`` inside it (still page aligned, as WHvMapGpaRange requires).
    """

    def __init__(self, path: str | os.PathLike[str], mode: ViewMode, offset: int = IMAGE_OFFSET,
                 size: int | None = None) -> None:
        ffi, lib = _load()
        self.path = Path(path)
        self.mode = ViewMode(mode)
        self.offset = offset
        if size is None:
            size = self.path.stat().st_size - offset
        out = ffi.new("struct sp_view **")
        _check(lib.sp_view_open(str(self.path), self.mode, offset, size, out), "open file view",
               path=str(self.path), mode=self.mode.name, offset=offset, size=size)
        self._h: Any = out[0]
        info = ffi.new("struct sp_view_info *")
        lib.sp_view_get_info(self._h, info)
        self.addr = int(info.addr)
        self.size = int(info.size)
        self.base = int(info.base)
        self.map_offset = int(info.map_offset)
        self.view_size = int(info.view_size)
        self._vms: list[WhpVm] = []
        buf = ffi.buffer(ffi.cast("uint8_t *", self.addr), self.size)
        # A Python write through a read-only view would be an access violation: refuse it instead.
        self.view = memoryview(buf).toreadonly() if self.mode is ViewMode.READONLY else memoryview(buf)

    @classmethod
    def copy(cls, path: str | os.PathLike[str], offset: int = IMAGE_OFFSET, size: int | None = None) -> FileView:
        """PAGE_WRITECOPY + FILE_MAP_COPY: writes stay in this process, the file never changes."""
        return cls(path, ViewMode.COPY, offset, size)

    @classmethod
    def readonly(cls, path: str | os.PathLike[str], offset: int = IMAGE_OFFSET,
                 size: int | None = None) -> FileView:
        """PAGE_READONLY + FILE_MAP_READ: the original bug's mapping."""
        return cls(path, ViewMode.READONLY, offset, size)

    @property
    def handle(self) -> Any:
        if self._h is None:
            raise ValueError(f"view of {self.path} is closed")
        return self._h

    def read(self, offset: int, n: int) -> bytes:
        self._bounds(offset, n)
        return bytes(self.view[offset:offset + n])

    def write(self, offset: int, data: bytes) -> None:
        if self.mode is ViewMode.READONLY:
            raise ValueError(f"view of {self.path} is read-only: a write would be an access violation "
                             "(run it in a child: readonly_load_in_child)")
        self._bounds(offset, len(data))
        self.view[offset:offset + len(data)] = data

    def protection(self, offset: int = 0) -> int:
        """VirtualQuery's Protect of the page at ``offset``: PAGE_WRITECOPY until written, then PAGE_READWRITE."""
        ffi, lib = _load()
        out = ffi.new("uint32_t *")
        _check(lib.sp_view_page_protection(self.handle, offset, out), "VirtualQuery", offset=offset)
        return int(out[0])

    def _bounds(self, offset: int, n: int) -> None:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise IndexError(f"view of {self.path}: [{offset:#x}, {offset + n:#x}) outside [0, {self.size:#x})")

    def close(self) -> None:
        """Idempotent; closes any VM still mapping this view first, so no partition outlives its memory."""
        for vm in list(self._vms):
            vm.close()
        if self._h is not None:
            # Raises BufferError while a buffer into the view is still held: better than unmapping under it.
            self.view.release()
            _, lib = _load()
            lib.sp_view_close(self._h)
            self._h = None

    def __enter__(self) -> FileView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class CowStats:
    """What a CowMemory's guests have written so far: each private page is one copy-on-write fault."""

    size: int            # bytes of guest memory
    private_pages: int   # pages copied into private memory (committed, charged)
    faults: int          # write exits served
    fault_ns: int        # wall time serving them

    @property
    def private_bytes(self) -> int:
        return self.private_pages * PAGE_SIZE


class CowMemory:
    """Guest memory copy-on-write at the second-level page tables (native/windows/cow.c).

    The snapshot is a PAGE_READONLY + FILE_MAP_READ view, mapped Read|Execute:
    nothing is charged per VM until the guest writes. Each first write to a page
    exits; the run loop commits one private page, copies the snapshot page into
    it, unmaps that page and maps the copy Read|Write|Execute at the same GPA,
    and the guest re-executes its store. The private pages outlive the
    partition, so the memory can be read after its WhpVm is closed.
    """

    def __init__(self, path: str | os.PathLike[str], offset: int = IMAGE_OFFSET, size: int | None = None) -> None:
        ffi, lib = _load()
        self.snapshot = FileView.readonly(path, offset, size)
        out = ffi.new("struct sp_cow **")
        try:
            _check(lib.sp_cow_open(self.snapshot.handle, out), "open copy-on-write memory",
                   path=str(self.snapshot.path), offset=offset, size=self.snapshot.size)
        except BaseException:
            self.snapshot.close()
            raise
        self._h: Any = out[0]
        self.path = self.snapshot.path
        self.size = self.snapshot.size
        self._vms: list[WhpVm] = []

    @classmethod
    def open(cls, path: str | os.PathLike[str], offset: int = IMAGE_OFFSET, size: int | None = None) -> CowMemory:
        return cls(path, offset, size)

    @property
    def handle(self) -> Any:
        if self._h is None:
            raise ValueError(f"copy-on-write memory of {self.path} is closed")
        return self._h

    def read(self, offset: int, n: int) -> bytes:
        """What the guest sees: its private copy where it wrote, the snapshot elsewhere."""
        if offset < 0 or n < 0 or offset + n > self.size:
            raise IndexError(f"{self.path}: [{offset:#x}, {offset + n:#x}) outside [0, {self.size:#x})")
        ffi, lib = _load()
        buf = ffi.new("uint8_t[]", max(n, 1))
        _check(lib.sp_cow_read(self.handle, offset, buf, n), "read copy-on-write memory", offset=offset, n=n)
        return bytes(ffi.buffer(buf, n))

    def write(self, offset: int, data: bytes) -> None:
        raise ValueError(f"copy-on-write memory of {self.path}: the host does not write it; only guest writes "
                         "make private pages")

    def is_private(self, offset: int) -> bool:
        """Whether the page at ``offset`` is the guest's own copy (written since the load)."""
        _, lib = _load()
        rc = lib.sp_cow_page_is_private(self.handle, offset)
        _check(rc, "sp_cow_page_is_private", offset=offset)
        return bool(rc)

    def stats(self) -> CowStats:
        ffi, lib = _load()
        info = ffi.new("struct sp_cow_info *")
        lib.sp_cow_get_info(self.handle, info)
        return CowStats(size=int(info.size), private_pages=int(info.private_pages), faults=int(info.faults),
                        fault_ns=int(info.fault_ns))

    def close(self) -> None:
        """Idempotent; closes any VM mapping this memory first (the partition before the pages it maps)."""
        for vm in list(self._vms):
            vm.close()
        if self._h is not None:
            _, lib = _load()
            lib.sp_cow_close(self._h)
            self._h = None
        self.snapshot.close()

    def __enter__(self) -> CowMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


WhpMemory = FileView | CowMemory


@dataclass(frozen=True)
class Exit:
    """Why a run of the vCPU ended, with what the loop saw on the way."""

    reason: ExitReason
    whv_exit_reason: int
    hresult: int
    io_port: int
    io_size: int
    io_is_out: bool
    io_value: int
    io_is_string: bool
    gpa: int
    gva: int
    access: MemoryAccessType | None  # for MEMORY_ACCESS exits
    gpa_unmapped: bool
    rip: int
    sync_count: int
    last_sync: int
    debug: bytes
    run_ns: int
    whv_runs: int
    cow_faults: int = 0     # copy-on-write faults served during the run (CowMemory)
    cow_ns: int = 0
    error_op: str = ""      # for ERROR: the call that failed

    def describe(self) -> str:
        r = self.reason
        if r is ExitReason.MEMORY_ACCESS:
            unmapped = ", GPA unmapped" if self.gpa_unmapped else ""
            kind = self.access.name.lower() if self.access is not None else "unknown access"
            return f"memory access: {kind} at GPA {self.gpa:#x}{unmapped} (RIP {self.rip:#x})"
        if r is ExitReason.IO:
            kind = "out" if self.io_is_out else "in"
            string = " (string I/O: not emulated)" if self.io_is_string else ""
            return f"port I/O: {kind} port {self.io_port:#x}, value {self.io_value:#x}{string}"
        if r is ExitReason.TIMEOUT:
            return f"TIMEOUT after {self.run_ns / 1e9:.3f} s (last sync {self.last_sync:#x}, RIP {self.rip:#x})"
        if r is ExitReason.ERROR:
            return f"{self.error_op or 'WHvRunVirtualProcessor'} failed with {self.hresult:#010x}"
        if r is ExitReason.OTHER:
            return f"unhandled WHP exit {self.whv_exit_reason:#x} (RIP {self.rip:#x})"
        return r.name


class WhpVm:
    """A WHP partition with one vCPU in real mode, guest memory from a FileView or CowMemory at GPA 0.

    ``WhpVm(view)`` creates the partition (processor count 1), maps the view
    Read|Write|Execute at ``gpa``, creates vCPU 0 and points it at CS:IP =
    0:0x100; ``WhpVm(cow_memory)`` maps it copy-on-write instead (see
    CowMemory). ``WhpVm()`` is the bare partition for ``map``/``try_map``.
    close() deletes the vCPU, then the partition (its mappings go with it);
    the memory stays open. Only one WhpVm of a process may map memory at a
    time (VID_PARTITION_ALREADY_EXISTS).
    """

    def __init__(self, memory: WhpMemory | None = None, *, gpa: int = 0, flags: MapFlags = MapFlags.RWX,
                 cs: int = 0, ip: int = REAL_MODE_IP, sp: int = REAL_MODE_SP) -> None:
        reason = whp_absent_reason()
        if reason is not None:
            raise CapabilityMissing(reason)
        ffi, lib = _load()
        out = ffi.new("struct sp_whp_vm **")
        _check(lib.sp_whp_vm_create(out), "create WHP partition")
        self._h: Any = out[0]
        self.regions: list[tuple[int, WhpMemory]] = []
        self._exit = ffi.new("struct sp_whp_exit *")
        self._debug = ffi.new("uint8_t[]", DEBUG_CAP)
        self._running = threading.Lock()
        try:
            if isinstance(memory, CowMemory):
                self.map_cow(memory, gpa)
            elif memory is not None:
                self.map(memory, gpa, flags)
            self.set_real_mode(ip=ip, cs=cs, sp=sp)
        except BaseException:
            self.close()
            raise

    @property
    def handle(self) -> Any:
        if self._h is None:
            raise ValueError("WHP partition is closed")
        return self._h

    def try_map(self, memory: FileView, gpa: int = 0, flags: MapFlags = MapFlags.RWX) -> int:
        """WHvMapGpaRange of the whole view; returns 0 or the failing HRESULT (or Win32 error)."""
        _, lib = _load()
        if lib.sp_whp_vm_map(self.handle, memory.addr, gpa, memory.size, int(flags)) < 0:
            return int(lib.sp_win_last_error())
        self.regions.append((gpa, memory))
        memory._vms.append(self)
        return 0

    def map(self, memory: FileView, gpa: int = 0, flags: MapFlags = MapFlags.RWX) -> None:
        if self.try_map(memory, gpa, flags):
            _check(-1, "WHvMapGpaRange", hva=memory.addr, gpa=gpa, size=memory.size, flags=int(flags),
                   view=memory.mode.name)

    def map_cow(self, memory: CowMemory, gpa: int = 0) -> None:
        """Map copy-on-write memory Read|Execute; the run loop serves its write exits."""
        reason = partial_unmap_missing()
        if reason is not None:
            raise CapabilityMissing(reason)
        _, lib = _load()
        _check(lib.sp_whp_vm_map_cow(self.handle, memory.handle, gpa), "map copy-on-write memory", gpa=gpa,
               size=memory.size, path=str(memory.path))
        self.regions.append((gpa, memory))
        memory._vms.append(self)

    def set_real_mode(self, ip: int = REAL_MODE_IP, cs: int = 0, sp: int = REAL_MODE_SP) -> None:
        _, lib = _load()
        _check(lib.sp_whp_vcpu_set_real_mode(self.handle, cs, ip, sp), "set real mode", cs=cs, ip=ip, sp=sp)

    def run(self, timeout: float, stop_on_sync: bool = False) -> Exit:
        """Run until HLT, a cancel, the time-out or an exit the loop does not own.

        Debug-port bytes (0xE9) and sync-port writes (0x500) are handled in C
        and the run goes on (unless ``stop_on_sync``). A watchdog thread calls
        WHvCancelRunVirtualProcessor at the deadline: the run returns TIMEOUT.
        """
        if timeout <= 0:
            raise ValueError(f"run timeout must be positive, got {timeout!r}")
        ffi, lib = _load()
        flags = lib.SP_WHP_RUN_STOP_ON_SYNC if stop_on_sync else 0
        e = self._exit
        with self._running:
            _check(lib.sp_whp_vcpu_run(self.handle, int(timeout * 1e9), flags, e, self._debug, DEBUG_CAP),
                   "WHP run loop")
            reason = ExitReason(e.reason)
            error_op = ffi.string(lib.sp_win_last_op()).decode() if reason is ExitReason.ERROR else ""
            access = None
            if reason is ExitReason.MEMORY_ACCESS and e.mem_access_type in {m.value for m in MemoryAccessType}:
                access = MemoryAccessType(e.mem_access_type)
            return Exit(
                reason=reason, whv_exit_reason=int(e.whv_exit_reason), hresult=int(e.hresult),
                io_port=int(e.io_port), io_size=int(e.io_size), io_is_out=bool(e.io_is_out),
                io_value=int(e.io_value), io_is_string=bool(e.io_is_string), gpa=int(e.mem_gpa),
                gva=int(e.mem_gva), access=access, gpa_unmapped=bool(e.mem_gpa_unmapped), rip=int(e.rip),
                sync_count=int(e.sync_count), last_sync=int(e.last_sync),
                debug=bytes(ffi.buffer(self._debug, e.debug_len)), run_ns=int(e.run_ns), whv_runs=int(e.whv_runs),
                cow_faults=int(e.cow_faults), cow_ns=int(e.cow_ns), error_op=error_op,
            )

    def cancel(self) -> None:
        """From another thread: the running (or next) run returns CANCELED."""
        _, lib = _load()
        _check(lib.sp_whp_vcpu_cancel(self.handle), "cancel vCPU")

    def regs(self) -> dict[str, int]:
        ffi, lib = _load()
        out = ffi.new("uint64_t[18]")
        _check(lib.sp_whp_vcpu_get_regs(self.handle, out), "WHvGetVirtualProcessorRegisters")
        return dict(zip(REG_NAMES, (int(v) for v in out), strict=True))

    def _region(self, gpa: int, n: int) -> tuple[WhpMemory, int]:
        for base, view in self.regions:
            if base <= gpa and gpa + n <= base + view.size:
                return view, gpa - base
        raise IndexError(f"GPA [{gpa:#x}, {gpa + n:#x}) is not inside one mapped region "
                         f"({', '.join(f'[{b:#x}, {b + v.size:#x})' for b, v in self.regions) or 'none'})")

    def read(self, gpa: int, n: int) -> bytes:
        """Guest memory as the host sees it: through the mapped view."""
        view, off = self._region(gpa, n)
        return view.read(off, n)

    def write(self, gpa: int, data: bytes) -> None:
        view, off = self._region(gpa, len(data))
        view.write(off, data)

    @staticmethod
    def private_usage() -> int:
        return private_usage()

    def close(self) -> None:
        if self._h is not None:
            _, lib = _load()
            lib.sp_whp_vm_destroy(self._h)
            self._h = None
        for _, view in self.regions:
            if self in view._vms:
                view._vms.remove(self)
        self.regions.clear()

    def __enter__(self) -> WhpVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the negative control: the original read-only load, in a child process ----

class ReadonlyOutcome(enum.Enum):
    """How a child that ran the read-only load ended; its exit status says which (the value)."""

    SETUP_FAILED = 2          # it never ran the guest
    WRITE_LANDED = 3          # the store landed and the guest halted: a read-only view that is not
    MEMORY_ACCESS_EXIT = 4    # the run stopped on a write memory-access exit at a mapped GPA
    MAP_REFUSED = 5           # WHvMapGpaRange refused the read-only source up front
    RUN_FAILED = 6            # WHvRunVirtualProcessor (or a register call) failed
    TIMEOUT = 7               # the run's deadline passed
    OTHER_EXIT = 8            # any other exit
    ACCESS_VIOLATION = STATUS_ACCESS_VIOLATION  # the host thread faulted: the process died of it
    UNKNOWN = -1              # an exit status the child never gives

    @property
    def meaning(self) -> str:
        return _OUTCOME_MEANING[self]

    @property
    def is_the_guest_store_failing(self) -> bool:
        """The real outcomes of a store through a read-only view: the original bug, on some host."""
        return self in (ReadonlyOutcome.ACCESS_VIOLATION, ReadonlyOutcome.MEMORY_ACCESS_EXIT,
                        ReadonlyOutcome.RUN_FAILED)


_OUTCOME_MEANING = {
    ReadonlyOutcome.SETUP_FAILED: "the child could not set the load up",
    ReadonlyOutcome.WRITE_LANDED: "the guest's store landed and it halted",
    ReadonlyOutcome.MEMORY_ACCESS_EXIT: "the run stopped on a write memory-access exit",
    ReadonlyOutcome.MAP_REFUSED: "WHvMapGpaRange refused the read-only view",
    ReadonlyOutcome.RUN_FAILED: "WHvRunVirtualProcessor failed",
    ReadonlyOutcome.TIMEOUT: "the run timed out",
    ReadonlyOutcome.OTHER_EXIT: "the run ended some other way",
    ReadonlyOutcome.ACCESS_VIOLATION: "the host thread took an access violation (STATUS_ACCESS_VIOLATION)",
    ReadonlyOutcome.UNKNOWN: "the child ended with an exit status it never gives",
}


def outcome_of_exit(ex: Exit) -> ReadonlyOutcome:
    """What a run of the read-only load that returned means."""
    if ex.reason is ExitReason.HLT:
        return ReadonlyOutcome.WRITE_LANDED
    if ex.reason is ExitReason.ERROR:
        return ReadonlyOutcome.RUN_FAILED
    if ex.reason is ExitReason.TIMEOUT:
        return ReadonlyOutcome.TIMEOUT
    if ex.reason is ExitReason.MEMORY_ACCESS and ex.access is MemoryAccessType.WRITE and not ex.gpa_unmapped:
        return ReadonlyOutcome.MEMORY_ACCESS_EXIT
    return ReadonlyOutcome.OTHER_EXIT


@dataclass(frozen=True)
class ReadonlyLoadOutcome:
    """What happened to a child that loaded the snapshot read-only and ran the guest."""

    returncode: int
    exit: dict[str, Any] | None  # the child's report when it lived to give one
    output: str

    @property
    def outcome(self) -> ReadonlyOutcome:
        status = self.returncode & 0xFFFFFFFF
        for o in ReadonlyOutcome:
            if o.value == status:
                return o
        return ReadonlyOutcome.UNKNOWN

    @property
    def access_violation(self) -> bool:
        """The child died of STATUS_ACCESS_VIOLATION: the host thread faulted on the guest's write."""
        return self.outcome is ReadonlyOutcome.ACCESS_VIOLATION

    @property
    def memory_access_write(self) -> bool:
        """The run stopped on a write memory-access exit instead of completing."""
        return self.outcome is ReadonlyOutcome.MEMORY_ACCESS_EXIT

    @property
    def failed_like_original_bug(self) -> bool:
        return self.outcome.is_the_guest_store_failing

    def describe(self) -> str:
        o = self.outcome
        status = self.returncode & 0xFFFFFFFF
        detail = f": {self.exit.get('describe')}" if self.exit and self.exit.get("describe") else ""
        if o is ReadonlyOutcome.UNKNOWN and not detail:
            tail = self.output.strip().splitlines()[-3:]
            detail = f": {' | '.join(tail) or 'no output'}"
        return f"{o.name}, {o.meaning} (child exit status {status:#x}){detail}"


def readonly_load_in_child(path: str | os.PathLike[str], offset: int = IMAGE_OFFSET, size: int | None = None,
                           run_timeout: float = 2.0, timeout: float = 60.0) -> ReadonlyLoadOutcome:
    """Map the file PAGE_READONLY + FILE_MAP_READ into a partition in a child, Read|Write|Execute, and run the guest.

    Expected, depending on the host: the child dies with an access violation,
    the run stops on a write memory-access exit, or the run call fails. The
    child's exit status names the outcome; this process is unharmed, and its
    own partition (if any) is not the child's: one mapped partition each.
    """
    cmd = [sys.executable, "-m", "snapproof.native.whp", "readonly-child", str(path), "--offset", str(offset),
           "--run-timeout", str(run_timeout)]
    if size is not None:
        cmd += ["--size", str(size)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(IMPORT_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=IMPORT_ROOT, env=env)
    report = None
    for line in proc.stdout.splitlines():
        if line.startswith("readonly-child: "):
            report = json.loads(line.split(": ", 1)[1])
    return ReadonlyLoadOutcome(returncode=proc.returncode, exit=report, output=proc.stdout + proc.stderr)


def _readonly_child(args: argparse.Namespace) -> int:
    quiet_crashes()
    report: dict[str, Any] = {"gpa": None, "access": None}
    try:
        with FileView.readonly(args.path, args.offset, args.size) as view:
            try:
                vm = WhpVm(view)
            except WhpError as e:
                refused = "WHvMapGpaRange" in e.op  # WHP refusing the source is not the original bug either
                outcome = ReadonlyOutcome.MAP_REFUSED if refused else ReadonlyOutcome.SETUP_FAILED
                report["describe"] = str(e)
            else:
                with vm:
                    ex = vm.run(timeout=args.run_timeout)  # the guest's first store decides
                outcome = outcome_of_exit(ex)
                report.update(gpa=ex.gpa, access=ex.access.name if ex.access else None, describe=ex.describe())
    except (OSError, CapabilityMissing) as e:
        outcome = ReadonlyOutcome.SETUP_FAILED
        report["describe"] = str(e)
    report["outcome"] = outcome.name
    print(f"readonly-child: {json.dumps(report)}", flush=True)
    return outcome.value


def main(argv: list[str] | None = None) -> int:
    """``python -m snapproof.native.whp``: WHP status and commit charge.

    ``readonly-child`` is the child of readonly_load_in_child."""
    parser = argparse.ArgumentParser(prog="python -m snapproof.native.whp")
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("readonly-child")
    child.add_argument("path")
    child.add_argument("--offset", type=int, default=IMAGE_OFFSET)
    child.add_argument("--size", type=int, default=None)
    child.add_argument("--run-timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.command == "readonly-child":
        return _readonly_child(args)
    reason = whp_absent_reason()
    print(f"WHP: {'present' if reason is None else reason}")
    if reason is None:
        print(f"WHvCapabilityCodeFeatures: {int(whp_features()):#x} (PartialUnmap: "
              f"{'yes' if partial_unmap_missing() is None else 'no, the hypervisor-level copy-on-write load skips'})")
    if sys.platform == "win32":
        print(f"commit charge (PrivateUsage): {private_usage() / 2**20:.1f} MiB")
    return 0 if reason is None else 1


if __name__ == "__main__":
    sys.exit(main())
