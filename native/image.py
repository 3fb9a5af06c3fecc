"""The snapproof snapshot file: one header page, the raw dense memory image, then the vCPU states.

Layout of a file (all integers little-endian)::

    0x0000                        header page (4096 bytes, table below)
    0x1000                        memory image: memory_size bytes, guest physical address 0 first
    0x1000 + memory_size          vCPU section: vcpu_size bytes of vCPU records (below)

The memory image starts on a page boundary, so a backend can map it directly
(Linux ``mmap(MAP_PRIVATE)``, Windows ``FILE_MAP_COPY``), and the bytes from
4096 for memory_size are a plain raw memory file. The file is exactly
``memory_offset + memory_size + vcpu_size`` bytes long.

Format versions. 3 (written now): the content hash is blake3, which a capture
computes while it copies (below). 2: the same layout with a sha256 content
hash; version 2 files load and verify as before. Version 2 moved the vCPU
states out of the header page: a whole x86 vCPU state (XSAVE alone is 4096
bytes or more) does not fit a page. Version 1 files (regs + sregs + FPU only,
in the header) are refused, naming the versions read: their vCPU state is too
little to resume a guest correctly.

The content hash is of the memory_size bytes of the memory image, in address
order, nothing else: for hash_algo 2 the BLAKE3 hash (unkeyed, the default
32-byte output), for hash_algo 1 sha256. A verifier needs no snapproof code::

    dd if=FILE bs=4096 skip=1 count=$((memory_size / 4096)) status=none | b3sum

Each format version has one algorithm (HASH_ALGO_OF_VERSION); a header whose
hash_algo is another is refused.

Header page::

    offset  size  field               meaning
    ------  ----  ------------------  ------------------------------------------------
    0x000      8  magic               b"SNAPPROF"
    0x008      4  format_version      3 (2 still read)
    0x00c      4  header_size         4096
    0x010      4  arch                Arch: 1 = x86_64
    0x014      4  page_size           4096
    0x018      8  memory_offset       4096 (the memory image follows the header page)
    0x020      8  memory_size         bytes of memory image; > 0, a multiple of page_size
    0x028      4  flags               bit 0 COMPLETE: the capture finished; other bits 0
    0x02c      4  hash_algo           HashAlgo: 2 = blake3 (version 3), 1 = sha256 (version 2)
    0x030     16  hypervisor          ASCII tag, NUL-padded: "kvm" or "whp"
    0x040     32  content_hash        hash_algo's hash of the memory image
    0x060      4  vcpu_count          number of vCPU records in the vCPU section
    0x064      4  vcpu_state_version  1: the layout of a KVM x86 vCPU state (below)
    0x068      8  vcpu_offset         memory_offset + memory_size: the section follows the image
    0x070      8  vcpu_size           bytes of the vCPU section, a multiple of 8
    0x078     32  vcpu_hash           sha256 of the vCPU section
    0x098   3912  reserved            zero
    0xfe0     32  header_checksum     sha256 of the header page with this field zeroed

The header checksum covers vcpu_hash, so one chain of hashes covers every
byte of vCPU state; the section is small and always checked on open.

A vCPU record, 8-byte aligned in the vCPU section, one per vCPU in vCPU-index order::

    +0  4  kind    VcpuKind: 1 = KVM x86 (parts, below), 2 = WHP x86 (opaque, native/whp.py)
    +4  4  length  bytes of state that follow
    +8     state   then zero padding to the next multiple of 8

A KVM x86 state (vcpu_state_version 1) is self-describing: a sequence of
parts, each 8-byte aligned::

    +0  4  part    VcpuPart id: what the bytes are (table below)
    +4  4  length  bytes of the part that follow
    +8     bytes   the kernel's struct for that part, then zero padding to a multiple of 8

    id  part         bytes                                            KVM ioctls
    --  -----------  -----------------------------------------------  ----------------------------
     1  regs         struct kvm_regs, 144                             KVM_GET/SET_REGS
     2  sregs        struct kvm_sregs, 312                            KVM_GET/SET_SREGS
     3  xsave        struct kvm_xsave: KVM_CAP_XSAVE2 bytes, >= 4096  KVM_GET_XSAVE(2)/SET_XSAVE
     4  xcrs         struct kvm_xcrs, 392 (only with KVM_CAP_XCRS)    KVM_GET/SET_XCRS
     5  msrs         struct kvm_msr_entry[n], 16 each                 KVM_GET/SET_MSRS
     6  vcpu_events  struct kvm_vcpu_events, 64                       KVM_GET/SET_VCPU_EVENTS
     7  mp_state     struct kvm_mp_state, 4                           KVM_GET/SET_MP_STATE
     8  debugregs    struct kvm_debugregs, 128                        KVM_GET/SET_DEBUGREGS
     9  cpuid        struct kvm_cpuid2 + nent kvm_cpuid_entry2, 8+40n KVM_GET/SET_CPUID2

Every part but xcrs is required, each at most once; which MSRs, the save and
restore order and the kernel-side rules live in native/kvm.py.

Writing: ``SnapshotImage.create()`` sizes the file, writes a header with COMPLETE
clear, and maps the memory region for the capture engine to fill. A writer
that knows when a prefix of the image is final says so (``mark_final(end)``,
as the capture does after each piece of its bulk copy): a thread of the
writer hashes that prefix right away, while its bytes are still in the CPU's
cache, unmaps it and starts its writeback (sync_file_range on Linux), so the
image is read once, by the hash, and the last sync has little left to write. At
``finalize()`` whatever was never marked final is hashed from the file (holes
unread). A writer that writes from anonymous memory (``create(way=ImageWay.PWRITE
or DIRECT)``, Linux) gives the engine that memory instead, and a second thread
writes each final prefix to the file (pwrite into the page cache, or O_DIRECT)
as the hash reads it; what was never marked final is written and hashed at
``finalize()``. Then the vCPU section is appended, the image and the section are
synced, and only then the header is written with COMPLETE set and synced. A
capture that is aborted, raises, or dies leaves the file in place, marked
incomplete; ``SnapshotImage.open()`` refuses it. (Deleting on abort was the
alternative; it would make an abort and a crash leave different files.)

Reading: ``SnapshotImage.open()`` trusts no header field. It checks, in order,
magic, format_version, header_size, flags (COMPLETE), arch, page_size,
memory_offset, hash_algo, hypervisor, reserved, memory_size and vcpu_size
against the file length, vcpu_offset, vcpu_state_version, the header checksum,
then reads the vCPU section and checks vcpu_hash, the vCPU records and every
part of each KVM x86 state, and, on a verified load, the content hash. Each
failure raises ``SnapshotFormatError`` naming the field (``vcpu[1].msrs.length``
for a part), what was expected and what was seen. No allocation depends on a
header value before that value has been checked against the file length.

``python -m snapproof.native.image info FILE`` prints a header in plain words.

Pure Python on purpose: the format is shared by the KVM and WHP backends and
must import on Windows.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import errno
import functools
import hashlib
import mmap
import os
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn, Protocol

import blake3

MAGIC = b"SNAPPROF"
# 3: the content hash is blake3 (hashed while the capture copies); 2 (sha256) is still read.
FORMAT_VERSION = 3
# The layout of a KVM x86 vCPU state (the parts below); bumped when a part's meaning changes.
VCPU_STATE_VERSION = 1
HEADER_SIZE = 4096
PAGE_SIZE = 4096
MEMORY_OFFSET = HEADER_SIZE
FLAG_COMPLETE = 0x1
KNOWN_FLAGS = FLAG_COMPLETE
HYPERVISORS = ("kvm", "whp")

# name -> (offset, struct format). The single source of the layout: packing,
# parsing, the tripwires and the tests' corruption helper all read it.
FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0x000, "8s"),
    "format_version": (0x008, "<I"),
    "header_size": (0x00C, "<I"),
    "arch": (0x010, "<I"),
    "page_size": (0x014, "<I"),
    "memory_offset": (0x018, "<Q"),
    "memory_size": (0x020, "<Q"),
    "flags": (0x028, "<I"),
    "hash_algo": (0x02C, "<I"),
    "hypervisor": (0x030, "16s"),
    "content_hash": (0x040, "32s"),
    "vcpu_count": (0x060, "<I"),
    "vcpu_state_version": (0x064, "<I"),
    "vcpu_offset": (0x068, "<Q"),
    "vcpu_size": (0x070, "<Q"),
    "vcpu_hash": (0x078, "32s"),
    "reserved": (0x098, "3912s"),
    "header_checksum": (0xFE0, "32s"),
}
VCPU_RECORD_HEAD = struct.Struct("<II")  # kind, length
PART_HEAD = struct.Struct("<II")         # part id, length
# A bound on the vCPU section read into memory on open: 1024 vCPUs of about 20 KiB each fit.
VCPU_SECTION_MAX = 64 << 20
EMPTY_SHA256 = hashlib.sha256(b"").digest()
CHECKSUM_OFFSET, _ = FIELDS["header_checksum"]
CHECKSUM_SIZE = 32

# Verification and finalize hash the image through a buffer of this size, so
# memory use stays flat however large the image is.
_HASH_CHUNK = 1 << 20


class Arch(enum.IntEnum):
    X86_64 = 1


class HashAlgo(enum.IntEnum):
    SHA256 = 1
    BLAKE3 = 2


# The format versions this loader reads, each with its one content hash algorithm; the writer writes the last.
HASH_ALGO_OF_VERSION = {2: HashAlgo.SHA256, FORMAT_VERSION: HashAlgo.BLAKE3}


class ContentHasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...

    def digest(self) -> bytes: ...


def content_hasher(algo: HashAlgo) -> ContentHasher:
    """A fresh hasher of ``algo`` (hashlib's interface), single-threaded: the capture's copier has the other CPU."""
    if algo is HashAlgo.BLAKE3:
        return blake3.blake3()
    return hashlib.sha256()


class VcpuKind(enum.IntEnum):
    KVM_X86 = 1  # parts (VcpuPart), vcpu_state_version 1 (native/kvm.py)
    WHP_X86 = 2  # WHP register block, opaque (native/whp.py)


class VcpuPart(enum.IntEnum):
    """A part of a KVM x86 vCPU state: its id in the file, and the C layer's enum sp_vcpu_part."""

    REGS = 1
    SREGS = 2
    XSAVE = 3
    XCRS = 4
    MSRS = 5
    VCPU_EVENTS = 6
    MP_STATE = 7
    DEBUGREGS = 8
    CPUID = 9

    @property
    def label(self) -> str:
        return self.name.lower()


# The kernel's x86_64 UAPI structs (stable ABI); native/linux/vcpu_state.c asserts the same sizes.
FIXED_PART_SIZES = {
    VcpuPart.REGS: 144,         # struct kvm_regs
    VcpuPart.SREGS: 312,        # struct kvm_sregs
    VcpuPart.XCRS: 392,         # struct kvm_xcrs
    VcpuPart.VCPU_EVENTS: 64,   # struct kvm_vcpu_events
    VcpuPart.MP_STATE: 4,       # struct kvm_mp_state
    VcpuPart.DEBUGREGS: 128,    # struct kvm_debugregs
}
XSAVE_MIN_SIZE = 4096                  # struct kvm_xsave; KVM_CAP_XSAVE2 can ask for more
MSR_ENTRY = struct.Struct("<IIQ")      # struct kvm_msr_entry: index, reserved, data
CPUID_HEAD = struct.Struct("<II")      # struct kvm_cpuid2: nent, padding
CPUID_ENTRY_SIZE = 40                  # struct kvm_cpuid_entry2
# KVM_GET_XCRS needs KVM_CAP_XCRS (a host CPU with XSAVE); every other part is in every state.
OPTIONAL_PARTS = frozenset({VcpuPart.XCRS})
REQUIRED_PARTS = tuple(p for p in VcpuPart if p not in OPTIONAL_PARTS)


# The kind a writer tags vCPU states with unless told otherwise.
DEFAULT_VCPU_KIND = {"kvm": VcpuKind.KVM_X86, "whp": VcpuKind.WHP_X86}


class SnapshotFormatError(ValueError):
    """A snapshot file failed a check; the message names the field, the
    expectation and what the file holds."""

    def __init__(self, field: str, expected: str, seen: str, path: str | os.PathLike | None = None,
                 prefix: str = "snapshot header"):
        self.field, self.expected, self.seen = field, expected, seen
        self.path = os.fspath(path) if path is not None else None
        where = f" ({self.path})" if self.path else ""
        super().__init__(f"{prefix}: {field}: expected {expected}, saw {seen}{where}")


def _hex(n: int) -> str:
    return f"{n:#x}"


def _values(enum_cls: type[enum.IntEnum]) -> set[int]:
    return {int(m) for m in enum_cls}


def _enum_name(enum_cls: type[enum.IntEnum], value: int) -> str:
    try:
        return f"{value} ({enum_cls(value).name.lower()})"
    except ValueError:
        return f"{value} (unknown)"


def _get(header: bytes, name: str):
    offset, fmt = FIELDS[name]
    return struct.unpack_from(fmt, header, offset)[0]


def _put(header: bytearray, name: str, value) -> None:
    offset, fmt = FIELDS[name]
    struct.pack_into(fmt, header, offset, value)


def header_checksum(header: bytes) -> bytes:
    """sha256 of a header page with its checksum field taken as zero."""
    if len(header) != HEADER_SIZE:
        raise ValueError(f"header_checksum: expected {HEADER_SIZE} bytes, got {len(header)}")
    h = hashlib.sha256(header[:CHECKSUM_OFFSET])
    h.update(bytes(CHECKSUM_SIZE))
    h.update(header[CHECKSUM_OFFSET + CHECKSUM_SIZE:])
    return h.digest()


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def _label(part: int) -> str:
    try:
        return VcpuPart(part).label
    except ValueError:
        return f"part {part}"


def pack_kvm_x86_state(parts: Mapping[VcpuPart, bytes]) -> bytes:
    """A KVM x86 vCPU state from its parts, in the mapping's order (each part's bytes as KVM gave them)."""
    out = bytearray()
    for part, data in parts.items():
        VcpuPart(part)  # ValueError on an unknown part
        out += PART_HEAD.pack(int(part), len(data)) + bytes(data)
        out += bytes(_pad8(len(out)) - len(out))
    return bytes(out)


def split_kvm_x86_state(state: bytes, where: str = "vCPU state", path: str | os.PathLike | None = None,
                        prefix: str = "vCPU state") -> dict[VcpuPart, bytes]:
    """The parts of a KVM x86 vCPU state, in their order in it. Trusts nothing: a bad part header,
    size, padding, a repeated or missing part raises SnapshotFormatError naming ``where.<part>``."""
    def fail(field: str, expected: str, seen: str) -> NoReturn:
        raise SnapshotFormatError(field, expected, seen, path, prefix)

    parts: dict[VcpuPart, bytes] = {}
    pos, j = 0, 0
    while pos < len(state):
        if pos + PART_HEAD.size > len(state):
            fail(f"{where}.part[{j}]", f"a {PART_HEAD.size}-byte part header at state offset {pos:#x}",
                 f"the state end at {len(state):#x}")
        ident, size = PART_HEAD.unpack_from(state, pos)
        if ident not in _values(VcpuPart):
            fail(f"{where}.part[{j}].id", ", ".join(f"{int(p)} ({p.label})" for p in VcpuPart), f"{ident}")
        part = VcpuPart(ident)
        name = f"{where}.{part.label}"
        if part in parts:
            fail(name, "once", f"it again as part[{j}] at state offset {pos:#x}")
        start = pos + PART_HEAD.size
        if size > len(state) - start:
            fail(f"{name}.length", f"at most {len(state) - start} (what is left of the state)", str(size))
        data = state[start:start + size]
        if part in FIXED_PART_SIZES and size != FIXED_PART_SIZES[part]:
            fail(f"{name}.length", f"{FIXED_PART_SIZES[part]} (the kernel struct)", str(size))
        if part is VcpuPart.XSAVE and (size < XSAVE_MIN_SIZE or size % 4):
            fail(f"{name}.length", f"a multiple of 4, at least {XSAVE_MIN_SIZE} (struct kvm_xsave)", str(size))
        if part is VcpuPart.MSRS and size % MSR_ENTRY.size:
            fail(f"{name}.length", f"a multiple of {MSR_ENTRY.size} (struct kvm_msr_entry)", str(size))
        if part is VcpuPart.CPUID:
            if size < CPUID_HEAD.size:
                fail(f"{name}.length", f"at least {CPUID_HEAD.size} (struct kvm_cpuid2)", str(size))
            nent = CPUID_HEAD.unpack_from(data)[0]
            if CPUID_HEAD.size + nent * CPUID_ENTRY_SIZE != size:
                fail(f"{name}.nent", f"{(size - CPUID_HEAD.size) / CPUID_ENTRY_SIZE:g} (length {size} = "
                     f"{CPUID_HEAD.size} + {CPUID_ENTRY_SIZE} * nent)", str(nent))
        end = start + size
        pos = min(_pad8(end), len(state))
        if any(state[end:pos]):
            fail(f"{name} padding", "zero", bytes(state[end:pos]).hex())
        parts[part] = bytes(data)
        j += 1
    missing = [p.label for p in REQUIRED_PARTS if p not in parts]
    if missing:
        fail(where, "parts " + ", ".join(p.label for p in REQUIRED_PARTS), "no " + ", ".join(missing))
    return parts


def msr_entries(msrs: bytes) -> dict[int, int]:
    """A msrs part as {index: value}."""
    return {index: value for index, _, value in MSR_ENTRY.iter_unpack(msrs)}


# Where the fields a reader looks for sit in each part (x86_64 UAPI, <asm/kvm.h>): (offset, size, name).
_REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
              "r14", "r15", "rip", "rflags")
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_PART_FIELDS: dict[VcpuPart, list[tuple[int, int, str]]] = {
    VcpuPart.REGS: [(8 * i, 8, name) for i, name in enumerate(_REG_NAMES)],
    VcpuPart.SREGS: [(24 * i, 24, name) for i, name in enumerate(_SEGMENTS)] + [
        (192, 16, "gdt"), (208, 16, "idt"), (224, 8, "cr0"), (232, 8, "cr2"), (240, 8, "cr3"), (248, 8, "cr4"),
        (256, 8, "cr8"), (264, 8, "efer"), (272, 8, "apic_base"), (280, 32, "interrupt_bitmap")],
    VcpuPart.XSAVE: [(0, 2, "FCW"), (2, 2, "FSW"), (4, 1, "FTW"), (6, 2, "FOP"), (8, 8, "FIP"), (16, 8, "FDP"),
                     (24, 4, "MXCSR"), (28, 4, "MXCSR_MASK")]
                    + [(32 + 16 * k, 16, f"ST{k}/MM{k}") for k in range(8)]
                    + [(160 + 16 * k, 16, f"XMM{k}") for k in range(16)]
                    + [(512, 8, "XSTATE_BV"), (520, 8, "XCOMP_BV")],
    VcpuPart.XCRS: [(0, 4, "nr_xcrs"), (4, 4, "flags")] + [field for k in range(16) for field in
                                                          ((8 + 16 * k, 8, f"xcrs[{k}].xcr"),
                                                           (16 + 16 * k, 8, f"xcrs[{k}].value"))],
    VcpuPart.VCPU_EVENTS: [(0, 1, "exception.injected"), (1, 1, "exception.nr"), (2, 1, "exception.has_error_code"),
                           (3, 1, "exception.pending"), (4, 4, "exception.error_code"), (8, 1, "interrupt.injected"),
                           (9, 1, "interrupt.nr"), (10, 1, "interrupt.soft"), (11, 1, "interrupt.shadow"),
                           (12, 1, "nmi.injected"), (13, 1, "nmi.pending"), (14, 1, "nmi.masked"),
                           (16, 4, "sipi_vector"), (20, 4, "flags"), (24, 1, "smi.smm"), (25, 1, "smi.pending"),
                           (26, 1, "smi.smm_inside_nmi"), (27, 1, "smi.latched_init"), (28, 1, "triple_fault.pending"),
                           (55, 1, "exception_has_payload"), (56, 8, "exception_payload")],
    VcpuPart.MP_STATE: [(0, 4, "mp_state")],
    VcpuPart.DEBUGREGS: [(0, 8, "DR0"), (8, 8, "DR1"), (16, 8, "DR2"), (24, 8, "DR3"), (32, 8, "DR6"),
                         (40, 8, "DR7"), (48, 8, "flags")],
}


def part_field(part: VcpuPart, data: bytes, name: str) -> int:
    """A named field of a part (``part_field(VcpuPart.XSAVE, xsave, "XMM0")``), little-endian."""
    for start, size, field in _PART_FIELDS.get(part, []):
        if field == name:
            return int.from_bytes(data[start:start + size], "little")
    raise KeyError(f"{part.label} has no field {name!r}")


def _field_at(part: VcpuPart, offset: int) -> tuple[int, int, str]:
    for start, size, name in _PART_FIELDS.get(part, []):
        if start <= offset < start + size:
            return start, size, name
    return offset, 1, f"byte {offset:#x}"


def describe_part_difference(part: VcpuPart, want: bytes, seen: bytes,
                             ignore_msrs: Iterable[int] = ()) -> str | None:
    """Where ``seen`` differs from ``want`` (two versions of one part), naming the field and both values in
    hex; None when they agree (MSRs in ``ignore_msrs`` not compared)."""
    if part is VcpuPart.MSRS:
        a, b, skip = msr_entries(want), msr_entries(seen), set(ignore_msrs)
        diffs = [f"MSR {i:#x} expected {a[i]:#x}, saw {b[i]:#x}" if i in b else f"MSR {i:#x} expected "
                 f"{a[i]:#x}, missing" for i in a if i not in skip and a[i] != b.get(i)]
        diffs += [f"MSR {i:#x} not expected, saw {b[i]:#x}" for i in b if i not in a and i not in skip]
        return "; ".join(diffs) or None
    if want == seen:
        return None
    if len(want) != len(seen):
        return f"{len(seen)} bytes, expected {len(want)}"
    first = next(i for i, (x, y) in enumerate(zip(want, seen, strict=True)) if x != y)
    count = sum(x != y for x, y in zip(want, seen, strict=True))
    start, size, name = _field_at(part, first)
    width = 2 * size + 2
    was, now = (int.from_bytes(b[start:start + size], "little") for b in (want, seen))
    return f"{name} expected {was:#0{width}x}, saw {now:#0{width}x} ({count} byte(s) differ from offset {first:#x})"


def pack_vcpu_section(states: Sequence[bytes], kinds: Sequence[int]) -> bytes:
    """The vCPU section for these states: one record each, in order. A KVM x86 state is checked part by
    part first (SnapshotFormatError, a ValueError, naming it), so no file is sealed with one the loader refuses."""
    section = bytearray()
    for i, (state, kind) in enumerate(zip(states, kinds, strict=True)):
        if VcpuKind(kind) is VcpuKind.KVM_X86:  # ValueError on an unknown kind
            split_kvm_x86_state(state, f"vcpu[{i}]")
        if len(state) > 0xFFFFFFFF:
            raise ValueError(f"a vCPU state of {len(state)} bytes does not fit a record's u32 length")
        section += VCPU_RECORD_HEAD.pack(int(kind), len(state)) + bytes(state)
        section += bytes(_pad8(len(section)) - len(section))
    if len(section) > VCPU_SECTION_MAX:
        raise ValueError(f"vCPU states: {len(section)} bytes, more than the loader reads ({VCPU_SECTION_MAX})")
    return bytes(section)


def pack_header(*, memory_size: int, arch: int, hypervisor: str, complete: bool,
                content_hash: bytes = bytes(32), vcpu_states: Sequence[bytes] = (),
                vcpu_kinds: Sequence[int] = ()) -> bytes:
    """A header page for these values, checksum included; the vCPU section it describes is
    ``pack_vcpu_section(vcpu_states, vcpu_kinds)``, written right after the memory image."""
    section = pack_vcpu_section(vcpu_states, vcpu_kinds)
    header = bytearray(HEADER_SIZE)
    _put(header, "magic", MAGIC)
    _put(header, "format_version", FORMAT_VERSION)
    _put(header, "header_size", HEADER_SIZE)
    _put(header, "arch", int(arch))
    _put(header, "page_size", PAGE_SIZE)
    _put(header, "memory_offset", MEMORY_OFFSET)
    _put(header, "memory_size", memory_size)
    _put(header, "flags", FLAG_COMPLETE if complete else 0)
    _put(header, "hash_algo", HASH_ALGO_OF_VERSION[FORMAT_VERSION])
    _put(header, "hypervisor", hypervisor.encode("ascii"))
    _put(header, "content_hash", content_hash)
    _put(header, "vcpu_count", len(vcpu_states))
    _put(header, "vcpu_state_version", VCPU_STATE_VERSION)
    _put(header, "vcpu_offset", MEMORY_OFFSET + memory_size)
    _put(header, "vcpu_size", len(section))
    _put(header, "vcpu_hash", hashlib.sha256(section).digest())
    _put(header, "header_checksum", header_checksum(bytes(header)))
    return bytes(header)


def _check_create_args(memory_size: int, arch, hypervisor: str) -> Arch:
    if not isinstance(memory_size, int) or memory_size <= 0 or memory_size % PAGE_SIZE:
        raise ValueError(f"memory_size: expected a positive multiple of {PAGE_SIZE:#x}, got {memory_size!r}")
    if hypervisor not in HYPERVISORS:
        raise ValueError(f"hypervisor: expected one of {HYPERVISORS}, got {hypervisor!r}")
    if isinstance(arch, str):
        try:
            return Arch[arch.upper()]
        except KeyError:
            names = [a.name.lower() for a in Arch]
            raise ValueError(f"arch: expected one of {names}, got {arch!r}") from None
    return Arch(arch)


_ZEROS = bytes(64 << 10)  # what a hole reads as, hashed in blocks; made once, not per call


def _hash_file_range(f, offset: int, size: int, h: ContentHasher,
                     progress: Callable[[int], None] | None = None) -> None:
    """Feed size bytes at offset to ``h``, read through one fixed-size buffer; ``progress`` is called with the
    bytes hashed after each buffer (a report's progress on a GiB image).

    Holes (SEEK_HOLE, where the platform has it) hash as the zeros they read as, without being read:
    a sparse image's untouched pages cost neither I/O nor page cache."""
    buf = bytearray(min(_HASH_CHUNK, size))
    view = memoryview(buf)
    zeros = memoryview(_ZEROS)  # sliced without a copy
    end = offset + size
    pos = offset
    try:
        for data_start, data_end in data_extents(f.fileno(), offset, end):
            while pos < data_start:  # a hole
                n = min(len(zeros), data_start - pos)
                h.update(zeros[:n])
                pos += n
                if progress is not None:
                    progress(n)
            f.seek(pos)
            while pos < data_end:
                n = f.readinto(view[:min(data_end - pos, len(buf))])
                if not n:
                    raise SnapshotFormatError("memory_size", f"{_hex(size)} bytes of memory image",
                                              f"the file end {_hex(pos - offset)} bytes in (file shrank)",
                                              getattr(f, "name", None), prefix="snapshot file truncated")
                h.update(view[:n])
                pos += n
                if progress is not None:
                    progress(n)
    finally:
        view.release()


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """[start, end) as data extents; everything between them is a hole. One extent where SEEK_DATA is missing."""
    seek_data, seek_hole = getattr(os, "SEEK_DATA", None), getattr(os, "SEEK_HOLE", None)
    if seek_data is None or seek_hole is None:
        yield start, end
        return
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, seek_data)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                yield end, end
                return
            yield pos, end  # the filesystem cannot tell: read it all
            return
        if data >= end:
            yield end, end
            return
        hole = min(os.lseek(fd, data, seek_hole), end)
        yield data, hole
        pos = hole


# How much of the image the hashing thread hashes and writes back at a time: small enough that the bytes a
# capture just copied are still in the CPU's cache, large enough that the calls cost nothing beside the bytes.
_HASH_STEP = 4 << 20
# How much of the image the writing thread writes from anonymous memory in one pwrite: the hash's step or more
# keeps the device busy without waiting on the hash (8 MiB O_DIRECT pieces: 1 GiB in 0.30-0.36 s here, beside the
# hash on the other thread).
_WRITE_STEP = 8 << 20
# An image this small gets no threads: the thread that marks it final hashes (and writes) it there and then. Two
# threads' start and hand-overs cost more than their overlap saves below about 2 MiB (1 MiB here, hashed with blake3
# and pwritten into the page cache: 0.33-0.38 ms on the caller, 0.53-0.68 ms on two threads; 2 MiB 0.63-0.74 ms
# either way), and a capture copies such an image in one piece (``native.capture.COPY_PIECE``), so no copy is left
# to overlap. Done at the mark, not at finalize, its writeback still runs beside the engine's finalize.
_ON_CALLER_UP_TO = 2 << 20
# sync_file_range(2)'s flag: start writing back the range's dirty pages, do not wait for it.
_SYNC_FILE_RANGE_WRITE = 2
# A bound on finalize's wait for the hashing thread: generous for a loaded host hashing at 20 MB/s.
_HASH_WAIT_BASE_S = 60.0
_HASH_WAIT_BYTES_PER_S = 20e6


@functools.cache
def _sync_file_range() -> Callable[..., int] | None:
    """libc's sync_file_range (Linux; ctypes releases the GIL around it), looked up once; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    call = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if call is not None:
        call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        call.restype = ctypes.c_int
    return call


def _writeback_starter(fd: int, mapping: mmap.mmap) -> Callable[[int, int], None] | None:
    """``start(offset, size)``: drop ``mapping``'s page table entries for the range (the file's pages stay in the
    page cache, dirty), then sync_file_range(SYNC_FILE_RANGE_WRITE), which queues the range's dirty pages for
    writeback without waiting for it; None where the platform has no such call (the final sync does it all).

    Writing back a page that is still mapped first write-protects its page table entry, and each such change
    flushes the TLB of every CPU running this process: a vCPU thread running its guest among them. Dropping
    the whole range's entries first costs one flush. Measured on kvm_pvm, 256 MiB in 2 MiB ranges with a
    guest running: 850-1100 ms mapped, 140-190 ms dropped first (28-98 ms and 64-89 ms with the guest stopped).
    On hardware KVM each flush is an IPI that takes the vCPU out of guest mode; its cost there was never timed
    (the nested kvm_amd run proves this path correct, not fast).
    ``mapping`` maps the file from offset 0 and outlives every call (the writer joins its thread first)."""
    if not sys.platform.startswith("linux") or _sync_file_range() is None:  # madvise and sync_file_range: Linux's
        return None

    def start(offset: int, size: int) -> None:
        first = offset - offset % mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, first, offset + size - first)  # a shared file mapping: no data lost
        start_writeback(fd, offset, size)

    return start


def start_writeback(fd: int, offset: int, size: int) -> None:
    """Queue the dirty page cache pages of ``fd``'s range for writeback without waiting for it
    (sync_file_range(SYNC_FILE_RANGE_WRITE)); nothing where the platform has no such call (a final sync writes it)."""
    call = _sync_file_range()
    if call is None:
        return
    if call(fd, offset, size, _SYNC_FILE_RANGE_WRITE) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"sync_file_range(offset {offset:#x}, size {size:#x}, SYNC_FILE_RANGE_WRITE): "
                           f"{os.strerror(err)}")


class ImageWay(enum.Enum):
    """How a writer's memory image reaches its file (``SnapshotWriter``)."""

    MAPPING = "mapping"  # the file's shared mapping (its page cache), each piece written back after its hash
    PWRITE = "pwrite"    # anonymous memory; a thread pwrites each final piece into the page cache, writeback started
    DIRECT = "direct"    # anonymous memory; a thread writes each final piece to the device with O_DIRECT

    @property
    def words(self) -> str:
        return {ImageWay.MAPPING: "the file's shared mapping, its writeback started after the hash",
                ImageWay.PWRITE: "pwrite from anonymous memory into the page cache beside the hash, its writeback "
                                 "started",
                ImageWay.DIRECT: "O_DIRECT writes from anonymous memory, beside the hash"}[self]


@dataclass(frozen=True)
class WriteStats:
    """How a writer hashed, wrote and synced its image (bytes, ns): what ``finalize()`` reports as ``writer.stats``.

    ``hashed_as_final + hashed_at_finalize`` is the image size: each byte is hashed once, either from the
    writer's memory as it was marked final (in cache, right after it was written) or at finalize from the file."""

    hash_algo: HashAlgo
    hashed_as_final: int      # bytes hashed as they were marked final, by the writer's thread (``where``)
    hashed_at_finalize: int   # bytes never marked final, hashed at finalize: from the file (holes unread), or from
                              # the writer's anonymous memory as they are written (ImageWay.PWRITE, DIRECT)
    hash_ns: int              # time in the hash function, both ways (the thread's overlaps the writing)
    hash_wait_ns: int         # finalize waiting for the threads to hash (and write) what was marked final
    writeback_ns: int         # starting each piece's writeback (and unmapping it, MAPPING), on a thread (overlapped)
    writeback_error: str      # why early writeback stopped ("" if it never did); the final sync still writes all
    sync_ns: int              # finalize's syncs: the image and vCPU section, then the header
    finalize_ns: int
    way: ImageWay = ImageWay.MAPPING  # how the image reached the file
    way_refused: str = ""     # why the way asked for was not taken ("" if it was)
    write_ns: int = 0         # time in the writes from anonymous memory, on their own thread (overlapped)
    on_caller: bool = False   # a small image: hashed (and written) on the thread that marked it final, no threads

    @property
    def how(self) -> str:
        """How the image reached the file, in words."""
        return f"{self.way.words} ({self.way_refused})" if self.way_refused else self.way.words

    @property
    def where(self) -> str:
        """Where the image was hashed (and written from memory) as it was marked final, in words."""
        if self.on_caller:
            return (f"on the thread that marked it final (an image of at most {_ON_CALLER_UP_TO >> 20} MiB gets no "
                    "threads)")
        return "on the writer's threads beside the copy"


class _FinalFollower:
    """Runs ``work(start, end)`` over a writer's memory image in order, on a thread of its own, as far as the image
    is marked final, at most ``step`` bytes a call and only up to a multiple of ``align``. Stopped by ``finish()``
    or ``close()`` (the writer's finalize, abort, or its collection), each joining the thread with a time-out.

    ``on_caller``: no thread; each ``mark_final()`` does the work on the caller's thread before it returns (a small
    image, ``_ON_CALLER_UP_TO``). Its error is kept for ``finish()`` to raise, as a thread's is."""

    def __init__(self, what: str, work: Callable[[int, int], None], step: int, align: int = 1,
                 on_caller: bool = False):
        self._what = what
        self._work = work
        self._step = step
        self._align = align
        self.on_caller = on_caller
        self._cv = threading.Condition()
        self._final = 0       # memory[:final] is final (rounded down to align)
        self._done = 0        # work has gone over memory[:done] (only the thread moves it)
        self._stopping = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def mark_final(self, end: int) -> None:
        end -= end % self._align
        with self._cv:
            if self._stopping or self._error is not None:
                return  # finish() raises the thread's error; a stopped follower does nothing more
            if end > self._final:
                self._final = end
                self._cv.notify_all()
            if self._thread is None and not self.on_caller:
                self._thread = threading.Thread(target=self._run, name=f"snapshot-{self._what}", daemon=True)
                self._thread.start()
        if self.on_caller:
            self._go_over()

    def _go_over(self) -> None:
        """``on_caller``: the work over what is marked final and not yet gone over, here, its error kept."""
        try:
            while self._error is None and self._done < self._final:
                end = min(self._final, self._done + self._step)
                self._work(self._done, end)
                self._done = end
        except Exception as e:  # raised by finish(), as a thread's error is
            self._error = e

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    self._cv.wait_for(lambda: self._final > self._done or self._stopping)
                    if self._stopping:
                        return
                    start, end = self._done, min(self._final, self._done + self._step)
                self._work(start, end)
                with self._cv:
                    self._done = end
                    self._cv.notify_all()
        except BaseException as e:  # re-raised by finish(): the thread must never die silently
            with self._cv:
                self._error = e
                self._cv.notify_all()

    def finish(self, timeout: float) -> None:
        """Wait until everything marked final is gone over, then stop the thread."""
        if self.on_caller:
            self._go_over()
            self._stopping, done = True, True
        else:
            with self._cv:
                done = self._cv.wait_for(lambda: self._done >= self._final or self._error is not None,
                                         timeout=timeout)
                self._stopping = True
                self._cv.notify_all()
            self._join(timeout)
        if self._error is not None:
            raise RuntimeError(f"the snapshot image {self._what} failed after {self._done:#x} bytes: "
                               f"{self._error!r}") from self._error
        if not done:
            raise TimeoutError(f"the snapshot image {self._what} went over {self._done:#x} of the {self._final:#x} "
                               f"bytes marked final within {timeout:.0f} s")

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the piece in hand (an abort): nothing more is done."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._join(timeout)

    def _join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the snapshot image {self._what} thread did not stop within {timeout:.0f} s")


class _EarlyWriteback:
    """Starts the writeback of each piece of the image a writer's thread is done with (``start(offset, size)``,
    offsets in the file), and keeps what that cost and why it stopped: only a head start, so the first error
    ends it quietly and the final sync writes what is left, and fails loudly."""

    def __init__(self, start: Callable[[int, int], None]):
        self._start = start
        self.ns = 0
        self.error = ""

    def __call__(self, start: int, end: int) -> None:
        if self.error:
            return
        t0 = time.perf_counter_ns()
        try:
            self._start(MEMORY_OFFSET + start, end - start)
        except OSError as e:
            self.error = str(e)
        self.ns += time.perf_counter_ns() - t0


class _HashAsFinal:
    """The hashing thread's work: hash each final piece of the image while it is still in the CPU's cache, then
    start its writeback (where the image is the file's mapping)."""

    def __init__(self, memory: memoryview, algo: HashAlgo, writeback: _EarlyWriteback | None):
        self.memory = memory
        self.hash = content_hasher(algo)
        self.writeback = writeback
        self.hash_ns = 0

    def __call__(self, start: int, end: int) -> None:
        t0 = time.perf_counter_ns()
        with self.memory[start:end] as piece:
            self.hash.update(piece)
        self.hash_ns += time.perf_counter_ns() - t0
        if self.writeback is not None:
            self.writeback(start, end)


class _WriteFromMemory:
    """The writing thread's work (ImageWay.PWRITE, DIRECT): write each final piece of the image from the writer's
    anonymous memory to the file, beside the hash: with O_DIRECT the device reads the pages itself; through the
    page cache, each piece's writeback is started once it is there."""

    def __init__(self, memory: memoryview, fd: int, path: str, writeback: _EarlyWriteback | None):
        self.memory = memory
        self._fd = fd
        self._path = path
        self.writeback = writeback  # None with O_DIRECT: nothing is left in the page cache to write back
        self.write_ns = 0

    def __call__(self, start: int, end: int) -> None:
        if not sys.platform.startswith("linux"):  # these ways are refused elsewhere (SnapshotImage.create)
            raise OSError(f"writing a snapshot image from anonymous memory is Linux's, not {sys.platform}'s")
        t0 = time.perf_counter_ns()
        with self.memory[start:end] as piece:
            done = 0
            while done < len(piece):  # a short write goes on from where it stopped
                n = os.pwrite(self._fd, piece[done:], MEMORY_OFFSET + start + done)
                if n <= 0:
                    raise OSError(f"{self._path}: pwrite at {MEMORY_OFFSET + start + done:#x} wrote {n} of "
                                  f"{len(piece) - done:#x} bytes")
                done += n
        self.write_ns += time.perf_counter_ns() - t0
        if self.writeback is not None:
            self.writeback(start, end)


# madvise(2)'s MADV_POPULATE_WRITE (Linux 5.14): Python 3.11's mmap module does not name it.
_MADV_POPULATE_WRITE = 23


def _populate_for_writing(mapping: mmap.mmap, offset: int, size: int) -> None:
    """Allocate and map the pages of a mapping's range in one call (a shared file mapping's page cache, or anonymous
    memory), as writes would one fault a page; nothing where the kernel or platform has no such call (the writes
    then fault as before)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mapping.madvise(_MADV_POPULATE_WRITE, offset, size)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: a kernel before 5.14
            raise


def _allocate_blocks(fd: int, offset: int, size: int, path: str) -> None:
    """The file's blocks for a range allocated before a shared mapping of it is populated (posix_fallocate): a file
    system without room for them is a clear ENOSPC here, naming the file, not a fault in the populate or a SIGBUS
    in the copy into the mapping; and pages with blocks behind them populate faster (1, 64 and 256 MiB on this
    host's ext4: 0.96-1.05 ms against 1.10-1.16, 17 ms against 21-28, 43-48 ms against 56-63). Linux only. A file
    system that cannot allocate ahead (EOPNOTSUPP, EINVAL) is left to allocate as the pages are written, as before."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.posix_fallocate(fd, offset, size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(e.errno, f"{path}: no room on its file system for the {size:#x}-byte memory image "
                                   f"({os.strerror(e.errno)})") from e
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


def _open_direct(path: str) -> tuple[int, str]:
    """``path`` opened again for O_DIRECT writes: (its fd, ""), or (-1, why not) where the platform or the file
    system refuses it (tmpfs does, with EINVAL)."""
    flag = getattr(os, "O_DIRECT", None)
    if flag is None or not sys.platform.startswith("linux"):
        return -1, f"O_DIRECT is Linux's, not {sys.platform}'s"
    try:
        return os.open(path, os.O_WRONLY | flag), ""
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return -1, "its file system refuses O_DIRECT (EINVAL)"


def _anonymous_memory(size: int, populate: bool) -> mmap.mmap:
    """Private anonymous memory for a writer's image (ImageWay.PWRITE, DIRECT), in huge pages where the host's THP
    allows (fewer faults to populate, fewer TLB misses for the copy and the hash), populated now when asked."""
    if not sys.platform.startswith("linux"):  # these ways are refused elsewhere (SnapshotImage.create)
        raise OSError(f"a snapshot writer's anonymous memory is Linux's, not {sys.platform}'s")
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError, AttributeError):  # THP is a speed-up, not a need
        mapping.madvise(mmap.MADV_HUGEPAGE)
    if populate:
        _populate_for_writing(mapping, 0, size)
    return mapping


class StagingMemory:
    """Anonymous memory that writers of one image size copy their image into before writing it to the file
    (ImageWay.PWRITE, DIRECT), allocated once and lent to one writer at a time: a caller that captures again and
    again keeps it between captures instead of each writer allocating its own
    (1 GiB here: 91-118 ms to allocate with huge pages, 1.5-2.5 s when the kernel has to compact or fetch memory
    first). It holds ``size`` bytes of memory for as long as it lives; ``alloc_ns`` is what allocating it took.

    A writer gets it as the last writer left it, not zeroed (zeroing it would cost what keeping it saves): the
    file holds whatever is there at finalize, so a writer given it must write every page (a capture's bulk copy
    does)."""

    def __init__(self, size: int):
        if not isinstance(size, int) or size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"StagingMemory size: expected a positive multiple of {PAGE_SIZE:#x}, got {size!r}")
        t0 = time.perf_counter_ns()
        self.size = size
        self.mm = _anonymous_memory(size, populate=True)
        self.alloc_ns = time.perf_counter_ns() - t0
        self.lent_to = ""  # the path of the writer using it, "" while free

    def lend(self, size: int, path: str) -> mmap.mmap:
        if self.mm.closed:
            raise ValueError(f"{path}: its StagingMemory is closed")
        if size != self.size:
            raise ValueError(f"{path}: a memory image of {size:#x} bytes cannot use StagingMemory of {self.size:#x}")
        if self.lent_to:
            raise ValueError(f"{path}: its StagingMemory is in use by the writer of {self.lent_to}")
        self.lent_to = path
        return self.mm

    def give_back(self) -> None:
        """The writer it was lent to is done with it: the next writer may have it."""
        self.lent_to = ""

    def close(self) -> None:
        if self.lent_to:
            raise BufferError(f"StagingMemory still in use by the writer of {self.lent_to}: finalize or abort it first")
        self.mm.close()

    def __enter__(self) -> StagingMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SnapshotWriter:
    """A snapshot file being written. ``memory`` is a writable view of the memory image: whatever lands there and
    is marked final (or is there at ``finalize()``) is in the file. Call ``finalize()`` to seal it, or ``abort()``
    to give up.

    Three ways to reach the file (``ImageWay``). MAPPING, the default: ``memory`` is the file's own shared mapping
    (its page cache, allocated at create when ``populate``), each final piece's writeback started after its hash.
    PWRITE and DIRECT: ``memory`` is anonymous memory (``staging``, kept by the caller between captures, or the
    writer's own), and a thread of its own writes each final piece to the file while the hash reads it: PWRITE
    into the page cache (a later load reads it from there), DIRECT with O_DIRECT (the device reads the pages;
    nothing is left in the page cache). Populating a file mapping costs more than a pwrite of the same pages
    into the page cache (1 MiB here: 0.8 ms against 0.2 ms), so with the staging memory kept both beat MAPPING
    (phase 3's capture benchmark measures the three). Where O_DIRECT is refused (tmpfs before Linux 6.6) DIRECT
    writes as PWRITE does and ``stats.way_refused`` says why.
    """

    def __init__(self, path, memory_size: int, arch: Arch, hypervisor: str, populate: bool = False,
                 way: ImageWay = ImageWay.MAPPING, staging: StagingMemory | None = None):
        self.path = os.fspath(path)
        self.memory_size = memory_size
        self.arch = arch
        self.hypervisor = hypervisor
        self.closed = False
        total = MEMORY_OFFSET + memory_size
        # Unbuffered, so header writes go straight to the file.
        self._file = open(self.path, "w+b", buffering=0)  # noqa: SIM115 - closed by finalize/abort
        self._direct_file = None
        self._lent: StagingMemory | None = None
        self.way, self.way_refused = way, ""
        try:
            self._file.truncate(total)  # sparse zeros on Linux; no data copied
            # COMPLETE clear until finalize: a capture that dies leaves a file
            # that says so, with a valid checksum so the loader can name why.
            self._file.write(pack_header(memory_size=memory_size, arch=arch, hypervisor=hypervisor,
                                         complete=False))
            if way is ImageWay.DIRECT:
                fd, self.way_refused = _open_direct(self.path)
                if fd < 0:
                    self.way = ImageWay.PWRITE  # the anonymous memory is there all the same: through the page cache
                else:
                    self._direct_file = open(fd, "wb", buffering=0)  # noqa: SIM115 - closed by finalize/abort
            if self.way is ImageWay.MAPPING:
                # Map the whole file: Windows needs view offsets aligned to 64 KiB,
                # so mapping only the region at 4096 would not port.
                self._mm = mmap.mmap(self._file.fileno(), total, access=mmap.ACCESS_WRITE)
                self._offset = MEMORY_OFFSET
                if populate:
                    _allocate_blocks(self._file.fileno(), MEMORY_OFFSET, memory_size, self.path)
                    _populate_for_writing(self._mm, MEMORY_OFFSET, memory_size)
            else:
                self._offset = 0
                if staging is None:
                    self._mm = _anonymous_memory(memory_size, populate)
                else:
                    self._mm = staging.lend(memory_size, self.path)
                    self._lent = staging
        except BaseException:
            if self._direct_file is not None:
                self._direct_file.close()
            self._file.close()
            raise
        self.memory = memoryview(self._mm)[self._offset:]
        self.hash_algo = HASH_ALGO_OF_VERSION[FORMAT_VERSION]
        # The page cache's pieces have their writeback started by the thread that put them there: the hash's, when
        # the image is the file's mapping (unmapped first), the writer's after each pwrite; O_DIRECT leaves none.
        self._writeback: _EarlyWriteback | None = None
        if self.way is ImageWay.MAPPING:
            if (starter := _writeback_starter(self._file.fileno(), self._mm)) is not None:
                self._writeback = _EarlyWriteback(starter)
        elif self.way is ImageWay.PWRITE and _sync_file_range() is not None:
            fd = self._file.fileno()
            self._writeback = _EarlyWriteback(lambda offset, size: start_writeback(fd, offset, size))
        self._hash = _HashAsFinal(self.memory, self.hash_algo, self._writeback if self.way is ImageWay.MAPPING
                                  else None)
        self.on_caller = memory_size <= _ON_CALLER_UP_TO
        self._followers = [_FinalFollower("hasher", self._hash, _HASH_STEP, on_caller=self.on_caller)]
        self._write: _WriteFromMemory | None = None
        if self.way is not ImageWay.MAPPING:
            fd = (self._direct_file or self._file).fileno()
            self._write = _WriteFromMemory(self.memory, fd, self.path, self._writeback)
            self._followers.append(_FinalFollower("writer", self._write, _WRITE_STEP, PAGE_SIZE,
                                                  on_caller=self.on_caller))
        # A writer dropped without finalize() or abort() must not leave its threads waiting for work forever, nor
        # its staging memory lent to nobody.
        self._collected = weakref.finalize(self, _collected, list(self._followers), self._lent)
        self._marked = 0  # the furthest end marked final by the writer's user
        self.stats: WriteStats | None = None  # set by finalize()

    def mark_final(self, end: int) -> None:
        """``memory[:end]`` holds its final bytes: hash it now, on the writer's thread, and start its writeback
        (or, from anonymous memory, write it on another).

        Call it as a prefix of the image becomes final (each call may reach further); the bytes are hashed
        while they are still in the CPU's cache. A byte changed after it was marked final leaves the content
        hash wrong: a verified load refuses the file."""
        if not 0 <= end <= self.memory_size:
            raise ValueError(f"mark_final: end {end:#x} outside the memory image of {self.memory_size:#x} bytes")
        if self.closed:
            raise ValueError(f"{self.path}: snapshot writer already closed")
        self._marked = max(self._marked, end)
        for follower in self._followers:
            follower.mark_final(end)

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Leaving without finalize (normally or by exception) is an abort: the
        # file stays, marked incomplete. Never mask the exception in flight.
        if not self.closed:
            self.abort()

    def _unmap(self) -> None:
        """Release our view and close the mapping, or raise a clear BufferError
        (and stay usable) while a caller still holds a pointer into it."""
        in_use = BufferError(
            f"{self.path}: snapshot writer memory is still in use: a pointer or view taken from "
            "writer.memory (ffi.from_buffer(), ctypes from_buffer(), numpy, memoryview) is alive; "
            "release it (ffi.release(), del, .release()) before finalize")
        # A direct export (cffi, numpy) makes our view refuse release; a view
        # derived from ours (memoryview(), ctypes) shares its buffer and only
        # shows when the mapping refuses to close.
        try:
            self.memory.release()
        except BufferError:
            raise in_use from None
        if self._lent is not None:
            self._collected.detach()  # given back here, never again when this writer is collected
            self._lent.give_back()  # its owner keeps it for the next writer
            return
        try:
            self._mm.close()
        except BufferError:
            self.memory = memoryview(self._mm)[self._offset:]  # stay usable for a retry
            raise in_use from None

    def finalize(self, vcpu_states: Iterable[bytes] = (), *, vcpu_kind: int | None = None,
                 timeout: float | None = None, progress: Callable[[int], None] | None = None) -> SnapshotImage:
        """Hash what is left of the memory, write the vCPU section, sync, write the header with COMPLETE set,
        sync, close, and return the image as the loader sees it (``stats`` says how it was hashed and synced).
        vCPU states are opaque bytes, all tagged ``vcpu_kind`` (default: the hypervisor's kind). ``timeout``
        bounds the wait for the writer's threads (default: generous for the image's size); ``progress`` is told
        the bytes hashed from the file (what the capture did not mark final as it copied)."""
        if self.closed:
            raise ValueError(f"{self.path}: snapshot writer already closed")
        clock = time.perf_counter_ns
        t0 = clock()
        states = [bytes(s) for s in vcpu_states]
        kind = DEFAULT_VCPU_KIND[self.hypervisor] if vcpu_kind is None else VcpuKind(vcpu_kind)
        section = pack_vcpu_section(states, [kind] * len(states))  # a bad state fails here, before any write
        if timeout is None:
            timeout = _HASH_WAIT_BASE_S + self.memory_size / _HASH_WAIT_BYTES_PER_S
        marked = self._marked
        if self._write is not None:
            # Anonymous memory is not the file: what was never marked final is written (and hashed) from it now.
            for follower in self._followers:
                follower.mark_final(self.memory_size)
        for follower in self._followers:
            follower.finish(timeout)  # nothing is marked final after this
        t1 = clock()
        rest = 0 if self._write is not None else self.memory_size - marked  # to hash from the file
        # Where the OS keeps a file mapping's pages apart from its file cache (Windows) they are flushed for the
        # sync below to see them. On Linux the mapping's pages are the page cache, which fsync writes: an msync
        # would be one more whole sync. It is kept there only before reading a never-marked rest back through
        # the file, so SEEK_DATA sees written blocks as data on every filesystem.
        if self._write is None and (rest or not sys.platform.startswith("linux")):
            self._mm.flush()
        self._unmap()  # nobody can write after the hash is taken; a held pointer raises here, retry after
        f = self._file
        try:
            t2 = clock()
            _hash_file_range(f, MEMORY_OFFSET + marked, rest, self._hash.hash, progress)
            digest = self._hash.hash.digest()
            t3 = clock()
            # Image and vCPU section durable before the header says COMPLETE: a power cut in between
            # leaves an incomplete file, never a complete one with stale pages. (An O_DIRECT write's data is
            # on the device when it returns; this fsync makes the blocks it allocated part of the file.)
            f.seek(MEMORY_OFFSET + self.memory_size)
            f.write(section)
            os.fsync(f.fileno())
            f.seek(0)
            f.write(pack_header(memory_size=self.memory_size, arch=self.arch, hypervisor=self.hypervisor,
                                complete=True, content_hash=digest, vcpu_states=states,
                                vcpu_kinds=[kind] * len(states)))
            os.fsync(f.fileno())
            t4 = clock()
        finally:
            self.closed = True
            f.close()
            if self._direct_file is not None:
                self._direct_file.close()
        wb = self._writeback
        self.stats = WriteStats(hash_algo=self.hash_algo, hashed_as_final=marked,
                                hashed_at_finalize=self.memory_size - marked, hash_ns=self._hash.hash_ns + (t3 - t2),
                                hash_wait_ns=t1 - t0, writeback_ns=0 if wb is None else wb.ns,
                                writeback_error="" if wb is None else wb.error,
                                sync_ns=t4 - t3, finalize_ns=t4 - t0, way=self.way, way_refused=self.way_refused,
                                write_ns=0 if self._write is None else self._write.write_ns,
                                on_caller=self.on_caller)
        return SnapshotImage.open(self.path, verify=False)

    def abort(self) -> None:
        """Give up: the file stays on disk, marked incomplete. Never raises
        BufferError: if a caller still holds a pointer, the mapping lives
        until that pointer goes, then is unmapped by the garbage collector."""
        if self.closed:
            return
        self.closed = True
        try:
            _close_all(self._followers)
        finally:
            with contextlib.suppress(BufferError):
                self.memory.release()
                if self._lent is None:
                    self._mm.close()
            if self._lent is not None:
                self._collected.detach()
                self._lent.give_back()
            if self._direct_file is not None:
                self._direct_file.close()
            self._file.close()


def _collected(followers: Sequence[_FinalFollower], lent: StagingMemory | None) -> None:
    """A writer collected without finalize() or abort(): its threads stopped, its StagingMemory given back."""
    try:
        _close_all(followers)
    finally:
        if lent is not None:
            lent.give_back()


def _close_all(followers: Sequence[_FinalFollower]) -> None:
    """Stop each of a writer's threads, every one of them even if one fails to stop in time."""
    errors = []
    for follower in followers:
        try:
            follower.close()
        except TimeoutError as e:
            errors.append(e)
    if errors:
        raise errors[0]


class SnapshotImage:
    """A checked snapshot file: header fields as attributes, memory read on
    demand. Holds no open handle; ``path`` + ``memory_offset`` +
    ``memory_size`` are what a backend maps."""

    path: str
    format_version: int
    arch: Arch
    page_size: int
    memory_offset: int
    memory_size: int
    flags: int
    complete: bool
    hash_algo: HashAlgo
    hypervisor: str
    content_hash: bytes
    vcpu_state_version: int
    vcpu_offset: int
    vcpu_size: int
    vcpu_hash: bytes
    vcpu_kinds: tuple[int, ...]
    vcpu_states: tuple[bytes, ...]
    header_checksum: bytes
    file_length: int
    verified: bool

    @staticmethod
    def create(path, memory_size: int, *, arch: Arch | str | int = Arch.X86_64,
               hypervisor: str = "kvm", populate: bool = False, way: ImageWay = ImageWay.MAPPING,
               staging: StagingMemory | None = None) -> SnapshotWriter:
        """Start a snapshot file of memory_size bytes; see SnapshotWriter. ``populate``: a writer that will write
        every page of the image (a capture's copy does) has its memory allocated now, in one call, instead of
        one fault a page as it writes; a sparse image (an incremental diff) leaves it off and stays sparse.
        ``way``: how the image reaches the file (``ImageWay``; PWRITE and DIRECT are Linux's), copied into
        ``staging`` where given (a caller's, kept between captures; not for MAPPING)."""
        checked_arch = _check_create_args(memory_size, arch, hypervisor)
        if way is not ImageWay.MAPPING and not sys.platform.startswith("linux"):
            raise ValueError(f"way: {way} writes from anonymous memory, Linux's; on {sys.platform} only "
                             f"{ImageWay.MAPPING}")
        if staging is not None and way is ImageWay.MAPPING:
            raise ValueError(f"staging: memory to copy into is for {ImageWay.PWRITE} or {ImageWay.DIRECT}, "
                             f"not {ImageWay.MAPPING} (the file's own mapping)")
        return SnapshotWriter(path, memory_size, checked_arch, hypervisor, populate=populate, way=way,
                              staging=staging)

    @classmethod
    def write(cls, path, memory, *, vcpu_states: Iterable[bytes] = (), arch: Arch | str | int = Arch.X86_64,
              hypervisor: str = "kvm") -> SnapshotImage:
        """Write a whole snapshot from a bytes-like memory image in one call, hashing each piece as it lands."""
        with memoryview(memory) as src, src.cast("B") as flat, \
                cls.create(path, flat.nbytes, arch=arch, hypervisor=hypervisor) as w:
            for start in range(0, flat.nbytes, _HASH_STEP):
                end = min(start + _HASH_STEP, flat.nbytes)
                w.memory[start:end] = flat[start:end]
                w.mark_final(end)
            return w.finalize(vcpu_states)

    @classmethod
    def open(cls, path, verify: bool = True, *, allow_incomplete: bool = False,
             progress: Callable[[int], None] | None = None) -> SnapshotImage:
        """Load and check a snapshot header. verify=False skips only the content
        hash (it reads the whole image; ``progress`` is told the bytes hashed); allow_incomplete is for
        diagnostics."""
        with open(path, "rb", buffering=0) as f:
            length = os.fstat(f.fileno()).st_size
            header = f.read(HEADER_SIZE)
            img = cls._parse(os.fspath(path), header, length, allow_incomplete, f)
            if verify:
                img._verify_with(f, progress)
        return img

    @classmethod
    def _parse(cls, path: str, header: bytes, length: int, allow_incomplete: bool, f) -> SnapshotImage:
        def fail(field, expected, seen, prefix="snapshot header") -> NoReturn:
            raise SnapshotFormatError(field, expected, seen, path, prefix)

        def truncated(what):
            fail("file length", what, f"{_hex(length)} bytes", "snapshot file truncated")

        if len(header) < len(MAGIC):
            truncated(f"at least {_hex(HEADER_SIZE)} bytes (the header page)")
        if header[:len(MAGIC)] != MAGIC:
            fail("magic", repr(MAGIC), repr(bytes(header[:len(MAGIC)])))
        if len(header) < HEADER_SIZE:
            truncated(f"at least {_hex(HEADER_SIZE)} bytes (the header page)")

        img = cls.__new__(cls)
        img.path = path
        img.file_length = length
        img.verified = False

        img.format_version = _get(header, "format_version")
        readable = " or ".join(str(v) for v in sorted(HASH_ALGO_OF_VERSION, reverse=True))
        if img.format_version == 1:
            fail("format_version", readable, "1 (a version 1 file holds only regs + sregs + FPU for "
                 "each vCPU, too little to resume a guest: capture it again)")
        if img.format_version not in HASH_ALGO_OF_VERSION:
            fail("format_version", readable, str(img.format_version))
        if (seen := _get(header, "header_size")) != HEADER_SIZE:
            fail("header_size", _hex(HEADER_SIZE), _hex(seen))
        img.flags = _get(header, "flags")
        if img.flags & ~KNOWN_FLAGS:
            fail("flags", f"only bits {_hex(KNOWN_FLAGS)}", _hex(img.flags))
        img.complete = bool(img.flags & FLAG_COMPLETE)
        if not img.complete and not allow_incomplete:
            fail("flags", "COMPLETE (0x1) set", f"{_hex(img.flags)}: the capture that wrote this file "
                 "did not finish", "snapshot incomplete")
        arch = _get(header, "arch")
        if arch not in _values(Arch):
            fail("arch", " or ".join(_enum_name(Arch, a) for a in Arch), _enum_name(Arch, arch))
        img.arch = Arch(arch)
        img.page_size = _get(header, "page_size")
        if img.page_size != PAGE_SIZE:
            fail("page_size", _hex(PAGE_SIZE), _hex(img.page_size))
        img.memory_offset = _get(header, "memory_offset")
        if img.memory_offset != MEMORY_OFFSET:
            fail("memory_offset", _hex(MEMORY_OFFSET), _hex(img.memory_offset))
        algo, versions_algo = _get(header, "hash_algo"), HASH_ALGO_OF_VERSION[img.format_version]
        if algo != versions_algo:
            fail("hash_algo", f"{_enum_name(HashAlgo, versions_algo)}, the hash of format version "
                 f"{img.format_version}", _enum_name(HashAlgo, algo))
        img.hash_algo = versions_algo
        raw_tag = _get(header, "hypervisor")
        tag = raw_tag.rstrip(b"\0")
        if tag.decode("ascii", "replace") not in HYPERVISORS:
            fail("hypervisor", " or ".join(repr(h) for h in HYPERVISORS), repr(raw_tag))
        img.hypervisor = tag.decode("ascii")
        reserved = _get(header, "reserved")
        if reserved != bytes(len(reserved)):  # compared whole: any() over its bytes was half of an open's time
            at = next(i for i, b in enumerate(reserved) if b)
            fail("reserved", "all zero", f"byte {reserved[at]:#04x} at header offset {FIELDS['reserved'][0] + at:#x}")

        # Sizes against the file: python ints cannot overflow, and nothing is
        # allocated from memory_size or vcpu_size until it matches the bytes on disk.
        img.memory_size = _get(header, "memory_size")
        if img.memory_size == 0 or img.memory_size % img.page_size:
            fail("memory_size", f"a positive multiple of page_size {_hex(img.page_size)}",
                 _hex(img.memory_size))
        held = length - img.memory_offset
        if img.memory_size > held:
            fail("memory_size", f"at most {_hex(max(held, 0))} (file length {_hex(length)} - memory_offset "
                 f"{_hex(img.memory_offset)})", _hex(img.memory_size), "snapshot file truncated")
        img.vcpu_size = _get(header, "vcpu_size")
        if img.vcpu_size % 8 or img.vcpu_size > VCPU_SECTION_MAX:
            fail("vcpu_size", f"a multiple of 8, at most {_hex(VCPU_SECTION_MAX)}", _hex(img.vcpu_size))
        if img.vcpu_size > held - img.memory_size:
            fail("vcpu_size", f"at most {_hex(held - img.memory_size)} (file length {_hex(length)} - memory_offset "
                 f"- memory_size)", _hex(img.vcpu_size), "snapshot file truncated")
        if img.memory_size + img.vcpu_size < held:
            fail("memory_size", f"{_hex(held - img.vcpu_size)} (file length {_hex(length)} - memory_offset "
                 f"{_hex(img.memory_offset)} - vcpu_size {_hex(img.vcpu_size)})", _hex(img.memory_size))
        img.vcpu_offset = _get(header, "vcpu_offset")
        if img.vcpu_offset != img.memory_offset + img.memory_size:
            fail("vcpu_offset", f"{_hex(img.memory_offset + img.memory_size)} (memory_offset + memory_size)",
                 _hex(img.vcpu_offset))
        img.vcpu_state_version = _get(header, "vcpu_state_version")
        if img.vcpu_state_version != VCPU_STATE_VERSION:
            fail("vcpu_state_version", str(VCPU_STATE_VERSION), str(img.vcpu_state_version))

        img.header_checksum = _get(header, "header_checksum")
        want = header_checksum(header)
        if img.header_checksum != want:
            fail("header_checksum", want.hex(), img.header_checksum.hex())
        img.content_hash = _get(header, "content_hash")

        # The header is what it claims to be; now the vCPU section it describes.
        f.seek(img.vcpu_offset)
        section = f.read(img.vcpu_size)
        if len(section) != img.vcpu_size:
            fail("vcpu_size", f"{_hex(img.vcpu_size)} bytes at {_hex(img.vcpu_offset)}",
                 f"{_hex(len(section))} (file shrank after open)", "snapshot file truncated")
        img.vcpu_hash = _get(header, "vcpu_hash")
        seen = hashlib.sha256(section).digest()
        if seen != img.vcpu_hash:
            fail("vcpu_hash", f"{img.vcpu_hash.hex()} (from header)", f"{seen.hex()} (of the vCPU section)")
        img.vcpu_kinds, img.vcpu_states = cls._parse_vcpu_section(_get(header, "vcpu_count"), section, path)
        return img

    @staticmethod
    def _parse_vcpu_section(count: int, section: bytes, path: str) -> tuple[tuple[int, ...], tuple[bytes, ...]]:
        def fail(field, expected, seen) -> NoReturn:
            raise SnapshotFormatError(field, expected, seen, path, "snapshot vCPU state")

        most = len(section) // VCPU_RECORD_HEAD.size
        if count > most:  # checked first, so a huge count never drives the loop
            fail("vcpu_count", f"at most {most} (records of {VCPU_RECORD_HEAD.size}+ bytes in the "
                 f"{len(section)}-byte vCPU section)", str(count))
        kinds, states, pos = [], [], 0
        for i in range(count):
            if pos + VCPU_RECORD_HEAD.size > len(section):
                fail(f"vcpu[{i}]", f"a record inside the {len(section)}-byte vCPU section",
                     f"the section ends at record offset {pos}")
            kind, size = VCPU_RECORD_HEAD.unpack_from(section, pos)
            if kind not in _values(VcpuKind):
                fail(f"vcpu[{i}].kind", " or ".join(_enum_name(VcpuKind, k) for k in VcpuKind),
                     _enum_name(VcpuKind, kind))
            start = pos + VCPU_RECORD_HEAD.size
            if size > len(section) - start:
                fail(f"vcpu[{i}].length", f"at most {len(section) - start} (what is left of the vCPU section)",
                     str(size))
            end = start + size
            pos = min(_pad8(end), len(section))
            if any(section[end:pos]):
                fail(f"vcpu[{i}] padding", "zero", bytes(section[end:pos]).hex())
            state = bytes(section[start:end])
            if kind == VcpuKind.KVM_X86:
                split_kvm_x86_state(state, f"vcpu[{i}]", path, "snapshot vCPU state")
            kinds.append(kind)
            states.append(state)
        if pos != len(section):
            fail("vcpu_size", f"{_hex(pos)} (the end of record {count - 1 if count else 'none'})",
                 f"{_hex(len(section))}: bytes after the last record")
        return tuple(kinds), tuple(states)

    def vcpu_parts(self, index: int) -> dict[VcpuPart, bytes]:
        """vCPU ``index``'s KVM x86 state, part by part (checked on open)."""
        if self.vcpu_kinds[index] != VcpuKind.KVM_X86:
            raise ValueError(f"vCPU {index} holds a {_enum_name(VcpuKind, self.vcpu_kinds[index])} state, "
                             "not KVM x86 parts")
        return split_kvm_x86_state(self.vcpu_states[index], f"vcpu[{index}]", self.path)

    def _verify_with(self, f, progress: Callable[[int], None] | None = None) -> None:
        if not self.complete:
            raise SnapshotFormatError("content_hash", "a complete file to verify", "an incomplete file",
                                      self.path, "snapshot incomplete")
        h = content_hasher(self.hash_algo)
        _hash_file_range(f, self.memory_offset, self.memory_size, h, progress)
        seen = h.digest()
        if seen != self.content_hash:
            raise SnapshotFormatError("content_hash", f"{self.content_hash.hex()} (from header)",
                                      f"{seen.hex()} (of the memory image)", self.path)
        self.verified = True

    def verify(self) -> None:
        """Hash the memory image and check it against content_hash; raises
        SnapshotFormatError naming content_hash on a mismatch."""
        with open(self.path, "rb", buffering=0) as f:
            self._verify_with(f)

    def read_memory(self, offset: int = 0, size: int | None = None) -> bytes:
        """size bytes of the memory image from offset (default: all of it)."""
        if size is None:
            size = self.memory_size - offset
        if offset < 0 or size < 0 or offset + size > self.memory_size:
            raise ValueError(f"read_memory: range {_hex(offset)}+{_hex(size)} outside the memory image "
                             f"of {_hex(self.memory_size)} bytes")
        with open(self.path, "rb") as f:
            f.seek(self.memory_offset + offset)
            data = f.read(size)
        if len(data) != size:
            raise SnapshotFormatError("memory_size", f"{_hex(size)} bytes at {_hex(offset)}",
                                      f"{_hex(len(data))} (file shrank after open)", self.path,
                                      "snapshot file truncated")
        return data

    def __enter__(self) -> SnapshotImage:
        return self

    def __exit__(self, *exc) -> None:
        pass  # nothing held open; the context form is for symmetry with the writer

    def __repr__(self) -> str:
        return (f"SnapshotImage({self.path!r}, arch={self.arch.name.lower()}, "
                f"hypervisor={self.hypervisor!r}, "
                f"memory_size={_hex(self.memory_size)}, vcpus={len(self.vcpu_states)}, "
                f"complete={self.complete}, verified={self.verified})")


def rewrite_header(path, *, fix_checksum: bool = True, **fields) -> None:
    """Overwrite header fields of an existing file in place, for negative tests:
    ``rewrite_header(p, page_size=8192)``. The checksum is recomputed so the
    loader reaches the check for that field, unless ``fix_checksum=False`` or
    ``header_checksum`` is one of the fields. String values are ASCII-encoded."""
    with open(path, "r+b") as f:
        header = bytearray(f.read(HEADER_SIZE))
        if len(header) != HEADER_SIZE:
            raise ValueError(f"{path}: rewrite_header needs a {HEADER_SIZE}-byte header, file has {len(header)}")
        for name, value in fields.items():
            _put(header, name, value.encode("ascii") if isinstance(value, str) else value)
        if fix_checksum and "header_checksum" not in fields:
            _put(header, "header_checksum", header_checksum(bytes(header)))
        f.seek(0)
        f.write(header)


def rewrite_vcpu_section(path, section: bytes, *, fix_hash: bool = True, **fields) -> None:
    """Replace the vCPU section of an existing file, for negative tests: ``section`` lands at
    vcpu_offset, the file ends after it, and vcpu_size and vcpu_hash describe it (unless
    ``fix_hash=False``) so the loader reaches the record checks; ``fields`` go to rewrite_header."""
    with open(path, "r+b") as f:
        header = f.read(HEADER_SIZE)
        offset = _get(header, "vcpu_offset")
        f.seek(offset)
        f.write(section)
        f.truncate(offset + len(section))
    if fix_hash:
        fields = {"vcpu_size": len(section), "vcpu_hash": hashlib.sha256(section).digest(), **fields}
    rewrite_header(path, **fields)


def read_vcpu_section(path) -> bytes:
    """The vCPU section of a file as its header places it (no checks: for tests that corrupt it)."""
    with open(path, "rb") as f:
        header = f.read(HEADER_SIZE)
        f.seek(_get(header, "vcpu_offset"))
        return f.read(_get(header, "vcpu_size"))


def human_size(n: int) -> str:
    """0x100000 -> '0x100000 (1 MiB)'."""
    value, unit = float(n), "B"
    for next_unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024:
            break
        value, unit = value / 1024, next_unit
    shown = f"{value:.0f}" if value == int(value) else f"{value:.1f}"
    return f"{n:#x} ({shown} {unit})"


def describe(img: SnapshotImage) -> list[str]:
    """The header in plain words, one field a line."""
    lines = [
        ("file", img.path),
        ("format", f"snapproof snapshot, version {img.format_version}"),
        ("complete", "yes" if img.complete else "NO: the capture that wrote this file did not finish"),
        ("architecture", img.arch.name.lower()),
        ("hypervisor", img.hypervisor),
        ("page size", human_size(img.page_size)),
        ("memory offset", human_size(img.memory_offset)),
        ("memory size", f"{human_size(img.memory_size)}, {img.memory_size // img.page_size} pages"),
        ("file length", human_size(img.file_length)),
        ("content hash", f"{img.hash_algo.name.lower()} {img.content_hash.hex()}"),
        ("header checksum", f"sha256 {img.header_checksum.hex()} (matches)"),
        ("vCPUs", f"{len(img.vcpu_states)}, state layout version {img.vcpu_state_version}, "
                  f"{img.vcpu_size} bytes after the image"),
    ]
    for i, (kind, state) in enumerate(zip(img.vcpu_kinds, img.vcpu_states, strict=True)):
        text = f"{VcpuKind(kind).name.lower()} state, {len(state)} bytes"
        if kind == VcpuKind.KVM_X86:
            parts = img.vcpu_parts(i)
            text += ": " + ", ".join(f"{p.label} {len(d)}" for p, d in parts.items())
            if VcpuPart.MSRS in parts:
                text += f" ({len(parts[VcpuPart.MSRS]) // MSR_ENTRY.size} MSRs)"
        lines.append((f"  vCPU {i}", text))
    return [f"{k:<16} {v}" for k, v in lines]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snapproof.native.image", description="snapproof snapshot files")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a snapshot header in plain words")
    info.add_argument("file")
    args = parser.parse_args(argv)

    try:
        img = SnapshotImage.open(args.file, verify=False, allow_incomplete=True)
    except (SnapshotFormatError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in describe(img):
        print(line)
    if not img.complete:
        print(f"{'content check':<16} not done (incomplete file)")
        print(f"error: {args.file}: snapshot incomplete", file=sys.stderr)
        return 1
    try:
        img.verify()
    except SnapshotFormatError as e:
        print(f"{'content check':<16} MISMATCH")
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{'content check':<16} verifies ({img.hash_algo.name.lower()} of {human_size(img.memory_size)} "
          "matches the header)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
