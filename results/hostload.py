"""``--background-load cpu,memory``: the run makes its own noise, to prove the suite passes on a busy machine.

CI machines are shared: another job keeps a core busy, another holds memory. A suite whose outcome
depends on when something happens fails there and nowhere else. With this option the run starts, at
configure time, what such a neighbour does, and stops it when the session ends:

- ``cpu``: one process spinning, at normal priority, free to move between cores as a neighbour's would;
- ``memory``: one process that holds a share of the memory available at start (``--background-load-memory``,
  default a quarter) and rewrites it page by page in a loop, so the kernel keeps reclaiming and the
  page cache shrinks, the pressure a neighbour's working set puts on a host.

Both are bounded: each exits by itself after ``--background-load-seconds`` (default an hour) and
dies with this process however it dies (PR_SET_PDEATHSIG), so no run leaves a load behind. The run
record names the load, so a figure from a loaded run is never read as a quiet one; and a load that
ended before the run did (its bound too short for the run, or killed by someone) is named in the record
and at the run's end, so the rest of a run that went on unloaded is never read as a loaded one.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

KINDS = ("cpu", "memory")


@dataclass
class Load:
    """One load process, and when this run first saw it gone (None while it runs)."""

    kind: str
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    seen_gone_after_s: float | None = None

    def ended(self) -> bool:
        """Whether the process has exited by itself; the first time it is seen so, when is kept."""
        if self.seen_gone_after_s is None and self.proc.poll() is not None:
            self.seen_gone_after_s = round(time.monotonic() - self.started, 3)
        return self.seen_gone_after_s is not None


LOADS = pytest.StashKey[list[Load]]()

# The neighbours, as programs of their own: a child that is just Python, never this suite's code.
_CPU = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
_MEMORY = ("import mmap, time\n"
           "end = time.monotonic() + {seconds}\n"
           "m = mmap.mmap(-1, {size})\n"
           "page = 4096\n"
           "while time.monotonic() < end:\n"
           "    for off in range(0, {size}, page):\n"
           "        m[off] = (m[off] + 1) & 0xFF\n")


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("snapproof")
    g.addoption("--background-load", default="", metavar="cpu,memory",
                help="start a busy neighbour for the run: one core spinning (cpu), memory held and rewritten (memory)")
    g.addoption("--background-load-memory", type=float, default=0.25, metavar="FRACTION",
                help="share of MemAvailable the memory load holds (default 0.25)")
    g.addoption("--background-load-seconds", type=float, default=3600.0,
                help="each load process exits by itself after this long (default 3600)")


def requested(config: pytest.Config) -> list[str]:
    kinds = [k.strip() for k in config.getoption("background_load").split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise pytest.UsageError(f"--background-load: unknown load {', '.join(unknown)} "
                                f"(choose from {', '.join(KINDS)})")
    return kinds


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable")


def _die_with_parent() -> None:
    """In the load child before exec: SIGKILL it when the run dies, however it dies."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def describe(config: pytest.Config) -> dict[str, Any]:
    """What the run record says of the load (empty when none was asked for): its kinds, its bound, and each
    load process that ended before the run did, with when the run first saw it gone (the record is rewritten
    as each case finishes, so that is within a case of when it ended) and its exit status."""
    kinds = requested(config)
    if not kinds:
        return {}
    out: dict[str, Any] = {"kinds": kinds, "seconds": config.getoption("background_load_seconds")}
    if "memory" in kinds:
        out["memory_fraction"] = config.getoption("background_load_memory")
    ended = [{"kind": load.kind, "seen_gone_after_s": load.seen_gone_after_s, "returncode": load.proc.returncode}
             for load in config.stash.get(LOADS, []) if load.ended()]
    if ended:
        out["ended"] = ended
    return out


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    kinds = requested(config)
    if not kinds or hasattr(config, "workerinput") or not sys.platform.startswith("linux"):
        return
    seconds = config.getoption("background_load_seconds")
    if not seconds > 0:
        raise pytest.UsageError(f"--background-load-seconds {seconds}: the load's bound must be a positive time")
    fraction = config.getoption("background_load_memory")
    if not 0 < fraction < 0.9:
        raise pytest.UsageError(f"--background-load-memory {fraction}: a fraction between 0 and 0.9")
    loads: list[Load] = []
    for kind in kinds:
        code = (_CPU.format(seconds=seconds) if kind == "cpu" else
                _MEMORY.format(seconds=seconds, size=int(_mem_available() * fraction) // 4096 * 4096))
        loads.append(Load(kind, subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                                 preexec_fn=_die_with_parent)))
    config.stash[LOADS] = loads


def pytest_unconfigure(config: pytest.Config) -> None:
    for load in config.stash.get(LOADS, []):
        load.proc.kill()
        load.proc.wait(timeout=30)


def pytest_report_header(config: pytest.Config) -> str | None:
    loads = config.stash.get(LOADS, [])
    if not loads:
        return None
    return f"background load: {', '.join(requested(config))} (pids {', '.join(str(x.proc.pid) for x in loads)})"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """A load that ended before the run did is said at the end, where whoever reads the run looks."""
    for load in config.stash.get(LOADS, []):
        if load.ended():
            terminalreporter.write_line(
                f"background load: {load.kind} (pid {load.proc.pid}) ended {load.seen_gone_after_s:.0f} s into the "
                f"run (exit status {load.proc.returncode}), before the run did: what ran after it ran unloaded "
                f"(--background-load-seconds {config.getoption('background_load_seconds'):g})", yellow=True)

