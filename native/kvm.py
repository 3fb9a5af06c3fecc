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
from collections.abc import Callable
from dataclasses import dataclass, replace

from native._lib import check, ffi, lib
from native.errors import CapabilityMissing, GuestTimeout, NativeError
from native.memory import GuestMemory

KVM_API_VERSION = 12
# The usual spot, just below 4 GiB: three pages KVM needs for real-mode emulation on Intel.
TSS_ADDR = 0xFFFBD000
KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_MEM_READONLY = 2
# KVM_CHECK_EXTENSION capabilities (include/uapi/linux/kvm.h).
KVM_CAP_NR_MEMSLOTS = 10     # the number of memslots a VM may have (slot ids 0 .. n-1)
KVM_CAP_READONLY_MEM = 81    # KVM_MEM_READONLY slots: guest writes to them exit as KVM_EXIT_MMIO
REG_NAMES = ("eax", "ebx", "ecx", "edx", "esi", "edi", "esp", "ebp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "eip", "eflags")
DEBUG_CAP = 4096
# kvm_run->memory_fault.flags (include/uapi/linux/kvm.h, 6.8+): the fault hit guest_memfd (private) memory.
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3


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
    EFAULT = lib.SP_EXIT_EFAULT
    MEMORY_FAULT = lib.SP_EXIT_MEMORY_FAULT


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
    rip: int | None = None   # after a failed KVM_RUN (ERROR, EFAULT, MEMORY_FAULT), read with KVM_GET_REGS
    fault_gpa: int = 0       # MEMORY_FAULT: the fault covers [fault_gpa, fault_gpa + fault_size)
    fault_size: int = 0
    fault_flags: int = 0
    # MMIO write: the bytes the guest stored (kvm_run->mmio.data[:mmio_len]). KVM has completed the
    # instruction as an MMIO write, so whoever backs that GPA with memory afterwards must apply them.
    mmio_data: bytes = b""
    # MMIO writes the VM's memory served during this run (Vm.mmio_write_handler) before it ended with this exit.
    mmio_served: int = 0

    def describe(self) -> str:
        r = self.reason
        if r is ExitReason.MMIO:
            if self.mmio_is_write:
                return (f"KVM_EXIT_MMIO write at GPA {self.mmio_gpa:#x} ({self.mmio_len} bytes"
                        + (f": {self.mmio_data.hex(' ')})" if self.mmio_data else ")"))
            return f"KVM_EXIT_MMIO read at GPA {self.mmio_gpa:#x} ({self.mmio_len} bytes)"
        if r is ExitReason.MEMORY_FAULT:
            private = " (private)" if self.fault_flags & KVM_MEMORY_EXIT_FLAG_PRIVATE else ""
            return (f"KVM_RUN failed with {_errno_name(self.err)} and KVM_EXIT_MEMORY_FAULT: KVM could not back "
                    f"guest memory [{self.fault_gpa:#x}, {self.fault_gpa + self.fault_size:#x}) with host memory, "
                    f"flags {self.fault_flags:#x}{private}, {self._at_rip()}")
        if r is ExitReason.EFAULT:
            return (f"KVM_RUN failed with EFAULT: KVM could not back a guest access with host memory, "
                    f"{self._at_rip()}; GPA unknown: only KVM_EXIT_MEMORY_FAULT (6.8+, KVM_CAP_MEMORY_FAULT_INFO) "
                    "or KVM_EXIT_MMIO names it")
        if r is ExitReason.IO:
            return f"port I/O to port {self.io_port:#x} (value {self.io_value:#x})"
        if r is ExitReason.TIMEOUT:
            return f"TIMEOUT after {self.run_ns / 1e9:.3f} s (last sync {self.last_sync:#x})"
        if r in (ExitReason.FAIL_ENTRY, ExitReason.INTERNAL):
            return f"{r.name} (reason {self.hw_reason:#x})"
        if r is ExitReason.ERROR:
            return f"KVM_RUN failed with {_errno_name(self.err)}, {self._at_rip()}"
        if r is ExitReason.OTHER:
            return f"unhandled KVM exit {self.kvm_exit_reason}"
        if r is ExitReason.SHUTDOWN:
            return f"SHUTDOWN: KVM_EXIT_SHUTDOWN (exit reason {self.kvm_exit_reason}), the guest triple-faulted"
        return r.name

    def _at_rip(self) -> str:
        return "RIP unknown (KVM_GET_REGS failed)" if self.rip is None else f"guest RIP {self.rip:#x}"


def _errno_name(err: int) -> str:
    import errno
    import os

    return f"errno {err} {errno.errorcode.get(err, '?')} ({os.strerror(err)})"


class Vcpu:
    def __init__(self, vm: Vm, index: int, handle: object) -> None:
        self.vm = vm
        self.index = index
        self._h = handle
        self._exit = ffi.new("struct sp_exit *")
        self._debug = ffi.new("uint8_t[]", DEBUG_CAP)
        self._running = threading.Lock()
        self.closing = False  # set before close() kicks a run on another thread: that thread must not run again

    @property
    def handle(self) -> object:
        if self._h is None:
            raise ValueError(f"vCPU {self.index} is closed")
        return self._h

    def set_real_mode(self, ip: int = 0x100, cs: int = 0, sp: int = 0xFFF0) -> None:
        check(lib.sp_vcpu_set_real_mode(self.handle, cs, ip, sp), "set real mode", cs=cs, ip=ip)

    def set_flat32(self, eip: int, esp: int, esi: int = 0) -> None:
        check(lib.sp_vcpu_set_flat32(self.handle, eip, esp, esi), "set flat 32-bit mode", eip=eip, esp=esp)

    def run(self, timeout: float, stop_on_sync: bool = False) -> Exit:
        """Run until HLT, a kick, the time-out or an exit the loop does not own.

        An MMIO write that the VM's ``mmio_write_handler`` serves (the hypervisor-level copy-on-write
        load backs the GPA with a private page) does not end the run: the handler runs on this thread,
        with the vCPU out of KVM_RUN, and the run goes on until another exit or the same deadline. Such
        a run's ``run_ns`` is its wall time, handler included; ``mmio_served`` counts the exits served.
        """
        if timeout <= 0:
            raise ValueError(f"run timeout must be positive, got {timeout!r}")
        flags = lib.SP_RUN_STOP_ON_SYNC if stop_on_sync else 0
        with self._running:
            t0 = time.perf_counter_ns()
            deadline_ns = t0 + int(timeout * 1e9)
            ex = self._run_once(int(timeout * 1e9), flags)
            served = kvm_runs = sync_count = last_sync = 0
            debug = b""
            while (ex.reason is ExitReason.MMIO and ex.mmio_is_write
                   and (handler := self.vm.mmio_write_handler) is not None and handler(ex)):
                served += 1
                kvm_runs += ex.kvm_runs
                sync_count += ex.sync_count
                last_sync = ex.last_sync if ex.sync_count else last_sync
                debug += ex.debug
                # A deadline already past still enters the C loop, which returns TIMEOUT before KVM_RUN.
                ex = self._run_once(max(deadline_ns - time.perf_counter_ns(), 1), flags)
            if not served:
                return ex
            return replace(ex, run_ns=time.perf_counter_ns() - t0, kvm_runs=kvm_runs + ex.kvm_runs,
                           sync_count=sync_count + ex.sync_count, debug=debug + ex.debug, mmio_served=served,
                           last_sync=ex.last_sync if ex.sync_count else last_sync)

    def _run_once(self, timeout_ns: int, flags: int) -> Exit:
        """One call of the C run loop (the caller holds ``_running``)."""
        e = self._exit
        check(lib.sp_vcpu_run(self.handle, timeout_ns, flags, e, self._debug, DEBUG_CAP), "KVM run loop",
              vcpu=self.index)
        return Exit(
                reason=ExitReason(e.reason), kvm_exit_reason=e.kvm_exit_reason, err=e.err, cpu=e.cpu,
                io_port=e.io_port, io_value=e.io_value, mmio_gpa=e.mmio_gpa, mmio_len=e.mmio_len,
                mmio_is_write=bool(e.mmio_is_write), hw_reason=e.hw_reason, sync_count=e.sync_count,
                last_sync=e.last_sync, debug=bytes(ffi.buffer(self._debug, e.debug_len)), run_ns=e.run_ns,
                kvm_runs=e.kvm_runs, rip=e.rip if e.rip_valid else None, fault_gpa=e.fault_gpa,
                fault_size=e.fault_size, fault_flags=e.fault_flags,
            mmio_data=ffi.buffer(e.mmio_data)[0:min(e.mmio_len, 8)] if e.mmio_is_write else b"",
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
                raise GuestTimeout(f"vCPU {self.index} still in its run loop {timeout} s after a kick: "
                                   "left allocated rather than destroyed under it")
        try:
            lib.sp_vcpu_destroy(self._h)
            self._h = None
        finally:
            self._running.release()


def vcpu_state_size() -> int:
    return int(lib.sp_vcpu_state_size())


class Vm:
    """A KVM VM. ``Vm.create()`` opens /dev/kvm; close() tears down vCPUs, then the VM, then /dev/kvm."""

    def __init__(self, kvm_fd: int, vm_fd: int) -> None:
        self.kvm_fd = kvm_fd
        self.vm_fd = vm_fd
        self.vcpus: list[Vcpu] = []
        self.regions: dict[int, tuple[int, GuestMemory]] = {}
        # Called on the vCPU's thread for each KVM_EXIT_MMIO write; True when it backed the write with
        # memory and applied the data (the run then goes on), False to end the run with that exit.
        self.mmio_write_handler: Callable[[Exit], bool] | None = None

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

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: 0 when ``cap`` is absent, else its value (e.g. a count)."""
        return check(lib.sp_kvm_check_extension(self.kvm_fd, cap), "KVM_CHECK_EXTENSION", cap=cap)

    def try_set_memslot(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0) -> int:
        """KVM_SET_USER_MEMORY_REGION over any host range (``size`` 0 deletes the slot); returns 0 or the errno.
        Not recorded in ``regions``, which holds whole GuestMemory mappings only."""
        rc = lib.sp_vm_set_region(self.vm_fd, slot, flags, gpa, size, hva)
        return -rc if rc < 0 else 0

    def set_memslot(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0) -> None:
        err = self.try_set_memslot(slot, gpa, size, hva, flags)
        if err:
            raise NativeError("KVM_SET_USER_MEMORY_REGION", err, slot=slot, gpa=gpa, size=size, hva=hva, flags=flags)

    def try_set_region(self, slot: int, gpa: int, memory: GuestMemory, flags: int = 0) -> int:
        """KVM_SET_USER_MEMORY_REGION; returns 0 or the errno."""
        err = self.try_set_memslot(slot, gpa, memory.size, memory.addr, flags)
        if not err:
            self.regions[slot] = (gpa, memory)
        return err

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
        import os

        stuck: list[GuestTimeout] = []
        for v in reversed(self.vcpus):
            try:
                v.close()
            except GuestTimeout as e:  # the rest is closed all the same; the kernel keeps what a run holds
                stuck.append(e)
        self.vcpus.clear()
        self.mmio_write_handler = None
        if self.vm_fd >= 0:
            os.close(self.vm_fd)
            self.vm_fd = -1
        if self.kvm_fd >= 0:
            os.close(self.kvm_fd)
            self.kvm_fd = -1
        self.regions.clear()
        if stuck:
            raise stuck[0]

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
