"""``vmem jobinfo NAME`` and ``vmem migrate-setmaxdowntime NAME MS`` against an agent's
running migration (virsh domjobinfo / migrate-setmaxdowntime)."""
from __future__ import annotations

import json
import os
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


def test_jobinfo_and_setmaxdowntime_on_a_running_migration(agents, workdir):  # noqa: F811
    """A migration whose 1 ms limit it can never meet (its hot set, rewritten at 30,000 pages/s,
    is far more than 1 ms of a 20 MB/s link) keeps going; jobinfo shows it; raising
    the limit lets the policy stop at its next decision, and the report says so."""
    a = agents("a")
    b = agents("b")
    a.request("create", name="g1", workload="hotcold", size="32M", seed=3, workload_args=["rate=30000"])
    report_path = os.path.join(workdir, "report.json")
    mig = subprocess.Popen([sys.executable, "-m", "vmem", "migrate", "g1", b.address, "--quiet", "--observe", "0.1",
                            "--bandwidth", "20M", "--policy", "downtime-limit", "--max-downtime-ms", "1",
                            "--json", report_path, "--agent", a.socket],
                           env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            info = a.cli("jobinfo", "g1", "--json")
            if info.returncode == 0 and json.loads(info.stdout)["rounds"] >= 2:
                break
            assert time.monotonic() < deadline and mig.poll() is None, (info.stderr, a.log())
            time.sleep(0.2)
        job = json.loads(info.stdout)
        assert job["phase"] == "precopy" and job["policy"]["name"] == "downtime-limit"
        assert job["policy"]["max_downtime_ms"] == 1 and job["expected_downtime_ms"] > 1
        text = a.cli("jobinfo", "g1")
        assert text.returncode == 0 and "expected downtime" in text.stdout and "max downtime 1 ms" in text.stdout
        assert a.cli("migrate-setmaxdowntime", "g1", "0").returncode == 2
        done = a.cli("migrate-setmaxdowntime", "g1", "60000")
        assert done.returncode == 0 and "1 -> 60000 ms" in done.stdout, done.stderr
        out, err = mig.communicate(timeout=120)
        assert mig.returncode == 0, err + a.log()
    finally:
        if mig.poll() is None:
            mig.kill()
            mig.communicate()
    with open(report_path) as f:
        report = json.load(f)
    assert report["outcome"] == "completed" and "60000 ms" in report["reason"], report["reason"]
    gone = a.cli("jobinfo", "g1")
    assert gone.returncode == 1 and "no outgoing migration" in gone.stderr
