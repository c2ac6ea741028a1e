"""One-host migration: a source guest, a destination process, a socketpair between them.

``run_local_migration`` is what ``vmem migrate --workload ...`` does without any agent.  It
owns every process it starts and reaps all of them on every path.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from transport import ShapedChannel, channel_pair

from .migrator import MigrationOptions, migrate
from .report import MigrationReport

__all__ = ["run_local_migration", "spawn_destination", "source_guest_check"]

_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn_destination(sock_fd: int, urgent_fd: int = -1) -> subprocess.Popen:
    """Start ``python -m vmem.destination`` on an inherited socket fd (and the urgent one)."""
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS threads only spin here
    env["PYTHONPATH"] = _PROJECT_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    argv = [sys.executable, "-m", "vmem.destination", "--fd", str(sock_fd)]
    fds = (sock_fd,)
    if urgent_fd >= 0:
        argv += ["--urgent-fd", str(urgent_fd)]
        fds = (sock_fd, urgent_fd)
    return subprocess.Popen(argv, pass_fds=fds, env=env, stdin=subprocess.DEVNULL)


def run_local_migration(guest, options: MigrationOptions | None = None, progress=None) -> MigrationReport:
    """Migrate the running ``guest`` to a new destination process on this host.

    On success the source guest has exited and the destination (and its guest) has shut
    down after ``options.observe_s``.  On failure the source guest is still running (unless
    it crashed) and its own ledger check is recorded in ``report.verification['source_guest_check']``.
    The destination process is always reaped.
    """
    options = options or MigrationOptions()
    src_ch, dst_ch = channel_pair()
    # Post-copy demand pages get their own connection, so an answer to a fault never
    # queues behind megabytes of background push (QEMU's postcopy-preempt channel).
    urgent = channel_pair() if options.postcopy != "off" else None
    dest = None
    try:
        dest = spawn_destination(dst_ch.fileno(), urgent[1].fileno() if urgent else -1)
        dst_ch.close()
        if urgent:
            urgent[1].close()
        channel = ShapedChannel(src_ch, options.bandwidth_Bps) if options.bandwidth_Bps else src_ch
        report = migrate(guest, channel, options, progress, urgent[0] if urgent else None)
    finally:
        src_ch.close()
        dst_ch.close()
        if urgent:
            urgent[0].close()
            urgent[1].close()
        if dest is not None:
            try:
                dest.wait(30)
            except subprocess.TimeoutExpired:
                dest.kill()
                dest.wait()
    report.processes.setdefault("destination_exit_status", dest.returncode if dest else None)
    if report.outcome != "completed" and guest.alive():
        # The promise on failure: the source guest keeps running (or, after a post-copy
        # switch, stays paused) with intact memory.
        report.verification["source_guest_check"] = source_guest_check(guest)
        if not guest.alive():
            report.source_guest_state = "crashed"
        elif report.source_guest_state != "paused":
            report.source_guest_state = "running"
    return report


def source_guest_check(guest) -> dict:
    """The source guest's own ledger check after a failed migration, timed; never raises."""
    t = time.monotonic()
    try:
        check = guest.verify()
    except Exception as err:  # reported, not raised: the report is the product
        check = {"ok": False, "detail": str(err)}
    check["duration_s"] = round(time.monotonic() - t, 3)
    return check
