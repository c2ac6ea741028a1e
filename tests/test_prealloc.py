"""``--prealloc``: the destination allocates the guest's RAM before READY (QEMU's -mem-prealloc).

What must hold: the allocation really happens (the memfd holds every page afterwards) and
the destination's own mapping of it is filled in (its writes then take no page fault); a
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

import numpy as np
import pytest

from transport import channel_pair
from vmem import _native as nat
from vmem.format import control, wire
from vmem.migration.local import run_local_migration
from vmem.migration.source import MigrationOptions, migrate
from vmem.pages import PAGE_SIZE
from vmem.migration.inject import PREALLOC_ERRNO_ENV, prealloc_failure_from_env
from vmem.ram import GuestRam, preallocate

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


def _present_pages(address: int, npages: int) -> int:
    """Pages of [address, +npages) mapped in this process (/proc/self/pagemap bit 63)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek((address // PAGE_SIZE) * 8)
        entries = f.read(npages * 8)
    return sum(int.from_bytes(entries[i:i + 8], "little") >> 63 for i in range(0, len(entries), 8))


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped-ahead", "not-mapped"])
def test_map_for_writing_fills_this_process_page_tables_and_keeps_contents(mapped):
    """After ``map_for_writing`` every page is mapped here and writing all of them takes no
    page fault; without it (the other arm) the same writes fault once a page -- which is
    what the check exists to catch.  The contents are what the file held."""
    n = 64
    ram = GuestRam.create(n * PAGE_SIZE, name="vmem-test-map")
    try:
        preallocate(ram.fd, n * PAGE_SIZE)
        os.pwrite(ram.fd, b"\xab" * PAGE_SIZE, 7 * PAGE_SIZE)
        assert _present_pages(ram.address, n) == 0  # a fresh mapping: nothing touched yet
        if mapped:
            assert ram.map_for_writing() >= 0
            assert _present_pages(ram.address, n) == n
        src = np.frombuffer(bytes(range(256)) * (PAGE_SIZE // 256), dtype=np.uint8)
        written = range(16, n)  # pages 0-15 are read below: a read fault would map them
        before = _minor_faults()
        for i in written:
            ram.pages[i] = src
        faults = _minor_faults() - before
        if mapped:
            assert faults < len(written) // 4, faults  # numpy's own allocations aside, no page took one
        else:
            assert faults >= len(written), faults
        assert os.pread(ram.fd, PAGE_SIZE, 20 * PAGE_SIZE) == src.tobytes()
        assert bytes(ram.pages[7]) == b"\xab" * PAGE_SIZE and not ram.pages[8].any()
    finally:
        ram.close()


def test_map_for_writing_on_a_kernel_without_the_advice_changes_nothing(monkeypatch):
    """A kernel that does not know the advice answers EINVAL (before Linux 5.14; made to
    happen with an advice number no kernel knows): None, and nothing mapped."""
    from vmem import ram as ram_mod

    monkeypatch.setattr(ram_mod, "MADV_POPULATE_WRITE", 12345)
    ram = GuestRam.create(8 * PAGE_SIZE, name="vmem-test-map-einval")
    try:
        assert ram.map_for_writing() is None
        assert _present_pages(ram.address, 8) == 0
    finally:
        ram.close()


def test_the_prealloc_injection_names_its_step():
    """The test knob fails only the step it names, and refuses a value that names none."""
    assert prealloc_failure_from_env({}) is None
    assert prealloc_failure_from_env({PREALLOC_ERRNO_ENV: "28"}).errno == 28
    assert prealloc_failure_from_env({PREALLOC_ERRNO_ENV: "28"}, step="map") is None
    assert prealloc_failure_from_env({PREALLOC_ERRNO_ENV: "map:12"}) is None
    assert prealloc_failure_from_env({PREALLOC_ERRNO_ENV: "map:12"}, step="map").errno == 12
    for bad in ("0", "map:0", "map:", "fold:12", "x"):
        with pytest.raises(ValueError, match="map:ERRNO"):
            prealloc_failure_from_env({PREALLOC_ERRNO_ENV: bad})


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
    assert d["timings_ms"]["setup_destination_map"] > 0  # the destination's view was mapped ahead too
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
    # RAM mapped ahead: round 0's runs of pages were received straight into it, the later
    # rounds' scattered pages through the staging buffers (both verified above)
    assert d["rounds"][0]["pages_sent"] * 0.9 <= d["pages_in_place"] < d["pages_sent"]
    # without the option nothing is preallocated, no such timing is reported, and every
    # page is staged (a write through a mapping not filled in faults once a page)
    g2 = boot_guest("idle", SIZE)
    d2 = run_local_migration(g2, MigrationOptions(observe_s=0)).to_dict()
    assert d2["outcome"] == "completed" and "setup_destination_prealloc" not in d2["timings_ms"]
    assert "setup_destination_map" not in d2["timings_ms"]
    assert d2["pages_in_place"] == 0 and d2["pages_sent"] > 0


def test_a_page_twice_in_flight_is_placed_in_order():
    """The destination receives a run straight into RAM only if no batch still queued for
    the placer may hold one of its pages: the queued, older copy would land after it."""
    from vmem.migration.destination import _Placer

    n = 4096
    ram = GuestRam.create(n * PAGE_SIZE, name="vmem-test-in-place")
    try:
        digests = np.zeros(n, dtype=np.uint64)
        received = np.zeros(n, dtype=bool)
        placer = _Placer(ram, digests, received)
        placer._test_delay_s = 0.3  # the placer lags: the batch below stays queued a while
        try:
            slot = placer.acquire()
            slot.staging[:3] = 0x5A
            placer.submit(slot, np.array([5, 700, 1500], dtype=np.int64), 3)
            assert placer.pending_overlaps(0, 1024) and placer.pending_overlaps(1024, 2048)
            assert placer.pending_overlaps(1500, 1501) and not placer.pending_overlaps(1501, 4096)
            assert not placer.pending_overlaps(0, 5)
            ram.pages[2048:3072] = 0x33  # received in place meanwhile: its digests come in order
            placer.submit_in_place(2048, 1024)
            assert placer.pending_overlaps(3000, 3001)
            placer.flush()
            assert not placer.pending_overlaps(0, n)
            assert (ram.pages[[5, 700, 1500]] == 0x5A).all()
            assert received[[5, 700, 1500]].all() and received[2048:3072].all() and received.sum() == 1027
            want = nat.digest_page_bytes(bytes([0x33]) * PAGE_SIZE)
            assert (digests[2048:3072] == want).all() and digests[3072] == 0
            assert placer.pages_placed == 1027
        finally:
            placer.stop()
    finally:
        ram.close()


def test_a_kernel_that_cannot_map_ahead_still_preallocates_and_migrates(boot_guest, monkeypatch):
    """MADV_POPULATE_WRITE unknown (EINVAL, before Linux 5.14): the RAM is allocated, not
    mapped ahead, and the migration runs as before -- no timing claims a mapping."""
    monkeypatch.setenv(PREALLOC_ERRNO_ENV, "map:22")
    g = boot_guest("hotcold", SIZE, rate=5000)
    time.sleep(0.1)
    d = run_local_migration(g, MigrationOptions(observe_s=0.1, prealloc=True)).to_dict()
    assert d["outcome"] == "completed" and d["verified"], d["reason"]
    assert d["timings_ms"]["setup_destination_prealloc"] > 0
    assert "setup_destination_map" not in d["timings_ms"]
    assert d["pages_in_place"] == 0  # nothing received through a mapping that faults a page at a time


@pytest.mark.parametrize("knob,errno_,says", [("28", 28, "cannot preallocate"),
                                               ("map:12", 12, "cannot map the preallocated")],
                         ids=["allocation-ENOSPC", "mapping-ENOMEM"])
def test_a_destination_that_cannot_preallocate_refuses_before_any_page(boot_guest, monkeypatch, knob, errno_, says):
    monkeypatch.setenv(PREALLOC_ERRNO_ENV, knob)  # read by the destination process
    g = boot_guest("hotcold", SIZE, rate=5000)
    time.sleep(0.1)
    report = run_local_migration(g, MigrationOptions(observe_s=0, prealloc=True))
    assert report.outcome == "failed"
    assert says in report.reason and os.strerror(errno_) in report.reason, report.reason
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
