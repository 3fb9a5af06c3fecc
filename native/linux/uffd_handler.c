/*
 * The userfaultfd handler thread's loop and its stop, shared by the WP snapshot engine
 * (uffd_wp.c) and the lazy restore loader (uffd_lazy.c): each supplies only how it serves a
 * page fault.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

int sp_uffd_serve_loop(int uffd, int stop_fd, sp_uffd_serve_fn serve, void *ctx, uint64_t *other_events)
{
    struct pollfd fds[2] = {{.fd = uffd, .events = POLLIN}, {.fd = stop_fd, .events = POLLIN}};
    for (;;) {
        /* No time-out: sp_uffd_stop_thread() wakes us through stop_fd. */
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (fds[1].revents & POLLIN)
            return 0;
        if (fds[0].revents & (POLLERR | POLLHUP | POLLNVAL))
            return EPIPE;
        struct uffd_msg msgs[16];
        ssize_t n = read(uffd, msgs, sizeof(msgs));
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            return errno;
        }
        for (ssize_t i = 0; i < n / (ssize_t)sizeof(msgs[0]); i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT) {
                (*other_events)++;
                continue;
            }
            if (serve(ctx, &msgs[i]) < 0)
                return errno ? errno : EIO;
        }
    }
}

int sp_uffd_stop_thread(pthread_t thread, int stop_fd, int64_t timeout_ns)
{
    uint64_t one = 1;
    if (write(stop_fd, &one, sizeof(one)) != sizeof(one))
        return sp_fail("write(stop eventfd)");
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t end = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec + timeout_ns;
    ts.tv_sec = end / 1000000000LL;
    ts.tv_nsec = end % 1000000000LL;
    int r = pthread_timedjoin_np(thread, NULL, &ts);
    if (r != 0) {
        errno = r;
        return sp_fail("pthread_timedjoin_np(uffd handler)");
    }
    return 0;
}
