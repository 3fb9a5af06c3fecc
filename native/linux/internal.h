/* Helpers shared by the Linux C files; not part of the cffi contract. */
#ifndef SNAPPROOF_INTERNAL_H
#define SNAPPROOF_INTERNAL_H
#include "snapproof.h"

/* Record `op` as this thread's failing operation and return -errno. */
int sp_fail(const char *op);
void sp_set_last_op(const char *op);
/* The vCPU's KVM fd (kvm_vm.c), for vcpu_state.c. */
int sp_vcpu_fd(const struct sp_vcpu *v);
/* 1 while thread `tid` is inside sp_vcpu_run (kvm_vm.c): a fault it raises is a guest's. */
#include <sys/types.h>
int sp_tid_in_vcpu_run(pid_t tid);

#include <linux/userfaultfd.h>
#include <pthread.h>

/* Serve one page-fault message; < 0 (errno set) stops the handler. */
typedef int (*sp_uffd_serve_fn)(void *ctx, const struct uffd_msg *msg);
/* The handler thread's loop: serve page faults until stop_fd is signalled (returns 0) or an error
 * (returns its errno). Other events are counted, not served. */
int sp_uffd_serve_loop(int uffd, int stop_fd, sp_uffd_serve_fn serve, void *ctx, uint64_t *other_events);
/* Signal stop_fd and join the handler thread within timeout_ns (-errno, sp_last_op set, on failure). */
int sp_uffd_stop_thread(pthread_t thread, int stop_fd, int64_t timeout_ns);
#endif
