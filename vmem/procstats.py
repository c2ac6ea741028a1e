"""Process figures for reports: CPU seconds and private memory, from psutil and smaps.

USS (psutil's unique set size) counts every page mapped by this process alone.  A migrator
that writes incoming pages through its own mapping of the destination RAM memfd would show
those pages in its USS although they are the guest's RAM (shared memory, page cache), not
a copy.  So we also report ``private_excl_ram_bytes``: USS minus the guest-RAM mappings,
which is what the "no full copies of guest RAM" goal is about.
"""
from __future__ import annotations

import os

import psutil

__all__ = ["process_figures", "RAM_MAPPING_PREFIX"]

RAM_MAPPING_PREFIX = "/memfd:vmem-ram"


def _private_excl_ram(pid: int) -> int | None:
    total = 0
    in_ram = False
    try:
        with open(f"/proc/{pid}/smaps", "rb") as f:
            for line in f:
                first = line.split(None, 1)[0]
                if not first.endswith(b":"):
                    # A mapping header: "start-end perms offset dev inode [path]".
                    parts = line.split(None, 5)
                    path = parts[5].decode(errors="replace").strip() if len(parts) > 5 else ""
                    in_ram = path.startswith(RAM_MAPPING_PREFIX)
                elif not in_ram and first in (b"Private_Clean:", b"Private_Dirty:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return None
    return total


def process_figures(pid: int | None = None) -> dict:
    """CPU seconds (user+system), USS, peak RSS and private memory excluding guest RAM.

    Returns a dict with ``cpu_s``, ``uss_bytes``, ``rss_peak_bytes``,
    ``private_excl_ram_bytes``; values are None where the process is gone.
    """
    pid = os.getpid() if pid is None else pid
    try:
        p = psutil.Process(pid)
        cpu = p.cpu_times()
        mem = p.memory_full_info()
        peak = None
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = int(line.split()[1]) * 1024
        except OSError:
            pass
        return {
            "cpu_s": round(cpu.user + cpu.system, 4),
            "uss_bytes": int(mem.uss),
            "rss_peak_bytes": peak,
            "private_excl_ram_bytes": _private_excl_ram(pid),
        }
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {"cpu_s": None, "uss_bytes": None, "rss_peak_bytes": None, "private_excl_ram_bytes": None}
