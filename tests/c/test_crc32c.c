/* test_crc32c.c - CRC32C against published vectors; hardware, portable and threaded agree. */
#include <stdlib.h>

#include "zc_test.h"
#include "zerocopy/zc.h"

typedef uint32_t (*crc_fn)(uint32_t, const void *, size_t);

static void check_vectors(const char *which, crc_fn fn) {
    unsigned char zeros[32], ones[32], asc[32], desc[32];
    fprintf(stderr, "vectors: %s\n", which);
    memset(zeros, 0, sizeof zeros);
    memset(ones, 0xff, sizeof ones);
    for (int i = 0; i < 32; i++) {
        asc[i] = (unsigned char)i;
        desc[i] = (unsigned char)(31 - i);
    }
    ZT_EQ_HEX(fn(0, "123456789", 9), 0xE3069283u);
    ZT_EQ_HEX(fn(0, zeros, 32), 0x8A9136AAu);
    ZT_EQ_HEX(fn(0, ones, 32), 0x62A8AB43u);
    ZT_EQ_HEX(fn(0, asc, 32), 0x46DD794Eu);
    ZT_EQ_HEX(fn(0, desc, 32), 0x113FDB5Cu);
    ZT_EQ_HEX(fn(0, "", 0), 0u);
    ZT_EQ_HEX(fn(0x12345678u, "", 0), 0x12345678u);
    /* Extending in pieces equals one pass. */
    ZT_EQ_HEX(fn(fn(0, "1234", 4), "56789", 5), 0xE3069283u);
}

static uint32_t mt1(uint32_t crc, const void *buf, size_t len) {
    return crc == 0 ? zc_crc32c_mt(buf, len, 3) : zc_crc32c(crc, buf, len);
}

int main(void) {
    static const size_t sizes[] = {0, 1, 2, 3, 7, 8, 9, 15, 31, 33, 63, 64, 65, 4095, 4097,
                                   (1u << 20) - 1, (1u << 20) + 1, (3u << 20) + 7, (5u << 20) + 13};
    size_t max = (5u << 20) + 64;
    unsigned char *buf = (unsigned char *)malloc(max);
    uint64_t s = 0x9E3779B97F4A7C15ull;

    ZT_CHECK(buf != NULL);
    check_vectors("zc_crc32c", zc_crc32c);
    check_vectors("zc_crc32c_portable", zc_crc32c_portable);
    check_vectors("zc_crc32c_mt", mt1);
    ZT_CHECK(strcmp(zc_crc32c_impl(), "sse4.2") == 0 || strcmp(zc_crc32c_impl(), "portable") == 0);
    fprintf(stderr, "implementation: %s\n", zc_crc32c_impl());

    for (size_t i = 0; i < max; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        buf[i] = (unsigned char)s;
    }
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        size_t n = sizes[k];
        for (size_t shift = 0; shift < 3; shift++) { /* Unaligned starts. */
            const unsigned char *p = buf + shift;
            uint32_t ref = zc_crc32c_portable(0, p, n);
            ZT_EQ_HEX(zc_crc32c(0, p, n), ref);
            if (n > 4096 || shift == 0) {
                static const int threads[] = {0, 1, 2, 3, 7, 16, 64};
                for (size_t t = 0; t < sizeof threads / sizeof threads[0]; t++)
                    ZT_EQ_HEX(zc_crc32c_mt(p, n, threads[t]), ref);
            }
            if (n >= 2) ZT_EQ_HEX(zc_crc32c(zc_crc32c(0, p, n / 3), p + n / 3, n - n / 3), ref);
        }
    }
    free(buf);
    return zt_report();
}
