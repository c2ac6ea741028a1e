"""Trace-driven migration simulator: replay a recorded dirty trace through any policy.

The simulator runs the migrator's own round loop (:func:`vmem.migration.rounds.run_precopy`,
plugged with :class:`_TraceRounds`) with time and dirty pages taken from
a :class:`~vmem.analysis.trace.DirtyTrace` instead of a live guest, at any bandwidth, and returns
a :class:`~vmem.migration.report.MigrationReport` shaped like a measured one, so graphs and
comparisons treat predicted and measured runs alike.

Timeline (seconds of *trace time*; the trace loops when the migration outlasts it)::

    start_s            migration starts (handshake: setup_s, nothing tracked yet)
    start_s + setup_s  tracking armed; round 0 sends every data page
    round i            send a_i pages: wire_bytes(a_i) through a token bucket of rate B
                       (it starts full with burst_bytes, as transport.ShapedChannel's),
                       then collect (collect_s): dirty_i = pages written since the
                       previous collect -- trace.dirty_in(previous collect, this collect)
    policy             sees PrecopyStats exactly as the migrator fills them
                       (bandwidth = bytes / send time, est_downtime = dirty * page_size /
                       min(bandwidth, B), dirty_history, dirty_rate_history, throttle...)
    drain              the migrator waits drain_s + drain_per_page_s x the pages of the
                       last round's last record for the destination to place what it
                       received (PLACED acks); the guest runs on, the link idles (its
                       bucket refills)
    stop-and-copy      the guest runs pause_s more (pause latency), then the union of the
                       last dirty set and what it wrote meanwhile is sent;
                       downtime = send time + switchover_s (final collect, END, context,
                       destination restore, first step); the send time is the bucket's
                       alone, its CPU time is in the calibrated switchover_s

Throttle (``Verdict.throttle = t`` on CONTINUE, kept until changed): ``"subsample"``
(default) keeps a seeded random ``(1 - t)`` of the pages each round dirties;
``"dilate"`` advances the trace's clock at ``(1 - t)`` of real time instead (a guest
that gets ``1 - t`` of its CPU does ``1 - t`` of its work: right for a duty-cycle pause
throttle, where the guest's virtual clock stops too).

Everything is numpy on page arrays (``trace.dirty_in``: slices + ``np.unique``); a 1 GiB
guest with a 10 s trace simulates in milliseconds to tens of milliseconds.

The command line, ``vmem predict``, is :mod:`vmem.cli.predict`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields

import numpy as np

from vmem.errors import ConfigError, PolicyError
from vmem.analysis.model import (DEFAULT_COLLECT_S, DEFAULT_SWITCHOVER_S, last_record_pages, switch_backlog_pages,
                                 wire_bytes)
from vmem.pages import merge_pages
from vmem.migration.policy import Decision, XenDefaultPolicy
from vmem.migration.report import MigrationReport, RoundStats
from vmem.migration.rounds import SAFETY_MAX_ROUNDS, RoundResult, run_precopy
from vmem.analysis.trace import WINDOW_RULES, DirtyTrace

__all__ = [
    "SimulationParams",
    "simulate",
    "DEFAULT_SETUP_S",
    "DEFAULT_PAUSE_S",
    "DEFAULT_POST_S",
    "SAFETY_MAX_ROUNDS",
    "transfer_time_s",
    "predict",
    "compare_reports",
    "alignment_from_report",
    "policy_from_description",
    "print_prediction",
    "print_forecast",
    "wide_console",
    "THROTTLE_MODELS",
    "POSTCOPY_SIM_MODES",
]

#: Handshake to tracking armed (destination process + incoming guest start): 0.3-1.3 s
#: measured here for 64 MiB-1 GiB guests (up to 2.7 s on a loaded host) with the destination
#: started at the migration's start; 0.1-0.3 s with one started ahead (vmem migrate).  A
#: calibration replaces it.  It shifts where on the trace the migration runs, and total_time_s.
DEFAULT_SETUP_S = 0.8
#: Posting PAUSE to the guest's acknowledgement (it keeps running meanwhile), measured here.
DEFAULT_PAUSE_S = 0.0005
#: After the switchover: digest verification, the guest's ledger check, commit, observe.
#: Only added to total_time_s; it depends on size and options, so 0 by default.
DEFAULT_POST_S = 0.0
#: The stream records after the pages (libxc END, EMULATOR_CONTEXT of a small context, libxl END).
TRAILER_BYTES = 8 + 8 + 8 + 512
_HEADER_BYTES = 128
THROTTLE_MODELS = ("subsample", "dilate")
#: Post-copy modes the simulator runs (MigrationOptions.postcopy's, "allow" aside).
POSTCOPY_SIM_MODES = ("off", "after-precopy", "pure")
#: Pure post-copy downtime without a calibration: the switch plus the first step's faults
#: (measured here: 0.3-0.5 s for a 64 MiB guest, most of it marking the pages to come).
DEFAULT_POSTCOPY_SWITCH_S = 0.05
#: A demand fault's stall without a calibration (p50 ~60 us, mean ~300 us measured here).
DEFAULT_FAULT_WAIT_S = 0.0003


@dataclass
class SimulationParams:
    """Knobs of one simulated migration (see the module docstring's timeline).

    Attributes:
        bandwidth_Bps: link rate, bytes/s.
        shaped: the link is a token bucket cap (``--bandwidth``): PrecopyStats gets
            ``bandwidth_limit_Bps`` and the estimated downtime uses min(measured, cap).
        burst_bytes: token bucket capacity; default transport's (10 ms of data, 4 KiB..4 MiB).
        data_pages: pages round 0 sends; default the trace's ``data_pages``.
        start_s: trace time at which the migration starts.
        setup_s, collect_s, pause_s, switchover_s, post_s: fixed costs (seconds).
        drain_s: before the pause, the migrator waits for the destination to place what it
            received (``timings_ms.drain_before_pause``, calibrated): the guest runs on (its
            writes join the final set) and the link idles (its token bucket refills).
        drain_per_page_s: the drain's cost per page of the last pre-copy round's last
            record (calibrated); the drain is ``drain_s`` + this x
            :func:`vmem.analysis.model.last_record_pages` of that round (the destination
            places a record once it has all of it).
        switchover_per_page_s: the switchover's cost per page of the final set beyond its
            wire time (calibrated); downtime = send + switchover_s + this x the final pages,
            counted up to :data:`vmem.analysis.model.SWITCH_BACKLOG_PAGES`.
        switchover_run_share: the part of a scattered page's placement cost that is per run
            of consecutive pages (calibrated by a placement probe; 0 counts every page of the
            backlog alike): a contiguous backlog (a sweep's) costs ``1 - this`` per page
            (:func:`vmem.analysis.model.switch_backlog_pages`).
        bandwidth_efficiency: the rate the copy path really achieves as a fraction of
            ``bandwidth_Bps`` (calibrated: :mod:`vmem.analysis.calibration`); the policy still
            sees ``bandwidth_Bps`` as the cap.
        blackout_gap_s: the longest guest gap after the resume other than the downtime
            (calibrated); the predicted blackout is ``max(downtime, this)``.
        postcopy: ``"off"``, ``"after-precopy"`` (hybrid: where pre-copy would stop-and-copy,
            switch to post-copy) or ``"pure"`` (no pre-copy round), as ``MigrationOptions``.
        postcopy_switch_s, postcopy_switch_per_page_s: post-copy downtime (pause
            acknowledged -> the destination guest's first step) is ``postcopy_switch_s +
            postcopy_switch_per_page_s * pages pending`` (calibrated from pure post-copy runs).
        push_hold_s: the post-copy push waits this long for the destination guest's first step.
        fault_wait_s: what one demand fault stalls the guest (fault -> page placed).
        rule: how a window cutting an interval counts its pages (``trace.WINDOW_RULES``).
        throttle_model: ``"dilate"`` (default: throttle t slows the trace clock to 1-t, as the guest runtime stops its virtual clock while throttled) or ``"subsample"`` (keep a random 1-t of the writes).
        loop: replay the trace from its start when the migration outlasts it; if False,
            pages after the end are taken as "none written".
        seed: seeds the sub-interval rule and the throttle subsampling.
    """

    bandwidth_Bps: float
    shaped: bool = True
    burst_bytes: int | None = None
    data_pages: int | None = None
    start_s: float = 0.0
    setup_s: float = DEFAULT_SETUP_S
    collect_s: float = DEFAULT_COLLECT_S
    pause_s: float = DEFAULT_PAUSE_S
    drain_s: float = 0.0
    drain_per_page_s: float = 0.0
    switchover_s: float = DEFAULT_SWITCHOVER_S
    switchover_per_page_s: float = 0.0
    switchover_run_share: float = 0.0
    post_s: float = DEFAULT_POST_S
    bandwidth_efficiency: float = 1.0
    blackout_gap_s: float = 0.0
    postcopy: str = "off"
    postcopy_switch_s: float = DEFAULT_POSTCOPY_SWITCH_S
    postcopy_switch_per_page_s: float = 0.0
    push_hold_s: float = 0.0
    fault_wait_s: float = DEFAULT_FAULT_WAIT_S
    rule: str = "poisson"
    throttle_model: str = "dilate"
    loop: bool = True
    seed: int = 0

    def validate(self) -> None:
        """Raises ConfigError naming the first bad parameter."""
        if not (isinstance(self.bandwidth_Bps, (int, float)) and math.isfinite(self.bandwidth_Bps) and self.bandwidth_Bps > 0):
            raise ConfigError("--bandwidth", f"must be a finite rate > 0, got {self.bandwidth_Bps!r}")
        for name in ("start_s", "setup_s", "collect_s", "pause_s", "drain_s", "drain_per_page_s", "switchover_s", "switchover_per_page_s",
                     "post_s", "blackout_gap_s",
                     "postcopy_switch_s", "postcopy_switch_per_page_s", "push_hold_s", "fault_wait_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(name, f"must be a finite number of seconds >= 0, got {v!r}")
        share = self.switchover_run_share
        if not (isinstance(share, (int, float)) and 0.0 <= share <= 1.0):
            raise ConfigError("switchover_run_share", f"must be a fraction in [0, 1], got {share!r}")
        e = self.bandwidth_efficiency
        if not (isinstance(e, (int, float)) and math.isfinite(e) and 0 < e <= 2):
            raise ConfigError("bandwidth_efficiency", f"must be a fraction of the link rate in (0, 2], got {e!r}")
        if self.postcopy not in POSTCOPY_SIM_MODES:
            raise ConfigError("--postcopy", f"must be one of {', '.join(POSTCOPY_SIM_MODES)}, got {self.postcopy!r}")
        if self.rule not in WINDOW_RULES:
            raise ConfigError("rule", f"must be one of {', '.join(WINDOW_RULES)}, got {self.rule!r}")
        if self.throttle_model not in THROTTLE_MODELS:
            raise ConfigError("throttle_model", f"must be one of {', '.join(THROTTLE_MODELS)}, got {self.throttle_model!r}")
        if self.burst_bytes is not None and (not isinstance(self.burst_bytes, int) or self.burst_bytes < 0):
            raise ConfigError("burst_bytes", f"must be an integer >= 0, got {self.burst_bytes!r}")

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Link:
    """The token bucket of transport.TokenBucket, in simulated time."""

    def __init__(self, rate_Bps: float, burst_bytes: int):
        self.rate = rate_Bps
        self.burst = float(burst_bytes)
        self.tokens = float(burst_bytes)

    def send(self, nbytes: int) -> float:
        """Seconds to send ``nbytes`` now."""
        self.tokens -= nbytes
        if self.tokens >= 0:
            return 0.0
        wait = -self.tokens / self.rate
        self.tokens = 0.0
        return wait

    def idle(self, seconds: float) -> None:
        self.tokens = min(self.burst, self.tokens + seconds * self.rate)


class _Replay:
    """Dirty pages of a trace over simulated time: looping, throttling, the window rule."""

    def __init__(self, trace: DirtyTrace, p: SimulationParams):
        self.trace = trace
        self.p = p
        self.duration = trace.duration_s
        self.pos = p.start_s                       # trace clock
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([p.seed & 0xFFFFFFFF, 0x5349])))
        self._all = None

    def advance(self, seconds: float, throttle: float) -> np.ndarray:
        """Pages written during the next ``seconds`` of real time (guest throttled by ``throttle``)."""
        dilate = self.p.throttle_model == "dilate"
        span = seconds * (1.0 - throttle) if dilate else seconds
        a, b = self.pos, self.pos + span
        self.pos = b
        pages = self._window(a, b)
        if throttle > 0 and not dilate and len(pages):
            pages = pages[self.rng.random(len(pages)) < 1.0 - throttle]
        return pages

    def skip(self, seconds: float) -> None:
        self.pos += seconds

    def _window(self, a: float, b: float) -> np.ndarray:
        d = self.duration
        if b <= a or d <= 0:
            return np.empty(0, dtype=np.int64)
        t = self.trace
        if not self.p.loop:
            return t.dirty_in(a, min(b, d), rule=self.p.rule, seed=self.p.seed) if a < d else np.empty(0, dtype=np.int64)
        if b - a >= d:
            if self._all is None:
                self._all = t.union()
            return self._all
        lap, a0 = divmod(a, d)
        b0 = b - lap * d
        # Each lap re-uses the trace; a different seed per lap keeps the sub-interval draws fresh.
        seed = self.p.seed + int(lap) * 7919
        if b0 <= d:
            return t.dirty_in(a0, b0, rule=self.p.rule, seed=seed)
        first = t.dirty_in(a0, d, rule=self.p.rule, seed=seed)
        second = t.dirty_in(0.0, b0 - d, rule=self.p.rule, seed=seed + 7919)
        return _union(first, second, t.npages)


class _TraceRounds:
    """The simulator's plug-in for the round engine (vmem.migration.rounds.RoundIO): a
    round's bytes go through the token bucket in simulated time, its dirty set is the
    trace's writes over the round and the collect."""

    def __init__(self, link: _Link, replay: _Replay, page_size: int, collect_s: float, elapsed_s: float):
        self.link = link
        self.replay = replay
        self.page_size = page_size
        self.collect_s = collect_s
        self.elapsed_s = elapsed_s  # migration time since start (the migrator's elapsed_s)

    def send_round(self, index: int, pages, throttle: float) -> RoundResult:
        # Round 0 sends a count of data pages; later rounds the last dirty set.
        n_send = len(pages) if isinstance(pages, np.ndarray) else int(pages)
        nbytes = wire_bytes(n_send, self.page_size) if n_send else 0
        send_s = self.link.send(nbytes)
        self.link.idle(self.collect_s)
        since_collect = send_s + self.collect_s
        dirty = self.replay.advance(since_collect, throttle)
        self.elapsed_s += since_collect
        return RoundResult(pages_sent=n_send, bytes_sent=nbytes, send_s=send_s, dirty=dirty, dirty_pages=len(dirty),
                           since_collect_s=since_collect, elapsed_s=self.elapsed_s, collect_s=self.collect_s)

    def set_throttle(self, level: float) -> None:
        pass  # the engine passes the throttle in force to send_round, which slows the replay


def _union(a: np.ndarray, b: np.ndarray, npages: int) -> np.ndarray:
    """Sorted union of two sorted page arrays: a bitmap when they are large, else a merge."""
    if (len(a) + len(b)) * 16 >= npages:
        mark = np.zeros(npages, dtype=bool)
        mark[a] = True
        mark[b] = True
        return np.flatnonzero(mark)
    return merge_pages(a, b)


def simulate(trace: DirtyTrace, policy=None, params: SimulationParams | None = None, **kwargs) -> MigrationReport:
    """Predict a migration of the traced guest under ``policy`` (default: Xen's).

    ``params`` or keyword arguments of :class:`SimulationParams` (``bandwidth_Bps`` is
    required).  Runs the migrator's own round loop (:func:`vmem.migration.rounds.run_precopy`),
    so round numbering, PrecopyStats and the safety cap are the migrator's; a policy that raises or returns garbage
    ends the run ``failed``, ABORT ends it ``aborted``; POSTCOPY (or ``postcopy="after-precopy"``) runs the
    post-copy phase (:mod:`vmem.analysis.simulate_postcopy`), refused (``failed``) with ``postcopy="off"``.

    Returns:
        A MigrationReport with ``tracker = "simulated"``, ``phase = "predicted"`` and the
        simulation's parameters in ``guest["prediction"]``.

    Raises:
        ConfigError: bad parameters.
    """
    if params is None:
        params = SimulationParams(**kwargs)
    elif kwargs:
        params = SimulationParams(**(params.as_dict() | kwargs))
    params.validate()
    policy = policy or XenDefaultPolicy()
    p = params
    B = float(p.bandwidth_Bps)
    page_size = int(trace.page_size)
    data_pages = trace.data_pages if p.data_pages is None else int(p.data_pages)
    if not 0 <= data_pages <= trace.npages:
        raise ConfigError("data_pages", f"must be in [0, {trace.npages}], got {data_pages}")
    if p.burst_bytes is not None:
        burst = p.burst_bytes
    elif p.shaped:
        from transport import default_burst_bytes

        burst = default_burst_bytes(B)
    else:
        burst = 0
    t_wall = time.perf_counter()

    r = MigrationReport()
    r.guest_pages = int(trace.npages)
    r.guest_size_bytes = int(trace.npages) * page_size
    r.workload = dict(trace.workload)
    r.policy = getattr(policy, "describe", lambda: {"name": getattr(policy, "name", repr(policy))})()
    r.bandwidth_limit_bps = B * 8 if p.shaped else None
    r.tracker = "simulated"
    r.mode = {"off": "precopy", "after-precopy": "hybrid", "pure": "postcopy"}[p.postcopy]
    link = _Link(B * p.bandwidth_efficiency, burst)
    replay = _Replay(trace, p)
    replay.skip(p.setup_s)
    rounds = _TraceRounds(link, replay, page_size, p.collect_s, elapsed_s=p.setup_s)
    throttle = 0.0
    if p.postcopy == "pure":  # no pre-copy round: pause, switch, pull every data page
        index, dirty, elapsed = -1, np.arange(data_pages, dtype=np.int64), p.setup_s
        r.reason = "pure post-copy"
    else:
        r.phase = "precopy"
        try:
            end = run_precopy(rounds, policy, data_pages, guest_pages=int(trace.npages), page_size=page_size,
                              bandwidth_limit_Bps=B if p.shaped else None, on_round=r.rounds.append,
                              postcopy_after_precopy=p.postcopy == "after-precopy",
                              postcopy_refusal=None if p.postcopy != "off" else
                              "policy asked for POSTCOPY, which this migration does not allow (no --postcopy-after-precopy); aborting")
        except PolicyError as err:
            r.outcome, r.reason, r.source_guest_state = "failed", str(err), "running"
            return _finish(r, trace, p, policy, rounds.elapsed_s, t_wall)
        if end.decision == Decision.ABORT:
            r.outcome, r.reason, r.phase = "aborted", end.reason or "policy decided to abort", "aborted"
            r.source_guest_state = "running"
            return _finish(r, trace, p, policy, rounds.elapsed_s, t_wall)
        r.reason = end.reason
        dirty, index, throttle, elapsed = end.dirty, end.rounds - 1, end.throttle, rounds.elapsed_s
        if end.decision == Decision.POSTCOPY:
            r.mode = "hybrid"

    # The migrator waits for the destination to catch up (drain; none before a pure
    # post-copy), then the guest runs until it acknowledges the pause and is frozen.  The
    # link idles meanwhile: its bucket refills, and a large final set goes out faster.
    drain_s = _drain_s(p, r.rounds) if index >= 0 else 0.0
    wait_s = drain_s + p.pause_s
    late = replay.advance(wait_s, throttle)
    pause_trace_s = replay.pos  # where in the guest's trace the pause falls (phase-aware costs)
    link.idle(wait_s)
    elapsed += wait_s
    final = _union(dirty, late, trace.npages) if len(late) else dirty
    final_n = len(final)
    if r.mode != "precopy":
        return _finish_postcopy(r, trace, p, policy, replay, link, final, index, throttle, elapsed, t_wall, drain_s,
                                pause_trace_s)
    r.phase = "stop-and-copy"
    link.idle(p.collect_s)  # the final collect, paused, before the send: the bucket refills
    nbytes = wire_bytes(final_n, page_size) if final_n else 0
    send_s = link.send(nbytes + TRAILER_BYTES)
    r.rounds.append(RoundStats(index=index + 1, kind="stop-and-copy", pages_sent=final_n, bytes_sent=nbytes,
                               duration_s=round(send_s, 6),
                               bandwidth_bps=round(nbytes * 8 / send_s, 1) if send_s > 0 else 0.0))
    # The switchover's fixed part plus its cost per page of the final set, up to the bounded
    # backlog the destination has left when the send ends (calibrated: an idle guest's
    # near-empty set pays the fixed part only; vmem.analysis.calibration.SWITCH_BACKLOG_PAGES),
    # a contiguous backlog less per page than a scattered one (one pwrite per run).
    switchover_s = p.switchover_s + p.switchover_per_page_s * switch_backlog_pages(final_n, final, p.switchover_run_share)
    downtime_s = send_s + switchover_s
    elapsed += downtime_s
    r.downtime_ms = round(downtime_s * 1e3, 3)
    r.blackout_ms = round(max(downtime_s, p.blackout_gap_s) * 1e3, 3)
    r.timings_ms = {
        "setup": round(p.setup_s * 1e3, 3),
        "drain_before_pause": round(drain_s * 1e3, 3),
        "pause_latency": round(p.pause_s * 1e3, 3),
        "final_collect": round(p.collect_s * 1e3, 3),
        "stop_and_copy_send": round(send_s * 1e3, 3),
        "switchover_overhead": round(switchover_s * 1e3, 3),
    }
    r.outcome = "completed"
    r.phase = "predicted"
    r.source_guest_state = "exited"
    return _finish(r, trace, p, policy, elapsed + p.post_s, t_wall, pause_trace_s=pause_trace_s)


def _drain_s(p: SimulationParams, rounds) -> float:
    """The wait before the pause: its fixed part plus its cost per page of the last record of
    the last pre-copy round in ``rounds``."""
    last = [x for x in rounds if x.kind == "precopy"]
    return p.drain_s + p.drain_per_page_s * last_record_pages(last[-1].pages_sent if last else 0)


def _finish_postcopy(r: MigrationReport, trace: DirtyTrace, p: SimulationParams, policy, replay, link, pending,
                     index: int, throttle: float, elapsed: float, t_wall: float, drain_s: float,
                     pause_trace_s: float | None = None) -> MigrationReport:
    """The switch and the post-copy phase (:mod:`vmem.analysis.simulate_postcopy`); ``drain_s``
    the wait before the pause already simulated (0 before a pure post-copy)."""
    from vmem.analysis.simulate_postcopy import simulate_postcopy

    r.phase = "postcopy"
    pending = np.asarray(pending, dtype=np.int64)
    switch_s = p.postcopy_switch_s + p.postcopy_switch_per_page_s * len(pending)
    pc = simulate_postcopy(replay, pending, rate_Bps=link.rate, page_size=int(trace.page_size),
                           switch_s=switch_s, push_hold_s=p.push_hold_s, fault_wait_s=p.fault_wait_s,
                           throttle=throttle, catch_up_s=switch_s + p.pause_s)
    complete_s = max(pc["complete_s"], switch_s)
    r.rounds.append(RoundStats(index=index + 1, kind="postcopy", pages_sent=pc["pages_pending"],
                               bytes_sent=pc["bytes_sent"], duration_s=round(pc["push_s"], 6),
                               bandwidth_bps=round(pc["bytes_sent"] * 8 / pc["push_s"], 1) if pc["push_s"] > 0 else 0.0,
                               decision="complete", reason="every page sent"))
    r.downtime_ms = round(switch_s * 1e3, 3)
    r.blackout_ms = round(max(switch_s, p.blackout_gap_s) * 1e3, 3)
    r.postcopy = {"mode": r.mode, "pages_pending": pc["pages_pending"], "faults": pc["faults"],
                  "pages_demanded": pc["pages_demanded"], "pages_pushed": pc["pages_pushed"],
                  "complete_s": round(complete_s, 6), "push_s": round(pc["push_s"], 6),
                  "blocktime_ms": round(pc["blocked_s"] * 1e3, 3)}
    r.timings_ms = {"setup": round(p.setup_s * 1e3, 3),
                    # a hybrid drains before its pause as stop-and-copy does; a pure post-copy does not
                    "drain_before_pause": round(drain_s * 1e3, 3),
                    "pause_latency": round(p.pause_s * 1e3, 3),
                    "postcopy_switch": round(switch_s * 1e3, 3), "push_held_for_restart": round(p.push_hold_s * 1e3, 3),
                    "pause_to_all_placed": round((p.pause_s + complete_s) * 1e3, 3)}
    r.outcome = "completed"
    r.phase = "predicted"
    r.source_guest_state = "exited"
    return _finish(r, trace, p, policy, elapsed + complete_s + p.post_s, t_wall, pause_trace_s=pause_trace_s)


def _finish(r: MigrationReport, trace: DirtyTrace, p: SimulationParams, policy, total_s: float, t_wall: float,
            *, pause_trace_s: float | None = None) -> MigrationReport:
    r.total_time_s = round(total_s, 6)
    if r.outcome == "completed":  # the prediction has no observe window: QMP's total-time
        r.migration_time_s = r.total_time_s
    r.pages_sent = sum(x.pages_sent for x in r.rounds)
    r.bytes_sent = _HEADER_BYTES + sum(x.bytes_sent for x in r.rounds) + (TRAILER_BYTES if r.outcome == "completed" else 0)
    if r.phase not in ("predicted", "aborted"):
        r.phase = r.phase or "precopy"
    r.guest["prediction"] = {
        "simulator": "vmem.analysis.simulate",
        "params": p.as_dict(),
        "trace": {"npages": int(trace.npages), "duration_s": trace.duration_s, "interval_s": trace.interval_s,
                  "intervals": trace.n_intervals, "workload": trace.workload},
        "wall_ms": round((time.perf_counter() - t_wall) * 1e3, 3),
    }
    if pause_trace_s is not None:
        # the trace clock at the pause (not wrapped: a looping replay counts on past the end)
        r.guest["prediction"]["pause_trace_s"] = round(float(pause_trace_s), 6)
    return r


def transfer_time_s(report) -> float:
    """Pre-copy rounds (send + collect) plus downtime: the part of ``total_time_s`` the
    simulator predicts without fixed setup/verification costs.  Works on measured and
    predicted reports alike (dicts or MigrationReport)."""
    d = report.to_dict() if hasattr(report, "to_dict") else report
    rounds = d.get("rounds") or []
    pre = sum(float(x.get("duration_s") or 0) + float(x.get("collect_ms") or 0) / 1e3
              for x in rounds if x.get("kind", "precopy") == "precopy")
    return pre + float(d.get("downtime_ms") or 0) / 1e3


def policy_from_description(desc: dict):
    """Rebuild a built-in policy from a report's ``policy`` object (``describe()``).

    Raises:
        ConfigError: unknown policy name or parameters it does not take.
    """
    from vmem.migration import policy as pol

    name = desc.get("name", "xen")
    options = getattr(pol, "POLICY_OPTIONS", {}).get(name)
    if options is None:
        kw = {k: desc[k] for k in ("precopy_iterations", "precopy_threshold") if desc.get(k) is not None}
        return pol.make_policy(name, **kw)
    dests = {o.dest for o in options}
    back = {"iterations": "precopy_iterations", "threshold": "precopy_threshold", "bandwidth_Bps": "link_bandwidth_Bps"}
    kw = {}
    for k, v in desc.items():
        k = k if k in dests else back.get(k, k)
        if k in dests and v is not None:
            kw[k] = v
    return pol.make_policy(name, **kw)


def alignment_from_report(trace: DirtyTrace, measured: dict) -> dict:
    """Where a measured migration sat on the trace's timeline: ``{start_s, setup_s}`` (or less).

    Profile and migration of the same workload started at different moments of the
    guest's life; for a workload whose behaviour changes over time (``phased``) that
    matters.  The guest's virtual clock (which stops only while paused or throttled) is in
    both: the trace records it when tracking began (``meta["vclock0_s"]``), the report at
    the migration's start (``guest.source_before.vclock_s``) and at the pause
    (``guest.source_at_pause.vclock_s``).  Then

        start_s = vclock(migration start) - vclock0
        setup_s = vclock(pause) - vclock(start) - sum(rounds' send + collect) - pause latency

    Only the timeline is taken from the measured run, never its dirty counts.  Values
    outside plausible ranges (an unpaced workload publishes its clock rarely) are dropped.
    """
    out: dict = {}
    v0 = trace.meta.get("vclock0_s")
    g = measured.get("guest") or {}
    before = (g.get("source_before") or {}).get("vclock_s")
    at_pause = (g.get("source_at_pause") or {}).get("vclock_s")
    if not isinstance(v0, (int, float)) or not isinstance(before, (int, float)):
        return out
    start = float(before) - float(v0)
    if -1.0 <= start <= 3600.0:
        out["start_s"] = max(0.0, start)
    if isinstance(at_pause, (int, float)) and measured.get("outcome") == "completed":
        rounds = [x for x in measured.get("rounds") or [] if x.get("kind", "precopy") == "precopy"]
        busy = sum(float(x.get("duration_s") or 0) + float(x.get("collect_ms") or 0) / 1e3 for x in rounds)
        pause = float((measured.get("timings_ms") or {}).get("pause_latency") or 0) / 1e3
        setup = float(at_pause) - float(before) - busy - pause
        if 0.0 <= setup <= 60.0:
            out["setup_s"] = setup
    return out


def predict(trace, policy=None, bandwidth_Bps: float | None = None, *, compare_report: dict | None = None,
            align: bool = False, calibration=None, load_factor: float = 1.0,
            **params) -> tuple[MigrationReport, list[dict] | None]:
    """Predict a migration from a trace (path or DirtyTrace); optionally compare with a real report.

    Args:
        trace: a :class:`DirtyTrace` or the path of a saved one.
        policy: a policy callable; default: the one described in ``compare_report``, else Xen's.
        bandwidth_Bps: link rate; default: ``compare_report``'s ``bandwidth_limit_bps`` / 8.
        compare_report: a measured report (``MigrationReport.to_dict()`` / its JSON).
        align: with ``compare_report``, take the migration's start and setup time from it
            (:func:`alignment_from_report`) unless ``params`` give them -- an explanation of
            that run, not a prediction; off by default.
        calibration: a :class:`vmem.analysis.calibration.Calibration`: the host's measured
            fixed costs and copy rate (their medians) replace the constant defaults, the
            CPU-bound ones scaled by ``load_factor`` (``Calibration.load_factor()``: how much
            busier the host is now than when calibrated).
        params: further :class:`SimulationParams` fields (they override the calibration).

    Returns:
        ``(predicted_report, comparison_rows or None)`` -- see :func:`compare_reports`.

    Raises:
        ConfigError: no bandwidth known, or bad parameters.
        TraceError: the trace file is bad.
    """
    if isinstance(trace, str):
        trace = DirtyTrace.load(trace)
    if bandwidth_Bps is None and compare_report and compare_report.get("bandwidth_limit_bps"):
        bandwidth_Bps = float(compare_report["bandwidth_limit_bps"]) / 8
    if bandwidth_Bps is None:
        raise ConfigError("--bandwidth", "required (the rate of the link to predict for, e.g. 1Gbit)")
    if policy is None and compare_report and compare_report.get("policy"):
        policy = policy_from_description(compare_report["policy"])
    given = dict(params)
    if calibration is not None:
        from vmem.analysis.calibration import mode_for, trace_dirty_rate, trace_dirty_rate_before

        mode = mode_for(params.get("postcopy"))
        rate = trace_dirty_rate(trace)
        params = calibration.point_params(int(trace.npages), bandwidth_Bps, mode=mode, load_factor=load_factor,
                                          dirty_pages_per_s=rate) | given
    alignment = {}
    if compare_report is not None and align:
        alignment = {k: v for k, v in alignment_from_report(trace, compare_report).items() if k not in params}
        params = params | alignment
    report = simulate(trace, policy, bandwidth_Bps=bandwidth_Bps, **params)
    if calibration is not None:
        # Phase-aware costs (vmem.analysis.calibration, "Phases"): the costs of the guest's rate
        # in the second before the pause this first simulation found, when that differs.
        pause = report.guest["prediction"].get("pause_trace_s")
        pause_rate = trace_dirty_rate_before(trace, pause) if pause is not None else rate
        if calibration.busy_weight(pause_rate) != calibration.busy_weight(rate):
            params = calibration.point_params(int(trace.npages), bandwidth_Bps, mode=mode, load_factor=load_factor,
                                              dirty_pages_per_s=pause_rate) | given | alignment
            report = simulate(trace, policy, bandwidth_Bps=bandwidth_Bps, **params)
        report.guest["prediction"]["calibration"] = calibration.describe()
        # how much of the busy calibration guest's costs (vs the idle one's) this guest got
        report.guest["prediction"]["calibration_busy_weight"] = round(calibration.busy_weight(pause_rate), 3)
        report.guest["prediction"]["pause_dirty_pages_per_s"] = round(pause_rate, 1)
    if alignment:
        report.guest["prediction"]["alignment"] = alignment
    rows = compare_reports(report, compare_report) if compare_report is not None else None
    return report, rows


def _as_dict(report) -> dict:
    return report.to_dict() if hasattr(report, "to_dict") else dict(report)


def compare_reports(predicted, measured) -> list[dict]:
    """Predicted vs measured, metric by metric: ``{metric, predicted, measured, error_pct}``.

    ``error_pct = (predicted - measured) / measured * 100`` (None when measured is 0).
    "pages sent after round 0" is the part of "pages sent" that is a forecast (round 0 sends
    every page with data in both, so the total's error is diluted by it).
    ``transfer_time_s`` (pre-copy rounds + collects + downtime, see :func:`transfer_time_s`)
    is the time the simulator models; ``total_time_s`` also holds the fixed setup and the
    measured run's verification and observation, which a prediction only guesses.
    """
    p, m = _as_dict(predicted), _as_dict(measured)

    def precopy_rounds(d):
        return sum(1 for x in d.get("rounds") or [] if x.get("kind", "precopy") == "precopy")

    def after_round0(d):  # round 0 sends all RAM in both: the rounds after it are the forecast
        rounds = d.get("rounds") or []
        return sum(x.get("pages_sent") or 0 for x in rounds[1:]) if rounds else None

    def final_pages(d):
        sc = [x for x in d.get("rounds") or [] if x.get("kind") == "stop-and-copy"]
        return sc[-1]["pages_sent"] if sc else None

    metrics = [
        ("outcome", p.get("outcome"), m.get("outcome")),
        ("precopy rounds", precopy_rounds(p), precopy_rounds(m)),
        ("pages sent", p.get("pages_sent"), m.get("pages_sent")),
        ("pages sent after round 0", after_round0(p), after_round0(m)),
        ("stop-and-copy pages", final_pages(p), final_pages(m)),
        ("transfer time s", round(transfer_time_s(p), 4), round(transfer_time_s(m), 4)),
        ("migration time s", p.get("migration_time_s"), m.get("migration_time_s")),
        ("total time s", p.get("total_time_s"), m.get("total_time_s")),
        ("downtime ms", p.get("downtime_ms"), m.get("downtime_ms")),
        ("blackout ms", p.get("blackout_ms"), m.get("blackout_ms")),
    ]
    if p.get("postcopy") or m.get("postcopy"):
        pp, mp = p.get("postcopy") or {}, m.get("postcopy") or {}
        metrics += [("post-copy pages pending", pp.get("pages_pending"), mp.get("pages_pending")),
                    ("post-copy faults", pp.get("faults"), mp.get("faults")),
                    ("post-copy pages pushed", pp.get("pages_pushed"), mp.get("pages_pushed"))]
    rows = []
    for name, a, b in metrics:
        err = None
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and b:
            err = round((a - b) / b * 100, 2)
        rows.append({"metric": name, "predicted": a, "measured": b, "error_pct": err})
    return rows


def print_prediction(report: MigrationReport, rows: list[dict] | None = None, measured: dict | None = None, console=None) -> None:
    """Rounds and totals of a prediction; with ``rows``, predicted vs measured side by side."""
    from rich.table import Table

    from vmem.ram import format_bytes

    console = console or wide_console()
    r = report
    pred = r.guest.get("prediction", {})
    tr = pred.get("trace", {})
    wl = r.workload or {}
    bw = (r.bandwidth_limit_bps or 0) / 8
    console.print(f"[bold]predicted[/bold] ({pred.get('simulator', 'simulator')}, {pred.get('wall_ms', 0):.1f} ms): "
                  f"{wl.get('workload', '?')} {wl.get('params') or ''}, {format_bytes(r.guest_size_bytes)}, "
                  f"trace {tr.get('duration_s', 0):g} s / {tr.get('interval_s', 0) * 1e3:g} ms intervals, "
                  f"link {bw / 1e6:,.1f} MB/s, policy {r.policy.get('name', '?')}")
    mrounds = (measured or {}).get("rounds") or []
    t = Table(title="rounds: predicted" + (" (measured)" if mrounds else ""))
    for c in ("round", "kind", "pages sent", "duration", "dirty at end", "est. downtime", "decision"):
        t.add_column(c, justify="left" if c in ("kind", "decision") else "right", overflow="fold")

    def pair(a, b, fmt):
        return fmt(a) if b is None else f"{fmt(a)} ({fmt(b)})"

    for i, x in enumerate(r.rounds):
        mx = mrounds[i] if i < len(mrounds) else None
        g = (lambda k: mx.get(k)) if mx else (lambda k: None)
        t.add_row(str(x.index), x.kind,
                  pair(x.pages_sent, g("pages_sent"), lambda v: f"{v:,}"),
                  pair(x.duration_s, g("duration_s"), lambda v: f"{v * 1e3:,.1f} ms"),
                  pair(x.dirty_pages, g("dirty_pages"), lambda v: f"{v:,}") if x.kind == "precopy" else "-",
                  f"{x.est_downtime_ms:,.1f} ms" if x.est_downtime_ms is not None else "-",
                  x.decision + (f": {x.reason}" if x.reason else ""))
    console.print(t)
    for extra in mrounds[len(r.rounds):]:
        console.print(f"  measured round {extra.get('index')} ({extra.get('kind')}): {extra.get('pages_sent'):,} pages — no predicted counterpart")
    if rows is None:
        t = Table(title="predicted totals", show_header=False)
        t.add_column("what", style="bold")
        t.add_column("value", justify="right")
        t.add_row("outcome", f"{r.outcome}: {r.reason}")
        t.add_row("pre-copy rounds", str(sum(1 for x in r.rounds if x.kind == "precopy")))
        t.add_row("pages sent", f"{r.pages_sent:,} ({r.pages_sent / max(r.guest_pages, 1):.2f}x guest RAM)")
        t.add_row("bytes sent", format_bytes(r.bytes_sent))
        t.add_row("transfer time (rounds + downtime)", f"{transfer_time_s(r):.3f} s")
        t.add_row("migration time (setup to the source's release)", f"{r.total_time_s:.3f} s")
        t.add_row("downtime", f"{r.downtime_ms:.2f} ms" if r.downtime_ms is not None else "-")
        t.add_row("blackout", f"{r.blackout_ms:.2f} ms" if r.blackout_ms is not None else "-")
        if r.postcopy:
            pc = r.postcopy
            t.add_row("post-copy", f"{pc['pages_pending']:,} pages pending: {pc['pages_pushed']:,} pushed, "
                                   f"{pc['pages_demanded']:,} demanded (faults), complete {pc['complete_s']:.3f} s "
                                   f"after the switch, guest blocked {pc['blocktime_ms']:.1f} ms")
        console.print(t)
        return
    aligned = bool(pred.get("alignment"))
    t = Table(title="aligned to the measured run (an explanation, not a prediction) vs measured" if aligned
              else "predicted in advance (from the profile alone) vs measured")
    for c in ("metric", "predicted", "measured", "error"):
        t.add_column(c, justify="left" if c == "metric" else "right")
    for row in rows:
        a, b, e = row["predicted"], row["measured"], row["error_pct"]

        def f(v):
            if v is None:
                return "-"
            if isinstance(v, float):
                return f"{v:,.3f}"
            if isinstance(v, int):
                return f"{v:,}"
            return str(v)

        t.add_row(row["metric"], f(a), f(b), "-" if e is None else f"{e:+.1f} %")
    t.caption = "error = (predicted - measured) / measured; transfer time = pre-copy rounds + collects + downtime"
    console.print(t)


def print_forecast(fc: dict, measured: dict | None = None, console=None) -> None:
    """Render :func:`vmem.analysis.forecast.forecast`'s result (and where a measured run fell)."""
    from rich.table import Table

    from vmem.analysis.forecast import RANGE_PCT, inside, range_label

    console = console or wide_console()
    lo_q, hi_q = RANGE_PCT
    rng = f"p{lo_q}-p{hi_q}"
    t = Table(title=f"forecast over {len(fc['starts'])} start offsets (median, {range_label()}, p10-p90, min-max)")
    for c in ("metric", "median", rng, "p10-p90", "min-max") + (("measured", f"in {rng}") if measured else ()):
        t.add_column(c, justify="left" if c == "metric" else "right")
    got = {}
    if measured:
        got = {"downtime_ms": measured.get("downtime_ms"), "transfer_time_s": transfer_time_s(measured),
               "blackout_ms": measured.get("blackout_ms"), "migration_time_s": measured.get("migration_time_s"),
               "postcopy_faults": (measured.get("postcopy") or {}).get("faults"),
               "pages_pushed": (measured.get("postcopy") or {}).get("pages_pushed"),
               "pages_sent": measured.get("pages_sent"),
               "precopy_rounds": sum(1 for x in measured.get("rounds") or [] if x.get("kind", "precopy") == "precopy")}
    for name, m in fc["metrics"].items():
        row = [name, f"{m['median']:,.3f}", f"{m[f'p{lo_q}']:,.3f}-{m[f'p{hi_q}']:,.3f}",
               f"{m['p10']:,.3f}-{m['p90']:,.3f}", f"{m['min']:,.3f}-{m['max']:,.3f}"]
        if measured:
            v = got.get(name)
            ok = inside(m, v)
            row += ["-" if v is None else f"{float(v):,.3f}", "-" if ok is None else ("yes" if ok else "no")]
        t.add_row(*row)
    console.print(t)
    console.print(fc["advice"])


def wide_console():
    """A rich Console; 120 columns when output is not a terminal (tables stay readable in files)."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=120)
