"""xl's save-file header: what ``xl save`` and ``xl migrate`` put before the libxl stream.

The bytes (tools/xl/xl.h ``struct save_file_header``, xl_saverestore.c), all integers in
the saving host's byte order (x86: little-endian)::

    offset  octets  field
    ------  ------  ---------------------------------------------------------------
         0      32  magic "Xen saved domain, xl format\\n \\0 \\r"
        32       4  byteorder 0x01020304 (read back reversed = other endianness: refused)
        36       4  mandatory_flags  bit 0 JSON config, bit 1 stream v2 (others: refuse)
        40       4  optional_flags   (none defined; non-zero: refuse, as xl does)
        44       4  optional_data_len
        48       4  [optional data] u32 config_len
        52       .  [optional data] config: libxl_domain_config JSON, NUL-terminated
         .       .  the libxl stream (vmem.format.stream): "LibxlFmt" header, ...

``xl migrate`` sends the same header through its pipe after the receiver's banner.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from vmem.errors import StreamError

__all__ = ["XL_MAGIC", "XlHeader", "xl_header", "parse_xl_header", "XL_FLAG_JSON", "XL_FLAG_STREAMV2",
           "XL_HEADER_BYTES", "MAX_XL_CONFIG_BYTES"]

XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"
XL_BYTEORDER = 0x01020304
XL_FLAG_JSON = 1 << 0
XL_FLAG_STREAMV2 = 1 << 1
XL_HEADER_BYTES = 48
#: a config larger than this is refused before it is read (a domain config is a few KiB)
MAX_XL_CONFIG_BYTES = 1 << 20
_HDR = struct.Struct("<32s4I")


@dataclass(frozen=True)
class XlHeader:
    """A parsed xl save-file header."""

    mandatory_flags: int
    optional_flags: int
    config: dict | None
    """The domain configuration (libxl JSON), if the header carries one."""
    nbytes: int
    """Octets of header plus optional data: where the libxl stream starts."""


def xl_header(config: dict) -> bytes:
    """The header ``xl save`` writes for ``config`` (a libxl_domain_config as JSON-able dict)."""
    text = json.dumps(config, indent=4).encode() + b"\0"
    optional = struct.pack("<I", len(text)) + text
    return _HDR.pack(XL_MAGIC, XL_BYTEORDER, XL_FLAG_JSON | XL_FLAG_STREAMV2, 0, len(optional)) + optional


def parse_xl_header(read_exact) -> XlHeader:
    """Read an xl header with ``read_exact(n) -> bytes``.

    Raises:
        StreamError: not an xl save file, other byte order, unknown mandatory/optional
            flags, or a config that is too long or not JSON.
    """
    raw = read_exact(XL_HEADER_BYTES)
    if len(raw) < XL_HEADER_BYTES:
        raise StreamError("truncated xl save-file header", 0)
    magic, order, mandatory, optional, optlen = _HDR.unpack(raw)
    if magic != XL_MAGIC:
        raise StreamError(f"not an xl save file (magic {magic[:27]!r}); a bare libxl stream starts with 'LibxlFmt'", 0)
    if order != XL_BYTEORDER:
        raise StreamError(f"xl header byte order 0x{order:08x}: saved on a host of the other endianness", 32)
    if mandatory & ~(XL_FLAG_JSON | XL_FLAG_STREAMV2):
        raise StreamError(f"unknown mandatory xl flags 0x{mandatory:x}: newer xl than vmem knows", 36)
    if not mandatory & XL_FLAG_STREAMV2:
        raise StreamError("legacy (pre-v2) xl stream: convert it with Xen's convert-legacy-stream", 36)
    if optlen > MAX_XL_CONFIG_BYTES + 4:
        raise StreamError(f"xl optional data of {optlen} octets exceeds vmem's limit {MAX_XL_CONFIG_BYTES + 4}", 44)
    config = None
    if optlen:
        data = read_exact(optlen)
        if len(data) < optlen:
            raise StreamError("truncated xl optional data", XL_HEADER_BYTES)
        (clen,) = struct.unpack_from("<I", data) if optlen >= 4 else (0,)
        if clen > optlen - 4:
            raise StreamError(f"xl config length {clen} exceeds the optional data ({optlen - 4})", XL_HEADER_BYTES)
        text = data[4:4 + clen].rstrip(b"\0")
        if mandatory & XL_FLAG_JSON and text:
            try:
                config = json.loads(text)
            except ValueError as err:
                raise StreamError(f"xl config is not JSON: {err}", XL_HEADER_BYTES + 4) from None
        elif text:
            config = {"xl_config_text": text.decode(errors="replace")}
    return XlHeader(mandatory, optional, config, XL_HEADER_BYTES + optlen)
