"""Trackers whose collect is a command to the guest that fills a shared bitmap.

A memfd of two bitmaps (one bit per page) is handed to the guest: the first half is the
guest's own (live dirty bits, or pages harvested early), the second the *harvest* half that
a collect command fills before it is acknowledged; ``collect`` then turns the harvest bits
into page numbers here.  The mprotect tracker (a SIGSEGV handler in a process guest) and
the KVM trackers (dirty log, dirty ring: KVM ioctls must come from the VM's own process)
share it.
"""
from __future__ import annotations

import mmap
import os

import numpy as np

from vmem.errors import GuestError, TrackerUnavailable
from vmem.ram import close_mapping
from vmem.tracking.base import DirtyTracker

__all__ = ["GuestBitmapTracker"]


class GuestBitmapTracker(DirtyTracker):
    """Base: subclasses say how to ask the guest (:meth:`_guest_start`, ``_collect``'s
    :meth:`_guest_collect`, :meth:`_guest_stop`)."""

    def __init__(self, guest):
        super().__init__(guest.npages)
        self._guest = guest
        self._nwords = -(-guest.npages // 64)
        fd = os.memfd_create(f"vmem-{self.name}-bitmap", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 2 * self._nwords * 8)
            self._map = mmap.mmap(fd, 2 * self._nwords * 8, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._harvest = np.frombuffer(self._map, dtype=np.uint64)[self._nwords:]
        self._armed = False
        self._nat = None  # vmem._native, loaded by start()

    def _guest_start(self, bitmap_fd: int) -> int:
        raise NotImplementedError

    def _guest_collect(self) -> int:
        raise NotImplementedError

    def _guest_stop(self, timeout_s: float) -> int:
        raise NotImplementedError

    def _start_refused(self, res: int) -> TrackerUnavailable:
        return TrackerUnavailable(self.name, f"the guest refused to start it ({os.strerror(-res)})")

    def start(self) -> None:
        from vmem import _native  # loaded here, not in the first collect (~5 ms the first time)

        self._nat = _native
        res = self._guest_start(self._fd)
        if res < 0:
            raise self._start_refused(res)
        self._armed = True

    def _collect(self) -> np.ndarray:
        res = self._guest_collect()
        if res < 0:
            raise GuestError(f"{self.name} collect failed in the guest: {os.strerror(-res)}")
        # In C: numpy's bit expansion took ~0.5 ms of a 1 GiB guest's 4.6 ms collect.  The
        # guest's result is its count of harvested pages: the bitmap is read once.
        return self._nat.bitmap_pages(self._harvest, self.npages, expected=min(res, self.npages))

    def stop(self) -> None:
        if self._armed:
            self._armed = False
            if self._guest.alive():
                try:
                    self._guest_stop(10)
                except GuestError:
                    pass
        if self._map is not None:
            self._harvest = None
            close_mapping(self._map)
            self._map = None
            os.close(self._fd)
            self._fd = -1
