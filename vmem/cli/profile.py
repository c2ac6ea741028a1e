"""``vmem profile``: its arguments and the command (the profiling and the analysis are
:mod:`vmem.analysis.profile`)."""
from __future__ import annotations

import json
import time

import numpy as np

from vmem.analysis.profile import (
    DEFAULT_BANDWIDTHS,
    DEFAULT_DOWNTIME_GOAL_S,
    analyse,
    check_duration,
    print_analysis,
    profile_guest,
    run_profile,
)
from vmem.analysis.trace import DirtyTrace
from vmem.errors import ConfigError
from vmem.jsonout import json_default

__all__ = ["add_profile_arguments", "cmd_profile"]


def add_profile_arguments(p) -> None:
    """Add ``vmem profile``'s arguments to an argparse parser (``p``)."""
    g = p.add_argument_group("guest")
    g.add_argument("--workload", default="hotcold", help="built-in workload or module:Class (default hotcold)")
    g.add_argument("--size", default="256M", help="guest RAM, e.g. 256M, 1G (default 256M)")
    g.add_argument("-W", "--workload-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="workload parameter, repeatable (e.g. -W rate=5000)")
    g.add_argument("--seed", type=int, default=1, help="workload RNG seed (default 1, as vmem migrate)")
    g.add_argument("--warmup", type=float, default=0.5, metavar="S", help="seconds the guest runs before profiling (default 0.5, as vmem migrate)")
    r = p.add_argument_group("profile")
    r.add_argument("--duration", type=float, default=10.0, metavar="S", help="seconds to profile (default 10)")
    r.add_argument("--interval", type=float, default=100.0, metavar="MS", help="collect interval in ms (default 100)")
    r.add_argument("--tracker", default="auto", choices=["auto", "uffd-wp", "mprotect", "kvm-log", "kvm-ring"],
                   help="dirty tracker (default auto: uffd-wp; a KVM guest: kvm-log)")
    g.add_argument("--backend", default="process", choices=["process", "kvm", "xen"],
                   help="process: boot a vmem guest (default); kvm: a KVM virtual machine (README \"KVM guests\"); "
                        "xen: profile the running Xen PVH domain --domain with Xen's log-dirty, from dom0 "
                        "(docs/xen.md)")
    r.add_argument("--from-trace", metavar="FILE", help="analyse an existing trace instead of running a guest")
    r.add_argument("--domain", metavar="NAME", help="with --backend xen: the domain to profile (xl list)")
    r.add_argument("--record-only", action="store_true",
                   help="save the trace (--out) and stop: analyse it elsewhere with --from-trace (a slow dom0 "
                        "need not run the simulator)")
    a = p.add_argument_group("analysis")
    a.add_argument("--bandwidth", action="append", metavar="RATE",
                   help=f"link rate to predict for, repeatable (default {', '.join(DEFAULT_BANDWIDTHS)})")
    a.add_argument("--downtime-goal-ms", "--downtime-goal", dest="downtime_goal", type=float,
                   default=DEFAULT_DOWNTIME_GOAL_S * 1e3, metavar="MS",
                   help="downtime you aim for (default 300 ms, QEMU/libvirt's default; --downtime-goal is the old name)")
    a.add_argument("--max-downtime-ms", "--max-downtime", dest="max_downtime", type=float, metavar="MS",
                   help="downtime above which you would rather abort (default 3x the goal; the same flag as vmem "
                        "migrate's; --max-downtime is the old name)")
    o = p.add_argument_group("output")
    a.add_argument("--calibration", metavar="FILE|none", default=None,
                   help="the host's calibration (vmem calibrate) for the predictions (default: this host's cached one "
                        "if there is one; none: constant fixed costs, full link rate)")
    o.add_argument("--out", metavar="FILE", help="save the dirty trace (.npz) to FILE (for vmem predict)")
    o.add_argument("--json", metavar="FILE", help="write the analysis as JSON to FILE")


def cmd_profile(args) -> int:
    """``vmem profile``: record (or load) a trace, analyse it, print and save.  Returns the exit status."""
    from rich.console import Console

    from vmem.units import bandwidth_from_arg

    console = Console(stderr=True)
    bandwidths = None
    if args.bandwidth:
        bandwidths = []
        for b in args.bandwidth:
            bandwidths.append(bandwidth_from_arg(b))  # a bare number is refused, as in vmem migrate
    goal_s = args.downtime_goal / 1e3
    max_s = args.max_downtime / 1e3 if args.max_downtime is not None else None
    if not goal_s > 0:
        raise ConfigError("--downtime-goal-ms", f"must be > 0 ms, got {args.downtime_goal!r}")
    if max_s is not None and max_s < goal_s:
        raise ConfigError("--max-downtime-ms", f"must be at least --downtime-goal-ms ({args.downtime_goal:g} ms)")
    if args.from_trace:
        trace = DirtyTrace.load(args.from_trace)
    elif args.backend == "xen":
        from vmem.xen.domain import XenDomain, XenProfileGuest

        if not args.domain:
            raise ConfigError("--domain", "--backend xen profiles a running domain: name it with --domain NAME")
        interval_s = args.interval / 1e3
        check_duration(args.duration, interval_s)
        console.print(f"profiling Xen domain [bold]{args.domain}[/bold] for {args.duration:g} s with log-dirty "
                      f"(CLEAN every {args.interval:g} ms, no migration)…")
        with XenDomain(args.domain) as dom:
            guest = XenProfileGuest(dom)
            trace = profile_guest(guest, args.duration, interval_s, tracker=guest.tracker())
        trace.workload = {"backend": "xen", "domain": args.domain}
        if args.out:
            trace.save(args.out)
            console.print(f"trace written to {args.out} ({trace.n_intervals} intervals, {len(trace.pages):,} page entries)")
    else:
        interval_s = args.interval / 1e3
        check_duration(args.duration, interval_s)
        console.print(f"profiling a {args.size} guest running [bold]{args.workload}[/bold] for {args.duration:g} s "
                      f"(collect every {args.interval:g} ms, no migration)…")
        trace = run_profile(args.workload, None, args.size, duration_s=args.duration, interval_s=interval_s,
                            tracker=args.tracker, seed=args.seed, warmup_s=args.warmup, workload_args=args.workload_arg,
                            backend=args.backend)
        if args.out:
            trace.save(args.out)
            console.print(f"trace written to {args.out} ({trace.n_intervals} intervals, {len(trace.pages):,} page entries)")
    if args.record_only:
        if not args.out:
            raise ConfigError("--record-only", "keeps only the trace: give --out FILE")
        return 0
    calibration = None
    if (args.calibration or "").lower() != "none":
        from vmem.analysis.calibration import load_calibration

        calibration = load_calibration(args.calibration, required=args.calibration is not None)
    console.print(calibration.describe() if calibration is not None else
                  "no calibration of this host (vmem calibrate): predictions use constant fixed costs")
    t0 = time.monotonic()
    analysis = analyse(trace, bandwidths, downtime_goal_s=goal_s, max_downtime_s=max_s, calibration=calibration)
    if calibration is not None:
        analysis["calibration"] = calibration.describe()
    analysis["analysis_s"] = round(time.monotonic() - t0, 3)
    print_analysis(analysis)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(analysis, f, indent=2, default=json_default)
            f.write("\n")
        console.print(f"analysis written to {args.json}")
    return 0


