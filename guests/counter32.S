# counter32: the counter guest (issue 4), for snapshot-and-resume proofs.
#
# 32-bit flat protected mode, loaded and entered at 0x1000, ESI = GPA of this
# vCPU's parameter block (layout below; guests/counter.py packs it and models
# the result). Iteration i = 1 .. iterations:
#   page p = i mod npages, word w = (13*i) mod 1024
#   u32 at region + 4096*p + 4*w += i           (read-modify-write of memory)
#   checksum = rol(checksum, 5) ^ i             (in EDI, and mirrored in the block)
# so the final memory and checksum depend on every iteration having run
# exactly once, in order: a resumed run that skipped or repeated one differs.
#
# Sync port 0x500: after iteration i = npages (every page touched once) it
# writes 0x80000000 | npages; after every sync_every-th iteration it writes
# i (sync_every = 0: never); after iteration i = sync_at it writes i once
# (sync_at = 0: never), last, with every loop register at iteration i's
# value: a point the host can stop at by the guest's own count, at any
# guest speed. Several can follow the same iteration, in that order. At the
# end it stores the checksum into the block, then DONE_MAGIC, leaves
# EAX = EDI = checksum and halts.
#
# The loop state lives only in registers and the region: EBX = i, ECX = p,
# EDI = checksum, EBP = iterations left until the next periodic sync. The
# block's P_ITER/P_CHECKSUM are a trace for debugging, never read back.

        .set    P_REGION,     0x00  # u32 GPA of page 0 of the region (4 KiB aligned)
        .set    P_NPAGES,     0x04  # u32 pages in the working set, >= 1
        .set    P_ITERS,      0x08  # u32 iterations to run, < 0x80000000
        .set    P_SYNC_EVERY, 0x0C  # u32 periodic sync interval; 0 = none
        .set    P_ITER,       0x10  # u32 guest writes: last iteration completed
        .set    P_CHECKSUM,   0x14  # u32 guest writes: checksum after P_ITER
        .set    P_FINAL,      0x18  # u32 guest writes at the end: final checksum
        .set    P_DONE,       0x1C  # u32 guest writes DONE_MAGIC last, before hlt
        .set    P_SYNC_AT,    0x20  # u32 the one iteration after which it syncs i; 0 = none

        .set    DONE_MAGIC,   0x454e4f44    # "DONE" little-endian
        .set    WS_TOUCHED,   0x80000000
        .set    SYNC_PORT,    0x500

        .code32
        .text
        .globl  _start
_start:
        xorl    %ebx, %ebx              # i = 0 iterations done
        xorl    %ecx, %ecx              # p = i mod npages
        xorl    %edi, %edi              # checksum
        movl    P_SYNC_EVERY(%esi), %ebp

iter:
        cmpl    P_ITERS(%esi), %ebx
        jae     done
        incl    %ebx
        incl    %ecx
        cmpl    P_NPAGES(%esi), %ecx
        jb      1f
        xorl    %ecx, %ecx
1:
        imull   $13, %ebx, %edx
        andl    $1023, %edx             # w: 13 is odd, so w walks all 1024 words
        movl    %ecx, %eax
        shll    $12, %eax
        addl    P_REGION(%esi), %eax
        addl    %ebx, (%eax,%edx,4)
        roll    $5, %edi
        xorl    %ebx, %edi
        movl    %ebx, P_ITER(%esi)
        movl    %edi, P_CHECKSUM(%esi)

        cmpl    P_NPAGES(%esi), %ebx
        jne     2f
        movl    %ebx, %eax
        orl     $WS_TOUCHED, %eax
        movw    $SYNC_PORT, %dx
        outl    %eax, (%dx)             # working set touched
2:
        decl    %ebp                    # from 0 (no periodic sync) it wraps: 2^32 is out of reach
        jnz     3f
        movl    P_SYNC_EVERY(%esi), %ebp
        movl    %ebx, %eax
        movw    $SYNC_PORT, %dx
        outl    %eax, (%dx)             # i iterations done
3:
        cmpl    P_SYNC_AT(%esi), %ebx   # last, so EBX, ECX, EDI and EBP are all iteration i's when it stops here
        jne     iter                    # (i >= 1, so sync_at = 0 never matches)
        movl    %ebx, %eax
        movw    $SYNC_PORT, %dx
        outl    %eax, (%dx)             # sync_at iterations done
        jmp     iter

done:
        movl    %edi, P_FINAL(%esi)
        movl    $DONE_MAGIC, P_DONE(%esi)
        movl    %edi, %eax
halt:
        hlt
        jmp     halt                    # a spurious wake-up halts again
