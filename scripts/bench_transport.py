#!/usr/bin/env python3
"""Benchmark: plain Python socket copy vs transport.send_pages / recv_pages_into.

Moves 1 GiB (by default) from a parent process to a forked child over a unix socketpair:

* ``plain``: the sender ``sendall``s 4 MiB memoryview chunks, the receiver ``recv_into``s a
  preallocated buffer -- the best a straightforward Python loop does;
* ``pages-contiguous``: ``send_pages`` in batches of 1024 consecutive pages (one run each:
  the zero-copy path);
* ``pages-runs16``: batches of 64 runs of 16 pages (the direct path at its run limit);
* ``pages-scattered``: batches of 1024 pages 256 apart (1024 runs each: the staging path).

Each page batch carries a realistic header: the page count and the int64 page indices,
which the receiver reads before placing the pages.  The child verifies every byte against
the expected pattern after each trial (not timed).  Throughput is bytes of page data /
wall time from the first send to the child's acknowledgement; GB = 10^9 bytes.

Usage: python3 scripts/bench_transport.py [--gib 1] [--trials 3] [--buffer-bytes N]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from transport import (  # noqa: E402
    SOCKET_BUFFER_BYTES,
    channel_pair,
    recv_pages_into,
    send_pages,
)

PAGE_BYTES = 4096
BATCH_PAGES = 1024
CHUNK_BYTES = BATCH_PAGES * PAGE_BYTES
VERIFY_CHUNK_WORDS = 8 << 20  # 64 MiB of uint64 per comparison step

MODES = ["plain", "pages-contiguous", "pages-runs16", "pages-scattered"]
_COMMAND = struct.Struct("<QQ")  # mode index, trial; mode index 2**64-1 = quit
_COUNT = struct.Struct("<Q")


def fill_pattern(ram: np.ndarray) -> None:
    """Every 8-byte word distinct, so a misplaced page is detected."""
    words = ram.reshape(-1).view(np.uint64)
    np.multiply(np.arange(words.size, dtype=np.uint64), np.uint64(0x9E3779B97F4A7C15),
                out=words)


def verify_pattern(ram: np.ndarray) -> bool:
    words = ram.reshape(-1).view(np.uint64)
    for first in range(0, words.size, VERIFY_CHUNK_WORDS):
        expected = np.arange(first, min(first + VERIFY_CHUNK_WORDS, words.size),
                             dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        if not np.array_equal(words[first:first + expected.size], expected):
            return False
    return True


def batches(mode: str, npages: int):
    """Sorted int64 page batches of BATCH_PAGES pages that together cover every page once."""
    nbatches = npages // BATCH_PAGES
    if mode == "pages-contiguous":
        for k in range(nbatches):
            yield np.arange(k * BATCH_PAGES, (k + 1) * BATCH_PAGES, dtype=np.int64)
    elif mode == "pages-runs16":
        run, runs = 16, BATCH_PAGES // 16
        stride = npages // runs
        for k in range(nbatches):
            starts = np.arange(runs, dtype=np.int64) * stride + k * run
            yield (starts[:, None] + np.arange(run, dtype=np.int64)).reshape(-1)
    elif mode == "pages-scattered":
        for k in range(nbatches):
            yield np.arange(k, npages, nbatches, dtype=np.int64)
    else:
        raise ValueError(mode)


def receiver(chan, npages: int) -> None:
    """Child: receive trials until told to quit; acknowledge each with a verification bit."""
    ram = np.zeros((npages, PAGE_BYTES), dtype=np.uint8)  # zeros + fill below: prefaulted
    ram.fill(1)
    staging = np.empty((BATCH_PAGES, PAGE_BYTES), dtype=np.uint8)
    staging.fill(1)
    pages = np.empty(BATCH_PAGES, dtype=np.int64)
    total = ram.nbytes
    while True:
        mode_index, _trial = _COMMAND.unpack(chan.recv_exact(_COMMAND.size))
        if mode_index == 2 ** 64 - 1:
            return
        ram.fill(0)
        mode = MODES[mode_index]
        if mode == "plain":
            sock, view, got = chan.sock, memoryview(ram).cast("B"), 0
            while got < total:
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise EOFError("sender went away")
                got += n
        else:
            for _ in range(npages // BATCH_PAGES):
                (count,) = _COUNT.unpack(chan.recv_exact(_COUNT.size))
                batch = pages[:count]
                chan.recv_into(batch)
                recv_pages_into(chan, ram, batch, staging)
        chan.send(b"\x01" if verify_pattern(ram) else b"\x00")


def run_trial(chan, ram: np.ndarray, staging: np.ndarray, mode: str, trial: int) -> float:
    chan.send(_COMMAND.pack(MODES.index(mode), trial))
    npages = ram.shape[0]
    # Page lists are built before the clock starts: a tracker hands them to us ready-made.
    page_batches = [] if mode == "plain" else list(batches(mode, npages))
    headers = [_COUNT.pack(len(b)) + b.tobytes() for b in page_batches]
    t0 = time.perf_counter()
    if mode == "plain":
        sock, view = chan.sock, memoryview(ram).cast("B")
        for offset in range(0, ram.nbytes, CHUNK_BYTES):
            sock.sendall(view[offset:offset + CHUNK_BYTES])
    else:
        for header, batch in zip(headers, page_batches):
            send_pages(chan, header, ram, batch, staging)
    ok = chan.recv_exact(1)
    elapsed = time.perf_counter() - t0
    if ok != b"\x01":
        raise SystemExit(f"{mode}: receiver saw wrong data")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="data per trial, GiB")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--buffer-bytes", type=int, default=SOCKET_BUFFER_BYTES,
                        help="SO_SNDBUF/SO_RCVBUF requested for the socketpair")
    args = parser.parse_args()
    npages = int(args.gib * (1 << 30)) // PAGE_BYTES // BATCH_PAGES * BATCH_PAGES

    sender_chan, receiver_chan = channel_pair(args.buffer_bytes)
    sndbuf = sender_chan.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            sender_chan.close()
            receiver(receiver_chan, npages)
        except BaseException as err:  # report, then leave without running parent cleanup
            print(f"receiver failed: {err!r}", file=sys.stderr)
            code = 1
        finally:
            os._exit(code)
    receiver_chan.close()
    try:
        ram = np.empty((npages, PAGE_BYTES), dtype=np.uint8)
        fill_pattern(ram)
        staging = np.empty((BATCH_PAGES, PAGE_BYTES), dtype=np.uint8)
        staging.fill(1)
        print(f"{npages * PAGE_BYTES / 2**30:.2f} GiB per trial, {args.trials} trials, "
              f"batch {BATCH_PAGES} pages, SO_SNDBUF {sndbuf} B, pid {os.getpid()}")
        results: dict[str, list[float]] = {}
        for trial in range(args.trials):
            for mode in MODES:  # interleaved, so drift hits every mode alike
                results.setdefault(mode, []).append(
                    run_trial(sender_chan, ram, staging, mode, trial))
        sender_chan.send(_COMMAND.pack(2 ** 64 - 1, 0))
    finally:
        sender_chan.close()
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        print("receiver failed", file=sys.stderr)
        return 1

    total = npages * PAGE_BYTES
    plain_best = total / min(results["plain"])
    print(f"{'mode':<18} {'best GB/s':>10} {'median GB/s':>12} {'vs plain (best)':>16}")
    for mode in MODES:
        best = total / min(results[mode])
        median = total / statistics.median(results[mode])
        print(f"{mode:<18} {best / 1e9:>10.2f} {median / 1e9:>12.2f} "
              f"{best / plain_best:>15.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
