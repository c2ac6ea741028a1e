"""Guests outlive their agent: restart, take-over, lost guests, and every refusal of the
take-over (vmem.agent.records, guests.owner; docs/agent.md "Restarts and upgrades").

Agents are subprocesses (the harness of tests/test_agent.py); ``AgentProc.stop()`` kills
the guests recorded in the agent's state directory, so nothing outlives a test.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from test_agent import ROOT, AgentProc, _env, _pid_alive  # noqa: F401  (the harness of the agent tests)
from test_agent import agents, key, workdir  # noqa: F401  (fixtures)

SIZE = "8M"


def _record(agent: AgentProc, name: str) -> dict:
    with open(os.path.join(agent.state_dir, "guests", f"{name}.json")) as f:
        return json.load(f)


def _write_record(agent: AgentProc, name: str, record: dict) -> None:
    path = os.path.join(agent.state_dir, "guests", f"{name}.json")
    with open(path, "w") as f:
        json.dump(record, f)
    os.chmod(path, 0o600)


def _restart(agents, old: AgentProc, n: int, **kwargs) -> AgentProc:  # noqa: F811
    """A new agent on ``old``'s state directory (its own log file)."""
    try:
        os.unlink(os.path.join(old.state_dir, "agent.json"))  # a killed agent's: wait for the new one's
    except FileNotFoundError:
        pass
    return agents(old.name, log_name=f"{old.name}-{n}", **kwargs)


def _steps_advance(agent: AgentProc, name: str, timeout_s: float = 10.0) -> bool:
    first = agent.guests()[name]["steps"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if agent.guests()[name]["steps"] > first:
            return True
        time.sleep(0.05)
    return False


def _verify_ok(agent: AgentProc, name: str) -> dict:
    check = agent.request("verify", name=name)["check"]
    assert check["ok"] and check["bad_pages"] == 0, check
    return check


def test_four_guests_survive_stop_and_kill_then_verify_and_migrate(agents, key):  # noqa: F811
    a = agents("a", key=key)
    b = agents("b", key=key)
    names = ["g0", "g1", "g2", "g3"]
    for i, name in enumerate(names):
        a.request("create", name=name, workload="hotcold" if i % 2 else "uniform", size=SIZE, seed=i + 1)
    pids = {n: g["pid"] for n, g in a.guests().items()}
    for pid in pids.values():
        assert os.getsid(pid) == pid  # each leads its own session: a terminal's Ctrl-C never reaches it
    for name in names:
        assert oct(os.stat(os.path.join(a.state_dir, "guests", f"{name}.json")).st_mode & 0o777) == "0o600"
        assert _record(a, name)["state"] == "running"

    assert a.stop(keep_guests=True) == 0
    assert "leaving guest g0" in a.log()
    assert all(_pid_alive(p) for p in pids.values())

    a2 = _restart(agents, a, 2, key=key)
    listed = a2.guests()
    assert {n: g["pid"] for n, g in listed.items()} == pids
    assert all(g["state"] == "running" for g in listed.values()), listed
    for name in names:
        assert _steps_advance(a2, name), name
        _verify_ok(a2, name)
    assert "took over guest g3" in a2.log()

    # A taken-over guest migrates as usual (its uffd is asked for again), and arrives verified.
    run = a2.cli("migrate", "g0", b.address, "--quiet", "--json", os.path.join(a.state_dir, "..", "r.json"))
    assert run.returncode == 0, run.stderr + a2.log() + b.log()
    with open(os.path.join(a.state_dir, "..", "r.json")) as f:
        report = json.load(f)
    assert report["outcome"] == "completed" and report["verified"], report
    assert "g0" not in a2.guests() and not os.path.exists(os.path.join(a.state_dir, "guests", "g0.json"))
    assert not _pid_alive(pids["g0"])
    assert b.guests()["g0"]["state"] == "running"

    # Killed outright, the agent leaves its guests running too.
    a2.kill()
    a3 = _restart(agents, a, 3, key=key)
    assert {n: g["pid"] for n, g in a3.guests().items()} == {n: pids[n] for n in names[1:]}
    for name in names[1:]:
        _verify_ok(a3, name)
    destroyed = a3.cli("destroy", "g1")
    assert destroyed.returncode == 0, destroyed.stderr
    assert not _pid_alive(pids["g1"]) and not os.path.exists(os.path.join(a.state_dir, "guests", "g1.json"))


def test_a_guest_that_died_while_no_agent_ran_is_listed_lost(agents):  # noqa: F811
    a = agents("a")
    a.request("create", name="g1", workload="idle", size=SIZE)
    pid = a.guests()["g1"]["pid"]
    a.stop(keep_guests=True)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    a2 = _restart(agents, a, 2)
    row = a2.guests()["g1"]
    assert row["state"] == "lost" and f"pid {pid}" in row["reason"] and "ended" in row["reason"], row
    assert "guest g1 was lost" in a2.log()
    refused = a2.cli("verify", "g1")
    assert refused.returncode == 1 and "lost" in refused.stderr
    assert a2.cli("destroy", "g1").returncode == 0
    assert a2.guests() == {} and os.listdir(os.path.join(a.state_dir, "guests")) == []


def test_a_recycled_pid_is_not_taken_for_the_guest(agents):  # noqa: F811
    a = agents("a")
    a.request("create", name="g1", workload="idle", size=SIZE)
    pid = a.guests()["g1"]["pid"]
    a.stop(keep_guests=True)
    record = _record(a, "g1")
    record["start_ticks"] += 1  # as if pid had been reused by another process since
    _write_record(a, "g1", record)
    a2 = _restart(agents, a, 2)
    row = a2.guests()["g1"]
    assert row["state"] == "lost" and row["pid"] is None, row
    assert _pid_alive(pid)  # not ours to touch: nothing was signalled
    os.kill(pid, signal.SIGKILL)


def test_a_wrong_token_is_refused_by_the_guest_and_the_guest_runs_on(agents):  # noqa: F811
    a = agents("a")
    a.request("create", name="g1", workload="idle", size=SIZE)
    pid = a.guests()["g1"]["pid"]
    a.stop(keep_guests=True)
    record = _record(a, "g1")
    record["token"] = "00" * 32
    _write_record(a, "g1", record)
    a2 = _restart(agents, a, 2)
    row = a2.guests()["g1"]
    assert row["state"] == "lost" and "wrong token" in row["reason"], row
    assert _pid_alive(pid)
    os.kill(pid, signal.SIGKILL)


def test_an_untrusted_record_file_is_ignored(agents):  # noqa: F811
    a = agents("a")
    a.request("create", name="g1", workload="idle", size=SIZE)
    pid = a.guests()["g1"]["pid"]
    a.stop(keep_guests=True)
    os.chmod(os.path.join(a.state_dir, "guests", "g1.json"), 0o644)
    a2 = _restart(agents, a, 2)
    assert a2.guests() == {}
    assert "must be a regular file of uid" in a2.log()
    os.kill(pid, signal.SIGKILL)


def test_an_impostor_on_the_guest_socket_is_refused(agents):  # noqa: F811
    """Another process of ours listening where the guest's socket was: SO_PEERCRED names it,
    not the recorded guest, and nothing is taken from it."""
    a = agents("a")
    a.request("create", name="g1", workload="idle", size=SIZE)
    pid = a.guests()["g1"]["pid"]
    a.stop(keep_guests=True)
    path = os.path.join(a.state_dir, "guests", "g1.sock")
    os.unlink(path)
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    impostor.bind(path)
    impostor.listen(1)
    try:
        a2 = _restart(agents, a, 2)
        row = a2.guests()["g1"]
        assert row["state"] == "lost" and f"not the recorded pid {pid}" in row["reason"], row
    finally:
        impostor.close()
        os.kill(pid, signal.SIGKILL)


def _try_take_over(path: str, token: bytes, pid: int, as_uid: int | None = None) -> str:
    """Run the agent's side of the take-over against ``path`` in a child process (as
    ``as_uid`` if given); returns its one-line outcome."""
    code = ("import os, socket, sys\n"
            "from guests.owner import take_over, TakeOverRefused\n"
            f"uid = {as_uid!r}\n"
            "if uid is not None:\n    os.setgid(uid); os.setuid(uid)\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            f"s.connect({path!r})\n"
            "try:\n"
            f"    fds = take_over(s, bytes.fromhex({token.hex()!r}), {pid}, {os.geteuid()})\n"
            "    print('TAKEN', len(fds))\n"
            "except TakeOverRefused as err:\n    print('REFUSED', err)\n")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=30)
    return out.stdout.strip() + out.stderr.strip()[-300:]


def test_the_guest_refuses_a_take_over_while_its_owner_lives(agents):  # noqa: F811
    a = agents("a")
    a.request("create", name="g1", workload="idle", size=SIZE)
    pid = a.guests()["g1"]["pid"]
    record = _record(a, "g1")
    outcome = _try_take_over(os.path.join(a.state_dir, "guests", "g1.sock"), bytes.fromhex(record["token"]), pid)
    assert outcome.startswith("REFUSED") and "live owner" in outcome, outcome
    _verify_ok(a, "g1")  # the owner still commands it


def test_the_guest_refuses_another_user(agents):  # noqa: F811
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    a = agents("a")
    a.request("create", name="g1", workload="idle", size=SIZE)
    pid = a.guests()["g1"]["pid"]
    a.stop(keep_guests=True)
    path = os.path.join(a.state_dir, "guests", "g1.sock")
    record = _record(a, "g1")
    # Open the way the permissions normally bar (0700 directories, 0600 socket), so that
    # the guest's own check is what answers.
    opened = [os.path.dirname(os.path.dirname(a.state_dir)), os.path.dirname(a.state_dir), a.state_dir,
              os.path.dirname(path), path]
    modes = {p: os.stat(p).st_mode & 0o777 for p in opened}
    try:
        for p in opened:
            os.chmod(p, modes[p] | 0o007)
        outcome = _try_take_over(path, bytes.fromhex(record["token"]), pid, as_uid=65534)
    finally:
        for p, m in modes.items():
            os.chmod(p, m)
    assert outcome.startswith("REFUSED") and "uid 65534 may not take this guest over" in outcome, outcome
    a2 = _restart(agents, a, 2)  # and the real owner still can
    assert a2.guests()["g1"]["state"] == "running"


def test_a_migration_in_flight_when_the_source_agent_stops_leaves_the_guest_with_the_source(agents, key):  # noqa: F811
    """SIGTERM mid-pre-copy: the migration fails by the usual rule (the source keeps the
    guest, running), the destination keeps nothing; the restarted agent takes the guest
    over and it verifies and runs.  Then the same with SIGKILL."""
    a = agents("a", key=key)
    b = agents("b", key=key)
    a.request("create", name="g1", workload="hotcold", size="32M", seed=5)
    pid = a.guests()["g1"]["pid"]
    for n, sig in ((2, signal.SIGTERM), (3, signal.SIGKILL)):
        migrate = subprocess.Popen([sys.executable, "-m", "vmem", "migrate", "g1", b.address, "--quiet",
                                    "--bandwidth", "4M", "--agent", a.socket], env=_env(), cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and b.guests().get("g1", {}).get("state") != "incoming":
                time.sleep(0.05)
            assert b.guests()["g1"]["state"] == "incoming"
            assert a.guests()["g1"]["state"] == "migrating"
            assert _record(a, "g1")["state"] == "migrating"
            a.proc.send_signal(sig)
            a.proc.wait(30)
            _out, err = migrate.communicate(timeout=60)
        finally:
            if migrate.poll() is None:
                migrate.kill()
                migrate.wait()
        assert migrate.returncode != 0, err
        assert _pid_alive(pid)
        a.stop(keep_guests=True)
        a = _restart(agents, a, n, key=key)
        row = a.guests()["g1"]
        assert row["pid"] == pid and row["state"] == "running", row
        assert _steps_advance(a, "g1")
        _verify_ok(a, "g1")
        deadline = time.monotonic() + 30  # the destination discards its incoming guest
        while "g1" in b.guests() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "g1" not in b.guests() and not b.guest_children()


def test_an_upgraded_agent_takes_the_guests_over(agents, workdir):  # noqa: F811
    """Stop, "upgrade" (the next agent runs from another copy of the code, with another
    version), start: the guests, still running the code they were started with, are taken
    over, verify and keep running."""
    import shutil

    a = agents("a")
    for i in range(2):
        a.request("create", name=f"g{i}", workload="hotcold", size=SIZE, seed=i + 1)
    pids = {n: g["pid"] for n, g in a.guests().items()}
    a.stop(keep_guests=True)
    new_root = os.path.join(workdir, "vmem-next")
    ignore = shutil.ignore_patterns("__pycache__", "*.o", "*.c")
    for pkg in ("vmem", "guests", "transport"):
        shutil.copytree(os.path.join(ROOT, pkg), os.path.join(new_root, pkg), ignore=ignore)
    init = os.path.join(new_root, "vmem", "__init__.py")
    with open(init) as f:
        text = f.read()
    with open(init, "w") as f:
        f.write(text.replace('__version__ = "', '__version__ = "9.9.9+upgrade-', 1))
    env = dict(_env(), PYTHONPATH=new_root)
    log_path = os.path.join(workdir, "a-upgraded.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vmem", "agent", "--listen", "127.0.0.1:0", "--state-dir",
                                 a.state_dir], env=env, cwd=new_root, stdout=subprocess.DEVNULL, stderr=log)
    try:
        info_path = os.path.join(a.state_dir, "agent.json")
        deadline = time.monotonic() + 30
        while not os.path.exists(info_path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(info_path) as f:
            assert json.load(f)["version"].startswith("9.9.9+upgrade-")
        from vmem.agent.client import AgentClient

        with AgentClient(a.socket) as c:
            rows = {g["name"]: g for g in c.request("list")["guests"]}
            assert {n: g["pid"] for n, g in rows.items()} == pids
            assert all(g["state"] == "running" for g in rows.values()), rows
            for name in pids:
                check = c.request("verify", name=name)["check"]
                assert check["ok"], check
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        a.kill_guests()
    assert all(not _pid_alive(p) for p in pids.values())
