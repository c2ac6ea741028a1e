"""Agent-to-agent live migration: the outgoing side and the incoming side.

Outgoing (``vmem migrate NAME HOST:PORT``, run by the source agent for its CLI):

1. ``NAME`` goes ``running -> migrating`` (a concurrent destroy or second migrate is refused).
2. Connect to the destination agent, secure the connection (:mod:`vmem.agent.security`),
   open it with purpose ``migrate-in`` and ask ``{"op": "migrate-in", "name", "size_bytes",
   "spec"}``.  The destination refuses a taken name or a guest larger than its free memory
   *before it spawns anything*; that refusal comes back to the CLI as the error.
3. :func:`vmem.migration.source.migrate` runs over that channel (shaped if ``--bandwidth``), exactly as
   in a one-host migration; progress events are forwarded to the CLI for its live display.
4. Completed: the source guest has exited; NAME leaves this agent's registry.  Otherwise
   the source guest keeps running here (its own ledger check goes into the report) and NAME
   is ``running`` again; a guest that crashed by itself is removed and reaped.

Incoming (a TCP connection with purpose ``migrate-in``): reserve NAME as ``incoming``
(refuse if taken or too big), answer ok, run :class:`vmem.migration.destination.DestinationMigration`
with ``keep_guest=True`` on the channel, and on commit adopt the guest as ``running``.  On
any failure the destination side removed everything it built and NAME is released.

The link (:func:`build_link`, the same stack on both sides, chosen by the request's
``parallel``/``compress``/``urgent`` keys and confirmed by the reply)::

    migrator / DestinationMigration
      CompressedChannel     zero pages as a bitmap (default), zstd/lz4 (--compress); not with "off"
      ShapedChannel         --bandwidth (source side only)
      StripedChannel        --parallel N > 1: main + N-1 data connections (each secured like main)
      main connection       MacChannel / TlsChannel / plain, as the agents' security says

One clock: before the link is built, the source measures the destination's clock on the
quiet main connection (:mod:`vmem.clock`): its request carries ``clock_samples`` N (at most
:data:`MAX_CLOCK_SAMPLES`), the reply confirms N, then N times ``{"op": "clock"}`` ->
``{"ok": true, "t_ns": <the destination's CLOCK_MONOTONIC>}``, answered at once from the
destination's own clock.  The report's ``clock`` is that estimate, and the cross-host
downtime is on the source's clock with its uncertainty.  A destination that does not
confirm (an older vmem) leaves the clock unknown and the downtime a raw difference.

Extra connections (data, urgent) open with purpose ``vmem-data`` / ``vmem-urgent`` and
send ``{"op": "attach", "session", "index"}``: the session token came in the migrate-in
reply, over the authenticated main connection, so only that source can attach.  The urgent
connection (post-copy demand pages) is spoken by native code: plain without security; with
a key the native threads take over the MacChannel's integrity framing; with TLS, which they
cannot speak (no kernel TLS here), the source adds ``"seal"``: a fresh 32-byte key, sent
inside TLS, and after the attach reply both ends leave TLS on that connection and speak
:class:`transport.seal.SealedChannel`'s frames (encrypted and authenticated) under it
(docs/agent.md, "Post-copy").
"""
from __future__ import annotations

import argparse
import logging
import queue
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field

from transport import ShapedChannel, TransportError

from vmem.clock import CLOCK_SAMPLES, UNKNOWN, estimate_offset
from vmem.errors import ConfigError, VmemError
from vmem.agent.protocol import (MAX_UNAUTHENTICATED_FRAME_BYTES, AgentError, ErrorCode, ProtocolError, raise_for_reply,
                                 recv_frame, send_error, send_frame, send_reply)

__all__ = ["ForwardingProgress", "PendingLinks", "build_link", "migrate_out", "serve_attach", "serve_incoming",
           "options_from_request"]

log = logging.getLogger("vmem.agent")

#: Minimum interval between two forwarded ``sent`` events (the display refreshes at 10 Hz).
SENT_EVENT_INTERVAL_S = 0.05
#: How long a destination waits for a migration's extra connections to attach.
ATTACH_TIMEOUT_S = 30.0
#: Most connections one migration may use (``--parallel``).
MAX_PARALLEL = 16
#: Most clock ping-pongs a destination answers for one migration.
MAX_CLOCK_SAMPLES = 64


@dataclass
class _Session:
    data_expected: int
    urgent_expected: bool
    data: dict = field(default_factory=dict)   # index -> channel
    urgent: object = None
    closed: bool = False


class PendingLinks:
    """Incoming migrations waiting for their extra connections, by session token."""

    def __init__(self):
        self._cond = threading.Condition()
        self._sessions: dict[str, _Session] = {}

    def open(self, data_expected: int, urgent_expected: bool) -> str:
        token = secrets.token_hex(16)
        with self._cond:
            self._sessions[token] = _Session(data_expected, urgent_expected)
        return token

    def attach(self, token: str, purpose: str, index: int, channel, *, dry_run: bool = False) -> str:
        """File ``channel`` under ``token``; returns "" or why it was refused (``dry_run``:
        only check)."""
        with self._cond:
            session = self._sessions.get(token)
            if session is None or session.closed:
                return "no migration is waiting for this session (it ended or timed out)"
            if purpose == "vmem-urgent":
                if not session.urgent_expected or session.urgent is not None:
                    return "this migration takes no (further) urgent connection"
                if not dry_run:
                    session.urgent = channel
            else:
                if not 1 <= index <= session.data_expected or index in session.data:
                    return f"data connection index {index} is not expected (1..{session.data_expected}, once each)"
                if not dry_run:
                    session.data[index] = channel
            self._cond.notify_all()
        return ""

    def wait(self, token: str, timeout_s: float) -> tuple[list, object]:
        """The session's data connections (by index) and urgent connection, once all came.

        Raises:
            AgentError(failed): they did not all attach within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            session = self._sessions[token]
            while len(session.data) < session.data_expected or (session.urgent_expected and session.urgent is None):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AgentError(ErrorCode.FAILED, f"only {len(session.data)} of {session.data_expected} data "
                                                       "connection(s) attached in time")
                self._cond.wait(left)
            return [session.data[i] for i in sorted(session.data)], session.urgent

    def close(self, token: str) -> list:
        """Forget ``token``; returns the connections attached to it (for the caller to close)."""
        with self._cond:
            session = self._sessions.pop(token, None)
            if session is None:
                return []
            session.closed = True
            return [*session.data.values(), *([session.urgent] if session.urgent is not None else [])]


def _sealed_link(agent) -> bool:
    """Whether this agent's urgent connections switch from TLS to sealed frames."""
    return "tls" in agent.security.mode


def _sealed_urgent(channel, key: bytes, role: str):
    """A TLS link's urgent connection after its attach exchange: a SealedChannel on a
    duplicate of its socket, for the native fault threads to take over (native_handoff).
    No TLS record follows the attach reply on it, so no TLS byte is left unread; the TLS
    object stays the caller's to close (closing it leaves the duplicate open)."""
    import os
    import socket

    from transport import SocketChannel
    from transport.seal import SealedChannel

    fd = os.dup(channel.fileno())
    try:
        os.set_blocking(fd, True)  # the TLS channel made it non-blocking; native code blocks
        sock = socket.socket(fileno=fd)
    except BaseException:
        os.close(fd)
        raise
    return SealedChannel(SocketChannel(sock), key, role)


def _seal_key_from(request: dict) -> bytes:
    """The ``seal`` key of a TLS link's urgent attach request.

    Raises:
        AgentError(bad_request): missing or not 32 bytes of hex."""
    from transport.seal import SESSION_KEY_BYTES

    text = request.get("seal")
    try:
        key = bytes.fromhex(text) if isinstance(text, str) else b""
    except ValueError:
        key = b""
    if len(key) != SESSION_KEY_BYTES:
        raise AgentError(ErrorCode.BAD_REQUEST, "an urgent connection over TLS needs a seal key of "
                                                f"{SESSION_KEY_BYTES} bytes (is the source agent an older vmem?)")
    return key


def _urgent_channel(channel):
    """What the native fault thread takes over on the urgent connection: the plain socket
    channel (security none) or the keyed link's MacChannel, whose receive buffer is empty
    (the attach exchange was framed whole)."""
    from transport import SocketChannel
    from transport.secure import MacChannel

    while not isinstance(channel, (SocketChannel, MacChannel)) or type(channel).__name__ == "TlsChannel":
        inner = getattr(channel, "inner", None)
        if inner is None:
            raise AgentError(ErrorCode.INTERNAL, f"no native-capable channel under {channel!r}")
        channel = inner
    return channel


def build_link(main, data: list, *, compress: str, bandwidth_Bps: float | None = None, source: bool):
    """The channel a migration runs on (the stack in the module docstring)."""
    link = main
    if data:
        from transport.striped import StripedChannel

        link = StripedChannel(main, outgoing=data if source else (), incoming=() if source else data)
    if bandwidth_Bps:
        link = ShapedChannel(link, bandwidth_Bps)
    if compress != "off":
        from transport.compressed import CompressedChannel

        link = CompressedChannel(link, "zero" if compress == "none" else compress)
    return link


class ForwardingProgress:
    """The migrator's progress interface, forwarded as events to the CLI connection.

    ``sent`` calls are coalesced (at most one event per :data:`SENT_EVENT_INTERVAL_S`, and
    always flushed before ``round_end``).  If the CLI went away, events are dropped and the
    migration carries on: closing the CLI does not abort a migration.
    """

    def __init__(self, channel):
        self._ch = channel
        self._lock = threading.Lock()
        self._gone = False
        self._pages = 0
        self._bytes = 0
        self._last = 0.0
        # What ``vmem jobinfo`` reads (status()): kept whether or not the CLI is still there.
        self._t_start = time.monotonic()
        self._phase = ("setup", "")
        self._rounds: list = []
        self._current: dict | None = None

    def status(self) -> dict:
        """The migration's progress as query-migrate says it (vmem.migration.report.query_status),
        plus ``phase``, ``detail`` and ``rounds`` (completed so far)."""
        from vmem.migration.report import query_status

        cur = dict(self._current) if self._current is not None else None
        st = query_status(list(self._rounds), cur, time.monotonic() - self._t_start)
        return st | {"phase": self._phase[0], "detail": self._phase[1], "rounds": len(self._rounds)}

    def _emit(self, event: dict) -> None:
        with self._lock:
            if self._gone:
                return
            try:
                send_frame(self._ch, event)
            except (TransportError, OSError, VmemError):
                self._gone = True
                log.info("the CLI left during a migration; the migration goes on")

    def _flush_sent(self) -> None:
        if self._pages or self._bytes:
            pages, nbytes, self._pages, self._bytes = self._pages, self._bytes, 0, 0
            self._emit({"event": "sent", "pages": pages, "nbytes": nbytes})
        self._last = time.monotonic()

    def phase(self, name: str, detail: str = "") -> None:
        self._phase = (name, detail)
        self._emit({"event": "phase", "name": name, "detail": detail})

    def round_start(self, index: int, pages: int, kind: str) -> None:
        self._current = {"index": index, "kind": kind, "pages": pages, "sent": 0, "bytes": 0, "t0": time.monotonic()}
        self._emit({"event": "round_start", "index": index, "pages": pages, "kind": kind})

    def sent(self, pages: int, nbytes: int) -> None:
        cur = self._current
        if cur is not None:
            cur["sent"] += pages
            cur["bytes"] += nbytes
        self._pages += pages
        self._bytes += nbytes
        if time.monotonic() - self._last >= SENT_EVENT_INTERVAL_S:
            self._flush_sent()

    def round_end(self, stats) -> None:
        self._rounds.append(stats)
        self._current = None
        self._flush_sent()
        self._emit({"event": "round_end", "stats": asdict(stats)})

    def log(self, message: str) -> None:
        self._emit({"event": "log", "message": message})


def options_from_request(values: dict):
    """MigrationOptions from the migration flags a CLI sent (the one-host flag set).

    Unknown keys are refused: they mean the CLI and the agent are different vmem versions.

    Raises:
        AgentError(bad-request): unknown key or invalid value (naming the flag).
    """
    from vmem.migration.flags import add_migration_arguments, migration_argument_dests, options_from_args

    if not isinstance(values, dict):
        raise AgentError(ErrorCode.BAD_REQUEST, "migration options must be a JSON object")
    known = set(migration_argument_dests())
    unknown = sorted(set(values) - known)
    if unknown:
        raise AgentError(ErrorCode.BAD_REQUEST, f"unknown migration option(s) {', '.join(unknown)}: the vmem CLI and "
                                                "this agent are different versions")
    parser = argparse.ArgumentParser(add_help=False)
    add_migration_arguments(parser)
    ns = parser.parse_args([])
    for key, value in values.items():
        setattr(ns, key, value)
    try:
        return options_from_args(ns)
    except ConfigError as err:
        raise AgentError(ErrorCode.BAD_REQUEST, f"invalid argument {err}") from None


def _link_request(values: dict) -> tuple[int, str]:
    """``(parallel, compress)`` from a CLI's migration options (checked; AgentError if bad)."""
    from vmem.migration.flags import link_options_from_args
    from transport.compressed import mode_unavailable

    ns = argparse.Namespace(parallel=values.get("parallel", 1), compress=values.get("compress", "none"))
    try:
        parallel, compress = link_options_from_args(ns)
    except ConfigError as err:
        raise AgentError(ErrorCode.BAD_REQUEST, f"invalid argument {err}") from None
    why = mode_unavailable(compress) if compress in ("zstd", "lz4") else ""
    if why:
        raise AgentError(ErrorCode.UNAVAILABLE, f"--compress {compress}: this host cannot compress: {why}")
    return parallel, compress


def _attach(agent, host: str, port: int, purpose: str, session: str, index: int, seal: bytes | None = None):
    """Open one extra connection of a migration (secured like the main one) and attach it;
    ``seal``: the session key of a TLS link's urgent connection (see the module docstring)."""
    ch = agent.connect_peer(host, port, purpose)
    try:
        request = {"op": "attach", "session": session, "index": index}
        if seal is not None:
            request["seal"] = seal.hex()
        send_frame(ch, request)
        raise_for_reply(recv_frame(ch), f"destination agent {host}:{port} ({purpose} connection)")
    except BaseException:
        agent.forget_channel(ch)
        ch.close()
        raise
    return ch


def migrate_out(agent, cli_channel, request: dict) -> dict:
    """Serve ``{"op": "migrate", "name", "target", "options"}`` for a CLI; see the module docstring.

    Returns the reply fields: ``{"report": <MigrationReport dict>}`` (whatever the outcome).

    Raises:
        AgentError: refused before any byte of guest RAM moved (no such guest, busy, bad
            options, destination unreachable or refusing); the guest is running as before.
    """
    from vmem.migration.source import SourceMigration
    from vmem.agent.net import parse_hostport
    from vmem.agent.paths import DEFAULT_PORT

    if request.get("resume"):
        return _resume_out(agent, cli_channel, request)
    name = str(request.get("name", ""))
    target = str(request.get("target", ""))
    values = request.get("options") or {}
    options = options_from_request(values)
    parallel, compress = _link_request(values)
    # Post-copy demand pages on their own connection, as protected as the link: the native
    # fault threads speak it plain, with a keyed link's MAC framing, or sealed (TLS).
    want_urgent = options.postcopy != "off"
    try:
        host, port = parse_hostport(target, DEFAULT_PORT)
    except (ValueError, TransportError) as err:
        raise AgentError(ErrorCode.BAD_REQUEST, f"destination {target!r}: {err}") from None
    entry = agent.registry.transition(name, "running", "migrating")
    progress = ForwardingProgress(cli_channel)
    out = _Outgoing(agent, host, port, parallel, compress)
    try:
        try:
            progress.phase("connect", f"to the agent at {host}:{port}")
            out.open({"op": "migrate-in", "name": name, "size_bytes": entry.size_bytes, "spec": entry.spec,
                      "origin": agent.listen_address, "parallel": parallel, "compress": compress, "urgent": want_urgent,
                      "clock_samples": CLOCK_SAMPLES})
        except BaseException:
            agent.registry.transition(name, "migrating", "running")
            raise
        log.info("migrating guest %s to %s:%d (%d connection(s), compress %s%s)", name, host, port, parallel,
                 compress, ", urgent connection" if out.urgent is not None else "")
        link = out.build(options.bandwidth_Bps)
        mig = SourceMigration(entry.guest, link, options, progress, urgent_channel=out.urgent, clock=out.clock)
        agent.jobs[name] = {"migration": mig, "progress": progress, "target": f"{host}:{port}"}
        try:
            report = mig.run()
        finally:
            agent.jobs.pop(name, None)
        report.guest["link"] = _link_summary(link, parallel, compress, out.urgent)
    finally:
        out.close()
    resume = {"mig": mig, "host": host, "port": port, "parallel": parallel, "compress": compress,
              "want_urgent": want_urgent, "bandwidth_Bps": options.bandwidth_Bps}
    return _finish_out(agent, name, entry, report, resume)


def _finish_out(agent, name: str, entry, report, resume: dict) -> dict:
    """Settle the source side after a migration (or a resumed one) and build the reply."""
    from vmem.migration.local import settle_source_guest

    host, port = resume["host"], resume["port"]
    report.guest["name"] = name
    report.guest["source_agent"] = agent.listen_address
    report.guest["destination_agent"] = f"{host}:{port}"
    guest = entry.guest
    if report.outcome == "paused" and resume["mig"].resumable and guest.alive():
        # The link broke after the switch to post-copy: keep everything for --resume.
        entry.postcopy_resume = resume
        agent.registry.transition(name, "migrating", "paused")
        log.warning("post-copy of guest %s to %s:%d interrupted after the switch: %s; the guest is paused here with its "
                    "complete RAM: `vmem migrate --resume %s` finishes it", name, host, port, report.reason, name)
        return {"report": report.to_dict()}
    entry.postcopy_resume = None
    if report.outcome == "completed":
        agent.registry.remove(name, "migrating")
        guest.close()
        log.info("guest %s migrated to %s:%d (downtime %s ms); removed here", name, host, port, report.downtime_ms)
    elif guest.alive():
        settle_source_guest(report, guest)
        # After a post-copy switch the guest stays paused: its state is split (docs/postcopy.md).
        agent.registry.transition(name, "migrating", "paused" if report.source_guest_state == "paused" else "running")
        log.warning("migration of guest %s to %s:%d %s: %s; the guest is %s here",
                    name, host, port, report.outcome, report.reason, report.source_guest_state)
    else:
        agent.registry.remove(name, "migrating")
        guest.close()
        log.error("guest %s crashed during its migration to %s:%d: %s; removed", name, host, port, report.reason)
    return {"report": report.to_dict()}


def _resume_out(agent, cli_channel, request: dict) -> dict:
    """``vmem migrate --resume NAME``: finish a post-copy whose link broke after the switch,
    over new connections to the same destination agent (it still waits for us)."""
    name = str(request.get("name", ""))
    entry = agent.registry.transition(name, "paused", "migrating")
    resume = entry.postcopy_resume
    if resume is None or not resume["mig"].resumable:
        agent.registry.transition(name, "migrating", "paused")
        raise AgentError(ErrorCode.BAD_REQUEST, f"guest {name!r} is paused but has no interrupted post-copy to resume "
                                                "(its migration failed for good: destroy it, or see the report)")
    mig, host, port = resume["mig"], resume["host"], resume["port"]
    parallel, compress = resume["parallel"], resume["compress"]
    progress = ForwardingProgress(cli_channel)
    mig.progress = progress
    out = _Outgoing(agent, host, port, parallel, compress)
    try:
        try:
            progress.phase("connect", f"resuming: to the agent at {host}:{port}")
            out.open({"op": "postcopy-resume", "name": name, "parallel": parallel, "compress": compress,
                      "urgent": resume["want_urgent"]})
        except BaseException:
            agent.registry.transition(name, "migrating", "paused")
            raise
        log.info("resuming the post-copy of guest %s to %s:%d", name, host, port)
        link = out.build(resume["bandwidth_Bps"])
        report = mig.resume_postcopy(link, out.urgent)
        report.guest["link"] = _link_summary(link, parallel, compress, out.urgent)
    finally:
        out.close()
    return _finish_out(agent, name, entry, report, resume)


class _Outgoing:
    """The connections of one outgoing migration: the main one (opened with a request the
    destination agent answers with the agreed link), data and urgent ones attached to its
    session, and the link stacked on them (:func:`build_link`).  :meth:`close` closes all."""

    def __init__(self, agent, host: str, port: int, parallel: int, compress: str):
        self.agent, self.host, self.port = agent, host, port
        self.parallel, self.compress = parallel, compress
        self.channel = None
        self.extras: list = []
        self.urgent = None
        self.link = None
        #: the destination's clock against ours (vmem.clock), measured by :meth:`open`
        self.clock = UNKNOWN

    def open(self, request: dict) -> dict:
        """Connect, send ``request``, measure the destination's clock if it agreed to, attach
        the extra connections; return the agreed link."""
        host, port = self.host, self.port
        self.channel = self.agent.connect_peer(host, port, "migrate-in")
        send_frame(self.channel, request)
        agreed = raise_for_reply(recv_frame(self.channel), f"destination agent {host}:{port}").get("link")
        if not isinstance(agreed, dict):
            if self.parallel > 1 or self.compress != "off":
                raise AgentError(ErrorCode.VERSION, f"the destination agent {host}:{port} does not support "
                                                    "--parallel/--compress (an older vmem): run the same vmem "
                                                    "version on both hosts, or pass --parallel 1 --compress off")
            agreed = {"parallel": 1, "compress": "off", "urgent": False}
        samples = int(agreed.get("clock_samples") or 0)
        if samples:
            self.clock = estimate_offset(lambda: _ask_clock(self.channel, f"destination agent {host}:{port}"), samples)
        session = str(agreed.get("session", ""))
        for index in range(1, self.parallel):
            self.extras.append(_attach(self.agent, host, port, "vmem-data", session, index))
        if agreed.get("urgent"):
            if _sealed_link(self.agent):
                from transport.seal import new_session_key

                key = new_session_key()
                self.extras.append(_attach(self.agent, host, port, "vmem-urgent", session, 0, seal=key))
                self.extras.append(_sealed_urgent(self.extras[-1], key, "client"))
                self.urgent = self.extras[-1]
            else:
                self.extras.append(_attach(self.agent, host, port, "vmem-urgent", session, 0))
                self.urgent = _urgent_channel(self.extras[-1])
        return agreed

    def build(self, bandwidth_Bps: float | None):
        self.link = build_link(self.channel, self.extras[:self.parallel - 1], compress=self.compress,
                               bandwidth_Bps=bandwidth_Bps, source=True)
        return self.link

    def close(self) -> None:
        for ch in [c for c in (self.channel, *self.extras) if c is not None]:
            self.agent.forget_channel(ch)
            ch.close()
        if self.link is not None:
            self.link.close()


def _ask_clock(channel, who: str) -> int:
    """One clock ping-pong: the peer's CLOCK_MONOTONIC reading, in ns."""
    send_frame(channel, {"op": "clock"})
    reply = raise_for_reply(recv_frame(channel), who)
    try:
        return int(reply["t_ns"])
    except (KeyError, TypeError, ValueError):
        raise ProtocolError(f"{who} answered a clock ping without t_ns: {str(reply)[:100]}") from None


def _answer_clock(channel, samples: int) -> None:
    """Answer ``samples`` clock pings from our own clock, read as late as possible."""
    for _ in range(samples):
        request = recv_frame(channel)
        if request.get("op") != "clock":
            raise ProtocolError(f"expected a clock ping, got {str(request)[:100]}", ErrorCode.BAD_REQUEST)
        send_reply(channel, t_ns=time.monotonic_ns())


def _urgent_protection(urgent) -> str | None:
    """How the urgent connection's frames are protected: ``none``, ``aes-256-gmac`` (a keyed
    link's integrity tags) or ``aes-256-gcm`` (sealed: a TLS link's); None without one."""
    if urgent is None:
        return None
    return getattr(urgent, "CIPHER", "none")


def _link_summary(link, parallel: int, compress: str, urgent) -> dict:
    """What the report says about the link: connections, compression, bytes on the wire."""
    summary = {"parallel": parallel, "compress": compress, "urgent_connection": urgent is not None,
               "urgent_protection": _urgent_protection(urgent),
               "stream_bytes": link.bytes_sent}
    wire = getattr(link, "wire_bytes_sent", None)
    summary["wire_bytes"] = wire if wire is not None else link.bytes_sent
    summary["zero_pages_elided"] = getattr(link, "zero_pages_sent", 0)
    return summary


def serve_attach(agent, channel, purpose: str, peer: str) -> bool:
    """Serve a ``vmem-data``/``vmem-urgent`` connection: hand it to its waiting migration.

    Returns True if the migration took the channel (the caller must not close it).  A TLS
    link's urgent connection is handed over as a sealed duplicate of its socket
    (:func:`_sealed_urgent`): then False, and the caller closes the TLS object as usual.
    """
    try:
        request = recv_frame(channel, MAX_UNAUTHENTICATED_FRAME_BYTES)
        agent.opening_done()
        token, index = str(request.get("session", "")), int(request.get("index", -1))
        if request.get("op") != "attach":
            # Only the op is named: the request may carry a link key (a TLS link's urgent
            # connection), which must reach neither the answer nor a log.
            raise AgentError(ErrorCode.BAD_REQUEST,
                             f"expected an attach request, got op {str(request.get('op'))[:40]!r}")
        seal = _seal_key_from(request) if purpose == "vmem-urgent" and _sealed_link(agent) else None
    except (AgentError, ValueError, TypeError) as err:
        send_error(channel, getattr(err, "code", ErrorCode.BAD_REQUEST), getattr(err, "message", str(err)))
        return False
    # Reply first, file second: once filed, the migration may use the channel at once
    # (the urgent one from native code), and nothing else may be written on it then.
    why = agent.pending_links.attach(token, purpose, index, None, dry_run=True)
    if why:
        log.warning("refused a %s connection from %s: %s", purpose, peer, why)
        send_error(channel, ErrorCode.BAD_REQUEST, why)
        return False
    send_reply(channel)
    if seal is not None:
        try:
            sealed = _sealed_urgent(channel, seal, "server")
        except OSError as err:
            log.warning("dropped a %s connection from %s: %s", purpose, peer, err)
            return False
        why = agent.pending_links.attach(token, purpose, index, sealed)
        if why:
            sealed.close()
            log.warning("dropped a %s connection from %s: %s", purpose, peer, why)
        return False  # the TLS object is the caller's to close; the sealed duplicate lives on
    why = agent.pending_links.attach(token, purpose, index, channel)
    if why:
        log.warning("dropped a %s connection from %s: %s", purpose, peer, why)
        return False
    return True


def _serve_resume(agent, channel, request: dict, peer: str) -> None:
    """A ``postcopy-resume`` request: hand new channels to the incoming post-copy of NAME
    that waits since its link broke.  The waiting migration owns them from then on."""
    from vmem.agent.registry import validate_name

    try:
        name = validate_name(request.get("name"))
        parallel = int(request.get("parallel", 1))
        compress = str(request.get("compress", "off"))
        if not 1 <= parallel <= MAX_PARALLEL or compress not in ("none", "zstd", "lz4", "off"):
            raise AgentError(ErrorCode.BAD_REQUEST, f"bad link parameters parallel={parallel} compress={compress!r}")
        with agent.resume_lock:
            waiter = agent.resume_waiters.get(name)
        if waiter is None:
            raise AgentError(ErrorCode.BAD_REQUEST, f"no post-copy of guest {name!r} waits to be resumed here (it "
                                                    "completed, or gave up and reported its lost pages)")
    except (AgentError, ValueError, TypeError) as err:
        send_error(channel, getattr(err, "code", ErrorCode.BAD_REQUEST), getattr(err, "message", str(err)))
        log.warning("refused a post-copy resume from %s: %s", peer, getattr(err, "message", err))
        return
    urgent = bool(request.get("urgent"))
    token = agent.pending_links.open(parallel - 1, urgent)
    handed = False
    try:
        channel.settimeout(agent.idle_timeout_s)  # a resumed source that goes silent is dropped too
        send_reply(channel, link={"parallel": parallel, "compress": compress, "urgent": urgent, "session": token})
        data, urgent_ch = agent.pending_links.wait(token, ATTACH_TIMEOUT_S)
        link = build_link(channel, data, compress=compress, source=False)
        waiter.put_nowait((link, _urgent_channel(urgent_ch) if urgent_ch is not None else None))
        handed = True
        log.info("resuming the incoming post-copy of guest %s from %s", name, peer)
        # The migration thread reads and closes these channels now; keep this thread (the
        # server closes `channel` when it returns) until that migration is over.
        while True:
            with agent.resume_lock:
                if agent.resume_waiters.get(name) is not waiter:
                    break
            time.sleep(0.2)
    except (AgentError, TransportError, OSError, queue.Full) as err:
        log.warning("post-copy resume of guest %s from %s failed: %s", name, peer, getattr(err, "message", err))
    finally:
        for ch in agent.pending_links.close(token):
            if not handed:
                agent.forget_channel(ch)
                ch.close()


def serve_incoming(agent, channel, peer: str) -> None:
    """Serve one ``migrate-in`` connection (already secured and opened); never raises."""
    from vmem.migration.destination import DestinationMigration
    from transport.compressed import mode_unavailable
    from vmem.agent.registry import validate_name
    from vmem.pages import PAGE_SIZE

    try:
        # The first request is part of the opening (bounded in size and by its deadline).
        request = recv_frame(channel, MAX_UNAUTHENTICATED_FRAME_BYTES)
        agent.opening_done()
        if request.get("op") == "postcopy-resume":
            _serve_resume(agent, channel, request, peer)
            return
        if request.get("op") != "migrate-in":
            raise ProtocolError(f"expected a migrate-in request, got {str(request)[:100]}", ErrorCode.BAD_REQUEST)
        name = validate_name(request.get("name"))
        size_bytes = int(request.get("size_bytes", 0))
        spec = request.get("spec") or {}
        if size_bytes <= 0 or size_bytes % PAGE_SIZE or not isinstance(spec, dict):
            raise AgentError(ErrorCode.BAD_REQUEST, f"migrate-in needs a positive size_bytes in whole {PAGE_SIZE}-byte "
                                                    "pages and a spec object")
        parallel = int(request.get("parallel", 1))
        compress = str(request.get("compress", "off"))  # a source without the key sends plain bytes
        if not 1 <= parallel <= MAX_PARALLEL:
            raise AgentError(ErrorCode.BAD_REQUEST, f"parallel {parallel} is not in 1..{MAX_PARALLEL}")
        if compress not in ("none", "zstd", "lz4", "off"):
            raise AgentError(ErrorCode.BAD_REQUEST, f"unknown compression {compress!r}")
        why = mode_unavailable(compress) if compress in ("zstd", "lz4") else ""
        if why:
            raise AgentError(ErrorCode.UNAVAILABLE, f"this agent cannot decode --compress {compress}: {why} "
                                                    "(install it on this host, or use --compress none)")
        urgent = bool(request.get("urgent"))
        clock_samples = max(0, min(int(request.get("clock_samples") or 0), MAX_CLOCK_SAMPLES))
        origin = str(request.get("origin") or peer)
        agent.registry.reserve(name, "incoming", size_bytes, spec, origin=f"migrated from {origin}")
    except (AgentError, ValueError, TypeError) as err:
        code = getattr(err, "code", ErrorCode.BAD_REQUEST)
        message = getattr(err, "message", str(err))
        log.warning("refused an incoming migration from %s: %s", peer, message)
        send_error(channel, code, message)
        return
    except (TransportError, OSError) as err:
        log.warning("incoming migration from %s: connection failed before the request: %s", peer, err)
        return
    token = agent.pending_links.open(parallel - 1, urgent)
    link = None
    # The reservation is what the request announced; the stream's preamble must say the
    # same before the guest is spawned (Agent.expect_guest), and a source that goes silent
    # is dropped after the idle timeout.
    agent.expect_guest(size_bytes, spec, f"incoming migration of guest {name!r} from {origin}")
    try:
        channel.settimeout(agent.idle_timeout_s)
        send_reply(channel, link={"parallel": parallel, "compress": compress, "urgent": urgent, "session": token,
                                  "clock_samples": clock_samples})
        _answer_clock(channel, clock_samples)
        data, urgent_ch = agent.pending_links.wait(token, ATTACH_TIMEOUT_S)
        log.info("receiving guest %s (%d MiB) from %s (%d connection(s), compress %s%s)", name, size_bytes >> 20,
                 origin, parallel, compress, ", urgent connection" if urgent_ch is not None else "")
        link = build_link(channel, data, compress=compress, source=False)
        dm = DestinationMigration(link, keep_guest=True,
                                  urgent_channel=_urgent_channel(urgent_ch) if urgent_ch is not None else None)
        # A post-copy whose link breaks after the switch waits here for the source's
        # `vmem migrate --resume NAME` (see _serve_resume), which hands over new channels.
        waiter: "queue.Queue" = queue.Queue(maxsize=1)
        with agent.resume_lock:
            agent.resume_waiters[name] = waiter

        def await_reconnect(timeout_s: float):
            log.warning("incoming post-copy of guest %s: the link broke after the switch; the guest waits on its "
                        "missing pages for up to %g s for the source to resume", name, timeout_s)
            try:
                return waiter.get(timeout=timeout_s)
            except queue.Empty:
                return None

        dm.await_reconnect = await_reconnect
        dm.on_switch = lambda: log.info("incoming post-copy of guest %s: switched, the guest runs here and pulls "
                                        "its missing pages", name)
        adopted = []

        def adopt(guest) -> None:
            # At COMMIT, before the final report goes back: when the source's migrate
            # returns, this agent already lists the guest running.
            agent.own_guest(name, guest)
            agent.registry.transition(name, "incoming", "running", guest=guest)
            adopted.append(guest)

        dm.on_commit = adopt
        try:
            status = dm.run()
        finally:
            with agent.resume_lock:
                agent.resume_waiters.pop(name, None)
        if adopted:
            if status != 0:
                log.warning("guest %s from %s was committed and runs here, but the migration's end failed in phase "
                            "%s (see the destination error above)", name, origin, dm.phase)
            log.info("guest %s arrived from %s and runs here (pid %d)", name, origin, adopted[0].pid)
            return
        log.warning("incoming migration of guest %s from %s failed in phase %s (see the destination error above); "
                    "nothing was kept", name, origin, dm.phase)
    except AgentError as err:
        log.warning("incoming migration of guest %s from %s: %s; nothing was kept", name, origin, err.message)
    except (TransportError, OSError) as err:
        log.warning("incoming migration of guest %s from %s: connection failed: %s; nothing was kept", name, origin, err)
    except Exception as err:  # never let one migration take the agent down
        log.exception("incoming migration of guest %s from %s: internal error %s", name, origin, err)
    finally:
        agent.expect_guest(None, None, "")
        for ch in agent.pending_links.close(token):
            agent.forget_channel(ch)
            ch.close()
        if link is not None:
            link.close()
    agent.registry.remove(name, "incoming")
