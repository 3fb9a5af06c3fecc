"""Build the native fixture layer: ``snapproof build``.

The compiled module carries a digest of its C sources and builder, so a
stale build is rebuilt instead of silently running old C. On Linux the
snapshot engines in the repository (native/_engines_build.py: the built-in
engine, naive, naive-fixed) are built the same way, each into its own
shared library implementing native/snapproof_engine.h.

Where the build goes (``output_dir()``): in a checkout, beside the sources
(native/, native/engines/), which CI, the nested runs and A/B worktrees rely
on; an installed snapproof, whose package may be read-only, builds into a
per-user cache instead, ``$XDG_CACHE_HOME/snapproof/<version>/`` (by default
``~/.cache``; ``%LOCALAPPDATA%`` on Windows), and loads the module from there.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from snapproof import CHECKOUT

NATIVE_DIR = Path(__file__).resolve().parent  # the sources
STAMP_SUFFIX = ".sources-sha256"
CACHE_VARIABLE = "LOCALAPPDATA" if sys.platform == "win32" else "XDG_CACHE_HOME"  # an install's per-user cache


@functools.cache
def output_dir() -> Path:
    """Where the compiled module and the engines' libraries are written and loaded from (see the docstring)."""
    if CHECKOUT is not None:
        return NATIVE_DIR
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("snapproof")
    except PackageNotFoundError:  # a copy of the package that was not installed: still keyed, never in the package
        release = "unversioned"
    default = Path.home() / ("AppData/Local" if sys.platform == "win32" else ".cache")
    return Path(os.environ.get(CACHE_VARIABLE) or default) / "snapproof" / release


def _writable_output_dir() -> Path:
    out = output_dir()
    try:
        (out / "engines").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"cannot create the build folder {out} ({e.strerror}): an installed snapproof builds its "
                         f"C there; point {CACHE_VARIABLE} at a writable folder") from e
    return out


class BuildError(RuntimeError):
    pass


def _platform_parts() -> tuple[str, list[Path]]:
    if sys.platform.startswith("linux"):
        d = NATIVE_DIR / "linux"
        return "_linux", sorted(d.glob("*.[ch]")) + [NATIVE_DIR / "_linux_build.py"]
    if sys.platform == "win32":
        d = NATIVE_DIR / "windows"
        return "_windows", sorted(d.glob("*.[ch]")) + [NATIVE_DIR / "_windows_build.py"]
    raise BuildError(f"snapproof has no native backend for platform {sys.platform!r} (Linux KVM or Windows WHP)")


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _stamp_path(module: str) -> Path:
    return output_dir() / f"{module}{STAMP_SUFFIX}"


def _built_module(module: str) -> Path | None:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    p = output_dir() / f"{module}{suffix}"
    return p if p.exists() else None


def _module_is_fresh() -> bool:
    module, inputs = _platform_parts()
    stamp = _stamp_path(module)
    return _built_module(module) is not None and stamp.exists() and stamp.read_text().strip() == _digest(inputs)


def _stale_engines() -> list[str]:
    if not sys.platform.startswith("linux"):
        return []
    from snapproof.native._engines_build import ENGINES

    return [name for name, recipe in ENGINES.items() if not recipe.is_fresh()]


def is_fresh() -> bool:
    return _module_is_fresh() and not _stale_engines()


def describe() -> str:
    """What is built, for the host probe's row: the module and the engines, each current with its sources."""
    module, _ = _platform_parts()
    built = _built_module(module)
    shown = (built.relative_to(CHECKOUT) if CHECKOUT else built) if built else f"{output_dir() / module} (not built)"
    engines = ""
    if sys.platform.startswith("linux"):
        from snapproof.native._engines_build import ENGINES

        engines = f" and {len(ENGINES)} engines"
    return f"{shown}{engines}, {'each current with its sources' if is_fresh() else 'older than its sources'}"


def _check_compiler() -> None:
    if sys.platform == "win32":
        return  # setuptools finds MSVC itself and says so when it is missing
    cc = os.environ.get("CC", "cc").split()[0]
    if shutil.which(cc) is None and shutil.which("gcc") is None:
        raise BuildError(
            f"no C compiler found (looked for {cc!r} and 'gcc'): snapproof's native layer is C. "
            "Install one: `sudo apt-get install build-essential python3-dev` (Debian/Ubuntu; ./setup does it), "
            "or `sudo dnf install gcc python3-devel`."
        )
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        raise BuildError(
            f"no Python.h in {include}: cffi compiles the native layer as an extension of this Python "
            f"({sys.executable}). Install its headers: `sudo apt-get install python3-dev` (Debian/Ubuntu; ./setup "
            "does it), or `sudo dnf install python3-devel`."
        )


def build(verbose: bool = False) -> Path:
    """Build the native module and every engine; returns the module's path."""
    path = build_module(verbose)
    build_engines(verbose=verbose)
    return path


def build_engines(names: list[str] | None = None, verbose: bool = False) -> list[Path]:
    """Build the engines in ``names`` (all of them by default) on Linux; returns their libraries."""
    if not sys.platform.startswith("linux"):
        return []
    from snapproof.native._engines_build import ENGINES, build_engine

    _check_compiler()
    _writable_output_dir()
    out = []
    for name in ENGINES if names is None else names:
        try:
            out.append(build_engine(ENGINES[name], verbose=verbose))
        except RuntimeError as e:
            raise BuildError(f"building the snapshot engine failed: {e}") from e
    return out


def build_module(verbose: bool = False) -> Path:
    module, inputs = _platform_parts()
    _check_compiler()
    builder = importlib.import_module(f".{module}_build", __package__)
    out_dir = _writable_output_dir()
    tmp = out_dir / "_build_tmp"
    try:
        out = builder.ffibuilder.compile(tmpdir=str(tmp), verbose=verbose)
    except Exception as e:  # distutils/setuptools raise several types; all mean the same here
        raise BuildError(f"building {__package__}.{module} failed: {e}") from e
    built = Path(out)
    target = out_dir / built.name
    if built.resolve() != target.resolve():
        # A new file renamed over the old, never the old rewritten: a process that has it mapped keeps its copy
        # (rewriting a loaded library in place crashes whoever runs it, seen with a suite running beside a build).
        staged = target.with_name(f"{target.name}.tmp{os.getpid()}")
        shutil.copy2(built, staged)
        os.replace(staged, target)
    _stamp_path(module).write_text(_digest(inputs) + "\n")
    return target


def ensure_built() -> None:
    """Build the native module and the engines that are missing or older than their sources, and make the
    compiled module importable from where it was built (``native._linux``, ``native._windows``)."""
    if not _module_is_fresh():
        build_module()
    if stale := _stale_engines():
        build_engines(stale)
    package = sys.modules[__package__]
    if str(output_dir()) not in package.__path__:  # the per-user cache of an install: searched after the sources
        package.__path__.append(str(output_dir()))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    unknown = [a for a in args if a != "-v"]
    if unknown:
        print(f"native build: unknown argument {unknown[0]!r} (only -v, to show the compiler's commands)",
              file=sys.stderr)
        return 2
    verbose = "-v" in args
    try:
        path = build_module(verbose)
        engines = build_engines(verbose=verbose)
    except BuildError as e:
        print(f"native build: {e}", file=sys.stderr)
        return 1
    print(f"native build: {path}")
    for lib in engines:
        print(f"native build: engine {lib}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
