#!/usr/bin/env python3
"""How much memory hostile connections cost a `vmem agent`, and whether it comes back.

Starts a root agent in its default configuration (no key, loopback, a private state
directory), boots one small guest, warms up, then for each flood opens N connections and
holds them while sampling the agent's RssAnon (/proc/PID/status), closes them, waits for
the agent to have no connection left and samples again:

* ``big``      the 8-byte opening magic and a frame length of 16 MiB, then 64 KiB of it;
* ``loris``    one byte of the opening, then nothing (slow-loris);
* ``request``  a good ``migrate-in`` opening, then a request announcing 16 MiB;
* ``nobody``   ``big`` and ``loris`` sent by uid 65534 (``setpriv``), refused by uid.

At the end the guest must still verify and the agent must hold exactly the descriptors it
held before.  Loopback only; every process started here is reaped.

    sudo .venv/bin/python scripts/bench_agent_hostile.py --connections 200 [--json out.json]
    # the issue's bound: peak - baseline <= 16 MiB, after - baseline <= 4 MiB
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MiB = 1 << 20
MAGIC = b"VMEMAGT\n"

NOBODY_FLOOD = r"""
import socket, struct, sys, time
port, kind, count, hold_s = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
socks = []
for _ in range(count):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"VMEMAGT\n" + struct.pack(">I", 16 << 20) + bytes(65536) if kind == "big" else b"V")
        socks.append(s)
    except OSError:
        pass
print("open", flush=True)
sys.stdin.readline()
for s in socks:
    s.close()
"""


def _kib_field_bytes(path: str, field: str) -> int:
    """The ``field:  N kB`` line of a /proc file, in bytes."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in {path}")


def rss_anon_bytes(pid: int) -> int:
    """RssAnon (/proc/PID/status): the figure the issue's bounds are stated in."""
    return _kib_field_bytes(f"/proc/{pid}/status", "RssAnon")


def anonymous_bytes(pid: int) -> int:
    """Anonymous memory counted page by page (/proc/PID/smaps_rollup): exact, where RssAnon
    is the kernel's per-CPU running count and may lag by a few hundred KiB."""
    return _kib_field_bytes(f"/proc/{pid}/smaps_rollup", "Anonymous")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def frame(obj: dict) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def open_flood(port: int, kind: str, count: int) -> list[socket.socket]:
    """Open ``count`` hostile connections of ``kind`` to 127.0.0.1:``port`` (kept open; the
    caller closes them). ``big``: an opening announcing a 16 MiB frame, then 64 KiB of it;
    ``loris``: the first byte of an opening; ``request``: a good opening, then a migrate-in
    request announcing 16 MiB.  Also used by tests/test_agent_security.py."""
    socks = []
    for _ in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            continue
        try:
            if kind == "big":
                s.sendall(MAGIC + struct.pack(">I", 16 * MiB) + bytes(64 << 10))
            elif kind == "loris":
                s.sendall(MAGIC[:1])
            else:
                s.sendall(MAGIC + frame({"version": 1, "purpose": "migrate-in"}) + struct.pack(">I", 16 * MiB)
                          + bytes(64 << 10))
        except OSError:
            pass
        socks.append(s)
    return socks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=200, help="hostile connections per flood (default 200)")
    ap.add_argument("--hold", type=float, default=2.0, help="seconds each flood is held open (default 2)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds to wait after closing before sampling")
    ap.add_argument("--agent-arg", action="append", default=[], help="extra `vmem agent` argument (repeatable)")
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (the nobody flood uses setpriv)", file=sys.stderr)
        return 2

    from vmem.agent.client import AgentClient

    workdir = tempfile.mkdtemp(prefix=f"vmem-hostile-{os.getpid()}-")
    state = os.path.join(workdir, "agent")
    env = dict(os.environ, PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    log = open(os.path.join(workdir, "agent.log"), "wb")
    agent = subprocess.Popen([sys.executable, "-m", "vmem", "agent", "--listen", "127.0.0.1:0", "--state-dir", state, "--stop-guests",
                              *args.agent_arg], stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=ROOT)
    results = {"connections": args.connections, "agent_args": args.agent_arg, "floods": {}}
    try:
        info_path = os.path.join(state, "agent.json")
        for _ in range(600):
            if os.path.exists(info_path) or agent.poll() is not None:
                break
            time.sleep(0.05)
        with open(info_path) as f:
            info = json.load(f)
        port, sock_path, pid = info["port"], info["socket"], agent.pid

        def request(op: str, **fields) -> dict:
            with AgentClient(sock_path) as c:
                return c.request(op, **fields)

        def wait_idle() -> None:
            for _ in range(600):
                if request("ping")["agent"]["connections"]["open"] <= 1:
                    return
                time.sleep(0.05)
            raise RuntimeError("the agent still holds connections")

        request("create", name="g", workload="idle", size="16M")
        for kind in ("big", "loris", "request"):  # warm-up: first-use allocations are not growth
            for s in open_flood(port, kind, 8):
                s.close()
        wait_idle()
        time.sleep(args.settle)
        fds_base = fd_count(pid)
        baseline = rss_anon_bytes(pid)
        results["baseline_bytes"] = baseline
        print(f"agent pid {pid}: RssAnon baseline {baseline / MiB:.1f} MiB, {fds_base} fds")
        for kind in ("big", "loris", "request", "nobody-big", "nobody-loris"):
            before = rss_anon_bytes(pid)
            peak = before
            exact_base = exact_peak = anonymous_bytes(pid)
            helper = None
            socks: list = []
            try:
                if kind.startswith("nobody-"):
                    helper = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                               sys.executable, "-c", NOBODY_FLOOD, str(port), kind[7:],
                                               str(args.connections), str(args.hold)],
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
                    helper.stdout.readline()
                else:
                    socks = open_flood(port, kind, args.connections)
                t_end = time.monotonic() + args.hold  # the hold starts once every connection is open
                while time.monotonic() < t_end:
                    peak = max(peak, rss_anon_bytes(pid))
                    exact_peak = max(exact_peak, anonymous_bytes(pid))
                    time.sleep(0.05)
            finally:
                for s in socks:
                    s.close()
                if helper is not None:
                    helper.communicate("\n", timeout=60)
            wait_idle()
            time.sleep(args.settle)
            after = rss_anon_bytes(pid)
            exact_after = anonymous_bytes(pid)
            row = {"before_bytes": before, "peak_bytes": peak, "after_bytes": after,
                   "peak_rise_bytes": peak - baseline, "after_rise_bytes": after - baseline,
                   "smaps_anonymous_before_bytes": exact_base, "smaps_anonymous_peak_bytes": exact_peak,
                   "smaps_anonymous_after_bytes": exact_after}
            results["floods"][kind] = row
            print(f"{kind:>13}: {args.connections} connections  peak {peak / MiB:6.1f} MiB (+{(peak - baseline) / MiB:.1f})"
                  f"  after {after / MiB:6.1f} MiB (+{(after - baseline) / MiB:.1f});  smaps Anonymous "
                  f"{exact_base / MiB:.1f} -> peak {exact_peak / MiB:.1f} -> {exact_after / MiB:.1f} MiB")
        check = request("verify", name="g")["check"]
        wait_idle()
        results["guest_verified"] = bool(check.get("ok"))
        for _ in range(100):  # the last request's connection may still be closing on the agent's side
            if fd_count(pid) == fds_base:
                break
            time.sleep(0.1)
        results["fds_before"], results["fds_after"] = fds_base, fd_count(pid)
        worst_peak = max(r["peak_rise_bytes"] for r in results["floods"].values())
        worst_after = max(r["after_rise_bytes"] for r in results["floods"].values())
        results["ok"] = (worst_peak <= 16 * MiB and worst_after <= 4 * MiB and results["guest_verified"]
                         and results["fds_after"] == fds_base)
        print(f"worst rise: peak +{worst_peak / MiB:.1f} MiB (bound 16), after +{worst_after / MiB:.1f} MiB (bound 4); "
              f"guest verified: {results['guest_verified']}; fds {fds_base} -> {results['fds_after']}: "
              f"{'OK' if results['ok'] else 'FAILED'}")
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if results.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
