"""SIGINT in the middle of a live capture: the child exits promptly, WP released, threads joined, files
closed, and the half-written snapshot file stays on disk marked incomplete, which the loader refuses.

The child is tests/reliability_child.py (interrupted-capture): a storm guest running on two vCPUs,
the engine writing straight into the snapshot file, the bulk copy paced like a slow disk.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from native.image import SnapshotFormatError, SnapshotImage
from tests.reliability_support import ROOT, child_env

pytestmark = pytest.mark.needs("kvm", "uffd", "uffd.WP_HUGETLBFS_SHMEM")

ARMED_WITHIN_S = 30.0  # the child imports, builds a 64 MiB guest, runs it and arms
EXIT_WITHIN_S = 10.0   # after SIGINT: stop two vCPUs, release WP, join, close, print


def _read_until(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    """Everything the child printed up to the line ``marker``; AssertionError at ``timeout``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    end = time.monotonic() + timeout
    while (marker + "\n").encode() not in seen:
        left = end - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise AssertionError(f"child never printed {marker!r} (exit {proc.poll()}); printed:\n{seen.decode()}")
        if select.select([fd], [], [], left)[0]:
            seen += os.read(fd, 65536)
    return seen.decode()


class Interrupted:
    """What a child said and did around a SIGINT: its exit, how long that took, its START and LAST words."""

    def __init__(self, returncode: int, exit_s: float, out: str, err: str) -> None:
        self.returncode, self.exit_s, self.out, self.err = returncode, exit_s, out, err
        lines = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in out.splitlines() if " " in ln}
        assert "LAST" in lines, f"the child printed no last words; stdout:\n{out}\nstderr:\n{err}"
        self.start, self.last = json.loads(lines["START"]), json.loads(lines["LAST"])


def _interrupt(cmd: list[str], tmp_path, marker: str, settle_s: float) -> Interrupted:
    """Start ``cmd``, wait for the line ``marker``, let it run ``settle_s``, SIGINT it; bounded throughout."""
    stderr = (tmp_path / "child.stderr").open("w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=stderr)
    try:
        before = _read_until(proc, marker, ARMED_WITHIN_S)
        time.sleep(settle_s)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=EXIT_WITHIN_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=5)
            raise AssertionError(f"child still running {EXIT_WITHIN_S} s after SIGINT (killed): {cmd}") from None
        exit_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        stderr.seek(0)
        err = stderr.read()
        stderr.close()
    return Interrupted(proc.returncode, exit_s, before + rest.decode(), err)


def test_sigint_mid_capture_releases_everything_and_marks_the_file_incomplete(tmp_path, record_property):
    """SIGINT during the live bulk copy: prompt exit, nothing left held, the file marked incomplete."""
    path = tmp_path / "interrupted.snap"
    cmd = [sys.executable, "-m", "tests.reliability_child", "interrupted-capture", str(path)]
    # A few of the copy's chunks done, most not: the interrupt lands in the bulk copy.
    run = _interrupt(cmd, tmp_path, "ARMED", settle_s=0.05)
    start, last = run.start, run.last
    print(f"SIGINT -> exit {run.returncode} in {run.exit_s:.3f} s; last words: {last}")
    record_property("exit_after_sigint_s", round(run.exit_s, 3))
    assert run.returncode == 130, f"exit status: expected 130 (interrupted), saw {run.returncode}; stderr:\n{run.err}"
    assert last["interrupted"] and last["stage"] == "bulk copy, guest running", (
        f"expected the interrupt during the bulk copy, saw stage {last['stage']!r}, interrupted={last['interrupted']}")
    assert last["wp_pages_left"] == 0, f"WP not released: {last['wp_pages_left']} pages keep PM_UFFD_WP"
    assert last["uffds"] == 0, f"userfaultfds still open: {last['uffds']}"
    assert last["fds"] == start["fds"], f"open fds: expected {start['fds']} as at the start, saw {last['fds']}"
    assert last["threads"] == start["threads"], (
        f"threads (kernel count: vCPU threads, the C handler, KVM's worker): expected {start['threads']}, "
        f"saw {last['threads']}")
    assert last["python_threads"] == 1, f"Python threads: expected 1, saw {last['python_threads']}"

    assert path.exists(), "the partial snapshot file is gone: expected it kept, marked incomplete"
    with pytest.raises(SnapshotFormatError, match=r"snapshot incomplete: flags: expected COMPLETE \(0x1\) set, "
                                                  r"saw 0x0: the capture that wrote this file did not finish"):
        SnapshotImage.open(path)
    header = SnapshotImage.open(path, verify=False, allow_incomplete=True)
    assert not header.complete and header.memory_size == 64 << 20, f"unexpected header: {header}"


def test_sigint_during_phase2_tears_everything_down(tmp_path, record_property):
    """SIGINT to a child pytest in phase 2: exit 2 within 10 s, no uffd, fd or thread left at unconfigure."""
    cmd = [sys.executable, "-m", "pytest", "phases/test_phase2_live_consistency.py", "-q", "-s", "-p", "no:randomly",
           "-p", "no:faulthandler", "-p", "tests.reliability_child", "--results-dir", "", "--reports", "none",
           "--benchmark-disable", "-k", "64MiB-2vcpus"]
    # The storm guest is running: the runner is started and not yet stopped.
    run = _interrupt(cmd, tmp_path, "CALL phases/test_phase2_live_consistency.py::"
                                    "test_live_snapshot_of_memfd_is_memory_at_the_arm_instant[64MiB-2vcpus]", 0.1)
    start, last = run.start, run.last
    where = next((ln for ln in run.out.splitlines() if ln.endswith(": KeyboardInterrupt")), "(no traceback line)")
    print(f"SIGINT -> pytest exit {run.returncode} in {run.exit_s:.3f} s, interrupted at {where}; last words: {last}")
    record_property("exit_after_sigint_s", round(run.exit_s, 3))
    assert run.returncode == 2, (
        f"exit status: expected 2 (pytest interrupted), saw {run.returncode}; stderr:\n{run.err}")
    assert last["uffds"] == 0, f"userfaultfds still open at unconfigure: {last['uffds']}"
    assert last["fds"] <= start["fds"], f"open fds: expected at most {start['fds']} as at the start, saw {last['fds']}"
    assert last["threads"] == start["threads"], f"threads (kernel count): expected {start['threads']}, " \
                                                f"saw {last['threads']}"
    assert last["python_threads"] == start["python_threads"], (
        f"Python threads: expected {start['python_threads']}, saw {last['python_threads']}")


def test_a_finalized_engine_holds_no_view_of_the_snapshot_file(tmp_path, make_memory):
    """finalize() drops the engine's view of writer.memory, so the file seals while the engine object is open."""
    from native.wp import WpSnapshot

    mem = make_memory("memfd", 1 << 20)
    mem.write(0x3000, b"\xab")
    path = tmp_path / "sealed.snap"
    # The order a caller writes without thinking of views: engine finalized, file sealed, engine closed last.
    with SnapshotImage.create(path, mem.size) as writer, WpSnapshot(mem, writer.memory) as snap:
        snap.arm()
        snap.bulk_copy()
        snap.finalize()
        image = writer.finalize()  # before the fix: BufferError, the engine's view of the mapping was alive
        with pytest.raises(ValueError, match="finalized or released and no longer holds its destination"):
            snap.bulk_copy()
    assert image.complete, f"expected a COMPLETE file, saw flags {image.flags:#x}"
    loaded = SnapshotImage.open(path)
    assert loaded.read_memory(0x3000, 1) == b"\xab", "the sealed file lost the page written before the arm"


def test_closing_a_vm_under_a_running_runner_kicks_it_out_first(make_memory, make_vm):
    """Closing a VM under a runner never stopped kicks the run out first; its thread ends, nothing crashes."""
    import guests
    from native.kvm import Vm
    from native.live import VcpuRunner

    mem = make_memory("memfd", 1 << 20)
    mem.write(guests.FLAT32_LOAD_GPA, guests.load("spin16"))
    vm = Vm.create()
    vm.set_region(slot=0, gpa=0, memory=mem)
    vcpu = vm.add_vcpu()
    vcpu.set_flat32(eip=guests.FLAT32_LOAD_GPA, esp=0x7000)
    runner = VcpuRunner([vcpu], timeout=60.0).start()
    time.sleep(0.05)
    t0 = time.monotonic()
    vm.close()  # before the fix: kvm_run unmapped under the running loop, a segfault when it returned
    took = time.monotonic() - t0
    assert runner.wait_finished(2.0), "the runner's thread still alive 2 s after its VM was closed"
    print(f"closing the VM took {took * 1e3:.1f} ms")  # bounded by the kick + the wait above
    assert runner.exits[0].reason.name == "KICKED", f"expected KICKED, saw {runner.exits[0].describe()}"
