"""Two runs on one host never change its THP and hugepage settings at once: the second waits, bounded."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from snapproof.results.hostlock import HOLDER_ENV, LOCK_DIR_ENV, LOCK_NAME

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock host lock: Linux runs only")

ROOT = Path(__file__).resolve().parent.parent
# A run of nothing but configure and collection: enough to take, or wait for, the lock.
NOTHING = ["-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "--results-dir=", "tests/test_host_lock.py"]

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"pid %d: another snapproof run\\n" % os.getpid())
print("held", flush=True)
time.sleep(60)
"""


def child_env(lock_dir: Path, holder: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != HOLDER_ENV}
    env[LOCK_DIR_ENV] = str(lock_dir)
    if holder is not None:
        env[HOLDER_ENV] = holder
    return env


def test_a_second_run_that_would_change_host_settings_waits_then_names_the_holder(tmp_path):
    """With another run holding the lock, --thp waits --host-lock-wait seconds and stops with a usage error."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / LOCK_NAME)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        run = subprocess.run([sys.executable, *NOTHING, "--thp", "--host-lock-wait", "1"], cwd=ROOT,
                             env=child_env(tmp_path), capture_output=True, text=True, timeout=120)
        waited = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait(timeout=30)
    said = run.stdout + run.stderr
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, f"expected a usage error (4), saw {run.returncode}: {said}"
    assert f"pid {holder.pid}: another snapproof run" in said, f"the holder is not named: {said}"
    assert "--host-lock-wait" in said and "waiting up to 1 s" in said, said
    assert waited >= 1.0, f"gave up after {waited:.2f} s, before the 1 s it was given"


def test_a_run_started_by_the_holder_does_not_wait_for_its_parent(tmp_path):
    """A child pytest run of a run that holds the lock (the self-tests' phase runs) goes ahead at once."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / LOCK_NAME)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        run = subprocess.run([sys.executable, *NOTHING, "--thp", "--host-lock-wait", "0"],
                             cwd=ROOT, env=child_env(tmp_path, holder=str(holder.pid)), capture_output=True,
                             text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert run.returncode == 0, f"the holder's child did not go ahead: {run.returncode}: {run.stdout}{run.stderr}"
