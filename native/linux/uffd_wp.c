/*
 * The userfaultfd write-protect snapshot engine.
 *
 * Arm write-protects the whole guest region; from then on a page reaches the
 * snapshot exactly once, either by the bulk copier or by the fault handler
 * when the guest writes it first. Each page moves CLEAN -> COPYING ->
 * CAPTURED, and only whoever wins CLEAN -> COPYING copies it. A fault on a
 * page in COPYING waits for CAPTURED before un-protecting it, so a guest
 * write can never land before the copy has read the page (forkd's single
 * "captured" flag, set before the copy, let it: SP_INJECT_SINGLE_FLAG_RACE
 * reproduces that on purpose).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

/* Newer than the 6.1 headers this may be built against; values from the kernel UAPI. */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1ULL << 13)
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

#define PAGE 4096ULL
#define SP_COPY_RUN 64ULL /* pages the bulk copier claims and copies at once (256 KiB) */
#define PM_UFFD_WP (1ULL << 57)
#define PM_PRESENT (1ULL << 63)
#define PM_SWAPPED (1ULL << 62)

static inline void cpu_relax(void) { __builtin_ia32_pause(); }

int sp_uffd_open(int *via_devnode)
{
    *via_devnode = 0;
    /* Kernel-mode faults are required: KVM touches guest memory from the kernel. */
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0)
        return fd;
    int sys_errno = errno;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        int e = errno;
        close(dev);
        if (fd >= 0) {
            *via_devnode = 1;
            return fd;
        }
        errno = e;
        return sp_fail("USERFAULTFD_IOC_NEW");
    }
    errno = sys_errno;
    return sp_fail("userfaultfd(2)");
}

int sp_uffd_api(int uffd, uint64_t features, uint64_t *supported, uint64_t *ioctls)
{
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(uffd, UFFDIO_API, &api) < 0)
        return sp_fail("UFFDIO_API");
    *supported = api.features;
    *ioctls = api.ioctls;
    return 0;
}

int sp_uffd_register(int uffd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls)
{
    struct uffdio_register reg = {.range = {.start = start, .len = len}, .mode = mode};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        return sp_fail("UFFDIO_REGISTER");
    *ioctls = reg.ioctls;
    return 0;
}

int sp_uffd_unregister(int uffd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = {.start = start, .len = len};
    return ioctl(uffd, UFFDIO_UNREGISTER, &range) < 0 ? sp_fail("UFFDIO_UNREGISTER") : 0;
}

int sp_uffd_writeprotect(int uffd, uint64_t start, uint64_t len, int protect)
{
    /* Clearing protection without DONTWAKE also wakes threads waiting on the range. */
    struct uffdio_writeprotect wp = {
        .range = {.start = start, .len = len},
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    return ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0 ? sp_fail("UFFDIO_WRITEPROTECT") : 0;
}

/* Read the pagemap entries of [start, start + npages pages): the only
 * evidence that protection took effect (the ioctl succeeds even where it
 * protected nothing). Returns how many pages carry PM_UFFD_WP. */
int sp_pagemap_scan_wp(uint64_t start, uint64_t npages, uint8_t *present, uint8_t *uffd_wp)
{
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return sp_fail("open(/proc/self/pagemap)");
    enum { CHUNK = 4096 };
    static __thread uint64_t buf[CHUNK];
    int count = 0;
    for (uint64_t done = 0; done < npages;) {
        uint64_t n = npages - done < CHUNK ? npages - done : CHUNK;
        off_t off = (off_t)(((start / PAGE) + done) * sizeof(uint64_t));
        ssize_t got = pread(fd, buf, n * sizeof(uint64_t), off);
        if (got != (ssize_t)(n * sizeof(uint64_t))) {
            if (got >= 0)
                errno = EIO;
            int r = sp_fail("pread(/proc/self/pagemap)");
            close(fd);
            return r;
        }
        for (uint64_t i = 0; i < n; i++) {
            present[done + i] = (buf[i] & (PM_PRESENT | PM_SWAPPED)) != 0;
            uffd_wp[done + i] = (buf[i] & PM_UFFD_WP) != 0;
            count += uffd_wp[done + i];
        }
        done += n;
    }
    close(fd);
    return count;
}

/* include/uapi/linux/fs.h (6.7); defined here for older headers. */
struct sp_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define SP_PAGEMAP_SCAN _IOWR('f', 16, struct sp_pm_scan_arg)
_Static_assert(sizeof(struct sp_pm_scan_arg) == 96, "pm_scan_arg is 12 u64s");
_Static_assert(sizeof(struct sp_page_region) == 24, "page_region is 3 u64s");

int64_t sp_pagemap_scan(uint64_t start, uint64_t end, uint64_t flags, uint64_t category_mask,
                        uint64_t return_mask, struct sp_page_region *vec, uint64_t vec_len,
                        uint64_t *walk_end)
{
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return sp_fail("open(/proc/self/pagemap)");
    struct sp_pm_scan_arg arg = {
        .size = sizeof(arg), .flags = flags, .start = start, .end = end,
        .vec = (uint64_t)(uintptr_t)vec, .vec_len = vec_len,
        .category_mask = category_mask, .return_mask = return_mask,
    };
    long r = ioctl(fd, SP_PAGEMAP_SCAN, &arg);
    int e = errno;
    close(fd);
    if (r < 0) {
        errno = e;
        return sp_fail("PAGEMAP_SCAN");
    }
    *walk_end = arg.walk_end;
    return r;
}

struct sp_wp {
    uint64_t page; /* the WP granule: 4 KiB, or the huge page size on hugetlb */
    int uffd;
    int stop_fd;
    uint8_t *mem;
    uint64_t size;
    uint64_t npages;
    uint8_t *dst;
    uint8_t *state; /* enum sp_page_state, accessed with __atomic builtins */
    uint32_t inject;
    uint64_t race_window_ns;
    int handler_cpu;
    int armed;
    int registered;
    int thread_started;
    int stopping;   /* stop_handler() asked the handler to exit: its exit is no death */
    int died;       /* the handler exited unasked: the snapshot is void (EOWNERDEAD from here on) */
    pthread_t thread;
    struct sp_wp_stats stats;
    sp_point_fn point; /* the named points' hook, or NULL */
    void *point_ctx;
};

/* A named point (enum sp_point): a test may hold this thread here, at this page, to line a race up. */
static inline void at_point(struct sp_wp *w, uint32_t point, uint64_t first_page, uint64_t npages)
{
    if (w->point)
        w->point(w->point_ctx, point, first_page, npages);
}

/* The snapshot is void once the handler died: writes it never served have landed uncaptured. */
static int refuse_if_dead(struct sp_wp *w, const char *op)
{
    if (!__atomic_load_n(&w->died, __ATOMIC_ACQUIRE))
        return 0;
    errno = EOWNERDEAD;
    return sp_fail(op);
}

/* The injected race window sleeps, as a copier blocked in pwrite() would: spinning here would
 * take the CPU the guest needs to write inside the window. */
static void sleep_ns(uint64_t ns)
{
    struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ULL), .tv_nsec = (long)(ns % 1000000000ULL)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static void copy_page(struct sp_wp *w, uint64_t page)
{
    memcpy(w->dst + page * w->page, w->mem + page * w->page, w->page);
}

/* SP_INJECT_EXTRA_COPY_PER_FAULT: the page goes through a staging page mapped for this fault alone (mmap,
 * first touch, copy in, copy out, munmap), as a handler that allocates a bounce buffer per fault does.
 * The snapshot is the same; each fault costs a mapping, a page fault and a second copy more. */
static void copy_page_staged(struct sp_wp *w, uint64_t page)
{
    uint8_t *bounce = mmap(NULL, w->page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (bounce == MAP_FAILED) {
        copy_page(w, page); /* the regression is the extra work; a failed mapping must not break the copy */
        return;
    }
    memcpy(bounce, w->mem + page * w->page, w->page);
    memcpy(w->dst + page * w->page, bounce, w->page);
    munmap(bounce, w->page);
}

/* Capture one page for a fault; returns 1 if this call copied it. */
static int capture_for_fault(struct sp_wp *w, uint64_t page)
{
    uint8_t *st = &w->state[page];
    if (w->inject & SP_INJECT_NO_COPY_BEFORE_WRITE)
        return 0; /* the bug: let the write land, whatever the copier does later */
    if (w->inject & SP_INJECT_SINGLE_FLAG_RACE) {
        /* The bug: one flag, and "set" means "someone will copy it", not "copied". */
        if (__atomic_exchange_n(st, SP_PAGE_CAPTURED, __ATOMIC_ACQ_REL) == SP_PAGE_CAPTURED)
            return 0;
        at_point(w, SP_POINT_FAULT_CAPTURE, page, 1);
        copy_page(w, page);
        return 1;
    }
    uint8_t expect = SP_PAGE_CLEAN;
    if (__atomic_compare_exchange_n(st, &expect, SP_PAGE_COPYING, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        at_point(w, SP_POINT_FAULT_CAPTURE, page, 1);
        if (w->inject & SP_INJECT_EXTRA_COPY_PER_FAULT)
            copy_page_staged(w, page);
        else
            copy_page(w, page);
        __atomic_store_n(st, SP_PAGE_CAPTURED, __ATOMIC_RELEASE);
        return 1;
    }
    if (expect == SP_PAGE_COPYING) {
        at_point(w, SP_POINT_FAULT_WAIT, page, 1);
        w->stats.waited_on_copier++;
        while (__atomic_load_n(st, __ATOMIC_ACQUIRE) != SP_PAGE_CAPTURED)
            cpu_relax();
    }
    return 0;
}

static void record_fault(struct sp_wp *w, const struct uffd_msg *msg, uint64_t offset, int copied,
                         int64_t t0)
{
    struct sp_wp_stats *s = &w->stats;
    uint64_t ns = (uint64_t)(sp_now_ns() - t0);
    int cpu = sched_getcpu();
    s->faults++;
    s->fault_pages += (uint64_t)copied;
    s->service_ns_total += ns;
    if (ns > s->service_ns_max)
        s->service_ns_max = ns;
    uint64_t us = ns / 1000;
    s->hist_us[us < SP_HIST_BUCKETS - 1 ? us : SP_HIST_BUCKETS - 1]++;
    if (cpu >= 0 && cpu < SP_MAX_CPUS)
        s->handler_cpu[cpu]++;
    if (s->log_len < SP_FAULT_LOG) {
        struct sp_fault_rec *r = &s->log[s->log_len++];
        r->offset = offset;
        r->flags = msg->arg.pagefault.flags;
        r->service_ns = ns;
        r->tid = msg->arg.pagefault.feat.ptid;
        r->handler_cpu = cpu;
        r->copied = (uint32_t)copied;
    }
}

static int serve(struct sp_wp *w, const struct uffd_msg *msg)
{
    int64_t t0 = sp_now_ns();
    uint64_t addr = msg->arg.pagefault.address & ~(w->page - 1);
    uint64_t base = (uint64_t)(uintptr_t)w->mem;
    if (addr < base || addr >= base + w->size) {
        errno = EFAULT; /* a fault outside the region we registered: never expected */
        return sp_fail("handler: fault outside the region");
    }
    uint64_t page = (addr - base) / w->page;
    int copied = 0;
    if (w->inject & SP_INJECT_WAKE_BEFORE_COPY) {
        /* The bug: the page is writable and its writer woken before the copy below has read it. */
        int r = sp_uffd_writeprotect(w->uffd, addr, w->page, 0);
        if (r < 0)
            return r;
    }
    if (msg->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP)
        copied = capture_for_fault(w, page);
    /* Un-protect without waking, record, then wake: whoever the write unblocks sees
     * the fault in the stats already. */
    struct uffdio_writeprotect wp = {
        .range = {.start = addr, .len = w->page}, .mode = UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
    };
    if (ioctl(w->uffd, UFFDIO_WRITEPROTECT, &wp) < 0)
        return sp_fail("UFFDIO_WRITEPROTECT(un-protect)");
    record_fault(w, msg, addr - base, copied, t0);
    struct uffdio_range range = {.start = addr, .len = w->page};
    if (ioctl(w->uffd, UFFDIO_WAKE, &range) < 0)
        return sp_fail("UFFDIO_WAKE");
    return 0;
}

/*
 * A handler that dies mid-snapshot must not leave anyone blocked on a fault it will never serve,
 * and time-outs cannot be what frees them. Measured on kvm_pvm, kernel 6.18
 * (tests/test_reliability_dead_handler.py): a vCPU whose write waits on a WP fault does not leave
 * KVM_RUN for the run loop's deadline signal (SP_KICK_SIGNAL + immediate_exit) or a kick: the
 * signal ends the fault wait, KVM retries the access at once, and the vCPU thread spins in the
 * kernel at 100% CPU until the page is un-protected. A host thread's user-mode fault is retried
 * the same way after its signal handler. So whenever the handler exits without being asked to
 * (an error, or SP_INJECT_HANDLER_DIES's abrupt pthread_exit()), this cleanup un-protects the
 * whole region, which wakes every waiter (UFFDIO_WRITEPROTECT without DONTWAKE). Their writes
 * then land uncaptured, so the snapshot is void: arm, bulk copy and finalize refuse with
 * EOWNERDEAD from then on, and native/wp.py raises HandlerDied naming the dead handler.
 */
static void handler_exit(void *arg)
{
    struct sp_wp *w = arg;
    int died = !__atomic_load_n(&w->stopping, __ATOMIC_ACQUIRE);
    if (died) {
        if (!w->stats.handler_err)
            w->stats.handler_err = EIO;
        __atomic_store_n(&w->died, 1, __ATOMIC_RELEASE);
    }
    /* Dead in the stats before anyone is woken: a waiter that resumes sees why at once. */
    __atomic_store_n(&w->stats.handler_alive, 0, __ATOMIC_RELEASE);
    if (died) {
        struct uffdio_writeprotect wp = {.range = {.start = (uint64_t)(uintptr_t)w->mem, .len = w->size}};
        (void)ioctl(w->uffd, UFFDIO_WRITEPROTECT, &wp); /* sp_wp_release() un-protects again if this failed */
    }
}

static int serve_or_die(void *ctx, const struct uffd_msg *msg)
{
    struct sp_wp *w = ctx;
    if (w->inject & SP_INJECT_HANDLER_DIES) {
        /* Dies abruptly, mid-fault, the message read and never served: only handler_exit() runs. */
        w->stats.handler_err = ECANCELED;
        pthread_exit(NULL);
    }
    return serve(w, msg);
}

static void *handler_main(void *arg)
{
    struct sp_wp *w = arg;
    pthread_cleanup_push(handler_exit, w);
    if (w->handler_cpu >= 0)
        sp_pin_current_thread(w->handler_cpu);
    int err = sp_uffd_serve_loop(w->uffd, w->stop_fd, serve_or_die, w, &w->stats.other_events);
    if (err)
        w->stats.handler_err = err;
    pthread_cleanup_pop(1);
    return NULL;
}

static int stop_handler(struct sp_wp *w, int64_t timeout_ns)
{
    if (!w->thread_started)
        return 0;
    __atomic_store_n(&w->stopping, 1, __ATOMIC_RELEASE);
    int r = sp_uffd_stop_thread(w->thread, w->stop_fd, timeout_ns);
    if (r == 0)
        w->thread_started = 0;
    return r;
}

int sp_wp_create(uint64_t mem, uint64_t size, uint64_t page_size, uint64_t features, uint32_t inject,
                 uint64_t race_window_ns, int handler_cpu, struct sp_wp **out, uint64_t *supported)
{
    *out = NULL;
    *supported = 0;
    if (page_size < PAGE || (page_size & (page_size - 1)) || size == 0 || size % page_size || mem % page_size) {
        errno = EINVAL;
        return sp_fail("sp_wp_create(region not page aligned)");
    }
    struct sp_wp *w = calloc(1, sizeof(*w));
    if (!w) {
        errno = ENOMEM;
        return sp_fail("calloc");
    }
    w->uffd = w->stop_fd = -1;
    w->mem = (uint8_t *)(uintptr_t)mem;
    w->size = size;
    w->page = page_size;
    w->npages = size / page_size;
    w->inject = inject;
    w->race_window_ns = race_window_ns;
    w->handler_cpu = handler_cpu;
    int r, via_devnode;
    uint64_t ioctls = 0;
    w->state = calloc(w->npages, 1);
    if (!w->state) {
        errno = ENOMEM;
        r = sp_fail("calloc(page states)");
        goto fail;
    }
    if ((r = sp_uffd_open(&via_devnode)) < 0)
        goto fail;
    w->uffd = r;
    if ((r = sp_uffd_api(w->uffd, features, supported, &ioctls)) < 0)
        goto fail;
    if ((r = sp_uffd_register(w->uffd, mem, size, UFFDIO_REGISTER_MODE_WP, &ioctls)) < 0)
        goto fail;
    w->registered = 1;
    if (!(ioctls & (1ULL << _UFFDIO_WRITEPROTECT))) {
        errno = EOPNOTSUPP; /* registered, but this memory type offers no WP ioctl */
        r = sp_fail("UFFDIO_REGISTER(no UFFDIO_WRITEPROTECT for this memory)");
        goto fail;
    }
    w->stop_fd = eventfd(0, EFD_CLOEXEC);
    if (w->stop_fd < 0) {
        r = sp_fail("eventfd");
        goto fail;
    }
    w->stats.handler_alive = 1;
    if ((r = pthread_create(&w->thread, NULL, handler_main, w)) != 0) {
        errno = r;
        r = sp_fail("pthread_create(handler)");
        goto fail;
    }
    w->thread_started = 1;
    *out = w;
    return 0;
fail:
    sp_wp_destroy(w);
    return r;
}

int sp_wp_set_destination(struct sp_wp *w, uint64_t dst)
{
    w->dst = (uint8_t *)(uintptr_t)dst;
    return 0;
}

int sp_wp_set_points(struct sp_wp *w, sp_point_fn fn, void *ctx)
{
    w->point_ctx = ctx;
    w->point = fn;
    return 0;
}

int sp_wp_arm(struct sp_wp *w)
{
    if (!w->dst) {
        errno = EINVAL;
        return sp_fail("sp_wp_arm(no destination)");
    }
    if (refuse_if_dead(w, "sp_wp_arm(fault handler died)") < 0)
        return -EOWNERDEAD; /* nobody would serve the faults: writers would block until release */
    int64_t t0 = sp_now_ns();
    memset(w->state, SP_PAGE_CLEAN, w->npages);
    int r = 0;
    if (w->inject & SP_INJECT_ARM_PER_PAGE) {
        /* The regression: one ioctl (and one walk of the page tables) per page instead of one for the region. */
        for (uint64_t p = 0; p < w->npages && r == 0; p++)
            r = sp_uffd_writeprotect(w->uffd, (uint64_t)(uintptr_t)(w->mem + p * w->page), w->page, 1);
    } else {
        r = sp_uffd_writeprotect(w->uffd, (uint64_t)(uintptr_t)w->mem, w->size, 1);
    }
    w->stats.arm_ns = (uint64_t)(sp_now_ns() - t0);
    if (r == 0)
        w->armed = 1;
    return r;
}

/* Protect [first, first + n) again with its pages CLEAN: a second snapshot of part of the region. */
int sp_wp_rearm_range(struct sp_wp *w, uint64_t first_page, uint64_t npages)
{
    if (first_page > w->npages || npages > w->npages - first_page) {
        errno = EINVAL;
        return sp_fail("sp_wp_rearm_range(range)");
    }
    if (!w->dst) {
        errno = EINVAL;
        return sp_fail("sp_wp_rearm_range(no destination)");
    }
    if (refuse_if_dead(w, "sp_wp_rearm_range(fault handler died)") < 0)
        return -EOWNERDEAD;
    memset(w->state + first_page, SP_PAGE_CLEAN, npages);
    int r = sp_uffd_writeprotect(w->uffd, (uint64_t)(uintptr_t)(w->mem + first_page * w->page), npages * w->page, 1);
    if (r == 0)
        w->armed = 1;
    return r;
}

/* Un-protect the whole region but keep the handler: the engine can be armed again. */
int sp_wp_disarm(struct sp_wp *w)
{
    int r = sp_uffd_writeprotect(w->uffd, (uint64_t)(uintptr_t)w->mem, w->size, 0);
    if (r == 0)
        w->armed = 0;
    return r;
}

int64_t sp_wp_bulk_copy(struct sp_wp *w, uint64_t first_page, uint64_t npages, uint64_t batch)
{
    if (first_page > w->npages || npages > w->npages - first_page || batch == 0) {
        errno = EINVAL;
        return sp_fail("sp_wp_bulk_copy(range)");
    }
    if (!w->dst) {
        errno = EINVAL; /* finalized or released: the destination is no longer ours to write */
        return sp_fail("sp_wp_bulk_copy(no destination)");
    }
    int64_t copied = 0;
    uint64_t end = first_page + npages;
    for (uint64_t b = first_page; b < end; b += batch) {
        if (refuse_if_dead(w, "sp_wp_bulk_copy(fault handler died)") < 0)
            return -EOWNERDEAD;
        uint64_t bend = b + batch < end ? b + batch : end;
        if (w->inject & SP_INJECT_SINGLE_FLAG_RACE) {
            /* The bug as a batching copier has it: flag the batch, then copy it.
             * A fault in between sees "captured" and lets the write land first. */
            uint64_t mine[SP_BULK_BATCH];
            uint64_t nmine = 0;
            for (uint64_t p = b; p < bend; p++) {
                if (__atomic_exchange_n(&w->state[p], SP_PAGE_CAPTURED, __ATOMIC_ACQ_REL) != SP_PAGE_CAPTURED &&
                    nmine < SP_BULK_BATCH)
                    mine[nmine++] = p;
            }
            for (uint64_t i = 0; i < nmine; i++) {
                if (w->race_window_ns)
                    sleep_ns(w->race_window_ns);
                at_point(w, SP_POINT_BULK_CAPTURE, mine[i], 1);
                copy_page(w, mine[i]);
            }
            copied += (int64_t)nmine;
        } else {
            for (uint64_t p = b; p < bend;) {
                /* Claim a run of CLEAN pages and copy it with one memcpy: page-at-a-time copies
                 * run at about two thirds of memcpy speed. A fault on a claimed page waits at
                 * most one run (SP_COPY_RUN pages). */
                uint64_t run = 0;
                while (p + run < bend && run < SP_COPY_RUN) {
                    uint8_t expect = SP_PAGE_CLEAN;
                    if (!__atomic_compare_exchange_n(&w->state[p + run], &expect, SP_PAGE_COPYING, 0,
                                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                        break;
                    run++;
                }
                if (run == 0) {
                    p++; /* captured already, or the handler is copying it */
                    continue;
                }
                at_point(w, SP_POINT_BULK_CAPTURE, p, run);
                memcpy(w->dst + p * w->page, w->mem + p * w->page, run * w->page);
                for (uint64_t q = p; q < p + run; q++)
                    __atomic_store_n(&w->state[q], SP_PAGE_CAPTURED, __ATOMIC_RELEASE);
                copied += (int64_t)run;
                p += run;
            }
            /* A page the handler is copying must be captured before the batch is un-protected
             * (SP_INJECT_UNPROTECT_DURING_CAPTURE leaves it out: the bug). */
            for (uint64_t p = b; p < bend && !(w->inject & SP_INJECT_UNPROTECT_DURING_CAPTURE); p++) {
                if (__atomic_load_n(&w->state[p], __ATOMIC_ACQUIRE) == SP_PAGE_COPYING)
                    at_point(w, SP_POINT_BULK_WAIT, p, 1);
                while (__atomic_load_n(&w->state[p], __ATOMIC_ACQUIRE) == SP_PAGE_COPYING) {
                    if (refuse_if_dead(w, "sp_wp_bulk_copy(fault handler died mid-copy)") < 0)
                        return -EOWNERDEAD; /* its page stays COPYING forever */
                    cpu_relax();
                }
            }
        }
        /* Captured pages need no protection: un-protecting them now spares the guest a fault each. */
        at_point(w, SP_POINT_BULK_UNPROTECT, b, bend - b);
        if (w->inject & SP_INJECT_UNPROTECT_PER_PAGE) {
            /* The regression: one ioctl per page of the batch instead of one for the batch. */
            for (uint64_t p = b; p < bend; p++)
                if (sp_uffd_writeprotect(w->uffd, (uint64_t)(uintptr_t)(w->mem + p * w->page), w->page, 0) < 0)
                    return -errno;
        } else if (sp_uffd_writeprotect(w->uffd, (uint64_t)(uintptr_t)(w->mem + b * w->page), (bend - b) * w->page,
                                        0) < 0) {
            return -errno;
        }
    }
    __atomic_fetch_add(&w->stats.bulk_pages, (uint64_t)copied, __ATOMIC_RELAXED);
    return copied;
}

int64_t sp_wp_pages_in_state(struct sp_wp *w, int state)
{
    int64_t n = 0;
    for (uint64_t p = 0; p < w->npages; p++)
        n += __atomic_load_n(&w->state[p], __ATOMIC_ACQUIRE) == state;
    return n;
}

/* Un-protect everything (waking any faulting thread) and stop the handler. */
int sp_wp_release(struct sp_wp *w, int64_t timeout_ns)
{
    int r = 0;
    if (w->armed) {
        /* The whole region is un-protected before the uffd may be dropped. */
        r = sp_uffd_writeprotect(w->uffd, (uint64_t)(uintptr_t)w->mem, w->size, 0);
        if (r == 0)
            w->armed = 0;
    }
    int s = stop_handler(w, timeout_ns);
    return r ? r : s;
}

int sp_wp_finalize(struct sp_wp *w, int64_t timeout_ns)
{
    if (refuse_if_dead(w, "sp_wp_finalize(fault handler died)") < 0)
        return -EOWNERDEAD;
    int64_t missing = w->npages - sp_wp_pages_in_state(w, SP_PAGE_CAPTURED);
    if (missing) {
        errno = EAGAIN;
        return sp_fail("sp_wp_finalize(pages not captured)");
    }
    return sp_wp_release(w, timeout_ns);
}

/* Teardown order, on purpose: un-protect the whole region (which wakes every waiter), join the
 * handler, un-register, and only then close the uffd. Closing it with faults pending wakes them too
 * on 6.18 (userfaultfd_release; tests/test_reliability_uffd_close.py), but the engine does not lean
 * on that: the un-protect alone frees every waiter, before the uffd is touched. */
void sp_wp_destroy(struct sp_wp *w)
{
    if (!w)
        return;
    sp_wp_release(w, 5000000000LL);
    if (w->registered)
        sp_uffd_unregister(w->uffd, (uint64_t)(uintptr_t)w->mem, w->size);
    if (w->thread_started) {
        /* The handler did not stop in time: leaking it is safer than freeing under it. */
        return;
    }
    if (w->uffd >= 0)
        close(w->uffd);
    if (w->stop_fd >= 0)
        close(w->stop_fd);
    free(w->state);
    free(w);
}

void sp_wp_get_stats(struct sp_wp *w, struct sp_wp_stats *out)
{
    memcpy(out, &w->stats, sizeof(*out));
}

int sp_wp_uffd(struct sp_wp *w) { return w->uffd; }

int sp_memcpy_timed(uint64_t dst, uint64_t src, uint64_t len, uint32_t rounds, uint64_t *best_ns)
{
    uint64_t best = UINT64_MAX;
    for (uint32_t i = 0; i < rounds; i++) {
        int64_t t0 = sp_now_ns();
        memcpy((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, len);
        uint64_t ns = (uint64_t)(sp_now_ns() - t0);
        if (ns < best)
            best = ns;
    }
    *best_ns = best;
    return 0;
}
