"""Command-line pieces shared by several ``vmem`` subcommands (one definition each)."""
from __future__ import annotations

from vmem.errors import ConfigError
from vmem.units import bandwidth_from_arg

__all__ = ["COMPRESS_NAMES", "add_guest_arguments", "guest_params_from_args", "add_migration_arguments", "add_policy_arguments", "bandwidth_from_arg",
           "link_options_from_args", "one_host_link_warnings", "migration_argument_dests", "options_from_args", "policy_from_args"]


def add_guest_arguments(parser, *, title: str = "guest", default_size: str = "1G",
                        warmup_help: str = "seconds the guest runs before the migration starts", warmup: bool = True,
                        xen: bool = False) -> None:
    """``--workload --size -W --seed --backend`` (and ``--warmup`` unless ``warmup=False``): what
    guest to boot; ``xen=True`` adds ``--backend xen`` (a running Xen domain, docs/xen.md)."""
    g = parser.add_argument_group(title)
    g.add_argument("--workload", default="hotcold",
                   help=f"built-in workload ({', '.join(_builtin_workloads())}) or module:Class (default hotcold); "
                        "docs/workloads.md")
    g.add_argument("--size", default=default_size, help=f"guest RAM, e.g. 256M, 1G, 8G (default {default_size})")
    g.add_argument("-W", "--workload-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="workload parameter, repeatable (e.g. -W rate=5000 -W hot_pages=0.1)")
    g.add_argument("--seed", type=_seed, default=1, help="workload RNG seed, an integer >= 0 (default 1)")
    g.add_argument("--backend", default="process", choices=["process", "kvm"] + (["xen"] if xen else []),
                   help="process: a guest process (default); kvm: a KVM virtual machine running a tiny guest program "
                        "(workloads idle, uniform, hotcold, sweep; RAM up to 3 GiB; README \"KVM guests\")"
                        + ("; xen: the running Xen PVH domain NAME, received by xl restore (run in dom0; docs/xen.md)"
                           if xen else ""))
    if warmup:
        g.add_argument("--warmup", type=float, default=0.5, metavar="S", help=warmup_help)


def guest_params_from_args(args) -> dict:
    """The typed workload parameters of ``-W``, for the chosen ``--backend``; a KVM guest
    booted for ``--tracker kvm-ring`` gets ``dirty=ring`` (KVM enables the ring only when
    the VM is created).

    Raises:
        ConfigError: an unknown workload or parameter (named).
    """
    if getattr(args, "backend", "process") == "kvm":
        from guests.kvm.layout import parse_params as kvm_params

        params = kvm_params(args.workload, args.workload_arg)
        if getattr(args, "tracker", "auto") == "kvm-ring":
            params["dirty"] = "ring"
        return params
    from guests.workload import load_workload, parse_params

    if getattr(args, "tracker", "auto") in ("kvm-log", "kvm-ring"):
        raise ConfigError("--tracker", f"{args.tracker} tracks KVM guests: add --backend kvm")
    return parse_params(load_workload(args.workload), args.workload_arg)


def _builtin_workloads() -> list[str]:
    from guests.workload import BUILTIN_WORKLOADS

    return list(BUILTIN_WORKLOADS)


def _seed(text: str) -> int:
    """``--seed``: an integer >= 0 (checked before any guest boots)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


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
                            postcopy_recovery=bool(getattr(args, "postcopy_recovery", False)))


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
