"""Run-time probe of the kernel features vmem's mechanisms need, by name (``vmem doctor``).

Headers say what a kernel *could* have; only the running kernel says what it has.  Every
probe here really exercises the feature on a scratch object and reports a reason:

==========================  ============================================================
``memfd_create``            create a memfd and size it
``userfaultfd``             the syscall (``detail`` says whether UFFD_USER_MODE_ONLY or
                            /dev/userfaultfd was needed)
``UFFD_FEATURE_<X>``        one per feature bit, as offered by ``UFFDIO_API`` (WP_ASYNC,
                            WP_UNPOPULATED, WP_HUGETLBFS_SHMEM, MINOR_SHMEM,
                            MISSING_SHMEM, MOVE, POISON, ...)
``PAGEMAP_SCAN``            register a small memfd mapping in this process for async
                            write-protect, write some pages, and check that one scan
                            finds exactly them and a second finds none
``mprotect_tracker``        in a forked child: install the C SIGSEGV handler on a scratch
                            mapping, write, collect, check, uninstall
``vm.max_map_count``        informational (the mprotect tracker's VMA budget)
==========================  ============================================================

:func:`require` turns a missing feature into :class:`vmem.errors.FeatureUnavailable`
naming it, the reason and the alternative.  Results are cached per process;
``probe_features(refresh=True)`` probes again.
"""
from __future__ import annotations

import errno
import mmap
import os
import signal
import threading
import time
from dataclasses import dataclass

from vmem.errors import FeatureUnavailable
from vmem.pages import PAGE_SIZE

__all__ = ["Feature", "probe_features", "format_features", "require", "free_page_reporting", "kernel_preemption"]

_PROBE_CHILD_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Feature:
    """One probed kernel feature.

    Attributes:
        name: the feature's name (``"UFFD_FEATURE_WP_ASYNC"``, ``"PAGEMAP_SCAN"``...).
        available: whether it works here.
        detail: how it was established, or why it is unavailable.
    """

    name: str
    available: bool
    detail: str


_cache: dict[str, Feature] | None = None
_cache_lock = threading.Lock()


def probe_features(refresh: bool = False) -> dict[str, Feature]:
    """Probe (or return the cached probe of) every feature; a new dict keyed by name, in report order.

    Never raises for a missing feature: it is reported with ``available=False`` and a
    reason.  Takes about 0.1 s (one short-lived forked child).
    """
    global _cache
    with _cache_lock:
        if _cache is None or refresh:
            _cache = _probe_all()
        return dict(_cache)


def require(name: str, alternative: str = "") -> None:
    """Raise :class:`FeatureUnavailable` unless feature ``name`` is available here.

    ``name`` is a key of :func:`probe_features`; a UFFD feature may also be given by its
    short name (``"WP_ASYNC"`` for ``"UFFD_FEATURE_WP_ASYNC"``).

    Raises:
        FeatureUnavailable: with the feature's name, the probe's reason and ``alternative``.
        ValueError: ``name`` is not a feature this module knows.
    """
    features = probe_features()
    key = name if name in features else f"UFFD_FEATURE_{name}"
    feature = features.get(key)
    if feature is None:
        raise ValueError(f"unknown feature {name!r}; known: {', '.join(features)}")
    if not feature.available:
        raise FeatureUnavailable(feature.name, feature.detail, alternative)


def format_features(features: dict[str, Feature]) -> str:
    """Render a plain-text table (feature, available, detail) for ``vmem doctor``."""
    rows = [("feature", "available", "detail")]
    rows += [(f.name, "yes" if f.available else "NO", f.detail) for f in features.values()]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
    lines.insert(1, f"{'-' * w0}  {'-' * w1}  {'-' * 6}")
    return "\n".join(lines)


# --- probes ----------------------------------------------------------------------------
def _probe_all() -> dict[str, Feature]:
    out: dict[str, Feature] = {}

    def add(name: str, available: bool, detail: str) -> None:
        out[name] = Feature(name, bool(available), detail)

    try:
        from vmem import _native as nat
    except ImportError as err:
        reason = f"native extension not built ({err}); run: pip install -e ."
        for name in ("memfd_create", "userfaultfd", "PAGEMAP_SCAN", "mprotect_tracker"):
            add(name, False, reason)
        add("vm.max_map_count", True, _max_map_count_detail())
        return out

    add("memfd_create", *_probe_memfd(nat))

    granted = 0
    uffd_ok, uffd_detail = False, ""
    try:
        fd, how = nat.uffd_open_ex()
        try:
            granted = nat.uffd_api(fd, 0)
            uffd_ok = True
            uffd_detail = f"via {how}"
            if how != "syscall":
                uffd_detail += f" (plain syscall refused; {_unprivileged_uffd_detail()})"
        finally:
            os.close(fd)
    except OSError as err:
        uffd_detail = f"{err.strerror} ({_unprivileged_uffd_detail()})"
    add("userfaultfd", uffd_ok, uffd_detail)

    for short, bit in nat.UFFD_FEATURE_NAMES.items():
        name = f"UFFD_FEATURE_{short}"
        if not uffd_ok:
            add(name, False, f"userfaultfd unavailable: {uffd_detail}")
        elif granted & bit:
            add(name, True, "offered by UFFDIO_API")
        else:
            add(name, False, "not offered by this kernel's UFFDIO_API")

    if not uffd_ok:
        add("PAGEMAP_SCAN", False, f"needs userfaultfd: {uffd_detail}")
    elif not granted & nat.UFFD_FEATURE_WP_ASYNC:
        add("PAGEMAP_SCAN", False, "needs UFFD_FEATURE_WP_ASYNC (Linux >= 6.7)")
    else:
        add("PAGEMAP_SCAN", *_probe_pagemap_scan(nat))

    add("mprotect_tracker", *_probe_mprotect(nat))
    add("vm.max_map_count", True, _max_map_count_detail())
    add("MADV_POPULATE_WRITE", *_probe_populate_write())
    return out


def _read_sysctl(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _unprivileged_uffd_detail() -> str:
    val = _read_sysctl("/proc/sys/vm/unprivileged_userfaultfd")
    return f"vm.unprivileged_userfaultfd={val}" if val is not None else "vm.unprivileged_userfaultfd unknown"


def _max_map_count_detail() -> str:
    val = _read_sysctl("/proc/sys/vm/max_map_count")
    if val is None:
        return "unknown"
    half = int(val) // 2
    return f"{val} VMAs (the mprotect tracker widens its unprotects beyond ~{half} scattered dirty pages)"


def _probe_memfd(nat) -> tuple[bool, str]:
    try:
        fd = nat.memfd_create("vmem-probe")
    except OSError as err:
        return False, f"memfd_create: {err.strerror}"
    try:
        os.ftruncate(fd, PAGE_SIZE)
        return True, "created and sized a memfd"
    except OSError as err:
        return False, f"ftruncate on a memfd: {err.strerror}"
    finally:
        os.close(fd)


def _probe_populate_write() -> tuple[bool, str]:
    """Whether ``madvise(MADV_POPULATE_WRITE)`` maps a shared memfd mapping ahead here: what
    ``--prealloc`` does to the destination's RAM (vmem.ram.GuestRam.map_for_writing, asked of
    a one-page RAM); without it the RAM is allocated but each page still faults once there."""
    from vmem.errors import VmemError
    from vmem.ram import GuestRam

    try:
        with GuestRam.create(PAGE_SIZE, name="vmem-probe-populate") as ram:
            took_s = ram.map_for_writing()
    except (OSError, VmemError) as err:
        return False, f"mapping a memfd ahead: {err}"
    if took_s is None:
        return False, ("not known to this kernel (Linux >= 5.14): --prealloc allocates the destination's RAM "
                       "without mapping it ahead")
    return True, "--prealloc maps the destination's RAM ahead with it"


def _probe_pagemap_scan(nat) -> tuple[bool, str]:
    """Async-WP a 16-page memfd mapping of our own, write 3 pages, scan twice."""
    import numpy as np

    npages = 16
    written = [2, 5, 6]
    length = npages * PAGE_SIZE
    memfd = uffd = pagemap = -1
    m = None
    try:
        memfd = nat.memfd_create("vmem-probe-scan")
        os.ftruncate(memfd, length)
        m = mmap.mmap(memfd, length, flags=mmap.MAP_SHARED)
        view = np.frombuffer(m, dtype=np.uint8)
        base = view.ctypes.data
        uffd = nat.uffd_open()
        nat.uffd_api(uffd, nat.UFFD_FEATURE_WP_ASYNC | nat.UFFD_FEATURE_WP_UNPOPULATED)
        nat.uffd_register(uffd, base, length, nat.UFFDIO_REGISTER_MODE_WP)
        nat.uffd_writeprotect(uffd, base, length, True)
        for page in written:
            view[page * PAGE_SIZE] = 1
        pagemap = nat.open_pagemap("self")
        kwargs = dict(
            flags=nat.PM_SCAN_WP_MATCHING | nat.PM_SCAN_CHECK_WPASYNC,
            category_mask=nat.PAGE_IS_WRITTEN,
            return_mask=nat.PAGE_IS_WRITTEN,
        )
        t0 = time.perf_counter()
        first = nat.pagemap_scan(pagemap, base, base + length, **kwargs)
        scan_us = (time.perf_counter() - t0) * 1e6
        second = nat.pagemap_scan(pagemap, base, base + length, **kwargs)
        found = sorted(int(p) for s, e, _ in first for p in range((s - base) // PAGE_SIZE, (e - base) // PAGE_SIZE))
        del view
        if found != written:
            return False, f"scan reported pages {found}, expected {written}"
        if len(second):
            return False, "a second scan still reported pages: PM_SCAN_WP_MATCHING did not re-protect"
        return True, f"found exactly the written pages and re-protected them ({scan_us:.0f} us for {npages} pages)"
    except OSError as err:
        if err.errno == errno.ENOTTY:
            return False, "ioctl(PAGEMAP_SCAN) unknown to this kernel (Linux >= 6.7)"
        return False, f"{err.filename or 'probe'}: {err.strerror}"
    finally:
        for fd in (pagemap, uffd):
            if fd >= 0:
                os.close(fd)
        if m is not None:
            try:
                m.close()
            except BufferError:
                pass
        if memfd >= 0:
            os.close(memfd)


def _mprotect_child(nat) -> int:
    """Runs in the forked child; returns the exit status (0: the tracker works)."""
    import numpy as np

    npages = 64
    written = [0, 9, 10, 63]
    m = mmap.mmap(-1, npages * PAGE_SIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    base = np.frombuffer(m, dtype=np.uint8).ctypes.data
    dirty = np.zeros(1, dtype=np.uint64)
    out = np.zeros(1, dtype=np.uint64)
    nat.mprot_install(base, npages, dirty.ctypes.data)
    for page in written:
        m[page * PAGE_SIZE] = 7  # a C store into a PROT_READ page: our handler resolves it
    if nat.mprot_collect(out.ctypes.data) != len(written):
        return 3
    if int(out[0]) != sum(1 << p for p in written):
        return 4
    if nat.mprot_collect(out.ctypes.data) != 0:
        return 5
    m[9 * PAGE_SIZE] = 8
    if nat.mprot_collect(out.ctypes.data) != 1 or int(out[0]) != 1 << 9:
        return 6
    nat.mprot_uninstall()
    return 0


_CHILD_FAILURES = {
    3: "collect counted the wrong number of pages",
    4: "collect reported the wrong pages",
    5: "a second collect was not empty (re-protect failed)",
    6: "a write after collect was not caught",
}


def _probe_mprotect(nat) -> tuple[bool, str]:
    if nat.mprot_installed():
        return True, "installed and running in this process"
    try:
        pid = os.fork()
    except OSError as err:
        return False, f"fork for the probe: {err.strerror}"
    if pid == 0:  # child: never return into the caller's code
        status = 1
        try:
            status = _mprotect_child(nat)
        except BaseException:
            status = 2
        finally:
            os._exit(status)
    deadline = time.monotonic() + _PROBE_CHILD_TIMEOUT_S
    try:
        while True:
            done, wstatus = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return False, f"probe child hung for {_PROBE_CHILD_TIMEOUT_S:.0f} s"
            time.sleep(0.002)
    except BaseException:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
        raise
    if os.WIFSIGNALED(wstatus):
        return False, f"probe child killed by {signal.Signals(os.WTERMSIG(wstatus)).name}"
    code = os.WEXITSTATUS(wstatus)
    if code == 0:
        return True, "SIGSEGV handler caught writes, collect re-protected (forked child)"
    return False, _CHILD_FAILURES.get(code, f"probe child failed (exit status {code})")


#: virtio-balloon's feature bit for free page reporting (VIRTIO_BALLOON_F_REPORTING).
_VIRTIO_BALLOON_F_REPORTING = 5
_VIRTIO_ID_BALLOON = 5


def free_page_reporting(sys_root: str = "/sys") -> str | None:
    """Whether this kernel hands free memory back to its hypervisor (a virtio-balloon device
    with free page reporting, the REPORTING feature bit negotiated), as a sentence for
    ``vmem doctor``; None if not (or not a guest, or unknowable).

    Why it matters here: a page the kernel reported is discarded by the host, so the next
    first touch of it faults in the host as well -- measured on such a VM: ``pwrite`` into a
    fresh memfd 2.7-3.2 GB/s against 9.1-9.6 into one already allocated, and post-copy's
    push twice as fast with the destination's RAM preallocated (docs/performance.md).
    ``sys_root``: where sysfs is (tests point it at a fake tree)."""
    base = os.path.join(sys_root, "bus", "virtio", "devices")
    try:
        devices = sorted(os.listdir(base))
    except OSError:
        return None
    for dev in devices:
        path = os.path.join(base, dev)
        dev_id, bits = _read_sysctl(os.path.join(path, "device")), _read_sysctl(os.path.join(path, "features"))
        try:
            if dev_id is None or bits is None or int(dev_id, 16) != _VIRTIO_ID_BALLOON:
                continue
        except ValueError:
            continue
        if len(bits) > _VIRTIO_BALLOON_F_REPORTING and bits[_VIRTIO_BALLOON_F_REPORTING] == "1":
            order = _read_sysctl(os.path.join(sys_root, "module", "page_reporting", "parameters", "page_reporting_order"))
            size = (f" in blocks of {(PAGE_SIZE << int(order)) >> 10} KiB and up"
                    if order is not None and order.isdigit() else "")
            return (f"free page reporting is on ({dev}: virtio-balloon){size}: memory freed here goes back to the "
                    "hypervisor, and its next first touch faults there too -- fresh memory is slow and its speed "
                    "varies; --prealloc moves the destination's share of it out of round 0 and the post-copy push "
                    "(docs/performance.md)")
    return None



#: the kernel's preemption models, as preempt= and /sys/kernel/debug/sched/preempt name them
PREEMPTION_MODELS = ("none", "voluntary", "full", "lazy")
_PREEMPT_CONFIG = {"CONFIG_PREEMPT_NONE": "none", "CONFIG_PREEMPT_VOLUNTARY": "voluntary", "CONFIG_PREEMPT": "full",
                   "CONFIG_PREEMPT_LAZY": "lazy", "CONFIG_PREEMPT_RT": "full"}


def _preemption_model(proc_root: str, sys_root: str) -> tuple[str | None, str]:
    """(model, how it was found); model None when nothing says."""
    debug = _read_sysctl(os.path.join(sys_root, "kernel", "debug", "sched", "preempt"))
    if debug:  # e.g. "none (voluntary) full lazy": the current one in parentheses
        for word in debug.split():
            if word.startswith("(") and word.strip("()") in PREEMPTION_MODELS:
                return word.strip("()"), "sched/preempt in debugfs"
    cmdline = _read_sysctl(os.path.join(proc_root, "cmdline")) or ""
    for arg in cmdline.split():
        if arg.startswith("preempt=") and arg[len("preempt="):] in PREEMPTION_MODELS:
            return arg[len("preempt="):], f"{arg} on the kernel command line"
    config = None
    try:
        import gzip

        with gzip.open(os.path.join(proc_root, "config.gz"), "rt") as f:
            config = f.read()
    except (OSError, EOFError):
        pass
    if config is None:
        return None, "no /proc/config.gz, no preempt= on the command line"
    lines = set(config.splitlines())
    chosen = [(key, model) for key, model in _PREEMPT_CONFIG.items() if f"{key}=y" in lines]
    if not chosen:
        return None, "no CONFIG_PREEMPT_* model in /proc/config.gz"
    key, model = chosen[-1] if "CONFIG_PREEMPT_RT=y" in lines else chosen[0]
    dynamic = ", PREEMPT_DYNAMIC with no preempt= on the command line" if "CONFIG_PREEMPT_DYNAMIC=y" in lines else ""
    return model, f"{key}{dynamic}"


def tls_urgent_link(proc_root: str = "/proc") -> str:
    """How post-copy's urgent connection is protected between TLS agents, and whether this
    kernel has kernel TLS, as a sentence for ``vmem doctor``.

    vmem seals that connection itself (transport.seal: AES-256-GCM in the native fault
    threads, under a key sent inside TLS) whatever the kernel has; kernel TLS (the ``tls``
    upper-layer protocol, ``CONFIG_TLS``) is reported so that a reader knows whether the
    other way the design allows was open here.  ``proc_root``: where procfs is (tests point
    it at a fake tree)."""
    ulps = _read_sysctl(os.path.join(proc_root, "sys", "net", "ipv4", "tcp_available_ulp"))
    if ulps is None:
        kernel = "unknown (no tcp_available_ulp)"
    elif "tls" in ulps.split():
        kernel = "available (not used)"
    else:
        kernel = f"not in this kernel (tcp_available_ulp: {ulps or 'empty'})"
    return ("TLS agents' post-copy demand pages: the native fault path on a sealed urgent connection "
            f"(AES-256-GCM in C, libcrypto); kernel TLS: {kernel}")


def kernel_preemption(proc_root: str = "/proc", sys_root: str = "/sys") -> str:
    """The kernel's preemption model, as a sentence for ``vmem doctor``.

    Why it matters here: with ``none`` (or ``voluntary``) a woken thread -- a post-copy
    fault thread at any priority, a guest's vCPU -- waits until the running one leaves the
    kernel or reaches a ``cond_resched()``, and TCP's send and receive paths run for
    milliseconds without one.  Measured between two test hosts on such a VM: the fault
    threads waited up to 4 ms for a CPU behind the migration's own threads, and a plain page
    round trip during a plain copy had p99 ~2.5 ms (docs/performance.md, "Between agents").
    ``proc_root``/``sys_root``: where procfs and sysfs are (tests point them at fake trees)."""
    model, how = _preemption_model(proc_root, sys_root)
    if model is None:
        return f"kernel preemption: unknown ({how})"
    if model in ("none", "voluntary"):
        return (f"kernel preemption: {model} ({how}): a woken thread of any priority waits while the running one is "
                "in the kernel, so post-copy's fault tail and the blackout during a push are longer than the CPU "
                "alone explains (docs/performance.md, \"Between agents\"); a kernel booted with preempt=full should "
                "shorten them (not measured: this needs a reboot with another command line)")
    return f"kernel preemption: {model} ({how}): woken high-priority threads preempt running ones in the kernel too"
