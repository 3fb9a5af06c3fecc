# triple32: a guest that triple-faults (tests/test_reliability_guest_exits.py).
# Flat 32-bit at 0x1000. It loads an IDT of limit 0 and raises #UD: the #UD
# vector lies beyond the limit (#GP), so does #GP's (#DF), and so does #DF's:
# the CPU shuts down and KVM_RUN returns KVM_EXIT_SHUTDOWN. The hlt after ud2
# is never reached.
        .code32
        .text
        .globl _start
_start:
        movl    $0, 0x0ff0      # IDTR image at GPA 0xff0, just below the code:
        movw    $0, 0x0ff4      # limit 0 (bytes 0-1), base 0 (bytes 2-5)
        lidt    0x0ff0
        ud2                     # the exception
        hlt
        jmp     .-1
