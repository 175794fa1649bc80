/*
 * crc32c.c - CRC32C (Castagnoli): SSE4.2 instruction where the CPU has it, a portable
 * slicing-by-8 table otherwise, and a multi-threaded version that combines block CRCs exactly.
 */
#include <pthread.h>

#include "internal.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ZC_HAVE_SSE42_PATH 1
#include <nmmintrin.h>
#else
#define ZC_HAVE_SSE42_PATH 0
#endif

/* Reflected Castagnoli polynomial 0x1EDC6F41. */
#define ZC_CRC32C_POLY 0x82F63B78u

static uint32_t g_table[8][256];
static pthread_once_t g_table_once = PTHREAD_ONCE_INIT;

static void build_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ ZC_CRC32C_POLY : c >> 1;
        g_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = g_table[0][i];
        for (int t = 1; t < 8; t++) {
            c = g_table[0][c & 0xff] ^ (c >> 8);
            g_table[t][i] = c;
        }
    }
}

uint32_t zc_crc32c_portable(uint32_t crc, const void *buf, size_t len) {
    const unsigned char *p = (const unsigned char *)buf;
    uint32_t c = ~crc;
    pthread_once(&g_table_once, build_table);
    while (len >= 8) {
        /* Little-endian assembly keeps the algorithm byte-order independent. */
        uint32_t lo = zc__rd32(p) ^ c;
        uint32_t hi = zc__rd32(p + 4);
        c = g_table[7][lo & 0xff] ^ g_table[6][(lo >> 8) & 0xff] ^ g_table[5][(lo >> 16) & 0xff] ^
            g_table[4][lo >> 24] ^ g_table[3][hi & 0xff] ^ g_table[2][(hi >> 8) & 0xff] ^
            g_table[1][(hi >> 16) & 0xff] ^ g_table[0][hi >> 24];
        p += 8;
        len -= 8;
    }
    while (len--) c = g_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return ~c;
}

#if ZC_HAVE_SSE42_PATH
__attribute__((target("sse4.2"))) static uint32_t crc32c_sse42(uint32_t crc, const void *buf, size_t len) {
    const unsigned char *p = (const unsigned char *)buf;
    uint64_t c = (uint32_t)~crc;
    while (len > 0 && ((uintptr_t)p & 7u) != 0) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        len--;
    }
    while (len >= 32) {
        uint64_t a, b, d, e;
        memcpy(&a, p, 8);
        memcpy(&b, p + 8, 8);
        memcpy(&d, p + 16, 8);
        memcpy(&e, p + 24, 8);
        c = _mm_crc32_u64(c, a);
        c = _mm_crc32_u64(c, b);
        c = _mm_crc32_u64(c, d);
        c = _mm_crc32_u64(c, e);
        p += 32;
        len -= 32;
    }
    while (len >= 8) {
        uint64_t a;
        memcpy(&a, p, 8);
        c = _mm_crc32_u64(c, a);
        p += 8;
        len -= 8;
    }
    while (len--) c = _mm_crc32_u8((uint32_t)c, *p++);
    return ~(uint32_t)c;
}

static int have_sse42(void) {
    static int cached = -1; /* Benign race: every thread computes the same value. */
    int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("sse4.2") ? 1 : 0;
        __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    }
    return v;
}
#endif

uint32_t zc_crc32c(uint32_t crc, const void *buf, size_t len) {
#if ZC_HAVE_SSE42_PATH
    if (have_sse42()) return crc32c_sse42(crc, buf, len);
#endif
    return zc_crc32c_portable(crc, buf, len);
}

const char *zc_crc32c_impl(void) {
#if ZC_HAVE_SSE42_PATH
    if (have_sse42()) return "sse4.2";
#endif
    return "portable";
}

/* ---- exact combination of block CRCs (x^n mod P, as in zlib's crc32_combine) ---- */

/* Returns a*b mod P in the reflected bit order. */
static uint32_t multmodp(uint32_t a, uint32_t b) {
    uint32_t m = 1u << 31, p = 0;
    if (a == 0) return 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0) break;
        }
        m >>= 1;
        b = (b & 1) ? (b >> 1) ^ ZC_CRC32C_POLY : b >> 1;
    }
    return p;
}

/* Returns x^(8*n) mod P: the operator that appends n zero bytes. */
static uint32_t x8nmodp(uint64_t n) {
    uint32_t sq = 1u << 30; /* x^1 */
    uint32_t p = 1u << 31;  /* x^0 */
    /* Squaring three times turns x^1 into x^8, the factor for one byte. */
    for (int k = 0; k < 3; k++) sq = multmodp(sq, sq);
    while (n) {
        if (n & 1) p = multmodp(sq, p);
        sq = multmodp(sq, sq);
        n >>= 1;
    }
    return p;
}

/* Returns the CRC of A||B from crc(A), crc(B) and len(B). */
static uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
    return multmodp(x8nmodp(len_b), crc_a) ^ crc_b;
}

typedef struct crc_job {
    const unsigned char *buf;
    size_t len;
    size_t block;
    int nparts;
    uint32_t crcs[ZC__MAX_THREADS];
} crc_job;

static void crc_part(void *arg, int part) {
    crc_job *job = (crc_job *)arg;
    size_t start = (size_t)part * job->block;
    size_t n = part == job->nparts - 1 ? job->len - start : job->block;
    job->crcs[part] = zc_crc32c(0, job->buf + start, n);
}

uint32_t zc_crc32c_mt(const void *buf, size_t len, int nthreads) {
    crc_job job;
    size_t max_parts;
    uint32_t crc;
    int nparts = zc__resolve_threads(nthreads);

    max_parts = len / ZC__MIN_CHUNK;
    if ((size_t)nparts > max_parts) nparts = max_parts > 0 ? (int)max_parts : 1;
    if (nparts <= 1) return zc_crc32c(0, buf, len);

    job.buf = (const unsigned char *)buf;
    job.len = len;
    job.block = len / (size_t)nparts;
    job.nparts = nparts;
    /* A part whose thread fails to start runs on this thread, so the result is always complete. */
    (void)zc__run_parallel(nparts, crc_part, &job);

    crc = job.crcs[0];
    for (int i = 1; i < nparts; i++) {
        size_t n = i == nparts - 1 ? len - (size_t)i * job.block : job.block;
        crc = crc32c_combine(crc, job.crcs[i], n);
    }
    return crc;
}
