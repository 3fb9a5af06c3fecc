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

/* Snapshots one engine object holds live at once (the ABI's spe_snapshot_* calls): a live-fork VMM's forks
 * in quick succession. Slot 0 is also the one snapshot sp_wp_arm & co. drive. */
#define SP_MAX_SNAPSHOTS 4

/* One snapshot: where its pages go and which of them it holds. */
struct sp_snap {
    uint8_t *dst;   /* NULL: none (never armed, or finalized) */
    uint8_t *state; /* enum sp_page_state per page, __atomic builtins; allocated at the slot's first arm */
    int live;       /* faults capture into it, from its arm to its finalize (__atomic, seq_cst) */
    int users;      /* handler captures into it in flight: its finalize waits for none (__atomic, seq_cst) */
    /* __atomic: the handler and the copier count them while an arm of the slot may reset them */
    uint64_t arm_ns;
    uint64_t fault_pages;
    uint64_t shared_fault_pages;
    uint64_t bulk_pages;
};

struct sp_wp {
    uint64_t page; /* the WP granule: 4 KiB, or the huge page size on hugetlb */
    int uffd;
    int stop_fd;
    uint8_t *mem;
    uint64_t size;
    uint64_t npages;
    struct sp_snap snap[SP_MAX_SNAPSHOTS];
    /* Held by every change of protection that depends on which snapshots hold a page: an arm (a snapshot
     * made live, the region protected), and each un-protect by the handler or a copier, decided under it.
     * So no page is un-protected while a live snapshot lacks it, whatever is armed in between. */
    pthread_mutex_t prot_mu;
    int mu_ready;
    uint64_t arm_seq; /* bumped by each arm, under prot_mu (__atomic) */
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
    /* A pre-armed snapshot (sp_wp_prearm): from the pre-arm to the arm at the instant, `tracking` is set and a write
     * fault records its page in `written` (once: `written_at` marks it) and un-protects it, both under prot_mu.
     * The arm takes prot_mu too, so every page a fault made writable before the arm is in the record it reads:
     * which is what makes the record complete at the instant without waiting for faults in flight. */
    int tracking;         /* changed under prot_mu (__atomic: the handler reads it early, as a hint, for its point) */
    uint8_t *written_at;  /* per page, 1: in `written`; allocated at the first pre-arm */
    uint64_t *written;    /* the pages recorded, in the order their faults were served */
    uint64_t nwritten;
    uint64_t *taken;      /* a pre-arm round's record, taken out of `written` and protected again without prot_mu */
    struct sp_wp_prearm_stats prearm;
};

/* Two runs of pages to protect again closer than this are protected in one call, the pages between them included:
 * those are protected since the pre-arm already (only a recorded page was ever made writable), and one call costs
 * about what walking 16 pages' entries does (kvm_pvm: 1.2 us a call, 80 ns a page of a whole-region protect). */
#define SP_REPROTECT_BRIDGE 16ULL

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

static int is_live(const struct sp_snap *s) { return __atomic_load_n(&s->live, __ATOMIC_SEQ_CST); }

static void copy_page(struct sp_wp *w, struct sp_snap *s, uint64_t page)
{
    memcpy(s->dst + page * w->page, w->mem + page * w->page, w->page);
}

/* SP_INJECT_EXTRA_COPY_PER_FAULT: the page goes through a staging page mapped for this fault alone (mmap,
 * first touch, copy in, copy out, munmap), as a handler that allocates a bounce buffer per fault does.
 * The snapshot is the same; each fault costs a mapping, a page fault and a second copy more. */
static void copy_page_staged(struct sp_wp *w, struct sp_snap *s, uint64_t page)
{
    uint8_t *bounce = mmap(NULL, w->page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (bounce == MAP_FAILED) {
        copy_page(w, s, page); /* the regression is the extra work; a failed mapping must not break the copy */
        return;
    }
    memcpy(bounce, w->mem + page * w->page, w->page);
    memcpy(s->dst + page * w->page, bounce, w->page);
    munmap(bounce, w->page);
}

/* Capture one page into one snapshot for a fault; returns 1 if this call copied it. */
static int capture_for_fault(struct sp_wp *w, struct sp_snap *s, uint64_t page)
{
    uint8_t *st = &s->state[page];
    if (w->inject & SP_INJECT_NO_COPY_BEFORE_WRITE)
        return 0; /* the bug: let the write land, whatever the copier does later */
    if (w->inject & SP_INJECT_SINGLE_FLAG_RACE) {
        /* The bug: one flag, and "set" means "someone will copy it", not "copied". */
        if (__atomic_exchange_n(st, SP_PAGE_CAPTURED, __ATOMIC_ACQ_REL) == SP_PAGE_CAPTURED)
            return 0;
        at_point(w, SP_POINT_FAULT_CAPTURE, page, 1);
        copy_page(w, s, page);
        return 1;
    }
    uint8_t expect = SP_PAGE_CLEAN;
    if (__atomic_compare_exchange_n(st, &expect, SP_PAGE_COPYING, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        at_point(w, SP_POINT_FAULT_CAPTURE, page, 1);
        if (w->inject & SP_INJECT_EXTRA_COPY_PER_FAULT)
            copy_page_staged(w, s, page);
        else
            copy_page(w, s, page);
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

/* Capture the faulting page into every live snapshot that does not hold it yet; returns the snapshots (a bit
 * each) this call copied it into. A snapshot that holds the page already keeps its copy: the WP bit says
 * "first write since the latest arm", and an earlier snapshot froze the page at its own. Every snapshot is
 * counted in as a user throughout, before live is read: a finalize clears live, then waits for no users, so
 * it never returns while this capture may still write into its destination or count it. */
static uint32_t capture_for_live(struct sp_wp *w, uint64_t page)
{
    uint32_t copied = 0;
    for (int i = 0; i < SP_MAX_SNAPSHOTS; i++)
        __atomic_add_fetch(&w->snap[i].users, 1, __ATOMIC_SEQ_CST);
    for (int i = 0; i < SP_MAX_SNAPSHOTS; i++)
        if (is_live(&w->snap[i]) && capture_for_fault(w, &w->snap[i], page))
            copied |= 1U << i;
    for (int i = 0; copied && (w->inject & SP_INJECT_OVERLAP_CAPTURE_OVERWRITES) && i < SP_MAX_SNAPSHOTS; i++)
        if (!(copied & (1U << i)) && is_live(&w->snap[i]))
            copy_page(w, &w->snap[i], page); /* the bug: over the bytes this snapshot froze at its own arm */
    int shared = __builtin_popcount(copied) > 1;
    for (int i = 0; i < SP_MAX_SNAPSHOTS; i++) {
        if (copied & (1U << i)) {
            __atomic_add_fetch(&w->snap[i].fault_pages, 1, __ATOMIC_RELAXED);
            __atomic_add_fetch(&w->snap[i].shared_fault_pages, (uint64_t)shared, __ATOMIC_RELAXED);
        }
        __atomic_sub_fetch(&w->snap[i].users, 1, __ATOMIC_SEQ_CST);
    }
    return copied;
}

static void record_fault(struct sp_wp *w, const struct uffd_msg *msg, uint64_t offset, uint32_t copied,
                         int64_t t0)
{
    struct sp_wp_stats *s = &w->stats;
    uint64_t ns = (uint64_t)(sp_now_ns() - t0);
    int cpu = sched_getcpu();
    s->faults++;
    s->fault_pages += (uint64_t)__builtin_popcount(copied);
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
        r->copied = copied != 0;
    }
}

/* Pre-armed, with prot_mu held: the page is about to be made writable before the snapshot instant. */
static void record_written(struct sp_wp *w, uint64_t page)
{
    if (w->written_at[page])
        return; /* a second fault on it (two writers at once): recorded already */
    w->written_at[page] = 1;
    w->written[w->nwritten++] = page;
}

/* With prot_mu held: the record empty (its pages' marks cleared: a fault records them again). */
static void clear_written(struct sp_wp *w)
{
    for (uint64_t i = 0; i < w->nwritten; i++)
        w->written_at[w->written[i]] = 0;
    w->nwritten = 0;
}

/* With prot_mu held: no pre-arm any more. */
static void forget_written(struct sp_wp *w)
{
    __atomic_store_n(&w->tracking, 0, __ATOMIC_RELEASE);
    clear_written(w);
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
    uint32_t copied = 0;
    if (w->inject & SP_INJECT_WAKE_BEFORE_COPY) {
        /* The bug: the page is writable and its writer woken before the copy below has read it. */
        int r = sp_uffd_writeprotect(w->uffd, addr, w->page, 0);
        if (r < 0)
            return r;
    }
    if (msg->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) {
        uint64_t seq = __atomic_load_n(&w->arm_seq, __ATOMIC_ACQUIRE);
        int read_prearmed = __atomic_load_n(&w->tracking, __ATOMIC_ACQUIRE);
        if (read_prearmed) /* read before the instant; the arm may yet come before it is served (the pause's race) */
            at_point(w, SP_POINT_FAULT_PREARMED, page, 1);
        if (read_prearmed && (w->inject & SP_INJECT_PREARM_DECIDES_AT_READ)) {
            /* The bug: served as the pre-arm's because it was read then, the arm in between or not: no capture. */
            pthread_mutex_lock(&w->prot_mu);
        } else {
            for (;;) {
                copied |= capture_for_live(w, page);
                pthread_mutex_lock(&w->prot_mu);
                if (__atomic_load_n(&w->arm_seq, __ATOMIC_ACQUIRE) == seq)
                    break; /* every live snapshot holds the page: the one un-protect below, under prot_mu */
                pthread_mutex_unlock(&w->prot_mu); /* a snapshot was armed meanwhile: the page goes into it too */
                seq = __atomic_load_n(&w->arm_seq, __ATOMIC_ACQUIRE);
            }
        }
        if (w->tracking) /* pre-armed still, under prot_mu: recorded before the un-protect below, in the same hold */
            record_written(w, page);
    } else {
        pthread_mutex_lock(&w->prot_mu);
    }
    /* Un-protect without waking, record, then wake: whoever the write unblocks sees
     * the fault in the stats already. */
    struct uffdio_writeprotect wp = {
        .range = {.start = addr, .len = w->page}, .mode = UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
    };
    int r = ioctl(w->uffd, UFFDIO_WRITEPROTECT, &wp);
    int e = errno;
    pthread_mutex_unlock(&w->prot_mu);
    if (r < 0) {
        errno = e;
        return sp_fail("UFFDIO_WRITEPROTECT(un-protect)");
    }
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
    if ((r = pthread_mutex_init(&w->prot_mu, NULL)) != 0) {
        errno = r;
        r = sp_fail("pthread_mutex_init");
        goto fail;
    }
    w->mu_ready = 1;
    w->snap[0].state = calloc(w->npages, 1);
    if (!w->snap[0].state) {
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
    w->snap[0].dst = (uint8_t *)(uintptr_t)dst;
    return 0;
}

int sp_wp_set_points(struct sp_wp *w, sp_point_fn fn, void *ctx)
{
    w->point_ctx = ctx;
    w->point = fn;
    return 0;
}

/* With prot_mu held: snapshot s live and pages [first, first + n) protected. The bumped arm_seq sends a fault
 * being served back to capture into s too before it un-protects. */
/* Protect (or un-protect) pages [first, end) with one ioctl; SP_INJECT_ARM_PER_PAGE (protect) and
 * SP_INJECT_UNPROTECT_PER_PAGE (un-protect) are the regressions that issue one ioctl, and one walk of the
 * page tables, per page instead. */
static int writeprotect_pages(struct sp_wp *w, uint64_t first, uint64_t end, int protect)
{
    if (w->inject & (protect ? SP_INJECT_ARM_PER_PAGE : SP_INJECT_UNPROTECT_PER_PAGE)) {
        int r = 0;
        for (uint64_t p = first; p < end && r == 0; p++)
            r = sp_uffd_writeprotect(w->uffd, (uint64_t)(uintptr_t)(w->mem + p * w->page), w->page, protect);
        return r;
    }
    return sp_uffd_writeprotect(w->uffd, (uint64_t)(uintptr_t)(w->mem + first * w->page), (end - first) * w->page,
                                protect);
}

static int protect_for(struct sp_wp *w, struct sp_snap *s, uint64_t first, uint64_t n)
{
    __atomic_store_n(&s->live, 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&w->arm_seq, 1, __ATOMIC_RELEASE);
    int r = writeprotect_pages(w, first, first + n, 1);
    if (r == 0)
        w->armed = 1;
    return r;
}

int sp_wp_arm(struct sp_wp *w)
{
    if (!w->snap[0].dst) {
        errno = EINVAL;
        return sp_fail("sp_wp_arm(no destination)");
    }
    if (refuse_if_dead(w, "sp_wp_arm(fault handler died)") < 0)
        return -EOWNERDEAD; /* nobody would serve the faults: writers would block until release */
    int64_t t0 = sp_now_ns();
    pthread_mutex_lock(&w->prot_mu);
    if (w->written)
        forget_written(w); /* a whole arm after a pre-arm: every page is protected again anyway */
    memset(w->snap[0].state, SP_PAGE_CLEAN, w->npages);
    int r = protect_for(w, &w->snap[0], 0, w->npages);
    pthread_mutex_unlock(&w->prot_mu);
    w->stats.arm_ns = w->snap[0].arm_ns = (uint64_t)(sp_now_ns() - t0);
    return r;
}

/* ---- a pre-armed snapshot: the engine ABI's spe_prearm, spe_arm_prearmed ---- */

static int cmp_page(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Protect again the n pages listed (sorted here), one call per run of them, runs fewer than SP_REPROTECT_BRIDGE
 * pages apart joined: the cost follows the pages listed, not memory's size. */
static int protect_listed(struct sp_wp *w, uint64_t *pages, uint64_t n, uint64_t *calls)
{
    qsort(pages, n, sizeof(*pages), cmp_page);
    int r = 0;
    for (uint64_t i = 0; i < n && r == 0;) {
        uint64_t j = i + 1;
        while (j < n && pages[j] - pages[j - 1] <= SP_REPROTECT_BRIDGE)
            j++;
        r = writeprotect_pages(w, pages[i], pages[j - 1] + 1, 1);
        (*calls)++;
        i = j;
    }
    return r;
}

/* A round: the pages recorded since the last call taken out of the record and protected again, the guest running.
 * The record is swapped under prot_mu, the protect runs without it: a page of the round written before its protect
 * lands unrecorded, but before the instant, and is protected by the time this returns; one written after is a
 * fault again, recorded. So once this returns, every writable page is a recorded one, as after the first call. */
static int64_t prearm_round(struct sp_wp *w)
{
    pthread_mutex_lock(&w->prot_mu);
    uint64_t *round = w->written;
    uint64_t n = w->nwritten;
    clear_written(w);
    w->written = w->taken;
    w->taken = round;
    pthread_mutex_unlock(&w->prot_mu);
    uint64_t calls = 0;
    int r = protect_listed(w, round, n, &calls);
    return r < 0 ? r : (int64_t)n;
}

/* The whole region protected while the guest runs; until sp_wp_arm_prearmed() a write fault only records its page
 * (serve, record_written) and un-protects it. The protect runs without prot_mu: a fault served meanwhile records
 * its page whichever of the two changes that page last, so a writable page is always a recorded one. Called again
 * before the arm, a round (prearm_round). Returns the pages protected. */
int64_t sp_wp_prearm(struct sp_wp *w)
{
    if (!w->snap[0].dst) {
        errno = EINVAL;
        return sp_fail("sp_wp_prearm(no destination)");
    }
    if (refuse_if_dead(w, "sp_wp_prearm(fault handler died)") < 0)
        return -EOWNERDEAD;
    if (!w->written_at) {
        w->written_at = calloc(w->npages, 1);
        w->written = calloc(w->npages, sizeof(*w->written));
        w->taken = calloc(w->npages, sizeof(*w->taken));
        if (!w->written_at || !w->written || !w->taken) {
            free(w->written_at);
            free(w->written);
            free(w->taken);
            w->written_at = NULL;
            w->written = w->taken = NULL;
            errno = ENOMEM;
            return sp_fail("calloc(pre-arm record)");
        }
    }
    int64_t t0 = sp_now_ns();
    pthread_mutex_lock(&w->prot_mu);
    int again = w->tracking, busy = !again && w->armed;
    if (!again && !busy) {
        clear_written(w);
        /* Every page uncaptured now, not in the pause: nothing captures before the arm (no snapshot is live). */
        memset(w->snap[0].state, SP_PAGE_CLEAN, w->npages);
        memset(&w->prearm, 0, sizeof(w->prearm));
        __atomic_store_n(&w->tracking, 1, __ATOMIC_RELEASE);
        w->armed = 1; /* a release from here on un-protects the region */
    }
    pthread_mutex_unlock(&w->prot_mu);
    if (busy) {
        errno = EBUSY;
        return sp_fail("sp_wp_prearm(armed already: finalize or release first)");
    }
    int64_t r = again ? prearm_round(w) : writeprotect_pages(w, 0, w->npages, 1);
    w->prearm.prearm_ns = (uint64_t)(sp_now_ns() - t0);
    return r < 0 ? r : again ? r : (int64_t)w->npages;
}

/* The instant (vCPUs paused): the pages recorded since the last pre-arm call protected again, snapshot 0 live. Under
 * prot_mu throughout: a fault served before it recorded its page (protected again here), one whose message was read
 * before it but not yet served finds arm_seq moved and captures first (serve), as after sp_wp_arm. */
int64_t sp_wp_arm_prearmed(struct sp_wp *w)
{
    if (refuse_if_dead(w, "sp_wp_arm_prearmed(fault handler died)") < 0)
        return -EOWNERDEAD;
    int64_t t0 = sp_now_ns();
    pthread_mutex_lock(&w->prot_mu);
    if (!w->tracking) {
        pthread_mutex_unlock(&w->prot_mu);
        errno = EINVAL;
        return sp_fail("sp_wp_arm_prearmed(not pre-armed: sp_wp_prearm first)");
    }
    __atomic_store_n(&w->snap[0].live, 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&w->arm_seq, 1, __ATOMIC_RELEASE);
    uint64_t n = w->nwritten, calls = 0;
    int r = 0;
    if (!(w->inject & SP_INJECT_PREARM_FORGETS_WRITTEN)) /* the bug: they stay writable, for writes to land uncaught */
        r = protect_listed(w, w->written, n, &calls);
    forget_written(w);
    pthread_mutex_unlock(&w->prot_mu);
    w->prearm.recorded_pages = n;
    w->prearm.reprotected_pages = r < 0 || (w->inject & SP_INJECT_PREARM_FORGETS_WRITTEN) ? 0 : n;
    w->prearm.reprotect_calls = calls;
    w->prearm.arm_ns = w->stats.arm_ns = w->snap[0].arm_ns = (uint64_t)(sp_now_ns() - t0);
    return r < 0 ? r : (int64_t)w->prearm.reprotected_pages;
}

void sp_wp_prearm_get_stats(struct sp_wp *w, struct sp_wp_prearm_stats *out)
{
    memcpy(out, &w->prearm, sizeof(*out));
}

/* Protect [first, first + n) again with its pages CLEAN: a second snapshot of part of the region. */
int sp_wp_rearm_range(struct sp_wp *w, uint64_t first_page, uint64_t npages)
{
    if (first_page > w->npages || npages > w->npages - first_page) {
        errno = EINVAL;
        return sp_fail("sp_wp_rearm_range(range)");
    }
    if (!w->snap[0].dst) {
        errno = EINVAL;
        return sp_fail("sp_wp_rearm_range(no destination)");
    }
    if (refuse_if_dead(w, "sp_wp_rearm_range(fault handler died)") < 0)
        return -EOWNERDEAD;
    pthread_mutex_lock(&w->prot_mu);
    memset(w->snap[0].state + first_page, SP_PAGE_CLEAN, npages);
    int r = protect_for(w, &w->snap[0], first_page, npages);
    pthread_mutex_unlock(&w->prot_mu);
    return r;
}

/* Un-protect the whole region but keep the handler: the engine can be armed again. */
int sp_wp_disarm(struct sp_wp *w)
{
    pthread_mutex_lock(&w->prot_mu);
    int r = sp_uffd_writeprotect(w->uffd, (uint64_t)(uintptr_t)w->mem, w->size, 0);
    if (r == 0) {
        w->armed = 0;
        __atomic_store_n(&w->snap[0].live, 0, __ATOMIC_SEQ_CST);
        if (w->written)
            forget_written(w);
    }
    pthread_mutex_unlock(&w->prot_mu);
    return r;
}

static int held_by_all(struct sp_wp *w, uint32_t snaps, uint64_t page)
{
    for (int i = 0; i < SP_MAX_SNAPSHOTS; i++)
        if ((snaps & (1U << i)) && __atomic_load_n(&w->snap[i].state[page], __ATOMIC_ACQUIRE) != SP_PAGE_CAPTURED)
            return 0;
    return 1;
}

/* The copier of snapshot `id` un-protects what it copied: under prot_mu, and only the pages every live
 * snapshot holds. A page another live snapshot still lacks stays protected, so its next write is caught for
 * that one too. The only live snapshot un-protects its whole range at once: its copier made sure it holds it
 * (SP_INJECT_UNPROTECT_DURING_CAPTURE is the bug of not making sure). */
static int unprotect_held(struct sp_wp *w, int id, uint64_t first, uint64_t end)
{
    pthread_mutex_lock(&w->prot_mu);
    uint32_t others = 0;
    for (int i = 0; i < SP_MAX_SNAPSHOTS; i++)
        if (i != id && is_live(&w->snap[i]))
            others |= 1U << i;
    int r = 0;
    if (!others || (w->inject & SP_INJECT_UNPROTECT_WHAT_OTHERS_LACK)) {
        r = writeprotect_pages(w, first, end, 0);
    } else {
        uint32_t all = others | 1U << id;
        for (uint64_t p = first; p < end && r == 0;) {
            while (p < end && !held_by_all(w, all, p))
                p++;
            uint64_t q = p;
            while (q < end && held_by_all(w, all, q))
                q++;
            if (q > p)
                r = writeprotect_pages(w, p, q, 0);
            p = q;
        }
    }
    pthread_mutex_unlock(&w->prot_mu);
    return r;
}

static int64_t bulk_copy(struct sp_wp *w, int id, uint64_t first_page, uint64_t npages, uint64_t batch)
{
    struct sp_snap *s = &w->snap[id];
    if (first_page > w->npages || npages > w->npages - first_page || batch == 0) {
        errno = EINVAL;
        return sp_fail("sp_wp_bulk_copy(range)");
    }
    if (!s->dst) {
        errno = EINVAL; /* finalized or released: the destination is no longer ours to write */
        return sp_fail("sp_wp_bulk_copy(no destination)");
    }
    if (__atomic_load_n(&w->tracking, __ATOMIC_ACQUIRE)) {
        errno = EINVAL; /* pre-armed: no instant yet, nothing to capture */
        return sp_fail("sp_wp_bulk_copy(pre-armed, not armed: sp_wp_arm_prearmed first)");
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
                if (__atomic_exchange_n(&s->state[p], SP_PAGE_CAPTURED, __ATOMIC_ACQ_REL) != SP_PAGE_CAPTURED &&
                    nmine < SP_BULK_BATCH)
                    mine[nmine++] = p;
            }
            for (uint64_t i = 0; i < nmine; i++) {
                if (w->race_window_ns)
                    sleep_ns(w->race_window_ns);
                at_point(w, SP_POINT_BULK_CAPTURE, mine[i], 1);
                copy_page(w, s, mine[i]);
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
                    if (!__atomic_compare_exchange_n(&s->state[p + run], &expect, SP_PAGE_COPYING, 0,
                                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                        break;
                    run++;
                }
                if (run == 0) {
                    p++; /* captured already, or the handler is copying it */
                    continue;
                }
                at_point(w, SP_POINT_BULK_CAPTURE, p, run);
                memcpy(s->dst + p * w->page, w->mem + p * w->page, run * w->page);
                for (uint64_t q = p; q < p + run; q++)
                    __atomic_store_n(&s->state[q], SP_PAGE_CAPTURED, __ATOMIC_RELEASE);
                copied += (int64_t)run;
                p += run;
            }
            /* A page the handler is copying must be captured before the batch is un-protected
             * (SP_INJECT_UNPROTECT_DURING_CAPTURE leaves it out: the bug). */
            for (uint64_t p = b; p < bend && !(w->inject & SP_INJECT_UNPROTECT_DURING_CAPTURE); p++) {
                if (__atomic_load_n(&s->state[p], __ATOMIC_ACQUIRE) == SP_PAGE_COPYING)
                    at_point(w, SP_POINT_BULK_WAIT, p, 1);
                while (__atomic_load_n(&s->state[p], __ATOMIC_ACQUIRE) == SP_PAGE_COPYING) {
                    if (refuse_if_dead(w, "sp_wp_bulk_copy(fault handler died mid-copy)") < 0)
                        return -EOWNERDEAD; /* its page stays COPYING forever */
                    cpu_relax();
                }
            }
        }
        /* Captured pages need no protection: un-protecting them now spares the guest a fault each. */
        at_point(w, SP_POINT_BULK_UNPROTECT, b, bend - b);
        if (unprotect_held(w, id, b, bend) < 0)
            return -errno;
    }
    __atomic_fetch_add(&w->stats.bulk_pages, (uint64_t)copied, __ATOMIC_RELAXED);
    __atomic_fetch_add(&s->bulk_pages, (uint64_t)copied, __ATOMIC_RELAXED);
    return copied;
}

int64_t sp_wp_bulk_copy(struct sp_wp *w, uint64_t first_page, uint64_t npages, uint64_t batch)
{
    return bulk_copy(w, 0, first_page, npages, batch);
}

static int64_t pages_in_state(struct sp_wp *w, struct sp_snap *s, int state)
{
    int64_t n = 0;
    for (uint64_t p = 0; p < w->npages; p++)
        n += __atomic_load_n(&s->state[p], __ATOMIC_ACQUIRE) == state;
    return n;
}

int64_t sp_wp_pages_in_state(struct sp_wp *w, int state) { return pages_in_state(w, &w->snap[0], state); }

/* Un-protect everything (waking any faulting thread) and stop the handler: every snapshot is void. */
int sp_wp_release(struct sp_wp *w, int64_t timeout_ns)
{
    int r = 0;
    if (w->mu_ready)
        pthread_mutex_lock(&w->prot_mu);
    for (int i = 0; i < SP_MAX_SNAPSHOTS; i++)
        __atomic_store_n(&w->snap[i].live, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&w->tracking, 0, __ATOMIC_RELEASE); /* a pre-arm ends here too: nothing is recorded from now on */
    if (w->armed) {
        /* The whole region is un-protected before the uffd may be dropped. */
        r = sp_uffd_writeprotect(w->uffd, (uint64_t)(uintptr_t)w->mem, w->size, 0);
        if (r == 0)
            w->armed = 0;
    }
    if (w->mu_ready)
        pthread_mutex_unlock(&w->prot_mu);
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

/* ---- several snapshots: the engine ABI's spe_snapshot_* calls ---- */

int sp_wp_snap_arm(struct sp_wp *w, uint64_t dst)
{
    if (!dst) {
        errno = EINVAL;
        return sp_fail("sp_wp_snap_arm(no destination)");
    }
    if (refuse_if_dead(w, "sp_wp_snap_arm(fault handler died)") < 0)
        return -EOWNERDEAD;
    if (!w->thread_started) {
        errno = ESRCH; /* a single snapshot's finalize or a release stopped it */
        return sp_fail("sp_wp_snap_arm(no fault handler: the engine was released)");
    }
    int64_t t0 = sp_now_ns();
    pthread_mutex_lock(&w->prot_mu);
    int id = 0;
    while (id < SP_MAX_SNAPSHOTS && is_live(&w->snap[id]))
        id++;
    int r;
    if (w->tracking) {
        errno = EBUSY; /* the pre-armed snapshot is the engine's one snapshot (slot 0) */
        r = sp_fail("sp_wp_snap_arm(a pre-armed snapshot is pending)");
        goto out;
    }
    if (id == SP_MAX_SNAPSHOTS) {
        errno = EBUSY;
        r = sp_fail("sp_wp_snap_arm(every snapshot slot is live)");
        goto out;
    }
    struct sp_snap *s = &w->snap[id];
    if (!s->state && !(s->state = calloc(w->npages, 1))) {
        errno = ENOMEM;
        r = sp_fail("calloc(page states)");
        goto out;
    }
    /* A slot used before holds its last round's marks: every page uncaptured again (the injected bug keeps
     * them, so the new round skips what the old one captured). */
    if (!(w->inject & SP_INJECT_CONSECUTIVE_KEEPS_CAPTURED))
        memset(s->state, SP_PAGE_CLEAN, w->npages);
    __atomic_store_n(&s->fault_pages, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&s->shared_fault_pages, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&s->bulk_pages, 0, __ATOMIC_RELAXED);
    s->dst = (uint8_t *)(uintptr_t)dst;
    r = protect_for(w, s, 0, w->npages);
    if (r < 0) {
        __atomic_store_n(&s->live, 0, __ATOMIC_SEQ_CST);
        s->dst = NULL;
    } else {
        r = id;
    }
out:
    pthread_mutex_unlock(&w->prot_mu);
    if (r >= 0)
        __atomic_store_n(&w->snap[id].arm_ns, (uint64_t)(sp_now_ns() - t0), __ATOMIC_RELAXED);
    return r;
}

static struct sp_snap *live_snapshot(struct sp_wp *w, int id, const char *op)
{
    if (id < 0 || id >= SP_MAX_SNAPSHOTS || !is_live(&w->snap[id])) {
        errno = EINVAL;
        sp_fail(op);
        return NULL;
    }
    return &w->snap[id];
}

int64_t sp_wp_snap_bulk_copy(struct sp_wp *w, int id, uint64_t first_page, uint64_t npages, uint64_t batch)
{
    if (!live_snapshot(w, id, "sp_wp_snap_bulk_copy(no live snapshot of that id)"))
        return -EINVAL;
    return bulk_copy(w, id, first_page, npages, batch);
}

int64_t sp_wp_snap_pages_in_state(struct sp_wp *w, int id, int state)
{
    if (id < 0 || id >= SP_MAX_SNAPSHOTS || !w->snap[id].state)
        return 0;
    return pages_in_state(w, &w->snap[id], state);
}

/* Snapshot `id` complete: no longer live, its destination no longer touched once this returns; the last live
 * snapshot done, the region is un-protected. The handler keeps running for the next arm. */
int sp_wp_snap_finalize(struct sp_wp *w, int id)
{
    struct sp_snap *s = live_snapshot(w, id, "sp_wp_snap_finalize(no live snapshot of that id)");
    if (!s)
        return -EINVAL;
    if (refuse_if_dead(w, "sp_wp_snap_finalize(fault handler died)") < 0)
        return -EOWNERDEAD;
    if (pages_in_state(w, s, SP_PAGE_CAPTURED) != (int64_t)w->npages) {
        errno = EAGAIN;
        return sp_fail("sp_wp_snap_finalize(pages not captured)");
    }
    int r = 0;
    pthread_mutex_lock(&w->prot_mu);
    __atomic_store_n(&s->live, 0, __ATOMIC_SEQ_CST);
    int others = 0;
    for (int i = 0; i < SP_MAX_SNAPSHOTS; i++)
        others |= is_live(&w->snap[i]);
    if (!others && w->armed) {
        r = sp_uffd_writeprotect(w->uffd, (uint64_t)(uintptr_t)w->mem, w->size, 0);
        if (r == 0)
            w->armed = 0;
    }
    pthread_mutex_unlock(&w->prot_mu);
    /* A capture that saw it live before the store above copies one page: wait for it, then let go of dst. */
    while (__atomic_load_n(&s->users, __ATOMIC_SEQ_CST))
        cpu_relax();
    s->dst = NULL;
    return r;
}

int sp_wp_snap_get_stats(struct sp_wp *w, int id, struct sp_wp_snap_stats *out)
{
    memset(out, 0, sizeof(*out));
    if (id < 0 || id >= SP_MAX_SNAPSHOTS) {
        errno = EINVAL;
        return sp_fail("sp_wp_snap_get_stats(id)");
    }
    struct sp_snap *s = &w->snap[id];
    out->arm_ns = __atomic_load_n(&s->arm_ns, __ATOMIC_RELAXED);
    out->fault_pages = __atomic_load_n(&s->fault_pages, __ATOMIC_RELAXED);
    out->shared_fault_pages = __atomic_load_n(&s->shared_fault_pages, __ATOMIC_RELAXED);
    out->bulk_pages = __atomic_load_n(&s->bulk_pages, __ATOMIC_RELAXED);
    out->live = is_live(s);
    return 0;
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
    for (int i = 0; i < SP_MAX_SNAPSHOTS; i++)
        free(w->snap[i].state);
    free(w->written_at);
    free(w->written);
    free(w->taken);
    if (w->mu_ready)
        pthread_mutex_destroy(&w->prot_mu);
    free(w);
}

void sp_wp_get_stats(struct sp_wp *w, struct sp_wp_stats *out)
{
    memcpy(out, &w->stats, sizeof(*out));
}

int sp_wp_uffd(struct sp_wp *w) { return w->uffd; }

uint64_t sp_copy_run_pages(void) { return SP_COPY_RUN; }

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

/* The host's limit for a copier that un-protects what it copied: memcpy calls of `run` bytes through each
 * batch, then one UFFDIO_WRITEPROTECT clearing the batch, over a region protected beforehand, with nothing else
 * to do. The engine's bulk copy makes the same calls (SP_COPY_RUN pages a memcpy: a copy that fits the L2
 * runs faster than one long memcpy), plus its per-page bookkeeping (claim, captured flag, the wait for pages
 * the fault handler is copying, the lock that keeps other snapshots' pages protected). */
int sp_batched_copy_unprotect_timed(int uffd, uint64_t dst, uint64_t src, uint64_t len, uint64_t batch,
                                    uint64_t run, uint64_t *ns)
{
    if (batch == 0 || run == 0) {
        errno = EINVAL;
        return sp_fail("sp_batched_copy_unprotect_timed(batch or run 0)");
    }
    int64_t t0 = sp_now_ns();
    for (uint64_t off = 0; off < len; off += batch) {
        uint64_t end = len - off < batch ? len : off + batch;
        for (uint64_t at = off; at < end; at += run)
            memcpy((void *)(uintptr_t)(dst + at), (const void *)(uintptr_t)(src + at),
                   end - at < run ? end - at : run);
        if (sp_uffd_writeprotect(uffd, src + off, end - off, 0) < 0)
            return -1;
    }
    *ns = (uint64_t)(sp_now_ns() - t0);
    return 0;
}
