/*
 * The built-in engine behind the engine ABI (native/snapproof_engine.h).
 *
 * The engine itself is native/linux/uffd_wp.c (the three-state page map, the handler thread, the
 * bulk copier); this file only speaks the ABI over its sp_wp_* functions. It is compiled with the
 * engine's sources into its own library (native/engines/libsnapproof-builtin.so, by `python3 -m
 * native.build`) and loaded by dlopen like any other engine: the suite has no private way in.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "snapproof_engine.h"
#include "internal.h"

#define BUILTIN_VERSION "1.0"
/* With SP_INJECT_SINGLE_FLAG_RACE the copier flags a batch, then copies it page by page at this pace,
 * as a copier writing each page to a file with pwrite() would: the race has room to happen. */
#define SINGLE_FLAG_PACE_NS 2000ULL
/* How often finalize looks again at a capture in flight: a fault's capture is one page copy, microseconds. */
#define FINALIZE_POLL_NS 50000L

_Static_assert((int)SPE_POINT_FAULT_CAPTURE == (int)SP_POINT_FAULT_CAPTURE &&
                   (int)SPE_POINT_FAULT_WAIT == (int)SP_POINT_FAULT_WAIT &&
                   (int)SPE_POINT_BULK_CAPTURE == (int)SP_POINT_BULK_CAPTURE &&
                   (int)SPE_POINT_BULK_WAIT == (int)SP_POINT_BULK_WAIT &&
                   (int)SPE_POINT_BULK_UNPROTECT == (int)SP_POINT_BULK_UNPROTECT &&
                   (int)SPE_POINT_FAULT_PREARMED == (int)SP_POINT_FAULT_PREARMED,
               "the engine's named points are the ABI's");
_Static_assert(SPE_FAULT_LOG == SP_FAULT_LOG && SPE_HIST_BUCKETS == SP_HIST_BUCKETS && SPE_MAX_CPUS == SP_MAX_CPUS,
               "the engine's stats arrays are the ABI's");

struct spe_engine {
    struct sp_wp *w;
    uint64_t mem_size;
    uint64_t features_requested;
    uint64_t features_granted;
};

uint32_t spe_abi_version(void) { return SPE_ABI_VERSION; }
const char *spe_engine_name(void) { return "snapproof-builtin"; }
const char *spe_engine_version(void) { return BUILTIN_VERSION; }
const char *spe_last_error(void) { return sp_last_op(); }

static int refuse(const char *why)
{
    sp_set_last_op(why);
    return -EINVAL;
}

int spe_create(const struct spe_config *cfg, struct spe_engine **out)
{
    *out = NULL;
    if (cfg->abi_version != SPE_ABI_VERSION || cfg->struct_size < sizeof(*cfg))
        return refuse("spe_create(a configuration of another ABI version)");
    /* No destination: the engine object takes its snapshots with spe_snapshot_arm(), each into its own. */
    if (cfg->dst && cfg->dst_size < cfg->mem_size)
        return refuse("spe_create(destination smaller than guest memory)");
    if (cfg->switches & ~(uint64_t)SP_INJECT_ALL) /* the C-level switches: native/inject.py C_SWITCHES */
        return refuse("spe_create(unknown switches)");
    struct spe_engine *e = calloc(1, sizeof(*e));
    if (!e) {
        errno = ENOMEM;
        return sp_fail("calloc(engine)");
    }
    uint64_t pace = cfg->switches & SP_INJECT_SINGLE_FLAG_RACE ? SINGLE_FLAG_PACE_NS : 0;
    int r = sp_wp_create(cfg->mem, cfg->mem_size, cfg->page_size, cfg->uffd_features, (uint32_t)cfg->switches, pace,
                         cfg->handler_cpu, &e->w, &e->features_granted);
    if (r < 0) {
        free(e);
        return r;
    }
    e->features_requested = cfg->uffd_features;
    e->mem_size = cfg->mem_size;
    sp_wp_set_destination(e->w, cfg->dst);
    sp_wp_set_points(e->w, cfg->point, cfg->point_ctx); /* before the arm: no fault can call it yet */
    *out = e;
    return 0;
}

int spe_arm(struct spe_engine *e) { return sp_wp_arm(e->w); }
int spe_disarm(struct spe_engine *e) { return sp_wp_disarm(e->w); }
int spe_rearm(struct spe_engine *e, uint64_t first_page, uint64_t npages)
{
    return sp_wp_rearm_range(e->w, first_page, npages);
}

int64_t spe_bulk_copy(struct spe_engine *e, uint64_t first_page, uint64_t npages, uint64_t batch)
{
    /* batch 0 leaves it to the engine: SP_BULK_BATCH pages per un-protect. */
    return sp_wp_bulk_copy(e->w, first_page, npages, batch ? batch : SP_BULK_BATCH);
}

/* Wait, up to the deadline, until snapshot `id` (-1: the single snapshot) has no capture in flight (no page
 * COPYING), as the ABI asks of a finalize; the engine's own finalize refuses at once while one is. */
static void wait_captures(struct spe_engine *e, int id, int64_t deadline)
{
    struct timespec pause = {.tv_sec = 0, .tv_nsec = FINALIZE_POLL_NS};
    for (;;) {
        int64_t copying = id < 0 ? sp_wp_pages_in_state(e->w, SP_PAGE_COPYING)
                                 : sp_wp_snap_pages_in_state(e->w, id, SP_PAGE_COPYING);
        if (copying == 0 || sp_now_ns() >= deadline)
            return;
        nanosleep(&pause, NULL);
    }
}

/* Once the handler is joined nothing copies any more: the destination is the caller's again. */
int spe_finalize(struct spe_engine *e, int64_t timeout_ns)
{
    int64_t deadline = sp_now_ns() + timeout_ns;
    wait_captures(e, -1, deadline);
    int64_t left = deadline - sp_now_ns();
    int r = sp_wp_finalize(e->w, left > 0 ? left : 0);
    if (r == 0)
        sp_wp_set_destination(e->w, 0);
    return r;
}

int spe_release(struct spe_engine *e, int64_t timeout_ns)
{
    int r = sp_wp_release(e->w, timeout_ns);
    sp_wp_set_destination(e->w, 0);
    return r;
}

void spe_get_stats(struct spe_engine *e, struct spe_stats *out)
{
    struct sp_wp_stats s;
    sp_wp_get_stats(e->w, &s);
    memset(out, 0, sizeof(*out));
    out->arm_ns = s.arm_ns;
    out->faults = s.faults;
    out->fault_pages = s.fault_pages;
    out->bulk_pages = s.bulk_pages;
    out->waited_on_copier = s.waited_on_copier;
    out->other_events = s.other_events;
    out->service_ns_total = s.service_ns_total;
    out->service_ns_max = s.service_ns_max;
    out->features_requested = e->features_requested;
    out->features_granted = e->features_granted;
    out->handler_err = s.handler_err;
    out->handler_alive = s.handler_alive;
    out->log_len = s.log_len;
    memcpy(out->hist_us, s.hist_us, sizeof(out->hist_us));
    memcpy(out->handler_cpu, s.handler_cpu, sizeof(out->handler_cpu));
    for (uint32_t i = 0; i < s.log_len && i < SPE_FAULT_LOG; i++) {
        out->log[i].offset = s.log[i].offset;
        out->log[i].flags = s.log[i].flags;
        out->log[i].service_ns = s.log[i].service_ns;
        out->log[i].tid = s.log[i].tid;
        out->log[i].handler_cpu = s.log[i].handler_cpu;
        out->log[i].copied = s.log[i].copied;
    }
}

/* ---- several snapshots per engine object: overlapping and consecutive (uffd_wp.c, sp_wp_snap_*) ---- */

uint64_t spe_capabilities(void) { return SPE_CAP_OVERLAPPING | SPE_CAP_CONSECUTIVE | SPE_CAP_PREARMED; }

int spe_snapshot_arm(struct spe_engine *e, uint64_t dst, uint64_t dst_size)
{
    if (!dst || dst_size < e->mem_size)
        return refuse("spe_snapshot_arm(destination missing or smaller than guest memory)");
    return sp_wp_snap_arm(e->w, dst);
}

int64_t spe_snapshot_bulk_copy(struct spe_engine *e, int id, uint64_t first_page, uint64_t npages, uint64_t batch)
{
    return sp_wp_snap_bulk_copy(e->w, id, first_page, npages, batch ? batch : SP_BULK_BATCH);
}

int spe_snapshot_finalize(struct spe_engine *e, int id, int64_t timeout_ns)
{
    wait_captures(e, id, sp_now_ns() + timeout_ns);
    return sp_wp_snap_finalize(e->w, id);
}

void spe_snapshot_get_stats(struct spe_engine *e, int id, struct spe_snapshot_stats *out)
{
    struct sp_wp_snap_stats s;
    sp_wp_snap_get_stats(e->w, id, &s);
    memset(out, 0, sizeof(*out));
    out->arm_ns = s.arm_ns;
    out->fault_pages = s.fault_pages;
    out->bulk_pages = s.bulk_pages;
    out->shared_fault_pages = s.shared_fault_pages;
    out->live = (uint32_t)s.live;
}

/* ---- a pre-armed snapshot (uffd_wp.c, sp_wp_prearm & co.) ---- */

_Static_assert(sizeof(struct spe_prearm_stats) == sizeof(struct sp_wp_prearm_stats),
               "the engine's pre-arm stats are the ABI's, field for field");

int64_t spe_prearm(struct spe_engine *e) { return sp_wp_prearm(e->w); }
int64_t spe_arm_prearmed(struct spe_engine *e) { return sp_wp_arm_prearmed(e->w); }

void spe_prearm_get_stats(struct spe_engine *e, struct spe_prearm_stats *out)
{
    struct sp_wp_prearm_stats s;
    sp_wp_prearm_get_stats(e->w, &s);
    out->prearm_ns = s.prearm_ns;
    out->recorded_pages = s.recorded_pages;
    out->reprotected_pages = s.reprotected_pages;
    out->reprotect_calls = s.reprotect_calls;
    out->arm_ns = s.arm_ns;
}

void spe_close(struct spe_engine *e)
{
    if (!e)
        return;
    sp_wp_destroy(e->w);
    free(e);
}
