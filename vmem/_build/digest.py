"""Per-page 64-bit digest: XXH64 (seed 0) of each 4096-byte page.

XXH64 runs four independent lanes over 32-byte stripes (the lanes pipeline on one core),
each word goes through ``acc = rotl(acc + w * P2, 31) * P1``: the lane a word lands in and
the number of rounds after it make the result depend on the word's position, so moved,
swapped or flipped bytes change the digest.  A 4096-byte page is a whole number of stripes,
so there is no tail; the result equals ``xxhash.xxh64_intdigest(page)``.  It is a change
detector for verification and statistics, not a cryptographic hash.
"""

INCLUDES = ""

TYPES = ""

FUNCTIONS = """
void vmem_digest_pages(uint64_t base, const int64_t *pages, size_t n, uint64_t *out);
void vmem_digest_range(uint64_t base, int64_t first, size_t n, uint64_t *out);
uint64_t vmem_digest_bytes(const uint8_t *data);
"""

CUSTOMIZATIONS = r"""
#define VMEM_XXH_P1 0x9E3779B185EBCA87ULL
#define VMEM_XXH_P2 0xC2B2AE3D27D4EB4FULL
#define VMEM_XXH_P3 0x165667B19E3779F9ULL
#define VMEM_XXH_P4 0x85EBCA77C2B2AE63ULL

static inline uint64_t vmem_rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t vmem_xxh_round(uint64_t acc, uint64_t w)
{
    acc += w * VMEM_XXH_P2;
    acc = vmem_rotl64(acc, 31);
    return acc * VMEM_XXH_P1;
}

static inline uint64_t vmem_xxh_merge(uint64_t h, uint64_t v)
{
    h ^= vmem_xxh_round(0, v);
    return h * VMEM_XXH_P1 + VMEM_XXH_P4;
}

static inline uint64_t vmem_digest_page(const uint8_t *p)
{
    uint64_t v1 = VMEM_XXH_P1 + VMEM_XXH_P2, v2 = VMEM_XXH_P2, v3 = 0, v4 = 0 - VMEM_XXH_P1;
    for (size_t i = 0; i < VMEM_PAGE_SIZE; i += 32) {
        uint64_t w[4];
        memcpy(w, p + i, sizeof w);      /* little-endian loads, alignment-agnostic */
        v1 = vmem_xxh_round(v1, w[0]);
        v2 = vmem_xxh_round(v2, w[1]);
        v3 = vmem_xxh_round(v3, w[2]);
        v4 = vmem_xxh_round(v4, w[3]);
    }
    uint64_t h = vmem_rotl64(v1, 1) + vmem_rotl64(v2, 7) + vmem_rotl64(v3, 12) + vmem_rotl64(v4, 18);
    h = vmem_xxh_merge(h, v1);
    h = vmem_xxh_merge(h, v2);
    h = vmem_xxh_merge(h, v3);
    h = vmem_xxh_merge(h, v4);
    h += VMEM_PAGE_SIZE;
    h ^= h >> 33;
    h *= VMEM_XXH_P2;
    h ^= h >> 29;
    h *= VMEM_XXH_P3;
    h ^= h >> 32;
    return h;
}

static void vmem_digest_pages(uint64_t base, const int64_t *pages, size_t n, uint64_t *out)
{
    const uint8_t *b = (const uint8_t *)(uintptr_t)base;
    for (size_t i = 0; i < n; i++) {
        if (i + 1 < n)
            __builtin_prefetch(b + ((uint64_t)pages[i + 1] << VMEM_PAGE_SHIFT));
        out[i] = vmem_digest_page(b + ((uint64_t)pages[i] << VMEM_PAGE_SHIFT));
    }
}

static void vmem_digest_range(uint64_t base, int64_t first, size_t n, uint64_t *out)
{
    const uint8_t *p = (const uint8_t *)(uintptr_t)base + ((uint64_t)first << VMEM_PAGE_SHIFT);
    for (size_t i = 0; i < n; i++)
        out[i] = vmem_digest_page(p + (i << VMEM_PAGE_SHIFT));
}

static uint64_t vmem_digest_bytes(const uint8_t *data)
{
    return vmem_digest_page(data);
}
"""
