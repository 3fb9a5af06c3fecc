"""The host table (native.host): the same rows on every host, INFO for what the suite does not use, a command
to paste under every row a person can fix, and the command line's --json, --quiet, --sizes and --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from snapproof.native import fixes, host
from snapproof.native.build import BuildError
from snapproof.native.errors import CapabilityMissing

pytestmark = pytest.mark.platform("linux")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_probe(monkeypatch: pytest.MonkeyPatch):
    """``fresh_probe()``: probe again in this process; the session's probe is put back afterwards."""
    monkeypatch.setattr(host, "_cached", host._cached)
    return lambda: host.probe(refresh=True)


def _shape(rep: host.HostReport) -> list[tuple[str, str]]:
    return [(c.area, c.name) for c in rep.capabilities]


# -- the same rows on every host ------------------------------------------------------------------------------


def test_rows_keep_their_places_when_userfaultfd_is_denied(fresh_probe, monkeypatch: pytest.MonkeyPatch):
    """No userfaultfd: every feature row is still there, not probed, naming row uffd; the uffd row carries the fix."""
    from snapproof.native import uffd

    normal = fresh_probe()

    def denied() -> int:
        raise CapabilityMissing("userfaultfd for kernel-mode faults denied (EPERM)", fix=fixes.uffd_access())

    monkeypatch.setattr(uffd, "supported_features", denied)
    rep = fresh_probe()
    assert _shape(rep) == _shape(normal), f"rows differ:\n{_shape(rep)}\n{_shape(normal)}"
    row = rep.get("uffd")
    assert row is not None and row.status is host.Status.FAIL and "`sudo sysctl -w vm.unprivileged_userfaultfd=1`" \
        in row.hint, row
    reason = rep.missing("uffd.PAGEFAULT_FLAG_WP")
    want = "for UFFD_FEATURE_PAGEFAULT_FLAG_WP: absent: not probed, userfaultfd is unavailable (row uffd)"
    assert reason == want, reason
    unused = rep.get("uffd.EVENT_FORK")
    assert unused is not None and unused.status is host.Status.INFO and not unused.available, unused


def test_rows_keep_their_places_when_the_native_build_fails(fresh_probe, monkeypatch: pytest.MonkeyPatch):
    """A failed build is one FAIL row with its fix; the rows that need the C layer are there, not probed."""
    from snapproof.native import build

    normal = fresh_probe()

    def broken() -> None:
        raise BuildError("no C compiler found (looked for 'cc' and 'gcc')")

    monkeypatch.setattr(build, "ensure_built", broken)
    rep = fresh_probe()
    assert _shape(rep) == _shape(normal), f"rows differ:\n{_shape(rep)}\n{_shape(normal)}"
    native = rep.get("native")
    assert native is not None and native.status is host.Status.FAIL and "`./setup`" in native.hint, native
    for name in ("kvm", "uffd", "pagemap_scan", "soft_dirty"):
        row = rep.get(name)
        assert row is not None and row.detail == "absent: not probed, the native build failed (row native)", row


def test_features_the_suite_does_not_use_are_info_rows():
    """Every uffd feature outside the roles table is INFO, offered or not: never a WARN, never a FAIL."""
    from snapproof.native import uffd

    rep = host.probe()
    if rep.get("uffd") is None or not rep.get("uffd").available:  # type: ignore[union-attr]
        pytest.skip("userfaultfd unavailable here: the rows are not probed (the test above covers them)")
    for name in uffd.FEATURES:
        row = rep.get(f"uffd.{name}")
        assert row is not None, f"no row uffd.{name}"
        if name not in host._FEATURE_ROLE:
            assert row.status is host.Status.INFO and "not used by snapproof" in row.detail, row


def test_memory_row_judges_the_largest_size_asked(fresh_probe):
    """--sizes past what the host holds three copies of: WARN naming MemTotal, with --max-size to paste."""
    try:
        host.ask_sizes([1 << 50])
        row = fresh_probe().get("memory")
    finally:
        host.ask_sizes([])
    assert row is not None and row.status is host.Status.WARN, row
    assert "(--sizes)" in row.detail and "MemTotal" in row.detail and "`--max-size " in row.hint, row


def test_every_fix_is_a_command_between_backticks():
    """The hints of native.fixes: 'why: `command`' each, alternatives joined by '; or '."""
    hints = [fixes.kvm_access(), fixes.kvm_module(), fixes.uffd_access(), fixes.hugepages(8, 0, 0),
             fixes.thp_knobs([("/k/a", "madvise"), ("/k/b", "advise"), ("/k/c", "madvise")])]
    for hint in hints:
        for way in hint.split("; or "):
            assert way == "run as root" or (way.count("`") == 2 and way.endswith("`")), f"not a command: {way!r}"
    assert "`echo madvise | sudo tee /k/a /k/c >/dev/null && echo advise | sudo tee /k/b >/dev/null`" in hints[-1]
    assert "`sudo sysctl -w vm.nr_hugepages=8`" in hints[3], hints[3]


# -- the command line -----------------------------------------------------------------------------------------


def _native_host(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "snapproof.native.host", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_json_lists_every_row_and_exits_as_the_table_does():
    rep = host.probe()
    proc = _native_host("--json")
    doc = json.loads(proc.stdout)
    assert [r["name"] for r in doc["rows"]] == [c.name for c in rep.capabilities], doc["rows"]
    assert proc.returncode == (1 if doc["failed"] else 0), (proc.returncode, doc["failed"])


def test_quiet_prints_only_warn_and_fail_rows():
    proc = _native_host("--quiet")
    heads = [line for line in proc.stdout.splitlines() if ": Checking " in line]
    assert all(line.rstrip().endswith((": WARN", ": FAIL")) for line in heads), proc.stdout
    assert "snapproof host check" not in proc.stdout, proc.stdout


def test_help_names_every_option():
    proc = _native_host("--help")
    assert proc.returncode == 0 and all(o in proc.stdout for o in ("--json", "--quiet", "--sizes")), proc.stdout


def test_qemu_row_names_what_is_missing_and_what_phase5_leaves_out(fresh_probe, monkeypatch, tmp_path):
    """No QEMU on PATH: row qemu is WARN (never FAIL: the phases run without it) naming the binary, phase 5's
    fallback and the package to install; with QEMU there, it names the binary and its version."""
    normal = fresh_probe()
    row = normal.get("qemu")
    assert row is not None, "no row qemu"
    if row.status is host.Status.PASS:
        assert "qemu-system-x86_64" in row.detail and "version" in row.detail, row
    monkeypatch.setenv("PATH", str(tmp_path))
    rep = fresh_probe()
    assert _shape(rep) == _shape(normal), f"rows differ:\n{_shape(rep)}\n{_shape(normal)}"
    row = rep.get("qemu")
    assert row is not None and row.status is host.Status.WARN and not row.available, row
    assert "qemu-system-x86_64 is not on PATH" in row.detail, row
    assert "phase 5" in row.fallback and "`sudo apt-get install qemu-system-x86`" in row.hint, row
    assert rep.missing("qemu") is not None and "install QEMU" in (rep.missing("qemu") or "")


def test_qemu_row_warns_where_its_background_snapshot_would_be_refused_userfaultfd(fresh_probe, monkeypatch):
    """Not root, no CAP_SYS_PTRACE, the sysctl off: QEMU 7.2 gets no userfaultfd (8.1+ may use /dev/userfaultfd), so
    row qemu is WARN with the sysctl to paste, and phase 5's QEMU case is left out rather than failed."""
    from snapproof.native.qemu import QemuError, find_qemu

    try:
        binary = find_qemu()
    except QemuError as e:
        pytest.skip(f"needs QEMU on PATH: {e}")
    monkeypatch.setattr(host, "uid", lambda: 1000)
    monkeypatch.setattr(host, "has_capability", lambda bit: False)
    monkeypatch.setattr(host, "_unprivileged_userfaultfd", lambda: False)
    monkeypatch.setattr(host.os, "access", lambda path, mode: path != "/dev/userfaultfd")
    rep = fresh_probe()
    row = rep.get("qemu")
    assert row is not None and row.status is host.Status.WARN and not row.available, row
    assert "vm.unprivileged_userfaultfd=1" in row.detail and binary.path in row.detail, row
    assert "`sudo sysctl -w vm.unprivileged_userfaultfd=1`" in row.hint and "phase 5" in row.fallback, row
    assert host._qemu_uffd_denied((8, 1, 0)) is not None, "8.1 without access to /dev/userfaultfd was let through"
    monkeypatch.setattr(host.os, "access", lambda path, mode: True)
    assert host._qemu_uffd_denied((8, 1, 0)) is None, "8.1 with /dev/userfaultfd was refused"
    assert host._qemu_uffd_denied((7, 2, 0)) is not None, "7.2 let through on /dev/userfaultfd, which it never opens"
