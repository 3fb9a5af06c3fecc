"""Self-tests of the Windows native layer that run on Linux.

No Windows here: native/windows/ci.sh cross-compiles the C with mingw-w64 and
runs selftest.exe under wine: file views, the read-only control, every branch
of the WHP probe, and the run loop against a stand-in WinHvPlatform.dll that
interprets a few real-mode instructions (fake_whp.c). The rest checks, without
compiling, that the Python side agrees with the C header and that the shared
modules import where Linux-only modules do not exist. Real WHP needs a Windows
host: phase 4 and selftest.exe run there.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from native import whp
from native.errors import CapabilityMissing

ROOT = Path(__file__).resolve().parent.parent
WINDOWS_DIR = ROOT / "native" / "windows"
HEADER = WINDOWS_DIR / "snapproof_win.h"
# Cold wine prefixes take a while on CI runners; pyproject's 120 s ceiling is for guests.
WINE_TIMEOUT = 900

# -- helpers -----------------------------------------------------------------------------------------------


def _missing_cross_tool() -> str | None:
    for tool, package in (("x86_64-w64-mingw32-gcc", "gcc-mingw-w64-x86-64"), ("wine", "wine wine64")):
        if shutil.which(tool) is None:
            return f"{tool} not on PATH (Debian: apt-get install {package}; or run native/windows/ci.sh --install)"
    return None


def _absent_templates() -> dict[str, str]:
    """The SP_WHP_ABSENT_* printf formats of snapproof_win.h, as C would concatenate them."""
    text = HEADER.read_text()
    out = {}
    for m in re.finditer(r"#define (SP_WHP_ABSENT_\w+)((?:\s*\\?\n?\s*\"(?:[^\"\\]|\\.)*\")+)", text):
        literals = re.findall(r"\"((?:[^\"\\]|\\.)*)\"", m[2])
        out[m[1]] = "".join(literals).replace('\\"', '"')
    return out


def _template_regex(fmt: str) -> re.Pattern[str]:
    """A printf format as a regex: the fixed text exact, each directive a plausible value."""
    directive = {"%lu": r"\d+", "%s": r"\w+", "%08lx": r"[0-9a-f]{8}"}
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


# Against fake_whp.c mode 4 (a toy partition): whp_vm.c's loop, watchdog and cancel run; WHP itself does not.
RUN_LOOP_CHECKS = [
    "whp run marker16",
    "whp guest sees its write",
    "whp partitions isolated",
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
    "whp read-only load fails like the original bug",
]


@pytest.mark.timeout(WINE_TIMEOUT)
@pytest.mark.parametrize("check", RUN_LOOP_CHECKS)
def test_run_loop_check_passes_against_the_stand_in_partition(wine_selftest: str, check: str) -> None:
    """whp_vm.c's run loop handles each exit as documented, driven by fake_whp.c under wine (not real WHP)."""
    assert "info whp: a stand-in WinHvPlatform.dll" in wine_selftest, "the mode-4 run did not happen"
    lines = [line for line in wine_selftest.splitlines() if re.match(rf"^\w+\s+{re.escape(check)}:", line)]
    assert lines, f"selftest.exe printed no line for {check!r}"
    assert all(line.startswith("ok ") for line in lines), "\n".join(lines)


@pytest.mark.timeout(WINE_TIMEOUT)
def test_each_whp_probe_branch_reports_its_header_reason(wine_selftest: str) -> None:
    """DLL missing, export missing, WHvGetCapability failing, HypervisorPresent FALSE: four texts, in order."""
    templates = _absent_templates()
    expected = ["SP_WHP_ABSENT_NO_DLL", "SP_WHP_ABSENT_NO_EXPORT", "SP_WHP_ABSENT_CAPABILITY_FAILED",
                "SP_WHP_ABSENT_NOT_PRESENT"]
    assert sorted(templates) == sorted(expected), f"snapproof_win.h defines {sorted(templates)}"
    seen = [line.split(": ", 1)[1] for line in wine_selftest.splitlines()
            if line.startswith("whp-absent-reason: ") and "(none: WHP is present)" not in line]
    assert len(seen) == len(expected), f"expected {len(expected)} whp-absent-reason lines, saw {seen}"
    for name, reason in zip(expected, seen, strict=True):
        assert _template_regex(templates[name]).fullmatch(reason), f"{name}: {templates[name]!r}\n saw {reason!r}"


# -- one contract, read from the header -----------------------------------------------------------------------


def test_absent_reason_text_is_defined_only_in_the_header() -> None:
    """The skip texts live in snapproof_win.h alone: Python returns the C string, the self-test prints it."""
    fragments = [max(re.split(r"%\w+", fmt), key=len) for fmt in _absent_templates().values()]
    for path in [ROOT / "native" / "whp.py", *WINDOWS_DIR.glob("*.c")]:
        text = path.read_text()
        copies = [f for f in fragments if f in text]
        assert not copies, f"{path.relative_to(ROOT)} repeats reason text {copies}: use the SP_WHP_ABSENT_* macros"


def test_python_constants_match_the_c_enums() -> None:
    """native/whp.py spells the C enum values out (it must import off Windows); they match the header."""
    header = _header_enum_values()
    wrong = {k: (v, header.get(k)) for k, v in whp._C_CONSTANTS.items() if header.get(k) != v}
    assert not wrong, f"Python value vs snapproof_win.h: {wrong}"


def test_every_lib_name_whp_uses_is_declared_in_the_cdef() -> None:
    """A name whp.py calls on ``lib`` but the cdef lacks would only fail on Windows, at run time."""
    import native._windows_build as builder

    cdef = builder._cdef_text()
    used = set(re.findall(r"\blib\.(\w+)", (ROOT / "native" / "whp.py").read_text()))
    undeclared = sorted(n for n in used if not re.search(rf"\b{n}\b", cdef))
    assert not undeclared, f"used by native/whp.py, not declared between the CDEF markers: {undeclared}"


def test_windows_builder_parses_and_compiles_only_the_extension_sources(tmp_path: Path) -> None:
    """cffi accepts the cdef and emits C; the CI-only selftest.c and fake_whp.c stay out of the extension."""
    import native._windows_build as builder

    names = sorted(p.name for p in builder.SOURCES)
    assert names == ["common.c", "file_view.c", "whp_vm.c"], f"extension sources: {names}"
    builder.ffibuilder.emit_c_code(str(tmp_path / "_windows.c"))
    assert "sp_whp_vcpu_run" in (tmp_path / "_windows.c").read_text()


# -- portability of the Python side --------------------------------------------------------------------------

# The Linux backend (docs/CONTRACTS.md), plus the stdlib modules Windows lacks.
LINUX_ONLY = ["fcntl", "resource", "termios", "native._linux", "native._lib", "native.kvm", "native.wp",
              "native.memory", "native.live"]
SHARED_MODULES = ["native", "native.errors", "native.build", "native.image", "native.whp", "native._windows_build",
                  "native.host", "guests", "guests.storm", "guests.counter", "results.hostpolicy"]

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
assert "native._windows" not in sys.modules, "importing must not load the compiled Windows module"
"""


def _module_exists(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@pytest.mark.parametrize("module", [m for m in SHARED_MODULES if _module_exists(m)])
def test_shared_module_imports_without_linux_only_modules(module: str) -> None:
    """The modules Windows runs import with fcntl, resource, termios and the KVM backend out of reach."""
    proc = subprocess.run([sys.executable, "-c", _IMPORT_GUARD, str(ROOT), module, ",".join(LINUX_ONLY)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, f"import {module}:\n{proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}"


def test_whp_modules_type_check_for_win32() -> None:
    """mypy --platform win32 accepts native/, phases/ and every shared module."""
    if shutil.which("mypy") is None:
        raise CapabilityMissing("mypy not on PATH (pip install -e .[dev])")
    # Everything shared, and the Linux-only modules too: they raise ImportError on win32 before their code.
    files = ["native", "phases", "conftest.py", "guests", "results"]
    proc = subprocess.run(["mypy", "--platform", "win32", *files], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
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


def test_readonly_outcome_recognises_the_original_bug() -> None:
    """An access-violation death, or a write memory-access exit, is the original bug; a clean halt is not."""
    av = whp.ReadonlyLoadOutcome(returncode=0xC0000005, exit=None, output="")
    signed_av = whp.ReadonlyLoadOutcome(returncode=0xC0000005 - 2**32, exit=None, output="")
    mem = whp.ReadonlyLoadOutcome(returncode=0, exit={"reason": "MEMORY_ACCESS", "access": "WRITE"}, output="")
    halted = whp.ReadonlyLoadOutcome(returncode=0, exit={"reason": "HLT", "access": None}, output="")
    assert av.failed_like_original_bug and signed_av.failed_like_original_bug and mem.failed_like_original_bug
    assert not halted.failed_like_original_bug, halted.describe()
    assert "STATUS_ACCESS_VIOLATION" in av.describe()


# -- the Python layer over a stand-in for native._windows ------------------------------------------------------


class FakeWindowsLib:
    """What ``native._windows.lib`` would be, in Python, so native/whp.py runs off Windows.

    Every call is checked against the cdef's parameter count, and structs come
    from an ABI-mode FFI of the same cdef, so a misspelt field or a missing
    argument in whp.py fails here instead of on the first Windows host.
    """

    def __init__(self, image: bytes, absent: str | None = None, map_hresult: int = 0) -> None:
        from cffi import FFI

        import native._windows_build as builder

        self.ffi = FFI()
        self.ffi.cdef(builder._cdef_text())
        self._decls = {k.split(" ", 1)[1]: v[0] for k, v in self.ffi._parser._declarations.items()
                       if k.startswith("function ")}
        self.memory = self.ffi.new("uint8_t[]", image)
        self.absent = self.ffi.new("char[]", absent.encode()) if absent else self.ffi.NULL
        self.map_hresult = map_hresult
        self.last = ("", 0, 0)
        self.calls: list[str] = []

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

    def _fail(self, op: str, code: int, hresult: bool) -> int:
        self.last = (op, code, int(hresult))
        return -1

    def _sp_win_last_op(self) -> object:
        return self.ffi.new("char[]", self.last[0].encode())

    def _sp_win_last_error(self) -> int:
        return self.last[1]

    def _sp_win_last_is_hresult(self) -> int:
        return self.last[2]

    def _sp_whp_absent_reason(self) -> object:
        return self.absent

    def _sp_win_private_usage(self, out: object) -> int:
        out[0] = 5 << 20  # type: ignore[index]
        return 0

    def _sp_win_quiet_crashes(self) -> None:
        pass

    def _sp_view_open(self, path: str, mode: int, offset: int, size: int, out: object) -> int:
        assert isinstance(path, str) and mode in (1, 2) and offset == 4096, (path, mode, offset)
        self.view_size = size
        out[0] = self.ffi.cast("struct sp_view *", 0x10)  # type: ignore[index]
        return 0

    def _sp_view_get_info(self, view: object, info: object) -> None:
        addr = int(self.ffi.cast("uintptr_t", self.memory))
        info.addr, info.size, info.base, info.map_offset = addr, self.view_size, addr - 4096, 0  # type: ignore[attr-defined]
        info.view_size, info.mode = self.view_size + 4096, 1  # type: ignore[attr-defined]

    def _sp_view_page_protection(self, view: object, offset: int, out: object) -> int:
        out[0] = 0x08  # type: ignore[index]
        return 0

    def _sp_view_close(self, view: object) -> None:
        pass

    def _sp_whp_vm_create(self, out: object) -> int:
        out[0] = self.ffi.cast("struct sp_whp_vm *", 0x20)  # type: ignore[index]
        return 0

    def _sp_whp_vm_destroy(self, vm: object) -> None:
        pass

    def _sp_whp_vm_map(self, vm: object, hva: int, gpa: int, size: int, flags: int) -> int:
        if self.map_hresult:
            return self._fail("WHvMapGpaRange", self.map_hresult, True)
        assert hva == int(self.ffi.cast("uintptr_t", self.memory)) and gpa == 0 and flags == 7, (hva, gpa, flags)
        return 0

    def _sp_whp_vcpu_set_real_mode(self, vm: object, cs: int, ip: int, sp: int) -> int:
        assert (cs, ip) == (0, 0x100), (cs, ip)
        return 0

    def _sp_whp_vcpu_run(self, vm: object, timeout_ns: int, flags: int, out: object, debug: object,
                         cap: int) -> int:
        assert timeout_ns == 1_500_000_000 and cap > 2, (timeout_ns, cap)
        out.reason, out.whv_exit_reason, out.mem_gpa = 6, 1, 0x1000  # type: ignore[attr-defined]
        out.mem_access_type, out.debug_len, out.rip = 1, 2, 0x102  # type: ignore[attr-defined]
        debug[0:2] = b"ok"  # type: ignore[index]
        return 0

    def _sp_whp_vcpu_get_regs(self, vm: object, out: object) -> int:
        for i in range(18):
            out[i] = i  # type: ignore[index]
        return 0


@pytest.fixture
def fake_windows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """native.whp as on a Windows host, over FakeWindowsLib; yields (fake lib, snapshot-like file)."""
    image = bytearray(64 * 1024)
    image[0x1000] = 0xBE
    path = tmp_path / "snap.bin"
    path.write_bytes(bytes(4096) + image)

    def install(**kw: object) -> FakeWindowsLib:
        fake = FakeWindowsLib(bytes(image), **kw)  # type: ignore[arg-type]
        monkeypatch.setattr(whp, "_native", (fake.ffi, fake))
        monkeypatch.setattr(whp, "sys", type(sys)("sys_as_on_windows"))
        whp.sys.platform = "win32"  # type: ignore[misc]
        whp.sys.executable = sys.executable  # type: ignore[misc]
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
        assert vm.regs()["eip"] == 16 and whp.private_usage() == 5 << 20
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
