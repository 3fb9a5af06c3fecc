"""Run a phase module in a child pytest with engine switches and read back its run record."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from snapproof.results.explain import explain

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class PhaseRun:
    returncode: int
    output: str
    record: dict[str, Any]

    def cases(self) -> dict[str, dict[str, Any]]:
        return {c["test"]: c for p in self.record.get("phases", []) for c in p["cases"]}

    def deselected(self) -> dict[str, str]:
        """Cases the child left out for a capability its host lacks and its class does not require: test -> why."""
        return {d["test"]: d["reason"] for p in self.record.get("phases", []) for d in p.get("deselected", [])}

    def outcome(self, test: str) -> str:
        """passed / failed / error / skipped, or ``deselected: <why>`` (never equal to "passed")."""
        if (case := self.cases().get(test)) is not None:
            return str(case["outcome"])
        if (why := self.deselected().get(test)) is not None:
            return f"deselected: {why}"
        raise AssertionError(f"{test}: not in the child's run record (it ran {sorted(self.cases())}):\n"
                             f"{self.output[-3000:]}")

    def failure(self, test: str) -> str:
        return self.cases()[test].get("failure", "")

    def why(self, test: str) -> str:
        """What the evidence in ``test``'s record says went wrong (results/explain.py), as the report prints it;
        asserting that pytest's own failure report in the child's output said the same."""
        said = " ".join(explain(self.cases()[test]))
        assert said in " ".join(self.output.split()), \
            f"{test}: the child's failure report lacks the explanation {said!r}:\n{self.output[-3000:]}"
        return said


# The child's whole run, a backstop only: each of its cases has its own ceiling (pytest-timeout in the child), and a
# case that hangs fails there, naming itself. This one catches a child stuck outside any case. Never a test's measure
# of "fast": a child of one 1 MiB case took over 60 s on the nested kvm_amd host under load (TCG), so a tighter
# ceiling failed a healthy run for being slow.
CHILD_BACKSTOP_S = 300


def run_phase(module: str, *args: str, inject: str = "none", engine: str = "", benchmarks: bool = False) -> PhaseRun:
    """``phases/<module>`` (and any more paths in ``args``) in a child pytest with these switches, judging
    ``engine`` (a library path, ``--engine``; the built-in engine when empty); benchmarks run all their rounds
    only when asked (``benchmarks``)."""
    with tempfile.TemporaryDirectory(prefix="snapproof-selftest-") as tmp:
        # Without hypothesis's plugin: importing it is half of a child's start-up (8 s of 15 under TCG on the
        # nested host) and no phase needs its options; phase 2's own property test imports hypothesis itself.
        cmd = [sys.executable, "-m", "pytest", f"phases/{module}", "-q", "-p", "no:randomly",
               "-p", "no:hypothesispytest", "--reports", "none", "--results-dir", tmp, "--inject", inject,
               *([] if benchmarks else ["--benchmark-disable"]),
               *(["--engine", engine] if engine else []), *args]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=CHILD_BACKSTOP_S)
        records = sorted(Path(tmp).glob("*.yaml"))
        record = yaml.safe_load(records[-1].read_text()) if records else {}
    return PhaseRun(proc.returncode, proc.stdout + proc.stderr, record)
