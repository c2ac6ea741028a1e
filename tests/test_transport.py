"""Tests for the transport package.

The heart is a reusable conformance suite: every ``check_*`` function below takes a
``maker`` (a zero-argument callable returning two connected channels ``(a, b)``) and tests
one part of the :class:`transport.Channel` contract.  ``check_channel(maker)`` runs them
all; pytest runs each check against every implementation in ``MAKERS``.  A new channel
implementation (TCP, ...) gets tested by adding its maker there.

Every thread a test starts is joined with a timeout, every fd and child process it opens
is closed/reaped even when the test fails, and an autouse fixture fails any test that
leaks a thread or an fd.
"""
from __future__ import annotations

import functools
import os
import pickle
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import transport
from transport import (
    IOV_MAX,
    MAX_IO_BYTES,
    ChannelBrokenError,
    ChannelClosedError,
    ChannelTimeout,
    ShapedChannel,
    SocketChannel,
    TokenBucket,
    TransportError,
    channel_from_fd,
    channel_pair,
    parse_rate,
    recv_fds,
    send_fds,
    set_tcp_nodelay,
)
from transport.codec import PAGE_BYTES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOIN_TIMEOUT_S = 60.0
MiB = 1 << 20


# -- helpers ------------------------------------------------------------------------------

def _open_fds() -> dict[str, str]:
    """fd number -> what it points to (``socket:[inode]``, a path, ...)."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            pass  # the directory fd listdir used, already closed
    return fds


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves a thread running or an fd open."""
    threads_before = set(threading.enumerate())
    fds_before = _open_fds()
    yield
    leaked_threads = [t for t in threading.enumerate()
                      if t not in threads_before and t.is_alive()]
    assert not leaked_threads, f"threads leaked: {leaked_threads}"
    # Compare targets, not just numbers: a leaked fd may reuse a number freed meanwhile.
    leaked_fds = {fd: target for fd, target in _open_fds().items()
                  if fds_before.get(fd) != target}
    assert not leaked_fds, f"fds leaked: {leaked_fds}"


class Worker:
    """A thread running ``fn(*args, **kwargs)``; :meth:`result` joins it and re-raises its
    error (for other test modules too)."""

    def __init__(self, fn, *args, **kwargs):
        self._fn, self._args, self._kwargs = fn, args, kwargs
        self._value = None
        self._error: BaseException | None = None
        self.observed = False
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"test-worker-{fn.__name__}")
        self.thread.start()

    def _run(self):
        try:
            self._value = self._fn(*self._args, **self._kwargs)
        except BaseException as err:  # handed to the test thread by result()
            self._error = err

    def result(self, timeout_s: float = JOIN_TIMEOUT_S):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"{self.thread.name} did not finish in {timeout_s} s"
        self.observed = True
        if self._error is not None:
            raise self._error
        return self._value


class Pair:
    """Context manager around ``maker()``: owns both channels and every worker thread.

    On a failure it closes both channels first (a thread blocked on one channel wakes with
    EOF/EPIPE when its peer closes), then joins every worker with a timeout.
    """

    def __init__(self, maker):
        self.a, self.b = maker()
        self.workers: list[Worker] = []

    def spawn(self, fn, *args) -> Worker:
        worker = Worker(fn, *args)
        self.workers.append(worker)
        return worker

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.a.close()
            self.b.close()
        for worker in self.workers:
            worker.thread.join(JOIN_TIMEOUT_S)
        self.a.close()
        self.b.close()
        if exc_type is None:
            hung = [w.thread.name for w in self.workers if w.thread.is_alive()]
            assert not hung, f"worker threads hung: {hung}"
            for worker in self.workers:
                if not worker.observed:
                    worker.result(0)


@functools.lru_cache(maxsize=None)
def random_bytes(n_bytes: int, seed: int) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8)
    data.flags.writeable = False
    return data


def as_bytes(part) -> bytes:
    return memoryview(part).cast("B").tobytes()


def recv_all(channel, n_bytes: int) -> bytearray:
    buf = bytearray(n_bytes)
    channel.recv_into(buf)
    return buf


def read_mib_then_close(channel) -> None:
    """A peer that takes 1 MiB and hangs up (the sender must see ChannelBrokenError)."""
    channel.recv_exact(MiB)
    channel.close()


# -- channel makers ----------------------------------------------------------------------

def make_socket_pair():
    return channel_pair()


def make_shaped_pair():
    # Fast enough not to slow the suite, with an odd burst so sends are cut mid-part.
    a, b = channel_pair()
    return ShapedChannel(a, 10e9, burst_bytes=65521), ShapedChannel(b, 10e9, burst_bytes=65521)


MAKERS = {"socket": make_socket_pair, "shaped": make_shaped_pair}


# -- the conformance suite ---------------------------------------------------------------

def check_roundtrip_mixed_parts(maker):
    """Small and large parts of every buffer type, > IOV_MAX parts, > 64 MiB in one call."""
    big = random_bytes(48 * MiB + 5, seed=1)
    medium = random_bytes(17 * MiB + 3, seed=2)
    small = random_bytes(3 * IOV_MAX + 17, seed=3)
    parts = [b"header", b"", bytearray(b"mutable"), big, memoryview(medium)[1:],
             np.arange(1000, dtype=np.int64), np.zeros((3, 4096), dtype=np.uint8)]
    # > IOV_MAX tiny parts, of lengths 0..3 (empty ones included)
    offset = 0
    for i in range(3 * IOV_MAX):
        parts.append(small[offset:offset + i % 4])
        offset += i % 4
    parts.append(b"trailer")
    expected = b"".join(as_bytes(p) for p in parts)
    assert len(expected) > 64 * MiB
    with Pair(maker) as pair:
        receiver = pair.spawn(recv_all, pair.b, len(expected))
        pair.a.send_parts(parts)
        assert receiver.result() == expected
        assert pair.a.bytes_sent == pair.b.bytes_received == len(expected)
        # the channel stays usable in both directions
        pair.b.send(b"reply")
        assert pair.a.recv_exact(5) == b"reply"


def check_partial_sends_with_slow_reader(maker):
    """With a timeout set, sendmsg returns short writes; they must be resumed exactly."""
    data = random_bytes(12 * MiB + 7, seed=4)
    parts = [data[i:i + 300_001] for i in range(0, data.size, 300_001)]

    def slow_reader(channel):
        out = bytearray()
        while len(out) < data.size:
            chunk = channel.recv_some(min(256 * 1024, data.size - len(out)))
            assert chunk
            out += chunk
            if len(out) % 7 == 0:
                time.sleep(0.001)
        return out

    with Pair(maker) as pair:
        pair.a.settimeout(30)
        assert pair.a.gettimeout() == 30
        reader = pair.spawn(slow_reader, pair.b)
        pair.a.send_parts(parts)
        assert reader.result() == as_bytes(data)


def check_eof_mid_message(maker):
    """EOF inside recv_into raises ChannelBrokenError with counts, and stays broken."""
    with Pair(maker) as pair:
        pair.a.send(b"x" * 1000)
        pair.a.close()
        buf = bytearray(4096)
        with pytest.raises(ChannelBrokenError) as info:
            pair.b.recv_into(buf)
        assert (info.value.bytes_expected, info.value.bytes_got) == (4096, 1000)
        assert buf[:1000] == b"x" * 1000
        assert pair.b.bytes_received == 1000
        with pytest.raises(ChannelBrokenError):  # sticky: the framing is lost
            pair.b.recv_exact(1)


def check_eof_at_message_boundary(maker):
    """recv_exact at a clean EOF raises (bytes_got=0); recv_some reports it as b''."""
    with Pair(maker) as pair:
        pair.a.send(b"abc")
        pair.a.close()
        assert pair.b.recv_some(10) == b"abc"
        assert pair.b.recv_some(10) == b""
        with pytest.raises(ChannelBrokenError) as info:
            pair.b.recv_exact(8)
        assert (info.value.bytes_expected, info.value.bytes_got) == (8, 0)


def check_peer_close_while_sending(maker):
    """A peer that closes mid-transfer makes the sender raise ChannelBrokenError, not hang."""
    total = 512 * MiB
    payload = np.zeros(total, dtype=np.uint8)  # untouched calloc memory: reads are cheap

    with Pair(maker) as pair:
        closer = pair.spawn(read_mib_then_close, pair.b)
        with pytest.raises(ChannelBrokenError) as info:
            pair.a.send(payload)
        closer.result()
        assert info.value.bytes_expected == total
        assert MiB <= info.value.bytes_got < total
        assert pair.a.bytes_sent == info.value.bytes_got
        with pytest.raises(ChannelBrokenError):  # sticky
            pair.a.send(b"more")


def check_use_after_close(maker):
    """Every operation on a channel we closed raises ChannelClosedError; close is idempotent."""
    with Pair(maker) as pair:
        a = pair.a
        assert not a.closed
        a.close()
        a.close()
        assert a.closed
        calls = [
            lambda: a.send(b"x"),
            lambda: a.send_parts([b"x", b"y"]),
            lambda: a.recv_into(bytearray(1)),
            lambda: a.recv_exact(1),
            lambda: a.recv_some(1),
            lambda: a.wait_readable(0),
            lambda: a.settimeout(1.0),
            lambda: a.gettimeout(),
            lambda: a.fileno(),
        ]
        for call in calls:
            with pytest.raises(ChannelClosedError):
                call()
        # the peer sees a clean end of stream
        assert pair.b.recv_some(1) == b""


def check_counters(maker):
    """bytes_sent/bytes_received start at 0 and count the caller's stream bytes (never a
    layer's framing or encoding) for every kind of call, in both directions."""
    zero_pages = np.zeros((4, PAGE_BYTES), dtype=np.uint8)  # a zero-eliding channel's case
    with Pair(maker) as pair:
        a, b = pair.a, pair.b
        assert (a.bytes_sent, a.bytes_received, b.bytes_sent, b.bytes_received) == (0, 0, 0, 0)
        a.send_parts([b"abc", b"", memoryview(b"defg"), zero_pages])
        a.send(b"h" * 5000)
        sent = 7 + zero_pages.nbytes + 5000
        assert a.bytes_sent == sent
        assert b.recv_exact(3) == b"abc"
        got = b.recv_some(4)
        assert b.bytes_received == 3 + len(got)
        rest = recv_all(b, sent - 3 - len(got))
        assert got + rest[:4 - len(got)] == b"defg"
        assert b.bytes_received == sent and b.bytes_sent == 0
        b.send_parts([b"reply", zero_pages])
        assert recv_all(a, 5 + zero_pages.nbytes)[:5] == b"reply"
        assert a.bytes_received == b.bytes_sent == 5 + zero_pages.nbytes
        assert a.bytes_sent == sent  # receiving changes no send counter


def check_first_receive_error_is_sticky(maker):
    """The first error that breaks a direction is kept: every later call in that direction
    raises ChannelBrokenError chained to that very error.  The peer closing is
    ChannelBrokenError (broken by the peer); once we close, ChannelClosedError wins."""
    with Pair(maker) as pair:
        a, b = pair.a, pair.b
        a.send(b"x" * 1000)
        a.close()
        with pytest.raises(ChannelBrokenError) as first:
            b.recv_exact(4096)
        for call in (lambda: b.recv_exact(1), lambda: b.recv_into(bytearray(8)),
                     lambda: b.recv_some(1)):
            with pytest.raises(ChannelBrokenError) as again:
                call()
            assert again.value.__cause__ is first.value
        b.close()
        with pytest.raises(ChannelClosedError):
            b.recv_exact(1)


def check_first_send_error_is_sticky(maker):
    """A send broken by the peer stays broken, every later send chained to the first error
    (incompressible data: a zero-eliding channel cannot squeeze it into the buffers)."""
    data = random_bytes(48 * MiB + 5, seed=1)

    with Pair(maker) as pair:
        closer = pair.spawn(read_mib_then_close, pair.b)
        with pytest.raises(ChannelBrokenError) as first:
            pair.a.send(data)
        closer.result()
        assert pair.a.bytes_sent == first.value.bytes_got
        with pytest.raises(ChannelBrokenError) as again:
            pair.a.send(b"more")
        assert again.value.__cause__ is first.value
        pair.a.close()
        with pytest.raises(ChannelClosedError):
            pair.a.send(b"more")


def check_shutdown_wakes_a_blocked_receiver(maker):
    """shutdown() from another thread ends a receive blocked in the channel: it raises a
    TransportError instead of hanging (closing an fd alone wakes nobody)."""
    with Pair(maker) as pair:
        blocked = pair.spawn(pair.b.recv_exact, 10)
        time.sleep(0.1)  # let it block (if it has not yet, it finds the channel shut down)
        pair.b.shutdown()
        with pytest.raises(TransportError):
            blocked.result(10)


def check_timeouts(maker):
    """A timeout with nothing moved leaves the channel usable; after a partial receive the
    receive side is broken."""
    with Pair(maker) as pair:
        with pytest.raises(ValueError):
            pair.b.settimeout(0)
        pair.b.settimeout(0.05)
        with pytest.raises(ChannelTimeout) as info:
            pair.b.recv_exact(10)
        assert info.value.bytes_got == 0
        pair.a.send(b"0123456789")
        assert pair.b.recv_exact(10) == b"0123456789"
        pair.a.send(b"01234")
        with pytest.raises(ChannelTimeout) as info:
            pair.b.recv_exact(10)
        assert (info.value.bytes_expected, info.value.bytes_got) == (10, 5)
        with pytest.raises(ChannelBrokenError):
            pair.b.recv_exact(1)
        pair.b.settimeout(None)
        assert pair.b.gettimeout() is None
        # the other direction is unaffected
        pair.b.send(b"ok")
        assert pair.a.recv_exact(2) == b"ok"


def check_send_timeout_mid_message(maker):
    """A send that stalls after a prefix went out raises ChannelTimeout with the counts of
    the whole call, and leaves the send side broken."""
    total = 64 * MiB
    payload = np.zeros(total, dtype=np.uint8)
    with Pair(maker) as pair:
        pair.a.settimeout(0.2)
        with pytest.raises(ChannelTimeout) as info:
            pair.a.send_parts([b"head", payload])  # nobody reads: the buffers fill up
        assert info.value.bytes_expected == total + 4
        assert 0 < info.value.bytes_got < total
        assert pair.a.bytes_sent == info.value.bytes_got
        with pytest.raises(ChannelBrokenError):
            pair.a.send(b"x")
        # the receive direction still works
        pair.b.send(b"ok")
        assert pair.a.recv_exact(2) == b"ok"


def check_wait_readable(maker):
    with Pair(maker) as pair:
        assert pair.b.wait_readable(0.01) is False
        pair.a.send(b"x")
        assert pair.b.wait_readable(5) is True
        assert pair.b.recv_exact(1) == b"x"
        assert pair.b.wait_readable(0) is False
        pair.a.close()
        assert pair.b.wait_readable(5) is True  # EOF: a receive returns at once
        assert isinstance(pair.b.fileno(), int)


CHANNEL_CHECKS = [
    check_roundtrip_mixed_parts,
    check_partial_sends_with_slow_reader,
    check_eof_mid_message,
    check_eof_at_message_boundary,
    check_peer_close_while_sending,
    check_use_after_close,
    check_counters,
    check_first_receive_error_is_sticky,
    check_first_send_error_is_sticky,
    check_shutdown_wakes_a_blocked_receiver,
    check_timeouts,
    check_send_timeout_mid_message,
    check_wait_readable,
]


def check_channel(maker) -> None:
    """Run the whole conformance suite against ``maker`` (for use by other test modules)."""
    for check in CHANNEL_CHECKS:
        check(maker)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("maker", list(MAKERS.values()), ids=list(MAKERS))
@pytest.mark.parametrize("check", CHANNEL_CHECKS,
                         ids=[c.__name__.removeprefix("check_") for c in CHANNEL_CHECKS])
def test_channel_conformance(maker, check):
    check(maker)


# -- SocketChannel specifics ----------------------------------------------------------------

class DribbleSocket:
    """A socket whose sendmsg takes only a random 1..12287 bytes per call (a worst-case
    kernel), and which checks that no call passes more than IOV_MAX buffers."""

    def __init__(self, sock: socket.socket, seed: int):
        self._sock = sock
        self._rng = np.random.default_rng(seed)
        self.calls = 0

    def sendmsg(self, buffers, ancdata=(), flags=0):
        buffers = list(buffers)
        assert 0 < len(buffers) <= IOV_MAX
        self.calls += 1
        left = int(self._rng.integers(1, 3 * PAGE_BYTES))
        trimmed = []
        for buf in buffers:
            view = memoryview(buf)
            if left == 0:
                break
            trimmed.append(view[:left])
            left -= len(trimmed[-1])
        return self._sock.sendmsg(trimmed, ancdata, flags)

    def __getattr__(self, name):
        return getattr(self._sock, name)


@pytest.mark.parametrize("shaped", [False, True], ids=["socket", "shaped"])
def test_send_parts_resumes_every_partial_write(shaped):
    data = random_bytes(3 * MiB, seed=7)
    rng = np.random.default_rng(8)
    cuts = np.sort(rng.choice(data.size, 2 * IOV_MAX, replace=False))
    parts = np.split(data, cuts)  # 2 * IOV_MAX + 1 parts, some possibly empty
    raw_a, raw_b = socket.socketpair()
    dribble = DribbleSocket(raw_a, seed=9)

    def maker():
        a, b = SocketChannel(dribble), SocketChannel(raw_b)
        return (ShapedChannel(a, 10e9, burst_bytes=10_007), b) if shaped else (a, b)

    with Pair(maker) as pair:
        receiver = pair.spawn(recv_all, pair.b, data.size)
        pair.a.send_parts(parts)
        assert receiver.result() == as_bytes(data)
        assert pair.a.bytes_sent == data.size
    assert dribble.calls > data.size // (3 * PAGE_BYTES)  # it really dribbled


class MeasuringSocket:
    """A socket that records the most bytes any one sendmsg passed and any one recv_into asked for."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.most_sent = self.most_asked = 0

    def sendmsg(self, buffers, ancdata=(), flags=0):
        self.most_sent = max(self.most_sent, sum(memoryview(b).nbytes for b in buffers))
        return self._sock.sendmsg(buffers, ancdata, flags)

    def recv_into(self, buf, nbytes=0, flags=0):
        self.most_asked = max(self.most_asked, nbytes or memoryview(buf).nbytes)
        return self._sock.recv_into(buf, nbytes, flags)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def test_no_system_call_moves_more_than_max_io_bytes():
    """A 3 MiB send_parts (one part bigger than the cap, many small ones) and a 3 MiB
    recv_into go through system calls of at most MAX_IO_BYTES each -- on a kernel that does
    not preempt inside system calls, a bigger copy keeps a woken fault thread off its CPU
    (transport/channel.py) -- and the bytes arrive intact."""
    data = random_bytes(3 * MiB, seed=11)
    parts = [data[:2 * MiB], *np.split(data[2 * MiB:], 64)]
    raw_a, raw_b = socket.socketpair()
    sender, receiver_sock = MeasuringSocket(raw_a), MeasuringSocket(raw_b)
    with Pair(lambda: (SocketChannel(sender), SocketChannel(receiver_sock))) as pair:
        out = bytearray(data.size)
        receiver = pair.spawn(pair.b.recv_into, out)
        pair.a.send_parts(parts)
        receiver.result()
        assert out == as_bytes(data)
    assert 0 < sender.most_sent <= MAX_IO_BYTES and 0 < receiver_sock.most_asked <= MAX_IO_BYTES
    assert MAX_IO_BYTES < MiB  # the test above sent and received more than one call's worth


def test_send_parts_rejects_non_contiguous_before_sending():
    with Pair(make_socket_pair) as pair:
        strided = np.zeros((4, 4), dtype=np.uint8)[:, ::2]
        with pytest.raises(ValueError):
            pair.a.send_parts([b"first", strided])
        assert pair.a.bytes_sent == 0
        pair.a.send(b"fine")  # nothing sent, nothing broken
        assert pair.b.recv_exact(4) == b"fine"


def test_recv_into_rejects_read_only_buffer():
    with Pair(make_socket_pair) as pair:
        with pytest.raises(TypeError):
            pair.b.recv_into(b"immutable")


def test_channel_pair_asks_for_big_buffers():
    with Pair(make_socket_pair) as pair:
        sndbuf = pair.a.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        wmem_max = int(open("/proc/sys/net/core/wmem_max").read())
        # Linux doubles the request for bookkeeping, capped at wmem_max
        assert sndbuf >= min(2 * transport.SOCKET_BUFFER_BYTES, 2 * wmem_max) // 2


def test_set_tcp_nodelay():
    with Pair(make_socket_pair) as pair:
        assert set_tcp_nodelay(pair.a) is False  # AF_UNIX: nothing to do
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with SocketChannel(client) as a, SocketChannel(accepted) as b:
            assert set_tcp_nodelay(a) is True
            assert a.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            a.send_parts([b"tcp ", np.frombuffer(b"works", np.uint8)])
            assert b.recv_exact(9) == b"tcp works"


def test_socket_channel_rejects_datagram_socket():
    x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with x, y:
        with pytest.raises(ValueError):
            SocketChannel(x)


# -- fd passing ------------------------------------------------------------------------------

@pytest.mark.parametrize("via", ["socket", "channel"])
def test_send_fds_passes_a_memfd(via):
    content = as_bytes(random_bytes(64 * 1024 + 3, seed=10))
    memfd = os.memfd_create("vmem-test-transport", os.MFD_CLOEXEC)
    received: list[int] = []
    try:
        os.write(memfd, content)
        with Pair(make_socket_pair) as pair:
            a = pair.a.sock if via == "socket" else pair.a
            b = pair.b.sock if via == "socket" else pair.b
            send_fds(a, b"memfd", [memfd, memfd])
            data, received = recv_fds(b, 64, 4)
            assert data == b"memfd"
            assert len(received) == 2 and memfd not in received
            for fd in received:
                assert os.fstat(fd).st_ino == os.fstat(memfd).st_ino
                assert not os.get_inheritable(fd)
                assert os.pread(fd, len(content) + 10, 0) == content
            if via == "channel":
                assert pair.a.bytes_sent == pair.b.bytes_received == 5
    finally:
        os.close(memfd)
        for fd in received:
            os.close(fd)


def test_send_fds_needs_data():
    with Pair(make_socket_pair) as pair:
        with pytest.raises(ValueError):
            send_fds(pair.a, b"", [0])


def test_recv_fds_eof_raises_broken():
    with Pair(make_socket_pair) as pair:
        pair.a.close()
        with pytest.raises(ChannelBrokenError):
            recv_fds(pair.b.sock, 16, 1)
        with pytest.raises(ChannelBrokenError):
            recv_fds(pair.b, 16, 1)


def test_recv_fds_too_many_fds_raises_and_leaks_nothing():
    fds = [os.memfd_create(f"vmem-test-{os.getpid()}-{i}", os.MFD_CLOEXEC) for i in range(3)]
    try:
        with Pair(make_socket_pair) as pair:
            send_fds(pair.a, b"three", fds)
            with pytest.raises(TransportError, match="max_fds"):
                recv_fds(pair.b, 16, 1)
    finally:
        for fd in fds:
            os.close(fd)
    # the autouse fixture checks that no received fd stayed open


def test_channel_from_fd_rebuilds_a_passed_socket():
    """An end of a new pair travels over fd passing and is rebuilt as a channel."""
    with Pair(make_socket_pair) as carrier:
        inner_a, inner_b = channel_pair()
        with inner_a:
            send_fds(carrier.a, b"S", [inner_b.fileno()])
            inner_b.close()
            _, (fd,) = recv_fds(carrier.b, 1, 1)
            with channel_from_fd(fd) as rebuilt:
                inner_a.send(b"through a passed fd")
                assert rebuilt.recv_exact(19) == b"through a passed fd"


def test_channel_from_fd_rejects_datagram_and_leaves_fd_open():
    x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with x, y:
        with pytest.raises(ValueError):
            channel_from_fd(x.fileno())
        os.fstat(x.fileno())  # still open, still the caller's


CHILD_ECHO = """
import sys
from transport import channel_from_fd
with channel_from_fd(int(sys.argv[1])) as ch:
    n = int.from_bytes(ch.recv_exact(8), "little")
    buf = bytearray(n)
    ch.recv_into(buf)
    ch.send_parts([buf[::-1]])
"""


def test_channel_from_fd_in_child_process():
    parent, child = channel_pair()
    payload = as_bytes(random_bytes(5 * MiB + 1, seed=11))
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    proc = subprocess.Popen([sys.executable, "-c", CHILD_ECHO, str(child.fileno())],
                            pass_fds=[child.fileno()], env=env)
    try:
        child.close()  # the child holds its own copy now
        parent.settimeout(JOIN_TIMEOUT_S)
        parent.send_parts([len(payload).to_bytes(8, "little"), payload])
        assert parent.recv_exact(len(payload)) == payload[::-1]
        assert proc.wait(JOIN_TIMEOUT_S) == 0
    finally:
        parent.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# -- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("err", [
    TransportError("plain"),
    ChannelClosedError("closed by us"),
    ChannelBrokenError("peer went away", bytes_expected=4096, bytes_got=1000),
    ChannelBrokenError("reset"),
    ChannelTimeout("slow", bytes_expected=10, bytes_got=0),
], ids=lambda e: type(e).__name__)
def test_errors_pickle_with_their_context(err):
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err)
    assert str(copy) == str(err)
    assert copy.__dict__ == err.__dict__
    assert isinstance(copy, TransportError)


def test_broken_error_message_carries_counts():
    err = ChannelBrokenError("EOF", bytes_expected=4096, bytes_got=1000)
    assert "1000" in str(err) and "4096" in str(err)


# -- shaping ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, bytes_per_s", [
    ("1000", 1000.0),
    ("1000B/s", 1000.0),
    ("1.5", 1.5),
    ("10k", 10e3),
    ("10K", 10e3),
    ("10kB/s", 10e3),
    ("100M", 100e6),
    ("100MB", 100e6),
    ("2G", 2e9),
    ("2.5GB/s", 2.5e9),
    ("1e6", 1e6),
    (" 64 KiB ", 65536.0),
    ("100MiB/s", 100 * 1024.0 ** 2),
    ("1GiB", 1024.0 ** 3),
    ("800kbit", 100e3),
    ("100Mbit", 12.5e6),
    ("1Gbit", 125e6),
    ("1Gbit/s", 125e6),
    ("10gbit", 1.25e9),
    (12.5e6, 12.5e6),
])
def test_parse_rate(text, bytes_per_s):
    assert parse_rate(text) == pytest.approx(bytes_per_s, rel=1e-12)


@pytest.mark.parametrize("text", ["", "   ", "fast", "M", "0", "0M", "-1M", "-5", "1Mb",
                                  "1Mbps", "1 M B", "1..5M", "1Kib", "10x", "inf", "nan",
                                  "1e999", "1.5.3G", 0, -3.0])
def test_parse_rate_rejects(text):
    with pytest.raises(ValueError) as info:
        parse_rate(text)
    assert repr(text) in str(info.value)


class FakeClock:
    """A monotonic clock that only moves when someone sleeps."""

    def __init__(self):
        self.now_s = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now_s += seconds


def test_token_bucket_accounting():
    clock = FakeClock()
    bucket = TokenBucket(1000.0, burst_bytes=100, clock=clock, sleep=clock.sleep)
    assert (bucket.rate_Bps, bucket.burst_bytes) == (1000.0, 100)
    assert bucket.consume(100) == 0.0  # starts full
    assert bucket.consume(50) == pytest.approx(0.05)
    clock.now_s += 10.0  # idle: refills, but only up to the burst
    assert bucket.consume(100) == 0.0
    # a request of 10 bursts waits as long as ten burst-sized requests would
    assert bucket.consume(1000) == pytest.approx(1.0)
    assert bucket.wait_s == pytest.approx(1.05)
    assert len(clock.sleeps) == 2  # one sleep per wait: no spinning
    assert bucket.consume(0) == 0.0


def test_token_bucket_rearms_an_early_wakeup():
    clock = FakeClock()

    def short_sleep(seconds):  # a sleep that returns at half time
        clock.sleep(seconds / 2)

    bucket = TokenBucket(1000.0, burst_bytes=10, clock=clock, sleep=short_sleep)
    bucket.consume(10)
    start_s = clock.now_s
    bucket.consume(1000)
    assert clock.now_s - start_s >= 1.0
    assert len(clock.sleeps) < 64  # halving converges geometrically, never a tight loop


@pytest.mark.parametrize("rate, burst", [(0, None), (-1.0, None), (float("inf"), None),
                                         (float("nan"), None), (100.0, 0), (100.0, -5)])
def test_token_bucket_rejects(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


def test_shaped_channel_burst_defaults():
    assert transport.default_burst_bytes(20e6) == 200_000
    assert transport.default_burst_bytes(1.0) == 4096
    assert transport.default_burst_bytes(1e12) == 4 * MiB


@pytest.mark.serial
def test_shaped_channel_paces_to_its_rate():
    """Moving 4 MiB at 20 MB/s takes at least ~0.2 s (the limiter's definition; no upper
    bound is asserted: a loaded machine may always be slower)."""
    rate_Bps = 20e6
    data = random_bytes(4 * MiB, seed=12)
    a, b = channel_pair()
    shaped = ShapedChannel(a, rate_Bps)

    with Pair(lambda: (shaped, b)) as pair:
        receiver = pair.spawn(recv_all, pair.b, data.size)
        start_s = time.monotonic()
        pair.a.send_parts([data[:1000], data[1000:]])
        received = receiver.result()
        elapsed_s = time.monotonic() - start_s
        assert received == as_bytes(data)
        assert elapsed_s >= 0.9 * data.size / rate_Bps
        assert shaped.wait_s > 0


# -- architecture ----------------------------------------------------------------------------

def test_transport_imports_nothing_of_ours():
    code = ("import sys, transport; "
            "ours = [m for m in sys.modules if m.split('.')[0] in ('vmem', 'guests')]; "
            "assert not ours, ours")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=JOIN_TIMEOUT_S,
                   env=dict(os.environ, PYTHONPATH=REPO_ROOT))


def test_public_api_is_curated():
    for name in transport.__all__:
        assert hasattr(transport, name), name
    assert "_byte_view" not in transport.__all__
