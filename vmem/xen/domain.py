"""A running Xen domain as vmem sees it from dom0: name lookup and configuration (through
``xl``), liveness, pause, its populated frames, foreign reads, and a log-dirty tracker
with the same contract as vmem's process trackers.

Only PVH (and HVM) domains: their frame numbers are GFNs and log-dirty uses HAP.  A PV
domain is refused by name (Debian's Xen has no shadow paging, so no PV log-dirty).
"""
from __future__ import annotations

import errno
import json
import subprocess

import numpy as np

from vmem.errors import ConfigError, GuestCrashed, VmemError
from vmem.tracking.base import DirtyTracker
from vmem.xen._libxc import DOMINF_HVM, PAGE_SIZE, XTAB_TYPE, XcHandle

__all__ = ["XenDomain", "XenLogDirtyTracker", "XenError", "xl", "XL_TIMEOUT_S"]

#: bound on any one ``xl`` command (domain create/restore under TCG takes seconds; this is generous)
XL_TIMEOUT_S = 300.0


class XenError(VmemError):
    """A Xen operation failed (the message names the operation and what to do)."""


def xl(*args: str, timeout_s: float = XL_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``xl ARGS`` (bounded); raise XenError with its stderr if it fails and ``check``."""
    try:
        cp = subprocess.run(["xl", *args], capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise XenError("xl is not installed: run in a Xen dom0 with xen-utils-4.17") from None
    except subprocess.TimeoutExpired:
        raise XenError(f"xl {' '.join(args)} did not finish in {timeout_s:g} s") from None
    if check and cp.returncode != 0:
        raise XenError(f"xl {' '.join(args)} failed (exit {cp.returncode}): {cp.stderr.strip()[-500:]}")
    return cp


def domid_of(name: str) -> int:
    cp = xl("domid", name, check=False)
    if cp.returncode != 0:
        raise ConfigError("--domain", f"no Xen domain named {name!r} (xl list shows the running ones)")
    return int(cp.stdout.strip())


class XenDomain:
    """One domain, opened by name.  ``close()`` (or ``with``) releases the handles and
    turns log-dirty off if vmem turned it on."""

    def __init__(self, name: str):
        self.name = name
        self.domid = domid_of(name)
        self.xc = XcHandle(self.domid)
        try:
            info = self.xc.info()
            if not info.flags & DOMINF_HVM:
                raise ConfigError("--domain", f"domain {name!r} is PV: Debian's Xen has no shadow paging, so no PV "
                                              "log-dirty; migrate a PVH domain (type=\"pvh\")")
            #: pfns 0 .. max_gpfn: a PVH guest's special pages sit just below 4 GiB, so this
            #: is about 1M for any guest size (a 128 KiB dirty bitmap)
            self.npages = self.xc.max_gpfn() + 1
            self.tot_pages = info.tot_pages
        except BaseException:
            self.xc.close()
            raise

    @property
    def data_pages(self) -> int:
        """Pages the domain holds (``tot_pages``), what a first round must send."""
        return self.tot_pages

    def config(self) -> dict:
        """The domain's libxl configuration, as ``xl save`` writes it (``xl list -l``)."""
        doc = json.loads(xl("list", "-l", self.name).stdout)
        if not doc or "config" not in doc[0]:
            raise XenError(f"xl list -l {self.name} returned no configuration")
        return doc[0]["config"]

    def alive(self) -> bool:
        try:
            return self.xc.info().alive
        except OSError:
            return False

    def crash_error(self, what: str) -> GuestCrashed:
        return GuestCrashed(f"Xen domain {self.name} (domid {self.domid}) died or shut down during {what}")

    def populated_pfns(self) -> np.ndarray:
        """Sorted pfns that hold a frame (not XTAB): what libxc's first round sends with data.
        One ``xc_get_pfn_type_batch`` per 1024 pfns over 0..max_gpfn, as libxc does."""
        types = self.xc.pfn_types(np.arange(self.npages, dtype=np.uint64))
        return np.flatnonzero(types != XTAB_TYPE).astype(np.int64)

    def read_pages(self, pfns: np.ndarray, out: np.ndarray) -> np.ndarray:
        return self.xc.read_pages(pfns, out)

    def close(self) -> None:
        self.xc.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class XenLogDirtyTracker(DirtyTracker):
    """Xen log-dirty (HAP) as a vmem dirty tracker: ``collect()`` is
    ``XEN_DOMCTL_SHADOW_OP_CLEAN``, which returns the bitmap and re-arms those pages in
    one hypercall (the contract of :class:`vmem.tracking.base.DirtyTracker`)."""

    name = "xen-logdirty"

    def __init__(self, domain: XenDomain):
        super().__init__(domain.npages)
        self.domain = domain

    def start(self) -> None:
        try:
            self.domain.xc.logdirty_enable(self.npages)
        except OSError as err:
            if err.errno == errno.EOPNOTSUPP:
                raise XenError(str(err)) from None
            raise XenError(f"cannot enable log-dirty on {self.domain.name}: {err}") from None
        self.domain.xc.logdirty_collect()  # start from a clean bitmap

    def _collect(self) -> np.ndarray:
        return self.domain.xc.logdirty_collect()

    def collect_final(self) -> np.ndarray:
        """The last collect, with the domain suspended or paused (libxc's final CLEAN, with
        XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL: frames Xen itself keeps mapped count as dirty)."""
        return self.domain.xc.logdirty_collect(final=True)

    def stop(self) -> None:
        try:
            self.domain.xc.logdirty_disable()
        except OSError:
            pass  # the domain is gone: nothing left to disarm


class XenProfileGuest:
    """What :func:`vmem.analysis.profile.profile_guest` needs of a guest, for a Xen domain."""

    def __init__(self, domain: XenDomain):
        self.domain = domain
        self.npages = domain.npages
        self.spec = None
        self.page_size = PAGE_SIZE
        #: what profile_guest counts as pages holding data (a process guest has RAM runs instead)
        self.populated_pages = domain.data_pages

    def alive(self) -> bool:
        return self.domain.alive()

    def crash_error(self, what: str) -> GuestCrashed:
        return self.domain.crash_error(what)

    def counters(self) -> dict:
        return {}

    def tracker(self) -> XenLogDirtyTracker:
        return XenLogDirtyTracker(self.domain)
