"""Spawning, commanding and reaping guest processes: the process-guest backend.

A :class:`ProcessGuest` owns one guest process and everything made for it: the RAM memfd
(mapped here too, so the migrator reads pages without copying through the guest), the
control block and the command socket.  ``close()`` reaps the process and closes every fd;
it is idempotent and safe on any path, so callers wrap guests in ``with`` or try/finally.

The guest dies with its parent (PR_SET_PDEATHSIG), so even a SIGKILLed migrator leaves no
orphan behind -- until :meth:`ProcessGuest.detach`: an agent detaches the guests it keeps,
which then outlive it, and the next agent takes them over with :meth:`ProcessGuest.take_over`
(guests/owner.py).  :func:`set_spawn_options` makes the guests a thread starts leaders of
their own session (a terminal's Ctrl-C or the agent's process group never reaches them)
with their stderr in a file.
"""
from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from guests.control import Command, ControlBlock, Field, GuestState
from vmem.errors import GuestCrashed, GuestError, GuestUnresponsive, VmemError
from vmem.ram import PAGE_SIZE, GuestRam

log = logging.getLogger("vmem.guest")

__all__ = ["ProcessGuest", "PauseInfo", "GuestSpec", "set_spawn_options"]

_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_spawn_options = threading.local()


def set_spawn_options(*, new_session: bool = False, stderr_fd: int | None = None, fork: bool = False) -> None:
    """How guests started by the *calling thread* are spawned from now on.

    Args:
        new_session: each guest leads its own session and process group (``setsid``), with
            its stdout on /dev/null (it must not hold its parent's pipes open).
        stderr_fd: the guests' stderr (None: inherited); the caller keeps it open.
        fork: start process guests (``guests.runtime``) by forking the calling process
            instead of a new interpreter: the child already holds numpy and the runtime's
            modules, so it skips the interpreter start and the imports (0.3-0.6 s measured
            here, more under load; ``scripts/bench_handshake.py``).  Only for a process that
            exists to host one migration (``python -m vmem.migration.destination`` sets it):
            the child inherits the caller's memory, so the caller must run no thread that
            holds a lock the runtime needs.  Ignored with ``new_session`` and for other
            runtimes (a KVM guest process is always a new interpreter).
    """
    _spawn_options.new_session = new_session
    _spawn_options.stderr_fd = stderr_fd
    _spawn_options.fork = fork


class _ForkedProcess:
    """A guest process forked from ours (``set_spawn_options(fork=True)``), with the parts of
    ``subprocess.Popen`` the guest uses: ``pid``, ``returncode`` (negative: killed by that
    signal), ``poll``, ``wait``, ``send_signal``, ``kill``."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:  # reaped elsewhere: the status is lost
                self.returncode = _AdoptedProcess.STATUS_UNKNOWN
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self, timeout: float | None = None) -> int:
        if self.poll() is not None:
            return self.returncode
        if timeout is not None:
            pidfd = os.pidfd_open(self.pid)
            try:
                if not select.select([pidfd], [], [], timeout)[0]:
                    raise subprocess.TimeoutExpired(f"guest {self.pid}", timeout)
            finally:
                os.close(pidfd)
        return self._reap(0)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)  # still our unreaped child: the pid cannot be recycled

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _fork_runtime(module: str, argv: list[str], keep_fds: tuple[int, ...]) -> _ForkedProcess:
    """Fork this process and run ``module.main(argv)`` in the child; the child's exit status
    is what main returns.

    In the child every descriptor but stdio and ``keep_fds`` is replaced by /dev/null (not
    closed: a Python object of the parent's that still names the number may close it later,
    and must not close a file the runtime opened meanwhile), so the guest holds none of the
    parent's sockets (a source waiting for EOF sees it when the parent dies) or memfds.
    stdin is /dev/null, as for a spawned guest.
    """
    import importlib
    import traceback

    runtime = importlib.import_module(module)  # before the fork: the child must not import
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid:
        return _ForkedProcess(pid)
    code = 1
    try:  # the child: never returns into the parent's code
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        keep = {0, 1, 2, devnull, *keep_fds}
        for name in os.listdir("/proc/self/fd"):
            if int(name) not in keep:
                try:
                    os.dup2(devnull, int(name))
                except OSError:
                    pass  # the directory's own descriptor, gone already
        code = runtime.main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code or 0)


class _AdoptedProcess:
    """A guest process that is not our child (it outlived the agent that started it), seen
    through a pidfd: signals cannot reach a recycled pid, and exiting is noticed without
    waitpid().  Its exit status is unknowable here: ``returncode`` is then ``STATUS_UNKNOWN``."""

    STATUS_UNKNOWN = 255

    def __init__(self, pid: int):
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.pidfd < 0:  # released: no longer watched
            return self.returncode
        if self.returncode is None and select.select([self.pidfd], [], [], 0)[0]:
            self.returncode = self.STATUS_UNKNOWN
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and self.pidfd >= 0:
            if not select.select([self.pidfd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(f"guest {self.pid}", timeout)
            self.returncode = self.STATUS_UNKNOWN
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


@dataclass(frozen=True)
class GuestSpec:
    """What a guest runs: enough to start an identical one at a destination."""

    workload: str = "idle"
    params: dict | None = None
    seed: int = 0

    def to_json(self) -> dict:
        return {"workload": self.workload, "params": self.params or {}, "seed": self.seed}

    @classmethod
    def from_json(cls, obj: dict) -> "GuestSpec":
        return cls(str(obj["workload"]), dict(obj.get("params") or {}), int(obj.get("seed", 0)))


@dataclass(frozen=True)
class PauseInfo:
    """Result of pausing a guest.

    Attributes:
        paused_at_ns: CLOCK_MONOTONIC when the guest stopped (its last moment of running).
        latency_ns: from posting PAUSE to the guest's acknowledgement.
        context: the context blob the guest saved at the pause.
    """

    paused_at_ns: int
    latency_ns: int
    context: bytes


class ProcessGuest:
    """A guest process and its resources.  Use :meth:`boot` or :meth:`incoming`.

    Implements :class:`vmem.migration.backend.SourceGuest`, ``IncomingGuest`` and
    ``PostcopyGuest``, and the guest sides of both dirty trackers
    (:class:`vmem.tracking.UffdWpGuest`, :class:`vmem.tracking.MprotectGuest`).
    Knows nothing of the migrator: it only answers what those protocols ask.
    """

    backend_name = "process"
    #: the module the guest process runs (``python -m``); a backend on the same control
    #: block and commands swaps it (guests/kvm: the KVM guest process)
    runtime_module = "guests.runtime"

    def __init__(self, ram: GuestRam, spec: GuestSpec, mode: str):
        self.ram = ram
        self.spec = spec
        self.ctl = ControlBlock.create()
        self._sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Non-blocking on our side: we only ever drain it after select() says so.
        self._sock.setblocking(False)
        self._uffd = -1
        self._pending_fds: list[int] = []
        self._seq = 0
        self.proc: subprocess.Popen | None = None
        #: Set by :meth:`detach`: the secret a new owner proves, and the owner socket's path.
        self.owner_token: bytes = b""
        self.owner_socket: str = ""
        try:
            fds = (self.ctl.fd, ram.fd, child_sock.fileno())
            for fd in fds:
                os.set_inheritable(fd, True)
            env = dict(os.environ)
            env.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS threads only spin here
            env["PYTHONPATH"] = _PROJECT_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            args = [
                "--ctl-fd", str(self.ctl.fd), "--ram-fd", str(ram.fd), "--sock-fd", str(child_sock.fileno()),
                "--mode", mode, "--workload", spec.workload, "--params", json.dumps(spec.params or {}),
                "--seed", str(spec.seed),
            ]
            # -P: the project root on PYTHONPATH, not the caller's working directory, says which
            # guests/ runs (a checkout in the cwd would otherwise win: `python -m` puts it first).
            cmd = [sys.executable, "-P", "-m", self.runtime_module] + args
            if (getattr(_spawn_options, "fork", False) and not getattr(_spawn_options, "new_session", False)
                    and self.runtime_module == "guests.runtime"):
                self.proc = _fork_runtime(self.runtime_module, args, fds)
            else:
                self.proc = subprocess.Popen(cmd, pass_fds=fds, close_fds=True, env=env, stdin=subprocess.DEVNULL,
                                             start_new_session=getattr(_spawn_options, "new_session", False),
                                             stdout=subprocess.DEVNULL if getattr(_spawn_options, "new_session", False) else None,
                                             stderr=getattr(_spawn_options, "stderr_fd", None))
        except BaseException:
            child_sock.close()
            self.close()
            raise
        finally:
            for fd in (self.ctl.fd, ram.fd):
                if fd >= 0:
                    os.set_inheritable(fd, False)
        child_sock.close()

    # --- construction ------------------------------------------------------------------
    @classmethod
    def boot(cls, spec: GuestSpec, size_bytes: int, *, timeout_s: float = 120.0) -> "ProcessGuest":
        """Start a new guest with fresh RAM and wait until it runs.

        Raises:
            GuestCrashed: the guest exited during boot (its message says why).
            GuestUnresponsive: it did not finish booting within ``timeout_s``.
        """
        guest = cls._spawn(GuestRam.create(size_bytes), spec, "boot", GuestState.RUNNING, timeout_s, "boot")
        guest._populate_mapping()
        return guest

    def _populate_mapping(self) -> None:
        """Map the RAM pages holding data into our page tables now (GuestRam.populate_mapping),
        while the guest runs and nothing is being timed, rather than one page fault per page
        inside the first migration's round 0.  A failure only costs that speed: logged, not
        raised (the guest is fine)."""
        try:
            self.ram.populate_mapping()
        except VmemError as err:
            log.warning("guest RAM mapping not populated ahead (its first migration reads it at a page "
                        "fault per page): %s", err)

    @classmethod
    def incoming(cls, spec: GuestSpec, npages: int, *, timeout_s: float = 60.0) -> "ProcessGuest":
        """Create fresh RAM and pre-spawn a destination guest that waits for RESUME."""
        ram = GuestRam.create(npages * PAGE_SIZE, name="vmem-ram-incoming")
        return cls._spawn(ram, spec, "incoming", GuestState.INCOMING, timeout_s, "start")

    @classmethod
    def _spawn(cls, ram: GuestRam, spec: GuestSpec, mode: str, ready: GuestState, timeout_s: float,
               what: str) -> "ProcessGuest":
        """Spawn a guest on ``ram`` (owned from here on) and wait until it reports ``ready``."""
        try:
            guest = cls(ram, spec, mode)
        except BaseException:
            ram.close()
            raise
        try:
            guest._wait_state({ready}, timeout_s, what)
        except BaseException:
            guest.close()
            raise
        return guest

    @classmethod
    def take_over(cls, socket_path: str, token: bytes, pid: int, spec: GuestSpec, *,
                  timeout_s: float = 10.0) -> "ProcessGuest":
        """Become the owner of a detached guest that outlived its agent.

        Connects to the guest's owner socket, runs the take-over of :mod:`guests.owner`
        (the peer must be process ``pid`` of our user and prove ``token``; we prove it back),
        and maps the control block and RAM it hands over.  The guest then takes commands
        from us; a command its old owner left unacknowledged is waited for (``timeout_s``).

        Raises:
            GuestError: the take-over was refused or failed (the message says why); nothing
                is held then.
        """
        from guests.owner import TakeOverRefused
        from guests.owner import take_over as prove

        guest = cls.__new__(cls)
        guest.ram = guest.ctl = guest.proc = None
        guest._uffd, guest._pending_fds, guest._seq = -1, [], 0
        guest.spec = spec
        guest.owner_token, guest.owner_socket = token, socket_path
        guest._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        fds: list[int] = []
        try:
            try:
                guest.proc = _AdoptedProcess(pid)
            except ProcessLookupError:
                raise GuestCrashed(f"guest process {pid} is gone", None) from None
            try:
                guest._sock.settimeout(timeout_s)
                guest._sock.connect(socket_path)
                fds = prove(guest._sock, token, pid, os.geteuid())
            except (OSError, TakeOverRefused) as err:
                raise GuestError(f"cannot take guest process {pid} over at {socket_path}: "
                                 f"{getattr(err, 'strerror', None) or err}") from None
            guest._sock.setblocking(False)
            ctl_fd, ram_fd = fds
            fds = []
            guest.ctl = ControlBlock(ctl_fd)
            guest.ctl.check()
            guest.ram = GuestRam.open_fd(ram_fd)
            if guest.ctl[Field.PID] != pid:
                raise GuestError(f"the control block handed over by process {pid} names pid {guest.ctl[Field.PID]}")
            guest._settle_previous_command(timeout_s)
            guest._populate_mapping()
        except BaseException:
            for fd in fds:
                os.close(fd)
            guest.release()
            raise
        return guest

    def _settle_previous_command(self, timeout_s: float) -> None:
        """Wait until the guest acknowledged the last command posted to it (by any owner)."""
        fields = self.ctl.fields
        deadline = time.monotonic() + timeout_s
        while fields[Field.ACK_SEQ] != fields[Field.CMD_SEQ]:
            if not self.alive():
                raise self._crashed("the take-over")
            if time.monotonic() > deadline:
                raise GuestUnresponsive(f"guest {self.pid} did not finish its previous owner's command within "
                                        f"{timeout_s:.0f} s")
            time.sleep(0.01)
        self._seq = fields[Field.CMD_SEQ]

    def detach(self, socket_path: str, timeout_s: float = 10.0) -> None:
        """Let the guest outlive us: it stops dying with its parent and serves a new owner
        socket at ``socket_path`` (bound by the guest, mode 0600; an old file there is
        replaced), guarded by a fresh :attr:`owner_token` that the caller records for the
        next owner.

        Raises:
            GuestError: the guest refused (its result named); nothing is left at ``socket_path``.
        """
        from guests.owner import TOKEN_BYTES

        token = secrets.token_bytes(TOKEN_BYTES)
        self.ctl.write_message({"owner_token": token.hex(), "owner_socket": socket_path})
        try:
            res = self.command(Command.DETACH, timeout_s=timeout_s)
            if res != 0:
                raise GuestError(f"guest {self.pid} refused to detach ({os.strerror(-res) if res < 0 else res})")
        except BaseException:
            try:
                os.unlink(socket_path)
            except OSError:
                pass
            raise
        self.owner_token, self.owner_socket = token, socket_path

    @property
    def detached(self) -> bool:
        return bool(self.owner_token)

    def release(self) -> None:
        """Let go of the guest without stopping it: close our socket, fds and mappings.
        A detached guest runs on and waits for its next owner.  Idempotent."""
        self._release_handles()
        if isinstance(self.proc, _AdoptedProcess):
            self.proc.close()
        elif self.proc is not None:
            self.proc.returncode = 0  # not ours to reap any more: keep Popen from warning about it

    # --- properties ----------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else -1

    @property
    def npages(self) -> int:
        return self.ram.npages

    @property
    def state(self) -> GuestState:
        return self.ctl.state

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def counters(self) -> dict:
        """Steps, pages written and timestamps as the guest last published them."""
        c = self.ctl
        return {
            "steps": c[Field.STEPS],
            "pages_written": c[Field.PAGES_WRITTEN],
            "last_step_ns": c[Field.LAST_STEP_NS],
            "first_step_ns": c[Field.FIRST_STEP_NS],
            "resumed_at_ns": c[Field.RESUMED_AT_NS],
            "vclock_s": c[Field.VCLOCK_NS] / 1e9,
            "throttled_s": c[Field.THROTTLED_NS] / 1e9,
            "max_gap_ns": c[Field.MAX_GAP_NS],
            "max_gap_end_ns": c[Field.MAX_GAP_END_NS],
        }

    # --- commands --------------------------------------------------------------------------
    def crash_error(self, what: str) -> GuestCrashed:
        """A GuestCrashed describing how the (dead) guest process ended."""
        return self._crashed(what)

    def _crashed(self, what: str) -> GuestCrashed:
        rc = self.proc.poll() if self.proc else None
        msg = self.ctl.read_message() if self.ctl._mmap is not None else None
        detail = f": {msg.get('error')}" if isinstance(msg, dict) and msg.get("error") else ""
        how = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit status {rc}"
        if isinstance(self.proc, _AdoptedProcess):
            how = "exit status unknown: it outlived the agent that started it"
        return GuestCrashed(f"guest process {self.pid} died during {what} ({how}){detail}", rc)

    def _wait_state(self, states: set, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while self.ctl.state not in states:
            if not self.alive():
                raise self._crashed(what)
            if self.ctl.state == GuestState.FAILED:
                raise self._crashed(what)
            if time.monotonic() > deadline:
                raise GuestUnresponsive(f"guest {self.pid} did not reach {'/'.join(s.name for s in states)} within {timeout_s:.0f} s during {what}")
            time.sleep(0.002)

    def post(self, cmd: Command, arg: int = 0, fds: list[int] | None = None) -> int:
        """Post a command and wake the guest; returns the sequence number to wait for."""
        if not self.alive():
            raise self._crashed(f"{cmd.name}")
        c = self.ctl
        c[Field.CMD] = int(cmd)
        c[Field.ARG] = arg
        self._seq = c[Field.CMD_SEQ] + 1
        c[Field.CMD_SEQ] = self._seq
        try:
            if fds:
                socket.send_fds(self._sock, [b"w"], fds)
            else:
                self._sock.send(b"w")
        except OSError as err:
            raise self._crashed(f"{cmd.name}") from err
        return self._seq

    def wait_ack(self, seq: int, timeout_s: float, what: str) -> int:
        """Wait for the guest to acknowledge ``seq``; returns its RESULT.

        The guest writes a byte to the socket after each acknowledgement, so this blocks
        in select() (no spinning: on a 2-core host a spinning parent would delay the very
        guest it waits for) and re-reads ACK_SEQ; fds that arrive meanwhile are kept.
        """
        fields = self.ctl.fields
        ack = int(Field.ACK_SEQ)
        deadline = time.monotonic() + timeout_s
        while fields[ack] != seq:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestUnresponsive(f"guest {self.pid} did not acknowledge {what} within {timeout_s:.1f} s")
            readable, _, _ = select.select([self._sock], [], [], min(remaining, 0.05))
            if readable and fields[ack] != seq:
                # Drained only when still waiting: an acknowledged command returns at once
                # (a PAUSE's acknowledgement ends inside the downtime, and the drain --
                # recv_fds until EAGAIN -- cost ~25 us there, cold); the bytes left are read
                # by the next wait.  fds riding on them are kept then (SEND_UFFD's caller
                # drains itself).
                self._drain_socket()
            if fields[ack] != seq and not self.alive():
                raise self._crashed(what)
        return fields[Field.RESULT]

    def _drain_socket(self) -> None:
        """Read acknowledgement bytes (and any fds riding on them) without blocking."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._sock, 4096, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # reset by a dying guest: the caller checks liveness
            self._pending_fds.extend(fds)
            if not data:
                return  # EOF: the guest is exiting; liveness is checked by the caller

    def command(self, cmd: Command, arg: int = 0, *, timeout_s: float = 30.0, fds: list[int] | None = None) -> int:
        """Post ``cmd`` and wait for its result."""
        return self.wait_ack(self.post(cmd, arg, fds), timeout_s, cmd.name)

    def pause(self, timeout_s: float = 10.0) -> PauseInfo:
        """Stop the guest at its next safe point and take its context.

        Guarantees: when this returns, the guest runs no workload step until RESUME, and
        RAM is exactly as the guest left it at ``paused_at_ns``.
        """
        t0 = time.monotonic_ns()
        self.command(Command.PAUSE, timeout_s=timeout_s)
        t1 = time.monotonic_ns()
        if self.ctl.state != GuestState.PAUSED:
            raise GuestError(f"guest {self.pid} did not pause (state {self.ctl.state.name})")
        return PauseInfo(self.ctl[Field.PAUSED_AT_NS], t1 - t0, self.ctl.read_context())

    def prepare(self, timeout_s: float = 10.0) -> bool:
        """Tell the guest a pause (or, incoming, a resume) follows soon: it rehearses that
        path once (guests/runtime.py ``_rehearse``).  False if its runtime does not know the
        command; raises as :meth:`command` does if the guest dies or does not answer."""
        return self.command(Command.PREPARE, timeout_s=timeout_s) >= 0

    def resume(self, context: bytes | None = None, timeout_s: float = 30.0) -> None:
        """Resume a paused guest, or start an incoming one from ``context``."""
        if context is not None:
            self.ctl.write_context(context)
        res = self.command(Command.RESUME, timeout_s=timeout_s)
        if res != 0 or self.ctl.state != GuestState.RUNNING:
            msg = self.ctl.read_message()
            raise GuestError(f"guest {self.pid} failed to resume (result {res}): {msg}")

    def wait_first_step(self, timeout_s: float = 10.0) -> int:
        """Wait until the resumed guest has completed a step; returns that CLOCK_MONOTONIC ns.

        The guest writes a byte to the socket after its first step (as after an
        acknowledgement), so this blocks in select() instead of polling: the first step of
        a post-copy guest is a chain of faults across both CPUs, and a poller waking every
        100 us took CPU from it.
        """
        fields = self.ctl.fields
        first = int(Field.FIRST_STEP_NS)
        deadline = time.monotonic() + timeout_s
        resumed = fields[Field.RESUMED_AT_NS]
        while fields[first] < resumed:
            if not self.alive():
                raise self._crashed("first step")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestUnresponsive(f"guest {self.pid} ran no step within {timeout_s:.0f} s of resuming")
            readable, _, _ = select.select([self._sock], [], [], min(remaining, 0.05))
            if readable:
                self._drain_socket()
        return fields[first]

    def verify(self, timeout_s: float = 600.0) -> dict:
        """Ask the guest to check all of its RAM against its own ledger (it pauses its workload meanwhile)."""
        self.command(Command.VERIFY, timeout_s=timeout_s)
        msg = self.ctl.read_message() or {}
        if "ok" not in msg:
            raise GuestError(f"guest {self.pid} could not verify: {msg.get('error', msg)}")
        return msg

    def _release_handles(self) -> None:
        """Close what this object holds of the guest (uffd, received fds, socket, control
        block, RAM mapping); the process itself is the caller's business.  Idempotent."""
        if self._uffd >= 0:
            os.close(self._uffd)
            self._uffd = -1
        for fd in self._pending_fds:
            os.close(fd)
        self._pending_fds.clear()
        if self._sock is not None:
            self._sock.close()
        if self.ctl is not None:
            self.ctl.close()
        if self.ram is not None:
            self.ram.close()

    def verify_running(self) -> dict:
        """Check all of the guest's RAM against its ledger from this process, without
        stopping the guest (``GuestMemory.verify_concurrent`` through our own mapping).

        The lab's check after a migration: the guest keeps stepping meanwhile, so nothing
        the lab does shows up as a stall in the measured guest.  Returns the same keys as
        :meth:`verify` plus ``unproven_pages`` and ``method``.  A guest that dies during
        the check raises GuestCrashed (its RAM stays readable, the verdict would mislead).
        """
        try:
            mem = self._ledger_memory()
        except GuestError as err:
            return {"ok": False, "pages_checked": 0, "bad_pages": 1, "first_bad": [0], "detail": str(err),
                    "unproven_pages": 0, "method": "outside"}
        res = mem.verify_concurrent()
        if not self.alive():
            raise self._crashed("the ledger check")
        out = {k: getattr(res, k) for k in ("ok", "pages_checked", "bad_pages", "first_bad", "detail", "unproven_pages")}
        out["method"] = "outside"
        return out

    def _ledger_memory(self):
        """The ledger view of the RAM that :meth:`verify_running` checks (a backend whose RAM
        holds more than the ledger layout narrows it)."""
        from guests.memory import GuestMemory

        return GuestMemory(self.ram.pages).attach()

    def set_throttle(self, fraction: float) -> None:
        """Steal ``fraction`` (0..0.99) of the guest's time, slowing its progress (auto-converge).

        Raises:
            ValueError: fraction out of range.  GuestError: the guest refused it.
        """
        if not 0.0 <= fraction <= 0.99:
            raise ValueError(f"throttle must be in [0, 0.99], got {fraction}")
        res = self.command(Command.THROTTLE, int(round(fraction * 1e6)))
        if res != 0:
            raise GuestError(f"guest {self.pid} refused throttle {fraction} ({res})")

    @property
    def throttle(self) -> float:
        return self.ctl[Field.THROTTLE_PPM] / 1e6

    def uffd(self) -> int:
        """The guest's userfaultfd (received once over SCM_RIGHTS, owned by this object).

        Raises:
            GuestError: the guest has no uffd (the result names the errno).
        """
        if self._uffd >= 0:
            return self._uffd
        res = self.command(Command.SEND_UFFD)
        if res < 0:
            raise GuestError(f"guest {self.pid} has no userfaultfd ({os.strerror(-res)})")
        # The fd message precedes the acknowledgement byte: read it (wait_ack returns as soon
        # as ACK_SEQ says so, and leaves the socket to the next reader).
        self._drain_socket()
        if not self._pending_fds:
            raise GuestError(f"guest {self.pid} acknowledged SEND_UFFD but sent no fd")
        fds = [self._pending_fds.pop(0)]
        self._uffd = fds[0]
        return self._uffd

    @property
    def uffd_features(self) -> int:
        """Features the guest's UFFDIO_API granted, or -errno when it has no uffd."""
        return self.ctl[Field.UFFD_FEATURES]

    @property
    def ram_base(self) -> int:
        """Address of RAM inside the guest process."""
        return self.ctl[Field.RAM_BASE]

    # --- mprotect dirty tracking (vmem.tracking.MprotectGuest) ---------------------------
    def mprotect_start(self, bitmap_fd: int) -> int:
        """Have the guest map ``bitmap_fd``, install its SIGSEGV handler and write-protect
        RAM; returns its result (>= 0, or -errno)."""
        return self.command(Command.MPROT_START, fds=[bitmap_fd])

    def mprotect_collect(self) -> int:
        """Have the guest harvest its dirty bits and re-protect those pages; its result."""
        return self.command(Command.MPROT_COLLECT)

    def mprotect_stop(self, timeout_s: float = 10.0) -> int:
        """Have the guest unprotect RAM and remove its handler; its result."""
        return self.command(Command.MPROT_STOP, timeout_s=timeout_s)

    # --- teardown ----------------------------------------------------------------------------
    def exit(self, timeout_s: float = 5.0) -> int | None:
        """Ask the guest to exit cleanly, then reap it (killing it if it does not comply)."""
        if self.alive():
            try:
                self.post(Command.EXIT)
                self.proc.wait(timeout_s)
            except (GuestError, subprocess.TimeoutExpired, OSError):
                pass
        return self.close()

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)

    def close(self) -> int | None:
        """Kill (if still running) and reap the process; close every fd and mapping.  Idempotent."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            try:
                rc = self.proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a D-state process
                rc = None
        self._release_handles()
        if isinstance(self.proc, _AdoptedProcess):
            self.proc.close()
            rc = None  # not our child: its exit status is unknowable here
        return rc

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
