#!/usr/bin/env python3
"""Load: one agent pair, many guests, several migrations in flight at once.

Two test hosts (network namespaces), one keyed ``vmem agent`` in each; ``--guests`` small
busy guests (``hotcold``) are created on the first, then every guest is migrated to the
second and back, ``--in-flight`` migrations at a time (a thread each, over the agents'
ordinary control sockets), in mixed modes.  Every migration must complete verified, every
guest must pass its own ledger check at the end, and neither agent may leak (the
campaign's leak scan).  Exit status 0 only then.

    sudo .venv/bin/python scripts/load.py                        # 16 guests, 4 in flight, 8 MiB each
    sudo .venv/bin/python scripts/load.py --guests 32 --in-flight 8 --json load.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

_spec = importlib.util.spec_from_file_location("vmem_campaign", os.path.join(ROOT, "scripts", "campaign.py"))
campaign = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("vmem_campaign", campaign)
_spec.loader.exec_module(campaign)


def run_load(hosts, workdir: str, *, guests: int, in_flight: int, size: str, rate: int, modes: tuple, seed: int,
             log=print) -> dict:
    """The load run on ``hosts`` (tests/testhosts.py's NetnsHosts, up); see the module docstring."""
    from vmem.agent.client import AgentClient
    from vmem.agent.protocol import AgentError

    rng = random.Random(seed)
    camp = campaign.Campaign(hosts, workdir, size=size, rate=rate, bandwidth=None, seed=seed, log=lambda *_: None)
    names = [f"load{i:02d}" for i in range(guests)]
    result = {"migrations": 0, "completed": 0, "failed": [], "max_in_flight": 0, "checks_ok": 0, "leaks": []}
    lock = threading.Lock()
    state = {"in_flight": 0}

    def migrate(name: str, src, dst, mode: str) -> None:
        with lock:
            state["in_flight"] += 1
            result["max_in_flight"] = max(result["max_in_flight"], state["in_flight"])
        try:
            options = {"observe": 0} | campaign.MODE_OPTIONS[mode]
            try:
                with AgentClient(src.socket, timeout_s=30.0) as c:
                    reply = c.request("migrate", name=name, target=dst.target, options=options)
            except AgentError as err:
                reply = {"error": f"{err.code}: {err.message}"}
            report = reply.get("report") or {}
            ver = report.get("verification") or {}
            ok = (report.get("outcome") == "completed" and report.get("verified")
                  and (ver.get("guest_check") or {}).get("ok"))
            with lock:
                result["migrations"] += 1
                if ok:
                    result["completed"] += 1
                else:
                    result["failed"].append((name, mode, report.get("reason") or reply.get("error")))
        finally:
            with lock:
                state["in_flight"] -= 1

    t0 = time.monotonic()
    try:
        camp.agents[0].start()
        camp.agents[1].start()
        h1, h2 = camp.agents
        for i, name in enumerate(names):
            h1.request("create", name=name, workload="hotcold", size=size, workload_args=[f"rate={rate}"], seed=i + 1)
        log(f"load: {guests} guests of {size} on {h1.name}; migrating each to {h2.name} and back, {in_flight} at a time")
        for src, dst in ((h1, h2), (h2, h1)):
            plan = [(n, rng.choice(modes)) for n in names]
            with ThreadPoolExecutor(max_workers=in_flight) as pool:
                for f in [pool.submit(migrate, n, src, dst, m) for n, m in plan]:
                    f.result()
            log(f"load: {src.name} -> {dst.name}: {result['completed']}/{result['migrations']} completed and verified "
                f"so far ({time.monotonic() - t0:.0f} s)")
        listed = h1.guests()
        for name in names:
            if name in listed:
                try:
                    if h1.request("verify", name=name)["check"]["ok"]:
                        result["checks_ok"] += 1
                except AgentError as err:
                    result["failed"].append((name, "verify", err.message))
        result["listed_at_the_end"] = len(listed)
        result["leaks"] = campaign.settle_leaks(camp.agents)
    finally:
        camp.stop()
    result["seconds"] = round(time.monotonic() - t0, 1)
    result["ok"] = (result["completed"] == result["migrations"] == 2 * guests and result["checks_ok"] == guests
                    and not result["leaks"])
    return result


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--guests", type=int, default=16, help="guests on the first agent (default 16)")
    p.add_argument("--in-flight", type=int, default=4, help="migrations at once (default 4)")
    p.add_argument("--size", default="8M", help="guest RAM each (default 8M)")
    p.add_argument("--rate", type=int, default=2000, help="hotcold pages written per second (default 2000)")
    p.add_argument("--modes", default=",".join(campaign.MODES), help=f"subset of {','.join(campaign.MODES)}")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = p.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    for m in modes:
        if m not in campaign.MODES:
            p.error(f"--modes: unknown mode {m!r} (known: {', '.join(campaign.MODES)})")
    if args.guests < 1 or args.in_flight < 1:
        p.error("--guests and --in-flight must be at least 1")

    from testhosts import NetnsHosts, netns_unavailable

    why = netns_unavailable()
    if why:
        print(f"load: cannot make test hosts here: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = tempfile.mkdtemp(prefix=f"vmem-load-{os.getpid()}-")
    os.chmod(workdir, 0o700)
    hosts = NetnsHosts(prefix=f"vl{os.getpid()}", subnet=252)
    rc = 1
    try:
        hosts.up()
        res = run_load(hosts, workdir, guests=args.guests, in_flight=args.in_flight, size=args.size, rate=args.rate,
                       modes=modes, seed=args.seed, log=lambda s: print(s, flush=True))
        print(f"load: {res['completed']}/{res['migrations']} completed and verified in {res['seconds']} s, at most "
              f"{res['max_in_flight']} in flight; guest checks {res['checks_ok']}/{args.guests} ok; "
              f"leaks {len(res['leaks'])}; verdict {'PASS' if res['ok'] else 'FAIL'}")
        for prob in [str(f) for f in res["failed"][:10]] + res["leaks"]:
            print(f"load:   {prob}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res | {"args": vars(args)}, f, indent=1, default=str)
        rc = 0 if res["ok"] else 1
    except KeyboardInterrupt:
        print("load: interrupted; tearing down", file=sys.stderr)
        rc = 130
    finally:
        hosts.down()
        shutil.rmtree(workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
