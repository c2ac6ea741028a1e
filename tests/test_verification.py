"""The verifier catches what placement gets wrong: failure injection (vmem.migration.inject).

"Verified" compares digests of the source's RAM at the pause with digests the destination
takes of its guest's RAM *after* each page was placed (docs/stream.md, docs/postcopy.md).
Each test here breaks one page on purpose -- dropped, written at the wrong offset, a byte
flipped after the write, or (post-copy) an old copy served by the source -- and checks the
documented outcome, with and without the destination guest's own check: ``failed``, a
reason naming the page, and the source guest running with intact RAM (after a post-copy
switch: paused with intact RAM).  The conftest fixture checks nothing leaked.

Digests taken from the receive buffer (the code before issue 11) pass the wrong-offset and
flip cases: the buffer was right, the RAM was not.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from guests.memory import ledger_page_count
from vmem import _native as nat
from vmem.migration import inject
from vmem.migration.local import run_local_migration
from vmem.migration.source import MigrationOptions

from test_postcopy import postcopy_features_missing

SIZE = 32 << 20
NPAGES = SIZE // 4096
#: a data page in the middle of RAM (round 0 and the post-copy push both carry it)
PAGE = NPAGES // 2 + 3

needs_postcopy = pytest.mark.skipif(bool(postcopy_features_missing()), reason=postcopy_features_missing() or "-")


def _assert_failed_on(report, page: int, *, switched: bool, guest) -> None:
    d = report.to_dict()
    assert d["outcome"] == "failed", d["reason"]
    assert f"(first: [{page}" in d["reason"], d["reason"]
    assert d["verification"]["digests"]["first_mismatched"][0] == page
    assert d["verified"] is False
    assert guest.alive()
    assert d["source_guest_state"] == ("paused" if switched else "running")
    assert d["verification"]["source_guest_check"]["ok"], d["verification"]["source_guest_check"]


@pytest.mark.parametrize("guest_check", [True, False], ids=["guest-check", "no-guest-check"])
@pytest.mark.parametrize("mode", ["off", pytest.param("pure", marks=needs_postcopy),
                                  pytest.param("after-precopy", marks=needs_postcopy)],
                         ids=["precopy", "postcopy", "hybrid"])
@pytest.mark.parametrize("fault", ["drop", "wrong-offset", "flip"])
def test_placement_fault_fails_verification(boot_guest, monkeypatch, fault, mode, guest_check):
    """The destination mishandles one page as it places it (pre-copy: the staged path;
    post-copy: the C placement; hybrid: both, into RAM registered with userfaultfd); the
    digests of its RAM say so."""
    g = boot_guest("hotcold", SIZE, rate=5000)
    time.sleep(0.1)
    monkeypatch.setenv(inject.PLACEMENT_FAULT_ENV, f"{fault}:{PAGE}")  # read by the destination process
    report = run_local_migration(g, MigrationOptions(postcopy=mode, guest_check=guest_check, observe_s=0))
    _assert_failed_on(report, PAGE, switched=mode != "off", guest=g)


def test_flip_after_an_in_place_receive_fails_verification(boot_guest, monkeypatch):
    """With RAM mapped ahead (--prealloc) round 0's runs are received straight into RAM,
    not staged and written: a byte flipped there after the receive fails the digests too."""
    g = boot_guest("idle", SIZE)
    time.sleep(0.1)
    monkeypatch.setenv(inject.PLACEMENT_FAULT_ENV, f"flip:{PAGE}")  # read by the destination process
    report = run_local_migration(g, MigrationOptions(prealloc=True, observe_s=0))
    assert report.pages_in_place >= PAGE  # the path under test ran (and carried PAGE: one run)
    _assert_failed_on(report, PAGE, switched=False, guest=g)


@pytest.fixture
def stale(monkeypatch):
    """Install a StalePages hook in this (the source's) process for one test."""

    def install(**kw) -> inject.StalePages:
        hook = inject.StalePages(**kw)
        monkeypatch.setattr(inject, "stale_pages", hook)
        return hook

    return install


@needs_postcopy
@pytest.mark.parametrize("guest_check", [True, False], ids=["guest-check", "no-guest-check"])
def test_stale_page_in_postcopy_fails_verification(boot_guest, stale, guest_check):
    """The source serves one page still to come as it was when the migration started."""
    hook = stale(which="one")
    g = boot_guest("hotcold", SIZE, rate=20000)
    time.sleep(0.1)
    report = run_local_migration(g, MigrationOptions(postcopy="pure", guest_check=guest_check, observe_s=0))
    assert len(hook.applied) == 1, "no page changed between the snapshot and the pause"
    _assert_failed_on(report, int(hook.applied[0]), switched=True, guest=g)


@needs_postcopy
def test_checker_meets_a_stale_page(boot_guest, stale):
    """The checker guest reads pages while post-copy runs: stale data pages (under a current
    ledger) stop it on the spot, and the migration fails with the checker's own message."""
    hook = stale(which="all", first_page=1 + ledger_page_count(NPAGES))
    g = boot_guest("checker", SIZE, rate=20000, reads=64)
    time.sleep(0.2)
    report = run_local_migration(g, MigrationOptions(postcopy="pure", observe_s=0))
    assert len(hook.applied) > 0
    assert report.outcome == "failed"
    assert "checker:" in report.reason and "do not match the ledger (torn or stale)" in report.reason, report.reason
    assert report.source_guest_state == "paused" and g.alive()
    assert report.verification["source_guest_check"]["ok"]


@pytest.mark.parametrize("fault", [None, "drop", "wrong-offset", "flip"])
def test_place_pages_digests_what_the_ram_file_holds(fault):
    """The placement primitive itself: digests are of the RAM file after the write (read
    through this process's mapping of it), not of the buffer the pages came in."""
    import mmap

    fd = nat.memfd_create("vmem-test-place")
    try:
        os.ftruncate(fd, 8 * 4096)
        view = mmap.mmap(fd, 8 * 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        view_arr = np.frombuffer(view, dtype=np.uint8)
        try:
            received = np.random.default_rng(7).integers(0, 256, (4, 4096), dtype=np.uint8)
            pages = np.arange(2, 6, dtype=np.int64)
            digests = np.zeros(8, dtype=np.uint64)
            with pytest.raises(ValueError, match="view"):
                nat.place_pages(fd, -1, 0, received, pages, digests=digests)  # digests need the view
            nat.set_place_fault(fault, 3)
            try:
                nat.place_pages(fd, -1, 0, received, pages, digests=digests, view=view_arr.ctypes.data)
            finally:
                nat.set_place_fault(None)
            ram = np.frombuffer(os.pread(fd, 8 * 4096, 0), dtype=np.uint8).reshape(8, 4096)
            for p in range(8):
                want = nat.digest_page_bytes(ram[p].tobytes()) if p in pages else 0
                assert int(digests[p]) == want, p
            as_received = [nat.digest_page_bytes(received[i].tobytes()) for i in range(4)]
            assert (digests[pages] == as_received).tolist() == [True, fault is None, True, True]
        finally:
            del view_arr
            view.close()
    finally:
        os.close(fd)


def test_placement_fault_variable_is_checked():
    """A malformed injection request fails loudly (a silent no-op would make a test pass)."""
    assert inject.placement_fault_from_env({}) is None
    assert inject.placement_fault_from_env({inject.PLACEMENT_FAULT_ENV: "flip:7"}) == ("flip", 7)
    for bad in ("flip", "flip:x", "smash:3", ":3"):
        with pytest.raises(ValueError, match=inject.PLACEMENT_FAULT_ENV):
            inject.placement_fault_from_env({inject.PLACEMENT_FAULT_ENV: bad})
