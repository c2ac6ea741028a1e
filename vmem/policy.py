"""Precopy policies: after every round, decide whether to go on, stop, or give up.

This is libxc's ``precopy_policy`` callback (``xc_domain_save``'s ``struct precopy_stats``
-> ``XGS_POLICY_*``), generalised with the figures the 2017 xen-devel discussion asked
for.  A policy is any callable ``policy(stats: PrecopyStats)`` returning a
:class:`Decision`, a ``(Decision, reason)`` pair, or a :class:`Verdict`.  The reason
appears in the report.

Iteration numbering follows libxc: round 0 sends every page; after round ``i`` completes,
the policy sees ``iteration = i + 1`` and ``dirty_count`` = pages dirtied during round
``i`` (what the next round, or the stop-and-copy, would send).
"""
from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field

from .errors import ConfigError, PolicyError

__all__ = [
    "Decision",
    "Verdict",
    "PrecopyStats",
    "XenDefaultPolicy",
    "IterationsThresholdPolicy",
    "make_policy",
    "call_policy",
    "POLICIES",
]


class Decision(enum.Enum):
    """What the migrator does next (libxc: XGS_POLICY_*)."""

    CONTINUE = "continue"            # another precopy round
    STOP_AND_COPY = "stop-and-copy"  # pause the guest, send the rest, resume at the destination
    POSTCOPY = "postcopy"            # switch to post-copy (not available yet: treated as an error)
    ABORT = "abort"                  # give up; the source guest keeps running untouched


@dataclass(frozen=True)
class Verdict:
    """A policy's answer.

    Attributes:
        decision: what to do next.
        reason: shown in the live display and the report.
        throttle: for CONTINUE only: the fraction of the guest's CPU time to take away
            during the next round (0.0 = none, at most 0.99), QEMU's auto-converge.  None
            keeps the current level.
    """

    decision: Decision
    reason: str = ""
    throttle: float | None = None


@dataclass(frozen=True)
class PrecopyStats:
    """What a policy sees after each round (libxc's ``precopy_stats`` plus measurements).

    Attributes:
        iteration: rounds completed so far (1 after round 0).
        total_written: pages sent so far, all rounds (libxc's ``total_written``).
        dirty_count: pages dirtied during the last round, i.e. still to send.
        guest_pages: pages of guest RAM.
        elapsed_s: time since the migration started.
        round_s: duration of the last round.
        bandwidth_Bps: bytes/s achieved in the last round (0 if it sent nothing).
        dirty_rate_pps: pages dirtied per second during the last round.
        dirty_history: dirty_count after every round so far (oldest first).
        est_downtime_s: estimated stop-and-copy time if we stopped now
            (dirty_count * page_size / bandwidth).
        bandwidth_limit_Bps: the configured link cap (``--bandwidth``), or None.
        throttle: the guest CPU throttle in force during the last round (0.0 = none).
        dirty_rate_history: dirty_rate_pps after every round so far (oldest first).
        page_size: bytes per page.
    """

    iteration: int
    total_written: int
    dirty_count: int
    guest_pages: int
    elapsed_s: float
    round_s: float
    bandwidth_Bps: float
    dirty_rate_pps: float
    dirty_history: tuple[int, ...] = field(default_factory=tuple)
    est_downtime_s: float = 0.0
    bandwidth_limit_Bps: float | None = None
    throttle: float = 0.0
    dirty_rate_history: tuple[float, ...] = field(default_factory=tuple)
    page_size: int = 4096

    def as_dict(self) -> dict:
        d = asdict(self)
        d["dirty_history"] = list(self.dirty_history)
        return d


class XenDefaultPolicy:
    """libxc's default: stop when fewer than 50 pages are dirty or after 5 iterations.

    (``SPP_TARGET_DIRTY_COUNT`` and ``SPP_MAX_ITERATIONS`` in xc_sr_save.c.)
    """

    name = "xen"
    TARGET_DIRTY_COUNT = 50
    MAX_ITERATIONS = 5

    def __call__(self, s: PrecopyStats) -> Verdict:
        if s.dirty_count < self.TARGET_DIRTY_COUNT:
            return Verdict(Decision.STOP_AND_COPY, f"dirty {s.dirty_count} < {self.TARGET_DIRTY_COUNT} pages")
        if s.iteration >= self.MAX_ITERATIONS:
            return Verdict(Decision.STOP_AND_COPY, f"iteration {s.iteration} >= {self.MAX_ITERATIONS}")
        return Verdict(Decision.CONTINUE, "")

    def describe(self) -> dict:
        return {"name": self.name, "target_dirty_count": self.TARGET_DIRTY_COUNT, "max_iterations": self.MAX_ITERATIONS}


class IterationsThresholdPolicy:
    """The seed patch's knobs: ``--precopy-iterations N --precopy-threshold P``.

    Stop when the dirty count is at or below P, or after N iterations.  Andrew Cooper's
    caution from the thread applies: these "cannot be meaningfully chosen by anyone outside
    of a testing scenario" — which is exactly what this laboratory is for.
    """

    name = "threshold"

    def __init__(self, iterations: int = 5, threshold: int = 50):
        if not isinstance(iterations, int) or iterations < 1:
            raise ConfigError("--precopy-iterations", f"must be an integer >= 1, got {iterations!r}")
        if not isinstance(threshold, int) or threshold < 0:
            raise ConfigError("--precopy-threshold", f"must be an integer >= 0, got {threshold!r}")
        self.iterations = iterations
        self.threshold = threshold

    def __call__(self, s: PrecopyStats) -> Verdict:
        if s.dirty_count <= self.threshold:
            return Verdict(Decision.STOP_AND_COPY, f"dirty {s.dirty_count} <= threshold {self.threshold}")
        if s.iteration >= self.iterations:
            return Verdict(Decision.STOP_AND_COPY, f"iteration {s.iteration} >= {self.iterations}")
        return Verdict(Decision.CONTINUE, "")

    def describe(self) -> dict:
        return {"name": self.name, "precopy_iterations": self.iterations, "precopy_threshold": self.threshold}


POLICIES = {"xen": XenDefaultPolicy, "threshold": IterationsThresholdPolicy}


def make_policy(name: str = "xen", *, precopy_iterations: int | None = None, precopy_threshold: int | None = None):
    """Build a built-in policy by CLI name.

    Giving ``--precopy-iterations``/``--precopy-threshold`` selects the ``threshold`` policy
    (unset knobs take Xen's defaults, 5 and 50).

    Raises:
        ConfigError: unknown name or invalid/contradictory parameters.
    """
    knobs = precopy_iterations is not None or precopy_threshold is not None
    if name == "xen" and knobs:
        name = "threshold"
    if name == "xen":
        return XenDefaultPolicy()
    if name == "threshold":
        return IterationsThresholdPolicy(
            5 if precopy_iterations is None else precopy_iterations,
            50 if precopy_threshold is None else precopy_threshold,
        )
    raise ConfigError("--policy", f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")


def call_policy(policy, stats: PrecopyStats) -> Verdict:
    """Consult ``policy`` and normalise its answer.

    Raises:
        PolicyError: the policy raised, or returned something that is not a decision.
    """
    try:
        out = policy(stats)
    except Exception as err:
        raise PolicyError(f"policy {getattr(policy, 'name', policy)!r} raised {type(err).__name__}: {err}") from err
    if isinstance(out, Verdict):
        verdict = out
    elif isinstance(out, Decision):
        verdict = Verdict(out, "")
    elif isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Decision):
        verdict = Verdict(out[0], str(out[1]))
    else:
        raise PolicyError(f"policy {getattr(policy, 'name', policy)!r} returned {out!r}, not a Decision")
    if not isinstance(verdict.decision, Decision):
        raise PolicyError(f"policy returned {verdict.decision!r}, not a Decision")
    return verdict


def estimate_downtime_s(dirty_pages: int, bandwidth_Bps: float, page_size: int = 4096) -> float:
    """Time to send ``dirty_pages`` at ``bandwidth_Bps`` (inf when nothing was measured)."""
    if dirty_pages <= 0:
        return 0.0
    if bandwidth_Bps <= 0:
        return math.inf
    return dirty_pages * page_size / bandwidth_Bps
