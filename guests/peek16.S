# peek16: what a guest reads. Real mode, loaded at 0:0x100. It reads the byte at GPA 0x1000 and
# sends it to the debug port, then the same for GPA 0x2000, and halts: the host sees, byte for
# byte, what the guest saw in two pages it never wrote (a page a loader never restored, say).
        .code16
        .text
        .globl _start
_start:
        movb    0x1000, %al
        outb    %al, $0xe9
        movb    0x2000, %al
        outb    %al, $0xe9
        hlt
