/*
 * A vCPU's x86 state, part by part: the KVM_GET_* / KVM_SET_* pair of each part.
 *
 * Which parts a snapshot holds, the order they are saved and restored in and the
 * file layout belong to native/kvm.py and native/image.py; this file only moves
 * one part between KVM and a caller's buffer, checking the buffer's size first.
 * A part's bytes are the kernel's own struct (x86_64 UAPI, stable), so the
 * sizes are pinned below and again in native/image.py (a self-test compares).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/kvm.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "internal.h"

/* The file format pins these (native/image.py KVM_X86_PART_SIZES): a kernel whose UAPI differed could not
 * read a snapshot written here, so a mismatch must stop the build, not a restore. */
_Static_assert(sizeof(struct kvm_regs) == 144, "struct kvm_regs");
_Static_assert(sizeof(struct kvm_sregs) == 312, "struct kvm_sregs");
_Static_assert(sizeof(struct kvm_xsave) == 4096, "struct kvm_xsave (without KVM_CAP_XSAVE2's extra bytes)");
_Static_assert(sizeof(struct kvm_xcrs) == 392, "struct kvm_xcrs");
_Static_assert(sizeof(struct kvm_msr_entry) == 16, "struct kvm_msr_entry");
_Static_assert(sizeof(struct kvm_msrs) == 8, "struct kvm_msrs header");
_Static_assert(sizeof(struct kvm_vcpu_events) == 64, "struct kvm_vcpu_events");
_Static_assert(sizeof(struct kvm_mp_state) == 4, "struct kvm_mp_state");
_Static_assert(sizeof(struct kvm_debugregs) == 128, "struct kvm_debugregs");
_Static_assert(sizeof(struct kvm_cpuid2) == 8, "struct kvm_cpuid2 header");
_Static_assert(sizeof(struct kvm_cpuid_entry2) == 40, "struct kvm_cpuid_entry2");

/* KVM_GET_MSRS / KVM_SET_MSRS take at most this many entries a call (KVM_MAX_MSR_ENTRIES). */
#define SP_MAX_MSRS_PER_CALL 255

size_t sp_vcpu_part_size(uint32_t part)
{
    switch (part) {
    case SP_PART_REGS: return sizeof(struct kvm_regs);
    case SP_PART_SREGS: return sizeof(struct kvm_sregs);
    case SP_PART_XCRS: return sizeof(struct kvm_xcrs);
    case SP_PART_VCPU_EVENTS: return sizeof(struct kvm_vcpu_events);
    case SP_PART_MP_STATE: return sizeof(struct kvm_mp_state);
    case SP_PART_DEBUGREGS: return sizeof(struct kvm_debugregs);
    default: return 0; /* XSAVE, MSRS and CPUID are sized by the host or by the caller */
    }
}

static int bad_len(const char *op)
{
    errno = EINVAL;
    return sp_fail(op);
}

/* KVM_GET_MSRS or KVM_SET_MSRS over entries[n], SP_MAX_MSRS_PER_CALL a call. Returns how many were
 * done before the first MSR KVM refused (n when none was): KVM's own count, summed over the calls. */
static int msrs_ioctl(int fd, unsigned long req, const char *op, struct kvm_msr_entry *entries, size_t n)
{
    size_t done = 0;
    struct kvm_msrs *msrs = malloc(sizeof(*msrs) + SP_MAX_MSRS_PER_CALL * sizeof(struct kvm_msr_entry));
    if (!msrs) {
        errno = ENOMEM;
        return sp_fail("malloc(kvm_msrs)");
    }
    while (done < n) {
        size_t chunk = n - done < SP_MAX_MSRS_PER_CALL ? n - done : SP_MAX_MSRS_PER_CALL;
        memset(msrs, 0, sizeof(*msrs));
        msrs->nmsrs = (uint32_t)chunk;
        memcpy(msrs->entries, entries + done, chunk * sizeof(*entries));
        int r = ioctl(fd, req, msrs);
        if (r < 0) {
            r = sp_fail(op);
            free(msrs);
            return r;
        }
        memcpy(entries + done, msrs->entries, chunk * sizeof(*entries));
        done += (size_t)r;
        if ((size_t)r < chunk)
            break; /* entry `done` is the one KVM refused */
    }
    free(msrs);
    return (int)done;
}

int sp_vcpu_get_part(struct sp_vcpu *v, uint32_t part, uint8_t *buf, size_t len)
{
    int fd = sp_vcpu_fd(v);
    size_t fixed = sp_vcpu_part_size(part);
    if (fixed && len != fixed)
        return bad_len("sp_vcpu_get_part(len is not the part's struct size)");
    switch (part) {
    case SP_PART_REGS:
        return ioctl(fd, KVM_GET_REGS, buf) < 0 ? sp_fail("KVM_GET_REGS") : (int)len;
    case SP_PART_SREGS:
        return ioctl(fd, KVM_GET_SREGS, buf) < 0 ? sp_fail("KVM_GET_SREGS") : (int)len;
    case SP_PART_XCRS:
        return ioctl(fd, KVM_GET_XCRS, buf) < 0 ? sp_fail("KVM_GET_XCRS") : (int)len;
    case SP_PART_VCPU_EVENTS:
        return ioctl(fd, KVM_GET_VCPU_EVENTS, buf) < 0 ? sp_fail("KVM_GET_VCPU_EVENTS") : (int)len;
    case SP_PART_MP_STATE:
        return ioctl(fd, KVM_GET_MP_STATE, buf) < 0 ? sp_fail("KVM_GET_MP_STATE") : (int)len;
    case SP_PART_DEBUGREGS:
        return ioctl(fd, KVM_GET_DEBUGREGS, buf) < 0 ? sp_fail("KVM_GET_DEBUGREGS") : (int)len;
    case SP_PART_XSAVE:
        /* len is KVM_CAP_XSAVE2's size when KVM has it (>= 4096, what KVM_GET_XSAVE2 writes), else 4096. */
        if (len < sizeof(struct kvm_xsave) || len % 4)
            return bad_len("sp_vcpu_get_part(xsave len below 4096 or not whole words)");
        if (len > sizeof(struct kvm_xsave))
            return ioctl(fd, KVM_GET_XSAVE2, buf) < 0 ? sp_fail("KVM_GET_XSAVE2") : (int)len;
        return ioctl(fd, KVM_GET_XSAVE, buf) < 0 ? sp_fail("KVM_GET_XSAVE") : (int)len;
    case SP_PART_MSRS:
        /* buf: kvm_msr_entry[len / 16] with the indices filled in; returns how many KVM read. */
        if (len % sizeof(struct kvm_msr_entry))
            return bad_len("sp_vcpu_get_part(msrs len not whole kvm_msr_entry)");
        return msrs_ioctl(fd, KVM_GET_MSRS, "KVM_GET_MSRS", (struct kvm_msr_entry *)buf,
                          len / sizeof(struct kvm_msr_entry));
    case SP_PART_CPUID: {
        /* buf: room for a kvm_cpuid2 and (len - 8) / 40 entries; returns the bytes KVM filled. */
        if (len < sizeof(struct kvm_cpuid2) || (len - sizeof(struct kvm_cpuid2)) % sizeof(struct kvm_cpuid_entry2))
            return bad_len("sp_vcpu_get_part(cpuid len not a kvm_cpuid2 with whole entries)");
        struct kvm_cpuid2 *c = (struct kvm_cpuid2 *)buf;
        c->nent = (uint32_t)((len - sizeof(*c)) / sizeof(struct kvm_cpuid_entry2));
        c->padding = 0;
        if (ioctl(fd, KVM_GET_CPUID2, c) < 0)
            return sp_fail("KVM_GET_CPUID2");
        return (int)(sizeof(*c) + c->nent * sizeof(struct kvm_cpuid_entry2));
    }
    default:
        return bad_len("sp_vcpu_get_part(unknown part)");
    }
}

int sp_vcpu_set_part(struct sp_vcpu *v, uint32_t part, const uint8_t *buf, size_t len)
{
    int fd = sp_vcpu_fd(v);
    size_t fixed = sp_vcpu_part_size(part);
    if (fixed && len != fixed)
        return bad_len("sp_vcpu_set_part(len is not the part's struct size)");
    switch (part) {
    case SP_PART_REGS:
        return ioctl(fd, KVM_SET_REGS, buf) < 0 ? sp_fail("KVM_SET_REGS") : (int)len;
    case SP_PART_SREGS:
        return ioctl(fd, KVM_SET_SREGS, buf) < 0 ? sp_fail("KVM_SET_SREGS") : (int)len;
    case SP_PART_XCRS:
        return ioctl(fd, KVM_SET_XCRS, buf) < 0 ? sp_fail("KVM_SET_XCRS") : (int)len;
    case SP_PART_VCPU_EVENTS:
        return ioctl(fd, KVM_SET_VCPU_EVENTS, buf) < 0 ? sp_fail("KVM_SET_VCPU_EVENTS") : (int)len;
    case SP_PART_MP_STATE:
        return ioctl(fd, KVM_SET_MP_STATE, buf) < 0 ? sp_fail("KVM_SET_MP_STATE") : (int)len;
    case SP_PART_DEBUGREGS:
        return ioctl(fd, KVM_SET_DEBUGREGS, buf) < 0 ? sp_fail("KVM_SET_DEBUGREGS") : (int)len;
    case SP_PART_XSAVE:
        /* KVM_SET_XSAVE reads KVM_CAP_XSAVE2's size (4096 without it): the caller passes exactly that. */
        if (len < sizeof(struct kvm_xsave) || len % 4)
            return bad_len("sp_vcpu_set_part(xsave len below 4096 or not whole words)");
        return ioctl(fd, KVM_SET_XSAVE, buf) < 0 ? sp_fail("KVM_SET_XSAVE") : (int)len;
    case SP_PART_MSRS: {
        /* Returns how many KVM set; fewer than len / 16 means the next one was refused. The entries are
         * copied: msrs_ioctl writes back, and the caller's buffer is const. */
        if (len % sizeof(struct kvm_msr_entry))
            return bad_len("sp_vcpu_set_part(msrs len not whole kvm_msr_entry)");
        struct kvm_msr_entry *copy = malloc(len ? len : 1);
        if (!copy) {
            errno = ENOMEM;
            return sp_fail("malloc(kvm_msr_entry copy)");
        }
        memcpy(copy, buf, len);
        int r = msrs_ioctl(fd, KVM_SET_MSRS, "KVM_SET_MSRS", copy, len / sizeof(struct kvm_msr_entry));
        free(copy);
        return r;
    }
    case SP_PART_CPUID: {
        struct kvm_cpuid2 head;
        if (len < sizeof(head))
            return bad_len("sp_vcpu_set_part(cpuid len below the kvm_cpuid2 header)");
        memcpy(&head, buf, sizeof(head));
        if (len != sizeof(head) + (size_t)head.nent * sizeof(struct kvm_cpuid_entry2))
            return bad_len("sp_vcpu_set_part(cpuid len is not 8 + 40 * nent)");
        /* Copied so the kernel sees an aligned struct whatever the caller's buffer. */
        struct kvm_cpuid2 *c = malloc(len);
        if (!c) {
            errno = ENOMEM;
            return sp_fail("malloc(kvm_cpuid2)");
        }
        memcpy(c, buf, len);
        int r = ioctl(fd, KVM_SET_CPUID2, c) < 0 ? sp_fail("KVM_SET_CPUID2") : (int)len;
        free(c);
        return r;
    }
    default:
        return bad_len("sp_vcpu_set_part(unknown part)");
    }
}

int sp_vcpu_inject_nmi(struct sp_vcpu *v)
{
    /* Without an in-kernel irqchip (snapproof's VMs have none) KVM_NMI is the NMI pin itself:
     * the NMI is queued and delivered at the next guest entry, unless NMIs are blocked. */
    return ioctl(sp_vcpu_fd(v), KVM_NMI, 0) < 0 ? sp_fail("KVM_NMI") : 0;
}

int sp_kvm_msr_index_list(int kvm_fd, uint32_t *out, uint32_t cap)
{
    /* First with room for none: KVM answers E2BIG and the count. */
    struct kvm_msr_list head = {.nmsrs = 0};
    if (ioctl(kvm_fd, KVM_GET_MSR_INDEX_LIST, &head) == 0)
        return 0;
    if (errno != E2BIG)
        return sp_fail("KVM_GET_MSR_INDEX_LIST");
    uint32_t n = head.nmsrs;
    if (cap < n)
        return (int)n; /* the caller asks again with room for n */
    struct kvm_msr_list *list = malloc(sizeof(*list) + (size_t)n * sizeof(uint32_t));
    if (!list) {
        errno = ENOMEM;
        return sp_fail("malloc(kvm_msr_list)");
    }
    list->nmsrs = n;
    if (ioctl(kvm_fd, KVM_GET_MSR_INDEX_LIST, list) < 0) {
        int r = sp_fail("KVM_GET_MSR_INDEX_LIST");
        free(list);
        return r;
    }
    n = list->nmsrs;
    memcpy(out, list->indices, (size_t)n * sizeof(uint32_t));
    free(list);
    return (int)n;
}

int sp_kvm_supported_cpuid(int kvm_fd, uint8_t *buf, size_t len)
{
    if (len < sizeof(struct kvm_cpuid2) || (len - sizeof(struct kvm_cpuid2)) % sizeof(struct kvm_cpuid_entry2))
        return bad_len("sp_kvm_supported_cpuid(len not a kvm_cpuid2 with whole entries)");
    struct kvm_cpuid2 *c = (struct kvm_cpuid2 *)buf;
    c->nent = (uint32_t)((len - sizeof(*c)) / sizeof(struct kvm_cpuid_entry2));
    c->padding = 0;
    if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, c) < 0)
        return sp_fail("KVM_GET_SUPPORTED_CPUID");
    return (int)(sizeof(*c) + c->nent * sizeof(struct kvm_cpuid_entry2));
}
