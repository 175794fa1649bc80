/* test_golden.c - builds the arena of docs/format.md "Golden bytes" and compares every byte
 * with tests/data/golden_small.arena; reads it back field by field. */
#include <stdlib.h>

#include "zc_arena.h"
#include "zc_test.h"

static unsigned char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    unsigned char *buf = NULL;
    long n;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0) {
        buf = (unsigned char *)malloc((size_t)n + 1);
        if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
            free(buf);
            buf = NULL;
        }
        *size = (size_t)n;
    }
    fclose(f);
    return buf;
}

int main(int argc, char **argv) {
    static const unsigned char s0[12] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    static const unsigned char s1[3] = {0xff, 0xfe, 0xfd};
    const unsigned char *data[2] = {s0, s1};
    uint64_t sizes[2] = {12, 3};
    za_tensor t[3];
    unsigned char *built, *golden;
    size_t built_size = 0, golden_size = 0;
    zc_arena_info info;
    zc_storage_info si;
    zc_tensor_info ti;
    char msg[256];
    int rc;

    if (argc < 2) {
        fprintf(stderr, "usage: test_golden tests/data/golden_small.arena\n");
        return 2;
    }
    memset(t, 0, sizeof t);
    t[0].name = "a";
    t[0].dtype = ZC_DT_FLOAT32;
    t[0].ndim = 1;
    t[0].shape[0] = 3;
    t[0].stride[0] = 1;
    t[0].kind = ZC_KIND_PARAMETER;
    t[0].flags = ZC_TFLAG_REQUIRES_GRAD;
    t[1].name = "b";
    t[1].dtype = ZC_DT_INT32;
    t[1].ndim = 1;
    t[1].shape[0] = 2;
    t[1].stride[0] = 1;
    t[1].storage_offset = 1;
    t[1].kind = ZC_KIND_BUFFER;
    t[1].flags = ZC_TFLAG_PERSISTENT;
    t[2].name = "c";
    t[2].storage_index = 1;
    t[2].dtype = ZC_DT_UINT8;
    t[2].ndim = 1;
    t[2].shape[0] = 3;
    t[2].stride[0] = 1;
    t[2].kind = ZC_KIND_OTHER;

    built = za_build(sizes, data, 2, t, 3, &built_size, &rc, msg, sizeof msg);
    ZT_EQ_INT(rc, 0);
    golden = read_file(argv[1], &golden_size);
    ZT_CHECK(golden != NULL);
    if (!built || !golden) return zt_report();
    ZT_EQ_U64(built_size, 4224);
    ZT_EQ_U64(golden_size, built_size);
    for (size_t i = 0; i < built_size && i < golden_size; i++) {
        if (built[i] != golden[i]) {
            ZT_FAIL_AT("byte %zu differs: built 0x%02x, golden 0x%02x", i, built[i], golden[i]);
            break;
        }
    }

    ZT_EQ_INT(zc_validate(golden, golden_size, &info, msg, sizeof msg), 0);
    ZT_EQ_INT(info.version, 1);
    ZT_EQ_INT(info.flags, 0);
    ZT_EQ_U64(info.manifest_offset, 128);
    ZT_EQ_U64(info.manifest_size, 2 * 16 + 3 * 32 + 6 * 8 + 3);
    ZT_EQ_U64(info.data_offset, 4096);
    ZT_EQ_U64(info.data_size, 128);
    ZT_EQ_U64(info.total_size, 4224);
    ZT_EQ_INT(info.n_storages, 2);
    ZT_EQ_INT(info.n_tensors, 3);
    ZT_EQ_INT(info.n_dims, 6);
    ZT_EQ_INT(info.strings_size, 3);
    ZT_EQ_HEX(info.data_crc, zc_crc32c(0, golden + 4096, 128));
    ZT_EQ_INT(zc_verify_data(golden, golden_size, 1), 0);

    ZT_EQ_INT(zc_get_storage(golden, golden_size, 0, &si), 0);
    ZT_EQ_U64(si.offset, 4096);
    ZT_EQ_U64(si.length, 12);
    ZT_EQ_INT(zc_get_storage(golden, golden_size, 1, &si), 0);
    ZT_EQ_U64(si.offset, 4160);
    ZT_EQ_U64(si.length, 3);
    ZT_EQ_INT(zc_get_storage(golden, golden_size, 2, &si), ZC_EINVAL);

    ZT_EQ_INT(zc_get_tensor(golden, golden_size, 1, &ti), 0);
    ZT_CHECK(ti.name_len == 1 && ti.name[0] == 'b');
    ZT_EQ_INT(ti.storage_index, 0);
    ZT_EQ_INT(ti.dtype, ZC_DT_INT32);
    ZT_EQ_INT(ti.ndim, 1);
    ZT_EQ_INT(ti.kind, ZC_KIND_BUFFER);
    ZT_EQ_INT(ti.flags, ZC_TFLAG_PERSISTENT);
    ZT_EQ_U64(ti.storage_offset, 1);
    ZT_EQ_U64(ti.byte_offset, 4100);
    ZT_EQ_U64(ti.extent, 8);
    ZT_EQ_INT(zc_dim(&ti, 0), 2);
    ZT_EQ_INT(zc_dim(&ti, 1), 1);
    ZT_EQ_INT(zc_dim(&ti, 2), 0);
    ZT_EQ_INT(zc_get_tensor(golden, golden_size, 2, &ti), 0);
    ZT_EQ_U64(ti.byte_offset, 4160);
    ZT_CHECK(memcmp(golden + ti.byte_offset, s1, 3) == 0);
    ZT_EQ_INT(zc_get_tensor(golden, golden_size, 3, &ti), ZC_EINVAL);

    free(built);
    free(golden);
    return zt_report();
}
