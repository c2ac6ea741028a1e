"""The benchmark scripts' goals: one GOAL line each, a missed or unmeasured goal fails --strict,
and scripts/bench_agent.py checks issue 13's agent goals end to end on two test hosts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from testhosts import netns_unavailable
from vmem.bench.goals import Goals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_missed_goal_fails_strict_and_says_missed():
    lines = []
    g = Goals(out=lines.append)
    assert g.check("here", "ratio", 0.9, ">=", 0.75)
    assert g.exit_status(strict=True) == 0
    assert not g.check("here", "latency", 700.0, "<=", 500.0, "us")      # the fault: over the goal
    assert g.exit_status(strict=False) == 0 and g.exit_status(strict=True) == 1
    assert lines[0] == "GOAL here: ratio = 0.9 (>= 0.75; ratio 1.2) ok"
    assert lines[1] == "GOAL here: latency = 700 us (<= 500; ratio 1.4) MISSED"
    assert [x["met"] for x in g.items] == [True, False] and g.missed == [g.items[1]]


@pytest.mark.parametrize("value", [None, float("nan"), True])
def test_an_unmeasured_figure_is_a_missed_goal(value):
    lines = []
    g = Goals(out=lines.append)
    assert not g.check("p", "x", value, "<=", 1.0)
    assert g.items[0]["ratio"] is None and "not measured" in lines[0] and lines[0].endswith("MISSED")
    assert g.exit_status(strict=True) == 1


def test_a_goal_needs_a_known_operator():
    with pytest.raises(ValueError, match="operator"):
        Goals(out=lambda s: None).check("p", "x", 1.0, "<", 2.0)


def test_the_median_interval_has_the_coverage_it_claims():
    """vmem.bench.goals.median_interval: order statistics with the binomial coverage --
    [min, max] below 5 samples (3: 75 %), narrower once more samples allow >= 90 %; and the
    coverage it states is what a simulation finds for a skewed distribution."""
    import numpy as np

    from vmem.bench.goals import median_interval

    assert median_interval([]) is None and median_interval([float("nan")]) is None
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0, 0.75)
    assert median_interval(range(5))[:2] == (0.0, 4.0)
    low, high, cover = median_interval(range(11))
    assert (low, high) == (2.0, 8.0) and 0.9 <= cover < 0.95
    rng = np.random.default_rng(7)
    true_median = np.log(2.0)  # of the exponential distribution with mean 1
    for n in (5, 9):
        hits = 0
        for _ in range(4000):
            lo, hi, claimed = median_interval(rng.exponential(1.0, n))
            hits += lo <= true_median <= hi
        assert abs(hits / 4000 - claimed) < 0.03, (n, hits / 4000, claimed)


def test_a_goal_whose_trials_span_it_is_unsettled_whatever_its_median_says():
    """The fault the trial count exists to catch: a median on the good side of the goal while
    the trials straddle it -- the verdict of one run is noise.  The line and the record say
    UNSETTLED, the summary lists it, and ok/MISSED and --strict stay the figure's own."""
    lines = []
    g = Goals(out=lines.append)
    assert g.check("t", "ratio", 1.18, ">=", 0.85, samples=[1.09, 3.25, 0.72, 0.73, 1.47])  # median 1.09, spread over 0.85
    assert g.items[0]["settled"] is False and g.items[0]["trials_met"] == 3 and g.items[0]["trials"] == 5
    assert "ok; met in 3 of 5 trials, UNSETTLED" in lines[0] and "0.72-3.25 spans 0.85" in lines[0]
    assert g.check("t", "p50", 40.0, "<=", 60.0, "us", samples=[30.0, 41.0, 52.0])
    assert g.items[1]["settled"] is True and "clears 60" in lines[1]
    assert not g.check("t", "p99", 700.0, "<=", 500.0, "us", samples=[650.0, 700.0, 900.0])
    assert g.items[2]["settled"] is True and "misses 500" in lines[2] and ") MISSED; met in 0 of 3" in lines[2]
    assert not g.check("t", "one", 70.0, "<=", 60.0, samples=[70.0])  # one trial: cannot tell
    assert g.items[3]["settled"] is None and "too few" in lines[3]
    assert not g.check("t", "none", None, "<=", 60.0, samples=[None, float("nan")])  # nothing measured
    assert g.items[4]["settled"] is None and g.items[4]["trials"] == 0 and lines[4].endswith("MISSED; no trial measured")
    assert g.unsettled == [g.items[0]]
    assert g.summary() == ("goals: 2 met, 3 missed of 5; 1 UNSETTLED by this run's noise (the verdict may flip in "
                           "the next run): t: ratio (met in 3 of 5)")
    assert g.exit_status(strict=True) == 1  # the two missed, not the unsettled one
    plain = Goals(out=lambda s: None)
    plain.check("t", "x", 1.0, ">=", 0.5)
    assert "settled" not in plain.items[0] and plain.summary() == "goals: 1 met, 0 missed of 1"


def _names_its_machine(prov: dict, log: str) -> None:
    """A benchmark's JSON carries the provenance of its run -- the boot among it: figures of
    two boots of one machine differ (docs/bench.md) -- and its log names the boot."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert prov["boot_id"] == f.read().strip()
    assert prov["git_commit"] and prov["booted_utc"]
    assert f"booted {prov['booted_utc']} (boot id {prov['boot_id'][:8]})" in log


@pytest.mark.serial  # the IPIs need the flat-out guest on the other CPU: nothing else running
def test_bench_migrate_measures_the_ipi_on_its_own():
    """bench_migrate's single-page IPI measurement draws IPIs from a running guest and none
    from a paused one.  Before the guest was given time to rewrite the pages it re-protected
    (REWRITE_WAIT_S) it drew ~0.01 per op, and its per-IPI figure was None."""
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("bench_migrate_ipi", os.path.join(ROOT, "scripts", "bench_migrate.py"))
    bm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bm)
    ipi = bm.Bench(types.SimpleNamespace(quick=True, no_prewarm=True))._ipi_cost_us(16 << 20)
    assert ipi["ops"] > 0 and ipi["paused_ipis_per_op"] < 0.1, ipi
    assert ipi["running_ipis_per_op"] > 0.3 and ipi["us_per_ipi"] is not None, ipi


def test_bench_migrate_checks_its_goals_with_their_trials(tmp_path):
    """A CI-sized run of scripts/bench_migrate.py (16 MiB guests; throughput, downtime,
    blackout and collect parts, 3 trials each): every goal of those parts is printed with
    its trials and in the JSON -- issue 13's idle downtime (<= 1 ms) and idle blackout
    (<= 2 ms) among them -- every migration verified (exit 0 without --strict means no
    failure), and --strict's exit status is exactly "a goal missed"."""
    out = tmp_path / "migrate.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_migrate.py"), "--quick", "--size", "16M",
                        "--only", "throughput,downtime,blackout,collect", "--trials", "3", "--downtime-runs", "3",
                        "--blackout-runs", "3", "--collects", "5", "--wait-quiet", "0", "--settle", "0", "--strict",
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode in (0, 1), p.stdout + p.stderr
    data = json.loads(out.read_text())
    assert data["failures"] == []
    _names_its_machine(data["meta"]["provenance"], p.stdout + p.stderr)
    # the machine is said once, in provenance: meta does not repeat it under other names
    assert not {"git", "kernel", "python", "cpus", "mem_total_bytes", "argv"} & set(data["meta"]), data["meta"]
    goals = {(g["part"], g["goal"]): g for g in data["goals"]}
    assert goals[("downtime", "idle guest: median downtime_ms")]["threshold"] == 1.0
    # the idle downtime's floor, measured in the same run: the walk plus three hand-offs
    floor = data["parts"]["downtime"]["floor"]
    assert floor["wake_chain"]["hops"] == 3 and 0 < floor["wake_chain"]["total_us_median"] < 1e6
    assert floor["floor_ms"] == pytest.approx(floor["final_walk_ms"]["median"] + floor["wake_chain"]["total_us_median"] / 1e3)
    assert "floor on this machine, same run" in p.stdout
    assert goals[("blackout", "idle: median blackout_ms")]["threshold"] == 2.0
    # the IPI's cost on its own (single-page write-protects of pages the guest rewrote first)
    ipi = data["parts"]["collect"]["ipi_cost"]
    # paused write-protects draw no IPI of their own; the count is system-wide
    # (/proc/interrupts), and the other test worker's processes may add a stray shootdown or
    # two to a pass of a few ops (a 16 MiB guest has 7): that is allowed, a pattern is not
    assert ipi["ops"] > 0
    assert (ipi["paused_ipis_per_op"] - ipi["running_ipis_per_op"]) * ipi["ops"] <= 2, ipi
    assert "ipi_estimate_ms" in data["parts"]["collect"]
    assert goals[("throughput", "vmem round 0 / plain pwrite copy (median bytes/s)")]["trials"] == 3
    assert {part for part, _ in goals} == {"throughput", "downtime", "blackout", "collect"}
    assert all(g["trials"] >= 3 and g["settled"] in (True, False) for g in goals.values()), goals
    assert p.returncode == (1 if any(not g["met"] for g in goals.values()) else 0)
    assert p.stdout.count("GOAL throughput:") + p.stdout.count("GOAL downtime:") + p.stdout.count(
        "GOAL blackout:") + p.stdout.count("GOAL collect:") == len(goals)
    assert "goals: " in p.stdout


@pytest.mark.skipif(bool(netns_unavailable()), reason=f"no test hosts: {netns_unavailable()}")
def test_bench_agent_killed_with_sigterm_removes_its_test_hosts():
    """SIGTERM (timeout(1), a cancelled job) while its test hosts are up: the run unwinds and
    leaves no network namespace and no key directory (it used to leave both)."""
    import glob
    import signal
    import time

    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "bench_agent.py"), "--size", "16M",
                          "--empty-size", "0", "--repeat", "1", "--security", "key", "--postcopy-runs", "0",
                          "--floor-runs", "1", "--baseline-runs", "1", "--no-shaped"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    prefix = f"vb{p.pid}-"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None:  # bounded: until its hosts exist
            listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            if prefix in listed:
                break
            time.sleep(0.05)
        assert prefix in listed, "the bench never brought its test hosts up"
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in left, left
    assert not glob.glob(f"/tmp/vmem-bench-agent-{p.pid}-*")
    assert p.returncode != 0  # interrupted, not a result


@pytest.mark.skipif(bool(netns_unavailable()), reason=f"no test hosts: {netns_unavailable()}")
def test_bench_agent_checks_the_agent_goals_of_both_arms(tmp_path):
    """A CI-sized run of scripts/bench_agent.py (16 MiB guest, one repeat, a keyed and an
    unkeyed pair, one post-copy migration each, and one between TLS agents): every goal of the issue is printed and in
    the JSON with a measured value, and --strict's exit status is exactly "a goal missed".
    (The values themselves are not asserted: at 16 MiB on a shared CI machine they are noise.)"""
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_agent.py"), "--size", "16M",
                        "--empty-size", "0", "--repeat", "1", "--security", "both", "--postcopy-runs", "1",
                        "--tls-postcopy-runs", "1", "--postcopy-rate", "2000", "--floor-samples", "200", "--floor-runs", "1", "--baseline-runs", "1", "--cpu-sweep", "1,2",
                        "--no-shaped", "--strict",
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode in (0, 1), p.stdout + p.stderr
    data = json.loads(out.read_text())
    _names_its_machine(data["provenance"], p.stdout)
    goals = {(g["where"], g["goal"]): g for g in data["goals"]}
    assert set(goals) == {
        ("key agents", "round 0, one connection / plain TCP copy into fresh memory (paired per repeat)"),
        ("key agents", "round 0, --parallel 2 / one connection"),
        ("none agents", "round 0, one connection / plain TCP copy into fresh memory (paired per repeat)"),
        ("none agents", "round 0, --parallel 2 / one connection"),
        ("keyed vs unkeyed agents", "round 0 throughput, keyed / unkeyed"),
        ("keyed agents", "post-copy fault round trip p50"),
        ("keyed agents", "post-copy fault round trip p99"),
    }
    assert all(isinstance(g["value"], (int, float)) and g["value"] > 0 for g in goals.values())
    assert p.returncode == (1 if any(not g["met"] for g in goals.values()) else 0)
    assert p.stdout.count("GOAL ") == len(goals)
    assert all(g["trials"] == 1 and g["settled"] is None for g in goals.values())  # one repeat: cannot tell
    # the post-copy runs took demand faults on the keyed link, and both arms ran every link setting
    assert data["arms"]["key"]["postcopy"]["runs"][0]["faults"] > 0
    assert data["tls_postcopy"]["runs"][0]["faults"] > 0  # and between TLS agents (sealed urgent connection)
    assert "post-copy (tls, " in p.stdout
    assert all(len(data["arms"][s]["unshaped_links"]) >= 3 for s in ("key", "none"))
    # the floor the fault goals are compared with: plain page round trips, idle and during a copy
    floor = data["fault_floor"]
    assert floor["idle"]["count"] == 200 and [r["count"] for r in floor["loaded"]["runs"]] == [200]
    assert [r["count"] for r in floor["placer"]["runs"]] == [200]  # and beside a stand-in for the placer
    assert "INFO keyed fault round trip p99" in p.stdout
    assert "during a plain copy and 1 MiB pwrites on host 2" in p.stdout
    # the floors of the round-0 goals: the plain copy over two connections and with a MAC
    for name in ("baseline", "baseline_fresh", "baseline_fresh_2conn", "baseline_fresh_digest", "baseline_fresh_keyed",
                 "baseline_fresh_keyed_2conn", "baseline_fresh_keyed_digest"):
        assert data[name]["Bps"] > 0 and len(data[name]["Bps_all"]) == 1, name
    # the round-0 goal's trial: that repeat's round 0 over the plain copy made in the same repeat
    assert len(data["baseline_fresh_paired"]["Bps_all"]) == 1
    for sec in ("key", "none"):
        (ratio,) = data["arms"][sec]["round0_over_paired_copy_all"]
        assert ratio == data["arms"][sec]["unshaped_links"][0]["round0_Bps"] / data["baseline_fresh_paired"]["Bps_all"][0]
        assert goals[(f"{sec} agents", "round 0, one connection / plain TCP copy into fresh memory (paired per repeat)")
                     ]["value"] == ratio
    for sec in ("key", "none"):
        floor = data["arms"][sec]["floor"]
        tag = "_keyed" if sec == "key" else ""
        assert floor["copy_Bps"] == data[f"baseline_fresh{tag}"]["Bps"]
        assert floor["round0_over_copy"] == data["arms"][sec]["unshaped_links"][0]["round0_Bps"] / floor["copy_Bps"]
        assert f"INFO {sec} agents: round 0 / a plain copy into fresh memory" in p.stdout
        # and what verification alone costs: the same copy digesting every page it placed
        assert floor["copy_digest_Bps"] == data[f"baseline_fresh{tag}_digest"]["Bps"]
        assert floor["round0_over_copy_digest"] == data["arms"][sec]["unshaped_links"][0]["round0_Bps"] / floor[
            "copy_digest_Bps"]
        assert f"INFO {sec} agents: round 0 / the same copy digesting every page it placed" in p.stdout
    # item 3's note on cores: the sweep ran under the affinity it says, agents included
    allowed = sorted(os.sched_getaffinity(0))
    for n in (1, 2)[:len(allowed)]:
        for sec in ("key", "none"):
            row = data["cpu_sweep"][str(n)][sec]
            assert row["cpus"] == row["agent_cpus"] == allowed[:n], row
            assert row["one_Bps"] > 0 and row["two_Bps"] > 0 and row["copy_two_Bps"] > 0
            assert row["parallel2_over_single"] == row["two_Bps"] / row["one_Bps"]
    # nothing left: the bench's test hosts are gone
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(line.split()[0].startswith("vb") for line in left.splitlines() if line.strip()), left


def test_bench_postcopy_checks_its_goals_on_verified_migrations(tmp_path):
    """A CI-sized run of scripts/bench_postcopy.py (16 MiB guests, one run of each scenario:
    post-copy and pre-copy at 5k and 50k pages/s, an idle guest, a guest writing flat out in
    pure and hybrid post-copy): every migration completed and verified, every goal is printed
    and in the JSON, and --strict's exit status is exactly "a goal missed".  (The values are
    not asserted: at 16 MiB some are not even measured -- a push may end before any fault.)"""
    out = tmp_path / "postcopy.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_postcopy.py"), "--size", "16M",
                        "--runs", "1", "--strict", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode in (0, 1), p.stdout + p.stderr
    data = json.loads(out.read_text())
    _names_its_machine(data["provenance"], p.stdout)
    assert len(data["runs"]) == 7
    assert all(r["outcome"] == "completed" and r["verified"] for r in data["runs"]), data["runs"]
    assert all(r["prewarm_s"] is not None for r in data["runs"])  # each migration pre-warmed
    goals = {(g["where"], g["goal"]): g for g in data["goals"]}
    assert set(goals) == {
        ("5000 pages/s", "fault p50 us"), ("5000 pages/s", "fault p99 us"),
        ("50000 pages/s", "fault p50 us"), ("50000 pages/s", "fault p99 us"),
        ("idle guest", "push GB/s, no fault pending"),
        ("flat out", "pure post-copy blackout ms"), ("flat out", "hybrid post-copy blackout ms"),
    }
    assert p.returncode == (1 if any(not g["met"] for g in goals.values()) else 0)
    assert p.stdout.count("GOAL ") == len(goals)
    assert all(g["trials"] <= 1 for g in goals.values()) and "goals: " in p.stdout  # --runs 1
    # the flat-out guest's downtime split is reported from real switches, and its blackout
    # beside the floor measured without vmem
    assert data["summary"]["flat_out"]["postcopy"]["pause_to_running_ms"] > 0
    floor = data["summary"]["step_gap_floor"]
    assert len(floor["runs"]) == 1 and floor["longest_gap_ms"] > 0
    assert "a single-threaded loop's longest gap" in p.stdout
    # where each flat-out blackout fell: the longest gap until the last page was placed is
    # there per trial, and the count of trials whose blackout came later is printed
    for mode in ("postcopy", "hybrid"):
        (run,) = [r for r in data["runs"] if r["mode"] == mode and r["rate_pps"] == 0 and r["workload"] == "hotcold"]
        assert run["downtime_ms"] <= run["blackout_until_complete_ms"] <= run["blackout_ms"]
        assert data["summary"]["flat_out"][mode]["blackout_after_complete_trials"] == int(run["blackout_after_complete"])
    assert p.stdout.count("the longest gap fell after the last page was placed") == 2
    faults = data["summary"]["fault_round_trip_floor"]
    assert len(faults["busy_runs"]) == 1 and 0 < faults["idle"]["p50_us"] <= faults["idle"]["p99_us"]
    assert "a plain page round trip" in p.stdout


def test_page_round_trips_time_each_answer_and_notice_a_closed_server():
    """vmem.bench.roundtrip (the benchmarks' fault floor): every round trip waits for the
    whole page; a server that stops answering ends the measurement with ConnectionError,
    not with a short or made-up sample."""
    import socket
    import threading

    import numpy as np

    from vmem.bench.roundtrip import PAGE_BYTES, REQUEST_BYTES, paced_round_trips, serve_pages, summary_us

    a, b = socket.socketpair()
    server = threading.Thread(target=serve_pages, args=(b,))
    server.start()
    try:
        lat = paced_round_trips(a, 20, 2000, warmup=2)
        assert lat.shape == (20,) and (lat > 0).all()
    finally:
        a.close()
        server.join(10)
        b.close()
    assert not server.is_alive()  # it stopped at the client's close
    s = summary_us(np.array([1000, 2000, 3000, 100_000]))
    assert s["count"] == 4 and s["p50_us"] == 2.5 and s["max_us"] == 100.0

    a, b = socket.socketpair()

    def answer_twice_then_close():
        for _ in range(2):
            b.recv(REQUEST_BYTES, socket.MSG_WAITALL)
            b.sendall(bytes(PAGE_BYTES))
        b.close()

    server = threading.Thread(target=answer_twice_then_close)
    server.start()
    try:
        with pytest.raises(ConnectionError):  # EOF, or EPIPE on the next request
            paced_round_trips(a, 5, 1000)
    finally:
        server.join(10)
        a.close()


def test_plain_copy_pieces_cover_every_byte_and_lose_no_error():
    """vmem.bench.plaincopy (the two ends of the benchmarks' plain copy): the connection
    slices cover every byte exactly once, bad options are refused, and an exception in one
    connection's thread is re-raised after all of them ended."""
    from vmem.bench.plaincopy import connection_slice, copy_options, keyed, on_each_connection

    for total, conns in ((10, 3), (1 << 20, 2), (5, 1), (7, 7)):
        cuts = [connection_slice(i, conns, total) for i in range(conns)]
        assert cuts[0][0] == 0 and cuts[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
    assert copy_options([]) == {"conns": 1, "key": None, "verify": False, "digest": False}
    assert copy_options(["digest=1"])["digest"] is True
    assert copy_options(["conns=2", "key=" + "ab" * 32, "verify=1"]) == {"conns": 2, "key": b"\xab" * 32,
                                                                         "verify": True, "digest": False}
    for bad in (["conns=0"], ["colour=red"], ["conns"]):
        with pytest.raises(ValueError):
            copy_options(bad)
    sentinel = object()
    assert keyed(sentinel, None, "client") is sentinel

    done = []

    def work(i):
        if i == 1:
            raise RuntimeError("connection 1 broke")
        done.append(i)

    with pytest.raises(RuntimeError, match="connection 1 broke"):
        on_each_connection(work, 3)
    assert sorted(done) == [0, 2]  # the others ran to the end
