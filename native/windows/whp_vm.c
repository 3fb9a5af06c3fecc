/*
 * WHP: a partition with one vCPU in real mode, guest memory from a file
 * view, and the run loop (HLT, port I/O, memory access, cancel; write exits
 * on copy-on-write memory go to cow.c and the guest runs on).
 *
 * WinHvPlatform.dll is loaded at run time (LoadLibraryExW + GetProcAddress),
 * never linked: a host without the "Windows Hypervisor Platform" feature must
 * reach the "WHP absent" skip, not a loader error before Python even runs.
 * The probe goes on past HypervisorPresent to a throwaway partition (create,
 * set up, delete): where that fails, the skip names the call, the HRESULT and
 * the fix.
 *
 * One partition with mapped memory per process: real WHP refuses the second
 * one's WHvMapGpaRange (ERROR_VID_PARTITION_ALREADY_EXISTS) while the first
 * exists. Nothing here enforces it; callers delete one before mapping the next.
 *
 * Types and constants come from the documented WHP headers
 * (winhvplatformdefs.h, in the Windows SDK and in mingw-w64); the asserts
 * below pin the sizes, offsets and values this file relies on, so a header
 * that disagrees with the documentation fails the build instead of the guest.
 */
#include "whp_api.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the layouts and values the run loop depends on ------------------- */
#define SP_ASSERT_SIZE(type, n) SP_STATIC_ASSERT(sizeof(type) == (n), "sizeof(" #type ") must be " #n)
#define SP_ASSERT_OFFSET(type, field, n) \
    SP_STATIC_ASSERT(offsetof(type, field) == (n), "offsetof(" #type ", " #field ") must be " #n)
#define SP_ASSERT_VALUE(name, n) SP_STATIC_ASSERT((long long)(name) == (long long)(n), #name " must be " #n)

SP_ASSERT_SIZE(WHV_RUN_VP_EXIT_CONTEXT, 224);
SP_ASSERT_OFFSET(WHV_RUN_VP_EXIT_CONTEXT, ExitReason, 0);
SP_ASSERT_OFFSET(WHV_RUN_VP_EXIT_CONTEXT, VpContext, 8);
SP_ASSERT_OFFSET(WHV_RUN_VP_EXIT_CONTEXT, MemoryAccess, 48);
SP_ASSERT_OFFSET(WHV_RUN_VP_EXIT_CONTEXT, IoPortAccess, 48);
SP_ASSERT_SIZE(WHV_VP_EXIT_CONTEXT, 40);
SP_ASSERT_OFFSET(WHV_VP_EXIT_CONTEXT, Cs, 8);
SP_ASSERT_OFFSET(WHV_VP_EXIT_CONTEXT, Rip, 24);
SP_ASSERT_OFFSET(WHV_VP_EXIT_CONTEXT, Rflags, 32);
SP_ASSERT_SIZE(WHV_MEMORY_ACCESS_CONTEXT, 40);
SP_ASSERT_OFFSET(WHV_MEMORY_ACCESS_CONTEXT, InstructionBytes, 4);
SP_ASSERT_OFFSET(WHV_MEMORY_ACCESS_CONTEXT, AccessInfo, 20);
SP_ASSERT_OFFSET(WHV_MEMORY_ACCESS_CONTEXT, Gpa, 24);
SP_ASSERT_OFFSET(WHV_MEMORY_ACCESS_CONTEXT, Gva, 32);
SP_ASSERT_SIZE(WHV_MEMORY_ACCESS_INFO, 4);
SP_ASSERT_SIZE(WHV_X64_IO_PORT_ACCESS_CONTEXT, 96);
SP_ASSERT_OFFSET(WHV_X64_IO_PORT_ACCESS_CONTEXT, AccessInfo, 20);
SP_ASSERT_OFFSET(WHV_X64_IO_PORT_ACCESS_CONTEXT, PortNumber, 24);
SP_ASSERT_OFFSET(WHV_X64_IO_PORT_ACCESS_CONTEXT, Rax, 32);
SP_ASSERT_OFFSET(WHV_X64_IO_PORT_ACCESS_CONTEXT, Ds, 64);
SP_ASSERT_OFFSET(WHV_X64_IO_PORT_ACCESS_CONTEXT, Es, 80);
SP_ASSERT_SIZE(WHV_X64_IO_PORT_ACCESS_INFO, 4);
SP_ASSERT_SIZE(WHV_RUN_VP_CANCELED_CONTEXT, 4);
SP_ASSERT_SIZE(WHV_REGISTER_VALUE, 16);
SP_ASSERT_SIZE(WHV_UINT128, 16);
SP_ASSERT_SIZE(WHV_X64_SEGMENT_REGISTER, 16);
SP_ASSERT_OFFSET(WHV_X64_SEGMENT_REGISTER, Base, 0);
SP_ASSERT_OFFSET(WHV_X64_SEGMENT_REGISTER, Limit, 8);
SP_ASSERT_OFFSET(WHV_X64_SEGMENT_REGISTER, Selector, 12);
SP_ASSERT_OFFSET(WHV_X64_SEGMENT_REGISTER, Attributes, 14);
#if defined(__GNUC__)
/* WHV_UINT128 is DECLSPEC_ALIGN(16): register arrays on our stack inherit it. */
SP_STATIC_ASSERT(__alignof__(WHV_REGISTER_VALUE) == 16, "WHV_REGISTER_VALUE must be 16-byte aligned");
#endif

SP_ASSERT_VALUE(WHvCapabilityCodeHypervisorPresent, 0);
SP_ASSERT_VALUE(WHvCapabilityCodeFeatures, 1);
SP_ASSERT_SIZE(WHV_CAPABILITY_FEATURES, 8);
SP_ASSERT_VALUE(WHvPartitionPropertyCodeProcessorCount, 0x1fff);
SP_ASSERT_VALUE(WHvRunVpExitReasonMemoryAccess, 1);
SP_ASSERT_VALUE(WHvRunVpExitReasonX64IoPortAccess, 2);
SP_ASSERT_VALUE(WHvRunVpExitReasonX64Halt, 8);
SP_ASSERT_VALUE(WHvRunVpExitReasonCanceled, 0x2001);
SP_ASSERT_VALUE(WHvMapGpaRangeFlagRead, 1);
SP_ASSERT_VALUE(WHvMapGpaRangeFlagWrite, 2);
SP_ASSERT_VALUE(WHvMapGpaRangeFlagExecute, 4);
SP_ASSERT_VALUE(WHvMemoryAccessRead, 0);
SP_ASSERT_VALUE(WHvMemoryAccessWrite, 1);
SP_ASSERT_VALUE(WHvMemoryAccessExecute, 2);
SP_ASSERT_VALUE(WHvX64RegisterRax, 0x00);
SP_ASSERT_VALUE(WHvX64RegisterRip, 0x10);
SP_ASSERT_VALUE(WHvX64RegisterRflags, 0x11);
SP_ASSERT_VALUE(WHvX64RegisterEs, 0x12);
SP_ASSERT_VALUE(WHvX64RegisterCs, 0x13);
SP_ASSERT_VALUE(WHvX64RegisterSs, 0x14);
SP_ASSERT_VALUE(WHvX64RegisterGs, 0x17);
/* snapproof's flag values are WHP's, so Python can pass them straight through. */
SP_ASSERT_VALUE(SP_WHP_MAP_READ, WHvMapGpaRangeFlagRead);
SP_ASSERT_VALUE(SP_WHP_MAP_WRITE, WHvMapGpaRangeFlagWrite);
SP_ASSERT_VALUE(SP_WHP_MAP_EXECUTE, WHvMapGpaRangeFlagExecute);
/* No hidden padding in what Python reads. */
SP_ASSERT_SIZE(struct sp_whp_exit, 104);
SP_ASSERT_SIZE(struct sp_view_info, 48);
SP_ASSERT_SIZE(struct sp_cow_info, 56);

/* ---- the WHP entry points, resolved at run time (whp_api.h) ------------- */
#if defined(__GNUC__)
/* Where the compiler can say so, prove each typedef is exactly the header's prototype. */
#define SP_CHECK_PROTOTYPE(name)                                                              \
    SP_STATIC_ASSERT(__builtin_types_compatible_p(__typeof__(&name), pfn_##name),             \
                     "pfn_" #name " does not match the prototype in winhvplatform.h");
SP_WHP_FUNCS(SP_CHECK_PROTOTYPE)
#endif

static struct sp_whp_api whp;

static INIT_ONCE probe_once = INIT_ONCE_STATIC_INIT;
static int probe_result = -1;
static HRESULT probe_hresult;
static char absent_reason[768];

const char *sp_whp_hresult_name(HRESULT hr)
{
    switch ((unsigned long)hr) {
    case 0x00000000ul: return "S_OK";
    case 0x80070005ul: return "E_ACCESSDENIED";
    case 0x80070057ul: return "E_INVALIDARG";
    case 0x8007000Eul: return "E_OUTOFMEMORY";
    case 0x80004001ul: return "E_NOTIMPL";
    case 0x80004005ul: return "E_FAIL";
    case 0x8000FFFFul: return "E_UNEXPECTED";
    case 0x80070032ul: return "HRESULT_FROM_WIN32(ERROR_NOT_SUPPORTED)";
    case 0x80370300ul: return "WHV_E_UNKNOWN_CAPABILITY";
    case 0x80370301ul: return "WHV_E_INSUFFICIENT_BUFFER";
    case 0x80370302ul: return "WHV_E_UNKNOWN_PROPERTY";
    case 0x80370303ul: return "WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG";
    case 0x80370304ul: return "WHV_E_INVALID_PARTITION_CONFIG";
    case 0x80370305ul: return "WHV_E_GPA_RANGE_NOT_FOUND";
    case 0x80370306ul: return "WHV_E_VP_ALREADY_EXISTS";
    case 0x80370307ul: return "WHV_E_VP_DOES_NOT_EXIST";
    case 0xC0351000ul: return "ERROR_HV_NOT_PRESENT";
    case 0xC0370008ul: return "ERROR_VID_PARTITION_ALREADY_EXISTS";
    default: return "unrecognised";
    }
}

static const char *probe_fix(HRESULT hr)
{
    /* The HRESULTs with one known cause get that cause's fix; any other gets the whole checklist. */
    if (hr == SP_HR_ERROR_HV_NOT_PRESENT)
        return SP_WHP_FIX_LAUNCH_HYPERVISOR;
    if (hr == E_ACCESSDENIED)
        return SP_WHP_FIX_TOKEN;
    if (hr == SP_HR_WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG)
        return SP_WHP_FIX_HYPERVISOR_CONFIG;
    return SP_WHP_FIX_PLATFORM;
}

static BOOL probe_failed(int result, const char *fmt, HRESULT hr)
{
    snprintf(absent_reason, sizeof(absent_reason), fmt, (unsigned long)hr, sp_whp_hresult_name(hr), probe_fix(hr));
    probe_hresult = hr;
    probe_result = result;
    return TRUE;
}

static int throwaway_partition(void)
{
    /* HypervisorPresent says nothing about whether this process may make a partition: make one, set
       it up and delete it. It maps no memory, so it never holds the process's one mapped partition. */
    WHV_PARTITION_HANDLE part = NULL;
    HRESULT hr = whp.WHvCreatePartition(&part);
    if (FAILED(hr))
        return probe_failed(SP_WHP_CREATE_FAILED, SP_WHP_ABSENT_CREATE_FAILED, hr);
    UINT32 count = 1;
    hr = whp.WHvSetPartitionProperty(part, WHvPartitionPropertyCodeProcessorCount, &count, sizeof(count));
    if (FAILED(hr)) {
        whp.WHvDeletePartition(part);
        return probe_failed(SP_WHP_PROPERTY_FAILED, SP_WHP_ABSENT_PROPERTY_FAILED, hr);
    }
    hr = whp.WHvSetupPartition(part);
    whp.WHvDeletePartition(part);
    if (FAILED(hr))
        return probe_failed(SP_WHP_SETUP_FAILED, SP_WHP_ABSENT_SETUP_FAILED, hr);
    return 0;
}

static BOOL CALLBACK probe_whp(PINIT_ONCE once, PVOID param, PVOID *context)
{
    (void)once;
    (void)param;
    (void)context;
    /* System32 only: a WinHvPlatform.dll planted beside python.exe must not be the one that runs. */
    whp.dll = LoadLibraryExW(SP_WIDEN(SP_WHP_DLL_NAME), NULL, LOAD_LIBRARY_SEARCH_SYSTEM32);
    if (!whp.dll) {
        snprintf(absent_reason, sizeof(absent_reason), SP_WHP_ABSENT_NO_DLL, (unsigned long)GetLastError());
        probe_result = SP_WHP_NO_DLL;
        return TRUE;
    }
#define SP_RESOLVE(name)                                                                           \
    whp.name = (pfn_##name)(void (*)(void))GetProcAddress(whp.dll, #name);                         \
    if (!whp.name) {                                                                               \
        snprintf(absent_reason, sizeof(absent_reason), SP_WHP_ABSENT_NO_EXPORT, #name,             \
                 (unsigned long)GetLastError());                                                   \
        probe_result = SP_WHP_NO_EXPORT;                                                           \
        return TRUE;                                                                               \
    }
    SP_WHP_FUNCS(SP_RESOLVE)
#undef SP_RESOLVE

    WHV_CAPABILITY cap;
    UINT32 written = 0;
    ZeroMemory(&cap, sizeof(cap));
    HRESULT hr = whp.WHvGetCapability(WHvCapabilityCodeHypervisorPresent, &cap, sizeof(cap), &written);
    if (FAILED(hr))
        return probe_failed(SP_WHP_CAPABILITY_FAILED, SP_WHP_ABSENT_CAPABILITY_FAILED, hr);
    if (!cap.HypervisorPresent) {
        snprintf(absent_reason, sizeof(absent_reason), SP_WHP_ABSENT_NOT_PRESENT, SP_WHP_FIX_LAUNCH_HYPERVISOR);
        probe_result = SP_WHP_NOT_PRESENT;
        return TRUE;
    }
    if (throwaway_partition())
        return TRUE;
    probe_result = SP_WHP_PRESENT;
    return TRUE;
}

int sp_whp_probe(void)
{
    /* Probe once per process: the DLL stays loaded for the partitions that follow. */
    InitOnceExecuteOnce(&probe_once, probe_whp, NULL, NULL);
    return probe_result;
}

const char *sp_whp_absent_reason(void)
{
    return sp_whp_probe() == SP_WHP_PRESENT ? NULL : absent_reason;
}

uint32_t sp_whp_probe_hresult(void)
{
    sp_whp_probe();
    return (uint32_t)probe_hresult;
}

int sp_whp_features(uint64_t *out)
{
    *out = 0;
    if (sp_whp_probe() != SP_WHP_PRESENT)
        return sp_win_fail_code("sp_whp_features: WHP absent (see sp_whp_absent_reason)", ERROR_NOT_SUPPORTED);
    WHV_CAPABILITY cap;
    UINT32 written = 0;
    ZeroMemory(&cap, sizeof(cap));
    HRESULT hr = whp.WHvGetCapability(WHvCapabilityCodeFeatures, &cap, sizeof(cap), &written);
    if (FAILED(hr))
        return sp_win_fail_hr("WHvGetCapability(WHvCapabilityCodeFeatures)", hr);
    *out = cap.Features.AsUINT64;
    return 0;
}

/* ---- the partition ------------------------------------------------------ */
struct sp_whp_vm {
    WHV_PARTITION_HANDLE part;
    int vp_created;
    HANDLE wake;             /* auto-reset: sp_whp_vcpu_cancel() wakes the watchdog */
    HANDLE run_done;         /* manual-reset: the run loop has left WHvRunVirtualProcessor for good */
    volatile LONG cancel_requested;
    volatile LONG timed_out;
    int64_t deadline_ns;
    int watchdog_stuck;      /* a watchdog thread outlived its join: never free what it uses */
    struct sp_cow *cow;      /* memory whose write exits the run loop serves (sp_whp_vm_map_cow) */
};

#define SP_VP 0u
/* After the deadline, re-cancel this often until the run loop confirms: a cancel that
   lands while the vCPU is outside WHvRunVirtualProcessor would otherwise be lost. */
#define SP_CANCEL_RETRY_MS 10u
#define SP_CANCEL_RETRIES 500u  /* 5 s of retries, then the watchdog gives up */
#define SP_WATCHDOG_JOIN_MS 10000u

void sp_whp_vm_destroy(struct sp_whp_vm *vm)
{
    /* Reverse of create; mappings go with the partition. Records no error: it may run after a failure. */
    if (!vm)
        return;
    if (vm->watchdog_stuck)
        return; /* a watchdog thread may still use the partition and events: leak them all rather than race it */
    if (vm->cow)
        sp_cow_detached(vm->cow);
    if (vm->vp_created)
        whp.WHvDeleteVirtualProcessor(vm->part, SP_VP);
    if (vm->part)
        whp.WHvDeletePartition(vm->part);
    if (vm->wake)
        CloseHandle(vm->wake);
    if (vm->run_done)
        CloseHandle(vm->run_done);
    free(vm);
}

int sp_whp_vm_create(struct sp_whp_vm **out)
{
    *out = NULL;
    if (sp_whp_probe() != SP_WHP_PRESENT)
        return sp_win_fail_code("sp_whp_vm_create: WHP absent (see sp_whp_absent_reason)", ERROR_NOT_SUPPORTED);
    struct sp_whp_vm *vm = calloc(1, sizeof(*vm));
    if (!vm)
        return sp_win_fail_code("sp_whp_vm_create: calloc", ERROR_NOT_ENOUGH_MEMORY);
    int rc = 0;
    HRESULT hr = whp.WHvCreatePartition(&vm->part);
    if (FAILED(hr)) {
        vm->part = NULL;
        rc = sp_win_fail_hr("WHvCreatePartition", hr);
        goto fail;
    }
    UINT32 count = 1;
    hr = whp.WHvSetPartitionProperty(vm->part, WHvPartitionPropertyCodeProcessorCount, &count, sizeof(count));
    if (FAILED(hr)) {
        rc = sp_win_fail_hr("WHvSetPartitionProperty(ProcessorCount = 1)", hr);
        goto fail;
    }
    hr = whp.WHvSetupPartition(vm->part);
    if (FAILED(hr)) {
        rc = sp_win_fail_hr("WHvSetupPartition", hr);
        goto fail;
    }
    hr = whp.WHvCreateVirtualProcessor(vm->part, SP_VP, 0);
    if (FAILED(hr)) {
        rc = sp_win_fail_hr("WHvCreateVirtualProcessor(0)", hr);
        goto fail;
    }
    vm->vp_created = 1;
    vm->wake = CreateEventW(NULL, FALSE, FALSE, NULL);
    vm->run_done = CreateEventW(NULL, TRUE, FALSE, NULL);
    if (!vm->wake || !vm->run_done) {
        rc = sp_win_fail("CreateEventW");
        goto fail;
    }
    *out = vm;
    return 0;
fail:
    sp_whp_vm_destroy(vm);
    return rc;
}

int sp_whp_vm_map(struct sp_whp_vm *vm, uint64_t hva, uint64_t gpa, uint64_t size, uint32_t flags)
{
    if (hva % SP_PAGE_SIZE || gpa % SP_PAGE_SIZE || size % SP_PAGE_SIZE || size == 0)
        return sp_win_fail_code("sp_whp_vm_map: hva, gpa and size must be page aligned, size > 0",
                                ERROR_INVALID_PARAMETER);
    if (flags & ~(uint32_t)(SP_WHP_MAP_READ | SP_WHP_MAP_WRITE | SP_WHP_MAP_EXECUTE))
        return sp_win_fail_code("sp_whp_vm_map: unknown flag", ERROR_INVALID_PARAMETER);
    HRESULT hr = whp.WHvMapGpaRange(vm->part, (VOID *)(uintptr_t)hva, gpa, size, (WHV_MAP_GPA_RANGE_FLAGS)flags);
    if (FAILED(hr))
        return sp_win_fail_hr("WHvMapGpaRange", hr);
    return 0;
}

int sp_whp_vm_unmap(struct sp_whp_vm *vm, uint64_t gpa, uint64_t size)
{
    HRESULT hr = whp.WHvUnmapGpaRange(vm->part, gpa, size);
    if (FAILED(hr))
        return sp_win_fail_hr("WHvUnmapGpaRange", hr);
    return 0;
}

int sp_whp_vm_set_cow(struct sp_whp_vm *vm, struct sp_cow *cow)
{
    if (vm->cow && cow)
        return sp_win_fail_code("sp_whp_vm_map_cow: this partition already has copy-on-write memory",
                                ERROR_ALREADY_ASSIGNED);
    vm->cow = cow;
    return 0;
}

static void real_mode_segment(WHV_X64_SEGMENT_REGISTER *s, uint16_t selector, uint16_t attributes)
{
    /* Real mode: base = selector * 16, 64 KiB limit, 16-bit. */
    ZeroMemory(s, sizeof(*s));
    s->Base = (UINT64)selector << 4;
    s->Limit = 0xFFFF;
    s->Selector = selector;
    s->Attributes = attributes;
}

int sp_whp_vcpu_set_real_mode(struct sp_whp_vm *vm, uint16_t cs, uint16_t ip, uint16_t sp)
{
    /* A fresh WHP vCPU is at architectural reset (CR0.PE = 0, CS:IP = F000:FFF0); only CS:IP,
       the data segments, SP and RFLAGS change, so CS=0 IP=0x100 runs the guest at GPA 0x100. */
    static const WHV_REGISTER_NAME names[] = {
        WHvX64RegisterCs, WHvX64RegisterDs, WHvX64RegisterEs, WHvX64RegisterFs, WHvX64RegisterGs,
        WHvX64RegisterSs, WHvX64RegisterRip, WHvX64RegisterRsp, WHvX64RegisterRflags,
    };
    WHV_REGISTER_VALUE values[sizeof(names) / sizeof(names[0])];
    ZeroMemory(values, sizeof(values));
    real_mode_segment(&values[0].Segment, cs, 0x9B); /* present, code, execute/read, accessed */
    for (int i = 1; i <= 5; i++)
        real_mode_segment(&values[i].Segment, 0, 0x93); /* present, data, read/write, accessed */
    values[6].Reg64 = ip;
    values[7].Reg64 = sp;
    values[8].Reg64 = 0x2; /* bit 1 is reserved and reads as 1; IF clear: no interrupts expected */
    HRESULT hr = whp.WHvSetVirtualProcessorRegisters(vm->part, SP_VP, names, (UINT32)(sizeof(names) / sizeof(names[0])),
                                                     values);
    if (FAILED(hr))
        return sp_win_fail_hr("WHvSetVirtualProcessorRegisters(real mode)", hr);
    return 0;
}

int sp_whp_vcpu_get_regs(struct sp_whp_vm *vm, uint64_t *out18)
{
    /* Same order as the KVM backend's sp_vcpu_get_regs, so Python names them the same way. */
    static const WHV_REGISTER_NAME names[18] = {
        WHvX64RegisterRax, WHvX64RegisterRbx, WHvX64RegisterRcx, WHvX64RegisterRdx, WHvX64RegisterRsi,
        WHvX64RegisterRdi, WHvX64RegisterRsp, WHvX64RegisterRbp, WHvX64RegisterR8,  WHvX64RegisterR9,
        WHvX64RegisterR10, WHvX64RegisterR11, WHvX64RegisterR12, WHvX64RegisterR13, WHvX64RegisterR14,
        WHvX64RegisterR15, WHvX64RegisterRip, WHvX64RegisterRflags,
    };
    WHV_REGISTER_VALUE values[18];
    HRESULT hr = whp.WHvGetVirtualProcessorRegisters(vm->part, SP_VP, names, 18, values);
    if (FAILED(hr))
        return sp_win_fail_hr("WHvGetVirtualProcessorRegisters", hr);
    for (int i = 0; i < 18; i++)
        out18[i] = values[i].Reg64;
    return 0;
}

int sp_whp_vcpu_cancel(struct sp_whp_vm *vm)
{
    /* The flag makes the running (or next) run return CANCELED; the watchdog does the cancelling. */
    InterlockedExchange(&vm->cancel_requested, 1);
    if (!SetEvent(vm->wake))
        return sp_win_fail("SetEvent(cancel)");
    return 0;
}

static DWORD WINAPI watchdog(LPVOID arg)
{
    struct sp_whp_vm *vm = arg;
    HANDLE events[2] = {vm->run_done, vm->wake};
    for (;;) {
        int64_t left_ns = vm->deadline_ns - sp_win_now_ns();
        if (left_ns <= 0) {
            InterlockedExchange(&vm->timed_out, 1);
            break;
        }
        DWORD ms = (DWORD)(left_ns / 1000000 + 1); /* round up: never fire before the deadline */
        DWORD w = WaitForMultipleObjects(2, events, FALSE, ms);
        if (w == WAIT_OBJECT_0)
            return 0;
        if (w == WAIT_OBJECT_0 + 1)
            break; /* sp_whp_vcpu_cancel() */
        if (w != WAIT_TIMEOUT) {
            InterlockedExchange(&vm->timed_out, 1); /* cannot wait: stop the guest rather than let it run on */
            break;
        }
    }
    for (unsigned i = 0; i < SP_CANCEL_RETRIES; i++) {
        whp.WHvCancelRunVirtualProcessor(vm->part, SP_VP, 0);
        if (WaitForSingleObject(vm->run_done, SP_CANCEL_RETRY_MS) == WAIT_OBJECT_0)
            return 0;
    }
    return 1;
}

static int set_regs_after_io(struct sp_whp_vm *vm, uint64_t rip, int set_rax, uint64_t rax)
{
    static const WHV_REGISTER_NAME names[2] = {WHvX64RegisterRip, WHvX64RegisterRax};
    WHV_REGISTER_VALUE values[2];
    ZeroMemory(values, sizeof(values));
    values[0].Reg64 = rip;
    values[1].Reg64 = rax;
    HRESULT hr = whp.WHvSetVirtualProcessorRegisters(vm->part, SP_VP, names, set_rax ? 2 : 1, values);
    return FAILED(hr) ? (int)hr : 0;
}

#define SP_DEBUG_PORT 0xE9
#define SP_SYNC_PORT 0x500

int sp_whp_vcpu_run(struct sp_whp_vm *vm, int64_t timeout_ns, uint32_t flags, struct sp_whp_exit *out,
                    uint8_t *debug_buf, uint32_t debug_cap)
{
    memset(out, 0, sizeof(*out));
    if (timeout_ns <= 0)
        return sp_win_fail_code("sp_whp_vcpu_run(timeout_ns <= 0)", ERROR_INVALID_PARAMETER);
    int64_t t0 = sp_win_now_ns();

    if (InterlockedExchange(&vm->cancel_requested, 0)) {
        /* cancelled before this run began: the documented "next run returns CANCELED" */
        ResetEvent(vm->wake);
        out->reason = SP_WHP_EXIT_CANCELED;
        out->run_ns = (uint64_t)(sp_win_now_ns() - t0);
        return 0;
    }
    InterlockedExchange(&vm->timed_out, 0);
    vm->deadline_ns = t0 + timeout_ns;
    if (!ResetEvent(vm->run_done))
        return sp_win_fail("ResetEvent(run_done)");
    /* The watchdog is what makes the timeout real: no run starts without one. */
    HANDLE dog = CreateThread(NULL, 64 * 1024, watchdog, vm, 0, NULL);
    if (!dog)
        return sp_win_fail("CreateThread(watchdog)");

    uint32_t reason = 0;
    WHV_RUN_VP_EXIT_CONTEXT ctx;
    for (;;) {
        if (vm->timed_out) {
            reason = SP_WHP_EXIT_TIMEOUT;
            break;
        }
        if (InterlockedExchange(&vm->cancel_requested, 0)) {
            reason = SP_WHP_EXIT_CANCELED;
            break;
        }
        ZeroMemory(&ctx, sizeof(ctx));
        out->whv_runs++;
        HRESULT hr = whp.WHvRunVirtualProcessor(vm->part, SP_VP, &ctx, sizeof(ctx));
        if (FAILED(hr)) {
            out->hresult = (uint32_t)hr;
            sp_win_fail_hr("WHvRunVirtualProcessor", hr);
            reason = SP_WHP_EXIT_ERROR;
            break;
        }
        out->whv_exit_reason = (uint32_t)ctx.ExitReason;
        out->rip = ctx.VpContext.Rip;
        switch (ctx.ExitReason) {
        case WHvRunVpExitReasonX64Halt:
            reason = SP_WHP_EXIT_HLT;
            break;
        case WHvRunVpExitReasonX64IoPortAccess: {
            const WHV_X64_IO_PORT_ACCESS_CONTEXT *io = &ctx.IoPortAccess;
            uint32_t size = io->AccessInfo.AccessSize; /* 1, 2 or 4 bytes */
            uint64_t mask = size >= 4 ? 0xFFFFFFFFull : ((1ull << (8 * size)) - 1);
            out->io_port = io->PortNumber;
            out->io_size = (uint8_t)size;
            out->io_is_out = (uint8_t)io->AccessInfo.IsWrite;
            if (io->AccessInfo.StringOp || io->AccessInfo.RepPrefix) {
                /* ins/outs would need the emulator: report it, leave RIP on the instruction */
                out->io_is_string = 1;
                reason = SP_WHP_EXIT_IO;
                break;
            }
            /* WHP stops before the instruction completes: we are the device, so finish it
               (an `in` reads all ones, a floating bus) and step over it. */
            uint64_t next_rip = ctx.VpContext.Rip + ctx.VpContext.InstructionLength;
            int is_in = !io->AccessInfo.IsWrite;
            uint64_t rax = is_in ? ((io->Rax & ~mask) | mask) : io->Rax;
            out->io_value = (uint32_t)((is_in ? mask : io->Rax) & mask);
            int hr2 = set_regs_after_io(vm, next_rip, is_in, rax);
            if (hr2) {
                out->hresult = (uint32_t)hr2;
                sp_win_fail_hr("WHvSetVirtualProcessorRegisters(RIP after port I/O)", hr2);
                reason = SP_WHP_EXIT_ERROR;
                break;
            }
            out->rip = next_rip;
            if (!is_in && io->PortNumber == SP_DEBUG_PORT) {
                if (debug_buf && out->debug_len < debug_cap)
                    debug_buf[out->debug_len++] = (uint8_t)out->io_value;
                continue;
            }
            if (!is_in && io->PortNumber == SP_SYNC_PORT) {
                out->sync_count++;
                out->last_sync = out->io_value;
                if (flags & SP_WHP_RUN_STOP_ON_SYNC) {
                    reason = SP_WHP_EXIT_SYNC;
                    break;
                }
                continue;
            }
            reason = SP_WHP_EXIT_IO;
            break;
        }
        case WHvRunVpExitReasonMemoryAccess:
            if (vm->cow && ctx.MemoryAccess.AccessInfo.AccessType == WHvMemoryAccessWrite &&
                !ctx.MemoryAccess.AccessInfo.GpaUnmapped) {
                /* WHP stopped the store before it completed: once the page is a private writable
                   copy, running again re-executes it (RIP is still on the store). */
                int64_t c0 = sp_win_now_ns();
                int served = sp_cow_serve_write(vm->cow, vm, ctx.MemoryAccess.Gpa);
                out->cow_ns += (uint64_t)(sp_win_now_ns() - c0);
                if (served > 0) {
                    out->cow_faults++;
                    continue;
                }
                if (served < 0) {
                    out->hresult = sp_win_last_error(); /* the failed copy, unmap or map names itself */
                    reason = SP_WHP_EXIT_ERROR;
                    break;
                }
            }
            /* A GPA with no mapping, or an access the backing page refuses (the read-only view). */
            out->mem_gpa = ctx.MemoryAccess.Gpa;
            out->mem_gva = ctx.MemoryAccess.Gva;
            out->mem_access_type = ctx.MemoryAccess.AccessInfo.AccessType;
            out->mem_gpa_unmapped = ctx.MemoryAccess.AccessInfo.GpaUnmapped;
            reason = SP_WHP_EXIT_MEMORY_ACCESS;
            break;
        case WHvRunVpExitReasonCanceled:
            if (vm->timed_out)
                reason = SP_WHP_EXIT_TIMEOUT;
            else if (InterlockedExchange(&vm->cancel_requested, 0))
                reason = SP_WHP_EXIT_CANCELED;
            /* else: a late cancel from an earlier run's watchdog; run on */
            break;
        default:
            reason = SP_WHP_EXIT_OTHER;
            break;
        }
        if (reason)
            break;
    }

    /* Tell the watchdog the vCPU is out for good, then join it: it touches vm. */
    SetEvent(vm->run_done);
    if (WaitForSingleObject(dog, SP_WATCHDOG_JOIN_MS) != WAIT_OBJECT_0)
        vm->watchdog_stuck = 1; /* cannot happen by design; if it does, leak vm rather than free it under a thread */
    CloseHandle(dog);
    out->reason = reason;
    out->run_ns = (uint64_t)(sp_win_now_ns() - t0);
    return 0;
}
