"""The engine's fault-injection switches: named real bugs, so every phase can be shown to fail.

Platform-neutral (imported by the pytest plugin on every host). The low byte is
the C engine's ``enum sp_inject`` (native/linux/snapproof.h; a self-test pins the
values); the rest are protocol-level switches the Python layer honours.
"""

from __future__ import annotations

import enum

from native.image import VcpuPart


class FaultInjection(enum.Flag):
    NONE = 0
    NO_COPY_BEFORE_WRITE = 1 << 0   # a fault un-protects without capturing the page
    SINGLE_FLAG_RACE = 1 << 1       # forkd's one "captured" flag, set before the copy
    HANDLER_DIES = 1 << 2           # the fault handler thread exits at its first fault
    # Performance regressions: every snapshot stays right, so the phases pass; the release gate must fail them.
    UNPROTECT_PER_PAGE = 1 << 3     # the bulk copier un-protects page by page, not a batch per ioctl
    EXTRA_COPY_PER_FAULT = 1 << 4   # a fault stages its page through a freshly mapped bounce page
    ARM_PER_PAGE = 1 << 5           # the arm protects page by page, one ioctl each
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


# The switches implemented inside the C engine (SP_INJECT_*).
C_SWITCHES = 0xFF

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
