"""Plain page round trips over a connected socket: the baseline the benchmarks put beside a
post-copy demand fault's round trip (scripts/bench_postcopy.py, tests/testhosts.py for
scripts/bench_agent.py).  A request of 16 bytes, an answer of one 4 KiB page, nothing else:
no userfaultfd, no placement, no MAC."""
from __future__ import annotations

import socket
import time

import numpy as np

REQUEST_BYTES = 16
PAGE_BYTES = 4096


def serve_pages(sock: socket.socket) -> None:
    """Answer every REQUEST_BYTES request on ``sock`` with a page until the peer closes."""
    page, req = bytes(range(256)) * (PAGE_BYTES // 256), bytearray(REQUEST_BYTES)
    while sock.recv_into(req, REQUEST_BYTES, socket.MSG_WAITALL) == REQUEST_BYTES:
        sock.sendall(page)


def paced_round_trips(sock: socket.socket, count: int, rate_pps: float, warmup: int = 0) -> np.ndarray:
    """``warmup`` unmeasured round trips, then ``count`` of them, one every 1/``rate_pps`` s
    (paced like a guest faulting at that rate; a late one is not made up): each one's time
    from the request's send to the answer's last byte, in ns.

    Raises:
        ConnectionError: the server closed the connection.
    """
    req, page = b"r" * REQUEST_BYTES, bytearray(PAGE_BYTES)

    def one() -> int:
        t0 = time.perf_counter_ns()
        sock.sendall(req)
        if sock.recv_into(page, PAGE_BYTES, socket.MSG_WAITALL) != PAGE_BYTES:
            raise ConnectionError("the page server closed the connection")
        return time.perf_counter_ns() - t0

    for _ in range(warmup):
        one()
    lat = np.empty(count, dtype=np.int64)
    interval_ns = int(1e9 / rate_pps)
    nxt = time.perf_counter_ns()
    for i in range(count):
        lat[i] = one()
        nxt += interval_ns
        wait = nxt - time.perf_counter_ns()
        if wait > 0:
            time.sleep(wait / 1e9)
        else:
            nxt = time.perf_counter_ns()
    return lat


def summary_us(lat_ns: np.ndarray) -> dict:
    """``{"p50_us", "p99_us", "max_us", "count"}`` of round-trip times in ns."""
    us = lat_ns / 1e3
    return {"p50_us": round(float(np.percentile(us, 50)), 1), "p99_us": round(float(np.percentile(us, 99)), 1),
            "max_us": round(float(us.max()), 1), "count": int(len(us))}
