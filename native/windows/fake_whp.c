/*
 * A stand-in WinHvPlatform.dll, for CI under wine only (never shipped, never
 * built into the Python extension). Wine has no WinHvPlatform.dll, so on its
 * own it only reaches the "DLL missing" reason; ci.sh puts one of these in the
 * prefix's system32 to drive the WHP probe down its other branches, and to
 * drive the run loop in whp_vm.c at all:
 *
 *   -DSP_FAKE_MODE=1  exports WHvGetCapability only   -> SP_WHP_NO_EXPORT
 *   -DSP_FAKE_MODE=2  WHvGetCapability fails          -> SP_WHP_CAPABILITY_FAILED
 *   -DSP_FAKE_MODE=3  HypervisorPresent = FALSE       -> SP_WHP_NOT_PRESENT
 *   -DSP_FAKE_MODE=4  a toy partition: one vCPU stepping a handful of
 *                     real-mode instructions over the mapped host memory
 *
 * Mode 4 is an interpreter, not a hypervisor. It produces exits the way the
 * WHP documentation describes them (the run stops *before* an I/O instruction
 * completes and the caller steps RIP; unmapped GPAs give MemoryAccess exits;
 * WHvCancelRunVirtualProcessor gives Canceled), so the loop's control flow,
 * the watchdog and the register traffic run for real; whether real WHP
 * behaves the same is for a Windows host to show. Guest writes go straight
 * through the host view, so a read-only view faults in the thread that runs
 * the vCPU: what hyperlight's original bug looked like.
 *
 * Opcodes (16-bit real mode): B0 ib, B8 iw, 66 B8 id, BA iw, 8E D8, A2 iw,
 * E4 ib, E6 ib, 66 EF, EB rel8, F4. Anything else: UnrecoverableException.
 */
#include "internal.h"

#include <stdlib.h>

#include <winhvplatform.h>

#ifndef SP_FAKE_MODE
#error "build with -DSP_FAKE_MODE=1, 2, 3 or 4"
#endif

#define SP_FAKE_EXPORT __declspec(dllexport)

/* selftest.c looks for this export to label its results as the stand-in's. */
SP_FAKE_EXPORT int SnapproofFakeWhpMode(void)
{
    return SP_FAKE_MODE;
}

SP_FAKE_EXPORT HRESULT WINAPI WHvGetCapability(WHV_CAPABILITY_CODE code, VOID *buf, UINT32 size, UINT32 *written)
{
    if (SP_FAKE_MODE == 2)
        return E_NOTIMPL;
    if (code != WHvCapabilityCodeHypervisorPresent || size < sizeof(BOOL))
        return E_INVALIDARG;
    ZeroMemory(buf, size);
    ((WHV_CAPABILITY *)buf)->HypervisorPresent = SP_FAKE_MODE == 4;
    if (written)
        *written = sizeof(BOOL);
    return S_OK;
}

#if SP_FAKE_MODE != 1

#if SP_FAKE_MODE == 4
#define SP_FAKE_RANGES 4

struct fake_range {
    UINT64 gpa, size;
    uint8_t *hva;
    UINT32 flags;
};

struct fake_partition {
    UINT32 processor_count; /* WHP wants it set before WHvSetupPartition */
    int setup, vp_created;
    struct fake_range ranges[SP_FAKE_RANGES];
    int nranges;
    UINT64 gpr[16], rip, rflags;
    WHV_X64_SEGMENT_REGISTER seg[6]; /* es cs ss ds fs gs, as WHvX64RegisterEs.. numbers them */
    volatile LONG cancel;
};

#define P(h) ((struct fake_partition *)(h))
#define RAX 0
#define RDX 2
#define SEG_CS 1
#define SEG_DS 3

static uint8_t *translate(struct fake_partition *p, UINT64 gpa, UINT32 need, int *unmapped)
{
    for (int i = 0; i < p->nranges; i++) {
        struct fake_range *r = &p->ranges[i];
        if (gpa >= r->gpa && gpa < r->gpa + r->size) {
            *unmapped = 0;
            return (r->flags & need) == need ? r->hva + (gpa - r->gpa) : NULL;
        }
    }
    *unmapped = 1;
    return NULL;
}
#endif

SP_FAKE_EXPORT HRESULT WINAPI WHvCreatePartition(WHV_PARTITION_HANDLE *out)
{
#if SP_FAKE_MODE == 4
    struct fake_partition *p = calloc(1, sizeof(*p));
    if (!p)
        return E_OUTOFMEMORY;
    for (int i = 0; i < 6; i++) {
        p->seg[i].Limit = 0xFFFF;
        p->seg[i].Attributes = 0x93;
    }
    /* architectural reset: F000:FFF0 with CS base FFFF0000 */
    p->seg[SEG_CS].Selector = 0xF000;
    p->seg[SEG_CS].Base = 0xFFFF0000;
    p->seg[SEG_CS].Attributes = 0x9B;
    p->rip = 0xFFF0;
    p->rflags = 0x2;
    *out = p;
    return S_OK;
#else
    (void)out;
    return E_NOTIMPL;
#endif
}

SP_FAKE_EXPORT HRESULT WINAPI WHvSetPartitionProperty(WHV_PARTITION_HANDLE h, WHV_PARTITION_PROPERTY_CODE code,
                                                      const VOID *buf, UINT32 size)
{
#if SP_FAKE_MODE == 4
    if (P(h)->setup || code != WHvPartitionPropertyCodeProcessorCount || size < sizeof(UINT32))
        return E_INVALIDARG;
    P(h)->processor_count = *(const UINT32 *)buf;
    return S_OK;
#else
    (void)h, (void)code, (void)buf, (void)size;
    return E_NOTIMPL;
#endif
}

SP_FAKE_EXPORT HRESULT WINAPI WHvSetupPartition(WHV_PARTITION_HANDLE h)
{
#if SP_FAKE_MODE == 4
    if (P(h)->processor_count != 1 || P(h)->setup)
        return E_INVALIDARG;
    P(h)->setup = 1;
    return S_OK;
#else
    (void)h;
    return E_NOTIMPL;
#endif
}

SP_FAKE_EXPORT HRESULT WINAPI WHvDeletePartition(WHV_PARTITION_HANDLE h)
{
#if SP_FAKE_MODE == 4
    free(P(h));
    return S_OK;
#else
    (void)h;
    return E_NOTIMPL;
#endif
}

SP_FAKE_EXPORT HRESULT WINAPI WHvMapGpaRange(WHV_PARTITION_HANDLE h, VOID *src, WHV_GUEST_PHYSICAL_ADDRESS gpa,
                                             UINT64 size, WHV_MAP_GPA_RANGE_FLAGS flags)
{
#if SP_FAKE_MODE == 4
    struct fake_partition *p = P(h);
    /* the documented requirement: a page-aligned source, whole pages */
    if (!p->setup || ((uintptr_t)src | gpa | size) % 4096 || !size || p->nranges == SP_FAKE_RANGES)
        return E_INVALIDARG;
    p->ranges[p->nranges++] = (struct fake_range){gpa, size, src, (UINT32)flags};
    return S_OK;
#else
    (void)h, (void)src, (void)gpa, (void)size, (void)flags;
    return E_NOTIMPL;
#endif
}

SP_FAKE_EXPORT HRESULT WINAPI WHvUnmapGpaRange(WHV_PARTITION_HANDLE h, WHV_GUEST_PHYSICAL_ADDRESS gpa, UINT64 size)
{
#if SP_FAKE_MODE == 4
    struct fake_partition *p = P(h);
    for (int i = 0; i < p->nranges; i++) {
        if (p->ranges[i].gpa == gpa && p->ranges[i].size == size) {
            p->ranges[i] = p->ranges[--p->nranges];
            return S_OK;
        }
    }
    return E_INVALIDARG;
#else
    (void)h, (void)gpa, (void)size;
    return E_NOTIMPL;
#endif
}

SP_FAKE_EXPORT HRESULT WINAPI WHvCreateVirtualProcessor(WHV_PARTITION_HANDLE h, UINT32 index, UINT32 flags)
{
#if SP_FAKE_MODE == 4
    if (!P(h)->setup || index != 0 || flags != 0 || P(h)->vp_created)
        return E_INVALIDARG;
    P(h)->vp_created = 1;
    return S_OK;
#else
    (void)h, (void)index, (void)flags;
    return E_NOTIMPL;
#endif
}

SP_FAKE_EXPORT HRESULT WINAPI WHvDeleteVirtualProcessor(WHV_PARTITION_HANDLE h, UINT32 index)
{
#if SP_FAKE_MODE == 4
    if (index != 0 || !P(h)->vp_created)
        return E_INVALIDARG;
    P(h)->vp_created = 0;
    return S_OK;
#else
    (void)h, (void)index;
    return E_NOTIMPL;
#endif
}

#if SP_FAKE_MODE == 4
static UINT64 *gpr_slot(struct fake_partition *p, WHV_REGISTER_NAME n)
{
    if (n >= WHvX64RegisterRax && n <= WHvX64RegisterR15)
        return &p->gpr[n - WHvX64RegisterRax];
    if (n == WHvX64RegisterRip)
        return &p->rip;
    if (n == WHvX64RegisterRflags)
        return &p->rflags;
    return NULL;
}

static WHV_X64_SEGMENT_REGISTER *seg_slot(struct fake_partition *p, WHV_REGISTER_NAME n)
{
    return n >= WHvX64RegisterEs && n <= WHvX64RegisterGs ? &p->seg[n - WHvX64RegisterEs] : NULL;
}
#endif

SP_FAKE_EXPORT HRESULT WINAPI WHvGetVirtualProcessorRegisters(WHV_PARTITION_HANDLE h, UINT32 index,
                                                              const WHV_REGISTER_NAME *names, UINT32 n,
                                                              WHV_REGISTER_VALUE *values)
{
#if SP_FAKE_MODE == 4
    if (index != 0 || !P(h)->vp_created || (uintptr_t)values % 16)
        return E_INVALIDARG; /* the values array must be 16-byte aligned */
    for (UINT32 i = 0; i < n; i++) {
        UINT64 *g = gpr_slot(P(h), names[i]);
        WHV_X64_SEGMENT_REGISTER *s = seg_slot(P(h), names[i]);
        ZeroMemory(&values[i], sizeof(values[i]));
        if (g)
            values[i].Reg64 = *g;
        else if (s)
            values[i].Segment = *s;
    }
    return S_OK;
#else
    (void)h, (void)index, (void)names, (void)n, (void)values;
    return E_NOTIMPL;
#endif
}

SP_FAKE_EXPORT HRESULT WINAPI WHvSetVirtualProcessorRegisters(WHV_PARTITION_HANDLE h, UINT32 index,
                                                              const WHV_REGISTER_NAME *names, UINT32 n,
                                                              const WHV_REGISTER_VALUE *values)
{
#if SP_FAKE_MODE == 4
    if (index != 0 || !P(h)->vp_created || (uintptr_t)values % 16)
        return E_INVALIDARG;
    for (UINT32 i = 0; i < n; i++) {
        UINT64 *g = gpr_slot(P(h), names[i]);
        WHV_X64_SEGMENT_REGISTER *s = seg_slot(P(h), names[i]);
        if (g)
            *g = values[i].Reg64;
        else if (s)
            *s = values[i].Segment;
    }
    return S_OK;
#else
    (void)h, (void)index, (void)names, (void)n, (void)values;
    return E_NOTIMPL;
#endif
}

SP_FAKE_EXPORT HRESULT WINAPI WHvCancelRunVirtualProcessor(WHV_PARTITION_HANDLE h, UINT32 index, UINT32 flags)
{
#if SP_FAKE_MODE == 4
    if (index != 0 || flags != 0)
        return E_INVALIDARG;
    /* sticky, so a cancel between runs shows up at the next one: the loop must cope */
    InterlockedExchange(&P(h)->cancel, 1);
    return S_OK;
#else
    (void)h, (void)index, (void)flags;
    return E_NOTIMPL;
#endif
}

#if SP_FAKE_MODE == 4
static HRESULT exit_with(struct fake_partition *p, WHV_RUN_VP_EXIT_CONTEXT *ctx, WHV_RUN_VP_EXIT_REASON reason,
                         UINT8 length)
{
    ctx->ExitReason = reason;
    ctx->VpContext.Rip = p->rip;
    ctx->VpContext.Rflags = p->rflags;
    ctx->VpContext.Cs = p->seg[SEG_CS];
    ctx->VpContext.InstructionLength = length;
    return S_OK;
}

static HRESULT memory_exit(struct fake_partition *p, WHV_RUN_VP_EXIT_CONTEXT *ctx, UINT64 gpa, int type,
                           int unmapped)
{
    ctx->MemoryAccess.Gpa = gpa;
    ctx->MemoryAccess.AccessInfo.AccessType = (UINT32)type;
    ctx->MemoryAccess.AccessInfo.GpaUnmapped = (UINT32)unmapped;
    return exit_with(p, ctx, WHvRunVpExitReasonMemoryAccess, 0);
}

static HRESULT io_exit(struct fake_partition *p, WHV_RUN_VP_EXIT_CONTEXT *ctx, UINT16 port, UINT32 size,
                       int is_write, UINT8 length)
{
    ctx->IoPortAccess.PortNumber = port;
    ctx->IoPortAccess.AccessInfo.AccessSize = size;
    ctx->IoPortAccess.AccessInfo.IsWrite = (UINT32)is_write;
    ctx->IoPortAccess.Rax = p->gpr[RAX];
    /* WHP stops before the I/O completes: RIP stays on the instruction, the caller steps it */
    return exit_with(p, ctx, WHvRunVpExitReasonX64IoPortAccess, length);
}
#endif

SP_FAKE_EXPORT HRESULT WINAPI WHvRunVirtualProcessor(WHV_PARTITION_HANDLE h, UINT32 index, VOID *buf, UINT32 size)
{
#if SP_FAKE_MODE == 4
    struct fake_partition *p = P(h);
    if (index != 0 || !p->vp_created || size < sizeof(WHV_RUN_VP_EXIT_CONTEXT))
        return E_INVALIDARG;
    WHV_RUN_VP_EXIT_CONTEXT *ctx = buf;
    ZeroMemory(ctx, sizeof(*ctx));
    for (unsigned long steps = 0;; steps++) {
        if (InterlockedExchange(&p->cancel, 0))
            return exit_with(p, ctx, WHvRunVpExitReasonCanceled, 0);
        if (steps % 4096 == 4095)
            SwitchToThread(); /* a spinning guest must not starve the canceller */
        int unmapped;
        UINT64 ip_gpa = p->seg[SEG_CS].Base + (p->rip & 0xFFFF);
        const uint8_t *code = translate(p, ip_gpa, WHvMapGpaRangeFlagExecute, &unmapped);
        if (!code)
            return memory_exit(p, ctx, ip_gpa, WHvMemoryAccessExecute, unmapped);
        UINT16 imm16 = (UINT16)(code[1] | code[2] << 8);
        switch (code[0]) {
        case 0xF4: /* hlt */
            p->rip += 1;
            return exit_with(p, ctx, WHvRunVpExitReasonX64Halt, 1);
        case 0xB0: /* mov al, ib */
            p->gpr[RAX] = (p->gpr[RAX] & ~0xFFull) | code[1];
            p->rip += 2;
            break;
        case 0xB8: /* mov ax, iw */
            p->gpr[RAX] = (p->gpr[RAX] & ~0xFFFFull) | imm16;
            p->rip += 3;
            break;
        case 0xBA: /* mov dx, iw */
            p->gpr[RDX] = (p->gpr[RDX] & ~0xFFFFull) | imm16;
            p->rip += 3;
            break;
        case 0x8E: /* mov ds, ax (8E D8) */
            if (code[1] != 0xD8)
                return exit_with(p, ctx, WHvRunVpExitReasonUnrecoverableException, 0);
            p->seg[SEG_DS].Selector = (UINT16)p->gpr[RAX];
            p->seg[SEG_DS].Base = (UINT64)(UINT16)p->gpr[RAX] << 4;
            p->rip += 2;
            break;
        case 0xA2: { /* mov [iw], al: straight through the host mapping, as the hardware would */
            UINT64 gpa = p->seg[SEG_DS].Base + imm16;
            uint8_t *dst = translate(p, gpa, WHvMapGpaRangeFlagWrite, &unmapped);
            if (!dst)
                return memory_exit(p, ctx, gpa, WHvMemoryAccessWrite, unmapped);
            *(volatile uint8_t *)dst = (uint8_t)p->gpr[RAX];
            p->rip += 3;
            break;
        }
        case 0xE4: /* in al, ib */
            return io_exit(p, ctx, code[1], 1, 0, 2);
        case 0xE6: /* out ib, al */
            return io_exit(p, ctx, code[1], 1, 1, 2);
        case 0x66:
            if (code[1] == 0xB8) { /* mov eax, id */
                p->gpr[RAX] = (UINT32)(code[2] | code[3] << 8 | code[4] << 16 | (UINT32)code[5] << 24);
                p->rip += 6;
                break;
            }
            if (code[1] == 0xEF) /* out dx, eax */
                return io_exit(p, ctx, (UINT16)p->gpr[RDX], 4, 1, 2);
            return exit_with(p, ctx, WHvRunVpExitReasonUnrecoverableException, 0);
        case 0xEB: /* jmp rel8 */
            p->rip = (p->rip + 2 + (UINT64)(INT64)(int8_t)code[1]) & 0xFFFF;
            break;
        default:
            return exit_with(p, ctx, WHvRunVpExitReasonUnrecoverableException, 0);
        }
    }
#else
    (void)h, (void)index, (void)buf, (void)size;
    return E_NOTIMPL;
#endif
}

#endif /* SP_FAKE_MODE != 1 */
