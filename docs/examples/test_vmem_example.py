"""An example of testing with vmem's pytest plugin: copy this file into your project.

With vmem installed (``pip install vmem`` or a wheel) the plugin is loaded by pytest
automatically: no conftest needed.  Run: ``pytest test_vmem_example.py``.
"""
import pytest

from vmem.testing import assert_blackout_below, assert_converged_within, assert_verified


def test_hotcold_guest_migrates_verified_and_converges(vmem_guest, vmem_migrate):
    guest = vmem_guest("hotcold", size="32M", rate=5000)
    report = vmem_migrate(guest, mode="precopy", policy="xen")
    assert_verified(report)
    assert_converged_within(report, rounds=5)      # Xen's default stops after 5 iterations at most
    assert_blackout_below(report, ms=10_000)       # a generous bound: this checks the figure exists


@pytest.mark.vmem_kernel("userfaultfd", "MINOR_SHMEM")
def test_postcopy_under_a_policy_that_never_precopies(vmem_guest, vmem_migrate):
    report = vmem_migrate(vmem_guest("uniform", size="16M", rate=2000), mode="postcopy")
    assert_verified(report)
    assert report["mode"] == "postcopy" and report["postcopy"]["missing"] == 0


@pytest.mark.vmem_alone   # a timing figure: under pytest-xdist nothing else of vmem runs meanwhile
def test_a_busy_guest_sends_more_than_an_idle_one(vmem_guest, vmem_migrate):
    idle = vmem_migrate(vmem_guest("idle", size="16M"))
    busy = vmem_migrate(vmem_guest("uniform", size="16M", rate=20000))
    assert_verified(idle)
    assert_verified(busy)
    assert busy["pages_sent"] > idle["pages_sent"]  # the busy guest's rounds resend what it dirtied
