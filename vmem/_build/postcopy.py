"""Post-copy placement: write pages into the RAM file, then map them into the guest.

The destination guest's RAM is registered with userfaultfd MISSING|MINOR, so the guest can
see a page only once the migrator maps it (``UFFDIO_CONTINUE``): data written with
``pwrite`` sits in the page cache, invisible, until then.  A page therefore never appears
half-written.  Runs of consecutive pages (and consecutive staging rows) are one ``pwrite``
and one ``UFFDIO_CONTINUE`` each; already-mapped pages (``EEXIST``) are skipped and their
waiters woken by ``vmem_uffd_fill`` (uffd fragment).
"""

# The handles (opaque to Python) and the statistics structs, in the C source and in the cdef
# alike: Python reads the statistics by field name.
_DECLARATIONS = """
typedef struct vmem_pc_dest vmem_pc_dest;
typedef struct vmem_pc_src vmem_pc_src;

/* The destination engine's statistics, read all at once under its lock. */
struct vmem_pc_dest_stats {
    int64_t latency_count;     /* fault -> placed latencies recorded */
    int64_t missing;           /* pages not yet PRESENT */
    int64_t demand_faults;     /* distinct pages asked from the source */
    int64_t fault_events;      /* uffd fault events read */
    int64_t local_faults;      /* faults on present pages, resolved here */
    int64_t pages_demanded;    /* placed pages that had been asked for */
    int64_t pages_pushed;      /* placed pages nobody asked for */
    int64_t duplicates;        /* pages that arrived when no longer MISSING */
    int64_t t_complete_ns;     /* CLOCK_MONOTONIC when missing reached 0, else 0 */
    int64_t error;             /* errno that stopped the thread, else 0 */
    int64_t priority;          /* the fault thread's scheduling (VMEM_PC_PRIO_*), once started */
    int64_t cpu;               /* the CPU the thread is pinned to (--fault-cpu), -1 none, -errno refused */
    int64_t push_yields;       /* background pieces that waited for a demand placement first */
    int64_t fault_waits;       /* demand placements that found a background piece placing */
    int64_t push_pages_ahead_max;  /* most background pages placed while one demand answer waited */
};

/* The source fault server's statistics, read all at once under its lock. */
struct vmem_pc_src_stats {
    int64_t fault_records;     /* FAULT records answered */
    int64_t pages_sent;        /* pages sent in answer */
    int64_t error;             /* errno that stopped the thread, else 0 */
    int64_t priority;          /* the fault thread's scheduling (VMEM_PC_PRIO_*), once started */
    int64_t cpu;               /* the CPU the thread is pinned to (--fault-cpu), -1 none, -errno refused */
};
"""

INCLUDES = """
#include <openssl/crypto.h>          /* CRYPTO_memcmp; the GMAC itself: transport's gmac fragment */
#include <openssl/evp.h>             /* AES-256-GCM of sealed links (transport.seal) */
#include <poll.h>
#include <pthread.h>
#include <sys/resource.h>
#include <linux/userfaultfd.h>
"""

TYPES = """
/* The wire constants the fault threads speak, exposed so that tests/test_native.py checks
   them against vmem.format.wire (PostcopyRecordType, MAX_PAGES_PER_RECORD). */
#define VMEM_PC_REC_PAGE_DATA ...
#define VMEM_PC_REC_FAULT ...
#define VMEM_PC_MAX_PAGES ...
/* Test-only placement faults (vmem.migration.inject): what vmem_place_pages does wrong
   with the one page vmem_set_place_fault names. */
#define VMEM_PLACE_FAULT_NONE ...
#define VMEM_PLACE_FAULT_DROP ...
#define VMEM_PLACE_FAULT_WRONG_OFFSET ...
#define VMEM_PLACE_FAULT_FLIP ...
/* Present-page states, one byte per page, shared with Python (vmem._native.PC_*). */
#define VMEM_PC_MISSING ...
#define VMEM_PC_PLACING ...
#define VMEM_PC_PRESENT ...
/* How a fault thread is scheduled (stats.priority, vmem_pc_probe_priority). */
#define VMEM_PC_PRIO_NORMAL ...
#define VMEM_PC_PRIO_NICE ...
#define VMEM_PC_PRIO_SLICE ...
#define VMEM_PC_PRIO_FIFO ...
#define VMEM_PC_RT_PRIORITY ...
#define VMEM_PC_NICE ...
#define VMEM_PC_SLICE_NS ...
/* Background placement goes in pieces of this many pages (a demand answer waits for at most one). */
#define VMEM_PC_PIECE_PAGES ...
""" + _DECLARATIONS

FUNCTIONS = """
int vmem_pc_dest_new(vmem_pc_dest **out, int uffd, int urgent_fd, int ram_fd, uint64_t base, int64_t npages,
                     uint8_t *state, uint8_t *requested, uint8_t *received, int64_t *fault_t0,
                     uint64_t *digests, int64_t *lat, int64_t lat_cap, int64_t missing, const uint8_t *view);
int vmem_pc_dest_start(vmem_pc_dest *h);
void vmem_pc_dest_stop(vmem_pc_dest *h);
void vmem_pc_dest_free(vmem_pc_dest *h);
int64_t vmem_pc_dest_place(vmem_pc_dest *h, const uint8_t *staging, const int64_t *pfns, size_t n);
void vmem_pc_dest_stats(vmem_pc_dest *h, struct vmem_pc_dest_stats *out);
int vmem_pc_src_new(vmem_pc_src **out, int urgent_fd, const uint8_t *ram, int64_t npages, uint8_t *sent,
                    int64_t *cursor);
int vmem_pc_src_start(vmem_pc_src *h);
void vmem_pc_src_stop(vmem_pc_src *h);
void vmem_pc_src_free(vmem_pc_src *h);
void vmem_pc_src_stats(vmem_pc_src *h, struct vmem_pc_src_stats *out);
int vmem_pc_dest_set_mac(vmem_pc_dest *h, const uint8_t *send_key, const uint8_t *recv_key,
                         uint64_t send_seq, uint64_t recv_seq, int sealed);
int vmem_pc_src_set_mac(vmem_pc_src *h, const uint8_t *send_key, const uint8_t *recv_key,
                        uint64_t send_seq, uint64_t recv_seq, int sealed);
int vmem_pc_probe_priority(void);
int vmem_pc_boost_current(void);
void vmem_pc_set_push_pieces(int64_t piece_pages, int yield, int64_t slow_us, int view_writes);
void vmem_pc_dest_set_view_writes(vmem_pc_dest *h, int on);
void vmem_pc_set_priority_limit(int most);
void vmem_pc_dest_set_priority_limit(vmem_pc_dest *h, int most);
void vmem_pc_src_set_priority_limit(vmem_pc_src *h, int most);
void vmem_pc_dest_set_cpu(vmem_pc_dest *h, int cpu);
void vmem_pc_src_set_cpu(vmem_pc_src *h, int cpu);
void vmem_pc_set_slice_ns(int64_t ns);
int64_t vmem_place_pages(int ram_fd, int uffd, uint64_t guest_base, const uint8_t *buf,
                         const int64_t *rows, const int64_t *pages, size_t n, uint64_t *digests,
                         const uint8_t *view);
void vmem_set_place_fault(int kind, int64_t page);
int64_t vmem_continue_runs(int uffd, uint64_t guest_base, const int64_t *runs, size_t nruns);
"""

CUSTOMIZATIONS = r"""
/* A test-only placement fault (vmem.migration.inject; never set in production): the page
   vmem_place_pages mishandles and how.  Set once, before any placement starts. */
#define VMEM_PLACE_FAULT_NONE 0
#define VMEM_PLACE_FAULT_DROP 1          /* not written, not mapped: the file keeps what it had */
#define VMEM_PLACE_FAULT_WRONG_OFFSET 2  /* written one page further on; its own page not mapped */
#define VMEM_PLACE_FAULT_FLIP 3          /* written, then one byte of it flipped in the file */
static int vmem_place_fault_kind = VMEM_PLACE_FAULT_NONE;
static int64_t vmem_place_fault_page = -1;

static void vmem_set_place_fault(int kind, int64_t page)
{
    vmem_place_fault_kind = kind;
    vmem_place_fault_page = kind == VMEM_PLACE_FAULT_NONE ? -1 : page;
}

/* The injected fault for one run [page, page + len): write it wrongly.  0 or -errno. */
static int vmem_place_faulty(int ram_fd, const uint8_t *src, off_t off)
{
    switch (vmem_place_fault_kind) {
    case VMEM_PLACE_FAULT_DROP:
        return 0;
    case VMEM_PLACE_FAULT_WRONG_OFFSET:
        return vmem_pwrite_all(ram_fd, src, VMEM_PAGE_SIZE, off + (off_t)VMEM_PAGE_SIZE);
    case VMEM_PLACE_FAULT_FLIP: {
        int rc = vmem_pwrite_all(ram_fd, src, VMEM_PAGE_SIZE, off);
        uint8_t b = (uint8_t)(src[VMEM_PAGE_SIZE / 2] ^ 0x01);
        return rc < 0 ? rc : vmem_pwrite_all(ram_fd, &b, 1, off + VMEM_PAGE_SIZE / 2);
    }
    }
    return -EINVAL;
}

/* Place page pages[i] from staging row rows[i] (rows NULL: row i).  For each run of
   consecutive pages held in consecutive rows: one pwrite into the RAM file; then, with
   digests, digests[page] is the digest of what the RAM file now holds, read through `view`
   (this process's shared mapping of the RAM file) -- what was placed, not what was
   received; then (uffd >= 0) one UFFDIO_CONTINUE maps the run into the guest and wakes its
   faulting threads -- so the digest is taken before the guest can see, let alone change,
   the page.  Only pages just written are read through `view` (read faults on pages in the
   page cache: nothing is allocated, and fault-around maps 16 pages a fault).  Measured:
   writing then reading back through the mapping costs ~10% more than digesting the staging
   buffer; pread-ing back into the staging buffer, ~2x.  A repeated page: the last copy wins
   (written and digested last).  Returns the number of pages handled, or -errno (earlier
   runs stay placed).

   With a gate (post-copy, below), each pwrite -- only the pwrite: the kernel serialises
   those anyway, on the shmem inode lock -- is made holding the gate's mutex; digesting and
   mapping run outside it. */
struct vmem_place_gate;
static int vmem_gate_enter(struct vmem_place_gate *g);
static int vmem_gate_view_write(const struct vmem_place_gate *g);
static void vmem_gate_leave(struct vmem_place_gate *g, size_t pages);

static int64_t vmem_place_pages_gated(int ram_fd, int uffd, uint64_t guest_base, const uint8_t *buf,
                                      const int64_t *rows, const int64_t *pages, size_t n, uint64_t *digests,
                                      const uint8_t *view, struct vmem_place_gate *gate);

static int64_t vmem_place_pages(int ram_fd, int uffd, uint64_t guest_base, const uint8_t *buf,
                                const int64_t *rows, const int64_t *pages, size_t n, uint64_t *digests,
                                const uint8_t *view)
{
    return vmem_place_pages_gated(ram_fd, uffd, guest_base, buf, rows, pages, n, digests, view, NULL);
}

static int64_t vmem_place_pages_gated(int ram_fd, int uffd, uint64_t guest_base, const uint8_t *buf,
                                      const int64_t *rows, const int64_t *pages, size_t n, uint64_t *digests,
                                      const uint8_t *view, struct vmem_place_gate *gate)
{
    const int64_t fault_page = vmem_place_fault_page;
    size_t i = 0;
    if (digests && !view)
        return -EINVAL;
    while (i < n) {
        size_t j = i + 1;
        int64_t row0 = rows ? rows[i] : (int64_t)i;
        int faulty = pages[i] == fault_page;
        if (!faulty)   /* the faulty page is a run of its own */
            while (j < n && pages[j] == pages[j - 1] + 1 && pages[j] != fault_page &&
                   (rows ? rows[j] : (int64_t)j) == row0 + (int64_t)(j - i))
                j++;
        uint64_t len = (uint64_t)(j - i) * VMEM_PAGE_SIZE;
        const uint8_t *src = buf + (uint64_t)row0 * VMEM_PAGE_SIZE;
        off_t off = (off_t)pages[i] * VMEM_PAGE_SIZE;
        /* A demand answer is copied into this process's mapping of the RAM file instead
           (vmem_pc_dest_set_view_writes): no pwrite, so neither the gate nor the inode lock. */
        int via_view = gate && view && !faulty && vmem_gate_view_write(gate);
        if (gate && !via_view)
            vmem_gate_enter(gate);
        int rc = 0;
        if (via_view)
            memcpy((uint8_t *)view + off, src, len);
        else
            rc = faulty ? vmem_place_faulty(ram_fd, src, off) : vmem_pwrite_all(ram_fd, src, len, off);
        if (gate && !via_view)
            vmem_gate_leave(gate, j - i);
        if (rc < 0)
            return rc;
        if (digests) {   /* the run's pages are consecutive: their digests are too */
            vmem_digest_consecutive(view + (uint64_t)off, j - i, digests + pages[i]);
        }
        int mapped = !faulty || vmem_place_fault_kind == VMEM_PLACE_FAULT_FLIP;
        if (uffd >= 0 && mapped) {
            int64_t r = vmem_uffd_fill(uffd, VMEM_UFFD_FILL_CONTINUE, guest_base + (uint64_t)off, 0, len, 0);
            if (r < 0 && r != -EEXIST)
                return r;
        }
        i = j;
    }
    return (int64_t)n;
}

/* UFFDIO_CONTINUE every [first, end) page run (pages already in the page cache).
   Returns pages newly mapped, or -errno. */
static int64_t vmem_continue_runs(int uffd, uint64_t guest_base, const int64_t *runs, size_t nruns)
{
    int64_t mapped = 0;
    for (size_t k = 0; k < nruns; k++) {
        int64_t first = runs[2 * k], end = runs[2 * k + 1];
        if (end <= first)
            continue;
        int64_t r = vmem_uffd_fill(uffd, VMEM_UFFD_FILL_CONTINUE,
                                   guest_base + (uint64_t)first * VMEM_PAGE_SIZE, 0,
                                   (uint64_t)(end - first) * VMEM_PAGE_SIZE, 0);
        if (r == -EEXIST)
            continue;
        if (r < 0)
            return r;
        mapped += r / VMEM_PAGE_SIZE;
    }
    return mapped;
}

/* ---------------------------------------------------------------------------------------
 * The demand-fault fast path (urgent channel), in C threads that never take the GIL.
 *
 * Measured here, a Python round trip (read the fault, ask, receive, place) costs ~30 us of
 * interpreter time before any waiting; these threads do the same work in a few us.  They
 * share the present-page arrays with Python (numpy memory) under one pthread mutex; the
 * Python side places background pages through vmem_pc_dest_place, under the same mutex.
 * The urgent channel's records are drawn in vmem/format/postcopy.py.
 * ------------------------------------------------------------------------------------- */
#define VMEM_PC_REC_PAGE_DATA 0x564D0014u   /* vmem.format.wire.PostcopyRecordType.PAGE_DATA */
#define VMEM_PC_REC_FAULT 0x564D0015u       /* vmem.format.wire.PostcopyRecordType.FAULT */
#define VMEM_PC_MAX_PAGES 1024              /* vmem.format.wire.MAX_PAGES_PER_RECORD */
#define VMEM_PC_MISSING 0
#define VMEM_PC_PLACING 1
#define VMEM_PC_PRESENT 2

/* ---- the handles and statistics (_DECLARATIONS, shared with the cdef) */
""" + _DECLARATIONS + r"""
/* The fault threads mostly sleep in poll(); when a fault arrives they must not wait
   behind the busy push threads (and the guest) for a CPU: they run at nice -15 (needs
   CAP_SYS_NICE; else the default) with a short EEVDF slice of VMEM_PC_SLICE_NS (Linux >=
   6.12: sched_setattr's sched_runtime for SCHED_OTHER).

   Why the slice: a high weight alone does not make a woken thread preempt the one running.
   EEVDF lets the running thread finish its own slice first (RUN_TO_PARITY; 1.4 ms on 2
   CPUs, /proc/<pid>/sched's se.slice), unless the woken one asks for a shorter slice
   (PREEMPT_SHORT) -- so a nice -15 fault thread still waited for the push's threads 1-4 ms
   at a time (a 1 GiB guest at 5,000 pages/s, perf sched timehist: its scheduling delays
   ended when the runner's slice did, at a timer tick or a system call's exit), and those
   waits were the p99.  Measured (docs/performance.md, "The fault threads' slice"), two A/B
   rounds at 5,000 pages/s: p99 median 686 / 244 us without the slice, 188 / 236 us with it.

   SCHED_FIFO is the stronger tool and is implemented, but not the default: measured on this
   2-vCPU VM under load (scripts/bench_postcopy.py, same run, interleaved), FIFO fault
   threads cut the p99 from 2-6 ms to ~0.9 ms but raised the p50 from ~35 us to ~100 us --
   an RT thread woken by an RT thread of equal priority is sent to the other CPU (a
   reschedule IPI, costly in a VM), twice per round trip.  The limit
   (vmem_pc_set_priority_limit) says the most a thread asks for.  Returns VMEM_PC_PRIO_*. */
#define VMEM_PC_PRIO_NORMAL 0
#define VMEM_PC_PRIO_NICE 1
#define VMEM_PC_PRIO_SLICE 2
#define VMEM_PC_PRIO_FIFO 3
#define VMEM_PC_RT_PRIORITY 10
#define VMEM_PC_NICE (-15)
#define VMEM_PC_SLICE_NS 100000     /* the shortest custom slice Linux accepts */
/* The most a fault thread may ask for (benchmarks compare with less: vmem.migration.inject). */
static int vmem_pc_priority_limit = VMEM_PC_PRIO_SLICE;

static void vmem_pc_set_priority_limit(int most)
{
    vmem_pc_priority_limit = most;
}

/* struct sched_attr (include/uapi/linux/sched/types.h; glibc has no wrapper) */
struct vmem_sched_attr {
    uint32_t size, sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime, sched_deadline, sched_period;
    uint32_t sched_util_min, sched_util_max;
};

static int64_t vmem_pc_slice_ns = VMEM_PC_SLICE_NS;

/* Test-only: ask for another slice (0: VMEM_PC_SLICE_NS) -- e.g. one the kernel clamps. */
static void vmem_pc_set_slice_ns(int64_t ns)
{
    vmem_pc_slice_ns = ns > 0 ? ns : VMEM_PC_SLICE_NS;
}

/* The calling thread (already at VMEM_PC_NICE) asks for a vmem_pc_slice_ns slice; 1 if the
   kernel holds exactly that -- read back, since a kernel without custom slices (< 6.12)
   accepts the call and ignores the runtime of a SCHED_OTHER thread, and one with them
   clamps a runtime out of its range instead of refusing it. */
static int vmem_pc_short_slice(void)
{
    struct vmem_sched_attr a = { .size = sizeof a, .sched_policy = SCHED_OTHER, .sched_nice = VMEM_PC_NICE,
                                 .sched_runtime = (uint64_t)vmem_pc_slice_ns };
    if (syscall(SYS_sched_setattr, 0, &a, 0) != 0)
        return 0;
    struct vmem_sched_attr got;
    memset(&got, 0, sizeof got);
    if (syscall(SYS_sched_getattr, 0, &got, (unsigned)sizeof got, 0) != 0)
        return 0;
    return got.sched_policy == SCHED_OTHER && got.sched_runtime == (uint64_t)vmem_pc_slice_ns;
}

/* The calling thread asks for the most of VMEM_PC_PRIO_* up to `most` the host permits.
   Returns what it got. */
static int vmem_pc_boost_upto(int most)
{
    struct sched_param sp = { .sched_priority = VMEM_PC_RT_PRIORITY };
    if (most >= VMEM_PC_PRIO_FIFO && pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp) == 0)
        return VMEM_PC_PRIO_FIFO;
    if (most >= VMEM_PC_PRIO_NICE &&
        setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), VMEM_PC_NICE) == 0)
        return most >= VMEM_PC_PRIO_SLICE && vmem_pc_short_slice() ? VMEM_PC_PRIO_SLICE : VMEM_PC_PRIO_NICE;
    return VMEM_PC_PRIO_NORMAL;
}

static int vmem_pc_boost_self(void)
{
    return vmem_pc_boost_upto(vmem_pc_priority_limit);
}

/* The calling thread asks for what a fault thread asks for (a benchmark's floor measured
   with the fault threads' scheduling).  Returns VMEM_PC_PRIO_*. */
static int vmem_pc_boost_current(void)
{
    return vmem_pc_boost_self();
}

static void *vmem_pc_probe_main(void *arg)
{
    *(int *)arg = vmem_pc_boost_self();
    return NULL;
}

/* What a fault thread would get here with the current limit (vmem doctor; raise the limit
   first to ask whether SCHED_FIFO is permitted): VMEM_PC_PRIO_*, or -errno if no thread
   could be started to try. */
static int vmem_pc_probe_priority(void)
{
    pthread_t t;
    int got = VMEM_PC_PRIO_NORMAL;
    int rc = pthread_create(&t, NULL, vmem_pc_probe_main, &got);
    if (rc != 0)
        return -rc;
    pthread_join(t, NULL);
    return got;
}

/* A mutex a SCHED_FIFO fault thread shares with normal threads (the Python placer): with
   priority inheritance, so that a placer preempted while holding it (a loaded host) runs at
   the fault thread's priority until it lets go, instead of the fault thread waiting for the
   scheduler to come back to it -- seen here as multi-millisecond p99 under load. */
static void vmem_pi_mutex_init(pthread_mutex_t *m)
{
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    if (pthread_mutexattr_setprotocol(&a, PTHREAD_PRIO_INHERIT) != 0 || pthread_mutex_init(m, &a) != 0)
        pthread_mutex_init(m, NULL);
    pthread_mutexattr_destroy(&a);
}

/* One fault thread: it polls up to two fds and a wake pipe, calls each fd's handler when
   the fd is ready, and ends when woken (stop) or when a handler fails; the failure's errno
   goes to *error under *mu (the owner's statistics). */
#define VMEM_WORKER_MAX_FDS 2
typedef int (*vmem_worker_handler)(void *owner);

struct vmem_worker {
    pthread_t thr;
    int running;
    int64_t *priority;                             /* VMEM_PC_PRIO_* the thread got (under *mu) */
    int priority_limit;                            /* the most it asks for (set before start) */
    int cpu;                                       /* pin the thread to this CPU (-1: no; before start) */
    int64_t *cpu_got;                              /* the CPU it is pinned to, -1, or -errno (under *mu) */
    int wake[2];
    int nfds;
    struct pollfd fds[VMEM_WORKER_MAX_FDS + 1];   /* the watched fds, then the wake pipe */
    short ready[VMEM_WORKER_MAX_FDS];              /* revents that call the handler */
    vmem_worker_handler handler[VMEM_WORKER_MAX_FDS];
    void *owner;
    pthread_mutex_t *mu;
    int64_t *error;
};

static int vmem_worker_init(struct vmem_worker *w, void *owner, pthread_mutex_t *mu, int64_t *error,
                            int64_t *priority, int64_t *cpu_got)
{
    w->running = 0;
    w->priority = priority;
    w->cpu = -1;
    w->cpu_got = cpu_got;
    *cpu_got = -1;
    w->priority_limit = vmem_pc_priority_limit;   /* the process default; a migration may ask for more */
    w->nfds = 0;
    w->owner = owner;
    w->mu = mu;
    w->error = error;
    return pipe2(w->wake, O_CLOEXEC | O_NONBLOCK) == 0 ? 0 : -errno;
}

static void vmem_worker_watch(struct vmem_worker *w, int fd, short ready, vmem_worker_handler handler)
{
    w->fds[w->nfds] = (struct pollfd){ fd, POLLIN, 0 };
    w->ready[w->nfds] = ready;
    w->handler[w->nfds] = handler;
    w->nfds++;
}

static void vmem_worker_fail(struct vmem_worker *w, int err)
{
    pthread_mutex_lock(w->mu);
    *w->error = err;
    pthread_mutex_unlock(w->mu);
}

static void *vmem_worker_main(void *arg)
{
    struct vmem_worker *w = arg;
    /* a name in ps, top, perf and sched traces (the fault path's latency is traced by thread) */
    pthread_setname_np(pthread_self(), "vmem-pc-fault");
    /* Pinned first (--fault-cpu): a SCHED_FIFO thread wakes on the CPU it last ran on, so
       the pin decides where every one of its wake-ups lands. */
    int64_t cpu_got = -1;
    if (w->cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(w->cpu, &set);
        int rc = pthread_setaffinity_np(pthread_self(), sizeof set, &set);
        cpu_got = rc == 0 ? w->cpu : -rc;
    }
    int prio = vmem_pc_boost_upto(w->priority_limit);
    pthread_mutex_lock(w->mu);
    *w->priority = prio;
    *w->cpu_got = cpu_got;
    pthread_mutex_unlock(w->mu);
    w->fds[w->nfds] = (struct pollfd){ w->wake[0], POLLIN, 0 };
    for (;;) {
        int n = poll(w->fds, (nfds_t)w->nfds + 1, 1000);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            vmem_worker_fail(w, errno);
            break;
        }
        if (w->fds[w->nfds].revents)
            break;
        int rc = 0;
        for (int i = 0; i < w->nfds && rc == 0; i++)
            if (w->fds[i].revents & w->ready[i])
                rc = w->handler[i](w->owner);
        if (rc < 0) {
            vmem_worker_fail(w, -rc);
            break;
        }
    }
    return NULL;
}

/* The most the worker's thread asks for (VMEM_PC_PRIO_*), instead of the process default;
   before vmem_worker_start (a running thread has chosen already). */
static void vmem_worker_set_priority_limit(struct vmem_worker *w, int most)
{
    if (!w->running)
        w->priority_limit = most;
}

/* Pin the worker's thread to `cpu` (>= 0, < CPU_SETSIZE; -1: not pinned); before
   vmem_worker_start.  The thread records what it got (cpu_got). */
static void vmem_worker_set_cpu(struct vmem_worker *w, int cpu)
{
    if (!w->running)
        w->cpu = cpu >= 0 && cpu < CPU_SETSIZE ? cpu : -1;
}

static int vmem_worker_start(struct vmem_worker *w)
{
    int rc = pthread_create(&w->thr, NULL, vmem_worker_main, w);
    if (rc == 0)
        w->running = 1;
    return -rc;
}

static void vmem_worker_stop(struct vmem_worker *w)
{
    if (w->running) {
        char c = 'x';
        ssize_t ignored = write(w->wake[1], &c, 1);
        (void)ignored;
        pthread_join(w->thr, NULL);
        w->running = 0;
    }
}

static void vmem_worker_destroy(struct vmem_worker *w)
{
    vmem_worker_stop(w);
    close(w->wake[0]);
    close(w->wake[1]);
}

/* A socket that hung up or failed is read too: the read reports why. */
#define VMEM_READY_SOCKET (POLLIN | POLLHUP | POLLERR | POLLNVAL)

/* ---- the urgent link: plain, with transport.secure.MacChannel's integrity frames, or
 * with transport.seal.SealedChannel's (the same frames, the payload AES-256-GCM encrypted:
 * a TLS link's urgent connection, whose TLS this code cannot speak; mac == 2 below)
 *
 * On a keyed link the urgent connection speaks MacChannel's framing (transport/secure.py),
 * taken over from the Python channel after its attach exchange (MacChannel.native_handoff):
 *     u32 length (1..VMEM_MAC_MAX_PAYLOAD) | payload | tag[16]
 *     tag = AES-256-GMAC(direction key, nonce 0^4 | u64 seq, u64 seq | u32 length | payload)
 * (transport/gmac.py computes the same tag in Python)
 * with one sequence number per direction, so a forged, replayed, reordered or truncated
 * frame fails the check (-EBADMSG: the thread stops, the migration fails).  Records may span
 * frames; a receiver hands out only verified bytes. */

#define VMEM_MAC_MAX_PAYLOAD (1u << 20)   /* transport.secure.MAX_FRAME_PAYLOAD_BYTES */
#define VMEM_MAC_TAG 16
#define VMEM_MAC_PREFIX 12                 /* u64 seq | u32 length, hashed before the payload */
/* A link reads what has arrived into a buffer of this size and hands it out from there: a
   record (a fault's FAULT, an answer's PAGE_DATA of a page) arrives whole and costs one
   read() instead of one per field (length, header, pfns, payload) -- two to three system
   calls fewer per demand fault (measured: 7.2-7.4 -> 4.4-4.6 read() calls per fault system-wide in a
   one-host post-copy, docs/performance.md; what it buys in latency is within this VM's noise).
   A read of at least this much goes straight to its caller. */
#define VMEM_LINK_RAW_BYTES (64u << 10)

struct vmem_link {
    int fd;
    int mac;                               /* 0: plain, 1: GMAC tags, 2: sealed (AES-256-GCM) */
    transport_gmac *send_mac, *recv_mac;   /* transport's GMAC (gmac_fragment.py), keyed once */
    EVP_CIPHER_CTX *send_gcm, *recv_gcm;   /* sealed: libcrypto's AES-256-GCM, keyed once */
    uint64_t send_seq, recv_seq;
    uint8_t *rx, *tx;                      /* prefix | payload | tag, VMEM_MAC_MAX_PAYLOAD each */
    size_t rx_len, rx_pos;                 /* verified payload in rx + VMEM_MAC_PREFIX */
    uint8_t *raw;                          /* read from fd, not consumed yet: [raw_pos, raw_len) */
    size_t raw_len, raw_pos;
};

static void vmem_link_free_gcm(struct vmem_link *l)
{
    EVP_CIPHER_CTX_free(l->send_gcm);      /* clears the key schedule */
    EVP_CIPHER_CTX_free(l->recv_gcm);
    l->send_gcm = l->recv_gcm = NULL;
}

static int vmem_link_set_mac(struct vmem_link *l, const uint8_t *send_key, const uint8_t *recv_key,
                             uint64_t send_seq, uint64_t recv_seq, int sealed)
{
    size_t room = VMEM_MAC_PREFIX + VMEM_MAC_MAX_PAYLOAD + VMEM_MAC_TAG;
    if (!l->rx && !(l->rx = malloc(room)))
        return -ENOMEM;
    if (!l->tx && !(l->tx = malloc(room)))
        return -ENOMEM;
    transport_gmac_free(l->send_mac);
    transport_gmac_free(l->recv_mac);
    l->send_mac = l->recv_mac = NULL;
    vmem_link_free_gcm(l);
    if (sealed) {
        if (!(l->send_gcm = EVP_CIPHER_CTX_new()) || !(l->recv_gcm = EVP_CIPHER_CTX_new())) {
            vmem_link_free_gcm(l);
            return -ENOMEM;
        }
        if (EVP_EncryptInit_ex(l->send_gcm, EVP_aes_256_gcm(), NULL, send_key, NULL) != 1 ||
            EVP_DecryptInit_ex(l->recv_gcm, EVP_aes_256_gcm(), NULL, recv_key, NULL) != 1) {
            vmem_link_free_gcm(l);
            return -EIO;
        }
    } else {
        int rc = transport_gmac_new(send_key, &l->send_mac);
        if (rc < 0 || (rc = transport_gmac_new(recv_key, &l->recv_mac)) < 0)
            return rc;
    }
    l->send_seq = send_seq;
    l->recv_seq = recv_seq;
    l->rx_len = l->rx_pos = 0;
    l->mac = sealed ? 2 : 1;
    return 0;
}

static void vmem_link_free(struct vmem_link *l)
{
    free(l->rx);
    free(l->tx);
    free(l->raw);
    transport_gmac_free(l->send_mac);      /* clears the keys too */
    transport_gmac_free(l->recv_mac);
    vmem_link_free_gcm(l);
}

/* The GCM nonce of frame seq: 0^4 | u64 seq, little-endian (transport.gmac._IV). */
static void vmem_gcm_iv(uint8_t iv[12], uint64_t seq)
{
    memset(iv, 0, 4);
    memcpy(iv + 4, &seq, 8);
}

/* Sealed frames: encrypt msg[VMEM_MAC_PREFIX..+len) in place, the prefix (seq | length) as
   authenticated data; the tag into tag.  0 or -EIO. */
static int vmem_gcm_seal(EVP_CIPHER_CTX *c, uint64_t seq, uint8_t *msg, uint32_t len, uint8_t tag[VMEM_MAC_TAG])
{
    uint8_t iv[12];
    int outl;
    vmem_gcm_iv(iv, seq);
    if (EVP_EncryptInit_ex(c, NULL, NULL, NULL, iv) != 1 ||
        EVP_EncryptUpdate(c, NULL, &outl, msg, VMEM_MAC_PREFIX) != 1 ||
        EVP_EncryptUpdate(c, msg + VMEM_MAC_PREFIX, &outl, msg + VMEM_MAC_PREFIX, (int)len) != 1 ||
        EVP_EncryptFinal_ex(c, tag, &outl) != 1 ||
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, VMEM_MAC_TAG, tag) != 1)
        return -EIO;
    return 0;
}

/* Decrypt msg[VMEM_MAC_PREFIX..+len) in place and check tag.  0, -EBADMSG (the bytes are
   then garbage: never handed out), -EIO. */
static int vmem_gcm_open(EVP_CIPHER_CTX *c, uint64_t seq, uint8_t *msg, uint32_t len, const uint8_t *tag)
{
    uint8_t iv[12], want[VMEM_MAC_TAG], end[16];
    int outl;
    vmem_gcm_iv(iv, seq);
    memcpy(want, tag, VMEM_MAC_TAG);
    if (EVP_DecryptInit_ex(c, NULL, NULL, NULL, iv) != 1 ||
        EVP_DecryptUpdate(c, NULL, &outl, msg, VMEM_MAC_PREFIX) != 1 ||
        EVP_DecryptUpdate(c, msg + VMEM_MAC_PREFIX, &outl, msg + VMEM_MAC_PREFIX, (int)len) != 1 ||
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, VMEM_MAC_TAG, want) != 1)
        return -EIO;
    return EVP_DecryptFinal_ex(c, end, &outl) == 1 ? 0 : -EBADMSG;
}

/* The frame tag: GMAC = AES-GCM over msg as authenticated data, no plaintext, nonce
   0^4 | seq (u64, little-endian as transport.gmac packs it), computed by transport's C
   GMAC -- the code transport.gmac runs, so both ends agree by construction.  0 or -EIO. */
static int vmem_gmac(transport_gmac *g, uint64_t seq, const uint8_t *msg, size_t n, uint8_t tag[VMEM_MAC_TAG])
{
    return transport_gmac_tag(g, seq, 1, &msg, &n, 1, NULL, tag);
}

static void vmem_mac_prefix(uint8_t *p, uint64_t seq, uint32_t len)
{
    memcpy(p, &seq, 8);                    /* little-endian on x86-64, as struct "<QI" */
    memcpy(p + 8, &len, 4);
}

/* The next n bytes of the connection's byte stream into dst: what was read ahead first, then
   one read() of whatever has arrived (up to VMEM_LINK_RAW_BYTES; the rest stays for the next
   call), repeated until n bytes are had; a remainder of at least VMEM_LINK_RAW_BYTES is read
   straight into dst.  0, -EPIPE at EOF (even after some bytes), -ENOMEM, -errno. */
static int vmem_link_recv(struct vmem_link *l, void *dst, size_t n)
{
    uint8_t *out = dst;
    while (n > 0) {
        if (l->raw_pos < l->raw_len) {
            size_t take = l->raw_len - l->raw_pos;
            if (take > n)
                take = n;
            memcpy(out, l->raw + l->raw_pos, take);
            l->raw_pos += take;
            out += take;
            n -= take;
            continue;
        }
        if (n >= VMEM_LINK_RAW_BYTES)
            return vmem_read_full(l->fd, out, n);
        if (!l->raw && !(l->raw = malloc(VMEM_LINK_RAW_BYTES)))
            return -ENOMEM;
        ssize_t r = vmem_read_some(l->fd, l->raw, VMEM_LINK_RAW_BYTES);
        if (r < 0)
            return (int)r;
        if (r == 0)
            return -EPIPE;
        l->raw_pos = 0;
        l->raw_len = (size_t)r;
    }
    return 0;
}

/* Read and verify the next frame into rx.  0, -EPIPE at a clean end, -EBADMSG if forged. */
static int vmem_link_fill(struct vmem_link *l)
{
    uint32_t len;
    int rc = vmem_link_recv(l, &len, 4);
    if (rc < 0)
        return rc;
    if (len == 0 || len > VMEM_MAC_MAX_PAYLOAD)
        return -EBADMSG;
    if ((rc = vmem_link_recv(l, l->rx + VMEM_MAC_PREFIX, (size_t)len + VMEM_MAC_TAG)) < 0)
        return rc == -EPIPE ? -EBADMSG : rc;   /* truncated inside a frame */
    vmem_mac_prefix(l->rx, l->recv_seq, len);
    if (l->mac == 2) {
        if ((rc = vmem_gcm_open(l->recv_gcm, l->recv_seq, l->rx, len, l->rx + VMEM_MAC_PREFIX + len)) < 0)
            return rc;
    } else {
        uint8_t tag[VMEM_MAC_TAG];
        if (vmem_gmac(l->recv_mac, l->recv_seq, l->rx, VMEM_MAC_PREFIX + (size_t)len, tag) < 0)
            return -EIO;
        if (CRYPTO_memcmp(tag, l->rx + VMEM_MAC_PREFIX + len, VMEM_MAC_TAG) != 0)
            return -EBADMSG;
    }
    l->recv_seq++;
    l->rx_len = len;
    l->rx_pos = 0;
    return 0;
}

/* Read exactly n bytes (verified ones on a keyed link).  0 or -errno. */
static int vmem_link_read(struct vmem_link *l, void *dst, size_t n)
{
    if (!l->mac)
        return vmem_link_recv(l, dst, n);
    uint8_t *out = dst;
    while (n > 0) {
        if (l->rx_pos == l->rx_len) {
            int rc = vmem_link_fill(l);
            if (rc < 0)
                return rc;
        }
        size_t take = l->rx_len - l->rx_pos;
        if (take > n)
            take = n;
        memcpy(out, l->rx + VMEM_MAC_PREFIX + l->rx_pos, take);
        l->rx_pos += take;
        out += take;
        n -= take;
    }
    return 0;
}

/* Bytes already read from the fd and not consumed (verified ones, or ones read ahead): the fd
   may not poll readable for them, so a handler goes on while this says so. */
static int vmem_link_pending(const struct vmem_link *l)
{
    return (l->mac && l->rx_pos < l->rx_len) || l->raw_pos < l->raw_len;
}

/* Write all of iov (framed and tagged on a keyed link: the bytes are copied first, so a
   tag always matches what goes out).  0 or -errno. */
static int vmem_link_writev(struct vmem_link *l, struct iovec *iov, int iovcnt)
{
    if (!l->mac)
        return vmem_writev_full(l->fd, iov, iovcnt);
    int i = 0;
    size_t off = 0;                        /* into iov[i] */
    while (i < iovcnt) {
        uint32_t len = 0;
        uint8_t *payload = l->tx + VMEM_MAC_PREFIX;
        while (i < iovcnt && len < VMEM_MAC_MAX_PAYLOAD) {
            size_t take = iov[i].iov_len - off;
            if (take > VMEM_MAC_MAX_PAYLOAD - len)
                take = VMEM_MAC_MAX_PAYLOAD - len;
            memcpy(payload + len, (const uint8_t *)iov[i].iov_base + off, take);
            len += (uint32_t)take;
            off += take;
            if (off == iov[i].iov_len) {
                i++;
                off = 0;
            }
        }
        if (len == 0)
            break;
        vmem_mac_prefix(l->tx, l->send_seq, len);
        uint8_t tag[VMEM_MAC_TAG];
        if (l->mac == 2 ? vmem_gcm_seal(l->send_gcm, l->send_seq, l->tx, len, tag) < 0
                        : vmem_gmac(l->send_mac, l->send_seq, l->tx, VMEM_MAC_PREFIX + (size_t)len, tag) < 0)
            return -EIO;
        memcpy(payload + len, tag, VMEM_MAC_TAG);
        l->send_seq++;
        /* on the wire: length | payload | tag, contiguous from tx + 8 */
        struct iovec frame = { l->tx + 8, 4 + (size_t)len + VMEM_MAC_TAG };
        int rc = vmem_writev_full(l->fd, &frame, 1);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* ---- destination: the guest's faults and the answers to them */

struct vmem_pc_dest {
    int uffd, urgent_fd, ram_fd;
    struct vmem_link link;     /* the urgent connection (fd urgent_fd) */
    struct vmem_worker w;
    uint64_t base;
    int64_t npages;
    uint8_t *state, *requested, *received;
    int64_t *fault_t0, *lat;
    uint64_t *digests;
    const uint8_t *view;       /* this process's mapping of the RAM file (digests of placed pages) */
    int64_t lat_cap;
    pthread_mutex_t mu;
    struct vmem_pc_dest_stats st;   /* under mu */
    /* The placement gate: every pwrite into the RAM file is made holding it (digesting and
       mapping are not).  The kernel serialises writes to one shmem file anyway (the inode
       lock), so the gate costs no parallelism; what it adds is the order and the priority: a
       piece is not started while a demand answer waits (urgent_waiting), and the holder
       inherits the waiting fault thread's priority. */
    pthread_mutex_t gate;
    int urgent_waiting;        /* the fault thread wants the gate (atomic) */
    int64_t bg_pages;          /* background pages written through the gate so far (atomic) */
    /* Demand answers are memcpy'd into the view (a writable MAP_SHARED mapping of the RAM
       file) rather than pwritten: a store through a mapping takes neither the gate nor the
       shmem inode lock that every pwrite takes, so an answer never waits behind a piece of
       the push.  Sched tracing showed that wait (the fault thread spinning on the gate while
       the push's 1 MiB pwrite ran, or the push preempted holding it) as most of the fault
       p99 at 5,000 pages/s.  The guest still cannot see the page before UFFDIO_CONTINUE (it
       has no PTE for it: the fault is trapped), and the digest is still of what the RAM file
       then holds.  Only with a writable view (vmem_pc_dest_set_view_writes). */
    int view_writes;
    uint8_t *staging;          /* the thread's receive buffer, VMEM_PC_MAX_PAGES pages */
    int64_t pfns[VMEM_PC_MAX_PAGES], rows[VMEM_PC_MAX_PAGES], mine[VMEM_PC_MAX_PAGES];
};

static int vmem_pc_handle_faults(void *owner);
static int vmem_pc_handle_urgent(void *owner);

/* 0 and *out, or -errno (ENOMEM, or the pipe's EMFILE/ENFILE): nothing is left allocated. */
static int vmem_pc_dest_new(vmem_pc_dest **out, int uffd, int urgent_fd, int ram_fd, uint64_t base, int64_t npages,
                            uint8_t *state, uint8_t *requested, uint8_t *received, int64_t *fault_t0,
                            uint64_t *digests, int64_t *lat, int64_t lat_cap, int64_t missing, const uint8_t *view)
{
    int rc;
    vmem_pc_dest *h = calloc(1, sizeof *h);
    if (!h)
        return -ENOMEM;
    h->staging = aligned_alloc(VMEM_PAGE_SIZE, VMEM_PC_MAX_PAGES * VMEM_PAGE_SIZE);
    if (!h->staging) {
        free(h);
        return -ENOMEM;
    }
    if ((rc = vmem_worker_init(&h->w, h, &h->mu, &h->st.error, &h->st.priority, &h->st.cpu)) < 0) {
        free(h->staging);
        free(h);
        return rc;
    }
    vmem_worker_watch(&h->w, uffd, POLLIN, vmem_pc_handle_faults);
    vmem_worker_watch(&h->w, urgent_fd, VMEM_READY_SOCKET, vmem_pc_handle_urgent);
    h->uffd = uffd; h->urgent_fd = urgent_fd; h->ram_fd = ram_fd; h->base = base; h->npages = npages;
    h->link.fd = urgent_fd;
    h->state = state; h->requested = requested; h->received = received; h->fault_t0 = fault_t0;
    h->digests = digests; h->view = view; h->lat = lat; h->lat_cap = lat_cap; h->st.missing = missing;
    vmem_pi_mutex_init(&h->mu);
    vmem_pi_mutex_init(&h->gate);
    *out = h;
    return 0;
}

/* Claim the MISSING pages among pfns[0..n) (-> PLACING); rows[] / mine[] get the claimed
   ones.  Returns how many.  Caller holds nothing. */
static size_t vmem_pc_claim(vmem_pc_dest *h, const int64_t *pfns, size_t n, int64_t *rows, int64_t *mine)
{
    size_t k = 0;
    pthread_mutex_lock(&h->mu);
    for (size_t i = 0; i < n; i++) {
        int64_t p = pfns[i];
        if (p >= 0 && p < h->npages && h->state[p] == VMEM_PC_MISSING) {
            h->state[p] = VMEM_PC_PLACING;
            rows[k] = (int64_t)i;
            mine[k] = p;
            k++;
        }
    }
    h->st.duplicates += (int64_t)(n - k);
    pthread_mutex_unlock(&h->mu);
    return k;
}

static void vmem_pc_mark_present(vmem_pc_dest *h, const int64_t *mine, size_t k)
{
    int64_t now = vmem_now_ns();
    pthread_mutex_lock(&h->mu);
    for (size_t i = 0; i < k; i++) {
        int64_t p = mine[i];
        h->state[p] = VMEM_PC_PRESENT;
        h->received[p] = 1;
        if (h->fault_t0[p]) {
            if (h->st.latency_count < h->lat_cap) {
                /* one row of the fault log: latency, page, when the guest faulted */
                int64_t *row = h->lat + 3 * h->st.latency_count++;
                row[0] = now - h->fault_t0[p];
                row[1] = p;
                row[2] = h->fault_t0[p];
            }
            h->fault_t0[p] = 0;
        }
        if (h->requested[p])
            h->st.pages_demanded++;
        else
            h->st.pages_pushed++;
    }
    h->st.missing -= (int64_t)k;
    if (h->st.missing == 0 && !h->st.t_complete_ns)
        h->st.t_complete_ns = now;
    pthread_mutex_unlock(&h->mu);
}

/* ---- the background push gives way to demand answers (QEMU's postcopy-preempt, at the
 * point where they meet here: the RAM file's write lock).  Measured before: a demand answer's
 * one-page pwrite waited behind the push's 4 MiB pwrite (~1 ms on fresh shmem) -- the p99.
 * Now the push is placed in pieces of VMEM_PC_PIECE_PAGES (1 MiB: still >= 256 pages a
 * syscall) and a piece does not start while a demand answer waits, so an answer waits for
 * at most the piece in progress.  Test-only (vmem.migration.inject PUSH_PIECES_ENV):
 * vmem_pc_set_push_pieces changes the piece size, turns the giving way off and makes each
 * piece slow, so tests can show what the statistics catch without it. */
#define VMEM_PC_PIECE_PAGES 256
#define VMEM_PC_YIELD_MAX_NS 5000000   /* a piece never waits longer than this (a stuck answer) */
static int64_t vmem_pc_piece_pages = VMEM_PC_PIECE_PAGES;
static int vmem_pc_piece_yield = 1;
/* test-only off switch of the demand answers' view writes (vmem_pc_set_push_pieces) */
static int vmem_pc_view_writes_allowed = 1;
static int64_t vmem_pc_piece_slow_us = 0;

static void vmem_pc_set_push_pieces(int64_t piece_pages, int yield, int64_t slow_us, int view_writes)
{
    vmem_pc_piece_pages = piece_pages > 0 ? piece_pages : VMEM_PC_PIECE_PAGES;
    vmem_pc_piece_yield = yield;
    vmem_pc_piece_slow_us = slow_us > 0 ? slow_us : 0;
    __atomic_store_n(&vmem_pc_view_writes_allowed, view_writes, __ATOMIC_RELAXED);
}

/* The RAM mapping given as view is writable: demand answers are copied into it (see
   struct vmem_pc_dest.view_writes).  Without a view this stays off. */
static void vmem_pc_dest_set_view_writes(vmem_pc_dest *h, int on)
{
    h->view_writes = on && h->view != NULL;
}

/* One placer's passage through the placement gate (vmem_place_pages_gated). */
struct vmem_place_gate {
    vmem_pc_dest *h;
    int urgent;                /* the fault thread (else the background push) */
    int waited;                /* urgent: the gate was busy at the first pwrite */
    int64_t before, ahead;     /* urgent: bg_pages when it asked / placed before it got in */
};

/* Whether this placement is a demand answer copied through the view (no gate). */
static int vmem_gate_view_write(const struct vmem_place_gate *g)
{
    return g->urgent && g->h->view_writes && __atomic_load_n(&vmem_pc_view_writes_allowed, __ATOMIC_RELAXED);
}

static int vmem_gate_enter(struct vmem_place_gate *g)
{
    vmem_pc_dest *h = g->h;
    if (!g->urgent) {
        pthread_mutex_lock(&h->gate);
        return 0;
    }
    if (pthread_mutex_trylock(&h->gate) != 0) {
        pthread_mutex_lock(&h->gate);
        if (!g->waited) {
            g->waited = 1;
            g->ahead = __atomic_load_n(&h->bg_pages, __ATOMIC_ACQUIRE) - g->before;
        }
    }
    return 0;
}

static void vmem_gate_leave(struct vmem_place_gate *g, size_t pages)
{
    vmem_pc_dest *h = g->h;
    if (!g->urgent)
        __atomic_add_fetch(&h->bg_pages, (int64_t)pages, __ATOMIC_RELEASE);   /* before the gate opens */
    pthread_mutex_unlock(&h->gate);
}

/* The fault thread's placement of claimed pages: through the gate ahead of the push. */
static int64_t vmem_pc_place_urgent(vmem_pc_dest *h, const uint8_t *staging, const int64_t *rows,
                                    const int64_t *mine, size_t k)
{
    struct vmem_place_gate g = { h, 1, 0, 0, 0 };
    __atomic_store_n(&h->urgent_waiting, 1, __ATOMIC_SEQ_CST);
    g.before = __atomic_load_n(&h->bg_pages, __ATOMIC_ACQUIRE);
    int64_t rc = vmem_place_pages_gated(h->ram_fd, h->uffd, h->base, staging, rows, mine, k, h->digests, h->view, &g);
    __atomic_store_n(&h->urgent_waiting, 0, __ATOMIC_SEQ_CST);
    int waited = g.waited;
    int64_t ahead = g.ahead;
    if (waited) {
        pthread_mutex_lock(&h->mu);
        h->st.fault_waits++;
        if (ahead > h->st.push_pages_ahead_max)
            h->st.push_pages_ahead_max = ahead;
        pthread_mutex_unlock(&h->mu);
    }
    return rc;
}

/* Python's background placement of claimed pages: a piece at a time, each after any
   waiting demand answer. */
static int64_t vmem_pc_place_pieces(vmem_pc_dest *h, const uint8_t *staging, const int64_t *rows,
                                    const int64_t *mine, size_t k)
{
    size_t piece = (size_t)vmem_pc_piece_pages;
    for (size_t i = 0; i < k; i += piece) {
        size_t m = k - i < piece ? k - i : piece;
        if (vmem_pc_piece_yield && __atomic_load_n(&h->urgent_waiting, __ATOMIC_SEQ_CST)) {
            int64_t t0 = vmem_now_ns();
            while (__atomic_load_n(&h->urgent_waiting, __ATOMIC_SEQ_CST) && vmem_now_ns() - t0 < VMEM_PC_YIELD_MAX_NS)
                sched_yield();
            pthread_mutex_lock(&h->mu);
            h->st.push_yields++;
            pthread_mutex_unlock(&h->mu);
        }
        int64_t rc;
        if (vmem_pc_piece_slow_us) {
            /* test-only: the whole piece is placed in one hold of the gate that first sleeps
               slow_us, as one slow pwrite of all its m pages would, and its pages count
               before the gate opens -- so an answer that waited at any moment of the piece
               sees all m of them ahead of it */
            pthread_mutex_lock(&h->gate);
            usleep((useconds_t)vmem_pc_piece_slow_us);
            rc = vmem_place_pages_gated(h->ram_fd, h->uffd, h->base, staging, rows + i, mine + i, m, h->digests,
                                        h->view, NULL);
            __atomic_add_fetch(&h->bg_pages, (int64_t)m, __ATOMIC_RELEASE);
            pthread_mutex_unlock(&h->gate);
        } else {
            struct vmem_place_gate g = { h, 0, 0, 0, 0 };
            rc = vmem_place_pages_gated(h->ram_fd, h->uffd, h->base, staging, rows + i, mine + i, m, h->digests,
                                        h->view, &g);
        }
        if (rc < 0)
            return rc;
    }
    return (int64_t)k;
}

/* Place a batch held in staging rows 0..n-1: claim, pwrite, digest from the RAM file,
   CONTINUE, mark.  Thread-safe (Python's background placer and the fault thread both call
   it; `urgent` says which). */
static int64_t vmem_pc_place_batch(vmem_pc_dest *h, const uint8_t *staging, const int64_t *pfns, size_t n,
                                   int64_t *rows, int64_t *mine, int urgent)
{
    if (urgent) {
        size_t k = vmem_pc_claim(h, pfns, n, rows, mine);
        if (k == 0)
            return 0;
        int64_t rc = vmem_pc_place_urgent(h, staging, rows, mine, k);
        if (rc < 0)
            return rc;   /* the pages stay PLACING: the migration fails (reported by the caller) */
        vmem_pc_mark_present(h, mine, k);
        return (int64_t)k;
    }
    /* The background push claims, places and marks a piece at a time, not the whole batch:
       a page claimed (PLACING) is one the guest must wait for, since the fault thread does not
       ask the source for it again.  Claimed for the whole batch, a fault on a page of its last
       piece waited for every piece before it (~1 ms for 1,024 pages of fresh shmem); now it
       waits for one piece at most, and a page of a later piece is still MISSING, so it is
       asked for and answered on the urgent channel. */
    size_t piece = (size_t)vmem_pc_piece_pages;
    int64_t placed = 0;
    for (size_t i = 0; i < n; i += piece) {
        size_t m = n - i < piece ? n - i : piece;
        size_t k = vmem_pc_claim(h, pfns + i, m, rows, mine);
        if (k == 0)
            continue;
        for (size_t j = 0; j < k; j++)
            rows[j] += (int64_t)i;   /* staging rows of the whole batch */
        int64_t rc = vmem_pc_place_pieces(h, staging, rows, mine, k);
        if (rc < 0)
            return rc;   /* the pages stay PLACING: the migration fails (reported by the caller) */
        vmem_pc_mark_present(h, mine, k);
        placed += (int64_t)k;
    }
    return placed;
}

static int64_t vmem_pc_dest_place(vmem_pc_dest *h, const uint8_t *staging, const int64_t *pfns, size_t n)
{
    int64_t rows[VMEM_PC_MAX_PAGES], mine[VMEM_PC_MAX_PAGES];
    if (n > VMEM_PC_MAX_PAGES)
        return -EINVAL;
    return vmem_pc_place_batch(h, staging, pfns, n, rows, mine, 0);
}

/* Read the guest's faults: map present pages here, ask the source for missing ones. */
static int vmem_pc_handle_faults(void *owner)
{
    vmem_pc_dest *h = owner;
    struct uffd_msg msgs[64];
    int64_t ask[64];
    size_t nask = 0;
    ssize_t r = read(h->uffd, msgs, sizeof msgs);
    if (r < 0)
        return (errno == EAGAIN || errno == EINTR) ? 0 : -errno;
    size_t cnt = (size_t)r / sizeof(struct uffd_msg);
    int64_t now = vmem_now_ns();
    for (size_t i = 0; i < cnt; i++) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
            continue;
        uint64_t addr = msgs[i].arg.pagefault.address & ~(uint64_t)(VMEM_PAGE_SIZE - 1);
        if (addr < h->base)
            continue;
        int64_t p = (int64_t)((addr - h->base) / VMEM_PAGE_SIZE);
        if (p >= h->npages)
            continue;
        pthread_mutex_lock(&h->mu);
        h->st.fault_events++;
        uint8_t st = h->state[p];
        if (st != VMEM_PC_PRESENT) {
            if (!h->fault_t0[p])
                h->fault_t0[p] = now;
            if (st == VMEM_PC_MISSING && !h->requested[p]) {
                h->requested[p] = 1;
                h->st.demand_faults++;
                ask[nask++] = p;
            }
            pthread_mutex_unlock(&h->mu);
            continue;
        }
        h->st.local_faults++;
        pthread_mutex_unlock(&h->mu);
        /* Present: map it here (EEXIST = someone did; waiters are woken either way). */
        int64_t rc;
        if (msgs[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_MINOR)
            rc = vmem_uffd_fill(h->uffd, VMEM_UFFD_FILL_CONTINUE, addr, 0, VMEM_PAGE_SIZE, 0);
        else
            rc = vmem_uffd_fill(h->uffd, VMEM_UFFD_FILL_ZEROPAGE, addr, 0, VMEM_PAGE_SIZE, 0);
        if (rc < 0 && rc != -EEXIST)
            return (int)rc;
    }
    if (nask) {
        uint32_t hdr[4] = { VMEM_PC_REC_FAULT, (uint32_t)(8 + 8 * nask), (uint32_t)nask, 0 };
        struct iovec iov[2] = { { hdr, sizeof hdr }, { ask, 8 * nask } };
        return vmem_link_writev(&h->link, iov, 2);
    }
    return 0;
}

/* Read the head of one urgent-channel record -- u32 type, u32 length, u32 count, u32 0,
 * then u64 pfn[count] -- into pfns, checking the type, the count (1..VMEM_PC_MAX_PAGES), a
 * length of 8 + 8*count + payload_per_page*count, and every pfn < npages.  Returns the count,
 * or -errno (-EPROTO for a malformed record).  The payload, if any, is left unread. */
static int vmem_pc_read_pfns(struct vmem_link *l, uint32_t type, uint32_t payload_per_page, int64_t npages,
                             int64_t *pfns)
{
    uint32_t hdr[4];
    int rc = vmem_link_read(l, hdr, sizeof hdr);
    if (rc < 0)
        return rc;
    uint32_t count = hdr[2];
    if (hdr[0] != type || hdr[3] != 0 || count == 0 || count > VMEM_PC_MAX_PAGES ||
        hdr[1] != 8 + 8 * count + payload_per_page * count)
        return -EPROTO;
    if ((rc = vmem_link_read(l, pfns, 8 * (size_t)count)) < 0)
        return rc;
    for (uint32_t i = 0; i < count; i++)
        if (pfns[i] < 0 || pfns[i] >= npages)
            return -EPROTO;
    return (int)count;
}

/* Read PAGE_DATA answers from the urgent channel and place them (every one already
   verified and buffered, on a keyed link, before returning to poll). */
static int vmem_pc_handle_urgent(void *owner)
{
    vmem_pc_dest *h = owner;
    do {
        int rc = vmem_pc_read_pfns(&h->link, VMEM_PC_REC_PAGE_DATA, VMEM_PAGE_SIZE, h->npages, h->pfns);
        if (rc < 0)
            return rc;
        uint32_t count = (uint32_t)rc;
        if ((rc = vmem_link_read(&h->link, h->staging, (size_t)count * VMEM_PAGE_SIZE)) < 0)
            return rc;
        int64_t placed = vmem_pc_place_batch(h, h->staging, h->pfns, count, h->rows, h->mine, 1);
        if (placed < 0)
            return (int)placed;
    } while (vmem_link_pending(&h->link));
    return 0;
}

/* The fault thread asks for at most `most` (VMEM_PC_PRIO_*) instead of the process default
   (vmem_pc_set_priority_limit): one migration's choice (--fault-sched).  Before start. */
static void vmem_pc_dest_set_priority_limit(vmem_pc_dest *h, int most)
{
    vmem_worker_set_priority_limit(&h->w, most);
}

/* The fault thread is pinned to `cpu` (--fault-cpu; -1: not).  Before start. */
static void vmem_pc_dest_set_cpu(vmem_pc_dest *h, int cpu)
{
    vmem_worker_set_cpu(&h->w, cpu);
}

static void vmem_pc_dest_free(vmem_pc_dest *h)
{
    if (!h)
        return;
    vmem_worker_destroy(&h->w);
    pthread_mutex_destroy(&h->mu);
    pthread_mutex_destroy(&h->gate);
    vmem_link_free(&h->link);
    free(h->staging);
    free(h);
}


/* ---- source: answer the destination's faults from RAM */

struct vmem_pc_src {
    int urgent_fd;
    struct vmem_link link;     /* the urgent connection (fd urgent_fd) */
    struct vmem_worker w;
    const uint8_t *ram;
    int64_t npages;
    uint8_t *sent;
    int64_t *cursor;           /* [0] pfn of the newest fault, [1] bumped on every fault,
                                  [2] FAULT records being answered right now (the pusher backs off) */
    pthread_mutex_t mu;
    struct vmem_pc_src_stats st;   /* under mu */
    int64_t pfns[VMEM_PC_MAX_PAGES];
    struct iovec iov[VMEM_PC_MAX_PAGES + 1];
    uint64_t head[2 + VMEM_PC_MAX_PAGES];
};

static int vmem_pc_src_serve(void *owner);
static int vmem_pc_src_answer(vmem_pc_src *h);

/* 0 and *out, or -errno (ENOMEM, or the pipe's EMFILE/ENFILE): nothing is left allocated. */
static int vmem_pc_src_new(vmem_pc_src **out, int urgent_fd, const uint8_t *ram, int64_t npages, uint8_t *sent,
                           int64_t *cursor)
{
    int rc;
    vmem_pc_src *h = calloc(1, sizeof *h);
    if (!h)
        return -ENOMEM;
    if ((rc = vmem_worker_init(&h->w, h, &h->mu, &h->st.error, &h->st.priority, &h->st.cpu)) < 0) {
        free(h);
        return rc;
    }
    vmem_worker_watch(&h->w, urgent_fd, VMEM_READY_SOCKET, vmem_pc_src_serve);
    h->urgent_fd = urgent_fd; h->ram = ram; h->npages = npages; h->sent = sent; h->cursor = cursor;
    h->link.fd = urgent_fd;
    vmem_pi_mutex_init(&h->mu);
    *out = h;
    return 0;
}

/* Read FAULT records and answer each with the pages, straight from RAM (writev; on a keyed
   link copied into integrity frames). */
static int vmem_pc_src_serve(void *owner)
{
    vmem_pc_src *h = owner;
    /* Outstanding from the moment the record is readable until its answer is written: the
       pusher (PostcopySource.push) does not start a batch meanwhile. */
    __atomic_add_fetch(&h->cursor[2], 1, __ATOMIC_SEQ_CST);
    int rc = vmem_pc_src_answer(h);
    __atomic_sub_fetch(&h->cursor[2], 1, __ATOMIC_SEQ_CST);
    return rc;
}

static int vmem_pc_src_answer(vmem_pc_src *h)
{
    do {
        int rc = vmem_pc_read_pfns(&h->link, VMEM_PC_REC_FAULT, 0, h->npages, h->pfns);
        if (rc < 0)
            return rc;
        uint32_t count = (uint32_t)rc;
        h->head[0] = (uint64_t)VMEM_PC_REC_PAGE_DATA | ((uint64_t)(8 + 8 * count + VMEM_PAGE_SIZE * count) << 32);
        h->head[1] = count;
        h->iov[0].iov_base = h->head;
        h->iov[0].iov_len = 16 + 8 * (size_t)count;
        for (uint32_t i = 0; i < count; i++) {
            h->head[2 + i] = (uint64_t)h->pfns[i];
            h->iov[1 + i].iov_base = (void *)(h->ram + (uint64_t)h->pfns[i] * VMEM_PAGE_SIZE);
            h->iov[1 + i].iov_len = VMEM_PAGE_SIZE;
        }
        if ((rc = vmem_link_writev(&h->link, h->iov, (int)count + 1)) < 0)
            return rc;
        for (uint32_t i = 0; i < count; i++)
            h->sent[h->pfns[i]] = 1;
        h->cursor[0] = h->pfns[count - 1];
        __atomic_add_fetch(&h->cursor[1], 1, __ATOMIC_RELEASE);
        pthread_mutex_lock(&h->mu);
        h->st.fault_records += 1;
        h->st.pages_sent += count;
        pthread_mutex_unlock(&h->mu);
    } while (vmem_link_pending(&h->link));
    return 0;
}

/* As vmem_pc_dest_set_priority_limit, for the source's fault thread. */
static void vmem_pc_src_set_priority_limit(vmem_pc_src *h, int most)
{
    vmem_worker_set_priority_limit(&h->w, most);
}

/* As vmem_pc_dest_set_cpu, for the source's fault thread. */
static void vmem_pc_src_set_cpu(vmem_pc_src *h, int cpu)
{
    vmem_worker_set_cpu(&h->w, cpu);
}

static void vmem_pc_src_free(vmem_pc_src *h)
{
    if (!h)
        return;
    vmem_worker_destroy(&h->w);
    pthread_mutex_destroy(&h->mu);
    vmem_link_free(&h->link);
    free(h);
}

/* ---- start / stop / statistics: the same for both handles (a worker w, stats st under mu) */
#define VMEM_PC_HANDLE_OPS(kind)                                                              \
    static int vmem_pc_##kind##_start(vmem_pc_##kind *h) { return vmem_worker_start(&h->w); } \
    static void vmem_pc_##kind##_stop(vmem_pc_##kind *h) { vmem_worker_stop(&h->w); }        \
    static void vmem_pc_##kind##_stats(vmem_pc_##kind *h, struct vmem_pc_##kind##_stats *out) \
    {                                                                                         \
        pthread_mutex_lock(&h->mu);                                                           \
        *out = h->st;                                                                         \
        pthread_mutex_unlock(&h->mu);                                                         \
    }
VMEM_PC_HANDLE_OPS(dest)
VMEM_PC_HANDLE_OPS(src)

/* Before start: the urgent link carries MacChannel frames, or transport.seal's sealed ones
   (`sealed`; keys and next sequence numbers from native_handoff).  0, -ENOMEM or -EIO. */
static int vmem_pc_dest_set_mac(vmem_pc_dest *h, const uint8_t *send_key, const uint8_t *recv_key,
                                uint64_t send_seq, uint64_t recv_seq, int sealed)
{
    return vmem_link_set_mac(&h->link, send_key, recv_key, send_seq, recv_seq, sealed);
}

static int vmem_pc_src_set_mac(vmem_pc_src *h, const uint8_t *send_key, const uint8_t *recv_key,
                               uint64_t send_seq, uint64_t recv_seq, int sealed)
{
    return vmem_link_set_mac(&h->link, send_key, recv_key, send_seq, recv_seq, sealed);
}
"""
