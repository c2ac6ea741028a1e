"""Tests for guests.memory (stamps, ledger, verify) and guests.workload (user API, built-ins).

Pure numpy: RAM is np.zeros, time is a fake virtual clock, so pacing is checked by exact
arithmetic rather than wall-clock measurements.
"""
from __future__ import annotations

import json
import math
import pathlib
import re
import sys
import threading
import types

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from guests.memory import (
    HEADER_MAGIC, LAYOUT_VERSION, PAGE_SIZE, STAMP_TAG, GuestMemory, ledger_page_count, page_stamp,
)
from guests.workload import (
    BUILTIN_WORKLOADS, MAX_IDLE_S, HotColdWorkload, PacedWorkload, PhasedWorkload,
    SweepWorkload, UniformWorkload, Workload, ZipfWorkload, load_workload, parse_params,
)
from vmem.errors import ConfigError, GuestError

NPAGES = 2048  # 8 MiB: header + 2 ledger pages + 2045 data pages


class FakeClock:
    """Virtual seconds in integer milliseconds, so that clock values are exact."""

    def __init__(self):
        self.ticks_ms = 0

    def __call__(self) -> float:
        return self.ticks_ms / 1000


def make_mem(npages: int = NPAGES) -> GuestMemory:
    return GuestMemory(np.zeros((npages, PAGE_SIZE), np.uint8)).format()


def drive(wl: Workload, clock: FakeClock, until_ms: int) -> None:
    """Runtime stand-in: one clock tick per ms, stepping while steps say "call again now".

    An unpaced workload (rate=0) always says "again"; it gets 2 steps per tick.
    """
    while True:
        if getattr(wl, "unpaced", False):
            wl.step(), wl.step()
        else:
            for _ in range(10_000):
                if wl.step() != 0.0:
                    break
            else:
                raise AssertionError("step() never returned an idle time")
        if clock.ticks_ms >= until_ms:
            return
        clock.ticks_ms += 1


def expected_due(rate_pps: float, elapsed_s: float) -> int:
    return math.floor(rate_pps * elapsed_s + 1e-6)


# ---------------------------------------------------------------------------------------
# guests.memory
# ---------------------------------------------------------------------------------------

def test_layout_and_header():
    mem = make_mem()
    assert mem.npages == NPAGES
    assert mem.first_data_page == 1 + ledger_page_count(NPAGES) == 3
    assert mem.data_pages == NPAGES - 3
    assert mem.ledger.shape == (NPAGES,) and mem.ledger.dtype == np.uint32
    assert mem.words.shape == (NPAGES, 512) and mem.words.dtype == np.uint64
    assert list(mem.words[0, :4]) == [HEADER_MAGIC, LAYOUT_VERSION, NPAGES, 3]
    assert not mem.words[0, 4:].any()
    # The ledger is a view into the ledger pages of RAM (so it migrates with RAM).
    mem.write_pages([5])
    assert mem.ram[1].view(np.uint32)[5] == 1
    assert np.shares_memory(mem.ledger, mem.ram)


def test_attach_accepts_formatted_copy_and_rejects_bad_headers():
    mem = make_mem()
    mem.fill_all()
    copy = GuestMemory(mem.ram.copy()).attach()
    assert np.array_equal(copy.ledger, mem.ledger)
    assert copy.verify().ok

    with pytest.raises(GuestError, match="magic"):
        GuestMemory(np.zeros((NPAGES, PAGE_SIZE), np.uint8)).attach()
    ram = mem.ram.copy()
    ram[0].view(np.uint64)[1] = LAYOUT_VERSION + 1
    with pytest.raises(GuestError, match="layout version"):
        GuestMemory(ram).attach()
    bigger = np.zeros((NPAGES + 1, PAGE_SIZE), np.uint8)
    bigger[:NPAGES] = mem.ram
    with pytest.raises(GuestError, match="pages"):
        GuestMemory(bigger).attach()


def test_ram_shape_and_size_are_checked():
    with pytest.raises(ConfigError) as err:
        GuestMemory(np.zeros((2, PAGE_SIZE), np.uint8))
    assert err.value.parameter == "npages"
    GuestMemory(np.zeros((3, PAGE_SIZE), np.uint8)).format()  # smallest: one data page
    with pytest.raises(ConfigError):
        GuestMemory(np.zeros((8, PAGE_SIZE), np.uint16))
    with pytest.raises(ConfigError):
        GuestMemory(np.zeros((8, 1024), np.uint8))


def test_page_stamp_structure():
    stamp = page_stamp(1234, 7).view(np.uint64)
    assert stamp[0] == (STAMP_TAG << 48) | 1234
    assert stamp[1] == 7
    assert len(np.unique(stamp[2:])) == 510  # not a constant fill
    assert not page_stamp(1234, 0).any()
    assert (page_stamp(1234, 7) != page_stamp(1234, 8)).sum() > 4000
    assert (page_stamp(1234, 7) != page_stamp(1235, 7)).sum() > 4000


def test_write_pages_bumps_dedupes_and_stamps():
    mem = make_mem()
    first = mem.first_data_page
    assert mem.write_pages(np.array([first + 5, first + 5, first + 9])) == 2
    assert mem.pages_written == 2
    assert mem.ledger[first + 5] == 1 and mem.ledger[first + 9] == 1
    mem.write_pages([first + 5])
    assert mem.ledger[first + 5] == 2
    assert np.array_equal(mem.ram[first + 5], page_stamp(first + 5, 2))
    assert not mem.ram[first + 6].any()
    assert mem.verify().ok


@pytest.mark.parametrize("bad", [[0], [2], [NPAGES], [-1]])
def test_write_pages_rejects_non_data_pages_and_writes_nothing(bad):
    mem = make_mem()
    before = mem.ram.copy()
    with pytest.raises(ValueError):
        mem.write_pages([mem.first_data_page + 1] + bad)
    assert np.array_equal(mem.ram, before)


def test_version_wraps_past_zero():
    mem = make_mem()
    page = mem.first_data_page + 1
    mem.ledger[page] = 0xFFFFFFFF
    mem.ram[page] = page_stamp(page, 0xFFFFFFFF)
    assert mem.verify().ok
    mem.write_pages([page])
    assert mem.ledger[page] == 1  # 0 is reserved for "never written"
    assert np.array_equal(mem.ram[page], page_stamp(page, 1))
    assert mem.verify().ok


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 99), min_size=1, max_size=20), max_size=15))
def test_ledger_counts_writes(batches):
    mem = make_mem(128)
    first = mem.first_data_page
    counts = np.zeros(mem.npages, np.uint32)
    for batch in batches:
        pages = np.array(batch) + first
        mem.write_pages(pages)
        counts[np.unique(pages)] += 1
    assert np.array_equal(mem.ledger, counts)
    assert mem.verify().ok


def test_fill_all_then_verify_in_any_chunking():
    mem = make_mem()
    mem.fill_all(chunk_pages=100)
    assert (mem.ledger[mem.first_data_page:] == 1).all()
    assert not mem.ledger[:mem.first_data_page].any()
    for chunk in (1, 7, 1024, 100_000):
        result = mem.verify(chunk_pages=chunk)
        assert result.ok and result.pages_checked == mem.data_pages and result.bad_pages == 0


def test_unfilled_ram_verifies_as_zero_pages():
    assert make_mem().verify().ok


@pytest.fixture
def filled():
    mem = make_mem()
    mem.fill_all()
    mem.write_pages(np.arange(mem.first_data_page, mem.first_data_page + 50))
    assert mem.verify().ok
    return mem


def test_verify_detects_flipped_byte(filled):
    page = filled.first_data_page + 700
    filled.ram[page, 1234] ^= 0x10
    result = filled.verify()
    assert not result.ok and result.bad_pages == 1 and result.first_bad == [page]
    assert "corrupt" in result.detail and "offset 1234" in result.detail


def test_verify_detects_stale_page(filled):
    page = filled.first_data_page + 10  # at version 2
    filled.ram[page] = page_stamp(page, 1)
    result = filled.verify()
    assert not result.ok and result.first_bad == [page]
    assert "stale" in result.detail and "version 1" in result.detail


def test_verify_detects_zeroed_page(filled):
    page = filled.npages - 1
    filled.ram[page] = 0
    result = filled.verify()
    assert not result.ok and result.first_bad == [page] and "zeroed" in result.detail


def test_verify_detects_misplaced_page_and_reports_first_ten(filled):
    first = filled.first_data_page
    filled.ram[first + 500] = filled.ram[first + 501]
    for page in range(first + 1000, first + 1020):
        filled.ram[page, 9] ^= 1
    result = filled.verify()
    assert result.bad_pages == 21
    assert result.first_bad == [first + 500] + list(range(first + 1000, first + 1009))
    assert "misplaced" in result.detail


def test_verify_detects_bad_metadata(filled):
    bad = filled.ram.copy()
    bad[0, 4000] = 1
    assert GuestMemory(bad).verify().first_bad == [0]
    bad = filled.ram.copy()
    GuestMemory(bad).ledger[1] = 3  # a ledger page claiming to have been written
    result = GuestMemory(bad).verify()
    assert not result.ok and result.first_bad == [1]
    bad = filled.ram.copy()
    bad[0, 0] ^= 1
    result = GuestMemory(bad).verify()
    assert not result.ok and result.pages_checked == 0 and "magic" in result.detail


def test_verify_detects_ledger_ahead_of_page(filled):
    page = filled.first_data_page + 3
    filled.ledger[page] += 1
    assert filled.verify().first_bad == [page]


def test_check_pages_exact(filled):
    first = filled.first_data_page
    filled.ram[first + 7, 100] ^= 1
    got = filled.check_pages(np.array([first + 7, first + 8, first + 7]))
    assert got.tolist() == [False, True, False]
    with pytest.raises(ValueError):
        filled.check_pages([0])


def test_check_pages_concurrent_protocol_states(filled):
    """Writer order is ledger first, then body: a reader may see the old or a torn body."""
    first = filled.first_data_page
    ahead, torn, behind2, corrupt, clean = first + 100, first + 101, first + 102, first + 103, first + 104
    for page in (ahead, torn, behind2, corrupt):
        filled.ledger[page] = 2  # the writer has bumped the ledger (1 -> 2) ...
    filled.ram[torn, :2048] = page_stamp(torn, 2)[:2048]  # ... and is halfway through the body
    filled.ram[torn, 2049] = page_stamp(torn, 2)[2049]  # byte-level tearing is tolerated too
    filled.ledger[behind2] = 3  # two versions ahead of the body: never legal
    filled.ram[corrupt, 3000] ^= 0xFF
    pages = [ahead, torn, behind2, corrupt, clean]
    assert filled.check_pages(pages, concurrent=True).tolist() == [True, True, False, False, True]
    assert filled.check_pages(pages).tolist() == [False, False, False, False, True]


def test_check_pages_concurrent_with_a_running_writer():
    """A reader racing a writer thread never reports a correct page as bad."""
    mem = make_mem(256)
    mem.fill_all()
    reader = GuestMemory(mem.ram)  # another "process" mapping the same RAM
    hot = np.arange(mem.first_data_page, mem.first_data_page + 8)
    stop = threading.Event()

    def write_forever():
        rng = np.random.default_rng(1)
        while not stop.is_set():
            mem.write_pages(rng.choice(hot, 4))

    writer = threading.Thread(target=write_forever)
    writer.start()
    try:
        for _ in range(2000):
            assert reader.check_pages(hot, concurrent=True).all()
    finally:
        stop.set()
        writer.join()
    assert mem.verify().ok
    assert mem.ledger[hot].sum() > len(hot)  # the writer really ran


@pytest.mark.parametrize("damage", ["flip", "stale", "zeroed", "misplaced", "ledger-ahead"])
def test_verify_concurrent_finds_what_verify_finds(filled, damage):
    """With no writer running, the outside check is the exact check (same verdict, same pages)."""
    first = filled.first_data_page
    page = first + 10
    if damage == "flip":
        filled.ram[page, 77] ^= 1
    elif damage == "stale":
        filled.ram[page] = page_stamp(page, 1)
    elif damage == "zeroed":
        filled.ram[page] = 0
    elif damage == "misplaced":
        filled.ram[page] = filled.ram[page + 1]
    else:
        filled.ledger[page] += 1
    exact = filled.verify()
    outside = filled.verify_concurrent(recheck_delays_s=(0.0, 0.001))
    assert not outside.ok and outside.unproven_pages == 0
    assert (outside.bad_pages, outside.first_bad, outside.detail) == (exact.bad_pages, exact.first_bad, exact.detail)


def test_verify_concurrent_passes_a_torn_page_that_completes_and_fails_one_that_stays():
    """A page read mid-write (ledger bumped, body half old) is re-read: once the write is
    done it passes; a page whose body stays wrong at the same ledger version fails."""
    mem = make_mem(256)
    mem.fill_all()
    first = mem.first_data_page
    torn, stale = first + 5, first + 6
    mem.ledger[torn] = 2
    mem.ram[torn, :2048] = page_stamp(torn, 2)[:2048]  # the writer is halfway through
    mem.ledger[stale] = 2  # the ledger says 2, the body stays at 1: a stale page

    def finish_the_write(delay_s):
        mem.ram[torn] = page_stamp(torn, 2)

    import guests.memory as gm

    real_sleep = gm.time.sleep
    try:
        gm.time.sleep = finish_the_write  # the writer completes during the first wait
        result = mem.verify_concurrent()
    finally:
        gm.time.sleep = real_sleep
    assert not result.ok and result.first_bad == [stale] and result.bad_pages == 1, result
    assert "stale" in result.detail
    assert mem.verify_concurrent(recheck_delays_s=(0.0,)).first_bad == [stale]


def test_verify_concurrent_counts_a_page_rewritten_after_a_failed_read_as_unproven():
    mem = make_mem(256)
    mem.fill_all()
    page = mem.first_data_page + 9
    mem.ram[page, 5] ^= 1  # wrong at version 1 ...

    def guest_rewrites_it(delay_s):
        mem.write_pages([page])  # ... then the running guest writes it (version 2)

    import guests.memory as gm

    real_sleep = gm.time.sleep
    try:
        gm.time.sleep = guest_rewrites_it
        result = mem.verify_concurrent()
    finally:
        gm.time.sleep = real_sleep
    assert result.ok and result.bad_pages == 0 and result.unproven_pages == 1
    assert "unproven" in result.detail


def test_verify_concurrent_with_a_running_writer_never_reports_a_good_page_bad():
    mem = make_mem(512)
    mem.fill_all()
    reader = GuestMemory(mem.ram)
    data = np.arange(mem.first_data_page, mem.npages)
    stop = threading.Event()

    def write_forever():
        rng = np.random.default_rng(3)
        while not stop.is_set():
            mem.write_pages(rng.choice(data, 64))

    writer = threading.Thread(target=write_forever)
    writer.start()
    try:
        for _ in range(30):
            result = reader.verify_concurrent(chunk_pages=64)
            assert result.ok, result
    finally:
        stop.set()
        writer.join()
    assert mem.verify().ok


# ---------------------------------------------------------------------------------------
# guests.workload: built-ins
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BUILTIN_WORKLOADS))
def test_builtin_writes_pages_that_verify(name):
    mem, clock = make_mem(), FakeClock()
    wl = BUILTIN_WORKLOADS[name](mem, clock, seed=3)
    assert wl.name == name
    wl.setup()
    assert (mem.ledger[mem.first_data_page:] == 1).all()
    drive(wl, clock, until_ms=300)
    written = int(mem.ledger.sum()) - mem.data_pages
    if name == "idle":
        assert written == 0
    else:
        assert written > 0 and wl.progress_pages > 0
    result = mem.verify()
    assert result.ok, result.detail


@pytest.mark.parametrize("name", sorted(BUILTIN_WORKLOADS))
def test_fill_false_leaves_ram_untouched(name):
    mem = make_mem()
    BUILTIN_WORKLOADS[name](mem, FakeClock(), seed=1, fill=False).setup()
    assert not mem.ledger.any() and not mem.ram[mem.first_data_page:].any()


def test_idle_step_idles():
    assert BUILTIN_WORKLOADS["idle"](make_mem(), FakeClock(), seed=0).step() == pytest.approx(0.005)


@pytest.mark.parametrize("rate_pps", [500.0, 5000.0, 12345.0, 60000.0])
def test_pacing_is_exact_in_virtual_time(rate_pps):
    mem, clock = make_mem(), FakeClock()
    clock.ticks_ms = 5000  # the origin is the first step, not clock zero
    wl = UniformWorkload(mem, clock, seed=1, rate=rate_pps, fill=False)
    for end_ms in (5000, 5001, 5333, 6000, 7250):
        drive(wl, clock, until_ms=end_ms)
        assert wl.done_pages == expected_due(rate_pps, (end_ms - 5000) / 1000)
        assert wl.skipped_pages == 0


def test_step_returns_wait_until_next_page():
    mem, clock = make_mem(), FakeClock()
    wl = UniformWorkload(mem, clock, seed=1, rate=4000.0, fill=False)
    assert wl.step() == pytest.approx(0.00025)  # first step: origin, next page in 1/4000 s
    clock.ticks_ms = 1  # 4 pages due
    assert wl.step() == pytest.approx(0.00025) and wl.done_pages == 4
    slow = UniformWorkload(mem, clock, seed=1, rate=10.0, fill=False)
    assert slow.step() == MAX_IDLE_S  # capped so a pause request is seen promptly


def test_backlog_is_written_in_batches_then_bounded():
    mem, clock = make_mem(), FakeClock()
    wl = UniformWorkload(mem, clock, seed=1, rate=5000.0, max_batch=64, fill=False)
    wl.step()
    clock.ticks_ms = 20  # 100 due: two steps, the first says "call again now"
    assert wl.step() == 0.0 and wl.done_pages == 64
    assert wl.step() > 0.0 and wl.done_pages == 100
    clock.ticks_ms += 10_000  # far behind: at most max_lag_s (0.1 s = 500 pages) kept
    while wl.step() == 0.0:
        pass
    assert wl.done_pages == 600 and wl.skipped_pages == 50_000 - 500
    assert wl.done_pages + wl.skipped_pages == expected_due(5000, clock())


def test_rate_zero_is_unpaced():
    mem, clock = make_mem(), FakeClock()
    wl = UniformWorkload(mem, clock, seed=1, rate=0, max_batch=32, fill=False)
    for _ in range(5):
        assert wl.step() == 0.0
    assert wl.done_pages == 160


def test_hotcold_sends_hot_writes_to_hot_set():
    mem = make_mem()
    wl = HotColdWorkload(mem, FakeClock(), seed=42, hot_pages=0.1, hot_writes=0.9)
    hot = wl.picker.hot_set
    assert len(hot) == round(0.1 * mem.data_pages) and len(np.unique(hot)) == len(hot)
    assert hot.min() >= mem.first_data_page and hot.max() < mem.npages
    picks = np.concatenate([wl.pick_pages(64) for _ in range(2000)])  # 128000 writes
    share = np.isin(picks, hot).mean()
    # binomial sd = sqrt(.9 * .1 / 128000) ~ 0.0008: +-0.01 is > 10 sd
    assert abs(share - 0.9) < 0.01
    cold_hits = np.unique(picks[~np.isin(picks, hot)])
    assert len(cold_hits) > 0.9 * (mem.data_pages - len(hot))  # cold writes spread over all cold pages
    all_hot = HotColdWorkload(mem, FakeClock(), seed=1, hot_pages=1.0, hot_writes=0.5)
    assert len(np.unique(all_hot.pick_pages(64))) > 1


def test_zipf_is_skewed():
    mem = make_mem()
    wl = ZipfWorkload(mem, FakeClock(), seed=5, s=1.2)
    by_rank = wl.pages_by_rank()
    assert np.array_equal(np.sort(by_rank), np.arange(mem.first_data_page, mem.npages))
    picks = np.concatenate([wl.pick_pages(64) for _ in range(2000)])
    counts = {int(p): int(c) for p, c in zip(*np.unique(picks, return_counts=True))}
    weights = np.arange(1, mem.data_pages + 1, dtype=float) ** -1.2
    p_top = weights[0] / weights.sum()
    assert abs(counts[int(by_rank[0])] / len(picks) - p_top) < 0.01
    top10 = sum(counts.get(int(p), 0) for p in by_rank[:10]) / len(picks)
    assert abs(top10 - weights[:10].sum() / weights.sum()) < 0.01
    assert top10 > 0.4  # 10 of 2045 pages take almost half the writes
    flatter = ZipfWorkload(mem, FakeClock(), seed=5, s=0.5)
    flat_picks = np.concatenate([flatter.pick_pages(64) for _ in range(500)])
    assert np.isin(flat_picks, flatter.pages_by_rank()[:10]).mean() < top10 / 4


def test_sweep_is_sequential_and_wraps():
    mem, clock = make_mem(), FakeClock()
    wl = SweepWorkload(mem, clock, seed=1, fill=False, max_batch=1000)
    n = mem.data_pages + 100
    pages = np.concatenate([wl.pick_pages(1000) for _ in range(n // 1000)] + [wl.pick_pages(n % 1000)])
    expected = mem.first_data_page + np.arange(n) % mem.data_pages
    assert np.array_equal(pages, expected)
    assert wl.get_state()["position"] == 100
    assert wl.rate_pps == 20000.0


def test_sweep_writes_ledger_in_order():
    mem, clock = make_mem(), FakeClock()
    wl = SweepWorkload(mem, clock, seed=1, fill=False, rate=20000)
    drive(wl, clock, until_ms=110)  # 2200 page writes over 2045 data pages
    first = mem.first_data_page
    wrapped = 2200 - mem.data_pages
    assert (mem.ledger[first:first + wrapped] == 2).all()
    assert (mem.ledger[first + wrapped:] == 1).all()
    assert mem.verify().ok


def test_phased_switches_rates_at_virtual_times():
    mem, clock = make_mem(), FakeClock()
    wl = PhasedWorkload(mem, clock, seed=1, phases="1000:2, 10000:1,0:1,500:2", fill=False)
    checkpoints = {0: 0, 1000: 1000, 2000: 2000, 2500: 7000, 3000: 12000, 3500: 12000,
                   4000: 12000, 5000: 12500, 6000: 13000, 8000: 14000}  # then 500/s forever
    for at_ms, pages in checkpoints.items():
        drive(wl, clock, until_ms=at_ms)
        assert wl.done_pages == pages, f"at {at_ms} ms"
        assert wl.current_rate_pps(at_ms / 1000) == {0: 1000, 1000: 1000, 2000: 10000, 2500: 10000,
                                                     3000: 0, 3500: 0, 4000: 500, 5000: 500,
                                                     6000: 500, 8000: 500}[at_ms]
    assert wl.skipped_pages == 0 and mem.verify().ok


def test_phased_repeat_and_hotcold_pattern():
    mem, clock = make_mem(), FakeClock()
    wl = PhasedWorkload(mem, clock, seed=1, phases="1000:1,3000:1", repeat=True,
                        pattern="hotcold", hot_pages=0.05, hot_writes=1.0, fill=False)
    drive(wl, clock, until_ms=2000)
    assert wl.done_pages == 4000
    drive(wl, clock, until_ms=3500)
    assert wl.done_pages == 4000 + 1000 + 1500
    written = np.flatnonzero(mem.ledger)
    assert np.isin(written, wl.picker.hot_set).all()


# ---------------------------------------------------------------------------------------
# context: the determinism a migrated guest relies on
# ---------------------------------------------------------------------------------------

ROUND_TRIP_CASES = [
    ("uniform", {}), ("hotcold", {"hot_pages": 0.02}), ("zipf", {}), ("sweep", {}),
    ("phased", {"phases": "20000:0.05,3000:0.05", "pattern": "hotcold"}),
    ("phased", {"phases": "20000:0.05,3000:0.05", "repeat": True}),
    ("idle", {}), ("uniform", {"rate": 0}),
]


def round_trip(cls, params, steps_before_ms=120, steps_after_ms=150):
    """Run on a "source", migrate RAM + context to a fresh instance, run both on."""
    src_mem, clock = make_mem(), FakeClock()
    src = cls(src_mem, clock, seed=11, **params)
    src.setup()
    drive(src, clock, until_ms=steps_before_ms)
    blob = src.save_context()
    assert isinstance(blob, bytes) and len(blob) < 4096
    json.loads(blob)

    dst_mem = GuestMemory(src_mem.ram.copy()).attach()
    dst = cls(dst_mem, clock, seed=11, **params)  # no setup(): RAM came with the guest
    dst.restore_context(blob)
    assert dst.get_state() == src.get_state()

    dst_clock_start = clock.ticks_ms
    drive(src, clock, until_ms=steps_before_ms + steps_after_ms)
    clock.ticks_ms = dst_clock_start  # the destination replays the same virtual times
    drive(dst, clock, until_ms=steps_before_ms + steps_after_ms)
    return src, dst, src_mem, dst_mem


@pytest.mark.parametrize("name,params", ROUND_TRIP_CASES)
def test_context_round_trip_continues_identically(name, params):
    src, dst, src_mem, dst_mem = round_trip(BUILTIN_WORKLOADS[name], params)
    assert np.array_equal(src_mem.ram, dst_mem.ram)
    assert src.get_state() == dst.get_state()
    assert dst_mem.verify().ok
    if name != "idle":
        assert src.progress_pages > 0


def test_round_trip_would_catch_a_lost_rng_state():
    """Negative control: without restore_context the destination diverges."""
    src_mem, clock = make_mem(), FakeClock()
    src = UniformWorkload(src_mem, clock, seed=11)
    src.setup()
    drive(src, clock, until_ms=50)
    dst_mem = GuestMemory(src_mem.ram.copy()).attach()
    dst = UniformWorkload(dst_mem, clock, seed=11)
    dst.set_state({**src.get_state(), "rng": UniformWorkload(dst_mem, clock, seed=11).get_state()["rng"]})
    start = clock.ticks_ms
    drive(src, clock, until_ms=100)
    clock.ticks_ms = start
    drive(dst, clock, until_ms=100)
    assert not np.array_equal(src_mem.ram, dst_mem.ram)


def test_restore_context_rejects_foreign_or_damaged_blobs():
    mem, clock = make_mem(), FakeClock()
    uniform = UniformWorkload(mem, clock, seed=1)
    sweep = SweepWorkload(mem, clock, seed=1)
    with pytest.raises(GuestError, match="workload 'uniform'"):
        sweep.restore_context(uniform.save_context())
    for blob in (b"", b"not json", b"[]", b'{"vmem_workload_context": 1, "workload": "sweep"}',
                 json.dumps({"vmem_workload_context": 1, "workload": "sweep",
                             "state": {"rng": "x"}}).encode()):
        with pytest.raises(GuestError):
            sweep.restore_context(blob)
    # the decoded form the runtime restores from refuses the same things
    with pytest.raises(GuestError, match="workload 'uniform'"):
        sweep.restore_state(json.loads(uniform.save_context()))
    for ctx in ([], None, "sweep", {"vmem_workload_context": 1, "workload": "sweep"}):
        with pytest.raises(GuestError):
            sweep.restore_state(ctx)


def test_restore_state_equals_restore_context():
    """The runtime restores the decoded context (restore_state); a workload restored that way
    continues exactly as one restored from the blob."""
    clock = FakeClock()
    src_mem = make_mem()
    src = UniformWorkload(src_mem, clock, seed=5)
    src.setup()
    drive(src, clock, until_ms=40)
    blob = src.save_context()
    a = UniformWorkload(GuestMemory(src_mem.ram.copy()).attach(), clock, seed=99)
    b = UniformWorkload(GuestMemory(src_mem.ram.copy()).attach(), clock, seed=98)
    a.restore_context(blob)
    b.restore_state(json.loads(blob))
    assert a.get_state() == b.get_state() == src.get_state()


# ---------------------------------------------------------------------------------------
# registry and parameters
# ---------------------------------------------------------------------------------------

class LocalCounter(PacedWorkload):
    """A test-local user workload: writes the pages of a counter round-robin."""

    name = "localcounter"

    def __init__(self, mem, clock, seed, *, span_pages: int = 4, label: str = "x", **params):
        super().__init__(mem, clock, seed, **params)
        self.span_pages = span_pages
        self.label = label
        self.next = 0

    def pick_pages(self, n):
        pages = self.mem.first_data_page + (self.next + np.arange(n)) % self.span_pages
        self.next = (self.next + n) % self.span_pages
        return pages


class NotAWorkload:
    pass


def test_load_workload_builtins_and_module_class():
    for name, cls in BUILTIN_WORKLOADS.items():
        assert load_workload(name) is cls
    assert set(BUILTIN_WORKLOADS) == {"idle", "uniform", "hotcold", "zipf", "sweep", "phased", "checker"}
    assert load_workload(f"{__name__}:LocalCounter") is LocalCounter
    assert load_workload("guests.workload:ZipfWorkload") is ZipfWorkload


@pytest.mark.parametrize("spec,match", [
    ("nosuch", "unknown workload"),
    ("no_such_module_vmem_test:Foo", "cannot import"),
    (f"{__name__}:Missing", "no attribute"),
    (f"{__name__}:NotAWorkload", "not a subclass"),
    ("json:loads", "not a subclass"),
    ("guests.workload:PacedWorkload", "abstract"),
    ("guests.workload:Workload", "abstract"),
    (":Foo", "module:Class"),
    ("json:", "module:Class"),
])
def test_load_workload_errors(spec, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_workload(spec)
    assert err.value.parameter == "workload"


def test_parse_params_types_by_defaults():
    assert parse_params(UniformWorkload, ["rate=2500.5", "max_batch=16", "fill=false"]) == \
        {"rate": 2500.5, "max_batch": 16, "fill": False}
    assert parse_params(UniformWorkload, ["rate=3000"]) == {"rate": 3000.0}
    assert parse_params(UniformWorkload, ["max_batch=1e2"]) == {"max_batch": 100}
    params = parse_params(PhasedWorkload, ["phases=100:1,200:2", "repeat=yes", "pattern=hotcold"])
    assert params == {"phases": "100:1,200:2", "repeat": True, "pattern": "hotcold"}
    assert parse_params(HotColdWorkload, ["hot_pages=0.2", "rate=10"]) == {"hot_pages": 0.2, "rate": 10.0}
    assert parse_params(SweepWorkload, []) == {}
    params = parse_params(LocalCounter, ["span_pages=9", "label=abc", "rate=7"])
    assert params == {"span_pages": 9, "label": "abc", "rate": 7.0}
    assert parse_params(BUILTIN_WORKLOADS["idle"], ["fill=0"]) == {"fill": False}


@pytest.mark.parametrize("cls,items,parameter", [
    (UniformWorkload, ["speed=5"], "speed"),
    (PhasedWorkload, ["rate=5"], "rate"),  # phased takes its rates from phases
    (BUILTIN_WORKLOADS["idle"], ["rate=5"], "rate"),
    (UniformWorkload, ["rate=fast"], "rate"),
    (UniformWorkload, ["max_batch=1.5"], "max_batch"),
    (UniformWorkload, ["fill=maybe"], "fill"),
    (UniformWorkload, ["rate=1", "rate=2"], "rate"),
    (UniformWorkload, ["rate"], "rate"),
    (UniformWorkload, ["=5"], "=5"),
    (UniformWorkload, ["seed=5"], "seed"),  # a runtime argument, not a parameter
])
def test_parse_params_errors(cls, items, parameter):
    with pytest.raises(ConfigError) as err:
        parse_params(cls, items)
    assert err.value.parameter == parameter


@pytest.mark.parametrize("name,params,parameter", [
    ("uniform", {"rate": -1}, "rate"),
    ("uniform", {"rate": float("inf")}, "rate"),
    ("uniform", {"rate": "5"}, "rate"),
    ("uniform", {"max_batch": 0}, "max_batch"),
    ("uniform", {"fill": "yes"}, "fill"),
    ("idle", {"fill": 1}, "fill"),
    ("hotcold", {"hot_pages": 0.0}, "hot_pages"),
    ("hotcold", {"hot_pages": 1.5}, "hot_pages"),
    ("hotcold", {"hot_writes": 1.1}, "hot_writes"),
    ("zipf", {"s": 0}, "s"),
    ("sweep", {"rate": -5}, "rate"),
    ("phased", {"phases": "fast"}, "phases"),
    ("phased", {"phases": "100:0"}, "phases"),
    ("phased", {"phases": "-1:5"}, "phases"),
    ("phased", {"phases": "100:1,"}, "phases"),
    ("phased", {"pattern": "zipf"}, "pattern"),
    ("phased", {"repeat": "true"}, "repeat"),
    ("phased", {"pattern": "hotcold", "hot_writes": 2}, "hot_writes"),
])
def test_constructor_validation_names_the_parameter(name, params, parameter):
    with pytest.raises(ConfigError) as err:
        BUILTIN_WORKLOADS[name](make_mem(), FakeClock(), seed=1, **params)
    assert err.value.parameter == parameter


def test_seed_is_validated():
    with pytest.raises(ConfigError) as err:
        UniformWorkload(make_mem(), FakeClock(), seed=-1)
    assert err.value.parameter == "seed"


# ---------------------------------------------------------------------------------------
# the documented example (docs/workloads.md) works as printed
# ---------------------------------------------------------------------------------------

@pytest.fixture
def mymod(monkeypatch):
    doc = (pathlib.Path(__file__).parents[1] / "docs" / "workloads.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    source = next(b for b in blocks if b.startswith("# mymod.py"))
    module = types.ModuleType("mymod")
    exec(compile(source, "docs/workloads.md:mymod", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "mymod", module)
    return module


def test_doc_example_ring_logger(mymod):
    cls = load_workload("mymod:RingLogger")
    assert cls is mymod.RingLogger
    params = parse_params(cls, ["ring_pages=64", "max_record_pages=4", "rate=2000"])
    assert params == {"ring_pages": 64, "max_record_pages": 4, "rate": 2000.0}
    mem, clock = make_mem(), FakeClock()
    wl = cls(mem, clock, seed=7, **params)
    wl.setup()
    drive(wl, clock, until_ms=500)
    assert wl.done_pages == 1000
    written = np.flatnonzero(mem.ledger > 1)
    assert written.min() == mem.first_data_page and written.max() < mem.first_data_page + 64
    assert mem.ledger[mem.first_data_page] > mem.ledger[mem.first_data_page + 1]  # hot superblock
    assert mem.verify().ok
    with pytest.raises(ConfigError) as err:
        cls(mem, clock, seed=7, ring_pages=1)
    assert err.value.parameter == "ring_pages"


def test_doc_example_ring_logger_round_trip(mymod):
    src, dst, src_mem, dst_mem = round_trip(mymod.RingLogger, {"ring_pages": 100, "rate": 3000})
    assert np.array_equal(src_mem.ram, dst_mem.ram)
    assert dst.get_state()["head"] == src.get_state()["head"]
