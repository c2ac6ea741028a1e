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
from transport.errors import ChannelClosedError

from vmem.migration.source import MigrationOptions
from vmem.migration.report import MigrationReport

__all__ = ["run_local_migration", "LocalDestination", "spawn_destination", "source_guest_check", "settle_source_guest"]

_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds vmem/ and guests/


def spawn_destination(sock_fd: int, urgent_fd: int = -1, resume_fd: int = -1) -> subprocess.Popen:
    """Start ``python -m vmem.migration.destination`` on an inherited socket fd (and the urgent one,
    and a listening socket on which the source reconnects to resume a broken post-copy)."""
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS threads only spin here
    env["PYTHONPATH"] = _PROJECT_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    argv = [sys.executable, "-P", "-m", "vmem.migration.destination", "--fd", str(sock_fd)]  # -P: see guests.launch
    fds = (sock_fd,)
    if urgent_fd >= 0:
        argv += ["--urgent-fd", str(urgent_fd)]
        fds += (urgent_fd,)
    if resume_fd >= 0:
        argv += ["--resume-fd", str(resume_fd)]
        fds += (resume_fd,)
    return subprocess.Popen(argv, pass_fds=fds, env=env, stdin=subprocess.DEVNULL)


#: How often the one-host orchestrator resumes a post-copy whose link broke.
MAX_POSTCOPY_RECOVERIES = 3


class _LinkCutter:
    """Progress sink wrapper that cuts the link ``after_s`` seconds into post-copy (a lab
    fault, to watch recovery): both directions of the main and urgent sockets are shut
    down, as a dead link looks to both ends.  Cuts once."""

    def __init__(self, inner, after_s: float, channels):
        self.inner = inner
        self.after_s = after_s
        self.channels = channels
        self.timer = None

    def _cut(self) -> None:
        import socket

        for ch in self.channels:
            try:
                s = socket.socket(fileno=os.dup(ch.fileno()))
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except (OSError, ChannelClosedError):
                pass  # closed already (the migration ended before the cut): nothing to cut

    def phase(self, name, detail=""):
        self.inner.phase(name, detail)

    def round_start(self, index, pages, kind):
        if kind == "postcopy" and self.timer is None:
            import threading

            self.timer = threading.Timer(self.after_s, self._cut)
            self.timer.daemon = True
            self.timer.start()
        self.inner.round_start(index, pages, kind)

    def sent(self, pages, nbytes):
        self.inner.sent(pages, nbytes)

    def round_end(self, stats):
        self.inner.round_end(stats)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


class LocalDestination:
    """A destination process for one one-host migration, with its connections.

    Start it *before* the guest boots (:meth:`start`) and the destination's interpreter and
    imports -- the largest part of the handshake, 0.3-0.6 s on a quiet 2-core host and
    several seconds under load -- overlap the guest's boot and warm-up instead of sitting
    in the migration (it then waits for the preamble).  ``run_local_migration`` takes it
    over (``destination=``) and reaps it on every path; one that was never used is reaped
    by :meth:`close` (it is also a context manager).  Each instance serves one migration.

    ``report.timings_ms["setup_destination_imports"]`` says how long the process took to be
    ready, ``setup_destination_waited`` how long it then waited for the preamble: a
    destination started early shows a wait instead of an import in ``setup_time_ms``.
    """

    def __init__(self, options: MigrationOptions):
        import socket

        self.postcopy = options.postcopy != "off"
        self.recovery = bool(options.postcopy_recovery and self.postcopy)
        self.src_ch = self.dst_ch = None
        self.urgent = None
        self.resume_sock = None
        self.proc: subprocess.Popen | None = None
        self.used = False
        try:
            self.src_ch, self.dst_ch = channel_pair()
            # Post-copy demand pages get their own connection, so an answer to a fault never
            # queues behind megabytes of background push (QEMU's postcopy-preempt channel).
            self.urgent = channel_pair() if self.postcopy else None
            # Recovery: the destination listens on an abstract unix address for the source to
            # come back (nothing on disk; the kernel frees the name with the socket).
            if self.recovery:
                self.resume_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.resume_sock.bind(f"\0vmem-resume-{os.getpid()}-{os.urandom(6).hex()}")
                self.resume_sock.listen(4)
            self.proc = spawn_destination(self.dst_ch.fileno(), self.urgent[1].fileno() if self.urgent else -1,
                                          self.resume_sock.fileno() if self.resume_sock else -1)
        except BaseException:
            self.close()
            raise
        # The child holds its ends now.
        self.dst_ch.close()
        if self.urgent:
            self.urgent[1].close()

    @classmethod
    def start(cls, options: MigrationOptions | None = None) -> "LocalDestination":
        """Start the destination process for a migration with ``options`` (post-copy and
        recovery decide which connections it gets)."""
        return cls(options or MigrationOptions())

    def fits(self, options: MigrationOptions) -> bool:
        """Whether this destination has the connections ``options`` need."""
        return (self.postcopy == (options.postcopy != "off")
                and self.recovery == bool(options.postcopy_recovery and options.postcopy != "off"))

    def close(self) -> int | None:
        """Close our ends and reap the process (a destination that never got a preamble
        exits at the EOF); returns its exit status.  Idempotent."""
        for ch in (self.src_ch, self.dst_ch):
            if ch is not None:
                ch.close()
        if self.urgent:
            self.urgent[0].close()
            self.urgent[1].close()
        if self.resume_sock is not None:
            self.resume_sock.close()
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def __enter__(self) -> "LocalDestination":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_local_migration(guest, options: MigrationOptions | None = None, progress=None, *,
                        cut_link_after_s: float | None = None,
                        destination: LocalDestination | None = None) -> MigrationReport:
    """Migrate the running ``guest`` to a new destination process on this host.

    On success the source guest has exited and the destination (and its guest) has shut
    down after ``options.observe_s``.  On failure the source guest is still running (unless
    it crashed) and its own ledger check is recorded in ``report.verification['source_guest_check']``.
    The destination process is always reaped.

    With ``options.postcopy_recovery``, a post-copy whose link breaks after the switch is
    resumed over new connections (up to MAX_POSTCOPY_RECOVERIES times).
    ``cut_link_after_s``: a lab fault -- cut the link that long into post-copy.
    ``destination``: one started ahead (:meth:`LocalDestination.start`, with the same
    options); this call takes it over.  None: one is started now.

    Raises:
        ConfigError: ``destination`` was used before or lacks a connection ``options`` need.
    """
    from vmem.errors import ConfigError
    from vmem.migration.source import SourceMigration, _Progress as NullProgress

    options = options or MigrationOptions()
    if destination is not None and (destination.used or not destination.fits(options)):
        destination.close()
        raise ConfigError("destination", "a started destination serves one migration, with the post-copy and "
                                         "recovery options it was started for: start one per migration")
    dest = destination
    cutter = None
    extra = []
    try:
        if dest is None:
            dest = LocalDestination.start(options)
        dest.used = True
        src_ch, urgent, resume_sock = dest.src_ch, dest.urgent, dest.resume_sock
        if cut_link_after_s is not None:
            cutter = _LinkCutter(progress or NullProgress(), cut_link_after_s, [src_ch] + ([urgent[0]] if urgent else []))
            progress = cutter
        channel = ShapedChannel(src_ch, options.bandwidth_Bps) if options.bandwidth_Bps else src_ch
        mig = SourceMigration(guest, channel, options, progress, urgent[0] if urgent else None)
        report = mig.run()
        tries = 0
        while report.outcome == "paused" and mig.resumable and tries < MAX_POSTCOPY_RECOVERIES and dest.proc.poll() is None:
            tries += 1
            main = _connect_abstract(resume_sock.getsockname())
            extra.append(main)
            urg = None
            if urgent:
                urg = _connect_abstract(resume_sock.getsockname())
                extra.append(urg)
            if options.bandwidth_Bps:
                main = ShapedChannel(main, options.bandwidth_Bps)
            report = mig.resume_postcopy(main, urg)
        if report.outcome == "paused":
            report.reason += " (the one-host orchestrator gave up resuming it)"
    finally:
        if cutter is not None:
            cutter.cancel()
        for ch in extra:
            ch.close()
        status = dest.close() if dest is not None else None
    report.processes.setdefault("destination_exit_status", status)
    if report.outcome != "completed" and guest.alive():
        settle_source_guest(report, guest)
    return report


def settle_source_guest(report, guest) -> None:
    """After a migration that did not complete, with the source guest alive: record its own
    ledger check and its state.

    The promise on failure: the source guest keeps running (or, after a post-copy switch,
    stays paused) with intact memory; the check proves it, and a guest that died meanwhile
    reads "crashed".
    """
    report.verification["source_guest_check"] = source_guest_check(guest)
    if not guest.alive():
        report.source_guest_state = "crashed"
    elif report.source_guest_state != "paused":
        report.source_guest_state = "running"


def _connect_abstract(address):
    import socket

    from transport import SocketChannel

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(address)
    return SocketChannel(s)


def source_guest_check(guest) -> dict:
    """The source guest's ledger check after a failed migration, timed; never raises.

    Read from outside while the guest runs on (``verify_running``): it does not stop the
    guest (a paused guest is checked exactly the same way)."""
    t = time.monotonic()
    try:
        steps0 = guest.counters()["steps"]
        check = guest.verify_running()
        check["guest_steps_during"] = guest.counters()["steps"] - steps0
    except Exception as err:  # reported, not raised: the report is the product
        check = {"ok": False, "detail": str(err)}
    check["duration_s"] = round(time.monotonic() - t, 3)
    return check
