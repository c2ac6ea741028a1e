"""AES-256-GMAC through the system's OpenSSL libcrypto: the tag of a keyed link's frames.

GMAC is AES-GCM with no plaintext: the message goes in as additional authenticated data
and GCM's 16-byte tag is the MAC.  It is a secure MAC as long as a nonce never repeats
under one key; :class:`~transport.secure.MacChannel` uses the frame's sequence number
(each direction of each connection has its own key, and frames are counted from 0), and
the native post-copy threads (``vmem/_build/postcopy.py``, ``vmem_gmac``) compute the same
tag in C.  Chosen over HMAC-SHA256 for speed: with AES-NI and PCLMULQDQ, measured here on
1 MiB frames, 7.1 GB/s per core against 1.5 GB/s for HMAC-SHA256 (which had made a keyed
link 0.5-0.6x an unkeyed one: docs/performance.md).

Two backends, one tag (bit for bit; the tests compare them):

- ``transport._gmac_native`` (built with the package: ``_build/gmac_fragment.py``): GHASH
  on VPCLMULQDQ where the CPU offers AVX-512, 2.9x libcrypto's on this machine, and a
  sender's copy of the frame made in the same pass (:meth:`Gmac.copy_and_tag`); libcrypto's
  AES-256-GCM elsewhere.  The same C code tags the post-copy fault threads' frames.
- libcrypto through cffi in ABI mode, when the extension is not built (no compiler needed).

cffi releases the GIL during each call, so a 1 MiB tag runs beside other Python threads.
:func:`implementation` names the backend in use (``vmem doctor`` prints it).

Guarantees: :meth:`Gmac.tag` is deterministic in (key, seq, message bytes);
:meth:`Gmac.copy_and_tag` tags exactly the bytes it wrote (each source byte is read once,
so a source changing meanwhile cannot make copy and tag disagree); a :class:`Gmac` is not
thread-safe (one per direction; a channel's sends, and its receives, are serialised
already).  A libcrypto failure raises :class:`GmacUnavailable` naming what is missing or
failed.
"""
from __future__ import annotations

import ctypes.util
import errno
import functools
import struct
from collections.abc import Iterable

from .errors import TransportError

__all__ = ["GMAC_KEY_BYTES", "GMAC_TAG_BYTES", "Gmac", "GmacUnavailable", "implementation"]

GMAC_KEY_BYTES = 32
GMAC_TAG_BYTES = 16
_EVP_CTRL_GCM_GET_TAG = 0x10
# nonce (GCM's 96-bit IV) = 4 zero bytes | seq u64 little-endian (as the C side's memcpy on x86-64)
_IV = struct.Struct("<4xQ")

_CDEF = """
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct engine_st ENGINE;
EVP_CIPHER_CTX *EVP_CIPHER_CTX_new(void);
void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx);
const EVP_CIPHER *EVP_aes_256_gcm(void);
int EVP_EncryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *type, ENGINE *impl,
                       const unsigned char *key, const unsigned char *iv);
int EVP_EncryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl, const unsigned char *in, int inl);
int EVP_EncryptFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl);
int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr);
int EVP_DecryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *type, ENGINE *impl,
                       const unsigned char *key, const unsigned char *iv);
int EVP_DecryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl, const unsigned char *in, int inl);
int EVP_DecryptFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl);
"""


class GmacUnavailable(TransportError):
    """libcrypto (OpenSSL) could not be loaded or refused an operation."""


@functools.lru_cache(maxsize=1)
def _libcrypto():
    """``(ffi, lib)`` for the system's libcrypto, loaded once per process."""
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(_CDEF)
    names = ["libcrypto.so.3", "libcrypto.so.1.1"]
    found = ctypes.util.find_library("crypto")
    if found and found not in names:
        names.append(found)
    errors = []
    for name in names:
        try:
            return ffi, ffi.dlopen(name)
        except OSError as err:
            errors.append(f"{name}: {err}")
    raise GmacUnavailable("keyed links need OpenSSL's libcrypto (Debian: libssl3), which could not be loaded: "
                          + "; ".join(errors))


def _native():
    """``(ffi, lib)`` of ``transport._gmac_native``, or None when it is not built."""
    try:
        from ._gmac_native import ffi, lib
    except ImportError:
        return None
    return ffi, lib


_NATIVE = _native()


def implementation() -> str:
    """The backend tags are computed with, in words (for ``vmem doctor``)."""
    if _NATIVE is None:
        return "libcrypto AES-256-GCM via cffi ABI mode (transport._gmac_native is not built)"
    _, lib = _NATIVE
    if lib.transport_gmac_impl(-1) == lib.TRANSPORT_GMAC_VPCLMUL:
        return "native: GHASH on VPCLMULQDQ (AVX-512), AES blocks from libcrypto"
    return "native: libcrypto AES-256-GCM (no VPCLMULQDQ/AVX-512 here)"


class Gmac:
    """AES-256-GMAC under one key: :meth:`tag` of a message given in parts.

    Args:
        key: :data:`GMAC_KEY_BYTES` bytes (a direction key of a MacChannel).
    """

    def __init__(self, key: bytes):
        if len(key) != GMAC_KEY_BYTES:
            raise ValueError(f"GMAC key must be {GMAC_KEY_BYTES} bytes, got {len(key)}")
        self._tag = bytearray(GMAC_TAG_BYTES)
        if _NATIVE is not None:
            ffi, lib = self._ffi, self._lib = _NATIVE
            out = ffi.new("transport_gmac **")
            rc = lib.transport_gmac_new(key, out)
            if rc == -errno.ENOMEM:
                raise MemoryError("transport_gmac_new failed")
            if rc < 0:
                raise GmacUnavailable("libcrypto AES-256 key setup failed")
            self._native = ffi.gc(out[0], lib.transport_gmac_free)
            self._tag_buf = ffi.from_buffer(self._tag)
            return
        self._native = None
        ffi, lib = self._ffi, self._lib = _libcrypto()
        ctx = lib.EVP_CIPHER_CTX_new()
        if ctx == ffi.NULL:
            raise MemoryError("EVP_CIPHER_CTX_new failed")
        self._ctx = ffi.gc(ctx, lib.EVP_CIPHER_CTX_free)
        # The key schedule is computed once here; each tag only sets a new nonce.
        self._check(lib.EVP_EncryptInit_ex(self._ctx, lib.EVP_aes_256_gcm(), ffi.NULL, key, ffi.NULL), "key setup")
        self._iv = ffi.new("unsigned char[12]")
        self._outl = ffi.new("int *")
        self._final = ffi.new("unsigned char[16]")
        self._abi_tag = ffi.new("unsigned char[16]")

    def _check(self, rc: int, what: str) -> None:
        if rc != 1:
            raise GmacUnavailable(f"libcrypto AES-256-GCM {what} failed")

    def tag(self, seq: int, parts: Iterable) -> bytes:
        """The 16-byte tag of the concatenation of ``parts`` (bytes-like) under nonce ``seq``.

        ``seq`` must never repeat under this key (a frame number, 0..2**64-1)."""
        if self._native is not None:
            return self._native_tag(seq, list(parts), 0, None)
        ffi, lib, ctx = self._ffi, self._lib, self._ctx
        ffi.memmove(self._iv, _IV.pack(seq), 12)
        self._check(lib.EVP_EncryptInit_ex(ctx, ffi.NULL, ffi.NULL, ffi.NULL, self._iv), "nonce")
        for part in parts:
            n = memoryview(part).nbytes
            if n:
                self._check(lib.EVP_EncryptUpdate(ctx, ffi.NULL, self._outl, ffi.from_buffer(part), n), "update")
        self._check(lib.EVP_EncryptFinal_ex(ctx, self._final, self._outl), "final")
        self._check(lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_GET_TAG, GMAC_TAG_BYTES, self._abi_tag), "tag")
        return ffi.buffer(self._abi_tag)[:]

    def copy_and_tag(self, seq: int, prefix: bytes, pieces: list, out: memoryview) -> bytes:
        """Copy the concatenated ``pieces`` into ``out`` (writable, at least their size) and
        return the tag of ``prefix`` followed by that copy, under nonce ``seq``.

        The tag is of the bytes written to ``out`` even when a piece changes during the call
        (a view of live guest RAM): the native backend copies and hashes in one pass, reading
        each byte once; the ABI backend copies first and tags the copy."""
        if self._native is not None:
            return self._native_tag(seq, [prefix, *pieces], 1, out)
        at = 0
        for piece in pieces:
            n = memoryview(piece).nbytes
            out[at:at + n] = piece
            at += n
        return self.tag(seq, (prefix, out[:at]))

    def _native_tag(self, seq: int, parts: list, copy_from: int, out) -> bytes:
        ffi, lib = self._ffi, self._lib
        bufs = [ffi.from_buffer(part) for part in parts]   # kept alive through the call
        lens = [len(buf) for buf in bufs]
        if out is not None:
            room = memoryview(out).nbytes
            if sum(lens[copy_from:]) > room:
                raise ValueError(f"{sum(lens[copy_from:])} bytes to copy into {room}")
            to = ffi.from_buffer(out, require_writable=True)
        else:
            to = ffi.NULL
        if lib.transport_gmac_tag(self._native, seq, len(bufs), bufs, lens, copy_from, to, self._tag_buf) < 0:
            raise GmacUnavailable("libcrypto AES-256 block encryption failed")
        return bytes(self._tag)
