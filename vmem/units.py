"""Quantities given by users (flags, JSON options) turned into numbers with units.

Shared by the command line, the agent and the analysis tools, so it lives below all three.
"""
from __future__ import annotations

import re

from transport import parse_rate
from vmem.errors import ConfigError

__all__ = ["bandwidth_from_arg"]


def bandwidth_from_arg(text: str | None, flag: str = "--bandwidth") -> float | None:
    """Parse a ``--bandwidth``-style rate (``100M``, ``1Gbit``) into bytes/s; None if not given.

    A bare number is refused: virsh reads ``--bandwidth 100`` as MiB/s, ``parse_rate`` as
    bytes/s, and a silent 100 B/s link is never what was meant.

    Raises:
        ConfigError: naming ``flag``, for a malformed or non-positive rate.
    """
    if not text:
        return None
    if isinstance(text, str) and re.fullmatch(r"\s*[0-9]+(\.[0-9]*)?\s*", text):
        raise ConfigError(flag, f"{text.strip()!r} has no unit: write {text.strip()}MiB for virsh's MiB/s, "
                                f"{text.strip()}M for MB/s, {text.strip()}Mbit for Mbit/s (or {text.strip()}B/s if you "
                                "really mean bytes per second)")
    try:
        return parse_rate(text)
    except ValueError as err:
        raise ConfigError(flag, str(err)) from None
