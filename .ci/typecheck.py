#!/usr/bin/env python3
"""mypy over this checkout, each file under the module name snapproof imports it by.

    .ci/typecheck.py [MYPY OPTIONS] [-- PATHS]     e.g. .ci/typecheck.py --platform win32 -- native phases

A checkout keeps native/, guests/ and results/ at its top and imports them as snapproof.native,
snapproof.guests, snapproof.results: snapproof/__init__.py adds the checkout to the package's search path
when it runs, which mypy does not follow. Given those folders on its command line, mypy would name
native/kvm.py ``native.kvm``, find no ``snapproof.native.kvm`` behind the imports, and check nothing that
crosses a module. This script hands mypy each file under the name it is imported by. The settings are
pyproject.toml's [tool.mypy]; the exit status is mypy's (0 clean, 1 errors, 2 usage).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mypy import build
from mypy.errors import CompileError
from mypy.main import process_options
from mypy.modulefinder import BuildSource

CHECKOUT = Path(__file__).resolve().parent.parent
# Folders of the checkout that are subpackages of snapproof (pyproject.toml's package-dir says the same).
PACKAGED = ("native", "guests", "results")
# What is checked when no paths are given. phases/ keeps its name: pytest imports it as phases.* in a checkout,
# and nothing imports a phase. nested/ is a checkout-only tool, not part of the package.
PATHS = ["snapproof", *PACKAGED, "phases", "conftest.py", "nested"]


def main(argv: list[str]) -> int:
    given, paths = _split(argv)
    os.chdir(CHECKOUT)
    sources, options = process_options([*given, *(paths or PATHS)])
    named = [BuildSource(s.path, f"snapproof.{s.module}" if s.module.split(".")[0] in PACKAGED else s.module,
                         s.text, s.base_dir) for s in sources]
    try:
        messages = build.build(named, options).errors
    except CompileError as e:
        messages = e.messages
    for line in messages:
        print(line)
    errors = sum(": error:" in m for m in messages)
    if errors:
        print(f"Found {errors} errors in {len({m.split(':')[0] for m in messages if ': error:' in m})} files "
              f"(checked {len(named)} source files)")
        return 1
    print(f"Success: no issues found in {len(named)} source files")
    return 0


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(mypy's options, the paths after --)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
