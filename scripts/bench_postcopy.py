#!/usr/bin/env python3
"""Post-copy benchmark: fault latency, background push rate, downtime vs pre-copy.

    .venv/bin/python scripts/bench_postcopy.py [--size 1G] [--runs 3] [--json out.json]

For each run, in the same process and on the same host:
  * pure post-copy of a ``--size`` guest at 5,000 and 50,000 dirtied pages/s (hotcold):
    downtime (pause -> first step at the destination, the guest-observed blackout),
    pause -> running, demand-fault round trip (fault read -> page mapped, p50/p99/max),
    background push rate while faults are served, time until the last page arrived;
  * pre-copy (Xen policy) of the same guest at the same rates: downtime, for comparison;
  * a plain socket copy of the same number of bytes between two processes (baseline for
    the push rate).
  * an idle guest in pure post-copy: the push rate with no fault pending (nothing faults);
  * a guest writing flat out (hotcold, ``rate=0``: unpaced) in pure and in hybrid
    (``after-precopy``) post-copy: the guest-observed ``blackout_ms``;
  * the blackout's floor without vmem (``step_gap_floor``): the longest gap a plain
    single-threaded loop sees while a plain socket copy and one more busy process share
    the CPUs with it (four busy threads, as during a push), printed beside the flat-out
    blackouts;
  * the fault round trip's floor without vmem (``fault_round_trip_floor``): plain page
    round trips between two processes at 5,000 a second, alone and while a plain socket
    copy and one more busy process run, printed beside the fault p99 at 5,000 pages/s.
Reports medians over the ``--runs`` that completed verified (the others are counted), and
the goals of issue 13 with the measured value: fault p50 <= 60 us, p99 <= 250 us at 5k and
50k pages/s, push >= 1.5 GB/s with no fault pending, ``blackout_ms`` <= 5 ms for pure and
hybrid post-copy of the guest writing flat out.  ``--strict``: exit 1 when a goal is missed.
The push rate while faults are served and the paced guests' blackout are reported too.

``--ab``: every post-copy scenario also runs with the scheduling before issue 13 item 2
(``VMEM_TEST_POSTCOPY_PREEMPT=give_way=0,piece=1024,batch=1024,priority=nice``: the push does
not give way to demand answers, 1024-page push batches, fault threads at nice -15),
interleaved with the current one (order alternating), and the summary gives both and their
ratios -- the comparison that stays meaningful on a loaded machine.  Goals are checked on the current scheduling only.

Every migration is preceded, after its guest booted, by touching and freeing 2.5x ``--size``
of fresh memory (vmem.bench.prewarm; ``--no-prewarm`` skips it): on this kind of VM free
memory goes back to the host a few seconds after it is freed, and a destination that drew
such pages ran the idle push at 0.6-1.2 GB/s instead of ~2.6 (measured, docs/performance.md).

``--prealloc``: every migration asks the destination to allocate the guest's RAM before
READY (``vmem migrate --prealloc``); ``--ab-prealloc``: every post-copy scenario with it
(arm "new", the goals') and without it (arm "no-prealloc"), interleaved, with the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from guests.launch import GuestSpec, ProcessGuest  # noqa: E402
from vmem import provenance  # noqa: E402
from vmem.migration.local import run_local_migration  # noqa: E402
from vmem.migration.source import MigrationOptions  # noqa: E402
from vmem.ram import parse_size  # noqa: E402
from vmem.bench.goals import Goals  # noqa: E402
from vmem.bench.prewarm import prewarm, prewarm_bytes_for  # noqa: E402
from vmem.bench.roundtrip import paced_round_trips, serve_pages, summary_us  # noqa: E402
from vmem.migration.inject import PREEMPT_ENV  # noqa: E402

#: the scheduling before issue 13 item 2 (the ``--ab`` baseline arm)
OLD_SCHEDULING = "give_way=0,piece=1024,batch=1024,priority=nice"


def _forked(body) -> int:
    """Run ``body()`` in a forked child that exits when it returns or fails (a peer gone:
    the parent is done with it), never returning into the parent's code; the child's pid."""
    pid = os.fork()
    if pid == 0:
        try:
            body()
        except BaseException:
            os._exit(1)
        os._exit(0)
    return pid


def plain_copy_Bps(nbytes: int) -> float:
    """Bytes/s of sendall -> recv_into between two processes over a unix socketpair."""
    a, b = socket.socketpair()
    chunk = 4 << 20
    def receive():
        a.close()
        buf = bytearray(chunk)
        left = nbytes
        while left:
            n = b.recv_into(buf, min(chunk, left))
            if not n:
                break
            left -= n
        b.send(b"k")

    pid = _forked(receive)
    b.close()
    data = np.ones(chunk, dtype=np.uint8)
    t0 = time.monotonic()
    left = nbytes
    while left:
        n = min(chunk, left)
        a.sendall(data[:n])
        left -= n
    a.recv(1)
    dt = time.monotonic() - t0
    os.waitpid(pid, 0)
    a.close()
    return nbytes / dt


# A single-threaded loop standing in for the guest: it counts steps of ~200 additions for
# argv[1] seconds and prints its longest gap between two steps and the 99.9th percentile, ms.
_STEP_PROBE = r"""
import sys, time
end = time.perf_counter_ns() + int(float(sys.argv[1]) * 1e9)
last = time.perf_counter_ns(); gaps = []; x = 0
while last < end:
    for _ in range(200):
        x += 1
    now = time.perf_counter_ns(); gaps.append(now - last); last = now
gaps.sort()
print(gaps[-1] / 1e6, gaps[-(len(gaps) // 1000) - 1] / 1e6)
"""
_BUSY_LOOP = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end: pass"


def _push_stand_ins(seconds: float) -> tuple[list[int], list[subprocess.Popen]]:
    """Start what competes with the guest during a push, without vmem: a plain socket copy
    between two forked processes (the sender stops after ``seconds``, the receiver at its
    EOF) and one more process spinning as long (the placer).  Returns (pids, processes) for
    :func:`_reap`."""
    a, b = socket.socketpair()
    chunk = 4 << 20

    def receive():
        a.close()
        buf = bytearray(chunk)
        while b.recv_into(buf, chunk):
            pass

    def send():
        b.close()
        data = np.ones(chunk, dtype=np.uint8)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            a.sendall(data)

    try:
        pids = [_forked(receive), _forked(send)]
    finally:
        a.close()
        b.close()
    return pids, [subprocess.Popen([sys.executable, "-c", _BUSY_LOOP, str(seconds)])]


def _reap(pids: list[int], procs: list[subprocess.Popen]) -> None:
    """Kill and reap forked children and subprocesses (whatever they were doing)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


def step_gap_floor(seconds: float = 1.0) -> dict:
    """The blackout's floor without vmem: the longest gap a single-threaded busy loop (the
    guest's stand-in) sees while, on the same CPUs, a plain socket copy runs between two
    processes (the push's sender and receiver) and one more process spins (the placer):
    four busy threads, as during a post-copy push.  Everything stops after ``seconds``
    (+1 s at most); returns ``{"longest_gap_ms", "p999_gap_ms"}``."""
    pids, procs = _push_stand_ins(seconds + 0.5)  # outlasts the probe, which starts later
    try:
        probe = subprocess.Popen([sys.executable, "-c", _STEP_PROBE, str(seconds)], stdout=subprocess.PIPE, text=True)
        procs.append(probe)
        out, _ = probe.communicate(timeout=30)
        longest, p999 = (float(x) for x in out.split())
        return {"longest_gap_ms": round(longest, 3), "p999_gap_ms": round(p999, 3)}
    finally:
        _reap(pids, procs)


def fault_round_trip_floor(rate_pps: int = 5000, samples: int = 2500, busy: bool = True) -> dict:
    """The demand fault's round trip without vmem: ``samples`` plain page round trips (a
    16-byte request answered with 4 KiB over a unix socketpair, Python on both ends, no
    userfaultfd, no placement), ``rate_pps`` a second, between two processes -- with
    ``busy``, while a plain socket copy runs between two more processes and one more spins
    (the push's sender, receiver and placer).  Both ends' threads are scheduled as vmem's
    fault threads are (``nat.boost_current_thread``: nice -15 and the short slice where
    permitted), so the floor and vmem are compared under one scheduling.  Returns
    ``{"p50_us", "p99_us", "max_us", "scheduling"}``; every process it starts is gone when it
    returns."""
    from vmem import _native as nat

    rt_a, rt_b = socket.socketpair()
    pids, procs = [], []
    try:
        def serve():
            rt_a.close()
            nat.boost_current_thread()
            serve_pages(rt_b)

        pids.append(_forked(serve))
        rt_b.close()
        if busy:
            more_pids, procs = _push_stand_ins(samples / rate_pps + 0.5)
            pids += more_pids
            time.sleep(0.2)  # all of them running
        got: dict = {}

        def measure():  # in a thread of its own: the raised scheduling ends with it
            got["scheduling"] = nat.boost_current_thread()[1]
            got["ns"] = paced_round_trips(rt_a, samples, rate_pps)

        t = threading.Thread(target=measure, name="floor-round-trips")
        t.start()
        t.join()
        if "ns" not in got:
            raise RuntimeError("the floor's round trips failed (the page server's process ended?)")
        r = summary_us(got["ns"])
        del r["count"]
        r["scheduling"] = got["scheduling"]
        return r
    finally:
        rt_a.close()
        _reap(pids, procs)


#: bench mode -> MigrationOptions.postcopy
POSTCOPY_OF = {"postcopy": "pure", "hybrid": "after-precopy", "precopy": "off"}


def one(mode: str, rate: int, size: int, workload: str = "hotcold", prealloc: bool = False,
        prewarm_bytes: int = 0) -> dict:
    """One migration of a fresh ``size`` guest running ``workload`` at ``rate`` pages/s
    (0: flat out; ignored by ``idle``); ``prealloc``: MigrationOptions.prealloc;
    ``prewarm_bytes``: fresh memory touched and freed right before the migration
    (vmem.bench.prewarm), after the guest booted."""
    params = {} if workload == "idle" else {"rate": rate}
    with ProcessGuest.boot(GuestSpec(workload, params, 1), size) as g:
        time.sleep(0.5)
        prewarm_s = prewarm(prewarm_bytes)
        opts = MigrationOptions(postcopy=POSTCOPY_OF[mode], observe_s=0.3, prealloc=prealloc)
        r = run_local_migration(g, opts).to_dict()
    out = {"mode": mode, "workload": workload, "rate_pps": rate, "outcome": r["outcome"], "downtime_ms": r["downtime_ms"],
           "blackout_ms": r.get("blackout_ms"), "prealloc": prealloc, "prewarm_s": prewarm_s,
           "prealloc_ms": r["timings_ms"].get("setup_destination_prealloc"),
           "prealloc_map_ms": r["timings_ms"].get("setup_destination_map"), "setup_ms": r.get("setup_time_ms"),
           "migration_time_s": r.get("migration_time_s"),
           "pause_to_running_ms": r["timings_ms"].get("pause_to_running"),
           "verified": r["verified"] and r["verification"]["digests"]["mismatched"] == 0}
    pc = r.get("postcopy")
    if pc:
        out.update(fault_p50_us=pc["fault_latency_us"]["p50"], fault_p99_us=pc["fault_latency_us"]["p99"],
                   fault_max_us=pc["fault_latency_us"]["max"], faults=pc["faults"], push_rate_Bps=pc["push_rate_Bps"],
                   complete_s=pc["complete_s"], guest_rate=pc["guest_rate"],
                   priority=pc.get("source", {}).get("fault_thread_priority"),
                   push_yields=pc.get("source", {}).get("push_yields"),
                   first_step_faults=(pc.get("first_step") or {}).get("faults"),
                   first_step_blocked_ms=(pc.get("first_step") or {}).get("blocked_ms"),
                   first_step_ms=(pc.get("first_step") or {}).get("duration_ms"),
                   blackout_at_s=r.get("blackout_at_s"),
                   blackout_until_complete_ms=pc.get("blackout_until_complete_ms"),
                   blackout_until_complete_at_s=pc.get("blackout_until_complete_at_s"),
                   blackout_after_complete=pc.get("blackout_after_complete"))
    return out


#: (label, mode, workload, rate): the scenarios of one run, in order
SCENARIOS = [(f"{mode} {rate}", mode, "hotcold", rate) for rate in (5000, 50000) for mode in ("postcopy", "precopy")] + [
    ("postcopy idle", "postcopy", "idle", 0),
    ("postcopy flat-out", "postcopy", "hotcold", 0),
    ("hybrid flat-out", "hybrid", "hotcold", 0),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1G")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    ab = p.add_mutually_exclusive_group()
    ab.add_argument("--ab", action="store_true", help="also run every post-copy scenario with the old scheduling,"
                                                      " interleaved, and report the ratios")
    ab.add_argument("--ab-prealloc", action="store_true",
                    help="run every post-copy scenario with --prealloc (arm 'new', where the goals are checked) and "
                         "without it (arm 'no-prealloc'), interleaved, and report the ratios")
    p.add_argument("--prealloc", action="store_true",
                   help="every migration with --prealloc (the destination allocates the guest's RAM before READY)")
    p.add_argument("--no-prewarm", action="store_true",
                   help="do not touch and free 2.5x --size of fresh memory right before each migration "
                        "(vmem.bench.prewarm says why it is done)")
    a = p.parse_args(argv)
    size = parse_size(a.size)
    prewarm_bytes = 0 if a.no_prewarm else prewarm_bytes_for(size)
    prov = provenance.collect()  # the boot among the rest: figures of two boots differ (docs/bench.md)
    print(provenance.summary_line(prov), flush=True)
    results = []
    other = "old" if a.ab else "no-prealloc" if a.ab_prealloc else None  # the comparison arm
    gap_floors, fault_floors = [], []
    fault_floor_idle = fault_round_trip_floor(5000, busy=False)
    for i in range(a.runs):
        base = plain_copy_Bps(size)
        gap_floors.append(step_gap_floor())
        fault_floors.append(fault_round_trip_floor(5000))
        for label, mode, workload, rate in SCENARIOS:
            arms = ["new", other] if other and mode != "precopy" else ["new"]
            if i % 2:
                arms.reverse()
            for arm in arms:
                if arm == "old":
                    os.environ[PREEMPT_ENV] = OLD_SCHEDULING  # read by both sides (the destination inherits it)
                try:
                    res = one(mode, rate, size, workload,
                              prealloc=(a.prealloc or a.ab_prealloc) and arm != "no-prealloc",
                              prewarm_bytes=prewarm_bytes)
                finally:
                    os.environ.pop(PREEMPT_ENV, None)
                res["run"] = i
                res["arm"] = arm
                res["scenario"] = label
                res["plain_copy_Bps"] = round(base, 1)
                if res.get("push_rate_Bps"):
                    res["push_vs_plain"] = round(res["push_rate_Bps"] / base, 3)
                results.append(res)
                print(json.dumps(res), flush=True)

    def good(label, arm="new"):  # the runs of one scenario that completed verified
        return [r for r in results if r["scenario"] == label and r["arm"] == arm
                and r["outcome"] == "completed" and r["verified"]]

    def each(mode, rate, key, workload="hotcold", arm="new"):  # per run, verified runs only
        label = next(s[0] for s in SCENARIOS if s[1:] == (mode, workload, rate))
        return [r[key] for r in good(label, arm) if r.get(key) is not None]

    def med(mode, rate, key, workload="hotcold", arm="new"):
        xs = each(mode, rate, key, workload, arm)
        return round(statistics.median(xs), 3) if xs else None

    summary = {}
    for rate in (5000, 50000):
        summary[f"{rate}pps"] = {
            "postcopy_downtime_ms": med("postcopy", rate, "downtime_ms"),
            "postcopy_pause_to_running_ms": med("postcopy", rate, "pause_to_running_ms"),
            "precopy_downtime_ms": med("precopy", rate, "downtime_ms"),
            "fault_p50_us": med("postcopy", rate, "fault_p50_us"),
            "fault_p99_us": med("postcopy", rate, "fault_p99_us"),
            "push_rate_GBps": (med("postcopy", rate, "push_rate_Bps") or 0) / 1e9,
            "push_vs_plain": med("postcopy", rate, "push_vs_plain"),
            "complete_s": med("postcopy", rate, "complete_s"),
            "postcopy_blackout_ms": med("postcopy", rate, "blackout_ms"),
            "left_out_unverified": sum(1 for r in results if r["rate_pps"] == rate and r["workload"] == "hotcold"
                                       and not (r["outcome"] == "completed" and r["verified"])),
        }
    summary["idle"] = {"push_rate_GBps": (med("postcopy", 0, "push_rate_Bps", "idle") or 0) / 1e9,
                       "push_vs_plain": med("postcopy", 0, "push_vs_plain", "idle"),
                       "faults": med("postcopy", 0, "faults", "idle")}
    summary["flat_out"] = {mode: {"blackout_ms": med(mode, 0, "blackout_ms"), "downtime_ms": med(mode, 0, "downtime_ms"),
                                  "fault_p99_us": med(mode, 0, "fault_p99_us"),
                                  "pause_to_running_ms": med(mode, 0, "pause_to_running_ms"),
                                  "first_step_faults": med(mode, 0, "first_step_faults"),
                                  "first_step_blocked_ms": med(mode, 0, "first_step_blocked_ms"),
                                  "first_step_ms": med(mode, 0, "first_step_ms"),
                                  "push_rate_GBps": (med(mode, 0, "push_rate_Bps") or 0) / 1e9,
                                  "blackout_until_complete_ms": med(mode, 0, "blackout_until_complete_ms"),
                                  "blackout_after_complete_trials": sum(each(mode, 0, "blackout_after_complete"))}
                           for mode in ("postcopy", "hybrid")}
    summary["plain_copy_GBps"] = round(statistics.median(r["plain_copy_Bps"] for r in results) / 1e9, 3)
    summary["step_gap_floor"] = {"runs": gap_floors,
                                 "longest_gap_ms": statistics.median(g["longest_gap_ms"] for g in gap_floors)}
    summary["fault_round_trip_floor"] = {"idle": fault_floor_idle, "busy_runs": fault_floors,
                                         "p50_us": statistics.median(f["p50_us"] for f in fault_floors),
                                         "p99_us": statistics.median(f["p99_us"] for f in fault_floors)}
    if other:  # the same scenarios in the comparison arm, and new / other
        ab = {}
        for label, mode, workload, rate in SCENARIOS:
            if mode == "precopy":
                continue
            row = {}
            for key in ("fault_p50_us", "fault_p99_us", "push_rate_Bps", "blackout_ms", "downtime_ms"):
                new, old = med(mode, rate, key, workload), med(mode, rate, key, workload, other)
                row[key] = {"new": new, "old": old, "new_over_old": round(new / old, 3) if new and old else None}
            ab[label] = row
            print(f"A/B {label}: " + ", ".join(f"{k} {v['new']} vs {v['old']} (x{v['new_over_old']})"
                                                for k, v in row.items()))
        summary["ab_new_vs_old_scheduling" if a.ab else "ab_prealloc_vs_not"] = ab
    print(json.dumps({"summary": summary}, indent=1))
    checks = []  # (where, what, median, op, target, the figure of each run)
    for rate in (5000, 50000):
        sm = summary[f"{rate}pps"]
        checks += [(f"{rate} pages/s", "fault p50 us", sm["fault_p50_us"], "<=", 60, each("postcopy", rate, "fault_p50_us")),
                   (f"{rate} pages/s", "fault p99 us", sm["fault_p99_us"], "<=", 250, each("postcopy", rate, "fault_p99_us"))]
    checks += [("idle guest", "push GB/s, no fault pending", summary["idle"]["push_rate_GBps"] or None, ">=", 1.5,
                [x / 1e9 for x in each("postcopy", 0, "push_rate_Bps", "idle")]),
               ("flat out", "pure post-copy blackout ms", summary["flat_out"]["postcopy"]["blackout_ms"], "<=", 5,
                each("postcopy", 0, "blackout_ms")),
               ("flat out", "hybrid post-copy blackout ms", summary["flat_out"]["hybrid"]["blackout_ms"], "<=", 5,
                each("hybrid", 0, "blackout_ms"))]
    goals = Goals()
    for where, what, value, op, target, samples in checks:
        goals.check(where, what, value, op, target, samples=samples)
    for rate in (5000, 50000):  # reported, not goals of their own (the push goal is with no fault pending)
        sm = summary[f"{rate}pps"]
        print(f"INFO {rate} pages/s: push while serving faults {sm['push_rate_GBps']:.3f} GB/s"
              f" ({sm['push_vs_plain']} x the plain copy), blackout {sm['postcopy_blackout_ms']} ms")
    for mode in ("postcopy", "hybrid"):  # where a flat-out guest's downtime goes (docs/performance.md)
        fo = summary["flat_out"][mode]
        print(f"INFO flat out, {'pure post-copy' if mode == 'postcopy' else 'hybrid'}: downtime {fo['downtime_ms']} ms ="
              f" pause -> guest running {fo['pause_to_running_ms']} ms + its first step {fo['first_step_ms']} ms;"
              f" from the resume on it was blocked {fo['first_step_blocked_ms']} ms on {fo['first_step_faults']} demand"
              f" faults as the fault thread counts them (medians)")
    ff = summary["fault_round_trip_floor"]
    print(f"INFO 5000 pages/s: fault p99 {summary['5000pps']['fault_p99_us']} us; without vmem, a plain page round trip "
          f"between two processes at 5,000/s ({ff['idle'].get('scheduling', 'default scheduling')}, as vmem's fault "
          f"threads) while a plain copy and one more busy process share the CPUs: p50 "
          f"{ff['p50_us']} us, p99 {ff['p99_us']} us (median; p99 per run "
          f"{', '.join(str(f['p99_us']) for f in ff['busy_runs'])}); alone: p99 {ff['idle']['p99_us']} us")
    for mode in ("postcopy", "hybrid"):  # where the blackout fell: inside the post-copy or after it
        fo = summary["flat_out"][mode]
        trials = len(each(mode, 0, "blackout_ms"))
        print(f"INFO flat out, {'pure post-copy' if mode == 'postcopy' else 'hybrid'}: the longest gap fell after the "
              f"last page was placed (verification, the source's exit, the machine) in "
              f"{fo['blackout_after_complete_trials']} of {trials} trials; the longest gap until then "
              f"{fo['blackout_until_complete_ms']} ms (median; the goal is on blackout_ms)")
    gf = summary["step_gap_floor"]
    print(f"INFO flat out: blackout pure {summary['flat_out']['postcopy']['blackout_ms']} / hybrid "
          f"{summary['flat_out']['hybrid']['blackout_ms']} ms; without vmem, a single-threaded loop's longest gap while "
          f"a plain copy and one more busy process share the CPUs: {gf['longest_gap_ms']} ms (median; per run "
          f"{', '.join(str(g['longest_gap_ms']) for g in gf['runs'])})")
    print(goals.summary())
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"provenance": prov, "runs": results, "summary": summary, "goals": goals.items}, f, indent=1)
    return goals.exit_status(a.strict)


if __name__ == "__main__":
    sys.exit(main())
