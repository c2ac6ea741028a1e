#!/usr/bin/env python3
"""How often does ``vmem bench --baseline`` flag a rerun of the same commit?

Two estimates from a results file of one commit:

* ``--by sessions`` (default): the file holds several ``vmem bench`` invocations (e.g.
  ``for i in 1 2 3 4 5 6; do vmem bench --suite standard --out same.jsonl --quiet; done``);
  every ordered pair of sessions is judged as baseline and rerun -- what CI does
  (vmem.bench.verdict.session_false_positive_rate).
* ``--by random``: one session with many repeats (``vmem bench --suite standard --repeats 12
  --out same.jsonl``); two disjoint random groups of ``--group`` verified runs per cell are
  judged against each other ``--trials`` times (vmem.bench.verdict.false_positive_rate).
  Optimistic: both groups saw the same load.

Prints the fraction of comparisons that would exit 1 and the metrics flagged.  The
comparisons share runs, so they are not independent: an estimate for this machine and
its load, not a bound.

    .venv/bin/python scripts/bench_false_positives.py same.jsonl [--by sessions|random] [--group 3] [--trials 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vmem.bench.runner import read_records  # noqa: E402
from vmem.bench.verdict import false_positive_rate, session_false_positive_rate  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results")
    p.add_argument("--by", choices=["sessions", "random"], default="sessions")
    p.add_argument("--group", type=int, default=3, help="runs a side, as vmem bench --repeats (default 3)")
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--session", help="only this session's runs (default: all runs in the file)")
    args = p.parse_args()
    records = read_records(args.results, session=args.session)
    commits = {(r.get("report") or {}).get("provenance", {}).get("git_commit") for r in records}
    if len(commits) > 1:
        print(f"warning: runs of {len(commits)} commits in {args.results}: {sorted(map(str, commits))}", file=sys.stderr)
    if args.by == "sessions":
        out = session_false_positive_rate(records)
    else:
        out = false_positive_rate(records, group_size=args.group, trials=args.trials, seed=args.seed)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
