/*
 * Private to the C files of native/windows: the WinHvPlatform.dll entry points
 * snapproof calls (as function-pointer types, because the DLL is loaded at run
 * time, never linked) and the HRESULTs the WHP layer names.
 *
 * whp_vm.c resolves these once for the extension; selftest.c resolves the same
 * list again for its raw rule checks, which call WHP directly so that a refusal
 * is WHP's (or the stand-in's), not a check of our own wrapper.
 */
#ifndef SNAPPROOF_WHP_API_H
#define SNAPPROOF_WHP_API_H

#include "internal.h"

#include <winhvplatform.h>

typedef HRESULT(WINAPI *pfn_WHvGetCapability)(WHV_CAPABILITY_CODE, VOID *, UINT32, UINT32 *);
typedef HRESULT(WINAPI *pfn_WHvCreatePartition)(WHV_PARTITION_HANDLE *);
typedef HRESULT(WINAPI *pfn_WHvSetupPartition)(WHV_PARTITION_HANDLE);
typedef HRESULT(WINAPI *pfn_WHvDeletePartition)(WHV_PARTITION_HANDLE);
typedef HRESULT(WINAPI *pfn_WHvSetPartitionProperty)(WHV_PARTITION_HANDLE, WHV_PARTITION_PROPERTY_CODE,
                                                     const VOID *, UINT32);
typedef HRESULT(WINAPI *pfn_WHvMapGpaRange)(WHV_PARTITION_HANDLE, VOID *, WHV_GUEST_PHYSICAL_ADDRESS, UINT64,
                                            WHV_MAP_GPA_RANGE_FLAGS);
typedef HRESULT(WINAPI *pfn_WHvUnmapGpaRange)(WHV_PARTITION_HANDLE, WHV_GUEST_PHYSICAL_ADDRESS, UINT64);
typedef HRESULT(WINAPI *pfn_WHvCreateVirtualProcessor)(WHV_PARTITION_HANDLE, UINT32, UINT32);
typedef HRESULT(WINAPI *pfn_WHvDeleteVirtualProcessor)(WHV_PARTITION_HANDLE, UINT32);
typedef HRESULT(WINAPI *pfn_WHvRunVirtualProcessor)(WHV_PARTITION_HANDLE, UINT32, VOID *, UINT32);
typedef HRESULT(WINAPI *pfn_WHvCancelRunVirtualProcessor)(WHV_PARTITION_HANDLE, UINT32, UINT32);
typedef HRESULT(WINAPI *pfn_WHvGetVirtualProcessorRegisters)(WHV_PARTITION_HANDLE, UINT32, const WHV_REGISTER_NAME *,
                                                             UINT32, WHV_REGISTER_VALUE *);
typedef HRESULT(WINAPI *pfn_WHvSetVirtualProcessorRegisters)(WHV_PARTITION_HANDLE, UINT32, const WHV_REGISTER_NAME *,
                                                             UINT32, const WHV_REGISTER_VALUE *);

/* Every export snapproof calls; the probe requires all of them, in this order. */
#define SP_WHP_FUNCS(X)                  \
    X(WHvGetCapability)                  \
    X(WHvCreatePartition)                \
    X(WHvSetupPartition)                 \
    X(WHvDeletePartition)                \
    X(WHvSetPartitionProperty)           \
    X(WHvMapGpaRange)                    \
    X(WHvUnmapGpaRange)                  \
    X(WHvCreateVirtualProcessor)         \
    X(WHvDeleteVirtualProcessor)         \
    X(WHvRunVirtualProcessor)            \
    X(WHvCancelRunVirtualProcessor)      \
    X(WHvGetVirtualProcessorRegisters)   \
    X(WHvSetVirtualProcessorRegisters)

struct sp_whp_api {
    HMODULE dll;
#define SP_WHP_API_FIELD(name) pfn_##name name;
    SP_WHP_FUNCS(SP_WHP_API_FIELD)
#undef SP_WHP_API_FIELD
};

/*
 * HRESULTs with a meaning snapproof acts on. mingw-w64's winerror.h lacks the
 * WHV_E_* and VID/HV ones, so they are spelled out here with the Windows SDK's
 * values (shared/winerror.h); the names are the SDK's.
 */
#define SP_HR_WHV_E_UNKNOWN_CAPABILITY ((HRESULT)0x80370300L)
#define SP_HR_WHV_E_INSUFFICIENT_BUFFER ((HRESULT)0x80370301L)
#define SP_HR_WHV_E_UNKNOWN_PROPERTY ((HRESULT)0x80370302L)
#define SP_HR_WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG ((HRESULT)0x80370303L)
#define SP_HR_WHV_E_INVALID_PARTITION_CONFIG ((HRESULT)0x80370304L)
#define SP_HR_WHV_E_GPA_RANGE_NOT_FOUND ((HRESULT)0x80370305L)
#define SP_HR_WHV_E_VP_ALREADY_EXISTS ((HRESULT)0x80370306L)
#define SP_HR_WHV_E_VP_DOES_NOT_EXIST ((HRESULT)0x80370307L)
#define SP_HR_ERROR_HV_NOT_PRESENT ((HRESULT)0xC0351000L)
/* A second partition of one process mapping memory while the first still exists (hyperlight's
   surrogate-process notes; measured by rusty_box's a_process_holds_one_partition_at_a_time). */
#define SP_HR_ERROR_VID_PARTITION_ALREADY_EXISTS ((HRESULT)0xC0370008L)

/* The SDK name of an HRESULT snapproof knows, or "unrecognised". */
const char *sp_whp_hresult_name(HRESULT hr);

#endif
