"""The guest process: maps its RAM, runs a workload in short steps, obeys the control block.

Run by :mod:`guests.launch` as ``python -m guests.runtime ...``; not meant to be started by
hand.  Two modes:

* ``boot``: format RAM (header + ledger), run the workload's ``setup()``, then run.
* ``incoming``: a destination guest.  It maps the (still arriving) RAM but touches nothing
  until it is told RESUME; then it validates the RAM header, restores the context blob
  from the control block and runs its first step.  Pre-spawning it while pre-copy runs
  keeps interpreter start-up out of the downtime.

All state that must survive migration is in RAM (ledger, stamped pages) or in the context
blob (runtime counters, virtual clock, the workload's RNG and pacing state).

Pausing is cooperative: the command sequence number is polled between workload steps (one
memory read), so the pause latency is at most one step, and an idle guest waits in
``select()`` on its socket, which the parent writes to after posting a command.

Owner: a guest dies with the process that started it (``PR_SET_PDEATHSIG``) until that
owner sends DETACH (an agent does, once the guest is its own: created, arrived by
migration, restored).  A detached guest keeps running when its owner goes away -- it
notices the hang-up only when it next reads its socket, and needs nothing from an owner
to run -- and a thread sleeping in ``accept()`` on its owner socket lets the next agent
take it over (:mod:`guests.owner`).  An undetached guest whose owner closes the socket
exits.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback

from guests.control import Command, ControlBlock, Field, GuestState
from vmem.pages import PAGE_SIZE

#: How long MPROT_START waits for its bitmap memfd when the command outran it on the socket.
MPROT_FD_WAIT_S = 2.0

#: Test-only: ``"STEPS:MS"`` makes an *incoming* (destination) guest sleep once, MS
#: milliseconds, right after its STEPS-th step following the resume, so tests can check that
#: a stall after the resume shows in the report's ``blackout_ms``.  Not a user option.
STALL_ENV = "VMEM_TEST_GUEST_STALL_AFTER_RESUME"
#: Test-only: an *incoming* guest exits with this status in PREPARE (the rehearsal before
#: the pause), so tests can check that the migration fails before the pause.
PREPARE_EXIT_ENV = "VMEM_TEST_GUEST_EXIT_IN_PREPARE"

#: Throttle duty-cycle period: short enough that throttled progress is smooth at the
#: resolution of a precopy round, long enough that select() wake-up cost is negligible.
THROTTLE_PERIOD_S = 0.01


class GuestRuntime:
    def __init__(self, args):
        self.args = args
        self.ctl = ControlBlock(args.ctl_fd)
        self.ctl.check()
        self.sock = socket.socket(fileno=args.sock_fd)
        self.sock.setblocking(False)
        self.pending_fds: list[int] = []
        from vmem.ram import GuestRam

        self.ram = GuestRam.open_fd(args.ram_fd)
        self.ctl[Field.PID] = os.getpid()
        self.ctl[Field.RAM_BASE] = self.ram.address
        self.uffd = -1
        self._open_uffd()
        self.mem = None
        self.workload = None
        self.mprot_map = None
        self.last_seq = self.ctl[Field.CMD_SEQ]
        # Virtual clock: runs only while RUNNING; saved in the context.
        self.vclock_base_ns = 0
        self.run_start_ns = 0
        self.running = False
        self.first_step_pending = False
        self.steps = 0
        self.pages_written_base = 0
        self.throttle = 0.0
        self.run_quota_ns = 0
        self.period_start_ns = 0
        self.throttled_ns = 0
        # Step-gap bookkeeping (MAX_GAP_NS): where the current gap started, 0 = no step yet
        # since the latest resume (the gap across a migration is measured by the migrator).
        self.gap_from_ns = 0
        self.stall_after_steps = -1   # test-only, see STALL_ENV
        self.stall_s = 0.0
        # Owner take-over (DETACH, guests/owner.py).  ``sock`` is swapped or dropped only
        # under ``owner_lock``; the take-over thread hands a proven owner over in
        # ``new_owner`` and wakes an idle main loop through ``owner_wake``.
        self.owner_lock = threading.Lock()
        self.owner_listener: socket.socket | None = None
        self.owner_token = b""
        self.new_owner: socket.socket | None = None
        self.owner_wake_r = self.owner_wake_w = -1

    # --- uffd --------------------------------------------------------------------
    def _open_uffd(self) -> None:
        """Create this process's userfaultfd and register RAM for async write-protect.

        The uffd acts on *this* mm whoever holds it, so the migrator can write-protect and
        scan our pages from outside once we send it the fd.  Failure is recorded (as
        -errno) rather than fatal: the mprotect tracker does not need it.
        """
        try:
            from vmem import _native as nat

            fd = nat.uffd_open()
            wanted = nat.UFFD_FEATURE_WP_ASYNC | nat.UFFD_FEATURE_WP_UNPOPULATED | nat.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
            try:
                granted = nat.uffd_api(fd, wanted)
            except OSError:
                # Retry asking for nothing, so that the fd at least exists (the probe names the gap).
                os.close(fd)
                fd = nat.uffd_open()
                granted = nat.uffd_api(fd, 0)
            nat.uffd_register(fd, self.ram.address, self.ram.size_bytes, nat.UFFDIO_REGISTER_MODE_WP)
            self.uffd = fd
            self.ctl[Field.UFFD_FEATURES] = granted
        except OSError as err:
            self.ctl[Field.UFFD_FEATURES] = -(err.errno or 1)
        except Exception:  # native layer missing: mprotect-only guest
            self.ctl[Field.UFFD_FEATURES] = -38  # ENOSYS

    # --- clock ---------------------------------------------------------------------
    def vclock(self) -> float:
        """Guest virtual seconds: excludes time spent paused or in flight."""
        ns = self.vclock_base_ns
        if self.running:
            ns += time.monotonic_ns() - self.run_start_ns
        return ns / 1e9

    def _start_running(self) -> None:
        now = time.monotonic_ns()
        self.run_start_ns = now
        self.period_start_ns = now
        self.running = True
        self.first_step_pending = True
        # Reset the longest step gap: it is re-measured from the first step after this resume.
        self.gap_from_ns = 0
        self.ctl[Field.MAX_GAP_NS] = 0
        self.ctl[Field.MAX_GAP_END_NS] = 0
        self.ctl[Field.RESUMED_AT_NS] = now
        self.ctl[Field.STATE] = GuestState.RUNNING

    def _stop_running(self) -> None:
        now = time.monotonic_ns()
        self.vclock_base_ns += now - self.run_start_ns
        self.running = False
        self.ctl[Field.VCLOCK_NS] = self.vclock_base_ns

    def _throttle_pause(self) -> None:
        """Steal ``throttle`` of the guest's time: sleep with its virtual clock stopped.

        The guest runs for (1 - t) * period, then sleeps t * period (interruptibly: a
        command still wakes it).  Its virtual clock does not advance while it sleeps, so a
        workload paced on ``clock()`` really does less per wall-clock second, which is what
        throttling a vCPU does to a VM (QEMU's auto-converge).
        """
        t0 = time.monotonic_ns()
        self.vclock_base_ns += t0 - self.run_start_ns
        self._wait(self.throttle * THROTTLE_PERIOD_S)
        t1 = time.monotonic_ns()
        self.run_start_ns = t1
        self.period_start_ns = t1
        self.throttled_ns += t1 - t0
        self.ctl[Field.THROTTLED_NS] = self.throttled_ns

    # --- workload --------------------------------------------------------------------
    def _make_workload(self):
        from guests.memory import GuestMemory
        from guests.workload import load_workload

        cls = load_workload(self.args.workload)
        params = json.loads(self.args.params)
        self.mem = GuestMemory(self.ram.pages)
        self.workload = cls(self.mem, self.vclock, self.args.seed, **params)

    def warm_up(self, scratch_pages: int = 4096) -> None:
        """Run a few steps of a scratch copy of the workload on scratch memory.

        A fresh interpreter pays for lazy imports and first-call set-up inside numpy on its
        first workload step (~9 ms measured for hotcold); an incoming guest does that here,
        before it is needed, so it does not land in the downtime.  Best effort: a workload
        that cannot run on small scratch memory simply skips it.
        """
        import numpy as np

        from guests.memory import GuestMemory
        from guests.workload import load_workload

        try:
            cls = load_workload(self.args.workload)
            scratch = GuestMemory(np.zeros((min(scratch_pages, self.ram.npages), PAGE_SIZE), dtype=np.uint8))
            scratch.format()
            fake_now = [0.0]
            wl = cls(scratch, lambda: fake_now[0], self.args.seed, **json.loads(self.args.params))
            wl.restore_context(wl.save_context())
            for _ in range(3):
                fake_now[0] += 0.01
                wl.step()
            wl.save_context()
            scratch.verify()
        except Exception:
            pass

    def boot(self) -> None:
        self._make_workload()
        self.mem.format()
        self.workload.setup()
        self._start_running()

    def context_blob(self) -> bytes:
        # JSON, written by hand for the three integers: this runs inside the downtime, in a
        # process that has just stopped, where json.dumps's Python layers ran cold.  The
        # workload's context is JSON already: embedded as it is, not decoded and encoded again.
        return b'{"runtime":{"vclock_ns":%d,"steps":%d,"pages_written":%d},"workload":%b}' % (
            int(self.vclock_base_ns), int(self.steps), int(self._pages_written()), self.workload.save_context())

    def restore(self, blob: bytes) -> None:
        state = json.loads(blob)
        if self.workload is None:
            self._make_workload()
        self.mem.attach()
        rt = state["runtime"]
        self.vclock_base_ns = int(rt["vclock_ns"])
        self.steps = int(rt["steps"])
        self.pages_written_base = int(rt["pages_written"])
        self.workload.restore_state(state["workload"])

    def _arm_test_stall(self) -> None:
        """Arm the test-only stall of :data:`STALL_ENV` (destination guests only)."""
        spec = os.environ.get(STALL_ENV)
        if spec:
            steps, ms = spec.split(":")
            self.stall_after_steps = self.steps + int(steps)
            self.stall_s = float(ms) / 1e3

    def _pages_written(self) -> int:
        return self.pages_written_base + (self.mem.pages_written if self.mem is not None else 0)

    # --- commands ----------------------------------------------------------------------
    def _drain_socket(self) -> bool:
        """Read wake bytes (and any fds riding on them).  False if the parent is gone."""
        if self.sock is None:
            return False
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 256, 8)
            except BlockingIOError:
                return True
            except OSError:
                return False
            self.pending_fds.extend(fds)
            if not data:
                return False

    def _wait(self, timeout_s: float) -> None:
        watched = [x for x in (self.sock, self.owner_wake_r) if x is not None and x != -1]
        try:
            readable, _, _ = select.select(watched, [], [], timeout_s)
        except InterruptedError:
            return
        if self.owner_wake_r in readable:
            try:
                os.read(self.owner_wake_r, 64)
            except BlockingIOError:
                pass
            self._adopt_new_owner()
        elif readable and self.ctl.fields[Field.CMD_SEQ] != self.last_seq:
            # A command is waiting: run it first (a RESUME ends the downtime), drain the wake
            # bytes on the next wait -- the socket stays readable until then.  Measured here:
            # the drain (recv_fds until EAGAIN) cost 50-80 us between waking and the command.
            # MPROT_START, the one command that needs fds riding on the bytes, drains itself.
            return
        elif readable and not self._drain_socket():
            if self.owner_listener is None:
                # The parent closed our socket: nobody can command us any more.
                raise SystemExit(0)
            self._owner_gone()

    # --- owner take-over (guests/owner.py) ------------------------------------------------
    def _owner_gone(self) -> None:
        """A detached guest's owner closed its socket: run on, commanded by nobody, until the
        next agent takes the guest over."""
        with self.owner_lock:
            sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
        print(f"vmem guest {os.getpid()}: its owner went away; running on, waiting to be taken over",
              file=sys.stderr, flush=True)

    def _adopt_new_owner(self) -> None:
        """Make a proven new owner's connection the command socket (main thread only)."""
        with self.owner_lock:
            new, self.new_owner = self.new_owner, None
            if new is None:
                return
            old, self.sock = self.sock, new
        if old is not None:
            old.close()

    def _has_live_owner(self) -> bool:
        from guests.owner import hung_up

        with self.owner_lock:
            current = self.new_owner or self.sock
            return not hung_up(current)

    def _proven_owner(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        with self.owner_lock:
            stale, self.new_owner = self.new_owner, conn
        if stale is not None:
            stale.close()
        try:
            os.write(self.owner_wake_w, b"o")
        except BlockingIOError:
            pass

    def _serve_owners(self) -> None:
        """The take-over thread: sleeps in accept(); one attempt at a time."""
        from guests.owner import serve_take_over

        while True:
            try:
                conn, _ = self.owner_listener.accept()
            except OSError:
                return
            if not serve_take_over(conn, self.owner_token, [self.ctl.fd, self.ram.fd], self._has_live_owner,
                                   self._proven_owner):
                conn.close()

    def _detach(self) -> int:
        """DETACH: outlive the parent and serve an owner socket at the path it names.

        The socket is bound here, by the guest, so that a connecting agent's SO_PEERCRED
        names this process (the credentials of a unix socket are its listener's).
        """
        from guests.owner import TOKEN_BYTES
        from vmem import _native as nat

        if self.owner_listener is not None:
            return -114  # EALREADY
        msg = self.ctl.read_message() or {}
        self.ctl.write_message({})  # the token does not stay in the block
        try:
            token = bytes.fromhex(str(msg.get("owner_token", "")))
        except ValueError:
            token = b""
        path = msg.get("owner_socket")
        if len(token) != TOKEN_BYTES or not isinstance(path, str) or not path:
            return -22  # EINVAL
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            old = os.umask(0o177)  # mode 0600 from the start
            try:
                listener.bind(path)
            finally:
                os.umask(old)
            listener.listen(4)
        except OSError:
            listener.close()
            raise
        nat.set_pdeathsig(0)
        self.owner_token = token
        self.owner_wake_r, self.owner_wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.owner_listener = listener
        threading.Thread(target=self._serve_owners, name="vmem-owner", daemon=True).start()
        return 0

    def handle(self, seq: int) -> None:
        if self.new_owner is not None:
            self._adopt_new_owner()
        ctl = self.ctl
        cmd = ctl[Field.CMD]
        arg = ctl[Field.ARG]
        result = 0
        try:
            if cmd == Command.PAUSE:
                if self.running:
                    self._stop_running()
                    ctl[Field.PAUSED_AT_NS] = time.monotonic_ns()
                    ctl.write_context(self.context_blob())
                    ctl[Field.STATE] = GuestState.PAUSED
            elif cmd == Command.PREPARE:
                self._rehearse()
            elif cmd == Command.RESUME:
                state = ctl.state
                if state == GuestState.INCOMING:
                    self.restore(ctl.read_context())
                    self._arm_test_stall()
                    self._start_running()
                elif state == GuestState.PAUSED:
                    self._start_running()
            elif cmd == Command.EXIT:
                ctl[Field.ACK_SEQ] = seq
                ctl[Field.STATE] = GuestState.EXITED
                self._notify_parent()
                raise SystemExit(0)
            elif cmd == Command.VERIFY:
                res = self.mem.verify()
                ctl.write_message({k: getattr(res, k) for k in ("ok", "pages_checked", "bad_pages", "first_bad", "detail")})
                result = 0 if res.ok else 1
            elif cmd == Command.MPROT_START:
                result = self._mprot_start()
            elif cmd == Command.MPROT_COLLECT:
                from vmem import _native as nat

                result = nat.mprot_collect(self.mprot_out_addr)
            elif cmd == Command.MPROT_STOP:
                result = self._mprot_stop()
            elif cmd == Command.THROTTLE:
                if not 0 <= arg <= 990_000:
                    result = -22  # EINVAL
                else:
                    self.throttle = arg / 1e6
                    self.run_quota_ns = int((1 - self.throttle) * THROTTLE_PERIOD_S * 1e9)
                    ctl[Field.THROTTLE_PPM] = arg
            elif cmd == Command.DETACH:
                result = self._detach()
            elif cmd == Command.SEND_UFFD:
                if self.uffd < 0:
                    result = ctl[Field.UFFD_FEATURES]
                else:
                    socket.send_fds(self.sock, [b"u"], [self.uffd])
            else:
                result = -22  # EINVAL
        except SystemExit:
            raise
        except OSError as err:
            result = -(err.errno or 1)
            ctl.write_message({"error": f"{Command(cmd).name if cmd in Command._value2member_map_ else cmd}: {err}"})
        except Exception as err:  # report, don't die: the parent decides
            result = -1
            ctl.write_message({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-1500:]})
        ctl[Field.RESULT] = result
        ctl[Field.ACK_SEQ] = seq
        self._notify_parent()

    def _rehearse(self) -> None:
        """PREPARE: run the code of the coming pause (encode the context) or, incoming, of
        the coming restore (decode a context and apply it to the workload) once, so that
        the real one runs warm.

        Measured: after the pre-copy's idle wait the first encode took 0.1-0.3 ms and the
        second 20 us; the downtime holds both the source guest's encode and the destination
        guest's restore.  The incoming guest's workload was built fresh and never ran, so
        applying its own context to it changes nothing; RAM is not read (it is incomplete,
        and under post-copy a read would fault).
        """
        blob = self.context_blob()
        if self.ctl.state == GuestState.INCOMING:
            state = json.loads(blob)
            self.workload.restore_state(state["workload"])
        if os.environ.get(PREPARE_EXIT_ENV) and self.ctl.state == GuestState.INCOMING:
            os._exit(int(os.environ[PREPARE_EXIT_ENV]))  # test-only: the incoming guest dies here

    def _notify_parent(self) -> None:
        """Wake a parent blocked in select() on the socket (it re-reads ACK_SEQ).

        A byte per acknowledgement lets the parent wait without spinning, which on a
        2-core host would steal the CPU the guest needs to reach its safe point.
        """
        try:
            self.sock.send(b"a")
        except (OSError, AttributeError):  # AttributeError: no owner (None)
            pass  # the parent is gone or its buffer is full of unread acks: it polls too

    def _mprot_start(self) -> int:
        import mmap as _mmap

        import numpy as np

        from vmem import _native as nat

        # The parent publishes the command (CMD_SEQ) before its sendmsg carries the memfd, and
        # a busy guest checks CMD_SEQ between steps: it can get here first.  Wait for the fd
        # (bounded): the command is only posted together with it.  (Seen once in CI: EBADF.)
        deadline = time.monotonic() + MPROT_FD_WAIT_S
        while not self.pending_fds:
            if not self._drain_socket() or time.monotonic() >= deadline:
                break
            if not self.pending_fds:
                select.select([self.sock], [], [], 0.01)
        if not self.pending_fds:
            return -9  # EBADF: the bitmap memfd did not arrive
        fd = self.pending_fds.pop(0)
        nwords = -(-self.ram.npages // 64)
        self.mprot_map = _mmap.mmap(fd, 2 * nwords * 8, flags=_mmap.MAP_SHARED)
        os.close(fd)
        arr = np.frombuffer(self.mprot_map, dtype=np.uint64)
        self.mprot_dirty_addr = arr.ctypes.data
        self.mprot_out_addr = arr[nwords:].ctypes.data
        del arr
        nat.mprot_install(self.ram.address, self.ram.npages, self.mprot_dirty_addr)
        return 0

    def _mprot_stop(self) -> int:
        from vmem import _native as nat

        if self.mprot_map is not None:
            nat.mprot_uninstall()
            try:
                self.mprot_map.close()
            except BufferError:
                pass
            self.mprot_map = None
        return 0

    # --- main loop ---------------------------------------------------------------------
    def run(self) -> None:
        ctl = self.ctl
        fields = ctl.fields
        seq_idx = int(Field.CMD_SEQ)
        pw_idx = int(Field.PAGES_WRITTEN)
        max_gap_idx = int(Field.MAX_GAP_NS)
        max_gap_end_idx = int(Field.MAX_GAP_END_NS)
        monotonic_ns = time.monotonic_ns
        mem = self.mem
        while True:
            seq = fields[seq_idx]
            if seq != self.last_seq:
                self.last_seq = seq
                self.handle(seq)
                continue
            if self.running:
                if self.steps == self.stall_after_steps:
                    time.sleep(self.stall_s)  # test-only stall (STALL_ENV), inside the next gap
                idle_s = self.workload.step()
                now = monotonic_ns()
                self.steps += 1
                fields[Field.STEPS] = self.steps
                fields[Field.LAST_STEP_NS] = now
                # The longest gap between consecutive steps since the resume: two plain
                # memory writes when it grows, nothing else (the clock read is the one above).
                if self.gap_from_ns and now - self.gap_from_ns > fields[max_gap_idx]:
                    fields[max_gap_idx] = now - self.gap_from_ns
                    fields[max_gap_end_idx] = now
                self.gap_from_ns = now
                if self.first_step_pending:
                    fields[Field.FIRST_STEP_NS] = now
                    self.first_step_pending = False
                    self._notify_parent()  # its wait_first_step() blocks on the socket
                fields[pw_idx] = self.pages_written_base + mem.pages_written
                if self.throttle and now - self.period_start_ns >= self.run_quota_ns:
                    self._throttle_pause()
                elif idle_s > 0:
                    fields[Field.VCLOCK_NS] = int(self.vclock() * 1e9)
                    self._wait(min(idle_s, 0.01))
                    # Time the workload chose to idle is not a gap the guest suffered: the
                    # next gap starts when the wait ends (a command it woke for still counts:
                    # it runs after).  One clock read per idle wait, none per busy step.
                    self.gap_from_ns = monotonic_ns()
            else:
                self._wait(0.05)


def runtime_argument_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line every guest process takes (guests/launch.py starts them with it)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--ctl-fd", type=int, required=True)
    p.add_argument("--ram-fd", type=int, required=True)
    p.add_argument("--sock-fd", type=int, required=True)
    p.add_argument("--mode", choices=["boot", "incoming"], required=True)
    p.add_argument("--workload", required=True)
    p.add_argument("--params", default="{}")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    args = runtime_argument_parser("python -m guests.runtime", __doc__.split("\n\n")[0]).parse_args(argv)
    try:
        from vmem import _native as nat

        nat.set_pdeathsig(signal.SIGKILL)  # never outlive the parent that owns us
    except Exception:
        pass
    if os.getppid() == 1:
        return 1
    rt = GuestRuntime(args)
    try:
        if args.mode == "boot":
            rt.ctl[Field.STATE] = GuestState.BOOTING
            rt.boot()
        else:
            # Build the workload now (it reads no RAM), so RESUME only restores the context:
            # interpreter start-up and workload set-up stay out of the downtime.
            rt._make_workload()
            rt.warm_up()
            rt.ctl[Field.STATE] = GuestState.INCOMING
        rt.run()
    except SystemExit:
        raise
    except BaseException as err:
        rt.ctl.write_message({"error": f"guest failed: {type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]})
        rt.ctl[Field.STATE] = GuestState.FAILED
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
