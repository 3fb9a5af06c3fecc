"""The engine's fault-injection switches: named real bugs, so every phase can be shown to fail.

Platform-neutral (imported by the pytest plugin on every host). The low byte and
the top byte of 32 bits and bit 23 (``C_SWITCHES``) are the C engine's ``enum sp_inject``
(native/linux/snapproof.h; a self-test pins the values); the rest are protocol-level switches the Python
layer honours.
"""

from __future__ import annotations

import enum

from snapproof.native.image import VcpuPart


class FaultInjection(enum.Flag):
    NONE = 0
    NO_COPY_BEFORE_WRITE = 1 << 0   # a fault un-protects without capturing the page
    SINGLE_FLAG_RACE = 1 << 1       # forkd's one "captured" flag, set before the copy
    HANDLER_DIES = 1 << 2           # the fault handler thread exits at its first fault
    # The lazy loader (native/linux/uffd_lazy.c): at the guest's first fault its handler stops and its userfaultfd
    # is closed, as a handler process that dies mid-restore drops it; the loader must fail closed, naming it.
    LAZY_UFFD_CLOSES_MID_RESTORE = 1 << 3
    LAZY_UFFD_UNGUARDED = 1 << 4    # its fail-closed guard removed (no fence, no LoaderDied): the guest reads zeros
    # Overlapping snapshots (phase 2): a fault capturing a page for one live snapshot copies it into every other live
    # one too, over the bytes an earlier snapshot froze at its own arm (mitos's epochs, done wrong).
    OVERLAP_CAPTURE_OVERWRITES = 1 << 5
    # Two races a microsecond wide, lined up on purpose by phase 2's races (native/races.py):
    UNPROTECT_DURING_CAPTURE = 1 << 6  # the copier un-protects its batch while the handler still captures a page
    WAKE_BEFORE_COPY = 1 << 7       # the handler makes the page writable, waking the writer, before its copy
    SKIP_UNPOPULATED = 1 << 8       # arm without WP_UNPOPULATED and without pre-populating: holes go unprotected
    ARM_WHILE_RUNNING = 1 << 9      # the live protocol arms without pausing the vCPUs
    DROP_VCPU_STATE = 1 << 10       # the snapshot file is written without its vCPU state
    READ_ONLY_MAPPING = 1 << 11     # a COW load maps the snapshot file read-only (hyperlight's Windows bug)
    # A restore that forgets one part of each vCPU's state (Vcpu.load_state skips it), or every vCPU's own:
    DROP_XSAVE = 1 << 12            # x87/MMX, SSE and every XSAVE component left as a fresh vCPU has them
    DROP_XCRS = 1 << 13             # XCR0 left at its reset value (x87 only)
    DROP_MSRS = 1 << 14             # no KVM_SET_MSRS: SYSENTER, TSC, PAT, ... at their reset values
    DROP_VCPU_EVENTS = 1 << 15      # pending/injected exception, interrupt shadow, NMI pending/masked lost
    DROP_MP_STATE = 1 << 16         # no KVM_SET_MP_STATE: a halted or waiting vCPU restored runnable
    DROP_DEBUGREGS = 1 << 17        # DR0-DR3, DR6, DR7 left at their reset values
    SAME_VCPU_STATE = 1 << 18       # every vCPU restored with vCPU 0's state
    # The hypervisor-level COW load (native/hv_cow.py, Python side):
    HV_COW_NO_COPY = 1 << 19        # a written page is mapped writable without the file's bytes copied in: zeros
    HV_COW_DROPS_STORE = 1 << 20    # the MMIO write that made a page private is not applied: that store is lost
    # Incremental snapshots (native/incremental.py, Python side):
    DIFF_TRUSTS_DIRTY_LOG = 1 << 21  # a diff holds only the pages its tracker names, not the VMM's own writes
    # The lazy loader into THP-backed memory keeps huge pages off (MADV_NOHUGEPAGE) while pages are missing, so
    # no collapse can fill a not-yet-restored neighbour with zeros (cloud-hypervisor #8663); this drops that.
    LAZY_UFFD_THP_UNGUARDED = 1 << 22
    # Consecutive snapshots by one engine object (phase 2): the next arm keeps the last round's captured marks, so the
    # new snapshot skips those pages and they keep whatever its destination held (C, the built-in engine).
    CONSECUTIVE_KEEPS_CAPTURED = 1 << 23
    # Performance regressions inside the C engine (the top byte: the low one is full): every snapshot stays
    # right, so the phases pass; only the release gate, judging their figures, can fail them.
    UNPROTECT_PER_PAGE = 1 << 24    # the bulk copier un-protects page by page, not a batch per ioctl
    EXTRA_COPY_PER_FAULT = 1 << 25  # a fault stages its page through a freshly mapped bounce page
    ARM_PER_PAGE = 1 << 26          # the arm protects page by page, one ioctl each
    # Overlapping snapshots (phase 2): a bulk copier un-protects its whole batch, pages another live snapshot still
    # lacks included, so writes to them land unseen by it (C, the built-in engine; in the top byte, not a slowdown).
    UNPROTECT_WHAT_OTHERS_LACK = 1 << 27
    # A pre-armed snapshot (phase 5's wp-prearmed): the arm at the instant forgets to protect again the pages written
    # since the pre-arm, so a write after the instant lands there uncaptured and the bulk copy reads it (C, the
    # built-in engine; in the top byte, not a slowdown).
    PREARM_FORGETS_WRITTEN = 1 << 28
    # A pre-armed snapshot: the handler serves a fault read before the arm as the pre-arm's (record, un-protect, no
    # capture) though the arm came before it served it: the fault in flight at the pause lands after the instant.
    PREARM_DECIDES_AT_READ = 1 << 29


# The switches implemented inside the C engine and the C lazy loader (SP_INJECT_*): the low byte, bit 23 and
# the top byte of 32 bits (the C layer's SP_INJECT_ALL is the same mask).
C_SWITCHES = 0xFF8000FF

# The switches that only make the engine slower (the gate's teeth are measured with them: results/ab.py).
PERFORMANCE = FaultInjection.UNPROTECT_PER_PAGE | FaultInjection.EXTRA_COPY_PER_FAULT | FaultInjection.ARM_PER_PAGE

# The part of a vCPU's state each DROP_* switch makes the restore skip.
DROPPED_PART = {
    FaultInjection.DROP_XSAVE: VcpuPart.XSAVE,
    FaultInjection.DROP_XCRS: VcpuPart.XCRS,
    FaultInjection.DROP_MSRS: VcpuPart.MSRS,
    FaultInjection.DROP_VCPU_EVENTS: VcpuPart.VCPU_EVENTS,
    FaultInjection.DROP_MP_STATE: VcpuPart.MP_STATE,
    FaultInjection.DROP_DEBUGREGS: VcpuPart.DEBUGREGS,
}


def dropped_parts(inject: FaultInjection) -> frozenset[VcpuPart]:
    """The vCPU state parts these switches make a restore skip."""
    return frozenset(part for switch, part in DROPPED_PART.items() if inject & switch)


def parse(text: str) -> FaultInjection:
    """``"no-copy-before-write,single-flag-race"`` -> the flags; ValueError naming an unknown switch."""
    value = FaultInjection.NONE
    for name in filter(None, text.replace("-", "_").upper().split(",")):
        if name == "NONE":
            continue
        try:
            value |= FaultInjection[name]
        except KeyError:
            raise ValueError(f"unknown fault-injection switch {name.lower().replace('_', '-')!r} "
                             f"(known: {', '.join(known_names())})") from None
    return value


def known_names() -> list[str]:
    return [m.name.lower().replace("_", "-") for m in FaultInjection if m.name and m.name != "NONE"]
