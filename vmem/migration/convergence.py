"""Is the precopy dirty count still falling, flat, or rising, and has it converged?

Shared by every policy that needs to know, so that "converged" means one thing
throughout vmem.  Andrew Cooper on xen-devel (2017-03-29): "On a steady VM, you should
converge asymptotically to the measured threshold, although on 5 or fewer iterations,
the asymptotic properties don't appear cleanly."

Method.  Precopy rounds shrink geometrically (each round lasts about as long as it takes
to send the previous round's dirty pages, so the count is multiplied each round by
roughly dirty rate / bandwidth) until they level off at the writable working set.  In
log space that is a straight line that turns flat, so we fit one:

* ``y = log(dirty + floor_pages)`` for the last ``window_rounds`` counts, and the
  least-squares slope of ``y`` over the round index.  ``exp(slope) - 1`` is the fitted
  relative change per round (-0.5 = "halves every round"), independent of guest size;
  multiplicative noise becomes additive and the fit averages it out.
* ``floor_pages`` (the "+1" of ``log(dirty + 1)``, made a parameter) stops counts of a
  handful of pages from swinging the ratio: 0 -> 3 pages is not "infinitely rising".
* Trend: ``|change per round| <= flat_band`` is FLAT, else FALLING or RISING.
* Converged when either

  - *plateau*: a full window whose trend is FLAT and whose highest count is at most
    ``max_spread_ratio`` times its lowest (rejects a V or a zig-zag whose slope happens
    to be zero), or
  - *settled*: each of the last ``settle_rounds`` round-to-round changes is at most
    ``settle_change``.  This needs only ``settle_rounds + 1`` counts: when the signal is
    that clean we do not need five rounds to see it; a noisy one must wait for the full
    window and the regression.

Fewer than ``min_rounds`` counts: the trend is UNKNOWN and nothing has converged.

The optional dirty-rate history (pages/s per round) gets the same slope fit and is
reported as ``rate_trend``.  It separates the two causes of a rising count that Andrew
Cooper warns about ("the measure of convergence with respect to guest busyness, and
other factors influencing the absolute iteration time, such as congestion of the
network"): a rising count with a rising rate means the guest got busier; with a flat
rate it means the rounds got longer (a slower link).
"""
from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from vmem.errors import ConfigError

__all__ = ["Trend", "ConvergenceParams", "Convergence", "DEFAULT_PARAMS", "assess_convergence", "fit_trend"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Trend(enum.Enum):
    """Direction of a per-round series (values are what the report shows)."""

    UNKNOWN = "unknown"   # fewer than min_rounds points: no trend can be claimed
    FALLING = "falling"
    FLAT = "flat"
    RISING = "rising"


@dataclass(frozen=True)
class ConvergenceParams:
    """Tuning of the classifier.  Defaults and why:

    Attributes:
        window_rounds: counts in the slope fit (default 5).  Andrew Cooper: on 5 or fewer
            iterations the asymptotics "don't appear cleanly"; 5 is the least that averages
            out round-to-round noise, and libxc's default policy never runs more than 5.
        min_rounds: below this many counts the trend is UNKNOWN (default 3: the fewest
            points through which a fitted line has a residual, i.e. can disagree with noise).
        flat_band: |relative change per round| at or under which the trend is FLAT
            (default 0.10).  If a round removes less than 10% of what is left, another
            round costs a full round's time and traffic to save < 10% of the downtime:
            the point of diminishing returns.
        max_spread_ratio: a plateau's largest ``dirty + floor_pages`` over its smallest,
            at most (default 2.0: noise of about +-33% around a working set still counts
            as a plateau; a V-shaped or zig-zag window with zero slope does not).
        settle_rounds: consecutive small changes that count as converged without a full
            window (default 2: one small change can be luck, two in a row rarely is).
        settle_change: largest relative change per round for "settled" (default 0.05,
            half of flat_band, because it is judged on fewer points).
        floor_pages: added to every count before taking logs (default 16).  Differences
            well under this many pages are treated as noise: 16 pages are 64 KiB, half a
            millisecond at 1 Gbit/s, so they must not flip the verdict; counts above a
            few hundred pages are barely affected.
        rate_floor_pps: the same for the dirty-rate history, in pages/s (default 100:
            400 KB/s, below the slowest link this lab shapes, e.g. 10 Mbit = 305 pages/s).

    Raises:
        ConfigError: a value out of range (names the attribute).
    """

    window_rounds: int = 5
    min_rounds: int = 3
    flat_band: float = 0.10
    max_spread_ratio: float = 2.0
    settle_rounds: int = 2
    settle_change: float = 0.05
    floor_pages: float = 16.0
    rate_floor_pps: float = 100.0

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ConfigError(name, f"{msg}, got {getattr(self, name)!r}")

        need(_is_int(self.window_rounds) and self.window_rounds >= 2, "window_rounds", "must be an integer >= 2")
        need(_is_int(self.min_rounds) and 2 <= self.min_rounds <= self.window_rounds, "min_rounds",
             f"must be an integer in [2, window_rounds={self.window_rounds}]")
        need(_is_num(self.flat_band) and 0 < self.flat_band < 1, "flat_band", "must be in (0, 1)")
        need(_is_num(self.max_spread_ratio) and self.max_spread_ratio >= 1, "max_spread_ratio", "must be >= 1")
        need(_is_int(self.settle_rounds) and 1 <= self.settle_rounds < self.window_rounds, "settle_rounds",
             f"must be an integer in [1, window_rounds={self.window_rounds})")
        need(_is_num(self.settle_change) and 0 <= self.settle_change <= self.flat_band, "settle_change",
             f"must be in [0, flat_band={self.flat_band}]")
        need(_is_num(self.floor_pages) and self.floor_pages >= 1, "floor_pages", "must be >= 1 (it keeps log() finite)")
        need(_is_num(self.rate_floor_pps) and self.rate_floor_pps >= 1, "rate_floor_pps", "must be >= 1")


DEFAULT_PARAMS = ConvergenceParams()


@dataclass(frozen=True)
class Convergence:
    """The classifier's answer for one history.

    Attributes:
        trend: direction of the dirty count over the last ``rounds`` counts.
        converged: the count has levelled off (plateau or settled, see the module doc).
        rounds: counts the trend was fitted on (0 when there were too few).
        change_per_round: fitted relative change per round (exp(slope) - 1; -0.5 halves
            each round); NaN when the trend is UNKNOWN.
        spread_ratio: largest over smallest ``dirty + floor_pages`` in the window
            (NaN when UNKNOWN).
        rate_trend: the same fit over the dirty-rate history, or None when none was given.
        why: one line for humans, e.g. "falling (-48.2%/round over 5 rounds, spread 15.70x)"
            or "converged: plateau (-1.1%/round over 5 rounds, spread 1.50x)".
    """

    trend: Trend
    converged: bool
    rounds: int
    change_per_round: float
    spread_ratio: float
    rate_trend: Trend | None
    why: str

    @property
    def still_falling(self) -> bool:
        """Another round is expected to lower the count: FALLING and not yet levelled off.

        (A settled series can still show FALLING over the longer window, because the
        regression lags; "converged" is the sharper signal and wins.)
        """
        return self.trend is Trend.FALLING and not self.converged

    @property
    def guest_busier(self) -> bool:
        """The dirty *rate* is rising: the guest itself got busier (not just longer rounds)."""
        return self.rate_trend is Trend.RISING


def fit_trend(series: Sequence[float], *, window_rounds: int = DEFAULT_PARAMS.window_rounds,
              min_rounds: int = DEFAULT_PARAMS.min_rounds, flat_band: float = DEFAULT_PARAMS.flat_band,
              floor: float = DEFAULT_PARAMS.floor_pages) -> tuple[Trend, float, int]:
    """Fit the log-slope of the last ``window_rounds`` values of ``series``.

    Returns:
        ``(trend, change_per_round, points_used)``; ``(UNKNOWN, nan, 0)`` for fewer than
        ``min_rounds`` values.
    """
    tail = [float(v) for v in series[-window_rounds:]]
    n = len(tail)
    if n < min_rounds:
        return Trend.UNKNOWN, math.nan, 0
    ys = [math.log(max(v, 0.0) + floor) for v in tail]
    x_mean = (n - 1) / 2.0
    y_mean = sum(ys) / n
    sxx = sum((i - x_mean) ** 2 for i in range(n))
    sxy = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(ys))
    change = math.exp(sxy / sxx) - 1.0
    if abs(change) <= flat_band:
        trend = Trend.FLAT
    else:
        trend = Trend.FALLING if change < 0 else Trend.RISING
    return trend, change, n


def assess_convergence(dirty_history: Sequence[int], dirty_rate_history: Sequence[float] | None = None,
                       params: ConvergenceParams = DEFAULT_PARAMS) -> Convergence:
    """Classify the dirty-count history (oldest first, one count per round).

    Args:
        dirty_history: pages dirtied during each round so far (``PrecopyStats.dirty_history``).
        dirty_rate_history: pages/s dirtied during each round, optional.
        params: tuning; the defaults are explained on :class:`ConvergenceParams`.
    """
    p = params
    rate_trend = None
    if dirty_rate_history:
        rate_trend = fit_trend(dirty_rate_history, window_rounds=p.window_rounds, min_rounds=p.min_rounds,
                               flat_band=p.flat_band, floor=p.rate_floor_pps)[0]
    trend, change, n = fit_trend(dirty_history, window_rounds=p.window_rounds, min_rounds=p.min_rounds,
                                 flat_band=p.flat_band, floor=p.floor_pages)
    if trend is Trend.UNKNOWN:
        return Convergence(trend, False, 0, math.nan, math.nan, rate_trend,
                           f"too few rounds ({len(dirty_history)} < {p.min_rounds}) to see a trend")
    window = [max(float(v), 0.0) + p.floor_pages for v in dirty_history[-n:]]
    spread = max(window) / min(window)
    plateau = n >= p.window_rounds and trend is Trend.FLAT and spread <= p.max_spread_ratio
    steps = [max(float(v), 0.0) + p.floor_pages for v in dirty_history[-(p.settle_rounds + 1):]]
    settled = len(steps) == p.settle_rounds + 1 and all(
        abs(math.log(b / a)) <= math.log1p(p.settle_change) for a, b in zip(steps, steps[1:]))
    fit = f"{change * 100:+.1f}%/round over {n} rounds, spread {spread:.2f}x"
    if plateau:
        why = f"converged: plateau ({fit})"
    elif settled:
        why = f"converged: last {p.settle_rounds} changes <= {p.settle_change:.0%} (fit {trend.value}, {fit})"
    else:
        why = f"{trend.value} ({fit})"
    return Convergence(trend, plateau or settled, n, change, spread, rate_trend, why)
