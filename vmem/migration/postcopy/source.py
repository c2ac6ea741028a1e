"""Source side of post-copy: demand pages first, then a background push near the faults.

After TRANSITION the source guest stays paused: its RAM is the only complete copy of the
pages still to come, and it stays intact until the destination confirms (POSTCOPY_STATUS,
then the digest comparison) that every page has been placed.

Two threads:

* the *fault server* answers each POSTCOPY_FAULT at once with the requested pages and moves
  the push cursor to the fault (pre-paging: the neighbourhood of a fault is likely to be
  touched next, as Hines & Gopalan and the 2017 RFC do).  With an urgent channel (a second
  connection, so the answer does not queue behind megabytes of background push) it is a C
  thread reading that channel (``vmem._native.PostcopyFaultServer``), and the back channel
  stays with the main thread; without one it is a Python thread reading the back channel,
  answering on the main stream between two push batches and handing every other control
  record to the main thread through a queue.
* the *pusher* (the caller's thread) sends the remaining pages in batches of up to 1024,
  from the cursor onwards, skipping pages already sent.  It gives way to the fault server
  (QEMU's postcopy-preempt): no batch starts while a FAULT record is being answered (the C
  server counts them in ``cursor[2]``), so on a 2-core machine the answer does not compete
  with a 4 MiB gather and send for a CPU (``push_yields`` counts the batches that waited).
  The destination does the same where the two meet there (vmem/_build/postcopy.py).
  With a cap (``--postcopy-bandwidth``, QEMU's max-postcopy-bandwidth) a token bucket paces
  the batches; the demand answers are neither counted nor held (``push_paced_s`` says how
  long the push waited for the cap).
"""
from __future__ import annotations

import queue
import sys
import threading
import time

import numpy as np

from transport import TokenBucket, TransportError

from vmem.format import wire
from vmem.errors import MigrationError, StreamError, drop_tracebacks
from vmem.pages import PAGE_SIZE, page_buffers, unique_pages
from vmem.format.postcopy import decode_pfn_list
from vmem.format.wire import MAX_PAGES_PER_RECORD

__all__ = ["PostcopySource", "destination_error", "push_batch_pages"]

#: Pages per background push record (1 MiB).  The push's system calls copy a whole batch
#: (the source's send, the destination's receive), and a kernel that does not preempt
#: there (PREEMPT_NONE, this VM's) lets a woken fault thread wait until the call returns,
#: whatever its priority: with 1,024-page batches `perf sched timehist` showed the fault
#: threads waiting over 0.25 ms (up to 4) behind the push's threads in 23-39 switches a
#: migration, 2-15 with 256 (5,000 pages/s, one host; docs/performance.md, "A new boot; the
#: push in 1 MiB batches"). The push rate did not fall.  That is a one-host link (a unix
#: socket, where one call copies the whole batch); over TCP between agents the same change
#: raised the keyed fault p50 (63.5 -> 74.1 us, 5 pairs) and not the p99, so a network link
#: keeps BATCH_PAGES_NETWORK (push_batch_pages).
BATCH_PAGES = 256
BATCH_PAGES_NETWORK = 1024
GIL_SWITCH_INTERVAL_S = 0.0001
#: pages a batch search looks at per numpy step (a window of the pending list)
SCAN_WINDOW = 16384
#: the pusher waits at most this long for the fault server before a batch (a stuck answer
#: must not stop the push; the answer is the fault server's to finish or fail)
GIVE_WAY_MAX_S = 0.005
#: when the fault server's link fails, how long the pusher waits for the destination's
#: ERROR on the main channel (sent before it closed) before the link error stands
DESTINATION_REASON_WAIT_S = 0.5
#: a push waiting for its bandwidth cap looks at the back channel at least this often (a
#: low cap on a 4 MiB batch would otherwise sleep for seconds without seeing an ERROR)
PACED_POLL_S = 0.02


def push_batch_pages(fd: int) -> int:
    """Pages per background push batch for a post-copy whose urgent connection is ``fd``:
    :data:`BATCH_PAGES` on one host (a unix socket), :data:`BATCH_PAGES_NETWORK` over a
    network socket (see the constants for what was measured)."""
    import socket

    sock = socket.socket(fileno=fd)
    try:
        return BATCH_PAGES if sock.family == socket.AF_UNIX else BATCH_PAGES_NETWORK
    finally:
        sock.detach()  # the fd stays the caller's


def destination_error(body: bytes, phase: str = "postcopy") -> MigrationError:
    """The destination's ERROR record as the error the migration fails with (its phase if
    it names one, else ``phase``)."""
    from vmem.format import control

    err = control.decode_json(body)
    return MigrationError(err.get("phase", phase), f"destination: {err.get('message', err)}")


class PostcopySource:
    """Serve faults and push the pages still to come to the destination after TRANSITION.

    Args:
        ram: the source guest's RAM as an ``(npages, PAGE_SIZE)`` uint8 array (guest paused).
        writer: the StreamWriter of the main stream.
        ctl_reader: the back channel's ControlReader.
        send_lock: serialises writes to the main stream (the fault server writes there too
            when there is no urgent channel).
        urgent: optional urgent Channel.
        progress: the migration's progress sink (``sent``).
        channel: the main channel (its back direction is read here when there is an urgent
            channel).
        fault_sched: how the native fault thread is scheduled
            (:data:`vmem.migration.postcopy.FAULT_SCHEDS`; the caller checked the host permits it).
        fault_cpu: the CPU the native fault thread is pinned to (``--fault-cpu``; the caller
            checked it is one this process may run on), None for none.
        push_bandwidth_Bps: cap on the push in bytes/s, counted as the stream bytes its
            batches wrote (before any ``--compress`` of the link), None for none.
    """

    def __init__(self, ram: np.ndarray, writer, ctl_reader, send_lock: threading.Lock,
                 urgent=None, progress=None, channel=None, fault_sched: str = "default",
                 push_bandwidth_Bps: float | None = None, fault_cpu: int | None = None):
        self.ram = ram
        self.fault_cpu = fault_cpu
        #: paces the push to push_bandwidth_Bps (None: not paced); its sleeps keep reading
        #: the back channel (_paced_sleep)
        self._bucket = TokenBucket(push_bandwidth_Bps, sleep=self._paced_sleep) if push_bandwidth_Bps else None
        self.fault_sched = fault_sched
        #: the pages to push (sorted unique int64), given to :meth:`push`; the fault server
        #: may start before it is known (the destination may fault at once)
        self.pending = np.empty(0, dtype=np.int64)
        self.npages = len(ram)
        self.writer = writer
        self.ctl_reader = ctl_reader
        self.send_lock = send_lock
        self.urgent = urgent
        self.progress = progress
        self.sent = np.zeros(self.npages, dtype=bool)
        self.cursor = 0  # index into pending where the push continues (the pusher's alone)
        self.controls: "queue.Queue" = queue.Queue()
        self.faults_served = 0
        self.pages_demanded = 0
        self.pages_pushed = 0
        self.bytes_pushed = 0
        self._fault_staging = np.empty((MAX_PAGES_PER_RECORD, PAGE_SIZE), dtype=np.uint8)
        #: pages per push batch: BATCH_PAGES, or by the urgent link (push_batch_pages) at start();
        #: vmem.migration.inject may set another for a benchmark
        self.batch_pages = BATCH_PAGES
        self._staging: np.ndarray | None = None  # allocated by push(), batch_pages rows
        self._thread: threading.Thread | None = None
        self.channel = channel
        self._engine = None  # PostcopyFaultServer (C) when there is an urgent channel
        #: [newest fault pfn, fault count], written by the fault server (C or Python); the
        #: pusher moves its cursor after that pfn when the count changes (pre-paging)
        #: [2]: FAULT records the C server is answering right now (the pusher gives way)
        self._cursor_shared = np.zeros(3, dtype=np.int64)
        self.give_way = True  # False only by vmem.migration.inject (benchmarks of the old way)
        self.push_yields = 0  # batches that waited for the fault server first
        self.fault_thread_priority: str | None = None
        #: where the native fault thread ran: its CPU, None (not pinned), "refused: ..."
        self.fault_thread_cpu: int | str | None = None
        self._cursor_seq = 0
        #: set (under send_lock) once COMPLETE is written: nothing more goes on the stream
        self.stream_ended = False
        self._stop = threading.Event()
        self.error: BaseException | None = None
        #: the destination's ERROR, read by the Python fault server (no urgent channel)
        self.refused: MigrationError | None = None
        self._old_switch_s: float | None = None
        #: a vmem.migration.pagemap.PagemapRecorder told of every push batch, or None
        self.recorder = None

    # --- back channel ------------------------------------------------------------------------
    def start(self) -> None:
        # The fault server must get the GIL soon after a FAULT arrives, not after the
        # pusher's 5 ms default switch interval.
        self._old_switch_s = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        if self.urgent is not None:
            # Fast path: a C thread answers the faults from the urgent channel; the back
            # channel stays with the main thread.
            from vmem import _native as nat

            from vmem.migration import inject
            from vmem.migration.postcopy import fault_sched_limit, native_link

            preempt = inject.apply_preempt()  # test/benchmark-only settings
            self.give_way = preempt.get("give_way", True)
            fd, mac = native_link(self.urgent)
            self.batch_pages = preempt.get("batch", push_batch_pages(fd))
            self._engine = nat.PostcopyFaultServer(fd, self.ram, self.sent.view(np.uint8), self._cursor_shared)
            limit = fault_sched_limit(self.fault_sched)
            if limit is not None:
                self._engine.set_priority_limit(limit)
            self._engine.set_cpu(self.fault_cpu)
            self._engine.set_mac(mac)  # a keyed link: the C thread checks and tags every frame
            self._engine.start()
            return
        self._thread = threading.Thread(target=self._serve_backchannel, name="vmem-pc-faultserver", daemon=True)
        self._thread.start()

    @property
    def owns_back_channel(self) -> bool:
        """A thread of ours reads the back channel (no urgent channel): nobody else may."""
        return self._thread is not None

    def _serve_backchannel(self) -> None:
        """No urgent channel: answer faults on the main stream; queue everything else; end
        after POSTCOPY_STATUS or ERROR."""
        try:
            while not self._stop.is_set():
                ctype, body = self.ctl_reader.read()
                if ctype == wire.ControlType.POSTCOPY_FAULT:
                    self._serve_fault(decode_pfn_list(body, self.npages, "POSTCOPY_FAULT"))
                    continue
                self.controls.put((ctype, body))
                if ctype == wire.ControlType.ERROR:
                    self.error = self.refused = destination_error(body)  # the pusher stops at once
                if ctype in (wire.ControlType.POSTCOPY_STATUS, wire.ControlType.ERROR):
                    return
        except BaseException as err:  # the main thread raises it from next_control
            self.error = err
            self.controls.put((None, err))

    def _serve_fault(self, pfns: np.ndarray) -> None:
        pfns = unique_pages(pfns)
        self.faults_served += len(pfns)
        # Pre-paging: the push goes on right after the newest fault (the pusher reads it).
        self._cursor_shared[0] = pfns[-1]
        self._cursor_shared[1] += 1
        for i in range(0, len(pfns), MAX_PAGES_PER_RECORD):
            chunk = pfns[i:i + MAX_PAGES_PER_RECORD]
            bufs = page_buffers(self.ram, chunk, self._fault_staging)
            with self.send_lock:
                if self.stream_ended:
                    return  # every page went out before COMPLETE: this one is in flight
                self.writer.page_data(chunk, bufs, record_type=wire.PostcopyRecordType.PAGE_DATA)
            self.sent[chunk] = True
            self.pages_demanded += len(chunk)

    def poll_backchannel(self) -> None:
        """Engine mode, between push batches: queue a control record if one is waiting."""
        if self._engine is None:
            return
        st = self._engine.stats()
        if st["error"]:
            import os

            # The destination closes its end after it sent why (ERROR on the main channel,
            # e.g. its guest's checker fired): the fault server's broken pipe is only the
            # echo of that.  Wait a moment for the reason; a dead link has none to give.
            try:
                said = self.channel is not None and self.channel.wait_readable(DESTINATION_REASON_WAIT_S)
            except (TransportError, OSError):
                said = False
            if said:
                self._raise_destination_error()
            raise MigrationError("postcopy", f"the fault server stopped: {os.strerror(st['error'])}")
        self._read_waiting_controls()

    def _read_waiting_controls(self) -> None:
        """Engine mode: queue the control records already waiting; raise the destination's ERROR."""
        while self.channel.wait_readable(0):
            ctype, body = self.ctl_reader.read()
            if ctype == wire.ControlType.ERROR:
                raise destination_error(body)
            self.controls.put((ctype, body))

    def _raise_destination_error(self) -> None:
        """A send failed: if the destination said why before it closed, raise that instead
        (else the send error stands: a broken link stays a link error, e.g. recoverable)."""
        if self.refused is not None:
            raise self.refused
        if self._engine is None:
            return
        try:
            self._read_waiting_controls()
        except (TransportError, OSError, StreamError) as err:
            drop_tracebacks(err)  # the channel keeps it (sticky): its frames would pin guest RAM
            # nothing readable from it

    def wait_for_control(self, timeout_s: float) -> float:
        """Wait up to ``timeout_s`` for the next control record (left queued); return ms waited."""
        t0 = time.monotonic()
        if self._engine is not None:
            if self.controls.empty() and self.channel.wait_readable(timeout_s):
                self.controls.put(self.ctl_reader.read())
        else:
            try:
                item = self.controls.get(timeout=timeout_s)
            except queue.Empty:
                pass
            else:
                # Put it back in front: a queue has no push-front, so rebuild it.
                rest = []
                while not self.controls.empty():
                    rest.append(self.controls.get_nowait())
                for x in [item, *rest]:
                    self.controls.put(x)
        return round((time.monotonic() - t0) * 1e3, 3)

    def next_control(self, timeout_s: float):
        """The next non-FAULT control record from the back channel (ctype, body)."""
        if self._engine is not None:
            if self.controls.empty():
                if not self.channel.wait_readable(timeout_s):
                    raise MigrationError("postcopy", f"destination sent nothing for {timeout_s:.0f} s")
                return self.ctl_reader.read()
            return self.controls.get_nowait()
        try:
            ctype, body = self.controls.get(timeout=timeout_s)
        except queue.Empty:
            raise MigrationError("postcopy", f"destination sent nothing for {timeout_s:.0f} s") from None
        if ctype is None:
            raise body
        return ctype, body

    # --- push ----------------------------------------------------------------------------------
    def _next_batch(self) -> np.ndarray | None:
        """Up to ``batch_pages`` unsent pending pages from the cursor on (wrapping); None when done."""
        p = self.pending
        n = len(p)
        if n == 0:
            return None
        start = min(self.cursor, n)
        batch = self.batch_pages
        got: list[np.ndarray] = []
        total = 0
        end_pos = start
        # Two segments, [start, n) then [0, start): every pending page is looked at once.
        for seg_a, seg_b in ((start, n), (0, start)):
            i = seg_a
            while i < seg_b and total < batch:
                j = min(i + SCAN_WINDOW, seg_b)
                window = p[i:j]
                unsent = window[~self.sent[window]]
                if len(unsent):
                    take = unsent[: batch - total]
                    got.append(take)
                    total += len(take)
                    if total >= batch:
                        j = int(np.searchsorted(p, take[-1], side="right"))
                i = j
                end_pos = j
            if total >= batch:
                break
        self.cursor = end_pos
        if not total:
            return None
        if len(got) == 1:
            return got[0]
        batch = np.concatenate(got)
        batch.sort()
        return batch

    def push(self, pending: np.ndarray) -> None:
        """Send every page of ``pending`` (sorted unique int64) not sent yet, from the cursor
        on; raise if the fault server failed."""
        self.pending = pending
        if self._staging is None or len(self._staging) != self.batch_pages:
            self._staging = np.empty((self.batch_pages, PAGE_SIZE), dtype=np.uint8)
        record = wire.PostcopyRecordType.PAGE_DATA
        owed_bytes = 0  # the last batch's bytes, not yet paid to the cap's bucket
        while True:
            if self.error is not None:
                raise self.error
            self.poll_backchannel()
            if self._cursor_shared[1] != self._cursor_seq:  # a fault was served: pre-page after it
                self._cursor_seq = int(self._cursor_shared[1])
                self.cursor = int(np.searchsorted(self.pending, self._cursor_shared[0], side="right"))
            batch = self._next_batch()
            if batch is None:
                return  # the last batch's bytes are not slept off: nothing follows them
            if owed_bytes and self._bucket is not None:
                # Paid before the next send, not after the last: the first batch goes at once
                # and the push ends with its last send, at the cap on average all the same.
                self._bucket.consume(owed_bytes)
                batch = batch[~self.sent[batch]]  # pages demanded while we waited are sent
                if not len(batch):
                    owed_bytes = 0
                    continue
            owed_bytes = 0
            if self.give_way and self._cursor_shared[2]:
                self._give_way()
            self.sent[batch] = True
            with self.send_lock:
                before = self.writer.bytes_written
                try:
                    self.writer.page_data(batch, page_buffers(self.ram, batch, self._staging), record_type=record)
                except TransportError:
                    self._raise_destination_error()  # e.g. its guest died: that is the reason
                    raise
                nbytes = self.writer.bytes_written - before
            self.pages_pushed += len(batch)
            self.bytes_pushed += nbytes
            owed_bytes = nbytes
            if self.recorder is not None:
                self.recorder.pushed(batch)
            if self.progress is not None:
                self.progress.sent(len(batch), nbytes)

    def set_push_bandwidth(self, rate_Bps: float) -> None:
        """Cap the push at ``rate_Bps`` from its next batch on (a new cap or a changed one;
        called from another thread: the push reads ``_bucket`` once a batch)."""
        if self._bucket is None:
            self._bucket = TokenBucket(rate_Bps, sleep=self._paced_sleep)
        else:
            self._bucket.set_rate(rate_Bps)

    def _paced_sleep(self, seconds: float) -> None:
        """The bucket's sleep: in slices of at most PACED_POLL_S, reading the back channel
        between them and raising at once if the fault server failed."""
        end = time.monotonic() + seconds
        while True:
            if self.error is not None:
                raise self.error
            self.poll_backchannel()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, PACED_POLL_S))

    def _give_way(self) -> None:
        """Wait (yielding the CPU) until the fault server has answered what it is answering."""
        import os

        self.push_yields += 1
        deadline = time.monotonic() + GIVE_WAY_MAX_S
        while self._cursor_shared[2] and time.monotonic() < deadline:
            os.sched_yield()

    def stop(self) -> None:
        self._stop.set()
        if self._engine is not None:
            self._engine.stop()
            st = self._engine.stats()
            from vmem import _native as nat
            from vmem.migration.postcopy import fault_cpu_stat

            self.fault_thread_priority = nat.FAULT_THREAD_PRIORITIES.get(st["priority"])
            self.fault_thread_cpu = fault_cpu_stat(st["cpu"])
            self.faults_served += st["pages_sent"]
            self.pages_demanded += st["pages_sent"]
            self._engine.close()
            self._engine = None
        if self._old_switch_s is not None:
            sys.setswitchinterval(self._old_switch_s)
            self._old_switch_s = None

    def join(self, timeout_s: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def demanded(self) -> int:
        """Pages sent in answer to faults so far (both paths)."""
        return self.pages_demanded + (self._engine.stats()["pages_sent"] if self._engine is not None else 0)

    def stats(self) -> dict:
        return {"pages_pushed_sent": self.pages_pushed, "pages_demanded_sent": self.pages_demanded,
                "fault_pages_served": self.faults_served, "push_yields": self.push_yields,
                "fault_thread_priority": self.fault_thread_priority,
                "fault_thread_cpu": self.fault_thread_cpu,
                "push_paced_s": round(self._bucket.wait_s, 6) if self._bucket is not None else 0.0}

