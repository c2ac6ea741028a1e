"""Predictions with honest uncertainty: the same migration simulated from many start times.

A point prediction assumes the migration starts at one moment of the guest's life.  For a
steady guest that does not matter; for a phased or bursty one it decides everything (where
the pause falls relative to a burst).  :func:`forecast` simulates the migration from
``starts`` offsets spread evenly over the recorded trace (a migration that outlasts the
trace replays it from its start, i.e. the trace's phases repeat) and reports, per metric,
the median and the 10th-90th percentile range -- what a user can plan with before
migrating -- plus the start that gives the shortest downtime and whether the start time
matters at all.

Pure computation on a :class:`vmem.analysis.trace.DirtyTrace`; no process is touched.
"""
from __future__ import annotations

import math

import numpy as np

from vmem.analysis.simulate import SimulationParams, simulate, transfer_time_s
from vmem.errors import ConfigError

__all__ = ["forecast", "METRICS", "DEFAULT_STARTS", "inside"]

#: Start offsets simulated by default.
DEFAULT_STARTS = 16
#: The metrics forecast, as (name, how to read it from a report dict).
METRICS = (
    ("downtime_ms", lambda d: d.get("downtime_ms")),
    ("transfer_time_s", lambda d: transfer_time_s(d)),
    ("pages_sent", lambda d: d.get("pages_sent")),
    ("precopy_rounds", lambda d: sum(1 for x in d.get("rounds") or [] if x.get("kind", "precopy") == "precopy")),
)
#: "The start time matters" when the 90th percentile of a metric is this many times its 10th.
SENSITIVE_SPREAD = 1.5


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q, method="nearest"))


def forecast(trace, policy=None, bandwidth_Bps: float | None = None, *, starts: int = DEFAULT_STARTS,
             **params) -> dict:
    """Simulate the migration from ``starts`` evenly spread start offsets of ``trace``.

    Args:
        trace: the recorded DirtyTrace.
        policy: a policy callable (default: Xen's).
        bandwidth_Bps: link rate (required).
        starts: how many start offsets (>= 1); offset i is ``i * duration / starts``.
        params: further :class:`vmem.analysis.simulate.SimulationParams` fields (not
            ``start_s``, which this varies).

    Returns:
        ``{"starts": [{"start_s", <metric>: value, "outcome"}...], "metrics": {<metric>:
        {"median", "p10", "p90", "min", "max"}}, "best_start_s", "start_sensitive",
        "advice"}`` -- metrics over the runs whose outcome was ``completed``.

    Raises:
        ConfigError: ``starts`` < 1, ``start_s`` given, no bandwidth, or bad parameters.
    """
    if not isinstance(starts, int) or starts < 1:
        raise ConfigError("--starts", f"must be an integer >= 1, got {starts!r}")
    if "start_s" in params:
        raise ConfigError("--start", "a forecast varies the start itself (use --starts 1 --start S for one start)")
    if bandwidth_Bps is None:
        raise ConfigError("--bandwidth", "required (the rate of the link to predict for)")
    duration_s = float(trace.duration_s)
    runs = []
    for i in range(starts):
        start_s = duration_s * i / starts
        rep = simulate(trace, policy, SimulationParams(bandwidth_Bps=bandwidth_Bps, start_s=start_s, **params))
        d = rep.to_dict()
        runs.append({"start_s": round(start_s, 6), "outcome": d.get("outcome"),
                     **{name: get(d) for name, get in METRICS}})
    done = [r for r in runs if r["outcome"] == "completed"]
    metrics = {}
    for name, _ in METRICS:
        vals = np.array([float(r[name]) for r in done if r[name] is not None], dtype=float)
        if vals.size:
            metrics[name] = {"median": float(np.median(vals)), "p10": _pct(vals, 10), "p90": _pct(vals, 90),
                             "min": float(vals.min()), "max": float(vals.max())}
    best = min(done, key=lambda r: (r["downtime_ms"], r["transfer_time_s"])) if done else None
    dt = metrics.get("downtime_ms")
    sensitive = bool(dt and dt["p10"] > 0 and dt["p90"] / dt["p10"] >= SENSITIVE_SPREAD)
    if not done:
        advice = "no start offset completed: this policy does not converge on this guest at this rate"
    elif sensitive:
        advice = (f"the start time matters: downtime {dt['p10']:.1f}-{dt['p90']:.1f} ms (p10-p90) across starts; "
                  f"the shortest came from starting {best['start_s']:.2f} s into the trace's cycle")
    else:
        advice = "steady: the start time hardly matters"
    if len(done) < len(runs):
        advice += f"; {len(runs) - len(done)} of {len(runs)} starts did not complete"
    return {"starts": runs, "metrics": metrics, "best_start_s": best["start_s"] if best else None,
            "start_sensitive": sensitive, "advice": advice}


def inside(metric: dict, value: float | None, *, tolerance: float = 0.0) -> bool | None:
    """Whether ``value`` lies in ``metric``'s [p10, p90] range widened by ``tolerance``
    (a fraction of each bound); None when there is no value or no range."""
    if value is None or not metric or any(not math.isfinite(metric[k]) for k in ("p10", "p90")):
        return None
    return metric["p10"] * (1 - tolerance) <= float(value) <= metric["p90"] * (1 + tolerance)
