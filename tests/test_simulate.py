"""The analytical precopy model (vmem.analysis.model) and the trace-driven simulator (vmem.analysis.simulate).

Closed forms are checked against step-by-step iteration; the simulator against synthetic
traces whose outcome is known, and against a real migration of the profiled workload.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import numpy as np
import pytest

from vmem.errors import ConfigError
from vmem.analysis.model import PrecopyModel, closed_form, iterate, policy_thresholds, wire_bytes
from vmem.migration.policy import (
    Decision,
    IterationsThresholdPolicy,
    PrecopyStats,
    Verdict,
    XenDefaultPolicy,
    estimate_downtime_s,
    make_policy,
)
from vmem.migration.report import MigrationReport
from vmem.analysis.simulate import (
    compare_reports,
    predict,
    simulate,
    transfer_time_s,
)
from vmem.analysis.trace import DirtyTrace
from vmem.cli.predict import add_predict_arguments, cmd_predict

PW = 4096 + 8 + 16 / 1024


# --- the analytical model ------------------------------------------------------------------------

MODEL_GRID = list(itertools.product(
    [65536, 262144],                 # V
    [0, 500, 5000, 20000, 60000],    # D pages/s
    [100, 3000, 50000],              # W
    [50e6, 125e6, 1.25e9],           # B
    [0.0, 0.001, 0.05],              # c
))


@pytest.mark.parametrize("V,D,W,B,c", MODEL_GRID)
def test_closed_form_matches_iteration(V, D, W, B, c):
    m = PrecopyModel(V, D, W, B, collect_s=c, switchover_s=0.002)
    for policy in (XenDefaultPolicy(), IterationsThresholdPolicy(3, 0), IterationsThresholdPolicy(30, 200),
                   IterationsThresholdPolicy(1, 10**9)):
        T, N, strict = policy_thresholds(policy)
        cf = closed_form(m, T, N, strict=strict)
        it = iterate(m, policy)
        assert cf.precopy_rounds == it.precopy_rounds, (policy.describe(), cf.reason, it.reason)
        for a, b in zip(cf.sent_pages, it.sent_pages):
            assert a == pytest.approx(b, rel=1e-9, abs=1e-6)
        assert cf.final_pages == pytest.approx(it.final_pages, rel=1e-9, abs=1e-6)
        assert cf.pages_sent == pytest.approx(it.pages_sent, rel=1e-9, abs=1e-6)
        assert cf.precopy_s == pytest.approx(it.precopy_s, rel=1e-9, abs=1e-9)
        assert cf.downtime_s == pytest.approx(it.downtime_s, rel=1e-9, abs=1e-9)
        assert cf.total_time_s == pytest.approx(it.total_time_s, rel=1e-9, abs=1e-9)


def test_model_geometric_series():
    """No working-set cap, no collect cost: a_i = V r^i, total = V (1 - r^(n+1)) / (1 - r)."""
    V, B = 262144, 125e6
    D = 0.5 * B / PW                       # r = 0.5
    m = PrecopyModel(V, D, V, B, collect_s=0, switchover_s=0)
    assert m.ratio == pytest.approx(0.5)
    cf = closed_form(m, 0, 5)
    assert cf.precopy_rounds == 5
    assert cf.sent_pages == pytest.approx([V * 0.5 ** i for i in range(5)])
    assert cf.final_pages == pytest.approx(V * 0.5 ** 5)
    assert cf.pages_sent == pytest.approx(V * (1 - 0.5 ** 6) / 0.5)
    assert cf.downtime_s == pytest.approx(V * 0.5 ** 5 * PW / B)
    assert cf.converges
    # Threshold reached: smallest k with V r^k <= T.
    cf = closed_form(m, 1000, 100)
    assert cf.precopy_rounds == math.ceil(math.log(1000 / V) / math.log(0.5))


def test_model_levels_at_wws_and_fixed_point():
    # r > 1: never converges; every round after the first finds the working set again.
    m = PrecopyModel(65536, 50000, 4000, 50e6, collect_s=0)
    assert m.ratio > 1 and m.levels()
    cf = closed_form(m, 50, 5, strict=True)
    assert cf.dirty_pages == [4000] * 5 and not cf.converges and cf.reason == "iteration 5 >= 5"
    # r < 1 with a collect cost: settles at a* = D c / (1 - r), never below.
    m = PrecopyModel(65536, 5000, 65536, 125e6, collect_s=0.01)
    a_star = m.fixed_point_pages
    assert a_star == pytest.approx(5000 * 0.01 / (1 - m.ratio))
    cf = closed_form(m, a_star * 0.99, 200)
    assert cf.precopy_rounds == 200 and cf.final_pages == pytest.approx(a_star) and cf.final_pages >= a_star * (1 - 1e-12)
    assert closed_form(m, a_star * 1.01, 200).precopy_rounds < 200
    with pytest.raises(ConfigError, match="bandwidth"):
        PrecopyModel(1, 1, 1, 0)


def test_model_iterate_any_policy():
    m = PrecopyModel(65536, 1000, 2000, 125e6)
    seen = []

    def policy(s: PrecopyStats):
        seen.append(s)
        return Decision.ABORT if s.iteration == 3 else Decision.CONTINUE

    p = iterate(m, policy)
    assert p.outcome == "aborted" and p.precopy_rounds == 3 and p.downtime_s is None
    assert [s.iteration for s in seen] == [1, 2, 3] and seen[-1].bandwidth_limit_Bps == 125e6
    assert seen[-1].dirty_history == tuple(p.dirty_pages)


def test_wire_bytes_matches_stream():
    assert wire_bytes(16384) == 67240192          # measured: round 0 of a 64 MiB guest
    assert wire_bytes(1) == 4096 + 8 + 16 and wire_bytes(1025) == 1025 * 4104 + 32 and wire_bytes(0) == 0


# --- the simulator on synthetic traces ---------------------------------------------------------------

def synthetic(intervals, npages, interval_s=0.1, **kw):
    return DirtyTrace.from_intervals(intervals, npages=npages, interval_s=interval_s, **kw)


def uniform_trace(npages=262144, rate_pps=20000, seconds=10.0, interval_s=0.1, seed=0):
    rng = np.random.default_rng(seed)
    n = round(seconds / interval_s)
    return synthetic([rng.integers(0, npages, round(rate_pps * interval_s)) for _ in range(n)], npages, interval_s)


def test_idle_guest_converges_in_one_round():
    t = synthetic([[]] * 20, 16384)
    r = simulate(t, XenDefaultPolicy(), bandwidth_Bps=100e6)
    assert isinstance(r, MigrationReport) and r.outcome == "completed"
    assert [x.kind for x in r.rounds] == ["precopy", "stop-and-copy"]
    assert r.rounds[0].pages_sent == 16384 and r.rounds[0].dirty_pages == 0 and r.rounds[1].pages_sent == 0
    assert r.pages_sent == 16384 and r.reason == "dirty 0 < 50 pages"
    assert r.rounds[0].bytes_sent == wire_bytes(16384)
    # 16384 pages at 100 MB/s, minus the token bucket's 1 MB head start.
    assert r.rounds[0].duration_s == pytest.approx((wire_bytes(16384) - 1e6) / 100e6, rel=1e-6)
    assert r.downtime_ms == pytest.approx(3.0)
    json.loads(r.to_json())


@pytest.mark.parametrize("rule", ["overlap", "poisson"])
def test_hot_set_smaller_than_link_converges_to_it(rule):
    """500 hot pages written in every interval, at 25k pages/s of link: the dirty count
    falls from the whole guest to the hot set and stays there."""
    hot = np.arange(1000, 1500)
    t = synthetic([hot] * 50, 65536)
    r = simulate(t, IterationsThresholdPolicy(10, 0), bandwidth_Bps=100e6, rule=rule)
    pre = [x for x in r.rounds if x.kind == "precopy"]
    assert len(pre) == 10 and r.reason == "iteration 10 >= 10"
    counts = [x.dirty_pages for x in pre]
    assert all(0 < c <= 500 for c in counts)
    if rule == "overlap":
        assert counts == [500] * 10 and r.rounds[-1].pages_sent == 500
    else:
        assert counts[0] == 500 and r.rounds[-1].pages_sent <= 500
    assert r.downtime_ms <= (wire_bytes(500) / 100e6 + 0.003) * 1e3 + 1e-6


def test_rate_above_link_never_converges_xen_stops_at_5():
    """40k pages/s against a 50 MB/s link (12k pages/s): the dirty count never falls below 50."""
    t = uniform_trace(rate_pps=40000, seconds=5)
    r = simulate(t, XenDefaultPolicy(), bandwidth_Bps=50e6)
    pre = [x for x in r.rounds if x.kind == "precopy"]
    assert len(pre) == 5 and r.reason == "iteration 5 >= 5" and r.outcome == "completed"
    assert min(x.dirty_pages for x in pre) > 50_000
    # Each round takes longer than the one before it sent: rounds never shrink.
    assert all(b.pages_sent >= 0.9 * a.pages_sent for a, b in zip(pre[1:], pre[2:]))


def test_stats_mirror_the_migrator():
    t = uniform_trace(npages=65536, rate_pps=5000, seconds=3)
    seen: list[PrecopyStats] = []

    def policy(s):
        seen.append(s)
        return Verdict(Decision.STOP_AND_COPY if s.iteration == 4 else Decision.CONTINUE, "ok")

    B = 80e6
    r = simulate(t, policy, bandwidth_Bps=B, setup_s=0.5, collect_s=0.002)
    assert [s.iteration for s in seen] == [1, 2, 3, 4]
    pre = r.rounds[:4]
    assert [s.dirty_count for s in seen] == [x.dirty_pages for x in pre]
    assert seen[-1].dirty_history == tuple(x.dirty_pages for x in pre)
    assert [s.total_written for s in seen] == list(itertools.accumulate(x.pages_sent for x in pre))
    for s, x in zip(seen, pre):
        assert x.pages_sent == (65536 if x.index == 0 else pre[x.index - 1].dirty_pages)
        assert s.guest_pages == 65536 and s.bandwidth_limit_Bps == B and s.page_size == 4096
        assert s.round_s == pytest.approx(x.duration_s, abs=1e-6)
        assert s.bandwidth_Bps == pytest.approx(x.bytes_sent / s.round_s)
        assert s.est_downtime_s == pytest.approx(estimate_downtime_s(s.dirty_count, min(s.bandwidth_Bps, B)))
        assert s.dirty_rate_pps == pytest.approx(s.dirty_count / (s.round_s + 0.002))
    assert seen[0].elapsed_s == pytest.approx(0.5 + seen[0].round_s + 0.002)
    assert all(b.elapsed_s > a.elapsed_s for a, b in zip(seen, seen[1:]))
    assert r.rounds[-1].kind == "stop-and-copy" and r.rounds[-1].pages_sent >= pre[-1].dirty_pages
    assert r.pages_sent == sum(x.pages_sent for x in r.rounds)
    assert r.total_time_s == pytest.approx(0.5 + sum(x.duration_s + 0.002 for x in pre) + 0.0005 + r.downtime_ms / 1e3, abs=1e-5)
    assert transfer_time_s(r) == pytest.approx(r.total_time_s - 0.5 - 0.0005, abs=1e-5)


def test_throttle_subsamples_writes():
    t = uniform_trace(npages=262144, rate_pps=20000, seconds=4)

    def make(th):
        return lambda s: (Verdict(Decision.CONTINUE, "", throttle=th) if s.iteration < 4
                          else Verdict(Decision.STOP_AND_COPY, "done"))

    free = simulate(t, make(None), bandwidth_Bps=50e6)
    half = simulate(t, make(0.5), bandwidth_Bps=50e6)
    assert free.rounds[0].dirty_pages == half.rounds[0].dirty_pages       # throttle starts after round 0
    for a, b in zip(free.rounds[1:4], half.rounds[1:4]):
        assert b.dirty_pages < 0.75 * a.dirty_pages
    dil = simulate(t, make(0.5), bandwidth_Bps=50e6, throttle_model="dilate")
    assert dil.rounds[1].dirty_pages < 0.8 * free.rounds[1].dirty_pages
    again = simulate(t, make(0.5), bandwidth_Bps=50e6)                                       # seeded
    assert [x.dirty_pages for x in again.rounds] == [x.dirty_pages for x in half.rounds]


def test_abort_garbage_and_postcopy():
    t = uniform_trace(npages=16384, rate_pps=1000, seconds=1)
    r = simulate(t, lambda s: (Decision.ABORT, "no"), bandwidth_Bps=1e8)
    assert r.outcome == "aborted" and r.reason == "no" and r.downtime_ms is None and len(r.rounds) == 1
    r = simulate(t, lambda s: "maybe", bandwidth_Bps=1e8)
    assert r.outcome == "failed" and "not a Decision" in r.reason
    r = simulate(t, lambda s: 1 / 0, bandwidth_Bps=1e8)
    assert r.outcome == "failed" and "ZeroDivisionError" in r.reason
    r = simulate(t, lambda s: Decision.POSTCOPY, bandwidth_Bps=1e8)
    assert r.outcome == "failed" and "POSTCOPY" in r.reason
    r = simulate(t, lambda s: Decision.CONTINUE, bandwidth_Bps=1e9)
    assert len(r.rounds) == 1001 and "safety cap" in r.reason
    with pytest.raises(ConfigError, match="bandwidth"):
        simulate(t, None, bandwidth_Bps=0)
    with pytest.raises(ConfigError, match="rule"):
        simulate(t, None, bandwidth_Bps=1e8, rule="nearest")


def test_trace_loops_when_the_migration_outlasts_it():
    t = uniform_trace(npages=65536, rate_pps=5000, seconds=0.5)
    r = simulate(t, XenDefaultPolicy(), bandwidth_Bps=10e6)        # round 0 alone takes ~27 s
    assert r.rounds[0].dirty_pages == len(t.union())               # the whole trace, many times over
    r2 = simulate(t, XenDefaultPolicy(), bandwidth_Bps=10e6, loop=False)
    assert r2.rounds[0].dirty_pages < r.rounds[0].dirty_pages and r2.rounds[1].dirty_pages == 0


def test_one_gib_ten_seconds_simulates_without_per_page_python():
    """Four simulations of a 1 GiB, 10 s trace (several rounds each, every one starting with
    all 262,144 pages) cost less CPU than 30 bare Python passes over the guest's pages,
    measured in the same run (about 12 here): a simulator that touched each page in Python
    in each round would cost far more.  No absolute time is asserted."""
    t = uniform_trace(npages=262144, rate_pps=50000, seconds=10)
    t0 = time.process_time()
    for bw in (125e6, 1.25e9):
        assert simulate(t, XenDefaultPolicy(), bandwidth_Bps=bw).rounds
        assert simulate(t, make_policy("threshold", precopy_iterations=30, precopy_threshold=10), bandwidth_Bps=bw).rounds
    simulate_cpu_s = time.process_time() - t0
    t0 = time.process_time()
    total = 0
    for page in range(t.npages):  # the baseline: one Python step per page, nothing else
        total += page
    one_pass_cpu_s = time.process_time() - t0
    assert simulate_cpu_s < 30 * one_pass_cpu_s, (simulate_cpu_s, one_pass_cpu_s)


def test_predict_compare_and_cli(tmp_path, capsys):
    t = uniform_trace(npages=65536, rate_pps=5000, seconds=3)
    tp = str(tmp_path / "t.npz")
    t.save(tp)
    measured = simulate(t, IterationsThresholdPolicy(3, 10), bandwidth_Bps=50e6, setup_s=0.4).to_dict()
    measured["pages_sent"] = int(measured["pages_sent"] * 1.1)
    rp = str(tmp_path / "real.json")
    json.dump(measured, open(rp, "w"))
    # Policy and bandwidth default to the measured report's.
    rep, rows = predict(tp, compare_report=measured, setup_s=0.4)
    assert rep.policy == {"name": "threshold", "precopy_iterations": 3, "precopy_threshold": 10}
    assert rep.bandwidth_limit_bps == 400e6
    by = {r["metric"]: r for r in rows}
    assert by["precopy rounds"]["error_pct"] == 0.0
    assert by["pages sent"]["error_pct"] == pytest.approx(-100 / 11, abs=0.01)
    assert by["downtime ms"]["error_pct"] == 0.0
    with pytest.raises(ConfigError, match="--bandwidth"):
        predict(tp)
    parser = argparse.ArgumentParser()
    add_predict_arguments(parser)
    out = str(tmp_path / "pred.json")
    assert cmd_predict(parser.parse_args(["--trace", tp, "--compare-report", rp, "--json", out, "--setup", "0.4"])) == 0
    text = capsys.readouterr().out
    assert "predicted in advance (from the profile alone) vs measured" in " ".join(text.split()) and "-9.1 %" in text
    assert json.load(open(out))["tracker"] == "simulated"
    # --align is labelled as what it is: an explanation of the measured run.
    t.meta["vclock0_s"] = 0.0
    t.save(tp)
    measured.setdefault("guest", {})["source_before"] = {"vclock_s": 0.25}
    json.dump(measured, open(rp, "w"))
    assert cmd_predict(parser.parse_args(["--trace", tp, "--compare-report", rp, "--align"])) == 0
    assert "an explanation, not a prediction" in " ".join(capsys.readouterr().out.split())
    assert cmd_predict(parser.parse_args(["--trace", tp, "--bandwidth", "1Gbit", "--policy", "threshold",
                                          "--precopy-threshold", "100", "--collect-ms", "2"])) == 0
    text = capsys.readouterr().out
    assert "predicted totals" in text and "dirty" in text
    with pytest.raises(ConfigError):
        cmd_predict(parser.parse_args(["--trace", tp, "--bandwidth", "1Gbit", "--policy", "xen", "--pause-threshold", "5"]))
    with pytest.raises(ConfigError, match="--compare-report"):
        cmd_predict(parser.parse_args(["--trace", tp, "--compare-report", str(tmp_path / "nope.json")]))


def test_compare_reports_rows():
    a = {"outcome": "completed", "pages_sent": 110, "total_time_s": 2.0, "downtime_ms": 10.0,
         "rounds": [{"kind": "precopy", "duration_s": 1.0, "collect_ms": 0, "pages_sent": 100},
                    {"kind": "stop-and-copy", "pages_sent": 10}]}
    b = a | {"pages_sent": 100, "downtime_ms": 20.0}
    rows = {r["metric"]: r for r in compare_reports(a, b)}
    assert rows["pages sent"]["error_pct"] == 10.0 and rows["downtime ms"]["error_pct"] == -50.0
    assert rows["transfer time s"]["predicted"] == pytest.approx(1.01)
    assert rows["outcome"]["error_pct"] is None


# --- against a real migration ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.serial
def test_simulator_agrees_with_a_real_migration():
    """Profile 64 MiB uniform at 20,000 writes/s, then really migrate the same workload and
    seed over a 50 MB/s link, and compare model outputs (no wall-clock asserts).

    Tolerances, and why: the workload is seeded and paced by its virtual clock, so profile
    and migration write the same pages at the same rate; what differs is when rounds end
    (scheduling jitter, a loaded 2-core host).  Uniform writes dirty
    ``N (1 - exp(-R t / N))`` distinct pages in ``t`` seconds, so a 10 % error in a round's
    length moves its dirty count by at most ~10 % x (R t / N) e^{-Rt/N} / (1 - e^{-Rt/N}),
    about 4 % here (rounds of ~1 s, R t / N ~ 1.2).  We allow 6 % on pages sent and on the
    stop-and-copy set; the round count must match exactly (Xen's policy stops at its
    5-iteration cap: ~11,000 pages stay dirty, never < 50).  Measured here: errors of
    0.2-0.5 %.
    """
    from vmem.analysis.profile import validate_prediction

    res = validate_prediction("uniform", {"rate": 20000}, 64 << 20, 50e6, seed=7, duration_s=3.0,
                              interval_s=0.1, warmup_s=0.5)
    m, p = res["measured"], res["predicted"]
    assert m.outcome == "completed", m.reason
    rows = {r["metric"]: r for r in res["rows"]}
    assert rows["outcome"]["predicted"] == "completed"
    assert rows["precopy rounds"]["predicted"] == rows["precopy rounds"]["measured"] == 5
    assert abs(rows["pages sent"]["error_pct"]) <= 6.0, rows
    assert abs(rows["stop-and-copy pages"]["error_pct"]) <= 6.0, rows
    for a, b in zip(p.rounds, m.rounds):
        assert a.pages_sent == pytest.approx(b.pages_sent, rel=0.08), (a, b)


# --- one round engine: the migrator's and the simulator's plug-ins decide alike ------------------------

def test_engine_gives_the_migrator_and_the_simulator_the_same_decisions():
    """The same policy through vmem.migration.rounds.run_precopy, once with the real
    migrator's plug-in (a SourceMigration whose tracker yields a scripted dirty sequence)
    and once with the simulator's (a replay yielding the same sequence): same rounds, same
    pages sent, same decisions, same throttle calls."""
    from types import SimpleNamespace

    from vmem.analysis.simulate import _Link, _TraceRounds
    from vmem.migration.rounds import run_precopy
    from vmem.migration.source import MigrationOptions, SourceMigration, _LiveRounds

    npages = 2048
    rng = np.random.default_rng(3)
    sequence = [np.unique(rng.integers(0, npages, n)).astype(np.int64) for n in (1500, 900, 600, 400, 260, 120, 45, 10, 3)]

    class Tracker:
        collect_s = 0.0

        def __init__(self):
            self.left = iter(sequence)

        def collect(self):
            return next(self.left)

    class Guest:
        def __init__(self):
            self.npages = npages
            self.ram = SimpleNamespace(pages=np.zeros((npages, 4096), dtype=np.uint8))
            self.throttles = []

        def set_throttle(self, level):
            self.throttles.append(level)

    class Channel:
        def send_parts(self, parts):
            pass

        def wait_readable(self, timeout_s):
            return False

    class Replay:
        def __init__(self):
            self.left = iter(sequence)

        def advance(self, seconds, throttle):
            return next(self.left)

    def throttling(s):
        if s.iteration == 2:
            return Verdict(Decision.CONTINUE, "slow down", throttle=0.4)
        return Verdict(Decision.STOP_AND_COPY if s.dirty_count < 100 else Decision.CONTINUE, f"dirty {s.dirty_count}")

    policies = [XenDefaultPolicy(), make_policy("threshold", precopy_iterations=30, precopy_threshold=100),
                make_policy("two-threshold", pause_threshold=50, max_iterations=8), throttling,
                lambda s: Decision.ABORT if s.iteration == 3 else Decision.CONTINUE]
    for policy in policies:
        guest = Guest()
        mig = SourceMigration(guest, Channel(), MigrationOptions())
        mig.tracker = Tracker()
        mig._writer.begin()  # the headers, as after the handshake
        live_rounds: list = []
        live = run_precopy(_LiveRounds(mig, time.monotonic()), policy, np.array([[0, npages]], dtype=np.int64),
                           guest_pages=npages, page_size=4096, bandwidth_limit_Bps=None, on_round=live_rounds.append)
        sim_rounds: list = []
        sim = run_precopy(_TraceRounds(_Link(1e8, 0), Replay(), 4096, 0.001, elapsed_s=0.0), policy, npages,
                          guest_pages=npages, page_size=4096, bandwidth_limit_Bps=None, on_round=sim_rounds.append)
        assert (live.decision, live.rounds) == (sim.decision, sim.rounds), policy
        assert [x.decision for x in live_rounds] == [x.decision for x in sim_rounds]
        assert [x.pages_sent for x in live_rounds] == [x.pages_sent for x in sim_rounds]
        assert [x.dirty_pages for x in live_rounds] == [x.dirty_pages for x in sim_rounds]
        assert [x.throttle for x in live_rounds] == [x.throttle for x in sim_rounds]
        assert np.array_equal(live.dirty, sim.dirty) and live.dirty_history == sim.dirty_history
        if policy is not policies[2]:  # two-threshold's reasons quote the (wall-clock) dirty rates
            assert [x.reason for x in live_rounds] == [x.reason for x in sim_rounds]
        assert guest.throttles == ([0.4] if policy is throttling else [])


def test_the_drain_before_the_pause_refills_the_link_and_lets_the_guest_write():
    """While the migrator waits for the destination to catch up before pausing (drain_s), the
    link idles -- its token bucket refills, so a final set larger than the bucket goes out up
    to that much sooner -- and the guest runs on, its writes joining the final set."""
    t = synthetic([list(range(4000))] * 50, 16384)  # the same 4,000 pages every interval: never converges
    base = simulate(t, XenDefaultPolicy(), bandwidth_Bps=50e6, collect_s=0.0, pause_s=0.0, switchover_s=0.001)
    drained = simulate(t, XenDefaultPolicy(), bandwidth_Bps=50e6, collect_s=0.0, pause_s=0.0, switchover_s=0.001,
                       drain_s=0.004)
    assert base.rounds[-1].pages_sent == drained.rounds[-1].pages_sent == 4000
    assert drained.downtime_ms == pytest.approx(base.downtime_ms - 4.0, abs=0.05)       # 4 ms of credit
    assert drained.migration_time_s == pytest.approx(base.migration_time_s, abs=1e-4)  # +4 ms drain, -4 ms send
    assert drained.timings_ms["drain_before_pause"] == 4.0
    # the collects refill the bucket too: the last round's (4 ms) and the final one, paused,
    # before the send (4 ms more; the migrator collects twice)
    collected = simulate(t, XenDefaultPolicy(), bandwidth_Bps=50e6, collect_s=0.004, pause_s=0.0, switchover_s=0.001)
    assert collected.rounds[-1].pages_sent == 4000
    assert collected.downtime_ms == pytest.approx(base.downtime_ms - 8.0, abs=0.05)
    # a hybrid drains before its pause too; a pure post-copy has nothing to drain
    common = dict(bandwidth_Bps=50e6, collect_s=0.0, pause_s=0.0, drain_s=0.004)
    hybrid = simulate(t, XenDefaultPolicy(), postcopy="after-precopy", **common)
    assert hybrid.mode == "hybrid" and hybrid.timings_ms["drain_before_pause"] == 4.0
    assert simulate(t, None, postcopy="pure", **common).timings_ms["drain_before_pause"] == 0.0
    u = uniform_trace(npages=16384, rate_pps=20000, seconds=6)
    few = simulate(u, XenDefaultPolicy(), bandwidth_Bps=50e6).rounds[-1].pages_sent
    more = simulate(u, XenDefaultPolicy(), bandwidth_Bps=50e6, drain_s=0.05).rounds[-1].pages_sent
    assert more > few  # 50 ms more of the guest's writes in the final set


def test_the_prediction_says_where_in_the_trace_its_pause_falls():
    """pause_trace_s: the trace clock when the guest is paused -- the start, then everything
    before the pause (setup, rounds, collects, drain, pause latency), unthrottled here."""
    from vmem.analysis.simulate import simulate

    t = uniform_trace(npages=65536, rate_pps=5000, seconds=4)
    d = simulate(t, None, bandwidth_Bps=50e6, start_s=1.0).to_dict()
    pause = d["guest"]["prediction"]["pause_trace_s"]
    p = d["guest"]["prediction"]["params"]
    assert pause == pytest.approx(1.0 + d["total_time_s"] - d["downtime_ms"] / 1e3 - p["post_s"], abs=1e-5)
    assert pause > 1.0 + p["setup_s"]
