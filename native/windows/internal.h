/*
 * Private to the C files of native/windows: the Windows headers with the settings all
 * files share, so each .c sees the same declarations.
 */
#ifndef SNAPPROOF_WIN_INTERNAL_H
#define SNAPPROOF_WIN_INTERNAL_H

/* Windows 10: WHP exists only there, and GetErrorMode/LOAD_LIBRARY_SEARCH_SYSTEM32 need >= Vista/8. */
#ifndef _WIN32_WINNT
#define _WIN32_WINNT 0x0A00
#endif
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#ifndef NOMINMAX
#define NOMINMAX
#endif
#include <windows.h>

#include "snapproof_win.h"

#if defined(_MSC_VER)
#define SP_THREAD_LOCAL __declspec(thread)
#else
#define SP_THREAD_LOCAL __thread
#endif

#define SP_PAGE_SIZE 4096u

#endif
