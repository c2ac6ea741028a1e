"""Bench cells spread by pytest-xdist over two hosts: network-namespace test hosts
(tests/testhosts.py), each running one xdist worker through an execnet gateway
``popen//id=hN//python=ip netns exec NS python`` -- the worker process, and every guest and
migrator it starts, lives in that namespace, where the host's address is the only one.
Records come back to the controlling pytest with the test reports (no shared results
file), and each names the worker and the host it ran on.  A worker that dies leaves a
failed run in the results, not a hole."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testhosts import testhosts  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
TINY = 'name = "tiny"\nrepeats = 2\nsizes = ["16M"]\nmodes = ["precopy", "hybrid"]\nobserve_s = 0.1\nwarmup_s = 0.1\n'
# A plugin that kills the xdist worker as it starts one item (os._exit: no report, no record).
CRASH = ("import os\n\ndef pytest_runtest_setup(item):\n"
         "    if os.environ.get('PYTEST_XDIST_WORKER') and 'r0-hotcold/16MiB/xen/auto/hybrid' in item.nodeid:\n"
         "        os._exit(3)\n")


def _env(extra_path: str | None = None) -> dict:
    env = dict(os.environ)
    paths = [str(ROOT), *([extra_path] if extra_path else []), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _bench_items(tmp_path: Path, dist_args: list[str], *, plugins: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    (tmp_path / "tiny.toml").write_text(TINY)
    args = [sys.executable, "-m", "pytest", "-p", "vmem.testing.plugin", *(a for p in plugins for a in ("-p", p)),
            "-p", "no:cacheprovider", "-rA", "-q", "--pyargs", "vmem.testing.bench_cells", "--vmem-bench", "tiny.toml",
            "--vmem-bench-out", "runs.jsonl", *dist_args]
    return subprocess.run(args, cwd=tmp_path, env=_env(str(tmp_path)), capture_output=True, text=True, timeout=900)


def _records(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]


def _judge(tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmem", "bench", "--results", "runs.jsonl", "--save-baseline", "b.json"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_cells_run_on_two_namespace_hosts_and_come_back_complete(tmp_path, testhosts):  # noqa: F811
    hosts = testhosts
    tx = [a for h in (1, 2) for a in ("--tx", f"popen//id=h{h}//python=ip netns exec {hosts.ns(h)} {sys.executable}")]
    run = _bench_items(tmp_path, ["--dist", "load", *tx])
    assert run.returncode == 0, run.stdout + run.stderr
    records = _records(tmp_path)
    # complete: every (cell, repeat) exactly once, one session, every run verified
    assert sorted((r["spec"]["mode"], r["repeat"]) for r in records) == [
        ("hybrid", 0), ("hybrid", 1), ("precopy", 0), ("precopy", 1)], records
    assert len({r["session"] for r in records}) == 1 and None not in {r["session"] for r in records}
    assert all(r["valid"] for r in records), [(r["cell"], r["outcome"], r["reason"]) for r in records]
    assert sorted(r["order"] for r in records) == [0, 1, 2, 3]
    # each ran in the namespace of the worker it was given to, and both hosts took cells
    netns_of = {f"h{h}": f"net:[{os.stat(f'/run/netns/{hosts.ns(h)}').st_ino}]" for h in (1, 2)}
    ours = os.readlink("/proc/self/ns/net")
    for r in records:
        w = r["worker"]
        host = int(w["xdist_worker"].removeprefix("h"))
        assert w["netns"] == netns_of[w["xdist_worker"]] != ours, (w, netns_of)
        assert w["ipv4"] == [hosts.addr(host)], w
    assert {r["worker"]["xdist_worker"] for r in records} == {"h1", "h2"}
    # and vmem bench judges them as its own runs
    judged = _judge(tmp_path)
    assert judged.returncode == 0, judged.stdout + judged.stderr
    assert len(json.loads((tmp_path / "b.json").read_text())["runs"]) == 4


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_worker_that_dies_leaves_a_failed_run_not_a_hole(tmp_path):
    (tmp_path / "crashplug.py").write_text(CRASH)
    run = _bench_items(tmp_path, ["-n", "1", "--vmem-bench-repeats", "1"], plugins=("crashplug",))
    assert run.returncode == 1 and "crashed while running" in run.stdout, run.stdout + run.stderr
    records = _records(tmp_path)
    assert len(records) == 2, records
    dead = [r for r in records if not r["valid"]]
    assert len(dead) == 1 and dead[0]["spec"]["mode"] == "hybrid" and dead[0]["repeat"] == 0, dead
    assert dead[0]["outcome"] == "failed" and "pytest worker gw0 crashed while running it" in dead[0]["reason"]
    assert all(r["valid"] for r in records if r is not dead[0])
    judged = _judge(tmp_path)  # a failed run fails the session
    assert judged.returncode == 1, judged.stdout + judged.stderr
