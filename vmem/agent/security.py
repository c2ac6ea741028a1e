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

__all__ = ["PeerSecurity", "is_loopback"]


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
