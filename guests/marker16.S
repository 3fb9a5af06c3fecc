# marker16: the guest of the original proof (forkd v0.4, proof 2).
# Real mode, loaded at 0:0x100. It stores 0x42 at GPA 0x1000 and halts, so
# the host can plant a BEFORE marker (0xBE) there and tell by one byte
# whether a snapshot caught memory before or after the guest's write.
        .code16
        .text
        .globl _start
_start:
        movb    $0x42, %al
        movb    %al, 0x1000     # the one write the WP handler must catch
        hlt
