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

__all__ = ["Buffer", "RECORD_HEADER", "pad_len", "buffer_nbytes", "as_parts", "frame",
           "ExactSource"]

Buffer = Union[bytes, bytearray, memoryview, np.ndarray]
"""Anything exposing a C-contiguous buffer: what ``send_parts`` receives."""

RECORD_HEADER = struct.Struct("<II")  # type, body_length
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
    """

    def __init__(self, recv_exact: Callable[[int], bytes],
                 recv_into: Callable[[memoryview], Any] | None,
                 truncation_errors: tuple[type[BaseException], ...], base_offset: int = 0):
        self._recv_exact = recv_exact
        self._recv_into_fn = recv_into
        self._truncation_errors = truncation_errors
        self.offset = base_offset
        """Octets consumed so far plus ``base_offset`` (e.g. the length of a file header in
        front of the stream, so that errors name file offsets)."""

    def read_exact(self, n: int, what: str) -> bytes:
        """Exactly ``n`` octets; ``what`` names them in the error.

        Raises:
            StreamError: the source ended (or returned fewer octets) first.
        """
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

    def read_into(self, view: memoryview, what: str) -> None:
        """Fill ``view`` completely.

        Raises:
            StreamError: the source ended first.
        """
        n = view.nbytes
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
