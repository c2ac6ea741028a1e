#!/usr/bin/env python3
"""How often does ``vmem bench --baseline`` flag a rerun of the same commit?

Takes a results file of one commit with many repeats per cell (e.g. ``vmem bench --suite
standard --repeats 12 --out same.jsonl``) and judges, many times over, two disjoint random
groups of N verified runs per cell against each other with the verdict rule
(vmem.bench.verdict.false_positive_rate).  Prints the fraction of such comparisons that
would exit 1, the fraction of cells flagged (regressed or improved) and which metrics were.

    .venv/bin/python scripts/bench_false_positives.py same.jsonl [--group 3] [--trials 1000] [--session ID]

The comparisons share runs, so they are not independent: read the rate as an estimate
for this machine and load, not a bound.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vmem.bench.runner import read_records  # noqa: E402
from vmem.bench.verdict import false_positive_rate  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results")
    p.add_argument("--group", type=int, default=3, help="runs a side, as vmem bench --repeats (default 3)")
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--session", help="only this session's runs (default: all runs in the file)")
    args = p.parse_args()
    records = read_records(args.results, session=args.session)
    commits = {(r.get("report") or {}).get("provenance", {}).get("git_commit") for r in records}
    if len(commits) > 1:
        print(f"warning: runs of {len(commits)} commits in {args.results}: {sorted(map(str, commits))}", file=sys.stderr)
    out = false_positive_rate(records, group_size=args.group, trials=args.trials, seed=args.seed)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
