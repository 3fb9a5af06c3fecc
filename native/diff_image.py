"""The snapproof diff file: the pages written since a parent snapshot, naming that parent by content hash.

An incremental snapshot is a chain: one base, a full snapshot file (native/image.py), then diff
files, each holding only the pages written since its parent (the base, or the diff before it)
and the vCPU states at its own instant. Restoring the chain gives the base's memory with each
diff's pages put in place, the newest diff's over an older one's.

Layout of a diff file (all integers little-endian)::

    0x0000                header page (4096 bytes, table below)
    0x1000                page bitmap: bitmap_size bytes; bit i of u64 word i/64 = page i
                          (KVM's dirty-log layout: on a little-endian host, byte i/8, bit i%8)
    pages_offset          the pages the bitmap names, page_count x page_size, lowest page first;
                          page-aligned, so a loader can map them
    vcpu_offset           the vCPU section: the snapshot file's records (native/image.py), this
                          diff's instant

Header page::

    offset  size  field               meaning
    ------  ----  ------------------  ------------------------------------------------------------
    0x000      8  magic               b"SNAPDIFF"
    0x008      4  format_version      1
    0x00c      4  header_size         4096
    0x010      4  arch                Arch: 1 = x86_64
    0x014      4  page_size           4096
    0x018      8  memory_size         bytes of guest memory the chain describes (the base's)
    0x020      4  flags               bit 0 COMPLETE: the diff was written to its end; other bits 0
    0x024      4  hash_algo           HashAlgo: 1 = sha256
    0x028     16  hypervisor          ASCII tag, NUL-padded: "kvm" or "whp"
    0x038     32  parent_hash         the parent's content hash: the base's content_hash (its
                                      hash_algo's hash of its memory image) or the previous diff's content_hash
    0x058     32  content_hash        sha256 of parent_hash, the bitmap and the pages: names this
                                      diff, and through parent_hash the whole chain before it
    0x078      8  bitmap_offset       4096
    0x080      8  bitmap_size         8 * ceil(memory_size / page_size / 64)
    0x088      8  page_count          set bits in the bitmap
    0x090      8  pages_offset        bitmap_offset + bitmap_size, rounded up to a page
    0x098      4  vcpu_count          vCPU records in the vCPU section
    0x09c      4  vcpu_state_version  1 (native/image.py)
    0x0a0      8  vcpu_offset         pages_offset + page_count * page_size
    0x0a8      8  vcpu_size           bytes of the vCPU section, a multiple of 8; the file ends there
    0x0b0     32  vcpu_hash           sha256 of the vCPU section
    0x0d0   3856  reserved            zero
    0xfe0     32  header_checksum     sha256 of the header page with this field zeroed

Opening trusts nothing: magic, format_version, header_size, flags, arch, page_size, hash_algo,
hypervisor, reserved, memory_size, bitmap_offset, bitmap_size, page_count, pages_offset,
vcpu_offset, vcpu_size against the file length, vcpu_state_version, the header checksum, then the
bitmap (no bit past the last page, page_count bits set), the vCPU section and, verified, the
content hash; each failure is a SnapshotFormatError naming the field. ``open_chain`` then checks
that each diff's parent_hash is its parent's content_hash, and refuses a wrong or missing parent
naming both files and both hashes.

Pure Python, for both platforms, like the snapshot file.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn

from snapproof.native.image import (
    DEFAULT_VCPU_KIND,
    HYPERVISORS,
    VCPU_SECTION_MAX,
    VCPU_STATE_VERSION,
    Arch,
    HashAlgo,
    SnapshotFormatError,
    SnapshotImage,
    VcpuKind,
    header_checksum,
    pack_vcpu_section,
)

MAGIC = b"SNAPDIFF"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
PAGE_SIZE = 4096
BITMAP_OFFSET = HEADER_SIZE
FLAG_COMPLETE = 0x1
KNOWN_FLAGS = FLAG_COMPLETE

# name -> (offset, struct format): the one source of the layout (packing, parsing, tripwires, the
# negative tests' corruption helper).
FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0x000, "8s"),
    "format_version": (0x008, "<I"),
    "header_size": (0x00C, "<I"),
    "arch": (0x010, "<I"),
    "page_size": (0x014, "<I"),
    "memory_size": (0x018, "<Q"),
    "flags": (0x020, "<I"),
    "hash_algo": (0x024, "<I"),
    "hypervisor": (0x028, "16s"),
    "parent_hash": (0x038, "32s"),
    "content_hash": (0x058, "32s"),
    "bitmap_offset": (0x078, "<Q"),
    "bitmap_size": (0x080, "<Q"),
    "page_count": (0x088, "<Q"),
    "pages_offset": (0x090, "<Q"),
    "vcpu_count": (0x098, "<I"),
    "vcpu_state_version": (0x09C, "<I"),
    "vcpu_offset": (0x0A0, "<Q"),
    "vcpu_size": (0x0A8, "<Q"),
    "vcpu_hash": (0x0B0, "32s"),
    "reserved": (0x0D0, "3856s"),
    "header_checksum": (0xFE0, "32s"),
}
PREFIX = "diff header"
_HASH_CHUNK = 1 << 20


def _hex(n: int) -> str:
    return f"{n:#x}"


def _get(header: bytes, name: str):
    offset, fmt = FIELDS[name]
    return struct.unpack_from(fmt, header, offset)[0]


def _put(header: bytearray, name: str, value) -> None:
    offset, fmt = FIELDS[name]
    struct.pack_into(fmt, header, offset, value)


def _round_up(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


def bitmap_size(memory_size: int) -> int:
    """Bytes of the page bitmap for ``memory_size`` bytes of memory: one bit a page, whole u64 words."""
    return 8 * ((memory_size // PAGE_SIZE + 63) // 64)


def pages_offset(memory_size: int) -> int:
    return _round_up(BITMAP_OFFSET + bitmap_size(memory_size), PAGE_SIZE)


# -- page bitmaps: bit i of u64 word i/64 = page i (KVM's dirty-log layout) -------------------------


def empty_bitmap(npages: int) -> bytearray:
    return bytearray(8 * ((npages + 63) // 64))


def bitmap_of(pages: Iterable[int], npages: int) -> bytearray:
    """A bitmap with ``pages`` set."""
    out = empty_bitmap(npages)
    for p in pages:
        if not 0 <= p < npages:
            raise ValueError(f"page {p:#x} is outside memory of {npages:#x} pages")
        out[p >> 3] |= 1 << (p & 7)
    return out


def pages_in(bitmap: bytes | bytearray) -> Iterator[int]:
    """The pages a bitmap names, lowest first."""
    for i, byte in enumerate(bitmap):
        while byte:
            low = byte & -byte
            yield 8 * i + low.bit_length() - 1
            byte ^= low


def count(bitmap: bytes | bytearray) -> int:
    return int.from_bytes(bitmap, "little").bit_count()


def union(*bitmaps: bytes | bytearray) -> bytearray:
    size = max(len(b) for b in bitmaps)
    value = 0
    for b in bitmaps:
        value |= int.from_bytes(b, "little")
    return bytearray(value.to_bytes(size, "little"))


def minus(a: bytes | bytearray, b: bytes | bytearray) -> bytearray:
    """Pages in ``a`` and not in ``b``."""
    value = int.from_bytes(a, "little") & ~int.from_bytes(b, "little")
    return bytearray(value.to_bytes(len(a), "little"))


def intersect(a: bytes | bytearray, b: bytes | bytearray) -> bytearray:
    value = int.from_bytes(a, "little") & int.from_bytes(b, "little")
    return bytearray(value.to_bytes(len(a), "little"))


# -- the header -----------------------------------------------------------------------------------


def pack_header(*, memory_size: int, parent_hash: bytes, content_hash: bytes, page_count: int, complete: bool,
                arch: int = Arch.X86_64, hypervisor: str = "kvm", vcpu_section: bytes = b"",
                vcpu_count: int = 0) -> bytes:
    """A header page for these values, checksum included."""
    header = bytearray(HEADER_SIZE)
    pages_at = pages_offset(memory_size)
    for name, value in (("magic", MAGIC), ("format_version", FORMAT_VERSION), ("header_size", HEADER_SIZE),
                        ("arch", int(arch)), ("page_size", PAGE_SIZE), ("memory_size", memory_size),
                        ("flags", FLAG_COMPLETE if complete else 0), ("hash_algo", HashAlgo.SHA256),
                        ("hypervisor", hypervisor.encode("ascii")), ("parent_hash", parent_hash),
                        ("content_hash", content_hash), ("bitmap_offset", BITMAP_OFFSET),
                        ("bitmap_size", bitmap_size(memory_size)), ("page_count", page_count),
                        ("pages_offset", pages_at), ("vcpu_count", vcpu_count),
                        ("vcpu_state_version", VCPU_STATE_VERSION),
                        ("vcpu_offset", pages_at + page_count * PAGE_SIZE), ("vcpu_size", len(vcpu_section)),
                        ("vcpu_hash", hashlib.sha256(vcpu_section).digest())):
        _put(header, name, value)
    _put(header, "header_checksum", header_checksum(bytes(header)))
    return bytes(header)


def _content_hash(f, parent_hash: bytes, bitmap: bytes, pages_at: int, npages: int) -> bytes:
    """sha256 of parent_hash, the bitmap and the packed pages, read through one fixed-size buffer."""
    h = hashlib.sha256(parent_hash)
    h.update(bitmap)
    f.seek(pages_at)
    left = npages * PAGE_SIZE
    buf = bytearray(min(_HASH_CHUNK, max(left, 1)))
    view = memoryview(buf)
    try:
        while left:
            n = f.readinto(view[:min(left, len(buf))])
            if not n:
                raise SnapshotFormatError("page_count", f"{npages} pages at {_hex(pages_at)}",
                                          "the file end before them (file shrank after open)",
                                          getattr(f, "name", None), "diff file truncated")
            h.update(view[:n])
            left -= n
    finally:
        view.release()
    return h.digest()


# -- writing --------------------------------------------------------------------------------------


class DiffWriter:
    """A diff file being written. ``pages`` is a writable view of the file's page area: page_count pages,
    the k-th for the k-th page the bitmap names. ``finalize()`` seals it; ``abort()`` leaves it marked
    incomplete (as the snapshot writer does)."""

    def __init__(self, path, memory_size: int, parent_hash: bytes, bitmap: bytes | bytearray,
                 arch: Arch, hypervisor: str) -> None:
        self.path = os.fspath(path)
        self.memory_size = memory_size
        self.parent_hash = bytes(parent_hash)
        self.bitmap = bytes(bitmap)
        self.page_count = count(self.bitmap)
        self.arch = arch
        self.hypervisor = hypervisor
        self.closed = False
        self.pages_offset = pages_offset(memory_size)
        end = self.pages_offset + self.page_count * PAGE_SIZE
        self._file = open(self.path, "w+b", buffering=0)  # noqa: SIM115 - closed by finalize/abort
        try:
            self._file.truncate(end)
            self._file.write(pack_header(memory_size=memory_size, parent_hash=self.parent_hash,
                                         content_hash=bytes(32), page_count=self.page_count, complete=False,
                                         arch=arch, hypervisor=hypervisor))
            self._file.seek(BITMAP_OFFSET)
            self._file.write(self.bitmap)
            self._mm: mmap.mmap | None = None
            if self.page_count:
                self._mm = mmap.mmap(self._file.fileno(), self.page_count * PAGE_SIZE, access=mmap.ACCESS_WRITE,
                                     offset=self.pages_offset)
        except BaseException:
            self._file.close()
            raise
        self.pages = memoryview(self._mm) if self._mm is not None else memoryview(bytearray())

    def __enter__(self) -> DiffWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.closed:
            self.abort()

    def finalize(self, vcpu_states: Iterable[bytes] = (), *, vcpu_kind: int | None = None) -> DiffImage:
        """Hash, append the vCPU section, write the header with COMPLETE set; returns the diff as opened."""
        if self.closed:
            raise ValueError(f"{self.path}: diff writer already closed")
        states = [bytes(s) for s in vcpu_states]
        kind = DEFAULT_VCPU_KIND[self.hypervisor] if vcpu_kind is None else VcpuKind(vcpu_kind)
        section = pack_vcpu_section(states, [kind] * len(states))
        self.pages.release()
        if self._mm is not None:
            self._mm.flush()
            self._mm.close()
        f = self._file
        try:
            os.fsync(f.fileno())
            digest = _content_hash(f, self.parent_hash, self.bitmap, self.pages_offset, self.page_count)
            f.seek(self.pages_offset + self.page_count * PAGE_SIZE)
            f.write(section)
            os.fsync(f.fileno())
            f.seek(0)
            f.write(pack_header(memory_size=self.memory_size, parent_hash=self.parent_hash, content_hash=digest,
                                page_count=self.page_count, complete=True, arch=self.arch,
                                hypervisor=self.hypervisor, vcpu_section=section, vcpu_count=len(states)))
            os.fsync(f.fileno())
        finally:
            self.closed = True
            f.close()
        return DiffImage.open(self.path, verify=False)

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.pages.release()
        if self._mm is not None:
            self._mm.close()
        self._file.close()


# -- reading --------------------------------------------------------------------------------------


class DiffImage:
    """A checked diff file: header fields as attributes, the bitmap read, pages read on demand."""

    path: str
    format_version: int
    arch: Arch
    page_size: int
    memory_size: int
    flags: int
    complete: bool
    hash_algo: HashAlgo
    hypervisor: str
    parent_hash: bytes
    content_hash: bytes
    bitmap: bytes
    page_count: int
    pages_offset: int
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
    def create(path, memory_size: int, parent_hash: bytes, bitmap: bytes | bytearray, *,
               arch: Arch | int = Arch.X86_64, hypervisor: str = "kvm") -> DiffWriter:
        """Start a diff of the pages ``bitmap`` names, whose parent has content hash ``parent_hash``."""
        if not isinstance(memory_size, int) or memory_size <= 0 or memory_size % PAGE_SIZE:
            raise ValueError(f"memory_size: expected a positive multiple of {PAGE_SIZE:#x}, got {memory_size!r}")
        if len(bitmap) != bitmap_size(memory_size):
            raise ValueError(f"bitmap: expected {bitmap_size(memory_size)} bytes for {memory_size:#x} of memory, "
                             f"got {len(bitmap)}")
        if len(parent_hash) != 32:
            raise ValueError(f"parent_hash: expected 32 bytes (sha256), got {len(parent_hash)}")
        if hypervisor not in HYPERVISORS:
            raise ValueError(f"hypervisor: expected one of {HYPERVISORS}, got {hypervisor!r}")
        return DiffWriter(path, memory_size, parent_hash, bitmap, Arch(arch), hypervisor)

    @classmethod
    def write(cls, path, parent_hash: bytes, memory, bitmap: bytes | bytearray, *,
              vcpu_states: Iterable[bytes] = (), hypervisor: str = "kvm") -> DiffImage:
        """A whole diff in one call: the pages ``bitmap`` names, taken from the bytes-like ``memory``."""
        with memoryview(memory) as src, src.cast("B") as flat, \
                cls.create(path, flat.nbytes, parent_hash, bitmap, hypervisor=hypervisor) as w:
            for k, page in enumerate(pages_in(bitmap)):
                w.pages[k * PAGE_SIZE:(k + 1) * PAGE_SIZE] = flat[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
            return w.finalize(vcpu_states)

    @classmethod
    def open(cls, path, verify: bool = True) -> DiffImage:
        """Load and check a diff; ``verify`` also hashes its bitmap and pages against content_hash."""
        with open(path, "rb", buffering=0) as f:
            img = cls._parse(os.fspath(path), f)
            if verify:
                img._verify_with(f)
        return img

    @classmethod
    def _parse(cls, path: str, f) -> DiffImage:
        def fail(field: str, expected: str, seen: str, prefix: str = PREFIX) -> NoReturn:
            raise SnapshotFormatError(field, expected, seen, path, prefix)

        length = os.fstat(f.fileno()).st_size
        header = f.read(HEADER_SIZE)
        if header[:len(MAGIC)] != MAGIC:
            if header[:len(MAGIC)] == b"SNAPPROF":
                fail("magic", repr(MAGIC), "b'SNAPPROF': a full snapshot file, not a diff (a chain's base)")
            fail("magic", repr(MAGIC), repr(bytes(header[:len(MAGIC)])))
        if len(header) < HEADER_SIZE:
            fail("file length", f"at least {_hex(HEADER_SIZE)} bytes (the header page)", f"{_hex(length)} bytes",
                 "diff file truncated")
        img = cls.__new__(cls)
        img.path, img.file_length, img.verified = path, length, False
        img.format_version = _get(header, "format_version")
        if img.format_version != FORMAT_VERSION:
            fail("format_version", str(FORMAT_VERSION), str(img.format_version))
        if (seen := _get(header, "header_size")) != HEADER_SIZE:
            fail("header_size", _hex(HEADER_SIZE), _hex(seen))
        img.flags = _get(header, "flags")
        if img.flags & ~KNOWN_FLAGS:
            fail("flags", f"only bits {_hex(KNOWN_FLAGS)}", _hex(img.flags))
        img.complete = bool(img.flags & FLAG_COMPLETE)
        if not img.complete:
            fail("flags", "COMPLETE (0x1) set", f"{_hex(img.flags)}: the diff that wrote this file did not finish",
                 "diff incomplete")
        arch = _get(header, "arch")
        if arch not in {int(a) for a in Arch}:
            fail("arch", " or ".join(f"{int(a)} ({a.name.lower()})" for a in Arch), f"{arch} (unknown)")
        img.arch = Arch(arch)
        img.page_size = _get(header, "page_size")
        if img.page_size != PAGE_SIZE:
            fail("page_size", _hex(PAGE_SIZE), _hex(img.page_size))
        algo = _get(header, "hash_algo")
        if algo != HashAlgo.SHA256:  # a diff's own hash; its parent_hash is whatever its base's content hash is
            known = {int(a): a.name.lower() for a in HashAlgo}
            fail("hash_algo", "1 (sha256)", f"{algo} ({known.get(algo, 'unknown')})")
        img.hash_algo = HashAlgo(algo)
        raw_tag = _get(header, "hypervisor")
        tag = raw_tag.rstrip(b"\0").decode("ascii", "replace")
        if tag not in HYPERVISORS:
            fail("hypervisor", " or ".join(repr(h) for h in HYPERVISORS), repr(raw_tag))
        img.hypervisor = tag
        reserved = _get(header, "reserved")
        if any(reserved):
            at = next(i for i, b in enumerate(reserved) if b)
            fail("reserved", "all zero", f"byte {reserved[at]:#04x} at header offset {FIELDS['reserved'][0] + at:#x}")

        # Sizes: each checked against what it derives from, then against the file, before anything is read.
        img.memory_size = _get(header, "memory_size")
        if img.memory_size == 0 or img.memory_size % PAGE_SIZE:
            fail("memory_size", f"a positive multiple of page_size {_hex(PAGE_SIZE)}", _hex(img.memory_size))
        npages = img.memory_size // PAGE_SIZE
        if (seen := _get(header, "bitmap_offset")) != BITMAP_OFFSET:
            fail("bitmap_offset", _hex(BITMAP_OFFSET), _hex(seen))
        if (seen := _get(header, "bitmap_size")) != bitmap_size(img.memory_size):
            fail("bitmap_size", f"{_hex(bitmap_size(img.memory_size))} (one bit a page of memory_size, whole u64 "
                 "words)", _hex(seen))
        img.page_count = _get(header, "page_count")
        if img.page_count > npages:
            fail("page_count", f"at most {npages} (the pages of memory_size)", str(img.page_count))
        img.pages_offset = _get(header, "pages_offset")
        if img.pages_offset != pages_offset(img.memory_size):
            fail("pages_offset", f"{_hex(pages_offset(img.memory_size))} (the bitmap's end, rounded up to a page)",
                 _hex(img.pages_offset))
        img.vcpu_offset = _get(header, "vcpu_offset")
        if img.vcpu_offset != img.pages_offset + img.page_count * PAGE_SIZE:
            fail("vcpu_offset", f"{_hex(img.pages_offset + img.page_count * PAGE_SIZE)} (pages_offset + page_count "
                 "* page_size)", _hex(img.vcpu_offset))
        img.vcpu_size = _get(header, "vcpu_size")
        if img.vcpu_size % 8 or img.vcpu_size > VCPU_SECTION_MAX:
            fail("vcpu_size", f"a multiple of 8, at most {_hex(VCPU_SECTION_MAX)}", _hex(img.vcpu_size))
        if img.vcpu_offset + img.vcpu_size > length:
            fail("file length", f"{_hex(img.vcpu_offset + img.vcpu_size)} (vcpu_offset + vcpu_size)",
                 f"{_hex(length)} bytes", "diff file truncated")
        if img.vcpu_offset + img.vcpu_size < length:
            fail("file length", f"{_hex(img.vcpu_offset + img.vcpu_size)} (vcpu_offset + vcpu_size)",
                 f"{_hex(length)} bytes: {length - img.vcpu_offset - img.vcpu_size} bytes after the vCPU section")
        img.vcpu_state_version = _get(header, "vcpu_state_version")
        if img.vcpu_state_version != VCPU_STATE_VERSION:
            fail("vcpu_state_version", str(VCPU_STATE_VERSION), str(img.vcpu_state_version))
        img.header_checksum = _get(header, "header_checksum")
        if img.header_checksum != (want := header_checksum(header)):
            fail("header_checksum", want.hex(), img.header_checksum.hex())
        img.parent_hash = _get(header, "parent_hash")
        img.content_hash = _get(header, "content_hash")

        # The header is what it claims; now the bitmap and the vCPU section it describes.
        f.seek(BITMAP_OFFSET)
        img.bitmap = f.read(bitmap_size(img.memory_size))
        past = int.from_bytes(img.bitmap, "little") >> npages
        if past:
            fail("bitmap", f"no bit past page {npages - 1:#x} (the last page of memory_size)",
                 f"page {npages + (past & -past).bit_length() - 1:#x} set")
        if (seen := count(img.bitmap)) != img.page_count:
            fail("page_count", f"{seen} (the bits set in the bitmap)", str(img.page_count))
        f.seek(img.vcpu_offset)
        section = f.read(img.vcpu_size)
        img.vcpu_hash = _get(header, "vcpu_hash")
        if (got := hashlib.sha256(section).digest()) != img.vcpu_hash:
            fail("vcpu_hash", f"{img.vcpu_hash.hex()} (from header)", f"{got.hex()} (of the vCPU section)")
        img.vcpu_kinds, img.vcpu_states = SnapshotImage._parse_vcpu_section(_get(header, "vcpu_count"), section,
                                                                            path)
        return img

    def _verify_with(self, f) -> None:
        seen = _content_hash(f, self.parent_hash, self.bitmap, self.pages_offset, self.page_count)
        if seen != self.content_hash:
            raise SnapshotFormatError("content_hash", f"{self.content_hash.hex()} (from header)",
                                      f"{seen.hex()} (of parent_hash, the bitmap and the pages)", self.path, PREFIX)
        self.verified = True

    def verify(self) -> None:
        with open(self.path, "rb", buffering=0) as f:
            self._verify_with(f)

    @property
    def npages(self) -> int:
        return self.memory_size // PAGE_SIZE

    def pages(self) -> list[int]:
        """The pages this diff holds, lowest first."""
        return list(pages_in(self.bitmap))

    def read_page(self, k: int) -> bytes:
        """The k-th page stored (the k-th page ``pages()`` names)."""
        if not 0 <= k < self.page_count:
            raise ValueError(f"page {k} of a diff holding {self.page_count}")
        with open(self.path, "rb") as f:
            f.seek(self.pages_offset + k * PAGE_SIZE)
            return f.read(PAGE_SIZE)

    def map_pages(self) -> mmap.mmap | None:
        """The page area mapped read-only (None for a diff of no pages); the caller closes it."""
        if not self.page_count:
            return None
        with open(self.path, "rb") as f:
            return mmap.mmap(f.fileno(), self.page_count * PAGE_SIZE, access=mmap.ACCESS_READ,
                             offset=self.pages_offset)

    def __repr__(self) -> str:
        return (f"DiffImage({self.path!r}, memory_size={_hex(self.memory_size)}, pages={self.page_count}, "
                f"parent={self.parent_hash.hex()[:16]}, content={self.content_hash.hex()[:16]})")


def rewrite_diff_header(path, *, fix_checksum: bool = True, **fields) -> None:
    """Overwrite header fields of an existing diff in place, for negative tests: ``rewrite_diff_header(p,
    page_count=3)``. The checksum is recomputed so the loader reaches that field's own check, unless
    ``fix_checksum=False`` or ``header_checksum`` is one of the fields. Strings are ASCII-encoded."""
    with open(path, "r+b") as f:
        header = bytearray(f.read(HEADER_SIZE))
        for name, value in fields.items():
            _put(header, name, value.encode("ascii") if isinstance(value, str) else value)
        if fix_checksum and "header_checksum" not in fields:
            _put(header, "header_checksum", header_checksum(bytes(header)))
        f.seek(0)
        f.write(header)


# -- chains ---------------------------------------------------------------------------------------


class ChainError(SnapshotFormatError):
    """A chain that does not fit together: a diff whose parent is not the file before it."""


@dataclass(frozen=True)
class Chain:
    """A base and its diffs, checked to fit together (``open_chain``)."""

    base: SnapshotImage
    diffs: tuple[DiffImage, ...]

    @property
    def head(self) -> SnapshotImage | DiffImage:
        """The newest file: its instant is the chain's."""
        return self.diffs[-1] if self.diffs else self.base

    @property
    def memory_size(self) -> int:
        return self.base.memory_size

    def head_image(self) -> SnapshotImage:
        """The base's memory image with the head's vCPU states: what a restore loads before it puts the
        diffs' pages in place (the vCPUs must not run before that)."""
        import copy

        img = copy.copy(self.base)
        img.vcpu_kinds, img.vcpu_states = self.head.vcpu_kinds, self.head.vcpu_states
        return img

    def describe(self) -> str:
        return ", ".join([f"base {self.base.path}"] + [f"diff[{i + 1}] {d.path}" for i, d in enumerate(self.diffs)])


def _name(i: int, img: SnapshotImage | DiffImage) -> str:
    return f"base {img.path}" if i == 0 else f"diff[{i}] {img.path}"


def open_chain(base: str | os.PathLike[str] | SnapshotImage, diffs: Sequence[str | os.PathLike[str] | DiffImage],
               verify: bool = True) -> Chain:
    """Open a base and its diffs, oldest first, and check they make one chain: each diff's parent_hash is the
    content_hash of the file before it, and every file describes the same memory. A wrong or missing parent
    raises ChainError naming the diff, the hash it names, and the file (and hash) it got instead."""
    b = base if isinstance(base, SnapshotImage) else SnapshotImage.open(base, verify=verify)
    ds = tuple(d if isinstance(d, DiffImage) else DiffImage.open(d, verify=verify) for d in diffs)
    files: list[SnapshotImage | DiffImage] = [b, *ds]
    for i, d in enumerate(ds, start=1):
        for field in ("memory_size", "page_size", "arch", "hypervisor"):
            want, seen = getattr(b, field), getattr(d, field)
            if want != seen:
                shown = _hex if isinstance(want, int) and not isinstance(want, Arch) else repr
                raise ChainError(f"diff[{i}].{field}", f"{shown(want)} (the base's, {b.path})", shown(seen), d.path,
                                 "snapshot chain")
        parent = files[i - 1]
        if d.parent_hash == parent.content_hash:
            continue
        named = next((j for j, other in enumerate(files) if other.content_hash == d.parent_hash), None)
        if named is None:
            where = "no file of this chain has it: the diff's parent is missing (or from another chain)"
        elif named > i - 1:
            where = f"that is {_name(named, files[named])}, later in the chain: the diffs are out of order"
        else:
            where = f"that is {_name(named, files[named])}: a diff between it and this one is missing"
        raise ChainError(f"diff[{i}].parent_hash", f"{parent.content_hash.hex()} (the content_hash of its parent "
                         f"in the chain, {_name(i - 1, parent)})", f"{d.parent_hash.hex()} ({where})", d.path,
                         "snapshot chain")
    return Chain(b, ds)
