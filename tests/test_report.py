"""docs/report.md is exact: every key it documents appears in real reports, and every key
real reports carry is documented (top level, ``rounds[i]`` and each nested object the
document gives a table of).

The reports are real one-host migrations -- pre-copy, pure post-copy, hybrid -- and one
migration between two agents on loopback.  The parser reads each ``## `path` `` section's
table; a key cell may name several keys, and one whose cell says ``(only ...)`` exists only
in a situation these migrations do not reach (a failure, a recovered post-copy).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_agent import agents, workdir  # noqa: F401  (fixtures)
from vmem.migration.local import run_local_migration
from vmem.migration.policy import make_policy
from vmem.migration.report import REPORT_SCHEMA_VERSION
from vmem.migration.source import MigrationOptions

DOC = Path(__file__).resolve().parent.parent / "docs" / "report.md"
TOP = "(top level)"


def parse_doc(text: str) -> dict[str, dict[str, dict]]:
    """``{path: {key: {"required", "free_form"}}}`` for every table of the document.

    A table belongs to the last ``## `` heading above it; the heading's backticked words are
    the object paths it describes (``rounds[i]`` for each round), "Top level" is the report
    itself.  Key cells are the first column; every backticked word in one is a key; one
    that says ``(only`` is not required.  A row whose text says "free-form" documents an
    object whose keys are not the report's to define.
    """
    tables: dict[str, dict[str, dict]] = {}
    paths: list[str] = []
    for line in text.splitlines():
        if line.startswith("## "):
            paths = re.findall(r"`([^`]+)`", line) or ([TOP] if "top level" in line.lower() else [])
            continue
        if not line.startswith("|") or not paths:
            continue
        cell = line.split("|")[1].strip()
        if cell in ("key", "") or set(cell) <= set("- "):
            continue
        keys = re.findall(r"`([^`]+)`", cell)
        assert keys, f"docs/report.md: a table row without a `key`: {line}"
        for path in paths:
            table = tables.setdefault(path, {})
            for key in keys:
                assert key not in table, f"docs/report.md documents {path}.{key} twice"
                table[key] = {"required": "(only" not in cell, "free_form": "free-form" in line}
    return tables


def objects_at(report: dict, path: str) -> list:
    """The values at ``path`` (``a.b``; ``rounds[i]`` means every round) that are dicts."""
    found = [report]
    if path != TOP:
        for part in path.split("."):
            nxt = []
            for obj in found:
                if part.endswith("[i]"):
                    nxt += obj.get(part[:-3]) or []
                elif isinstance(obj, dict) and isinstance(obj.get(part), dict):
                    nxt.append(obj[part])
            found = nxt
    return [o for o in found if isinstance(o, dict)]


def compare(tables: dict[str, dict[str, dict]], reports: list[dict]) -> list[str]:
    """What does not match, as sentences (empty when the document is exact)."""
    problems = []
    for path, documented in sorted(tables.items()):
        objs = [o for r in reports for o in objects_at(r, path)]
        if not objs:
            problems.append(f"{path}: documented, but no report has this object")
            continue
        emitted = set().union(*objs)
        for key in sorted(emitted - set(documented)):
            problems.append(f"{path}.{key}: in a report, not documented")
        for key in sorted(k for k, doc in documented.items() if doc["required"] and k not in emitted):
            problems.append(f"{path}.{key}: documented, in no report")
        # A nested object must have its own table, or say that its keys are free-form.
        for key in sorted(emitted & set(documented)):
            if any(isinstance(o.get(key), dict) for o in objs):
                sub = key if path == TOP else f"{path}.{key}"
                if sub not in tables and not documented[key]["free_form"]:
                    problems.append(f"{sub}: an object without a table in docs/report.md")
    return problems


def _migrate(boot_guest, **opts) -> dict:
    guest = boot_guest("hotcold", 16 << 20)
    report = run_local_migration(guest, MigrationOptions(observe_s=0.1, **opts))
    assert report.outcome == "completed", report.reason
    return report.to_dict()


def _local_reports(boot_guest) -> list[dict]:
    return [
        _migrate(boot_guest),
        _migrate(boot_guest, postcopy="pure"),
        _migrate(boot_guest, postcopy="after-precopy", policy=make_policy("threshold", precopy_iterations=1)),
    ]


def test_parser_reads_tables_and_finds_what_differs():
    doc = ("## Top level\n| key | type | meaning |\n| --- | --- | --- |\n| `a` | int | x |\n"
           "| `b`, `c` | int | y |\n| `gone` (only on failure) | int | x |\n| `o` | object | z |\n"
           "## `o`\n| key | meaning |\n| --- | --- |\n| `x` | z |\n")
    tables = parse_doc(doc)
    required = {path: {k: v["required"] for k, v in t.items()} for path, t in tables.items()}
    assert required == {TOP: {"a": True, "b": True, "c": True, "gone": False, "o": True}, "o": {"x": True}}
    report = {"a": 1, "b": 2, "c": 3, "o": {"x": 1}}
    assert compare(tables, [report]) == []
    assert compare(tables, [report | {"new": 1}]) == ["(top level).new: in a report, not documented"]
    assert compare(tables, [{"a": 1, "c": 3, "o": {"x": 1}}]) == ["(top level).b: documented, in no report"]
    assert compare(tables, [report | {"o": {"x": 1, "y": {}}}]) == ["o.y: in a report, not documented"]
    assert compare(tables, [report | {"c": {"k": 1}}]) == ["c: an object without a table in docs/report.md"]
    assert compare(parse_doc(doc.replace("| y |", "| free-form |")), [report | {"c": {"k": 1}}]) == []
    with pytest.raises(AssertionError, match="twice"):
        parse_doc("## Top level\n| key | m |\n| `a` | x |\n| `a` | y |\n")


def test_every_documented_key_is_emitted_and_every_emitted_key_documented(boot_guest, agents):  # noqa: F811
    reports = _local_reports(boot_guest)
    a, b = agents("a"), agents("b")
    a.request("create", name="g", workload="hotcold", size="16M")
    agent_report = a.request("migrate", name="g", target=b.address, options={"observe": 0.1})["report"]
    assert agent_report["outcome"] == "completed", agent_report["reason"]
    reports.append(agent_report)
    # The agents' link elides zero pages; the report counts them with the holes.
    assert agent_report["zero_pages"] >= agent_report["guest"]["link"]["zero_pages_elided"]
    assert not agent_report["clock"]["same_host"] and agent_report["clock"]["samples"] > 0
    for r in reports:
        assert r["schema_version"] == REPORT_SCHEMA_VERSION
    tables = parse_doc(DOC.read_text())
    assert {TOP, "rounds[i]", "timings_ms", "verification", "guest", "clock", "provenance", "postcopy"} <= set(tables)
    problems = compare(tables, reports)
    assert not problems, "docs/report.md and real reports differ:\n  " + "\n  ".join(problems)


def test_report_times_add_up(boot_guest):
    r = _migrate(boot_guest)
    # Handshake -> source released, then the observe window: together the whole run.
    assert 0 < r["setup_time_ms"] / 1e3 < r["migration_time_s"] < r["total_time_s"]
    assert 0 < r["verify_s"] < r["migration_time_s"]
    assert r["observe_s"] >= 0.1
    assert r["migration_time_s"] + r["observe_s"] == pytest.approx(r["total_time_s"], abs=1e-5)
    assert r["clock"]["same_host"] and r["clock"]["offset_ns"] == 0 and r["downtime_uncertainty_ms"] == 0
    p = r["provenance"]
    assert p["cpu_count"] > 0 and p["memory_bytes"] > 0 and p["date_utc"].endswith("+00:00")
    assert p["git_commit"], "the tests run from a checkout: its commit belongs in the report"
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert p["boot_id"] == f.read().strip()
    assert p["booted_utc"].endswith("+00:00") and p["booted_utc"] < p["date_utc"]


def test_the_boot_fields_read_the_kernel_and_are_none_when_it_cannot_say(tmp_path):
    from datetime import datetime

    from vmem.provenance import boot_id, booted_utc, collect, summary_line

    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nbtime 1765016089\nprocesses 5\n")
    assert booted_utc(str(stat)) == "2025-12-06T10:14:49+00:00"
    stat.write_text("cpu  1 2 3\n")  # no btime line
    assert booted_utc(str(stat)) is None
    assert boot_id(str(tmp_path / "missing")) is None and booted_utc(str(tmp_path / "missing")) is None
    booted = datetime.fromisoformat(booted_utc())
    assert booted.tzinfo is not None and booted < datetime.now(booted.tzinfo)
    # the benchmarks' log line names the boot; what cannot be read shows as "?", not as a guess
    line = summary_line(collect())
    assert f"booted {booted_utc()} (boot id {boot_id()[:8]})" in line
    assert "booted ? (boot id ?)" in summary_line({"hostname": "h"})


def test_zero_pages_counts_the_holes_round_zero_skipped(boot_guest):
    guest = boot_guest("idle", 16 << 20, fill=False)  # only the ledger and a few pages hold data
    runs = guest.ram.data_runs()
    holes = guest.npages - int((runs[:, 1] - runs[:, 0]).sum())
    report = run_local_migration(guest, MigrationOptions(observe_s=0))
    assert report.outcome == "completed", report.reason
    assert holes > 0 and report.zero_pages == holes
    assert report.rounds[0].pages_sent == guest.npages - holes


def test_blocktime_is_the_sum_of_the_demand_fault_latencies(boot_guest):
    r = _migrate(boot_guest, postcopy="pure")
    pc = r["postcopy"]
    lat = pc["fault_latency_us"]
    assert lat["count"] > 0, "a hotcold guest faults on its hot pages after a pure post-copy switch"
    # Between count x median-ish bounds: at least the slowest fault, at most count x the slowest.
    assert lat["max"] / 1e3 <= pc["blocktime_ms"] <= lat["count"] * lat["max"] / 1e3 + 1e-3


def test_first_step_counts_the_faults_inside_the_downtime(boot_guest):
    """postcopy.first_step: the demand faults read before the destination guest's first step
    ended -- a hotcold guest's first step after a pure switch writes pages that are all
    missing -- and the time blocked on them, which lies inside the downtime."""
    r = _migrate(boot_guest, postcopy="pure")
    pc, first = r["postcopy"], r["postcopy"]["first_step"]
    assert 1 <= first["faults"] <= pc["fault_latency_us"]["count"]
    assert 0 < first["blocked_ms"] <= pc["blocktime_ms"]
    assert first["blocked_ms"] <= r["downtime_ms"]
    # the step itself, from the guest's restart, is the rest of the downtime after pause ->
    # running (the faults the guest took restoring its context, which blocked_ms also
    # counts, lie before the restart: no order between the two)
    assert 0 < first["duration_ms"] <= r["downtime_ms"]
    assert first["duration_ms"] == pytest.approx(r["downtime_ms"] - r["timings_ms"]["pause_to_running"], abs=0.002)


def test_faults_until_cuts_the_fault_log_at_the_time_given():
    import numpy as np

    from vmem.migration.postcopy.destination import PostcopyDestination

    pc = object.__new__(PostcopyDestination)  # only the fault log is needed: [latency, page, read at]
    pc._latencies = [np.array([[1_000_000, 7, 100], [2_000_000, 9, 200]], dtype=np.int64),
                     np.array([[500_000, 3, 300]], dtype=np.int64)]
    assert pc.faults_until(99) == {"faults": 0, "blocked_ms": 0.0}
    assert pc.faults_until(200) == {"faults": 2, "blocked_ms": 3.0}
    assert pc.faults_until(10**12) == {"faults": 3, "blocked_ms": 3.5}
    pc._latencies = []
    assert pc.faults_until(10**12) == {"faults": 0, "blocked_ms": 0.0}


def test_json_default_writes_numpy_scalars_as_numbers():
    """One hook for every JSON vmem writes (vmem.jsonout): numpy scalars become the number
    they hold (json refuses them), anything else unknown its str()."""
    import json

    import numpy as np

    from vmem.jsonout import json_default

    class Thing:
        def __str__(self):
            return "thing"

    out = json.loads(json.dumps({"n": np.int64(3), "x": np.float32(0.5), "b": np.bool_(True), "t": Thing()},
                                default=json_default))
    assert out == {"n": 3, "x": 0.5, "b": True, "t": "thing"}
    assert type(out["n"]) is int
