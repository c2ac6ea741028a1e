"""Post-copy placement: write pages into the RAM file, then map them into the guest.

The destination guest's RAM is registered with userfaultfd MISSING|MINOR, so the guest can
see a page only once the migrator maps it (``UFFDIO_CONTINUE``): data written with
``pwrite`` sits in the page cache, invisible, until then.  A page therefore never appears
half-written.  Runs of consecutive pages (and consecutive staging rows) are one ``pwrite``
and one ``UFFDIO_CONTINUE`` each; already-mapped pages (``EEXIST``) are skipped and their
waiters woken by ``vmem_uffd_fill`` (uffd fragment).
"""

INCLUDES = """
#include <poll.h>
#include <pthread.h>
#include <time.h>
#include <sys/resource.h>
#include <sys/uio.h>
#include <linux/userfaultfd.h>
"""

TYPES = ""

FUNCTIONS = """
typedef struct vmem_pc_dest vmem_pc_dest;
typedef struct vmem_pc_src vmem_pc_src;

vmem_pc_dest *vmem_pc_dest_new(int uffd, int urgent_fd, int ram_fd, uint64_t base, int64_t npages,
                               uint8_t *state, uint8_t *requested, uint8_t *received, int64_t *fault_t0,
                               uint64_t *digests, int64_t *lat, int64_t lat_cap, int64_t missing);
int vmem_pc_dest_start(vmem_pc_dest *h);
void vmem_pc_dest_stop(vmem_pc_dest *h);
void vmem_pc_dest_free(vmem_pc_dest *h);
int64_t vmem_pc_dest_place(vmem_pc_dest *h, const uint8_t *staging, const int64_t *pfns, size_t n, uint64_t *dtmp);
void vmem_pc_dest_stats(vmem_pc_dest *h, int64_t *out);
vmem_pc_src *vmem_pc_src_new(int urgent_fd, const uint8_t *ram, int64_t npages, uint8_t *sent, int64_t *cursor);
int vmem_pc_src_start(vmem_pc_src *h);
void vmem_pc_src_stop(vmem_pc_src *h);
void vmem_pc_src_free(vmem_pc_src *h);
void vmem_pc_src_stats(vmem_pc_src *h, int64_t *out);
int64_t vmem_place_pages(int ram_fd, int uffd, uint64_t guest_base, const uint8_t *buf,
                         const int64_t *rows, const int64_t *pages, size_t n);
int64_t vmem_continue_runs(int uffd, uint64_t guest_base, const int64_t *runs, size_t nruns);
"""

CUSTOMIZATIONS = r"""
/* Place page pages[i] from staging row rows[i] (rows NULL: row i).  For each run of
   consecutive pages held in consecutive rows: one pwrite into the RAM file, then (uffd >= 0)
   one UFFDIO_CONTINUE mapping the run into the guest and waking its faulting threads.
   Returns the number of pages written, or -errno (earlier runs stay placed). */
static int64_t vmem_place_pages(int ram_fd, int uffd, uint64_t guest_base, const uint8_t *buf,
                                const int64_t *rows, const int64_t *pages, size_t n)
{
    size_t i = 0;
    while (i < n) {
        size_t j = i + 1;
        int64_t row0 = rows ? rows[i] : (int64_t)i;
        while (j < n && pages[j] == pages[j - 1] + 1 &&
               (rows ? rows[j] : (int64_t)j) == row0 + (int64_t)(j - i))
            j++;
        uint64_t len = (uint64_t)(j - i) * VMEM_PAGE_SIZE;
        int rc = vmem_pwrite_all(ram_fd, buf + (uint64_t)row0 * VMEM_PAGE_SIZE, len,
                                 (off_t)pages[i] * VMEM_PAGE_SIZE);
        if (rc < 0)
            return rc;
        if (uffd >= 0) {
            int64_t r = vmem_uffd_fill(uffd, VMEM_UFFD_FILL_CONTINUE,
                                       guest_base + (uint64_t)pages[i] * VMEM_PAGE_SIZE, 0, len, 0);
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
 * ------------------------------------------------------------------------------------- */
#define VMEM_PC_MISSING 0
#define VMEM_PC_PLACING 1
#define VMEM_PC_PRESENT 2
#define VMEM_PC_MAX_PAGES 1024
#define VMEM_PC_FAULT_TYPE 0x564D0015u
#define VMEM_PC_PAGE_TYPE 0x564D0014u

/* The fault threads mostly sleep in poll(); when a fault arrives they must not wait
   behind the busy push threads for a CPU.  Best effort: needs CAP_SYS_NICE for < 0. */
static void vmem_pc_boost_self(void)
{
    if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), -15) != 0) {
        int ignored = setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 0);
        (void)ignored;
    }
}

static int64_t vmem_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int vmem_read_full(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t r = read(fd, p, len);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EPIPE;   /* EOF */
        p += r;
        len -= (size_t)r;
    }
    return 0;
}

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

typedef struct vmem_pc_dest vmem_pc_dest;
typedef struct vmem_pc_src vmem_pc_src;

/* A worker thread that sleeps in poll() and is stopped through a wake pipe. */
struct vmem_worker {
    pthread_t thr;
    int running;
    int wake[2];
};

static int vmem_worker_init(struct vmem_worker *w)
{
    w->running = 0;
    return pipe2(w->wake, O_CLOEXEC | O_NONBLOCK) == 0 ? 0 : -errno;
}

static int vmem_worker_start(struct vmem_worker *w, void *(*fn)(void *), void *arg)
{
    int rc = pthread_create(&w->thr, NULL, fn, arg);
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

struct vmem_pc_dest {
    int uffd, urgent_fd, ram_fd;
    struct vmem_worker w;
    uint64_t base;
    int64_t npages;
    uint8_t *state, *requested, *received;
    int64_t *fault_t0, *lat;
    uint64_t *digests;
    int64_t lat_cap;
    /* statistics, under mu */
    int64_t lat_n, missing, demand_faults, fault_events, local_faults, pages_demanded,
            pages_pushed, duplicates, t_complete_ns, error;
    pthread_mutex_t mu;
    uint8_t *staging;          /* the thread's receive buffer, VMEM_PC_MAX_PAGES pages */
    int64_t pfns[VMEM_PC_MAX_PAGES], rows[VMEM_PC_MAX_PAGES], mine[VMEM_PC_MAX_PAGES];
    uint64_t dtmp[VMEM_PC_MAX_PAGES];
};

static vmem_pc_dest *vmem_pc_dest_new(int uffd, int urgent_fd, int ram_fd, uint64_t base, int64_t npages,
                                      uint8_t *state, uint8_t *requested, uint8_t *received, int64_t *fault_t0,
                                      uint64_t *digests, int64_t *lat, int64_t lat_cap, int64_t missing)
{
    vmem_pc_dest *h = calloc(1, sizeof *h);
    if (!h)
        return NULL;
    h->staging = aligned_alloc(VMEM_PAGE_SIZE, VMEM_PC_MAX_PAGES * VMEM_PAGE_SIZE);
    if (!h->staging || vmem_worker_init(&h->w) != 0) {
        free(h->staging);
        free(h);
        return NULL;
    }
    h->uffd = uffd; h->urgent_fd = urgent_fd; h->ram_fd = ram_fd; h->base = base; h->npages = npages;
    h->state = state; h->requested = requested; h->received = received; h->fault_t0 = fault_t0;
    h->digests = digests; h->lat = lat; h->lat_cap = lat_cap; h->missing = missing;
    pthread_mutex_init(&h->mu, NULL);
    return h;
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
    h->duplicates += (int64_t)(n - k);
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
            if (h->lat_n < h->lat_cap)
                h->lat[h->lat_n++] = now - h->fault_t0[p];
            h->fault_t0[p] = 0;
        }
        if (h->requested[p])
            h->pages_demanded++;
        else
            h->pages_pushed++;
    }
    h->missing -= (int64_t)k;
    if (h->missing == 0 && !h->t_complete_ns)
        h->t_complete_ns = now;
    pthread_mutex_unlock(&h->mu);
}

/* Place a batch held in staging rows 0..n-1: claim, digest, pwrite + CONTINUE, mark.
   Thread-safe (Python's background placer and the fault thread both call it). */
static int64_t vmem_pc_place_batch(vmem_pc_dest *h, const uint8_t *staging, const int64_t *pfns, size_t n,
                                   uint64_t *dtmp, int64_t *rows, int64_t *mine)
{
    size_t k = vmem_pc_claim(h, pfns, n, rows, mine);
    if (k == 0)
        return 0;
    if (h->digests) {
        for (size_t i = 0; i < k; i++)
            h->digests[mine[i]] = vmem_digest_bytes(staging + (uint64_t)rows[i] * VMEM_PAGE_SIZE);
    }
    (void)dtmp;
    int64_t rc = vmem_place_pages(h->ram_fd, h->uffd, h->base, staging, rows, mine, k);
    if (rc < 0)
        return rc;   /* the pages stay PLACING: the migration fails (reported by the caller) */
    vmem_pc_mark_present(h, mine, k);
    return (int64_t)k;
}

static int64_t vmem_pc_dest_place(vmem_pc_dest *h, const uint8_t *staging, const int64_t *pfns, size_t n, uint64_t *dtmp)
{
    int64_t rows[VMEM_PC_MAX_PAGES], mine[VMEM_PC_MAX_PAGES];
    if (n > VMEM_PC_MAX_PAGES)
        return -EINVAL;
    return vmem_pc_place_batch(h, staging, pfns, n, dtmp, rows, mine);
}

static int vmem_pc_handle_faults(vmem_pc_dest *h)
{
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
        h->fault_events++;
        uint8_t st = h->state[p];
        if (st != VMEM_PC_PRESENT) {
            if (!h->fault_t0[p])
                h->fault_t0[p] = now;
            if (st == VMEM_PC_MISSING && !h->requested[p]) {
                h->requested[p] = 1;
                h->demand_faults++;
                ask[nask++] = p;
            }
            pthread_mutex_unlock(&h->mu);
            continue;
        }
        h->local_faults++;
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
        uint32_t hdr[4] = { VMEM_PC_FAULT_TYPE, (uint32_t)(8 + 8 * nask), (uint32_t)nask, 0 };
        struct iovec iov[2] = { { hdr, sizeof hdr }, { ask, 8 * nask } };
        return vmem_writev_full(h->urgent_fd, iov, 2);
    }
    return 0;
}

static int vmem_pc_handle_urgent(vmem_pc_dest *h)
{
    uint32_t hdr[4];
    int rc = vmem_read_full(h->urgent_fd, hdr, sizeof hdr);
    if (rc < 0)
        return rc;
    uint32_t count = hdr[2];
    if (hdr[0] != VMEM_PC_PAGE_TYPE || hdr[3] != 0 || count == 0 || count > VMEM_PC_MAX_PAGES ||
        hdr[1] != 8 + 8 * count + VMEM_PAGE_SIZE * count)
        return -EPROTO;
    if ((rc = vmem_read_full(h->urgent_fd, h->pfns, 8 * (size_t)count)) < 0)
        return rc;
    for (uint32_t i = 0; i < count; i++)
        if (h->pfns[i] < 0 || h->pfns[i] >= h->npages)
            return -EPROTO;
    if ((rc = vmem_read_full(h->urgent_fd, h->staging, (size_t)count * VMEM_PAGE_SIZE)) < 0)
        return rc;
    int64_t placed = vmem_pc_place_batch(h, h->staging, h->pfns, count, h->dtmp, h->rows, h->mine);
    return placed < 0 ? (int)placed : 0;
}

static void *vmem_pc_dest_main(void *arg)
{
    vmem_pc_dest *h = arg;
    vmem_pc_boost_self();
    struct pollfd fds[3] = { { h->uffd, POLLIN, 0 }, { h->urgent_fd, POLLIN, 0 }, { h->w.wake[0], POLLIN, 0 } };
    for (;;) {
        int n = poll(fds, 3, 1000);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            h->error = errno;
            break;
        }
        if (fds[2].revents)
            break;
        int rc = 0;
        if (fds[0].revents & POLLIN)
            rc = vmem_pc_handle_faults(h);
        if (rc == 0 && (fds[1].revents & (POLLIN | POLLHUP | POLLERR)))
            rc = vmem_pc_handle_urgent(h);
        if (rc < 0) {
            h->error = -rc;
            break;
        }
    }
    return NULL;
}

static int vmem_pc_dest_start(vmem_pc_dest *h)
{
    return vmem_worker_start(&h->w, vmem_pc_dest_main, h);
}

static void vmem_pc_dest_stop(vmem_pc_dest *h)
{
    vmem_worker_stop(&h->w);
}

static void vmem_pc_dest_free(vmem_pc_dest *h)
{
    if (!h)
        return;
    vmem_worker_destroy(&h->w);
    pthread_mutex_destroy(&h->mu);
    free(h->staging);
    free(h);
}

/* out: lat_n, missing, demand_faults, fault_events, local_faults, pages_demanded,
        pages_pushed, duplicates, t_complete_ns, error */
static void vmem_pc_dest_stats(vmem_pc_dest *h, int64_t *out)
{
    pthread_mutex_lock(&h->mu);
    out[0] = h->lat_n; out[1] = h->missing; out[2] = h->demand_faults; out[3] = h->fault_events;
    out[4] = h->local_faults; out[5] = h->pages_demanded; out[6] = h->pages_pushed;
    out[7] = h->duplicates; out[8] = h->t_complete_ns; out[9] = h->error;
    pthread_mutex_unlock(&h->mu);
}

struct vmem_pc_src {
    int urgent_fd;
    struct vmem_worker w;
    const uint8_t *ram;
    int64_t npages;
    uint8_t *sent;
    int64_t *cursor;           /* [0] pfn of the newest fault, [1] bumped on every fault */
    int64_t faults_served, pages_sent, error;
    int64_t pfns[VMEM_PC_MAX_PAGES];
    struct iovec iov[VMEM_PC_MAX_PAGES + 1];
    uint64_t head[2 + VMEM_PC_MAX_PAGES];
};

static vmem_pc_src *vmem_pc_src_new(int urgent_fd, const uint8_t *ram, int64_t npages, uint8_t *sent, int64_t *cursor)
{
    vmem_pc_src *h = calloc(1, sizeof *h);
    if (!h)
        return NULL;
    if (vmem_worker_init(&h->w) != 0) {
        free(h);
        return NULL;
    }
    h->urgent_fd = urgent_fd; h->ram = ram; h->npages = npages; h->sent = sent; h->cursor = cursor;
    return h;
}

static int vmem_pc_src_serve(vmem_pc_src *h)
{
    uint32_t hdr[4];
    int rc = vmem_read_full(h->urgent_fd, hdr, sizeof hdr);
    if (rc < 0)
        return rc;
    uint32_t count = hdr[2];
    if (hdr[0] != VMEM_PC_FAULT_TYPE || hdr[3] != 0 || count == 0 || count > VMEM_PC_MAX_PAGES || hdr[1] != 8 + 8 * count)
        return -EPROTO;
    if ((rc = vmem_read_full(h->urgent_fd, h->pfns, 8 * (size_t)count)) < 0)
        return rc;
    for (uint32_t i = 0; i < count; i++)
        if (h->pfns[i] < 0 || h->pfns[i] >= h->npages)
            return -EPROTO;
    h->head[0] = (uint64_t)VMEM_PC_PAGE_TYPE | ((uint64_t)(8 + 8 * count + VMEM_PAGE_SIZE * count) << 32);
    h->head[1] = count;
    h->iov[0].iov_base = h->head;
    h->iov[0].iov_len = 16 + 8 * (size_t)count;
    for (uint32_t i = 0; i < count; i++) {
        h->head[2 + i] = (uint64_t)h->pfns[i];
        h->iov[1 + i].iov_base = (void *)(h->ram + (uint64_t)h->pfns[i] * VMEM_PAGE_SIZE);
        h->iov[1 + i].iov_len = VMEM_PAGE_SIZE;
    }
    if ((rc = vmem_writev_full(h->urgent_fd, h->iov, (int)count + 1)) < 0)
        return rc;
    for (uint32_t i = 0; i < count; i++)
        h->sent[h->pfns[i]] = 1;
    h->cursor[0] = h->pfns[count - 1];
    __atomic_add_fetch(&h->cursor[1], 1, __ATOMIC_RELEASE);
    h->faults_served += 1;
    h->pages_sent += count;
    return 0;
}

static void *vmem_pc_src_main(void *arg)
{
    vmem_pc_src *h = arg;
    vmem_pc_boost_self();
    struct pollfd fds[2] = { { h->urgent_fd, POLLIN, 0 }, { h->w.wake[0], POLLIN, 0 } };
    for (;;) {
        int n = poll(fds, 2, 1000);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            h->error = errno;
            break;
        }
        if (fds[1].revents)
            break;
        if (fds[0].revents) {
            int rc = vmem_pc_src_serve(h);
            if (rc < 0) {
                h->error = -rc;
                break;
            }
        }
    }
    return NULL;
}

static int vmem_pc_src_start(vmem_pc_src *h)
{
    return vmem_worker_start(&h->w, vmem_pc_src_main, h);
}

static void vmem_pc_src_stop(vmem_pc_src *h)
{
    vmem_worker_stop(&h->w);
}

static void vmem_pc_src_free(vmem_pc_src *h)
{
    if (!h)
        return;
    vmem_worker_destroy(&h->w);
    free(h);
}

/* out: faults_served, pages_sent, error */
static void vmem_pc_src_stats(vmem_pc_src *h, int64_t *out)
{
    out[0] = h->faults_served; out[1] = h->pages_sent; out[2] = h->error;
}
"""
