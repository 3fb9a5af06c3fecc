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
 * A per-page "present" byte is advisory (it lets the prefetcher skip whole
 * runs and the stats tell who installed what); the kernel's EEXIST is the
 * truth when the two race. The handler stops through an eventfd: no poll
 * time-outs anywhere.
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
    uint8_t *present;   /* per page, __atomic access: 1 once someone installed it */
    int handler_cpu;
    int registered;
    int thread_started;
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
    return serve(ctx, msg);
}

static void *lazy_handler_main(void *arg)
{
    struct sp_lazy *l = arg;
    if (l->handler_cpu >= 0)
        sp_pin_current_thread(l->handler_cpu);
    int err = sp_uffd_serve_loop(l->uffd, l->stop_fd, serve_message, l, &l->stats.other_events);
    if (err)
        l->stats.handler_err = err;
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
                   int handler_cpu, struct sp_lazy **out, uint64_t *supported)
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
    *out = l;
    return 0;
fail:
    sp_lazy_destroy(l);
    return r;
}

/* Install every page still missing, runs of up to batch pages per UFFDIO_COPY. */
int64_t sp_lazy_prefetch_all(struct sp_lazy *l, uint64_t batch)
{
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
        int rc = ioctl(l->uffd, UFFDIO_COPY, &copy);
        int e = errno;
        int64_t done = rc == 0 ? (int64_t)copy.len : copy.copy;
        if (done > 0) {
            uint64_t pages = (uint64_t)done / LAZY_PAGE;
            for (uint64_t q = p; q < p + pages; q++)
                __atomic_store_n(&l->present[q], 1, __ATOMIC_RELEASE);
            installed += (int64_t)pages;
            p += pages;
            eagain = 0;
            continue; /* a short copy stopped at a page someone else installed: the next call says EEXIST */
        }
        if (rc < 0 && e == EEXIST) {
            __atomic_store_n(&l->present[p], 1, __ATOMIC_RELEASE);
            __atomic_fetch_add(&l->stats.prefetch_eexist, 1, __ATOMIC_RELAXED);
            p++;
            continue;
        }
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
        n += __atomic_load_n(&l->present[p], __ATOMIC_ACQUIRE);
    return n;
}

/* Stop the handler and unregister: the memory stays as it is, a plain mapping again
 * (a page still missing then reads as zero, so prefetch first to keep the image). */
int sp_lazy_release(struct sp_lazy *l, int64_t timeout_ns)
{
    int r = lazy_stop_handler(l, timeout_ns);
    if (l->registered && !l->thread_started) {
        /* Unregistering also wakes any thread still waiting on a fault in the range. */
        int u = sp_uffd_unregister(l->uffd, (uint64_t)(uintptr_t)l->dst, l->size);
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
    if (l->registered)
        sp_uffd_unregister(l->uffd, (uint64_t)(uintptr_t)l->dst, l->size);
    if (l->uffd >= 0)
        close(l->uffd);
    if (l->stop_fd >= 0)
        close(l->stop_fd);
    if (l->src)
        munmap((void *)l->src, l->size);
    free(l->present);
    free(l);
}

void sp_lazy_get_stats(struct sp_lazy *l, struct sp_lazy_stats *out)
{
    memcpy(out, &l->stats, sizeof(*out));
}

int sp_lazy_uffd(struct sp_lazy *l) { return l->uffd; }
