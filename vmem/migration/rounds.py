"""The precopy round loop, written once: the migrator, the simulator and the model run it.

One loop (:func:`run_precopy`) owns everything the three have in common, so a prediction
can never drift from what the migrator decides:

* round numbering (libxc's: after round ``i`` the policy sees ``iteration = i + 1``);
* :class:`~vmem.migration.policy.PrecopyStats` (totals, histories, bandwidth, dirty rate,
  estimated downtime with :func:`~vmem.migration.policy.planning_bandwidth_Bps`);
* the policy call, the safety cap (:data:`SAFETY_MAX_ROUNDS`), the throttle in force;
* the pages to send next round (the set the last round found dirty);
* the end of precopy: STOP_AND_COPY, POSTCOPY (also what ``after-precopy`` makes of a
  stop-and-copy) or ABORT, or a :class:`~vmem.errors.PolicyError`.

What differs plugs in as a :class:`RoundIO`: how a round's pages are sent and timed, and
how its dirty set is obtained::

    migrator   (vmem.migration.source)   send PAGE_DATA records, tracker.collect(), wall clock
    simulator  (vmem.analysis.simulate)  token bucket in simulated time, trace replay
    model      (vmem.analysis.model)     a_i * Pw / B, min(D t, W) (dirty sets are counts)

The loop handles opaque "page sets" (a page array, a run array, or a count for the model)
and never touches a page itself: the hot path stays in the plug-ins' numpy code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from vmem.errors import PolicyError
from vmem.migration.policy import (
    MAX_THROTTLE,
    Decision,
    PrecopyStats,
    Verdict,
    call_policy,
    estimate_downtime_s,
    planning_bandwidth_Bps,
)
from vmem.migration.report import RoundStats

__all__ = ["SAFETY_MAX_ROUNDS", "RoundResult", "RoundIO", "PrecopyEnd", "run_precopy"]

#: Rounds after which we stop-and-copy whatever a policy says (a policy bug must not loop forever).
SAFETY_MAX_ROUNDS = 1000


@dataclass
class RoundResult:
    """What one round did, as its plug-in measured it.

    Attributes:
        pages_sent: pages the round sent.
        bytes_sent: bytes it put on the wire (framing included).
        send_s: seconds the sending took (PrecopyStats.round_s).
        dirty: the pages dirtied meanwhile, i.e. what the next round sends (opaque to the
            loop: a sorted page array, or a count for the analytical model).
        dirty_pages: how many pages ``dirty`` holds.
        since_collect_s: seconds over which ``dirty`` was gathered (since the previous
            collect): the dirty rate's denominator.
        elapsed_s: seconds since the migration started, at the collect.
        collect_s: seconds the collect itself took.
        guest_stopped_s: seconds the guest's process was stopped for the collect
            (``MigrationOptions.collect_stop``), else 0.
    """

    pages_sent: float
    bytes_sent: float
    send_s: float
    dirty: Any
    dirty_pages: float
    since_collect_s: float
    elapsed_s: float
    collect_s: float = 0.0
    guest_stopped_s: float = 0.0


class RoundIO(Protocol):
    """What a round engine user plugs in."""

    def send_round(self, index: int, pages: Any, throttle: float) -> RoundResult:
        """Send ``pages`` (round ``index``) with the guest throttled by ``throttle``, then
        collect what the guest dirtied since the previous collect."""

    def set_throttle(self, level: float) -> None:
        """The policy changed the throttle: apply ``level`` from the next round on."""


@dataclass
class PrecopyEnd:
    """How precopy ended.

    Attributes:
        decision: STOP_AND_COPY, POSTCOPY or ABORT (never CONTINUE).
        reason: the policy's reason (or the safety cap's).
        rounds: precopy rounds run; the last one's index is ``rounds - 1``.
        dirty: the last round's dirty set (what the stop-and-copy or post-copy must send).
        dirty_history: dirty page counts after every round.
        throttle: the throttle in force at the end.
        total_written: pages sent by all rounds.
        elapsed_s: the last round's ``elapsed_s``.
    """

    decision: Decision
    reason: str
    rounds: int
    dirty: Any
    dirty_history: tuple
    throttle: float
    total_written: float
    elapsed_s: float


def run_precopy(io: RoundIO, policy, first_pages: Any, *, guest_pages: int, page_size: int,
                bandwidth_limit_Bps: float | None | Callable[[], float | None], postcopy_after_precopy: bool = False,
                postcopy_refusal: str | None = None, on_round: Callable[[RoundStats], None] | None = None,
                max_rounds: int = SAFETY_MAX_ROUNDS) -> PrecopyEnd:
    """Run precopy rounds until the policy (or the safety cap) ends them.

    Args:
        io: the plug-in that sends rounds and collects dirty sets.
        policy: any policy callable (see :mod:`vmem.migration.policy`).
        first_pages: what round 0 sends (every page holding data).
        guest_pages, page_size: of the guest.
        bandwidth_limit_Bps: the configured link cap, or None (PrecopyStats and the
            estimated downtime); or a callable returning it, read every round (a cap
            changed while the migration runs: ``migrate-setspeed``).
        postcopy_after_precopy: a STOP_AND_COPY becomes a POSTCOPY (hybrid migration).
        postcopy_refusal: if given, a POSTCOPY raises PolicyError with this message
            (post-copy not enabled, or not possible).
        on_round: called with each round's RoundStats (its decision filled in) before
            the decision is acted on.
        max_rounds: the safety cap: after this many rounds a CONTINUE is a STOP_AND_COPY.

    Raises:
        PolicyError: the policy raised or returned garbage, or asked for a refused POSTCOPY.
    """
    history: list = []
    rate_history: list = []
    total_written = 0
    throttle = 0.0
    pages = first_pages
    index = 0
    while True:
        res = io.send_round(index, pages, throttle)
        total_written += res.pages_sent
        bw_Bps = res.bytes_sent / res.send_s if res.send_s > 0 else 0.0
        rate_pps = res.dirty_pages / res.since_collect_s if res.since_collect_s > 0 else 0.0
        history.append(res.dirty_pages)
        rate_history.append(rate_pps)
        limit_Bps = bandwidth_limit_Bps() if callable(bandwidth_limit_Bps) else bandwidth_limit_Bps
        est = estimate_downtime_s(res.dirty_pages, planning_bandwidth_Bps(bw_Bps, limit_Bps), page_size)
        rs = RoundStats(
            index=index, pages_sent=res.pages_sent, bytes_sent=res.bytes_sent, duration_s=round(res.send_s, 6),
            dirty_pages=res.dirty_pages, dirty_rate_pps=round(rate_pps, 1), bandwidth_bps=round(bw_Bps * 8, 1),
            collect_ms=round(res.collect_s * 1e3, 3), guest_stopped_ms=round(res.guest_stopped_s * 1e3, 3),
            throttle=throttle,
            est_downtime_ms=round(est * 1e3, 3) if est != float("inf") else None,
        )
        stats = PrecopyStats(
            iteration=index + 1, total_written=total_written, dirty_count=res.dirty_pages, guest_pages=guest_pages,
            elapsed_s=res.elapsed_s, round_s=res.send_s, bandwidth_Bps=bw_Bps, dirty_rate_pps=rate_pps,
            dirty_history=tuple(history), est_downtime_s=est, bandwidth_limit_Bps=limit_Bps,
            throttle=throttle, dirty_rate_history=tuple(rate_history), page_size=page_size,
        )
        verdict = call_policy(policy, stats)
        if verdict.decision == Decision.CONTINUE and index + 1 >= max_rounds:
            verdict = Verdict(Decision.STOP_AND_COPY, f"safety cap of {max_rounds} rounds")
        rs.decision, rs.reason = verdict.decision.value, verdict.reason
        if on_round is not None:
            on_round(rs)
        if verdict.decision == Decision.CONTINUE:
            if verdict.throttle is not None:
                level = min(max(float(verdict.throttle), 0.0), MAX_THROTTLE)
                if level != throttle:
                    throttle = level
                    io.set_throttle(level)
            pages = res.dirty
            index += 1
            continue
        decision = verdict.decision
        if decision == Decision.STOP_AND_COPY and postcopy_after_precopy:
            decision = Decision.POSTCOPY
        if decision == Decision.POSTCOPY and postcopy_refusal is not None:
            raise PolicyError(postcopy_refusal)
        return PrecopyEnd(decision=decision, reason=verdict.reason, rounds=index + 1, dirty=res.dirty,
                          dirty_history=tuple(history), throttle=throttle, total_written=total_written,
                          elapsed_s=res.elapsed_s)
