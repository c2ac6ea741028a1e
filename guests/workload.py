"""Workloads: what a guest does with its RAM, written so that it survives migration.

A workload is a small class the guest runtime drives (see docs/workloads.md)::

    wl = cls(mem, clock, seed, **params)   # source and destination, same arguments
    wl.setup()                             # first boot only, never after migration
    while running:
        idle_s = wl.step()                 # one short piece of work (microseconds)
        sleep(idle_s)                      # interruptible; 0.0 = call again now
    blob = wl.save_context()               # at pause, on the source
    wl.restore_context(blob)               # at the destination, before the first step

State that must survive migration lives in RAM (the pages it writes and their ledger)
plus the small JSON *context* of :meth:`Workload.get_state`.  Everything else must be a
pure function of (RAM geometry, ``seed``, params), rebuilt by ``__init__`` on the
destination -- e.g. the zipf permutation -- so a migrated guest continues the exact
sequence of writes the source would have made.

Built-ins (CLI names): ``idle``, ``uniform``, ``hotcold``, ``zipf``, ``sweep``,
``phased``.  User workloads are named ``module:Class`` (:func:`load_workload`).
"""
from __future__ import annotations

import importlib
import inspect
import json
import math
from typing import Any, Callable, ClassVar

import numpy as np

from guests.memory import GuestMemory
from vmem.errors import ConfigError, GuestError

__all__ = [
    "Workload",
    "PacedWorkload",
    "IdleWorkload",
    "UniformWorkload",
    "HotColdWorkload",
    "ZipfWorkload",
    "SweepWorkload",
    "PhasedWorkload",
    "BUILTIN_WORKLOADS",
    "load_workload",
    "parse_params",
    "workload_params",
    "check_bool",
    "check_int",
    "check_float",
]

# Longest wait a paced step asks for: a guest sleeping in an idle period must still
# reach a safe point quickly when the migrator asks it to pause.
MAX_IDLE_S = 0.001
# Context blob format version (the "vmem_workload_context" key).
CONTEXT_FORMAT = 1

# What json.dumps(..., separators=(",", ":")) builds on every call, built once: a context is
# encoded inside the downtime, in a guest that has just stopped.
_CONTEXT_ENCODER = json.JSONEncoder(separators=(",", ":"))
# Constructor arguments every workload gets from the runtime; never CLI parameters.
_RUNTIME_ARGS = ("self", "mem", "clock", "seed")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


# -- parameter validation helpers (ConfigError names the parameter) --------------------

def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool, else raise ``ConfigError(name, ...)``."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(name, f"must be true or false, got {value!r}")
    return bool(value)


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` as int if it is an integer within [minimum, maximum]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ConfigError(name, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, f"must be <= {maximum}, got {value}")
    return value


def check_float(name: str, value: Any, minimum: float | None = None, maximum: float | None = None,
                *, min_exclusive: bool = False) -> float:
    """Return ``value`` as a finite float within the bounds."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(name, f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(name, f"must be finite, got {value}")
    if minimum is not None and (value <= minimum if min_exclusive else value < minimum):
        raise ConfigError(name, f"must be {'>' if min_exclusive else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, f"must be <= {maximum}, got {value}")
    return value


def _layout_rng(seed: int, tag: int) -> np.random.Generator:
    """A generator for fixed per-guest layout (hot set, zipf permutation).

    Separate from the step RNG, so rebuilding the layout at the destination does not
    consume the migrated step sequence.
    """
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, tag])))


# -- the user API ----------------------------------------------------------------------

class Workload:
    """Base class of every workload (the user API).

    Subclasses set ``name`` and implement :meth:`step`; if they keep state that must
    survive migration outside RAM they extend :meth:`get_state`/:meth:`set_state`.

    Contract:
        * ``__init__`` is called with the same arguments on the source and the
          destination.  It must be deterministic in (RAM geometry, seed, params) and must
          not touch RAM: at the destination RAM is still arriving.
        * :meth:`setup` runs on first boot only, never after migration.
        * :meth:`step` is short (microseconds; it runs between pause points) and writes
          RAM only through ``mem.write_pages`` (so :meth:`GuestMemory.verify` holds).
        * ``get_state()`` is small, JSON-able, and together with RAM fully determines
          future steps (given the same clock readings).

    Parameters are the keyword parameters of ``__init__`` after ``mem, clock, seed``; a
    constructor that takes ``**params`` and passes them to ``super().__init__`` also
    accepts its base's.  Defaults give their CLI types (see :func:`parse_params`).

    Args:
        mem: the guest's RAM.
        clock: guest virtual seconds: stops while the guest is paused, continues across
            migration.  Use it (never wall-clock time) for pacing.
        seed: RNG seed (>= 0).
        fill: setup() writes every data page once (like a booted OS using its memory).

    Attributes:
        rng: the step RNG, ``Generator(PCG64(seed))``; its state is in the context.
    """

    name: ClassVar[str] = ""

    def __init__(self, mem: GuestMemory, clock: Callable[[], float], seed: int, *, fill: bool = True):
        self.mem = mem
        self.clock = clock
        self.seed = check_int("seed", seed, minimum=0)
        self.fill = check_bool("fill", fill)
        self.rng = np.random.Generator(np.random.PCG64(self.seed))

    @classmethod
    def workload_name(cls) -> str:
        """The name used in contexts and messages: ``name``, or the class's name."""
        return cls.name or cls.__qualname__

    def setup(self) -> None:
        """First boot only (never after migration): fill RAM unless ``fill=False``."""
        if self.fill:
            self.mem.fill_all()

    def step(self) -> float:
        """Do one short piece of work; return seconds the guest may idle before the next.

        0.0 means "call again now".  The runtime may wake the guest earlier (to pause).
        """
        raise NotImplementedError(f"{type(self).__qualname__} must implement step()")

    @property
    def progress_pages(self) -> int:
        """Page writes done since first boot (survives migration); 0 if not tracked."""
        return 0

    def get_state(self) -> dict:
        """Everything outside RAM that future steps depend on, as a JSON-able dict."""
        return {"rng": self.rng.bit_generator.state}

    def set_state(self, state: dict) -> None:
        """Inverse of :meth:`get_state` (called on a freshly constructed workload)."""
        self.rng.bit_generator.state = state["rng"]

    def save_context(self) -> bytes:
        """The context blob captured at pause: JSON of :meth:`get_state`, tagged.

        Layout: ``{"vmem_workload_context": 1, "workload": name, "state": get_state()}``.
        """
        return _CONTEXT_ENCODER.encode({"vmem_workload_context": CONTEXT_FORMAT,
                                        "workload": self.workload_name(),
                                        "state": self.get_state()}).encode()

    def restore_context(self, blob: bytes) -> None:
        """Inverse of :meth:`save_context`, at the destination before the first step.

        Raises:
            GuestError: the blob is not a context of this workload or its state is bad.
        """
        try:
            ctx = json.loads(blob)
        except ValueError as err:
            raise GuestError(f"cannot restore workload context: {err}") from err
        self.restore_state(ctx)

    def restore_state(self, ctx: dict) -> None:
        """:meth:`restore_context` of a context already decoded (the runtime's own context
        holds it decoded: not encoded and decoded again inside the downtime).

        Raises:
            GuestError: ``ctx`` is not a context of this workload or its state is bad.
        """
        try:
            if not isinstance(ctx, dict):
                raise TypeError(f"a context is a JSON object, not {type(ctx).__name__}")
            if ctx.get("vmem_workload_context") != CONTEXT_FORMAT:
                raise ValueError("not a vmem workload context of format "
                                 f"{CONTEXT_FORMAT}")
            if ctx.get("workload") != self.workload_name():
                raise ValueError(f"context is for workload {ctx.get('workload')!r}, "
                                 f"this guest runs {self.workload_name()!r}")
            self.set_state(ctx["state"])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise GuestError(f"cannot restore workload context: {err}") from err


class PacedWorkload(Workload):
    """Writes pages at ``rate`` pages per second of guest virtual time.

    Pacing: with ``t`` the virtual seconds since the first step, ``target_pages(t)``
    (``rate * t`` here) page writes are due in total; each step writes
    ``min(due - done, max_batch)`` pages chosen by :meth:`pick_pages`.  When nothing is
    due it returns the time until the next page is due, capped at 1 ms so a pause request
    is served promptly.  ``rate=0`` means as fast as possible: ``max_batch`` pages per
    step, return 0.0.

    A guest that falls behind (CPU contention, throttling) does not build an unbounded
    backlog: work more than ``max_lag_s`` seconds (at the current rate, at least
    ``max_batch`` pages) behind schedule is dropped and counted in ``skipped_pages``, so
    progress after an overload is not a catch-up burst.

    Subclasses implement :meth:`pick_pages`; varying rates override
    :meth:`target_pages` and :meth:`current_rate_pps`.

    Args:
        rate: page writes per virtual second (>= 0; 0 = unpaced).
        max_batch: most page writes per step (>= 1).

    Attributes (all in the context):
        origin_s: virtual time of the first step (None before it).
        done_pages: page writes done (duplicates within a batch count).
        skipped_pages: page writes dropped for being more than ``max_lag_s`` late.
    """

    max_lag_s: ClassVar[float] = 0.1

    def __init__(self, mem: GuestMemory, clock: Callable[[], float], seed: int, *,
                 rate: float = 5000.0, max_batch: int = 64, fill: bool = True):
        super().__init__(mem, clock, seed, fill=fill)
        self.rate_pps = check_float("rate", rate, minimum=0.0)
        self.max_batch = check_int("max_batch", max_batch, minimum=1)
        # rate=0: no pacing at all (subclasses with their own target_pages clear it).
        self.unpaced = self.rate_pps == 0.0
        self.origin_s: float | None = None
        self.done_pages = 0
        self.skipped_pages = 0

    def pick_pages(self, n: int) -> np.ndarray:
        """Return ``n`` absolute data page numbers to write (duplicates allowed).

        Must be deterministic given the RNG state and the workload's saved state.
        """
        raise NotImplementedError(f"{type(self).__qualname__} must implement pick_pages()")

    def target_pages(self, elapsed_s: float) -> float:
        """Total page writes due ``elapsed_s`` virtual seconds after the first step."""
        return self.rate_pps * elapsed_s

    def current_rate_pps(self, elapsed_s: float) -> float:
        """Rate in force at ``elapsed_s`` (for the idle time and the lag bound)."""
        return self.rate_pps

    @property
    def progress_pages(self) -> int:
        return self.done_pages

    def step(self) -> float:
        if self.unpaced:
            self._write(self.max_batch)
            return 0.0
        now_s = self.clock()
        if self.origin_s is None:
            self.origin_s = now_s
        elapsed_s = max(0.0, now_s - self.origin_s)
        # The epsilon absorbs float error in rate * t (a millionth of a page is harmless).
        due = math.floor(self.target_pages(elapsed_s) + 1e-6) - self.done_pages - self.skipped_pages
        rate_pps = self.current_rate_pps(elapsed_s)
        max_due = max(self.max_batch, math.ceil(rate_pps * self.max_lag_s))
        if due > max_due:
            self.skipped_pages += due - max_due
            due = max_due
        if due > 0:
            n = min(due, self.max_batch)
            self._write(n)
            if due > n:
                return 0.0  # behind schedule: the runtime calls again at once
        if rate_pps <= 0.0:
            return MAX_IDLE_S
        # Virtual seconds until one more page write falls due at the current rate.
        gap_pages = self.done_pages + self.skipped_pages + 1 - self.target_pages(elapsed_s)
        return min(MAX_IDLE_S, max(0.0, gap_pages) / rate_pps)

    def _write(self, n: int) -> None:
        self.mem.write_pages(self.pick_pages(n))
        self.done_pages += n

    def get_state(self) -> dict:
        state = super().get_state()
        state.update(origin_s=self.origin_s, done_pages=self.done_pages,
                     skipped_pages=self.skipped_pages)
        return state

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self.origin_s = None if state["origin_s"] is None else float(state["origin_s"])
        self.done_pages = int(state["done_pages"])
        self.skipped_pages = int(state["skipped_pages"])


# -- built-ins -------------------------------------------------------------------------

class IdleWorkload(Workload):
    """Writes nothing after setup (a booted, idle OS).  Each step idles 5 ms."""

    name = "idle"
    idle_s: ClassVar[float] = 0.005

    def step(self) -> float:
        return self.idle_s


class UniformWorkload(PacedWorkload):
    """Writes pages chosen uniformly at random from all data pages."""

    name = "uniform"

    def pick_pages(self, n: int) -> np.ndarray:
        return self.rng.integers(self.mem.first_data_page, self.mem.npages, n)


class CheckerWorkload(PacedWorkload):
    """Writes pages uniformly at random, and in every step reads ``reads`` random pages and
    checks each against the ledger (exactly: the guest is its own only writer).

    The oracle for post-copy: a page seen torn (half old, half new) or stale (an older
    version than the ledger says) makes the guest fail at once with the page's number,
    instead of the damage surfacing only at the final ``verify()``.

    Args:
        reads: pages read and checked per step (>= 1).
    """

    name = "checker"

    def __init__(self, mem: GuestMemory, clock: Callable[[], float], seed: int, *, reads: int = 32, **params):
        super().__init__(mem, clock, seed, **params)
        self.reads = check_int("reads", reads, minimum=1)
        self.pages_checked = 0

    def pick_pages(self, n: int) -> np.ndarray:
        return self.rng.integers(self.mem.first_data_page, self.mem.npages, n)

    def step(self) -> float:
        idle_s = super().step()
        pages = self.rng.integers(self.mem.first_data_page, self.mem.npages, self.reads)
        ok = self.mem.check_pages(pages)
        if not ok.all():
            bad = pages[~ok]
            raise GuestError(f"checker: {len(bad)} of {len(pages)} pages read do not match the ledger "
                             f"(torn or stale), first: {bad[:8].tolist()}")
        self.pages_checked += len(pages)
        return idle_s


class _HotColdPicker:
    """Picks pages with a fraction ``hot_writes`` of writes going to a hot set.

    The hot set is ``max(1, round(hot_pages * data_pages))`` data pages scattered at
    random (seeded; scattered like a real kernel's and heap's hot pages, which also
    stresses VMA splitting in the mprotect tracker).  Within each set pages are uniform.
    """

    def __init__(self, mem: GuestMemory, seed: int, hot_pages: float, hot_writes: float):
        self.hot_fraction = check_float("hot_pages", hot_pages, 0.0, 1.0, min_exclusive=True)
        self.hot_writes = check_float("hot_writes", hot_writes, 0.0, 1.0)
        self.first_data_page = mem.first_data_page
        self.hot_count = max(1, min(mem.data_pages, round(self.hot_fraction * mem.data_pages)))
        self.cold_count = mem.data_pages - self.hot_count
        # perm[:hot_count] is the hot set, the rest cold; int32 halves the memory
        # (8 MiB for an 8 GiB guest) and page offsets are < 2**32 by layout.
        self.perm = _layout_rng(seed, 0x686F74).permutation(mem.data_pages).astype(np.uint32)

    @property
    def hot_set(self) -> np.ndarray:
        """Absolute page numbers of the hot set (unsorted)."""
        return self.perm[:self.hot_count].astype(np.int64) + self.first_data_page

    def pick(self, rng: np.random.Generator, n: int) -> np.ndarray:
        # Fixed draws per call (independent of the outcome) keep the RNG stream
        # identical on every replay of the same state.
        is_hot = rng.random(n) < self.hot_writes
        hot = rng.integers(0, self.hot_count, n)
        cold = self.hot_count + rng.integers(0, max(1, self.cold_count), n)
        if self.cold_count == 0:
            is_hot[:] = True
        offsets = self.perm[np.where(is_hot, hot, cold)]
        return offsets.astype(np.int64) + self.first_data_page


class HotColdWorkload(PacedWorkload):
    """A hot set of ``hot_pages`` (fraction of data pages) takes ``hot_writes`` of writes.

    Args:
        hot_pages: fraction of data pages in the hot set, in (0, 1] (at least 1 page).
        hot_writes: fraction of writes that go to the hot set, in [0, 1].
    """

    name = "hotcold"

    def __init__(self, mem: GuestMemory, clock: Callable[[], float], seed: int, *,
                 hot_pages: float = 0.1, hot_writes: float = 0.9, **params):
        super().__init__(mem, clock, seed, **params)
        self.picker = _HotColdPicker(mem, seed, hot_pages, hot_writes)

    def pick_pages(self, n: int) -> np.ndarray:
        return self.picker.pick(self.rng, n)


class ZipfWorkload(PacedWorkload):
    """Page popularity follows Zipf's law: the k-th most popular page gets ~ k**-s.

    Popularity ranks are a seeded permutation of the data pages (so the popular pages
    are scattered); sampling is vectorised with a precomputed CDF and ``searchsorted``.
    Memory: 12 bytes per data page (24 MiB for an 8 GiB guest).

    Args:
        s: Zipf exponent (> 0; larger = more skewed).
    """

    name = "zipf"

    def __init__(self, mem: GuestMemory, clock: Callable[[], float], seed: int, *,
                 s: float = 1.2, **params):
        super().__init__(mem, clock, seed, **params)
        self.s = check_float("s", s, 0.0, 100.0, min_exclusive=True)
        weights = np.arange(1, mem.data_pages + 1, dtype=np.float64) ** -self.s
        cdf = np.cumsum(weights)
        cdf /= cdf[-1]
        cdf[-1] = 1.0  # so that every u in [0, 1) finds a rank
        self.cdf = cdf
        self.perm = _layout_rng(seed, 0x7A6970).permutation(mem.data_pages).astype(np.uint32)

    def pages_by_rank(self) -> np.ndarray:
        """Absolute page numbers, most popular first."""
        return self.perm.astype(np.int64) + self.mem.first_data_page

    def pick_pages(self, n: int) -> np.ndarray:
        ranks = np.searchsorted(self.cdf, self.rng.random(n), side="right")
        return self.perm[ranks].astype(np.int64) + self.mem.first_data_page


class SweepWorkload(PacedWorkload):
    """Writes data pages sequentially, wrapping around (e.g. a streaming buffer).

    Parameters:
        stride: distance between consecutive writes in pages (1 = strictly sequential;
            2 writes every other page, the pattern that fragments an mprotect tracker's
            VMAs fastest).  Each lap starts one page further on, so after ``stride`` laps
            every page has been written.

    Attributes:
        position: index of the next write in the sweep sequence; in the context.
    """

    name = "sweep"

    def __init__(self, mem: GuestMemory, clock: Callable[[], float], seed: int, *,
                 rate: float = 20000.0, stride: int = 1, **params):
        super().__init__(mem, clock, seed, rate=rate, **params)
        if not isinstance(stride, int) or not 1 <= stride <= max(1, mem.data_pages):
            raise ConfigError("stride", f"must be an integer in [1, {mem.data_pages}], got {stride!r}")
        self.stride = stride
        self.position = 0

    def pick_pages(self, n: int) -> np.ndarray:
        data = self.mem.data_pages
        seq = self.position + np.arange(n, dtype=np.int64)
        # Sequence index -> page: walk with the stride; each lap starts one page further
        # on (lap % stride), so after `stride` laps every page has been written.
        per_lap = -(-data // self.stride)
        lap, k = np.divmod(seq, per_lap)
        offsets = (k * self.stride + lap % self.stride) % data
        self.position = int((self.position + n) % (per_lap * self.stride))
        return offsets + self.mem.first_data_page

    def get_state(self) -> dict:
        state = super().get_state()
        state["position"] = self.position
        return state

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self.position = int(state["position"])


def _parse_phases(spec: str) -> list[tuple[float, float]]:
    phases = []
    for item in spec.split(","):
        rate_s, sep, duration_s = item.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            rate_pps, seconds = float(rate_s), float(duration_s)
        except ValueError:
            raise ConfigError("phases", f"expected rate:seconds[,rate:seconds...], got {item.strip()!r}") from None
        if not (math.isfinite(rate_pps) and rate_pps >= 0):
            raise ConfigError("phases", f"rate must be a finite number >= 0, got {rate_s!r}")
        if not (math.isfinite(seconds) and seconds > 0):
            raise ConfigError("phases", f"duration must be a finite number of seconds > 0, got {duration_s!r}")
        phases.append((rate_pps, seconds))
    return phases


class PhasedWorkload(PacedWorkload):
    """Runs through rate phases in virtual time (e.g. a burst in the middle of a run).

    Args:
        phases: ``"rate:seconds,rate:seconds,..."`` (pages per virtual second for that
            many virtual seconds, counted from the first step).
        repeat: after the last phase start again from the first; otherwise stay at the
            last phase's rate forever.
        pattern: which pages: ``uniform`` or ``hotcold`` (then ``hot_pages`` and
            ``hot_writes`` apply as in :class:`HotColdWorkload`).
    """

    name = "phased"

    def __init__(self, mem: GuestMemory, clock: Callable[[], float], seed: int, *,
                 phases: str = "5000:2,50000:2,500:2", repeat: bool = False,
                 pattern: str = "uniform", hot_pages: float = 0.1, hot_writes: float = 0.9,
                 max_batch: int = 64, fill: bool = True):
        if not isinstance(phases, str):
            raise ConfigError("phases", f"must be a string like '5000:2,500:2', got {phases!r}")
        self.phases = _parse_phases(phases)
        super().__init__(mem, clock, seed, rate=self.phases[0][0], max_batch=max_batch, fill=fill)
        self.unpaced = False  # a 0-rate phase means "write nothing", not "unpaced"
        self.repeat = check_bool("repeat", repeat)
        if pattern not in ("uniform", "hotcold"):
            raise ConfigError("pattern", f"must be 'uniform' or 'hotcold', got {pattern!r}")
        self.pattern = pattern
        self.picker = _HotColdPicker(mem, seed, hot_pages, hot_writes) if pattern == "hotcold" else None
        # Phase boundaries (virtual s since the first step) and pages due at each.
        self._ends_s = np.cumsum([d for _, d in self.phases])
        self._pages_at_end = np.cumsum([r * d for r, d in self.phases])
        self._cycle_s = float(self._ends_s[-1])
        self._cycle_pages = float(self._pages_at_end[-1])

    def _locate(self, elapsed_s: float) -> tuple[int, float, float]:
        """(phase index, seconds into it, pages due before this cycle) at ``elapsed_s``."""
        base_pages = 0.0
        if elapsed_s >= self._cycle_s:
            if not self.repeat:
                return len(self.phases), elapsed_s - self._cycle_s, 0.0
            cycles = math.floor(elapsed_s / self._cycle_s)
            base_pages = cycles * self._cycle_pages
            elapsed_s -= cycles * self._cycle_s
        index = int(np.searchsorted(self._ends_s, elapsed_s, side="right"))
        start_s = float(self._ends_s[index - 1]) if index else 0.0
        return index, elapsed_s - start_s, base_pages

    def current_rate_pps(self, elapsed_s: float) -> float:
        index, _, _ = self._locate(elapsed_s)
        return self.phases[min(index, len(self.phases) - 1)][0]

    def target_pages(self, elapsed_s: float) -> float:
        index, into_s, base_pages = self._locate(elapsed_s)
        if index >= len(self.phases):  # past the end, not repeating: last rate forever
            return self._cycle_pages + self.phases[-1][0] * into_s
        before = float(self._pages_at_end[index - 1]) if index else 0.0
        return base_pages + before + self.phases[index][0] * into_s

    def pick_pages(self, n: int) -> np.ndarray:
        if self.picker is not None:
            return self.picker.pick(self.rng, n)
        return self.rng.integers(self.mem.first_data_page, self.mem.npages, n)


BUILTIN_WORKLOADS: dict[str, type[Workload]] = {
    cls.name: cls for cls in (IdleWorkload, UniformWorkload, HotColdWorkload, ZipfWorkload,
                              SweepWorkload, PhasedWorkload, CheckerWorkload)
}


def load_workload(spec: str) -> type[Workload]:
    """Resolve a workload: a built-in name, or ``module:Class`` (``Class`` may be dotted).

    Raises:
        ConfigError("workload", ...): unknown name, module not importable, attribute
            missing, or not a concrete :class:`Workload` subclass.
    """
    if spec in BUILTIN_WORKLOADS:
        return BUILTIN_WORKLOADS[spec]
    if ":" not in spec:
        raise ConfigError("workload", f"unknown workload {spec!r}; built-ins are "
                          f"{', '.join(sorted(BUILTIN_WORKLOADS))}, or give module:Class")
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError("workload", f"{spec!r}: expected module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError("workload", f"cannot import module {module_name!r}: {err}") from err
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError("workload", f"module {module_name!r} has no attribute {attr!r}") from None
    if not (inspect.isclass(obj) and issubclass(obj, Workload)):
        raise ConfigError("workload", f"{spec!r} is not a subclass of guests.workload.Workload")
    if obj in (Workload, PacedWorkload) or obj.step is Workload.step or (
            issubclass(obj, PacedWorkload) and obj.pick_pages is PacedWorkload.pick_pages):
        raise ConfigError("workload", f"{spec!r} is abstract (implement step() or pick_pages())")
    return obj


def workload_params(cls: type[Workload]) -> dict[str, inspect.Parameter]:
    """The parameters ``cls`` accepts, by name, with the defaults that type them.

    Walks the constructors up the MRO while they forward ``**params``; a subclass's
    default overrides its base's.
    """
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        forwards = False
        for p in inspect.signature(vars(klass)["__init__"]).parameters.values():
            if p.kind is p.VAR_KEYWORD:
                forwards = True
            elif p.kind is not p.VAR_POSITIONAL and p.name not in _RUNTIME_ARGS:
                params.setdefault(p.name, p)
        if not forwards:
            break
    return params


def _convert(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(key, f"expected true/false, got {text!r}")
    if isinstance(default, int):
        try:
            return int(text, 0)
        except ValueError:
            try:  # accept "1e3" when it is integral
                value = float(text)
                if value.is_integer():
                    return int(value)
            except ValueError:
                pass
            raise ConfigError(key, f"expected an integer, got {text!r}") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(key, f"expected a number, got {text!r}") from None
    return text


def parse_params(cls: type[Workload], items: list[str]) -> dict[str, Any]:
    """Turn CLI ``key=value`` strings into typed keyword params for ``cls``.

    Each value takes the type of the parameter's default (bool: true/false/yes/no/on/
    off/1/0; int; float; anything else, or no default: str).  Range checks are the
    constructor's job.

    Raises:
        ConfigError: malformed item, a key given twice, an unknown key (named, with the
            known ones listed) or a value of the wrong type (naming the key).
    """
    known = workload_params(cls)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(item, "expected key=value")
        if key not in known:
            raise ConfigError(key, f"unknown parameter for workload {cls.workload_name()!r}; "
                              f"known: {', '.join(sorted(known)) or '(none)'}")
        if key in out:
            raise ConfigError(key, "given twice")
        default = known[key].default
        out[key] = _convert(key, text, None if default is inspect.Parameter.empty else default)
    return out
