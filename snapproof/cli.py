"""The ``snapproof`` command (``python -m snapproof`` is the same):

    snapproof phases [PYTEST ARGS]      run the phases: pytest with snapproof's settings and plugin over this
                                        snapproof's phases (a checkout's phases/, or an install's); select with
                                        -k, -m or --deselect, e.g. snapproof phases --strict-host -k phase1
    snapproof host [--json | --quiet] [--sizes LIST]
                                        what this host offers the phases: PASS / INFO / WARN / FAIL, each row not
                                        PASS with the command that fixes it; exit 1 when a row FAILs
    snapproof results show | matrix | gate | ab | teeth | plots ...
                                        tools over run records (results/README.md); ab and teeth need a checkout
    snapproof build [-v]                build the native layer now (else the first use builds it): in a checkout
                                        beside its sources, installed into the per-user cache

Each command's --help says more.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

from snapproof import SUITE_ROOT


def phases(args: list[str]) -> int:
    """pytest over the phases, with the settings of this snapproof's pyproject.toml (the checkout's, or the copy
    an install carries); in a checkout the conftest.py there loads the plugin, installed its entry point does."""
    settings = SUITE_ROOT / "pyproject.toml"
    if not settings.is_file():
        print(f"snapproof phases: no pytest settings at {settings}: this snapproof was not installed from its "
              "wheel (pip install snapproof-*.whl), nor is it a checkout", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "pytest", "-c", str(settings), *args, str(SUITE_ROOT / "phases")]
    if os.name == "posix":
        # pytest becomes this process: a CI system's SIGTERM, or ^C, reaches the run itself (results/interrupts.py).
        os.execv(sys.executable, command)
    return subprocess.call(command)


def host(args: list[str]) -> int:
    from snapproof.native.host import main

    return main(args)


def results(args: list[str]) -> int:
    from snapproof.results.cli import main

    return main(args)


def build(args: list[str]) -> int:
    from snapproof.native.build import main

    return main(args)


COMMANDS: dict[str, Callable[[list[str]], int]] = {"phases": phases, "host": host, "results": results, "build": build}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if not args or args[0] not in COMMANDS:
        said = f"unknown command {args[0]!r}" if args else "no command given"
        print(f"snapproof: {said}: the commands are {', '.join(COMMANDS)} (snapproof --help)", file=sys.stderr)
        return 2
    return COMMANDS[args[0]](args[1:])
