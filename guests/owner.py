"""Owner sockets: how a guest that outlived its agent is taken over by the next one.

An agent *detaches* each guest it keeps (``Command.DETACH``): the guest clears its
``PR_SET_PDEATHSIG``, binds a listening unix socket at the path the agent names (inside the
agent's 0700 state directory; the guest binds it so that SO_PEERCRED on a connection names
the guest) and keeps a per-guest secret *token* (32 random bytes, also written to the
agent's 0600 guest record); from then on it serves that socket on a thread of its own
that sleeps in ``accept()`` (no polling).  When its owner goes away the guest keeps
running its workload; the next agent connects and proves, with the token, that it is the
owner -- and the guest proves the same back -- before the guest hands over its control
block and RAM memfds.  That connection then becomes the guest's command socket.

The take-over, on one unix stream connection (every message: u16 big-endian length,
then that many bytes)::

    guest -> agent   "VMEMGST1" | nonce_g (16)                       or  "-" | reason (UTF-8)
    agent -> guest   "VMEMOWN1" | nonce_a (16) | HMAC(token, "owner" | nonce_g | nonce_a)
    guest -> agent   "+" | HMAC(token, "guest" | nonce_a | nonce_g)   + SCM_RIGHTS [ctl, ram]
                                                                     or  "-" | reason

Checks on the guest's side, in order: the connecting process runs as the guest's user or
root (``SO_PEERCRED``); the guest has no live owner (its current command socket is hung
up -- an agent that is still running keeps its guests); the agent's MAC.  On the agent's
side (:func:`take_over`): the peer's ``SO_PEERCRED`` pid and uid are the recorded ones,
then the guest's MAC.  Each MAC binds both nonces, so neither side can replay the other's
answer, and neither side learns the token from the exchange.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import select
import socket
import struct

__all__ = ["GUEST_HELLO", "OWNER_HELLO", "TOKEN_BYTES", "TakeOverRefused", "serve_take_over", "take_over",
           "peer_credentials", "MAX_MESSAGE_BYTES"]

GUEST_HELLO = b"VMEMGST1"
OWNER_HELLO = b"VMEMOWN1"
NONCE_BYTES = 16
TOKEN_BYTES = 32
MAC_BYTES = 32
#: Longest message either side accepts (a refusal's reason is cut to fit).
MAX_MESSAGE_BYTES = 512
#: How long either side waits for the other's next message.
MESSAGE_TIMEOUT_S = 5.0


class TakeOverRefused(Exception):
    """The take-over did not happen; the message says why (one line)."""


def _mac(token: bytes, label: bytes, *nonces: bytes) -> bytes:
    return hmac.new(token, label + b"".join(nonces), hashlib.sha256).digest()


def send_message(sock: socket.socket, payload: bytes, fds: list[int] | None = None) -> None:
    data = struct.pack(">H", len(payload)) + payload
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def recv_message(sock: socket.socket, what: str) -> tuple[bytes, list[int]]:
    """One length-prefixed message (and any fds riding on its first byte).

    Raises:
        TakeOverRefused: the peer closed, was silent for MESSAGE_TIMEOUT_S, or sent too much.
    """
    sock.settimeout(MESSAGE_TIMEOUT_S)
    buf = b""
    fds: list[int] = []
    try:
        while len(buf) < 2:
            data, got, _flags, _addr = socket.recv_fds(sock, 2 - len(buf), 4)
            fds.extend(got)
            if not data:
                raise TakeOverRefused(f"the peer closed the connection before {what}")
            buf += data
        (n,) = struct.unpack(">H", buf)
        if n > MAX_MESSAGE_BYTES:
            raise TakeOverRefused(f"{what} of {n} bytes is longer than {MAX_MESSAGE_BYTES}: not a vmem peer")
        payload = b""
        while len(payload) < n:
            data = sock.recv(n - len(payload))
            if not data:
                raise TakeOverRefused(f"the peer closed the connection during {what}")
            payload += data
    except socket.timeout:
        for fd in fds:
            os.close(fd)
        raise TakeOverRefused(f"no {what} within {MESSAGE_TIMEOUT_S:g} s") from None
    except OSError as err:
        for fd in fds:
            os.close(fd)
        raise TakeOverRefused(f"{what}: {err.strerror or err}") from None
    except TakeOverRefused:
        for fd in fds:
            os.close(fd)
        raise
    return payload, fds


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """``(pid, uid)`` of the process at the other end of a unix socket (``SO_PEERCRED``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


def hung_up(sock: socket.socket | None) -> bool:
    """True if ``sock`` is gone or its peer closed it (reads nothing: ``POLLRDHUP``)."""
    if sock is None or sock.fileno() < 0:
        return True
    p = select.poll()
    p.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return bool(p.poll(0))


def _refuse(conn: socket.socket, reason: str) -> None:
    try:
        send_message(conn, b"-" + reason.encode()[: MAX_MESSAGE_BYTES - 1])
    except OSError:
        pass


def serve_take_over(conn: socket.socket, token: bytes, fds: list[int], has_live_owner, on_proven) -> bool:
    """The guest's side of one take-over attempt on the accepted ``conn``.

    Args:
        token: the secret the detaching agent gave this guest.
        fds: what a proven owner receives (control block, RAM).
        has_live_owner: called after the uid check; True refuses (an agent that still runs
            keeps its guests).
        on_proven: called with ``conn`` once the agent proved the token, before the guest
            answers, so that a command the new owner posts at once finds it in place.

    Returns True if ``conn`` now belongs to a proven owner (the caller makes it the command
    socket); False after a refusal (the caller closes ``conn``).  Never raises for anything
    the peer does.
    """
    try:
        _pid, uid = peer_credentials(conn)
    except OSError:
        return False
    if uid not in (0, os.getuid()):
        _refuse(conn, f"uid {uid} may not take this guest over: only its own user (uid {os.getuid()}) or root may")
        return False
    if has_live_owner():
        _refuse(conn, "this guest has a live owner (an agent that runs keeps its guests): stop that agent first")
        return False
    nonce_g = os.urandom(NONCE_BYTES)
    try:
        send_message(conn, GUEST_HELLO + nonce_g)
        msg, stray = recv_message(conn, "the owner's proof")
    except (OSError, TakeOverRefused):
        return False
    for fd in stray:
        os.close(fd)
    head = len(OWNER_HELLO)
    if len(msg) != head + NONCE_BYTES + MAC_BYTES or msg[:head] != OWNER_HELLO:
        _refuse(conn, "not a vmem agent's take-over message")
        return False
    nonce_a = msg[head:head + NONCE_BYTES]
    if not hmac.compare_digest(msg[head + NONCE_BYTES:], _mac(token, b"owner", nonce_g, nonce_a)):
        _refuse(conn, "wrong token: this agent is not the guest's owner (its guest record is not the one this "
                      "guest was detached with)")
        return False
    on_proven(conn)
    try:
        send_message(conn, b"+" + _mac(token, b"guest", nonce_a, nonce_g), fds)
    except OSError:
        pass  # the new owner is gone already: the next one finds its socket hung up
    return True


def take_over(sock: socket.socket, token: bytes, pid: int, uid: int) -> list[int]:
    """The agent's side: prove ownership to the guest on the connected ``sock`` and check it
    is the recorded process; returns the guest's fds ``[ctl, ram]`` (the caller owns them).

    Raises:
        TakeOverRefused: the peer is not the recorded guest (pid/uid), refused us (its
            reason), or failed its own proof; nothing was received then.
    """
    peer_pid, peer_uid = peer_credentials(sock)
    if peer_pid != pid or peer_uid != uid:
        raise TakeOverRefused(f"the process on the guest's socket is pid {peer_pid} uid {peer_uid}, not the recorded "
                              f"pid {pid} uid {uid}: refused")
    msg, stray = recv_message(sock, "the guest's hello")
    for fd in stray:
        os.close(fd)
    if msg[:1] == b"-":
        raise TakeOverRefused(f"the guest refused: {msg[1:].decode(errors='replace')}")
    if len(msg) != len(GUEST_HELLO) + NONCE_BYTES or msg[:len(GUEST_HELLO)] != GUEST_HELLO:
        raise TakeOverRefused("the guest's socket does not speak the vmem take-over protocol")
    nonce_g = msg[len(GUEST_HELLO):]
    nonce_a = os.urandom(NONCE_BYTES)
    send_message(sock, OWNER_HELLO + nonce_a + _mac(token, b"owner", nonce_g, nonce_a))
    msg, fds = recv_message(sock, "the guest's proof")
    ok = (msg[:1] == b"+" and len(msg) == 1 + MAC_BYTES
          and hmac.compare_digest(msg[1:], _mac(token, b"guest", nonce_a, nonce_g)) and len(fds) == 2)
    if not ok:
        for fd in fds:
            os.close(fd)
        if msg[:1] == b"-":
            raise TakeOverRefused(f"the guest refused: {msg[1:].decode(errors='replace')}")
        raise TakeOverRefused("the guest failed its proof of the token (or sent no descriptors): refused")
    return fds
