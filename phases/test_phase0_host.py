"""Phase 0 — host: everything the phases need, probed for real, as a virt-host-validate style table.

The same table is what ``snapproof host`` prints; that command exits
non-zero only when a row FAILs.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from snapproof import IMPORT_ROOT

pytestmark = pytest.mark.phase(0, "host capabilities")

# What the phases cannot run without (rows of native.host): phases 1-4 on a Linux KVM host, phase 4 on WHP.
REQUIRED_FOR_PHASES = (("whp",) if sys.platform == "win32" else
                       ("kvm", "uffd", "uffd.PAGEFAULT_FLAG_WP", "uffd.WP_HUGETLBFS_SHMEM"))


def test_command_line_prints_the_same_table(report, host, pytestconfig):
    """`snapproof host` prints the probe's table and exits 1 exactly when a row FAILs."""
    sizes = pytestconfig.getoption("sizes")
    with report.stage("run snapproof host") as st:
        proc = subprocess.run([sys.executable, "-m", "snapproof", "host", *(["--sizes", sizes] if sizes else [])],
                              cwd=IMPORT_ROOT, capture_output=True, text=True, timeout=60)
        st.check(proc.stderr == "", "no error output", f"stderr: {proc.stderr.strip()!r}")
        table = host.table()
        st.check(table in proc.stdout, f"{len(host.capabilities)} rows, same table as the in-process probe",
                 f"table differs from the in-process probe:\n{proc.stdout}")
        want = 1 if host.failed else 0
        st.equal(proc.returncode, want, "exit status (0 unless a row FAILs)", str)
        for line in table.splitlines():
            st.note(line.strip())


@pytest.mark.parametrize("capability", REQUIRED_FOR_PHASES)
def test_capability_needed_by_the_phases_is_present(report, host, require, capability):
    """Each capability the phases depend on is present (skip naming it otherwise; FAIL under --strict-host)."""
    with report.stage(f"probe {capability}") as st:
        require(capability)
        row = host.get(capability)
        st.check(row is not None and row.available, f"{row.what}: {row.detail}")


def test_host_has_what_its_class_requires_and_names_what_it_lacks(report, host, host_policy, require):
    """The gate policy's class for this host: every capability it requires is present (skip naming it otherwise;
    FAIL under --strict-host), and each one this host lacks that the class does not require is reported as
    unavailable with the suite's fallback, never as present."""
    from snapproof.native.host import describe_host

    with report.stage("host class") as st:
        st.check(host_policy.host_class is not None, f"{describe_host(host.facts)}; policy {host_policy.source}",
                 f"no class of the gate policy applies to this host: {host_policy.label()}")
        report.fact("host_class", host_policy.host_class)

    with report.stage("required by the class") as st:
        for name in sorted(host_policy.required):
            require(name)
            row = host.get(name)
            st.check(row is not None and row.available, f"{name}: {row.detail if row else '?'}",
                     f"{name}: required by {host_policy.label()}, not available on this host")

    with report.stage("unavailable, not required") as st:
        lacking = [c for c in host.capabilities if not c.available and not host_policy.requires(c.name)]
        for c in lacking:
            st.check(c.status.value != "PASS", f"{c.name}: {c.status.value}, {c.detail}; "
                     + (f"fallback: {c.fallback}" if c.fallback else c.hint or "no fallback"),
                     f"{c.name} is unavailable but its row says PASS: {c.detail}")
        if not lacking:
            st.note("this host lacks nothing the phases use")
        report.fact("unavailable", {c.name: c.fallback or c.hint for c in lacking})


@pytest.mark.platform("linux")
def test_run_record_says_which_kvm_and_what_runs_below_it(report, host, require):
    """Host facts carry kernel, CPU, the KVM module and its version and paging, bare metal or nested (under what),
    the host class and the uffd mask: figures are read against them."""
    from snapproof.native.host import HARDWARE_KVM_MODULES, HOST_CLASSES, TDP_PARAMETER, describe_host

    require("kvm", "uffd")
    facts = host.facts
    with report.stage("host facts") as st:
        for key in ("kernel", "cpu_model", "cpus", "kvm_module", "kvm_module_version", "kvm_paging", "virtualization",
                    "hypervisor", "host_class", "uffd_features"):
            st.check(bool(facts.get(key)), f"{key}: {facts.get(key)}", f"host fact {key!r} missing")
        if facts["kvm_module"] in HARDWARE_KVM_MODULES:
            tdp = TDP_PARAMETER[str(facts["kvm_module"])][0]
            params = facts.get("kvm_params", {})
            st.check(tdp in params, f"{facts['kvm_module']} parameters: {params}",
                     f"{facts['kvm_module']}: expected its {tdp} parameter among the facts, saw {params}")
        else:
            st.note(f"KVM module {facts['kvm_module']}: timings in this run are not hardware figures")

    with report.stage("bare metal or nested") as st:
        # Two probes of the same bit: CPUID as this process executes it, and the flag the kernel read at boot.
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
        st.equal(facts["cpu_hypervisor_bit"], "hypervisor" in flags,
                 f"CPUID hypervisor bit ({facts['hypervisor_probe']}) agrees with /proc/cpuinfo", str)
        if facts["cpu_hypervisor_bit"]:
            st.check(facts["hypervisor"] != "none", f"nested under {facts['hypervisor']} "
                     f"(signature {facts['hypervisor_signature']!r})", "hypervisor bit set but no hypervisor named")
        st.check(facts["host_class"] in HOST_CLASSES, describe_host(facts),
                 f"host class {facts['host_class']!r}: expected one of {', '.join(HOST_CLASSES)} "
                 f"({describe_host(facts)})")
