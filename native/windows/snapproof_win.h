/*
 * snapproof native layer, Windows: the contract between C and Python.
 *
 * native/_windows_build.py feeds the lines between the CDEF markers to
 * cffi's cdef(), so this file is the one place the interface is declared.
 * Keep that part plain C declarations (no #if, no macros with arguments).
 * The WHP types (winhvplatformdefs.h) stay inside the .c files: Python only
 * sees snapproof's own structs, whose layout this header fixes.
 *
 * Conventions: functions return 0 on success and -1 on failure; after a
 * failure sp_win_last_op() names the call that failed on this thread and
 * sp_win_last_error() gives its Win32 error (GetLastError) or, when
 * sp_win_last_is_hresult() is 1, its HRESULT.
 */
#ifndef SNAPPROOF_WIN_H
#define SNAPPROOF_WIN_H
#include <stddef.h>
#include <stdint.h>
#include <wchar.h>

/*
 * Why WHP cannot be used, as printf formats: the only copy of these texts.
 * sp_whp_absent_reason() fills them in; the Python layer returns that string
 * unchanged (native.whp.whp_absent_reason), so the C self-test and a pytest
 * skip say the same thing. Each names the capability and how it was probed.
 */
#define SP_WHP_DLL_NAME "WinHvPlatform.dll"
/* The wide form of a narrow literal, by token pasting: MSVC's C compiler will not concatenate L"" with "...". */
#define SP_WIDEN_(s) L##s
#define SP_WIDEN(s) SP_WIDEN_(s)

/* What to do about each way the probe can fail: the %s after the HRESULT's name. */
#define SP_WHP_FIX_LAUNCH_HYPERVISOR                                                           \
    "the hypervisor is not running: enable virtualization (VT-x/AMD-V) in firmware, run "     \
    "`bcdedit /set hypervisorlaunchtype auto` as administrator, then reboot"
#define SP_WHP_FIX_TOKEN                                                                       \
    "this process may not create partitions (a restricted token, an AppContainer or a "       \
    "sandbox): run the suite from an unrestricted token"
#define SP_WHP_FIX_HYPERVISOR_CONFIG                                                           \
    "the hypervisor cannot host a partition here (WHP needs a processor with unrestricted "    \
    "guest and SLAT, EPT or NPT; inside a VM, nested virtualization must be exposed to it)"
#define SP_WHP_FIX_PLATFORM                                                                    \
    "enable the Windows optional feature \"Windows Hypervisor Platform\" (HypervisorPlatform), " \
    "check that `bcdedit` shows hypervisorlaunchtype Auto and that virtualization is enabled " \
    "in firmware, then reboot"

#define SP_WHP_ABSENT_NO_DLL                                                                   \
    "WHP absent: LoadLibraryExW(\"WinHvPlatform.dll\", LOAD_LIBRARY_SEARCH_SYSTEM32) failed with " \
    "Win32 error %lu; enable the Windows optional feature \"Windows Hypervisor Platform\" "        \
    "(HypervisorPlatform) and reboot"
#define SP_WHP_ABSENT_NO_EXPORT                                                                \
    "WHP absent: WinHvPlatform.dll has no export %s (GetProcAddress failed with Win32 error " \
    "%lu); this Windows build predates the WHP API snapproof uses"
#define SP_WHP_ABSENT_CAPABILITY_FAILED                                                        \
    "WHP absent: WHvGetCapability(WHvCapabilityCodeHypervisorPresent) failed with HRESULT "    \
    "0x%08lx (%s); %s"
#define SP_WHP_ABSENT_NOT_PRESENT                                                              \
    "WHP absent: WHvGetCapability(WHvCapabilityCodeHypervisorPresent) = FALSE; %s"
/* HypervisorPresent can be TRUE while no partition can be made: the probe makes one to know. */
#define SP_WHP_ABSENT_CREATE_FAILED                                                            \
    "WHP absent: the probe's throwaway partition: WHvCreatePartition failed with HRESULT "     \
    "0x%08lx (%s); %s"
#define SP_WHP_ABSENT_PROPERTY_FAILED                                                          \
    "WHP absent: the probe's throwaway partition: WHvSetPartitionProperty("                   \
    "WHvPartitionPropertyCodeProcessorCount = 1) failed with HRESULT 0x%08lx (%s); %s"
#define SP_WHP_ABSENT_SETUP_FAILED                                                             \
    "WHP absent: the probe's throwaway partition: WHvSetupPartition failed with HRESULT "      \
    "0x%08lx (%s); %s"

/* CDEF-BEGIN */
const char *sp_win_last_op(void);
uint32_t sp_win_last_error(void);
int sp_win_last_is_hresult(void);
int64_t sp_win_now_ns(void);
uint32_t sp_win_page_size(void);
uint32_t sp_win_allocation_granularity(void);
int sp_win_private_usage(uint64_t *out);
void sp_win_quiet_crashes(void);

/* ---- WHP presence ------------------------------------------------- */
enum sp_whp_probe {
    SP_WHP_PRESENT = 0,
    SP_WHP_NO_DLL = 1,            /* LoadLibraryW(WinHvPlatform.dll) failed */
    SP_WHP_NO_EXPORT = 2,         /* a function snapproof calls is missing */
    SP_WHP_CAPABILITY_FAILED = 3, /* WHvGetCapability(HypervisorPresent) failed */
    SP_WHP_NOT_PRESENT = 4,       /* ... and said FALSE */
    SP_WHP_CREATE_FAILED = 5,     /* the probe's throwaway partition: WHvCreatePartition failed */
    SP_WHP_PROPERTY_FAILED = 6,   /* ... WHvSetPartitionProperty(ProcessorCount = 1) failed */
    SP_WHP_SETUP_FAILED = 7       /* ... WHvSetupPartition failed */
};
int sp_whp_probe(void);
const char *sp_whp_absent_reason(void);
uint32_t sp_whp_probe_hresult(void);   /* the failing probe call's HRESULT; 0 when none failed */

/* WHV_CAPABILITY_FEATURES (WHvCapabilityCodeFeatures): the bits snapproof depends on. */
enum sp_whp_feature {
    SP_WHP_FEATURE_PARTIAL_UNMAP = 1   /* WHvUnmapGpaRange may unmap part of a mapped range */
};
int sp_whp_features(uint64_t *out);

/* ---- views of a file (the snapshot's memory image) ------------------ */
enum sp_view_mode {
    SP_VIEW_COPY = 1,     /* CreateFileMapping(PAGE_WRITECOPY) + MapViewOfFile(FILE_MAP_COPY) */
    SP_VIEW_READONLY = 2  /* CreateFileMapping(PAGE_READONLY) + MapViewOfFile(FILE_MAP_READ): the original bug */
};

struct sp_view_info {
    uint64_t addr;        /* host address of file byte `offset`: page aligned */
    uint64_t size;        /* bytes from addr */
    uint64_t base;        /* what MapViewOfFile returned (granularity-aligned file offset) */
    uint64_t map_offset;  /* file offset mapped at base */
    uint64_t view_size;   /* bytes mapped at base */
    uint32_t mode;        /* enum sp_view_mode */
    uint32_t pad;
};

struct sp_view;

int sp_view_open(const wchar_t *path, uint32_t mode, uint64_t offset, uint64_t size, struct sp_view **out);
void sp_view_close(struct sp_view *v);
void sp_view_get_info(struct sp_view *v, struct sp_view_info *out);
int sp_view_page_protection(struct sp_view *v, uint64_t offset, uint32_t *protect);

/* ---- a WHP partition with one vCPU ----------------------------------- */
enum sp_whp_exit_reason {
    SP_WHP_EXIT_HLT = 1,           /* the guest executed hlt: done */
    SP_WHP_EXIT_SYNC = 2,          /* a write to the sync port (only with SP_WHP_RUN_STOP_ON_SYNC) */
    SP_WHP_EXIT_CANCELED = 3,      /* sp_whp_vcpu_cancel() asked the vCPU to stop */
    SP_WHP_EXIT_TIMEOUT = 4,       /* the run's deadline passed (the watchdog cancelled it) */
    SP_WHP_EXIT_IO = 5,            /* port I/O the loop does not own (RIP already advanced) */
    SP_WHP_EXIT_MEMORY_ACCESS = 6, /* WHvRunVpExitReasonMemoryAccess: see mem_* */
    SP_WHP_EXIT_OTHER = 10,        /* any other WHP exit reason (see whv_exit_reason) */
    SP_WHP_EXIT_ERROR = 11         /* WHvRunVirtualProcessor or a register call failed (see hresult) */
};

enum sp_whp_map_flags {
    SP_WHP_MAP_READ = 1,
    SP_WHP_MAP_WRITE = 2,
    SP_WHP_MAP_EXECUTE = 4
};

enum sp_whp_run_flags {
    SP_WHP_RUN_STOP_ON_SYNC = 1
};

struct sp_whp_exit {
    uint32_t reason;            /* enum sp_whp_exit_reason */
    uint32_t whv_exit_reason;   /* raw WHV_RUN_VP_EXIT_CONTEXT.ExitReason of the last exit */
    uint32_t hresult;           /* for SP_WHP_EXIT_ERROR */
    uint16_t io_port;
    uint8_t io_size;
    uint8_t io_is_out;
    uint32_t io_value;
    uint32_t io_is_string;      /* ins/outs or rep: not emulated, RIP not advanced */
    uint64_t mem_gpa;
    uint64_t mem_gva;
    uint32_t mem_access_type;   /* WHV_MEMORY_ACCESS_TYPE: 0 read, 1 write, 2 execute */
    uint32_t mem_gpa_unmapped;
    uint64_t rip;               /* guest RIP at the last exit */
    uint64_t sync_count;        /* sync-port writes seen during this call */
    uint32_t last_sync;         /* value of the last one */
    uint32_t debug_len;         /* bytes written to the debug buffer */
    uint64_t run_ns;            /* wall time of this call */
    uint64_t whv_runs;          /* WHvRunVirtualProcessor calls made by this call */
    uint64_t cow_faults;        /* write exits served by copying a page (memory from sp_cow) */
    uint64_t cow_ns;            /* wall time spent serving them */
};

struct sp_whp_vm;

int sp_whp_vm_create(struct sp_whp_vm **out);
void sp_whp_vm_destroy(struct sp_whp_vm *vm);
int sp_whp_vm_map(struct sp_whp_vm *vm, uint64_t hva, uint64_t gpa, uint64_t size, uint32_t flags);
int sp_whp_vm_unmap(struct sp_whp_vm *vm, uint64_t gpa, uint64_t size);
int sp_whp_vcpu_set_real_mode(struct sp_whp_vm *vm, uint16_t cs, uint16_t ip, uint16_t sp);
int sp_whp_vcpu_run(struct sp_whp_vm *vm, int64_t timeout_ns, uint32_t flags, struct sp_whp_exit *out,
                    uint8_t *debug_buf, uint32_t debug_cap);
int sp_whp_vcpu_cancel(struct sp_whp_vm *vm);
int sp_whp_vcpu_get_regs(struct sp_whp_vm *vm, uint64_t *out18);

/* ---- copy-on-write at the second-level page tables (hypervisor level) ----
 * The snapshot stays a PAGE_READONLY view, mapped Read|Execute; the guest's
 * first write to a page exits, and the run loop copies that page into private
 * memory (committed one page at a time inside a reservation of the memory's
 * size), unmaps the page and maps the private copy Read|Write|Execute at the
 * same GPA, and resumes the guest at the store. Needs SP_WHP_FEATURE_PARTIAL_UNMAP. */
struct sp_cow_info {
    uint64_t size;            /* bytes of guest memory */
    uint64_t gpa;             /* where it is mapped (valid while attached) */
    uint64_t private_pages;   /* pages copied into private memory so far */
    uint64_t faults;          /* write exits served */
    uint64_t fault_ns;        /* wall time serving them */
    uint64_t private_base;    /* host address of the private reservation */
    uint32_t attached;        /* mapped into a partition now */
    uint32_t pad;
};

struct sp_cow;

int sp_cow_open(struct sp_view *snapshot, struct sp_cow **out);
void sp_cow_close(struct sp_cow *cow);
void sp_cow_get_info(struct sp_cow *cow, struct sp_cow_info *out);
int sp_cow_read(struct sp_cow *cow, uint64_t offset, uint8_t *buf, uint64_t n);
int sp_cow_page_is_private(struct sp_cow *cow, uint64_t offset);
int sp_whp_vm_map_cow(struct sp_whp_vm *vm, struct sp_cow *cow, uint64_t gpa);
/* CDEF-END */

/* ---- private to the .c files ---------------------------------------- */
int sp_win_fail(const char *op);                   /* records GetLastError(), returns -1 */
int sp_win_fail_code(const char *op, uint32_t win32_error);
int sp_win_fail_hr(const char *op, long hresult);  /* records an HRESULT, returns -1 */

/* Between whp_vm.c's run loop and cow.c. */
int sp_whp_vm_set_cow(struct sp_whp_vm *vm, struct sp_cow *cow);   /* NULL detaches */
int sp_cow_serve_write(struct sp_cow *cow, struct sp_whp_vm *vm, uint64_t gpa); /* 1 served, 0 not its page, -1 failed */
void sp_cow_detached(struct sp_cow *cow);                           /* its partition is being deleted */

#if defined(__GNUC__) || (defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L)
#define SP_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#else
/* MSVC in its default C mode has no _Static_assert: a negative array size fails just as surely. */
#define SP_STATIC_ASSERT_JOIN2(a, b) a##b
#define SP_STATIC_ASSERT_JOIN(a, b) SP_STATIC_ASSERT_JOIN2(a, b)
#define SP_STATIC_ASSERT(cond, msg) typedef char SP_STATIC_ASSERT_JOIN(sp_static_assert_, __LINE__)[(cond) ? 1 : -1]
#endif

#endif
