"""snapproof: a phased proof suite for VM memory snapshot primitives (userfaultfd WP, KVM, WHP).

Everything it imports lives under this one name: ``snapproof.native``, ``snapproof.guests``,
``snapproof.results``, ``snapproof.phases`` and the pytest plugin ``snapproof.fixtures``. Installed (a
wheel), they are this package's subpackages: pyproject.toml maps each to its folder of the repository. A
checkout keeps those folders at its top (native/, guests/, results/, phases/), and this package reaches
them there by searching the checkout's root too. Each module has that one name, in both: nothing is
importable as a top-level ``native`` or ``results``.
"""

from __future__ import annotations

from pathlib import Path

# The folder this package is imported from: a child process started there (its cwd, or PYTHONPATH) imports
# this same snapproof (a checkout's root, or site-packages).
IMPORT_ROOT = Path(__file__).resolve().parent.parent

# The checkout snapproof runs from, or None when it is installed: a checkout has its native/ beside this package
# and its pyproject.toml; site-packages has neither (snapproof installs no top-level native).
CHECKOUT: Path | None = (IMPORT_ROOT if (IMPORT_ROOT / "native" / "__init__.py").is_file()
                         and (IMPORT_ROOT / "pyproject.toml").is_file() else None)

# The folder holding phases/ and the pytest settings (pyproject.toml) `snapproof phases` runs: the checkout, or
# this package's folder in an install (the wheel carries a copy of pyproject.toml: snapproof/_wheel.py).
SUITE_ROOT = CHECKOUT or Path(__file__).resolve().parent

if CHECKOUT is not None:
    __path__.append(str(CHECKOUT))
