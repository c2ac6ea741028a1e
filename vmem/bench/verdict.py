"""Verdicts: is a cell's metric improved, the same, or regressed against the baseline?

The rule (per cell, per metric; both samples are the verified runs only):

* the change of medians must exceed both thresholds of the metric: ``|median_now -
  median_base| > abs`` (in the metric's unit), and the larger median must exceed ``(1 +
  rel)`` times the smaller (a ratio, the same both ways: ``rel = 1`` is a doubling or a
  halving);
* and a one-sided Mann-Whitney rank test must find the shift in that direction with
  ``p <= alpha`` (exact distribution over every split of the pooled runs, ties counted
  half; a normal approximation beyond 200,000 splits).  With 3 runs a side the smallest
  possible p is 1/20 = 0.05, so at the default ``alpha = 0.05`` every run on one side must
  lie beyond every run on the other.

For the wall-clock metrics (``Metric.timing``) the machine's speed is taken into account:
every run times a fixed piece of work first (vmem.bench.calibrate), and ``slowdown`` is the
median of this side's calibrations over the baseline's.  When the machine was slower now
(slowdown s > 1), both thresholds in the worse direction are multiplied by s (``abs x s``,
and a ratio beyond ``(1 + rel) x s``); when it was faster, those in the better direction by
1 / s.  A change the machine's speed explains is not blamed on the code.

Both must hold; a change in the better direction is *improved*, in the worse *regressed*,
anything else *same*.  The effect size printed beside it is the ratio of medians and
Cliff's delta (-1..1: the fraction of run pairs in which now is larger minus the fraction
in which it is smaller).  A cell with a run that did not complete verified is *failed*; a
cell with fewer than 2 verified runs on a side gets no verdict (*n/a*).  A comparison
fails (exit status 1) on any *regressed* or *failed* cell.

The calibration sees the CPU's speed, not everything about a machine.  When the two sides
ran on different machines, kernels or *boots* (the runs' provenance: hostname, kernel, CPU,
memory, boot id), :attr:`Judgement.machine_changes` says so, one line each, and the verdicts
are printed under that caution: on this project's VM a reboot alone made one migration path
~30 % slower while a plain copy measured beside it did not move (docs/performance.md,
2026-12-07).  Only an A/B in one session (``vmem bench --against``) rules the machine out.
"""
from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass, field

from vmem.bench.metrics import METRICS, METRIC_NAMES
from vmem.errors import ConfigError

__all__ = ["DEFAULT_ALPHA", "MIN_RUNS", "MetricVerdict", "Judgement", "judge", "mann_whitney_p", "smallest_p", "machine_slowdown", "cliffs_delta",
           "thresholds_with", "check_thresholds", "parse_threshold_args", "false_positive_rate",
           "session_false_positive_rate", "machine_changes"]

DEFAULT_ALPHA = 0.05
#: Verified runs a side needs before a cell's metric gets a verdict.
MIN_RUNS = 2
_EXACT_MAX_SPLITS = 200_000


def smallest_p(n_base: int, n_now: int) -> float:
    """The smallest one-sided p the rank test can give with these sample sizes (complete
    separation): 1 / C(n_base + n_now, n_now).  Above alpha, no verdict can fire."""
    return 1 / math.comb(n_base + n_now, n_now) if n_base and n_now else 1.0


def cliffs_delta(base: list[float], now: list[float]) -> float:
    """P(now > base) - P(now < base) over all pairs: -1..1."""
    gt = sum(1 for a in base for b in now if b > a)
    lt = sum(1 for a in base for b in now if b < a)
    return (gt - lt) / (len(base) * len(now))


def _u(base, now) -> float:
    """Mann-Whitney U of ``now``: pairs where now > base, ties counted half."""
    return sum(1.0 if b > a else 0.5 if b == a else 0.0 for a in base for b in now)


def mann_whitney_p(base: list[float], now: list[float], alternative: str) -> float:
    """One-sided Mann-Whitney p-value that ``now`` is shifted ``"greater"`` or ``"less"``
    than ``base`` (exact for small samples, ties handled by enumerating splits)."""
    m, n = len(base), len(now)
    if not m or not n:
        return 1.0
    pooled = list(base) + list(now)
    u_obs = _u(base, now)
    sign = 1 if alternative == "greater" else -1
    if math.comb(m + n, n) <= _EXACT_MAX_SPLITS:
        hits = total = 0
        idx = range(m + n)
        for pick in itertools.combinations(idx, n):
            chosen = set(pick)
            u = _u([pooled[i] for i in idx if i not in chosen], [pooled[i] for i in pick])
            total += 1
            hits += sign * (u - u_obs) >= -1e-9
        return hits / total
    mu = m * n / 2
    ties = {}
    for v in pooled:
        ties[v] = ties.get(v, 0) + 1
    N = m + n
    var = m * n / 12 * ((N + 1) - sum(t ** 3 - t for t in ties.values()) / (N * (N - 1)))
    if var <= 0:
        return 1.0
    z = sign * (u_obs - mu - sign * 0.5) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2))


def check_thresholds(thresholds: dict, where: str) -> None:
    """Refuse a thresholds table with an unknown metric or key, or a negative value."""
    if not isinstance(thresholds, dict):
        raise ConfigError(where, f"expected a table of metrics, got {thresholds!r}")
    for name, t in thresholds.items():
        if name not in METRIC_NAMES:
            raise ConfigError(where, f"unknown metric {name!r}; metrics are {', '.join(METRIC_NAMES)}")
        if not isinstance(t, dict) or set(t) - {"rel", "abs"}:
            raise ConfigError(f"{where}.{name}", f"expected rel and/or abs, got {t!r}")
        for k, v in t.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{where}.{name}.{k}", f"expected a number >= 0, got {v!r}")


def parse_threshold_args(items: list[str]) -> dict:
    """``METRIC=REL:ABS`` (either side may be empty) -> a thresholds table."""
    out: dict = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        rel, colon, abs_ = value.partition(":")
        if not sep or not colon:
            raise ConfigError("--threshold", f"expected METRIC=REL:ABS (e.g. downtime_ms=0.5:20), got {item!r}")
        t = {}
        for key, text in (("rel", rel), ("abs", abs_)):
            if text.strip():
                try:
                    t[key] = float(text)
                except ValueError:
                    raise ConfigError("--threshold", f"{key} of {name} is not a number: {text!r}") from None
        out[name.strip()] = t
    check_thresholds(out, "--threshold")
    return out


def thresholds_with(*overrides: dict) -> dict[str, dict]:
    """Default thresholds of every metric, updated by each override table in turn."""
    out = {m.name: {"rel": m.rel, "abs": m.abs} for m in METRICS}
    for table in overrides:
        for name, t in (table or {}).items():
            out[name] = {**out[name], **t}
    return out


@dataclass
class MetricVerdict:
    """One cell's one metric: the two samples' medians, the effect, the verdict."""

    cell: str
    metric: str
    verdict: str  # improved | same | regressed | n/a
    base_median: float | None
    now_median: float | None
    n_base: int
    n_now: int
    change_rel: float | None = None
    cliffs_delta: float | None = None
    p_value: float | None = None


@dataclass
class Judgement:
    """All verdicts of one comparison.  ``cells``: cell id -> improved | same | regressed |
    failed | new (no baseline) | missing (only in the baseline)."""

    rows: list[MetricVerdict] = field(default_factory=list)
    cells: dict[str, str] = field(default_factory=dict)
    failed_runs: dict[str, list[str]] = field(default_factory=dict)
    alpha: float = DEFAULT_ALPHA
    thresholds: dict = field(default_factory=dict)
    #: median calibration now / in the baseline (1.0 when either side has none)
    slowdown: float = 1.0
    #: how the machine differs between the two sides (:func:`machine_changes`), one line each
    machine_changes: list[str] = field(default_factory=list)

    @property
    def regressed(self) -> bool:
        return any(v in ("regressed", "failed") for v in self.cells.values())

    @property
    def exit_status(self) -> int:
        return 1 if self.regressed else 0

    def to_dict(self) -> dict:
        """The verdicts as JSON (``vmem bench --json``)."""
        from dataclasses import asdict

        return {"kind": "vmem-bench-verdicts", "regressed": self.regressed, "alpha": self.alpha,
                "slowdown": self.slowdown, "machine_changes": self.machine_changes, "thresholds": self.thresholds,
                "cells": self.cells, "failed_runs": self.failed_runs, "rows": [asdict(r) for r in self.rows]}


def machine_slowdown(baseline: list[dict], now: list[dict]) -> float:
    """Median calibration time of ``now``'s runs over the baseline's (1.0 if either has none)."""
    b = [r["calibration_ms"] for r in baseline if r.get("calibration_ms")]
    n = [r["calibration_ms"] for r in now if r.get("calibration_ms")]
    return statistics.median(n) / statistics.median(b) if b and n else 1.0


#: provenance fields (vmem.provenance.collect) that name the machine a run measured, with
#: what a difference in each means to a reader of the verdicts
_MACHINE_FIELDS = (("hostname", "another host"), ("kernel", "another kernel"), ("cpu_model", "another CPU"),
                   ("cpu_count", "another CPU count"), ("memory_bytes", "another memory size"),
                   ("boot_id", "another boot of the machine"))


def _run_provenance(record: dict) -> dict:
    return (record.get("report") or {}).get("provenance") or record.get("provenance") or {}


def _machine_values(runs: list[dict], key: str) -> set:
    return {_run_provenance(r).get(key) for r in runs} - {None}


def _describe(runs: list[dict], key: str, values: set) -> str:
    if key == "boot_id":  # the id says nothing to a reader; when that boot began does
        return ", ".join(sorted({f"booted {_run_provenance(r).get('booted_utc') or '?'}" for r in runs
                                 if _run_provenance(r).get("boot_id") in values}))
    return ", ".join(sorted(map(str, values)))


def machine_changes(baseline: list[dict], now: list[dict]) -> list[str]:
    """How the machine of ``now``'s runs differs from the baseline's, one line per
    provenance field whose values the two sides do not share (runs without the field --
    older records -- say nothing either way).  Empty: the same machine as far as the
    records tell, or records that do not tell."""
    out = []
    for key, meaning in _MACHINE_FIELDS:
        base, cur = _machine_values(baseline, key), _machine_values(now, key)
        if base and cur and base != cur:
            out.append(f"{key}: baseline {_describe(baseline, key, base)}; now {_describe(now, key, cur)} -- "
                       f"{meaning}: a change can be the machine's, not the code's (compare in one session: "
                       "vmem bench --against)")
    return out


def _metric_verdict(cell: str, metric, base: list[float], now: list[float], t: dict, alpha: float,
                    slowdown: float = 1.0) -> MetricVerdict:
    mb = statistics.median(base) if base else None
    mn = statistics.median(now) if now else None
    v = MetricVerdict(cell, metric.name, "n/a", mb, mn, len(base), len(now))
    if len(base) < MIN_RUNS or len(now) < MIN_RUNS or smallest_p(len(base), len(now)) > alpha + 1e-12:
        return v  # too few runs: no verdict could fire either way
    v.change_rel = (mn - mb) / mb if mb else None
    v.cliffs_delta = cliffs_delta(base, now)
    up = mn > mb
    v.p_value = mann_whitney_p(base, now, "greater" if up else "less")
    worse = up if metric.better == "lower" else not up
    # A slower machine now excuses changes in the worse direction, a faster one in the better.
    scale = 1.0
    if metric.timing:
        scale = max(slowdown, 1.0) if worse else max(1 / slowdown, 1.0)
    # rel is a ratio, the same both ways: rel 0.5 means now > 1.5 x base or now < base / 1.5
    lo, hi = sorted((abs(mb), abs(mn)))
    big = abs(mn - mb) > t["abs"] * scale and (hi > (1 + t["rel"]) * scale * lo if lo else True)
    if big and v.p_value <= alpha + 1e-12:
        v.verdict = "regressed" if worse else "improved"
    else:
        v.verdict = "same"
    return v


def judge(baseline: list[dict], now: list[dict], *, thresholds: dict | None = None,
          alpha: float = DEFAULT_ALPHA) -> Judgement:
    """Compare run records (vmem.bench.runner.run_record / baseline runs) cell by cell.

    Args:
        baseline, now: records with ``cell``, ``valid`` and ``metrics``.
        thresholds: full table (thresholds_with()); defaults if None.
    """
    thresholds = thresholds or thresholds_with()
    j = Judgement(alpha=alpha, thresholds=thresholds, slowdown=machine_slowdown(baseline, now),
                  machine_changes=machine_changes(baseline, now))
    by_cell_base: dict[str, list[dict]] = {}
    by_cell_now: dict[str, list[dict]] = {}
    for r in baseline:
        by_cell_base.setdefault(r["cell"], []).append(r)
    for r in now:
        by_cell_now.setdefault(r["cell"], []).append(r)
    for cell, runs in by_cell_now.items():
        bad = [f"repeat {r.get('repeat')}: {r.get('outcome')} ({r.get('reason')})" for r in runs if not r["valid"]]
        if bad:
            j.failed_runs[cell] = bad
        if cell not in by_cell_base:
            j.cells[cell] = "failed" if bad else "new"
            continue
        verdicts = []
        for metric in METRICS:
            b = [r["metrics"][metric.name] for r in by_cell_base[cell]
                 if r["valid"] and r["metrics"].get(metric.name) is not None]
            n = [r["metrics"][metric.name] for r in runs if r["valid"] and r["metrics"].get(metric.name) is not None]
            if not b and not n:
                continue
            mv = _metric_verdict(cell, metric, b, n, thresholds[metric.name], alpha, j.slowdown)
            j.rows.append(mv)
            verdicts.append(mv.verdict)
        j.cells[cell] = ("failed" if bad else "regressed" if "regressed" in verdicts
                         else "improved" if "improved" in verdicts else "same")
    for cell in by_cell_base:
        if cell not in by_cell_now:
            j.cells[cell] = "missing"
    return j


def false_positive_rate(runs: list[dict], *, group_size: int = 3, trials: int = 200, seed: int = 1,
                        thresholds: dict | None = None, alpha: float = DEFAULT_ALPHA) -> dict:
    """How often the rule flags a comparison of one commit against itself.

    ``runs`` are records of one commit with many repeats per cell.  Each trial draws, per
    cell, two disjoint groups of ``group_size`` verified runs at random (a "baseline" and a
    "rerun") and judges them.  Returns the fraction of trials that would exit 1 (any cell
    regressed), the fraction of cell comparisons flagged regressed or improved, and the
    metrics that were flagged, with counts.
    """
    import random

    rng = random.Random(seed)
    by_cell: dict[str, list[dict]] = {}
    for r in runs:
        if r["valid"]:
            by_cell.setdefault(r["cell"], []).append(r)
    usable = {c: rs for c, rs in by_cell.items() if len(rs) >= 2 * group_size}
    if not usable:
        raise ValueError(f"no cell has {2 * group_size} verified runs (needs repeats >= {2 * group_size})")
    failing = cell_flags = cell_total = 0
    flagged_metrics: dict[str, int] = {}
    for _ in range(trials):
        base, now = [], []
        for rs in usable.values():
            pick = rng.sample(rs, 2 * group_size)
            base += pick[:group_size]
            now += pick[group_size:]
        j = judge(base, now, thresholds=thresholds, alpha=alpha)
        failing += j.regressed
        for v in j.cells.values():
            cell_total += 1
            cell_flags += v in ("regressed", "improved")
        for row in j.rows:
            if row.verdict in ("regressed", "improved"):
                key = f"{row.metric} {row.verdict}"
                flagged_metrics[key] = flagged_metrics.get(key, 0) + 1
    return {"trials": trials, "group_size": group_size, "cells": len(usable),
            "runs_per_cell": min(len(rs) for rs in usable.values()),
            "comparison_flagged_rate": failing / trials, "cell_flagged_rate": cell_flags / cell_total,
            "flagged_metrics": flagged_metrics}


def session_false_positive_rate(runs: list[dict], *, thresholds: dict | None = None,
                                alpha: float = DEFAULT_ALPHA) -> dict:
    """Same-commit comparisons as CI makes them: whole sessions (separate ``vmem bench``
    invocations of one commit) judged against each other, every ordered pair.

    Unlike :func:`false_positive_rate` (random splits inside one session), this keeps what
    changes between invocations -- the load of the machine, the page cache -- between the
    two sides.  Returns the sessions, the pairs judged, the fraction that would exit 1, and
    the flagged metrics with counts.
    """
    sessions: dict[str, list[dict]] = {}
    for r in runs:
        sessions.setdefault(r.get("session") or "?", []).append(r)
    if len(sessions) < 2:
        raise ValueError(f"needs runs of at least 2 sessions, got {len(sessions)}")
    pairs = failing = 0
    flagged_metrics: dict[str, int] = {}
    for a, b in itertools.permutations(sessions, 2):
        j = judge(sessions[a], sessions[b], thresholds=thresholds, alpha=alpha)
        pairs += 1
        failing += j.regressed
        for row in j.rows:
            if row.verdict in ("regressed", "improved"):
                key = f"{row.metric} {row.verdict}"
                flagged_metrics[key] = flagged_metrics.get(key, 0) + 1
    return {"sessions": len(sessions), "pairs": pairs, "comparison_flagged_rate": failing / pairs,
            "flagged_metrics": flagged_metrics}
