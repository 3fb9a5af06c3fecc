"""Exit.describe() for the three ways a KVM refuses a guest write, checked without a KVM that does each.

This host's KVM shows one way, the nested kvm_amd (6.1) another; KVM_EXIT_MEMORY_FAULT needs a 6.8+
hardware KVM. The phase 4 self-test finds the signature by these words, so they are pinned here.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

from tests.test_phase4_fails_under_injected_bugs import REFUSED_WRITE_SIGNATURES

pytestmark = pytest.mark.platform("linux")

STORE_RIP = 0x1027  # counter32's region store
FIRST_WRITE = 0x11034


def refused_write(reason: str, **fields: Any) -> Any:
    from snapproof.native.kvm import Exit, ExitReason

    base: dict[str, Any] = dict(kvm_exit_reason=0, err=0, cpu=0, io_port=0, io_value=0, mmio_gpa=0, mmio_len=0,
                                mmio_is_write=False, hw_reason=0, sync_count=0, last_sync=0, debug=b"", run_ns=0,
                                kvm_runs=1)
    return Exit(reason=ExitReason[reason], **{**base, **fields})


CASES = {
    "MMIO": dict(kvm_exit_reason=6, mmio_gpa=FIRST_WRITE, mmio_len=4, mmio_is_write=True),
    "EFAULT": dict(err=errno.EFAULT, rip=STORE_RIP),
    "MEMORY_FAULT": dict(kvm_exit_reason=39, err=errno.EFAULT, rip=STORE_RIP, fault_gpa=FIRST_WRITE & ~0xFFF,
                         fault_size=0x1000, fault_flags=0),
}


@pytest.mark.parametrize("reason", CASES)
def test_each_refused_write_names_exactly_one_signature(reason):
    """Each refused-write exit is told apart from the other two by the words the phase 4 self-test looks for."""
    text = refused_write(reason, **CASES[reason]).describe()
    seen = [sig for sig in REFUSED_WRITE_SIGNATURES if sig in text]
    assert len(seen) == 1, f"{reason}: expected exactly one of {REFUSED_WRITE_SIGNATURES} in {text!r}, saw {seen}"


def test_memory_fault_names_the_gpa_range_flags_and_rip():
    text = refused_write("MEMORY_FAULT", **CASES["MEMORY_FAULT"]).describe()
    for want in ("[0x11000, 0x12000)", "flags 0x0", f"guest RIP {STORE_RIP:#x}", "errno 14 EFAULT"):
        assert want in text, f"expected {want!r} in {text!r}"


def test_efault_names_the_rip_and_says_the_gpa_is_unknown():
    text = refused_write("EFAULT", **CASES["EFAULT"]).describe()
    for want in (f"guest RIP {STORE_RIP:#x}", "GPA unknown", "KVM_EXIT_MEMORY_FAULT (6.8+"):
        assert want in text, f"expected {want!r} in {text!r}"
    assert "RIP unknown" in refused_write("EFAULT", err=errno.EFAULT).describe(), "a failed KVM_GET_REGS must say so"
