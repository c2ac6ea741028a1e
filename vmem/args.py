"""Command-line pieces shared by several ``vmem`` subcommands (one definition each)."""
from __future__ import annotations

from .errors import ConfigError

__all__ = ["add_guest_arguments", "bandwidth_from_arg"]


def add_guest_arguments(parser, *, title: str = "guest", default_size: str = "1G",
                        warmup_help: str = "seconds the guest runs before the migration starts") -> None:
    """``--workload --size -W --seed --warmup``: what guest to boot."""
    g = parser.add_argument_group(title)
    g.add_argument("--workload", default="hotcold",
                   help="built-in workload (idle, uniform, hotcold, zipf, sweep, phased) or module:Class (default hotcold)")
    g.add_argument("--size", default=default_size, help=f"guest RAM, e.g. 256M, 1G, 8G (default {default_size})")
    g.add_argument("-W", "--workload-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="workload parameter, repeatable (e.g. -W rate=5000 -W hot_pages=0.1)")
    g.add_argument("--seed", type=int, default=1, help="workload RNG seed (default 1)")
    g.add_argument("--warmup", type=float, default=0.5, metavar="S", help=warmup_help)


def bandwidth_from_arg(text: str | None, flag: str = "--bandwidth") -> float | None:
    """Parse a ``--bandwidth``-style rate (``100M``, ``1Gbit``) into bytes/s; None if not given.

    Raises:
        ConfigError: naming ``flag``, for a malformed or non-positive rate.
    """
    if not text:
        return None
    from transport import parse_rate

    try:
        return parse_rate(text)
    except ValueError as err:
        raise ConfigError(flag, str(err)) from None
