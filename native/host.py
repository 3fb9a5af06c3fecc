"""What this host can do, probed for real: a virt-host-validate style table.

Only this module probes; phases ask it by capability name and skip with the
exact reason it gives. ``python -m native.host`` prints the table and exits
non-zero only when a row FAILs.
"""

from __future__ import annotations

import enum
import os
import platform
import socket
import sys
from dataclasses import dataclass, field


class Status(enum.Enum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Capability:
    name: str       # what phases ask for, e.g. "kvm", "uffd", "uffd.WP_UNPOPULATED"
    area: str       # the table's left column: KVM, UFFD, MEM, WHP
    what: str       # "Checking for ..." text
    status: Status
    detail: str     # what was seen
    hint: str = ""  # one line: what to do when it is not PASS

    @property
    def available(self) -> bool:
        return self.status is not Status.FAIL and not self.detail.startswith("absent")


@dataclass
class HostReport:
    capabilities: list[Capability] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)

    def get(self, name: str) -> Capability | None:
        for c in self.capabilities:
            if c.name == name:
                return c
        return None

    def missing(self, name: str) -> str | None:
        """None when the capability is there; otherwise the skip reason naming it and how it was probed."""
        c = self.get(name)
        if c is None:
            return f"capability {name!r} was not probed on this platform ({sys.platform})"
        if c.available:
            return None
        hint = f"; {c.hint}" if c.hint else ""
        return f"{c.what}: {c.detail}{hint}"

    @property
    def failed(self) -> bool:
        return any(c.status is Status.FAIL for c in self.capabilities)

    def table(self) -> str:
        lines = []
        for c in self.capabilities:
            lines.append(f"{c.area:>5}: Checking {c.what:<52}: {c.status.value}")
            if c.status is not Status.PASS:
                lines.append(f"{'':>7}({c.detail}{'; ' + c.hint if c.hint else ''})")
        return "\n".join(lines)


# Which uffd features the phases use, and what their absence costs.
_FEATURE_ROLE = {
    "PAGEFAULT_FLAG_WP": ("required", "WP faults cannot be told from missing faults"),
    "WP_HUGETLBFS_SHMEM": ("required", "no WP on memfd/shmem guest memory (phases 1-3)"),
    "THREAD_ID": ("used", "fault records lose the faulting thread"),
    "WP_UNPOPULATED": ("used", "holes must be pre-populated before arm (slower arm)"),
    "MISSING_SHMEM": ("used", "no lazy restore into memfd (phase 3)"),
    "WP_ASYNC": ("used", "no PAGEMAP_SCAN pre-copy strategy"),
    "MISSING_HUGETLBFS": ("used", "no lazy restore into hugetlb memory"),
}


def _kvm_rows(rep: HostReport) -> None:
    path = "/dev/kvm"
    if not os.path.exists(path):
        rep.capabilities.append(Capability("kvm", "KVM", "for /dev/kvm", Status.FAIL, "absent: /dev/kvm does not exist",
                                           "load kvm_intel/kvm_amd, or enable nested virtualization"))
        return
    if not os.access(path, os.R_OK | os.W_OK):
        rep.capabilities.append(Capability("kvm", "KVM", "for /dev/kvm", Status.FAIL,
                                           f"absent: /dev/kvm: permission denied for uid {_uid()} "
                                           f"(os.access R+W; the node is {device_node(path)})",
                                           "join the node's group or run as root"))
        return
    from native.errors import CapabilityMissing, NativeError
    from native.kvm import KVM_API_VERSION, KVM_CAP_NR_MEMSLOTS, KVM_CAP_READONLY_MEM, Vm

    try:
        with Vm.create() as vm:
            readonly_mem = vm.check_extension(KVM_CAP_READONLY_MEM)
            nr_memslots = vm.check_extension(KVM_CAP_NR_MEMSLOTS)
    except (CapabilityMissing, NativeError) as e:
        rep.capabilities.append(Capability("kvm", "KVM", "for a working /dev/kvm", Status.FAIL, f"absent: {e}"))
        return
    rep.capabilities.append(Capability("kvm", "KVM", "for /dev/kvm (KVM_CREATE_VM)", Status.PASS, "accessible"))
    rep.capabilities.append(Capability("kvm.api", "KVM", "for KVM API version", Status.PASS,
                                       f"KVM_GET_API_VERSION = {KVM_API_VERSION}"))
    rep.facts["kvm_nr_memslots"] = nr_memslots
    probed = (f"KVM_CHECK_EXTENSION(KVM_CAP_READONLY_MEM) = {readonly_mem} on /dev/kvm; "
              f"KVM_CAP_NR_MEMSLOTS = {nr_memslots}")
    if readonly_mem:
        rep.capabilities.append(Capability("kvm.readonly_mem", "KVM", "for read-only memslots (KVM_MEM_READONLY)",
                                           Status.PASS, probed))
    else:
        rep.capabilities.append(Capability("kvm.readonly_mem", "KVM", "for read-only memslots (KVM_MEM_READONLY)",
                                           Status.WARN, f"absent: {probed}",
                                           "the hypervisor-level copy-on-write load (phase 4) is skipped"))
    module = kvm_module()
    rep.facts["kvm_module"] = module
    if module in ("kvm_intel", "kvm_amd"):
        rep.capabilities.append(Capability("kvm.module", "KVM", "for the KVM module", Status.PASS, module))
    else:
        rep.capabilities.append(Capability(
            "kvm.module", "KVM", "for the KVM module", Status.WARN, f"{module} (not VMX/SVM)",
            "figures from a software/nested KVM are not bare-metal figures"))


def kvm_module() -> str:
    for m in ("kvm_intel", "kvm_amd", "kvm_pvm"):
        if os.path.isdir(f"/sys/module/{m}"):
            return m
    mods = sorted(m for m in os.listdir("/sys/module") if m.startswith("kvm")) if os.path.isdir("/sys/module") else []
    return ",".join(mods) or "unknown"


def _uffd_rows(rep: HostReport) -> None:
    from native import uffd
    from native.errors import CapabilityMissing, NativeError
    from native.wp import supported_features

    try:
        mask = supported_features()
    except (CapabilityMissing, NativeError) as e:
        rep.capabilities.append(Capability("uffd", "UFFD", "for userfaultfd with kernel-mode faults", Status.FAIL,
                                           f"absent: {e}"))
        return
    rep.facts["uffd_features"] = f"{mask:#x}"
    rep.facts["uffd_feature_names"] = uffd.feature_names(mask)
    rep.capabilities.append(Capability("uffd", "UFFD", "for userfaultfd with kernel-mode faults", Status.PASS,
                                       f"{_uffd_privilege()}; UFFDIO_API features {mask:#x}"))
    for name, bit in uffd.FEATURES.items():
        role, cost = _FEATURE_ROLE.get(name, ("unused", "not used by snapproof"))
        since = uffd.SINCE.get(name)
        what = f"for UFFD_FEATURE_{name}"
        if mask & bit:
            rep.capabilities.append(Capability(f"uffd.{name}", "UFFD", what, Status.PASS, f"bit {bit:#x} offered"))
        else:
            status = Status.FAIL if role == "required" else Status.WARN
            rep.capabilities.append(Capability(
                f"uffd.{name}", "UFFD", what, status, f"absent: bit {bit:#x} not in the kernel's mask {mask:#x}",
                f"{cost}" + (f"; needs kernel {since}+" if since else "")))
    _pagemap_scan_row(rep)


def _uid() -> int:
    if sys.platform == "win32":
        return -1
    return os.geteuid()


CAP_SYS_PTRACE = 19


def device_node(path: str) -> str:
    """A node's mode, owner and group (``crw------- root:root``): what a permission skip must name."""
    import stat

    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot stat: {e.strerror}"
    owner, group = str(st.st_uid), str(st.st_gid)
    if sys.platform != "win32":
        import contextlib
        import grp
        import pwd

        with contextlib.suppress(KeyError):  # ids without a name: the numbers say it
            owner, group = pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name
    return f"{stat.filemode(st.st_mode)} {owner}:{group}"


def has_capability(bit: int) -> bool:
    """Whether this process holds capability ``bit`` in its effective set (/proc/self/status CapEff)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False


def uffd_denied(err_name: str) -> str:
    """Why userfaultfd with kernel-mode faults was refused, naming each way in and its state here."""
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            sysctl = f.read().strip()
    except OSError:
        sysctl = "absent"
    ptrace = "with" if has_capability(CAP_SYS_PTRACE) else "without"
    node = "/dev/userfaultfd"
    if not os.path.exists(node):
        dev = f"{node} absent"
    else:
        ok = os.access(node, os.R_OK | os.W_OK)
        dev = f"{node} {'readable+writable' if ok else 'not readable+writable'} ({device_node(node)})"
    return (f"userfaultfd for kernel-mode faults denied ({err_name}) for uid {_uid()}: "
            f"vm.unprivileged_userfaultfd = {sysctl}, {ptrace} CAP_SYS_PTRACE, {dev}; needs root, CAP_SYS_PTRACE, "
            "vm.unprivileged_userfaultfd=1, or access to /dev/userfaultfd")


def _uffd_privilege() -> str:
    if _uid() == 0:
        return "root"
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            if f.read().strip() == "1":
                return "vm.unprivileged_userfaultfd=1"
    except OSError:
        pass
    return "CAP_SYS_PTRACE or /dev/userfaultfd"


def _pagemap_scan_row(rep: HostReport) -> None:
    import errno

    from native.errors import NativeError
    from native.wp import pagemap_scan_probe

    try:
        pagemap_scan_probe()
        rep.capabilities.append(Capability("pagemap_scan", "MEM", "for the PAGEMAP_SCAN ioctl", Status.PASS,
                                           "answers on /proc/self/pagemap"))
    except NativeError as e:
        detail = "absent: ENOTTY (kernel before 6.7)" if e.errno == errno.ENOTTY else f"absent: {e}"
        rep.capabilities.append(Capability("pagemap_scan", "MEM", "for the PAGEMAP_SCAN ioctl", Status.WARN, detail,
                                           "the WP_ASYNC pre-copy strategy is skipped"))


def meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                parts = v.split()
                out[k] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    except OSError:
        pass
    return out


def _hugepage_rows(rep: HostReport) -> None:
    mi = meminfo()
    total, free, size = mi.get("HugePages_Total", 0), mi.get("HugePages_Free", 0), mi.get("Hugepagesize", 0)
    rep.facts["hugepages_total"] = total
    rep.facts["hugepages_free"] = free
    if free > 0:
        rep.capabilities.append(Capability("hugepages", "MEM", "for reserved hugepages", Status.PASS,
                                           f"{free} of {total} free, {size >> 10} KiB each"))
    else:
        rep.capabilities.append(Capability(
            "hugepages", "MEM", "for reserved hugepages", Status.WARN,
            f"absent: HugePages_Free = {free} (total {total})",
            "hugetlb cases skip; reserve with --reserve-hugepages N or vm.nr_hugepages"))


def _thp_rows(rep: HostReport) -> None:
    """Transparent huge pages for MADV_HUGEPAGE guest memory: anonymous (PMD size), shmem (memfd) and the
    anonymous mTHP sizes; the knobs as they are, which --thp changes for a run and restores."""
    from native import thp

    rep.facts["thp_enabled"] = thp.read_knob(thp.ENABLED) or "absent"
    rep.facts["thp_shmem_enabled"] = thp.read_knob(thp.SHMEM_ENABLED) or "absent"
    rep.facts["thp_defrag"] = thp.read_knob(thp.KNOB_DIR / "defrag") or "absent"
    sizes = thp.mthp_sizes()
    rep.facts["thp_mthp"] = {f"{s >> 10}kB": thp.read_knob(thp.mthp_knob(s)) for s in sizes}
    hint = "the THP cases skip; --thp sets it for the run and restores it at exit"
    for name, what, missing in (("thp.anonymous", "for anonymous THP (MADV_HUGEPAGE)", thp.anonymous_missing()),
                                ("thp.shmem", "for shmem THP (memfd, MADV_HUGEPAGE)", thp.shmem_missing())):
        if missing is None:
            knob = thp.ENABLED if name == "thp.anonymous" else thp.SHMEM_ENABLED
            rep.capabilities.append(Capability(name, "MEM", what, Status.PASS, f"{knob} = {thp.read_knob(knob)}"))
        else:
            rep.capabilities.append(Capability(name, "MEM", what, Status.WARN, f"absent: {missing}", hint))
    if sizes:
        on = [f"{s >> 10}kB" for s in sizes if thp.mthp_missing(s) is None]
        rep.capabilities.append(Capability("thp.mthp", "MEM", "for anonymous multi-size THP (mTHP)", Status.PASS,
                                           f"sizes {', '.join(f'{s >> 10}kB' for s in sizes)} offered; "
                                           f"{', '.join(on) or 'none'} enabled now (--thp enables one at a time)"))
    else:
        rep.capabilities.append(Capability("thp.mthp", "MEM", "for anonymous multi-size THP (mTHP)", Status.WARN,
                                           f"absent: no {thp.KNOB_DIR}/hugepages-<size>kB below 2048kB (kernel "
                                           "before 6.8)", "the mTHP cases skip"))


def _common_facts(rep: HostReport) -> None:
    rep.facts.update({
        "hostname": socket.gethostname(),
        "platform": sys.platform,
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    })
    mi = meminfo()
    if mi:
        rep.facts["memory_bytes"] = mi.get("MemTotal", 0)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


WHP_WHAT = "for the Windows Hypervisor Platform"
WHP_BUILD_HINT = ("a 64-bit x64 Python with the MSVC C build tools (Visual Studio Build Tools, \"Desktop development "
                  "with C++\"), then `py -m native.build`")


def _whp_rows(rep: HostReport) -> None:
    """WHP: usable (a throwaway partition made, set up, deleted), and the features phase 4 leans on.

    Everything that can go wrong before the probe answers (no compiler, a
    32-bit or ARM64 interpreter, a build or import failure) becomes a FAIL row
    naming it: every test's setup asks this probe, so a traceback here would
    be every test's error instead of one row.
    """
    from native import whp

    problem = whp.unsupported_interpreter()
    if problem is not None:
        rep.capabilities.append(Capability("whp", "WHP", WHP_WHAT, Status.FAIL, f"wrong interpreter: {problem}",
                                           WHP_BUILD_HINT))
        return
    try:
        reason = whp.whp_absent_reason()
        probe = whp.whp_probe()
    except Exception as e:  # BuildError, setuptools' compiler errors, ImportError of the DLL: all one row
        rep.capabilities.append(Capability("whp", "WHP", WHP_WHAT, Status.FAIL,
                                           f"the WHP layer did not build or load: {type(e).__name__}: {e}",
                                           WHP_BUILD_HINT))
        return
    rep.facts["whp_probe"] = probe.name if probe is not None else None
    if reason is not None:
        hresult = whp.whp_probe_hresult()
        if hresult:
            rep.facts["whp_probe_hresult"] = f"{hresult:#010x}"
        # The reason names what was probed and the fix; no hint to add.
        rep.capabilities.append(Capability("whp", "WHP", WHP_WHAT, Status.FAIL, f"absent: {reason}"))
        return
    rep.capabilities.append(Capability("whp", "WHP", WHP_WHAT, Status.PASS,
                                       "HypervisorPresent, and a partition was created, set up and deleted"))
    features = whp.whp_features()
    rep.facts["whp_features"] = f"{int(features):#x}"
    missing = whp.partial_unmap_missing()
    if missing is None:
        rep.capabilities.append(Capability("whp.partial_unmap", "WHP", "for WHP partial unmap (PartialUnmap)",
                                           Status.PASS, "WHvCapabilityCodeFeatures.PartialUnmap = 1"))
    else:
        rep.capabilities.append(Capability("whp.partial_unmap", "WHP", "for WHP partial unmap (PartialUnmap)",
                                           Status.WARN, f"absent: {missing}",
                                           "the hypervisor-level copy-on-write load (phase 4) skips"))


_cached: HostReport | None = None


def probe(refresh: bool = False) -> HostReport:
    """Probe the host once per process (refresh=True probes again)."""
    global _cached
    if _cached is not None and not refresh:
        return _cached
    rep = HostReport()
    _common_facts(rep)
    if sys.platform.startswith("linux"):
        _kvm_rows(rep)
        _uffd_rows(rep)
        _hugepage_rows(rep)
        _thp_rows(rep)
    elif sys.platform == "win32":
        _whp_rows(rep)
    _cached = rep
    return rep


def main() -> int:
    rep = probe()
    facts = rep.facts
    print(f"snapproof host check: {facts.get('hostname')} {facts.get('platform')} {facts.get('kernel')} "
          f"({facts.get('cpu_model')}, {facts.get('cpus')} CPUs)")
    print(rep.table())
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
