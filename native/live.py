"""The live snapshot protocol a real VMM uses, and the vCPU threads it needs.

Pause: kick every vCPU out of KVM_RUN (signal + immediate_exit) and wait until
each has stopped. Arm WP while they are stopped, resume them, then bulk-copy
while they run; a write to a page not yet copied is caught by the handler,
which copies it first. The pause window is everything between the kick and
the resume.
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    raise ImportError("native.live drives KVM vCPUs: Linux only")

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from snapproof.native.errors import GuestTimeout
from snapproof.native.inject import FaultInjection
from snapproof.native.kvm import Exit, ExitReason, Vcpu
from snapproof.native.memory import GuestMemory, copy_timed
from snapproof.native.wp import BULK_BATCH, EngineObject, WpSnapshot, WpStats

# Each runner thread is named this plus its vCPU index: how a test finds the ones still alive.
THREAD_NAME_PREFIX = "vcpu"


class VcpuRunner:
    """Runs vCPUs, one thread each, until they halt, fail, or ``stop()``; can pause and resume them all.

    Every wait is bounded by the runner's deadline; ``stop()`` joins every thread. Enter it as a context
    manager before ``start()``: its vCPUs are then stopped on every way out, a failed check or an interrupt
    included. One started outside a block runs on after an exception until its VM is closed, which an
    interrupted pytest does only at session finish, the guest taking CPU from everything before it.
    """

    def __init__(self, vcpus: Sequence[Vcpu], timeout: float) -> None:
        self.vcpus = list(vcpus)
        self.deadline = time.monotonic() + timeout
        self._cv = threading.Condition()
        self._paused: set[int] = set()
        self._finished: set[int] = set()
        self._resume_gen = 0
        self._stopping = False
        self.exits: dict[int, Exit] = {}
        self.errors: dict[int, BaseException] = {}
        self._threads = [threading.Thread(target=self._loop, args=(i, v), name=f"{THREAD_NAME_PREFIX}{i}", daemon=True)
                         for i, v in enumerate(self.vcpus)]

    def start(self, paused: bool = False) -> VcpuRunner:
        """Start the vCPU threads. ``paused`` parks each before its first instruction, where the next
        ``pause()`` finds it at once: a live snapshot then pins a point the caller chose, not a kick's
        latency (what the resumed vCPUs do during the copy is unchanged)."""
        if paused:
            for v in self.vcpus:
                v.kick()  # sticky: the first run returns KICKED at once and the thread parks
        for t in self._threads:
            t.start()
        return self

    def _remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _loop(self, i: int, vcpu: Vcpu) -> None:
        try:
            while True:
                left = self._remaining()
                if left <= 0:
                    break
                ex = vcpu.run(timeout=left)
                # A vCPU being closed under us (the runner never stopped: an exception, a SIGINT) ends the thread.
                if ex.reason is not ExitReason.KICKED or vcpu.closing:
                    self.exits[i] = ex
                    break
                with self._cv:
                    if self._stopping:
                        self.exits[i] = ex
                        break
                    gen = self._resume_gen
                    self._paused.add(i)
                    self._cv.notify_all()

                    def resumed(g: int = gen) -> bool:
                        return self._resume_gen != g or self._stopping

                    self._cv.wait_for(resumed, timeout=max(0.0, self._remaining()))
                    self._paused.discard(i)
                    if self._stopping:
                        self.exits[i] = ex
                        break
        except BaseException as e:  # recorded and re-raised in stop(): a thread must never die silently
            self.errors[i] = e
        finally:
            with self._cv:
                self._finished.add(i)
                self._cv.notify_all()

    def pause(self, timeout: float = 5.0) -> int:
        """Kick every vCPU and wait until each is paused or finished; returns the ns that took."""
        t0 = time.perf_counter_ns()
        for v in self.vcpus:
            v.kick()
        with self._cv:
            ok = self._cv.wait_for(lambda: len(self._paused | self._finished) == len(self.vcpus), timeout=timeout)
            if not ok:
                running = sorted(set(range(len(self.vcpus))) - self._paused - self._finished)
                raise GuestTimeout(f"vCPUs {running} did not stop within {timeout} s of the kick")
            for i in self._paused | self._finished:
                self.vcpus[i].clear_kick()  # parked or halted, it never consumed this kick: drop it
        return time.perf_counter_ns() - t0

    def resume(self) -> None:
        with self._cv:
            self._resume_gen += 1
            # Not paused from now on, even before each thread wakes: a pause() right after this waits for a
            # fresh park instead of trusting a stale one (and never drops a kick a running vCPU still needs).
            self._paused.clear()
            self._cv.notify_all()

    @property
    def finished(self) -> set[int]:
        with self._cv:
            return set(self._finished)

    def wait_finished(self, timeout: float) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: len(self._finished) == len(self.vcpus), timeout=timeout)

    def stop(self, timeout: float = 5.0) -> dict[int, Exit]:
        """Stop every vCPU and join every thread (bounded); returns each vCPU's last exit."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for v in self.vcpus:
            v.kick()
        end = time.monotonic() + timeout
        for t in self._threads:
            if t.ident is not None:  # an interrupt inside start() can leave some never started
                t.join(timeout=max(0.0, end - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        for v in self.vcpus:
            v.clear_kick()
        if alive:
            raise GuestTimeout(f"vCPU threads {alive} did not stop within {timeout} s")
        if self.errors:
            i, e = next(iter(self.errors.items()))
            raise RuntimeError(f"vCPU {i} thread failed: {e!r}") from e
        return dict(self.exits)

    def __enter__(self) -> VcpuRunner:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        """Stop the vCPUs on every way out of the block. With an exception in flight (a failed check, an
        interrupt) a failing stop is added to it as a note, never raised over it."""
        if not any(t.is_alive() for t in self._threads):
            return
        try:
            self.stop()
        except Exception as e:
            if exc is None:
                raise
            exc.add_note(f"while the vCPU runner was stopped on the way out: {e!r}")


@dataclass
class LiveSnapshot:
    """What one live snapshot took, in ns; ``pause_ns`` excludes the test-only reference copy."""

    pause_ns: int
    stop_ns: int
    arm_ns: int
    reference_ns: int
    bulk_ns: int
    finalize_ns: int
    vcpu_states: list[bytes]
    stats: WpStats
    paused: bool

    @property
    def total_ns(self) -> int:
        return self.pause_ns + self.bulk_ns + self.finalize_ns


def wait_for_faults(runner: VcpuRunner, snap: EngineObject, faults: int, timeout: float) -> None:
    """Until the running guest has taken ``faults`` WP faults (the engine's count since it was created), it
    finished, or ``timeout`` passed."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and not runner.finished:
        s = snap.stats()
        # A dead handler serves no more faults: go on, and bulk_copy raises HandlerDied naming it.
        if s.faults >= faults or s.handler_died:
            return
        time.sleep(0.0002)


@dataclass
class LiveArm:
    """One arm under the live protocol: what ``arm()`` returned, the pause around it and what was saved in it."""

    armed: Any
    pause_ns: int       # kick -> resumed, less the test-only reference copy; 0 when the arm did not pause
    stop_ns: int        # kick -> every vCPU stopped
    reference_ns: int
    vcpu_states: list[bytes]
    paused: bool


def arm_live(runner: VcpuRunner, arm: Callable[[], Any], memory: GuestMemory, reference: object | None = None,
             timeout: float = 10.0, paused: bool = True, settle: Callable[[], None] | None = None) -> LiveArm:
    """Pause the vCPUs, save their state, ``arm()``, (copy memory into ``reference``,) resume them.

    ``reference``, a writable buffer, receives guest memory as it is while paused: the exact oracle of a snapshot
    armed here. Unpaused (the ARM_WHILE_RUNNING bug), ``settle()`` runs between the arm and the reference copy.
    """
    clock = time.perf_counter_ns
    reference_ns = 0
    t0 = clock()
    stop_ns = runner.pause(timeout) if paused else 0
    states = [v.save_state() for v in runner.vcpus] if paused else []
    armed = arm()
    if settle is not None and not paused:
        settle()
    if reference is not None:
        # After the arm, never before: reading a never-populated page maps the zero page into it, and
        # an arm after that would protect a page the engine itself might have skipped.
        reference_ns = copy_timed(reference, memory)
    if paused:
        runner.resume()
    pause_ns = clock() - t0 - reference_ns if paused else 0
    return LiveArm(armed=armed, pause_ns=pause_ns, stop_ns=stop_ns, reference_ns=reference_ns, vcpu_states=states,
                   paused=paused)


def take_live_snapshot(runner: VcpuRunner, snap: WpSnapshot, reference: object | None = None,
                       batch: int = BULK_BATCH, timeout: float = 10.0, overlap_faults: int = 0,
                       bulk_copy: Callable[[], object] | None = None) -> LiveSnapshot:
    """Pause, (reference copy,) arm, resume, bulk copy while the vCPUs run, finalize.

    ``bulk_copy`` is the copy to run while the vCPUs run (default: the whole region in one engine call);
    a capture into a file copies piece by piece, handing each to the file's hasher.

    Test-mode knobs: ``reference``, a writable buffer, receives guest memory as it is while paused
    (the exact oracle); ``overlap_faults`` holds the bulk copy until the resumed guest has taken that
    many WP faults (at most ``timeout``), so copy and guest writes overlap even when the copy is
    shorter than a vCPU thread's wake-up. With ``FaultInjection.ARM_WHILE_RUNNING`` the engine arms
    without pausing, the bug of arming under running vCPUs.
    """
    clock = time.perf_counter_ns
    paused = not (snap.inject & FaultInjection.ARM_WHILE_RUNNING)
    # Unpaused, the bug's window is held open on purpose: a running guest may write between the arm and the
    # reference read at any speed, so wait (bounded) until it has, and the bug shows on every run, loaded or not.
    arm = arm_live(runner, snap.arm, snap.memory, reference, timeout, paused=paused,
                   settle=lambda: wait_for_faults(runner, snap, 1, timeout))
    if overlap_faults:
        wait_for_faults(runner, snap, overlap_faults, timeout)
    t1 = clock()
    if bulk_copy is None:
        snap.bulk_copy(batch=batch)
    else:
        bulk_copy()
    t2 = clock()
    stats = snap.finalize(timeout)
    t3 = clock()
    return LiveSnapshot(pause_ns=arm.pause_ns, stop_ns=arm.stop_ns, arm_ns=arm.armed, reference_ns=arm.reference_ns,
                        bulk_ns=t2 - t1, finalize_ns=t3 - t2, vcpu_states=arm.vcpu_states, stats=stats,
                        paused=paused)
