"""A short soak in CI (scripts/soak.py): 100 ping-pong migrations in mixed modes between
keyed agents on two test hosts, sampled every 10: all verified, no leak, descriptors and
threads flat over the last 50, agent memory (RssAnon) with no upward trend over the last 50.  The long run (1000) and its
result are in docs/reliability.md."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile

import pytest

from testhosts import testhosts  # noqa: F401  (the module-scoped fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("vmem_soak", os.path.join(ROOT, "scripts", "soak.py"))
soak = importlib.util.module_from_spec(_spec)
sys.modules["vmem_soak"] = soak
_spec.loader.exec_module(soak)

MIB = 1 << 20


def _sample(after: int, rss_mib: float, fds: int = 10, threads: int = 3, holds: bool = True) -> dict:
    return {"after": after, "agents": {"h1": {"rss_anon_bytes": int(rss_mib * MIB), "fds": fds, "threads": threads,
                                              "holds_guest": holds}}}


def test_plateau_rule_passes_a_flat_peak_and_fails_a_rising_one():
    swinging = [_sample(0, 20), _sample(50, 40), _sample(100, 31), _sample(150, 41.5), _sample(200, 35)]
    assert soak.plateau(swinging, 100, 2 * MIB)["ok"]
    rising = [_sample(0, 20), _sample(50, 30), _sample(100, 33), _sample(150, 36), _sample(200, 39)]
    verdict = soak.plateau(rising, 100, 2 * MIB)
    assert not verdict["ok"] and "RssAnon peak rose 6.0 MiB" in verdict["problems"][0]
    leaking_fds = [_sample(0, 20), _sample(100, 20, fds=10), _sample(150, 20, fds=12), _sample(200, 20, fds=14)]
    verdict = soak.plateau(leaking_fds, 100, 2 * MIB)
    assert not verdict["ok"] and "fds 10 -> 14" in verdict["problems"][0]
    # Holding the guest costs descriptors: only samples alike are compared.
    alternating = [_sample(0, 20), _sample(100, 20, fds=10), _sample(150, 20, fds=4, holds=False),
                   _sample(200, 20, fds=10)]
    assert soak.plateau(alternating, 100, 2 * MIB)["ok"]


def test_rss_slope_is_robust_to_one_swing_and_sees_a_leak():
    swing = [_sample(0, 20), _sample(50, 23), _sample(60, 40), _sample(70, 23.1), _sample(80, 23.2), _sample(100, 23.3)]
    assert soak.rss_slope(swing, 50)["h1"] < 1.0
    leak = [_sample(0, 20), _sample(50, 23), _sample(60, 25), _sample(70, 27), _sample(80, 29), _sample(100, 33)]
    assert soak.rss_slope(leak, 50)["h1"] == 20.0


#: CI's memory rule: RssAnon's trend over the last half of the run, MiB per 100 migrations
#: (the plateau budget, 2 MiB over 50).  Before the agent collected its reference cycles the
#: samples swung between 40 and 100 MiB with dead migration buffers.
MAX_RSS_SLOPE_MIB_PER_100 = 4.0
#: ... and the typical end state (the median sample of the last half) above the start.
MAX_RSS_ABOVE_START_MIB = 16


@pytest.mark.slow
def test_short_soak_meets_the_plateau_rule(testhosts):  # noqa: F811
    workdir = tempfile.mkdtemp(prefix=f"vmem-soak-test-{os.getpid()}-")
    os.chmod(workdir, 0o700)
    try:
        res = soak.run_soak(testhosts, workdir, migrations=100, every=10, window=50, size="16M", rate=5000,
                            modes=("precopy", "postcopy", "hybrid"), seed=3, rss_budget_bytes=2 * MIB,
                            log=lambda *_: None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert res["completed"] == res["migrations"] == 100, res["failed"][:5]
    assert all(res["modes"][m] > 10 for m in ("precopy", "postcopy", "hybrid")), res["modes"]
    assert len(res["checks"]) == 10 and all(c["ok"] for c in res["checks"]), res["checks"]
    assert not res["leaks"], res["leaks"]
    # Descriptors and threads: the plateau rule as it stands.
    assert not [p for p in res["plateau"]["problems"] if "RssAnon" not in p], res["plateau"]
    # RssAnon: judged by its trend over the last half (a robust slope, so one sample caught
    # while the allocator still holds a migration's buffers cannot fail it on a loaded
    # machine) and by the typical level there.  The long run's figures: docs/reliability.md.
    slopes = soak.rss_slope(res["samples"], 50)
    for name in ("h1", "h2"):
        series = [s["agents"][name]["rss_anon_bytes"] for s in res["samples"]]
        shown = (name, [round(v / MIB, 1) for v in series], slopes)
        assert slopes[name] is not None and slopes[name] <= MAX_RSS_SLOPE_MIB_PER_100, shown
        last_half = sorted(s["agents"][name]["rss_anon_bytes"] for s in res["samples"] if s["after"] >= 50)
        assert last_half[len(last_half) // 2] - series[0] <= MAX_RSS_ABOVE_START_MIB * MIB, shown
