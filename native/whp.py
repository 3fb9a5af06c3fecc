"""WHP: Windows file views of a snapshot and a one-vCPU partition that runs from them.

The Windows half of the copy-on-write load (phase 4)::

    with FileView.copy(path) as view, WhpVm(view) as vm:   # PAGE_WRITECOPY + FILE_MAP_COPY at GPA 0
        ex = vm.run(timeout=2.0)                           # CS=0 IP=0x100, real mode
        assert ex.reason is ExitReason.HLT
        vm.read(0x1000, 1)                                 # the guest's write, in this view only

``FileView.readonly`` is the mapping hyperlight first shipped (PAGE_READONLY +
FILE_MAP_READ); a guest write through it kills the host thread, so it only
runs in a child: ``readonly_load_in_child``.

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
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from native.errors import CapabilityMissing, NativeError

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
REPO_ROOT = Path(__file__).resolve().parent.parent


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
    "SP_WHP_RUN_STOP_ON_SYNC": 1,
}

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
            from native.build import ensure_built

            ensure_built()
            from native._windows import ffi, lib  # type: ignore[import-not-found,unused-ignore]

            wrong = {name: (want, getattr(lib, name)) for name, want in _C_CONSTANTS.items()
                     if getattr(lib, name) != want}
            if wrong:
                shown = ", ".join(f"{n}: Python {p}, C {c}" for n, (p, c) in sorted(wrong.items()))
                raise RuntimeError(f"native/whp.py and snapproof_win.h disagree: {shown}")
            _native = (ffi, lib)
        return _native


def _not_windows_reason() -> str:
    return f"WHP absent: not a Windows host (sys.platform = {sys.platform!r}); WHP needs Windows 10 or later"


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
            return f"WHvRunVirtualProcessor failed with HRESULT {self.hresult:#010x}"
        if r is ExitReason.OTHER:
            return f"unhandled WHP exit {self.whv_exit_reason:#x} (RIP {self.rip:#x})"
        return r.name


class WhpVm:
    """A WHP partition with one vCPU in real mode, guest memory from a FileView at GPA 0.

    ``WhpVm(view)`` creates the partition (processor count 1), maps the view
    Read|Write|Execute at ``gpa``, creates vCPU 0 and points it at CS:IP =
    0:0x100. ``WhpVm()`` is the bare partition for ``map``/``try_map``.
    close() deletes the vCPU, then the partition (its mappings go with it).
    """

    def __init__(self, memory: FileView | None = None, *, gpa: int = 0, flags: MapFlags = MapFlags.RWX,
                 cs: int = 0, ip: int = REAL_MODE_IP, sp: int = REAL_MODE_SP) -> None:
        reason = whp_absent_reason()
        if reason is not None:
            raise CapabilityMissing(reason)
        ffi, lib = _load()
        out = ffi.new("struct sp_whp_vm **")
        _check(lib.sp_whp_vm_create(out), "create WHP partition")
        self._h: Any = out[0]
        self.regions: list[tuple[int, FileView]] = []
        self._exit = ffi.new("struct sp_whp_exit *")
        self._debug = ffi.new("uint8_t[]", DEBUG_CAP)
        self._running = threading.Lock()
        try:
            if memory is not None:
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

    def _region(self, gpa: int, n: int) -> tuple[FileView, int]:
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

@dataclass(frozen=True)
class ReadonlyLoadOutcome:
    """What happened to a child that loaded the snapshot read-only and ran the guest."""

    returncode: int
    exit: dict[str, Any] | None  # the child's report when it lived to give one
    output: str

    @property
    def access_violation(self) -> bool:
        """The child died of STATUS_ACCESS_VIOLATION: the host thread faulted on the guest's write."""
        return self.returncode & 0xFFFFFFFF == STATUS_ACCESS_VIOLATION

    @property
    def memory_access_write(self) -> bool:
        """The run stopped on a write memory-access exit instead of completing."""
        return bool(self.exit and self.exit.get("reason") == "MEMORY_ACCESS" and self.exit.get("access") == "WRITE")

    @property
    def failed_like_original_bug(self) -> bool:
        return self.access_violation or self.memory_access_write

    def describe(self) -> str:
        if self.access_violation:
            return f"child died with STATUS_ACCESS_VIOLATION ({STATUS_ACCESS_VIOLATION:#x}): the original bug"
        if self.exit is not None:
            return f"child exit status {self.returncode}, run ended: {self.exit.get('describe', self.exit)}"
        tail = self.output.strip().splitlines()[-3:]
        return f"child exit status {self.returncode & 0xFFFFFFFF:#x}: {' | '.join(tail) or 'no output'}"


def readonly_load_in_child(path: str | os.PathLike[str], offset: int = IMAGE_OFFSET, size: int | None = None,
                           run_timeout: float = 2.0, timeout: float = 60.0) -> ReadonlyLoadOutcome:
    """Map the file PAGE_READONLY + FILE_MAP_READ into a partition in a child and run the guest.

    Expected: the child dies with an access violation, or the run stops on a
    write memory-access exit. Either way this process is unharmed.
    """
    cmd = [sys.executable, "-m", "native.whp", "readonly-child", str(path), "--offset", str(offset),
           "--run-timeout", str(run_timeout)]
    if size is not None:
        cmd += ["--size", str(size)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)
    report = None
    for line in proc.stdout.splitlines():
        if line.startswith("readonly-child: "):
            report = json.loads(line.split(": ", 1)[1])
    return ReadonlyLoadOutcome(returncode=proc.returncode, exit=report, output=proc.stdout + proc.stderr)


def _readonly_child(args: argparse.Namespace) -> int:
    quiet_crashes()
    report: dict[str, Any]
    with FileView.readonly(args.path, args.offset, args.size) as view:
        try:
            vm = WhpVm(view)
        except WhpError as e:  # WHP refused the read-only source up front: not the original bug either
            report = {"reason": "MAP_REFUSED", "access": None, "gpa": None, "describe": str(e)}
        else:
            with vm:
                ex = vm.run(timeout=args.run_timeout)  # the guest's first write decides
            report = {"reason": ex.reason.name, "access": ex.access.name if ex.access else None, "gpa": ex.gpa,
                      "describe": ex.describe()}
    print(f"readonly-child: {json.dumps(report)}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m native.whp``: WHP status and commit charge; ``readonly-child`` is for readonly_load_in_child."""
    parser = argparse.ArgumentParser(prog="python -m native.whp")
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
    if sys.platform == "win32":
        print(f"commit charge (PrivateUsage): {private_usage() / 2**20:.1f} MiB")
    return 0 if reason is None else 1


if __name__ == "__main__":
    sys.exit(main())
