"""Moving batches of guest pages over a :class:`~transport.channel.Channel` without
per-page Python.

Wire layout of one batch written by :func:`send_pages` (the header is the caller's: it
usually carries the page indices, so that the receiver can call :func:`recv_pages_into`)::

    +-----------+----------------------+----------------------+-----+
    | header    | page pages[0]        | page pages[1]        | ... |
    | (caller)  | (page_bytes bytes)   | (page_bytes bytes)   |     |
    +-----------+----------------------+----------------------+-----+

Pages appear in ascending index order, raw, with no padding; ``page_bytes`` is the row width
of ``ram`` (4096 for guest RAM).  The bytes are the same whichever path below is taken, so
sender and receiver choose their paths independently.

Two paths, chosen per batch by how many contiguous runs the page set forms:

* few runs (<= :data:`DIRECT_RUNS_MAX`): one ``sendmsg``/``recv_into`` per run straight from/into
  the ``ram`` rows -- no copy in user space at all;
* many runs: gather into (or scatter from) a reusable staging buffer with numpy
  (``np.take(..., out=)`` / fancy assignment), so the socket sees one big buffer instead of
  thousands of 4 KiB iovecs and Python never loops per page.
"""
from __future__ import annotations

import numpy as np

from .channel import Channel

__all__ = [
    "DIRECT_RUNS_MAX",
    "page_runs",
    "send_pages",
    "recv_pages_into",
]

# Up to this many contiguous runs a batch goes directly from/to ram rows; beyond it, one
# memcpy into staging is cheaper than the per-run Python and syscall work.
DIRECT_RUNS_MAX = 64


def _check_ram(ram: np.ndarray) -> None:
    if not (isinstance(ram, np.ndarray) and ram.ndim == 2 and ram.dtype == np.uint8
            and ram.flags.c_contiguous):
        raise ValueError("ram must be a C-contiguous (npages, page_bytes) uint8 array, got "
                         f"{type(ram).__name__} {getattr(ram, 'shape', '')} "
                         f"{getattr(ram, 'dtype', '')}")


def _check_staging(staging: np.ndarray, ram: np.ndarray) -> None:
    if not (isinstance(staging, np.ndarray) and staging.ndim == 2
            and staging.dtype == np.uint8 and staging.shape[1] == ram.shape[1]
            and staging.shape[0] > 0 and staging.flags.c_contiguous):
        raise ValueError(f"staging must be a C-contiguous (n, {ram.shape[1]}) uint8 array "
                         f"with n > 0, got {getattr(staging, 'shape', type(staging))}")


def page_runs(pages: np.ndarray, npages: int) -> tuple[np.ndarray, np.ndarray]:
    """Split sorted unique page indices into maximal contiguous runs ``[starts[i], ends[i])``.

    Args:
        pages: strictly increasing page indices (any integer dtype).
        npages: number of pages in ram; every index must be in ``[0, npages)``.

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


def _staging_rows(staging: np.ndarray | None, ram: np.ndarray, n: int) -> np.ndarray:
    if staging is None:
        return np.empty((n, ram.shape[1]), dtype=np.uint8)
    _check_staging(staging, ram)
    return staging


def send_pages(channel: Channel, header: bytes, ram: np.ndarray, pages: np.ndarray,
               staging: np.ndarray | None = None) -> int:
    """Send ``header`` followed by the pages ``ram[pages]`` (layout in the module docstring).

    Args:
        channel: where to send.
        header: bytes sent first, in the same ``send_parts`` call as the first pages.
        ram: ``(npages, page_bytes)`` C-contiguous uint8 array; only read.
        pages: strictly increasing page indices into ``ram`` (a tracker's ``collect()``).
        staging: reusable ``(rows, page_bytes)`` uint8 buffer for the gather path; any
            ``rows`` > 0 works (a bigger batch is sent in ``rows``-sized pieces).  ``None``
            allocates a temporary one when needed.

    Returns:
        Bytes sent: ``len(header) + len(pages) * page_bytes``.

    Guarantees and errors: those of :meth:`Channel.send_parts` (if it raises, a prefix of
    the batch may have been sent); ``ValueError`` for malformed ``ram``/``pages``/``staging``,
    raised before anything is sent.  ``ram`` must not change under the call if the
    receiver is to see one consistent copy of each page.
    """
    _check_ram(ram)
    starts, ends = page_runs(pages, ram.shape[0])
    n = int((ends - starts).sum())
    total_bytes = len(header) + n * ram.shape[1]
    if len(starts) <= DIRECT_RUNS_MAX:
        # Zero-copy: the kernel reads the runs straight out of ram.
        channel.send_parts([header, *(ram[a:b] for a, b in zip(starts.tolist(),
                                                                 ends.tolist()))])
        return total_bytes
    pages = np.asarray(pages, dtype=np.int64)
    staging = _staging_rows(staging, ram, n)
    rows = staging.shape[0]
    for first in range(0, n, rows):
        chunk = pages[first:first + rows]
        out = staging[:len(chunk)]
        # mode="clip": indices are already range-checked, and "raise" would make numpy
        # buffer `out` (an extra copy of the whole batch).
        np.take(ram, chunk, axis=0, out=out, mode="clip")
        channel.send_parts([header, out] if first == 0 else [out])
    return total_bytes


def recv_pages_into(channel: Channel, ram: np.ndarray, pages: np.ndarray,
                    staging: np.ndarray | None = None) -> int:
    """Receive ``len(pages)`` pages (the body of a :func:`send_pages` batch) into ``ram[pages]``.

    The caller has already read the header (it usually tells which ``pages`` follow).

    Args:
        channel: where to receive from.
        ram: ``(npages, page_bytes)`` C-contiguous uint8 array; only rows in ``pages`` are
            written.
        pages: strictly increasing page indices, the same set the sender used.
        staging: reusable buffer for the scatter path, as in :func:`send_pages`.

    Returns:
        Bytes received: ``len(pages) * page_bytes``.

    Guarantees: rows not in ``pages`` are never written.  If it raises, some of the rows in
    ``pages`` may hold new data and the rest old data; on the direct path a row can be
    partly written.  Errors: those of :meth:`Channel.recv_into`; ``ValueError`` for
    malformed arguments, raised before anything is received.
    """
    _check_ram(ram)
    starts, ends = page_runs(pages, ram.shape[0])
    n = int((ends - starts).sum())
    if len(starts) <= DIRECT_RUNS_MAX:
        for a, b in zip(starts.tolist(), ends.tolist()):
            channel.recv_into(ram[a:b])
        return n * ram.shape[1]
    pages = np.asarray(pages, dtype=np.int64)
    staging = _staging_rows(staging, ram, n)
    rows = staging.shape[0]
    for first in range(0, n, rows):
        chunk = pages[first:first + rows]
        into = staging[:len(chunk)]
        channel.recv_into(into)
        ram[chunk] = into
    return n * ram.shape[1]
