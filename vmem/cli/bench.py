"""``vmem bench`` and ``vmem trend``: their arguments and commands (the work is vmem.bench).

    vmem bench --suite standard --save-baseline b.json      # run, store results, write a baseline
    vmem bench --suite standard --baseline b.json           # run, compare; exit 1 on a regression
    vmem bench --matrix m.toml --repeats 5 --html run.html  # a matrix file; an HTML report
    vmem bench --results r.jsonl --session S --baseline b.json   # judge stored runs, no new ones
    vmem bench --suite standard --against ../main                # A/B: the reference checkout's runs interleaved
    vmem trend r.jsonl --html trend.html                     # per metric, per cell, across commits
    vmem trend r.jsonl --asv asv/results                     # the same results for an asv dashboard

Exit status of ``vmem bench``: 0 no regression (and every run completed verified), 1 a
regression or a failed run, 2 bad input (before anything runs).
"""
from __future__ import annotations

import os
import sys

from vmem.errors import ConfigError

__all__ = ["add_bench_arguments", "cmd_bench", "add_trend_arguments", "cmd_trend"]


def add_bench_arguments(parser) -> None:
    """Arguments of ``vmem bench``."""
    from vmem.bench.matrix import MODES, SUITES
    from vmem.bench.metrics import METRIC_NAMES

    src = parser.add_argument_group("what to run (one of; default: the command-line axes below)")
    src.add_argument("--suite", metavar="|".join(SUITES), help="a built-in matrix: standard (CI, under a minute) or full")
    src.add_argument("--matrix", metavar="FILE", help="a matrix in TOML (docs/bench.md)")
    src.add_argument("--results", metavar="FILE", help="run nothing: judge the runs already stored in FILE")
    src.add_argument("--session", metavar="ID", help="with --results: only that session's runs (default: the last one)")
    ax = parser.add_argument_group("command-line axes (comma-separated lists)")
    ax.add_argument("--workloads", default="hotcold", metavar="A,B")
    ax.add_argument("-W", "--workload-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="workload parameter for every workload that takes it")
    ax.add_argument("--sizes", default="32M", metavar="32M,64M")
    ax.add_argument("--policies", default="xen", metavar="A,B")
    ax.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                    help="policy parameter, given to each policy that takes it (as in vmem compare)")
    ax.add_argument("--trackers", default="auto", metavar="auto,uffd-wp,mprotect")
    ax.add_argument("--modes", default="precopy", metavar=",".join(MODES))
    ax.add_argument("--bandwidths", default="unlimited", metavar="unlimited,200M")
    ax.add_argument("--warmup", type=float, default=0.3, metavar="S")
    ax.add_argument("--observe", type=float, default=0.2, metavar="S")
    ax.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help="runs per cell, interleaved (default: the suite's or file's, else 3)")
    v = parser.add_argument_group("verdicts")
    v.add_argument("--baseline", metavar="FILE", help="compare with this baseline; exit 1 on a regression")
    v.add_argument("--against", metavar="DIR",
                   help="A/B: also run every cell from the vmem checkout DIR (the reference commit, native extension "
                        "built), paired and alternating with this one's runs, and judge this one against it")
    v.add_argument("--save-baseline", metavar="FILE", help="write this run's results as a baseline")
    v.add_argument("--threshold", action="append", default=[], metavar="METRIC=REL:ABS",
                   help=f"override a metric's thresholds (metrics: {', '.join(METRIC_NAMES)})")
    v.add_argument("--alpha", type=float, default=None, help="significance level of the rank test (default 0.05)")
    o = parser.add_argument_group("output")
    o.add_argument("--out", default="vmem-bench.jsonl", metavar="FILE",
                   help="append one JSON line per run (full report with provenance) to FILE (default vmem-bench.jsonl)")
    o.add_argument("--html", metavar="FILE", help="write a self-contained HTML report of this run")
    o.add_argument("--json", metavar="FILE", help="write the verdicts (per cell and metric) as JSON")
    o.add_argument("--quiet", action="store_true", help="no per-run lines")


def _split(text: str) -> list[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


def _matrix(args):
    from vmem.analysis.compare import parse_policy_options
    from vmem.bench.matrix import load_matrix, matrix_from_axes, suite_matrix

    if args.suite and args.matrix:
        raise ConfigError("--suite", "give --suite or --matrix, not both")
    if args.suite:
        m = suite_matrix(args.suite)
    elif args.matrix:
        m = load_matrix(args.matrix)
    else:
        m = matrix_from_axes(workloads=_split(args.workloads), workload_args=args.workload_arg, sizes=_split(args.sizes),
                             policies=_split(args.policies), policy_options=parse_policy_options(args.policy_option),
                             trackers=_split(args.trackers), modes=_split(args.modes),
                             bandwidths=_split(args.bandwidths), repeats=3, warmup_s=args.warmup,
                             observe_s=args.observe, seed=args.seed)
    if args.repeats is not None:
        if args.repeats < 1:
            raise ConfigError("--repeats", f"must be >= 1, got {args.repeats}")
        m.repeats = args.repeats
    return m


def cmd_bench(args) -> int:
    """``vmem bench``: validate everything, run (or read) the runs, store, judge, report."""
    from rich.console import Console

    from vmem.bench.runner import read_baseline, read_records, run_matrix, write_baseline
    from vmem.bench.verdict import DEFAULT_ALPHA, judge, parse_threshold_args, thresholds_with
    from vmem.ram import format_bytes, mem_available_bytes

    err = Console(stderr=True)
    cli_thresholds = parse_threshold_args(args.threshold)
    if args.alpha is not None and not 0 < args.alpha < 1:
        raise ConfigError("--alpha", f"must be between 0 and 1, got {args.alpha}")
    if args.against and args.baseline:
        raise ConfigError("--against", "give --baseline FILE or --against DIR, not both")
    baseline = read_baseline(args.baseline) if args.baseline else None
    against = None
    if args.against:
        from vmem.bench.runner import check_tree

        against = check_tree(args.against)
    if args.results and (args.suite or args.matrix or against):
        raise ConfigError("--results", "judges stored runs: it takes no --suite, --matrix or --against")
    if args.results:
        records = read_records(args.results)
        if not records:
            raise ConfigError("--results", f"{args.results} holds no runs")
        session = args.session or records[-1].get("session")
        records = [r for r in records if r.get("session") == session]
        if not records:
            raise ConfigError("--session", f"no runs of session {session!r} in {args.results}")
        suite, file_thresholds, alpha = records[0].get("suite", "results"), {}, None
    else:
        m = _matrix(args)
        need = 2 * max(c.size_bytes for c in m.cells)
        if need > mem_available_bytes():
            raise ConfigError("--sizes", f"the largest cell needs {format_bytes(need)}, only "
                                         f"{format_bytes(mem_available_bytes())} is available")
        total = len(m.cells) * m.repeats * (2 if against else 1)
        err.print(f"vmem bench: {m.name}: {len(m.cells)} cells x {m.repeats} repeats"
                  f"{f' x 2 (A/B against {against})' if against else ''} = {total} migrations; "
                  f"results appended to {args.out}", soft_wrap=True)

        def on_start(k, n, cell, repeat):
            if not args.quiet:
                err.print(f"[{k + 1}/{n}] {cell.cell_id} (repeat {repeat})", soft_wrap=True, end="")

        def on_run(rec):
            if not args.quiet:
                mt = rec["metrics"]
                ok = "verified" if rec["valid"] else f"[red]{rec['outcome']}: {rec['reason']}[/red]"
                side = f"{rec['side']}: " if rec.get("side") else ""
                err.print(f" -> {side}{ok}, downtime {mt['downtime_ms'] or 0:.1f} ms, "
                          f"total {mt['migration_time_s'] or 0:.2f} s", soft_wrap=True)

        records = run_matrix(m, args.out, against=against, on_start=on_start, on_run=on_run)
        suite, file_thresholds, alpha = m.name, m.thresholds, m.alpha
    alpha = args.alpha or alpha or DEFAULT_ALPHA
    reference = baseline["runs"] if baseline is not None else None
    if any(r.get("side") for r in records):  # an A/B session: its own baseline side
        if reference is None:
            reference = [r for r in records if r.get("side") == "baseline"]
        records = [r for r in records if r.get("side") != "baseline"]
    if args.save_baseline:
        write_baseline(args.save_baseline, records, suite=suite)
        err.print(f"baseline written to {args.save_baseline}")
    judgement = None
    if reference is not None:
        from vmem.bench.verdict import smallest_p

        per_cell = {}
        for r in records:
            per_cell[r["cell"]] = per_cell.get(r["cell"], 0) + r["valid"]
        shared = [c for c in per_cell if any(b["cell"] == c for b in reference)]
        n_now = min((per_cell[c] for c in shared), default=0)
        n_base = min((sum(1 for b in reference if b["cell"] == c and b["valid"]) for c in shared), default=0)
        if shared and smallest_p(n_base, n_now) > alpha:
            err.print(f"[yellow]warning: {n_base} baseline and {n_now} new verified runs of a cell cannot reach "
                      f"p <= {alpha:g} (smallest p {smallest_p(n_base, n_now):.3f}): such cells get no verdict; "
                      f"use --repeats 3 or more[/yellow]", soft_wrap=True)
        thresholds = thresholds_with(file_thresholds, cli_thresholds)
        judgement = judge(reference, records, thresholds=thresholds, alpha=alpha)
        print_judgement(judgement, Console() if sys.stdout.isatty() else Console(width=200))
        if args.json:
            import json

            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(judgement.to_dict(), f, indent=1)
                f.write("\n")
    if args.html:
        from vmem.bench.html import write_run_html

        write_run_html(args.html, records, judgement=judgement, baseline=reference)
        err.print(f"HTML report: {args.html}")
    failed = [r for r in records if not r["valid"]]
    if judgement is not None:
        return judgement.exit_status
    return 1 if failed else 0


def _fmt(metric: str, v) -> str:
    if v is None:
        return "-"
    if metric.endswith("_bytes"):
        return f"{v / 2**20:,.1f} MiB"
    if metric.endswith("_Bps"):
        return f"{v / 1e6:,.0f} MB/s"
    if metric == "pages_sent":
        return f"{v:,.0f}"
    return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def print_judgement(j, console) -> None:
    """The verdict table: one row per cell and metric, then one line per cell."""
    from rich.table import Table

    styles = {"regressed": "bold red", "failed": "bold red", "improved": "green", "same": "white", "n/a": "dim",
              "new": "yellow", "missing": "yellow"}
    t = Table(title=f"vmem bench verdicts (rank test alpha {j.alpha:g}; thresholds docs/bench.md; "
                    f"machine {j.slowdown:.2f}x the baseline's calibration time)")
    for c in ("cell", "metric", "baseline", "now", "change", "Cliff's δ", "p", "verdict"):
        t.add_column(c, justify="left" if c in ("cell", "metric", "verdict") else "right", overflow="fold")
    for r in j.rows:
        change = "-" if r.change_rel is None else f"{r.change_rel * 100:+.0f}%"
        t.add_row(r.cell, r.metric, f"{_fmt(r.metric, r.base_median)} (n={r.n_base})",
                  f"{_fmt(r.metric, r.now_median)} (n={r.n_now})", change,
                  "-" if r.cliffs_delta is None else f"{r.cliffs_delta:+.2f}",
                  "-" if r.p_value is None else f"{r.p_value:.3f}", f"[{styles[r.verdict]}]{r.verdict}[/]")
    console.print(t)
    for line in j.machine_changes:
        console.print(f"[yellow]caution: the baseline ran on another machine or boot -- {line}[/yellow]",
                      soft_wrap=True)
    for cell, v in j.cells.items():
        console.print(f"[{styles[v]}]{v:9}[/] {cell}", soft_wrap=True)
        for line in j.failed_runs.get(cell, []):
            console.print(f"          {line}", soft_wrap=True)
    console.print("[bold red]REGRESSION[/]" if j.regressed else "[green]no regression[/]")


def add_trend_arguments(parser) -> None:
    """Arguments of ``vmem trend``."""
    parser.add_argument("results", nargs="+", metavar="RESULTS.jsonl", help="results files of vmem bench")
    parser.add_argument("--html", metavar="FILE", help="the trend view to write (self-contained)")
    parser.add_argument("--metrics", metavar="A,B", help="only these metrics (default: all)")
    parser.add_argument("--asv", metavar="DIR", help="also (or instead) write the results in asv's results format "
                                                     "into DIR, an asv results_dir (docs/bench.md)")
    parser.add_argument("--asv-machine", metavar="NAME", help="asv machine name (default: each run's hostname)")


def cmd_trend(args) -> int:
    """``vmem trend``: one graph per metric and cell, medians per commit in date order."""
    from vmem.bench.html import write_trend_html
    from vmem.bench.metrics import METRIC_NAMES
    from vmem.bench.runner import read_records

    metrics = _split(args.metrics) if args.metrics else list(METRIC_NAMES)
    for name in metrics:
        if name not in METRIC_NAMES:
            raise ConfigError("--metrics", f"unknown metric {name!r}; metrics are {', '.join(METRIC_NAMES)}")
    if not args.html and not args.asv:
        raise ConfigError("--html", "give --html FILE, --asv DIR or both")
    records = [r for path in args.results for r in read_records(path)]
    if not records:
        raise ConfigError("results", "no runs in the given files")
    if args.html:
        write_trend_html(args.html, records, metrics=metrics)
        print(f"trend view: {args.html}")
    if args.asv:
        from vmem.bench.asv import export_asv
        from vmem.provenance import git_commit

        # date the commits from the checkout this vmem runs from, if it is one
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) if git_commit() else None
        done = export_asv(records, args.asv, machine=args.asv_machine, repo=repo)
        print(f"asv results: {len(done['files'])} file(s) under {args.asv}"
              + (f"; {done['skipped']} run(s) left out: from a modified checkout (+dirty) or without a commit"
                 if done["skipped"] else ""))
        if not done["files"]:
            return 1
    return 0
