"""Dirty tracking with mprotect + a C SIGSEGV handler inside the guest (portable Linux).

The guest maps a bitmap memfd we create: the first half is the live *dirty* bitmap the C
handler sets bits in; the second half is the *harvest* bitmap ``collect`` reads.  Only a
process can re-protect its own mappings, so ``collect`` is a command to the guest: at its
next safe point it moves the dirty bits to the harvest bitmap and re-protects those pages
before acknowledging.  The guest is single-threaded, so no write slips between the two.

The max_map_count trap (per-page mprotect splits VMAs; a scattered writer can need more
than vm.max_map_count of them) is handled in C: the handler falls back to unprotecting an
aligned chunk and marking all of it dirty (conservative: a clean page sent twice is
harmless, a lost write is not); ``fallbacks`` counts it.
"""
from __future__ import annotations

import mmap
import os
from typing import Protocol, runtime_checkable

import numpy as np

from vmem.errors import GuestError, TrackerUnavailable
from vmem.ram import close_mapping
from vmem.tracking.base import DirtyTracker

__all__ = ["MprotectTracker", "MprotectGuest"]


@runtime_checkable
class MprotectGuest(Protocol):
    """What :class:`MprotectTracker` needs from a guest: three commands the guest runs at
    its next safe point.  Each returns the guest's result: >= 0, or -errno."""

    npages: int

    def alive(self) -> bool: ...

    def mprotect_start(self, bitmap_fd: int) -> int:
        """Map ``bitmap_fd`` (dirty half, harvest half), install the SIGSEGV handler and
        write-protect all of RAM."""

    def mprotect_collect(self) -> int:
        """Move the dirty bits to the harvest half and re-protect those pages."""

    def mprotect_stop(self, timeout_s: float = 10.0) -> int:
        """Unprotect RAM and remove the handler.

        Raises:
            GuestError: the guest did not answer.
        """


class MprotectTracker(DirtyTracker):
    """mprotect + SIGSEGV tracker; each collect is a round trip to the guest."""

    name = "mprotect"

    def __init__(self, guest: MprotectGuest):
        super().__init__(guest.npages)
        self._guest = guest
        self._nwords = -(-guest.npages // 64)
        fd = os.memfd_create("vmem-mprot-bitmap", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 2 * self._nwords * 8)
            self._map = mmap.mmap(fd, 2 * self._nwords * 8, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._harvest = np.frombuffer(self._map, dtype=np.uint64)[self._nwords :]
        self._armed = False

    def start(self) -> None:
        res = self._guest.mprotect_start(self._fd)
        if res < 0:
            raise TrackerUnavailable("mprotect", f"the guest could not install its SIGSEGV handler ({os.strerror(-res)})")
        self._armed = True

    def _collect(self) -> np.ndarray:
        res = self._guest.mprotect_collect()
        if res < 0:
            raise GuestError(f"mprotect collect failed in the guest: {os.strerror(-res)}")
        harvest = self._harvest
        words = np.flatnonzero(harvest)
        bits = np.unpackbits(harvest[words].view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
        w, b = np.nonzero(bits)
        pages = words[w].astype(np.int64) * 64 + b
        return pages[pages < self.npages]

    def stop(self) -> None:
        if self._armed:
            self._armed = False
            if self._guest.alive():
                try:
                    self._guest.mprotect_stop(timeout_s=10)
                except GuestError:
                    pass
        if self._map is not None:
            self._harvest = None
            close_mapping(self._map)
            self._map = None
            os.close(self._fd)
            self._fd = -1
