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
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
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

/* The split walk: at most this many chunks, each with room for this many regions. */
#define VMEM_SCAN_SPLIT_MAX_CHUNKS ...
#define VMEM_SCAN_SPLIT_CHUNK_REGIONS ...
"""

FUNCTIONS = """
int64_t vmem_pagemap_scan(int fd, uint64_t start, uint64_t end, uint64_t flags,
                          uint64_t category_inverted, uint64_t category_mask,
                          uint64_t category_anyof_mask, uint64_t return_mask,
                          uint64_t max_pages, uint64_t *vec, uint64_t vec_len,
                          uint64_t *walk_end);
int vmem_scan_helper_arm(int64_t spin_ns);
int64_t vmem_pagemap_scan_split(int fd, uint64_t start, uint64_t end, uint64_t chunk_bytes,
                                uint64_t flags, uint64_t category_inverted, uint64_t category_mask,
                                uint64_t category_anyof_mask, uint64_t return_mask,
                                int caller_walks, uint64_t *vec, int64_t *counts, uint64_t *walk_ends,
                                int64_t *out);
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

/* ---- The final collect's walk on two CPUs.
 *
 * Inside a stop-and-copy the guest is paused, so the host's other CPU idles while this
 * thread walks the guest's page tables (~0.4-0.5 ms per GiB, most of an idle guest's
 * downtime).  vmem_pagemap_scan_split() cuts the range into chunks that the caller and one
 * helper thread take turns claiming (an atomic counter), each chunk one PAGEMAP_SCAN into
 * its own slice of the caller's buffer.  The caller starts at once and claims whatever the
 * helper has not, so the split is never slower than one walk by more than the chunks'
 * per-call cost, whenever the helper wakes: waking an idle vCPU took 30-100 us here, which
 * is why vmem_scan_helper_arm() lets the helper spin (bounded) from just before the pause.
 *
 * One job at a time per process (a second caller gets -EBUSY and walks on its own).  The
 * job's fields are written before its state opens (release) and the helper reads them only
 * after winning the open state (acquire), and the caller returns only once the helper is
 * out or was shut out: the helper never reads a job being rewritten.  The helper blocks
 * every signal (they stay Python's) and is started again in a forked child. */
#define VMEM_SCAN_SPLIT_MAX_CHUNKS 64
#define VMEM_SCAN_SPLIT_CHUNK_REGIONS 1024

enum { VMEM_SCAN_OPEN = 0, VMEM_SCAN_HELPER_IN = 1, VMEM_SCAN_CLOSED = 2 };

struct vmem_scan_job {
    int fd;
    uint64_t start, end, chunk_bytes, flags, category_inverted, category_mask, category_anyof_mask, return_mask;
    int nchunks;
    uint64_t *vec;
    int64_t *counts;
    uint64_t *walk_ends;
    _Atomic int next;
    _Atomic int helper_state;
    _Atomic int helper_chunks;
};

static struct vmem_scan_job vmem_scan_job;
static pthread_mutex_t vmem_scan_job_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t vmem_scan_start_lock = PTHREAD_MUTEX_INITIALIZER;
static _Atomic uint32_t vmem_scan_ctl;      /* futex word: bumped by every arm and post */
static _Atomic uint32_t vmem_scan_gen;      /* bumped by every post */
static _Atomic int64_t vmem_scan_spin_until_ns;
static _Atomic pid_t vmem_scan_helper_pid;  /* the process the helper runs in (0: none yet) */

static void vmem_scan_run_chunks(struct vmem_scan_job *j, int is_helper)
{
    for (;;) {
        int i = atomic_fetch_add(&j->next, 1);
        if (i >= j->nchunks)
            return;
        uint64_t s = j->start + (uint64_t)i * j->chunk_bytes;
        uint64_t e = s + j->chunk_bytes < j->end ? s + j->chunk_bytes : j->end;
        uint64_t we = s;
        j->counts[i] = vmem_pagemap_scan(j->fd, s, e, j->flags, j->category_inverted, j->category_mask,
                                         j->category_anyof_mask, j->return_mask, 0,
                                         j->vec + (size_t)i * VMEM_SCAN_SPLIT_CHUNK_REGIONS * 3,
                                         VMEM_SCAN_SPLIT_CHUNK_REGIONS, &we);
        j->walk_ends[i] = we;
        if (is_helper)
            atomic_fetch_add(&j->helper_chunks, 1);
    }
}

static void *vmem_scan_helper_main(void *arg)
{
    /* SCHED_IDLE: the helper only ever uses a CPU nobody else wants.  Spinning at normal
       priority it held the CPU the guest woke on to act on its PAUSE, for up to a
       scheduler slice (pause latency 0.05 -> 1.0 ms, measured); a SCHED_IDLE thread is
       preempted by any wake-up, and a helper kept off its CPU only leaves its chunks to
       the caller. */
    struct sched_param idle = {0};
    pthread_setschedparam(pthread_self(), SCHED_IDLE, &idle);
    uint32_t seen_gen = 0;  /* posts start at 1: a helper started late still sees the job it was started for */
    for (;;) {
        uint32_t ctl = atomic_load(&vmem_scan_ctl);  /* before the checks: a post after them changes it */
        uint32_t gen = atomic_load(&vmem_scan_gen);
        if (gen != seen_gen) {
            seen_gen = gen;
            int open = VMEM_SCAN_OPEN;
            if (atomic_compare_exchange_strong(&vmem_scan_job.helper_state, &open, VMEM_SCAN_HELPER_IN)) {
                vmem_scan_run_chunks(&vmem_scan_job, 1);
                atomic_store(&vmem_scan_job.helper_state, VMEM_SCAN_CLOSED);
            }
            continue;
        }
        if (vmem_now_ns() < atomic_load(&vmem_scan_spin_until_ns)) {
            __builtin_ia32_pause();
            continue;
        }
        syscall(SYS_futex, &vmem_scan_ctl, FUTEX_WAIT_PRIVATE, ctl, NULL, NULL, 0);
    }
    return NULL;
}

/* Start the helper in this process unless it runs already.  0 or -errno (-EBUSY: another
   thread is starting it -- or was, when this process was forked from one that was: a lock
   taken then stays taken in the child, so it is tried, never waited for). */
static int vmem_scan_helper_ensure(void)
{
    pid_t me = getpid();
    if (atomic_load(&vmem_scan_helper_pid) == me)
        return 0;
    if (pthread_mutex_trylock(&vmem_scan_start_lock) != 0)
        return -EBUSY;
    int rc = 0;
    if (atomic_load(&vmem_scan_helper_pid) != me) {
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 64 * 1024);
        pthread_t t;
        rc = -pthread_create(&t, &attr, vmem_scan_helper_main, NULL);
        pthread_attr_destroy(&attr);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (rc == 0)
            atomic_store(&vmem_scan_helper_pid, me);
    }
    pthread_mutex_unlock(&vmem_scan_start_lock);
    return rc;
}

static void vmem_scan_helper_kick(void)
{
    atomic_fetch_add(&vmem_scan_ctl, 1);
    syscall(SYS_futex, &vmem_scan_ctl, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* Let the helper spin for the next spin_ns (waiting for a split walk) instead of sleeping;
   starts it if needed.  0 or -errno. */
static int vmem_scan_helper_arm(int64_t spin_ns)
{
    int rc = vmem_scan_helper_ensure();
    if (rc < 0)
        return rc;
    atomic_store(&vmem_scan_spin_until_ns, vmem_now_ns() + (spin_ns > 0 ? spin_ns : 0));
    vmem_scan_helper_kick();
    return 0;
}

/* PAGEMAP_SCAN of [start, end) in chunks of chunk_bytes, shared with the helper thread.
   Chunk i is walked into vec + i * VMEM_SCAN_SPLIT_CHUNK_REGIONS * 3 (its count or -errno in
   counts[i], its walk_end in walk_ends[i]); then the regions are packed to the front of vec
   in address order, out[0] = how many.  out[1] = how many chunks stopped short of their end
   (their slice was full: the caller walks the rest, from walk_ends[i]).  caller_walks = 0
   leaves every chunk to the helper (for tests).  Returns how many chunks the helper walked,
   or -errno: of the first chunk that failed (its index in out[2]; the others were walked);
   with out[2] = -1 nothing was walked: -EBUSY (another split walk runs in this process, or
   the helper is being started), -EAGAIN (no thread for the helper), -EINVAL (more than
   VMEM_SCAN_SPLIT_MAX_CHUNKS chunks, or chunk_bytes not whole pages). */
static int64_t vmem_pagemap_scan_split(int fd, uint64_t start, uint64_t end, uint64_t chunk_bytes,
                                       uint64_t flags, uint64_t category_inverted, uint64_t category_mask,
                                       uint64_t category_anyof_mask, uint64_t return_mask,
                                       int caller_walks, uint64_t *vec, int64_t *counts, uint64_t *walk_ends,
                                       int64_t *out)
{
    out[0] = out[1] = 0;
    out[2] = -1;
    if (end <= start || chunk_bytes == 0 || (chunk_bytes & (VMEM_PAGE_SIZE - 1)))
        return -EINVAL;
    uint64_t nchunks = (end - start + chunk_bytes - 1) / chunk_bytes;
    if (nchunks > VMEM_SCAN_SPLIT_MAX_CHUNKS)
        return -EINVAL;
    if (pthread_mutex_trylock(&vmem_scan_job_lock) != 0)
        return -EBUSY;
    int rc = vmem_scan_helper_ensure();
    if (rc < 0) {
        pthread_mutex_unlock(&vmem_scan_job_lock);
        return rc;
    }
    struct vmem_scan_job *j = &vmem_scan_job;
    j->fd = fd;
    j->start = start;
    j->end = end;
    j->chunk_bytes = chunk_bytes;
    j->flags = flags;
    j->category_inverted = category_inverted;
    j->category_mask = category_mask;
    j->category_anyof_mask = category_anyof_mask;
    j->return_mask = return_mask;
    j->nchunks = (int)nchunks;
    j->vec = vec;
    j->counts = counts;
    j->walk_ends = walk_ends;
    atomic_store(&j->next, 0);
    atomic_store(&j->helper_chunks, 0);
    atomic_store_explicit(&j->helper_state, VMEM_SCAN_OPEN, memory_order_release);
    atomic_fetch_add(&vmem_scan_gen, 1);
    vmem_scan_helper_kick();
    if (caller_walks)
        vmem_scan_run_chunks(j, 0);
    else
        while (atomic_load(&j->next) < j->nchunks)  /* tests: the helper alone (it is awake now) */
            sched_yield();
    /* Shut a helper that has not come in out; wait for one that has (at most one chunk). */
    int open = VMEM_SCAN_OPEN;
    if (!atomic_compare_exchange_strong(&j->helper_state, &open, VMEM_SCAN_CLOSED)) {
        for (unsigned spins = 0; atomic_load(&j->helper_state) != VMEM_SCAN_CLOSED; spins++) {
            if (spins < 4096)
                __builtin_ia32_pause();
            else
                sched_yield();  /* the helper may be waiting for this very CPU */
        }
    }
    int64_t helper_chunks = atomic_load(&j->helper_chunks);
    /* The walk is over: the helper sleeps now rather than spin out its time on a CPU the
       next hops may want (spinning on gained nothing in A/B runs: docs/performance.md). */
    atomic_store(&vmem_scan_spin_until_ns, 0);
    pthread_mutex_unlock(&vmem_scan_job_lock);
    /* Pack the chunks' regions to the front, in chunk (address) order: one array for Python. */
    int64_t rows = 0, short_chunks = 0;
    for (int i = 0; i < (int)nchunks; i++) {
        if (counts[i] < 0) {
            out[2] = i;
            return counts[i];
        }
        uint64_t chunk_end = start + (uint64_t)(i + 1) * chunk_bytes;
        if (walk_ends[i] < (chunk_end < end ? chunk_end : end))
            short_chunks++;
        if (counts[i] && rows != (int64_t)i * VMEM_SCAN_SPLIT_CHUNK_REGIONS)
            memmove(vec + rows * 3, vec + (size_t)i * VMEM_SCAN_SPLIT_CHUNK_REGIONS * 3, (size_t)counts[i] * 24);
        rows += counts[i];
    }
    out[0] = rows;
    out[1] = short_chunks;
    return helper_chunks;
}
"""
