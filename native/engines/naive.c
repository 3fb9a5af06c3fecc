/*
 * naive: a second snapshot engine, written plainly against the engine ABI (native/snapproof_engine.h)
 * the way a team's first attempt would be, after forkd's WpBranch (docs: /work/shared/ORIGINS.md).
 * It shares no code with the built-in engine: libc, pthreads and the kernel's userfaultfd only.
 *
 * As built by default (libsnapproof-naive.so) it has forkd's two bugs:
 *
 * - one "captured" flag per page, set *before* the page is copied. The copier sets it, then copies;
 *   a fault that finds it set takes it to mean "copied" and un-protects the page at once, so a write
 *   can land before the copier's copy has read the page.
 * - finalize sleeps 50 ms "for faults in flight to finish" and returns, instead of waiting for them
 *   and joining the handler: a capture still in flight after the sleep goes on writing into the
 *   destination after finalize said the snapshot was complete.
 *
 * Built with -DNAIVE_FIXED (libsnapproof-naive-fixed.so) both are fixed the usual way: a page is
 * CLEAN, COPYING or CAPTURED, only whoever moves it CLEAN -> COPYING copies it, a fault on a COPYING
 * page waits for CAPTURED before un-protecting it, the copier waits for the handler's COPYING pages
 * before un-protecting its batch, and finalize waits for every page, then joins the handler.
 *
 * What stays naive in both: the handler polls with a 50 ms time-out to notice it should stop, stats
 * are guarded by one mutex, and pages are copied one at a time.
 *
 * -DNAIVE_ARM_KEEPS_CAPTURED (with NAIVE_FIXED: naive-fixed-arm-keeps-captured) is a benchmark's trap: a
 * second arm leaves the pages captured by the first snapshot marked captured, so its bulk copy copies
 * nothing and reports the whole region done at once (the suite must see a round that timed no work).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "snapproof_engine.h"

#if defined(NAIVE_FIXED) && defined(NAIVE_ARM_KEEPS_CAPTURED)
#define NAIVE_NAME "naive-fixed-arm-keeps-captured"
#elif defined(NAIVE_FIXED)
#define NAIVE_NAME "naive-fixed"
#else
#define NAIVE_NAME "naive"
#endif
#define NAIVE_VERSION "0.1"
#define POLL_MS 50      /* how often the handler looks at its stop flag */
#define SETTLE_US 50000 /* the buggy finalize's sleep: forkd's 50 ms */

enum { CLEAN = 0, COPYING = 1, CAPTURED = 2 }; /* the buggy build uses CLEAN and CAPTURED only */

struct spe_engine {
    struct spe_config cfg;
    uint8_t *mem;
    uint8_t *dst;
    uint64_t page;
    uint64_t npages;
    int uffd;
    uint8_t *state; /* per page, __atomic builtins */
    pthread_t handler;
    int handler_started;
    int stop;       /* __atomic */
    int armed;
    pthread_mutex_t mu; /* guards stats */
    struct spe_stats stats;
};

static __thread char last_error[256];

uint32_t spe_abi_version(void) { return SPE_ABI_VERSION; }
const char *spe_engine_name(void) { return NAIVE_NAME; }
const char *spe_engine_version(void) { return NAIVE_VERSION; }
const char *spe_last_error(void) { return last_error; }

/* Say what failed, return -err. */
static int fail(int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof(last_error), fmt, ap);
    va_end(ap);
    return -err;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void point(struct spe_engine *e, uint32_t which, uint64_t first, uint64_t n)
{
    if (e->cfg.point)
        e->cfg.point(e->cfg.point_ctx, which, first, n);
}

static int protect(struct spe_engine *e, uint64_t first, uint64_t n, int on)
{
    /* Un-protecting without DONTWAKE also wakes whoever waits on the range. */
    struct uffdio_writeprotect wp = {
        .range = {.start = (uint64_t)(uintptr_t)(e->mem + first * e->page), .len = n * e->page},
        .mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    if (ioctl(e->uffd, UFFDIO_WRITEPROTECT, &wp) < 0)
        return fail(errno, "UFFDIO_WRITEPROTECT(%s pages %#lx+%#lx)", on ? "protect" : "un-protect",
                    (unsigned long)first, (unsigned long)n);
    return 0;
}

static void copy_page(struct spe_engine *e, uint64_t p)
{
    memcpy(e->dst + p * e->page, e->mem + p * e->page, e->page);
}

#ifdef NAIVE_FIXED
/* Wait until page p is CAPTURED; -1 past the deadline (0: none). */
static int wait_captured(struct spe_engine *e, uint64_t p, int64_t deadline)
{
    while (__atomic_load_n(&e->state[p], __ATOMIC_ACQUIRE) != CAPTURED) {
        if (deadline && now_ns() > deadline)
            return -1;
        sched_yield();
    }
    return 0;
}
#endif

/* The fault handler's part for one page; returns 1 if it copied the page. */
static int capture_for_fault(struct spe_engine *e, uint64_t p)
{
#ifndef NAIVE_FIXED
    if (__atomic_exchange_n(&e->state[p], CAPTURED, __ATOMIC_ACQ_REL) == CAPTURED)
        return 0; /* "captured": somebody has it */
    point(e, SPE_POINT_FAULT_CAPTURE, p, 1);
    copy_page(e, p);
    return 1;
#else
    uint8_t expect = CLEAN;
    if (__atomic_compare_exchange_n(&e->state[p], &expect, COPYING, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        point(e, SPE_POINT_FAULT_CAPTURE, p, 1);
        copy_page(e, p);
        __atomic_store_n(&e->state[p], CAPTURED, __ATOMIC_RELEASE);
        return 1;
    }
    if (expect == COPYING) {
        point(e, SPE_POINT_FAULT_WAIT, p, 1);
        pthread_mutex_lock(&e->mu);
        e->stats.waited_on_copier++;
        pthread_mutex_unlock(&e->mu);
        wait_captured(e, p, 0);
    }
    return 0;
#endif
}

static int serve(struct spe_engine *e, const struct uffd_msg *msg)
{
    int64_t t0 = now_ns();
    uint64_t addr = msg->arg.pagefault.address & ~(e->page - 1);
    uint64_t p = (addr - (uint64_t)(uintptr_t)e->mem) / e->page;
    if (addr < (uint64_t)(uintptr_t)e->mem || p >= e->npages)
        return fail(EFAULT, "handler: fault at %#lx outside guest memory", (unsigned long)addr);
    int copied = (msg->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) ? capture_for_fault(e, p) : 0;
    uint64_t ns = (uint64_t)(now_ns() - t0);
    int cpu = sched_getcpu();
    /* Recorded before the un-protect wakes the writer: whoever it unblocks sees the fault counted. */
    pthread_mutex_lock(&e->mu);
    struct spe_stats *s = &e->stats;
    s->faults++;
    s->fault_pages += (uint64_t)copied;
    s->service_ns_total += ns;
    if (ns > s->service_ns_max)
        s->service_ns_max = ns;
    s->hist_us[ns / 1000 < SPE_HIST_BUCKETS - 1 ? ns / 1000 : SPE_HIST_BUCKETS - 1]++;
    if (cpu >= 0 && cpu < SPE_MAX_CPUS)
        s->handler_cpu[cpu]++;
    if (s->log_len < SPE_FAULT_LOG) {
        struct spe_fault *f = &s->log[s->log_len++];
        f->offset = addr - (uint64_t)(uintptr_t)e->mem;
        f->flags = msg->arg.pagefault.flags;
        f->service_ns = ns;
        f->tid = msg->arg.pagefault.feat.ptid;
        f->handler_cpu = cpu;
        f->copied = (uint32_t)copied;
    }
    pthread_mutex_unlock(&e->mu);
    return protect(e, p, 1, 0);
}

static void *handler_main(void *arg)
{
    struct spe_engine *e = arg;
    if (e->cfg.handler_cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(e->cfg.handler_cpu, &set);
        sched_setaffinity(0, sizeof(set), &set);
    }
    int err = 0;
    struct pollfd pfd = {.fd = e->uffd, .events = POLLIN};
    while (!__atomic_load_n(&e->stop, __ATOMIC_ACQUIRE)) {
        int n = poll(&pfd, 1, POLL_MS);
        if (n < 0 && errno != EINTR) {
            err = errno;
            break;
        }
        if (n <= 0)
            continue;
        struct uffd_msg msg;
        ssize_t got = read(e->uffd, &msg, sizeof(msg));
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            err = errno;
            break;
        }
        if (msg.event != UFFD_EVENT_PAGEFAULT) {
            pthread_mutex_lock(&e->mu);
            e->stats.other_events++;
            pthread_mutex_unlock(&e->mu);
            continue;
        }
        int r = serve(e, &msg);
        if (r < 0) {
            err = -r;
            break;
        }
    }
    pthread_mutex_lock(&e->mu);
    e->stats.handler_err = err;
    e->stats.handler_alive = 0;
    pthread_mutex_unlock(&e->mu);
    if (err) /* nobody serves faults any more: let every writer through (the snapshot is void) */
        protect(e, 0, e->npages, 0);
    return NULL;
}

int spe_create(const struct spe_config *cfg, struct spe_engine **out)
{
    *out = NULL;
    if (cfg->abi_version != SPE_ABI_VERSION || cfg->struct_size < sizeof(*cfg))
        return fail(EINVAL, "spe_create: configuration of ABI %u, this engine implements %u", cfg->abi_version,
                    SPE_ABI_VERSION);
    if (cfg->switches)
        return fail(EINVAL, "spe_create: this engine has no fault-injection switches (asked %#lx)",
                    (unsigned long)cfg->switches);
    if (!cfg->page_size || cfg->mem % cfg->page_size || cfg->mem_size % cfg->page_size || !cfg->mem_size ||
        cfg->dst_size < cfg->mem_size)
        return fail(EINVAL, "spe_create: guest memory not page aligned, or destination too small");
    struct spe_engine *e = calloc(1, sizeof(*e));
    if (!e)
        return fail(ENOMEM, "spe_create: calloc");
    e->cfg = *cfg;
    e->mem = (uint8_t *)(uintptr_t)cfg->mem;
    e->dst = (uint8_t *)(uintptr_t)cfg->dst;
    e->page = cfg->page_size;
    e->npages = cfg->mem_size / cfg->page_size;
    e->uffd = -1;
    pthread_mutex_init(&e->mu, NULL);
    int r;
    e->state = calloc(e->npages, 1);
    if (!e->state) {
        r = fail(ENOMEM, "spe_create: calloc(page flags)");
        goto out;
    }
    e->uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (e->uffd < 0 && (errno == EPERM || errno == EACCES)) {
        /* Without root the kernel-mode faults KVM raises need /dev/userfaultfd (6.1+): a group may own it. */
        int sys_errno = errno, dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        if (dev >= 0) {
            e->uffd = ioctl(dev, _IO(0xAA, 0x00) /* USERFAULTFD_IOC_NEW */, O_CLOEXEC | O_NONBLOCK);
            int err = errno;
            close(dev);
            errno = err;
        } else {
            errno = sys_errno; /* the syscall's answer: the node is only the second way in */
        }
    }
    if (e->uffd < 0) {
        r = fail(errno, "userfaultfd(2)");
        goto out;
    }
    struct uffdio_api api = {.api = UFFD_API, .features = cfg->uffd_features};
    if (ioctl(e->uffd, UFFDIO_API, &api) < 0) {
        r = fail(errno, "UFFDIO_API(features %#lx)", (unsigned long)cfg->uffd_features);
        goto out;
    }
    e->stats.features_requested = cfg->uffd_features;
    e->stats.features_granted = api.features;
    struct uffdio_register reg = {.range = {.start = cfg->mem, .len = cfg->mem_size},
                                  .mode = UFFDIO_REGISTER_MODE_WP};
    if (ioctl(e->uffd, UFFDIO_REGISTER, &reg) < 0) {
        r = fail(errno, "UFFDIO_REGISTER(WP)");
        goto out;
    }
    e->stats.handler_alive = 1;
    if ((r = pthread_create(&e->handler, NULL, handler_main, e)) != 0) {
        r = fail(r, "pthread_create(handler)");
        goto out;
    }
    e->handler_started = 1;
    *out = e;
    return 0;
out:
    spe_close(e);
    return r;
}

int spe_arm(struct spe_engine *e)
{
    if (!e->dst)
        return fail(EINVAL, "spe_arm: finalized; no destination");
    int64_t t0 = now_ns();
#ifndef NAIVE_ARM_KEEPS_CAPTURED
    memset(e->state, CLEAN, e->npages);
#endif
    int r = protect(e, 0, e->npages, 1);
    pthread_mutex_lock(&e->mu);
    e->stats.arm_ns = (uint64_t)(now_ns() - t0);
    pthread_mutex_unlock(&e->mu);
    if (r == 0)
        e->armed = 1;
    return r;
}

int spe_disarm(struct spe_engine *e)
{
    int r = protect(e, 0, e->npages, 0);
    if (r == 0)
        e->armed = 0;
    return r;
}

int spe_rearm(struct spe_engine *e, uint64_t first, uint64_t n)
{
    if (first > e->npages || n > e->npages - first)
        return fail(EINVAL, "spe_rearm: pages %#lx+%#lx outside guest memory", (unsigned long)first,
                    (unsigned long)n);
    memset(e->state + first, CLEAN, n);
    int r = protect(e, first, n, 1);
    if (r == 0)
        e->armed = 1;
    return r;
}

int64_t spe_bulk_copy(struct spe_engine *e, uint64_t first, uint64_t n, uint64_t batch)
{
    if (first > e->npages || n > e->npages - first)
        return fail(EINVAL, "spe_bulk_copy: pages %#lx+%#lx outside guest memory", (unsigned long)first,
                    (unsigned long)n);
    if (!e->dst)
        return fail(EINVAL, "spe_bulk_copy: finalized; no destination");
    if (!batch)
        batch = 256;
    int64_t copied = 0;
    for (uint64_t b = first; b < first + n; b += batch) {
        uint64_t end = b + batch < first + n ? b + batch : first + n;
        for (uint64_t p = b; p < end; p++) {
#ifndef NAIVE_FIXED
            if (__atomic_exchange_n(&e->state[p], CAPTURED, __ATOMIC_ACQ_REL) == CAPTURED)
                continue;
            point(e, SPE_POINT_BULK_CAPTURE, p, 1);
            copy_page(e, p);
            copied++;
#else
            uint8_t expect = CLEAN;
            if (!__atomic_compare_exchange_n(&e->state[p], &expect, COPYING, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                continue;
            point(e, SPE_POINT_BULK_CAPTURE, p, 1);
            copy_page(e, p);
            __atomic_store_n(&e->state[p], CAPTURED, __ATOMIC_RELEASE);
            copied++;
#endif
        }
#ifdef NAIVE_FIXED
        for (uint64_t p = b; p < end; p++)
            if (__atomic_load_n(&e->state[p], __ATOMIC_ACQUIRE) == COPYING) {
                point(e, SPE_POINT_BULK_WAIT, p, 1);
                wait_captured(e, p, 0);
            }
#endif
        point(e, SPE_POINT_BULK_UNPROTECT, b, end - b);
        int r = protect(e, b, end - b, 0);
        if (r < 0)
            return r;
    }
    pthread_mutex_lock(&e->mu);
    e->stats.bulk_pages += (uint64_t)copied;
    pthread_mutex_unlock(&e->mu);
    return copied;
}

static int stop_handler(struct spe_engine *e, int64_t timeout_ns)
{
    if (!e->handler_started)
        return 0;
    __atomic_store_n(&e->stop, 1, __ATOMIC_RELEASE);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t end = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec + timeout_ns;
    ts.tv_sec = (time_t)(end / 1000000000LL);
    ts.tv_nsec = (long)(end % 1000000000LL);
    int r = pthread_timedjoin_np(e->handler, NULL, &ts);
    if (r)
        return fail(r, "pthread_timedjoin_np(handler)");
    e->handler_started = 0;
    return 0;
}

int spe_finalize(struct spe_engine *e, int64_t timeout_ns)
{
#ifndef NAIVE_FIXED
    (void)timeout_ns;
    usleep(SETTLE_US); /* faults in flight have had time to finish */
    for (uint64_t p = 0; p < e->npages; p++)
        if (__atomic_load_n(&e->state[p], __ATOMIC_ACQUIRE) != CAPTURED)
            return fail(EAGAIN, "spe_finalize: page %#lx not captured", (unsigned long)p);
    __atomic_store_n(&e->stop, 1, __ATOMIC_RELEASE); /* the handler sees it at its next poll time-out */
    int r = protect(e, 0, e->npages, 0);
    e->armed = 0;
    return r;
#else
    int64_t deadline = now_ns() + timeout_ns;
    for (uint64_t p = 0; p < e->npages; p++) {
        uint8_t s = __atomic_load_n(&e->state[p], __ATOMIC_ACQUIRE);
        if (s == CLEAN)
            return fail(EAGAIN, "spe_finalize: page %#lx not captured", (unsigned long)p);
        if (s == COPYING && wait_captured(e, p, deadline) < 0)
            return fail(EAGAIN, "spe_finalize: page %#lx still being captured after the time-out",
                        (unsigned long)p);
    }
    int r = protect(e, 0, e->npages, 0);
    if (r < 0)
        return r;
    e->armed = 0;
    r = stop_handler(e, deadline - now_ns() > 0 ? deadline - now_ns() : 0);
    if (r == 0)
        e->dst = NULL;
    return r;
#endif
}

int spe_release(struct spe_engine *e, int64_t timeout_ns)
{
    int r = 0;
    if (e->armed && (r = protect(e, 0, e->npages, 0)) == 0)
        e->armed = 0;
    int s = stop_handler(e, timeout_ns);
    e->dst = NULL;
    return r ? r : s;
}

void spe_get_stats(struct spe_engine *e, struct spe_stats *out)
{
    pthread_mutex_lock(&e->mu);
    *out = e->stats;
    pthread_mutex_unlock(&e->mu);
}

void spe_close(struct spe_engine *e)
{
    if (!e)
        return;
    if (e->uffd >= 0) {
        spe_release(e, 5000000000LL);
        if (e->handler_started)
            return; /* the handler would not stop: leaking is safer than freeing under it */
        struct uffdio_range range = {.start = e->cfg.mem, .len = e->cfg.mem_size};
        ioctl(e->uffd, UFFDIO_UNREGISTER, &range);
        close(e->uffd);
    }
    pthread_mutex_destroy(&e->mu);
    free(e->state);
    free(e);
}
