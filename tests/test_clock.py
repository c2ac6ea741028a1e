"""One clock between hosts (vmem/clock.py): the offset estimator recovers a known offset
within the uncertainty it states, and between two agents on two network-namespace hosts
(one kernel, so the true offset is 0) the report's estimate contains 0 and the downtime
carries that uncertainty."""
from __future__ import annotations

import random
import time

import pytest

from test_agent import agents, workdir  # noqa: F401  (fixtures)
from testhosts import testhosts  # noqa: F401  (fixture)
from vmem.clock import CLOCK_SAMPLES, SAME_HOST, UNKNOWN, estimate_offset


class FakeLink:
    """Our clock and a peer clock ``offset_ns`` ahead, joined by a link whose two one-way
    delays are drawn at random (and unequal) per ping: only time passing on the wire moves
    the clocks, so the answer is known exactly."""

    def __init__(self, offset_ns: int, seed: int, slow_every: int = 0):
        self.offset_ns = offset_ns
        self.t_ns = 1_000_000_000
        self.rng = random.Random(seed)
        self.pings = 0
        self.slow_every = slow_every

    def now_ns(self) -> int:
        return self.t_ns

    def ping(self) -> int:
        self.pings += 1
        # Scheduling noise now and then (a slow ping), else tens of microseconds each way.
        slow = 5_000_000 if self.slow_every and self.pings % self.slow_every else 0
        self.t_ns += self.rng.randrange(10_000, 90_000) + slow   # there
        peer = self.t_ns + self.offset_ns                        # the peer reads its clock
        self.t_ns += self.rng.randrange(10_000, 90_000)          # and back
        return peer


@pytest.mark.parametrize("offset_ns", [0, 1, -7_654_321, 123_456_789_012, -(10 ** 15)])
@pytest.mark.parametrize("seed", range(5))
def test_the_estimate_holds_a_known_offset_within_its_uncertainty(offset_ns, seed):
    link = FakeLink(offset_ns, seed)
    est = estimate_offset(link.ping, now_ns=link.now_ns)
    assert link.pings == est.samples == CLOCK_SAMPLES
    assert abs(est.offset_ns - offset_ns) <= est.uncertainty_ns
    assert est.uncertainty_ns * 2 >= est.rtt_ns and est.uncertainty_ns <= est.rtt_ns // 2 + 2
    assert not est.same_host


def test_the_fastest_ping_is_kept():
    # Every ping but one in eight is slowed by 5 ms on its way out: the estimate must come
    # from the fast one (a slow ping's offset would be off by ~2.5 ms).
    link = FakeLink(42_000_000, seed=3, slow_every=8)
    est = estimate_offset(link.ping, now_ns=link.now_ns)
    assert est.rtt_ns < 200_000 and abs(est.offset_ns - 42_000_000) <= est.uncertainty_ns < 100_000


def test_the_estimate_against_this_hosts_clock_shifted():
    shift_ns = 3_000_000_007
    est = estimate_offset(lambda: time.monotonic_ns() + shift_ns)
    assert abs(est.offset_ns - shift_ns) <= est.uncertainty_ns


def test_one_host_is_one_clock_and_unknown_says_so():
    assert SAME_HOST.to_dict() == {"offset_ns": 0, "uncertainty_ns": 0, "rtt_ns": 0, "samples": 0, "same_host": True}
    assert SAME_HOST.to_ours_ns(123) == 123
    assert UNKNOWN.uncertainty_ns is None and not UNKNOWN.same_host
    with pytest.raises(ValueError):
        estimate_offset(lambda: 0, samples=0)


def test_agents_on_two_namespace_hosts_measure_a_zero_offset(testhosts, agents):  # noqa: F811
    """Same kernel, same CLOCK_MONOTONIC: the true offset is 0, so the estimate's interval
    must contain 0; the downtime is stated with that uncertainty."""
    a = agents("h1", listen=f"{testhosts.addr(1)}:0", prefix=("ip", "netns", "exec", testhosts.ns(1)), extra=("--insecure",))
    b = agents("h2", listen=f"{testhosts.addr(2)}:0", prefix=("ip", "netns", "exec", testhosts.ns(2)), extra=("--insecure",))
    a.request("create", name="c", workload="hotcold", size="16M")
    report = a.request("migrate", name="c", target=f"{testhosts.addr(2)}:{b.port}", options={"observe": 0.1})["report"]
    assert report["outcome"] == "completed", (report["reason"], a.log(), b.log())
    clock = report["clock"]
    assert clock["samples"] == CLOCK_SAMPLES and not clock["same_host"], clock
    assert clock["rtt_ns"] > 0 and abs(clock["offset_ns"]) <= clock["uncertainty_ns"], clock
    assert report["downtime_uncertainty_ms"] == round(clock["uncertainty_ns"] / 1e6, 3)
    assert report["downtime_ms"] > 0
    print(f"namespace hosts: offset {clock['offset_ns']} ± {clock['uncertainty_ns']} ns (rtt {clock['rtt_ns']} ns)")


def test_a_destination_clock_offset_is_taken_out_of_the_downtime(boot_guest, monkeypatch):
    """One host, but the migrator is told the destination's clock runs 2 s behind: every
    duration that ends at the destination must come out 2 s longer -- the sign and the use
    of the offset, end to end."""
    import vmem.migration.source as source
    from vmem.clock import ClockOffset
    from vmem.migration.local import run_local_migration

    behind = ClockOffset(offset_ns=-2_000_000_000, uncertainty_ns=1_500, rtt_ns=3_000, samples=8)

    class TwoClocks(source.SourceMigration):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, clock=behind)

    monkeypatch.setattr(source, "SourceMigration", TwoClocks)
    guest = boot_guest("hotcold", 8 << 20)
    r = run_local_migration(guest, source.MigrationOptions(observe_s=0))
    assert r.outcome == "completed", r.reason
    assert r.clock == behind.to_dict() and r.downtime_uncertainty_ms == 0.002
    raw_ms = r.downtime_ms - 2000.0  # what the one real clock measured
    assert 0 < raw_ms < r.total_time_s * 1e3
    assert 0 < r.timings_ms["pause_to_running"] - 2000.0 <= raw_ms


def test_a_peer_reading_moves_onto_our_clock():
    ahead = estimate_offset(lambda: 10_000 + 5_000_000, samples=1, now_ns=iter([10_000, 10_000]).__next__)
    assert ahead.offset_ns == 5_000_000 and ahead.uncertainty_ns >= 0
    assert ahead.to_ours_ns(10_000 + 5_000_000) == 10_000
