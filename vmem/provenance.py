"""Where a measurement came from: the software, the machine and the command behind a report.

:func:`collect` gathers what a reader needs to reproduce or to distrust a number: vmem's
version and, when vmem runs from a git checkout, its commit (None when installed from a
wheel: there is no checkout to ask), the kernel, hostname, CPU model and count, memory,
Python, the date (UTC) and the full command line.  Every probe is best effort: a field
that cannot be read is None, never an exception (a report must not fail for its label).
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

__all__ = ["collect", "command_line", "git_commit", "network_identity"]

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
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command_line": command_line() if argv is None else shlex.join(argv),
    }


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
