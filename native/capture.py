"""Capture guest memory straight into a snapshot file: the WP engine's destination is the file itself.

``capture_to_file`` creates the file at its final size (``SnapshotImage.create``),
points the engine at the writer's shared mapping of the memory image, takes
the snapshot, drops the engine's pointer into the mapping and finalizes the
file with the vCPU states. Two ways to take it:

- the VM is stopped (halted, or never started): save the vCPU states, arm,
  bulk copy, finalize;
- the VM is running under a ``VcpuRunner``: the live protocol of
  ``native.live.take_live_snapshot`` (pause, save states, arm, resume, copy
  while the guest runs).

Nothing here sleeps or waits on a poll time-out: the engine's handler stops
through an eventfd (forkd's finalize spent about 100 ms of its 162.6 ms round
trip in fixed sleeps and poll time-outs). With ``FaultInjection.DROP_VCPU_STATE``
the file is written without its vCPU states, the bug a mid-execution restore
must catch. Linux only.
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    raise ImportError("native.capture (the uffd WP engine) is Linux-only")

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from native.engine import Engine
from native.image import SnapshotImage
from native.inject import FaultInjection
from native.kvm import Vcpu
from native.live import LiveSnapshot, VcpuRunner, take_live_snapshot
from native.memory import GuestMemory
from native.wp import WpSnapshot, WpStats


@dataclass(frozen=True)
class FileCapture:
    """One capture into one file, and what each part of it took (ns)."""

    image: SnapshotImage
    stats: WpStats
    live: LiveSnapshot | None
    vcpu_states_taken: int    # states the capture saved
    vcpu_states_written: int  # states in the file (0 under DROP_VCPU_STATE)
    create_ns: int            # file created at its size, header written, memory image mapped
    engine_ns: int            # engine set up, arm, bulk copy, finalize (+ the pause, when live)
    arm_ns: int
    bulk_ns: int
    finalize_ns: int          # engine: un-protect the region, join the handler (eventfd, no time-out)
    file_ns: int              # writer: flush, fsync, sha256 of the image, header with COMPLETE, fsync

    @property
    def total_ns(self) -> int:
        return self.create_ns + self.engine_ns + self.file_ns


def capture_to_file(path: str | os.PathLike[str], memory: GuestMemory, *, vcpus: Sequence[Vcpu] = (),
                    runner: VcpuRunner | None = None, inject: FaultInjection = FaultInjection.NONE,
                    handler_cpu: int | None = None, timeout: float = 10.0, engine: Engine | None = None,
                    progress: Callable[[int], None] | None = None) -> FileCapture:
    """Snapshot ``memory`` (and the vCPUs' states) into a new snapshot file at ``path``.

    Without ``runner`` the vCPUs in ``vcpus`` must be stopped; with it, its vCPUs are paused, saved
    and resumed by the live protocol and ``vcpus`` is ignored. ``engine`` takes the snapshot (the
    built-in one by default); ``progress`` is told the bytes of the file's content hash as they are hashed. A
    failure leaves the file marked incomplete (the writer's abort), never a file that loads.
    """
    clock = time.perf_counter_ns
    t0 = clock()
    with SnapshotImage.create(path, memory.size) as writer:
        t1 = clock()
        snap = WpSnapshot(memory, writer.memory, engine=engine, inject=inject, handler_cpu=handler_cpu)
        try:
            live: LiveSnapshot | None = None
            if runner is not None:
                live = take_live_snapshot(runner, snap, timeout=timeout)
                states = list(live.vcpu_states)
                arm_ns, bulk_ns, finalize_ns = live.arm_ns, live.bulk_ns, live.finalize_ns
            else:
                states = [v.save_state() for v in vcpus]
                arm_ns = snap.arm()
                t_bulk = clock()
                snap.bulk_copy()
                t_fin = clock()
                snap.finalize(timeout)
                bulk_ns, finalize_ns = t_fin - t_bulk, clock() - t_fin
            stats = snap.stats()
        finally:
            # A finalized engine has dropped its view of writer.memory already; on any other way out
            # (an error, an interrupt) close() drops it, so the writer's abort can unmap the file.
            snap.close()
        t2 = clock()
        written = [] if inject & FaultInjection.DROP_VCPU_STATE else states
        image = writer.finalize(written, progress=progress)
        t3 = clock()
    return FileCapture(image=image, stats=stats, live=live, vcpu_states_taken=len(states),
                       vcpu_states_written=len(written), create_ns=t1 - t0, engine_ns=t2 - t1, arm_ns=arm_ns,
                       bulk_ns=bulk_ns, finalize_ns=finalize_ns, file_ns=t3 - t2)
