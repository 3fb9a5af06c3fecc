"""snapproof installed from its wheel runs on its own, with no checkout behind it.

The wheel is built from this checkout's files (tracked, or new and not ignored) copied to a folder of their
own, so nothing built or left in the checkout can get into it; it is installed into a fresh virtualenv; and
that install runs a phase-1 case from a folder outside the checkout. The dependencies come from the
environment running this test (a .pth line in the new virtualenv): nothing is downloaded to install
snapproof. Building the wheel needs no package index either where this environment has setuptools' wheel
builder (./setup's [dev] tools); elsewhere pip fetches setuptools from its index, as any build does.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.version import Version
from snapproof.native.wp import ENGINE_NEEDS
from snapproof.results.load import load_record

ROOT = Path(__file__).resolve().parent.parent
PHASE1_CASE = "test_guest_write_is_caught_at_the_exact_page_before_it_lands"
STEP_CEILING_S = 600  # one step (a build, an install, the phase run with its native build) on a loaded host
# The whole module: its fixtures build and install once; pytest-timeout counts them in the first test.
pytestmark = pytest.mark.timeout(3 * STEP_CEILING_S)

# Top-level names that must never be installed: the repository's folders, which an install has under snapproof
# (a package named results exists on PyPI).
FOREIGN_TOP_LEVEL = ("native", "guests", "results", "phases", "tests", "nested", "conftest.py")
# What an install needs beside the Python modules (pyproject.toml's package-data), one of each kind.
PACKAGE_DATA = ("snapproof/native/linux/snapproof.h", "snapproof/native/linux/uffd_wp.c",
                "snapproof/native/windows/whp_vm.c", "snapproof/native/snapproof_engine.h",
                "snapproof/native/engines/builtin.c", "snapproof/guests/marker16.bin", "snapproof/guests/marker16.S",
                "snapproof/phases/test_phase1_wp_catches_writes.py", "snapproof/results/gate.yaml",
                "snapproof/results/baselines/kvm_pvm.yaml", "snapproof/pyproject.toml", "snapproof/fixtures.py")


def _run(cmd: list[str | Path], what: str, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=STEP_CEILING_S, **kw)
    assert proc.returncode == 0, f"{what}: exit status {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def top_level_names(wheel: Path) -> set[str]:
    """What a wheel installs at the top of site-packages (its .dist-info aside)."""
    with zipfile.ZipFile(wheel) as z:
        return {n.split("/")[0] for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}


def files_under(folder: Path) -> dict[str, int]:
    """Every file below ``folder`` with its size: compared before and after a run, what the run wrote there."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def written(before: dict[str, int], after: dict[str, int]) -> list[str]:
    return sorted(f for f in after if before.get(f) != after[f])


def dependency_paths() -> list[str]:
    """Where this interpreter finds its packages (its site-packages and what .pth files there add), without the
    standard library and without this checkout: what the new virtualenv reads snapproof's dependencies from."""
    stdlib = {Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib")}
    out = []
    for entry in filter(None, sys.path):  # '' is the current folder, no place of packages
        path = Path(entry).resolve()
        # The checkout's own folders are left out (the wheel must bring snapproof), but not a virtualenv inside
        # it: ./setup makes .venv in the checkout, and its site-packages holds the dependencies.
        in_checkout = path == ROOT or (ROOT in path.parents and "site-packages" not in path.parts)
        if path.is_dir() and path not in stdlib and path.name != "lib-dynload" and not in_checkout:
            out.append(str(path))
    return list(dict.fromkeys(out))


def _can_build_offline() -> bool:
    """setuptools 64+ with its wheel builder here (its own from 70.1; before that the wheel package's)."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    have = Version(version("setuptools"))
    return have >= Version("70.1") or (have >= Version("64") and importlib.util.find_spec("wheel") is not None)


# What a copy of a tree that is not a git checkout (an unpacked release archive) leaves out: what .gitignore
# ignores that a build or a run writes into it.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", "*.egg-info", "build", "_build_tmp",
                                    "*.so", "*.pyd", "*.sources-sha256", "out", "runs", "ab", "teeth",
                                    ".benchmarks", ".hypothesis", ".pytest_cache", "snapproof-results")


def source_files() -> list[str]:
    """The checkout's files, as git knows them (tracked and new, not ignored); [] without git (an unpacked archive)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return []
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], "git ls-files",
                  cwd=ROOT).stdout
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]  # deleted: still indexed


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    if names := source_files():
        for name in names:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    else:
        shutil.copytree(ROOT, source, ignore=NOT_SOURCE, dirs_exist_ok=True)
    dist = tmp_path_factory.mktemp("dist")
    isolation = ["--no-build-isolation", "--no-index"] if _can_build_offline() else []
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", dist, source], "pip wheel",
         env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    (built,) = dist.glob("snapproof-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed (no dependencies: they come from this environment)."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", venv], "python -m venv")
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     "the virtualenv's site-packages").stdout.strip())
    (site / "snapproof-test-dependencies.pth").write_text("".join(f"{p}\n" for p in dependency_paths()))
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], "pip install the wheel",
         env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    return venv


def test_the_wheel_installs_one_package_with_its_sources_binaries_and_settings(wheel: Path) -> None:
    """The wheel holds snapproof alone at the top, with the C sources, guest binaries, phases, policy, baseline and
    pytest settings as package data, the pytest plugin's entry point and the snapproof command, and no build."""
    assert top_level_names(wheel) == {"snapproof"}, f"{wheel.name} installs {sorted(top_level_names(wheel))}"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        missing = [f for f in PACKAGE_DATA if f not in names]
        assert not missing, f"{wheel.name} lacks {missing}"
        built = sorted(n for n in names if n.endswith((".so", ".pyd")) or "_build_tmp" in n)
        assert not built, f"{wheel.name} carries build output: {built}"
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "[pytest11]\nsnapproof.fixtures = snapproof.fixtures" in entry_points, entry_points
    assert "[console_scripts]\nsnapproof = snapproof.cli:main" in entry_points, entry_points


@pytest.mark.needs("kvm", *ENGINE_NEEDS)
def test_the_installed_wheel_runs_phase1_outside_the_checkout_building_into_the_user_cache(
        installed: Path, tmp_path: Path) -> None:
    """`snapproof phases -k ...` from a folder outside the checkout runs phase 1 from the install and passes; the C
    is built into the per-user cache, the record goes to the current folder, and the install is left as it was."""
    site = next(installed.glob("lib/python*/site-packages"))
    assert not [n for n in FOREIGN_TOP_LEVEL if (site / n).exists()], f"top-level names in {site}"
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    # No bytecode written either: then the run writes nothing at all into the install, as a read-only one needs
    # (a file mode proves nothing to root, which CI runs as).
    env.update(XDG_CACHE_HOME=str(cache), PYTHONDONTWRITEBYTECODE="1")
    before = files_under(site)

    run = subprocess.run([installed / "bin" / "snapproof", "phases", "-k", f"{PHASE1_CASE} and 1MiB",
                          "--reports", "short"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=STEP_CEILING_S)

    output = f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    assert run.returncode == 0, output
    records = sorted((work / "snapproof-results" / "runs").glob("*.yaml"))
    assert len(records) == 1, f"expected one run record in {work}/snapproof-results/runs: {records}\n{output}"
    record = load_record(records[0])
    (phase1,) = record["phases"]
    assert (phase1["phase"], phase1["outcome"]) == (1, "PASS"), phase1
    assert [c["nodeid"] for c in phase1["cases"]] == [f"phases/test_phase1_wp_catches_writes.py::{PHASE1_CASE}[1MiB]"]
    engine = Path(record["run"]["engine"]["library"])
    assert engine.is_relative_to(cache / "snapproof"), f"the engine was loaded from {engine}, not the cache {cache}"
    assert list((cache / "snapproof").glob(f"*/_linux{sysconfig.get_config_var('EXT_SUFFIX')}")), \
        f"no compiled module in the cache: {sorted(files_under(cache))}"
    assert written(before, files_under(site)) == [], f"the run wrote into the install {site}"

    for name in ("native", "guests", "results"):
        probe = subprocess.run([installed / "bin" / "python", "-c", f"import {name}"], cwd=work, env=env,
                               capture_output=True, text=True, timeout=60)
        assert f"No module named '{name}'" in probe.stderr, f"`import {name}` in the install: {probe.stderr}"


# -- the checks above can fail ------------------------------------------------------------------------------------


def test_a_wheel_with_a_top_level_native_is_seen(tmp_path: Path) -> None:
    """The layout check names a package installed at the top beside snapproof."""
    wheel = tmp_path / "bad-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name in ("snapproof/__init__.py", "native/__init__.py", "bad-0.dist-info/RECORD"):
            z.writestr(name, "")
    assert top_level_names(wheel) == {"snapproof", "native"}


def test_a_file_written_into_the_install_is_seen(tmp_path: Path) -> None:
    """The read-only check names a module built beside the sources, and a changed file."""
    (tmp_path / "native").mkdir()
    (tmp_path / "native" / "kvm.py").write_text("x")
    before = files_under(tmp_path)
    (tmp_path / "native" / "_linux.so").write_text("elf")
    (tmp_path / "native" / "kvm.py").write_text("xy")
    assert written(before, files_under(tmp_path)) == ["native/_linux.so", "native/kvm.py"]
