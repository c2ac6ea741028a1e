"""Tests for transport.tcp (addresses, listen/connect/accept) and transport.parallel.

TCP channels run the whole channel conformance suite of tests/test_transport.py over
loopback; one test crosses two network namespaces (tests/testhosts.py).
"""
from __future__ import annotations

import os
import socket
import threading

import numpy as np
import pytest

import test_transport as conformance
from testhosts import testhosts  # noqa: F401  (a fixture)
from transport import ChannelBrokenError, ChannelTimeout, TransportError
from transport.parallel import (
    ParallelError,
    ParallelReceiver,
    ParallelSender,
    StreamHello,
    new_session_id,
    read_stream_hello,
)
from transport.secure import AuthError
from transport.tcp import (
    ConnectError,
    ListenError,
    accept_channel,
    connect_tcp,
    format_hostport,
    listen_tcp,
    parse_hostport,
)

JOIN_TIMEOUT_S = 60.0
PAGE_BYTES = 4096


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


# -- parallel streams ---------------------------------------------------------------------

class _Thread:
    def __init__(self, fn, *args, **kwargs):
        self.value = None
        self.error: BaseException | None = None

        def run():
            try:
                self.value = fn(*args, **kwargs)
            except BaseException as err:  # re-raised by result()
                self.error = err

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self):
        self.thread.join(JOIN_TIMEOUT_S)
        assert not self.thread.is_alive(), "thread hung"
        if self.error is not None:
            raise self.error
        return self.value


def _ram(npages: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (npages, PAGE_BYTES), dtype=np.uint8)


class _Placer:
    """Destination side of the tests: places batches into its own RAM copy."""

    def __init__(self, npages: int):
        self.ram = np.zeros((npages, PAGE_BYTES), dtype=np.uint8)
        self.batches = 0

    def __call__(self, pfns: np.ndarray, pages: np.ndarray) -> None:
        assert pfns.dtype == np.int64 and pages.shape == (len(pfns), PAGE_BYTES)
        self.ram[pfns] = pages
        self.batches += 1


def _parallel_pair(n_streams: int, *, key=None, integrity=False, **sender_kwargs):
    session = new_session_id()
    listener = listen_tcp("127.0.0.1", 0)
    try:
        port = listener.getsockname()[1]
        accepting = _Thread(ParallelReceiver.accept, listener, session, n_streams, key=key,
                            integrity=integrity, timeout_s=30)
        try:
            sender = ParallelSender.connect("127.0.0.1", port, session, n_streams, key=key,
                                            integrity=integrity, **sender_kwargs)
        except BaseException:
            try:
                accepting.result().close()
            except BaseException:
                pass
            raise
        try:
            receiver = accepting.result()
        except BaseException:
            sender.abort()
            raise
    finally:
        listener.close()
    return sender, receiver


@pytest.mark.parametrize("n_streams, secure", [(1, False), (3, False), (2, True)],
                         ids=["1-stream", "3-streams", "2-streams-auth-mac"])
def test_parallel_pages_arrive_byte_exact(n_streams, secure):
    npages = 5000
    src = _ram(npages, seed=1)
    key = os.urandom(32) if secure else None
    sender, receiver = _parallel_pair(n_streams, key=key, integrity=secure,
                                      batch_pages_max=512)
    placer = _Placer(npages)
    try:
        # Scattered and contiguous batches, of varying sizes, as the migrator would send.
        order = np.random.default_rng(2).permutation(npages)
        first = 0
        sizes = [1, 7, 512, 300, 64, 511]
        k = 0
        while first < npages:
            pfns = np.sort(order[first:first + sizes[k % len(sizes)]])
            k += 1
            first += len(pfns)
            gathered = src[pfns]  # a fresh array per batch: not reused before barrier()
            sender.send_batch(pfns, [gathered[:len(pfns) // 2], gathered[len(pfns) // 2:]])
        # The destination consumes concurrently, as it would in its own process.
        consumer = _Thread(receiver.barrier, 1, placer)
        assert sender.barrier() == 1
        sender.flush()
        consumed = consumer.result()
        assert consumed == k == sender.batches_sent
        assert np.array_equal(placer.ram, src)
        sender.close()
        assert receiver.drain(placer) == 0  # END on every stream, nothing after
        assert receiver.get() is None
        assert sum(sender.stream_bytes_sent) == sum(receiver.stream_bytes_received)
        if n_streams > 1:
            assert all(b > 0 for b in sender.stream_bytes_sent)  # load was spread
    finally:
        sender.abort()
        receiver.close()


def test_parallel_barrier_orders_rounds():
    """A page resent after a barrier is never overwritten by its older copy, whatever
    stream each copy took."""
    npages = 256
    sender, receiver = _parallel_pair(4, batch_pages_max=64, queue_batches=2)
    placer = _Placer(npages)
    try:
        rounds = 6

        def consume_rounds():
            # Barrier by barrier, as the destination does when the main stream says so;
            # the receiver holds streams at each marker, so rounds are placed in order
            # even though streams race ahead.
            for r in range(1, rounds + 1):
                receiver.barrier(r, placer)

        consumer = _Thread(consume_rounds)
        for r in range(1, rounds + 1):
            version = np.full((npages, PAGE_BYTES), r, dtype=np.uint8)
            for first in range(0, npages, 16):
                pfns = np.arange(first, first + 16)
                sender.send_batch(pfns, [version[first:first + 16]])
            sync_id = sender.barrier()
            assert sync_id == r
        consumer.result()
        assert (placer.ram == rounds).all()
        assert receiver.epoch == rounds
    finally:
        sender.close()
        receiver.close()


def test_parallel_get_and_release():
    sender, receiver = _parallel_pair(2, batch_pages_max=8)
    try:
        pfns = np.array([3, 9, 11])
        pages = _ram(3, seed=3)
        seq = sender.send_batch(pfns, [pages])
        sender.flush()
        with receiver.get(timeout_s=30) as batch:
            assert batch.seq == seq
            assert batch.pfns.tolist() == [3, 9, 11]
            assert np.array_equal(batch.pages, pages)
        with pytest.raises(ChannelTimeout):
            receiver.get(timeout_s=0.05)
    finally:
        sender.close()
        receiver.close()


def test_parallel_send_batch_validates():
    sender, receiver = _parallel_pair(1, batch_pages_max=4)
    try:
        with pytest.raises(ValueError, match="batch_pages_max"):
            sender.send_batch(np.arange(5), [np.zeros((5, PAGE_BYTES), np.uint8)])
        with pytest.raises(ValueError, match="expected 2 pages"):
            sender.send_batch(np.arange(2), [np.zeros((3, PAGE_BYTES), np.uint8)])
        with pytest.raises(ValueError, match="integer"):
            sender.send_batch(np.array([0.5]), [np.zeros((1, PAGE_BYTES), np.uint8)])
        sender.send_batch(np.arange(0), [])  # empty: ignored
    finally:
        sender.close()
        receiver.close()


def test_parallel_broken_stream_is_reported_to_the_consumer():
    sender, receiver = _parallel_pair(2)
    try:
        sender.send_batch(np.arange(2), [np.zeros((2, PAGE_BYTES), np.uint8)])
        sender.flush()
        sender.abort()  # no END: the receiver sees broken streams
        with pytest.raises(ChannelBrokenError, match="broke before END"):
            receiver.drain(lambda pfns, pages: None, timeout_s=30)
        with pytest.raises(ChannelBrokenError):  # sticky
            receiver.get(timeout_s=1)
    finally:
        receiver.close()


def test_parallel_wrong_key_fails_on_both_sides():
    session = new_session_id()
    with listen_tcp("127.0.0.1", 0) as listener:
        port = listener.getsockname()[1]
        accepting = _Thread(ParallelReceiver.accept, listener, session, 1,
                            key=os.urandom(32), timeout_s=30)
        with pytest.raises(AuthError):
            ParallelSender.connect("127.0.0.1", port, session, 1, key=os.urandom(32))
        with pytest.raises(AuthError):
            accepting.result()


def test_parallel_accept_ignores_other_sessions_and_checks_hellos():
    session = new_session_id()
    with listen_tcp("127.0.0.1", 0) as listener:
        port = listener.getsockname()[1]
        accepting = _Thread(ParallelReceiver.accept, listener, session, 1, timeout_s=30)
        stray = ParallelSender.connect("127.0.0.1", port, new_session_id(), 1)
        real = ParallelSender.connect("127.0.0.1", port, session, 1)
        receiver = accepting.result()
        try:
            real.send_batch(np.array([1]), [np.ones((1, PAGE_BYTES), np.uint8)])
            real.close()
            placer = _Placer(4)
            assert receiver.drain(placer, timeout_s=30) == 1
            assert (placer.ram[1] == 1).all()
        finally:
            stray.abort()
            real.abort()
            receiver.close()


def test_read_stream_hello_rejects_garbage():
    a, b = conformance.channel_pair()
    with a, b:
        a.send(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"[:32])
        with pytest.raises(ParallelError, match="not a vmem data stream"):
            read_stream_hello(b, 5)
        hello = StreamHello(new_session_id(), 0, 1, 1 << 20, PAGE_BYTES).pack()
        a.send(hello)
        with pytest.raises(ParallelError, match="batch_pages_max"):
            read_stream_hello(b, 5)


def test_parallel_names_are_reexported_from_tcp():
    import transport.tcp as tcp

    assert tcp.ParallelSender is ParallelSender
    assert tcp.ParallelReceiver is ParallelReceiver


def test_module_getattr_refuses_dunder_names_without_importing():
    """``transport.tcp.__getattr__`` resolves the parallel API lazily; dunder probes
    (importlib's ``__path__``, inspect's ``__wrapped__``) must get AttributeError."""
    import transport.tcp as tcp

    for name in ("__path__", "__wrapped__", "__nope__"):
        with pytest.raises(AttributeError):
            getattr(tcp, name)
    assert not hasattr(tcp, "__path__")
    from transport.parallel import ParallelSender

    assert tcp.ParallelSender is ParallelSender
    with pytest.raises(AttributeError):
        tcp.no_such_name
