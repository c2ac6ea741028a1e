"""The command line's conventions (issue 15 item 5): argument errors are one line and exit
status 2 in every form, bandwidths carry a unit, virsh's spellings are accepted or
explained, one spelling for the downtime limit, every subcommand describes itself."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from vmem.cli.args import link_options_from_args, one_host_link_warnings
from vmem.cli.main import _LAZY_COMMANDS, build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv,needle", [
    (["migrate", "--seed", "-1", "--size", "8M"], "--seed"),
    (["migrate", "--seed", "x"], "--seed"),
    (["migrate", "--bandwidth", "100", "--size", "8M"], "no unit"),
    (["migrate", "--bandwidth", "2.5"], "no unit"),
    (["migrate", "--compress", "bogus"], "--compress"),
    (["migrate", "--precopy-iterations", "x"], "--precopy-iterations"),
    # the agent form: refused before the agent is asked (there is none at that socket)
    (["migrate", "g1", "badhost:xx", "--agent", "/nonexistent/agent.sock"], "HOST:PORT"),
    (["migrate", "g1", "127.0.0.1:1", "--bandwidth", "100", "--agent", "/nonexistent/agent.sock"], "no unit"),
    (["migrate", "g1", "127.0.0.1:1", "--seed", "-1", "--agent", "/nonexistent/agent.sock"], "--seed"),
    (["profile", "--max-downtime-ms", "x"], "--max-downtime-ms"),
    (["profile", "--from-trace", "/nonexistent.npz", "--bandwidth", "100"], "no unit"),
    (["nosuchcommand"], "invalid choice"),
])
def test_argument_errors_are_one_line_and_exit_2(argv, needle, capsys):
    from vmem.cli.main import main

    try:
        rc = main(argv)
    except SystemExit as stop:
        rc = stop.code
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_the_real_command_exits_2_on_a_bad_seed():
    """Through ``python -m vmem``: before the fix, a guest booted and died with a traceback."""
    proc = subprocess.run([sys.executable, "-m", "vmem", "migrate", "--seed", "-1", "--size", "8M"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--seed" in proc.stderr and "Traceback" not in proc.stderr


def test_live_is_accepted_and_postcopy_help_says_how_it_differs_from_virsh():
    args = build_parser("migrate").parse_args(["migrate", "--live"])
    assert args.live is True
    text = build_parser("migrate")._subparsers._group_actions[0].choices["migrate"].format_help()
    flat = " ".join(text.split())
    assert "Unlike virsh migrate --postcopy" in flat
    assert "checker" in flat, "the checker workload is listed"
    assert "a bare number is refused" in flat


def test_the_pause_rehearsal_is_on_unless_asked_off():
    from vmem.migration.flags import migration_argument_dests, options_from_args

    assert options_from_args(build_parser("migrate").parse_args(["migrate"])).prepare_pause is True
    assert options_from_args(build_parser("migrate").parse_args(["migrate", "--no-prepare-pause"])).prepare_pause is False
    assert "no_prepare_pause" in migration_argument_dests()  # an agent carries it over too


def test_collect_stop_is_off_unless_asked_and_refused_with_the_wrong_tracker():
    from vmem.errors import ConfigError
    from vmem.migration.flags import migration_argument_dests, options_from_args

    parse = build_parser("migrate").parse_args
    assert options_from_args(parse(["migrate"])).collect_stop is False
    assert options_from_args(parse(["migrate", "--collect-stop"])).collect_stop is True
    assert "collect_stop" in migration_argument_dests()  # an agent carries it over too
    with pytest.raises(ConfigError, match="--collect-stop"):
        options_from_args(parse(["migrate", "--collect-stop", "--tracker", "mprotect"]))


def test_one_spelling_for_the_downtime_limit_everywhere():
    for argv in (["migrate", "--policy", "downtime-limit", "--max-downtime-ms", "50"],
                 ["migrate", "--policy", "downtime-limit", "--max-downtime", "50"]):
        assert float(build_parser("migrate").parse_args(argv).max_downtime_ms) == 50
    for flag in ("--max-downtime-ms", "--max-downtime"):
        assert build_parser("profile").parse_args(["profile", flag, "70"]).max_downtime == 70
    for flag in ("--downtime-goal-ms", "--downtime-goal"):
        assert build_parser("profile").parse_args(["profile", flag, "20"]).downtime_goal == 20
    for flag in ("--max-downtime-ms", "--max-downtime"):
        assert build_parser("compare").parse_args(["compare", "--out", "x", flag, "40"]).max_downtime_ms == 40


def test_compress_names_say_what_they_do_and_the_old_ones_still_work():
    ns = lambda c, p=1: argparse.Namespace(parallel=p, compress=c)  # noqa: E731
    assert link_options_from_args(ns("zero-bitmap")) == (1, "none")
    assert link_options_from_args(ns("raw")) == (1, "off")
    assert link_options_from_args(ns("none")) == (1, "none") and link_options_from_args(ns("off")) == (1, "off")
    from vmem.errors import ConfigError

    with pytest.raises(ConfigError, match="--compress"):
        link_options_from_args(ns("gzip"))


def test_between_host_flags_on_one_host_are_noted():
    assert one_host_link_warnings(argparse.Namespace(parallel=1, compress="zero-bitmap")) == []
    notes = one_host_link_warnings(argparse.Namespace(parallel=4, compress="zstd"))
    assert len(notes) == 2 and "--parallel" in notes[0] and "--compress" in notes[1]
    assert all("between hosts" in n for n in notes)


def test_every_subcommand_has_a_description():
    names = list(build_parser().parse_args.__self__._subparsers._group_actions[0].choices)
    assert "doctor" in names and "migrate" in names and set(_LAZY_COMMANDS) <= set(names)
    for name in names:
        sub = build_parser(name)._subparsers._group_actions[0].choices[name]
        assert sub.description and len(sub.description) > 10, name


def test_live_view_says_what_query_migrate_says():
    from vmem.cli.display import format_status, query_status
    from vmem.migration.report import RoundStats

    st = query_status([], None, 0.5)
    assert st["expected_downtime_ms"] is None and st["round_eta_s"] is None and st["remaining_bytes"] == 0
    rounds = [RoundStats(index=0, pages_sent=100, dirty_pages=40, dirty_rate_pps=400.0, est_downtime_ms=12.5,
                         throttle=0.2)]
    current = {"index": 1, "kind": "precopy", "pages": 40, "sent": 10, "bytes": 10 * 4096, "t0": 100.0}
    st = query_status(rounds, current, 2.0, now=101.0)
    assert st["expected_downtime_ms"] == 12.5 and st["dirty_rate_pps"] == 400.0 and st["throttle"] == 0.2
    assert st["remaining_bytes"] == 30 * 4096 and st["round_eta_s"] == 3.0  # 30 pages at 10 pages/s
    line = format_status(st)
    assert "expected downtime 12.5 ms" in line and "round ETA 3.00 s" in line and "throttle 20 %" in line
