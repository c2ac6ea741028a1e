"""Agent-to-agent live migration: the outgoing side and the incoming side.

Outgoing (``vmem migrate NAME HOST:PORT``, run by the source agent for its CLI):

1. ``NAME`` goes ``running -> migrating`` (a concurrent destroy or second migrate is refused).
2. Connect to the destination agent, secure the connection (:mod:`vmem.agent.security`),
   open it with purpose ``migrate-in`` and ask ``{"op": "migrate-in", "name", "size_bytes",
   "spec"}``.  The destination refuses a taken name or a guest larger than its free memory
   *before it spawns anything*; that refusal comes back to the CLI as the error.
3. :func:`vmem.migrator.migrate` runs over that channel (shaped if ``--bandwidth``), exactly as
   in a one-host migration; progress events are forwarded to the CLI for its live display.
4. Completed: the source guest has exited; NAME leaves this agent's registry.  Otherwise
   the source guest keeps running here (its own ledger check goes into the report) and NAME
   is ``running`` again; a guest that crashed by itself is removed and reaped.

Incoming (a TCP connection with purpose ``migrate-in``): reserve NAME as ``incoming``
(refuse if taken or too big), answer ok, run :class:`vmem.destination.DestinationMigration`
with ``keep_guest=True`` on the channel, and on commit adopt the guest as ``running``.  On
any failure the destination side removed everything it built and NAME is released.
"""
from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import asdict

from transport import ShapedChannel, TransportError

from ..errors import ConfigError, VmemError
from .protocol import AgentError, ErrorCode, ProtocolError, raise_for_reply, recv_frame, send_error, send_frame, send_reply

__all__ = ["ForwardingProgress", "migrate_out", "serve_incoming", "options_from_request"]

log = logging.getLogger("vmem.agent")

#: Minimum interval between two forwarded ``sent`` events (the display refreshes at 10 Hz).
SENT_EVENT_INTERVAL_S = 0.05


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
        self._emit({"event": "phase", "name": name, "detail": detail})

    def round_start(self, index: int, pages: int, kind: str) -> None:
        self._emit({"event": "round_start", "index": index, "pages": pages, "kind": kind})

    def sent(self, pages: int, nbytes: int) -> None:
        self._pages += pages
        self._bytes += nbytes
        if time.monotonic() - self._last >= SENT_EVENT_INTERVAL_S:
            self._flush_sent()

    def round_end(self, stats) -> None:
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
    from ..args import add_migration_arguments, migration_argument_dests, options_from_args

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


def _source_guest_check(guest) -> dict:
    t = time.monotonic()
    try:
        check = guest.verify()
    except Exception as err:  # reported, not raised: the report is the product
        check = {"ok": False, "detail": str(err)}
    check["duration_s"] = round(time.monotonic() - t, 3)
    return check


def migrate_out(agent, cli_channel, request: dict) -> dict:
    """Serve ``{"op": "migrate", "name", "target", "options"}`` for a CLI; see the module docstring.

    Returns the reply fields: ``{"report": <MigrationReport dict>}`` (whatever the outcome).

    Raises:
        AgentError: refused before any byte of guest RAM moved (no such guest, busy, bad
            options, destination unreachable or refusing); the guest is running as before.
    """
    from ..migrator import migrate
    from .net import SnapshotSendChannel, parse_hostport
    from .paths import DEFAULT_PORT

    name = str(request.get("name", ""))
    target = str(request.get("target", ""))
    options = options_from_request(request.get("options") or {})
    try:
        host, port = parse_hostport(target, DEFAULT_PORT)
    except (ValueError, TransportError) as err:
        raise AgentError(ErrorCode.BAD_REQUEST, f"destination {target!r}: {err}") from None
    entry = agent.registry.transition(name, "running", "migrating")
    progress = ForwardingProgress(cli_channel)
    channel = None
    try:
        try:
            progress.phase("connect", f"to the agent at {host}:{port}")
            channel = agent.connect_peer(host, port, "migrate-in")
            send_frame(channel, {"op": "migrate-in", "name": name, "size_bytes": entry.size_bytes,
                                 "spec": entry.spec, "origin": agent.listen_address})
            raise_for_reply(recv_frame(channel), f"destination agent {host}:{port}")
        except BaseException:
            agent.registry.transition(name, "migrating", "running")
            raise
        log.info("migrating guest %s to %s:%d", name, host, port)
        link = SnapshotSendChannel(channel) if agent.security.key is not None else channel
        if options.bandwidth_Bps:
            link = ShapedChannel(link, options.bandwidth_Bps)
        report = migrate(entry.guest, link, options, progress)
    finally:
        if channel is not None:
            agent.forget_channel(channel)
            channel.close()
    report.guest["name"] = name
    report.guest["source_agent"] = agent.listen_address
    report.guest["destination_agent"] = f"{host}:{port}"
    guest = entry.guest
    if report.outcome == "completed":
        agent.registry.remove(name, "migrating")
        guest.close()
        log.info("guest %s migrated to %s:%d (downtime %s ms); removed here", name, host, port, report.downtime_ms)
    elif guest.alive():
        report.verification["source_guest_check"] = _source_guest_check(guest)
        report.source_guest_state = "running" if guest.alive() else "crashed"
        agent.registry.transition(name, "migrating", "running")
        log.warning("migration of guest %s to %s:%d %s: %s; the guest keeps running here",
                    name, host, port, report.outcome, report.reason)
    else:
        agent.registry.remove(name, "migrating")
        guest.close()
        log.error("guest %s crashed during its migration to %s:%d: %s; removed", name, host, port, report.reason)
    return {"report": report.to_dict()}


def serve_incoming(agent, channel, peer: str) -> None:
    """Serve one ``migrate-in`` connection (already secured and opened); never raises."""
    from ..destination import DestinationMigration
    from .registry import validate_name

    try:
        request = recv_frame(channel)
        if request.get("op") != "migrate-in":
            raise ProtocolError(f"expected a migrate-in request, got {str(request)[:100]}", ErrorCode.BAD_REQUEST)
        name = validate_name(request.get("name"))
        size_bytes = int(request.get("size_bytes", 0))
        spec = request.get("spec") or {}
        if size_bytes <= 0 or not isinstance(spec, dict):
            raise AgentError(ErrorCode.BAD_REQUEST, "migrate-in needs a positive size_bytes and a spec object")
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
    try:
        send_reply(channel)
        log.info("receiving guest %s (%d MiB) from %s", name, size_bytes >> 20, origin)
        dm = DestinationMigration(channel, keep_guest=True)
        status = dm.run()
        if status == 0 and dm.kept_guest is not None:
            agent.registry.transition(name, "incoming", "running", guest=dm.kept_guest)
            log.info("guest %s arrived from %s and runs here (pid %d)", name, origin, dm.kept_guest.pid)
            return
        log.warning("incoming migration of guest %s from %s failed in phase %s (see the destination error above); "
                    "nothing was kept", name, origin, dm.phase)
    except Exception as err:  # never let one migration take the agent down
        log.exception("incoming migration of guest %s from %s: internal error %s", name, origin, err)
    agent.registry.remove(name, "incoming")
