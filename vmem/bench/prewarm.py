"""Touch and free fresh memory before a timed transfer, so that the transfer draws pages
the VM's host has backed.

On this kind of VM (Firecracker, the balloon's free-page reporting on) the first touch of a
page the kernel has handed back to the host is a host fault: filling an 8 GiB memfd in
1 GiB steps ran at 3.28 GiB/s for the first GiB (recently freed memory) and 0.34-0.51 GiB/s
for every later one (~11 us a page).  A copy into fresh memory -- a migration's destination,
or the plain copy it is compared with -- then runs at either speed depending on which free
pages it draws.  Memory touched and freed just before goes back to the head of the free
lists, and the next allocations get it.  Benchmarks that compare a copy into fresh memory
with a baseline pre-warm before every timed transfer, baselines and vmem alike.
"""
from __future__ import annotations

import os
import time

import numpy as np

#: pwrite size of the fill (bytes)
CHUNK_BYTES = 4 << 20
#: memory left available whatever the request (bytes)
RESERVE_BYTES = 2 << 30

_fill: np.ndarray | None = None


def prewarm_bytes_for(size_bytes: int) -> int:
    """How much fresh memory to touch and free before a transfer of a ``size_bytes`` guest:
    the destination's RAM file, the staging and socket buffers, and as much again.  Measured
    (2026-12-05, idle 1 GiB local migrations): touching 1.25 x size left round 0 bimodal --
    0.74-0.77 or 1.87-2.09 GB/s from trial to trial, the destination migrator using 1.0 or
    up to 3.7 CPU-s; 3 GiB touched before each of six runs: 1.38-2.07 GB/s, 0.89-1.18 CPU-s."""
    return 2 * size_bytes + size_bytes // 2


def mem_available_bytes() -> int:
    """/proc/meminfo's MemAvailable, in bytes (0 if unknown)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def prewarm(nbytes: int, enabled: bool = True) -> float | None:
    """Fill a fresh memfd of ``nbytes`` (at most MemAvailable less ``RESERVE_BYTES``) with
    ``pwrite`` and close it; returns the seconds it took, None when disabled or empty.

    A fill well above ~0.3 s a GiB drew cold pages: the run before it left them cold."""
    global _fill
    if not enabled or nbytes <= 0:
        return None
    nbytes = min(nbytes, max(0, mem_available_bytes() - RESERVE_BYTES))
    if _fill is None:
        _fill = np.full(CHUNK_BYTES, 0x5A, dtype=np.uint8)
    t = time.perf_counter()
    fd = os.memfd_create("bench-prewarm", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        for off in range(0, nbytes - nbytes % CHUNK_BYTES, CHUNK_BYTES):
            os.pwrite(fd, _fill, off)
    finally:
        os.close(fd)
    return round(time.perf_counter() - t, 3)
