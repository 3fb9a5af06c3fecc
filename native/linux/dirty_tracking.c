/*
 * Dirty-page tracking, three ways: for iterative pre-copy (phase 5) and for
 * the diffs of incremental snapshots (phase 6).
 *
 * 1. userfaultfd in WP_ASYNC mode (kernel 6.7): the region is registered WP
 *    and write-protected, but a write to a protected page is resolved by the
 *    kernel itself (it clears the page's uffd-wp bit, no message, no handler
 *    thread). The PAGEMAP_SCAN ioctl then reads the pages written since the
 *    last scan (PAGE_IS_WRITTEN) and write-protects them again in the same
 *    walk (PM_SCAN_WP_MATCHING): a get-and-clear of the dirty set. A page is
 *    protected again before it is copied, so a write racing the copy marks it
 *    written for the next round.
 * 2. KVM's dirty log (KVM_GET_DIRTY_LOG, also get-and-clear) gives a bitmap;
 *    sp_copy_pages_bitmap copies the pages it names.
 * 3. soft-dirty (CONFIG_MEM_SOFT_DIRTY): writing 4 to /proc/self/clear_refs
 *    clears the soft-dirty bit of every page of the process and write-protects
 *    them; a write sets the bit again, and /proc/self/pagemap shows it (bit
 *    55). Reading and clearing are two steps, and the clear covers every
 *    mapping of the process: a write between the two is lost, so both happen
 *    while nothing writes (the vCPUs paused, the VMM's devices quiet).
 *
 * Pre-copy copies each dirty page into the destination at its own offset, so
 * the destination converges on guest memory; a diff takes the dirty set as a
 * bitmap (sp_wpasync_collect_bitmap, sp_pagemap_bitmap) and stores only those pages.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1ULL << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1ULL << 15)
#endif

#define DT_PAGE 4096ULL
/* include/uapi/linux/fs.h (6.7) */
#define DT_PM_SCAN_WP_MATCHING (1ULL << 0)
#define DT_PM_SCAN_CHECK_WPASYNC (1ULL << 1)
#define DT_PAGE_IS_WRITTEN (1ULL << 1)
/* Regions one PAGEMAP_SCAN call may return; a fuller walk stops early and is resumed at walk_end. */
#define DT_VEC 4096

struct sp_wpasync {
    int uffd;
    int registered;
    int protected_;
    uint8_t *mem;
    uint64_t size;
    struct sp_page_region *vec;
};

int sp_wpasync_create(uint64_t mem, uint64_t size, uint64_t features, struct sp_wpasync **out, uint64_t *supported)
{
    *out = NULL;
    *supported = 0;
    if (size == 0 || size % DT_PAGE || mem % DT_PAGE) {
        errno = EINVAL;
        return sp_fail("sp_wpasync_create(region not page aligned)");
    }
    struct sp_wpasync *t = calloc(1, sizeof(*t));
    if (!t) {
        errno = ENOMEM;
        return sp_fail("calloc");
    }
    t->uffd = -1;
    t->mem = (uint8_t *)(uintptr_t)mem;
    t->size = size;
    int r, via_devnode;
    uint64_t ioctls;
    t->vec = calloc(DT_VEC, sizeof(*t->vec));
    if (!t->vec) {
        errno = ENOMEM;
        r = sp_fail("calloc(PAGEMAP_SCAN regions)");
        goto fail;
    }
    if ((r = sp_uffd_open(&via_devnode)) < 0)
        goto fail;
    t->uffd = r;
    if ((r = sp_uffd_api(t->uffd, features, supported, &ioctls)) < 0)
        goto fail;
    if (!(*supported & UFFD_FEATURE_WP_ASYNC) || !(features & UFFD_FEATURE_WP_ASYNC)) {
        errno = EOPNOTSUPP;
        r = sp_fail("UFFDIO_API(UFFD_FEATURE_WP_ASYNC not granted)");
        goto fail;
    }
    if ((r = sp_uffd_register(t->uffd, mem, size, UFFDIO_REGISTER_MODE_WP, &ioctls)) < 0)
        goto fail;
    t->registered = 1;
    *out = t;
    return 0;
fail:
    sp_wpasync_destroy(t);
    return r;
}

/* Every page clean: write-protect the whole region (writes from now on mark pages written). */
int sp_wpasync_protect_all(struct sp_wpasync *t)
{
    int r = sp_uffd_writeprotect(t->uffd, (uint64_t)(uintptr_t)t->mem, t->size, 1);
    if (r == 0)
        t->protected_ = 1;
    return r;
}

/* Get-and-clear the written pages and copy each into dst (same offset). Returns the pages copied;
 * scan_ns / copy_ns / regions add up what the call spent scanning, copying, and how many runs. */
int64_t sp_wpasync_collect(struct sp_wpasync *t, uint64_t dst, uint64_t *scan_ns, uint64_t *copy_ns,
                           uint64_t *regions)
{
    uint64_t start = (uint64_t)(uintptr_t)t->mem, end = start + t->size, walk_end = 0;
    uint8_t *to = (uint8_t *)(uintptr_t)dst;
    int64_t pages = 0;
    while (start < end) {
        int64_t t0 = sp_now_ns();
        int64_t n = sp_pagemap_scan(start, end, DT_PM_SCAN_WP_MATCHING | DT_PM_SCAN_CHECK_WPASYNC,
                                    DT_PAGE_IS_WRITTEN, DT_PAGE_IS_WRITTEN, t->vec, DT_VEC, &walk_end);
        int64_t t1 = sp_now_ns();
        *scan_ns += (uint64_t)(t1 - t0);
        if (n < 0)
            return n;
        for (int64_t i = 0; i < n; i++) {
            uint64_t off = t->vec[i].start - (uint64_t)(uintptr_t)t->mem;
            uint64_t len = t->vec[i].end - t->vec[i].start;
            memcpy(to + off, t->mem + off, len);
            pages += (int64_t)(len / DT_PAGE);
        }
        *copy_ns += (uint64_t)(sp_now_ns() - t1);
        *regions += (uint64_t)n;
        if (walk_end <= start) {
            errno = EIO;
            return sp_fail("PAGEMAP_SCAN(walk made no progress)");
        }
        start = walk_end;
    }
    return pages;
}

/* Get-and-clear the written pages as a bitmap (bit i of u64 word i/64 = page i of the region, KVM's
 * dirty-log layout), OR-ed into `bitmap`; nothing is copied. Returns the pages found written. */
int64_t sp_wpasync_collect_bitmap(struct sp_wpasync *t, uint64_t *bitmap, uint64_t *scan_ns)
{
    uint64_t base = (uint64_t)(uintptr_t)t->mem, start = base, end = start + t->size, walk_end = 0;
    int64_t pages = 0;
    while (start < end) {
        int64_t t0 = sp_now_ns();
        int64_t n = sp_pagemap_scan(start, end, DT_PM_SCAN_WP_MATCHING | DT_PM_SCAN_CHECK_WPASYNC,
                                    DT_PAGE_IS_WRITTEN, DT_PAGE_IS_WRITTEN, t->vec, DT_VEC, &walk_end);
        *scan_ns += (uint64_t)(sp_now_ns() - t0);
        if (n < 0)
            return n;
        for (int64_t i = 0; i < n; i++) {
            for (uint64_t p = (t->vec[i].start - base) / DT_PAGE; p < (t->vec[i].end - base) / DT_PAGE; p++) {
                bitmap[p / 64] |= 1ULL << (p % 64);
                pages++;
            }
        }
        if (walk_end <= start) {
            errno = EIO;
            return sp_fail("PAGEMAP_SCAN(walk made no progress)");
        }
        start = walk_end;
    }
    return pages;
}

void sp_wpasync_destroy(struct sp_wpasync *t)
{
    if (!t)
        return;
    /* Un-protect before the uffd is dropped (unregister clears the bits too; this says so). */
    if (t->protected_)
        sp_uffd_writeprotect(t->uffd, (uint64_t)(uintptr_t)t->mem, t->size, 0);
    if (t->registered)
        sp_uffd_unregister(t->uffd, (uint64_t)(uintptr_t)t->mem, t->size);
    if (t->uffd >= 0)
        close(t->uffd);
    free(t->vec);
    free(t);
}

/* Soft-dirty: clear the bit on every page of this process (and write-protect them, so the next write
 * sets it again). The kernel takes the write for any value it knows, with or without
 * CONFIG_MEM_SOFT_DIRTY: whether the bits exist at all is the probe's question (sp_pagemap_bitmap). */
int sp_soft_dirty_clear(void)
{
    int fd = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return sp_fail("open(/proc/self/clear_refs)");
    ssize_t n = write(fd, "4", 1);
    int e = errno;
    close(fd);
    if (n != 1) {
        errno = n < 0 ? e : EIO;
        return sp_fail("write(/proc/self/clear_refs, \"4\")");
    }
    return 0;
}

/* Set bit i of `bitmap` (KVM's layout) for each page i of [start, start + npages * 4096) whose
 * /proc/self/pagemap entry has any bit of `mask` (bit 55 soft-dirty, bit 63 present); returns how
 * many. Reading pagemap populates nothing. */
int64_t sp_pagemap_bitmap(uint64_t start, uint64_t npages, uint64_t mask, uint64_t *bitmap)
{
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return sp_fail("open(/proc/self/pagemap)");
    enum { CHUNK = 4096 };
    uint64_t *buf = malloc(CHUNK * sizeof(uint64_t));
    if (!buf) {
        close(fd);
        errno = ENOMEM;
        return sp_fail("malloc(pagemap buffer)");
    }
    int64_t count = 0;
    for (uint64_t done = 0; done < npages;) {
        uint64_t n = npages - done < CHUNK ? npages - done : CHUNK;
        off_t off = (off_t)((start / DT_PAGE + done) * sizeof(uint64_t));
        ssize_t got = pread(fd, buf, n * sizeof(uint64_t), off);
        if (got != (ssize_t)(n * sizeof(uint64_t))) {
            if (got >= 0)
                errno = EIO;
            count = sp_fail("pread(/proc/self/pagemap)");
            break;
        }
        for (uint64_t i = 0; i < n; i++) {
            if (buf[i] & mask) {
                uint64_t p = done + i;
                bitmap[p / 64] |= 1ULL << (p % 64);
                count++;
            }
        }
        done += n;
    }
    free(buf);
    close(fd);
    return count;
}

/* Copy the pages whose bit is set in a KVM dirty bitmap (bit i of u64 word i/64 = page i). */
int64_t sp_copy_pages_bitmap(uint64_t dst, uint64_t src, const uint64_t *bitmap, uint64_t npages)
{
    uint8_t *to = (uint8_t *)(uintptr_t)dst;
    const uint8_t *from = (const uint8_t *)(uintptr_t)src;
    int64_t copied = 0;
    for (uint64_t w = 0; w < (npages + 63) / 64; w++) {
        uint64_t bits = bitmap[w];
        while (bits) {
            uint64_t page = w * 64 + (uint64_t)__builtin_ctzll(bits);
            bits &= bits - 1;
            if (page >= npages)
                break;
            /* Runs of set bits are copied as one memcpy. */
            uint64_t run = 1;
            while (bits && page + run == w * 64 + (uint64_t)__builtin_ctzll(bits) && page + run < npages) {
                bits &= bits - 1;
                run++;
            }
            memcpy(to + page * DT_PAGE, from + page * DT_PAGE, run * DT_PAGE);
            copied += (int64_t)run;
        }
    }
    return copied;
}

/* Offset of the first byte where [a, a + len) and [b, b + len) differ, or -1 when they are equal:
 * the exact oracle compares whole images at memcmp speed (a Python compare of 1 GiB takes seconds). */
int64_t sp_first_difference(uint64_t a, uint64_t b, uint64_t len)
{
    const uint8_t *x = (const uint8_t *)(uintptr_t)a, *y = (const uint8_t *)(uintptr_t)b;
    const uint64_t chunk = 1ULL << 20;
    for (uint64_t off = 0; off < len; off += chunk) {
        uint64_t n = len - off < chunk ? len - off : chunk;
        if (memcmp(x + off, y + off, n) != 0) {
            for (uint64_t i = 0; i < n; i++)
                if (x[off + i] != y[off + i])
                    return (int64_t)(off + i);
        }
    }
    return -1;
}
