"""One run at a time changes the host's settings: a second run's ``--thp`` or ``--reserve-hugepages`` waits.

The THP knobs and vm.nr_hugepages are the host's, not the run's. Two runs on one host (two CI jobs, or a
person's run beside CI) would set and restore them under each other: one run's mTHP case then finds the
other's 2 MiB setting and fails for a reason that has nothing to do with the code under test (seen here).
So a run that is about to change them first takes an exclusive lock on one host-wide file, held until the
process ends (the kernel drops a flock with its last fd, however the process dies). A run that finds it
held waits, saying who holds it, and gives up after ``--host-lock-wait`` seconds with a usage error naming
the holder: never a hang, never a run that proceeds on settings another run is changing.

Child pytest runs that a test starts (the self-tests' phase runs) inherit the lock from their parent through
the environment: their parent holds it for them, and waiting on it would be a deadlock.
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    raise ImportError("results.hostlock guards Linux host settings (THP knobs, vm.nr_hugepages): Linux only")

import fcntl
import os
import time
from pathlib import Path

import pytest

LOCK_DIRS = (Path("/run/lock"), Path("/tmp"))
# Another place for the lock (a host whose /run/lock is per container, or the lock's own test).
LOCK_DIR_ENV = "SNAPPROOF_LOCK_DIR"
LOCK_NAME = "snapproof-host-settings.lock"
# Set by the holder for its children: the pid of the run that holds the lock for them.
HOLDER_ENV = "SNAPPROOF_HOST_SETTINGS_HOLDER"
POLL_S = 0.5
_HELD = pytest.StashKey[int]()


def lock_path() -> Path:
    if chosen := os.environ.get(LOCK_DIR_ENV):
        return Path(chosen) / LOCK_NAME
    for d in LOCK_DIRS:
        if d.is_dir() and os.access(d, os.W_OK):
            return d / LOCK_NAME
    return LOCK_DIRS[-1] / LOCK_NAME


def _holder_text(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    said = os.read(fd, 4096).decode(errors="replace").strip()
    return said or "a run that has not yet said who it is"


def hold_host_settings(config: pytest.Config, why: str) -> None:
    """Take the host-settings lock before ``why`` changes a host setting; wait for another run's, bounded."""
    if _HELD in config.stash or os.environ.get(HOLDER_ENV):
        return
    path = lock_path()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise pytest.UsageError(f"{why}: cannot open the host-settings lock {path}: {e.strerror}") from None
    wait_s = config.getoption("host_lock_wait")
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _holder_text(fd)
            if time.monotonic() >= deadline:
                os.close(fd)
                raise pytest.UsageError(
                    f"{why}: another run holds the host's THP and hugepage settings ({path}: {holder}) and still "
                    f"did after {wait_s:g} s (--host-lock-wait); run again when it ends, or without --thp and "
                    "--reserve-hugepages") from None
            if not said:
                print(f"snapproof: {why}: waiting up to {wait_s:g} s for another run that holds the host's THP and "
                      f"hugepage settings ({holder})", file=sys.stderr, flush=True)
                said = True
            time.sleep(POLL_S)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}\n".encode(), 0)
    config.stash[_HELD] = fd
    os.environ[HOLDER_ENV] = str(os.getpid())


def release_host_settings(config: pytest.Config) -> None:
    """After the settings are restored: the next run may change them."""
    fd = config.stash.get(_HELD, None)
    if fd is None:
        return
    del config.stash[_HELD]
    os.environ.pop(HOLDER_ENV, None)
    os.ftruncate(fd, 0)
    os.close(fd)
