"""The engine ABI (native/snapproof_engine.h) as a contract: pinned, checked on load, the only way in.

A library is refused before anything is called on it when it is not an engine, implements another ABI
version, or lacks a function, the error naming which; the built-in engine is loaded from its own library
like any other, and no Python module reaches into it another way.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.platform("linux")

ROOT = Path(__file__).resolve().parent.parent


# -- tripwires --------------------------------------------------------------------------------------------------

def test_abi_version_and_layouts_are_pinned():
    """ABI 1's structs keep their sizes: an engine built against this header must keep working. Changing a layout
    breaks every engine built before: that is a new ABI version (SPE_ABI_VERSION), not an edit."""
    from snapproof.native.engine import ABI_VERSION, ffi

    assert ABI_VERSION == 1
    sizes = {t: ffi.sizeof(t) for t in ("struct spe_config", "struct spe_fault", "struct spe_stats")}
    assert sizes == {"struct spe_config": 96, "struct spe_fault": 40, "struct spe_stats": 11360}, sizes
    assert ffi.offsetof("struct spe_config", "dst") == 48 and ffi.offsetof("struct spe_config", "point") == 80
    # Ten u64 counters and four 32-bit words, the histogram, the per-CPU counts, then the fault log.
    assert ffi.offsetof("struct spe_stats", "log") == 10 * 8 + 4 * 4 + 1024 * 8 + 64 * 8
    # The optional extension's (several snapshots per engine object): four u64 counters, then live.
    assert ffi.sizeof("struct spe_snapshot_stats") == 40 and ffi.offsetof("struct spe_snapshot_stats", "live") == 32
    # The pre-armed snapshot's: five u64s.
    assert ffi.sizeof("struct spe_prearm_stats") == 40 and ffi.offsetof("struct spe_prearm_stats", "arm_ns") == 32
    c = ffi.dlopen(None)
    assert (c.SPE_CAP_OVERLAPPING, c.SPE_CAP_CONSECUTIVE, c.SPE_CAP_PREARMED) == (1, 2, 4)


def test_named_points_are_the_same_numbers_in_the_abi_and_the_suite():
    """The points the suite holds (native.points.Point) are the ABI's enum spe_point."""
    from snapproof.native.engine import ffi
    from snapproof.native.points import Point

    c = ffi.dlopen(None)
    assert {p.name: int(p) for p in Point} == {p.name: getattr(c, f"SPE_POINT_{p.name}") for p in Point}


# -- loading ----------------------------------------------------------------------------------------------------

def test_builtin_engine_is_loaded_from_its_own_library():
    """The built-in engine is native/engines/libsnapproof-builtin.so opened by dlopen: name, version, sha256."""
    import hashlib

    from snapproof.native.engine import builtin_engine, engine_path

    engine = builtin_engine()
    assert engine.path == engine_path("builtin").resolve() and engine.builtin
    assert (engine.name, engine.abi_version) == ("snapproof-builtin", 1), engine.describe()
    assert engine.sha256 == hashlib.sha256(engine.path.read_bytes()).hexdigest()


def test_no_module_reaches_the_builtin_engine_but_through_the_abi():
    """No private shortcut: nothing in Python calls the built-in engine's own C functions (sp_wp_*)."""
    sources = [p for d in ("native", "phases", "tests", "results") for p in (ROOT / d).rglob("*.py")]
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in sources
            for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\blib\.sp_wp_", line)]
    assert not hits, f"calls into the built-in engine that bypass the ABI: {hits}"


def _cc() -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler: the suite's build needs one (README, Requirements)")
    return cc


def _library(tmp_path: Path, name: str, source: str) -> Path:
    src, out = tmp_path / f"{name}.c", tmp_path / f"lib{name}.so"
    src.write_text(source)
    subprocess.run([_cc(), "-shared", "-fPIC", "-o", str(out), str(src)], check=True, capture_output=True, text=True)
    return out


def test_a_library_of_another_abi_version_is_refused_naming_both(tmp_path):
    """An engine built against ABI 2 is refused before anything else is called, naming both versions."""
    from snapproof.native.engine import EngineError, load_engine

    lib = _library(tmp_path, "future", "unsigned spe_abi_version(void) { return 2; }\n")
    with pytest.raises(EngineError, match=r"implements engine ABI 2; this suite speaks ABI 1"):
        load_engine(lib)


def test_a_library_short_of_a_function_is_refused_naming_it(tmp_path):
    """An engine of ABI 1 that lacks functions is refused, naming each one it lacks."""
    from snapproof.native.engine import EngineError, load_engine

    lib = _library(tmp_path, "partial", "unsigned spe_abi_version(void) { return 1; }\n"
                                        "const char *spe_engine_name(void) { return \"partial\"; }\n")
    with pytest.raises(EngineError, match=r"does not export spe_engine_version, spe_create, spe_arm, .*spe_last_error"):
        load_engine(lib)


def test_an_engine_offering_capabilities_without_their_functions_is_refused(tmp_path):
    """An engine whose spe_capabilities() offers several snapshots per engine object must export every
    spe_snapshot_* function; one that does not is refused, naming what it lacks. The built-in engine offers both
    capabilities; naive, which has no spe_capabilities(), offers none and says so."""
    from snapproof.native.engine import ENGINE_FUNCTIONS, EngineError, builtin_engine, load_engine, repo_engine

    stubs = "".join(f"void {name}(void) {{}}\n" for name in ENGINE_FUNCTIONS if name != "spe_abi_version")
    lib = _library(tmp_path, "boastful", "unsigned spe_abi_version(void) { return 1; }\n" + stubs +
                   "unsigned long long spe_capabilities(void) { return 1; }\n"
                   "int spe_snapshot_arm(void) { return 0; }\n")
    with pytest.raises(EngineError, match=r"offers overlapping snapshots \(spe_capabilities\(\) = 0x1\) but does "
                                          r"not export spe_snapshot_bulk_copy, spe_snapshot_finalize, spe_snapshot_"):
        load_engine(lib)
    assert builtin_engine().capabilities == ["overlapping", "consecutive", "prearmed"]
    naive = repo_engine("naive-fixed")
    assert naive.capabilities == [] and naive.describe()["capabilities"] == []
    assert "does not offer overlapping snapshots" in (naive.lacks("overlapping") or "")
    assert "it does not export spe_capabilities()" in (naive.lacks("consecutive") or "")
    assert builtin_engine().lacks("overlapping") is None


def test_an_engine_offering_prearmed_snapshots_without_their_functions_is_refused(tmp_path):
    """An engine offering pre-armed snapshots must export spe_prearm, spe_arm_prearmed and spe_prearm_get_stats, and
    needs none of the several-snapshot functions; one short of them is refused naming what it lacks."""
    from snapproof.native.engine import ENGINE_FUNCTIONS, EngineError, load_engine

    stubs = "".join(f"void {name}(void) {{}}\n" for name in ENGINE_FUNCTIONS if name != "spe_abi_version")
    head = "unsigned spe_abi_version(void) { return 1; }\n" + stubs + \
        "unsigned long long spe_capabilities(void) { return 4; }\nlong long spe_prearm(void) { return 0; }\n"
    with pytest.raises(EngineError, match=r"offers prearmed snapshots \(spe_capabilities\(\) = 0x4\) but does not "
                                          r"export spe_arm_prearmed, spe_prearm_get_stats: an engine offering"):
        load_engine(_library(tmp_path, "halfarmed", head))
    whole = load_engine(_library(tmp_path, "prearmed", head + "long long spe_arm_prearmed(void) { return 0; }\n"
                                                              "void spe_prearm_get_stats(void) {}\n"))
    assert whole.capabilities == ["prearmed"] and whole.lacks("overlapping") is not None


def test_a_library_that_is_no_engine_or_no_library_is_refused(tmp_path):
    """A shared library without spe_abi_version is no engine; a path that is no library says why."""
    from snapproof.native.engine import EngineError, load_engine

    lib = _library(tmp_path, "other", "int answer(void) { return 42; }\n")
    with pytest.raises(EngineError, match="does not export spe_abi_version: not a snapproof engine"):
        load_engine(lib)
    with pytest.raises(EngineError, match="cannot read it"):
        load_engine(tmp_path / "absent.so")
    (tmp_path / "text.so").write_text("not ELF")
    with pytest.raises(EngineError, match="dlopen failed"):
        load_engine(tmp_path / "text.so")


def test_engine_option_refuses_what_it_cannot_judge(tmp_path):
    """``--engine`` with a library the suite cannot judge is a usage error naming why, before anything runs; so is
    a switch of the built-in engine given with another engine."""
    from snapproof.native.engine import engine_path

    def child(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pytest", "phases/test_phase1_wp_catches_writes.py", "-q",
                               "--results-dir", "", "--collect-only", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    missing = child("--engine", str(tmp_path / "absent.so"))
    assert missing.returncode == pytest.ExitCode.USAGE_ERROR, missing.stdout + missing.stderr
    assert "--engine: engine library" in missing.stderr and "cannot read it" in missing.stderr, missing.stderr
    switch = child("--engine", str(engine_path("naive")), "--inject", "single-flag-race")
    assert switch.returncode == pytest.ExitCode.USAGE_ERROR, switch.stdout + switch.stderr
    assert "act inside the built-in engine" in switch.stderr, switch.stderr


def test_builtin_switches_are_refused_for_another_engine(make_memory):
    """WpSnapshot refuses to hand the built-in engine's switches to an engine that has none."""
    from snapproof.native.engine import repo_engine
    from snapproof.native.inject import FaultInjection
    from snapproof.native.wp import WpSnapshot

    mem = make_memory("memfd", 1 << 20)
    with pytest.raises(ValueError, match="act inside the built-in engine; engine naive 0.1"):
        WpSnapshot(mem, bytearray(mem.size), engine=repo_engine("naive"), inject=FaultInjection.SINGLE_FLAG_RACE)


def test_an_engine_error_names_the_engine_and_its_message(make_memory):
    """A failed call says which engine, which call, and what the engine said of it (spe_last_error)."""
    from snapproof.native.engine import repo_engine
    from snapproof.native.errors import NativeError
    from snapproof.native.wp import WpSnapshot

    mem = make_memory("memfd", 1 << 20)
    with WpSnapshot(mem, bytearray(mem.size), engine=repo_engine("naive")) as snap, \
            pytest.raises(NativeError, match=r"engine naive: bulk copy: spe_bulk_copy: pages 0x100\+0x1 outside "
                                             r"guest memory failed .*errno 22"):
        snap.bulk_copy(snap.npages, 1)


def test_the_record_schema_knows_every_engine_capability():
    """The run record's engine capabilities are the engine module's names (results/schema.py cannot import it)."""
    from snapproof.native.engine import CAPABILITIES
    from snapproof.results.schema import _ENGINE

    described = next(form for form in _ENGINE["anyOf"] if "capabilities" in form.get("properties", {}))
    assert described["properties"]["capabilities"]["items"]["enum"] == list(CAPABILITIES)
