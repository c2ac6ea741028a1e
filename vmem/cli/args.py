"""Command-line pieces shared by several ``vmem`` subcommands (one definition each).

The guest flags live here; the migration flags (shared with the agent, which must not
import the command line) live in :mod:`vmem.migration.flags` and are re-exported.
"""
from __future__ import annotations

from vmem.errors import ConfigError
from vmem.migration.flags import (COMPRESS_NAMES, add_migration_arguments, add_policy_arguments,  # noqa: F401
                                  link_options_from_args, migration_argument_dests, one_host_link_warnings,
                                  options_from_args, policy_from_args)
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
