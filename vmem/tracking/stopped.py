"""Collecting with the guest's process stopped (``vmem migrate --collect-stop``).

A write-protecting collect (``uffd-wp``: one ``PAGEMAP_SCAN`` with ``PM_SCAN_WP_MATCHING``)
must remove stale writable TLB entries from every CPU that runs the guest's address space:
while the guest runs on another CPU, that is one TLB-shootdown IPI per page-table page with
written pages in it, 14-19 us each on the 2-vCPU VM this was measured on -- a 1 GiB guest
with 1 % of its pages written scattered took 2.4-6.5 ms to collect running against
0.75-1.3 ms paused (docs/performance.md).  A stopped process has no CPU, so its TLB entries
are not live anywhere and the same walk sends no IPI.  The price: the guest stands still for
the collect, as a vCPU does that its hypervisor deschedules, instead of running slowed by
the IPIs for longer.

Guarantees: the process is continued (``SIGCONT``) on every way out of the ``with`` block;
the collect never depends on the stop for its correctness (a thread still running when the
bounded wait ends only costs IPIs again); nothing is left behind.  If this process dies
between the stop and the continue, the guest stays stopped until someone sends it
``SIGCONT`` (``kill -CONT PID``) -- the window is the collect, about a millisecond.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

__all__ = ["Stood", "process_stopped", "STOP_WAIT_S"]

#: How long to wait for a running guest's threads to stop before collecting anyway: one on
#: a CPU stops within tens of microseconds (the signal's IPI and its way out of the kernel).
#: A sleeping guest is not waited for: woken by the signal, it stops only once it gets a
#: CPU, which on a busy 2-CPU host took milliseconds -- waiting for that made the guest stand
#: still 2.4-4.8 ms per collect around a 0.75 ms walk -- and until then it draws no IPI.
STOP_WAIT_S = 0.001


@dataclass
class Stood:
    """What one stop cost the guest."""

    #: every thread of the process was seen stopped before the block ran (not looked for
    #: when none was running: a sleeping guest stops as soon as it wakes)
    stopped: bool = False
    #: SIGSTOP sent -> every thread seen stopped (0 if not waited for or not seen in time)
    stop_wait_ns: int = 0
    #: SIGSTOP sent -> SIGCONT sent: how long the guest could not run
    stood_ns: int = 0


def _thread_states(pid: int) -> list[bytes]:
    """The scheduler state letter of every thread of ``pid`` (/proc/<pid>/task/<tid>/stat)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    states = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # the thread exited meanwhile
        # "tid (comm) S ...": the state follows the last ')' (comm may hold anything)
        end = stat.rfind(b")")
        states.append(stat[end + 2:end + 3])
    return states


@contextlib.contextmanager
def process_stopped(pid: int, wait_s: float = STOP_WAIT_S):
    """Stop process ``pid`` (SIGSTOP), wait (bounded by ``wait_s``, and only if one of its
    threads was running) until all its threads stopped, run the block, continue it (SIGCONT).  Yields a :class:`Stood`, complete once
    the block has exited.

    Raises:
        ProcessLookupError: ``pid`` is gone before the stop (nothing was done).
    """
    stood = Stood()
    # Only a thread that runs (or waits for a CPU) is worth waiting for: a sleeping one
    # draws no IPI, and the signal stops it inside the kernel as soon as it wakes.
    running = any(state == b"R" for state in _thread_states(pid))
    t0 = time.monotonic_ns()
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = t0 + int(wait_s * 1e9)
        while running:
            if all(state in (b"T", b"t") for state in _thread_states(pid)):
                stood.stopped = True
                stood.stop_wait_ns = time.monotonic_ns() - t0
                break
            if time.monotonic_ns() >= deadline:
                break
            os.sched_yield()  # the guest may be waiting for this CPU to act on the signal
        yield stood
    finally:
        # Read before the continue: the guest woken by it may take this CPU at once.
        stood.stood_ns = time.monotonic_ns() - t0
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass  # it died meanwhile: whoever watches it reports that
