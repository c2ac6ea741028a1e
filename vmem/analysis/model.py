"""The analytical pre-copy model: rounds as a geometric series that levels at the WWS.

Notation (units in the names in code):

    V   pages sent by round 0 (the guest's data pages)
    D   dirty rate, pages per second (distinct pages, measured at the profile's interval)
    W   writable working set, pages: no window dirties more than W distinct pages
    B   link bandwidth, bytes per second
    Pw  bytes on the wire per page: page_size + 8 (pfn) + 16 per 1024-page record
    c   per-round fixed cost, seconds (the dirty tracker's collect); the guest runs meanwhile
    o   switchover overhead, seconds: downtime that is not sending pages (pause, final
        collect, END, restore, first step)

Round ``i`` sends ``a_i`` pages in ``t_i = a_i * Pw / B`` seconds; meanwhile (plus ``c``)
the guest dirties ``a_{i+1} = min(D * (t_i + c), W)`` pages, which the next round sends::

    a_0 = V
    a_{i+1} = f(a_i) = min(g(a_i), W),   g(x) = r*x + D*c,   r = D * Pw / B

``r`` is the ratio of the dirty rate to the link rate in pages.  ``g`` is affine with
fixed point ``a* = D*c / (1 - r)`` (``a* = 0`` when ``c = 0``) and
``g^k(x) = a* + r^k (x - a*)`` for ``r != 1`` (``x + k*D*c`` for ``r = 1``).

Closed form.  ``f`` is increasing, so two cases cover everything:

* **levelling** (``g(W) > W``, i.e. ``W < a*``, always the case when ``r > 1``): since
  ``V >= W``, ``a_1 = W`` and every later round finds ``W`` dirty pages again: pre-copy
  never gets below the working set; it only ends by an iteration cap (or abort).
* **converging** (``g(W) <= W``): ``a_1 = min(g(V), W) <= W`` and then
  ``g(a_i) <= g(W) <= W``, so the cap never binds again and
  ``a_i = g^(i-1)(a_1) = a* + r^(i-1) (a_1 - a*)`` for ``i >= 1`` -- a geometric series
  of ratio ``r`` towards ``a*``.  It converges iff ``r < 1``.

Stopping (libxc numbering): after round ``i`` the policy sees ``iteration = i+1`` and
``dirty_count = a_{i+1}``; a threshold policy stops at the first ``k >= 1`` with
``a_k <= T`` (Xen: ``a_k < 50``) or at ``k = N`` iterations.  In the converging case with
``r < 1`` and ``a_1 > T > a*``::

    k = 1 + ceil( log((T - a*) / (a_1 - a*)) / log r )

and ``T <= a*`` is never reached (the series approaches ``a*`` from above).  With ``n``
pre-copy rounds the stop-and-copy sends ``a_n`` pages, and::

    pages sent      = V + sum_{i=1}^{n-1} a_i + a_n
    sum_{i=1}^{n-1} a_i = (n-1) a* + (a_1 - a*) (1 - r^(n-1)) / (1 - r)     (converging, r != 1)
                        = (n-1) W                                          (levelling)
    precopy time    = (V + sum_{i=1}^{n-1} a_i) * Pw / B + n c
    downtime        = a_n * Pw / B + o
    total time      = precopy time + downtime

The model is continuous (pages are reals): :func:`iterate` evaluates the same recurrence
step by step through any policy, in the migrator's own round loop
(:func:`vmem.migration.rounds.run_precopy`) (``dirty_count`` is then a float), and the trace-driven
simulator (:mod:`vmem.analysis.simulate`) is the integer, measured-curve version.  Where the
measured WWS curve is not ``min(D t, W)`` -- uniform writes over a large guest give
``N (1 - exp(-R t / N))`` -- :func:`iterate` accepts the measured curve as ``dirty_fn``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from vmem.errors import ConfigError
from vmem.migration.policy import Decision, IterationsThresholdPolicy, XenDefaultPolicy
from vmem.migration.rounds import SAFETY_MAX_ROUNDS, RoundResult, run_precopy

__all__ = [
    "PrecopyModel",
    "ModelPrediction",
    "closed_form",
    "iterate",
    "policy_thresholds",
    "wire_bytes",
    "DEFAULT_SWITCHOVER_S",
    "DEFAULT_COLLECT_S",
    "SWITCH_BACKLOG_PAGES",
    "switch_backlog_pages",
]

#: Downtime that is not sending pages, measured here (64-256 MiB uniform/hotcold guests,
#: uffd-wp, 3-6 ms; an idle guest's first step sleeps 5 ms, so ~12 ms there):
#: final collect -> END/context -> destination resume -> first step.
DEFAULT_SWITCHOVER_S = 0.003
#: A uffd-wp collect of a mostly clean 256 MiB guest (PAGEMAP_SCAN), measured here.
DEFAULT_COLLECT_S = 0.001
#: The switchover's per-page cost counts at most this many pages of the final set.  What
#: grows with the set is the destination's backlog when the send ends (it still receives and
#: places the last burst), and that backlog is bounded, not the whole set: measured here
#: (128 MiB guests, downtime - stop-and-copy send) 1.1-1.4 ms at 8-40 final pages, 2.4-2.8 ms
#: at ~370, 2.8-3.5 ms at 500-1,500, 3.2-4.4 ms at ~3,000 and 3.7 ms at 32,767 (a sweep at
#: 50 MB/s): about one record's worth (1,024 pages), after which it levels off.
SWITCH_BACKLOG_PAGES = 1024


def switch_backlog_pages(final_pages: float, pages=None, run_share: float = 0.0) -> float:
    """The pages of a final set the switchover's per-page cost counts (:data:`SWITCH_BACKLOG_PAGES`).

    With ``pages`` (the final set's page numbers, sorted as the sender sends them) and a
    ``run_share`` > 0, the backlog -- the last :data:`SWITCH_BACKLOG_PAGES` pages -- is
    counted in scattered-page equivalents: placing a page costs a part per page (the copy and
    its digest) and a part per run of consecutive pages (one ``pwrite`` each), and
    ``run_share`` is the per-run part's share of a scattered page's cost
    (:func:`vmem.analysis.calibration.placement_probe`).  A scattered backlog counts as its
    pages; a contiguous one as ``(1 - run_share)`` of them.  The calibration's slope is per
    scattered page (its guest's final sets are scattered), which is what this keeps it."""
    n = min(float(final_pages), float(SWITCH_BACKLOG_PAGES))
    if pages is None or run_share <= 0.0 or n < 2:
        return n
    tail = np.asarray(pages, dtype=np.int64)[-int(n):]
    runs = 1 + int(np.count_nonzero(np.diff(tail) != 1))
    return n - min(float(run_share), 1.0) * (n - runs)


#: The stream's per-record overhead: 8-byte record header + u32 count + u32 reserved.
RECORD_OVERHEAD_BYTES = 16
PFN_BYTES = 8
PAGES_PER_RECORD = 1024


def last_record_pages(round_pages: float) -> float:
    """Pages in the last PAGE_DATA record of a round of ``round_pages`` (the sender cuts a
    round into records of :data:`PAGES_PER_RECORD` in order): what the destination still has
    to place when the round's last byte is sent -- the drain before the pause grows with it
    (:mod:`vmem.analysis.calibration`)."""
    n = int(round_pages)
    return float((n - 1) % PAGES_PER_RECORD + 1) if n > 0 else 0.0


def wire_bytes(pages: int, page_size: int = 4096) -> int:
    """Bytes a round of ``pages`` puts on the wire: PAGE_DATA records of up to 1024 pages."""
    pages = int(pages)
    return pages * (page_size + PFN_BYTES) + RECORD_OVERHEAD_BYTES * -(-pages // PAGES_PER_RECORD)


@dataclass(frozen=True)
class PrecopyModel:
    """Parameters of the analytical model (see the module docstring for the symbols).

    Attributes:
        guest_pages: V, pages round 0 sends.
        dirty_rate_pps: D.
        wws_pages: W (clamped to V).
        bandwidth_Bps: B.
        page_size: bytes per page.
        collect_s: c, per-round fixed cost.
        switchover_s: o, downtime overhead.
    """

    guest_pages: float
    dirty_rate_pps: float
    wws_pages: float
    bandwidth_Bps: float
    page_size: int = 4096
    collect_s: float = DEFAULT_COLLECT_S
    switchover_s: float = DEFAULT_SWITCHOVER_S

    def __post_init__(self):
        for name in ("guest_pages", "dirty_rate_pps", "wws_pages", "collect_s", "switchover_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(name, f"must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.bandwidth_Bps, (int, float)) and math.isfinite(self.bandwidth_Bps) and self.bandwidth_Bps > 0):
            raise ConfigError("bandwidth", f"must be a finite number > 0, got {self.bandwidth_Bps!r}")

    @property
    def wire_page_bytes(self) -> float:
        """Pw: bytes per page on the wire, framing included (amortised)."""
        return self.page_size + PFN_BYTES + RECORD_OVERHEAD_BYTES / PAGES_PER_RECORD

    @property
    def W(self) -> float:
        return min(self.wws_pages, self.guest_pages)

    @property
    def ratio(self) -> float:
        """r = D * Pw / B: pages dirtied per page sent.  Pre-copy converges iff r < 1."""
        return self.dirty_rate_pps * self.wire_page_bytes / self.bandwidth_Bps

    @property
    def fixed_point_pages(self) -> float:
        """a* = D c / (1 - r): where the dirty count settles (inf when r >= 1 and c > 0)."""
        r, dc = self.ratio, self.dirty_rate_pps * self.collect_s
        if dc == 0:
            return 0.0
        return dc / (1 - r) if r < 1 else math.inf

    def send_s(self, pages: float) -> float:
        return pages * self.wire_page_bytes / self.bandwidth_Bps

    def g_power(self, k: int, x: float) -> float:
        """g^k(x): k applications of g(x) = r x + D c, in closed form."""
        r, dc = self.ratio, self.dirty_rate_pps * self.collect_s
        if r == 1:
            return x + k * dc
        a = dc / (1 - r)
        return a + r ** k * (x - a)

    def levels(self) -> bool:
        """True when the dirty count sticks at W (g(W) > W): no convergence below W."""
        W = self.W
        return self.ratio * W + self.dirty_rate_pps * self.collect_s > W


@dataclass
class ModelPrediction:
    """What the model predicts for one policy.

    Attributes:
        sent_pages: pages sent by each pre-copy round (a_0 .. a_{n-1}).
        dirty_pages: dirty count after each pre-copy round (a_1 .. a_n).
        round_s: duration of each pre-copy round's sending.
        final_pages: pages the stop-and-copy sends (a_n); 0 when aborted.
        precopy_rounds: n.
        pages_sent, precopy_s, downtime_s, total_time_s: totals (downtime None if aborted).
        converges: r < 1 and the working set does not hold the dirty count up.
        outcome: "completed" or "aborted"; reason: why pre-copy ended.
    """

    sent_pages: list = field(default_factory=list)
    dirty_pages: list = field(default_factory=list)
    round_s: list = field(default_factory=list)
    final_pages: float = 0.0
    precopy_rounds: int = 0
    pages_sent: float = 0.0
    precopy_s: float = 0.0
    downtime_s: float | None = None
    total_time_s: float = 0.0
    converges: bool = False
    outcome: str = "completed"
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def policy_thresholds(policy) -> tuple[float, int, bool] | None:
    """(threshold, max_iterations, strict) of a built-in threshold-style policy, else None.

    Xen's default stops when ``dirty < 50`` (strict) or at 5 iterations; the seed patch's
    policy when ``dirty <= P`` or at ``N``.  Other policies need :func:`iterate`.
    """
    if isinstance(policy, XenDefaultPolicy):
        return float(policy.TARGET_DIRTY_COUNT), int(policy.MAX_ITERATIONS), True
    if isinstance(policy, IterationsThresholdPolicy):
        return float(policy.threshold), int(policy.iterations), False
    return None


def _first_round_below(m: PrecopyModel, a1: float, threshold: float, strict: bool, limit: int) -> int | None:
    """Smallest k >= 1 with a_k <= T (a_k < T if strict), or None within ``limit``."""
    def below(x: float) -> bool:
        return x < threshold if strict else x <= threshold

    if below(a1):
        return 1
    if m.levels():
        return None                      # a_k = W = a_1 for every k
    r, a_star = m.ratio, m.fixed_point_pages
    if r >= 1 or a1 <= a_star:
        return None                      # constant or rising towards a* > T
    if threshold <= a_star:
        return None                      # approaches a* from above, never reaches T
    j = math.ceil(math.log((threshold - a_star) / (a1 - a_star)) / math.log(r))
    j = max(j, 1)
    # Floating-point guard: settle the exact first j with a direct evaluation.
    while j > 1 and below(m.g_power(j - 1, a1)):
        j -= 1
    while not below(m.g_power(j, a1)):
        j += 1
        if j > limit:
            return None
    return 1 + j


def closed_form(m: PrecopyModel, threshold: float, max_iterations: int, *, strict: bool = False) -> ModelPrediction:
    """Predict a threshold/iteration policy's run in closed form (module docstring).

    Args:
        threshold: T, stop when the dirty count is <= T (< T if ``strict``).
        max_iterations: N, stop after N pre-copy rounds at the latest.
    """
    if max_iterations < 1:
        raise ConfigError("max_iterations", f"must be >= 1, got {max_iterations}")
    V, W, r = float(m.guest_pages), m.W, m.ratio
    a_star = m.fixed_point_pages
    levels = m.levels()
    a1 = W if levels else min(m.g_power(1, V), W)
    k = _first_round_below(m, a1, threshold, strict, max_iterations)
    n = max_iterations if k is None else min(k, max_iterations)
    reason = (f"dirty {'<' if strict else '<='} {threshold:g} after {n} rounds" if k is not None and k <= max_iterations
              else f"iteration {n} >= {max_iterations}")

    def a(i: int) -> float:
        if i == 0:
            return V
        return W if levels else m.g_power(i - 1, a1)

    # sum_{i=1}^{n-1} a_i in closed form.
    if n <= 1:
        tail = 0.0
    elif levels:
        tail = (n - 1) * W
    elif r == 1:
        dc = m.dirty_rate_pps * m.collect_s
        tail = (n - 1) * a1 + dc * (n - 1) * (n - 2) / 2
    else:
        tail = (n - 1) * a_star + (a1 - a_star) * (1 - r ** (n - 1)) / (1 - r)
    final = a(n)
    pred = ModelPrediction()
    pred.sent_pages = [a(i) for i in range(n)]
    pred.dirty_pages = [a(i + 1) for i in range(n)]
    pred.round_s = [m.send_s(x) for x in pred.sent_pages]
    pred.precopy_rounds = n
    pred.final_pages = final
    pred.pages_sent = V + tail + final
    pred.precopy_s = m.send_s(V + tail) + n * m.collect_s
    pred.downtime_s = m.send_s(final) + m.switchover_s
    pred.total_time_s = pred.precopy_s + pred.downtime_s
    pred.converges = (not levels) and r < 1
    pred.reason = reason
    return pred


def iterate(m: PrecopyModel, policy=None, *, dirty_fn: Callable[[float], float] | None = None,
            max_rounds: int = SAFETY_MAX_ROUNDS) -> ModelPrediction:
    """Evaluate the model round by round through any policy (via ``call_policy``).

    Each round: send ``a_i`` pages (``t_i = a_i Pw / B``), the guest dirties
    ``a_{i+1} = min(D (t_i + c), W)`` pages -- or ``dirty_fn(t_i + c)`` when given (e.g.
    the measured WWS curve) -- scaled by ``1 - throttle`` when the policy throttles, and
    the policy sees the same :class:`PrecopyStats` fields the migrator fills.

    Raises:
        PolicyError: the policy raised or returned garbage.
    """
    policy = policy or XenDefaultPolicy()
    rounds = _ModelRounds(m, dirty_fn or (lambda t: min(m.dirty_rate_pps * t, m.W)))
    end = run_precopy(rounds, policy, float(m.guest_pages), guest_pages=m.guest_pages, page_size=m.page_size,
                      bandwidth_limit_Bps=m.bandwidth_Bps, max_rounds=max_rounds)
    pred = rounds.pred
    pred.precopy_rounds = end.rounds
    pred.precopy_s = end.elapsed_s
    pred.reason = end.reason
    if end.decision in (Decision.ABORT, Decision.POSTCOPY):
        pred.outcome = "aborted" if end.decision == Decision.ABORT else "postcopy"
        pred.pages_sent = end.total_written
        pred.total_time_s = end.elapsed_s
        return pred
    pred.final_pages = end.dirty
    pred.pages_sent = end.total_written + end.dirty
    pred.downtime_s = m.send_s(end.dirty) + m.switchover_s
    pred.total_time_s = end.elapsed_s + pred.downtime_s
    pred.converges = (not m.levels()) and m.ratio < 1
    return pred


class _ModelRounds:
    """The analytical model's plug-in for the round engine (vmem.migration.rounds.RoundIO):
    a round of ``a`` pages takes ``a Pw / B`` seconds, and the guest dirties
    ``dirty_fn(t_send + c)`` pages meanwhile (scaled by ``1 - throttle``).  Page sets are
    counts (floats)."""

    def __init__(self, m: PrecopyModel, dirty_fn: Callable[[float], float]):
        self.m = m
        self.dirty_fn = dirty_fn
        self.elapsed_s = 0.0
        self.pred = ModelPrediction()

    def send_round(self, index: int, pages: float, throttle: float) -> RoundResult:
        m = self.m
        t_send = m.send_s(pages)
        t_round = t_send + m.collect_s
        dirty = min(self.dirty_fn(t_round), float(m.guest_pages)) * (1.0 - throttle)
        self.elapsed_s += t_round
        self.pred.sent_pages.append(pages)
        self.pred.dirty_pages.append(dirty)
        self.pred.round_s.append(t_send)
        return RoundResult(pages_sent=pages, bytes_sent=t_send * m.bandwidth_Bps, send_s=t_send, dirty=dirty,
                           dirty_pages=dirty, since_collect_s=t_round, elapsed_s=self.elapsed_s, collect_s=m.collect_s)

    def set_throttle(self, level: float) -> None:
        pass  # the engine passes the throttle in force to send_round
