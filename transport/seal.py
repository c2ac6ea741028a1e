"""Sealed frames: MacChannel's framing with the payload encrypted (AES-256-GCM).

Why: post-copy's demand pages travel on an urgent connection that native threads speak
(vmem/_build/postcopy.py).  On a keyed link they speak :class:`~transport.secure.MacChannel`'s
framing; a TLS link's bytes they cannot speak (this kernel has no kernel TLS: CONFIG_TLS is
not set), so between TLS agents the urgent connection, once authenticated and attached over
TLS, switches to these frames under a fresh key that the source chose and sent inside TLS.
The pages then stay confidential and integrity-protected, as TLS keeps them, at native speed.

Layout (MacChannel's, the payload encrypted; one sequence number per direction from 0)::

    u32 length (1..MAX_FRAME_PAYLOAD_BYTES) | ciphertext (length bytes) | tag[16]
    ciphertext, tag = AES-256-GCM(direction key, nonce 0^4 | u64 seq,
                                  aad u64 seq | u32 length, plaintext payload)

Direction keys: HMAC-SHA256(session key, "vmem-seal-v1 client->server") and
"... server->client".  The session key must be fresh per connection and known only to the
two ends (:func:`new_session_key`, sent over an authenticated, confidential channel).

Guarantees (beyond MacChannel's, which all hold: a forged, replayed, reordered or truncated
frame raises AuthError, sticky): no byte of a payload is on the wire in the clear.
"""
from __future__ import annotations

import os

from .gmac import GMAC_KEY_BYTES, GMAC_TAG_BYTES, GmacUnavailable, _IV, _libcrypto
from .secure import _SEQ_LEN, MacChannel

__all__ = ["AesGcm", "SealedChannel", "SESSION_KEY_BYTES", "new_session_key"]

SESSION_KEY_BYTES = 32
_EVP_CTRL_GCM_GET_TAG = 0x10
_EVP_CTRL_GCM_SET_TAG = 0x11


def new_session_key() -> bytes:
    """A fresh random session key for one sealed connection."""
    return os.urandom(SESSION_KEY_BYTES)


class AesGcm:
    """AES-256-GCM under one key (libcrypto through cffi ABI mode): encrypt a frame in place
    and return its tag, or check a tag and decrypt in place.  One per direction; not
    thread-safe.  (The native threads do the same with libcrypto's EVP in C; Python speaks
    these frames only in tests and tools, so this backend is not tuned.)"""

    def __init__(self, key: bytes):
        if len(key) != GMAC_KEY_BYTES:
            raise ValueError(f"AES-256-GCM key must be {GMAC_KEY_BYTES} bytes, got {len(key)}")
        ffi, lib = self._ffi, self._lib = _libcrypto()
        self._key = bytes(key)
        enc, dec = lib.EVP_CIPHER_CTX_new(), lib.EVP_CIPHER_CTX_new()
        if enc == ffi.NULL or dec == ffi.NULL:
            raise MemoryError("EVP_CIPHER_CTX_new failed")
        self._enc = ffi.gc(enc, lib.EVP_CIPHER_CTX_free)
        self._dec = ffi.gc(dec, lib.EVP_CIPHER_CTX_free)
        # The key schedule is computed once; each frame only sets its nonce.
        self._check(lib.EVP_EncryptInit_ex(self._enc, lib.EVP_aes_256_gcm(), ffi.NULL, key, ffi.NULL), "key setup")
        self._check(lib.EVP_DecryptInit_ex(self._dec, lib.EVP_aes_256_gcm(), ffi.NULL, key, ffi.NULL), "key setup")
        self._iv = ffi.new("unsigned char[12]")
        self._outl = ffi.new("int *")
        self._final = ffi.new("unsigned char[16]")
        self._tag = ffi.new("unsigned char[16]")

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc != 1:
            raise GmacUnavailable(f"libcrypto AES-256-GCM {what} failed")

    def _start(self, ctx, init, update, seq: int, aad: bytes, buf) -> None:
        """GCM's steps that encrypting and decrypting share: nonce ``seq``, ``aad``, then
        ``buf`` transformed in place."""
        ffi = self._ffi
        ffi.memmove(self._iv, _IV.pack(seq), 12)
        self._check(init(ctx, ffi.NULL, ffi.NULL, ffi.NULL, self._iv), "nonce")
        self._check(update(ctx, ffi.NULL, self._outl, aad, len(aad)), "aad")
        n = memoryview(buf).nbytes
        if n:
            data = ffi.from_buffer(buf, require_writable=True)
            self._check(update(ctx, data, self._outl, data, n), "update")

    def seal(self, seq: int, aad: bytes, buf: memoryview) -> bytes:
        """Encrypt ``buf`` in place under nonce ``seq`` (never repeated under this key);
        return the 16-byte tag over ``aad`` and the ciphertext."""
        ffi, lib, ctx = self._ffi, self._lib, self._enc
        self._start(ctx, lib.EVP_EncryptInit_ex, lib.EVP_EncryptUpdate, seq, aad, buf)
        self._check(lib.EVP_EncryptFinal_ex(ctx, self._final, self._outl), "final")
        self._check(lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_GET_TAG, GMAC_TAG_BYTES, self._tag), "tag")
        return ffi.buffer(self._tag)[:]

    def open(self, seq: int, aad: bytes, buf: memoryview, tag) -> bool:
        """Decrypt ``buf`` in place under nonce ``seq``; True if ``tag`` is right (else
        ``buf`` holds garbage and must not be used)."""
        ffi, lib, ctx = self._ffi, self._lib, self._dec
        self._start(ctx, lib.EVP_DecryptInit_ex, lib.EVP_DecryptUpdate, seq, aad, buf)
        ffi.memmove(self._tag, bytes(tag), GMAC_TAG_BYTES)
        self._check(lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_SET_TAG, GMAC_TAG_BYTES, self._tag), "set tag")
        return lib.EVP_DecryptFinal_ex(ctx, self._final, self._outl) == 1


class SealedChannel(MacChannel):
    """A :class:`MacChannel` whose frames are encrypted too (layout in the module docstring).

    Same contract, counters and ownership of ``inner`` as MacChannel, plus confidentiality.
    Made for connections that native code takes over (:meth:`native_handoff` says
    ``"cipher": "aes-256-gcm"``); Python speaks it at libcrypto's speed.

    Args:
        inner: a connected plain channel.
        session_key: :func:`new_session_key`'s, shared by the two ends only.
        role: ``"client"`` or ``"server"`` (the directions use different keys).
    """

    CIPHER = "aes-256-gcm"
    _LABELS = (b"vmem-seal-v1 client->server", b"vmem-seal-v1 server->client")

    @staticmethod
    def _direction_cipher(key: bytes):
        return AesGcm(key)

    def _protect(self, seq: int, length: int, pieces: list, out: memoryview) -> bytes:
        at = 0
        for piece in pieces:  # a private copy first: a caller's buffer may change meanwhile
            n = memoryview(piece).nbytes
            out[at:at + n] = piece
            at += n
        return self._send_mac.seal(seq, _SEQ_LEN.pack(seq, length), out[:at])

    def _verify(self, seq: int, length: int, payload: memoryview, their_tag) -> bool:
        return self._recv_mac.open(seq, _SEQ_LEN.pack(seq, length), payload, their_tag)

    def __repr__(self) -> str:
        return "<Sealed" + super().__repr__()[len("<Mac"):]
