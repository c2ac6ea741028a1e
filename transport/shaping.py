"""Bandwidth shaping: ``parse_rate()``, :class:`TokenBucket` and :class:`ShapedChannel`.

A lab machine moves bytes over a unix socket at several GB/s; to study migration over a
1 Gbit link we pace the sender.  Rates are in bytes per second everywhere in code
(``rate_Bps``); ``parse_rate`` is the only place that understands bits and suffixes.
"""
from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable

from .channel import Channel, _cut_views
from .errors import ChannelBrokenError, ChannelTimeout
from .wrapped import WrappedChannel

__all__ = [
    "parse_rate",
    "default_burst_bytes",
    "TokenBucket",
    "ShapedChannel",
]

# Multipliers by unit prefix: decimal (k = 10^3 ...) and binary (Ki = 2^10 ...).
_DECIMAL = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BINARY = {"k": 1024.0, "m": 1024.0 ** 2, "g": 1024.0 ** 3, "t": 1024.0 ** 4}

# <number> [prefix [i]] [B | B/s | bit | bit/s]; "b" alone and "bps" are ambiguous
# (bits or bytes?) and therefore rejected.
_RATE_RE = re.compile(
    r"""^\s*
    (?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
    \s*
    (?:(?P<prefix>[kKmMgGtT])(?P<binary>i)?)?
    (?P<unit>B(?:/s)?|bit(?:/s)?)?
    \s*$""",
    re.VERBOSE,
)


def parse_rate(text: str) -> float:
    """Parse a bandwidth and return it in bytes per second.

    Accepted forms (whitespace between number and unit is allowed):

    * bytes/s: ``"1000"``, ``"1000B/s"``, ``"1.5k"`` / ``"1.5K"`` / ``"100M"`` / ``"2G"``
      (decimal: 10^3 multiples), optionally followed by ``B`` or ``B/s``;
    * binary bytes/s: ``"64KiB"``, ``"100MiB/s"``, ``"1GiB"`` (1024 multiples);
    * bits/s: ``"800kbit"``, ``"100Mbit"``, ``"1Gbit/s"`` (decimal, divided by 8:
      ``"1Gbit"`` = 125e6 B/s).

    Prefix letters are case-insensitive (``k``/``K``); unit letters are not: ``B`` is bytes,
    ``bit`` is bits, and the ambiguous ``b``/``bps`` are rejected.

    Raises:
        ValueError: ``text`` is malformed, zero, negative or not finite (the message quotes
            the input).
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _RATE_RE.match(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"invalid rate {text!r}: expected e.g. '100M', '1.5GiB/s', "
                             f"'1Gbit' (bytes/s unless the unit says bit)")
        prefix = (match["prefix"] or "").lower()
        unit = match["unit"] or ""
        if match["binary"]:
            scale = _BINARY[prefix]
        else:
            scale = _DECIMAL[prefix]
        if unit.startswith("bit"):
            scale /= 8.0
        value = float(match["number"]) * scale
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"invalid rate {text!r}: must be a finite number > 0")
    return value


# A default burst of 10 ms worth of data keeps pacing smooth at any rate, within bounds:
# at least one page (smaller chunks cost more in Python than they smooth), at most 4 MiB.
_DEFAULT_BURST_S = 0.010
_MIN_DEFAULT_BURST_BYTES = 4096
_MAX_DEFAULT_BURST_BYTES = 4 << 20


def default_burst_bytes(rate_Bps: float) -> int:
    """The burst size used when none is given: 10 ms of data, clamped to [4 KiB, 4 MiB]."""
    return int(min(max(rate_Bps * _DEFAULT_BURST_S, _MIN_DEFAULT_BURST_BYTES),
                   _MAX_DEFAULT_BURST_BYTES))


class TokenBucket:
    """A token bucket over the monotonic clock: at most ``burst_bytes + rate_Bps * t`` bytes
    are granted in any interval of ``t`` seconds.

    The bucket starts full.  :meth:`consume` takes tokens first and then sleeps off any
    debt, so a request larger than ``burst_bytes`` is allowed and waits exactly as long as
    if it had been split into burst-sized requests.  Waiting is one ``sleep`` to an absolute
    deadline (re-armed only if the sleep returned early), never a busy loop.  Thread-safe:
    several senders may share one bucket (one link); debt is served in arrival order.

    Args:
        rate_Bps: sustained rate in bytes per second (> 0).
        burst_bytes: bucket capacity; default :func:`default_burst_bytes`.
        clock, sleep: injectable for tests (default ``time.monotonic`` and ``time.sleep``).
    """

    def __init__(self, rate_Bps: float, burst_bytes: int | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if not (math.isfinite(rate_Bps) and rate_Bps > 0):
            raise ValueError(f"rate_Bps must be a finite number > 0, got {rate_Bps!r}")
        burst_given = burst_bytes
        if burst_bytes is None:
            burst_bytes = default_burst_bytes(rate_Bps)
        if burst_bytes <= 0:
            raise ValueError(f"burst_bytes must be > 0, got {burst_bytes!r}")
        self._rate_Bps = float(rate_Bps)
        self._burst_bytes = int(burst_bytes)
        self._default_burst = burst_given is None
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        # Tokens available now, in bytes; negative while consumers are sleeping off debt.
        self._tokens = float(self._burst_bytes)
        self._last_refill_s = clock()
        # Total seconds consume() spent sleeping, summed over all callers.
        self._wait_s = 0.0

    @property
    def rate_Bps(self) -> float:
        """Sustained rate in bytes per second."""
        return self._rate_Bps

    @property
    def burst_bytes(self) -> int:
        """Bucket capacity in bytes: the most that may go out back-to-back."""
        return self._burst_bytes

    @property
    def wait_s(self) -> float:
        """Total seconds spent waiting in :meth:`consume` since creation."""
        return self._wait_s

    def set_rate(self, rate_Bps: float) -> float:
        """Change the sustained rate from now on (``virsh migrate-setspeed``); returns the old.

        What was granted up to now was granted at the old rate; a caller already sleeping
        off a debt keeps its deadline (at most one request's worth).  A bucket made with
        the default burst gets the new rate's default burst.

        Raises:
            ValueError: ``rate_Bps`` is not a finite number > 0.
        """
        if not (isinstance(rate_Bps, (int, float)) and math.isfinite(rate_Bps) and rate_Bps > 0):
            raise ValueError(f"rate_Bps must be a finite number > 0, got {rate_Bps!r}")
        with self._lock:
            self._refill(self._clock())
            old, self._rate_Bps = self._rate_Bps, float(rate_Bps)
            if self._default_burst:
                self._burst_bytes = default_burst_bytes(self._rate_Bps)
                self._tokens = min(self._tokens, float(self._burst_bytes))
        return old

    def _refill(self, now_s: float) -> None:
        self._tokens = min(float(self._burst_bytes),
                           self._tokens + (now_s - self._last_refill_s) * self._rate_Bps)
        self._last_refill_s = now_s

    def consume(self, n_bytes: int) -> float:
        """Take ``n_bytes`` tokens, sleeping until the bucket has paid for them.

        Returns the seconds this call slept.
        """
        if n_bytes < 0:
            raise ValueError(f"n_bytes must be >= 0, got {n_bytes}")
        if n_bytes == 0:
            return 0.0
        with self._lock:
            now_s = self._clock()
            self._refill(now_s)
            self._tokens -= n_bytes
            if self._tokens >= 0:
                return 0.0
            # Our debt includes everyone's before us: sleeping until it is repaid keeps
            # concurrent callers in order and the total within the rate.
            deadline_s = now_s + (-self._tokens) / self._rate_Bps
        waited_s = 0.0
        while True:
            remaining_s = deadline_s - self._clock()
            if remaining_s <= 0:
                break
            self._sleep(remaining_s)
            waited_s = self._clock() - now_s
        with self._lock:
            self._wait_s += waited_s
        return waited_s


class ShapedChannel(WrappedChannel):
    """A :class:`Channel` whose sends are paced to ``rate_Bps``; receives pass through.

    Sends are cut into groups of at most ``burst_bytes`` (memoryview slices, never joined);
    each group waits for its tokens, then goes to ``inner``.  Errors report counts for the
    whole ``send_parts`` call, and a send that fails after a prefix went out leaves the send
    side broken (sticky), as for :class:`~transport.channel.SocketChannel`.  The shaped
    channel owns ``inner``: closing one closes the other.  Time spent pacing does not count
    against the inactivity timeout.

    Args:
        inner: the channel to pace.
        rate_Bps: sustained send rate in bytes per second (see :func:`parse_rate`).
        burst_bytes: bucket capacity; default :func:`default_burst_bytes`.
    """

    def __init__(self, inner: Channel, rate_Bps: float, burst_bytes: int | None = None):
        super().__init__(inner)
        self._bucket = TokenBucket(rate_Bps, burst_bytes)

    def __repr__(self) -> str:
        return (f"<ShapedChannel {self._bucket.rate_Bps:.6g} B/s "
                f"burst={self._bucket.burst_bytes} over {self._inner!r}>")

    @property
    def bucket(self) -> TokenBucket:
        """The token bucket pacing the sends."""
        return self._bucket

    @property
    def wait_s(self) -> float:
        """Total seconds sends spent waiting for tokens."""
        return self._bucket.wait_s

    def set_rate(self, rate_Bps: float) -> float:
        """Pace the sends from now on at ``rate_Bps`` (:meth:`TokenBucket.set_rate`); returns the old rate."""
        return self._bucket.set_rate(rate_Bps)

    def _send(self, views: list[memoryview], total: int) -> None:
        sent = 0
        try:
            for group, group_bytes in _cut_views(views, self._bucket.burst_bytes):
                self._bucket.consume(group_bytes)
                self._inner.send_parts(group)
                sent += group_bytes
        except (ChannelBrokenError, ChannelTimeout) as err:
            # Report counts for the whole call, not for the inner group that failed.  If
            # earlier groups went out, the stream's framing is lost even if the inner
            # channel saw a clean (zero-progress) timeout.
            got = sent + (err.bytes_got or 0)
            outer = type(err)(err.reason, bytes_expected=total, bytes_got=got)
            raise self._fail("send", outer, got) from err
        except BaseException:
            # E.g. KeyboardInterrupt while pacing, after some groups went out.
            self._interrupted("send", total, sent)
            raise

    def _recv_into(self, buf: memoryview) -> None:
        self._inner.recv_into(buf)

    def _recv_some(self, max_bytes: int) -> bytes:
        return self._inner.recv_some(max_bytes)

    def wait_readable(self, timeout_s: float | None) -> bool:
        return self._inner.wait_readable(timeout_s)

    # Pacing changes no byte: the counters are the paced channel's own.
    @property
    def bytes_sent(self) -> int:
        return self._inner.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._inner.bytes_received
