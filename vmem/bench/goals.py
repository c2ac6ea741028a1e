"""Goals of the benchmark scripts (``scripts/bench_*.py``): one line per goal, one exit rule.

Each benchmark measures a figure and a baseline in the same run and checks the figure (often
their ratio) against a goal of issue 13.  :class:`Goals` keeps the checks, prints each as

    GOAL <where>: <what> = <value> (<op> <target>; ratio <value/target>) ok|MISSED

and gives the exit status: with ``--strict``, 1 when any goal is missed.  A figure that
could not be measured (``None``: the part did not run to the end, no fault was taken) is a
missed goal, never a met one.
"""
from __future__ import annotations

import math

OPS = (">=", "<=")


class Goals:
    """The goals one benchmark run checked, in order (:attr:`items`, JSON-ready dicts)."""

    def __init__(self, out=print):
        self.items: list[dict] = []
        self._out = out

    def check(self, where: str, what: str, value, op: str, target: float, unit: str = "") -> bool:
        """Record and print one goal; True when it is met (``value`` ``op`` ``target``).

        Raises:
            ValueError: ``op`` is not ``>=`` or ``<=``.
        """
        if op not in OPS:
            raise ValueError(f"goal operator must be one of {OPS}, got {op!r}")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        met = ok and (value >= target if op == ">=" else value <= target)
        ratio = round(value / target, 3) if ok and target else None
        self.items.append({"where": where, "goal": what, "value": value, "op": op, "target": target,
                           "unit": unit, "ratio": ratio, "met": bool(met)})
        shown = f"{value:.4g}" if ok else "not measured"
        self._out(f"GOAL {where}: {what} = {shown}{(' ' + unit) if unit and ok else ''} ({op} {target:g}; "
                  f"ratio {ratio}) {'ok' if met else 'MISSED'}")
        return bool(met)

    @property
    def missed(self) -> list[dict]:
        return [g for g in self.items if not g["met"]]

    def exit_status(self, strict: bool) -> int:
        """0, or 1 with ``strict`` when a goal was missed."""
        return 1 if strict and self.missed else 0
