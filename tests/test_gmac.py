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
    monkeypatch.setattr(gmac, "_NATIVE", None)   # the ABI backend (the native one links libcrypto)
    monkeypatch.setattr(cffi.FFI, "dlopen", no_library)
    try:
        with pytest.raises(GmacUnavailable, match="libcrypto.*libssl3"):
            Gmac(os.urandom(32))
    finally:
        monkeypatch.undo()
        gmac._libcrypto.cache_clear()
    assert len(Gmac(os.urandom(32)).tag(0, [b"x"])) == GMAC_TAG_BYTES  # loads again afterwards


# -- the backends: one tag ---------------------------------------------------------------------

needs_native = pytest.mark.skipif(gmac._NATIVE is None, reason="transport._gmac_native is not built "
                                  "(pip install -e . or python3 transport/_build/build_gmac.py)")


@pytest.fixture
def native_impl():
    """Force the native path (0 libcrypto, 1 VPCLMULQDQ) for a test; restore the choice after."""
    lib = gmac._NATIVE[1]
    before = lib.transport_gmac_impl(-1)

    def force(want):
        got = lib.transport_gmac_impl(want)
        if got != want:
            pytest.skip("this CPU has no VPCLMULQDQ with AVX-512 (F+BW): only libcrypto's path runs")
        return got

    yield force
    lib.transport_gmac_impl(before)


def _abi_tag(monkeypatch, key, seq, parts):
    with monkeypatch.context() as m:
        m.setattr(gmac, "_NATIVE", None)
        return Gmac(key).tag(seq, parts)


def _splits(rng, data, max_parts=6):
    cuts = sorted(rng.integers(0, len(data) + 1, size=rng.integers(0, max_parts)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


@needs_native
def test_native_paths_and_the_abi_path_give_the_same_tags(monkeypatch, native_impl):
    """Random messages (0 bytes to 1 MiB + a few, every length class around the 16-byte block
    and the 64-block batch), cut into random parts: the VPCLMULQDQ GHASH, libcrypto's GCM in
    the extension and libcrypto through cffi ABI agree bit for bit; a flipped bit changes
    the vector path's tag."""
    import numpy as np

    rng = np.random.default_rng(13)
    key = os.urandom(32)
    lengths = [*range(0, 70), 1023, 1024, 1025, 1036, 4096 + 12, 65535, 65536 + 12, (1 << 20) + 12, (1 << 20) + 17]
    lengths += [int(n) for n in rng.integers(0, 20000, size=40)]
    for n in lengths:
        msg = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
        seq = int(rng.integers(0, 2**63))
        expected = _abi_tag(monkeypatch, key, seq, [msg])
        for impl in (1, 0):
            native_impl(impl)
            g = Gmac(key)
            assert g.tag(seq, _splits(rng, msg)) == expected, f"{n} bytes, impl {impl}"
            assert g.tag(seq, [msg]) == expected
        if n:
            flipped = bytearray(msg)
            flipped[int(rng.integers(0, n))] ^= 1 << int(rng.integers(0, 8))
            assert Gmac(key).tag(seq, [flipped]) != expected


@needs_native
def test_copy_and_tag_copies_and_tags_the_copy(monkeypatch, native_impl):
    import numpy as np

    rng = np.random.default_rng(7)
    key = os.urandom(32)
    for impl in (1, 0):
        native_impl(impl)
        g = Gmac(key)
        for n in (0, 1, 15, 16, 17, 1000, 4096, 1 << 20):
            payload = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
            prefix = os.urandom(12)
            out = bytearray(n + 5)
            tag = g.copy_and_tag(9, prefix, _splits(rng, payload), memoryview(out)[:n])
            assert bytes(out[:n]) == payload and out[n:] == bytes(5)
            assert tag == _abi_tag(monkeypatch, key, 9, [prefix, payload])
    with pytest.raises(ValueError, match="bytes to copy"):
        Gmac(key).copy_and_tag(0, b"", [b"abc"], memoryview(bytearray(2)))


@needs_native
def test_copy_and_tag_tags_what_it_wrote_while_the_source_changes(native_impl):
    """The guarantee MacChannel relies on for live guest RAM: a source rewritten during the
    call (here by another thread, flat out) still yields a tag that matches the copy."""
    import threading

    import numpy as np

    src = np.zeros(8 << 20, dtype=np.uint8)
    stop = threading.Event()

    def scribble():
        v = 0
        while not stop.is_set():
            v = (v + 1) & 0xFF
            src[::4099] = v        # every few bytes, across block and batch boundaries

    for impl in (1, 0):
        native_impl(impl)
        g = Gmac(os.urandom(32))
        writer = threading.Thread(target=scribble)
        writer.start()
        try:
            out = bytearray(src.nbytes)
            for seq in range(8):
                pieces = [memoryview(src)[:4097], memoryview(src)[4097:]]
                tag = g.copy_and_tag(seq, b"p" * 12, pieces, memoryview(out))
                assert tag == g.tag(seq, [b"p" * 12, out]), f"impl {impl}: tag and copy disagree"
        finally:
            stop.set()
            writer.join()
        stop.clear()


def test_implementation_names_the_backend_in_use(monkeypatch):
    """What `vmem doctor` prints follows the backend that computes the tags."""
    with monkeypatch.context() as m:
        m.setattr(gmac, "_NATIVE", None)
        assert "ABI mode" in gmac.implementation() and "not built" in gmac.implementation()
    if gmac._NATIVE is None:
        pytest.skip("transport._gmac_native is not built")
    lib = gmac._NATIVE[1]
    before = lib.transport_gmac_impl(-1)
    try:
        assert lib.transport_gmac_impl(0) == 0
        assert gmac.implementation().startswith("native: libcrypto AES-256-GCM")
        if lib.transport_gmac_impl(1) == 1:
            assert gmac.implementation().startswith("native: GHASH on VPCLMULQDQ")
    finally:
        lib.transport_gmac_impl(before)
