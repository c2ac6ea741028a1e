"""One byte stream over several connections: :class:`StripedChannel` (``--parallel N``).

Like QEMU's multifd, but below the stream rather than in it: the migrator and the
destination see one ordinary :class:`~transport.channel.Channel` and need no change.  A
large ``send_parts`` is cut into chunks spread over the connections, each sent by its own
thread (``sendmsg``, and a :class:`~transport.secure.MacChannel`'s HMAC, release the GIL);
every connection has a reader thread on the receiving side (kernel receive work and MAC
verification run in parallel) and the chunks are handed out in order by sequence number.
Small sends (control records) travel on the *main* connection whole, from the caller's
thread: no thread hand-off on the latency path, and the main connection has TCP_NODELAY.

Data connections are one-way: the side that opened them sends on them (``outgoing``), the
other side only reads them (``incoming``).  The main connection carries both directions.
(A TLS connection must not be read and written by two threads at once, and the migration's
bulk goes one way anyway.)

Every piece on every connection is framed (little-endian)::

    0      2        3          4              8                  16
    +------+--------+----------+--------------+------------------+
    | "VS" | kind   | reserved | length u32   | seq u64          |  then `length` bytes
    +------+--------+----------+--------------+------------------+
    kind 1 = DATA (1 <= length <= MAX_PIECE_BYTES); seq counts pieces of one direction
    from 0 over all connections together; a receiver hands bytes out in seq order.

The end of the stream is each connection's EOF at a piece boundary.  A connection that
ends inside a piece, a gap in the sequence at the end, a bad header, or a connection that
fails breaks the receive direction (sticky).  Integrity, if wanted, comes from the
connections (each a MacChannel under its own session key): a piece moved from one
connection to another fails its MAC there, and a missing piece leaves a gap.
"""
from __future__ import annotations

import copy
import queue
import struct
import threading
import time
from collections.abc import Sequence

from .channel import Channel, _cut_views
from .errors import ChannelBrokenError, ChannelClosedError, ChannelTimeout, TransportError

__all__ = ["StripedChannel", "STRIPE_CHUNK_BYTES", "STRIPE_MIN_BYTES", "MAX_PIECE_BYTES"]

_PIECE = struct.Struct("<2sBBIQ")
_MAGIC = b"VS"
_KIND_DATA = 1
PIECE_HEADER_BYTES = _PIECE.size
#: Chunk size of a striped send: header + chunk = exactly one 1 MiB MacChannel frame.
STRIPE_CHUNK_BYTES = (1 << 20) - PIECE_HEADER_BYTES
#: Sends smaller than this go whole on the main connection (control records, headers).
STRIPE_MIN_BYTES = 256 << 10
#: Largest piece a receiver accepts (bounds its buffers whatever the peer says).
MAX_PIECE_BYTES = 4 << 20
# Receive buffers per connection (flow control: a reader waits when the consumer lags).
_BUFFERS_PER_LINK = 6
# A piece at most this big is received into a fresh bytes object, not a pooled buffer.
_SMALL_PIECE_BYTES = 64 << 10
# How long close() waits for each of its threads.
_JOIN_TIMEOUT_S = 5.0


class _Piece:
    __slots__ = ("view", "pos", "release")

    def __init__(self, view: memoryview, release):
        self.view = view
        self.pos = 0
        self.release = release


class _LinkThread(threading.Thread):
    """A daemon thread that serves one connection of a :class:`StripedChannel`."""

    def __init__(self, owner: "StripedChannel", link: Channel, name: str):
        super().__init__(name=name, daemon=True)
        self.owner = owner
        self.link = link


class _Reader(_LinkThread):
    """Reads pieces from one connection into pooled buffers and files them by seq."""

    def __init__(self, owner: "StripedChannel", link: Channel, index: int):
        super().__init__(owner, link, f"vmem-stripe-rx{index}")
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(_BUFFERS_PER_LINK):
            self.free.put(bytearray(STRIPE_CHUNK_BYTES))
        self.done = False        # reached EOF at a piece boundary
        self.last_seq = -1

    def run(self) -> None:
        owner = self.owner
        try:
            while True:
                head = self.link.recv_some(_PIECE.size)
                if not head:
                    break
                if len(head) < _PIECE.size:
                    head += self.link.recv_exact(_PIECE.size - len(head))
                magic, kind, _reserved, length, seq = _PIECE.unpack(head)
                if magic != _MAGIC or kind != _KIND_DATA or not 0 < length <= MAX_PIECE_BYTES \
                        or seq <= self.last_seq:
                    raise TransportError(f"striped channel: bad piece header (magic {magic!r}, kind "
                                         f"{kind}, length {length}, seq {seq} after {self.last_seq}); "
                                         f"corrupt or not a striped peer")
                self.last_seq = seq
                if length <= _SMALL_PIECE_BYTES:
                    view, release = memoryview(self.link.recv_exact(length)), None
                elif length <= STRIPE_CHUNK_BYTES:
                    buf = self.free.get()
                    if buf is None:  # close() unblocked us
                        return
                    view = memoryview(buf)[:length]
                    self.link.recv_into(view)
                    release = buf
                else:
                    view, release = memoryview(bytearray(length)), None
                    self.link.recv_into(view)
                owner._file(seq, _Piece(view, (self.free, release) if release is not None else None))
        except BaseException as err:  # reported to the consumer, never lost
            owner._reader_failed(err)
            return
        self.done = True
        owner._reader_done()


class _Sender(_LinkThread):
    """Sends the pieces queued for one outgoing data connection, in order."""

    def __init__(self, owner: "StripedChannel", link: Channel, index: int):
        super().__init__(owner, link, f"vmem-stripe-tx{index}")
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            parts, index, call = job
            try:
                if call.error is not None:
                    raise call.error
                self.link.send_parts(parts)
            except BaseException as err:
                call.finish(index, err)
            else:
                call.finish(index, None)


class _Call:
    """One send_parts call's outstanding pieces on the sender threads."""

    def __init__(self, pending: int):
        self.pending = pending
        self.done: set[int] = set()   # indexes of the pieces sent whole
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def finish(self, index: int, error: BaseException | None) -> None:
        with self.cond:
            self.pending -= 1
            if error is None:
                self.done.add(index)
            elif self.error is None:
                self.error = error
            self.cond.notify_all()


class StripedChannel(Channel):
    """A :class:`~transport.channel.Channel` striped over ``main`` + data connections.

    Args:
        main: the connection that carries small sends and both directions.
        outgoing: data connections this side sends on (the migration source's).
        incoming: data connections this side receives on (the destination's).
        chunk_bytes: how large sends are cut (default :data:`STRIPE_CHUNK_BYTES`).

    The channel owns every connection.  Contract differences from a socket channel:
    :meth:`fileno` is the main connection's fd, which its reader thread consumes (do not
    poll it; use :meth:`wait_readable`); :meth:`settimeout` bounds receives and the wait
    for a striped send's data connections, not a send on ``main`` itself.  ``bytes_sent``
    / ``bytes_received`` count stream bytes (no piece headers).
    """

    def __init__(self, main: Channel, outgoing: Sequence[Channel] = (), incoming: Sequence[Channel] = (),
                 *, chunk_bytes: int = STRIPE_CHUNK_BYTES):
        if not 0 < chunk_bytes <= STRIPE_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in 1..{STRIPE_CHUNK_BYTES}")
        super().__init__()
        self._main = main
        self._out = list(outgoing)
        self._in = list(incoming)
        self._chunk_bytes = chunk_bytes
        self._timeout: float | None = None
        # sending
        self._send_seq = 0
        self._next_link = 0   # round-robin position over [main, *outgoing]
        self._senders = [_Sender(self, link, i + 1) for i, link in enumerate(self._out)]
        # receiving
        self._cond = threading.Condition()
        self._pieces: dict[int, _Piece] = {}
        self._recv_seq = 0
        self._current: _Piece | None = None
        self._reader_error: BaseException | None = None
        self._readers_left = 1 + len(self._in)
        self._readers = [_Reader(self, link, i) for i, link in enumerate([main, *self._in])]
        for t in (*self._senders, *self._readers):
            t.start()

    def __repr__(self) -> str:
        return (f"<StripedChannel {1 + len(self._out)} out / {1 + len(self._in)} in "
                f"sent={self._bytes_sent} received={self._bytes_received}>")

    @property
    def links(self) -> list[Channel]:
        """Every connection: main first."""
        return [self._main, *self._out, *self._in]

    # -- sending --------------------------------------------------------------------------

    def _header(self, length: int) -> bytes:
        head = _PIECE.pack(_MAGIC, _KIND_DATA, 0, length, self._send_seq)
        self._send_seq += 1
        return head

    def _send(self, views: list[memoryview], total: int) -> None:
        if not total:
            return
        # Cut into pieces of at most chunk_bytes; a small send is one piece on main, a large
        # one goes round-robin over [main, *outgoing] (continuing where the last call ended).
        nlinks = 1 + len(self._senders) if total >= STRIPE_MIN_BYTES else 1
        on_main: list = []
        jobs: list[tuple[int, list, int]] = []
        first_seq = self._send_seq
        position = self._next_link if nlinks > 1 else 0
        sizes: list[int] = []      # payload bytes of each piece, in seq order
        main_pieces: list[int] = []  # indexes of the pieces on main
        for cur, cur_bytes in _cut_views(views, self._chunk_bytes):
            piece = [self._header(cur_bytes), *cur]
            link = position % nlinks
            if link == 0:
                on_main.extend(piece)
                main_pieces.append(len(sizes))
            else:
                jobs.append((link, piece, len(sizes)))
            sizes.append(cur_bytes)
            position += 1
        if nlinks > 1:
            self._next_link = position % nlinks
        call = _Call(len(jobs))
        for link, piece, index in jobs:
            self._senders[link - 1].jobs.put((piece, index, call))
        error: BaseException | None = None
        main_done = len(main_pieces)
        try:
            if on_main:
                self._main.send_parts(on_main)
        except BaseException as err:
            error = err
            if call.error is None:
                call.error = err  # the senders skip what is still queued
            wire = getattr(err, "bytes_got", 0) or 0
            main_done = 0
            for index in main_pieces:
                wire -= PIECE_HEADER_BYTES + sizes[index]
                if wire < 0:
                    break
                main_done += 1
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        with call.cond:
            while call.pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    error = error or ChannelTimeout(f"send: data connections made no progress within "
                                                    f"{self._timeout} s")
                    break
                call.cond.wait(left)
            error = error or call.error
        if error is not None:
            if (not jobs and isinstance(error, ChannelTimeout) and not error.bytes_got):
                self._send_seq = first_seq  # nothing went out: the channel stays usable
                raise ChannelTimeout(error.reason, bytes_expected=total, bytes_got=0) from error
            # What surely went out: the longest run of leading pieces that were sent whole.
            done = set(main_pieces[:main_done]) | call.done
            got = 0
            for index, nbytes in enumerate(sizes):
                if index not in done:
                    break
                got += nbytes
            self._bytes_sent += got
            self._send_failed(error, total, got)
        self._bytes_sent += total

    def _send_failed(self, err: BaseException, total: int, got: int):
        """Raise the error of a send that may have put pieces on the wire: queued on a data
        connection or partly on main, whatever ``got`` says, so the send side breaks."""
        if isinstance(err, ChannelClosedError) and self._closed:
            raise err
        if isinstance(err, TransportError) and not isinstance(err, (ChannelBrokenError, ChannelTimeout)):
            outer: TransportError = err  # e.g. AuthError: keep its type and message
        else:
            reason = getattr(err, "reason", None) or str(err)
            cls = ChannelTimeout if isinstance(err, ChannelTimeout) else ChannelBrokenError
            outer = cls(reason, bytes_expected=total, bytes_got=got)
        self._fail("send", outer, total)
        if outer is err:
            raise outer
        raise outer from err

    # -- receiving ------------------------------------------------------------------------

    def _file(self, seq: int, piece: _Piece) -> None:
        with self._cond:
            self._pieces[seq] = piece
            if seq == self._recv_seq:
                self._cond.notify_all()

    def _reader_failed(self, err: BaseException) -> None:
        with self._cond:
            if self._reader_error is None and not self._closed:
                self._reader_error = err
            self._readers_left -= 1
            self._cond.notify_all()

    def _reader_done(self) -> None:
        with self._cond:
            self._readers_left -= 1
            self._cond.notify_all()

    def _ready(self) -> bool:
        return (self._current is not None or self._recv_seq in self._pieces or self._reader_error is not None
                or self._readers_left == 0 or self._closed)

    def _next_piece(self, need: int, got: int) -> _Piece | None:
        """The piece to read from next (waiting for it); None at a clean end of stream.
        Called with ``self._cond`` held."""
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            piece = self._current
            if piece is not None:
                return piece
            piece = self._pieces.pop(self._recv_seq, None)
            if piece is not None:
                self._recv_seq += 1
                self._current = piece
                return piece
            if self._closed:
                raise ChannelClosedError("recv: channel was closed by this side")
            if self._reader_error is not None:
                err = self._reader_error
                if getattr(err, "repeats_as_itself", False):
                    raise self._fail("recv", copy.copy(err), got) from err  # e.g. AuthError
                reason = getattr(err, "reason", None) or str(err)
                raise self._fail("recv", ChannelBrokenError(f"recv: {reason}", bytes_expected=need,
                                                            bytes_got=got), got) from err
            if self._readers_left == 0:
                if self._pieces:
                    raise self._fail("recv", ChannelBrokenError(
                        f"recv: piece #{self._recv_seq} never arrived (the stream has a gap: a connection "
                        f"was cut)", bytes_expected=need, bytes_got=got), got)
                return None
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise self._fail("recv", ChannelTimeout(f"recv: no progress within {self._timeout} s",
                                                        bytes_expected=need, bytes_got=got), got)
            self._cond.wait(left)

    def _consume(self, piece: _Piece, n: int) -> None:
        piece.pos += n
        self._bytes_received += n
        if piece.pos == piece.view.nbytes:
            self._current = None
            if piece.release is not None:
                pool, buf = piece.release
                pool.put(buf)

    def _recv_into(self, buf: memoryview) -> None:
        need = buf.nbytes
        got = 0
        with self._cond:
            try:
                while got < need:
                    piece = self._next_piece(need, got)
                    if piece is None:
                        raise self._fail("recv", ChannelBrokenError("recv: peer closed the connection (EOF)",
                                                                    bytes_expected=need, bytes_got=got), got)
                    n = min(piece.view.nbytes - piece.pos, need - got)
                    buf[got:got + n] = piece.view[piece.pos:piece.pos + n]
                    got += n
                    self._consume(piece, n)
            except TransportError:
                raise
            except BaseException:
                self._interrupted("recv", need, got)
                raise

    def _recv_some(self, max_bytes: int) -> bytes:
        with self._cond:
            piece = self._next_piece(max_bytes, 0)
            if piece is None:
                return b""
            n = min(piece.view.nbytes - piece.pos, max_bytes)
            data = bytes(piece.view[piece.pos:piece.pos + n])
            self._consume(piece, n)
            return data

    def wait_readable(self, timeout_s: float | None) -> bool:
        self._check_open()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while not self._ready():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # -- settings and lifetime ------------------------------------------------------------

    def _set_timeout(self, timeout_s: float | None) -> None:
        self._timeout = timeout_s

    def gettimeout(self) -> float | None:
        self._check_open()
        return self._timeout

    def fileno(self) -> int:
        self._check_open()
        return self._main.fileno()

    def unsent_bytes(self) -> int:
        return sum(link.unsent_bytes() for link in (self._main, *self._out))

    def shutdown(self) -> None:
        for link in self.links:
            link.shutdown()

    def close(self) -> None:
        if self._closed:
            return
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.shutdown()  # wakes the reader and sender threads blocked in their connections
        for sender in self._senders:
            sender.jobs.put(None)
        for reader in self._readers:
            reader.free.put(None)
        current = threading.current_thread()
        for t in (*self._senders, *self._readers):
            if t is not current:
                t.join(_JOIN_TIMEOUT_S)
        for link in self.links:
            link.close()
