"""The snapproof snapshot file: one header page, then the raw dense memory image.

Layout of a file (all integers little-endian)::

    0x0000  header page (4096 bytes, table below)
    0x1000  memory image: memory_size bytes, guest physical address 0 first

The memory image starts on a page boundary, so a backend can map it directly
(Linux ``mmap(MAP_PRIVATE)``, Windows ``FILE_MAP_COPY``), and dropping the first
4096 bytes leaves a plain raw memory file. The file is exactly
``memory_offset + memory_size`` bytes long; nothing trails the image.

Header page::

    offset  size  field            meaning
    ------  ----  ---------------  ---------------------------------------------------
    0x000      8  magic            b"SNAPPROF"
    0x008      4  format_version   1
    0x00c      4  header_size      4096
    0x010      4  arch             Arch: 1 = x86_64
    0x014      4  page_size        4096
    0x018      8  memory_offset    4096 (the memory image follows the header page)
    0x020      8  memory_size      bytes of memory image; > 0, a multiple of page_size
    0x028      4  flags            bit 0 COMPLETE: the capture finished; other bits 0
    0x02c      4  hash_algo        HashAlgo: 1 = sha256
    0x030     16  hypervisor       ASCII tag, NUL-padded: "kvm" or "whp"
    0x040     32  content_hash     sha256 of the memory image
    0x060      4  vcpu_count       number of vCPU records in vcpu_area
    0x064     28  reserved         zero
    0x080   3936  vcpu_area        vcpu_count records, then zero padding (below)
    0xfe0     32  header_checksum  sha256 of the header page with this field zeroed

A vCPU record, 8-byte aligned inside vcpu_area::

    +0  4  kind    VcpuKind: 1 = KVM x86 (kvm_regs + kvm_sregs + kvm_fpu, raw, 872 bytes;
                   the layout belongs to native/kvm.py), 2 = WHP x86 (native/whp.py)
    +4  4  length  bytes of state that follow
    +8     state   opaque bytes, then zero padding to the next multiple of 8

The area holds 3936 bytes, so four KVM x86 vCPUs (4 * 880 bytes) fit.

Writing: ``SnapshotImage.create()`` sizes the file, writes a header with COMPLETE
clear, and maps the memory region for the capture engine to fill. ``finalize()``
flushes the memory, hashes it, and only then writes the header with COMPLETE
set. A capture that is aborted, raises, or dies leaves the file in place,
marked incomplete; ``SnapshotImage.open()`` refuses it. (Deleting on abort was
the alternative; it would make an abort and a crash leave different files.)

Reading: ``SnapshotImage.open()`` trusts no header field. It checks, in order,
magic, format_version, header_size, flags (COMPLETE), arch, page_size,
memory_offset, hash_algo, hypervisor, reserved, memory_size against the file
length, the vCPU records, the header checksum and, on a verified load, the
content hash. Each failure raises ``SnapshotFormatError`` naming the field, what
was expected and what was seen. No allocation depends on a header value before
that value has been checked against the file length.

``python -m native.image info FILE`` prints a header in plain words.

Pure Python on purpose: the format is shared by the KVM and WHP backends and
must import on Windows.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import errno
import hashlib
import mmap
import os
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence

MAGIC = b"SNAPPROF"
FORMAT_VERSION = 1
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
    "reserved": (0x064, "28s"),
    "vcpu_area": (0x080, "3936s"),
    "header_checksum": (0xFE0, "32s"),
}
VCPU_AREA_OFFSET, _ = FIELDS["vcpu_area"]
VCPU_AREA_SIZE = struct.calcsize(FIELDS["vcpu_area"][1])
VCPU_RECORD_HEAD = struct.Struct("<II")  # kind, length
CHECKSUM_OFFSET, _ = FIELDS["header_checksum"]
CHECKSUM_SIZE = 32

# Verification and finalize hash the image through a buffer of this size, so
# memory use stays flat however large the image is.
_HASH_CHUNK = 1 << 20


class Arch(enum.IntEnum):
    X86_64 = 1


class HashAlgo(enum.IntEnum):
    SHA256 = 1


class VcpuKind(enum.IntEnum):
    KVM_X86 = 1  # struct kvm_regs + kvm_sregs + kvm_fpu, raw (native/kvm.py)
    WHP_X86 = 2  # WHP register block (native/whp.py)


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


def pack_vcpu_area(states: Sequence[bytes], kinds: Sequence[int]) -> bytes:
    """The vcpu_area bytes for these states; ValueError if they do not fit."""
    area = bytearray(VCPU_AREA_SIZE)
    pos = 0
    for i, (state, kind) in enumerate(zip(states, kinds, strict=True)):
        VcpuKind(kind)  # ValueError on an unknown kind
        need = VCPU_RECORD_HEAD.size + len(state)
        if pos + need > VCPU_AREA_SIZE:
            total = sum(_pad8(VCPU_RECORD_HEAD.size + len(s)) for s in states)
            raise ValueError(
                f"vCPU states do not fit the header page: vCPU {i} needs {need} bytes at area offset "
                f"{pos}; all {len(states)} records need {total} bytes, the area holds {VCPU_AREA_SIZE}")
        VCPU_RECORD_HEAD.pack_into(area, pos, int(kind), len(state))
        area[pos + VCPU_RECORD_HEAD.size:pos + need] = state
        pos += _pad8(need)
    return bytes(area)


def pack_header(*, memory_size: int, arch: int, hypervisor: str, complete: bool,
                content_hash: bytes = bytes(32), vcpu_states: Sequence[bytes] = (),
                vcpu_kinds: Sequence[int] = ()) -> bytes:
    """A header page for these values, checksum included."""
    header = bytearray(HEADER_SIZE)
    _put(header, "magic", MAGIC)
    _put(header, "format_version", FORMAT_VERSION)
    _put(header, "header_size", HEADER_SIZE)
    _put(header, "arch", int(arch))
    _put(header, "page_size", PAGE_SIZE)
    _put(header, "memory_offset", MEMORY_OFFSET)
    _put(header, "memory_size", memory_size)
    _put(header, "flags", FLAG_COMPLETE if complete else 0)
    _put(header, "hash_algo", HashAlgo.SHA256)
    _put(header, "hypervisor", hypervisor.encode("ascii"))
    _put(header, "content_hash", content_hash)
    _put(header, "vcpu_count", len(vcpu_states))
    _put(header, "vcpu_area", pack_vcpu_area(vcpu_states, vcpu_kinds))
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


def _hash_file_range(f, offset: int, size: int) -> bytes:
    """sha256 of size bytes at offset, read through one fixed-size buffer.

    Holes (SEEK_HOLE, where the platform has it) hash as the zeros they read as, without being read:
    a sparse image's untouched pages cost neither I/O nor page cache."""
    h = hashlib.sha256()
    buf = bytearray(min(_HASH_CHUNK, size))
    view = memoryview(buf)
    zeros = _ZEROS
    end = offset + size
    pos = offset
    try:
        for data_start, data_end in _data_extents(f.fileno(), offset, end):
            while pos < data_start:  # a hole
                n = min(len(zeros), data_start - pos)
                h.update(zeros[:n])
                pos += n
            f.seek(pos)
            while pos < data_end:
                n = f.readinto(view[:min(data_end - pos, len(buf))])
                if not n:
                    raise SnapshotFormatError("memory_size", f"{_hex(size)} bytes of memory image",
                                              f"the file end {_hex(pos - offset)} bytes in (file shrank)",
                                              getattr(f, "name", None), prefix="snapshot file truncated")
                h.update(view[:n])
                pos += n
    finally:
        view.release()
    return h.digest()


def _data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
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


class SnapshotWriter:
    """A snapshot file being written. ``memory`` is a writable view of the
    file's memory region (a shared mapping): whatever lands there is in the
    file. Call ``finalize()`` to seal it, or ``abort()`` to give up."""

    def __init__(self, path, memory_size: int, arch: Arch, hypervisor: str):
        self.path = os.fspath(path)
        self.memory_size = memory_size
        self.arch = arch
        self.hypervisor = hypervisor
        self.closed = False
        total = MEMORY_OFFSET + memory_size
        # Unbuffered, so header writes go straight to the file.
        self._file = open(self.path, "w+b", buffering=0)  # noqa: SIM115 - closed by finalize/abort
        try:
            self._file.truncate(total)  # sparse zeros on Linux; no data copied
            # COMPLETE clear until finalize: a capture that dies leaves a file
            # that says so, with a valid checksum so the loader can name why.
            self._file.write(pack_header(memory_size=memory_size, arch=arch, hypervisor=hypervisor,
                                         complete=False))
            # Map the whole file: Windows needs view offsets aligned to 64 KiB,
            # so mapping only the region at 4096 would not port.
            self._mm = mmap.mmap(self._file.fileno(), total, access=mmap.ACCESS_WRITE)
        except BaseException:
            self._file.close()
            raise
        self.memory = memoryview(self._mm)[MEMORY_OFFSET:]

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
        try:
            self._mm.close()
        except BufferError:
            self.memory = memoryview(self._mm)[MEMORY_OFFSET:]  # stay usable for a retry
            raise in_use from None

    def finalize(self, vcpu_states: Iterable[bytes] = (), *, vcpu_kind: int | None = None) -> SnapshotImage:
        """Hash the memory, write the header with COMPLETE set, close, and
        return the image as the loader sees it. vCPU states are opaque bytes,
        all tagged ``vcpu_kind`` (default: the hypervisor's kind)."""
        if self.closed:
            raise ValueError(f"{self.path}: snapshot writer already closed")
        states = [bytes(s) for s in vcpu_states]
        kind = DEFAULT_VCPU_KIND[self.hypervisor] if vcpu_kind is None else VcpuKind(vcpu_kind)
        pack_vcpu_area(states, [kind] * len(states))  # a too-big state fails here, before any write
        self._mm.flush()
        self._unmap()  # nobody can write after the hash below is taken
        f = self._file
        try:
            # Data durable before the header says COMPLETE: a power cut in between
            # leaves an incomplete file, never a complete one with stale pages.
            os.fsync(f.fileno())
            digest = _hash_file_range(f, MEMORY_OFFSET, self.memory_size)
            f.seek(0)
            f.write(pack_header(memory_size=self.memory_size, arch=self.arch, hypervisor=self.hypervisor,
                                complete=True, content_hash=digest, vcpu_states=states,
                                vcpu_kinds=[kind] * len(states)))
            os.fsync(f.fileno())
        finally:
            self.closed = True
            f.close()
        return SnapshotImage.open(self.path, verify=False)

    def abort(self) -> None:
        """Give up: the file stays on disk, marked incomplete. Never raises
        BufferError: if a caller still holds a pointer, the mapping lives
        until that pointer goes, then is unmapped by the garbage collector."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(BufferError):
            self.memory.release()
            self._mm.close()
        self._file.close()


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
    vcpu_kinds: tuple[int, ...]
    vcpu_states: tuple[bytes, ...]
    header_checksum: bytes
    file_length: int
    verified: bool

    @staticmethod
    def create(path, memory_size: int, *, arch: Arch | str | int = Arch.X86_64,
               hypervisor: str = "kvm") -> SnapshotWriter:
        """Start a snapshot file of memory_size bytes; see SnapshotWriter."""
        checked_arch = _check_create_args(memory_size, arch, hypervisor)
        return SnapshotWriter(path, memory_size, checked_arch, hypervisor)

    @classmethod
    def write(cls, path, memory, *, vcpu_states: Iterable[bytes] = (), arch: Arch | str | int = Arch.X86_64,
              hypervisor: str = "kvm") -> SnapshotImage:
        """Write a whole snapshot from a bytes-like memory image in one call."""
        with memoryview(memory) as src, src.cast("B") as flat, \
                cls.create(path, flat.nbytes, arch=arch, hypervisor=hypervisor) as w:
            w.memory[:] = flat
            return w.finalize(vcpu_states)

    @classmethod
    def open(cls, path, verify: bool = True, *, allow_incomplete: bool = False) -> SnapshotImage:
        """Load and check a snapshot header. verify=False skips only the content
        hash (it reads the whole image); allow_incomplete is for diagnostics."""
        with open(path, "rb", buffering=0) as f:
            length = os.fstat(f.fileno()).st_size
            header = f.read(HEADER_SIZE)
            img = cls._parse(os.fspath(path), header, length, allow_incomplete)
            if verify:
                img._verify_with(f)
        return img

    @classmethod
    def _parse(cls, path: str, header: bytes, length: int, allow_incomplete: bool) -> SnapshotImage:
        def fail(field, expected, seen, prefix="snapshot header"):
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
        if img.format_version != FORMAT_VERSION:
            fail("format_version", str(FORMAT_VERSION), str(img.format_version))
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
        algo = _get(header, "hash_algo")
        if algo not in _values(HashAlgo):
            fail("hash_algo", _enum_name(HashAlgo, HashAlgo.SHA256), _enum_name(HashAlgo, algo))
        img.hash_algo = HashAlgo(algo)
        raw_tag = _get(header, "hypervisor")
        tag = raw_tag.rstrip(b"\0")
        if tag.decode("ascii", "replace") not in HYPERVISORS:
            fail("hypervisor", " or ".join(repr(h) for h in HYPERVISORS), repr(raw_tag))
        img.hypervisor = tag.decode("ascii")
        if any(_get(header, "reserved")):
            fail("reserved", "all zero", _get(header, "reserved").hex())

        # Sizes against the file: python ints cannot overflow, and nothing is
        # allocated from memory_size until it matches the bytes on disk.
        img.memory_size = _get(header, "memory_size")
        if img.memory_size == 0 or img.memory_size % img.page_size:
            fail("memory_size", f"a positive multiple of page_size {_hex(img.page_size)}",
                 _hex(img.memory_size))
        held = length - img.memory_offset
        if img.memory_size > held:
            fail("memory_size", f"at most {_hex(max(held, 0))} (file length {_hex(length)} - memory_offset "
                 f"{_hex(img.memory_offset)})", _hex(img.memory_size), "snapshot file truncated")
        if img.memory_size < held:
            fail("memory_size", f"{_hex(held)} (file length {_hex(length)} - memory_offset "
                 f"{_hex(img.memory_offset)})", _hex(img.memory_size))

        img.vcpu_kinds, img.vcpu_states = cls._parse_vcpu_area(header, fail)

        img.header_checksum = _get(header, "header_checksum")
        want = header_checksum(header)
        if img.header_checksum != want:
            fail("header_checksum", want.hex(), img.header_checksum.hex())
        img.content_hash = _get(header, "content_hash")
        return img

    @staticmethod
    def _parse_vcpu_area(header: bytes, fail) -> tuple[tuple[int, ...], tuple[bytes, ...]]:
        count = _get(header, "vcpu_count")
        most = VCPU_AREA_SIZE // VCPU_RECORD_HEAD.size
        if count > most:  # checked first, so a huge count never drives the loop
            fail("vcpu_count", f"at most {most} (records of {VCPU_RECORD_HEAD.size}+ bytes in "
                 f"{VCPU_AREA_SIZE})", str(count))
        area = header[VCPU_AREA_OFFSET:VCPU_AREA_OFFSET + VCPU_AREA_SIZE]
        kinds, states, pos = [], [], 0
        for i in range(count):
            if pos + VCPU_RECORD_HEAD.size > VCPU_AREA_SIZE:
                fail(f"vcpu[{i}]", f"a record inside the {VCPU_AREA_SIZE}-byte vcpu_area",
                     f"the area ends at record offset {pos}")
            kind, size = VCPU_RECORD_HEAD.unpack_from(area, pos)
            if kind not in _values(VcpuKind):
                fail(f"vcpu[{i}].kind", " or ".join(_enum_name(VcpuKind, k) for k in VcpuKind),
                     _enum_name(VcpuKind, kind))
            start = pos + VCPU_RECORD_HEAD.size
            if size > VCPU_AREA_SIZE - start:
                fail(f"vcpu[{i}].length", f"at most {VCPU_AREA_SIZE - start} (what is left of vcpu_area)",
                     str(size))
            end = start + size
            pos = min(_pad8(end), VCPU_AREA_SIZE)
            if any(area[end:pos]):
                fail(f"vcpu[{i}] padding", "zero", bytes(area[end:pos]).hex())
            kinds.append(kind)
            states.append(bytes(area[start:end]))
        if any(area[pos:]):
            fail("vcpu_area", f"zero after {count} record(s) (from area offset {pos})",
                 f"non-zero bytes from area offset {pos + next(i for i, b in enumerate(area[pos:]) if b)}")
        return tuple(kinds), tuple(states)

    def _verify_with(self, f) -> None:
        if not self.complete:
            raise SnapshotFormatError("content_hash", "a complete file to verify", "an incomplete file",
                                      self.path, "snapshot incomplete")
        seen = _hash_file_range(f, self.memory_offset, self.memory_size)
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
        ("vCPUs", str(len(img.vcpu_states))),
    ]
    for i, (kind, state) in enumerate(zip(img.vcpu_kinds, img.vcpu_states, strict=True)):
        lines.append((f"  vCPU {i}", f"{VcpuKind(kind).name.lower()} state, {len(state)} bytes"))
    return [f"{k:<16} {v}" for k, v in lines]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m native.image", description="snapproof snapshot files")
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
    print(f"{'content check':<16} verifies (sha256 of {human_size(img.memory_size)} matches the header)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
