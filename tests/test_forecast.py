"""Forecasts over start offsets (vmem.analysis.forecast): a phased guest's prediction is a
range, a steady guest's a point; the CLI prints it beside a measured run."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from test_simulate import synthetic, uniform_trace
from vmem.analysis.forecast import forecast, inside, metrics_of
from vmem.analysis.simulate import simulate
from vmem.cli.predict import add_predict_arguments, cmd_predict
from vmem.errors import ConfigError
from vmem.migration.policy import IterationsThresholdPolicy

NPAGES = 65536


def phased_trace(seconds=8.0, interval_s=0.1, quiet_pps=500, burst_pps=60000, seed=1):
    """Quiet for the first half of each 4 s cycle, a write burst in the second half."""
    rng = np.random.default_rng(seed)
    intervals = []
    for i in range(round(seconds / interval_s)):
        rate = quiet_pps if (i * interval_s) % 4.0 < 2.0 else burst_pps
        intervals.append(rng.integers(0, NPAGES, round(rate * interval_s)))
    return synthetic(intervals, NPAGES, interval_s)


def test_a_steady_guest_forecasts_a_narrow_range():
    fc = forecast(uniform_trace(npages=NPAGES, rate_pps=5000, seconds=4), None, 50e6, starts=8)
    m = fc["metrics"]
    assert not fc["start_sensitive"] and "steady" in fc["advice"]
    assert m["downtime_ms"]["p90"] <= 1.2 * m["downtime_ms"]["p10"]
    assert m["precopy_rounds"]["min"] == m["precopy_rounds"]["max"]
    assert len(fc["starts"]) == 8 and [r["start_s"] for r in fc["starts"]][:2] == [0.0, 0.5]


def test_a_phased_guest_forecasts_a_range_and_the_start_that_suits_it():
    """Where the pause falls relative to the burst decides the downtime: the forecast says
    so, and its best start is one whose migration ends before the burst."""
    t = phased_trace()
    policy = IterationsThresholdPolicy(3, 50)
    fc = forecast(t, policy, 100e6, starts=16)
    dt = fc["metrics"]["downtime_ms"]
    assert fc["start_sensitive"] and "start time matters" in fc["advice"], fc["metrics"]
    assert dt["p90"] >= 1.5 * dt["p10"]
    # Each start's downtime is the point prediction from that start: the forecast is made of them.
    one = simulate(t, policy, bandwidth_Bps=100e6, start_s=fc["best_start_s"])
    assert one.downtime_ms == pytest.approx(dt["min"])


def test_bad_forecast_requests_are_refused():
    t = uniform_trace(npages=NPAGES, rate_pps=100, seconds=1)
    for kw, flag in (({"starts": 0}, "--starts"), ({"starts": 4, "start_s": 1.0}, "--start"), ({"starts": 2, "bw": None}, "--bandwidth")):
        bw = kw.pop("bw", 50e6)
        with pytest.raises(ConfigError) as exc:
            forecast(t, None, bw, **kw)
        assert exc.value.parameter == flag


def test_inside_the_range():
    """The range is p5-p95 (90 %); p10-p90 on request; a metric without the range's keys has none."""
    m = {"p5": 1.5, "p10": 2.0, "p90": 4.0, "p95": 4.2}
    assert inside(m, 3.0) and inside(m, 1.5) and inside(m, 4.2) and not inside(m, 4.5) and inside(m, 4.5, tolerance=0.2)
    assert not inside(m, 1.4) and inside(m, 1.8) and not inside(m, 1.8, pct=(10, 90))
    assert inside(m, None) is None and inside({}, 3.0) is None and inside({"p10": 2.0, "p90": 4.0}, 3.0) is None


def test_the_range_holds_nine_starts_in_ten():
    """metrics_of's range is the 5th-95th percentile of the starts: on 100 starts 1..100 it
    leaves out the five lowest and the five highest, the 80 % range ten each."""
    runs = [{"outcome": "completed", "downtime_ms": float(v)} for v in np.random.default_rng(3).permutation(100) + 1]
    m = metrics_of(runs)["downtime_ms"]
    assert sum(inside(m, r["downtime_ms"]) for r in runs) == 90
    assert sum(inside(m, r["downtime_ms"], pct=(10, 90)) for r in runs) == 80
    assert m["median"] == 50.5 and m["min"] == 1 and m["max"] == 100


def test_few_starts_say_the_range_is_their_ends():
    fc = forecast(uniform_trace(npages=NPAGES, rate_pps=5000, seconds=4), None, 50e6, starts=8)
    assert "only 8 starts" in fc["advice"]
    fc = forecast(uniform_trace(npages=NPAGES, rate_pps=5000, seconds=4), None, 50e6, starts=40)
    assert "starts:" not in fc["advice"]


def test_cli_prints_the_forecast_beside_a_measured_run(tmp_path, capsys):
    t = phased_trace()
    tp = str(tmp_path / "t.npz")
    t.save(tp)
    measured = simulate(t, IterationsThresholdPolicy(3, 50), bandwidth_Bps=100e6, start_s=2.5).to_dict()
    rp = str(tmp_path / "m.json")
    json.dump(measured, open(rp, "w"))
    parser = argparse.ArgumentParser()
    add_predict_arguments(parser)
    assert cmd_predict(parser.parse_args(["--trace", tp, "--compare-report", rp, "--starts", "8"])) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "forecast over 8 start offsets" in out and "in p5-p95" in out and "90 % range" in out and "start time matters" in out
