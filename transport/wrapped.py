"""Channels over another channel: :class:`WrappedChannel` and :class:`FramedChannel`.

A :class:`WrappedChannel` turns the bytes of ``inner`` into something else (paced bytes,
frames with a MAC, compressed frames...).  ``bytes_sent``/``bytes_received`` count the
caller's bytes; ``wire_bytes_*`` count what went through ``inner``.  Timeouts, the fd, the
unsent count, shutting down and closing are ``inner``'s.

A :class:`FramedChannel` is a wrapped channel whose peer sends self-contained frames
(:class:`~transport.secure.MacChannel`, :class:`~transport.compressed.CompressedChannel`):
the receive loops, the end-of-stream state and the receive error rules live here; a
subclass only reads and checks one frame (:meth:`FramedChannel._read_frame`).
"""
from __future__ import annotations

import abc

from .channel import Channel
from .errors import ChannelBrokenError, ChannelTimeout, TransportError

__all__ = ["WrappedChannel", "FramedChannel"]


class WrappedChannel(Channel):
    """Base class: a channel that owns ``inner`` and delegates its lifetime to it.

    The wrapper is closed exactly when ``inner`` is: closing one closes the other.
    """

    def __init__(self, inner: Channel):
        super().__init__()
        self._inner = inner

    @property
    def inner(self) -> Channel:
        return self._inner

    @property
    def closed(self) -> bool:
        return self._inner.closed

    @property
    def wire_bytes_sent(self) -> int:
        """Bytes handed to ``inner``, framing included."""
        return self._inner.bytes_sent

    @property
    def wire_bytes_received(self) -> int:
        return self._inner.bytes_received

    def _set_timeout(self, timeout_s: float | None) -> None:
        self._inner.settimeout(timeout_s)

    def gettimeout(self) -> float | None:
        return self._inner.gettimeout()

    def fileno(self) -> int:
        return self._inner.fileno()

    def unsent_bytes(self) -> int:
        return self._inner.unsent_bytes()

    def shutdown(self) -> None:
        self._inner.shutdown()

    def close(self) -> None:
        self._inner.close()


class FramedChannel(WrappedChannel):
    """A wrapped channel that receives whole frames from ``inner``.

    Receive guarantees (for every subclass): a frame's bytes are handed out only once the
    whole frame was read and checked (:meth:`_read_frame`), in order; a clean end of
    ``inner`` at a frame boundary is a plain end of stream (``recv_some`` returns ``b""``,
    ``recv_into`` raises ``ChannelBrokenError`` with the counts); a failure that consumed
    part of a frame, or handed out part of the caller's buffer, breaks the receive side
    (sticky) -- an integrity or corruption error is then raised again as itself.

    Args:
        inner: the channel the frames travel on (owned).
        rx_buffer: where a frame is decoded when it cannot go straight to the caller; at
            least as large as the largest frame's contents.
    """

    def __init__(self, inner: Channel, rx_buffer: memoryview):
        super().__init__(inner)
        # Checked bytes of the current frame not yet handed out: _rx_view[_rx_pos:_rx_end].
        self._rx_view = rx_buffer
        self._rx_pos = 0
        self._rx_end = 0
        self._eof = False  # inner ended cleanly at a frame boundary

    @abc.abstractmethod
    def _read_frame(self, room: memoryview | None) -> int | None:
        """Read and check the next frame from ``inner``.

        Returns ``None`` at a clean end of stream (EOF before the frame's first byte).
        Otherwise either writes the frame's bytes straight into ``room`` (the caller's
        unfilled buffer; only if ``room`` is given and the frame fits) and returns how many,
        or writes them to ``_rx_view[:n]``, calls ``self._buffered(n)`` and returns 0.

        Raises: any TransportError; the loops here count and record it.
        """

    def _buffered(self, n_bytes: int) -> None:
        self._rx_pos, self._rx_end = 0, n_bytes

    def _next_frame(self, room: memoryview | None) -> int | None:
        if self._eof:
            return None
        placed = self._read_frame(room)
        if placed is None:
            self._eof = True
        return placed

    def _recv_failed(self, err: TransportError, need: int | None, got: int,
                     wire_before: int) -> TransportError:
        """Count ``err`` for this layer (``got`` of ``need`` stream bytes) and record it
        if it left the stream broken (the bytes consumed from ``inner`` since
        ``wire_before`` count as moved: a half-read frame loses the framing)."""
        moved = got + (self._inner.bytes_received - wire_before)
        if isinstance(err, (ChannelBrokenError, ChannelTimeout)):
            err = type(err)(err.reason, bytes_expected=need, bytes_got=got)
        return self._fail("recv", err, moved)

    def _recv_into(self, buf: memoryview) -> None:
        need = buf.nbytes
        got = 0
        wire_before = self._inner.bytes_received
        try:
            while got < need:
                if self._rx_pos < self._rx_end:
                    n = min(self._rx_end - self._rx_pos, need - got)
                    buf[got:got + n] = self._rx_view[self._rx_pos:self._rx_pos + n]
                    self._rx_pos += n
                else:
                    n = self._next_frame(buf[got:])
                    if n is None:
                        raise ChannelBrokenError("recv: peer closed the connection (EOF)",
                                                 bytes_expected=need, bytes_got=got)
                got += n
                self._bytes_received += n
        except TransportError as err:
            raise self._recv_failed(err, need, got, wire_before) from err
        except BaseException:
            self._interrupted("recv", need, got)
            raise

    def _recv_some(self, max_bytes: int) -> bytes:
        if self._rx_pos == self._rx_end:
            wire_before = self._inner.bytes_received
            try:
                if self._next_frame(None) is None:
                    return b""
            except TransportError as err:
                raise self._recv_failed(err, None, 0, wire_before) from err
        n = min(self._rx_end - self._rx_pos, max_bytes)
        data = bytes(self._rx_view[self._rx_pos:self._rx_pos + n])
        self._rx_pos += n
        self._bytes_received += n
        return data

    def wait_readable(self, timeout_s: float | None) -> bool:
        """True if checked bytes are buffered or ``inner`` is readable.  A receive may still
        wait for the rest of a frame that has only begun to arrive."""
        self._check_open()
        if self._rx_pos < self._rx_end or self._recv_error is not None:
            return True
        return self._inner.wait_readable(timeout_s)
