"""The vmem control protocol (back channel) and the preamble (forward channel).

Neither is part of Xen's stream; both are vmem's own (numbers in :mod:`vmem.format.wire`)::

    forward channel, before the libxl stream (vmem/format/stream.py):
        offset  octets  field
             0      16  magic b"vmem-migrate-v1\\n"
            16       4  u32 length L (little-endian), at most MAX_PREAMBLE_CONFIG_BYTES
            20       L  JSON object: the migration config (guest spec, npages, backend, ...)

    back channel (destination -> source), a sequence of control records in the common
    frame (vmem/format/frame.py):
        u32 type (ControlType, 0 = INVALID) | u32 length | body | zero pad to 8
        body: strict UTF-8 JSON for most types; raw octets for DIGESTS;
        at most MAX_CONTROL_BODY_BYTES

JSON is strict both ways (no NaN/Infinity, no number beyond a double) so that any JSON
parser on the other side reads it; every length is bounded before it is read, and every
problem raises :class:`vmem.errors.StreamError` carrying the offset.
"""
from __future__ import annotations

import json
import struct
from typing import Any, Callable

from vmem.errors import StreamError
from vmem.format.frame import RECORD_HEADER, Buffer, ExactSource, buffer_nbytes, frame
from vmem.format.wire import (
    MAX_CONTROL_BODY_BYTES,
    MAX_PREAMBLE_CONFIG_BYTES,
    PREAMBLE_LENGTH_BYTES,
    PREAMBLE_MAGIC,
    PREAMBLE_MAGIC_PREFIX,
    RECORD_HEADER_BYTES,
    ControlType,
)

__all__ = ["encode_control", "encode_json_control", "decode_json", "ControlReader",
           "encode_preamble", "read_preamble"]

_PREAMBLE_LENGTH = struct.Struct("<I")
_CONTROL_TYPES = {int(t): t for t in ControlType}


def _encode_json(obj: Any) -> bytes:
    # Strict JSON (no NaN/Infinity) so any JSON parser on the other side reads it.
    return json.dumps(obj, separators=(",", ":"), sort_keys=True,
                      allow_nan=False).encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    # json.loads("1e400") is float("inf"): a later int() would raise OverflowError.
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} does not fit a double")
    return value


def decode_json(body: bytes | bytearray | memoryview, offset: int = -1) -> Any:
    """Decode a UTF-8 JSON control body (or preamble config).

    Raises:
        StreamError: invalid UTF-8, invalid JSON, NaN/Infinity or a number beyond a
            double (``1e400``), an integer of over 4300 digits, or nesting too deep.
    """
    try:
        return json.loads(bytes(body).decode("utf-8"), parse_constant=_reject_constant,
                          parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise StreamError(f"malformed JSON body: {err}", offset) from err


def encode_control(type: ControlType, body: Buffer = b"") -> list[Buffer]:
    """Frame one control record: ``[u32 type | u32 length, body, zero pad to 8]``.

    Raises:
        ValueError: INVALID or unknown type, or a body over ``MAX_CONTROL_BODY_BYTES``.
    """
    ctype = _CONTROL_TYPES.get(int(type))
    if ctype is None or ctype is ControlType.INVALID:
        raise ValueError(f"not a sendable control type: {type!r}")
    length = buffer_nbytes(body)
    if length > MAX_CONTROL_BODY_BYTES:
        raise ValueError(f"control body of {length} octets exceeds MAX_CONTROL_BODY_BYTES")
    return frame(ctype, [body] if length else [], length)


def encode_json_control(type: ControlType, obj: Any) -> list[Buffer]:
    """:func:`encode_control` with ``obj`` as compact, strict UTF-8 JSON.

    Raises:
        ValueError: ``obj`` holds NaN/Infinity; TypeError: ``obj`` is not JSON-serialisable.
    """
    return encode_control(type, _encode_json(obj))


class ControlReader(ExactSource):
    """Reads control records from the back channel, bounded.

    Args:
        recv_exact: ``recv_exact(n) -> bytes`` (the transport's ``Channel.recv_exact``).
        max_body_bytes: largest body accepted (checked before reading it).
        truncation_errors: exceptions meaning "the channel ended"; become StreamError.

    After a StreamError the position in the channel is unknown: stop reading from it.
    """

    def __init__(self, recv_exact: Callable[[int], bytes], *,
                 max_body_bytes: int = MAX_CONTROL_BODY_BYTES,
                 truncation_errors: tuple[type[BaseException], ...] = (EOFError,)):
        super().__init__(recv_exact, None, truncation_errors)
        self._max_body_bytes = max_body_bytes
        self.records_read = 0

    def read(self) -> tuple[ControlType, bytes]:
        """Read one control record; return its type and body (without padding).

        Raises:
            StreamError: unknown or INVALID type, body over the limit, non-zero padding,
                or truncation.
        """
        off = self.offset
        rtype, length = RECORD_HEADER.unpack(self.read_exact(RECORD_HEADER_BYTES,
                                                             "control record header"))
        ctype = _CONTROL_TYPES.get(rtype)
        if ctype is None or ctype is ControlType.INVALID:
            raise StreamError(f"unknown control record type 0x{rtype:08x}", off)
        if length > self._max_body_bytes:
            raise StreamError(f"control record {ctype.name} length {length} exceeds the limit "
                              f"of {self._max_body_bytes} octets", off)
        body = self.read_body(length, f"{ctype.name} body")
        self.records_read += 1
        return ctype, body


def encode_preamble(config: dict) -> bytes:
    """The forward channel's opening: ``b"vmem-migrate-v1\\n"``, u32 length (LE), JSON.

    Raises:
        TypeError: ``config`` is not a dict or not JSON-serialisable.
        ValueError: NaN/Infinity inside, or longer than ``MAX_PREAMBLE_CONFIG_BYTES``.
    """
    if not isinstance(config, dict):
        raise TypeError("the preamble config must be a dict")
    body = _encode_json(config)
    if len(body) > MAX_PREAMBLE_CONFIG_BYTES:
        raise ValueError(f"preamble config of {len(body)} octets exceeds "
                         f"MAX_PREAMBLE_CONFIG_BYTES")
    return PREAMBLE_MAGIC + _PREAMBLE_LENGTH.pack(len(body)) + body


def _describe_banner(banner: bytes) -> str:
    if banner.startswith(PREAMBLE_MAGIC_PREFIX):
        return (f"peer speaks another vmem migration protocol ({banner!r}); this vmem "
                f"speaks {PREAMBLE_MAGIC!r}")
    if banner.startswith(b"LibxlFmt"):
        return "peer sent a bare libxl stream without the vmem preamble"
    if banner.startswith(b"\xff" * 8):
        return "peer sent a bare libxc stream without the vmem preamble"
    if banner.startswith(b"Xen saved domain"):
        return "peer sent an xl save image or xl migrate stream, not a vmem migration"
    return f"peer does not speak vmem-migrate-v1: it opened with {banner!r}"


def read_preamble(recv_exact: Callable[[int], bytes],
                  max_len: int = MAX_PREAMBLE_CONFIG_BYTES, *,
                  truncation_errors: tuple[type[BaseException], ...] = (EOFError,)) -> dict:
    """Read and check the preamble; return the config dict.

    Reads exactly ``16 + 4 + length`` octets, nothing of the stream behind it.

    Raises:
        StreamError: the peer speaks something else (the message says what, e.g. another
            vmem version or a bare Xen stream), the config is longer than ``max_len`` or
            not a JSON object, or the channel ended early.
    """
    src = ExactSource(recv_exact, None, truncation_errors)
    banner = src.read_exact(len(PREAMBLE_MAGIC), "preamble")
    if banner != PREAMBLE_MAGIC:
        raise StreamError(_describe_banner(banner), 0)
    (length,) = _PREAMBLE_LENGTH.unpack(src.read_exact(PREAMBLE_LENGTH_BYTES, "preamble length"))
    if length > max_len:
        raise StreamError(f"preamble config length {length} exceeds the limit of {max_len} "
                          f"octets", len(PREAMBLE_MAGIC))
    body_off = src.offset
    config = decode_json(src.read_exact(length, "preamble config"), body_off)
    if not isinstance(config, dict):
        raise StreamError(f"preamble config must be a JSON object, not "
                          f"{type(config).__name__}", body_off)
    return config
