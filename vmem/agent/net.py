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


class SnapshotSendChannel:
    """Sends a private copy of each ``send_parts`` call, so the bytes MACed are the bytes sent.

    WORKAROUND (remove when :class:`transport.secure.MacChannel` copies before it MACs):
    the migrator sends guest RAM as views of the live mapping while the guest runs.
    ``MacChannel`` computes the tag over the view and then sends the view: a guest write
    in between changes the bytes on the wire but not the tag, and the receiver rejects the
    frame ("integrity check failed ... tag mismatch").  Copying each call first (one
    memcpy, at most one PAGE_DATA record of 4 MiB at a time) makes tag and payload agree;
    a page the guest dirtied meanwhile is re-sent next round as always.

    Everything else is delegated to ``inner``, which this channel owns.
    """

    def __init__(self, inner):
        self._inner = inner
        self._buf = bytearray(0)

    def send_parts(self, parts) -> None:
        views = [memoryview(p).cast("B") if memoryview(p).format != "B" or memoryview(p).ndim != 1 else memoryview(p)
                 for p in parts]
        total = sum(v.nbytes for v in views)
        if len(self._buf) < total:
            self._buf = bytearray(max(total, 2 * len(self._buf)))
        out = memoryview(self._buf)
        at = 0
        for v in views:
            out[at:at + v.nbytes] = v
            at += v.nbytes
        self._inner.send_parts((out[:total],))

    def send(self, data) -> None:
        self.send_parts((data,))

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @property
    def inner(self):
        return self._inner

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._inner.close()
