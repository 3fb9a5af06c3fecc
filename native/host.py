"""What this host can do, probed for real: a virt-host-validate style table.

Only this module probes; phases ask it by capability name and skip with the
exact reason it gives. A row that is not PASS names what was seen and, where
a person can fix it, the command to paste (native.fixes). The table has the
same rows on every host of a platform: a row that cannot be probed because
another is missing says so. ``snapproof host`` prints it (``--json``,
``--quiet``, ``--sizes``; ``--help``) and exits non-zero only when a row FAILs.
"""

from __future__ import annotations

import enum
import os
import platform
import socket
import sys
from dataclasses import dataclass, field

from snapproof.native import fixes

# Message builders live in native.errors, where the native layer imports them without importing the probe.
from snapproof.native.errors import CAP_SYS_PTRACE, device_node, has_capability, uid


class Status(enum.Enum):
    PASS = "PASS"
    INFO = "INFO"  # a fact about the host that the suite does not use: never a reason to act
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Capability:
    name: str       # what phases ask for, e.g. "kvm", "uffd", "uffd.WP_UNPOPULATED"
    area: str       # the table's left column: KVM, UFFD, MEM, WHP
    what: str       # "Checking for ..." text
    status: Status
    detail: str     # what was seen
    hint: str = ""  # what to do when it is not PASS: native.fixes' "why: `command`", alternatives joined by "; or "
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
            rows = "linux" if sys.platform.startswith("linux") else sys.platform
            return f"capability {name!r} is no row of the host probe on {rows} (snapproof host lists them)"
        if c.available:
            return None
        return f"{c.what}: {c.detail}{c.advice}"

    @property
    def failed(self) -> bool:
        return any(c.status is Status.FAIL for c in self.capabilities)

    def table(self, quiet: bool = False) -> str:
        """The rows, one line each; under a row that is not PASS, what was seen, the fallback and each fix on a
        line of its own. ``quiet``: only the WARN and FAIL rows."""
        lines = []
        for c in self.capabilities:
            if quiet and c.status in (Status.PASS, Status.INFO):
                continue
            head = f"{c.area:>5}: Checking {c.what:<52}: {c.status.value}"
            if c.status is Status.INFO:  # one line: what it is, nothing to do
                lines.append(f"{head} ({c.detail})")
                continue
            lines.append(head)
            if c.status is Status.PASS:
                continue
            lines.append(f"{'':>7}{c.detail}")
            if c.fallback:
                lines.append(f"{'':>7}fallback: {c.fallback}")
            for n, way in enumerate(filter(None, c.hint.split("; or "))):
                lines.append(f"{'':>7}{'fix' if n == 0 else 'or'}: {way}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        return {"host": self.facts, "failed": self.failed,
                "rows": [{"name": c.name, "area": c.area, "what": c.what, "status": c.status.value,
                          "detail": c.detail, "hint": c.hint, "fallback": c.fallback, "available": c.available}
                         for c in self.capabilities]}


# Which uffd features the phases use: "required" ones the WP engine cannot work without (the row FAILs);
# without a "used" one the suite falls back to the second text, or leaves out (deselects) what needs it (WARN).
# The kernel's other features are INFO rows: facts about the host, never a reason to act.
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


def _unprobed(name: str, area: str, what: str, status: Status, because: str, fallback: str = "") -> Capability:
    """A row that cannot be probed because another row is missing: it keeps its place in the table, absent."""
    return Capability(name, area, what, status, f"absent: not probed, {because}", fallback=fallback)


KVM_WHAT = {"kvm": "for /dev/kvm (KVM_CREATE_VM)", "kvm.api": "for KVM API version",
            "kvm.readonly_mem": "for read-only memslots (KVM_MEM_READONLY)"}
READONLY_MEM_FALLBACK = "the hypervisor-level copy-on-write load (phase 4) is left out"


def _kvm_rows(rep: HostReport, blocked: str | None) -> None:
    """/dev/kvm, its API and read-only memslots (each needs the one before); then which KVM it is, read from
    sysfs and CPUID whatever /dev/kvm says."""
    path = "/dev/kvm"
    problem: Capability | None = None
    if blocked:
        problem = _unprobed("kvm", "KVM", KVM_WHAT["kvm"], Status.FAIL, blocked)
    elif not os.path.exists(path):
        problem = Capability("kvm", "KVM", KVM_WHAT["kvm"], Status.FAIL, "absent: /dev/kvm does not exist",
                             fixes.kvm_module())
    elif not os.access(path, os.R_OK | os.W_OK):
        problem = Capability("kvm", "KVM", KVM_WHAT["kvm"], Status.FAIL,
                             f"absent: /dev/kvm: permission denied for uid {uid()} (os.access R+W; the node is "
                             f"{device_node(path)})", fixes.kvm_access())
    else:
        from snapproof.native.errors import CapabilityMissing, NativeError
        from snapproof.native.kvm import KVM_API_VERSION, KVM_CAP_NR_MEMSLOTS, KVM_CAP_READONLY_MEM, Vm

        try:
            with Vm.create() as vm:
                readonly_mem = vm.check_extension(KVM_CAP_READONLY_MEM)
                nr_memslots = vm.check_extension(KVM_CAP_NR_MEMSLOTS)
        except CapabilityMissing as e:
            problem = Capability("kvm", "KVM", KVM_WHAT["kvm"], Status.FAIL, f"absent: {e.reason}", e.fix)
        except NativeError as e:
            problem = Capability("kvm", "KVM", KVM_WHAT["kvm"], Status.FAIL, f"absent: {e}")
    if problem is not None:
        rep.capabilities.append(problem)
        because = "/dev/kvm is unavailable (row kvm)"
        rep.capabilities.append(_unprobed("kvm.api", "KVM", KVM_WHAT["kvm.api"], Status.FAIL, because))
        rep.capabilities.append(_unprobed("kvm.readonly_mem", "KVM", KVM_WHAT["kvm.readonly_mem"], Status.WARN,
                                          because, READONLY_MEM_FALLBACK))
    else:
        rep.capabilities.append(Capability("kvm", "KVM", KVM_WHAT["kvm"], Status.PASS, "accessible"))
        rep.capabilities.append(Capability("kvm.api", "KVM", KVM_WHAT["kvm.api"], Status.PASS,
                                           f"KVM_GET_API_VERSION = {KVM_API_VERSION}"))
        rep.facts["kvm_nr_memslots"] = nr_memslots
        probed = (f"KVM_CHECK_EXTENSION(KVM_CAP_READONLY_MEM) = {readonly_mem} on /dev/kvm; "
                  f"KVM_CAP_NR_MEMSLOTS = {nr_memslots}")
        if readonly_mem:
            rep.capabilities.append(Capability("kvm.readonly_mem", "KVM", KVM_WHAT["kvm.readonly_mem"], Status.PASS,
                                               probed))
        else:
            rep.capabilities.append(Capability("kvm.readonly_mem", "KVM", KVM_WHAT["kvm.readonly_mem"], Status.WARN,
                                               f"absent: {probed}", "", READONLY_MEM_FALLBACK))
    facts = rep.facts
    module = str(facts.get("kvm_module"))
    described = f"{module} {facts.get('kvm_module_version')}"
    if module in HARDWARE_KVM_MODULES:
        rep.capabilities.append(Capability("kvm.module", "KVM", "for a hardware KVM module (VMX/SVM)", Status.PASS,
                                           described))
    else:
        rep.capabilities.append(Capability(
            "kvm.module", "KVM", "for a hardware KVM module (VMX/SVM)", Status.WARN,
            f"{described} (not VMX/SVM): figures from a software KVM are not hardware figures"))
    paging = str(facts.get("kvm_paging"))
    rep.capabilities.append(Capability(
        "kvm.paging", "KVM", "for two-dimensional paging (NPT/EPT)",
        Status.PASS if paging.startswith(("NPT", "EPT")) else Status.WARN,
        paging if paging.startswith(("NPT", "EPT")) else
        f"{paging}: KVM shadows the guest's page tables; WP faults still reach uffd, figures are not NPT/EPT figures"))
    if facts.get("virtualization") == "bare metal":
        rep.capabilities.append(Capability(
            "kvm.bare_metal", "KVM", "for bare metal (no hypervisor below)", Status.PASS,
            f"CPUID hypervisor bit clear ({facts.get('hypervisor_probe')})"))
    else:
        rep.capabilities.append(Capability(
            "kvm.bare_metal", "KVM", "for bare metal (no hypervisor below)", Status.WARN,
            f"nested under {facts.get('hypervisor')}: CPUID hypervisor bit set, signature "
            f"{facts.get('hypervisor_signature')!r} ({facts.get('hypervisor_probe')}): figures from a nested host "
            "are not bare-metal figures"))


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
            from snapproof.native._lib import ffi, lib  # builds the native module first when it is stale

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


UFFD_WHAT = "for userfaultfd with kernel-mode faults"
_ROLE_STATUS = {"required": Status.FAIL, "used": Status.WARN, "unused": Status.INFO}


def _feature_row(name: str, bit: int, mask: int | None, because: str) -> Capability:
    """One uffd feature's row: offered or not in ``mask``, or not probed (``because``) when there is none."""
    from snapproof.native import uffd

    role, cost = _FEATURE_ROLE.get(name, ("unused", ""))
    status, what = _ROLE_STATUS[role], f"for UFFD_FEATURE_{name}"
    unused = ", not used by snapproof" if role == "unused" else ""
    fallback = cost if role == "used" else ""
    if mask is None:
        return _unprobed(f"uffd.{name}", "UFFD", what, status, because + unused, fallback)
    if mask & bit:
        return Capability(f"uffd.{name}", "UFFD", what, Status.INFO if unused else Status.PASS,
                          f"bit {bit:#x} offered{unused}")
    since = uffd.SINCE.get(name)
    detail = (f"absent: bit {bit:#x} not in the kernel's mask {mask:#x}" + (f" (kernel {since}+)" if since else "")
              + (f": {cost}" if role == "required" else unused))
    return Capability(f"uffd.{name}", "UFFD", what, status, detail, fallback=fallback)


def _uffd_rows(rep: HostReport, blocked: str | None) -> None:
    """userfaultfd for kernel-mode faults, then a row per feature bit the kernel can name (each the same whether
    the kernel offers it, lacks it, or userfaultfd itself is missing)."""
    from snapproof.native import uffd
    from snapproof.native.errors import CapabilityMissing, NativeError

    mask: int | None = None
    because = blocked
    if blocked:
        rep.capabilities.append(_unprobed("uffd", "UFFD", UFFD_WHAT, Status.FAIL, blocked))
    else:
        try:
            mask = uffd.supported_features()
        except CapabilityMissing as e:
            rep.capabilities.append(Capability("uffd", "UFFD", UFFD_WHAT, Status.FAIL, f"absent: {e.reason}", e.fix))
        except NativeError as e:
            rep.capabilities.append(Capability("uffd", "UFFD", UFFD_WHAT, Status.FAIL, f"absent: {e}"))
    if mask is not None:
        rep.facts["uffd_features"] = f"{mask:#x}"
        rep.facts["uffd_feature_names"] = uffd.feature_names(mask)
        rep.capabilities.append(Capability("uffd", "UFFD", UFFD_WHAT, Status.PASS,
                                           f"{_uffd_privilege()}; UFFDIO_API features {mask:#x}"))
    elif not blocked:
        because = "userfaultfd is unavailable (row uffd)"
    for name, bit in uffd.FEATURES.items():
        rep.capabilities.append(_feature_row(name, bit, mask, because or ""))
    rep.capabilities.append(_release_row(rep, mask, because or ""))


RELEASE_WHAT = "for close(uffd) clearing the WP bits it set"


def _release_row(rep: HostReport, mask: int | None, because: str) -> Capability:
    """What a bare close(uffd) leaves behind: a kernel fact the engine does not rely on (it un-protects first)."""
    from snapproof.native import uffd
    from snapproof.native.errors import NativeError

    name = "uffd.release_clears_wp"
    if mask is None:
        return _unprobed(name, "UFFD", RELEASE_WHAT, Status.INFO, because)
    try:
        clears = uffd.release_clears_wp()
    except (NativeError, OSError) as e:
        return Capability(name, "UFFD", RELEASE_WHAT, Status.INFO, f"not probed: {e}")
    rep.facts["uffd_release_clears_wp"] = clears
    if clears:
        return Capability(name, "UFFD", RELEASE_WHAT, Status.INFO, "yes: the release resets the PTEs it protected")
    return Capability(name, "UFFD", RELEASE_WHAT, Status.INFO,
                      "no: the PTEs keep PM_UFFD_WP after the close (this kernel lacks \"mm/userfaultfd: reset ptes "
                      "when close() for wr-protected ones\", Linux 6.9, stable 6.1 after 6.1.176); snapproof's "
                      "engine un-protects before it closes, so no snapshot relies on it")


def _unprivileged_userfaultfd() -> bool:
    """vm.unprivileged_userfaultfd=1: every user's userfaultfd(2) handles kernel-mode faults."""
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _uffd_privilege() -> str:
    """What lets this process handle kernel-mode faults (the first that applies)."""
    if uid() == 0:
        return "root"
    if _unprivileged_userfaultfd():
        return "vm.unprivileged_userfaultfd=1"
    if has_capability(CAP_SYS_PTRACE):
        return "CAP_SYS_PTRACE"
    return f"/dev/userfaultfd ({device_node('/dev/userfaultfd')})"


PAGEMAP_SCAN_WHAT = "for the PAGEMAP_SCAN ioctl"


def _pagemap_scan_row(rep: HostReport, blocked: str | None) -> None:
    import errno

    fallback = _FEATURE_ROLE["WP_ASYNC"][1]
    if blocked:
        rep.capabilities.append(_unprobed("pagemap_scan", "MEM", PAGEMAP_SCAN_WHAT, Status.WARN, blocked, fallback))
        return
    from snapproof.native.errors import NativeError
    from snapproof.native.pagemap import pagemap_scan_probe

    try:
        pagemap_scan_probe()
        rep.capabilities.append(Capability("pagemap_scan", "MEM", PAGEMAP_SCAN_WHAT, Status.PASS,
                                           "answers on /proc/self/pagemap"))
    except NativeError as e:
        detail = "absent: ENOTTY (kernel before 6.7)" if e.errno == errno.ENOTTY else f"absent: {e}"
        rep.capabilities.append(Capability("pagemap_scan", "MEM", PAGEMAP_SCAN_WHAT, Status.WARN, detail,
                                           fallback=fallback))


def _soft_dirty_row(rep: HostReport, blocked: str | None) -> None:
    what = "for soft-dirty bits (pagemap bit 55)"
    fallback = "the soft-dirty tracker of incremental snapshots (phase 6) is skipped"
    if blocked:
        rep.capabilities.append(_unprobed("soft_dirty", "MEM", what, Status.WARN, blocked, fallback))
        return
    from snapproof.native.dirty import soft_dirty_absent

    reason = soft_dirty_absent()
    if reason is None:
        rep.capabilities.append(Capability("soft_dirty", "MEM", what, Status.PASS,
                                           "a page written after clear_refs shows bit 55, one left alone does not"))
    else:
        rep.capabilities.append(Capability("soft_dirty", "MEM", what, Status.WARN, f"absent: {reason}",
                                           fallback=fallback))


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


# Phase 2's hugetlb case maps 16 MiB of 2 MiB pages: the README's --reserve-hugepages 8.
HUGETLB_PAGES = 8


def _hugepage_rows(rep: HostReport) -> None:
    mi = meminfo()
    total, free, size = mi.get("HugePages_Total", 0), mi.get("HugePages_Free", 0), mi.get("Hugepagesize", 0)
    rep.facts["hugepages_total"] = total
    rep.facts["hugepages_free"] = free
    if free >= HUGETLB_PAGES:
        rep.capabilities.append(Capability("hugepages", "MEM", "for reserved hugepages", Status.PASS,
                                           f"{free} of {total} free, {size >> 10} KiB each"))
    else:
        why = f"phase 2's hugetlb case maps {HUGETLB_PAGES} of them"
        rep.capabilities.append(Capability(
            "hugepages", "MEM", "for reserved hugepages", Status.WARN,
            f"absent: HugePages_Free = {free} (total {total}); {why}", fixes.hugepages(HUGETLB_PAGES, free, total),
            fallback="hugetlb-backed cases are left out"))


def _thp_rows(rep: HostReport) -> None:
    """Transparent huge pages for MADV_HUGEPAGE guest memory: anonymous (PMD size), shmem (memfd) and the
    anonymous mTHP sizes; the knobs as they are, which --thp changes for a run and restores."""
    from snapproof.native import thp

    rep.facts["thp_enabled"] = thp.read_knob(thp.ENABLED) or "absent"
    rep.facts["thp_shmem_enabled"] = thp.read_knob(thp.SHMEM_ENABLED) or "absent"
    rep.facts["thp_defrag"] = thp.read_knob(thp.KNOB_DIR / "defrag") or "absent"
    sizes = thp.mthp_sizes()
    rep.facts["thp_mthp"] = {f"{s >> 10}kB": thp.read_knob(thp.mthp_knob(s)) for s in sizes}
    fallback = "the THP cases skip"
    turn_on = thp.knobs_to_turn_on()
    for name, what, missing, knobs in (
            ("thp.anonymous", "for anonymous THP (MADV_HUGEPAGE)", thp.anonymous_missing(),
             (thp.ENABLED, thp.mthp_knob(thp.PMD_SIZE))),
            ("thp.shmem", "for shmem THP (memfd, MADV_HUGEPAGE)", thp.shmem_missing(), (thp.SHMEM_ENABLED,))):
        if missing is None:
            rep.capabilities.append(Capability(name, "MEM", what, Status.PASS,
                                               f"{knobs[0]} = {thp.read_knob(knobs[0])}"))
        else:
            settings = [(str(path), value) for path, value in turn_on if path in knobs]
            rep.capabilities.append(Capability(name, "MEM", what, Status.WARN, f"absent: {missing}",
                                               fixes.thp_knobs(settings) if settings else "", fallback))
    if sizes:
        on = [f"{s >> 10}kB" for s in sizes if thp.mthp_missing(s) is None]
        rep.capabilities.append(Capability("thp.mthp", "MEM", "for anonymous multi-size THP (mTHP)", Status.PASS,
                                           f"sizes {', '.join(f'{s >> 10}kB' for s in sizes)} offered; "
                                           f"{', '.join(on) or 'none'} enabled now (--thp enables one at a time)"))
    else:
        rep.capabilities.append(Capability("thp.mthp", "MEM", "for anonymous multi-size THP (mTHP)", Status.WARN,
                                           f"absent: no {thp.KNOB_DIR}/hugepages-<size>kB below 2048kB (kernel "
                                           "before 6.8)", fallback="the mTHP cases skip"))


# The largest guest a phase runs without --sizes (phases 1, 2 and 5 at 1 GiB), and how many copies of a guest's
# memory the sized phases hold at once (phases 2 and 5: guest memory, the snapshot, the reference image).
PHASE_LARGEST_SIZE = 1 << 30
COPIES_HELD = 3
_asked_sizes: tuple[int, ...] = ()


def ask_sizes(sizes: list[int] | tuple[int, ...]) -> None:
    """The guest sizes a run adds (--sizes): the memory row judges the largest. A change forgets the last probe."""
    global _asked_sizes, _cached
    if tuple(sizes) != _asked_sizes:
        _asked_sizes, _cached = tuple(sizes), None


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _memory_row(rep: HostReport) -> None:
    """Memory against the largest guest this run asks for (MemTotal: what the host can hold at all; what is
    free at a given moment is the run's own business)."""
    largest = max((PHASE_LARGEST_SIZE, *_asked_sizes))
    need, total = COPIES_HELD * largest, meminfo().get("MemTotal", 0)
    asked = " (--sizes)" if largest > PHASE_LARGEST_SIZE else ""
    detail = (f"MemTotal {_gib(total)}; the largest guest, {_gib(largest)}{asked}, needs {_gib(need)} "
              f"({COPIES_HELD} copies held at once by phases 2 and 5)")
    what = "for memory for the guest sizes asked"
    if total >= need:
        rep.capabilities.append(Capability("memory", "MEM", what, Status.PASS, detail))
        return
    fits = 1 << max(20, (total // COPIES_HELD).bit_length() - 1)  # the largest power of two this host holds 3 of
    rep.capabilities.append(Capability("memory", "MEM", what, Status.WARN, detail,
                                       fixes.fix("leave out the sizes this host cannot hold",
                                                 f"--max-size {fits >> 20}M")))


def _cpu_row(rep: HostReport) -> None:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    detail = f"{usable} usable by this process, {os.cpu_count()} online"
    what = "for 2 or more CPUs"
    if usable >= 2:
        rep.capabilities.append(Capability("cpus", "CPU", what, Status.PASS, detail))
    else:
        rep.capabilities.append(Capability(
            "cpus", "CPU", what, Status.WARN, f"{detail}: phase 2's two vCPUs, the fault handler and the bulk copier "
            "take turns on one CPU; its races are lined up by named points, not by time, so they still run, slower"))


QEMU_WHAT = "for QEMU with background-snapshot (6.0+)"
QEMU_FALLBACK = ("phase 5 leaves out QEMU's background snapshot: its QEMU case is deselected and the strategy "
                 "table has no QEMU row")


def _qemu_row(rep: HostReport) -> None:
    """QEMU, the peer phase 5 runs beside snapproof's strategies: on PATH and new enough (its --version)."""
    from snapproof.native.qemu import QEMU_PACKAGE, QemuError, find_qemu

    try:
        binary = find_qemu()
    except QemuError as e:
        rep.capabilities.append(Capability("qemu", "QEMU", QEMU_WHAT, Status.WARN, f"absent: {e}",
                                           fixes.apt_install(QEMU_PACKAGE, why="install QEMU"), QEMU_FALLBACK))
        return
    if why := _qemu_uffd_denied(binary.version):
        rep.capabilities.append(Capability(
            "qemu", "QEMU", QEMU_WHAT, Status.WARN, f"absent: {why} ({binary.describe()})",
            fixes.fix("let every user's userfaultfd handle kernel-mode faults",
                      "sudo sysctl -w vm.unprivileged_userfaultfd=1"), QEMU_FALLBACK))
        return
    rep.capabilities.append(Capability("qemu", "QEMU", QEMU_WHAT, Status.PASS, binary.describe()))


# QEMU opens /dev/userfaultfd when the syscall is refused only from 8.1 on ("util/userfaultfd: Support
# /dev/userfaultfd"); before, its background snapshot gets kernel-mode faults only where the syscall gives them.
QEMU_DEV_USERFAULTFD_SINCE = (8, 1)


def _qemu_uffd_denied(version: tuple[int, int, int]) -> str | None:
    """Why this QEMU's background snapshot would be refused userfaultfd here, or None."""
    if uid() == 0 or has_capability(CAP_SYS_PTRACE) or _unprivileged_userfaultfd():
        return None
    if version[:2] >= QEMU_DEV_USERFAULTFD_SINCE and os.access("/dev/userfaultfd", os.R_OK | os.W_OK):
        return None
    dev = "" if version[:2] >= QEMU_DEV_USERFAULTFD_SINCE else (
        f" (QEMU before {'.'.join(map(str, QEMU_DEV_USERFAULTFD_SINCE))} does not try /dev/userfaultfd)")
    return ("its background snapshot needs userfaultfd for kernel-mode faults, which the syscall gives only to root, "
            f"CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1{dev}")


def _native_row(rep: HostReport) -> str | None:
    """The native build (the C module and the engines), built first where it is missing or older than its
    sources, as every import of it does; None when it is there, else why the rows that need it are not probed."""
    from snapproof.native import build

    what = "for the native build (C layer, engines)"
    try:
        build.ensure_built()
    except Exception as e:  # BuildError, and setuptools' compiler errors: one row, not every test's traceback
        rep.capabilities.append(Capability("native", "BUILD", what, Status.FAIL, f"absent: {e}",
                                           fixes.fix("install what it needs, build and set up everything",
                                                     "./setup")))
        return "the native build failed (row native)"
    rep.capabilities.append(Capability("native", "BUILD", what, Status.PASS, build.describe()))
    return None


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
                  "with C++\"), then `py -m snapproof build`")


PARTIAL_UNMAP_WHAT = "for WHP partial unmap (PartialUnmap)"
PARTIAL_UNMAP_FALLBACK = "the hypervisor-level copy-on-write load (phase 4) skips"


def _whp_rows(rep: HostReport) -> None:
    """WHP: usable (a throwaway partition made, set up, deleted), and the features phase 4 leans on.

    Everything that can go wrong before the probe answers (no compiler, a
    32-bit or ARM64 interpreter, a build or import failure) becomes a FAIL row
    naming it: every test's setup asks this probe, so a traceback here would
    be every test's error instead of one row.
    """
    from snapproof.native import whp

    if not _whp_row(rep):
        rep.capabilities.append(_unprobed("whp.partial_unmap", "WHP", PARTIAL_UNMAP_WHAT, Status.WARN,
                                          "WHP is unavailable (row whp)", PARTIAL_UNMAP_FALLBACK))
        return
    features = whp.whp_features()
    rep.facts["whp_features"] = f"{int(features):#x}"
    missing = whp.partial_unmap_missing()
    if missing is None:
        rep.capabilities.append(Capability("whp.partial_unmap", "WHP", PARTIAL_UNMAP_WHAT,
                                           Status.PASS, "WHvCapabilityCodeFeatures.PartialUnmap = 1"))
    else:
        rep.capabilities.append(Capability("whp.partial_unmap", "WHP", PARTIAL_UNMAP_WHAT,
                                           Status.WARN, f"absent: {missing}", fallback=PARTIAL_UNMAP_FALLBACK))


def _whp_row(rep: HostReport) -> bool:
    """The row ``whp``; whether WHP is usable."""
    from snapproof.native import whp

    problem = whp.unsupported_interpreter()
    if problem is not None:
        rep.capabilities.append(Capability("whp", "WHP", WHP_WHAT, Status.FAIL, f"wrong interpreter: {problem}",
                                           WHP_BUILD_HINT))
        return False
    try:
        reason = whp.whp_absent_reason()
        probe = whp.whp_probe()
    except Exception as e:  # BuildError, setuptools' compiler errors, ImportError of the DLL: all one row
        rep.capabilities.append(Capability("whp", "WHP", WHP_WHAT, Status.FAIL,
                                           f"the WHP layer did not build or load: {type(e).__name__}: {e}",
                                           WHP_BUILD_HINT))
        return False
    rep.facts["whp_probe"] = probe.name if probe is not None else None
    if reason is not None:
        hresult = whp.whp_probe_hresult()
        if hresult:
            rep.facts["whp_probe_hresult"] = f"{hresult:#010x}"
        # The reason names what was probed and the fix; no hint to add.
        rep.capabilities.append(Capability("whp", "WHP", WHP_WHAT, Status.FAIL, f"absent: {reason}"))
        return False
    rep.capabilities.append(Capability("whp", "WHP", WHP_WHAT, Status.PASS,
                                       "HypervisorPresent, and a partition was created, set up and deleted"))
    return True


_cached: HostReport | None = None


def probe(refresh: bool = False) -> HostReport:
    """Probe the host once per process (refresh=True probes again)."""
    global _cached
    if _cached is not None and not refresh:
        return _cached
    rep = HostReport()
    _common_facts(rep)
    if sys.platform.startswith("linux"):
        blocked = _native_row(rep)
        _virtualization_facts(rep)
        _kvm_rows(rep, blocked)
        _uffd_rows(rep, blocked)
        _pagemap_scan_row(rep, blocked)
        _soft_dirty_row(rep, blocked)
        _hugepage_rows(rep)
        _thp_rows(rep)
        _memory_row(rep)
        _cpu_row(rep)
        _qemu_row(rep)
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


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="snapproof host", description=(
        "What this host offers snapproof, probed for real: PASS, INFO (a fact the suite does not use), WARN (the "
        "suite leaves something out, or its figures mean less) or FAIL, with the command to paste for each row that "
        "is not PASS. Exits 1 when a row FAILs, else 0."))
    p.add_argument("--json", action="store_true", help="print the host facts and every row as JSON instead")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="print only the WARN and FAIL rows (nothing when there are none); the exit status is the same")
    p.add_argument("--sizes", default="", metavar="LIST",
                   help="judge memory against these guest sizes too, as pytest's --sizes (e.g. 1G,4G)")
    a = p.parse_args(argv)
    try:
        sizes = [parse_size(s) for s in a.sizes.split(",") if s.strip()]
    except ValueError as e:
        p.error(f"--sizes: {e}")
    ask_sizes(sizes)
    rep = probe()
    if a.json:
        print(json.dumps({"class": describe_host(rep.facts), **rep.to_json()}, indent=2, default=str))
    elif a.quiet:
        if table := rep.table(quiet=True):
            print(table)
    else:
        facts = rep.facts
        print(f"snapproof host check: {facts.get('hostname')} {facts.get('platform')} {facts.get('kernel')} "
              f"({facts.get('cpu_model')}, {facts.get('cpus')} CPUs)")
        print(describe_host(facts))
        print(rep.table())
    return 1 if rep.failed else 0


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'64M', '1G', '4096' -> bytes (binary units): what --sizes and --max-size take."""
    import re

    m = re.match(r"^(\d+)([KMG]?)(i?B)?$", text.strip(), re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r} is not a number with an optional K/M/G suffix")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


if __name__ == "__main__":
    sys.exit(main())
