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

__all__ = ["process_figures", "private_excl_ram_bytes", "PeakSampler", "RAM_MAPPING_PREFIX",
           "process_age_s"]

RAM_MAPPING_PREFIX = "/memfd:vmem-ram"


def private_excl_ram_bytes(pid: int) -> int | None:
    """Private_Clean + Private_Dirty of ``pid`` outside the guest-RAM memfd mappings (smaps)."""
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


def process_age_s(pid: int | None = None) -> float | None:
    """Seconds since process ``pid`` (default: this one) was started by the kernel.

    From ``/proc/PID/stat``'s start time (clock ticks since boot, 10 ms resolution) against
    CLOCK_BOOTTIME.  A process measures its own interpreter start-up and imports with it.
    None if the process is gone or /proc is unreadable.
    """
    import time

    try:
        with open(f"/proc/{pid or os.getpid()}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    started_s = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 overall
    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started_s)


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
            "private_excl_ram_bytes": private_excl_ram_bytes(pid),
        }
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {"cpu_s": None, "uss_bytes": None, "rss_peak_bytes": None, "private_excl_ram_bytes": None}


def _rss_anon_bytes(pid: int) -> int | None:
    """RssAnon from /proc/PID/status: private anonymous memory (heap, numpy arrays).

    Guest RAM is shared memory (RssShmem), so this is the process's own memory by
    construction, and reading it costs microseconds (no page-table walk, unlike smaps).
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakSampler:
    """Tracks the peak private memory of some processes during a migration.

    A background thread reads RssAnon (cheap: /proc/PID/status) every ``interval_s`` and
    keeps the maxima as ``private_peak_bytes``.  The expensive smaps-based figures (USS)
    are taken only once, by :func:`process_figures` at the end.  Sampling only migrator
    processes: a guest's figures come from :func:`process_figures` too.
    """

    def __init__(self, pids: dict[str, int], interval_s: float = 0.02):
        import threading

        self._pids = dict(pids)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.peaks: dict[str, dict] = {name: {"private_peak_bytes": 0} for name in pids}
        self._thread = threading.Thread(target=self._run, name="vmem-peak-sampler", daemon=True)

    def _sample(self) -> None:
        for name, pid in self._pids.items():
            anon = _rss_anon_bytes(pid)
            if anon is not None and anon > self.peaks[name]["private_peak_bytes"]:
                self.peaks[name]["private_peak_bytes"] = anon

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def __enter__(self) -> "PeakSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()

    def merge_into(self, processes: dict) -> None:
        """Add the peaks to a report's ``processes`` section (per process name)."""
        for name, peak in self.peaks.items():
            processes.setdefault(name, {}).update(peak)
