# spin16: a guest that never halts (tests/test_reliability_guest_exits.py).
# Real mode at 0:0x100. EB FE is `jmp .` in 16- and 32-bit mode alike, so the
# same two bytes also spin when loaded at 0x1000 in flat 32-bit mode.
        .code16
        .text
        .globl _start
_start:
        jmp     .               # forever: only the run's deadline ends it
