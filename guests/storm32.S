# storm32: the write-storm guest (issue 3).
#
# 32-bit flat protected mode, loaded and entered at 0x1000, ESI = GPA of this
# vCPU's parameter block (layout below; guests/storm.py packs it). Each
# generation g = 1, 2, ... sweeps every page of the region once, in an order
# the host reproduces from the block: start_g = (start0 + (g-1)*step) mod
# npages, then idx += stride (mod npages), stride coprime with npages so the
# sweep visits each page exactly once. Into each page it writes a stamp
# (g, idx) at its first 8 bytes and again at its last 8 bytes.
#
# Store order per page is the contract with the oracle: idx at +4, g at +0,
# idx at +4092, g at +4088. The generation stores are the linearization
# points; the idx store before each one only ever rewrites the value it
# already holds, except in generation 1 where it turns 0 into idx one store
# early (the oracle allows that for the one slot in flight).
#
# After each sweep: out %eax -> port 0x500 with eax = g. After `generations`
# sweeps (never if 0): hlt. Once, right after the mark_pages-th page of
# generation 1 (never if 0): out 0x80000000 | mark_pages, the mark: a point
# inside the first sweep a host running with stop_on_sync stops at by the
# guest's own count, at any guest speed. Plain 32-bit integer code, no
# stack, no div.

        .set    P_REGION,   0x00    # u32 GPA of page 0 of the region (4 KiB aligned)
        .set    P_NPAGES,   0x04    # u32 pages in the region, >= 1
        .set    P_STRIDE,   0x08    # u32 1 <= stride <= npages, gcd(stride, npages) = 1
        .set    P_START0,   0x0C    # u32 first page of generation 1, < npages
        .set    P_STEP,     0x10    # u32 start advance per generation, < npages
        .set    P_GENS,     0x14    # u32 generations to run; 0 = forever
        .set    P_CUR_GEN,  0x18    # u32 guest writes: generation being swept
        .set    P_DONE_GEN, 0x1C    # u32 guest writes: last generation completed
        .set    P_MARK_PAGES, 0x24  # u32 pages of generation 1 after which it syncs the mark; 0 = none

        .set    SYNC_PORT,  0x500
        .set    MARK_SYNC,  0x80000000  # | mark_pages: never a generation number

        .code32
        .text
        .globl  _start
_start:
        movl    $1, %ebp                # ebp = g
        movl    P_START0(%esi), %eax    # eax = start_g

sweep:
        movl    %ebp, P_CUR_GEN(%esi)
        movl    %eax, %ebx              # ebx = idx of the page being stamped
        movl    P_NPAGES(%esi), %ecx    # ecx = pages left in this sweep

page:
        movl    %ebx, %edi
        shll    $12, %edi
        addl    P_REGION(%esi), %edi    # edi = GPA of page idx
        movl    %ebx, 4(%edi)
        movl    %ebp, 0(%edi)           # slot 0 (first stamp) is now generation g
        movl    %ebx, 4092(%edi)
        movl    %ebp, 4088(%edi)        # slot 1 (last stamp) is now generation g
        addl    P_STRIDE(%esi), %ebx    # idx = (idx + stride) mod npages; both < npages,
        cmpl    P_NPAGES(%esi), %ebx    # so one conditional subtract suffices
        jb      1f
        subl    P_NPAGES(%esi), %ebx
1:      cmpl    $1, %ebp                # the mark lies in generation 1 only
        jne     4f
        movl    P_NPAGES(%esi), %edx
        subl    %ecx, %edx
        incl    %edx                    # edx = pages of this sweep stamped, this one included
        cmpl    P_MARK_PAGES(%esi), %edx  # >= 1, so mark_pages = 0 never matches
        jne     4f
        movl    %eax, %edi              # keep start_g while eax carries the sync value
        movl    %edx, %eax
        orl     $MARK_SYNC, %eax
        movw    $SYNC_PORT, %dx
        outl    %eax, (%dx)             # the mark: both stamps of mark_pages pages are in memory
        movl    %edi, %eax
4:      decl    %ecx
        jnz     page

        movl    %ebp, P_DONE_GEN(%esi)
        movl    %eax, %edi              # keep start_g while eax carries the sync value
        movl    %ebp, %eax
        movw    $SYNC_PORT, %dx
        outl    %eax, (%dx)             # every stamp of sweep g is in memory by now
        movl    %edi, %eax

        addl    P_STEP(%esi), %eax      # start_{g+1} = (start_g + step) mod npages
        cmpl    P_NPAGES(%esi), %eax
        jb      2f
        subl    P_NPAGES(%esi), %eax
2:
        movl    P_GENS(%esi), %edx
        testl   %edx, %edx
        jz      3f                      # generations = 0: sweep forever
        cmpl    %edx, %ebp
        jae     done
3:      incl    %ebp
        jmp     sweep

done:
        hlt
        jmp     done                    # a spurious wake-up halts again
