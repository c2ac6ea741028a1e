"""vmem.testing and its pytest plugin: the assertion helpers (each made to fail), the
kernel-feature marker (a missing feature skips, a typo fails), the lock behind
``vmem_alone``, the copyable example, and bench cells run as pytest items."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmem.testing import (
    assert_blackout_below,
    assert_converged_within,
    assert_downtime_below,
    assert_verified,
    feature_missing,
)

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"outcome": "completed", "verified": True, "downtime_ms": 5.0, "blackout_ms": 30.0, "blackout_at_s": 0.1,
        "rounds": [{"kind": "precopy", "dirty_pages": 100}, {"kind": "precopy", "dirty_pages": 10},
                   {"kind": "stop-and-copy"}], "reason": "dirty 10 < 50 pages"}


def test_assertion_helpers_pass_a_good_report_and_say_why_a_bad_one_fails():
    assert_verified(GOOD)
    assert_downtime_below(GOOD, 10)
    assert_blackout_below(GOOD, 31)
    assert_converged_within(GOOD, 2)
    with pytest.raises(AssertionError, match="did not complete: outcome 'failed', reason 'link broke'"):
        assert_verified(GOOD | {"outcome": "failed", "reason": "link broke"})
    with pytest.raises(AssertionError, match="not verified"):
        assert_verified(GOOD | {"verified": False, "verification": {"digests": {"mismatched": 3}}})
    with pytest.raises(AssertionError, match="downtime 5.0 ms is not below 5 ms"):
        assert_downtime_below(GOOD, 5)
    with pytest.raises(AssertionError, match="blackout 30.0 ms .* not below 20 ms"):
        assert_blackout_below(GOOD, 20)
    with pytest.raises(AssertionError, match="blackout None ms"):
        assert_blackout_below(GOOD | {"blackout_ms": None}, 20)
    with pytest.raises(AssertionError, match=r"2 pre-copy rounds, more than 1; dirty pages per round \[100, 10\]"):
        assert_converged_within(GOOD, 1)


def test_feature_missing_names_the_feature_and_refuses_a_typo():
    assert feature_missing("userfaultfd") == ""
    with pytest.raises(ValueError, match="unknown kernel feature 'WP_ASYNK'"):
        feature_missing("WP_ASYNK")


def test_an_alone_item_excludes_every_other_vmem_item(tmp_path):
    from vmem.testing.plugin import _hold

    lock = str(tmp_path / "vmem-alone.lock")
    with _hold(lock, exclusive=True):
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    with _hold(lock, exclusive=False):   # shared holders coexist, an exclusive one waits
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            with pytest.raises(BlockingIOError):
                fcntl.flock(os.open(lock, os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def test_an_exclusive_waiter_is_not_starved_by_shared_holders_coming_and_going(tmp_path):
    """The gate: once an exclusive holder waits, a new shared holder queues behind it."""
    import threading

    from vmem.testing.plugin import _hold

    lock = str(tmp_path / "vmem-alone.lock")
    events = []
    with _hold(lock, exclusive=False):
        waiter = threading.Thread(target=lambda: _hold_and_log(lock, True, "exclusive", events))
        waiter.start()
        _wait_until(lambda: _gate_taken(lock))  # the exclusive one now waits, holding the gate
        late = threading.Thread(target=lambda: _hold_and_log(lock, False, "late shared", events))
        late.start()
        events.append("first shared released")
    waiter.join(10)
    late.join(10)
    assert events == ["first shared released", "exclusive", "late shared"], events


def _hold_and_log(lock, exclusive, name, events):
    from vmem.testing.plugin import _hold

    with _hold(lock, exclusive):
        events.append(name)


def _gate_taken(lock) -> bool:
    fd = os.open(lock + ".gate", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _wait_until(cond, timeout_s=10.0):
    import time

    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.mark.serial
def test_a_serial_test_of_this_suite_runs_alone(request, tmp_path_factory):
    """vmem's own configuration (pyproject: vmem_alone_markers = serial, vmem_lock_all):
    a serial test holds the lock exclusively -- no other test of this run can hold it."""
    from vmem.testing.plugin import _lock_path

    fd = os.open(_lock_path(request.config, tmp_path_factory), os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_every_test_of_this_suite_holds_the_lock_shared(request, tmp_path_factory):
    from vmem.testing.plugin import _lock_path

    fd = os.open(_lock_path(request.config, tmp_path_factory), os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):  # held (shared) by this very test
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


# Seven items for two xdist workers: plain ones run 1 s and then until they have seen another
# item running (3 s at most), the serial one runs 2 s and notes every item it sees running.  Intervals
# are CLOCK_MONOTONIC, one clock for every process on the machine.
_INTERVAL_ITEMS = """
import json, os, time
import pytest

LOG = os.environ["VMEM_TEST_INTERVALS"]

def _run(name, serial):
    mark = os.path.join(LOG, name + ".running")
    start = time.monotonic()
    open(mark, "w").close()
    seen = set()
    while time.monotonic() < start + (2.0 if serial else 3.0):
        seen |= {f[:-len(".running")] for f in os.listdir(LOG) if f.endswith(".running")} - {name}
        if seen and not serial and time.monotonic() > start + 1.0:
            break
        time.sleep(0.01)
    os.remove(mark)
    with open(os.path.join(LOG, name + ".json"), "w") as f:
        json.dump({"name": name, "start": start, "end": time.monotonic(), "seen": sorted(seen)}, f)

@pytest.mark.parametrize("k", range(3))
def test_plain_before(k):
    _run(f"plain{k}", False)

@pytest.mark.serial
def test_timed():
    _run("serial", True)

@pytest.mark.parametrize("k", range(3, 6))
def test_plain_after(k):
    _run(f"plain{k}", False)
"""


def _intervals(tmp_path, ini: str) -> dict:
    (tmp_path / "test_items.py").write_text(_INTERVAL_ITEMS)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    serial: timing\n" + ini)
    log = tmp_path / "log"
    log.mkdir()
    run = _pytest(["-q", "-n", "2", "test_items.py"], tmp_path, env={"VMEM_TEST_INTERVALS": str(log)})
    assert run.returncode == 0, run.stdout + run.stderr
    return {d["name"]: d for d in (json.loads(p.read_text()) for p in log.glob("*.json"))}


def _overlapping(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_serial_item_overlaps_no_other_item_under_xdist(tmp_path):
    (tmp_path / "on").mkdir()
    got = _intervals(tmp_path / "on", "vmem_alone_markers = serial\nvmem_lock_all = true\n")
    assert len(got) == 7, got
    serial = got.pop("serial")
    assert serial["seen"] == [] and not any(_overlapping(serial, other) for other in got.values()), (serial, got)
    assert any(d["seen"] for d in got.values()), f"the plain items never ran in parallel: {got}"
    # The same items without the configuration: the serial item runs beside the others.
    (tmp_path / "off").mkdir()
    got = _intervals(tmp_path / "off", "")
    serial = got.pop("serial")
    assert serial["seen"] and any(_overlapping(serial, other) for other in got.values()), (serial, got)


def _pytest(args, cwd, timeout=600, env=None):
    env = dict(os.environ) | (env or {})
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "vmem.testing.plugin", "-p", "no:cacheprovider",
                           "-rA", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _outcomes(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            name = rest.split(" - ")[0].split("::")[-1].strip()
            out[name.split(" ")[-1] if word == "SKIPPED" else name] = word
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_example_and_the_kernel_marker_under_the_plugin(tmp_path):
    (tmp_path / "test_vmem_example.py").write_text((ROOT / "docs/examples/test_vmem_example.py").read_text())
    # A kernel without PAGEMAP_SCAN, as far as vmem can tell.
    (tmp_path / "conftest.py").write_text(
        "import dataclasses\nimport vmem.features as f\n_real = f.probe_features\n"
        "def _fake(refresh=False):\n    d = _real(refresh)\n"
        "    d['PAGEMAP_SCAN'] = dataclasses.replace(d['PAGEMAP_SCAN'], available=False, detail='pretend')\n"
        "    return d\nf.probe_features = _fake\n")
    (tmp_path / "test_markers.py").write_text(
        "import pytest\n\n@pytest.mark.vmem_kernel('PAGEMAP_SCAN')\ndef test_needs_scan():\n    pass\n\n"
        "@pytest.mark.vmem_kernel('WP_ASYNK')\ndef test_typo():\n    pass\n\n"
        "@pytest.mark.vmem_kernel('userfaultfd')\ndef test_has_uffd():\n    pass\n\n"
        "@pytest.mark.vmem_alone\ndef test_alone_holds_the_lock(request, tmp_path_factory):\n"
        "    import fcntl, os\n    from vmem.testing.plugin import _lock_path\n"
        "    fd = os.open(_lock_path(request.config, tmp_path_factory), os.O_RDWR)\n"
        "    try:\n        with pytest.raises(BlockingIOError):\n"
        "            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)\n    finally:\n        os.close(fd)\n")
    run = _pytest(["-q", "."], tmp_path)
    got = _outcomes(run.stdout)
    assert run.returncode == 1, run.stdout + run.stderr   # the typo fails
    assert "kernel lacks PAGEMAP_SCAN: pretend" in run.stdout
    assert "unknown kernel feature 'WP_ASYNK'" in run.stdout
    assert got.get("test_has_uffd") == "PASSED" and got.get("test_typo") == "ERROR", run.stdout
    assert got.get("test_alone_holds_the_lock") == "PASSED", run.stdout
    example = [n for n in got if n.startswith(("test_hotcold", "test_postcopy", "test_a_busy"))]
    assert len(example) == 3 and all(got[n] == "PASSED" for n in example), run.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_cells_run_as_pytest_items_under_xdist(tmp_path):
    (tmp_path / "tiny.toml").write_text('name = "tiny"\nrepeats = 1\nsizes = ["16M"]\nmodes = ["precopy", "hybrid"]\n'
                                        'observe_s = 0.1\nwarmup_s = 0.1\n')
    run = _pytest(["-q", "-n", "1", "--pyargs", "vmem.testing.bench_cells", "--vmem-bench", "tiny.toml",
                   "--vmem-bench-out", "runs.jsonl"], tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout
    records = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len(records) == 2 and len({r["session"] for r in records}) == 1
    assert {r["spec"]["mode"] for r in records} == {"precopy", "hybrid"} and all(r["valid"] for r in records)
    # stored runs are judged by vmem bench without running anything
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    judged = subprocess.run([sys.executable, "-m", "vmem", "bench", "--results", "runs.jsonl", "--save-baseline",
                             "b.json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert judged.returncode == 0, judged.stderr
    assert len(json.loads((tmp_path / "b.json").read_text())["runs"]) == 2
    # without --vmem-bench the item is skipped, saying why
    bare = _pytest(["-q", "--pyargs", "vmem.testing.bench_cells"], tmp_path)
    assert bare.returncode == 0 and "no --vmem-bench" in bare.stdout, bare.stdout
