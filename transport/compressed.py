"""Zero pages as a bitmap, and optional compression, for any byte stream: :class:`CompressedChannel`.

Works below the migration stream, so the migrator and the destination need no change.
Every buffer of at least one page that the caller sends is treated as pages (4 KiB
blocks from its start -- the migrator's page data is exactly that); its all-zero pages
travel as one bit each (:func:`transport.codec.encode_batch`, numpy, no per-page Python),
and with method ``zstd``/``lz4`` the other pages are compressed in one call per frame.
Everything else (record headers, pfn lists, control records) goes as raw frames.

Modes: ``"zero"`` (zero-page elision only; the agents' default, also what ``--compress
none`` means), ``"zstd"``, ``"lz4"``.  A frame whose compressed form is not smaller is
sent uncompressed (random guest data does not compress).

Frame (little-endian)::

    0      2       3         4              8                 12                16
    +------+-------+---------+--------------+-----------------+-----------------+
    | "VZ" | kind  | method  | raw u32      | bitmap u32      | payload u32     |
    +------+-------+---------+--------------+-----------------+-----------------+
    then bitmap bytes, then payload bytes.
    kind 1 RAW:   method 0, bitmap 0, payload == raw (1 .. MAX_FRAME_BYTES) plain bytes
    kind 2 PAGES: raw = count * 4096 (1 <= count <= MAX_FRAME_PAGES); bitmap =
                  ceil(count / 8) (bit i set <=> page i is zero); payload = the non-zero
                  pages encoded with method 0 none | 1 zstd | 2 lz4, payload <= raw

A receiver checks every length against those bounds before it allocates or decodes, and
refuses a method it does not have (:class:`~transport.codec.CodecError`).  Corrupt input
breaks the receive direction (sticky).  Integrity is the inner channel's business
(MacChannel): this layer only changes the representation.
"""
from __future__ import annotations

import struct

import numpy as np

from .channel import Channel
from .codec import PAGE_BYTES, CodecError, decode_batch, encode_batch, method_unavailable
from .errors import ChannelBrokenError, ChannelTimeout
from .wrapped import FramedChannel

__all__ = ["CompressedChannel", "MODES", "MAX_FRAME_PAGES", "MAX_FRAME_BYTES", "mode_unavailable"]

MODES = ("zero", "zstd", "lz4")
MAX_FRAME_PAGES = 1024
MAX_FRAME_BYTES = MAX_FRAME_PAGES * PAGE_BYTES
_FRAME = struct.Struct("<2sBBIII")
_MAGIC = b"VZ"
_KIND_RAW, _KIND_PAGES = 1, 2
_METHOD_IDS = {"none": 0, "zstd": 1, "lz4": 2}
_METHOD_NAMES = {v: k for k, v in _METHOD_IDS.items()}
# Raw parts are coalesced up to this size before a RAW frame is cut.
_RAW_COALESCE_BYTES = 64 << 10


def mode_unavailable(mode: str) -> str:
    """Why ``mode`` cannot be used here, or ``""`` (names the missing package)."""
    if mode == "zero":
        return ""
    if mode not in MODES:
        return f"unknown compression {mode!r}; expected none, zstd or lz4"
    return method_unavailable(mode)


class CompressedChannel(FramedChannel):
    """Zero-page elision and optional compression over ``inner`` (layout in the module
    docstring).  Owns ``inner``.

    ``bytes_sent``/``bytes_received`` count stream bytes (what the caller sent);
    ``wire_bytes_sent``/``wire_bytes_received`` what crossed ``inner``; ``zero_pages_sent``
    how many pages went as one bit.  Sends are synchronous like ``inner``'s: on return the
    caller's buffers may change (each frame is encoded -- or, for a frame without zero
    pages in mode ``zero``, handed to ``inner`` -- before ``send_parts`` returns).
    """

    def __init__(self, inner: Channel, mode: str = "zero", level: int | None = None):
        why = mode_unavailable(mode)
        if why:
            raise CodecError(why)
        # A frame that does not fit the caller's buffer is decoded here first.
        self._rx = np.empty(MAX_FRAME_BYTES, dtype=np.uint8)
        super().__init__(inner, memoryview(self._rx))
        self.mode = mode
        self._method = "none" if mode == "zero" else mode
        self._level = level
        self.zero_pages_sent = 0
        self._payload = bytearray(MAX_FRAME_BYTES)

    def __repr__(self) -> str:
        return f"<CompressedChannel {self.mode} sent={self._bytes_sent} over {self._inner!r}>"

    # -- sending --------------------------------------------------------------------------

    def _encode_pages(self, view: memoryview, out: list, sizes: list) -> None:
        pages2d = np.frombuffer(view, dtype=np.uint8).reshape(-1, PAGE_BYTES)
        count = pages2d.shape[0]
        method = self._method
        bitmap, payload = encode_batch(pages2d, method, self._level)
        payload_bytes = sum(memoryview(p).nbytes for p in payload)
        if method != "none":
            nonzero_bytes = count * PAGE_BYTES - _zero_count(bitmap, count) * PAGE_BYTES
            if payload_bytes >= nonzero_bytes:  # did not compress: send the pages as they are
                method = "none"
                bitmap, payload = encode_batch(pages2d, "none")
                payload_bytes = nonzero_bytes
        self.zero_pages_sent += _zero_count(bitmap, count)
        out.append(_FRAME.pack(_MAGIC, _KIND_PAGES, _METHOD_IDS[method], count * PAGE_BYTES, len(bitmap),
                               payload_bytes))
        out.append(bitmap)
        out.extend(payload)
        sizes.append((_FRAME.size + len(bitmap) + payload_bytes, count * PAGE_BYTES))

    def _send(self, views: list[memoryview], total: int) -> None:
        if not total:
            return
        out: list = []
        sizes: list[tuple[int, int]] = []   # (wire bytes, stream bytes) of each frame
        raw: list[memoryview] = []
        raw_bytes = 0

        def flush_raw() -> None:
            nonlocal raw, raw_bytes
            if raw_bytes:
                out.append(_FRAME.pack(_MAGIC, _KIND_RAW, 0, raw_bytes, 0, raw_bytes))
                out.extend(raw)
                sizes.append((_FRAME.size + raw_bytes, raw_bytes))
                raw, raw_bytes = [], 0

        def add_raw(view: memoryview) -> None:
            nonlocal raw_bytes
            offset = 0
            while offset < view.nbytes:
                take = min(view.nbytes - offset, MAX_FRAME_BYTES - raw_bytes)
                raw.append(view[offset:offset + take])
                raw_bytes += take
                offset += take
                if raw_bytes >= _RAW_COALESCE_BYTES:
                    flush_raw()

        for view in views:
            whole = view.nbytes - view.nbytes % PAGE_BYTES
            if whole:
                flush_raw()
                for offset in range(0, whole, MAX_FRAME_BYTES):
                    self._encode_pages(view[offset:min(whole, offset + MAX_FRAME_BYTES)], out, sizes)
            if whole < view.nbytes:
                add_raw(view[whole:])
        flush_raw()
        try:
            self._inner.send_parts(out)
        except (ChannelBrokenError, ChannelTimeout) as err:
            wire = err.bytes_got or 0
            got = 0
            for frame_wire, frame_stream in sizes:
                wire -= frame_wire
                if wire < 0:
                    break
                got += frame_stream
            self._bytes_sent += got
            outer = type(err)(err.reason, bytes_expected=total, bytes_got=got)
            raise self._fail("send", outer, err.bytes_got or 0) from err
        self._bytes_sent += total

    # -- receiving ------------------------------------------------------------------------

    @staticmethod
    def _corrupt(what: str) -> CodecError:
        return CodecError(f"compressed stream is corrupt: {what}")

    def _read_frame(self, room: memoryview | None) -> int | None:
        """Read the next frame; decode it straight into ``room`` when it fits (no copy
        through the receive buffer), else into the receive buffer."""
        header = self._read_header()
        if header is None:
            return None
        kind, method, raw, bitmap, payload = header
        direct = room is not None and raw <= room.nbytes
        try:
            self._read_frame_into(kind, method, raw, bitmap, payload,
                                  room[:raw] if direct else self._rx_view[:raw])
        except ChannelBrokenError as err:
            raise self._corrupt(f"stream ends inside a frame ({err.reason})") from err
        if direct:
            return raw
        self._buffered(raw)
        return 0

    def _read_header(self) -> tuple[int, int, int, int, int] | None:
        """The next frame's (kind, method, raw, bitmap, payload) lengths; None at a clean EOF."""
        head = self._inner.recv_some(_FRAME.size)
        if not head:
            return None
        if len(head) < _FRAME.size:
            try:
                head += self._inner.recv_exact(_FRAME.size - len(head))
            except ChannelBrokenError as err:
                raise self._corrupt(f"stream ends inside a frame header ({err.reason})") from err
        magic, kind, method, raw, bitmap, payload = _FRAME.unpack(head)
        if magic != _MAGIC:
            raise self._corrupt(f"bad frame magic {magic!r} (is the peer using the same --compress?)")
        if kind == _KIND_RAW:
            if method or bitmap or payload != raw or not 0 < raw <= MAX_FRAME_BYTES:
                raise self._corrupt(f"bad RAW frame (raw {raw}, bitmap {bitmap}, payload {payload})")
        elif kind == _KIND_PAGES:
            count = raw // PAGE_BYTES
            if (raw % PAGE_BYTES or not 0 < count <= MAX_FRAME_PAGES or bitmap != (count + 7) // 8
                    or payload > raw or method not in _METHOD_NAMES):
                raise self._corrupt(f"bad PAGES frame (raw {raw}, bitmap {bitmap}, payload {payload}, "
                                    f"method {method})")
            why = method_unavailable(_METHOD_NAMES[method])
            if why:
                raise self._corrupt(f"the peer compresses with {_METHOD_NAMES[method]}, which this host "
                                    f"cannot decode: {why}")
        else:
            raise self._corrupt(f"unknown frame kind {kind}")
        return kind, method, raw, bitmap, payload

    def _read_frame_into(self, kind: int, method: int, raw: int, bitmap_bytes: int, payload_bytes: int,
                         target: memoryview) -> None:
        """Decode the frame whose header was read into ``target`` (exactly ``raw`` bytes)."""
        inner = self._inner
        if kind == _KIND_RAW:
            inner.recv_into(target)
            return
        bitmap = inner.recv_exact(bitmap_bytes)
        name = _METHOD_NAMES[method]
        count = raw // PAGE_BYTES
        if name == "none" and payload_bytes == raw:
            if any(bitmap):
                raise self._corrupt("a PAGES frame without zero pages has bits set")
            inner.recv_into(target)
            return
        payload = memoryview(self._payload)[:payload_bytes]
        inner.recv_into(payload)
        out = np.frombuffer(target, dtype=np.uint8).reshape(count, PAGE_BYTES)
        try:
            decode_batch(bitmap, payload, name, out)
        except CodecError as err:
            raise self._corrupt(err.reason) from err


def _zero_count(bitmap: bytes, count: int) -> int:
    return int(np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), count=count, bitorder="little").sum())
