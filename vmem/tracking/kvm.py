"""Dirty tracking of a KVM guest by KVM itself: the dirty log or the dirty ring.

KVM ioctls on a VM must come from the process that created it, so both are commands to
the guest process (guests/kvm/runtime.py) over the shared bitmap of
:class:`vmem.tracking.bitmap.GuestBitmapTracker`:

* ``kvm-log``: KVM_MEM_LOG_DIRTY_PAGES on the RAM memslot with
  KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2; a collect is KVM_GET_DIRTY_LOG into the harvest half
  then KVM_CLEAR_DIRTY_LOG of exactly those pages, which write-protects them again before
  the command is acknowledged.
* ``kvm-ring``: KVM_CAP_DIRTY_LOG_RING (enabled when the VM was created: KVM allows it only
  before the vCPU exists); a collect walks the vCPU's ring into the harvest half, adds the
  pages harvested early when the ring filled (KVM_EXIT_DIRTY_RING_FULL), and issues
  KVM_RESET_DIRTY_RINGS, which re-arms them.

Either way a page written after the collect's re-arm faults into KVM and is logged again:
the tracker contract of vmem.tracking.base holds.
"""
from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

from vmem.errors import TrackerUnavailable
from vmem.tracking.bitmap import GuestBitmapTracker

__all__ = ["KvmDirtyGuest", "KvmLogTracker", "KvmRingTracker"]


@runtime_checkable
class KvmDirtyGuest(Protocol):
    """What the KVM trackers need from a guest: commands its VM process runs."""

    npages: int
    kvm_dirty_mode: str
    """``log`` or ``ring``: what the VM was created with."""

    def alive(self) -> bool: ...
    def kvm_dirty_start(self, bitmap_fd: int, ring: bool) -> int: ...
    def kvm_dirty_collect(self) -> int: ...
    def kvm_dirty_stop(self, timeout_s: float = 10.0) -> int: ...
    def kvm_message(self) -> str: ...


class _KvmTracker(GuestBitmapTracker):
    ring = False

    def __init__(self, guest: KvmDirtyGuest):
        if not hasattr(guest, "kvm_dirty_start"):
            raise TrackerUnavailable(self.name, "the guest is not a KVM guest", "--tracker auto")
        want = "ring" if self.ring else "log"
        if guest.kvm_dirty_mode != want:
            other = guest.kvm_dirty_mode
            raise TrackerUnavailable(
                self.name, f"the VM was created with the dirty {other} (KVM enables the ring only before the "
                           f"vCPU exists, and then refuses the log)", f"--tracker kvm-{other}")
        super().__init__(guest)

    def _guest_start(self, bitmap_fd: int) -> int:
        return self._guest.kvm_dirty_start(bitmap_fd, self.ring)

    def _start_refused(self, res: int) -> TrackerUnavailable:
        return TrackerUnavailable(self.name, f"the VM refused it ({os.strerror(-res)}): {self._guest.kvm_message()}")

    def _guest_collect(self) -> int:
        return self._guest.kvm_dirty_collect()

    def _guest_stop(self, timeout_s: float) -> int:
        return self._guest.kvm_dirty_stop(timeout_s=timeout_s)


class KvmLogTracker(_KvmTracker):
    """KVM dirty log with manual protect (GET + CLEAR per collect)."""

    name = "kvm-log"


class KvmRingTracker(_KvmTracker):
    """KVM dirty ring (harvest + RESET per collect; ring-full exits harvested early)."""

    name = "kvm-ring"
    ring = True
