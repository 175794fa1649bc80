/* test_file.c - arena files (docs/format.md, "Arena files"): the golden file byte for byte,
 * zc_file_validate on every truncation and on each corrupted field, zc_set_data_crc.
 *
 * Usage: test_file tests/data/golden_small.rzc */
#include <stdlib.h>

#include "zc_arena.h"
#include "zc_test.h"

static const char k_meta[] = "{\"class\":\"Golden\"}";
static const char k_skel_text[] = "golden skeleton";

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

/* The arena of tests/data/golden_small.arena (docs/format.md, "Golden bytes"). */
static unsigned char *golden_arena(size_t *size) {
    static const unsigned char s0[12] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    static const unsigned char s1[3] = {0xff, 0xfe, 0xfd};
    const unsigned char *data[2] = {s0, s1};
    uint64_t sizes[2] = {12, 3};
    za_tensor t[3];
    char msg[256];
    int rc;
    memset(t, 0, sizeof t);
    t[0] = (za_tensor){.name = "a", .dtype = ZC_DT_FLOAT32, .ndim = 1, .flags = ZC_TFLAG_REQUIRES_GRAD,
                       .shape = {3}, .stride = {1}};
    t[1] = (za_tensor){.name = "b", .dtype = ZC_DT_INT32, .ndim = 1, .kind = ZC_KIND_BUFFER,
                       .flags = ZC_TFLAG_PERSISTENT, .storage_offset = 1, .shape = {2}, .stride = {1}};
    t[2] = (za_tensor){.name = "c", .storage_index = 1, .dtype = ZC_DT_UINT8, .ndim = 1, .kind = ZC_KIND_OTHER,
                       .shape = {3}, .stride = {1}};
    return za_build(sizes, data, 2, t, 3, size, &rc, msg, sizeof msg);
}

/* The golden file: the golden arena, the metadata k_meta and the skeleton "RZCSKEL1", the
 * arena's manifest CRC (u32 LE), then k_skel_text. */
static unsigned char *golden_file(size_t *size) {
    size_t arena_size = 0;
    unsigned char *arena = golden_arena(&arena_size), *file, skel[64];
    size_t skel_size = 12 + strlen(k_skel_text);
    int rc;
    if (!arena) return NULL;
    memcpy(skel, "RZCSKEL1", 8);
    memcpy(skel + 8, arena + 88, 4);
    memcpy(skel + 12, k_skel_text, strlen(k_skel_text));
    file = za_build_file(k_meta, strlen(k_meta), skel, skel_size, arena, arena_size, size, &rc);
    free(arena);
    return file;
}

static void wr32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void wr64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void rehash(unsigned char *f) { wr32(f + 88, zc_crc32c(0, f, 88)); }

/* Validates a modified copy of the file and checks the code and a piece of the message. */
static void expect(const unsigned char *file, size_t size, void (*edit)(unsigned char *), size_t new_size, int code,
                   const char *needle, int line) {
    size_t cap = (new_size > size ? new_size : size) + 64;
    unsigned char *copy = (unsigned char *)malloc(cap);
    char msg[512];
    int rc;
    memset(copy, 0, cap);
    memcpy(copy, file, size);
    edit(copy);
    rc = zc_file_validate(copy, new_size, NULL, msg, sizeof msg);
    zt_checks++;
    if (rc != code || !strstr(msg, needle))
        ZT_FAIL_AT("line %d: got %s \"%s\", expected %s containing \"%s\"", line, zc_error_name(rc), msg,
                   zc_error_name(code), needle);
    free(copy);
}

static void e_none(unsigned char *f) { (void)f; }
static void e_magic(unsigned char *f) { f[0] = 'X'; }
static void e_version(unsigned char *f) { wr32(f + 8, 2); }
static void e_flags(unsigned char *f) { wr32(f + 12, 1), rehash(f); }
static void e_header_size(unsigned char *f) { wr32(f + 16, 64), rehash(f); }
static void e_align(unsigned char *f) { wr32(f + 20, 64), rehash(f); }
static void e_reserved(unsigned char *f) { f[127] = 1, rehash(f); }
static void e_header_crc(unsigned char *f) { f[40] ^= 1; }
static void e_meta_offset(unsigned char *f) { wr64(f + 24, 0), rehash(f); }
static void e_meta_big(unsigned char *f) { wr64(f + 32, (uint64_t)ZC_FILE_MAX_META + 1), rehash(f); }
static void e_skel_overflow(unsigned char *f) { wr64(f + 48, UINT64_MAX - 100), rehash(f); }
static void e_skel_offset(unsigned char *f) { wr64(f + 40, 129), rehash(f); }
static void e_arena_offset(unsigned char *f) { wr64(f + 56, 8192), rehash(f); }
static void e_file_size(unsigned char *f) { wr64(f + 72, 8321), rehash(f); }
static void e_meta_crc(unsigned char *f) { f[130] ^= 0x20; }
static void e_skel_crc(unsigned char *f) { f[160] ^= 0x20; }
static void e_padding(unsigned char *f) { f[4000] = 7; }
static void e_arena(unsigned char *f) { f[4096 + 40] ^= 1; }
static void e_arena_size(unsigned char *f) { wr64(f + 64, 4224 + 4096), wr64(f + 72, 8320 + 4096), rehash(f); }

int main(int argc, char **argv) {
    unsigned char *built, *golden, *arena;
    size_t built_size = 0, golden_size = 0, arena_size = 0;
    zc_file_info info;
    char msg[512];
    int accepted = 0;

    if (argc < 2) {
        fprintf(stderr, "usage: test_file tests/data/golden_small.rzc\n");
        return 2;
    }

    /* Planning. */
    ZT_EQ_INT(zc_file_plan(18, 27, 4224, &info), 0);
    ZT_EQ_U64(info.meta_offset, 128);
    ZT_EQ_U64(info.skeleton_offset, 146);
    ZT_EQ_U64(info.arena_offset, 4096);
    ZT_EQ_U64(info.file_size, 8320);
    ZT_EQ_INT(zc_file_plan(0, 4096 - 128, 0, &info), 0);
    ZT_EQ_U64(info.arena_offset, 4096);
    ZT_EQ_INT(zc_file_plan(0, 4096 - 127, 0, &info), 0);
    ZT_EQ_U64(info.arena_offset, 8192);
    ZT_EQ_INT(zc_file_plan((uint64_t)ZC_FILE_MAX_META + 1, 0, 0, &info), ZC_ETOOBIG);
    ZT_EQ_INT(zc_file_plan(0, UINT64_MAX - 200, 0, &info), ZC_EOVERFLOW);
    ZT_EQ_INT(zc_file_plan(0, 0, UINT64_MAX - 200, &info), ZC_EOVERFLOW);
    ZT_EQ_INT(zc_file_plan(0, 0, 0, NULL), ZC_EINVAL);
    ZT_EQ_INT(zc_file_write_header(msg, 64, NULL, 0, NULL, 0, 0), ZC_EINVAL);
    ZT_EQ_INT(zc_file_write_header(msg, sizeof msg, NULL, 3, NULL, 0, 0), ZC_EINVAL);

    /* The golden file. */
    built = golden_file(&built_size);
    golden = read_file(argv[1], &golden_size);
    ZT_CHECK(built != NULL);
    ZT_CHECK(golden != NULL);
    if (!built || !golden) return zt_report();
    ZT_EQ_U64(built_size, 8320);
    ZT_EQ_U64(golden_size, built_size);
    for (size_t i = 0; i < built_size && i < golden_size; i++) {
        if (built[i] != golden[i]) {
            ZT_FAIL_AT("byte %zu differs: built 0x%02x, golden 0x%02x", i, built[i], golden[i]);
            break;
        }
    }
    ZT_EQ_INT(zc_file_validate(golden, golden_size, &info, msg, sizeof msg), 0);
    ZT_EQ_INT(info.version, 1);
    ZT_EQ_INT(info.flags, 0);
    ZT_EQ_U64(info.meta_offset, 128);
    ZT_EQ_U64(info.meta_size, strlen(k_meta));
    ZT_EQ_U64(info.skeleton_offset, 128 + strlen(k_meta));
    ZT_EQ_U64(info.skeleton_size, 12 + strlen(k_skel_text));
    ZT_EQ_U64(info.arena_offset, 4096);
    ZT_EQ_U64(info.arena_size, 4224);
    ZT_EQ_U64(info.file_size, 8320);
    ZT_EQ_HEX(info.meta_crc, zc_crc32c(0, k_meta, strlen(k_meta)));
    ZT_EQ_HEX(info.skeleton_crc, zc_crc32c(0, golden + info.skeleton_offset, (size_t)info.skeleton_size));
    ZT_EQ_HEX(info.header_crc, zc_crc32c(0, golden, 88));
    ZT_EQ_INT(info.arena.n_tensors, 3);
    ZT_EQ_U64(info.arena.total_size, 4224);
    ZT_EQ_INT(zc_verify_data(golden + info.arena_offset, (size_t)info.arena_size, 1), 0);

    /* Every truncation is an error with a message, never a read past the end (ASan). */
    for (size_t n = 0; n < golden_size; n++) {
        unsigned char *cut = (unsigned char *)malloc(n ? n : 1);
        memcpy(cut, golden, n);
        msg[0] = '\0';
        if (zc_file_validate(cut, n, NULL, msg, sizeof msg) == 0) accepted++;
        if (msg[0] == '\0') ZT_FAIL_AT("truncation to %zu bytes: no message", n);
        free(cut);
    }
    ZT_EQ_INT(accepted, 0);

#define EXPECT(edit, size, code, needle) expect(golden, golden_size, edit, size, code, needle, __LINE__)
    EXPECT(e_none, 8319, ZC_ETRUNCATED, "truncated");
    EXPECT(e_none, 100, ZC_ETRUNCATED, "shorter than the 128-byte file header");
    EXPECT(e_none, 8321, ZC_EHEADER, "1 more than its file_size");
    EXPECT(e_magic, 8320, ZC_EMAGIC, "bad magic");
    EXPECT(e_version, 8320, ZC_EVERSION, "version 2");
    EXPECT(e_flags, 8320, ZC_EHEADER, "flags");
    EXPECT(e_header_size, 8320, ZC_EHEADER, "header_size");
    EXPECT(e_align, 8320, ZC_EHEADER, "arena_align");
    EXPECT(e_reserved, 8320, ZC_EHEADER, "reserved byte 127");
    EXPECT(e_header_crc, 8320, ZC_ECHECKSUM, "header_crc");
    EXPECT(e_meta_offset, 8320, ZC_EHEADER, "meta_offset");
    EXPECT(e_meta_big, 8320, ZC_ETOOBIG, "meta_size");
    EXPECT(e_skel_overflow, 8320, ZC_EOVERFLOW, "overflow");
    EXPECT(e_skel_offset, 8320, ZC_EHEADER, "skeleton_offset");
    EXPECT(e_arena_offset, 8320, ZC_EHEADER, "arena_offset");
    EXPECT(e_file_size, 8320, ZC_EHEADER, "file_size");
    EXPECT(e_meta_crc, 8320, ZC_ECHECKSUM, "meta_crc");
    EXPECT(e_skel_crc, 8320, ZC_ECHECKSUM, "skeleton_crc");
    EXPECT(e_padding, 8320, ZC_EHEADER, "padding byte 4000");
    EXPECT(e_arena, 8320, ZC_ECHECKSUM, "arena: header");
    EXPECT(e_arena_size, 8320 + 4096, ZC_EHEADER, "differs from the arena's total_size");
#undef EXPECT
    ZT_EQ_INT(zc_file_validate(NULL, 5, NULL, msg, sizeof msg), ZC_EINVAL);

    /* zc_set_data_crc turns an arena written without a data checksum into one with it. */
    arena = golden_arena(&arena_size);
    ZT_CHECK(arena != NULL);
    if (arena) {
        uint32_t crc = zc_crc32c(0, arena + 4096, 128);
        zc_arena_info ai;
        wr32(arena + 12, ZC_FLAG_NO_DATA_CRC);
        wr32(arena + 92, 0);
        wr32(arena + 96, zc_crc32c(0, arena, 96));
        ZT_EQ_INT(zc_verify_data(arena, arena_size, 1), ZC_ENODATACRC);
        ZT_EQ_INT(zc_set_data_crc(arena, 128, crc), 0);
        ZT_EQ_INT(zc_validate(arena, arena_size, &ai, msg, sizeof msg), 0);
        ZT_EQ_INT(ai.flags, 0);
        ZT_EQ_HEX(ai.data_crc, crc);
        ZT_EQ_INT(zc_verify_data(arena, arena_size, 1), 0);
        ZT_EQ_INT(zc_set_data_crc(arena, 100, crc), ZC_EINVAL);
        arena[0] = 'X';
        ZT_EQ_INT(zc_set_data_crc(arena, 128, crc), ZC_EMAGIC);
        free(arena);
    }

    free(built);
    free(golden);
    return zt_report();
}
