"""Agent migrations over the full link: --parallel (StripedChannel), zero pages as a bitmap
and --compress (CompressedChannel), and post-copy between agents (the urgent connection).

Real agents on loopback (and one pair in two test-host namespaces), small guests; the
fixtures of tests/test_agent.py reap every agent, guest and temp file.
"""
from __future__ import annotations

import json
import os
import time

import pytest

from guests.memory import ledger_page_count
from test_agent import agents, key, workdir  # noqa: F401  (fixtures)
from transport.codec import method_unavailable
from vmem.agent.protocol import AgentError, ErrorCode
from vmem.pages import PAGE_SIZE


def _migrate(src, dst, name: str, **options) -> dict:
    report = src.request("migrate", name=name, target=dst.address, options={"observe": 0.2, **options})["report"]
    assert report["outcome"] == "completed", (report["reason"], src.log(), dst.log())
    v = report["verification"]
    assert v["digests"]["mismatched"] == 0 and v["guest_check"]["ok"], v
    deadline = time.monotonic() + 10  # the destination adopts the guest once its side returns
    while dst.guests()[name]["state"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dst.guests()[name]["state"] == "running" and name not in src.guests()
    return report


COMPRESS = "zstd" if not method_unavailable("zstd") else "none"


def test_parallel_and_compressed_keyed_migration_round_trip(agents, key):  # noqa: F811
    a, b = agents("a", key=key), agents("b", key=key)
    a.request("create", name="g", workload="hotcold", size="48M", workload_args=["rate=3000"])
    there = _migrate(a, b, "g", parallel=3, compress=COMPRESS)
    link = there["guest"]["link"]
    assert link["parallel"] == 3 and link["compress"] == COMPRESS and not link["urgent_connection"]
    assert link["wire_bytes"] > 0
    back = _migrate(b, a, "g", compress="off")  # and back over one plain connection
    assert back["guest"]["link"]["parallel"] == 1 and back["guest"]["link"]["zero_pages_elided"] == 0


def test_zero_pages_are_elided_by_default(agents):  # noqa: F811
    a, b = agents("a"), agents("b")
    # fill=false and idle: no data page is ever written, so the only pages that hold data
    # (round 0 sends those) are the header and the ledger, and every ledger entry is 0: the
    # whole ledger is zero pages, each of which must cross as one bit of a bitmap.
    a.request("create", name="z", workload="idle", size="64M", workload_args=["fill=false"])
    report = _migrate(a, b, "z")
    link = report["guest"]["link"]
    zero_pages = ledger_page_count((64 << 20) // PAGE_SIZE)
    assert link["compress"] == "none"
    assert link["zero_pages_elided"] == zero_pages, link
    # ... and the wire really carried less: all but one page's worth of them (the
    # framing and the bitmaps cost far less than a page)
    assert link["stream_bytes"] - link["wire_bytes"] > (zero_pages - 1) * PAGE_SIZE, link


def test_bad_link_options_are_refused_before_anything_moves(agents):  # noqa: F811
    a, b = agents("a"), agents("b")
    a.request("create", name="g", workload="idle", size="8M")
    for options, code in (({"parallel": 0}, ErrorCode.BAD_REQUEST), ({"parallel": 99}, ErrorCode.BAD_REQUEST),
                          ({"compress": "brotli"}, ErrorCode.BAD_REQUEST)):
        with pytest.raises(AgentError) as exc:
            a.request("migrate", name="g", target=b.address, options={"observe": 0, **options})
        assert exc.value.code == code, exc.value.message
    assert a.guests()["g"]["state"] == "running" and b.guests() == {}


@pytest.mark.parametrize("mode", ["pure", "hybrid"])
def test_postcopy_between_agents_uses_the_urgent_connection(agents, mode):  # noqa: F811
    a, b = agents("a"), agents("b")
    a.request("create", name="p", workload="checker", size="32M")
    flag = {"postcopy": True} if mode == "pure" else {"postcopy_after_precopy": True}
    report = _migrate(a, b, "p", **flag)
    pc = report["postcopy"]
    assert report["guest"]["link"]["urgent_connection"] and pc["fault_path"] == "native", pc
    assert report["guest"]["link"]["urgent_protection"] == "none"
    assert pc["missing"] == 0 and pc["pages_demanded"] + pc["pages_pushed"] >= pc["pages_pending"]


def test_keyed_postcopy_takes_the_native_path_and_keeps_its_integrity(agents, key):  # noqa: F811
    """With a key the urgent connection is MAC-framed like every other one, and the native
    fault threads speak that framing themselves (tests/test_native.py makes them refuse a
    forged frame)."""
    a, b = agents("a", key=key), agents("b", key=key)
    a.request("create", name="p", workload="checker", size="32M")
    report = _migrate(a, b, "p", postcopy=True, parallel=2)
    assert report["guest"]["link"]["urgent_protection"] == "aes-256-gmac"
    pc = report["postcopy"]
    assert pc["fault_path"] == "native" and pc["missing"] == 0, pc
    assert report["verified"] and report["verification"]["guest_check"]["ok"]


@pytest.mark.parametrize("security", ["tls", "tls+key"])
def test_tls_postcopy_takes_the_native_path_sealed(agents, workdir, key, security):  # noqa: F811
    """Between TLS agents the urgent connection is authenticated and attached over TLS,
    then carries transport.seal's encrypted frames under a key sent inside TLS, spoken by
    the native fault threads: demand pages take the native path and stay confidential
    (tests/test_native.py: no page byte in the clear, a forged frame refused).  The
    destination agent refuses an urgent attach over TLS that brings no seal key."""
    from test_agent import _make_tls_files
    from vmem.agent import migration as agent_migration

    cert, tls_key, ca = _make_tls_files(workdir)
    extra = ("--tls-cert", cert, "--tls-key", tls_key, "--tls-ca", ca)
    with_key = {"key": key} if security == "tls+key" else {}
    a, b = agents("a", extra=extra, **with_key), agents("b", extra=extra, **with_key)
    assert a.info["security"] == security
    a.request("create", name="p", workload="checker", size="32M")
    report = _migrate(a, b, "p", postcopy=True)
    link = report["guest"]["link"]
    assert link["urgent_connection"] and link["urgent_protection"] == "aes-256-gcm", link
    pc = report["postcopy"]
    assert pc["fault_path"] == "native" and pc["missing"] == 0 and pc["pages_demanded"] > 0, pc
    assert report["verified"] and report["verification"]["guest_check"]["ok"]
    # The refusal: an authenticated peer's urgent attach over TLS without a seal key (or a short one).
    import socket

    from transport import SocketChannel
    from transport.secure import load_key
    from vmem.agent.protocol import client_hello, recv_frame, send_frame
    from vmem.agent.security import PeerSecurity

    sec = PeerSecurity.from_options(listen_host="127.0.0.1", tls_cert=cert, tls_key=tls_key, tls_ca=ca)
    if security == "tls+key":
        sec.key = load_key(key)
    for attach in ({"op": "attach", "session": "x", "index": 0}, {"op": "attach", "session": "x", "index": 0,
                                                                   "seal": "ab" * 8}):
        raw = SocketChannel(socket.create_connection(("127.0.0.1", b.port), timeout=10))
        ch = sec.connect(raw, "vmem-urgent", "127.0.0.1")
        try:
            client_hello(ch, "vmem-urgent", "test")
            send_frame(ch, attach)
            reply = recv_frame(ch)
        finally:
            ch.close()
        assert reply["ok"] is False and reply["code"] == ErrorCode.BAD_REQUEST and "seal key" in reply["error"], reply
    assert agent_migration._seal_key_from({"seal": "ab" * 32}) == bytes([0xAB]) * 32


from testhosts import testhosts  # noqa: E402,F401


def test_parallel_postcopy_between_test_hosts(testhosts, agents, key, workdir):  # noqa: F811
    a = agents("h1", key=key, listen=f"{testhosts.addr(1)}:0", prefix=("ip", "netns", "exec", testhosts.ns(1)))
    b = agents("h2", key=key, listen=f"{testhosts.addr(2)}:0", prefix=("ip", "netns", "exec", testhosts.ns(2)))
    a.request("create", name="g", workload="checker", size="32M")
    path = os.path.join(workdir, "r.json")
    run = a.cli("migrate", "g", f"{testhosts.addr(2)}:{b.port}", "--quiet", "--observe", "0.2", "--json", path,
                "--postcopy-after-precopy", "--parallel", "2")
    assert run.returncode == 0, run.stderr + a.log() + b.log()
    with open(path) as f:
        report = json.load(f)
    assert report["outcome"] == "completed" and report["verification"]["digests"]["mismatched"] == 0
    assert report["verification"]["guest_check"]["ok"] and report["postcopy"]["missing"] == 0
    assert report["guest"]["link"]["parallel"] == 2
    assert b.guests()["g"]["state"] == "running"


@pytest.mark.parametrize("security", ["insecure", "tls"])
def test_postcopy_resumed_between_agents_after_a_dead_link(testhosts, agents, workdir, security):  # noqa: F811
    """The link dies after the switch (longer than the dead-peer timeout): both agents keep
    their side (the source lists the guest paused), then `vmem migrate --resume NAME`
    finishes the migration over new connections and it verifies.  Between TLS agents the
    new urgent connection is sealed under a new key."""
    import subprocess
    import threading

    from test_agent import _make_tls_files

    if security == "tls":
        cert, tls_key, ca = _make_tls_files(workdir, (testhosts.addr(1), testhosts.addr(2)))
        extra = ("--tls-cert", cert, "--tls-key", tls_key, "--tls-ca", ca)
    else:
        extra = ("--insecure",)
    a = agents("h1", listen=f"{testhosts.addr(1)}:0", prefix=("ip", "netns", "exec", testhosts.ns(1)), extra=extra)
    b = agents("h2", listen=f"{testhosts.addr(2)}:0", prefix=("ip", "netns", "exec", testhosts.ns(2)), extra=extra)
    a.request("create", name="r", workload="checker", size="64M")
    reply: dict = {}

    def migrate():
        reply.update(a.request("migrate", name="r", target=f"{testhosts.addr(2)}:{b.port}",
                               options={"observe": 0.2, "postcopy": True, "postcopy_recovery": True, "bandwidth": "8M"}))

    t = threading.Thread(target=migrate, daemon=True)
    t.start()
    # Cut the link only after the destination switched (under load that can take seconds): a
    # link that dies before the destination read TRANSITION leaves nothing to resume there.
    b.wait_log("switched, the guest runs here", timeout_s=60)
    time.sleep(0.3)  # post-copy under way (64 MiB at 8 MB/s takes ~8 s)
    link = ["ip", "-n", testhosts.ns(2), "link", "set", "dev", "eth0"]
    subprocess.run([*link, "down"], check=True, timeout=30)
    try:
        t.join(60)
        assert not t.is_alive(), "the source did not notice the dead link"
    finally:
        subprocess.run([*link, "up"], check=True, timeout=30)
    report = reply["report"]
    assert report["outcome"] == "paused" and report["source_guest_state"] == "paused", report["reason"]
    assert a.guests()["r"]["state"] == "paused" and b.guests().get("r", {}).get("state") == "incoming", b.log()
    path = os.path.join(workdir, "resumed.json")
    run = a.cli("migrate", "--resume", "r", "--quiet", "--json", path)
    assert run.returncode == 0, run.stdout + run.stderr + a.log() + b.log()
    with open(path) as f:
        done = json.load(f)
    assert done["outcome"] == "completed" and done["verification"]["digests"]["mismatched"] == 0
    assert done["verification"]["guest_check"]["ok"] and done["postcopy"]["missing"] == 0
    assert done["postcopy"]["recoveries"] == 1
    assert done["guest"]["link"]["urgent_protection"] == ("aes-256-gcm" if security == "tls" else "none")
    deadline = time.monotonic() + 10
    while b.guests()["r"]["state"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.guests()["r"]["state"] == "running" and "r" not in a.guests()
