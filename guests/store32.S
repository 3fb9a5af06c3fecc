# store32: two u32 stores at GPAs the host chooses, then hlt (tests/test_guest_memory_layout.py).
#
# 32-bit flat protected mode, loaded and entered at 0x1000, ESI = GPA of its
# parameter block. It stores first_value at first_gpa, then second_value at
# second_gpa, then halts. A store to a GPA no memslot covers ends the run
# with KVM_EXIT_MMIO instead (the host sees the GPA and the length), so the
# host learns from the guest itself where RAM ends. Plain 32-bit integer
# code, no stack.

        .set    P_FIRST_GPA,     0x00  # u32 GPA of the first store
        .set    P_FIRST_VALUE,   0x04  # u32 stored there
        .set    P_SECOND_GPA,    0x08  # u32 GPA of the second store
        .set    P_SECOND_VALUE,  0x0C  # u32 stored there

        .code32
        .text
        .globl  _start
_start:
        movl    P_FIRST_GPA(%esi), %edi
        movl    P_FIRST_VALUE(%esi), %eax
        movl    %eax, (%edi)
        movl    P_SECOND_GPA(%esi), %edi
        movl    P_SECOND_VALUE(%esi), %eax
        movl    %eax, (%edi)
halt:
        hlt
        jmp     halt                    # a spurious wake-up halts again
