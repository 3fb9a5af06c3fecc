"""QEMU's own live snapshot, taken beside snapproof's strategies (phase 5): the peer a VMM team compares against.

QEMU 6.0+ snapshots a running guest with the ``background-snapshot`` migration capability: it stops the
guest, write-protects guest RAM with userfaultfd, saves device state, resumes the guest, then writes RAM into
the migration stream, a page the guest is about to write copied first. That is copy-before-write, the design
of snapproof's wp-copy-before-write strategy, in another VMM. QEMU 7.2 has no ``file:`` migration URI: the
stream goes to a file descriptor handed over QMP (``getfd``, then ``migrate fd:NAME``), a memfd, so QEMU
writes into memory as snapproof's strategies copy into memory, and nothing is left on disk.

The guest is the suite's storm32 (guests/storm32.S), entered through guests/reset16.S (the firmware ROM:
reset vector -> flat 32-bit at 0x1000, ESI = vCPU 0's parameter block at 0x8000). It sweeps every page from
1 MiB (below that lie the PC's VGA window and BIOS area) to the end of RAM below the 32-bit hole, forever,
stamping (generation, page) into each page's first and last 8 bytes in the order its seed gives. Its RAM is
the caller's memfd (``memory-backend-file`` on ``/proc/self/fd/N``, ``share=on``), so this process reads the
guest's progress while it runs. Every byte of it is written (FILL_BYTE) before QEMU starts: QEMU sends a page
of zeros as a header alone, while snapproof's strategies copy every page whatever it holds; with no page of
zeros both copy the same bytes.

``QemuGuest`` owns the QEMU process and what it hands it, all file descriptors (the ROM and QEMU's log are
memfds, QMP one end of a socketpair): nothing of it is on disk, so nothing is left there however this process
ends. ``close()``, which every failure of the constructor runs too, kills QEMU if it still runs, reaps it and
closes them; QEMU also dies with this process (PR_SET_PDEATHSIG), so a pytest ended by its timeout leaves no
QEMU behind. Every wait has a timeout. Whatever fails raises QemuError naming it: QEMU missing or too old,
QEMU exiting (its status and the last lines of its log), a QMP command QEMU refused (its error class and
text), a wait that timed out (what was awaited, for how long).
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    raise ImportError("native.qemu drives qemu-system-x86_64 on KVM: Linux only")

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapproof.guests import storm
from snapproof.guests.storm import PAGE_SIZE
from snapproof.native.layout import LOW_RAM_END

from snapproof import guests

if TYPE_CHECKING:  # imported when a guest is made: the host probe asks find_qemu without the native build
    from snapproof.native.memory import GuestMemory

QEMU_BINARY = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"   # Debian's and Ubuntu's package of it
MIN_VERSION = (6, 0)               # the first QEMU with the background-snapshot capability
BACKGROUND_SNAPSHOT = "background-snapshot"
QEMU_ROW = "qemu-background-snapshot"  # its row beside snapproof's strategies (phase 5)
MACHINE = "pc"  # i440FX: RAM from 0, the firmware ROM at the top of 4 GiB, nothing on the buses (-nodefaults)
# Guest RAM from here up is the storm's: below it a PC has its VGA window and BIOS area (0xA0000-0xFFFFF),
# which the guest does not see as RAM, and the guest's own code, GDT, stack and parameter block.
STORM_REGION_GPA = 0x10_0000
STORM_SEED = 0x5EED
FILL_BYTE = 0xA5                   # never a page of zeros; and 0xA5A5A5A5 is no generation a storm reaches
TERMINAL_STATES = ("completed", "failed", "cancelled")
UNCAPPED_BANDWIDTH = 1 << 40       # bytes/s: far past any memory copy, so QEMU's rate limit never applies
LOG_TAIL_LINES = 12
LOG_TAIL_BYTES = 16 << 10
HUNG_UP_WAIT_S = 2.0


class QemuError(RuntimeError):
    """QEMU could not be run, or did not do what it was asked; the message names the step and what was seen."""


# -- the binary ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QemuBinary:
    path: str
    version: tuple[int, int, int]
    banner: str  # the first line of ``--version``

    def describe(self) -> str:
        return f"{self.path}: {self.banner}"


def find_qemu(timeout: float = 30.0) -> QemuBinary:
    """``qemu-system-x86_64`` on PATH, asked its version; QemuError naming why when it is missing, does not
    answer, or is older than MIN_VERSION."""
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise QemuError(f"{QEMU_BINARY} is not on PATH")
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise QemuError(f"{path} --version did not answer: {e}") from None
    banner = (proc.stdout.strip().splitlines() or [""])[0]
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", banner)
    if proc.returncode != 0 or m is None:
        raise QemuError(f"{path} --version: exit {proc.returncode}, no version in {banner or proc.stderr.strip()!r}")
    version = (int(m[1]), int(m[2]), int(m[3]))
    if version[:2] < MIN_VERSION:
        raise QemuError(f"{path} is QEMU {'.'.join(map(str, version))}: background-snapshot needs "
                        f"{'.'.join(map(str, MIN_VERSION))} or later")
    return QemuBinary(path, version, banner)


# -- QMP ---------------------------------------------------------------------------------------------


class Qmp:
    """A QMP client on a connected socket: one command at a time, the events QEMU sends kept in order.

    ``peer(hung_up)`` describes QEMU for an error (alive or its exit status, the tail of its log); ``hung_up``:
    QEMU closed the connection, so it is likely exiting and worth a moment to learn how.
    """

    def __init__(self, sock: socket.socket, peer: Callable[[bool], str], timeout: float = 30.0) -> None:
        self.sock = sock
        self.peer = peer
        self.events: list[dict[str, Any]] = []
        self._buf = b""
        self._id = 0
        greeting = self.read(timeout, "QMP greeting")
        if greeting is None or "QMP" not in greeting:
            raise QemuError(f"QMP: expected QEMU's greeting, saw {greeting!r}; {peer(False)}")
        self.greeting = greeting["QMP"]
        self.execute("qmp_capabilities", timeout=timeout)

    def read(self, timeout: float, waiting_for: str) -> dict[str, Any] | None:
        """The next message QEMU sends, or None when none comes within ``timeout``; QemuError if QEMU hung up."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            except OSError as e:
                raise QemuError(f"QMP, waiting for {waiting_for}: {e}; {self.peer(True)}") from None
            if not chunk:
                raise QemuError(f"QMP, waiting for {waiting_for}: QEMU closed the connection; {self.peer(True)}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            raise QemuError(f"QMP, waiting for {waiting_for}: not JSON: {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise QemuError(f"QMP, waiting for {waiting_for}: not a JSON object: {line[:200]!r}")
        return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None, fds: tuple[int, ...] = (),
                timeout: float = 30.0) -> Any:
        """Run ``command`` and return what QEMU returned; ``fds`` go with it (SCM_RIGHTS, for ``getfd``).
        QemuError naming the command and QEMU's error class and text when QEMU refuses it, or when no answer
        comes within ``timeout``."""
        self._id += 1
        msg = {"execute": command, "id": self._id, **({"arguments": arguments} if arguments else {})}
        data = json.dumps(msg).encode() + b"\n"
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
        except OSError as e:
            raise QemuError(f"QMP {command}: could not send it: {e}; {self.peer(True)}") from None
        deadline = time.monotonic() + timeout
        while True:
            reply = self.read(deadline - time.monotonic(), f"the answer to {command}")
            if reply is None:
                raise QemuError(f"QMP {command}: no answer within {timeout:.0f} s; {self.peer(False)}")
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != self._id:
                continue  # an answer to a command given up on after its timeout
            if "error" in reply:
                err = reply["error"]
                raise QemuError(f"QMP {command}{'' if not arguments else ' ' + json.dumps(arguments)}: QEMU "
                                f"refused it: {err.get('class')}: {err.get('desc')}")
            return reply.get("return")

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The oldest event not yet taken, waiting up to ``timeout`` for one."""
        if not self.events:
            msg = self.read(timeout, "an event")
            if msg is not None and "event" in msg:
                self.events.append(msg)
        return self.events.pop(0) if self.events else None

    def close(self) -> None:
        self.sock.close()


# -- the guest ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QemuSnapshot:
    """One snapshot QEMU took, in QEMU's own figures (``query-migrate``, whole milliseconds) and this process's."""

    status: str
    pause_ns: int       # QEMU's downtime: the guest stopped while QEMU write-protected RAM and saved device state
    total_ns: int       # QEMU's total-time: migrate -> completed
    setup_ns: int       # QEMU's setup-time, part of total
    wall_ns: int        # this process's clock: migrate sent -> completion seen
    transferred: int    # bytes of RAM QEMU put in the stream (ram.transferred: pages and their headers)
    ram_total: int      # bytes of every RAM block QEMU migrates: the guest's RAM and QEMU's ROMs
    normal_pages: int   # pages sent whole
    zero_pages: int     # pages of zeros, sent as a header alone (ram.duplicate)
    page_size: int
    stream_bytes: int   # the whole stream as QEMU wrote it: RAM, device state, headers
    guest_writes: int   # the storm's slot writes between migrate and completion: the guest ran meanwhile
    accel: str

    def bytes_ratio(self, size: int) -> float:
        return self.transferred / size


def _die_with_parent() -> None:
    """In QEMU's child before exec: SIGKILL it when this process dies, however it dies."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


_PR_SET_PDEATHSIG = 1
# Looked up here, not in the child: between fork and exec only this call runs (the vCPU and handler threads of
# a phase may hold locks a lookup would need).
_prctl = ctypes.CDLL(None, use_errno=True).prctl


class QemuGuest:
    """storm32 in QEMU over ``memory`` (a memfd GuestMemory of the caller's), on one vCPU, stopped at its reset
    vector until ``resume()``; ``background_snapshot()`` takes QEMU's snapshot of it as it runs.

    ``accel``: ``kvm`` (what phase 5 compares: a TCG guest is no peer of a KVM one) or ``tcg``, named in every
    snapshot. ``fill``: write FILL_BYTE over memory first (False: leave it as it is, zeros on a fresh memfd).
    """

    def __init__(self, memory: GuestMemory, accel: str = "kvm", seed: int = STORM_SEED, fill: bool = True,
                 timeout: float = 60.0) -> None:
        self.memory = memory
        self.accel = accel
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: Qmp | None = None
        self._log: int | None = None  # QEMU's stdout and stderr: a memfd
        self._capabilities: dict[str, bool] = {}
        self._owned: GuestMemory | None = None
        if memory.backing != "memfd" or memory.fd is None:
            raise ValueError(f"QEMU's guest RAM is a memfd it shares with this process: got {memory.label} memory")
        if accel not in ("kvm", "tcg"):
            raise ValueError(f"accel {accel!r}: kvm or tcg")
        region_end = min(memory.size, LOW_RAM_END)
        pages = (region_end - STORM_REGION_GPA) // PAGE_SIZE
        if pages < 2:
            raise ValueError(f"guest memory {memory.size:#x}: QEMU's storm needs RAM past {STORM_REGION_GPA:#x} "
                             "(below it lie the PC's VGA window and BIOS area)")
        self.params = storm.StormParams.from_seed(seed, region_gpa=STORM_REGION_GPA, npages=pages, generations=0)
        try:
            self.binary = find_qemu()
        except QemuError as e:
            raise QemuError(f"{e} (Debian, Ubuntu: `sudo apt-get install {QEMU_PACKAGE}`)") from None
        try:
            self._start(fill)
        except BaseException:
            self.close()
            raise

    @classmethod
    def with_memory(cls, size: int, **kw: Any) -> QemuGuest:
        """A guest over a memfd of ``size`` made for it, closed with it (``close()`` frees it)."""
        from snapproof.native.memory import GuestMemory

        mem = GuestMemory.memfd(size, name="snapproof-qemu-ram")
        try:
            guest = cls(mem, **kw)
        except BaseException:
            mem.close()
            raise
        guest._owned = mem
        return guest

    def _start(self, fill: bool) -> None:
        mem = self.memory
        if fill:
            chunk = bytes([FILL_BYTE]) * (1 << 20)
            for at in range(0, mem.size, len(chunk)):
                n = min(len(chunk), mem.size - at)
                mem.write(at, chunk[:n])
        mem.write(guests.FLAT32_LOAD_GPA, guests.load(storm.GUEST))
        mem.write(guests.PARAM_BLOCK_GPA, self.params.pack())
        # Nothing of QEMU's is on disk, so nothing is left behind however this process ends: the ROM and QEMU's
        # log are memfds, QMP one end of a socketpair; QEMU opens the ROM and guest RAM as /proc/self/fd/N.
        self._log = os.memfd_create("snapproof-qemu-log", os.MFD_CLOEXEC)
        rom = os.memfd_create("snapproof-qemu-rom", os.MFD_CLOEXEC)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.write(rom, guests.rom_image("reset16"))
            ram = mem.fd
            assert ram is not None
            cmd = [self.binary.path, "-nodefaults", "-no-user-config", "-display", "none",
                   "-machine", f"{MACHINE},accel={self.accel},memory-backend=ram", "-smp", "1",
                   "-m", f"{mem.size >> 20}M",
                   "-object", f"memory-backend-file,id=ram,size={mem.size},mem-path=/proc/self/fd/{ram},share=on,"
                              "prealloc=on",  # populated up front, as phase 5 populates snapproof's guests
                   "-bios", f"/proc/self/fd/{rom}",
                   "-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control",
                   "-S"]  # stopped at the reset vector until resume()
            self.command = cmd
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                         pass_fds=(ram, rom, theirs.fileno()), preexec_fn=_die_with_parent)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            os.close(rom)
        self.qmp = Qmp(ours, self.describe, timeout=self.timeout)
        status = self.status()
        if status != "prelaunch":
            raise QemuError(f"QEMU started with -S: expected run state prelaunch, saw {status}; {self.describe()}")

    # -- what QEMU is doing ----------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def log_tail(self) -> str:
        """The last lines QEMU wrote to its stdout and stderr, joined by " | "."""
        if self._log is None:
            return ""
        size = os.fstat(self._log).st_size
        text = os.pread(self._log, min(size, LOG_TAIL_BYTES), max(0, size - LOG_TAIL_BYTES)).decode(errors="replace")
        return " | ".join(text.strip().splitlines()[-LOG_TAIL_LINES:])

    def describe(self, hung_up: bool = False) -> str:
        """QEMU's state for an error: running (pid) or how it exited, and the tail of its log. ``hung_up``: QEMU
        closed QMP, so wait a moment (HUNG_UP_WAIT_S) for it to exit before saying whether it did."""
        if self.proc is not None and hung_up:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=HUNG_UP_WAIT_S)
        if self.proc is None:
            state = "QEMU not started"
        elif (rc := self.proc.poll()) is None:
            state = f"QEMU pid {self.proc.pid} running"
        else:
            state = (f"QEMU exited: signal {signal.Signals(-rc).name}" if rc < 0 else f"QEMU exited with status {rc}")
        tail = self.log_tail()
        return f"{state}; its log: {tail}" if tail else f"{state}; its log is empty"

    def _qmp(self) -> Qmp:
        if self.qmp is None:
            raise QemuError(f"QEMU is not running under QMP here; {self.describe()}")
        return self.qmp

    def status(self) -> str:
        """QEMU's run state (``query-status``): prelaunch, running, paused, postmigrate, ..."""
        return str(self._qmp().execute("query-status", timeout=self.timeout)["status"])

    def resume(self) -> None:
        """Run the guest (QMP ``cont``)."""
        self._qmp().execute("cont", timeout=self.timeout)

    def pause(self) -> None:
        """Stop the guest's vCPU (QMP ``stop``): QEMU's process stays, idle."""
        self._qmp().execute("stop", timeout=self.timeout)

    def position(self) -> int:
        """The storm's instant (slot writes done) as its memory shows it now (guests.storm.live_position)."""
        mm = self.memory.mm
        return storm.live_position(self.params, guests.PARAM_BLOCK_GPA,
                                   lambda gpa: struct.unpack_from("<I", mm, gpa)[0])

    def wait_for_writes(self, writes: int, timeout: float | None = None) -> int:
        """Wait until the guest has made ``writes`` slot writes (from its start); the position reached."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while (pos := self.position()) < writes:
            if time.monotonic() > deadline:
                raise QemuError(f"the storm guest made {pos} of {writes} slot writes within {limit:.0f} s (run "
                                f"state {self.status()}); {self.describe()}")
            time.sleep(0.002)
        return pos

    # -- snapshots -------------------------------------------------------------------------------
    def set_capability(self, name: str, state: bool = True) -> None:
        """``migrate-set-capabilities``: QemuError naming the capability and QEMU's reason when it refuses."""
        try:
            self._qmp().execute("migrate-set-capabilities",
                                {"capabilities": [{"capability": name, "state": state}]}, timeout=self.timeout)
        except QemuError as e:
            raise QemuError(f"QEMU refused migration capability {name!r} = {state}: {e}") from None
        self._capabilities[name] = state

    def background_snapshot(self, timeout: float | None = None) -> QemuSnapshot:
        """QEMU's background snapshot of the running guest into a memfd, waited for up to ``timeout``."""
        if not self._capabilities.get(BACKGROUND_SNAPSHOT):
            self.set_capability("events")  # MIGRATION events: completion is seen when it happens
            self.set_capability(BACKGROUND_SNAPSHOT)
            # A migration is capped at 128 MiB/s by default (a network's share); a snapshot into memory is not.
            self._qmp().execute("migrate-set-parameters", {"max-bandwidth": UNCAPPED_BANDWIDTH},
                                timeout=self.timeout)
        return self.migrate(timeout)

    def migrate(self, timeout: float | None = None) -> QemuSnapshot:
        """One migration with the capabilities set so far into a fresh memfd, polled with ``query-migrate`` until
        it completes (QemuError naming how it ended otherwise, or the timeout, after cancelling it)."""
        qmp = self._qmp()
        limit = self.timeout if timeout is None else timeout
        out = os.memfd_create("snapproof-qemu-snapshot", os.MFD_CLOEXEC)
        try:
            qmp.execute("getfd", {"fdname": "snapshot"}, fds=(out,), timeout=self.timeout)
            qmp.events.clear()  # the last migration's: this one's end is what counts
            before = self.position()
            t0 = time.perf_counter_ns()
            qmp.execute("migrate", {"uri": "fd:snapshot"}, timeout=self.timeout)
            info, t1 = self._wait_migration(qmp, limit)
            after = self.position()
            if info.get("status") == "completed":
                # QEMU reports completed from its migration thread, then cleans up in its main loop: its totals
                # and closing the stream come after. Once it closed the stream the cleanup has run (QMP waits
                # for the main loop), and the next migrate will not find the last one still registered.
                self._wait_stream_closed(out, limit)
                info = qmp.execute("query-migrate", timeout=self.timeout)
            stream_bytes = os.fstat(out).st_size
        finally:
            os.close(out)
        if info.get("status") != "completed":
            raise QemuError(f"QEMU's migration ended {info.get('status')}: {info.get('error-desc', 'no error-desc')}; "
                            f"{self.describe()}")
        ram = info.get("ram", {})
        ms = 1_000_000
        return QemuSnapshot(status=str(info["status"]), pause_ns=int(info.get("downtime", 0)) * ms,
                            total_ns=int(info.get("total-time", 0)) * ms, setup_ns=int(info.get("setup-time", 0)) * ms,
                            wall_ns=t1 - t0, transferred=int(ram.get("transferred", 0)),
                            ram_total=int(ram.get("total", 0)), normal_pages=int(ram.get("normal", 0)),
                            zero_pages=int(ram.get("duplicate", 0)), page_size=int(ram.get("page-size", PAGE_SIZE)),
                            stream_bytes=stream_bytes, guest_writes=after - before, accel=self.accel)

    def _wait_migration(self, qmp: Qmp, limit: float) -> tuple[dict[str, Any], int]:
        """(query-migrate's answer once the migration ended, the perf_counter_ns when its end was seen): the
        MIGRATION event says when, query-migrate (asked between events, every 10 ms) makes sure."""
        deadline = time.monotonic() + limit
        ended_at = None
        while True:
            event = qmp.next_event(0.01)
            if (ended_at is None and event is not None and event.get("event") == "MIGRATION"
                    and event.get("data", {}).get("status") in TERMINAL_STATES):
                ended_at = time.perf_counter_ns()
            info = qmp.execute("query-migrate", timeout=self.timeout)
            if info.get("status") in TERMINAL_STATES:
                return info, time.perf_counter_ns() if ended_at is None else ended_at
            if time.monotonic() > deadline:
                with contextlib.suppress(QemuError):  # the timeout is the error to report, whatever cancel says
                    qmp.execute("migrate_cancel", timeout=self.timeout)
                sent = info.get("ram", {}).get("transferred", 0)
                raise QemuError(f"QEMU's migration did not end within {limit:.0f} s (status {info.get('status')}, "
                                f"{sent} bytes sent); cancelled; {self.describe()}")

    def _wait_stream_closed(self, out: int, limit: float) -> None:
        """Wait until QEMU holds no descriptor of the stream file ``out`` (its /proc/PID/fd)."""
        assert self.proc is not None
        st = os.fstat(out)
        fds = Path(f"/proc/{self.proc.pid}/fd")
        deadline = time.monotonic() + limit

        def holds() -> bool:
            for entry in fds.iterdir():
                try:
                    s = entry.stat()
                except OSError:  # closed while we looked
                    continue
                if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
                    return True
            return False

        while holds():
            if time.monotonic() > deadline:
                raise QemuError(f"QEMU still holds the snapshot stream {limit:.0f} s after completing it; "
                                f"{self.describe()}")
            time.sleep(0.001)

    # -- the end -----------------------------------------------------------------------------------
    def quit(self, timeout: float | None = None) -> int:
        """QMP ``quit``; QEMU's exit status (QemuError if it is still running after ``timeout``)."""
        limit = self.timeout if timeout is None else timeout
        self._qmp().execute("quit", timeout=limit)
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            raise QemuError(f"QEMU still runs {limit:.0f} s after quit; {self.describe()}") from None

    def close(self) -> None:
        """Kill QEMU if it still runs, reap it, close what it was given; idempotent, on every path."""
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        try:
            if self.proc is not None:
                if self.proc.poll() is None:
                    self.proc.kill()
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:  # SIGKILL not taken in 30 s: a process in D state
                    raise QemuError(f"QEMU pid {self.proc.pid} did not die within 30 s of SIGKILL") from None
                self.proc = None
        finally:
            if self._log is not None:
                os.close(self._log)
                self._log = None
            if self._owned is not None:
                self._owned.close()
                self._owned = None

    def __enter__(self) -> QemuGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
