"""The shared fragment: headers, the page size, and every helper more than one fragment uses.

Every C function in the extension follows one convention: it returns a non-negative
value on success and ``-errno`` on failure (never relies on the caller reading ``errno``
after the call), so ``vmem._native`` can translate every return code in one place.

build_native.py emits this fragment first; what one fragment uses of another is declared
here (the I/O helpers are defined here; ``vmem_uffd_fill``, ``vmem_digest_bytes`` and
transport's ``transport_gmac_*`` are only declared, and defined in their own fragment), so
the other fragments may come in any order.
"""

INCLUDES = """
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <linux/types.h>
"""

TYPES = """
/* The page size the whole extension assumes (x86-64, shmem/memfd without huge pages);
   vmem._native refuses to load if it differs from vmem.pages.PAGE_SIZE. */
#define VMEM_PAGE_SIZE ...
"""

FUNCTIONS = ""

CUSTOMIZATIONS = r"""
#define VMEM_PAGE_SIZE 4096UL
#define VMEM_PAGE_SHIFT 12

/* ---- declared here, defined in their own fragment */

/* Which operation vmem_uffd_fill performs (uffd.py; post-copy places pages with it). */
#define VMEM_UFFD_FILL_COPY 0
#define VMEM_UFFD_FILL_ZEROPAGE 1
#define VMEM_UFFD_FILL_CONTINUE 2
#define VMEM_UFFD_FILL_POISON 3
static int64_t vmem_uffd_fill(int fd, int op, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode);

/* XXH64 of one VMEM_PAGE_SIZE page, and of n consecutive pages into out[0..n)
   (digest.py; post-copy digests what it places). */
static uint64_t vmem_digest_bytes(const uint8_t *data);
static void vmem_digest_consecutive(const uint8_t *p, size_t n, uint64_t *out);

/* transport's C GMAC (transport/_build/gmac_fragment.py, compiled in as fragment "gmac";
   post-copy tags keyed frames with it). */
typedef struct transport_gmac transport_gmac;
static int transport_gmac_new(const uint8_t *key, transport_gmac **out);
static void transport_gmac_free(transport_gmac *g);
static int transport_gmac_tag(transport_gmac *g, uint64_t seq, size_t nparts, const uint8_t *const *parts,
                              const size_t *lens, size_t copy_from, uint8_t *copy_to, uint8_t *tag);

/* ---- helpers shared by several fragments */

static int64_t vmem_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* pwrite all of [src, src+left) at off: short writes resumed, EINTR retried.  0 or -errno. */
static int vmem_pwrite_all(int fd, const uint8_t *src, size_t left, off_t off)
{
    while (left > 0) {
        ssize_t w = pwrite(fd, src, left, off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (w == 0)
            return -EIO;
        src += w;
        off += w;
        left -= (size_t)w;
    }
    return 0;
}

/* read exactly len bytes (blocking fd): EINTR retried.  0, -EPIPE at EOF, or -errno. */
/* One read() of at most len bytes (blocking fd), EINTR retried: the bytes read, 0 at EOF,
   or -errno. */
static ssize_t vmem_read_some(int fd, void *buf, size_t len)
{
    for (;;) {
        ssize_t r = read(fd, buf, len);
        if (r >= 0)
            return r;
        if (errno != EINTR)
            return -errno;
    }
}

static int vmem_read_full(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t r = vmem_read_some(fd, p, len);
        if (r < 0)
            return (int)r;
        if (r == 0)
            return -EPIPE;   /* EOF */
        p += r;
        len -= (size_t)r;
    }
    return 0;
}

/* writev all of iov[0..iovcnt) (blocking fd; iov is consumed): short writes resumed, EINTR
   retried, at most IOV_MAX (1024) entries per call.  0 or -errno. */
static int vmem_writev_full(int fd, struct iovec *iov, int iovcnt)
{
    while (iovcnt > 0) {
        ssize_t w = writev(fd, iov, iovcnt > 1024 ? 1024 : iovcnt);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        while (iovcnt > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            iovcnt--;
        }
        if (iovcnt > 0 && w > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}
"""
