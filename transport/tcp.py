"""TCP channels between hosts: address parsing, listening, connecting, accepting.

Every TCP socket this module hands out is configured the same way, whichever side made it:

* ``TCP_NODELAY`` -- our small control records must not wait for a delayed ACK (Nagle);
* ``SO_SNDBUF``/``SO_RCVBUF`` = :data:`~transport.channel.SOCKET_BUFFER_BYTES` -- set
  *before* the handshake (on the listening socket, or before ``connect``), because TCP
  fixes the window-scale factor in the SYN: a receive buffer raised later cannot be
  advertised in full;
* blocking mode, no timeout (callers use :meth:`Channel.settimeout` when they want one).

Connection failures raise :class:`ConnectError` (a :class:`TransportError`) whose message
names ``host:port`` and says what to check, e.g.::

    cannot connect to 10.213.0.2:7000: connection refused -- is `vmem agent` running there
    and listening on port 7000?
"""
from __future__ import annotations

import errno
import ipaddress
import re
import socket

from .channel import SOCKET_BUFFER_BYTES, SocketChannel
from .errors import ChannelTimeout, TransportError

__all__ = [
    "DEAD_PEER_TIMEOUT_S",
    "set_dead_peer_timeout",
    "ConnectError",
    "ListenError",
    "parse_hostport",
    "format_hostport",
    "listen_tcp",
    "connect_tcp",
    "accept_channel",
    "configure_tcp_socket",
]

# Seconds connect_tcp waits for the TCP handshake by default.
DEFAULT_CONNECT_TIMEOUT_S = 10.0

_AGENT_HINT = "is `vmem agent` running there and listening on port {port}?"


class ConnectError(TransportError):
    """A TCP connection to ``host:port`` could not be established.

    Attributes:
        host, port: where we tried to connect.
        reason: what went wrong ("connection refused", "timed out after 10 s", ...).
    """

    def __init__(self, host: str, port: int, reason: str, hint: str = ""):
        where = format_hostport(host, port)
        message = f"cannot connect to {where}: {reason}"
        if hint:
            message += f" -- {hint}"
        super().__init__(message)
        self.host = host
        self.port = port
        self.reason = reason


class ListenError(TransportError):
    """We could not listen on ``host:port`` (address in use, not ours, bad name).

    Attributes:
        host, port: the address we tried to bind.
        reason: what went wrong.
    """

    def __init__(self, host: str, port: int, reason: str):
        super().__init__(f"cannot listen on {format_hostport(host, port)}: {reason}")
        self.host = host
        self.port = port
        self.reason = reason


# -- addresses ----------------------------------------------------------------------------

# A DNS name or an IPv4 address: letters, digits, '-', '.', '_' (no ':' -- that is IPv6,
# which must be bracketed when a port follows).
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _check_port(port: int, text: str) -> int:
    if not 0 <= port <= 65535:
        raise ValueError(f"invalid address {text!r}: port {port} is not in 0..65535")
    return port


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``"host:port"`` into ``(host, port)``.

    Accepted forms: ``10.0.0.1:7000``, ``localhost:7000``, ``[::1]:7000``, and -- when
    ``default_port`` is given -- ``10.0.0.1``, ``localhost``, ``[::1]`` and a bare IPv6
    address ``::1``.  IPv6 brackets are removed from the returned host.  Port 0 is allowed
    (it means "any free port" when listening).

    Raises:
        ValueError: malformed text, a missing port without ``default_port``, a port outside
            0..65535, or an unbracketed IPv6 address followed by a port; the message quotes
            the input and shows the expected form.
    """
    if not isinstance(text, str):
        raise ValueError(f"invalid address {text!r}: expected a string like 'HOST:PORT'")
    raw = text.strip()
    form_hint = "expected HOST:PORT, e.g. '10.0.0.2:7000', 'localhost:7000' or '[::1]:7000'"
    if not raw:
        raise ValueError(f"invalid address {text!r}: empty; {form_hint}")
    port_text: str | None
    if raw.startswith("["):
        close = raw.find("]")
        if close < 0:
            raise ValueError(f"invalid address {text!r}: unclosed '['; {form_hint}")
        host = raw[1:close]
        rest = raw[close + 1:]
        if rest == "":
            port_text = None
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise ValueError(f"invalid address {text!r}: unexpected {rest!r} after ']'; "
                             f"{form_hint}")
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"invalid address {text!r}: {host!r} in brackets is not an "
                             f"IPv6 address") from None
    elif raw.count(":") >= 2:
        # Only an IPv6 address has several colons; without brackets it cannot carry a port.
        try:
            ipaddress.IPv6Address(raw.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"invalid address {text!r}: {form_hint}") from None
        host, port_text = raw, None
    elif ":" in raw:
        host, port_text = raw.split(":", 1)
    else:
        host, port_text = raw, None
    if not host:
        raise ValueError(f"invalid address {text!r}: missing host; {form_hint}")
    if ":" not in host and not _NAME_RE.match(host):
        raise ValueError(f"invalid address {text!r}: bad host name {host!r}; {form_hint}")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"invalid address {text!r}: missing port; {form_hint}")
        return host, _check_port(int(default_port), text)
    if not port_text.isdigit():
        raise ValueError(f"invalid address {text!r}: port {port_text!r} is not a number; "
                         f"{form_hint}")
    return host, _check_port(int(port_text), text)


def format_hostport(host: str, port: int) -> str:
    """``host:port``, with IPv6 addresses bracketed (the inverse of :func:`parse_hostport`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- socket setup -------------------------------------------------------------------------

def _set_buffers(sock: socket.socket, buffer_bytes: int) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, buffer_bytes)
        except OSError:
            pass  # a smaller buffer is slower, not wrong; the kernel caps it at *mem_max


def configure_tcp_socket(sock: socket.socket,
                         buffer_bytes: int = SOCKET_BUFFER_BYTES) -> socket.socket:
    """Apply our TCP settings to ``sock`` (see the module docstring) and return it.

    Safe to call on a socket before or after ``connect``; buffer sizes only take full effect
    when set before the handshake.
    """
    sock.setblocking(True)
    _set_buffers(sock, buffer_bytes)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_dead_peer_timeout(sock, DEAD_PEER_TIMEOUT_S)
    return sock


#: How long a peer may stay silent on a link that carries unacknowledged data, or fail to
#: answer keepalive probes on an idle one, before the connection is declared dead.  Without
#: it a pulled cable holds a migration for TCP's ~15 minutes of retries, and a destination
#: whose source vanished waits in recv() forever.
DEAD_PEER_TIMEOUT_S = 6.0


def set_dead_peer_timeout(sock: socket.socket, timeout_s: float) -> None:
    """Make a dead peer an error after about ``timeout_s``: ``TCP_USER_TIMEOUT`` (unacked
    data) plus keepalive probes (idle links).  Blocked calls then fail with ETIMEDOUT, which
    the channel reports as a broken connection.  Best effort on platforms without them."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    idle_s = max(1, int(timeout_s / 2))
    probes = 4
    interval_s = max(1, int((timeout_s - idle_s) / probes))
    for level, opt, value in ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                              (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), idle_s),
                              (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), interval_s),
                              (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), probes),
                              (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), int(timeout_s * 1000))):
        if opt is None:
            continue
        try:
            sock.setsockopt(level, opt, value)
        except OSError:
            pass


def _resolve(host: str, port: int, *, passive: bool) -> list[tuple]:
    flags = socket.AI_PASSIVE if passive else 0
    return socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                              socket.IPPROTO_TCP, flags)


def listen_tcp(host: str, port: int, backlog: int = 16) -> socket.socket:
    """A listening TCP socket bound to ``host:port`` (``SO_REUSEADDR`` set).

    ``port`` 0 picks a free port: read it with ``sock.getsockname()[1]``.  ``host`` ``""``
    or ``"0.0.0.0"`` listens on every IPv4 address, ``"::"`` on every address.  The socket's
    buffers are set (accepted connections inherit them) before ``listen``.  The caller owns
    the socket and must close it.

    Raises:
        ListenError: the name does not resolve, the address is in use or not local.
    """
    try:
        infos = _resolve(host, port, passive=True)
    except socket.gaierror as err:
        raise ListenError(host, port, f"cannot resolve host name ({err.strerror})") from err
    last: OSError | None = None
    for family, kind, proto, _canon, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and host in ("", "::"):
                # "::" means every address, IPv4-mapped ones too.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            _set_buffers(sock, SOCKET_BUFFER_BYTES)
            sock.bind(addr)
            sock.listen(backlog)
            return sock
        except OSError as err:
            sock.close()
            last = err
    assert last is not None
    if last.errno == errno.EADDRINUSE:
        reason = "address already in use (another `vmem agent` on this port?)"
    elif last.errno == errno.EADDRNOTAVAIL:
        reason = "address not available on this host (not one of its addresses)"
    elif last.errno == errno.EACCES:
        reason = "permission denied (ports below 1024 need root)"
    else:
        reason = last.strerror or str(last)
    raise ListenError(host, port, reason) from last


def connect_tcp(host: str, port: int, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
                ) -> SocketChannel:
    """Connect to ``host:port`` and return a configured :class:`SocketChannel`.

    Tries every address the name resolves to, in order.  ``timeout_s`` bounds each
    handshake; the returned channel is blocking with no timeout.

    Raises:
        ConnectError: the name does not resolve, the connection was refused, timed out, or
            the host/network is unreachable; the message names ``host:port`` and what to
            check.
        ValueError: ``timeout_s`` is not > 0.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    hint = _AGENT_HINT.format(port=port)
    try:
        infos = _resolve(host, port, passive=False)
    except socket.gaierror as err:
        raise ConnectError(host, port, f"cannot resolve host name ({err.strerror})",
                           "check the spelling, or use an IP address") from err
    last: OSError | None = None
    for family, kind, proto, _canon, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            # Buffers before connect: the SYN carries the window scale (module docstring).
            _set_buffers(sock, SOCKET_BUFFER_BYTES)
            sock.settimeout(timeout_s)
            sock.connect(addr)
        except OSError as err:
            sock.close()
            last = err
            continue
        return SocketChannel(configure_tcp_socket(sock))
    assert last is not None
    if isinstance(last, ConnectionRefusedError):
        raise ConnectError(host, port, "connection refused", hint) from last
    if isinstance(last, TimeoutError) or last.errno == errno.ETIMEDOUT:
        raise ConnectError(host, port, f"timed out after {timeout_s:g} s",
                           f"is the host reachable (firewall?) and {hint}") from last
    if last.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        raise ConnectError(host, port, f"{last.strerror.lower()}",
                           "check the address and the route to that host") from last
    raise ConnectError(host, port, last.strerror or str(last), hint) from last


def accept_channel(listen_sock: socket.socket, timeout_s: float | None = None
                   ) -> tuple[SocketChannel, tuple]:
    """Accept one connection on ``listen_sock``; return ``(channel, peer_address)``.

    ``timeout_s`` ``None`` waits forever.  The accepted socket is configured as in the
    module docstring (blocking, no timeout) whatever ``listen_sock``'s own mode is;
    ``listen_sock``'s timeout is restored on return.

    Raises:
        ChannelTimeout: nobody connected within ``timeout_s``.
        TransportError: the listening socket failed (e.g. it was closed).
    """
    previous = listen_sock.gettimeout()
    listen_sock.settimeout(timeout_s)
    try:
        conn, peer = listen_sock.accept()
    except TimeoutError as err:
        name = listen_sock.getsockname()
        raise ChannelTimeout(f"no connection on {format_hostport(name[0], name[1])} within "
                             f"{timeout_s:g} s") from err
    except OSError as err:
        raise TransportError(f"accept failed: {err}") from err
    finally:
        try:
            listen_sock.settimeout(previous)
        except OSError:
            pass  # closed under us; the accept error says so
    try:
        return SocketChannel(configure_tcp_socket(conn)), peer
    except OSError as err:
        conn.close()
        raise TransportError(f"cannot configure accepted connection from {peer}: {err}"
                             ) from err

