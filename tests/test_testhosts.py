"""Tests for scripts/testhosts.sh and its wrapper tests/testhosts.py.

Timing enters only as a ratio between two transfers measured in the same test.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest

from vmem import _native as nat

from testhosts import (  # noqa: F401  (testhosts is a fixture)
    SCRIPT,
    NetnsHosts,
    testhosts,
    netns_unavailable,
    page_round_trips,
    transfer,
)

pytestmark = pytest.mark.skipif(bool(netns_unavailable()),
                                reason=netns_unavailable() or "available")

MiB = 1 << 20


def _root_addresses() -> str:
    return subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True,
                          check=True).stdout


def test_hosts_reach_each_other_and_nothing_leaks_into_the_root_namespace(testhosts):
    names = testhosts.namespaces()
    assert sorted(names) == sorted([testhosts.ns(1), testhosts.ns(2),
                                    f"{testhosts.prefix}-sw"])
    # The addresses exist only inside the host namespaces.
    assert f"10.213.{testhosts.subnet}." not in _root_addresses()
    out = subprocess.run(["ip", "netns", "exec", testhosts.ns(1), "ip", "-o", "-4", "addr"],
                         capture_output=True, text=True, check=True).stdout
    assert testhosts.addr(1) in out and testhosts.addr(2) not in out
    if shutil.which("ping"):
        ping = testhosts.run(1, ["ping", "-c", "1", "-W", "5", testhosts.addr(2)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = ping.communicate(timeout=30)
        assert ping.returncode == 0, out
    # A TCP transfer h1 -> h2 (no ping binary needed): byte-exact.
    sent, got, _seconds = transfer(testhosts, 4 * MiB)
    assert sent == got
    # ... and in the other direction.
    sent, got, _seconds = transfer(testhosts, MiB, src=2, dst=1)
    assert sent == got


def test_shaping_limits_a_transfer(testhosts):
    """A transfer shaped to 100 Mbit/s is much slower than the unshaped one (ratio only)."""
    size = 6 * MiB
    _s, _g, unshaped_s = transfer(testhosts, size)
    testhosts.shape("100mbit")
    try:
        sent, got, shaped_s = transfer(testhosts, size)
    finally:
        testhosts.shape(None)
    assert sent == got
    # veth moves GB/s; 100 Mbit/s is 12.5 MB/s: the shaped run must take several times
    # longer (a loose bound: the point is that the qdisc is in the path at all).
    assert shaped_s > 3 * unshaped_s, (shaped_s, unshaped_s)
    assert "htb" not in testhosts.status()  # shaping removed again


@pytest.mark.parametrize("fresh", [False, True])
def test_baseline_copies_over_two_keyed_connections_arrive_intact(testhosts, fresh):
    """The benchmarks' baseline copies (unhashed while timed) place every byte where it
    belongs, over two connections and with a MAC on each: the digests of the buffer sent
    and of the bytes placed, taken after the clock stopped, agree."""
    size = 5 * MiB + 3 * 4096  # slices that are not whole MiB
    key = bytes(range(32))
    for connections, mac_key in ((2, None), (1, key), (2, key)):
        sent, got, seconds = transfer(testhosts, size, hashing=False, fresh=fresh, connections=connections,
                                      mac_key=mac_key, verify=True)
        assert sent == got and len(sent) == 64, (connections, mac_key)
        assert seconds > 0


def test_a_digesting_baseline_copy_arrives_intact_and_digests_only_fresh_memory(testhosts):
    """The copy that digests every page it placed (bench_agent's verification floor) still
    places every byte where it belongs, keyed or not; digesting needs the fresh memfd."""
    size = 3 * MiB + 5 * 4096
    for mac_key in (None, bytes(range(32))):
        sent, got, _seconds = transfer(testhosts, size, hashing=False, fresh=True, mac_key=mac_key, digest=True,
                                       verify=True)
        assert sent == got and len(sent) == 64, mac_key
    with pytest.raises(ValueError, match="fresh=True"):
        transfer(testhosts, size, hashing=False, digest=True)
    with pytest.raises(ValueError, match="connections=1"):  # a slice edge could split a page
        transfer(testhosts, size, hashing=False, fresh=True, connections=2, digest=True)


def test_a_keyed_baseline_copy_refuses_a_wrong_key(testhosts):
    """The keyed baseline really runs the MAC: a sink with another key refuses the first
    frame (so the keyed copy's time includes the tag on both ends)."""
    from testhosts import TCP_SINK, TCP_SOURCE, _kill_and_reap

    sink = testhosts.run_python(2, TCP_SINK, testhosts.addr(2), "0", str(MiB), "fresh", "key=" + "11" * 32)
    source = None
    try:
        port = sink.stdout.readline().strip()
        assert port.isdigit()
        source = testhosts.run_python(1, TCP_SOURCE, testhosts.addr(2), port, str(MiB), "fresh",
                                      "key=" + "22" * 32)
        _out, err = sink.communicate(timeout=60)
        assert sink.returncode != 0
        assert "integrity check failed" in err, err
    finally:
        _kill_and_reap(source, sink)


def test_hashed_transfers_take_one_connection(testhosts):
    with pytest.raises(ValueError, match="one connection"):
        transfer(testhosts, MiB, connections=2)


def test_page_round_trips_time_the_whole_answer(testhosts):
    """The fault-floor probe (scripts/bench_agent.py) times request -> last byte of the page:
    on a link shaped to 1 Mbit/s a 4 KiB answer alone takes ~33 ms once the unmeasured
    round trips have used up the shaper's 256 KiB burst, so the shaped round trip is many
    times the unshaped one (ratio only); every requested round trip is counted."""
    fast = page_round_trips(testhosts, 50, 500, warmup=5)
    assert fast["count"] == 50
    # both ends run with the fault threads' scheduling, and the client says what it got
    assert fast["scheduling"] == nat.fault_thread_priority()[1]
    assert 0 < fast["p50_us"] <= fast["p99_us"] <= fast["max_us"]
    testhosts.shape("1mbit")
    try:
        slow = page_round_trips(testhosts, 8, 50, warmup=80)
    finally:
        testhosts.shape(None)
    assert slow["count"] == 8
    assert slow["p50_us"] > 20 * fast["p50_us"], (slow, fast)


def test_down_is_complete_and_idempotent_even_after_a_failure():
    hosts = NetnsHosts(n_hosts=3)
    with pytest.raises(ZeroDivisionError):
        with hosts:
            assert len(hosts.namespaces()) == 4
            hosts.run(3, ["sleep", "60"])  # a process left running: down must reap it
            1 / 0
    assert hosts.namespaces() == []
    hosts.down()  # idempotent
    assert hosts.namespaces() == []
    assert f"10.213.{hosts.subnet}." not in _root_addresses()


def test_script_rejects_bad_arguments():
    for args in (["up", "--hosts", "4"], ["up", "--prefix", "bad/name"],
                 ["up", "--rate", "fast"], ["up", "--subnet", "300"], ["frobnicate"]):
        result = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode != 0, args
        assert result.stderr.strip(), args
