"""``vmem calibrate``: its arguments and the command (the measurement and the per-host cache
are :mod:`vmem.analysis.calibration`)."""
from __future__ import annotations

import time

from vmem.analysis.calibration import (
    POOL_MAX_CALIBRATIONS,
    calibration_grid,
    default_path,
    load_calibration,
    pool_calibrations,
    pool_mismatch,
    run_calibration,
    summary_rows,
)

__all__ = ["add_calibrate_arguments", "cmd_calibrate"]


def add_calibrate_arguments(p) -> None:
    """``vmem calibrate``'s arguments."""
    p.add_argument("--sizes", default="64M,128M", help="guest sizes of the calibration runs (default 64M,128M: two "
                                                       "sizes give the size-dependent costs' slope)")
    p.add_argument("--links", default="50M,200M", help="link caps, bytes/s (default 50M,200M; predictions use the "
                                                       "nearest calibrated rate)")
    p.add_argument("--repeats", type=int, default=2, help="runs per size x link x mode (default 2)")
    p.add_argument("--no-postcopy", action="store_true", help="calibrate pre-copy only (no pure post-copy and hybrid runs)")
    p.add_argument("--no-idle", action="store_true", help="no idle-guest runs (predictions for guests that write "
                                                          "little then use the busy calibration guest's costs)")
    p.add_argument("--tracker", default="auto", choices=["auto", "uffd-wp", "mprotect"])
    p.add_argument("--out", metavar="FILE", help=f"where to store it (default {default_path()})")
    p.add_argument("--append", action="store_true",
                   help="pool with the calibrations already in --out (the newest "
                        f"{POOL_MAX_CALIBRATIONS} are kept): predictions then draw from runs of several times, "
                        "whose spread one calibration does not show (docs/profiling.md)")
    p.add_argument("--show", action="store_true", help="print the stored calibration and exit")


def cmd_calibrate(args) -> int:
    """``vmem calibrate``: measure, store and print this host's calibration."""
    from rich.console import Console
    from rich.table import Table

    from transport import parse_rate
    from vmem.errors import ConfigError
    from vmem.ram import parse_size

    console = Console()
    err = Console(stderr=True)
    if args.show:
        cal = load_calibration(args.out, required=True)
    else:
        sizes = [parse_size(s.strip()) for s in args.sizes.split(",") if s.strip()]
        links = [parse_rate(s.strip()) for s in args.links.split(",") if s.strip()]
        t0 = time.monotonic()

        def on_run(i, n, size, bw, mode, rep):
            err.print(f"[{time.monotonic() - t0:5.0f} s] run {i}/{n}: {size >> 20} MiB, {bw / 1e6:g} MB/s, {mode}: "
                      f"{rep.outcome}, downtime {rep.downtime_ms} ms, migration {rep.migration_time_s} s")

        # an unreadable or incompatible file is refused before minutes of measuring
        previous = load_calibration(args.out) if getattr(args, "append", False) else None
        if previous is not None:
            why = pool_mismatch(previous, calibration_grid(sizes, links, tracker=args.tracker,
                                                           postcopy=not args.no_postcopy))
            if why:
                raise ConfigError("--append", why)
        cal = run_calibration(sizes, links, args.repeats, postcopy=not args.no_postcopy, idle=not args.no_idle,
                              tracker=args.tracker, on_run=on_run)
        if previous is not None:
            cal = pool_calibrations(cal, previous)
        cal.save(args.out or (previous.path if previous is not None else None))
    t = Table(title=cal.describe())
    for c in ("quantity", "mode", "median (min-max), n"):
        t.add_column(c)
    for row in summary_rows(cal):
        t.add_row(*row)
    console.print(t)
    if cal.data.get("failed_runs"):
        err.print(f"{len(cal.data['failed_runs'])} run(s) left out: {cal.data['failed_runs'][0]}")
    return 0
