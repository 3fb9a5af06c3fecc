"""Transparent huge pages: the kernel's knobs, read and (only on request) set, and the folio behind a page.

/sys/kernel/mm/transparent_hugepage holds ``enabled`` (anonymous PMD-size THP: always, madvise, never),
``shmem_enabled`` (shmem, so memfd guest memory: always, within_size, advise, never, deny, force) and, from
6.8, ``hugepages-<n>kB/enabled`` per anonymous multi-size THP (mTHP) size (always, inherit, madvise,
never; ``inherit`` follows ``enabled``). snapproof maps THP guest memory with MADV_HUGEPAGE, so "madvise"
is all it needs; ``--thp`` sets that for the run and puts every knob back at exit (``KnobChanges``).

Whether a page is really backed by a huge folio: /proc/self/pagemap gives its frame (root only: without
CAP_SYS_ADMIN the kernel reports frame 0), /proc/kpageflags the frame's flags (KPF_THP, compound head and
tail), and a folio's frames are contiguous, so its size is its run of tails. Pure Python: the host probe
reads the knobs on any Linux host, and nothing here imports the native layer.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KNOB_DIR = Path("/sys/kernel/mm/transparent_hugepage")
ENABLED = KNOB_DIR / "enabled"
SHMEM_ENABLED = KNOB_DIR / "shmem_enabled"
PMD_SIZE = 2 << 20
PAGE_SIZE = 4096
# Settings under which a MADV_HUGEPAGE mapping gets huge pages.
ANON_ON = ("always", "madvise")
SHMEM_ON = ("always", "within_size", "advise", "force")
MTHP_ON = ("always", "madvise")  # "inherit" is on when ENABLED is

# What each THP backing needs of the host (native.host capability names), as the other backings' needs are
# tabled: make_memory requires it, and a case whose ``backing`` parameter names one needs it.
THP_BACKING_NEEDS: dict[str, tuple[str, ...]] = {"anonymous-thp": ("thp.anonymous",), "memfd-thp": ("thp.shmem",)}

KPF_COMPOUND_HEAD = 1 << 15
KPF_COMPOUND_TAIL = 1 << 16
KPF_THP = 1 << 22
PR_SET_THP_DISABLE = 41
PR_GET_THP_DISABLE = 42
PM_PRESENT = 1 << 63
PM_PFN_MASK = (1 << 55) - 1


def read_knob(path: Path) -> str | None:
    """The chosen value of a THP knob (the bracketed word), None where the kernel has no such file."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if "[" in text:
        return text.split("[", 1)[1].split("]", 1)[0]
    return text.strip() or None


def mthp_knob(size: int) -> Path:
    return KNOB_DIR / f"hugepages-{size >> 10}kB" / "enabled"


def mthp_sizes() -> list[int]:
    """The anonymous mTHP sizes this kernel offers below the PMD size (bytes), smallest first; [] before 6.8."""
    if not KNOB_DIR.is_dir():
        return []
    sizes = []
    for d in KNOB_DIR.glob("hugepages-*kB"):
        kb = d.name[len("hugepages-"):-len("kB")]
        if kb.isdigit() and (d / "enabled").is_file() and int(kb) << 10 < PMD_SIZE:
            sizes.append(int(kb) << 10)
    return sorted(sizes)


def _knob_text(path: Path) -> str:
    return f"{path} = {read_knob(path) or 'absent'}"


def anonymous_missing() -> str | None:
    """Why a MADV_HUGEPAGE anonymous mapping gets no PMD-size huge pages here, or None."""
    value = read_knob(ENABLED)
    if value in ANON_ON:
        pmd = read_knob(mthp_knob(PMD_SIZE))  # 6.8+: the PMD size has its own knob, "inherit" by default
        if pmd is None or pmd in (*MTHP_ON, "inherit"):
            return None
        return f"{_knob_text(mthp_knob(PMD_SIZE))} (needs madvise, always or inherit)"
    return f"{_knob_text(ENABLED)} (needs madvise or always)"


def shmem_missing() -> str | None:
    """Why a MADV_HUGEPAGE memfd mapping gets no huge pages here, or None."""
    value = read_knob(SHMEM_ENABLED)
    return None if value in SHMEM_ON else f"{_knob_text(SHMEM_ENABLED)} (needs advise, always, within_size or force)"


def mthp_missing(size: int) -> str | None:
    """Why a MADV_HUGEPAGE anonymous mapping gets no folios of ``size`` here, or None."""
    path = mthp_knob(size)
    value = read_knob(path)
    if value in MTHP_ON or (value == "inherit" and read_knob(ENABLED) in ANON_ON):
        return None
    if value is None:
        return f"{path} absent (anonymous mTHP arrived in 6.8)"
    return f"{_knob_text(path)} (needs madvise or always, or inherit with {_knob_text(ENABLED)})"


def _write_knob(path: Path, value: str) -> None:
    path.write_text(f"{value}\n")


@dataclass
class KnobChanges:
    """THP knobs set by the suite, each with the value it had first; ``restore()`` puts them all back."""

    before: dict[Path, str] = field(default_factory=dict)

    def set(self, path: Path, value: str) -> None:
        current = read_knob(path)
        if current is None:
            raise FileNotFoundError(f"{path}: no such THP knob on this kernel")
        if current == value:
            return
        self.before.setdefault(path, current)
        _write_knob(path, value)

    def restore(self) -> None:
        """Every knob back as it was, newest first; the first failure is raised once all were tried."""
        failed: OSError | None = None
        for path, value in reversed(list(self.before.items())):
            try:
                _write_knob(path, value)
            except OSError as e:
                failed = failed or e
        self.before.clear()
        if failed is not None:
            raise failed


def knobs_to_turn_on() -> list[tuple[Path, str]]:
    """What ``--thp`` sets, where it is off: anonymous THP and its PMD size, and shmem THP, on for MADV_HUGEPAGE
    mappings; (knob, value) each. The mTHP sizes are left as they are: a test that wants one size alone sets it
    for its own duration (``only_mthp_size``)."""
    todo = []
    if read_knob(ENABLED) not in ANON_ON:
        todo.append((ENABLED, "madvise"))
    if read_knob(mthp_knob(PMD_SIZE)) == "never":
        todo.append((mthp_knob(PMD_SIZE), "inherit"))
    if read_knob(SHMEM_ENABLED) not in SHMEM_ON:
        todo.append((SHMEM_ENABLED, "advise"))
    return todo


def enable_for_run(changes: KnobChanges) -> list[str]:
    """What ``--thp`` does (``knobs_to_turn_on``); returns one line per knob set."""
    done = []
    for path, value in knobs_to_turn_on():
        changes.set(path, value)
        done.append(f"{path} = {value}")
    return done


def larger_sizes_on(size: int) -> list[str]:
    """The anonymous THP sizes above ``size`` a MADV_HUGEPAGE fault may get now (the PMD size too), as knob
    settings: the kernel tries the largest first, so with any of them on, a folio of ``size`` is not what a
    fault gets."""
    on = [_knob_text(mthp_knob(s)) for s in mthp_sizes() if s > size and mthp_missing(s) is None]
    return on + ([_knob_text(ENABLED)] if anonymous_missing() is None else [])


def knobs_the_thp_cases_need() -> list[tuple[Path, str]]:
    """What a run that may not set the knobs needs set already for the THP cases: ``knobs_to_turn_on``, and
    every mTHP size on (with root, each mTHP case turns its own size on alone for its duration)."""
    return knobs_to_turn_on() + [(mthp_knob(s), "madvise") for s in mthp_sizes() if mthp_missing(s) is not None]


def knobs_writable() -> bool:
    """Whether this process may set the THP knobs (root, and /sys writable): --thp acts only then."""
    return os.access(ENABLED, os.W_OK)


def only_mthp_size(changes: KnobChanges, size: int) -> None:
    """Anonymous faults of MADV_HUGEPAGE mappings get folios of ``size`` and no other: that size's knob to
    madvise, every other size's (the PMD size's too) to never. ``changes.restore()`` undoes it."""
    for other in [*mthp_sizes(), PMD_SIZE]:
        changes.set(mthp_knob(other), "madvise" if other == size else "never")


# -- the folio behind a page ---------------------------------------------------------------------------


def page_frames(addr: int, npages: int) -> list[int] | None:
    """The frame number of each page of [addr, addr + npages pages) of this process (0 where not present);
    None when the kernel hides frames from us (no CAP_SYS_ADMIN: every present page shows frame 0)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE_SIZE * 8)
        raw = f.read(npages * 8)
    entries = struct.unpack(f"<{npages}Q", raw)
    frames = [e & PM_PFN_MASK if e & PM_PRESENT else 0 for e in entries]
    if any(e & PM_PRESENT for e in entries) and not any(frames):
        return None
    return frames


def _kpageflags(pfn: int, n: int) -> tuple[int, ...]:
    with open("/proc/kpageflags", "rb") as f:
        f.seek(pfn * 8)
        raw = f.read(n * 8)
    return struct.unpack(f"<{len(raw) // 8}Q", raw)


@dataclass(frozen=True)
class Folio:
    """The folio a page belongs to: its size in bytes and whether the kernel counts it a THP (KPF_THP)."""

    size: int
    thp: bool

    def describe(self) -> str:
        if self.size == PAGE_SIZE:
            return "a 4 KiB page"
        kind = "THP" if self.thp else "large folio"
        return f"a {self.size >> 10} KiB {kind}" if self.size < 1 << 20 else f"a {self.size >> 20} MiB {kind}"


def folio_of(addr: int) -> Folio | None:
    """The folio behind the page at ``addr`` of this process; None when it is not present or the frames or
    /proc/kpageflags are not readable here (not root)."""
    try:
        frames = page_frames(addr, 1)
        if not frames or not frames[0]:
            return None
        pfn = frames[0]
        flags = _kpageflags(pfn, 1)[0]
        if not flags & (KPF_COMPOUND_HEAD | KPF_COMPOUND_TAIL):
            return Folio(PAGE_SIZE, False)
        # A folio's frames are contiguous and at most PMD-size: its head lies at most 511 frames back.
        span = PMD_SIZE // PAGE_SIZE
        start = max(pfn - span + 1, 0)
        back = _kpageflags(start, pfn - start + 1)
        head = pfn
        while head > start and back[head - start] & KPF_COMPOUND_TAIL:
            head -= 1
        ahead = _kpageflags(head, span)
        n = 1
        while n < len(ahead) and ahead[n] & KPF_COMPOUND_TAIL:
            n += 1
        return Folio(n * PAGE_SIZE, bool(ahead[0] & KPF_THP))
    except OSError:
        return None


class CollapseLoop:
    """A host thread asking the kernel to collapse ``memory`` into huge pages (MADV_COLLAPSE, what khugepaged
    does in its own time) over and over until ``stop()``: huge pages come and go under whatever else runs.
    ``outcomes`` counts the answers: 0 collapsed, else the errno the kernel refused with. A context manager."""

    def __init__(self, memory: Any, pause_s: float = 0.001) -> None:
        import threading

        self.memory = memory
        self.pause_s = pause_s
        self.outcomes: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="thp-collapser", daemon=True)

    def _run(self) -> None:
        collapse = self.memory.collapse
        while not self._stop.is_set():
            err = collapse()
            self.outcomes[err] = self.outcomes.get(err, 0) + 1
            self._stop.wait(self.pause_s)

    def start(self) -> CollapseLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop and join (one MADV_COLLAPSE of the whole mapping bounds the wait); RuntimeError if it hangs."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the MADV_COLLAPSE thread is still running {timeout} s after stop()")

    def describe(self) -> str:
        import errno

        if not self.outcomes:
            return "no MADV_COLLAPSE call finished"
        parts = [f"{n}x {'collapsed' if err == 0 else f'refused ({errno.errorcode.get(err, err)}: {os.strerror(err)})'}"
                 for err, n in sorted(self.outcomes.items())]
        return ", ".join(parts)

    def __enter__(self) -> CollapseLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def disabled_for_process() -> Iterator[None]:
    """No new huge pages anywhere in this process while inside (PR_SET_THP_DISABLE: no THP fault, and
    khugepaged leaves its mappings alone), the earlier setting back at exit. What a resident-memory gauge
    needs where ``enabled`` is ``always`` (Debian's default): there khugepaged collapses the Python heap into
    2 MiB pages in its own time, and VmRSS jumps by up to 2 MiB at once for memory nobody newly used."""
    libc = ctypes.CDLL(None, use_errno=True)
    before = libc.prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0)
    if before < 0 or libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_THP_DISABLE): {os.strerror(err)}")
    try:
        yield
    finally:
        libc.prctl(PR_SET_THP_DISABLE, before, 0, 0, 0)

