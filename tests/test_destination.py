"""The destination process under bad input: every case is a clear error, nothing is left.

Each test talks to a real ``python -m vmem.migration.destination`` over a socketpair, as a source
would, and checks the ERROR record it sends back, its exit status, and (through the
no_leaks fixture) that its incoming guest was reaped.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest

from transport import channel_pair
from vmem.format import control, stream
from vmem.format import wire
from vmem.migration.local import spawn_destination
from vmem.pages import PAGE_SIZE


@pytest.fixture
def dest():
    """(channel to a fresh destination process, process); always reaped."""
    src_ch, dst_ch = channel_pair()
    proc = spawn_destination(dst_ch.fileno())
    dst_ch.close()
    src_ch.settimeout(60)
    try:
        yield src_ch, proc
    finally:
        src_ch.close()
        try:
            proc.wait(30)
        except Exception:
            proc.kill()
            proc.wait()


def read_control(ch):
    return control.ControlReader(ch.recv_exact).read()


def expect_error(ch, proc, needle):
    ctype, body = read_control(ch)
    assert ctype == wire.ControlType.ERROR, ctype
    err = control.decode_json(body)
    assert needle.lower() in err["message"].lower(), err
    ch.close()
    assert proc.wait(30) == 1
    return err


def preamble(npages=64, workload="idle"):
    return control.encode_preamble({"guest": {"workload": workload, "params": {}, "seed": 1},
                                   "npages": npages, "page_size": PAGE_SIZE, "verify": True, "guest_check": True})


def start(ch, npages=64):
    ch.send(preamble(npages))
    ctype, body = read_control(ch)
    assert ctype == wire.ControlType.READY
    assert control.decode_json(body)["guest_pid"] > 0


def start_stream(ch, npages=64) -> stream.StreamWriter:
    """Preamble, READY, and the stream's opening records: a writer ready for PAGE_DATA."""
    start(ch, npages)
    w = stream.StreamWriter(ch.send_parts)
    w.begin()
    return w


def test_peer_that_speaks_something_else(dest):
    ch, proc = dest
    ch.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64)
    err = expect_error(ch, proc, "vmem")
    assert err["phase"] == "setup"


def test_oversized_preamble_is_refused_without_allocating(dest):
    ch, proc = dest
    ch.send(b"vmem-migrate-v1\n" + struct.pack("<I", 0xFFFFFFF0))
    expect_error(ch, proc, "preamble")


def test_guest_larger_than_memory_is_refused(dest):
    ch, proc = dest
    ch.send(preamble(npages=1 << 40))
    expect_error(ch, proc, "cannot host")


def test_garbage_after_preamble(dest):
    ch, proc = dest
    start(ch)
    ch.send(b"\x00" * 64)
    expect_error(ch, proc, "")


def test_pfn_beyond_guest_ram(dest):
    ch, proc = dest
    w = start_stream(ch)
    page = np.zeros((1, PAGE_SIZE), dtype=np.uint8)
    w.page_data(np.array([64], dtype=np.int64), [page.data])  # guest has pages 0..63
    expect_error(ch, proc, "pfn")


def test_oversized_record_length(dest):
    ch, proc = dest
    start_stream(ch)
    ch.send(struct.pack("<II", wire.LibxcRecordType.PAGE_DATA, 0xFFFFFFF0))
    expect_error(ch, proc, "")


def test_stream_that_stops_midway(dest):
    """A source that dies mid-stream: the destination cleans up and exits 1."""
    ch, proc = dest
    start_stream(ch)
    pages = np.zeros((4, PAGE_SIZE), dtype=np.uint8)
    parts = stream.record(wire.LibxcRecordType.PAGE_DATA, [stream.page_data_header(np.arange(4)), pages.data])
    data = b"".join(bytes(p) for p in parts)
    ch.send(data[: len(data) // 2])
    ch.close()
    assert proc.wait(30) == 1


def test_stream_without_guest_context(dest):
    ch, proc = dest
    w = start_stream(ch)
    w.end_libxc()
    w.end_libxl()
    expect_error(ch, proc, "EMULATOR_CONTEXT")


def test_prepare_pause_is_answered_and_refused_after_a_postcopy_switch_began(dest):
    """PREPARE_PAUSE: the destination rehearses (with its guest) and answers PREPARED; the
    same record once post-copy has begun is a malformed stream, refused with its name."""
    ch, proc = dest
    ch.send(control.encode_preamble({"guest": {"workload": "idle", "params": {}, "seed": 1}, "npages": 64,
                                     "page_size": PAGE_SIZE, "verify": True, "guest_check": True,
                                     "postcopy": True}))
    ctype, body = read_control(ch)
    ready = control.decode_json(body)
    assert ctype == wire.ControlType.READY and ready["prepare_pause"] is True
    if not ready.get("postcopy"):
        pytest.skip(f"the destination cannot arm post-copy here: {ready.get('postcopy_unavailable')}")
    w = stream.StreamWriter(ch.send_parts)
    w.begin()
    w.write_record(wire.VmemRecordType.PREPARE_PAUSE)
    ctype, body = read_control(ch)
    assert ctype == wire.ControlType.PREPARED, ctype
    answer = control.decode_json(body)
    assert answer["guest"] is True and answer["ms"] > 0
    w.write_record(wire.PostcopyRecordType.BEGIN)
    w.write_record(wire.VmemRecordType.PREPARE_PAUSE)
    expect_error(ch, proc, "PREPARE_PAUSE outside the pre-copy phase")


def test_rollback_after_resume_discards_guest(dest):
    """A complete, valid stream of an idle guest, then ROLLBACK: the guest is discarded."""
    from guests.launch import GuestSpec, ProcessGuest

    ch, proc = dest
    with ProcessGuest.boot(GuestSpec("idle", {}, 1), 64 * PAGE_SIZE) as g:
        info = g.pause()
        w = start_stream(ch)
        w.page_data(np.arange(64), [g.ram.pages.data])
        w.end_libxc()
        w.emulator_context(info.context)
        w.end_libxl()
        resumed_checked_then_rolled_back(ch, proc)


def resumed_checked_then_rolled_back(ch, proc) -> dict:
    """The destination's answers to a complete stream of 64 pages -- RESUMED, DIGESTS, a
    passed GUEST_CHECK -- then ROLLBACK: it discards the guest and exits 1.  Returns RESUMED."""
    ctype, body = read_control(ch)
    assert ctype == wire.ControlType.RESUMED, (ctype, body)
    resumed = control.decode_json(body)
    ctype, body = read_control(ch)
    assert ctype == wire.ControlType.DIGESTS and len(body) == 64 * 8
    ctype, body = read_control(ch)
    assert ctype == wire.ControlType.GUEST_CHECK and control.decode_json(body)["ok"]
    ch.send_parts(control.encode_control(wire.ControlType.ROLLBACK))
    assert proc.wait(30) == 1
    return resumed


def _rehearsed_tail(ch, pages=None, context=b"{}"):
    """Preamble, READY, the opening records, PREPARE_PAUSE and its PREPARED; then the bytes
    of ``pages`` (PAGE_DATA, all 64) and the stream's closing records, built in memory and
    returned -- the caller sends them in one piece, as a stop-and-copy does."""
    start(ch)
    buf = bytearray()
    w = stream.StreamWriter(lambda parts: buf.extend(b"".join(bytes(memoryview(p).cast("B")) for p in parts)))
    w.begin()
    w.write_record(wire.VmemRecordType.PREPARE_PAUSE)
    ch.send(bytes(buf))
    ctype, _ = read_control(ch)
    assert ctype == wire.ControlType.PREPARED, ctype
    buf.clear()
    if pages is not None:
        w.page_data(np.arange(64), [pages])
    w.end_of_stream(64, context)
    return bytes(buf)


def test_pages_and_closing_records_received_in_one_piece_are_placed(dest):
    """After PREPARE_PAUSE the destination reads ahead: the final pages and the six closing
    records sent in one piece arrive in one receive, page payloads partly from its buffer.
    The guest's own check of its RAM passes only if every page landed where it belongs."""
    from guests.launch import GuestSpec, ProcessGuest

    ch, proc = dest
    with ProcessGuest.boot(GuestSpec("idle", {}, 1), 64 * PAGE_SIZE) as g:
        info = g.pause()
        ch.send(_rehearsed_tail(ch, g.ram.pages, info.context))
        assert resumed_checked_then_rolled_back(ch, proc)["pages_received"] == 64


def test_octets_after_the_libxl_end_are_refused_before_the_guest_resumes(dest):
    """Nothing may follow the libxl END until the destination answers RESUMED: octets read
    ahead past it are a malformed stream, and the incoming guest is not resumed."""
    ch, proc = dest
    ch.send(_rehearsed_tail(ch) + bytes(8))
    expect_error(ch, proc, "octets after the libxl END")


def test_a_failing_page_write_is_reported_not_lost():
    """The destination's placer thread: a pwrite failure surfaces in the receiving thread."""
    import os
    import types

    from vmem.migration.destination import _Placer
    from vmem.errors import MigrationError

    r, w = os.pipe()
    os.close(w)
    placer = _Placer(types.SimpleNamespace(fd=r, address=0), None)  # pwrite on a pipe's read end fails (EBADF)
    try:
        slot = placer.acquire()
        placer.submit(slot, np.arange(4, dtype=np.int64), 4)
        with pytest.raises(MigrationError, match="placing pages failed"):
            placer.flush()
    finally:
        placer.stop()
        os.close(r)


def _fds(pid: int) -> list[str]:
    import os

    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass
    return out


def test_incoming_guest_is_forked_and_holds_none_of_the_destinations_descriptors(dest):
    """The destination forks its incoming guest (no second interpreter: the handshake's
    largest avoidable part).  The child must hold only its own descriptors: no socket of the
    destination's (a source waiting for EOF would not see it while the guest lives), no
    memfd but its RAM and control block; and READY says where the handshake's time went."""
    import os

    ch, proc = dest
    ch.send(preamble(npages=256, workload="hotcold"))
    ctype, body = read_control(ch)
    assert ctype == wire.ControlType.READY
    ready = control.decode_json(body)
    gpid = ready["guest_pid"]
    with open(f"/proc/{gpid}/cmdline", "rb") as f:
        guest_cmd = f.read()
    with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
        dest_cmd = f.read()
    assert guest_cmd == dest_cmd and b"guests.runtime" not in guest_cmd  # forked, not a new interpreter
    with open(f"/proc/{gpid}/status") as f:
        assert f"PPid:\t{proc.pid}" in f.read()
    guest_fds = _fds(gpid)
    assert sum(1 for x in guest_fds if x.startswith("socket:")) == 1, guest_fds  # its own command socket only
    dest_sockets = {x for x in _fds(proc.pid) if x.startswith("socket:")}
    assert len(dest_sockets) >= 2 and not dest_sockets & {x for x in guest_fds if x.startswith("socket:")}
    # RAM and control block only (the runtime maps each through its own descriptor too)
    assert {x for x in guest_fds if x.startswith("/memfd:")} == {"/memfd:vmem-ram-incoming (deleted)",
                                                                 "/memfd:vmem-ctl (deleted)"}, guest_fds
    ms = ready["setup_ms"]
    assert ms["destination_imports"] > 0 and ms["guest_start"] > 0 and ms["destination_waited"] >= 0
    ch.close()
    proc.wait(30)
    for _ in range(100):  # the guest dies with its parent (PDEATHSIG)
        if not os.path.exists(f"/proc/{gpid}"):
            break
        import time

        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{gpid}")


def test_exec_guest_start_still_works(monkeypatch):
    """VMEM_GUEST_START=exec (what scripts/bench_handshake.py compares against): a new
    interpreter runs guests.runtime, and the migration still verifies."""
    import time

    from vmem.migration.backend import GuestSpec, boot_guest
    from vmem.migration.local import run_local_migration
    from vmem.migration.source import MigrationOptions

    monkeypatch.setenv("VMEM_GUEST_START", "exec")
    with boot_guest(GuestSpec("hotcold", {"rate": 2000}, 3), 4 << 20) as guest:
        time.sleep(0.2)
        r = run_local_migration(guest, MigrationOptions(observe_s=0.1))
    assert r.outcome == "completed" and r.verified, r.reason
    assert r.timings_ms["setup_guest_start"] > 0


def test_a_destination_started_ahead_serves_one_migration_and_is_reaped():
    """LocalDestination: started before the guest boots, taken over by run_local_migration;
    reused or started for other options it is refused (and reaped); one never used exits
    quietly when closed."""
    import time

    from vmem.errors import ConfigError
    from vmem.migration.backend import GuestSpec, boot_guest
    from vmem.migration.local import LocalDestination, run_local_migration
    from vmem.migration.source import MigrationOptions

    opts = MigrationOptions(observe_s=0.1)
    unused = LocalDestination.start(opts)
    assert unused.close() == 0 and unused.proc.returncode == 0   # EOF before the preamble: nothing to report
    dest = LocalDestination.start(opts)
    with boot_guest(GuestSpec("hotcold", {"rate": 2000}, 3), 4 << 20) as guest:
        time.sleep(0.3)
        r = run_local_migration(guest, opts, destination=dest)
    assert r.outcome == "completed" and r.verified, r.reason
    assert dest.proc.returncode == 0 and r.processes["destination_exit_status"] == 0
    # it waited for the preamble: its imports ran while the guest booted
    assert r.timings_ms["setup_destination_waited"] > 0 and r.timings_ms["setup_destination_imports"] > 0
    with boot_guest(GuestSpec("idle", {}, 3), 1 << 20) as guest:
        with pytest.raises(ConfigError, match="one migration"):
            run_local_migration(guest, opts, destination=dest)                     # used already
        other = LocalDestination.start(opts)
        with pytest.raises(ConfigError, match="post-copy"):
            run_local_migration(guest, MigrationOptions(postcopy="pure"), destination=other)  # lacks the urgent link
        assert other.proc.returncode is not None                                  # refused and reaped
        assert guest.alive()                                                      # the source guest untouched
