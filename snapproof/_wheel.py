"""The build step the wheel needs beyond setuptools' own (pyproject.toml, ``[tool.setuptools.cmdclass]``).

The suite's pytest settings (the per-test timeout, ``-p snapproof.results.interrupts`` ahead of the entry-point
plugins, the benchmark options) are pyproject.toml's ``[tool.pytest.ini_options]``, which pytest reads in a
checkout. An installed ``snapproof phases`` runs pytest with ``-c`` on a copy of that file in the package, made
here when the wheel is built: one set of settings, no second list to keep in step.
"""

from __future__ import annotations

from pathlib import Path

from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:  # an editable install runs from the checkout, which has the file itself
            self.copy_file("pyproject.toml", str(Path(self.build_lib) / "snapproof" / "pyproject.toml"))
