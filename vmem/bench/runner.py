"""Running a matrix: every cell N times, interleaved, one JSON line per run.

Order: repeat 0 runs every cell in matrix order, repeat 1 in reverse, repeat 2 forward
again...: a slow drift of the machine (another tenant, thermal, page cache) then hits
every cell alike and no cell always runs first or last.

Results file (JSON lines, appended; one object per run, see :func:`run_record`)::

    {"kind": "vmem-bench-run", "schema_version": 1, "session": "<hex>", "suite": "standard",
     "cell": "<cell id>", "spec": {...}, "repeat": 0, "order": 0, "valid": true,
     "metrics": {...}, "calibration_ms": 31.2, "outcome": "completed", "reason": "...",
     "report": {<the full report>}}

The full report (docs/report.md) carries its provenance (commit, kernel, host, command
line); ``session`` ties the runs of one ``vmem bench`` together.  A baseline
(:func:`write_baseline`) is the same records without the full reports.
"""
from __future__ import annotations

import json
import os
import time
import uuid

from vmem.bench.matrix import MODES, Cell, Matrix, build_policy
from vmem.bench.metrics import report_metrics, run_is_valid
from vmem.jsonout import json_default

__all__ = ["run_cell", "migrate_cell", "cell_from_dict", "check_tree", "run_matrix", "run_record", "append_record", "read_records", "write_baseline",
           "read_baseline", "write_json_file", "BENCH_RUN_KIND", "BASELINE_KIND"]

BENCH_RUN_KIND = "vmem-bench-run"
BASELINE_KIND = "vmem-bench-baseline"
SCHEMA_VERSION = 1


def migrate_cell(cell: Cell, *, seed: int = 1, warmup_s: float = 0.3, observe_s: float = 0.2, progress=None) -> dict:
    """In this process: boot a fresh guest for ``cell``, warm it up, migrate it on this
    host; the report dict.  Every process started is reaped on every path
    (``boot_guest`` and ``run_local_migration`` own theirs)."""
    from vmem.migration.backend import GuestSpec, boot_guest
    from vmem.migration.local import run_local_migration
    from vmem.migration.source import MigrationOptions

    policy = build_policy(cell)
    postcopy = MODES[cell.mode]
    opts = dict(cell.policy_options)
    if postcopy == "off" and (opts.get("allow_postcopy") is True or opts.get("timeout_action") == "postcopy"):
        postcopy = "allow"
    options = MigrationOptions(tracker=cell.tracker, policy=policy, observe_s=observe_s,
                               bandwidth_Bps=cell.bandwidth_Bps, postcopy=postcopy)
    with boot_guest(GuestSpec(cell.workload, dict(cell.params), seed), cell.size_bytes) as guest:
        if warmup_s > 0:
            time.sleep(warmup_s)
        report = run_local_migration(guest, options, progress)
    return report.to_dict()


#: Seconds a run may take before its process is killed (a hung migration fails the run).
RUN_TIMEOUT_S = 600.0


def check_tree(tree: str) -> str:
    """The absolute path of a vmem checkout that ``run_cell`` can run from.

    Raises:
        ConfigError("--against"): not a directory holding ``vmem/bench/cell.py`` (a commit
            with ``vmem bench``) and a built native extension.
    """
    import glob

    from vmem.errors import ConfigError

    root = os.path.abspath(tree)
    if not os.path.isfile(os.path.join(root, "vmem", "bench", "cell.py")):
        raise ConfigError("--against", f"{tree} is not a vmem checkout with vmem bench (no vmem/bench/cell.py)")
    if not glob.glob(os.path.join(root, "vmem", "_vmem_native*.so")):
        raise ConfigError("--against", f"{tree} has no native extension: run python vmem/_build/build_native.py there")
    return root


def run_cell(cell: Cell, *, seed: int = 1, warmup_s: float = 0.3, observe_s: float = 0.2,
             tree: str | None = None) -> tuple[dict, float | None]:
    """One run of ``cell`` in a fresh process (``python -m vmem.bench.cell``): its report
    and the machine's calibration time just before it (vmem.bench.calibrate; None if the
    process died first).

    ``tree``: run the vmem of that checkout (check_tree) instead of this one -- the
    reference side of an A/B comparison (``vmem bench --against DIR``).

    A fresh process per run, as ``vmem migrate`` is: the source migrator's memory and CPU
    figures are then its own, not those of a long-lived bench process that has already
    made many migrations, and one run cannot leave state behind for the next.  A run whose
    process dies or hangs (killed after RUN_TIMEOUT_S) yields a report with outcome
    ``failed`` and the reason, never an exception.
    """
    import subprocess
    import sys

    root = tree or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds vmem/
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    job = {"cell": cell.to_dict(), "seed": seed, "warmup_s": warmup_s, "observe_s": observe_s}
    try:
        # -P: the tree on PYTHONPATH decides which vmem runs.  Without it `python -m` put the
        # working directory first, and `vmem bench --against DIR` run from a checkout ran that
        # checkout on both sides of its A/B.
        done = subprocess.run([sys.executable, "-P", "-m", "vmem.bench.cell"], input=json.dumps(job), env=env,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"outcome": "failed", "verified": False,
                "reason": f"the run took more than {RUN_TIMEOUT_S:g} s"}, None
    try:
        out = json.loads(done.stdout)
    except json.JSONDecodeError:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"outcome": "failed", "verified": False,
                "reason": f"the run's process exited with status {done.returncode}: {tail}"}, None
    report = out["report"]
    # The A/B's whole point: a reference run of other code would be judged as the reference.
    ran = out.get("vmem_root")
    if ran is not None:
        wrong, what = os.path.realpath(ran) != os.path.realpath(root), f"imported vmem from {ran}"
    else:
        # A reference checkout older than this check does not say where it ran from (its
        # cell.py predates vmem_root); its report's commit does, when both sides know one.
        from pathlib import Path

        from vmem.provenance import git_commit

        expected = git_commit(Path(root) / "vmem")
        got = (report.get("provenance") or {}).get("git_commit")
        wrong, what = expected is not None and got is not None and got != expected, f"ran commit {got}"
    if wrong:
        return {"outcome": "failed", "verified": False,
                "reason": f"the run {what}, not the vmem of {root} (its PYTHONPATH lost to another vmem on the "
                          "path); nothing of it is used"}, None
    if isinstance(report.get("provenance"), dict):  # what was asked for: this bench, not the child
        from vmem.provenance import command_line

        report["provenance"]["command_line"] = command_line()
    return report, out.get("calibration_ms")


def cell_from_dict(d: dict) -> Cell:
    """The inverse of :meth:`Cell.to_dict`."""
    return Cell(d["workload"], tuple(sorted(d["params"].items())), int(d["size_bytes"]), d["policy"],
                tuple(sorted(d["policy_options"].items())), d["tracker"], d["mode"], d["bandwidth_Bps"])


def run_record(cell: Cell, report: dict, *, repeat: int, order: int, session: str, suite: str,
               calibration_ms: float | None = None) -> dict:
    """The JSON line of one run (the full report plus what the verdict reads)."""
    return {"kind": BENCH_RUN_KIND, "schema_version": SCHEMA_VERSION, "session": session, "suite": suite,
            "cell": cell.cell_id, "spec": cell.to_dict(), "repeat": repeat, "order": order,
            "valid": run_is_valid(report), "metrics": report_metrics(report), "calibration_ms": calibration_ms,
            "outcome": report.get("outcome"), "reason": report.get("reason"), "report": report}


def append_record(path: str, record: dict) -> None:
    """Append one record as one line with one ``write`` on an ``O_APPEND`` descriptor, so
    that writers in several processes (pytest-xdist workers) never interleave lines."""
    line = (json.dumps(record, default=json_default, separators=(",", ":")) + "\n").encode()
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def run_matrix(matrix: Matrix, out_path: str | None, *, session: str | None = None, against: str | None = None,
               on_start=None, on_run=None) -> list[dict]:
    """Run every cell ``matrix.repeats`` times, interleaved; append each record to
    ``out_path`` as it finishes (so an interrupted run keeps what it measured).

    Args:
        against: a vmem checkout (check_tree): A/B mode.  Every run of a cell is paired
            with a run of the same cell from that checkout, in alternating order (A B, then
            B A, ...), so both sides share the machine's load; records carry ``side``
            (``"baseline"`` for that checkout's runs, ``"candidate"`` for this one's).
        on_start: ``f(index, total, cell, repeat)`` before each run.
        on_run: ``f(record)`` after each run.
    Returns:
        the records, in run order.
    """
    session = session or uuid.uuid4().hex[:12]
    sides = [None] if against is None else [against, None]
    total = len(matrix.cells) * matrix.repeats * len(sides)
    records = []
    k = 0
    for repeat in range(matrix.repeats):
        cells = matrix.cells if repeat % 2 == 0 else matrix.cells[::-1]
        for i, cell in enumerate(cells):
            for tree in (sides if (repeat + i) % 2 == 0 else sides[::-1]):
                if on_start is not None:
                    on_start(k, total, cell, repeat)
                report, calibration = run_cell(cell, seed=matrix.seed, warmup_s=matrix.warmup_s,
                                               observe_s=matrix.observe_s, tree=tree)
                rec = run_record(cell, report, repeat=repeat, order=k, session=session, suite=matrix.name,
                                 calibration_ms=calibration)
                if against is not None:
                    rec["side"] = "candidate" if tree is None else "baseline"
                if out_path:
                    append_record(out_path, rec)
                records.append(rec)
                if on_run is not None:
                    on_run(rec)
                k += 1
    return records


def read_records(path: str, *, session: str | None = None) -> list[dict]:
    """The run records of a results file (all sessions, or one).

    Raises:
        ConfigError: unreadable file, a line that is not JSON or not a run record (names
            the line).
    """
    from vmem.errors import ConfigError

    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(path, f"line {lineno} is not JSON: {err.msg}") from None
                if not isinstance(rec, dict) or rec.get("kind") != BENCH_RUN_KIND:
                    raise ConfigError(path, f"line {lineno} is not a vmem bench run record")
                if session is None or rec.get("session") == session:
                    out.append(rec)
    except OSError as err:
        raise ConfigError(path, f"cannot read: {err.strerror}") from None
    return out


def write_baseline(path: str, records: list[dict], *, suite: str) -> None:
    """Write a baseline: every run's cell, validity, outcome, metrics and provenance (no
    full reports: a baseline stays small enough to commit)."""
    runs = [{k: r.get(k) for k in ("cell", "spec", "repeat", "valid", "outcome", "reason", "metrics",
                                   "calibration_ms")}
            | {"provenance": (r.get("report") or {}).get("provenance") or r.get("provenance")}
            for r in records]
    doc = {"kind": BASELINE_KIND, "schema_version": SCHEMA_VERSION, "suite": suite,
           "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs}
    write_json_file(path, doc)


def write_json_file(path: str, doc: dict, **dump_options) -> None:
    """Write ``doc`` as indented JSON to ``path`` through a temporary file and a rename: a
    reader sees the old file or the new one, never half of one."""
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, default=json_default, **dump_options)
        f.write("\n")
    os.replace(tmp, path)


def read_baseline(path: str) -> dict:
    """Read a baseline file.

    Raises:
        ConfigError: unreadable, not JSON, or not a vmem bench baseline.
    """
    from vmem.errors import ConfigError

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as err:
        raise ConfigError("--baseline", f"cannot read {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ConfigError("--baseline", f"{path} is not JSON: {err.msg} at line {err.lineno}") from None
    if not isinstance(doc, dict) or doc.get("kind") != BASELINE_KIND or not isinstance(doc.get("runs"), list):
        raise ConfigError("--baseline", f"{path} is not a vmem bench baseline (written by --save-baseline)")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError("--baseline", f"{path} has schema version {doc.get('schema_version')}, "
                                        f"this vmem reads {SCHEMA_VERSION}")
    return doc
