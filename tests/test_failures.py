"""Failures during agent-to-agent migrations: a small, fast subset of scripts/campaign.py.

Two agents in two network namespaces (the module's ``testhosts``), one busy guest, one
fault per test, injected at a chosen moment; each test checks the documented outcome
(README "Failure semantics", docs/postcopy.md, docs/reliability.md) with the campaign's own
judge and leak scanner: completed and verified, or failed with a clear reason while the
source guest runs on and passes its ledger check; the destination keeps no guest, process,
memfd or file.  (One-host failure tests live in test_migrate.py and test_postcopy.py.)
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import time

import pytest

from testhosts import testhosts  # noqa: F401  (the module-scoped fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("vmem_campaign", os.path.join(ROOT, "scripts", "campaign.py"))
campaign = importlib.util.module_from_spec(_spec)
sys.modules["vmem_campaign"] = campaign
_spec.loader.exec_module(campaign)

FaultPlan = campaign.FaultPlan

#: Small and slowed down (50 MB/s) so a fault lands inside round 0 (~0.7 s).
GUEST_SIZE = "32M"
BANDWIDTH = "50M"


@pytest.fixture
def camp(testhosts):  # noqa: F811
    """Fresh agents (per test: a test may kill one) and one busy guest on host 1."""
    workdir = tempfile.mkdtemp(prefix=f"vmem-failures-{os.getpid()}-")
    os.chmod(workdir, 0o700)
    c = campaign.Campaign(testhosts, workdir, size=GUEST_SIZE, bandwidth=BANDWIDTH, log=lambda *_: None)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _plan(fault: str, mode: str = "precopy", when: str = "precopy", **kw) -> FaultPlan:
    fields = dict(mode=mode, fault=fault, when=when, at_fraction=0.3, delay_s=0.0, duration_s=1.0,
                  side="destination", oom_fraction=0.4) | kw
    return FaultPlan(**fields)


def _check(res, *, outcome: str | tuple) -> None:
    outcomes = (outcome,) if isinstance(outcome, str) else outcome
    assert res.applied, f"the fault missed the migration: {res}"
    assert res.outcome in outcomes, res
    assert res.expected, res.problems
    assert not res.leaks, res.leaks
    assert not res.lost and res.corrupted_pages == 0


def test_link_cut_during_precopy(camp):
    """The destination's link goes down for 1.5 s in round 0: TCP rides it out; the
    migration completes and verifies (or fails clearly); nothing is left behind."""
    res = camp.run_trial(0, _plan("link-cut", duration_s=1.5))
    _check(res, outcome=("completed", "failed"))


def test_destination_agent_killed_mid_precopy(camp):
    res = camp.run_trial(0, _plan("dest-kill"))
    _check(res, outcome="failed")
    assert "closed the connection" in res.reason and res.source_guest_state == "running"
    assert res.dest_agent_died
    src, row = camp.holder()
    assert src is camp.agents[0] and row["state"] == "running"


def test_source_guest_killed_mid_precopy(camp):
    res = camp.run_trial(0, _plan("src-guest-kill", at_fraction=0.5))
    _check(res, outcome="failed")
    assert res.source_guest_state == "crashed" and "killed by signal 9" in res.reason


def test_destination_out_of_memory_mid_precopy(camp):
    why = campaign.MemoryCap.unavailable()
    if why:
        pytest.skip(why)
    res = camp.run_trial(0, _plan("dest-oom", oom_fraction=0.3))
    _check(res, outcome="failed")
    assert res.source_guest_state == "running"


def test_pingpong(camp):
    out = camp.pingpong(5)
    assert out["completed"] == out["migrations"] == 5, out["failed"]
    assert out["corrupted_pages"] == 0 and out["lost"] == 0 and not out["leaks"], out


# --- bugs found by the campaign, fixed since (kept as regression tests) --


def test_postcopy_destination_killed_after_the_switch_leaves_the_source_paused(camp):
    res = camp.run_trial(0, _plan("dest-kill", mode="postcopy", when="after-switch", delay_s=0.1))
    assert res.applied and res.outcome == "failed" and res.source_paused
    assert not res.lost and not res.leaks
    holder, row = camp.holder()
    assert holder is camp.agents[0] and row["alive"]
    assert res.source_guest_state == "paused", res.problems
    assert not res.problems, res.problems


#: The campaign's bound: a migration over a dead link must fail within this.
DEAD_LINK_BOUND_S = 10.0


def test_migration_over_a_dead_link_fails_within_a_bound(camp):
    src, dst = camp.agents
    done = threading.Event()
    reply: dict = {}
    sent = threading.Event()

    def on_event(ev):
        if ev.get("event") == "sent":
            sent.set()

    def run():
        reply.update(camp.migrate(src, dst, "precopy", on_event))
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert sent.wait(30)
    camp._link(dst, "link-cut", True)
    try:
        failed_in_time = done.wait(DEAD_LINK_BOUND_S)
    finally:
        camp._link(dst, "link-cut", False)
        if not done.is_set():
            # TCP would take its backoff to notice even a killed peer: stop both agents
            # (SIGTERM breaks the source's in-flight connection; the guest stops with it).
            src.stop()
            dst.kill()
            t.join(30)
    assert failed_in_time, f"the migration over a dead link was still running after {DEAD_LINK_BOUND_S:g} s"
    report = reply.get("report") or {}
    assert report.get("outcome") == "failed" and report.get("source_guest_state") == "running"


def test_destination_discards_an_incoming_guest_whose_source_gave_up(camp):
    """Every packet the source host sends is dropped in round 0: the source's TCP times
    out (ETIMEDOUT, ~8 s here) and the migration fails clearly; its RST is dropped too, so
    only the destination's own liveness check can end its side."""
    src, dst = camp.agents
    sent = threading.Event()
    reply: dict = {}
    t = threading.Thread(target=lambda: reply.update(camp.migrate(src, dst, "precopy", lambda ev: ev.get("event") == "sent" and sent.set())),
                         daemon=True)
    t.start()
    assert sent.wait(30)
    camp._link(src, "link-loss", True)
    try:
        t.join(40)
    finally:
        camp._link(src, "link-loss", False)
    assert not t.is_alive(), "the source did not give up within 40 s"
    report = reply["report"]
    assert report["outcome"] == "failed" and report["source_guest_state"] == "running", report["reason"]
    assert report["verification"]["source_guest_check"]["ok"]
    released = camp.wait_settled(dst, timeout_s=DEST_RELEASE_BOUND_S)
    leaks = campaign.scan_leaks(dst)
    assert released and not leaks, f"destination after {DEST_RELEASE_BOUND_S:g} s: {dst.guests()} {leaks}"


#: After the source failed, the destination should discard its side within this.
DEST_RELEASE_BOUND_S = 5.0
