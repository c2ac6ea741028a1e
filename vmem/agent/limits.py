"""What an agent lets a connection cost before it knows who is there: admission and deadlines.

Every accepted connection (TCP or the unix control socket) is *admitted* before a thread
is started for it, against two caps -- connections from one peer (a TCP peer is its IP
address, a local one its uid) and connections in total -- counted from accept to close.
Connections still in their *opening* (authentication, the opening frames, and for a
migration connection its first request) have their own, smaller caps: those are the ones
nothing has authenticated yet, so they are the ones a hostile peer can open for free.  A
connection over a cap is refused at once with a clear message and never gets a thread.

Each opening has one deadline for the whole opening (not per receive call): a
:class:`DeadlineWatch` breaks the socket of an opening that is not done in time, so a peer
that trickles one byte at a time is dropped exactly as one that sends nothing.
"""
from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass

__all__ = ["ConnectionCaps", "Admission", "DeadlineWatch"]


@dataclass(frozen=True)
class ConnectionCaps:
    """The agent's connection limits (``vmem agent --max-connections ...``).

    Attributes:
        total: connections open at once, all peers together.
        per_peer: connections open at once from one peer.  One migration with
            ``--parallel 16`` and post-copy uses 17 from its source.
        opening_total / opening_per_peer: of those, connections still in their opening.
        handshake_timeout_s: the whole opening must be done within this.
        idle_timeout_s: a command connection waiting for its next request, or a migration's
            main connection with nothing arriving, is closed after this.
    """

    total: int = 256
    per_peer: int = 64
    opening_total: int = 32
    opening_per_peer: int = 8
    handshake_timeout_s: float = 10.0
    idle_timeout_s: float = 600.0


class Admission:
    """Counts open connections per peer and in total, and those still in their opening."""

    def __init__(self, caps: ConnectionCaps):
        self.caps = caps
        self._lock = threading.Lock()
        self._open: Counter = Counter()
        self._opening: Counter = Counter()

    def admit(self, peer: str) -> str:
        """Count a new connection from ``peer`` as open and in its opening; returns "" or,
        if a cap is reached, why it was refused (and then counts nothing)."""
        c = self.caps
        with self._lock:
            if sum(self._opening.values()) >= c.opening_total:
                return (f"this agent already has {c.opening_total} connections in their opening (the most it "
                        "allows): try again in a few seconds")
            if self._opening[peer] >= c.opening_per_peer:
                return (f"{peer} already has {c.opening_per_peer} connections in their opening here (the most one "
                        "peer may have): try again in a few seconds")
            if sum(self._open.values()) >= c.total:
                return f"this agent already serves {c.total} connections (the most it allows): try again later"
            if self._open[peer] >= c.per_peer:
                return (f"{peer} already has {c.per_peer} connections open here (the most one peer may have): "
                        "close some, or use a smaller --parallel")
            self._open[peer] += 1
            self._opening[peer] += 1
            return ""

    def opened(self, peer: str) -> None:
        """The connection's opening is done (it stays counted as open)."""
        with self._lock:
            _decrement(self._opening, peer)

    def closed(self, peer: str, *, in_opening: bool) -> None:
        with self._lock:
            _decrement(self._open, peer)
            if in_opening:
                _decrement(self._opening, peer)

    def counts(self) -> dict:
        """``{"open": n, "opening": n}`` (for ``agent.info()`` and tests)."""
        with self._lock:
            return {"open": sum(self._open.values()), "opening": sum(self._opening.values())}


def _decrement(counter: Counter, key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


class DeadlineWatch:
    """Breaks (``shutdown(2)``) the socket of every opening still running at its deadline.

    :meth:`expire` is called from the agent's accept loop a few times a second; breaking a
    socket wakes the thread blocked on it, which then fails its opening and closes.  The
    watch keeps its own duplicate of the descriptor: TLS takes the accepted socket object
    over (detaching it), and ``shutdown(2)`` acts on the connection whichever descriptor
    names it.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._next = 0
        self._deadlines: dict[int, tuple[float, socket.socket, str]] = {}

    def watch(self, sock: socket.socket, timeout_s: float, who: str) -> int:
        """Start the clock for ``sock``; returns a token for :meth:`done`."""
        dup = sock.dup()
        with self._lock:
            self._next += 1
            token = self._next
            self._deadlines[token] = (time.monotonic() + timeout_s, dup, who)
        return token

    def done(self, token: int) -> None:
        with self._lock:
            entry = self._deadlines.pop(token, None)
        if entry is not None:
            entry[1].close()

    def expire(self) -> list[str]:
        """Break every overdue socket; returns who they were (for the log)."""
        now = time.monotonic()
        with self._lock:
            overdue = [(k, v) for k, v in self._deadlines.items() if v[0] <= now]
            for k, _ in overdue:
                del self._deadlines[k]
        for _, (_, sock, _) in overdue:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone
            sock.close()
        return [who for _, (_, _, who) in overdue]


class LogLimiter:
    """At most ``per_second`` log lines a second for one kind of event (refused connections):
    a flood must not fill the disk with the agent's log.  Suppressed lines are counted and
    the count is logged with the next line let through."""

    def __init__(self, per_second: int = 10):
        self.per_second = per_second
        self._lock = threading.Lock()
        self._window_s = 0.0
        self._in_window = 0
        self._suppressed = 0

    def allow(self) -> tuple[bool, int]:
        """``(log this one?, how many were suppressed since the last one logged)``."""
        now = time.monotonic()
        with self._lock:
            if now - self._window_s >= 1.0:
                self._window_s, self._in_window = now, 0
            if self._in_window >= self.per_second:
                self._suppressed += 1
                return False, 0
            self._in_window += 1
            suppressed, self._suppressed = self._suppressed, 0
            return True, suppressed
