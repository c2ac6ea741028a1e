"""HTML views of regression runs: one page per ``vmem bench`` run, and a trend across commits.

Both are single self-contained files (PNGs embedded, no external assets; the page
machinery and plot style are vmem.analysis.graphs').  The PNGs are drawn into a private
temporary directory that is removed once they are embedded.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile

from vmem.analysis import graphs
from vmem.bench.metrics import METRICS

__all__ = ["write_run_html", "write_trend_html", "commit_of"]

_METRIC = {m.name: m for m in METRICS}


def commit_of(record: dict) -> str:
    """The commit a run measured (``provenance.git_commit``; an install: ``vmem VERSION``)."""
    prov = (record.get("report") or {}).get("provenance") or record.get("provenance") or {}
    return prov.get("git_commit") or f"vmem {prov.get('vmem_version', '?')}"


def _date_of(record: dict) -> str:
    prov = (record.get("report") or {}).get("provenance") or record.get("provenance") or {}
    return prov.get("date_utc") or ""


def _scale(metric: str) -> tuple[float, str]:
    if metric.endswith("_bytes"):
        return 2 ** 20, metric.removesuffix("_bytes") + " (MiB)"
    if metric.endswith("_Bps"):
        return 1e6, metric.removesuffix("_Bps") + " (MB/s)"
    return 1.0, metric


@graphs._styled
def _plot_samples(metric: str, cells: list[str], base: dict, now: dict, verdicts: dict, path: str) -> str:
    """One row per cell: the baseline's runs (grey) and this run's (coloured by verdict)."""
    div, label = _scale(metric)
    fig = graphs._new_figure(9, 0.5 + 0.45 * len(cells))
    ax = fig.add_subplot()
    colours = {"regressed": "#c0392b", "improved": "#27ae60", "same": "#2c3e50", "n/a": "#2c3e50"}
    for i, cell in enumerate(cells):
        b = [v / div for v in base.get(cell, [])]
        n = [v / div for v in now.get(cell, [])]
        ax.scatter(b, [i + 0.15] * len(b), marker="o", color="#aaaaaa", s=22, label="baseline" if i == 0 else None)
        ax.scatter(n, [i - 0.15] * len(n), marker="D", s=22, color=colours.get(verdicts.get(cell, "n/a"), "#2c3e50"),
                   label="this run" if i == 0 else None)
        for vals, y, c in ((b, i + 0.15, "#888888"), (n, i - 0.15, "#000000")):
            if vals:
                med = statistics.median(vals)
                ax.plot([med, med], [y - 0.12, y + 0.12], color=c, lw=2)
    ax.set_yticks(range(len(cells)), [c if len(c) < 70 else c[:67] + "..." for c in cells], fontsize=7)
    ax.set_xlabel(label)
    ax.invert_yaxis()
    if any(base.values()):
        ax.legend(loc="best", fontsize=7)
    return graphs._save(fig, path)


def _values(records: list[dict], metric: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in records:
        v = (r.get("metrics") or {}).get(metric)
        if r.get("valid") and v is not None:
            out.setdefault(r["cell"], []).append(v)
    return out


def _run_table(records: list[dict]) -> dict:
    rows = []
    for r in records:
        m = r.get("metrics") or {}
        rows.append([r.get("order"), r["cell"], r.get("repeat"), r.get("outcome"), "yes" if r.get("valid") else "no",
                     f"{m.get('downtime_ms') or 0:.1f}", f"{m.get('blackout_ms') or 0:.1f}",
                     f"{m.get('migration_time_s') or 0:.3f}", f"{m.get('pages_sent') or 0:,.0f}"])
    return {"columns": ["#", "cell", "repeat", "outcome", "verified", "downtime ms", "blackout ms", "migration s",
                        "pages sent"], "rows": rows, "caption": "every run, in run order"}


def write_run_html(path: str, records: list[dict], *, judgement=None, baseline: list[dict] | None = None) -> str:
    """The page of one ``vmem bench`` run: provenance, verdicts, per-metric strip plots
    (baseline runs beside this run's), every run.  Returns ``path``."""
    tmp = tempfile.mkdtemp(prefix=f"vmem-bench-html-{os.getpid()}-")
    try:
        cells = list(dict.fromkeys(r["cell"] for r in records))
        first = records[0].get("report") or {}
        prov = first.get("provenance") or {}
        intro = [f"Suite {records[0].get('suite')}, session {records[0].get('session')}: {len(cells)} cells, "
                 f"{len(records)} runs ({sum(1 for r in records if r.get('valid'))} verified).",
                 "Provenance: " + ", ".join(f"{k} {prov.get(k)}" for k in ("git_commit", "vmem_version", "kernel",
                                                                          "hostname", "cpu_count", "booted_utc",
                                                                          "date_utc"))]
        sections = [{"heading": "Run", "text": intro}]
        cell_verdicts: dict[str, dict[str, str]] = {}
        if judgement is not None:
            rows = []
            for v in judgement.rows:
                cell_verdicts.setdefault(v.metric, {})[v.cell] = v.verdict
                rows.append([v.cell, v.metric, v.base_median, v.now_median,
                             "" if v.change_rel is None else f"{v.change_rel * 100:+.0f}%",
                             "" if v.cliffs_delta is None else f"{v.cliffs_delta:+.2f}",
                             "" if v.p_value is None else f"{v.p_value:.3f}", v.verdict])
            sections.append({"heading": "Verdicts against the baseline",
                             "text": [f"{'REGRESSION' if judgement.regressed else 'No regression'}. "
                                      f"Rule: medians beyond both thresholds and a one-sided Mann-Whitney test at "
                                      f"alpha {judgement.alpha:g}; the machine took {judgement.slowdown:.2f}x the "
                                      f"baseline's calibration time, timing thresholds scaled accordingly "
                                      f"(docs/bench.md)."]
                                     + [f"Caution: the baseline ran on another machine or boot -- {line}"
                                        for line in judgement.machine_changes]
                                     + [f"{c}: {v}" for c, v in judgement.cells.items()],
                             "table": {"columns": ["cell", "metric", "baseline median", "median", "change", "Cliff's δ",
                                                   "p", "verdict"], "rows": rows}})
        images = []
        for metric in METRICS:
            now = _values(records, metric.name)
            if not now:
                continue
            base = _values(baseline or [], metric.name)
            png = _plot_samples(metric.name, cells, base, now, cell_verdicts.get(metric.name, {}),
                                os.path.join(tmp, f"{metric.name}.png"))
            images.append((png, f"{metric.name}: {metric.description}; {metric.better} is better. "
                                "Dots: runs; bars: medians."))
        sections.append({"heading": "Metrics per cell", "images": images})
        sections.append({"heading": "Runs", "table": _run_table(records)})
        return graphs.write_html(path, f"vmem bench: {records[0].get('suite')}", sections)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@graphs._styled
def _plot_trend(metric: str, commits: list[str], series: dict[str, list[list[float]]], path: str) -> str:
    div, label = _scale(metric)
    fig = graphs._new_figure(9, 4.2)
    ax = fig.add_subplot()
    xs = list(range(len(commits)))
    for cell, per_commit in series.items():
        pts = [(x, statistics.median(v) / div, min(v) / div, max(v) / div) for x, v in zip(xs, per_commit) if v]
        if not pts:
            continue
        x, med, lo, hi = zip(*pts)
        ax.errorbar(x, med, yerr=[[m - a for m, a in zip(med, lo)], [b - m for m, b in zip(med, hi)]], marker="o",
                    ms=4, capsize=3, label=cell if len(cell) < 60 else cell[:57] + "...")
    ax.set_xticks(xs, [c[:10] for c in commits], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(label)
    ax.set_title(f"{metric}: median per commit (bars: min..max of the runs)")
    ax.legend(fontsize=6, loc="best")
    return graphs._save(fig, path)


def write_trend_html(path: str, records: list[dict], *, metrics: list[str]) -> str:
    """The trend view: per metric, one line per cell through the commits (ordered by their
    first run's date), median with the range of the verified runs.  Returns ``path``."""
    first_seen: dict[str, str] = {}
    for r in records:
        c = commit_of(r)
        d = _date_of(r)
        if c not in first_seen or d < first_seen[c]:
            first_seen[c] = d
    commits = sorted(first_seen, key=lambda c: first_seen[c])
    cells = list(dict.fromkeys(r["cell"] for r in records))
    tmp = tempfile.mkdtemp(prefix=f"vmem-trend-{os.getpid()}-")
    try:
        images = []
        for metric in metrics:
            series = {cell: [[] for _ in commits] for cell in cells}
            for r in records:
                v = (r.get("metrics") or {}).get(metric)
                if r.get("valid") and v is not None:
                    series[r["cell"]][commits.index(commit_of(r))].append(v)
            series = {c: s for c, s in series.items() if any(s)}
            if series:
                images.append((_plot_trend(metric, commits, series, os.path.join(tmp, f"{metric}.png")),
                               f"{metric}: {_METRIC[metric].description}; {_METRIC[metric].better} is better."))
        table = {"columns": ["commit", "first run (UTC)", "runs", "verified"],
                 "rows": [[c, first_seen[c], sum(1 for r in records if commit_of(r) == c),
                           sum(1 for r in records if commit_of(r) == c and r.get("valid"))] for c in commits]}
        sections = [{"heading": "Commits", "text": [f"{len(records)} runs of {len(cells)} cells."], "table": table},
                    {"heading": "Metrics across commits", "images": images}]
        return graphs.write_html(path, "vmem bench: trend", sections)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
