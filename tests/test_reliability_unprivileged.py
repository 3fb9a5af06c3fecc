"""An unprivileged run skips clearly, naming /dev/kvm's permission and the userfaultfd privilege it lacks,
and fails instead under --strict-host.

The child runs as uid/gid 65534 (nobody), no groups, keeping only CAP_DAC_READ_SEARCH so it can
read an interpreter installed under a private home (tests/reliability_support.drop_to_nobody); that
capability grants no write access, so /dev/kvm and /dev/userfaultfd stay closed to it, and
userfaultfd(2) for kernel-mode faults still needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1.
"""

from __future__ import annotations

import json
import os
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from snapproof.native import fixes as native_fixes
from snapproof.native.host import device_node
from snapproof.native.kvm import Vm

from tests.reliability_support import (
    CAP_DAC_READ_SEARCH,
    NOBODY,
    child_env,
    drop_to_nobody,
    nobody_home,
    run_child,
)

pytestmark = pytest.mark.needs("kvm", "uffd")  # the parent proves the host has both; the child must not get them

PHASE1_CASE = "test_guest_write_is_caught_at_the_exact_page_before_it_lands[1MiB]"
CHILD_TIMEOUT_S = 120.0


def _others_can(path: str) -> bool:
    """Whether uid 65534 (in no group) may read and write the node: the 'other' bits."""
    return os.path.exists(path) and os.stat(path).st_mode & (stat.S_IROTH | stat.S_IWOTH) == stat.S_IROTH | stat.S_IWOTH


def expected_kvm_reason(fix: str = "") -> str | None:
    """The kvm row's skip reason for uid 65534, ending in ``fix`` (the commands as the child worked them out);
    without it, the reason up to the fix."""
    if _others_can("/dev/kvm"):
        return None
    return (f"for /dev/kvm (KVM_CREATE_VM): absent: /dev/kvm: permission denied for uid {NOBODY} (os.access R+W; the "
            f"node is {device_node('/dev/kvm')})" + (f"; {fix}" if fix else ""))


def expected_uffd_reason(fix: str = "") -> str | None:
    sysctl = Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip()
    if sysctl == "1" or _others_can("/dev/userfaultfd"):
        return None
    node = "/dev/userfaultfd"
    dev = f"{node} not readable+writable ({device_node(node)})" if os.path.exists(node) else f"{node} absent"
    return (f"for userfaultfd with kernel-mode faults: absent: userfaultfd for kernel-mode faults denied (EPERM) for "
            f"uid {NOBODY}: vm.unprivileged_userfaultfd = {sysctl}, without CAP_SYS_PTRACE, {dev}; root or "
            "CAP_SYS_PTRACE has it" + (f"; {fix}" if fix else ""))


def check_fixes(kvm_fix: str, uffd_fix: str) -> None:
    """Each fix is a command to paste, for this user: join /dev/kvm's group (or give /dev/kvm a group first); give
    /dev/userfaultfd that group (kernel 6.1+), or the sysctl."""
    group = native_fixes.node_group("/dev/kvm")
    group = group if group and group != "root" else native_fixes.KVM_GROUP
    want = f"sudo usermod -aG {group} nobody"
    assert want in kvm_fix and kvm_fix.count("`") >= 2, f"kvm fix: expected a command with {want!r}, saw {kvm_fix!r}"
    want = "`sudo sysctl -w vm.unprivileged_userfaultfd=1`"
    assert want in uffd_fix, f"uffd fix: expected {want!r} in {uffd_fix!r}"
    if os.path.exists("/dev/userfaultfd"):
        want = f"sudo chgrp {group} /dev/userfaultfd && sudo chmod 0660 /dev/userfaultfd"
        assert want in uffd_fix and 'KERNEL==\"userfaultfd\"' in uffd_fix, (
            f"uffd fix: expected the udev rule and {want!r}, saw {uffd_fix!r}")


@pytest.fixture
def nobody_dir(tmp_path):
    """(HOME, an output directory) both writable by uid 65534."""
    if os.geteuid() != 0:  # a user in group kvm runs the suite too: it cannot become another user
        pytest.skip(f"dropping to uid {NOBODY} (nobody) needs root; this run is uid {os.geteuid()}")
    with nobody_home(tmp_path) as home:
        out = home / "out"
        out.mkdir()
        os.chown(out, NOBODY, NOBODY)
        yield home, out


def _as_nobody(args: list[str], home: Path):
    return run_child(args, CHILD_TIMEOUT_S, preexec_fn=drop_to_nobody(),
                     env=child_env(HOME=str(home), TMPDIR=str(home)))


def test_unprivileged_probe_names_dev_kvm_permission_and_the_uffd_privilege(nobody_dir):
    """As nobody, the probe and native layer name /dev/kvm's mode and owner, the uffd sysctl, cap and node."""
    home, _ = nobody_dir
    run = _as_nobody(["-c", "import os, json; from tests.reliability_support import read_cap_eff; "
                            "print('WHO ' + json.dumps([os.geteuid(), os.getegid(), os.getgroups(), read_cap_eff()])); "
                            "from tests.reliability_child import probe; probe()"], home)
    assert run.returncode == 0, f"probe child failed:\n{run.stdout}\n{run.stderr}"
    who = json.loads(next(ln for ln in run.stdout.splitlines() if ln.startswith("WHO "))[4:])
    assert who == [NOBODY, NOBODY, [], 1 << CAP_DAC_READ_SEARCH], f"child identity: expected uid/gid {NOBODY}, " \
                                                                  f"no groups, CapEff 0x4; saw {who}"
    probe = run.json_line("PROBE")
    want_kvm, want_uffd = expected_kvm_reason(probe["kvm_fix"]), expected_uffd_reason(probe["uffd_fix"])
    print(f"unprivileged skip reasons:\n  kvm:  {probe['missing_kvm']}\n  uffd: {probe['missing_uffd']}\n"
          f"  Vm.create(): {probe['vm_create']}\n  uffd open: {probe['uffd_open']}")
    check_fixes(probe["kvm_fix"], probe["uffd_fix"])
    assert probe["missing_kvm"] == want_kvm, f"kvm skip reason:\n expected {want_kvm!r}\n saw      " \
                                             f"{probe['missing_kvm']!r}"
    assert probe["missing_uffd"] == want_uffd, f"uffd skip reason:\n expected {want_uffd!r}\n saw      " \
                                               f"{probe['missing_uffd']!r}"
    if want_kvm is not None:
        want = (f"/dev/kvm: permission denied for uid {NOBODY} (EACCES from open O_RDWR; the node is "
                f"{device_node('/dev/kvm')}); {probe['kvm_fix']}")
        assert probe["vm_create"] == want, f"Vm.create(): expected {want!r}, saw {probe['vm_create']!r}"
    if want_uffd is not None:
        want = want_uffd.split("absent: ", 1)[1]
        assert probe["uffd_open"] == want, f"uffd open: expected {want!r}, saw {probe['uffd_open']!r}"


def _require_denied(want_kvm: str | None, want_uffd: str | None) -> None:
    if want_kvm is None or want_uffd is None:
        sysctl = Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip()
        pytest.skip(f"this host lets uid {NOBODY} use /dev/kvm ({device_node('/dev/kvm')}) or userfaultfd "
                    f"(vm.unprivileged_userfaultfd = {sysctl}): there is no unprivileged skip to show")


def _child_pytest(home: Path, out: Path, *extra: str):
    junit = out / "junit.xml"
    run = _as_nobody(["-m", "pytest", "phases/test_phase1_wp_catches_writes.py", "tests/reliability_child_cases.py",
                      "-q", "-p", "no:randomly", "--reports", "none", "--results-dir", str(out), "--benchmark-disable",
                      f"--junitxml={junit}", "-k", "needs_kvm or needs_uffd or (exact_page and 1MiB)", *extra], home)
    records = sorted(out.glob("*.yaml"))
    assert records, f"the child wrote no run record:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    record = yaml.safe_load(records[-1].read_text())
    phase_cases = {c["test"]: c for p in record["phases"] for c in p["cases"]}
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        for kind in ("skipped", "error", "failure"):
            el = case.find(kind)
            if el is not None:
                outcomes[case.get("name")] = (kind, (el.get("message") or "") + (el.text or ""))
                break
        else:
            outcomes[case.get("name")] = ("passed", "")
    return run, phase_cases, outcomes


def test_unprivileged_pytest_skips_naming_the_missing_capability(nobody_dir):
    """As nobody, phase 1 and the kvm/uffd-only cases skip, each reason the probe's exact text, then its fix."""
    home, out = nobody_dir
    want_kvm, want_uffd = expected_kvm_reason(), expected_uffd_reason()
    _require_denied(want_kvm, want_uffd)
    run, phase_cases, outcomes = _child_pytest(home, out)
    assert run.returncode == 0, f"child pytest: expected exit 0 (all skipped), saw {run.returncode}:\n{run.stdout}"
    case = phase_cases[PHASE1_CASE]
    assert case["outcome"] == "skipped" and case["skip_reason"].startswith(f"{want_kvm}; "), (
        f"phase 1 as nobody: expected skipped with {want_kvm!r} and its fix, saw {case['outcome']} "
        f"{case.get('skip_reason')!r}")
    for name, want in (("test_needs_kvm", want_kvm), ("test_needs_uffd", want_uffd)):
        kind, text = outcomes[name]
        assert kind == "skipped" and want in text, f"{name}: expected skipped with {want!r}, saw {kind}: {text!r}"


def test_unprivileged_pytest_under_strict_host_fails_instead(nobody_dir):
    """The same child with --strict-host fails each case, naming the same capability."""
    home, out = nobody_dir
    want_kvm, want_uffd = expected_kvm_reason(), expected_uffd_reason()
    _require_denied(want_kvm, want_uffd)
    run, phase_cases, outcomes = _child_pytest(home, out, "--strict-host")
    assert run.returncode == 1, f"child pytest --strict-host: expected exit 1, saw {run.returncode}:\n{run.stdout}"
    case = phase_cases[PHASE1_CASE]
    assert case["outcome"] in ("failed", "error") and want_kvm in case["failure"], (
        f"phase 1 as nobody, strict: expected a failure naming {want_kvm!r}, saw {case['outcome']} "
        f"{case.get('failure')!r}")
    for name, want in (("test_needs_kvm", want_kvm), ("test_needs_uffd", want_uffd)):
        kind, text = outcomes[name]
        assert kind in ("error", "failure") and f"--strict-host: host capability missing: {want}" in text, (
            f"{name}: expected a --strict-host failure naming {want!r}, saw {kind}: {text!r}")


def test_root_parent_really_has_what_the_child_lacks():
    """The control: this (privileged) process opens /dev/kvm, so the child's skips are about privilege alone."""
    Vm.create().close()
