"""Errors raised by the transport package.

Named, as in trio, after who caused them:

* :class:`ChannelClosedError` -- *we* closed the channel and then used it (a bug on our side);
* :class:`ChannelBrokenError` -- the *peer* (or the connection) broke it: the other end closed
  or reset, a write hit ``EPIPE``/``ECONNRESET``, or the stream ended in the middle of a
  message;
* :class:`ChannelTimeout` -- no progress within the channel's timeout.

``transport`` imports nothing from ``vmem``, so :class:`TransportError` derives from
:class:`Exception` directly; the migrator wraps it where it needs a ``VmemError``.  Every class
survives pickling with its attributes (errors cross process boundaries over the back channel).
OS errors are translated exactly once, in :mod:`transport.channel`, with ``raise ... from err``.
"""
from __future__ import annotations

__all__ = [
    "TransportError",
    "ChannelClosedError",
    "ChannelBrokenError",
    "ChannelTimeout",
]


class TransportError(Exception):
    """Root of every error the transport package raises deliberately."""

    def __reduce__(self):
        # Subclasses keep their keyword context in self.__dict__, which the default
        # Exception pickling (cls(*args)) would drop or mis-feed to __init__: rebuild from
        # args and restore the attributes instead.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


def _rebuild(cls, args, state):
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


def _with_counts(message: str, bytes_expected: int | None, bytes_got: int | None) -> str:
    if bytes_expected is None and bytes_got is None:
        return message
    got = "?" if bytes_got is None else bytes_got
    expected = "?" if bytes_expected is None else bytes_expected
    return f"{message} (after {got} of {expected} bytes)"


class ChannelClosedError(TransportError):
    """The channel was closed by this side and then used again."""


class ChannelBrokenError(TransportError):
    """The peer closed or reset the connection, or the stream ended mid-message.

    Once raised, the direction it was raised for (send or receive) stays broken: later
    calls in that direction raise ``ChannelBrokenError`` again without touching the socket,
    because the framing of the byte stream is lost.

    Attributes:
        reason: what happened, without the byte counts.
        bytes_expected: bytes the failed call was asked to move, or ``None`` if not applicable.
        bytes_got: bytes it did move before failing (sent, or received into the buffer),
            or ``None`` if not applicable.
    """

    def __init__(self, reason: str, *, bytes_expected: int | None = None,
                 bytes_got: int | None = None):
        super().__init__(_with_counts(reason, bytes_expected, bytes_got))
        self.reason = reason
        self.bytes_expected = bytes_expected
        self.bytes_got = bytes_got


class ChannelTimeout(TransportError):
    """No progress was made for the channel's timeout (an inactivity limit, see ``settimeout``).

    If ``bytes_got`` is 0 the channel is still usable: nothing of the call was transferred.
    If ``bytes_got > 0`` a prefix was transferred, the stream's framing is lost and that
    direction of the channel is now broken (later calls raise :class:`ChannelBrokenError`).

    Attributes:
        reason: what happened, without the byte counts.
        bytes_expected: bytes the call was asked to move.
        bytes_got: bytes it moved before timing out.
    """

    def __init__(self, reason: str, *, bytes_expected: int | None = None,
                 bytes_got: int | None = None):
        super().__init__(_with_counts(reason, bytes_expected, bytes_got))
        self.reason = reason
        self.bytes_expected = bytes_expected
        self.bytes_got = bytes_got
