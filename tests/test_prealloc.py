"""``--prealloc``: the destination allocates the guest's RAM before READY (QEMU's -mem-prealloc).

What must hold: the allocation really happens (the memfd holds every page afterwards); a
post-copy guest on preallocated RAM still traps on every page it has not received (the
pages exist, zeroed, in the page cache -- a MINOR fault, not a MISSING one -- and a guest
that saw those zeros would fail its checks); pre-copy and hybrid migrations are verified as
without it; and a destination that cannot allocate, or does not, refuses before any page
moves, with the source guest running on.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from transport import channel_pair
from vmem.format import control, wire
from vmem.migration.local import run_local_migration
from vmem.migration.source import MigrationOptions, migrate
from vmem.pages import PAGE_SIZE
from vmem.migration.inject import PREALLOC_ERRNO_ENV
from vmem.ram import preallocate

from test_postcopy import assert_migrated, postcopy_features_missing

SIZE = 32 << 20


def _allocated_bytes(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def test_preallocate_allocates_every_page():
    fd = os.memfd_create("vmem-test-prealloc")
    try:
        os.ftruncate(fd, 64 * PAGE_SIZE)
        assert _allocated_bytes(fd) == 0
        s = preallocate(fd, 64 * PAGE_SIZE)
        assert s >= 0
        assert _allocated_bytes(fd) == 64 * PAGE_SIZE
        assert os.pread(fd, 64 * PAGE_SIZE, 0) == bytes(64 * PAGE_SIZE)  # allocated zero pages
    finally:
        os.close(fd)


@pytest.mark.skipif(bool(postcopy_features_missing()), reason=postcopy_features_missing() or "-")
@pytest.mark.parametrize("postcopy,mode", [("pure", "postcopy"), ("after-precopy", "hybrid")], ids=["pure", "hybrid"])
def test_postcopy_on_preallocated_ram_still_traps_every_missing_page(boot_guest, postcopy, mode):
    """The checker reads and checks pages while post-copy runs: a page the guest could see
    before it arrived would read as the preallocated zeros and fail its check on the spot."""
    g = boot_guest("checker", SIZE, rate=20000, reads=64)
    time.sleep(0.2)
    report = run_local_migration(g, MigrationOptions(postcopy=postcopy, observe_s=0.3, prealloc=True))
    d = assert_migrated(report, mode)
    assert d["timings_ms"]["setup_destination_prealloc"] > 0
    if mode == "postcopy":
        # the pages were pending on allocated memory, and the guest asked for some of them
        assert d["postcopy"]["pages_pending"] > 0 and d["postcopy"]["pages_demanded"] > 0


def test_precopy_on_preallocated_ram_is_verified(boot_guest):
    g = boot_guest("hotcold", SIZE, rate=5000)
    time.sleep(0.2)
    d = run_local_migration(g, MigrationOptions(observe_s=0.2, prealloc=True)).to_dict()
    assert d["outcome"] == "completed" and d["verified"], d["reason"]
    assert d["verification"]["digests"]["mismatched"] == 0 and d["verification"]["guest_check"]["ok"]
    assert d["timings_ms"]["setup_destination_prealloc"] > 0
    # without the option nothing is preallocated and no such timing is reported
    g2 = boot_guest("idle", SIZE)
    d2 = run_local_migration(g2, MigrationOptions(observe_s=0)).to_dict()
    assert d2["outcome"] == "completed" and "setup_destination_prealloc" not in d2["timings_ms"]


def test_a_destination_that_cannot_preallocate_refuses_before_any_page(boot_guest, monkeypatch):
    monkeypatch.setenv(PREALLOC_ERRNO_ENV, "28")  # ENOSPC, read by the destination process
    g = boot_guest("hotcold", SIZE, rate=5000)
    time.sleep(0.1)
    report = run_local_migration(g, MigrationOptions(observe_s=0, prealloc=True))
    assert report.outcome == "failed"
    assert "cannot preallocate" in report.reason and os.strerror(28) in report.reason, report.reason
    assert "without --prealloc" in report.reason
    assert not report.rounds or all(r.pages_sent == 0 for r in report.rounds)
    assert report.source_guest_state == "running" and g.alive()
    assert g.verify()["ok"]


def test_the_source_refuses_a_destination_that_did_not_preallocate(boot_guest):
    """A destination that ignores the preamble's ``prealloc`` (a vmem that does not know it)
    answers READY without saying it preallocated: the source stops there."""
    g = boot_guest("idle", SIZE)
    src, dst = channel_pair()
    seen = {}

    def old_destination():
        seen["config"] = control.read_preamble(dst.recv_exact)
        dst.send_parts(control.encode_json_control(wire.ControlType.READY, {"guest_pid": 0}))
        try:
            while dst.recv_exact(1):
                pass
        except Exception:
            pass

    t = threading.Thread(target=old_destination, daemon=True)
    t.start()
    try:
        report = migrate(g, src, MigrationOptions(observe_s=0, prealloc=True))
    finally:
        src.close()
        t.join(10)
        dst.close()
    assert seen["config"]["prealloc"] is True
    assert report.outcome == "failed" and "did not preallocate" in report.reason, report.reason
    assert report.source_guest_state == "running" and g.alive()
