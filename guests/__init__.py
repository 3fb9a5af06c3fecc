"""Guest programs: flat binaries with their GNU as source beside them.

The committed ``.bin`` is what runs (a Windows host needs no assembler);
``assemble()`` rebuilds it from the ``.S`` so a self-test can prove the two
agree.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent

# Where guests live and talk, shared by KVM and WHP (docs/CONTRACTS.md).
REAL_MODE_LOAD_GPA = 0x100
FLAT32_LOAD_GPA = 0x1000
PARAM_BLOCK_GPA = 0x8000
PARAM_BLOCK_STRIDE = 0x100
DATA_REGION_GPA = 0x10000
DEBUG_PORT = 0xE9
SYNC_PORT = 0x500

# marker16's contract with the host (ORIGINS.md, proof 2).
MARKER_GPA = 0x1000
MARKER_BEFORE = 0xBE
MARKER_AFTER = 0x42


def source_path(name: str) -> Path:
    return GUEST_DIR / f"{name}.S"


def binary_path(name: str) -> Path:
    return GUEST_DIR / f"{name}.bin"


def load(name: str) -> bytes:
    """The committed flat binary of guest ``name``."""
    path = binary_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"guest {name!r}: no binary at {path}")
    return path.read_bytes()


# reset16 (guests/reset16.S) as the firmware ROM of a QEMU PC: a PC's ROM is a whole number of 64 KiB.
ROM_SIZE = 0x10000
RESET_VECTOR_SIZE = 16  # the ROM's last 16 bytes: where a PC starts (CS base 0xFFFF0000, IP 0xFFF0)


def rom_image(name: str = "reset16", size: int = ROM_SIZE) -> bytes:
    """Guest ``name`` as a firmware ROM of ``size`` bytes: at its end, so its last 16 bytes are the reset
    vector; `hlt` before it, so a stray jump into the padding halts."""
    code = load(name)
    if len(code) > size or len(code) % RESET_VECTOR_SIZE:
        raise ValueError(f"guest {name!r} is {len(code)} bytes: a ROM's code must fit {size:#x} bytes and end on a "
                         f"{RESET_VECTOR_SIZE}-byte reset vector")
    return b"\xf4" * (size - len(code)) + code


def names() -> list[str]:
    return sorted(p.stem for p in GUEST_DIR.glob("*.S"))


def assembler_missing() -> str | None:
    """Why ``assemble`` cannot run here, or None."""
    for tool in ("as", "objcopy"):
        if shutil.which(tool) is None:
            return f"GNU binutils '{tool}' not on PATH (Debian: apt-get install binutils)"
    return None


def assemble(name: str) -> bytes:
    """Assemble ``guests/<name>.S`` into a flat binary with GNU as + objcopy."""
    src = source_path(name)
    with tempfile.TemporaryDirectory(prefix="snapproof-guest-") as tmp:
        obj = Path(tmp) / f"{name}.o"
        flat = Path(tmp) / f"{name}.bin"
        subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True, capture_output=True, timeout=30)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(flat)],
                       check=True, capture_output=True, timeout=30)
        return flat.read_bytes()


def main(argv: list[str] | None = None) -> int:
    """``python -m snapproof.guests [NAME...]``: rebuild the committed binaries from source."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    for name in args or names():
        data = assemble(name)
        binary_path(name).write_bytes(data)
        print(f"{name}: {len(data)} bytes -> {binary_path(name)}")
    return 0
