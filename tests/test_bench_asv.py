"""``vmem trend --asv DIR``: stored bench results in asv's results format (vmem.bench.asv).

The files are checked field by field against asv's documented format (its developer docs,
"Benchmark suite layout and file formats": results version 2, ``result_columns``, a
parametrized result in cartesian order, null = failed, NaN = skipped), and -- where asv is
installed (it is in vmem's test extras) -- ``asv publish`` turns them into a dashboard whose
graph holds our medians and ``asv compare`` flags the slower commit."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmem.bench.asv import RESULT_COLUMNS
from vmem.bench.matrix import suite_matrix
from vmem.bench.metrics import METRIC_NAMES
from vmem.bench.runner import append_record, run_record

ROOT = Path(__file__).resolve().parent.parent
# What asv's docs require of a results file (version 2) and of benchmarks.json entries.
RESULT_KEYS = {"version", "commit_hash", "env_name", "date", "params", "python", "requirements", "env_vars",
               "result_columns", "results", "durations"}
ASV_COLUMNS = ["result", "params", "version", "started_at", "duration", "stats_ci_99_a", "stats_ci_99_b",
               "stats_q_25", "stats_q_75", "stats_number", "stats_repeat", "samples", "profile"]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@example.invalid", "-c", "user.name=t", *args],
                          capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def _runs(tmp_path: Path) -> tuple[Path, list[str], list]:
    """A git repo with two commits and a results file: 2 cells x 3 verified runs per
    commit (downtime 10 ms + repeat + cell at the first commit, 20 ms + ... at the second),
    plus a failed run, a run from a modified checkout, and a third cell that only failed."""
    repo = tmp_path / "project"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    for msg in ("one", "two"):
        _git(repo, "commit", "-q", "--allow-empty", "-m", msg)
    commits = _git(repo, "log", "--format=%H").split()[::-1]
    cells = suite_matrix("standard").cells[:3]
    out = tmp_path / "runs.jsonl"

    def add(cell, commit, k, rep, **over):
        report = {"outcome": "completed", "verified": True, "downtime_ms": 10.0 * (k + 1) + rep + cells.index(cell),
                  "blackout_ms": 12.0, "migration_time_s": 0.5, "pages_sent": 9000 + rep, "mode": cell.mode,
                  "provenance": {"git_commit": commit, "hostname": "lab host", "python": "3.11.7", "kernel": "6.1.0",
                                 "cpu_model": "Test CPU", "cpu_count": 2, "memory_bytes": 4 << 30,
                                 "date_utc": f"2026-12-0{k + 1}T10:00:0{rep}+00:00"}} | over
        append_record(str(out), run_record(cell, report, repeat=rep, order=rep, session=f"s{k}", suite="standard"))

    for k, commit in enumerate(commits):
        for rep in range(3):
            for cell in cells[:2]:
                add(cell, commit, k, rep)
        add(cells[0], commit, k, 3, outcome="failed", verified=False, downtime_ms=999.0)  # not counted
        add(cells[2], commit, k, 0, outcome="failed", verified=False)                     # a cell that only failed
    add(cells[0], commits[1] + "+dirty", 1, 4, downtime_ms=500.0)                          # left out
    return repo, commits, cells


def _export(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"]
                                                  if os.environ.get("PYTHONPATH") else ""))
    return subprocess.run([sys.executable, "-m", "vmem", "trend", "runs.jsonl", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_asv_export_writes_asvs_documented_results_format(tmp_path):
    _, commits, cells = _runs(tmp_path)
    run = _export(tmp_path, "--asv", "results")
    assert run.returncode == 0, run.stderr
    assert "2 file(s)" in run.stdout and "1 run(s) left out" in run.stdout, run.stdout
    res = tmp_path / "results"
    bench = json.loads((res / "benchmarks.json").read_text())
    assert bench.pop("version") == 2
    ids = sorted(c.cell_id for c in cells)
    assert set(bench) == {f"vmem_bench.{m}" for m in METRIC_NAMES}
    for name, b in bench.items():
        assert b["name"] == name and b["type"] == "track" and b["unit"] and isinstance(b["version"], str)
        assert b["param_names"] == ["cell"] and b["params"] == [[repr(c) for c in ids]]
    assert bench["vmem_bench.downtime_ms"]["unit"] == "ms" and bench["vmem_bench.pages_sent"]["unit"] == "pages"
    machine = json.loads((res / "lab_host" / "machine.json").read_text())
    assert machine["version"] == 1 and machine["machine"] == "lab_host" and machine["num_cpu"] == "2"
    assert {"arch", "cpu", "os", "ram"} <= set(machine)
    files = sorted((res / "lab_host").glob("*-vmem-py3.11.json"))
    assert [f.name[:8] for f in sorted(files, key=lambda f: commits.index(json.loads(f.read_text())["commit_hash"]))] \
        == [c[:8] for c in commits]
    for k, commit in enumerate(commits):
        doc = json.loads((res / "lab_host" / f"{commit[:8]}-vmem-py3.11.json").read_text())
        assert set(doc) == RESULT_KEYS and doc["version"] == 2 and doc["commit_hash"] == commit
        assert doc["result_columns"] == ASV_COLUMNS == RESULT_COLUMNS
        assert doc["python"] == "3.11" and doc["params"]["machine"] == "lab_host" and isinstance(doc["date"], int)
        assert set(doc["results"]) == set(bench)
        for name, row in doc["results"].items():
            assert len(row) <= len(ASV_COLUMNS)
            r = dict(zip(ASV_COLUMNS, row))
            assert r["params"] == bench[name]["params"] and r["version"] == bench[name]["version"]
            assert len(r["result"]) == len(ids)  # one per value of the one parameter
        down = dict(zip(ASV_COLUMNS, doc["results"]["vmem_bench.downtime_ms"]))
        for i, cid in enumerate(ids):
            j = [c.cell_id for c in cells].index(cid)
            if j == 2:  # only failed: null (asv's "failed")
                assert down["result"][i] is None and down["samples"][i] is None
                continue
            want = [10.0 * (k + 1) + rep + j for rep in range(3)]  # the failed 999 ms and the dirty 500 ms are out
            assert down["samples"][i] == want and down["result"][i] == want[1] and down["stats_repeat"][i] == 3
            assert down["stats_q_25"][i] == want[0] + 0.5 and down["stats_q_75"][i] == want[1] + 0.5
            assert (down["stats_ci_99_a"][i], down["stats_ci_99_b"][i]) == (want[0], want[2])
        fault = dict(zip(ASV_COLUMNS, doc["results"]["vmem_bench.fault_p99_us"]))
        verified = [i for i, cid in enumerate(ids) if [c.cell_id for c in cells].index(cid) != 2]
        assert all(math.isnan(fault["result"][i]) for i in verified)  # verified, no such figure: skipped


def test_asv_export_refuses_nothing_to_export_and_a_missing_output_choice(tmp_path):
    _runs(tmp_path)
    run = _export(tmp_path)
    assert run.returncode == 2 and "give --html FILE, --asv DIR or both" in run.stderr, run.stderr
    dirty = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r | {"report": r["report"] | {"provenance": r["report"][
        "provenance"] | {"git_commit": None}}}) + "\n" for r in dirty))
    run = _export(tmp_path, "--asv", "results")
    assert run.returncode == 1 and "0 file(s)" in run.stdout and "without a commit" in run.stdout, run.stdout


def _asv_missing() -> str:
    probe = subprocess.run([sys.executable, "-c", "import asv"], capture_output=True, text=True, timeout=60)
    return "" if probe.returncode == 0 else "asv is not installed (pip install asv; scripts/setup.sh installs it)"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_asv_publish_and_compare_read_the_export(tmp_path):
    why = _asv_missing()
    if why:
        pytest.skip(why)
    repo, commits, cells = _runs(tmp_path)
    assert _export(tmp_path, "--asv", "results", "--asv-machine", "lab").returncode == 0
    (tmp_path / "asv.conf.json").write_text(json.dumps({
        "version": 1, "project": "vmem", "project_url": "https://example.invalid/", "repo": str(repo),
        "branches": ["main"], "environment_type": "existing", "results_dir": "results", "html_dir": "html",
        "benchmark_dir": "benchmarks"}))
    pub = subprocess.run([sys.executable, "-m", "asv", "publish"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=240)
    assert pub.returncode == 0, pub.stdout + pub.stderr
    index = json.loads((tmp_path / "html" / "index.json").read_text())
    assert set(index["revision_to_hash"].values()) == set(commits) and index["params"]["machine"] == ["lab"]
    graph = next((tmp_path / "html" / "graphs").rglob("machine-lab/**/vmem_bench.downtime_ms.json"))
    ids = sorted(c.cell_id for c in cells)
    order = [[c.cell_id for c in cells].index(cid) for cid in ids]
    want = [[10.0 * (k + 1) + 1 + j if j != 2 else None for j in order] for k in range(2)]
    assert [point[1] for point in json.loads(graph.read_text())] == want
    cmp = subprocess.run([sys.executable, "-m", "asv", "compare", commits[0], commits[1], "--machine", "lab"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    worse = [line for line in cmp.stdout.splitlines() if "vmem_bench.downtime_ms" in line and line.startswith("| +")]
    assert len(worse) == 2, cmp.stdout  # both verified cells: downtime doubled
