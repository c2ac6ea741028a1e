"""Test-only failure injection for the verifier.  Never set any of it outside tests.

The migrator proves a migration with per-page digests: the source's of its RAM at the
pause, the destination's of what it placed in the incoming guest's RAM.  These hooks make
placement or the source go wrong on purpose, so that tests (tests/test_verification.py)
can show the digests catch it.  They are not user options: no flag or report key sets them.

* :data:`PLACEMENT_FAULT_ENV` -- an environment variable read only by the destination
  process (``python -m vmem.migration.destination`` and the agent's destination), value
  ``KIND:PAGE`` with KIND one of ``drop`` (the page is neither written nor mapped),
  ``wrong-offset`` (written one page further on, its own page left as it was) or ``flip``
  (written, then one byte of it flipped in the RAM file).  Pre-copy and post-copy placement
  alike (``vmem._native.place_pages`` and the post-copy engine).
* :data:`PLACE_DELAY_ENV` -- seconds the destination's placer sleeps after each batch (a
  slow destination: its backlog must stay out of the downtime, see ``SourceMigration._drain``).
* :data:`STOP_COPY_DELAY_ENV` -- an environment variable read by the source migrator, value
  milliseconds: the source sleeps that long right after the guest acknowledged the pause
  (stop-and-copy and the post-copy switch alike), so the guest-visible downtime grows by
  about that much.  A performance regression made on purpose, for the regression-run tests
  (tests/test_bench.py): ``vmem bench --baseline`` must flag it.
* :data:`PREEMPT_ENV` -- post-copy's fault priority changed on purpose, read by both sides
  (the destination process and the source migrator), comma-separated ``key=value``:
  ``give_way=0`` (the background push no longer gives way to demand answers: the source's
  pusher does not back off, the destination places it in ``piece``-page pieces without
  waiting), ``piece=N`` (pages per background piece at the destination), ``slow_us=N``
  (each background piece first holds the placement gate that long, counted as its pages
  written: one slow pwrite of the whole piece)
  and ``priority=normal|nice|slice|fifo`` (the most the fault threads ask for; default
  slice: nice -15 with a short EEVDF slice, vmem/_build/postcopy.py), and
  ``view=0`` (demand answers are ``pwrite``-n through the placement gate, as they were before
  they were copied into the destination's writable mapping of the RAM file), and
  ``batch=N`` (read by the source: pages per background push batch, default
  ``vmem.migration.postcopy.source.push_batch_pages``: 256 on one host, 1024 between hosts).
  ``give_way=0,piece=1024,batch=1024,priority=nice`` approximates the scheduling before
  issue 13 item 2 (1024-page push batches, written whole, fault threads at nice -15), which
  scripts/bench_postcopy.py --ab measures in the same run; tests use ``slow_us`` to show what
  the statistics catch without the mechanism.
* :data:`PREALLOC_ERRNO_ENV` -- read by the destination process: an errno (e.g. 28,
  ENOSPC) that ``--prealloc``'s allocation fails with instead of allocating, or
  ``map:ERRNO`` for its second step, mapping the RAM into the destination's page tables
  (``map:22``: a kernel without MADV_POPULATE_WRITE) (the destination's refusal and
  fallback, tests/test_prealloc.py).
* :data:`FIFO_REFUSED_ENV` -- ``source`` or ``destination``: that side answers
  ``--fault-sched fifo`` as a host that does not permit SCHED_FIFO would (the refusal's
  test, tests/test_postcopy.py; as root every host here permits it).
* :data:`NARROW_MAX_RUNS_ENV` -- read by the destination process: an integer >= 0 that
  replaces ``vmem.migration.postcopy.destination.NARROW_MAX_RUNS`` (0: the switch never
  narrows the registration, every page stays trapped as before issue 18's change; the A/B
  switch of the hybrid first-step measurement and the fallback's test).
* :data:`stale_pages` -- a module-level hook the test sets in the source's process: the
  source then answers post-copy faults and pushes with old copies of pages (as they were
  when the migration started) while its own RAM stays intact.
"""
from __future__ import annotations

import os

import numpy as np

from vmem.format.wire import MAX_PAGES_PER_RECORD

__all__ = ["PLACEMENT_FAULT_ENV", "placement_fault_from_env", "NO_IN_PLACE_ENV", "no_in_place",
           "PLACE_DELAY_ENV", "place_delay_from_env", "STOP_COPY_DELAY_ENV", "stop_copy_delay", "PREEMPT_ENV", "preempt_from_env", "apply_preempt",
           "StalePages", "stale_pages", "NARROW_MAX_RUNS_ENV", "narrow_max_runs_from_env",
           "PREALLOC_ERRNO_ENV", "prealloc_failure_from_env", "FIFO_REFUSED_ENV", "fifo_refused"]

#: ``KIND:PAGE``: the destination process mishandles PAGE as KIND when placing it (test-only).
PLACEMENT_FAULT_ENV = "VMEM_TEST_PLACEMENT_FAULT"


#: Milliseconds the source sleeps with the guest paused, before the final send (test-only).
STOP_COPY_DELAY_ENV = "VMEM_TEST_STOP_COPY_DELAY_MS"


def stop_copy_delay(environ=None) -> float:
    """Sleep :data:`STOP_COPY_DELAY_ENV` milliseconds if it is set; return the seconds slept.

    Raises:
        ValueError: the variable is set but not a non-negative number (a test's mistake).
    """
    import time

    value = (os.environ if environ is None else environ).get(STOP_COPY_DELAY_ENV, "")
    if not value:
        return 0.0
    try:
        delay_ms = float(value)
    except ValueError:
        delay_ms = -1.0
    if not delay_ms >= 0:
        raise ValueError(f"{STOP_COPY_DELAY_ENV}={value!r}: expected milliseconds >= 0")
    time.sleep(delay_ms / 1e3)
    return delay_ms / 1e3


def placement_fault_from_env(environ=None) -> tuple[str, int] | None:
    """The placement fault :data:`PLACEMENT_FAULT_ENV` asks for, or None.

    Raises:
        ValueError: the variable is set but malformed (a test's mistake: fail loudly).
    """
    from vmem import _native as nat

    value = (os.environ if environ is None else environ).get(PLACEMENT_FAULT_ENV, "")
    if not value:
        return None
    kind, _, page = value.partition(":")
    if kind not in nat.PLACE_FAULTS or not page.isdigit():
        raise ValueError(f"{PLACEMENT_FAULT_ENV}={value!r}: expected KIND:PAGE, KIND one of {sorted(nat.PLACE_FAULTS)}")
    return kind, int(page)


#: Set to 1: the destination never receives pages straight into RAM (the staged path only;
#: the A/B switch of the in-place receive's measurement, docs/performance.md).
NO_IN_PLACE_ENV = "VMEM_TEST_NO_IN_PLACE"


def no_in_place(environ=None) -> bool:
    """Whether :data:`NO_IN_PLACE_ENV` turns the in-place receive off."""
    return (os.environ if environ is None else environ).get(NO_IN_PLACE_ENV, "") == "1"


#: Seconds the destination's placer sleeps after each batch (test-only; a slow destination).
PLACE_DELAY_ENV = "VMEM_TEST_PLACE_DELAY_S"


def place_delay_from_env(environ=None) -> float:
    """The delay :data:`PLACE_DELAY_ENV` asks for (0.0 if unset).

    Raises:
        ValueError: set but not a number >= 0 (a test's mistake: fail loudly).
    """
    value = (os.environ if environ is None else environ).get(PLACE_DELAY_ENV, "")
    if not value:
        return 0.0
    delay_s = float(value)
    if not delay_s >= 0:
        raise ValueError(f"{PLACE_DELAY_ENV}={value!r}: expected seconds >= 0")
    return delay_s


#: An errno the destination's ``--prealloc`` allocation fails with (test-only).
PREALLOC_ERRNO_ENV = "VMEM_TEST_PREALLOC_ERRNO"


def prealloc_failure_from_env(environ=None, step: str = "allocate") -> OSError | None:
    """The OSError :data:`PREALLOC_ERRNO_ENV` asks ``--prealloc``'s ``step`` to fail with:
    ``allocate`` (the value is an errno) or ``map`` (the value is ``map:ERRNO``); None if
    unset or meant for the other step.

    Raises:
        ValueError: set but neither a positive integer nor ``map:`` one (a test's mistake:
            fail loudly).
    """
    value = (os.environ if environ is None else environ).get(PREALLOC_ERRNO_ENV, "")
    if not value:
        return None
    wanted, _, number = value.rpartition(":")
    if wanted not in ("", "map") or not number.isdigit() or int(number) == 0:
        raise ValueError(f"{PREALLOC_ERRNO_ENV}={value!r}: expected an errno > 0, or map:ERRNO")
    if (wanted or "allocate") != step:
        return None
    return OSError(int(number), os.strerror(int(number)))


#: A side that refuses SCHED_FIFO fault threads as if the host did not permit them (test-only).
FIFO_REFUSED_ENV = "VMEM_TEST_FIFO_REFUSED"


def fifo_refused(side: str, environ=None) -> bool:
    """Whether :data:`FIFO_REFUSED_ENV` makes ``side`` ("source" or "destination") refuse.

    Raises:
        ValueError: set to anything but a side's name (a test's mistake: fail loudly).
    """
    value = (os.environ if environ is None else environ).get(FIFO_REFUSED_ENV, "")
    if value not in ("", "source", "destination"):
        raise ValueError(f"{FIFO_REFUSED_ENV}={value!r}: expected source or destination")
    return value == side


#: The post-copy switch's narrowing limit replaced (test and benchmark only; see the module doc).
NARROW_MAX_RUNS_ENV = "VMEM_TEST_NARROW_MAX_RUNS"


def narrow_max_runs_from_env(default: int, environ=None) -> int:
    """:data:`NARROW_MAX_RUNS_ENV` as an integer, or ``default`` if unset.

    Raises:
        ValueError: set but not an integer >= 0 (a test's mistake: fail loudly).
    """
    value = (os.environ if environ is None else environ).get(NARROW_MAX_RUNS_ENV, "")
    if not value:
        return default
    if not value.isdigit():
        raise ValueError(f"{NARROW_MAX_RUNS_ENV}={value!r}: expected an integer >= 0")
    return int(value)


#: Post-copy's fault priority changed on purpose (test and benchmark only; see the module doc).
PREEMPT_ENV = "VMEM_TEST_POSTCOPY_PREEMPT"
#: the ``priority=`` names, each the most a fault thread asks for (vmem._native.PC_PRIO_*)
_PRIORITY_NAMES = ("normal", "nice", "slice", "fifo")


def preempt_from_env(environ=None) -> dict:
    """The settings :data:`PREEMPT_ENV` asks for: ``give_way`` (bool), ``piece``,
    ``slow_us`` (ints, 0 = default), ``batch`` (the source's pages per push batch, 1..1024)
    and ``priority`` (``normal``/``nice``/``slice``/``fifo``); {} if unset.

    Raises:
        ValueError: set but malformed (a test's mistake: fail loudly).
    """
    value = (os.environ if environ is None else environ).get(PREEMPT_ENV, "")
    out: dict = {}
    for item in filter(None, (x.strip() for x in value.split(","))):
        key, _, v = item.partition("=")
        if key == "give_way" and v in ("0", "1"):
            out[key] = v == "1"
        elif key == "view" and v in ("0", "1"):
            out[key] = v == "1"
        elif key in ("piece", "slow_us") and v.isdigit():
            out[key] = int(v)
        elif key == "batch" and v.isdigit() and 1 <= int(v) <= MAX_PAGES_PER_RECORD:
            out[key] = int(v)
        elif key == "priority" and v in _PRIORITY_NAMES:
            out[key] = v
        else:
            raise ValueError(f"{PREEMPT_ENV}={value!r}: expected give_way=0|1, piece=N, slow_us=N,"
                             f" batch=1..{MAX_PAGES_PER_RECORD}, priority=normal|nice|slice|fifo, view=0|1;"
                             f" got {item!r}")
    return out


def apply_preempt(environ=None) -> dict:
    """Apply :data:`PREEMPT_ENV` to this process's native post-copy engine (before it starts;
    the defaults when it is unset); return the settings (the source's pusher reads ``give_way``)."""
    from vmem import _native as nat

    cfg = preempt_from_env(environ)
    # Always set: unset means the defaults again (a process that ran with it before).
    nat.set_push_pieces(cfg.get("piece", 0), cfg.get("give_way", True), cfg.get("slow_us", 0), cfg.get("view", True))
    limits = {"normal": nat.PC_PRIO_NORMAL, "nice": nat.PC_PRIO_NICE, "slice": nat.PC_PRIO_SLICE,
              "fifo": nat.PC_PRIO_FIFO}
    nat.set_fault_thread_priority_limit(limits[cfg.get("priority", "slice")])
    return cfg


class StalePages:
    """Post-copy: serve old copies of pages still to come (test-only).

    :meth:`snapshot` keeps a copy of the source's RAM when the migration starts;
    :meth:`served_ram` (at the switch, the guest paused) returns the RAM the post-copy
    source serves from: a copy of the RAM with the chosen pages replaced by their snapshot.
    The source guest's own RAM is never written.

    Args:
        which: ``"one"`` -- the first page still to come that changed since the snapshot;
            ``"all"`` -- every such page.
        first_page: only pages from this one on are served stale (e.g. a guest's first data
            page: with its ledger current, a guest that reads a stale page can tell).

    Attributes:
        applied: the pages served stale (sorted int64), known after the switch.
    """

    def __init__(self, which: str = "one", first_page: int = 0):
        if which not in ("one", "all"):
            raise ValueError(f"which must be 'one' or 'all', got {which!r}")
        self.which = which
        self.first_page = first_page
        self.applied = np.empty(0, dtype=np.int64)
        self._old: np.ndarray | None = None

    def snapshot(self, ram: np.ndarray) -> None:
        self._old = ram.copy()

    def served_ram(self, ram: np.ndarray, pending: np.ndarray) -> np.ndarray:
        if self._old is None:
            raise RuntimeError("StalePages: no snapshot taken")
        pending = np.asarray(pending, dtype=np.int64)
        pending = pending[pending >= self.first_page]
        changed = pending[(self._old[pending] != ram[pending]).any(axis=1)]
        self.applied = changed[:1] if self.which == "one" else changed
        served = ram.copy()
        served[self.applied] = self._old[self.applied]
        return served


#: Set by a test (and cleared after it) in the process that runs the source migration.
stale_pages: StalePages | None = None
