"""userfaultfd(2): syscall, UFFDIO_* ioctls, and the fault-event reader.

Debian's uapi headers predate several of the features we use (WP_ASYNC, WP_UNPOPULATED,
MOVE, POISON...).  Every such constant and struct is declared in ``INCLUDES`` (so every
fragment sees it, e.g. post-copy's use of ``UFFD_PAGEFAULT_FLAG_MINOR``) under an ``#ifndef``
guard, with values checked against the kernel's include/uapi/linux/userfaultfd.h, so the
extension compiles against both old and new headers.  Whether the *running* kernel has a
feature is a separate, run-time question (``vmem.features``).

Placement ioctls (COPY / ZEROPAGE / CONTINUE / POISON) go through one loop in C,
``vmem_uffd_fill``: a partial placement (``-EAGAIN`` with progress) is resumed where it
stopped, ``EAGAIN`` without progress (the mm is changing: fork, mremap) is retried a
bounded number of times, and ``EEXIST`` (the page is already there) is benign: the page is
skipped and its waiters are woken.
"""

INCLUDES = r"""
#include <linux/userfaultfd.h>
#include <poll.h>

/* ---- declarations missing from older uapi headers (values: include/uapi/linux/userfaultfd.h) */
#ifdef UFFD_FEATURE_WP_ASYNC
static const int HEADERS_HAVE_UFFD_WP_ASYNC = 1;
#else
static const int HEADERS_HAVE_UFFD_WP_ASYNC = 0;
#endif
#ifdef UFFDIO_MOVE
static const int HEADERS_HAVE_UFFDIO_MOVE = 1;
#else
static const int HEADERS_HAVE_UFFDIO_MOVE = 0;
#endif
#ifdef UFFDIO_POISON
static const int HEADERS_HAVE_UFFDIO_POISON = 1;
#else
static const int HEADERS_HAVE_UFFDIO_POISON = 0;
#endif

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif

#ifndef UFFD_FEATURE_THREAD_ID
#define UFFD_FEATURE_THREAD_ID (1<<8)
#endif
#ifndef UFFD_FEATURE_MINOR_HUGETLBFS
#define UFFD_FEATURE_MINOR_HUGETLBFS (1<<9)
#endif
#ifndef UFFD_FEATURE_MINOR_SHMEM
#define UFFD_FEATURE_MINOR_SHMEM (1<<10)
#endif
#ifndef UFFD_FEATURE_EXACT_ADDRESS
#define UFFD_FEATURE_EXACT_ADDRESS (1<<11)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1<<12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1<<13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1<<14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1<<15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1<<16)
#endif

#ifndef UFFDIO_REGISTER_MODE_MINOR
#define UFFDIO_REGISTER_MODE_MINOR ((__u64)1<<2)
#endif
#ifndef UFFDIO_COPY_MODE_WP
#define UFFDIO_COPY_MODE_WP ((__u64)1<<1)
#endif
#ifndef UFFD_PAGEFAULT_FLAG_MINOR
#define UFFD_PAGEFAULT_FLAG_MINOR (1<<2)
#endif

#ifndef _UFFDIO_CONTINUE
#define _UFFDIO_CONTINUE (0x07)
#endif
#ifndef UFFDIO_CONTINUE
struct uffdio_continue {
    struct uffdio_range range;
    __u64 mode;
    __s64 mapped;
};
#define UFFDIO_CONTINUE _IOWR(UFFDIO, _UFFDIO_CONTINUE, struct uffdio_continue)
#endif
#ifndef UFFDIO_CONTINUE_MODE_DONTWAKE
#define UFFDIO_CONTINUE_MODE_DONTWAKE ((__u64)1<<0)
#endif
#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP ((__u64)1<<1)
#endif

#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
#endif
#ifndef UFFDIO_MOVE
struct uffdio_move {
    __u64 dst;
    __u64 src;
    __u64 len;
    __u64 mode;
    __s64 move;
};
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif
#ifndef UFFDIO_MOVE_MODE_DONTWAKE
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1<<0)
#endif
#ifndef UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1<<1)
#endif

#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
#endif
#ifndef UFFDIO_POISON
struct uffdio_poison {
    struct uffdio_range range;
    __u64 mode;
    __s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif
#ifndef UFFDIO_POISON_MODE_DONTWAKE
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1<<0)
#endif

_Static_assert(sizeof(struct uffd_msg) == 32, "uffd_msg layout");
_Static_assert(sizeof(struct uffdio_move) == 40, "uffdio_move layout");
_Static_assert(sizeof(struct uffdio_poison) == 32, "uffdio_poison layout");
_Static_assert(sizeof(struct uffdio_continue) == 32, "uffdio_continue layout");
"""

TYPES = """
#define UFFD_API ...
#define UFFD_USER_MODE_ONLY ...

#define UFFD_FEATURE_PAGEFAULT_FLAG_WP ...
#define UFFD_FEATURE_EVENT_FORK ...
#define UFFD_FEATURE_EVENT_REMAP ...
#define UFFD_FEATURE_EVENT_REMOVE ...
#define UFFD_FEATURE_MISSING_HUGETLBFS ...
#define UFFD_FEATURE_MISSING_SHMEM ...
#define UFFD_FEATURE_EVENT_UNMAP ...
#define UFFD_FEATURE_SIGBUS ...
#define UFFD_FEATURE_THREAD_ID ...
#define UFFD_FEATURE_MINOR_HUGETLBFS ...
#define UFFD_FEATURE_MINOR_SHMEM ...
#define UFFD_FEATURE_EXACT_ADDRESS ...
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM ...
#define UFFD_FEATURE_WP_UNPOPULATED ...
#define UFFD_FEATURE_POISON ...
#define UFFD_FEATURE_WP_ASYNC ...
#define UFFD_FEATURE_MOVE ...

#define UFFDIO_REGISTER_MODE_MISSING ...
#define UFFDIO_REGISTER_MODE_WP ...
#define UFFDIO_REGISTER_MODE_MINOR ...

#define UFFDIO_COPY_MODE_DONTWAKE ...
#define UFFDIO_COPY_MODE_WP ...
#define UFFDIO_ZEROPAGE_MODE_DONTWAKE ...
#define UFFDIO_WRITEPROTECT_MODE_WP ...
#define UFFDIO_WRITEPROTECT_MODE_DONTWAKE ...
#define UFFDIO_CONTINUE_MODE_DONTWAKE ...
#define UFFDIO_CONTINUE_MODE_WP ...
#define UFFDIO_POISON_MODE_DONTWAKE ...
#define UFFDIO_MOVE_MODE_DONTWAKE ...
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ...

/* Bit numbers of the ioctls mask returned by UFFDIO_API / UFFDIO_REGISTER. */
#define _UFFDIO_REGISTER ...
#define _UFFDIO_UNREGISTER ...
#define _UFFDIO_WAKE ...
#define _UFFDIO_COPY ...
#define _UFFDIO_ZEROPAGE ...
#define _UFFDIO_MOVE ...
#define _UFFDIO_WRITEPROTECT ...
#define _UFFDIO_CONTINUE ...
#define _UFFDIO_POISON ...
#define _UFFDIO_API ...

#define UFFD_EVENT_PAGEFAULT ...
#define UFFD_EVENT_FORK ...
#define UFFD_EVENT_REMAP ...
#define UFFD_EVENT_REMOVE ...
#define UFFD_EVENT_UNMAP ...
#define UFFD_PAGEFAULT_FLAG_WRITE ...
#define UFFD_PAGEFAULT_FLAG_WP ...
#define UFFD_PAGEFAULT_FLAG_MINOR ...

/* Which operation vmem_uffd_fill performs. */
#define VMEM_UFFD_FILL_COPY ...
#define VMEM_UFFD_FILL_ZEROPAGE ...
#define VMEM_UFFD_FILL_CONTINUE ...
#define VMEM_UFFD_FILL_POISON ...

/* How vmem_uffd_open obtained the fd. */
#define VMEM_UFFD_OPEN_SYSCALL ...
#define VMEM_UFFD_OPEN_USER_MODE_ONLY ...
#define VMEM_UFFD_OPEN_DEV ...

/* 1 if the build headers know SYS_userfaultfd. */
static const int HAS_SYS_USERFAULTFD;
/* 1 if the build headers already declared WP_ASYNC / UFFDIO_MOVE / UFFDIO_POISON (informational). */
static const int HEADERS_HAVE_UFFD_WP_ASYNC;
static const int HEADERS_HAVE_UFFDIO_MOVE;
static const int HEADERS_HAVE_UFFDIO_POISON;
"""

FUNCTIONS = """
int vmem_uffd_open(int flags, int *how);
int vmem_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out);
int vmem_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out);
int vmem_uffd_unregister(int fd, uint64_t start, uint64_t len);
int vmem_uffd_wake(int fd, uint64_t start, uint64_t len);
int vmem_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);
int64_t vmem_uffd_fill(int fd, int op, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode);
int64_t vmem_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode);
int64_t vmem_uffd_read_faults(int fd, uint64_t *addrs, uint64_t *flags, uint64_t max_events);
"""

CUSTOMIZATIONS = r"""
/* ---- implementation (VMEM_UFFD_FILL_* are defined in common.py: post-copy uses them too) */
#define VMEM_UFFD_OPEN_SYSCALL 0
#define VMEM_UFFD_OPEN_USER_MODE_ONLY 1
#define VMEM_UFFD_OPEN_DEV 2

/* EAGAIN without progress means the target mm is changing (fork, mremap in flight):
   retry, yielding, but never forever. */
#define VMEM_UFFD_EAGAIN_RETRIES 100000

#ifdef SYS_userfaultfd
static const int HAS_SYS_USERFAULTFD = 1;
#else
static const int HAS_SYS_USERFAULTFD = 0;
#endif

static int vmem_uffd_open(int flags, int *how)
{
    int err = ENOSYS;
#ifdef SYS_userfaultfd
    long fd = syscall(SYS_userfaultfd, flags);
    if (fd >= 0) { *how = VMEM_UFFD_OPEN_SYSCALL; return (int)fd; }
    err = errno;
    if (err == EPERM) {
        /* vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE: user-mode faults only. */
        fd = syscall(SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY);
        if (fd >= 0) { *how = VMEM_UFFD_OPEN_USER_MODE_ONLY; return (int)fd; }
    }
#endif
    /* Linux >= 6.1: /dev/userfaultfd, access governed by the device node's permissions. */
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        int ufd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
        close(dev);
        if (ufd >= 0) { *how = VMEM_UFFD_OPEN_DEV; return ufd; }
    }
    return -err;
}

static int vmem_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out)
{
    struct uffdio_api api;
    memset(&api, 0, sizeof api);
    api.api = UFFD_API;
    api.features = features;
    if (ioctl(fd, UFFDIO_API, &api) != 0)
        return -errno;
    *features_out = api.features;
    *ioctls_out = api.ioctls;
    return 0;
}

static int vmem_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out)
{
    struct uffdio_register reg;
    memset(&reg, 0, sizeof reg);
    reg.range.start = start;
    reg.range.len = len;
    reg.mode = mode;
    if (ioctl(fd, UFFDIO_REGISTER, &reg) != 0)
        return -errno;
    *ioctls_out = reg.ioctls;
    return 0;
}

static int vmem_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range r = { .start = start, .len = len };
    return ioctl(fd, UFFDIO_UNREGISTER, &r) == 0 ? 0 : -errno;
}

static int vmem_uffd_wake(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range r = { .start = start, .len = len };
    return ioctl(fd, UFFDIO_WAKE, &r) == 0 ? 0 : -errno;
}

static int vmem_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
    for (int tries = 0;; tries++) {
        struct uffdio_writeprotect wp;
        memset(&wp, 0, sizeof wp);
        wp.range.start = start;
        wp.range.len = len;
        wp.mode = mode;
        if (ioctl(fd, UFFDIO_WRITEPROTECT, &wp) == 0)
            return 0;
        if ((errno != EAGAIN && errno != EINTR) || tries >= VMEM_UFFD_EAGAIN_RETRIES)
            return -errno;
        sched_yield();
    }
}

/* One placement ioctl over [dst, dst+len).  Returns 0 or -errno; *progress receives the
   bytes the kernel reports as done (>0) when it stopped early. */
static int vmem_uffd_fill_once(int fd, int op, uint64_t dst, uint64_t src, uint64_t len,
                               uint64_t mode, int64_t *progress)
{
    int rc;
    *progress = 0;
    switch (op) {
    case VMEM_UFFD_FILL_COPY: {
        struct uffdio_copy c;
        memset(&c, 0, sizeof c);
        c.dst = dst; c.src = src; c.len = len; c.mode = mode;
        rc = ioctl(fd, UFFDIO_COPY, &c);
        *progress = c.copy;
        break;
    }
    /* ZEROPAGE, CONTINUE and POISON share one layout: a range, a mode, then the s64 result. */
#define VMEM_RANGE_FILL(type, request, result)                                       \
    do {                                                                              \
        struct type a;                                                                \
        memset(&a, 0, sizeof a);                                                      \
        a.range.start = dst; a.range.len = len; a.mode = mode;                        \
        rc = ioctl(fd, request, &a);                                                  \
        *progress = a.result;                                                         \
    } while (0)
    case VMEM_UFFD_FILL_ZEROPAGE: VMEM_RANGE_FILL(uffdio_zeropage, UFFDIO_ZEROPAGE, zeropage); break;
    case VMEM_UFFD_FILL_CONTINUE: VMEM_RANGE_FILL(uffdio_continue, UFFDIO_CONTINUE, mapped); break;
    case VMEM_UFFD_FILL_POISON: VMEM_RANGE_FILL(uffdio_poison, UFFDIO_POISON, updated); break;
#undef VMEM_RANGE_FILL
    default:
        return -EINVAL;
    }
    return rc == 0 ? 0 : -errno;
}

/* Place [dst, dst+len): returns the bytes placed by this call, or -errno.
   EEXIST pages are skipped (and woken unless DONTWAKE); if every page already existed the
   result is -EEXIST.  On a hard error, pages before the failing one may have been placed. */
static int64_t vmem_uffd_fill(int fd, int op, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode)
{
    uint64_t done = 0, placed = 0;
    int saw_eexist = 0, spins = 0;
    int dontwake = (mode & 1) != 0;   /* every *_MODE_DONTWAKE is bit 0 */
    if (len == 0 || (dst | len) & (VMEM_PAGE_SIZE - 1))
        return -EINVAL;
    while (done < len) {
        int64_t progress;
        int rc = vmem_uffd_fill_once(fd, op, dst + done, src + done, len - done, mode, &progress);
        if (rc == 0) {
            placed += len - done;
            done = len;
            break;
        }
        if (progress > 0) {              /* stopped early after placing some: resume */
            placed += (uint64_t)progress;
            done += (uint64_t)progress;
            spins = 0;
            continue;
        }
        if (rc == -EAGAIN || rc == -EINTR) {
            if (++spins > VMEM_UFFD_EAGAIN_RETRIES)
                return -EAGAIN;
            sched_yield();
            continue;
        }
        if (rc == -EEXIST) {             /* already there: benign, wake whoever waits */
            saw_eexist = 1;
            if (!dontwake)
                vmem_uffd_wake(fd, dst + done, VMEM_PAGE_SIZE);
            done += VMEM_PAGE_SIZE;
            continue;
        }
        return rc;
    }
    if (placed == 0 && saw_eexist)
        return -EEXIST;
    return (int64_t)placed;
}

static int64_t vmem_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode)
{
    uint64_t done = 0;
    int spins = 0;
    while (done < len) {
        struct uffdio_move m;
        memset(&m, 0, sizeof m);
        m.dst = dst + done; m.src = src + done; m.len = len - done; m.mode = mode;
        if (ioctl(fd, UFFDIO_MOVE, &m) == 0)
            return (int64_t)len;
        int err = errno;
        if (m.move > 0) { done += (uint64_t)m.move; spins = 0; continue; }
        if ((err == EAGAIN || err == EINTR) && ++spins <= VMEM_UFFD_EAGAIN_RETRIES) { sched_yield(); continue; }
        return -err;
    }
    return (int64_t)done;
}

/* Read pending events; keep page faults only.  Returns how many were stored (0 if none
   pending on a non-blocking fd), or -errno.  A blocking fd is read once. */
static int64_t vmem_uffd_read_faults(int fd, uint64_t *addrs, uint64_t *flags, uint64_t max_events)
{
    struct uffd_msg msgs[64];
    uint64_t n = 0;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        return -errno;
    int nonblocking = (fl & O_NONBLOCK) != 0;
    while (n < max_events) {
        uint64_t want = max_events - n;
        if (want > 64)
            want = 64;
        ssize_t r = read(fd, msgs, want * sizeof(struct uffd_msg));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || n > 0)
                break;
            return -errno;
        }
        size_t k = (size_t)r / sizeof(struct uffd_msg);
        for (size_t i = 0; i < k; i++) {
            if (msgs[i].event == UFFD_EVENT_PAGEFAULT) {
                addrs[n] = msgs[i].arg.pagefault.address;
                flags[n] = msgs[i].arg.pagefault.flags;
                n++;
            }
        }
        if (!nonblocking || k < want)
            break;
    }
    return (int64_t)n;
}
"""
