"""Byte channels: the :class:`Channel` contract and :class:`SocketChannel` over a stream socket.

A channel is a reliable, ordered, full-duplex byte stream with no message boundaries; framing
is the caller's business (``vmem.format.stream``).  Bulk data moves without Python-level joins:
:meth:`Channel.send_parts` hands a list of buffers to ``sendmsg`` (scatter/gather) and
:meth:`Channel.recv_into` fills a caller-owned buffer in place.

Thread model: one thread may send while another receives (the two directions are
independent); two threads must not send (or receive) on the same channel at once.

Errors (see :mod:`transport.errors`): using a channel after :meth:`Channel.close` raises
``ChannelClosedError``; a peer that closed or reset raises ``ChannelBrokenError``; a timeout
raises ``ChannelTimeout``.  A failure that leaves a direction half-way through a call (the
framing is lost) makes that direction *sticky-broken*: every later call in that direction
raises ``ChannelBrokenError`` without touching the socket, chained to the first error (an
integrity or corruption error -- ``repeats_as_itself`` -- is raised again as itself).  The
rules live once, in :class:`Channel`; every implementation inherits them.
"""
from __future__ import annotations

import abc
import copy
import errno
import math
import os
import select
import socket
from collections.abc import Iterator, Sequence
from typing import Any

from .errors import ChannelBrokenError, ChannelClosedError, ChannelTimeout, TransportError

__all__ = [
    "IOV_MAX",
    "SOCKET_BUFFER_BYTES",
    "MAX_IO_BYTES",
    "Channel",
    "SocketChannel",
    "channel_pair",
    "channel_from_fd",
    "send_fds",
    "recv_fds",
    "set_tcp_nodelay",
]

# Most buffers one sendmsg() accepts (Linux UIO_MAXIOV); more gives EMSGSIZE.
IOV_MAX: int = min(os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024, 1024)

# Socket buffer size channel_pair() asks for.  A unix stream socket cuts a write into skbs of
# at most about sndbuf/2, so a big buffer means fewer wake-ups per MiB moved.  The kernel
# silently caps the request at net.core.wmem_max / rmem_max.
SOCKET_BUFFER_BYTES: int = 4 << 20

#: A receive step of at least this many bytes on TCP waits with SO_RCVLOWAT raised to it
#: (``SocketChannel._recv_into``): one wake-up when the bytes are there, not one per arrival.
RCVLOWAT_MIN_BYTES: int = 64 << 10

# Most bytes one send or receive system call of a SocketChannel moves.  A kernel that does
# not preempt inside system calls (PREEMPT_NONE, this VM's: `vmem doctor` says which) lets a
# thread that copies 4 MiB into or out of a socket hold its CPU for ~1 ms, and a woken thread
# of any priority -- a post-copy fault thread, the guest -- waits until it is done (sched
# traces showed fault threads waiting up to 4 ms so).  Calls of 256 KiB hold it ~0.1 ms.
# What it buys is within this VM's noise (2026-12-06, one host, pure post-copy of a 1 GiB
# guest at 5,000 pages/s, 21 interleaved pairs against 4 MiB calls: fault p99 lower in 12,
# medians 731 -> 459 us; docs/performance.md); what it costs was not measurable (pre-copy
# round 0, one host and between agents).  64 KiB was no better and pushed slower.
MAX_IO_BYTES: int = 256 << 10

# MSG_NOSIGNAL: a write to a closed peer must come back as EPIPE (-> ChannelBrokenError),
# never as a SIGPIPE that kills a process which restored the default handler.
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
# Received fds must not leak into processes we spawn later.
_RECV_FDS_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)

# errnos that mean "the other end (or the connection) is gone": ChannelBrokenError.
_PEER_ERRNOS = frozenset({
    errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN, errno.ESHUTDOWN,
    errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETRESET,
})


def _byte_view(part: Any, *, writable: bool = False) -> memoryview:
    """A flat unsigned-byte view of ``part`` without copying it.

    Raises:
        ValueError: ``part`` is not C-contiguous (it cannot be sent or filled without a copy).
        TypeError: ``part`` does not support the buffer protocol, or ``writable`` is asked
            for and it is read-only.
    """
    view = memoryview(part)
    if not view.c_contiguous:
        raise ValueError(f"buffer of shape {view.shape} is not C-contiguous")
    if view.ndim != 1 or view.format != "B":
        if view.nbytes == 0:
            # memoryview.cast refuses a shape with a zero in it (e.g. ``pages[:0]``).
            view = memoryview(b"") if view.readonly else memoryview(bytearray())
        else:
            view = view.cast("B")
    if writable and view.readonly:
        raise TypeError("cannot receive into a read-only buffer")
    return view


class Channel(abc.ABC):
    """A reliable, ordered, full-duplex byte stream.

    Implementations: :class:`SocketChannel` (and its TLS variant), the wrappers of
    :class:`transport.wrapped.WrappedChannel` (shaped, MAC, compressed) and
    :class:`transport.striped.StripedChannel`.  Every implementation must pass the
    conformance suite in ``tests/test_transport.py``.  A channel is a context manager that
    closes itself on exit.

    The base class owns the state every implementation shares, so that the rules for it
    are written once: the byte counters (``_bytes_sent``/``_bytes_received``, bumped by the
    subclass as bytes move), the closed flag, and the *first* error of each direction
    (sticky, as QEMU's ``QEMUFile`` keeps it): :meth:`_fail` records it, :meth:`_check_send`
    and :meth:`_check_recv` raise it again.  The public calls check their arguments and
    that state, then hand over to the subclass's ``_send``, ``_recv_into``, ``_recv_some``
    and ``_set_timeout``.  Subclasses call ``super().__init__()``.
    """

    def __init__(self) -> None:
        self._closed = False
        # The first error that broke each direction (sticky), or None.
        self._send_error: TransportError | None = None
        self._recv_error: TransportError | None = None
        # Stream bytes handed on / handed out since creation, incl. failed-call prefixes.
        self._bytes_sent = 0
        self._bytes_received = 0

    def send_parts(self, parts: Sequence[Any]) -> None:
        """Send the concatenation of ``parts``, in order, without joining them in Python.

        Args:
            parts: buffer-like objects (bytes, bytearray, memoryview, C-contiguous numpy
                arrays); empty parts are allowed.  Any number of parts is allowed.

        Guarantees: returns only once every byte was handed to the kernel.  If it raises,
        some prefix of the concatenation (possibly none, possibly all) may have been sent;
        after a partial send the send direction is broken (sticky).

        Raises:
            ChannelClosedError: this side closed the channel.
            ChannelBrokenError: the peer closed or reset (``bytes_got`` = bytes sent).
            ChannelTimeout: no progress for the timeout (``bytes_got`` = bytes sent).
            ValueError: a part is not C-contiguous.
        """
        self._check_send()
        views = [view for view in map(_byte_view, parts) if view.nbytes]
        self._send(views, sum(view.nbytes for view in views))

    @abc.abstractmethod
    def _send(self, views: list[memoryview], total: int) -> None:
        """:meth:`send_parts` after the checks: ``views`` are the non-empty parts as byte
        views (``total`` bytes in all), the channel open and its send side not broken."""

    def send(self, data: Any) -> None:
        """Send one buffer; same guarantees and errors as :meth:`send_parts`."""
        self.send_parts((data,))

    def recv_into(self, view: Any) -> None:
        """Fill the writable buffer ``view`` completely with the next bytes of the stream.

        Guarantees: on return every byte of ``view`` was written.  If it raises, a prefix of
        ``view`` (``bytes_got`` bytes) may have been written; after a partial receive the
        receive direction is broken (sticky).

        Raises:
            ChannelClosedError: this side closed the channel.
            ChannelBrokenError: the stream ended (EOF) or was reset before ``view`` was full;
                carries ``bytes_expected`` (len of view) and ``bytes_got``.
            ChannelTimeout: no progress for the timeout (a TCP channel's large receive: a
                256 KiB step of it not complete within the timeout, see SocketChannel).
        """
        self._check_recv()
        self._recv_into(_byte_view(view, writable=True))

    @abc.abstractmethod
    def _recv_into(self, buf: memoryview) -> None:
        """:meth:`recv_into` after the checks: ``buf`` is a writable byte view, the channel
        open and its receive side not broken."""

    def recv_exact(self, n_bytes: int) -> bytes:
        """Receive exactly ``n_bytes`` bytes and return them as ``bytes``.

        Meant for small, bounded messages (headers): the caller bounds ``n_bytes`` -- never
        pass a length read from the wire unchecked.  Bulk data should use :meth:`recv_into`.
        Same errors as :meth:`recv_into`.
        """
        if n_bytes < 0:
            raise ValueError(f"n_bytes must be >= 0, got {n_bytes}")
        buf = bytearray(n_bytes)
        self.recv_into(buf)
        return bytes(buf)

    def recv_some(self, max_bytes: int) -> bytes:
        """Receive between 1 and ``max_bytes`` bytes, waiting for at least one.

        Returns ``b""`` if and only if the peer closed its sending side (a clean end of
        stream); this is the one receive call that reports EOF without raising.

        Raises:
            ChannelClosedError, ChannelBrokenError (reset), ChannelTimeout.
            ValueError: ``max_bytes`` is not > 0.
        """
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self._check_recv()
        return self._recv_some(max_bytes)

    @abc.abstractmethod
    def _recv_some(self, max_bytes: int) -> bytes:
        """:meth:`recv_some` after the checks (``max_bytes`` > 0, open, not broken)."""

    @abc.abstractmethod
    def wait_readable(self, timeout_s: float | None) -> bool:
        """Wait until a receive would not block; ``None`` waits forever.

        Returns True if data, EOF or an error is pending (a receive will return or raise
        at once), False if ``timeout_s`` passed first.  Does not consume anything.

        Raises:
            ChannelClosedError: this side closed the channel.
        """

    def settimeout(self, timeout_s: float | None) -> None:
        """Set the inactivity timeout for every later send and receive.

        The timeout bounds each wait for progress, not a whole call: a 1 GiB
        :meth:`send_parts` that keeps moving never times out, one that stalls for
        ``timeout_s`` raises :class:`ChannelTimeout`.  ``None`` (the default) waits forever.

        Raises:
            ValueError: ``timeout_s`` is not ``None`` and not > 0.
            ChannelClosedError: this side closed the channel.
        """
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be None or > 0, got {timeout_s!r}")
        self._check_open()
        self._set_timeout(timeout_s)

    @abc.abstractmethod
    def _set_timeout(self, timeout_s: float | None) -> None:
        """Apply a timeout :meth:`settimeout` has checked."""

    @abc.abstractmethod
    def gettimeout(self) -> float | None:
        """The current inactivity timeout in seconds, or ``None``."""

    @abc.abstractmethod
    def fileno(self) -> int:
        """The underlying file descriptor (for poll/select).  Raises ChannelClosedError."""

    def unsent_bytes(self) -> int:
        """Bytes sent but not yet taken by the peer, as far as the kernel knows.

        For a unix stream socket this is what sits in the peer's receive queue; for TCP,
        what the peer has not acknowledged (SIOCOUTQ).  A sender uses it to let the
        receiver catch up before a latency-critical phase.  Returns 0 where unknown.
        """
        import fcntl
        import struct
        import termios

        try:
            raw = fcntl.ioctl(self.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return 0
        return struct.unpack("i", raw)[0]

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Wake every thread blocked in a call on this channel (``shutdown(2)`` of the
        sockets underneath; closing an fd does not wake a thread blocked on it).

        Both directions are finished afterwards: blocked and later calls fail, the peer
        sees EOF.  Does not close the channel (call :meth:`close` too); never raises.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Close the channel; idempotent.  The peer sees EOF once every holder of the
        underlying socket closed it (a forked child with a copy keeps it open)."""

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called on this side."""
        return self._closed

    @property
    def bytes_sent(self) -> int:
        """Stream bytes sent since creation, including prefixes of failed sends."""
        return self._bytes_sent

    @property
    def bytes_received(self) -> int:
        """Stream bytes received since creation, including prefixes of failed receives."""
        return self._bytes_received

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- the shared state rules (for implementations) ------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ChannelClosedError("channel was closed by this side")

    def _check_send(self) -> None:
        """Raise if the channel is closed (by us) or its send side is broken."""
        self._check_open()
        if self._send_error is not None:
            raise _again(self._send_error, "send") from self._send_error

    def _check_recv(self) -> None:
        """Raise if the channel is closed (by us) or its receive side is broken."""
        self._check_open()
        if self._recv_error is not None:
            raise _again(self._recv_error, "receive") from self._recv_error

    def _fail(self, direction: str, error: TransportError, moved_bytes: int) -> TransportError:
        """Record ``error`` as the first error of ``direction`` (``"send"``/``"recv"``)
        unless the failed call left the stream intact, and return it (``raise
        self._fail(...)``).

        ``moved_bytes`` counts what the call moved at any layer, partial frames below
        included.  A timeout or a close by this side that moved nothing leaves the stream's
        framing intact; every other failure loses it, so the direction stays broken.
        """
        if not (isinstance(error, (ChannelTimeout, ChannelClosedError)) and moved_bytes == 0):
            if direction == "send" and self._send_error is None:
                self._send_error = error
            elif direction == "recv" and self._recv_error is None:
                self._recv_error = error
        return error

    def _interrupted(self, direction: str, expected: int, moved_bytes: int) -> None:
        """A non-transport exception (e.g. KeyboardInterrupt) left a call half-way: if a
        prefix moved, the direction is broken."""
        if moved_bytes:
            self._fail(direction, ChannelBrokenError(f"{direction} interrupted",
                                                     bytes_expected=expected,
                                                     bytes_got=moved_bytes), moved_bytes)


def _again(first: TransportError, side: str) -> TransportError:
    """The error a call raises on a direction that ``first`` broke earlier (see
    :attr:`TransportError.repeats_as_itself`)."""
    if first.repeats_as_itself:
        return copy.copy(first)
    return ChannelBrokenError(f"{side} side of the channel is broken: {first}")


def _cut_views(views: list[memoryview], limit_bytes: int,
               large_bytes: int | None = None) -> Iterator[tuple[list[memoryview], int]]:
    """Cut the concatenation of ``views`` into groups of ``limit_bytes`` (the last may be
    shorter); yields ``(slices, group_bytes)``.  Slices are memoryviews: nothing is copied.

    With ``large_bytes``, a view of at least that size that would not fit in the group
    being filled starts a group of its own instead (the group before it is yielded short):
    a large buffer is then cut at multiples of ``limit_bytes`` from its own start, so a
    receiver reading it into a buffer of its size gets whole groups (MacChannel: frames
    verified in place)."""
    group: list[memoryview] = []
    group_bytes = 0
    for view in views:
        offset = 0
        if (large_bytes is not None and group_bytes and view.nbytes >= large_bytes
                and view.nbytes > limit_bytes - group_bytes):
            yield group, group_bytes
            group, group_bytes = [], 0
        while offset < view.nbytes:
            take = min(view.nbytes - offset, limit_bytes - group_bytes)
            group.append(view if take == view.nbytes else view[offset:offset + take])
            group_bytes += take
            offset += take
            if group_bytes == limit_bytes:
                yield group, group_bytes
                group, group_bytes = [], 0
    if group_bytes:
        yield group, group_bytes


class SocketChannel(Channel):
    """A :class:`Channel` over a connected stream socket (AF_UNIX or TCP; family-agnostic).

    The channel owns the socket: :meth:`close` closes it.  The socket may be any object with
    the ``socket.socket`` I/O methods (tests wrap one to force partial writes).

    The send and receive loops are written once, here: a subclass for another kind of
    socket (TLS) changes how a batch of buffers is written (:meth:`_write`), the receive
    flags and the error translation, not the loops.
    """

    # MSG_WAITALL: a blocking receive sleeps until the whole buffer is filled instead of
    # waking once per skb; it still returns early on EOF, a signal, or (timeout mode) no
    # more data.
    _recv_flags: int = getattr(socket, "MSG_WAITALL", 0)
    # Large receives on TCP wait with SO_RCVLOWAT raised (see _recv_into); not over TLS,
    # whose records the ssl module reads.
    _use_rcvlowat: bool = True

    def __init__(self, sock: socket.socket):
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"SocketChannel needs a SOCK_STREAM socket, got {sock.type!r}")
        super().__init__()
        self._sock = sock
        # large receives raise SO_RCVLOWAT on TCP only: a unix socket wakes its reader on
        # every write whatever the mark (and tests wrap sockets in other objects)
        self._rcvlowat = (self._use_rcvlowat and isinstance(sock, socket.socket)
                          and sock.family in (socket.AF_INET, socket.AF_INET6))

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._sock.fileno()}"
        return (f"<{type(self).__name__} {state} sent={self._bytes_sent} "
                f"received={self._bytes_received}>")

    @property
    def sock(self) -> socket.socket:
        """The socket, for setsockopt and fd passing.  Doing I/O on it directly bypasses
        the counters and the sticky-error bookkeeping.  Raises ChannelClosedError."""
        self._check_open()
        return self._sock

    def _translate(self, op: str, err: OSError, expected: int | None,
                   got: int | None) -> TransportError:
        """Map an OSError from the socket to our error; the one place this happens."""
        if self._closed:
            # Another thread closed the channel under this call.
            return ChannelClosedError(f"{op}: channel was closed by this side")
        if isinstance(err, TimeoutError) and err.errno is None:
            # socket.timeout from the settimeout() machinery (a kernel ETIMEDOUT has an errno).
            return ChannelTimeout(f"{op}: no progress within {self._sock.gettimeout()} s",
                                  bytes_expected=expected, bytes_got=got)
        return _os_error(op, err, expected, got)

    # -- sending --------------------------------------------------------------------------

    def _send(self, views: list[memoryview], total: int) -> None:
        sent = 0
        try:
            for n in self._write(views):
                if n <= 0:
                    raise ChannelBrokenError("send: socket accepted no bytes",
                                             bytes_expected=total, bytes_got=sent)
                sent += n
                self._bytes_sent += n
        except OSError as err:
            raise self._fail("send", self._translate("send", err, total, sent), sent) from err
        except ChannelBrokenError as err:
            raise self._fail("send", err, sent)
        except BaseException:
            # E.g. KeyboardInterrupt between two sendmsg calls: a prefix went out.
            self._interrupted("send", total, sent)
            raise

    def _write(self, views: list[memoryview]) -> Iterator[int]:
        """Hand ``views`` to the socket; yields the bytes each system call took.

        The views are cut into groups of at most MAX_IO_BYTES (:func:`_cut_views`), each
        sent by ``sendmsg`` (scatter/gather) calls of at most IOV_MAX buffers; what the
        kernel took is dropped from the front (whole views, then a memoryview slice of the
        partial one: nothing is copied).
        """
        sock = self._sock
        for group, _group_bytes in _cut_views(views, MAX_IO_BYTES):
            first = 0  # index of the first view of the group not yet completely sent
            while first < len(group):
                n = sock.sendmsg(group[first:first + IOV_MAX], (), _SEND_FLAGS)
                yield n
                while n > 0:
                    head_bytes = group[first].nbytes
                    if n >= head_bytes:
                        n -= head_bytes
                        first += 1
                    else:
                        group[first] = group[first][n:]
                        n = 0

    # -- receiving ------------------------------------------------------------------------

    def _recv_into(self, buf: memoryview) -> None:
        need = buf.nbytes
        got = 0
        sock = self._sock
        flags = self._recv_flags
        # Even with MSG_WAITALL, TCP wakes a waiting receiver each time data arrives: a 256
        # KiB receive costs ~4-16 wake-ups, each an IPI from the CPU that delivers the data
        # -- in a VM a trap to the hypervisor -- paid by the thread that delivers it (the
        # sender itself on one machine).  With SO_RCVLOWAT at the bytes still missing, the
        # kernel wakes the receiver once they are all there (or on EOF, an error, a closing
        # window).  The wait must then copy nothing before that wake-up: a receive that took
        # part of its bytes and slept again would be woken only by a whole new mark's worth,
        # which may never come -- so a large step waits in poll() (readable only from the
        # mark on) and then takes the bytes without waiting.  The mark is raised for the
        # steps of a large receive only and lowered after it: every other receive and poll
        # sees the default of 1; a timeout then means "not all of them within the timeout"
        # rather than "nothing".
        lowat = 1
        poller = None
        try:
            while got < need:
                step = min(need - got, MAX_IO_BYTES)
                if step >= RCVLOWAT_MIN_BYTES and self._rcvlowat:
                    if step != lowat:
                        lowat = _set_rcvlowat(sock, step)
                    if lowat != 1 and sock.gettimeout() is None:
                        # blocking: wait here, not inside recv (see above)
                        if poller is None:
                            poller = select.poll()
                            poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
                        poller.poll()
                        try:
                            n = sock.recv_into(buf[got:], step, socket.MSG_DONTWAIT)
                        except BlockingIOError:
                            continue  # woken without data (a spurious wake-up): wait again
                    else:  # timeout mode: the socket module polls (from the mark) and then reads
                        n = sock.recv_into(buf[got:], step, flags)
                else:
                    if lowat != 1:
                        lowat = _set_rcvlowat(sock, 1)
                    n = sock.recv_into(buf[got:], step, flags)
                if n == 0:
                    raise ChannelBrokenError("recv: peer closed the connection (EOF)",
                                             bytes_expected=need, bytes_got=got)
                got += n
                self._bytes_received += n
        except OSError as err:
            raise self._fail("recv", self._translate("recv", err, need, got), got) from err
        except ChannelBrokenError as err:
            raise self._fail("recv", err, got)
        except BaseException:
            self._interrupted("recv", need, got)
            raise
        finally:
            if lowat != 1:
                _set_rcvlowat(sock, 1)

    def _recv_some(self, max_bytes: int) -> bytes:
        try:
            data = self._sock.recv(max_bytes)
        except OSError as err:
            raise self._fail("recv", self._translate("recv", err, None, 0), 0) from err
        self._bytes_received += len(data)
        return data

    def wait_readable(self, timeout_s: float | None) -> bool:
        self._check_open()
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN | select.POLLPRI)
        timeout_ms = None if timeout_s is None else max(0, math.ceil(timeout_s * 1000))
        # POLLHUP/POLLERR are always reported: then a receive returns or raises at once.
        return bool(poller.poll(timeout_ms))

    # -- settings and lifetime ------------------------------------------------------------

    def _set_timeout(self, timeout_s: float | None) -> None:
        self._sock.settimeout(timeout_s)

    def gettimeout(self) -> float | None:
        self._check_open()
        return self._sock.gettimeout()

    def fileno(self) -> int:
        self._check_open()
        return self._sock.fileno()

    def shutdown(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more, or already closed: nothing is blocked on it

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close()

    # -- fd passing -----------------------------------------------------------------------

    def send_fds(self, data: bytes, fds: Sequence[int]) -> None:
        """Send ``data`` with the descriptors ``fds`` attached (AF_UNIX only).

        See :func:`send_fds`; additionally counts ``data`` in :attr:`bytes_sent`.
        """
        self._check_send()
        try:
            _send_fds_raw(self._sock, data, fds)
        except OSError as err:
            raise self._fail("send", self._translate("send_fds", err, len(data), None),
                             len(data)) from err
        self._bytes_sent += len(data)

    def recv_fds(self, max_bytes: int, max_fds: int) -> tuple[bytes, list[int]]:
        """Receive up to ``max_bytes`` bytes and up to ``max_fds`` descriptors (AF_UNIX only).

        See :func:`recv_fds`; additionally counts the data in :attr:`bytes_received`.
        """
        self._check_recv()
        try:
            data, fds = _recv_fds_raw(self._sock, max_bytes, max_fds)
        except OSError as err:
            raise self._fail("recv", self._translate("recv_fds", err, None, 0), 0) from err
        except ChannelBrokenError as err:
            raise self._fail("recv", err, 0)
        self._bytes_received += len(data)
        return data, fds


def _os_error(op: str, err: OSError, expected: int | None = None,
              got: int | None = None) -> TransportError:
    """A peer errno as ChannelBrokenError, anything else as TransportError."""
    if err.errno in _PEER_ERRNOS:
        return ChannelBrokenError(f"{op}: peer closed or reset the connection "
                                  f"({errno.errorcode.get(err.errno, err.errno)})",
                                  bytes_expected=expected, bytes_got=got)
    return TransportError(f"{op} failed: {err}")


# -- fd passing ---------------------------------------------------------------------------
#
# Python 3.11's socket.send_fds/recv_fds ignore their ``flags`` argument, and we need
# MSG_NOSIGNAL / MSG_CMSG_CLOEXEC, so these call sendmsg/recvmsg themselves.

def _send_fds_raw(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    if not data:
        # SCM_RIGHTS rides on data: a stream socket cannot send fds with zero bytes.
        raise ValueError("send_fds needs at least one byte of data to carry the fds")
    fd_array = memoryview(bytearray(len(fds) * 4)).cast("i")
    for i, fd in enumerate(fds):
        fd_array[i] = fd
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd_array)],
                       _SEND_FLAGS)
    if sent < len(data):
        # The fds went with the first byte; the rest is plain data.
        sock.sendall(memoryview(data)[sent:], _SEND_FLAGS)


def _recv_fds_raw(sock: socket.socket, max_bytes: int,
                  max_fds: int) -> tuple[bytes, list[int]]:
    if max_bytes <= 0 or max_fds <= 0:
        raise ValueError(f"max_bytes and max_fds must be > 0, got {max_bytes}, {max_fds}")
    data, ancdata, msg_flags, _addr = sock.recvmsg(
        max_bytes, socket.CMSG_SPACE(max_fds * 4), _RECV_FDS_FLAGS)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(memoryview(payload)[:usable].cast("i"))
    if msg_flags & socket.MSG_CTRUNC:
        # The kernel dropped the descriptors that did not fit; the message is unusable.
        for fd in fds:
            os.close(fd)
        raise TransportError(f"recv_fds: peer sent more than max_fds={max_fds} descriptors")
    if not data:
        for fd in fds:
            os.close(fd)
        raise ChannelBrokenError("recv_fds: peer closed the connection (EOF)",
                                 bytes_got=0)
    return data, fds


def send_fds(sock: socket.socket | SocketChannel, data: bytes, fds: Sequence[int]) -> None:
    """Send ``data`` (at least one byte) with the file descriptors ``fds`` attached.

    The kernel duplicates the descriptors into the receiver; the caller still owns ``fds``
    and may close them as soon as this returns.  Send fds in a message of their own: the
    receiver should call :func:`recv_fds` exactly when that message is next in the stream.

    Raises:
        ChannelBrokenError: the peer closed or reset.
        ChannelClosedError: ``sock`` is a closed SocketChannel.
        TransportError: any other socket error (e.g. a bad fd, not an AF_UNIX socket).
        ValueError: ``data`` is empty.
    """
    if isinstance(sock, SocketChannel):
        sock.send_fds(data, fds)
        return
    try:
        _send_fds_raw(sock, data, fds)
    except OSError as err:
        raise _os_error("send_fds", err) from err


def recv_fds(sock: socket.socket | SocketChannel, max_bytes: int,
             max_fds: int) -> tuple[bytes, list[int]]:
    """Receive up to ``max_bytes`` bytes and the descriptors attached to them.

    Returns ``(data, fds)``; ``data`` is never empty.  The caller owns every returned fd
    (they are close-on-exec) and must close them.  On any error no fd is left open.

    Raises:
        ChannelBrokenError: EOF (the peer closed) or reset.
        ChannelClosedError: ``sock`` is a closed SocketChannel.
        TransportError: more than ``max_fds`` descriptors arrived (the kernel dropped the
            excess), or another socket error.
    """
    if isinstance(sock, SocketChannel):
        return sock.recv_fds(max_bytes, max_fds)
    try:
        return _recv_fds_raw(sock, max_bytes, max_fds)
    except OSError as err:
        raise _os_error("recv_fds", err) from err


def _set_rcvlowat(sock: socket.socket, nbytes: int) -> int:
    """Set ``sock``'s SO_RCVLOWAT; returns what it now is (1 if the kernel refused: the
    receive then only wakes more often)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
        return nbytes
    except OSError:
        return 1


# -- construction -------------------------------------------------------------------------

def _set_buffer_sizes(sock: socket.socket, buffer_bytes: int) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, buffer_bytes)
        except OSError:
            pass  # a smaller buffer is slower, not wrong; the kernel caps it at *mem_max


def channel_pair(buffer_bytes: int = SOCKET_BUFFER_BYTES) -> tuple[SocketChannel, SocketChannel]:
    """Two connected :class:`SocketChannel` s over ``socketpair(AF_UNIX, SOCK_STREAM)``.

    Both sockets ask for ``buffer_bytes`` of send and receive buffer (the kernel may grant
    less).  The fds are not inheritable; to hand one end to a child process, pass its
    ``fileno()`` in ``subprocess``'s ``pass_fds`` and rebuild it there with
    :func:`channel_from_fd`.
    """
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (a, b):
        _set_buffer_sizes(sock, buffer_bytes)
    return SocketChannel(a), SocketChannel(b)


def channel_from_fd(fd: int) -> SocketChannel:
    """Rebuild a :class:`SocketChannel` from an inherited stream-socket fd (in a child).

    The channel takes ownership of ``fd`` (closing the channel closes it).  The socket's
    family and type are read from the fd.

    Raises:
        ValueError: ``fd`` is not a stream socket (then ``fd`` is left open, still yours).
        OSError: ``fd`` is not a socket at all.
    """
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ValueError(f"fd {fd} is a {sock.type!r} socket, not SOCK_STREAM")
    return SocketChannel(sock)


def set_tcp_nodelay(sock: socket.socket | SocketChannel, enabled: bool = True) -> bool:
    """Disable Nagle on a TCP socket (our small control records must not wait for an ACK).

    Returns True if the option was set, False if the socket is not TCP (e.g. AF_UNIX).
    """
    if isinstance(sock, SocketChannel):
        sock = sock.sock
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(enabled))
    return True
