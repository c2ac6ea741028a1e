"""Tests for vmem.pages: the one page-list -> runs helper and its inverses."""
from __future__ import annotations

import numpy as np
import pytest

from vmem.pages import page_runs, ranges_to_pages


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
