"""transport.gmac: the AES-256-GMAC tag of keyed links' frames (MacChannel, the C fault path)."""
from __future__ import annotations

import os

import pytest

import transport.gmac as gmac
from transport.gmac import GMAC_TAG_BYTES, Gmac, GmacUnavailable


def test_known_answer_of_the_gcm_specification():
    """McGrew & Viega, "The Galois/Counter Mode of Operation", test case 13: AES-256, zero
    key, zero IV (our nonce for frame 0), empty message."""
    assert Gmac(bytes(32)).tag(0, []).hex() == "530f8afbc74536b9a963b4f1c4cb738b"


def test_the_tag_binds_key_nonce_and_every_byte():
    key = os.urandom(32)
    msg = bytearray(os.urandom(1 << 20))
    g = Gmac(key)
    base = g.tag(7, [msg])
    assert len(base) == GMAC_TAG_BYTES
    assert g.tag(7, [msg]) == base  # deterministic: a receiver recomputes it
    assert g.tag(8, [msg]) != base  # another frame number (a replayed or reordered frame)
    assert Gmac(os.urandom(32)).tag(7, [msg]) != base  # another connection's key
    for at in (0, 4095, len(msg) - 1):
        msg[at] ^= 0x01
        assert g.tag(7, [msg]) != base, f"a flipped bit at byte {at} went unnoticed"
        msg[at] ^= 0x01


def test_a_message_in_parts_tags_as_one():
    g = Gmac(os.urandom(32))
    head, body = os.urandom(12), os.urandom(5000)
    whole = g.tag(3, [head + body])
    assert g.tag(3, [head, memoryview(body)]) == whole
    assert g.tag(3, [head, b"", body[:100], body[100:]]) == whole
    assert g.tag(3, [head, body[:-1]]) != whole  # a truncated message


def test_a_key_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="32 bytes"):
        Gmac(bytes(16))


def test_missing_libcrypto_is_named(monkeypatch):
    """Without libcrypto a keyed link cannot be built: the error says which library and
    which package provides it."""
    import cffi

    def no_library(self, name, *a, **kw):
        raise OSError(f"cannot load library '{name}'")

    gmac._libcrypto.cache_clear()
    monkeypatch.setattr(cffi.FFI, "dlopen", no_library)
    try:
        with pytest.raises(GmacUnavailable, match="libcrypto.*libssl3"):
            Gmac(os.urandom(32))
    finally:
        monkeypatch.undo()
        gmac._libcrypto.cache_clear()
    assert len(Gmac(os.urandom(32)).tag(0, [b"x"])) == GMAC_TAG_BYTES  # loads again afterwards
