"""Stored bench results in airspeed velocity's (asv) results format, so an asv dashboard
(``asv publish``; ``asv compare``) can show vmem's figures beside a project's own.

Layout written under ``DIR`` (asv's ``results_dir``; asv's developer docs, "Benchmark
suite layout and file formats", results format version 2)::

    DIR/benchmarks.json                 {"vmem_bench.<metric>": {...}, "version": 2}
    DIR/<machine>/machine.json          {"machine", "arch", "cpu", "num_cpu", "os", "ram", "version": 1}
    DIR/<machine>/<commit[:8]>-<env>.json   one per machine and commit measured

Mapping: one asv benchmark per metric (``vmem_bench.downtime_ms``...), of type ``track``
with the metric's unit, parametrized over one parameter ``cell`` whose values are the cell
ids in ``repr`` form, as asv stores parameter values (the union over everything exported,
so every file has the same parameter list).  A result file holds, per benchmark and cell, the median of the verified runs of that commit
on that machine (all sessions), ``samples`` (every verified value, in run order),
``stats_q_25``/``stats_q_75``, ``stats_ci_99_a``/``_b`` (an order-statistic interval of
the median: with fewer than 8 runs only ``[min, max]`` is possible, 75 % coverage for 3 --
see :func:`_median_ci`) and ``stats_repeat`` (the count); ``null`` where a cell has no
verified run (asv: failed) and ``NaN`` where it has verified runs but none has that figure
(asv: skipped; e.g. fault latency of a pre-copy migration).  asv keys results by commit:
runs from a modified checkout (``+dirty``) or an installed vmem (no commit) are left out and
counted.  The machine is the run's hostname unless ``machine`` is given.
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import statistics
import subprocess
from datetime import datetime

from vmem.bench.metrics import METRIC_NAMES
from vmem.bench.runner import write_json_file

__all__ = ["export_asv", "BENCHMARK_PREFIX", "RESULT_COLUMNS", "ASV_RESULTS_VERSION"]

BENCHMARK_PREFIX = "vmem_bench."
ASV_RESULTS_VERSION = 2
#: asv's column order for a result row (trailing missing columns may be dropped).
RESULT_COLUMNS = ["result", "params", "version", "started_at", "duration", "stats_ci_99_a", "stats_ci_99_b",
                  "stats_q_25", "stats_q_75", "stats_number", "stats_repeat", "samples", "profile"]
_UNITS = {"_ms": "ms", "_s": "seconds", "_us": "us", "_Bps": "bytes/s", "_bytes": "bytes", "pages_sent": "pages"}


def _unit(metric: str) -> str:
    return next(u for suffix, u in _UNITS.items() if metric.endswith(suffix))


def _provenance(record: dict) -> dict:
    return (record.get("report") or {}).get("provenance") or record.get("provenance") or {}


def _js_ms(iso: str | None) -> int | None:
    """A JavaScript time stamp (ms since the epoch) from an ISO date; None if unreadable."""
    try:
        return int(datetime.fromisoformat(iso).timestamp() * 1000)
    except (TypeError, ValueError):
        return None


def _commit_date_ms(repo: str | None, commit: str) -> int | None:
    if not repo:
        return None
    try:
        out = subprocess.run(["git", "-C", repo, "show", "-s", "--format=%ct", commit], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        return int(out) * 1000
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _version(metric: str) -> str:
    """asv drops results whose version differs from the benchmark's: this changes only
    when what the metric means does (its name and unit)."""
    return hashlib.sha256(f"vmem-bench:{metric}:{_unit(metric)}".encode()).hexdigest()


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _median_ci(values: list[float], coverage: float = 0.99) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: order statistics
    ``[x_(k), x_(n+1-k)]`` with the largest ``k`` whose coverage (binomial, p = 1/2) is at
    least ``coverage``.  Fewer than 8 values cannot reach 99 %: then ``[min, max]``, whose
    coverage is ``1 - 2**(1-n)`` (75 % for 3 runs)."""
    from math import comb

    s = sorted(values)
    n = len(s)
    k = 1
    while k < n // 2 and 1 - 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n >= coverage:
        k += 1
    return s[k - 1], s[n - k]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "unknown"


def export_asv(records: list[dict], out_dir: str, *, machine: str | None = None, repo: str | None = None) -> dict:
    """Write ``records`` (vmem bench run records, any sessions and commits) as asv results
    under ``out_dir``.  Files already there for the same machine and commit are replaced;
    others are left alone, but ``benchmarks.json`` is rewritten for the cells given here.

    Args:
        machine: the asv machine name (default: each run's hostname).
        repo: a git checkout holding the commits, to date them by commit (asv's ``date``);
            without it, or for a commit it lacks, the first run's date stands in.
    Returns:
        ``{"files": [paths written], "skipped": runs left out (no clean commit)}``.
    """
    cells = sorted({r["cell"] for r in records})
    params = [[repr(c) for c in cells]]
    groups: dict[tuple[str, str], list[dict]] = {}
    skipped = 0
    for r in records:
        prov = _provenance(r)
        commit = prov.get("git_commit")
        if not commit or commit.endswith("+dirty"):
            skipped += 1
            continue
        groups.setdefault((_safe(machine or prov.get("hostname") or "unknown"), commit), []).append(r)
    os.makedirs(out_dir, exist_ok=True)
    benchmarks = {BENCHMARK_PREFIX + m: {
        "name": BENCHMARK_PREFIX + m, "type": "track", "unit": _unit(m), "params": params, "param_names": ["cell"],
        "version": _version(m), "timeout": None, "code": f"vmem bench: metric {m} (docs/bench.md)"}
        for m in METRIC_NAMES}
    write_json_file(os.path.join(out_dir, "benchmarks.json"), benchmarks | {"version": 2})
    written = []
    for (mach, commit), runs in sorted(groups.items()):
        prov = _provenance(runs[0])
        python = ".".join((prov.get("python") or platform.python_version()).split(".")[:2])
        env_name = f"vmem-py{python}"
        machine_info = {"machine": mach, "arch": platform.machine(), "cpu": prov.get("cpu_model") or "",
                        "num_cpu": str(prov.get("cpu_count") or ""), "os": f"Linux {prov.get('kernel') or ''}".strip(),
                        "ram": str(prov.get("memory_bytes") or "")}
        mdir = os.path.join(out_dir, mach)
        os.makedirs(mdir, exist_ok=True)
        write_json_file(os.path.join(mdir, "machine.json"), machine_info | {"version": 1})
        run_dates = [d for d in (_js_ms(_provenance(r).get("date_utc")) for r in runs) if d is not None]
        results = {}
        for m in METRIC_NAMES:
            samples = [[r["metrics"][m] for r in runs if r["cell"] == c and r.get("valid")
                        and (r.get("metrics") or {}).get(m) is not None] for c in cells]
            ran = [any(r["cell"] == c and r.get("valid") for r in runs) for c in cells]
            # asv: null = failed (no verified run), NaN = skipped (verified runs, none has
            # this figure: e.g. fault latency of a pre-copy migration)
            results[BENCHMARK_PREFIX + m] = [
                [statistics.median(s) if s else (math.nan if ok else None) for s, ok in zip(samples, ran)],
                params, _version(m),
                min(run_dates) if run_dates else None, None,
                [_median_ci(s)[0] if s else None for s in samples], [_median_ci(s)[1] if s else None for s in samples],
                [_quantile(s, 0.25) if s else None for s in samples],
                [_quantile(s, 0.75) if s else None for s in samples],
                [1 if s else None for s in samples], [len(s) if s else None for s in samples],
                [s or None for s in samples]]
        doc = {"version": ASV_RESULTS_VERSION, "commit_hash": commit, "env_name": env_name,
               "date": _commit_date_ms(repo, commit) or (min(run_dates) if run_dates else 0),
               "params": machine_info | {"python": python}, "python": python, "requirements": {}, "env_vars": {},
               "result_columns": RESULT_COLUMNS, "results": results, "durations": {}}
        path = os.path.join(mdir, f"{commit[:8]}-{env_name}.json")
        write_json_file(path, doc)
        written.append(path)
    return {"files": written, "skipped": skipped}
