"""A real KVM to run the suite on: Debian's kernel with the kvm_amd module, nested under QEMU TCG.

This host's /dev/kvm may be a software KVM (kvm_pvm) whose guests never take an NPT fault. QEMU's TCG
with ``-cpu max`` emulates AMD SVM with nested paging, so a stock Debian kernel booted under it loads
the real kvm_amd module, and every guest write of the suite goes through real nested page tables. It
is slow (every instruction of the whole stack is emulated), so its figures are never baselines.

The nested host boots from an initramfs made here (static busybox, the kernel's own modules, and
``nested/init.sh``); the host's root filesystem is shared read-only over 9p under a tmpfs overlay, so
the guest runs this very checkout with the same Python and the same native build. One writable 9p
share (``out``) carries the job script in and the run record, JUnit XML and exit status back.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "snapproof" / "nested"
KERNEL_PACKAGE = "linux-image-amd64"  # Debian's meta package: its one dependency is the current 6.1 kernel
# In load order, each after what it needs (read from the modules' own depends= tags).
MODULES = ("virt/lib/irqbypass", "drivers/crypto/ccp/ccp", "arch/x86/kvm/kvm", "arch/x86/kvm/kvm-amd",
           "drivers/virtio/virtio_ring", "drivers/virtio/virtio", "drivers/virtio/virtio_pci_modern_dev",
           "drivers/virtio/virtio_pci_legacy_dev", "drivers/virtio/virtio_pci", "net/9p/9pnet",
           "net/9p/9pnet_virtio", "fs/netfs/netfs", "fs/fscache/fscache", "fs/9p/9p", "fs/overlayfs/overlay")
HOST_PACKAGES = {"qemu-system-x86_64": "qemu-system-x86", "busybox": "busybox-static",
                 "dpkg-deb": "dpkg", "cpio": "cpio"}
# Single-threaded TCG: multi-threaded TCG in QEMU 7.2 wedged the nested guest (seen twice).
QEMU_ACCEL = "tcg,thread=single"
GUEST_MEMORY = "4G"  # the largest sizes run there are 64 MiB, three copies at most, plus the page cache
GUEST_CPUS = 2       # phase 1 places the fault handler on the vCPU's CPU and on the other one


class NestedError(RuntimeError):
    """The nested host could not be prepared or did not finish: says which step and what to do."""


@dataclass(frozen=True)
class Kernel:
    version: str   # "6.1.0-57-amd64"
    vmlinuz: Path
    modules: Path  # .../lib/modules/<version>/kernel


@dataclass(frozen=True)
class NestedRun:
    rc: int
    out: Path      # the out share: job.sh, rc, console.log, and whatever the job wrote
    console: str
    seconds: float


def missing_host_tools() -> list[str]:
    """The Debian packages to install for the nested run (empty when everything is there)."""
    return sorted({pkg for tool, pkg in HOST_PACKAGES.items() if shutil.which(tool) is None})


def install_host_tools() -> None:
    need = missing_host_tools()
    if not need:
        return
    if os.geteuid() != 0:
        raise NestedError(f"the nested run needs {', '.join(need)}: apt-get install -y {' '.join(need)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", *need], check=True, env=env, timeout=1200,
                   stdout=subprocess.DEVNULL)


def kvm_svm_available() -> str | None:
    """None when QEMU can emulate SVM here, else why not (x86-64 hosts only)."""
    if os.uname().machine != "x86_64":
        return f"the nested kvm_amd host is x86-64 only, this machine is {os.uname().machine}"
    return None


def _kernel_package_name() -> str:
    """The versioned kernel package Debian's meta package points at now (apt-cache, after an update)."""
    for attempt in range(2):
        out = subprocess.run(["apt-cache", "depends", KERNEL_PACKAGE], capture_output=True, text=True,
                             timeout=120).stdout
        if m := re.search(r"Depends: (linux-image-[0-9][^\s]*-amd64)\b", out):
            return m.group(1)
        if attempt == 0:
            subprocess.run(["apt-get", "update", "-qq"], check=False, timeout=600)
    raise NestedError(f"apt-cache names no kernel behind {KERNEL_PACKAGE}: is this a Debian or Ubuntu host "
                      "with its package lists reachable?")


def fetch_kernel(cache: Path = CACHE, package: str = "") -> Kernel:
    """Debian's kernel, downloaded and unpacked once into the cache (never installed on this host).

    ``package``: a versioned kernel package (``linux-image-6.1.0-50-amd64``) or a downloaded ``.deb`` of
    one, to run a fleet's own point release; by default the one Debian's meta package points at now.
    """
    deb = Path(package) if package.endswith(".deb") else None
    if deb is not None:
        if not deb.is_file():
            raise NestedError(f"kernel package {deb}: no such file")
        package = subprocess.run(["dpkg-deb", "-f", str(deb), "Package"], capture_output=True, text=True,
                                 timeout=60).stdout.strip()
    package = package or _kernel_package_name()
    if not re.fullmatch(r"linux-image-[0-9][^\s/]*-amd64", package):
        raise NestedError(f"kernel package {package!r}: expected a versioned Debian kernel such as "
                          "linux-image-6.1.0-57-amd64 (or a .deb of one)")
    version = package.removeprefix("linux-image-")
    root = cache / version
    vmlinuz = root / "boot" / f"vmlinuz-{version}"
    modules = root / "lib" / "modules" / version / "kernel"
    if not vmlinuz.exists():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            if deb is None:
                # apt's sandbox user cannot write into root's cache: download where it may, then unpack.
                os.chmod(tmp, 0o777)
                r = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True,
                                   timeout=900)
                debs = list(Path(tmp).glob("*.deb"))
                if r.returncode != 0 or not debs:
                    raise NestedError(f"apt-get download {package} failed: {r.stderr.strip()[-400:]}")
                deb = debs[0]
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=600)
    for m in MODULES:
        if not (modules / f"{m}.ko").exists():
            raise NestedError(f"{package} has no {m}.ko under {modules}: a kernel built differently from "
                              "Debian's 6.1 (compressed or built-in modules) is not supported")
    return Kernel(version, vmlinuz, modules)


def build_initramfs(kernel: Kernel, dest: Path) -> Path:
    """A newc cpio: static busybox as /bin/busybox, the modules flat in /modules, nested/init.sh as /init."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise NestedError("static busybox not found: apt-get install busybox-static")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for d in ("bin", "modules", "proc", "sys", "dev", "out"):
            (t / d).mkdir()
        shutil.copy2(busybox, t / "bin" / "busybox")
        for m in MODULES:
            shutil.copy2(kernel.modules / f"{m}.ko", t / "modules" / f"{Path(m).name}.ko")
        shutil.copy2(HERE / "init.sh", t / "init")
        (t / "init").chmod(0o755)
        files = subprocess.run(["find", "."], cwd=t, capture_output=True, text=True, check=True).stdout
        with open(dest, "wb") as f:
            subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=t, input=files.encode(), stdout=f,
                           check=True, timeout=120)
    return dest


def job_script(argv: list[str], cwd: Path) -> str:
    """What the nested host runs, as this process's user would, in this checkout, with this PATH."""
    quoted = " ".join(_sh_quote(a) for a in argv)
    # Bytecode is written there (no PYTHONDONTWRITEBYTECODE): into the nested host's tmpfs overlay, never onto this
    # host, and without it every child pytest of the self-tests compiles snapproof and rewrites its asserts again.
    return (f"export PATH={_sh_quote(os.environ.get('PATH', '/usr/bin:/bin'))} HOME={_sh_quote(str(Path.home()))}\n"
            f"export SNAPPROOF_NESTED=kvm_amd\n"
            f"cd {_sh_quote(str(cwd))} || exit 97\n"
            f"{quoted}\n")


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def run(argv: list[str], out: Path, npt: bool = True, timeout: float = 1800.0, cwd: Path = REPO,
        echo: bool = True, kernel_package: str = "", silence: float | None = None) -> NestedRun:
    """Boot the nested host, run ``argv`` in ``cwd`` there, and bring back its exit status.

    ``out`` is shared read-write: the job may write its records there (as ``/out``). A run whose console
    stays silent for ``silence`` seconds (a stalled host), or that does not finish within ``timeout`` (a backstop),
    is killed and raises, naming which and the last console lines. ``kernel_package`` as fetch_kernel's ``package``.
    """
    if why := kvm_svm_available():
        raise NestedError(why)
    if need := missing_host_tools():
        raise NestedError(f"the nested run needs {', '.join(need)}: apt-get install -y {' '.join(need)} "
                          "(or python3 -m nested --install)")
    kernel = fetch_kernel(package=kernel_package)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("rc", "console.log"):
        (out / stale).unlink(missing_ok=True)
    (out / "job.sh").write_text(job_script(argv, cwd))
    initrd = build_initramfs(kernel, out / "initramfs.cpio")
    cmd = ["qemu-system-x86_64", "-accel", QEMU_ACCEL, "-cpu", "max", "-smp", str(GUEST_CPUS),
           "-m", GUEST_MEMORY, "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
           "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
           "-append", f"console=ttyS0 panic=-1 loglevel=3 snapproof.npt={int(npt)}",
           "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
           "-virtfs", f"local,path={out},mount_tag=out,security_model=none"]
    t0 = time.monotonic()
    last_output = t0
    lines: list[str] = []
    with open(out / "console.log", "w") as log, subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent) as qemu:
        import selectors

        assert qemu.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(qemu.stdout, selectors.EVENT_READ)
        pending = b""
        try:
            while True:
                now = time.monotonic()
                left = timeout - (now - t0)
                if left <= 0:
                    raise NestedError(f"the nested host did not finish within {timeout:.0f} s; last console "
                                      f"lines:\n" + "\n".join(lines[-20:]))
                quiet_left = math.inf if silence is None else silence - (now - last_output)
                if quiet_left <= 0:
                    raise NestedError(f"the nested host printed nothing for {silence:.0f} s (stalled) after "
                                      f"{now - t0:.0f} s; last console lines:\n" + "\n".join(lines[-20:]))
                if not sel.select(timeout=min(left, quiet_left, 5.0)):
                    continue
                chunk = os.read(qemu.stdout.fileno(), 65536)
                if not chunk:
                    break
                last_output = time.monotonic()
                # Raw, as it comes: pytest's progress dots arrive without a newline for minutes under TCG.
                log.write(chunk.decode(errors="replace"))
                log.flush()
                if echo:
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
                pending += chunk
                *done, pending = pending.split(b"\n")
                lines.extend(raw.decode(errors="replace").rstrip("\r") for raw in done)
            qemu.wait(timeout=30)
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait(timeout=30)
            sel.close()
    seconds = time.monotonic() - t0
    rc_file = out / "rc"
    if not rc_file.exists():
        raise NestedError(f"the nested host stopped (QEMU exit {qemu.returncode}) without the job's exit status; "
                          "last console lines:\n" + "\n".join(lines[-20:]))
    return NestedRun(int(rc_file.read_text().strip() or 99), out, "\n".join(lines), seconds)


def _die_with_parent() -> None:
    """In the QEMU child before exec: SIGKILL it when this process dies, however it dies (a CI job
    cancelled with SIGKILL, pytest-timeout's os._exit): an orphaned TCG guest would hold a CPU for hours."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def main(args: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python3 -m nested", description=(
        "Run a command (default: the phases, strictly) on a nested host whose KVM is the real kvm_amd module "
        "(Debian's 6.1 kernel under QEMU TCG with SVM + nested paging)."))
    p.add_argument("--npt", type=int, choices=(0, 1), default=1, help="kvm_amd's nested paging (default 1)")
    p.add_argument("--out", type=Path, default=None, help="the shared output folder (default: a new temp dir)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before the nested host is killed")
    p.add_argument("--silence", type=float, default=None,
                   help="seconds without console output before the nested host is called stalled and killed")
    p.add_argument("--cwd", type=Path, default=REPO, help="the checkout to run in (default: this one)")
    p.add_argument("--install", action="store_true", help="apt-get install what the nested run needs first")
    p.add_argument("--prepare", action="store_true", help="only install (with --install) and fetch the kernel")
    p.add_argument("--kernel", default="", metavar="PACKAGE|DEB",
                   help="the nested host's kernel: a versioned Debian package (linux-image-6.1.0-50-amd64) or a .deb "
                        "of one, e.g. your fleet's point release (default: the one linux-image-amd64 points at)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="after --: the command to run there (default: python3 -m pytest phases --strict-host)")
    a = p.parse_args(args)
    command = [c for c in a.command if c != "--"] or [sys.executable, "-m", "pytest", "phases", "--strict-host"]
    try:
        if a.install:
            install_host_tools()
        if a.prepare:
            kernel = fetch_kernel(package=a.kernel)
            print(f"nested: kernel {kernel.version} ready in {kernel.vmlinuz.parent.parent}")
            return 0
        out = a.out or Path(tempfile.mkdtemp(prefix="snapproof-nested-"))
        r = run(command, out, npt=bool(a.npt), timeout=a.timeout, cwd=a.cwd.resolve(), kernel_package=a.kernel,
                silence=a.silence)
    except NestedError as e:
        print(f"nested: {e}", file=sys.stderr)
        return 2
    print(f"nested: exit status {r.rc} after {r.seconds:.0f} s; console and outputs in {r.out}")
    return r.rc
