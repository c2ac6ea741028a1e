"""``vmem jobinfo NAME`` and ``vmem migrate-setmaxdowntime NAME MS`` against an agent's
running migration (virsh domjobinfo / migrate-setmaxdowntime)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from test_agent import ROOT, _env, agents, workdir  # noqa: F401  (fixtures)
from vmem.agent.commands import cmd_jobinfo, cmd_migrate_setmaxdowntime
from vmem.agent.protocol import AgentError
from vmem.migration.policy import XenDefaultPolicy, make_policy


def _fake_agent(policy) -> SimpleNamespace:
    progress = SimpleNamespace(status=lambda: {"phase": "precopy", "rounds": 2})
    return SimpleNamespace(jobs={"g": {"migration": SimpleNamespace(policy=policy), "progress": progress,
                                       "target": "10.0.0.2:8002"}})


def test_setmaxdowntime_refusals():
    agent = _fake_agent(make_policy("downtime-limit", max_downtime_ms=300))
    with pytest.raises(AgentError, match="no outgoing migration"):
        cmd_migrate_setmaxdowntime(agent, None, {"name": "other", "ms": 10})
    for bad in (0, -5, "x", float("inf"), None):
        with pytest.raises(AgentError, match="downtime limit must be"):
            cmd_migrate_setmaxdowntime(agent, None, {"name": "g", "ms": bad})
    assert agent.jobs["g"]["migration"].policy.max_downtime_ms == 300
    with pytest.raises(AgentError, match="has no downtime limit"):
        cmd_migrate_setmaxdowntime(_fake_agent(XenDefaultPolicy()), None, {"name": "g", "ms": 10})
    assert cmd_migrate_setmaxdowntime(agent, None, {"name": "g", "ms": 42})["old_ms"] == 300
    assert agent.jobs["g"]["migration"].policy.max_downtime_ms == 42
    job = cmd_jobinfo(agent, None, {"name": "g"})["job"]
    assert job["policy"]["max_downtime_ms"] == 42 and job["target"] == "10.0.0.2:8002" and job["rounds"] == 2
    with pytest.raises(AgentError, match="no outgoing migration"):
        cmd_jobinfo(agent, None, {"name": "other"})


def _wait_for_job(a, mig, pred, what: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        info = a.cli("jobinfo", "g1", "--json")
        if info.returncode == 0:
            job = json.loads(info.stdout)
            if pred(job):
                return job
        assert time.monotonic() < deadline and mig.poll() is None, (what, info.stderr, a.log())
        time.sleep(0.1)


def _run_cli_migration(a, b, workdir, *flags):
    report_path = os.path.join(workdir, "report.json")
    mig = subprocess.Popen([sys.executable, "-m", "vmem", "migrate", "g1", b.address, "--quiet", "--observe", "0.1",
                            *flags, "--json", report_path, "--agent", a.socket],
                           env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return mig, report_path


def _reap(mig) -> None:
    """After a failed assertion: the migrating CLI is killed at once, not waited for."""
    if mig.poll() is None:
        mig.kill()
        mig.communicate()


def _finish(mig, a, report_path) -> dict:
    """The migrating CLI's end (bounded), and its report: completed and verified."""
    _out, err = mig.communicate(timeout=120)
    assert mig.returncode == 0, err + a.log()
    with open(report_path) as f:
        report = json.load(f)
    assert report["outcome"] == "completed", report["reason"]
    assert report["verification"]["digests"]["mismatched"] == 0 and report["verification"]["guest_check"]["ok"]
    return report


def test_jobinfo_and_setmaxdowntime_on_a_running_migration(agents, workdir):  # noqa: F811
    """A migration whose 1 ms limit it can never meet (its hot set, rewritten at 30,000 pages/s,
    is far more than 1 ms of a 20 MB/s link) keeps going; jobinfo shows it; raising
    the limit lets the policy stop at its next decision, and the report says so."""
    a = agents("a")
    b = agents("b")
    a.request("create", name="g1", workload="hotcold", size="32M", seed=3, workload_args=["rate=30000"])
    mig, report_path = _run_cli_migration(a, b, workdir, "--bandwidth", "20M", "--policy", "downtime-limit",
                                          "--max-downtime-ms", "1")
    try:
        job = _wait_for_job(a, mig, lambda j: j["rounds"] >= 2, "two rounds done")
        assert job["phase"] == "precopy" and job["policy"]["name"] == "downtime-limit"
        assert job["policy"]["max_downtime_ms"] == 1 and job["expected_downtime_ms"] > 1
        text = a.cli("jobinfo", "g1")
        assert text.returncode == 0 and "expected downtime" in text.stdout and "max downtime 1 ms" in text.stdout
        assert a.cli("migrate-setmaxdowntime", "g1", "0").returncode == 2
        done = a.cli("migrate-setmaxdowntime", "g1", "60000")
        assert done.returncode == 0 and "1 -> 60000 ms" in done.stdout, done.stderr
        report = _finish(mig, a, report_path)
    finally:
        _reap(mig)
    assert "60000 ms" in report["reason"], report["reason"]
    gone = a.cli("jobinfo", "g1")
    assert gone.returncode == 1 and "no outgoing migration" in gone.stderr


def _fake_migration(postcopy: str = "off", shaped: bool = True):
    """A SourceMigration's set_bandwidth over just the state it uses (the real method)."""
    import threading

    from transport import ShapedChannel, channel_pair
    from vmem.migration.report import MigrationReport
    from vmem.migration.source import MigrationOptions, SourceMigration

    a, b = channel_pair()
    ch = ShapedChannel(a, 10e6) if shaped else a
    mig = SimpleNamespace(opt=MigrationOptions(postcopy=postcopy, bandwidth_Bps=10e6 if shaped else None),
                          _speed_lock=threading.Lock(), _pc=None, ch=ch, report=MigrationReport(), _t_start_ns=0,
                          policy=XenDefaultPolicy(), links=(a, b))
    mig.set_bandwidth = lambda rate, postcopy=False: SourceMigration.set_bandwidth(mig, rate, postcopy)
    return mig


def test_setspeed_refusals_and_changes():
    """migrate-setspeed: a rate that is not one, a link without a shaper, a push cap on a
    migration without post-copy are refused naming the flag, and change nothing; a change
    reaches the shaper (or the post-copy options) and is listed in the report."""
    from vmem.agent.commands import cmd_migrate_setspeed

    def agent_for(mig):
        return SimpleNamespace(jobs={"g": {"migration": mig, "progress": None, "target": "10.0.0.2:8002"}})

    mig = _fake_migration()
    agent = agent_for(mig)
    with pytest.raises(AgentError, match="no outgoing migration"):
        cmd_migrate_setspeed(agent, None, {"name": "other", "bandwidth": "1G"})
    for bad in ("100", "-1M", "0M", "fast", 100, None):
        with pytest.raises(AgentError, match="--bandwidth"):
            cmd_migrate_setspeed(agent, None, {"name": "g", "bandwidth": bad})
    with pytest.raises(AgentError, match="postcopy must be true or false"):
        cmd_migrate_setspeed(agent, None, {"name": "g", "bandwidth": "1G", "postcopy": "yes"})
    with pytest.raises(AgentError, match="--postcopy-bandwidth: this migration has no post-copy"):
        cmd_migrate_setspeed(agent, None, {"name": "g", "bandwidth": "1G", "postcopy": True})
    assert mig.ch.bucket.rate_Bps == 10e6 and mig.report.speed_changes == []
    reply = cmd_migrate_setspeed(agent, None, {"name": "g", "bandwidth": "1G"})
    assert reply == {"name": "g", "postcopy": False, "old_Bps": 10e6, "bandwidth_Bps": 1e9}
    assert mig.ch.bucket.rate_Bps == 1e9 and mig.opt.bandwidth_Bps == 1e9
    assert [(c["what"], c["old"], c["new"]) for c in mig.report.speed_changes] == [("bandwidth_Bps", 10e6, 1e9)]
    from rich.console import Console

    from vmem.cli.display import print_summary

    console = Console(record=True, width=240)
    print_summary(mig.report, console)  # the summary says it too
    assert re.search(r"--bandwidth changed +│ at [0-9.]+ s: 10\.0 MB/s -> 1,000\.0 MB/s \(migrate-setspeed\)",
                     console.export_text()), console.export_text()

    unshaped = agent_for(_fake_migration(postcopy="pure", shaped=False))
    with pytest.raises(AgentError, match="--bandwidth: this migration was started without --bandwidth"):
        cmd_migrate_setspeed(unshaped, None, {"name": "g", "bandwidth": "1G"})
    reply = cmd_migrate_setspeed(unshaped, None, {"name": "g", "bandwidth": "50M", "postcopy": True})
    assert reply["old_Bps"] is None and unshaped.jobs["g"]["migration"].opt.postcopy_bandwidth_Bps == 50e6


def test_token_bucket_set_rate_paces_from_then_on():
    """TokenBucket.set_rate: what was granted stays granted at the old rate; from then on
    the new rate paces (fake clock: the waits are exact)."""
    from transport import TokenBucket

    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    b = TokenBucket(1000.0, burst_bytes=100, clock=lambda: now[0], sleep=sleep)
    assert b.consume(100) == 0.0            # the burst
    assert b.consume(1000) == pytest.approx(1.0)  # 1,000 bytes at 1,000 B/s
    assert b.set_rate(4000.0) == 1000.0
    assert b.consume(1000) == pytest.approx(0.25)  # now at 4,000 B/s
    with pytest.raises(ValueError):
        b.set_rate(0)
    assert b.rate_Bps == 4000.0 and b.burst_bytes == 100  # a burst given stays


def test_setspeed_raises_a_running_migrations_link_cap(agents, workdir):  # noqa: F811
    """A pre-copy capped at 5 MB/s (its 32 MiB round 0 alone would take ~7 s) is raised to
    1 GB/s while round 0 runs: the migration completes verified, a round ran far above the
    old cap (impossible under it for a round of more than a burst), the report lists the
    change; a malformed rate is refused by the CLI before the agent is asked."""
    a = agents("a")
    b = agents("b")
    a.request("create", name="g1", workload="hotcold", size="32M", seed=3, workload_args=["rate=5000"])
    mig, report_path = _run_cli_migration(a, b, workdir, "--bandwidth", "5M")
    try:
        _wait_for_job(a, mig, lambda j: j["phase"] == "precopy", "round 0 running")
        assert a.cli("migrate-setspeed", "g1", "100").returncode == 2
        done = a.cli("migrate-setspeed", "g1", "1G")
        assert done.returncode == 0 and "--bandwidth 5.0 MB/s -> 1,000.0 MB/s" in done.stdout, done.stderr
        report = _finish(mig, a, report_path)
    finally:
        _reap(mig)
    assert [(c["what"], c["old"], c["new"]) for c in report["speed_changes"]] == [("bandwidth_Bps", 5e6, 1e9)]
    big = [r for r in report["rounds"] if r["bytes_sent"] >= 1 << 20]
    assert max(r["bandwidth_bps"] for r in big) > 3 * 5e6 * 8, report["rounds"]


def test_setspeed_postcopy_raises_a_running_push_cap(agents, workdir):  # noqa: F811
    """A pure post-copy whose push is capped at 4 MB/s (~8 s for this guest's data) gets its
    cap raised to 1 GB/s once the push runs: it completes verified, the push ran far above
    the old cap over its whole duration, and the report lists the change and the final cap."""
    a = agents("a")
    b = agents("b")
    a.request("create", name="g1", workload="hotcold", size="32M", seed=3, workload_args=["rate=5000"])
    mig, report_path = _run_cli_migration(a, b, workdir, "--postcopy", "--postcopy-bandwidth", "4M")
    try:
        # the push is running once the phase says so (the phase is "postcopy" from the switch on)
        _wait_for_job(a, mig, lambda j: j["phase"] == "postcopy" and "serving faults" in j.get("detail", ""),
                      "post-copy push running")
        done = a.cli("migrate-setspeed", "g1", "1G", "--postcopy")
        assert done.returncode == 0 and "--postcopy-bandwidth 4.0 MB/s -> 1,000.0 MB/s" in done.stdout, done.stderr
        report = _finish(mig, a, report_path)
    finally:
        _reap(mig)
    assert [(c["what"], c["old"], c["new"]) for c in report["speed_changes"]] == \
        [("postcopy_bandwidth_Bps", 4e6, 1e9)]
    pc = report["postcopy"]
    assert pc["push_bandwidth_limit_Bps"] == 1e9 and pc["source"]["pages_pushed_sent"] >= 1024
    assert pc["push_rate_Bps"] > 2 * 4e6, pc
