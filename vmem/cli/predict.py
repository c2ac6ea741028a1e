"""``vmem predict``: its arguments and the command (the simulation is
:mod:`vmem.analysis.simulate`, the range over start offsets :mod:`vmem.analysis.forecast`)."""
from __future__ import annotations

import argparse

from vmem.analysis.model import DEFAULT_COLLECT_S, DEFAULT_SWITCHOVER_S
from vmem.analysis.simulate import (
    DEFAULT_PAUSE_S,
    DEFAULT_SETUP_S,
    POSTCOPY_SIM_MODES,
    THROTTLE_MODELS,
    policy_from_description,
    predict,
    print_forecast,
    print_prediction,
    wide_console,
)
from vmem.analysis.trace import WINDOW_RULES, DirtyTrace
from vmem.errors import ConfigError
from vmem.units import bandwidth_from_arg

__all__ = ["add_predict_arguments", "cmd_predict"]

#: The simulator's fixed costs and start as flags: (flag, dest, type, help); ``*_ms`` dests
#: become the simulator's ``*_s`` parameters, ``sim_seed`` its ``seed``.
_SIM_FLAGS = (
    ("--setup", "setup_s", float, f"seconds from the start to tracking armed (default {DEFAULT_SETUP_S:g}, measured here)"),
    ("--collect-ms", "collect_ms", float, f"per-round collect cost in ms (default {DEFAULT_COLLECT_S * 1e3:g})"),
    ("--pause-ms", "pause_ms", float, f"pause latency in ms: the guest runs on meanwhile (default {DEFAULT_PAUSE_S * 1e3:g})"),
    ("--switchover-ms", "switchover_ms", float, f"downtime that is not sending pages, ms (default {DEFAULT_SWITCHOVER_S * 1e3:g})"),
    ("--start", "start_s", float, "trace time at which the migration starts (default 0)"),
    ("--data-pages", "data_pages", int, "pages round 0 sends (default: the trace's data pages)"),
    ("--seed", "sim_seed", int, "seed of the sub-interval rule and throttle subsampling (default 0)"),
)


def add_predict_arguments(p) -> None:
    """Add ``vmem predict``'s arguments to an argparse parser (policy flags from vmem.migration.policy)."""
    from vmem.migration import policy as pol

    p.add_argument("--trace", required=True, metavar="FILE", help="a dirty trace from vmem profile --out")
    p.add_argument("--bandwidth", metavar="RATE", help="link rate, e.g. 1Gbit, 100M (default: the compared report's cap)")
    p.add_argument("--policy", choices=list(pol.POLICIES), default=None,
                   help="precopy policy (default xen, or the compared report's policy)")
    g = p.add_argument_group("policy options (as for vmem migrate)")
    for opt, names in pol.policy_flags():
        kw = dict(dest=opt.dest, default=None, help=f"{opt.help} [{', '.join(names)}]")
        if opt.type is bool:
            kw["action"] = "store_false" if opt.default else "store_true"
        else:
            kw["metavar"] = opt.dest.upper()
            kw["type"] = str
            choices = pol.OPTION_CHOICES.get(opt.dest)
            if choices:
                kw["choices"] = list(choices)
        g.add_argument(opt.flag, **kw)
    s = p.add_argument_group("simulation")
    for flag, dest, typ, help_ in _SIM_FLAGS:
        s.add_argument(flag, dest=dest, type=typ, default=None, help=help_)
    s.add_argument("--postcopy", choices=list(POSTCOPY_SIM_MODES), default=None,
                   help="off (default), after-precopy (hybrid: post-copy where pre-copy would stop-and-copy) or pure")
    s.add_argument("--calibration", metavar="FILE|none", default=None,
                   help="the host's calibration (vmem calibrate): its fixed costs and copy rate replace the constant "
                        "defaults, and --starts ranges include its noise (default: this host's cached calibration if "
                        "there is one; none: the constants)")
    s.add_argument("--load-factor", type=float, default=None, metavar="X",
                   help="how much slower the host is now than when calibrated (default: measured now with a short "
                        "probe; 1 = as calibrated)")
    s.add_argument("--rule", choices=list(WINDOW_RULES), default="poisson", help="how a round shorter than an interval counts its pages")
    s.add_argument("--throttle-model", choices=list(THROTTLE_MODELS), default="dilate", help="how a policy's throttle slows the guest")
    s.add_argument("--no-loop", action="store_true", help="do not replay the trace from its start when the migration outlasts it")
    s.add_argument("--align", action="store_true",
                   help="with --compare-report: take the start and setup time from the measured run's guest clock -- "
                        "an explanation of the measured run, not a prediction (the default compares the prediction "
                        "a user could make in advance)")
    s.add_argument("--no-align", action="store_true", help=argparse.SUPPRESS)  # the old default's opt-out: now the default
    s.add_argument("--starts", type=int, default=None, metavar="N",
                   help="also simulate from N start offsets spread over the trace (its phases repeating) and print "
                        "the median and the 90 %% range (5th-95th percentile; 10th-90th beside it) of downtime, "
                        "transfer time and pages sent: the prediction's spread for a phased or bursty guest, and the "
                        "start that suits it best (N >= 40 for a range whose ends are not the outermost starts; "
                        "64 is ~0.2 s)")
    o = p.add_argument_group("output")
    o.add_argument("--compare-report", metavar="FILE", help="a measured report (vmem migrate --json) to compare with")
    o.add_argument("--json", metavar="FILE", help="write the predicted report (docs/report.md schema) to FILE")


def _policy_from_args(args, measured: dict | None):
    from vmem.migration import policy as pol

    dests = {opt.dest for opt, _ in pol.policy_flags()}
    given = {d: getattr(args, d) for d in dests if getattr(args, d, None) is not None}
    if args.policy is None and not given and measured and measured.get("policy"):
        return policy_from_description(measured["policy"])
    return pol.make_policy(args.policy or "xen", **given)


def _guest_costs_note(calibration, trace, report=None) -> str:
    """Which calibration guest's costs this trace gets (see Calibration.busy_weight): at its
    whole trace's rate, and at the rate before the predicted pause when that differs."""
    from vmem.analysis.calibration import trace_dirty_rate

    rates = calibration.dirty_rates()
    if calibration.busy_weight(rates.get("idle", 0.0)) >= 1.0:  # no idle runs: the busy guest's costs for all
        return ""
    rate = trace_dirty_rate(trace)
    pred = (report.guest.get("prediction") or {}) if report is not None else {}
    at_pause = pred.get("pause_dirty_pages_per_s")
    if at_pause is not None and calibration.busy_weight(at_pause) != calibration.busy_weight(rate):
        w = calibration.busy_weight(at_pause)
        return (f"; this guest writes {rate:,.0f} pages/s, {at_pause:,.0f} in the second before the predicted pause: "
                f"{w:.0%} of the draws from the busy calibration guest's costs ({rates.get('busy', 0):,.0f} pages/s), "
                f"{1 - w:.0%} from the idle guest's")
    w = calibration.busy_weight(rate)
    return (f"; this guest writes {rate:,.0f} pages/s: {w:.0%} of the draws from the busy calibration guest's costs "
            f"({rates.get('busy', 0):,.0f} pages/s), {1 - w:.0%} from the idle guest's")


def cmd_predict(args) -> int:
    """``vmem predict``: simulate a migration from a trace; compare with a measured report."""
    import json

    from rich.console import Console

    measured = None
    if args.compare_report:
        try:
            with open(args.compare_report) as f:
                measured = json.load(f)
        except OSError as err:
            raise ConfigError("--compare-report", f"cannot read {args.compare_report}: {err.strerror}") from None
        except ValueError as err:
            raise ConfigError("--compare-report", f"{args.compare_report} is not JSON: {err}") from None
        if not isinstance(measured, dict) or "rounds" not in measured:
            raise ConfigError("--compare-report", f"{args.compare_report} is not a vmem migration report")
    bandwidth = bandwidth_from_arg(args.bandwidth)
    policy = _policy_from_args(args, measured)
    params = {"rule": args.rule, "throttle_model": args.throttle_model, "loop": not args.no_loop}
    if args.postcopy is None and measured and measured.get("mode") in ("hybrid", "postcopy"):
        args.postcopy = "after-precopy" if measured["mode"] == "hybrid" else "pure"
    if args.postcopy:
        params["postcopy"] = args.postcopy
    calibration = None
    if (args.calibration or "").lower() != "none":
        from vmem.analysis.calibration import load_calibration

        calibration = load_calibration(args.calibration, required=args.calibration is not None)
    load_factor = 1.0
    if calibration is not None:
        load_factor = args.load_factor if args.load_factor is not None else calibration.load_factor()
    for _flag, dest, _t, _h in _SIM_FLAGS:
        v = getattr(args, dest, None)
        if v is None:
            continue
        if dest.endswith("_ms"):
            params[dest[:-3] + "_s"] = v / 1e3
        elif dest == "sim_seed":
            params["seed"] = v
        else:
            params[dest] = v
    trace = DirtyTrace.load(args.trace)
    report, rows = predict(trace, policy, bandwidth, compare_report=measured, align=args.align and not args.no_align,
                           calibration=calibration, load_factor=load_factor, **params)
    console = wide_console()
    console.print(calibration.describe() + f"; host load factor now {load_factor:.2f} (CPU-bound costs scaled by it)"
                  + _guest_costs_note(calibration, trace, report)
                  if calibration is not None else
                  "[yellow]no calibration of this host (run vmem calibrate): fixed costs are constants, the copy path "
                  "is taken to run at the full link rate, and ranges hold no host noise[/yellow]")
    print_prediction(report, rows, measured, console)
    if args.starts is not None:
        from vmem.analysis.forecast import forecast

        if bandwidth is None and measured and measured.get("bandwidth_limit_bps"):
            bandwidth = float(measured["bandwidth_limit_bps"]) / 8
        fc = forecast(trace, policy, bandwidth, starts=args.starts, calibration=calibration, load_factor=load_factor,
                      **{k: v for k, v in params.items() if k != "start_s"})
        print_forecast(fc, measured, console)
    if args.json:
        report.write(args.json)
        Console(stderr=True).print(f"predicted report written to {args.json}")
    return 0
