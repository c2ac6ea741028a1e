"""The post-copy phase of a simulated migration: pages pushed vs demanded, faults, stalls.

After the switch the destination guest runs while ``pending`` pages (pure post-copy: every
data page; hybrid: the last dirty set) are still at the source.  The source pushes them in
page order from a cursor (``vmem.migration.postcopy.source``); a guest touching a page not
yet there faults, the source answers that page at once and moves the cursor just past it
(pre-paging: the neighbourhood of a fault goes next).  The simulation follows that in small
steps of simulated time::

    t = 0                 the switch (guest paused; the push waits push_hold_s for the
                          destination guest's first step)
    t = switch_s          the guest's first step: the downtime ends; from here the trace replays
    each step of dt       the guest writes W (trace.dirty_in over the step's trace time);
                          faults = W's pages still pending and not yet arrived -> demanded
                          (answered at once on the unshaped urgent connection, cursor
                          after the last); then the link carries the push
    push batches          the source pushes PUSH_BATCH_PAGES (1024) unsent pages at a time
                          from the cursor (vmem.migration.postcopy.source.BATCH_PAGES_NETWORK,
                          a link between hosts; one host pushes 256 at a time), one
                          PAGE_DATA record, on the link for len * wire bytes / rate; the
                          destination receives a record whole before it places any page of
                          it, so a batch's pages arrive together when its last byte does --
                          a page the guest writes while its batch is on the wire faults
                          (and its pushed copy is a duplicate)
    catch-up              a paced guest (vmem's workloads) makes up the time it was paused
                          at once on resume: its first step covers catch_up_s of trace time
    stall                 each fault stalls the guest fault_wait_s: its trace clock lags
                          real time by the stalls (a debt paid from the next steps)
    end                   every pending page sent: complete_s

The trace records writes only: a page the guest merely reads is not in it, so a workload
that reads pages it does not write faults more than predicted (the built-in workloads
write what they touch).  All numpy over index arrays; steps are at most 2 ms of simulated
time or 1/400 of the push, whichever is longer.
"""
from __future__ import annotations

import numpy as np

from vmem.analysis.model import wire_bytes

__all__ = ["simulate_postcopy", "MIN_STEP_S", "MAX_STEPS", "PUSH_BATCH_PAGES"]

MIN_STEP_S = 0.002
#: Pages per push record (the source's BATCH_PAGES_NETWORK): they arrive together.
PUSH_BATCH_PAGES = 1024
MAX_STEPS = 400
#: pages a push looks at per numpy step (a window of the pending list)
_SCAN = 8192


def _next_unsent(sent: np.ndarray, cursor: int, k: int) -> tuple[np.ndarray, int]:
    """Indices of up to ``k`` unsent entries from ``cursor`` on (wrapping once: each entry is
    looked at at most once, so none is returned twice), and the new cursor (just past the
    last one taken)."""
    n = len(sent)
    cursor = min(max(int(cursor), 0), n)
    out = []
    got = 0
    last = -1
    for a, b in ((cursor, n), (0, cursor)):
        pos = a
        while pos < b and got < k:
            end = min(b, pos + max(_SCAN, 2 * (k - got)))
            take = (np.flatnonzero(~sent[pos:end]) + pos)[: k - got]
            if len(take):
                out.append(take)
                got += len(take)
                last = int(take[-1])
            pos = end
    if not out:
        return np.empty(0, dtype=np.int64), cursor
    nxt = last + 1
    return np.concatenate(out), (0 if nxt >= n else nxt)


def simulate_postcopy(replay, pending: np.ndarray, *, rate_Bps: float, page_size: int, switch_s: float,
                      push_hold_s: float, fault_wait_s: float, throttle: float = 0.0, catch_up_s: float = 0.0) -> dict:
    """Run the post-copy phase on ``replay`` (a :class:`vmem.analysis.simulate._Replay` at the
    switch) for the sorted unique ``pending`` pages.  ``catch_up_s``: guest time it makes up
    at once when it resumes (vmem's paced workloads run the steps they missed while paused:
    the pause; 0 for a guest that does not).

    Returns:
        ``{"pages_pending", "pages_pushed", "pages_demanded", "faults", "complete_s",
        "push_s", "blocked_s", "bytes_sent"}`` -- ``complete_s`` from the switch to the
        last page sent, ``blocked_s`` the guest's total fault stall (QMP's blocktime).
    """
    pending = np.asarray(pending, dtype=np.int64)
    n = len(pending)
    res = {"pages_pending": n, "pages_pushed": 0, "pages_demanded": 0, "faults": 0, "complete_s": 0.0,
           "push_s": 0.0, "blocked_s": 0.0, "bytes_sent": 0}
    if n == 0:
        return res
    page_wire = wire_bytes(1024, page_size) / 1024
    total_s = n * page_wire / rate_Bps
    dt = max(MIN_STEP_S, total_s / MAX_STEPS)
    arrived = np.zeros(n, dtype=bool)  # at the destination (demanded, or its batch landed)
    queued = np.zeros(n, dtype=bool)   # demanded or in a batch already on the wire
    left = n
    cursor = 0
    t = 0.0
    debt = 0.0            # guest time owed to fault stalls
    guest_t = switch_s    # the guest runs from its first step on
    link_free = push_hold_s  # the push starts after the hold
    start_push = None
    flight = None         # (pending indices, arrival time) of the batch on the wire
    demanded = pushed = 0
    blocked = 0.0
    catch_up = catch_up_s
    t_last = 0.0          # when the last page arrived
    while left > 0:
        t1 = t + dt
        # The guest: writes over the part of this step it ran, minus what stalls ate.
        run = max(0.0, t1 - max(t, guest_t))
        if run > 0 and catch_up:
            # A paced guest catches up the steps it missed while paused, at once on resume.
            run, catch_up = run + catch_up, 0.0
        if run > 0:
            pay = min(debt, run)
            debt -= pay
            w = replay.advance(run - pay, throttle)
            if len(w):
                idx = np.searchsorted(pending, w)
                ok = idx < n
                idx, w = idx[ok], w[ok]
                idx = idx[pending[idx] == w]
                f = idx[~arrived[idx]]
                if len(f):
                    arrived[f] = queued[f] = True
                    left -= len(f)
                    demanded += len(f)
                    t_last = max(t_last, t)
                    stall = len(f) * fault_wait_s
                    debt += stall
                    blocked += stall
                    cursor = int(f.max()) + 1
                    if cursor >= n:
                        cursor = 0
        # The link: batches land whole; the next one leaves when the link is free.
        # Demand answers travel on their own unshaped connection (the urgent channel,
        # vmem.migration.local): they do not take the push's share of the link.
        while left > 0:
            if flight is not None:
                if flight[1] > t1:
                    break
                idx, at = flight
                new = idx[~arrived[idx]]
                arrived[new] = True
                left -= len(new)
                pushed += len(new)
                t_last = max(t_last, at)
                flight = None
                continue
            if link_free >= t1:
                break
            idx, cursor = _next_unsent(queued, cursor, PUSH_BATCH_PAGES)
            if not len(idx):
                break  # everything left is demanded or on the wire
            queued[idx] = True
            begin = max(link_free, t)
            if start_push is None:
                start_push = begin
            link_free = begin + len(idx) * page_wire / rate_Bps
            flight = (idx, link_free)
        t = t1
    res.update(pages_pushed=int(pushed), pages_demanded=int(demanded), faults=int(demanded),
               complete_s=float(max(t_last, switch_s)),
               push_s=float(max(t_last - start_push, 0.0)) if start_push is not None else 0.0,
               blocked_s=float(blocked), bytes_sent=int(wire_bytes(n, page_size)))
    return res
