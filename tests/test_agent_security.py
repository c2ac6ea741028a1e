"""Tests of the agent's security (docs/security.md): every attack of issue 12, each refused
with a clear message while the agent keeps serving, an existing guest still verifies, and
the agent leaks no descriptor, memfd or child.

Unprivileged callers run as uid 65534 (``setpriv``) in a child process that speaks the
protocol with the standard library only; floods are bounded in count and in time and stay
on loopback.  Every agent is a subprocess stopped by the fixture (see tests/test_agent.py).
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import time

import psutil
import pytest

from test_agent import ROOT, AgentProc, _env  # noqa: F401  (the harness of the agent tests)
from test_agent import agents, key, workdir  # noqa: F401  (fixtures)
from vmem.agent.protocol import MAGIC, PROTOCOL_VERSION, AgentError, ErrorCode

# The flood and the memory figure are the benchmark's own (scripts/bench_agent_hostile.py).
_spec = importlib.util.spec_from_file_location("bench_agent_hostile",
                                               os.path.join(ROOT, "scripts", "bench_agent_hostile.py"))
hostile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostile)

NOBODY = 65534
#: Bounds of the waits below (they assert nothing about time).
WAIT_S = 30.0
MiB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: runs attacks as uid 65534 against a root agent")


# --- helpers -----------------------------------------------------------------------------------


def _hello(purpose: str) -> bytes:
    return MAGIC + hostile.frame({"version": PROTOCOL_VERSION, "purpose": purpose})


def _agent_fds(pid: int) -> dict:
    """The agent's open descriptors by kind (sockets, memfds, other)."""
    kinds = {"socket": 0, "memfd": 0, "other": 0}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        kinds["socket" if target.startswith("socket:") else "memfd" if "memfd:" in target else "other"] += 1
    return kinds


def _agent_sockets(pid: int) -> list[str]:
    """Each of the agent's socket descriptors with its connection as the kernel's tables name
    it (``fd 9: tcp 127.0.0.1:41000 -> 127.0.0.1:52000 CLOSE_WAIT``): what a leak report shows."""
    import re

    states = {"01": "ESTABLISHED", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "0A": "LISTEN"}
    inodes = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            continue
        if m:
            inodes[m.group(1)] = name
    found = {}
    for table in ("tcp", "tcp6", "unix"):
        try:
            lines = open(f"/proc/{pid}/net/{table}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            ino = f[6] if table == "unix" else f[9]
            if ino in inodes:
                if table == "unix":
                    found[ino] = f"unix {' '.join(f[7:]) or '(unnamed)'}"
                else:
                    addr = lambda h: f"{socket.inet_ntoa(bytes.fromhex(h.split(':')[0])[::-1])}:{int(h.split(':')[1], 16)}"
                    local, remote = (addr(x) if table == "tcp" else x for x in f[1:3])
                    found[ino] = f"{table} {local} -> {remote} {states.get(f[3], f[3])}"
    return sorted(f"fd {fd}: {found.get(ino, 'not in the tables (closed by the kernel, descriptor still open)')}"
                  for ino, fd in inodes.items())


class Baseline:
    """What must be the same after an attack: the agent's descriptors, guests, children."""

    def __init__(self, agent: AgentProc):
        self.agent = agent
        self.children = sorted(p.pid for p in agent.guest_children())
        self.guests = sorted(agent.guests())
        # Once every earlier connection is closed: two equal readings in a row, no request between.
        deadline = time.monotonic() + WAIT_S
        last = None
        while True:
            if agent.request("ping")["agent"]["connections"]["open"] <= 1:
                time.sleep(0.2)
                fds = _agent_fds(agent.proc.pid)
                time.sleep(0.2)
                if fds == _agent_fds(agent.proc.pid) and fds == last:
                    break
                last = fds
            assert time.monotonic() < deadline, "the agent never settled"
            time.sleep(0.1)
        self.fds = fds

    def check(self, verify: str | None = None) -> None:
        """The agent serves, ``verify`` still verifies, nothing leaked (waits for
        connection threads to finish closing, bounded).

        The descriptors are read while none of this check's own connections is open (just
        before its ping; the previous ping's socket was given time to close), so the ping
        never counts against the agent; the ping then says no other connection is open."""
        a = self.agent
        assert a.proc.poll() is None, a.log()
        deadline = time.monotonic() + WAIT_S
        while True:
            time.sleep(0.1)
            fds = _agent_fds(a.proc.pid)
            info = a.request("ping")["agent"]
            # The ping's own connection is the one open connection while it is served.
            if fds == self.fds and info["connections"]["open"] <= 1:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"the agent leaked: descriptors {self.fds} -> {fds}, connections {info}; "
                                     f"its sockets now: {_agent_sockets(a.proc.pid)}")
        assert sorted(p.pid for p in a.guest_children()) == self.children
        assert sorted(a.guests()) == self.guests
        if verify is not None:
            assert a.request("verify", name=verify)["check"]["ok"]


# The unprivileged side: stdlib only (it runs as uid 65534 and must not need our modules).
NOBODY_CLIENT = r"""
import json, os, socket, struct, sys
MAGIC = b"VMEMAGT\n"
def frame(obj):
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body
def hello(purpose):
    return MAGIC + frame({"version": 1, "purpose": purpose})
def attempt(connect, payload):
    try:
        s = connect()
    except OSError as err:
        return {"connect_error": err.strerror}
    data = b""
    try:
        s.sendall(payload)
    except OSError:
        pass
    try:
        while len(data) < (1 << 20):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as err:
        pass
    s.close()
    out = {"bytes": len(data)}
    if data.startswith(MAGIC) and len(data) >= 12:
        n = struct.unpack(">I", data[8:12])[0]
        out["reply"] = json.loads(data[12:12 + n])
        out["after_reply_bytes"] = len(data) - 12 - n
    elif data:
        out["raw"] = data[:64].decode("latin1")
    return out
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def tcp():
    return socket.create_connection((host, port), timeout=10)
def unix():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    return s
results = {}
for purpose in ("command", "migrate-in", "vmem-data", "vmem-urgent"):
    results["tcp " + purpose] = attempt(tcp, hello(purpose) + frame({"op": "list"}))
results["tcp save"] = attempt(tcp, hello("command") + frame({"op": "save", "name": "g", "path": "/root/x.save"}))
results["tcp restore"] = attempt(tcp, hello("command") + frame({"op": "restore", "path": "/etc/shadow"}))
results["tcp destroy"] = attempt(tcp, hello("command") + frame({"op": "destroy", "name": "g"}))
results["tcp migrate-in 256M for 4K"] = attempt(tcp, hello("migrate-in") + frame(
    {"op": "migrate-in", "name": "evil", "size_bytes": 4096, "spec": {"workload": "idle"}}))
results["tcp hello + 16 MiB"] = attempt(tcp, MAGIC + struct.pack(">I", 16 << 20))
results["unix command"] = attempt(unix, hello("command") + frame({"op": "list"}))
results["unix restore"] = attempt(unix, hello("command") + frame({"op": "restore", "path": "/etc/shadow"}))
print(json.dumps({"uid": os.getuid(), "results": results}))
"""


def _as_nobody(agent: AgentProc) -> dict:
    run = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c",
                          NOBODY_CLIENT, "127.0.0.1", str(agent.port), agent.socket],
                         capture_output=True, text=True, timeout=120, cwd="/")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["uid"] == NOBODY
    return out["results"]


def _only_refusals(results: dict, *, socket_reachable: bool) -> None:
    """Every attempt got nothing but a refusal: no connection, or one error reply naming
    the uid and nothing after it -- never data of the agent."""
    for what, got in results.items():
        if "connect_error" in got:
            assert what.startswith("unix") and not socket_reachable, (what, got)
            continue
        assert "raw" not in got, (what, got)
        if what == "tcp hello + 16 MiB" and "reply" not in got:
            continue
        reply = got["reply"]
        assert reply["ok"] is False and reply["code"] == ErrorCode.AUTH, (what, got)
        assert f"uid {NOBODY} may not" in reply["error"], (what, got)
        assert got["after_reply_bytes"] == 0, (what, got)


# --- who may do what ---------------------------------------------------------------------------


def test_unprivileged_user_gets_nothing_but_refusals(agents):
    """uid 65534 against a root agent in its default configuration (no key, loopback): on
    every TCP purpose and on the control socket, only a refusal comes back."""
    a = agents("a")
    a.request("create", name="g", workload="hotcold", size="16M")
    base = Baseline(a)

    results = _as_nobody(a)
    assert results["unix command"]["connect_error"] == "Permission denied"  # mode 0600 in a 0700 directory
    _only_refusals(results, socket_reachable=False)
    log = a.wait_log(f"uid {NOBODY} may not use this agent")
    assert "evil" not in log and not os.path.exists("/root/x.save")

    # Even if the socket were reachable (a careless chmod), SO_PEERCRED refuses the caller.
    workdir = os.path.dirname(a.state_dir)
    for path, mode in ((workdir, 0o711), (a.state_dir, 0o711), (a.socket, 0o666)):
        os.chmod(path, mode)
    try:
        results = _as_nobody(a)
    finally:
        for path, mode in ((a.socket, 0o600), (a.state_dir, 0o700), (workdir, 0o700)):
            os.chmod(path, mode)
    _only_refusals(results, socket_reachable=True)
    assert "only its own user (uid 0) or root" in results["unix command"]["reply"]["error"]
    base.check(verify="g")


def test_unprivileged_user_gets_nothing_from_a_keyed_agent(agents, key):
    a = agents("a", key=key)
    a.request("create", name="g", workload="idle", size="8M")
    base = Baseline(a)
    results = _as_nobody(a)
    for what, got in results.items():
        if what.startswith("unix"):
            assert got["connect_error"] == "Permission denied"
        else:  # the key handshake fails: the connection is closed, nothing of the agent's
            assert "reply" not in got and "ok" not in got.get("raw", ""), (what, got)
    assert a.guests()["g"]["state"] == "running"
    base.check(verify="g")


def test_tcp_commands_need_an_authenticated_peer(agents, key):
    """Without a key the TCP port takes no command, even from root; with one it does, but
    never save/restore (they name files on the agent's host)."""
    from transport import SocketChannel
    from transport.secure import MacChannel, authenticate_client, load_key
    from vmem.agent.protocol import client_hello, recv_frame, send_frame

    a = agents("a")
    ch = SocketChannel(socket.create_connection(("127.0.0.1", a.port), timeout=10))
    try:
        with pytest.raises(AgentError) as exc:
            client_hello(ch, "command", "test")
    finally:
        ch.close()
    assert exc.value.code == ErrorCode.AUTH and "only from peers that authenticate" in exc.value.message

    b = agents("b", key=key)
    b.request("create", name="g", workload="idle", size="8M")
    base = Baseline(b)
    raw = SocketChannel(socket.create_connection(("127.0.0.1", b.port), timeout=10))
    with MacChannel(raw, authenticate_client(raw, load_key(key), "command"), "client") as ch:
        client_hello(ch, "command", "test")
        send_frame(ch, {"op": "list"})
        assert [g["name"] for g in recv_frame(ch)["guests"]] == ["g"]
        for request in ({"op": "save", "name": "g", "path": "/tmp/never.save"}, {"op": "restore", "path": "/etc/shadow"}):
            send_frame(ch, request)
            reply = recv_frame(ch)
            assert reply["ok"] is False and reply["code"] == ErrorCode.AUTH, reply
            assert "only the local CLI" in reply["error"]
    assert not os.path.exists("/tmp/never.save") and b.guests()["g"]["state"] == "running"
    base.check(verify="g")


def test_restore_errors_never_quote_the_file(agents, workdir):
    a = agents("a")
    a.request("create", name="g", workload="idle", size="8M")
    base = Baseline(a)
    secret = os.path.join(workdir, "secret")
    with open(secret, "wb") as f:
        f.write(b"TOPSECRET-0123456789-" * 8)
    run = a.cli("restore", secret, "--name", "x")
    assert run.returncode == 1 and "is not a valid vmem save file" in run.stderr, run.stderr
    assert "TOPSECRET" not in run.stderr and "TOPSECRET" not in a.log()
    with pytest.raises(AgentError) as exc:  # a bare path from the control socket: same rule
        a.request("restore", path=secret, name="x")
    assert "TOPSECRET" not in exc.value.message and "offset 0" in exc.value.message
    missing = a.cli("restore", os.path.join(workdir, "nothing-here"))
    assert missing.returncode == 1 and "cannot open" in missing.stderr and "No such file" in missing.stderr
    base.check(verify="g")


def test_save_writes_through_the_callers_descriptor(agents, workdir):
    """The CLI opens FILE.part as its user and passes it; the agent writes only there; the
    CLI renames it.  A request announcing a descriptor that never comes is refused."""
    a = agents("a")
    a.request("create", name="g", workload="hotcold", size="8M")
    path = os.path.join(workdir, "g.save")
    run = a.cli("save", "g", path, "-c")
    assert run.returncode == 0, run.stderr + a.log()
    assert os.path.getsize(path) > 0 and not os.path.exists(path + ".part")
    base = Baseline(a)
    with a.client() as c:  # "fd": true but no descriptor follows
        from vmem.agent.protocol import recv_frame, send_frame

        send_frame(c.channel, {"op": "save", "name": "g", "path": path + "2", "fd": True})
        c.channel.send(b"F")
        reply = recv_frame(c.channel)
    assert reply["ok"] is False and "none came" in reply["error"] and not os.path.exists(path + "2")
    base.check(verify="g")


# --- bounded connections -----------------------------------------------------------------------


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_until_closed(s: socket.socket, timeout_s: float = WAIT_S) -> bytes:
    s.settimeout(timeout_s)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data


def _refusal(data: bytes) -> dict:
    assert data.startswith(MAGIC), data[:64]
    (n,) = struct.unpack(">I", data[8:12])
    reply = json.loads(data[12:12 + n])
    assert reply["ok"] is False, reply
    return reply


def _clients_once_room(a, n: int) -> list:
    """``n`` command connections to ``a``.  The agent notices a close asynchronously (a
    loaded machine: later), so a connection just closed -- a ping's -- may still take one
    of the places: a LIMIT refusal is retried until it has reaped it."""
    clients: list = []
    deadline = time.monotonic() + WAIT_S
    try:
        while len(clients) < n:
            try:
                clients.append(a.client())
            except AgentError as err:
                if err.code != ErrorCode.LIMIT or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    except BaseException:
        for c in clients:
            c.close()
        raise
    return clients


def test_connection_caps_refuse_clearly_and_recover(agents):
    a = agents("a", extra=("--max-openings", "8", "--max-connections-per-peer", "3"))
    a.request("create", name="g", workload="idle", size="8M")
    base = Baseline(a)
    # Openings per peer: a quarter of --max-openings (2); the third is refused at once.
    held = [_connect(a.port) for _ in range(2)]
    try:
        deadline = time.monotonic() + WAIT_S
        while a.request("ping")["agent"]["connections"]["opening"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        extra = _connect(a.port)
        reply = _refusal(_read_until_closed(extra))
        extra.close()
        assert reply["code"] == ErrorCode.LIMIT and "127.0.0.1 already has 2 connections in their opening" in reply["error"]
    finally:
        for s in held:
            s.close()
    # Established connections per peer (the control socket: per uid): the fourth is refused.
    clients = _clients_once_room(a, 3)
    try:
        with pytest.raises(AgentError) as exc:
            a.client()
        assert exc.value.code == ErrorCode.LIMIT and "uid 0 already has 3 connections open" in exc.value.message
    finally:
        for c in clients:
            c.close()
    assert "refused a connection from" in a.log()
    # Until the agent has noticed the closes it refuses the next one the same way; then it serves.
    with _clients_once_room(a, 1)[0] as c:
        c.request("ping")
    base.check(verify="g")


def test_a_keyed_source_over_the_cap_is_told_why(agents, key):
    """The refusal is sent where a keyed peer expects its challenge: the source's error
    names the cap instead of an authentication failure."""
    from transport import SocketChannel
    from transport.secure import MacChannel, authenticate_client, load_key
    from vmem.agent.protocol import client_hello

    a = agents("a", key=key)
    b = agents("b", key=key, extra=("--max-connections-per-peer", "1"))
    a.request("create", name="g", workload="idle", size="8M")
    raw = SocketChannel(socket.create_connection(("127.0.0.1", b.port), timeout=10))
    with MacChannel(raw, authenticate_client(raw, load_key(key), "command"), "client") as ch:
        client_hello(ch, "command", "test")  # holds 127.0.0.1's one connection
        with pytest.raises(AgentError) as exc:
            a.request("migrate", name="g", target=b.address, options={"observe": 0})
    assert exc.value.code == ErrorCode.LIMIT, exc.value.message
    assert "refused the connection" in exc.value.message and "already has 1 connections open" in exc.value.message
    assert a.guests()["g"]["state"] == "running" and b.guests() == {}


def test_slow_loris_is_dropped_at_the_opening_deadline(agents):
    """One byte of the opening at a time: the deadline covers the whole opening, not each
    receive, so the agent drops the connection before the opening could be complete."""
    a = agents("a", extra=("--handshake-timeout", "2"))
    a.request("create", name="g", workload="idle", size="8M")
    base = Baseline(a)
    payload = _hello("command")
    sent = _trickle(a.port, payload, 0.8)  # slower than the deadline allows over the whole opening
    assert sent < len(payload), "the agent waited for the whole slow opening"
    a.wait_log("its opening took longer than 2 s")
    base.check(verify="g")


def _trickle(port: int, payload: bytes, interval_s: float) -> int:
    """Send ``payload`` one byte per ``interval_s`` until the agent closes; returns bytes sent."""
    s = _connect(port)
    sent = 0
    try:
        for byte in payload:  # bounded: one pass
            try:
                s.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            s.settimeout(interval_s)
            try:
                if s.recv(4096) == b"":
                    break  # closed by the agent
            except TimeoutError:
                pass
            except ConnectionResetError:
                break
    finally:
        s.close()
    return sent


@pytest.mark.parametrize("mode", ["key", "tls"])
def test_slow_loris_is_dropped_at_the_deadline_under_authentication(agents, key, workdir, mode):
    """The deadline also covers the key handshake and the TLS handshake (the socket TLS
    takes over is broken through the watch's own descriptor)."""
    from test_agent import _make_tls_files

    if mode == "tls":
        cert, tls_key, ca = _make_tls_files(workdir)
        a = agents("a", extra=("--handshake-timeout", "2", "--tls-cert", cert, "--tls-key", tls_key, "--tls-ca", ca))
        payload = b"\x16\x03\x01\x02\x00" + bytes(64)  # a TLS record header announcing 512 bytes, then some
    else:
        a = agents("a", key=key, extra=("--handshake-timeout", "2"))
        payload = b"VMAU" + bytes(64)
    base = Baseline(a)
    sent = _trickle(a.port, payload, 0.8)
    assert sent < len(payload), "the agent waited for the whole slow opening"
    a.wait_log("its opening took longer than 2 s")
    base.check()


def test_idle_connections_are_closed(agents):
    """A control connection with no request, and a migration whose source goes silent after
    its request, are closed after --idle-timeout; the reservation is released."""
    a = agents("a", extra=("--idle-timeout", "1"))
    a.request("create", name="g", workload="idle", size="8M")
    base = Baseline(a)
    with a.client() as c:
        assert _read_until_closed(c.channel.sock) == b""
    a.wait_log("closed the idle connection of local uid 0")

    s = _connect(a.port)
    try:
        s.sendall(_hello("migrate-in") + hostile.frame({"op": "migrate-in", "name": "silent", "size_bytes": 8 * MiB,
                                                  "spec": {"workload": "idle", "params": {}, "seed": 1}}))
        data = _read_until_closed(s)
    finally:
        s.close()
    assert data.startswith(MAGIC)
    a.wait_log("incoming migration of guest silent")
    base.check(verify="g")


def test_migrate_in_reservation_must_match_the_preamble(agents):
    """A request for 4 KiB followed by a stream of a 256 MiB guest, and one whose guest
    description differs from its request: refused before any guest is spawned."""
    from vmem.format import control
    from vmem.pages import PAGE_SIZE

    a = agents("a")
    a.request("create", name="g", workload="idle", size="8M")
    base = Baseline(a)
    spec = {"workload": "idle", "params": {}, "seed": 1}
    cases = {
        "small": ({"size_bytes": 4096, "spec": spec}, {"npages": (256 * MiB) // PAGE_SIZE, "guest": spec}),
        "other": ({"size_bytes": 8 * MiB, "spec": spec},
                  {"npages": (8 * MiB) // PAGE_SIZE, "guest": {"workload": "hotcold", "params": {}, "seed": 1}}),
    }
    for name, (request, preamble) in cases.items():
        s = _connect(a.port)
        try:
            s.sendall(_hello("migrate-in") + hostile.frame({"op": "migrate-in", "name": name, **request}))
            s.sendall(control.encode_preamble({"page_size": PAGE_SIZE, "backend": "process", **preamble}))
            _read_until_closed(s)
        finally:
            s.close()
        assert not [p for p in a.guest_children() if p.pid not in base.children]
    log = a.wait_log("the stream carries a guest of 256.0 MiB (65536 pages) but 4.0 KiB was reserved for it")
    assert "the stream's guest description differs from the one in the request" in log
    assert "refused before spawning anything" in log
    with pytest.raises(AgentError) as exc:  # not in whole pages
        _migrate_in_request(a.port, {"op": "migrate-in", "name": "odd", "size_bytes": 4097, "spec": spec})
    assert "whole 4096-byte pages" in exc.value.message
    base.check(verify="g")


def _migrate_in_request(port: int, request: dict) -> dict:
    from transport import SocketChannel
    from vmem.agent.protocol import client_hello, raise_for_reply, recv_frame, send_frame

    ch = SocketChannel(socket.create_connection(("127.0.0.1", port), timeout=10))
    try:
        client_hello(ch, "migrate-in", "test")
        send_frame(ch, request)
        return raise_for_reply(recv_frame(ch), "agent")
    finally:
        ch.close()


# --- memory under a flood ----------------------------------------------------------------------


def test_the_leak_check_fires_on_a_connection_left_open(agents, monkeypatch):
    """The check every attack test ends with fails when one connection is left open, and its
    message names that connection (the verifier's own fault injection)."""
    a = agents("a")
    base = Baseline(a)
    base.check()  # settled: passes
    held = hostile.open_flood(a.port, "loris", 1)
    try:
        port = held[0].getsockname()[1]
        monkeypatch.setattr(sys.modules[__name__], "WAIT_S", 1.0)
        with pytest.raises(AssertionError, match=rf"the agent leaked: .*tcp 127\.0\.0\.1:{a.port} -> 127\.0\.0\.1:{port} "):
            base.check()
    finally:
        for s in held:
            s.close()
    base.check()


def test_hostile_flood_memory_is_bounded_and_returned(agents):
    """CI-sized version of scripts/bench_agent_hostile.py: 3 x 40 hostile connections raise
    the agent's RssAnon by at most 16 MiB, and it comes back to within 4 MiB of the baseline
    once they are closed."""
    a = agents("a")
    a.request("create", name="g", workload="idle", size="8M")
    pid = a.proc.pid
    # Warm up: one round of each kind, so lazily built code paths are not counted as growth.
    for kind in ("big", "loris", "request"):
        for s in hostile.open_flood(a.port, kind, 4):
            s.close()
    base = Baseline(a)
    rss_base = hostile.rss_anon_bytes(pid)
    socks = []
    peak = rss_base
    try:
        for kind in ("big", "loris", "request"):
            socks += hostile.open_flood(a.port, kind, 40)
            peak = max(peak, hostile.rss_anon_bytes(pid))
        time.sleep(0.5)
        peak = max(peak, hostile.rss_anon_bytes(pid))
    finally:
        for s in socks:
            s.close()
    base.check()
    rss_after = hostile.rss_anon_bytes(pid)
    assert peak - rss_base <= 16 * MiB, (rss_base, peak)
    assert rss_after - rss_base <= 4 * MiB, (rss_base, rss_after)
    assert a.request("verify", name="g")["check"]["ok"]
