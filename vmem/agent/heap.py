"""The agent's heap: glibc malloc settings, handing freed memory back, and a memory watch.

An agent runs for weeks and serves every connection and migration on a thread of its own,
so how the C allocator treats those threads decides whether its private memory
(``RssAnon``) stays flat (docs/reliability.md, "Soak"):

* :func:`tune_malloc` -- at most :data:`MALLOC_ARENAS` arenas and a fixed mmap threshold
  (why: next to the constants);
* :func:`collect_cycles` -- a full garbage collection, after every migration and whenever
  the agent falls idle: a migration's buffers hang on reference cycles (why: there);
* :func:`release_free_memory` -- ``malloc_trim(0)``, called by the accept loop whenever the
  last connection closed (after :func:`collect_cycles`);
* :class:`MemoryWatch` -- a debugging aid, off unless ``VMEM_AGENT_MEMWATCH`` is set: every
  *K* times the agent falls idle it logs RssAnon and glibc's heap figures (``mallinfo2``),
  and optionally the top *N* growths of Python allocations (``tracemalloc``) since the
  previous dump, which tells a Python-level accumulation from allocator fragmentation.

Everything here is best effort: on a libc without these functions nothing happens.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

__all__ = ["MALLOC_ARENAS", "MMAP_THRESHOLD_BYTES", "MemoryWatch", "collect_cycles", "freeze_startup_objects", "heap_figures", "obmalloc_figures", "release_free_memory",
           "tune_malloc"]

log = logging.getLogger("vmem.agent")

#: glibc malloc arenas the agent may create (M_ARENA_MAX).  Every connection and migration
#: runs in its own thread and glibc gives busy threads their own arena (up to 8 per core),
#: so the agent's private memory crept up by ~0.4 MiB per migration to ~110 MiB over 200
#: ping-pongs; with 2 arenas it stays flat at ~30 MiB (scripts/campaign.py, measured).
MALLOC_ARENAS = 2

#: Allocations from this size up get their own mapping, returned to the kernel when freed.
#: glibc raises its threshold dynamically (up to 32 MiB) after the first such free, and from
#: then on a migration's MiB-sized buffers are carved from the heap, which fragments and
#: grows: fixing the threshold keeps the agent's memory flat (scripts/soak.py, measured).
MMAP_THRESHOLD_BYTES = 256 << 10

_M_ARENA_MAX = -8
_M_MMAP_THRESHOLD = -3

_libc_lock = threading.Lock()
_libc_handle = None


def _libc():
    """glibc via ctypes, or None (another libc, or none found)."""
    global _libc_handle
    with _libc_lock:
        if _libc_handle is None:
            try:
                _libc_handle = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            except OSError:
                _libc_handle = False
        return _libc_handle or None


def tune_malloc(arenas: int = MALLOC_ARENAS) -> None:
    """``mallopt(M_ARENA_MAX, arenas)`` and ``mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)``."""
    libc = _libc()
    if libc is None:
        return
    try:
        libc.mallopt(_M_ARENA_MAX, arenas)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except AttributeError:
        pass


def collect_cycles(describe: bool = False) -> dict:
    """Free objects kept only by reference cycles now (a full ``gc.collect()``), and return
    ``{"objects": n}`` (``describe``: also ``"types"``, the most common types among them).

    Why the agent does this itself: a migration's objects form cycles (bound methods kept as
    callbacks, threads and their owners), and with them go its MiB-sized buffers (staging,
    framing, MAC and compression buffers).  The collector's own schedule reaches such
    survivors of many young collections only after many more allocations, so between
    migrations an agent held 30-130 MiB of dead buffers (measured with
    :class:`MemoryWatch` in scripts/soak.py; docs/reliability.md).  A full collection of the
    agent's objects made since start-up (:func:`freeze_startup_objects`) takes about a
    millisecond.
    """
    import gc

    if not describe:
        return {"objects": gc.collect()}
    flags = gc.get_debug()
    gc.set_debug(flags | gc.DEBUG_SAVEALL)
    try:
        n = gc.collect()
        counts: dict[str, int] = {}
        for obj in gc.garbage:
            name = type(obj).__qualname__
            counts[name] = counts.get(name, 0) + 1
    finally:
        gc.garbage.clear()
        gc.set_debug(flags)
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:12]
    return {"objects": n, "types": top}


def freeze_startup_objects() -> None:
    """Collect, then move every object alive now to the collector's permanent generation
    (``gc.freeze()``): the agent's code -- modules, functions, classes, ~30 k objects -- is
    then never scanned again, and a full collection (:func:`collect_cycles`) costs what the
    objects made since cost: ~1 ms instead of ~20 ms on a loaded 2-core machine, a pause a
    concurrent migration's stop-and-copy would feel.  Called once, after start-up, when no
    migration's objects exist (frozen objects are still freed by reference counting; only a
    cycle among them would be kept)."""
    import gc

    gc.collect()
    gc.freeze()


def release_free_memory() -> None:
    """Hand memory freed by closed connections back to the kernel (``malloc_trim(0)``: free()
    alone keeps it in the heap, and trimming also returns whole free pages inside it)."""
    libc = _libc()
    if libc is None:
        return
    try:
        libc.malloc_trim(0)
    except AttributeError:
        pass


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap_figures() -> dict:
    """This process's memory as the kernel and glibc see it, in bytes.

    ``rss_anon``: private RSS (``/proc/self/status``); ``heap_in_use`` / ``heap_free``:
    glibc's bytes allocated / free inside its arenas (``mallinfo2`` ``uordblks`` /
    ``fordblks``, all arenas); ``mmapped``: allocations on their own mappings (``hblkhd``).
    A missing figure is None.
    """
    out = {"rss_anon": None, "heap_in_use": None, "heap_free": None, "mmapped": None}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    out["rss_anon"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    libc = _libc()
    fn = getattr(libc, "mallinfo2", None) if libc is not None else None
    if fn is not None:
        fn.restype = _MallInfo2
        mi = fn()
        out |= {"heap_in_use": mi.uordblks, "heap_free": mi.fordblks, "mmapped": mi.hblkhd}
    return out


def obmalloc_figures() -> dict:
    """Python's small-object allocator (obmalloc): ``arenas`` (1 MiB each on 64-bit, freed
    only when wholly empty) and ``in_use`` bytes in allocated blocks, parsed from
    ``sys._debugmallocstats()``.  It writes to file descriptor 2, which is pointed at a
    temporary file meanwhile (another thread's stderr in that instant lands there too: a
    debugging aid only).  ``{}`` when unavailable."""
    import sys
    import tempfile

    fn = getattr(sys, "_debugmallocstats", None)
    if fn is None:
        return {}
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        try:
            sys.stderr.flush()
            os.dup2(tmp.fileno(), 2)
            fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        value = value.strip().replace(",", "")
        if key.strip() == "# arenas allocated current" and value.isdigit():
            out["arenas"] = int(value)
        elif key.strip() == "# bytes in allocated blocks" and value.isdigit():
            out["in_use"] = int(value)
    return out


class MemoryWatch:
    """Logs where the agent's memory goes, every ``every`` idle points (see the module docstring).

    ``VMEM_AGENT_MEMWATCH=EVERY[:TOP]`` turns it on.  ``EVERY`` alone: every EVERY-th time
    the agent falls idle (after ``malloc_trim``) it logs one ``memwatch`` line of figures
    (:func:`heap_figures`; cheap).  With ``TOP`` it also traces Python allocations
    (``tracemalloc``, started with the agent: slows migrations several times, a debugging aid
    only) and names the TOP source lines whose allocations grew most since the last dump.
    """

    ENV = "VMEM_AGENT_MEMWATCH"

    def __init__(self, every: int, top: int = 0):
        self.every = max(int(every), 1)
        self.top = max(int(top), 0)
        self._idle = 0
        self._tracemalloc = None
        self._last = None
        if self.top:
            import tracemalloc

            self._tracemalloc = tracemalloc
            tracemalloc.start(4)
            self._last = tracemalloc.take_snapshot()

    @classmethod
    def from_env(cls, environ=os.environ) -> "MemoryWatch | None":
        """The watch ``VMEM_AGENT_MEMWATCH`` asks for, or None.

        Raises:
            ConfigError: the variable is set but is not ``EVERY[:TOP]`` (EVERY >= 1, TOP >= 0).
        """
        from vmem.errors import ConfigError

        spec = environ.get(cls.ENV, "").strip()
        if not spec:
            return None
        try:
            parts = [int(p) for p in spec.split(":")]
            if not 1 <= len(parts) <= 2 or parts[0] < 1 or min(parts) < 0:
                raise ValueError
        except ValueError:
            raise ConfigError(cls.ENV, f"{spec!r} is not EVERY[:TOP] (integers, e.g. 20, or 20:15 to also trace "
                                       "Python allocations): fix or unset it") from None
        return cls(*parts)

    def due(self) -> bool:
        """Count an idle point; whether this one is to be dumped (every ``every``-th)."""
        self._idle += 1
        return self._idle % self.every == 0

    def dump(self, collected: dict | None = None) -> dict:
        """Log and return the figures (``collected``: what :func:`collect_cycles` found just before)."""
        figures = heap_figures()
        ob = obmalloc_figures()
        dump = {"idle": self._idle, "threads": threading.active_count(), **figures,
                "obmalloc_arenas": ob.get("arenas"), "obmalloc_in_use": ob.get("in_use"), "traced": None, "top": [],
                "cycles": collected}
        mib = 1 << 20
        line = (f"memwatch after {self._idle} idle points: RssAnon {(figures['rss_anon'] or 0) / mib:.2f} MiB, heap "
                f"in use {(figures['heap_in_use'] or 0) / mib:.2f} / free {(figures['heap_free'] or 0) / mib:.2f} MiB, "
                f"mmapped {(figures['mmapped'] or 0) / mib:.2f} MiB, obmalloc {ob.get('arenas')} arenas / "
                f"{(ob.get('in_use') or 0) / mib:.2f} MiB in use, {dump['threads']} threads")
        if collected is not None:
            line += f"; freed {collected['objects']} objects in cycles"
            if collected.get("types"):
                line += " (" + ", ".join(f"{n} {t}" for t, n in collected["types"]) + ")"
        tm = self._tracemalloc
        if tm is not None:
            snap = tm.take_snapshot().filter_traces((tm.Filter(False, tm.__file__),))
            diff = snap.compare_to(self._last, "lineno")
            self._last = snap
            dump["traced"], peak = tm.get_traced_memory()
            tm.reset_peak()
            dump["top"] = [{"where": str(d.traceback[0]) if d.traceback else "?", "size_diff": d.size_diff,
                            "size": d.size, "count_diff": d.count_diff} for d in diff[:self.top]]
            line += (f", Python traced {dump['traced'] / mib:.2f} MiB (peak {peak / mib:.1f}); grew most: "
                     + "; ".join(f"{t['where']} {t['size_diff']:+d} B ({t['count_diff']:+d})" for t in dump["top"]))
        log.warning("%s", line)
        return dump
