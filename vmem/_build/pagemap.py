"""ioctl(PAGEMAP_SCAN) on /proc/<pid>/pagemap (Linux >= 6.7).

With ``PM_SCAN_WP_MATCHING`` the kernel reports the pages that match the category filter
and write-protects them again in the same page-table walk: for memory registered with
userfaultfd async write-protect this is "collect dirty pages and re-arm" in one ioctl, run
from outside the tracked process.

Layout (include/uapi/linux/fs.h), declared here because Debian's headers predate it::

    struct pm_scan_arg {            /* 12 x u64 = 96 bytes */
        u64 size;                   /* sizeof(struct pm_scan_arg) */
        u64 flags;                  /* PM_SCAN_* */
        u64 start, end;             /* [start, end) virtual addresses in the target */
        u64 walk_end;               /* out: where the walk stopped (== end when complete) */
        u64 vec, vec_len;           /* out array of struct page_region and its capacity */
        u64 max_pages;              /* stop after this many matching pages (0: no limit) */
        u64 category_inverted;      /* PAGE_IS_* that match when *clear* */
        u64 category_mask;          /* every one of these must match */
        u64 category_anyof_mask;    /* at least one of these must match */
        u64 return_mask;            /* PAGE_IS_* reported in page_region.categories */
    };
    struct page_region { u64 start, end, categories; };   /* 24 bytes, end exclusive */
"""

INCLUDES = """
#include <linux/fs.h>
"""

TYPES = """
#define PM_SCAN_WP_MATCHING ...
#define PM_SCAN_CHECK_WPASYNC ...

#define PAGE_IS_WPALLOWED ...
#define PAGE_IS_WRITTEN ...
#define PAGE_IS_FILE ...
#define PAGE_IS_PRESENT ...
#define PAGE_IS_SWAPPED ...
#define PAGE_IS_PFNZERO ...
#define PAGE_IS_HUGE ...
#define PAGE_IS_SOFT_DIRTY ...
#define PAGE_IS_GUARD ...

/* Bytes of one struct page_region. */
#define VMEM_PAGE_REGION_SIZE ...

/* 1 if the build headers already declared PAGEMAP_SCAN (informational). */
static const int HEADERS_HAVE_PAGEMAP_SCAN;
"""

FUNCTIONS = """
int64_t vmem_pagemap_scan(int fd, uint64_t start, uint64_t end, uint64_t flags,
                          uint64_t category_inverted, uint64_t category_mask,
                          uint64_t category_anyof_mask, uint64_t return_mask,
                          uint64_t max_pages, uint64_t *vec, uint64_t vec_len,
                          uint64_t *walk_end);
"""

CUSTOMIZATIONS = r"""
#ifdef PAGEMAP_SCAN
static const int HEADERS_HAVE_PAGEMAP_SCAN = 1;
#else
static const int HEADERS_HAVE_PAGEMAP_SCAN = 0;
struct page_region {
    __u64 start;
    __u64 end;
    __u64 categories;
};
struct pm_scan_arg {
    __u64 size;
    __u64 flags;
    __u64 start;
    __u64 end;
    __u64 walk_end;
    __u64 vec;
    __u64 vec_len;
    __u64 max_pages;
    __u64 category_inverted;
    __u64 category_mask;
    __u64 category_anyof_mask;
    __u64 return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

#ifndef PM_SCAN_WP_MATCHING
#define PM_SCAN_WP_MATCHING (1 << 0)
#endif
#ifndef PM_SCAN_CHECK_WPASYNC
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#endif
#ifndef PAGE_IS_WPALLOWED
#define PAGE_IS_WPALLOWED (1 << 0)
#endif
#ifndef PAGE_IS_WRITTEN
#define PAGE_IS_WRITTEN (1 << 1)
#endif
#ifndef PAGE_IS_FILE
#define PAGE_IS_FILE (1 << 2)
#endif
#ifndef PAGE_IS_PRESENT
#define PAGE_IS_PRESENT (1 << 3)
#endif
#ifndef PAGE_IS_SWAPPED
#define PAGE_IS_SWAPPED (1 << 4)
#endif
#ifndef PAGE_IS_PFNZERO
#define PAGE_IS_PFNZERO (1 << 5)
#endif
#ifndef PAGE_IS_HUGE
#define PAGE_IS_HUGE (1 << 6)
#endif
#ifndef PAGE_IS_SOFT_DIRTY
#define PAGE_IS_SOFT_DIRTY (1 << 7)
#endif
#ifndef PAGE_IS_GUARD
#define PAGE_IS_GUARD (1 << 8)
#endif

#define VMEM_PAGE_REGION_SIZE 24
_Static_assert(sizeof(struct pm_scan_arg) == 96, "pm_scan_arg layout");
_Static_assert(sizeof(struct page_region) == VMEM_PAGE_REGION_SIZE, "page_region layout");
_Static_assert(PAGEMAP_SCAN == 0xc0606610UL, "PAGEMAP_SCAN number");

/* One PAGEMAP_SCAN call.  Returns the number of regions written to vec (each 3 x u64),
   or -errno; *walk_end receives where the walk stopped. */
static int64_t vmem_pagemap_scan(int fd, uint64_t start, uint64_t end, uint64_t flags,
                                 uint64_t category_inverted, uint64_t category_mask,
                                 uint64_t category_anyof_mask, uint64_t return_mask,
                                 uint64_t max_pages, uint64_t *vec, uint64_t vec_len,
                                 uint64_t *walk_end)
{
    struct pm_scan_arg arg;
    memset(&arg, 0, sizeof arg);
    arg.size = sizeof arg;
    arg.flags = flags;
    arg.start = start;
    arg.end = end;
    arg.vec = (uint64_t)(uintptr_t)vec;
    arg.vec_len = vec_len;
    arg.max_pages = max_pages;
    arg.category_inverted = category_inverted;
    arg.category_mask = category_mask;
    arg.category_anyof_mask = category_anyof_mask;
    arg.return_mask = return_mask;
    long n = ioctl(fd, PAGEMAP_SCAN, &arg);
    if (n < 0)
        return -errno;
    *walk_end = arg.walk_end;
    return n;
}
"""
