"""The host agent: one long-running process per host that owns guests and migrates them.

``vmem agent --listen ADDR:PORT`` runs :class:`Agent` in the foreground (logs to stderr).
It listens on

* a **TCP port** for other agents: incoming migrations, and remote commands from peers
  that authenticated with the key or a certificate (:mod:`vmem.agent.security`); an agent
  without key or TLS takes no command over TCP;
* a **unix control socket** (mode 0600 in a 0700 directory, see :mod:`vmem.agent.paths`)
  for the local CLI; a connecting process must also run as the agent's user or root
  (``SO_PEERCRED``).

Every connection is admitted against caps per peer and in total, must finish its opening
within one deadline, and is closed when idle (:mod:`vmem.agent.limits`, docs/security.md).

Guarantees:
    * Every connection is served in its own thread; a bad peer, a refused request or a
      failed migration is logged with its reason and never stops the agent.
    * Guests outlive the agent.  Each guest the agent keeps (created, arrived by migration,
      restored) leads its own session and is *detached* (it no longer dies with its parent)
      and recorded in ``<state-dir>/guests/`` (:mod:`vmem.agent.records`).  On SIGTERM/SIGINT
      the agent stops accepting, breaks in-flight connections (an outgoing migration fails
      by the usual rules: before the switch its source guest resumes; an incoming one is
      discarded), lets go of its guests without stopping them (``--stop-guests``: stops
      them, as before), removes its socket and exits.  Killed outright, it leaves its kept
      guests running too; only guests still being created or received die with it
      (PR_SET_PDEATHSIG).
    * On start, before it serves (``agent.json`` appears), the agent takes over every
      recorded guest that is still alive (same pid and start time, our uid, proves the
      recorded token: :mod:`guests.owner`) and lists the others as ``lost`` with the reason.
"""
from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import struct
import threading
from dataclasses import dataclass, field

from transport import SocketChannel, TransportError

from vmem import __version__
from vmem.errors import VmemError
from vmem.wakepipe import WakePipe
from vmem.agent.commands import COMMANDS, LOCAL_ONLY_COMMANDS
from vmem.agent.heap import MemoryWatch, collect_cycles, freeze_startup_objects, release_free_memory, tune_malloc
from vmem.agent.limits import Admission, ConnectionCaps, DeadlineWatch, LogLimiter
from vmem.agent.paths import info_path, prepare_state_dir, socket_path
from vmem.agent.protocol import (MAGIC, AgentError, ErrorCode, ProtocolError, client_hello, recv_frame, send_error,
                                 send_refusal, send_reply, server_hello)
from vmem.agent.registry import GuestRegistry
from vmem.agent.security import PeerSecurity
from vmem.agent.spawner import Spawner

__all__ = ["AgentConfig", "Agent"]

log = logging.getLogger("vmem.agent")

#: A peer must finish authentication and the opening within this time (the default of
#: ``ConnectionCaps.handshake_timeout_s``; also each receive's timeout in an outgoing opening).
HANDSHAKE_TIMEOUT_S = ConnectionCaps.handshake_timeout_s
#: How often the accept loop looks for openings past their deadline.
DEADLINE_CHECK_INTERVAL_S = 0.25


@dataclass
class AgentConfig:
    """What ``vmem agent`` was asked for.

    Attributes:
        listen_host, listen_port: TCP address for other agents (port 0: the kernel picks one).
        security: how peers authenticate.
        state_dir: holds the control socket; None: the default for the port.
        guest_exit_timeout_s: how long destroy/shutdown waits for a guest to exit before SIGKILL.
        connect_timeout_s: how long an outgoing connection may take to establish.
        caps: connection limits, the opening deadline and the idle timeout.
    """

    listen_host: str = "127.0.0.1"
    listen_port: int = 8002
    security: PeerSecurity | None = None
    state_dir: str | None = None
    guest_exit_timeout_s: float = 5.0
    connect_timeout_s: float = 10.0
    caps: ConnectionCaps = field(default_factory=ConnectionCaps)
    #: stop every guest at shutdown (the behaviour before guests outlived agents)
    stop_guests: bool = False


class Agent:
    """The agent: sockets, connection threads, the guest registry and the spawner."""

    def __init__(self, config: AgentConfig):
        self.config = config
        self.security = config.security or PeerSecurity()
        self.registry = GuestRegistry()
        #: outgoing migrations in progress: guest name -> {"migration", "progress", "target"}
        #: (vmem.agent.migration.migrate_out; read by jobinfo / migrate-setmaxdowntime)
        self.jobs: dict = {}
        self.spawner: Spawner | None = None
        self._tcp: socket.socket | None = None
        self._unix: socket.socket | None = None
        self._wake = WakePipe()  # request_stop() wakes serve_forever()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._channels: set = set()        # live connections (accepted and made), to break on shutdown
        self._threads: set[threading.Thread] = set()
        self._saved_factory = None
        self.admission = Admission(config.caps)
        self.deadlines = DeadlineWatch()
        self._refusal_log = LogLimiter()
        self._closed_since_trim = False      # a connection closed since memory was last handed back
        self._memwatch = MemoryWatch.from_env()  # VMEM_AGENT_MEMWATCH: a debugging aid (vmem.agent.heap)
        self._conn = threading.local()        # the serving thread's connection: peer, deadline token
        self._expected = threading.local()    # the migrate-in / restore a spawn must match (expect_guest)
        from vmem.agent.migration import PendingLinks

        self.pending_links = PendingLinks()   # incoming migrations waiting for their extra connections
        self.resume_waiters: dict = {}        # incoming post-copies waiting for their source to resume them
        self.resume_lock = threading.Lock()
        self.state_dir = ""
        self.control_socket = ""
        self.listen_address = ""
        self._guest_log_fd = -1

    # --- lifetime ------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind both sockets, start the spawner, write ``agent.json``.

        Raises:
            AgentError: the port or the state directory is unusable, or another agent
                already serves that control socket.
        """
        from vmem.agent.net import listen_tcp
        from vmem.agent.paths import default_state_dir

        try:
            self._tcp = listen_tcp(self.config.listen_host, self.config.listen_port)
        except (OSError, TransportError) as err:
            raise AgentError(ErrorCode.BAD_REQUEST, f"cannot listen on {self.config.listen_host}:{self.config.listen_port}: "
                                                    f"{getattr(err, 'strerror', None) or err}") from None
        from vmem.agent.net import format_hostport

        port = self._tcp.getsockname()[1]
        self.listen_address = format_hostport(self.config.listen_host, port)
        self.state_dir = self.config.state_dir or default_state_dir(port)
        prepare_state_dir(self.state_dir)
        self.control_socket = socket_path(self.state_dir)
        self._unix = _bind_control_socket(self.control_socket)
        self.spawner = Spawner()
        self._install_incoming_factory()
        self._prepare_guests()
        self.take_over_guests()
        info = {"pid": os.getpid(), "listen": self.listen_address, "port": port, "socket": self.control_socket,
                "security": self.security.mode, "version": __version__}
        tmp = info_path(self.state_dir) + ".tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(info, f)
        os.replace(tmp, info_path(self.state_dir))
        log.info("vmem agent %s listening on %s (security: %s), control socket %s",
                 __version__, self.listen_address, self.security.mode, self.control_socket)
        if self.security.mode == "none":
            log.warning("no authentication: any process that can reach %s may command this agent and send it guests",
                        self.listen_address)

    def _install_incoming_factory(self) -> None:
        # The destination spawns its incoming guest through vmem.migration.backend's factory table;
        # in the agent that spawn must happen on the spawner thread (PR_SET_PDEATHSIG is
        # per thread).  This process is the agent's own, so patching its table is local.
        from vmem.migration import backend

        self._saved_factory = dict(backend.INCOMING_FACTORIES)
        for name, factory in self._saved_factory.items():
            backend.INCOMING_FACTORIES[name] = self._checked_spawn(self.spawner.wrap(factory))

    def _checked_spawn(self, spawn):
        def checked_spawn(spec_json, npages):
            # Runs on the calling (migration / restore) thread, before the spawner forks.
            expected = getattr(self._expected, "guest", None)
            if expected is not None:
                _check_expected_guest(expected, spec_json, npages)
            return spawn(spec_json, npages)

        return checked_spawn

    # --- guests that outlive the agent (vmem.agent.records, guests.owner) ---------------------------
    def _prepare_guests(self) -> None:
        """Guests spawned from now on lead their own session, with stderr in guests.log."""
        from guests.launch import set_spawn_options
        from vmem.agent.records import guest_log_path, prepare_guests_dir

        prepare_guests_dir(self.state_dir)
        self._guest_log_fd = os.open(guest_log_path(self.state_dir), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                                     0o600)
        self.spawner.call(set_spawn_options, new_session=True, stderr_fd=self._guest_log_fd)
        self.registry.on_change = self._record_change

    def own_guest(self, name: str, guest) -> None:
        """Detach ``guest`` (about to be listed ``running`` as ``name``) so that it outlives
        this agent; the registry change that follows records it.  A guest that cannot be
        detached still runs, logged as one that will die with this agent."""
        from vmem.agent.records import owner_socket_path

        try:
            guest.detach(owner_socket_path(self.state_dir, name))
        except (VmemError, OSError) as err:
            log.error("guest %s (pid %d) will not outlive this agent: %s", name, guest.pid, err)

    def _record_change(self, entry, removed: bool) -> None:
        """Registry hook (under its lock): keep ``guests/NAME.json`` in step with the entry."""
        from vmem.agent.records import process_start_ticks, remove_record, write_record

        try:
            if removed:
                remove_record(self.state_dir, entry.name)
                return
            g = entry.guest
            if g is None or not getattr(g, "detached", False) or entry.state == "lost":
                return
            if getattr(g, "start_ticks", None) is None:
                g.start_ticks = process_start_ticks(g.pid)
            write_record(self.state_dir, {
                "name": entry.name, "pid": g.pid, "start_ticks": g.start_ticks, "uid": os.geteuid(),
                "token": g.owner_token.hex(), "size_bytes": entry.size_bytes, "spec": entry.spec,
                "origin": entry.origin, "state": entry.state})
        except (OSError, ProcessLookupError) as err:
            log.error("cannot record guest %s in %s: %s (a restarted agent will not find it)", entry.name,
                      self.state_dir, err)

    def take_over_guests(self) -> None:
        """Take over every guest recorded in the state directory (see the module docstring).

        A guest found paused by a migration its agent never finished stays ``paused`` if the
        record says the migration had switched (post-copy) or the outcome is unknown (the
        agent died during stop-and-copy: the destination may run it); a running one simply
        runs on -- the migration failed before its switch and the source keeps the guest.
        """
        from guests.control import GuestState
        from guests.launch import GuestSpec, ProcessGuest
        from vmem.agent.records import owner_socket_path, read_records, record_matches_process
        from vmem.agent.registry import GuestEntry

        for name, record, why in read_records(self.state_dir):
            if record is None:
                log.warning("guest record %s: %s", name, why)
                continue
            pid = record["pid"]
            common = dict(size_bytes=int(record.get("size_bytes", 0)), spec=dict(record.get("spec") or {}),
                          origin=str(record.get("origin", "")))
            if not record_matches_process(record):
                reason = f"its process (pid {pid}) ended while no agent owned it"
                log.warning("guest %s was lost: %s", name, reason)
                self.registry.adopt(GuestEntry(name, "lost", reason=reason, **common))
                continue
            cls = ProcessGuest
            if common["spec"].get("backend") == "kvm":
                from guests.kvm import KvmGuest as cls
            try:
                guest = cls.take_over(owner_socket_path(self.state_dir, name), bytes.fromhex(record["token"]),
                                               pid, GuestSpec.from_json(common["spec"]))
            except VmemError as err:
                reason = f"alive (pid {pid}) but not taken over: {err}"
                log.warning("guest %s: %s", name, reason)
                self.registry.adopt(GuestEntry(name, "lost", reason=reason, **common))
                continue
            guest.start_ticks = record["start_ticks"]
            state = "running"
            try:
                guest.mprotect_stop()  # a tracker left by a migration that never finished (none: a no-op)
                if guest.state == GuestState.PAUSED:
                    state = "paused"
                    log.warning("guest %s (pid %d) was left paused by a migration its agent did not finish (%s): it "
                                "stays paused here; if the destination does not run it, `vmem migrate --resume` "
                                "cannot help -- destroy it or keep it", name, pid, record.get("state"))
            except VmemError as err:
                log.warning("guest %s (pid %d): %s", name, pid, err)
            self.registry.adopt(GuestEntry(name, state, guest=guest, **common))
            self._record_change(self.registry.get(name), False)
            log.info("took over guest %s (pid %d, %s), left by an earlier agent", name, pid, state)

    def expect_guest(self, size_bytes: int | None, spec: dict | None, what: str) -> None:
        """The next guest this thread spawns must have ``size_bytes`` of RAM and ``spec``
        (what was reserved for it); anything else is refused before the spawn.  ``None``
        clears it."""
        self._expected.guest = None if size_bytes is None else (size_bytes, spec, what)

    def info(self) -> dict:
        return {"pid": os.getpid(), "listen": self.listen_address, "security": self.security.mode,
                "version": __version__, "hostname": socket.gethostname(), "free_bytes": self.registry.free_bytes(),
                "guests": len(self.registry.entries()), "connections": self.admission.counts()}

    def request_stop(self, *_signal_args) -> None:
        """Ask :meth:`serve_forever` to return (safe from a signal handler or any thread)."""
        self._stopping.set()
        self._wake.wake()

    def serve_forever(self) -> None:
        """Accept connections until :meth:`request_stop`; each is served in its own thread."""
        sel = selectors.DefaultSelector()
        sel.register(self._tcp, selectors.EVENT_READ, "tcp")
        sel.register(self._unix, selectors.EVENT_READ, "unix")
        sel.register(self._wake, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select(DEADLINE_CHECK_INTERVAL_S):
                    if key.data == "tcp":
                        self._accept_tcp()
                    elif key.data == "unix":
                        self._accept_unix()
                for who in self.deadlines.expire():
                    self.log_refusal("dropped %s: its opening took longer than %g s", who,
                                     self.config.caps.handshake_timeout_s)
                if self._closed_since_trim and self.admission.counts()["open"] == 0:
                    self._closed_since_trim = False
                    self._reclaim_memory()
        finally:
            sel.close()

    def _reclaim_memory(self) -> None:
        """No connection is left: free what cycles still hold and hand free heap back to the
        kernel (vmem.agent.heap); ``VMEM_AGENT_MEMWATCH`` logs the figures."""
        watch = self._memwatch
        dump = watch is not None and watch.due()
        collected = collect_cycles(describe=dump)
        release_free_memory()
        if dump:
            watch.dump(collected)

    def shutdown(self) -> None:
        """Stop everything (see the module docstring); bounded; idempotent."""
        self._stopping.set()
        for s in (self._tcp, self._unix):
            if s is not None:
                s.close()
        self._tcp = self._unix = None
        for path in (self.control_socket, info_path(self.state_dir) if self.state_dir else ""):
            if path:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        with self._lock:
            channels = list(self._channels)
            threads = list(self._threads)
        for ch in channels:
            ch.shutdown()  # wake the thread blocked in it; the thread that owns it closes it
        for t in threads:
            t.join(self.config.guest_exit_timeout_s + 5)
        keep = not self.config.stop_guests
        for entry in self.registry.entries():
            if keep and entry.guest is not None and getattr(entry.guest, "detached", False) and entry.guest.alive():
                log.info("leaving guest %s (pid %d) %s for the next agent", entry.name, entry.guest.pid, entry.state)
                entry.guest.release()
                continue
            if keep and entry.state == "lost":
                continue
            if entry.guest is not None:
                log.info("stopping guest %s (pid %d) with the agent", entry.name, entry.guest.pid)
                try:
                    entry.guest.exit(timeout_s=self.config.guest_exit_timeout_s)
                except Exception as err:  # keep reaping the others
                    log.warning("guest %s: %s", entry.name, err)
                    entry.guest.close()
            self.registry.remove(entry.name)
        if self._saved_factory is not None:
            from vmem.migration import backend

            backend.INCOMING_FACTORIES.update(self._saved_factory)
            self._saved_factory = None
        if self.spawner is not None:
            self.spawner.stop()
        if self._guest_log_fd >= 0:
            os.close(self._guest_log_fd)
            self._guest_log_fd = -1
        self._wake.close()
        log.info("vmem agent stopped")

    # --- bookkeeping for shutdown ----------------------------------------------------------------
    def forget_channel(self, ch) -> None:
        with self._lock:
            self._channels.discard(ch)

    def _spawn_thread(self, target, *args, name: str) -> None:
        def run():
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        t = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:
            self._threads.add(t)
        t.start()

    # --- outgoing ---------------------------------------------------------------------------------
    def connect_peer(self, host: str, port: int, purpose: str):
        """Connect to the agent at ``host:port``, authenticate for ``purpose`` and open.

        Returns the secured channel (registered for shutdown; the caller closes it and
        calls :meth:`forget_channel`).

        Raises:
            AgentError(unreachable | auth | protocol | version): with the peer's address.
        """
        from vmem.agent.net import connect_tcp

        who = f"agent at {host}:{port}"
        try:
            raw = connect_tcp(host, port, timeout_s=self.config.connect_timeout_s)
        except (TransportError, OSError) as err:
            raise AgentError(ErrorCode.UNREACHABLE, f"cannot reach the {who}: {err} (is `vmem agent` running there, "
                                                    "and is the port open?)") from None
        with self._lock:
            self._channels.add(raw)
        channel = raw
        try:
            raw.settimeout(HANDSHAKE_TIMEOUT_S)
            try:
                channel = self.security.connect(raw, purpose, host)
            except TransportError as err:
                refusal = _read_refusal(raw, err)
                if refusal is not None:
                    raise AgentError(str(refusal.get("code", ErrorCode.FAILED)),
                                     f"the {who} refused the connection: {refusal.get('error')}") from None
                raise AgentError(ErrorCode.AUTH, f"the {who} refused our authentication ({self.security.mode}): {err} "
                                                 "(both agents need the same --key file / a certificate from the same CA)") from None
            try:
                client_hello(channel, purpose, who)
            except TransportError as err:
                raise AgentError(ErrorCode.PROTOCOL, f"the {who} closed the connection during the opening: {err} "
                                                     f"(does it use the same security mode, {self.security.mode}?)") from None
            channel.settimeout(None)  # `raw` may be consumed (TLS): set it on what wraps it
        except BaseException:
            self.forget_channel(raw)
            channel.close()
            raw.close()
            raise
        with self._lock:
            self._channels.discard(raw)
            self._channels.add(channel)
        return channel

    # --- incoming ---------------------------------------------------------------------------------
    def _accept_tcp(self) -> None:
        from vmem.agent.net import accept_channel

        try:
            channel, addr = accept_channel(self._tcp, timeout_s=1.0)
        except (OSError, TransportError) as err:
            log.warning("accept failed: %s", err)
            return
        peer = f"{addr[0]}:{addr[1]}"
        self._admit(channel, addr[0], peer, self._serve_tcp, f"vmem-peer-{peer}")

    def _accept_unix(self) -> None:
        try:
            sock, _ = self._unix.accept()
        except OSError as err:
            log.warning("accept on the control socket failed: %s", err)
            return
        channel = SocketChannel(sock)
        try:
            uid = _peer_uid(sock)
        except OSError as err:
            log.warning("refused a control connection: cannot tell who it is (SO_PEERCRED: %s)", err)
            channel.close()
            return
        if uid not in (0, os.geteuid()):
            why = (f"uid {uid} may not command this agent: only its own user (uid {os.geteuid()}) or root may; "
                   "run vmem as that user")
            self.log_refusal("refused a control connection: %s", why)
            _refuse(channel, ErrorCode.AUTH, why)
            return
        self._admit(channel, f"uid {uid}", f"local uid {uid}", self._serve_unix, "vmem-cli")

    def _admit(self, channel, peer_key: str, who: str, serve, thread_name: str) -> None:
        """Count ``channel`` against the caps (refuse it at once over one), start its
        opening deadline, and serve it on its own thread."""
        why = self.admission.admit(peer_key)
        if why:
            self.log_refusal("refused a connection from %s: %s", who, why)
            _refuse(channel, ErrorCode.LIMIT, f"refused: {why}")
            return
        token = self.deadlines.watch(channel.sock, self.config.caps.handshake_timeout_s, who)
        with self._lock:
            self._channels.add(channel)
        self._spawn_thread(self._serve_admitted, serve, channel, peer_key, who, token, name=thread_name)

    def _serve_admitted(self, serve, channel, peer_key: str, who: str, token: int) -> None:
        conn = self._conn
        conn.peer_key, conn.token, conn.opening, conn.reclaim = peer_key, token, True, False
        try:
            serve(channel, who)
        finally:
            in_opening = conn.opening
            conn.opening = False
            self.deadlines.done(token)
            self.admission.closed(peer_key, in_opening=in_opening)
            if conn.reclaim:
                # A migration (or save/restore) ran on this connection: its buffers hang on
                # reference cycles until collected (vmem.agent.heap.collect_cycles).  Here,
                # after its reply, so that a busy agent that never falls idle frees them too.
                conn.reclaim = False
                collect_cycles()
            self._closed_since_trim = True

    def log_refusal(self, message: str, *args) -> None:
        """Log a refused or dropped connection, at most a few a second (a flood must not
        fill the disk); the next line says how many were left out."""
        allowed, suppressed = self._refusal_log.allow()
        if allowed:
            if suppressed:
                message += " (and %d more refusals not logged)"
                args = (*args, suppressed)
            log.warning(message, *args)

    def opening_done(self) -> None:
        """The serving thread's connection finished its opening: stop its deadline clock and
        count it as established (idempotent; a no-op outside a serving thread)."""
        conn = self._conn
        if getattr(conn, "opening", False):
            conn.opening = False
            self.deadlines.done(conn.token)
            self.admission.opened(conn.peer_key)

    @property
    def idle_timeout_s(self) -> float:
        return self.config.caps.idle_timeout_s

    def _serve_tcp(self, raw, peer: str) -> None:
        channel = raw
        try:
            raw.settimeout(self.config.caps.handshake_timeout_s)
            if self.security.mode == "none":
                why = _unauthenticated_peer_refusal(raw.sock)
                if why:
                    self.log_refusal("refused connection from %s: %s", peer, why)
                    _refuse(raw, ErrorCode.AUTH, why)
                    return
            try:
                channel, auth_purpose = self.security.accept(raw)
            except (TransportError, OSError) as err:
                self.log_refusal("refused connection from %s: authentication failed (%s): %s", peer, self.security.mode, err)
                return
            # Commands over TCP only from a peer that proved who it is (key or certificate).
            refusals = {"command": NO_TCP_COMMANDS} if self.security.mode == "none" else None
            try:
                purpose = server_hello(channel, self.info(), refusals=refusals)
            except ProtocolError as err:
                self.log_refusal("refused connection from %s: %s", peer, err)
                return
            if auth_purpose is not None and purpose != auth_purpose:
                log.warning("refused connection from %s: authenticated for %r but opened for %r", peer, auth_purpose, purpose)
                send_error(channel, ErrorCode.AUTH, f"authenticated for {auth_purpose!r}, not {purpose!r}")
                return
            # The rest of the opening (a migration connection's first request) is bounded by
            # the deadline watch, not by a receive timeout.
            channel.settimeout(None)  # `raw` may be consumed (TLS): set it on what wraps it
            with self._lock:
                self._channels.discard(raw)
                self._channels.add(channel)
            if purpose == "migrate-in":
                from vmem.agent.migration import serve_incoming

                self._conn.reclaim = True
                serve_incoming(self, channel, peer)
            elif purpose in ("vmem-data", "vmem-urgent"):
                from vmem.agent.migration import serve_attach

                if serve_attach(self, channel, purpose, peer):
                    raw = channel = None  # the migration owns it now (and closes it)
            else:
                self.opening_done()
                self._command_loop(channel, peer, local=False)
        except (TransportError, OSError) as err:
            if getattr(self._conn, "opening", False):  # a peer that never finished its opening: a flood's kind
                self.log_refusal("connection from %s ended in its opening: %s", peer, err)
            else:
                log.warning("connection from %s ended: %s", peer, err)
        except Exception:
            log.exception("connection from %s: internal error", peer)
        finally:
            for ch in {raw, channel} - {None}:
                self.forget_channel(ch)
                ch.close()

    def _serve_unix(self, channel, who: str) -> None:
        try:
            channel.settimeout(self.config.caps.handshake_timeout_s)
            try:
                # Established before the client hears so: its next connection is counted
                # against the established cap, not the opening one.
                server_hello(channel, self.info(), allowed_purposes=("command",), accepted=self.opening_done)
            except ProtocolError as err:
                log.warning("refused a control connection: %s", err)
                return
            self._command_loop(channel, who, local=True)
        except (TransportError, OSError) as err:
            log.info("control connection ended: %s", err)
        except Exception:
            log.exception("control connection: internal error")
        finally:
            self.forget_channel(channel)
            channel.close()

    def _command_loop(self, channel, peer: str, *, local: bool) -> None:
        """Serve requests until the peer closes or stays idle for ``idle_timeout_s``; each
        request gets exactly one reply.  ``local``: the control socket (its caller passed the
        uid check), the only place file commands are taken from."""
        from transport import ChannelBrokenError, ChannelTimeout

        while not self._stopping.is_set():
            channel.settimeout(self.idle_timeout_s)
            try:
                request = recv_frame(channel)
            except ChannelBrokenError:
                return  # the peer is done
            except ChannelTimeout:
                log.info("closed the idle connection of %s (no request for %g s)", peer, self.idle_timeout_s)
                return
            except ProtocolError as err:
                log.warning("dropped %s: %s", peer, err)
                send_error(channel, err.code, str(err))
                return
            channel.settimeout(None)  # a request may take long (a migration); the idle clock stops
            op = request.get("op")
            handler = COMMANDS.get(op)
            if handler is None:
                _discard_passed_fds(channel, request, local)
                send_error(channel, ErrorCode.BAD_REQUEST, f"unknown request {op!r} (known: {', '.join(COMMANDS)})")
                continue
            if op in LOCAL_ONLY_COMMANDS and not local:
                log.warning("refused %s from %s: file commands are taken from the control socket only", op, peer)
                send_error(channel, ErrorCode.AUTH, f"{op} names a file on the agent's host: only the local CLI (the "
                                                    "control socket) may ask for it; run vmem on that host")
                continue
            if op in RECLAIM_AFTER_OPS:
                self._conn.reclaim = True
            try:
                reply = handler(self, channel, request)
            except AgentError as err:
                log.warning("refused %s from %s: %s", op, peer, err.message)
                send_error(channel, err.code, err.message)
                continue
            except VmemError as err:
                log.warning("%s from %s failed: %s", op, peer, err)
                send_error(channel, ErrorCode.FAILED, str(err))
                continue
            except Exception as err:
                log.exception("%s from %s: internal error", op, peer)
                send_error(channel, ErrorCode.INTERNAL, f"internal error {type(err).__name__}: {err} (a vmem bug: see the agent's log)")
                continue
            send_reply(channel, **reply)


def _check_expected_guest(expected: tuple, spec_json, npages) -> None:
    """Refuse a spawn that differs from what was reserved for it (see :meth:`Agent.expect_guest`).

    Raises:
        MigrationError("setup"): the stream describes another size or another guest; the
            message names the sizes, never the stream's guest description.
    """
    import json

    from vmem.errors import MigrationError
    from vmem.pages import PAGE_SIZE
    from vmem.ram import format_bytes

    size_bytes, spec, what = expected
    try:
        stream_bytes = int(npages) * PAGE_SIZE
    except (TypeError, ValueError):
        raise MigrationError("setup", f"{what}: the stream's page count is not a number: refused") from None
    if stream_bytes != size_bytes:
        raise MigrationError("setup", f"{what}: the stream carries a guest of {format_bytes(stream_bytes)} "
                                      f"({npages} pages) but {format_bytes(size_bytes)} was reserved for it: refused "
                                      "before spawning anything (the source must announce the size it sends)")

    def canonical(obj) -> str:
        # "backend" is the agent's own note in its records (which class takes the guest over);
        # the stream names the backend in its preamble, not in the guest description.
        if isinstance(obj, dict):
            obj = {k: v for k, v in obj.items() if k != "backend"}
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)

    if canonical(spec_json) != canonical(spec):
        raise MigrationError("setup", f"{what}: the stream's guest description differs from the one in the request "
                                      "it was reserved for: refused before spawning anything")


#: Requests after which the connection's end runs a full garbage collection (their objects
#: hold MiB-sized buffers in reference cycles: vmem.agent.heap.collect_cycles).
RECLAIM_AFTER_OPS = frozenset({"migrate", "save", "restore"})

#: Why an agent without key or TLS refuses the ``command`` purpose over TCP.
NO_TCP_COMMANDS = ("this agent takes commands over TCP only from peers that authenticate (--key or TLS); it has "
                   "neither: use the vmem CLI on its host (the control socket)")


def _unauthenticated_peer_refusal(sock: socket.socket) -> str:
    """Why a TCP peer of an agent without key or TLS is refused, or "".

    Such an agent cannot tell remote peers apart (it listens on loopback, or --insecure
    trusts the network); a peer on this host, though, must run as the agent's user or
    root, as on the control socket -- found with the kernel's socket table
    (:func:`vmem.agent.security.local_peer_uid`).
    """
    from vmem.agent.security import local_peer_uid

    try:
        uid = local_peer_uid(sock)
    except OSError as err:
        return f"cannot tell which user this local connection belongs to ({err}): refused"
    if uid is None or uid in (0, os.geteuid()):
        return ""
    return (f"uid {uid} may not use this agent: it runs without --key or TLS, so on this host it serves only its own "
            f"user (uid {os.geteuid()}) and root")


def _discard_passed_fds(channel, request: dict, local: bool) -> None:
    """Close descriptors a refused request passed (see :func:`vmem.agent.commands.receive_fd`)."""
    if local and request.get("fd") is True:
        from vmem.agent.commands import receive_fd

        try:
            os.close(receive_fd(channel))
        except AgentError:
            pass


def _read_refusal(raw, err: Exception) -> dict | None:
    """The refusal frame an agent sends instead of its authentication challenge (over a cap,
    or a forbidden uid: see :func:`_refuse`), if ``err`` says the challenge was our MAGIC."""
    from vmem.agent.protocol import MAX_OPENING_FRAME_BYTES

    if repr(MAGIC) not in str(err):
        return None
    try:
        raw.settimeout(2.0)
        reply = recv_frame(raw, MAX_OPENING_FRAME_BYTES)
    except (TransportError, VmemError, OSError, ValueError):
        return None
    return reply if reply.get("ok") is False else None


def _refuse(channel, code: str, message: str) -> None:
    """Tell a connection we do not serve why, and close it (never blocks for long).

    The peer's opening may already be in our receive queue; it is read and dropped before
    the close, so the kernel ends the connection with FIN rather than RST and the peer
    reads the refusal instead of a reset.
    """
    try:
        channel.settimeout(1.0)
    except (TransportError, ValueError):
        pass
    send_refusal(channel, code, message)
    sock = getattr(channel, "sock", None)
    if isinstance(sock, socket.socket):
        try:
            sock.shutdown(socket.SHUT_WR)
            for _ in range(4):
                if not sock.recv(64 << 10, socket.MSG_DONTWAIT):
                    break
        except OSError:
            pass
    channel.close()


def _bind_control_socket(path: str) -> socket.socket:
    """Bind the unix control socket at ``path`` with mode 0600.

    A leftover socket of a dead agent is replaced; a live agent's is not.

    Raises:
        AgentError: another agent answers on ``path``.
    """
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: its agent is gone
        else:
            raise AgentError(ErrorCode.BUSY, f"another vmem agent serves {path}: stop it, or give this one another --state-dir")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # never visible with wider permissions, not even for a moment
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def run_agent(config: AgentConfig) -> int:
    """``vmem agent``: start, serve until SIGTERM/SIGINT, shut down.  Returns the exit status."""
    tune_malloc()
    agent = Agent(config)
    try:
        agent.start()
    except AgentError:
        agent.shutdown()
        raise
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    # The code a migration runs, imported now so that it is frozen with the rest.
    import vmem.agent.migration  # noqa: F401
    import vmem.migration.destination  # noqa: F401
    import vmem.migration.source  # noqa: F401

    freeze_startup_objects()
    try:
        agent.serve_forever()
    finally:
        log.info("shutting down: stopping %d guest(s)", len(agent.registry.entries()))
        agent.shutdown()
    return 0
