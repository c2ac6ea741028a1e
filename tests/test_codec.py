"""Tests for transport.codec: zero-page detection and batch encoding round trips."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transport.codec import (
    METHODS,
    PAGE_BYTES,
    CodecError,
    decode_batch,
    encode_batch,
    encoded_nbytes,
    method_unavailable,
    zero_page_mask,
)

AVAILABLE = [m for m in METHODS if not method_unavailable(m)]
TEXT = (b"The quick brown fox jumps over the lazy dog. " * 100)[:PAGE_BYTES]


def _page(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "zero":
        return np.zeros(PAGE_BYTES, np.uint8)
    if kind == "random":
        return rng.integers(0, 256, PAGE_BYTES, dtype=np.uint8)
    if kind == "text":
        return np.frombuffer(TEXT, np.uint8).copy()
    # "one": zero except one byte, anywhere (the first word too, and the last byte)
    page = np.zeros(PAGE_BYTES, np.uint8)
    page[int(rng.integers(0, PAGE_BYTES))] = int(rng.integers(1, 256))
    return page


def _batch(kinds: list[str], seed: int) -> np.ndarray:
    if not kinds:
        return np.empty((0, PAGE_BYTES), np.uint8)
    return np.stack([_page(kind, seed + i) for i, kind in enumerate(kinds)])


PAGE_KINDS = st.lists(st.sampled_from(["zero", "random", "text", "one"]), min_size=0,
                      max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=PAGE_KINDS, seed=st.integers(0, 2**16), method=st.sampled_from(AVAILABLE))
def test_round_trip(kinds, seed, method):
    pages = _batch(kinds, seed)
    assert zero_page_mask(pages).tolist() == [k == "zero" for k in kinds]
    bitmap, payload = encode_batch(pages, method)
    assert len(bitmap) == (len(kinds) + 7) // 8
    out = np.full_like(pages, 0xAB)
    decode_batch(bitmap, payload, method, out)
    assert np.array_equal(out, pages)


@pytest.mark.parametrize("method", AVAILABLE)
def test_all_zero_batch_costs_only_the_bitmap(method):
    pages = np.zeros((1000, PAGE_BYTES), np.uint8)
    bitmap, payload = encode_batch(pages, method)
    assert encoded_nbytes(bitmap, payload) == 125
    out = np.ones_like(pages)
    decode_batch(bitmap, payload, method, out)
    assert not out.any()


@pytest.mark.parametrize("method", AVAILABLE)
def test_no_zero_batch(method):
    pages = _batch(["random"] * 50 + ["text"] * 50, seed=7)
    bitmap, payload = encode_batch(pages, method)
    assert bitmap == bytes(13)
    if method == "none":
        assert payload[0] is pages  # no copy when nothing is elided
    else:
        # text compresses, random does not; together clearly below raw
        assert encoded_nbytes(bitmap, payload) < pages.nbytes * 0.75
    out = np.zeros_like(pages)
    decode_batch(bitmap, payload, method, out)
    assert np.array_equal(out, pages)


def test_zero_page_mask_paths_agree_with_naive():
    rng = np.random.default_rng(3)
    for zero_fraction in (0.0, 0.01, 0.3, 1.0):
        pages = rng.integers(0, 256, (400, PAGE_BYTES), dtype=np.uint8)
        zero = rng.random(400) < zero_fraction
        pages[zero] = 0
        # pages whose first word is zero but which are not zero
        tricky = np.flatnonzero(~zero)[:5]
        pages[tricky, :8] = 0
        expected = ~pages.any(axis=1)
        assert np.array_equal(zero_page_mask(pages), expected)


@pytest.mark.parametrize("method", AVAILABLE)
def test_corrupt_payload_is_a_codec_error(method):
    pages = _batch(["text", "zero", "random", "one"] * 8, seed=11)
    bitmap, payload = encode_batch(pages, method)
    raw = b"".join(memoryview(p).cast("B") for p in payload)
    out = np.empty_like(pages)
    rng = np.random.default_rng(5)
    cases = [raw[:-1], raw + b"x", b"", bytes(len(raw)),
             rng.integers(0, 256, len(raw), dtype=np.uint8).tobytes()]
    for bad in cases:
        if bad == raw:
            continue
        try:
            decode_batch(bitmap, bad, method, out)
        except CodecError:
            continue
        # Same-size garbage is valid "none" data, and some corruptions of compressed data
        # still decode (the codec has no checksum: integrity is MacChannel's job) -- but
        # never to the wrong size and never a crash.
        assert method != "none" or len(bad) == len(raw)


def test_zstd_frame_claiming_a_huge_size_is_refused_unread():
    zstandard = pytest.importorskip("zstandard")
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    out = np.empty((2, PAGE_BYTES), np.uint8)
    bitmap = bytes(1)
    with pytest.raises(CodecError, match="declares"):
        decode_batch(bitmap, bomb, "zstd", out)


def test_lz4_output_bounded():
    lz4_block = pytest.importorskip("lz4.block")
    bomb = lz4_block.compress(bytes(64 << 20), store_size=False)
    out = np.empty((2, PAGE_BYTES), np.uint8)
    with pytest.raises(CodecError):
        decode_batch(bytes(1), bomb, "lz4", out)


@pytest.mark.parametrize("bitmap, fragment", [
    (bytes(3), "expected 2"),
    (b"\x00\x80", "beyond the last page"),
])
def test_bad_bitmap(bitmap, fragment):
    out = np.empty((9, PAGE_BYTES), np.uint8)
    with pytest.raises(CodecError, match=fragment):
        decode_batch(bitmap, b"", "none", out)


def test_bad_method_and_arguments():
    pages = np.zeros((2, PAGE_BYTES), np.uint8)
    with pytest.raises(CodecError, match="unknown method"):
        encode_batch(pages, "gzip")
    with pytest.raises(ValueError):
        encode_batch(np.zeros((2, 100), np.uint8))
    with pytest.raises(ValueError):
        zero_page_mask(np.zeros((2, PAGE_BYTES), np.uint16))
    with pytest.raises(ValueError, match="read-only"):
        readonly = np.zeros((1, PAGE_BYTES), np.uint8)
        readonly.flags.writeable = False
        decode_batch(b"\x01", b"", "none", readonly)
