"""Tests for the channels that agent migrations stack on TCP: StripedChannel (--parallel),
CompressedChannel (zero pages as a bitmap, --compress), and the small fixes under them.

Both run the channel conformance suite of tests/test_transport.py (the checks whose
premise they meet: a zero-eliding channel moves 512 MiB of zeros as a few KiB, so "the
peer closes while we send" cannot happen to it in the same way).
"""
from __future__ import annotations

import numpy as np
import pytest

import test_transport as conformance
from test_transport import Worker
from transport import channel_pair
from transport.channel import _byte_view
from transport.errors import ChannelBrokenError, TransportError
from transport.secure import AuthError, MacChannel
from transport.striped import STRIPE_CHUNK_BYTES, StripedChannel

SESSION = bytes(range(7, 39))


# -- _byte_view ------------------------------------------------------------------------------

def test_byte_view_of_empty_multidimensional_arrays():
    pages = np.zeros((4, 4096), dtype=np.uint8)
    assert _byte_view(pages[:0]).nbytes == 0
    assert not _byte_view(pages[:0], writable=True).readonly
    assert _byte_view(np.zeros((0, 3), dtype=np.int64)).nbytes == 0
    a, b = channel_pair()
    with a, b:
        a.send_parts([pages[:0], b"x", np.empty((0, 4096), np.uint8)])
        assert b.recv_exact(1) == b"x"
        b.recv_into(pages[:0])  # receiving nothing is fine


# -- StripedChannel --------------------------------------------------------------------------

def make_striped_pair(n_data: int = 2, mac: bool = False):
    def link():
        x, y = channel_pair()
        if mac:
            return MacChannel(x, SESSION, "client"), MacChannel(y, SESSION, "server")
        return x, y

    main = link()
    a_to_b = [link() for _ in range(n_data)]
    b_to_a = [link() for _ in range(n_data)]
    a = StripedChannel(main[0], outgoing=[x for x, _ in a_to_b], incoming=[y for _, y in b_to_a])
    b = StripedChannel(main[1], outgoing=[x for x, _ in b_to_a], incoming=[y for _, y in a_to_b])
    return a, b


def make_striped_tcp_pair():
    from test_tcp import make_tcp_pair

    main, data_ab, data_ba = make_tcp_pair(), make_tcp_pair(), make_tcp_pair()
    return (StripedChannel(main[0], outgoing=[data_ab[0]], incoming=[data_ba[0]]),
            StripedChannel(main[1], outgoing=[data_ba[1]], incoming=[data_ab[1]]))


STRIPED_CHECKS = [c for c in conformance.CHANNEL_CHECKS if c.__name__ != "check_send_timeout_mid_message"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("maker", [make_striped_pair, make_striped_tcp_pair], ids=["unix", "tcp"])
@pytest.mark.parametrize("check", STRIPED_CHECKS, ids=[c.__name__.removeprefix("check_") for c in STRIPED_CHECKS])
def test_striped_channel_conformance(maker, check):
    check(maker)


def test_striped_spreads_large_sends_and_keeps_small_ones_on_main():
    a, b = make_striped_pair(n_data=2)
    with a, b:
        data = np.random.default_rng(3).integers(0, 256, size=9 * STRIPE_CHUNK_BYTES + 123, dtype=np.uint8)
        rx = Worker(b.recv_exact, data.nbytes + 5)
        a.send_parts([b"small", data])
        assert rx.result() == b"small" + data.tobytes()
        moved = [link.bytes_sent for link in a.links[:3]]
        assert all(m > 2 * STRIPE_CHUNK_BYTES for m in moved), moved  # every connection carried a share
        before = [link.bytes_sent for link in a.links[:3]]
        a.send(b"control record")
        after = [link.bytes_sent for link in a.links[:3]]
        assert after[0] > before[0] and after[1:] == before[1:]
        assert b.recv_exact(14) == b"control record"


def test_striped_over_mac_connections_detects_a_tampered_piece():
    a, b = make_striped_pair(n_data=1, mac=True)
    with a, b:
        data = np.random.default_rng(4).integers(0, 256, size=4 * STRIPE_CHUNK_BYTES, dtype=np.uint8)
        rx = Worker(b.recv_exact, data.nbytes)
        a.send(data)
        assert rx.result() == data.tobytes()
    # a forged frame on a data connection: the receiver raises the integrity error
    main, data_link = channel_pair(), channel_pair()
    sender = StripedChannel(MacChannel(main[0], SESSION, "client"), outgoing=[data_link[0]])  # data not MAC'd
    receiver = StripedChannel(MacChannel(main[1], SESSION, "server"),
                              incoming=[MacChannel(data_link[1], SESSION, "server")])
    with sender, receiver:
        sender.send(bytes(2 * STRIPE_CHUNK_BYTES))
        with pytest.raises(AuthError, match="integrity check failed"):
            receiver.recv_exact(2 * STRIPE_CHUNK_BYTES)
        with pytest.raises(AuthError):  # sticky
            receiver.recv_exact(1)


def test_striped_gap_at_the_end_is_an_error_not_eof():
    main, data_link = channel_pair(), channel_pair()
    a = StripedChannel(main[0], outgoing=[data_link[0]])
    b = StripedChannel(main[1], incoming=[data_link[1]])
    with a, b:
        data_link[0].close()  # the data connection is cut: its pieces never arrive
        with pytest.raises(TransportError):
            a.send(bytes(4 * STRIPE_CHUNK_BYTES))
        a.close()
        with pytest.raises(ChannelBrokenError, match="never arrived|broken|EOF"):
            b.recv_exact(4 * STRIPE_CHUNK_BYTES)


# -- CompressedChannel -----------------------------------------------------------------------

from transport.codec import CodecError, method_unavailable  # noqa: E402
from transport.compressed import MAX_FRAME_BYTES, CompressedChannel  # noqa: E402

COMPRESSED_MODES = [m for m in ("zero", "zstd", "lz4") if m == "zero" or not method_unavailable(m)]


def _compressed_maker(mode: str):
    def make():
        a, b = channel_pair()
        return CompressedChannel(a, mode), CompressedChannel(b, mode)
    return make


# Elided zeros make these two premises false (512/64 MiB of zeros cross as a few KiB).
COMPRESSED_CHECKS = [c for c in conformance.CHANNEL_CHECKS
                     if c.__name__ not in ("check_peer_close_while_sending", "check_send_timeout_mid_message")]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", COMPRESSED_MODES)
@pytest.mark.parametrize("check", COMPRESSED_CHECKS, ids=[c.__name__.removeprefix("check_") for c in COMPRESSED_CHECKS])
def test_compressed_channel_conformance(mode, check):
    check(_compressed_maker(mode))


def _guestlike_pages(npages: int, seed: int = 9) -> np.ndarray:
    """Random pages, every third one zero, a few text-like ones."""
    rng = np.random.default_rng(seed)
    pages = rng.integers(0, 256, size=(npages, 4096), dtype=np.uint8)
    pages[::3] = 0
    pages[1::7] = np.frombuffer((b"vmem " * 820)[:4096], dtype=np.uint8)
    return pages


@pytest.mark.parametrize("mode", COMPRESSED_MODES)
def test_zero_pages_never_cross_the_link(mode):
    pages = _guestlike_pages(2048)
    n_zero = int((pages == 0).all(axis=1).sum())
    a, b = channel_pair()
    with CompressedChannel(a, mode) as tx, CompressedChannel(b, mode) as rx:
        out = np.full_like(pages, 0xEE)
        pending = Worker(rx.recv_into, out)
        tx.send_parts([b"record header", pages, pages[:0]])
        pending.result()
        got = out.reshape(-1)
        expected = np.concatenate([np.frombuffer(b"record header", np.uint8), pages.reshape(-1)])[:got.size]
        assert np.array_equal(got, expected)
        assert rx.recv_exact(13) == pages.reshape(-1)[-13:].tobytes()
        assert tx.zero_pages_sent == n_zero
        assert tx.wire_bytes_sent <= pages.nbytes + 13 - n_zero * 4096 + 4096  # zeros cost a bit each
        if mode != "zero":
            assert tx.wire_bytes_sent < pages.nbytes - n_zero * 4096  # the text-like pages shrank


def test_all_zero_8_mib_costs_a_few_hundred_bytes():
    a, b = channel_pair()
    with CompressedChannel(a) as tx, CompressedChannel(b) as rx:
        tx.send(np.zeros((2048, 4096), dtype=np.uint8))
        out = np.ones((2048, 4096), dtype=np.uint8)
        rx.recv_into(out)
        assert not out.any()
        assert tx.wire_bytes_sent < 1024


def test_compressed_corrupt_frames_are_refused_and_sticky():
    import struct

    for bad in (b"XX" + bytes(14),                                                 # magic
                struct.pack("<2sBBIII", b"VZ", 2, 0, 4096 * 3, 1, 4096 * 4),       # payload > raw
                struct.pack("<2sBBIII", b"VZ", 2, 0, MAX_FRAME_BYTES + 4096, 129, 0),  # too many pages
                struct.pack("<2sBBIII", b"VZ", 2, 9, 4096, 1, 0),                  # unknown method
                struct.pack("<2sBBIII", b"VZ", 1, 0, 10, 0, 11)):                  # RAW length mismatch
        a, b = channel_pair()
        with a, CompressedChannel(b) as rx:
            a.send(bad + bytes(64))
            with pytest.raises(CodecError, match="corrupt"):
                rx.recv_exact(4096)
            with pytest.raises(CodecError):
                rx.recv_exact(1)
    # a frame that lies about its zero pages: bitmap says 1 zero page, payload has 2 pages of 2
    a, b = channel_pair()
    with a, CompressedChannel(b) as rx:
        a.send(struct.pack("<2sBBIII", b"VZ", 2, 0, 3 * 4096, 1, 2 * 4096) + b"\x03" + bytes(2 * 4096))
        with pytest.raises(CodecError):
            rx.recv_exact(3 * 4096)


def test_compressed_over_striped_over_mac():
    """The agents' stack: CompressedChannel(StripedChannel(MacChannel per connection))."""
    a, b = make_striped_pair(n_data=1, mac=True)
    tx, rx = CompressedChannel(a), CompressedChannel(b)
    with tx, rx:
        pages = _guestlike_pages(3000, seed=11)
        out = np.empty_like(pages)
        pending = Worker(rx.recv_into, out)
        tx.send(pages)
        pending.result()
        assert np.array_equal(out, pages)
        rx.send(b"ack")
        assert tx.recv_exact(3) == b"ack"
