"""Working-set profiling: run a guest under dirty logging without migrating it.

Andrew Cooper's first step (xen-devel, 2017-03-29): "run the guest under logdirty for a
period of time to establish the working set, and how steady it is.  From this, you have
a baseline for the target threshold, and a plausible way of estimating the downtime."

* :func:`profile_guest` records a :class:`~vmem.analysis.trace.DirtyTrace` of a running guest
  (a :class:`vmem.migration.backend.SourceGuest` that :func:`vmem.tracking.make_tracker`
  can track); :func:`run_profile` boots one first.
* :func:`analyse` turns a trace into numbers: dirty pages per interval, the writable
  working set (WWS) over several windows, how steady they are, the predicted downtime and
  total time of every built-in policy at each bandwidth (by the simulator), and
  recommended thresholds with the formulas behind them.

The command line, ``vmem profile``, is :mod:`vmem.cli.profile`.
"""
from __future__ import annotations

import math
import time

import numpy as np

from guests.workload import load_workload, parse_params
from vmem.errors import ConfigError
from vmem.migration.backend import GuestSpec, boot_guest
from vmem.ram import parse_size
from vmem.tracking import make_tracker
from vmem.analysis.model import DEFAULT_COLLECT_S, DEFAULT_SWITCHOVER_S, PrecopyModel, closed_form, switch_backlog_pages
from vmem.analysis.trace import DirtyTrace, now_unix

__all__ = [
    "profile_guest",
    "run_profile",
    "analyse",
    "wws_curve",
    "print_analysis",
    "validate_prediction",
    "check_duration",
    "DEFAULT_WINDOWS_S",
    "DEFAULT_BANDWIDTHS",
    "DEFAULT_DOWNTIME_GOAL_S",
]

DEFAULT_WINDOWS_S = (0.1, 0.5, 1.0, 2.0, 5.0)
DEFAULT_BANDWIDTHS = ("1Gbit", "10Gbit")
#: QEMU's and libvirt's default maximum downtime.
DEFAULT_DOWNTIME_GOAL_S = 0.300
#: Coefficient of variation of per-interval dirty counts below which we call a guest steady.
STEADY_CV = 0.25
#: The WWS "levels off" when doubling the window adds less than this fraction.
LEVEL_OFF_GROWTH = 0.10
MAX_DURATION_S = 3600.0


# --- recording --------------------------------------------------------------------------------

def profile_guest(guest, duration_s: float, interval_s: float = 0.1, *, tracker: str = "auto",
                  on_interval=None) -> DirtyTrace:
    """Record which pages ``guest`` writes, interval by interval, for ``duration_s``.

    Arms a dirty tracker, collects every ``interval_s`` (absolute deadlines, so collect
    costs do not stretch the intervals; a late collect simply gets a longer interval,
    recorded as such in ``times_s``), and disarms it.  The guest is not paused or migrated.

    Args:
        guest: a running guest (``guests.launch.ProcessGuest``, or ``vmem.xen.domain.XenProfileGuest``).
        tracker: a tracker name for :func:`vmem.tracking.make_tracker`, or a tracker object
            (a Xen domain's log-dirty tracker).
        on_interval: optional ``callback(i, t_s, pages)`` after each collect (live display).

    Raises:
        ConfigError: bad duration or interval.
        GuestCrashed: the guest died while being profiled.
        TrackerUnavailable: the tracker cannot run here.
    """
    check_duration(duration_s, interval_s)
    # a hypervisor guest (vmem.xen) states its populated pages; a process guest's RAM shows its data runs
    populated = getattr(guest, "populated_pages", None)
    data_pages = int(populated) if populated is not None else int(np.diff(guest.ram.data_runs(), axis=1).sum())
    trk = make_tracker(guest, tracker) if isinstance(tracker, str) else tracker
    intervals: list[np.ndarray] = []
    times = [0.0]
    dtype = np.int32 if guest.npages <= np.iinfo(np.int32).max else np.int64
    collect_s = []
    try:
        trk.start()
        t0 = time.monotonic()
        start_time = now_unix()
        # The guest's virtual clock when tracking began: lets vmem predict line a measured
        # migration of the same workload up with the trace (phased workloads need it).
        vclock0_s = guest.counters().get("vclock_s") if hasattr(guest, "counters") else None
        deadline = t0
        while True:
            deadline += interval_s
            now = time.monotonic()
            if deadline > now:
                time.sleep(deadline - now)
            pages = trk.collect()
            t = time.monotonic() - t0
            collect_s.append(trk.collect_s)
            if not guest.alive():
                raise guest.crash_error("profiling")
            intervals.append(pages.astype(dtype))
            times.append(t)
            if on_interval is not None:
                on_interval(len(intervals) - 1, t, pages)
            if t >= duration_s - interval_s * 0.5:
                break
            if deadline < time.monotonic() - interval_s:
                deadline = time.monotonic()        # fell behind: do not burst to catch up
    finally:
        trk.stop()
    counts = np.array([len(a) for a in intervals], dtype=np.int64)
    return DirtyTrace(
        npages=int(guest.npages), page_size=int(getattr(getattr(guest, "ram", guest), "page_size", 4096)), interval_s=float(interval_s),
        offsets=np.concatenate(([0], np.cumsum(counts))).astype(np.int64),
        pages=np.concatenate(intervals) if intervals else np.empty(0, dtype=dtype),
        times_s=np.asarray(times, dtype=np.float64), data_pages=data_pages,
        workload=guest.spec.to_json() if getattr(guest, "spec", None) is not None else {},
        start_time=start_time,
        meta={"tracker": trk.name, "vclock0_s": vclock0_s, "collect_ms_mean": round(float(np.mean(collect_s)) * 1e3, 4) if collect_s else None,
              "collect_ms_max": round(float(np.max(collect_s)) * 1e3, 4) if collect_s else None},
    )


def run_profile(workload: str = "hotcold", params: dict | None = None, size: int | str = "256M", *,
                duration_s: float = 10.0, interval_s: float = 0.1, tracker: str = "auto", seed: int = 1,
                warmup_s: float = 0.5, workload_args: list[str] | None = None, on_interval=None,
                backend: str = "process") -> DirtyTrace:
    """Boot a guest running ``workload``, profile it for ``duration_s``, reap it.

    ``params`` are typed workload parameters; ``workload_args`` the CLI's ``key=value``
    strings (parsed with the workload's own types).  Same seed and warm-up as ``vmem
    migrate`` give the same write sequence, so the trace predicts that migration.

    Raises:
        ConfigError: bad workload, parameters, size, duration or interval (before booting).
        GuestError: the guest failed to boot or died.
    """
    size_bytes = parse_size(size)
    typed = dict(params or {})
    if backend == "kvm":  # the KVM guest program's workloads and parameters (guests/kvm/layout.py)
        from guests.kvm.layout import parse_params as kvm_params

        typed |= kvm_params(workload, workload_args or [])
        if tracker == "kvm-ring":
            typed["dirty"] = "ring"
    elif workload_args:
        typed |= parse_params(load_workload(workload), workload_args)
    else:
        load_workload(workload)
    check_duration(duration_s, interval_s)
    if not (math.isfinite(warmup_s) and warmup_s >= 0):
        raise ConfigError("--warmup", f"must be a number of seconds >= 0, got {warmup_s!r}")
    try:
        guest = boot_guest(GuestSpec(workload, typed, seed), size_bytes, backend)
    except ValueError as err:
        raise ConfigError("--backend kvm", str(err)) from None
    with guest:
        time.sleep(warmup_s)
        trace = profile_guest(guest, duration_s, interval_s, tracker=tracker, on_interval=on_interval)
    trace.meta["warmup_s"] = warmup_s
    return trace


def steadiness_cv(trace: DirtyTrace) -> float:
    """std / mean of the pages dirtied per interval (0 for a guest that writes nothing): below
    :data:`STEADY_CV` the guest is steady (``analyse``'s verdict; the validation's choice of
    start times)."""
    counts = trace.count_per_interval()
    mean = float(counts.mean()) if counts.size else 0.0
    return float(counts.std()) / mean if mean > 0 else 0.0


def check_duration(duration_s: float, interval_s: float) -> None:
    """Refuse a collect interval outside 1 ms-60 s or a duration outside interval-:data:`MAX_DURATION_S`.

    Raises:
        vmem.errors.ConfigError: naming ``--interval`` or ``--duration`` (the flags of ``vmem profile``).
    """
    if not (isinstance(interval_s, (int, float)) and math.isfinite(interval_s) and 0.001 <= interval_s <= 60):
        raise ConfigError("--interval", f"must be between 1 ms and 60 s, got {interval_s!r} s")
    if not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s) and interval_s <= duration_s <= MAX_DURATION_S):
        raise ConfigError("--duration", f"must be between the interval ({interval_s:g} s) and {MAX_DURATION_S:g} s, got {duration_s!r}")


# --- analysis ----------------------------------------------------------------------------------

def wws_curve(trace: DirtyTrace) -> tuple[np.ndarray, np.ndarray]:
    """Mean WWS against window length: ``(window_s, pages)``, increasing, from ``(0, 0)``.

    From one interval up: the measured mean of :meth:`DirtyTrace.wws` at 1, 2, 4, ...
    intervals and the whole trace.  Below one interval (what the tracker cannot see) the
    same per-page Poisson model as ``dirty_in``'s: a page written in a fraction ``q`` of
    intervals is written in a window of ``f`` intervals with probability
    ``1 - (1 - q)^f``, so the curve is ``sum_p 1 - (1 - q_p)^f`` at f = 1/64 ... 1/2
    (hot pages saturate early, pages written once an interval grow linearly).  Between
    points it is interpolated linearly; beyond the trace it stays at the last value.
    """
    n = trace.n_intervals
    ks = sorted({1, n} | {1 << j for j in range(max(n, 1).bit_length()) if (1 << j) <= n})
    windows = [0.0]
    pages = [0.0]
    if n:
        written = np.flatnonzero(trace.occupancy())
        lam = trace.page_rates_per_interval(written)        # -ln(1 - q), q clipped
        for f in (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2):
            windows.append(f * trace.interval_s)
            pages.append(float(-np.expm1(-lam * f).sum()))
    windows += [k * trace.interval_s for k in ks]
    pages += [float(np.mean(trace.wws(k * trace.interval_s))) for k in ks]
    return np.asarray(windows), np.maximum.accumulate(np.asarray(pages))


def _converged_pages(curve, B: float, page_size: int, collect_s: float, start: float) -> float:
    """Fixed point of x = WWS(x * Pw / B + c): the dirty count pre-copy settles at."""
    w, p = curve
    pw = page_size + 8 + 16 / 1024
    x = float(start)
    for _ in range(500):
        nxt = float(np.interp(x * pw / B + collect_s, w, p))
        if abs(nxt - x) < 0.01:
            return nxt
        x = nxt
    return x


def builtin_policies(downtime_goal_ms: float | None = None) -> dict:
    """Every built-in policy with its defaults, by name (a string says why one could not be built).

    Policies that take ``--max-downtime-ms`` get ``downtime_goal_ms`` when it is given.
    """
    from vmem.migration import policy as pol

    out: dict = {}
    options = getattr(pol, "POLICY_OPTIONS", {})
    for name in getattr(pol, "POLICIES", {}):
        kw = {}
        if downtime_goal_ms is not None and any(o.dest == "max_downtime_ms" for o in options.get(name, ())):
            kw["max_downtime_ms"] = float(downtime_goal_ms)
        try:
            out[name] = pol.make_policy(name, **kw)
        except (ConfigError, TypeError, ValueError) as err:
            out[name] = f"needs parameters ({err})"
    return out


def analyse(trace: DirtyTrace, bandwidths_Bps=None, *, downtime_goal_s: float = DEFAULT_DOWNTIME_GOAL_S,
            max_downtime_s: float | None = None, windows_s=DEFAULT_WINDOWS_S, policies: dict | None = None,
            collect_s: float = DEFAULT_COLLECT_S, switchover_s: float = DEFAULT_SWITCHOVER_S,
            sim_params: dict | None = None, calibration=None) -> dict:
    """Summarise a trace and predict migrations from it (a JSON-able dict).

    Args:
        bandwidths_Bps: link rates to predict for (bytes/s); default 1 and 10 Gbit/s.
        downtime_goal_s: the downtime the user aims for (QEMU/libvirt default 300 ms).
        max_downtime_s: the downtime above which the user would rather abort
            (default 3x the goal): the two-threshold policy's abort level.
        policies: ``{name: policy}`` to predict; default every built-in policy (those with a
            downtime limit get ``downtime_goal_s``).
        sim_params: extra :class:`vmem.analysis.simulate.SimulationParams` fields.
        calibration: the host's :class:`vmem.analysis.calibration.Calibration`: per link
            rate its medians (fixed costs, the copy path's real rate) feed the simulator and
            the analytical model in place of ``collect_s``/``switchover_s`` and the nominal rate.

    Keys: ``trace`` (with the per-interval series ``t_s``/``dirty_pages``), ``per_interval``,
    ``wws`` (the requested windows), ``working_set`` (the measured WWS curve:
    ``windows_s``/``wws_pages``), ``steadiness``, ``predictions`` (per bandwidth, per
    policy), ``recommendations`` (per bandwidth, with ``formulas``).  ``vmem graph`` plots
    the series and the curve from the JSON.
    """
    from transport import parse_rate

    from vmem.migration.policy import IterationsThresholdPolicy
    from vmem.analysis.simulate import simulate, transfer_time_s

    if bandwidths_Bps is None:
        bandwidths_Bps = [parse_rate(b) for b in DEFAULT_BANDWIDTHS]
    if not (downtime_goal_s > 0):
        raise ConfigError("--downtime-goal", f"must be > 0, got {downtime_goal_s!r}")
    max_downtime_s = 3 * downtime_goal_s if max_downtime_s is None else max_downtime_s
    if max_downtime_s < downtime_goal_s:
        raise ConfigError("--max-downtime", f"must be at least the downtime goal ({downtime_goal_s * 1e3:g} ms)")
    counts = trace.count_per_interval()
    lengths = trace.interval_lengths_s()
    n = trace.n_intervals
    V = int(trace.data_pages)
    P = int(trace.page_size)
    out: dict = {
        "trace": {
            "workload": trace.workload, "npages": int(trace.npages), "data_pages": V, "page_size": P,
            "guest_bytes": int(trace.npages) * P, "duration_s": round(trace.duration_s, 4),
            "interval_s": trace.interval_s, "intervals": n, "tracker": trace.meta.get("tracker"),
            "pages_written_total": int(len(trace.union())),
        },
    }
    rates = counts / lengths if n else np.zeros(0)
    mean = float(counts.mean()) if n else 0.0
    std = float(counts.std()) if n else 0.0
    out["per_interval"] = {
        "mean_pages": round(mean, 2), "p50_pages": float(np.percentile(counts, 50)) if n else 0.0,
        "p95_pages": float(np.percentile(counts, 95)) if n else 0.0, "max_pages": int(counts.max()) if n else 0,
        "min_pages": int(counts.min()) if n else 0,
        "dirty_rate_pps": round(float(counts.sum() / trace.duration_s), 1) if n else 0.0,
        "dirty_rate_p95_pps": round(float(np.percentile(rates, 95)), 1) if n else 0.0,
    }
    # Plain arrays for plotting (vmem graph reads trace.t_s/dirty_pages and working_set.*).
    out["trace"].update(guest_pages=int(trace.npages), t_s=[round(float(x), 6) for x in trace.times_s[1:]],
                        dirty_pages=[int(x) for x in counts])
    wws_rows = []
    for w in windows_s:
        if w > trace.duration_s + 1e-9:
            continue
        k = trace.window_intervals(w)
        vals = trace.wws(w)
        wws_rows.append({"window_s": round(k * trace.interval_s, 4), "mean_pages": round(float(vals.mean()), 1),
                         "max_pages": int(vals.max()), "fraction_of_guest": round(float(vals.mean()) / trace.npages, 4)})
    out["wws"] = wws_rows
    curve = wws_curve(trace)
    measured = curve[0] >= trace.interval_s * (1 - 1e-9)          # the points the trace measured
    out["working_set"] = {"windows_s": [round(float(x), 6) for x in curve[0][measured]],
                          "wws_pages": [round(float(x), 2) for x in curve[1][measured]], "guest_pages": int(trace.npages)}
    cv = steadiness_cv(trace)
    # Does the WWS level off?  Compare the last doubling of the window on the curve.
    levels = None
    growth = None
    if len(curve[0]) >= 3 and curve[1][-2] > 0:
        growth = float(curve[1][-1] / curve[1][-2] - 1) / max(math.log2(curve[0][-1] / curve[0][-2]), 1e-9)
        levels = growth < LEVEL_OFF_GROWTH
    steady = cv < STEADY_CV
    out["steadiness"] = {
        "cv": round(cv, 4), "steady": bool(steady),
        "wws_growth_per_doubling": None if growth is None else round(growth, 4),
        "wws_levels_off": levels,
        "plateau_pages": round(float(curve[1][-1]), 1) if levels else None,
        "explain": ("cv = std/mean of pages dirtied per interval (< %.2f: steady); the WWS levels off when doubling "
                    "the window adds < %d%% more pages" % (STEADY_CV, LEVEL_OFF_GROWTH * 100)),
    }
    if mean == 0:
        out["steadiness"]["verdict"] = "idle: nothing written"
    elif steady and levels:
        out["steadiness"]["verdict"] = "steady, with a working set: pre-copy converges towards it"
    elif steady:
        out["steadiness"]["verdict"] = "steady rate, but the written set keeps growing (no plateau in this trace)"
    else:
        out["steadiness"]["verdict"] = "bursty or phased: thresholds from the mean will be wrong part of the time"

    pols = builtin_policies(downtime_goal_s * 1e3) if policies is None else dict(policies)
    pw = P + 8 + 16 / 1024
    extra = dict(sim_params or {})
    extra.setdefault("collect_s", collect_s)
    extra.setdefault("switchover_s", switchover_s)
    out["predictions"] = []
    out["recommendations"] = []
    D = out["per_interval"]["dirty_rate_pps"]
    base_extra = extra
    for B in bandwidths_Bps:
        row = {"bandwidth_Bps": B, "policies": {}}
        c_s, o_s, B_eff = collect_s, switchover_s, B
        extra = base_extra
        if calibration is not None:
            from vmem.analysis.calibration import trace_dirty_rate

            point = calibration.point_params(int(trace.npages), B, dirty_pages_per_s=trace_dirty_rate(trace))
            extra = point | dict(sim_params or {})
            c_s, o_s = extra["collect_s"], extra["switchover_s"]
            B_eff = B * extra["bandwidth_efficiency"]
            row["calibration"] = {k: round(v, 6) for k, v in point.items()}
        for name, pol in pols.items():
            if isinstance(pol, str):
                row["policies"][name] = {"skipped": pol}
                continue
            rep = simulate(trace, pol, bandwidth_Bps=B, **extra)
            row["policies"][name] = _prediction_summary(rep, transfer_time_s(rep))
        # Analytical model for comparison: D from the per-interval rate, W = the plateau (or
        # longest window); with a calibration, the link at the copy path's measured rate and
        # the measured collect and switchover.
        m = PrecopyModel(V, D, float(curve[1][-1]) if n else 0.0, B_eff, P, c_s, o_s)
        cf = closed_form(m, 50, 5, strict=True)
        # The calibrated switchover's cost per page of the final set (the model's o is its
        # intercept): the final set is what the model's downtime sends.
        final_pages = max(0.0, cf.downtime_s - o_s) / m.send_s(1.0)
        per_page_s = (float(extra.get("switchover_per_page_s", 0.0)) * switch_backlog_pages(final_pages)
                      if calibration is not None else 0.0)
        row["model_xen"] = {"ratio_r": round(m.ratio, 4), "rounds": cf.precopy_rounds, "pages_sent": round(cf.pages_sent),
                            "downtime_ms": round((cf.downtime_s + per_page_s) * 1e3, 3),
                            "total_time_s": round(cf.total_time_s + per_page_s, 4), "converges": cf.converges}
        rec = _recommend(trace, curve, B, pw, downtime_goal_s, max_downtime_s, collect_s, switchover_s)
        # Check the recommended threshold policy with the simulator.
        tp = IterationsThresholdPolicy(rec["precopy_iterations"], rec["precopy_threshold_pages"])
        rep = simulate(trace, tp, bandwidth_Bps=B, **extra)
        row["policies"]["threshold (recommended)"] = _prediction_summary(rep, transfer_time_s(rep)) | {
            "precopy_iterations": rec["precopy_iterations"], "precopy_threshold": rec["precopy_threshold_pages"]}
        rec["bandwidth_Bps"] = B
        out["predictions"].append(row)
        out["recommendations"].append(rec)
    return out


def _prediction_summary(rep, transfer_s: float) -> dict:
    pre = [x for x in rep.rounds if x.kind == "precopy"]
    return {
        "outcome": rep.outcome, "reason": rep.reason, "precopy_rounds": len(pre), "pages_sent": rep.pages_sent,
        "bytes_sent": rep.bytes_sent, "downtime_ms": rep.downtime_ms, "total_time_s": rep.total_time_s,
        "migration_time_s": rep.migration_time_s, "blackout_ms": rep.blackout_ms,
        "transfer_time_s": round(transfer_s, 4), "final_dirty_pages": pre[-1].dirty_pages if pre else 0,
    }


def _recommend(trace, curve, B, pw, goal_s, max_s, collect_s, switchover_s) -> dict:
    """Thresholds for one bandwidth, with the formulas that produced them."""
    V = trace.data_pages
    floor = _converged_pages(curve, B, trace.page_size, collect_s, V)
    goal_pages = max(0, int((goal_s - switchover_s) * B / pw))
    max_pages = max(goal_pages, int((max_s - switchover_s) * B / pw))
    reachable = math.ceil(floor * 1.25) + 1
    threshold = max(goal_pages, reachable)
    # Rounds to get there: the curve iteration, as the model does.
    x, rounds, t_pre = float(V), 0, 0.0
    while rounds < 30:
        t = x * pw / B + collect_s
        t_pre += t
        x = float(np.interp(t, *curve))
        rounds += 1
        if x <= threshold:
            break
    converges_below_goal = floor * 1.25 < goal_pages
    return {
        "converged_dirty_pages": round(floor, 1),
        "goal_pages": goal_pages,
        "max_downtime_pages": max_pages,
        "precopy_threshold_pages": int(threshold),
        "precopy_iterations": int(min(30, rounds + 1)),
        "pause_threshold_pages": int(threshold),
        "abort_threshold_pages": int(max(max_pages, threshold)),
        "expected_downtime_ms": round((x * pw / B + switchover_s) * 1e3, 2),
        "precopy_budget_s": round(1.5 * t_pre, 3),
        "max_downtime_ms": round(goal_s * 1e3, 1),
        "goal_reachable": bool(converges_below_goal),
        "formulas": {
            "converged_dirty_pages": "F = fixed point of F = WWS(F*Pw/B + c): the dirty count a round that sends "
                                     "the dirty set finds again (the WWS over one round's duration)",
            "goal_pages": "G = (downtime goal - switchover) * B / Pw  (QEMU: threshold_size = bandwidth * downtime_limit)",
            "precopy_threshold_pages": "T = max(G, 1.25 F + 1): stop as soon as the downtime fits the goal, but never "
                                       "below what pre-copy can reach (F is approached only asymptotically)",
            "precopy_iterations": "N = rounds the WWS curve needs to reach T from V, plus one",
            "pause_threshold_pages": "pause = T (two thresholds: stop-and-copy once converged at or below it)",
            "abort_threshold_pages": "abort = (max downtime - switchover) * B / Pw: above it, prefer aborting",
            "precopy_budget_s": "1.5 x the predicted pre-copy time to reach T (budget policy's duration)",
            "symbols": "Pw = page_size + 8 + 16/1024 bytes on the wire per page; B = bandwidth; c = collect time",
        },
    }


def validate_prediction(workload: str, params: dict | None, size: int | str, bandwidth_Bps: float, *, policy=None,
                        seed: int = 1, duration_s: float = 10.0, interval_s: float = 0.1, warmup_s: float = 0.5,
                        tracker: str = "auto", observe_s: float = 0.1, sim_params: dict | None = None,
                        align: bool = False) -> dict:
    """Profile a workload, then really migrate an identical guest, and compare with the prediction.

    Both guests run the same workload, parameters and seed, and wait ``warmup_s`` before
    being profiled / migrated, so the trace's time 0 is the migration's start.  The
    migration uses ``vmem.migration.local.run_local_migration`` with the link capped at
    ``bandwidth_Bps``.  The prediction is :func:`vmem.analysis.simulate.predict` made from the
    profile alone, as a user would make it before migrating (``align=True``: start and setup
    time taken from the measured run's guest clock, see
    :func:`vmem.analysis.simulate.alignment_from_report` -- an explanation tool, not a
    prediction).

    Returns:
        ``{"trace", "measured", "predicted", "rows", "setup_s", "alignment"}``: the
        DirtyTrace, both MigrationReports, :func:`vmem.analysis.simulate.compare_reports` rows, the
        setup time seen by the progress sink (handshake to round 0), and the alignment used.
    """
    from vmem.migration.local import LocalDestination, run_local_migration
    from vmem.migration.source import MigrationOptions

    from vmem.migration.policy import XenDefaultPolicy
    from vmem.analysis.simulate import predict

    policy = policy or XenDefaultPolicy()
    trace = run_profile(workload, params, size, duration_s=duration_s, interval_s=interval_s, tracker=tracker,
                        seed=seed, warmup_s=warmup_s)
    phases = _PhaseClock()
    opts = MigrationOptions(tracker=tracker, policy=policy, observe_s=observe_s, bandwidth_Bps=bandwidth_Bps)
    # As `vmem migrate` and `vmem calibrate`: the destination starts before the guest boots.
    with (LocalDestination.start(opts) as destination,
          boot_guest(GuestSpec(workload, dict(params or {}), seed), parse_size(size)) as guest):
        time.sleep(warmup_s)
        phases.t0 = time.monotonic()
        measured = run_local_migration(guest, opts, phases, destination=destination)
    predicted, rows = predict(trace, policy, bandwidth_Bps, compare_report=measured.to_dict(), align=align,
                              **(sim_params or {}))
    return {"trace": trace, "measured": measured, "predicted": predicted, "rows": rows, "setup_s": phases.setup_s,
            "alignment": predicted.guest["prediction"].get("alignment")}


class _PhaseClock:
    """A migrator progress sink that only notes when pre-copy began."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.setup_s = None

    def phase(self, name: str, detail: str = "") -> None:
        if name == "precopy" and self.setup_s is None:
            self.setup_s = time.monotonic() - self.t0

    def round_start(self, *a) -> None: ...
    def sent(self, *a) -> None: ...
    def round_end(self, *a) -> None: ...


# --- output ----------------------------------------------------------------------------------------

def _rate_str(Bps: float) -> str:
    bits = Bps * 8
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g} {unit}"
    return f"{bits:g} bit/s"


def print_analysis(a: dict, console=None) -> None:
    """Render :func:`analyse`'s result as rich tables."""
    from rich.console import Console
    from rich.table import Table

    from vmem.ram import format_bytes

    if console is None:
        console = Console()
        console = console if console.is_terminal else Console(width=120)
    tr = a["trace"]
    wl = tr.get("workload") or {}
    console.print(f"[bold]profile[/bold]: {wl.get('workload', '?')} {wl.get('params') or ''} seed {wl.get('seed', '?')}, "
                  f"{format_bytes(tr['guest_bytes'])} ({tr['npages']:,} pages, {tr['data_pages']:,} with data), "
                  f"{tr['duration_s']:g} s in {tr['intervals']} intervals of {tr['interval_s'] * 1e3:g} ms, "
                  f"tracker {tr.get('tracker') or '?'}; {tr['pages_written_total']:,} distinct pages written")
    pi = a["per_interval"]
    t = Table(title="dirty pages per interval")
    for c in ("mean", "p50", "p95", "max", "dirty rate", "p95 rate", "cv", "verdict"):
        t.add_column(c, justify="left" if c == "verdict" else "right")
    st = a["steadiness"]
    t.add_row(f"{pi['mean_pages']:,.1f}", f"{pi['p50_pages']:,.0f}", f"{pi['p95_pages']:,.0f}", f"{pi['max_pages']:,}",
              f"{pi['dirty_rate_pps']:,.0f} pps", f"{pi['dirty_rate_p95_pps']:,.0f} pps", f"{st['cv']:.2f}", st["verdict"])
    console.print(t)
    t = Table(title="writable working set (distinct pages written in a sliding window)")
    for c in ("window", "mean", "max", "of guest RAM"):
        t.add_column(c, justify="right")
    for row in a["wws"]:
        t.add_row(f"{row['window_s']:g} s", f"{row['mean_pages']:,.0f}", f"{row['max_pages']:,}",
                  f"{row['fraction_of_guest'] * 100:.2f} %")
    console.print(t)
    lv = st["wws_levels_off"]
    console.print(f"WWS {'levels off' if lv else 'does not level off' if lv is not None else '?'}"
                  + (f" at ~{st['plateau_pages']:,.0f} pages" if st.get("plateau_pages") else "")
                  + (f" (growth per doubling {st['wws_growth_per_doubling'] * 100:.1f} %)" if st.get("wws_growth_per_doubling") is not None else "")
                  + f".  [dim]{st['explain']}[/dim]")
    for row, rec in zip(a["predictions"], a["recommendations"]):
        B = row["bandwidth_Bps"]
        t = Table(title=f"predicted at {_rate_str(B)} ({B / 1e6:,.1f} MB/s), trace-driven simulator")
        cal = row.get("calibration")
        for c in ("policy", "outcome", "rounds", "pages sent", "transfer time") + (("migration time",) if cal else ()) + (
                "downtime", "why it stopped"):
            t.add_column(c, justify="left" if c in ("policy", "outcome", "why it stopped") else "right")
        for name, p in row["policies"].items():
            if "skipped" in p:
                t.add_row(name, "-", "", "", "", *([""] if cal else []), "", p["skipped"])
                continue
            mt = [f"{p['migration_time_s']:.3f} s" if p.get("migration_time_s") is not None else "-"] if cal else []
            t.add_row(name, p["outcome"], str(p["precopy_rounds"]), f"{p['pages_sent']:,}", f"{p['transfer_time_s']:.3f} s",
                      *mt, f"{p['downtime_ms']:.1f} ms" if p["downtime_ms"] is not None else "-", p["reason"])
        mx = row["model_xen"]
        t.caption = ("transfer time = pre-copy rounds + downtime (handshake excluded)"
                     + ("; migration time adds this host's calibrated handshake, verify and commit.  " if cal else ".  ")
                     + 
                     f"Analytical model (xen policy): r = D*Pw/B = {mx['ratio_r']:.3f}, {mx['rounds']} rounds, "
                     f"{mx['pages_sent']:,} pages, downtime {mx['downtime_ms']:.1f} ms, migration time {mx['total_time_s']:.3f} s")
        console.print(t)
        t = Table(title=f"recommended at {_rate_str(B)} (downtime goal {rec['max_downtime_ms']:g} ms)", show_header=True)
        t.add_column("setting")
        t.add_column("value", justify="right")
        t.add_column("formula")
        f = rec["formulas"]
        t.add_row("converged dirty pages F", f"{rec['converged_dirty_pages']:,.0f}", f["converged_dirty_pages"])
        t.add_row("goal pages G", f"{rec['goal_pages']:,}", f["goal_pages"])
        t.add_row("--precopy-threshold", f"{rec['precopy_threshold_pages']:,}", f["precopy_threshold_pages"])
        t.add_row("--precopy-iterations", f"{rec['precopy_iterations']}", f["precopy_iterations"])
        t.add_row("pause threshold", f"{rec['pause_threshold_pages']:,}", f["pause_threshold_pages"])
        t.add_row("abort threshold", f"{rec['abort_threshold_pages']:,}", f["abort_threshold_pages"])
        t.add_row("pre-copy budget", f"{rec['precopy_budget_s']:g} s", f["precopy_budget_s"])
        t.add_row("expected downtime", f"{rec['expected_downtime_ms']:,.1f} ms",
                  "goal reachable" if rec["goal_reachable"] else "[yellow]goal NOT reachable at this bandwidth: "
                  "the working set needs longer than the goal to send[/yellow]")
        t.caption = f["symbols"]
        console.print(t)
