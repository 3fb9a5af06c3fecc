/*
 * Views of a snapshot file, the Windows twin of Linux mmap() on a file.
 *
 * SP_VIEW_COPY is the copy-on-write load: CreateFileMapping(PAGE_WRITECOPY)
 * + MapViewOfFile(FILE_MAP_COPY), like mmap(MAP_PRIVATE). Writes land in
 * private pages of this process; the file never changes. Windows charges
 * commit for the whole view at map time, so each VM loaded this way costs
 * its full memory size in commit even if it touches one page.
 *
 * SP_VIEW_READONLY is the mapping hyperlight first shipped (PAGE_READONLY +
 * FILE_MAP_READ): any write through it is an access violation. It exists
 * here as the negative control.
 *
 * MapViewOfFile offsets must be multiples of the allocation granularity
 * (64 KiB), while the memory image starts at file offset 4096: so the view
 * starts at the offset rounded down to the granularity, and `addr` points
 * inside it. WHvMapGpaRange needs a page-aligned source, which addr is,
 * because the requested offset must be page aligned.
 */
#include "internal.h"

#include <stdlib.h>

struct sp_view {
    HANDLE file;    /* kept open with FILE_SHARE_READ: nobody may write the file while it is mapped */
    HANDLE mapping;
    uint8_t *base;
    struct sp_view_info info;
};

static void view_free(struct sp_view *v)
{
    if (v->base)
        UnmapViewOfFile(v->base);
    if (v->mapping)
        CloseHandle(v->mapping);
    if (v->file != INVALID_HANDLE_VALUE)
        CloseHandle(v->file);
    free(v);
}

int sp_view_open(const wchar_t *path, uint32_t mode, uint64_t offset, uint64_t size, struct sp_view **out)
{
    *out = NULL;
    if (mode != SP_VIEW_COPY && mode != SP_VIEW_READONLY)
        return sp_win_fail_code("sp_view_open: mode is neither SP_VIEW_COPY nor SP_VIEW_READONLY",
                                ERROR_INVALID_PARAMETER);
    if (size == 0 || offset % SP_PAGE_SIZE || size % SP_PAGE_SIZE)
        return sp_win_fail_code("sp_view_open: offset and size must be page multiples, size > 0",
                                ERROR_INVALID_PARAMETER);
    if ((uint64_t)(SIZE_T)size != size)
        return sp_win_fail_code("sp_view_open: size does not fit this address space", ERROR_INVALID_PARAMETER);

    struct sp_view *v = calloc(1, sizeof(*v));
    if (!v)
        return sp_win_fail_code("sp_view_open: calloc", ERROR_NOT_ENOUGH_MEMORY);
    v->file = INVALID_HANDLE_VALUE;

    /* GENERIC_READ only: PAGE_WRITECOPY needs no more, and a read-only handle cannot change the file. */
    v->file = CreateFileW(path, GENERIC_READ, FILE_SHARE_READ, NULL, OPEN_EXISTING, FILE_ATTRIBUTE_NORMAL, NULL);
    if (v->file == INVALID_HANDLE_VALUE) {
        int rc = sp_win_fail("CreateFileW(GENERIC_READ, OPEN_EXISTING)");
        view_free(v);
        return rc;
    }
    LARGE_INTEGER file_size;
    if (!GetFileSizeEx(v->file, &file_size)) {
        int rc = sp_win_fail("GetFileSizeEx");
        view_free(v);
        return rc;
    }
    if (offset > (uint64_t)file_size.QuadPart || size > (uint64_t)file_size.QuadPart - offset) {
        view_free(v);
        return sp_win_fail_code("sp_view_open: offset + size is beyond the end of the file", ERROR_HANDLE_EOF);
    }

    DWORD page_prot = mode == SP_VIEW_COPY ? PAGE_WRITECOPY : PAGE_READONLY;
    /* Maximum size 0: the section is the file as it is; nothing can grow it. */
    v->mapping = CreateFileMappingW(v->file, NULL, page_prot, 0, 0, NULL);
    if (!v->mapping) {
        int rc = sp_win_fail(mode == SP_VIEW_COPY ? "CreateFileMappingW(PAGE_WRITECOPY)"
                                                  : "CreateFileMappingW(PAGE_READONLY)");
        view_free(v);
        return rc;
    }

    uint64_t gran = sp_win_allocation_granularity();
    uint64_t map_offset = offset - offset % gran;
    uint64_t view_size = offset - map_offset + size;
    DWORD access = mode == SP_VIEW_COPY ? FILE_MAP_COPY : FILE_MAP_READ;
    v->base = MapViewOfFile(v->mapping, access, (DWORD)(map_offset >> 32), (DWORD)map_offset, (SIZE_T)view_size);
    if (!v->base) {
        int rc = sp_win_fail(mode == SP_VIEW_COPY ? "MapViewOfFile(FILE_MAP_COPY)" : "MapViewOfFile(FILE_MAP_READ)");
        view_free(v);
        return rc;
    }

    v->info.base = (uint64_t)(uintptr_t)v->base;
    v->info.addr = v->info.base + (offset - map_offset);
    v->info.size = size;
    v->info.map_offset = map_offset;
    v->info.view_size = view_size;
    v->info.mode = mode;
    *out = v;
    return 0;
}

void sp_view_close(struct sp_view *v)
{
    if (v)
        view_free(v);
}

void sp_view_get_info(struct sp_view *v, struct sp_view_info *out)
{
    *out = v->info;
}

int sp_view_page_protection(struct sp_view *v, uint64_t offset, uint32_t *protect)
{
    /* PAGE_WRITECOPY until the first write to the page, PAGE_READWRITE (a private copy) after it. */
    *protect = 0;
    if (offset >= v->info.size)
        return sp_win_fail_code("sp_view_page_protection: offset beyond the view", ERROR_INVALID_PARAMETER);
    MEMORY_BASIC_INFORMATION mbi;
    if (VirtualQuery((const void *)(uintptr_t)(v->info.addr + offset), &mbi, sizeof(mbi)) != sizeof(mbi))
        return sp_win_fail("VirtualQuery");
    *protect = mbi.Protect;
    return 0;
}
