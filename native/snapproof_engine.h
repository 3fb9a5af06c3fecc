/*
 * snapproof engine ABI, version 1: what a live memory snapshot engine implements so snapproof can
 * judge it (pytest --engine PATH).
 *
 * An engine takes one snapshot of one guest-memory mapping into one destination buffer while the
 * guest may keep writing: it write-protects the mapping with userfaultfd (arm), copies a page before
 * un-protecting it when anything writes it (its fault handler thread), copies the rest (bulk copy),
 * and at finalize makes sure every page reached the destination, un-protects what is left and stops
 * its handler. The destination must then equal guest memory as it was at the arm, byte for byte.
 *
 * A shared library exports the functions below (C linkage, these names). snapproof loads it with
 * dlopen, checks spe_abi_version() first, and refuses another version naming both. The built-in
 * engine (native/engines/builtin.c) is loaded the same way; native/engines/naive.c is a second,
 * independent one. README.md, "Testing your own engine", walks through a minimal engine.
 *
 * Conventions:
 * - Functions return 0 (or a count) on success and a negative errno on failure. After a failure,
 *   spe_last_error() returns a message for it on the calling thread (the operation that failed, in
 *   the engine's words); snapproof puts it in the failure it reports.
 * - -EOWNERDEAD from any call means the engine's fault handler died mid-snapshot: the engine must then
 *   have un-protected the whole region (nobody may stay blocked on a fault no one serves) and the
 *   snapshot is void.
 * - Pages are the engine's WP granule, cfg->page_size: page i is guest memory [i * page_size,
 *   (i + 1) * page_size) and goes to dst + i * page_size.
 * - Calls on one engine come from one thread at a time, except that spe_get_stats() may run while
 *   spe_bulk_copy() runs on another thread (the suite watches progress) and the handler thread is the
 *   engine's own.
 * - More than one snapshot per engine object is an optional extension of ABI 1 (the spe_snapshot_*
 *   functions, at the end): an engine says what it offers in spe_capabilities(), an optional export
 *   (none: no capability). An engine object is driven either by spe_arm/spe_bulk_copy/spe_finalize
 *   (one snapshot, into cfg->dst) or by the spe_snapshot_* calls (each snapshot into its own
 *   destination; cfg->dst may then be 0), never by both. Calls for different snapshots may come from
 *   different threads at once: a copier thread per snapshot, and an arm while another one's bulk copy
 *   runs, as a live-fork VMM takes forks in quick succession.
 * - Named points (enum spe_point): at each, an engine calls cfg->point(cfg->point_ctx, point, first,
 *   n) when cfg->point is not NULL. The suite uses them to hold one thread of the engine at one page
 *   and line a race up deterministically (a write, a fault capture and the bulk copier on one page);
 *   an engine that never calls a point cannot have the races around it proven, and the race tests
 *   fail naming the point. The *_WAIT points are where a correct engine waits for the other side:
 *   an engine that never waits there never calls them.
 */
#ifndef SNAPPROOF_ENGINE_H
#define SNAPPROOF_ENGINE_H
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* An engine library exports these symbols with default visibility whatever its build's default. */
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

/* CDEF-BEGIN */
#define SPE_ABI_VERSION 1

/* Sizes of the bounded arrays in struct spe_stats (part of the ABI: changing one is a new version). */
#define SPE_FAULT_LOG 64       /* the first 64 faults are logged */
#define SPE_HIST_BUCKETS 1024  /* fault service time, 1 us buckets; the last is overflow */
#define SPE_MAX_CPUS 64        /* faults served per CPU, CPUs 0..63 */

enum spe_point {
    /* handler: the faulting page is claimed for capture, its copy not yet made (mid-capture) */
    SPE_POINT_FAULT_CAPTURE = 1,
    /* handler: the faulting page is being copied by the bulk copier; about to wait for that copy */
    SPE_POINT_FAULT_WAIT = 2,
    /* copier: pages [first, first + n) are claimed (flagged) for copy, not yet copied */
    SPE_POINT_BULK_CAPTURE = 3,
    /* copier: page `first` of its batch is mid-capture by the handler; about to wait for that capture */
    SPE_POINT_BULK_WAIT = 4,
    /* copier: about to un-protect [first, first + n) */
    SPE_POINT_BULK_UNPROTECT = 5,
    /* handler (SPE_CAP_PREARMED): a write fault on `first` read while pre-armed, not yet served (neither recorded
     * nor captured); the arm may come before it is, as it does for a fault in flight when the pause begins */
    SPE_POINT_FAULT_PREARMED = 6
};

/* Called at a named point; it may block (the suite holds the calling thread there), so an engine
 * calls it holding no lock the other side needs. first/n are pages. */
typedef void (*spe_point_fn)(void *ctx, uint32_t point, uint64_t first_page, uint64_t npages);

struct spe_config {
    uint32_t abi_version;      /* SPE_ABI_VERSION of the caller */
    uint32_t struct_size;      /* sizeof(struct spe_config) of the caller */
    uint64_t mem;              /* guest memory: host address of its mapping, page aligned */
    uint64_t mem_size;         /* its size in bytes, a multiple of page_size */
    uint64_t page_size;        /* the WP granule: 4096, or the huge page size of hugetlb memory */
    int32_t mem_fd;            /* the fd behind the mapping (a memfd), or -1 (anonymous memory) */
    int32_t handler_cpu;       /* pin the fault handler thread to this CPU; -1: anywhere */
    uint64_t mem_fd_offset;    /* where the mapping starts in mem_fd */
    uint64_t dst;              /* the destination: mem_size writable bytes, page i at dst + i * page_size;
                                  0 for an engine object driven by the spe_snapshot_* calls */
    uint64_t dst_size;         /* bytes at dst (>= mem_size) */
    /* UFFDIO_API features to ask for: the kernel offers each (WP on shmem, thread ids, and
     * WP_UNPOPULATED where the kernel has it; without it the suite populated every page before create,
     * so no hole is left for a plain arm to miss). An engine may ask for more. */
    uint64_t uffd_features;
    /* Engine-specific fault-injection switches (the built-in engine's enum sp_inject); 0: none. An
     * engine that has no switches refuses any other value with -EINVAL. */
    uint64_t switches;
    spe_point_fn point;        /* NULL, or called at each named point */
    void *point_ctx;
};

struct spe_fault {
    uint64_t offset;           /* page-aligned offset of the faulting page in guest memory */
    uint64_t flags;            /* uffd_msg.arg.pagefault.flags as read: 0x3 = WRITE|WP */
    uint64_t service_ns;       /* handler: message read -> page un-protected; 0 if not measured */
    uint32_t tid;              /* the faulting thread (UFFD_FEATURE_THREAD_ID); 0 if unknown */
    int32_t handler_cpu;       /* CPU the handler served it on; -1 if unknown */
    uint32_t copied;           /* 1: this fault captured the page (0: someone else had, or will) */
    uint32_t reserved;
};

struct spe_stats {
    uint64_t arm_ns;           /* the last arm: the UFFDIO_WRITEPROTECT of the whole region and its set-up */
    uint64_t faults;           /* fault messages served */
    uint64_t fault_pages;      /* pages the fault handler captured */
    uint64_t bulk_pages;       /* pages the bulk copier captured */
    uint64_t waited_on_copier; /* faults that found their page mid-copy and waited (0 if not counted) */
    uint64_t other_events;     /* uffd messages that were not page faults */
    uint64_t service_ns_total; /* sum of the faults' service times (0 if not measured) */
    uint64_t service_ns_max;
    uint64_t features_requested; /* what UFFDIO_API was asked for */
    uint64_t features_granted;   /* what UFFDIO_API returned */
    int32_t handler_err;       /* errno that stopped the handler, 0 if none (a normal stop is 0) */
    int32_t handler_alive;     /* 1 while the handler thread runs */
    uint32_t log_len;          /* entries in log[], at most SPE_FAULT_LOG */
    uint32_t reserved;
    uint64_t hist_us[1024];    /* optional: fault service time histogram (SPE_HIST_BUCKETS) */
    uint64_t handler_cpu[64];  /* optional: faults served per CPU (SPE_MAX_CPUS) */
    struct spe_fault log[64];  /* the first faults, in the order served (SPE_FAULT_LOG) */
};

struct spe_engine;

/* Identity: the ABI version this library implements (SPE_ABI_VERSION), its name and its version
 * (static strings). */
uint32_t spe_abi_version(void);
const char *spe_engine_name(void);
const char *spe_engine_version(void);

/* Register the mapping with a userfaultfd (WP mode, cfg->uffd_features), start the fault handler;
 * nothing is protected yet. The engine copies cfg; it may write to cfg->dst from spe_arm() until
 * spe_finalize() or spe_release() returns, and never after. */
int spe_create(const struct spe_config *cfg, struct spe_engine **out);
/* Write-protect the whole region, every page uncaptured. The suite calls it with the vCPUs paused. */
int spe_arm(struct spe_engine *e);
/* Un-protect the whole region, keeping the handler: spe_arm() may run again (the arm benchmark). */
int spe_disarm(struct spe_engine *e);
/* Protect pages [first, first + n) again, uncaptured: a second capture of part of the region. */
int spe_rearm(struct spe_engine *e, uint64_t first_page, uint64_t npages);
/* Capture every page of [first, first + n) not captured yet and un-protect them, `batch` pages at a
 * time (0: the engine's choice); whole region: (0, mem_size / page_size). Returns the pages this call
 * copied. A page the handler is capturing is the handler's: the copier neither copies it again nor
 * un-protects it before that capture ended. */
int64_t spe_bulk_copy(struct spe_engine *e, uint64_t first_page, uint64_t npages, uint64_t batch);
/* Returns 0 only when every page is captured: then the region is un-protected, the handler stopped
 * and joined, and the destination is no longer touched. A capture still in flight is waited for, up to
 * timeout_ns; -EAGAIN: pages not captured (the snapshot can still be completed and finalized again);
 * -ETIMEDOUT: the handler did not stop in time. */
int spe_finalize(struct spe_engine *e, int64_t timeout_ns);
/* Un-protect everything (waking every writer) and stop the handler, whatever state the snapshot is in;
 * the destination is no longer touched. */
int spe_release(struct spe_engine *e, int64_t timeout_ns);
void spe_get_stats(struct spe_engine *e, struct spe_stats *out);
/* Release (un-protect before the uffd goes), join the handler, close the uffd, free. NULL is a no-op. */
void spe_close(struct spe_engine *e);
/* The message of the last failure on the calling thread ("" if none). */
const char *spe_last_error(void);

/* ---- optional: more than one snapshot per engine object (spe_capabilities() says which) ---- */

/* spe_capabilities() bits. */
#define SPE_CAP_OVERLAPPING 1 /* a snapshot may be armed while earlier ones are still live (copying) */
#define SPE_CAP_CONSECUTIVE 2 /* after spe_snapshot_finalize(), spe_snapshot_arm() again, same engine */
#define SPE_CAP_PREARMED 4    /* spe_prearm() while the guest runs, spe_arm_prearmed() at the instant (below) */

struct spe_snapshot_stats {
    uint64_t arm_ns;             /* its arm: the whole region protected again, every page uncaptured for it */
    uint64_t fault_pages;        /* its pages captured by the fault handler */
    uint64_t bulk_pages;         /* its pages captured by its bulk copy */
    uint64_t shared_fault_pages; /* of fault_pages: faults that captured the page into another snapshot too */
    uint32_t live;               /* 1 from its arm until its finalize */
    uint32_t reserved;
};

/* SPE_CAP_* bits this engine offers (an engine that does not export it offers none). An engine that
 * offers any exports every spe_snapshot_* function below. */
uint64_t spe_capabilities(void);
/* A new snapshot of guest memory as it is now, into dst (dst_size >= mem_size bytes, page i at
 * dst + i * page_size): protect the whole region again, every page uncaptured for this snapshot, while
 * every snapshot still live keeps what it holds. Returns the snapshot's id (>= 0); -EBUSY when the
 * engine cannot hold one more live snapshot. The suite calls it with the vCPUs paused. From then on a
 * write to a page is caught until every live snapshot holds the page: a fault copies the page into
 * each live snapshot that does not hold it yet, then un-protects it once; no capture ever writes a
 * page a snapshot already holds. The engine may write to dst until spe_snapshot_finalize(id) (or
 * spe_release) returns, and never after. */
int spe_snapshot_arm(struct spe_engine *e, uint64_t dst, uint64_t dst_size);
/* Capture into snapshot id every page of [first, first + n) it does not hold yet (as spe_bulk_copy),
 * and un-protect those every live snapshot now holds. Returns the pages this call copied. */
int64_t spe_snapshot_bulk_copy(struct spe_engine *e, int id, uint64_t first_page, uint64_t npages, uint64_t batch);
/* 0 only when snapshot id holds every page: it is no longer live and its destination no longer touched;
 * once no snapshot is live the region is un-protected. The handler keeps running (the next
 * spe_snapshot_arm needs it). A capture in flight is waited for up to timeout_ns; -EAGAIN: pages
 * missing (complete it and finalize again). */
int spe_snapshot_finalize(struct spe_engine *e, int id, int64_t timeout_ns);
void spe_snapshot_get_stats(struct spe_engine *e, int id, struct spe_snapshot_stats *out);

/* ---- optional: a pre-armed snapshot (SPE_CAP_PREARMED), whose arm does not grow with memory ---- */

struct spe_prearm_stats {
    uint64_t prearm_ns;          /* the last spe_prearm(): its pages protected, the guest running */
    uint64_t recorded_pages;     /* pages written between the last spe_prearm() and spe_arm_prearmed(), each once */
    uint64_t reprotected_pages;  /* spe_arm_prearmed(): pages it protected again */
    uint64_t reprotect_calls;    /* spe_arm_prearmed(): UFFDIO_WRITEPROTECT calls that took (a run of contiguous
                                    pages is one) */
    uint64_t arm_ns;             /* spe_arm_prearmed(): its whole time, the pages protected again and the snapshot live */
};

/* An engine offering SPE_CAP_PREARMED exports the three functions below. They drive the one snapshot of
 * spe_arm/spe_bulk_copy/spe_finalize (into cfg->dst): spe_prearm() and spe_arm_prearmed() together stand for
 * spe_arm(), and bulk copy, finalize and release follow as after it.
 *
 * Write-protect the whole region with the guest running (its cost is not in the pause), every page uncaptured;
 * capture nothing yet: until spe_arm_prearmed(), a write fault only records its page as written and
 * un-protects it (the write goes on). Called again before spe_arm_prearmed(), a round, as pre-copy's: protect
 * again the pages written since the last call, the guest running, and record anew, so that fewer are left for
 * the pause. Returns the pages it protected (the whole region's, then each round's); -EBUSY when the engine is
 * armed already. */
int64_t spe_prearm(struct spe_engine *e);
/* The snapshot instant, called with the vCPUs paused: protect again every page written since the last
 * spe_prearm() (the engine's own record; contiguous pages in one call) and make the snapshot live: from here the
 * engine behaves exactly as after spe_arm(), and the destination must equal guest memory as it is now. No page
 * written before this call may stay writable, one whose fault is in flight included: a fault served before it
 * records its page before un-protecting it, one served after it captures the page first. Returns the pages
 * protected again; -EINVAL when the engine is not pre-armed. */
int64_t spe_arm_prearmed(struct spe_engine *e);
void spe_prearm_get_stats(struct spe_engine *e, struct spe_prearm_stats *out);
/* CDEF-END */

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

#ifdef __cplusplus
}
#endif
#endif
