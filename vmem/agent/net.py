"""TCP for the agent: listen, accept, connect, parse ``HOST:PORT``.

Thin on purpose: the real work is :mod:`transport.tcp` (TCP_NODELAY, big buffers, clear
errors).  Kept as one seam so the agent's modules name a single place for sockets.
"""
from __future__ import annotations

# Attribute access, not ``from transport.tcp import ...``: the from-import form probes the
# module's ``__path__``, which transport.tcp's lazy ``__getattr__`` must answer too.
import transport.tcp as _tcp

accept_channel = _tcp.accept_channel
connect_tcp = _tcp.connect_tcp
format_hostport = _tcp.format_hostport
listen_tcp = _tcp.listen_tcp
parse_hostport = _tcp.parse_hostport

__all__ = ["accept_channel", "connect_tcp", "format_hostport", "listen_tcp", "parse_hostport"]
