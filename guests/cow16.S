# cow16: a guest for the copy-on-write loads (phase 4, native/windows/selftest.c).
# Real mode, loaded at 0:0x100. Two pages written, the first twice, and what
# the guest reads back of its own writes goes out of the debug port, so the
# host sees the guest's view and not only its own:
#   0x42 -> [0x1000]   first store to page 1: a copy-on-write fault
#   0x43 -> [0x1001]   page 1 again: already private, no fault
#   out 0xE9 <- [0x1000], [0x1001]   0x42 0x43: the guest sees its writes
#   0x44 -> [0x2000]   first store to page 2: the second fault
# Byte for byte what the stand-in WHP (fake_whp.c) interprets.
        .code16
        .text
        .globl _start
_start:
        movb    $0x42, %al
        movb    %al, 0x1000
        movb    $0x43, %al
        movb    %al, 0x1001
        movb    0x1000, %al
        outb    %al, $0xE9
        movb    0x1001, %al
        outb    %al, $0xE9
        movb    $0x44, %al
        movb    %al, 0x2000
        hlt
