"""Page-batch encoding: zero-page elision and optional compression, numpy only, no per-page
Python.

An encoded batch of ``count`` pages is two byte strings the caller frames as it likes
(typically ``u32 len(zero_bitmap), u32 len(payload)`` in its record header)::

    zero_bitmap: ceil(count / 8) bytes, bit i (little-endian bit order: byte i // 8,
                 bit i % 8) set  <=>  page i is all zeros; padding bits are 0
    payload:     the non-zero pages, in batch order, concatenated (method "none"), or that
                 concatenation compressed in ONE call (method "zstd": one zstd frame with
                 its content size; method "lz4": one raw LZ4 block, size implied)

Zero pages cost one bit; compression runs once per batch, never per page.  The decoder
bounds every output by ``count * 4096`` bytes *before* decompressing (a zstd frame that
claims a larger content size is rejected unread) and reports corrupt input as
:class:`CodecError`, never a crash.

What pays off (measured with ``scripts/bench_net.py --codec``): zero detection runs at
memory speed, so it is always on; the
guest workloads write random bytes + a stamp, which do not compress, so compression only
pays on text-like or zero-heavy memory and on links slower than the compressor.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import TransportError

__all__ = [
    "CodecError",
    "METHODS",
    "PAGE_BYTES",
    "zero_page_mask",
    "encode_batch",
    "decode_batch",
    "method_unavailable",
    "encoded_nbytes",
]

#: The page size of the wire: every batch is whole pages of this many bytes.  transport
#: imports nothing of vmem, so this is transport's one copy of the guest page size
#: (vmem.pages.PAGE_SIZE); tests/test_native.py checks that the two agree.
PAGE_BYTES = 4096
METHODS = ("none", "zstd", "lz4")
# Default compression levels: the fastest useful setting of each library (migration is
# bandwidth-bound only on slow links; there speed still matters more than ratio).
DEFAULT_LEVELS = {"none": 0, "zstd": 1, "lz4": 0}


class CodecError(TransportError):
    """An encoded batch is corrupt or inconsistent (bad bitmap length, payload size,
    undecodable compressed data), or a method is unknown or not installed.

    Attributes:
        reason: what is wrong.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def method_unavailable(method: str) -> str:
    """Why ``method`` cannot be used here, or ``""`` if it can (names the missing package)."""
    if method == "none":
        return ""
    if method == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            return "zstd needs the 'zstandard' package (pip install zstandard)"
        return ""
    if method == "lz4":
        try:
            import lz4.block  # noqa: F401
        except ImportError:
            return "lz4 needs the 'lz4' package (pip install lz4)"
        return ""
    return f"unknown method {method!r}; expected one of {', '.join(METHODS)}"


def _check_method(method: str) -> None:
    why = method_unavailable(method)
    if why:
        raise CodecError(why)


def _check_pages(pages2d: Any, name: str = "pages2d", *, writable: bool = False) -> np.ndarray:
    if not (isinstance(pages2d, np.ndarray) and pages2d.dtype == np.uint8
            and pages2d.ndim == 2 and pages2d.shape[1] == PAGE_BYTES
            and pages2d.flags.c_contiguous):
        raise ValueError(f"{name} must be a C-contiguous (n, {PAGE_BYTES}) uint8 array, got "
                         f"{type(pages2d).__name__} {getattr(pages2d, 'shape', '')} "
                         f"{getattr(pages2d, 'dtype', '')}")
    if writable and not pages2d.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return pages2d


def zero_page_mask(pages2d: np.ndarray) -> np.ndarray:
    """``mask[i]`` is True iff page ``i`` is all zeros.

    Reads the first 8 bytes of every page first: a page whose first word is non-zero is not
    zero, so on typical (non-zero) memory only one cache line per page is touched.  The
    candidates are then checked in full with an OR-reduction over 64-bit words (whole array
    if many are candidates, else just those rows).

    Raises:
        ValueError: ``pages2d`` is not a C-contiguous ``(n, 4096)`` uint8 array.
    """
    _check_pages(pages2d)
    n = pages2d.shape[0]
    words = pages2d.view(np.uint64)  # (n, 512)
    candidates = words[:, 0] == 0
    n_candidates = int(np.count_nonzero(candidates))
    if n_candidates == 0:
        return candidates  # all False
    if n_candidates * 4 >= n:
        return np.bitwise_or.reduce(words, axis=1) == 0
    rows = np.flatnonzero(candidates)
    mask = np.zeros(n, dtype=bool)
    mask[rows] = np.bitwise_or.reduce(words[rows], axis=1) == 0
    return mask


# zstd contexts are not thread-safe but are expensive to create: one per thread and level.
_local = threading.local()


def _zstd_compressor(level: int):
    import zstandard

    cache = _local.__dict__.setdefault("zstd_c", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _zstd_decompressor():
    import zstandard

    if not hasattr(_local, "zstd_d"):
        _local.zstd_d = zstandard.ZstdDecompressor()
    return _local.zstd_d


def encode_batch(pages2d: np.ndarray, method: str = "none", level: int | None = None
                 ) -> tuple[bytes, list[Any]]:
    """Encode a batch: return ``(zero_bitmap, payload_parts)`` (layout in the module
    docstring); send ``payload_parts`` with ``Channel.send_parts``.

    With method ``"none"`` and no zero page, the payload is ``[pages2d]`` itself (no copy:
    do not modify it until it was sent); otherwise the non-zero pages are gathered once.

    Args:
        pages2d: ``(count, 4096)`` C-contiguous uint8 pages.
        method: ``"none"``, ``"zstd"`` or ``"lz4"``.
        level: zstd level (default 1), or for lz4 0 = fast (default) / > 0 = high-compression
            level; ignored for ``"none"``.

    Raises:
        ValueError: malformed ``pages2d``.  CodecError: unknown or uninstalled method.
    """
    _check_pages(pages2d)
    _check_method(method)
    level = DEFAULT_LEVELS[method] if level is None else int(level)
    mask = zero_page_mask(pages2d)
    bitmap = np.packbits(mask, bitorder="little").tobytes()
    n_zero = int(np.count_nonzero(mask))
    if n_zero == 0:
        data = pages2d
    elif n_zero == len(mask):
        data = pages2d[:0]
    else:
        data = np.take(pages2d, np.flatnonzero(~mask), axis=0)
    if method == "none":
        return bitmap, ([data] if data.size else [])
    if data.size == 0:
        return bitmap, []
    if method == "zstd":
        return bitmap, [_zstd_compressor(level).compress(memoryview(data).cast("B"))]
    import lz4.block

    if level > 0:
        return bitmap, [lz4.block.compress(data, mode="high_compression", compression=level,
                                           store_size=False)]
    return bitmap, [lz4.block.compress(data, mode="default", store_size=False)]


def _as_bytes_like(payload: Any) -> Any:
    if isinstance(payload, (list, tuple)):
        if len(payload) == 1:
            return payload[0]
        return b"".join(memoryview(p).cast("B") for p in payload)
    return payload


def decode_batch(zero_bitmap: Any, payload: Any, method: str, out: np.ndarray) -> None:
    """Decode an encoded batch into ``out`` (``(count, 4096)`` uint8; ``count`` = rows).

    Every row of ``out`` is written: zero pages with zeros, the others from the payload.
    Never allocates more than ``count * 4096`` bytes of output whatever the input says.

    Args:
        zero_bitmap: the bitmap bytes from :func:`encode_batch`.
        payload: the payload (one bytes-like, or the list of parts).
        method: the method it was encoded with.
        out: C-contiguous writable staging rows, one per page of the batch.

    Raises:
        CodecError: bitmap of the wrong length or with padding bits set, payload of the
            wrong size, undecodable compressed data, unknown or uninstalled method.  Then
            ``out`` may be partly written.
        ValueError: malformed ``out``.
    """
    _check_pages(out, "out", writable=True)
    _check_method(method)
    count = out.shape[0]
    bitmap = np.frombuffer(memoryview(zero_bitmap).cast("B"), dtype=np.uint8)
    if bitmap.size != (count + 7) // 8:
        raise CodecError(f"zero bitmap has {bitmap.size} bytes, expected {(count + 7) // 8} "
                         f"for {count} pages")
    bits = np.unpackbits(bitmap, bitorder="little")
    if bits[count:].any():
        raise CodecError("zero bitmap has bits set beyond the last page")
    mask = bits[:count].astype(bool)
    n_zero = int(np.count_nonzero(mask))
    expected_bytes = (count - n_zero) * PAGE_BYTES
    payload = _as_bytes_like(payload)
    payload_bytes = memoryview(payload).nbytes
    if method == "none":
        if payload_bytes != expected_bytes:
            raise CodecError(f"payload has {payload_bytes} bytes, expected {expected_bytes} "
                             f"({count - n_zero} non-zero pages)")
        data = payload
    elif expected_bytes == 0:
        if payload_bytes:
            raise CodecError(f"payload has {payload_bytes} bytes but every page is zero")
        data = b""
    elif method == "zstd":
        data = _zstd_decode(payload, expected_bytes)
    else:
        data = _lz4_decode(payload, expected_bytes)
    rows = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8).reshape(-1, PAGE_BYTES)
    if n_zero == 0:
        np.copyto(out, rows)
    elif n_zero == count:
        out[:] = 0
    else:
        out[mask] = 0
        out[~mask] = rows


def _zstd_decode(payload: Any, expected_bytes: int) -> bytes:
    import zstandard

    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as err:
        raise CodecError(f"zstd payload is corrupt: {err}") from err
    # Refuse before allocating: a frame may claim any content size.
    if declared != expected_bytes:
        raise CodecError(f"zstd frame declares {declared} bytes, expected {expected_bytes}")
    try:
        data = _zstd_decompressor().decompress(payload, max_output_size=expected_bytes)
    except zstandard.ZstdError as err:
        raise CodecError(f"zstd payload is corrupt: {err}") from err
    if len(data) != expected_bytes:
        raise CodecError(f"zstd payload decoded to {len(data)} bytes, expected "
                         f"{expected_bytes}")
    return data


def _lz4_decode(payload: Any, expected_bytes: int) -> bytes:
    import lz4.block

    try:
        # uncompressed_size is the output buffer's size: decoding can never write more.
        data = lz4.block.decompress(payload, uncompressed_size=expected_bytes)
    except lz4.block.LZ4BlockError as err:
        raise CodecError(f"lz4 payload is corrupt: {err}") from err
    if len(data) != expected_bytes:
        raise CodecError(f"lz4 payload decoded to {len(data)} bytes, expected "
                         f"{expected_bytes}")
    return data


def encoded_nbytes(zero_bitmap: bytes, payload: Sequence[Any]) -> int:
    """Bytes an encoded batch puts on the wire (bitmap + payload, without framing)."""
    return len(zero_bitmap) + sum(memoryview(p).nbytes for p in payload)
