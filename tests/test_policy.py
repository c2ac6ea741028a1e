"""Built-in precopy policies: table-driven decisions on synthetic stats."""
from __future__ import annotations

import pytest

from vmem.errors import ConfigError, PolicyError
from vmem.policy import (
    Decision,
    IterationsThresholdPolicy,
    PrecopyStats,
    Verdict,
    XenDefaultPolicy,
    call_policy,
    estimate_downtime_s,
    make_policy,
)


def stats(iteration, dirty, **kw):
    base = dict(iteration=iteration, total_written=1000, dirty_count=dirty, guest_pages=262144, elapsed_s=1.0,
                round_s=0.1, bandwidth_Bps=1e9, dirty_rate_pps=1000.0)
    base.update(kw)
    return PrecopyStats(**base)


@pytest.mark.parametrize(
    "iteration,dirty,expected",
    [
        (1, 100000, Decision.CONTINUE),
        (1, 50, Decision.CONTINUE),        # not < 50
        (1, 49, Decision.STOP_AND_COPY),
        (1, 0, Decision.STOP_AND_COPY),
        (4, 100000, Decision.CONTINUE),
        (5, 100000, Decision.STOP_AND_COPY),
        (9, 100000, Decision.STOP_AND_COPY),
    ],
)
def test_xen_default(iteration, dirty, expected):
    v = call_policy(XenDefaultPolicy(), stats(iteration, dirty))
    assert v.decision == expected
    if expected == Decision.STOP_AND_COPY:
        assert v.reason


@pytest.mark.parametrize(
    "n,p,iteration,dirty,expected",
    [
        (3, 100, 1, 101, Decision.CONTINUE),
        (3, 100, 1, 100, Decision.STOP_AND_COPY),   # <= threshold
        (3, 100, 2, 5000, Decision.CONTINUE),
        (3, 100, 3, 5000, Decision.STOP_AND_COPY),
        (1, 0, 1, 5000, Decision.STOP_AND_COPY),     # one round only
        (10, 0, 9, 1, Decision.CONTINUE),
        (10, 0, 9, 0, Decision.STOP_AND_COPY),
    ],
)
def test_iterations_threshold(n, p, iteration, dirty, expected):
    assert call_policy(IterationsThresholdPolicy(n, p), stats(iteration, dirty)).decision == expected


def test_make_policy_selects_threshold_when_knobs_given():
    p = make_policy("xen", precopy_iterations=3)
    assert isinstance(p, IterationsThresholdPolicy) and p.iterations == 3 and p.threshold == 50
    assert isinstance(make_policy("xen"), XenDefaultPolicy)


@pytest.mark.parametrize("kw,param", [({"precopy_iterations": 0}, "--precopy-iterations"),
                                      ({"precopy_threshold": -1}, "--precopy-threshold")])
def test_bad_knobs_name_the_parameter(kw, param):
    with pytest.raises(ConfigError) as info:
        make_policy("threshold", **kw)
    assert info.value.parameter == param


def test_unknown_policy():
    with pytest.raises(ConfigError, match="unknown policy"):
        make_policy("nope")


def test_call_policy_normalises_and_rejects_garbage():
    assert call_policy(lambda s: Decision.ABORT, stats(1, 1)) == Verdict(Decision.ABORT, "")
    assert call_policy(lambda s: (Decision.CONTINUE, "why"), stats(1, 1)).reason == "why"
    with pytest.raises(PolicyError, match="not a Decision"):
        call_policy(lambda s: "stop", stats(1, 1))

    def boom(s):
        raise RuntimeError("kaput")

    with pytest.raises(PolicyError, match="kaput"):
        call_policy(boom, stats(1, 1))


def test_estimate_downtime():
    assert estimate_downtime_s(0, 0) == 0.0
    assert estimate_downtime_s(1000, 4096e3) == pytest.approx(1.0)
    assert estimate_downtime_s(1, 0) == float("inf")
