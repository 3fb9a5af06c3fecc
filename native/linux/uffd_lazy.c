/*
 * Lazy restore: guest memory filled from a snapshot file on first touch.
 *
 * The destination (an anonymous mapping or a fresh memfd) is registered with
 * userfaultfd in MISSING mode. A guest access to a page not yet there blocks
 * the vCPU in the kernel; the handler thread installs the page with
 * UFFDIO_COPY from a read-only mapping of the file's memory image (file
 * offset 4096), then wakes the vCPU. sp_lazy_prefetch_all() installs every
 * page still missing from the caller's thread; a page the handler installed
 * meanwhile answers EEXIST, which is fine.
 *
 * A per-page state byte (enum sp_lazy_page) is advisory for what is installed
 * (it lets the prefetcher skip whole runs and the stats tell who installed
 * what); the kernel's EEXIST is the truth when the two race. The handler stops
 * through an eventfd: no poll time-outs anywhere.
 *
 * Failing closed. When nobody serves the region any more while pages are still
 * missing, the kernel fills each of them with zeros at its next touch: closing
 * the userfaultfd (or unregistering) wakes a vCPU waiting on a fault, which then
 * reads a zero page and runs on (measured: kvm_pvm 6.18 and kvm_amd 6.1, under
 * 2 ms). Leaving the uffd open with the handler gone does not help either: a
 * vCPU on an unserved MISSING fault stays in KVM_RUN through a kick and its
 * run's deadline signal (both kernels, 10 s watched) until the fault resolves.
 * So before anyone waiting is woken, fence_missing() makes every page still
 * missing PROT_NONE: the woken access then fails in KVM (KVM_RUN EFAULT on
 * kvm_amd 6.1; on kvm_pvm 6.18 a KVM_EXIT_MMIO at the GPA for a data access, an
 * emulation failure for an instruction fetch, a triple fault when the CPU needs
 * the page to deliver an exception), the vCPU stops, and native/restore.py
 * turns that run into LoaderDied naming why
 * the loader stopped. Each run of missing pages is one mprotect (a VMA of its
 * own); past vm.max_map_count the whole region is fenced instead. A host thread
 * already waiting on such a page gets SIGSEGV, the loud kind of failure; the
 * Python layer refuses host accesses to fenced pages before they are made.
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
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define LAZY_PAGE 4096ULL
/* UFFDIO_COPY answers EAGAIN while the address space is changing under it; that
 * passes, but a loop that never sees progress must end in an error, not spin. */
#define LAZY_EAGAIN_RETRIES 1000

struct sp_lazy {
    int uffd;
    int stop_fd;
    uint8_t *dst;
    uint64_t size;
    uint64_t npages;
    const uint8_t *src; /* PROT_READ mapping of the file's memory image */
    uint8_t *present;   /* per page, __atomic access: enum sp_lazy_page */
    uint32_t inject;    /* SP_INJECT_LAZY_* */
    int handler_cpu;
    int registered;
    int uffd_closed;    /* the injected close put /dev/null on l->uffd: the kernel unregistered the range */
    int thread_started;
    int live;           /* the handler was started: from then on the guest may depend on this loader */
    int fenced;         /* __atomic: 1 once any page is fenced */
    /* The prefetcher's installs against the fence: a page is either installed and PRESENT, or FENCED. */
    pthread_mutex_t install_lock;
    pthread_t thread;
    struct sp_lazy_stats stats;
};

static void record_service(struct sp_lazy *l, int64_t t0)
{
    struct sp_lazy_stats *s = &l->stats;
    uint64_t ns = (uint64_t)(sp_now_ns() - t0);
    s->service_ns_total += ns;
    if (ns > s->service_ns_max)
        s->service_ns_max = ns;
    uint64_t us = ns / 1000;
    s->hist_us[us < SP_HIST_BUCKETS - 1 ? us : SP_HIST_BUCKETS - 1]++;
}

/* Install one page for a fault. The copy does not wake the faulting thread: the
 * stats are written first, so whoever the page unblocks finds them complete. */
static int serve(struct sp_lazy *l, const struct uffd_msg *msg)
{
    int64_t t0 = sp_now_ns();
    uint64_t base = (uint64_t)(uintptr_t)l->dst;
    uint64_t addr = msg->arg.pagefault.address & ~(LAZY_PAGE - 1);
    if (addr < base || addr >= base + l->size) {
        errno = EFAULT; /* a fault outside the region we registered: never expected */
        return sp_fail("lazy handler: fault outside the region");
    }
    uint64_t page = (addr - base) / LAZY_PAGE;
    struct uffdio_copy copy = {
        .dst = addr,
        .src = (uint64_t)(uintptr_t)(l->src + page * LAZY_PAGE),
        .len = LAZY_PAGE,
        .mode = UFFDIO_COPY_MODE_DONTWAKE,
    };
    int copied = 0;
    for (int tries = 0;; tries++) {
        copy.copy = 0;
        if (ioctl(l->uffd, UFFDIO_COPY, &copy) == 0) {
            copied = 1;
            break;
        }
        if (errno == EEXIST)
            break; /* the prefetcher (or a fault on another vCPU) installed it first */
        if (errno != EAGAIN || tries >= LAZY_EAGAIN_RETRIES)
            return sp_fail("UFFDIO_COPY(fault)");
    }
    __atomic_store_n(&l->present[page], 1, __ATOMIC_RELEASE);
    if (l->stats.first_fault_ns == 0)
        l->stats.first_fault_ns = (uint64_t)t0;
    l->stats.last_fault_ns = (uint64_t)t0;
    l->stats.faults++;
    if (copied)
        l->stats.fault_pages++;
    else
        l->stats.fault_eexist++;
    int cpu = sched_getcpu();
    if (cpu >= 0 && cpu < SP_MAX_CPUS)
        l->stats.handler_cpu[cpu]++;
    record_service(l, t0);
    struct uffdio_range range = {.start = addr, .len = LAZY_PAGE};
    if (ioctl(l->uffd, UFFDIO_WAKE, &range) < 0)
        return sp_fail("UFFDIO_WAKE");
    return 0;
}

static int serve_message(void *ctx, const struct uffd_msg *msg)
{
    struct sp_lazy *l = ctx;
    if ((l->inject & SP_INJECT_LAZY_UFFD_CLOSES_MID_RESTORE) &&
        sp_tid_in_vcpu_run((pid_t)msg->arg.pagefault.feat.ptid)) {
        /* The guest's first fault: the restore is under way (the VM runs, pages are missing). */
        errno = ECANCELED;
        return sp_fail("lazy handler: fault injection LAZY_UFFD_CLOSES_MID_RESTORE");
    }
    return serve(l, msg);
}

/* Fence every page still missing (see the top of this file) and record why the loader stopped. The
 * reason is set first, under the lock: a prefetcher that takes the lock next refuses instead of
 * installing into pages the fence is about to cover. */
static void fence_missing(struct sp_lazy *l, uint32_t end)
{
    pthread_mutex_lock(&l->install_lock);
    uint32_t serving = SP_LAZY_SERVING;
    __atomic_compare_exchange_n(&l->stats.end, &serving, end, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    if (l->inject & SP_INJECT_LAZY_UFFD_UNGUARDED) {
        pthread_mutex_unlock(&l->install_lock); /* the guard removed: missing pages read as zeros */
        return;
    }
    int64_t t0 = sp_now_ns();
    uint64_t fenced = 0;
    int err = 0;
    for (uint64_t p = 0; p < l->npages;) {
        if (__atomic_load_n(&l->present[p], __ATOMIC_ACQUIRE) != SP_LAZY_MISSING) {
            p++;
            continue;
        }
        uint64_t run = 1;
        while (p + run < l->npages && __atomic_load_n(&l->present[p + run], __ATOMIC_ACQUIRE) == SP_LAZY_MISSING)
            run++;
        if (mprotect(l->dst + p * LAZY_PAGE, run * LAZY_PAGE, PROT_NONE) < 0) {
            err = errno; /* ENOMEM: one more VMA would pass vm.max_map_count */
            break;
        }
        for (uint64_t q = p; q < p + run; q++)
            __atomic_store_n(&l->present[q], SP_LAZY_FENCED, __ATOMIC_RELEASE);
        fenced += run;
        p += run;
    }
    if (err) {
        /* Too many runs: the whole region, installed pages too. The guest stops at its next access. */
        if (mprotect(l->dst, l->size, PROT_NONE) == 0) {
            err = 0;
            __atomic_store_n(&l->stats.fenced_whole, 1, __ATOMIC_RELEASE);
            for (uint64_t p = 0; p < l->npages; p++) {
                uint8_t missing = SP_LAZY_MISSING;
                if (__atomic_compare_exchange_n(&l->present[p], &missing, SP_LAZY_FENCED, 0, __ATOMIC_ACQ_REL,
                                                __ATOMIC_ACQUIRE))
                    fenced++;
            }
        }
    }
    l->stats.fence_err = err;
    l->stats.fenced_pages += fenced;
    l->stats.fence_ns += (uint64_t)(sp_now_ns() - t0);
    if (fenced || l->stats.fenced_whole)
        __atomic_store_n(&l->fenced, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&l->install_lock);
}

/* The handler leaves without being asked to (an error, or the injected death): fence what is missing,
 * then wake whoever waits on a fault it will never serve. Dead in the stats before anyone is woken:
 * a vCPU that stops finds the reason at once. */
static void handler_dies(struct sp_lazy *l, int err)
{
    l->stats.handler_err = err;
    int closes = err == ECANCELED && (l->inject & SP_INJECT_LAZY_UFFD_CLOSES_MID_RESTORE);
    fence_missing(l, closes ? SP_LAZY_UFFD_CLOSED : SP_LAZY_HANDLER_DIED);
    __atomic_store_n(&l->stats.handler_alive, 0, __ATOMIC_RELEASE);
    if (closes) {
        /* As a handler process's death drops its uffd: the file's last reference goes, the kernel
         * unregisters the range and wakes every waiter (userfaultfd_release). /dev/null dup'ed over the
         * fd closes it atomically and keeps the number ours, so a prefetcher's next ioctl gets ENOTTY
         * on our own fd, never lands on a number reused by someone else. */
        int nul = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (nul >= 0 && dup3(nul, l->uffd, O_CLOEXEC) >= 0)
            __atomic_store_n(&l->uffd_closed, 1, __ATOMIC_RELEASE);
        if (nul >= 0)
            close(nul);
        return;
    }
    struct uffdio_range all = {.start = (uint64_t)(uintptr_t)l->dst, .len = l->size};
    (void)ioctl(l->uffd, UFFDIO_WAKE, &all); /* sp_lazy_release() unregisters, which wakes them too */
}

static void *lazy_handler_main(void *arg)
{
    struct sp_lazy *l = arg;
    if (l->handler_cpu >= 0)
        sp_pin_current_thread(l->handler_cpu);
    /* 0 only when asked to stop through stop_fd. */
    int err = sp_uffd_serve_loop(l->uffd, l->stop_fd, serve_message, l, &l->stats.other_events);
    if (err)
        handler_dies(l, err);
    __atomic_store_n(&l->stats.handler_alive, 0, __ATOMIC_RELEASE);
    return NULL;
}

static int lazy_stop_handler(struct sp_lazy *l, int64_t timeout_ns)
{
    if (!l->thread_started)
        return 0;
    int r = sp_uffd_stop_thread(l->thread, l->stop_fd, timeout_ns);
    if (r == 0)
        l->thread_started = 0;
    return r;
}

int sp_lazy_create(uint64_t dst, uint64_t size, int src_fd, uint64_t src_offset, uint64_t features,
                   uint32_t inject, int handler_cpu, struct sp_lazy **out, uint64_t *supported)
{
    *out = NULL;
    *supported = 0;
    if (size == 0 || size % LAZY_PAGE || dst % LAZY_PAGE || src_offset % LAZY_PAGE) {
        errno = EINVAL;
        return sp_fail("sp_lazy_create(region or file offset not page aligned)");
    }
    struct sp_lazy *l = calloc(1, sizeof(*l));
    if (!l) {
        errno = ENOMEM;
        return sp_fail("calloc");
    }
    l->uffd = l->stop_fd = -1;
    l->dst = (uint8_t *)(uintptr_t)dst;
    l->size = size;
    l->npages = size / LAZY_PAGE;
    l->handler_cpu = handler_cpu;
    l->inject = inject & (SP_INJECT_LAZY_UFFD_CLOSES_MID_RESTORE | SP_INJECT_LAZY_UFFD_UNGUARDED);
    pthread_mutex_init(&l->install_lock, NULL);
    int r, via_devnode;
    uint64_t ioctls;
    l->present = calloc(l->npages, 1);
    if (!l->present) {
        errno = ENOMEM;
        r = sp_fail("calloc(present map)");
        goto fail;
    }
    /* The source: the file's image, read-only and shared, so UFFDIO_COPY reads the page cache. */
    void *src = mmap(NULL, size, PROT_READ, MAP_SHARED, src_fd, (off_t)src_offset);
    if (src == MAP_FAILED) {
        r = sp_fail("mmap(snapshot file, PROT_READ)");
        goto fail;
    }
    l->src = src;
    if ((r = sp_uffd_open(&via_devnode)) < 0)
        goto fail;
    l->uffd = r;
    if ((r = sp_uffd_api(l->uffd, features, supported, &ioctls)) < 0)
        goto fail;
    if ((*supported & features) != features) {
        errno = EOPNOTSUPP; /* the kernel accepted the call but does not offer every feature asked for */
        r = sp_fail("UFFDIO_API(requested features missing from the returned mask)");
        goto fail;
    }
    if ((r = sp_uffd_register(l->uffd, dst, size, UFFDIO_REGISTER_MODE_MISSING, &ioctls)) < 0)
        goto fail;
    l->registered = 1;
    if (!(ioctls & (1ULL << _UFFDIO_COPY))) {
        errno = EOPNOTSUPP; /* registered, but this memory type offers no UFFDIO_COPY */
        r = sp_fail("UFFDIO_REGISTER(no UFFDIO_COPY for this memory)");
        goto fail;
    }
    l->stop_fd = eventfd(0, EFD_CLOEXEC);
    if (l->stop_fd < 0) {
        r = sp_fail("eventfd");
        goto fail;
    }
    l->stats.handler_alive = 1;
    if ((r = pthread_create(&l->thread, NULL, lazy_handler_main, l)) != 0) {
        l->stats.handler_alive = 0;
        errno = r;
        r = sp_fail("pthread_create(lazy handler)");
        goto fail;
    }
    l->thread_started = 1;
    l->live = 1;
    *out = l;
    return 0;
fail:
    sp_lazy_destroy(l);
    return r;
}

/* Install every page still missing, runs of up to batch pages per UFFDIO_COPY. */
static int stopped_serving(struct sp_lazy *l)
{
    return __atomic_load_n(&l->stats.end, __ATOMIC_ACQUIRE) != SP_LAZY_SERVING;
}

int64_t sp_lazy_prefetch_all(struct sp_lazy *l, uint64_t batch)
{
    if (stopped_serving(l) && __atomic_load_n(&l->stats.end, __ATOMIC_ACQUIRE) != SP_LAZY_RELEASED) {
        errno = EOWNERDEAD; /* the handler died or the uffd was closed: what is missing stays fenced */
        return sp_fail("sp_lazy_prefetch_all(the loader stopped serving)");
    }
    if (!l->registered || batch == 0) {
        errno = EINVAL;
        return sp_fail(batch ? "sp_lazy_prefetch_all(released)" : "sp_lazy_prefetch_all(batch 0)");
    }
    uint64_t base = (uint64_t)(uintptr_t)l->dst;
    int64_t installed = 0;
    int eagain = 0;
    for (uint64_t p = 0; p < l->npages;) {
        if (__atomic_load_n(&l->present[p], __ATOMIC_ACQUIRE)) {
            p++;
            continue;
        }
        uint64_t run = 1;
        while (p + run < l->npages && run < batch && !__atomic_load_n(&l->present[p + run], __ATOMIC_ACQUIRE))
            run++;
        /* Without DONTWAKE: a vCPU faulting on one of these pages right now is woken by the copy. */
        struct uffdio_copy copy = {
            .dst = base + p * LAZY_PAGE,
            .src = (uint64_t)(uintptr_t)(l->src + p * LAZY_PAGE),
            .len = run * LAZY_PAGE,
            .mode = 0,
        };
        pthread_mutex_lock(&l->install_lock);
        if (stopped_serving(l)) {
            pthread_mutex_unlock(&l->install_lock);
            errno = EOWNERDEAD;
            return sp_fail("sp_lazy_prefetch_all(the loader stopped serving)");
        }
        int rc = ioctl(l->uffd, UFFDIO_COPY, &copy);
        int e = errno;
        int64_t done = rc == 0 ? (int64_t)copy.len : copy.copy;
        if (done > 0) {
            uint64_t pages = (uint64_t)done / LAZY_PAGE;
            for (uint64_t q = p; q < p + pages; q++)
                __atomic_store_n(&l->present[q], SP_LAZY_PRESENT, __ATOMIC_RELEASE);
            pthread_mutex_unlock(&l->install_lock);
            installed += (int64_t)pages;
            p += pages;
            eagain = 0;
            continue; /* a short copy stopped at a page someone else installed: the next call says EEXIST */
        }
        if (rc < 0 && e == EEXIST) {
            __atomic_store_n(&l->present[p], SP_LAZY_PRESENT, __ATOMIC_RELEASE);
            pthread_mutex_unlock(&l->install_lock);
            __atomic_fetch_add(&l->stats.prefetch_eexist, 1, __ATOMIC_RELAXED);
            p++;
            continue;
        }
        pthread_mutex_unlock(&l->install_lock);
        if (rc < 0 && e == EAGAIN && ++eagain < LAZY_EAGAIN_RETRIES)
            continue;
        errno = e ? e : EIO;
        return sp_fail("UFFDIO_COPY(prefetch)");
    }
    __atomic_fetch_add(&l->stats.prefetch_pages, (uint64_t)installed, __ATOMIC_RELAXED);
    return installed;
}

int64_t sp_lazy_pages_present(struct sp_lazy *l)
{
    int64_t n = 0;
    for (uint64_t p = 0; p < l->npages; p++)
        n += __atomic_load_n(&l->present[p], __ATOMIC_ACQUIRE) == SP_LAZY_PRESENT;
    return n;
}

int64_t sp_lazy_page_states(struct sp_lazy *l, uint8_t *out, uint64_t npages)
{
    if (npages > l->npages)
        npages = l->npages;
    for (uint64_t p = 0; p < npages; p++)
        out[p] = __atomic_load_n(&l->present[p], __ATOMIC_ACQUIRE);
    return (int64_t)npages;
}

uint32_t sp_lazy_end(struct sp_lazy *l) { return __atomic_load_n(&l->stats.end, __ATOMIC_ACQUIRE); }

int64_t sp_lazy_fenced_in(struct sp_lazy *l, uint64_t first, uint64_t npages)
{
    if (!__atomic_load_n(&l->fenced, __ATOMIC_ACQUIRE) || first >= l->npages)
        return 0;
    if (npages > l->npages - first)
        npages = l->npages - first;
    if (__atomic_load_n(&l->stats.fenced_whole, __ATOMIC_ACQUIRE))
        return (int64_t)npages;
    int64_t n = 0;
    for (uint64_t p = first; p < first + npages; p++)
        n += __atomic_load_n(&l->present[p], __ATOMIC_ACQUIRE) == SP_LAZY_FENCED;
    return n;
}

/* Stop the handler and unregister: the memory stays as it is, a plain mapping again. A page still
 * missing would then read as zeros, so it is fenced first (prefetch before to keep the whole image). */
int sp_lazy_release(struct sp_lazy *l, int64_t timeout_ns)
{
    int r = lazy_stop_handler(l, timeout_ns);
    if (l->thread_started)
        return r; /* the handler did not stop: nothing is touched under it */
    if (l->registered) {
        if (l->live) /* not for a create that failed: the caller's memory was never the loader's to fill */
            fence_missing(l, SP_LAZY_RELEASED);
        /* Unregistering also wakes any thread still waiting on a fault in the range: onto the fence. */
        int u = __atomic_load_n(&l->uffd_closed, __ATOMIC_ACQUIRE) ? 0 :
                sp_uffd_unregister(l->uffd, (uint64_t)(uintptr_t)l->dst, l->size);
        l->registered = 0;
        if (!r)
            r = u;
    }
    return r;
}

void sp_lazy_destroy(struct sp_lazy *l)
{
    if (!l)
        return;
    sp_lazy_release(l, 5000000000LL);
    if (l->thread_started) {
        /* The handler did not stop in time: leaking it is safer than unmapping under it. */
        return;
    }
    if (l->uffd >= 0)
        close(l->uffd);
    if (l->stop_fd >= 0)
        close(l->stop_fd);
    if (l->src)
        munmap((void *)l->src, l->size);
    free(l->present);
    pthread_mutex_destroy(&l->install_lock);
    free(l);
}

void sp_lazy_get_stats(struct sp_lazy *l, struct sp_lazy_stats *out)
{
    memcpy(out, &l->stats, sizeof(*out));
}

int sp_lazy_uffd(struct sp_lazy *l) { return l->uffd; }
