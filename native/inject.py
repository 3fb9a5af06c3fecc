"""The engine's fault-injection switches: named real bugs, so every phase can be shown to fail.

Platform-neutral (imported by the pytest plugin on every host). The low byte is
the C engine's ``enum sp_inject`` (native/linux/snapproof.h; a self-test pins the
values); the rest are protocol-level switches the Python layer honours.
"""

from __future__ import annotations

import enum


class FaultInjection(enum.Flag):
    NONE = 0
    NO_COPY_BEFORE_WRITE = 1 << 0   # a fault un-protects without capturing the page
    SINGLE_FLAG_RACE = 1 << 1       # forkd's one "captured" flag, set before the copy
    HANDLER_DIES = 1 << 2           # the fault handler thread exits at its first fault
    SKIP_UNPOPULATED = 1 << 8       # arm without WP_UNPOPULATED and without pre-populating: holes go unprotected
    ARM_WHILE_RUNNING = 1 << 9      # the live protocol arms without pausing the vCPUs
    DROP_VCPU_STATE = 1 << 10       # the snapshot file is written without its vCPU state
    READ_ONLY_MAPPING = 1 << 11     # a COW load maps the snapshot file read-only (hyperlight's Windows bug)
    # The hypervisor-level COW load (native/hv_cow.py, Python side):
    HV_COW_NO_COPY = 1 << 12        # a written page is mapped writable without the file's bytes copied in: zeros
    HV_COW_DROPS_STORE = 1 << 13    # the MMIO write that made a page private is not applied: that store is lost


# The switches implemented inside the C engine (SP_INJECT_*).
C_SWITCHES = 0xFF


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
