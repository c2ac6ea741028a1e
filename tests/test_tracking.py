"""Conformance suite: every dirty tracker passes the same checks.

The contract: collect() returns exactly-or-more the pages written since the last collect,
and has re-armed them before it returns, so a copy made after collect can never miss a
write.  Two tests prove the "or-more" half never drops a page: the completeness test
holds every collect against the guest's own ledger (which records each page it writes),
and the concurrent-writer test shadow-copies RAM the way a migrator relies on it.
"""
from __future__ import annotations

import errno
import os
import time

import numpy as np
import pytest

from conftest import needs_kvm, needs_uffd_wp
from guests.memory import GuestMemory
from vmem.pages import PAGE_SIZE
from vmem.tracking import MprotectTracker, UffdWpTracker, make_tracker

TRACKERS = ["uffd-wp", "mprotect", "kvm-log", "kvm-ring"]
#: This host's KVM emulates the guest's instructions: a KVM guest writes ~100 pages/s where
#: a process guest writes ~100,000, so its intervals are this much longer.
KVM_SLOWDOWN = 15


@pytest.fixture(params=TRACKERS)
def kind(request):
    needs_uffd_wp(request.param)
    if request.param.startswith("kvm"):
        needs_kvm()
    return request.param


def is_kvm(kind: str) -> bool:
    return kind.startswith("kvm-")


def boot_for(boot_guest, kind: str, workload: str, size: int, **params):
    """A guest ``kind`` can track: a KVM guest (its VM created with the log or the ring)
    for the KVM trackers, a process guest otherwise."""
    if is_kvm(kind):
        from guests.kvm.layout import DEFAULTS

        kvm_params = {k: v for k, v in params.items() if k in DEFAULTS} | {"dirty": kind[len("kvm-"):]}
        return boot_guest(workload, size=size, backend="kvm", **kvm_params)
    return boot_guest(workload, size=size, **params)


def memory_of(g) -> GuestMemory:
    """The ledger view of a guest's RAM (a KVM guest's excludes its firmware pages)."""
    return g.guest_memory() if hasattr(g, "guest_memory") else GuestMemory(g.ram.pages)


def sleep_for(kind: str, seconds: float) -> None:
    time.sleep(seconds * (KVM_SLOWDOWN if is_kvm(kind) else 1))


def ledger_pages_only(g, pages: np.ndarray) -> np.ndarray:
    """``pages`` without a KVM guest's firmware pages (its program's stack and state page
    change at every step, even when it writes no data)."""
    return pages[pages < memory_of(g).npages]


def test_auto_selects_uffd_wp_here(boot_guest):
    needs_uffd_wp("uffd-wp")
    g = boot_guest("idle")
    t = make_tracker(g, "auto")
    try:
        assert isinstance(t, UffdWpTracker), "this machine offers WP_ASYNC; auto must pick it"
    finally:
        t.stop()


def test_idle_guest_collects_nothing(boot_guest, kind):
    g = boot_for(boot_guest, kind, "idle", 16 << 20)
    t = make_tracker(g, kind)
    try:
        t.start()
        sleep_for(kind, 0.05)
        assert len(ledger_pages_only(g, t.collect())) == 0
    finally:
        t.stop()


def test_collect_reports_written_pages_and_rearms(boot_guest, kind):
    """A sweep writes known pages: they are reported; a second collect is empty when paused."""
    g = boot_for(boot_guest, kind, "uniform", 16 << 20, rate=20000)
    t = make_tracker(g, kind)
    try:
        t.start()
        sleep_for(kind, 0.1)
        g.pause()
        written = t.collect()
        assert len(written) > 0
        assert np.all(np.diff(written) > 0), "sorted and unique"
        assert written.min() >= 0 and written.max() < g.npages
        # (that every written page is in the set: test_every_page_written_between_collects_is_reported)
        assert len(t.collect()) == 0, "nothing written while paused"
        g.resume()
        sleep_for(kind, 0.05)
        assert len(t.collect()) > 0, "re-armed: new writes are caught again"
    finally:
        t.stop()


def test_warm_before_the_final_collect_loses_no_write(boot_guest, kind):
    """``warm()`` (run right before the pause) reads what the final collect reads and
    changes nothing it reports: the pages written before it are still in that collect, and
    it does not re-arm them (a later collect does)."""
    g = boot_for(boot_guest, kind, "uniform", 16 << 20, rate=20000)
    mem = memory_of(g)
    t = make_tracker(g, kind)
    try:
        t.start()
        sleep_for(kind, 0.05)
        g.pause()
        t.collect()
        before = mem.ram.copy()
        g.resume()
        sleep_for(kind, 0.1)
        g.pause()
        written = written_since(mem, before)
        assert len(written) > 0
        t.warm()
        t.warm()  # twice: it must not consume anything
        reported = t.collect()
        assert np.isin(written, reported).all(), f"{int((~np.isin(written, reported)).sum())} written pages lost by warm()"
        assert len(t.collect()) == 0, "the collect after warm() re-armed what it reported"
    finally:
        t.stop()


def _written_after_a_collect(g, t, mem: GuestMemory, run_s: float) -> np.ndarray:
    """Arm ``t``, collect once with the guest paused, let it run ``run_s`` and pause it
    again: the pages it wrote since that collect (the ground truth, from RAM itself)."""
    t.start()
    time.sleep(0.05)
    g.pause()
    t.collect()
    before = mem.ram.copy()
    g.resume()
    time.sleep(run_s)
    g.pause()
    return written_since(mem, before)


def test_final_collect_split_over_two_threads_loses_no_write(boot_guest):
    """uffd-wp's final collect (after ``warm()``) walks chunks of RAM on two threads: on a
    guest of several chunks, every page written since the last collect is reported, the
    walk re-armed them all, and a collect without ``warm()`` walks alone again."""
    needs_uffd_wp("uffd-wp")
    g = boot_guest("uniform", size=96 << 20, rate=200000)  # three 32 MiB chunks
    mem = memory_of(g)
    t = make_tracker(g, "uffd-wp")
    try:
        written = _written_after_a_collect(g, t, mem, run_s=0.2)
        assert len(np.unique(written // ((32 << 20) // PAGE_SIZE))) == 3, "writes in every chunk"
        t.helper_chunks = -1
        t.warm()
        reported = t.collect()
        assert np.isin(written, reported).all(), f"{int((~np.isin(written, reported)).sum())} written pages lost by the split walk"
        assert 0 <= t.helper_chunks <= 3, "the collect after warm() is the split walk"
        assert len(t.collect()) == 0, "the split walk re-armed what it reported"
        g.resume()
        time.sleep(0.05)
        g.pause()
        t.helper_chunks = -1
        assert len(t.collect()) > 0 and t.helper_chunks == -1, "no warm(): one walk, no helper"
    finally:
        t.stop()


def test_final_collect_without_a_helper_thread_walks_alone(boot_guest, monkeypatch):
    """The helper thread cannot be started (out of threads): ``warm()`` does not fail the
    migration, and the final collect walks alone and still reports every write."""
    needs_uffd_wp("uffd-wp")
    from vmem import _native as nat

    g = boot_guest("uniform", size=16 << 20, rate=20000)
    mem = memory_of(g)
    t = make_tracker(g, "uffd-wp")

    def no_thread(spin_s):
        raise OSError(errno.EAGAIN, "starting the page-walk helper thread: Resource temporarily unavailable")

    try:
        written = _written_after_a_collect(g, t, mem, run_s=0.1)
        monkeypatch.setattr(nat, "scan_helper_arm", no_thread)
        t.warm()
        reported = t.collect()
        assert len(written) > 0 and np.isin(written, reported).all()
        assert len(t.collect()) == 0
    finally:
        t.stop()


def written_since(mem: GuestMemory, ram_before: np.ndarray) -> np.ndarray:
    """The pages whose bytes changed since ``ram_before`` was copied: exactly the writes a
    tracker must report.  Not the guest's ledger: a KVM vCPU can be kicked out between
    bumping a page's ledger entry and writing the page (its program writes the entry
    first), so the ledger may name a page whose write has not happened yet -- that page
    is written, and reported, in a later interval."""
    return np.flatnonzero((mem.ram != ram_before).any(axis=1))


def unreported_writes(g, tracker, intervals: int = 6, collects_per_interval: int = 3,
                      interval_s: float = 0.01) -> tuple[np.ndarray, int]:
    """Run ``tracker`` on the busy guest ``g`` and hold it against the guest's ledger.

    Each interval: the guest runs while ``tracker`` collects ``collects_per_interval``
    times (racing with the writes, as in a migration round), then the guest pauses and one
    more collect ends the interval.  The pages the ledger says were written in the interval
    must all be in the union of that interval's collects.

    Returns (pages written but never reported, pages written in all).
    """
    mem = memory_of(g)
    missed, written_total = [], 0
    try:
        g.pause()
        tracker.start()
        for _ in range(intervals):
            before = mem.ram.copy()
            reported = []
            g.resume()
            for _ in range(collects_per_interval):
                time.sleep(interval_s)
                reported.append(tracker.collect())
            g.pause()
            reported.append(tracker.collect())
            written = written_since(mem, before)
            written_total += len(written)
            missed.append(np.setdiff1d(written, np.concatenate(reported)))
        g.resume()
    finally:
        del mem  # no view of the guest's RAM may outlive the test
        tracker.stop()
    return np.concatenate(missed), written_total


def test_every_page_written_between_collects_is_reported(boot_guest, kind):
    """Completeness: every page the guest wrote between two collects is reported."""
    g = boot_for(boot_guest, kind, "uniform", 16 << 20, rate=0)  # as fast as it can
    missed, written = unreported_writes(g, make_tracker(g, kind), interval_s=0.01 * (KVM_SLOWDOWN if is_kvm(kind) else 1))
    assert written > (20 if is_kvm(kind) else 1000), "the guest must actually have written while tracked"
    assert len(missed) == 0, f"{len(missed)} written pages never reported, e.g. {missed[:10]}"
    assert g.verify()["ok"]


class _Wrapped:
    """A tracker whose collect a subclass changes; start and stop are the tracker's."""

    def __init__(self, tracker):
        self.tracker = tracker

    def start(self):
        self.tracker.start()

    def stop(self):
        self.tracker.stop()


class _BlindToOnePage(_Wrapped):
    """A tracker that never reports ``page``: what the check above must catch."""

    def __init__(self, tracker, page: int):
        super().__init__(tracker)
        self.page = page

    def collect(self):
        pages = self.tracker.collect()
        return pages[pages != self.page]


def test_completeness_check_catches_a_lost_page(boot_guest, kind):
    g = boot_for(boot_guest, kind, "uniform", 16 << 20, rate=0)
    # Ledger page 1 holds the entries of pages 0..1023: every interval's writes touch it.
    missed, _ = unreported_writes(g, _BlindToOnePage(make_tracker(g, kind), 1), intervals=2,
                                  interval_s=0.01 * (KVM_SLOWDOWN * 2 if is_kvm(kind) else 1))
    assert set(missed.tolist()) == {1}, missed


def test_no_write_is_lost_between_collect_and_copy(boot_guest, kind):
    """Shadow-copy RAM the way a migrator does while a busy guest writes concurrently.

    Round 0 copies everything; each later round copies what collect() returned; after the
    pause, a final collect + copy.  The shadow must equal RAM exactly.
    """
    g = boot_for(boot_guest, kind, "uniform", 32 << 20, rate=0)  # as fast as it can
    t = make_tracker(g, kind)
    try:
        t.start()
        shadow = g.ram.pages.copy()
        total = 0
        for _ in range(8):
            dirty = t.collect()
            total += len(dirty)
            shadow[dirty] = g.ram.pages[dirty]
            sleep_for(kind, 0.01)
        g.pause()
        dirty = t.collect()
        shadow[dirty] = g.ram.pages[dirty]
        assert total > (20 if is_kvm(kind) else 100), "the writer must actually have raced with the copies"
        diff = np.flatnonzero((shadow != g.ram.pages).any(axis=1))
        assert len(diff) == 0, f"{len(diff)} pages lost, e.g. {diff[:10]}"
    finally:
        t.stop()


def test_stop_is_idempotent_and_guest_runs_on(boot_guest, kind):
    g = boot_for(boot_guest, kind, "uniform", 16 << 20, rate=10000)
    t = make_tracker(g, kind)
    t.start()
    t.collect()
    t.stop()
    t.stop()
    sleep_for(kind, 0.05)
    assert g.alive() and g.verify()["ok"]


def test_mprotect_survives_max_map_count(boot_guest):
    """Every-other-page writes to 40,000+ pages would need ~80k VMAs (> vm.max_map_count 65530).

    The guest must not crash, and every page written since start must be reported.
    """
    from guests.memory import GuestMemory

    with open("/proc/sys/vm/max_map_count") as f:
        limit = int(f.read())
    npages_written = limit // 2 + 8000
    g = boot_guest("sweep", size=1 << 30, rate=0, stride=2, fill=False)
    t = MprotectTracker(g)
    mem = GuestMemory(g.ram.pages)
    try:
        g.pause()
        t.start()
        ledger_at_start = mem.ledger.copy()
        g.resume()
        deadline = time.monotonic() + 120
        seen = np.zeros(g.npages, dtype=bool)
        while seen.sum() < npages_written and time.monotonic() < deadline:
            time.sleep(0.2)
            seen[t.collect()] = True
            assert g.alive(), "the guest must not crash on ENOMEM from mprotect"
        assert seen.sum() >= npages_written, f"only {seen.sum()} pages seen"
        g.pause()
        seen[t.collect()] = True
        written = np.flatnonzero(mem.ledger != ledger_at_start)
        written = written[written >= mem.first_data_page]
        assert len(written) >= npages_written
        assert seen[written].all(), f"{(~seen[written]).sum()} written pages never reported"
        assert g.verify()["ok"]
    finally:
        del mem
        t.stop()


def test_mprotect_start_waits_for_a_memfd_the_command_outran(boot_guest):
    """The parent publishes MPROT_START (CMD_SEQ) and then sends the bitmap memfd; a guest
    writing flat out checks CMD_SEQ between steps and can see the command before the fd
    arrives.  It must wait for the fd, not fail with EBADF (a CI run once reported "the guest
    could not install its SIGSEGV handler (Bad file descriptor)").  The fault, injected: the
    fd is sent 0.2 s after the command is published."""
    import socket

    from guests.control import Command, Field

    g = boot_guest("hotcold", size=16 << 20, rate=0)
    nwords = -(-g.npages // 64)
    fd = os.memfd_create("vmem-test-bitmap", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 2 * nwords * 8)
        c = g.ctl
        c[Field.CMD] = int(Command.MPROT_START)
        c[Field.ARG] = 0
        seq = c[Field.CMD_SEQ] + 1
        c[Field.CMD_SEQ] = seq              # published first, as post() does ...
        time.sleep(0.2)                     # ... and the fd late
        socket.send_fds(g._sock, [b"w"], [fd])
        assert g.wait_ack(seq, 10.0, "MPROT_START") >= 0
        assert g.mprotect_stop() >= 0
        assert g.alive() and g.verify()["ok"]
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# collecting with the guest stopped (vmem.tracking.stopped, vmem migrate --collect-stop)
# ---------------------------------------------------------------------------------------

SPIN = "import time\nwhile True:\n    sum(range(1000))\n"
SLEEP = "import time\nwhile True:\n    time.sleep(0.2)\n"


@pytest.fixture
def child():
    """A Python child process running ``code``; reaped (and continued first) on every path."""
    import signal
    import subprocess
    import sys

    procs = []

    def start(code: str):
        p = subprocess.Popen([sys.executable, "-c", code])
        procs.append(p)
        time.sleep(0.3)  # running its loop
        return p

    yield start
    for p in procs:
        try:
            p.send_signal(signal.SIGCONT)
            p.kill()
        except ProcessLookupError:
            pass
        p.wait(10)


def test_a_running_process_is_stopped_for_the_block_and_continued(child):
    from vmem.tracking.stopped import _thread_states, process_stopped

    p = child(SPIN)
    # A generous bound: on a loaded machine (pytest -n 2) the spinning child may wait for a
    # CPU before it can act on the signal; the 1 ms default is for a guest that is on one.
    with process_stopped(p.pid, wait_s=5.0) as stood:
        assert stood.stopped and stood.stop_wait_ns > 0
        assert set(_thread_states(p.pid)) <= {b"T", b"t"}, "every thread stopped inside the block"
        time.sleep(0.01)
    assert stood.stood_ns >= 10_000_000
    time.sleep(0.05)
    assert b"R" in _thread_states(p.pid), "continued after the block"


def test_a_sleeping_process_is_not_waited_for_and_is_continued_after_an_error(child):
    from vmem.tracking.stopped import _thread_states, process_stopped

    p = child(SLEEP)
    with pytest.raises(RuntimeError, match="in the block"):
        with process_stopped(p.pid) as stood:
            assert not stood.stopped and stood.stop_wait_ns == 0  # it was asleep: no wait
            raise RuntimeError("in the block")
    time.sleep(0.3)
    assert not set(_thread_states(p.pid)) & {b"T", b"t"}, "continued on the way out of an error"
    assert p.poll() is None


def test_stopping_a_process_that_is_gone_raises_before_anything_is_done(child):
    from vmem.tracking.stopped import process_stopped

    p = child(SLEEP)
    p.kill()
    p.wait(10)
    with pytest.raises(ProcessLookupError):
        with process_stopped(p.pid):
            pytest.fail("the block must not run")


class _StoppedCollect(_Wrapped):
    """The tracker, each collect made with the guest's process stopped (--collect-stop)."""

    def __init__(self, tracker, pid: int):
        super().__init__(tracker)
        self.pid = pid

    def collect(self):
        from vmem.tracking.stopped import process_stopped

        with process_stopped(self.pid):
            return self.tracker.collect()


def test_a_stopped_collect_loses_no_write(boot_guest):
    """Completeness with the guest stopped for each collect, and it runs on after them."""
    needs_uffd_wp("uffd-wp")
    g = boot_guest("uniform", size=16 << 20, rate=0)
    missed, written = unreported_writes(g, _StoppedCollect(make_tracker(g, "uffd-wp"), g.pid))
    assert written > 1000, "the guest must actually have written while tracked"
    assert len(missed) == 0, f"{len(missed)} written pages never reported, e.g. {missed[:10]}"
    steps = g.counters()["steps"]
    time.sleep(0.05)
    assert g.counters()["steps"] > steps, "the guest runs on after the stopped collects"
    assert g.verify()["ok"]
