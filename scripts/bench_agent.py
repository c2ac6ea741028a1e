#!/usr/bin/env python3
"""Benchmark: agent-to-agent live migration between two test hosts vs a plain TCP copy.

Brings up two network namespaces (scripts/testhosts.sh, a unique prefix, torn down at the
end whatever happens), starts ``vmem agent`` in each, and measures in the same run:

1. **baseline**: a plain Python TCP copy of the guest's size from host 1 to host 2
   (transport.tcp, no framing), on the unshaped veth: into a buffer touched beforehand, and
   into a fresh memfd (recv + pwrite, what a destination must do: the issue's baseline);
   and, as the floors of the other goals, the fresh copy over two connections and with a
   MAC on every connection (transport.secure.MacChannel: what a keyed link must add), each
   ``--baseline-runs`` times, interleaved (medians); and the fresh copy once more in each
   repeat of step 2, the pair its round-0 goal's trial is measured against;
2. **unshaped**: the guest migrated by the agents with each link setting (one connection;
   ``--parallel 2``; ``--compress off|none|zstd|lz4``), back and forth; the ratio is
   round-0 throughput (stream bytes / round time) over the baseline's throughput;
3. **zero pages**: a fresh mostly-empty guest of ``--empty-size`` (``-W fill=false``, workload
   ``--empty-workload``: only the ledger and the pages the workload touches hold data)
   against the full guest: total migration time of each (no guest ledger check), and bytes
   on the wire; unshaped, and again on the shaped link;
4. **shaped**: the link shaped with tc HTB to ``--rate``; each compression setting again;
   the ratio is round-0 throughput over the shaped rate;
5. **post-copy faults**: ``--postcopy-runs`` pure post-copy migrations of a guest writing
   ``--postcopy-rate`` pages/s between the agents; the demand-fault round trip's p50 and p99
   (medians over the runs), with the fault threads as ``--fault-sched`` / ``--fault-cpu``
   say (vmem's defaults unless given; the GOAL lines name them when given); ``--tls-postcopy-runs N``: the same between TLS agents (no goal
   of its own: printed beside the keyed one); ``--postcopy-bandwidths 1G,600M``: that many
   rounds more on the first arm's pair, uncapped and with each ``--postcopy-bandwidth``
   interleaved -- the push rate against the fault round trip (no goal: informational).

``--security both`` runs steps 2 and 5 with a keyed and an unkeyed pair of agents taking
turns (one pair and one guest alive at a time; the arms alternate every repeat), then 3
and 4 with the keyed pair.  Issue 13's goals are printed as ``GOAL`` lines (vmem.bench.goals):
round 0 over one connection >= 0.75x the plain TCP copy into fresh memory and ``--parallel
2`` >= 1.0x one connection (each pair), keyed / unkeyed round 0 >= 0.8 (both), and the keyed
fault round trip p50 <= 60 us, p99 <= 500 us; ``--strict`` exits 1 when one is missed.
Beside them ``INFO`` lines give each arm's round 0 over its floor (the plain copy with what
that link must do) and the plain copy's two connections over one.  ``--cpu-sweep 1,2``
repeats round 0 over one and two connections, and those plain copies, with everything
restricted to 1, then 2 CPUs (affinity, inherited by the agents): what ``--parallel``
gains with cores.

Every timed transfer, the baselines' and each migration, is preceded by touching and freeing
2.5x ``--size`` of fresh memory (vmem.bench.prewarm: on this kind of VM a page the kernel
handed back to the host costs a host fault at first touch, and a copy into fresh memory ran
at 0.35 or 3 GiB/s depending on which pages it drew); ``--no-prewarm`` skips it.

Timing claims are ratios against a baseline measured in the same run, never absolute
(the fault round trip is a latency the issue states in microseconds: it is printed as such).

    sudo .venv/bin/python scripts/bench_agent.py [--size 1G] [--empty-size 8G] [--rate 1gbit]
                                                 [--security key|none|both] [--postcopy-runs 3]
                                                 [--tls-postcopy-runs 0] [--postcopy-bandwidths CAPS]
                                                 [--fault-sched fifo] [--fault-cpu 0]
                                                 [--baseline-runs 3] [--cpu-sweep 1,2]
                                                 [--no-shaped] [--strict] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from testhosts import NetnsHosts, netns_unavailable, page_round_trips, transfer  # noqa: E402

from transport import parse_rate  # noqa: E402
from vmem import provenance  # noqa: E402
from vmem.agent.client import AgentClient  # noqa: E402
from vmem.bench.goals import Goals  # noqa: E402
from vmem.bench.prewarm import prewarm, prewarm_bytes_for  # noqa: E402
from vmem.migration.postcopy import FAULT_SCHEDS  # noqa: E402
from vmem.errors import ConfigError  # noqa: E402
from vmem.ram import parse_size  # noqa: E402
from vmem.units import bandwidth_from_arg  # noqa: E402

START_TIMEOUT_S = 60.0


def start_agent(hosts: NetnsHosts, host: int, workdir: str, key: str | None,
                tls: tuple[str, str, str] | None = None) -> dict:
    """An agent on test host ``host``: keyed (``key``), TLS (``tls``: cert, key, CA files) or
    --insecure."""
    state = os.path.join(workdir, f"h{host}")
    argv = [sys.executable, "-m", "vmem", "agent", "--listen", f"{hosts.addr(host)}:0", "--state-dir", state,
            "--stop-guests"]  # a benchmark leaves no guest behind
    if tls:
        argv += ["--tls-cert", tls[0], "--tls-key", tls[1], "--tls-ca", tls[2]]
    if key:
        argv += ["--key", key]
    elif not tls:
        argv += ["--insecure"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    log = open(os.path.join(workdir, f"h{host}.log"), "wb")
    proc = hosts.run(host, argv, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=ROOT)
    log.close()
    info_path = os.path.join(state, "agent.json")
    deadline = time.monotonic() + START_TIMEOUT_S
    while not os.path.exists(info_path):
        if proc.poll() is not None or time.monotonic() > deadline:
            with open(os.path.join(workdir, f"h{host}.log")) as f:
                raise SystemExit(f"agent on host {host} did not start:\n{f.read()}")
        time.sleep(0.05)
    with open(info_path) as f:
        info = json.load(f)
    info["proc"] = proc
    return info


#: Options every migration of this run carries (``--prealloc`` sets {"prealloc": True}).
COMMON_OPTIONS: dict = {}
#: Fresh memory touched and freed before every timed transfer (vmem.bench.prewarm; the
#: test hosts are namespaces of this kernel, so the bench's own fill warms theirs); 0: none.
PREWARM_BYTES = 0


def migrate(src: dict, dst_addr: str, name: str, **options) -> dict:
    prewarm_s = prewarm(PREWARM_BYTES)
    with AgentClient(src["socket"]) as c:
        report = c.request("migrate", name=name, target=dst_addr,
                          options={"observe": 0.0, **COMMON_OPTIONS, **options})["report"]
    if report["outcome"] != "completed":
        raise SystemExit(f"migration failed: {report['reason']}")
    r0 = report["rounds"][0]
    link = report["guest"].get("link", {})
    return {
        "options": options,
        "prewarm_s": prewarm_s,
        "total_time_s": report["total_time_s"],
        "downtime_ms": report["downtime_ms"],
        "rounds": len(report["rounds"]),
        "bytes_sent": report["bytes_sent"],
        "wire_bytes": link.get("wire_bytes"),
        "zero_pages_elided": link.get("zero_pages_elided"),
        "round0_bytes": r0["bytes_sent"],
        "round0_s": r0["duration_s"],
        "round0_Bps": r0["bytes_sent"] / r0["duration_s"],
        # --prealloc: the destination's allocation and mapping before READY, which round 0 no
        # longer pays
        "prealloc_s": sum(report["timings_ms"].get(k) or 0 for k in ("setup_destination_prealloc",
                                                                     "setup_destination_map")) / 1e3 or None,
        "digests_mismatched": report["verification"]["digests"]["mismatched"],
        "guest_check_ok": (report["verification"].get("guest_check") or {}).get("ok"),
        "blackout_ms": report.get("blackout_ms"),
        # post-copy: the demand-fault round trip the destination measured (fault read -> placed)
        "faults": (report.get("postcopy") or {}).get("faults"),
        "fault_latency_us": (report.get("postcopy") or {}).get("fault_latency_us"),
        "push_rate_Bps": (report.get("postcopy") or {}).get("push_rate_Bps"),
    }


class PingPong:
    """Migrates one guest back and forth between the two agents (each run starts where the
    last one left it)."""

    def __init__(self, hosts: NetnsHosts, agents: list, name: str):
        self.hosts, self.agents, self.name, self.at = hosts, agents, name, 0

    def run(self, **options) -> dict:
        src, dst = self.at, 1 - self.at
        result = migrate(self.agents[src], f"{self.hosts.addr(dst + 1)}:{self.agents[dst]['port']}", self.name,
                         **options)
        self.at = dst
        assert result["digests_mismatched"] == 0 and result["guest_check_ok"] is not False, result
        self._wait_running(self.agents[dst])
        return result

    def _wait_running(self, agent: dict, timeout_s: float = 60.0) -> None:
        """The destination lists the guest ``incoming`` until it commits; the next run
        migrates it from there, so wait (bounded) until it is ``running``."""
        deadline = time.monotonic() + timeout_s
        while True:
            with AgentClient(agent["socket"]) as c:
                rows = [g for g in c.request("list")["guests"] if g.get("name") == self.name]
            if rows and rows[0].get("state") == "running":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest {self.name!r} not running at its destination after {timeout_s:.0f} s: {rows}")
            time.sleep(0.05)


def _flags(options: dict) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items()) or "(defaults)"


def compare_empty(empty: PingPong, full: PingPong, args, where: str = "unshaped") -> dict:
    """Total time of the mostly-empty guest against the full one (no guest ledger check:
    it reads every page of the guest, and is verification, not migration)."""
    # A fresh guest each time: a workload that writes over all of its RAM fills it as it runs.
    with AgentClient(empty.agents[full.at]["socket"]) as c:
        c.request("create", name=empty.name, workload=args.empty_workload, size=args.empty_size,
                  workload_args=["fill=false"])
    time.sleep(1.0)
    empty.at = full.at
    # --no-guest-check on both sides of the ratio: total_time_s includes the check, whose
    # cost grows with the guest's RAM, not with what crossed the link; digests stay on.
    e = empty.run(no_guest_check=True)
    with AgentClient(empty.agents[empty.at]["socket"]) as c:
        c.request("destroy", name=empty.name)
    f = full.run(no_guest_check=True)
    out = {"empty": e, "full": f, "time_ratio": e["total_time_s"] / f["total_time_s"],
           "wire_ratio": e["wire_bytes"] / f["wire_bytes"]}
    print(f"{where}: {args.empty_size} mostly empty vs {args.size} full: total {e['total_time_s']:.2f} s vs "
          f"{f['total_time_s']:.2f} s = {out['time_ratio']:.2f}x; wire {e['wire_bytes'] / 2**20:.0f} MiB vs "
          f"{f['wire_bytes'] / 2**20:.0f} MiB; round 0 {e['round0_s']:.2f} s vs {f['round0_s']:.2f} s")
    return out


LINKS = [{"parallel": 1, "compress": "none"}, {"parallel": 2, "compress": "none"}, {"parallel": 1, "compress": "off"},
         {"parallel": 1, "compress": "zstd"}, {"parallel": 1, "compress": "lz4"}]

#: issue 13's goals checked here (docs/performance.md)
ROUND0_OVER_FRESH_COPY = 0.75     # item 3: round 0, one connection, / plain TCP copy into fresh memory
PARALLEL2_OVER_ONE = 1.0          # item 3: --parallel 2 never slower than one connection
KEYED_OVER_UNKEYED = 0.8          # item 1: keyed pre-copy throughput / unkeyed
KEYED_FAULT_P50_US = 60.0         # item 1: keyed post-copy demand-fault round trip
KEYED_FAULT_P99_US = 500.0


class Pair:
    """Two agents (one per test host) with the same security and one guest they migrate back
    and forth; started and stopped as one, so that a keyed and an unkeyed pair can take turns
    on the same hosts with only one guest alive at a time."""

    def __init__(self, hosts: NetnsHosts, workdir: str, security: str, key: str | None, args, tag: str,
                 tls: tuple[str, str, str] | None = None):
        self.security, self.agents = security, []
        d = os.path.join(workdir, tag)
        os.mkdir(d)
        try:
            for host in (1, 2):  # one at a time: a second that fails leaves the first in self.agents to stop
                self.agents.append(start_agent(hosts, host, d, key if security == "key" else None, tls))
            with AgentClient(self.agents[0]["socket"]) as c:
                c.request("create", name="bench", workload=args.workload, size=args.size)
            time.sleep(1.0)
        except BaseException:
            self.stop()
            raise
        self.full = PingPong(hosts, self.agents, "bench")

    def stop(self) -> None:
        for a in self.agents:
            if a["proc"].poll() is None:
                a["proc"].send_signal(signal.SIGTERM)
        for a in self.agents:
            try:
                a["proc"].wait(30)
            except subprocess.TimeoutExpired:
                a["proc"].kill()
                a["proc"].wait()
        self.agents = []


def make_tls_files(workdir: str, addresses: list[str]) -> tuple[str, str, str]:
    """A CA and one certificate for ``addresses`` (both test hosts' agents present it),
    made with the openssl command: (cert, key, CA) paths in ``workdir``."""
    ca_key, ca, key, csr, cert, ext = (os.path.join(workdir, n) for n in
                                       ("tls-ca.key", "tls-ca.pem", "tls.key", "tls.csr", "tls.pem", "tls-ext.cnf"))
    with open(ext, "w") as f:
        f.write("subjectAltName=" + ",".join(f"IP:{a}" for a in addresses) + "\n")
    for argv in (["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
                  "-days", "1", "-subj", "/CN=vmem bench CA"],
                 ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=agent"],
                 ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
                  "-days", "1", "-extfile", ext]):
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return cert, key, ca


def pair_for(pair: Pair | None, hosts: NetnsHosts, workdir: str, security: str, key: str | None, args,
             tag: str) -> Pair:
    """``pair`` if it has ``security``; else it is stopped and a new pair started."""
    if pair is not None and pair.security == security:
        return pair
    if pair is not None:
        pair.stop()
    return Pair(hosts, workdir, security, key, args, tag)


def postcopy_migrations(pair: Pair, hosts: NetnsHosts, args, plan: list[dict]) -> list[dict]:
    """A pure post-copy migration between the pair's agents for each option dict of ``plan``
    (in order), of one fresh guest writing ``--postcopy-rate`` pages/s (ping-pong): each
    run's demand-fault round trip as the destination measured it (fault read -> page
    placed), its push rate, blackout and downtime."""
    with AgentClient(pair.agents[pair.full.at]["socket"]) as c:
        c.request("create", name="pc", workload="hotcold", size=args.size,
                  workload_args=[f"rate={args.postcopy_rate}"])
    time.sleep(1.0)
    pp = PingPong(hosts, pair.agents, "pc")
    pp.at = pair.full.at
    out = []
    try:
        for options in plan:
            r = pp.run(postcopy=True, observe=0.3, **fault_options(args), **options)
            lat = r["fault_latency_us"] or {}
            out.append({"options": options, "faults": r["faults"], "p50_us": lat.get("p50"), "p99_us": lat.get("p99"),
                        "max_us": lat.get("max"), "blackout_ms": r["blackout_ms"], "downtime_ms": r["downtime_ms"],
                        "push_rate_Bps": r["push_rate_Bps"]})
    finally:
        # best effort: after a failure the guest may be on either side, and the agents stop
        # their guests when they stop (--stop-guests) whatever happens here
        for agent in pp.agents:
            try:
                with AgentClient(agent["socket"]) as c:
                    c.request("destroy", name="pc")
            except Exception:
                pass
    return out


def _median_of(rows: list[dict], key: str):
    xs = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(xs) if xs else None


def fault_options(args) -> dict:
    """The post-copy runs' fault-thread flags (``--fault-sched``, ``--fault-cpu``) as
    migration options."""
    out = {"fault_sched": getattr(args, "fault_sched", "default")}
    if getattr(args, "fault_cpu", None) is not None:
        out["fault_cpu"] = args.fault_cpu
    return out


def fault_flags(args) -> str:
    """The same as flags, for what the runs print: ``--fault-sched fifo --fault-cpu 0``."""
    return _flags(fault_options(args))


def postcopy_faults(pair: Pair, hosts: NetnsHosts, args, runs: int) -> dict:
    """``runs`` pure post-copy migrations (:func:`postcopy_migrations`, vmem's defaults): the
    demand-fault round trip's medians over the runs."""
    out = postcopy_migrations(pair, hosts, args, [{}] * runs)

    def med(k):
        return _median_of(out, k)

    summary = {"runs": out, "p50_us": med("p50_us"), "p99_us": med("p99_us"), "faults": med("faults")}
    print(f"post-copy ({pair.security}, {fault_flags(args)}), {args.postcopy_rate} pages/s, median of {runs}: fault round trip "
          f"p50 {summary['p50_us']} us, p99 {summary['p99_us']} us ({summary['faults']} faults)")
    return summary


def postcopy_tradeoff(pair: Pair, hosts: NetnsHosts, args, caps: list[str], runs: int) -> dict:
    """The push / fault-latency trade of ``--postcopy-bandwidth``: ``runs`` rounds of pure
    post-copy migrations, each round one uncapped and one per cap in ``caps``, the order
    reversed every other round (so that a slow stretch of the machine does not fall on one
    setting); per setting the medians of p50, p99, push rate and blackout.  Informational:
    issue 13's goals are measured with vmem's defaults."""
    settings = ["none", *caps]
    plan = []
    for i in range(runs):
        for cap in (settings if i % 2 == 0 else settings[::-1]):
            plan.append({} if cap == "none" else {"postcopy_bandwidth": cap})
    out = postcopy_migrations(pair, hosts, args, plan)
    table = {}
    print(f"post-copy push cap ({pair.security}, {args.postcopy_rate} pages/s, {runs} runs each, interleaved): "
          f"medians")
    for cap in settings:
        rows = [r for r in out if r["options"].get("postcopy_bandwidth", "none") == cap]
        table[cap] = {"runs": rows, **{k: _median_of(rows, k) for k in ("p50_us", "p99_us", "push_rate_Bps",
                                                                          "blackout_ms")}}
        t = table[cap]
        push = f"{t['push_rate_Bps'] / 1e9:.2f} GB/s" if t["push_rate_Bps"] else "-"
        print(f"  --postcopy-bandwidth {cap:<6} push {push:>10}, fault round trip p50 {t['p50_us']} us, "
              f"p99 {t['p99_us']} us (per run: {', '.join(str(r['p99_us']) for r in rows)}), "
              f"blackout {t['blackout_ms']} ms")
    return table


#: The push's placer, stood in for: 1 MiB pwrites into a 64 MiB memfd, allocated first (as
#: --prealloc does), round and round until argv[1] seconds have passed -- busy mostly inside
#: the kernel, as the placer is, where this kernel does not preempt it for a woken thread.
PLACER_STAND_IN = """import os, sys, time
fd = os.memfd_create("placer-stand-in")
os.posix_fallocate(fd, 0, 64 << 20)
buf = bytes([0x5A]) * (1 << 20)
end, off = time.monotonic() + float(sys.argv[1]), 0
while time.monotonic() < end:
    os.pwrite(fd, buf, off)
    off = (off + (1 << 20)) % (64 << 20)
"""


def page_round_trip_floor(hosts: NetnsHosts, args, fresh_Bps: float, samples: int = 2500, loaded_runs: int = 5) -> dict:
    """What a demand fault's round trip can be on these hosts, for the fault goals: plain
    page round trips (testhosts.page_round_trips: a 16-byte request answered with 4 KiB over
    TCP, Python on both ends, no userfaultfd, no placement, no MAC), ``samples`` at
    ``--postcopy-rate`` a second, once on the idle link and ``loaded_runs`` times while a
    plain TCP copy into fresh memory (host 1 -> host 2, the push's direction, not paced)
    runs for longer than the round trips take -- and ``loaded_runs`` times more with a stand-in
    for the destination's placer beside the copy on host 2 (``placer``: 1 MiB pwrites into a
    memfd, :data:`PLACER_STAND_IN`): a post-copy push is three busy threads (the source's
    sender, the destination's receiver and its placer), the plain copy two; bench_postcopy's
    one-host floor stands the placer in too.  ``loaded`` and
    ``placer`` hold the runs and the medians of their p50 and p99; a run's ``overlapped``
    says whether the copy was still running when its last round trip ended."""
    idle = page_round_trips(hosts, samples, args.postcopy_rate)
    seconds = samples / args.postcopy_rate + 0.5  # the round trips, their processes' start, margin
    copy_bytes = int(min(max(fresh_Bps, 1e8) * 2 * seconds, 8 << 30)) & ~((4 << 20) - 1)

    def loaded_run(placer: bool) -> dict:
        done = threading.Event()

        def copy():
            try:
                transfer(hosts, copy_bytes, hashing=False, fresh=True)
            finally:
                done.set()

        prewarm(copy_bytes)
        t = threading.Thread(target=copy, name="bulk-copy")
        t.start()
        spin = hosts.run_python(2, PLACER_STAND_IN, str(2 * seconds + 1.0)) if placer else None
        try:
            time.sleep(0.3)  # the copy's two processes start
            r = page_round_trips(hosts, samples, args.postcopy_rate)
            r["overlapped"] = not done.is_set()
        finally:
            t.join()
            if spin is not None:
                spin.kill()
                spin.communicate()
        return r

    def medians(runs: list[dict]) -> dict:
        return {"runs": runs, "p50_us": round(statistics.median(r["p50_us"] for r in runs), 1),
                "p99_us": round(statistics.median(r["p99_us"] for r in runs), 1)}

    both = [(loaded_run(False), loaded_run(True)) for _ in range(loaded_runs)]  # interleaved
    loaded, placer = medians([a for a, _ in both]), medians([b for _, b in both])
    print(f"page round trip, plain TCP ({samples} at {args.postcopy_rate}/s; both ends scheduled as vmem's fault "
          f"threads, {idle['scheduling']}): idle link p50 {idle['p50_us']} us, "
          f"p99 {idle['p99_us']} us")
    for label, m in (("during a plain copy", loaded), ("during a plain copy and 1 MiB pwrites on host 2 (the placer stood in)", placer)):
        print(f"  {label} (median of {loaded_runs}): p50 {m['p50_us']} us, p99 {m['p99_us']} us (p99 per run: "
              f"{', '.join(str(r['p99_us']) for r in m['runs'])}"
              + ("" if all(r["overlapped"] for r in m["runs"]) else "; a copy ended before its round trips did") + ")")
    return {"idle": idle, "loaded": loaded, "placer": placer, "copy_bytes": copy_bytes}


#: the plain copies measured as baselines: (result key, label, into fresh memory, connections,
#: with a MAC, pages digested after placing).
#: The digested copies do what vmem's destination must beyond placing -- digest every page as
#: memory then holds it (DESIGN.md: verify what was placed) -- and nothing else of vmem's.
BASELINES = [("baseline", "touched buffer", False, 1, False, False),
             ("baseline_fresh", "fresh memfd", True, 1, False, False),
             ("baseline_fresh_2conn", "fresh memfd, 2 connections", True, 2, False, False),
             ("baseline_fresh_digest", "fresh memfd, pages digested", True, 1, False, True),
             ("baseline_fresh_keyed", "fresh memfd, MAC", True, 1, True, False),
             ("baseline_fresh_keyed_2conn", "fresh memfd, MAC, 2 connections", True, 2, True, False),
             ("baseline_fresh_keyed_digest", "fresh memfd, MAC, pages digested", True, 1, True, True)]


def paired_copy(hosts: NetnsHosts, size: int) -> float:
    """One more plain TCP copy into fresh memory (``baseline_fresh``'s kind, after a
    pre-warm), made in each repeat just before its migrations: the round-0 goal's trials are
    (this copy, the repeat's round 0) pairs.  Bytes per second."""
    prewarm(PREWARM_BYTES)
    _s, _g, seconds = transfer(hosts, size, hashing=False, fresh=True)
    return size / seconds


def plain_copies(hosts: NetnsHosts, size: int, keyed: bool, runs: int) -> dict:
    """The plain TCP copies of ``size`` bytes from host 1 to host 2 that the goals are
    measured against (``BASELINES``; the keyed ones only if ``keyed``), each ``runs``
    times, interleaved, each after a pre-warm: ``{key: {"seconds", "Bps", "Bps_all"}}``
    with the median run's figures."""
    mac_key = os.urandom(32)  # a throwaway key: the copy's MAC costs what a keyed link's does
    chosen = [b for b in BASELINES if keyed or not b[4]]
    times: dict = {b[0]: [] for b in chosen}
    for _ in range(runs):
        for name, _label, fresh, conns, with_mac, digested in chosen:
            prewarm(PREWARM_BYTES)
            _s, _g, seconds = transfer(hosts, size, hashing=False, fresh=fresh, connections=conns,
                                       mac_key=mac_key if with_mac else None, digest=digested)
            times[name].append(seconds)
    out = {}
    for name, label, *_how in chosen:
        seconds = statistics.median(times[name])
        out[name] = {"seconds": seconds, "Bps": size / seconds, "Bps_all": [size / t for t in times[name]]}
        print(f"baseline TCP copy ({label + ')':<33} {size / seconds / 1e6:6.0f} MB/s (median of {runs}: "
              + ", ".join(f"{size / t / 1e6:.0f}" for t in times[name]) + ")")
    return out


def cpu_sweep(hosts: NetnsHosts, workdir: str, key: str | None, args, arms: list, counts: list,
              size: int) -> dict:
    """Issue 13 item 3's note on what ``--parallel 2`` gains with more cores: with the bench
    and everything it starts (agents, guests, plain copies) restricted to the first ``n``
    CPUs of its affinity for each ``n`` in ``counts`` (inherited: the agents of each count
    are started under it), each arm's round 0 over one connection and over two, and the
    plain copy into fresh memory over one and two connections (with a MAC on the keyed arm),
    ``--repeat`` times each, interleaved.  Medians; the affinity is restored afterwards.
    ``{str(n): {arm: {...}}}``; a count above the CPUs available is skipped (said so)."""
    allowed = sorted(os.sched_getaffinity(0))
    out: dict = {}
    for n in counts:
        if n > len(allowed):
            print(f"cpu sweep: {n} CPUs asked, {len(allowed)} available to this process: skipped")
            continue
        cpus = set(allowed[:n])
        os.sched_setaffinity(0, cpus)
        pair = None
        try:
            row = out[str(n)] = {}
            for sec in arms:
                mac_key = os.urandom(32) if sec == "key" else None
                pair = pair_for(pair, hosts, workdir, sec, key, args, f"{sec}-cpus{n}")
                runs: dict = {"one": [], "two": [], "copy_one": [], "copy_two": []}
                for _ in range(args.repeat):
                    runs["one"].append(pair.full.run(**LINKS[0])["round0_Bps"])
                    runs["two"].append(pair.full.run(**LINKS[1])["round0_Bps"])
                    for name, conns in (("copy_one", 1), ("copy_two", 2)):
                        prewarm(PREWARM_BYTES)
                        _s, _g, seconds = transfer(hosts, size, hashing=False, fresh=True, connections=conns,
                                                   mac_key=mac_key)
                        runs[name].append(size / seconds)
                med = {k: statistics.median(v) for k, v in runs.items()}
                # what the agents really run on (inherited from this process when started)
                agent_cpus = sorted(set().union(*(os.sched_getaffinity(a["proc"].pid) for a in pair.agents)))
                row[sec] = {"cpus": sorted(cpus), "agent_cpus": agent_cpus, **{f"{k}_Bps": v for k, v in med.items()},
                            **{f"{k}_Bps_all": v for k, v in runs.items()},
                            "parallel2_over_single": med["two"] / med["one"],
                            "copy_2conn_over_one": med["copy_two"] / med["copy_one"]}
                print(f"INFO {n} CPU(s), {sec:<4} agents: round 0 one connection {med['one'] / 1e6:.0f} MB/s, "
                      f"--parallel 2 {med['two'] / 1e6:.0f} MB/s = {med['two'] / med['one']:.2f}; plain copy"
                      f"{' with a MAC' if mac_key else ''} over one / two connections {med['copy_one'] / 1e6:.0f} / "
                      f"{med['copy_two'] / 1e6:.0f} MB/s = {med['copy_two'] / med['copy_one']:.2f} "
                      f"(median of {args.repeat})")
        finally:
            if pair is not None:
                pair.stop()
            os.sched_setaffinity(0, set(allowed))
    return out


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1G", help="guest RAM and baseline copy size (default 1G)")
    p.add_argument("--empty-size", default="8G", help="the mostly-empty guest (default 8G); 0 skips it")
    p.add_argument("--workload", default="hotcold")
    p.add_argument("--empty-workload", default="idle",
                   help="workload of the mostly-empty guest (default idle: it writes only its ledger)")
    p.add_argument("--rate", default="1gbit", help="shaped link rate, tc syntax (default 1gbit)")
    p.add_argument("--security", choices=["key", "none", "both"], default="key",
                   help="agents with a shared key (default), --insecure, or both: a keyed and an unkeyed pair "
                        "taking turns, for the keyed / unkeyed ratio")
    p.add_argument("--repeat", type=int, default=3, help="unshaped runs per link setting; the median is reported")
    p.add_argument("--postcopy-runs", type=int, default=3,
                   help="pure post-copy migrations per pair for the fault round trip (default 3; 0 skips them)")
    p.add_argument("--postcopy-rate", type=int, default=5000, help="pages/s the post-copy guest writes (default 5000)")
    p.add_argument("--tls-postcopy-runs", type=int, default=0,
                   help="also this many pure post-copy migrations between TLS agents (certificates made with the "
                        "openssl command): their fault round trip, on the sealed urgent connection (default 0: not run)")
    p.add_argument("--postcopy-bandwidths", metavar="CAPS", default="",
                   help="e.g. 1G,600M: also --postcopy-runs rounds of post-copy migrations on the first arm's pair, "
                        "uncapped and with each --postcopy-bandwidth in CAPS interleaved: the push rate against the "
                        "fault round trip (default: not run)")
    p.add_argument("--fault-sched", choices=list(FAULT_SCHEDS), default="default",
                   help="the post-copy runs' --fault-sched (default: vmem's default; fifo: SCHED_FIFO fault threads, "
                        "whose trade -- a lower p99, a higher p50 -- docs/postcopy.md describes)")
    p.add_argument("--fault-cpu", type=int, metavar="CPU",
                   help="the post-copy runs' --fault-cpu: both agents' fault threads pinned to CPU (default: not "
                        "pinned). Here both test hosts share this machine's CPUs, so with --fault-sched fifo the "
                        "whole round trip stays on that CPU (docs/postcopy.md)")
    p.add_argument("--floor-samples", type=int, default=2500,
                   help="plain page round trips per floor measurement (default 2500; see --floor-runs)")
    p.add_argument("--floor-runs", type=int, default=5,
                   help="floor measurements during a plain copy (default 5; the median is reported); with "
                        "--postcopy-runs > 0 the fault round trip is compared with a plain TCP page round trip "
                        "between the same hosts, on the idle link and during a plain copy")
    p.add_argument("--baseline-runs", type=int, default=3,
                   help="runs of each plain copy (default 3, interleaved; the median is the baseline)")
    p.add_argument("--cpu-sweep", metavar="COUNTS", default="",
                   help="e.g. 1,2: also run round 0 over one and two connections, and the plain copies, with "
                        "everything restricted to that many CPUs, for each count (item 3's note on what "
                        "--parallel 2 gains with more cores; default: not run)")
    p.add_argument("--no-shaped", action="store_true", help="skip the shaped-link part")
    p.add_argument("--prealloc", action="store_true",
                   help="every migration with --prealloc (the destination allocates the guest's RAM before READY); "
                        "round 0 is then also reported with the allocation's time added")
    p.add_argument("--no-prewarm", action="store_true",
                   help="do not touch and free 2.5x --size of fresh memory before each timed transfer "
                        "(baselines and migrations alike; vmem.bench.prewarm says why it is done)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = p.parse_args()
    try:  # a mistyped cap fails here, not after the minutes of benchmark before it
        for cap in filter(None, (c.strip() for c in args.postcopy_bandwidths.split(","))):
            bandwidth_from_arg(cap, "--postcopy-bandwidths")
    except ConfigError as err:
        p.error(str(err))
    global PREWARM_BYTES
    if args.prealloc:
        COMMON_OPTIONS["prealloc"] = True
    why = netns_unavailable()
    if why:
        print(f"bench_agent: cannot make test hosts: {why}", file=sys.stderr)
        return 2
    from transport.codec import method_unavailable

    links = [o for o in LINKS if o["compress"] not in ("zstd", "lz4") or not method_unavailable(o["compress"])]
    size = parse_size(args.size)
    PREWARM_BYTES = 0 if args.no_prewarm else prewarm_bytes_for(size)
    rate_Bps = parse_rate(args.rate)
    arms = ["key", "none"] if args.security == "both" else [args.security]
    workdir = tempfile.mkdtemp(prefix=f"vmem-bench-agent-{os.getpid()}-")
    key = None
    if "key" in arms:
        from transport.secure import generate_key

        key = os.path.join(workdir, "key")
        generate_key(key)
    # SIGTERM (timeout(1), a CI job cancelled, kill) unwinds like Ctrl-C, through the
    # `finally` below that removes the test hosts: killed outright, a run left its network
    # namespaces and key directory behind.
    signal.signal(signal.SIGTERM, _interrupt)
    hosts = NetnsHosts(prefix=f"vb{os.getpid()}")
    pair = None
    goals = Goals()
    result: dict = {"size_bytes": size, "workload": args.workload, "security": args.security, "shaped_rate": args.rate,
                    "prewarm_bytes": PREWARM_BYTES, "provenance": provenance.collect()}
    print(provenance.summary_line(result["provenance"]), flush=True)
    try:
        hosts.up()
        # Timed without hashing (sha256 on both ends would slow the baseline and flatter
        # the ratios); the tests check that such copies arrive intact.  The baseline
        # is the copy placed into fresh memory (recv + pwrite into a new memfd), which a
        # destination cannot avoid; the touched-buffer copy is reported beside it.  The
        # floors of the other goals are the same fresh copy over two connections, and with
        # a MAC on each connection (what a keyed link must add, without anything of vmem's).
        baselines = plain_copies(hosts, size, "key" in arms, max(1, args.baseline_runs))
        result.update(baselines)
        base_Bps, fresh_Bps = baselines["baseline"]["Bps"], baselines["baseline_fresh"]["Bps"]

        runs: dict = {sec: {i: [] for i in range(len(links))} for sec in arms}
        paired_copy_Bps: list[float] = []  # the plain fresh copy again in each repeat: the goal's pairs
        for rep in range(args.repeat):  # interleaved, so that a noisy moment hits every setting (and arm)
            paired_copy_Bps.append(paired_copy(hosts, size))
            for sec in arms:
                pair = pair_for(pair, hosts, workdir, sec, key, args, f"{sec}{rep}")
                for i, options in enumerate(links):
                    runs[sec][i].append(pair.full.run(**options))
        result["baseline_fresh_paired"] = {"Bps_all": paired_copy_Bps}
        result["arms"] = {}
        for sec in arms:
            arm = result["arms"][sec] = {"unshaped_links": []}
            for i, options in enumerate(links):
                r = sorted(runs[sec][i], key=lambda x: x["round0_Bps"])[len(runs[sec][i]) // 2]  # the median run
                r["ratio_to_baseline"] = r["round0_Bps"] / base_Bps
                r["ratio_to_fresh_baseline"] = r["round0_Bps"] / fresh_Bps
                r["round0_Bps_all"] = [x["round0_Bps"] for x in runs[sec][i]]
                arm["unshaped_links"].append(r)
                print(f"unshaped {sec:<4} {_flags(options):<26}{r['round0_Bps'] / 1e6:8.0f} MB/s round 0 = "
                      f"{r['ratio_to_baseline']:.2f}x touched / {r['ratio_to_fresh_baseline']:.2f}x fresh baseline"
                      f" (median of {args.repeat}); total {r['total_time_s']:.2f} s, "
                      f"wire {r['wire_bytes'] / 2**20:.0f} MiB, downtime {r['downtime_ms']:.1f} ms")
                if r.get("prealloc_s"):  # what round 0 no longer paid, put back for the comparison
                    r["ratio_to_fresh_baseline_with_prealloc"] = (r["round0_bytes"] / (r["round0_s"] + r["prealloc_s"])
                                                                  / fresh_Bps)
                    print(f"         {'':<4} {'':<26}with the destination's allocation ({r['prealloc_s'] * 1e3:.0f} ms) "
                          f"added: {r['ratio_to_fresh_baseline_with_prealloc']:.2f}x fresh baseline")
            single, double = arm["unshaped_links"][0], arm["unshaped_links"][1]
            arm["parallel2_over_single"] = double["round0_Bps"] / single["round0_Bps"]
            # per repeat: the two settings ran back to back in each (the goals' samples)
            arm["parallel2_over_single_all"] = [d / o for o, d in zip(single["round0_Bps_all"], double["round0_Bps_all"])]
        # the single-arm layout of earlier JSON files
        result["unshaped_links"] = result["arms"][arms[0]]["unshaped_links"]
        result["unshaped"] = result["unshaped_links"][0]
        result["parallel2_over_single"] = result["arms"][arms[0]]["parallel2_over_single"]
        if "key" in arms and "none" in arms:
            k, u = (result["arms"][s]["unshaped_links"][0]["round0_Bps"] for s in ("key", "none"))
            result["keyed_over_unkeyed"] = k / u
            ks, us = (result["arms"][s]["unshaped_links"][0]["round0_Bps_all"] for s in ("key", "none"))
            result["keyed_over_unkeyed_all"] = [a / b for a, b in zip(ks, us)]  # per repeat (interleaved)

        if args.cpu_sweep:
            if pair is not None:  # the sweep's agents start under its affinity
                pair.stop()
                pair = None
            result["cpu_sweep"] = cpu_sweep(hosts, workdir, key, args, arms,
                                            [int(c) for c in args.cpu_sweep.split(",")], size)

        if args.postcopy_runs > 0:
            result["fault_floor"] = page_round_trip_floor(hosts, args, fresh_Bps, args.floor_samples,
                                                          max(1, args.floor_runs))
            for sec in arms:
                pair = pair_for(pair, hosts, workdir, sec, key, args, f"{sec}-pc")
                result["arms"][sec]["postcopy"] = postcopy_faults(pair, hosts, args, args.postcopy_runs)
            if args.postcopy_bandwidths:
                pair = pair_for(pair, hosts, workdir, arms[0], key, args, f"{arms[0]}-pcbw")
                result["postcopy_tradeoff"] = postcopy_tradeoff(
                    pair, hosts, args, [c.strip() for c in args.postcopy_bandwidths.split(",") if c.strip()],
                    args.postcopy_runs)
        if args.tls_postcopy_runs > 0:
            if pair is not None:
                pair.stop()
            tls = make_tls_files(workdir, [hosts.addr(1), hosts.addr(2)])
            pair = Pair(hosts, workdir, "tls", None, args, "tls-pc", tls=tls)
            result["tls_postcopy"] = postcopy_faults(pair, hosts, args, args.tls_postcopy_runs)

        # the rest with the first arm's pair (the default, keyed, between hosts)
        pair = pair_for(pair, hosts, workdir, arms[0], key, args, f"{arms[0]}-rest")
        full = pair.full
        empty = None
        if args.empty_size != "0":
            empty = PingPong(hosts, pair.agents, "empty")
            result["zero_pages"] = {"empty_size": args.empty_size, "empty_workload": args.empty_workload,
                                    "unshaped": compare_empty(empty, full, args)}

        if not args.no_shaped:
            hosts.shape(args.rate)
            time.sleep(0.5)
            result["shaped_links"] = []
            for options in [o for o in links if o["parallel"] == 1]:
                r = full.run(**options)
                r["ratio_to_rate"] = r["round0_Bps"] / rate_Bps
                result["shaped_links"].append(r)
                print(f"shaped {args.rate} {_flags(options):<20}{r['round0_Bps'] * 8 / 1e9:8.3f} Gbit/s round 0 = "
                      f"{r['ratio_to_rate']:.2f}x the rate; total {r['total_time_s']:.2f} s, wire "
                      f"{r['wire_bytes'] / 2**20:.0f} MiB")
            result["shaped"] = result["shaped_links"][0]
            if empty is not None:
                result["zero_pages"]["shaped"] = compare_empty(empty, full, args, f"shaped {args.rate}")

        for sec in arms:
            arm = result["arms"][sec]
            # Samples: each repeat's round 0 over the plain copy made in the same repeat (so
            # the interval carries the copy's spread too, not only vmem's), and each repeat's
            # pair of settings.  The goal's figure is the median of those pairs.
            paired = [x / c for x, c in zip(arm["unshaped_links"][0]["round0_Bps_all"], paired_copy_Bps)]
            arm["round0_over_paired_copy_all"] = paired
            goals.check(f"{sec} agents", "round 0, one connection / plain TCP copy into fresh memory (paired per repeat)",
                        statistics.median(paired), ">=", ROUND0_OVER_FRESH_COPY, samples=paired)
            goals.check(f"{sec} agents", "round 0, --parallel 2 / one connection", arm["parallel2_over_single"],
                        ">=", PARALLEL2_OVER_ONE, samples=arm["parallel2_over_single_all"])
            # The floors: the same plain copy with what this link must add and nothing of
            # vmem's (a MAC on both ends when keyed), over one connection and over two.
            tag = "_keyed" if sec == "key" else ""
            one, two = result[f"baseline_fresh{tag}"]["Bps"], result[f"baseline_fresh{tag}_2conn"]["Bps"]
            r0 = arm["unshaped_links"][0]["round0_Bps"]
            arm["floor"] = {"copy_Bps": one, "copy_2conn_Bps": two, "round0_over_copy": r0 / one,
                            "copy_2conn_over_one": two / one,
                            "parallel2_over_copy_2conn": arm["unshaped_links"][1]["round0_Bps"] / two}
            what = "with a MAC on both ends" if sec == "key" else "(the baseline)"
            print(f"INFO {sec} agents: round 0 / a plain copy into fresh memory {what}: "
                  f"{r0 / 1e6:.0f} / {one / 1e6:.0f} MB/s = {r0 / one:.2f}; --parallel 2 / one connection "
                  f"{arm['parallel2_over_single']:.2f} where the plain copy's two connections / one are "
                  f"{two / 1e6:.0f} / {one / 1e6:.0f} MB/s = {two / one:.2f}")
            # What verification costs on its own: the same copy digesting every page it placed.
            digested = result[f"baseline_fresh{tag}_digest"]["Bps"]
            arm["floor"] |= {"copy_digest_Bps": digested, "round0_over_copy_digest": r0 / digested,
                             "copy_digest_over_copy": digested / one}
            print(f"INFO {sec} agents: round 0 / the same copy digesting every page it placed (vmem's destination "
                  f"does): {r0 / 1e6:.0f} / {digested / 1e6:.0f} MB/s = {r0 / digested:.2f}; the digest alone costs "
                  f"the copy {1 - digested / one:.0%}")
        if "keyed_over_unkeyed" in result:
            goals.check("keyed vs unkeyed agents", "round 0 throughput, keyed / unkeyed", result["keyed_over_unkeyed"],
                        ">=", KEYED_OVER_UNKEYED, samples=result["keyed_over_unkeyed_all"])
        if "key" in arms and args.postcopy_runs > 0:
            pc = result["arms"]["key"]["postcopy"]
            tuned = fault_options(args) != {"fault_sched": "default"}
            who = f"keyed agents ({fault_flags(args)})" if tuned else "keyed agents"
            goals.check(who, "post-copy fault round trip p50", pc["p50_us"], "<=", KEYED_FAULT_P50_US, "us",
                        samples=[r["p50_us"] for r in pc["runs"]])
            goals.check(who, "post-copy fault round trip p99", pc["p99_us"], "<=", KEYED_FAULT_P99_US, "us",
                        samples=[r["p99_us"] for r in pc["runs"]])
            floor = result.get("fault_floor")
            if floor and pc["p99_us"]:
                # The floor the note names: a plain request/response between the same hosts
                # while a plain copy keeps the CPUs busy (docs/performance.md).
                print(f"INFO keyed fault round trip p99 {pc['p99_us']} us / a plain TCP page round trip's p99 during a "
                      f"plain copy {floor['loaded']['p99_us']} us = {pc['p99_us'] / floor['loaded']['p99_us']:.2f}; "
                      f"p50 {pc['p50_us']} us / {floor['loaded']['p50_us']} us")
                if floor.get("placer", {}).get("p99_us"):
                    print(f"INFO same / the plain round trip's p99 during a plain copy and 1 MiB pwrites on host 2 (the "
                          f"push's placer stood in) {floor['placer']['p99_us']} us = "
                          f"{pc['p99_us'] / floor['placer']['p99_us']:.2f}")
        result["goals"] = goals.items
        print(goals.summary())
    finally:
        if pair is not None:
            pair.stop()
        hosts.down()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return goals.exit_status(args.strict)


if __name__ == "__main__":
    sys.exit(main())
