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

# Message builders live in native.errors, where the native layer imports them without importing the probe.
from native.errors import device_node, uid


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
    fallback: str = ""  # when absent: what the suite does instead (or leaves out), so "unavailable" is never a pass

    @property
    def available(self) -> bool:
        return self.status is not Status.FAIL and not self.detail.startswith("absent")

    @property
    def advice(self) -> str:
        """``; fallback: ...; hint`` for a row that is not PASS (empty otherwise)."""
        if self.status is Status.PASS:
            return ""
        return (f"; fallback: {self.fallback}" if self.fallback else "") + (f"; {self.hint}" if self.hint else "")


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
        return f"{c.what}: {c.detail}{c.advice}"

    @property
    def failed(self) -> bool:
        return any(c.status is Status.FAIL for c in self.capabilities)

    def table(self) -> str:
        lines = []
        for c in self.capabilities:
            lines.append(f"{c.area:>5}: Checking {c.what:<52}: {c.status.value}")
            if c.status is not Status.PASS:
                lines.append(f"{'':>7}({c.detail}{c.advice})")
        return "\n".join(lines)


# Which uffd features the phases use: "required" ones the WP engine cannot work without (the row FAILs);
# without a "used" one the suite falls back to the second text, or leaves out (deselects) what needs it.
_FEATURE_ROLE = {
    "PAGEFAULT_FLAG_WP": ("required", "WP faults cannot be told from missing faults"),
    "WP_HUGETLBFS_SHMEM": ("required", "no WP on memfd/shmem guest memory (phases 1-3, 5)"),
    "THREAD_ID": ("required", "the WP engine asks for it: fault records name the faulting thread"),
    "WP_UNPOPULATED": ("used", "the WP engine populates holes before the arm (MADV_POPULATE_WRITE): writes into "
                               "them are still caught, the arm costs more"),
    "MISSING_SHMEM": ("used", "the lazy-uffd loader into memfd memory is left out (phase 3)"),
    "WP_ASYNC": ("used", "the precopy-wp-async strategy is left out; pre-copy is proven by "
                         "KVM's dirty log"),
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
                                           f"absent: /dev/kvm: permission denied for uid {uid()} "
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
                                           Status.WARN, f"absent: {probed}", "",
                                           "the hypervisor-level copy-on-write load (phase 4) is left out"))
    facts = rep.facts
    module = str(facts.get("kvm_module"))
    described = f"{module} {facts.get('kvm_module_version')}"
    if module in HARDWARE_KVM_MODULES:
        rep.capabilities.append(Capability("kvm.module", "KVM", "for a hardware KVM module (VMX/SVM)", Status.PASS,
                                           described))
    else:
        rep.capabilities.append(Capability(
            "kvm.module", "KVM", "for a hardware KVM module (VMX/SVM)", Status.WARN, f"{described} (not VMX/SVM)",
            "figures from a software KVM are not hardware figures"))
    paging = str(facts.get("kvm_paging"))
    rep.capabilities.append(Capability(
        "kvm.paging", "KVM", "for two-dimensional paging (NPT/EPT)",
        Status.PASS if paging.startswith(("NPT", "EPT")) else Status.WARN, paging,
        "" if paging.startswith(("NPT", "EPT")) else
        "KVM shadows the guest's page tables: WP faults still reach uffd, figures are not NPT/EPT figures"))
    if facts.get("virtualization") == "bare metal":
        rep.capabilities.append(Capability(
            "kvm.bare_metal", "KVM", "for bare metal (no hypervisor below)", Status.PASS,
            f"CPUID hypervisor bit clear ({facts.get('hypervisor_probe')})"))
    else:
        rep.capabilities.append(Capability(
            "kvm.bare_metal", "KVM", "for bare metal (no hypervisor below)", Status.WARN,
            f"nested under {facts.get('hypervisor')}: CPUID hypervisor bit set, signature "
            f"{facts.get('hypervisor_signature')!r} ({facts.get('hypervisor_probe')})",
            "figures from a nested host are not bare-metal figures"))


# -- what this host is: bare metal or a guest, and which KVM --------------------------------------

HARDWARE_KVM_MODULES = ("kvm_intel", "kvm_amd")
SOFTWARE_KVM_MODULES = ("kvm_pvm",)  # KVM without VMX/SVM: it emulates what the hardware would do
# The parameters that say how a hardware module maps guest memory (two-dimensional paging or shadow
# page tables), whether it runs real mode natively, and whether it offers nesting itself.
KVM_MODULE_PARAMETERS = {"kvm_amd": ("npt", "nested", "avic"),
                         "kvm_intel": ("ept", "unrestricted_guest", "nested")}
TDP_PARAMETER = {"kvm_amd": ("npt", "NPT"), "kvm_intel": ("ept", "EPT")}
# CPUID leaf 0x40000000: EBX, ECX, EDX spell the hypervisor's signature.
HYPERVISOR_LEAF = 0x40000000
HYPERVISORS = {"KVMKVMKVM": "KVM", "TCGTCGTCGTCG": "TCG", "Microsoft Hv": "Hyper-V", "VMwareVMware": "VMware",
               "XenVMMXenVMM": "Xen", "VBoxVBoxVBox": "VirtualBox", " lrpepyh  vr": "Parallels",
               "ACRNACRNACRN": "ACRN", "bhyve bhyve ": "bhyve", "QNXQVMBSQG": "QNX"}
HOST_CLASSES = ("kvm-hardware", "kvm-nested", "kvm-software", "whp")


def kvm_module() -> str:
    for m in (*HARDWARE_KVM_MODULES, *SOFTWARE_KVM_MODULES):
        if os.path.isdir(f"/sys/module/{m}"):
            return m
    mods = sorted(m for m in os.listdir("/sys/module") if m.startswith("kvm")) if os.path.isdir("/sys/module") else []
    return ",".join(mods) or "unknown"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def kvm_module_version(module: str) -> str:
    """The kernel release it belongs to, and the module's own version or srcversion when it is a loaded .ko."""
    release = platform.release()
    own = _read(f"/sys/module/{module}/version")
    src = _read(f"/sys/module/{module}/srcversion")
    if own:
        return f"{own} (kernel {release})"
    if not os.path.isdir(f"/sys/module/{module}"):
        return f"kernel {release}"
    # Only a loaded .ko has an initstate; a module without MODULE_VERSION has no srcversion either.
    kind = "loaded module" if os.path.exists(f"/sys/module/{module}/initstate") else "built in"
    return f"kernel {release}, {kind}" + (f", srcversion {src}" if src else "")


def kvm_module_parameters(module: str) -> dict[str, str]:
    """The module parameters of KVM_MODULE_PARAMETERS as /sys/module/<module>/parameters shows them (Y/N, 0/1)."""
    out = {}
    for name in KVM_MODULE_PARAMETERS.get(module, ()):
        value = _read(f"/sys/module/{module}/parameters/{name}")
        if value is not None:
            out[name] = value
    return out


def _enabled(value: str | None) -> bool:
    return value is not None and value.upper() in ("Y", "1")


def kvm_paging(module: str, params: dict[str, str]) -> str:
    """How KVM maps guest memory: "NPT (npt=Y)", "shadow paging (ept=N)", or the software module's own."""
    if module in TDP_PARAMETER:
        name, tdp = TDP_PARAMETER[module]
        value = params.get(name)
        if value is None:
            return f"unknown ({module} has no {name} parameter)"
        return f"{tdp} ({name}={value})" if _enabled(value) else f"shadow paging ({name}={value})"
    if module in SOFTWARE_KVM_MODULES:
        return f"shadow paging by {module} (software KVM)"
    return f"unknown (KVM module {module})"


def cpu_hypervisor() -> tuple[bool, str, str]:
    """(CPUID hypervisor bit, leaf 0x40000000 signature, how it was probed).

    CPUID itself (native sp_cpuid) where it can run; otherwise the ``hypervisor`` flag of /proc/cpuinfo,
    which is the same bit as the kernel read it, and no signature.
    """
    if platform.machine() in ("x86_64", "i386", "i686", "AMD64"):
        try:
            from native._lib import ffi, lib  # builds the native module first when it is stale

            regs = ffi.new("uint32_t[4]")
            if lib.sp_cpuid(1, 0, regs) == 0:
                bit = bool(regs[2] >> 31 & 1)
                signature = ""
                if bit and lib.sp_cpuid(HYPERVISOR_LEAF, 0, regs) == 0:
                    raw = b"".join(int(r).to_bytes(4, "little") for r in (regs[1], regs[2], regs[3]))
                    signature = raw.rstrip(b"\0").decode("ascii", "replace")
                return bit, signature, "CPUID leaf 1 ECX bit 31, leaf 0x40000000"
        except (ImportError, RuntimeError):  # no native module (BuildError is a RuntimeError): the kernel's reading
            pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return "hypervisor" in flags.split(), "", "/proc/cpuinfo flags"


def host_class(facts: dict[str, object]) -> str | None:
    """The gate's class of a host, from its facts: kvm-software when the KVM module emulates (kvm_pvm),
    kvm-nested when the CPUID hypervisor bit is set under a hardware module, kvm-hardware otherwise;
    whp on Windows. None when the facts cannot tell (an unknown module, or a record from before the
    hypervisor bit was a fact: hardware and nested cannot be told apart then)."""
    if facts.get("platform") == "win32":
        return "whp"
    module = facts.get("kvm_module")
    if module in SOFTWARE_KVM_MODULES:
        return "kvm-software"
    if module in HARDWARE_KVM_MODULES:
        bit = facts.get("cpu_hypervisor_bit")
        if not isinstance(bit, bool):
            return None
        return "kvm-nested" if bit else "kvm-hardware"
    return None


def _virtualization_facts(rep: HostReport) -> None:
    """Bare metal or a guest (and of what), the KVM module, its version and parameters, and the class."""
    facts = rep.facts
    bit, signature, how = cpu_hypervisor()
    facts["virtualization"] = "nested" if bit else "bare metal"
    facts["cpu_hypervisor_bit"] = bit
    facts["hypervisor"] = (HYPERVISORS.get(signature, f"unknown ({signature!r})") if signature else "unknown") \
        if bit else "none"
    facts["hypervisor_signature"] = signature
    facts["hypervisor_probe"] = how
    module = kvm_module()
    facts["kvm_module"] = module
    facts["kvm_module_version"] = kvm_module_version(module)
    params = kvm_module_parameters(module)
    if params:
        facts["kvm_params"] = params
    facts["kvm_paging"] = kvm_paging(module, params)
    facts["host_class"] = host_class(facts) or "unknown"


def _uffd_rows(rep: HostReport) -> None:
    from native import uffd
    from native.errors import CapabilityMissing, NativeError
    from native.uffd import supported_features

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
            required = role == "required"
            rep.capabilities.append(Capability(
                f"uffd.{name}", "UFFD", what, Status.FAIL if required else Status.WARN,
                f"absent: bit {bit:#x} not in the kernel's mask {mask:#x}",
                "; ".join(filter(None, [cost if role != "used" else "", f"needs kernel {since}+" if since else ""])),
                fallback=cost if role == "used" else ""))
    _pagemap_scan_row(rep)


def _uffd_privilege() -> str:
    if uid() == 0:
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
    from native.pagemap import pagemap_scan_probe

    try:
        pagemap_scan_probe()
        rep.capabilities.append(Capability("pagemap_scan", "MEM", "for the PAGEMAP_SCAN ioctl", Status.PASS,
                                           "answers on /proc/self/pagemap"))
    except NativeError as e:
        detail = "absent: ENOTTY (kernel before 6.7)" if e.errno == errno.ENOTTY else f"absent: {e}"
        rep.capabilities.append(Capability("pagemap_scan", "MEM", "for the PAGEMAP_SCAN ioctl", Status.WARN, detail,
                                           "needs kernel 6.7+", fallback=_FEATURE_ROLE["WP_ASYNC"][1]))


def _soft_dirty_row(rep: HostReport) -> None:
    from native.dirty import soft_dirty_absent

    what = "for soft-dirty bits (pagemap bit 55)"
    reason = soft_dirty_absent()
    if reason is None:
        rep.capabilities.append(Capability("soft_dirty", "MEM", what, Status.PASS,
                                           "a page written after clear_refs shows bit 55, one left alone does not"))
    else:
        rep.capabilities.append(Capability("soft_dirty", "MEM", what, Status.WARN, f"absent: {reason}",
                                           "the soft-dirty tracker of incremental snapshots (phase 6) is skipped"))


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
            "reserve with --reserve-hugepages N or vm.nr_hugepages",
            fallback="hugetlb-backed cases are left out"))


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
        _virtualization_facts(rep)
        _kvm_rows(rep)
        _uffd_rows(rep)
        _soft_dirty_row(rep)
        _hugepage_rows(rep)
        _thp_rows(rep)
    elif sys.platform == "win32":
        rep.facts["host_class"] = host_class(rep.facts) or "unknown"
        _whp_rows(rep)
    _cached = rep
    return rep


def describe_host(facts: dict[str, object]) -> str:
    """One line: the class and why, e.g. ``host class kvm-nested: kvm_amd (...), nested under TCG, NPT (npt=Y)``."""
    if facts.get("platform") == "win32":
        return f"host class {facts.get('host_class')}: Windows"
    under = f" under {facts.get('hypervisor')}" if facts.get("virtualization") == "nested" else ""
    return (f"host class {facts.get('host_class')}: {facts.get('kvm_module')} ({facts.get('kvm_module_version')}), "
            f"{facts.get('virtualization')}{under}, {facts.get('kvm_paging')}")


def main() -> int:
    rep = probe()
    facts = rep.facts
    print(f"snapproof host check: {facts.get('hostname')} {facts.get('platform')} {facts.get('kernel')} "
          f"({facts.get('cpu_model')}, {facts.get('cpus')} CPUs)")
    print(describe_host(facts))
    print(rep.table())
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
