"""vmem transport: byte channels between migration processes.

What you may use is listed in ``__all__``; everything else is private.

* :class:`Channel` -- the contract (``send_parts``/``recv_into``, counters, timeouts);
  :class:`SocketChannel` implements it over a stream socket, :func:`channel_pair` makes a
  connected unix pair, :func:`channel_from_fd` rebuilds one in a child process;
* :func:`send_fds` / :func:`recv_fds` -- pass file descriptors (memfds) over a unix socket;
* :class:`ShapedChannel`, :class:`TokenBucket`, :func:`parse_rate` -- bandwidth shaping;
* errors: :class:`TransportError` > :class:`ChannelClosedError` (we closed it),
  :class:`ChannelBrokenError` (the peer broke it), :class:`ChannelTimeout`.

This package imports nothing from ``vmem`` or ``guests``: dependencies point one way.
"""
from .channel import (
    IOV_MAX,
    MAX_IO_BYTES,
    SOCKET_BUFFER_BYTES,
    Channel,
    SocketChannel,
    channel_from_fd,
    channel_pair,
    recv_fds,
    send_fds,
    set_tcp_nodelay,
)
from .errors import ChannelBrokenError, ChannelClosedError, ChannelTimeout, TransportError
from .shaping import ShapedChannel, TokenBucket, default_burst_bytes, parse_rate

__all__ = [
    # channels
    "Channel",
    "SocketChannel",
    "channel_pair",
    "channel_from_fd",
    "set_tcp_nodelay",
    "IOV_MAX",
    "MAX_IO_BYTES",
    "SOCKET_BUFFER_BYTES",
    # fd passing
    "send_fds",
    "recv_fds",
    # shaping
    "parse_rate",
    "default_burst_bytes",
    "TokenBucket",
    "ShapedChannel",
    # errors
    "TransportError",
    "ChannelClosedError",
    "ChannelBrokenError",
    "ChannelTimeout",
]

# -- between hosts: TCP, striped connections, compression, security, page-batch codec -------
# (transport.tcp, transport.striped, transport.compressed, transport.secure, transport.codec)
from .codec import CodecError, decode_batch, encode_batch, method_unavailable, zero_page_mask
from .compressed import CompressedChannel
from .secure import (
    AuthError,
    KeyFileError,
    MacChannel,
    TlsChannel,
    authenticate_client,
    authenticate_server,
    client_tls_context,
    generate_key,
    load_key,
    server_tls_context,
    tls_client_channel,
    tls_server_channel,
)
from .striped import StripedChannel
from .tcp import (
    ConnectError,
    ListenError,
    accept_channel,
    configure_tcp_socket,
    connect_tcp,
    format_hostport,
    listen_tcp,
    parse_hostport,
)

__all__ += [
    # tcp
    "parse_hostport",
    "format_hostport",
    "listen_tcp",
    "connect_tcp",
    "accept_channel",
    "configure_tcp_socket",
    "ConnectError",
    "ListenError",
    # one stream over several connections; zero pages as a bitmap / compression
    "StripedChannel",
    "CompressedChannel",
    # security
    "generate_key",
    "load_key",
    "authenticate_client",
    "authenticate_server",
    "MacChannel",
    "TlsChannel",
    "server_tls_context",
    "client_tls_context",
    "tls_client_channel",
    "tls_server_channel",
    "AuthError",
    "KeyFileError",
    # codec
    "zero_page_mask",
    "encode_batch",
    "decode_batch",
    "method_unavailable",
    "CodecError",
]
