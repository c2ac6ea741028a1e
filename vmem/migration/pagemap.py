"""The page map recorder: which page did what, round by round and fault by fault.

A migration with a recorder (``MigrationOptions.pagemap``, ``vmem migrate --pagemap DIR``)
keeps, per pre-copy round, two packed bitmaps (``np.packbits``, one bit per page): the
pages the round *sent* and the pages the guest *dirtied* meanwhile (what the tracker's
collect returned).  Then the stop-and-copy set, or for post-copy the pending set at the
switch, every background push batch (its pages and the second it went out) and the fault
log the destination sends back (page, when the guest faulted, how long it waited).

Cost: one bitmap of ``npages / 8`` bytes per round and kind (2 KiB per round for 64 MiB,
32 KiB for 1 GiB), built with numpy from the arrays the migrator already has; the push
log is one int32 per pushed page.  No per-page Python anywhere.

:func:`PagemapRecorder.save` writes one ``.npz`` (layout below); ``vmem.analysis.pagemap``
turns it into the raster PNG and the step-through HTML.

``.npz`` layout (version 1; times in seconds since the migration started, source clock)::

    version           ()             1
    npages            ()             guest pages
    zero              (nbytes,)      packed: pages that held no data at the start (never sent)
    round_sent        (R, nbytes)    packed per pre-copy round: pages it sent
    round_dirty       (R, nbytes)    packed per round: pages dirtied during it
    round_t_s         (R, 2)         start and end of each round (end = the collect)
    sc_sent           (nbytes,)      packed: stop-and-copy set (all zero bits without one)
    sc_t_s            (2,)           pause, end of the stop-and-copy send ([nan nan] without)
    pc_pending        (nbytes,)      packed: pages still to come at the post-copy switch
    pc_switch_s       ()             the switch (the guest paused), nan without post-copy
    pc_end_s          ()             the end of the push (COMPLETE sent), nan without
    push_pages        (P,)           int32: pages pushed, in push order
    push_batch_end    (B,)           int64: end offset of each batch in push_pages
    push_t_s          (B,)           when each batch was sent
    fault_page        (F,)           int64: pages the guest faulted on, in resolution order
    fault_t_s         (F,)           when it faulted (destination clock, aligned on the switch)
    fault_latency_us  (F,)           fault -> page placed
    fault_truncated   ()             True if the destination saw more faults than it logged
"""
from __future__ import annotations

import math
import os
import time

import numpy as np

__all__ = ["PAGEMAP_VERSION", "PagemapRecorder", "page_bitmap"]

PAGEMAP_VERSION = 1


def page_bitmap(pages: np.ndarray, npages: int) -> np.ndarray:
    """A bool array of ``npages`` with the pages of ``pages`` set.

    ``pages``: a page array (int), or an ``(n, 2)`` array of [first, end) runs.  Built with
    numpy only (runs: a difference array and one cumulative sum).
    """
    out = np.zeros(npages, dtype=bool)
    pages = np.asarray(pages)
    if pages.size == 0:
        return out
    if pages.ndim == 2:
        edge = np.zeros(npages + 1, dtype=np.int64)
        np.add.at(edge, pages[:, 0], 1)
        np.add.at(edge, pages[:, 1], -1)
        return np.cumsum(edge[:-1]) > 0
    out[pages] = True
    return out


class PagemapRecorder:
    """Collects what :mod:`vmem.analysis.pagemap` draws (see the module doc for the layout).

    Args:
        npages: guest pages.
        t0: ``time.monotonic()`` at the migration's start (times are kept relative to it).

    Guarantees: every method is O(npages / 8) numpy work or less per call and never touches
    guest RAM; the recorder only reads the page arrays it is given.
    """

    def __init__(self, npages: int, t0: float | None = None):
        self.npages = int(npages)
        self.t0 = time.monotonic() if t0 is None else t0
        self._nbytes = (self.npages + 7) // 8
        self.zero = np.zeros(self._nbytes, dtype=np.uint8)
        self.round_sent: list[np.ndarray] = []
        self.round_dirty: list[np.ndarray] = []
        self.round_t_s: list[tuple[float, float]] = []
        self.sc_sent = np.zeros(self._nbytes, dtype=np.uint8)
        self.sc_t_s = (math.nan, math.nan)
        self.pc_pending = np.zeros(self._nbytes, dtype=np.uint8)
        self.pc_switch_s = math.nan
        self.pc_end_s = math.nan
        self._push: list[np.ndarray] = []
        self._push_t_s: list[float] = []
        self.fault_page = np.empty(0, dtype=np.int64)
        self.fault_t_s = np.empty(0, dtype=np.float64)
        self.fault_latency_us = np.empty(0, dtype=np.float64)
        self.fault_truncated = False

    @property
    def switched(self) -> bool:
        """A post-copy switch was recorded."""
        return not math.isnan(self.pc_switch_s)

    @property
    def push_batches(self) -> int:
        """Post-copy push batches recorded."""
        return len(self._push_t_s)

    def now_s(self) -> float:
        """Seconds since the migration started."""
        return time.monotonic() - self.t0

    def _pack(self, pages) -> np.ndarray:
        return np.packbits(page_bitmap(pages, self.npages))

    def data_pages(self, pages) -> None:
        """The pages that hold data at the start (pages or runs): the rest are zero pages."""
        self.zero = np.packbits(~page_bitmap(pages, self.npages))

    def precopy_round(self, sent, dirty, start_s: float, end_s: float) -> None:
        """One pre-copy round: the pages it sent, those dirtied meanwhile, its start and end."""
        self.round_sent.append(self._pack(sent))
        self.round_dirty.append(self._pack(dirty))
        self.round_t_s.append((start_s, end_s))

    def stop_and_copy(self, pages, start_s: float, end_s: float) -> None:
        """The final set sent with the guest paused."""
        self.sc_sent = self._pack(pages)
        self.sc_t_s = (start_s, end_s)

    def postcopy_switch(self, pending, switch_s: float) -> None:
        """The switch: the pages still to come."""
        self.pc_pending = self._pack(pending)
        self.pc_switch_s = switch_s

    def pushed(self, batch: np.ndarray) -> None:
        """One background push batch, sent now."""
        self._push.append(np.asarray(batch, dtype=np.int32))
        self._push_t_s.append(self.now_s())

    def postcopy_end(self) -> None:
        """The push is over (COMPLETE written)."""
        self.pc_end_s = self.now_s()

    def faults(self, log: dict | None) -> None:
        """The destination's fault log (``PostcopyDestination.fault_log``): its times are
        microseconds after the switch on its clock; they are placed after our switch."""
        if not log:
            return
        pages = np.asarray(log.get("page", []), dtype=np.int64)
        ok = (pages >= 0) & (pages < self.npages)
        fault_us = np.asarray(log.get("fault_us", []), dtype=np.float64)
        lat_us = np.asarray(log.get("latency_us", []), dtype=np.float64)
        if not (len(pages) == len(fault_us) == len(lat_us)):
            return  # a malformed log is left out, never half-drawn
        self.fault_page = pages[ok]
        self.fault_t_s = self.pc_switch_s + fault_us[ok] / 1e6
        self.fault_latency_us = lat_us[ok]
        self.fault_truncated = bool(log.get("truncated"))

    def save(self, path: str) -> str:
        """Write the ``.npz`` (layout in the module doc); returns ``path``."""
        nb = self._nbytes
        push = np.concatenate(self._push) if self._push else np.empty(0, dtype=np.int32)
        ends = np.cumsum([len(b) for b in self._push], dtype=np.int64) if self._push else np.empty(0, dtype=np.int64)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez_compressed(
            tmp, version=np.int64(PAGEMAP_VERSION), npages=np.int64(self.npages), zero=self.zero,
            round_sent=np.array(self.round_sent, dtype=np.uint8).reshape(-1, nb),
            round_dirty=np.array(self.round_dirty, dtype=np.uint8).reshape(-1, nb),
            round_t_s=np.array(self.round_t_s, dtype=np.float64).reshape(-1, 2),
            sc_sent=self.sc_sent, sc_t_s=np.array(self.sc_t_s, dtype=np.float64),
            pc_pending=self.pc_pending, pc_switch_s=np.float64(self.pc_switch_s), pc_end_s=np.float64(self.pc_end_s),
            push_pages=push, push_batch_end=ends, push_t_s=np.array(self._push_t_s, dtype=np.float64),
            fault_page=self.fault_page, fault_t_s=self.fault_t_s, fault_latency_us=self.fault_latency_us,
            fault_truncated=np.bool_(self.fault_truncated))
        os.replace(tmp, path)
        return path
