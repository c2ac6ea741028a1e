"""The page map (vmem.migration.pagemap, vmem.analysis.pagemap): what is recorded, what is
drawn, and the step-through HTML checked in a real headless browser."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from vmem.analysis import pagemap as apm
from vmem.migration.pagemap import PagemapRecorder, page_bitmap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = {name: code for code, name in enumerate(apm.STATES)}


def test_page_bitmap_from_pages_and_from_runs_agree():
    pages = np.array([0, 1, 2, 7, 9], dtype=np.int64)
    runs = np.array([[0, 3], [7, 8], [9, 10]], dtype=np.int64)
    assert page_bitmap(pages, 10).tolist() == page_bitmap(runs, 10).tolist()
    assert page_bitmap(pages, 10).sum() == 5
    assert not page_bitmap(np.empty(0, np.int64), 10).any()


def _synthetic(tmp_path, postcopy: bool) -> dict:
    """10 pages: 8 and 9 never hold data.  Round 0 sends 0-7, the guest dirties 1 and 2;
    round 1 re-sends 1 and 2, dirties 2; then stop-and-copy of {2}, or post-copy of
    {2, 3, 4}: 4 pushed, the guest faults on 3, and 2 is served on demand untimed."""
    rec = PagemapRecorder(10, t0=0.0)
    rec.data_pages(np.array([[0, 8]]))
    rec.precopy_round(np.array([[0, 8]]), np.array([1, 2]), 0.0, 1.0)
    rec.precopy_round(np.array([1, 2]), np.array([2]), 1.0, 1.1)
    if postcopy:
        rec.postcopy_switch(np.array([2, 3, 4]), 1.2)
        rec.now_s = lambda: 1.3
        rec.pushed(np.array([4]))
        rec.faults({"page": [3, 99], "fault_us": [50_000, 1], "latency_us": [40, 1], "truncated": False})
        rec.now_s = lambda: 1.4
        rec.postcopy_end()
    else:
        rec.stop_and_copy(np.array([2]), 1.1, 1.15)
    path = rec.save(str(tmp_path / "pm.npz"))
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]
    return apm.build_frames(apm.load_pagemap(path))


def test_frames_say_what_each_page_did_round_by_round(tmp_path):
    pm = _synthetic(tmp_path, postcopy=False)
    f = pm["frames"]
    assert [x["label"] for x in f] == ["round 0", "round 1", "stop-and-copy"]
    assert f[0]["codes"].tolist() == [S["sent"], S["dirtied"], S["dirtied"]] + [S["sent"]] * 5 + [S["zero"]] * 2
    assert f[1]["codes"].tolist() == [S["clean"], S["re-sent"], S["dirtied"]] + [S["clean"]] * 5 + [S["zero"]] * 2
    assert f[2]["codes"].tolist() == [S["clean"]] * 2 + [S["stop-and-copy"]] + [S["clean"]] * 5 + [S["zero"]] * 2
    assert f[0]["counts"][S["dirtied"]] == 2 and sum(f[0]["counts"]) == 10


def test_postcopy_frames_go_fault_by_fault(tmp_path):
    pm = _synthetic(tmp_path, postcopy=True)
    f = pm["frames"]
    assert [x["phase"] for x in f][:3] == ["precopy", "precopy", "postcopy"]
    switch = f[2]
    assert switch["label"] == "switch"
    assert switch["codes"][2:5].tolist() == [S["pending"]] * 3
    # the fault on page 3 at +50 ms has a frame of its own; the out-of-range page 99 is dropped
    at_fault = next(x for x in f if x["label"] == "+50.0 ms")
    assert at_fault["codes"][2:5].tolist() == [S["pending"], S["faulted"], S["pending"]]
    pushed = next(x for x in f if x["t_s"] > 1.31)  # the push went out at +100 ms
    assert pushed["codes"][4] == S["pushed"]
    last = f[-1]
    assert last["codes"][2:5].tolist() == [S["faulted"], S["faulted"], S["pushed"]], "page 2 was served on demand"
    assert last["counts"][S["pending"]] == 0


def test_bins_keep_the_highest_state():
    codes = np.array([S["clean"], S["faulted"], S["zero"], S["zero"], S["sent"]], dtype=np.uint8)
    assert apm._bin(codes, 2).tolist() == [S["faulted"], S["zero"], S["sent"]]


def test_load_refuses_what_is_not_a_page_map(tmp_path):
    bad = tmp_path / "x.npz"
    np.savez(bad, version=np.int64(7), npages=np.int64(1))
    with pytest.raises(ValueError, match="not a version 1 page map"):
        apm.load_pagemap(bad)
    (tmp_path / "y.npz").write_text("nope")
    with pytest.raises(ValueError, match="not a page map"):
        apm.load_pagemap(tmp_path / "y.npz")


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def check_in_browser(html_path, tmp_path) -> dict:
    """Load ``html_path#selftest`` in headless Chromium; the page moves its slider through
    every frame (input events, as a user's drag) and publishes the result in the DOM.
    Returns {"selftest", "labels", "console": [lines], "jserror"}."""
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser: scripts/setup.sh installs Debian's chromium")
    profile = tmp_path / "chromium-profile"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--no-first-run",
                           "--virtual-time-budget=10000", "--dump-dom", f"file://{html_path}#selftest"],
                          capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    dom = proc.stdout
    attr = lambda name: (m.group(1) if (m := re.search(rf'data-{name}="([^"]*)"', dom)) else None)  # noqa: E731
    labels = attr("labels")
    return {"selftest": attr("selftest"), "jserror": attr("jserror"),
            "labels": json.loads(labels.replace("&quot;", '"')) if labels else None,
            "console": [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]}


def test_the_browser_check_catches_a_broken_page(tmp_path):
    """The check below must be able to fail: a page whose script throws is reported."""
    pm = _synthetic(tmp_path, postcopy=False)
    page = apm.write_pagemap_html(pm, tmp_path / "broken.html")
    text = open(page).read().replace('const cells=D.cells', 'const cells=D.cells.nope.boom', 1)
    open(page, "w").write(text)
    got = check_in_browser(page, tmp_path)
    assert got["selftest"] is None
    assert any("Uncaught" in ln for ln in got["console"]), got


def test_hybrid_64M_page_map_png_html_and_browser(tmp_path):
    """The issue's bar: a 64 MiB hybrid run draws its page map (PNG + HTML), and the HTML
    loads in a real headless browser, its slider reaches every round, no console output."""
    out = tmp_path / "pm"
    rep_path = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, "-m", "vmem", "migrate", "--workload", "hotcold", "--size", "64M",
                           "-W", "rate=20000", "--bandwidth", "200M", "--postcopy-after-precopy", "--quiet",
                           "--warmup", "0.2", "--observe", "0.2", "--pagemap", str(out), "--json", str(rep_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(rep_path.read_text())
    assert report["mode"] == "hybrid"
    for name in ("pagemap.png", "pagemap.html", "pagemap.npz", "postcopy.png"):
        assert (out / name).stat().st_size > 1000, name
    assert open(out / "pagemap.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    d = apm.load_pagemap(out / "pagemap.npz")
    precopy = [r for r in report["rounds"] if r["kind"] == "precopy"]
    assert len(d["round_sent"]) == len(precopy) == report["pagemap"]["rounds"]
    # what the map says each round sent is what the report says it sent
    assert [int(np.unpackbits(x).sum()) for x in d["round_sent"]] == [r["pages_sent"] for r in precopy]
    assert [int(np.unpackbits(x).sum()) for x in d["round_dirty"]] == [r["dirty_pages"] for r in precopy]
    assert len(d["fault_page"]) == report["postcopy"]["fault_latency_us"]["count"] == report["pagemap"]["faults"]
    assert int(np.unpackbits(d["pc_pending"]).sum()) == report["postcopy"]["pages_pending"]
    assert len(d["push_pages"]) == report["postcopy"]["source"]["pages_pushed_sent"]

    got = check_in_browser(str(out / "pagemap.html"), tmp_path)
    nframes = len(apm.build_frames(d)["frames"])
    assert got["selftest"] == f"ok {nframes}", got
    assert got["jserror"] is None and got["console"] == [], got
    for r in precopy:
        assert f"round {r['index']}" in got["labels"]
    assert "switch" in got["labels"]


def test_pagemap_refusals_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "vmem", "migrate", "--quiet", "--size", "8M",
                           "--pagemap", str(blocker / "sub")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "--pagemap" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "vmem", "migrate", "g1", "127.0.0.1:1", "--pagemap", str(tmp_path),
                           "--agent", str(tmp_path / "no.sock")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "--pagemap" in proc.stderr, proc.stderr


def test_a_small_guest_with_json_records_a_page_map_that_graph_draws(tmp_path):
    """Without --pagemap, a guest of at most 64 MiB migrated with --json records the map
    beside the report, and ``vmem graph`` draws it."""
    rep_path = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, "-m", "vmem", "migrate", "--workload", "hotcold", "--size", "8M",
                           "-W", "rate=2000", "--quiet", "--warmup", "0.1", "--observe", "0.1", "--json", str(rep_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(rep_path.read_text())
    assert report["pagemap"]["file"] == str(tmp_path / "run.pagemap.npz")
    assert report["pagemap"]["rounds"] == len([r for r in report["rounds"] if r["kind"] == "precopy"])
    # the run's directory moves: the map is found beside the report
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in ("run.json", "run.pagemap.npz"):
        os.rename(tmp_path / f, moved / f)
    rep_path = moved / "run.json"
    proc = subprocess.run([sys.executable, "-m", "vmem", "graph", str(rep_path), "--out", str(tmp_path / "g")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "g" / "xen-pagemap.png").exists() and (tmp_path / "g" / "xen-pagemap.html").exists()
    assert "xen-pagemap.html" in (tmp_path / "g" / "report.html").read_text()
