"""The migration flag vocabulary: every option that shapes a migration, defined once.

Both sides of an agent migration use it: ``vmem migrate`` (:mod:`vmem.cli.main`,
:mod:`vmem.cli.agent`) adds these flags to its parser and sends their parsed values as JSON;
the source agent (:mod:`vmem.agent.migration`) rebuilds :class:`~vmem.migration.source.MigrationOptions`
from those values with the same functions.  Keeping the vocabulary here, below both, means
the agent does not import the command line, and a flag added here works in both places.

Guarantees: every flag's parsed value is JSON-serialisable; every function that turns
values into options raises :class:`~vmem.errors.ConfigError` naming the flag on a bad value.
"""
from __future__ import annotations

from vmem.errors import ConfigError
from vmem.units import bandwidth_from_arg
from vmem.migration.postcopy import FAULT_SCHEDS

__all__ = ["COMPRESS_NAMES", "add_migration_arguments", "add_policy_arguments", "link_options_from_args",
           "migration_argument_dests", "one_host_link_warnings", "options_from_args", "policy_from_args"]

#: --compress spellings: the name shown in --help -> the link's value (vmem.agent.migration)
COMPRESS_NAMES = {"zero-bitmap": "none", "zstd": "zstd", "lz4": "lz4", "raw": "off",
                  "none": "none", "off": "off"}  # none/off: the old names, kept as aliases


def add_migration_arguments(parser) -> None:
    """Every flag that shapes a migration: ``--tracker --bandwidth --no-verify --no-guest-check
    --observe``, ``--policy`` and each policy's flags.

    The one definition shared by ``vmem migrate --workload ...`` (one host) and ``vmem migrate
    NAME HOST:PORT`` (through an agent, which rebuilds the options with
    :func:`options_from_args` from the same values): a flag added here works in both.  Every
    flag must be JSON-serialisable as parsed (the agent form sends them over a socket).
    """
    m = parser.add_argument_group("migration")
    m.add_argument("--tracker", default="auto", choices=["auto", "uffd-wp", "mprotect", "kvm-log", "kvm-ring"],
                   help="dirty tracking mechanism (kvm-log, kvm-ring: KVM guests)")
    m.add_argument("--live", action="store_true",
                   help="accepted for virsh compatibility: every vmem migration is live (the guest runs during pre-copy)")
    m.add_argument("--bandwidth", metavar="RATE",
                   help="cap the link: 100M (MB/s, bytes), 50MiB (MiB/s, virsh's unit), 1Gbit (bits/s); a bare number "
                        "is refused (virsh reads it as MiB/s)")
    m.add_argument("--no-verify", action="store_true", help="skip the RAM digest comparison")
    m.add_argument("--no-guest-check", action="store_true", help="skip the destination guest's own ledger check")
    m.add_argument("--observe", type=float, default=1.0, metavar="S", help="let the destination guest run S seconds after commit")
    pc = m.add_mutually_exclusive_group()
    pc.add_argument("--postcopy", action="store_true",
                    help="pure post-copy: pause at once, resume at the destination, pull pages on demand (docs/postcopy.md). "
                         "Unlike virsh migrate --postcopy, which only allows a later switch (virsh migrate-postcopy), "
                         "this switches at once; for pre-copy first use --postcopy-after-precopy, or let the budget "
                         "policy decide with --allow-postcopy")
    pc.add_argument("--postcopy-after-precopy", action="store_true",
                    help="hybrid: pre-copy rounds, then post-copy for the pages still dirty where stop-and-copy would be")
    m.add_argument("--postcopy-recovery", action="store_true",
                   help="if the link breaks after the switch, both sides keep their state and the migration is resumed "
                        "over a new connection (automatically on one host; vmem migrate --resume NAME with agents)")
    m.add_argument("--postcopy-bandwidth", metavar="RATE",
                   help="cap the background push after the post-copy switch (QEMU's max-postcopy-bandwidth; same "
                        "units as --bandwidth): demand-fault answers are not capped, so a lower cap leaves more of "
                        "both hosts' CPUs and the link to the pages the guest is waiting for, and the post-copy "
                        "phase lasts longer (postcopy.push_rate_Bps, source.push_paced_s; docs/postcopy.md); "
                        "needs post-copy")
    m.add_argument("--fault-sched", choices=list(FAULT_SCHEDS), default="default",
                   help="how both hosts schedule the post-copy fault threads (like libvirt's vcpusched): default, "
                        "nice -15 with a 0.1 ms slice (the lowest median fault round trip; a woken fault thread may "
                        "still wait a few ms behind the push's threads now and then); fifo, SCHED_FIFO 10 (no such "
                        "waits; a reschedule IPI on most wake-ups raises the median). Each host must permit it (root "
                        "or RLIMIT_RTPRIO), or the migration is refused before it starts; needs post-copy "
                        "(docs/postcopy.md)")
    m.add_argument("--fault-cpu", type=int, metavar="CPU",
                   help="pin both hosts' post-copy fault threads to this CPU (like libvirt's emulatorpin). With "
                        "--fault-sched fifo every wake-up of a fault thread then lands on that CPU, so it never "
                        "waits for another CPU to notice it; on two real hosts pick the CPU that takes the NIC's "
                        "interrupts. Each host must let vmem run there, or the migration is refused before it "
                        "starts; needs post-copy (docs/postcopy.md)")
    m.add_argument("--prealloc", action="store_true",
                   help="the destination allocates the guest's whole RAM before the first page arrives and maps it "
                        "into its own page tables, like QEMU's -mem-prealloc: setup takes longer (~0.5 s per GiB on "
                        "this kind of VM, while the guest still runs here), round 0, the post-copy push and the "
                        "demand answers then write into memory that exists without a page fault "
                        "(docs/performance.md); the guest's unused memory is allocated there too")
    m.add_argument("--no-prepare-pause", action="store_true",
                   help="pause without the rehearsal: by default, right before the stop-and-copy's pause, both guests "
                        "and both migrators run what follows the pause once (results discarded), because that code "
                        "otherwise runs cold inside the downtime (timings_ms.prepare_pause; docs/performance.md)")
    m.add_argument("--collect-stop", action="store_true",
                   help="stop the guest's process (SIGSTOP) for each pre-copy round's dirty-page collect (uffd-wp "
                        "tracker): re-protecting its pages then needs no TLB-shootdown IPI to the CPU it runs on -- "
                        "the guest stands still ~1 ms per GiB per round instead of running slowed by the IPIs for "
                        "longer (rounds[].guest_stopped_ms; docs/performance.md)")
    h = parser.add_argument_group("between hosts (vmem migrate NAME HOST:PORT; a one-host migrate warns and ignores them)")
    h.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="TCP connections carrying the stream (default 1); N > 1 stripes large sends over them, "
                        "like QEMU's multifd (docs/agent.md)")
    h.add_argument("--compress", default="zero-bitmap", choices=list(COMPRESS_NAMES), metavar="MODE",
                   help="zero-bitmap (default): all-zero pages travel as bits of a bitmap, the others as they are; "
                        "zstd / lz4: that, and the other pages compressed too (pays only on slow links and "
                        "compressible memory); raw: every page as 4 KiB, zero pages too. "
                        "none and off are the old names of zero-bitmap and raw")
    add_policy_arguments(parser)


def link_options_from_args(args) -> tuple[int, str]:
    """``(parallel, compress)`` from the between-hosts flags (an agent migration's link).

    Raises:
        ConfigError: naming the flag, for a value out of range.
    """
    parallel = getattr(args, "parallel", 1)
    compress = getattr(args, "compress", "zero-bitmap")
    if not isinstance(parallel, int) or not 1 <= parallel <= 16:
        raise ConfigError("--parallel", f"must be 1..16, got {parallel!r}")
    if compress not in COMPRESS_NAMES:
        raise ConfigError("--compress", f"must be zero-bitmap, zstd, lz4 or raw, got {compress!r}")
    return parallel, COMPRESS_NAMES[compress]


def one_host_link_warnings(args) -> list[str]:
    """Notes for between-hosts flags given to a one-host migration (where they do nothing)."""
    notes = []
    if getattr(args, "parallel", 1) != 1:
        notes.append("--parallel applies between hosts (vmem migrate NAME HOST:PORT); a one-host migration uses one "
                     "socket pair: ignored")
    if getattr(args, "compress", "zero-bitmap") not in ("zero-bitmap", "none"):
        notes.append("--compress applies between hosts (vmem migrate NAME HOST:PORT); a one-host migration moves "
                     "pages over a local socket pair as they are: ignored")
    return notes


def migration_argument_dests() -> list[str]:
    """The ``dest`` of every flag :func:`add_migration_arguments` defines (what an agent needs)."""
    import argparse

    probe = argparse.ArgumentParser(add_help=False)
    add_migration_arguments(probe)
    return [a.dest for a in probe._actions]


def options_from_args(args):
    """The :class:`vmem.migration.source.MigrationOptions` that the flags of :func:`add_migration_arguments` ask for.

    ``args`` is any object with those attributes (an argparse Namespace, or one rebuilt from
    JSON by an agent).

    Raises:
        ConfigError: naming the flag, for a malformed or inconsistent value.
    """
    from vmem.migration.source import MigrationOptions

    policy = policy_from_args(args)
    if getattr(args, "postcopy", False):
        postcopy = "pure"
    elif getattr(args, "postcopy_after_precopy", False):
        postcopy = "after-precopy"
    elif getattr(args, "allow_postcopy", None) or getattr(args, "timeout_action", None) == "postcopy":
        postcopy = "allow"  # the policy may decide POSTCOPY: arm the destination for it
    else:
        postcopy = "off"
    return MigrationOptions(tracker=args.tracker, policy=policy, verify=not args.no_verify,
                            guest_check=not args.no_guest_check, observe_s=args.observe,
                            bandwidth_Bps=bandwidth_from_arg(args.bandwidth), postcopy=postcopy,
                            postcopy_recovery=bool(getattr(args, "postcopy_recovery", False)),
                            postcopy_bandwidth_Bps=bandwidth_from_arg(getattr(args, "postcopy_bandwidth", None),
                                                                      "--postcopy-bandwidth"),
                            prealloc=bool(getattr(args, "prealloc", False)),
                            prepare_pause=not getattr(args, "no_prepare_pause", False),
                            collect_stop=bool(getattr(args, "collect_stop", False)),
                            fault_sched=getattr(args, "fault_sched", "default") or "default",
                            fault_cpu=getattr(args, "fault_cpu", None))


def add_policy_arguments(p) -> None:
    """``--policy`` and every policy's flags, built from vmem.migration.policy.POLICY_OPTIONS.

    Each flag defaults to None ("not given"): the policy applies its own default, and a
    flag given for a policy that does not take it is an error naming it.
    """
    from vmem.migration.policy import OPTION_CHOICES, POLICIES, POLICY_SUMMARIES, policy_flags

    g = p.add_argument_group("precopy policy", "see docs/policies.md; each flag belongs to the policies named in its help")
    g.add_argument("--policy", default="xen", choices=list(POLICIES),
                   help="; ".join(f"{name}: {POLICY_SUMMARIES.get(name, '')}" for name in POLICIES))
    for opt, owners in policy_flags():
        helptext = f"{opt.help} [{', '.join(owners)}]"
        if opt.type is bool:
            action = "store_true" if not opt.default else "store_false"
            g.add_argument(opt.flag, dest=opt.dest, action=action, default=None, help=helptext)
        else:
            metavar = {int: "N", float: "NUM"}.get(opt.type, "RATE" if opt.dest.endswith("_Bps") else None)
            # One spelling across migrate, profile and compare: --max-downtime-ms (the old
            # --max-downtime of profile works here too).
            names = [opt.flag, "--max-downtime"] if opt.flag == "--max-downtime-ms" else [opt.flag]
            g.add_argument(*names, dest=opt.dest, default=None, metavar="MS" if opt.dest.endswith("_ms") else metavar,
                           choices=OPTION_CHOICES.get(opt.dest), help=helptext)


def policy_from_args(args):
    """Build the policy named by ``--policy`` from the parsed flags (ConfigError if inconsistent)."""
    from vmem.migration.policy import make_policy, policy_flags

    options = {opt.dest: getattr(args, opt.dest, None) for opt, _ in policy_flags()}
    return make_policy(args.policy, **options)
