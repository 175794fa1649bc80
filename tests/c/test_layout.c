/* test_layout.c - planning, writing the manifest, padding, finalizing; dtype table. */
#include <stdlib.h>

#include "zc_arena.h"
#include "zc_test.h"

static za_tensor vec(const char *name, uint32_t storage, uint8_t dtype, int64_t n, uint64_t offset) {
    za_tensor t;
    memset(&t, 0, sizeof t);
    t.name = name;
    t.storage_index = storage;
    t.dtype = dtype;
    t.ndim = 1;
    t.storage_offset = offset;
    t.shape[0] = n;
    t.stride[0] = 1;
    return t;
}

/* Plans one tensor over storages of the given sizes; returns the code and fills msg. */
static int plan_one(const za_tensor *t, const uint64_t *sizes, uint32_t ns, char *msg, size_t cap) {
    zc_tensor_desc d;
    uint64_t offsets[8];
    zc_plan_t plan;
    za_descs(t, 1, &d);
    return zc_plan(sizes, ns, &d, 1, offsets, &plan, msg, cap);
}

static void test_dtypes(void) {
    static const struct {
        unsigned code;
        const char *name;
        size_t size;
    } table[] = {{1, "bool", 1},          {2, "uint8", 1},           {3, "int8", 1},
                 {4, "int16", 2},         {5, "int32", 4},           {6, "int64", 8},
                 {7, "float16", 2},       {8, "bfloat16", 2},        {9, "float32", 4},
                 {10, "float64", 8},      {11, "complex32", 4},      {12, "complex64", 8},
                 {13, "complex128", 16},  {14, "uint16", 2},         {15, "uint32", 4},
                 {16, "uint64", 8},       {17, "float8_e4m3fn", 1},  {18, "float8_e5m2", 1},
                 {19, "float8_e4m3fnuz", 1}, {20, "float8_e5m2fnuz", 1}, {21, "float8_e8m0fnu", 1},
                 {22, "float4_e2m1fn_x2", 1}};
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        ZT_EQ_STR(zc_dtype_name(table[i].code), table[i].name);
        ZT_EQ_U64(zc_dtype_size(table[i].code), table[i].size);
    }
    ZT_CHECK(zc_dtype_name(0) == NULL && zc_dtype_size(0) == 0);
    ZT_CHECK(zc_dtype_name(23) == NULL && zc_dtype_size(23) == 0);
    ZT_CHECK(zc_dtype_name(255) == NULL && zc_dtype_size(1000) == 0);
}

static void test_plan_layout(void) {
    uint64_t sizes[5] = {1, 64, 65, 0, 3}, offsets[5];
    zc_plan_t plan;
    char msg[256];
    ZT_EQ_INT(zc_plan(sizes, 5, NULL, 0, offsets, &plan, msg, sizeof msg), 0);
    ZT_EQ_U64(offsets[0], 0);
    ZT_EQ_U64(offsets[1], 64);
    ZT_EQ_U64(offsets[2], 128);
    ZT_EQ_U64(offsets[3], 256);
    ZT_EQ_U64(offsets[4], 256);
    ZT_EQ_U64(plan.data_size, 320);
    ZT_EQ_U64(plan.manifest_offset, 128);
    ZT_EQ_U64(plan.manifest_size, 80);
    ZT_EQ_U64(plan.data_offset, 4096);
    ZT_EQ_U64(plan.total_size, 4096 + 320);

    /* An empty arena is a header and a page of padding. */
    ZT_EQ_INT(zc_plan(NULL, 0, NULL, 0, NULL, &plan, msg, sizeof msg), 0);
    ZT_EQ_U64(plan.manifest_size, 0);
    ZT_EQ_U64(plan.data_offset, 4096);
    ZT_EQ_U64(plan.total_size, 4096);

    /* A manifest larger than a page pushes the data region to the next page. */
    {
        static uint64_t many[300];
        static uint64_t offs[300];
        for (int i = 0; i < 300; i++) many[i] = 1;
        ZT_EQ_INT(zc_plan(many, 300, NULL, 0, offs, &plan, NULL, 0), 0);
        ZT_EQ_U64(plan.manifest_size, 4800);
        ZT_EQ_U64(plan.data_offset, 8192);
        ZT_EQ_U64(offs[299], 299 * 64);
        ZT_EQ_U64(plan.data_size, 300 * 64);
    }

    /* Storage sizes that overflow the data region. */
    sizes[0] = UINT64_MAX - 10;
    ZT_EQ_INT(zc_plan(sizes, 2, NULL, 0, offsets, &plan, msg, sizeof msg), ZC_EOVERFLOW);
    ZT_CONTAINS(msg, "storage 0");
    ZT_EQ_INT(zc_plan(sizes, 1, NULL, 0, NULL, &plan, msg, sizeof msg), ZC_EINVAL);
    ZT_EQ_INT(zc_plan(sizes, 1, NULL, 0, offsets, NULL, msg, sizeof msg), ZC_EINVAL);
    ZT_EQ_INT(zc_plan(sizes, 0, NULL, 1, offsets, &plan, msg, sizeof msg), ZC_EINVAL);
}

static void test_plan_errors(void) {
    uint64_t sizes[2] = {12, 4096};
    char msg[512];
    za_tensor t;

    t = vec("ok", 0, ZC_DT_FLOAT32, 3, 0);
    ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), 0);

    t = vec("decoder.weight", 1, ZC_DT_FLOAT32, 1040, 0);
    ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), ZC_ETENSOR);
    ZT_EQ_STR(msg, "tensor 0 ('decoder.weight'): extent 4160 bytes exceeds storage 1 length 4096");

    t = vec("w", 0, ZC_DT_FLOAT32, 3, 1);
    ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), ZC_ETENSOR);
    ZT_EQ_STR(msg, "tensor 0 ('w'): extent 16 bytes exceeds storage 0 length 12");

    t = vec("w", 2, ZC_DT_FLOAT32, 1, 0);
    ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), ZC_ETENSOR);
    ZT_EQ_STR(msg, "tensor 0 ('w'): storage_index 2 is out of range (2 storages)");

    t = vec("w", 0, 0, 1, 0);
    ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), ZC_ETENSOR);
    ZT_CONTAINS(msg, "dtype code 0 is unknown");
    t = vec("w", 0, 23, 1, 0);
    ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), ZC_ETENSOR);

    t = vec("w", 0, ZC_DT_UINT8, 1, 0);
    t.ndim = 33;
    ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), ZC_ETOOBIG);
    ZT_CONTAINS(msg, "ndim 33 exceeds the limit of 32");

    t = vec("w", 0, ZC_DT_UINT8, 1, 0);
    t.kind = 3;
    ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), ZC_ETENSOR);
    ZT_CONTAINS(msg, "kind 3");
    t.kind = 0;
    t.flags = 4;
    ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), ZC_ETENSOR);
    ZT_CONTAINS(msg, "flags 0x04");

    t = vec("neg", 0, ZC_DT_UINT8, -1, 0);
    ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), ZC_ETENSOR);
    ZT_EQ_STR(msg, "tensor 0 ('neg'): size[0] is negative (-1)");
    t = vec("neg", 0, ZC_DT_UINT8, 2, 0);
    t.stride[0] = -1;
    ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), ZC_ETENSOR);
    ZT_CONTAINS(msg, "stride[0] is negative");

    /* shape * stride overflows. */
    t = vec("big", 1, ZC_DT_UINT8, INT64_MAX, 0);
    t.ndim = 2;
    t.shape[1] = INT64_MAX;
    t.stride[0] = INT64_MAX;
    t.stride[1] = INT64_MAX;
    ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), ZC_EOVERFLOW);
    ZT_CONTAINS(msg, "overflows");
    t = vec("big", 1, ZC_DT_FLOAT64, 1, UINT64_MAX / 4);
    ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), ZC_EOVERFLOW);

    /* Empty tensors hold no bytes but stay inside their storage. */
    t = vec("empty", 0, ZC_DT_FLOAT32, 0, 3);
    ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), 0);
    t = vec("empty", 0, ZC_DT_FLOAT32, 0, 4);
    ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), ZC_ETENSOR);
    ZT_CONTAINS(msg, "lies past storage 0");
    t = vec("zero-stride", 0, ZC_DT_FLOAT32, 1000000, 0);
    t.stride[0] = 0;
    ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), 0);

    /* Names: the limit, and quoting of hostile bytes in messages. */
    {
        char *longname = (char *)malloc(ZC_MAX_NAME + 2);
        memset(longname, 'n', ZC_MAX_NAME + 1);
        longname[ZC_MAX_NAME + 1] = '\0';
        t = vec(longname, 0, ZC_DT_UINT8, 1, 0);
        ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), ZC_ETOOBIG);
        ZT_CONTAINS(msg, "name_len 4097 exceeds the limit of 4096");
        ZT_CONTAINS(msg, "nnn...'");
        longname[ZC_MAX_NAME] = '\0';
        ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), 0);
        free(longname);
    }
    t = vec("a'b\nc", 0, ZC_DT_UINT8, 13, 0);
    ZT_EQ_INT(plan_one(&t, sizes, 2, msg, sizeof msg), ZC_ETENSOR);
    ZT_CONTAINS(msg, "('a?b?c')");

    /* A tiny message buffer is truncated, never overrun. */
    t = vec("decoder.weight", 1, ZC_DT_FLOAT32, 1040, 0);
    ZT_EQ_INT(plan_one(&t, sizes, 2, msg, 8), ZC_ETENSOR);
    ZT_EQ_STR(msg, "tensor ");
    ZT_EQ_INT(plan_one(&t, sizes, 2, NULL, 0), ZC_ETENSOR);
}

static void test_write_manifest(void) {
    za_tensor ts[3];
    zc_tensor_desc d[3];
    uint64_t sizes[3] = {10, 100, 1}, offsets[3];
    zc_plan_t plan, bad;
    unsigned char *a;
    zc_arena_info info;
    char msg[256];

    ts[0] = vec("x", 0, ZC_DT_UINT8, 10, 0);
    ts[1] = vec("y", 1, ZC_DT_INT16, 50, 0);
    ts[2] = vec("z", 2, ZC_DT_BOOL, 1, 0);
    za_descs(ts, 3, d);
    ZT_EQ_INT(zc_plan(sizes, 3, d, 3, offsets, &plan, msg, sizeof msg), 0);
    ZT_EQ_U64(plan.n_dims, 6);
    ZT_EQ_U64(plan.strings_size, 3);
    ZT_EQ_U64(offsets[1], 64);
    ZT_EQ_U64(offsets[2], 192);
    ZT_EQ_U64(plan.data_size, 256);

    a = (unsigned char *)malloc((size_t)plan.total_size);
    memset(a, 0xA5, (size_t)plan.total_size);
    ZT_EQ_INT(zc_write_manifest(a, (size_t)plan.total_size - 1, &plan, sizes, offsets, d), ZC_EINVAL);
    ZT_EQ_INT(zc_write_manifest(NULL, (size_t)plan.total_size, &plan, sizes, offsets, d), ZC_EINVAL);
    bad = plan;
    bad.n_dims = 4;
    ZT_EQ_INT(zc_write_manifest(a, (size_t)plan.total_size, &bad, sizes, offsets, d), ZC_EINVAL);
    bad = plan;
    bad.data_offset = 8192;
    ZT_EQ_INT(zc_write_manifest(a, (size_t)plan.total_size, &bad, sizes, offsets, d), ZC_EINVAL);
    ZT_EQ_INT(zc_write_manifest(a, (size_t)plan.total_size, &plan, sizes, offsets, d), 0);

    /* Padding is zeroed, storage bytes are untouched. */
    for (uint64_t p = 128 + plan.manifest_size; p < plan.data_offset; p++) ZT_EQ_INT(a[p], 0);
    for (uint64_t p = 0; p < 10; p++) ZT_EQ_INT(a[4096 + p], 0xA5);
    for (uint64_t p = 10; p < 64; p++) ZT_EQ_INT(a[4096 + p], 0);
    for (uint64_t p = 164; p < 192; p++) ZT_EQ_INT(a[4096 + p], 0);
    ZT_EQ_INT(a[4096 + 192], 0xA5);
    for (uint64_t p = 193; p < 256; p++) ZT_EQ_INT(a[4096 + p], 0);
    /* CRCs are not yet written, so the arena does not validate. */
    ZT_EQ_INT(zc_validate(a, (size_t)plan.total_size, NULL, msg, sizeof msg), ZC_ECHECKSUM);
    ZT_EQ_INT(zc_finalize(a, (size_t)plan.total_size, 0), 0);
    ZT_EQ_INT(zc_validate(a, (size_t)plan.total_size, &info, msg, sizeof msg), 0);
    ZT_EQ_U64(info.total_size, plan.total_size);
    ZT_EQ_HEX(info.data_crc, zc_crc32c(0, a + 4096, 256));
    ZT_EQ_HEX(info.manifest_crc, zc_crc32c(0, a + 128, (size_t)plan.manifest_size));
    ZT_EQ_HEX(info.header_crc, zc_crc32c(0, a, 96));
    ZT_EQ_INT(zc_verify_data(a, (size_t)plan.total_size, 0), 0);
    a[4096 + 5] ^= 1;
    ZT_EQ_INT(zc_verify_data(a, (size_t)plan.total_size, 0), ZC_ECHECKSUM);
    ZT_EQ_INT(zc_validate(a, (size_t)plan.total_size, NULL, NULL, 0), 0); /* Data is not read. */
    /* finalize reports a broken header instead of checksumming it. */
    ZT_EQ_INT(zc_finalize(a, 100, 0), ZC_ETRUNCATED);
    ZT_EQ_INT(zc_finalize(a, (size_t)plan.total_size - 1, 0), ZC_ETRUNCATED);
    ZT_EQ_INT(zc_finalize(NULL, 0, 0), ZC_EINVAL);
    free(a);
}

/* zc_write_header: the first data_offset bytes, final, with NO_DATA_CRC; the same bytes as
 * zc_write_manifest + zc_finalize except flags, data_crc and header_crc. */
static void test_write_header(void) {
    za_tensor ts[2];
    zc_tensor_desc d[2];
    uint64_t sizes[2] = {100, 3}, offsets[2];
    zc_plan_t plan;
    unsigned char *a, *b;
    zc_arena_info info;
    char msg[256];

    ts[0] = vec("w", 0, ZC_DT_FLOAT32, 25, 0);
    ts[1] = vec("b", 1, ZC_DT_UINT8, 3, 0);
    za_descs(ts, 2, d);
    ZT_EQ_INT(zc_plan(sizes, 2, d, 2, offsets, &plan, msg, sizeof msg), 0);
    a = (unsigned char *)calloc(1, (size_t)plan.total_size);
    b = (unsigned char *)calloc(1, (size_t)plan.total_size);
    for (unsigned i = 0; i < 100; i++) a[plan.data_offset + i] = b[plan.data_offset + i] = (unsigned char)i;
    ZT_EQ_INT(zc_write_header(a, (size_t)plan.data_offset - 1, &plan, sizes, offsets, d), ZC_EINVAL);
    ZT_EQ_INT(zc_write_header(NULL, (size_t)plan.data_offset, &plan, sizes, offsets, d), ZC_EINVAL);
    /* Only data_offset bytes are needed, and nothing past them is written. */
    a[plan.data_offset + 100] = 0xEE;
    ZT_EQ_INT(zc_write_header(a, (size_t)plan.data_offset, &plan, sizes, offsets, d), 0);
    ZT_EQ_INT(a[plan.data_offset + 100], 0xEE);
    a[plan.data_offset + 100] = 0;
    ZT_EQ_INT(zc_validate(a, (size_t)plan.total_size, &info, msg, sizeof msg), 0);
    ZT_EQ_HEX(info.flags, ZC_FLAG_NO_DATA_CRC);
    ZT_EQ_HEX(info.data_crc, 0);
    ZT_EQ_INT(zc_verify_data(a, (size_t)plan.total_size, 0), ZC_ENODATACRC);
    ZT_EQ_INT(zc_write_manifest(b, (size_t)plan.total_size, &plan, sizes, offsets, d), 0);
    ZT_EQ_INT(zc_finalize(b, (size_t)plan.total_size, 0), 0);
    ZT_EQ_INT(memcmp(a, b, 12), 0);
    ZT_EQ_INT(memcmp(a + 16, b + 16, 92 - 16), 0);
    ZT_EQ_INT(memcmp(a + 100, b + 100, (size_t)(plan.total_size - 100)), 0);
    /* finalize computes the checksum and clears the flag. */
    ZT_EQ_INT(zc_finalize(a, (size_t)plan.total_size, 0), 0);
    ZT_EQ_INT(memcmp(a, b, (size_t)plan.total_size), 0);
    ZT_EQ_INT(zc_verify_data(a, (size_t)plan.total_size, 0), 0);
    free(a);
    free(b);
}

int main(void) {
    test_dtypes();
    test_plan_layout();
    test_plan_errors();
    test_write_manifest();
    test_write_header();
    return zt_report();
}
