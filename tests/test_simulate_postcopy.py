"""Post-copy and hybrid predictions (vmem.analysis.simulate_postcopy via simulate): conservation
of the pending pages, what drives the faults, and a prediction made in advance against a small
real post-copy run (count-based tolerances)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from test_postcopy import postcopy_features_missing
from test_simulate import synthetic, uniform_trace
from vmem.analysis.model import wire_bytes
from vmem.analysis.simulate import simulate
from vmem.errors import ConfigError
from vmem.migration.policy import XenDefaultPolicy


def test_pure_postcopy_conserves_pages_and_takes_the_links_time():
    t = uniform_trace(npages=16384, rate_pps=3000, seconds=4)
    r = simulate(t, None, bandwidth_Bps=50e6, postcopy="pure", push_hold_s=0.01, postcopy_switch_s=0.02)
    pc = r.postcopy
    assert r.outcome == "completed" and r.mode == "postcopy" and [x.kind for x in r.rounds] == ["postcopy"]
    assert pc["pages_pending"] == 16384 and pc["pages_pushed"] + pc["pages_demanded"] == 16384
    assert pc["faults"] == pc["pages_demanded"] > 0
    assert r.downtime_ms == pytest.approx(20.0) and r.blackout_ms >= r.downtime_ms
    # the push carries the pages the guest did not demand, at the link rate, after the hold
    push_s = pc["pages_pushed"] * wire_bytes(1024) / 1024 / 50e6
    assert pc["complete_s"] == pytest.approx(0.01 + push_s, rel=0.05)
    assert r.migration_time_s == pytest.approx(r.total_time_s)


def test_a_guest_that_writes_nothing_demands_nothing():
    t = synthetic([[]] * 20, 8192)
    r = simulate(t, None, bandwidth_Bps=50e6, postcopy="pure")
    assert r.postcopy["faults"] == 0 and r.postcopy["pages_pushed"] == 8192


def test_faults_grow_as_the_link_slows_and_the_guest_stalls_on_them():
    t = uniform_trace(npages=16384, rate_pps=5000, seconds=4)
    fast = simulate(t, None, bandwidth_Bps=400e6, postcopy="pure").postcopy
    slow = simulate(t, None, bandwidth_Bps=20e6, postcopy="pure").postcopy
    assert slow["faults"] > 3 * fast["faults"]
    # a fault that stalls the guest longer leaves it less time to write, hence fewer faults
    stalled = simulate(t, None, bandwidth_Bps=20e6, postcopy="pure", fault_wait_s=0.002).postcopy
    assert stalled["faults"] < slow["faults"] and stalled["blocktime_ms"] > slow["blocktime_ms"]


def test_hybrid_posts_the_set_pre_copy_would_have_stopped_and_copied():
    t = uniform_trace(npages=16384, rate_pps=4000, seconds=6)
    pre = simulate(t, XenDefaultPolicy(), bandwidth_Bps=50e6)
    hyb = simulate(t, XenDefaultPolicy(), bandwidth_Bps=50e6, postcopy="after-precopy")
    assert hyb.mode == "hybrid" and hyb.rounds[-1].kind == "postcopy"
    assert [x.pages_sent for x in hyb.rounds[:-1]] == [x.pages_sent for x in pre.rounds[:-1]]
    assert hyb.postcopy["pages_pending"] == pre.rounds[-1].pages_sent
    with pytest.raises(ConfigError):
        simulate(t, None, bandwidth_Bps=50e6, postcopy="later")


@pytest.mark.skipif(bool(postcopy_features_missing()), reason=postcopy_features_missing() or "-")
def test_prediction_in_advance_vs_a_small_real_postcopy_run(boot_guest):
    """Profile a hot/cold guest, predict its pure post-copy from the trace alone, then really
    migrate an identical guest: pages pending exactly, faults (pages the guest demanded before
    the push reached them) within a third of the measured count."""
    from vmem.analysis.profile import run_profile
    from vmem.migration.local import run_local_migration
    from vmem.migration.source import MigrationOptions

    size, bw, params = 32 << 20, 20e6, {"rate": 5000}
    trace = run_profile("hotcold", params, size, duration_s=3, interval_s=0.02, seed=1, warmup_s=0.3)
    pred = simulate(trace, None, bandwidth_Bps=bw, postcopy="pure", bandwidth_efficiency=0.9).postcopy
    g = boot_guest("hotcold", size, **params)
    time.sleep(0.3)
    m = run_local_migration(g, MigrationOptions(postcopy="pure", bandwidth_Bps=bw, observe_s=0.05)).to_dict()
    assert m["outcome"] == "completed" and m["verified"], m["reason"]
    pc = m["postcopy"]
    assert pred["pages_pending"] == pc["pages_pending"]
    assert pc["faults"] > 100  # the hot set is demanded: the comparison means something
    assert abs(pred["faults"] - pc["faults"]) <= pc["faults"] / 3 + 50, (pred, pc)
    assert abs(pred["pages_pushed"] - pc["pages_pushed"]) <= pc["pages_pending"] * 0.1, (pred, pc)
    assert pred["pages_pushed"] + pred["pages_demanded"] == pred["pages_pending"]
    np.testing.assert_equal(pc["pages_demanded"] + pc["pages_pushed"], pc["pages_pending"])


@pytest.mark.parametrize("written_at_interval,faults", [(5, 1), (15, 0)], ids=["batch-on-the-wire", "batch-landed"])
def test_a_push_batch_lands_whole(written_at_interval, faults):
    """The destination places a pushed PAGE_DATA record only once all of it has arrived, so a
    page the guest writes while its 1024-page batch is still on the wire is demanded -- even
    page 10 of it, which a page-by-page push would have delivered in the first millisecond.
    Here the first batch takes 100 ms; page 10 is written at 50-60 ms (a fault) or at
    150-160 ms (after the batch landed: none)."""
    from vmem.analysis.simulate_postcopy import PUSH_BATCH_PAGES

    intervals = [[] for _ in range(30)]
    intervals[written_at_interval] = [10]
    t = synthetic(intervals, 4096, interval_s=0.01)
    rate = PUSH_BATCH_PAGES * wire_bytes(1024) / 1024 / 0.1
    r = simulate(t, None, bandwidth_Bps=rate, postcopy="pure", setup_s=0.0, pause_s=0.0, push_hold_s=0.0,
                 postcopy_switch_s=0.001, fault_wait_s=0.0, bandwidth_efficiency=1.0)
    pc = r.postcopy
    assert pc["faults"] == pc["pages_demanded"] == faults
    assert pc["pages_pushed"] + pc["pages_demanded"] == pc["pages_pending"] == 4096


def test_the_simulated_push_batch_is_the_migrators():
    """The simulator's batch size is a copy of the source's over a network link, the link with
    a rate it models (analysis does not import the migrator's post-copy machinery); this
    keeps the two from drifting apart."""
    from vmem.analysis.simulate_postcopy import PUSH_BATCH_PAGES
    from vmem.migration.postcopy.source import BATCH_PAGES_NETWORK

    assert PUSH_BATCH_PAGES == BATCH_PAGES_NETWORK
