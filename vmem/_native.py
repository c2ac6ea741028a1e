"""Typed Python wrappers over the one native extension, ``vmem._vmem_native``.

This is the only module that touches the raw cffi ``lib``/``ffi``.  Everything above it
sees plain Python ints (addresses, fds, feature masks) and numpy arrays, and one error
convention: every C function returns ``-errno`` on failure and every return code passes
through :func:`_check`, which raises ``OSError(errno, strerror, context)``; ``context``
names the operation (and range) that failed.  ``OSError`` subclasses follow from the errno
(``FileExistsError`` for ``EEXIST``, ``PermissionError`` for ``EPERM``...).

Addresses are Python ints (``ndarray.ctypes.data``, ``mmap`` addresses); lengths are bytes
unless the name says ``pages``.  The C calls release the GIL (cffi API mode).

Concerns, each built from its own fragment in ``vmem/_build/``:

* memfd: :func:`memfd_create`.
* userfaultfd: :func:`uffd_open`, :func:`uffd_api`, register/unregister, write-protect,
  placement (:func:`uffd_copy`, :func:`uffd_zeropage`, :func:`uffd_continue`,
  :func:`uffd_move`, :func:`uffd_poison`), :func:`uffd_wake`, :func:`uffd_read_faults`.
  uffd ioctls act on the mm of the process that *created* the fd, whoever calls them, so
  a migrator holding a guest's uffd (received over SCM_RIGHTS) write-protects and fills
  the guest's pages at the guest's addresses.
* PAGEMAP_SCAN: :func:`pagemap_scan` (and :func:`open_pagemap`).
* the mprotect tracker (runs inside the guest): :func:`mprot_install`,
  :func:`mprot_collect`, :func:`mprot_uninstall`, :func:`mprot_fallbacks`.
* page digests: :func:`digest_pages`, :func:`digest_range`.
* process: :func:`set_pdeathsig`.
"""
from __future__ import annotations

import errno as _errno
import os
import threading

import numpy as np

from vmem._vmem_native import ffi, lib
from vmem.pages import PAGE_SHIFT, PAGE_SIZE

__all__ = [
    "PAGE_SIZE",
    "memfd_create",
    "uffd_open",
    "uffd_open_ex",
    "uffd_api",
    "uffd_register",
    "uffd_unregister",
    "uffd_writeprotect",
    "uffd_copy",
    "uffd_zeropage",
    "uffd_continue",
    "uffd_poison",
    "uffd_move",
    "uffd_wake",
    "uffd_read_faults",
    "uffd_read_fault_events",
    "UFFD_FEATURE_NAMES",
    "uffd_feature_names",
    "open_pagemap",
    "pagemap_scan",
    "mprot_install",
    "mprot_collect",
    "mprot_uninstall",
    "mprot_installed",
    "mprot_fallbacks",
    "mprot_faults",
    "digest_pages",
    "digest_range",
    "digest_impl",
    "digest_page_bytes",
    "set_pdeathsig",
    "place_pages",
    "set_place_fault",
    "PLACE_FAULTS",
    "continue_runs",
    "PostcopyFaultEngine",
    "PostcopyFaultServer",
    "FAULT_THREAD_PRIORITIES",
    "PC_PRIO_NORMAL",
    "PC_PRIO_NICE",
    "PC_PRIO_SLICE",
    "PC_PRIO_FIFO",
    "PC_RT_PRIORITY",
    "PUSH_PIECE_PAGES",
    "fault_thread_priority",
    "set_push_pieces",
    "set_fault_thread_priority_limit",
    "MAX_FAULT_CPU",
    "set_fault_thread_slice_ns",
    "boost_current_thread",
    "PC_MISSING",
    "PC_PLACING",
    "PC_PRESENT",
]

# The C code has its own copy of the page size (a compile-time constant); an extension
# built with another one must not be used.
if int(lib.VMEM_PAGE_SIZE) != PAGE_SIZE:
    raise ImportError(f"vmem._vmem_native was built for {int(lib.VMEM_PAGE_SIZE)}-byte pages, not {PAGE_SIZE}: "
                      "rebuild it (python3 vmem/_build/build_native.py)")

# --- constants -------------------------------------------------------------------------
# memfd_create(2)
MFD_CLOEXEC: int = lib.MFD_CLOEXEC
MFD_ALLOW_SEALING: int = lib.MFD_ALLOW_SEALING
MFD_HUGETLB: int = lib.MFD_HUGETLB

# userfaultfd(2) flags, API and features (include/uapi/linux/userfaultfd.h)
UFFD_API: int = lib.UFFD_API
UFFD_USER_MODE_ONLY: int = lib.UFFD_USER_MODE_ONLY
UFFD_FEATURE_PAGEFAULT_FLAG_WP: int = lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP
UFFD_FEATURE_EVENT_FORK: int = lib.UFFD_FEATURE_EVENT_FORK
UFFD_FEATURE_EVENT_REMAP: int = lib.UFFD_FEATURE_EVENT_REMAP
UFFD_FEATURE_EVENT_REMOVE: int = lib.UFFD_FEATURE_EVENT_REMOVE
UFFD_FEATURE_MISSING_HUGETLBFS: int = lib.UFFD_FEATURE_MISSING_HUGETLBFS
UFFD_FEATURE_MISSING_SHMEM: int = lib.UFFD_FEATURE_MISSING_SHMEM
UFFD_FEATURE_EVENT_UNMAP: int = lib.UFFD_FEATURE_EVENT_UNMAP
UFFD_FEATURE_SIGBUS: int = lib.UFFD_FEATURE_SIGBUS
UFFD_FEATURE_THREAD_ID: int = lib.UFFD_FEATURE_THREAD_ID
UFFD_FEATURE_MINOR_HUGETLBFS: int = lib.UFFD_FEATURE_MINOR_HUGETLBFS
UFFD_FEATURE_MINOR_SHMEM: int = lib.UFFD_FEATURE_MINOR_SHMEM
UFFD_FEATURE_EXACT_ADDRESS: int = lib.UFFD_FEATURE_EXACT_ADDRESS
UFFD_FEATURE_WP_HUGETLBFS_SHMEM: int = lib.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
UFFD_FEATURE_WP_UNPOPULATED: int = lib.UFFD_FEATURE_WP_UNPOPULATED
UFFD_FEATURE_POISON: int = lib.UFFD_FEATURE_POISON
UFFD_FEATURE_WP_ASYNC: int = lib.UFFD_FEATURE_WP_ASYNC
UFFD_FEATURE_MOVE: int = lib.UFFD_FEATURE_MOVE

#: Every UFFD_FEATURE_* bit above by its short name, in bit order (built from the constants,
#: so a feature declared above is listed here too).
UFFD_FEATURE_NAMES: dict[str, int] = dict(sorted(
    ((name.removeprefix("UFFD_FEATURE_"), bit) for name, bit in globals().items() if name.startswith("UFFD_FEATURE_")),
    key=lambda named: named[1]))

UFFDIO_REGISTER_MODE_MISSING: int = lib.UFFDIO_REGISTER_MODE_MISSING
UFFDIO_REGISTER_MODE_WP: int = lib.UFFDIO_REGISTER_MODE_WP
UFFDIO_REGISTER_MODE_MINOR: int = lib.UFFDIO_REGISTER_MODE_MINOR
UFFDIO_COPY_MODE_DONTWAKE: int = lib.UFFDIO_COPY_MODE_DONTWAKE
UFFDIO_COPY_MODE_WP: int = lib.UFFDIO_COPY_MODE_WP
UFFDIO_ZEROPAGE_MODE_DONTWAKE: int = lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE
UFFDIO_WRITEPROTECT_MODE_WP: int = lib.UFFDIO_WRITEPROTECT_MODE_WP
UFFDIO_WRITEPROTECT_MODE_DONTWAKE: int = lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
UFFDIO_CONTINUE_MODE_DONTWAKE: int = lib.UFFDIO_CONTINUE_MODE_DONTWAKE
UFFDIO_CONTINUE_MODE_WP: int = lib.UFFDIO_CONTINUE_MODE_WP
UFFDIO_POISON_MODE_DONTWAKE: int = lib.UFFDIO_POISON_MODE_DONTWAKE
UFFDIO_MOVE_MODE_DONTWAKE: int = lib.UFFDIO_MOVE_MODE_DONTWAKE
UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: int = lib.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES

# Bit numbers in the ioctls masks returned by UFFDIO_API / UFFDIO_REGISTER: test with 1 << n.
_UFFDIO_REGISTER: int = lib._UFFDIO_REGISTER
_UFFDIO_UNREGISTER: int = lib._UFFDIO_UNREGISTER
_UFFDIO_WAKE: int = lib._UFFDIO_WAKE
_UFFDIO_COPY: int = lib._UFFDIO_COPY
_UFFDIO_ZEROPAGE: int = lib._UFFDIO_ZEROPAGE
_UFFDIO_MOVE: int = lib._UFFDIO_MOVE
_UFFDIO_WRITEPROTECT: int = lib._UFFDIO_WRITEPROTECT
_UFFDIO_CONTINUE: int = lib._UFFDIO_CONTINUE
_UFFDIO_POISON: int = lib._UFFDIO_POISON
_UFFDIO_API: int = lib._UFFDIO_API

UFFD_EVENT_PAGEFAULT: int = lib.UFFD_EVENT_PAGEFAULT
UFFD_EVENT_FORK: int = lib.UFFD_EVENT_FORK
UFFD_EVENT_REMAP: int = lib.UFFD_EVENT_REMAP
UFFD_EVENT_REMOVE: int = lib.UFFD_EVENT_REMOVE
UFFD_EVENT_UNMAP: int = lib.UFFD_EVENT_UNMAP
UFFD_PAGEFAULT_FLAG_WRITE: int = lib.UFFD_PAGEFAULT_FLAG_WRITE
UFFD_PAGEFAULT_FLAG_WP: int = lib.UFFD_PAGEFAULT_FLAG_WP
UFFD_PAGEFAULT_FLAG_MINOR: int = lib.UFFD_PAGEFAULT_FLAG_MINOR

# PAGEMAP_SCAN (include/uapi/linux/fs.h)
PM_SCAN_WP_MATCHING: int = lib.PM_SCAN_WP_MATCHING
PM_SCAN_CHECK_WPASYNC: int = lib.PM_SCAN_CHECK_WPASYNC
PAGE_IS_WPALLOWED: int = lib.PAGE_IS_WPALLOWED
PAGE_IS_WRITTEN: int = lib.PAGE_IS_WRITTEN
PAGE_IS_FILE: int = lib.PAGE_IS_FILE
PAGE_IS_PRESENT: int = lib.PAGE_IS_PRESENT
PAGE_IS_SWAPPED: int = lib.PAGE_IS_SWAPPED
PAGE_IS_PFNZERO: int = lib.PAGE_IS_PFNZERO
PAGE_IS_HUGE: int = lib.PAGE_IS_HUGE
PAGE_IS_SOFT_DIRTY: int = lib.PAGE_IS_SOFT_DIRTY
PAGE_IS_GUARD: int = lib.PAGE_IS_GUARD

#: Build-time facts (what the compile-time headers had; not what the kernel supports).
BUILD_INFO: dict[str, bool] = {
    "HAS_SYS_USERFAULTFD": bool(lib.HAS_SYS_USERFAULTFD),
    "HAS_MEMFD_CREATE": bool(lib.HAS_MEMFD_CREATE),
    "HEADERS_HAVE_PAGEMAP_SCAN": bool(lib.HEADERS_HAVE_PAGEMAP_SCAN),
    "HEADERS_HAVE_UFFD_WP_ASYNC": bool(lib.HEADERS_HAVE_UFFD_WP_ASYNC),
    "HEADERS_HAVE_UFFDIO_MOVE": bool(lib.HEADERS_HAVE_UFFDIO_MOVE),
    "HEADERS_HAVE_UFFDIO_POISON": bool(lib.HEADERS_HAVE_UFFDIO_POISON),
}

_OPEN_HOW = {
    lib.VMEM_UFFD_OPEN_SYSCALL: "syscall",
    lib.VMEM_UFFD_OPEN_USER_MODE_ONLY: "syscall+UFFD_USER_MODE_ONLY",
    lib.VMEM_UFFD_OPEN_DEV: "/dev/userfaultfd",
}

_U64_MAX = (1 << 64) - 1


# --- the one error helper --------------------------------------------------------------
def _check(rc: int, context: str) -> int:
    """Return ``rc`` if non-negative; otherwise raise ``OSError(-rc, strerror, context)``."""
    if rc < 0:
        err = -rc
        raise OSError(err, os.strerror(err), context)
    return rc


def _range(start: int, length: int) -> str:
    return f"[{start:#x}, {start + length:#x})"


# --- memfd -----------------------------------------------------------------------------
def memfd_create(name: str, flags: int = MFD_CLOEXEC | MFD_ALLOW_SEALING) -> int:
    """Create an anonymous shmem file and return its fd (size 0: ``ftruncate`` it).

    Args:
        name: shown in ``/proc/<pid>/fd`` as ``memfd:<name>`` (at most 249 bytes).
        flags: ``MFD_*``; the default is close-on-exec and sealable.

    Raises:
        OSError: from memfd_create(2) (``EINVAL`` for a bad name or flags, ``EMFILE``...).

    Guarantees: the fd is owned by the caller; nothing else is created.
    """
    return _check(lib.vmem_memfd_create(name.encode(), int(flags)), f"memfd_create({name!r})")


def pwrite_pages(fd: int, buf: np.ndarray, pages: np.ndarray) -> int:
    """Write ``buf[i]`` (one 4 KiB page per row) to page ``pages[i]`` of file ``fd``.

    Runs of consecutive page numbers become one ``pwrite`` each, in C: no per-page Python.
    Writing through the file (not a mapping) allocates shmem pages without page faults and
    maps nothing into this process.

    Raises:
        ValueError: shapes do not match.  OSError: from pwrite(2); some pages may then
            have been written.
    """
    pages = np.ascontiguousarray(pages, dtype=np.int64)
    if buf.ndim != 2 or buf.shape[1] != PAGE_SIZE or len(buf) < len(pages) or not buf.flags.c_contiguous:
        raise ValueError("buf must be a C-contiguous (>= n, 4096) array")
    if len(pages) == 0:
        return 0
    return _check(
        lib.vmem_pwrite_pages(fd, ffi.cast("const uint8_t *", buf.ctypes.data),
                              ffi.cast("const int64_t *", pages.ctypes.data), len(pages), PAGE_SIZE),
        f"pwrite of {len(pages)} pages",
    )


# --- userfaultfd -----------------------------------------------------------------------
def uffd_open_ex(flags: int = os.O_CLOEXEC | os.O_NONBLOCK) -> tuple[int, str]:
    """Create a userfaultfd; return ``(fd, how)``.

    ``how`` is ``"syscall"``, ``"syscall+UFFD_USER_MODE_ONLY"`` (the plain syscall gave
    ``EPERM``, i.e. ``vm.unprivileged_userfaultfd=0`` without privilege: only faults from
    user mode are reported, and a syscall that touches missing pages fails with
    ``EFAULT``), or ``"/dev/userfaultfd"`` (Linux >= 6.1 device node).

    Raises:
        OSError: the errno of the plain syscall if every way failed (``ENOSYS``: no
            userfaultfd in this kernel; ``EPERM``: not allowed).
    """
    how = ffi.new("int *")
    fd = _check(lib.vmem_uffd_open(int(flags), how), "userfaultfd()")
    return fd, _OPEN_HOW.get(how[0], "unknown")


def uffd_open(flags: int = os.O_CLOEXEC | os.O_NONBLOCK) -> int:
    """Create a userfaultfd and return the fd; retries with UFFD_USER_MODE_ONLY on EPERM.

    The fd still needs :func:`uffd_api` before anything else.  See :func:`uffd_open_ex`
    for how it was obtained.

    Raises:
        OSError: ``ENOSYS`` (no userfaultfd), ``EPERM`` (not permitted)...
    """
    return uffd_open_ex(flags)[0]


def uffd_api(fd: int, features: int) -> int:
    """Handshake (``UFFDIO_API``), enabling ``features``; return the kernel's feature mask.

    The kernel reports *every* feature it supports in the returned mask (a superset of
    ``features``); only the requested ones are enabled on this fd.  Call it exactly once
    per fd: ``features=0`` is a pure probe that still consumes the handshake.

    Raises:
        OSError: ``EINVAL`` if a requested feature is unsupported (or the handshake was
            already done), ``EPERM`` for features needing privilege (e.g. EVENT_FORK).
    """
    features_out = ffi.new("uint64_t *")
    ioctls_out = ffi.new("uint64_t *")
    _check(lib.vmem_uffd_api(fd, int(features), features_out, ioctls_out), f"UFFDIO_API(features={features:#x})")
    return int(features_out[0])


def uffd_feature_names(mask: int) -> list[str]:
    """Short names (``"WP_ASYNC"``...) of the UFFD_FEATURE_* bits set in ``mask``."""
    return [name for name, bit in UFFD_FEATURE_NAMES.items() if mask & bit]


def uffd_register(fd: int, start: int, length: int, mode: int) -> int:
    """Register ``[start, start+length)`` of the fd's mm (``UFFDIO_REGISTER``); return the ioctls mask.

    ``mode`` is ``UFFDIO_REGISTER_MODE_*`` (MISSING, WP, MINOR; combinable).  The returned
    mask has bit ``_UFFDIO_COPY`` etc. set for each ioctl usable on the range.

    Raises:
        OSError: ``EINVAL`` (unaligned, unsupported mode for this memory), ``EBUSY``
            (registered with another uffd), ``ENOMEM`` (range not mapped).
    """
    ioctls = ffi.new("uint64_t *")
    _check(lib.vmem_uffd_register(fd, start, length, int(mode), ioctls), f"UFFDIO_REGISTER {_range(start, length)}")
    return int(ioctls[0])


def uffd_unregister(fd: int, start: int, length: int) -> None:
    """Unregister ``[start, start+length)`` (``UFFDIO_UNREGISTER``); wakes blocked faulters.

    Raises:
        OSError: ``EINVAL`` for an unaligned range; ``ENOMEM`` if the mm is gone.
    """
    _check(lib.vmem_uffd_unregister(fd, start, length), f"UFFDIO_UNREGISTER {_range(start, length)}")


def uffd_writeprotect(fd: int, start: int, length: int, protect: bool, dont_wake: bool = False) -> None:
    """Set (``protect=True``) or clear write-protection on a WP-registered range.

    Acts on the fd's mm: the caller need not be the process that owns the pages.
    ``EAGAIN`` (the mm is changing) is retried internally, a bounded number of times.
    With ``UFFD_FEATURE_WP_ASYNC`` a write to a protected page is resolved by the kernel
    and the page then reads as ``PAGE_IS_WRITTEN`` in :func:`pagemap_scan`.

    Raises:
        OSError: ``ENOENT`` (range not registered for WP), ``EINVAL``, ``ESRCH`` (mm gone).
    """
    mode = 0
    if protect:
        mode |= UFFDIO_WRITEPROTECT_MODE_WP
    if dont_wake:
        mode |= UFFDIO_WRITEPROTECT_MODE_DONTWAKE
    _check(
        lib.vmem_uffd_writeprotect(fd, start, length, mode),
        f"UFFDIO_WRITEPROTECT {_range(start, length)} protect={bool(protect)}",
    )


def _fill(op: int, name: str, fd: int, dst: int, src: int, length: int, mode: int) -> int:
    rc = lib.vmem_uffd_fill(fd, op, dst, src, length, int(mode))
    if rc == -_errno.EEXIST:  # every page was already there: benign, waiters were woken
        return rc
    return _check(rc, f"{name} {_range(dst, length)}")


def uffd_copy(fd: int, dst: int, src: int, length: int, mode: int = 0) -> int:
    """Atomically place ``length`` bytes from ``src`` (caller's memory) at ``dst`` (the fd's mm).

    ``UFFDIO_COPY``: each page becomes visible to the owner complete or not at all.  A
    partial copy is resumed; ``EAGAIN`` without progress is retried (bounded).  Pages that
    already exist are skipped and their waiters woken (unless ``UFFDIO_COPY_MODE_DONTWAKE``).

    Returns:
        bytes placed by this call, or ``-errno.EEXIST`` if every page already existed.

    Raises:
        OSError: ``ENOENT``/``EINVAL`` (range not registered / unaligned), ``ESRCH`` (the
            owner's mm is gone), ``EFAULT`` (bad ``src``).  If it raises, pages before the
            failing one may have been placed.
    """
    return _fill(lib.VMEM_UFFD_FILL_COPY, "UFFDIO_COPY", fd, dst, src, length, mode)


def uffd_zeropage(fd: int, start: int, length: int, mode: int = 0) -> int:
    """Map zero pages over a missing range (``UFFDIO_ZEROPAGE``); same contract as :func:`uffd_copy`."""
    return _fill(lib.VMEM_UFFD_FILL_ZEROPAGE, "UFFDIO_ZEROPAGE", fd, start, 0, length, mode)


def uffd_continue(fd: int, start: int, length: int, mode: int = 0) -> int:
    """Map pages already in the page cache after a MINOR fault (``UFFDIO_CONTINUE``).

    The page contents must have been written beforehand through another mapping of the
    same shmem file; the owner sees them only once this returns.  Same return/raise
    contract as :func:`uffd_copy` (``EEXIST``: already mapped).
    """
    return _fill(lib.VMEM_UFFD_FILL_CONTINUE, "UFFDIO_CONTINUE", fd, start, 0, length, mode)


def uffd_poison(fd: int, start: int, length: int, mode: int = 0) -> int:
    """Install poison markers (``UFFDIO_POISON``): later access raises SIGBUS in the owner.

    Same return/raise contract as :func:`uffd_copy`.  Needs ``UFFD_FEATURE_POISON``.
    """
    return _fill(lib.VMEM_UFFD_FILL_POISON, "UFFDIO_POISON", fd, start, 0, length, mode)


def uffd_move(fd: int, dst: int, src: int, length: int, mode: int = 0) -> int:
    """Move pages from ``src`` to ``dst`` inside the fd's mm (``UFFDIO_MOVE``); return bytes moved.

    Anonymous private memory only (not shmem).  Partial moves are resumed.

    Raises:
        OSError: ``EEXIST`` (dst populated), ``ENOENT`` (src hole without
            ``UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES``), ``EINVAL``, ``EBUSY``.
    """
    return _check(lib.vmem_uffd_move(fd, dst, src, length, int(mode)), f"UFFDIO_MOVE {_range(dst, length)}")


def uffd_wake(fd: int, start: int, length: int) -> None:
    """Wake threads blocked on faults in ``[start, start+length)`` (``UFFDIO_WAKE``).

    Raises:
        OSError: ``EINVAL`` for an unaligned range.
    """
    _check(lib.vmem_uffd_wake(fd, start, length), f"UFFDIO_WAKE {_range(start, length)}")


_fault_tls = threading.local()


def _fault_buffers(max_events: int):
    bufs = getattr(_fault_tls, "bufs", None)
    if bufs is None or bufs[0] < max_events:
        bufs = (max_events, ffi.new("uint64_t[]", max_events), ffi.new("uint64_t[]", max_events))
        _fault_tls.bufs = bufs
    return bufs[1], bufs[2]


def uffd_read_fault_events(fd: int, max_events: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Read pending fault events; return ``(addresses, flags)`` as uint64 arrays.

    ``flags`` holds ``UFFD_PAGEFAULT_FLAG_*`` (WRITE, WP, MINOR).  Non-fault events
    (fork, remap, remove, unmap) are consumed and dropped.  On a non-blocking fd nothing
    pending gives empty arrays; a blocking fd is read once (blocks until an event).

    Raises:
        OSError: from read(2) (``EBADF``...; ``EINVAL`` before ``UFFDIO_API``).
    """
    if max_events <= 0:
        empty = np.empty(0, dtype=np.uint64)
        return empty, empty.copy()
    addrs, flags = _fault_buffers(max_events)
    n = _check(lib.vmem_uffd_read_faults(fd, addrs, flags, max_events), "read(userfaultfd)")
    a = np.frombuffer(ffi.buffer(addrs, n * 8), dtype=np.uint64).copy()
    f = np.frombuffer(ffi.buffer(flags, n * 8), dtype=np.uint64).copy()
    return a, f


def uffd_read_faults(fd: int, max_events: int = 256) -> np.ndarray:
    """Read pending page-fault events; return their addresses (uint64, page-aligned unless
    ``UFFD_FEATURE_EXACT_ADDRESS``).  Empty if nothing is pending (``EAGAIN``).

    See :func:`uffd_read_fault_events` for the flags and the blocking behaviour.
    """
    return uffd_read_fault_events(fd, max_events)[0]


# --- PAGEMAP_SCAN ----------------------------------------------------------------------
_SCAN_VEC_REGIONS = 4096  # 96 KiB of page_region per thread, reused across calls
_scan_tls = threading.local()


def _scan_buffers():
    bufs = getattr(_scan_tls, "bufs", None)
    if bufs is None:
        bufs = (ffi.new("uint64_t[]", 3 * _SCAN_VEC_REGIONS), ffi.new("uint64_t *"))
        _scan_tls.bufs = bufs
    return bufs


def open_pagemap(pid: int | str = "self") -> int:
    """Open ``/proc/<pid>/pagemap`` read-only (close-on-exec) for :func:`pagemap_scan`.

    Raises:
        OSError: ``ENOENT`` (no such process), ``EACCES`` (ptrace access denied).
    """
    return os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)


def pagemap_scan(
    pagemap_fd: int,
    start: int,
    end: int,
    *,
    flags: int,
    category_mask: int,
    return_mask: int,
    category_inverted: int = 0,
    category_anyof_mask: int = 0,
    max_pages: int = 0,
) -> np.ndarray:
    """Scan ``[start, end)`` of the pagemap's process with ``PAGEMAP_SCAN``; return its regions.

    Returns:
        ``(n, 3)`` uint64 array of ``[start, end, categories]`` rows (end exclusive,
        sorted by start, page-aligned), covering the matching pages; categories are masked
        by ``return_mask``.  Rows may overlap when the kernel's ``walk_end`` made a later
        call re-walk part of the range; expand and deduplicate if you need pages.

    The ioctl is repeated from ``walk_end`` until the whole range is walked (or
    ``max_pages`` matching pages were found); each call fills at most 4096 regions.  With
    ``PM_SCAN_WP_MATCHING`` the matched pages are write-protected again *by the same walk*
    that reports them: a write after a page is reported is caught by the next scan.

    Raises:
        OSError: ``EPERM`` with ``PM_SCAN_CHECK_WPASYNC`` if part of the range is not
            registered for async WP; ``EINVAL`` (bad flags/range); ``ENOTTY`` (kernel
            without PAGEMAP_SCAN); ``ESRCH``.  If it raises after some calls succeeded,
            the pages they matched were already re-protected (and are lost to the caller).
    """
    vec, walk_end = _scan_buffers()
    chunks: list[np.ndarray] = []
    pos = int(start)
    end = int(end)
    pages_left = int(max_pages)
    while pos < end:
        n = lib.vmem_pagemap_scan(
            pagemap_fd, pos, end, int(flags), int(category_inverted), int(category_mask),
            int(category_anyof_mask), int(return_mask), pages_left, vec, _SCAN_VEC_REGIONS, walk_end,
        )
        _check(n, f"PAGEMAP_SCAN {_range(pos, end - pos)}")
        if n:
            regions = np.frombuffer(ffi.buffer(vec, n * 24), dtype=np.uint64).reshape(n, 3).copy()
            if max_pages:
                pages_left -= int(((regions[:, 1] - regions[:, 0]) >> PAGE_SHIFT).sum())
            if chunks:
                prev = chunks[-1]
                if prev[-1, 1] == regions[0, 0] and prev[-1, 2] == regions[0, 2]:
                    prev[-1, 1] = regions[0, 1]
                    regions = regions[1:]
            if len(regions):
                chunks.append(regions)
            if max_pages and pages_left <= 0:
                break
        new_pos = int(walk_end[0])
        if new_pos <= pos:  # no progress: never loop forever on a kernel surprise
            break
        pos = new_pos
    if not chunks:
        return np.empty((0, 3), dtype=np.uint64)
    if len(chunks) == 1:
        return chunks[0]
    # Seen on 6.18: a call can return walk_end short of the last region it reported, so the
    # next call walks part of the range again and reports (newly written) pages *before*
    # regions already in the output.  Sort by start so callers always get ascending rows;
    # rows may then overlap or repeat, which callers that expand to pages must dedupe.
    out = np.concatenate(chunks)
    return out[np.argsort(out[:, 0], kind="stable")]




# The split walk (vmem_pagemap_scan_split): chunks of at least 32 MiB (~15 us of walk each
# against ~0.5 us per call, measured), at most 32 of them however large the range.
_SPLIT_CHUNKS = 32
_SPLIT_MIN_CHUNK_BYTES = 32 << 20
_SPLIT_ALIGN_BYTES = 2 << 20  # a chunk spans whole page-table pages (edges on them when the range starts on one)
_SPLIT_CHUNK_REGIONS: int = lib.VMEM_SCAN_SPLIT_CHUNK_REGIONS


def _split_buffers():
    bufs = getattr(_scan_tls, "split", None)
    if bufs is None:
        n = lib.VMEM_SCAN_SPLIT_MAX_CHUNKS
        bufs = (ffi.new("uint64_t[]", n * _SPLIT_CHUNK_REGIONS * 3), ffi.new("int64_t[]", n),
                ffi.new("uint64_t[]", n), ffi.new("int64_t[3]"))
        _scan_tls.split = bufs
    return bufs


def scan_helper_arm(spin_s: float) -> None:
    """Get :func:`pagemap_scan_split` ready in this thread: its buffers allocated (1.5 MiB,
    ~0.2 ms the first time) and the helper thread started and spinning for the next
    ``spin_s`` seconds, so that a split walk in that window does not wait for it to wake
    (30-100 us on an idle vCPU here).  The helper runs ``SCHED_IDLE``: it spins only on a
    CPU no other thread wants.

    Raises:
        OSError: the thread could not be started (``EAGAIN``: out of threads).
    """
    _split_buffers()
    _check(lib.vmem_scan_helper_arm(int(spin_s * 1e9)), "starting the page-walk helper thread")


def pagemap_scan_split(
    pagemap_fd: int,
    start: int,
    end: int,
    *,
    flags: int,
    category_mask: int,
    return_mask: int,
    category_inverted: int = 0,
    category_anyof_mask: int = 0,
    helper_only: bool = False,
) -> tuple[np.ndarray, int]:
    """:func:`pagemap_scan` of ``[start, end)`` walked by this thread and a helper thread
    together (in C, without the GIL), in chunks each claims in turn; returns ``(regions,
    helper_chunks)``: the rows :func:`pagemap_scan` returns (sorted by start, rows may
    overlap) and how many chunks the helper walked (0 when it did not get a CPU in time).

    The caller starts walking at once and takes every chunk the helper has not, so this is
    never slower than one walk by more than ~0.5 us a chunk; it is faster when the host has
    an idle CPU for the helper -- inside a downtime, with the guest paused.  If another
    split walk runs in this process, or the helper thread cannot be started, this one walks
    alone (``helper_chunks`` 0).  ``helper_only`` leaves every chunk to the helper (tests: it
    must see every page; it does not fall back).

    Raises:
        OSError: as :func:`pagemap_scan`, naming the chunk; raised after every chunk was
            walked (the pages the other chunks matched were re-protected and are lost).
    """
    start, end = int(start), int(end)
    if end <= start:
        return np.empty((0, 3), dtype=np.uint64), 0
    chunk = max(_SPLIT_MIN_CHUNK_BYTES, -(-(end - start) // _SPLIT_CHUNKS))
    chunk = -(-chunk // _SPLIT_ALIGN_BYTES) * _SPLIT_ALIGN_BYTES
    vec, counts, walk_ends, out = _split_buffers()
    rc = lib.vmem_pagemap_scan_split(pagemap_fd, start, end, chunk, int(flags), int(category_inverted),
                                     int(category_mask), int(category_anyof_mask), int(return_mask),
                                     0 if helper_only else 1, vec, counts, walk_ends, out)
    if rc < 0 and out[2] < 0 and rc != -_errno.EINVAL and not helper_only:
        # Nothing walked: another split walk runs here, or the helper thread could not be
        # started (EAGAIN) -- walk alone; the helper only ever saves time.
        return pagemap_scan(pagemap_fd, start, end, flags=flags, category_mask=category_mask, return_mask=return_mask,
                            category_inverted=category_inverted, category_anyof_mask=category_anyof_mask), 0
    if rc < 0:
        first = start + out[2] * chunk if out[2] >= 0 else start  # the chunk that failed, or none walked
        _check(rc, f"PAGEMAP_SCAN {_range(first, min(chunk, end - first) if out[2] >= 0 else end - start)}")
    nrows = out[0]
    regions = np.frombuffer(ffi.buffer(vec, 24 * nrows), dtype=np.uint64).reshape(nrows, 3).copy()
    if out[1]:  # chunks whose slice filled up: the rest of each, walked here
        parts = [regions]
        for i in range(-(-(end - start) // chunk)):  # chunks, not pages: <= 32
            chunk_end = min(start + (i + 1) * chunk, end)
            if walk_ends[i] < chunk_end:
                parts.append(pagemap_scan(pagemap_fd, int(walk_ends[i]), chunk_end, flags=flags,
                                          category_mask=category_mask, return_mask=return_mask,
                                          category_inverted=category_inverted,
                                          category_anyof_mask=category_anyof_mask))
        regions = np.concatenate(parts)
        regions = regions[np.argsort(regions[:, 0], kind="stable")]
    return regions, int(rc)

# --- mprotect tracker (guest side) -----------------------------------------------------
def mprot_install(base: int, npages: int, dirty_bitmap: int) -> None:
    """Start mprotect dirty tracking of ``[base, base + npages*4096)`` in *this* process.

    Installs the C SIGSEGV handler (the previous action is saved) and makes the region
    ``PROT_READ``.  ``dirty_bitmap`` is the address of ``ceil(npages/64)`` uint64 words
    (e.g. in a shared memfd) that the handler sets bits in; it is zeroed here and must
    stay mapped until :func:`mprot_uninstall`.  One region per process.  Resets
    :func:`mprot_fallbacks`.

    Do not enable ``faulthandler`` or another SIGSEGV handler while installed: it would
    replace ours and the next tracked write would crash.

    Raises:
        OSError: ``EBUSY`` (already installed), ``EINVAL`` (unaligned base or bitmap,
            ``npages == 0``), ``ENOMEM`` from mprotect (range not mapped); on error
            nothing stays installed.
    """
    _check(lib.vmem_mprot_install(base, npages, dirty_bitmap), f"mprot_install {_range(base, npages * PAGE_SIZE)}")


def mprot_collect(out_bitmap: int) -> int:
    """Move the dirty bits to ``out_bitmap`` and re-protect those pages; return how many.

    ``out_bitmap`` has the dirty bitmap's size; every word is overwritten.  A page whose
    bit is returned is ``PROT_READ`` again when this returns, so a write after it is seen
    by the next collect.  Call it from the guest's only running thread at a safe point.
    Pages may be reported that were not written (the max_map_count fallback marks whole
    chunks); a written page is never missed.

    Raises:
        OSError: ``ENOTCONN`` (not installed), ``EINVAL``; if it raises, the bits are put
            back into the dirty bitmap.
    """
    return _check(lib.vmem_mprot_collect(out_bitmap), "mprot_collect")


def mprot_uninstall() -> None:
    """Stop tracking: region back to ``PROT_READ|PROT_WRITE``, previous SIGSEGV action back.

    Idempotent.  The dirty bitmap keeps its bits (not collected).

    Raises:
        OSError: from mprotect (the region was unmapped); tracking stays installed.
    """
    _check(lib.vmem_mprot_uninstall(), "mprot_uninstall")


def mprot_installed() -> bool:
    """Whether the mprotect tracker is installed in this process."""
    return bool(lib.vmem_mprot_installed())


def mprot_fallbacks() -> int:
    """How many write faults since install needed the ENOMEM (vm.max_map_count) fallback."""
    return int(lib.vmem_mprot_fallbacks())


def mprot_faults() -> int:
    """How many tracked write faults the handler resolved since install."""
    return int(lib.vmem_mprot_faults())


def _bitmap_bits(bitmap: np.ndarray, npages: int, what: str):
    if bitmap.dtype != np.uint64 or bitmap.ndim != 1 or not bitmap.flags.c_contiguous:
        raise TypeError(f"{what}: bitmap must be a 1-D C-contiguous uint64 array")
    if npages < 0 or bitmap.size * 64 < npages:
        raise ValueError(f"{what}: {bitmap.size * 64} bits for {npages} pages")
    return ffi.cast("uint64_t *", bitmap.ctypes.data)


def bitmap_count(bitmap: np.ndarray, npages: int) -> int:
    """How many bits below ``npages`` are set in ``bitmap`` (bit p of word p // 64).

    Raises: as :func:`bitmap_pages`.
    """
    return _check(lib.vmem_bitmap_pages(_bitmap_bits(bitmap, npages, "bitmap_count"), npages, ffi.NULL, 0),
                  "bitmap_count")


def bitmap_pages(bitmap: np.ndarray, npages: int, expected: int = -1) -> np.ndarray:
    """The pages whose bit is set in ``bitmap`` (bit p of word p // 64), below ``npages``:
    sorted unique int64 indices.  Bits at or past ``npages`` are ignored.

    ``expected``: how many there should be (a collect's count), if known: the bitmap is
    then read once instead of counted first and read again (no difference that showed in
    a 1 GiB collect: ~0.1 ms either way).  A wrong guess costs a second pass, never a
    wrong answer.

    Raises:
        TypeError: ``bitmap`` is not a 1-D C-contiguous uint64 array.
        ValueError: it has fewer than ``npages`` bits.
    """
    bits = _bitmap_bits(bitmap, npages, "bitmap_pages")
    if expected >= 0:
        out = np.empty(expected, dtype=np.int64)
        n = lib.vmem_bitmap_pages(bits, npages, ffi.cast("int64_t *", out.ctypes.data), expected)
        if n >= 0:
            return out[:n]
        # more than expected (-ENOSPC): count, then fill
    n = _check(lib.vmem_bitmap_pages(bits, npages, ffi.NULL, 0), "bitmap_pages")
    out = np.empty(n, dtype=np.int64)
    if n:
        # The count and the fill read the same words: a bitmap written meanwhile (it is
        # the caller's to hold still) gives ENOSPC, never an overrun.
        _check(lib.vmem_bitmap_pages(bits, npages, ffi.cast("int64_t *", out.ctypes.data), n), "bitmap_pages")
    return out


# --- digests ---------------------------------------------------------------------------
def _u64_out(out: np.ndarray, n: int, what: str):
    if out.dtype != np.uint64 or not out.flags.c_contiguous or not out.flags.writeable:
        raise TypeError(f"{what}: out must be a writeable C-contiguous uint64 array")
    if out.size < n:
        raise ValueError(f"{what}: out has {out.size} slots for {n} pages")
    return ffi.cast("uint64_t *", out.ctypes.data)


def digest_pages(base: int, pages: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = digest(page pages[i])`` for the 4 KiB pages at ``base + pages[i]*4096``.

    The digest is XXH64 (seed 0) of the page: equal pages give equal digests; any change
    (one flipped bit, moved bytes) changes it except with probability ~2^-64.

    Args:
        base: address of page 0; every listed page must be mapped and readable.
        pages: int64 page indices (C-contiguous, non-negative).
        out: uint64, at least ``len(pages)`` slots.

    Raises:
        TypeError/ValueError: wrong dtype, layout, size, or a negative index.
    """
    if pages.dtype != np.int64 or pages.ndim != 1 or not pages.flags.c_contiguous:
        raise TypeError("digest_pages: pages must be a 1-D C-contiguous int64 array")
    n = int(pages.size)
    dst = _u64_out(out, n, "digest_pages")
    if n == 0:
        return
    if int(pages.min()) < 0:
        raise ValueError("digest_pages: negative page index")
    lib.vmem_digest_pages(base, ffi.cast("int64_t *", pages.ctypes.data), n, dst)


def digest_range(base: int, first_page: int, npages: int, out: np.ndarray) -> None:
    """``out[i] = digest(page first_page + i)`` for ``i < npages``; same digest as :func:`digest_pages`.

    Raises:
        TypeError/ValueError: wrong ``out``, negative ``first_page`` or ``npages``.
    """
    if first_page < 0 or npages < 0:
        raise ValueError("digest_range: negative first_page or npages")
    dst = _u64_out(out, npages, "digest_range")
    if npages:
        lib.vmem_digest_range(base, first_page, npages, dst)


#: digest paths of :func:`digest_impl` (vmem/_build/digest.py)
DIGEST_IMPLS = {"scalar": 0, "avx512": 1}


def digest_impl(want: str | None = None) -> str:
    """The path every page digest takes: ``"avx512"`` (eight pages at a time, where the CPU
    and kernel offer AVX-512 F+DQ) or ``"scalar"``; chosen on first use.  ``want`` forces
    one (``"avx512"`` falls back to ``"scalar"`` where unsupported) -- for tests and
    comparisons: the digests are the same either way.  Returns the path now in use."""
    if want is not None and want not in DIGEST_IMPLS:
        raise ValueError(f"digest_impl: want one of {sorted(DIGEST_IMPLS)}, not {want!r}")
    got = lib.vmem_digest_impl(-1 if want is None else DIGEST_IMPLS[want])
    return next(name for name, v in DIGEST_IMPLS.items() if v == got)


def digest_page_bytes(page: bytes) -> int:
    """Digest of one 4096-byte page given as bytes (reference/testing helper)."""
    if len(page) != PAGE_SIZE:
        raise ValueError(f"digest_page_bytes: need {PAGE_SIZE} bytes, got {len(page)}")
    return int(lib.vmem_digest_bytes(ffi.from_buffer(page)))


# --- post-copy placement ---------------------------------------------------------------
def place_pages(ram_fd: int, uffd: int, guest_base: int, buf: np.ndarray, pages: np.ndarray,
                rows: np.ndarray | None = None, digests: np.ndarray | None = None, view: int = 0) -> int:
    """Write page ``pages[i]`` from staging row ``rows[i]`` (default ``i``) into the RAM file,
    digest what the file then holds, and map it into the guest with ``UFFDIO_CONTINUE``
    (skipped when ``uffd < 0``: pre-copy, the guest does not run yet).

    Runs of consecutive pages in consecutive rows cost one ``pwrite`` and one ``CONTINUE``,
    in C.  The guest sees each page complete or not at all (its MINOR|MISSING registration
    keeps unmapped pages invisible).  Pages already mapped are skipped and their waiters
    woken.

    Args:
        digests: uint64 per page of the guest, or None.  ``digests[pages[i]]`` becomes the
            digest of page ``pages[i]`` as the RAM file holds it after the write, read
            through ``view`` before the guest can map it -- what was placed, not what was
            received.  Only the pages just written are read (they are in the page cache:
            nothing is allocated).
        view: address of this process's shared mapping of the whole RAM file (needed with
            ``digests``).  The caller keeps it mapped during the call.

    Raises:
        ValueError: shapes do not match, or ``digests`` without ``view``.  OSError:
            pwrite(2) or UFFDIO_CONTINUE failed (earlier runs stay placed).
    """
    pages = np.ascontiguousarray(pages, dtype=np.int64)
    if buf.ndim != 2 or buf.shape[1] != PAGE_SIZE or not buf.flags.c_contiguous:
        raise ValueError("buf must be a C-contiguous (n, 4096) array")
    n = len(pages)
    if n == 0:
        return 0
    if rows is None:
        if len(buf) < n:
            raise ValueError("buf has fewer rows than pages")
        rows_ptr = ffi.NULL
    else:
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if len(rows) != n or (n and (rows.min() < 0 or rows.max() >= len(buf))):
            raise ValueError("rows must index buf, one per page")
        rows_ptr = ffi.cast("const int64_t *", rows.ctypes.data)
    if digests is not None:
        _u64_out(digests, int(pages.max()) + 1, "place_pages")
        if int(pages.min()) < 0:
            raise ValueError("place_pages: negative page index")
        if not view:
            raise ValueError("place_pages: digests need the view (this process's mapping of the RAM file)")
    return _check(
        lib.vmem_place_pages(ram_fd, uffd, guest_base, ffi.cast("const uint8_t *", buf.ctypes.data), rows_ptr,
                             ffi.cast("const int64_t *", pages.ctypes.data), n, _ptr("uint64_t *", digests),
                             ffi.cast("const uint8_t *", view)),
        f"placing {n} pages",
    )


#: Test-only placement faults (vmem.migration.inject) by name: what :func:`place_pages`
#: (and the post-copy engine's placement) does wrong with the page :func:`set_place_fault` names.
PLACE_FAULTS: dict[str, int] = {
    "drop": int(lib.VMEM_PLACE_FAULT_DROP),  # neither written nor mapped
    "wrong-offset": int(lib.VMEM_PLACE_FAULT_WRONG_OFFSET),  # written one page further on, not mapped
    "flip": int(lib.VMEM_PLACE_FAULT_FLIP),  # written, then one byte of it flipped in the RAM file
}


def set_place_fault(kind: str | None, page: int = -1) -> None:
    """Test-only: make every later placement mishandle ``page`` as ``kind`` (a key of
    :data:`PLACE_FAULTS`; None clears it).  Process-wide; set it before placement starts.

    Raises:
        ValueError: unknown kind or a negative page.
    """
    if kind is None:
        lib.vmem_set_place_fault(int(lib.VMEM_PLACE_FAULT_NONE), -1)
        return
    if kind not in PLACE_FAULTS or page < 0:
        raise ValueError(f"placement fault must be one of {sorted(PLACE_FAULTS)} with a page >= 0, got {kind!r} {page}")
    lib.vmem_set_place_fault(PLACE_FAULTS[kind], int(page))


def continue_runs(uffd: int, guest_base: int, runs: np.ndarray) -> int:
    """``UFFDIO_CONTINUE`` every ``[first, end)`` row of ``runs`` (pages already in the page
    cache); return how many pages were newly mapped.  Already-mapped pages are skipped."""
    runs = np.ascontiguousarray(runs, dtype=np.int64).reshape(-1, 2)
    if len(runs) == 0:
        return 0
    return _check(lib.vmem_continue_runs(uffd, guest_base, ffi.cast("const int64_t *", runs.ctypes.data), len(runs)),
                  f"UFFDIO_CONTINUE over {len(runs)} runs")


#: Present-page states of the post-copy destination, one byte per page shared with C.
PC_MISSING: int = int(lib.VMEM_PC_MISSING)
PC_PLACING: int = int(lib.VMEM_PC_PLACING)
PC_PRESENT: int = int(lib.VMEM_PC_PRESENT)


def _ptr(ctype: str, arr: np.ndarray | None):
    if arr is None:
        return ffi.NULL
    if not arr.flags.c_contiguous:
        raise ValueError("array must be C-contiguous")
    return ffi.cast(ctype, arr.ctypes.data)


class _FaultThread:
    """A C fault thread and its handle (``vmem_pc_<kind>_*`` in vmem/_build/postcopy.py):
    :meth:`start`, :meth:`stop` (joins; idempotent), :meth:`close` (frees; idempotent), and
    :meth:`stats`, the fields of its statistics struct read at once under its lock."""

    _kind = ""  # "dest" or "src"
    _what = ""  # for error messages

    def _create(self, *args) -> None:
        self._h = None
        out = ffi.new(f"vmem_pc_{self._kind} **")
        _check(getattr(lib, f"vmem_pc_{self._kind}_new")(out, *args), f"creating the {self._what}")
        self._h = out[0]
        self._stats = ffi.new(f"struct vmem_pc_{self._kind}_stats *")

    def set_mac(self, mac: dict | None) -> None:
        """Before :meth:`start`: the urgent link speaks transport.secure.MacChannel's integrity
        framing, or transport.seal.SealedChannel's encrypted one (``mac["cipher"]``), with the
        state ``native_handoff()`` returned (None: plain).  A forged, replayed or truncated
        frame then stops the thread with EBADMSG."""
        if mac is None:
            return
        keys = (bytes(mac["send_key"]), bytes(mac["recv_key"]))
        if any(len(k) != 32 for k in keys):
            raise ValueError("MAC keys must be 32 bytes")
        cipher = mac.get("cipher", "aes-256-gmac")
        if cipher not in LINK_CIPHERS:
            raise ValueError(f"unknown link cipher {cipher!r} (known: {', '.join(LINK_CIPHERS)})")
        _check(getattr(lib, f"vmem_pc_{self._kind}_set_mac")(self._h, keys[0], keys[1], int(mac["send_seq"]),
                                                               int(mac["recv_seq"]), LINK_CIPHERS[cipher]),
               f"keying the {self._what}")

    def set_priority_limit(self, most: int) -> None:
        """Before :meth:`start`: the thread asks for at most ``most`` (a key of
        :data:`FAULT_THREAD_PRIORITIES`) instead of the process default
        (:func:`set_fault_thread_priority_limit`) -- one migration's ``--fault-sched``.  It
        gets the most of that the host permits; ``stats()["priority"]`` says what."""
        if most not in FAULT_THREAD_PRIORITIES:
            raise ValueError(f"priority must be one of {sorted(FAULT_THREAD_PRIORITIES)}, got {most!r}")
        getattr(lib, f"vmem_pc_{self._kind}_set_priority_limit")(self._h, int(most))

    def set_cpu(self, cpu: int | None) -> None:
        """Before :meth:`start`: pin the thread to ``cpu`` (``--fault-cpu``; None: not
        pinned).  ``stats()["cpu"]`` then says what it got: the CPU, -1 (not pinned) or
        -errno (the kernel refused; the thread runs on unpinned).

        Raises:
            ValueError: ``cpu`` is not a CPU number (0 <= cpu < 1024).
        """
        if cpu is None:
            cpu = -1
        elif isinstance(cpu, bool) or not isinstance(cpu, int) or not 0 <= cpu < MAX_FAULT_CPU:
            raise ValueError(f"a fault thread's CPU is a number 0..{MAX_FAULT_CPU - 1}, not {cpu!r}")
        getattr(lib, f"vmem_pc_{self._kind}_set_cpu")(self._h, int(cpu))

    def start(self) -> None:
        _check(getattr(lib, f"vmem_pc_{self._kind}_start")(self._h), f"starting the {self._what}")

    def stop(self) -> None:
        if self._h is not None:
            getattr(lib, f"vmem_pc_{self._kind}_stop")(self._h)

    def close(self) -> None:
        if self._h is not None:
            getattr(lib, f"vmem_pc_{self._kind}_free")(self._h)
            self._h = None

    def stats(self) -> dict:
        getattr(lib, f"vmem_pc_{self._kind}_stats")(self._h, self._stats)
        return {name: int(getattr(self._stats, name)) for name, _field in ffi.typeof(self._stats).item.fields}


class PostcopyFaultEngine(_FaultThread):
    """The destination's demand-fault fast path: one C thread (no GIL) that

    * reads the guest's userfaultfd, maps pages that are already present (CONTINUE for a
      MINOR fault, ZEROPAGE for a hole) and asks the source for missing ones with a FAULT
      record on the urgent channel;
    * reads the source's answers from the urgent channel and places them
      (claim MISSING -> PLACING, pwrite, digest what the RAM file holds, CONTINUE, -> PRESENT).

    The arrays are shared with Python and must outlive the engine (it keeps references):
    ``state``/``requested``/``received`` uint8 per page, ``fault_t0`` int64 per page,
    ``digests`` uint64 per page or None, ``latencies`` int64 of shape ``(cap, 3)``, the
    fault log filled up to ``cap`` rows: (fault -> placed ns, page, fault time in monotonic ns).  :meth:`place` is how Python places background pages under the
    engine's lock.  :meth:`stats`: the fields of ``struct vmem_pc_dest_stats``
    (latency_count, missing, demand_faults, fault_events, local_faults, pages_demanded,
    pages_pushed, duplicates, t_complete_ns, error).
    """

    _kind, _what = "dest", "post-copy fault engine"

    def __init__(self, uffd: int, urgent_fd: int, ram_fd: int, base: int, npages: int, state: np.ndarray,
                 requested: np.ndarray, received: np.ndarray, fault_t0: np.ndarray, digests: np.ndarray | None,
                 latencies: np.ndarray, missing: int, view: int = 0, view_writable: bool = False):
        """``view``: this process's mapping of the whole RAM file (digests are read through
        it after each write; required with ``digests``).  ``view_writable``: that mapping is
        writable, and demand answers are copied into it instead of ``pwrite`` (they then never
        wait behind the background push for the RAM file's write lock).  Raises ValueError for arrays of
        the wrong size, OSError (e.g. EMFILE) if the engine's wake pipe or memory cannot be had."""
        if digests is not None and not view:
            raise ValueError("digests need the view (this process's mapping of the RAM file)")
        for name, arr, dt in (("state", state, np.uint8), ("requested", requested, np.uint8), ("received", received, np.uint8),
                              ("fault_t0", fault_t0, np.int64)):
            if arr.dtype.itemsize != np.dtype(dt).itemsize or len(arr) != npages:
                raise ValueError(f"{name} must hold {npages} {np.dtype(dt).name}")
        if latencies.dtype != np.int64 or latencies.ndim != 2 or latencies.shape[1] != 3 or not latencies.flags.c_contiguous:
            raise ValueError("latencies must be a C-contiguous (cap, 3) int64 array")
        self._keep = (state, requested, received, fault_t0, digests, latencies)
        self._create(uffd, urgent_fd, ram_fd, base, npages, _ptr("uint8_t *", state), _ptr("uint8_t *", requested),
                     _ptr("uint8_t *", received), _ptr("int64_t *", fault_t0), _ptr("uint64_t *", digests),
                     _ptr("int64_t *", latencies), len(latencies), missing, ffi.cast("const uint8_t *", view))
        lib.vmem_pc_dest_set_view_writes(self._h, int(bool(view_writable and view)))

    def place(self, staging: np.ndarray, pfns: np.ndarray) -> int:
        """Place the batch in ``staging[:len(pfns)]`` (pages not MISSING are skipped); the
        digests come from the RAM file after the write (:func:`place_pages`)."""
        pfns = np.ascontiguousarray(pfns, dtype=np.int64)
        return _check(lib.vmem_pc_dest_place(self._h, _ptr("const uint8_t *", staging), _ptr("const int64_t *", pfns),
                                             len(pfns)), f"placing {len(pfns)} post-copy pages")


class PostcopyFaultServer(_FaultThread):
    """The source's demand-fault fast path: one C thread that answers FAULT records from the
    urgent channel with the pages straight from ``ram`` (writev, no copy), marks them in
    ``sent`` (uint8 per page) and writes the newest fault's pfn to ``cursor[0]`` (and bumps
    ``cursor[1]``) for the background push's pre-paging.  :meth:`stats`: the fields of
    ``struct vmem_pc_src_stats`` (fault_records, pages_sent, error)."""

    _kind, _what = "src", "post-copy fault server"

    def __init__(self, urgent_fd: int, ram: np.ndarray, sent: np.ndarray, cursor: np.ndarray):
        """``cursor``: int64[3]: [0] newest fault's pfn, [1] faults answered, [2] FAULT
        records being answered right now (the push backs off while it is not 0).

        Raises ValueError for arrays of the wrong shape, OSError (e.g. EMFILE) if the
        server's wake pipe or memory cannot be had."""
        if ram.ndim != 2 or ram.shape[1] != PAGE_SIZE or len(sent) != len(ram) or sent.dtype.itemsize != 1:
            raise ValueError(f"ram must be (npages, {PAGE_SIZE}) and sent one byte per page")
        if cursor.dtype != np.int64 or cursor.shape != (3,) or not cursor.flags.c_contiguous:
            raise ValueError("cursor must be a C-contiguous int64 array of 3")
        self._keep = (ram, sent, cursor)
        self._create(urgent_fd, _ptr("const uint8_t *", ram), len(ram), _ptr("uint8_t *", sent), _ptr("int64_t *", cursor))


#: the urgent link's framings native code speaks (``native_handoff()["cipher"]``): the
#: value says to C whether frames are sealed (encrypted) or only tagged
LINK_CIPHERS: dict[str, int] = {"aes-256-gmac": 0, "aes-256-gcm": 1}

#: How a post-copy fault thread is scheduled (``stats()["priority"]``, :func:`fault_thread_priority`).
FAULT_THREAD_PRIORITIES: dict[int, str] = {
    int(lib.VMEM_PC_PRIO_NORMAL): "normal",
    int(lib.VMEM_PC_PRIO_NICE): f"nice {int(lib.VMEM_PC_NICE)}",
    int(lib.VMEM_PC_PRIO_SLICE): f"nice {int(lib.VMEM_PC_NICE)}, slice {int(lib.VMEM_PC_SLICE_NS) / 1e6:g} ms",
    int(lib.VMEM_PC_PRIO_FIFO): f"SCHED_FIFO {int(lib.VMEM_PC_RT_PRIORITY)}",
}
PC_PRIO_NORMAL: int = int(lib.VMEM_PC_PRIO_NORMAL)
PC_PRIO_NICE: int = int(lib.VMEM_PC_PRIO_NICE)
PC_PRIO_SLICE: int = int(lib.VMEM_PC_PRIO_SLICE)
PC_PRIO_FIFO: int = int(lib.VMEM_PC_PRIO_FIFO)
#: CPUs a fault thread can be pinned to: 0 .. MAX_FAULT_CPU - 1 (glibc's CPU_SETSIZE).
MAX_FAULT_CPU = 1024

#: SCHED_FIFO's priority of a fault thread that runs so.
PC_RT_PRIORITY: int = int(lib.VMEM_PC_RT_PRIORITY)
#: Pages of background push placed per piece at the post-copy destination.
PUSH_PIECE_PAGES: int = int(lib.VMEM_PC_PIECE_PAGES)


def fault_thread_priority(most: int | None = None) -> tuple[int, str]:
    """What a post-copy fault thread gets here: ``(VMEM_PC_PRIO_*, description)``, tried on
    a thread started for the purpose -- with the current limit (what migrations use), or,
    given ``most``, with that limit for the probe only (e.g. whether SCHED_FIFO is permitted).

    Raises:
        OSError: no thread could be started.
    """
    global _priority_limit
    old = _priority_limit
    if most is not None:
        set_fault_thread_priority_limit(most)
    try:
        got = _check(lib.vmem_pc_probe_priority(), "starting a thread to probe the fault threads' priority")
    finally:
        if most is not None:
            set_fault_thread_priority_limit(old)
    return got, FAULT_THREAD_PRIORITIES[got]


def boost_current_thread() -> tuple[int, str]:
    """The calling thread asks for what a post-copy fault thread asks for (nice -15 and the
    short slice, within the current limit) and keeps it for the rest of its life: a
    benchmark's floor measured with the fault threads' scheduling, so that the comparison
    is not between two schedulings.  Returns ``(VMEM_PC_PRIO_*, description)``."""
    got = int(lib.vmem_pc_boost_current())
    return got, FAULT_THREAD_PRIORITIES[got]


def set_push_pieces(piece_pages: int = 0, give_way: bool = True, slow_us: int = 0, view_writes: bool = True) -> None:
    """Test-only (vmem.migration.inject): the post-copy destination places the background
    push in pieces of ``piece_pages`` (0: the default, :data:`PUSH_PIECE_PAGES`), waits for
    a waiting demand answer before each piece unless ``give_way`` is False, and sleeps
    ``slow_us`` inside each piece (a slow push); ``view_writes=False`` makes demand answers
    ``pwrite`` through the placement gate even with a writable view (as they were before
    they were copied into it).  Process-wide; set before post-copy starts."""
    if piece_pages < 0 or slow_us < 0:
        raise ValueError(f"piece_pages and slow_us must be >= 0, got {piece_pages}, {slow_us}")
    lib.vmem_pc_set_push_pieces(int(piece_pages), int(bool(give_way)), int(slow_us), int(bool(view_writes)))


_priority_limit = int(lib.VMEM_PC_PRIO_SLICE)


def set_fault_thread_slice_ns(ns: int = 0) -> None:
    """Test-only: fault threads started from now on ask for a ``ns`` EEVDF slice (0: the
    default, 100 us).  The kernel clamps one under 100 us up to 100 us; the thread, reading
    back a slice it did not ask for, then claims none and reports ``nice -15``
    (tests/test_native.py makes that check fire)."""
    lib.vmem_pc_set_slice_ns(int(ns))


def set_fault_thread_priority_limit(most: int) -> None:
    """Fault threads started from now on ask for at most ``most`` (a key of
    :data:`FAULT_THREAD_PRIORITIES`; the default is nice -15 with a short slice, see
    vmem/_build/postcopy.py for why, and why not SCHED_FIFO).  Process-wide; benchmarks
    compare with it (vmem.migration.inject)."""
    global _priority_limit
    if most not in FAULT_THREAD_PRIORITIES:
        raise ValueError(f"priority must be one of {sorted(FAULT_THREAD_PRIORITIES)}, got {most!r}")
    lib.vmem_pc_set_priority_limit(int(most))
    _priority_limit = int(most)


# --- process ---------------------------------------------------------------------------
def set_pdeathsig(sig: int) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent *thread* exits.

    ``prctl(PR_SET_PDEATHSIG)``.  Cleared on fork in the child; kept across execve.

    Raises:
        OSError: ``EINVAL`` for an invalid signal number.
    """
    _check(lib.vmem_set_pdeathsig(int(sig)), f"prctl(PR_SET_PDEATHSIG, {int(sig)})")


# --- KVM (guests/kvm) -------------------------------------------------------------------
#: ioctl numbers and KVM constants the KVM backend uses, by their kernel names.
KVM = {name: getattr(lib, name) for name in dir(lib) if name.startswith("KVM_")}


def kvm_ioctl(fd: int, request: str, arg: int = 0, buf: bytearray | np.ndarray | None = None) -> int:
    """``ioctl(fd, KVM_<request>, arg)``; with ``buf`` the argument is its address (the
    structure is read and/or written in place).  Returns the ioctl's result.

    Raises:
        OSError: with the errno and the request's name.
    """
    if buf is not None:
        keep = ffi.from_buffer(buf)
        arg = int(ffi.cast("uintptr_t", keep))
    return _check(lib.vmem_kvm_ioctl(fd, KVM[request], int(arg)), request)


def kvm_run(vcpu_fd: int) -> int:
    """One ``KVM_RUN`` without the GIL: 0, or -errno (``-EINTR``: the vCPU was kicked)."""
    return lib.vmem_kvm_run(vcpu_fd)


def kvm_dirty_log(vm_fd: int, slot: int, bitmap: np.ndarray, npages: int) -> int:
    """KVM_GET_DIRTY_LOG then KVM_CLEAR_DIRTY_LOG of memslot ``slot`` (manual protect):
    ``bitmap`` (uint64, one bit per page) receives the dirty pages, which are re-armed when
    this returns.  Returns how many."""
    if bitmap.dtype != np.uint64 or len(bitmap) * 64 < npages or not bitmap.flags.c_contiguous:
        raise ValueError("bitmap must be contiguous uint64 with a bit per page")
    return _check(lib.vmem_kvm_dirty_log(vm_fd, slot, ffi.cast("uint64_t *", bitmap.ctypes.data), npages),
                  f"KVM_GET/CLEAR_DIRTY_LOG slot {slot}")


def kvm_ring_harvest(ring_address: int, nentries: int, fetch_index: np.ndarray, slot: int,
                     bitmap: np.ndarray, npages: int) -> int:
    """Harvest one vCPU's dirty ring (mapped at ``ring_address``) into ``bitmap`` from
    ``fetch_index[0]`` (uint32, advanced); the caller issues KVM_RESET_DIRTY_RINGS next.
    Returns the entries harvested.

    Raises:
        OSError: EINVAL, an entry named a page outside ``slot`` (harvested anyway).
    """
    if bitmap.dtype != np.uint64 or len(bitmap) * 64 < npages or fetch_index.dtype != np.uint32:
        raise ValueError("bitmap must be uint64 with a bit per page, fetch_index uint32")
    return _check(lib.vmem_kvm_ring_harvest(ffi.cast("void *", ring_address), nentries,
                                            ffi.cast("uint32_t *", fetch_index.ctypes.data), slot,
                                            ffi.cast("uint64_t *", bitmap.ctypes.data), npages),
                  "dirty ring harvest")
