/* Error reporting, clocks and CPU placement shared by the Linux C files. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "internal.h"

static __thread const char *tls_last_op = "";

const char *sp_last_op(void) { return tls_last_op; }
void sp_set_last_op(const char *op) { tls_last_op = op; }

int sp_fail(const char *op)
{
    int e = errno ? errno : EIO;
    tls_last_op = op;
    return -e;
}

int64_t sp_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int sp_current_cpu(void) { return sched_getcpu(); }
int sp_gettid(void) { return (int)syscall(SYS_gettid); }

int sp_pin_current_thread(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) < 0)
        return sp_fail("sched_setaffinity");
    return 0;
}

/* CPUID for the host probe: leaf 1's hypervisor bit and leaf 0x40000000's hypervisor signature tell
 * bare metal from a guest without dmesg. Other architectures have no CPUID: -ENOSYS. */
int sp_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t *out4)
{
#if defined(__x86_64__) || defined(__i386__)
    unsigned int a, b, c, d;
    __cpuid_count(leaf, subleaf, a, b, c, d);
    out4[0] = a;
    out4[1] = b;
    out4[2] = c;
    out4[3] = d;
    return 0;
#else
    (void)leaf;
    (void)subleaf;
    (void)out4;
    sp_set_last_op("cpuid");
    return -ENOSYS;
#endif
}
