"""Whether anyone else kept the host busy while a phase case ran: measured, so a busy figure is never judged.

A figure from a case that shared the host with another job measures the other job too. The baseline recipe asks
for a quiet host, and CI machines are shared; so each phase case records what others took of the host while it
ran, and the gate, the A/B comparison and the teeth refuse to judge a figure whose case (in the run or in the
baseline) was busy, naming who took the host.

"Others" is every process on the host but this run's own (this process and its descendants: QEMU, child
pytests, helpers) and the kernel's threads (their work is what the run itself asks of the kernel: reclaim,
writeback, KVM's workers). The run's ``--background-load`` counts as a neighbour: it is one on purpose.
What others took is read from ``/proc/PID/stat`` (user and system time, and that of the children each has
waited for: a short-lived job is counted through the parent that reaped it) at the case's start and end;
the time a hypervisor below took from this host's CPUs is read as steal (``/proc/stat``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Busy: others took at least this much CPU per second of the case (a tenth of one CPU), and at least
# MIN_TICKS in all. The tick floor keeps a short case, whose few ticks are mostly rounding, from being busy
# on one tick of a daemon waking up.
BUSY_CPUS = 0.1
MIN_TICKS = 5
BUSIEST = 3  # the neighbours a busy case names

PF_KTHREAD = 0x00200000  # include/linux/sched.h: the task is a kernel thread


def _tick_hz() -> int:
    return os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


TICK_HZ = _tick_hz()


@dataclass(frozen=True)
class Proc:
    """One process as ``/proc/PID/stat`` shows it at one instant."""

    pid: int
    ppid: int
    name: str
    ticks: int    # utime + stime + cutime + cstime: its own CPU and that of the children it reaped
    start: int    # starttime, in ticks after boot: with the pid, names the process across samples
    kthread: bool


@dataclass(frozen=True)
class Sample:
    """Every process, and the host's steal, at one instant."""

    at: float                # time.monotonic()
    procs: dict[int, Proc]
    steal: int               # ticks a hypervisor below took from this host's CPUs, since boot


def parse_stat(text: str) -> Proc:
    """``/proc/PID/stat``: the name may hold spaces and parentheses, so the fields are counted after its last ')'."""
    head, _, tail = text.rpartition(")")
    pid, _, name = head.partition(" (")
    f = tail.split()
    # f[0] is field 3 (state) of proc(5): ppid is field 4, flags 9, utime..cstime 14..17, starttime 22.
    return Proc(pid=int(pid), ppid=int(f[1]), name=name, ticks=sum(int(x) for x in f[11:15]), start=int(f[19]),
                kthread=bool(int(f[6]) & PF_KTHREAD))


def _steal() -> int:
    with open("/proc/stat") as fh:
        cpu = fh.readline().split()  # cpu user nice system idle iowait irq softirq steal ...
    return int(cpu[8]) if len(cpu) > 8 else 0


def sample() -> Sample | None:
    """The host now; None where there is no /proc (Windows), so nothing is recorded rather than a guess."""
    if not Path("/proc/stat").exists():
        return None
    procs = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                p = parse_stat(fh.read())
        except (OSError, ValueError, IndexError):
            continue  # gone between the listing and the read
        procs[p.pid] = p
    return Sample(time.monotonic(), procs, _steal())


def own_tree(procs: dict[int, Proc], root: int, neighbours: set[int]) -> set[int]:
    """``root`` and its descendants, less the ``neighbours`` (and theirs)."""
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    ours, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in ours or pid in neighbours:
            continue
        ours.add(pid)
        todo += children.get(pid, [])
    return ours


def others_ticks(before: Sample, after: Sample, root: int, neighbours: set[int]) -> dict[int, int]:
    """pid -> CPU ticks each other process took between the samples (only those that took any)."""
    ours = own_tree(before.procs, root, neighbours) | own_tree(after.procs, root, neighbours)
    took: dict[int, int] = {}
    for pid, p in after.procs.items():
        if pid in ours or p.kthread:
            continue
        was = before.procs.get(pid)
        took[pid] = p.ticks - (was.ticks if was is not None and was.start == p.start else 0)
    # A neighbour gone since the first sample was reaped: its whole time moved into its parent's cutime/cstime,
    # the part before the window included. That part comes off the parent, so each tick counts once.
    for pid, was in before.procs.items():
        now = after.procs.get(pid)
        if (now is None or now.start != was.start) and pid not in ours and not was.kthread and was.ppid in took:
            took[was.ppid] -= was.ticks
    return {pid: t for pid, t in took.items() if t > 0}


def measure(before: Sample, after: Sample, root: int | None = None, neighbours: set[int] | None = None
            ) -> dict[str, Any]:
    """What others took of the host between the samples, as a case's ``host_busy``: the wall time, others'
    CPU and the steal (each in CPUs: seconds per wall second), whether that is busy, and the busiest others."""
    root = os.getpid() if root is None else root
    took = others_ticks(before, after, root, neighbours or set())
    wall = max(after.at - before.at, 1e-9)
    others = sum(took.values())
    steal = max(after.steal - before.steal, 0)
    cpus = (others + steal) / TICK_HZ / wall
    busiest = sorted(took.items(), key=lambda kv: -kv[1])[:BUSIEST]
    return {"wall_s": round(wall, 3), "other_cpus": round(others / TICK_HZ / wall, 3),
            "steal_cpus": round(steal / TICK_HZ / wall, 3),
            "busy": others + steal >= MIN_TICKS and cpus >= BUSY_CPUS, "busy_from_cpus": BUSY_CPUS,
            "busiest": [{"pid": pid, "name": after.procs[pid].name, "cpu_s": round(t / TICK_HZ, 3)}
                        for pid, t in busiest]}


def summary(busy: dict[str, Any]) -> str:
    """One line: how busy, and who."""
    who = ", ".join(f"{b['name']} (pid {b['pid']}) {b['cpu_s']:.2f} s" for b in busy["busiest"]) or "nobody named"
    steal = f", steal {busy['steal_cpus']:.2f} CPU" if busy["steal_cpus"] else ""
    wall = f"{busy['wall_s']:.1f}" if busy["wall_s"] >= 0.1 else f"{busy['wall_s']:.3f}"  # never 'over 0.0 s'
    return (f"others took {busy['other_cpus']:.2f} CPU{steal} over {wall} s "
            f"(busy from {busy['busy_from_cpus']} CPU): {who}")


def busy_cases(rec: dict[str, Any], number: int) -> dict[str, dict[str, Any]]:
    """test -> its ``host_busy``, for each case of phase ``number`` that ran on a busy host."""
    return {c["test"]: c["host_busy"] for p in rec["phases"] if p["phase"] == number for c in p["cases"]
            if c.get("host_busy", {}).get("busy")}


__all__ = ["BUSY_CPUS", "MIN_TICKS", "Proc", "Sample", "busy_cases", "measure", "others_ticks", "own_tree",
           "parse_stat", "sample", "summary"]
