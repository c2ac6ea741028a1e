"""Quantities given by users (flags, JSON options) turned into numbers with units.

Shared by the command line, the agent and the analysis tools, so it lives below all three.
"""
from __future__ import annotations

from transport import parse_rate
from vmem.errors import ConfigError

__all__ = ["bandwidth_from_arg"]


def bandwidth_from_arg(text: str | None, flag: str = "--bandwidth") -> float | None:
    """Parse a ``--bandwidth``-style rate (``100M``, ``1Gbit``) into bytes/s; None if not given.

    Raises:
        ConfigError: naming ``flag``, for a malformed or non-positive rate.
    """
    if not text:
        return None
    try:
        return parse_rate(text)
    except ValueError as err:
        raise ConfigError(flag, str(err)) from None
