#!/usr/bin/env python3
"""Soak: many ping-pong migrations between two agents, watching that nothing grows.

Two test hosts (network namespaces), one keyed ``vmem agent`` in each, one busy guest
(``hotcold``) migrated back and forth ``--migrations`` times in mixed modes (pre-copy,
post-copy, hybrid: a seeded random draw).  After every ``--every`` migrations it records,
for each agent, its private memory (``RssAnon``), open descriptors and threads, and has the
guest check its whole RAM against its own ledger (``vmem verify``).  Every migration must
complete verified.

Plateau rule (the verdict): over the last ``--window`` migrations (default 500; at most
half the run), no agent's RssAnon -- sampled once it serves no connection (what it keeps,
not a migration's buffers on their way out) -- high-water mark rises more than ``--rss-budget`` (2 MiB)
above its high-water mark before the window (RssAnon swings by a few MiB with the
allocator's caches; a leak keeps raising the peak), and its descriptors and threads end no
higher than at the window's start (+2: a connection closing as the sample is taken; compared
between samples where the agent held the guest alike, since holding it costs descriptors).  Exit status 0 only if the rule holds, every
migration completed verified, every guest check passed and no leak was found
(scripts/campaign.py's leak scan).

    sudo .venv/bin/python scripts/soak.py --migrations 1000 --json soak.json
    sudo .venv/bin/python scripts/soak.py --migrations 100 --every 25 --size 16M   # ~1-2 min
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
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

_spec = importlib.util.spec_from_file_location("vmem_campaign", os.path.join(ROOT, "scripts", "campaign.py"))
campaign = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("vmem_campaign", campaign)
_spec.loader.exec_module(campaign)

MIB = 1 << 20
#: Before a sample: how long the agent must have had no connection but ours (the accept loop
#: hands freed heap back with malloc_trim once the last one closed, within 0.25 s).
QUIET_S = 0.6
#: Slack for descriptors and threads at a sample (a connection may be closing right then).
COUNT_SLACK = 2


def wait_quiet(agent, timeout_s: float = 10.0) -> None:
    """Wait until ``agent`` serves no connection but this probe's, then ``QUIET_S`` more:
    a sample then measures what the agent keeps, not a migration's buffers on their way out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if agent.request("ping")["agent"]["connections"]["open"] <= 1:
                break
        except campaign.AgentError:
            pass
        time.sleep(0.1)
    time.sleep(QUIET_S)


def agent_counters(agent, holds_guest: bool) -> dict:
    """``{"rss_anon_bytes", "fds", "threads", "holds_guest"}`` of an agent process (None where unreadable)."""
    out = {"rss_anon_bytes": agent.rss_bytes(), "fds": None, "threads": None, "holds_guest": holds_guest}
    pid = agent.pid
    if pid is None:
        return out
    try:
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
    except OSError:
        pass
    return out


def plateau(samples: list[dict], window: int, rss_budget_bytes: int) -> dict:
    """Judge the plateau rule over the last ``window`` migrations of ``samples``.

    ``samples``: ``{"after": migrations done, "agents": {name: agent_counters()}}`` in order.
    Returns ``{"ok", "window", "from", "per_agent": {name: {...}}, "problems": [...]}``.
    """
    end = samples[-1]["after"]
    base = next((s for s in samples if s["after"] >= end - window), samples[0])
    before = [s for s in samples if s["after"] <= base["after"]]
    inside = [s for s in samples if s["after"] > base["after"]] or [base]
    out = {"ok": True, "window": end - base["after"], "from": base["after"], "per_agent": {}, "problems": []}
    for name in base["agents"]:
        def peak(group):
            vals = [s["agents"][name]["rss_anon_bytes"] for s in group if s["agents"][name]["rss_anon_bytes"] is not None]
            return max(vals) if vals else None

        peak_before, peak_inside = peak(before), peak(inside)
        growth = peak_inside - peak_before if peak_before is not None and peak_inside is not None else None
        first, last = base["agents"][name]["rss_anon_bytes"], inside[-1]["agents"][name]["rss_anon_bytes"]
        row = {"rss_anon_mib_peak_before": _mib(peak_before), "rss_anon_mib_peak_in_window": _mib(peak_inside),
               "rss_anon_growth_mib": _mib(growth),
               # for information (one sample each end: swings with the allocator's caches)
               "rss_anon_mib_window_start_end": [_mib(first), _mib(last)]}
        if growth is None:
            out["problems"].append(f"{name}: RssAnon unreadable")
        elif growth > rss_budget_bytes:
            out["problems"].append(f"{name}: RssAnon peak rose {growth / MIB:.1f} MiB over the last {out['window']} "
                                   f"migrations (budget {rss_budget_bytes / MIB:g} MiB)")
        window_samples = [base] + [s for s in inside if s is not base]
        for what in ("fds", "threads"):
            pairs = []
            for holds in (True, False):
                same = [s["agents"][name][what] for s in window_samples if s["agents"][name]["holds_guest"] == holds]
                if same:
                    pairs.append((holds, same[0], same[-1]))
                    if None in (same[0], same[-1]) or same[-1] > same[0] + COUNT_SLACK:
                        out["problems"].append(f"{name}: {what} {same[0]} -> {same[-1]} over the last {out['window']} "
                                               f"migrations (samples where it {'held' if holds else 'did not hold'} "
                                               "the guest)")
            row[what] = {("holding" if h else "not holding"): [a, b] for h, a, b in pairs}
        out["per_agent"][name] = row
    out["ok"] = not out["problems"]
    return out


def theil_sen_slope(xs: list[float], ys: list[float]) -> float | None:
    """The median of the pairwise slopes (ys per xs): robust to a few outlying samples."""
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs))
              if xs[j] != xs[i]]
    if not slopes:
        return None
    slopes.sort()
    mid = len(slopes) // 2
    return slopes[mid] if len(slopes) % 2 else (slopes[mid - 1] + slopes[mid]) / 2


def rss_slope(samples: list[dict], since: int) -> dict:
    """``{agent: RssAnon growth in MiB per 100 migrations}`` over the samples taken after
    ``since`` migrations or later (Theil-Sen; None with fewer than two samples).  One sample
    caught mid-swing moves the median slope little; a leak moves every pairwise slope."""
    group = [s for s in samples if s["after"] >= since]
    out = {}
    for name in (group[0]["agents"] if group else {}):
        pts = [(s["after"], s["agents"][name]["rss_anon_bytes"]) for s in group
               if s["agents"][name]["rss_anon_bytes"] is not None]
        slope = theil_sen_slope([p[0] for p in pts], [p[1] for p in pts]) if len(pts) >= 2 else None
        out[name] = None if slope is None else round(slope * 100 / MIB, 3)
    return out


def _mib(v):
    return None if v is None else round(v / MIB, 2)


def run_soak(hosts, workdir: str, *, migrations: int, every: int, window: int, size: str, rate: int,
             modes: tuple, seed: int, rss_budget_bytes: int, log=print) -> dict:
    """The soak on ``hosts`` (tests/testhosts.py's NetnsHosts, up); see the module docstring."""
    rng = random.Random(seed)
    camp = campaign.Campaign(hosts, workdir, size=size, rate=rate, bandwidth=None, seed=seed, log=lambda *_: None)
    result = {"migrations": 0, "completed": 0, "failed": [], "checks": [], "samples": [], "leaks": [],
              "modes": {m: 0 for m in modes}, "downtime_ms": []}
    t0 = time.monotonic()
    try:
        camp.start()
        holder, _ = camp.holder()
        for a in camp.agents:
            wait_quiet(a)
        result["samples"].append({"after": 0, "agents": {a.name: agent_counters(a, a is holder) for a in camp.agents}})
        for i in range(1, migrations + 1):
            for a in camp.agents:
                camp.wait_settled(a)
            src, _row = camp.holder()
            if src is None:
                result["failed"].append((i, "guest lost"))
                break
            mode = rng.choice(modes)
            result["modes"][mode] += 1
            reply = camp.migrate(src, camp.other(src), mode)
            result["migrations"] += 1
            report = reply.get("report") or {}
            ver = report.get("verification") or {}
            if report.get("outcome") == "completed" and report.get("verified") and (ver.get("guest_check") or {}).get("ok"):
                result["completed"] += 1
                result["downtime_ms"].append(report.get("downtime_ms"))
            else:
                result["failed"].append((i, mode, report.get("reason") or reply.get("error")))
            if i % every == 0 or i == migrations:
                for a in camp.agents:  # the destination lists the guest `incoming` until it commits
                    camp.wait_settled(a)
                holder, _ = camp.holder()
                check = {"after": i, "ok": False}
                if holder is not None:
                    try:
                        c = holder.request("verify", name=camp.guest)["check"]
                        check |= {"ok": bool(c["ok"]), "bad_pages": c["bad_pages"], "pages_checked": c["pages_checked"],
                                  "detail": c.get("detail"), "first_bad": (c.get("first_bad") or [])[:4]}
                    except campaign.AgentError as err:
                        check["error"] = err.message
                result["checks"].append(check)
                for a in camp.agents:
                    camp.wait_settled(a)
                    wait_quiet(a)
                sample = {"after": i, "agents": {a.name: agent_counters(a, a is holder) for a in camp.agents}}
                result["samples"].append(sample)
                counters = "  ".join(f"{n}: RssAnon {_mib(c['rss_anon_bytes'])} MiB, {c['fds']} fds, "
                                     f"{c['threads']} threads" for n, c in sample["agents"].items())
                log(f"[{i:5d}/{migrations}] {result['completed']} completed, {len(result['failed'])} failed, "
                    f"guest check {'ok' if check['ok'] else 'FAILED'}  {counters}  ({time.monotonic() - t0:.0f} s)")
        result["leaks"] = campaign.settle_leaks(camp.agents)
    finally:
        camp.stop()
    result["seconds"] = round(time.monotonic() - t0, 1)
    result["plateau"] = plateau(result["samples"], min(window, max(result["migrations"] // 2, 1)), rss_budget_bytes)
    # For information: the trend over the same window (the verdict is the plateau rule).
    result["rss_slope_mib_per_100"] = rss_slope(result["samples"], result["plateau"]["from"])
    downtimes = sorted(d for d in result.pop("downtime_ms") if d is not None)
    result["median_downtime_ms"] = downtimes[len(downtimes) // 2] if downtimes else None
    result["ok"] = (result["plateau"]["ok"] and result["completed"] == migrations == result["migrations"]
                    and all(c["ok"] for c in result["checks"]) and not result["leaks"])
    return result


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--migrations", type=int, default=1000, help="ping-pong migrations (default 1000)")
    p.add_argument("--every", type=int, default=50, help="sample and verify after every N migrations (default 50)")
    p.add_argument("--window", type=int, default=500,
                   help="the plateau rule looks at the last N migrations (default 500; at most half the run)")
    p.add_argument("--rss-budget", type=float, default=2.0, metavar="MIB",
                   help="RssAnon growth allowed over the window, MiB (default 2)")
    p.add_argument("--size", default="64M", help="guest RAM (default 64M)")
    p.add_argument("--rate", type=int, default=20000, help="hotcold pages written per second (default 20000)")
    p.add_argument("--modes", default=",".join(campaign.MODES), help="comma-separated subset of "
                                                                       f"{','.join(campaign.MODES)}")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--agent-logs", metavar="DIR", help="copy the agents' logs into DIR at the end (with "
                                                       "VMEM_AGENT_MEMWATCH=EVERY[:TOP] set they say where memory goes)")
    args = p.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    for m in modes:
        if m not in campaign.MODES:
            p.error(f"--modes: unknown mode {m!r} (known: {', '.join(campaign.MODES)})")
    for flag, v in (("--migrations", args.migrations), ("--every", args.every), ("--window", args.window)):
        if v < 1:
            p.error(f"{flag} must be at least 1, got {v}")

    from testhosts import NetnsHosts, netns_unavailable

    why = netns_unavailable()
    if why:
        print(f"soak: cannot make test hosts here: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = tempfile.mkdtemp(prefix=f"vmem-soak-{os.getpid()}-")
    os.chmod(workdir, 0o700)
    hosts = NetnsHosts(prefix=f"vs{os.getpid()}", subnet=251)
    print(f"soak: {args.migrations} migrations ({','.join(modes)}, seed {args.seed}), guest {args.size} hotcold "
          f"rate={args.rate}, keyed agents; sample every {args.every}", flush=True)
    rc = 1
    try:
        hosts.up()
        res = run_soak(hosts, workdir, migrations=args.migrations, every=args.every, window=args.window,
                       size=args.size, rate=args.rate, modes=modes, seed=args.seed,
                       rss_budget_bytes=int(args.rss_budget * MIB), log=lambda s: print(s, flush=True))
        pl = res["plateau"]
        print(f"soak: {res['completed']}/{res['migrations']} completed and verified in {res['seconds']} s "
              f"(median downtime {res['median_downtime_ms']} ms), guest checks "
              f"{sum(c['ok'] for c in res['checks'])}/{len(res['checks'])} ok, leaks {len(res['leaks'])}")
        for name, row in pl["per_agent"].items():
            print(f"soak: {name}: RssAnon peak {row['rss_anon_mib_peak_before']} MiB before the last {pl['window']} "
                  f"migrations, {row['rss_anon_mib_peak_in_window']} MiB in them ({row['rss_anon_growth_mib']:+}); "
                  f"at the window's start and end {row['rss_anon_mib_window_start_end']} MiB; trend "
                  f"{res['rss_slope_mib_per_100'].get(name)} MiB per 100 migrations; "
                  f"fds {row['fds']}, threads {row['threads']}")
        bad_checks = [str(c) for c in res["checks"] if not c["ok"]]
        for prob in pl["problems"] + [str(f) for f in res["failed"][:10]] + res["leaks"] + bad_checks[:10]:
            print(f"soak:   {prob}")
        print(f"soak: plateau rule {'met' if pl['ok'] else 'NOT met'}; verdict {'PASS' if res['ok'] else 'FAIL'}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res | {"args": vars(args)}, f, indent=1, default=str)
        rc = 0 if res["ok"] else 1
    except KeyboardInterrupt:
        print("soak: interrupted; tearing down", file=sys.stderr)
        rc = 130
    finally:
        hosts.down()
        if args.agent_logs:
            os.makedirs(args.agent_logs, exist_ok=True)
            for name in sorted(os.listdir(workdir)):
                if name.endswith(".log") and os.path.isfile(os.path.join(workdir, name)):
                    shutil.copy(os.path.join(workdir, name), args.agent_logs)
        shutil.rmtree(workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
