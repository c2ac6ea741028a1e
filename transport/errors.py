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
    "PicklesContext",
    "TransportError",
    "ChannelClosedError",
    "ChannelBrokenError",
    "ChannelTimeout",
]


class PicklesContext:
    """Mixin for exceptions that keep their context in attributes (``self.__dict__``).

    The default ``Exception`` pickling rebuilds an error as ``cls(*args)``, which drops
    keyword context or mis-feeds it to ``__init__``; this rebuilds from ``args`` and restores
    the attributes instead, so an error reads the same after crossing a process boundary.
    Also makes ``copy.copy(err)`` a faithful copy (a sticky error is re-raised that way).
    """

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


def _rebuild(cls, args, state):
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class TransportError(PicklesContext, Exception):
    """Root of every error the transport package raises deliberately."""

    #: True for errors about the *bytes* (a failed integrity check, a corrupt encoding)
    #: rather than the connection.  A channel direction broken by such an error raises it
    #: again, as itself, on every later call (so each names the real cause); any other
    #: first error is repeated as :class:`ChannelBrokenError`.
    repeats_as_itself: bool = False


def _with_counts(message: str, bytes_expected: int | None, bytes_got: int | None) -> str:
    if bytes_expected is None and bytes_got is None:
        return message
    got = "?" if bytes_got is None else bytes_got
    expected = "?" if bytes_expected is None else bytes_expected
    return f"{message} (after {got} of {expected} bytes)"


class _CountedError(TransportError):
    """A failed call that says how far it got (the counts are also in the message).

    Attributes:
        reason: what happened, without the byte counts.
        bytes_expected: bytes the call was asked to move, or ``None`` if not applicable.
        bytes_got: bytes it did move before failing (sent, or received into the buffer),
            or ``None`` if not applicable.
    """

    def __init__(self, reason: str, *, bytes_expected: int | None = None,
                 bytes_got: int | None = None):
        super().__init__(_with_counts(reason, bytes_expected, bytes_got))
        self.reason = reason
        self.bytes_expected = bytes_expected
        self.bytes_got = bytes_got


class ChannelClosedError(TransportError):
    """The channel was closed by this side and then used again."""


class ChannelBrokenError(_CountedError):
    """The peer closed or reset the connection, or the stream ended mid-message.

    Once raised, the direction it was raised for (send or receive) stays broken: later
    calls in that direction raise ``ChannelBrokenError`` again without touching the socket,
    because the framing of the byte stream is lost.  Attributes as in ``_CountedError``:
    ``reason``, ``bytes_expected``, ``bytes_got``.
    """


class ChannelTimeout(_CountedError):
    """No progress was made for the channel's timeout (an inactivity limit, see ``settimeout``).

    If ``bytes_got`` is 0 the channel is still usable: nothing of the call was transferred.
    If ``bytes_got > 0`` a prefix was transferred, the stream's framing is lost and that
    direction of the channel is now broken (later calls raise :class:`ChannelBrokenError`).
    Attributes: ``reason``, ``bytes_expected`` (bytes the call was asked to move),
    ``bytes_got`` (bytes it moved before timing out).
    """
