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

import os
from typing import Protocol, runtime_checkable

from vmem.errors import TrackerUnavailable
from vmem.tracking.bitmap import GuestBitmapTracker

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


class MprotectTracker(GuestBitmapTracker):
    """mprotect + SIGSEGV tracker; each collect is a round trip to the guest."""

    name = "mprotect"

    def _guest_start(self, bitmap_fd: int) -> int:
        return self._guest.mprotect_start(bitmap_fd)

    def _start_refused(self, res: int) -> TrackerUnavailable:
        return TrackerUnavailable("mprotect", f"the guest could not install its SIGSEGV handler ({os.strerror(-res)})")

    def _guest_collect(self) -> int:
        return self._guest.mprotect_collect()

    def _guest_stop(self, timeout_s: float) -> int:
        return self._guest.mprotect_stop(timeout_s=timeout_s)
