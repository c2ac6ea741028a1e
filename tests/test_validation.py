"""The validation table (vmem.analysis.validation, scripts/validate_predictions.py): its summary
counts what it claims, and the script runs end to end on a tiny configuration."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vmem.analysis.validation import markdown_table, summarise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cell(workload, dt_range, dt_meas, mt_range, mt_meas):
    # the range is p5-p95 (lo-hi); the 80 % range p10-p90 sits a quarter of the way in
    f = lambda lo, med, hi: {"p5": lo, "p10": lo + (med - lo) / 4, "median": med, "p90": hi - (hi - med) / 4,  # noqa: E731
                             "p95": hi, "min": lo, "max": hi}
    return {"workload": workload, "params": {}, "policy": "xen", "link_Bps": 50e6, "failed": [], "runs": [{}],
            "forecast": {"downtime_ms": f(*dt_range), "migration_time_s": f(*mt_range)},
            "measured": {"downtime_ms": dt_meas, "migration_time_s": mt_meas}}


def test_summary_counts_inside_and_errors():
    cells = [_cell("a", (4, 5, 6), 5.5, (1.0, 2.0, 3.0), 2.5),     # both inside; errors -9.1 %, -20 %
             _cell("a", (4, 5, 6), 10.0, (1.0, 2.0, 3.0), 2.0),    # downtime outside (-50 %), time inside (0 %)
             _cell("b", (4, 5, 6), 4.0, (1.0, 2.0, 3.0), 4.0)]     # downtime on the edge: inside; time outside (-50 %)
    s = summarise(cells)
    assert s["inside"]["downtime_ms"] == {"inside": 2, "of": 3}
    assert s["inside"]["migration_time_s"] == {"inside": 2, "of": 3}
    assert s["both_inside"] == {"inside": 1, "of": 3}
    assert abs(s["median_abs_error_pct"]["downtime_ms"]["median"] - 25.0) < 1e-9       # |-9.1|, |-50|, |+25|
    assert abs(s["median_abs_error_pct"]["migration_time_s"]["median"] - 20.0) < 1e-9  # 20, 0, 50
    assert s["per_workload_error_pct"]["b"]["migration_time_s"] == 50.0
    text = markdown_table(cells, s)
    assert "| a | xen | 1 |" in text and "inside the range in 2 of 3" in text and "b 50.0 % / 25.0 %" in text


def test_summary_counts_single_runs_and_workloads():
    """The issue counts runs, per workload: a cell whose median is inside may hold runs that
    are not (and the other way round), and each is counted against the cell's range."""
    a = _cell("a", (4, 5, 6), 5.5, (1.0, 2.0, 3.0), 2.5)
    a["runs"] = [{"downtime_ms": 5.5, "migration_time_s": 2.5}, {"downtime_ms": 9.0, "migration_time_s": 2.0},
                 {"downtime_ms": 4.5, "migration_time_s": 3.5}]
    b = _cell("b", (4, 5, 6), 10.0, (1.0, 2.0, 3.0), 2.0)
    b["runs"] = [{"downtime_ms": 10.0, "migration_time_s": 2.0}, {"downtime_ms": 5.0, "migration_time_s": None}]
    s = summarise([a, b])
    assert s["inside"]["downtime_ms"] == {"inside": 1, "of": 2}                   # cell medians
    assert s["runs_inside"]["downtime_ms"] == {"inside": 3, "of": 5}              # 5.5, 4.5 of a; 5.0 of b
    assert s["runs_inside"]["migration_time_s"] == {"inside": 3, "of": 4}         # b's second run has none
    assert s["per_workload_inside"]["a"]["downtime_ms"] == {"cells": 1, "cells_of": 1, "runs": 2, "runs_of": 3,
                                                            "runs_p10_p90": 2, "goal_met": False}   # p10 4.25: 5.5, 4.5
    assert s["per_workload_inside"]["b"]["downtime_ms"] == {"cells": 0, "cells_of": 1, "runs": 1, "runs_of": 2,
                                                            "runs_p10_p90": 1, "goal_met": False}
    text = markdown_table([a, b], s)
    assert "downtime inside in 3 of 5" in text and "a 1 of 1 (2 of 3) / 1 of 1 (2 of 3)" in text
    assert "met for 0 of 2 workloads" in text


def test_the_range_is_p5_p95_and_the_goal_is_counted_per_workload():
    """A run between p5 and p10 is inside the forecast's (90 %) range but not the 80 % one;
    a workload meets the goal when >= 80 % of its runs are inside for both metrics."""
    a = _cell("a", (4, 5, 6), 5.0, (1.0, 2.0, 3.0), 2.0)       # p10 4.25 / 1.25, p90 5.75 / 2.75
    a["runs"] = [{"downtime_ms": 4.1, "migration_time_s": 1.1}] + [{"downtime_ms": 5.0, "migration_time_s": 2.0}] * 3
    b = _cell("b", (4, 5, 6), 5.0, (1.0, 2.0, 3.0), 2.0)
    b["runs"] = [{"downtime_ms": 3.9, "migration_time_s": 2.0}] + [{"downtime_ms": 5.0, "migration_time_s": 2.0}] * 3
    s = summarise([a, b])
    wa, wb = s["per_workload_inside"]["a"], s["per_workload_inside"]["b"]
    assert wa["downtime_ms"]["runs"] == 4 and wa["downtime_ms"]["runs_p10_p90"] == 3 and wa["downtime_ms"]["goal_met"]
    assert wa["migration_time_s"]["runs"] == 4 and wa["migration_time_s"]["runs_p10_p90"] == 3
    assert wb["downtime_ms"]["runs"] == 3 and wb["downtime_ms"]["goal_met"] is False      # 3 of 4 = 75 % < 80 %
    assert wb["migration_time_s"]["goal_met"]
    assert s["goal"] == {"workloads_met": 1, "workloads": 2, "inside_share": 0.8} and s["range"] == "90 % range (p5-p95)"
    text = markdown_table([a, b], s)
    assert "[4-6]" in text and "met for 1 of 2 workloads" in text and "a 3 of 4 / 3 of 4" in text


def test_a_table_of_p10_p90_ranges_is_judged_at_them():
    """summarise(pct=(10, 90)): a saved table whose forecasts hold p10-p90 only is counted and
    rendered at those percentiles (the default, p5-p95, finds no range in it)."""
    c = _cell("a", (4, 5, 6), 5.0, (1.0, 2.0, 3.0), 2.0)
    c["forecast"] = {m: {k: v for k, v in f.items() if k not in ("p5", "p95")} for m, f in c["forecast"].items()}
    c["runs"] = [{"downtime_ms": 5.0, "migration_time_s": 2.0}, {"downtime_ms": 4.1, "migration_time_s": 2.0}]
    s = summarise([c], pct=(10, 90))
    assert s["range_pct"] == [10, 90] and s["runs_inside"]["downtime_ms"] == {"inside": 1, "of": 2}  # p10 4.25
    assert "[p10-p90]" in markdown_table([c], s) and "80 % range (p10-p90)" in markdown_table([c], s)
    assert summarise([c])["inside"] == {}                                   # no p5-p95 in it: nothing judged


def test_a_phased_guests_runs_start_across_its_trace():
    """A guest whose profile is not steady is migrated at start times spread over its trace
    (what the forecast's range is over), seeded; a steady one after the fixed warm-up."""
    from test_simulate import synthetic, uniform_trace
    from vmem.analysis.validation import run_warmup, start_spread_s

    phased = synthetic([list(range(5000))] * 10 + [list(range(50))] * 10, npages=16384, interval_s=0.1)
    steady = uniform_trace(npages=16384, rate_pps=2000, seconds=2)
    assert start_spread_s(steady) == 0.0 and start_spread_s(phased) == pytest.approx(2.0)
    cell = {"workload": "phased", "policy": "xen", "link_Bps": 50e6, "start_spread_s": start_spread_s(phased)}
    warmups = [run_warmup(cell, rep, 1, 0.5) for rep in range(20)]
    assert all(0.5 <= w <= 2.5 for w in warmups) and len(set(warmups)) == 20
    assert max(warmups) - min(warmups) > 1.0                                 # they spread, not cluster
    assert warmups == [run_warmup(cell, rep, 1, 0.5) for rep in range(20)]   # seeded
    assert run_warmup(cell | {"start_spread_s": 0.0}, 3, 1, 0.5) == 0.5


def test_the_script_runs_on_a_tiny_configuration(tmp_path):
    """The CI run: a one-run-per-mode calibration (stored, then used), one workload, two
    policies, one link, one repeat -- every cell verified and compared."""
    cal, out, md = tmp_path / "cal.json", tmp_path / "v.json", tmp_path / "v.md"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "validate_predictions.py"), "--tiny",
                           "--calibration", str(cal), "--json", str(out), "--markdown", str(md)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert json.loads(cal.read_text())["format"] == "vmem-calibration"
    cells = data["cells"]
    assert [(c["workload"], c["policy"]) for c in cells] == [("uniform", "xen"), ("uniform", "hybrid")]
    for c in cells:
        assert len(c["runs"]) == 1 and not c["failed"], c["failed"]
        assert c["start_spread_s"] == 0.0 and c["warmups_s"] == [0.5]     # a steady guest: the fixed warm-up
        f = c["forecast"]["migration_time_s"]
        assert f["p10"] <= f["median"] <= f["p90"] and c["measured"]["migration_time_s"] > 0
    assert cells[1]["measured"]["pages_pending"] is not None and "pages_pending" in cells[1]["forecast"]
    assert data["summary"]["verified_cells"] == 2
    text = md.read_text()
    assert "**200 MB/s link**" in text and "| uniform | hybrid |" in text and "Command:" in text
    assert "calibration" in text and "load average" in text and "analytical model" in text
    assert cells[0]["model"]["pages_sent"] > 0 and "model_error_pct" in data["summary"]

    # --rescore: the saved run re-rendered with the analytical model's line recomputed from a
    # new profile; its measured medians and forecasts untouched.  Strip the model and the
    # summary first, so a rescore that recomputes nothing fails.
    stripped = data | {"cells": [{k: v for k, v in c.items() if k != "model"} for c in cells], "summary": {}}
    saved, again, again_md = tmp_path / "saved.json", tmp_path / "r.json", tmp_path / "r.md"

    def rescore(payload: dict) -> dict:
        saved.write_text(json.dumps(payload))
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "validate_predictions.py"), "--rescore",
                               str(saved), "--size", "16M", "--profile-s", "1", "--json", str(again), "--markdown",
                               str(again_md)], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(again.read_text())

    re = rescore(stripped)
    assert [c["measured"] for c in re["cells"]] == [c["measured"] for c in cells]
    assert [c["forecast"] for c in re["cells"]] == [c["forecast"] for c in cells]
    xen = [c for c in re["cells"] if c["policy"] == "xen"]
    assert xen and all(c["model"]["pages_sent"] > 0 and c["model"]["migration_time_s"] > 0 for c in xen)
    assert re["summary"]["verified_cells"] == 2 and "model_error_pct" in re["summary"]
    assert "--rescore" in again_md.read_text() and "analytical model" in again_md.read_text()
    assert all(len(c["forecast_starts"]) == 6 for c in cells) and re["summary"]["range_pct"] == [5, 95]

    # A run saved before the starts were kept (p10-p90 ranges only) is judged at p10-p90, and says so.
    old = stripped | {"cells": [{k: v for k, v in c.items() if k != "forecast_starts"}
                                | {"forecast": {m: {k: v for k, v in f.items() if k not in ("p5", "p95")}
                                                for m, f in c["forecast"].items()}} for c in stripped["cells"]]}
    re = rescore(old)
    assert re["summary"]["range_pct"] == [10, 90] and re["summary"]["inside"]["migration_time_s"]["of"] == 2
    assert "judged as such" in again_md.read_text() and "[p10-p90]" in again_md.read_text()


def test_the_script_refuses_to_pool_another_grid_before_measuring(tmp_path):
    """`--calibrate --append` onto a calibration of other link rates is refused at once (a
    calibration takes minutes), the file untouched; `--append` without `--calibrate` too."""
    from vmem.analysis.calibration import CALIBRATION_FORMAT, CALIBRATION_VERSION, Calibration, calibration_grid

    cal = tmp_path / "cal.json"
    Calibration({"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "provenance": {"hostname": "test"},
                 "config": calibration_grid([64 << 20], [50e6]),
                 "runs": [{"mode": "precopy", "guest_pages": 16384, "link_Bps": 50e6, "verified": True}]}).save(str(cal))
    before = cal.read_text()
    env = dict(os.environ, PYTHONPATH=ROOT)
    script = os.path.join(ROOT, "scripts", "validate_predictions.py")
    proc = subprocess.run([sys.executable, script, "--calibrate", "--append", "--calibration", str(cal),
                           "--calibration-sizes", "64M", "--links", "200M"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "cannot be pooled" in proc.stderr, proc.stderr[-2000:]
    assert "calibration run" not in proc.stderr and cal.read_text() == before
    proc = subprocess.run([sys.executable, script, "--append", "--calibration", str(cal)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "needs --calibrate" in proc.stderr
