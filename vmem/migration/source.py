"""Source side of a migration: precopy rounds, stop-and-copy, verification, commit.

The algorithm (as libxc's ``send_domain_memory_live`` and QEMU's ``ram_save_*``):

1. Preamble (like ``xl migrate``): the guest's description; the destination pre-spawns an
   incoming guest and answers READY.
2. Arm dirty tracking, then round 0 sends every page that holds data (holes read as zero
   and are skipped).  Each later round sends the pages dirtied during the previous one.
   After every round the policy sees libxc's ``precopy_stats`` plus measurements.  The
   loop is :func:`vmem.migration.rounds.run_precopy` (shared with the simulator and the
   model); :class:`_LiveRounds` sends a round and collects the tracker.
3. STOP_AND_COPY: pause the guest at a safe point, collect the final dirty set, send it and
   the guest context (EMULATOR_CONTEXT), END.
4. The destination resumes its guest at once and sends back RESUMED and per-page digests of
   what it placed; we compare them with digests of our frozen RAM, it runs the guest's own
   ledger check, and only then do we COMMIT and let the source guest exit.

The life cycle (SETUP, PRECOPY, STOP_AND_COPY, ... COMPLETED) is a
:class:`vmem.migration.state.SourceState`, changed only through ``_set_state`` (see the
diagram there); the report's ``outcome`` follows it.

Failure semantics: until COMMIT, the source guest's RAM is never written by us; any
failure or ABORT stops tracking, resumes the source guest if we paused it, and tells the
destination to throw away what it built (ROLLBACK or simply closing the stream).

Performance notes: pages move in PAGE_DATA records of up to 1024 pages; contiguous runs
go to ``sendmsg`` as views of the RAM mapping (no copy), scattered pages are gathered with
one ``np.take`` into a staging buffer.  No per-page Python anywhere.
"""
from __future__ import annotations

import errno
import math
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from transport import ChannelBrokenError, ChannelTimeout, TransportError

from vmem.clock import SAME_HOST, ClockOffset
from vmem.format import control, stream

from vmem.format import wire
from vmem.format.wire import MAX_PAGES_PER_RECORD
from vmem.errors import ConfigError, GuestCrashed, MigrationError, StreamError, VmemError, drop_tracebacks
from vmem.pages import PAGE_SIZE, merge_sorted_pages, mismatched_pages, page_buffers
from vmem.provenance import collect as collect_provenance
from vmem.migration import inject
from vmem.migration.policy import Decision, XenDefaultPolicy
from vmem.migration.rounds import RoundResult, run_precopy
from vmem.migration.state import SOURCE_TRANSITIONS, SourceState, StateCell
from vmem.migration.postcopy import drop_links
from vmem.migration.postcopy.source import destination_error
from vmem.procstats import PeakSampler, process_figures
from vmem.migration.report import MigrationReport, RoundStats
from vmem.tracking import make_tracker
from vmem.tracking.stopped import process_stopped

__all__ = ["MigrationOptions", "SourceMigration", "migrate"]

POSTCOPY_MODES = ("off", "allow", "after-precopy", "pure")
#: Pure post-copy measures the guest's progress rate over this window before pausing it.
RATE_WINDOW_S = 0.5
#: After TRANSITION, hold the background push until the destination guest ran its first
#: step (RESUMED), at most this long.
RESUMED_WAIT_S = 0.05
#: Before pausing, wait until no more than this is queued unread at the destination...
DRAIN_TARGET_BYTES = 64 << 10
#: ...but never longer than this (a slow or stuck peer must not stall the switchover).
DRAIN_TIMEOUT_S = 2.0
#: Pure post-copy finds the pages written after it listed the data pages by asking the RAM
#: file which of its holes hold data now (two lseek calls a hole, ~0.6 us here) instead of
#: arming a dirty tracker and scanning every page table entry at the pause (0.5-1.6 ms at
#: 1 GiB, ~2.5 ns a page): it does so while the holes number at most one per this many
#: pages, where the two cost about the same; a guest with more holes is tracked.
PURE_PAGES_PER_HOLE_RECHECKED = 256
#: After an error that says the guest's process is gone (ESRCH), how long its exit may take
#: to become visible before the error is reported as it is.
GUEST_EXIT_WAIT_S = 2.0


@dataclass
class MigrationOptions:
    """Knobs of one migration.

    Attributes:
        tracker: "auto", "uffd-wp" or "mprotect".
        policy: a callable policy (see vmem.migration.policy); Xen's default if None.
        verify: compare destination and source RAM digests before committing.
        guest_check: have the destination guest check its RAM against its ledger before commit.
        observe_s: after commit, let the destination guest run this long and report its progress.
        ack_timeout_s: how long to wait for the destination at each handshake.
        bandwidth_Bps: cap on the link (bytes/s), None for none.
        postcopy: "off" (a policy's POSTCOPY is an error), "allow" (switch when the policy
            says POSTCOPY), "after-precopy" (hybrid: where pre-copy would stop-and-copy,
            switch to post-copy instead), "pure" (no pre-copy round: pause, switch, pull).
        postcopy_recovery: on a broken link after the switch, keep both sides' state and
            end with outcome "paused" (resumable with SourceMigration.resume_postcopy)
            instead of failing.
        postcopy_recovery_wait_s: how long the destination then waits for the source to
            come back before it declares the missing pages lost.
        prealloc: the destination allocates the guest's whole RAM before READY, as QEMU's
            ``-mem-prealloc`` (:func:`vmem.ram.preallocate`), and maps it into its own page
            tables (:meth:`vmem.ram.GuestRam.map_for_writing`): setup grows by that (~0.5 s
            per GiB here, while this guest runs), round 0, the post-copy push and the demand
            answers then write into memory that exists, through a mapping that takes no page
            fault.  The guest's holes become allocated zero pages there.
        pagemap_path: record the page map (vmem.migration.pagemap: bitmaps per round, the
            push, the destination's fault log) and write it to this ``.npz`` at the end;
            None records nothing.
        prepare_pause: just before the stop-and-copy's pause, have all four processes
            rehearse what follows it (the guest's context save, the stream's last records
            on both sides, the incoming guest's restore), if the destination announced it
            can: each ran cold inside the downtime otherwise (``timings_ms.prepare_pause``).
        collect_stop: stop the guest's process (SIGSTOP ... SIGCONT) for each pre-copy
            round's collect, so that re-protecting its written pages needs no TLB-shootdown
            IPI to a CPU it runs on (:mod:`vmem.tracking.stopped`); the rounds' statistics
            say how long it stood still (``guest_stopped_ms``).  uffd-wp only: the mprotect
            and KVM trackers collect inside the guest.
        postcopy_bandwidth_Bps: cap (bytes/s) on the background push after the post-copy
            switch, None for none (QEMU's ``max-postcopy-bandwidth``): a token bucket paces
            the push's batches; demand answers are not counted or held.  ``bandwidth_Bps``,
            which shapes the whole link, still applies too.  Needs post-copy.
        fault_sched: how both hosts schedule the post-copy fault threads
            (:data:`vmem.migration.postcopy.FAULT_SCHEDS`): "default" (nice -15 with a short
            slice where permitted) or "fifo" (SCHED_FIFO; each host must permit it, or the
            migration is refused before any page moves).  Needs post-copy.
        fault_cpu: pin both hosts' post-copy fault threads to this CPU (like libvirt's
            ``emulatorpin`` for one thread), None for no pin; each host must let vmem run
            there, or the migration is refused before any page moves.  With ``fault_sched``
            "fifo" every wake-up of a fault thread lands on that CPU.  Needs post-copy.
    """

    tracker: str = "auto"
    policy: object = None
    verify: bool = True
    guest_check: bool = True
    observe_s: float = 1.0
    ack_timeout_s: float = 120.0
    bandwidth_Bps: float | None = None
    postcopy: str = "off"
    postcopy_recovery: bool = False
    postcopy_recovery_wait_s: float = 60.0
    pagemap_path: str | None = None
    prealloc: bool = False
    prepare_pause: bool = True
    collect_stop: bool = False
    fault_sched: str = "default"
    fault_cpu: int | None = None
    postcopy_bandwidth_Bps: float | None = None
    extra_config: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.postcopy not in POSTCOPY_MODES:
            raise ValueError(f"postcopy must be one of {', '.join(POSTCOPY_MODES)}, not {self.postcopy!r}")
        if self.collect_stop and self.tracker not in ("auto", "uffd-wp"):
            raise ConfigError("--collect-stop", f"needs the uffd-wp tracker, not {self.tracker}: that one collects "
                                                "inside the guest, which a stopped guest cannot do")
        if self.postcopy_bandwidth_Bps is not None:
            if not _is_rate(self.postcopy_bandwidth_Bps):
                raise ConfigError("--postcopy-bandwidth", f"must be a rate > 0, not {self.postcopy_bandwidth_Bps!r}")
            if self.postcopy == "off":
                raise ConfigError("--postcopy-bandwidth", "caps the post-copy push, and this migration has no "
                                                          "post-copy (add --postcopy, --postcopy-after-precopy or "
                                                          "--allow-postcopy, or use --bandwidth for the whole link)")
        from vmem.migration.postcopy import FAULT_SCHEDS

        if self.fault_sched not in FAULT_SCHEDS:
            raise ConfigError("--fault-sched", f"must be one of {', '.join(FAULT_SCHEDS)}, not {self.fault_sched!r}")
        if self.fault_sched != "default" and self.postcopy == "off":
            raise ConfigError("--fault-sched", f"{self.fault_sched} schedules the post-copy fault threads, and this "
                                               "migration has no post-copy (add --postcopy, --postcopy-after-precopy "
                                               "or --allow-postcopy, or drop --fault-sched)")
        if self.fault_cpu is not None:
            from vmem import _native as nat
            from vmem.migration.postcopy import is_cpu_number

            if not is_cpu_number(self.fault_cpu):
                raise ConfigError("--fault-cpu", f"must be a CPU number 0..{nat.MAX_FAULT_CPU - 1}, "
                                                 f"not {self.fault_cpu!r}")
            if self.postcopy == "off":
                raise ConfigError("--fault-cpu", "pins the post-copy fault threads, and this migration has no "
                                                 "post-copy (add --postcopy, --postcopy-after-precopy or "
                                                 "--allow-postcopy, or drop --fault-cpu)")


def _is_rate(x) -> bool:
    """A finite number of bytes/s > 0 (not a bool, not a string: parse those first)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


class _Progress:
    """No-op progress sink; the CLI's live display implements the same methods."""

    def phase(self, name: str, detail: str = "") -> None: ...
    def round_start(self, index: int, pages: int, kind: str) -> None: ...
    def sent(self, pages: int, nbytes: int) -> None: ...
    def round_end(self, stats: RoundStats) -> None: ...


def _outcome_writer(report: MigrationReport):
    """The state cell's hook: the report's ``outcome`` follows the state."""
    def on_state(new: SourceState) -> None:
        report.outcome = new.outcome

    return on_state


def _bytearray_receiver(channel):
    """``recv(n) -> bytearray`` on ``channel`` (a bytearray: the DIGESTS body is used in place)."""
    def recv(n: int) -> bytearray:
        buf = bytearray(n)
        channel.recv_into(buf)
        return buf

    return recv


class SourceMigration:
    """Migrate ``guest`` over ``channel`` (forward stream out, control records back).

    Args:
        guest: the source guest, any :class:`vmem.migration.backend.SourceGuest` (today
            ``guests.launch.ProcessGuest``).
        channel: a connected transport Channel to the destination.
        options: MigrationOptions.
        progress: an object with the ``_Progress`` methods, for a live display.
        clock: the destination's clock against ours (:func:`vmem.clock.estimate_offset`
            between agents); default :data:`vmem.clock.SAME_HOST` (one host, one clock).
            Every duration that ends at the destination is put on our clock with it.
    """

    def __init__(self, guest, channel, options: MigrationOptions | None = None, progress=None, urgent_channel=None,
                 clock: ClockOffset = SAME_HOST):
        self.guest = guest
        self.ch = channel
        self.opt = options or MigrationOptions()
        self.policy = self.opt.policy or XenDefaultPolicy()
        self.progress = progress or _Progress()
        self.report = MigrationReport()
        self.tracker = None
        #: the guest's pause record (context, timestamps) once paused, else None
        self.paused = None
        #: the life cycle (vmem.migration.state); changed only by ``self._state.set``, which
        #: also writes ``report.outcome``
        # The callbacks below hold what they use, not ``self``: a bound method kept in an
        # attribute is a reference cycle, and a migration in a cycle outlives its caller
        # (with its 4 MiB staging buffer) until the garbage collector happens to run --
        # 4 MiB more per migration in a process that runs many (tests/test_migrate.py).
        self._state = StateCell(SourceState.SETUP, SOURCE_TRANSITIONS, _outcome_writer(self.report))
        # Not a state: whether we ever changed the guest's throttle, so that a migration
        # that does not complete gives the guest its full speed back (in any state).
        self._throttled = False
        # bytearray, not bytes: the DIGESTS body (8 bytes per guest page) is used in place.
        self._ctl_reader = control.ControlReader(_bytearray_receiver(self.ch))
        self._writer = stream.StreamWriter(self.ch.send_parts)
        self._staging = np.empty((MAX_PAGES_PER_RECORD, PAGE_SIZE), dtype=np.uint8)
        self.urgent = urgent_channel
        self._send_lock = threading.Lock()
        self._pc = None  # PostcopySource while post-copy runs: it owns the back channel
        #: a cap changed while the migration runs (set_bandwidth) and a PostcopySource being
        #: made from the options exclude each other: the change reaches the one made
        self._speed_lock = threading.Lock()
        self._rate_mark = None  # (monotonic ns, guest steps) where guest_rate.before starts
        self._recoveries = 0
        self._pc_resumed = None  # the destination's RESUMED, once received
        #: why the destination cannot do post-copy (READY), or None
        self._postcopy_unavailable: str | None = None
        self._t_start_ns = 0  # monotonic ns at the start of run()
        #: the handshake's parts, ms (timings_ms["setup_*"]); filled by _run
        self._setup_timings: dict = {}
        self.clock = clock
        # The report's time split (migration_time_s, observe_s): the monotonic second the
        # current run()/resume_postcopy() began, and the seconds counted before it.
        self._t_segment = 0.0
        self._elapsed_before_s = 0.0
        self._zero_holes = 0  # pages skipped as holes (never written) when the first list was built
        self._elided_before = 0  # zero pages elided by links that broke (post-copy recovery)
        self._placed_pages = 0  # pages the destination said it placed (PLACED records)
        self._placed_acks = False  # whether it sends them (its READY says)
        # Post-copy figures kept from the switch to the end of the push (the report's).
        self._pc_pending_total = 0
        self._pc_timings: dict = {}
        self._t_pause0 = 0.0
        #: the page map recorder (MigrationOptions.pagemap_path), else None
        self.pagemap = None

    # --- state -------------------------------------------------------------------------
    @property
    def state(self) -> SourceState:
        """Where the migration is (see vmem.migration.state for the diagram)."""
        return self._state.state

    def _set_state(self, expected: SourceState, new: SourceState) -> None:
        """The one way to change the state (compare-and-set; IllegalTransition if refused)."""
        self._state.set(expected, new)

    # --- helpers -----------------------------------------------------------------------

    def _phase(self, name: str, detail: str = "") -> None:
        self.report.phase = name
        self.progress.phase(name, detail)

    def _send_control(self, ctype, obj=None) -> None:
        parts = control.encode_json_control(ctype, obj) if obj is not None else control.encode_control(ctype)
        self.ch.send_parts(parts)

    def _read_control(self, timeout_s: float, expect: set):
        """Read the next control record, within ``timeout_s``; ERROR becomes MigrationError.

        PLACED records (the destination caught up) are noted in ``_placed_pages`` on the way;
        with an empty ``expect`` (a poll) one of them is returned as read.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            left_s = max(0.0, deadline - time.monotonic())
            if self._pc is not None:
                ctype, body = self._pc.next_control(left_s)  # its thread reads the channel
            else:
                if not self.ch.wait_readable(left_s):
                    raise MigrationError(self.report.phase, f"destination sent nothing for {timeout_s:.0f} s")
                ctype, body = self._ctl_reader.read()
            if ctype != wire.ControlType.PLACED:
                break
            self._placed_pages = max(self._placed_pages, int(control.decode_json(body).get("pages", 0)))
            if not expect:
                return ctype, body
        if ctype == wire.ControlType.ERROR:
            raise destination_error(body, self.report.phase)
        if ctype not in expect:
            raise MigrationError(self.report.phase, f"destination sent {wire.ControlType(ctype).name}, expected {'/'.join(e.name for e in expect)}")
        return ctype, body

    def _destination_error_after_break(self, wait_s: float = 2.0) -> str | None:
        """After a broken send: the destination's ERROR record, if it sent one; else None.

        Reads at most one control record, within ``wait_s``, and only when no post-copy
        thread owns the receive side.  Any failure to read just means "no reason given".
        """
        if self._pc is not None and self._pc.owns_back_channel:
            return None
        try:
            if not self.ch.wait_readable(wait_s):
                return None
            self._read_control(0, set())
        except MigrationError as said:
            if said.message.startswith("destination: "):
                return str(said)
        except (VmemError, TransportError, OSError):
            pass
        return None

    def _check_back_channel(self) -> None:
        """Between batches: has the destination reported an error, or caught up (non-blocking)?"""
        while self.ch.wait_readable(0):
            self._read_control(0, set())

    def _send_pages(self, pages) -> tuple[int, int]:
        """Send ``pages`` in PAGE_DATA records; returns (pages, bytes).

        ``pages`` is a sorted int64 array, or an ``(n, 2)`` array of [first, end) runs
        (round 0: no per-page array is ever built for the whole guest).
        """
        ram = self.guest.ram.pages
        nbytes = 0
        npages = 0
        before = self._writer.bytes_written
        for batch in _batches(pages, MAX_PAGES_PER_RECORD):
            npages += len(batch)
            self._writer.page_data(batch, page_buffers(ram, batch, self._staging))
            self._check_back_channel()
            sent_now = self._writer.bytes_written - before
            self.progress.sent(len(batch), sent_now - nbytes)
            nbytes = sent_now
        return npages, nbytes

    # --- the migration ---------------------------------------------------------------------
    def run(self) -> MigrationReport:
        """Run the whole migration.  Never raises for migration failures: the report says.

        Guarantees: if ``report.outcome != "completed"``, the source guest is running (unless
        it crashed by itself) and its RAM was never written by the migrator.
        """
        r = self.report
        g = self.guest
        r.guest_pages = g.npages
        r.guest_size_bytes = g.npages * PAGE_SIZE
        r.workload = g.spec.to_json()
        r.policy = getattr(self.policy, "describe", lambda: {"name": getattr(self.policy, "name", repr(self.policy))})()
        r.bandwidth_limit_bps = self.opt.bandwidth_Bps * 8 if self.opt.bandwidth_Bps else None
        r.provenance = collect_provenance()
        r.clock = self.clock.to_dict()
        t_start = time.monotonic()
        self._t_segment = t_start
        self._t_start_ns = time.monotonic_ns()
        before = g.counters()
        if self.opt.pagemap_path:
            from vmem.migration.pagemap import PagemapRecorder

            self.pagemap = PagemapRecorder(g.npages, t_start)
        if inject.stale_pages is not None:  # test-only (vmem.migration.inject)
            inject.stale_pages.snapshot(g.ram.pages)
        sampler = PeakSampler({"migrator_source": os.getpid()})
        try:
            with sampler:
                self._run(t_start)
        except (VmemError, TransportError, OSError) as err:
            self._fail(err)
        except Exception as err:  # a bug of ours: still keep the promise to the source guest
            self._fail(MigrationError(self.report.phase, f"internal error {type(err).__name__}: {err}"))
            self.report.reason += " (this is a vmem bug; please report it with the JSON report)"
        finally:
            if self.tracker is not None:
                self.tracker.stop()
            if self._pc is not None:
                self._pc.stop()
            r.total_time_s = round(time.monotonic() - t_start, 6)
            self._fill_totals()
            r.bytes_sent = self._writer.bytes_written
            r.processes.setdefault("migrator_source", {}).update(process_figures())
            sampler.merge_into(r.processes)
            r.guest["source_before"] = before
            self._save_pagemap()
            if self._throttled and r.outcome != "completed" and g.alive():
                try:
                    g.set_throttle(0.0)  # the source guest runs on at full speed
                except VmemError:
                    pass
        return r

    def _guest_gone(self, err: BaseException) -> bool:
        """Whether the guest is dead.  ESRCH (PAGEMAP_SCAN on a guest whose memory is gone)
        can come before its exit can be reaped -- seen under load: the report then named the
        ESRCH instead of the guest's death -- so after one, wait up to GUEST_EXIT_WAIT_S."""
        if not self.guest.alive():
            return True
        if isinstance(err, OSError) and err.errno == errno.ESRCH:
            deadline = time.monotonic() + GUEST_EXIT_WAIT_S
            while time.monotonic() < deadline:
                time.sleep(0.01)
                if not self.guest.alive():
                    return True
        return False

    def _fail(self, err: BaseException) -> None:
        drop_tracebacks(err)  # see drop_tracebacks: they would pin views of guest RAM
        r = self.report
        if not isinstance(err, GuestCrashed) and self._guest_gone(err):
            # The guest's death surfaced as some other error (e.g. ESRCH from PAGEMAP_SCAN on
            # its pagemap): name the real cause.
            err = self.guest.crash_error(r.phase)
        crashed = isinstance(err, GuestCrashed)
        if isinstance(err, (ChannelBrokenError, ChannelTimeout)):
            # A destination that fails sends ERROR, then closes.  Our send may break (or stall
            # behind a relay) before we read it: look for that record before blaming the link.
            said = self._destination_error_after_break()
            if said:
                msg = said
            elif isinstance(err, ChannelTimeout):
                msg = str(err)
            else:
                msg = f"the destination closed the connection during {r.phase} ({err})"
        elif isinstance(err, StreamError):
            msg = f"malformed control stream from the destination: {err}"
        else:
            msg = str(err)
        was = self.state
        r.reason = msg
        if (was.switched and self.opt.postcopy_recovery and not was.committed and not crashed
                and self.guest.alive() and _is_link_error(err)):
            # Both sides keep their state: the destination's guest waits on its missing
            # pages, ours stays paused with the complete RAM; resume_postcopy() finishes.
            if self.tracker is not None:
                self.tracker.stop()
            if self._pc is not None:
                self._pc.stop()
                self._pc = None
            drop_links(self.ch, self.urgent)
            self._set_state(was, SourceState.POSTCOPY_PAUSED)
            r.source_guest_state = "paused"
            r.reason = (f"the link broke after the switch to post-copy ({msg}); both sides hold their state: "
                        "the destination guest waits on its missing pages, the source guest is paused with its "
                        "complete RAM. Resume over a new connection (vmem migrate --resume NAME / resume_postcopy()).")
            return
        self._set_state(was, SourceState.FAILED)
        # Roll back: tell the destination (best effort), resume the source guest if paused.
        self._tell_destination_to_discard(was)
        if crashed or not self.guest.alive():
            r.source_guest_state = "crashed"
            return
        if was.switched:
            # After the switch the guest's state is split: never resume the source here
            # (the destination's guest ran ahead of it).  Its RAM is the complete image at
            # the pause; the destination's guest cannot run without the missing pages.
            if self.tracker is not None:
                self.tracker.stop()
            r.source_guest_state = "paused"
            r.reason += (" [after the switch to post-copy: the source guest stays PAUSED with its complete RAM at the pause; "
                         "the destination guest was stopped, waiting on pages that will not come. Resuming the source "
                         "continues from the pause and loses what the guest did at the destination.]")
            return
        if self.tracker is not None:
            self.tracker.stop()
        if self.paused is not None:
            try:
                self.guest.resume()
                r.source_guest_state = "running"
            except VmemError as e2:
                r.reason += f"; and the source guest failed to resume: {e2}"
                r.source_guest_state = "unknown"
        else:
            r.source_guest_state = "running"

    def _run(self, t_start: float) -> None:
        r = self.report
        g = self.guest
        # 1. Preamble / handshake.
        from vmem.migration.postcopy import fault_cpu_refusal, fault_sched_refusal

        self._phase("setup", "waiting for the destination")
        refusal = fault_sched_refusal(self.opt.fault_sched, "source")
        if refusal is not None:  # before the destination builds anything
            raise MigrationError("setup", f"--fault-sched {self.opt.fault_sched}: {refusal}")
        refusal = fault_cpu_refusal(self.opt.fault_cpu, "source")
        if refusal is not None:
            raise MigrationError("setup", f"--fault-cpu {self.opt.fault_cpu}: {refusal}")
        config = {
            "guest": g.spec.to_json(),
            "backend": getattr(g, "backend_name", "process"),
            "npages": g.npages,
            "page_size": PAGE_SIZE,
            "verify": self.opt.verify,
            "guest_check": self.opt.guest_check,
            "postcopy": self.opt.postcopy != "off",
            "postcopy_recovery": self.opt.postcopy_recovery,
            "postcopy_recovery_wait_s": self.opt.postcopy_recovery_wait_s,
            "placed_acks": True,  # PLACED records: see _drain
            "prealloc": self.opt.prealloc,
            "pagemap": self.pagemap is not None,  # the destination sends its fault log back
            "fault_sched": self.opt.fault_sched,
            **({"fault_cpu": self.opt.fault_cpu} if self.opt.fault_cpu is not None else {}),
        } | self.opt.extra_config
        t_preamble = time.monotonic()
        self.ch.send(control.encode_preamble(config))
        _, body = self._read_control(self.opt.ack_timeout_s, {wire.ControlType.READY})
        ready = control.decode_json(body)
        t_ready = time.monotonic()
        # Where the handshake went (setup_time_ms = these + arming the tracker): the
        # destination's interpreter and imports, its guest's start, the round trip.
        dest_ms = ready.get("setup_ms") if isinstance(ready.get("setup_ms"), dict) else {}
        self._setup_timings = {
            "setup_before_preamble": round((t_preamble - t_start) * 1e3, 3),
            "setup_preamble_to_ready": round((t_ready - t_preamble) * 1e3, 3),
        } | {f"setup_{k}": v for k, v in dest_ms.items() if isinstance(v, (int, float))}
        r.guest["destination_pid"] = ready.get("guest_pid")
        self._placed_acks = bool(ready.get("placed_acks"))  # the destination sends PLACED
        self._dest_prepares = bool(ready.get("prepare_pause"))  # it answers PREPARE_PAUSE
        if ready.get("fault_sched", "default") != self.opt.fault_sched:
            raise MigrationError("setup", f"the destination does not schedule its fault threads as --fault-sched "
                                          f"{self.opt.fault_sched} asks (a vmem that does not know it?); update it, "
                                          "or migrate without --fault-sched")
        if ready.get("fault_cpu") != self.opt.fault_cpu:
            raise MigrationError("setup", f"the destination does not pin its fault thread as --fault-cpu "
                                          f"{self.opt.fault_cpu} asks (a vmem that does not know it?); update it, "
                                          "or migrate without --fault-cpu")
        if self.opt.prealloc and not ready.get("prealloc"):
            raise MigrationError("setup", "the destination did not preallocate the guest's RAM (a vmem that does not "
                                          "know --prealloc?); update it, or migrate without --prealloc")
        if self.opt.postcopy != "off" and not ready.get("postcopy"):
            why = ready.get("postcopy_unavailable") or "the destination does not support it"
            if self.opt.postcopy in ("pure", "after-precopy"):
                raise MigrationError("setup", f"post-copy is not possible: {why} (run `vmem doctor`; migrate without --postcopy)")
            self._postcopy_unavailable = why

        self._writer.begin()
        if self.opt.postcopy == "pure":
            # Pure post-copy: no pre-copy round at all; every page with data comes later.
            r.mode = "postcopy"
            self._mark_setup_done()
            self._measure_rate_before()
            self._postcopy(None, 0)
            self._verify_and_commit()
            return

        # 2. Precopy rounds (the loop is vmem.migration.rounds'; _LiveRounds sends and collects).
        t_arm = time.monotonic()
        self.tracker = make_tracker(g, self.opt.tracker)
        r.tracker = self.tracker.name
        if self.opt.collect_stop and self.tracker.name != "uffd-wp":
            raise ConfigError("--collect-stop", f"needs the uffd-wp tracker, and this migration's is "
                                                f"{self.tracker.name}: it collects inside the guest, which a stopped "
                                                "guest cannot do (use --tracker uffd-wp, or drop --collect-stop)")
        self.tracker.start()
        self._setup_timings["setup_tracker_arm"] = round((time.monotonic() - t_arm) * 1e3, 3)
        self._set_state(SourceState.SETUP, SourceState.PRECOPY)
        self._mark_setup_done()
        self._rate_mark = (time.monotonic_ns(), g.counters()["steps"])
        refusal = None
        if self.opt.postcopy == "off":
            refusal = ("policy asked for POSTCOPY but post-copy was not enabled for this migration "
                       "(MigrationOptions.postcopy='allow', or --postcopy-after-precopy); aborting")
        elif self._postcopy_unavailable:
            refusal = f"policy asked for POSTCOPY, which the destination cannot do: {self._postcopy_unavailable}"

        def round_end(rs: RoundStats) -> None:
            r.rounds.append(rs)
            self.progress.round_end(rs)

        runs = g.ram.data_runs()
        self._zero_holes = g.npages - int((runs[:, 1] - runs[:, 0]).sum())  # holes read as zero: never sent
        if self.pagemap is not None:
            self.pagemap.data_pages(runs)
        end = run_precopy(_LiveRounds(self, t_start), self.policy, runs, guest_pages=g.npages,
                          page_size=PAGE_SIZE, bandwidth_limit_Bps=lambda: self.opt.bandwidth_Bps,
                          postcopy_after_precopy=self.opt.postcopy == "after-precopy", postcopy_refusal=refusal,
                          on_round=round_end)
        dirty, index = end.dirty, end.rounds - 1
        if end.decision == Decision.ABORT:
            self._abort(end.reason or "policy decided to abort")
            return
        r.reason = end.reason
        if end.decision == Decision.POSTCOPY:
            r.mode = "hybrid"
            self._postcopy(dirty, index + 1)
            self._verify_and_commit()
            return

        # 3. Stop-and-copy.  First let the destination drain what is queued (up to two
        # socket buffers, several MiB): the guest keeps running meanwhile and the final
        # collect catches what it writes, but the backlog no longer lands in the downtime.
        self._set_state(SourceState.PRECOPY, SourceState.STOP_AND_COPY)
        self._phase("stop-and-copy", "letting the destination catch up")
        drain_ms = self._drain(DRAIN_TARGET_BYTES, DRAIN_TIMEOUT_S)
        prepare_ms = self._prepare_pause()
        self._phase("stop-and-copy", "pausing the guest")
        self.tracker.warm()  # the final collect's walk, cached now rather than read inside the downtime
        t_pause0 = time.monotonic()
        self.paused = g.pause()
        inject.stop_copy_delay()  # test-only: a regression on purpose (no-op unless set)
        t_paused = time.monotonic()
        final = merge_sorted_pages(dirty, self.tracker.collect())  # both sorted unique: no sort in the downtime
        t_collected = time.monotonic()
        self.progress.round_start(index + 1, len(final), "stop-and-copy")
        t0 = time.monotonic()
        npages, nbytes = self._send_pages(final)
        self._writer.end_of_stream(g.npages, self.paused.context,
                                   elapsed_ns=int(self.paused.paused_at_ns - self._t_start_ns))
        self._set_state(SourceState.STOP_AND_COPY, SourceState.ENDED)
        t1 = time.monotonic()
        rs = RoundStats(index=index + 1, kind="stop-and-copy", pages_sent=npages, bytes_sent=nbytes,
                        duration_s=round(t1 - t0, 6), bandwidth_bps=round(nbytes * 8 / (t1 - t0), 1) if t1 > t0 else 0.0)
        r.rounds.append(rs)
        self.progress.round_end(rs)
        if self.pagemap is not None:
            self.pagemap.stop_and_copy(final, t_pause0 - t_start, t1 - t_start)

        # 4. Destination resumes; verify; commit.
        self._phase("resume", "waiting for the destination guest")
        _, body = self._read_control(self.opt.ack_timeout_s, {wire.ControlType.RESUMED})
        resumed = control.decode_json(body)
        t_resumed = time.monotonic()
        # Disarm only now, after the destination guest's first step: un-protecting a whole
        # GiB is milliseconds of CPU, and done right after END it held the CPU the
        # destination's wake-ups were placed on (sync wake-ups go to the waker's CPU) --
        # traced with perf sched: the incoming guest runnable 2 ms behind this thread while
        # the other CPU idled, downtime 5.0 ms instead of 2.4.  The guest is paused, so
        # nothing is lost; a failure on the way stops the tracker in _fail.
        self.tracker.stop()
        r.downtime_ms = self._since_pause_ms(resumed["first_step_ns"])
        r.pages_in_place = resumed.get("pages_in_place")
        r.timings_ms = self._setup_timings | {
            "drain_before_pause": drain_ms,
            "prepare_pause": prepare_ms,
            "pause_latency": round(self.paused.latency_ns / 1e6, 3),
            "final_collect": round((t_collected - t_paused) * 1e3, 3),
            "final_collect_scan": round(self.tracker.collect_s * 1e3, 3),
            "stop_and_copy_send": round((t1 - t0) * 1e3, 3),
            "pause_to_resumed_ack": round((t_resumed - t_pause0) * 1e3, 3),
            "destination_restore": resumed.get("restore_ms"),
            "destination_end_to_resume": resumed.get("end_to_resume_ms"),
            "pause_to_running": self._since_pause_ms(resumed["running_at_ns"]) if resumed.get("running_at_ns") else None,
        }

        del end, dirty, final  # per-page arrays not needed any more (memory at 8 GiB+)
        self._verify_and_commit()

    # --- post-copy -----------------------------------------------------------------------------
    def _measure_rate_before(self) -> None:
        """Pure post-copy: watch the guest's progress for RATE_WINDOW_S before pausing it."""
        self._phase("postcopy", "measuring the guest's progress rate")
        self._rate_mark = (time.monotonic_ns(), self.guest.counters()["steps"])
        time.sleep(RATE_WINDOW_S)

    def _postcopy(self, dirty, index: int) -> None:
        """Switch to post-copy: pause, send the list of pages still to come and the context,
        let the destination resume, then serve faults and push the rest (docs/postcopy.md).

        ``dirty``: pages dirtied in the last pre-copy round (hybrid), None for pure post-copy.
        """
        from vmem.format.postcopy import MAX_PFNS_PER_RECORD, encode_pfn_list
        from vmem.pages import hole_runs, runs_to_pages

        # Load the native module now: the fault server starts inside the downtime, and the
        # first import of vmem._native (the cffi library) costs ~5 ms here -- a dirty
        # tracker used to load it before the pause, pure post-copy without one did not.
        from vmem import _native  # noqa: F401

        r = self.report
        g = self.guest
        w = self._writer
        PC = wire.PostcopyRecordType

        def send_pfns(pages) -> None:
            for i in range(0, len(pages), MAX_PFNS_PER_RECORD):
                w.write_record(PC.PFNS, encode_pfn_list(pages[i:i + MAX_PFNS_PER_RECORD]))

        drain_ms = 0.0
        self._set_state(SourceState.SETUP if dirty is None else SourceState.PRECOPY, SourceState.POSTCOPY_SWITCH)
        w.write_record(PC.BEGIN)
        holes = None
        if dirty is None:
            # Pure post-copy: list the pages holding data *before* the pause (walking the
            # RAM file costs ms per GiB).  Every one of them is to come whatever the guest
            # writes next, so the only pages the pause can add are holes written since:
            # with few holes, ask the RAM file about those at the pause; with many, arm a
            # tracker first and take its final collect (PURE_PAGES_PER_HOLE_RECHECKED) --
            # and when the user named a tracker, which they may be there to watch.
            data_runs = holes = None
            if self.opt.tracker == "auto":
                data_runs = g.ram.data_runs()
                holes = hole_runs(data_runs, g.npages)
                if len(holes) * PURE_PAGES_PER_HOLE_RECHECKED > g.npages:
                    holes = None
            if holes is None:
                self.tracker = make_tracker(g, self.opt.tracker)
                r.tracker = self.tracker.name
                self.tracker.start()
                data_runs = g.ram.data_runs()  # after arming: a write in between is tracked
            else:
                r.tracker = "none"
            base = runs_to_pages(data_runs)  # holes are zero pages: never sent
            self._zero_holes = g.npages - len(base)
            if self.pagemap is not None:
                self.pagemap.data_pages(base)
        else:
            base = dirty  # what the last pre-copy round left dirty
        # The bulk of the list goes before the pause; only what is written after it (the
        # final collect) is listed inside the downtime.  Duplicates are harmless.
        send_pfns(base)
        # Then let the destination catch up -- a hybrid's pre-copy backlog, and the list
        # itself: a pure post-copy's is 2 MiB at 1 GiB, which the link buffers, and the
        # destination read and marked its last records inside the downtime (measured: the
        # TRANSITION behind them read 2.4-2.7 ms late).
        self._phase("postcopy", "letting the destination catch up")
        drain_ms = self._drain(DRAIN_TARGET_BYTES, DRAIN_TIMEOUT_S)
        # The fault server before the pause: constructing it and starting its thread took
        # 0.3-0.4 ms of the downtime (measured), and nothing reaches it before TRANSITION.
        # (A test's stale-page injection serves RAM built from the final list: after it.)
        pc = None if inject.stale_pages is not None else self._start_postcopy_source(g.ram.pages)
        self._phase("postcopy", "pausing the guest")
        if holes is None:
            self.tracker.warm()  # as before a stop-and-copy: the final collect's walk, cached
        t_pause0 = time.monotonic()
        self.paused = g.pause()
        inject.stop_copy_delay()  # test-only: a regression on purpose (no-op unless set)
        t_paused = time.monotonic()
        if holes is not None:  # pure post-copy with few holes: which of them hold data now
            late = runs_to_pages(g.ram.data_runs_in(holes))
        else:
            late = self.tracker.collect()
        t_collected = time.monotonic()
        send_pfns(late)
        w.x86_hvm_state(g.npages, elapsed_ns=int(self.paused.paused_at_ns - self._t_start_ns))
        # The fault server is up before TRANSITION (above, before the pause): the
        # destination guest may fault the moment it resumes, and its first fault must not
        # wait for the list merge below (a sort of every page, ~7 ms at 1 GiB, when it was
        # made before TRANSITION; now a lookup of the late pages in the sorted list).
        pending = None
        if pc is None:  # the stale-page injection (tests only): its RAM needs the final list
            pending = merge_sorted_pages(base, late)
            pc = self._start_postcopy_source(inject.stale_pages.served_ram(g.ram.pages, pending))
        w.write_record(PC.TRANSITION, self.paused.context)
        self._set_state(SourceState.POSTCOPY_SWITCH, SourceState.POSTCOPY_ACTIVE)
        t_transition = time.monotonic()
        # TRANSITION's sync wake-up put the destination's reader on this CPU, behind us:
        # let it run first (the other CPU may well be idle, but the scheduler does not
        # move a task just queued; measured: see the tracker note below).
        os.sched_yield()
        if pending is None:
            pending = merge_sorted_pages(base, late)  # both sorted unique
        if self.pagemap is not None:
            self.pagemap.postcopy_switch(pending, t_pause0 - self.pagemap.t0)
        self._pc_pending_total = int(len(pending))
        self._pc_timings = {
            "drain_before_pause": drain_ms,
            "pause_latency": round(self.paused.latency_ns / 1e6, 3),
            "final_collect": round((t_collected - t_paused) * 1e3, 3),
            "pause_to_transition_sent": round((t_transition - t_pause0) * 1e3, 3),
        }
        self._t_pause0 = t_pause0
        # Let the guest restart before the push competes with it for the CPUs: its first
        # faults are then answered at once.  Bounded: a slow restart does not stall the push.
        self._pc_timings["push_held_for_restart"] = pc.wait_for_control(RESUMED_WAIT_S)
        # Disarm the tracker only now, as stop-and-copy does after RESUMED: done right after
        # TRANSITION, its milliseconds of CPU held the CPU the destination's main thread had
        # been woken onto (a sync wake-up goes to the waker's CPU) -- traced with sched
        # events: TRANSITION read 3.4-4.9 ms after the pause instead of 0.7-1.0 while the
        # other CPU idled.  The guest is paused: nothing is lost; _fail stops it on error.
        if self.tracker is not None:
            self.tracker.stop()
        self._postcopy_serve(pc, index, pending)

    def _start_postcopy_source(self, served: np.ndarray):
        """The post-copy fault server over ``served`` (the guest's RAM), started: it answers
        the destination's faults from TRANSITION on; the run's cleanup stops it."""
        from vmem.migration.postcopy.source import PostcopySource

        with self._speed_lock:
            pc = PostcopySource(served, self._writer, self._ctl_reader, self._send_lock, self.urgent, self.progress,
                                self.ch, fault_sched=self.opt.fault_sched,
                                push_bandwidth_Bps=self.opt.postcopy_bandwidth_Bps, fault_cpu=self.opt.fault_cpu)
            pc.recorder = self.pagemap
            self._pc = pc
        pc.start()
        return pc

    def _postcopy_serve(self, pc, index: int, pending: np.ndarray) -> None:
        """Push ``pending``, end the stream, collect RESUMED and POSTCOPY_STATUS, report.

        Shared by the switch and by :meth:`resume_postcopy` (then ``pending`` is what the
        destination still lacked after the link broke).
        """
        r = self.report
        g = self.guest
        w = self._writer
        PC = wire.PostcopyRecordType
        self._phase("postcopy", f"{len(pending)} pages to come; serving faults")
        self.progress.round_start(index, len(pending), "postcopy")
        t0 = time.monotonic()
        bytes0 = w.bytes_written
        pc.push(pending)
        with self._send_lock:
            w.write_record(PC.COMPLETE)
            w.end_libxc()
            w.emulator_context(self.paused.context)
            w.end_libxl()
            pc.stream_ended = True
        if self.pagemap is not None:
            self.pagemap.postcopy_end()
        self._set_state(SourceState.POSTCOPY_ACTIVE, SourceState.POSTCOPY_ENDED)
        t1 = time.monotonic()
        nbytes = w.bytes_written - bytes0
        rs = RoundStats(index=index, kind="postcopy", pages_sent=pc.pages_pushed + pc.demanded(), bytes_sent=nbytes,
                        duration_s=round(t1 - t0, 6), bandwidth_bps=round(nbytes * 8 / (t1 - t0), 1) if t1 > t0 else 0.0,
                        decision="complete", reason="every page sent")
        r.rounds.append(rs)
        self.progress.round_end(rs)

        self._phase("postcopy", "waiting for the destination to place every page")
        got: dict = {}
        if self._pc_resumed is not None:
            got[wire.ControlType.RESUMED] = self._pc_resumed  # received before a broken link
        while len(got) < 2:
            ctype, body = self._read_control(self.opt.ack_timeout_s, {wire.ControlType.RESUMED, wire.ControlType.POSTCOPY_STATUS})
            got[ctype] = control.decode_json(body)
            if ctype == wire.ControlType.RESUMED:
                self._pc_resumed = got[ctype]
        pc.join()
        pc.stop()
        self._pc = None
        t_done = time.monotonic()
        resumed = got[wire.ControlType.RESUMED]
        status = got[wire.ControlType.POSTCOPY_STATUS]
        fault_log = status.pop("fault_log", None)  # the page map's, not the report's
        if self.pagemap is not None:
            self.pagemap.faults(fault_log)
        r.downtime_ms = self._since_pause_ms(resumed["first_step_ns"])
        r.pages_in_place = resumed.get("pages_in_place")
        r.timings_ms = self._setup_timings | dict(self._pc_timings) | {
            "postcopy_push": round((t1 - t0) * 1e3, 3),
            "pause_to_all_placed": round((t_done - self._t_pause0) * 1e3, 3),
            "pause_to_transition_read": self._since_pause_ms(resumed["transition_read_ns"]) if resumed.get("transition_read_ns") else None,
            "destination_flush": resumed.get("flush_ms"), "destination_switch": resumed.get("switch_ms"),
            "destination_resume_cmd": resumed.get("resume_cmd_ms"),
            "destination_restore": resumed.get("restore_ms"),
            "destination_end_to_resume": resumed.get("end_to_resume_ms"),
            "pause_to_running": self._since_pause_ms(resumed["running_at_ns"]) if resumed.get("running_at_ns") else None,
        }
        before = None
        if self._rate_mark is not None:
            t_mark, steps_mark = self._rate_mark
            span_s = (self.paused.paused_at_ns - t_mark) / 1e9
            steps = g.counters()["steps"] - steps_mark
            before = round(steps / span_s, 1) if span_s > 0 else None
        during_s = status.get("during_s") or 0.0
        during = round(status.get("guest_steps_during", 0) / during_s, 1) if during_s > 0 else None
        push_s = t1 - t0
        r.postcopy = status | {
            "mode": r.mode,
            "pages_pending": self._pc_pending_total,
            "push_s": round(push_s, 6),
            "push_rate_Bps": round(pc.bytes_pushed / push_s, 1) if push_s > 0 else None,
            "push_bandwidth_limit_Bps": self.opt.postcopy_bandwidth_Bps,
            "source": pc.stats(),
            "fault_sched": self.opt.fault_sched,
            "fault_cpu": self.opt.fault_cpu,
            "guest_rate": {"unit": "workload steps/s", "before": before, "during": during, "after": None},
            "recoveries": self._recoveries,
        }

    # --- post-copy recovery --------------------------------------------------------------------
    @property
    def resumable(self) -> bool:
        """True after a link failure following the switch, with post-copy recovery on:
        both sides hold their state and :meth:`resume_postcopy` can finish the migration."""
        return self.state is SourceState.POSTCOPY_PAUSED

    def resume_postcopy(self, channel, urgent_channel=None) -> MigrationReport:
        """Finish a post-copy interrupted by a broken link, over new connections.

        The destination (waiting since the break, its guest blocked on the missing pages)
        answers the resume preamble with the pages it still lacks; exactly those are sent,
        then the usual COMPLETE, digest comparison and commit.  Returns the updated report
        (outcome "completed", or "paused" again if this link breaks too, or "failed").
        """
        if self.state is not SourceState.POSTCOPY_PAUSED:
            raise MigrationError("resume", "this migration is not waiting to be resumed")
        r = self.report
        g = self.guest
        self._set_state(SourceState.POSTCOPY_PAUSED, SourceState.POSTCOPY_RECOVER)  # the report reads "failed" until it ends
        self._recoveries += 1
        self._elided_before += getattr(self.ch, "zero_pages_sent", 0)
        self.ch = channel
        self.urgent = urgent_channel
        self._ctl_reader = control.ControlReader(_bytearray_receiver(self.ch))
        self._writer = stream.StreamWriter(self.ch.send_parts)
        self._pc = None
        r.reason = ""
        t_start = time.monotonic()
        self._elapsed_before_s, self._t_segment = r.total_time_s, t_start
        try:
            self._phase("postcopy", "resuming over a new connection")
            self.ch.send(control.encode_preamble({"postcopy_resume": True, "npages": g.npages, "page_size": PAGE_SIZE,
                                                  "recovery": self._recoveries}))
            _, body = self._read_control(self.opt.ack_timeout_s, {wire.ControlType.POSTCOPY_RESUME})
            missing = np.frombuffer(body, dtype="<u8")
            if len(missing) and int(missing.max()) >= g.npages:
                raise StreamError("POSTCOPY_RESUME names a page beyond the guest")
            missing = missing.astype(np.int64)
            self._writer.begin()
            self._writer.write_record(wire.PostcopyRecordType.BEGIN)
            from vmem.migration.postcopy.source import PostcopySource

            with self._speed_lock:
                pc = PostcopySource(g.ram.pages, self._writer, self._ctl_reader, self._send_lock,
                                    self.urgent, self.progress, self.ch, fault_sched=self.opt.fault_sched,
                                    push_bandwidth_Bps=self.opt.postcopy_bandwidth_Bps, fault_cpu=self.opt.fault_cpu)
                self._pc = pc
            pc.start()
            self._set_state(SourceState.POSTCOPY_RECOVER, SourceState.POSTCOPY_ACTIVE)
            self._postcopy_serve(pc, len(r.rounds), missing)
            r.postcopy["pages_resent_after_recovery"] = int(len(missing))
            self._verify_and_commit()
        except (VmemError, TransportError, OSError) as err:
            self._fail(err)
        except Exception as err:  # a bug of ours
            self._fail(MigrationError(r.phase, f"internal error {type(err).__name__}: {err}"))
        finally:
            if self._pc is not None:
                self._pc.stop()
            r.total_time_s = round(r.total_time_s + (time.monotonic() - t_start), 6)
            self._fill_totals()
        return r

    def _verify_and_commit(self) -> None:
        """Steps 4-5 after the destination resumed: compare digests, guest check, commit."""
        r = self.report
        g = self.guest
        self._phase("verify", "comparing RAM digests")
        t_verify = time.monotonic()
        verification: dict = {"digests": None, "guest_check": None}
        if self.opt.verify:
            _, body = self._read_control(self.opt.ack_timeout_s, {wire.ControlType.DIGESTS})
            dest = np.frombuffer(body, dtype="<u8")
            if len(dest) != g.npages:
                raise MigrationError("verify", f"destination sent {len(dest)} digests for {g.npages} pages")
            t_d = time.monotonic()
            bad = mismatched_pages(g.ram, dest)
            verification["digests"] = {
                "pages_compared": int(g.npages), "mismatched": int(len(bad)),
                "first_mismatched": [int(x) for x in bad[:10]], "source_digest_ms": round((time.monotonic() - t_d) * 1e3, 2),
            }
            if len(bad):
                r.verification = verification
                raise MigrationError("verify", f"destination RAM differs from the source at the pause in {len(bad)} pages (first: {bad[:10].tolist()})")
        if self.opt.guest_check:
            _, body = self._read_control(self.opt.ack_timeout_s * 10, {wire.ControlType.GUEST_CHECK})
            check = control.decode_json(body)
            verification["guest_check"] = check
            if not check.get("ok"):
                r.verification = verification
                raise MigrationError("verify", f"the destination guest failed its own ledger check: {check.get('detail') or check}")
        r.verification = verification
        r.verified = bool(self.opt.verify or self.opt.guest_check)
        r.verify_s = round(time.monotonic() - t_verify, 6)

        # 5. Commit: from here the destination owns the guest; the source guest exits.
        self._phase("commit", "source guest exits")
        self._send_control(wire.ControlType.COMMIT)
        ended = SourceState.POSTCOPY_ENDED if r.postcopy is not None else SourceState.ENDED
        self._set_state(ended, SourceState.COMMITTED)  # the outcome is "completed" from here
        r.guest["source_at_pause"] = g.counters()
        r.processes.setdefault("source_guest", {}).update(process_figures(g.pid))
        g.exit()
        r.source_guest_state = "exited"
        # The source is released: QMP's total-time ends here (the observe window is ours).
        r.migration_time_s = round(self._elapsed_before_s + time.monotonic() - self._t_segment, 6)
        if self.opt.observe_s > 0:
            self._phase("observe", f"destination guest runs for {self.opt.observe_s:g} s")
            time.sleep(self.opt.observe_s)
        self._send_control(wire.ControlType.SHUTDOWN)
        try:
            _, body = self._read_control(self.opt.ack_timeout_s, {wire.ControlType.DEST_REPORT})
            dest_report = control.decode_json(body)
            r.guest["destination"] = dest_report.get("guest", {})
            self._fill_blackout(r.guest["destination"].get("counters") or {})
            self._fill_postcopy_blackout()
            r.processes.update(dest_report.get("processes", {}))
            after = dest_report.get("postcopy_after")
            if r.postcopy is not None and after and after.get("seconds"):
                r.postcopy["guest_rate"]["after"] = round(after["steps"] / after["seconds"], 1)
        except (VmemError, TransportError) as err:
            r.guest["destination"] = {"error": f"no report from the destination: {err}"}
        self._phase("done")
        self._set_state(SourceState.COMMITTED, SourceState.COMPLETED)

    def _save_pagemap(self) -> None:
        """Write the page map (if recorded) and say where in ``report.pagemap``."""
        rec = self.pagemap
        if rec is None or not (rec.round_sent or rec.switched):
            return  # nothing was sent: nothing to draw
        try:
            path = rec.save(self.opt.pagemap_path)
        except OSError as err:
            self.report.pagemap = {"error": f"cannot write the page map to {self.opt.pagemap_path}: {err}"}
            return
        self.report.pagemap = {"file": os.path.abspath(path), "rounds": len(rec.round_sent),
                               "push_batches": rec.push_batches, "faults": int(len(rec.fault_page))}

    def _mark_setup_done(self) -> None:
        """The handshake is over and the first page is about to go: QMP's setup-time."""
        self.report.setup_time_ms = round((time.monotonic_ns() - self._t_start_ns) / 1e6, 3)

    def _fill_blackout(self, dest_counters: dict) -> None:
        """``blackout_ms``/``blackout_at_s``: the longest gap between two workload steps the guest saw.

        The gap across the migration is ``downtime_ms`` (the pause acknowledgement to the end
        of the first step at the destination); every later gap up to the end of the observe
        window is the destination guest's own ``max_gap_ns`` (reset at its resume; both ends
        on its clock, so no offset enters the length).  ``blackout_at_s`` is when the longest
        gap ended, seconds after the pause, on our clock.
        """
        r = self.report
        if r.downtime_ms is None:
            return
        r.blackout_ms, r.blackout_at_s = r.downtime_ms, round(r.downtime_ms / 1e3, 6)
        gap_ms = int(dest_counters.get("max_gap_ns") or 0) / 1e6
        end_ns = int(dest_counters.get("max_gap_end_ns") or 0)
        if end_ns and gap_ms > r.blackout_ms:
            r.blackout_ms = round(gap_ms, 3)
            r.blackout_at_s = round(self._since_pause_ms(end_ns) / 1e3, 6)

    def _fill_postcopy_blackout(self) -> None:
        """``postcopy["blackout_until_complete_ms"]``: the longest gap the guest saw from the
        pause until the destination had every page -- the downtime, or a longer gap of the
        resumed guest that ended before then (one still open at that moment is not in it).
        ``blackout_ms`` runs on to the end of the observe window; when it is longer, its gap
        came after the post-copy (``blackout_after_complete``): verification, the source's
        exit, or the machine (docs/performance.md, "Where a flat-out guest's hybrid blackout
        lands")."""
        r = self.report
        pc = r.postcopy
        if pc is None or r.downtime_ms is None or pc.get("max_gap_ns_at_complete") is None:
            return
        gap_ms = round(int(pc["max_gap_ns_at_complete"]) / 1e6, 3)
        until = max(r.downtime_ms, gap_ms)
        pc["blackout_until_complete_ms"] = until
        # When that gap ended, seconds after the pause (the downtime's end when it is the
        # downtime): tells a switch's cost from a stall during the push.
        end_ns = int(pc.get("max_gap_end_ns_at_complete") or 0)
        if gap_ms <= r.downtime_ms:
            pc["blackout_until_complete_at_s"] = round(r.downtime_ms / 1e3, 6)
        else:  # None: an older destination that does not send the gap's end
            pc["blackout_until_complete_at_s"] = round(self._since_pause_ms(end_ns) / 1e3, 6) if end_ns else None
        pc["blackout_after_complete"] = r.blackout_ms is not None and r.blackout_ms > until

    def set_bandwidth(self, rate_Bps: float, postcopy: bool = False) -> float | None:
        """Change a cap while the migration runs (``virsh migrate-setspeed [--postcopy]``);
        returns the old cap (None: there was none).  Thread-safe: called from another thread
        than the one running the migration.

        ``postcopy=False``: the link's ``--bandwidth``, from the next send on (the policy
        plans with it from its next decision); only a migration started with a cap has a
        shaper to change.  ``postcopy=True``: the post-copy push's ``--postcopy-bandwidth``,
        from the push's next batch (or from the switch on, if it has not come yet), with
        or without a cap before.  Each change is listed in the report's ``speed_changes``.

        Raises:
            ConfigError: naming the flag, for a rate that is not > 0, a link started
                without ``--bandwidth``, or a push cap on a migration without post-copy.
        """
        from transport import ShapedChannel

        flag = "--postcopy-bandwidth" if postcopy else "--bandwidth"
        if not _is_rate(rate_Bps):
            raise ConfigError(flag, f"must be a rate > 0, not {rate_Bps!r}")
        with self._speed_lock:
            if postcopy:
                if self.opt.postcopy == "off":
                    raise ConfigError(flag, "this migration has no post-copy: there is no push to cap")
                old = self.opt.postcopy_bandwidth_Bps
                self.opt.postcopy_bandwidth_Bps = float(rate_Bps)
                if self._pc is not None:
                    self._pc.set_push_bandwidth(float(rate_Bps))
            else:
                shaper = self.ch
                while shaper is not None and not isinstance(shaper, ShapedChannel):
                    shaper = getattr(shaper, "inner", None)
                if shaper is None:
                    raise ConfigError(flag, "this migration was started without --bandwidth, so its link has no "
                                            "shaper to change; start it with --bandwidth to change the cap later")
                old = shaper.set_rate(float(rate_Bps))
                self.opt.bandwidth_Bps = float(rate_Bps)
            self.report.speed_changes.append({
                "at_s": round((time.monotonic_ns() - self._t_start_ns) / 1e9, 3) if self._t_start_ns else 0.0,
                "what": "postcopy_bandwidth_Bps" if postcopy else "bandwidth_Bps", "old": old,
                "new": float(rate_Bps)})
        return old

    def _since_pause_ms(self, dest_ns) -> float:
        """Milliseconds from our guest's pause to a destination clock reading, on our clock."""
        return round((self.clock.to_ours_ns(int(dest_ns)) - self.paused.paused_at_ns) / 1e6, 3)

    def _fill_totals(self) -> None:
        """Totals derived at the end of run() / resume_postcopy(), whatever the outcome."""
        r = self.report
        r.pages_sent = sum(x.pages_sent for x in r.rounds)
        r.zero_pages = self._zero_holes + self._elided_before + getattr(self.ch, "zero_pages_sent", 0)
        unc = self.clock.uncertainty_ns
        r.downtime_uncertainty_ms = None if r.downtime_ms is None or unc is None else round(unc / 1e6, 3)
        r.observe_s = None if r.migration_time_s is None else round(r.total_time_s - r.migration_time_s, 6)

    def _prepare_pause(self) -> float | None:
        """Rehearse, once, what runs right after the pause: the destination and its incoming
        guest (PREPARE_PAUSE, answered by PREPARED), our guest (PREPARE) and our own writing
        of the stream's last records.  Returns the milliseconds it took, None if skipped
        (option off, or a destination that did not announce it).

        Why: every one of the four processes has been asleep or busy with bulk data for the
        whole pre-copy, and the Python that runs once inside the downtime ran cold there --
        an idle 1 GiB guest's downtime median 2.02 -> 1.39 ms with it (12 A/B pairs,
        docs/performance.md).  The guest keeps running meanwhile, so the final set grows by
        what it writes in these few ms; a failure here is a failure before the pause.
        """
        if not (self.opt.prepare_pause and self._dest_prepares):
            return None
        self._phase("stop-and-copy", "rehearsing the pause")
        t0 = time.monotonic()
        self._writer.write_record(wire.VmemRecordType.PREPARE_PAUSE)  # the destination starts now
        stream.rehearse_tail(self.guest.npages)
        prepare = getattr(self.guest, "prepare", None)
        if prepare is not None:
            prepare()
        self._read_control(self.opt.ack_timeout_s, {wire.ControlType.PREPARED})
        return round((time.monotonic() - t0) * 1e3, 3)

    def _drain(self, target_bytes: int, timeout_s: float) -> float:
        """Wait (bounded) until at most ``target_bytes`` sent are still unread by the peer and
        the destination said it placed every page sent so far (PLACED): its backlog -- the
        socket buffers and its staging slots (``destination.STAGING_SLOTS``), up to ~24 MiB -- then stays out of the
        downtime.  Returns the milliseconds waited."""
        t0 = time.monotonic()
        sent = self._writer.pages_written
        while (self.ch.unsent_bytes() > target_bytes or (self._placed_acks and self._placed_pages < sent)) \
                and time.monotonic() - t0 < timeout_s:
            self._check_back_channel()
            time.sleep(0.0002)
        return round((time.monotonic() - t0) * 1e3, 3)

    def _tell_destination_to_discard(self, was: SourceState) -> None:
        """Make the destination throw away what it built (best effort; it also does on EOF).

        Inside the Xen stream there is no abort record: Xen's sender simply stops, and the
        receiver treats a stream that ends before END as aborted.  We do the same by
        shutting the connection down.  After END (``was.stream_ended``), the control
        protocol has ROLLBACK.
        """
        try:
            if was.stream_ended:
                self._send_control(wire.ControlType.ROLLBACK)
            else:
                self.ch.close()
        except (TransportError, OSError, VmemError):
            pass

    def _abort(self, reason: str) -> None:
        r = self.report
        self._phase("aborted", reason)
        self.tracker.stop()
        self._tell_destination_to_discard(SourceState.PRECOPY)
        self._set_state(SourceState.PRECOPY, SourceState.ABORTED)
        r.reason = reason
        r.source_guest_state = "running"


class _LiveRounds:
    """The real migrator's plug-in for the round engine (vmem.migration.rounds.RoundIO):
    a round sends PAGE_DATA records on the wire and collects the dirty tracker, on the
    wall clock."""

    def __init__(self, mig: SourceMigration, t_start: float):
        self.mig = mig
        self.t_start = t_start  # monotonic seconds at the migration's start (elapsed_s)
        self.t_collect = time.monotonic()  # the previous collect (first: tracking armed)

    def send_round(self, index: int, pages, throttle: float) -> RoundResult:
        mig = self.mig
        mig._phase("precopy", f"round {index}")
        mig.progress.round_start(index, _count(pages), "precopy")
        t0 = time.monotonic()
        npages, nbytes = mig._send_pages(pages)
        t1 = time.monotonic()
        stood_s = 0.0
        if mig.opt.collect_stop:
            try:
                with process_stopped(mig.guest.pid) as stood:
                    dirty = mig.tracker.collect()
            except ProcessLookupError:
                crash = getattr(mig.guest, "crash_error", None)
                if crash is None:
                    raise
                raise crash("a collect with the guest stopped (--collect-stop)") from None
            stood_s = stood.stood_ns / 1e9
        else:
            dirty = mig.tracker.collect()
        t2 = time.monotonic()
        since = t2 - self.t_collect
        self.t_collect = t2
        if mig.pagemap is not None:
            mig.pagemap.precopy_round(pages, dirty, t0 - self.t_start, t2 - self.t_start)
        return RoundResult(pages_sent=npages, bytes_sent=nbytes, send_s=t1 - t0, dirty=dirty, dirty_pages=len(dirty),
                           since_collect_s=since, elapsed_s=t2 - self.t_start, collect_s=mig.tracker.collect_s,
                           guest_stopped_s=stood_s)

    def set_throttle(self, level: float) -> None:
        self.mig.guest.set_throttle(level)
        self.mig._throttled = True


def _is_link_error(err: BaseException) -> bool:
    """A broken or silent connection (recoverable), as opposed to a refusal or a bug."""
    if isinstance(err, (TransportError, OSError)):
        return True
    if isinstance(err, StreamError) and isinstance(err.__cause__, (TransportError, OSError)):
        return True
    return isinstance(err, MigrationError) and "sent nothing for" in str(err)


def _count(pages) -> int:
    """Pages in a page array or in an (n, 2) run array."""
    if pages.ndim == 2:
        return int((pages[:, 1] - pages[:, 0]).sum())
    return len(pages)


def _batches(pages, size: int):
    """Consecutive batches of at most ``size`` pages from a page array or a run array."""
    if pages.ndim == 1:
        for i in range(0, len(pages), size):
            yield pages[i : i + size]
        return
    for first, end in pages.tolist():
        for a in range(first, end, size):
            yield np.arange(a, min(a + size, end), dtype=np.int64)


def migrate(guest, channel, options: MigrationOptions | None = None, progress=None, urgent_channel=None) -> MigrationReport:
    """Migrate ``guest`` over ``channel``; see :class:`SourceMigration`.

    ``urgent_channel``: optional second connection for post-copy demand pages (without it
    they travel on ``channel`` between two background batches).
    """
    return SourceMigration(guest, channel, options, progress, urgent_channel).run()
