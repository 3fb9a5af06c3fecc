"""Self-tests of the Windows native layer that run on Linux.

No Windows here: native/windows/ci.sh cross-compiles the C with mingw-w64 and
runs selftest.exe under wine: file views, the read-only control, every branch
of the WHP probe, the WHP rules, the run loop and the hypervisor-level
copy-on-write load, against a stand-in WinHvPlatform.dll that enforces the
rules real WHP is documented or observed to enforce and interprets a few
real-mode instructions (fake_whp.c). The rest checks, without compiling, that
the Python side agrees with the C header and the guests, that the host probe
turns every way the WHP layer can break into one FAIL row, and that the shared
modules import where Linux-only modules do not exist. Real WHP needs a Windows
host: phase 4 and selftest.exe run there.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from snapproof.native import whp
from snapproof.native.errors import CapabilityMissing

from snapproof import guests, native, results

ROOT = Path(__file__).resolve().parent.parent
WINDOWS_DIR = ROOT / "native" / "windows"
HEADER = WINDOWS_DIR / "snapproof_win.h"
# Cold wine prefixes take a while on CI runners; pyproject's 120 s ceiling is for guests.
WINE_TIMEOUT = 900

# -- helpers -----------------------------------------------------------------------------------------------


def _missing_cross_tool() -> str | None:
    for tool, package in (("x86_64-w64-mingw32-gcc", "gcc-mingw-w64-x86-64"), ("wine", "wine wine64")):
        if shutil.which(tool) is None:
            return f"{tool} not on PATH: `./setup --tests` installs it (as root; Debian/Ubuntu: {package})"
    return None


def _header_strings(prefix: str) -> dict[str, str]:
    """The string macros of snapproof_win.h whose names start with ``prefix``, as C would concatenate them."""
    text = HEADER.read_text()
    out = {}
    for m in re.finditer(rf"#define ({prefix}\w+)((?:\s*\\?\n?\s*\"(?:[^\"\\]|\\.)*\")+)", text):
        literals = re.findall(r"\"((?:[^\"\\]|\\.)*)\"", m[2])
        out[m[1]] = "".join(literals).replace('\\"', '"')
    return out


def _absent_templates() -> dict[str, str]:
    """The SP_WHP_ABSENT_* printf formats of snapproof_win.h."""
    return _header_strings("SP_WHP_ABSENT_")


def _template_regex(fmt: str) -> re.Pattern[str]:
    """A printf format as a regex: the fixed text exact, each directive a plausible value."""
    directive = {"%lu": r"\d+", "%s": r".+?", "%08lx": r"[0-9a-f]{8}"}
    parts = re.split(r"(%lu|%s|%08lx)", fmt)
    return re.compile("".join(directive.get(p, re.escape(p)) for p in parts))


def _header_enum_values() -> dict[str, int]:
    cdef = HEADER.read_text().split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]
    return {m[1]: int(m[2], 0) for m in re.finditer(r"^\s*(SP_\w+)\s*=\s*(0x[0-9a-fA-F]+|\d+)", cdef, re.M)}


@pytest.fixture(scope="module")
def wine_selftest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Output of native/windows/ci.sh --no-install: build with mingw-w64, run under wine."""
    missing = _missing_cross_tool()
    if missing:
        raise CapabilityMissing(missing)  # a skip, or a failure under --strict-host
    out = tmp_path_factory.mktemp("windows-build")
    proc = subprocess.run(["bash", str(WINDOWS_DIR / "ci.sh"), "--no-install", "--out", str(out)],
                          capture_output=True, text=True, timeout=WINE_TIMEOUT, cwd=ROOT)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        failed = [line for line in log.splitlines() if line.startswith("FAIL") or "ci.sh:" in line]
        pytest.fail(f"native/windows/ci.sh exit status {proc.returncode}:\n" + "\n".join(failed[-30:]
                    or log.splitlines()[-30:]), pytrace=False)
    return log


# -- the C under wine --------------------------------------------------------------------------------------

ISSUE_CHECKS = [
    "write visible in copy view",
    "file unchanged by copy-view write",
    "second copy view isolated",
    "copy views isolated both ways",
    "file unchanged by two copy views",
    "read-only view protection",
    "read-only view is read-only",
    "file unchanged by the read-only write",
]


@pytest.mark.timeout(WINE_TIMEOUT)
def test_windows_c_builds_with_werror_and_passes_its_selftest_under_wine(wine_selftest: str) -> None:
    """mingw-w64 -Wall -Wextra -Werror (with the WHP layout asserts) builds it, and every check passes."""
    assert "ci.sh: PASS" in wine_selftest, wine_selftest[-2000:]


@pytest.mark.timeout(WINE_TIMEOUT)
@pytest.mark.parametrize("check", ISSUE_CHECKS)
def test_copy_on_write_view_check_passes_under_wine(wine_selftest: str, check: str) -> None:
    """Each file-view property the copy-on-write load rests on is checked, and holds, on the Windows API."""
    lines = [line for line in wine_selftest.splitlines() if re.match(rf"^\w+\s+{re.escape(check)}:", line)]
    assert lines, f"selftest.exe printed no line for {check!r}"
    assert all(line.startswith("ok ") for line in lines), "\n".join(lines)


def _selftest_lines(log: str, check: str) -> list[str]:
    return [line for line in log.splitlines() if re.match(rf"^\w+\s+{re.escape(check)}:", line)]


# Against fake_whp.c mode 4 (a toy partition): whp_vm.c's loop, watchdog and cancel run; WHP itself does not.
RUN_LOOP_CHECKS = [
    "whp run marker16",
    "whp guest sees its write",
    "whp partitions isolated",
    "whp second partition maps once the first is deleted",
    "whp partitions isolated both ways",
    "file unchanged by the guest",
    "whp port I/O exit",
    "whp debug port",
    "whp sync port",
    "whp RIP stepped over out",
    "whp run resumes after the I/O exit",
    "whp stop on sync",
    "whp timeout",
    "whp cancel from another thread",
    "whp cancel before run",
    "whp memory-access exit",
    "whp store to a Read|Execute page exits",
    "whp write exit leaves the store undone",
    "whp write exit repeats until served",
    "whp guest resumes at the store",
    "whp read-only load fails like the original bug",
    "stand-in models the read-only store as a write exit",
    "file unchanged by the read-only load",
]

# Each rule real WHP enforces (documented, or observed by projects on real WHP) that the stand-in enforces too:
# selftest.exe calls the exports raw and checks the refusal. On a Windows host the same lines test real WHP.
RULE_CHECKS = [
    "rule: an unknown capability is refused",
    "rule: setup without the processor count is refused",
    "rule: memory is mapped only after setup",
    "rule: vCPUs are created only after setup",
    "rule: the processor count is fixed at setup",
    "rule: vCPU flags must be zero",
    "rule: a vCPU index beyond the processor count is refused",
    "rule: running a vCPU that does not exist is refused",
    "rule: a vCPU is created once",
    "rule: register values must be 16-byte aligned",
    "rule: the map source must be page aligned",
    "rule: the map GPA must be page aligned",
    "rule: the map size must be whole pages",
    "rule: the map size must not be 0",
    "rule: a map overlapping a mapped range is refused",
    "rule: unmapping GPAs never mapped is refused",
    "rule: a partial unmap needs PartialUnmap",
    "rule: a partial unmap works with PartialUnmap",
    "rule: a second partition with mapped memory is refused",
    "rule: the second partition maps once the first is deleted",
]

# The hypervisor-level copy-on-write load (cow.c) against the stand-in's per-page map/unmap and write exits.
COW_CHECKS = [
    "cow load refuses a copy view",
    "cow load needs PartialUnmap",
    "cow A runs cow16",
    "cow A write faults",
    "cow A guest reads its writes",
    "cow A memory holds its writes",
    "cow A snapshot view untouched",
    "cow VMs isolated",
    "cow B runs cow16",
    "cow B write faults",
    "cow VMs isolated both ways",
    "file unchanged by the cow loads",
]


@pytest.mark.timeout(WINE_TIMEOUT)
@pytest.mark.parametrize("check", RUN_LOOP_CHECKS + RULE_CHECKS + COW_CHECKS)
def test_whp_check_passes_against_the_stand_in(wine_selftest: str, check: str) -> None:
    """whp_vm.c and cow.c handle each exit and rule as documented, driven by fake_whp.c under wine (not real WHP)."""
    assert "info whp: a stand-in WinHvPlatform.dll" in wine_selftest, "the mode-4 run did not happen"
    lines = _selftest_lines(wine_selftest, check)
    assert lines, f"selftest.exe printed no line for {check!r}"
    assert all(line.startswith("ok ") for line in lines), "\n".join(lines)


@pytest.mark.timeout(WINE_TIMEOUT)
def test_every_stand_in_rule_is_checked(wine_selftest: str) -> None:
    """Every RULE the stand-in's source declares has a selftest line, and every rule line printed is listed here."""
    printed = {re.match(r"^\w+\s+(rule: [^:]+):", line)[1] for line in wine_selftest.splitlines()  # type: ignore[index]
               if re.match(r"^\w+\s+rule: ", line)}
    assert printed == set(RULE_CHECKS), f"printed but not listed: {sorted(printed - set(RULE_CHECKS))}; " \
        f"listed but not printed: {sorted(set(RULE_CHECKS) - printed)}"
    declared = len(re.findall(r"\bRULE:", (WINDOWS_DIR / "fake_whp.c").read_text()))
    assert declared >= 10, f"fake_whp.c declares {declared} RULE comments; the rules are documented there"


@pytest.mark.timeout(WINE_TIMEOUT)
def test_each_whp_probe_branch_reports_its_header_reason(wine_selftest: str) -> None:
    """DLL missing, export missing, capability call failing, HypervisorPresent FALSE, and the throwaway partition's
    create, property and setup failures: seven texts, in order, each naming the HRESULT and the fix."""
    templates = _absent_templates()
    expected = ["SP_WHP_ABSENT_NO_DLL", "SP_WHP_ABSENT_NO_EXPORT", "SP_WHP_ABSENT_CAPABILITY_FAILED",
                "SP_WHP_ABSENT_NOT_PRESENT", "SP_WHP_ABSENT_CREATE_FAILED", "SP_WHP_ABSENT_PROPERTY_FAILED",
                "SP_WHP_ABSENT_SETUP_FAILED"]
    assert sorted(templates) == sorted(expected), f"snapproof_win.h defines {sorted(templates)}"
    seen = [line.split(": ", 1)[1] for line in wine_selftest.splitlines()
            if line.startswith("whp-absent-reason: ") and "(none: WHP is present)" not in line]
    assert len(seen) == len(expected), f"expected {len(expected)} whp-absent-reason lines, saw {seen}"
    fixes = _header_strings("SP_WHP_FIX_")
    for name, reason in zip(expected, seen, strict=True):
        assert _template_regex(templates[name]).fullmatch(reason), f"{name}: {templates[name]!r}\n saw {reason!r}"
        if "%s" in templates[name] and name != "SP_WHP_ABSENT_NO_EXPORT":
            assert any(reason.endswith(fix) for fix in fixes.values()), f"{name} names no fix: {reason!r}"
    # The throwaway partition's failures name their HRESULT; the stand-in gives each a known cause.
    assert "0x80070005 (E_ACCESSDENIED); " + fixes["SP_WHP_FIX_TOKEN"] in seen[4], seen[4]
    assert "0x80370303 (WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG); " + fixes["SP_WHP_FIX_HYPERVISOR_CONFIG"] in seen[6]
    assert "bcdedit /set hypervisorlaunchtype auto" in seen[3], seen[3]


# -- one contract, read from the header -----------------------------------------------------------------------


def test_absent_reason_text_is_defined_only_in_the_header() -> None:
    """The skip texts and their fixes live in snapproof_win.h alone: Python returns the C string, the self-test
    prints it."""
    texts = [*_absent_templates().values(), *_header_strings("SP_WHP_FIX_").values()]
    fragments = [max(re.split(r"%\w+", fmt), key=len) for fmt in texts]
    for path in [ROOT / "native" / "whp.py", ROOT / "native" / "host.py", *WINDOWS_DIR.glob("*.c")]:
        text = path.read_text()
        copies = [f for f in fragments if f in text]
        assert not copies, f"{path.relative_to(ROOT)} repeats reason text {copies}: use the snapproof_win.h macros"


def _c_array(name: str) -> bytes:
    """The bytes of ``static const uint8_t NAME[] = {...}`` in selftest.c."""
    text = (WINDOWS_DIR / "selftest.c").read_text()
    body = re.search(rf"static const uint8_t {name}\[\] = \{{(.*?)\}};", text, re.S)
    assert body, f"selftest.c has no array {name}"
    code = re.sub(r"/\*.*?\*/", "", body[1], flags=re.S)
    return bytes(int(v, 16) for v in re.findall(r"0x([0-9A-Fa-f]{2})", code))


@pytest.mark.parametrize("name", ["marker16", "cow16"])
def test_selftest_guest_is_the_committed_binary(name: str) -> None:
    """selftest.c carries the guest's bytes (it cannot read guests/): they are guests/NAME.bin byte for byte."""
    from snapproof import guests

    assert _c_array(name) == guests.load(name), (f"selftest.c {name}: {_c_array(name).hex(' ')}; "
                                                 f"guests/{name}.bin: {guests.load(name).hex(' ')}")


def test_read_only_child_exit_statuses_agree_between_c_and_python() -> None:
    """Each outcome of the read-only load has one exit status, the same in selftest.c and native/whp.py."""
    text = (WINDOWS_DIR / "selftest.c").read_text()
    c = {m[1]: int(m[2]) for m in re.finditer(r"#define CHILD_(\w+) (\d+)u\b", text)}
    py = {o.name: o.value for o in whp.ReadonlyOutcome if 0 < o.value < 256}
    assert c == py, f"selftest.c CHILD_*: {c}; native.whp.ReadonlyOutcome: {py}"
    assert len(set(c.values())) == len(c), f"two outcomes share an exit status: {c}"


def test_python_constants_match_the_c_enums() -> None:
    """native/whp.py spells the C enum values out (it must import off Windows); they match the header."""
    header = _header_enum_values()
    wrong = {k: (v, header.get(k)) for k, v in whp._C_CONSTANTS.items() if header.get(k) != v}
    assert not wrong, f"Python value vs snapproof_win.h: {wrong}"


def test_every_lib_name_whp_uses_is_declared_in_the_cdef() -> None:
    """A name whp.py calls on ``lib`` but the cdef lacks would only fail on Windows, at run time."""
    import snapproof.native._windows_build as builder

    cdef = builder._cdef_text()
    used = set(re.findall(r"\blib\.(\w+)", (ROOT / "native" / "whp.py").read_text()))
    undeclared = sorted(n for n in used if not re.search(rf"\b{n}\b", cdef))
    assert not undeclared, f"used by native/whp.py, not declared between the CDEF markers: {undeclared}"


def test_windows_builder_parses_and_compiles_only_the_extension_sources(tmp_path: Path) -> None:
    """cffi accepts the cdef and emits C; the CI-only selftest.c and fake_whp.c stay out of the extension."""
    import snapproof.native._windows_build as builder

    names = sorted(p.name for p in builder.SOURCES)
    assert names == ["common.c", "cow.c", "file_view.c", "whp_vm.c"], f"extension sources: {names}"
    builder.ffibuilder.emit_c_code(str(tmp_path / "_windows.c"))
    assert "sp_whp_vcpu_run" in (tmp_path / "_windows.c").read_text()


# -- portability of the Python side --------------------------------------------------------------------------

# The Linux backend (docs/CONTRACTS.md), plus the stdlib modules Windows lacks; names as the packages have them.
LINUX_ONLY = ["fcntl", "resource", "termios", *(f"{native.__name__}.{m}" for m in (
    "_linux", "_lib", "kvm", "wp", "memory", "live", "engine", "points", "pagemap"))]
SHARED_MODULES = [native.__name__, *(f"{native.__name__}.{m}" for m in (
    "errors", "build", "image", "whp", "_windows_build", "host", "uffd", "compare")),
    guests.__name__, f"{guests.__name__}.storm", f"{guests.__name__}.counter", f"{results.__name__}.hostpolicy"]

_IMPORT_GUARD = r"""
import builtins, importlib, os, sys
root, target, linux_only = sys.argv[1], sys.argv[2], set(sys.argv[3].split(","))
real_import = builtins.__import__

def guarded(name, globals=None, locals=None, fromlist=(), level=0):
    caller = (globals or {}).get("__file__") or ""
    absolute = name
    if level and globals:  # from .x import y: resolve against the importer's package
        base = (globals.get("__package__") or "").rsplit(".", level - 1)[0]
        absolute = f"{base}.{name}" if name else base
    wanted = {absolute} | {f"{absolute}.{f}" for f in fromlist or ()}
    hit = sorted(wanted & linux_only)
    if hit and os.path.abspath(caller).startswith(root):
        raise ImportError(f"{hit[0]} is Linux-only, imported at import time by {os.path.relpath(caller, root)}")
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = guarded
importlib.import_module(target)
assert "snapproof.native._windows" not in sys.modules, "importing must not load the compiled Windows module"
"""


def _module_exists(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.mark.parametrize("module", [m for m in SHARED_MODULES if _module_exists(m)])
def test_shared_module_imports_without_linux_only_modules(module: str) -> None:
    """The modules Windows runs import with fcntl, resource, termios and the KVM backend out of reach."""
    proc = subprocess.run([sys.executable, "-c", _IMPORT_GUARD, str(ROOT), module, ",".join(LINUX_ONLY)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, f"import {module}:\n{proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}"


def test_windows_leaves_out_the_linux_only_modules_of_a_checkout_and_of_an_install() -> None:
    """The collection patterns match from the right: a checkout's phases and an install's alike."""
    from snapproof.fixtures import linux_only

    for root in (ROOT, Path("/venv/lib/python3.11/site-packages/snapproof")):
        assert linux_only(root / "phases" / "test_phase1_wp_catches_writes.py")
        assert not linux_only(root / "phases" / "test_phase0_host.py")
        assert not linux_only(root / "phases" / "test_phase4_cow_load.py")
    assert linux_only(ROOT / "tests" / "test_wheel.py") and not linux_only(ROOT / "tests" / "test_image_format.py")


def test_whp_modules_type_check_for_win32() -> None:
    """mypy --platform win32 accepts native/, phases/ and every shared module."""
    if importlib.util.find_spec("mypy") is None:  # this interpreter's: a venv's tools are not on PATH unless activated
        raise CapabilityMissing(f"mypy is not installed for {sys.executable} (./setup, or pip install -e '.[dev]')")
    # Everything shared, and the Linux-only modules too: they raise ImportError on win32 before their code.
    files = ["snapproof", "native", "phases", "conftest.py", "guests", "results"]
    proc = subprocess.run([sys.executable, ".ci/typecheck.py", "--platform", "win32", "--", *files],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- off Windows, the Python layer says so --------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="checks the non-Windows answer")
def test_whp_absent_off_windows_names_the_platform() -> None:
    """whp_absent_reason() off Windows names the platform; WhpVm and FileView raise it as a capability skip."""
    reason = whp.whp_absent_reason()
    assert reason is not None and reason.startswith("WHP absent: not a Windows host"), reason
    assert sys.platform in reason, reason
    with pytest.raises(CapabilityMissing, match="not a Windows host"):
        whp.WhpVm()
    with pytest.raises(CapabilityMissing, match="not a Windows host"):
        whp.FileView.copy(HEADER)


@pytest.mark.parametrize(("returncode", "outcome", "is_the_bug"), [
    (0xC0000005, "ACCESS_VIOLATION", True),
    (0xC0000005 - 2**32, "ACCESS_VIOLATION", True),  # how a signed exit status shows it
    (4, "MEMORY_ACCESS_EXIT", True),
    (6, "RUN_FAILED", True),
    (3, "WRITE_LANDED", False),
    (7, "TIMEOUT", False),
    (8, "OTHER_EXIT", False),
    (5, "MAP_REFUSED", False),
    (2, "SETUP_FAILED", False),
    (1, "UNKNOWN", False),
])
def test_readonly_outcome_names_what_the_child_saw(returncode: int, outcome: str, is_the_bug: bool) -> None:
    """An access violation, a write memory-access exit or a failed run call is the original bug; each outcome of
    the child, the bug or not, is named by its exit status alone."""
    seen = whp.ReadonlyLoadOutcome(returncode=returncode, exit=None, output="last line")
    assert seen.outcome.name == outcome, f"exit status {returncode:#x}: expected {outcome}, saw {seen.outcome.name}"
    assert seen.failed_like_original_bug is is_the_bug, seen.describe()
    assert seen.describe().startswith(f"{outcome}, "), seen.describe()


def _exit(**fields: object) -> whp.Exit:
    base: dict[str, object] = dict(
        reason=whp.ExitReason.HLT, whv_exit_reason=8, hresult=0, io_port=0, io_size=0, io_is_out=False, io_value=0,
        io_is_string=False, gpa=0, gva=0, access=None, gpa_unmapped=False, rip=0, sync_count=0, last_sync=0,
        debug=b"", run_ns=0, whv_runs=1)
    base.update(fields)
    return whp.Exit(**base)  # type: ignore[arg-type]


def test_readonly_child_maps_each_run_ending_to_its_outcome() -> None:
    """The child's run ends map to outcomes: only a write exit at a mapped GPA is a memory-access outcome."""
    mem = whp.ExitReason.MEMORY_ACCESS
    write, read = whp.MemoryAccessType.WRITE, whp.MemoryAccessType.READ
    cases = [
        (_exit(), whp.ReadonlyOutcome.WRITE_LANDED),
        (_exit(reason=whp.ExitReason.ERROR, hresult=0x80004005), whp.ReadonlyOutcome.RUN_FAILED),
        (_exit(reason=whp.ExitReason.TIMEOUT), whp.ReadonlyOutcome.TIMEOUT),
        (_exit(reason=mem, access=write, gpa=0x1000), whp.ReadonlyOutcome.MEMORY_ACCESS_EXIT),
        (_exit(reason=mem, access=write, gpa=0x1000, gpa_unmapped=True), whp.ReadonlyOutcome.OTHER_EXIT),
        (_exit(reason=mem, access=read, gpa=0x1000), whp.ReadonlyOutcome.OTHER_EXIT),
        (_exit(reason=whp.ExitReason.OTHER, whv_exit_reason=4), whp.ReadonlyOutcome.OTHER_EXIT),
    ]
    for ex, want in cases:
        assert whp.outcome_of_exit(ex) is want, f"{ex.describe()}: expected {want.name}, saw {whp.outcome_of_exit(ex)}"


# -- the Python layer over a stand-in for native._windows ------------------------------------------------------


class FakeWindowsLib:
    """What ``native._windows.lib`` would be, in Python, so native/whp.py runs off Windows.

    Every call is checked against the cdef's parameter count, and structs come
    from an ABI-mode FFI of the same cdef, so a misspelt field or a missing
    argument in whp.py fails here instead of on the first Windows host.

    A model, not WHP: views are copies of the file (a copy view takes writes,
    a read-only one does not), one partition of the process may map memory at
    a time (ERROR_VID_PARTITION_ALREADY_EXISTS otherwise), a copy view is
    charged its whole size as commit and copy-on-write memory its private
    pages, and a run plays marker16 or cow16 by what sits at GPA 0x100 (any
    other memory gets one canned memory-access exit). It lets the phase-4 WHP
    tests run on Linux against the API as whp.py declares it; the C under the
    API is what native/windows/ci.sh tests.
    """

    BASE_COMMIT = 5 << 20

    def __init__(self, absent: str | None = None, map_hresult: int = 0, features: int = 1) -> None:
        import snapproof.native._windows_build as builder
        from cffi import FFI

        self.ffi = FFI()
        self.ffi.cdef(builder._cdef_text())
        self._decls = {k.split(" ", 1)[1]: v[0] for k, v in self.ffi._parser._declarations.items()
                       if k.startswith("function ")}
        self.absent = self.ffi.new("char[]", absent.encode()) if absent else self.ffi.NULL
        self.map_hresult = map_hresult
        self.features = features
        self.last = ("", 0, 0)
        self.calls: list[str] = []
        self.views: dict[int, dict] = {}
        self.vms: dict[int, dict] = {}
        self.cows: dict[int, dict] = {}
        self.vid_owner: int | None = None
        self._next = 0x10

    def __getattr__(self, name: str):
        if name in self._decls:
            impl = getattr(self, f"_{name}")
            want = len(self._decls[name].args)

            def call(*args: object) -> object:
                assert len(args) == want, f"{name}: called with {len(args)} arguments, the cdef declares {want}"
                self.calls.append(name)
                return impl(*args)

            return call
        return self.ffi.integer_const(name)

    def _handle(self, ctype: str) -> tuple[int, object]:
        self._next += 1
        return self._next, self.ffi.cast(ctype, self._next)

    def _key(self, handle: object) -> int:
        return int(self.ffi.cast("uintptr_t", handle))

    def _fail(self, op: str, code: int, hresult: bool) -> int:
        self.last = (op, code, int(hresult))
        return -1

    @property
    def view_mode(self) -> int:
        return self.views[max(self.views)]["mode"] if self.views else 0

    @property
    def private(self) -> dict[int, bytearray]:
        return self.cows[max(self.cows)]["private"] if self.cows else {}

    def _sp_win_last_op(self) -> object:
        return self.ffi.new("char[]", self.last[0].encode())

    def _sp_win_last_error(self) -> int:
        return self.last[1]

    def _sp_win_last_is_hresult(self) -> int:
        return self.last[2]

    def _sp_whp_absent_reason(self) -> object:
        return self.absent

    def _sp_whp_probe(self) -> int:
        return 0 if self.absent == self.ffi.NULL else 4

    def _sp_whp_probe_hresult(self) -> int:
        return 0

    def _sp_whp_features(self, out: object) -> int:
        out[0] = self.features  # type: ignore[index]
        return 0

    def _sp_win_private_usage(self, out: object) -> int:
        views = sum(v["view_size"] for v in self.views.values() if v["mode"] == 1)
        private = sum(len(c["private"]) * 4096 for c in self.cows.values())
        out[0] = self.BASE_COMMIT + views + private  # type: ignore[index]
        return 0

    def _sp_win_quiet_crashes(self) -> None:
        pass

    def _sp_view_open(self, path: str, mode: int, offset: int, size: int, out: object) -> int:
        assert isinstance(path, str) and mode in (1, 2) and offset == 4096, (path, mode, offset)
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        key, handle = self._handle("struct sp_view *")
        self.views[key] = {"buf": self.ffi.new("uint8_t[]", data), "mode": mode, "size": size,
                           "view_size": size + 4096}
        out[0] = handle  # type: ignore[index]
        return 0

    def _sp_view_get_info(self, view: object, info: object) -> None:
        v = self.views[self._key(view)]
        addr = int(self.ffi.cast("uintptr_t", v["buf"]))
        info.addr, info.size, info.base, info.map_offset = addr, v["size"], addr - 4096, 0  # type: ignore[attr-defined]
        info.view_size, info.mode = v["view_size"], v["mode"]  # type: ignore[attr-defined]

    def _sp_view_page_protection(self, view: object, offset: int, out: object) -> int:
        out[0] = 0x08 if self.views[self._key(view)]["mode"] == 1 else 0x02  # type: ignore[index]
        return 0

    def _sp_view_close(self, view: object) -> None:
        del self.views[self._key(view)]

    def _sp_whp_vm_create(self, out: object) -> int:
        key, handle = self._handle("struct sp_whp_vm *")
        self.vms[key] = {"maps": [], "cow": None}
        out[0] = handle  # type: ignore[index]
        return 0

    def _sp_whp_vm_destroy(self, vm: object) -> None:
        key = self._key(vm)
        if self.vms[key]["cow"] is not None:
            self.cows[self.vms[key]["cow"]]["vm"] = None
        del self.vms[key]
        if self.vid_owner == key:
            self.vid_owner = None

    def _claim_vid(self, vm: object) -> int:
        key = self._key(vm)
        if self.vid_owner not in (None, key):
            return self._fail("WHvMapGpaRange", whp.VID_PARTITION_ALREADY_EXISTS, True)
        self.vid_owner = key
        return 0

    def _sp_whp_vm_map(self, vm: object, hva: int, gpa: int, size: int, flags: int) -> int:
        if self.map_hresult:
            return self._fail("WHvMapGpaRange", self.map_hresult, True)
        view = next((v for v in self.views.values() if int(self.ffi.cast("uintptr_t", v["buf"])) == hva), None)
        assert view is not None and gpa == 0 and flags == 7 and size == view["size"], (hva, gpa, flags, size)
        if self._claim_vid(vm):
            return -1
        self.vms[self._key(vm)]["maps"].append(view)
        return 0

    def _sp_cow_open(self, view: object, out: object) -> int:
        if self.views[self._key(view)]["mode"] != 2:
            return self._fail("sp_cow_open: the snapshot must be a SP_VIEW_READONLY view", 87, False)
        key, handle = self._handle("struct sp_cow *")
        self.cows[key] = {"view": self._key(view), "private": {}, "faults": 0, "vm": None}
        out[0] = handle  # type: ignore[index]
        return 0

    def _sp_cow_close(self, cow: object) -> None:
        assert self.cows[self._key(cow)]["vm"] is None, "copy-on-write memory closed under its partition"
        del self.cows[self._key(cow)]

    def _sp_cow_get_info(self, cow: object, info: object) -> None:
        c = self.cows[self._key(cow)]
        info.size, info.private_pages = self.views[c["view"]]["size"], len(c["private"])  # type: ignore[attr-defined]
        info.faults, info.fault_ns, info.attached = c["faults"], 1000 * c["faults"], int(c["vm"] is not None)  # type: ignore[attr-defined]

    def _cow_bytes(self, c: dict) -> bytearray:
        view = self.views[c["view"]]
        whole = bytearray(self.ffi.buffer(view["buf"], view["size"]))
        for page, data in c["private"].items():
            whole[page * 4096:(page + 1) * 4096] = data
        return whole

    def _sp_cow_read(self, cow: object, offset: int, buf: object, n: int) -> int:
        buf[0:n] = bytes(self._cow_bytes(self.cows[self._key(cow)])[offset:offset + n])  # type: ignore[index]
        return 0

    def _sp_cow_page_is_private(self, cow: object, offset: int) -> int:
        return int(offset // 4096 in self.cows[self._key(cow)]["private"])

    def _sp_whp_vm_map_cow(self, vm: object, cow: object, gpa: int) -> int:
        assert gpa == 0 and self.features & 1, (gpa, self.features)
        if self._claim_vid(vm):
            return -1
        self.vms[self._key(vm)]["cow"] = self._key(cow)
        self.cows[self._key(cow)]["vm"] = self._key(vm)
        return 0

    def _sp_whp_vcpu_set_real_mode(self, vm: object, cs: int, ip: int, sp: int) -> int:
        assert (cs, ip) == (0, 0x100), (cs, ip)
        return 0

    def _play(self, vm: dict, out: object, debug: object) -> None:
        """marker16 or cow16, by the bytes at GPA 0x100; writes as the memory's kind lets them land."""
        from snapproof import guests

        cow = self.cows[vm["cow"]] if vm["cow"] is not None else None
        view = self.views[cow["view"]] if cow else vm["maps"][0]
        memory = self._cow_bytes(cow) if cow else bytearray(self.ffi.buffer(view["buf"], view["size"]))
        code = bytes(memory[0x100:0x120])
        writes = ({0x1000: 0x42} if code.startswith(guests.load("marker16")) else
                  {0x1000: 0x42, 0x1001: 0x43, 0x2000: 0x44} if code.startswith(guests.load("cow16")) else None)
        if writes is None or (not cow and view["mode"] == 2):  # unknown guest, or a store to a read-only view
            out.reason, out.whv_exit_reason, out.mem_gpa = 6, 1, 0x1000  # type: ignore[attr-defined]
            out.mem_access_type, out.rip = 1, 0x102  # type: ignore[attr-defined]
            if writes is None:
                out.debug_len = 2  # type: ignore[attr-defined]
                debug[0:2] = b"ok"  # type: ignore[index]
            return
        for gpa, value in writes.items():
            if cow:
                page = gpa // 4096
                if page not in cow["private"]:
                    cow["private"][page] = memory[page * 4096:(page + 1) * 4096]
                    cow["faults"] += 1
                    out.cow_faults += 1  # type: ignore[attr-defined]
                cow["private"][page][gpa % 4096] = value
            else:
                view["buf"][gpa] = value
        if len(writes) > 1:
            out.debug_len = 2  # type: ignore[attr-defined]
            debug[0:2] = bytes([writes[0x1000], writes[0x1001]])  # type: ignore[index]
        out.reason, out.whv_exit_reason = 1, 8  # type: ignore[attr-defined]

    def _sp_whp_vcpu_run(self, vm: object, timeout_ns: int, flags: int, out: object, debug: object,
                         cap: int) -> int:
        assert timeout_ns > 0 and cap > 2, (timeout_ns, cap)
        self._play(self.vms[self._key(vm)], out, debug)
        return 0

    def _sp_whp_vcpu_get_regs(self, vm: object, out: object) -> int:
        for i in range(18):
            out[i] = i  # type: ignore[index]
        return 0


@pytest.fixture
def fake_windows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """native.whp as on a Windows host, over FakeWindowsLib; yields (install, snapshot-like file)."""
    image = bytearray(64 * 1024)
    image[0x1000] = 0xBE
    path = tmp_path / "snap.bin"
    path.write_bytes(bytes(4096) + image)

    def install(**kw: object) -> FakeWindowsLib:
        fake = FakeWindowsLib(**kw)  # type: ignore[arg-type]
        monkeypatch.setattr(whp, "_native", (fake.ffi, fake))
        as_on_windows = type(sys)("sys_as_on_windows")
        as_on_windows.platform = "win32"  # type: ignore[attr-defined]
        as_on_windows.executable = sys.executable  # type: ignore[attr-defined]
        as_on_windows.maxsize = sys.maxsize  # type: ignore[attr-defined]
        monkeypatch.setattr(whp, "sys", as_on_windows)
        return fake

    return install, path


def test_python_layer_maps_runs_and_reports_through_the_declared_api(fake_windows) -> None:
    """FileView.copy + WhpVm: map RWX at GPA 0, real mode at 0:0x100, run, and an Exit with every field named."""
    install, path = fake_windows
    fake = install()
    assert whp.whp_absent_reason() is None
    with whp.FileView.copy(path) as view, whp.WhpVm(view) as vm:
        assert view.size == 64 * 1024 and view.read(0x1000, 1) == b"\xbe"
        vm.write(0x1000, b"\x42")
        assert view.view[0x1000] == 0x42 and vm.read(0x1000, 1) == b"\x42"
        ex = vm.run(timeout=1.5)
        assert ex.reason is whp.ExitReason.MEMORY_ACCESS and ex.access is whp.MemoryAccessType.WRITE, ex
        assert ex.describe() == "memory access: write at GPA 0x1000 (RIP 0x102)", ex.describe()
        assert ex.debug == b"ok"
        assert vm.regs()["eip"] == 16 and whp.private_usage() == FakeWindowsLib.BASE_COMMIT + view.view_size
        assert view.protection(0x1000) == 0x08
    assert fake.calls.index("sp_whp_vm_destroy") < fake.calls.index("sp_view_close"), fake.calls


def test_python_layer_names_the_failing_call_and_hresult(fake_windows) -> None:
    """A refused WHvMapGpaRange raises WhpError naming the call, the HRESULT in hex and the arguments."""
    install, path = fake_windows
    fake = install(map_hresult=0x80070057)
    with whp.FileView.copy(path) as view, pytest.raises(whp.WhpError) as info:
        whp.WhpVm(view)
    message = str(info.value)
    assert "WHvMapGpaRange" in message and "HRESULT 0x80070057" in message and "gpa=0x0" in message, message
    assert "sp_whp_vm_destroy" in fake.calls, "the half-built partition must be torn down"


def test_python_layer_skips_with_the_c_reason_and_refuses_readonly_writes(fake_windows) -> None:
    """WHP absent: WhpVm raises CapabilityMissing with the C text verbatim; a read-only view takes no writes."""
    install, path = fake_windows
    reason = "WHP absent: WHvGetCapability(WHvCapabilityCodeHypervisorPresent) = FALSE; (as C says it)"
    install(absent=reason)
    assert whp.whp_absent_reason() == reason
    with pytest.raises(CapabilityMissing) as info:
        whp.WhpVm()
    assert str(info.value) == reason
    with whp.FileView.readonly(path) as view:
        with pytest.raises(ValueError, match="read-only"):
            view.write(0x1000, b"\x42")
        with pytest.raises(TypeError):
            view.view[0x1000] = 0x42


def test_python_layer_runs_copy_on_write_memory_and_reads_the_private_pages(fake_windows) -> None:
    """CowMemory: a read-only view, sp_cow_open, mapped copy-on-write; the run's faults and the guest's private pages
    are reported, the snapshot's bytes where it did not write; the partition closes before the memory."""
    from snapproof import guests

    install, path = fake_windows
    fake = install()
    image = bytearray(path.read_bytes())
    image[4096 + 0x100:4096 + 0x106] = guests.load("marker16")
    path.write_bytes(bytes(image))
    with whp.CowMemory.open(path) as mem, whp.WhpVm(mem) as vm:
        assert fake.view_mode == whp.ViewMode.READONLY, "the snapshot must be mapped PAGE_READONLY"
        assert mem.read(0x1000, 1) == b"\xbe" and not mem.is_private(0x1000)
        ex = vm.run(timeout=1.5)
        assert ex.reason is whp.ExitReason.HLT and ex.cow_faults == 1, ex
        assert vm.read(0x1000, 2) == b"\x42\x00" and mem.is_private(0x1000), vm.read(0x1000, 2)
        assert mem.read(0x2000, 1) == b"\x00" and not mem.is_private(0x2000)
        stats = mem.stats()
        assert (stats.private_pages, stats.faults, stats.private_bytes) == (1, 1, 4096), stats
        with pytest.raises(ValueError, match="only guest writes"):
            vm.write(0x1000, b"\x00")
    assert fake.calls.index("sp_whp_vm_destroy") < fake.calls.index("sp_cow_close") < fake.calls.index(
        "sp_view_close"), fake.calls


def test_copy_on_write_memory_skips_without_partial_unmap_and_leaks_nothing(fake_windows) -> None:
    """A host without PartialUnmap: WhpVm(cow memory) is a capability skip naming the bit; the half-built partition
    is deleted and the memory still closes."""
    install, path = fake_windows
    fake = install(features=0)
    with whp.CowMemory.open(path) as mem:
        with pytest.raises(CapabilityMissing, match="PartialUnmap = 0"):
            whp.WhpVm(mem)
        assert "sp_whp_vm_destroy" in fake.calls and "sp_whp_vm_map_cow" not in fake.calls, fake.calls
    assert fake.calls[-2:] == ["sp_cow_close", "sp_view_close"], fake.calls


def test_copy_on_write_memory_refuses_a_copy_view(fake_windows, monkeypatch: pytest.MonkeyPatch) -> None:
    """sp_cow_open takes only a read-only view: the error names it, and the view opened for it is closed again."""
    install, path = fake_windows
    fake = install()
    copy_instead = classmethod(lambda cls, p, offset=whp.IMAGE_OFFSET, size=None: cls(p, whp.ViewMode.COPY, offset,
                                                                                        size))
    monkeypatch.setattr(whp.FileView, "readonly", copy_instead)
    with pytest.raises(whp.WhpError, match="SP_VIEW_READONLY"):
        whp.CowMemory(path)
    assert "sp_cow_open" in fake.calls and fake.calls[-1] == "sp_view_close", fake.calls


# -- the host probe: every way the WHP layer can break is one row, never a traceback ------------------------------


def _whp_rows() -> list:
    from snapproof.native import host

    rep = host.HostReport()
    host._whp_rows(rep)
    return rep.capabilities


def test_host_row_names_a_wrong_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 32-bit or ARM64 Python is a FAIL row naming the interpreter, and nothing is built or loaded."""
    def must_not_load() -> None:
        raise AssertionError("the WHP layer was loaded for an interpreter it cannot run on")

    monkeypatch.setattr(whp, "_load", must_not_load)
    monkeypatch.setattr(whp.platform, "machine", lambda: "ARM64")
    rows = _whp_rows()
    assert [(r.name, r.status.value) for r in rows] == [("whp", "FAIL"), ("whp.partial_unmap", "WARN")], rows
    assert "64-bit ARM64 interpreter" in rows[0].detail and "x64 only" in rows[0].detail, rows[0].detail
    monkeypatch.setattr(whp.platform, "machine", lambda: "AMD64")
    monkeypatch.setattr(whp, "sys", SimpleNamespace(platform="win32", maxsize=2**31 - 1, executable="python.exe"))
    rows = _whp_rows()
    assert "32-bit AMD64 interpreter" in rows[0].detail and rows[0].status.value == "FAIL", rows[0]


@pytest.mark.parametrize("error", ["BuildError", "ImportError", "OSError"])
def test_host_row_names_a_failed_build(monkeypatch: pytest.MonkeyPatch, error: str) -> None:
    """No MSVC, a failed compile, a DLL that does not load: a FAIL row naming the error, with the fix."""
    from snapproof.native.build import BuildError

    exc = {"BuildError": BuildError("building native._windows failed: Microsoft Visual C++ 14.0 or greater is "
                                    "required"),
           "ImportError": ImportError("DLL load failed while importing _windows"),
           "OSError": OSError(193, "%1 is not a valid Win32 application")}[error]

    def broken() -> None:
        raise exc

    monkeypatch.setattr(whp, "unsupported_interpreter", lambda: None)
    monkeypatch.setattr(whp, "whp_absent_reason", broken)
    rows = _whp_rows()
    assert [(r.name, r.status.value) for r in rows] == [("whp", "FAIL"), ("whp.partial_unmap", "WARN")], rows
    assert rows[0].detail.startswith(f"the WHP layer did not build or load: {error}: "), rows[0].detail
    assert "MSVC" in rows[0].hint, rows[0].hint


def test_host_rows_when_whp_is_absent_present_and_without_partial_unmap(fake_windows,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Absent: a FAIL row with the C reason, the PartialUnmap row not probed. Present: PASS, plus the PartialUnmap
    row the COW load needs."""
    from snapproof.native import host

    install, _ = fake_windows
    monkeypatch.setattr(whp, "unsupported_interpreter", lambda: None)
    install(absent="WHP absent: the probe's throwaway partition: (as C says it)")
    rows = _whp_rows()
    assert [(r.name, r.status.value) for r in rows] == [("whp", "FAIL"), ("whp.partial_unmap", "WARN")], rows
    assert rows[0].detail == "absent: WHP absent: the probe's throwaway partition: (as C says it)", rows[0].detail

    install()
    rows = _whp_rows()
    assert [(r.name, r.status.value) for r in rows] == [("whp", "PASS"), ("whp.partial_unmap", "PASS")], rows

    install(features=0)
    rep = host.HostReport()
    host._whp_rows(rep)
    assert [(r.name, r.status.value) for r in rep.capabilities] == [("whp", "PASS"), ("whp.partial_unmap", "WARN")]
    reason = rep.missing("whp.partial_unmap")
    assert reason is not None and "PartialUnmap = 0" in reason, reason
    assert rep.missing("whp") is None and rep.facts["whp_features"] == "0x0", rep.facts


# -- phase 4's WHP tests, run against the model -------------------------------------------------------------------


def _phase4_whp_tests() -> list[str]:
    from phases import test_phase4_cow_load as phase4

    return sorted(name for name in vars(phase4) if name.startswith("test_whp_"))


@pytest.mark.parametrize("name", _phase4_whp_tests())
def test_phase4_whp_test_runs_against_the_python_model(name: str, fake_windows, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each phase-4 WHP test body passes on the API whp.py declares, over FakeWindowsLib (a model, not WHP): it calls
    what exists, keeps one partition mapping memory at a time, closes everything it opened, and its checks hold
    where the model behaves as the documentation says WHP does. Real WHP runs them on a Windows host."""
    import inspect

    from snapproof.native.inject import FaultInjection
    from snapproof.results.record import CaseReport

    from phases import test_phase4_cow_load as phase4

    install, _ = fake_windows
    fake = install()
    # The read-only control runs in a child process, which would be Linux here: give it a child's answer.
    monkeypatch.setattr(whp, "readonly_load_in_child", lambda *a, **k: whp.ReadonlyLoadOutcome(
        returncode=whp.ReadonlyOutcome.MEMORY_ACCESS_EXIT.value,
        exit={"gpa": 0x1000, "access": "WRITE", "describe": "memory access: write at GPA 0x1000"}, output=""))
    monkeypatch.setattr(phase4, "DENSITY_IMAGE", 4 << 20)  # the model copies every view: keep it small
    test = getattr(phase4, name)
    report = CaseReport(name, name)
    args: dict[str, object] = {"report": report, "tmp_path": tmp_path / "phase4"}
    (tmp_path / "phase4").mkdir()
    if "inject" in inspect.signature(test).parameters:
        args["inject"] = FaultInjection(0)
    test(**args)
    assert report.stages and all(st.ok for st in report.stages), [st.to_dict() for st in report.stages]
    assert not (fake.vms or fake.cows or fake.views), (
        f"left open: {len(fake.vms)} partitions, {len(fake.cows)} copy-on-write memories, {len(fake.views)} views")
