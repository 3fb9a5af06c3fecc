"""Helpers of the reliability self-tests (tests/test_reliability_*.py): process gauges, a uffd nobody
serves, a vCPU or host writer on its own thread, and child processes that can never hang the parent.

Linux only, like the tests that use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# -- process gauges -------------------------------------------------------------------------------


def _status(field_name: str) -> str:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return line.split(":", 1)[1].strip()
    raise KeyError(field_name)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def uffd_fds() -> int:
    """Open userfaultfds of this process (anon inodes named [userfaultfd])."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    return n


def rss_bytes() -> int:
    return int(_status("VmRSS").split()[0]) * 1024


def kernel_threads() -> int:
    """Threads of this process as the kernel counts them: Python's, the engine's C handlers, KVM's workers."""
    return int(_status("Threads"))


@dataclass(frozen=True)
class Gauges:
    fds: int
    uffds: int
    rss: int
    threads: int          # kernel count (/proc/self/status Threads)
    python_threads: int   # threading.active_count()

    @classmethod
    def now(cls) -> Gauges:
        return cls(open_fds(), uffd_fds(), rss_bytes(), kernel_threads(), threading.active_count())

    @classmethod
    def settled(cls, timeout: float = 5.0) -> Gauges:
        """The gauges once every thread the kernel counts is one Python knows (or at ``timeout``): a start taken
        while the previous test's VM worker or C handler is still being reaped counts a thread that leaves during
        the test, and a thread count that fell reads as wrong as one that grew."""
        threads_settled(threading.active_count(), timeout)
        return cls.now()

    def as_dict(self) -> dict[str, int]:
        return {"fds": self.fds, "uffds": self.uffds, "rss": self.rss, "threads": self.threads,
                "python_threads": self.python_threads}


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def c_heap_in_use() -> int | None:
    """Bytes the process's C code holds from malloc (glibc's mallinfo2: in-use chunks plus mmapped ones), None
    without glibc 2.33+. Unlike VmRSS it ignores what the allocator keeps cached after a free."""
    mallinfo2 = getattr(ctypes.CDLL(None), "mallinfo2", None)
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _Mallinfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def guest_mappings() -> list[str]:
    """Mappings that hold guest memory, a vCPU's run page or a snapshot file: memfds, anon inodes (KVM vCPUs,
    guest_memfd) and files deleted while mapped. Each cycle removes all of its own; one left over is a leak."""
    held = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            name = parts[5].strip() if len(parts) > 5 else ""
            if name.startswith(("/memfd:", "anon_inode:")) or name.endswith("(deleted)"):
                held.append(f"{parts[0]} {name}")
    return held


def python_bytes_held_by_suite() -> int:
    """Bytes of Python objects, alive now, allocated by this repository's code (tracemalloc, which must be
    tracing). Allocations by pytest and the interpreter's own caches, which come and go as earlier tests' data
    is freed (Python's allocated blocks moved by up to about 500 either way over 45 cycles inside the whole
    suite), are left out; a leak in snapproof's code or in cffi memory it asked for is in."""
    import tracemalloc

    root = str(ROOT) + os.sep
    held = 0
    for stat in tracemalloc.take_snapshot().statistics("filename"):
        name = stat.traceback[0].filename
        if name.startswith(root) and not name.endswith("reliability_support.py"):
            held += stat.size
    return held


@dataclass(frozen=True)
class HeldMemory:
    """What a leak grows and allocator caching does not: C heap in use, Python objects the suite's code
    allocated, guest-memory mappings. VmRSS also moves when glibc grows or trims the top of its heap (about
    1 MiB steps, measured over 3,000 snapshot cycles with nothing in use growing) and when khugepaged collapses
    the heap into huge pages."""
    c_heap: int | None
    python_bytes: int
    mappings: tuple[str, ...]

    @classmethod
    def now(cls) -> HeldMemory:
        import gc

        gc.collect()
        return cls(c_heap_in_use(), python_bytes_held_by_suite(), tuple(guest_mappings()))

    @staticmethod
    @contextlib.contextmanager
    def traced() -> Iterator[None]:
        """Python allocations traced while inside (what ``python_bytes`` reads), as they were before after."""
        import tracemalloc

        was = tracemalloc.is_tracing()
        if not was:
            tracemalloc.start(1)
        try:
            yield
        finally:
            if not was:
                tracemalloc.stop()


def processes_naming(marker: bytes) -> list[int]:
    """Processes on this host whose command line contains ``marker``: what a run must not leave behind."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if marker in cmdline:
            found.append(int(pid))
    return found


def threads_settled(want: int, timeout: float = 2.0) -> int:
    """The kernel thread count once it equals ``want``, or as it is at ``timeout``: a VM's KVM worker
    (kvm-nx-lpage-recovery, one per VM that ran) leaves shortly after the VM is closed, not at once, and
    a joined pthread is listed until the kernel reaps it (pthread_join returns when the exiting thread
    clears its tid, before that)."""
    end = time.monotonic() + timeout
    while (n := kernel_threads()) != want and time.monotonic() < end:
        time.sleep(0.01)
    return n


def wait_for(predicate: Any, what: str, timeout: float, interval: float = 0.001) -> None:
    """Poll ``predicate()`` every ``interval`` s until it is true; AssertionError naming ``what`` at ``timeout``
    (never a hang). A wait that must not compete for the CPU with what it watches polls less often."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not reached within {timeout} s")
        time.sleep(interval)


def thread_cpu_seconds(tid: int) -> tuple[float, str]:
    """(user + system CPU seconds, scheduler state letter) of one thread of this process."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), fields[0]


# Host settings the suite could be tempted to change: it changes one, vm.nr_hugepages, and only on request.
HOST_SETTINGS = [
    "/proc/sys/vm/nr_hugepages",
    "/proc/sys/vm/nr_overcommit_hugepages",
    "/proc/sys/vm/unprivileged_userfaultfd",
    "/proc/sys/vm/overcommit_memory",
    "/sys/kernel/mm/transparent_hugepage/enabled",
    "/sys/kernel/mm/transparent_hugepage/defrag",
    "/sys/kernel/mm/transparent_hugepage/shmem_enabled",
    "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
]


def _mthp_knobs() -> list[str]:
    from snapproof.native.thp import PMD_SIZE, mthp_knob, mthp_sizes

    return [str(mthp_knob(size)) for size in [*mthp_sizes(), PMD_SIZE] if mthp_knob(size).exists()]


# --thp sets THP knobs for a run, and a mTHP case one size's for its own duration: all of them are watched.
HOST_SETTINGS += _mthp_knobs()


def host_settings() -> dict[str, str]:
    """Each of HOST_SETTINGS as the kernel shows it now ("absent" where this kernel has no such file)."""
    out = {}
    for path in HOST_SETTINGS:
        try:
            out[path] = Path(path).read_text().strip()
        except OSError:
            out[path] = "absent"
    return out


# -- a userfaultfd that nobody serves -------------------------------------------------------------


class _UnservedUffd:
    """``memory`` registered on a raw uffd that no handler reads (``mode``, with ``features`` asked for): a
    fault raised there waits in the kernel until someone resolves it, wakes it, or the uffd is released.
    ``close()`` is idempotent."""

    def __init__(self, memory: Any, features: int, mode: int) -> None:
        from snapproof.native._lib import check, ffi, lib
        from snapproof.native.uffd import uffd_open_error

        self.memory = memory
        via = ffi.new("int *")
        fd = lib.sp_uffd_open(via)
        if fd < 0:
            raise uffd_open_error(-fd)
        self.fd: int | None = fd
        try:
            sup = ffi.new("uint64_t *")
            ioctls = ffi.new("uint64_t *")
            check(lib.sp_uffd_api(fd, features, sup, ioctls), "UFFDIO_API", features=features)
            check(lib.sp_uffd_register(fd, memory.addr, memory.size, mode, ioctls),
                  "UFFDIO_REGISTER", start=memory.addr, len=memory.size)
        except BaseException:
            self.close()
            raise

    def fault_pending(self, timeout: float) -> bool:
        """True once a fault message waits to be read (nobody reads it), within ``timeout``."""
        assert self.fd is not None, "uffd already closed"
        return bool(select.select([self.fd], [], [], timeout)[0])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UnservedWp(_UnservedUffd):
    """``memory`` write-protected on a uffd nobody serves: every write to it waits in the kernel until the
    page is un-protected or the uffd is released."""

    def __init__(self, memory: Any) -> None:
        from snapproof.native import uffd
        from snapproof.native._lib import check, lib

        super().__init__(memory, uffd.mask_of("PAGEFAULT_FLAG_WP", "WP_HUGETLBFS_SHMEM", "THREAD_ID"),
                         uffd.REGISTER_MODE_WP)
        assert self.fd is not None
        try:
            check(lib.sp_uffd_writeprotect(self.fd, memory.addr, memory.size, 1), "UFFDIO_WRITEPROTECT",
                  start=memory.addr, len=memory.size)
        except BaseException:
            self.close()
            raise

    def unprotect(self) -> None:
        """Clear WP on the whole region; without DONTWAKE this wakes every thread waiting on it."""
        from snapproof.native._lib import check, lib

        assert self.fd is not None, "uffd already closed"
        check(lib.sp_uffd_writeprotect(self.fd, self.memory.addr, self.memory.size, 0), "UFFDIO_WRITEPROTECT")

    def wp_pages(self) -> int:
        from snapproof.native.pagemap import read_pagemap

        return sum(read_pagemap(self.memory.addr, self.memory.size // 4096)[1])


class UnservedMissing(_UnservedUffd):
    """``memory`` registered MISSING on a uffd nobody serves: a first touch of a page not yet there waits in
    the kernel until someone installs it, wakes it, or the uffd is released."""

    UFFDIO_WAKE = 0x8010AA02  # _IOR(0xAA, 0x02, struct uffdio_range)

    def __init__(self, memory: Any) -> None:
        from snapproof.native import uffd

        super().__init__(memory, uffd.mask_of("MISSING_SHMEM") if memory.backing == "memfd" else 0,
                         uffd.REGISTER_MODE_MISSING)

    def fence(self, offset: int, size: int) -> None:
        """mprotect(PROT_NONE) of [offset, offset + size) of the memory: what the lazy loader does to the
        pages it will never restore."""
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mprotect(ctypes.c_void_p(self.memory.addr + offset), ctypes.c_size_t(size), 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mprotect([{offset:#x}, {offset + size:#x}), PROT_NONE)")

    def wake(self) -> None:
        """UFFDIO_WAKE over the whole range: every waiter retries its access."""
        import fcntl
        import struct

        assert self.fd is not None, "uffd already closed"
        fcntl.ioctl(self.fd, self.UFFDIO_WAKE, struct.pack("QQ", self.memory.addr, self.memory.size))


# -- work on threads of their own -----------------------------------------------------------------


class VcpuThread:
    """``vcpu.run(timeout)`` on a thread of its own, so a vCPU stuck in KVM_RUN cannot stall the test."""

    def __init__(self, vcpu: Any, timeout: float) -> None:
        self.vcpu = vcpu
        self.timeout = timeout
        self.exit: Any = None
        self.error: BaseException | None = None
        self.tid = 0
        self.started = 0.0
        self.ended = 0.0
        self._tid_known = threading.Event()
        self.thread = threading.Thread(target=self._run, name="vcpu-under-test", daemon=True)

    def _run(self) -> None:
        self.tid = threading.get_native_id()
        self._tid_known.set()
        self.started = time.monotonic()
        try:
            self.exit = self.vcpu.run(timeout=self.timeout)
        except BaseException as e:  # re-raised by the test through .error
            self.error = e
        finally:
            self.ended = time.monotonic()

    def start(self) -> VcpuThread:
        self.thread.start()
        self._tid_known.wait(5.0)
        return self

    def join(self, timeout: float) -> bool:
        """True if the run has returned within ``timeout``."""
        self.thread.join(timeout)
        return not self.thread.is_alive()


class HostWriter:
    """One byte written to guest memory by a host thread in C (the GIL released), so a write that
    blocks on a WP fault blocks only this thread: a Python-level write would hold the GIL while it waits."""

    def __init__(self, memory: Any, gpa: int, value: int) -> None:
        from snapproof.native._lib import ffi, lib

        self._src = ffi.new("uint8_t[1]", [value])
        self._best = ffi.new("uint64_t *")
        self._lib = lib
        self._dst = memory.addr + gpa
        self._src_addr = int(ffi.cast("uintptr_t", self._src))
        self.done_at = 0.0
        self.thread = threading.Thread(target=self._write, name="host-writer-under-test", daemon=True)

    def _write(self) -> None:
        self._lib.sp_memcpy_timed(self._dst, self._src_addr, 1, 1, self._best)
        self.done_at = time.monotonic()

    def start(self) -> HostWriter:
        self.thread.start()
        return self

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


# -- child processes ------------------------------------------------------------------------------


@dataclass
class ChildRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    lines: list[str] = field(default_factory=list)

    def json_line(self, tag: str) -> dict[str, Any]:
        """The JSON after ``tag`` on the child's last line that starts with it."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith(tag + " "):
                return dict(json.loads(line[len(tag) + 1:]))
        raise AssertionError(f"the child printed no {tag!r} line; stdout:\n{self.stdout}\nstderr:\n{self.stderr}")


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# A shell's background job without job control (``cmd &`` in a CI script, ``nohup``) starts with SIGINT
# ignored, and Python then never installs its KeyboardInterrupt handler: the start the reporter's lost
# SIGINT had. ``trap "" INT`` sets that disposition and exec keeps it.
SIGINT_IGNORED = ["sh", "-c", 'trap "" INT; exec "$@"', "sh"]


def run_child(args: list[str], timeout: float, sigint_ignored: bool = False, **popen: Any) -> ChildRun:
    """Run ``python ARGS`` in the repository (with ``sigint_ignored``, started as a background job of a
    shell without job control is); a child still running at ``timeout`` is killed, and the test fails
    naming the time-out (never a hang of the parent)."""
    popen.setdefault("env", child_env())
    prefix = SIGINT_IGNORED if sigint_ignored else []
    t0 = time.monotonic()
    try:
        proc = subprocess.run([*prefix, sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, **popen)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise AssertionError(f"child {args} still running after {timeout} s (killed); stdout so far:\n{out}") from None
    return ChildRun(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)


# -- dropping privileges --------------------------------------------------------------------------

NOBODY = 65534
CAP_DAC_READ_SEARCH = 2
_PR_SET_KEEPCAPS = 8
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_to_nobody() -> Any:
    """A ``preexec_fn``: the child runs as uid/gid 65534 with no groups and one capability,
    CAP_DAC_READ_SEARCH (read and search only), kept across exec as an ambient capability.

    Why that one: the interpreter may live where nobody cannot read (pyenv under /root, mode 0700
    here). It grants no write access, so /dev/kvm (O_RDWR) and /dev/userfaultfd stay closed, and
    userfaultfd(2) for kernel-mode faults still needs CAP_SYS_PTRACE. Everything the preexec_fn calls
    is prepared here, before the fork.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    prctl, capset = libc.prctl, libc.capset
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    bit = 1 << CAP_DAC_READ_SEARCH
    data[0].effective = data[0].permitted = data[0].inheritable = bit

    def _drop() -> None:
        if prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS)")
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        if capset(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "capset(CAP_DAC_READ_SEARCH)")
        if prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAP_AMBIENT_RAISE)")

    return _drop


def read_cap_eff() -> int:
    return int(_status("CapEff"), 16)


@contextlib.contextmanager
def nobody_home(tmp_path: Path) -> Iterator[Path]:
    """A HOME and TMPDIR the unprivileged child can write."""
    home = tmp_path / "nobody-home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    tmp_path.chmod(0o755)
    yield home
