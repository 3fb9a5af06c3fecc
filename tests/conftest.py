"""The self-tests' child processes (a phase under injected bugs, an interrupted run, a second engine) start
Python and pytest dozens of times a run."""

from __future__ import annotations

import os
from pathlib import Path


def pytest_configure(config) -> None:
    # Where bytecode is not to be written (PYTHONDONTWRITEBYTECODE), each child compiled snapproof and had pytest
    # rewrite its asserts again: about half of its start-up. The children write theirs under the user's cache
    # instead, which keeps the checkout free of it, as asked, and lets the next child and the next run read it.
    if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "snapproof" / "pycache"
        os.environ["PYTHONPYCACHEPREFIX"] = str(cache)
        del os.environ["PYTHONDONTWRITEBYTECODE"]
