"""Goals of the benchmark scripts (``scripts/bench_*.py``): one line per goal, one exit rule.

Each benchmark measures a figure and a baseline in the same run and checks the figure (often
their ratio) against a goal of issue 13.  :class:`Goals` keeps the checks, prints each as

    GOAL <where>: <what> = <value> (<op> <target>; ratio <value/target>) ok|MISSED

and gives the exit status: with ``--strict``, 1 when any goal is missed.  A figure that
could not be measured (``None``: the part did not run to the end, no fault was taken) is a
missed goal, never a met one.

A goal checked with its per-trial ``samples`` (the figure of each trial, or of each paired
trial for a ratio) also says whether the run *settles* it.  On a machine whose run-to-run
noise is as large as a goal's margin, a median that lands on the good side in one run lands
on the bad side in the next: the verdict of one run is then a coin toss, and the line says so:

    GOAL ...) ok; met in 3 of 5 trials, UNSETTLED: the median's 94 % interval 0.72-3.25 spans 0.85

The interval is distribution-free (order statistics of the samples; :func:`median_interval`),
so it needs no assumption about the noise.  ``ok``/``MISSED`` and ``--strict`` stay those of
the figure itself; an unsettled goal is listed again at the end (:meth:`Goals.summary`).
"""
from __future__ import annotations

import math

OPS = (">=", "<=")
#: The confidence asked of :func:`median_interval` (reached from 5 samples on).
MEDIAN_CONFIDENCE = 0.90
#: Fewer trials than this say nothing about settling (2 samples: a 50 % interval).
MIN_TRIALS_TO_SETTLE = 3


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def median_interval(samples, confidence: float = MEDIAN_CONFIDENCE) -> tuple[float, float, float] | None:
    """A distribution-free confidence interval of the median of what ``samples`` were drawn
    from: ``(low, high, coverage)``, None without samples.

    The interval is ``[x(j), x(n+1-j)]`` of the sorted samples, with the largest ``j`` whose
    coverage -- the chance that it contains the true median, ``1 - 2 P(Binomial(n, 1/2) < j)``
    whatever the distribution -- is at least ``confidence``.  Too few samples to reach it:
    ``[min, max]`` and its coverage (e.g. 3 samples: 0.75; 5: 0.9375).  Non-finite samples
    are dropped.
    """
    xs = sorted(float(x) for x in samples if _finite(x))
    n = len(xs)
    if n == 0:
        return None

    def coverage(j: int) -> float:
        below = sum(math.comb(n, i) for i in range(j)) / 2 ** n  # P(Binomial(n, 1/2) < j)
        return 1.0 - 2.0 * below

    j = 1
    while j + 1 <= (n + 1) // 2 and coverage(j + 1) >= confidence:
        j += 1
    return xs[j - 1], xs[n - j], coverage(j)


class Goals:
    """The goals one benchmark run checked, in order (:attr:`items`, JSON-ready dicts)."""

    def __init__(self, out=print):
        self.items: list[dict] = []
        self._out = out

    def check(self, where: str, what: str, value, op: str, target: float, unit: str = "",
              samples=None) -> bool:
        """Record and print one goal; True when it is met (``value`` ``op`` ``target``).

        ``samples``: the figure of each trial behind ``value`` (optional): the line and the
        record then also say in how many trials it was met and whether the run settles it
        (keys ``trials``, ``trials_met``, ``samples``, ``median_interval``, ``settled``).

        Raises:
            ValueError: ``op`` is not ``>=`` or ``<=``.
        """
        if op not in OPS:
            raise ValueError(f"goal operator must be one of {OPS}, got {op!r}")
        ok = _finite(value)
        met = ok and (value >= target if op == ">=" else value <= target)
        ratio = round(value / target, 3) if ok and target else None
        item = {"where": where, "goal": what, "value": value, "op": op, "target": target,
                "unit": unit, "ratio": ratio, "met": bool(met)}
        trials = "" if samples is None else self._trials(item, samples, op, target)
        self.items.append(item)
        shown = f"{value:.4g}" if ok else "not measured"
        self._out(f"GOAL {where}: {what} = {shown}{(' ' + unit) if unit and ok else ''} ({op} {target:g}; "
                  f"ratio {ratio}) {'ok' if met else 'MISSED'}{trials}")
        return bool(met)

    @staticmethod
    def _trials(item: dict, samples, op: str, target: float) -> str:
        """Add the per-trial figures to ``item``; the text appended to its GOAL line."""
        xs = [float(x) for x in samples if _finite(x)]
        meets = [x >= target if op == ">=" else x <= target for x in xs]
        interval = median_interval(xs)
        item["trials"] = len(xs)
        item["trials_met"] = sum(meets)
        item["samples"] = xs
        if interval is None:  # nothing measured: the figure itself is missed; nothing to settle
            item["median_interval"] = None
            item["settled"] = None
            return "; no trial measured"
        low, high, cover = interval
        item["median_interval"] = {"low": low, "high": high, "coverage": round(cover, 4)}
        text = f"; met in {sum(meets)} of {len(xs)} trials"
        if len(xs) < MIN_TRIALS_TO_SETTLE:
            item["settled"] = None  # cannot tell: say so, do not count it either way
            return text + f" (too few to tell whether the run settles it: {MIN_TRIALS_TO_SETTLE} are needed)"
        # Settled: the whole interval on one side of the target (a bound on it counts as met).
        good = (lambda x: x >= target) if op == ">=" else (lambda x: x <= target)
        item["settled"] = good(low) == good(high)
        if item["settled"]:
            return text + (f" (the median's {cover * 100:.0f} % interval {low:.4g}-{high:.4g} "
                           f"{'clears' if good(low) else 'misses'} {target:g})")
        return text + (f", UNSETTLED: the median's {cover * 100:.0f} % interval {low:.4g}-{high:.4g} spans {target:g}"
                       " (run-to-run noise: more trials, or a quieter machine)")

    @property
    def unsettled(self) -> list[dict]:
        """Goals checked with samples whose run did not settle them (see the module docstring)."""
        return [g for g in self.items if g.get("settled") is False]

    def summary(self) -> str:
        """One line: goals met / missed, and which were unsettled."""
        n, missed, unsettled = len(self.items), len(self.missed), self.unsettled
        text = f"goals: {n - missed} met, {missed} missed of {n}"
        if unsettled:
            text += (f"; {len(unsettled)} UNSETTLED by this run's noise (the verdict may flip in the next run): "
                     + "; ".join(f"{g['where']}: {g['goal']} (met in {g['trials_met']} of {g['trials']})"
                                 for g in unsettled))
        return text

    @property
    def missed(self) -> list[dict]:
        return [g for g in self.items if not g["met"]]

    def exit_status(self, strict: bool) -> int:
        """0, or 1 with ``strict`` when a goal was missed."""
        return 1 if strict and self.missed else 0
