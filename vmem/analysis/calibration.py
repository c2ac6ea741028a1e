"""Calibration: the fixed costs and the real copy rate of migrations on this host, measured once.

The trace simulator (:mod:`vmem.analysis.simulate`) knows the dirty pages a guest writes; what
it cannot know is what this host adds around them: the handshake before round 0, the
switchover's fixed part, the pause latency, the collects, the rate the copy path really
achieves under a nominal ``--bandwidth`` cap, the verify and commit after the switch, and,
for post-copy, the switch itself, the push rate and what a fault costs the guest.
``vmem calibrate`` (:func:`run_calibration`) measures them from real migrations of a
calibration guest -- a workload, size and seed of its own, never the runs a prediction is
validated against -- and stores them, with provenance, in a per-host cache file
(:func:`default_path`).  Predictions then use them (:func:`draw_params`, :func:`point_params`).

What one calibration run yields (:func:`sample_from_report`, all seconds unless named)::

    setup_s           handshake -> first page (report setup_time_ms)
    pause_s           pause posted -> acknowledged (timings_ms.pause_latency)
    drain_s           before the pause: waiting for the destination to place what it
                      received (timings_ms.drain_before_pause; the link idles meanwhile);
                      pre-copy draws take the busy guest's line over the pages of the
                      last round's last record (last_record_pages)
    collect_s         median dirty-tracker collect of the pre-copy rounds
    efficiency        achieved / nominal rate of the copy path: sum(bytes) / sum(send time) / cap
                      over rounds of >= 1 MiB, less the token bucket's credit each round
                      started with (post-copy: the push's bytes / push time / cap)
    switchover_s      pre-copy: downtime - the part of the stop-and-copy send the link's rate
                      forced (:func:`final_link_s`: the token bucket replayed over the run's
                      measured rounds, collects, drain and pause, as the simulator models it);
                      the rest of the send -- copying the pages, writing the guest's context
                      and the stream's end, 0.3-0.9 ms where the bucket had credit -- is CPU
                      work the simulator does not model, so it stays in the switchover
    final_pages       pre-copy: pages the stop-and-copy sent (the switchover's line is over it)
    last_round_pages  pre-copy: pages the last pre-copy round sent (the drain's line is over
                      the pages of its last record)
    postcopy_switch_s post-copy: the downtime (pause -> first step at the destination)
    push_hold_s       post-copy: the push held for the destination guest's first step
    fault_wait_s      post-copy: blocktime / faults, what one demand fault stalls the guest
    tail_s            migration_time - setup - drain - pause - the rounds and the switchover: verify,
                      commit, and the round loop's own bookkeeping
    gap_s             the longest guest gap after the resume when it exceeded the downtime
                      (blackout_ms > downtime_ms), else 0
    probe_s           host_probe_s() just before the run: how busy the host was

Load.  Most fixed costs are CPU work of vmem's own processes, so on a shared host they
follow its load (measured here: the handshake 0.7-2.6 s at load average 6, 2-6 s at 14).
:meth:`Calibration.load_factor` compares a probe taken now with the calibration runs'
probes, and predictions multiply the CPU-bound costs (:data:`CPU_BOUND`) by it.  One probe
is noisy (the calibration's own, at one steady load, spread 0.78-1.45x their median), so
each draw divides the factor by one of those ratios: the range holds the probe's error.

Uncertainty.  Each run is one joint draw of all of them (they are correlated: a busy host
slows everything at once).  :func:`draw_params` bootstraps whole runs -- run ``k`` picked at
random, its efficiency, switchover, pause, collect and gap taken as they were, its setup,
tail and post-copy switch as the least-squares line over guest size (or pages pending) plus
run ``k``'s residual -- so a forecast's range holds the host's own noise, not only the
start-time variation of the guest.  A handful of runs under-states that noise for the next
run (the middle they give is itself uncertain, and their spread has heavy tails), so each
draw's distance from the runs' median is widened by :func:`predictive_widening` (1.36 for
six runs).

Per workload.  The switchover is the line over the stop-and-copy set (``final_pages``,
counted up to :data:`SWITCH_BACKLOG_PAGES`): an intercept (pausing, the stream's end,
restoring and resuming the guest) plus a cost per page beyond its wire time (the
destination still receiving and placing the last of it when the send ends); the simulator
adds the slope times the final set *it* predicts, so an idle guest (an empty final set)
pays the intercept only.  Under Xen's policy the calibration guest's final sets span a few
dozen pages, which cannot identify a slope, so each size x link also runs once under a
policy that stops after round 0 (:data:`SHORT_POLICY`: final sets of hundreds to thousands
of pages).  Those runs (``"variant": "short"``) enter the switchover's line only; the
draws bootstrap the Xen-policy runs.  A slope the runs still do not identify (negative, or
within two standard errors of zero) is 0 -- extrapolating noise is worse than leaving it
out.  The copy efficiency is the line
over the load probe (``probe_s``) within the link's runs, slope <= 0: a busier host copies
no faster, and a prediction made under a heavier load than the calibration's gets a lower
efficiency (clipped to the range the runs saw, widened by 20 %).

Two guests.  A guest that writes pays more around its pages than one that does not (its
destination guest starts slower, its switchover and tail are longer: docs/profiling.md), so
the calibration migrates an idle guest too (runs tagged ``"guest": "idle"``) and profiles
both guests' dirty rates (:func:`trace_dirty_rate`).  A prediction passes its trace's rate;
:meth:`Calibration.draw_params` draws each run from the busy guest's runs with probability
:meth:`Calibration.busy_weight` (linear between the two rates), else from the idle guest's.
The switchover's slope is the busy guest's (an idle guest's final set is empty), its
intercept each guest's own; the load probes are pooled (they measure the host).

Phases.  A phased guest is busy at one moment and nearly idle the next, and what it pays
around the pause is what it does then: a forecast (:mod:`vmem.analysis.forecast`) first
simulates each start at the whole trace's rate to find where in the trace its pause falls,
then draws that start's costs at the rate of the :data:`PAUSE_WINDOW_S` before it
(:func:`trace_dirty_rate_before`; ``draw_params`` takes one rate per draw).  A steady guest's
rate is the same everywhere, so nothing changes for it.

File layout (JSON)::

    {"format": "vmem-calibration", "version": 2,
     "provenance": {vmem version, commit, host, kernel, cpus, date, command},
     "load": {"loadavg_before": [1, 5, 15 min], "loadavg_after": [...]},
     "config": {"sizes_bytes", "links_Bps", "repeats", "workload", "params", "seed",
                "guests": {"busy"|"idle": {"workload", "params", "seed", "dirty_pages_per_s"}}},
     "placement": {"pages", "span_pages", "contiguous_ms", "scattered_ms", "run_share"},   (placement_probe; optional)
     "runs": [{"mode": "precopy"|"postcopy"|"hybrid", "guest_pages", "pages_pending", "link_Bps",
               "verified", ["guest": "idle"], ["variant": "short"], ["calibration": seq],
               <the quantities above>}, ...],
     "pooled": [{"seq", "date_utc", "git_commit", "runs", "loadavg_before"}, ...]}   (optional)

Pooling.  ``vmem calibrate --append`` adds a new calibration's runs to the file's
(:func:`pool_calibrations`, at most :data:`POOL_MAX_CALIBRATIONS`): draws then bootstrap
runs from several times of the host's life, whose spread one calibration's twelve runs per
group do not show (measured: docs/profiling.md, "Pooled calibrations").

The command line, ``vmem calibrate``, is :mod:`vmem.cli.calibrate`.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time

import numpy as np

from vmem.errors import ConfigError
from vmem.analysis.model import SWITCH_BACKLOG_PAGES, last_record_pages, switch_backlog_pages

__all__ = [
    "CALIBRATION_FORMAT",
    "CALIBRATION_VERSION",
    "Calibration",
    "default_path",
    "load_calibration",
    "sample_from_report",
    "final_link_s",
    "predictive_widening",
    "mode_for",
    "switch_backlog_pages",
    "SWITCH_BACKLOG_PAGES",
    "MODES",
    "host_probe_s",
    "CPU_BOUND",
    "run_calibration",
    "pool_calibrations",
    "pool_mismatch",
    "calibration_grid",
    "POOL_MAX_CALIBRATIONS",
    "placement_probe",
    "summary_rows",
    "trace_dirty_rate",
    "trace_dirty_rate_before",
    "PAUSE_WINDOW_S",
]

CALIBRATION_FORMAT = "vmem-calibration"
#: 2: the switchover is the downtime less the link's share of the final send (1: less the
#: whole send, which left the send's CPU time out of every prediction).
CALIBRATION_VERSION = 2
#: The calibration guest: not a workload the validation table migrates with these
#: parameters, so the predictor is never tuned on the runs it is judged by.
CAL_WORKLOAD = "hotcold"
CAL_PARAMS = {"rate": 2000}
CAL_SEED = 97
#: The second calibration guest: one that writes nothing (runs tagged ``"guest": "idle"``).
IDLE_WORKLOAD = "idle"
#: The interval the calibration guests' dirty rates are profiled at (seconds) and for how long.
ACTIVITY_INTERVAL_S, ACTIVITY_PROFILE_S = 0.02, 2.0
#: How much of a trace before a predicted pause sets that start's costs (seconds): the
#: guest's activity the drain, pause and switchover share the CPUs with (and, for a
#: migration shorter than this, all of it).
PAUSE_WINDOW_S = 1.0
#: The policy of the calibration's "short" pre-copy runs: stop-and-copy right after round 0,
#: so the final set is everything the guest wrote meanwhile (hundreds to thousands of pages).
SHORT_POLICY = {"iterations": 1, "threshold": 0}  # vmem.migration.policy.IterationsThresholdPolicy
#: Rounds smaller than this do not count for the copy rate (the token bucket's burst and
#: per-round costs dominate them).
MIN_RATE_BYTES = 1 << 20
#: A calibration file larger than this is refused before it is parsed.
MAX_FILE_BYTES = 16 << 20
MAX_RUNS = 10_000
#: The quantities a run holds (None where the run's mode has none).
QUANTITIES = ("setup_s", "pause_s", "drain_s", "collect_s", "efficiency", "switchover_s", "postcopy_switch_s",
              "push_hold_s", "fault_wait_s", "tail_s", "gap_s", "final_pages", "last_round_pages")
#: precopy: Xen's policy, stop-and-copy; postcopy: pure post-copy; hybrid: Xen's pre-copy
#: rounds, then post-copy of the last dirty set (a few pages pending: the switch's fixed part).
MODES = ("precopy", "postcopy", "hybrid")
#: The post-copy mode of MigrationOptions / SimulationParams behind each calibration mode.
POSTCOPY_OPTION = {"precopy": "off", "postcopy": "pure", "hybrid": "after-precopy"}


def mode_for(postcopy: str | None) -> str:
    """The calibration mode that fits a simulation's ``postcopy`` parameter."""
    return {"pure": "postcopy", "after-precopy": "hybrid"}.get(postcopy or "off", "precopy")


#: Simulation parameters that are CPU work of vmem's own processes (spawning and arming the
#: destination, digesting RAM, restoring the guest): on a busier host they take longer in
#: proportion, which :meth:`Calibration.load_factor` measures.  Not the pre-copy switchover's
#: intercept (a few ms of hand-offs and wake-ups between three processes): in calibration runs
#: it did not follow the load probe (5.4 ms at a 0.50 s probe, 1.2 ms at 0.91 s, 4.6 ms at
#: 1.01 s), and scaling it by a clipped factor of 0.5 halved every small downtime predicted.
#: Its cost per page of the final set (placing and digesting) is CPU work and scales.
CPU_BOUND = ("setup_s", "post_s", "switchover_per_page_s", "postcopy_switch_s",
             "postcopy_switch_per_page_s", "push_hold_s", "blackout_gap_s")


#: The load factor's clip: a probe never makes the host more than twice as fast as when
#: calibrated, nor more than five times slower.
LOAD_FACTOR_MIN, LOAD_FACTOR_MAX = 0.5, 5.0


#: Student's t, 90th percentile, by degrees of freedom 1..10 (beyond: the Cornish-Fisher series).
_T90 = (3.078, 1.886, 1.638, 1.533, 1.476, 1.440, 1.415, 1.397, 1.383, 1.372)
_Z90 = 1.2815516


def _t90(df: int) -> float:
    if df <= len(_T90):
        return _T90[df - 1]
    z = _Z90
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def predictive_widening(n_runs: int) -> float:
    """How much farther than a drawn run the next run may fall from the middle of ``n_runs``.

    A bootstrap of n runs spreads its draws as the runs' own spread, sqrt((n-1)/n) of the
    standard deviation; the next run also carries the error of where that middle is
    (sqrt(1 + 1/n)) and a spread estimated from n runs has heavier tails (Student's t with
    n-1 degrees of freedom): the 80 % prediction interval is t90(n-1) sqrt(1 + 1/n) s, the
    bootstrap's z90 sqrt((n-1)/n) s.  Their ratio: 1.36 for 6 runs (the calibration's
    default per link and mode), 1.16 for 12, -> 1.  Measured here, the runs of different
    calibrations put the busy guest's switchover intercept 1.03-2.12 ms apart (six runs per
    link each) -- what the ranges drawn from one calibration left out.  1 for fewer than 2
    runs (nothing to widen)."""
    n = int(n_runs)
    if n < 2:
        return 1.0
    return _t90(n - 1) * math.sqrt(1 + 1 / n) / (_Z90 * math.sqrt((n - 1) / n))


def host_probe_s() -> float:
    """Seconds to start a Python that imports numpy and vmem's stream module -- what a
    migration's handshake does first (the destination process), so it slows as the
    handshake does when the host is busy.  The median of two."""
    import subprocess
    import sys

    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import numpy, vmem.format.wire"], check=False, capture_output=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), timeout=120)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


#: Pages per placement the probe times: one PAGE_DATA record, what the switchover's backlog
#: levels off at (:data:`SWITCH_BACKLOG_PAGES`).
PLACEMENT_PROBE_PAGES = SWITCH_BACKLOG_PAGES
#: The RAM file the probe places into: a 128 MiB guest's, the validation's size.  Scattered
#: pages cost more the wider they spread (page cache and TLB misses; measured here, per 1,024
#: pages: 0.72 ms over 8 MiB, 1.2 ms over 64 MiB, 1.3 ms over 128 MiB, contiguous 0.5-0.7).
PLACEMENT_PROBE_SPAN_PAGES = 32 * PLACEMENT_PROBE_PAGES


def placement_probe(repeats: int = 7) -> dict:
    """How the destination's placement of one record costs by its layout, on this host:
    ``{"pages", "span_pages", "contiguous_ms", "scattered_ms", "run_share"}``.

    Places :data:`PLACEMENT_PROBE_PAGES` pages with the destination's own call
    (:func:`vmem._native.place_pages`: ``pwrite`` per run of consecutive pages, then the
    digest of what the file holds, read through this process's mapping) into a RAM file of
    :data:`PLACEMENT_PROBE_SPAN_PAGES` whose pages exist and were digested once, as at a
    final send (round 0 placed them all) -- once as one run, once scattered over the file (no
    two pages adjacent) -- alternating ``repeats`` times, medians.  ``run_share`` =
    (scattered - contiguous) / scattered, clipped to [0, 1]: the part of a scattered page's
    cost that a page inside a run does not pay.  The calibration guest's final sets are
    scattered, so its switchover slope is per scattered page; the simulator counts a
    contiguous backlog (a sweep's) at ``1 - run_share`` of that
    (:func:`vmem.analysis.model.switch_backlog_pages`).  Measured here: 0.74-0.76 ms
    contiguous, 1.35-1.46 ms scattered (share 0.43-0.49).  Takes ~0.1 s and 128 MiB of
    memory briefly."""
    from vmem import _native as nat
    from vmem.ram import GuestRam, preallocate

    n, span = PLACEMENT_PROBE_PAGES, PLACEMENT_PROBE_SPAN_PAGES
    rng = np.random.default_rng(0x91AC)
    buf = rng.integers(0, 256, (n, 4096), dtype=np.uint8)
    digests = np.zeros(span, dtype=np.uint64)
    contiguous, scattered = [], []
    with GuestRam.create(span * 4096, name="vmem-placement-probe") as ram:
        preallocate(ram.fd, span * 4096)
        for first in range(0, span, n):  # every page placed and digested once, as round 0 does
            nat.place_pages(ram.fd, -1, 0, buf, np.arange(first, first + n, dtype=np.int64),
                            digests=digests, view=ram.address)
        for _ in range(repeats):
            start = int(rng.integers(0, span - n + 1))
            for kind, pages in (("c", np.arange(start, start + n, dtype=np.int64)),
                                ("s", 2 * np.sort(rng.choice(span // 2, n, replace=False)).astype(np.int64))):
                t0 = time.perf_counter()
                nat.place_pages(ram.fd, -1, 0, buf, pages, digests=digests, view=ram.address)
                (contiguous if kind == "c" else scattered).append(time.perf_counter() - t0)
    c_ms, s_ms = float(np.median(contiguous)) * 1e3, float(np.median(scattered)) * 1e3
    share = min(max((s_ms - c_ms) / s_ms, 0.0), 1.0) if s_ms > 0 else 0.0
    return {"pages": n, "span_pages": span, "contiguous_ms": round(c_ms, 4), "scattered_ms": round(s_ms, 4),
            "run_share": round(share, 4)}


def default_path() -> str:
    """``$VMEM_CALIBRATION``, else ``$XDG_CACHE_HOME/vmem/calibration-<hostname>.json``
    (``~/.cache`` without XDG_CACHE_HOME): one calibration per host."""
    env = os.environ.get("VMEM_CALIBRATION")
    if env:
        return env
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "vmem", f"calibration-{socket.gethostname()}.json")


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _rate_rounds(pre: list[dict], link_Bps: float) -> list[tuple[float, float]]:
    """``(bytes the link's rate carried, seconds)`` of the pre-copy rounds that count for the
    copy rate (>= :data:`MIN_RATE_BYTES`).

    The link is a token bucket that starts full and refills while the migrator collects;
    what a round sends out of that credit costs it no time.  The simulator models the same
    bucket (:class:`vmem.analysis.simulate._Link`), so the credit is taken out here: left
    in, it made the efficiency 1.003-1.03 and was counted twice -- round 0 of a 128 MiB
    guest at 200 MB/s carries a 2 MB burst, 1.5 % of it -- and every transfer time was
    predicted short by about that much."""
    from transport import default_burst_bytes

    burst = float(default_burst_bytes(link_Bps))
    out = []
    for i, x in enumerate(pre):
        nbytes, secs = float(x.get("bytes_sent") or 0), float(x.get("duration_s") or 0)
        # round 0 starts on a full bucket; a later one on what the collect before it refilled
        credit = burst if i == 0 else min(burst, float(pre[i - 1].get("collect_ms") or 0) / 1e3 * link_Bps)
        if nbytes >= MIN_RATE_BYTES and secs > 0:
            out.append((max(nbytes - credit, 0.0), secs))
    return out


def final_link_s(pre: list[dict], timings_ms: dict, final_bytes: int, link_Bps: float) -> float:
    """Seconds of a run's stop-and-copy send that the link's rate forced: the token bucket
    (:class:`transport.TokenBucket`, full at the start) replayed over the run's measured
    timeline the way the simulator runs its own -- each pre-copy round's bytes against the
    tokens of its duration, refills over its collect, the drain, the pause latency and the
    final collect -- and the final set's bytes (plus the stream's end) beyond the tokens left,
    at the link's rate.  0 when the bucket held the whole final set: the send then took only
    CPU time, which the simulator does not model and the switchover keeps."""
    from transport import default_burst_bytes
    from vmem.analysis.simulate import TRAILER_BYTES

    rate = float(link_Bps)
    burst = float(default_burst_bytes(link_Bps))
    tokens = burst
    for x in pre:
        # a round the link held up ends on an empty bucket; one the copy path held up (it
        # took longer than its bytes needed) ends on whatever the time refilled
        tokens = min(burst, max(0.0, tokens + rate * float(x.get("duration_s") or 0) - float(x.get("bytes_sent") or 0)))
        tokens = min(burst, tokens + rate * float(x.get("collect_ms") or 0) / 1e3)
    idle_s = sum(float(timings_ms.get(k) or 0) for k in ("drain_before_pause", "pause_latency", "final_collect")) / 1e3
    tokens = min(burst, tokens + rate * idle_s)
    return max(0.0, final_bytes + TRAILER_BYTES - tokens) / rate


def sample_from_report(report, link_Bps: float) -> dict:
    """The calibration quantities of one real migration report (dict or MigrationReport).

    Raises:
        ConfigError: the report did not complete verified, or has no downtime.
    """
    from vmem.analysis.simulate import transfer_time_s

    d = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    if d.get("outcome") != "completed" or not d.get("verified"):
        raise ConfigError("calibration", f"a calibration run did not complete verified ({d.get('outcome')}: {d.get('reason')}); "
                                         "nothing measured from it")
    downtime_s = _num(d.get("downtime_ms"))
    if downtime_s is None:
        raise ConfigError("calibration", "a calibration run's report has no downtime_ms")
    downtime_s /= 1e3
    tm = d.get("timings_ms") or {}
    rounds = d.get("rounds") or []
    pre = [x for x in rounds if x.get("kind", "precopy") == "precopy"]
    pc = d.get("postcopy") or None
    mode = ("hybrid" if d.get("mode") == "hybrid" else "postcopy") if pc else "precopy"
    s = {q: None for q in QUANTITIES}
    s.update(mode=mode, guest_pages=int(d.get("guest_pages") or 0), link_Bps=float(link_Bps), verified=True,
             pages_pending=int(pc.get("pages_pending") or 0) if pc else 0)
    s["setup_s"] = (_num(d.get("setup_time_ms")) or 0.0) / 1e3
    s["pause_s"] = (_num(tm.get("pause_latency")) or 0.0) / 1e3
    # The wait for the destination to catch up before the pause: simulated on its own (the
    # link idles, the guest writes on), so it is taken out of the tail below.
    s["drain_s"] = (_num(tm.get("drain_before_pause")) or 0.0) / 1e3
    collects = [float(x.get("collect_ms") or 0) / 1e3 for x in pre]
    s["collect_s"] = float(np.median(collects)) if collects else None
    blackout_s = _num(d.get("blackout_ms"))
    s["gap_s"] = blackout_s / 1e3 if blackout_s is not None and blackout_s / 1e3 > downtime_s else 0.0
    busy = _rate_rounds(pre, link_Bps)
    migration_s = _num(d.get("migration_time_s"))
    if mode == "precopy":
        if busy:
            s["efficiency"] = sum(b for b, _ in busy) / sum(t for _, t in busy) / link_Bps
        stop = [x for x in rounds if x.get("kind") == "stop-and-copy"]
        s["final_pages"] = int(stop[-1].get("pages_sent") or 0) if stop else 0
        s["last_round_pages"] = int(pre[-1].get("pages_sent") or 0) if pre else 0
        final_bytes = int(stop[-1].get("bytes_sent") or 0) if stop else 0
        s["switchover_s"] = max(0.0, downtime_s - final_link_s(pre, tm, final_bytes, link_Bps))
        if migration_s is not None:
            s["tail_s"] = migration_s - s["setup_s"] - s["drain_s"] - s["pause_s"] - transfer_time_s(d)
    else:
        push_s, push_rate = _num(pc.get("push_s")), _num(pc.get("push_rate_Bps"))
        if push_rate and push_s and push_rate * push_s >= MIN_RATE_BYTES:
            s["efficiency"] = push_rate / link_Bps
        elif busy:  # hybrid: the pre-copy rounds carried the bulk
            s["efficiency"] = sum(b for b, _ in busy) / sum(t for _, t in busy) / link_Bps
        s["postcopy_switch_s"] = downtime_s
        s["push_hold_s"] = (_num(tm.get("push_held_for_restart")) or 0.0) / 1e3
        faults = int(pc.get("faults") or 0)
        blocked = _num(pc.get("blocktime_ms"))
        s["fault_wait_s"] = blocked / 1e3 / faults if faults and blocked is not None else 0.0
        placed_s = _num(tm.get("pause_to_all_placed"))
        if migration_s is not None and placed_s is not None:
            rounds_s = sum(float(x.get("duration_s") or 0) + float(x.get("collect_ms") or 0) / 1e3 for x in pre)
            # pause_to_all_placed starts when the pause is posted: the pause latency is in it
            s["tail_s"] = migration_s - s["setup_s"] - rounds_s - s["drain_s"] - placed_s / 1e3
    return s


def trace_dirty_rate(trace) -> float:
    """A guest's dirty rate as the calibration compares it: distinct pages written per interval,
    summed, over the trace's duration (pages/s; 0 for a guest that writes nothing).  It
    depends a little on the interval (a page rewritten within one counts once): the
    calibration guests' are profiled at :data:`ACTIVITY_INTERVAL_S`."""
    duration_s = float(trace.duration_s)
    return float(trace.count_per_interval().sum()) / duration_s if duration_s > 0 else 0.0


def trace_dirty_rate_before(trace, t_s: float, window_s: float = PAUSE_WINDOW_S) -> float:
    """The guest's dirty rate (as :func:`trace_dirty_rate` counts it) over the ``window_s``
    of ``trace`` before trace time ``t_s`` -- the trace looping, as the simulator replays it
    (``t_s`` past the end wraps; a window longer than the trace is the whole trace).  The
    intervals whose middle falls in the window count, whole; pages/s."""
    duration_s = float(trace.duration_s)
    if duration_s <= 0:
        return 0.0
    if window_s >= duration_s:
        return trace_dirty_rate(trace)
    times = np.asarray(trace.times_s, dtype=float)
    mids = (times[:-1] + times[1:]) / 2 - times[0]
    lengths = np.diff(times)
    t = float(t_s) % duration_s
    # how far each interval's middle lies before t, going round the loop
    back = (t - mids) % duration_s
    sel = back < window_s
    span = float(lengths[sel].sum())
    return float(trace.count_per_interval()[sel].sum()) / span if span > 0 else 0.0


def _guest_dirty_rate(workload: str, params: dict, seed: int, size_bytes: int, tracker: str) -> float:
    """Profile a calibration guest for :data:`ACTIVITY_PROFILE_S` and return its dirty rate."""
    from vmem.analysis.profile import run_profile

    trace = run_profile(workload, dict(params), size_bytes, duration_s=ACTIVITY_PROFILE_S,
                        interval_s=ACTIVITY_INTERVAL_S, tracker=tracker, seed=seed)
    return round(trace_dirty_rate(trace), 1)


class Calibration:
    """A loaded calibration: the runs, and draws of simulation parameters from them.

    Attributes:
        data: the file's JSON object (see the module docstring).
        path: where it was loaded from (None if built in memory).
    """

    def __init__(self, data: dict, path: str | None = None):
        self.data = data
        self.path = path
        self.runs = list(data.get("runs") or [])

    # --- persistence ------------------------------------------------------------------------

    def save(self, path: str | None = None) -> str:
        path = path or self.path or default_path()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)  # a reader never sees half a file
        self.path = path
        return path

    def describe(self) -> str:
        """One line: where, when, on what, under which load, from how many runs."""
        pv = self.data.get("provenance") or {}
        load = (self.data.get("load") or {}).get("loadavg_before")
        busy = self._kind_runs("busy")
        by_mode = {m: sum(1 for r in busy if r.get("mode") == m and not r.get("variant")) for m in MODES}
        short = sum(1 for r in self.runs if r.get("variant") == "short")
        idle = len(self._kind_runs("idle"))
        pooled = self.data.get("pooled") or []
        dates = [str(e.get("date_utc") or "?") for e in pooled]
        pool = (f"{len(pooled)} calibrations pooled ({dates[0]} .. {dates[-1]}; the newest " if len(pooled) > 1 else "")
        return (f"calibration {self.path or '(in memory)'}: {pool}{pv.get('date_utc', '?')} on {pv.get('hostname', '?')} "
                f"(commit {str(pv.get('git_commit') or '?')[:12]}){')' if pool else ''}, {by_mode['precopy']} pre-copy + "
                + (f"{short} short pre-copy + " if short else "") + 
                f"{by_mode['postcopy']} post-copy + {by_mode['hybrid']} hybrid runs"
                + (f" + {idle} of an idle guest" if idle else "")
                + (f", load average {load[0]:.1f}" if load else ""))

    # --- draws --------------------------------------------------------------------------------

    @property
    def run_share(self) -> float:
        """The placement probe's ``run_share`` (:func:`placement_probe`); 0 for a file without
        one (before 2026-12-05 night): every backlog page then counts as a scattered one."""
        share = (self.data.get("placement") or {}).get("run_share")
        return float(min(max(share, 0.0), 1.0)) if isinstance(share, (int, float)) and math.isfinite(share) else 0.0

    def _runs(self, mode: str, link_Bps: float, kind: str = "busy") -> list[dict]:
        """Runs of ``mode`` (falling back to the other mode's) of the ``kind`` of calibration
        guest at the calibrated link rate nearest ``link_Bps`` on a log scale."""
        runs = self._mode_runs(mode, kind)
        if not runs:
            raise ConfigError("calibration", f"{self.path or 'the calibration'} holds no runs; run vmem calibrate")
        best = min(abs(math.log(r["link_Bps"] / link_Bps)) for r in runs)
        return [r for r in runs if abs(math.log(r["link_Bps"] / link_Bps)) <= best + 1e-9]

    def _kind_runs(self, kind: str) -> list[dict]:
        """The runs of one calibration guest: ``"busy"`` (the workload guest; older files hold
        only these, untagged) or ``"idle"``."""
        return [r for r in self.runs if r.get("guest", "busy") == kind]

    def _mode_runs(self, mode: str, kind: str = "busy") -> list[dict]:
        """Runs of ``mode``; a hybrid without hybrid runs falls back on post-copy ones, then any.
        The "short" pre-copy runs are left out: they are there for the switchover's line."""
        drawn = [r for r in self._kind_runs(kind) if not r.get("variant")]
        for m in (mode, "postcopy" if mode == "hybrid" else mode):
            runs = [r for r in drawn if r.get("mode") == m]
            if runs:
                return runs
        return drawn

    def dirty_rates(self) -> dict:
        """``{"busy": pages/s, "idle": pages/s}`` the calibration guests wrote (distinct pages per
        second in a :data:`ACTIVITY_INTERVAL_S` profile); ``{}`` for older files."""
        guests = (self.data.get("config") or {}).get("guests") or {}
        return {k: float(g["dirty_pages_per_s"]) for k, g in guests.items()
                if isinstance(g, dict) and isinstance(g.get("dirty_pages_per_s"), (int, float))}

    def busy_weight(self, dirty_pages_per_s: float | None) -> float:
        """How much of the busy calibration guest's costs a guest writing ``dirty_pages_per_s``
        pays, 0..1: 1 at or above the busy guest's rate, 0 at the idle guest's, linear between
        (an assumption: the runs measure the two ends only).  1 when the rate is unknown or the
        calibration has no idle runs (older files)."""
        if dirty_pages_per_s is None or not self._kind_runs("idle"):
            return 1.0
        rates = self.dirty_rates()
        lo, hi = rates.get("idle", 0.0), rates.get("busy")
        if hi is None or hi <= lo:
            return 1.0 if dirty_pages_per_s > lo else 0.0
        return float(min(max((float(dirty_pages_per_s) - lo) / (hi - lo), 0.0), 1.0))

    @staticmethod
    def _line(runs: list[dict], q: str, x_key: str, *, sign: int = 1,
              identified: bool = False, x_of=None, slope: float | None = None,
              robust: bool = False) -> tuple[float, float, dict]:
        """Least-squares (``robust``: Theil-Sen) ``q = a + b * x`` over the runs that have ``q``
        and ``x``; ``(a, b, residual by run id)``; b = 0 with fewer than two distinct x.  ``x_of``: maps the
        run's ``x_key`` value to the x the line is over (default: as it is).  ``sign`` +1: b >= 0 (a
        cost never shrinks with size: noise must not make it); -1: b <= 0.

        ``identified``: b = 0 also when it lies within two standard errors of zero.  The
        switchover's slope over the final set needs it: the calibration guest's final sets
        span a few dozen pages, a slope fitted over them is noise (one file's came out at
        34 us/page, +/- 39), and extrapolated to a guest whose final set is 131,072 pages it
        added a second to a switchover that really costs milliseconds.

        ``slope``: b as given (another line's), only the intercept fitted.

        ``robust``: the Theil-Sen line instead of least squares -- b the median of the slopes
        between every two runs at distinct x, a the median of ``q - b * x``, and the
        two-standard-error test of ``identified`` on the residuals' median absolute deviation
        (x 1.4826, the normal's sigma).  The drain's line needs it: its runs sit in a few
        clusters of x (a few dozen pages, ~575, a full 1,024-page record), three or four runs
        each, and in least squares one slow run tilts the line: a calibration of 2026-12-05
        read 3.7 ms at 1,024 pages, 0.45 ms above its own short runs' mean, where the
        validation guests' drains were 2.5-2.7 ms (test_a_slow_drain_does_not_tilt_the_drain_line)."""
        f = x_of or float
        pts = [(float(f(r[x_key])), float(r[q]), id(r)) for r in runs
               if r.get(q) is not None and isinstance(r.get(x_key), (int, float))]
        if not pts:
            return 0.0, 0.0, {}
        x = np.array([p[0] for p in pts])
        y = np.array([p[1] for p in pts])
        if slope is not None:
            b = float(slope)
            a = float(np.mean(y - b * x))
        elif len(set(x.tolist())) >= 2:
            if robust:
                i, j = np.triu_indices(len(x), 1)
                dx = x[j] - x[i]
                keep = dx != 0
                b = float(np.median((y[j] - y[i])[keep] / dx[keep]))
                a = float(np.median(y - b * x))
            else:
                b, a = np.polyfit(x, y, 1)
            b = max(float(b) * sign, 0.0) * sign
            if identified and b != 0.0:
                resid = y - (a + b * x)
                dof = len(x) - 2
                sxx = float(((x - x.mean()) ** 2).sum())
                if dof <= 0:
                    se = math.inf
                elif robust:
                    se = 1.4826 * float(np.median(np.abs(resid - np.median(resid)))) / math.sqrt(sxx)
                else:
                    se = math.sqrt(float(resid @ resid) / dof / sxx)
                if abs(b) <= 2 * se:
                    b = 0.0
            a = float(np.median(y - b * x)) if robust else float(np.mean(y - b * x))
        else:
            a, b = float(np.mean(y)), 0.0
        return a, b, {rid: yi - (a + b * xi) for xi, yi, rid in pts}

    def load_factor(self, probe_s: float | None = None) -> float:
        """How much slower this host is now than during the calibration: a :func:`probe_s`
        taken now (or ``probe_s``) over the calibration runs' median probe, clipped to
        [0.5, 5]; 1.0 when the calibration holds no probes, and 1.0 when the ratio lies
        within the spread (10th-90th percentile) of the calibration's own probes over their
        median (needs >= 5 probes): at the steady load it was measured under, one probe reads
        that far either way (measured here: 0.135-0.19 s on a quiet host, a median of 0.14),
        so a ratio inside that band says nothing about the load, and scaling by it moved every
        CPU-bound cost by the probe's noise (a quiet-host validation read 0.86-0.98 in most
        cells: busy guests' CPU-bound costs scaled down by that much, while their measured
        downtimes came out above the predictions)."""
        probes = [r["probe_s"] for r in self.runs if isinstance(r.get("probe_s"), (int, float)) and r["probe_s"] > 0]
        if not probes:
            return 1.0
        median = float(np.median(probes))
        now = probe_s if probe_s is not None else host_probe_s()
        ratio = now / median
        if len(probes) >= 5:
            lo, hi = np.percentile(np.array(probes) / median, [10, 90])
            if lo <= ratio <= hi:
                return 1.0
        return float(min(max(ratio, LOAD_FACTOR_MIN), LOAD_FACTOR_MAX))

    def draw_params(self, npages: int, link_Bps: float, n: int, *, mode: str = "precopy", seed: int = 0,
                    load_factor: float = 1.0, dirty_pages_per_s=None) -> list[dict]:
        """``n`` bootstrap draws of :class:`vmem.analysis.simulate.SimulationParams` fields
        for a guest of ``npages`` on a link of ``link_Bps`` (draw 0 is not special).

        ``mode``: one of :data:`MODES` (:func:`mode_for` maps a ``postcopy`` parameter to it):
        the runs of that mode are drawn from.  ``load_factor`` (:meth:`load_factor`)
        multiplies the CPU-bound fixed costs (:data:`CPU_BOUND`), each draw's divided by one
        of the calibration's probe ratios (probe / median probe; needs >= 3 probes): the
        error of the one probe the factor came from.  ``dirty_pages_per_s``: the guest's
        dirty rate (:func:`trace_dirty_rate`), or a sequence of ``n`` rates, one per draw (a
        phased guest's, each at its start's pause: :func:`trace_dirty_rate_before`); each draw
        comes from the busy calibration guest's runs with probability :meth:`busy_weight` of
        its rate, else from the idle guest's (None: the busy guest's, as older files have no
        other).  One rate repeated n times draws exactly what that one rate draws.
        """
        if mode not in MODES:
            raise ConfigError("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
        if isinstance(dirty_pages_per_s, (list, tuple, np.ndarray)):
            if len(dirty_pages_per_s) != n:
                raise ConfigError("dirty_pages_per_s", f"one rate per draw: {len(dirty_pages_per_s)} rates for {n} draws")
            ws = np.array([self.busy_weight(x) for x in dirty_pages_per_s], dtype=float)
        else:
            ws = np.full(n, self.busy_weight(dirty_pages_per_s))
        kinds = [k for k, used in (("busy", bool((ws > 0.0).any())), ("idle", bool((ws < 1.0).any()))) if used]
        # The switchover's cost per final page is identified by the busy guest's runs (the
        # short ones above all; an idle guest's final set is empty): both kinds use it.
        busy_pre = [r for r in self._kind_runs("busy") if r.get("mode") == "precopy"]
        switch_line = (self._line(busy_pre, "switchover_s", "final_pages", identified=True, x_of=switch_backlog_pages)
                       if any(isinstance(r.get("final_pages"), (int, float)) for r in busy_pre) else None)
        # Likewise the drain's cost per page of the last round's last record (the short runs'
        # last round is round 0: a full record; the Xen-policy runs' a few dozen pages); pre-copy
        # only: a hybrid draws its own runs' drains.
        drain_line = (self._line(busy_pre, "drain_s", "last_round_pages", identified=True, x_of=last_record_pages,
                                 robust=True)
                      if mode == "precopy" and any(isinstance(r.get("last_round_pages"), (int, float)) for r in busy_pre)
                      else None)
        # The load probe is the host's, whichever guest ran: all runs' probes.
        probes = [float(r["probe_s"]) for r in self.runs if isinstance(r.get("probe_s"), (int, float)) and r["probe_s"] > 0]
        ctx = {k: self._draw_context(k, mode, link_Bps, switch_line, drain_line, bool(probes)) for k in kinds}
        picks = {}
        for k in kinds:
            # the busy guest's picks come from the same stream as before idle runs existed
            salt = 0xCA1 if k == "busy" else 0x1D1E
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & 0xFFFFFFFF, salt])))
            picks[k] = rng.integers(0, len(ctx[k]["runs"]), n)
        if len(kinds) == 2:
            u = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & 0xFFFFFFFF, 0x6B1]))).random(n)
            kind_of = ["busy" if ui < wi else "idle" for ui, wi in zip(u, ws)]
        else:
            kind_of = kinds * n
        # The load factor is one probe taken now, and one probe is noisy: at the calibration's
        # steady load its probes spread around their median as far as the ratios below.  Each
        # draw takes one of those ratios as the error of the probe just taken (a factor that
        # read high by a ratio r means the host is r times less busy than it said), so the
        # range holds the load factor's own error; identical probes give no spread.
        ratios = (np.array(probes) / float(np.median(probes))) if len(probes) >= 3 else np.ones(1)
        probe_err = ratios[np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & 0xFFFFFFFF, 0x9B0]))).integers(0, ratios.size, n)]
        out = []
        for i, (kind, err) in enumerate(zip(kind_of, probe_err)):
            c = ctx[kind]
            r = c["runs"][int(picks[kind][i])]
            # (an error of exactly 1 leaves the factor as given, even one beyond the clip)
            lf = float(min(max(load_factor / float(err), LOAD_FACTOR_MIN), LOAD_FACTOR_MAX)) if err != 1.0 else load_factor
            probe_now = float(np.median(probes)) * lf if probes else None
            # Run r's costs, their distance from the middle of the runs' widened to what a
            # handful of runs predicts for the next one (predictive_widening)
            every = [self._run_params(c, x, npages, probe_now) for x in c["runs"]]
            mine = every[int(picks[kind][i])]
            k = predictive_widening(len(c["runs"]))
            p = {}
            for q, v in mine.items():
                mid = float(np.median([e[q] for e in every]))
                p[q] = mid + k * (v - mid)
            effs = c["effs"]
            # never outside what the runs saw, widened by 20 %
            lo, hi = (0.8 * min(effs), 1.2 * max(effs)) if effs else (0.05, 1.5)
            p["bandwidth_efficiency"] = min(max(p["bandwidth_efficiency"], lo, 0.05), hi, 1.5)
            for q in p:
                p[q] = max(0.0, p[q])
            for q in CPU_BOUND:
                p[q] *= lf
            out.append(p)
        return out

    def _run_params(self, c: dict, r: dict, npages: int, probe_now: float | None) -> dict:
        """The simulation parameters one calibration run ``r`` of a draw context ``c`` gives
        (the lines at this guest's size plus r's residual; before clipping at 0 and the load
        factor)."""
        p = {}
        for q, x in (("setup_s", npages), ("tail_s", npages)):
            a, b, res = c["lines"][q]
            p[q] = a + b * x + res.get(id(r), 0.0)
        p["post_s"] = p.pop("tail_s")
        # The switch's cost grows with the pages still to come (marking them missing):
        # the simulator adds the slope times the pages its own switch leaves pending.
        a, b, res = c["lines"]["postcopy_switch_s"]
        p["postcopy_switch_s"] = a + res.get(id(r), 0.0)
        p["postcopy_switch_per_page_s"] = b
        for q in ("pause_s", "drain_s", "collect_s", "switchover_s", "push_hold_s", "fault_wait_s", "gap_s"):
            v = r.get(q)
            line = {"switchover_s": c["switch_line"], "drain_s": c["drain_line"]}.get(q)
            if line is not None:
                a, b, res = line
                # run r's residual when it is a pre-copy run; else the line alone (the
                # final set's or the last round's part is the simulator's)
                v = a + res.get(id(r), 0.0)
            if v is None:  # a quantity this mode's run lacks: the median of the guest's runs that have it
                vals = [x[q] for x in c["kind_runs"] if x.get(q) is not None]
                v = float(np.median(vals)) if vals else 0.0
            p[q] = float(v)
        p["switchover_per_page_s"] = c["busy_switch_line"][1] if c["busy_switch_line"] is not None else 0.0
        p["switchover_run_share"] = self.run_share
        p["drain_per_page_s"] = c["drain_line"][1] if c["drain_line"] is not None else 0.0
        eff, eff_line, effs = r.get("efficiency"), c["eff_line"], c["effs"]
        if id(r) in c.get("eff_scale", {}):  # a run at another link (the idle guest's pool)
            eff = eff * c["eff_scale"][id(r)]
        elif eff is not None and eff_line is not None and eff_line[1] < 0 and id(r) in eff_line[2]:
            a, b, res = eff_line
            # at the load of now, with run r's residual
            eff = a + b * probe_now + res[id(r)]
        if eff is None:
            eff = float(np.median(effs)) if effs else 1.0
        p["bandwidth_efficiency"] = float(eff)
        p["blackout_gap_s"] = p.pop("gap_s")
        return p

    def _draw_context(self, kind: str, mode: str, link_Bps: float, busy_switch_line, busy_drain_line,
                      have_probes: bool) -> dict:
        """What :meth:`draw_params` draws from for one calibration guest: its runs at this
        link (the idle guest: its runs at every link, each run's efficiency moved to this
        link's median), its lines over guest size (setup, tail) and pages pending (post-copy switch),
        its switchover line (the busy guest's slope; the intercept over its own runs), its
        drain line (the busy guest's; none for the idle guest, whose last round is always a
        round 0) and its copy efficiency over the load probe."""
        runs = self._runs(mode, link_Bps, kind)
        all_mode = self._mode_runs(mode, kind)
        kind_runs = self._kind_runs(kind)
        lines = {q: self._line(all_mode, q, "guest_pages") for q in ("setup_s", "tail_s")}
        # pure (everything pending) and hybrid (a few pages) runs together give the line's
        # intercept and slope over pages pending
        lines["postcopy_switch_s"] = self._line(kind_runs, "postcopy_switch_s", "pages_pending")
        switch_line, drain_line = busy_switch_line, busy_drain_line
        pre = [r for r in kind_runs if r.get("mode") == "precopy"]
        if kind != "busy" and pre:
            if busy_switch_line is not None:
                switch_line = self._line(pre, "switchover_s", "final_pages", x_of=switch_backlog_pages,
                                         slope=busy_switch_line[1])
            # An idle guest's last round is always its round 0, whose last record is full at
            # any size: there is nothing to fit, its runs' drains are taken as measured
            drain_line = None
        # The copy efficiency over the load probe, within this link's runs: the probe a
        # prediction is made under is the runs' median probe times the load factor.
        eff_line = self._line(runs, "efficiency", "probe_s", sign=-1) if have_probes else None
        effs = [float(r["efficiency"]) for r in runs if r.get("efficiency") is not None]
        eff_scale = {}
        if kind == "idle" and all_mode:
            # Nothing an idle guest does after its round 0 touches the link (its final set is
            # empty, it takes no faults): its switchover, pause, collect, drain and gap are
            # the host's at any link rate, so its runs at every calibrated link are drawn,
            # twice the runs of one link (six per mode and link gave a range as narrow as the
            # six happened to be: 1.13-1.31 ms at 200 MB/s, where validation runs of the idle
            # guest read 1.0-1.7 ms, and 1.05-2.53 ms at 50 MB/s).  A run at another link
            # keeps its efficiency's distance from its own link's median, at this link's.
            here = {id(r) for r in runs}
            pool = [r for r in all_mode if id(r) not in here and r.get("efficiency") is not None]
            if effs and pool:
                by_link: dict = {}
                for r in pool:
                    by_link.setdefault(r["link_Bps"], []).append(float(r["efficiency"]))
                link_median = {link: float(np.median(v)) for link, v in by_link.items()}
                for r in pool:
                    eff_scale[id(r)] = float(np.median(effs)) / link_median[r["link_Bps"]]
                runs = runs + pool
        return {"runs": runs, "kind_runs": kind_runs, "lines": lines, "switch_line": switch_line,
                "busy_switch_line": busy_switch_line, "drain_line": drain_line, "eff_line": eff_line, "effs": effs,
                "eff_scale": eff_scale}

    def point_params(self, npages: int, link_Bps: float, *, mode: str = "precopy", load_factor: float = 1.0,
                     dirty_pages_per_s: float | None = None) -> dict:
        """The medians of many draws: the point prediction's parameters."""
        draws = self.draw_params(npages, link_Bps, 101, mode=mode, seed=12345, load_factor=load_factor,
                                 dirty_pages_per_s=dirty_pages_per_s)
        return {k: float(np.median([d[k] for d in draws])) for k in draws[0]}


def load_calibration(path: str | None = None, *, required: bool = False) -> Calibration | None:
    """Load a calibration file (default :func:`default_path`); None if absent and not ``required``.

    Raises:
        ConfigError: the file is unreadable, too large, not a vmem calibration, of another
            version, or holds a malformed run -- naming the file and what to do.
    """
    path = path or default_path()
    if not os.path.exists(path):
        if required:
            raise ConfigError("--calibration", f"{path} does not exist; run `vmem calibrate` first")
        return None
    fix = f"; run `vmem calibrate --out {path}` to measure it again"
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise ConfigError("--calibration", f"{path} is {size} bytes, more than a calibration can be{fix}")
        with open(path) as f:
            data = json.load(f)
    except OSError as err:
        raise ConfigError("--calibration", f"cannot read {path}: {err.strerror}") from None
    except ValueError as err:
        raise ConfigError("--calibration", f"{path} is not JSON ({err}){fix}") from None
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        raise ConfigError("--calibration", f"{path} is not a vmem calibration file{fix}")
    if data.get("version") != CALIBRATION_VERSION:
        raise ConfigError("--calibration", f"{path} is calibration version {data.get('version')!r}; this vmem reads "
                                           f"version {CALIBRATION_VERSION}{fix}")
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs or len(runs) > MAX_RUNS:
        raise ConfigError("--calibration", f"{path} holds no runs (or too many){fix}")
    for i, r in enumerate(runs):
        bad = None
        if not isinstance(r, dict) or r.get("mode") not in MODES:
            bad = "mode"
        elif not (isinstance(r.get("link_Bps"), (int, float)) and r["link_Bps"] > 0):
            bad = "link_Bps"
        elif not (isinstance(r.get("guest_pages"), int) and r["guest_pages"] > 0):
            bad = "guest_pages"
        elif r.get("guest", "busy") not in ("busy", "idle"):
            bad = "guest"
        elif "calibration" in r and not (isinstance(r["calibration"], int) and r["calibration"] >= 0):
            bad = "calibration"
        else:
            for q in QUANTITIES:
                v = r.get(q)
                if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= (-60 if q == "tail_s" else 0)):
                    bad = q
                    break
        if bad:
            raise ConfigError("--calibration", f"{path}: run {i} has a bad {bad!r}{fix}")
    return Calibration(data, path)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_calibration(sizes_bytes=(64 << 20, 128 << 20), links_Bps=(50e6, 200e6), repeats: int = 2, *,
                    postcopy: bool = True, idle: bool = True, tracker: str = "auto", warmup_s: float = 0.5,
                    observe_s: float = 0.1, on_run=None) -> Calibration:
    """Migrate the calibration guest ``repeats`` times per size x link x mode (pre-copy under
    Xen's policy, and -- unless ``postcopy=False`` -- pure post-copy and hybrid), plus once
    per size x link a "short" pre-copy (:data:`SHORT_POLICY`, for the switchover's slope),
    and -- unless ``idle=False`` -- an idle guest as many times per size x link x mode (runs
    tagged ``"guest": "idle"``: a guest that writes nothing pays less around its pages, see
    :meth:`Calibration.busy_weight`); profile both guests' dirty rates; return the Calibration.

    Runs are interleaved (every size x link x mode once, then again) so a change in the
    host's load spreads over all of them.  A run that does not complete verified is left
    out and counted in ``data["failed_runs"]``.

    Raises:
        ConfigError: bad arguments, or no run completed.
    """
    from vmem import provenance
    from vmem.migration.backend import GuestSpec, boot_guest
    from vmem.migration.local import LocalDestination, run_local_migration
    from vmem.migration.policy import IterationsThresholdPolicy, XenDefaultPolicy
    from vmem.migration.source import MigrationOptions

    if not isinstance(repeats, int) or repeats < 1:
        raise ConfigError("--repeats", f"must be an integer >= 1, got {repeats!r}")
    if not sizes_bytes or any(s < (1 << 20) for s in sizes_bytes):
        raise ConfigError("--sizes", f"need guest sizes of at least 1 MiB, got {list(sizes_bytes)}")
    if not links_Bps or any(not (b > 0 and math.isfinite(b)) for b in links_Bps):
        raise ConfigError("--links", f"need link rates > 0, got {list(links_Bps)}")
    modes = MODES if postcopy else ("precopy",)
    load_before = _loadavg()
    runs, failed = [], []
    guests = {"busy": (CAL_WORKLOAD, CAL_PARAMS, CAL_SEED)} | ({"idle": (IDLE_WORKLOAD, {}, CAL_SEED)} if idle else {})
    kinds = list(guests)
    # every size x link x mode x guest once, then again (a change of load spreads over all)
    plan = [(size, bw, mode, kind) for _ in range(repeats) for size in sizes_bytes for bw in links_Bps
            for mode in modes for kind in kinds]
    # one short run per size x link, after the first repeat's runs
    first = len(sizes_bytes) * len(links_Bps) * len(modes) * len(kinds)
    plan[first:first] = [(size, bw, "short", "busy") for size in sizes_bytes for bw in links_Bps]
    for i, (size, bw, mode, kind) in enumerate(plan):
        policy = IterationsThresholdPolicy(**SHORT_POLICY) if mode == "short" else XenDefaultPolicy()
        opts = MigrationOptions(tracker=tracker, policy=policy, observe_s=observe_s, bandwidth_Bps=bw,
                                postcopy=POSTCOPY_OPTION.get(mode, "off"))
        workload, params, seed = guests[kind]
        probe = host_probe_s()  # how busy the host is just before this run
        # As `vmem migrate` and the validation: the destination starts before the guest boots.
        with (LocalDestination.start(opts) as destination,
              boot_guest(GuestSpec(workload, dict(params), seed), size) as guest):
            time.sleep(warmup_s)
            report = run_local_migration(guest, opts, destination=destination)
        try:
            runs.append(sample_from_report(report, bw) | {"probe_s": probe}
                        | ({"variant": "short"} if mode == "short" else {}) | ({"guest": kind} if kind != "busy" else {}))
        except ConfigError as err:
            failed.append(str(err))
        if on_run is not None:
            on_run(i + 1, len(plan), size, bw, mode if kind == "busy" else f"{mode}, {kind} guest", report)
    # What each guest writes, measured as a profile measures it: where a guest to predict for
    # falls between them (Calibration.busy_weight).
    rates = {kind: {"workload": w, "params": dict(p), "seed": sd,
                    "dirty_pages_per_s": _guest_dirty_rate(w, p, sd, min(sizes_bytes), tracker)}
             for kind, (w, p, sd) in guests.items()}
    if not runs:
        raise ConfigError("calibration", "no calibration run completed verified: " + "; ".join(failed[:3]))
    placement = placement_probe()
    data = {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "provenance": provenance.collect(),
            "load": {"loadavg_before": load_before, "loadavg_after": _loadavg()},
            "config": calibration_grid(sizes_bytes, links_Bps, tracker=tracker, postcopy=postcopy)
                      | {"repeats": repeats, "guests": rates, "activity_interval_s": ACTIVITY_INTERVAL_S,
                         "warmup_s": warmup_s, "observe_s": observe_s,
                         "short_policy": {"name": "threshold", **SHORT_POLICY}},
            "placement": placement, "runs": runs, "failed_runs": failed}
    return Calibration(data)


#: How many calibrations one file pools (``vmem calibrate --append``): the newest are kept.
#: A host drifts (this VM's fresh-memory speed moves over hours), so a pool spans days at
#: most, not the host's life.
POOL_MAX_CALIBRATIONS = 8
#: What must match for two calibrations to pool: the grid and the guests they migrated.
POOL_KEYS = ("sizes_bytes", "links_Bps", "workload", "params", "seed", "tracker", "modes")


def pool_calibrations(new: Calibration, previous: Calibration,
                      max_calibrations: int = POOL_MAX_CALIBRATIONS) -> Calibration:
    """``new``'s runs added to ``previous``'s (a pooled file's runs, or one calibration's), the
    oldest calibrations dropped beyond ``max_calibrations``; everything else (config, guests'
    dirty rates, placement probe, failed runs, provenance) is ``new``'s.

    Why pool.  A forecast's range bootstraps the calibration's runs, and one calibration has
    twelve per mode and guest: measured over ten calibrations of one day on this VM (docs/
    profiling.md), a single calibration's widened 5th-95th percentile range of the
    switchover held only 77-82 % of the *other* calibrations' runs where 90 % was meant --
    twelve runs do not show the host's tails, and the host moves between calibrations -- while
    the pool of the other nine held 88-89 % of each one's.  Every run is tagged with the
    sequence number of its calibration (``"calibration"``), and ``data["pooled"]`` lists the
    calibrations pooled (sequence, date, commit, runs, load average).

    Raises:
        ConfigError: the two were measured on another grid or with other guests
            (:data:`POOL_KEYS`), naming the difference; ``max_calibrations`` < 1.
    """
    if not isinstance(max_calibrations, int) or max_calibrations < 1:
        raise ConfigError("max_calibrations", f"must be an integer >= 1, got {max_calibrations!r}")
    why = pool_mismatch(previous, new.data.get("config") or {})
    if why:
        raise ConfigError("--append", why)
    old_pool = list(previous.data.get("pooled") or [_pool_entry(previous.data, 0, len(previous.runs))])
    seq = max(int(e.get("seq", 0)) for e in old_pool) + 1
    pool = old_pool + [_pool_entry(new.data, seq, len(new.runs))]
    keep = {int(e["seq"]) for e in pool[-max_calibrations:]}
    runs = [dict(r, calibration=int(r.get("calibration", 0))) for r in previous.runs
            if int(r.get("calibration", 0)) in keep]
    runs += [dict(r, calibration=seq) for r in new.runs]
    data = dict(new.data, runs=runs, pooled=[e for e in pool if int(e["seq"]) in keep])
    return Calibration(data, previous.path)


def calibration_grid(sizes_bytes, links_Bps, *, tracker: str = "auto", postcopy: bool = True) -> dict:
    """The part of a calibration's ``config`` that :func:`run_calibration` with these arguments
    writes and that pooling compares (:data:`POOL_KEYS`): a command line can check a file
    against it before measuring anything."""
    return {"sizes_bytes": list(sizes_bytes), "links_Bps": list(links_Bps), "workload": CAL_WORKLOAD,
            "params": CAL_PARAMS, "seed": CAL_SEED, "tracker": tracker,
            "modes": list(MODES if postcopy else ("precopy",))}


def pool_mismatch(previous: Calibration, config: dict) -> str:
    """Why a calibration measured with ``config`` (its ``data["config"]``, or
    :func:`calibration_grid`) cannot pool with ``previous``; ``""`` if it can."""
    old = previous.data.get("config") or {}
    for key in POOL_KEYS:
        if key in config and config[key] != old.get(key):
            return (f"the calibration in {previous.path or 'the file'} was measured with {key} = {old.get(key)!r}, "
                    f"this one with {config[key]!r}: they cannot be pooled; store this one elsewhere (--out) or "
                    "without --append")
    return ""


def _pool_entry(data: dict, seq: int, n_runs: int) -> dict:
    pv = data.get("provenance") or {}
    return {"seq": seq, "date_utc": pv.get("date_utc"), "git_commit": pv.get("git_commit"), "runs": n_runs,
            "loadavg_before": (data.get("load") or {}).get("loadavg_before")}


def summary_rows(cal: Calibration) -> list[tuple[str, str, str]]:
    """(quantity, mode, "median (min-max), n") rows for humans; the idle guest's runs as
    "<mode>, idle guest"."""
    rows = []
    groups = [(mode, [r for r in cal._kind_runs("busy") if r.get("mode") == mode and not r.get("variant")]) for mode in MODES]
    groups.append(("precopy (short)", [r for r in cal.runs if r.get("variant") == "short"]))
    groups += [(f"{mode}, idle guest", [r for r in cal._kind_runs("idle") if r.get("mode") == mode]) for mode in MODES]
    for mode, runs in groups:
        for q in QUANTITIES:
            vals = [r[q] for r in runs if r.get(q) is not None]
            if not vals:
                continue
            scale, unit = (1.0, "") if q in ("efficiency", "final_pages", "last_round_pages") else (1e3, " ms")
            rows.append((q, mode, f"{np.median(vals) * scale:,.3f}{unit} ({min(vals) * scale:,.3f}-{max(vals) * scale:,.3f}), n={len(vals)}"))
    for kind, rate in cal.dirty_rates().items():
        rows.append(("dirty_pages_per_s", f"{kind} guest", f"{rate:,.1f}"))
    pl = cal.data.get("placement")
    if pl:
        rows.append(("placement of a record", f"{pl.get('pages')} pages",
                     f"{pl.get('contiguous_ms')} ms contiguous, {pl.get('scattered_ms')} ms scattered "
                     f"(run share {pl.get('run_share')})"))
    return rows
