/*
 * A stand-in WinHvPlatform.dll, for CI under wine only (never shipped, never
 * built into the Python extension). Wine has no WinHvPlatform.dll, so on its
 * own it only reaches the "DLL missing" reason; ci.sh puts one of these in the
 * prefix's system32 to drive the WHP probe down its other branches, and to
 * drive whp_vm.c and cow.c at all:
 *
 *   -DSP_FAKE_MODE=1  exports WHvGetCapability only      -> SP_WHP_NO_EXPORT
 *   -DSP_FAKE_MODE=2  WHvGetCapability fails             -> SP_WHP_CAPABILITY_FAILED
 *   -DSP_FAKE_MODE=3  HypervisorPresent = FALSE          -> SP_WHP_NOT_PRESENT
 *   -DSP_FAKE_MODE=4  a toy partition: one vCPU stepping a handful of
 *                     real-mode instructions over the mapped host memory
 *   -DSP_FAKE_MODE=5  mode 4, but WHvCreatePartition fails with E_ACCESSDENIED
 *                     (a restricted token)                -> SP_WHP_CREATE_FAILED
 *   -DSP_FAKE_MODE=6  mode 4, but the processor count property is refused
 *                                                         -> SP_WHP_PROPERTY_FAILED
 *   -DSP_FAKE_MODE=7  mode 4, but WHvSetupPartition fails with
 *                     WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG -> SP_WHP_SETUP_FAILED
 *
 * Mode 4 is an interpreter, not a hypervisor. It enforces the rules real WHP
 * enforces that are documented or were observed by projects running on real
 * WHP, each marked RULE below with its source, and it produces exits the way
 * the WHP documentation describes them. selftest.c checks every RULE is
 * refused, calling these exports directly; on a Windows host the same checks
 * run against the real WinHvPlatform.dll and show whether each rule holds.
 * Where a rule's real HRESULT is not documented the stand-in returns
 * E_INVALIDARG, and the checks ask only that the call fails.
 *
 * Guest memory accesses are checked the way the hardware checks them: against
 * the mapping's flags (second-level page tables), then against the host page's
 * protection (the host's page tables: "the permissions of the individual pages
 * are enforced by the allocation, the mapping, and the guest's page table",
 * WinHvSampleAmd64.cpp). Either refusal is a WHvRunVpExitReasonMemoryAccess
 * exit at that GPA with the instruction not completed and RIP on it; nothing
 * is ever written through a host page that refuses writes.
 *
 * Opcodes (16-bit real mode): B0 ib, B8 iw, 66 B8 id, BA iw, 8E D8, A0 iw,
 * A2 iw, E4 ib, E6 ib, 66 EF, EB rel8, F4. Anything else: UnrecoverableException.
 */
#include "whp_api.h"

#include <stdlib.h>
#include <string.h>

#ifndef SP_FAKE_MODE
#error "build with -DSP_FAKE_MODE=1 to 7"
#endif

#define SP_FAKE_EXPORT __declspec(dllexport)
#define SP_FAKE_PARTITION (SP_FAKE_MODE >= 4)

/* selftest.c looks for this export to label its results as the stand-in's. */
SP_FAKE_EXPORT int SnapproofFakeWhpMode(void)
{
    return SP_FAKE_MODE;
}

/* WHV_CAPABILITY_FEATURES as this stand-in reports it; selftest.c clears PartialUnmap to see the refusals. */
static volatile LONG64 fake_features = 1; /* PartialUnmap */

SP_FAKE_EXPORT UINT64 SnapproofFakeWhpSetFeatures(UINT64 features)
{
    return (UINT64)InterlockedExchange64(&fake_features, (LONG64)features);
}

SP_FAKE_EXPORT HRESULT WINAPI WHvGetCapability(WHV_CAPABILITY_CODE code, VOID *buf, UINT32 size, UINT32 *written)
{
    if (SP_FAKE_MODE == 2)
        return E_NOTIMPL;
    UINT32 need;
    switch (code) {
    case WHvCapabilityCodeHypervisorPresent: need = sizeof(BOOL); break;
    case WHvCapabilityCodeFeatures: need = sizeof(UINT64); break;
    default:
        /* RULE: an unknown capability is refused with WHV_E_UNKNOWN_CAPABILITY (WHvGetCapability.md,
           "Return Value"). The stand-in knows only these two codes; real WHP knows more. */
        return SP_HR_WHV_E_UNKNOWN_CAPABILITY;
    }
    if (!buf || size < need)
        return SP_HR_WHV_E_INSUFFICIENT_BUFFER;
    ZeroMemory(buf, size);
    if (code == WHvCapabilityCodeHypervisorPresent)
        ((WHV_CAPABILITY *)buf)->HypervisorPresent = SP_FAKE_PARTITION;
    else
        ((WHV_CAPABILITY *)buf)->Features.AsUINT64 = (UINT64)fake_features;
    if (written)
        *written = need;
    return S_OK;
}

#if SP_FAKE_MODE != 1

#if SP_FAKE_PARTITION
struct fake_range {
    UINT64 gpa, size;
    uint8_t *hva;
    UINT32 flags;
};

struct fake_partition {
    UINT32 processor_count;
    int processor_count_set, setup, vp_created;
    struct fake_range *ranges;
    int nranges, cap;
    UINT64 gpr[16], rip, rflags;
    WHV_X64_SEGMENT_REGISTER seg[6]; /* es cs ss ds fs gs, as WHvX64RegisterEs.. numbers them */
    volatile LONG cancel;
};

/*
 * RULE: one partition with mapped memory per process. The platform creates its backing (VID)
 * partition, named after the process, at a partition's first WHvMapGpaRange; while that partition
 * exists another partition's WHvMapGpaRange fails with ERROR_VID_PARTITION_ALREADY_EXISTS
 * (0xC0370008). WHvCreatePartition and WHvSetupPartition still succeed for the second; deleting
 * the first releases the name. Sources: hyperlight surrogate_process_manager.rs and its
 * HYPERLIGHT_MAX_SURROGATES=0 guard (PR #1578); rusty_box_whp partition.rs,
 * a_process_holds_one_partition_at_a_time (measured on a Windows host).
 */
static struct fake_partition *volatile vid_owner;

#define P(h) ((struct fake_partition *)(h))
#define RAX 0
#define RDX 2
#define SEG_CS 1
#define SEG_DS 3
#define FAKE_KNOWN_MAP_FLAGS (WHvMapGpaRangeFlagRead | WHvMapGpaRangeFlagWrite | WHvMapGpaRangeFlagExecute)

static int page_aligned(UINT64 v)
{
    return v % SP_PAGE_SIZE == 0;
}

static int overlaps(const struct fake_range *r, UINT64 gpa, UINT64 size)
{
    return gpa < r->gpa + r->size && r->gpa < gpa + size;
}

static int host_allows(const uint8_t *hva, UINT32 need)
{
    /* The host's page tables: committed, not a guard page, and writable for a write. */
    MEMORY_BASIC_INFORMATION mbi;
    if (VirtualQuery(hva, &mbi, sizeof(mbi)) != sizeof(mbi) || mbi.State != MEM_COMMIT)
        return 0;
    DWORD prot = mbi.Protect;
    if (prot & (PAGE_GUARD | PAGE_NOACCESS))
        return 0;
    if (need & WHvMapGpaRangeFlagWrite)
        return (prot & (PAGE_READWRITE | PAGE_WRITECOPY | PAGE_EXECUTE_READWRITE | PAGE_EXECUTE_WRITECOPY)) != 0;
    /* Execute needs no host execute right: the WHP sample runs guest code from a PAGE_READWRITE page. */
    return 1;
}

enum access_refusal { ACCESS_OK = 0, ACCESS_UNMAPPED = 1, ACCESS_REFUSED = 2 };

static uint8_t *translate(struct fake_partition *p, UINT64 gpa, UINT32 need, enum access_refusal *why)
{
    for (int i = 0; i < p->nranges; i++) {
        struct fake_range *r = &p->ranges[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size) {
            uint8_t *hva = r->hva + (gpa - r->gpa);
            if ((r->flags & need) != need || !host_allows(hva, need)) {
                *why = ACCESS_REFUSED;
                return NULL;
            }
            *why = ACCESS_OK;
            return hva;
        }
    }
    *why = ACCESS_UNMAPPED;
    return NULL;
}
#endif

SP_FAKE_EXPORT HRESULT WINAPI WHvCreatePartition(WHV_PARTITION_HANDLE *out)
{
#if SP_FAKE_PARTITION
    if (SP_FAKE_MODE == 5)
        return E_ACCESSDENIED;
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
#if SP_FAKE_PARTITION
    if (code != WHvPartitionPropertyCodeProcessorCount)
        return SP_HR_WHV_E_UNKNOWN_PROPERTY; /* the only property the stand-in knows */
    /* RULE: the processor count is set before WHvSetupPartition; only the properties WHvSetupPartition.md
       lists (extended exits, exception and MSR exit bitmaps, CPUID exit list) may change after it. */
    if (P(h)->setup)
        return E_INVALIDARG;
    /* 4 bytes (hyperlight) and sizeof(WHV_PARTITION_PROPERTY) (the WHP sample) both work on real WHP. */
    if (!buf || size < sizeof(UINT32))
        return E_INVALIDARG;
    if (SP_FAKE_MODE == 6)
        return E_INVALIDARG;
    P(h)->processor_count = *(const UINT32 *)buf;
    P(h)->processor_count_set = 1;
    return S_OK;
#else
    (void)h, (void)code, (void)buf, (void)size;
    return E_NOTIMPL;
#endif
}

SP_FAKE_EXPORT HRESULT WINAPI WHvSetupPartition(WHV_PARTITION_HANDLE h)
{
#if SP_FAKE_PARTITION
    if (SP_FAKE_MODE == 7)
        return SP_HR_WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG;
    if (P(h)->setup)
        return E_INVALIDARG;
    /* RULE: setup without the processor count fails with WHV_E_INVALID_PARTITION_CONFIG
       (WHvSetupPartition.md, "Return Value"; rusty_box_whp: "the platform refuses WHvSetupPartition
       without it"). */
    if (!P(h)->processor_count_set)
        return SP_HR_WHV_E_INVALID_PARTITION_CONFIG;
    if (P(h)->processor_count != 1)
        return E_NOTIMPL; /* the stand-in's own limit: one vCPU */
    P(h)->setup = 1;
    return S_OK;
#else
    (void)h;
    return E_NOTIMPL;
#endif
}

SP_FAKE_EXPORT HRESULT WINAPI WHvDeletePartition(WHV_PARTITION_HANDLE h)
{
#if SP_FAKE_PARTITION
    /* Deleting the partition that holds the process's backing partition releases it. */
    InterlockedCompareExchangePointer((PVOID volatile *)&vid_owner, NULL, P(h));
    free(P(h)->ranges);
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
#if SP_FAKE_PARTITION
    struct fake_partition *p = P(h);
    /* RULE: memory is mapped only after WHvSetupPartition ("After setting up the partition, the partition
       object can be passed to the other Windows Hypervisor Platform APIs", WHvSetupPartition.md). */
    if (!p->setup)
        return E_INVALIDARG;
    /* RULE: the source is page aligned (WHvMapGpaRange.md: "the page-aligned address"); the GPA and size
       are whole pages, size > 0 (rusty_box_whp: "every WHP range must start and end on" a page; QEMU's
       whpx maps nothing that is not page aligned). */
    if (!page_aligned((UINT64)(uintptr_t)src) || !page_aligned(gpa) || !page_aligned(size) || size == 0 ||
        gpa + size < gpa)
        return E_INVALIDARG;
    if ((UINT32)flags & ~(UINT32)FAKE_KNOWN_MAP_FLAGS)
        return E_INVALIDARG; /* dirty tracking needs a capability the stand-in does not offer */
    struct fake_partition *owner =
        InterlockedCompareExchangePointer((PVOID volatile *)&vid_owner, p, NULL);
    if (owner && owner != p)
        return SP_HR_ERROR_VID_PARTITION_ALREADY_EXISTS; /* RULE: see vid_owner */
    /* RULE: a range that overlaps a mapped one is refused: unmap first. VirtualBox's NEM observed that
       real WHP needs the unmap before a page's backing or protection changes (nemR3NativeSetPhysPage), and
       QEMU's whpx unmaps an overlapping slot before mapping; WHvMapGpaRange.md says instead that a mapping
       "replaces any previous mappings", as rusty_box_whp also reads it. The stricter reading here keeps
       code that works against the stand-in working on either kind of host. */
    for (int i = 0; i < p->nranges; i++)
        if (overlaps(&p->ranges[i], gpa, size))
            return E_INVALIDARG;
    if (p->nranges == p->cap) {
        int cap = p->cap ? 2 * p->cap : 16;
        struct fake_range *grown = realloc(p->ranges, (size_t)cap * sizeof(*grown));
        if (!grown)
            return E_OUTOFMEMORY;
        p->ranges = grown;
        p->cap = cap;
    }
    p->ranges[p->nranges++] = (struct fake_range){gpa, size, src, (UINT32)flags};
    return S_OK;
#else
    (void)h, (void)src, (void)gpa, (void)size, (void)flags;
    return E_NOTIMPL;
#endif
}

SP_FAKE_EXPORT HRESULT WINAPI WHvUnmapGpaRange(WHV_PARTITION_HANDLE h, WHV_GUEST_PHYSICAL_ADDRESS gpa, UINT64 size)
{
#if SP_FAKE_PARTITION
    struct fake_partition *p = P(h);
    if (!p->setup || !page_aligned(gpa) || !page_aligned(size) || size == 0 || gpa + size < gpa)
        return E_INVALIDARG;
    UINT64 covered = 0;
    int partial = 0;
    for (int i = 0; i < p->nranges; i++) {
        struct fake_range *r = &p->ranges[i];
        if (!overlaps(r, gpa, size))
            continue;
        UINT64 lo = r->gpa > gpa ? r->gpa : gpa;
        UINT64 hi = r->gpa + r->size < gpa + size ? r->gpa + r->size : gpa + size;
        covered += hi - lo;
        partial |= r->gpa < gpa || r->gpa + r->size > gpa + size;
    }
    /* RULE: only mapped pages can be unmapped: WHV_E_GPA_RANGE_NOT_FOUND otherwise (winerror.h: "The
       specified GPA range was not found"). Mapped ranges never overlap, so coverage adds up. */
    if (covered != size)
        return SP_HR_WHV_E_GPA_RANGE_NOT_FOUND;
    /* RULE: unmapping part of a mapped range needs WHV_CAPABILITY_FEATURES.PartialUnmap
       (winhvplatformdefs.h; rusty_box_whp caps.rs: "a host without it refuses"). */
    if (partial && !(fake_features & 1))
        return HRESULT_FROM_WIN32(ERROR_NOT_SUPPORTED);
    /* Cut [gpa, gpa + size) out: each touched range leaves at most a piece below and a piece above,
       and only a range that holds the whole cut leaves both, so one more slot is always enough. */
    struct fake_range *kept = malloc((size_t)(p->nranges + 1) * sizeof(*kept));
    if (!kept)
        return E_OUTOFMEMORY;
    int k = 0;
    for (int i = 0; i < p->nranges; i++) {
        struct fake_range r = p->ranges[i];
        if (!overlaps(&r, gpa, size)) {
            kept[k++] = r;
            continue;
        }
        if (r.gpa < gpa)
            kept[k++] = (struct fake_range){r.gpa, gpa - r.gpa, r.hva, r.flags};
        if (r.gpa + r.size > gpa + size)
            kept[k++] = (struct fake_range){gpa + size, r.gpa + r.size - (gpa + size), r.hva + (gpa + size - r.gpa),
                                            r.flags};
    }
    free(p->ranges);
    p->ranges = kept;
    p->cap = p->nranges + 1;
    p->nranges = k;
    return S_OK;
#else
    (void)h, (void)gpa, (void)size;
    return E_NOTIMPL;
#endif
}

SP_FAKE_EXPORT HRESULT WINAPI WHvCreateVirtualProcessor(WHV_PARTITION_HANDLE h, UINT32 index, UINT32 flags)
{
#if SP_FAKE_PARTITION
    struct fake_partition *p = P(h);
    /* RULE: vCPUs are created after setup (WHvSetupPartition.md), with Flags zero ("Unused, must be zero",
       WHvCreateVirtualProcessor.md), at an index below the processor count, once (WHV_E_VP_ALREADY_EXISTS;
       rusty_box_whp: refused "if the index is beyond the configured processor count or the processor
       already exists"). */
    if (!p->setup || flags != 0 || index >= p->processor_count)
        return E_INVALIDARG;
    if (p->vp_created)
        return SP_HR_WHV_E_VP_ALREADY_EXISTS;
    p->vp_created = 1;
    return S_OK;
#else
    (void)h, (void)index, (void)flags;
    return E_NOTIMPL;
#endif
}

SP_FAKE_EXPORT HRESULT WINAPI WHvDeleteVirtualProcessor(WHV_PARTITION_HANDLE h, UINT32 index)
{
#if SP_FAKE_PARTITION
    if (index != 0 || !P(h)->vp_created)
        return SP_HR_WHV_E_VP_DOES_NOT_EXIST;
    P(h)->vp_created = 0;
    return S_OK;
#else
    (void)h, (void)index;
    return E_NOTIMPL;
#endif
}

#if SP_FAKE_PARTITION
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

static HRESULT register_call_allowed(struct fake_partition *p, UINT32 index, const void *values)
{
    if (index != 0 || !p->vp_created)
        return SP_HR_WHV_E_VP_DOES_NOT_EXIST;
    /* RULE: the WHV_REGISTER_VALUE array is 16-byte aligned (DECLSPEC_ALIGN(16) WHV_UINT128 in
       winhvplatformdefs.h; hyperlight's Align16 fix, "WHV_REGISTER_VALUE must be 16-byte aligned"). */
    if ((uintptr_t)values % 16)
        return E_INVALIDARG;
    return S_OK;
}
#endif

SP_FAKE_EXPORT HRESULT WINAPI WHvGetVirtualProcessorRegisters(WHV_PARTITION_HANDLE h, UINT32 index,
                                                              const WHV_REGISTER_NAME *names, UINT32 n,
                                                              WHV_REGISTER_VALUE *values)
{
#if SP_FAKE_PARTITION
    HRESULT hr = register_call_allowed(P(h), index, values);
    if (FAILED(hr))
        return hr;
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
#if SP_FAKE_PARTITION
    HRESULT hr = register_call_allowed(P(h), index, values);
    if (FAILED(hr))
        return hr;
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
#if SP_FAKE_PARTITION
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

#if SP_FAKE_PARTITION
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
                           enum access_refusal why, const uint8_t *insn, UINT8 insn_len)
{
    /* The access did not happen and RIP is still on the instruction: the caller may make the page
       accessible and run again, and the instruction is re-executed ("Unmap and restart the instruction",
       VirtualBox's NEM, nemHCWinHandleMemoryAccessPageCheckerCallback). */
    ctx->MemoryAccess.Gpa = gpa;
    ctx->MemoryAccess.AccessInfo.AccessType = (UINT32)type;
    ctx->MemoryAccess.AccessInfo.GpaUnmapped = why == ACCESS_UNMAPPED;
    if (insn) {
        ctx->MemoryAccess.InstructionByteCount = insn_len;
        memcpy(ctx->MemoryAccess.InstructionBytes, insn, insn_len);
    }
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
#if SP_FAKE_PARTITION
    struct fake_partition *p = P(h);
    if (index != 0 || !p->vp_created)
        return SP_HR_WHV_E_VP_DOES_NOT_EXIST;
    if (!buf || size < sizeof(WHV_RUN_VP_EXIT_CONTEXT))
        return SP_HR_WHV_E_INSUFFICIENT_BUFFER;
    WHV_RUN_VP_EXIT_CONTEXT *ctx = buf;
    ZeroMemory(ctx, sizeof(*ctx));
    for (unsigned long steps = 0;; steps++) {
        if (InterlockedExchange(&p->cancel, 0))
            return exit_with(p, ctx, WHvRunVpExitReasonCanceled, 0);
        if (steps % 4096 == 4095)
            SwitchToThread(); /* a spinning guest must not starve the canceller */
        enum access_refusal why;
        UINT64 ip_gpa = p->seg[SEG_CS].Base + (p->rip & 0xFFFF);
        const uint8_t *code = translate(p, ip_gpa, WHvMapGpaRangeFlagRead | WHvMapGpaRangeFlagExecute, &why);
        if (!code)
            return memory_exit(p, ctx, ip_gpa, WHvMemoryAccessExecute, why, NULL, 0);
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
        case 0xA0: { /* mov al, [iw] */
            UINT64 gpa = p->seg[SEG_DS].Base + imm16;
            const uint8_t *src = translate(p, gpa, WHvMapGpaRangeFlagRead, &why);
            if (!src)
                return memory_exit(p, ctx, gpa, WHvMemoryAccessRead, why, code, 3);
            p->gpr[RAX] = (p->gpr[RAX] & ~0xFFull) | *(const volatile uint8_t *)src;
            p->rip += 3;
            break;
        }
        case 0xA2: { /* mov [iw], al: only through a host page that takes writes, as the hardware would */
            UINT64 gpa = p->seg[SEG_DS].Base + imm16;
            uint8_t *dst = translate(p, gpa, WHvMapGpaRangeFlagWrite, &why);
            if (!dst)
                return memory_exit(p, ctx, gpa, WHvMemoryAccessWrite, why, code, 3);
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
