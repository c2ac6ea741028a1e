"""The ``vmem`` command line.

    vmem migrate --workload hotcold --size 1G [...]   one-host live migration with a live display
    vmem doctor                                       which kernel features this machine offers
    vmem profile / predict / calibrate                working-set profiling; trace-driven prediction; host calibration
    vmem compare / graph                              policies side by side; graphs and an HTML report
    vmem inspect FILE                                 records, rounds and page map of a stream (xl save files too)
    vmem bench / trend                                regression runs: matrix, baselines, verdicts (docs/bench.md)
    vmem agent / create / list / destroy / save / restore / migrate NAME HOST:PORT   host agents (docs/agent.md)
"""
from __future__ import annotations

import argparse
import sys
import time

from vmem.cli.args import add_guest_arguments, add_migration_arguments, add_policy_arguments, options_from_args, policy_from_args  # noqa: F401 (re-exported)
from vmem.errors import ConfigError, VmemError

__all__ = ["main"]

#: with --json and no --pagemap, guests up to this size record a page map beside the report
PAGEMAP_AUTO_MAX_BYTES = 64 << 20


def _add_migrate(sub) -> None:
    p = sub.add_parser("migrate", help="live-migrate a guest: to a new process on this host, or (with an agent) NAME to HOST:PORT",
                       description="Without NAME: boot a guest running a workload, live-migrate it to a new process on this host, "
                                   "verify it, and report.  With NAME HOST:PORT: ask the local agent (vmem agent) to live-migrate "
                                   "its guest NAME to the agent listening at HOST:PORT, with the same flags, display and report.")
    p.add_argument("name", nargs="?", metavar="NAME", help="a guest of the local agent (vmem list); needs HOST:PORT")
    p.add_argument("target", nargs="?", metavar="HOST:PORT", help="the destination agent's --listen address")
    p.add_argument("--resume", action="store_true",
                   help="with NAME: finish NAME's post-copy whose link broke after the switch (vmem list shows it "
                        "paused), over new connections to the same destination")
    add_guest_arguments(p, xen=True)
    add_migration_arguments(p)
    xen = p.add_argument_group("Xen (run in dom0; docs/xen.md)")
    xen.add_argument("--save", metavar="FILE", help="with --backend xen: write the stream (xl save format) to FILE and "
                                                    "resume the domain, instead of migrating it")
    xen.add_argument("--xen-pause", action="store_true",
                     help="with --backend xen: only pause the domain for the stop-and-copy instead of asking it to "
                          "suspend (as libxl does); the moved guest's xenstore and event channels stay broken")
    lab = p.add_argument_group("lab faults (one-host only)")
    lab.add_argument("--cut-link-after", type=float, metavar="S", default=None,
                     help="cut the link S seconds into post-copy, to watch --postcopy-recovery resume it")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write the full report (docs/report.md) to FILE")
    o.add_argument("--quiet", action="store_true", help="no live display, summary only")
    o.add_argument("--pagemap", metavar="DIR",
                   help="record the page map (which page was sent, dirtied, pushed, faulted, round by round; "
                        "docs/pagemap.md) and draw it into DIR: pagemap.png, pagemap.html (step-through, offline), "
                        "pagemap.npz, postcopy.png (post-copy runs) and the run's graphs (run-convergence.png, "
                        "run-dirty-rate.png, run-downtime.png; docs/graphs.md); one-host only. Without it, a guest of at most "
                        f"{PAGEMAP_AUTO_MAX_BYTES >> 20} MiB migrated with --json FILE records FILE's .pagemap.npz "
                        "(vmem graph FILE draws it)")
    from vmem.cli.agent import add_agent_address_arguments

    add_agent_address_arguments(p)


def cmd_migrate(args) -> int:
    if args.backend == "xen":
        from vmem.cli.xen import cmd_migrate_xen

        return cmd_migrate_xen(args)
    if args.save:
        raise ConfigError("--save", "writes a Xen stream: it needs --backend xen")
    if args.name is not None or args.target is not None or args.resume:
        from vmem.cli.agent import cmd_migrate_via_agent

        if args.pagemap:
            raise ConfigError("--pagemap", "records one-host migrations only for now (the destination's fault log "
                                           "and the files stay on this host); migrate without NAME HOST:PORT")

        return cmd_migrate_via_agent(args)
    from rich.console import Console

    from vmem.migration.backend import GuestSpec, boot_guest
    from vmem.cli.display import LiveDisplay, print_summary
    from vmem.migration.local import LocalDestination, run_local_migration
    from vmem.ram import format_bytes, mem_available_bytes, parse_size

    # Validate everything before starting a single process.
    size = parse_size(args.size)
    # Source and destination each hold a full copy of guest RAM on this host.
    if 2 * size > mem_available_bytes():
        raise ConfigError("--size", f"{args.size} needs {format_bytes(2 * size)} on this host (source and destination RAM) "
                                    f"but only {format_bytes(mem_available_bytes())} is available")
    from vmem.cli.args import guest_params_from_args

    params = guest_params_from_args(args)
    options = options_from_args(args)
    from vmem.cli.args import one_host_link_warnings

    for note in one_host_link_warnings(args):
        print(f"vmem: note: {note}", file=sys.stderr)
    if args.cut_link_after is not None and options.postcopy == "off":
        raise ConfigError("--cut-link-after", "cuts the link during post-copy: add --postcopy or --postcopy-after-precopy")
    if args.pagemap:
        import os

        try:
            os.makedirs(args.pagemap, exist_ok=True)
        except OSError as err:
            raise ConfigError("--pagemap", f"cannot create {args.pagemap}: {err.strerror}") from None
        options.pagemap_path = os.path.join(args.pagemap, "pagemap.npz")
    elif args.json and size <= PAGEMAP_AUTO_MAX_BYTES:
        options.pagemap_path = _pagemap_beside(args.json)
    console = Console(stderr=True)
    spec = GuestSpec(args.workload, params, args.seed)
    console.print(f"booting a {args.size} guest running [bold]{args.workload}[/bold] {params or ''}…")
    t = time.monotonic()
    # The destination process starts now: its interpreter and imports overlap the guest's
    # boot and warm-up instead of sitting in the migration's handshake.
    with LocalDestination.start(options) as destination:
        try:
            guest = boot_guest(spec, size, args.backend)
        except ValueError as err:
            raise ConfigError("--size" if "RAM" in str(err) else "--workload", str(err)) from None
        with guest:
            console.print(f"guest pid {guest.pid} up in {time.monotonic() - t:.2f} s; warming up {args.warmup:g} s")
            time.sleep(args.warmup)
            with LiveDisplay(console, enabled=not args.quiet) as display:
                report = run_local_migration(guest, options, display, cut_link_after_s=args.cut_link_after,
                                             destination=destination)
    print_summary(report, Console())
    if args.json:
        report.write(args.json)
        console.print(f"report written to {args.json}")
    if args.pagemap:
        from vmem.analysis.graphs import render_report
        from vmem.analysis.pagemap import render_run

        rep = report.to_dict()
        written = render_run(rep, args.pagemap)
        if rep.get("rounds"):
            written += [im[0] for im in render_report(rep, args.pagemap, name="run")["images"]]
        for path in written:
            console.print(f"wrote {path}")
    return 0 if report.outcome == "completed" else (3 if report.outcome == "aborted" else 1)


def _pagemap_beside(json_path: str) -> str:
    """``run.json`` -> ``run.pagemap.npz`` (where an automatic page map goes)."""
    stem = json_path[:-5] if json_path.endswith(".json") else json_path
    return stem + ".pagemap.npz"


def cmd_doctor(args) -> int:
    from vmem.features import format_features, probe_features

    features = probe_features()
    print(format_features(features))
    print()
    uffd_ok = all(features[n].available for n in ("userfaultfd", "UFFD_FEATURE_WP_ASYNC",
                                                  "UFFD_FEATURE_WP_HUGETLBFS_SHMEM", "PAGEMAP_SCAN") if n in features)
    mprot_ok = features.get("mprotect_tracker") is not None and features["mprotect_tracker"].available
    print(f"tracker uffd-wp:  {'available' if uffd_ok else 'UNAVAILABLE'} (userfaultfd async write-protect + PAGEMAP_SCAN)")
    print(f"tracker mprotect: {'available' if mprot_ok else 'UNAVAILABLE'} (SIGSEGV handler in the guest)")
    best = "uffd-wp" if uffd_ok else ("mprotect" if mprot_ok else None)
    print(f"--tracker auto selects: {best or 'nothing: no dirty tracking is possible on this kernel'}")
    print(post_copy_priority_line())
    from vmem import _native as nat

    print("page digests: " + ("AVX-512, eight pages per call" if nat.digest_impl() == "avx512" else
                              "scalar (no AVX-512 F+DQ here: the same XXH64, ~4x slower on hot pages)"))
    from transport.gmac import implementation as gmac_implementation

    print("keyed-link MAC (AES-256-GMAC): " + gmac_implementation())
    from vmem.features import free_page_reporting, kernel_preemption, tls_urgent_link

    print(tls_urgent_link())

    print(kernel_preemption())

    reporting = free_page_reporting()
    print(f"fresh memory: {reporting}" if reporting else "fresh memory: no free page reporting to a hypervisor found")
    _print_kvm()
    return 0 if best else 1


def post_copy_priority_line() -> str:
    """What the post-copy fault threads get here, and what that means (vmem doctor)."""
    from vmem import _native as nat

    try:
        kind, what = nat.fault_thread_priority()
        fifo = nat.fault_thread_priority(nat.PC_PRIO_FIFO)[0] == nat.PC_PRIO_FIFO
    except OSError as err:
        return f"post-copy fault threads: could not be probed ({err})"
    import os

    from vmem.migration.postcopy import cpu_list

    rt = ("SCHED_FIFO is permitted here: --fault-sched fifo uses it (not the default: docs/postcopy.md, it raised the "
          "fault p50 on a 2-vCPU VM)" if fifo else
          "SCHED_FIFO is not permitted (needs CAP_SYS_NICE or RLIMIT_RTPRIO): --fault-sched fifo is refused here")
    rt += (f"; --fault-cpu may pin them to one of CPUs {cpu_list(sorted(os.sched_getaffinity(0)))} here (with --fault-sched "
           "fifo, every wake-up of a fault thread then lands on that CPU)")
    if kind == nat.PC_PRIO_SLICE:
        return (f"post-copy fault threads: {what} (raised above the push and the guest; the short slice lets a"
                f" woken one preempt them instead of waiting out their slice); {rt}")
    if kind == nat.PC_PRIO_NICE:
        return (f"post-copy fault threads: {what} (raised above the push and the guest) -- the kernel did not take"
                f" the short EEVDF slice asked for (custom slices need Linux >= 6.12), so a woken fault thread may"
                f" wait out the running thread's slice (~1-4 ms): fault latency p99 will suffer; {rt}")
    if kind == nat.PC_PRIO_FIFO:
        return f"post-copy fault threads: {what}"
    return (f"post-copy fault threads: {what} -- a negative nice value was not allowed (run as root or grant"
            f" CAP_SYS_NICE): fault latency under load will suffer; {rt}")


def _print_kvm() -> None:
    """The KVM backend's part of ``vmem doctor``: /dev/kvm, the dirty log and ring, the vCPU's features."""
    from guests.kvm.vm import probe

    kvm = probe()
    print()
    if not kvm["available"]:
        print(f"backend kvm:      UNAVAILABLE ({kvm.get('reason', '?')})")
        return
    caps = kvm["caps"]
    print(f"backend kvm:      available (/dev/kvm API {kvm['api_version']}; --backend kvm)")
    print(f"tracker kvm-log:  {'available' if caps['manual_dirty_log_protect2'] else 'UNAVAILABLE'} "
          "(KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)")
    ring = kvm["dirty_ring_max_entries"]
    print(f"tracker kvm-ring: {'available' if ring else 'UNAVAILABLE'} (KVM_CAP_DIRTY_LOG_RING"
          f"{'_ACQ_REL' if caps['dirty_log_ring_acq_rel'] else ''}, up to {ring:,} entries per vCPU)")
    print(f"kvm vCPU:         {', '.join(kvm['vcpu_features']) or 'no features found'}; LAPIC in kernel "
          f"({'split irqchip' if caps['split_irqchip'] else 'UNAVAILABLE'}), XSAVE {'yes' if caps['xsave'] else 'no'}, "
          f"{caps['nr_memslots']:,} memslots")


#: Subcommands whose modules are heavy to import (matplotlib...): their arguments are
#: only registered when that subcommand is the one being run.
_LAZY_COMMANDS = {
    "profile": ("vmem.cli.profile", "add_profile_arguments", "record a guest's dirty pages over time (working set) without migrating",
                "Run a guest under dirty logging, record its dirty trace, report its writable working set and "
                "the expected downtime and total time of each policy; recommend thresholds."),
    "predict": ("vmem.cli.predict", "add_predict_arguments", "predict a migration from a recorded dirty trace (any policy, any bandwidth)",
                "Replay a dirty trace through a policy at a bandwidth; with --compare-report, show predicted vs measured."),
    "calibrate": ("vmem.cli.calibrate", "add_calibrate_arguments",
                  "measure this host's migration fixed costs and copy rate for predictions (cached per host)",
                  "Migrate a calibration guest a few times (pre-copy and post-copy, two sizes, two link caps), "
                  "measure what the simulator cannot know -- handshake, switchover, pause, collects, the copy path's "
                  "real rate, verify and commit, post-copy switch and fault stalls -- and store them with provenance "
                  "in a per-host cache that vmem predict and vmem profile use.  docs/profiling.md."),
    "compare": ("vmem.cli.compare", "add_compare_arguments", "migrate the same workload under several policies and compare them",
                "Boot the same guest once per policy, migrate it, and compare outcomes, times, downtime and data sent "
                "(table, PNG graphs, HTML report)."),
    "graph": ("vmem.cli.graph", "add_graph_arguments", "render graphs and an HTML report from saved JSON reports",
              "Render convergence, dirty-rate and downtime graphs (PNG) and one HTML report from --json reports."),
    "bench": ("vmem.cli.bench", "add_bench_arguments", "regression runs: a scenario matrix, repeated; baselines and verdicts",
              "Run a matrix of migrations (a built-in suite, a TOML file or command-line axes) N times interleaved, "
              "append one JSON line per run, compare with a baseline (noise-aware: medians, thresholds and a rank "
              "test) and exit 1 on a regression.  docs/bench.md."),
    "inspect": ("vmem.cli.inspect_cmd", "add_inspect_arguments", "show the records, rounds and page map of a migration stream (xl save files too)",
                "Read an xl save file, a stream xl migrate wrote, or a vmem stream; show its records, the pages of each "
                "round and (with --pagemap DIR) a page map."),
    "trend": ("vmem.cli.bench", "add_trend_arguments", "a trend view of stored bench results across commits",
              "One graph per metric and cell from vmem bench results files: medians per commit, in date order; "
              "--asv DIR writes them in asv's results format."),
}
_LAZY_RUNNERS = {"profile": ("vmem.cli.profile", "cmd_profile"), "predict": ("vmem.cli.predict", "cmd_predict"),
                 "calibrate": ("vmem.cli.calibrate", "cmd_calibrate"),
                 "compare": ("vmem.cli.compare", "cmd_compare"), "graph": ("vmem.cli.graph", "cmd_graph"),
                 "bench": ("vmem.cli.bench", "cmd_bench"), "inspect": ("vmem.cli.inspect_cmd", "cmd_inspect"), "trend": ("vmem.cli.bench", "cmd_trend")}


class _Parser(argparse.ArgumentParser):
    """argparse, with every argument error as one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: invalid argument: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; heavy subcommands get their arguments only if ``command`` names them.

    Every subcommand has a description (its one-line help when it has no longer one)."""
    import importlib

    p = _Parser(prog="vmem", description="A live-migration laboratory for stock Linux.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_migrate(sub)
    sub.add_parser("doctor", help="report the kernel features vmem can use here",
                   description="Probe this kernel for what vmem needs (userfaultfd and its features, PAGEMAP_SCAN, "
                               "mprotect tracking) and say which dirty tracker --tracker auto selects. "
                               "Exit status 0 if some tracker works, 1 if none.")
    from vmem.cli.agent import add_agent_commands

    add_agent_commands(sub)
    for name, (module, adder, helptext, description) in _LAZY_COMMANDS.items():
        sp = sub.add_parser(name, help=helptext, description=description)
        if name == command:
            getattr(importlib.import_module(module), adder)(sp)
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, sp in sub.choices.items():
        if not sp.description and helps.get(name):
            sp.description = helps[name][0].upper() + helps[name][1:] + "."
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        if args.command == "migrate":
            return cmd_migrate(args)
        if args.command == "doctor":
            return cmd_doctor(args)
        from vmem.cli.agent import AGENT_COMMANDS, run_agent_command

        if args.command in AGENT_COMMANDS:
            return run_agent_command(args)
        if args.command in _LAZY_RUNNERS:
            import importlib

            module, runner = _LAZY_RUNNERS[args.command]
            return getattr(importlib.import_module(module), runner)(args)
    except ConfigError as err:
        print(f"vmem: invalid argument {err}", file=sys.stderr)
        return 2
    except VmemError as err:
        print(f"vmem: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vmem: interrupted; every process started was reaped", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
