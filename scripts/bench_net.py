#!/usr/bin/env python3
"""Benchmark: moving bytes between two test hosts (network namespaces), in one run.

Brings up two test hosts with scripts/testhosts.sh (a private prefix, torn down at the
end whatever happens), then copies ``--gib`` GiB (default 1) from host 1 to host 2 with:

* ``plain``:     transport.tcp SocketChannel, 64 MiB ``send`` calls / ``recv_into`` -- the
                 baseline every other row is compared to;
* ``mac``:       the same after mutual authentication, through ``MacChannel`` (AES-256-GMAC
                 tag per 1 MiB frame, verified before use);
* ``tls``:       through ``TlsChannel`` (certificates made with the ``openssl`` CLI in a
                 temporary directory; skipped if it is missing).

Sender and receiver are separate processes in separate namespaces (``ip netns exec``).
Throughput = payload bytes / sender wall time from its first send to the receiver's
acknowledgement of the last byte; GB = 10^9 bytes.  The payload is a 64 MiB random buffer
sent repeatedly (content does not change the cost of any mode).

``--codec`` (no namespaces needed) measures transport.codec instead: zero-page detection
on 1 GiB, and zstd level 1/3 and lz4 compress/decompress on batches of 1024 pages of three
kinds of memory: guest pages as the workloads write them (stamps: incompressible),
half-zero guest pages (a fresh guest), and text-like pages.

Usage (root):  python3 scripts/bench_net.py [--gib 1] [--modes plain,mac,tls]
               [--rate 1gbit] [--json]
               python3 scripts/bench_net.py --loopback ...   (127.0.0.1, no namespaces)
               python3 scripts/bench_net.py --codec [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402

from transport.codec import PAGE_BYTES  # noqa: E402  (the wire page size)

CHUNK_BYTES = 64 << 20
BATCH_PAGES = 1024
KEY = bytes(range(32))  # benchmark only: both ends are ours
MODES = ("plain", "mac", "tls")


# -- roles (run inside a namespace) -------------------------------------------------------

def _payload() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, CHUNK_BYTES, dtype=np.uint8)


def _tls_paths(tls_dir: str) -> dict[str, str]:
    return {name: os.path.join(tls_dir, name)
            for name in ("ca.pem", "server.pem", "server.key")}


def role_recv(args) -> None:
    from transport.secure import (MacChannel, authenticate_server, server_tls_context,
                                  tls_server_channel)
    from transport.tcp import accept_channel, listen_tcp

    total = args.bytes
    listener = listen_tcp(args.host, 0)
    print(listener.getsockname()[1], flush=True)
    channel, _peer = accept_channel(listener, 60)
    if args.mode == "mac":
        _purpose, session_key = authenticate_server(channel, KEY)
        channel = MacChannel(channel, session_key, "server")
    elif args.mode == "tls":
        paths = _tls_paths(args.tls_dir)
        channel = tls_server_channel(channel, server_tls_context(paths["server.pem"],
                                                                 paths["server.key"]))
    buf = np.empty(CHUNK_BYTES, dtype=np.uint8)
    got = 0
    while got < total:
        n = min(CHUNK_BYTES, total - got)
        channel.recv_into(buf[:n])
        got += n
    channel.send(b"k")
    channel.close()
    listener.close()


def role_send(args) -> None:
    from transport.secure import (MacChannel, authenticate_client, client_tls_context,
                                  tls_client_channel)
    from transport.tcp import connect_tcp

    total = args.bytes
    data = _payload()
    channel = connect_tcp(args.host, args.port)
    if args.mode == "mac":
        session_key = authenticate_client(channel, KEY, "bench")
        channel = MacChannel(channel, session_key, "client")
    elif args.mode == "tls":
        paths = _tls_paths(args.tls_dir)
        channel = tls_client_channel(channel, client_tls_context(paths["ca.pem"]),
                                     args.host)
    start = time.perf_counter()
    sent = 0
    while sent < total:
        n = min(CHUNK_BYTES, total - sent)
        channel.send(data[:n])
        sent += n
    assert channel.recv_exact(1) == b"k"
    elapsed = time.perf_counter() - start
    channel.close()
    print(json.dumps({"seconds": elapsed, "bytes": total}), flush=True)


# -- orchestration (root namespace) -------------------------------------------------------

def _make_certs(tls_dir: str, server_ip: str) -> None:
    def openssl(*argv: str) -> None:
        subprocess.run(["openssl", *argv], cwd=tls_dir, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    with open(os.path.join(tls_dir, "server.ext"), "w") as ext:
        ext.write(f"subjectAltName=IP:{server_ip}\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=server")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "server.ext")


class Hosts:
    def __init__(self, rate: str | None):
        self.prefix = f"vbench{os.getpid()}"
        self.subnet = 250
        self.script = os.path.join(REPO_ROOT, "scripts", "testhosts.sh")
        argv = ["bash", self.script, "up", "--prefix", self.prefix, "--subnet",
                str(self.subnet)]
        if rate:
            argv += ["--rate", rate]
        subprocess.run(argv, check=True, capture_output=True)

    def addr(self, host: int) -> str:
        return f"10.213.{self.subnet}.{host}"

    def python(self, host: int, *argv: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        return subprocess.Popen(["ip", "netns", "exec", f"{self.prefix}-h{host}",
                                 sys.executable, os.path.abspath(__file__), *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=REPO_ROOT)

    def down(self) -> None:
        subprocess.run(["bash", self.script, "down", "--prefix", self.prefix],
                       capture_output=True)


class Loopback:
    """Both roles in this namespace over 127.0.0.1 (``--loopback``: no root needed)."""

    def addr(self, host: int) -> str:
        return "127.0.0.1"

    def python(self, host: int, *argv: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=REPO_ROOT)

    def down(self) -> None:
        pass


def run_mode(hosts: Hosts | Loopback, mode: str, total: int, tls_dir: str | None) -> float:
    common = ["--mode", mode, "--bytes", str(total), "--tls-dir", tls_dir or ""]
    receiver = hosts.python(2, "--role", "recv", "--host", hosts.addr(2), *common)
    sender = None
    try:
        port = receiver.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(f"receiver failed: {receiver.stderr.read()}")
        sender = hosts.python(1, "--role", "send", "--host", hosts.addr(2), "--port", port,
                              *common)
        out, err = sender.communicate(timeout=600)
        if sender.returncode != 0:
            raise RuntimeError(f"sender failed: {err}")
        _out, rerr = receiver.communicate(timeout=60)
        if receiver.returncode != 0:
            raise RuntimeError(f"receiver failed: {rerr}")
        return json.loads(out)["seconds"]
    finally:
        for proc in (sender, receiver):
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()


def bench_net(args) -> dict:
    total = int(args.gib * (1 << 30)) // PAGE_BYTES * PAGE_BYTES
    modes = [m for m in args.modes.split(",") if m]
    results: dict = {"bytes": total, "rate": args.rate, "modes": {}}
    tls_tmp = None
    if "tls" in modes and shutil.which("openssl") is None:
        print("bench_net: openssl CLI missing, skipping tls", file=sys.stderr)
        modes.remove("tls")
    hosts = Loopback() if args.loopback else Hosts(args.rate)
    try:
        if "tls" in modes:
            tls_tmp = tempfile.TemporaryDirectory(prefix=f"vmem-bench-tls-{os.getpid()}-")
            _make_certs(tls_tmp.name, hosts.addr(2))
        for mode in modes:
            seconds = run_mode(hosts, mode, total, tls_tmp.name if tls_tmp else None)
            results["modes"][mode] = {"seconds": seconds, "GBps": total / seconds / 1e9}
    finally:
        hosts.down()
        if tls_tmp is not None:
            tls_tmp.cleanup()
    base = results["modes"].get("plain")
    for row in results["modes"].values():
        row["vs_plain"] = row["GBps"] / base["GBps"] if base else None
    return results


# -- codec --------------------------------------------------------------------------------

def _guest_pages(n_pages: int, zero_fraction: float) -> np.ndarray:
    """Pages as the guest workloads write them (guests/memory.py stamps), some zero."""
    from guests.memory import _write_stamps  # the real stamp writer: same bytes as a guest

    words = np.empty((n_pages, PAGE_BYTES // 8), dtype=np.uint64)
    pages = np.arange(n_pages, dtype=np.uint64) + 100
    versions = np.random.default_rng(2).integers(1, 1 << 20, n_pages).astype(np.uint32)
    versions[np.random.default_rng(3).random(n_pages) < zero_fraction] = 0  # never written
    _write_stamps(words, pages, versions)
    return words.view(np.uint8).reshape(n_pages, PAGE_BYTES)


def _text_pages(n_pages: int) -> np.ndarray:
    rng = np.random.default_rng(4)
    words = [b"migration", b"page", b"dirty", b"round", b"the", b"of", b"guest", b"xen",
             b"qemu", b"bandwidth", b"downtime", b"\n", b"=", b"0x", b"1", b"42"]
    picks = rng.integers(0, len(words), n_pages * PAGE_BYTES // 4)
    text = b" ".join(words[i] for i in picks)[:n_pages * PAGE_BYTES]
    return np.frombuffer(text, dtype=np.uint8).copy().reshape(n_pages, PAGE_BYTES)


def _rate(nbytes: int, fn, repeat: int = 1) -> float:
    fn()  # warm-up (page faults, caches)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return nbytes * repeat / (time.perf_counter() - start) / 1e9


def bench_codec(args) -> dict:
    from transport.codec import decode_batch, encode_batch, method_unavailable, zero_page_mask

    out: dict = {"zero_detect_GBps": {}, "compress": {}}
    gib_pages = (1 << 30) // PAGE_BYTES
    random_pages = np.random.default_rng(5).integers(0, 256, (gib_pages, PAGE_BYTES),
                                                     dtype=np.uint8)
    out["zero_detect_GBps"]["random (no zero page)"] = _rate(
        random_pages.nbytes, lambda: zero_page_mask(random_pages))
    random_pages[::2] = 0
    out["zero_detect_GBps"]["half zero"] = _rate(random_pages.nbytes,
                                                 lambda: zero_page_mask(random_pages))
    random_pages[:] = 0
    out["zero_detect_GBps"]["all zero"] = _rate(random_pages.nbytes,
                                                lambda: zero_page_mask(random_pages))
    random_pages = None  # free the GiB before the compression runs
    n_pages = (256 << 20) // PAGE_BYTES
    kinds = {"guest stamps": _guest_pages(n_pages, 0.0),
             "guest, half never written": _guest_pages(n_pages, 0.5),
             "text-like": _text_pages(n_pages)}
    methods = [("none", None), ("zstd", 1), ("zstd", 3), ("lz4", None)]
    for kind, pages in kinds.items():
        for method, level in methods:
            if method_unavailable(method):
                continue
            name = f"{method}-{level}" if level else method
            batches = [pages[i:i + BATCH_PAGES] for i in range(0, n_pages, BATCH_PAGES)]
            encoded = [encode_batch(b, method, level) for b in batches]
            wire = sum(len(bm) + sum(memoryview(p).nbytes for p in pl) for bm, pl in encoded)
            staging = np.empty((BATCH_PAGES, PAGE_BYTES), dtype=np.uint8)

            def encode_all():
                for b in batches:
                    encode_batch(b, method, level)

            def decode_all():
                for (bm, pl), b in zip(encoded, batches):
                    decode_batch(bm, pl, method, staging[:len(b)])

            out["compress"][f"{kind} / {name}"] = {
                "ratio": pages.nbytes / wire,
                "encode_GBps": _rate(pages.nbytes, encode_all),
                "decode_GBps": _rate(pages.nbytes, decode_all),
            }
    return out


# -- main ---------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--rate", default=None, help="tc rate to shape the hosts, e.g. 1gbit")
    parser.add_argument("--codec", action="store_true", help="benchmark transport.codec")
    parser.add_argument("--loopback", action="store_true",
                        help="both ends in this namespace over 127.0.0.1 (no test hosts)")
    parser.add_argument("--json", action="store_true")
    # internal: the roles run inside the namespaces
    parser.add_argument("--role", choices=("send", "recv"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "recv":
        role_recv(args)
        return 0
    if args.role == "send":
        role_send(args)
        return 0
    if args.codec:
        results = bench_codec(args)
        if args.json:
            print(json.dumps(results, indent=2))
            return 0
        print("zero-page detection (1 GiB):")
        for kind, rate in results["zero_detect_GBps"].items():
            print(f"  {kind:28s} {rate:7.2f} GB/s")
        print("batches of 1024 pages (256 MiB per kind):      ratio  encode GB/s  decode GB/s")
        for name, row in results["compress"].items():
            print(f"  {name:44s} {row['ratio']:6.2f}  {row['encode_GBps']:10.2f}  "
                  f"{row['decode_GBps']:10.2f}")
        return 0
    if not args.loopback and (os.geteuid() != 0 or shutil.which("ip") is None):
        print("bench_net: needs root and iproute2 (network namespaces)", file=sys.stderr)
        return 1
    results = bench_net(args)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    shaped = f", shaped to {args.rate}" if args.rate else ""
    where = ("loopback TCP, 127.0.0.1" if args.loopback
             else f"host 1 -> host 2, network namespaces{shaped}")
    print(f"{results['bytes'] / (1 << 30):g} GiB ({where})")
    print(f"  {'mode':10s} {'seconds':>8s} {'GB/s':>7s} {'vs plain':>9s}")
    for mode, row in results["modes"].items():
        ratio = f"{row['vs_plain']:.2f}" if row["vs_plain"] else "-"
        print(f"  {mode:10s} {row['seconds']:8.2f} {row['GBps']:7.2f} {ratio:>9s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
