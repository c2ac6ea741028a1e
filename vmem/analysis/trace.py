"""Recorded dirty traces: which pages a guest wrote in each interval of a profile.

A :class:`DirtyTrace` is what ``vmem profile`` records (Andrew Cooper's "run the guest
under logdirty for a period of time"): for each collect interval ``i`` the sorted set of
pages written during ``[times_s[i], times_s[i+1])``, seconds since tracking was armed.
The simulator (:mod:`vmem.analysis.simulate`) replays it; the analysis (:mod:`vmem.analysis.profile`)
derives the writable working set from it.

File layout (``.npz``: a zip of ``.npy`` members, written compressed)::

    meta.npy       0-d unicode string: JSON object
                     {"format": "vmem-dirty-trace", "version": 1,
                      "npages": int, "page_size": int, "interval_s": float,
                      "data_pages": int,        # pages holding data when tracking began
                      "workload": {...},        # GuestSpec.to_json(), or {}
                      "start_time": float,      # UNIX time tracking was armed
                      "tracker": str, ...}      # further keys are informational
    offsets.npy    int64[n + 1]   offsets[0] = 0, non-decreasing, offsets[n] = len(pages)
    pages.npy      int32 or int64[offsets[n]]  interval i = pages[offsets[i]:offsets[i+1]],
                                  strictly increasing inside an interval, each < npages
    times.npy      float64[n + 1] interval boundaries in seconds since tracking was armed;
                                  times[0] = 0, strictly increasing

Compatibility rule: :meth:`DirtyTrace.load` accepts exactly ``TRACE_FORMAT_VERSION``;
adding a meta key is compatible, anything else bumps it.  The loader checks each
member's declared uncompressed size before reading it (``MAX_*`` below) so a hostile
file cannot make it allocate without bound.

Sub-interval windows.  The tracker only says *that* a page was written during an
interval, not when or how often.  :meth:`DirtyTrace.dirty_in` answers a window that
cuts an interval by one of two documented rules:

``"overlap"``
    include every interval the window overlaps at all (an upper bound: a 5 ms window
    inside a 100 ms interval gets the whole interval's pages).
``"poisson"`` (default)
    each page is modelled as written by a Poisson process with its own rate, estimated
    from the fraction ``q_p`` of intervals it appears in (``lambda_p * dt = -ln(1 - q_p)``,
    with ``q_p`` clipped to ``1 - 1/(2n)``).  Given that page ``p`` was written in
    interval ``i``, its first write falls at a pseudo-random instant drawn (by a hash of
    ``(seed, p, i)``, so the same every time) from that process conditioned on at least one
    write; a window covering a fraction of the interval contains the page if the first
    write falls inside it, or, when the first write was earlier, with the probability
    ``1 - exp(-lambda_p * window)`` of a later write (a seeded draw per window).  Pages
    written once per interval thus split cleanly between adjacent windows (no double
    counting), and pages written in every interval (hot pages, the guest's ledger) show
    up in most windows, as they do in a real migration.  Profiling with a shorter interval
    makes either rule matter less.
"""
from __future__ import annotations

import json
import math
import os
import time
import zipfile
from dataclasses import dataclass, field

import numpy as np

from vmem.errors import VmemError
from vmem.jsonout import json_default

__all__ = [
    "DirtyTrace",
    "TraceError",
    "TRACE_FORMAT",
    "TRACE_FORMAT_VERSION",
    "WINDOW_RULES",
]

TRACE_FORMAT = "vmem-dirty-trace"
TRACE_FORMAT_VERSION = 1
#: Bounds enforced by :meth:`DirtyTrace.load` (and by the constructor).
MAX_NPAGES = 1 << 32                 # guest pages (16 TiB of 4 KiB pages)
MAX_INTERVALS = 10_000_000           # intervals in one trace
MAX_TOTAL_PAGES = 1 << 31            # page entries over all intervals (8-16 GiB as int32/int64)
MAX_META_BYTES = 1 << 20             # the JSON metadata string
_MEMBERS = ("meta.npy", "offsets.npy", "pages.npy", "times.npy")
WINDOW_RULES = ("poisson", "overlap")
_PAGE_SIZES = (4096, 8192, 16384, 65536, 2 << 20, 1 << 30)


class TraceError(VmemError):
    """A dirty trace file is unreadable, malformed, of another version, or too large.

    Attributes:
        path: the file, or ``""`` for a trace built in memory.
    """

    def __init__(self, message: str, path: str = ""):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


@dataclass
class DirtyTrace:
    """Pages written per interval while a guest ran under dirty logging.

    Attributes:
        npages: pages of guest RAM.
        page_size: bytes per page.
        interval_s: the nominal collect interval (actual boundaries are ``times_s``).
        offsets: int64[n+1]; interval ``i`` is ``pages[offsets[i]:offsets[i+1]]``.
        pages: int32/int64 page indices, sorted and unique within each interval.
        times_s: float64[n+1] interval boundaries, seconds since tracking was armed.
        data_pages: pages that held data when tracking began (what a migration's round 0
            would send); defaults to ``npages``.
        workload: the guest's spec (``GuestSpec.to_json()``), or ``{}``.
        start_time: UNIX time at which tracking was armed.
        meta: further informational metadata (tracker, host, ...).
    """

    npages: int
    page_size: int
    interval_s: float
    offsets: np.ndarray
    pages: np.ndarray
    times_s: np.ndarray
    data_pages: int | None = None
    workload: dict = field(default_factory=dict)
    start_time: float = 0.0
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.data_pages is None:
            self.data_pages = self.npages
        self.offsets = np.asarray(self.offsets)
        self.pages = np.asarray(self.pages)
        self.times_s = np.asarray(self.times_s)
        _validate(self)
        self._occupancy: np.ndarray | None = None   # per-page count of intervals with a write
        self._sorted_occ: tuple | None = None        # (page, interval, prev interval) for wws

    # --- construction --------------------------------------------------------------------
    @classmethod
    def from_intervals(cls, intervals, *, npages: int, interval_s: float, page_size: int = 4096,
                       times_s=None, **kwargs) -> "DirtyTrace":
        """Build a trace from a list of per-interval page arrays (each is sorted and de-duplicated).

        ``times_s`` defaults to ``i * interval_s``.
        """
        arrays = [np.unique(np.asarray(a, dtype=np.int64)) for a in intervals]
        counts = np.array([len(a) for a in arrays], dtype=np.int64)
        offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        pages = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)
        if times_s is None:
            times_s = np.arange(len(arrays) + 1, dtype=np.float64) * interval_s
        return cls(npages=npages, page_size=page_size, interval_s=interval_s, offsets=offsets,
                   pages=pages.astype(_page_dtype(npages)), times_s=np.asarray(times_s, dtype=np.float64),
                   **kwargs)

    # --- properties ------------------------------------------------------------------------
    @property
    def n_intervals(self) -> int:
        return len(self.offsets) - 1

    @property
    def duration_s(self) -> float:
        """Seconds covered by the trace (from arming to the last collect)."""
        return float(self.times_s[-1])

    def interval(self, i: int) -> np.ndarray:
        """Pages written during interval ``i`` (int64, sorted)."""
        return self.pages[self.offsets[i]:self.offsets[i + 1]].astype(np.int64)

    def count_per_interval(self) -> np.ndarray:
        """Distinct pages written in each interval (int64[n])."""
        return np.diff(self.offsets)

    def interval_lengths_s(self) -> np.ndarray:
        return np.diff(self.times_s)

    def describe(self) -> dict:
        """The metadata, as stored in the file."""
        return {
            "format": TRACE_FORMAT, "version": TRACE_FORMAT_VERSION, "npages": int(self.npages),
            "page_size": int(self.page_size), "interval_s": float(self.interval_s),
            "data_pages": int(self.data_pages), "workload": self.workload, "start_time": float(self.start_time),
            **{k: v for k, v in self.meta.items() if k not in _CORE_META},
        }

    # --- queries -------------------------------------------------------------------------------
    def dirty_in(self, t0_s: float, t1_s: float, *, rule: str = "poisson", seed: int = 0) -> np.ndarray:
        """Pages written during ``[t0_s, t1_s)`` (seconds since arming), sorted int64.

        Intervals entirely inside the window contribute all their pages; an interval the
        window only partly covers contributes according to ``rule`` (see the module
        docstring).  The window is clipped to ``[0, duration_s]``; looping is the caller's
        business (:mod:`vmem.analysis.simulate` does it).

        Raises:
            ValueError: unknown rule or a window with ``t1_s < t0_s``.
        """
        if rule not in WINDOW_RULES:
            raise ValueError(f"unknown window rule {rule!r}; choose one of {', '.join(WINDOW_RULES)}")
        if not (t1_s >= t0_s):
            raise ValueError(f"window end {t1_s} is before its start {t0_s}")
        T = self.times_s
        t0, t1 = max(float(t0_s), 0.0), min(float(t1_s), float(T[-1]))
        if t1 <= t0 or self.n_intervals == 0:
            return np.empty(0, dtype=np.int64)
        first = int(np.searchsorted(T, t0, side="right")) - 1   # interval holding t0
        last = int(np.searchsorted(T, t1, side="left")) - 1     # interval holding t1 (exclusive end)
        first = min(max(first, 0), self.n_intervals - 1)
        last = min(max(last, first), self.n_intervals - 1)
        parts = []
        # Whole intervals: those starting at or after t0 and ending at or before t1.
        full_a = first if T[first] >= t0 else first + 1
        full_b = last + 1 if T[last + 1] <= t1 else last
        if full_b > full_a:
            parts.append(self.pages[self.offsets[full_a]:self.offsets[full_b]])
        for i in sorted({first, last}):
            if full_a <= i < full_b:
                continue
            a, b = max(t0, float(T[i])), min(t1, float(T[i + 1]))
            if b <= a:
                continue
            if rule == "overlap":
                parts.append(self.pages[self.offsets[i]:self.offsets[i + 1]])
            else:
                parts.append(self._partial(i, a, b, seed))
        if not parts:
            return np.empty(0, dtype=np.int64)
        if len(parts) == 1 and full_b - full_a <= 1:
            return parts[0].astype(np.int64)
        total = sum(len(p) for p in parts)
        if total * 16 < self.npages:
            return np.unique(np.concatenate([p.astype(np.int64, copy=False) for p in parts]))
        # Many entries: a page bitmap is O(npages + entries), no sort.
        mark = np.zeros(self.npages, dtype=bool)
        for p in parts:
            mark[p] = True
        return np.flatnonzero(mark)

    def occupancy(self) -> np.ndarray:
        """For each page, in how many intervals it was written (int64[npages])."""
        if self._occupancy is None:
            self._occupancy = np.bincount(self.pages, minlength=self.npages).astype(np.int64)
        return self._occupancy

    def page_rates_per_interval(self, pages: np.ndarray) -> np.ndarray:
        """Estimated Poisson write rate of ``pages``, in writes per (nominal) interval.

        From the fraction ``q`` of intervals each page appears in: ``-ln(1 - q)``, with
        ``q`` clipped to ``1 - 1/(2n)`` (a page written in every interval has an unknown,
        high rate; the clip is the most the trace can tell).
        """
        n = max(self.n_intervals, 1)
        q = self.occupancy()[pages] / n
        q = np.clip(q, 1.0 / (2 * n), 1.0 - 1.0 / (2 * n))
        return -np.log1p(-q)

    def _partial(self, i: int, a: float, b: float, seed: int) -> np.ndarray:
        """Poisson-rule pages of interval ``i`` written during [a, b) inside it."""
        pages = self.pages[self.offsets[i]:self.offsets[i + 1]].astype(np.int64)
        if len(pages) == 0:
            return pages
        Ti, Tj = float(self.times_s[i]), float(self.times_s[i + 1])
        dt = Tj - Ti
        fa, fb = (a - Ti) / dt, (b - Ti) / dt          # window as fractions of the interval
        lam = self.page_rates_per_interval(pages) * (dt / self.interval_s)   # writes per this interval
        # First write's position x in [0, 1) given >= 1 write: CDF (1 - e^{-lam x}) / (1 - e^{-lam}).
        u = _hash_uniform(pages, i, seed)
        x = -np.log1p(-u * (-np.expm1(-lam))) / lam
        inside = (x >= fa) & (x < fb)
        earlier = x < fa
        if earlier.any():
            # A later write inside the window: probability 1 - e^{-lam (fb - fa)}.
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
                [seed & 0xFFFFFFFF, i, int(round(a * 1e9)) & 0xFFFFFFFFFFFF, 0x7472])))
            later = rng.random(len(pages)) < -np.expm1(-lam * (fb - fa))
            inside |= earlier & later
        return pages[inside]

    def wws(self, window_s: float) -> np.ndarray:
        """Distinct pages written in each sliding window of ``window_s`` (the writable working set).

        Windows are whole intervals: ``k = max(1, round(window_s / interval_s))``
        consecutive intervals, one window starting at each interval (``n - k + 1`` of
        them, int64); ``window_s`` longer than the trace gives one window, the whole
        trace.  Computed for all windows at once: each occurrence of a page counts in the
        windows for which it is that page's first occurrence (a difference array), no
        per-page Python.
        """
        n = self.n_intervals
        if n == 0:
            return np.empty(0, dtype=np.int64)
        k = self.window_intervals(window_s)
        nwin = n - k + 1
        interval_idx, prev = self._sorted_occurrences()
        # Occurrence at interval i (previous occurrence of the same page at prev) is the first
        # occurrence in windows j with max(prev + 1, i - k + 1) <= j <= min(i, nwin - 1).
        lo = np.maximum(np.maximum(prev + 1, interval_idx - k + 1), 0)
        hi = np.minimum(interval_idx, nwin - 1)
        ok = lo <= hi
        diff = np.bincount(lo[ok], minlength=nwin + 1)[: nwin + 1].astype(np.int64)
        diff -= np.bincount(hi[ok] + 1, minlength=nwin + 1)[: nwin + 1]
        return np.cumsum(diff)[:nwin]

    def window_intervals(self, window_s: float) -> int:
        """How many whole intervals :meth:`wws` uses for ``window_s``."""
        if not (window_s > 0 and math.isfinite(window_s)):
            raise ValueError(f"window must be a finite number of seconds > 0, got {window_s!r}")
        return int(min(max(1, round(window_s / self.interval_s)), max(self.n_intervals, 1)))

    def _sorted_occurrences(self) -> tuple[np.ndarray, np.ndarray]:
        """(interval index, previous interval of the same page or -huge) for every entry."""
        if self._sorted_occ is None:
            counts = self.count_per_interval()
            interval_idx = np.repeat(np.arange(self.n_intervals, dtype=np.int64), counts)
            order = np.lexsort((interval_idx, self.pages))        # by page, then interval
            pg = self.pages[order]
            iv = interval_idx[order]
            prev = np.full(len(iv), -(1 << 40), dtype=np.int64)
            same = pg[1:] == pg[:-1]
            prev[1:][same] = iv[:-1][same]
            self._sorted_occ = (iv, prev)
        return self._sorted_occ

    def union(self) -> np.ndarray:
        """Every page written at least once during the trace."""
        return np.flatnonzero(self.occupancy() > 0).astype(np.int64)

    # --- files -----------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the trace as a compressed ``.npz`` (atomically: a temp file, then rename)."""
        meta = json.dumps(self.describe(), default=json_default)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                np.savez_compressed(
                    f, meta=np.array(meta), offsets=self.offsets.astype(np.int64),
                    pages=self.pages.astype(_page_dtype(self.npages)), times=self.times_s.astype(np.float64),
                )
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    @classmethod
    def load(cls, path: str) -> "DirtyTrace":
        """Read and validate a trace written by :meth:`save`.

        Raises:
            TraceError: not a readable zip/npz, a missing or extra member, a member larger
                than the bounds, wrong dtypes or shapes, another format version, or
                inconsistent contents (the message says which).
        """
        try:
            zf = zipfile.ZipFile(path)
        except FileNotFoundError:
            raise TraceError("no such file", path) from None
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise TraceError(f"not a vmem dirty trace (unreadable .npz: {err})", path) from err
        with zf:
            try:
                arrays = _read_members(zf, path)
            except TraceError:
                raise
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as err:
                raise TraceError(f"corrupt or truncated trace ({type(err).__name__}: {err})", path) from err
        try:
            meta = json.loads(str(arrays["meta"][()]))
        except (ValueError, TypeError) as err:
            raise TraceError(f"metadata is not JSON: {err}", path) from err
        if not isinstance(meta, dict) or meta.get("format") != TRACE_FORMAT:
            raise TraceError(f"not a vmem dirty trace (format {meta.get('format') if isinstance(meta, dict) else None!r})", path)
        if meta.get("version") != TRACE_FORMAT_VERSION:
            raise TraceError(f"unsupported trace version {meta.get('version')!r}; this vmem reads version {TRACE_FORMAT_VERSION}", path)
        try:
            npages = _meta_int(meta, "npages", 1, MAX_NPAGES)
            page_size = _meta_int(meta, "page_size", 1, 1 << 30)
            data_pages = _meta_int(meta, "data_pages", 0, npages) if "data_pages" in meta else npages
            interval_s = meta.get("interval_s")
            if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not (0 < interval_s < 1e6):
                raise TraceError(f"interval_s must be a number in (0, 1e6), got {interval_s!r}")
            workload = meta.get("workload") or {}
            if not isinstance(workload, dict):
                raise TraceError(f"workload must be an object, got {workload!r}")
            start_time = float(meta.get("start_time", 0.0))
            extra = {k: v for k, v in meta.items() if k not in _CORE_META}
            return cls(npages=npages, page_size=page_size, interval_s=float(interval_s),
                       offsets=arrays["offsets"], pages=arrays["pages"], times_s=arrays["times"],
                       data_pages=data_pages, workload=workload, start_time=start_time, meta=extra)
        except TraceError as err:
            raise TraceError(str(err), path) from None
        except (TypeError, ValueError) as err:
            raise TraceError(f"bad metadata: {err}", path) from err


_CORE_META = ("format", "version", "npages", "page_size", "interval_s", "data_pages", "workload", "start_time")


def _page_dtype(npages: int):
    return np.int32 if npages <= np.iinfo(np.int32).max else np.int64


def _meta_int(meta: dict, key: str, lo: int, hi: int) -> int:
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise TraceError(f"{key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _read_members(zf: zipfile.ZipFile, path: str) -> dict:
    infos = {i.filename: i for i in zf.infolist()}
    missing = [m for m in _MEMBERS if m not in infos]
    if missing:
        raise TraceError(f"not a vmem dirty trace (missing {', '.join(missing)})", path)
    extra = sorted(set(infos) - set(_MEMBERS))
    if extra:
        raise TraceError(f"unexpected members {', '.join(extra)}", path)
    limits = {
        "meta.npy": MAX_META_BYTES * 4 + 1024,             # unicode arrays are UTF-32
        "offsets.npy": (MAX_INTERVALS + 1) * 8 + 1024,
        "pages.npy": MAX_TOTAL_PAGES * 8 + 1024,
        "times.npy": (MAX_INTERVALS + 1) * 8 + 1024,
    }
    out = {}
    for name in _MEMBERS:
        info = infos[name]
        if info.file_size > limits[name]:
            raise TraceError(f"{name} declares {info.file_size} bytes, more than the limit {limits[name]}", path)
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise TraceError(f"{name}: unsupported .npy version {version}", path)
            key = name[:-4]
            _check_member(key, shape, dtype, path)
            count = int(np.prod(shape)) if shape else 1
            if count * dtype.itemsize > limits[name]:
                raise TraceError(f"{name}: shape {shape} exceeds the limit", path)
            if dtype.kind == "U":
                raw = f.read(count * dtype.itemsize)
                if len(raw) != count * dtype.itemsize:
                    raise TraceError(f"{name}: truncated", path)
                arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
            else:
                raw = f.read(count * dtype.itemsize)
                if len(raw) != count * dtype.itemsize:
                    raise TraceError(f"{name}: truncated ({len(raw)} of {count * dtype.itemsize} bytes)", path)
                arr = np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()
            out[key] = arr
    return out


def _check_member(key: str, shape: tuple, dtype: np.dtype, path: str) -> None:
    if key == "meta":
        if shape != () or dtype.kind != "U" or dtype.itemsize > MAX_META_BYTES * 4:
            raise TraceError(f"meta must be a 0-d unicode string of at most {MAX_META_BYTES} characters", path)
        return
    if len(shape) != 1:
        raise TraceError(f"{key} must be 1-dimensional, got shape {shape}", path)
    allowed = {"offsets": ("<i8",), "pages": ("<i4", "<i8"), "times": ("<f8",)}[key]
    if dtype.str not in allowed:
        raise TraceError(f"{key} must have dtype {' or '.join(allowed)}, got {dtype.str}", path)
    bound = {"offsets": MAX_INTERVALS + 1, "times": MAX_INTERVALS + 1, "pages": MAX_TOTAL_PAGES}[key]
    if shape[0] > bound:
        raise TraceError(f"{key} has {shape[0]} entries, more than the limit {bound}", path)


def _validate(t: DirtyTrace) -> None:
    """Check every invariant of a trace; raises TraceError naming the first broken one."""
    if isinstance(t.npages, bool) or not isinstance(t.npages, (int, np.integer)) or not 1 <= t.npages <= MAX_NPAGES:
        raise TraceError(f"npages must be in [1, {MAX_NPAGES}], got {t.npages!r}")
    if not isinstance(t.data_pages, (int, np.integer)) or not 0 <= t.data_pages <= t.npages:
        raise TraceError(f"data_pages must be in [0, npages], got {t.data_pages!r}")
    if not isinstance(t.page_size, (int, np.integer)) or t.page_size <= 0:
        raise TraceError(f"page_size must be a positive integer, got {t.page_size!r}")
    if not (isinstance(t.interval_s, (int, float)) and math.isfinite(t.interval_s) and t.interval_s > 0):
        raise TraceError(f"interval_s must be a finite number > 0, got {t.interval_s!r}")
    off, pages, times = t.offsets, t.pages, t.times_s
    if off.ndim != 1 or off.dtype.kind != "i" or len(off) < 1 or len(off) > MAX_INTERVALS + 1:
        raise TraceError(f"offsets must be a 1-D integer array of 1..{MAX_INTERVALS + 1} entries")
    if pages.ndim != 1 or pages.dtype.kind != "i" or len(pages) > MAX_TOTAL_PAGES:
        raise TraceError(f"pages must be a 1-D integer array of at most {MAX_TOTAL_PAGES} entries")
    if times.ndim != 1 or times.dtype.kind != "f" or len(times) != len(off):
        raise TraceError(f"times must be a float array with one entry per offset ({len(off)}), got {len(times)}")
    if off[0] != 0 or off[-1] != len(pages) or (np.diff(off) < 0).any():
        raise TraceError(f"offsets must start at 0, never decrease and end at len(pages) = {len(pages)}")
    if not np.isfinite(times).all() or times[0] != 0 or (np.diff(times) <= 0).any():
        raise TraceError("times must be finite, start at 0 and strictly increase")
    if len(pages):
        if int(pages.min()) < 0 or int(pages.max()) >= t.npages:
            raise TraceError(f"page indices must lie in [0, {t.npages})")
        # Strictly increasing inside each interval: a decrease is allowed only where a new
        # interval starts.
        bad = np.flatnonzero(np.diff(pages.astype(np.int64)) <= 0) + 1
        if len(bad):
            starts = np.zeros(len(pages) + 1, dtype=bool)
            starts[off[:-1]] = True
            if not starts[bad].all():
                raise TraceError("pages must be sorted and unique within each interval")


def _hash_uniform(pages: np.ndarray, interval: int, seed: int) -> np.ndarray:
    """A deterministic uniform [0, 1) per (page, interval, seed): splitmix64 of the key."""
    with np.errstate(over="ignore"):
        key = (pages.astype(np.uint64) << np.uint64(24)) ^ np.uint64(interval & 0xFFFFFF) \
            ^ (np.uint64(seed & 0xFFFFFFFF) << np.uint64(56)) ^ np.uint64((seed >> 32) & 0xFF)
        z = key + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def now_unix() -> float:
    """UNIX time (for ``start_time``)."""
    return time.time()
