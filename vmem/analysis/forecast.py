"""Predictions with honest uncertainty: the same migration simulated from many start times.

A point prediction assumes the migration starts at one moment of the guest's life.  For a
steady guest that does not matter; for a phased or bursty one it decides everything (where
the pause falls relative to a burst).  :func:`forecast` simulates the migration from
``starts`` offsets spread evenly over the recorded trace (a migration that outlasts the
trace replays it from its start, i.e. the trace's phases repeat) and reports, per metric,
the median and a 90 % range (5th-95th percentile) -- what a user can plan with before
migrating -- plus the start that gives the shortest downtime and whether the start time
matters at all.

The range.  A forecast's range is its 5th-95th percentile (:data:`RANGE_PCT`): a 90 %
range, where nine migrations in ten should land when the forecast is right.  The 10th-90th
percentiles are reported too (an 80 % range).  Why 90 %: a validation counts how many real
runs fall inside, per workload (18 runs each in docs/profiling.md's table, whose goal is
>= 80 % inside); a right 80 % range meets that only about half the time (binomial: P(>= 15
of 18 | 0.8) = 0.50, for all twelve workload x metric counts together 0.0003), so a table
judged on an 80 % range could not tell a right forecast from a wrong one; a right 90 % range
meets it with P = 0.90 per count (all twelve together: 0.29 -- a single table can still miss
one by chance).  A 5th percentile needs enough starts to mean something:
with fewer than :data:`RANGE_MIN_STARTS` it is the second-smallest start or the smallest.

With a host calibration (:mod:`vmem.analysis.calibration`, ``vmem calibrate``) each start
also gets its own bootstrap draw of the host's fixed costs and copy rate, so the range holds
the host's noise -- handshake, switchover, the real rate of the copy path, verify -- and not
only the guest's start-time variation; the start sensitivity and the best start are then
judged on a second pass at the calibration's medians, where only the start varies.
Phase-aware costs: that second pass runs first, at the whole trace's dirty rate, and tells
where in the trace each start's pause falls; each start's draw then takes the costs of the
guest's rate over the second before its pause (:func:`vmem.analysis.calibration.trace_dirty_rate_before`):
a phased guest that reaches its pause in a quiet phase pays an idle guest's switchover.

Pure computation on a :class:`vmem.analysis.trace.DirtyTrace`; no process is touched.
"""
from __future__ import annotations

import math

import numpy as np

from vmem.analysis.simulate import SimulationParams, simulate, transfer_time_s
from vmem.errors import ConfigError

__all__ = ["forecast", "metrics_of", "METRICS", "DEFAULT_STARTS", "RANGE_PCT", "RANGE_MIN_STARTS", "inside",
           "range_label"]

#: Start offsets simulated by default (a forecast is ~3 ms of simulation per start).
DEFAULT_STARTS = 64
#: The forecast's range, as (low, high) percentiles of its starts: a 90 % range (see above).
RANGE_PCT = (5, 95)
#: Below this many starts the range's percentiles are the outermost starts or next to them.
RANGE_MIN_STARTS = 40
#: The metrics forecast, as (name, how to read it from a report dict).
METRICS = (
    ("downtime_ms", lambda d: d.get("downtime_ms")),
    ("blackout_ms", lambda d: d.get("blackout_ms")),
    ("migration_time_s", lambda d: d.get("migration_time_s")),
    ("transfer_time_s", lambda d: transfer_time_s(d)),
    ("pages_sent", lambda d: d.get("pages_sent")),
    ("precopy_rounds", lambda d: sum(1 for x in d.get("rounds") or [] if x.get("kind", "precopy") == "precopy")),
    ("postcopy_faults", lambda d: (d.get("postcopy") or {}).get("faults")),
    ("pages_pending", lambda d: (d.get("postcopy") or {}).get("pages_pending")),
    ("pages_pushed", lambda d: (d.get("postcopy") or {}).get("pages_pushed")),
)
#: "The start time matters" when the 90th percentile of a metric is this many times its 10th.
SENSITIVE_SPREAD = 1.5


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q, method="nearest"))


def metrics_of(runs: list[dict]) -> dict:
    """``{metric: {"median", "p5", "p10", "p90", "p95", "min", "max"}}`` over the completed
    ``runs`` (a forecast's ``starts``; several forecasts' pooled).  The range is
    :data:`RANGE_PCT`'s percentiles (:func:`inside`); p10-p90 is the 80 % range."""
    done = [r for r in runs if r["outcome"] == "completed"]
    metrics = {}
    for name, _ in METRICS:
        vals = np.array([float(r[name]) for r in done if r.get(name) is not None], dtype=float)
        if vals.size:
            metrics[name] = {"median": float(np.median(vals)),
                             **{f"p{q}": _pct(vals, q) for q in sorted({*RANGE_PCT, 10, 90})},
                             "min": float(vals.min()), "max": float(vals.max())}
    return metrics


def _runs(trace, policy, bandwidth_Bps, starts, draws, params) -> list[dict]:
    duration_s = float(trace.duration_s)
    runs = []
    for i in range(starts):
        start_s = duration_s * i / starts
        # explicit parameters win over the calibration's draw
        sp = SimulationParams(bandwidth_Bps=bandwidth_Bps, start_s=start_s, **(draws[i] | params))
        d = simulate(trace, policy, sp).to_dict()
        pause = (d.get("guest") or {}).get("prediction", {}).get("pause_trace_s")
        runs.append({"start_s": round(start_s, 6), "outcome": d.get("outcome"), "mode": d.get("mode"),
                     "pause_trace_s": pause, **{name: get(d) for name, get in METRICS}})
    return runs


def forecast(trace, policy=None, bandwidth_Bps: float | None = None, *, starts: int = DEFAULT_STARTS,
             calibration=None, seed: int = 0, load_factor: float = 1.0, **params) -> dict:
    """Simulate the migration from ``starts`` evenly spread start offsets of ``trace``.

    Args:
        trace: the recorded DirtyTrace.
        policy: a policy callable (default: Xen's).
        bandwidth_Bps: link rate (required).
        starts: how many start offsets (>= 1); offset i is ``i * duration / starts``.
        calibration: a :class:`vmem.analysis.calibration.Calibration`: start i also takes
            bootstrap draw i of the host's costs (seeded by ``seed``); None: the simulator's
            constant defaults (the range is the start time's alone).
        load_factor: how much slower the host is now than when calibrated
            (:meth:`vmem.analysis.calibration.Calibration.load_factor`): scales the
            calibration's CPU-bound fixed costs.
        params: further :class:`vmem.analysis.simulate.SimulationParams` fields (not
            ``start_s``, which this varies); they override the calibration's.

    Returns:
        ``{"starts": [{"start_s", <metric>: value, "outcome", "pause_trace_s" and, calibrated,
        "pause_dirty_pages_per_s", "busy_weight"}...], "metrics": {<metric>:
        {"median", "p5", "p10", "p90", "p95", "min", "max"}}, "best_start_s",
        "start_sensitive", "advice", "calibrated"}`` -- metrics over the runs whose outcome was
        ``completed``; the median is the point prediction, p5-p95 the range (:data:`RANGE_PCT`).

    Raises:
        ConfigError: ``starts`` < 1, ``start_s`` given, no bandwidth, or bad parameters.
    """
    if not isinstance(starts, int) or starts < 1:
        raise ConfigError("--starts", f"must be an integer >= 1, got {starts!r}")
    if "start_s" in params:
        raise ConfigError("--start", "a forecast varies the start itself (use --starts 1 --start S for one start)")
    if bandwidth_Bps is None:
        raise ConfigError("--bandwidth", "required (the rate of the link to predict for)")
    from vmem.analysis.calibration import mode_for, trace_dirty_rate, trace_dirty_rate_before

    mode = mode_for(params.get("postcopy"))
    pause_rates = None
    if calibration is not None:
        # the costs of the calibration guest(s) nearest what this guest writes: first at
        # its whole trace's rate, which also finds where each start's pause falls ...
        rate = trace_dirty_rate(trace)
        point = calibration.point_params(int(trace.npages), bandwidth_Bps, mode=mode, load_factor=load_factor,
                                         dirty_pages_per_s=rate)
        # The start's own effect, judged without the host's noise.
        steady_runs = _runs(trace, policy, bandwidth_Bps, starts, [point] * starts, params)
        # ... then each start's draw at the rate before its pause (phase-aware costs)
        pause_rates = [trace_dirty_rate_before(trace, r["pause_trace_s"]) if r.get("pause_trace_s") is not None
                       else rate for r in steady_runs]
        draws = calibration.draw_params(int(trace.npages), bandwidth_Bps, starts, mode=mode, seed=seed,
                                        load_factor=load_factor, dirty_pages_per_s=pause_rates)
    else:
        draws, point, rate = [{}] * starts, {}, None
    runs = _runs(trace, policy, bandwidth_Bps, starts, draws, params)
    if calibration is None:
        steady_runs = runs
    else:
        for r, pr in zip(runs, pause_rates):
            r["pause_dirty_pages_per_s"] = round(pr, 1)
            r["busy_weight"] = round(calibration.busy_weight(pr), 3)
    done = [r for r in runs if r["outcome"] == "completed"]
    metrics = metrics_of(runs)
    sdone = [r for r in steady_runs if r["outcome"] == "completed"]
    best = min(sdone, key=lambda r: (r["downtime_ms"], r["transfer_time_s"])) if sdone else None
    sdt = np.array([r["downtime_ms"] for r in sdone], dtype=float)
    lo, hi = (_pct(sdt, 10), _pct(sdt, 90)) if sdt.size else (0.0, 0.0)
    sensitive = bool(sdt.size and lo > 0 and hi / lo >= SENSITIVE_SPREAD)
    dt = metrics.get("downtime_ms")
    if not done:
        advice = "no start offset completed: this policy does not converge on this guest at this rate"
    elif sensitive:
        advice = (f"the start time matters: downtime {lo:.1f}-{hi:.1f} ms (p10-p90) across starts; "
                  f"the shortest came from starting {best['start_s']:.2f} s into the trace's cycle")
    else:
        advice = "steady: the start time hardly matters"
    if calibration is not None and dt:
        lo_q, hi_q = RANGE_PCT
        advice += (f"; with this host's measured noise (calibration) the downtime's {range_label()} is "
                   f"{dt[f'p{lo_q}']:.1f}-{dt[f'p{hi_q}']:.1f} ms")
    if len(runs) < RANGE_MIN_STARTS:
        advice += f"; only {len(runs)} starts: the range's ends are its outermost starts (use >= {RANGE_MIN_STARTS})"
    if len(done) < len(runs):
        advice += f"; {len(runs) - len(done)} of {len(runs)} starts did not complete"
    return {"starts": runs, "metrics": metrics, "best_start_s": best["start_s"] if best else None,
            "start_sensitive": sensitive, "advice": advice, "calibrated": calibration is not None,
            # the share of the busy calibration guest's costs at the whole trace's rate (each
            # start's own, at its pause, is in its record)
            "busy_weight": calibration.busy_weight(rate) if calibration is not None else None}


def range_label(pct: tuple[int, int] = RANGE_PCT) -> str:
    """How a range of percentiles ``pct`` reads: ``"90 % range (p5-p95)"``."""
    return f"{pct[1] - pct[0]} % range (p{pct[0]}-p{pct[1]})"


def inside(metric: dict, value: float | None, *, tolerance: float = 0.0,
           pct: tuple[int, int] = RANGE_PCT) -> bool | None:
    """Whether ``value`` lies in ``metric``'s range -- its percentiles ``pct`` (default the
    forecast's 90 % range, p5-p95) -- widened by ``tolerance`` (a fraction of each bound);
    None when there is no value or no such range."""
    keys = [f"p{q}" for q in pct]
    if value is None or not metric or any(k not in metric or not math.isfinite(metric[k]) for k in keys):
        return None
    return metric[keys[0]] * (1 - tolerance) <= float(value) <= metric[keys[1]] * (1 + tolerance)
