/*
 * Shared helpers of the Windows native layer: the per-thread "what failed"
 * record, a monotonic clock, and the process commit charge.
 */
#include "internal.h"

#include <psapi.h>

static SP_THREAD_LOCAL const char *tls_last_op = "";
static SP_THREAD_LOCAL uint32_t tls_last_error;
static SP_THREAD_LOCAL int tls_last_is_hresult;

const char *sp_win_last_op(void)
{
    return tls_last_op;
}

uint32_t sp_win_last_error(void)
{
    return tls_last_error;
}

int sp_win_last_is_hresult(void)
{
    return tls_last_is_hresult;
}

int sp_win_fail_code(const char *op, uint32_t win32_error)
{
    tls_last_op = op;
    tls_last_error = win32_error;
    tls_last_is_hresult = 0;
    return -1;
}

int sp_win_fail(const char *op)
{
    return sp_win_fail_code(op, (uint32_t)GetLastError());
}

int sp_win_fail_hr(const char *op, long hresult)
{
    tls_last_op = op;
    tls_last_error = (uint32_t)hresult;
    tls_last_is_hresult = 1;
    return -1;
}

int64_t sp_win_now_ns(void)
{
    /* QPC never fails on XP and later; split the multiply so 1e9 * ticks cannot overflow. */
    LARGE_INTEGER freq, now;
    QueryPerformanceFrequency(&freq);
    QueryPerformanceCounter(&now);
    int64_t f = freq.QuadPart, t = now.QuadPart;
    return (t / f) * 1000000000LL + (t % f) * 1000000000LL / f;
}

uint32_t sp_win_page_size(void)
{
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    return si.dwPageSize;
}

uint32_t sp_win_allocation_granularity(void)
{
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    return si.dwAllocationGranularity;
}

int sp_win_private_usage(uint64_t *out)
{
    /* PrivateUsage is the process's commit charge: a FILE_MAP_COPY view is charged here in full. */
    PROCESS_MEMORY_COUNTERS_EX pmc;
    ZeroMemory(&pmc, sizeof(pmc));
    pmc.cb = sizeof(pmc);
    *out = 0;
    if (!GetProcessMemoryInfo(GetCurrentProcess(), (PROCESS_MEMORY_COUNTERS *)&pmc, sizeof(pmc)))
        return sp_win_fail("GetProcessMemoryInfo");
    *out = (uint64_t)pmc.PrivateUsage;
    return 0;
}

void sp_win_quiet_crashes(void)
{
    /* A negative-control child is meant to die of an access violation: no WER dialog may wait for a click. */
    SetErrorMode(GetErrorMode() | SEM_FAILCRITICALERRORS | SEM_NOGPFAULTERRORBOX | SEM_NOOPENFILEERRORBOX);
}
