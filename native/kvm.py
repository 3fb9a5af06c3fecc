"""KVM: a VM with memslots over GuestMemory, vCPUs in real or flat 32-bit mode, and the C run loop.

Checked and raw twins, after the KVM selftests: ``set_region`` raises naming
the ioctl and arguments, ``try_set_region`` returns the errno.
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    raise ImportError("native.kvm is the Linux (KVM) backend: on Windows the backend is native.whp")

import enum
import threading
import time
import weakref
from dataclasses import dataclass

from native._lib import check, ffi, lib
from native.errors import CapabilityMissing, GuestTimeout, NativeError
from native.memory import GuestMemory

KVM_API_VERSION = 12
# The usual spot, just below 4 GiB: three pages KVM needs for real-mode emulation on Intel.
TSS_ADDR = 0xFFFBD000
KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_MEM_READONLY = 2
REG_NAMES = ("eax", "ebx", "ecx", "edx", "esi", "edi", "esp", "ebp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "eip", "eflags")
DEBUG_CAP = 4096


class ExitReason(enum.IntEnum):
    HLT = lib.SP_EXIT_HLT
    SYNC = lib.SP_EXIT_SYNC
    KICKED = lib.SP_EXIT_KICKED
    TIMEOUT = lib.SP_EXIT_TIMEOUT
    IO = lib.SP_EXIT_IO
    MMIO = lib.SP_EXIT_MMIO
    SHUTDOWN = lib.SP_EXIT_SHUTDOWN
    FAIL_ENTRY = lib.SP_EXIT_FAIL_ENTRY
    INTERNAL = lib.SP_EXIT_INTERNAL
    OTHER = lib.SP_EXIT_OTHER
    ERROR = lib.SP_EXIT_ERROR


@dataclass(frozen=True)
class Exit:
    """Why a run of the vCPU ended, with what the loop saw on the way."""

    reason: ExitReason
    kvm_exit_reason: int
    err: int
    cpu: int
    io_port: int
    io_value: int
    mmio_gpa: int
    mmio_len: int
    mmio_is_write: bool
    hw_reason: int
    sync_count: int
    last_sync: int
    debug: bytes
    run_ns: int
    kvm_runs: int

    def describe(self) -> str:
        r = self.reason
        if r is ExitReason.MMIO:
            kind = "write" if self.mmio_is_write else "read"
            return f"MMIO {kind} at GPA {self.mmio_gpa:#x} ({self.mmio_len} bytes)"
        if r is ExitReason.IO:
            return f"port I/O to port {self.io_port:#x} (value {self.io_value:#x})"
        if r is ExitReason.TIMEOUT:
            return f"TIMEOUT after {self.run_ns / 1e9:.3f} s (last sync {self.last_sync:#x})"
        if r in (ExitReason.FAIL_ENTRY, ExitReason.INTERNAL):
            return f"{r.name} (reason {self.hw_reason:#x})"
        if r is ExitReason.ERROR:
            return f"KVM_RUN failed with errno {self.err}"
        if r is ExitReason.OTHER:
            return f"unhandled KVM exit {self.kvm_exit_reason}"
        if r is ExitReason.SHUTDOWN:
            return f"SHUTDOWN: KVM_EXIT_SHUTDOWN (exit reason {self.kvm_exit_reason}), the guest triple-faulted"
        return r.name


class Vcpu:
    def __init__(self, vm: Vm, index: int, handle: object) -> None:
        self.vm = vm
        self.index = index
        self._h = handle
        # Destroyed with its last reference should close() never run (an interrupt as a cleanup starts):
        # nothing runs it then, every thread in a run holds a reference.
        self._finalizer = weakref.finalize(self, lib.sp_vcpu_destroy, handle)
        self._exit = ffi.new("struct sp_exit *")
        self._debug = ffi.new("uint8_t[]", DEBUG_CAP)
        self._running = threading.Lock()
        self.closing = False  # set before close() kicks a run on another thread: that thread must not run again

    @property
    def handle(self) -> object:
        if self._h is None:
            raise ValueError(f"vCPU {self.index} is closed")
        return self._h

    @property
    def in_run(self) -> bool:
        """True while a run of this vCPU is going on, on any thread."""
        return self._running.locked()

    def set_real_mode(self, ip: int = 0x100, cs: int = 0, sp: int = 0xFFF0) -> None:
        check(lib.sp_vcpu_set_real_mode(self.handle, cs, ip, sp), "set real mode", cs=cs, ip=ip)

    def set_flat32(self, eip: int, esp: int, esi: int = 0) -> None:
        check(lib.sp_vcpu_set_flat32(self.handle, eip, esp, esi), "set flat 32-bit mode", eip=eip, esp=esp)

    def run(self, timeout: float, stop_on_sync: bool = False) -> Exit:
        """Run until HLT, a kick, the time-out or an exit the loop does not own.

        A signal handled in Python (SIGINT, SIGTERM, SIGHUP: KeyboardInterrupt) that lands in KVM_RUN
        ends the C loop's call, so its handler runs at once; a handler that does not raise lets the run
        go on where it was, to the same deadline.
        """
        if timeout <= 0:
            raise ValueError(f"run timeout must be positive, got {timeout!r}")
        flags = lib.SP_RUN_STOP_ON_SYNC if stop_on_sync else 0
        e = self._exit
        deadline = time.monotonic() + timeout
        left_ns = int(timeout * 1e9)
        with self._running:
            while True:
                check(lib.sp_vcpu_run(self.handle, left_ns, flags, e, self._debug, DEBUG_CAP),
                      "KVM run loop", vcpu=self.index)
                # Python ran its signal handlers as that call returned: a KeyboardInterrupt has left by now.
                if e.reason != lib.SP_EXIT_SIGNAL:
                    break
                flags |= lib.SP_RUN_CONTINUE
                left_ns = max(1, int((deadline - time.monotonic()) * 1e9))  # past it: the loop says TIMEOUT
            return Exit(
                reason=ExitReason(e.reason), kvm_exit_reason=e.kvm_exit_reason, err=e.err, cpu=e.cpu,
                io_port=e.io_port, io_value=e.io_value, mmio_gpa=e.mmio_gpa, mmio_len=e.mmio_len,
                mmio_is_write=bool(e.mmio_is_write), hw_reason=e.hw_reason, sync_count=e.sync_count,
                last_sync=e.last_sync, debug=bytes(ffi.buffer(self._debug, e.debug_len)), run_ns=e.run_ns,
                kvm_runs=e.kvm_runs,
            )

    def kick(self) -> None:
        """Make the running (or next) run return KICKED: signal + immediate_exit."""
        check(lib.sp_vcpu_kick(self.handle), "kick vCPU", vcpu=self.index)

    def clear_kick(self) -> None:
        lib.sp_vcpu_clear_kick(self.handle)

    def regs(self) -> dict[str, int]:
        out = ffi.new("uint64_t[18]")
        check(lib.sp_vcpu_get_regs(self.handle, out), "KVM_GET_REGS", vcpu=self.index)
        return dict(zip(REG_NAMES, list(out), strict=True))

    def save_state(self) -> bytes:
        """regs + sregs + FPU, as struct kvm_regs, kvm_sregs, kvm_fpu back to back."""
        n = lib.sp_vcpu_state_size()
        buf = ffi.new("uint8_t[]", n)
        check(lib.sp_vcpu_save_state(self.handle, buf, n), "save vCPU state", vcpu=self.index)
        return bytes(ffi.buffer(buf, n))

    def load_state(self, blob: bytes) -> None:
        n = lib.sp_vcpu_state_size()
        if len(blob) != n:
            raise ValueError(f"vCPU state is {len(blob)} bytes, expected {n} (kvm_regs+kvm_sregs+kvm_fpu)")
        check(lib.sp_vcpu_load_state(self.handle, blob, n), "load vCPU state", vcpu=self.index)

    def regs_if_idle(self) -> dict[str, int] | None:
        """The registers, or None when the vCPU is closed or inside a run (never waits for one to end)."""
        if self._h is None or not self._running.acquire(blocking=False):
            return None
        try:
            return self.regs()
        finally:
            self._running.release()

    def close(self, timeout: float = 5.0) -> None:
        """Destroy the vCPU; a run still going on another thread is kicked out of KVM_RUN first."""
        if self._h is None:
            return
        self.closing = True
        # A run on another thread (a VcpuRunner left unstopped by an exception or a SIGINT) must end
        # before the vCPU goes: destroying it under the loop unmaps kvm_run while the loop still
        # reads it, a segfault (tests/test_reliability_interrupt.py). One that does not end is
        # left allocated, never freed under a running loop.
        if not self._running.acquire(blocking=False):
            lib.sp_vcpu_kick(self._h)
            if not self._running.acquire(timeout=timeout):
                self._h = None
                self._finalizer.detach()  # never freed under the loop, not even by the garbage collector
                raise GuestTimeout(f"vCPU {self.index} still in its run loop {timeout} s after a kick: "
                                   "left allocated rather than destroyed under it")
        try:
            self._h = None
            self._finalizer()  # the destroy, at most once
        finally:
            self._running.release()


def vcpu_state_size() -> int:
    return int(lib.sp_vcpu_state_size())


class Vm:
    """A KVM VM. ``Vm.create()`` opens /dev/kvm; close() tears down vCPUs, then the VM, then /dev/kvm."""

    def __init__(self, kvm_fd: int, vm_fd: int) -> None:
        self.kvm_fd = kvm_fd
        self.vm_fd = vm_fd
        # Closed with the last reference should close() never run (an interrupt as a cleanup starts).
        self._fds_finalizer = weakref.finalize(self, _close_fds, vm_fd, kvm_fd)
        self.vcpus: list[Vcpu] = []
        self.regions: dict[int, tuple[int, GuestMemory]] = {}

    @classmethod
    def create(cls) -> Vm:
        kvm_fd = lib.sp_kvm_open()
        if kvm_fd < 0:
            raise _kvm_open_error(-kvm_fd)
        vm_fd = -1
        try:
            version = check(lib.sp_kvm_api_version(kvm_fd), "KVM_GET_API_VERSION")
            if version != KVM_API_VERSION:
                raise CapabilityMissing(f"/dev/kvm API version {version}, snapproof needs {KVM_API_VERSION}")
            vm_fd = check(lib.sp_vm_create(kvm_fd), "KVM_CREATE_VM")
            check(lib.sp_vm_set_tss(vm_fd, TSS_ADDR), "KVM_SET_TSS_ADDR", addr=TSS_ADDR)
        except BaseException:
            import os

            if vm_fd >= 0:
                os.close(vm_fd)
            os.close(kvm_fd)
            raise
        return cls(kvm_fd, vm_fd)

    def try_set_region(self, slot: int, gpa: int, memory: GuestMemory, flags: int = 0) -> int:
        """KVM_SET_USER_MEMORY_REGION; returns 0 or the errno."""
        rc = lib.sp_vm_set_region(self.vm_fd, slot, flags, gpa, memory.size, memory.addr)
        if rc == 0:
            self.regions[slot] = (gpa, memory)
        return -rc if rc < 0 else 0

    def set_region(self, slot: int, gpa: int, memory: GuestMemory, flags: int = 0) -> None:
        err = self.try_set_region(slot, gpa, memory, flags)
        if err:
            raise NativeError("KVM_SET_USER_MEMORY_REGION", err, slot=slot, gpa=gpa, size=memory.size,
                              hva=memory.addr, flags=flags)

    def dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG for a slot registered with KVM_MEM_LOG_DIRTY_PAGES: one bit a page."""
        _, memory = self.regions[slot]
        words = (memory.size // 4096 + 63) // 64
        bitmap = ffi.new("uint64_t[]", words)
        check(lib.sp_vm_get_dirty_log(self.vm_fd, slot, bitmap), "KVM_GET_DIRTY_LOG", slot=slot)
        return bytes(ffi.buffer(bitmap, words * 8))

    def add_vcpu(self) -> Vcpu:
        out = ffi.new("struct sp_vcpu **")
        index = len(self.vcpus)
        check(lib.sp_vcpu_create(self.kvm_fd, self.vm_fd, index, out), "KVM_CREATE_VCPU", id=index)
        vcpu = Vcpu(self, index, out[0])
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        stuck: list[GuestTimeout] = []
        for v in reversed(self.vcpus):
            try:
                v.close()
            except GuestTimeout as e:  # the rest is closed all the same; the kernel keeps what a run holds
                stuck.append(e)
        self.vcpus.clear()
        self.vm_fd = self.kvm_fd = -1
        self._fds_finalizer()  # closes both, at most once
        self.regions.clear()
        if stuck:
            raise stuck[0]

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_fds(*fds: int) -> None:
    import os

    for fd in fds:
        os.close(fd)


def _kvm_open_error(err: int) -> Exception:
    import errno
    import os

    if err == errno.ENOENT:
        return CapabilityMissing("/dev/kvm does not exist (KVM module not loaded, or no virtualization support)")
    if err in (errno.EACCES, errno.EPERM):
        from native.host import device_node

        return CapabilityMissing(f"/dev/kvm: permission denied for uid {os.geteuid()} ({errno.errorcode[err]} from "
                                 f"open O_RDWR; the node is {device_node('/dev/kvm')}): join the node's group or "
                                 "run as root")
    return NativeError("open(/dev/kvm)", err)
