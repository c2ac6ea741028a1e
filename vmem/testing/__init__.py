"""Testing your own workloads and policies with vmem: assertion helpers, and a pytest
plugin (:mod:`vmem.testing.plugin`, loaded automatically once vmem is installed) with
fixtures and markers.  docs/bench.md ("pytest plugin") and docs/examples/test_vmem_example.py.

    from vmem.testing import assert_verified, assert_blackout_below, assert_converged_within

    def test_my_workload(vmem_guest, vmem_migrate):
        report = vmem_migrate(vmem_guest("mymod:Stripes", size="32M", every=16), mode="precopy")
        assert_verified(report)
        assert_converged_within(report, rounds=6)

Every helper takes a report dict (docs/report.md) and raises AssertionError whose message
says what the report shows (outcome, reason, the figure), so a failure needs no debugger.
"""
from __future__ import annotations

__all__ = ["assert_verified", "assert_blackout_below", "assert_downtime_below", "assert_converged_within",
           "feature_missing"]


def _what(report: dict) -> str:
    return f"outcome {report.get('outcome')!r}, reason {report.get('reason')!r}"


def assert_verified(report: dict) -> None:
    """The migration completed, the destination's RAM equals the source's at the pause
    (digests) and the destination guest passed its own ledger check."""
    if report.get("outcome") != "completed":
        raise AssertionError(f"migration did not complete: {_what(report)}")
    if report.get("verified") is not True:
        v = report.get("verification") or {}
        raise AssertionError(f"migration not verified: digests {v.get('digests')}, guest check {v.get('guest_check')}")


def assert_downtime_below(report: dict, ms: float) -> None:
    """Guest-visible downtime (``downtime_ms``) is below ``ms``."""
    d = report.get("downtime_ms")
    if d is None or not d < ms:
        raise AssertionError(f"downtime {d} ms is not below {ms} ms ({_what(report)})")


def assert_blackout_below(report: dict, ms: float) -> None:
    """The longest gap the guest felt (``blackout_ms``, downtime included) is below ``ms``."""
    b = report.get("blackout_ms")
    if b is None or not b < ms:
        raise AssertionError(f"blackout {b} ms (at {report.get('blackout_at_s')} s after the pause) is not below "
                             f"{ms} ms ({_what(report)})")


def assert_converged_within(report: dict, rounds: int) -> None:
    """The migration completed after at most ``rounds`` pre-copy rounds (the stop-and-copy
    or post-copy switch not counted); the message lists the dirty pages of every round and
    the policy's reason for stopping."""
    pre = [r for r in report.get("rounds") or [] if r.get("kind") == "precopy"]
    if report.get("outcome") != "completed":
        raise AssertionError(f"migration did not complete: {_what(report)}")
    if len(pre) > rounds:
        raise AssertionError(f"{len(pre)} pre-copy rounds, more than {rounds}; dirty pages per round "
                             f"{[r.get('dirty_pages') for r in pre]}; policy said {report.get('reason')!r}")


def feature_missing(*names: str) -> str:
    """Why the kernel lacks one of the named features (``vmem doctor`` names, or short UFFD
    names such as ``WP_ASYNC``), or "" when all are there.

    Raises:
        ValueError: a name vmem does not know (a typo must not turn into a silent skip).
    """
    from vmem.features import probe_features

    features = probe_features()
    for name in names:
        f = features.get(name) or features.get(f"UFFD_FEATURE_{name}")
        if f is None:
            raise ValueError(f"unknown kernel feature {name!r}; known: {', '.join(features)}")
        if not f.available:
            return f"kernel lacks {f.name}: {f.detail}"
    return ""
