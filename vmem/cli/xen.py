"""``vmem migrate --backend xen NAME``: live-migrate a Xen PVH domain from dom0 (docs/xen.md)."""
from __future__ import annotations

import os
import sys

from vmem.errors import ConfigError

__all__ = ["cmd_migrate_xen"]


def _print_round(rs) -> None:
    print(f"round {rs.index:>3} {rs.kind:<13} sent {rs.pages_sent:>8,} pages in {rs.duration_s * 1e3:9.1f} ms  "
          f"dirty {rs.dirty_pages:>7,}  {rs.decision or ''} {('(' + rs.reason + ')') if rs.reason else ''}", flush=True)


def cmd_migrate_xen(args) -> int:
    """Run the Xen migration the arguments describe; exit 0 completed, 3 aborted, 1 failed."""
    from vmem.cli.args import policy_from_args
    from vmem.units import bandwidth_from_arg
    from vmem.xen.migrate import migrate_domain

    if not args.name:
        raise ConfigError("NAME", "--backend xen migrates a running domain: vmem migrate --backend xen NAME")
    if args.target:
        raise ConfigError("HOST:PORT", "--backend xen migrates on this host through xl restore (or --save FILE); "
                                       "a remote destination is not implemented")
    policy = policy_from_args(args)
    bw = bandwidth_from_arg(args.bandwidth) if args.bandwidth else None
    pagemap_path = None
    if args.pagemap:
        os.makedirs(args.pagemap, exist_ok=True)
        pagemap_path = os.path.join(args.pagemap, "pagemap.npz")
    print(f"migrating Xen domain {args.name} with policy {args.policy} "
          f"({'to ' + args.save if args.save else 'through xl restore on this host'})", file=sys.stderr)
    rep = migrate_domain(args.name, policy, verify=not args.no_verify, bandwidth_limit_Bps=bw,
                         on_round=None if args.quiet else _print_round, pagemap_path=pagemap_path, save_path=args.save,
                         suspend=not args.xen_pause)
    if not args.quiet and rep.rounds and rep.rounds[-1].kind == "stop-and-copy":
        _print_round(rep.rounds[-1])
    v = rep.verification
    print(f"outcome {rep.outcome} ({rep.reason}); rounds {len(rep.rounds)}; pages sent {rep.pages_sent:,}; "
          f"bytes {rep.bytes_sent:,}; downtime {rep.downtime_ms} ms; total {rep.total_time_s} s; "
          f"verified {rep.verified} ({v.get('pages_compared', 0):,} pages compared, {v.get('pages_mismatched', 0)} differ)")
    if args.json:
        rep.write(args.json)
        print(f"report written to {args.json}", file=sys.stderr)
    return 0 if rep.outcome == "completed" else (3 if rep.outcome == "aborted" else 1)
