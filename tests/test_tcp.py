"""Tests for transport.tcp (addresses, listen/connect/accept).

TCP channels run the whole channel conformance suite of tests/test_transport.py over
loopback; one test crosses two network namespaces (tests/testhosts.py).
"""
from __future__ import annotations

import socket
import threading
import time

import pytest

import test_transport as conformance
from testhosts import testhosts  # noqa: F401  (a fixture)
from transport import ChannelTimeout, SocketChannel, TransportError
from transport.tcp import (
    ConnectError,
    ListenError,
    accept_channel,
    connect_tcp,
    format_hostport,
    listen_tcp,
    parse_hostport,
)


# -- addresses ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("10.0.0.1:7000", ("10.0.0.1", 7000)),
    ("localhost:7000", ("localhost", 7000)),
    ("[::1]:7000", ("::1", 7000)),
    ("[fe80::1%eth0]:1", ("fe80::1%eth0", 1)),
    (" host-a.example:0 ", ("host-a.example", 0)),
])
def test_parse_hostport(text, expected):
    assert parse_hostport(text) == expected
    assert parse_hostport(format_hostport(*expected)) == expected


@pytest.mark.parametrize("text, expected", [
    ("10.0.0.1", ("10.0.0.1", 7000)),
    ("[::1]", ("::1", 7000)),
    ("::1", ("::1", 7000)),
])
def test_parse_hostport_default_port(text, expected):
    assert parse_hostport(text, default_port=7000) == expected


@pytest.mark.parametrize("text, fragment", [
    ("10.0.0.1", "missing port"),
    ("", "empty"),
    ("host:", "not a number"),
    ("host:70000", "not in 0..65535"),
    ("host:-1", "not a number"),
    ("::1:7000", "expected HOST:PORT"),
    ("[::1", "unclosed"),
    ("[nothex]:1", "not an IPv6"),
    ("[::1]x", "unexpected"),
    ("bad host:1", "bad host name"),
    (":7000", "missing host"),
])
def test_parse_hostport_rejects(text, fragment):
    with pytest.raises(ValueError) as info:
        parse_hostport(text)
    assert fragment in str(info.value)
    assert repr(text) in str(info.value)


# -- connect / accept ---------------------------------------------------------------------

def make_tcp_pair(host: str = "127.0.0.1"):
    listener = listen_tcp(host, 0)
    try:
        port = listener.getsockname()[1]
        client = connect_tcp(host, port)
        try:
            server, _peer = accept_channel(listener, 10)
        except BaseException:
            client.close()
            raise
    finally:
        listener.close()
    return client, server


@pytest.mark.timeout(120)
@pytest.mark.parametrize("check", conformance.CHANNEL_CHECKS,
                         ids=[c.__name__.removeprefix("check_")
                              for c in conformance.CHANNEL_CHECKS])
def test_tcp_channel_conformance(check):
    check(make_tcp_pair)


def test_tcp_sockets_are_configured():
    client, server = make_tcp_pair()
    with client, server:
        for channel in (client, server):
            sock = channel.sock
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert sock.gettimeout() is None  # blocking
            # The kernel doubles the request and caps it at wmem_max: just "bigger than
            # the 16-87 KiB defaults".
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 200_000
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 200_000
        client.send(b"ping")
        assert server.recv_exact(4) == b"ping"


def test_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support in this Python")
    try:
        client, server = make_tcp_pair("::1")
    except ListenError as err:
        pytest.skip(f"no IPv6 loopback here: {err}")
    with client, server:
        server.send(b"six")
        assert client.recv_exact(3) == b"six"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_connect_refused_names_the_address_and_the_agent():
    port = _free_port()
    with pytest.raises(ConnectError) as info:
        connect_tcp("127.0.0.1", port, timeout_s=5)
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "connection refused" in message
    assert "vmem agent" in message
    assert isinstance(info.value, TransportError)
    assert (info.value.host, info.value.port) == ("127.0.0.1", port)


def test_connect_unresolvable_host():
    with pytest.raises(ConnectError) as info:
        connect_tcp("no-such-host.invalid", 7000, timeout_s=5)
    assert "no-such-host.invalid:7000" in str(info.value)
    assert "resolve" in str(info.value)


def test_listen_on_a_busy_port_says_so():
    listener = listen_tcp("127.0.0.1", 0)
    with listener:
        port = listener.getsockname()[1]
        with pytest.raises(ListenError) as info:
            listen_tcp("127.0.0.1", port)
        assert f"127.0.0.1:{port}" in str(info.value)
        assert "in use" in str(info.value)


def test_accept_timeout():
    with listen_tcp("127.0.0.1", 0) as listener:
        with pytest.raises(ChannelTimeout) as info:
            accept_channel(listener, 0.05)
        assert "no connection" in str(info.value)
        assert listener.gettimeout() is None  # restored


def test_connect_timeout_bound_must_be_positive():
    with pytest.raises(ValueError):
        connect_tcp("127.0.0.1", 1, timeout_s=0)


# Runs in host 1: connect to a port of host 2 where nothing listens; print the error.
_REFUSED_ACROSS = r"""
import sys
from transport.tcp import connect_tcp, ConnectError
try:
    connect_tcp(sys.argv[1], int(sys.argv[2]), timeout_s=10)
except ConnectError as err:
    print(err)
else:
    print("connected?!")
"""


def test_tcp_across_namespaces(testhosts):
    from testhosts import transfer

    sent, got, _seconds = transfer(testhosts, 3 * (1 << 20) + 17)
    assert sent == got
    proc = testhosts.run_python(1, _REFUSED_ACROSS, testhosts.addr(2), "9")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"{testhosts.addr(2)}:9" in out and "connection refused" in out, out


# -- large receives wait with SO_RCVLOWAT raised --------------------------------------------

def _trickle(channel, total: int, piece: int, pause_s: float, errors: list) -> threading.Thread:
    """A thread sending ``total`` bytes on ``channel`` in ``piece``-byte sends, ``pause_s`` apart."""
    def run():
        try:
            data = bytes(range(256)) * (piece // 256)
            for _ in range(total // piece):
                channel.send(data)
                time.sleep(pause_s)
        except BaseException as err:  # surfaced by the test
            errors.append(err)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("timeout_s", [None, 30.0], ids=["blocking", "timeout-mode"])
def test_a_large_receive_wakes_once_per_step_not_per_arrival(monkeypatch, timeout_s):
    """4 MiB arriving in 256 sends of 16 KiB: with SO_RCVLOWAT at each 256 KiB step the
    receiver wakes about once a step (16), not once per send -- the wake-ups an IPI from the
    sender's CPU pays for.  With the mark left at 1 (the other arm) it wakes ~once a send,
    which is what the test exists to catch."""
    import resource

    counts = {}
    for arm in ("raised", "default"):
        if arm == "default":
            monkeypatch.setattr(SocketChannel, "_use_rcvlowat", False)
        client, server = make_tcp_pair()
        with client, server:
            server.settimeout(timeout_s)
            errors: list = []
            sender = _trickle(client, 4 << 20, 16 << 10, 0.0005, errors)
            buf = bytearray(4 << 20)
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
            server.recv_into(buf)
            counts[arm] = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - before
            sender.join(10)
            assert not errors, errors
            assert buf[:256] == bytes(range(256)) and buf[-256:] == bytes(range(256))
            assert server.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1  # lowered again
    print("voluntary context switches of the receiver:", counts)
    assert counts["raised"] <= 40, counts
    assert counts["default"] >= 64, counts


def test_a_receive_ending_in_a_short_step_completes_without_more_data():
    """The peer sends exactly what is asked (256 KiB and 100 bytes) and then waits for an
    answer: the mark is lowered for the short last step, so the receive returns instead of
    waiting for bytes that will never come; small receives after it see the default."""
    client, server = make_tcp_pair()
    with client, server:
        server.settimeout(10.0)  # a hang fails as a timeout, not forever
        payload = bytes(range(256)) * 1024 + b"x" * 100
        client.send(payload)
        buf = bytearray(len(payload))
        server.recv_into(buf)
        assert bytes(buf) == payload
        client.send(b"ping")
        assert server.recv_some(16) == b"ping"
        server.send(b"pong")
        assert client.recv_exact(4) == b"pong"


def test_eof_inside_a_large_receive_is_reported_with_what_arrived():
    """The peer closes after half of a large receive: the mark does not hide the EOF."""
    from transport import ChannelBrokenError

    client, server = make_tcp_pair()
    with server:
        server.settimeout(10.0)
        client.send(b"a" * (192 << 10))
        client.close()
        with pytest.raises(ChannelBrokenError) as info:
            server.recv_into(bytearray(512 << 10))
        assert info.value.bytes_got == 192 << 10
