"""A process that runs many migrations (the agent, ``vmem bench`` in one process, the pytest
plugin) must not keep memory per migration.

The fault these tests exist for (measured: docs/reliability.md, "Memory"): a
``SourceMigration`` sat in reference cycles (bound methods kept as callbacks), so each
migration's 4 MiB staging buffer lived until Python's cyclic collector happened to run --
+4 MiB of heap per migration, 57 -> 82 MiB peak over 12 migrations in one process.

The rule is a slope, not an absolute: after every migration (each one verified) the heap
this process still holds (glibc ``mallinfo2``: bytes in use + mmapped) is read with the
cyclic collector *off*, so only memory freed by reference counting comes back; over the
runs after the first (which warms caches up), the median per-migration growth
(Theil-Sen slope) must stay under 0.5 MiB -- the old fault made it 4 MiB.  Timing plays no
part: a loaded machine changes when things happen, not what is kept.
"""
from __future__ import annotations

import gc
import statistics
import time

import pytest

from conftest import uffd_wp_missing
from guests.launch import GuestSpec, ProcessGuest
from vmem.agent.heap import heap_figures
from vmem.migration.local import run_local_migration
from vmem.migration.source import MigrationOptions

MIB = 1 << 20
#: Largest median growth of held heap per migration (the fault was 4 MiB: one staging buffer).
MAX_SLOPE_BYTES_PER_MIGRATION = MIB // 2


def _postcopy_missing() -> str:
    from vmem.features import probe_features

    f = probe_features()
    for name in ("userfaultfd", "UFFD_FEATURE_MINOR_SHMEM", "UFFD_FEATURE_MISSING_SHMEM"):
        if name in f and not f[name].available:
            return f"kernel lacks {name}: {f[name].detail}"
    return ""


def held_heap_bytes() -> int | None:
    """Heap bytes this process holds: glibc's in-use bytes plus allocations on their own
    mappings (None off glibc)."""
    f = heap_figures()
    if f["heap_in_use"] is None:
        return None
    return f["heap_in_use"] + f["mmapped"]


def theil_sen_slope(values: list[float]) -> float:
    """Median of the pairwise slopes (robust to a single outlier)."""
    slopes = [(values[j] - values[i]) / (j - i) for i in range(len(values)) for j in range(i + 1, len(values))]
    return statistics.median(slopes)


def test_theil_sen_slope_sees_growth_and_ignores_one_outlier():
    assert theil_sen_slope([10, 14, 18, 22, 26]) == pytest.approx(4)
    assert theil_sen_slope([10, 10, 30, 10, 10, 10]) == pytest.approx(0)


def _migrate_once(mode: str) -> dict:
    with ProcessGuest.boot(GuestSpec("hotcold", {"rate": 5000}, 5), 16 << 20) as guest:
        time.sleep(0.1)
        report = run_local_migration(guest, MigrationOptions(observe_s=0.1, postcopy=mode))
    assert report.outcome == "completed", (mode, report.reason)
    assert report.verified and report.verification["digests"]["mismatched"] == 0, mode
    assert report.verification["guest_check"]["ok"], mode
    assert report.guest["destination"]["steps_since_resume"] > 0, mode
    return report.to_dict()


def _with_collector_off(fn):
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        return fn()
    finally:
        if enabled:
            gc.enable()


def test_a_finished_source_migration_is_freed_without_the_cyclic_collector():
    """Reference counting alone frees a migration's objects: none of them is left for the
    cyclic collector (which is what kept the staging buffers)."""
    def run():
        _migrate_once("off")
        flags = gc.get_debug()
        gc.set_debug(flags | gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            return sorted({type(o).__qualname__ for o in gc.garbage})
        finally:
            gc.garbage.clear()
            gc.set_debug(flags)

    kept = _with_collector_off(run)
    ours = [t for t in kept if t in {"SourceMigration", "StreamWriter", "ControlReader", "StateCell", "GuestRam",
                                       "ProcessGuest", "MigrationReport", "SocketChannel"}]
    assert not ours, f"left in reference cycles after the migration: {ours} (all: {kept[:30]})"


@pytest.mark.slow
def test_repeated_in_process_migrations_keep_no_memory():
    """9 verified migrations in this process (pre-copy, and post-copy and hybrid where the
    kernel has the features): the heap held after each grows by under 0.5 MiB a migration
    (Theil-Sen over runs 2..9)."""
    if held_heap_bytes() is None:
        pytest.skip("not glibc: no mallinfo2 to read the heap with")
    modes = ["off"] if _postcopy_missing() else ["off", "pure", "after-precopy"]
    if uffd_wp_missing():
        pytest.skip(f"the migrator's default path needs uffd-wp: {uffd_wp_missing()}")

    def run():
        held, peaks = [], []
        for i in range(9):
            rep = _migrate_once(modes[i % len(modes)])
            peaks.append(rep["processes"].get("migrator_source", {}).get("private_peak_bytes"))
            held.append(held_heap_bytes())
        return held, peaks

    held, peaks = _with_collector_off(run)
    slope = theil_sen_slope(held[1:])
    detail = (f"held heap after each migration (MiB): {[round(h / MIB, 1) for h in held]}; "
              f"peak RssAnon (MiB): {[round((p or 0) / MIB, 1) for p in peaks]}")
    assert slope <= MAX_SLOPE_BYTES_PER_MIGRATION, f"{slope / MIB:.2f} MiB per migration; {detail}"
