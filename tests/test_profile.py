"""Dirty traces (vmem.analysis.trace) and working-set profiling (vmem.analysis.profile).

Synthetic traces are checked against brute-force Python sets; a real short profile of a
small guest is checked against what its workload must write.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import zipfile

import numpy as np
import pytest

from vmem.errors import ConfigError, VmemError
from vmem.analysis.profile import analyse, profile_guest, run_profile, wws_curve
from vmem.analysis.trace import MAX_TOTAL_PAGES, TRACE_FORMAT_VERSION, DirtyTrace, TraceError
from vmem.cli.profile import add_profile_arguments, cmd_profile


def random_trace(seed=0, n=40, npages=500, max_per=60, interval_s=0.1, hot=None):
    """A trace of random intervals (and, optionally, a hot set written in every interval)."""
    rng = np.random.default_rng(seed)
    intervals = []
    for _ in range(n):
        a = rng.integers(0, npages, rng.integers(0, max_per))
        if hot is not None:
            a = np.concatenate((a, hot))
        intervals.append(a)
    sets = [set(np.unique(a).tolist()) for a in intervals]
    return DirtyTrace.from_intervals(intervals, npages=npages, interval_s=interval_s,
                                     workload={"workload": "synthetic", "params": {}, "seed": seed}), sets


def union(sets, a, b):
    return sorted(set().union(*sets[a:b])) if b > a else []


# --- file format ---------------------------------------------------------------------------------

def test_round_trip(tmp_path):
    t, _ = random_trace(1)
    t.meta["tracker"] = "uffd-wp"
    path = str(tmp_path / "t.npz")
    t.save(path)
    u = DirtyTrace.load(path)
    assert u.npages == t.npages and u.page_size == t.page_size and u.interval_s == t.interval_s
    assert u.data_pages == t.data_pages and u.workload == t.workload and u.meta["tracker"] == "uffd-wp"
    np.testing.assert_array_equal(u.offsets, t.offsets)
    np.testing.assert_array_equal(u.pages, t.pages)
    np.testing.assert_array_equal(u.times_s, t.times_s)
    assert u.pages.dtype == np.int32
    assert os.listdir(tmp_path) == ["t.npz"]            # no temp file left behind


def _write_npz(path, **arrays):
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def _members(t, **override):
    meta = t.describe()
    meta.update(override.pop("meta", {}))
    d = {"meta": np.array(json.dumps(meta)), "offsets": t.offsets, "pages": t.pages, "times": t.times_s}
    d.update(override)
    return d


def test_bad_files(tmp_path):
    t, _ = random_trace(2)
    good = str(tmp_path / "good.npz")
    t.save(good)
    data = open(good, "rb").read()

    def expect(name, content=None, match="", **members):
        p = str(tmp_path / name)
        if content is not None:
            with open(p, "wb") as f:
                f.write(content)
        else:
            _write_npz(p, **_members(t, **members))
        with pytest.raises(TraceError, match=match) as ei:
            DirtyTrace.load(p)
        assert isinstance(ei.value, VmemError) and ei.value.path == p

    with pytest.raises(TraceError, match="no such file"):
        DirtyTrace.load(str(tmp_path / "absent.npz"))
    expect("trunc.npz", data[: len(data) // 2], "trace")
    expect("trunc2.npz", data[:-30], "trace")
    expect("garbage.npz", b"\x00" * 1000, "not a vmem dirty trace")
    expect("empty.npz", b"", "not a vmem dirty trace")
    expect("version.npz", match="unsupported trace version 2", meta={"version": TRACE_FORMAT_VERSION + 1})
    expect("format.npz", match="not a vmem dirty trace", meta={"format": "something-else"})
    expect("npages.npz", match="npages", meta={"npages": -1})
    expect("interval.npz", match="interval_s", meta={"interval_s": "fast"})
    expect("offsets.npz", match="offsets", offsets=t.offsets[::-1].copy())
    expect("range.npz", match=r"page indices", pages=(t.pages + 10_000).astype(np.int32))
    bad = t.pages.copy()
    i0 = int(np.argmax(np.diff(t.offsets) >= 2))
    a = int(t.offsets[i0])
    bad[a], bad[a + 1] = bad[a + 1], bad[a]
    expect("unsorted.npz", match="sorted", pages=bad)
    expect("times.npz", match="times", times=np.zeros(len(t.times_s)))
    expect("dtype.npz", match="dtype", pages=t.pages.astype(np.float64))
    p = str(tmp_path / "metajson.npz")
    _write_npz(p, **(_members(t) | {"meta": np.array("{not json")}))
    with pytest.raises(TraceError, match="JSON"):
        DirtyTrace.load(p)
    p = str(tmp_path / "extra.npz")
    _write_npz(p, **(_members(t) | {"evil": np.zeros(3)}))
    with pytest.raises(TraceError, match="unexpected members"):
        DirtyTrace.load(p)
    p = str(tmp_path / "missing.npz")
    m = _members(t)
    del m["times"]
    _write_npz(p, **m)
    with pytest.raises(TraceError, match="missing times.npy"):
        DirtyTrace.load(p)


def test_oversized_counts_rejected_before_reading(tmp_path):
    """A member whose header claims more entries than the bound is refused without allocating."""
    t, _ = random_trace(3)
    p = str(tmp_path / "huge.npz")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<i4", "fortran_order": False, "shape": (MAX_TOTAL_PAGES + 1,)})
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, arr in _members(t).items():
            if name == "pages":
                zf.writestr("pages.npy", header.getvalue() + b"\x00" * 64)
            else:
                b = io.BytesIO()
                np.save(b, arr)
                zf.writestr(f"{name}.npy", b.getvalue())
    with pytest.raises(TraceError, match="more than the limit"):
        DirtyTrace.load(p)


def test_constructor_validates():
    with pytest.raises(TraceError, match="sorted"):
        DirtyTrace(npages=10, page_size=4096, interval_s=0.1, offsets=np.array([0, 2]), pages=np.array([3, 1]),
                   times_s=np.array([0.0, 0.1]))
    with pytest.raises(TraceError, match="times"):
        DirtyTrace(npages=10, page_size=4096, interval_s=0.1, offsets=np.array([0, 1]), pages=np.array([3]),
                   times_s=np.array([0.0]))


# --- queries against brute force -------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wws_matches_brute_force(seed):
    t, sets = random_trace(seed, n=30)
    for k in (1, 2, 3, 5, 10, 30):
        got = t.wws(k * 0.1).tolist()
        want = [len(union(sets, j, j + k)) for j in range(30 - k + 1)]
        assert got == want, k
    assert t.wws(100.0).tolist() == [len(union(sets, 0, 30))]      # longer than the trace: one window
    assert t.count_per_interval().tolist() == [len(s) for s in sets]
    assert t.duration_s == pytest.approx(3.0)
    with pytest.raises(ValueError):
        t.wws(0)


@pytest.mark.parametrize("rule", ["poisson", "overlap"])
def test_dirty_in_aligned_windows_are_exact(rule):
    t, sets = random_trace(4, n=20)
    for a, b in [(0, 20), (3, 12), (5, 6), (0, 1), (19, 20), (7, 7)]:
        got = t.dirty_in(a * 0.1, b * 0.1, rule=rule).tolist()
        assert got == union(sets, a, b), (a, b)
    assert t.dirty_in(-5, 100, rule=rule).tolist() == union(sets, 0, 20)      # clipped to the trace
    assert t.dirty_in(5.0, 6.0).tolist() == []
    with pytest.raises(ValueError):
        t.dirty_in(1.0, 0.5)
    with pytest.raises(ValueError):
        t.dirty_in(0, 1, rule="nearest")


def test_dirty_in_fractional_windows():
    t, sets = random_trace(5, n=20, hot=np.arange(10))
    # overlap: every interval touched counts whole.
    assert t.dirty_in(0.25, 0.78, rule="overlap").tolist() == union(sets, 2, 8)
    assert t.dirty_in(0.31, 0.33, rule="overlap").tolist() == union(sets, 3, 4)
    # poisson: between the whole intervals inside and every interval touched; deterministic.
    for a, b in [(0.25, 0.78), (0.31, 0.33), (0.05, 0.95)]:
        got = set(t.dirty_in(a, b).tolist())
        inner = set(union(sets, math.ceil(a * 10 - 1e-9), math.floor(b * 10 + 1e-9)))
        outer = set(union(sets, math.floor(a * 10), math.ceil(b * 10)))
        assert inner <= got <= outer
        assert t.dirty_in(a, b, seed=3).tolist() == t.dirty_in(a, b, seed=3).tolist()
    # Windows that tile an interval find every page of it (each page's first write falls in one).
    cuts = [1.0, 1.013, 1.04, 1.05, 1.081, 1.1]
    tiles = set().union(*(set(t.dirty_in(x, y).tolist()) for x, y in zip(cuts, cuts[1:])))
    assert tiles == sets[10]
    # A page written in every one of the n = 20 intervals gets the highest rate the trace can
    # show, ln(2n) writes per interval, so a 20 ms window (0.2 interval) holds it with
    # probability 1 - exp(-0.2 ln 40) = 0.52; a page written in one interval only, ~0.2.
    hits = np.zeros(2)
    for i in range(200):
        w = t.dirty_in(0.1 + i * 0.009, 0.1 + i * 0.009 + 0.02)     # 20 ms windows
        inner = t.interval(1 + int((i * 0.009 + 0.01) // 0.1))
        others = np.setdiff1d(inner, np.arange(10))
        hits += [np.isin(np.arange(10), w).mean(), np.isin(others, w).mean() if len(others) else 0.2]
    assert hits[0] / 200 == pytest.approx(1 - math.exp(-0.2 * math.log(40)), abs=0.08)
    assert 0.1 < hits[1] / 200 < 0.35


def test_from_intervals_and_union():
    t = DirtyTrace.from_intervals([[5, 1, 5], [], [2]], npages=8, interval_s=0.5)
    assert t.offsets.tolist() == [0, 2, 2, 3] and t.pages.tolist() == [1, 5, 2]
    assert t.union().tolist() == [1, 2, 5] and t.occupancy().tolist() == [0, 1, 1, 0, 0, 1, 0, 0]
    assert t.interval(0).tolist() == [1, 5]


# --- analysis --------------------------------------------------------------------------------------

def hot_trace(n=50, npages=20_000, hot=1000, per_interval=3000, seed=0):
    rng = np.random.default_rng(seed)
    hot_set = rng.choice(npages, hot, replace=False)
    return DirtyTrace.from_intervals([hot_set[rng.integers(0, hot, per_interval)] for _ in range(n)],
                                     npages=npages, interval_s=0.1), hot_set


def test_analyse_numbers_and_recommendations():
    t, hot_set = hot_trace()
    a = analyse(t, [50e6, 1e9], downtime_goal_s=0.05)
    counts = t.count_per_interval()
    pi = a["per_interval"]
    assert pi["mean_pages"] == pytest.approx(counts.mean(), abs=0.01) and pi["max_pages"] == counts.max()
    assert pi["dirty_rate_pps"] == pytest.approx(counts.sum() / t.duration_s, rel=1e-3)
    wws = {row["window_s"]: row for row in a["wws"]}
    assert set(wws) == {0.1, 0.5, 1.0, 2.0, 5.0}                  # windows within the 5 s trace
    assert wws[2.0]["mean_pages"] == pytest.approx(t.wws(2.0).mean(), abs=0.1)
    assert a["steadiness"]["steady"] and a["steadiness"]["wws_levels_off"]
    assert a["steadiness"]["plateau_pages"] <= 1000
    for row, rec in zip(a["predictions"], a["recommendations"]):
        B = row["bandwidth_Bps"]
        assert {"xen", "threshold", "threshold (recommended)"} <= set(row["policies"])
        for name, p in row["policies"].items():
            if "skipped" not in p:
                assert p["outcome"] in ("completed", "aborted"), name
        pw = 4096 + 8 + 16 / 1024
        assert rec["goal_pages"] == int((0.05 - 0.003) * B / pw)
        assert rec["precopy_threshold_pages"] >= rec["goal_pages"]
        assert rec["precopy_threshold_pages"] >= rec["converged_dirty_pages"]
        assert rec["abort_threshold_pages"] >= rec["pause_threshold_pages"]
        assert "formulas" in rec and "Pw" in rec["formulas"]["goal_pages"]
    # 3000 writes an interval into 1000 pages: nearly the whole hot set is dirty even in a
    # short round, and at 50 MB/s sending ~1000 pages takes ~80 ms: more than the 50 ms goal.
    assert a["recommendations"][0]["converged_dirty_pages"] > 600
    assert not a["recommendations"][0]["goal_reachable"]
    assert a["recommendations"][1]["goal_reachable"]
    json.dumps(a)


def test_wws_curve_is_monotone():
    t, _ = hot_trace()
    w, p = wws_curve(t)
    assert w[0] == 0 and p[0] == 0 and (np.diff(p) >= 0).all() and (np.diff(w) > 0).all()


def test_cmd_profile_from_trace(tmp_path, capsys):
    t, _ = hot_trace()
    tp, jp = str(tmp_path / "t.npz"), str(tmp_path / "a.json")
    t.save(tp)
    parser = argparse.ArgumentParser()
    add_profile_arguments(parser)
    args = parser.parse_args(["--from-trace", tp, "--bandwidth", "400Mbit", "--json", jp, "--downtime-goal", "20"])
    assert cmd_profile(args) == 0
    out = capsys.readouterr().out
    assert "writable working set" in out and "--precopy-threshold" in out
    a = json.load(open(jp))
    assert a["predictions"][0]["bandwidth_Bps"] == 50e6
    with pytest.raises(ConfigError, match="--max-downtime"):
        cmd_profile(parser.parse_args(["--from-trace", tp, "--downtime-goal", "20", "--max-downtime", "10"]))
    with pytest.raises(ConfigError, match="--bandwidth"):
        cmd_profile(parser.parse_args(["--from-trace", tp, "--bandwidth", "fast"]))


def test_bad_profile_arguments_rejected_before_boot():
    with pytest.raises(ConfigError, match="--interval"):
        run_profile("idle", None, "8M", duration_s=1, interval_s=0)
    with pytest.raises(ConfigError, match="--duration"):
        run_profile("idle", None, "8M", duration_s=0.01, interval_s=0.1)
    with pytest.raises(ConfigError, match="workload"):
        run_profile("nonesuch", None, "8M", duration_s=1)
    with pytest.raises(ConfigError, match="--size"):
        run_profile("idle", None, "1.5K", duration_s=1)


# --- real guests -----------------------------------------------------------------------------------

def test_profile_real_hotcold_guest(boot_guest):
    """32 MiB hotcold at 5000 writes/s, 1 s in 100 ms intervals.

    Each interval must hold about the distinct pages the workload's write pattern implies:
    ``rate * interval`` writes, 90 % of them into the hot set (10 % of data pages), so
    ``E = H (1 - e^{-0.9 R dt / H}) + C (1 - e^{-0.1 R dt / C})`` plus the ledger pages the
    writes touch; never more than ``rate * interval`` data pages; and every page written
    in half of the intervals or more is a hot page or a ledger page (cold pages are
    written ~50 times an interval out of ~7,400).
    """
    from guests.memory import ledger_page_count
    from guests.workload import _layout_rng

    rate, size, seed = 5000, 32 << 20, 7
    g = boot_guest("hotcold", size, seed, rate=rate)
    # The guest's own write count after each collect: under load the guest gets less CPU
    # than an interval's wall time, so the expected pages follow the writes it made.
    written = []
    trace = profile_guest(g, 1.0, 0.1, on_interval=lambda i, t, pages: written.append(g.counters()["pages_written"]))
    assert g.alive()
    npages = size // 4096
    first = 1 + ledger_page_count(npages)
    data = npages - first
    H = round(0.1 * data)
    C = data - H
    assert trace.npages == npages and trace.data_pages == npages          # fill=true wrote every page
    assert trace.workload == {"workload": "hotcold", "params": {"rate": rate}, "seed": seed}
    assert 9 <= trace.n_intervals <= 11 and 0.95 <= trace.duration_s <= 1.3
    lengths = trace.interval_lengths_s()
    counts = trace.count_per_interval()
    ledger = first - 1

    def distinct(writes):
        return H * (1 - math.exp(-0.9 * writes / H)) + C * (1 - math.exp(-0.1 * writes / C))

    for n, dt in zip(counts.tolist(), lengths.tolist()):
        writes = rate * dt
        assert n <= writes * 1.3 + ledger + 64          # 64: one step's batch of pacing slack
        # The same 64-page pacing slack above: a guest descheduled under load catches up
        # its virtual time with a batch in the next interval.
        assert n <= 1.3 * distinct(writes) + ledger + 64, (n, distinct(writes), dt)
    # Lower bound from the writes the guest says it made (intervals 1.., whose counts start
    # at a known counter value).  The counter is read just after each collect, so a few
    # writes shift between neighbouring intervals; summed, that shift hardly matters.
    made = np.diff(np.asarray(written, dtype=np.int64))
    assert len(made) == len(counts) - 1 and made.sum() > 0
    expected = sum(distinct(int(w)) for w in made)
    assert 0.7 * expected <= counts[1:].sum(), (counts.tolist(), made.tolist())
    hot = set((_layout_rng(seed, 0x686F74).permutation(data)[:H] + first).tolist()) | set(range(first))
    frequent = np.flatnonzero(trace.occupancy() >= trace.n_intervals // 2)
    assert len(frequent) > 0 and set(frequent.tolist()) <= hot


def test_run_profile_boots_and_reaps(tmp_path):
    t = run_profile("idle", None, "8M", duration_s=0.3, interval_s=0.05, warmup_s=0.1)
    # a loaded machine stretches intervals (fewer of them); the loop still runs to the duration
    assert t.count_per_interval().sum() == 0 and t.n_intervals >= 1 and t.times_s[-1] >= 0.3 - 0.05 / 2
    assert t.data_pages == t.npages == 2048
    p = str(tmp_path / "idle.npz")
    t.save(p)
    assert DirtyTrace.load(p).meta["warmup_s"] == 0.1
