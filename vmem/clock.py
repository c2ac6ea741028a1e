"""One clock between hosts: a peer's CLOCK_MONOTONIC offset, estimated by ping-pong.

A duration that starts on one host and ends on another (between agents, the downtime runs
from the source's pause to the destination's first workload step) subtracts readings of
two different clocks.  :func:`estimate_offset` measures how far the peer's clock is from
ours, NTP-style, over a connection that is otherwise quiet::

    ours    t0 --- ping --->                      t1   (rtt = t1 - t0)
    peer                    remote (its clock)
                            <--- pong ---

The peer read its clock at some instant between ``t0`` and ``t1`` on our timeline, so
``offset = remote - (t0 + t1) / 2`` is the peer's clock minus ours to within ``rtt / 2``
whatever the split of the round trip between the two directions.  Of several ping-pongs
the one with the smallest round trip is kept: its bound is the tightest, and the others
mostly measured scheduling noise.

Guarantee: if neither clock drifts against the other between the estimate and its use
(CLOCK_MONOTONIC on two Linux hosts drifts by at most parts per million while NTP
disciplines both; over a migration of minutes that is well under the uncertainty), the
true offset lies within ``offset_ns ± uncertainty_ns``.  On one host both sides read the
same clock: the offset is 0 by construction (:data:`SAME_HOST`).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

__all__ = ["ClockOffset", "SAME_HOST", "UNKNOWN", "CLOCK_SAMPLES", "estimate_offset"]

#: Ping-pongs per estimate: enough that one of them meets no scheduling hiccup on a
#: loaded machine, few enough to cost well under a millisecond on a LAN.
CLOCK_SAMPLES = 8


@dataclass(frozen=True)
class ClockOffset:
    """The peer's CLOCK_MONOTONIC minus ours, and how far off that may be.

    Attributes:
        offset_ns: peer clock - our clock (0 on one host).
        uncertainty_ns: the true offset is within ``offset_ns ± uncertainty_ns`` (half the
            kept round trip); None when nothing was measured (:data:`UNKNOWN`).
        rtt_ns: the round trip of the kept sample (None when nothing was measured).
        samples: ping-pongs made (0 on one host: nothing to measure).
        same_host: both sides read the very same clock (one-host migration).
    """

    offset_ns: int = 0
    uncertainty_ns: int | None = 0
    rtt_ns: int | None = 0
    samples: int = 0
    same_host: bool = False

    def to_ours_ns(self, peer_ns: int) -> int:
        """A reading of the peer's clock, expressed on ours."""
        return int(peer_ns) - self.offset_ns

    def to_dict(self) -> dict:
        return asdict(self)


#: One host, one clock: nothing to estimate.
SAME_HOST = ClockOffset(0, 0, 0, 0, same_host=True)
#: A peer that could not be asked (an older agent): cross-host durations are raw differences.
UNKNOWN = ClockOffset(0, None, None, 0, same_host=False)


def estimate_offset(read_peer_ns: Callable[[], int], samples: int = CLOCK_SAMPLES,
                    now_ns: Callable[[], int] = time.monotonic_ns) -> ClockOffset:
    """Estimate the peer's clock offset with ``samples`` ping-pongs; keep the fastest.

    Args:
        read_peer_ns: one round trip that returns the peer's clock reading (ns), taken by
            the peer while the call is in flight.
        samples: how many round trips (at least 1).
        now_ns: our clock (injectable for tests).

    Raises whatever ``read_peer_ns`` raises (a broken connection).
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, not {samples}")
    best: tuple[int, int] | None = None  # (rtt_ns, offset_ns)
    for _ in range(samples):
        t0 = now_ns()
        peer = int(read_peer_ns())
        t1 = now_ns()
        rtt = t1 - t0
        if best is None or rtt < best[0]:
            # (t0 + t1) // 2 without overflow concerns in Python; ceil the half-rtt so the
            # stated bound is never smaller than the true one.
            best = (rtt, peer - (t0 + t1) // 2)
    rtt, offset = best
    return ClockOffset(offset_ns=offset, uncertainty_ns=(rtt + 1) // 2 + 1, rtt_ns=rtt, samples=samples)
