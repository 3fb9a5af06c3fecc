"""The cpustate guest's host half: parameter block, seeds and a Python model of its run.

``cpustate32`` (guests/cpustate32.S) keeps its running result in XMM0, in MM0 (the x87 register
file), in IA32_SYSENTER_EIP and in DR0-DR3, takes one NMI, and reports them all in its parameter
block at the end. ``expected_final`` computes that block, so a run resumed from a snapshot can be
compared with the model as well as with an uninterrupted run; ``expected_after`` gives the running
values after any iteration (the state at a sync point).

The host's half of the protocol: start each vCPU at ``entry`` with the vCPU's CPUID offering XSAVE
when ``xcr0`` asks for it, answer the sync (after iteration ``sync_at``) with one KVM_NMI, run to HLT.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from snapproof.guests import FLAT32_LOAD_GPA, PARAM_BLOCK_GPA, PARAM_BLOCK_STRIDE, load
from snapproof.guests.storm import _splitmix64

GUEST = "cpustate32"

# Parameter block (little-endian), shared with guests/cpustate32.S: change both and reassemble.
OFF_ITERATIONS = 0x00   # u32 iterations to run
OFF_SYNC_AT = 0x04      # u32 iteration after which the guest writes the sync port; 0 = never
OFF_XCR0 = 0x08         # u32 0 = XSAVE left off; else CR4.OSXSAVE and XCR0 = this
OFF_MSR_INIT = 0x0C     # u32 IA32_SYSENTER_EIP's first value
OFF_XMM_INIT = 0x10     # 4 x u32 XMM0's first lanes
OFF_MM_INIT = 0x20      # u64 MM0's first value
OFF_DR_INIT = 0x28      # 4 x u32 DR0-DR3
OFF_XMM = 0x40          # guest: XMM0's round trip each iteration
OFF_MM = 0x50           # guest: MM0's round trip
OFF_ITER = 0x58         # guest: last iteration done
OFF_NMIS = 0x5C         # guest: NMIs taken
OFF_NMI_AT = 0x60       # guest: iteration the last NMI came after
OFF_MSR_FINAL = 0x64    # guest at the end: SYSENTER_EIP
OFF_XMM_FINAL = 0x68    # guest at the end: XMM0
OFF_MM_FINAL = 0x78     # guest at the end: MM0
OFF_DR_FINAL = 0x80     # guest at the end: DR0-DR3
OFF_DONE = 0x90         # guest: DONE_MAGIC, last before hlt
BLOCK_SIZE = PARAM_BLOCK_STRIDE   # the rest is spare, zero

DONE_MAGIC = 0x454E4F44           # b"DONE" as a little-endian u32
MSR_SYSENTER_EIP = 0x176
XCR0_X87_SSE = 0x3                # what the guest asks for when the vCPU's CPUID offers XSAVE
STACK_TOP = 0x7000
STACK_STRIDE = 0x400
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1


def rol32(x: int, n: int) -> int:
    return ((x << n) | (x >> (32 - n))) & _U32


@dataclass(frozen=True)
class CpuStateParams:
    """One vCPU's run: what the guest reads from its parameter block."""

    iterations: int = 1000
    sync_at: int = 0
    xcr0: int = 0
    msr_init: int = 0
    xmm_init: tuple[int, int, int, int] = (0, 0, 0, 0)
    mm_init: int = 0
    dr_init: tuple[int, int, int, int] = (0, 0, 0, 0)

    def __post_init__(self) -> None:
        if not 0 <= self.iterations <= _U32:
            raise ValueError(f"iterations {self.iterations}: must fit a u32")
        if not 0 <= self.sync_at <= self.iterations:
            raise ValueError(f"sync_at {self.sync_at}: must be in [0, iterations {self.iterations}] (0 = never)")
        if self.xcr0 not in (0, XCR0_X87_SSE):
            raise ValueError(f"xcr0 {self.xcr0:#x}: 0 (XSAVE off) or {XCR0_X87_SSE:#x} (x87 | SSE)")
        words = [self.msr_init, *self.xmm_init, *self.dr_init]
        if len(self.xmm_init) != 4 or len(self.dr_init) != 4 or not all(0 <= w <= _U32 for w in words):
            raise ValueError("msr_init, xmm_init (4) and dr_init (4): u32 words")
        if not 0 <= self.mm_init <= _U64:
            raise ValueError(f"mm_init {self.mm_init:#x}: must fit a u64")

    @classmethod
    def from_seed(cls, seed: int, iterations: int, sync_at: int, xcr0: int = 0) -> CpuStateParams:
        """Seeds drawn by splitmix64 (as storm's from_seed): two vCPUs with different seeds hold different
        state in every register the guest uses."""
        state, words = seed & _U64, []
        for _ in range(6):
            state, x = _splitmix64(state)
            words += [x & _U32, x >> 32]
        return cls(iterations=iterations, sync_at=sync_at, xcr0=xcr0, msr_init=words[0],
                   xmm_init=(words[1], words[2], words[3], words[4]), mm_init=words[5] | words[6] << 32,
                   dr_init=(words[7], words[8], words[9], words[10]))

    def pack(self) -> bytes:
        """The parameter block the host writes at the vCPU's block GPA (guest words zero)."""
        block = bytearray(BLOCK_SIZE)
        struct.pack_into("<4I", block, OFF_ITERATIONS, self.iterations, self.sync_at, self.xcr0, self.msr_init)
        struct.pack_into("<4I", block, OFF_XMM_INIT, *self.xmm_init)
        struct.pack_into("<Q", block, OFF_MM_INIT, self.mm_init)
        struct.pack_into("<4I", block, OFF_DR_INIT, *self.dr_init)
        return bytes(block)

    @classmethod
    def unpack(cls, block: bytes) -> CpuStateParams:
        iterations, sync_at, xcr0, msr_init = struct.unpack_from("<4I", block, OFF_ITERATIONS)
        return cls(iterations=iterations, sync_at=sync_at, xcr0=xcr0, msr_init=msr_init,
                   xmm_init=struct.unpack_from("<4I", block, OFF_XMM_INIT),
                   mm_init=struct.unpack_from("<Q", block, OFF_MM_INIT)[0],
                   dr_init=struct.unpack_from("<4I", block, OFF_DR_INIT))


@dataclass(frozen=True)
class CpuStateValues:
    """The guest's running values after some iterations: what XMM0, MM0 and SYSENTER_EIP hold."""

    iteration: int
    xmm: tuple[int, int, int, int]
    mm: int
    msr: int


def expected_after(params: CpuStateParams, iteration: int) -> CpuStateValues:
    """XMM0's lanes, MM0 and SYSENTER_EIP after ``iteration`` iterations."""
    if not 0 <= iteration <= params.iterations:
        raise ValueError(f"iteration {iteration}: outside [0, {params.iterations}]")
    a, b, c, d = params.xmm_init
    mm, m = params.mm_init, params.msr_init
    for i in range(1, iteration + 1):
        a = rol32(a, 5) ^ ((i + m) & _U32)
        b = (b + a) & _U32
        c ^= b
        d = (d + c) & _U32
        mm = (mm + d + (i << 32)) & _U64
        m = (rol32(m, 3) + (mm & _U32)) & _U32
    return CpuStateValues(iteration, (a, b, c, d), mm, m)


@dataclass(frozen=True)
class CpuStateResult:
    """What the guest reports in its block at the end (read from memory, or as the model has it)."""

    xmm: tuple[int, int, int, int]
    mm: int
    msr: int
    dr: tuple[int, int, int, int]
    nmis: int
    nmi_at: int
    iteration: int
    done: bool

    def describe(self) -> str:
        return (f"XMM0 {' '.join(f'{w:#010x}' for w in self.xmm)}, MM0 {self.mm:#018x}, SYSENTER_EIP "
                f"{self.msr:#010x}, DR0-DR3 {' '.join(f'{w:#010x}' for w in self.dr)}, {self.nmis} NMI(s) "
                f"after iteration {self.nmi_at}, iteration {self.iteration}, {'DONE' if self.done else 'not done'}")

    def differences(self, want: CpuStateResult) -> list[str]:
        """Each field that differs from ``want``, as 'field: expected X, saw Y' in hex."""
        out = []
        for name in ("xmm", "mm", "msr", "dr", "nmis", "nmi_at", "iteration", "done"):
            seen, expected = getattr(self, name), getattr(want, name)
            if seen != expected:
                show = (lambda v: " ".join(f"{w:#x}" for w in v)) if isinstance(seen, tuple) else hex
                out.append(f"{_FIELD_NAMES[name]}: expected {show(expected)}, saw {show(seen)}")
        return out


_FIELD_NAMES = {"xmm": "XMM0", "mm": "MM0 (x87 R0)", "msr": "SYSENTER_EIP (MSR 0x176)", "dr": "DR0-DR3",
                "nmis": "NMIs taken", "nmi_at": "NMI after iteration", "iteration": "iterations done",
                "done": "DONE"}


def read_result(block: bytes) -> CpuStateResult:
    """The guest's report words in its parameter block."""
    return CpuStateResult(
        xmm=struct.unpack_from("<4I", block, OFF_XMM_FINAL), mm=struct.unpack_from("<Q", block, OFF_MM_FINAL)[0],
        msr=struct.unpack_from("<I", block, OFF_MSR_FINAL)[0], dr=struct.unpack_from("<4I", block, OFF_DR_FINAL),
        nmis=struct.unpack_from("<I", block, OFF_NMIS)[0], nmi_at=struct.unpack_from("<I", block, OFF_NMI_AT)[0],
        iteration=struct.unpack_from("<I", block, OFF_ITER)[0],
        done=struct.unpack_from("<I", block, OFF_DONE)[0] == DONE_MAGIC)


def expected_result(params: CpuStateParams) -> CpuStateResult:
    """What an uninterrupted run reports when the host answers its sync with one NMI."""
    v = expected_after(params, params.iterations)
    return CpuStateResult(xmm=v.xmm, mm=v.mm, msr=v.msr, dr=params.dr_init, nmis=1 if params.sync_at else 0,
                          nmi_at=params.sync_at, iteration=params.iterations, done=True)


def expected_block(params: CpuStateParams) -> bytes:
    """The whole parameter block at HLT: the inputs, the last round-trip values and the report."""
    v = expected_after(params, params.iterations)
    r = expected_result(params)
    block = bytearray(params.pack())
    if params.iterations:
        struct.pack_into("<4I", block, OFF_XMM, *v.xmm)
        struct.pack_into("<Q", block, OFF_MM, v.mm)
    struct.pack_into("<3I", block, OFF_ITER, params.iterations, r.nmis, r.nmi_at)
    struct.pack_into("<I", block, OFF_MSR_FINAL, r.msr)
    struct.pack_into("<4I", block, OFF_XMM_FINAL, *r.xmm)
    struct.pack_into("<Q", block, OFF_MM_FINAL, r.mm)
    struct.pack_into("<4I", block, OFF_DR_FINAL, *r.dr)
    struct.pack_into("<I", block, OFF_DONE, DONE_MAGIC)
    return bytes(block)


def block_gpa(index: int) -> int:
    return PARAM_BLOCK_GPA + PARAM_BLOCK_STRIDE * index


def halt_eip() -> int:
    """EIP after the guest's final hlt: cpustate32 ends with ``halt: hlt; jmp halt`` (F4 EB FD)."""
    code = load(GUEST)
    if code[-3:] != b"\xf4\xeb\xfd":
        raise ValueError(f"{GUEST}.bin does not end with hlt; jmp .-1 (ends {code[-3:].hex(' ')})")
    return FLAT32_LOAD_GPA + len(code) - 2


def load_into(memory: Any, params: list[CpuStateParams]) -> None:
    """The code at 0x1000 and vCPU i's parameter block at 0x8000 + 0x100*i, in ``memory`` (GuestMemory)."""
    memory.write(FLAT32_LOAD_GPA, load(GUEST))
    for i, p in enumerate(params):
        memory.write(block_gpa(i), p.pack())


def entry(vcpu: Any, index: int, params: CpuStateParams) -> None:
    """vCPU ``index`` at the entry (docs/CONTRACTS.md): flat 32-bit at 0x1000, its block in ESI, its stack.

    With ``params.xcr0`` the VMM sets XCR0 too, as the guest will: under QEMU TCG's emulated SVM the
    guest's own XSETBV never reaches KVM (seen on kvm_amd nested there: the vCPU's XCR0 stayed 0x1 after
    the guest set 0x3), and what the proof needs is an XCR0 other than the reset value in the vCPU's
    state, whoever set it. On hardware the guest's XSETBV then writes the same value again.
    """
    from snapproof.native.image import VcpuPart

    vcpu.set_flat32(eip=FLAT32_LOAD_GPA, esp=STACK_TOP - STACK_STRIDE * index, esi=block_gpa(index))
    if params.xcr0:
        vcpu.set_part(VcpuPart.XCRS, kvm_xcrs(params.xcr0))


def kvm_xcrs(xcr0: int) -> bytes:
    """struct kvm_xcrs holding XCR0 alone: nr_xcrs 1, flags 0, {xcr 0, value}, the rest zero (392 bytes)."""
    blob = bytearray(392)
    struct.pack_into("<II", blob, 0, 1, 0)
    struct.pack_into("<IIQ", blob, 8, 0, 0, xcr0)
    return bytes(blob)


def cpuid_offers_xsave(cpuid: bytes) -> bool:
    """Whether a struct kvm_cpuid2 (with entries) has CPUID.1:ECX.XSAVE[bit 26]: the guest may set OSXSAVE."""
    nent = struct.unpack_from("<I", cpuid)[0]
    for k in range(nent):
        function, index, _flags, _eax, _ebx, ecx, _edx = struct.unpack_from("<7I", cpuid, 8 + 40 * k)
        if function == 1 and index == 0:
            return bool(ecx >> 26 & 1)
    return False
