"""The take-over protocol (guests/owner.py), guest records (vmem/agent/records.py) and
DETACH, on their own: every refusal made to fire without agents."""
from __future__ import annotations

import json
import os
import socket
import tempfile
import threading

import pytest

from guests import owner
from guests.launch import GuestSpec, ProcessGuest
from vmem.agent import records
from vmem.errors import GuestError

TOKEN = bytes(range(32))


def _guest_side(sock, token=TOKEN, live=False):
    """Run serve_take_over on ``sock`` in a thread; returns (thread, result holder)."""
    out = {}
    r, w = os.pipe()

    def run():
        out["ok"] = owner.serve_take_over(sock, token, [r, w], lambda: live, lambda conn: out.setdefault("proven", conn))

    t = threading.Thread(target=run)
    t.start()
    return t, out, (r, w)


def _close(*fds):
    for fd in fds:
        os.close(fd)


def test_take_over_succeeds_with_the_token_and_hands_over_the_fds():
    a, g = socket.socketpair()
    t, out, fds = _guest_side(g)
    got = owner.take_over(a, TOKEN, os.getpid(), os.geteuid())
    t.join()
    assert out["ok"] and out["proven"] is g and len(got) == 2
    _close(*got, *fds)
    a.close(), g.close()


def test_the_guest_refuses_a_wrong_token_and_the_agent_says_so():
    a, g = socket.socketpair()
    t, out, fds = _guest_side(g)
    with pytest.raises(owner.TakeOverRefused, match="wrong token"):
        owner.take_over(a, b"\1" * 32, os.getpid(), os.geteuid())
    t.join()
    assert out["ok"] is False and "proven" not in out
    _close(*fds)
    a.close(), g.close()


def test_the_guest_refuses_while_its_owner_lives():
    a, g = socket.socketpair()
    t, out, fds = _guest_side(g, live=True)
    with pytest.raises(owner.TakeOverRefused, match="live owner"):
        owner.take_over(a, TOKEN, os.getpid(), os.geteuid())
    t.join()
    _close(*fds)
    a.close(), g.close()


def test_the_guest_refuses_a_peer_that_sends_something_else():
    a, g = socket.socketpair()
    t, out, fds = _guest_side(g)
    hello, _ = owner.recv_message(a, "hello")
    assert hello.startswith(owner.GUEST_HELLO)
    owner.send_message(a, b"SSH-2.0-OpenSSH_9.2")
    reply, _ = owner.recv_message(a, "reply")
    t.join()
    assert out["ok"] is False and reply.startswith(b"-not a vmem agent")
    _close(*fds)
    a.close(), g.close()


def test_the_agent_refuses_a_guest_that_fails_its_proof_or_speaks_something_else():
    for answer in (b"+" + b"\0" * 32, b"VMEMGST2" + b"\0" * 16):
        a, g = socket.socketpair()

        def fake_guest():
            if answer.startswith(b"+"):
                owner.send_message(g, owner.GUEST_HELLO + b"\0" * 16)
                owner.recv_message(g, "proof")
            owner.send_message(g, answer)

        t = threading.Thread(target=fake_guest)
        t.start()
        with pytest.raises(owner.TakeOverRefused, match="failed its proof|does not speak the vmem take-over"):
            owner.take_over(a, TOKEN, os.getpid(), os.geteuid())
        t.join()
        a.close(), g.close()


def test_the_agent_refuses_a_process_other_than_the_recorded_one():
    a, g = socket.socketpair()
    with pytest.raises(owner.TakeOverRefused, match="not the recorded pid 1 "):
        owner.take_over(a, TOKEN, 1, os.geteuid())
    a.close(), g.close()


def test_an_oversized_message_is_refused_before_it_is_read():
    a, g = socket.socketpair()
    g.sendall((owner.MAX_MESSAGE_BYTES + 1).to_bytes(2, "big"))
    with pytest.raises(owner.TakeOverRefused, match="longer than"):
        owner.recv_message(a, "hello")
    a.close(), g.close()


# --- records ---------------------------------------------------------------------------------


@pytest.fixture
def state_dir():
    with tempfile.TemporaryDirectory(prefix=f"vmem-records-{os.getpid()}-") as d:
        os.chmod(d, 0o700)
        yield d


def _record(name="g1", **kw):
    return {"name": name, "pid": os.getpid(), "start_ticks": records.process_start_ticks(os.getpid()),
            "uid": os.geteuid(), "token": TOKEN.hex(), "size_bytes": 4096, "spec": {}, "origin": "created",
            "state": "running"} | kw


def test_records_round_trip_atomically_with_mode_0600(state_dir):
    records.write_record(state_dir, _record())
    path = os.path.join(records.guests_dir(state_dir), "g1.json")
    assert os.stat(path).st_mode & 0o777 == 0o600
    [(name, rec, why)] = records.read_records(state_dir)
    assert name == "g1" and why == "" and rec["pid"] == os.getpid() and rec["version"] == records.RECORD_VERSION
    assert records.record_matches_process(rec)
    assert not records.record_matches_process(rec | {"start_ticks": rec["start_ticks"] + 1})
    records.remove_record(state_dir, "g1")
    assert records.read_records(state_dir) == []


def test_records_of_another_version_or_garbage_are_refused(state_dir):
    records.write_record(state_dir, _record("g1"))
    records.write_record(state_dir, _record("g2", token="zz"))
    path = os.path.join(records.guests_dir(state_dir), "g1.json")
    with open(path) as f:
        rec = json.load(f)
    with open(path, "w") as f:
        json.dump(rec | {"version": 99}, f)
    got = {name: why for name, _rec, why in records.read_records(state_dir)}
    assert "not a guest record of this vmem version" in got["g1"] and "not a guest record" in got["g2"]


def test_records_in_a_directory_others_can_read_are_ignored(state_dir):
    records.write_record(state_dir, _record())
    os.chmod(records.guests_dir(state_dir), 0o755)
    [(name, rec, why)] = records.read_records(state_dir)
    assert rec is None and "not a private directory" in why


def test_a_leftover_temp_file_is_removed(state_dir):
    records.write_record(state_dir, _record())
    tmp = os.path.join(records.guests_dir(state_dir), "g1.json.123.tmp")
    open(tmp, "w").close()
    assert [n for n, _r, _w in records.read_records(state_dir)] == ["g1"] and not os.path.exists(tmp)


# --- DETACH ------------------------------------------------------------------------------------


def test_detach_twice_is_refused_and_a_detached_guest_survives_its_owner_closing(state_dir):
    guest = ProcessGuest.boot(GuestSpec("idle"), 1 << 20)
    path = os.path.join(state_dir, "g.sock")
    try:
        guest.detach(path)
        assert guest.detached and os.stat(path).st_mode & 0o777 == 0o600
        with pytest.raises(GuestError, match="refused to detach"):
            guest.detach(path + "2")
        assert not os.path.exists(path + "2")
        pid, token = guest.pid, guest.owner_token
        guest.release()  # the owner lets go: the guest runs on and can be taken over
        again = ProcessGuest.take_over(path, token, pid, GuestSpec("idle"))
        try:
            assert again.alive() and again.verify()["ok"]
        finally:
            again.close()
    finally:
        guest.close()
        # release() handed the process over (Popen no longer reaps it): kill and reap it here.
        if guest.proc is not None:
            try:
                os.kill(guest.proc.pid, 9)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(guest.proc.pid, 0)
            except ChildProcessError:
                pass
