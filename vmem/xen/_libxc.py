"""The one module that touches Xen's C libraries: libxenctrl and libxenforeignmemory
through cffi in ABI mode (no compiler, no Xen headers: dom0 needs only python3-cffi).

Everything here is a typed function that raises :class:`OSError` (errno from the library)
or returns plain Python/numpy values; nothing above this module sees ``ffi`` or ``lib``.

Version notes (Xen 4.17, Debian bookworm's xen-utils-4.17):

* 4.17 split log-dirty out of ``xc_shadow_control``: ``xc_logdirty_control`` takes the
  bitmap as a *hypercall buffer* (``xc__hypercall_buffer_alloc_pages``), not a pointer.
* ``xc_domaininfo_t`` is ``struct xen_domctl_getdomaininfo`` (interface version 0x15);
  only its first fields are read here, at the offsets that version defines.
* PVH/HVM guests are mapped by GFN (identity p2m); PV guests would need MFNs.
"""
from __future__ import annotations

import errno
import mmap
import threading

import numpy as np

__all__ = ["XcHandle", "LibxcUnavailable", "XTAB_TYPE", "PAGE_SIZE", "DomainInfo"]

PAGE_SIZE = 4096
#: XEN_DOMCTL_PFINFO_XTAB: the pfn type of a frame that is not populated.
XTAB_TYPE = 0xF << 28
#: XEN_DOMCTL_PFINFO_LTAB_MASK: the type nibble of xc_get_pfn_type_batch's words.
PFINFO_LTAB_MASK = 0xF << 28
# XEN_DOMCTL_SHADOW_OP_*
_SOP_OFF, _SOP_ENABLE_LOGDIRTY, _SOP_CLEAN, _SOP_PEEK = 0, 2, 11, 12
#: XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL: the save's last CLEAN (domain suspended); Xen first
#: marks dirty the guest frames it keeps mapped for writing itself (hvm_mapped_guest_frames_mark_dirty)
_LOGDIRTY_FINAL = 1 << 0
# XEN_DOMINF_* flags (xen/include/public/domctl.h)
DOMINF_DYING, DOMINF_HVM, DOMINF_SHUTDOWN, DOMINF_PAUSED, DOMINF_BLOCKED, DOMINF_RUNNING = 1, 2, 4, 8, 16, 32
#: sizeof(xc_domaininfo_t) is 120 on 4.17; read into a larger buffer to be safe.
_DOMINFO_BUF_BYTES = 256

_CDEF = """
typedef struct xc_interface_core xc_interface;
typedef struct xenforeignmemory_handle xenforeignmemory_handle;
typedef unsigned long xen_pfn_t;
struct xc_hypercall_buffer { void *hbuf; struct xc_hypercall_buffer *param_shadow; int dir; void *ubuf; size_t sz; };
typedef struct xc_hypercall_buffer xc_hypercall_buffer_t;
typedef struct { uint32_t fault_count; uint32_t dirty_count; } xc_shadow_op_stats_t;
xc_interface *xc_interface_open(void *logger, void *dombuild_logger, unsigned open_flags);
int xc_interface_close(xc_interface *xch);
int xc_domain_pause(xc_interface *xch, uint32_t domid);
int xc_domain_unpause(xc_interface *xch, uint32_t domid);
int xc_domain_resume(xc_interface *xch, uint32_t domid, int fast); /* libxenguest, not libxenctrl */
int xc_domain_getinfolist(xc_interface *xch, uint32_t first_domain, unsigned int max_domains, void *info);
int xc_domain_maximum_gpfn(xc_interface *xch, uint32_t domid, xen_pfn_t *gpfns);
int xc_get_pfn_type_batch(xc_interface *xch, uint32_t dom, unsigned int num, xen_pfn_t *arr);
int xc_domain_hvm_getcontext(xc_interface *xch, uint32_t domid, uint8_t *ctxt_buf, uint32_t size);
int xc_hvm_param_get(xc_interface *handle, uint32_t dom, uint32_t param, uint64_t *value);
int xc_domain_get_tsc_info(xc_interface *xch, uint32_t domid, uint32_t *tsc_mode, uint64_t *elapsed_nsec,
                           uint32_t *gtsc_khz, uint32_t *incarnation);
void *xc__hypercall_buffer_alloc_pages(xc_interface *xch, xc_hypercall_buffer_t *b, int nr_pages);
void xc__hypercall_buffer_free_pages(xc_interface *xch, xc_hypercall_buffer_t *b, int nr_pages);
long long xc_logdirty_control(xc_interface *xch, uint32_t domid, unsigned int sop, xc_hypercall_buffer_t *dirty_bitmap,
                              unsigned long pages, unsigned int mode, xc_shadow_op_stats_t *stats);
typedef struct xc_cpu_policy xc_cpu_policy_t; /* libxenguest, opaque */
int xc_cpu_policy_get_size(xc_interface *xch, uint32_t *nr_leaves, uint32_t *nr_msrs);
xc_cpu_policy_t *xc_cpu_policy_init(void);
void xc_cpu_policy_destroy(xc_cpu_policy_t *policy);
int xc_cpu_policy_get_domain(xc_interface *xch, uint32_t domid, xc_cpu_policy_t *policy);
int xc_cpu_policy_serialise(xc_interface *xch, const xc_cpu_policy_t *policy, void *leaves, uint32_t *nr_leaves,
                            void *msrs, uint32_t *nr_msrs);
xenforeignmemory_handle *xenforeignmemory_open(void *logger, unsigned open_flags);
int xenforeignmemory_close(xenforeignmemory_handle *fmem);
void *xenforeignmemory_map(xenforeignmemory_handle *fmem, uint32_t dom, int prot, size_t pages,
                           const xen_pfn_t arr[], int err[]);
int xenforeignmemory_unmap(xenforeignmemory_handle *fmem, void *addr, size_t pages);
"""

_lock = threading.Lock()
_loaded: tuple | None = None


class LibxcUnavailable(OSError):
    """Xen's libraries cannot be used here (not dom0, no xen-utils, no cffi)."""


def _libs():
    """(ffi, libxenctrl, libxenforeignmemory, libxenguest), loaded once."""
    global _loaded
    with _lock:
        if _loaded is None:
            try:
                from cffi import FFI
            except ImportError as err:
                raise LibxcUnavailable(errno.ENOSYS, f"python cffi is missing ({err}); install python3-cffi") from None
            ffi = FFI()
            ffi.cdef(_CDEF)
            try:
                xc = ffi.dlopen("libxenctrl.so.4.17")
                fm = ffi.dlopen("libxenforeignmemory.so.1")
                xg = ffi.dlopen("libxenguest.so.4.17")  # xc_domain_resume lives here in 4.17
            except OSError as err:
                raise LibxcUnavailable(errno.ENOENT, f"Xen 4.17's libxenctrl/libxenforeignmemory cannot be loaded "
                                                     f"({err}); run in a Xen dom0 with xen-utils-4.17") from None
            _loaded = (ffi, xc, fm, xg)
        return _loaded


class DomainInfo:
    """The fields of ``xc_domaininfo_t`` vmem uses."""

    __slots__ = ("domid", "flags", "tot_pages", "max_pages", "nr_online_vcpus")

    def __init__(self, raw: bytes):
        self.domid = int.from_bytes(raw[0:2], "little")
        self.flags = int.from_bytes(raw[4:8], "little")
        self.tot_pages = int.from_bytes(raw[8:16], "little")
        self.max_pages = int.from_bytes(raw[16:24], "little")
        self.nr_online_vcpus = int.from_bytes(raw[64:68], "little")

    @property
    def shutdown_reason(self) -> int | None:
        """SHUTDOWN_* reason if the domain is shut down (2 = suspend), else None."""
        return (self.flags >> 16) & 0xFF if self.flags & DOMINF_SHUTDOWN else None

    @property
    def paused(self) -> bool:
        return bool(self.flags & DOMINF_PAUSED)

    @property
    def alive(self) -> bool:
        return not self.flags & (DOMINF_DYING | DOMINF_SHUTDOWN)


class XcHandle:
    """An open libxenctrl + libxenforeignmemory pair for one domain.

    Guarantees: ``close()`` turns log-dirty off if this handle turned it on, frees the
    hypercall buffer and closes both handles; it is idempotent and runs on ``with`` exit.
    """

    def __init__(self, domid: int):
        self._ffi, self._xc, self._fm, self._xg = _libs()
        ffi = self._ffi
        self.domid = int(domid)
        self._xch = self._xc.xc_interface_open(ffi.NULL, ffi.NULL, 0)
        if self._xch == ffi.NULL:
            raise LibxcUnavailable(ffi.errno or errno.EPERM, "xc_interface_open failed (not dom0, or /dev/xen/privcmd missing?)")
        self._fmh = self._fm.xenforeignmemory_open(ffi.NULL, 0)
        if self._fmh == ffi.NULL:
            self._xc.xc_interface_close(self._xch)
            raise LibxcUnavailable(ffi.errno or errno.EPERM, "xenforeignmemory_open failed")
        self._hb = None
        self._bitmap = None
        self._bitmap_pages = 0
        self._logdirty_on = False

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            e = self._ffi.errno or errno.EIO
            raise OSError(e, f"{what} on domain {self.domid}: {errno.errorcode.get(e, e)}")
        return rc

    # -- domain control --------------------------------------------------------------------

    def info(self) -> DomainInfo:
        """The domain's info; raises ``OSError(ESRCH)`` if it no longer exists."""
        buf = self._ffi.new(f"unsigned char[{_DOMINFO_BUF_BYTES}]")
        n = self._check(self._xc.xc_domain_getinfolist(self._xch, self.domid, 1, buf), "xc_domain_getinfolist")
        info = DomainInfo(bytes(self._ffi.buffer(buf, _DOMINFO_BUF_BYTES)))
        if n < 1 or info.domid != self.domid:
            raise OSError(errno.ESRCH, f"domain {self.domid} does not exist")
        return info

    def pause(self) -> None:
        self._check(self._xc.xc_domain_pause(self._xch, self.domid), "xc_domain_pause")

    def unpause(self) -> None:
        self._check(self._xc.xc_domain_unpause(self._xch, self.domid), "xc_domain_unpause")

    def resume_suspended(self) -> None:
        """Resume a domain that suspended itself (cooperative resume: the guest returns from
        its suspend hypercall with 1, "cancelled", and reconnects nothing)."""
        self._check(self._xg.xc_domain_resume(self._xch, self.domid, 1), "xc_domain_resume")

    def max_gpfn(self) -> int:
        out = self._ffi.new("xen_pfn_t *")
        self._check(self._xc.xc_domain_maximum_gpfn(self._xch, self.domid, out), "xc_domain_maximum_gpfn")
        return int(out[0])

    def pfn_types(self, pfns: np.ndarray) -> np.ndarray:
        """Type words (``XEN_DOMCTL_PFINFO_*``, upper nibble of 32 bits) of ``pfns``, 1024 per call."""
        pfns = np.ascontiguousarray(pfns, dtype=np.uint64)
        out = np.empty(len(pfns), dtype=np.uint64)
        arr = self._ffi.new("xen_pfn_t[1024]")
        view = np.frombuffer(self._ffi.buffer(arr), dtype=np.uint64)
        for i in range(0, len(pfns), 1024):
            n = min(1024, len(pfns) - i)
            view[:n] = pfns[i:i + n]
            self._check(self._xc.xc_get_pfn_type_batch(self._xch, self.domid, n, arr), "xc_get_pfn_type_batch")
            out[i:i + n] = view[:n] & PFINFO_LTAB_MASK
        return out

    def hvm_context(self) -> bytes:
        """The domain's HVM save blob (vCPU registers, LAPIC, ...), as ``xl save`` records it."""
        ffi = self._ffi
        size = self._check(self._xc.xc_domain_hvm_getcontext(self._xch, self.domid, ffi.NULL, 0), "xc_domain_hvm_getcontext(size)")
        buf = ffi.new(f"uint8_t[{size}]")
        got = self._check(self._xc.xc_domain_hvm_getcontext(self._xch, self.domid, buf, size), "xc_domain_hvm_getcontext")
        return bytes(ffi.buffer(buf, got))

    def cpu_policy(self) -> tuple[bytes, bytes]:
        """The domain's CPUID and MSR policy, serialised as libxc's save writes them into
        X86_CPUID_POLICY (``xen_cpuid_leaf_t``, 24 bytes a leaf) and X86_MSR_POLICY
        (``xen_msr_entry_t``, 16 bytes an MSR) -- write_x86_cpu_policy_records()."""
        ffi, xg = self._ffi, self._xg
        nl, nm = ffi.new("uint32_t *"), ffi.new("uint32_t *")
        self._check(xg.xc_cpu_policy_get_size(self._xch, nl, nm), "xc_cpu_policy_get_size")
        leaves, msrs = ffi.new(f"uint8_t[{nl[0] * 24 + 24}]"), ffi.new(f"uint8_t[{nm[0] * 16 + 16}]")
        policy = xg.xc_cpu_policy_init()
        if policy == ffi.NULL:
            raise OSError(errno.ENOMEM, "xc_cpu_policy_init")
        try:
            self._check(xg.xc_cpu_policy_get_domain(self._xch, self.domid, policy), "xc_cpu_policy_get_domain")
            self._check(xg.xc_cpu_policy_serialise(self._xch, policy, leaves, nl, msrs, nm), "xc_cpu_policy_serialise")
        finally:
            xg.xc_cpu_policy_destroy(policy)
        return bytes(ffi.buffer(leaves, nl[0] * 24)), bytes(ffi.buffer(msrs, nm[0] * 16))

    def hvm_param(self, index: int) -> int:
        out = self._ffi.new("uint64_t *")
        self._check(self._xc.xc_hvm_param_get(self._xch, self.domid, index, out), f"xc_hvm_param_get({index})")
        return int(out[0])

    def tsc_info(self) -> tuple[int, int, int, int]:
        """(tsc_mode, elapsed_nsec, gtsc_khz, incarnation)."""
        ffi = self._ffi
        mode, ns, khz, inc = ffi.new("uint32_t *"), ffi.new("uint64_t *"), ffi.new("uint32_t *"), ffi.new("uint32_t *")
        self._check(self._xc.xc_domain_get_tsc_info(self._xch, self.domid, mode, ns, khz, inc), "xc_domain_get_tsc_info")
        return int(mode[0]), int(ns[0]), int(khz[0]), int(inc[0])

    # -- foreign mapping -------------------------------------------------------------------

    def read_pages(self, pfns: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy the pages ``pfns`` (at most 1024) into ``out[:len(pfns)]`` (uint8, rows of 4096).

        Returns the per-page error array (0 = copied; -errno = not mapped, row left zero).
        """
        ffi = self._ffi
        n = len(pfns)
        arr = ffi.new("xen_pfn_t[]", [int(p) for p in pfns]) if n < 64 else \
            ffi.from_buffer("xen_pfn_t[]", np.ascontiguousarray(pfns, dtype=np.uint64))
        err = np.zeros(n, dtype=np.int32)
        addr = self._fm.xenforeignmemory_map(self._fmh, self.domid, mmap.PROT_READ, n, arr, ffi.from_buffer("int[]", err))
        if addr == ffi.NULL:
            e = ffi.errno or errno.EIO
            raise OSError(e, f"xenforeignmemory_map of {n} pages of domain {self.domid}: {errno.errorcode.get(e, e)}")
        try:
            if not err.any():
                out[:n] = np.frombuffer(ffi.buffer(addr, n * PAGE_SIZE), dtype=np.uint8).reshape(n, PAGE_SIZE)
            else:  # a failed page's mapping faults when touched: copy the good rows only
                src = np.frombuffer(ffi.buffer(addr, n * PAGE_SIZE), dtype=np.uint8).reshape(n, PAGE_SIZE)
                good = np.flatnonzero(err == 0)
                out[good] = src[good]
                out[np.flatnonzero(err)] = 0
        finally:
            self._fm.xenforeignmemory_unmap(self._fmh, addr, n)
        return err

    def flip_byte(self, pfn: int, offset: int = 0) -> None:
        """Invert one byte of frame ``pfn`` through a writable foreign map (test-only fault
        injection: vmem's page comparison must catch it)."""
        ffi = self._ffi
        arr = ffi.new("xen_pfn_t[1]", [int(pfn)])
        err = ffi.new("int[1]")
        addr = self._fm.xenforeignmemory_map(self._fmh, self.domid, mmap.PROT_READ | mmap.PROT_WRITE, 1, arr, err)
        if addr == ffi.NULL or err[0]:
            raise OSError(ffi.errno or -err[0] or errno.EIO, f"writable foreign map of pfn {pfn:#x}")
        try:
            page = ffi.cast("unsigned char *", addr)
            page[offset] = page[offset] ^ 0xFF
        finally:
            self._fm.xenforeignmemory_unmap(self._fmh, addr, 1)

    # -- log-dirty -------------------------------------------------------------------------

    def logdirty_enable(self, npages: int) -> None:
        """Turn log-dirty on (HAP for PVH/HVM; PV needs shadow paging, absent in Debian's build)."""
        ffi = self._ffi
        bitmap_pages = (npages + 8 * PAGE_SIZE - 1) // (8 * PAGE_SIZE)
        if self._hb is None:
            hb = ffi.new("xc_hypercall_buffer_t *")
            hb.hbuf = ffi.NULL
            hb.param_shadow = ffi.NULL
            hb.dir = 0
            hb.sz = 0
            hb.ubuf = ffi.cast("void *", -1)  # HYPERCALL_BUFFER_POISON... libxc checks it is not NULL
            ptr = self._xc.xc__hypercall_buffer_alloc_pages(self._xch, hb, bitmap_pages)
            if ptr == ffi.NULL:
                raise OSError(ffi.errno or errno.ENOMEM, "xc__hypercall_buffer_alloc_pages for the dirty bitmap")
            self._hb, self._bitmap_pages = hb, bitmap_pages
            self._bitmap = np.frombuffer(ffi.buffer(ptr, bitmap_pages * PAGE_SIZE), dtype=np.uint8)
        self._npages = npages
        rc = self._xc.xc_logdirty_control(self._xch, self.domid, _SOP_ENABLE_LOGDIRTY, ffi.NULL, 0, 0, ffi.NULL)
        if rc < 0 and ffi.errno == errno.EOPNOTSUPP:
            raise OSError(errno.EOPNOTSUPP, f"log-dirty is not supported for domain {self.domid}: PV guests need "
                                            "shadow paging, which Debian's Xen build lacks; use a PVH guest")
        self._check(rc, "xc_logdirty_control(ENABLE_LOGDIRTY)")
        self._logdirty_on = True

    def logdirty_collect(self, peek: bool = False, final: bool = False) -> np.ndarray:
        """Pages dirtied since the last collect, sorted int64; CLEAN re-arms them atomically
        (PEEK leaves the bitmap as it is).  ``final``: the last collect of a save, with the
        domain suspended (libxc's XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL).

        Raises OSError if Xen covered fewer pfns than asked (libxc treats that as an error too)."""
        ffi = self._ffi
        self._bitmap[:] = 0
        stats = ffi.new("xc_shadow_op_stats_t *")
        rc = int(self._xc.xc_logdirty_control(self._xch, self.domid, _SOP_PEEK if peek else _SOP_CLEAN, self._hb,
                                              self._npages, _LOGDIRTY_FINAL if final else 0, stats))
        self._check(rc, "xc_logdirty_control(CLEAN)")
        if rc != self._npages:
            raise OSError(errno.EIO, f"xc_logdirty_control(CLEAN) on domain {self.domid} covered {rc} of "
                                     f"{self._npages} pfns")
        bits = np.unpackbits(self._bitmap[: (self._npages + 7) // 8], bitorder="little")[: self._npages]
        return np.flatnonzero(bits).astype(np.int64)

    def logdirty_disable(self) -> None:
        if self._logdirty_on:
            self._logdirty_on = False
            ffi = self._ffi
            self._check(self._xc.xc_logdirty_control(self._xch, self.domid, _SOP_OFF, ffi.NULL, 0, 0, ffi.NULL),
                        "xc_logdirty_control(OFF)")

    def close(self) -> None:
        if self._xch is None:
            return
        try:
            try:
                self.logdirty_disable()
            except OSError:
                pass  # the domain may be gone; nothing is left to turn off then
            if self._hb is not None:
                self._bitmap = None
                self._xc.xc__hypercall_buffer_free_pages(self._xch, self._hb, self._bitmap_pages)
                self._hb = None
            self._fm.xenforeignmemory_close(self._fmh)
        finally:
            self._xc.xc_interface_close(self._xch)
            self._xch = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
