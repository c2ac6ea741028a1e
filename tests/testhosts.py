"""Test hosts for migration between hosts: network namespaces made by scripts/testhosts.sh.

Use the ``testhosts`` fixture (import it into a test module:
``from testhosts import testhosts  # noqa: F401``).  It brings up two namespaces with a
prefix unique to this process (so parallel xdist workers never collide), yields a
:class:`NetnsHosts`, and always tears them down, even when tests fail.  It skips, with the
reason, where namespaces cannot be made (not root, no iproute2).

Programs run on a host with ``hosts.run(1, argv)`` (``ip netns exec``); every process it
starts is tracked and killed/reaped by :meth:`NetnsHosts.reap` (the fixture calls it after
each use too, but a test should reap its own processes: the autouse ``no_leaks`` fixture
fails a test that leaves a child behind).
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "testhosts.sh")
# Seconds to wait for a tracked process to exit after SIGKILL / for the script to finish.
REAP_TIMEOUT_S = 10.0
SCRIPT_TIMEOUT_S = 60.0

_instances = itertools.count(1)


def netns_unavailable() -> str:
    """Why test hosts cannot be made here, or ``""`` if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"iproute2 '{tool}' is not installed"
    return ""


def unique_prefix() -> str:
    """A namespace prefix unique to this process and call: ``vt<pid>n<k>``."""
    return f"vt{os.getpid()}n{next(_instances)}"


def unique_subnet() -> int:
    """A subnet index (10.213.K.0/24) per xdist worker, so addresses differ between workers
    too (the namespaces are isolated anyway; distinct subnets keep captures readable)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw-1")
    try:
        number = int(worker.removeprefix("gw"))
    except ValueError:
        number = -1
    return 100 + (number + 1) % 100


class NetnsHosts:
    """N test hosts ``<prefix>-h1..hN`` on ``10.213.<subnet>.0/24`` (see testhosts.sh).

    Hosts are numbered from 1.  Use as a context manager, or call :meth:`up` and
    :meth:`down` (idempotent) yourself.
    """

    def __init__(self, prefix: str | None = None, subnet: int | None = None,
                 n_hosts: int = 2):
        self.prefix = prefix or unique_prefix()
        self.subnet = unique_subnet() if subnet is None else subnet
        self.n_hosts = n_hosts
        self._procs: list[subprocess.Popen] = []

    def _script(self, *args: str) -> str:
        result = subprocess.run(["bash", SCRIPT, *args, "--prefix", self.prefix],
                                capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"testhosts.sh {' '.join(args)} failed "
                               f"({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def up(self, rate: str | None = None) -> "NetnsHosts":
        args = ["up", "--hosts", str(self.n_hosts), "--subnet", str(self.subnet)]
        if rate:
            args += ["--rate", rate]
        self._script(*args)
        return self

    def down(self) -> None:
        """Reap our processes, then remove every namespace of the prefix; idempotent."""
        self.reap()
        self._script("down")

    def shape(self, rate: str | None) -> None:
        """Shape every host's egress to ``rate`` (tc syntax, e.g. ``"100mbit"``);
        ``None`` removes the shaping."""
        self._script("shape", "--rate", rate or "none")

    def status(self) -> str:
        return self._script("status")

    def namespaces(self) -> list[str]:
        """Names in ``ip netns list`` that belong to this prefix."""
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                             check=True).stdout
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        return [n for n in names if n.startswith(self.prefix + "-")]

    def ns(self, host: int) -> str:
        if not 1 <= host <= self.n_hosts:
            raise ValueError(f"host must be 1..{self.n_hosts}, got {host}")
        return f"{self.prefix}-h{host}"

    def addr(self, host: int) -> str:
        """The IPv4 address of ``host`` (held only inside its namespace)."""
        self.ns(host)
        return f"10.213.{self.subnet}.{host}"

    def run(self, host: int, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` inside ``host``'s namespace; the process is tracked for :meth:`reap`."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv], **popen_kwargs)
        self._procs.append(proc)
        return proc

    def run_python(self, host: int, code: str, *args: str, **popen_kwargs) -> subprocess.Popen:
        """Run ``python -c code args...`` on ``host`` with the repo importable; stdout and
        stderr are pipes (text) unless given."""
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        popen_kwargs.setdefault("stdout", subprocess.PIPE)
        popen_kwargs.setdefault("stderr", subprocess.PIPE)
        popen_kwargs.setdefault("text", True)
        return self.run(host, [sys.executable, "-c", code, *args], env=env, cwd=REPO_ROOT,
                        **popen_kwargs)

    def reap(self) -> None:
        """Kill and wait for every process :meth:`run` started that is still running."""
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            try:
                proc.communicate(timeout=REAP_TIMEOUT_S)
            except (subprocess.TimeoutExpired, ValueError):
                proc.wait(REAP_TIMEOUT_S)

    def __enter__(self) -> "NetnsHosts":
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc_info) -> None:
        self.down()


@pytest.fixture(scope="module")
def testhosts():
    """Two test hosts for the module; torn down whatever happens.  Skips if unavailable."""
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    hosts = NetnsHosts()
    try:
        hosts.up()
        yield hosts
    finally:
        hosts.down()


# -- programs to run on the hosts ---------------------------------------------------------

# Listens on argv[1] (port 0 = any), prints the port, receives argv[3] bytes with
# transport.tcp, then prints "<sha256> <seconds from first to last byte>".  argv[4] is the
# mode: "hash" (the default: one connection, the bytes hashed), "nohash" (a baseline for
# timing: no hashing, "-" instead of the digest, the bytes land in one ``total``-byte buffer
# touched beforehand) or "fresh" (no hashing, each 1 MiB received is ``pwrite`` into a fresh
# memfd of ``total`` bytes).  Options after it: ``conns=N`` (N connections, connection i
# carrying the i-th of N equal slices; each says its index in its first byte; not with
# "hash") and ``key=HEX`` (each connection wrapped in transport.secure.MacChannel with that
# 32-byte session key: AES-GMAC over every frame on both ends, as a keyed link does) and
# ``verify=1`` (with "nohash"/"fresh": after the clock stops, print the sha256 of the
# placed bytes instead of "-").
TCP_SINK = r"""
import hashlib, os, sys, time
from transport.tcp import listen_tcp, accept_channel
from vmem.bench.plaincopy import connection_slice, copy_options, keyed, on_each_connection
host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mode = sys.argv[4] if len(sys.argv) > 4 else "hash"
opts = copy_options(sys.argv[5:])
conns = opts["conns"]
assert mode != "hash" or conns == 1, "hash mode takes one connection"
hashing = mode == "hash"
digest = hashlib.sha256()
fresh_fd = -1
if mode == "nohash":
    import numpy as np
    dest_arr = np.empty(total, dtype=np.uint8)
    dest_arr[:] = 0  # touched before timing: first touch of fresh memory is erratic in VMs
    dest = memoryview(dest_arr).cast("B")
elif mode == "fresh":
    # what a migration destination must do: place the bytes into fresh shared memory
    fresh_fd = os.memfd_create("vmem-baseline")
    os.ftruncate(fresh_fd, total)
    if opts["digest"]:
        # ... and, as vmem's destination does, digest every page as the memory then holds it
        # (vmem's XXH64 through a shared mapping, right after its pwrite)
        import mmap
        import numpy as np
        from vmem import _native as nat
        assert total % 4096 == 0 and conns == 1, "digest=1 takes whole pages over one connection"
        placed_map = mmap.mmap(fresh_fd, total, mmap.MAP_SHARED, mmap.PROT_READ)
        placed_base = np.frombuffer(placed_map, dtype=np.uint8).ctypes.data
        page_digests = np.empty(total // 4096, dtype=np.uint64)
ls = listen_tcp(host, port)
print(ls.getsockname()[1], flush=True)
chans = [None] * conns
for _ in range(conns):
    ch, _peer = accept_channel(ls, 30)
    ch = keyed(ch, opts["key"], "server")
    index = ch.recv_exact(1)[0]
    assert index < conns and chans[index] is None, f"bad connection index {index}"
    chans[index] = ch
times = [None] * conns  # (first byte received, last byte placed) per connection

def receive(i):
    ch = chans[i]
    got, hi = connection_slice(i, conns, total)
    view = memoryview(bytearray(1 << 20))
    start = None
    while got < hi:
        n = min(len(view), hi - got)
        ch.recv_into(dest[got:got + n] if mode == "nohash" else view[:n])
        if start is None:  # the clock starts when the first bytes are in
            start = time.perf_counter()
        if hashing:
            digest.update(view[:n])
        elif mode == "fresh":
            os.pwrite(fresh_fd, view[:n], got)
            if opts["digest"]:
                nat.digest_range(placed_base, got // 4096, n // 4096, page_digests[got // 4096:])
        got += n
    times[i] = (start, time.perf_counter())

on_each_connection(receive, conns)
elapsed = max(t[1] for t in times) - min(t[0] for t in times)
if not hashing and opts["verify"]:
    hashing = True
    if mode == "nohash":
        digest.update(dest)
    else:
        for off in range(0, total, 1 << 20):
            digest.update(os.pread(fresh_fd, min(1 << 20, total - off), off))
for ch in chans:
    ch.send(b"k")
print(digest.hexdigest() if hashing else "-", elapsed, flush=True)
for ch in chans:
    ch.close()
ls.close()
if fresh_fd >= 0:
    os.close(fresh_fd)
"""

# Connects to argv[1]:argv[2] and sends argv[3] bytes (transport.tcp), then prints the
# sha256 of what it sent ("-" unless the mode argv[4] is "hash": then a repeating block is
# sent, else a ``total``-byte buffer touched first, as a migration sends RAM); the options
# after the mode as for TCP_SINK (``conns=N``: N connections, one thread each; ``key=HEX``;
# ``verify=1``: print the sha256 of the buffer sent).
TCP_SOURCE = r"""
import hashlib, sys
from transport.tcp import connect_tcp
from vmem.bench.plaincopy import connection_slice, copy_options, keyed, on_each_connection
host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mode = sys.argv[4] if len(sys.argv) > 4 else "hash"
opts = copy_options(sys.argv[5:])
conns = opts["conns"]
hashing = mode == "hash"
block = bytes(range(256)) * 4096
digest = hashlib.sha256()
if not hashing:  # send a real ``total``-byte buffer (touched first), as a migration sends RAM
    import numpy as np
    data = np.empty(total, dtype=np.uint8)
    # a pattern whose 1 MiB pieces differ (251 is prime), so a misplaced piece shows
    pattern = (np.arange(1 << 20) % 251).astype(np.uint8)
    for off in range(0, total, 1 << 20):
        data[off:off + (1 << 20)] = pattern[:min(1 << 20, total - off)]
    data = memoryview(data).cast("B")
chans = []
for i in range(conns):
    ch = keyed(connect_tcp(host, port), opts["key"], "client")
    ch.send(bytes([i]))
    chans.append(ch)

def send(i):
    ch = chans[i]
    sent, hi = connection_slice(i, conns, total)
    while sent < hi:
        n = min(4 << 20, hi - sent)
        part = block[:min(len(block), n)] if hashing else data[sent:sent + n]
        ch.send(part)
        if hashing:
            digest.update(part)
        sent += len(part)
    assert ch.recv_exact(1) == b"k"

on_each_connection(send, conns)
if not hashing and opts["verify"]:
    hashing = True
    digest.update(data)
print(digest.hexdigest() if hashing else "-", flush=True)
for ch in chans:
    ch.close()
"""


def _kill_and_reap(*procs: subprocess.Popen | None) -> None:
    """Kill what still runs of ``procs`` (None: never started) and reap them all."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.communicate()


def transfer(hosts: NetnsHosts, total_bytes: int, src: int = 1, dst: int = 2,
             timeout_s: float = 120.0, *, hashing: bool = True, fresh: bool = False,
             connections: int = 1, mac_key: bytes | None = None,
             verify: bool = False, digest: bool = False) -> tuple[str, str, float]:
    """Send ``total_bytes`` from host ``src`` to host ``dst`` over TCP (transport.tcp).

    Returns ``(sha256 sent, sha256 received, receiver seconds)``; with ``hashing=False``
    nothing is hashed (both digests are "-"): a plain copy to time against, into memory
    touched beforehand, or with ``fresh=True`` received into a 1 MiB buffer and
    ``pwrite`` into a fresh memfd (the placement a migration's destination does).
    ``connections`` > 1 (not with hashing) splits the bytes into that many equal slices,
    each over its own connection with a thread on each end; ``mac_key`` (32 bytes) wraps
    every connection in ``transport.secure.MacChannel`` with it -- AES-GMAC over every
    frame, computed by the sender and verified by the receiver, as on a keyed link (the
    key is passed on the command line: a throwaway key for a benchmark, never a real one).
    ``verify`` (without hashing) returns the sha256 of the buffer sent and of the bytes
    placed, both computed after the receiver's clock stopped.  ``digest`` (with ``fresh``)
    has the receiver also digest every page right after placing it, inside the timing, as
    vmem's destination does (XXH64 through a shared mapping).  Reaps both processes.
    """
    if digest and (not fresh or connections != 1):
        raise ValueError("digest=True digests pages placed into a fresh memfd over one connection: "
                         "pass fresh=True, connections=1")
    if hashing and connections != 1:
        raise ValueError("a hashed transfer takes one connection")
    flag = ["hash"] if hashing else (["fresh"] if fresh else ["nohash"])
    if connections != 1:
        flag.append(f"conns={int(connections)}")
    if mac_key is not None:
        flag.append(f"key={bytes(mac_key).hex()}")
    if verify and not hashing:
        flag.append("verify=1")
    if digest:
        flag.append("digest=1")
    sink = hosts.run_python(dst, TCP_SINK, hosts.addr(dst), "0", str(total_bytes), *flag)
    source = None
    try:
        port = sink.stdout.readline().strip()
        assert port.isdigit(), f"sink did not start: {sink.stderr.read() if sink.poll() is not None else port!r}"
        source = hosts.run_python(src, TCP_SOURCE, hosts.addr(dst), port, str(total_bytes), *flag)
        out_src, err_src = source.communicate(timeout=timeout_s)
        out_sink, err_sink = sink.communicate(timeout=timeout_s)
        assert source.returncode == 0, err_src
        assert sink.returncode == 0, err_sink
        sent_digest = out_src.strip()
        got_digest, seconds = out_sink.split()
        return sent_digest, got_digest, float(seconds)
    finally:
        _kill_and_reap(source, sink)


# Listens on argv[1] (port 0 = any), prints the port, accepts one connection and answers
# every 16-byte request with one 4 KiB page until the peer closes (vmem.bench.roundtrip).
PAGE_SERVER = r"""
import socket, sys
from transport.tcp import listen_tcp
from vmem import _native as nat
from vmem.bench.roundtrip import serve_pages
nat.boost_current_thread()  # scheduled as vmem's fault threads are
ls = listen_tcp(sys.argv[1], int(sys.argv[2]))
print(ls.getsockname()[1], flush=True)
ls.settimeout(30)
conn, _peer = ls.accept()
conn.settimeout(None)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
serve_pages(conn)
conn.close(); ls.close()
"""

# Connects to argv[1]:argv[2] and makes argv[3] round trips at argv[4] a second after argv[5]
# unmeasured ones (vmem.bench.roundtrip); prints "p50 p99 max count" in us, then the scheduling its
# thread got (nat.boost_current_thread).
PAGE_CLIENT = r"""
import socket, sys
from vmem import _native as nat
from vmem.bench.roundtrip import paced_round_trips, summary_us
scheduling = nat.boost_current_thread()[1]  # scheduled as vmem's fault threads are
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
r = summary_us(paced_round_trips(sock, int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])))
sock.close()
print(r["p50_us"], r["p99_us"], r["max_us"], r["count"])
print(scheduling, flush=True)
"""


def page_round_trips(hosts: NetnsHosts, count: int, rate_per_s: float, server: int = 1, client: int = 2,
                     timeout_s: float = 120.0, warmup: int = 100) -> dict:
    """``count`` plain page round trips from host ``client`` to host ``server`` (a 16-byte
    request answered with 4 KiB, TCP_NODELAY, Python on both ends, each scheduled as vmem's
    post-copy fault threads are: ``nat.boost_current_thread``), ``rate_per_s`` of them
    a second, after ``warmup`` unmeasured ones: ``{"p50_us", "p99_us", "max_us", "count",
    "scheduling"}`` (what the client's thread got, e.g. ``nice -15, slice 0.1 ms``),
    each round trip timed from the request's send to the answer's last byte.  Reaps both
    processes."""
    srv = hosts.run_python(server, PAGE_SERVER, hosts.addr(server), "0")
    cli = None
    try:
        port = srv.stdout.readline().strip()
        assert port.isdigit(), f"page server did not start: {srv.stderr.read() if srv.poll() is not None else port!r}"
        cli = hosts.run_python(client, PAGE_CLIENT, hosts.addr(server), port, str(count), str(rate_per_s),
                               str(warmup))
        out, err = cli.communicate(timeout=timeout_s)
        assert cli.returncode == 0, err
        srv.communicate(timeout=timeout_s)
        figures, scheduling = out.strip().split("\n")
        p50, p99, mx, n = figures.split()
        return {"p50_us": float(p50), "p99_us": float(p99), "max_us": float(mx), "count": int(n),
                "scheduling": scheduling}
    finally:
        _kill_and_reap(cli, srv)
