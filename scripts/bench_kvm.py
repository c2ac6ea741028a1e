"""The same policy on a process guest and on a KVM guest, side by side (README "KVM guests").

Both guests run the same pattern at the same page rate, with the same RAM size, seed and
policy; each mode (pre-copy, post-copy, hybrid) runs ``--runs`` times per backend,
interleaved (process, kvm, process, kvm, ...), and the medians of verified runs are
printed as a Markdown table with the command line.  Nothing is asserted: this host's KVM
emulates the guest's instructions, so the KVM guest writes ~100 pages/s at most -- pick a
``--rate`` both can hold.

    .venv/bin/python scripts/bench_kvm.py --runs 3 --size 16M --workload hotcold --rate 100
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guests.launch import GuestSpec  # noqa: E402
from vmem.migration.backend import boot_guest  # noqa: E402
from vmem.migration.local import run_local_migration  # noqa: E402
from vmem.migration.source import MigrationOptions  # noqa: E402
from vmem.ram import parse_size  # noqa: E402

MODES = {"precopy": "off", "postcopy": "pure", "hybrid": "after-precopy"}


def one_run(backend: str, mode: str, args) -> dict:
    params = {"rate": args.rate}
    if backend == "process":
        params["max_batch"] = 8  # the KVM program writes 8 pages a step
    spec = GuestSpec(args.workload, params, args.seed)
    with boot_guest(spec, parse_size(args.size), backend) as guest:
        time.sleep(args.warmup)
        report = run_local_migration(guest, MigrationOptions(postcopy=MODES[mode], observe_s=args.observe,
                                                             bandwidth_Bps=args.bandwidth))
    d = report.to_dict()
    steps_after = d["guest"]["destination"].get("steps_since_resume")
    return {"verified": bool(d["verified"]) and d["verification"]["guest_check"]["ok"],
            "downtime_ms": d["downtime_ms"], "blackout_ms": d["blackout_ms"],
            "migration_s": d["migration_time_s"], "rounds": len(d["rounds"]), "pages_sent": d["pages_sent"],
            "tracker": d["tracker"], "steps_after": steps_after,
            "faults": (d.get("postcopy") or {}).get("faults")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--size", default="16M")
    p.add_argument("--workload", default="hotcold", choices=["uniform", "hotcold", "sweep"])
    p.add_argument("--rate", type=float, default=100.0, help="pages/s, both guests")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--observe", type=float, default=0.5)
    p.add_argument("--bandwidth", type=float, default=None, help="link cap in bytes/s (default none)")
    p.add_argument("--modes", default="precopy,postcopy,hybrid")
    args = p.parse_args()
    rows = []
    for mode in args.modes.split(","):
        runs = {"process": [], "kvm": []}
        for _ in range(args.runs):
            for backend in ("process", "kvm"):
                runs[backend].append(one_run(backend, mode, args))
        for backend, results in runs.items():
            ok = [r for r in results if r["verified"]]

            def med(key, fmt="{:.1f}"):
                vals = [r[key] for r in ok if r[key] is not None]
                return fmt.format(statistics.median(vals)) if vals else "-"

            rows.append(f"| {mode} | {backend} | {ok[0]['tracker'] if ok else '-'} | {len(ok)}/{len(results)} | "
                        f"{med('downtime_ms')} | {med('blackout_ms')} | {med('migration_s', '{:.2f}')} | "
                        f"{med('rounds', '{:.0f}')} | {med('pages_sent', '{:,.0f}')} | {med('faults', '{:.0f}')} |")
    print(f"`{' '.join(['scripts/bench_kvm.py'] + sys.argv[1:])}` (medians of verified runs; policy xen)\n")
    print("| mode | guest | tracker | verified | downtime ms | blackout ms | migration s | rounds | pages sent | post-copy faults |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
