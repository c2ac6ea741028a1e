"""Tests of vmem.agent: real agents as subprocesses on loopback, real guests, real migrations.

Every agent is started with a unique state directory in a private temp directory and an
ephemeral port (``--listen 127.0.0.1:0``; the port is read from ``agent.json``), and is
stopped (SIGTERM, then SIGKILL) in the fixture's teardown, which also removes the temp
directory: no process and no file outlives a test, even a failing one.  Guests outlive
their agent (they are detached and recorded in the state directory), so stopping an agent
also kills every guest recorded there (:func:`vmem.agent.records.kill_recorded_guests`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest

from vmem.agent.client import AgentClient
from vmem.agent.protocol import AgentError, ErrorCode, MAGIC, PROTOCOL_VERSION, recv_frame

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Agents, guests and migrations here are small; these bound waits, they assert nothing.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("VMEM_AGENT", None)
    return env


class AgentProc:
    """One ``vmem agent`` subprocess (see the module docstring)."""

    def __init__(self, workdir: str, name: str, *, key: str | None = None, listen: str = "127.0.0.1:0",
                 extra: tuple = (), prefix: tuple = (), log_name: str | None = None):
        self.name = name
        self.state_dir = os.path.join(workdir, name)
        self.log_path = os.path.join(workdir, f"{log_name or name}.log")
        cmd = [*prefix, sys.executable, "-m", "vmem", "agent", "--listen", listen, "--state-dir", self.state_dir, *extra]
        if key:
            cmd += ["--key", key]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._log, env=_env(), cwd=ROOT)
        self.info = self._wait_ready()

    def _wait_ready(self) -> dict:
        path = os.path.join(self.state_dir, "agent.json")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if os.path.exists(path):
                with open(path) as f:
                    return json.load(f)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"agent {self.name} did not start (status {self.proc.returncode}):\n{self.log()}")

    @property
    def port(self) -> int:
        return self.info["port"]

    @property
    def socket(self) -> str:
        return self.info["socket"]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> AgentClient:
        return AgentClient(self.socket)

    def request(self, op: str, **fields) -> dict:
        with self.client() as c:
            return c.request(op, **fields)

    def guests(self) -> dict:
        return {g["name"]: g for g in self.request("list")["guests"]}

    def cli(self, *argv, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        """Run ``vmem ARGV --agent <this agent's socket>`` and return its result."""
        return subprocess.run([sys.executable, "-m", "vmem", *argv, "--agent", self.socket], env=_env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout_s)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_log(self, text: str, timeout_s: float = 10.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in agent {self.name}'s log:\n{self.log()}")

    def guest_children(self) -> list[psutil.Process]:
        try:
            return [p for p in psutil.Process(self.proc.pid).children()
                    if "guests.runtime" in " ".join(p.cmdline())]
        except psutil.Error:
            return []

    def stop(self, *, keep_guests: bool = False) -> int | None:
        """SIGTERM (SIGKILL after a bounded wait); then, unless ``keep_guests``, kill the
        guests it left running."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if not keep_guests:
            self.kill_guests()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the agent and reap it; its detached guests run on (``stop()`` kills them)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def kill_guests(self) -> list[int]:
        from vmem.agent.records import kill_recorded_guests

        return kill_recorded_guests(self.state_dir)


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix=f"vmem-agent-test-{os.getpid()}-")
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def key(workdir):
    from transport.secure import generate_key

    path = os.path.join(workdir, "key")
    generate_key(path)
    return path


@pytest.fixture
def agents(workdir):
    """Factory: ``agents(name, key=..., ...)`` starts an agent; all are stopped at teardown."""
    started: list[AgentProc] = []

    def start(name: str, **kwargs) -> AgentProc:
        a = AgentProc(workdir, name, **kwargs)
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- the main path -----------------------------------------------------------------------------


def test_create_list_migrate_destroy(agents, key, workdir):
    a = agents("a", key=key)
    b = agents("b", key=key)
    a.request("create", name="g1", workload="hotcold", size="64M", seed=3)
    listed = a.cli("list")
    assert listed.returncode == 0, listed.stderr
    assert "g1" in listed.stdout and "running" in listed.stdout and "hotcold" in listed.stdout
    source_pid = a.guests()["g1"]["pid"]

    report_path = os.path.join(workdir, "report.json")
    run = a.cli("migrate", "g1", b.address, "--quiet", "--observe", "0.2", "--json", report_path)
    assert run.returncode == 0, run.stderr + a.log() + b.log()
    with open(report_path) as f:
        report = json.load(f)
    assert report["outcome"] == "completed" and report["verified"]
    assert report["verification"]["digests"]["mismatched"] == 0
    assert report["verification"]["guest_check"]["ok"]
    assert report["guest"]["name"] == "g1" and report["guest"]["destination_agent"] == b.address
    assert "completed" in run.stdout  # the same summary table as the one-host migrate

    assert "g1" not in a.guests()
    assert not _pid_alive(source_pid) or psutil.Process(source_pid).ppid() != a.proc.pid
    moved = b.guests()["g1"]
    assert moved["state"] == "running" and moved["workload"] == "hotcold" and moved["seed"] == 3
    # The guest belongs to the destination agent and outlives the connection that brought it.
    assert moved["pid"] in [p.pid for p in b.guest_children()]
    steps = moved["steps"]
    deadline = time.monotonic() + 10
    while b.guests()["g1"]["steps"] == steps and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.guests()["g1"]["steps"] > steps and _pid_alive(moved["pid"])

    destroyed = b.cli("destroy", "g1")
    assert destroyed.returncode == 0, destroyed.stderr
    assert b.guests() == {} and not b.guest_children()


def test_shutdown_with_stop_guests_reaps_guests_and_removes_the_socket(agents):
    a = agents("a", extra=("--stop-guests",))
    a.request("create", name="g1", workload="idle", size="16M")
    pid = a.guests()["g1"]["pid"]
    assert a.stop(keep_guests=True) == 0
    assert not _pid_alive(pid)
    assert not os.path.exists(a.socket)
    assert "stopping guest g1" in a.log()
    assert os.listdir(os.path.join(a.state_dir, "guests")) == []


def test_control_socket_is_owner_only(agents):
    a = agents("a")
    assert stat.S_IMODE(os.stat(a.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(a.socket)).st_mode) == 0o700


# --- refusals ------------------------------------------------------------------------------------


def test_wrong_key_is_refused_on_both_sides(agents, key, workdir):
    from transport.secure import generate_key

    other = os.path.join(workdir, "other-key")
    generate_key(other)
    a = agents("a", key=key)
    c = agents("c", key=other)
    a.request("create", name="g1", workload="idle", size="16M")
    with pytest.raises(AgentError) as exc:
        a.request("migrate", name="g1", target=c.address, options={"observe": 0})
    assert exc.value.code == ErrorCode.AUTH
    assert "does not hold our key" in exc.value.message
    c.wait_log("refused connection")
    assert "different key" in c.log()
    # Nothing was created at the destination; both agents keep serving.
    assert c.guests() == {} and not c.guest_children()
    assert a.guests()["g1"]["state"] == "running"
    c.request("create", name="ok", workload="idle", size="8M")
    assert c.guests()["ok"]["state"] == "running"


def test_keyed_and_unkeyed_agents_refuse_each_other(agents, key):
    a = agents("a", key=key)
    d = agents("d")  # loopback, no key
    a.request("create", name="g1", workload="idle", size="16M")
    with pytest.raises(AgentError) as exc:
        a.request("migrate", name="g1", target=d.address, options={"observe": 0})
    assert exc.value.code == ErrorCode.AUTH
    assert "same --key" in d.wait_log("refused connection")
    d.request("create", name="g2", workload="idle", size="16M")
    with pytest.raises(AgentError) as exc:
        d.request("migrate", name="g2", target=a.address, options={"observe": 0})
    assert "security mode" in exc.value.message
    assert "does not speak the vmem auth protocol" in a.wait_log("refused connection")
    assert set(a.guests()) == {"g1"} and set(d.guests()) == {"g2"}


def test_garbage_peer_is_refused_and_the_agent_keeps_serving(agents, key):
    for agent in (agents("keyed", key=key), agents("plain")):
        with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"x" * 100)
            s.settimeout(10)
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:
                pass
        agent.wait_log("refused connection")
        assert agent.request("list")["guests"] == []


def test_source_reports_a_peer_that_speaks_something_else(agents):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def speak_ssh():
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            time.sleep(0.5)

    t = threading.Thread(target=speak_ssh, daemon=True)
    t.start()
    try:
        a = agents("a")
        a.request("create", name="g1", workload="idle", size="16M")
        with pytest.raises(AgentError) as exc:
            a.request("migrate", name="g1", target=f"127.0.0.1:{port}", options={"observe": 0})
        assert exc.value.code == ErrorCode.PROTOCOL and "does not speak the vmem agent protocol" in exc.value.message
        assert a.guests()["g1"]["state"] == "running"
    finally:
        t.join(5)
        server.close()


def test_version_mismatch_is_refused_on_both_sides(agents, key):
    from transport import SocketChannel
    from transport.secure import MacChannel, authenticate_client, load_key

    a = agents("a", key=key)
    raw = SocketChannel(socket.create_connection(("127.0.0.1", a.port), timeout=10))
    with MacChannel(raw, authenticate_client(raw, load_key(key), "command"), "client") as ch:
        body = json.dumps({"version": PROTOCOL_VERSION + 98, "purpose": "command"}).encode()
        ch.send_parts((MAGIC, len(body).to_bytes(4, "big"), body))
        assert ch.recv_exact(len(MAGIC)) == MAGIC
        reply = recv_frame(ch)
    assert reply["ok"] is False and reply["code"] == ErrorCode.VERSION
    assert f"version {PROTOCOL_VERSION + 98}" in reply["error"]
    assert "version" in a.wait_log("refused connection")
    assert a.request("list")["guests"] == []


def test_create_larger_than_free_memory_is_refused(agents):
    a = agents("a")
    with pytest.raises(AgentError) as exc:
        a.request("create", name="huge", workload="idle", size="64T")
    assert exc.value.code == ErrorCode.TOO_BIG
    assert "64.0 TiB" in exc.value.message and "free" in exc.value.message
    assert a.guests() == {} and not a.guest_children()
    run = a.cli("create", "huge", "--size", "64T")
    assert run.returncode == 1 and "memory free" in run.stderr


def test_incoming_name_clash_is_refused_before_any_guest_is_spawned(agents, key):
    a = agents("a", key=key)
    b = agents("b", key=key)
    a.request("create", name="g1", workload="idle", size="16M")
    b.request("create", name="g1", workload="idle", size="8M")
    before = {p.pid for p in b.guest_children()}
    with pytest.raises(AgentError) as exc:
        a.request("migrate", name="g1", target=b.address, options={"observe": 0})
    assert exc.value.code == ErrorCode.EXISTS and "already exists" in exc.value.message
    assert {p.pid for p in b.guest_children()} == before
    assert a.guests()["g1"]["state"] == "running" and b.guests()["g1"]["size_bytes"] == 8 << 20
    assert "refused an incoming migration" in b.log()


def test_unreachable_destination_leaves_the_guest_running(agents):
    a = agents("a")
    a.request("create", name="g1", workload="idle", size="16M")
    with socket.create_server(("127.0.0.1", 0)) as s:
        free_port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(AgentError) as exc:
        a.request("migrate", name="g1", target=f"127.0.0.1:{free_port}", options={"observe": 0})
    assert exc.value.code == ErrorCode.UNREACHABLE and "connection refused" in exc.value.message
    assert a.guests()["g1"]["state"] == "running"


def test_bad_requests_are_clear_errors(agents):
    a = agents("a")
    for fields, code in (({"name": "../x", "size": "8M"}, ErrorCode.BAD_REQUEST),
                         ({"name": "w", "size": "8M", "workload": "nope"}, ErrorCode.BAD_REQUEST),
                         ({"name": "w", "size": "8M", "workload_args": ["rate=abc"]}, ErrorCode.BAD_REQUEST)):
        with pytest.raises(AgentError) as exc:
            a.request("create", **fields)
        assert exc.value.code == code
    with pytest.raises(AgentError) as exc:
        a.request("destroy", name="nope")
    assert exc.value.code == ErrorCode.NO_SUCH_GUEST
    a.request("create", name="g1", workload="idle", size="8M")
    with pytest.raises(AgentError) as exc:
        a.request("migrate", name="g1", target="127.0.0.1:1", options={"policy": "nope"})
    assert exc.value.code == ErrorCode.BAD_REQUEST
    with pytest.raises(AgentError) as exc:
        a.request("migrate", name="g1", target="127.0.0.1:1", options={"no_such_flag": 1})
    assert "different versions" in exc.value.message
    assert a.guests()["g1"]["state"] == "running"


@pytest.mark.parametrize("prealloc", [False, True], ids=["staged", "in-place"])
def test_tampered_stream_is_refused_and_nothing_is_kept(agents, key, prealloc):
    """A man in the middle flips one byte of the migration stream: integrity check fails.
    With --prealloc the flipped frame is one received straight into the incoming guest's
    RAM (round 0 in place): its octets sat there unverified, and still nothing is kept."""
    a = agents("a", key=key)
    b = agents("b", key=key)
    proxy = _TamperingProxy(("127.0.0.1", b.port), flip_at_byte=2 << 20)
    try:
        a.request("create", name="g1", workload="hotcold", size="32M")
        reply = a.request("migrate", name="g1", target=f"127.0.0.1:{proxy.port}",
                          options={"observe": 0, "prealloc": prealloc})
    finally:
        proxy.close()
    report = reply["report"]
    assert report["outcome"] == "failed" and "integrity" in report["reason"]
    assert report["source_guest_state"] == "running"
    assert report["verification"]["source_guest_check"]["ok"]
    assert a.guests()["g1"]["state"] == "running"
    assert "integrity check failed" in b.wait_log("nothing was kept")
    assert b.guests() == {} and not b.guest_children()


class _TamperingProxy:
    """Forwards TCP both ways; flips one bit of the client->server stream at ``flip_at_byte``."""

    def __init__(self, target, flip_at_byte: int):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target = target
        self.flip_at_byte = flip_at_byte
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        try:
            client, _ = self.server.accept()
        except OSError:
            return
        upstream = socket.create_connection(self.target)
        self.sockets += [client, upstream]
        for src, dst, flip in ((client, upstream, True), (upstream, client, False)):
            t = threading.Thread(target=self._pump, args=(src, dst, flip), daemon=True)
            t.start()
            self.threads.append(t)

    def _pump(self, src, dst, flip):
        seen = 0
        try:
            while data := src.recv(1 << 16):
                if flip and seen <= self.flip_at_byte < seen + len(data):
                    data = bytearray(data)
                    data[self.flip_at_byte - seen] ^= 0x01
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        self.server.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            t.join(5)
        for s in self.sockets:
            s.close()


# --- starting an agent --------------------------------------------------------------------------


def test_non_loopback_listen_needs_a_key_or_insecure(workdir, agents):
    state = os.path.join(workdir, "nokey")
    run = subprocess.run([sys.executable, "-m", "vmem", "agent", "--listen", "0.0.0.0:0", "--state-dir", state],
                         env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "refusing to listen on 0.0.0.0 without authentication" in run.stderr and "--insecure" in run.stderr
    a = agents("insecure", listen="0.0.0.0:0", extra=("--insecure",))
    assert a.info["security"] == "none"
    assert "no authentication" in a.log()


def test_key_file_readable_by_others_is_refused(workdir, key):
    os.chmod(key, 0o644)
    run = subprocess.run([sys.executable, "-m", "vmem", "agent", "--listen", "127.0.0.1:0", "--key", key,
                          "--state-dir", os.path.join(workdir, "x")],
                         env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "chmod 600" in run.stderr


# --- save / restore through the agent ----------------------------------------------------------


def test_save_and_restore_through_the_agent(agents, workdir):
    a = agents("a")
    a.request("create", name="g1", workload="hotcold", size="16M")
    path = os.path.join(workdir, "g1.save")
    run = a.cli("save", "g1", path, "-c")
    assert run.returncode == 0, run.stderr + a.log()
    assert a.guests()["g1"]["state"] == "running"
    restored = a.cli("restore", path, "--name", "g1-copy")
    assert restored.returncode == 0, restored.stderr + a.log()
    copy = a.guests()["g1-copy"]
    assert copy["state"] == "running" and copy["workload"] == "hotcold" and copy["pid"] != a.guests()["g1"]["pid"]
    clash = a.cli("restore", path, "--name", "g1")
    assert clash.returncode == 1 and "already exists" in clash.stderr
    assert a.request("save", name="g1", path=path + "2")["name"] == "g1"  # without -c: the guest stops
    assert set(a.guests()) == {"g1-copy"}


# --- between two hosts (network namespaces) ----------------------------------------------------

from testhosts import testhosts  # noqa: E402,F401  (the module-scoped fixture)


def test_migration_between_test_hosts(testhosts, agents, key, workdir):  # noqa: F811
    """The agents run inside two network namespaces joined by a veth bridge; the CLI talks
    to the source agent over its unix socket (the filesystem is shared)."""
    a = agents("h1", key=key, listen=f"{testhosts.addr(1)}:0", prefix=("ip", "netns", "exec", testhosts.ns(1)))
    b = agents("h2", key=key, listen=f"{testhosts.addr(2)}:0", prefix=("ip", "netns", "exec", testhosts.ns(2)))
    a.request("create", name="g1", workload="hotcold", size="64M")
    report_path = os.path.join(workdir, "report.json")
    run = a.cli("migrate", "g1", f"{testhosts.addr(2)}:{b.port}", "--quiet", "--observe", "0.2", "--json", report_path)
    assert run.returncode == 0, run.stderr + a.log() + b.log()
    with open(report_path) as f:
        report = json.load(f)
    assert report["outcome"] == "completed" and report["verified"]
    assert report["verification"]["digests"]["mismatched"] == 0 and report["verification"]["guest_check"]["ok"]
    assert "g1" not in a.guests() and b.guests()["g1"]["state"] == "running"
    assert b.guests()["g1"]["pid"] in [p.pid for p in b.guest_children()]
    assert b.cli("destroy", "g1").returncode == 0 and b.guests() == {}


# --- TLS ---------------------------------------------------------------------------------------


def _make_tls_files(workdir: str, addresses: tuple[str, ...] = ("127.0.0.1",)) -> tuple[str, str, str]:
    """A CA and one certificate for ``addresses`` (default 127.0.0.1) signed by it (openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (needed to make test certificates)")
    ca_key, ca, key, csr, cert = (os.path.join(workdir, n) for n in ("ca.key", "ca.pem", "agent.key", "agent.csr", "agent.pem"))
    ext = os.path.join(workdir, "ext.cnf")
    with open(ext, "w") as f:
        f.write("subjectAltName=" + ",".join(f"IP:{a}" for a in addresses) + "\n")
    steps = [
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1",
         "-subj", "/CN=vmem test CA"],
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", "1", "-extfile", ext],
    ]
    for argv in steps:
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return cert, key, ca


def test_migration_over_mutual_tls(agents, workdir):
    cert, key, ca = _make_tls_files(workdir)
    tls = ("--tls-cert", cert, "--tls-key", key, "--tls-ca", ca)
    a = agents("a", extra=tls)
    b = agents("b", extra=tls)
    plain = agents("plain")
    assert a.info["security"] == "tls"
    a.request("create", name="g1", workload="hotcold", size="32M")
    plain.request("create", name="p", workload="idle", size="8M")
    with pytest.raises(AgentError) as exc:  # a plain agent cannot talk to a TLS one
        plain.request("migrate", name="p", target=a.address, options={"observe": 0})
    assert exc.value.code == ErrorCode.PROTOCOL
    assert "TLS handshake failed" in a.wait_log("refused connection")
    assert plain.guests()["p"]["state"] == "running" and set(a.guests()) == {"g1"}
    report = a.request("migrate", name="g1", target=b.address, options={"observe": 0})["report"]
    assert report["outcome"] == "completed", report["reason"]
    assert report["verification"]["digests"]["mismatched"] == 0 and report["verification"]["guest_check"]["ok"]
    assert b.guests()["g1"]["state"] == "running" and "g1" not in a.guests()


def test_verify_a_guest_through_the_agent(agents):
    a = agents("v")
    a.request("create", name="g", workload="hotcold", size="16M")
    reply = a.request("verify", name="g")
    assert reply["check"]["ok"] and reply["check"]["pages_checked"] > 0
    run = a.cli("verify", "g")
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr
    from vmem.agent.protocol import AgentError, ErrorCode

    with pytest.raises(AgentError) as exc:
        a.request("verify", name="nope")
    assert exc.value.code == ErrorCode.NO_SUCH_GUEST


def test_resume_without_an_interrupted_postcopy_is_refused(agents):
    """`vmem migrate --resume NAME` for a guest that is not paused by a broken post-copy,
    and a postcopy-resume request for a guest no destination waits for: clear refusals,
    nothing changes."""
    from vmem.agent.protocol import AgentError, ErrorCode

    a, b = agents("s"), agents("d")
    a.request("create", name="g", workload="idle", size="8M")
    with pytest.raises(AgentError) as exc:
        a.request("migrate", name="g", resume=True, options={"observe": 0})
    assert exc.value.code == ErrorCode.BUSY and "running" in exc.value.message
    run = a.cli("migrate", "--resume")
    assert run.returncode == 2 and "NAME" in run.stderr, run.stderr
    # Straight to the destination agent (no key here): nothing waits under that name.
    from transport.tcp import connect_tcp
    from vmem.agent.protocol import client_hello, recv_frame, send_frame

    host, port = b.address.rsplit(":", 1)
    ch = connect_tcp(host, int(port))
    try:
        client_hello(ch, "migrate-in", "test")
        send_frame(ch, {"op": "postcopy-resume", "name": "g"})
        reply = recv_frame(ch)
        assert reply.get("ok") is False and "no post-copy" in str(reply), reply
    finally:
        ch.close()
    assert a.guests()["g"]["state"] == "running" and b.guests() == {}


def test_prealloc_between_agents(agents, key):
    """--prealloc travels with the other migration flags: the destination agent allocates the
    incoming guest's RAM before READY (a pure post-copy, so every page then arrives on
    allocated memory and the guest still faults for the ones it touches first)."""
    a = agents("a", key=key)
    b = agents("b", key=key)
    a.request("create", name="g1", workload="checker", size="32M", workload_args=["rate=20000", "reads=64"])
    report = a.request("migrate", name="g1", target=b.address,
                       options={"observe": 0, "prealloc": True, "postcopy": True})["report"]
    assert report["outcome"] == "completed", report["reason"]
    assert report["verification"]["digests"]["mismatched"] == 0 and report["verification"]["guest_check"]["ok"]
    assert report["timings_ms"]["setup_destination_prealloc"] > 0
    assert report["timings_ms"]["setup_destination_map"] > 0  # and mapped it into its own page tables
    assert report["postcopy"]["pages_demanded"] > 0
    assert b.guests()["g1"]["state"] == "running" and "g1" not in a.guests()


def test_postcopy_bandwidth_between_agents(agents, key):
    """--postcopy-bandwidth travels with the other flags: on a keyed link the push after the
    switch stays within the cap (an unpaced one runs many times faster), the demand faults still
    take the native path and the migration verifies; without post-copy the agent refuses
    the flag before anything moves, naming it."""
    a = agents("a", key=key)
    b = agents("b", key=key)
    a.request("create", name="g1", workload="hotcold", size="32M", workload_args=["rate=20000"])
    with pytest.raises(AgentError) as exc:
        a.request("migrate", name="g1", target=b.address, options={"observe": 0, "postcopy_bandwidth": "20M"})
    assert "--postcopy-bandwidth" in exc.value.message and "no post-copy" in exc.value.message
    assert a.guests()["g1"]["state"] == "running" and "g1" not in b.guests()
    report = a.request("migrate", name="g1", target=b.address,
                       options={"observe": 0, "postcopy": True, "postcopy_bandwidth": "20M"})["report"]
    assert report["outcome"] == "completed", report["reason"]
    assert report["verification"]["digests"]["mismatched"] == 0 and report["verification"]["guest_check"]["ok"]
    pc = report["postcopy"]
    assert pc["push_bandwidth_limit_Bps"] == 20e6 and pc["fault_path"] == "native"
    assert pc["source"]["pages_pushed_sent"] >= 1024, pc["source"]
    assert pc["push_rate_Bps"] <= 20e6 * 1.5 and pc["source"]["push_paced_s"] > 0, pc
    assert b.guests()["g1"]["state"] == "running" and "g1" not in a.guests()


def test_fault_sched_between_agents(agents, key):
    """--fault-sched and --fault-cpu travel with the other flags: on a keyed link both
    agents' fault threads run SCHED_FIFO pinned to the CPU asked (each side's report part
    says what it got) and the migration verifies."""
    from vmem import _native as nat

    if nat.fault_thread_priority(nat.PC_PRIO_FIFO)[0] != nat.PC_PRIO_FIFO:
        pytest.skip("SCHED_FIFO is not permitted here (needs root or RLIMIT_RTPRIO)")
    a = agents("a", key=key)
    b = agents("b", key=key)
    a.request("create", name="g1", workload="checker", size="32M", workload_args=["rate=20000", "reads=64"])
    report = a.request("migrate", name="g1", target=b.address,
                       options={"observe": 0, "postcopy": True, "fault_sched": "fifo", "fault_cpu": 0})["report"]
    assert report["outcome"] == "completed", report["reason"]
    assert report["verification"]["digests"]["mismatched"] == 0 and report["verification"]["guest_check"]["ok"]
    pc = report["postcopy"]
    assert pc["fault_sched"] == "fifo" and pc["fault_path"] == "native"
    assert pc["fault_thread_priority"] == pc["source"]["fault_thread_priority"] == f"SCHED_FIFO {nat.PC_RT_PRIORITY}"
    assert pc["fault_cpu"] == pc["fault_thread_cpu"] == pc["source"]["fault_thread_cpu"] == 0
    assert b.guests()["g1"]["state"] == "running" and "g1" not in a.guests()


def test_an_attach_request_with_another_op_is_refused_naming_only_the_op():
    """A data or urgent connection whose first frame is not ``attach`` is refused with a
    BAD_REQUEST that names the op it got and nothing else of the request: a TLS link's
    urgent attach carries a link key, which must reach neither the answer nor the log."""
    from types import SimpleNamespace

    from transport import channel_pair
    from vmem.agent.migration import serve_attach
    from vmem.agent.protocol import send_frame

    secret = "k" * 64
    a, b = channel_pair()
    try:
        agent = SimpleNamespace(opening_done=lambda: None)
        send_frame(a, {"op": "attach-not", "session": "s", "index": 0, "seal": secret})
        assert serve_attach(agent, b, "vmem-urgent", "peer") is False
        reply = recv_frame(a)
        assert reply["ok"] is False and reply["code"] == ErrorCode.BAD_REQUEST, reply
        assert reply["error"] == "expected an attach request, got op 'attach-not'", reply
        assert secret[:8] not in json.dumps(reply)
    finally:
        a.close()
        b.close()
