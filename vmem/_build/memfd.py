"""memfd_create(2): the guest's RAM is an anonymous shmem file."""

INCLUDES = """
#include <sys/mman.h>
#include <unistd.h>
"""

TYPES = """
#define MFD_CLOEXEC ...
#define MFD_ALLOW_SEALING ...
#define MFD_HUGETLB ...

/* 1 if the C library declares memfd_create(3) (glibc >= 2.27); else the raw syscall is used. */
static const int HAS_MEMFD_CREATE;
"""

FUNCTIONS = """
int vmem_memfd_create(const char *name, unsigned int flags);
int64_t vmem_pwrite_pages(int fd, const uint8_t *buf, const int64_t *pages, size_t n, uint64_t page_size);
"""

CUSTOMIZATIONS = """
#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif
#ifndef MFD_ALLOW_SEALING
#define MFD_ALLOW_SEALING 0x0002U
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif

#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 27))
static const int HAS_MEMFD_CREATE = 1;
#else
static const int HAS_MEMFD_CREATE = 0;
#endif

static int vmem_memfd_create(const char *name, unsigned int flags)
{
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 27))
    int fd = memfd_create(name, flags);
#elif defined(SYS_memfd_create)
    int fd = (int)syscall(SYS_memfd_create, name, flags);
#else
    int fd = -1; errno = ENOSYS;
#endif
    return fd < 0 ? -errno : fd;
}

/* Write n pages held back to back in buf to the file positions pages[i] * page_size.
 * Consecutive page numbers are coalesced into one pwrite per run; short writes are
 * resumed and EINTR retried.  Returns bytes written, or -errno (some pages may then have
 * been written).  Writing with pwrite rather than through a mapping allocates shmem pages
 * without page faults and leaves nothing mapped in the caller. */
static int64_t vmem_pwrite_pages(int fd, const uint8_t *buf, const int64_t *pages, size_t n, uint64_t page_size)
{
    size_t i = 0;
    int64_t total = 0;
    while (i < n) {
        size_t j = i + 1;
        while (j < n && pages[j] == pages[j - 1] + 1)
            j++;
        size_t len = (j - i) * page_size;
        int rc = vmem_pwrite_all(fd, buf + i * page_size, len, (off_t)pages[i] * (off_t)page_size);
        if (rc < 0)
            return rc;
        total += (int64_t)len;
        i = j;
    }
    return total;
}
"""
