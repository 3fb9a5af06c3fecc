"""userfaultfd facts: feature bits by name (from the kernel UAPI, not the build host's headers)."""

from __future__ import annotations

# include/uapi/linux/userfaultfd.h. forkd asked for 1 << 9 (MINOR_HUGETLBFS) meaning
# WP_HUGETLBFS_SHMEM (1 << 12): the names live here once, next to their values.
FEATURES: dict[str, int] = {
    "PAGEFAULT_FLAG_WP": 1 << 0,
    "EVENT_FORK": 1 << 1,
    "EVENT_REMAP": 1 << 2,
    "EVENT_REMOVE": 1 << 3,
    "MISSING_HUGETLBFS": 1 << 4,
    "MISSING_SHMEM": 1 << 5,
    "EVENT_UNMAP": 1 << 6,
    "SIGBUS": 1 << 7,
    "THREAD_ID": 1 << 8,
    "MINOR_HUGETLBFS": 1 << 9,
    "MINOR_SHMEM": 1 << 10,
    "EXACT_ADDRESS": 1 << 11,
    "WP_HUGETLBFS_SHMEM": 1 << 12,
    "WP_UNPOPULATED": 1 << 13,
    "POISON": 1 << 14,
    "WP_ASYNC": 1 << 15,
    "MOVE": 1 << 16,
}
# The kernel version that introduced each feature the phases rely on (for hints).
SINCE = {"WP_HUGETLBFS_SHMEM": "5.19", "WP_UNPOPULATED": "6.4", "WP_ASYNC": "6.7", "MOVE": "6.8",
         "PAGEFAULT_FLAG_WP": "5.7", "THREAD_ID": "4.14", "MISSING_SHMEM": "4.11"}

PAGEFAULT_FLAG_WRITE = 1 << 0
PAGEFAULT_FLAG_WP = 1 << 1
PAGEFAULT_FLAG_MINOR = 1 << 2

REGISTER_MODE_MISSING = 1 << 0
REGISTER_MODE_WP = 1 << 1


def feature_names(mask: int) -> list[str]:
    return [name for name, bit in FEATURES.items() if mask & bit]


def mask_of(*names: str) -> int:
    m = 0
    for n in names:
        m |= FEATURES[n]
    return m
