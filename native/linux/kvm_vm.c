/*
 * KVM VM, vCPUs and the vCPU run loop.
 *
 * The run loop lives in C so that a guest that floods the host with port I/O
 * never waits for Python, and so a deadline can stop KVM_RUN: a per-call
 * POSIX timer sends SP_KICK_SIGNAL to the vCPU thread, whose handler sets
 * kvm_run->immediate_exit; KVM_RUN then returns EINTR. sp_vcpu_kick() uses
 * the same path from another thread (the pause of a live snapshot).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <linux/kvm_para.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define SP_KICK_SIGNAL (SIGRTMIN + 4)

/* KVM_EXIT_MEMORY_FAULT and its kvm_run->memory_fault arrived in 6.8 (KVM_CAP_MEMORY_FAULT_INFO);
 * the 6.1 system headers lack them. The layout is the kernel's include/uapi/linux/kvm.h: three u64
 * at the start of the kvm_run exit union, like every other member of it. */
#ifndef KVM_EXIT_MEMORY_FAULT
#define KVM_EXIT_MEMORY_FAULT 39
#endif
struct sp_kvm_memory_fault {
    uint64_t flags; /* KVM_MEMORY_EXIT_FLAG_PRIVATE (1 << 3), nothing else so far */
    uint64_t gpa;
    uint64_t size;
};
#ifdef KVM_CAP_MEMORY_FAULT_INFO /* headers that have it: the layout above must be theirs */
_Static_assert(offsetof(struct kvm_run, memory_fault) == offsetof(struct kvm_run, hw),
               "kvm_run->memory_fault is not at the start of the exit union");
_Static_assert(sizeof(((struct kvm_run *)0)->memory_fault) == sizeof(struct sp_kvm_memory_fault),
               "kvm_run->memory_fault is not three u64");
#endif
#define SP_DEBUG_PORT 0xE9
#define SP_SYNC_PORT 0x500

/* Read by the kick handler, in a signal. In a dlopen()ed module the first access in a thread goes
 * through __tls_get_addr(), which may allocate: sp_vcpu_run() writes it before any signal can target
 * the thread (deadline timer armed after, tid published after), so the handler's read never allocates. */
static __thread struct kvm_run *tls_run;
/* Set by the kick handler: an EINTR after it is the loop's own (a kick or the deadline), any other
 * EINTR is a signal someone else handles (Python's SIGINT/SIGTERM handler only sets a flag there). */
static __thread volatile sig_atomic_t tls_own_signal;

struct sp_vcpu {
    int fd;
    int id;
    struct kvm_run *run;
    size_t run_size;
    volatile pid_t tid;  /* the thread inside sp_vcpu_run, 0 when none */
    volatile int kick;   /* sticky until a run consumes it */
};

/* The threads inside sp_vcpu_run, process-wide, so a uffd handler can tell a guest's fault (raised by
 * KVM on a vCPU thread in KVM_RUN) from a host thread's by the faulting thread's id (UFFD_FEATURE_THREAD_ID).
 * The lazy loader's fault injection dies at a guest's fault (uffd_lazy.c). More vCPU threads than slots
 * just go unlisted: nothing but that injection asks. */
#define SP_RUN_SLOTS 64
static pid_t running_tids[SP_RUN_SLOTS];

static void run_tid_enter(pid_t tid)
{
    for (int i = 0; i < SP_RUN_SLOTS; i++) {
        pid_t none = 0;
        if (__atomic_compare_exchange_n(&running_tids[i], &none, tid, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            return;
    }
}

static void run_tid_leave(pid_t tid)
{
    for (int i = 0; i < SP_RUN_SLOTS; i++) {
        pid_t mine = tid;
        if (__atomic_compare_exchange_n(&running_tids[i], &mine, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            return;
    }
}

int sp_tid_in_vcpu_run(pid_t tid)
{
    for (int i = 0; i < SP_RUN_SLOTS; i++)
        if (tid && __atomic_load_n(&running_tids[i], __ATOMIC_ACQUIRE) == tid)
            return 1;
    return 0;
}

static void kick_handler(int sig)
{
    (void)sig;
    /* Only async-signal-safe work: KVM_RUN checks this on (re)entry. */
    if (tls_run)
        tls_run->immediate_exit = 1;
    tls_own_signal = 1;
}

static pthread_once_t kick_once = PTHREAD_ONCE_INIT;
static int kick_install_err;

static void install_kick_handler(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kick_handler;
    sigemptyset(&sa.sa_mask);
    /* No SA_RESTART: KVM_RUN must come back with EINTR. */
    if (sigaction(SP_KICK_SIGNAL, &sa, NULL) < 0)
        kick_install_err = errno;
}

int sp_kvm_open(void)
{
    int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    return fd < 0 ? sp_fail("open(/dev/kvm)") : fd;
}

int sp_kvm_api_version(int kvm_fd)
{
    int r = ioctl(kvm_fd, KVM_GET_API_VERSION, 0);
    return r < 0 ? sp_fail("KVM_GET_API_VERSION") : r;
}

int sp_kvm_check_extension(int kvm_fd, int cap)
{
    int r = ioctl(kvm_fd, KVM_CHECK_EXTENSION, cap);
    return r < 0 ? sp_fail("KVM_CHECK_EXTENSION") : r;
}

int sp_vm_create(int kvm_fd)
{
    int r = ioctl(kvm_fd, KVM_CREATE_VM, 0);
    return r < 0 ? sp_fail("KVM_CREATE_VM") : r;
}

int sp_vm_set_tss(int vm_fd, uint64_t addr)
{
    return ioctl(vm_fd, KVM_SET_TSS_ADDR, (unsigned long)addr) < 0 ? sp_fail("KVM_SET_TSS_ADDR") : 0;
}

int sp_vm_set_identity_map(int vm_fd, uint64_t addr)
{
    /* The argument is a pointer to the address, unlike KVM_SET_TSS_ADDR's. Only before any vCPU exists. */
    __u64 ident = addr;
    return ioctl(vm_fd, KVM_SET_IDENTITY_MAP_ADDR, &ident) < 0 ? sp_fail("KVM_SET_IDENTITY_MAP_ADDR") : 0;
}

int sp_vm_set_region(int vm_fd, uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size, uint64_t hva)
{
    struct kvm_userspace_memory_region r = {
        .slot = slot, .flags = flags, .guest_phys_addr = gpa, .memory_size = size, .userspace_addr = hva,
    };
    return ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r) < 0 ? sp_fail("KVM_SET_USER_MEMORY_REGION") : 0;
}

int sp_vm_get_dirty_log(int vm_fd, uint32_t slot, uint64_t *bitmap)
{
    struct kvm_dirty_log log;
    memset(&log, 0, sizeof(log));
    log.slot = slot;
    log.dirty_bitmap = bitmap;
    return ioctl(vm_fd, KVM_GET_DIRTY_LOG, &log) < 0 ? sp_fail("KVM_GET_DIRTY_LOG") : 0;
}

int sp_vcpu_kvm_write_wall_clock(struct sp_vcpu *v, uint64_t gpa)
{
    /* MSR_KVM_WALL_CLOCK_NEW: KVM writes the 12-byte pvclock wall clock at gpa itself, through the VM's
     * memslots (marking the page in a dirty log like a guest write): KVM's own translation of a GPA. */
    struct {
        struct kvm_msrs head;
        struct kvm_msr_entry entry;
    } msrs;
    memset(&msrs, 0, sizeof(msrs));
    msrs.head.nmsrs = 1;
    msrs.entry.index = MSR_KVM_WALL_CLOCK_NEW;
    msrs.entry.data = gpa;
    int r = ioctl(v->fd, KVM_SET_MSRS, &msrs);
    if (r < 0)
        return sp_fail("KVM_SET_MSRS(MSR_KVM_WALL_CLOCK_NEW)");
    if (r != 1) {
        errno = EINVAL; /* KVM refused the MSR: it returns how many it set */
        return sp_fail("KVM_SET_MSRS(MSR_KVM_WALL_CLOCK_NEW)");
    }
    return 0;
}

int sp_vcpu_create(int kvm_fd, int vm_fd, int id, struct sp_vcpu **out)
{
    pthread_once(&kick_once, install_kick_handler);
    if (kick_install_err) {
        errno = kick_install_err;
        return sp_fail("sigaction(kick signal)");
    }
    int mmap_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (mmap_size < 0)
        return sp_fail("KVM_GET_VCPU_MMAP_SIZE");
    int fd = ioctl(vm_fd, KVM_CREATE_VCPU, id);
    if (fd < 0)
        return sp_fail("KVM_CREATE_VCPU");
    void *run = mmap(NULL, (size_t)mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (run == MAP_FAILED) {
        int r = sp_fail("mmap(kvm_run)");
        close(fd);
        return r;
    }
    struct sp_vcpu *v = calloc(1, sizeof(*v));
    if (!v) {
        munmap(run, (size_t)mmap_size);
        close(fd);
        errno = ENOMEM;
        return sp_fail("calloc");
    }
    v->fd = fd;
    v->id = id;
    v->run = run;
    v->run_size = (size_t)mmap_size;
    *out = v;
    return 0;
}

void sp_vcpu_destroy(struct sp_vcpu *v)
{
    if (!v)
        return;
    munmap(v->run, v->run_size);
    close(v->fd);
    free(v);
}

static void flat_segment(struct kvm_segment *s, uint16_t selector, uint8_t type)
{
    memset(s, 0, sizeof(*s));
    s->base = 0;
    s->limit = 0xffffffff;
    s->selector = selector;
    s->type = type;
    s->present = 1;
    s->dpl = 0;
    s->db = 1; /* 32-bit operands and stack */
    s->s = 1;  /* code/data, not system */
    s->g = 1;  /* limit in 4 KiB units */
}

int sp_vcpu_set_real_mode(struct sp_vcpu *v, uint16_t cs, uint16_t ip, uint16_t sp)
{
    struct kvm_sregs sregs;
    if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
        return sp_fail("KVM_GET_SREGS");
    sregs.cs.selector = cs;
    sregs.cs.base = (uint64_t)cs << 4;
    if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0)
        return sp_fail("KVM_SET_SREGS");
    struct kvm_regs regs;
    memset(&regs, 0, sizeof(regs));
    regs.rip = ip;
    regs.rsp = sp;
    regs.rflags = 0x2; /* bit 1 is reserved and reads as one */
    if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
        return sp_fail("KVM_SET_REGS");
    return 0;
}

int sp_vcpu_set_flat32(struct sp_vcpu *v, uint32_t eip, uint32_t esp, uint32_t esi)
{
    struct kvm_sregs sregs;
    if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
        return sp_fail("KVM_GET_SREGS");
    /* Segment caches set directly: the guest never loads a selector, so no GDT is needed. */
    flat_segment(&sregs.cs, 0x08, 0xb); /* execute/read, accessed */
    flat_segment(&sregs.ds, 0x10, 0x3); /* read/write, accessed */
    sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
    sregs.cr0 |= 1; /* PE */
    if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0)
        return sp_fail("KVM_SET_SREGS");
    struct kvm_regs regs;
    memset(&regs, 0, sizeof(regs));
    regs.rip = eip;
    regs.rsp = esp;
    regs.rsi = esi;
    regs.rflags = 0x2;
    if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
        return sp_fail("KVM_SET_REGS");
    return 0;
}

static int arm_deadline(timer_t *timer, int64_t timeout_ns)
{
    struct sigevent sev;
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SP_KICK_SIGNAL;
    sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
    if (timer_create(CLOCK_MONOTONIC, &sev, timer) < 0)
        return sp_fail("timer_create");
    struct itimerspec its;
    memset(&its, 0, sizeof(its));
    its.it_value.tv_sec = timeout_ns / 1000000000LL;
    its.it_value.tv_nsec = timeout_ns % 1000000000LL;
    /* Re-fire every 10 ms: a signal that lands just before KVM_RUN is entered
     * is caught by immediate_exit, but one that lands while the loop handles
     * an exit in user space must not be the only chance. */
    its.it_interval.tv_nsec = 10000000;
    if (timer_settime(*timer, 0, &its, NULL) < 0) {
        int r = sp_fail("timer_settime");
        timer_delete(*timer);
        return r;
    }
    return 0;
}

static void finish(struct sp_vcpu *v, struct sp_exit *out, uint32_t reason, int64_t t0)
{
    out->reason = reason;
    out->kvm_exit_reason = v->run->exit_reason;
    out->cpu = sched_getcpu();
    out->run_ns += (uint64_t)(sp_now_ns() - t0);
}

/* KVM_RUN returned -1 with `err` (not EINTR/EAGAIN): which failure it is, what KVM said about it,
 * and where the guest stopped. A guest access KVM cannot back with host memory (on hardware KVM, a
 * write through a PROT_READ mapping) fails KVM_RUN with EFAULT before the instruction retires, so
 * RIP is still on it; from 6.8 kvm_run->memory_fault adds the GPA, else the GPA is unknown. */
static uint32_t failed_run(struct sp_vcpu *v, struct sp_exit *out, int err)
{
    struct kvm_run *run = v->run;
    uint32_t reason = SP_EXIT_ERROR;
    out->err = err;
    if ((err == EFAULT || err == EHWPOISON) && run->exit_reason == KVM_EXIT_MEMORY_FAULT) {
        struct sp_kvm_memory_fault mf;
        memcpy(&mf, &run->hw, sizeof(mf)); /* hw is the exit union's first member: its start */
        out->fault_flags = mf.flags;
        out->fault_gpa = mf.gpa;
        out->fault_size = mf.size;
        reason = SP_EXIT_MEMORY_FAULT;
    } else if (err == EFAULT) {
        reason = SP_EXIT_EFAULT;
    }
    struct kvm_regs regs;
    if (ioctl(v->fd, KVM_GET_REGS, &regs) == 0) {
        out->rip = regs.rip;
        out->rip_valid = 1;
    }
    sp_set_last_op("KVM_RUN");
    return reason;
}

int sp_vcpu_run(struct sp_vcpu *v, int64_t timeout_ns, uint32_t flags, struct sp_exit *out,
                uint8_t *debug_buf, uint32_t debug_cap)
{
    if (!(flags & SP_RUN_CONTINUE))
        memset(out, 0, sizeof(*out));
    if (timeout_ns <= 0) {
        errno = EINVAL;
        return sp_fail("sp_vcpu_run(timeout_ns <= 0)");
    }
    int64_t t0 = sp_now_ns();
    int64_t deadline = t0 + timeout_ns;
    struct kvm_run *run = v->run;
    tls_run = run; /* first: this thread's TLS slot exists before its first signal */
    tls_own_signal = 0;
    timer_t timer;
    int r = arm_deadline(&timer, timeout_ns);
    if (r < 0) {
        tls_run = NULL;
        return r;
    }
    v->tid = (pid_t)syscall(SYS_gettid);
    run_tid_enter(v->tid);
    uint32_t reason = 0;
    int io_pending = 0; /* a port write we handled is completed only by the next KVM_RUN */

    for (;;) {
        if (__atomic_load_n(&v->kick, __ATOMIC_ACQUIRE)) {
            __atomic_store_n(&v->kick, 0, __ATOMIC_RELEASE);
            reason = SP_EXIT_KICKED;
            break;
        }
        if (sp_now_ns() >= deadline) {
            reason = SP_EXIT_TIMEOUT;
            break;
        }
        out->kvm_runs++;
        /* KVM writes exit_reason only when it has one to give: a KVM_RUN failing with EFAULT on a
         * kernel before 6.8 leaves the previous value, which must not pass for a memory-fault exit. */
        run->exit_reason = KVM_EXIT_UNKNOWN;
        int rc = ioctl(v->fd, KVM_RUN, 0);
        io_pending = 0; /* any entry, even one that ends in EINTR, completes pending I/O first */
        if (rc < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                run->immediate_exit = 0;
                /* Someone else's signal: return, so the interpreter that called us runs its handler now
                 * (a KeyboardInterrupt for SIGINT/SIGTERM) instead of at this run's deadline, which
                 * can be a minute away. The caller resumes the run with SP_RUN_CONTINUE otherwise.
                 * One landing while this loop handles an exit in user space leaves no trace here: the
                 * interpreter sees it when the call returns for another reason (at worst its deadline). */
                if (errno == EINTR && !tls_own_signal && !__atomic_load_n(&v->kick, __ATOMIC_ACQUIRE) &&
                    sp_now_ns() < deadline) {
                    reason = SP_EXIT_SIGNAL;
                    break;
                }
                tls_own_signal = 0;
                continue; /* the top of the loop says why */
            }
            reason = failed_run(v, out, errno);
            break;
        }
        switch (run->exit_reason) {
        case KVM_EXIT_HLT:
            reason = SP_EXIT_HLT;
            break;
        case KVM_EXIT_INTR:
            run->immediate_exit = 0;
            continue;
        case KVM_EXIT_IO: {
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            uint32_t value = 0;
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                memcpy(&value, data, run->io.size <= 4 ? run->io.size : 4);
            }
            out->io_port = run->io.port;
            out->io_size = run->io.size;
            out->io_is_out = run->io.direction == KVM_EXIT_IO_OUT;
            out->io_value = value;
            if (out->io_is_out && (run->io.port == SP_DEBUG_PORT || run->io.port == SP_SYNC_PORT))
                io_pending = 1;
            if (out->io_is_out && run->io.port == SP_DEBUG_PORT && run->io.count == 1) {
                if (debug_buf && out->debug_len < debug_cap)
                    debug_buf[out->debug_len++] = (uint8_t)value;
                continue;
            }
            if (out->io_is_out && run->io.port == SP_SYNC_PORT && run->io.count == 1) {
                out->sync_count++;
                out->last_sync = value;
                if (flags & SP_RUN_STOP_ON_SYNC) {
                    reason = SP_EXIT_SYNC;
                    break;
                }
                continue;
            }
            reason = SP_EXIT_IO;
            break;
        }
        case KVM_EXIT_MMIO:
            out->mmio_gpa = run->mmio.phys_addr;
            out->mmio_len = run->mmio.len;
            out->mmio_is_write = run->mmio.is_write;
            if (run->mmio.is_write) /* the stored bytes: see struct sp_exit.mmio_data */
                memcpy(out->mmio_data, run->mmio.data,
                       run->mmio.len < sizeof(out->mmio_data) ? run->mmio.len : sizeof(out->mmio_data));
            reason = SP_EXIT_MMIO;
            break;
        case KVM_EXIT_SHUTDOWN:
            reason = SP_EXIT_SHUTDOWN;
            break;
        case KVM_EXIT_FAIL_ENTRY:
            out->hw_reason = run->fail_entry.hardware_entry_failure_reason;
            reason = SP_EXIT_FAIL_ENTRY;
            break;
        case KVM_EXIT_INTERNAL_ERROR:
            out->hw_reason = run->internal.suberror;
            reason = SP_EXIT_INTERNAL;
            break;
        default:
            reason = SP_EXIT_OTHER;
            break;
        }
        if (reason)
            break;
    }
    if (io_pending) {
        /* KVM's API: re-enter with immediate_exit set so the port write completes (RIP moves past
         * the `out`) before anyone saves this vCPU's state; otherwise a restore repeats it. */
        run->immediate_exit = 1;
        out->kvm_runs++;
        if (ioctl(v->fd, KVM_RUN, 0) == 0 || errno != EINTR) {
            out->err = errno;
            sp_set_last_op("KVM_RUN(complete pending I/O)");
        }
    }
    run_tid_leave(v->tid);
    v->tid = 0;
    tls_run = NULL;
    timer_delete(timer);
    run->immediate_exit = 0;
    finish(v, out, reason, t0);
    return 0;
}

int sp_vcpu_kick(struct sp_vcpu *v)
{
    __atomic_store_n(&v->kick, 1, __ATOMIC_RELEASE);
    /* Set before signalling: a vCPU between exits re-enters KVM_RUN and leaves at once. */
    v->run->immediate_exit = 1;
    pid_t tid = v->tid;
    if (tid && syscall(SYS_tgkill, getpid(), tid, SP_KICK_SIGNAL) < 0 && errno != ESRCH)
        return sp_fail("tgkill");
    return 0;
}

void sp_vcpu_clear_kick(struct sp_vcpu *v)
{
    __atomic_store_n(&v->kick, 0, __ATOMIC_RELEASE);
    v->run->immediate_exit = 0;
}

/* Order: rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags (struct kvm_regs). */
int sp_vcpu_get_regs(struct sp_vcpu *v, uint64_t *out18)
{
    struct kvm_regs regs;
    if (ioctl(v->fd, KVM_GET_REGS, &regs) < 0)
        return sp_fail("KVM_GET_REGS");
    memcpy(out18, &regs, sizeof(regs));
    return 0;
}

/* For vcpu_state.c, which moves the vCPU's state part by part (internal.h). */
int sp_vcpu_fd(const struct sp_vcpu *v)
{
    return v->fd;
}
