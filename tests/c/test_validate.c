/* test_validate.c - zc_validate against malformed arenas: every truncation, every flipped byte,
 * every header field, storages and tensors out of range, overflow, wrong checksums. */
#include <stdlib.h>

#include "zc_arena.h"
#include "zc_test.h"

#define NS 4u
#define NT 6u
#define ST(i) (128u + 16u * (i))                /* Storage entry i. */
#define TE(i) (128u + 16u * NS + 32u * (i))     /* Tensor entry i. */
#define DIMS (128u + 16u * NS + 32u * NT)       /* Dims table. */

static unsigned char *g_base;
static size_t g_size;

static void wr32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void wr64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint64_t rd64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static uint32_t rd32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* Recomputes the manifest CRC (when the header's manifest_size fits) and the header CRC. */
static void rehash(unsigned char *a, size_t size) {
    uint64_t msize = rd64(a + 56);
    if (msize <= size - 128) wr32(a + 88, zc_crc32c(0, a + 128, (size_t)msize));
    wr32(a + 96, zc_crc32c(0, a, 96));
}

static unsigned char *copy_base(void) {
    unsigned char *a = (unsigned char *)malloc(g_size);
    memcpy(a, g_base, g_size);
    return a;
}

/* Validates an exact-size copy of a (so that ASan sees any overrun). */
static int validate_exact(const unsigned char *a, size_t size, char *msg, size_t cap) {
    unsigned char *b = (unsigned char *)malloc(size ? size : 1);
    int rc;
    memcpy(b, a, size);
    rc = zc_validate(b, size, NULL, msg, cap);
    free(b);
    return rc;
}

/* Everything a validated arena reports lies inside it. */
static void check_consistent(const unsigned char *a, size_t size) {
    zc_arena_info info;
    ZT_EQ_INT(zc_validate(a, size, &info, NULL, 0), 0);
    for (uint32_t i = 0; i < info.n_storages; i++) {
        zc_storage_info s;
        ZT_EQ_INT(zc_get_storage(a, size, i, &s), 0);
        ZT_CHECK(s.offset % 64 == 0 && s.offset + s.length <= info.total_size);
    }
    for (uint32_t i = 0; i < info.n_tensors; i++) {
        zc_tensor_info t;
        ZT_EQ_INT(zc_get_tensor(a, size, i, &t), 0);
        ZT_CHECK(t.byte_offset + t.extent <= info.total_size);
        ZT_CHECK(t.ndim <= ZC_MAX_NDIM);
        for (unsigned d = 0; d < 2u * t.ndim; d++) ZT_CHECK(zc_dim(&t, d) >= 0);
    }
}

/* Applies a mutation to a copy of the base, rehashes it, and expects code and a message part. */
#define EXPECT_MUT(code, part, ...)                                              \
    do {                                                                         \
        unsigned char *m_ = copy_base();                                         \
        char msg_[512];                                                          \
        __VA_ARGS__;                                                             \
        rehash(m_, g_size);                                                      \
        ZT_EQ_INT(validate_exact(m_, g_size, msg_, sizeof msg_), code);          \
        ZT_CONTAINS(msg_, part);                                                 \
        free(m_);                                                                \
    } while (0)

static void build_base(void) {
    uint64_t sizes[NS] = {48, 4000, 7, 0};
    za_tensor t[NT];
    char msg[256];
    int rc;
    memset(t, 0, sizeof t);
    t[0] = (za_tensor){.name = "encoder.weight", .dtype = ZC_DT_FLOAT32, .ndim = 2, .flags = ZC_TFLAG_REQUIRES_GRAD,
                       .shape = {3, 4}, .stride = {4, 1}};
    t[1] = (za_tensor){.name = "encoder.weight.T", .dtype = ZC_DT_FLOAT32, .ndim = 2, .kind = ZC_KIND_OTHER,
                       .shape = {4, 3}, .stride = {1, 4}};
    t[2] = (za_tensor){.name = "decoder.weight", .storage_index = 1, .dtype = ZC_DT_FLOAT32, .ndim = 1,
                       .shape = {1000}, .stride = {1}};
    t[3] = (za_tensor){.name = "decoder.bias", .storage_index = 2, .dtype = ZC_DT_UINT8, .ndim = 1,
                       .kind = ZC_KIND_BUFFER, .flags = ZC_TFLAG_PERSISTENT, .shape = {7}, .stride = {1}};
    t[4] = (za_tensor){.name = "empty", .storage_index = 3, .dtype = ZC_DT_FLOAT16, .ndim = 2, .shape = {0, 5},
                       .stride = {5, 1}};
    t[5] = (za_tensor){.name = "scalar", .dtype = ZC_DT_INT64, .ndim = 0, .storage_offset = 5};
    g_base = za_build(sizes, NULL, NS, t, NT, &g_size, &rc, msg, sizeof msg);
    if (rc) fprintf(stderr, "build failed: %s\n", msg);
    ZT_EQ_INT(rc, 0);
}

static void test_valid(void) {
    zc_arena_info info;
    char msg[256];
    unsigned char *big;
    ZT_EQ_U64(g_size, 4096 + 4160);
    ZT_EQ_INT(zc_validate(g_base, g_size, &info, msg, sizeof msg), 0);
    ZT_EQ_STR(msg, "");
    ZT_EQ_INT(info.n_storages, NS);
    ZT_EQ_INT(info.n_tensors, NT);
    ZT_EQ_INT(info.n_dims, 16);
    ZT_EQ_U64(info.data_size, 4160);
    check_consistent(g_base, g_size);
    ZT_EQ_INT(zc_validate(g_base, g_size, NULL, NULL, 0), 0);
    ZT_EQ_INT(zc_validate(NULL, 10, NULL, msg, sizeof msg), ZC_EINVAL);
    /* A longer buffer is accepted and the rest ignored. */
    big = (unsigned char *)malloc(g_size + 1000);
    memcpy(big, g_base, g_size);
    memset(big + g_size, 0x77, 1000);
    ZT_EQ_INT(zc_validate(big, g_size + 1000, NULL, NULL, 0), 0);
    free(big);
}

static void test_truncation(void) {
    char msg[256];
    int bad = 0;
    for (size_t len = 0; len < g_size; len++) {
        int rc = validate_exact(g_base, len, msg, sizeof msg);
        if (rc != ZC_ETRUNCATED) {
            ZT_FAIL_AT("truncated to %zu: code %d (%s)", len, rc, msg);
            if (++bad > 5) break;
        }
    }
    ZT_EQ_INT(validate_exact(g_base, 100, msg, sizeof msg), ZC_ETRUNCATED);
    ZT_EQ_STR(msg, "buffer is 100 bytes, shorter than the 128-byte header");
    ZT_EQ_INT(validate_exact(g_base, g_size - 1, msg, sizeof msg), ZC_ETRUNCATED);
    ZT_EQ_STR(msg, "buffer is 8255 bytes but the arena needs 8256 (total_size)");
}

static void test_flips(void) {
    uint64_t data_offset = rd64(g_base + 64);
    unsigned char *a = copy_base();
    int accepted = 0;
    for (uint64_t i = 0; i < data_offset; i++) {
        int rc;
        a[i] ^= 0xff;
        rc = validate_exact(a, g_size, NULL, 0);
        if (rc == 0) ZT_FAIL_AT("flipping byte %llu was accepted", (unsigned long long)i);
        /* With fresh checksums, a flip either fails or leaves a self-consistent arena. */
        rehash(a, g_size);
        if (validate_exact(a, g_size, NULL, 0) == 0) {
            accepted++;
            check_consistent(a, g_size);
        }
        memcpy(a, g_base, g_size);
    }
    fprintf(stderr, "flips accepted after rehash: %d (names and data-free fields)\n", accepted);
    free(a);
}

static void test_header_fields(void) {
    static const unsigned u32_fields[] = {8, 12, 16, 20, 24, 28, 32, 36, 40, 44};
    static const unsigned u64_fields[] = {48, 56, 64, 72, 80};
    static const uint32_t v32[] = {0, 1, 2, 63, 64, 65, 127, 128, 4095, 4096, 0x7fffffffu, 0x80000000u, 0xffffffffu};
    static const uint64_t v64[] = {0, 1, 64, 128, 4096, 8192, 0x7fffffffffffffffull, 0x8000000000000000ull,
                                   UINT64_MAX - 4095, UINT64_MAX - 63, UINT64_MAX};
    unsigned char *a = copy_base();
    for (size_t f = 0; f < sizeof u32_fields / sizeof u32_fields[0]; f++)
        for (size_t v = 0; v < sizeof v32 / sizeof v32[0]; v++) {
            if (rd32(g_base + u32_fields[f]) == v32[v]) continue;
            wr32(a + u32_fields[f], v32[v]);
            rehash(a, g_size);
            if (validate_exact(a, g_size, NULL, 0) == 0)
                ZT_FAIL_AT("header field %u = 0x%x accepted", u32_fields[f], v32[v]);
            memcpy(a, g_base, g_size);
        }
    for (size_t f = 0; f < sizeof u64_fields / sizeof u64_fields[0]; f++)
        for (size_t v = 0; v < sizeof v64 / sizeof v64[0]; v++) {
            if (rd64(g_base + u64_fields[f]) == v64[v]) continue;
            wr64(a + u64_fields[f], v64[v]);
            rehash(a, g_size);
            if (validate_exact(a, g_size, NULL, 0) == 0)
                ZT_FAIL_AT("header field %u = 0x%llx accepted", u64_fields[f], (unsigned long long)v64[v]);
            memcpy(a, g_base, g_size);
        }
    free(a);

    EXPECT_MUT(ZC_EMAGIC, "header: bad magic", m_[0] = 'X');
    EXPECT_MUT(ZC_EVERSION, "header: version 2 is not supported (expected 1)", wr32(m_ + 8, 2));
    EXPECT_MUT(ZC_EHEADER, "header: flags 0x00000002 have unknown bits", wr32(m_ + 12, 2));
    EXPECT_MUT(ZC_EHEADER, "header: flags say no data checksum but data_crc is", wr32(m_ + 12, 1));
    EXPECT_MUT(ZC_EHEADER, "header: header_size is 256 (expected 128)", wr32(m_ + 16, 256));
    EXPECT_MUT(ZC_EHEADER, "header: storage_align is 32 (expected 64)", wr32(m_ + 20, 32));
    EXPECT_MUT(ZC_EHEADER, "header: data_align is 8192 (expected 4096)", wr32(m_ + 24, 8192));
    EXPECT_MUT(ZC_EHEADER, "header: reserved bytes [44, 48) are not zero", m_[45] = 1);
    EXPECT_MUT(ZC_EHEADER, "header: reserved byte 127 is not zero", m_[127] = 1);
    EXPECT_MUT(ZC_EHEADER, "header: manifest_offset is 256 (expected 128)", wr64(m_ + 48, 256));
    EXPECT_MUT(ZC_EHEADER, "header: manifest_size 8 does not match the table sizes", wr64(m_ + 56, 8));
    EXPECT_MUT(ZC_EHEADER, "manifest_size", wr32(m_ + 28, NS + 1));
    EXPECT_MUT(ZC_EHEADER, "manifest_size", wr32(m_ + 32, 0));
    EXPECT_MUT(ZC_EHEADER, "manifest_size", wr32(m_ + 36, 0xffffffffu));
    EXPECT_MUT(ZC_EHEADER, "manifest_size", wr32(m_ + 40, 1));
    EXPECT_MUT(ZC_EHEADER, "header: data_offset 8192 is not where the layout puts it (expected 4096)",
               wr64(m_ + 64, 8192));
    EXPECT_MUT(ZC_EHEADER, "header: data_size 4161 is not a multiple of 64", wr64(m_ + 72, 4161));
    EXPECT_MUT(ZC_EHEADER, "header: total_size 8257 is not data_offset + data_size", wr64(m_ + 80, 8257));
    EXPECT_MUT(ZC_EHEADER, "total_size", wr64(m_ + 72, UINT64_MAX - 63));
    EXPECT_MUT(ZC_ETRUNCATED, "but the arena needs 8320 (total_size)", wr64(m_ + 72, 4224); wr64(m_ + 80, 8320));
}

static void test_checksums(void) {
    unsigned char *a = copy_base();
    char msg[512];
    wr32(a + 96, rd32(a + 96) + 1);
    ZT_EQ_INT(validate_exact(a, g_size, msg, sizeof msg), ZC_ECHECKSUM);
    ZT_CONTAINS(msg, "header: header_crc 0x");
    memcpy(a, g_base, g_size);
    wr32(a + 88, rd32(a + 88) ^ 0x10);
    wr32(a + 96, zc_crc32c(0, a, 96));
    ZT_EQ_INT(validate_exact(a, g_size, msg, sizeof msg), ZC_ECHECKSUM);
    ZT_CONTAINS(msg, "manifest: manifest_crc 0x");
    memcpy(a, g_base, g_size);
    a[TE(2) + 16] ^= 1; /* Manifest change without a new manifest CRC. */
    ZT_EQ_INT(validate_exact(a, g_size, msg, sizeof msg), ZC_ECHECKSUM);
    memcpy(a, g_base, g_size);
    a[4096 + 100] ^= 1; /* Data change: validate does not read data, verify_data does. */
    ZT_EQ_INT(validate_exact(a, g_size, msg, sizeof msg), 0);
    ZT_EQ_INT(zc_verify_data(a, g_size, 2), ZC_ECHECKSUM);
    ZT_EQ_INT(zc_verify_data(a, 50, 2), ZC_ETRUNCATED);
    free(a);
}

static void test_storages(void) {
    EXPECT_MUT(ZC_EMANIFEST, "manifest: padding byte at offset 4000 is not zero", m_[4000] = 1);
    EXPECT_MUT(ZC_ESTORAGE, "storage 1: offset 32 is not where the layout puts it (expected 64)",
               wr64(m_ + ST(1), 32));                                  /* Overlap. */
    EXPECT_MUT(ZC_ESTORAGE, "storage 1: offset 128 is not where the layout puts it (expected 64)",
               wr64(m_ + ST(1), 128));                                 /* Hole. */
    EXPECT_MUT(ZC_ESTORAGE, "storage 1: offset 65 is not", wr64(m_ + ST(1), 65)); /* Misaligned. */
    EXPECT_MUT(ZC_ESTORAGE, "storage 0: offset 64 is not where the layout puts it (expected 0)",
               wr64(m_ + ST(0), 64));
    EXPECT_MUT(ZC_ESTORAGE, "storage 2: offset 4096 + length 100 exceeds", wr64(m_ + ST(2), 4096);
               wr64(m_ + ST(2) + 8, 100));
    EXPECT_MUT(ZC_ESTORAGE, "storage 2: offset 4096 is not where the layout puts it (expected 4160)",
               wr64(m_ + ST(1) + 8, 4033));
    EXPECT_MUT(ZC_ESTORAGE, "storage 3: offset 4160 + length 1 exceeds data_size 4160", wr64(m_ + ST(3) + 8, 1));
    EXPECT_MUT(ZC_ESTORAGE, "storage 1: offset 64 + length 18446744073709551615 exceeds",
               wr64(m_ + ST(1) + 8, UINT64_MAX));
    /* A storage shrunk so that data_size no longer matches. */
    EXPECT_MUT(ZC_ESTORAGE, "storage 3: offset 4160 is not where the layout puts it (expected 4096)",
               wr64(m_ + ST(2) + 8, 0));
}

static void test_data_size_mismatch(void) {
    /* data_size and total_size grown consistently, with a buffer that holds them. */
    unsigned char *a = (unsigned char *)calloc(1, g_size + 64);
    char msg[512];
    memcpy(a, g_base, g_size);
    wr64(a + 72, 4224);
    wr64(a + 80, 8320);
    rehash(a, g_size + 64);
    ZT_EQ_INT(validate_exact(a, g_size + 64, msg, sizeof msg), ZC_EHEADER);
    ZT_EQ_STR(msg, "header: data_size 4224 is not the end of the last storage rounded up to 64 (4160)");
    free(a);
}

static void test_tensors(void) {
    uint32_t d2 = rd32(g_base + TE(2) + 24); /* dims_index of decoder.weight */
    uint32_t d0 = rd32(g_base + TE(0) + 24);
    EXPECT_MUT(ZC_ETENSOR, "tensor 2 ('decoder.weight'): extent 4004 bytes exceeds storage 1 length 4000",
               wr64(m_ + DIMS + 8u * d2, 1001));
    EXPECT_MUT(ZC_ETENSOR, "tensor 2 ('decoder.weight'): extent 4004 bytes exceeds storage 1 length 4000",
               wr64(m_ + TE(2) + 16, 1));
    EXPECT_MUT(ZC_EOVERFLOW, "tensor 2 ('decoder.weight'): extent overflows 64 bits",
               wr64(m_ + DIMS + 8u * d2, 1ull << 62); wr64(m_ + DIMS + 8u * (d2 + 1), 4));
    EXPECT_MUT(ZC_EOVERFLOW, "extent overflows 64 bits", wr64(m_ + DIMS + 8u * d0, (1ull << 62) + 1);
               wr64(m_ + DIMS + 8u * (d0 + 2), 2));
    EXPECT_MUT(ZC_EOVERFLOW, "storage_offset 4611686018427387904 overflows", wr64(m_ + TE(2) + 16, 1ull << 62));
    EXPECT_MUT(ZC_EOVERFLOW, "extent overflows", wr64(m_ + TE(2) + 16, (UINT64_MAX / 4) - 500));
    EXPECT_MUT(ZC_ETENSOR, "tensor 2 ('decoder.weight'): size[0] is negative (-1)",
               wr64(m_ + DIMS + 8u * d2, UINT64_MAX));
    EXPECT_MUT(ZC_ETENSOR, "tensor 0 ('encoder.weight'): stride[1] is negative (-9223372036854775808)",
               wr64(m_ + DIMS + 8u * (d0 + 3), 1ull << 63));
    EXPECT_MUT(ZC_ETENSOR, "tensor 1 ('encoder.weight.T'): storage_index 4 is out of range (4 storages)",
               wr32(m_ + TE(1) + 8, 4));
    EXPECT_MUT(ZC_ETENSOR, "storage_index 4294967295 is out of range", wr32(m_ + TE(1) + 8, 0xffffffffu));
    EXPECT_MUT(ZC_ETENSOR, "tensor 3 ('decoder.bias'): dtype code 0 is unknown", m_[TE(3) + 12] = 0);
    EXPECT_MUT(ZC_ETENSOR, "dtype code 23 is unknown", m_[TE(3) + 12] = 23);
    EXPECT_MUT(ZC_ETENSOR, "dtype code 255 is unknown", m_[TE(3) + 12] = 255);
    EXPECT_MUT(ZC_ETENSOR, "tensor 3 ('decoder.bias'): extent 28 bytes exceeds storage 2 length 7",
               m_[TE(3) + 12] = ZC_DT_FLOAT32);
    EXPECT_MUT(ZC_ETOOBIG, "tensor 3 ('decoder.bias'): ndim 33 exceeds the limit of 32", m_[TE(3) + 13] = 33);
    EXPECT_MUT(ZC_ETOOBIG, "ndim 255 exceeds the limit of 32", m_[TE(5) + 13] = 255);
    EXPECT_MUT(ZC_EMANIFEST, "tensor 4 ('empty'): dims_index", m_[TE(3) + 13] = 2);
    EXPECT_MUT(ZC_EMANIFEST, "tensor 5 ('scalar'): dims [16, 18) extend past the dims table (16 values)",
               m_[TE(5) + 13] = 1);
    EXPECT_MUT(ZC_ETENSOR, "tensor 3 ('decoder.bias'): kind 3 is not 0, 1 or 2", m_[TE(3) + 14] = 3);
    EXPECT_MUT(ZC_ETENSOR, "tensor 3 ('decoder.bias'): flags 0x80 has unknown bits", m_[TE(3) + 15] = 0x80);
    EXPECT_MUT(ZC_EMANIFEST, "tensor 3 ('decoder.bias'): reserved bytes [28, 32) are not zero", m_[TE(3) + 30] = 1);
    EXPECT_MUT(ZC_EMANIFEST, "tensor 2 ('decoder.weight'): dims_index 5 is not where the previous dims end (8)",
               wr32(m_ + TE(2) + 24, 5));
    EXPECT_MUT(ZC_EMANIFEST, "tensor 1: name_offset 0 is not where the previous names end (14)",
               wr32(m_ + TE(1), 0));
    EXPECT_MUT(ZC_ETOOBIG, "tensor 1: name_len 4097 exceeds the limit of 4096", wr32(m_ + TE(1) + 4, 4097));
    EXPECT_MUT(ZC_ETOOBIG, "name_len 4294967295 exceeds", wr32(m_ + TE(1) + 4, 0xffffffffu));
    EXPECT_MUT(ZC_EMANIFEST, "tensor 5: name (offset 61, length 7) extends past the string table (67 bytes)",
               wr32(m_ + TE(5) + 4, 7));
    EXPECT_MUT(ZC_EMANIFEST, "manifest: the names use 66 bytes but strings_size is 67", wr32(m_ + TE(5) + 4, 5));
    /* An empty tensor may not point past its storage either. */
    EXPECT_MUT(ZC_ETENSOR, "tensor 4 ('empty'): storage_offset 1 (byte 2) lies past storage 3 length 0",
               wr64(m_ + TE(4) + 16, 1));
    /* Hostile name bytes are quoted, not printed raw. */
    EXPECT_MUT(ZC_ETENSOR, "tensor 3 ('de??der.bias')", m_[TE(3) + 12] = 0;
               m_[DIMS + 8u * 16 + 14 + 16 + 14 + 2] = '\n'; m_[DIMS + 8u * 16 + 14 + 16 + 14 + 3] = '\'');
}

static void test_empty_arena(void) {
    size_t size = 0;
    int rc;
    unsigned char *a = za_build(NULL, NULL, 0, NULL, 0, &size, &rc, NULL, 0);
    zc_arena_info info;
    ZT_EQ_INT(rc, 0);
    ZT_EQ_U64(size, 4096);
    ZT_EQ_INT(zc_validate(a, size, &info, NULL, 0), 0);
    ZT_EQ_U64(info.data_size, 0);
    ZT_EQ_INT(zc_verify_data(a, size, 0), 0);
    ZT_EQ_HEX(info.data_crc, 0);
    free(a);
}

int main(void) {
    build_base();
    if (!g_base) return zt_report();
    test_valid();
    test_truncation();
    test_flips();
    test_header_fields();
    test_checksums();
    test_storages();
    test_data_size_mismatch();
    test_tensors();
    test_empty_arena();
    free(g_base);
    return zt_report();
}
