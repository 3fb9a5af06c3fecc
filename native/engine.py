"""Snapshot engines: shared libraries implementing the engine ABI (native/snapproof_engine.h), loaded by dlopen.

``load_engine(path)`` opens a library, checks the ABI version it implements before calling anything
else, checks it exports every function of the ABI, and says what it is (``Engine``: name, version, ABI
version, the library's sha256, and the optional capabilities it offers: more than one snapshot per engine
object, overlapping or consecutive). ``builtin_engine()`` is snapproof's own engine, built by ``python3 -m
snapproof build`` into native/engines/ (an install: its per-user cache) and loaded exactly the same way;
``repo_engine(name)`` is any engine of native/_engines_build.py. native.wp.WpSnapshot drives whichever it is
given; ``pytest --engine PATH`` makes one the engine under test. Linux only.
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    raise ImportError("native.engine loads Linux snapshot engines (userfaultfd): Linux only")

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

from cffi import FFI

ABI_HEADER = Path(__file__).resolve().parent / "snapproof_engine.h"
# Every function of ABI version 1, in the header's order: an engine exports them all.
ENGINE_FUNCTIONS = ("spe_abi_version", "spe_engine_name", "spe_engine_version", "spe_create", "spe_arm", "spe_disarm",
                    "spe_rearm", "spe_bulk_copy", "spe_finalize", "spe_release", "spe_get_stats", "spe_close",
                    "spe_last_error")
# ABI 1's optional extensions, each offered by a spe_capabilities() bit (itself optional: absent, no capability):
# more than one snapshot per engine object (overlapping, consecutive), and a pre-armed snapshot.
SNAPSHOT_FUNCTIONS = ("spe_snapshot_arm", "spe_snapshot_bulk_copy", "spe_snapshot_finalize", "spe_snapshot_get_stats")
PREARM_FUNCTIONS = ("spe_prearm", "spe_arm_prearmed", "spe_prearm_get_stats")


def _cdef_text() -> str:
    text = ABI_HEADER.read_text()
    return text.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]


# ABI mode: the header is the declaration, the library any engine's. One FFI for every engine: the structs
# are the ABI's, the same for all.
ffi = FFI()
ffi.cdef(_cdef_text())
# The C namespace of the process: the header's constants, before any engine is loaded.
_C = ffi.dlopen(None)
ABI_VERSION: int = _C.SPE_ABI_VERSION
# The optional capabilities (spe_capabilities() bits), by the name phases ask for them and reports show.
CAPABILITIES: dict[str, int] = {"overlapping": _C.SPE_CAP_OVERLAPPING, "consecutive": _C.SPE_CAP_CONSECUTIVE,
                                "prearmed": _C.SPE_CAP_PREARMED}
CAPABILITY_MEANING = {
    "overlapping": "a snapshot armed while an earlier one is still live (its bulk copy running)",
    "consecutive": "a snapshot armed again on an engine object that finalized one",
    "prearmed": "the region write-protected while the guest runs, the pause protecting again only the pages "
                "written since",
}
# What an engine offering each capability must export.
CAPABILITY_FUNCTIONS = {"overlapping": SNAPSHOT_FUNCTIONS, "consecutive": SNAPSHOT_FUNCTIONS,
                        "prearmed": PREARM_FUNCTIONS}


class EngineError(Exception):
    """An engine library that cannot be judged: missing, not loadable, another ABI version, a function short."""


class Engine:
    """One loaded engine library and what it says it is."""

    def __init__(self, path: Path, lib: Any, sha256: str) -> None:
        self.path = path
        self.lib = lib
        self.sha256 = sha256
        self.abi_version = int(lib.spe_abi_version())
        self.name = _text(lib.spe_engine_name())
        self.version = _text(lib.spe_engine_version())
        self.capability_bits = int(lib.spe_capabilities()) if _exports(lib, "spe_capabilities") else 0

    @property
    def capabilities(self) -> list[str]:
        """The optional capabilities this engine offers (``CAPABILITIES``), by name."""
        return [name for name, bit in CAPABILITIES.items() if self.capability_bits & bit]

    def lacks(self, capability: str) -> str | None:
        """None when the engine offers ``capability``; else why not, naming the engine and how it said so."""
        if capability in self.capabilities:
            return None
        said = (f"spe_capabilities() = {self.capability_bits:#x}, no SPE_CAP_{capability.upper()}"
                if _exports(self.lib, "spe_capabilities") else "it does not export spe_capabilities()")
        return (f"engine {self.label()} does not offer {capability} snapshots "
                f"({CAPABILITY_MEANING[capability]}): {said}")

    @property
    def builtin(self) -> bool:
        return self.path == engine_path("builtin").resolve()

    def last_error(self) -> str:
        """The engine's message for the last failure on this thread ("" if it set none)."""
        return _text(self.lib.spe_last_error())

    def label(self) -> str:
        """``naive 0.1 (libsnapproof-naive.so, sha256 1a2b3c4d5e6f)``: what reports call it."""
        return f"{self.name} {self.version} ({self.path.name}, sha256 {self.sha256[:12]})"

    def describe(self) -> dict[str, Any]:
        """The run record's ``engine``: name, version, ABI version, the library and its sha256."""
        return {"name": self.name, "version": self.version, "abi_version": self.abi_version,
                "library": str(self.path), "sha256": self.sha256, "builtin": self.builtin,
                "capabilities": self.capabilities}

    def __repr__(self) -> str:
        return f"Engine({self.label()})"


def _text(p: Any) -> str:
    return "" if p == ffi.NULL else ffi.string(p).decode(errors="replace")


_loaded: dict[tuple[Path, str], Engine] = {}
# The same file (path, inode, size, mtime) is not read and hashed again: a snapshot object is made per
# cycle, and reading the library each time cost about as much as a 1 MiB capture.
_unchanged: dict[tuple[Path, int, int, int], Engine] = {}


def load_engine(path: str | os.PathLike[str]) -> Engine:
    """Open the engine library at ``path``; EngineError naming what is wrong with it."""
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
        if (hit := _unchanged.get((p, st.st_ino, st.st_size, st.st_mtime_ns))) is not None:
            return hit
        data = p.read_bytes()
    except OSError as e:
        raise EngineError(f"engine library {path}: cannot read it: {e.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if (hit := _loaded.get((p, digest))) is None:
        hit = _load(p, digest)
    _unchanged[(p, st.st_ino, st.st_size, st.st_mtime_ns)] = hit
    return hit


def _load(p: Path, digest: str) -> Engine:
    try:
        lib = ffi.dlopen(str(p))
    except OSError as e:
        raise EngineError(f"engine library {p}: dlopen failed: {e}") from None
    missing = [name for name in ENGINE_FUNCTIONS if not _exports(lib, name)]
    if "spe_abi_version" in missing:
        raise EngineError(f"engine library {p} does not export spe_abi_version: not a snapproof engine "
                          f"(native/snapproof_engine.h, ABI {ABI_VERSION})")
    abi = int(lib.spe_abi_version())
    if abi != ABI_VERSION:
        raise EngineError(f"engine library {p} implements engine ABI {abi}; this suite speaks ABI {ABI_VERSION} "
                          f"(native/snapproof_engine.h): build the engine against this header")
    if missing:
        raise EngineError(f"engine library {p} (ABI {abi}) does not export {', '.join(missing)}: every function "
                          "of native/snapproof_engine.h is part of the ABI")
    engine = Engine(p, lib, digest)
    for capability in engine.capabilities:
        if short := [name for name in CAPABILITY_FUNCTIONS[capability] if not _exports(lib, name)]:
            raise EngineError(f"engine library {p} offers {capability} snapshots (spe_capabilities() = "
                              f"{engine.capability_bits:#x}) but does not export {', '.join(short)}: an engine "
                              f"offering {capability} snapshots exports {', '.join(CAPABILITY_FUNCTIONS[capability])}")
    _loaded[(p, digest)] = engine
    return engine


def _exports(lib: Any, name: str) -> bool:
    try:
        getattr(lib, name)
    except AttributeError:  # cffi: "function/symbol 'x' not found in library"
        return False
    return True


def engine_path(name: str) -> Path:
    """Where ``snapproof build`` puts the repository's engine ``name`` (native/_engines_build.py)."""
    from snapproof.native._engines_build import ENGINES

    try:
        return ENGINES[name].output
    except KeyError:
        raise EngineError(f"no engine {name!r} in this repository (engines: {', '.join(ENGINES)})") from None


@functools.cache
def repo_engine(name: str) -> Engine:
    """The repository's engine ``name``, built first when it is missing or stale; once per process, like the
    build: dlopen keeps the library it opened first, so a second look could only find the same engine, at about
    80 µs a call (a path resolved and the file stat'ed) between a sequence's captures."""
    _built_this_process()
    return load_engine(engine_path(name))


@functools.cache
def _built_this_process() -> None:
    """Build what is stale once per process: sources hashed per snapshot cost about 0.7 ms each time, and a
    library rebuilt under a running process would not be loaded again anyway (dlopen keeps the first)."""
    from snapproof.native.build import ensure_built

    ensure_built()


def builtin_engine() -> Engine:
    """snapproof's own engine (native/engines/builtin.c over native/linux/uffd_wp.c)."""
    return repo_engine("builtin")
