"""KVM: the ioctls of a KVM guest backend (guests/kvm), the vCPU run call and the two
dirty-tracking harvests (dirty log with manual protect, dirty ring).

Debian's linux-libc-dev may be older than the running kernel: every number used is
declared below when the header lacks it.  Structures cross as raw bytes (packed and
unpacked in Python by guests/kvm/vcpu.py, whose layouts are fixed by the KVM ABI), so the
only C here is what must not run under the GIL or per page in Python: KVM_RUN, the
bitmap GET+CLEAR, and the ring walk.
"""

INCLUDES = """
#include <linux/kvm.h>
"""

TYPES = """
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_GET_FPU ...
#define KVM_SET_FPU ...
#define KVM_GET_XSAVE ...
#define KVM_SET_XSAVE ...
#define KVM_GET_MSRS ...
#define KVM_SET_MSRS ...
#define KVM_GET_MSR_INDEX_LIST ...
#define KVM_GET_LAPIC ...
#define KVM_SET_LAPIC ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_SET_CPUID2 ...
#define KVM_ENABLE_CAP ...
#define KVM_GET_TSC_KHZ ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_GET_DIRTY_LOG ...
#define KVM_CLEAR_DIRTY_LOG ...
#define KVM_RESET_DIRTY_RINGS ...
#define KVM_GET_VCPU_EVENTS ...
#define KVM_SET_VCPU_EVENTS ...
#define KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 ...
#define KVM_CAP_DIRTY_LOG_RING ...
#define KVM_CAP_DIRTY_LOG_RING_ACQ_REL ...
#define KVM_CAP_SPLIT_IRQCHIP ...
#define KVM_CAP_XSAVE ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_NR_MEMSLOTS ...
#define KVM_MEM_LOG_DIRTY_PAGES ...
#define KVM_DIRTY_LOG_PAGE_OFFSET ...
#define KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_DIRTY_RING_FULL ...
#define KVM_EXIT_INTR ...
"""

FUNCTIONS = """
int64_t vmem_kvm_ioctl(int fd, unsigned long request, uint64_t arg);
int vmem_kvm_run(int vcpu_fd);
int64_t vmem_kvm_dirty_log(int vm_fd, uint32_t slot, uint64_t *bitmap, uint64_t npages);
int64_t vmem_kvm_ring_harvest(void *ring, uint32_t nentries, uint32_t *fetch_index, uint32_t slot,
                              uint64_t *bitmap, uint64_t npages);
"""

CUSTOMIZATIONS = r"""
#ifndef KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
#define KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 168
#endif
#ifndef KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
#define KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE (1 << 0)
#endif
#ifndef KVM_CAP_DIRTY_LOG_RING
#define KVM_CAP_DIRTY_LOG_RING 192
#endif
#ifndef KVM_CAP_DIRTY_LOG_RING_ACQ_REL
#define KVM_CAP_DIRTY_LOG_RING_ACQ_REL 223
#endif
#ifndef KVM_EXIT_DIRTY_RING_FULL
#define KVM_EXIT_DIRTY_RING_FULL 31
#endif

/* Any KVM ioctl: its result (>= 0) or -errno.  EINTR is returned, not retried: a signal is
   how a vCPU is kicked. */
static int64_t vmem_kvm_ioctl(int fd, unsigned long request, uint64_t arg)
{
    int rc = ioctl(fd, request, (unsigned long)arg);
    return rc < 0 ? -errno : rc;
}

/* One KVM_RUN, outside the GIL.  0 (the exit reason is in the kvm_run page) or -errno
   (-EINTR: kicked by a signal or immediate_exit). */
static int vmem_kvm_run(int vcpu_fd)
{
    return ioctl(vcpu_fd, KVM_RUN, 0) < 0 ? -errno : 0;
}

/* Dirty log with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET copies the slot's dirty bitmap
   into `bitmap` (without re-protecting anything); CLEAR then clears those bits and
   write-protects those pages again, in one call over the whole slot.  A write between the
   two lands on a page already reported (its bit was set at GET) and is read by the
   migrator after this returns; a write after CLEAR faults and sets the bit again.  So the
   tracker contract holds: the pages returned are re-armed before the caller reads them.
   Returns the number of dirty pages, or -errno. */
static int64_t vmem_kvm_dirty_log(int vm_fd, uint32_t slot, uint64_t *bitmap, uint64_t npages)
{
    struct kvm_dirty_log log;
    memset(&log, 0, sizeof(log));
    log.slot = slot;
    log.dirty_bitmap = bitmap;
    if (ioctl(vm_fd, KVM_GET_DIRTY_LOG, &log) < 0)
        return -errno;
    uint64_t words = (npages + 63) / 64;
    int64_t count = 0;
    for (uint64_t i = 0; i < words; i++)
        count += __builtin_popcountll(bitmap[i]);
    if (count == 0)
        return 0;
    struct kvm_clear_dirty_log clear;
    memset(&clear, 0, sizeof(clear));
    clear.slot = slot;
    clear.first_page = 0;
    clear.num_pages = (uint32_t)npages;
    clear.dirty_bitmap = bitmap;
    if (ioctl(vm_fd, KVM_CLEAR_DIRTY_LOG, &clear) < 0)
        return -errno;
    return count;
}

/* Walk one vCPU's dirty ring from *fetch_index: each entry KVM published (flags DIRTY) of
   `slot` sets its page's bit in `bitmap` and is handed back (flags RESET); the caller then
   issues KVM_RESET_DIRTY_RINGS, which write-protects those pages again.  Entries are read
   with acquire and handed back with release ordering (KVM_CAP_DIRTY_LOG_RING_ACQ_REL).
   Returns the entries harvested, or -EINVAL for an entry outside the slot. */
struct vmem_dirty_gfn { uint32_t flags; uint32_t slot; uint64_t offset; };

static int64_t vmem_kvm_ring_harvest(void *ring, uint32_t nentries, uint32_t *fetch_index, uint32_t slot,
                                     uint64_t *bitmap, uint64_t npages)
{
    struct vmem_dirty_gfn *gfns = (struct vmem_dirty_gfn *)ring;
    int64_t n = 0;
    int bad = 0;
    for (;;) {
        struct vmem_dirty_gfn *e = &gfns[*fetch_index & (nentries - 1)];
        uint32_t flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);
        if (!(flags & 1u))  /* KVM_DIRTY_GFN_F_DIRTY */
            break;
        if (e->slot == slot && e->offset < npages)
            bitmap[e->offset >> 6] |= 1ULL << (e->offset & 63);
        else
            bad = 1;
        __atomic_store_n(&e->flags, 2u, __ATOMIC_RELEASE);  /* KVM_DIRTY_GFN_F_RESET */
        (*fetch_index)++;
        n++;
    }
    return bad ? -EINVAL : n;
}
"""
