"""KVM: a VM with memslots over GuestMemory, vCPUs in real or flat 32-bit mode, and the C run loop.

Checked and raw twins, after the KVM selftests: ``set_region`` raises naming
the ioctl and arguments, ``try_set_region`` returns the errno. ``map_memory``
lays a GuestMemory out as guest RAM (native.layout): one memslot below the
32-bit hole, a second from 4 GiB for the rest.
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    raise ImportError("native.kvm is the Linux (KVM) backend: on Windows the backend is native.whp")

import enum
import errno
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace

from snapproof.native import layout
from snapproof.native._lib import check, ffi, lib
from snapproof.native.errors import CapabilityMissing, GuestTimeout, NativeError
from snapproof.native.image import (
    CPUID_ENTRY_SIZE,
    CPUID_HEAD,
    FIXED_PART_SIZES,
    MSR_ENTRY,
    XSAVE_MIN_SIZE,
    VcpuPart,
    pack_kvm_x86_state,
    split_kvm_x86_state,
)
from snapproof.native.memory import GuestMemory

KVM_API_VERSION = 12
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
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

# KVM_CHECK_EXTENSION numbers (linux/kvm.h), asked on the VM fd as api.rst says for KVM_CAP_XSAVE2.
KVM_CAP_XCRS = 56
KVM_CAP_XSAVE2 = 208
KVM_MAX_CPUID_ENTRIES = 256

# The order a vCPU's parts are read and written in (Firecracker's vstate/vcpu x86_64 save_state and
# restore_state, for the same reasons):
# - save: KVM_GET_MP_STATE first, because it runs kvm_apic_accept_events(), which can change the state
#   the other GETs read; KVM_GET_VCPU_EVENTS last, since other GETs can touch what it reports.
# - restore: CPUID first: KVM judges CR4 bits (KVM_SET_SREGS), XCR0 (KVM_SET_XCRS), the XSAVE
#   features (KVM_SET_XSAVE) and which MSRs exist by the vCPU's CPUID. MP state before the rest.
#   KVM_SET_REGS drops a pending exception, so events come after it, last of all. MSRs after sregs
#   (KVM_SET_SREGS writes EFER and the APIC base), and after CPUID. Debug registers before MSRs as
#   Firecracker does (IA32_DEBUGCTL is an MSR; DR7 is not).
SAVE_ORDER = (VcpuPart.MP_STATE, VcpuPart.REGS, VcpuPart.SREGS, VcpuPart.XSAVE, VcpuPart.XCRS,
              VcpuPart.DEBUGREGS, VcpuPart.CPUID, VcpuPart.MSRS, VcpuPart.VCPU_EVENTS)
RESTORE_ORDER = (VcpuPart.CPUID, VcpuPart.MP_STATE, VcpuPart.REGS, VcpuPart.SREGS, VcpuPart.XSAVE,
                 VcpuPart.XCRS, VcpuPart.DEBUGREGS, VcpuPart.MSRS, VcpuPart.VCPU_EVENTS)


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
        # Destroyed with its last reference should close() never run (an interrupt as a cleanup starts):
        # nothing runs it then, every thread in a run holds a reference.
        self._finalizer = weakref.finalize(self, lib.sp_vcpu_destroy, handle)
        self._exit = ffi.new("struct sp_exit *")
        self._debug = ffi.new("uint8_t[]", DEBUG_CAP)
        self._running = threading.Lock()
        self._msrs_to_save: list[int] | None = None  # KVM's MSR list, less those this vCPU refuses (first save)
        self.msrs_refused_at_value: list[int] = []    # by the last load_state: see _set_msrs
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

        An MMIO write that the VM's ``mmio_write_handler`` serves (the hypervisor-level copy-on-write
        load backs the GPA with a private page) does not end the run: the handler runs on this thread,
        with the vCPU out of KVM_RUN, and the run goes on until another exit or the same deadline. Such
        a run's ``run_ns`` is its wall time, handler included; ``mmio_served`` counts the exits served.

        A signal handled in Python (SIGINT, SIGTERM, SIGHUP: KeyboardInterrupt) that lands in KVM_RUN
        ends the C loop's call, so its handler runs at once; a handler that does not raise lets the run
        go on where it was, to the same deadline.

        The VM's ``run_guard``, when set, sees the exit before it is returned and may raise instead.
        """
        ex = self._run(timeout, stop_on_sync)
        if (guard := self.vm.run_guard) is not None:
            guard(ex)
        return ex

    def _run(self, timeout: float, stop_on_sync: bool) -> Exit:
        if timeout <= 0:
            raise ValueError(f"run timeout must be positive, got {timeout!r}")
        flags = lib.SP_RUN_STOP_ON_SYNC if stop_on_sync else 0
        with self._running:
            t0 = time.perf_counter_ns()
            deadline_ns = t0 + int(timeout * 1e9)
            ex = self._run_once(deadline_ns, flags)
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
                ex = self._run_once(deadline_ns, flags)
            if not served:
                return ex
            return replace(ex, run_ns=time.perf_counter_ns() - t0, kvm_runs=kvm_runs + ex.kvm_runs,
                           sync_count=sync_count + ex.sync_count, debug=debug + ex.debug, mmio_served=served,
                           last_sync=ex.last_sync if ex.sync_count else last_sync)

    def _run_once(self, deadline_ns: int, flags: int) -> Exit:
        """One run of the C loop to ``deadline_ns`` (perf_counter_ns; the caller holds ``_running``)."""
        e = self._exit
        while True:
            left_ns = max(deadline_ns - time.perf_counter_ns(), 1)  # past it: the loop says TIMEOUT
            check(lib.sp_vcpu_run(self.handle, left_ns, flags, e, self._debug, DEBUG_CAP), "KVM run loop",
                  vcpu=self.index)
            # Python ran its signal handlers as that call returned: a KeyboardInterrupt has left by now.
            if e.reason != lib.SP_EXIT_SIGNAL:
                break
            flags |= lib.SP_RUN_CONTINUE
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

    def get_part(self, part: VcpuPart, msrs: list[int] | None = None) -> bytes:
        """One part of the vCPU's state, the kernel's struct as KVM_GET_* fills it. ``msrs``: the MSR
        indices to read for the msrs part (every MSR in ``msrs_to_save()`` by default)."""
        if part is VcpuPart.MSRS:
            indices = self.msrs_to_save() if msrs is None else msrs
            buf = ffi.new("uint8_t[]", MSR_ENTRY.size * len(indices) or 1)
            for i, index in enumerate(indices):
                MSR_ENTRY.pack_into(ffi.buffer(buf), MSR_ENTRY.size * i, index, 0, 0)
            n = check(lib.sp_vcpu_get_part(self.handle, part, buf, MSR_ENTRY.size * len(indices)), "KVM_GET_MSRS",
                      vcpu=self.index)
            if n != len(indices):
                raise NativeError("KVM_GET_MSRS", errno.EINVAL, vcpu=self.index, msr=indices[n],
                                  read=f"{n} of {len(indices)} MSRs")
            return bytes(ffi.buffer(buf, MSR_ENTRY.size * n))
        size = self._part_size(part)
        buf = ffi.new("uint8_t[]", size)
        n = check(lib.sp_vcpu_get_part(self.handle, part, buf, size), f"get vCPU {part.label}", vcpu=self.index)
        return bytes(ffi.buffer(buf, n))

    def set_part(self, part: VcpuPart, data: bytes) -> None:
        """Write one part of the vCPU's state (KVM_SET_*); a refused MSR is named by its index."""
        if part is VcpuPart.XSAVE:
            # KVM_SET_XSAVE reads exactly this host's KVM_CAP_XSAVE2 size: a shorter state (from a host
            # without the larger components) is the same state with them in their init (absent) form.
            size = self.vm.xsave_size()
            if len(data) > size:
                raise ValueError(f"vCPU {self.index}: xsave part of {len(data)} bytes, this host's KVM takes "
                                 f"{size} (KVM_CAP_XSAVE2): the state holds XSAVE components this host lacks")
            data = data + bytes(size - len(data))
        if part is VcpuPart.CPUID and CPUID_HEAD.unpack_from(data)[0] == 0:
            return  # no entries: a fresh vCPU has none either, and KVM_SET_CPUID2 has nothing to set
        if part is VcpuPart.MSRS:
            self._set_msrs(data)
            return
        check(lib.sp_vcpu_set_part(self.handle, part, data, len(data)), f"set vCPU {part.label}", vcpu=self.index)

    def _set_msrs(self, data: bytes) -> None:
        """KVM_SET_MSRS for every entry. KVM stops at an MSR it refuses: one that this vCPU already holds
        at the wanted value (KVM_GET_MSRS says so) is noted in ``msrs_refused_at_value`` and passed over
        (kvm_pvm refuses to write some paravirtual MSRs it lets be read); any other is an error naming it."""
        self.msrs_refused_at_value = []
        while data:
            n = check(lib.sp_vcpu_set_part(self.handle, VcpuPart.MSRS, data, len(data)), "set vCPU msrs",
                      vcpu=self.index)
            if n == len(data) // MSR_ENTRY.size:
                return
            index, _, value = MSR_ENTRY.unpack_from(data, MSR_ENTRY.size * n)
            held = self.get_part(VcpuPart.MSRS, [index])
            if MSR_ENTRY.unpack(held)[2] != value:
                raise NativeError("KVM_SET_MSRS", errno.EINVAL, vcpu=self.index, msr=index, value=value,
                                  held=MSR_ENTRY.unpack(held)[2])
            self.msrs_refused_at_value.append(index)
            data = data[MSR_ENTRY.size * (n + 1):]

    def _part_size(self, part: VcpuPart) -> int:
        if part in FIXED_PART_SIZES:
            return FIXED_PART_SIZES[part]
        if part is VcpuPart.XSAVE:
            return self.vm.xsave_size()
        if part is VcpuPart.CPUID:
            return CPUID_HEAD.size + CPUID_ENTRY_SIZE * KVM_MAX_CPUID_ENTRIES
        raise ValueError(f"{part.label}: no size of its own (the msrs part is sized by its MSR list)")

    def msrs_to_save(self) -> list[int]:
        """The MSRs a snapshot holds: KVM_GET_MSR_INDEX_LIST less those KVM_GET_MSRS refuses on this
        vCPU (Firecracker's filter: KVM lists MSRs whose CPUID feature the guest may lack). Asked once."""
        if self._msrs_to_save is None:
            readable: list[int] = []
            rest = self.vm.msr_index_list()
            while rest:
                buf = ffi.new("uint8_t[]", MSR_ENTRY.size * len(rest))
                for i, index in enumerate(rest):
                    MSR_ENTRY.pack_into(ffi.buffer(buf), MSR_ENTRY.size * i, index, 0, 0)
                n = check(lib.sp_vcpu_get_part(self.handle, VcpuPart.MSRS, buf, MSR_ENTRY.size * len(rest)),
                          "KVM_GET_MSRS", vcpu=self.index)
                readable += rest[:n]
                rest = rest[n + 1:]  # KVM stops at the first MSR it refuses: skip that one, go on
            self._msrs_to_save = readable
        return list(self._msrs_to_save)

    def save_state(self) -> bytes:
        """The whole x86 state, part by part in SAVE_ORDER, as the file's self-describing KVM x86
        state (native/image.py). The vCPU must be stopped: outside KVM_RUN, any port write completed."""
        parts = {}
        for part in SAVE_ORDER:
            if part is VcpuPart.XCRS and not self.vm.has_xcrs():
                continue  # KVM_GET_XCRS needs a host CPU with XSAVE (KVM_CAP_XCRS); the format allows its absence
            parts[part] = self.get_part(part)
        return pack_kvm_x86_state(parts)

    def load_state(self, blob: bytes, skip: frozenset[VcpuPart] = frozenset()) -> tuple[VcpuPart, ...]:
        """Write a state from ``save_state`` (or a file) into this vCPU, in RESTORE_ORDER; returns the
        parts written. ``skip``: parts deliberately left out, for fault injection only (native/inject.py).
        A malformed state raises SnapshotFormatError (a ValueError) naming the part, before any write."""
        parts = split_kvm_x86_state(blob, f"vCPU {self.index} state")
        applied = []
        for part in RESTORE_ORDER:
            if part in parts and part not in skip:
                self.set_part(part, parts[part])
                applied.append(part)
        return tuple(applied)

    def set_cpuid(self, cpuid: bytes) -> None:
        """KVM_SET_CPUID2 with a struct kvm_cpuid2 and its entries (e.g. ``Vm.supported_cpuid()``): what
        the guest's CPUID reports, and what KVM judges CR4, XCR0 and MSR writes by. Before the first run."""
        self.set_part(VcpuPart.CPUID, cpuid)

    def inject_nmi(self) -> None:
        """KVM_NMI: queue an NMI, delivered at the next guest entry unless NMIs are blocked."""
        check(lib.sp_vcpu_inject_nmi(self.handle), "KVM_NMI", vcpu=self.index)

    def regs_if_idle(self) -> dict[str, int] | None:
        """The registers, or None when the vCPU is closed or inside a run (never waits for one to end)."""
        if self._h is None or not self._running.acquire(blocking=False):
            return None
        try:
            return self.regs()
        finally:
            self._running.release()

    def kvm_write_wall_clock(self, gpa: int) -> None:
        """Have KVM itself write its pvclock wall clock (u32 version, sec, nsec) into guest memory at ``gpa``
        (MSR_KVM_WALL_CLOCK_NEW). KVM finds the page through the VM's memslots, as for a guest write, and marks
        it in a dirty log: a write at a GPA no 32-bit flat guest can name, above 4 GiB."""
        check(lib.sp_vcpu_kvm_write_wall_clock(self.handle, gpa), "KVM_SET_MSRS(MSR_KVM_WALL_CLOCK_NEW)",
              vcpu=self.index, gpa=gpa)

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


@dataclass(frozen=True)
class Memslot:
    """One KVM memslot: ``size`` bytes of ``memory`` from memory offset ``offset``, at ``gpa``."""

    slot: int
    gpa: int
    memory: GuestMemory
    offset: int
    size: int
    flags: int

    @property
    def hva(self) -> int:
        return self.memory.addr + self.offset

    @property
    def npages(self) -> int:
        return self.size // layout.PAGE_SIZE


class Vm:
    """A KVM VM. ``Vm.create()`` opens /dev/kvm; close() tears down vCPUs, then the VM, then /dev/kvm.

    KVM's private pages are placed in the 32-bit hole before any vCPU exists (native.layout):
    the identity map at ``identity_map_gpa``, the real-mode TSS at ``tss_gpa``.
    """

    def __init__(self, kvm_fd: int, vm_fd: int, identity_map_gpa: int, tss_gpa: int) -> None:
        self.kvm_fd = kvm_fd
        self.vm_fd = vm_fd
        self.identity_map_gpa = identity_map_gpa
        self.tss_gpa = tss_gpa
        # Closed with the last reference should close() never run (an interrupt as a cleanup starts).
        self._fds_finalizer = weakref.finalize(self, _close_fds, vm_fd, kvm_fd)
        self.vcpus: list[Vcpu] = []
        self.memslots: dict[int, Memslot] = {}
        # Called on the vCPU's thread for each KVM_EXIT_MMIO write; True when it backed the write with
        # memory and applied the data (the run then goes on), False to end the run with that exit.
        self.mmio_write_handler: Callable[[Exit], bool] | None = None
        # Called with each run's exit before Vcpu.run returns it; it may raise instead. A lazy loader sets it:
        # a run of a VM whose loader died ends in its death named (native.errors.LoaderDied), whatever the exit.
        self.run_guard: Callable[[Exit], None] | None = None

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
            # Both before the first vCPU: KVM refuses to move the identity map once one exists. A KVM without
            # the capability keeps its default page, which lies in the hole too.
            identity = layout.KVM_DEFAULT_IDENTITY_MAP_GPA
            if check(lib.sp_kvm_check_extension(kvm_fd, KVM_CAP_SET_IDENTITY_MAP_ADDR),
                     "KVM_CHECK_EXTENSION", cap=KVM_CAP_SET_IDENTITY_MAP_ADDR):
                identity = layout.IDENTITY_MAP_GPA
                check(lib.sp_vm_set_identity_map(vm_fd, identity), "KVM_SET_IDENTITY_MAP_ADDR", addr=identity)
            check(lib.sp_vm_set_tss(vm_fd, layout.TSS_GPA), "KVM_SET_TSS_ADDR", addr=layout.TSS_GPA)
        except BaseException:
            import os

            if vm_fd >= 0:
                os.close(vm_fd)
            os.close(kvm_fd)
            raise
        return cls(kvm_fd, vm_fd, identity_map_gpa=identity, tss_gpa=layout.TSS_GPA)

    def try_set_region(self, slot: int, gpa: int, memory: GuestMemory, flags: int = 0, offset: int = 0,
                       size: int | None = None) -> int:
        """KVM_SET_USER_MEMORY_REGION for ``size`` bytes (default: the rest) of ``memory`` from memory offset
        ``offset``; returns 0 or the errno."""
        size = memory.size - offset if size is None else size
        if offset < 0 or size <= 0 or offset + size > memory.size:
            raise ValueError(f"memslot {slot}: [{offset:#x}, {offset + size:#x}) is not a range of guest memory "
                             f"of size {memory.size:#x}")
        rc = lib.sp_vm_set_region(self.vm_fd, slot, flags, gpa, size, memory.addr + offset)
        if rc == 0:
            self.memslots[slot] = Memslot(slot, gpa, memory, offset, size, flags)
        return -rc if rc < 0 else 0

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: 0 when ``cap`` is absent, else its value (e.g. a count)."""
        return check(lib.sp_kvm_check_extension(self.kvm_fd, cap), "KVM_CHECK_EXTENSION", cap=cap)

    def try_set_memslot(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0) -> int:
        """KVM_SET_USER_MEMORY_REGION over any host range (``size`` 0 deletes the slot); returns 0 or the errno.
        Not recorded in ``memslots``, which holds slots over GuestMemory mappings only."""
        rc = lib.sp_vm_set_region(self.vm_fd, slot, flags, gpa, size, hva)
        return -rc if rc < 0 else 0

    def set_memslot(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0) -> None:
        err = self.try_set_memslot(slot, gpa, size, hva, flags)
        if err:
            raise NativeError("KVM_SET_USER_MEMORY_REGION", err, slot=slot, gpa=gpa, size=size, hva=hva, flags=flags)

    def set_region(self, slot: int, gpa: int, memory: GuestMemory, flags: int = 0, offset: int = 0,
                   size: int | None = None) -> None:
        size = memory.size - offset if size is None else size
        err = self.try_set_region(slot, gpa, memory, flags, offset, size)
        if err:
            raise NativeError("KVM_SET_USER_MEMORY_REGION", err, slot=slot, gpa=gpa, size=size,
                              hva=memory.addr + offset, flags=flags)

    def map_memory(self, memory: GuestMemory, flags: int = 0) -> tuple[Memslot, ...]:
        """``memory`` as the guest's RAM, laid out by native.layout: slot 0 from GPA 0 up to the 32-bit hole,
        slot 1 from 4 GiB for the rest (only when there is a rest). ``flags`` go to every slot."""
        for r in layout.ram_ranges(memory.size):
            self.set_region(r.slot, r.gpa, memory, flags, offset=r.offset, size=r.size)
        return self.slots_of(memory)

    def slots_of(self, memory: GuestMemory) -> tuple[Memslot, ...]:
        """The memslots over ``memory``, in memory-offset order."""
        return tuple(sorted((m for m in self.memslots.values() if m.memory is memory), key=lambda m: m.offset))

    def dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG for a slot registered with KVM_MEM_LOG_DIRTY_PAGES: one bit a page of the slot."""
        words = (self.memslots[slot].npages + 63) // 64
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

    def xsave_size(self) -> int:
        """Bytes of a kvm_xsave for this VM: KVM_CAP_XSAVE2's answer (>= 4096) when KVM has it, else 4096."""
        size = check(lib.sp_kvm_check_extension(self.vm_fd, KVM_CAP_XSAVE2), "KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)")
        return max(size, XSAVE_MIN_SIZE)

    def has_xcrs(self) -> bool:
        return check(lib.sp_kvm_check_extension(self.vm_fd, KVM_CAP_XCRS), "KVM_CHECK_EXTENSION(KVM_CAP_XCRS)") > 0

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a vCPU."""
        n = check(lib.sp_kvm_msr_index_list(self.kvm_fd, ffi.NULL, 0), "KVM_GET_MSR_INDEX_LIST")
        out = ffi.new("uint32_t[]", n or 1)
        n = check(lib.sp_kvm_msr_index_list(self.kvm_fd, out, n), "KVM_GET_MSR_INDEX_LIST")
        return list(out[0:n])

    def supported_cpuid(self) -> bytes:
        """KVM_GET_SUPPORTED_CPUID as a struct kvm_cpuid2 with its entries, for ``Vcpu.set_cpuid``."""
        size = CPUID_HEAD.size + CPUID_ENTRY_SIZE * KVM_MAX_CPUID_ENTRIES
        buf = ffi.new("uint8_t[]", size)
        n = check(lib.sp_kvm_supported_cpuid(self.kvm_fd, buf, size), "KVM_GET_SUPPORTED_CPUID")
        return bytes(ffi.buffer(buf, n))

    def close(self) -> None:
        stuck: list[GuestTimeout] = []
        for v in reversed(self.vcpus):
            try:
                v.close()
            except GuestTimeout as e:  # the rest is closed all the same; the kernel keeps what a run holds
                stuck.append(e)
        self.vcpus.clear()
        self.mmio_write_handler = None
        self.vm_fd = self.kvm_fd = -1
        self._fds_finalizer()  # closes both, at most once
        self.memslots.clear()
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

    from snapproof.native import fixes

    if err == errno.ENOENT:
        return CapabilityMissing("/dev/kvm does not exist (KVM module not loaded, or no virtualization support)",
                                 fix=fixes.kvm_module())
    if err in (errno.EACCES, errno.EPERM):
        from snapproof.native.errors import device_node

        return CapabilityMissing(f"/dev/kvm: permission denied for uid {os.geteuid()} ({errno.errorcode[err]} from "
                                 f"open O_RDWR; the node is {device_node('/dev/kvm')})", fix=fixes.kvm_access())
    return NativeError("open(/dev/kvm)", err)
