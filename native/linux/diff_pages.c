/*
 * The pages of an incremental snapshot's diff file, in and out.
 *
 * A diff stores only the pages its bitmap names, packed in page order (the
 * k-th set bit's page at k * 4096 of the file's page area). Writing one
 * gathers those pages out of guest memory; restoring a chain scatters each
 * diff's pages back to their places in the restored memory, newest diff
 * first, so a page that a newer diff holds is never overwritten by an older
 * one (`done` marks what is written).
 *
 * Gathering reads a memfd through its fd (pread) rather than the mapping: a
 * page the bitmap names that was never populated reads as zeros and stays
 * unpopulated, and the reads touch no page table entry a dirty tracker
 * watches. Scattering into memory a lazy loader owns (userfaultfd MISSING)
 * installs each page with UFFDIO_COPY, so the loader never fetches from the
 * base a page a diff replaces; a page already there (EEXIST) is written in
 * place.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/userfaultfd.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "internal.h"

#define DP_PAGE 4096ULL
/* UFFDIO_COPY answers EAGAIN while the address space changes under it; a loop that never sees progress
 * ends in an error, not a spin (as the lazy loader's). */
#define DP_EAGAIN_RETRIES 1000

static int bit_set(const uint64_t *bitmap, uint64_t page)
{
    return (bitmap[page / 64] >> (page % 64)) & 1;
}

/* The length of the run of set pages from `page` (a set page) on, at most up to npages. */
static uint64_t run_length(const uint64_t *bitmap, uint64_t page, uint64_t npages)
{
    uint64_t n = 1;
    while (page + n < npages && bit_set(bitmap, page + n))
        n++;
    return n;
}

int64_t sp_gather_pages(int fd, uint64_t fd_offset, uint64_t src, const uint64_t *bitmap, uint64_t npages,
                        uint64_t dst)
{
    uint8_t *to = (uint8_t *)(uintptr_t)dst;
    const uint8_t *from = (const uint8_t *)(uintptr_t)src;
    int64_t k = 0;
    for (uint64_t page = 0; page < npages;) {
        if (!bit_set(bitmap, page)) {
            page++;
            continue;
        }
        uint64_t run = run_length(bitmap, page, npages);
        if (fd >= 0) {
            uint64_t want = run * DP_PAGE, got = 0;
            while (got < want) {
                ssize_t n = pread(fd, to + k * DP_PAGE + got, want - got, (off_t)(fd_offset + page * DP_PAGE + got));
                if (n < 0 && errno == EINTR)
                    continue;
                if (n <= 0) {
                    if (n == 0)
                        errno = EIO;  /* the source ended before the page: it is shorter than the bitmap says */
                    return sp_fail("pread(guest memory)");
                }
                got += (uint64_t)n;
            }
        } else {
            memcpy(to + k * DP_PAGE, from + page * DP_PAGE, run * DP_PAGE);
        }
        k += (int64_t)run;
        page += run;
    }
    return k;
}

/* Install one page with UFFDIO_COPY: 1 when installed, 0 when it was there already (EEXIST), < 0 on error. */
static int install_page(int uffd, uint64_t dst, uint64_t src)
{
    struct uffdio_copy copy = {.dst = dst, .src = src, .len = DP_PAGE, .mode = 0};
    for (int tries = 0; tries < DP_EAGAIN_RETRIES; tries++) {
        copy.copy = 0;
        if (ioctl(uffd, UFFDIO_COPY, &copy) == 0)
            return 1;
        if (errno == EEXIST)
            return 0;
        if (errno != EAGAIN)
            return sp_fail("UFFDIO_COPY(diff page)");
    }
    return sp_fail("UFFDIO_COPY(diff page: EAGAIN without progress)");
}

int64_t sp_scatter_pages(int uffd, uint64_t dst, uint64_t src, const uint64_t *bitmap, uint64_t npages,
                         uint64_t *done, uint64_t *installed)
{
    uint8_t *to = (uint8_t *)(uintptr_t)dst;
    const uint8_t *from = (const uint8_t *)(uintptr_t)src;
    int64_t written = 0, k = 0;
    for (uint64_t w = 0; w < (npages + 63) / 64; w++) {
        uint64_t bits = bitmap[w];
        while (bits) {
            uint64_t page = w * 64 + (uint64_t)__builtin_ctzll(bits);
            bits &= bits - 1;
            if (page >= npages)
                break;
            const uint8_t *packed = from + (uint64_t)k * DP_PAGE;
            k++;
            if (bit_set(done, page))
                continue;  /* a newer diff holds this page */
            int r = 0;
            if (uffd >= 0) {
                r = install_page(uffd, (uint64_t)(uintptr_t)(to + page * DP_PAGE), (uint64_t)(uintptr_t)packed);
                if (r < 0)
                    return r;
                *installed += (uint64_t)r;
            }
            if (r == 0)
                memcpy(to + page * DP_PAGE, packed, DP_PAGE);
            done[page / 64] |= 1ULL << (page % 64);
            written++;
        }
    }
    return written;
}
