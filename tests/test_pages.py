"""Tests for vmem.pages: the one page-list -> runs helper and its inverses."""
from __future__ import annotations

import os

import numpy as np
import pytest

from vmem.pages import count_runs, hole_runs, merge_pages, merge_sorted_pages, page_runs, ranges_to_pages, runs_to_pages


@pytest.mark.parametrize("pages, runs", [
    ([], []),
    ([5], [(5, 6)]),
    ([0, 1, 2, 3], [(0, 4)]),
    ([0, 2, 4], [(0, 1), (2, 3), (4, 5)]),
    ([1, 2, 3, 7, 8, 10, 15, 16, 17, 18], [(1, 4), (7, 9), (10, 11), (15, 19)]),
    ([99], [(99, 100)]),
])
def test_page_runs(pages, runs):
    starts, ends = page_runs(np.array(pages, dtype=np.int64), 100)
    assert list(zip(starts.tolist(), ends.tolist())) == runs
    assert starts.dtype == ends.dtype == np.int64
    # and back: the runs expand to exactly the pages
    assert ranges_to_pages(starts, ends).tolist() == pages


@pytest.mark.parametrize("pages", [[3, 2], [1, 1], [-1, 0], [0, 100], [[1, 2]], [0.5]])
def test_page_runs_rejects(pages):
    with pytest.raises(ValueError):
        page_runs(np.array(pages), 100)


def test_merge_sorted_pages_is_the_sorted_union():
    """Against merge_pages (a sort of the concatenation) on random sorted unique sets: empty
    either side, all new, all already there, interleaved, at both ends."""
    rng = np.random.default_rng(7)
    cases = [(np.empty(0, np.int64), np.array([3, 9])), (np.array([1, 5]), np.empty(0, np.int64)),
             (np.array([2, 4, 6]), np.array([0, 7])), (np.array([2, 4, 6]), np.array([2, 6])),
             (np.array([10]), np.array([1, 2, 3, 10, 11]))]
    for _ in range(200):
        a = np.unique(rng.integers(0, 5000, rng.integers(0, 3000)))
        b = np.unique(rng.integers(0, 5000, rng.integers(0, 300)))
        cases.append((a, b))
    for a, b in cases:
        got = merge_sorted_pages(a, b)
        assert got.dtype == np.int64
        assert np.array_equal(got, merge_pages(a, b)), (a, b)


def test_merge_sorted_pages_does_not_copy_when_nothing_is_added():
    a = np.arange(0, 1000, 3, dtype=np.int64)
    assert merge_sorted_pages(a, a[10:20]) is a  # every page already in a: a itself, no 2 MiB copy in the downtime
    assert merge_sorted_pages(a, np.empty(0, np.int64)) is a
    assert merge_sorted_pages(a, np.array([1])) is not a


@pytest.mark.parametrize("runs,npages,holes", [
    ([], 10, [[0, 10]]), ([[0, 10]], 10, []), ([[2, 4], [6, 7]], 10, [[0, 2], [4, 6], [7, 10]]),
    ([[0, 3], [3, 5]], 5, []), ([[0, 1]], 3, [[1, 3]])])
def test_hole_runs_is_the_complement(runs, npages, holes):
    got = hole_runs(np.array(runs, dtype=np.int64).reshape(-1, 2), npages)
    assert got.dtype == np.int64 and got.tolist() == holes
    both = np.union1d(runs_to_pages(np.array(runs, dtype=np.int64).reshape(-1, 2)), runs_to_pages(got))
    assert np.array_equal(both, np.arange(npages))  # together they cover every page once


def test_data_runs_in_finds_only_the_holes_written_since():
    """GuestRam.data_runs_in: what pure post-copy asks at the pause instead of a tracker scan."""
    from vmem.ram import GuestRam

    with GuestRam.create(64 * 4096) as ram:
        ram.pages[[0, 1, 2, 10, 11, 40]] = 1
        holes = hole_runs(ram.data_runs(), ram.npages)
        assert holes.tolist() == [[3, 10], [12, 40], [41, 64]]
        assert ram.data_runs_in(holes).tolist() == []  # nothing written since: no run
        ram.pages[[5, 6, 20, 63]] = 2  # into three holes
        ram.pages[[1, 40]] = 3  # pages that held data already: not in any hole
        assert ram.data_runs_in(holes).tolist() == [[5, 7], [20, 21], [63, 64]]
        assert ram.data_runs_in(holes[:1]).tolist() == [[5, 7]]  # only the holes asked about
        assert ram.data_runs_in(np.array([[0, 64]])).tolist() == ram.data_runs().tolist()
        assert ram.data_runs_in(np.empty((0, 2), np.int64)).tolist() == []


def _present_in_our_page_tables(ram) -> np.ndarray:
    """Which pages of ``ram``'s mapping this process's page tables map now
    (/proc/self/pagemap bit 63)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(ram.address // 4096 * 8)
        entries = np.frombuffer(f.read(ram.npages * 8), dtype="<u8")
    return (entries >> np.uint64(63)).astype(bool)


def test_populate_mapping_maps_the_data_pages_and_allocates_no_hole():
    """GuestRam.populate_mapping: the pages that hold data are in our page tables afterwards
    (a first migration then reads them without a fault each), the holes stay holes, and the
    contents do not change."""
    from vmem.ram import GuestRam

    with GuestRam.create(64 * 4096) as ram:
        for page in (0, 1, 2, 10, 11, 40):  # written past our mapping, as a guest process does
            os.pwrite(ram.fd, bytes([page + 1]) * 4096, page * 4096)
        assert not _present_in_our_page_tables(ram).any()
        data = ram.data_runs().tolist()
        assert ram.populate_mapping() == 6
        assert np.flatnonzero(_present_in_our_page_tables(ram)).tolist() == [0, 1, 2, 10, 11, 40]
        assert ram.data_runs().tolist() == data  # no hole was allocated by the reads
        assert [int(ram.pages[p, 0]) for p in (0, 2, 11, 40)] == [1, 3, 12, 41]
        assert ram.populate_mapping(np.array([[3, 5]])) == 2  # given runs: exactly those
        assert _present_in_our_page_tables(ram)[[3, 4]].all()


def test_populate_mapping_on_a_kernel_without_the_advice_changes_nothing(monkeypatch):
    """Before Linux 5.14 madvise refuses MADV_POPULATE_READ (EINVAL): 0 pages, no error."""
    import vmem.ram as ram_mod

    monkeypatch.setattr(ram_mod, "MADV_POPULATE_READ", 0x7FFF)  # an advice no kernel knows
    with ram_mod.GuestRam.create(16 * 4096) as ram:
        os.pwrite(ram.fd, b"x" * 4096, 0)
        assert ram.populate_mapping() == 0
        assert not _present_in_our_page_tables(ram).any()


def test_a_booted_guests_data_pages_are_mapped_in_the_booting_process(boot_guest):
    """ProcessGuest.boot populates its mapping of the guest's data pages (only those): the
    guest's first migration out of this process does not fault on every page."""
    g = boot_guest("idle", size=8 << 20, fill=False)
    data = runs_to_pages(g.ram.data_runs())
    assert 0 < len(data) < g.ram.npages  # a fresh guest with holes
    present = _present_in_our_page_tables(g.ram)
    assert present[data].all()
    assert runs_to_pages(g.ram.data_runs()).tolist() == data.tolist()  # no hole allocated


def test_a_failed_populate_leaves_the_boot_alone(monkeypatch, boot_guest, caplog):
    """The populate is only for speed: when it fails the guest still boots, with a warning."""
    from vmem.errors import VmemError
    from vmem.ram import GuestRam

    def fail(self, runs=None):
        raise VmemError("injected: populate failed")

    monkeypatch.setattr(GuestRam, "populate_mapping", fail)
    with caplog.at_level("WARNING", logger="vmem.guest"):
        g = boot_guest("idle", size=8 << 20)
    assert g.alive()
    assert "not populated ahead" in caplog.text and "injected" in caplog.text


def test_count_runs_counts_what_page_runs_lists():
    """count_runs(mask) == the number of runs page_runs lists for the same pages, at the
    edges (first / last page set, all, none, empty) and on scattered masks."""
    rng = np.random.default_rng(5)
    masks = [np.zeros(0, bool), np.zeros(7, bool), np.ones(7, bool), np.array([True]), np.array([False]),
             np.array([True, False, True]), np.array([False, True, True, False]), np.array([False, False, True])]
    masks += [rng.random(4096) < p for p in (0.01, 0.3, 0.5, 0.9, 0.999)]
    for m in masks:
        assert count_runs(m) == len(page_runs(np.flatnonzero(m), len(m))[0]), m
    with pytest.raises(ValueError, match="one-dimensional"):
        count_runs(np.zeros((2, 2), bool))
