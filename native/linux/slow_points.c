/*
 * The suite's side of an engine's named points (native/snapproof_engine.h, enum spe_point): a test
 * watches one point at one page and, to line a race up, holds the engine thread that reaches it
 * there until it has done its part (a write, a bulk copy). Waiting here in C, on the engine's own
 * thread, needs no Python on that thread: the hook runs inside the fault handler and the copier.
 *
 * Every hold is bounded (hold_max_ns), so a test that forgets one, or dies, never leaves an engine
 * blocked: the thread goes on and the slot says it expired.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

#include "internal.h"

#define SP_POINTS_SLOTS 16
#define SP_POINTS_KINDS 8 /* enum spe_point values are 1..6; room for more */

struct sp_points_slot {
    int used;
    int hold;
    uint32_t point;
    uint64_t page;
    int state; /* enum sp_points_state */
};

struct sp_points {
    pthread_mutex_t mu;
    pthread_cond_t cv; /* CLOCK_MONOTONIC */
    int64_t hold_max_ns;
    int disabled;
    uint64_t calls[SP_POINTS_KINDS];
    struct sp_points_slot slot[SP_POINTS_SLOTS];
};

int sp_points_create(int64_t hold_max_ns, struct sp_points **out)
{
    *out = NULL;
    struct sp_points *p = calloc(1, sizeof(*p));
    if (!p) {
        errno = ENOMEM;
        return sp_fail("calloc(points)");
    }
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&p->cv, &attr);
    pthread_condattr_destroy(&attr);
    pthread_mutex_init(&p->mu, NULL);
    p->hold_max_ns = hold_max_ns;
    *out = p;
    return 0;
}

int sp_points_watch(struct sp_points *p, uint32_t point, uint64_t page, int hold)
{
    pthread_mutex_lock(&p->mu);
    int found = -1;
    for (int i = 0; i < SP_POINTS_SLOTS; i++)
        if (!p->slot[i].used) {
            p->slot[i] = (struct sp_points_slot){.used = 1, .hold = hold, .point = point, .page = page};
            found = i;
            break;
        }
    pthread_mutex_unlock(&p->mu);
    if (found < 0) {
        errno = ENOSPC;
        return sp_fail("sp_points_watch(every slot taken)");
    }
    return found;
}

int sp_points_state(struct sp_points *p, int slot)
{
    if (slot < 0 || slot >= SP_POINTS_SLOTS)
        return -EINVAL;
    pthread_mutex_lock(&p->mu);
    int s = p->slot[slot].state;
    pthread_mutex_unlock(&p->mu);
    return s;
}

int sp_points_release(struct sp_points *p, int slot)
{
    if (slot < 0 || slot >= SP_POINTS_SLOTS)
        return -EINVAL;
    pthread_mutex_lock(&p->mu);
    p->slot[slot].state |= SP_POINTS_RELEASED;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    return 0;
}

void sp_points_disable(struct sp_points *p)
{
    pthread_mutex_lock(&p->mu);
    p->disabled = 1;
    for (int i = 0; i < SP_POINTS_SLOTS; i++)
        p->slot[i].state |= SP_POINTS_RELEASED;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

uint64_t sp_points_calls(struct sp_points *p, uint32_t point)
{
    pthread_mutex_lock(&p->mu);
    uint64_t n = point < SP_POINTS_KINDS ? p->calls[point] : 0;
    pthread_mutex_unlock(&p->mu);
    return n;
}

/* Only after sp_points_disable() and once no engine can call the hook any more (engines closed). */
void sp_points_destroy(struct sp_points *p)
{
    if (!p)
        return;
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

void sp_points_hook(void *ctx, uint32_t point, uint64_t first_page, uint64_t npages)
{
    struct sp_points *p = ctx;
    pthread_mutex_lock(&p->mu);
    if (point < SP_POINTS_KINDS)
        p->calls[point]++;
    struct sp_points_slot *held = NULL;
    for (int i = 0; i < SP_POINTS_SLOTS && !p->disabled; i++) {
        struct sp_points_slot *s = &p->slot[i];
        if (!s->used || s->point != point || (s->state & SP_POINTS_REACHED) || s->page < first_page ||
            s->page - first_page >= npages)
            continue;
        s->state |= SP_POINTS_REACHED;
        if (s->hold && !held)
            held = s;
    }
    pthread_cond_broadcast(&p->cv);
    if (held) {
        held->state |= SP_POINTS_HELD;
        struct timespec end;
        clock_gettime(CLOCK_MONOTONIC, &end);
        int64_t ns = (int64_t)end.tv_nsec + p->hold_max_ns;
        end.tv_sec += (time_t)(ns / 1000000000LL);
        end.tv_nsec = (long)(ns % 1000000000LL);
        while (!(held->state & SP_POINTS_RELEASED)) {
            if (pthread_cond_timedwait(&p->cv, &p->mu, &end) == ETIMEDOUT) {
                held->state |= SP_POINTS_EXPIRED;
                break;
            }
        }
        held->state &= ~SP_POINTS_HELD;
    }
    pthread_mutex_unlock(&p->mu);
}
