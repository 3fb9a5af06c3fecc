"""cffi builder for ``native._windows``: WHP partitions, file views and the run loop.

Only used on Windows (``snapproof build`` picks it there). The
declarations come from ``native/windows/snapproof_win.h`` (between its CDEF
markers), so C and Python share one contract and a mismatch fails to compile.
WinHvPlatform.dll is loaded by the C at run time, not linked, so a host
without WHP still imports the module and gets the "WHP absent" reason.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

WINDOWS_DIR = Path(__file__).resolve().parent / "windows"
# selftest.c (its own main) and fake_whp.c (a stand-in DLL) belong to the wine CI, not the extension.
SOURCES = [WINDOWS_DIR / name for name in ("common.c", "file_view.c", "whp_vm.c", "cow.c")]
HEADER = WINDOWS_DIR / "snapproof_win.h"


def _cdef_text() -> str:
    text = HEADER.read_text()
    return text.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "snapproof.native._windows",
    '#include "snapproof_win.h"',
    sources=[str(p) for p in SOURCES],
    include_dirs=[str(WINDOWS_DIR)],
    # MSVC: warnings on, but not /WX: the SDK headers are not /W4-clean. The same C
    # builds with mingw-w64 -Wall -Wextra -Werror in CI (native/windows/ci.sh).
    extra_compile_args=["/W3"],
    libraries=["psapi"],
)
