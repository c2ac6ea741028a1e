"""The processes vmem starts run vmem's own code, whatever directory the caller is in.

``python -m pkg`` puts the working directory ahead of PYTHONPATH, so a directory holding
another ``guests/`` or ``vmem/`` (a second checkout, an unpacked release) used to decide what
the guest, the destination and ``vmem bench --against``'s reference runs were.  The decoys
below exit at import with a status of their own: if one of them is picked, the run fails.
"""
from __future__ import annotations

import os
import time

from guests.launch import GuestSpec, ProcessGuest
from vmem.bench import runner
from vmem.bench.matrix import matrix_from_dict
from vmem.migration.local import run_local_migration
from vmem.migration.source import MigrationOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _decoys(path) -> None:
    """A ``guests`` and a ``vmem`` package that exit with 97 / 98 on import."""
    for pkg, status in (("guests", 97), ("vmem", 98)):
        d = path / pkg
        d.mkdir()
        (d / "__init__.py").write_text(f"raise SystemExit({status})  # a decoy: the test's spawn picked the wrong tree\n")


def test_guests_and_the_destination_ignore_a_checkout_in_the_working_directory(tmp_path, monkeypatch):
    _decoys(tmp_path)
    monkeypatch.chdir(tmp_path)
    with ProcessGuest.boot(GuestSpec("uniform", {"rate": 5000}, 3), 16 << 20) as guest:  # exec'd: a new interpreter
        time.sleep(0.1)
        report = run_local_migration(guest, MigrationOptions(observe_s=0.1))
    assert report.outcome == "completed", report.reason
    assert report.verified and report.verification["guest_check"]["ok"]


def test_bench_against_runs_the_named_tree_not_the_working_directory(tmp_path, monkeypatch):
    """``run_cell(tree=...)`` is the reference side of ``vmem bench --against DIR``."""
    _decoys(tmp_path)
    monkeypatch.chdir(tmp_path)
    cell = matrix_from_dict({"sizes": ["16M"], "modes": ["precopy"], "workloads": [{"name": "idle"}]}).cells[0]
    report, _calibration = runner.run_cell(cell, warmup_s=0.1, observe_s=0.1, tree=ROOT)
    assert report.get("outcome") == "completed", report
    assert report.get("verified"), report


def test_a_bench_run_that_imported_another_vmem_is_refused(monkeypatch):
    """The check behind the fix: the run's process says where it imported vmem from, and a
    run of other code than the tree asked for is a failed run, not a reference figure."""
    import json
    import subprocess

    cell = matrix_from_dict({"sizes": ["16M"], "modes": ["precopy"], "workloads": [{"name": "idle"}]}).cells[0]
    fake = {"report": {"outcome": "completed", "verified": True, "downtime_ms": 1.0}, "calibration_ms": 30.0}

    def run(argv, **kw):
        return subprocess.CompletedProcess(argv, 0, stdout=json.dumps(fake | {"vmem_root": elsewhere}), stderr="")

    monkeypatch.setattr(subprocess, "run", run)
    elsewhere = "/nonexistent/other-checkout"
    report, calibration = runner.run_cell(cell, tree=ROOT)
    assert report["outcome"] == "failed" and calibration is None
    assert "imported vmem from /nonexistent/other-checkout" in report["reason"], report
    elsewhere = ROOT
    report, calibration = runner.run_cell(cell, tree=ROOT)
    assert report["outcome"] == "completed" and calibration == 30.0


def test_a_reference_checkout_too_old_to_say_where_it_ran_is_checked_by_its_commit(monkeypatch):
    """``--against`` an older commit: its cell.py reports no ``vmem_root``, so the report's
    commit is compared with the tree's instead (when both are known)."""
    import json
    import subprocess
    from pathlib import Path

    import pytest

    from vmem.provenance import git_commit

    expected = git_commit(Path(ROOT) / "vmem")
    if expected is None:
        pytest.skip("this tree is not a git checkout: no commit to compare")
    cell = matrix_from_dict({"sizes": ["16M"], "modes": ["precopy"], "workloads": [{"name": "idle"}]}).cells[0]
    commit = "0" * 40
    real_run = subprocess.run

    def run(argv, **kw):
        if argv[0] == "git":  # the check's own look at the tree's commit
            return real_run(argv, **kw)
        report = {"outcome": "completed", "verified": True, "provenance": {"git_commit": commit}}
        return subprocess.CompletedProcess(argv, 0, stdout=json.dumps({"report": report, "calibration_ms": 30.0}),
                                           stderr="")

    monkeypatch.setattr(subprocess, "run", run)
    report, _ = runner.run_cell(cell, tree=ROOT)
    assert report["outcome"] == "failed" and f"ran commit {'0' * 40}" in report["reason"], report
    commit = expected
    report, _ = runner.run_cell(cell, tree=ROOT)
    assert report["outcome"] == "completed", report
