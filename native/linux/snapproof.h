/*
 * snapproof native layer, Linux: the contract between C and Python.
 *
 * native/_linux_build.py feeds the lines between the CDEF markers to cffi's
 * cdef(), so this file is the one place the interface is declared. Keep that
 * part plain C declarations (no #if, no macros with arguments).
 *
 * Conventions: functions return 0 (or a count) on success and -errno on
 * failure; after a failure sp_last_op() names the system call or ioctl that
 * failed on this thread.
 */
#ifndef SNAPPROOF_H
#define SNAPPROOF_H
#include <stdint.h>
#include <stddef.h>

/* CDEF-BEGIN */
const char *sp_last_op(void);
int64_t sp_now_ns(void);
int sp_current_cpu(void);
int sp_gettid(void);
int sp_pin_current_thread(int cpu);
/* CPUID leaf/subleaf into out4[] = eax, ebx, ecx, edx (x86 only; -ENOSYS elsewhere). */
int sp_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t *out4);

/* ---- KVM ---------------------------------------------------------- */
enum sp_exit_reason {
    SP_EXIT_HLT = 1,       /* the guest executed hlt: done */
    SP_EXIT_SYNC = 2,      /* a write to the sync port (only with SP_RUN_STOP_ON_SYNC) */
    SP_EXIT_KICKED = 3,    /* sp_vcpu_kick() asked the vCPU to stop */
    SP_EXIT_TIMEOUT = 4,   /* the run's deadline passed */
    SP_EXIT_IO = 5,        /* port I/O to a port the loop does not own */
    SP_EXIT_MMIO = 6,      /* an access KVM could not back with memory */
    SP_EXIT_SHUTDOWN = 7,  /* triple fault */
    SP_EXIT_FAIL_ENTRY = 8,
    SP_EXIT_INTERNAL = 9,
    SP_EXIT_OTHER = 10,    /* any other KVM exit reason (see kvm_exit_reason) */
    SP_EXIT_ERROR = 11,    /* KVM_RUN failed (see err) */
    /* KVM_RUN failed with EFAULT: KVM found no host memory it may use for a guest access (a write
     * through a PROT_READ mapping in a slot without KVM_MEM_READONLY, on hardware KVM). Before
     * KVM_CAP_MEMORY_FAULT_INFO (6.8) that is all it says: no GPA; rip says where the guest stopped. */
    SP_EXIT_EFAULT = 12,
    /* The same with KVM_EXIT_MEMORY_FAULT (6.8+): KVM_RUN -1 (EFAULT or EHWPOISON) and the fault's
     * fault_gpa, fault_size, fault_flags from kvm_run->memory_fault; rip as for SP_EXIT_EFAULT. */
    SP_EXIT_MEMORY_FAULT = 13,
    SP_EXIT_SIGNAL = 14    /* a signal not the loop's own (SIGINT, SIGTERM...) ended KVM_RUN: the caller lets its
                              handlers run, then calls again with SP_RUN_CONTINUE to go on */
};

enum sp_run_flags {
    SP_RUN_STOP_ON_SYNC = 1,
    SP_RUN_CONTINUE = 2    /* resume the run an SP_EXIT_SIGNAL ended: counters, debug bytes and run_ns go on */
};

struct sp_exit {
    uint32_t reason;          /* enum sp_exit_reason */
    uint32_t kvm_exit_reason; /* raw kvm_run->exit_reason */
    int32_t err;              /* errno for SP_EXIT_ERROR, SP_EXIT_EFAULT, SP_EXIT_MEMORY_FAULT */
    int32_t cpu;              /* CPU the vCPU thread was on when the run ended */
    uint16_t io_port;
    uint8_t io_size;
    uint8_t io_is_out;
    uint32_t io_value;
    uint64_t mmio_gpa;
    uint32_t mmio_len;
    uint8_t mmio_is_write;
    uint8_t pad[3];
    uint64_t hw_reason;       /* fail_entry hardware reason / internal suberror */
    uint64_t sync_count;      /* sync-port writes seen during this run */
    uint32_t last_sync;       /* value of the last one */
    uint32_t debug_len;       /* bytes written to the debug buffer */
    uint64_t run_ns;          /* wall time of this run (an SP_RUN_CONTINUE call goes on counting) */
    uint64_t kvm_runs;        /* KVM_RUN ioctls issued by this run */
    uint64_t rip;             /* after a failed KVM_RUN: the guest's RIP (KVM_GET_REGS), if rip_valid */
    uint64_t fault_gpa;       /* SP_EXIT_MEMORY_FAULT: kvm_run->memory_fault.gpa (page aligned) */
    uint64_t fault_size;      /* ... .size: the fault covers [fault_gpa, fault_gpa + fault_size) */
    uint64_t fault_flags;     /* ... .flags (KVM_MEMORY_EXIT_FLAG_*) */
    uint32_t rip_valid;       /* 1 when rip was read */
    uint32_t pad2;
    /* SP_EXIT_MMIO write: kvm_run->mmio.data, the mmio_len (<= 8) bytes the guest stored. KVM has
     * already completed the instruction as an MMIO write (RIP is past the store; only a read waits
     * for its data on the next KVM_RUN), so these bytes exist nowhere else: a loader that backs the
     * GPA with memory afterwards (the hypervisor-level copy-on-write load, a KVM_MEM_READONLY slot)
     * must apply them itself, or the write is lost. */
    uint8_t mmio_data[8];
};

struct sp_vcpu;

int sp_kvm_open(void);
int sp_kvm_api_version(int kvm_fd);
int sp_kvm_check_extension(int kvm_fd, int cap);
int sp_vm_create(int kvm_fd);
int sp_vm_set_tss(int vm_fd, uint64_t addr);
int sp_vm_set_identity_map(int vm_fd, uint64_t addr);
int sp_vm_set_region(int vm_fd, uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size, uint64_t hva);
int sp_vm_get_dirty_log(int vm_fd, uint32_t slot, uint64_t *bitmap);

int sp_vcpu_create(int kvm_fd, int vm_fd, int id, struct sp_vcpu **out);
/* KVM writes its pvclock wall clock (u32 version, sec, nsec) into guest memory at gpa (MSR_KVM_WALL_CLOCK_NEW). */
int sp_vcpu_kvm_write_wall_clock(struct sp_vcpu *v, uint64_t gpa);
void sp_vcpu_destroy(struct sp_vcpu *v);
int sp_vcpu_set_real_mode(struct sp_vcpu *v, uint16_t cs, uint16_t ip, uint16_t sp);
int sp_vcpu_set_flat32(struct sp_vcpu *v, uint32_t eip, uint32_t esp, uint32_t esi);
int sp_vcpu_run(struct sp_vcpu *v, int64_t timeout_ns, uint32_t flags, struct sp_exit *out,
                uint8_t *debug_buf, uint32_t debug_cap);
int sp_vcpu_kick(struct sp_vcpu *v);
void sp_vcpu_clear_kick(struct sp_vcpu *v);
int sp_vcpu_get_regs(struct sp_vcpu *v, uint64_t *out18);

/* ---- vCPU state, one part at a time (vcpu_state.c) ---------------- */
/* A part's bytes are the kernel's struct; the ids are the part ids of the snapshot file
 * (native/image.py VcpuPart; a self-test compares). Order and layout: native/kvm.py. */
enum sp_vcpu_part {
    SP_PART_REGS = 1,         /* struct kvm_regs */
    SP_PART_SREGS = 2,        /* struct kvm_sregs */
    SP_PART_XSAVE = 3,        /* struct kvm_xsave: KVM_CAP_XSAVE2 bytes (KVM_GET_XSAVE2), else 4096 */
    SP_PART_XCRS = 4,         /* struct kvm_xcrs */
    SP_PART_MSRS = 5,         /* struct kvm_msr_entry[]: the caller names the indices; returns the count done */
    SP_PART_VCPU_EVENTS = 6,  /* struct kvm_vcpu_events */
    SP_PART_MP_STATE = 7,     /* struct kvm_mp_state */
    SP_PART_DEBUGREGS = 8,    /* struct kvm_debugregs */
    SP_PART_CPUID = 9         /* struct kvm_cpuid2 + nent struct kvm_cpuid_entry2 */
};
size_t sp_vcpu_part_size(uint32_t part);  /* the fixed size of a part; 0 for xsave, msrs, cpuid */
int sp_vcpu_get_part(struct sp_vcpu *v, uint32_t part, uint8_t *buf, size_t len);
int sp_vcpu_set_part(struct sp_vcpu *v, uint32_t part, const uint8_t *buf, size_t len);
int sp_vcpu_inject_nmi(struct sp_vcpu *v);
/* KVM_GET_MSR_INDEX_LIST: returns the count n; the indices are written when cap >= n. */
int sp_kvm_msr_index_list(int kvm_fd, uint32_t *out, uint32_t cap);
int sp_kvm_supported_cpuid(int kvm_fd, uint8_t *buf, size_t len);

/* ---- userfaultfd -------------------------------------------------- */
int sp_uffd_open(int *via_devnode);
int sp_uffd_api(int uffd, uint64_t features, uint64_t *supported, uint64_t *ioctls);
int sp_uffd_register(int uffd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls);
int sp_uffd_unregister(int uffd, uint64_t start, uint64_t len);
int sp_uffd_writeprotect(int uffd, uint64_t start, uint64_t len, int protect);
int sp_pagemap_scan_wp(uint64_t start, uint64_t npages, uint8_t *present, uint8_t *uffd_wp);

/* PAGEMAP_SCAN (kernel 6.7): regions of [start, end) whose categories match. */
struct sp_page_region { uint64_t start; uint64_t end; uint64_t categories; };
int64_t sp_pagemap_scan(uint64_t start, uint64_t end, uint64_t flags, uint64_t category_mask,
                        uint64_t return_mask, struct sp_page_region *vec, uint64_t vec_len,
                        uint64_t *walk_end);

/* ---- the WP snapshot engine --------------------------------------- */
enum sp_page_state { SP_PAGE_CLEAN = 0, SP_PAGE_COPYING = 1, SP_PAGE_CAPTURED = 2 };

enum sp_inject {
    SP_INJECT_NO_COPY_BEFORE_WRITE = 1, /* a fault un-protects without capturing the page */
    SP_INJECT_SINGLE_FLAG_RACE = 2,     /* forkd's bug: "captured" is set before the copy */
    SP_INJECT_HANDLER_DIES = 4,         /* the handler thread exits at its first fault */
    /* The lazy loader (uffd_lazy.c): at the first fault a guest raises (a thread in sp_vcpu_run), its
     * handler stops serving and closes the loader's userfaultfd, as a handler process that dies does. */
    SP_INJECT_LAZY_UFFD_CLOSES_MID_RESTORE = 8,
    /* The lazy loader fails open: it never fences missing pages (and native/restore.py never names its death). */
    SP_INJECT_LAZY_UFFD_UNGUARDED = 16,
    /* Overlapping snapshots: a fault that captures a page into one live snapshot copies it into every
     * other live one too, over the bytes an earlier snapshot already froze (one WP bit says "first write
     * since the latest arm", not since each snapshot's own). */
    SP_INJECT_OVERLAP_CAPTURE_OVERWRITES = 32,
    /* The copier un-protects its batch without waiting for a page the handler is still capturing. */
    SP_INJECT_UNPROTECT_DURING_CAPTURE = 64,
    /* The handler un-protects the faulting page, waking the writer, before its copy of the page ends. */
    SP_INJECT_WAKE_BEFORE_COPY = 128,
    /* Consecutive snapshots: a snapshot armed on an engine object that took one before keeps that round's
     * captured marks: its bulk copy and faults skip those pages, which keep whatever the destination held. */
    SP_INJECT_CONSECUTIVE_KEEPS_CAPTURED = 0x800000,
    /* Overlapping snapshots: a snapshot's bulk copier un-protects its batch whole, pages another live snapshot
     * still lacks included: writes to them land unseen by that snapshot. */
    SP_INJECT_UNPROTECT_WHAT_OTHERS_LACK = 0x8000000,
    /* A pre-armed snapshot: the arm at the instant forgets to protect again the pages written since the pre-arm,
     * so they stay writable and a write after the instant lands uncaptured, for the bulk copy to read. */
    SP_INJECT_PREARM_FORGETS_WRITTEN = 0x10000000,
    /* A pre-armed snapshot: the handler serves a fault it read before the arm as the pre-arm's (records and
     * un-protects its page, no capture) even when the arm came before it served it: the fault in flight at the
     * pause lets its write land after the instant, uncaptured. */
    SP_INJECT_PREARM_DECIDES_AT_READ = 0x20000000,
    /* Performance regressions (the snapshot stays right, only slower): the gate must catch them. The low
     * byte is full; these take the top byte (native/inject.py C_SWITCHES). */
    SP_INJECT_UNPROTECT_PER_PAGE = 0x1000000,   /* the bulk copier un-protects page by page, not a batch per ioctl */
    SP_INJECT_EXTRA_COPY_PER_FAULT = 0x2000000, /* a fault stages its page through a freshly mapped bounce page */
    SP_INJECT_ARM_PER_PAGE = 0x4000000          /* the arm protects page by page, one ioctl each */
};
/* The bits of every switch above: an engine configuration with any other bit set is refused. */
#define SP_INJECT_ALL 0xFF8000FF

/* Pages the bulk copier copies and then un-protects with one UFFDIO_WRITEPROTECT (2 MiB of 4 KiB pages). */
#define SP_BULK_BATCH 512

/* Named points (native/snapproof_engine.h, enum spe_point: the same values): the engine calls the
 * hook set by sp_wp_set_points() at each, so a test can hold one of its threads at one page. */
enum sp_point {
    SP_POINT_FAULT_CAPTURE = 1,  /* handler: page claimed for capture, not yet copied */
    SP_POINT_FAULT_WAIT = 2,     /* handler: page being copied by the copier; about to wait for it */
    SP_POINT_BULK_CAPTURE = 3,   /* copier: pages claimed, not yet copied */
    SP_POINT_BULK_WAIT = 4,      /* copier: a page of its batch mid-capture by the handler; about to wait */
    SP_POINT_BULK_UNPROTECT = 5, /* copier: about to un-protect a range */
    SP_POINT_FAULT_PREARMED = 6  /* handler: a write fault read while pre-armed, not yet served */
};
typedef void (*sp_point_fn)(void *ctx, uint32_t point, uint64_t first_page, uint64_t npages);

#define SP_HIST_BUCKETS 1024
#define SP_FAULT_LOG 64
#define SP_MAX_CPUS 64

struct sp_fault_rec {
    uint64_t offset;       /* page-aligned offset of the fault in the region */
    uint64_t flags;        /* uffd_msg.arg.pagefault.flags */
    uint64_t service_ns;   /* handler: message read -> page un-protected */
    uint32_t tid;          /* faulting thread (UFFD_FEATURE_THREAD_ID) */
    int32_t handler_cpu;
    uint32_t copied;       /* 1 if this fault captured the page */
    uint32_t pad;
};

struct sp_wp_stats {
    uint64_t arm_ns;
    uint64_t faults;            /* fault messages served */
    uint64_t fault_pages;       /* pages captured by the fault handler */
    uint64_t bulk_pages;        /* pages captured by the bulk copier */
    uint64_t waited_on_copier;  /* faults that found the page mid-copy and waited */
    uint64_t other_events;      /* non-pagefault messages */
    uint64_t service_ns_total;
    uint64_t service_ns_max;
    uint64_t hist_us[1024];     /* fault service latency, 1 us buckets; the last is overflow */
    uint64_t handler_cpu[64];   /* faults served per CPU */
    uint32_t log_len;
    int32_t handler_err;        /* errno that stopped the handler, 0 if none */
    int32_t handler_alive;
    int32_t pad;
    struct sp_fault_rec log[64];
};

struct sp_wp;

int sp_wp_create(uint64_t mem, uint64_t size, uint64_t page_size, uint64_t features, uint32_t inject,
                 uint64_t race_window_ns, int handler_cpu, struct sp_wp **out, uint64_t *supported);
int sp_wp_set_destination(struct sp_wp *w, uint64_t dst);
/* The named points' hook (NULL: none); set before the arm. */
int sp_wp_set_points(struct sp_wp *w, sp_point_fn fn, void *ctx);
int sp_wp_arm(struct sp_wp *w);
int sp_wp_rearm_range(struct sp_wp *w, uint64_t first_page, uint64_t npages);
int sp_wp_disarm(struct sp_wp *w);
int64_t sp_wp_bulk_copy(struct sp_wp *w, uint64_t first_page, uint64_t npages, uint64_t batch);
int64_t sp_wp_pages_in_state(struct sp_wp *w, int state);
int sp_wp_finalize(struct sp_wp *w, int64_t timeout_ns);
int sp_wp_release(struct sp_wp *w, int64_t timeout_ns);
void sp_wp_destroy(struct sp_wp *w);
void sp_wp_get_stats(struct sp_wp *w, struct sp_wp_stats *out);
int sp_wp_uffd(struct sp_wp *w);
/* Several snapshots of one region (the engine ABI's spe_snapshot_* calls): each has an id, its own
 * destination and page states; a fault captures into every live one lacking the page before one
 * un-protect. sp_wp_arm & co. above drive snapshot 0 alone. */
struct sp_wp_snap_stats {
    uint64_t arm_ns;
    uint64_t fault_pages;
    uint64_t bulk_pages;
    uint64_t shared_fault_pages; /* faults that captured the page into another snapshot too */
    int32_t live;
    int32_t pad;
};
int sp_wp_snap_arm(struct sp_wp *w, uint64_t dst);
int64_t sp_wp_snap_bulk_copy(struct sp_wp *w, int id, uint64_t first_page, uint64_t npages, uint64_t batch);
int64_t sp_wp_snap_pages_in_state(struct sp_wp *w, int id, int state);
int sp_wp_snap_finalize(struct sp_wp *w, int id);
int sp_wp_snap_get_stats(struct sp_wp *w, int id, struct sp_wp_snap_stats *out);
/* A pre-armed snapshot (the engine ABI's spe_prearm & co.): the region protected while the guest runs, each write
 * fault until the arm only recorded and un-protected (sp_wp_prearm again: a round, the pages recorded so far
 * protected again, the guest running); the arm, with the vCPUs paused, protects again just the pages recorded,
 * in runs of contiguous pages, and from there snapshot 0 is taken as after sp_wp_arm. */
struct sp_wp_prearm_stats {
    uint64_t prearm_ns;
    uint64_t recorded_pages;
    uint64_t reprotected_pages;
    uint64_t reprotect_calls;
    uint64_t arm_ns;
};
int64_t sp_wp_prearm(struct sp_wp *w);
int64_t sp_wp_arm_prearmed(struct sp_wp *w);
void sp_wp_prearm_get_stats(struct sp_wp *w, struct sp_wp_prearm_stats *out);

/* ---- named points held by a test (slow_points.c) ------------------ */
/* The suite's side of the engines' named points: sp_points_hook is the spe_point_fn an engine gets
 * (ctx: a struct sp_points). A test watches (point, page): the first call of that point whose pages
 * include the page marks it reached; with `hold` the calling engine thread then blocks there until
 * the test releases it, or hold_max_ns passed (then it is marked expired and goes on), or the points
 * are disabled. Every call is counted per point. */
struct sp_points;
enum sp_points_state { SP_POINTS_REACHED = 1, SP_POINTS_RELEASED = 2, SP_POINTS_EXPIRED = 4, SP_POINTS_HELD = 8 };
int sp_points_create(int64_t hold_max_ns, struct sp_points **out);
/* A watch on (point, page); returns its slot, or -ENOSPC when every slot is taken. */
int sp_points_watch(struct sp_points *p, uint32_t point, uint64_t page, int hold);
/* The slot's enum sp_points_state bits. */
int sp_points_state(struct sp_points *p, int slot);
int sp_points_release(struct sp_points *p, int slot);
/* Release every hold and ignore every call from now on: nothing blocks any more. */
void sp_points_disable(struct sp_points *p);
uint64_t sp_points_calls(struct sp_points *p, uint32_t point);
void sp_points_destroy(struct sp_points *p);
void sp_points_hook(void *ctx, uint32_t point, uint64_t first_page, uint64_t npages);

/* ---- memory helpers ------------------------------------------------ */
int sp_memcpy_timed(uint64_t dst, uint64_t src, uint64_t len, uint32_t rounds, uint64_t *best_ns);
/* memcpy `run` bytes at a time from a WP-protected `src`, un-protecting each `batch` bytes once copied: ns. */
int sp_batched_copy_unprotect_timed(int uffd, uint64_t dst, uint64_t src, uint64_t len, uint64_t batch,
                                    uint64_t run, uint64_t *ns);
/* The pages the built-in engine's bulk copier copies with one memcpy (SP_COPY_RUN). */
uint64_t sp_copy_run_pages(void);

/* ---- lazy restore: uffd MISSING faults served from a snapshot file --- */
struct sp_lazy_stats {
    uint64_t faults;            /* MISSING fault messages served */
    uint64_t fault_pages;       /* pages the handler installed (UFFDIO_COPY) */
    uint64_t fault_eexist;      /* faults whose page was installed first by someone else (woken only) */
    uint64_t prefetch_pages;    /* pages sp_lazy_prefetch_all() installed */
    uint64_t prefetch_eexist;   /* pages the prefetcher found installed already (EEXIST) */
    uint64_t other_events;      /* non-pagefault messages */
    uint64_t service_ns_total;  /* handler: message read -> page installed, stats written */
    uint64_t service_ns_max;
    uint64_t first_fault_ns;    /* sp_now_ns() when the first fault was read; 0 if none */
    uint64_t last_fault_ns;     /* the same for the latest fault */
    uint64_t hist_us[1024];     /* fault service latency, 1 us buckets; the last is overflow */
    uint64_t handler_cpu[64];   /* faults served per CPU */
    int32_t handler_err;        /* errno that stopped the handler, 0 if none */
    int32_t handler_alive;
    uint32_t end;               /* enum sp_lazy_end: why the loader stopped serving, SP_LAZY_SERVING while it serves */
    int32_t fence_err;          /* errno of a fence that failed (the pages then stay as they are), 0 if none */
    uint64_t fenced_pages;      /* pages the fence made inaccessible (PROT_NONE) */
    uint64_t fence_ns;          /* how long the fence took */
    uint32_t fenced_whole;      /* 1: the fence covered the whole region (too many runs for vm.max_map_count) */
    uint32_t pad;
};

/* Each page of a lazy loader's region. */
enum sp_lazy_page { SP_LAZY_MISSING = 0, SP_LAZY_PRESENT = 1, SP_LAZY_FENCED = 2 };

/* Why a lazy loader stopped serving. Whenever it stops with pages still missing, those pages are fenced
 * (mprotect PROT_NONE) before anyone waiting on them is woken: KVM then fails the guest's access
 * (KVM_RUN EFAULT, or an MMIO exit on an emulating KVM) instead of the kernel filling it with zeros. */
enum sp_lazy_end {
    SP_LAZY_SERVING = 0,
    SP_LAZY_HANDLER_DIED = 1,   /* the handler thread exited unasked (handler_err says why) */
    SP_LAZY_UFFD_CLOSED = 2,    /* the userfaultfd was closed under the loader (fault injection) */
    SP_LAZY_RELEASED = 3        /* sp_lazy_release() or destroy with pages still missing */
};

struct sp_lazy;

/* Register [dst, dst + size) MISSING; faults are served from src_fd's bytes at src_offset. */
int sp_lazy_create(uint64_t dst, uint64_t size, int src_fd, uint64_t src_offset, uint64_t features,
                   uint32_t inject, int handler_cpu, struct sp_lazy **out, uint64_t *supported);
int64_t sp_lazy_prefetch_all(struct sp_lazy *l, uint64_t batch);
int64_t sp_lazy_pages_present(struct sp_lazy *l);
int sp_lazy_release(struct sp_lazy *l, int64_t timeout_ns);
/* SP_LAZY_SERVING, or why the loader stopped (enum sp_lazy_end). */
uint32_t sp_lazy_end(struct sp_lazy *l);
/* How many of the pages [first, first + npages) are fenced (all of them once the whole region is). */
int64_t sp_lazy_fenced_in(struct sp_lazy *l, uint64_t first, uint64_t npages);
/* Each page's enum sp_lazy_page into out[0 .. npages) (npages at most the region's); returns how many. */
int64_t sp_lazy_page_states(struct sp_lazy *l, uint8_t *out, uint64_t npages);
void sp_lazy_destroy(struct sp_lazy *l);
void sp_lazy_get_stats(struct sp_lazy *l, struct sp_lazy_stats *out);
int sp_lazy_uffd(struct sp_lazy *l);

/* ---- dirty tracking for pre-copy (dirty_tracking.c) ---------------- */
struct sp_wpasync;

/* Register [mem, mem + size) WP with UFFD_FEATURE_WP_ASYNC in `features`: no handler, the kernel
 * resolves write faults and PAGEMAP_SCAN reports the pages written. */
int sp_wpasync_create(uint64_t mem, uint64_t size, uint64_t features, struct sp_wpasync **out,
                      uint64_t *supported);
int sp_wpasync_protect_all(struct sp_wpasync *t);
int64_t sp_wpasync_collect(struct sp_wpasync *t, uint64_t dst, uint64_t *scan_ns, uint64_t *copy_ns,
                           uint64_t *regions);
void sp_wpasync_destroy(struct sp_wpasync *t);
int64_t sp_copy_pages_bitmap(uint64_t dst, uint64_t src, const uint64_t *bitmap, uint64_t npages);
int64_t sp_first_difference(uint64_t a, uint64_t b, uint64_t len);
/* For diffs: the written pages as a bitmap (bit i of u64 word i/64 = page i), OR-ed into `bitmap`. */
int64_t sp_wpasync_collect_bitmap(struct sp_wpasync *t, uint64_t *bitmap, uint64_t *scan_ns);
/* Soft-dirty: clear every page's bit (/proc/self/clear_refs, the whole process); pagemap bits as a bitmap. */
int sp_soft_dirty_clear(void);
int64_t sp_pagemap_bitmap(uint64_t start, uint64_t npages, uint64_t mask, uint64_t *bitmap);

/* ---- incremental snapshots: a diff's pages (diff_pages.c) --------- */
/* Gather the pages `bitmap` names, lowest first, packed into dst (the k-th set page at dst + k * 4096):
 * read from fd at fd_offset + page * 4096 when fd >= 0, else copied from src + page * 4096. */
int64_t sp_gather_pages(int fd, uint64_t fd_offset, uint64_t src, const uint64_t *bitmap, uint64_t npages,
                        uint64_t dst);
/* Scatter packed pages (the k-th set page of `bitmap` at src + k * 4096) to dst + page * 4096, except pages
 * set in `done`, which every page written joins; with uffd >= 0 each page is installed with UFFDIO_COPY
 * (one already there, EEXIST, is written in place). Returns the pages written; *installed counts UFFDIO_COPYs. */
int64_t sp_scatter_pages(int uffd, uint64_t dst, uint64_t src, const uint64_t *bitmap, uint64_t npages,
                         uint64_t *done, uint64_t *installed);
/* CDEF-END */

#endif
