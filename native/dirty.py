"""Dirty-page trackers: which pages of guest memory were written since the last look, three ways.

=================  ==============================================================================
tracker            how it knows a page was written
=================  ==============================================================================
kvm-dirty-log      KVM's dirty log (KVM_GET_DIRTY_LOG, get-and-clear) of every memslot over guest
                   memory, registered with KVM_MEM_LOG_DIRTY_PAGES: KVM marks what the guest writes
                   through KVM_RUN, and what KVM itself writes; a write the VMM makes through its
                   own mapping (device emulation) never reaches it
wp-async           userfaultfd WP_ASYNC + PAGEMAP_SCAN (kernel 6.7): the region write-protected, each
                   write clears the page's uffd-wp bit without a message, PAGEMAP_SCAN gets and
                   clears the written set (WP_UNPOPULATED protects never-populated pages too)
soft-dirty         the page tables' soft-dirty bit (CONFIG_MEM_SOFT_DIRTY): cleared for the whole
                   process through /proc/self/clear_refs, read back from /proc/self/pagemap bit 55
=================  ==============================================================================

Every tracker has the same three steps: ``start()`` (every page clean from here), ``collect()`` (the
pages written since the last start or collect, as a bitmap, and clean again) and ``close()``. A
collect must happen while nothing writes guest memory (the vCPUs paused, the VMM's devices quiet):
soft-dirty reads and clears in two steps, and a write between them would be lost.

``TRACKER_NEEDS`` names what each needs of the host (native.host capabilities), beside the trackers,
so a phase can deselect or skip the cases a host cannot run. Linux only.
"""

from __future__ import annotations

import sys

# Before the platform guard: plain data a phase's parameters use on every host.
KVM_DIRTY_LOG: str = "kvm-dirty-log"
WP_ASYNC: str = "wp-async"
SOFT_DIRTY: str = "soft-dirty"
TRACKERS: tuple[str, ...] = (KVM_DIRTY_LOG, WP_ASYNC, SOFT_DIRTY)
# What each tracker needs of the host, by native.host capability name.
TRACKER_NEEDS: dict[str, tuple[str, ...]] = {
    KVM_DIRTY_LOG: ("kvm",),
    # WP on memfd memory, asynchronous, with never-populated pages protected too; the scan that reads it back.
    WP_ASYNC: ("uffd", "uffd.WP_HUGETLBFS_SHMEM", "uffd.WP_ASYNC", "uffd.WP_UNPOPULATED", "pagemap_scan"),
    SOFT_DIRTY: ("soft_dirty",),
}

if sys.platform == "win32":
    raise ImportError("native.dirty reads KVM's dirty log and Linux page tables: Linux only")

import time
from typing import Any

from snapproof.native import uffd
from snapproof.native._lib import check, ffi, lib
from snapproof.native.diff_image import empty_bitmap
from snapproof.native.kvm import KVM_MEM_LOG_DIRTY_PAGES, Vm
from snapproof.native.memory import PAGE_SIZE, GuestMemory
from snapproof.native.uffd import require_features

PM_SOFT_DIRTY = 1 << 55
PM_PRESENT = 1 << 63


class DirtyTracker:
    """One tracker over one guest memory; ``collect_ns`` is what the last collect took."""

    name = ""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.npages = memory.size // PAGE_SIZE
        self.collect_ns = 0
        self._started = False

    def start(self) -> None:
        """Every page clean from now on."""
        self._start()
        self._started = True

    def collect(self) -> bytearray:
        """The pages written since start() or the last collect(), as a bitmap (bit i of u64 word i/64 =
        page i); every page is clean again."""
        if not self._started:
            raise RuntimeError(f"{self.name}: collect() before start()")
        bitmap = empty_bitmap(self.npages)
        t0 = time.perf_counter_ns()
        self._collect(bitmap)
        self.collect_ns = time.perf_counter_ns() - t0
        return bitmap

    def _start(self) -> None:
        raise NotImplementedError

    def _collect(self, bitmap: bytearray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> DirtyTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KvmDirtyLog(DirtyTracker):
    """KVM's dirty log, one bitmap per memslot over ``memory``; each lands at its slot's memory offset."""

    name = KVM_DIRTY_LOG

    def __init__(self, memory: GuestMemory, vm: Vm) -> None:
        super().__init__(memory)
        self.vm = vm
        self.slots = vm.slots_of(memory)
        covered = sum(s.size for s in self.slots)
        unlogged = [s.slot for s in self.slots if not s.flags & KVM_MEM_LOG_DIRTY_PAGES]
        if covered != memory.size or unlogged:
            raise ValueError(f"KVM's dirty log tracks only memslots registered with KVM_MEM_LOG_DIRTY_PAGES: slots "
                             f"cover {covered:#x} of {memory.size:#x} bytes of guest memory, slots {unlogged} do "
                             "not log")

    def _start(self) -> None:
        for s in self.slots:
            self.vm.dirty_log(s.slot)  # get-and-clear: what was written before now is the base's

    def _collect(self, bitmap: bytearray) -> None:
        for s in self.slots:
            log = self.vm.dirty_log(s.slot)
            # Slots start on 64-page boundaries (native.layout): their words land whole at the slot's offset.
            first = s.offset // PAGE_SIZE // 8
            bitmap[first:first + len(log)] = log


class WpAsyncTracker(DirtyTracker):
    """userfaultfd WP_ASYNC over ``memory``; PAGEMAP_SCAN gets and clears the written pages."""

    name = WP_ASYNC

    def __init__(self, memory: GuestMemory) -> None:
        super().__init__(memory)
        need = uffd.mask_of("PAGEFAULT_FLAG_WP", "WP_ASYNC", "WP_UNPOPULATED")
        if memory.backing in ("memfd", "hugetlb"):
            need |= uffd.FEATURES["WP_HUGETLBFS_SHMEM"]
        require_features(need, f"dirty tracking by uffd WP_ASYNC on {memory.backing} memory, never-populated "
                               "pages included")
        out = ffi.new("struct sp_wpasync **")
        supported = ffi.new("uint64_t *")
        check(lib.sp_wpasync_create(memory.addr, memory.size, need, out, supported),
              "uffd WP_ASYNC register", mem=memory.addr, size=memory.size, features=need)
        self._t: Any = out[0]

    def _start(self) -> None:
        check(lib.sp_wpasync_protect_all(self._t), "UFFDIO_WRITEPROTECT (WP_ASYNC)")

    def _collect(self, bitmap: bytearray) -> None:
        scan_ns = ffi.new("uint64_t *")
        with ffi.from_buffer("uint64_t[]", bitmap) as words:
            check(lib.sp_wpasync_collect_bitmap(self._t, words, scan_ns), "PAGEMAP_SCAN get-and-clear written pages")

    def close(self) -> None:
        if self._t is not None:
            lib.sp_wpasync_destroy(self._t)  # un-protects, unregisters, closes the uffd
            self._t = None


class SoftDirtyTracker(DirtyTracker):
    """The soft-dirty bits of ``memory``'s pages. Clearing them is process-wide (clear_refs): one soft-dirty
    tracker per process, and its clear also costs every other mapping a write fault."""

    name = SOFT_DIRTY

    def _start(self) -> None:
        check(lib.sp_soft_dirty_clear(), "clear soft-dirty bits")

    def _collect(self, bitmap: bytearray) -> None:
        pagemap_bits(self.memory, PM_SOFT_DIRTY, bitmap)
        check(lib.sp_soft_dirty_clear(), "clear soft-dirty bits")


def pagemap_bits(memory: GuestMemory, mask: int, bitmap: bytearray | None = None) -> bytearray:
    """The pages of ``memory`` whose /proc/self/pagemap entry has a bit of ``mask`` (PM_SOFT_DIRTY, PM_PRESENT),
    OR-ed into ``bitmap`` (a new one by default). Reading pagemap populates nothing."""
    out = empty_bitmap(memory.size // PAGE_SIZE) if bitmap is None else bitmap
    with ffi.from_buffer("uint64_t[]", out) as words:
        check(lib.sp_pagemap_bitmap(memory.addr, memory.size // PAGE_SIZE, mask, words), "read /proc/self/pagemap",
              addr=memory.addr, mask=mask)
    return out


def unpopulated(memory: GuestMemory) -> bytearray:
    """The pages of ``memory`` not present in this process's page tables now (pagemap bit 63 clear): never
    populated, or held only by a uffd-wp marker."""
    present = int.from_bytes(pagemap_bits(memory, PM_PRESENT), "little")
    npages = memory.size // PAGE_SIZE
    return bytearray((~present & ((1 << npages) - 1)).to_bytes(len(empty_bitmap(npages)), "little"))


def make_tracker(name: str, memory: GuestMemory, vm: Vm) -> DirtyTracker:
    """The tracker by name (TRACKERS); KVM's dirty log needs ``vm``'s memslots over ``memory`` to log dirty
    pages (``Vm.map_memory(memory, flags=KVM_MEM_LOG_DIRTY_PAGES)``)."""
    if name == KVM_DIRTY_LOG:
        return KvmDirtyLog(memory, vm)
    if name == WP_ASYNC:
        return WpAsyncTracker(memory)
    if name == SOFT_DIRTY:
        return SoftDirtyTracker(memory)
    raise ValueError(f"unknown dirty-page tracker {name!r} (one of {', '.join(TRACKERS)})")


# Run in a child process: clear_refs clears the soft-dirty bits of every page of the process that writes it,
# so a probe in this one would wipe what a soft-dirty tracker running here has gathered.
_SOFT_DIRTY_PROBE = """
import ctypes, mmap, struct
m = mmap.mmap(-1, 8192)
m[0] = m[4096] = 0
page = ctypes.addressof(ctypes.c_char.from_buffer(m)) // 4096
with open("/proc/self/clear_refs", "w") as f:
    f.write("4")
m[0] = 1
with open("/proc/self/pagemap", "rb") as f:
    f.seek(page * 8)
    written, untouched = struct.unpack("<2Q", f.read(16))
print(written >> 55 & 1, untouched >> 55 & 1)
"""


def soft_dirty_absent() -> str | None:
    """None when soft-dirty bits work here; otherwise what was seen. Probed in a child process on two pages of
    its own: after clear_refs, the one written shows pagemap bit 55 and the one left alone does not. A kernel
    without CONFIG_MEM_SOFT_DIRTY takes the clear and never sets the bit."""
    import subprocess

    try:
        out = subprocess.run([sys.executable, "-c", _SOFT_DIRTY_PROBE], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the probe did not run: {e}"
    if out.returncode != 0:
        return f"the probe failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"
    written, untouched = out.stdout.split()
    if (written, untouched) == ("1", "0"):
        return None
    if written == "0":
        return ("pagemap bit 55 stays clear on a page written after clear_refs: the kernel has no soft-dirty "
                "tracking (CONFIG_MEM_SOFT_DIRTY is not set)")
    return "pagemap bit 55 is set on a page nobody wrote since clear_refs: soft-dirty bits cannot be cleared"
