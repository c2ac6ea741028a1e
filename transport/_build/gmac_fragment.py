"""AES-256-GMAC in C: the frame tag of keyed links, with a GHASH on VPCLMULQDQ.

One cffi fragment (the four strings vmem's build_native.py describes), compiled twice: into
``transport._gmac_native`` (build_gmac.py; what transport.gmac uses) and into vmem's own
extension, whose post-copy fault threads tag their frames with it -- one implementation, so
the Python and the C ends of a link compute the same tag by construction.

GMAC is GCM with the message as additional authenticated data and no plaintext (NIST
SP 800-38D): ``tag = E_K(J0) xor GHASH_H(A || 0-pad || len64(A) || len64(0))`` with
``H = E_K(0^128)``, ``J0 = nonce || 0x00000001``.  libcrypto (OpenSSL 3.0) hashes AAD
with PCLMULQDQ one 128-bit block at a time: 0.10 s/GiB here.  The fast path multiplies
four blocks per 512-bit VPCLMULQDQ and reduces once per 64 blocks (``(Y ^ X1) H^64 ^ X2
H^63 ^ ... ^ X64 H``, with H^1..H^64 precomputed per key): 0.036 s/GiB here (2-vCPU AMD
EPYC, hot 1 MiB frames; /tmp benchmark in docs/performance.md), and it can copy the bytes
it hashes in the same pass (a sender's private copy of live guest RAM costs then nothing
extra: 0.056 s/GiB from cold memory against 0.144 for memcpy + libcrypto).  The AES
blocks (H and E_K(J0)) still come from libcrypto (AES-256-ECB, one block per tag).

Field arithmetic (GCM's bit-reflected convention): a block is byte-swapped and read as a
128-bit integer, so the coefficient of x^i sits at bit 127 - i.  The carry-less product of
two such integers is then the 256-bit reflection of ``x * a * b``; multiplying by keys
stored as ``H^k * x^-1`` cancels the x, and the 256-bit result is reduced modulo
``x^128 + x^7 + x^2 + x + 1`` by folding its high-degree half twice (``gm_reduce``).

Chosen at run time (``transport_gmac_impl``): the VPCLMULQDQ path where the CPU and the
kernel offer AVX-512 (F + BW) and VPCLMULQDQ, otherwise libcrypto's AES-256-GCM for the
whole tag.  Both give the same tag, bit for bit (tests compare them with each other and
with the Python libcrypto path, on random splits of random messages).

Guarantees: ``transport_gmac_tag`` is deterministic in (key, nonce, message); when it
copies (``copy_to``), the bytes it tags are the bytes it wrote there, each source byte
read once -- a source that changes during the call (live guest RAM) cannot make tag and
copy disagree.  A context is not thread-safe (one per direction of a link).  Constant time
in the data (carry-less multiplies and XORs; no table lookups indexed by data).
"""

INCLUDES = """
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#include <openssl/evp.h>
"""

TYPES = """
typedef struct transport_gmac transport_gmac;
#define TRANSPORT_GMAC_LIBCRYPTO ...
#define TRANSPORT_GMAC_VPCLMUL ...
"""

FUNCTIONS = """
int transport_gmac_new(const uint8_t *key, transport_gmac **out);
void transport_gmac_free(transport_gmac *g);
int transport_gmac_tag(transport_gmac *g, uint64_t seq, size_t nparts, const uint8_t *const *parts,
                       const size_t *lens, size_t copy_from, uint8_t *copy_to, uint8_t *tag);
int transport_gmac_impl(int want);
"""

CUSTOMIZATIONS = r"""
#define TRANSPORT_GMAC_LIBCRYPTO 0
#define TRANSPORT_GMAC_VPCLMUL 1
#define TRANSPORT_GMAC_BATCH 64      /* blocks per reduction: H^1..H^64 per key */

typedef struct transport_gmac transport_gmac;

struct transport_gmac {
    /* keys[j] = H^(BATCH - j) * x^-1 (reflected), so a run of n blocks starts at keys[BATCH - n];
       three zero entries after them: the last 4-block load of a run may read past keys[BATCH-1] */
    __m128i keys[TRANSPORT_GMAC_BATCH + 3];
    __m128i k1;                       /* H * x^-1 */
    EVP_CIPHER_CTX *ecb;              /* AES-256-ECB: H and E_K(J0) */
    EVP_CIPHER_CTX *gcm;              /* AES-256-GCM: the whole tag on the libcrypto path */
};

struct transport_gmac_state {
    __m128i y;                        /* GHASH so far */
    uint8_t part[16];                 /* a block begun but not complete */
    size_t part_len;
    uint64_t total;                   /* bytes hashed */
};

static const uint8_t transport_gmac_bswap_bytes[16] = {15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0};

#if defined(__x86_64__) && defined(__GNUC__)
#define TRANSPORT_GMAC_TARGET __attribute__((target("pclmul,sse4.1,ssse3")))
#define TRANSPORT_GMAC_TARGET512 __attribute__((target("avx512f,avx512bw,vpclmulqdq,pclmul,sse4.1,ssse3")))

/* the 256-bit [hi:lo] (coefficient m at bit 255 - m) modulo x^128 + x^7 + x^2 + x + 1:
   the 64-bit word of highest degree, then the next, folded 128 degrees down times
   (1 + x + x^2 + x^7) -- multiplying by x^k moves a coefficient k bits toward bit 0 */
TRANSPORT_GMAC_TARGET
static inline __m128i gm_reduce(__m128i hi, __m128i lo)
{
    uint64_t d0 = (uint64_t)_mm_cvtsi128_si64(lo), d1 = (uint64_t)_mm_extract_epi64(lo, 1);
    uint64_t d2 = (uint64_t)_mm_cvtsi128_si64(hi), d3 = (uint64_t)_mm_extract_epi64(hi, 1);
    d2 ^= d0 ^ (d0 >> 1) ^ (d0 >> 2) ^ (d0 >> 7);
    d1 ^= (d0 << 63) ^ (d0 << 62) ^ (d0 << 57);
    d3 ^= d1 ^ (d1 >> 1) ^ (d1 >> 2) ^ (d1 >> 7);
    d2 ^= (d1 << 63) ^ (d1 << 62) ^ (d1 << 57);
    return _mm_set_epi64x((long long)d3, (long long)d2);
}

/* a * b, given a and bk = b * x^-1 (both reflected) */
TRANSPORT_GMAC_TARGET
static inline __m128i gm_mul(__m128i a, __m128i bk)
{
    __m128i lo = _mm_clmulepi64_si128(a, bk, 0x00), hi = _mm_clmulepi64_si128(a, bk, 0x11);
    __m128i mid = _mm_xor_si128(_mm_clmulepi64_si128(a, bk, 0x01), _mm_clmulepi64_si128(a, bk, 0x10));
    return gm_reduce(_mm_xor_si128(hi, _mm_srli_si128(mid, 8)), _mm_xor_si128(lo, _mm_slli_si128(mid, 8)));
}

/* h -> h * x^-1 (reflected): x^-1 = x^127 + x^6 + x + 1, so a set constant term becomes
   0xC2000000000000000000000000000001 after the shift */
TRANSPORT_GMAC_TARGET
static inline __m128i gm_times_xinv(__m128i h)
{
    uint64_t lo = (uint64_t)_mm_cvtsi128_si64(h), hi = (uint64_t)_mm_extract_epi64(h, 1);
    uint64_t carry = hi >> 63;
    hi = (hi << 1) | (lo >> 63);
    lo <<= 1;
    hi ^= (0 - carry) & 0xC200000000000000ULL;
    lo ^= carry;
    return _mm_set_epi64x((long long)hi, (long long)lo);
}

TRANSPORT_GMAC_TARGET
static inline __m128i gm_load_block(const uint8_t *p)
{
    return _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)p),
                            _mm_loadu_si128((const __m128i *)transport_gmac_bswap_bytes));
}

/* n (1..BATCH) whole blocks at src folded into y; copied to dst first unless dst is NULL
   (each 64 bytes loaded once, stored and hashed from the same register) */
TRANSPORT_GMAC_TARGET512
static __m128i gm_blocks(const struct transport_gmac *g, __m128i y, const uint8_t *src, uint8_t *dst, size_t n)
{
    const __m512i bswap = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)transport_gmac_bswap_bytes));
    const __m128i *keys = g->keys + (TRANSPORT_GMAC_BATCH - n);
    __m512i lo = _mm512_setzero_si512(), hi = lo, mid = lo;
    __m512i carry = _mm512_zextsi128_si512(y);     /* Y joins the first block */
    for (size_t j = 0; j < n; j += 4) {
        __m512i raw;
        if (j + 4 <= n) {
            raw = _mm512_loadu_si512(src + 16 * j);
            if (dst)
                _mm512_storeu_si512(dst + 16 * j, raw);
        } else {
            /* 1-3 blocks left: the lanes past them load as zero and add nothing */
            __mmask64 m = (__mmask64)((1ULL << (16 * (n - j))) - 1);
            raw = _mm512_maskz_loadu_epi8(m, src + 16 * j);
            if (dst)
                _mm512_mask_storeu_epi8(dst + 16 * j, m, raw);
        }
        __m512i x = _mm512_xor_si512(_mm512_shuffle_epi8(raw, bswap), carry);
        __m512i k = _mm512_loadu_si512((const void *)(keys + j));
        carry = _mm512_setzero_si512();
        lo = _mm512_xor_si512(lo, _mm512_clmulepi64_epi128(x, k, 0x00));
        hi = _mm512_xor_si512(hi, _mm512_clmulepi64_epi128(x, k, 0x11));
        mid = _mm512_xor_si512(mid, _mm512_xor_si512(_mm512_clmulepi64_epi128(x, k, 0x01),
                                                     _mm512_clmulepi64_epi128(x, k, 0x10)));
    }
    /* the four lanes' products summed, then one reduction */
    __m256i lo2 = _mm256_xor_si256(_mm512_castsi512_si256(lo), _mm512_extracti64x4_epi64(lo, 1));
    __m256i hi2 = _mm256_xor_si256(_mm512_castsi512_si256(hi), _mm512_extracti64x4_epi64(hi, 1));
    __m256i mid2 = _mm256_xor_si256(_mm512_castsi512_si256(mid), _mm512_extracti64x4_epi64(mid, 1));
    __m128i l = _mm_xor_si128(_mm256_castsi256_si128(lo2), _mm256_extracti128_si256(lo2, 1));
    __m128i h = _mm_xor_si128(_mm256_castsi256_si128(hi2), _mm256_extracti128_si256(hi2, 1));
    __m128i md = _mm_xor_si128(_mm256_castsi256_si128(mid2), _mm256_extracti128_si256(mid2, 1));
    return gm_reduce(_mm_xor_si128(h, _mm_srli_si128(md, 8)), _mm_xor_si128(l, _mm_slli_si128(md, 8)));
}

/* len bytes at src into the GHASH state (and to dst, unless NULL) */
TRANSPORT_GMAC_TARGET512
static void gm_update(const struct transport_gmac *g, struct transport_gmac_state *s,
                      const uint8_t *src, uint8_t *dst, size_t len)
{
    s->total += len;
    if (s->part_len) {
        size_t m = 16 - s->part_len < len ? 16 - s->part_len : len;
        if (dst) {            /* hash the copy, not a second read of a source that may change */
            memcpy(dst, src, m);
            memcpy(s->part + s->part_len, dst, m);
            dst += m;
        } else {
            memcpy(s->part + s->part_len, src, m);
        }
        s->part_len += m;
        src += m;
        len -= m;
        if (s->part_len < 16)
            return;
        s->y = gm_mul(_mm_xor_si128(s->y, gm_load_block(s->part)), g->k1);
        s->part_len = 0;
    }
    while (len >= 16) {
        size_t n = len / 16 < TRANSPORT_GMAC_BATCH ? len / 16 : TRANSPORT_GMAC_BATCH;
        s->y = gm_blocks(g, s->y, src, dst, n);
        src += 16 * n;
        if (dst)
            dst += 16 * n;
        len -= 16 * n;
    }
    if (len) {
        if (dst) {
            memcpy(dst, src, len);
            src = dst;
        }
        memcpy(s->part, src, len);
        s->part_len = len;
    }
}

/* H^1..H^64 (times x^-1) from H's block hb */
TRANSPORT_GMAC_TARGET
static void gm_setup_keys(struct transport_gmac *g, const uint8_t hb[16])
{
    __m128i h = gm_load_block(hb), p = h;
    g->k1 = gm_times_xinv(h);
    for (int k = 1; k <= TRANSPORT_GMAC_BATCH; k++) {
        g->keys[TRANSPORT_GMAC_BATCH - k] = gm_times_xinv(p);
        p = gm_mul(p, g->k1);
    }
}

static int gm_aes_block(EVP_CIPHER_CTX *ecb, const uint8_t in[16], uint8_t out[16]);

/* transport_gmac_tag on the VPCLMULQDQ path; j0 holds the nonce (its last byte is set here) */
TRANSPORT_GMAC_TARGET512
static int gm_tag_vector(struct transport_gmac *g, uint8_t j0[16], size_t nparts, const uint8_t *const *parts,
                         const size_t *lens, size_t copy_from, uint8_t *copy_to, uint8_t *tag)
{
    struct transport_gmac_state s;
    memset(&s, 0, sizeof s);
    uint8_t *to = copy_to;
    for (size_t i = 0; i < nparts; i++) {
        int copy = to && i >= copy_from;
        gm_update(g, &s, parts[i], copy ? to : NULL, lens[i]);
        if (copy)
            to += lens[i];
    }
    if (s.part_len) {
        memset(s.part + s.part_len, 0, 16 - s.part_len);
        s.y = gm_mul(_mm_xor_si128(s.y, gm_load_block(s.part)), g->k1);
    }
    /* the length block: len64(A) in bits, then len64(C) = 0; as the byte-swapped integer
       the A length is the high half */
    s.y = gm_mul(_mm_xor_si128(s.y, _mm_set_epi64x((long long)(s.total * 8), 0)), g->k1);
    uint8_t ek[16], gh[16];
    j0[15] = 1;
    if (gm_aes_block(g->ecb, j0, ek) < 0)
        return -EIO;
    _mm_storeu_si128((__m128i *)gh, _mm_shuffle_epi8(s.y, _mm_loadu_si128((const __m128i *)transport_gmac_bswap_bytes)));
    for (int i = 0; i < 16; i++)
        tag[i] = gh[i] ^ ek[i];
    return 0;
}

static int gm_vector_ok(void)
{
    /* libgcc's check includes the kernel's XSAVE state for the 512-bit registers */
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
           && __builtin_cpu_supports("vpclmulqdq") && __builtin_cpu_supports("pclmul");
}
#else
static int gm_vector_ok(void) { return 0; }
static void gm_setup_keys(struct transport_gmac *g, const uint8_t hb[16]) { (void)g; (void)hb; }
static int gm_tag_vector(struct transport_gmac *g, uint8_t j0[16], size_t nparts, const uint8_t *const *parts,
                         const size_t *lens, size_t copy_from, uint8_t *copy_to, uint8_t *tag) { return -ENOSYS; }
#endif

static int transport_gmac_active = -1;   /* -1: not chosen yet */

/* The path: want < 0 asks which is in use (the fastest the machine offers, chosen on first
   use); TRANSPORT_GMAC_LIBCRYPTO / TRANSPORT_GMAC_VPCLMUL choose one (the latter only where
   supported).  Returns the path in use.  Same tags either way. */
static int transport_gmac_impl(int want)
{
    if (want == TRANSPORT_GMAC_LIBCRYPTO || (want == TRANSPORT_GMAC_VPCLMUL && !gm_vector_ok()))
        transport_gmac_active = TRANSPORT_GMAC_LIBCRYPTO;
    else if (want == TRANSPORT_GMAC_VPCLMUL || transport_gmac_active < 0)
        transport_gmac_active = gm_vector_ok() ? TRANSPORT_GMAC_VPCLMUL : TRANSPORT_GMAC_LIBCRYPTO;
    return transport_gmac_active;
}

static int gm_aes_block(EVP_CIPHER_CTX *ecb, const uint8_t in[16], uint8_t out[16])
{
    int outl = 0;
    return EVP_EncryptUpdate(ecb, out, &outl, in, 16) == 1 && outl == 16 ? 0 : -EIO;
}

static void transport_gmac_free(struct transport_gmac *g)
{
    if (!g)
        return;
    EVP_CIPHER_CTX_free(g->ecb);       /* clears the key schedules too */
    EVP_CIPHER_CTX_free(g->gcm);
    memset(g, 0, sizeof *g);           /* the GHASH keys */
    free(g);
}

/* A context for the 32-byte key: 0, -ENOMEM or -EIO (libcrypto refused). */
static int transport_gmac_new(const uint8_t *key, struct transport_gmac **out)
{
    struct transport_gmac *g = aligned_alloc(64, (sizeof *g + 63) & ~(size_t)63);
    if (!g)
        return -ENOMEM;
    memset(g, 0, sizeof *g);
    if (!(g->ecb = EVP_CIPHER_CTX_new()) || !(g->gcm = EVP_CIPHER_CTX_new())) {
        transport_gmac_free(g);
        return -ENOMEM;
    }
    uint8_t zero[16] = {0}, hb[16];
    if (EVP_EncryptInit_ex(g->ecb, EVP_aes_256_ecb(), NULL, key, NULL) != 1
        || EVP_CIPHER_CTX_set_padding(g->ecb, 0) != 1
        || EVP_EncryptInit_ex(g->gcm, EVP_aes_256_gcm(), NULL, key, NULL) != 1
        || gm_aes_block(g->ecb, zero, hb) < 0) {
        transport_gmac_free(g);
        return -EIO;
    }
    if (gm_vector_ok())
        gm_setup_keys(g, hb);
    memset(hb, 0, sizeof hb);
    *out = g;
    return 0;
}

/* The tag of parts[0] || ... || parts[nparts-1] under nonce 0^4 | seq (u64 little-endian,
   as transport.gmac packs it) into tag[16]; parts[copy_from..] are also copied, joined, to
   copy_to unless it is NULL (and the copy is what gets tagged).  0 or -EIO. */
static int transport_gmac_tag(struct transport_gmac *g, uint64_t seq, size_t nparts, const uint8_t *const *parts,
                              const size_t *lens, size_t copy_from, uint8_t *copy_to, uint8_t *tag)
{
    uint8_t j0[16] = {0};
    memcpy(j0 + 4, &seq, 8);
    if (transport_gmac_impl(-1) == TRANSPORT_GMAC_VPCLMUL)
        return gm_tag_vector(g, j0, nparts, parts, lens, copy_from, copy_to, tag);
    int outl = 0;
    uint8_t unused[16];
    if (EVP_EncryptInit_ex(g->gcm, NULL, NULL, NULL, j0) != 1)
        return -EIO;
    uint8_t *to = copy_to;
    for (size_t i = 0; i < nparts; i++) {
        const uint8_t *p = parts[i];
        if (to && i >= copy_from) {
            memcpy(to, p, lens[i]);     /* tag the copy (see the guarantees) */
            p = to;
            to += lens[i];
        }
        if (lens[i] && (lens[i] > INT32_MAX || EVP_EncryptUpdate(g->gcm, NULL, &outl, p, (int)lens[i]) != 1))
            return -EIO;
    }
    if (EVP_EncryptFinal_ex(g->gcm, unused, &outl) != 1
        || EVP_CIPHER_CTX_ctrl(g->gcm, EVP_CTRL_GCM_GET_TAG, 16, tag) != 1)
        return -EIO;
    return 0;
}
"""
