"""Tests for vmem.pages: the one page-list -> runs helper and its inverses."""
from __future__ import annotations

import numpy as np
import pytest

from vmem.pages import merge_pages, merge_sorted_pages, page_runs, ranges_to_pages


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
