"""Builds the snapshot engines in this repository: each a shared library implementing the engine ABI
(native/snapproof_engine.h), loaded by native.engine with dlopen like any engine a team brings.

- ``builtin``: the suite's own engine (native/linux/uffd_wp.c) behind native/engines/builtin.c;
- ``naive``: native/engines/naive.c as a team's first attempt writes it (forkd's two bugs);
- ``naive-fixed``: the same source with -DNAIVE_FIXED, both bugs fixed;
- ``naive-fixed-arm-keeps-captured``: naive-fixed whose second arm copies nothing (a benchmark's trap).

``snapproof build`` builds them beside native._linux (native/engines/ in a checkout, the per-user
cache of an install: native/build.py); each carries a digest of its inputs, so a stale library is rebuilt
instead of silently judged.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from snapproof.native.build import output_dir

NATIVE_DIR = Path(__file__).resolve().parent
ENGINES_DIR = NATIVE_DIR / "engines"  # their sources
LINUX_DIR = NATIVE_DIR / "linux"
ABI_HEADER = NATIVE_DIR / "snapproof_engine.h"
STAMP_SUFFIX = ".sources-sha256"
# Warnings are errors, as for native._linux; only the ABI's functions leave the library (the header
# exports them), so two engines loaded side by side never see each other's internals.
CFLAGS = ["-shared", "-fPIC", "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
          "-fvisibility=hidden"]


@dataclass(frozen=True)
class EngineRecipe:
    name: str
    sources: tuple[Path, ...]
    defines: tuple[str, ...] = ()
    include_dirs: tuple[Path, ...] = (NATIVE_DIR,)

    @property
    def output(self) -> Path:
        return output_dir() / "engines" / f"libsnapproof-{self.name}.so"

    @property
    def stamp(self) -> Path:
        return self.output.with_name(f"libsnapproof-{self.name}{STAMP_SUFFIX}")

    def inputs(self) -> list[Path]:
        headers = sorted(h for d in self.include_dirs for h in d.glob("*.h"))
        return [*self.sources, *headers, Path(__file__).resolve()]

    def digest(self) -> str:
        h = hashlib.sha256(" ".join(self.defines).encode())
        for p in self.inputs():
            h.update(p.name.encode())
            h.update(p.read_bytes())
        return h.hexdigest()

    def is_fresh(self) -> bool:
        return self.output.exists() and self.stamp.exists() and self.stamp.read_text().strip() == self.digest()


ENGINES: dict[str, EngineRecipe] = {r.name: r for r in (
    EngineRecipe("builtin", (ENGINES_DIR / "builtin.c", LINUX_DIR / "uffd_wp.c", LINUX_DIR / "uffd_handler.c",
                             LINUX_DIR / "common.c"), include_dirs=(NATIVE_DIR, LINUX_DIR)),
    EngineRecipe("naive", (ENGINES_DIR / "naive.c",)),
    EngineRecipe("naive-fixed", (ENGINES_DIR / "naive.c",), defines=("NAIVE_FIXED",)),
    # A benchmark's trap, for the self-test that a round which did no work is caught (tests/test_measurement_errors.py).
    EngineRecipe("naive-fixed-arm-keeps-captured", (ENGINES_DIR / "naive.c",),
                 defines=("NAIVE_FIXED", "NAIVE_ARM_KEEPS_CAPTURED")),
)}


def build_engine(recipe: EngineRecipe, verbose: bool = False) -> Path:
    """Compile one engine into its library (written whole, then renamed: a loader never sees half a file)."""
    cc = os.environ.get("CC", "cc").split()
    tmp = recipe.output.with_suffix(f".so.tmp{os.getpid()}")
    cmd = [*cc, *CFLAGS, *(f"-D{d}" for d in recipe.defines), *(f"-I{d}" for d in recipe.include_dirs),
           "-o", str(tmp), *map(str, recipe.sources), "-lpthread"]
    if verbose:
        print(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"engine {recipe.name!r}: {' '.join(cmd)}\n{proc.stderr.strip()}")
    os.replace(tmp, recipe.output)
    recipe.stamp.write_text(recipe.digest() + "\n")
    return recipe.output
