#!/usr/bin/env python3
"""Benchmark: agent-to-agent live migration between two test hosts vs a plain TCP copy.

Brings up two network namespaces (scripts/testhosts.sh, a unique prefix, torn down at the
end whatever happens), starts ``vmem agent`` in each, and measures in the same run:

1. **baseline**: a plain Python TCP copy of the guest's size from host 1 to host 2
   (transport.tcp, one connection, no framing), on the unshaped veth;
2. **unshaped**: a guest of that size migrated host 1 -> host 2 by the agents; the ratio is
   round-0 throughput (bytes on the wire / round time) over the baseline's throughput;
3. **shaped**: the link shaped with tc HTB to ``--rate`` and the guest migrated back host 2
   -> host 1; the ratio is round-0 throughput over the shaped rate.

Timing claims are ratios against a baseline measured in the same run, never absolute.

    sudo .venv/bin/python scripts/bench_agent.py [--size 1G] [--rate 1gbit] [--security key|none] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from testhosts import NetnsHosts, netns_unavailable, transfer  # noqa: E402

from transport import parse_rate  # noqa: E402
from vmem.agent.client import AgentClient  # noqa: E402
from vmem.ram import parse_size  # noqa: E402

START_TIMEOUT_S = 60.0


def start_agent(hosts: NetnsHosts, host: int, workdir: str, key: str | None) -> dict:
    state = os.path.join(workdir, f"h{host}")
    argv = [sys.executable, "-m", "vmem", "agent", "--listen", f"{hosts.addr(host)}:0", "--state-dir", state]
    if key:
        argv += ["--key", key]
    else:
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


def migrate(src: dict, dst_addr: str, name: str) -> dict:
    with AgentClient(src["socket"]) as c:
        report = c.request("migrate", name=name, target=dst_addr, options={"observe": 0.0})["report"]
    if report["outcome"] != "completed":
        raise SystemExit(f"migration failed: {report['reason']}")
    r0 = report["rounds"][0]
    return {
        "total_time_s": report["total_time_s"],
        "downtime_ms": report["downtime_ms"],
        "rounds": len(report["rounds"]),
        "bytes_sent": report["bytes_sent"],
        "round0_bytes": r0["bytes_sent"],
        "round0_s": r0["duration_s"],
        "round0_Bps": r0["bytes_sent"] / r0["duration_s"],
        "digests_mismatched": report["verification"]["digests"]["mismatched"],
        "guest_check_ok": report["verification"]["guest_check"]["ok"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1G", help="guest RAM and baseline copy size (default 1G)")
    p.add_argument("--workload", default="hotcold")
    p.add_argument("--rate", default="1gbit", help="shaped link rate, tc syntax (default 1gbit)")
    p.add_argument("--security", choices=["key", "none"], default="key", help="agents with a shared key (default) or --insecure")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = p.parse_args()
    why = netns_unavailable()
    if why:
        print(f"bench_agent: cannot make test hosts: {why}", file=sys.stderr)
        return 2
    size = parse_size(args.size)
    rate_Bps = parse_rate(args.rate)
    workdir = tempfile.mkdtemp(prefix=f"vmem-bench-agent-{os.getpid()}-")
    key = None
    if args.security == "key":
        from transport.secure import generate_key

        key = os.path.join(workdir, "key")
        generate_key(key)
    hosts = NetnsHosts(prefix=f"vb{os.getpid()}")
    agents = []
    result: dict = {"size_bytes": size, "workload": args.workload, "security": args.security, "shaped_rate": args.rate}
    try:
        hosts.up()
        sent, got, seconds = transfer(hosts, size)
        assert sent == got, "baseline copy corrupted data"
        result["baseline"] = {"seconds": seconds, "Bps": size / seconds}
        print(f"baseline TCP copy    {size / seconds / 1e6:8.0f} MB/s ({seconds:.2f} s for {args.size})")

        agents = [start_agent(hosts, 1, workdir, key), start_agent(hosts, 2, workdir, key)]
        with AgentClient(agents[0]["socket"]) as c:
            c.request("create", name="bench", workload=args.workload, size=args.size)
        time.sleep(1.0)
        un = migrate(agents[0], f"{hosts.addr(2)}:{agents[1]['port']}", "bench")
        un["ratio_to_baseline"] = un["round0_Bps"] / result["baseline"]["Bps"]
        result["unshaped"] = un
        print(f"agent migration      {un['round0_Bps'] / 1e6:8.0f} MB/s round 0 = {un['ratio_to_baseline']:.2f}x baseline; "
              f"total {un['total_time_s']:.2f} s, downtime {un['downtime_ms']:.1f} ms, {un['rounds']} rounds")

        hosts.shape(args.rate)
        time.sleep(0.5)
        sh = migrate(agents[1], f"{hosts.addr(1)}:{agents[0]['port']}", "bench")
        sh["ratio_to_rate"] = sh["round0_Bps"] / rate_Bps
        result["shaped"] = sh
        print(f"shaped {args.rate:<8}       {sh['round0_Bps'] * 8 / 1e9:8.3f} Gbit/s round 0 = {sh['ratio_to_rate']:.2f}x the rate; "
              f"total {sh['total_time_s']:.2f} s, downtime {sh['downtime_ms']:.1f} ms, {sh['rounds']} rounds")
    finally:
        for a in agents:
            if a["proc"].poll() is None:
                a["proc"].send_signal(signal.SIGTERM)
        for a in agents:
            try:
                a["proc"].wait(30)
            except subprocess.TimeoutExpired:
                pass
        hosts.down()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
