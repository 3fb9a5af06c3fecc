/*
 * Self-test of the Windows native layer, runnable without a hypervisor.
 *
 * Linux CI cross-compiles this with mingw-w64 and runs it under wine
 * (native/windows/ci.sh); on a Windows host it runs as is. It proves the
 * file-view half of the copy-on-write load on the real Windows API surface:
 *
 *   - a write through a FILE_MAP_COPY view is visible in the view and absent
 *     from the file (re-read with ReadFile, even after FlushViewOfFile);
 *   - a second copy view of the same file does not see the first one's write;
 *   - a FILE_MAP_READ view is really read-only: a write through it kills a
 *     child process with an access violation at the written address (the
 *     original hyperlight bug, which the phase's negative control replays);
 *   - the commit charge (PrivateUsage) before and after mapping, reported;
 *   - the WHP probe: the absent reason, the same text Python skips with.
 *
 * Where WHP is present it also runs marker16 in two partitions loaded from
 * copy views of one file. One line per check; exit status 0 only if all pass.
 */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wchar.h>

#define IMAGE_OFFSET 4096u                /* the snapshot format's memory image offset */
#define IMAGE_SIZE (4u * 1024 * 1024)     /* big enough that a whole-view commit charge shows */
#define FILE_SIZE (IMAGE_OFFSET + IMAGE_SIZE)
#define MARKER_GPA 0x1000u
#define MARKER_BEFORE 0xBE
#define MARKER_AFTER 0x42
#define GUEST_GPA 0x100u
#define CHILD_TIMEOUT_MS 60000u           /* wine's first process start can be slow */
#define CHILD_WRONG_FAULT 0xE0000002u     /* a fault, but not the expected write at the expected address */
#define CHILD_WRITE_SUCCEEDED 3u
#define CHILD_SETUP_FAILED 2u
#define CHILD_MEMORY_ACCESS_EXIT 4u
#define CHILD_MAP_REFUSED 5u

/* marker16 (guests/marker16.S): mov al, 0x42; mov [0x1000], al; hlt */
static const uint8_t marker16[] = {0xB0, 0x42, 0xA2, 0x00, 0x10, 0xF4};

static int checks, failures;

static void report(const char *status, const char *name, const char *fmt, va_list ap)
{
    printf("%-4s %s: ", status, name);
    vprintf(fmt, ap);
    printf("\n");
    fflush(stdout);
}

static int check(int ok, const char *name, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    checks++;
    if (!ok)
        failures++;
    report(ok ? "ok" : "FAIL", name, fmt, ap);
    va_end(ap);
    return ok;
}

static void info(const char *name, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    report("info", name, fmt, ap);
    va_end(ap);
}

static const char *last_failure(void)
{
    static char buf[256];
    snprintf(buf, sizeof(buf), "%s failed: %s 0x%08lx", sp_win_last_op(),
             sp_win_last_is_hresult() ? "HRESULT" : "Win32 error", (unsigned long)sp_win_last_error());
    return buf;
}

/* ---- the snapshot-like file ----------------------------------------------- */
static uint8_t pattern_byte(uint64_t off)
{
    /* differs within a page and between pages, so a misplaced view cannot match by luck */
    return (uint8_t)(off * 7u + (off >> 12) * 31u + 1u);
}

static void build_file(uint8_t *buf)
{
    memset(buf, 0, IMAGE_OFFSET);
    memcpy(buf, "SNAPPROF selftest header page", 29);
    uint8_t *image = buf + IMAGE_OFFSET;
    for (uint64_t i = 0; i < IMAGE_SIZE; i++)
        image[i] = pattern_byte(i);
    memcpy(image + GUEST_GPA, marker16, sizeof(marker16));
    image[MARKER_GPA] = MARKER_BEFORE;
}

static int write_file(const wchar_t *path, const uint8_t *buf, DWORD len)
{
    HANDLE h = CreateFileW(path, GENERIC_WRITE, 0, NULL, CREATE_ALWAYS, FILE_ATTRIBUTE_NORMAL, NULL);
    if (h == INVALID_HANDLE_VALUE)
        return 0;
    DWORD done = 0;
    BOOL ok = WriteFile(h, buf, len, &done, NULL) && done == len;
    CloseHandle(h);
    return ok;
}

static int read_file(const wchar_t *path, uint8_t *buf, DWORD len)
{
    /* ReadFile, not a mapping: the bytes on disk, whatever any view holds */
    HANDLE h = CreateFileW(path, GENERIC_READ, FILE_SHARE_READ | FILE_SHARE_WRITE, NULL, OPEN_EXISTING,
                           FILE_ATTRIBUTE_NORMAL, NULL);
    if (h == INVALID_HANDLE_VALUE)
        return 0;
    DWORD total = 0;
    BOOL ok = TRUE;
    while (ok && total < len) {
        DWORD got = 0;
        ok = ReadFile(h, buf + total, len - total, &got, NULL) && got > 0;
        total += got;
    }
    CloseHandle(h);
    return ok && total == len;
}

static int under_wine(void)
{
    /* wine's ntdll exports wine_get_version; Windows' never does */
    HMODULE ntdll = GetModuleHandleW(L"ntdll.dll");
    return ntdll && GetProcAddress(ntdll, "wine_get_version") != NULL;
}

static uint64_t first_difference(const uint8_t *a, const uint8_t *b, uint64_t len)
{
    for (uint64_t i = 0; i < len; i++)
        if (a[i] != b[i])
            return i;
    return len;
}

static const char *protection_name(uint32_t p)
{
    switch (p) {
    case PAGE_READONLY: return "PAGE_READONLY";
    case PAGE_READWRITE: return "PAGE_READWRITE";
    case PAGE_WRITECOPY: return "PAGE_WRITECOPY";
    case PAGE_EXECUTE_READ: return "PAGE_EXECUTE_READ";
    case PAGE_EXECUTE_READWRITE: return "PAGE_EXECUTE_READWRITE";
    case PAGE_EXECUTE_WRITECOPY: return "PAGE_EXECUTE_WRITECOPY";
    case PAGE_NOACCESS: return "PAGE_NOACCESS";
    default: return "other";
    }
}

static int file_unchanged(const wchar_t *path, const uint8_t *want, const char *name, const char *after)
{
    uint8_t *now = malloc(FILE_SIZE);
    if (!now)
        return check(0, name, "malloc(%u) failed", FILE_SIZE);
    int ok = 0;
    if (!read_file(path, now, FILE_SIZE)) {
        ok = check(0, name, "re-reading the file with ReadFile failed: Win32 error %lu", GetLastError());
    } else {
        uint64_t d = first_difference(want, now, FILE_SIZE);
        if (d == FILE_SIZE)
            ok = check(1, name, "all %u bytes on disk as written, %s", FILE_SIZE, after);
        else
            ok = check(0, name, "file offset %#llx: expected %#04x, saw %#04x (%s)", (unsigned long long)d,
                       want[d], now[d], after);
    }
    free(now);
    return ok;
}

/* ---- the read-only negative control, in a child that is meant to die --------- */
/* volatile pointer too: the store to it must happen before the faulting write, for the filter */
static volatile uint8_t *volatile child_target;
/* The host's own write faults exactly there; a fault inside WHvRunVirtualProcessor may name the page only. */
static volatile int child_exact_address;

static LONG WINAPI child_filter(EXCEPTION_POINTERS *ep)
{
    const EXCEPTION_RECORD *r = ep->ExceptionRecord;
    int has_address = r->NumberParameters >= 2;
    int is_write = has_address && r->ExceptionInformation[0] == 1;
    const void *where = has_address ? (const void *)r->ExceptionInformation[1] : NULL;
    printf("child: exception 0x%08lx: %s at %p (the write went to %p)\n", (unsigned long)r->ExceptionCode,
           is_write ? "write" : "not a write", where, (const void *)child_target);
    fflush(stdout);
    int address_ok = !child_exact_address || where == (const void *)child_target;
    UINT code = r->ExceptionCode == EXCEPTION_ACCESS_VIOLATION && is_write && address_ok
                    ? (UINT)EXCEPTION_ACCESS_VIOLATION
                    : CHILD_WRONG_FAULT;
    TerminateProcess(GetCurrentProcess(), code);
    return EXCEPTION_EXECUTE_HANDLER;
}

static int child_host_write(const wchar_t *path)
{
    struct sp_view *v;
    struct sp_view_info vi;
    if (sp_view_open(path, SP_VIEW_READONLY, IMAGE_OFFSET, IMAGE_SIZE, &v)) {
        printf("child: %s\n", last_failure());
        return CHILD_SETUP_FAILED;
    }
    sp_view_get_info(v, &vi);
    child_target = (volatile uint8_t *)(uintptr_t)(vi.addr + MARKER_GPA);
    child_exact_address = 1;
    *child_target = MARKER_AFTER; /* must fault: the view is FILE_MAP_READ */
    printf("child: the write through the read-only view succeeded\n");
    sp_view_close(v);
    return CHILD_WRITE_SUCCEEDED;
}

static int child_guest_write(const wchar_t *path)
{
    /* hyperlight's original load: a read-only view mapped Read|Write|Execute, the guest writes */
    struct sp_view *v;
    struct sp_view_info vi;
    struct sp_whp_vm *vm;
    struct sp_whp_exit ex;
    if (sp_view_open(path, SP_VIEW_READONLY, IMAGE_OFFSET, IMAGE_SIZE, &v)) {
        printf("child: %s\n", last_failure());
        return CHILD_SETUP_FAILED;
    }
    sp_view_get_info(v, &vi);
    child_target = (volatile uint8_t *)(uintptr_t)(vi.addr + MARKER_GPA);
    if (sp_whp_vm_create(&vm)) {
        printf("child: %s\n", last_failure());
        sp_view_close(v);
        return CHILD_SETUP_FAILED;
    }
    if (sp_whp_vm_map(vm, vi.addr, 0, vi.size, SP_WHP_MAP_READ | SP_WHP_MAP_WRITE | SP_WHP_MAP_EXECUTE)) {
        /* WHP refusing the read-only source up front would be a different failure from the original bug */
        printf("child: %s\n", last_failure());
        sp_whp_vm_destroy(vm);
        sp_view_close(v);
        return CHILD_MAP_REFUSED;
    }
    if (sp_whp_vcpu_set_real_mode(vm, 0, GUEST_GPA, 0xFFF0) ||
        sp_whp_vcpu_run(vm, 2000000000LL, 0, &ex, NULL, 0)) {
        printf("child: %s\n", last_failure());
        sp_whp_vm_destroy(vm);
        sp_view_close(v);
        return CHILD_SETUP_FAILED;
    }
    printf("child: run ended: reason %u, WHP exit %#x, GPA %#llx, access type %u\n", ex.reason,
           ex.whv_exit_reason, (unsigned long long)ex.mem_gpa, ex.mem_access_type);
    sp_whp_vm_destroy(vm);
    sp_view_close(v);
    if (ex.reason == SP_WHP_EXIT_MEMORY_ACCESS && ex.mem_gpa == MARKER_GPA && ex.mem_access_type == 1)
        return CHILD_MEMORY_ACCESS_EXIT;
    return CHILD_WRITE_SUCCEEDED;
}

static int child_main(const wchar_t *what, const wchar_t *path)
{
    sp_win_quiet_crashes();
    SetUnhandledExceptionFilter(child_filter);
    if (wcscmp(what, L"--host-write-child") == 0)
        return child_host_write(path);
    return child_guest_write(path);
}

static int run_child(const wchar_t *what, const wchar_t *path, DWORD *exit_code)
{
    wchar_t self[MAX_PATH];
    wchar_t cmd[3 * MAX_PATH + 64];
    DWORD n = GetModuleFileNameW(NULL, self, MAX_PATH);
    if (n == 0 || n >= MAX_PATH)
        return 0;
    swprintf(cmd, sizeof(cmd) / sizeof(cmd[0]), L"\"%ls\" %ls \"%ls\"", self, what, path);
    STARTUPINFOW si;
    PROCESS_INFORMATION pi;
    ZeroMemory(&si, sizeof(si));
    ZeroMemory(&pi, sizeof(pi));
    si.cb = sizeof(si);
    /* share our stdout/stderr so the child's one line lands in the same log */
    si.dwFlags = STARTF_USESTDHANDLES;
    si.hStdInput = NULL;
    si.hStdOutput = GetStdHandle(STD_OUTPUT_HANDLE);
    si.hStdError = GetStdHandle(STD_ERROR_HANDLE);
    SetHandleInformation(si.hStdOutput, HANDLE_FLAG_INHERIT, HANDLE_FLAG_INHERIT);
    SetHandleInformation(si.hStdError, HANDLE_FLAG_INHERIT, HANDLE_FLAG_INHERIT);
    fflush(stdout);
    if (!CreateProcessW(self, cmd, NULL, NULL, TRUE, 0, NULL, NULL, &si, &pi))
        return 0;
    int ok = 1;
    if (WaitForSingleObject(pi.hProcess, CHILD_TIMEOUT_MS) != WAIT_OBJECT_0) {
        TerminateProcess(pi.hProcess, 1);
        WaitForSingleObject(pi.hProcess, 5000);
        SetLastError(ERROR_TIMEOUT);
        ok = 0;
    } else if (!GetExitCodeProcess(pi.hProcess, exit_code)) {
        ok = 0;
    }
    CloseHandle(pi.hThread);
    CloseHandle(pi.hProcess);
    return ok;
}

/* ---- the checks ------------------------------------------------------------ */
static void test_copy_views(const wchar_t *path, const uint8_t *file)
{
    const uint8_t *image = file + IMAGE_OFFSET;
    struct sp_view *a = NULL, *b = NULL;
    struct sp_view_info ai, bi;
    uint64_t commit0 = 0, commit1 = 0, commit2 = 0;
    uint32_t prot = 0;

    sp_win_private_usage(&commit0);
    int rc = sp_view_open(path, SP_VIEW_COPY, IMAGE_OFFSET, IMAGE_SIZE, &a);
    if (!check(rc == 0, "copy view maps", "%s", rc ? last_failure() : "CreateFileMappingW(PAGE_WRITECOPY) + "
               "MapViewOfFile(FILE_MAP_COPY)"))
        return;
    sp_win_private_usage(&commit1);
    sp_view_get_info(a, &ai);
    check(ai.map_offset == 0 && ai.addr == ai.base + IMAGE_OFFSET && ai.addr % SP_PAGE_SIZE == 0,
          "copy view offset", "view of file offset %#llx at %#llx, image (file offset %#x) at +%#llx, page aligned",
          (unsigned long long)ai.map_offset, (unsigned long long)ai.base, IMAGE_OFFSET,
          (unsigned long long)(ai.addr - ai.base));
    uint8_t *va = (uint8_t *)(uintptr_t)ai.addr;
    uint64_t d = first_difference(image, va, IMAGE_SIZE);
    if (d == IMAGE_SIZE)
        check(1, "copy view contents", "%u bytes equal the file's image", IMAGE_SIZE);
    else
        check(0, "copy view contents", "image offset %#llx: expected %#04x, saw %#04x", (unsigned long long)d,
              image[d], va[d]);
    sp_view_page_protection(a, MARKER_GPA, &prot);
    check(prot == PAGE_WRITECOPY, "copy view protection before write", "%s (%#x)", protection_name(prot), prot);

    /* the guest's write, done by the host through the same view */
    const uint8_t last = (uint8_t)~image[IMAGE_SIZE - 1];
    va[MARKER_GPA] = MARKER_AFTER;
    va[IMAGE_SIZE - 1] = last;
    sp_win_private_usage(&commit2);
    check(va[MARKER_GPA] == MARKER_AFTER && va[IMAGE_SIZE - 1] == last, "write visible in copy view",
          "GPA %#x: expected %#04x, saw %#04x; last byte expected %#04x, saw %#04x", MARKER_GPA, MARKER_AFTER,
          va[MARKER_GPA], last, va[IMAGE_SIZE - 1]);
    sp_view_page_protection(a, MARKER_GPA, &prot);
    if (prot == PAGE_WRITECOPY && under_wine())
        info("copy view protection after write", "%s (%#x): wine does not report the private copy (Windows "
             "reports PAGE_READWRITE)", protection_name(prot), prot);
    else
        check(prot == PAGE_READWRITE, "copy view protection after write", "%s (%#x): the page is now a private copy",
              protection_name(prot), prot);
    /* a flush of a copy view has nothing to write back: it must not reach the file either */
    BOOL flushed = FlushViewOfFile((void *)(uintptr_t)ai.base, 0);
    unsigned long flush_error = flushed ? 0ul : GetLastError();
    check(flushed != 0, "FlushViewOfFile(copy view)", "returned %d (Win32 error %lu)", flushed, flush_error);
    file_unchanged(path, file, "file unchanged by copy-view write", "after the write and FlushViewOfFile");

    info("commit charge", "PrivateUsage %llu KiB before, %llu KiB with a %u KiB FILE_MAP_COPY view (%+lld KiB), "
         "%llu KiB after writing 2 pages (%+lld KiB); %s",
         (unsigned long long)commit0 / 1024, (unsigned long long)commit1 / 1024, IMAGE_SIZE / 1024,
         ((long long)commit1 - (long long)commit0) / 1024, (unsigned long long)commit2 / 1024,
         ((long long)commit2 - (long long)commit1) / 1024,
         under_wine() ? "wine does not account commit, so these say nothing here"
                      : "Windows charges a copy view's whole size at map time: the density cost per VM");

    /* a second VM's view of the same file */
    rc = sp_view_open(path, SP_VIEW_COPY, IMAGE_OFFSET, IMAGE_SIZE, &b);
    if (check(rc == 0, "second copy view maps", "%s", rc ? last_failure() : "a second FILE_MAP_COPY view")) {
        sp_view_get_info(b, &bi);
        uint8_t *vb = (uint8_t *)(uintptr_t)bi.addr;
        check(vb[MARKER_GPA] == MARKER_BEFORE && first_difference(image, vb, IMAGE_SIZE) == IMAGE_SIZE,
              "second copy view isolated", "GPA %#x: expected %#04x (the file's), saw %#04x", MARKER_GPA,
              MARKER_BEFORE, vb[MARKER_GPA]);
        vb[MARKER_GPA] = 0x77;
        check(va[MARKER_GPA] == MARKER_AFTER && vb[MARKER_GPA] == 0x77, "copy views isolated both ways",
              "first view %#04x (expected %#04x), second %#04x (expected 0x77)", va[MARKER_GPA], MARKER_AFTER,
              vb[MARKER_GPA]);
        file_unchanged(path, file, "file unchanged by two copy views", "after writes through both views");
    }
    sp_view_close(b);
    sp_view_close(a);
}

static void test_readonly_view(const wchar_t *path, const uint8_t *file)
{
    struct sp_view *r = NULL;
    struct sp_view_info ri;
    uint32_t prot = 0;
    int rc = sp_view_open(path, SP_VIEW_READONLY, IMAGE_OFFSET, IMAGE_SIZE, &r);
    if (!check(rc == 0, "read-only view maps", "%s", rc ? last_failure() : "CreateFileMappingW(PAGE_READONLY) + "
               "MapViewOfFile(FILE_MAP_READ)"))
        return;
    sp_view_get_info(r, &ri);
    const uint8_t *vr = (const uint8_t *)(uintptr_t)ri.addr;
    uint64_t d = first_difference(file + IMAGE_OFFSET, vr, IMAGE_SIZE);
    if (d == IMAGE_SIZE)
        check(1, "read-only view contents", "%u bytes equal the file's image", IMAGE_SIZE);
    else
        check(0, "read-only view contents", "image offset %#llx: expected %#04x, saw %#04x", (unsigned long long)d,
              file[IMAGE_OFFSET + d], vr[d]);
    sp_view_page_protection(r, MARKER_GPA, &prot);
    check(prot == PAGE_READONLY, "read-only view protection", "%s (%#x)", protection_name(prot), prot);
    sp_view_close(r);

    DWORD code = 0;
    if (!run_child(L"--host-write-child", path, &code)) {
        check(0, "read-only view is read-only", "running the child failed: Win32 error %lu", GetLastError());
    } else {
        check(code == (DWORD)EXCEPTION_ACCESS_VIOLATION, "read-only view is read-only",
              "a write through it killed the child with exit status %#lx (expected %#lx, "
              "EXCEPTION_ACCESS_VIOLATION at the written address): the original bug",
              (unsigned long)code, (unsigned long)EXCEPTION_ACCESS_VIOLATION);
    }
    file_unchanged(path, file, "file unchanged by the read-only write", "after the child's write attempt");
}

static int probe_matches(int probe, const char *reason)
{
    /* the fixed text before the first printf directive of the format this probe result uses */
    const char *fmt = probe == SP_WHP_NO_DLL ? SP_WHP_ABSENT_NO_DLL
                      : probe == SP_WHP_NO_EXPORT ? SP_WHP_ABSENT_NO_EXPORT
                      : probe == SP_WHP_CAPABILITY_FAILED ? SP_WHP_ABSENT_CAPABILITY_FAILED
                      : SP_WHP_ABSENT_NOT_PRESENT;
    size_t fixed = strcspn(fmt, "%");
    return strncmp(fmt, reason, fixed) == 0;
}

/* ---- the run loop (real WHP on Windows; fake_whp.c mode 4 under wine) -------- */
#define LOOP_GPA 0x3000u /* where the run-loop guests go: above marker16, inside the first page table */

/* out 0xE9 'h','i'; sync port 0x500 <- 0x1234; out 0x80 <- 0x7A; hlt */
static const uint8_t ports_guest[] = {
    0xB0, 'h', 0xE6, 0xE9,                    /* mov al,'h'; out 0xE9,al */
    0xB0, 'i', 0xE6, 0xE9,                    /* mov al,'i'; out 0xE9,al */
    0xBA, 0x00, 0x05,                         /* mov dx,0x500 */
    0x66, 0xB8, 0x34, 0x12, 0x00, 0x00,       /* mov eax,0x1234 */
    0x66, 0xEF,                               /* out dx,eax: the sync port */
    0xB0, 0x7A, 0xE6, 0x80,                   /* mov al,0x7A; out 0x80,al: a port nobody owns */
    0xF4,                                     /* hlt */
};
static const uint8_t spin_guest[] = {0xEB, 0xFE}; /* jmp $: only the watchdog or a cancel ends it */
/* mov ax,0x1000; mov ds,ax; mov [0],al -> GPA 0x10000, which the test leaves unmapped */
static const uint8_t unmapped_guest[] = {0xB8, 0x00, 0x10, 0x8E, 0xD8, 0xA2, 0x00, 0x00, 0xF4};

struct loop_vm {
    struct sp_view *view;
    struct sp_whp_vm *vm;
};

static int loop_vm_open(struct loop_vm *l, const wchar_t *path, const uint8_t *code, size_t len, uint64_t map_size)
{
    struct sp_view_info vi;
    l->view = NULL;
    l->vm = NULL;
    int rc = sp_view_open(path, SP_VIEW_COPY, IMAGE_OFFSET, IMAGE_SIZE, &l->view);
    if (rc == 0) {
        sp_view_get_info(l->view, &vi);
        memcpy((uint8_t *)(uintptr_t)vi.addr + LOOP_GPA, code, len); /* lands in this view's private copy */
        rc = sp_whp_vm_create(&l->vm);
    }
    if (rc == 0)
        rc = sp_whp_vm_map(l->vm, vi.addr, 0, map_size, SP_WHP_MAP_READ | SP_WHP_MAP_WRITE | SP_WHP_MAP_EXECUTE);
    if (rc == 0)
        rc = sp_whp_vcpu_set_real_mode(l->vm, 0, LOOP_GPA, 0xFFF0);
    return rc;
}

static void loop_vm_close(struct loop_vm *l)
{
    sp_whp_vm_destroy(l->vm);
    sp_view_close(l->view);
}

struct canceller {
    struct sp_whp_vm *vm;
    DWORD delay_ms;
};

static DWORD WINAPI cancel_later(LPVOID arg)
{
    struct canceller *c = arg;
    Sleep(c->delay_ms);
    return (DWORD)sp_whp_vcpu_cancel(c->vm);
}

static void test_whp_run_loop(const wchar_t *path)
{
    struct loop_vm l;
    struct sp_whp_exit ex;
    uint8_t debug[16];
    uint64_t regs[18];

    /* port I/O: the debug and sync ports are the loop's; any other port ends the run, RIP stepped */
    int rc = loop_vm_open(&l, path, ports_guest, sizeof(ports_guest), IMAGE_SIZE);
    if (rc == 0)
        rc = sp_whp_vcpu_run(l.vm, 2000000000LL, 0, &ex, debug, sizeof(debug));
    if (check(rc == 0, "whp run ports guest", "%s", rc ? last_failure() : "copy view, guest at 0:0x3000")) {
        check(ex.reason == SP_WHP_EXIT_IO && ex.io_port == 0x80 && ex.io_is_out && ex.io_size == 1 &&
                  ex.io_value == 0x7A,
              "whp port I/O exit", "reason %u port %#x out %u size %u value %#x (expected IO, out 0x80 <- 0x7a)",
              ex.reason, ex.io_port, ex.io_is_out, ex.io_size, ex.io_value);
        check(ex.debug_len == 2 && debug[0] == 'h' && debug[1] == 'i', "whp debug port", "%u bytes \"%.*s\"",
              ex.debug_len, (int)ex.debug_len, (const char *)debug);
        check(ex.sync_count == 1 && ex.last_sync == 0x1234, "whp sync port",
              "%llu writes, last %#x (expected 1, 0x1234)", (unsigned long long)ex.sync_count, ex.last_sync);
        check(ex.rip == LOOP_GPA + sizeof(ports_guest) - 1, "whp RIP stepped over out", "RIP %#llx (expected %#llx)",
              (unsigned long long)ex.rip, (unsigned long long)(LOOP_GPA + sizeof(ports_guest) - 1));
        rc = sp_whp_vcpu_run(l.vm, 2000000000LL, 0, &ex, NULL, 0);
        check(rc == 0 && ex.reason == SP_WHP_EXIT_HLT, "whp run resumes after the I/O exit", "reason %u (HLT is %u)",
              ex.reason, SP_WHP_EXIT_HLT);
        rc = sp_whp_vcpu_get_regs(l.vm, regs);
        check(rc == 0 && (regs[0] & 0xFFFFFFFF) == 0x127A && regs[16] == LOOP_GPA + sizeof(ports_guest),
              "whp registers", "eax %#llx (expected 0x127a), rip %#llx (expected %#llx)",
              (unsigned long long)regs[0], (unsigned long long)regs[16],
              (unsigned long long)(LOOP_GPA + sizeof(ports_guest)));
    }
    loop_vm_close(&l);

    if (loop_vm_open(&l, path, ports_guest, sizeof(ports_guest), IMAGE_SIZE) == 0 &&
        sp_whp_vcpu_run(l.vm, 2000000000LL, SP_WHP_RUN_STOP_ON_SYNC, &ex, NULL, 0) == 0)
        check(ex.reason == SP_WHP_EXIT_SYNC && ex.last_sync == 0x1234, "whp stop on sync",
              "reason %u (SYNC is %u), value %#x", ex.reason, SP_WHP_EXIT_SYNC, ex.last_sync);
    else
        check(0, "whp stop on sync", "%s", last_failure());
    loop_vm_close(&l);

    /* a guest that never halts: the watchdog cancels it at the deadline */
    if (loop_vm_open(&l, path, spin_guest, sizeof(spin_guest), IMAGE_SIZE) == 0 &&
        sp_whp_vcpu_run(l.vm, 200000000LL, 0, &ex, NULL, 0) == 0)
        check(ex.reason == SP_WHP_EXIT_TIMEOUT && ex.run_ns >= 200000000ull && ex.run_ns < 5000000000ull,
              "whp timeout", "reason %u (TIMEOUT is %u) after %.3f s (deadline 0.2 s)", ex.reason,
              SP_WHP_EXIT_TIMEOUT, ex.run_ns / 1e9);
    else
        check(0, "whp timeout", "%s", last_failure());
    /* ... and another thread can stop it before the deadline */
    struct canceller c = {l.vm, 100};
    HANDLE t = l.vm ? CreateThread(NULL, 0, cancel_later, &c, 0, NULL) : NULL;
    if (t && sp_whp_vcpu_run(l.vm, 10000000000LL, 0, &ex, NULL, 0) == 0)
        check(ex.reason == SP_WHP_EXIT_CANCELED && ex.run_ns < 5000000000ull, "whp cancel from another thread",
              "reason %u (CANCELED is %u) after %.3f s (cancel at 0.1 s, deadline 10 s)", ex.reason,
              SP_WHP_EXIT_CANCELED, ex.run_ns / 1e9);
    else
        check(0, "whp cancel from another thread", "%s", last_failure());
    if (t) {
        WaitForSingleObject(t, 10000);
        CloseHandle(t);
    }
    /* a cancel with no run in progress stops the next run before it starts */
    if (l.vm && sp_whp_vcpu_cancel(l.vm) == 0 && sp_whp_vcpu_run(l.vm, 10000000000LL, 0, &ex, NULL, 0) == 0)
        check(ex.reason == SP_WHP_EXIT_CANCELED && ex.whv_runs == 0, "whp cancel before run",
              "reason %u after %llu WHvRunVirtualProcessor calls (expected CANCELED after 0)", ex.reason,
              (unsigned long long)ex.whv_runs);
    else
        check(0, "whp cancel before run", "%s", last_failure());
    loop_vm_close(&l);

    /* a write to a GPA with no mapping: a memory-access exit naming it */
    if (loop_vm_open(&l, path, unmapped_guest, sizeof(unmapped_guest), 0x10000) == 0 &&
        sp_whp_vcpu_run(l.vm, 2000000000LL, 0, &ex, NULL, 0) == 0)
        check(ex.reason == SP_WHP_EXIT_MEMORY_ACCESS && ex.mem_gpa == 0x10000 && ex.mem_access_type == 1 &&
                  ex.mem_gpa_unmapped,
              "whp memory-access exit", "reason %u GPA %#llx access %u unmapped %u (expected MEMORY_ACCESS, "
              "write at 0x10000, unmapped)", ex.reason, (unsigned long long)ex.mem_gpa, ex.mem_access_type,
              ex.mem_gpa_unmapped);
    else
        check(0, "whp memory-access exit", "%s", last_failure());
    loop_vm_close(&l);
}

static void test_whp_run(const wchar_t *path, const uint8_t *file)
{
    struct sp_view *views[2] = {NULL, NULL};
    struct sp_whp_vm *vms[2] = {NULL, NULL};
    struct sp_whp_exit ex;
    for (int i = 0; i < 2; i++) {
        struct sp_view_info vi;
        int rc = sp_view_open(path, SP_VIEW_COPY, IMAGE_OFFSET, IMAGE_SIZE, &views[i]);
        if (rc == 0)
            rc = sp_whp_vm_create(&vms[i]);
        if (!check(rc == 0, "whp partition", "%s", rc ? last_failure() : "one vCPU, memory from a copy view"))
            goto out;
        sp_view_get_info(views[i], &vi);
        rc = sp_whp_vm_map(vms[i], vi.addr, 0, vi.size, SP_WHP_MAP_READ | SP_WHP_MAP_WRITE | SP_WHP_MAP_EXECUTE);
        if (rc == 0)
            rc = sp_whp_vcpu_set_real_mode(vms[i], 0, GUEST_GPA, 0xFFF0);
        if (!check(rc == 0, "whp map copy view at GPA 0", "%s",
                   rc ? last_failure() : "Read|Write|Execute, CS:IP 0:0x100"))
            goto out;
    }
    struct sp_view_info v0, v1;
    sp_view_get_info(views[0], &v0);
    sp_view_get_info(views[1], &v1);
    const volatile uint8_t *g0 = (const volatile uint8_t *)(uintptr_t)v0.addr;
    const volatile uint8_t *g1 = (const volatile uint8_t *)(uintptr_t)v1.addr;
    if (sp_whp_vcpu_run(vms[0], 2000000000LL, 0, &ex, NULL, 0) != 0) {
        check(0, "whp run marker16", "%s", last_failure());
        goto out;
    }
    check(ex.reason == SP_WHP_EXIT_HLT, "whp run marker16", "exit reason %u (HLT is %u), WHP exit %#x, %llu runs",
          ex.reason, SP_WHP_EXIT_HLT, ex.whv_exit_reason, (unsigned long long)ex.whv_runs);
    check(g0[MARKER_GPA] == MARKER_AFTER, "whp guest sees its write", "GPA %#x: expected %#04x, saw %#04x",
          MARKER_GPA, MARKER_AFTER, g0[MARKER_GPA]);
    check(g1[MARKER_GPA] == MARKER_BEFORE, "whp partitions isolated", "other VM's GPA %#x: expected %#04x, saw %#04x",
          MARKER_GPA, MARKER_BEFORE, g1[MARKER_GPA]);
    file_unchanged(path, file, "file unchanged by the guest", "after the guest's write");

    test_whp_run_loop(path);

    DWORD code = 0;
    if (run_child(L"--guest-write-child", path, &code))
        check(code == (DWORD)EXCEPTION_ACCESS_VIOLATION || code == CHILD_MEMORY_ACCESS_EXIT,
              "whp read-only load fails like the original bug",
              "child exit status %#lx (expected %#lx, an access violation, or %u, a write memory-access exit; "
              "%u means WHvMapGpaRange refused the read-only view)",
              (unsigned long)code, (unsigned long)EXCEPTION_ACCESS_VIOLATION, CHILD_MEMORY_ACCESS_EXIT,
              CHILD_MAP_REFUSED);
    else
        check(0, "whp read-only load fails like the original bug", "running the child failed: Win32 error %lu",
              GetLastError());
out:
    for (int i = 1; i >= 0; i--) {
        sp_whp_vm_destroy(vms[i]);
        sp_view_close(views[i]);
    }
}

static int probe_main(int expected)
{
    /* ci.sh runs this with stand-in WinHvPlatform.dll files (fake_whp.c) to reach every branch */
    static const char *names[] = {"SP_WHP_PRESENT", "SP_WHP_NO_DLL", "SP_WHP_NO_EXPORT",
                                  "SP_WHP_CAPABILITY_FAILED", "SP_WHP_NOT_PRESENT"};
    int probe = sp_whp_probe();
    const char *reason = sp_whp_absent_reason();
    printf("whp-absent-reason: %s\n", reason ? reason : "(none: WHP is present)");
    check(probe == expected, "whp probe result", "%d %s (expected %d %s)", probe,
          probe >= 0 && probe <= 4 ? names[probe] : "?", expected,
          expected >= 0 && expected <= 4 ? names[expected] : "?");
    if (reason) {
        check(probe_matches(probe, reason), "whp absent reason", "the text of the template for %s",
              probe >= 0 && probe <= 4 ? names[probe] : "?");
        if (probe == SP_WHP_NO_EXPORT)
            check(strstr(reason, "WHvCreatePartition") != NULL, "whp absent reason names the export",
                  "the first one missing from the stand-in DLL is WHvCreatePartition");
        struct sp_whp_vm *vm = NULL;
        int rc = sp_whp_vm_create(&vm);
        check(rc != 0 && vm == NULL && sp_win_last_error() == ERROR_NOT_SUPPORTED, "no partition without WHP",
              "sp_whp_vm_create returned %d: %s", rc, last_failure());
        sp_whp_vm_destroy(vm);
    }
    printf("selftest: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}

int wmain(int argc, wchar_t **argv)
{
    if (argc == 3 && wcscmp(argv[1], L"--probe") == 0)
        return probe_main(_wtoi(argv[2]));
    if (argc == 3 && (wcscmp(argv[1], L"--host-write-child") == 0 || wcscmp(argv[1], L"--guest-write-child") == 0))
        return child_main(argv[1], argv[2]);
    if (argc != 1) {
        printf("usage: selftest.exe [--probe EXPECTED_SP_WHP_PROBE]\n");
        return 2;
    }

    wchar_t dir[MAX_PATH], path[MAX_PATH];
    DWORD n = GetTempPathW(MAX_PATH, dir);
    if (n == 0 || n >= MAX_PATH || !GetTempFileNameW(dir, L"spw", 0, path)) {
        printf("FAIL temp file: Win32 error %lu\n", GetLastError());
        return 1;
    }
    uint8_t *file = malloc(FILE_SIZE);
    if (!file || (build_file(file), !write_file(path, file, FILE_SIZE))) {
        printf("FAIL write %ls: Win32 error %lu\n", path, GetLastError());
        free(file);
        DeleteFileW(path);
        return 1;
    }
    info("snapshot file", "%ls: %u-byte header page + %u KiB image; allocation granularity %u, page %u", path,
         IMAGE_OFFSET, IMAGE_SIZE / 1024, sp_win_allocation_granularity(), sp_win_page_size());

    test_copy_views(path, file);
    test_readonly_view(path, file);

    int probe = sp_whp_probe();
    const char *reason = sp_whp_absent_reason();
    printf("whp-absent-reason: %s\n", reason ? reason : "(none: WHP is present)");
    if (reason) {
        check(probe_matches(probe, reason), "whp absent reason", "probe result %d, reason from its template", probe);
        info("whp run", "skipped: %s", reason);
    } else {
        HMODULE dll = GetModuleHandleW(L"WinHvPlatform.dll");
        if (dll && GetProcAddress(dll, "SnapproofFakeWhpMode"))
            info("whp", "a stand-in WinHvPlatform.dll (native/windows/fake_whp.c), not a hypervisor: these "
                 "checks exercise whp_vm.c's loop, not WHP");
        test_whp_run(path, file);
    }

    free(file);
    BOOL deleted = DeleteFileW(path);
    unsigned long delete_error = deleted ? 0ul : GetLastError();
    check(deleted != 0, "temp file removed", "every view closed, so the file can go (DeleteFileW returned %d, "
          "Win32 error %lu)", deleted, delete_error);
    printf("selftest: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
