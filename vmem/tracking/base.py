"""The dirty-tracker contract, shared by every mechanism.

``collect()`` returns the pages written since the previous ``collect()`` (or ``start()``)
*and has already re-armed tracking for them* when it returns.  A migrator therefore reads
a page for sending only after it was re-armed, so a write that races with the send is
caught by the next ``collect()``.  Never "read the bitmap, send, then clear": that loses
writes.
"""
from __future__ import annotations

import abc
import time

import numpy as np

from vmem.pages import ranges_to_pages as regions_to_pages

__all__ = ["DirtyTracker", "regions_to_pages"]


class DirtyTracker(abc.ABC):
    """One guest's dirty-page tracking.

    Attributes:
        name: the mechanism's CLI name (``uffd-wp``, ``mprotect``).
        npages: pages tracked (the whole guest RAM).
        collect_s: wall time spent in the latest ``collect()``.
    """

    name: str = "?"

    def __init__(self, npages: int):
        self.npages = npages
        self.collect_s = 0.0
        self.collects = 0

    @abc.abstractmethod
    def start(self) -> None:
        """Arm tracking for every page: from now on each page counts as clean until written."""

    def collect(self) -> np.ndarray:
        """Sorted unique int64 page indices written since the last collect; already re-armed.

        Times the mechanism's ``_collect`` into ``collect_s`` and counts collects.
        """
        t0 = time.perf_counter()
        pages = self._collect()
        self.collect_s = time.perf_counter() - t0
        self.collects += 1
        return pages

    def warm(self) -> None:
        """Get ready for a ``collect()`` that is about to come (the final one, inside the
        downtime): bring what it reads into the CPU caches, changing nothing a ``collect()``
        reports.  Optional; a no-op unless the mechanism has something to warm."""

    @abc.abstractmethod
    def _collect(self) -> np.ndarray:
        """The mechanism: written pages since the last collect, re-armed before returning."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Disarm tracking (the guest runs at full speed again).  Idempotent."""

    def describe(self) -> dict:
        return {"name": self.name, "collects": self.collects, "last_collect_s": self.collect_s}

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
