"""``vmem compare``: its arguments and the command (the comparison itself is
:mod:`vmem.analysis.compare`)."""
from __future__ import annotations

import sys
from contextlib import nullcontext

from rich.console import Console

from vmem.analysis.compare import (
    Comparison,
    PolicyRun,
    build_policies,
    parse_policy_options,
    policy_names,
    print_comparison,
    run_comparison,
    write_comparison,
)
from vmem.cli.args import add_guest_arguments
from vmem.cli.display import LiveDisplay
from vmem.errors import ConfigError
from vmem.ram import parse_size
from vmem.units import bandwidth_from_arg

__all__ = ["add_compare_arguments", "cmd_compare"]


def add_compare_arguments(parser) -> None:
    """Arguments of ``vmem compare``."""
    try:
        default_policies = ",".join(policy_names())
    except Exception:  # pragma: no cover - the policy module is being rebuilt
        default_policies = "xen,threshold"
    parser.add_argument("--policies", default=default_policies, metavar="A,B,...",
                        help=f"comma-separated policies to compare (default: all built-ins: {default_policies})")
    add_guest_arguments(parser, title="guest (the same for every policy)", default_size="256M",
                        warmup_help="seconds each guest runs before its migration")
    m = parser.add_argument_group("migration")
    m.add_argument("--bandwidth", metavar="RATE",
                   help="cap the link, e.g. 100M (bytes/s), 1Gbit; without a cap every policy converges at once")
    m.add_argument("--tracker", default="auto", choices=["auto", "uffd-wp", "mprotect", "kvm-log", "kvm-ring"],
                   help="dirty tracking mechanism (kvm-log, kvm-ring: --backend kvm)")
    m.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="policy parameter, repeatable (e.g. precopy_iterations=3, max_downtime=50); given to each "
                        "policy that takes it, ignored by the others")
    m.add_argument("--max-downtime-ms", "--max-downtime", dest="max_downtime_ms", type=float, metavar="MS",
                   help="the downtime limit, as in vmem migrate: short for --policy-option max_downtime_ms=MS "
                        "(given to each policy that takes it)")
    m.add_argument("--observe", type=float, default=0.2, metavar="S", help="let each migrated guest run S seconds after commit")
    o = parser.add_argument_group("output")
    o.add_argument("--out", "-o", required=True, metavar="DIR",
                   help="directory for comparison.png, per-policy graphs, report.html and the JSON reports")
    o.add_argument("--json", metavar="FILE", help="also write the comparison (all reports) as JSON to FILE")
    o.add_argument("--quiet", action="store_true", help="no per-round display, only the table")


def cmd_compare(args) -> int:
    """``vmem compare``.  Exit status: 0 all runs finished (completed or aborted by their
    policy), 1 some migration failed; ConfigError for bad arguments (before any boot)."""
    size = parse_size(args.size)
    from vmem.cli.args import guest_params_from_args

    params = guest_params_from_args(args)
    bandwidth = bandwidth_from_arg(args.bandwidth)
    if args.warmup < 0:
        raise ConfigError("--warmup", f"must be >= 0, got {args.warmup}")
    extra = [f"max_downtime_ms={args.max_downtime_ms:g}"] if getattr(args, "max_downtime_ms", None) is not None else []
    options = parse_policy_options(list(args.policy_option) + extra)
    runs, ignored = build_policies(args.policies, options)   # validate before booting anything
    names = [n for n, _, _ in runs]
    err = Console(stderr=True)
    for key, by in ignored.items():
        err.print(f"note: policy option {key}={options[key]} is ignored by {', '.join(by)} (it does not take it)",
                  soft_wrap=True)
    if not bandwidth:
        err.print("note: no --bandwidth: on an uncapped local link every policy converges almost at once", soft_wrap=True)

    total = len(names)
    counter = {"i": 0}

    def progress_factory(name):
        counter["i"] += 1
        err.print(f"[bold][{counter['i']}/{total}] {name}[/bold]: booting a {args.size} guest running {args.workload} "
                  f"{params or ''}, warming up {args.warmup:g} s, migrating", soft_wrap=True)
        return LiveDisplay(err, enabled=True) if not args.quiet else nullcontext(None)

    def on_run(run: PolicyRun) -> None:
        r = run.report
        err.print(f"    -> {r.get('outcome')}: {r.get('reason')}", soft_wrap=True)
        done.append(run)

    done: list[PolicyRun] = []
    cmp = None
    try:
        cmp = run_comparison(names, workload=args.workload, params=params, size_bytes=size, bandwidth_Bps=bandwidth,
                             seed=args.seed, warmup_s=args.warmup, policy_options=options, tracker=args.tracker,
                             observe_s=args.observe, progress_factory=progress_factory, on_run=on_run,
                             backend=args.backend)
    except KeyboardInterrupt:
        if done:
            partial = Comparison(runs=done, workload=args.workload, params=params, size_bytes=size,
                                 bandwidth_Bps=bandwidth, seed=args.seed, warmup_s=args.warmup,
                                 policy_options=options, ignored_options=ignored, interrupted=True)
            written = write_comparison(partial, args.out, json_path=args.json)
            err.print(f"interrupted: results of {len(done)} finished run{'s' if len(done) != 1 else ''} written to {written['html']}")
        raise
    out_console = Console() if sys.stdout.isatty() else Console(width=160)
    print_comparison(cmp, out_console)
    written = write_comparison(cmp, args.out, json_path=args.json)
    err.print(f"graphs: {len(written['graphs'])} PNG files in {args.out}", soft_wrap=True)
    err.print(f"report: {written['html']}", soft_wrap=True)
    err.print(f"JSON:   {written['json']}" + (f" and {args.json}" if args.json else ""), soft_wrap=True)
    return 1 if any(r.report.get("outcome") == "failed" for r in cmp.runs) else 0
