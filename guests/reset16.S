# reset16: the firmware that enters the flat 32-bit guests under QEMU (native/qemu.py).
#
# A PC starts in real mode at the reset vector, CS base 0xFFFF0000, IP 0xFFF0: the last
# 16 bytes of the firmware ROM, which QEMU maps at the top of 4 GiB. guests.rom_image pads
# this code at the front to a 64 KiB ROM, so its last 16 bytes (`reset`, a `jmp` back to
# `_start`, both relative to CS) are the reset vector wherever the code lands.
#
# It enters the contract of the flat 32-bit guests (guests/README.md) as snapproof's own
# VMM sets it up with KVM's registers: a GDT in RAM at 0x600 (null, flat 4 GiB code 0x08,
# flat 4 GiB data 0x10), CR0.PE on, every data segment 0x10, ESI = the parameter block at
# 0x8000, ESP = 0x7000, then a far jump to the guest's code at 0x1000. No BIOS runs: the
# guest is all the host put in RAM before QEMU started. Plain 16-bit code apart from the
# 32-bit operands the GDT pointer and the far jump need.

        .set    GDT_GPA,    0x600
        .set    GDTR_GPA,   0x620
        .set    CODE_SEL,   0x08
        .set    DATA_SEL,   0x10
        .set    BLOCK_GPA,  0x8000  # guests.PARAM_BLOCK_GPA: vCPU 0's parameter block
        .set    STACK_TOP,  0x7000
        .set    ENTRY_GPA,  0x1000  # guests.FLAT32_LOAD_GPA

        .code16
        .text
        .globl  _start
_start:
        cli
        xorw    %ax, %ax
        movw    %ax, %ds                          # DS base 0: the stores below name GPAs
        movl    $0, GDT_GPA                       # 0x00: null
        movl    $0, GDT_GPA + 4
        movl    $0x0000ffff, GDT_GPA + 8          # 0x08: base 0, limit 4 GiB, code, 32-bit
        movl    $0x00cf9a00, GDT_GPA + 12
        movl    $0x0000ffff, GDT_GPA + 16         # 0x10: base 0, limit 4 GiB, data
        movl    $0x00cf9200, GDT_GPA + 20
        movw    $23, GDTR_GPA                     # limit: 3 descriptors
        movl    $GDT_GPA, GDTR_GPA + 2
        lgdtl   GDTR_GPA
        movl    %cr0, %eax
        orl     $1, %eax
        movl    %eax, %cr0                        # protected mode; CS keeps its real-mode cache until the jump
        movw    $DATA_SEL, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %fs
        movw    %ax, %gs
        movw    %ax, %ss
        movl    $BLOCK_GPA, %esi
        movl    $STACK_TOP, %esp
        ljmpl   $CODE_SEL, $ENTRY_GPA             # flat 32-bit at the guest's entry

        .balign 16, 0xf4
reset:                                            # the reset vector: the ROM's last 16 bytes
        jmp     _start
        .balign 16, 0xf4
