"""Dirty trackers behind one contract (see :mod:`vmem.tracking.base`).

``make_tracker(guest, "auto")`` picks userfaultfd write-protect when the kernel offers
WP_ASYNC on shmem and PAGEMAP_SCAN, and falls back to mprotect + SIGSEGV otherwise;
for a KVM guest it picks KVM's dirty log or ring, whichever its VM was created with.
Each mechanism states what it needs from a guest as a protocol (:class:`UffdWpGuest`,
:class:`MprotectGuest`); the guest backends implement them, and this package imports no
backend.
"""
from __future__ import annotations

from vmem.errors import ConfigError, TrackerUnavailable
from vmem.tracking.base import DirtyTracker, regions_to_pages
from vmem.tracking.kvm import KvmDirtyGuest, KvmLogTracker, KvmRingTracker
from vmem.tracking.mprotect import MprotectGuest, MprotectTracker
from vmem.tracking.uffd_wp import UffdWpGuest, UffdWpTracker

__all__ = ["DirtyTracker", "UffdWpTracker", "MprotectTracker", "UffdWpGuest", "MprotectGuest",
           "KvmDirtyGuest", "KvmLogTracker", "KvmRingTracker", "make_tracker", "TRACKERS", "regions_to_pages"]

TRACKERS = {"uffd-wp": UffdWpTracker, "mprotect": MprotectTracker, "kvm-log": KvmLogTracker,
            "kvm-ring": KvmRingTracker}


def make_tracker(guest: UffdWpGuest | MprotectGuest, kind: str = "auto") -> DirtyTracker:
    """Build the tracker ``kind`` for ``guest`` (``auto`` = best available): what the
    migrator calls to track a source guest.

    Raises:
        TrackerUnavailable: the chosen tracker needs a kernel feature that is missing
            (the error names it and the alternative).
        ConfigError: unknown tracker name.
    """
    if kind == "auto" and hasattr(guest, "kvm_dirty_mode"):
        # A KVM guest: KVM's own tracking, the mechanism its VM was created with.
        return KvmRingTracker(guest) if guest.kvm_dirty_mode == "ring" else KvmLogTracker(guest)
    if kind == "auto":
        try:
            return UffdWpTracker(guest)
        except TrackerUnavailable:
            return MprotectTracker(guest)
    try:
        cls = TRACKERS[kind]
    except KeyError:
        raise ConfigError("--tracker", f"unknown tracker {kind!r}; choose auto, {', '.join(TRACKERS)}") from None
    return cls(guest)
