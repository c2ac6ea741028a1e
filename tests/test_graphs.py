"""Graphs, the HTML report and ``vmem compare``: real PNGs, real migrations, bad input."""
from __future__ import annotations

import argparse
import base64
import json
import re

import pytest

from vmem.analysis import compare
from vmem.cli import compare as compare_cli

from vmem.analysis import graphs
from vmem.cli import graph as graph_cli
from vmem.errors import ConfigError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_real_png(path) -> None:
    """A PNG file that is not blank: signature, size, more than one distinct pixel value."""
    import numpy as np
    from matplotlib.image import imread

    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
    assert len(data) > 5000, f"{path} is suspiciously small ({len(data)} bytes)"
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500, img.shape
    rgba = np.zeros(img.shape[:2] + (4,), dtype=np.uint8)
    rgba[..., : img.shape[2]] = np.round(img * 255) if img.dtype.kind == "f" else img
    colours = np.unique(rgba.reshape(-1, 4).view(np.uint32))
    assert len(colours) > 10, f"{path} is (nearly) blank: {len(colours)} distinct pixel values"


def assert_html_embeds(html_path, pngs) -> None:
    text = open(html_path, encoding="utf-8").read()
    assert text.startswith("<!DOCTYPE html>")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    blobs = {base64.b64decode(b) for b in embedded}
    for p in pngs:
        with open(p, "rb") as f:
            assert f.read() in blobs, f"{p} is not embedded in {html_path}"
    # Self-contained: no external scripts, styles or images.
    assert not re.search(r'(src|href)="(https?:)?//', text)
    assert "<table>" in text


def synthetic_report(*, rounds=8, throttle=True, outcome="completed", policy=None) -> dict:
    """A report dict shaped like MigrationReport.to_dict(), with a throttled tail."""
    out = []
    pages = 65536
    to_send = pages
    for i in range(rounds):
        thr = min(0.8, 0.2 * max(0, i - 3)) if throttle else 0.0
        dirty = int(6000 * 0.6 ** i + 400 * (1 - thr))
        dur = to_send * 4096 / 100e6
        last = i == rounds - 1
        decision = ("stop-and-copy" if outcome == "completed" else "abort") if last else "continue"
        reason = ("estimated downtime 9 ms <= 30 ms" if outcome == "completed" else "timeout 10 s") if last else (
            f"dirty rate above the link: throttle {thr:.0%}" if thr else "")
        out.append({"index": i, "kind": "precopy", "pages_sent": to_send, "bytes_sent": to_send * 4110,
                    "duration_s": dur, "dirty_pages": dirty, "dirty_rate_pps": dirty / max(dur, 1e-3),
                    "bandwidth_bps": 8e8, "collect_ms": 0.8, "est_downtime_ms": dirty * 4096 / 1e5,
                    "throttle": thr, "decision": decision, "reason": reason})
        to_send = dirty
    if outcome == "completed":
        out.append({"index": rounds, "kind": "stop-and-copy", "pages_sent": to_send + 12, "bytes_sent": (to_send + 12) * 4110,
                    "duration_s": 0.01, "dirty_pages": 0, "dirty_rate_pps": 0.0, "bandwidth_bps": 8e8, "collect_ms": 0.0,
                    "est_downtime_ms": None, "throttle": 0.0, "decision": "", "reason": ""})
    sent = sum(r["pages_sent"] for r in out)
    return {
        "schema_version": 1, "outcome": outcome, "reason": out[-1 if outcome != "completed" else -2]["reason"],
        "verified": outcome == "completed", "downtime_ms": 11.5 if outcome == "completed" else None,
        "total_time_s": sum(r["duration_s"] for r in out) + 0.2, "guest_pages": pages, "pages_sent": sent,
        "bytes_sent": sent * 4110, "rounds": out, "mode": "precopy", "tracker": "uffd-wp",
        "policy": policy or {"name": "downtime-limit", "max_downtime_ms": 30, "timeout_s": 10},
        "bandwidth_limit_bps": 8e8, "workload": {"workload": "uniform", "params": {"rate": 50000}, "seed": 1},
        "guest_size_bytes": pages * 4096,
    }


def test_graphs_from_a_synthetic_report(tmp_path):
    rep = synthetic_report()
    predicted = dict(synthetic_report(throttle=False), predicted=True)
    pngs = [
        graphs.plot_convergence(rep, tmp_path / "conv.png", predicted=predicted),
        graphs.plot_convergence(predicted, tmp_path / "pred-only.png"),
        graphs.plot_dirty_rate(rep, tmp_path / "rate.png"),
        graphs.plot_downtime(rep, tmp_path / "down.png"),
        graphs.plot_working_set([0.1, 0.5, 1, 2, 5], [800, 2100, 3000, 3600, 4200], tmp_path / "wws.png", guest_pages=65536),
        graphs.plot_dirty_trace([0.1 * i for i in range(1, 51)], [1000 + 30 * (i % 7) for i in range(50)], tmp_path / "trace.png"),
        graphs.plot_comparison([rep, synthetic_report(outcome="aborted", policy={"name": "budget"}),
                                dict(synthetic_report(policy={"name": "xen"}), outcome="failed", downtime_ms=None)],
                               tmp_path / "cmp.png"),
    ]
    for p in pngs:
        assert str(p).startswith(str(tmp_path))
        assert_real_png(p)
    assert graphs.downtime_limit_ms(rep) == 30
    assert graphs.downtime_limit_ms({"policy": {"name": "budget", "max_downtime_s": 0.05}}) == pytest.approx(50)
    assert graphs.downtime_limit_ms({"policy": {"name": "xen"}}) is None
    assert graphs.is_predicted(predicted) and not graphs.is_predicted(rep)
    assert graphs.is_predicted(dict(rep, tracker="simulated"))   # vmem predict's reports
    html = graphs.write_html(tmp_path / "r.html", "Synthetic <run>", [
        {"heading": "All", "text": "plain text & more", "table": graphs.comparison_table([rep]),
         "images": [(p, f"caption {i}") for i, p in enumerate(pngs)]},
        {"heading": "Rounds", "tables": [graphs.rounds_table(rep), graphs.summary_table(rep)]},
    ])
    assert_html_embeds(html, pngs)
    text = open(html, encoding="utf-8").read()
    assert "Synthetic &lt;run&gt;" in text and "plain text &amp; more" in text
    assert "downtime-limit" in text and "stop-and-copy" in text


def test_graph_cli_on_saved_reports(tmp_path):
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    pred = tmp_path / "pred.json"
    a.write_text(json.dumps(synthetic_report()))
    b.write_text(json.dumps(synthetic_report(outcome="aborted", policy={"name": "budget", "tolerable_downtime_ms": 5})))
    pred.write_text(json.dumps(dict(synthetic_report(throttle=False), predicted=True)))
    parser = argparse.ArgumentParser()
    graph_cli.add_graph_arguments(parser)
    out = tmp_path / "out"
    assert graph_cli.cmd_graph(parser.parse_args([str(a), str(b), str(pred), "--out", str(out)])) == 0
    pngs = sorted(out.glob("*.png"))
    names = {p.name for p in pngs}
    assert {"comparison.png", "downtime-limit-convergence.png", "budget-downtime.png"} <= names
    for p in pngs:
        assert_real_png(p)
    assert_html_embeds(out / "report.html", pngs)


def test_bad_input_gives_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no reports"):
        graphs.plot_comparison([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="rounds"):
        graphs.plot_convergence({"outcome": "completed"}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="equal length"):
        graphs.plot_working_set([1, 2], [3], tmp_path / "x.png")
    with pytest.raises(ConfigError, match="unknown policy 'nope'") as info:
        compare.build_policies("xen,nope")
    assert info.value.parameter == "--policies"
    with pytest.raises(ConfigError, match="no policy"):
        compare.build_policies("")
    with pytest.raises(ConfigError, match="not an option of any selected policy"):
        compare.build_policies(["xen", "threshold"], {"no_such_knob": "1"})
    with pytest.raises(ConfigError, match="integer"):
        compare.build_policies(["threshold"], {"precopy_iterations": "lots"})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        compare.parse_policy_options(["precopy_iterations"])
    with pytest.raises(ValueError, match="comparison is empty"):
        compare.write_comparison(compare.Comparison(), str(tmp_path / "empty"))
    # vmem compare rejects bad input before booting anything (and writes nothing).
    cparser = argparse.ArgumentParser()
    compare_cli.add_compare_arguments(cparser)
    for argv, msg in ((["--policies", "xen,bogus"], "unknown policy 'bogus'"),
                      (["--policy-option", "max_downtime_ms=abc"], "max_downtime_ms"),
                      (["--policies", "xen", "--bandwidth", "fast"], "invalid rate")):
        with pytest.raises(ConfigError, match=msg):
            compare_cli.cmd_compare(cparser.parse_args(argv + ["--size", "16M", "--out", str(tmp_path / "c")]))
    assert not (tmp_path / "c").exists()
    # vmem graph: a missing file, a non-JSON file, JSON that is no report.
    parser = argparse.ArgumentParser()
    graph_cli.add_graph_arguments(parser)
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    for name, msg in (("missing.json", "cannot read"), ("junk.json", "not valid JSON"), ("other.json", "not a migration report")):
        with pytest.raises(ConfigError, match=msg):
            graph_cli.cmd_graph(parser.parse_args([str(tmp_path / name), "--out", str(tmp_path / "o")]))
    assert list(tmp_path.glob("o/*.png")) == []


def test_policy_options_go_only_to_policies_that_take_them():
    runs, ignored = compare.build_policies(["xen", "threshold"], {"precopy_iterations": "2"})
    by_name = {n: (policy, applied) for n, policy, applied in runs}
    assert by_name["xen"][1] == {}
    assert by_name["threshold"][1] == {"precopy_iterations": 2}
    assert by_name["xen"][0].describe()["name"] == "xen"       # not turned into 'threshold'
    assert by_name["threshold"][0].describe()["precopy_iterations"] == 2
    assert ignored == {"precopy_iterations": ["xen"]}


@pytest.mark.slow
def test_graphs_from_a_real_migration(tmp_path, boot_guest):
    from vmem.migration.local import run_local_migration
    from vmem.migration.source import MigrationOptions
    from vmem.migration.policy import make_policy

    guest = boot_guest("hotcold", size=32 << 20, seed=3, rate=20000)
    report = run_local_migration(guest, MigrationOptions(policy=make_policy("xen"), bandwidth_Bps=50e6, observe_s=0.1))
    assert report.outcome == "completed", report.reason
    path = tmp_path / "real.json"
    report.write(str(path))
    parser = argparse.ArgumentParser()
    graph_cli.add_graph_arguments(parser)
    out = tmp_path / "out"
    assert graph_cli.cmd_graph(parser.parse_args([str(path), "--out", str(out)])) == 0
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {"xen-convergence.png", "xen-dirty-rate.png", "xen-downtime.png"}
    for p in pngs:
        assert_real_png(p)
    assert_html_embeds(out / "report.html", pngs)


@pytest.mark.slow
def test_compare_two_quick_policies(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    compare_cli.add_compare_arguments(parser)
    out = tmp_path / "cmp"
    js = tmp_path / "cmp.json"
    args = parser.parse_args(["--policies", "xen,threshold", "--policy-option", "precopy_iterations=2",
                              "--workload", "hotcold", "-W", "rate=20000", "--size", "32M", "--bandwidth", "50M",
                              "--seed", "2", "--warmup", "0.2", "--quiet", "--out", str(out), "--json", str(js)])
    assert compare_cli.cmd_compare(args) == 0
    captured = capsys.readouterr()
    assert "xen" in captured.out and "threshold" in captured.out and "completed" in captured.out
    assert "precopy_iterations=2 is ignored by xen" in captured.err
    doc = json.loads(js.read_text())
    assert doc == json.loads((out / "comparison.json").read_text())
    assert [r["policy"] for r in doc["results"]] == ["xen", "threshold"]
    for r in doc["results"]:
        assert r["outcome"] in ("completed", "aborted", "failed")
        assert r["report"]["workload"] == {"workload": "hotcold", "params": {"rate": 20000.0}, "seed": 2}
    thr = doc["results"][1]
    assert thr["report"]["policy"]["precopy_iterations"] == 2
    assert thr["rounds"] <= 3   # at most 2 precopy rounds + the stop-and-copy
    assert doc["ignored_options"] == {"precopy_iterations": ["xen"]}
    for name in ("xen", "threshold"):
        assert json.loads((out / "reports" / f"{name}.json").read_text())["policy"]["name"] == name
    pngs = sorted(out.glob("*.png"))
    assert {"comparison.png", "xen-convergence.png", "threshold-convergence.png"} <= {p.name for p in pngs}
    for p in pngs:
        assert_real_png(p)
    assert_html_embeds(out / "report.html", pngs)


@pytest.mark.slow
def test_compare_interrupted_reaps_guests_and_keeps_finished_runs(tmp_path, monkeypatch):
    import vmem.migration.local

    real = vmem.migration.local.run_local_migration
    calls = []

    def migrate_then_interrupt(guest, options=None, progress=None):
        calls.append(guest.pid)
        if len(calls) == 2:
            assert guest.alive()
            raise KeyboardInterrupt   # as if Ctrl-C arrived during the second migration
        return real(guest, options, progress)

    monkeypatch.setattr(vmem.migration.local, "run_local_migration", migrate_then_interrupt)
    parser = argparse.ArgumentParser()
    compare_cli.add_compare_arguments(parser)
    out = tmp_path / "cmp"
    args = parser.parse_args(["--policies", "xen,threshold", "--workload", "hotcold", "--size", "16M",
                              "--warmup", "0", "--observe", "0", "--quiet", "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        compare_cli.cmd_compare(args)
    # The no_leaks fixture checks that both guests and the destination were reaped.
    doc = json.loads((out / "comparison.json").read_text())
    assert doc["interrupted"] is True
    assert [r["policy"] for r in doc["results"]] == ["xen"]
    assert (out / "report.html").exists()
