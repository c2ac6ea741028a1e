"""The agent protocol: framing, the opening handshake, requests, replies and events.

Every connection to an agent -- the local CLI on the unix control socket, another agent
on the TCP port -- speaks the same framed JSON, after the security layer (see
:mod:`vmem.agent.security`) has authenticated the peer where one is configured::

    opening (client -> agent)         MAGIC (8 bytes "VMEMAGT\\n")  frame {"version": 1, "purpose": "command"}
    opening reply (agent -> client)   MAGIC                         frame {"ok": true, "version": 1, "agent": {...}}
    request                           frame {"op": "create", ...}
    events (streamed ops only)        frame {"event": "phase", ...}   (zero or more)
    reply                             frame {"ok": true, ...} | {"ok": false, "code": "exists", "error": "..."}

    frame = u32 big-endian length of the body | body: a UTF-8 JSON object (at most MAX_FRAME_BYTES)

A ``migrate-in`` connection sends one request ``{"op": "migrate-in", "name", "size_bytes",
"spec"}``; after an ``ok`` reply (and the clock ping-pongs it agreed to, see
:mod:`vmem.agent.migration`) the same channel carries the Xen migration stream
(docs/stream.md) and its control records, exactly as in a one-host migration.

Compatibility rule: ``version`` is the protocol version; an agent refuses a peer of a
different version in the opening reply (code ``version``), naming both versions, before
anything else happens.  Adding optional keys to a message is compatible; anything else
bumps ``PROTOCOL_VERSION``.
"""
from __future__ import annotations

import json
import struct

from transport import TransportError

from vmem.errors import VmemError
from vmem.jsonout import json_default

__all__ = [
    "PROTOCOL_VERSION", "MAGIC", "MAX_FRAME_BYTES", "MAX_OPENING_FRAME_BYTES", "MAX_UNAUTHENTICATED_FRAME_BYTES",
    "RECV_CHUNK_BYTES", "PURPOSES", "ErrorCode",
    "AgentError", "ProtocolError", "send_frame", "recv_frame", "send_reply", "send_error",
    "client_hello", "server_hello", "send_refusal", "raise_for_reply",
]

#: Version of this protocol (see the compatibility rule above).
PROTOCOL_VERSION = 1
#: Opening bytes of both directions: a peer that speaks something else is told apart at once.
MAGIC = b"VMEMAGT\n"
#: Largest frame body accepted (a report of a thousand rounds is well under 1 MiB).
MAX_FRAME_BYTES = 16 << 20
#: Largest opening frame (``{"version", "purpose"}``) an agent reads: the opening comes
#: before anything proves who the peer is, so it may not make the agent allocate more.
MAX_OPENING_FRAME_BYTES = 4 << 10
#: Largest frame an agent reads from a peer nothing has authenticated (mode none, before a
#: migration's stream): the migrate-in / attach / postcopy-resume requests are far smaller.
MAX_UNAUTHENTICATED_FRAME_BYTES = 64 << 10
#: A frame body is read in pieces of at most this size, so memory grows with the bytes that
#: actually arrived, never with the length a peer announced (docs/security.md).
RECV_CHUNK_BYTES = 64 << 10
#: What a connection is for: CLI or remote commands, one incoming migration, or an extra
#: connection of a migration (a data connection for --parallel, the post-copy urgent one),
#: which names its migration with the session token the migrate-in reply gave.
PURPOSES = ("command", "migrate-in", "vmem-data", "vmem-urgent")

_LENGTH = struct.Struct(">I")


class ErrorCode:
    """The ``code`` of an error reply: what a script can branch on (the message is for humans)."""

    BAD_REQUEST = "bad-request"     # malformed request or invalid argument
    PROTOCOL = "protocol"           # the peer does not speak this protocol
    VERSION = "version"             # protocol version mismatch
    AUTH = "auth"                   # authentication failed or missing
    EXISTS = "exists"               # a guest of that name is already there
    NO_SUCH_GUEST = "no-such-guest"
    BUSY = "busy"                   # the guest is in a state that does not allow the operation
    TOO_BIG = "too-big"             # not enough free memory for the guest
    UNAVAILABLE = "unavailable"     # a feature this agent does not have (e.g. save/restore)
    UNREACHABLE = "unreachable"     # the destination agent cannot be reached
    FAILED = "failed"               # the operation ran and failed (the message says why)
    INTERNAL = "internal"           # a bug in the agent
    LIMIT = "limit"                 # too many connections (from this peer, or in total): retry later


class AgentError(VmemError):
    """An agent refused or failed a request, or the CLI could not talk to an agent.

    Attributes:
        code: one of :class:`ErrorCode` (survives the trip over the wire).
        message: what happened and what to do, for humans.
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ProtocolError(AgentError):
    """The peer sent bytes that are not this protocol (or not this version of it)."""

    def __init__(self, message: str, code: str = ErrorCode.PROTOCOL):
        super().__init__(code, message)


def send_frame(channel, obj: dict) -> None:
    """Send one frame holding ``obj`` (a JSON-serialisable dict)."""
    body = json.dumps(obj, separators=(",", ":"), default=json_default).encode()
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {MAX_FRAME_BYTES}-byte frame limit")
    channel.send_parts((_LENGTH.pack(len(body)), body))


def recv_frame(channel, max_bytes: int = MAX_FRAME_BYTES) -> dict:
    """Receive one frame of at most ``max_bytes`` and return its JSON object.

    Guarantee: memory grows with the bytes received, in steps of at most
    :data:`RECV_CHUNK_BYTES`; an announced length that never arrives costs nothing.

    Raises:
        ProtocolError: the length is out of bounds or the body is not a JSON object
            (the length is checked before anything is allocated for the body).
        TransportError: the connection ended or broke (``ChannelBrokenError`` on EOF).
    """
    (length,) = _LENGTH.unpack(channel.recv_exact(_LENGTH.size))
    if length == 0 or length > max_bytes:
        raise ProtocolError(f"frame length {length} is out of bounds (1..{max_bytes})")
    body = _recv_incrementally(channel, length)
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"frame is not JSON: {err}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame holds a JSON {type(obj).__name__}, not an object")
    return obj


def _recv_incrementally(channel, length: int) -> bytes:
    """``length`` bytes from ``channel``, read in pieces of at most :data:`RECV_CHUNK_BYTES`."""
    if length <= RECV_CHUNK_BYTES:
        return channel.recv_exact(length)
    body = bytearray()
    while len(body) < length:
        body += channel.recv_exact(min(RECV_CHUNK_BYTES, length - len(body)))
    return bytes(body)


def send_reply(channel, **fields) -> None:
    send_frame(channel, {"ok": True} | fields)


def send_error(channel, code: str, message: str) -> None:
    """Send an error reply (best effort: a peer that already left is ignored)."""
    try:
        send_frame(channel, {"ok": False, "code": code, "error": message})
    except (TransportError, OSError, VmemError):
        pass


def raise_for_reply(reply: dict, who: str = "agent") -> dict:
    """Return ``reply`` if it says ok; raise its error as :class:`AgentError` otherwise."""
    if reply.get("ok") is True:
        return reply
    if reply.get("ok") is False:
        raise AgentError(str(reply.get("code", ErrorCode.FAILED)), f"{who}: {reply.get('error', reply)}")
    raise ProtocolError(f"{who} sent a message that is neither a reply nor an event: {str(reply)[:200]}")


def _expect_magic(channel, who: str) -> None:
    head = channel.recv_exact(len(MAGIC))
    if head != MAGIC:
        hint = ""
        if head[:4] == b"VMAU":
            hint = " (it authenticates with a shared key: give this agent the same --key FILE)"
        elif head[:1] == b"\x16":
            hint = " (it looks like TLS: configure --tls-cert/--tls-key/--tls-ca on both agents)"
        elif head[:4] in (b"HTTP", b"GET ", b"SSH-"):
            hint = f" (it speaks {head[:4].decode().strip()})"
        raise ProtocolError(f"{who} does not speak the vmem agent protocol: it sent {head!r}{hint}")


def client_hello(channel, purpose: str, who: str) -> dict:
    """Open a connection as a client; returns the agent's opening reply.

    Raises:
        ProtocolError: the peer is not a vmem agent, or of another protocol version.
        AgentError: the agent refused the connection (its message says why).
    """
    channel.send_parts((MAGIC, *_frame_parts({"version": PROTOCOL_VERSION, "purpose": purpose})))
    _expect_magic(channel, who)
    reply = recv_frame(channel)
    if reply.get("ok") is False and reply.get("code") == ErrorCode.VERSION:
        raise ProtocolError(f"{who}: {reply.get('error')}", ErrorCode.VERSION)
    raise_for_reply(reply, who)
    if reply.get("version") != PROTOCOL_VERSION:
        raise ProtocolError(f"{who} speaks agent protocol version {reply.get('version')!r}; this vmem speaks "
                            f"{PROTOCOL_VERSION}: run the same vmem version on both hosts", ErrorCode.VERSION)
    return reply


def server_hello(channel, agent_info: dict, allowed_purposes=PURPOSES, refusals: dict | None = None,
                 accepted=None) -> str:
    """Answer a connection's opening as the agent; returns the client's purpose.

    On a bad opening the client is told why (when it speaks enough of the protocol to
    read it) and the error is raised for the agent to log.  The opening frame is read with
    a bound of :data:`MAX_OPENING_FRAME_BYTES`.  ``refusals`` maps a purpose that is known
    but not accepted on this connection to the reason told to the client (code ``auth``).
    ``accepted()``, if given, runs once the opening is accepted and before the client is
    told so: what it records is in place when the client sees the reply.

    Raises:
        ProtocolError: garbage, a version mismatch, or an unknown or refused purpose.
    """
    try:
        _expect_magic(channel, "peer")
        hello = recv_frame(channel, MAX_OPENING_FRAME_BYTES)
    except ProtocolError:
        raise  # nothing useful can be said to a peer that speaks something else
    version = hello.get("version")
    if version != PROTOCOL_VERSION:
        err = ProtocolError(f"peer speaks agent protocol version {version!r}, this agent speaks {PROTOCOL_VERSION}: "
                            "run the same vmem version on both hosts", ErrorCode.VERSION)
        channel.send(MAGIC)
        send_error(channel, err.code, err.message)
        raise err
    purpose = hello.get("purpose")
    if refusals and isinstance(purpose, str) and purpose in refusals:
        err = ProtocolError(refusals[purpose], ErrorCode.AUTH)
        channel.send(MAGIC)
        send_error(channel, err.code, err.message)
        raise err
    if purpose not in allowed_purposes:
        err = ProtocolError(f"purpose {purpose!r} is not accepted here (expected {' or '.join(allowed_purposes)})",
                            ErrorCode.BAD_REQUEST)
        channel.send(MAGIC)
        send_error(channel, err.code, err.message)
        raise err
    if accepted is not None:
        accepted()
    channel.send_parts((MAGIC, *_frame_parts({"ok": True, "version": PROTOCOL_VERSION, "agent": agent_info})))
    return purpose


def send_refusal(channel, code: str, message: str) -> None:
    """Open with :data:`MAGIC` and send one error reply, so a vmem client reads the reason
    where it expects the opening reply (best effort: the peer may be gone)."""
    try:
        channel.send_parts((MAGIC, *_frame_parts({"ok": False, "code": code, "error": message})))
    except (TransportError, OSError, VmemError):
        pass


def _frame_parts(obj: dict) -> tuple[bytes, bytes]:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)), body


