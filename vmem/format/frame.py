"""The record frame every vmem wire format shares, and a bounded exact-read source.

One frame, used by both layers of the Xen stream (:mod:`vmem.format.stream`) and by the
vmem control protocol (:mod:`vmem.format.control`); all numbers little-endian::

    offset  octets  field
    ------  ------  ---------------------------------------------------------------
         0       4  u32 type     (a LibxcRecordType, LibxlRecordType, PostcopyRecordType
                                  or ControlType: the caller's table says which)
         4       4  u32 length   octets of body, padding excluded
         8  length  body
         .     0-7  zero padding, so that the record ends on an 8-octet boundary

Encoding returns lists of buffers for vectored sends and never copies a body.  Decoding
goes through :class:`ExactSource`, which counts octets (so every error names the offset
where it happened) and turns a short read into :class:`vmem.errors.StreamError`.
"""
from __future__ import annotations

import struct
from typing import Any, Callable, Iterable, Union

import numpy as np

from vmem.errors import StreamError
from vmem.format.wire import RECORD_ALIGN, RECORD_HEADER_BYTES

__all__ = ["Buffer", "RECORD_HEADER", "READ_AHEAD_BYTES", "pad_len", "buffer_nbytes", "as_parts",
           "frame", "ExactSource"]

Buffer = Union[bytes, bytearray, memoryview, np.ndarray]
"""Anything exposing a C-contiguous buffer: what ``send_parts`` receives."""

RECORD_HEADER = struct.Struct("<II")  # type, body_length

#: Most octets one read-ahead receive asks for (:meth:`ExactSource.read_ahead`): a stream's
#: closing records (~0.4 KiB with a guest context) and a page batch's header fit.
READ_AHEAD_BYTES = 64 << 10
_ZERO_PAD = bytes(RECORD_ALIGN)

assert RECORD_HEADER.size == RECORD_HEADER_BYTES


def pad_len(length: int) -> int:
    """Zero octets that follow a body of ``length`` octets (0-7)."""
    return -length & (RECORD_ALIGN - 1)


def buffer_nbytes(part: Buffer) -> int:
    """Octets in ``part``.

    Raises:
        ValueError: ``part`` is not C-contiguous (a vectored send could not take it).
    """
    view = memoryview(part)
    if not view.c_contiguous:
        raise ValueError("stream buffers must be C-contiguous")
    return view.nbytes


def as_parts(parts: Buffer | Iterable[Buffer]) -> list[Buffer]:
    """``parts`` as a list of buffers; a lone buffer is one part."""
    # A lone bytes object is iterable (of ints): treat any buffer as one part.
    if isinstance(parts, (bytes, bytearray, memoryview, np.ndarray)):
        return [parts]
    return list(parts)


def frame(rtype: int, body_parts: list[Buffer], length: int) -> list[Buffer]:
    """``[header, *body_parts, zero padding]``: one framed record, body not copied.

    ``length`` is the body's size (the caller measured it to check its own limit).
    """
    out: list[Buffer] = [RECORD_HEADER.pack(int(rtype), length), *body_parts]
    pad = pad_len(length)
    if pad:
        out.append(_ZERO_PAD[:pad])
    return out


class ExactSource:
    """Counts octets read through ``recv_exact``/``recv_into`` and turns a short read or
    an end-of-stream exception into :class:`StreamError` with the offset.

    Args:
        recv_exact: ``recv_exact(n) -> bytes``; a shorter result counts as truncation.
        recv_into: ``recv_into(memoryview)`` filling the whole view, or None (then
            :meth:`read_into` goes through ``recv_exact`` and a copy).
        truncation_errors: exceptions from the callables that mean "the stream ended".
        base_offset: added to every offset reported.
        recv_some: ``recv_some(max_n) -> bytes`` returning 1..max_n octets, ``b""`` only at
            the end of the stream (``Channel.recv_some``); needed for :meth:`read_ahead`.

    Read-ahead (:meth:`read_ahead`): small reads are served from one receive of up to
    :data:`READ_AHEAD_BYTES`, so a run of small records that arrived together costs one
    system call instead of two a record.  Guarantees: the octets and offsets the caller
    sees are the same either way; at most ``max(n, READ_AHEAD_BYTES)`` octets are held for
    a read of ``n`` (the caller bounds ``n``); octets read ahead are never lost -- they are
    served first, also after read-ahead is turned off (:attr:`buffered_bytes` says how many
    the source's own reads have not consumed).
    """

    def __init__(self, recv_exact: Callable[[int], bytes],
                 recv_into: Callable[[memoryview], Any] | None,
                 truncation_errors: tuple[type[BaseException], ...], base_offset: int = 0,
                 recv_some: Callable[[int], bytes] | None = None):
        self._recv_exact = recv_exact
        self._recv_into_fn = recv_into
        self._recv_some_fn = recv_some
        self._truncation_errors = truncation_errors
        self._ahead = b""        # octets received ahead of the reads; the next is _ahead[_ahead_pos]
        self._ahead_pos = 0
        self._reading_ahead = False
        self.offset = base_offset
        """Octets consumed so far plus ``base_offset`` (e.g. the length of a file header in
        front of the stream, so that errors name file offsets)."""

    def read_ahead(self, on: bool = True) -> None:
        """Serve small reads from a read-ahead buffer (on) or straight from the source (off;
        what was read ahead is still served first).

        Raises:
            RuntimeError: turned on without a ``recv_some``.
        """
        if on and self._recv_some_fn is None:
            raise RuntimeError("read-ahead needs a recv_some callable")
        self._reading_ahead = bool(on)

    @property
    def buffered_bytes(self) -> int:
        """Octets received ahead and not yet consumed by a read."""
        return len(self._ahead) - self._ahead_pos

    def read_exact(self, n: int, what: str) -> bytes:
        """Exactly ``n`` octets; ``what`` names them in the error.

        Raises:
            StreamError: the source ended (or returned fewer octets) first.
        """
        if self._reading_ahead or self._ahead_pos < len(self._ahead):
            pos = self._ahead_pos
            end = pos + n
            if end <= len(self._ahead):  # the common case, inline: all of it read ahead
                self._ahead_pos = end
                self.offset += n
                return self._ahead[pos:end]
            return self._read_buffered(n, what)
        start = self.offset
        try:
            data = self._recv_exact(n)
        except self._truncation_errors as err:
            raise StreamError(f"stream truncated in {what}: wanted {n} octets", start) from err
        if len(data) != n:
            raise StreamError(f"stream truncated in {what}: wanted {n} octets, got {len(data)}",
                              start + len(data))
        self.offset += n
        return data

    def _read_buffered(self, n: int, what: str) -> bytes:
        """:meth:`read_exact` through the read-ahead buffer, when it holds fewer than ``n``
        octets (read_exact serves the rest inline)."""
        start = self.offset
        pos = self._ahead_pos
        have = len(self._ahead) - pos
        chunks = [self._ahead[pos:]] if have else []
        self._ahead, self._ahead_pos = b"", 0
        try:
            if not self._reading_ahead:  # what was read ahead ran out: the rest as asked
                rest = self._recv_exact(n - have)
                if len(rest) != n - have:
                    raise StreamError(f"stream truncated in {what}: wanted {n} octets, got "
                                      f"{have + len(rest)}", start + have + len(rest))
                chunks.append(rest)
                have = n
            while have < n:
                more = self._recv_some_fn(max(n - have, READ_AHEAD_BYTES))
                if not more:
                    raise StreamError(f"stream truncated in {what}: wanted {n} octets, got {have}",
                                      start + have)
                chunks.append(more)
                have += len(more)
        except self._truncation_errors as err:
            raise StreamError(f"stream truncated in {what}: wanted {n} octets", start) from err
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if len(data) > n:
            self._ahead, self._ahead_pos = data, n
            data = data[:n]
        self.offset = start + n
        return data

    def read_into(self, view: memoryview, what: str) -> None:
        """Fill ``view`` completely.

        Raises:
            StreamError: the source ended first.
        """
        n = view.nbytes
        have = len(self._ahead) - self._ahead_pos
        if have:  # octets read ahead first; the rest straight into the caller's memory
            k = min(have, n)
            view[:k] = self._ahead[self._ahead_pos:self._ahead_pos + k]
            self._ahead_pos += k
            self.offset += k
            if k == n:
                return
            view, n = view[k:], n - k
        if self._recv_into_fn is None:
            view[:] = self.read_exact(n, what)
            return
        start = self.offset
        try:
            got = self._recv_into_fn(view)
        except self._truncation_errors as err:
            raise StreamError(f"stream truncated in {what}: wanted {n} octets", start) from err
        if got is not None and got != n:
            raise StreamError(f"stream truncated in {what}: wanted {n} octets, got {got}",
                              start + max(0, got))
        self.offset += n

    def read_padding(self, length: int, what: str) -> None:
        """Consume the padding after a body of ``length`` octets.

        Raises:
            StreamError: a padding octet is not zero, or truncation.
        """
        pad = pad_len(length)
        if pad:
            start = self.offset
            if any(self.read_exact(pad, f"{what} padding")):
                raise StreamError(f"non-zero padding after {what}", start)

    def read_body(self, length: int, what: str) -> bytes:
        """A body of ``length`` octets (already checked against its limit) and its padding."""
        body = self.read_exact(length, what) if length else b""
        self.read_padding(length, what)
        return body
