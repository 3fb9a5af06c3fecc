/*
 * Copy-on-write at the second-level page tables: the load hyperlight moved to
 * once PAGE_WRITECOPY's price showed (ORIGINS.md, "WRITECOPY's price": about
 * 2.5 GB of commit per VM with a copy view, about 6 MB private per VM this way).
 *
 * The snapshot is a PAGE_READONLY + FILE_MAP_READ view, mapped Read|Execute
 * into the partition: guest reads and instruction fetches are served from the
 * page cache, and nothing is charged per VM. The guest's first store to a page
 * is refused by the second-level page tables: WHP exits with
 * WHvRunVpExitReasonMemoryAccess (a write, at a mapped GPA) before the store
 * completes. The run loop (whp_vm.c) hands that exit here; this file commits
 * one private page, copies the snapshot page into it, unmaps that one page
 * from the read-only mapping and maps the private copy Read|Write|Execute at
 * the same GPA. The guest then re-executes the store against its own page.
 *
 * Unmapping one page of a larger mapping is a partial unmap, which WHP offers
 * only where WHvCapabilityCodeFeatures reports PartialUnmap: without it the
 * load is refused up front, naming the bit.
 *
 * Private pages live in one reservation of the memory's size (MEM_RESERVE
 * charges no commit), committed a page at a time, so the commit charge is
 * exactly the pages the guest wrote. They outlive the partition: the guest's
 * memory can be read after its partition is deleted, and a second partition
 * of this process can run meanwhile (only one may map memory at a time).
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

struct sp_cow {
    const uint8_t *image;     /* the snapshot view's bytes: read-only, never written by anyone */
    uint64_t size;
    uint8_t *private_base;    /* reserved, size bytes; page i's private copy lives at private_base + i*4096 */
    uint8_t *is_private;      /* one byte per page: its copy is committed, filled and mapped */
    struct sp_whp_vm *vm;     /* the partition it is mapped into, or NULL */
    uint64_t gpa;
    uint64_t private_pages;
    uint64_t faults;
    uint64_t fault_ns;
};

int sp_cow_open(struct sp_view *snapshot, struct sp_cow **out)
{
    *out = NULL;
    struct sp_view_info vi;
    sp_view_get_info(snapshot, &vi);
    if (vi.mode != SP_VIEW_READONLY)
        return sp_win_fail_code("sp_cow_open: the snapshot must be a SP_VIEW_READONLY view (a copy view would "
                                "charge its whole size as commit, the cost this load avoids)",
                                ERROR_INVALID_PARAMETER);
    if ((uint64_t)(SIZE_T)vi.size != vi.size)
        return sp_win_fail_code("sp_cow_open: size does not fit this address space", ERROR_INVALID_PARAMETER);
    struct sp_cow *cow = calloc(1, sizeof(*cow));
    if (!cow)
        return sp_win_fail_code("sp_cow_open: calloc", ERROR_NOT_ENOUGH_MEMORY);
    cow->image = (const uint8_t *)(uintptr_t)vi.addr;
    cow->size = vi.size;
    cow->is_private = calloc((size_t)(vi.size / SP_PAGE_SIZE), 1);
    if (!cow->is_private) {
        free(cow);
        return sp_win_fail_code("sp_cow_open: calloc(page map)", ERROR_NOT_ENOUGH_MEMORY);
    }
    cow->private_base = VirtualAlloc(NULL, (SIZE_T)vi.size, MEM_RESERVE, PAGE_NOACCESS);
    if (!cow->private_base) {
        int rc = sp_win_fail("VirtualAlloc(MEM_RESERVE) for the private pages");
        free(cow->is_private);
        free(cow);
        return rc;
    }
    *out = cow;
    return 0;
}

void sp_cow_close(struct sp_cow *cow)
{
    if (!cow)
        return;
    if (cow->vm)
        return; /* a partition still maps the private pages: leak them rather than free memory under it */
    VirtualFree(cow->private_base, 0, MEM_RELEASE);
    free(cow->is_private);
    free(cow);
}

void sp_cow_get_info(struct sp_cow *cow, struct sp_cow_info *out)
{
    memset(out, 0, sizeof(*out));
    out->size = cow->size;
    out->gpa = cow->gpa;
    out->private_pages = cow->private_pages;
    out->faults = cow->faults;
    out->fault_ns = cow->fault_ns;
    out->private_base = (uint64_t)(uintptr_t)cow->private_base;
    out->attached = cow->vm != NULL;
}

static const uint8_t *current_page(const struct sp_cow *cow, uint64_t page)
{
    uint64_t off = page * SP_PAGE_SIZE;
    return cow->is_private[page] ? cow->private_base + off : cow->image + off;
}

int sp_cow_read(struct sp_cow *cow, uint64_t offset, uint8_t *buf, uint64_t n)
{
    /* What the guest sees: its private copy where it wrote, the snapshot elsewhere. */
    if (offset > cow->size || n > cow->size - offset)
        return sp_win_fail_code("sp_cow_read: range beyond the memory", ERROR_INVALID_PARAMETER);
    while (n > 0) {
        uint64_t page = offset / SP_PAGE_SIZE, in_page = offset % SP_PAGE_SIZE;
        uint64_t chunk = SP_PAGE_SIZE - in_page < n ? SP_PAGE_SIZE - in_page : n;
        memcpy(buf, current_page(cow, page) + in_page, (size_t)chunk);
        buf += chunk;
        offset += chunk;
        n -= chunk;
    }
    return 0;
}

int sp_cow_page_is_private(struct sp_cow *cow, uint64_t offset)
{
    if (offset >= cow->size)
        return sp_win_fail_code("sp_cow_page_is_private: offset beyond the memory", ERROR_INVALID_PARAMETER);
    return cow->is_private[offset / SP_PAGE_SIZE];
}

int sp_whp_vm_map_cow(struct sp_whp_vm *vm, struct sp_cow *cow, uint64_t gpa)
{
    if (gpa % SP_PAGE_SIZE)
        return sp_win_fail_code("sp_whp_vm_map_cow: gpa must be page aligned", ERROR_INVALID_PARAMETER);
    if (cow->vm)
        return sp_win_fail_code("sp_whp_vm_map_cow: this memory is mapped into another partition",
                                ERROR_ALREADY_ASSIGNED);
    if (cow->private_pages)
        return sp_win_fail_code("sp_whp_vm_map_cow: this memory holds private pages from an earlier partition; "
                                "mapping it again is not supported", ERROR_NOT_SUPPORTED);
    uint64_t features = 0;
    if (sp_whp_features(&features))
        return -1;
    if (!(features & SP_WHP_FEATURE_PARTIAL_UNMAP))
        return sp_win_fail_code("sp_whp_vm_map_cow: WHvGetCapability(WHvCapabilityCodeFeatures) reports "
                                "PartialUnmap = 0: this host cannot unmap one page of a mapping, which "
                                "serving a copy-on-write fault needs", ERROR_NOT_SUPPORTED);
    if (sp_whp_vm_set_cow(vm, cow))
        return -1;
    /* Read|Execute only: the guest's first store to each page must exit, not land. */
    if (sp_whp_vm_map(vm, (uint64_t)(uintptr_t)cow->image, gpa, cow->size, SP_WHP_MAP_READ | SP_WHP_MAP_EXECUTE)) {
        sp_whp_vm_set_cow(vm, NULL);
        return -1;
    }
    cow->vm = vm;
    cow->gpa = gpa;
    return 0;
}

void sp_cow_detached(struct sp_cow *cow)
{
    cow->vm = NULL;
}

int sp_cow_serve_write(struct sp_cow *cow, struct sp_whp_vm *vm, uint64_t gpa)
{
    if (vm != cow->vm || gpa < cow->gpa || gpa - cow->gpa >= cow->size)
        return 0;
    uint64_t page = (gpa - cow->gpa) / SP_PAGE_SIZE;
    if (cow->is_private[page])
        return 0; /* a write exit on a page already writable is not a copy-on-write fault: report it */
    int64_t t0 = sp_win_now_ns();
    uint64_t off = page * SP_PAGE_SIZE, page_gpa = cow->gpa + off;
    uint8_t *copy = VirtualAlloc(cow->private_base + off, SP_PAGE_SIZE, MEM_COMMIT, PAGE_READWRITE);
    if (!copy)
        return sp_win_fail("VirtualAlloc(MEM_COMMIT) of a private page");
    memcpy(copy, cow->image + off, SP_PAGE_SIZE);
    if (sp_whp_vm_unmap(vm, page_gpa, SP_PAGE_SIZE)) {
        VirtualFree(copy, SP_PAGE_SIZE, MEM_DECOMMIT);
        return -1;
    }
    if (sp_whp_vm_map(vm, (uint64_t)(uintptr_t)copy, page_gpa, SP_PAGE_SIZE,
                      SP_WHP_MAP_READ | SP_WHP_MAP_WRITE | SP_WHP_MAP_EXECUTE)) {
        /* Put the snapshot page back so the guest is left as it was, then report the map's failure. */
        const char *op = sp_win_last_op();
        uint32_t code = sp_win_last_error();
        sp_whp_vm_map(vm, (uint64_t)(uintptr_t)(cow->image + off), page_gpa, SP_PAGE_SIZE,
                      SP_WHP_MAP_READ | SP_WHP_MAP_EXECUTE);
        VirtualFree(copy, SP_PAGE_SIZE, MEM_DECOMMIT);
        return sp_win_fail_hr(op, (long)code);
    }
    cow->is_private[page] = 1;
    cow->private_pages++;
    cow->faults++;
    cow->fault_ns += (uint64_t)(sp_win_now_ns() - t0);
    return 1;
}
