"""native/qemu.py against a real QEMU: the QMP client, QEMU's background snapshot, and that QEMU and its files go
away on every path, the failing ones included.

Phase 5 puts QEMU's background snapshot beside snapproof's strategies and checks two things of it (QEMU's
stream is its own format): it sent every byte of RAM, and the guest wrote while it ran. Both can fail: a
stopped guest's migration sees no write, and a guest whose memory holds pages of zeros sends less than its
size (QEMU sends such a page as a header alone), which is why QemuGuest fills memory first.

Run where QEMU is (row ``qemu`` of the host probe); deselected naming it elsewhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from snapproof.native import qemu
from snapproof.native.qemu import QemuError, QemuGuest

from tests.reliability_support import ROOT, open_fds

pytestmark = pytest.mark.needs("qemu", "kvm")

SIZE = 16 << 20  # 3840 storm pages past 1 MiB: a first sweep in well under a second even on a loaded host
WARM_WRITES = 2 * 1024


def gone(pid: int) -> bool:
    """The process is reaped: no /proc entry left (a zombie still has one)."""
    return not os.path.exists(f"/proc/{pid}")


def dead(pid: int) -> bool:
    """The process no longer runs: reaped, or a zombie its new parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture
def leaves_nothing():
    """Checks, after the test, that every QEMU it started is reaped and that no fd of this process is left open
    (QEMU's ROM, log, QMP socket and snapshot streams are all fds: nothing of it is ever on disk);
    ``leaves_nothing(guest)`` registers one."""
    fds = open_fds()
    pids: list[int] = []

    def _watch(guest: QemuGuest) -> QemuGuest:
        assert guest.pid is not None
        pids.append(guest.pid)
        return guest

    yield _watch
    for pid in pids:
        assert gone(pid), f"QEMU pid {pid} still exists after close()"
    assert open_fds() == fds, f"{open_fds() - fds} fds more open than before the test"


def test_qmp_starts_answers_and_quits(leaves_nothing):
    """QEMU starts stopped at its reset vector (prelaunch), runs the storm on `cont`, answers query-status, and
    exits 0 on `quit`; nothing is left."""
    with leaves_nothing(QemuGuest.with_memory(SIZE)) as guest:
        assert guest.qmp is not None and guest.qmp.greeting["version"]["qemu"]["major"] >= qemu.MIN_VERSION[0]
        assert guest.status() == "prelaunch"
        assert guest.position() == 0, "the guest wrote before it was started"
        guest.resume()
        assert guest.status() == "running"
        reached = guest.wait_for_writes(WARM_WRITES)
        assert reached >= WARM_WRITES
        assert guest.quit() == 0
        assert guest.proc is not None and guest.proc.poll() == 0


def test_background_snapshot_sends_all_ram_while_the_guest_writes(leaves_nothing):
    """Two background snapshots in one QEMU (the second after the first's cleanup): each completed, sent at least
    the guest's RAM, and the guest wrote during each."""
    with leaves_nothing(QemuGuest.with_memory(SIZE)) as guest:
        guest.resume()
        guest.wait_for_writes(WARM_WRITES)
        for n in (1, 2):
            snap = guest.background_snapshot()
            assert snap.status == "completed" and snap.accel == "kvm", snap
            assert snap.transferred >= SIZE, f"snapshot {n}: sent {snap.transferred:#x} bytes of RAM < {SIZE:#x}"
            assert snap.zero_pages * snap.page_size < (1 << 20), f"snapshot {n}: {snap.zero_pages} pages of zeros"
            assert snap.stream_bytes >= snap.transferred, snap
            assert snap.guest_writes > 0, f"snapshot {n}: the guest made no write during it"
            assert snap.total_ns > 0 and snap.wall_ns > 0, f"snapshot {n}: no total time: {snap}"
        assert guest.status() == "running"


def test_the_phase_checks_fail_on_a_stopped_guest_with_pages_of_zeros(leaves_nothing):
    """The two checks phase 5 makes of QEMU's snapshot can fail: a plain migration of a stopped guest whose
    memory was not filled sees no guest write, and sends less than the RAM's size (its pages of zeros as headers)."""
    with leaves_nothing(QemuGuest.with_memory(SIZE, fill=False)) as guest:
        guest.resume()
        guest.wait_for_writes(WARM_WRITES)
        guest.pause()
        snap = guest.migrate()
        assert snap.status == "completed", snap
        assert snap.guest_writes == 0, f"a stopped guest wrote {snap.guest_writes} stamps during the migration"
        assert snap.transferred < SIZE, f"pages of zeros: expected less than {SIZE:#x} bytes sent, saw {snap}"
        assert snap.zero_pages > 0, snap


def test_refused_capability_is_an_error_naming_it_and_leaves_nothing(leaves_nothing):
    """A migration capability QEMU refuses: QemuError naming it and QEMU's reason; close() leaves nothing."""
    guest = leaves_nothing(QemuGuest.with_memory(SIZE))
    try:
        with pytest.raises(QemuError, match=r"refused migration capability 'no-such-capability'.*GenericError"):
            guest.set_capability("no-such-capability")
    finally:
        guest.close()
    guest.close()  # idempotent


def test_qemu_killed_mid_snapshot_is_an_error_naming_it_and_leaves_nothing(leaves_nothing, monkeypatch):
    """QEMU killed (SIGKILL) right after it took `migrate`: QemuError saying it exited on SIGKILL; nothing left."""
    guest = leaves_nothing(QemuGuest.with_memory(SIZE))
    try:
        guest.resume()
        guest.wait_for_writes(WARM_WRITES)
        assert guest.qmp is not None
        execute = guest.qmp.execute

        def kill_after_migrate(command, *args, **kw):
            result = execute(command, *args, **kw)
            if command == "migrate":
                assert guest.pid is not None
                os.kill(guest.pid, signal.SIGKILL)
            return result

        monkeypatch.setattr(guest.qmp, "execute", kill_after_migrate)
        with pytest.raises(QemuError, match="QEMU exited: signal SIGKILL"):
            guest.background_snapshot()
    finally:
        guest.close()


def test_qemu_that_cannot_start_is_an_error_with_its_log_and_leaves_nothing(monkeypatch):
    """QEMU exiting at start (here: asked for a machine type it does not have) is a QemuError with its status and
    its own words; no fd is left open."""
    monkeypatch.setattr(qemu, "MACHINE", "no-such-machine")
    fds = open_fds()
    with pytest.raises(QemuError, match=r"QEMU closed the connection; QEMU exited with status 1; its log: "
                                        r".*unsupported machine type"):
        QemuGuest.with_memory(SIZE)
    assert open_fds() == fds, f"{open_fds() - fds} fds more open than before"


def test_missing_qemu_is_an_error_naming_the_binary_and_the_package(monkeypatch, tmp_path):
    """No qemu-system-x86_64 on PATH: QemuError naming it and the package to install, before anything is made."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(QemuError, match=r"qemu-system-x86_64 is not on PATH.*apt-get install qemu-system-x86"):
        QemuGuest.with_memory(SIZE)


def test_qemu_dies_with_the_process_that_started_it():
    """A child process that starts QEMU and is then SIGKILLed takes QEMU with it (PR_SET_PDEATHSIG): a pytest
    ended by its timeout leaves no QEMU running."""
    script = ("import os, sys; from native.qemu import QemuGuest; g = QemuGuest.with_memory(16 << 20); "
              "print(g.pid, flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=ROOT)
    try:
        assert child.stdout is not None
        pid = int(child.stdout.readline())
        assert not dead(pid), f"QEMU pid {pid} is not running in the child"
    finally:
        child.kill()
        child.wait(timeout=30)
    deadline = time.monotonic() + 30
    while not dead(pid) and time.monotonic() < deadline:  # SIGKILL is delivered when the child is gone
        time.sleep(0.05)
    assert dead(pid), f"QEMU pid {pid} still runs 30 s after the process that started it was killed"
