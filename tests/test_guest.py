"""Guest processes: boot, cooperative pause/resume, context, verification, crash detection."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from guests.control import GuestState
from guests.launch import GuestSpec, ProcessGuest
from vmem.errors import GuestCrashed


def test_boot_runs_and_verifies(boot_guest):
    g = boot_guest("uniform", rate=20000)
    time.sleep(0.3)
    c = g.counters()
    assert g.state == GuestState.RUNNING
    assert c["steps"] > 0 and c["pages_written"] > 0
    res = g.verify()
    assert res["ok"], res
    assert res["pages_checked"] > 0


def test_pause_stops_progress_and_resume_continues(boot_guest):
    g = boot_guest("uniform", rate=50000)
    time.sleep(0.2)
    info = g.pause()
    assert g.state == GuestState.PAUSED
    assert info.context and info.paused_at_ns > 0
    snap = g.ram.pages.copy()
    steps = g.counters()["steps"]
    time.sleep(0.1)
    # Paused: no step ran and RAM did not change.
    assert g.counters()["steps"] == steps
    assert np.array_equal(snap, g.ram.pages)
    g.resume()
    time.sleep(0.1)
    assert g.counters()["steps"] > steps
    assert g.verify()["ok"]


def test_pause_latency_is_measured_and_repeated_pauses_work(boot_guest):
    """20 pause/resume cycles; each reports a latency (the benchmark reports the figures)."""
    g = boot_guest("uniform", rate=5000)
    for _ in range(20):
        info = g.pause()
        assert info.latency_ns > 0 and g.state == GuestState.PAUSED
        g.resume()
        time.sleep(0.002)
    assert g.verify()["ok"]


def test_acknowledged_commands_leave_their_wake_bytes_to_the_next_wait(boot_guest):
    """wait_ack returns as soon as the acknowledgement is there, without draining the
    socket (the drain ran inside the downtime): the bytes left are read by a later wait.
    Many commands in a row -- more one-byte acknowledgements than a unix socket buffer holds
    -- all complete, a wait for the first step still waits, and fds riding on the bytes are
    still collected (SEND_UFFD)."""
    import select

    g = boot_guest("uniform", rate=5000)
    for _ in range(1500):
        g.pause()
        g.resume()
    assert g.uffd() >= 0  # the fd rides on a byte behind the ones left over
    assert g.wait_first_step(10) >= g.counters()["resumed_at_ns"]
    readable, _, _ = select.select([g._sock], [], [], 0)
    if readable:  # a later wait drains what the last ones left
        g._drain_socket()
    assert not select.select([g._sock], [], [], 0)[0]
    assert g.verify()["ok"]


def test_waiting_for_the_first_step_gives_up_and_notices_a_crash(boot_guest, monkeypatch):
    """wait_first_step() blocks on the guest's socket: a guest that makes no step (a
    test-only stall before its first step) is reported unresponsive at the timeout, and one
    that dies meanwhile is reported crashed, not waited on."""
    from guests.runtime import STALL_ENV
    from vmem.errors import GuestUnresponsive

    src = boot_guest("hotcold", rate=20000)
    time.sleep(0.1)
    info = src.pause()
    monkeypatch.setenv(STALL_ENV, "0:20000")
    dst = ProcessGuest.incoming(src.spec, src.npages)
    try:
        dst.ram.pages[:] = src.ram.pages
        dst.resume(info.context)
        with pytest.raises(GuestUnresponsive, match="ran no step"):
            dst.wait_first_step(timeout_s=0.3)
        os.kill(dst.pid, signal.SIGKILL)
        with pytest.raises(GuestCrashed):
            dst.wait_first_step(timeout_s=20)
    finally:
        dst.close()


def test_a_rehearsal_leaves_both_guests_as_they_were(boot_guest):
    """PREPARE (the rehearsal before a pause) on a running and on an incoming guest: the
    running one's next context is unchanged by it, and the incoming one, resumed after it,
    carries the source's workload state, not the fresh one it rehearsed with."""
    import json

    src = boot_guest("hotcold", rate=20000)
    time.sleep(0.1)
    assert src.prepare() is True
    info = src.pause()
    assert src.prepare() is True  # paused: encodes and discards, the saved context stays
    ctx = json.loads(info.context)
    dst = ProcessGuest.incoming(src.spec, src.npages)
    try:
        dst.ram.pages[:] = src.ram.pages
        assert dst.prepare() is True
        dst.resume(info.context)
        dst.wait_first_step()
        again = json.loads(dst.pause().context)
        # the paced workload's progress counts on from the source's, never from zero
        assert again["workload"]["state"]["done_pages"] >= ctx["workload"]["state"]["done_pages"] > 0
        assert again["runtime"]["steps"] > ctx["runtime"]["steps"]
        assert dst.verify()["ok"]
    finally:
        dst.close()


def test_incoming_guest_continues_from_context(boot_guest):
    """Copy RAM + context by hand into an incoming guest: it resumes and verifies."""
    src = boot_guest("hotcold", rate=20000)
    time.sleep(0.2)
    info = src.pause()
    dst = ProcessGuest.incoming(src.spec, src.npages)
    try:
        assert dst.state == GuestState.INCOMING
        dst.ram.pages[:] = src.ram.pages
        dst.resume(info.context)
        first = dst.wait_first_step()
        assert first > info.paused_at_ns
        time.sleep(0.1)
        c = dst.counters()
        assert c["steps"] > src.counters()["steps"]  # step counter carried over and grew
        assert dst.verify()["ok"]
    finally:
        dst.close()


def test_crash_is_reported(boot_guest):
    g = boot_guest("uniform", rate=1000)
    os.kill(g.pid, signal.SIGKILL)
    with pytest.raises(GuestCrashed, match="signal 9"):
        g.pause(timeout_s=5)


def test_bad_workload_fails_boot_with_message():
    from vmem.errors import VmemError

    with pytest.raises(VmemError):
        ProcessGuest.boot(GuestSpec("no_such_module:Nope", {}, 1), 8 << 20, timeout_s=30)


def test_throttle_slows_the_guest_and_can_be_lifted(boot_guest):
    """Auto-converge's lever: a 90% throttle must cut progress well below the unthrottled rate."""
    g = boot_guest("uniform", rate=0, size=16 << 20)

    def progress(s=0.3):
        c0 = g.counters()
        time.sleep(s)
        c1 = g.counters()
        return c1["pages_written"] - c0["pages_written"], c1["throttled_s"] - c0["throttled_s"]

    free, stolen_free = progress()
    g.set_throttle(0.9)
    assert g.throttle == pytest.approx(0.9)
    slow, stolen = progress()
    assert stolen > 0 and stolen_free == 0
    g.set_throttle(0.0)
    free_after, stolen_after = progress()
    assert stolen_after == 0
    # The unthrottled rate is the better of the windows around the throttled one: a loaded
    # machine can starve the guest in one window, not make the throttle look stronger.
    assert slow < 0.5 * max(free, free_after), (slow, free, free_after)
    with pytest.raises(ValueError):
        g.set_throttle(1.5)
    g.pause()
    assert g.verify()["ok"]
