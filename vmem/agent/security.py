"""How an agent proves who its peers are: shared-key HMAC, TLS, or (explicitly) nothing.

Three modes, chosen when the agent starts (``vmem agent``):

* **key** (``--key FILE``): both agents hold the same secret (``vmem keygen FILE``, mode
  0600).  Every TCP connection starts with an HMAC challenge-response
  (:func:`transport.secure.authenticate_client` / ``authenticate_server``) that also fixes
  the connection's *purpose*; after it, the whole channel -- commands, the migration stream
  and its control records -- runs through :class:`transport.secure.MacChannel`, so every
  frame is integrity-protected end to end with a per-session key.  A tampered frame breaks
  the migration (the destination discards its guest; the source guest keeps running).
* **tls** (``--tls-cert --tls-key --tls-ca``): mutual TLS with the stdlib ``ssl`` module;
  each agent presents its certificate and accepts only peers signed by the CA.  Can be
  combined with ``--key``.
* **none** (``--insecure``, or a loopback listen address): no authentication.  Listening
  on a non-loopback address this way is refused unless ``--insecure`` is given.

The agent uses the same configuration for the connections it makes (outgoing migrations),
so a pair of agents must be configured alike; a mismatch is a clear error on both sides.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from vmem.errors import ConfigError

__all__ = ["PeerSecurity", "is_loopback", "local_peer_uid"]


def is_loopback(host: str) -> bool:
    """True if ``host`` (name or address) resolves only to loopback addresses."""
    if host in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def local_peer_uid(sock: socket.socket) -> int | None:
    """The uid owning the other end of the TCP connection ``sock``, if that end is on this
    host (in this network namespace); None for a remote peer.

    TCP has no ``SO_PEERCRED``; the kernel's socket table (``/proc/net/tcp``, ``tcp6``)
    lists every local socket with its owner, and the peer's socket is the one whose local
    address is our remote one and whose remote address is our local one.

    Raises:
        OSError: the peer address is local but its socket is not in the table (it closed).
    """
    import struct

    peer = sock.getpeername()
    ours = sock.getsockname()
    peer_ip = ipaddress.ip_address(peer[0])
    if not (peer_ip.is_loopback or _is_local_address(peer_ip)):
        return None

    def entry(ip: str, port: int, width: int) -> str:
        addr = ipaddress.ip_address(ip)
        if width == 16 and addr.version == 4:
            addr = ipaddress.IPv6Address(f"::ffff:{addr}")
        elif width == 4 and addr.version == 6:
            if addr.ipv4_mapped is None:
                return ""
            addr = addr.ipv4_mapped
        # The table prints each 32-bit word of the address in host byte order.
        words = struct.unpack(f"<{width // 4}I", addr.packed)
        return "".join(f"{w:08X}" for w in words) + f":{port:04X}"

    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        want_local, want_remote = entry(peer[0], peer[1], width), entry(ours[0], ours[1], width)
        if not want_local or not want_remote:
            continue
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 7 and fields[1] == want_local and fields[2] == want_remote:
                        return int(fields[7])
        except FileNotFoundError:
            continue
    raise OSError(f"no local socket {peer[0]}:{peer[1]} in the kernel's socket table")


def _is_local_address(ip) -> bool:
    """True if ``ip`` is an address of this host (a peer there is a local process)."""
    s = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((str(ip), 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


@dataclass
class PeerSecurity:
    """The agent's authentication configuration (see the module docstring).

    Attributes:
        key: the shared secret, or None.
        tls_server / tls_client: ``ssl.SSLContext`` for accepted / made connections, or None.
    """

    key: bytes | None = None
    tls_server: object = None
    tls_client: object = None

    @property
    def mode(self) -> str:
        parts = [m for m, on in (("tls", self.tls_server is not None), ("key", self.key is not None)) if on]
        return "+".join(parts) or "none"

    @classmethod
    def from_options(cls, *, listen_host: str, key_file: str | None = None, tls_cert: str | None = None,
                     tls_key: str | None = None, tls_ca: str | None = None, insecure: bool = False) -> "PeerSecurity":
        """Load the key/certificates and enforce the listening rule.

        Raises:
            ConfigError: naming the flag: a missing/unsafe key file, incomplete TLS options,
                or a non-loopback ``listen_host`` without authentication and without ``insecure``.
        """
        from transport import TransportError

        sec = cls()
        if key_file:
            from transport.secure import load_key

            try:
                sec.key = load_key(key_file)
            except (TransportError, OSError, ValueError) as err:
                raise ConfigError("--key", str(err)) from None
        tls = (tls_cert, tls_key, tls_ca)
        if any(tls):
            if not all(tls):
                raise ConfigError("--tls-cert", "TLS needs all three of --tls-cert, --tls-key and --tls-ca "
                                                "(this agent's certificate and key, and the CA its peers are signed by)")
            from transport.secure import client_tls_context, server_tls_context

            try:
                sec.tls_server = server_tls_context(tls_cert, tls_key, tls_ca)
                sec.tls_client = client_tls_context(tls_ca, tls_cert, tls_key)
            except (TransportError, OSError, ValueError) as err:
                raise ConfigError("--tls-cert", f"cannot load the TLS certificates: {err}") from None
        if sec.mode == "none" and not insecure and not is_loopback(listen_host):
            raise ConfigError("--listen",
                              f"refusing to listen on {listen_host} without authentication: anyone who can reach it could "
                              "create guests here and push memory into this host.  Give --key FILE (make one with "
                              "`vmem keygen FILE` and copy it to every host) or --tls-cert/--tls-key/--tls-ca; or add "
                              "--insecure if this network is trusted")
        return sec

    # --- server side -------------------------------------------------------------------------
    def accept(self, channel):
        """Secure an accepted connection.

        Returns:
            (channel, purpose): the channel to use from now on (TLS- and/or MAC-wrapped), and
            the purpose the peer authenticated for (None in mode ``none``: the opening says).

        Raises:
            AuthError (a TransportError): the peer failed authentication (wrong key, not
                speaking the handshake, bad certificate); the caller logs it and closes.
        """
        purpose = None
        if self.tls_server is not None:
            from transport.secure import tls_server_channel

            channel = tls_server_channel(channel, self.tls_server)  # consumes the plain channel
        if self.key is not None:
            from transport.secure import MacChannel, authenticate_server

            purpose, session_key = authenticate_server(channel, self.key)
            channel = MacChannel(channel, session_key, "server")
        return channel, purpose

    # --- client side -------------------------------------------------------------------------
    def connect(self, channel, purpose: str, server_hostname: str):
        """Secure a connection this agent made; returns the channel to use from now on.

        Raises:
            AuthError (a TransportError): the peer refused our key or certificate, or it
                speaks no authentication at all.
        """
        if self.tls_client is not None:
            from transport.secure import tls_client_channel

            channel = tls_client_channel(channel, self.tls_client, server_hostname)  # consumes the plain channel
        if self.key is not None:
            from transport.secure import MacChannel, authenticate_client

            session_key = authenticate_client(channel, self.key, purpose)
            channel = MacChannel(channel, session_key, "client")
        return channel
