"""The figures a regression run compares, read from a migration report (docs/report.md).

Each :class:`Metric` names its unit in its name, says which direction is better, and
carries its default verdict thresholds (``rel``: the ratio of medians minus one, either way, ``abs``:
the absolute change, in the metric's unit, that must both be exceeded before a change can
count; vmem.bench.verdict).  The defaults are set so that re-running the same commit on a
loaded 2-core machine is not flagged (docs/bench.md gives the measured rate) while a
200 ms stall in the stop-and-copy is.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Metric", "METRICS", "METRIC_NAMES", "report_metrics", "run_is_valid"]


@dataclass(frozen=True)
class Metric:
    """A compared figure: ``name`` (with unit), ``better`` ("lower"/"higher"), default
    thresholds ``rel`` (ratio of medians minus one) and ``abs`` (metric's unit);
    ``timing``: a wall-clock figure, whose thresholds follow the machine's measured
    slowdown (vmem.bench.calibrate)."""

    name: str
    better: str
    rel: float
    abs: float
    description: str
    timing: bool = True


METRICS: tuple[Metric, ...] = (
    Metric("downtime_ms", "lower", 0.5, 50.0, "guest-visible downtime (report downtime_ms)"),
    Metric("blackout_ms", "lower", 1.0, 100.0, "longest gap the guest felt (report blackout_ms)"),
    Metric("migration_time_s", "lower", 3.0, 1.5, "handshake to the source's release (report migration_time_s)"),
    Metric("pages_sent", "lower", 0.25, 2048, "pages over all rounds (report pages_sent)", timing=False),
    Metric("throughput_Bps", "higher", 3.0, 300e6,
           "round 0's bytes/s (pure post-copy: the push's push_rate_Bps)"),
    Metric("fault_p99_us", "lower", 3.0, 10000.0, "post-copy demand fault latency, 99th percentile"),
    Metric("migrator_private_peak_bytes", "lower", 0.5, 16 << 20,
           "source + destination migrators' peak private memory (processes.*.private_peak_bytes)", timing=False),
)
METRIC_NAMES = tuple(m.name for m in METRICS)


def run_is_valid(report: dict) -> bool:
    """A run counts only if it completed and was verified ("medians of verified runs only")."""
    return report.get("outcome") == "completed" and report.get("verified") is True


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def report_metrics(report: dict) -> dict[str, float | None]:
    """``{metric name: value}`` from one report; None where the report has no such figure
    (e.g. fault latency of a pre-copy migration)."""
    out: dict[str, float | None] = {name: None for name in METRIC_NAMES}
    for key in ("downtime_ms", "blackout_ms", "migration_time_s", "pages_sent"):
        out[key] = _num(report.get(key))
    rounds = report.get("rounds") or []
    pc = report.get("postcopy") or {}
    if report.get("mode") == "postcopy":
        out["throughput_Bps"] = _num(pc.get("push_rate_Bps"))
    elif rounds and _num(rounds[0].get("duration_s")):
        out["throughput_Bps"] = rounds[0].get("bytes_sent", 0) / rounds[0]["duration_s"]
    lat = pc.get("fault_latency_us") or {}
    if lat.get("count"):
        out["fault_p99_us"] = _num(lat.get("p99"))
    procs = report.get("processes") or {}
    peaks = [_num((procs.get(k) or {}).get("private_peak_bytes")) for k in ("migrator_source", "migrator_destination")]
    if any(p is not None for p in peaks):
        out["migrator_private_peak_bytes"] = sum(p for p in peaks if p is not None)
    return out
