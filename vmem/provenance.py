"""Where a measurement came from: the software, the machine and the command behind a report.

:func:`collect` gathers what a reader needs to reproduce or to distrust a number: vmem's
version and, when vmem runs from a git checkout, its commit (None when installed from a
wheel: there is no checkout to ask), the kernel, hostname, CPU model and count, memory,
Python, the machine's boot (its kernel's boot id and boot time: figures from two boots of one
machine can differ by more than any change between them), the date (UTC) and the full command
line.  Every probe is best effort: a field that cannot be read is None, never an exception (a
report must not fail for its label).
"""
from __future__ import annotations

import os
import platform
import shlex
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["boot_id", "booted_utc", "collect", "command_line", "git_commit", "network_identity", "summary_line"]

#: A git that does not answer within this is treated as absent (a report must not hang).
GIT_TIMEOUT_S = 2.0


def git_commit(package_dir: Path | None = None) -> str | None:
    """The commit of the checkout vmem runs from (``+dirty`` if files differ), else None.

    None when vmem was installed (a wheel in site-packages: the package's parent holds no
    ``.git``) or git is missing or slow.
    """
    root = (package_dir or Path(__file__).resolve().parent).parent
    if not (root / ".git").exists():  # a directory in a clone, a file in a worktree
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def boot_id(path: str = "/proc/sys/kernel/random/boot_id") -> str | None:
    """The running kernel's boot id (a UUID, new at every boot), or None."""
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def booted_utc(path: str = "/proc/stat") -> str | None:
    """When the running kernel booted (``btime`` of /proc/stat), ISO 8601 in UTC, or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("btime "):
                    return datetime.fromtimestamp(int(line.split()[1]), timezone.utc).isoformat(timespec="seconds")
    except (OSError, ValueError):
        pass
    return None


def command_line() -> str:
    """This process's full command line as the kernel has it (interpreter and all), shell-quoted."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return shlex.join(a.decode(errors="replace") for a in f.read().split(b"\0")[:-1])
    except OSError:
        return shlex.join([sys.executable, *sys.argv])


def collect(argv: list[str] | None = None) -> dict:
    """The provenance object of a report (docs/report.md, ``provenance``).

    Args:
        argv: the command line to record (default: this process's ``sys.argv``).
    """
    from vmem import __version__

    return {
        "vmem_version": __version__,
        "git_commit": git_commit(),
        "kernel": platform.release(),
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "python": platform.python_version(),
        "boot_id": boot_id(),
        "booted_utc": booted_utc(),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command_line": command_line() if argv is None else shlex.join(argv),
    }


def summary_line(prov: dict) -> str:
    """One line naming the machine and software of ``prov`` (a :func:`collect` result), for a
    benchmark's log: figures from different hosts, kernels or boots are not comparable as
    they stand (docs/bench.md)."""
    def get(key):
        v = prov.get(key)
        return "?" if v is None else v

    return (f"machine: {get('hostname')}, kernel {get('kernel')}, {get('cpu_count')} CPUs, booted {get('booted_utc')} "
            f"(boot id {str(get('boot_id'))[:8]}); vmem {get('vmem_version')} at {prov.get('git_commit') or 'no checkout'}")


def network_identity() -> dict:
    """This process's host as the network sees it: hostname, network namespace (``net:[inode]``,
    as /proc/self/ns/net reads: two processes are in the same namespace iff it is equal) and
    its IPv4 addresses other than loopback.  Best effort: a field that cannot be read is None."""
    try:
        netns = os.readlink("/proc/self/ns/net")
    except OSError:
        netns = None
    try:
        import psutil

        ipv4 = sorted(a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                      if a.family == socket.AF_INET and not a.address.startswith("127."))
    except (ImportError, OSError):
        ipv4 = None
    return {"hostname": socket.gethostname(), "netns": netns, "ipv4": ipv4}
