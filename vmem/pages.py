"""Pages: the page size, and page-index helpers shared by every layer.

The guest page size is defined here once (:data:`PAGE_SIZE`); everything in vmem and
guests imports it from here (``vmem.ram`` and ``vmem.format.wire`` re-export it), the C
extension's ``VMEM_PAGE_SIZE`` is checked against it when ``vmem._native`` loads, and
``transport.codec.PAGE_BYTES`` (transport imports nothing of vmem) is checked against it by
the tests.

A *page* is an index (int64), an *offset* is bytes.  Page lists are sorted unique int64
arrays; *runs* are ``[first, end)`` pairs.  Everything here works on index arrays with
numpy; nothing loops over pages in Python.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vmem.ram import GuestRam

__all__ = [
    "PAGE_SHIFT", "PAGE_SIZE", "page_runs", "runs_to_pages", "ranges_to_pages", "page_buffers",
    "merge_pages", "merge_sorted_pages", "unique_pages", "mismatched_pages", "zero_page_digest", "MAX_DIRECT_RUNS",
]

PAGE_SHIFT = 12
"""log2 of the guest page size (x86-64 base pages; shmem/memfd without huge pages).  Also the
Xen stream's ``page_shift``, which Xen's reader accepts as 12 only."""

PAGE_SIZE = 1 << PAGE_SHIFT  # 4096 octets

#: With at most this many contiguous runs in a batch, send views of the RAM mapping
#: directly (no copy); beyond it one numpy gather into a staging buffer is cheaper than
#: building many small views.
MAX_DIRECT_RUNS = 16


def page_runs(pages: np.ndarray, npages: int) -> tuple[np.ndarray, np.ndarray]:
    """Split sorted unique page indices into maximal contiguous runs ``[starts[i], ends[i])``.

    The one place a page list becomes runs (the inverse is :func:`ranges_to_pages`).

    Args:
        pages: strictly increasing page indices (any integer dtype).
        npages: number of pages in RAM; every index must be in ``[0, npages)``.

    Returns:
        ``(starts, ends)``: int64 arrays of equal length, one entry per run.

    Raises:
        ValueError: ``pages`` is not one-dimensional, not strictly increasing, or out of range.
    """
    pages = np.asarray(pages)
    if pages.ndim != 1:
        raise ValueError(f"pages must be one-dimensional, got shape {pages.shape}")
    if pages.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty.copy()
    if not np.issubdtype(pages.dtype, np.integer):
        raise ValueError(f"pages must be integers, got {pages.dtype}")
    pages = pages.astype(np.int64, copy=False)
    steps = np.diff(pages)
    if steps.size and steps.min() <= 0:
        raise ValueError("pages must be sorted and unique")
    if pages[0] < 0 or pages[-1] >= npages:
        raise ValueError(f"pages must lie in [0, {npages}), got {pages[0]}..{pages[-1]}")
    # A run ends wherever the next index is not the successor.
    breaks = np.flatnonzero(steps != 1) + 1
    starts = np.concatenate((pages[:1], pages[breaks]))
    ends = np.concatenate((pages[breaks - 1], pages[-1:])) + 1
    return starts, ends


def count_runs(mask: np.ndarray) -> int:
    """How many maximal runs of True a one-dimensional boolean ``mask`` holds.

    What ``len(page_runs(np.flatnonzero(mask), len(mask))[0])`` is, without listing the
    pages: two passes over the mask (~20 us for 1 GiB of pages) where ``flatnonzero`` of a
    scattered mask alone takes ~0.4 ms -- for deciding whether listing the runs is worth it.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 1:
        raise ValueError(f"mask must be one-dimensional, got shape {mask.shape}")
    if not mask.size:
        return 0
    return int(np.count_nonzero(mask[1:] > mask[:-1])) + int(mask[0])


def hole_runs(runs: np.ndarray, npages: int) -> np.ndarray:
    """The runs of ``[0, npages)`` not covered by ``runs`` (sorted, not overlapping
    ``[first, end)`` rows, as ``GuestRam.data_runs`` returns them), as an ``(n, 2)`` int64
    array of [first, end) rows in order."""
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    edges = np.concatenate(([0], runs.ravel(), [int(npages)])).reshape(-1, 2)
    return edges[edges[:, 1] > edges[:, 0]]


def runs_to_pages(runs: np.ndarray) -> np.ndarray:
    """Expand ``(n, 2)`` [first, end) runs into a flat sorted int64 page array, vectorised."""
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    return ranges_to_pages(runs[:, 0], runs[:, 1])


def ranges_to_pages(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Expand [start, end) page ranges into one flat int64 page array without a Python loop."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(ends, dtype=np.int64) - starts
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    # Each output element is its range's start plus its offset inside the range.
    out_starts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(starts - out_starts, lengths)


def page_buffers(ram: np.ndarray, pages: np.ndarray, staging: np.ndarray) -> list:
    """Buffers holding the contents of ``pages`` (sorted) in order, for scatter/gather send.

    Returns views of ``ram`` for few contiguous runs, else one slice of ``staging`` filled
    by a single ``np.take``.  The caller must send the buffers before reusing ``staging``.
    """
    starts, ends = page_runs(pages, len(ram))
    if len(starts) <= MAX_DIRECT_RUNS:
        return [ram[a:b].data for a, b in zip(starts.tolist(), ends.tolist())]
    out = staging[: len(pages)]
    np.take(ram, pages, axis=0, out=out)
    return [out.data]


def merge_pages(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted union of two int64 page arrays.

    Written with numpy primitives on purpose: ``np.union1d``'s first call in a process
    costs ~7 ms of lazy set-up (measured, numpy 2.4), and this runs inside the downtime.
    """
    both = np.concatenate((a, b)).astype(np.int64, copy=False)
    if len(both) < 2:
        return both
    both.sort()
    keep = np.empty(len(both), dtype=bool)
    keep[0] = True
    np.not_equal(both[1:], both[:-1], out=keep[1:])
    return both[keep]


def merge_sorted_pages(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted union of two *sorted unique* int64 page arrays (what a tracker's collect returns,
    and ``runs_to_pages``), without sorting them again: each page of ``b`` is looked up in
    ``a`` (binary search) and only those not there are inserted.

    For the downtime path, where ``a`` is large and ``b`` small: a pure post-copy's list of
    every page holding data and the pages written after it was taken.  :func:`merge_pages`
    sorted their concatenation -- 2 MiB for a 1 GiB guest, 4-9 ms measured here right after
    TRANSITION, on the CPU the destination needed (much of it zeroing fresh pages for the
    copy, which on a VM that hands free memory back to its host costs a host fault per
    page).  This costs O(len(b) log len(a)) and one copy of ``a`` only when ``b`` adds pages.

    Returns ``a`` itself (not a copy) when ``b`` adds nothing: callers must not modify the
    result in place.  Unsorted or repeated input gives a wrong answer, not an error.
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if b.size == 0:
        return a
    if a.size == 0:
        return b
    at = np.searchsorted(a, b)
    found = at < a.size
    found[found] = a[at[found]] == b[found]
    new = b[~found]
    if new.size == 0:
        return a
    return np.insert(a, at[~found], new)


def unique_pages(a: np.ndarray) -> np.ndarray:
    """Sorted unique int64 pages of ``a`` (``np.unique`` without its ~9 ms first-call set-up)."""
    return merge_pages(np.asarray(a, dtype=np.int64), np.empty(0, dtype=np.int64))


_ZERO_DIGEST: int | None = None


def zero_page_digest() -> int:
    """The digest of an all-zero page (what a hole or a never-written page digests to)."""
    global _ZERO_DIGEST
    if _ZERO_DIGEST is None:
        from vmem import _native as nat

        z = np.zeros((1, PAGE_SIZE), dtype=np.uint8)
        out = np.empty(1, dtype=np.uint64)
        nat.digest_range(z.ctypes.data, 0, 1, out)
        _ZERO_DIGEST = int(out[0])
    return _ZERO_DIGEST


def mismatched_pages(ram: "GuestRam", expected: np.ndarray, chunk_pages: int = 1 << 16) -> np.ndarray:
    """Pages of ``ram`` whose digest differs from ``expected`` (uint64[npages]).

    Works chunk by chunk (8 B/page of temporaries per chunk, not per guest), and digests
    only the runs that hold data: holes must match the zero-page digest.
    """
    from vmem import _native as nat

    zero = zero_page_digest()
    runs = ram.data_runs()
    bad = []
    tmp = np.empty(chunk_pages, dtype=np.uint64)
    for c0 in range(0, ram.npages, chunk_pages):
        c1 = min(c0 + chunk_pages, ram.npages)
        out = tmp[: c1 - c0]
        out.fill(zero)
        for first, end in runs.tolist():
            a, b = max(first, c0), min(end, c1)
            if a < b:
                nat.digest_range(ram.address, a, b - a, out[a - c0 : b - c0])
        diff = np.flatnonzero(out != expected[c0:c1])
        if len(diff):
            bad.append(diff + c0)
    return np.concatenate(bad) if bad else np.empty(0, dtype=np.int64)
