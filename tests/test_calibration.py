"""The host calibration (vmem.analysis.calibration): what real runs yield, the file's round trip
and its refusals, the bootstrap draws, and forecasts whose ranges hold the host's noise."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from test_simulate import synthetic, uniform_trace
from vmem.analysis.calibration import (
    CALIBRATION_FORMAT,
    CALIBRATION_VERSION,
    Calibration,
    final_link_s,
    load_calibration,
    mode_for,
    run_calibration,
    sample_from_report,
)
from vmem.analysis.forecast import forecast
from vmem.analysis.simulate import TRAILER_BYTES, SimulationParams, predict, simulate
from vmem.cli.calibrate import add_calibrate_arguments, cmd_calibrate
from vmem.errors import ConfigError


def _run(mode="precopy", pages=16384, link=50e6, setup=1.0, tail=0.4, eff=0.9, switch=0.004, pending=0, **kw):
    r = {"mode": mode, "guest_pages": pages, "link_Bps": link, "verified": True, "pages_pending": pending,
         "setup_s": setup, "pause_s": 0.001, "collect_s": 0.0005 if mode != "postcopy" else None, "efficiency": eff,
         "switchover_s": switch if mode == "precopy" else None, "postcopy_switch_s": None, "push_hold_s": None,
         "fault_wait_s": None, "tail_s": tail, "gap_s": 0.0}
    r.update(kw)
    return r


def _calibration(runs) -> Calibration:
    return Calibration({"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "provenance": {"hostname": "test"},
                        "load": {"loadavg_before": [1.0, 1.0, 1.0]}, "runs": runs})


def _spread_runs():
    """Pre-copy runs at two sizes whose costs grow with size and vary run to run."""
    rng = np.random.default_rng(3)
    runs = []
    for pages in (16384, 32768):
        for _ in range(6):
            runs.append(_run(pages=pages, setup=0.5 + pages / 16384 * 0.4 + rng.uniform(-0.1, 0.1),
                             tail=0.1 + pages / 16384 * 0.2 + rng.uniform(-0.05, 0.05), eff=rng.uniform(0.8, 1.0),
                             switch=rng.uniform(0.002, 0.012)))
    return runs


def test_a_real_report_yields_the_quantities():
    report = {"outcome": "completed", "verified": True, "downtime_ms": 12.0, "blackout_ms": 30.0, "guest_pages": 16384,
              "setup_time_ms": 900.0, "migration_time_s": 2.5,
              "timings_ms": {"pause_latency": 1.5, "stop_and_copy_send": 4.0, "drain_before_pause": 2.5},
              "rounds": [{"kind": "precopy", "pages_sent": 16384, "bytes_sent": 50_000_000, "duration_s": 1.25, "collect_ms": 0.4},
                         {"kind": "precopy", "pages_sent": 100, "bytes_sent": 409_600, "duration_s": 0.001, "collect_ms": 0.6},
                         {"kind": "stop-and-copy", "pages_sent": 20, "bytes_sent": 81_920, "duration_s": 0.004}]}
    s = sample_from_report(report, 50e6)
    assert s["mode"] == "precopy" and s["setup_s"] == pytest.approx(0.9) and s["pause_s"] == pytest.approx(0.0015)
    # the 400 KiB round is too small to count; round 0 began on a full bucket (10 ms of the link)
    assert s["efficiency"] == pytest.approx((50e6 - 500_000) / 1.25 / 50e6)
    # the bucket held the whole final set (its tokens after round 1 and the waits before the
    # send: 140,400 + 30,000 + 200,000 bytes): the send was CPU time, kept in the switchover
    assert s["switchover_s"] == pytest.approx(0.012) and s["last_round_pages"] == 100
    assert s["collect_s"] == pytest.approx(0.0005)
    assert s["gap_s"] == pytest.approx(0.030)                           # a later gap longer than the downtime
    transfer = 1.25 + 0.0004 + 0.001 + 0.0006 + 0.012
    # the wait for the destination before the pause is a quantity of its own, not tail
    assert s["drain_s"] == pytest.approx(0.0025)
    assert s["tail_s"] == pytest.approx(2.5 - 0.9 - 0.0025 - 0.0015 - transfer)
    # a final set beyond the bucket's tokens: the link's share of the send comes off
    big = json.loads(json.dumps(report))
    big["downtime_ms"] = 20.0
    big["rounds"][-1].update(pages_sent=300, bytes_sent=1_231_000)
    link_s = (1_231_000 + TRAILER_BYTES - 370_400) / 50e6
    assert final_link_s(big["rounds"][:2], big["timings_ms"], 1_231_000, 50e6) == pytest.approx(link_s)
    assert sample_from_report(big, 50e6)["switchover_s"] == pytest.approx(0.020 - link_s)
    report["outcome"] = "failed"
    with pytest.raises(ConfigError, match="did not complete verified"):
        sample_from_report(report, 50e6)


def test_file_round_trip_and_refusals(tmp_path, monkeypatch):
    cal = _calibration(_spread_runs())
    path = cal.save(str(tmp_path / "c" / "cal.json"))
    back = load_calibration(path, required=True)
    assert back.runs == cal.runs and back.path == path
    assert back.draw_params(20000, 50e6, 8, seed=4) == cal.draw_params(20000, 50e6, 8, seed=4)
    assert "12 pre-copy" in back.describe()
    monkeypatch.setenv("VMEM_CALIBRATION", path)
    assert load_calibration().runs == cal.runs                       # the default path honours the variable
    assert load_calibration(str(tmp_path / "none.json")) is None     # absent and not required: none
    with pytest.raises(ConfigError, match="vmem calibrate"):
        load_calibration(str(tmp_path / "none.json"), required=True)
    bad = tmp_path / "bad.json"
    for text, what in (("{nope", "not JSON"), (json.dumps({"format": "x"}), "not a vmem calibration"),
                       (json.dumps({"format": CALIBRATION_FORMAT, "version": 99, "runs": []}), "version 99"),
                       (json.dumps({"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "runs": []}), "no runs"),
                       (json.dumps({"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "runs": [_run(setup=-1.0)]}), "setup_s"),
                       (json.dumps({"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "runs": [_run(mode="warp")]}), "mode"),
                       (json.dumps({"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "runs": [_run(final_pages=-3)]}),
                        "final_pages")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=what) as exc:
            load_calibration(str(bad))
        assert str(bad) in str(exc.value) and "vmem calibrate" in str(exc.value)


def test_draws_bootstrap_the_runs_and_scale_with_size():
    cal = _calibration(_spread_runs())
    small = cal.draw_params(16384, 50e6, 200, seed=1)
    large = cal.draw_params(65536, 50e6, 200, seed=1)
    assert len({d["bandwidth_efficiency"] for d in small}) > 5          # the runs' own spread, not one value
    assert np.median([d["setup_s"] for d in large]) > np.median([d["setup_s"] for d in small]) + 1.0  # 0.4 s per 16k pages
    pt = cal.point_params(16384, 50e6)
    assert 0.8 <= pt["bandwidth_efficiency"] <= 1.0 and 0.7 < pt["setup_s"] < 1.1
    # the nearest calibrated link rate is the one drawn from
    mixed = _calibration(_spread_runs() + [_run(link=500e6, eff=0.3)])
    assert {d["bandwidth_efficiency"] for d in mixed.draw_params(16384, 400e6, 20)} == {0.3}
    assert mode_for("after-precopy") == "hybrid" and mode_for("pure") == "postcopy" and mode_for(None) == "precopy"


def test_a_calibrated_steady_forecast_is_a_range_not_a_point():
    """The issue's complaint: a steady guest's range collapsed to a point.  With the host's
    noise drawn in, downtime and migration time get a real spread; the start time alone
    still hardly matters."""
    t = uniform_trace(npages=16384, rate_pps=2000, seconds=4)
    cal = _calibration(_spread_runs())
    plain = forecast(t, None, 50e6, starts=16)
    fc = forecast(t, None, 50e6, starts=16, calibration=cal)
    assert plain["metrics"]["migration_time_s"]["p90"] - plain["metrics"]["migration_time_s"]["p10"] < 0.02
    m = fc["metrics"]
    assert m["migration_time_s"]["p90"] - m["migration_time_s"]["p10"] > 0.1
    assert m["downtime_ms"]["p90"] > m["downtime_ms"]["p10"] + 2
    assert fc["calibrated"] and not fc["start_sensitive"] and "measured noise" in fc["advice"]
    # the point prediction uses the calibration's medians: the efficiency slows round 0
    r, _ = predict(t, None, 50e6, calibration=cal)
    base = simulate(t, None, bandwidth_Bps=50e6)
    assert r.rounds[0].duration_s > base.rounds[0].duration_s * 1.05
    assert r.migration_time_s > base.migration_time_s + 0.3 and "calibration" in r.guest["prediction"]


def _two_guest_calibration(busy_rate=3000.0):
    """Busy-guest runs (setup 50 ms, switchover 1.3 ms, tail 110 ms) and idle-guest runs
    (40 / 1.0 / 100 ms), with the guests' dirty rates as run_calibration stores them."""
    runs = [_run(pages=p, setup=0.050, switch=0.0013, tail=0.110, final_pages=9) for p in (16384, 32768) for _ in range(3)]
    runs += [_run(pages=p, setup=0.040, switch=0.0010, tail=0.100, final_pages=0, guest="idle")
             for p in (16384, 32768) for _ in range(3)]
    cal = _calibration(runs)
    cal.data["config"] = {"guests": {"busy": {"dirty_pages_per_s": busy_rate}, "idle": {"dirty_pages_per_s": 0.0}}}
    return cal


def test_the_idle_guests_costs_are_drawn_from_every_link():
    """Nothing an idle guest does after round 0 touches the link, so its runs at every link
    are drawn: six runs at 200 MB/s that happen to be tight (switchover 1.15-1.27 ms) no
    longer make a range that narrow when the 50 MB/s runs spread to 2.2 ms -- while each
    draw's copy efficiency stays this link's (a 50 MB/s run's is moved to the 200 MB/s
    median).  The busy guest's draws stay per link."""
    tight, wide = [1.15, 1.17, 1.18, 1.19, 1.21, 1.27], [1.10, 1.15, 1.18, 1.24, 1.50, 2.18]
    runs = [_run(pages=16384, link=200e6, switch=ms / 1e3, eff=0.9985 + i * 1e-5, final_pages=0, guest="idle")
            for i, ms in enumerate(tight)]
    runs += [_run(pages=16384, link=50e6, switch=ms / 1e3, eff=0.9996 + i * 1e-5, final_pages=0, guest="idle")
             for i, ms in enumerate(wide)]
    runs += [_run(pages=16384, link=link, switch=ms / 1e3, final_pages=9) for link, ms in
             [(200e6, x) for x in tight] + [(50e6, x) for x in wide]]
    cal = _calibration(runs)
    cal.data["config"] = {"guests": {"busy": {"dirty_pages_per_s": 3000.0}, "idle": {"dirty_pages_per_s": 0.0}}}
    idle = cal.draw_params(16384, 200e6, 400, seed=3, dirty_pages_per_s=0.0)
    sw = np.array([d["switchover_s"] for d in idle]) * 1e3
    assert np.percentile(sw, 95) > 1.6                 # the 50 MB/s runs' slow switchovers are drawn
    eff = np.array([d["bandwidth_efficiency"] for d in idle])
    assert eff.max() < 0.9992 and np.median(eff) == pytest.approx(0.99853, abs=1e-4)   # at 200 MB/s's level
    busy = cal.draw_params(16384, 200e6, 400, seed=3, dirty_pages_per_s=5000.0)
    assert np.percentile([d["switchover_s"] * 1e3 for d in busy], 95) < 1.4   # per link: the tight runs only


def test_a_guest_that_writes_nothing_gets_the_idle_guests_costs():
    """The draws follow the guest's dirty rate: the idle calibration guest's costs for a guest
    that writes nothing, the busy one's at or above its rate, a mix between; without a rate
    (or in a file without idle runs) the busy guest's, as before."""
    cal = _two_guest_calibration()
    idle, busy = cal.point_params(16384, 50e6, dirty_pages_per_s=0.0), cal.point_params(16384, 50e6, dirty_pages_per_s=5000.0)
    assert idle["setup_s"] == pytest.approx(0.040) and idle["switchover_s"] == pytest.approx(0.0010)
    assert idle["post_s"] == pytest.approx(0.100)
    assert busy["setup_s"] == pytest.approx(0.050) and busy["switchover_s"] == pytest.approx(0.0013)
    assert cal.point_params(16384, 50e6) == busy                         # no rate: the busy guest's
    assert cal.busy_weight(1500.0) == pytest.approx(0.5) and cal.busy_weight(None) == 1.0
    mixed = cal.draw_params(16384, 50e6, 400, seed=1, dirty_pages_per_s=750.0)
    share = np.mean([d["setup_s"] > 0.045 for d in mixed])
    assert 0.15 < share < 0.35                                           # ~25 % of the draws are the busy guest's
    # a file without idle runs: every rate gets the busy guest's costs
    only_busy = _calibration([r for r in cal.runs if "guest" not in r])
    assert only_busy.point_params(16384, 50e6, dirty_pages_per_s=0.0)["setup_s"] == pytest.approx(0.050)
    # a forecast of a trace with no writes uses the idle guest's costs
    silent = synthetic([[]] * 50, npages=16384, interval_s=0.02)
    fc = forecast(silent, None, 50e6, starts=4, calibration=cal)
    writing = forecast(uniform_trace(npages=16384, rate_pps=4000, seconds=1), None, 50e6, starts=4, calibration=cal)
    assert fc["metrics"]["downtime_ms"]["median"] < writing["metrics"]["downtime_ms"]["median"]
    assert fc["busy_weight"] == 0.0 and writing["busy_weight"] == 1.0


def test_predict_says_which_calibration_guest_a_trace_gets(tmp_path, capsys):
    from vmem.cli.predict import add_predict_arguments, cmd_predict

    cp = _two_guest_calibration().save(str(tmp_path / "cal.json"))
    tp = str(tmp_path / "t.npz")
    synthetic([[]] * 50, npages=16384, interval_s=0.02).save(tp)
    parser = argparse.ArgumentParser()
    add_predict_arguments(parser)
    assert cmd_predict(parser.parse_args(["--trace", tp, "--bandwidth", "50M", "--calibration", cp,
                                          "--json", str(tmp_path / "p.json")])) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "this guest writes 0 pages/s: 0% of the draws from the busy calibration guest's costs" in out
    assert json.loads((tmp_path / "p.json").read_text())["guest"]["prediction"]["calibration_busy_weight"] == 0.0


def test_a_run_of_an_unknown_guest_kind_is_refused(tmp_path):
    cal = _two_guest_calibration()
    cal.runs[-1]["guest"] = "sleepy"
    cal.data["runs"] = cal.runs
    path = cal.save(str(tmp_path / "cal.json"))
    with pytest.raises(ConfigError, match="bad 'guest'"):
        load_calibration(path)


def test_real_calibration_round_trip(tmp_path, capsys):
    """A real (tiny) calibration: every mode's run completes verified, the quantities are
    plausible, and what is stored loads back and drives a prediction."""
    cal = run_calibration([16 << 20], [200e6], 1, observe_s=0.05, warmup_s=0.2)
    assert not cal.data["failed_runs"], cal.data["failed_runs"]
    modes = {r["mode"]: r for r in cal.runs if "guest" not in r}
    assert set(modes) == {"precopy", "postcopy", "hybrid"}
    # the short pre-copy (stop after round 0) leaves a bigger final set than Xen's policy
    short = [r for r in cal.runs if r.get("variant") == "short"]
    xen = [r for r in cal.runs if r["mode"] == "precopy" and not r.get("variant") and "guest" not in r]
    assert len(short) == 1 and len(xen) == 1 and short[0]["final_pages"] > xen[0]["final_pages"]
    # the idle guest: one run per mode, an empty final set; it writes nothing, the busy guest does
    idle = {r["mode"]: r for r in cal.runs if r.get("guest") == "idle"}
    assert set(idle) == {"precopy", "postcopy", "hybrid"} and idle["precopy"]["final_pages"] == 0
    rates = cal.dirty_rates()
    assert rates["idle"] == 0.0 and rates["busy"] > 100, rates
    for r in cal.runs:
        assert r["verified"] and r["guest_pages"] == 4096 and r["setup_s"] > 0
        assert r["tail_s"] is not None and r["tail_s"] > -0.5
    assert 0.05 < modes["precopy"]["efficiency"] <= 1.5
    assert modes["postcopy"]["pages_pending"] > 0 and modes["postcopy"]["postcopy_switch_s"] > 0
    path = cal.save(str(tmp_path / "cal.json"))
    back = load_calibration(path, required=True)
    assert back.data["provenance"]["hostname"] and back.data["load"]["loadavg_before"]
    assert back.draw_params(4096, 200e6, 3, mode="hybrid") == cal.draw_params(4096, 200e6, 3, mode="hybrid")
    parser = argparse.ArgumentParser()
    add_calibrate_arguments(parser)
    assert cmd_calibrate(parser.parse_args(["--show", "--out", path])) == 0
    out = capsys.readouterr().out
    assert "postcopy_switch_s" in out and "efficiency" in out and "idle guest" in out
    # the placement probe is stored, loaded back and shown; it feeds every draw
    pl = back.data["placement"]
    assert pl["pages"] == 1024 and pl["contiguous_ms"] > 0 and pl["scattered_ms"] > 0
    assert 0.0 <= back.run_share == pl["run_share"] <= 1.0
    assert {d["switchover_run_share"] for d in back.draw_params(4096, 200e6, 3)} == {back.run_share}
    assert "placement of a record" in out and "run share" in out


def test_predict_and_profile_clis_use_a_calibration(tmp_path, capsys):
    from vmem.cli.predict import add_predict_arguments, cmd_predict
    from vmem.cli.profile import add_profile_arguments, cmd_profile

    t = uniform_trace(npages=16384, rate_pps=2000, seconds=3)
    tp = str(tmp_path / "t.npz")
    t.save(tp)
    cp = _calibration(_spread_runs()).save(str(tmp_path / "cal.json"))
    parser = argparse.ArgumentParser()
    add_predict_arguments(parser)
    assert cmd_predict(parser.parse_args(["--trace", tp, "--bandwidth", "50M", "--starts", "8", "--calibration", cp])) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "calibration" in out and "12 pre-copy" in out and "migration_time_s" in out and "measured noise" in out
    assert cmd_predict(parser.parse_args(["--trace", tp, "--bandwidth", "50M", "--postcopy", "pure"])) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "no calibration of this host" in out and "demanded (faults)" in out
    with pytest.raises(ConfigError, match="vmem calibrate"):
        cmd_predict(parser.parse_args(["--trace", tp, "--bandwidth", "50M", "--calibration", str(tmp_path / "x.json")]))
    parser = argparse.ArgumentParser()
    add_profile_arguments(parser)
    assert cmd_profile(parser.parse_args(["--from-trace", tp, "--bandwidth", "50M", "--calibration", cp,
                                          "--json", str(tmp_path / "a.json")])) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    row = a["predictions"][0]
    assert row["calibration"]["bandwidth_efficiency"] < 1.0 and "12 pre-copy" in a["calibration"]
    assert row["policies"]["xen"]["migration_time_s"] > row["policies"]["xen"]["transfer_time_s"] + 0.5


def test_load_factor_scales_the_cpu_bound_costs_only():
    runs = [r | {"probe_s": 0.2} for r in _spread_runs()]
    cal = _calibration(runs)
    assert cal.load_factor(0.4) == pytest.approx(2.0) and cal.load_factor(100.0) == 5.0  # clipped
    assert _calibration(_spread_runs()).load_factor(0.4) == 1.0                           # no probes: no scaling
    # a probe within the calibration probes' own spread (here 0.9-1.1 x their median) is noise: 1
    noisy = _calibration([r | {"probe_s": 0.2 * (0.9 + 0.2 * i / 11)} for i, r in enumerate(_spread_runs())])
    med = float(np.median([r["probe_s"] for r in noisy.runs]))
    assert noisy.load_factor(med * 0.95) == 1.0 and noisy.load_factor(med * 1.05) == 1.0
    assert noisy.load_factor(med * 0.8) == pytest.approx(0.8) and noisy.load_factor(med * 1.3) == pytest.approx(1.3)
    one = cal.draw_params(16384, 50e6, 10, seed=2)
    two = cal.draw_params(16384, 50e6, 10, seed=2, load_factor=2.0)
    for a, b in zip(one, two):
        assert b["setup_s"] == pytest.approx(2 * a["setup_s"]) and b["post_s"] == pytest.approx(2 * a["post_s"])
        assert b["switchover_s"] == a["switchover_s"]            # hand-offs and wake-ups: not the probe's CPU work
        assert b["bandwidth_efficiency"] == a["bandwidth_efficiency"] and b["pause_s"] == a["pause_s"]
    # the switchover's cost per page of the final set is CPU work: it scales, its intercept not
    sw = _calibration(_switchover_runs())
    one, two = sw.point_params(16384, 50e6), sw.point_params(16384, 50e6, load_factor=2.0)
    assert two["switchover_per_page_s"] == pytest.approx(2 * one["switchover_per_page_s"]) and one["switchover_per_page_s"] > 0
    assert two["switchover_s"] == pytest.approx(one["switchover_s"])
    from vmem.analysis.calibration import host_probe_s

    assert 0.0 < host_probe_s() < 120.0


def test_the_load_factor_carries_its_probe_error():
    """Issue 18: the load factor is one probe taken now, and in the validation runs it swung
    0.86-2.5 within one cell at one load.  Each draw divides it by one of the calibration's
    own probe ratios (probe / median probe), so the forecast's range holds the probe's error;
    a calibration whose probes agree adds none."""
    flat = _calibration([r | {"probe_s": 0.2} for r in _spread_runs()])
    spread = _calibration([r | {"probe_s": (0.1, 0.2, 0.4)[i % 3]} for i, r in enumerate(_spread_runs())])
    a = flat.draw_params(16384, 50e6, 200, seed=4, load_factor=1.5)
    b = spread.draw_params(16384, 50e6, 200, seed=4, load_factor=1.5)
    factors = {round(y["setup_s"] / x["setup_s"], 6) for x, y in zip(a, b)}
    assert factors == {0.5, 1.0, 2.0}                                # 1 / each ratio, and nothing else
    assert all(y["switchover_s"] == x["switchover_s"] for x, y in zip(a, b))  # not CPU-bound: untouched
    # the clip still holds per draw: 1.5 / 0.5 = 3 stays, 4.0 / 0.5 = 8 is clipped to 5
    c = spread.draw_params(16384, 50e6, 200, seed=4, load_factor=4.0)
    base = flat.draw_params(16384, 50e6, 200, seed=4, load_factor=1.0)
    assert max(y["setup_s"] / x["setup_s"] for x, y in zip(base, c)) == pytest.approx(5.0)
    # a forecast's range widens with the probe's error; its point barely moves
    tr = uniform_trace(npages=16384, rate_pps=2000, seconds=4)
    f_flat = forecast(tr, None, 50e6, starts=16, calibration=flat, load_factor=1.5)["metrics"]["migration_time_s"]
    f_spread = forecast(tr, None, 50e6, starts=16, calibration=spread, load_factor=1.5)["metrics"]["migration_time_s"]
    assert f_spread["p90"] - f_spread["p10"] > 1.5 * (f_flat["p90"] - f_flat["p10"])


def _switchover_runs(intercept_s=0.001, per_page_s=40e-6):
    """Pre-copy runs whose switchover grows with the stop-and-copy set, with noise."""
    rng = np.random.default_rng(5)
    return [_run(final_pages=n, switch=intercept_s + per_page_s * n + rng.uniform(-0.0003, 0.0003), probe_s=0.2)
            for n in (0, 20, 60, 120, 200, 250) for _ in range(2)]


def test_switchover_is_a_line_over_the_final_set():
    """Issue 18: an idle guest's downtime was predicted with the calibration guest's whole
    switchover (up to 6x too long).  The switchover is now the calibrated intercept plus a
    cost per page of the final set the simulator predicts: an empty final set pays the
    intercept only."""
    cal = _calibration(_switchover_runs())
    pt = cal.point_params(16384, 50e6)
    assert pt["switchover_s"] == pytest.approx(0.001, abs=0.0004)
    assert pt["switchover_per_page_s"] == pytest.approx(40e-6, rel=0.1)
    idle = synthetic([[]] * 40, 16384)
    r_idle, _ = predict(idle, None, 50e6, calibration=cal)
    assert r_idle.rounds[-1].pages_sent == 0
    median_switch_ms = float(np.median([r["switchover_s"] for r in cal.runs])) * 1e3   # ~5 ms: the old prediction
    assert r_idle.downtime_ms < median_switch_ms / 2
    # a guest with a final set pays per page on top of the wire time
    busy = uniform_trace(npages=16384, rate_pps=3000, seconds=4)
    r_busy, _ = predict(busy, None, 50e6, calibration=cal)
    final = r_busy.rounds[-1].pages_sent
    assert final > 10
    assert r_busy.timings_ms["switchover_overhead"] == pytest.approx((pt["switchover_s"] + pt["switchover_per_page_s"] * final) * 1e3,
                                                                     rel=1e-3)
    # an older file without final_pages keeps each run's switchover, no slope
    old = _calibration([{k: v for k, v in r.items() if k != "final_pages"} for r in _switchover_runs()])
    assert old.point_params(16384, 50e6)["switchover_per_page_s"] == 0.0
    assert old.point_params(16384, 50e6)["switchover_s"] > 2 * pt["switchover_s"]  # the whole runs' switchovers


def test_a_switchover_slope_the_runs_do_not_identify_is_left_out():
    """Issue 18, found by a validation on a quiet host: the calibration guest's final sets
    spanned 13-47 pages and the noise of its switchover gave a slope of ~34 us/page, which
    added ~1 s to a sweep guest's predicted downtime (131,072 final pages; measured 2,690 ms
    against 3,657 predicted).  A slope within two standard errors of zero is 0 (a real one,
    over a wide span, is kept: test_switchover_is_a_line_over_the_final_set)."""
    rng = np.random.default_rng(11)
    # switchover = a few ms of noise, +/- 1.5 ms, that happens to grow with 13-47-page final sets
    runs = []
    for pages in (16384, 32768):
        for final in (13, 20, 26, 40, 44, 47):
            runs.append(_run(pages=pages, final_pages=final, probe_s=0.2,
                             switch=0.001 + 0.12e-6 * pages + 40e-6 * (final - 30) * (pages == 32768) + rng.uniform(-0.0015, 0.0015)))
    cal = _calibration(runs)
    pre = [r for r in runs if r["mode"] == "precopy"]
    naive = float(np.polyfit([r["final_pages"] for r in pre], [r["switchover_s"] for r in pre], 1)[0])
    assert naive > 10e-6                                           # the noise a plain line turns into a slope
    pt = cal.point_params(32768, 50e6)
    assert pt["switchover_per_page_s"] == 0.0
    assert pt["switchover_s"] == pytest.approx(float(np.mean([r["switchover_s"] for r in pre])), abs=0.0008)
    hot = uniform_trace(npages=32768, rate_pps=30000, seconds=4)   # never converges: a big final set
    r, _ = predict(hot, None, 50e6, calibration=cal)
    assert r.rounds[-1].pages_sent > 5000
    assert r.timings_ms["switchover_overhead"] == pytest.approx(pt["switchover_s"] * 1e3, rel=1e-3)  # no per-page part


def test_short_runs_identify_the_switchover_slope_and_are_not_drawn():
    """Issue 18: busy guests' downtimes at 200 MB/s were predicted 10-23 % short, the
    switchover's cost per final page left at 0 because the calibration guest's final sets
    (Xen's policy: 8-44 pages) could not identify it -- measured, it is ~2-4 us a page up
    to about a record (1,024 pages) and level beyond.  The calibration's "short" runs (stop
    after round 0: hundreds to thousands of pages) identify it; the draws still bootstrap the
    Xen-policy runs only, and the slope counts at most SWITCH_BACKLOG_PAGES of a final set."""
    from vmem.analysis.calibration import SWITCH_BACKLOG_PAGES

    rng = np.random.default_rng(7)

    def switch(final):
        return 0.0012 + 2.5e-6 * min(final, SWITCH_BACKLOG_PAGES) + rng.uniform(-0.0004, 0.0004)

    xen = [_run(final_pages=int(f), switch=switch(f), probe_s=0.2) for f in rng.integers(8, 45, 12)]
    # as the Xen runs, the noise alone turns into no slope
    assert _calibration(xen).point_params(16384, 50e6)["switchover_per_page_s"] == 0.0
    short = [_run(final_pages=int(f), switch=switch(f), probe_s=0.2, pause_s=0.05, variant="short")
             for f in (500, 600, 1200, 1500, 3000, 3100)]
    cal = _calibration(xen + short)
    pt = cal.point_params(16384, 50e6)
    assert pt["switchover_per_page_s"] == pytest.approx(2.5e-6, rel=0.25)
    assert pt["switchover_s"] == pytest.approx(0.0012, abs=0.0003)
    # the short runs are never drawn (their pause_s is 50 ms)
    assert max(d["pause_s"] for d in cal.draw_params(16384, 50e6, 300, seed=3)) < 0.01
    assert "12 pre-copy + 6 short pre-copy" in cal.describe()
    # the simulator counts at most SWITCH_BACKLOG_PAGES of a big final set
    hot = uniform_trace(npages=32768, rate_pps=30000, seconds=4)   # never converges: a big final set
    r, _ = predict(hot, None, 50e6, calibration=cal)
    assert r.rounds[-1].pages_sent > 5000
    assert r.timings_ms["switchover_overhead"] == pytest.approx(
        (pt["switchover_s"] + pt["switchover_per_page_s"] * SWITCH_BACKLOG_PAGES) * 1e3, rel=1e-3)


@pytest.mark.parametrize("link_Bps", [50e6, 200e6])
def test_the_efficiency_of_an_exact_link_is_one(link_Bps):
    """Issue 18: the token bucket's burst was counted twice (in the measured efficiency,
    1.003-1.03, and again in the simulator's bucket), so transfer times came out short.  A
    report the simulator makes at efficiency 1 must read back as 1."""
    tr = uniform_trace(npages=32768, rate_pps=2000, seconds=6)
    d = simulate(tr, None, SimulationParams(bandwidth_Bps=link_Bps)).to_dict() | {"verified": True}
    assert d["outcome"] == "completed" and len(d["rounds"]) >= 3
    assert sample_from_report(d, link_Bps)["efficiency"] == pytest.approx(1.0, abs=0.002)


def test_copy_efficiency_follows_the_load_probe():
    """A busier host copies slower: the efficiency is the line over the runs' load probe, so
    a prediction under a heavier load than the calibration's gets a lower one (and never
    one outside what the runs saw, widened by 20 %)."""
    runs = [_run(eff=1.0 - 0.3 * (probe - 0.2) / 0.2, probe_s=probe) for probe in (0.2, 0.25, 0.3, 0.35, 0.4)]
    cal = _calibration(runs)
    quiet = cal.point_params(16384, 50e6, load_factor=0.7)["bandwidth_efficiency"]
    busy = cal.point_params(16384, 50e6, load_factor=1.3)["bandwidth_efficiency"]
    assert busy < quiet - 0.1
    assert cal.point_params(16384, 50e6, load_factor=5.0)["bandwidth_efficiency"] >= 0.8 * 0.7 - 1e-9
    # the same runs without probes: one efficiency whatever the load
    flat = _calibration([{k: v for k, v in r.items() if k != "probe_s"} for r in runs])
    assert (flat.point_params(16384, 50e6, load_factor=0.7)["bandwidth_efficiency"]
            == flat.point_params(16384, 50e6, load_factor=1.3)["bandwidth_efficiency"])


@pytest.mark.parametrize("link_Bps,rate_pps", [(50e6, 2000), (200e6, 2000), (50e6, 30000), (200e6, 30000)])
def test_the_calibration_reads_back_the_simulators_switchover_and_drain(link_Bps, rate_pps):
    """The switchover is the downtime less only the link's share of the final send (the token
    bucket replayed over the run's rounds and waits, as the simulator runs it): the rest of
    the send is CPU time -- 0.3-0.9 ms for 55-62 pages at 200 MB/s measured here, where the
    bucket had the credit -- which the simulator does not model, and taking the whole send
    off (calibration version 1) predicted busy guests' downtimes at 200 MB/s 0.4-0.7 ms short
    in every validation run.  A report the simulator makes must read back as the switchover
    and drain it was given, whether the bucket held the final set (a small one) or not: the
    bucket's replay must be the simulator's."""
    from vmem.analysis.model import last_record_pages, switch_backlog_pages

    tr = uniform_trace(npages=32768, rate_pps=rate_pps, seconds=6)
    p = SimulationParams(bandwidth_Bps=link_Bps, switchover_s=0.0013, switchover_per_page_s=2e-6, drain_s=0.0007,
                         drain_per_page_s=3e-6, pause_s=0.0003, collect_s=0.0002)
    d = simulate(tr, None, p).to_dict() | {"verified": True}
    assert d["outcome"] == "completed"
    s = sample_from_report(d, link_Bps)
    final, last = s["final_pages"], s["last_round_pages"]
    assert final == d["rounds"][-1]["pages_sent"] and last == d["rounds"][-2]["pages_sent"]
    assert s["switchover_s"] == pytest.approx(0.0013 + 2e-6 * switch_backlog_pages(final), abs=2e-6)
    assert s["drain_s"] == pytest.approx(0.0007 + 3e-6 * last_record_pages(last), abs=2e-6)
    # (a real send also takes CPU time beyond the bucket's: test_a_real_report_yields_the_quantities)


def test_the_drain_grows_with_the_last_records_pages():
    """The wait before the pause is the destination placing the last record it received
    (measured here: 0.35-1.0 ms after a last round of 72-76 pages, 0.8-1.3 ms after 2,319 --
    a last record of 271 -- 1.7-2.4 ms after 578-606, 2.4-2.6 ms after a round 0: the short
    runs, the idle guest); a guest whose last round is large paid the calibration guest's
    small one in predictions, its bucket refilled less before the final send, and its 50
    MB/s downtimes came out 1-2 ms long.  The draws use the busy guest's line (the slope
    from the short runs); the idle guest's own drains."""
    from vmem.analysis.model import last_record_pages

    assert [last_record_pages(n) for n in (0, 1, 75, 1024, 1025, 2319, 32768)] == [0, 1, 75, 1024, 1, 271, 1024]
    rng = np.random.default_rng(5)

    def drain(last):
        return 0.0006 + 2.5e-6 * last_record_pages(last) + rng.uniform(-0.0002, 0.0002)

    xen = [_run(final_pages=20, last_round_pages=int(n), drain_s=drain(n), probe_s=0.2) for n in rng.integers(40, 120, 12)]
    short = [_run(final_pages=1500, last_round_pages=16384, drain_s=drain(16384), probe_s=0.2, variant="short")
             for _ in range(4)]
    idle = [_run(final_pages=0, last_round_pages=16384, drain_s=0.0021 + rng.uniform(-0.0002, 0.0002), probe_s=0.2,
                 guest="idle") for _ in range(6)]
    cal = _calibration(xen + short + idle)
    busy = cal.point_params(16384, 50e6)
    assert busy["drain_per_page_s"] == pytest.approx(2.5e-6, rel=0.2)
    assert busy["drain_s"] == pytest.approx(0.0006, abs=0.0002)
    quiet = cal.point_params(16384, 50e6, dirty_pages_per_s=0.0)
    # an idle guest's last round is always its round 0: its own drains, as measured
    assert quiet["drain_per_page_s"] == 0.0 and quiet["drain_s"] == pytest.approx(0.0021, abs=0.0002)
    # without the short runs the few dozen pages identify no slope: the runs' drains as measured
    assert _calibration(xen).point_params(16384, 50e6)["drain_per_page_s"] == 0.0
    # hybrids draw their own runs' drains
    assert cal.point_params(16384, 50e6, mode="hybrid")["drain_per_page_s"] == 0.0
    # the simulator adds the slope times the last round's pages
    hot = uniform_trace(npages=16384, rate_pps=30000, seconds=4)
    r, _ = predict(hot, None, 50e6, calibration=cal)
    last = [x for x in r.rounds if x.kind == "precopy"][-1].pages_sent
    assert last > 1024 and last % 1024   # a last record shorter than the round
    assert r.timings_ms["drain_before_pause"] == pytest.approx(
        (busy["drain_s"] + busy["drain_per_page_s"] * (last % 1024)) * 1e3, rel=1e-3)


def test_a_slow_drain_does_not_tilt_the_drain_line():
    """The drain's runs sit in clusters of x (a few dozen pages, ~575, a full record), three or
    four runs each.  One slow drain among them -- the calibration of 2026-12-05 13:50 has 2.9
    ms at 573 pages beside 1.73, 1.73 -- tilted the least-squares line, and with it every
    busy guest's drain at a full record.  The line is Theil-Sen's: the same runs with and
    without the slow one give nearly the same line, where least squares moves by 0.15 ms at
    1,024 pages (one slow run among twelve; the 3.2 ms among that calibration's short runs
    moves it again)."""
    from vmem.analysis.model import last_record_pages

    def runs(slow: bool):
        pts = [(57, 0.36), (58, 0.36), (111, 0.35), (113, 0.35), (75, 0.62), (77, 0.33),
               (573, 1.73), (576, 1.73), (573, 2.9 if slow else 1.74), (1024, 1.89), (1024, 1.93), (1024, 2.02)]
        return [_run(final_pages=20, last_round_pages=x, drain_s=ms / 1e3, probe_s=0.2) for x, ms in pts]

    def at_full_record(rs, robust):
        a, b, _ = Calibration._line([r for r in rs], "drain_s", "last_round_pages", identified=True,
                                    x_of=last_record_pages, robust=robust)
        return a + b * 1024

    ls_shift = at_full_record(runs(True), False) - at_full_record(runs(False), False)
    ts_shift = at_full_record(runs(True), True) - at_full_record(runs(False), True)
    assert ls_shift > 0.1e-3                       # the fault: least squares follows the slow run
    assert abs(ts_shift) < 0.03e-3                 # Theil-Sen does not
    # and the draws use the robust line: the point prediction's drain at a full record
    p = _calibration(runs(True)).point_params(16384, 50e6)
    assert p["drain_s"] + p["drain_per_page_s"] * 1024 == pytest.approx(at_full_record(runs(False), True), abs=0.15e-3)


def test_draws_widen_a_handful_of_runs_to_a_prediction_interval():
    """Six runs per link and mode are a small sample: a bootstrap of them spreads its draws
    as far as the runs spread, while the next run also carries the error of where their
    middle is and the heavier tails of a spread estimated from six (Student's t).  Measured
    here, different calibrations put the busy guest's switchover intercept 1.03-2.12 ms
    apart, and the validated runs fell inside their cells' ranges 51-87 % of the time where
    an 80 % range should hold 80 %.  Each draw's distance from the runs' median is widened
    by predictive_widening(n) around that median."""
    from vmem.analysis.calibration import predictive_widening

    assert predictive_widening(1) == 1.0 and predictive_widening(6) == pytest.approx(1.363, abs=0.002)
    assert predictive_widening(3) > predictive_widening(6) > predictive_widening(12) > predictive_widening(100) > 1.0
    assert predictive_widening(1000) == pytest.approx(1.0, abs=0.005)
    pauses = [0.0010, 0.0012, 0.0013, 0.0015, 0.0016, 0.0020]
    cal = _calibration([_run(pause_s=v, probe_s=0.2) for v in pauses])
    draws = np.array([d["pause_s"] for d in cal.draw_params(16384, 50e6, 2000, seed=4)])
    mid = float(np.median(pauses))
    k = predictive_widening(6)
    assert sorted(set(np.round(draws, 12))) == pytest.approx(sorted(mid + k * (v - mid) for v in pauses))
    # the fault this catches: draws that stay within what the runs saw
    assert draws.min() < min(pauses) and draws.max() > max(pauses)
    # wider, not shifted: never below 0
    cal0 = _calibration([_run(pause_s=v, probe_s=0.2) for v in (0.0, 0.0001, 0.001, 0.001, 0.001, 0.001)])
    assert min(d["pause_s"] for d in cal0.draw_params(16384, 50e6, 200, seed=4)) == 0.0


def test_the_rate_before_a_moment_reads_its_window_and_wraps():
    """trace_dirty_rate_before: the intervals whose middle lies in the window before t, the
    trace looping as the simulator replays it; a window as long as the trace is all of it."""
    from vmem.analysis.calibration import trace_dirty_rate, trace_dirty_rate_before

    t = synthetic([list(range(100))] * 20 + [[]] * 20, npages=16384, interval_s=0.1)  # 1,000 pages/s, then none
    assert trace_dirty_rate_before(t, 2.0, 1.0) == pytest.approx(1000.0)
    assert trace_dirty_rate_before(t, 4.0, 1.0) == 0.0
    assert trace_dirty_rate_before(t, 0.5, 1.0) == pytest.approx(500.0)       # 0.5 s of the end, 0.5 s of the start
    assert trace_dirty_rate_before(t, 6.0, 1.0) == pytest.approx(1000.0)      # 6.0 is 2.0 on the second lap
    assert trace_dirty_rate_before(t, 3.0, 10.0) == pytest.approx(trace_dirty_rate(t)) == pytest.approx(500.0)


def test_draws_take_one_rate_per_draw():
    """A rate per draw: each draw's guest kind follows its own rate; one rate repeated draws
    what that rate draws; a list of the wrong length is refused."""
    cal = _two_guest_calibration()
    mixed = cal.draw_params(16384, 50e6, 200, seed=2, dirty_pages_per_s=[0.0, 5000.0] * 100)
    assert all(d["setup_s"] < 0.045 for d in mixed[0::2]) and all(d["setup_s"] > 0.045 for d in mixed[1::2])
    one = cal.draw_params(16384, 50e6, 50, seed=2, dirty_pages_per_s=1500.0)
    assert cal.draw_params(16384, 50e6, 50, seed=2, dirty_pages_per_s=[1500.0] * 50) == one
    with pytest.raises(ConfigError, match="one rate per draw"):
        cal.draw_params(16384, 50e6, 5, dirty_pages_per_s=[0.0, 1.0])


def test_a_phased_guest_pays_at_its_pause_what_it_does_then():
    """Phase-aware costs: a guest busy for 2 s then silent for 2 s writes 2,000 pages/s over
    its trace (2/3 of the busy guest's rate), but a start whose pause falls in the silent half
    pays the idle guest's switchover (1.0 ms) and one whose pause falls in the busy half the
    busy guest's (1.3 ms, plus its final set if any) -- as the forecast's starts and predict say."""
    cal = _two_guest_calibration()
    t = synthetic([list(range(i * 80 % 8000, i * 80 % 8000 + 80)) for i in range(100)] + [[]] * 100,
                  npages=16384, interval_s=0.02)
    fc = forecast(t, None, 50e6, starts=40, calibration=cal)
    quiet = [r for r in fc["starts"] if r["pause_dirty_pages_per_s"] == 0.0]
    busy = [r for r in fc["starts"] if r["pause_dirty_pages_per_s"] >= 3000.0]
    assert quiet and busy and fc["busy_weight"] == pytest.approx(2 / 3, abs=0.01)
    for r in quiet:
        # the whole second before the pause silent: the pause 3-4 s into each 4 s lap
        assert r["busy_weight"] == 0.0 and 3.0 - 0.03 <= r["pause_trace_s"] % 4.0 and r["downtime_ms"] < 1.2
    for r in busy:
        # >= 3/4 of that second busy: the pause no later than 2.25 s into its lap
        assert r["busy_weight"] == 1.0 and r["pause_trace_s"] % 4.0 <= 2.25 + 0.03 and r["downtime_ms"] >= 1.3 - 1e-9
    # the point prediction likewise: from a start whose pause is silent, the idle guest's costs
    start = quiet[0]["start_s"]
    report, _ = predict(t, None, 50e6, calibration=cal, start_s=start)
    pred = report.guest["prediction"]
    assert pred["pause_dirty_pages_per_s"] == 0.0 and pred["calibration_busy_weight"] == 0.0
    assert report.timings_ms["switchover_overhead"] == pytest.approx(1.0, abs=0.01)


def test_switch_backlog_counts_a_contiguous_backlog_at_its_placement_cost():
    """The destination places a record with one pwrite per run of consecutive pages: with a
    run share, a contiguous backlog counts less than a scattered one of as many pages; the
    backlog is the final set's last SWITCH_BACKLOG_PAGES pages (the sender sends it sorted)."""
    from vmem.analysis.calibration import SWITCH_BACKLOG_PAGES
    from vmem.analysis.model import switch_backlog_pages

    scattered = np.arange(0, 2 * 3000, 2)
    contiguous = np.arange(100, 3100)
    two_runs = np.concatenate([np.arange(0, 2000), np.arange(5000, 5500)])
    assert switch_backlog_pages(3000) == SWITCH_BACKLOG_PAGES
    assert switch_backlog_pages(3000, scattered, 0.4) == SWITCH_BACKLOG_PAGES
    assert switch_backlog_pages(3000, contiguous, 0.0) == SWITCH_BACKLOG_PAGES          # no share: as before
    assert switch_backlog_pages(3000, contiguous, 0.4) == pytest.approx(1024 - 0.4 * 1023)
    assert switch_backlog_pages(2500, two_runs, 0.4) == pytest.approx(1024 - 0.4 * 1022)  # its last 1,024: 2 runs
    assert switch_backlog_pages(1, np.array([7]), 0.4) == 1.0
    assert switch_backlog_pages(0, np.array([], dtype=np.int64), 0.4) == 0.0


def test_a_sweeps_contiguous_final_set_pays_its_placement_cost():
    """Issue 18, validation of 2026-12-05 16:47: a sweep guest at 50 MB/s (its final set is
    one contiguous run of ~32,767 pages) had its downtime predicted 0.6-1.1 ms long, outside
    a range 1.3 ms wide in 4 of 5 runs of one cell: the switchover's slope is per page of the
    calibration guest's scattered final sets (measured 2.2-3.6 ms of switchover at a full
    backlog), and a contiguous backlog is placed with one pwrite (1.9-2.9 ms).  With the
    calibration's placement probe, the sweep's per-page part shrinks by its run share; a
    scattered guest's does not move."""
    rng = np.random.default_rng(7)

    def switch(final):
        return 0.0012 + 2.5e-6 * min(final, 1024) + rng.uniform(-0.0002, 0.0002)

    runs = ([_run(final_pages=int(f), switch=switch(f), probe_s=0.2) for f in rng.integers(8, 45, 12)]
            + [_run(final_pages=int(f), switch=switch(f), probe_s=0.2, variant="short") for f in (500, 1200, 1500, 3000)])
    plain, probed = _calibration(runs), _calibration(runs)
    probed.data["placement"] = {"pages": 1024, "contiguous_ms": 0.5, "scattered_ms": 1.0, "run_share": 0.5}
    assert plain.run_share == 0.0 and probed.run_share == 0.5
    n, per_interval = 16384, 400                       # 20,000 pages/s in 20 ms intervals, sequential
    sweep = synthetic([np.arange(i * per_interval, (i + 1) * per_interval) % n for i in range(250)], n, 0.02)
    r0, _ = predict(sweep, None, 50e6, calibration=plain)
    r1, _ = predict(sweep, None, 50e6, calibration=probed)
    assert r0.rounds[-1].pages_sent == r1.rounds[-1].pages_sent > 2000
    a, b = plain.point_params(n, 50e6)["switchover_s"], plain.point_params(n, 50e6)["switchover_per_page_s"]
    assert b > 1e-6
    assert r0.timings_ms["switchover_overhead"] == pytest.approx((a + b * 1024) * 1e3, rel=1e-3)
    # one or two runs (the sweep wraps around) in the last 1,024 pages: about half the per-page part
    assert r1.timings_ms["switchover_overhead"] == pytest.approx((a + b * 512) * 1e3, rel=0.01)
    assert r1.downtime_ms < r0.downtime_ms - 0.5 * b * 1024 * 1e3 * 0.9
    # a scattered guest (a sparse final set: few of its pages are neighbours): next to nothing changes
    hot = uniform_trace(npages=n * 8, rate_pps=8000, seconds=4)
    s0, _ = predict(hot, None, 50e6, calibration=plain)
    s1, _ = predict(hot, None, 50e6, calibration=probed)
    assert s0.rounds[-1].pages_sent > 2000
    sweep_cut = r0.timings_ms["switchover_overhead"] - r1.timings_ms["switchover_overhead"]
    assert 0 <= s0.timings_ms["switchover_overhead"] - s1.timings_ms["switchover_overhead"] < 0.1 * sweep_cut


def test_a_run_share_outside_zero_to_one_is_refused():
    with pytest.raises(ConfigError, match="switchover_run_share"):
        SimulationParams(bandwidth_Bps=50e6, switchover_run_share=1.5).validate()
    bad = _calibration([_run()])
    bad.data["placement"] = {"run_share": float("nan")}
    assert bad.run_share == 0.0


def _with_config(cal: Calibration, **config) -> Calibration:
    cal.data["config"] = {"sizes_bytes": [64 << 20], "links_Bps": [50e6], "workload": "hotcold", "params": {"rate": 2000},
                          "seed": 97, "tracker": "auto", "modes": ["precopy"]} | config
    cal.data["provenance"] = {"hostname": "test", "date_utc": f"day {id(cal) % 1000}"}
    return cal


def test_pooled_calibrations_draw_from_every_pooled_run():
    """One calibration's twelve runs per group do not show the host's spread over time (a
    single calibration's range held 77-82 % of other calibrations' runs where 90 % was
    meant): `vmem calibrate --append` pools calibrations, and the draws bootstrap all of
    their runs, each tagged with its calibration."""
    from vmem.analysis.calibration import pool_calibrations

    fast = _with_config(_calibration([_run(switch=0.001, probe_s=0.2) for _ in range(4)]))
    slow = _with_config(_calibration([_run(switch=0.005, probe_s=0.2) for _ in range(4)]))
    fast.data["placement"] = {"run_share": 0.3}
    slow.data["placement"] = {"run_share": 0.4}
    pooled = pool_calibrations(slow, fast)
    assert len(pooled.runs) == 8
    assert sorted({r["calibration"] for r in pooled.runs}) == [0, 1]
    assert [e["seq"] for e in pooled.data["pooled"]] == [0, 1] and pooled.data["pooled"][1]["runs"] == 4
    assert pooled.run_share == 0.4                           # the newest calibration's probe
    assert "2 calibrations pooled" in pooled.describe()
    switches = {round(d["switchover_s"], 4) for d in pooled.draw_params(16384, 50e6, 200, seed=1)}
    assert min(switches) < 0.002 and max(switches) > 0.004     # drawn from both
    assert {round(d["switchover_s"], 4) for d in fast.draw_params(16384, 50e6, 200, seed=1)} == {0.001}


def test_a_pool_keeps_the_newest_calibrations():
    from vmem.analysis.calibration import pool_calibrations

    pool = _with_config(_calibration([_run(switch=0.001)]))
    for i in range(6):
        pool = pool_calibrations(_with_config(_calibration([_run(switch=0.001 * (i + 2)), _run(switch=0.001 * (i + 2))])),
                                 pool, max_calibrations=3)
    assert [e["seq"] for e in pool.data["pooled"]] == [4, 5, 6]
    assert len(pool.runs) == 6 and {r["calibration"] for r in pool.runs} == {4, 5, 6}
    with pytest.raises(ConfigError, match="max_calibrations"):
        pool_calibrations(pool, pool, max_calibrations=0)


def test_calibrations_of_another_grid_are_not_pooled(tmp_path, monkeypatch):
    """A calibration measured at other link rates (or sizes, guests, tracker, modes) is refused
    by --append -- and before the new one is measured, from the command line alone."""
    from vmem.analysis.calibration import pool_calibrations
    import vmem.cli.calibrate as cli

    old = _with_config(_calibration([_run()]), links_Bps=[50e6, 200e6])
    with pytest.raises(ConfigError, match="cannot be pooled"):
        pool_calibrations(_with_config(_calibration([_run()]), links_Bps=[100e6]), old)
    path = old.save(str(tmp_path / "cal.json"))
    calls = []

    def fake_run_calibration(sizes, links, repeats, **kw):
        calls.append(links)
        return _with_config(_calibration([_run(link=links[0], switch=0.002)]), sizes_bytes=sizes, links_Bps=links,
                            modes=["precopy", "postcopy", "hybrid"])

    monkeypatch.setattr(cli, "run_calibration", fake_run_calibration)
    parser = argparse.ArgumentParser()
    add_calibrate_arguments(parser)
    with pytest.raises(ConfigError, match="cannot be pooled"):
        cmd_calibrate(parser.parse_args(["--out", path, "--append", "--links", "100M"]))
    assert calls == []                                        # refused before measuring
    # the same grid pools: the file then holds both calibrations' runs
    assert cmd_calibrate(parser.parse_args(["--out", path, "--links", "50M,200M", "--sizes", "64M"])) == 0  # a fresh one
    assert cmd_calibrate(parser.parse_args(["--out", path, "--append", "--links", "50M,200M", "--sizes", "64M"])) == 0
    back = load_calibration(path, required=True)
    assert len(back.runs) == 2 and [e["seq"] for e in back.data["pooled"]] == [0, 1]


def test_a_bad_calibration_tag_is_refused(tmp_path):
    cal = _calibration([_run(), dict(_run(), calibration=-1)])
    path = cal.save(str(tmp_path / "cal.json"))
    with pytest.raises(ConfigError, match="bad 'calibration'"):
        load_calibration(path)
