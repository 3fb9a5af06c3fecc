"""A child pytest over a tiny phase of a test's own, with the results plugins alone (no KVM needed).

The run record, the reports and the host accounting are proven on such a child: its time-outs and signals end
the child, never the run proving them, and what it records is exactly what its few lines of phase did.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Every child here is a handful of cases that end in seconds; a child still running after this has hung.
CHILD_CEILING_S = 120

# The plugins a phase run loads (conftest.py at the root), without the fixtures that need a hypervisor.
CONFTEST = '''
pytest_plugins = ("snapproof.results.interrupts", "snapproof.results.hostload", "snapproof.results.plugin")


def pytest_configure(config):
    config.addinivalue_line("markers", "phase(n, title): the phase a test belongs to")
'''

PHASE_FILE = "test_phase9.py"


def write_tiny_phase(project: Path, phase: str) -> Path:
    """``project`` made a phase run's root: the plugins' conftest and ``phase`` as test_phase9.py."""
    (project / "conftest.py").write_text(CONFTEST)
    (project / PHASE_FILE).write_text(phase)
    return project


def run_tiny_phase(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """pytest over ``project``'s tiny phase, with ``args`` and ``env`` added; output captured as text."""
    return subprocess.run([sys.executable, "-m", "pytest", PHASE_FILE, "-p", "no:cacheprovider",
                           "-p", "no:randomly", *args],
                          cwd=project, env=dict(os.environ, PYTHONPATH=str(ROOT), **env),
                          capture_output=True, text=True, timeout=CHILD_CEILING_S)
