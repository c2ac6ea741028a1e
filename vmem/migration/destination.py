"""Destination side of a migration: receive, place, resume the guest, prove it, confirm.

Run as ``python -m vmem.migration.destination --fd N`` on a connected socket (the one-host
orchestrator passes one end of a socketpair), or call :func:`serve` with a Channel.

Sequence:
  1. read the preamble; pre-spawn an *incoming* guest on fresh RAM (all of it allocated now
     if the preamble asks for ``prealloc``); answer READY.
  2. read the Xen stream; receive every PAGE_DATA batch into a staging buffer, write it into
     RAM with ``pwrite`` (or, RAM mapped ahead with ``prealloc``, receive a run of pages
     straight into RAM) and record per-page digests of what RAM then holds -- what was
     placed, not what was received.
  3. at libxl END: resume the guest from the EMULATOR_CONTEXT; answer RESUMED with the
     time of its first step; send the digests; run the guest's own ledger check.
  4. COMMIT: keep the guest; ROLLBACK, EOF or any error: kill the guest and free its RAM.

Guarantee: on every failure path this process leaves nothing behind: the incoming guest is
reaped, its memfds closed, and the source is told why (ERROR record) when the link allows.
"""
from __future__ import annotations

import argparse
import collections
import errno
import os
import socket
import sys
import threading
import time

import numpy as np

from transport import ChannelBrokenError, SocketChannel, TransportError

from vmem.format import control, stream

from vmem.format import wire
from vmem.format.wire import MAX_PAGES_PER_RECORD
from vmem import _native as nat
from vmem.migration import inject
from vmem.migration.backend import incoming_factory
from vmem.errors import GuestCrashed, MigrationError, StreamError, VmemError
from vmem.pages import PAGE_SIZE, zero_page_digest
from vmem.migration.postcopy.destination import PostcopyDestination, postcopy_unavailable_reason
from vmem.migration.state import DESTINATION_TRANSITIONS, DestinationState, StateCell
from vmem.migration.postcopy import FAULT_SCHEDS, drop_links, fault_cpu_refusal, fault_sched_refusal, is_cpu_number
from vmem.format.postcopy import decode_pfn_list
from vmem.procstats import PeakSampler, process_age_s, process_figures
from vmem.ram import format_bytes, mem_available_bytes, preallocate

__all__ = ["DestinationMigration", "serve"]

#: After an error that says the guest's memory is gone, how long its process may take to end.
GUEST_EXIT_WAIT_S = 2.0
#: After the source's COMPLETE, how long demand answers still in flight may take.
POSTCOPY_COMPLETE_TIMEOUT_S = 60.0
#: After a link failure following the switch, how long to wait for the source to resume
#: (default; the source's MigrationOptions.postcopy_recovery_wait_s overrides it).
POSTCOPY_RECONNECT_WAIT_S = 60.0


class DestinationMigration:
    """One incoming migration over ``channel``."""

    def __init__(self, channel, *, keep_guest: bool = False, urgent_channel=None):
        """``keep_guest``: after a committed migration, leave the guest running and hand it
        over as :attr:`kept_guest` (a host agent adopts it) instead of stopping it when the
        source asks for the final report."""
        self.ch = channel
        self.urgent = urgent_channel
        self.keep_guest = keep_guest
        self.postcopy = None  # PostcopyDestination once post-copy is armed
        #: ``await_reconnect(timeout_s) -> (channel, urgent_channel) | None``: after a link
        #: failure following the switch, wait for the source to reconnect (recovery)
        self.await_reconnect = None
        #: ``on_switch()``: called once the post-copy switch happened here (TRANSITION read,
        #: the guest being resumed): from then on a broken link is recoverable.  For logs.
        self.on_switch = None
        self.recoveries = 0
        self._resumed_payload = None
        self._send_lock = threading.Lock()  # the fault thread sends on the back channel too
        self.kept_guest = None
        #: ``on_commit(guest)``: with ``keep_guest``, called once the source committed, before
        #: the final report goes back (an agent adopts the guest there, so that it is listed
        #: running when the source's migrate returns); the guest is :attr:`kept_guest` from then.
        self.on_commit = None
        self.guest = None
        #: the life cycle (vmem.migration.state); changed only by ``self._state.set``
        self._state = StateCell(DestinationState.SETUP, DESTINATION_TRANSITIONS)
        self.digests: np.ndarray | None = None
        self.received: np.ndarray | None = None  # per page: placed (post-copy needs it)
        self._placer: _Placer | None = None
        self.pages_received = 0
        #: pages received straight into RAM (pre-copy with --prealloc), a subset of pages_received
        self.pages_in_place = 0
        self._in_place = False  # RAM is mapped ahead here: runs are received into it (_place)
        self._flip_page: int | None = None  # test-only: inject's flip, on the in-place path too
        self.sampler: PeakSampler | None = None
        # From the preamble.
        self._npages = 0
        self._postcopy_recovery = False
        self._fault_log = False  # send the post-copy fault log (the source records a page map)
        self._fault_sched = "default"  # how the post-copy fault thread is scheduled (--fault-sched)
        self._fault_cpu: int | None = None  # the CPU it is pinned to (--fault-cpu)
        self._recovery_wait_s = POSTCOPY_RECONNECT_WAIT_S
        self._context: bytes | None = None  # the guest context (EMULATOR_CONTEXT or TRANSITION)
        self._t_transition_read_ns = 0  # when TRANSITION was read (timings_ms.pause_to_transition_read)
        # Post-copy: the thread that resumes the guest at TRANSITION and what it found.
        self._resumed_thread: threading.Thread | None = None
        self._resumed_error: BaseException | None = None
        self._resumed_counters: dict | None = None
        self._postcopy_resume_counters = None  # (monotonic ns, counters) at the resume
        self._postcopy_done_counters = None  # (monotonic ns, counters) once every page arrived
        #: (time.monotonic() when this process was started, when its main() began), if it
        #: was started for this one migration (``python -m vmem.migration.destination``):
        #: READY then reports how long the interpreter and imports took and how long it then
        #: waited for the preamble.  None inside a long-lived agent.
        self.process_started_s: tuple[float, float] | None = None

    @property
    def state(self) -> DestinationState:
        return self._state.state

    @property
    def phase(self) -> str:
        """The state's name, as ERROR records and logs give it."""
        return self._state.state.value

    def _send_control(self, ctype, obj=None, raw: bytes | None = None) -> None:
        if raw is not None:
            parts = control.encode_control(ctype, raw)
        elif obj is not None:
            parts = control.encode_json_control(ctype, obj)
        else:
            parts = control.encode_control(ctype)
        with self._send_lock:
            self.ch.send_parts(parts)

    # --- page placement ----------------------------------------------------------------
    def _send_placed(self, pages_placed: int) -> None:
        """The placer caught up (before any post-copy switch): tell the source (PLACED)."""
        try:
            self._send_control(wire.ControlType.PLACED, {"pages": pages_placed})
        except (TransportError, OSError, VmemError):
            pass  # the link's failure surfaces in the receiving thread

    def _place(self, reader) -> None:
        """Receive the pending page payload; a worker writes it and digests what landed.

        The batch lands in one of the staging buffers (``STAGING_SLOTS``, <= 4 MiB each).  While this thread
        receives the next batch, a worker thread writes the previous one into the RAM memfd
        (one ``pwrite`` per contiguous run: no page faults, and pwrite into fresh shmem
        measured ~2x faster than writing through a mapping) and then digests each run as
        RAM holds it, read through this process's mapping of the memfd
        (``vmem._native.place_pages``): what was placed, not what was received.  Any pfn
        order is accepted (Xen does not require sorted records); a repeated pfn: the last
        copy wins.

        With RAM mapped ahead (``prealloc``), a run of consecutive pages is received straight
        into RAM instead (``_in_place_ok``): no staging copy and no ``pwrite``, which is most
        of what the destination spends in round 0 besides the receive itself (an idle 1 GiB
        guest between agents, round 0 1,063 -> 1,203 MB/s keyed, 1,395 -> 1,606 unkeyed,
        docs/performance.md).  Unverified octets of a keyed link may then sit in RAM for as
        long as the receive takes: before the guest ever runs there (pre-copy only), and a
        failed integrity check fails the migration, which discards that RAM.
        """
        pfns = reader.pending_pfns
        n = len(pfns)
        if not n:
            reader.read_page_payload_into(bytearray())  # a record of pages without data
            return
        pages = pfns.astype(np.int64, copy=False)
        first = int(pages[0])
        if self._in_place and self._placer.postcopy is None and self._in_place_ok(pages, first, n):
            # One run of pages, RAM mapped ahead (--prealloc): received straight into RAM, so
            # the kernel's receive copy is the only copy (no staging, no pwrite); the placer
            # digests the run from RAM while the next batch arrives.
            reader.read_page_payload_into(self.guest.ram.pages[first:first + n])
            if self._flip_page is not None and first <= self._flip_page < first + n:
                self.guest.ram.pages[self._flip_page, PAGE_SIZE // 2] ^= 1  # test-only (inject: flip)
            self._placer.submit_in_place(first, n)
            self.pages_in_place += n
            self.pages_received += n
            return
        slot = self._placer.acquire()
        # Through the reader, not straight from the channel: octets it read ahead come first
        # (after PREPARE_PAUSE, below); the rest is received into the slot in place.
        reader.read_page_payload_into(slot.staging[:n])
        self._placer.submit(slot, pages, n)
        self.pages_received += n

    def _in_place_ok(self, pages: np.ndarray, first: int, n: int) -> bool:
        """Whether batch ``pages`` may be received straight into RAM: consecutive pages, at
        least ``IN_PLACE_MIN_PAGES``, none of them in a batch the placer has yet to write (a
        later copy of a page must not be overwritten by an earlier one still queued)."""
        if n < IN_PLACE_MIN_PAGES or int(pages[-1]) - first != n - 1:
            return False
        if not bool((np.diff(pages) == 1).all()):
            return False
        return not self._placer.pending_overlaps(first, first + n)

    # --- the forward stream -----------------------------------------------------------------
    def _new_reader(self):
        reader = stream.StreamReader(self.ch.recv_exact, self.ch.recv_into, max_pfn=self._npages - 1,
                                     truncation_errors=(ChannelBrokenError,), recv_some=self.ch.recv_some)
        reader.read_begin()
        return reader

    def _receive(self, reader) -> None:
        """Read records until the libxl END; switch and complete post-copy on its records."""
        PC = wire.PostcopyRecordType
        while True:
            rec = reader.next_record()
            if isinstance(rec, stream.PageData):
                self._place(reader)
            elif rec.type is wire.LibxlRecordType.END:
                if reader.buffered_bytes:  # nothing may follow END before RESUMED
                    raise StreamError(f"{reader.buffered_bytes} octets after the libxl END record", reader.offset)
                return
            elif rec.type is wire.LibxlRecordType.EMULATOR_CONTEXT:
                if self._context is None:
                    self._context = stream.parse_emulator_record(rec).data
            elif rec.type is wire.VmemRecordType.PREPARE_PAUSE:
                self._prepare_for_pause()
                # What follows is the final pages and the stream's six closing records, sent
                # together (StreamWriter.end_of_stream): read them with one receive, not two
                # a record -- each a cold system call inside the downtime.
                reader.read_ahead(True)
            elif rec.type is PC.BEGIN:
                if self.postcopy is None:
                    raise MigrationError("postcopy", "the source switched to post-copy, which this destination did not arm")
                if self.state is DestinationState.RECEIVE:  # a resumed stream begins with BEGIN again
                    self._state.set(DestinationState.RECEIVE, DestinationState.POSTCOPY)
            elif rec.type is PC.PFNS:
                if self.state is not DestinationState.POSTCOPY or self._resumed_thread is not None:
                    raise StreamError("post-copy PFNS outside BEGIN..TRANSITION", rec.offset)
                self.postcopy.mark_pending(decode_pfn_list(rec.body, self._npages, "PFNS", rec.offset))
            elif rec.type is PC.TRANSITION:
                if self.state is not DestinationState.POSTCOPY or self._resumed_thread is not None:
                    raise StreamError("post-copy TRANSITION without BEGIN, or a second one", rec.offset)
                self._t_transition_read_ns = time.monotonic_ns()
                self._context = bytes(rec.body)
                self._resumed_thread = self._postcopy_switch(self._context)
            elif rec.type is PC.COMPLETE:
                self._postcopy_complete()
            # Other records (libxc END, HVM state, optional records) need no action here.

    def _prepare_for_pause(self) -> None:
        """PREPARE_PAUSE: the source pauses its guest next.  Rehearse the stream's last
        records and the incoming guest's restore once (their first run was cold inside the
        downtime), then answer PREPARED.  A guest that dies here fails the migration before
        the pause, as it would at the resume."""
        if self.state is not DestinationState.RECEIVE:
            raise StreamError("PREPARE_PAUSE outside the pre-copy phase")
        t0 = time.monotonic()
        stream.rehearse_tail(self._npages)
        prepare = getattr(self.guest, "prepare", None)
        took_part = bool(prepare()) if prepare is not None else False
        self._send_control(wire.ControlType.PREPARED, {"ms": round((time.monotonic() - t0) * 1e3, 3),
                                                        "guest": took_part})

    # --- post-copy recovery -------------------------------------------------------------------
    def _recoverable(self, err: BaseException) -> bool:
        """A broken link after the switch, before every page arrived, with recovery on."""
        if not (self._postcopy_recovery and self.await_reconnect is not None and self._resumed_thread is not None
                and self.postcopy is not None and self.postcopy.armed):
            return False
        return isinstance(err, (TransportError, OSError)) or isinstance(err.__cause__, (TransportError, OSError))

    def _postcopy_wait_for_source(self, err: BaseException):
        """The link broke after the switch: keep the guest waiting on its missing pages and
        wait for the source to come back; then tell it what is missing.  Returns the reader
        of the new stream.  If it does not come back, say exactly which pages are lost."""
        pc = self.postcopy
        self._placer.flush()  # what arrived intact is placed
        pc.pause()
        missing = pc.missing_pages()
        print(f"vmem destination: the link to the source broke after the switch ({err}); {len(missing)} pages are "
              f"missing and the guest waits for them; waiting up to {self._recovery_wait_s:g} s for the source "
              f"to resume the migration", file=sys.stderr)
        drop_links(self.ch, self.urgent)
        got = self.await_reconnect(self._recovery_wait_s)
        if got is None:
            raise MigrationError("postcopy", f"the source did not come back within {self._recovery_wait_s:g} s; "
                                             f"{len(missing)} pages are lost (first: {missing[:16].tolist()}); the guest was "
                                             "stopped rather than run on memory it does not have")
        self.ch, self.urgent = got
        config = control.read_preamble(self.ch.recv_exact)
        if not config.get("postcopy_resume") or int(config.get("npages", -1)) != self._npages:
            raise StreamError(f"expected a post-copy resume preamble for {self._npages} pages, got {sorted(config)}")
        self._send_control(wire.ControlType.POSTCOPY_RESUME, raw=memoryview(missing.astype("<u8")).cast("B"))
        if self._resumed_payload is not None:
            self._send_control(wire.ControlType.RESUMED, self._resumed_payload)  # it may have been lost
        pc.resume_after_reconnect(self.urgent)
        self.recoveries += 1
        return self._new_reader()

    def _map_preallocated(self, need: int) -> float | None:
        """``--prealloc``'s second step: map the allocated RAM into this process's page
        tables (:meth:`vmem.ram.GuestRam.map_for_writing`), so that neither a demand
        answer's copy nor a digest takes a page fault here.  Returns the seconds, or None
        where the kernel cannot (said on stderr; the migration goes on as without it).

        Raises:
            MigrationError: the kernel refused for another reason (ENOMEM...): a refusal
                in setup, before any page moves, as an allocation that fails.
        """
        try:
            injected = inject.prealloc_failure_from_env(step="map")  # test-only (vmem.migration.inject)
            if injected is not None and injected.errno != errno.EINVAL:
                raise injected
            map_s = None if injected is not None else self.guest.ram.map_for_writing()
        except OSError as err:
            raise MigrationError("setup", f"cannot map the preallocated {format_bytes(need)} of the incoming guest: "
                                          f"{err.strerror or err} (free memory on this host, or migrate without "
                                          "--prealloc)") from err
        if map_s is None:
            print("vmem destination: --prealloc: this kernel does not know madvise(MADV_POPULATE_WRITE) (Linux 5.14): "
                  "the RAM is allocated but not mapped ahead; each page this destination writes first faults once, "
                  "as without --prealloc", file=sys.stderr)
        return map_s

    # --- post-copy -------------------------------------------------------------------------
    def _arm_postcopy(self) -> dict:
        """Take the guest's uffd and trap its accesses to unmapped pages (MISSING|MINOR).

        Done before any page arrives, so a switch later costs no registration.  Returns what
        READY tells the source: whether post-copy can run here, and if not, why.
        """
        reason = postcopy_unavailable_reason(self.guest)
        if reason is None:
            try:
                pc = PostcopyDestination(self.guest, self.digests, self.received, self._send_control,
                                         fault_sched=self._fault_sched, fault_cpu=self._fault_cpu)
                pc.arm()
                self.postcopy = pc
            except (VmemError, OSError) as err:
                reason = f"cannot arm post-copy: {err}"
        return {"postcopy": reason is None, "postcopy_unavailable": reason}

    def _postcopy_switch(self, context: bytes):
        """TRANSITION: mark the pages still to come, resume the guest at once.

        Returns the thread that waits for the guest's first step and sends RESUMED: the
        main thread must go on reading the stream meanwhile (the first step may need pages
        that are in it).
        """
        self._placer.flush()  # pre-copied pages are in RAM before any is mapped
        self._placer.postcopy = self.postcopy
        t_end = time.monotonic_ns()
        self.postcopy.switch(self.urgent)
        t_switched = time.monotonic_ns()
        if self.on_switch is not None:
            self.on_switch()

        def resume_and_report():
            # In this thread, not the main one: the guest's restore and first step may
            # fault on pages that arrive on the main stream, which the main thread reads.
            try:
                t0 = time.monotonic_ns()
                self.guest.resume(context, timeout_s=120.0)
                self._postcopy_resume_counters = (time.monotonic_ns(), self.guest.counters())
                self.postcopy.start_mapper()
                first = self.guest.wait_first_step(timeout_s=120.0)
                self._resumed_counters = self.guest.counters()
                self._resumed_payload = {
                    "first_step_ns": first, "running_at_ns": self._resumed_counters["resumed_at_ns"],
                    "restore_ms": round((first - t0) / 1e6, 3),
                    "end_to_resume_ms": round((t0 - t_end) / 1e6, 3), "pages_received": self.pages_received,
                    "pages_in_place": self.pages_in_place,
                    "postcopy": True, "transition_read_ns": self._t_transition_read_ns,
                    "flush_ms": round((t_end - self._t_transition_read_ns) / 1e6, 3),
                    "switch_ms": round((t_switched - t_end) / 1e6, 3),
                    "resume_cmd_ms": round((self._postcopy_resume_counters[0] - t0) / 1e6, 3),
                }
                try:
                    self._send_control(wire.ControlType.RESUMED, self._resumed_payload)
                except (TransportError, OSError):
                    if not self._postcopy_recovery:
                        raise  # else: re-sent after the source reconnects
            except BaseException as err:  # re-raised by the main thread
                self._resumed_error = err

        t = threading.Thread(target=resume_and_report, name="vmem-pc-resume", daemon=True)
        t.start()
        return t

    def _postcopy_complete(self) -> None:
        """COMPLETE: wait until every page is present, disarm, report the statistics."""
        pc = self.postcopy
        self._placer.flush()
        if not pc.wait_complete(POSTCOPY_COMPLETE_TIMEOUT_S):
            missing = pc.missing_pages()
            raise MigrationError("postcopy", f"{len(missing)} pages never arrived after COMPLETE (first: {missing[:10].tolist()})")
        stats = pc.finish()
        stats["recoveries"] = self.recoveries
        if self._fault_log:
            stats["fault_log"] = pc.fault_log()
        self._placer.postcopy = None
        t_done = time.monotonic_ns()
        at_done = self.guest.counters()
        self._resumed_thread.join(120)
        if self._resumed_error is not None:
            raise self._resumed_error
        t_res, at_res = self._postcopy_resume_counters
        # The first step after the switch ends the downtime; the faults it waited on are
        # most of a busy guest's post-copy downtime (docs/performance.md).
        first_ns = int(self._resumed_payload["first_step_ns"])
        stats["first_step"] = pc.faults_until(first_ns)
        # The step itself, on the guest's clock (it restarted -> the step ended): the faults'
        # blocked_ms leaves out each fault's wait for the fault thread to get a CPU.
        stats["first_step"]["duration_ms"] = round((first_ns - int(self._resumed_payload["running_at_ns"])) / 1e6, 3)
        during_s = (t_done - t_res) / 1e9
        stats["guest_steps_during"] = at_done["steps"] - at_res["steps"]
        stats["during_s"] = round(during_s, 6)
        # The guest's longest step gap since its resume, as it stood when the last page was
        # placed: the source tells the migration's own gaps from later ones with it.
        stats["max_gap_ns_at_complete"] = int(at_done.get("max_gap_ns") or 0)
        stats["max_gap_end_ns_at_complete"] = int(at_done.get("max_gap_end_ns") or 0)
        self._postcopy_done_counters = (t_done, at_done)
        self._send_control(wire.ControlType.POSTCOPY_STATUS, stats)

    # --- the migration -------------------------------------------------------------------
    def run(self) -> int:
        """Serve the migration; returns a process exit status (0 = committed)."""
        self.sampler = PeakSampler({"migrator_destination": os.getpid()})
        try:
            with self.sampler:
                return self._run()
        except (VmemError, TransportError, OSError) as err:
            if self.guest is not None and not isinstance(err, GuestCrashed) and self._guest_died(err):
                # The guest's death surfaced as another error (e.g. ENOENT placing a page
                # into its gone mm): name the real cause, e.g. the checker's message.
                err = self.guest.crash_error(self.phase)
            self._report_error(err)
            return 1
        finally:
            if self.postcopy is not None:
                self.postcopy.stop()
            if self._placer is not None:
                self._placer.stop()
            if self.guest is not None:
                # Kill the guest before its uffd closes: closing it would let a guest blocked
                # on a missing page run on a zero page.  (ProcessGuest.close kills first.)
                self.guest.close()
                self.guest = None

    def _guest_died(self, err: BaseException) -> bool:
        """Whether the guest is dead.  After an error that says its memory is gone (ENOENT
        or ESRCH from a uffd call: the mm is torn down before the process is), wait a
        moment for the process to end too."""
        cause = err if isinstance(err, OSError) else err.__cause__
        gone = isinstance(cause, OSError) and cause.errno in (errno.ENOENT, errno.ESRCH)
        deadline = time.monotonic() + (GUEST_EXIT_WAIT_S if gone else 0.0)
        while self.guest.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def _report_error(self, err: BaseException) -> None:
        msg = getattr(err, "message", None) or str(err) or type(err).__name__
        print(f"vmem destination: {self.phase}: {msg}", file=sys.stderr)
        try:
            self._send_control(wire.ControlType.ERROR, {"phase": self.phase, "message": msg, "type": type(err).__name__})
        except (TransportError, OSError, VmemError):
            pass

    def _read_preamble(self) -> dict | None:
        """The preamble; None if the source closed the connection before sending a byte of
        it (a destination started ahead, :class:`vmem.migration.local.LocalDestination`,
        whose migration never began: nothing to report)."""
        got = [0]

        def recv_exact(n: int) -> bytes:
            data = self.ch.recv_exact(n)
            got[0] += len(data)
            return data

        try:
            return control.read_preamble(recv_exact)
        except (StreamError, TransportError, EOFError):
            if got[0] == 0:
                return None
            raise

    def _run(self) -> int:
        config = self._read_preamble()
        if config is None:
            return 0
        t_preamble = time.monotonic()
        try:
            npages = int(config["npages"])
            page_size = int(config["page_size"])
            spec_json = dict(config["guest"])
            backend = str(config.get("backend", "process"))
        except (KeyError, TypeError, ValueError) as err:
            raise StreamError(f"preamble lacks a valid guest description: {err}") from err
        if page_size != PAGE_SIZE:
            raise MigrationError("setup", f"page size {page_size} is not supported (only {PAGE_SIZE})")
        fault_sched = config.get("fault_sched", "default")
        if fault_sched not in FAULT_SCHEDS:
            raise StreamError(f"preamble's fault_sched {fault_sched!r} is not one of {', '.join(FAULT_SCHEDS)}")
        refusal = fault_sched_refusal(fault_sched, "destination")
        if refusal is not None:  # before anything is built here
            raise MigrationError("setup", f"--fault-sched {fault_sched}: {refusal}")
        self._fault_sched = fault_sched
        fault_cpu = config.get("fault_cpu")
        if fault_cpu is not None and not is_cpu_number(fault_cpu):
            raise StreamError(f"preamble's fault_cpu {fault_cpu!r} is not a CPU number")
        refusal = fault_cpu_refusal(fault_cpu, "destination")
        if refusal is not None:  # before anything is built here
            raise MigrationError("setup", f"--fault-cpu {fault_cpu}: {refusal}")
        self._fault_cpu = fault_cpu
        try:
            factory = incoming_factory(backend)
        except KeyError:
            raise MigrationError("setup", f"guest backend {backend!r} is not available on this host") from None
        need = npages * PAGE_SIZE
        if npages <= 0 or need > mem_available_bytes():
            raise MigrationError("setup", f"cannot host a guest of {format_bytes(need)}: only {format_bytes(mem_available_bytes())} "
                                          "of memory available on this host (free memory, or migrate a smaller guest)")
        t_guest = time.monotonic()
        try:
            self.guest = factory(spec_json, npages)
        except (KeyError, TypeError, ValueError) as err:
            # A malformed description from the wire is the peer's error, not a crash of ours.
            raise StreamError(f"preamble's guest description is malformed: {type(err).__name__}: {err}") from err
        prealloc_s = map_s = None
        if config.get("prealloc"):
            try:
                injected = inject.prealloc_failure_from_env()  # test-only (vmem.migration.inject)
                if injected is not None:
                    raise injected
                prealloc_s = preallocate(self.guest.ram.fd, need)
            except OSError as err:
                raise MigrationError("setup", f"cannot preallocate {format_bytes(need)} for the incoming guest: "
                                              f"{err.strerror or err} (free memory on this host, or migrate without "
                                              "--prealloc)") from err
            map_s = self._map_preallocated(need)
        if config.get("verify", True):
            self.digests = np.full(npages, zero_page_digest(), dtype=np.uint64)
        self.received = np.zeros(npages, dtype=bool)
        fault = inject.placement_fault_from_env()
        if fault is not None:  # test-only (vmem.migration.inject)
            nat.set_place_fault(*fault)
        # Receive runs straight into RAM only where it is mapped ahead: writing through a
        # mapping that is not costs a page fault per page (pwrite is then ~2x faster).  An
        # injected drop or wrong-offset needs the staged path; a flip is made on both.
        self._in_place = (map_s is not None and not self.guest.ram.readonly
                          and (fault is None or fault[0] == "flip") and not inject.no_in_place())
        if fault is not None and fault[0] == "flip":
            self._flip_page = fault[1]
        inject.apply_preempt()  # test/benchmark-only; nothing without VMEM_TEST_POSTCOPY_PREEMPT
        self._placer = _Placer(self.guest.ram, self.digests, self.received,
                               on_caught_up=self._send_placed if config.get("placed_acks") else None)
        ready = {"guest_pid": self.guest.pid, "placed_acks": bool(config.get("placed_acks")),
                 "prealloc": prealloc_s is not None, "prepare_pause": True, "fault_sched": fault_sched,
                 "fault_cpu": fault_cpu}
        if config.get("postcopy"):
            ready.update(self._arm_postcopy())
        # Where the handshake's time went here (the source adds them to timings_ms).
        ready["setup_ms"] = {
            "destination_imports": (round((self.process_started_s[1] - self.process_started_s[0]) * 1e3, 3)
                                    if self.process_started_s is not None else None),
            "destination_waited": (round((t_preamble - self.process_started_s[1]) * 1e3, 3)
                                   if self.process_started_s is not None else None),
            "guest_start": round((time.monotonic() - t_guest - (prealloc_s or 0.0) - (map_s or 0.0)) * 1e3, 3),
            "destination_prealloc": round(prealloc_s * 1e3, 3) if prealloc_s is not None else None,
            "destination_map": round(map_s * 1e3, 3) if map_s is not None else None,
            "destination_prepare": round((t_guest - t_preamble) * 1e3, 3),
        }
        self._send_control(wire.ControlType.READY, ready)

        self._state.set(DestinationState.SETUP, DestinationState.RECEIVE)
        self._npages = npages
        self._postcopy_recovery = bool(config.get("postcopy_recovery"))
        self._fault_log = bool(config.get("pagemap"))  # the source records a page map: send the fault log
        try:
            self._recovery_wait_s = min(max(float(config.get("postcopy_recovery_wait_s", POSTCOPY_RECONNECT_WAIT_S)), 0.0), 3600.0)
        except (TypeError, ValueError) as err:
            raise StreamError(f"preamble's postcopy_recovery_wait_s is not a number: {err}") from err
        reader = self._new_reader()
        while True:
            try:
                self._receive(reader)
                break
            except (TransportError, StreamError, OSError) as err:
                if not self._recoverable(err):
                    raise
                reader = self._postcopy_wait_for_source(err)
        context = self._context
        resumed_thread = self._resumed_thread
        if resumed_thread is None and self.postcopy is not None:
            self.postcopy.disarm()  # pre-copy only: the kernel maps pages by itself again
        self._placer.flush()  # every page is in RAM (and digested) before the guest runs
        if context is None:
            raise StreamError("stream ended without an EMULATOR_CONTEXT record (no guest context)")

        if resumed_thread is None:
            t_end = time.monotonic_ns()
            self._state.set(self.state, DestinationState.RESUME)  # RECEIVE, or POSTCOPY that never switched
            t0 = time.monotonic_ns()
            self.guest.resume(context)
            first = self.guest.wait_first_step()
            self._send_control(wire.ControlType.RESUMED, {
                "first_step_ns": first, "running_at_ns": self.guest.counters()["resumed_at_ns"], "restore_ms": round((first - t0) / 1e6, 3),
                "end_to_resume_ms": round((t0 - t_end) / 1e6, 3), "pages_received": self.pages_received,
                "pages_in_place": self.pages_in_place,
            })
            resumed = self.guest.counters()
        else:
            resumed_thread.join()
            if self._resumed_error is not None:
                raise self._resumed_error
            resumed = self._resumed_counters

        self._state.set(DestinationState.RESUME if resumed_thread is None else DestinationState.POSTCOPY,
                        DestinationState.VERIFY)
        if self.digests is not None:
            # Little-endian u64 on the wire; on x86 that is the array's own memory: no copy.
            digests = self.digests if self.digests.dtype == np.dtype("<u8") else self.digests.astype("<u8")
            self._send_control(wire.ControlType.DIGESTS, raw=memoryview(digests).cast("B"))
        if config.get("guest_check", True):
            # From outside, the guest running: the lab must not stall the guest it
            # measures (the guest's own VERIFY command stops its workload meanwhile).
            t, steps0 = time.monotonic(), self.guest.counters()["steps"]
            check = self.guest.verify_running()
            check["duration_s"] = round(time.monotonic() - t, 3)
            check["guest_steps_during"] = self.guest.counters()["steps"] - steps0
            self._send_control(wire.ControlType.GUEST_CHECK, check)

        self._state.set(DestinationState.VERIFY, DestinationState.COMMIT)
        ctl = control.ControlReader(self.ch.recv_exact)
        ctype, _ = ctl.read()
        if ctype != wire.ControlType.COMMIT:
            print(f"vmem destination: source sent {wire.ControlType(ctype).name}: discarding the guest", file=sys.stderr)
            return 1
        t_commit = time.monotonic()
        guest = self.guest
        if self.keep_guest:
            # The guest is ours now, and handed over before the final report: whoever keeps
            # it (an agent) lists it running by the time the source's migrate returns, and
            # no failure of ours from here on may stop it (run()'s cleanup closes self.guest).
            self.kept_guest, self.guest = guest, None
            if self.on_commit is not None:
                self.on_commit(guest)
        # Wait until the source asks for the final report.
        try:
            ctype, _ = ctl.read()
        except (TransportError, StreamError):
            ctype = wire.ControlType.SHUTDOWN
        after = guest.counters()
        elapsed = time.monotonic() - t_commit
        report = {
            "guest": {
                "pid": guest.pid,
                "alive": guest.alive(),
                "steps_since_resume": after["steps"] - resumed["steps"],
                "pages_written_since_resume": after["pages_written"] - resumed["pages_written"],
                "observed_s": round(elapsed, 3),
                "counters": after,
            },
            "processes": {"migrator_destination": process_figures(), "destination_guest": process_figures(guest.pid)},
        }
        done = self._postcopy_done_counters
        if done is not None:
            # Guest progress after the last page arrived, for the report's guest_rate.after.
            t_done, at_done = done
            report["postcopy_after"] = {"steps": after["steps"] - at_done["steps"],
                                        "seconds": round((time.monotonic_ns() - t_done) / 1e9, 6)}
        self.sampler.merge_into(report["processes"])
        try:
            self._send_control(wire.ControlType.DEST_REPORT, report)
        except (TransportError, OSError):
            pass
        if self.postcopy is not None:
            self.postcopy = None  # finished: the uffd stays with the guest object
        if not self.keep_guest:
            guest.exit()
            self.guest = None
        return 0


#: Staging buffers of the placer (4 MiB each).  The receiving thread, the placer and, on
#: one host or between agents of one machine, the sender share the CPUs; with two slots
#: the receiver stalled whenever the placer fell one batch behind, and a CPU sat idle.
#: Measured (an idle 1 GiB guest between two agents in network namespaces, round 0,
#: slot counts interleaved in one agent pair, medians of 6): unkeyed 1,268 / 1,432 / 1,460
#: MB/s with 2 / 4 / 6 slots, keyed 968 / 1,065 / 1,084 (an hour later, noisier: unkeyed
#: 1,045 / 1,196 / 1,331).  Each slot is 4 MiB of the destination's private memory while
#: pages arrive (peak at a 4 GiB guest: 43 / 51 / 59 MiB with 2 / 4 / 6): six would put an
#: 8 GiB guest's destination over the goal of 64 MiB + a few bits a page, four do not.
STAGING_SLOTS = 4
#: A batch of at least this many consecutive pages is received straight into RAM when RAM
#: is mapped ahead (--prealloc): round 0's batches of a guest's data runs are 1,024 pages.
IN_PLACE_MIN_PAGES = 64


class _Slot:
    """A staging buffer that one batch occupies until it is written."""

    def __init__(self):
        self.staging = np.empty((MAX_PAGES_PER_RECORD, PAGE_SIZE), dtype=np.uint8)


class _Placer:
    """Write-and-digest worker: receiving the next batch overlaps placing the last.

    Guarantees: after :meth:`flush` returns, every submitted batch is in the RAM memfd and
    its digests, taken from RAM after the write, are recorded; a worker failure is
    re-raised in the receiving thread (at the next acquire or flush).
    """

    def __init__(self, ram, digests: np.ndarray | None, received: np.ndarray | None = None,
                 nslots: int = STAGING_SLOTS,
                 on_caught_up=None):
        """``ram``: the incoming guest's GuestRam (its memfd, and its mapping here).
        ``on_caught_up(pages_placed)``: called by the worker after a batch when no other
        batch is waiting (everything received so far is placed), before any post-copy switch."""
        import queue
        import threading

        self._fd = ram.fd
        self._view = ram.address
        self._digests = digests
        self._received = received
        #: set at the post-copy switch: batches then go through its claim-and-map placement
        self.postcopy = None
        self._free: "queue.Queue[_Slot]" = queue.Queue()
        for _ in range(nslots):
            self._free.put(_Slot())
        self._work: "queue.Queue" = queue.Queue()
        # [first, end) page bounds of each batch submitted and not yet placed, oldest first
        self._pending: "collections.deque[tuple[int, int]]" = collections.deque()
        self._pending_lock = threading.Lock()
        self._error: BaseException | None = None
        self._on_caught_up = on_caught_up
        self._test_delay_s = inject.place_delay_from_env()  # test-only: a slow destination
        #: pages placed before the post-copy switch (duplicates counted, as the source counts sends)
        self.pages_placed = 0
        self._thread = threading.Thread(target=self._run, name="vmem-placer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                self._work.task_done()
                return
            slot, pages, n = item
            try:
                if self._error is not None:
                    pass
                elif slot is None or self.postcopy is None:  # pre-copy
                    if slot is None:  # received in place: pages is the run's first page
                        if self._received is not None:
                            self._received[pages:pages + n] = True
                        if self._digests is not None:
                            nat.digest_range(self._view, pages, n, self._digests[pages:])
                    else:
                        if self._received is not None:
                            self._received[pages] = True
                        nat.place_pages(self._fd, -1, 0, slot.staging, pages, digests=self._digests, view=self._view)
                    self.pages_placed += n
                    if self._test_delay_s:
                        time.sleep(self._test_delay_s)
                else:
                    self.postcopy.place(slot.staging, pages)
            except BaseException as err:  # re-raised in the receiving thread
                self._error = err
            finally:
                if slot is not None:
                    self._free.put(slot)
                with self._pending_lock:
                    self._pending.popleft()
                self._work.task_done()
            if (self._on_caught_up is not None and self._error is None and self.postcopy is None
                    and self._work.qsize() == 0):
                self._on_caught_up(self.pages_placed)

    def _check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise MigrationError("receive", f"placing pages failed: {err}") from err

    def acquire(self) -> _Slot:
        self._check()
        slot = self._free.get()
        self._check()
        return slot

    def submit(self, slot: _Slot, pages: np.ndarray, n: int) -> None:
        with self._pending_lock:
            self._pending.append((int(pages.min()), int(pages.max()) + 1))
        self._work.put((slot, pages, n))

    def submit_in_place(self, first: int, n: int) -> None:
        """Pages ``[first, first + n)`` were received straight into RAM: digest them there
        (and count them placed) after every batch submitted before."""
        with self._pending_lock:
            self._pending.append((first, first + n))
        self._work.put((None, first, n))

    def pending_overlaps(self, first: int, end: int) -> bool:
        """Whether a batch submitted and not yet placed may hold a page in ``[first, end)``
        (a batch counts from its lowest page to its highest)."""
        with self._pending_lock:
            return any(lo < end and first < hi for lo, hi in self._pending)

    def flush(self) -> None:
        self._work.join()
        self._check()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._work.put(None)
            self._thread.join(10)


def serve(channel, urgent_channel=None, resume_listener=None, *,
          process_started_s: tuple[float, float] | None = None) -> int:
    """Serve one incoming migration on ``channel``; returns the exit status.

    ``urgent_channel``: optional second connection on which the source sends post-copy
    demand pages ahead of its background push.  ``resume_listener``: optional listening
    socket on which the source reconnects to resume a post-copy whose link broke.
    """
    dm = DestinationMigration(channel, urgent_channel=urgent_channel)
    dm.process_started_s = process_started_s
    if resume_listener is not None:
        dm.await_reconnect = lambda timeout_s: accept_reconnect(resume_listener, timeout_s, urgent_channel is not None)
    return dm.run()


def accept_reconnect(listener: socket.socket, timeout_s: float, with_urgent: bool):
    """Accept the source's new main (and urgent) connection within ``timeout_s``; None on timeout."""
    import select

    deadline = time.monotonic() + timeout_s
    got = []
    for _ in range(2 if with_urgent else 1):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([listener], [], [], left)[0]:
            for ch in got:
                ch.close()
            return None
        conn, _ = listener.accept()
        conn.setblocking(True)
        got.append(SocketChannel(conn))
    return (got[0], got[1] if with_urgent else None)


def main(argv=None) -> int:
    now_s, age_s = time.monotonic(), process_age_s()
    started_s = (now_s - age_s, now_s) if age_s is not None else None
    p = argparse.ArgumentParser(prog="python -m vmem.migration.destination")
    p.add_argument("--fd", type=int, required=True, help="connected stream socket to the source")
    p.add_argument("--urgent-fd", type=int, default=-1, help="second socket: post-copy demand pages")
    p.add_argument("--resume-fd", type=int, default=-1, help="listening socket: the source resumes a broken post-copy")
    args = p.parse_args(argv)
    try:
        from vmem import _native as nat
        import signal

        nat.set_pdeathsig(signal.SIGKILL)
    except Exception:
        pass
    # This process exists for one migration: its incoming guest is forked from it, with
    # numpy and the runtime already imported, instead of a second interpreter that imports
    # them again (the handshake's largest avoidable part; scripts/bench_handshake.py).
    from guests.launch import set_spawn_options

    set_spawn_options(fork=os.environ.get("VMEM_GUEST_START", "fork") != "exec")
    ch = SocketChannel(socket.socket(fileno=args.fd))
    urgent = SocketChannel(socket.socket(fileno=args.urgent_fd)) if args.urgent_fd >= 0 else None
    listener = socket.socket(fileno=args.resume_fd) if args.resume_fd >= 0 else None
    try:
        return serve(ch, urgent, listener, process_started_s=started_s)
    finally:
        ch.close()
        if urgent is not None:
            urgent.close()
        if listener is not None:
            listener.close()


if __name__ == "__main__":
    sys.exit(main())
