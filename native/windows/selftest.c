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
 *     child process with an access violation at the written address;
 *   - the commit charge (PrivateUsage) around the view alone, reported;
 *   - the WHP probe: the absent reason, the same text Python skips with.
 *
 * Where WHP is present (real, or the stand-in fake_whp.c under wine):
 *
 *   - the rules WHP enforces, each called raw and checked refused ("rule: ...");
 *   - one partition with mapped memory per process: every check below makes
 *     its partitions one after another, and a second one is a child process;
 *   - marker16 from copy views of one file in two partitions in turn;
 *   - the run loop: port I/O, debug and sync ports, watchdog, cancel;
 *   - a guest store to a page mapped Read|Execute: a write memory-access exit
 *     at the store, not completed, resumed once the page is made writable;
 *   - copy-on-write at the second-level page tables (cow.c): cow16 from a
 *     read-only view, two loads of one file, each with its own private pages;
 *   - the read-only load in a child, whose exit status names its outcome.
 *
 * One line per check; exit status 0 only if all pass.
 */
#include "whp_api.h"

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
#define COW16_GPA 0x5000u                 /* cow16's copy in the file: its stores go to 0x1000, 0x1001, 0x2000 */
#define RUN_TIMEOUT_NS 2000000000LL
#define WAIT_FOR_CHILD_MS 60000u           /* wine's first process start can be slow */

/* How a child that ran the read-only load ended: one exit status per outcome. */
#define CHILD_SETUP_FAILED 2u             /* it never got to run the guest */
#define CHILD_WRITE_LANDED 3u          /* the store landed and the guest halted */
#define CHILD_MEMORY_ACCESS_EXIT 4u       /* a write memory-access exit at the marker's GPA */
#define CHILD_MAP_REFUSED 5u              /* WHvMapGpaRange refused the read-only source up front */
#define CHILD_RUN_FAILED 6u               /* WHvRunVirtualProcessor (or a register call) failed */
#define CHILD_TIMEOUT 7u                  /* the run's deadline passed */
#define CHILD_OTHER_EXIT 8u               /* any other exit */
#define CHILD_WRONG_FAULT 0xE0000002u     /* a fault, but not the expected write at the expected address */

/* marker16 (guests/marker16.S): mov al, 0x42; mov [0x1000], al; hlt */
static const uint8_t marker16[] = {0xB0, 0x42, 0xA2, 0x00, 0x10, 0xF4};
/* cow16 (guests/cow16.S): stores 0x42 at 0x1000 and 0x43 at 0x1001, reads both back out of port 0xE9,
   stores 0x44 at 0x2000, halts: two pages written, the first twice, and what the guest read back */
static const uint8_t cow16[] = {
    0xB0, 0x42, 0xA2, 0x00, 0x10,   /* mov al,0x42; mov [0x1000],al: first store to page 1 */
    0xB0, 0x43, 0xA2, 0x01, 0x10,   /* mov al,0x43; mov [0x1001],al: page 1 again, no fault */
    0xA0, 0x00, 0x10, 0xE6, 0xE9,   /* mov al,[0x1000]; out 0xE9,al */
    0xA0, 0x01, 0x10, 0xE6, 0xE9,   /* mov al,[0x1001]; out 0xE9,al */
    0xB0, 0x44, 0xA2, 0x00, 0x20,   /* mov al,0x44; mov [0x2000],al: first store to page 2 */
    0xF4,                           /* hlt */
};

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
    memcpy(image + COW16_GPA, cow16, sizeof(cow16));
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

/* ---- the read-only negative control, in a child that is meant to fail ------- */
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
    return CHILD_WRITE_LANDED;
}

static int child_outcome_of(const struct sp_whp_exit *ex)
{
    switch (ex->reason) {
    case SP_WHP_EXIT_HLT: return CHILD_WRITE_LANDED;
    case SP_WHP_EXIT_ERROR: return CHILD_RUN_FAILED;
    case SP_WHP_EXIT_TIMEOUT: return CHILD_TIMEOUT;
    case SP_WHP_EXIT_MEMORY_ACCESS:
        if (ex->mem_gpa == MARKER_GPA && ex->mem_access_type == WHvMemoryAccessWrite)
            return CHILD_MEMORY_ACCESS_EXIT;
        return CHILD_OTHER_EXIT;
    default: return CHILD_OTHER_EXIT;
    }
}

static int child_guest_write(const wchar_t *path)
{
    /* hyperlight's original load: a read-only view mapped Read|Write|Execute, and the guest writes */
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
    if (sp_whp_vcpu_set_real_mode(vm, 0, GUEST_GPA, 0xFFF0) || sp_whp_vcpu_run(vm, RUN_TIMEOUT_NS, 0, &ex, NULL, 0)) {
        printf("child: %s\n", last_failure());
        sp_whp_vm_destroy(vm);
        sp_view_close(v);
        return CHILD_SETUP_FAILED;
    }
    printf("child: run ended: reason %u, WHP exit %#x, HRESULT 0x%08lx, GPA %#llx, access type %u, GPA unmapped %u, "
           "RIP %#llx\n", ex.reason, ex.whv_exit_reason, (unsigned long)ex.hresult, (unsigned long long)ex.mem_gpa,
           ex.mem_access_type, ex.mem_gpa_unmapped, (unsigned long long)ex.rip);
    sp_whp_vm_destroy(vm);
    sp_view_close(v);
    return child_outcome_of(&ex);
}

static const char *child_outcome_name(DWORD code)
{
    switch (code) {
    case EXCEPTION_ACCESS_VIOLATION: return "the host thread took an access violation";
    case CHILD_MEMORY_ACCESS_EXIT: return "a write memory-access exit at GPA 0x1000";
    case CHILD_RUN_FAILED: return "WHvRunVirtualProcessor failed";
    case CHILD_WRITE_LANDED: return "the store landed and the guest halted";
    case CHILD_MAP_REFUSED: return "WHvMapGpaRange refused the read-only view";
    case CHILD_TIMEOUT: return "the run timed out";
    case CHILD_OTHER_EXIT: return "some other exit";
    case CHILD_SETUP_FAILED: return "the child could not set the load up";
    case CHILD_WRONG_FAULT: return "a fault other than that write";
    default: return "an unexpected exit status";
    }
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
    if (WaitForSingleObject(pi.hProcess, WAIT_FOR_CHILD_MS) != WAIT_OBJECT_0) {
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

    info("commit charge", "PrivateUsage %+lld KiB around the FILE_MAP_COPY view alone, %.3f x its %llu KiB "
         "(the image's %u KiB and the header page the 64 KiB-aligned view also covers); %+lld KiB after writing 2 "
         "pages; %s",
         ((long long)commit1 - (long long)commit0) / 1024,
         (double)((long long)commit1 - (long long)commit0) / (double)ai.view_size,
         (unsigned long long)ai.view_size / 1024, IMAGE_SIZE / 1024,
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

/* ---- the WHP probe ------------------------------------------------------------ */
static const char *const probe_names[] = {"SP_WHP_PRESENT", "SP_WHP_NO_DLL", "SP_WHP_NO_EXPORT",
                                          "SP_WHP_CAPABILITY_FAILED", "SP_WHP_NOT_PRESENT", "SP_WHP_CREATE_FAILED",
                                          "SP_WHP_PROPERTY_FAILED", "SP_WHP_SETUP_FAILED"};
#define PROBE_NAME(p) ((p) >= 0 && (p) < (int)(sizeof(probe_names) / sizeof(probe_names[0])) ? probe_names[p] : "?")

static int probe_matches(int probe, const char *reason)
{
    /* the fixed text before the first printf directive of the format this probe result uses */
    const char *fmt = probe == SP_WHP_NO_DLL ? SP_WHP_ABSENT_NO_DLL
                      : probe == SP_WHP_NO_EXPORT ? SP_WHP_ABSENT_NO_EXPORT
                      : probe == SP_WHP_CAPABILITY_FAILED ? SP_WHP_ABSENT_CAPABILITY_FAILED
                      : probe == SP_WHP_NOT_PRESENT ? SP_WHP_ABSENT_NOT_PRESENT
                      : probe == SP_WHP_CREATE_FAILED ? SP_WHP_ABSENT_CREATE_FAILED
                      : probe == SP_WHP_PROPERTY_FAILED ? SP_WHP_ABSENT_PROPERTY_FAILED
                      : SP_WHP_ABSENT_SETUP_FAILED;
    size_t fixed = strcspn(fmt, "%");
    return strncmp(fmt, reason, fixed) == 0;
}

/* ---- the rules, called raw: a refusal must be WHP's, not our wrapper's ----------- */
static struct sp_whp_api raw;
static int stand_in; /* WinHvPlatform.dll is fake_whp.c, which exports SnapproofFakeWhpMode */
typedef UINT64(WINAPI *pfn_set_features)(UINT64);

#define RWX (WHvMapGpaRangeFlagRead | WHvMapGpaRangeFlagWrite | WHvMapGpaRangeFlagExecute)
#define RX (WHvMapGpaRangeFlagRead | WHvMapGpaRangeFlagExecute)

static int raw_resolve(void)
{
    raw.dll = GetModuleHandleW(SP_WIDEN(SP_WHP_DLL_NAME)); /* loaded by the probe */
    if (!raw.dll)
        return 0;
#define SP_RAW_RESOLVE(name)                                                        \
    raw.name = (pfn_##name)(void (*)(void))GetProcAddress(raw.dll, #name);          \
    if (!raw.name)                                                                  \
        return 0;
    SP_WHP_FUNCS(SP_RAW_RESOLVE)
#undef SP_RAW_RESOLVE
    return 1;
}

static pfn_set_features stand_in_set_features(void)
{
    return stand_in ? (pfn_set_features)(void (*)(void))GetProcAddress(raw.dll, "SnapproofFakeWhpSetFeatures") : NULL;
}

static WHV_PARTITION_HANDLE raw_partition(int set_count, int setup)
{
    WHV_PARTITION_HANDLE part = NULL;
    UINT32 one = 1;
    if (FAILED(raw.WHvCreatePartition(&part)))
        return NULL;
    if ((set_count &&
         FAILED(raw.WHvSetPartitionProperty(part, WHvPartitionPropertyCodeProcessorCount, &one, sizeof(one)))) ||
        (setup && FAILED(raw.WHvSetupPartition(part)))) {
        raw.WHvDeletePartition(part);
        return NULL;
    }
    return part;
}

static void rule(const char *name, HRESULT hr, HRESULT documented, const char *source)
{
    if (documented)
        check(hr == documented, name, "HRESULT 0x%08lx %s (expected 0x%08lx %s; %s)", (unsigned long)hr,
              sp_whp_hresult_name(hr), (unsigned long)documented, sp_whp_hresult_name(documented), source);
    else
        check(FAILED(hr), name, "HRESULT 0x%08lx %s (expected a failure; %s)", (unsigned long)hr,
              sp_whp_hresult_name(hr), source);
}

static void accepted(const char *name, HRESULT hr, const char *what)
{
    check(SUCCEEDED(hr), name, "HRESULT 0x%08lx %s (%s)", (unsigned long)hr, sp_whp_hresult_name(hr), what);
}

static uint64_t raw_features(void)
{
    WHV_CAPABILITY cap;
    ZeroMemory(&cap, sizeof(cap));
    return SUCCEEDED(raw.WHvGetCapability(WHvCapabilityCodeFeatures, &cap, sizeof(cap), NULL)) ? cap.Features.AsUINT64
                                                                                                : 0;
}

static void test_whp_rules(void)
{
    if (!check(raw_resolve(), "rule checks resolve WHP", "GetProcAddress of every export snapproof calls"))
        return;
    uint8_t *host = VirtualAlloc(NULL, 16 * SP_PAGE_SIZE, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE);
    if (!check(host != NULL, "rule checks host memory", "VirtualAlloc(16 pages, PAGE_READWRITE)%s",
               host ? "" : " failed"))
        return;

    WHV_CAPABILITY cap;
    rule("rule: an unknown capability is refused", raw.WHvGetCapability((WHV_CAPABILITY_CODE)0xFFFF, &cap,
         sizeof(cap), NULL), SP_HR_WHV_E_UNKNOWN_CAPABILITY, "WHvGetCapability.md");

    WHV_PARTITION_HANDLE p = raw_partition(0, 0);
    if (check(p != NULL, "rule partition without a processor count", "WHvCreatePartition")) {
        rule("rule: setup without the processor count is refused", raw.WHvSetupPartition(p),
             SP_HR_WHV_E_INVALID_PARTITION_CONFIG, "WHvSetupPartition.md");
        raw.WHvDeletePartition(p);
    }
    p = raw_partition(1, 0);
    if (check(p != NULL, "rule partition before setup", "WHvCreatePartition + ProcessorCount")) {
        rule("rule: memory is mapped only after setup", raw.WHvMapGpaRange(p, host, 0, SP_PAGE_SIZE, RWX), 0,
             "WHvSetupPartition.md");
        rule("rule: vCPUs are created only after setup", raw.WHvCreateVirtualProcessor(p, 0, 0), 0,
             "WHvSetupPartition.md");
        raw.WHvDeletePartition(p);
    }

    p = raw_partition(1, 1);
    if (!check(p != NULL, "rule partition after setup", "WHvCreatePartition + ProcessorCount + WHvSetupPartition")) {
        VirtualFree(host, 0, MEM_RELEASE);
        return;
    }
    UINT32 two = 2;
    WHV_RUN_VP_EXIT_CONTEXT ctx;
    rule("rule: the processor count is fixed at setup", raw.WHvSetPartitionProperty(p,
         WHvPartitionPropertyCodeProcessorCount, &two, sizeof(two)), 0, "WHvSetupPartition.md");
    rule("rule: vCPU flags must be zero", raw.WHvCreateVirtualProcessor(p, 0, 1), 0,
         "WHvCreateVirtualProcessor.md");
    rule("rule: a vCPU index beyond the processor count is refused", raw.WHvCreateVirtualProcessor(p, 1, 0), 0,
         "rusty_box_whp partition.rs");
    rule("rule: running a vCPU that does not exist is refused", raw.WHvRunVirtualProcessor(p, 0, &ctx,
         sizeof(ctx)), 0, "WHV_E_VP_DOES_NOT_EXIST");
    accepted("rule partition vCPU 0", raw.WHvCreateVirtualProcessor(p, 0, 0), "the valid call");
    rule("rule: a vCPU is created once", raw.WHvCreateVirtualProcessor(p, 0, 0), 0, "WHV_E_VP_ALREADY_EXISTS");
    WHV_REGISTER_VALUE values[3];
    WHV_REGISTER_NAME rax = WHvX64RegisterRax;
    rule("rule: register values must be 16-byte aligned", raw.WHvGetVirtualProcessorRegisters(p, 0, &rax, 1,
         (WHV_REGISTER_VALUE *)(void *)((uint8_t *)values + 8)), 0, "hyperlight's Align16 fix");

    rule("rule: the map source must be page aligned", raw.WHvMapGpaRange(p, host + 1, 0, SP_PAGE_SIZE, RWX), 0,
         "WHvMapGpaRange.md");
    rule("rule: the map GPA must be page aligned", raw.WHvMapGpaRange(p, host, 0x800, SP_PAGE_SIZE, RWX), 0,
         "rusty_box_whp, QEMU whpx");
    rule("rule: the map size must be whole pages", raw.WHvMapGpaRange(p, host, 0, SP_PAGE_SIZE + 1, RWX), 0,
         "rusty_box_whp, QEMU whpx");
    rule("rule: the map size must not be 0", raw.WHvMapGpaRange(p, host, 0, 0, RWX), 0, "rusty_box_whp");
    accepted("rule partition maps 4 pages at GPA 0", raw.WHvMapGpaRange(p, host, 0, 4 * SP_PAGE_SIZE, RWX),
             "the valid call");
    rule("rule: a map overlapping a mapped range is refused", raw.WHvMapGpaRange(p, host + 4 * SP_PAGE_SIZE,
         0x2000, 4 * SP_PAGE_SIZE, RWX), 0, "VirtualBox NEM, QEMU whpx; WHvMapGpaRange.md says it replaces");
    rule("rule: unmapping GPAs never mapped is refused", raw.WHvUnmapGpaRange(p, 0x10000, SP_PAGE_SIZE), 0,
         "WHV_E_GPA_RANGE_NOT_FOUND");

    pfn_set_features set_features = stand_in_set_features();
    uint64_t features = raw_features();
    if (set_features) {
        uint64_t before = set_features(features & ~(uint64_t)SP_WHP_FEATURE_PARTIAL_UNMAP);
        rule("rule: a partial unmap needs PartialUnmap", raw.WHvUnmapGpaRange(p, 0x1000, SP_PAGE_SIZE), 0,
             "WHV_CAPABILITY_FEATURES, rusty_box_whp caps.rs");
        set_features(before);
        features = before;
    }
    if (features & SP_WHP_FEATURE_PARTIAL_UNMAP) {
        accepted("rule: a partial unmap works with PartialUnmap", raw.WHvUnmapGpaRange(p, 0x1000, SP_PAGE_SIZE),
                 "one page out of the 4-page range");
        accepted("rule partition maps a page into the hole", raw.WHvMapGpaRange(p, host + 8 * SP_PAGE_SIZE,
                 0x1000, SP_PAGE_SIZE, RWX), "a different host page in the hole");
    } else {
        rule("rule: a partial unmap needs PartialUnmap", raw.WHvUnmapGpaRange(p, 0x1000, SP_PAGE_SIZE), 0,
             "this host reports PartialUnmap = 0");
    }

    WHV_PARTITION_HANDLE q = raw_partition(1, 1);
    if (check(q != NULL, "rule second partition creates and sets up", "while the first maps memory")) {
        rule("rule: a second partition with mapped memory is refused",
             raw.WHvMapGpaRange(q, host + 12 * SP_PAGE_SIZE, 0, SP_PAGE_SIZE, RWX),
             SP_HR_ERROR_VID_PARTITION_ALREADY_EXISTS, "hyperlight surrogate notes; rusty_box_whp, measured");
        raw.WHvDeletePartition(p);
        p = NULL;
        accepted("rule: the second partition maps once the first is deleted",
                 raw.WHvMapGpaRange(q, host + 12 * SP_PAGE_SIZE, 0, SP_PAGE_SIZE, RWX), "partitions in turn");
        raw.WHvDeletePartition(q);
    }
    if (p)
        raw.WHvDeletePartition(p);
    VirtualFree(host, 0, MEM_RELEASE); /* every partition that mapped it is gone */
}

/* ---- marker16 in two partitions, one after the other --------------------------- */
static void test_whp_run(const wchar_t *path, const uint8_t *file)
{
    const uint32_t rwx = SP_WHP_MAP_READ | SP_WHP_MAP_WRITE | SP_WHP_MAP_EXECUTE;
    struct sp_view *a_view = NULL, *b_view = NULL;
    struct sp_view_info a, b;
    struct sp_whp_vm *vm = NULL;
    struct sp_whp_exit ex;
    const volatile uint8_t *ga = NULL;

    int rc = sp_view_open(path, SP_VIEW_COPY, IMAGE_OFFSET, IMAGE_SIZE, &a_view);
    if (rc == 0) {
        sp_view_get_info(a_view, &a);
        ga = (const volatile uint8_t *)(uintptr_t)a.addr;
        rc = sp_whp_vm_create(&vm);
    }
    if (rc == 0)
        rc = sp_whp_vm_map(vm, a.addr, 0, a.size, rwx);
    if (rc == 0)
        rc = sp_whp_vcpu_set_real_mode(vm, 0, GUEST_GPA, 0xFFF0);
    if (rc == 0)
        rc = sp_whp_vcpu_run(vm, RUN_TIMEOUT_NS, 0, &ex, NULL, 0);
    if (check(rc == 0, "whp partition A", "%s", rc ? last_failure() : "copy view at GPA 0, RWX, CS:IP 0:0x100")) {
        check(ex.reason == SP_WHP_EXIT_HLT, "whp run marker16", "exit reason %u (HLT is %u), WHP exit %#x, %llu runs",
              ex.reason, SP_WHP_EXIT_HLT, ex.whv_exit_reason, (unsigned long long)ex.whv_runs);
        check(ga[MARKER_GPA] == MARKER_AFTER, "whp guest sees its write", "GPA %#x: expected %#04x, saw %#04x",
              MARKER_GPA, MARKER_AFTER, ga[MARKER_GPA]);
    }
    /* One partition with mapped memory per process: A goes before B maps. A's memory, its view, stays. */
    sp_whp_vm_destroy(vm);
    vm = NULL;

    /* B runs whatever became of A; the isolation checks need A's view. */
    rc = sp_view_open(path, SP_VIEW_COPY, IMAGE_OFFSET, IMAGE_SIZE, &b_view);
    if (rc == 0) {
        sp_view_get_info(b_view, &b);
        volatile uint8_t *gb = (volatile uint8_t *)(uintptr_t)b.addr;
        check(gb[MARKER_GPA] == MARKER_BEFORE, "whp partitions isolated",
              "B's GPA %#x before B runs: expected %#04x (A's write unseen), saw %#04x", MARKER_GPA, MARKER_BEFORE,
              gb[MARKER_GPA]);
        gb[0x2000] = 0x77; /* only B's copy changes at 0x2000 */
        rc = sp_whp_vm_create(&vm);
        if (rc == 0)
            rc = sp_whp_vm_map(vm, b.addr, 0, b.size, rwx);
        check(rc == 0, "whp second partition maps once the first is deleted", "%s",
              rc ? last_failure() : "partition B, its own copy view");
        if (rc == 0)
            rc = sp_whp_vcpu_set_real_mode(vm, 0, GUEST_GPA, 0xFFF0);
        if (rc == 0)
            rc = sp_whp_vcpu_run(vm, RUN_TIMEOUT_NS, 0, &ex, NULL, 0);
        if (check(rc == 0 && ex.reason == SP_WHP_EXIT_HLT, "whp partition B runs marker16", "%s",
                  rc ? last_failure() : ex.reason == SP_WHP_EXIT_HLT ? "halted" : "did not halt"))
            check(gb[MARKER_GPA] == MARKER_AFTER && ga && ga[0x2000] == file[IMAGE_OFFSET + 0x2000],
                  "whp partitions isolated both ways", "B's GPA 0x1000 %#04x (expected %#04x); A's GPA 0x2000 %#04x "
                  "(expected the file's %#04x, B's host write unseen)", gb[MARKER_GPA], MARKER_AFTER, ga ? ga[0x2000] : 0,
                  file[IMAGE_OFFSET + 0x2000]);
    } else {
        check(0, "whp partition B", "%s", last_failure());
    }
    sp_whp_vm_destroy(vm);
    file_unchanged(path, file, "file unchanged by the guest", "after both partitions' writes");
    sp_view_close(b_view);
    sp_view_close(a_view);
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


/* ---- a store to a page mapped Read|Execute: exit, not completed, resumed --------- */
static void test_whp_write_exit(const wchar_t *path)
{
    /* marker16 from a read-only view mapped Read|Execute: the second-level page tables refuse its store */
    const uint64_t store_rip = GUEST_GPA + 2; /* marker16's mov [0x1000],al */
    struct sp_view *view = NULL;
    struct sp_view_info vi;
    struct sp_whp_vm *vm = NULL;
    struct sp_whp_exit ex;
    uint64_t regs[18];
    uint8_t *page = NULL;
    int rc = sp_view_open(path, SP_VIEW_READONLY, IMAGE_OFFSET, IMAGE_SIZE, &view);
    if (rc == 0) {
        sp_view_get_info(view, &vi);
        rc = sp_whp_vm_create(&vm);
    }
    if (rc == 0)
        rc = sp_whp_vm_map(vm, vi.addr, 0, vi.size, SP_WHP_MAP_READ | SP_WHP_MAP_EXECUTE);
    if (rc == 0)
        rc = sp_whp_vcpu_set_real_mode(vm, 0, GUEST_GPA, 0xFFF0);
    if (rc == 0)
        rc = sp_whp_vcpu_run(vm, RUN_TIMEOUT_NS, 0, &ex, NULL, 0);
    if (!check(rc == 0, "whp write exit setup", "%s", rc ? last_failure() : "read-only view mapped Read|Execute"))
        goto done;
    const volatile uint8_t *image = (const volatile uint8_t *)(uintptr_t)vi.addr;
    check(ex.reason == SP_WHP_EXIT_MEMORY_ACCESS && ex.mem_gpa == MARKER_GPA &&
              ex.mem_access_type == WHvMemoryAccessWrite && !ex.mem_gpa_unmapped,
          "whp store to a Read|Execute page exits", "reason %u GPA %#llx access %u unmapped %u (expected "
          "MEMORY_ACCESS %u, a write (1) at %#x, GPA mapped (0))", ex.reason, (unsigned long long)ex.mem_gpa,
          ex.mem_access_type, ex.mem_gpa_unmapped, SP_WHP_EXIT_MEMORY_ACCESS, MARKER_GPA);
    rc = sp_whp_vcpu_get_regs(vm, regs);
    check(rc == 0 && ex.rip == store_rip && regs[16] == store_rip && (regs[0] & 0xFF) == MARKER_AFTER &&
              image[MARKER_GPA] == MARKER_BEFORE,
          "whp write exit leaves the store undone", "exit RIP %#llx and RIP %#llx (expected %#llx, on the store), "
          "AL %#llx (expected %#x), GPA %#x holds %#04x (expected %#04x)", (unsigned long long)ex.rip,
          (unsigned long long)regs[16], (unsigned long long)store_rip, (unsigned long long)(regs[0] & 0xFF),
          MARKER_AFTER, MARKER_GPA, image[MARKER_GPA], MARKER_BEFORE);
    /* nothing changed, so running again meets the same store: it is not skipped */
    rc = sp_whp_vcpu_run(vm, RUN_TIMEOUT_NS, 0, &ex, NULL, 0);
    check(rc == 0 && ex.reason == SP_WHP_EXIT_MEMORY_ACCESS && ex.mem_gpa == MARKER_GPA && ex.rip == store_rip,
          "whp write exit repeats until served", "reason %u GPA %#llx RIP %#llx (expected the same exit at %#llx)",
          ex.reason, (unsigned long long)ex.mem_gpa, (unsigned long long)ex.rip, (unsigned long long)store_rip);
    /* serve it as cow.c does: a private copy of the page, mapped Read|Write|Execute in its place */
    page = VirtualAlloc(NULL, SP_PAGE_SIZE, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE);
    rc = page ? 0 : sp_win_fail("VirtualAlloc(private page)");
    if (rc == 0) {
        memcpy(page, (const void *)(uintptr_t)(vi.addr + MARKER_GPA), SP_PAGE_SIZE);
        rc = sp_whp_vm_unmap(vm, MARKER_GPA, SP_PAGE_SIZE);
    }
    if (rc == 0)
        rc = sp_whp_vm_map(vm, (uint64_t)(uintptr_t)page, MARKER_GPA, SP_PAGE_SIZE,
                           SP_WHP_MAP_READ | SP_WHP_MAP_WRITE | SP_WHP_MAP_EXECUTE);
    if (rc == 0)
        rc = sp_whp_vcpu_run(vm, RUN_TIMEOUT_NS, 0, &ex, NULL, 0);
    if (check(rc == 0, "whp write exit served", "%s", rc ? last_failure() : "unmap one page, map its copy RWX"))
        check(ex.reason == SP_WHP_EXIT_HLT && page[0] == MARKER_AFTER && image[MARKER_GPA] == MARKER_BEFORE,
              "whp guest resumes at the store", "reason %u (HLT is %u), private copy %#04x (expected %#04x), "
              "snapshot %#04x (expected %#04x)", ex.reason, SP_WHP_EXIT_HLT, page[0], MARKER_AFTER,
              image[MARKER_GPA], MARKER_BEFORE);
done:
    sp_whp_vm_destroy(vm); /* before the pages it maps go */
    if (page)
        VirtualFree(page, 0, MEM_RELEASE);
    sp_view_close(view);
}

/* ---- copy-on-write at the second-level page tables (cow.c) ------------------------ */
struct cow_vm {
    struct sp_view *view;
    struct sp_cow *cow;
    struct sp_whp_vm *vm;
};

static int cow_memory_open(struct cow_vm *c, const wchar_t *path)
{
    int rc = sp_view_open(path, SP_VIEW_READONLY, IMAGE_OFFSET, IMAGE_SIZE, &c->view);
    return rc ? rc : sp_cow_open(c->view, &c->cow);
}

static int cow_partition_open(struct cow_vm *c)
{
    int rc = sp_whp_vm_create(&c->vm);
    if (rc == 0)
        rc = sp_whp_vm_map_cow(c->vm, c->cow, 0);
    if (rc == 0)
        rc = sp_whp_vcpu_set_real_mode(c->vm, 0, COW16_GPA, 0xFFF0);
    return rc;
}

static void cow_partition_close(struct cow_vm *c)
{
    sp_whp_vm_destroy(c->vm);
    c->vm = NULL;
}

static void cow_vm_close(struct cow_vm *c)
{
    cow_partition_close(c); /* the partition first: it maps the private pages and the view */
    sp_cow_close(c->cow);
    sp_view_close(c->view);
    c->cow = NULL;
    c->view = NULL;
}

static uint8_t cow_byte(struct cow_vm *c, uint64_t gpa)
{
    uint8_t b = 0;
    sp_cow_read(c->cow, gpa, &b, 1);
    return b;
}

static void check_cow_run(struct cow_vm *c, const char *who, int rc, const struct sp_whp_exit *ex,
                          const uint8_t *debug, const uint8_t *file)
{
    char name[96];
    struct sp_cow_info ci;
    snprintf(name, sizeof(name), "cow %s runs cow16", who);
    if (!check(rc == 0 && ex->reason == SP_WHP_EXIT_HLT, name, "%s; reason %u (HLT is %u), HRESULT 0x%08lx",
               rc ? last_failure() : "run returned", ex->reason, SP_WHP_EXIT_HLT, (unsigned long)ex->hresult))
        return;
    sp_cow_get_info(c->cow, &ci);
    snprintf(name, sizeof(name), "cow %s write faults", who);
    check(ex->cow_faults == 2 && ci.faults == 2 && ci.private_pages == 2, name,
          "%llu served in the run, %llu in all, %llu private pages (expected 2, 2, 2: pages 1 and 2, page 1 once)",
          (unsigned long long)ex->cow_faults, (unsigned long long)ci.faults, (unsigned long long)ci.private_pages);
    snprintf(name, sizeof(name), "cow %s guest reads its writes", who);
    check(ex->debug_len == 2 && debug[0] == 0x42 && debug[1] == 0x43, name,
          "%u debug bytes %#04x %#04x (expected 0x42 0x43, read back from GPA 0x1000 and 0x1001)", ex->debug_len,
          ex->debug_len > 0 ? debug[0] : 0, ex->debug_len > 1 ? debug[1] : 0);
    snprintf(name, sizeof(name), "cow %s memory holds its writes", who);
    check(cow_byte(c, 0x1000) == 0x42 && cow_byte(c, 0x1001) == 0x43 && cow_byte(c, 0x2000) == 0x44 &&
              sp_cow_page_is_private(c->cow, 0x1000) == 1 && sp_cow_page_is_private(c->cow, 0x2000) == 1 &&
              sp_cow_page_is_private(c->cow, COW16_GPA) == 0,
          name, "GPA 0x1000 %#04x, 0x1001 %#04x, 0x2000 %#04x (expected 0x42 0x43 0x44); pages 1, 2 private, "
          "the code page shared (%d %d %d, expected 1 1 0)", cow_byte(c, 0x1000), cow_byte(c, 0x1001),
          cow_byte(c, 0x2000), sp_cow_page_is_private(c->cow, 0x1000), sp_cow_page_is_private(c->cow, 0x2000),
          sp_cow_page_is_private(c->cow, COW16_GPA));
    struct sp_view_info vi;
    sp_view_get_info(c->view, &vi);
    const uint8_t *snap = (const uint8_t *)(uintptr_t)vi.addr;
    snprintf(name, sizeof(name), "cow %s snapshot view untouched", who);
    check(snap[0x1000] == MARKER_BEFORE && snap[0x2000] == file[IMAGE_OFFSET + 0x2000], name,
          "view GPA 0x1000 %#04x (expected %#04x), 0x2000 %#04x (expected %#04x)", snap[0x1000], MARKER_BEFORE,
          snap[0x2000], file[IMAGE_OFFSET + 0x2000]);
}

static void test_cow_refusals(const wchar_t *path)
{
    struct sp_view *copy = NULL;
    struct sp_cow *cow = NULL;
    int rc = sp_view_open(path, SP_VIEW_COPY, IMAGE_OFFSET, IMAGE_SIZE, &copy);
    if (rc == 0)
        rc = sp_cow_open(copy, &cow);
    check(rc != 0 && cow == NULL && sp_win_last_error() == ERROR_INVALID_PARAMETER, "cow load refuses a copy view",
          "%s", last_failure());
    sp_cow_close(cow);
    sp_view_close(copy);

    pfn_set_features set_features = stand_in_set_features();
    uint64_t features = raw_features();
    if (!set_features) {
        info("cow PartialUnmap", "this host reports WHV_CAPABILITY_FEATURES %#llx: PartialUnmap %s",
             (unsigned long long)features, features & SP_WHP_FEATURE_PARTIAL_UNMAP ? "1" : "0 (the cow load is refused)");
        return;
    }
    struct cow_vm c = {NULL, NULL, NULL};
    uint64_t before = set_features(features & ~(uint64_t)SP_WHP_FEATURE_PARTIAL_UNMAP);
    rc = cow_memory_open(&c, path);
    if (rc == 0)
        rc = cow_partition_open(&c);
    check(rc != 0 && sp_win_last_error() == ERROR_NOT_SUPPORTED && strstr(sp_win_last_op(), "PartialUnmap"),
          "cow load needs PartialUnmap", "%s", rc ? last_failure() : "the load was accepted");
    set_features(before);
    cow_vm_close(&c);
}

static void test_cow_load(const wchar_t *path, const uint8_t *file)
{
    struct cow_vm a = {NULL, NULL, NULL}, b = {NULL, NULL, NULL};
    struct sp_whp_exit ex;
    uint8_t debug[16];
    uint64_t commit0 = 0, commit1 = 0, commit2 = 0, commit3 = 0;

    test_cow_refusals(path);

    sp_win_private_usage(&commit0);
    int rc = cow_memory_open(&a, path);
    sp_win_private_usage(&commit1); /* around the read-only view and the reservation alone */
    if (rc == 0)
        rc = cow_partition_open(&a);
    sp_win_private_usage(&commit2);
    if (rc == 0)
        rc = sp_whp_vcpu_run(a.vm, RUN_TIMEOUT_NS, 0, &ex, debug, sizeof(debug));
    sp_win_private_usage(&commit3); /* around the run: the private copies */
    check_cow_run(&a, "A", rc, &ex, debug, file);
    /* One partition with mapped memory per process: A's goes, A's memory (view + private pages) stays. */
    cow_partition_close(&a);

    rc = cow_memory_open(&b, path);
    if (rc == 0)
        check(cow_byte(&b, 0x1000) == MARKER_BEFORE, "cow VMs isolated", "B's GPA 0x1000 before B runs: %#04x "
              "(expected %#04x, A's write unseen)", cow_byte(&b, 0x1000), MARKER_BEFORE);
    if (rc == 0)
        rc = cow_partition_open(&b);
    if (rc == 0)
        rc = sp_whp_vcpu_run(b.vm, RUN_TIMEOUT_NS, 0, &ex, debug, sizeof(debug));
    check_cow_run(&b, "B", rc, &ex, debug, file);
    if (a.cow && b.cow) {
        struct sp_cow_info ai, bi;
        sp_cow_get_info(a.cow, &ai);
        sp_cow_get_info(b.cow, &bi);
        check(cow_byte(&a, 0x1000) == 0x42 && ai.private_base != bi.private_base, "cow VMs isolated both ways",
              "A's GPA 0x1000 %#04x after B ran (expected 0x42); private pages at %#llx and %#llx (distinct)",
              cow_byte(&a, 0x1000), (unsigned long long)ai.private_base, (unsigned long long)bi.private_base);
        info("cow density", "%llu private pages (%llu KiB) per VM for a %u KiB snapshot (%.2f%% of it); PrivateUsage "
             "%+lld KiB around the read-only view, %+lld KiB around the run; %s",
             (unsigned long long)ai.private_pages, (unsigned long long)ai.private_pages * SP_PAGE_SIZE / 1024,
             IMAGE_SIZE / 1024, 100.0 * (double)(ai.private_pages * SP_PAGE_SIZE) / IMAGE_SIZE,
             ((long long)commit1 - (long long)commit0) / 1024, ((long long)commit3 - (long long)commit2) / 1024,
             under_wine() ? "wine does not account commit" : "a FILE_MAP_COPY view charges its whole size");
    }
    cow_vm_close(&b);
    cow_vm_close(&a);
    file_unchanged(path, file, "file unchanged by the cow loads", "after both VMs' writes");
}

/* ---- the read-only load, in a child ------------------------------------------------ */
static void test_whp_readonly_control(const wchar_t *path, const uint8_t *file)
{
    DWORD code = 0;
    if (!run_child(L"--guest-write-child", path, &code)) {
        check(0, "whp read-only load fails like the original bug", "running the child failed: Win32 error %lu",
              GetLastError());
        return;
    }
    int failed_like_the_bug =
        code == (DWORD)EXCEPTION_ACCESS_VIOLATION || code == CHILD_MEMORY_ACCESS_EXIT || code == CHILD_RUN_FAILED;
    check(failed_like_the_bug, "whp read-only load fails like the original bug",
          "%s (child exit status %#lx); any of an access violation, a write memory-access exit or a failed run call "
          "is the guest's store failing", child_outcome_name(code), (unsigned long)code);
    if (stand_in)
        check(code == CHILD_MEMORY_ACCESS_EXIT, "stand-in models the read-only store as a write exit",
              "%s (child exit status %#lx; expected %u)", child_outcome_name(code), (unsigned long)code,
              CHILD_MEMORY_ACCESS_EXIT);
    file_unchanged(path, file, "file unchanged by the read-only load", "after the child's guest wrote");
}

static int probe_main(int expected)
{
    /* ci.sh runs this with stand-in WinHvPlatform.dll files (fake_whp.c) to reach every branch */
    int probe = sp_whp_probe();
    const char *reason = sp_whp_absent_reason();
    printf("whp-absent-reason: %s\n", reason ? reason : "(none: WHP is present)");
    check(probe == expected, "whp probe result", "%d %s (expected %d %s)", probe, PROBE_NAME(probe), expected,
          PROBE_NAME(expected));
    if (reason) {
        check(probe_matches(probe, reason), "whp absent reason", "the text of the template for %s", PROBE_NAME(probe));
        if (probe == SP_WHP_NO_EXPORT)
            check(strstr(reason, "WHvCreatePartition") != NULL, "whp absent reason names the export",
                  "the first one missing from the stand-in DLL is WHvCreatePartition");
        if (probe >= SP_WHP_CAPABILITY_FAILED && probe != SP_WHP_NOT_PRESENT) {
            char hr[16];
            snprintf(hr, sizeof(hr), "0x%08lx", (unsigned long)sp_whp_probe_hresult());
            check(sp_whp_probe_hresult() != 0 && strstr(reason, hr) && strstr(reason, sp_whp_hresult_name(
                  (HRESULT)sp_whp_probe_hresult())), "whp absent reason names the HRESULT", "%s, %s", hr,
                  sp_whp_hresult_name((HRESULT)sp_whp_probe_hresult()));
        }
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
        HMODULE dll = GetModuleHandleW(SP_WIDEN(SP_WHP_DLL_NAME));
        stand_in = dll && GetProcAddress(dll, "SnapproofFakeWhpMode");
        if (stand_in)
            info("whp", "a stand-in WinHvPlatform.dll (native/windows/fake_whp.c), not a hypervisor: these "
                 "checks exercise whp_vm.c and cow.c against the rules it models, not WHP");
        /* Each of these makes its partitions one after another and deletes them: one mapped at a time. */
        test_whp_rules();
        test_whp_run(path, file);
        test_whp_run_loop(path);
        test_whp_write_exit(path);
        test_cow_load(path, file);
        test_whp_readonly_control(path, file);
    }

    free(file);
    BOOL deleted = DeleteFileW(path);
    unsigned long delete_error = deleted ? 0ul : GetLastError();
    check(deleted != 0, "temp file removed", "every view closed, so the file can go (DeleteFileW returned %d, "
          "Win32 error %lu)", deleted, delete_error);
    printf("selftest: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
