"""cffi builder for ``native._linux``: the KVM VM, memory helpers and the uffd WP engine.

The declarations come from ``native/linux/snapproof.h`` (between its CDEF
markers), so C and Python share one contract and a mismatch fails to compile.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

LINUX_DIR = Path(__file__).resolve().parent / "linux"
SOURCES = sorted(LINUX_DIR.glob("*.c"))
HEADERS = sorted(LINUX_DIR.glob("*.h"))


def _cdef_text() -> str:
    text = (LINUX_DIR / "snapproof.h").read_text()
    return text.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "snapproof.native._linux",
    '#include "snapproof.h"',
    sources=[str(p) for p in SOURCES],
    include_dirs=[str(LINUX_DIR)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"],
    libraries=["pthread", "rt"],
)
