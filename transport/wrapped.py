"""The part every byte-transforming channel shares: delegation to the channel it wraps.

A :class:`WrappedChannel` turns the bytes of ``inner`` into something else (frames with a
MAC, compressed frames...).  ``bytes_sent``/``bytes_received`` count the caller's bytes
(subclasses keep ``_bytes_sent``/``_bytes_received``); ``wire_bytes_*`` count what went
through ``inner``.  Timeouts, the fd, the unsent count and closing are ``inner``'s.
"""
from __future__ import annotations

from .channel import Channel
from .errors import ChannelClosedError

__all__ = ["WrappedChannel"]


class WrappedChannel(Channel):
    """Base class: subclasses set ``self._inner`` and the two byte counters in ``__init__``."""

    _inner: Channel
    _bytes_sent: int
    _bytes_received: int

    @property
    def inner(self) -> Channel:
        return self._inner

    @property
    def closed(self) -> bool:
        return self._inner.closed

    @property
    def bytes_sent(self) -> int:
        return self._bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._bytes_received

    @property
    def wire_bytes_sent(self) -> int:
        """Bytes handed to ``inner``, framing included."""
        return self._inner.bytes_sent

    @property
    def wire_bytes_received(self) -> int:
        return self._inner.bytes_received

    def _check_open(self) -> None:
        if self._inner.closed:
            raise ChannelClosedError("channel was closed by this side")

    def settimeout(self, timeout_s: float | None) -> None:
        self._inner.settimeout(timeout_s)

    def gettimeout(self) -> float | None:
        return self._inner.gettimeout()

    def fileno(self) -> int:
        return self._inner.fileno()

    def unsent_bytes(self) -> int:
        return self._inner.unsent_bytes()

    def close(self) -> None:
        self._inner.close()
