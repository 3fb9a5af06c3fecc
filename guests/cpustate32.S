# cpustate32: a guest whose running result lives in vCPU state beyond the general registers, for
# proofs that a snapshot saves and restores a vCPU's whole state.
#
# 32-bit flat protected mode, loaded and entered at 0x1000, ESI = GPA of this vCPU's parameter
# block (layout below; guests/cpustate.py packs it and models the result), ESP = its stack.
# Setup: a GDT and an IDT of its own (an NMI handler), x87/SSE on (CR0.EM off, CR4.OSFXSR), and,
# when the block's xcr0 is not 0, CR4.OSXSAVE and XCR0 = xcr0 (the vCPU's CPUID must offer XSAVE).
# DR0-DR3, XMM0, MM0 (the x87 register R0) and IA32_SYSENTER_EIP get the block's seeds.
# Iteration i = 1 .. iterations, with m = SYSENTER_EIP and XMM0 = lanes (a, b, c, d):
#   a = rol(a, 5) ^ (i + m);  b += a;  c ^= b;  d += c                  (u32 lanes of XMM0)
#   mm += d + (i << 32)                                                (u64 in MM0)
#   m = rol(m, 3) + low32(mm)                                          (SYSENTER_EIP)
# so the result depends on every iteration's XMM0, MM0 and MSR value: a resumed run that lost one
# of them (or got another vCPU's) ends elsewhere.
#
# Sync port 0x500: after iteration sync_at (0 = never) it writes sync_at, the guest-chosen point a
# host snapshots at. The host answers with one NMI (KVM_NMI); the handler counts it and records the
# iteration, so the guest's result also depends on the NMI the vCPU's events hold pending. At the
# end XMM0, MM0, SYSENTER_EIP and DR0-DR3 go to the block, then DONE_MAGIC, then hlt.
#
# Only instructions KVM's own instruction emulator executes, so the guest runs where KVM emulates
# every guest instruction (kvm_pvm): XMM and MMX registers are only loaded and stored (movdqu,
# movq), the arithmetic is done in general registers on the block's round-trip slots (which the
# register is written to and read back from each iteration: the value lives in the register). No
# xgetbv (XCR0 is checked by reading the restored vCPU back) and no protected-mode iret: the NMI
# handler returns with `ret $8`, dropping CS and EFLAGS (no later code needs them), and NMIs stay
# blocked afterwards, which this guest never minds (the host sends one).

        .set    P_ITERS,      0x00  # u32 iterations to run
        .set    P_SYNC_AT,    0x04  # u32 iteration after which to write the sync port; 0 = never
        .set    P_XCR0,       0x08  # u32 0 = leave XSAVE off; else CR4.OSXSAVE on and XCR0 = this
        .set    P_MSR_INIT,   0x0C  # u32 SYSENTER_EIP's first value
        .set    P_XMM_INIT,   0x10  # 4 x u32 XMM0's first lanes a, b, c, d
        .set    P_MM_INIT,    0x20  # u64 MM0's first value
        .set    P_DR_INIT,    0x28  # 4 x u32 DR0-DR3
        .set    P_XMM,        0x40  # 4 x u32 guest: XMM0's round trip (a working copy, rewritten from XMM0 each time)
        .set    P_MM,         0x50  # u64 guest: MM0's round trip
        .set    P_ITER,       0x58  # u32 guest: last iteration done (trace, never read back)
        .set    P_NMIS,       0x5C  # u32 guest: NMIs taken
        .set    P_NMI_AT,     0x60  # u32 guest: the iteration the last NMI came after
        .set    P_MSR_FINAL,  0x64  # u32 guest at the end: SYSENTER_EIP
        .set    P_XMM_FINAL,  0x68  # 4 x u32 guest at the end: XMM0
        .set    P_MM_FINAL,   0x78  # u64 guest at the end: MM0
        .set    P_DR_FINAL,   0x80  # 4 x u32 guest at the end: DR0-DR3
        .set    P_DONE,       0x90  # u32 guest: DONE_MAGIC, written last before hlt

        .set    DONE_MAGIC,   0x454e4f44    # "DONE" little-endian
        .set    SYNC_PORT,    0x500
        .set    MSR_SYSENTER_EIP, 0x176
        .set    LOAD,         0x1000        # where the host loads the guest: absolute addresses below add it
        .set    CR0_MP,       0x02
        .set    CR0_EM,       0x04
        .set    CR0_NE,       0x20
        .set    CR4_OSFXSR,   0x200
        .set    CR4_OSXMMEXCPT, 0x400
        .set    CR4_OSXSAVE,  0x40000

        .code32
        .text
        .globl  _start
_start:
        jmp     setup                   # past the NMI handler and the tables, which sit first so the
                                        # code can end in hlt; jmp .-1 like the other guests

nmi:
        incl    P_NMIS(%esi)            # ESI is the block everywhere after the entry
        movl    %ebx, P_NMI_AT(%esi)
        ret     $8                      # pop EIP, drop CS and EFLAGS (see the header: no iret)

# Descriptor tables, read only by the CPU. The accessed bits are set so loading a selector never
# writes here.
        .p2align 3
gdt:
        .quad   0
        .quad   0x00cf9b000000ffff      # 0x08: code, base 0, limit 4 GiB, 32-bit, accessed
        .quad   0x00cf93000000ffff      # 0x10: data, base 0, limit 4 GiB, accessed
gdtr:
        .word   gdtr - gdt - 1
        .long   gdt - _start + LOAD
        .p2align 3
idt:
        .quad   0                       # vector 0 (#DE): absent; any exception but the NMI triple-faults
        .quad   0                       # vector 1 (#DB)
        .word   nmi - _start + LOAD     # vector 2 (NMI): 32-bit interrupt gate to CS 0x08
        .word   0x08
        .word   0x8e00
        .word   0
idtr:
        .word   idtr - idt - 1
        .long   idt - _start + LOAD

setup:
        lgdt    (gdtr - _start + LOAD)
        lidt    (idtr - _start + LOAD)  # delivering the NMI loads CS 0x08 from this GDT
        movl    %cr0, %eax
        andl    $~CR0_EM, %eax
        orl     $(CR0_MP | CR0_NE), %eax
        movl    %eax, %cr0
        movl    %cr4, %eax
        orl     $(CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
        movl    %eax, %cr4
        movl    P_XCR0(%esi), %eax
        testl   %eax, %eax
        jz      1f
        movl    %cr4, %edx
        orl     $CR4_OSXSAVE, %edx
        movl    %edx, %cr4
        xorl    %ecx, %ecx              # XCR0
        xorl    %edx, %edx
        xsetbv
1:
        movl    P_DR_INIT+0(%esi), %eax
        movl    %eax, %dr0
        movl    P_DR_INIT+4(%esi), %eax
        movl    %eax, %dr1
        movl    P_DR_INIT+8(%esi), %eax
        movl    %eax, %dr2
        movl    P_DR_INIT+12(%esi), %eax
        movl    %eax, %dr3
        fninit
        movq    P_MM_INIT(%esi), %mm0
        movdqu  P_XMM_INIT(%esi), %xmm0
        movl    P_MSR_INIT(%esi), %eax
        xorl    %edx, %edx
        movl    $MSR_SYSENTER_EIP, %ecx
        wrmsr
        xorl    %ebx, %ebx              # i = 0 iterations done

iter:
        cmpl    P_ITERS(%esi), %ebx
        jae     done
        incl    %ebx
        movl    $MSR_SYSENTER_EIP, %ecx
        rdmsr
        movl    %eax, %edi              # m
        movdqu  %xmm0, P_XMM(%esi)
        movl    P_XMM+0(%esi), %eax
        roll    $5, %eax
        leal    (%ebx,%edi), %edx
        xorl    %edx, %eax
        movl    %eax, P_XMM+0(%esi)     # a = rol(a, 5) ^ (i + m)
        addl    %eax, P_XMM+4(%esi)     # b += a
        movl    P_XMM+4(%esi), %eax
        xorl    %eax, P_XMM+8(%esi)     # c ^= b
        movl    P_XMM+8(%esi), %eax
        addl    %eax, P_XMM+12(%esi)    # d += c
        movdqu  P_XMM(%esi), %xmm0
        movq    %mm0, P_MM(%esi)
        movl    P_XMM+12(%esi), %eax
        addl    %eax, P_MM+0(%esi)
        adcl    %ebx, P_MM+4(%esi)      # mm += d + (i << 32)
        movq    P_MM(%esi), %mm0
        movl    %edi, %eax
        roll    $3, %eax
        addl    P_MM+0(%esi), %eax      # m = rol(m, 3) + low32(mm)
        xorl    %edx, %edx
        movl    $MSR_SYSENTER_EIP, %ecx
        wrmsr
        movl    %ebx, P_ITER(%esi)
        cmpl    P_SYNC_AT(%esi), %ebx
        jne     iter
        movl    %ebx, %eax
        movw    $SYNC_PORT, %dx
        outl    %eax, (%dx)             # the guest-chosen point; the host answers with an NMI here
        jmp     iter                    # flags are set anew before use: the NMI handler clobbers them

done:
        movdqu  %xmm0, P_XMM_FINAL(%esi)
        movq    %mm0, P_MM_FINAL(%esi)
        movl    $MSR_SYSENTER_EIP, %ecx
        rdmsr
        movl    %eax, P_MSR_FINAL(%esi)
        movl    %dr0, %eax
        movl    %eax, P_DR_FINAL+0(%esi)
        movl    %dr1, %eax
        movl    %eax, P_DR_FINAL+4(%esi)
        movl    %dr2, %eax
        movl    %eax, P_DR_FINAL+8(%esi)
        movl    %dr3, %eax
        movl    %eax, P_DR_FINAL+12(%esi)
        movl    $DONE_MAGIC, P_DONE(%esi)
halt:
        hlt
        jmp     halt                    # a spurious wake-up halts again
