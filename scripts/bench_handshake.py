"""Where the handshake's time goes, and what starting the destination early saves.

Two ways of starting a one-host migration, interleaved run by run on the same guest size,
workload and link (the baseline is measured in the same run as the change):

* ``before`` -- the destination process is spawned when the migration starts, and it
  spawns its incoming guest as a second interpreter (``VMEM_GUEST_START=exec``): what
  ``vmem migrate`` did until this change;
* ``after`` -- :class:`vmem.migration.local.LocalDestination` is started before the guest
  boots (its interpreter and imports overlap the boot and the warm-up), and it forks its
  incoming guest from itself (numpy and the runtime already imported).

Only verified runs count.  Prints, per variant, the median and range of ``setup_time_ms``
(handshake to the first page), of its parts (``timings_ms["setup_*"]``) and of
``migration_time_s``, the ratio after/before of the medians, and the load average, which
on a shared host decides most of these figures.  Nothing is asserted.

    .venv/bin/python scripts/bench_handshake.py --runs 5 --size 128M
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
from vmem.migration.local import LocalDestination, run_local_migration  # noqa: E402
from vmem.migration.source import MigrationOptions  # noqa: E402
from vmem.ram import parse_size  # noqa: E402
from vmem.units import bandwidth_from_arg  # noqa: E402

PARTS = ("setup_destination_imports", "setup_destination_waited", "setup_guest_start",
         "setup_preamble_to_ready", "setup_tracker_arm")


def one_run(variant: str, args) -> dict | None:
    opts = MigrationOptions(observe_s=0.1, bandwidth_Bps=args.bandwidth)
    spec = GuestSpec(args.workload, {"rate": args.rate}, args.seed)
    if variant == "before":
        os.environ["VMEM_GUEST_START"] = "exec"  # read by the destination process it spawns
        try:
            with boot_guest(spec, parse_size(args.size)) as guest:
                time.sleep(args.warmup)
                report = run_local_migration(guest, opts)
        finally:
            del os.environ["VMEM_GUEST_START"]
    else:
        with LocalDestination.start(opts) as dest, boot_guest(spec, parse_size(args.size)) as guest:
            time.sleep(args.warmup)
            report = run_local_migration(guest, opts, destination=dest)
    d = report.to_dict()
    if d["outcome"] != "completed" or not d["verified"]:
        print(f"  {variant}: not verified ({d['outcome']}: {d.get('reason')}); left out", file=sys.stderr)
        return None
    return {"setup_time_ms": d["setup_time_ms"], "migration_time_s": d["migration_time_s"],
            **{k: d["timings_ms"].get(k) for k in PARTS}}


def _fmt(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    return f"{statistics.median(vals):,.1f} [{min(vals):,.1f}-{max(vals):,.1f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs per variant, interleaved")
    p.add_argument("--size", default="128M")
    p.add_argument("--workload", default="hotcold")
    p.add_argument("--rate", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bandwidth", type=bandwidth_from_arg, default=bandwidth_from_arg("200M"), help="link cap (200M = 200 MB/s)")
    p.add_argument("--warmup", type=float, default=0.5)
    args = p.parse_args(argv)
    load0 = os.getloadavg()
    got: dict[str, list[dict]] = {"before": [], "after": []}
    for i in range(args.runs):
        for variant in ("before", "after") if i % 2 == 0 else ("after", "before"):
            row = one_run(variant, args)
            if row is not None:
                got[variant].append(row)
                print(f"  run {i + 1} {variant}: setup {row['setup_time_ms']:,.0f} ms, "
                      f"migration {row['migration_time_s']:.2f} s", file=sys.stderr)
    load1 = os.getloadavg()
    keys = ("setup_time_ms",) + PARTS + ("migration_time_s",)
    print(f"Handshake, {args.size} {args.workload} guest, {args.bandwidth / 1e6:g} MB/s, medians [min-max] of "
          f"verified runs; load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end, "
          f"{os.cpu_count()} CPUs. Command: `{' '.join(['.venv/bin/python', 'scripts/bench_handshake.py'] + sys.argv[1:])}`\n")
    print("| figure | before | after | after / before |")
    print("| --- | --- | --- | --- |")
    for k in keys:
        b = [r[k] for r in got["before"] if r[k] is not None]
        a = [r[k] for r in got["after"] if r[k] is not None]
        ratio = f"{statistics.median(a) / statistics.median(b):.2f}" if a and b and statistics.median(b) else "-"
        print(f"| {k} (n={len(b)}/{len(a)}) | {_fmt(b)} | {_fmt(a)} | {ratio} |")
    return 0 if got["before"] and got["after"] else 1


if __name__ == "__main__":
    sys.exit(main())
