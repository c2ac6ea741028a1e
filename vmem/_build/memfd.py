"""memfd_create(2): the guest's RAM is an anonymous shmem file."""

INCLUDES = """
#include <sys/mman.h>
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
"""
