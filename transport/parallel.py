"""Parallel data streams: page batches spread over N extra TCP connections (like QEMU multifd).

One migration has a *main* channel (the Xen-style stream, control records) and ``N`` *data*
streams.  The source's :class:`ParallelSender` hands each page batch to one stream's thread
(the least loaded); the threads send concurrently (``sendmsg`` and hashing release the GIL).
The destination's :class:`ParallelReceiver` has one reader thread per stream that receives
each batch into a staging buffer from a small pool and queues it for the consumer.

Ordering.  Batches on different streams arrive in any order.  A *barrier* restores order:
``sync_id = sender.barrier()`` puts a SYNC marker on every stream; the receiver never hands
out a batch sent after a barrier before every batch sent before it (per-stream queues are
held at the marker until all streams reach it).  So a page sent in two precopy rounds is
placed in round order provided the migrator calls ``barrier()`` between rounds (what QEMU
does with ``multifd_send_sync_main``), and ``receiver.barrier(sync_id, ...)`` -- called when
the main stream says "sync_id" -- returns only once every batch sent before that barrier
was consumed: the point where the destination may resume the guest.  Each batch also
carries a global sequence number (``seq``) for consumers that want to check.

Stream hello (sender -> receiver, first bytes on each data connection, after the optional
authentication; all integers little-endian)::

    0        4         5         6         7          8                    24
    +--------+---------+---------+---------+----------+--------------------+
    | "VMPD" | version | index   | count   | reserved | session id (16 B)  |
    +--------+---------+---------+---------+----------+--------------------+
    24                        28                 32
    | batch_pages_max u32     | page_bytes u32   |
    +-------------------------+------------------+

Messages on a data stream::

    0       2        3          4             8                    16
    +-------+--------+----------+-------------+--------------------+
    | "PB"  | kind   | reserved | count u32   | seq / sync id u64  |
    +-------+--------+----------+-------------+--------------------+
    BATCH (kind 1): then pfn[count] (u64 each), then count * page_bytes page bytes,
                    in pfn order; 1 <= count <= batch_pages_max
    SYNC  (kind 2): count = 0; the u64 is the barrier's sync id (1, 2, 3, ...)
    END   (kind 3): count = 0; the sender is done with this stream

The session id (16 random bytes from :func:`new_session_id`, announced on the main channel)
ties data connections to their migration; ``index``/``count`` let the receiver check that
it has all ``count`` streams.  Every count read from the wire is checked against
``batch_pages_max`` (itself capped at :data:`MAX_BATCH_PAGES`) before anything is allocated.
"""
from __future__ import annotations

import collections
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .channel import Channel, SocketChannel, _byte_view
from .errors import ChannelBrokenError, ChannelClosedError, ChannelTimeout, TransportError
from .secure import MacChannel, authenticate_client, authenticate_server
from .tcp import DEFAULT_CONNECT_TIMEOUT_S, accept_channel, connect_tcp

__all__ = [
    "ParallelError",
    "ParallelSender",
    "ParallelReceiver",
    "ReceivedBatch",
    "StreamHello",
    "new_session_id",
    "read_stream_hello",
    "DATA_PURPOSE",
    "MAX_BATCH_PAGES",
    "MAX_STREAMS",
    "SESSION_ID_BYTES",
]

PARALLEL_PROTOCOL_VERSION = 1
SESSION_ID_BYTES = 16
MAX_STREAMS = 64
# Most pages one batch may carry (16 MiB of 4 KiB pages): bounds a receiver's staging.
MAX_BATCH_PAGES = 4096
DEFAULT_BATCH_PAGES_MAX = 1024
PAGE_BYTES = 4096
# The purpose string data connections authenticate with (see transport.secure).
DATA_PURPOSE = "vmem-data"

_HELLO = struct.Struct("<4sBBBB16sII")
_HELLO_MAGIC = b"VMPD"
_MSG = struct.Struct("<2sBBIQ")
_MSG_MAGIC = b"PB"
_KIND_BATCH, _KIND_SYNC, _KIND_END = 1, 2, 3


class ParallelError(TransportError):
    """A data stream violated the protocol (bad hello, wrong session, oversized batch,
    missing streams) or the parallel machinery was used wrongly."""


def new_session_id() -> bytes:
    """16 random bytes naming one migration's set of data streams."""
    return secrets.token_bytes(SESSION_ID_BYTES)


@dataclass(frozen=True)
class StreamHello:
    """The first message of a data stream (layout in the module docstring)."""

    session_id: bytes
    index: int
    count: int
    batch_pages_max: int
    page_bytes: int

    def pack(self) -> bytes:
        return _HELLO.pack(_HELLO_MAGIC, PARALLEL_PROTOCOL_VERSION, self.index, self.count, 0,
                           self.session_id, self.batch_pages_max, self.page_bytes)


def read_stream_hello(channel: Channel, timeout_s: float | None = DEFAULT_CONNECT_TIMEOUT_S
                      ) -> StreamHello:
    """Read and validate a data stream's hello (for an accept loop that dispatches
    connections itself; :meth:`ParallelReceiver.accept` does this for you).

    Raises:
        ParallelError: not a data stream, another protocol version, bad fields.
        ChannelTimeout, ChannelBrokenError: from the channel.
    """
    previous = channel.gettimeout()
    channel.settimeout(timeout_s)
    try:
        raw = channel.recv_exact(_HELLO.size)
    finally:
        if not channel.closed:
            channel.settimeout(previous)
    magic, version, index, count, _reserved, session_id, batch_max, page_bytes = \
        _HELLO.unpack(raw)
    if magic != _HELLO_MAGIC:
        raise ParallelError(f"not a vmem data stream (hello starts with {raw[:4]!r})")
    if version != PARALLEL_PROTOCOL_VERSION:
        raise ParallelError(f"data stream protocol version {version}, we speak "
                            f"{PARALLEL_PROTOCOL_VERSION}")
    if not (1 <= count <= MAX_STREAMS and index < count):
        raise ParallelError(f"bad data stream index {index} of {count}")
    if not 1 <= batch_max <= MAX_BATCH_PAGES:
        raise ParallelError(f"batch_pages_max {batch_max} is outside 1..{MAX_BATCH_PAGES}")
    if page_bytes != PAGE_BYTES:
        raise ParallelError(f"page size {page_bytes} is not {PAGE_BYTES}")
    return StreamHello(session_id, index, count, batch_max, page_bytes)


def _close_all(channels: Sequence[Channel]) -> None:
    for channel in channels:
        channel.close()


def _shutdown_all(channels: Sequence[Channel]) -> None:
    """Wake threads blocked in send/recv on ``channels``, then close them.

    On Linux, closing an fd does not wake a thread blocked in a syscall on it;
    ``shutdown(SHUT_RDWR)`` does (the blocked call returns an error or EOF).
    """
    for channel in channels:
        inner: Any = channel
        while not isinstance(inner, SocketChannel) and hasattr(inner, "inner"):
            inner = inner.inner
        if isinstance(inner, SocketChannel) and not inner.closed:
            try:
                inner.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already disconnected
    _close_all(channels)


# -- sender -------------------------------------------------------------------------------

class _Outgoing:
    """One queued message for a stream worker."""

    __slots__ = ("header", "parts", "nbytes")

    def __init__(self, header: bytes, parts: list, nbytes: int):
        self.header = header
        self.parts = parts
        self.nbytes = nbytes


class ParallelSender:
    """Sends page batches over N data channels, one thread per channel.

    Args:
        channels: connected data channels (any :class:`Channel`; typically from
            :meth:`connect`), in stream-index order.  The sender owns them.
        session_id: announced in each stream's hello.
        batch_pages_max: the most pages one :meth:`send_batch` may carry (told to the
            receiver, which sizes its staging buffers by it).
        queue_batches: batches queued per stream before :meth:`send_batch` blocks
            (back-pressure: memory held by queued batches stays bounded).
        hellos_sent: the stream hellos were already sent (by :meth:`connect`); otherwise
            the constructor sends them.

    Thread model: one thread calls :meth:`send_batch`, :meth:`barrier`, :meth:`flush`,
    :meth:`close`.  Errors of a stream are sticky: the first one is re-raised by every
    later call.
    """

    def __init__(self, channels: Sequence[Channel], session_id: bytes, *,
                 batch_pages_max: int = DEFAULT_BATCH_PAGES_MAX, queue_batches: int = 4,
                 hellos_sent: bool = False):
        if not 1 <= len(channels) <= MAX_STREAMS:
            raise ValueError(f"need 1..{MAX_STREAMS} channels, got {len(channels)}")
        if len(session_id) != SESSION_ID_BYTES:
            raise ValueError(f"session_id must be {SESSION_ID_BYTES} bytes")
        if not 1 <= batch_pages_max <= MAX_BATCH_PAGES:
            raise ValueError(f"batch_pages_max must be in 1..{MAX_BATCH_PAGES}")
        if queue_batches < 1:
            raise ValueError("queue_batches must be >= 1")
        self._channels = list(channels)
        self._batch_pages_max = batch_pages_max
        self._queue_batches = queue_batches
        self._cond = threading.Condition()
        self._queues: list[collections.deque[_Outgoing]] = [collections.deque()
                                                            for _ in channels]
        # Bytes queued but not yet sent, per stream (the load used to pick a stream).
        self._queued_bytes = [0] * len(channels)
        # Messages taken by a worker but not finished (0 or 1 per stream).
        self._in_flight = [0] * len(channels)
        self._error: TransportError | None = None
        self._closing = False
        self._closed = False
        self._seq = 0
        self._sync_id = 0
        self._rr = 0
        # Payload bytes (pfns + pages) handed to each stream's channel.
        self.stream_bytes_sent = [0] * len(channels)
        self.batches_sent = 0
        count = len(channels)
        if not hellos_sent:
            try:
                for index, channel in enumerate(self._channels):
                    channel.send(StreamHello(session_id, index, count, batch_pages_max,
                                             PAGE_BYTES).pack())
            except BaseException:
                _close_all(self._channels)
                raise
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True,
                                          name=f"vmem-parallel-send-{i}")
                         for i in range(count)]
        for thread in self._threads:
            thread.start()

    @classmethod
    def connect(cls, host: str, port: int, session_id: bytes, n_streams: int, *,
                key: bytes | None = None, integrity: bool = False,
                timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, **kwargs) -> "ParallelSender":
        """Open ``n_streams`` data connections to ``host:port`` and return a sender.

        With ``key``, each connection authenticates (purpose :data:`DATA_PURPOSE`); with
        ``integrity`` too, each is wrapped in a :class:`~transport.secure.MacChannel`.

        Raises:
            ConnectError, AuthError: as :func:`connect_tcp` / :func:`authenticate_client`;
                connections opened so far are closed.
        """
        if integrity and key is None:
            raise ValueError("integrity needs a key")
        if not 1 <= n_streams <= MAX_STREAMS:
            raise ValueError(f"n_streams must be in 1..{MAX_STREAMS}, got {n_streams}")
        batch_pages_max = kwargs.get("batch_pages_max", DEFAULT_BATCH_PAGES_MAX)
        channels: list[Channel] = []
        try:
            for index in range(n_streams):
                channel: Channel = connect_tcp(host, port, timeout_s)
                channels.append(channel)
                if key is not None:
                    session_key = authenticate_client(channel, key, DATA_PURPOSE,
                                                      timeout_s=timeout_s)
                    if integrity:
                        channel = MacChannel(channel, session_key, "client")
                        channels[-1] = channel
                # The hello goes out before the next connect: a receiver accepting the
                # streams one by one reads each hello before accepting the next.
                channel.send(StreamHello(session_id, index, n_streams, batch_pages_max,
                                         PAGE_BYTES).pack())
        except BaseException:
            _close_all(channels)
            raise
        return cls(channels, session_id, hellos_sent=True, **kwargs)

    @property
    def n_streams(self) -> int:
        return len(self._channels)

    @property
    def batch_pages_max(self) -> int:
        return self._batch_pages_max

    @property
    def channels(self) -> list[Channel]:
        return list(self._channels)

    def _raise_error(self) -> None:
        err = self._error
        if err is None:
            return
        if isinstance(err, (ChannelBrokenError, ChannelTimeout)):
            raise ChannelBrokenError(f"a data stream failed: {err}") from err
        raise err  # e.g. AuthError, ChannelClosedError: keep the type the caller tests for

    def _enqueue(self, index: int, message: _Outgoing) -> None:
        """Append to stream ``index``'s queue, waiting while it is full.  Holds _cond."""
        while len(self._queues[index]) >= self._queue_batches and self._error is None:
            self._cond.wait()
        self._raise_error()
        self._queues[index].append(message)
        self._queued_bytes[index] += message.nbytes
        self._cond.notify_all()

    def send_batch(self, pfns: np.ndarray, buffers: Sequence[Any]) -> int:
        """Queue one batch: page ``pfns[i]`` is bytes ``[i*4096, (i+1)*4096)`` of the
        concatenation of ``buffers``.  Returns the batch's sequence number.

        ``buffers`` are not copied: a stream thread reads them after this returns, until
        :meth:`flush` or :meth:`close` returns.  Pass views of guest RAM
        (pre-copy tolerates a page changing meanwhile: it was re-armed before and will be
        resent) or buffers you do not reuse before then.  An empty batch is ignored.

        Raises:
            ValueError: ``pfns`` is not 1-D integers, has more than ``batch_pages_max``
                entries, or the buffers do not hold exactly ``len(pfns)`` pages.
            TransportError: a stream failed earlier (sticky) or the sender is closed.
        """
        pfns = np.asarray(pfns)
        if pfns.ndim != 1 or not np.issubdtype(pfns.dtype, np.integer):
            raise ValueError(f"pfns must be a 1-D integer array, got {pfns.dtype} "
                             f"{pfns.shape}")
        count = int(pfns.size)
        if count == 0:
            return self._seq
        if count > self._batch_pages_max:
            raise ValueError(f"batch of {count} pages exceeds batch_pages_max "
                             f"{self._batch_pages_max}")
        # Empty parts are skipped before _byte_view: a (0, 4096) array cannot be cast.
        views = [_byte_view(b) for b in buffers if memoryview(b).nbytes]
        nbytes = sum(v.nbytes for v in views)
        if nbytes != count * PAGE_BYTES:
            raise ValueError(f"buffers hold {nbytes} bytes, expected {count} pages = "
                             f"{count * PAGE_BYTES} bytes")
        wire_pfns = pfns.astype("<u8")  # a copy: the caller may reuse its pfn array
        with self._cond:
            self._check_usable()
            self._seq += 1
            seq = self._seq
            # Least queued bytes first; ties go round-robin so streams share evenly.
            n = len(self._queues)
            order = [(self._rr + k) % n for k in range(n)]
            index = min(order, key=lambda i: self._queued_bytes[i] + self._in_flight[i])
            self._rr = (index + 1) % n
            header = _MSG.pack(_MSG_MAGIC, _KIND_BATCH, 0, count, seq)
            self._enqueue(index, _Outgoing(header, [wire_pfns, *views],
                                           nbytes + wire_pfns.nbytes))
        return seq

    def _check_usable(self) -> None:
        if self._closed or self._closing:
            raise ChannelClosedError("parallel sender was closed")
        self._raise_error()

    def _put_everywhere(self, kind: int, value: int) -> None:
        header = _MSG.pack(_MSG_MAGIC, kind, 0, 0, value)
        for index in range(len(self._queues)):
            self._enqueue(index, _Outgoing(header, [], 0))

    def barrier(self) -> int:
        """Queue a SYNC marker on every stream after everything queued so far; return its
        sync id, to announce on the main channel.  The receiver's
        :meth:`ParallelReceiver.barrier` with that id returns once every batch queued
        before this call was consumed, and batches queued after it are never handed out
        before those.

        Does not wait for the data to leave (the receiver may still be busy: waiting here
        could deadlock a caller that also consumes); call :meth:`flush` to reuse buffers.

        Raises:
            TransportError: a stream failed (sticky).
        """
        with self._cond:
            self._check_usable()
            self._sync_id += 1
            sync_id = self._sync_id
            self._put_everywhere(_KIND_SYNC, sync_id)
        return sync_id

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until everything queued was handed to the kernel (buffers may be reused).

        Raises:
            TransportError: a stream failed (sticky).  ChannelTimeout: ``timeout_s`` passed.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while (any(self._queues) or any(self._in_flight)) and self._error is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ChannelTimeout(f"data streams did not drain within {timeout_s} s")
                self._cond.wait(remaining)
            self._raise_error()

    def _worker(self, index: int) -> None:
        channel = self._channels[index]
        queue = self._queues[index]
        while True:
            with self._cond:
                while not queue and not self._closed and self._error is None:
                    self._cond.wait()
                if not queue or self._error is not None:
                    return
                message = queue.popleft()
                self._queued_bytes[index] -= message.nbytes
                self._in_flight[index] = message.nbytes or 1
                self._cond.notify_all()  # room in the queue
            try:
                channel.send_parts([message.header, *message.parts])
            except BaseException as err:  # handed to the caller's thread, sticky
                with self._cond:
                    if self._error is None:
                        self._error = (err if isinstance(err, TransportError)
                                       else TransportError(f"data stream {index}: {err!r}"))
                    self._in_flight[index] = 0
                    self._cond.notify_all()
                return
            with self._cond:
                self._in_flight[index] = 0
                if message.parts:
                    self.batches_sent += 1
                    self.stream_bytes_sent[index] += message.nbytes
                self._cond.notify_all()

    def close(self, timeout_s: float | None = None) -> None:
        """Send END on every stream, wait for the queues to drain, stop the threads, close
        the channels.  Idempotent.  If a stream had failed, still closes everything, then
        raises that error."""
        if self._closed:
            return
        error: BaseException | None = None
        try:
            with self._cond:
                if self._error is None and not self._closing:
                    self._put_everywhere(_KIND_END, 0)
                self._closing = True
            self.flush(timeout_s)
        except BaseException as err:
            error = err
        self.abort()
        if error is not None:
            raise error

    def abort(self) -> None:
        """Close every channel at once (the receiver sees broken streams) and join the
        threads; queued batches are dropped.  Idempotent; never raises."""
        with self._cond:
            self._closed = True
            self._closing = True
            for queue in self._queues:
                queue.clear()
            self._cond.notify_all()
        _shutdown_all(self._channels)  # wakes a worker blocked in sendmsg
        for thread in self._threads:
            thread.join()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


# -- receiver -----------------------------------------------------------------------------

class ReceivedBatch:
    """One received batch: ``pages[i]`` is the content of page ``pfns[i]``.

    ``pfns`` (int64) and ``pages`` (``(count, 4096)`` uint8) are views into a staging slot
    of the stream's pool: call :meth:`release` (or use ``with``) when done, after which
    they must not be used.  Attributes: ``stream`` (index), ``seq`` (sender's batch number).
    """

    __slots__ = ("stream", "seq", "pfns", "pages", "_receiver", "_slot")

    def __init__(self, receiver: "ParallelReceiver", stream: int, slot: int, seq: int,
                 pfns: np.ndarray, pages: np.ndarray):
        self._receiver = receiver
        self.stream = stream
        self._slot = slot
        self.seq = seq
        self.pfns = pfns
        self.pages = pages

    def release(self) -> None:
        """Give the staging slot back to its stream; idempotent."""
        if self._slot is not None:
            self._receiver._release(self.stream, self._slot)
            self._slot = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()


class _Sync:
    __slots__ = ("sync_id",)

    def __init__(self, sync_id: int):
        self.sync_id = sync_id


_END = object()
_NO_MORE_BEFORE_BARRIER = object()


class ParallelReceiver:
    """Receives page batches from N data streams, one reader thread per stream.

    Args:
        streams: ``(channel, hello)`` per data stream (hellos from
            :func:`read_stream_hello`), all of one session, indices ``0..count-1`` exactly
            once; order does not matter.  The receiver owns the channels.
        slots_per_stream: staging buffers per stream (``batch_pages_max`` pages each); a
            reader waits for a free slot, which bounds memory and pushes back on the
            sender when the consumer is slow.

    Thread model: one consumer thread calls :meth:`get`, :meth:`barrier`, :meth:`drain`.
    A stream error (broken connection, protocol violation, integrity failure) is raised by
    the consumer's next call, and again by every later one (sticky).
    """

    def __init__(self, streams: Sequence[tuple[Channel, StreamHello]], *,
                 slots_per_stream: int = 3):
        channels = [channel for channel, _hello in streams]
        try:
            hellos = [hello for _channel, hello in streams]
            if not hellos:
                raise ParallelError("no data streams")
            first = hellos[0]
            if any(h.session_id != first.session_id or h.count != first.count
                   or h.batch_pages_max != first.batch_pages_max for h in hellos):
                raise ParallelError("data streams disagree on session, count or batch size")
            if sorted(h.index for h in hellos) != list(range(first.count)):
                raise ParallelError(f"expected data streams 0..{first.count - 1}, got "
                                    f"{sorted(h.index for h in hellos)}")
            if slots_per_stream < 1:
                raise ValueError("slots_per_stream must be >= 1")
        except BaseException:
            _close_all(channels)
            raise
        ordered = sorted(streams, key=lambda item: item[1].index)
        self._channels = [channel for channel, _hello in ordered]
        self.session_id = first.session_id
        self._batch_pages_max = first.batch_pages_max
        n = first.count
        self._cond = threading.Condition()
        self._items: list[collections.deque] = [collections.deque() for _ in range(n)]
        # Staging slots: pfns (slots, batch_max) u64 and pages (slots, batch_max, 4096).
        self._pfn_slots = [np.empty((slots_per_stream, self._batch_pages_max), dtype="<u8")
                           for _ in range(n)]
        self._page_slots = [np.empty((slots_per_stream, self._batch_pages_max, PAGE_BYTES),
                                     dtype=np.uint8) for _ in range(n)]
        self._free_slots = [list(range(slots_per_stream)) for _ in range(n)]
        # Last sync id each stream's consumer side passed; the epoch is their minimum
        # (ended streams do not hold it back).  A stream ahead of the epoch is held.
        self._synced = [0] * n
        self._ended = [False] * n
        self._error: TransportError | None = None
        self._closed = False
        self._rr = 0
        # Payload bytes (pfns + pages) received per stream, and batches handed out.
        self.stream_bytes_received = [0] * n
        self.batches_received = 0
        self._threads = [threading.Thread(target=self._reader, args=(i,), daemon=True,
                                          name=f"vmem-parallel-recv-{i}") for i in range(n)]
        for thread in self._threads:
            thread.start()

    @classmethod
    def accept(cls, listen_sock: socket.socket, session_id: bytes, n_streams: int, *,
               key: bytes | None = None, integrity: bool = False,
               timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, **kwargs) -> "ParallelReceiver":
        """Accept ``n_streams`` data connections of ``session_id`` on ``listen_sock``.

        With ``key`` each connection must authenticate (and with ``integrity`` is wrapped
        in a :class:`~transport.secure.MacChannel`), as in :meth:`ParallelSender.connect`.
        Connections of another session are closed and ignored.  ``timeout_s`` bounds the
        whole wait.

        Raises:
            ChannelTimeout: not all streams connected within ``timeout_s``.
            AuthError, ParallelError: a connection failed authentication or the hello.
        """
        if integrity and key is None:
            raise ValueError("integrity needs a key")
        deadline = time.monotonic() + timeout_s
        streams: list[tuple[Channel, StreamHello]] = []
        try:
            while len(streams) < n_streams:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ChannelTimeout(f"only {len(streams)} of {n_streams} data streams "
                                         f"connected within {timeout_s} s")
                channel: Channel
                channel, _peer = accept_channel(listen_sock, remaining)
                try:
                    if key is not None:
                        _purpose, session_key = authenticate_server(
                            channel, key, timeout_s=max(remaining, 0.1))
                        if integrity:
                            channel = MacChannel(channel, session_key, "server")
                    hello = read_stream_hello(channel, max(remaining, 0.1))
                except BaseException:
                    channel.close()
                    raise
                if hello.session_id != session_id:
                    channel.close()  # a stray connection of another migration
                    continue
                if hello.count != n_streams:
                    channel.close()
                    raise ParallelError(f"sender opened {hello.count} data streams, we "
                                        f"expect {n_streams}")
                streams.append((channel, hello))
        except BaseException:
            _close_all([channel for channel, _hello in streams])
            raise
        return cls(streams, **kwargs)

    @property
    def n_streams(self) -> int:
        return len(self._channels)

    @property
    def batch_pages_max(self) -> int:
        return self._batch_pages_max

    @property
    def epoch(self) -> int:
        """The highest sync id every stream has passed (all earlier batches consumed)."""
        with self._cond:
            return self._epoch_locked()

    def _epoch_locked(self) -> int:
        live = [s for s, ended in zip(self._synced, self._ended) if not ended]
        return min(live) if live else max(self._synced, default=0)

    # -- reader threads -------------------------------------------------------------------

    def _reader(self, index: int) -> None:
        channel = self._channels[index]
        header = bytearray(_MSG.size)
        try:
            while True:
                channel.recv_into(header)
                magic, kind, _reserved, count, value = _MSG.unpack(header)
                if magic != _MSG_MAGIC:
                    raise ParallelError(f"data stream {index}: bad message magic "
                                        f"{bytes(header[:2])!r}")
                if kind == _KIND_END:
                    self._push(index, _END)
                    return
                if kind == _KIND_SYNC:
                    self._push(index, _Sync(value))
                    continue
                if kind != _KIND_BATCH or not 1 <= count <= self._batch_pages_max:
                    raise ParallelError(f"data stream {index}: bad message kind {kind} / "
                                        f"count {count} (max {self._batch_pages_max})")
                slot = self._take_slot(index)
                if slot is None:
                    return  # closing
                pfns = self._pfn_slots[index][slot, :count]
                pages = self._page_slots[index][slot, :count]
                channel.recv_into(pfns)
                channel.recv_into(pages)
                self.stream_bytes_received[index] += pfns.nbytes + pages.nbytes
                self._push(index, ReceivedBatch(self, index, slot, value,
                                                pfns.view(np.int64), pages))
        except BaseException as err:
            with self._cond:
                if not self._closed and self._error is None:
                    if isinstance(err, ChannelBrokenError):
                        err = ChannelBrokenError(f"data stream {index} broke before END: "
                                                 f"{err.reason}")
                    elif not isinstance(err, TransportError):
                        err = TransportError(f"data stream {index}: {err!r}")
                    self._error = err
                self._cond.notify_all()

    def _take_slot(self, index: int) -> int | None:
        with self._cond:
            while not self._free_slots[index] and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            return self._free_slots[index].pop()

    def _release(self, index: int, slot: int) -> None:
        with self._cond:
            self._free_slots[index].append(slot)
            self._cond.notify_all()

    def _push(self, index: int, item: Any) -> None:
        with self._cond:
            self._items[index].append(item)
            self._cond.notify_all()

    # -- consumer -------------------------------------------------------------------------

    def _next(self, timeout_s: float | None, until_epoch: int | None):
        """The next deliverable batch; ``None`` once every stream ended;
        ``_NO_MORE_BEFORE_BARRIER`` once the epoch reached ``until_epoch``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        n = len(self._items)
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._sticky()
                if self._closed:
                    raise ChannelClosedError("parallel receiver was closed")
                epoch = self._epoch_locked()
                if until_epoch is not None and epoch >= until_epoch:
                    return _NO_MORE_BEFORE_BARRIER
                progressed = False
                for k in range(n):
                    i = (self._rr + k) % n
                    queue = self._items[i]
                    # A stream past the epoch's barrier is held until all streams reach it.
                    if not queue or self._synced[i] > epoch:
                        continue
                    item = queue.popleft()
                    if isinstance(item, ReceivedBatch):
                        self._rr = (i + 1) % n
                        self.batches_received += 1
                        return item
                    if isinstance(item, _Sync):
                        if item.sync_id <= self._synced[i]:
                            self._error = ParallelError(f"data stream {i}: sync ids out of "
                                                        f"order ({item.sync_id})")
                            raise self._sticky()
                        self._synced[i] = item.sync_id
                    else:  # _END
                        self._ended[i] = True
                    progressed = True
                    break
                if progressed:
                    continue
                if all(self._ended):
                    if until_epoch is not None:
                        self._error = ParallelError(
                            f"every data stream ended before barrier {until_epoch}")
                        raise self._sticky()
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ChannelTimeout(f"no data batch within {timeout_s} s")
                self._cond.wait(remaining)

    def _sticky(self) -> TransportError:
        err = self._error
        assert err is not None
        copy = ChannelBrokenError(str(err)) if isinstance(err, ChannelBrokenError) else err
        return copy

    def get(self, timeout_s: float | None = None) -> ReceivedBatch | None:
        """The next batch (call ``release()`` on it), or ``None`` once every stream ended.

        Batches sent after a sender barrier are never returned before all batches sent
        before it.

        Raises:
            TransportError (sticky): a stream broke, violated the protocol or failed its
                integrity check.  ChannelTimeout: nothing arrived within ``timeout_s``.
        """
        return self._next(timeout_s, None)

    def barrier(self, sync_id: int, on_batch: Callable[[np.ndarray, np.ndarray], None],
                timeout_s: float | None = None) -> int:
        """Consume batches, calling ``on_batch(pfns, pages)`` for each (then releasing it),
        until every stream has passed sync marker ``sync_id``; return the number consumed.

        On return every batch the sender queued before its ``barrier()`` returned
        ``sync_id`` has been passed to ``on_batch``.

        Raises:
            as :meth:`get`; ParallelError if every stream ended before the marker.
        """
        consumed = 0
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
            item = self._next(remaining, sync_id)
            if item is _NO_MORE_BEFORE_BARRIER:
                return consumed
            with item:
                on_batch(item.pfns, item.pages)
            consumed += 1

    def drain(self, on_batch: Callable[[np.ndarray, np.ndarray], None],
              timeout_s: float | None = None) -> int:
        """Consume batches until every stream sent END; return the number consumed."""
        consumed = 0
        while True:
            item = self._next(timeout_s, None)
            if item is None:
                return consumed
            with item:
                on_batch(item.pfns, item.pages)
            consumed += 1

    def close(self) -> None:
        """Close every channel and join the reader threads; idempotent, never raises."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        _shutdown_all(self._channels)  # wakes readers blocked in recv
        for thread in self._threads:
            thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
