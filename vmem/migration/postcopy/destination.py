"""Destination side of post-copy: present-page state, demand faults, atomic placement.

The migrator process holds the incoming guest's userfaultfd (sent by the guest over
SCM_RIGHTS) and registers the guest's RAM with MISSING|MINOR (keeping WP, so the guest can
be tracked when it migrates on).  From then on the guest can see a page only when we map
it:

* a page still to come is written into the RAM file with ``pwrite`` (invisible: the guest
  has no mapping of it and its faults are trapped), digested as the file then holds it
  (what was placed, not what was received) and then mapped with ``UFFDIO_CONTINUE`` -- so a
  page is never visible half-written (``vmem._native.place_pages``);
* a page that was already here before the switch (pre-copied and not dirtied since, or a
  page the source never had: a zero page) is mapped on its first fault: ``CONTINUE`` for a
  page in the page cache (MINOR fault), ``UFFDIO_ZEROPAGE`` for a hole (MISSING fault);
  a background thread also maps the pre-copied pages in large runs, so the guest rarely
  has to fault on them.

Present-page state, one byte per page (:attr:`PostcopyDestination.state`): MISSING (must
come from the source), PLACING (claimed by one placing thread: the others skip it),
PRESENT (its final content is in the RAM file).  A page goes MISSING -> PLACING -> PRESENT
exactly once after the switch, under one lock, so a demand fetch and the background push
racing for the same page write it once and never overwrite a page the guest has already
modified.  The same array is what recovery after a broken link would exchange.
"""
from __future__ import annotations

import os
import select
import sys
import threading
import time

import numpy as np

from vmem import _native as nat
from vmem.errors import MigrationError
from vmem.migration import inject
from vmem.migration.postcopy import fault_cpu_stat
from vmem.wakepipe import WakePipe
from vmem.pages import PAGE_SHIFT, PAGE_SIZE, count_runs, page_runs, unique_pages
from vmem.format.postcopy import MAX_PFNS_PER_RECORD, encode_pfn_list

__all__ = ["PostcopyDestination", "MISSING", "PLACING", "PRESENT", "postcopy_unavailable_reason"]

#: present-page states (the values the C fault engine uses on the same array)
MISSING, PLACING, PRESENT = nat.PC_MISSING, nat.PC_PLACING, nat.PC_PRESENT
#: at most this many faults go into the page map's fault log (fault_log)
FAULT_LOG_MAX = 1 << 16
#: fault events read per read(2) on the userfaultfd
FAULT_EVENTS_PER_READ = 256
#: GIL switch interval while post-copy runs (see PostcopyDestination.switch)
GIL_SWITCH_INTERVAL_S = 0.0001
#: pages mapped per UFFDIO_CONTINUE call chain by the background mapper between checks
MAPPER_CHUNK_PAGES = 4096
#: At the switch, when the pages still to come form at most this many runs (and are not
#: the whole RAM), only those runs stay registered MISSING|MINOR: every other page -- a
#: pre-copied one not yet mapped, or one the source never had -- is then mapped by the
#: kernel's own fault path instead of a round trip through the fault thread.  Each run
#: costs one UFFDIO_REGISTER (a VMA split: ~7 us measured here, in the downtime) and two
#: VMAs of the guest's; beyond this the whole RAM stays registered and the mapper maps the
#: pre-copied pages ahead instead, so the narrowing adds at most ~1 ms to the downtime.
#: A pure post-copy lists only the pages holding data, so it is narrowed too when those
#: form few runs.
NARROW_MAX_RUNS = 128


def postcopy_unavailable_reason(guest) -> str | None:
    """Why post-copy cannot run for this incoming guest on this kernel, or None."""
    feats = guest.uffd_features
    if feats < 0:
        return f"the incoming guest has no userfaultfd ({os.strerror(-feats)})"
    for name, bit in (("MISSING_SHMEM", nat.UFFD_FEATURE_MISSING_SHMEM), ("MINOR_SHMEM", nat.UFFD_FEATURE_MINOR_SHMEM)):
        if not feats & bit:
            return f"the kernel lacks userfaultfd {name} (needed to trap the guest's accesses to missing pages)"
    return None


class PostcopyDestination:
    """Post-copy state and threads for one incoming guest.

    Args:
        guest: the incoming ProcessGuest (its uffd, RAM fd and RAM base are used).
        digests: per-page digest array to fill as pages are placed (None: no verification).
        received: bool per page, True for pages written into the RAM file (pre-copy placer
            fills it before the switch); pages never received are zero pages.
        send_control: thread-safe ``send_control(ctype, raw=bytes)`` on the back channel.
        fault_sched: how the native fault thread is scheduled (``--fault-sched``).
        fault_cpu: the CPU the native fault thread is pinned to (``--fault-cpu``; the caller
            checked it is one this process may run on), None for none.

    Guarantees: after :meth:`wait_complete` returns True every page is PRESENT, in the RAM
    file, mapped or mappable, and its digest recorded; :meth:`finish` leaves the guest's RAM
    registered for WP only (no fault can block it any more).
    """

    def __init__(self, guest, digests: np.ndarray | None, received: np.ndarray, send_control,
                 fault_sched: str = "default", fault_cpu: int | None = None):
        self.guest = guest
        self.fault_cpu = fault_cpu
        #: how the native fault thread is scheduled (vmem.migration.postcopy.FAULT_SCHEDS;
        #: the caller checked this host permits it)
        self.fault_sched = fault_sched
        self.npages = guest.npages
        self.uffd = guest.uffd()
        self.base = guest.ram_base
        self.ram_fd = guest.ram.fd
        self.view = guest.ram.address  # this process's mapping: digests of placed pages
        self.digests = digests
        self.received = received
        self._send_control = send_control
        self.state = np.full(self.npages, PRESENT, dtype=np.uint8)
        self.requested = np.zeros(self.npages, dtype=bool)
        self.fault_t0_ns = np.zeros(self.npages, dtype=np.int64)
        self._lock = threading.Lock()
        self._complete = threading.Event()
        self._stop = threading.Event()
        self._wake = WakePipe()  # stop() wakes the fault thread
        self._threads: list[threading.Thread] = []
        self.error: BaseException | None = None
        self.armed = False
        # statistics (documented in docs/report.md under "postcopy")
        self.missing = 0
        self.pages_pending = 0
        self.fault_events = 0
        self.demand_faults = 0  # distinct pages requested from the source
        self.local_faults = 0  # faults resolved here (page present: CONTINUE / ZEROPAGE)
        self.pages_demanded = 0  # placed from the urgent channel / demand answers
        self.pages_pushed = 0  # placed from the background push
        self.pages_mapped_ahead = 0  # pre-copied pages mapped by the background mapper
        self.narrowed = False  # the switch narrowed the registration (see _narrow)
        self.narrowed_runs = 0  # runs then left registered MISSING|MINOR
        self.duplicates = 0  # pages that arrived twice (demand and push raced)
        # the background push giving way to demand answers (native engine; docs/postcopy.md)
        self.fault_thread_priority: int | None = None  # VMEM_PC_PRIO_* the fault thread got
        self.fault_thread_cpu = -1  # the engine's "cpu" statistic (vmem.migration.postcopy.fault_cpu_stat)
        self.push_yields = 0  # background pieces that waited for a demand answer first
        self.fault_waits = 0  # demand answers that waited for a background piece
        self.push_pages_ahead_max = 0  # most background pages placed while one demand answer waited
        self._latencies: list[np.ndarray] = []
        self._local_latencies: list[np.ndarray] = []
        self.t_switch_ns = 0
        self.engine = None  # PostcopyFaultEngine in fast-path mode
        self._engine_stats: dict | None = None  # a stopped engine's counters, not yet folded in
        self._latency_ns: np.ndarray | None = None
        self._old_switch_s: float | None = None
        self.t_complete_ns = 0

    # --- registration ---------------------------------------------------------------------
    def arm(self) -> None:
        """Trap the guest's accesses to unmapped pages (MISSING|MINOR, keeping WP)."""
        mode = nat.UFFDIO_REGISTER_MODE_MISSING | nat.UFFDIO_REGISTER_MODE_MINOR | nat.UFFDIO_REGISTER_MODE_WP
        nat.uffd_register(self.uffd, self.base, self.npages * PAGE_SIZE, mode)
        self.armed = True

    def disarm(self) -> None:
        """Back to WP only: the kernel maps pages on its own again.

        Every page is present by now, but a guest thread may still sit on a fault raised
        just before the fault thread stopped (a page that was here already: a hole, or a
        pre-copied page not yet mapped); UNREGISTER wakes it (and a last WAKE makes sure):
        it retries the access, which the kernel now serves by itself.
        """
        if self.armed:
            size = self.npages * PAGE_SIZE
            # UFFDIO_REGISTER only adds modes to a range this uffd already holds (a range
            # that has every requested mode is skipped), so dropping MISSING|MINOR takes an
            # UNREGISTER -- which also wakes any waiter -- then WP again for later tracking.
            nat.uffd_unregister(self.uffd, self.base, size)
            nat.uffd_register(self.uffd, self.base, size, nat.UFFDIO_REGISTER_MODE_WP)
            nat.uffd_wake(self.uffd, self.base, size)
            self.armed = False

    # --- the switch -------------------------------------------------------------------------
    def mark_pending(self, pfns: np.ndarray) -> None:
        """A PFNS record: these pages will come from the source (idempotent, any order).

        Applied as each record arrives, so the switch needs no sort of the whole list.
        """
        self.state[pfns] = MISSING

    def switch(self, urgent_channel=None) -> None:
        """Start the fault handling for the pages marked pending.

        Call after every pre-copied page is written (the pre-copy placer flushed) and
        before the guest resumes.
        """
        pending = self.state == MISSING
        self.missing = self.pages_pending = int(np.count_nonzero(pending))
        self.t_switch_ns = time.monotonic_ns()
        self._narrow(pending)
        # A thread woken by a fault waits for the GIL up to the switch interval (5 ms by
        # default) while another thread runs Python: that alone would be the fault latency.
        self._old_switch_s = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        if self.missing == 0:
            self._mark_complete()
        self._start_fault_handling(urgent_channel)

    def _narrow(self, pending: np.ndarray) -> None:
        """Keep MISSING|MINOR only over the runs of pending pages (see :data:`NARROW_MAX_RUNS`).

        Before the switch the whole RAM is registered (:meth:`arm`: a pure post-copy's
        switch then costs no registration).  A hybrid's pending pages are a few hundred
        scattered ones; leaving the rest registered makes every first touch of a
        pre-copied page (MINOR) or of a page the source never had (MISSING) a round trip
        through the fault thread -- tens of them in the resumed guest's first steps, in its
        downtime.  The guest is paused here, so no fault is in flight.  ``pending``: the
        mask of the pages marked MISSING.
        """
        if self.pages_pending >= self.npages:
            return  # every page is to come: nothing to narrow
        limit = inject.narrow_max_runs_from_env(NARROW_MAX_RUNS)
        # Count the runs before listing them: a flat-out guest's hybrid leaves tens of
        # thousands of scattered pages, whose flatnonzero + page_runs alone took 0.7-1.1 ms
        # of the downtime (measured) only to find them over the limit; the count is ~20 us.
        if limit == 0 or count_runs(pending) > limit:
            return
        starts, ends = page_runs(np.flatnonzero(pending), self.npages)
        size = self.npages * PAGE_SIZE
        nat.uffd_unregister(self.uffd, self.base, size)
        nat.uffd_register(self.uffd, self.base, size, nat.UFFDIO_REGISTER_MODE_WP)
        mode = nat.UFFDIO_REGISTER_MODE_MISSING | nat.UFFDIO_REGISTER_MODE_MINOR | nat.UFFDIO_REGISTER_MODE_WP
        for a, b in zip(starts.tolist(), ends.tolist()):  # one ioctl per run, <= NARROW_MAX_RUNS
            nat.uffd_register(self.uffd, self.base + a * PAGE_SIZE, (b - a) * PAGE_SIZE, mode)
        self.narrowed, self.narrowed_runs = True, len(starts)

    def _start_fault_handling(self, urgent_channel) -> None:
        if urgent_channel is not None:
            # Fast path: one C thread reads faults, asks on the urgent channel and places
            # the answers (vmem._native.PostcopyFaultEngine); Python keeps the push.
            # The fault log: one (latency ns, page, fault monotonic ns) row per waited-on fault.
            self._latency_ns = np.zeros((min(self.npages, 1 << 20), 3), dtype=np.int64)
            from vmem.migration.postcopy import fault_sched_limit, native_link

            fd, mac = native_link(urgent_channel)
            self.engine = nat.PostcopyFaultEngine(
                self.uffd, fd, self.ram_fd, self.base, self.npages, self.state,
                self.requested.view(np.uint8), self.received.view(np.uint8), self.fault_t0_ns, self.digests,
                self._latency_ns, self.missing, view=self.view,
                view_writable=not getattr(self.guest.ram, "readonly", True))
            limit = fault_sched_limit(self.fault_sched)
            if limit is not None:
                self.engine.set_priority_limit(limit)
            self.engine.set_cpu(self.fault_cpu)
            self.engine.set_mac(mac)  # a keyed link: the C thread checks and tags every frame
            self.engine.start()
            return
        self._start(self._fault_loop, "vmem-pc-faults")

    def pause(self) -> None:
        """The link broke: stop the fault handling, keep the registration (the guest waits on
        its missing pages) and the present-page state, fold the statistics so far."""
        self.stop()
        self._fold_stats()

    def resume_after_reconnect(self, urgent_channel=None) -> None:
        """Restart fault handling on the new connection.  Requests lost with the old link are
        forgotten (the guest's faults are re-asked; the source resends every missing page)."""
        with self._lock:
            self.state[self.state == PLACING] = MISSING  # an interrupted placement is redone
            lacking = self.state != PRESENT
            self.requested[lacking] = False
            self.missing = int(np.count_nonzero(lacking))
        self._stop = threading.Event()
        self._complete = threading.Event()
        self._wake = WakePipe()  # stop() wakes the fault thread
        self._old_switch_s = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        if self.missing == 0:
            self._mark_complete()
        self._start_fault_handling(urgent_channel)

    def _fold_stats(self) -> None:
        """Add a stopped engine's counters to the Python-side ones (an engine per link)."""
        es = self._engine_stats
        if es is None:
            return
        self._engine_stats = None
        self.demand_faults += es["demand_faults"]
        self.fault_events += es["fault_events"]
        self.local_faults += es["local_faults"]
        self.pages_demanded += es["pages_demanded"]
        self.pages_pushed += es["pages_pushed"]
        self.duplicates += es["duplicates"]
        self.t_complete_ns = es["t_complete_ns"] or self.t_complete_ns
        self.fault_thread_priority = es["priority"]
        self.fault_thread_cpu = es["cpu"]
        self.push_yields += es["push_yields"]
        self.fault_waits += es["fault_waits"]
        self.push_pages_ahead_max = max(self.push_pages_ahead_max, es["push_pages_ahead_max"])
        self._latencies.append(self._latency_ns[: es["latency_count"]].copy())

    def start_mapper(self) -> None:
        """Start mapping pre-copied pages ahead of the guest (after it resumed: not in the
        downtime).  Nothing to do after a narrowed switch: the kernel maps those itself."""
        if self.narrowed:
            return
        self._start(self._mapper_loop, "vmem-pc-mapper")

    def _start(self, target, name: str) -> None:
        def run():
            try:
                target()
            except BaseException as err:  # surfaced by wait_complete / finish
                if not self._stop.is_set():
                    self.error = err
                    self._complete.set()

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # --- placement -----------------------------------------------------------------------------
    def place(self, staging: np.ndarray, pfns: np.ndarray) -> int:
        """Place the pages of ``pfns`` held in ``staging[:n]``; skip those already here.

        Each page is written into the RAM file, digested as the file then holds it (read
        through this process's mapping of it) and only then mapped for the guest (``place_pages``).
        Thread-safe.  Returns how many pages this call placed.
        """
        if self.engine is not None:
            return self.engine.place(staging, pfns)  # the same, in C under the engine's lock
        n = len(pfns)
        with self._lock:
            take = self.state[pfns] == MISSING
            rows = np.flatnonzero(take)
            mine = pfns[rows]
            self.state[mine] = PLACING
        if len(rows) < n:
            self.duplicates += n - len(rows)
        if not len(rows):
            return 0
        nat.place_pages(self.ram_fd, self.uffd, self.base, staging, mine, None if len(rows) == n else rows,
                        digests=self.digests, view=self.view)
        now = time.monotonic_ns()
        with self._lock:
            self.state[mine] = PRESENT
            self.received[mine] = True
            t0 = self.fault_t0_ns[mine]
            hit = t0 > 0
            if hit.any():
                self._latencies.append(np.stack([now - t0[hit], mine[hit], t0[hit]], axis=1))
                self.fault_t0_ns[mine[hit]] = 0
            self.missing -= len(mine)
            # "Demanded": the guest faulted on it and we asked for it, whichever channel
            # brought it; "pushed": it came with the background push before anyone asked.
            asked = int(np.count_nonzero(self.requested[mine]))
            self.pages_demanded += asked
            self.pages_pushed += len(mine) - asked
            if self.missing == 0:
                self._mark_complete()
        return len(mine)

    def _mark_complete(self) -> None:
        if not self.t_complete_ns:
            self.t_complete_ns = time.monotonic_ns()
        self._complete.set()

    # --- threads ---------------------------------------------------------------------------------
    def _fault_loop(self) -> None:
        """Read fault events; resolve present pages here, request missing ones (FAULT)."""
        poller = select.poll()
        poller.register(self.uffd, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        base, npages = self.base, self.npages
        minor_flag = nat.UFFD_PAGEFAULT_FLAG_MINOR
        while not self._stop.is_set():
            if not poller.poll(1000):
                continue
            if self._stop.is_set():
                return
            addrs, flags = nat.uffd_read_fault_events(self.uffd, FAULT_EVENTS_PER_READ)
            if not len(addrs):
                continue
            t = time.monotonic_ns()
            pfns = ((addrs - np.uint64(base)) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
            ok = (addrs >= np.uint64(base)) & (pfns < npages)
            pfns, flags = pfns[ok], flags[ok]
            self.fault_events += len(pfns)
            with self._lock:
                st = self.state[pfns]
                waiting = pfns[st != PRESENT]
                fresh = waiting[self.fault_t0_ns[waiting] == 0]
                self.fault_t0_ns[fresh] = t
                ask = waiting[(self.state[waiting] == MISSING) & ~self.requested[waiting]]
                ask = unique_pages(ask)
                self.requested[ask] = True
            if len(ask):
                self.demand_faults += len(ask)
                for i in range(0, len(ask), MAX_PFNS_PER_RECORD):
                    self._send_control_fault(ask[i:i + MAX_PFNS_PER_RECORD])
            here = np.flatnonzero(st == PRESENT)
            if len(here):
                # Present already: map it ourselves.  Per fault, not per page of RAM: a
                # guest touches each page at most once before it is mapped.
                for k in here.tolist():
                    addr = base + int(pfns[k]) * PAGE_SIZE
                    if int(flags[k]) & minor_flag:
                        nat.uffd_continue(self.uffd, addr, PAGE_SIZE)
                    else:
                        nat.uffd_zeropage(self.uffd, addr, PAGE_SIZE)  # a page the source never had
                self.local_faults += len(here)
                self._local_latencies.append(np.full(len(here), time.monotonic_ns() - t, dtype=np.int64))

    def _send_control_fault(self, pfns: np.ndarray) -> None:
        from vmem.format.wire import ControlType

        self._send_control(ControlType.POSTCOPY_FAULT, raw=encode_pfn_list(pfns))

    def _mapper_loop(self) -> None:
        """Map pre-copied pages in large runs so the guest need not fault on each one."""
        have = self.received & (self.state == PRESENT)
        starts, ends = page_runs(np.flatnonzero(have), self.npages)
        if not len(starts):
            return
        # Cut long runs so the loop can stop (and faults interleave) every few MiB; numpy
        # over the runs, since a hybrid switch can leave tens of thousands of gaps.
        c = MAPPER_CHUNK_PAGES
        counts = (ends - starts + c - 1) // c
        which = np.repeat(np.arange(len(starts)), counts)
        nth = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        first = starts[which] + nth * c
        runs = np.stack((first, np.minimum(first + c, ends[which])), axis=1)
        for i in range(0, len(runs), 64):
            if self._stop.is_set():
                return
            self.pages_mapped_ahead += nat.continue_runs(self.uffd, self.base, runs[i:i + 64])

    # --- end ---------------------------------------------------------------------------------------
    def wait_complete(self, timeout_s: float) -> bool:
        """Wait until every pending page is present; False on timeout.  Raises a thread's error."""
        if self.engine is not None:
            deadline = time.monotonic() + timeout_s
            while True:
                st = self.engine.stats()
                if st["error"]:
                    raise MigrationError("postcopy", f"post-copy fault thread failed: {os.strerror(st['error'])}")
                if st["missing"] == 0 or time.monotonic() > deadline:
                    self.missing = st["missing"]
                    return st["missing"] == 0
                time.sleep(0.0005)
        self._complete.wait(timeout_s)
        if self.error is not None:
            raise MigrationError("postcopy", f"post-copy at the destination failed: {self.error}") from self.error
        return self.missing == 0

    def stop(self) -> None:
        """Stop the threads (idempotent).  Does not disarm: call :meth:`finish` for that."""
        self._stop.set()
        if self.engine is not None:
            self.engine.stop()  # first: a batch placed after reading the counters would go uncounted
            self._engine_stats = self.engine.stats()
            self.engine.close()
            self.engine = None
        if self._old_switch_s is not None:
            sys.setswitchinterval(self._old_switch_s)
            self._old_switch_s = None
        self._wake.wake()
        for t in self._threads:
            t.join(5)
        self._threads.clear()
        self._wake.close()

    def finish(self) -> dict:
        """All pages present: stop the threads, disarm, return the statistics."""
        self.stop()
        self.disarm()
        return self.stats()

    def missing_pages(self) -> np.ndarray:
        """Pages not present (what is lost if the source is gone)."""
        return np.flatnonzero(self.state != PRESENT)

    def _fault_log_rows(self) -> np.ndarray:
        """Every demand fault so far as ``(n, 3)`` int64 rows [latency ns, page, read at ns]."""
        return np.concatenate(self._latencies) if self._latencies else np.empty((0, 3), np.int64)

    def fault_log(self, max_faults: int = FAULT_LOG_MAX) -> dict:
        """The faults the guest waited on, in the order they were resolved (for the page map).

        ``page``, ``fault_us`` (when the guest faulted, microseconds after the switch, this
        host's clock) and ``latency_us`` (fault -> placed), at most ``max_faults`` of each
        (``truncated`` says if more were seen).  Call after :meth:`stats`.
        """
        log = self._fault_log_rows()
        head = log[:max_faults]
        return {"page": head[:, 1].tolist(), "fault_us": ((head[:, 2] - self.t_switch_ns) // 1000).tolist(),
                "latency_us": (head[:, 0] // 1000).tolist(), "truncated": bool(len(log) > max_faults)}

    def faults_until(self, t_ns: int) -> dict:
        """The demand faults read up to ``t_ns`` (this host's monotonic clock; e.g. the
        guest's first step after the switch, whose faults are part of the downtime): their
        count and the time the guest spent blocked on them.  Call after :meth:`stats`."""
        log = self._fault_log_rows()
        hit = log[log[:, 2] <= t_ns]
        return {"faults": int(len(hit)), "blocked_ms": round(float(hit[:, 0].sum()) / 1e6, 3)}

    def stats(self) -> dict:
        """The statistics (call after :meth:`stop`/:meth:`finish`: a running engine's
        counters are folded in when it stops)."""
        self._fold_stats()
        native = self._latency_ns is not None  # a native engine ran at least once
        if native:
            self.missing = int(np.count_nonzero(self.state != PRESENT))
        lat = self._fault_log_rows()[:, 0] / 1e3
        local = np.concatenate(self._local_latencies) / 1e3 if self._local_latencies else np.empty(0)

        def pct(a: np.ndarray) -> dict:
            if not len(a):
                return {"p50": None, "p99": None, "max": None, "count": 0}
            return {"p50": round(float(np.percentile(a, 50)), 1), "p99": round(float(np.percentile(a, 99)), 1),
                    "max": round(float(a.max()), 1), "count": int(len(a))}

        return {
            "pages_pending": int(self.pages_pending),
            "faults": int(self.demand_faults),
            "fault_events": int(self.fault_events),
            "local_faults": int(self.local_faults),
            "fault_latency_us": pct(lat),
            "local_fault_latency_us": pct(local),
            # The guest's time blocked on missing pages (QMP's postcopy-blocktime): the sum of
            # the demand-fault latencies above; its one workload thread never waits on two.
            "blocktime_ms": round(float(lat.sum()) / 1e3, 3),
            "pages_demanded": int(self.pages_demanded),
            "pages_pushed": int(self.pages_pushed),
            "pages_mapped_ahead": int(self.pages_mapped_ahead),
            "narrowed_runs": int(self.narrowed_runs) if self.narrowed else None,
            "duplicate_pages": int(self.duplicates),
            "complete_s": round((self.t_complete_ns - self.t_switch_ns) / 1e9, 6) if self.t_complete_ns else None,
            "missing": int(self.missing),
            "fault_path": "native" if native else "python",
            "fault_thread_priority": (nat.FAULT_THREAD_PRIORITIES[self.fault_thread_priority]
                                      if self.fault_thread_priority is not None else None),
            "fault_thread_cpu": fault_cpu_stat(self.fault_thread_cpu),
            "push_yields": int(self.push_yields),
            "fault_waits": int(self.fault_waits),
            "push_pages_ahead_max": int(self.push_pages_ahead_max),
        }
