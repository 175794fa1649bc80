/*
 * make_corpus.c - writes the seed corpora of the fuzzers: small valid arenas of several shapes,
 * each under 8 KiB, for fuzz_arena, and arena files (each under 16 KiB) around some of them for
 * fuzz_file.  Run by hand after a format change:
 *   make_corpus tests/fuzz/corpus tests/fuzz/corpus_file
 */
#include <stdio.h>
#include <stdlib.h>

#include "../c/zc_arena.h"

static const char *g_file_dir = NULL; /* Where the arena-file corpus goes (NULL: nowhere). */

static int write_bytes(const char *dir, const char *name, const unsigned char *a, size_t size) {
    char path[4096];
    FILE *f;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    f = fopen(path, "wb");
    if (!f || fwrite(a, 1, size, f) != size) {
        fprintf(stderr, "%s: cannot write\n", path);
        if (f) fclose(f);
        return 1;
    }
    fclose(f);
    printf("%s: %zu bytes\n", path, size);
    return 0;
}

/* Writes an arena file around arena: metadata naming it and a skeleton of skel_size bytes. */
static int write_file(const char *name, const unsigned char *arena, size_t arena_size, size_t skel_size) {
    char meta[256];
    unsigned char *skel = (unsigned char *)malloc(skel_size + 1), *file;
    size_t size = 0;
    int rc, fails;
    snprintf(meta, sizeof meta, "{\"class\":\"%s\",\"methods\":[\"__call__\"]}", name);
    for (size_t i = 0; i < skel_size; i++) skel[i] = (unsigned char)(i * 7 + 1);
    if (skel_size >= 12) {
        memcpy(skel, "RZCSKEL1", 8);
        if (arena_size >= 92) memcpy(skel + 8, arena + 88, 4);
    }
    file = za_build_file(meta, strlen(meta), skel, skel_size, arena, arena_size, &size, &rc);
    free(skel);
    if (!file) {
        fprintf(stderr, "%s: %s\n", name, zc_error_name(rc));
        return 1;
    }
    fails = write_bytes(g_file_dir, name, file, size);
    free(file);
    return fails;
}

static int write_arena(const char *dir, const char *name, const uint64_t *sizes, uint32_t ns, const za_tensor *t,
                       uint32_t nt) {
    char msg[256];
    size_t size = 0;
    int rc, fails;
    unsigned char *a = za_build(sizes, NULL, ns, t, nt, &size, &rc, msg, sizeof msg);
    if (!a) {
        fprintf(stderr, "%s: %s (%s)\n", name, zc_error_name(rc), msg);
        return 1;
    }
    fails = write_bytes(dir, name, a, size);
    /* Arena files around the smaller arenas: a short skeleton, and one that pushes the arena to
     * the second page. */
    if (g_file_dir && size <= 8192) {
        char fname[256];
        fails += write_file(name, a, size, 40);
        snprintf(fname, sizeof fname, "%s_bigskel", name);
        if (size <= 4224) fails += write_file(fname, a, size, 5000);
    }
    free(a);
    return fails;
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "tests/fuzz/corpus";
    int fails = 0;

    g_file_dir = argc > 2 ? argv[2] : NULL;

    { /* The golden arena of docs/format.md (storage bytes differ). */
        uint64_t sizes[] = {12, 3};
        za_tensor t[] = {
            {.name = "a", .dtype = ZC_DT_FLOAT32, .ndim = 1, .flags = ZC_TFLAG_REQUIRES_GRAD, .shape = {3}, .stride = {1}},
            {.name = "b", .dtype = ZC_DT_INT32, .ndim = 1, .kind = ZC_KIND_BUFFER, .flags = ZC_TFLAG_PERSISTENT,
             .storage_offset = 1, .shape = {2}, .stride = {1}},
            {.name = "c", .storage_index = 1, .dtype = ZC_DT_UINT8, .ndim = 1, .kind = ZC_KIND_OTHER, .shape = {3},
             .stride = {1}},
        };
        fails += write_arena(dir, "small", sizes, 2, t, 3);
    }
    fails += write_arena(dir, "empty", NULL, 0, NULL, 0);
    { /* Views, a scalar, an empty tensor and a zero-length storage. */
        uint64_t sizes[] = {48, 400, 7, 0};
        za_tensor t[] = {
            {.name = "encoder.weight", .dtype = ZC_DT_FLOAT32, .ndim = 2, .shape = {3, 4}, .stride = {4, 1}},
            {.name = "encoder.weight.T", .dtype = ZC_DT_FLOAT32, .ndim = 2, .kind = ZC_KIND_OTHER, .shape = {4, 3},
             .stride = {1, 4}},
            {.name = "decoder.weight", .storage_index = 1, .dtype = ZC_DT_BFLOAT16, .ndim = 2, .shape = {10, 20},
             .stride = {20, 1}},
            {.name = "decoder.bias", .storage_index = 2, .dtype = ZC_DT_UINT8, .ndim = 1, .kind = ZC_KIND_BUFFER,
             .flags = ZC_TFLAG_PERSISTENT, .shape = {7}, .stride = {1}},
            {.name = "empty", .storage_index = 3, .dtype = ZC_DT_FLOAT16, .ndim = 2, .shape = {0, 5}, .stride = {5, 1}},
            {.name = "scalar", .dtype = ZC_DT_INT64, .storage_offset = 5},
        };
        fails += write_arena(dir, "views", sizes, 4, t, 6);
    }
    { /* Every dtype once. */
        uint64_t sizes[1] = {16 * 22};
        za_tensor t[16];
        static const char *names[16] = {"t.bool", "t.u8", "t.i8", "t.i16", "t.i32", "t.i64", "t.f16", "t.bf16",
                                        "t.f32", "t.f64", "t.c32", "t.c64", "t.c128", "t.u16", "t.u32", "t.f8"};
        static const uint8_t codes[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 22};
        for (int i = 0; i < 16; i++) {
            t[i] = (za_tensor){.name = names[i], .dtype = codes[i], .ndim = 1, .shape = {1}, .stride = {1},
                               .storage_offset = (uint64_t)(16 * i) / zc_dtype_size(codes[i])};
        }
        fails += write_arena(dir, "dtypes", sizes, 1, t, 16);
    }
    { /* The largest rank, a broadcast (stride 0) view and a long name. */
        uint64_t sizes[] = {8, 64};
        za_tensor t[3];
        char longname[301];
        memset(longname, 'x', 300);
        longname[300] = '\0';
        memset(t, 0, sizeof t);
        t[0].name = "rank32";
        t[0].dtype = ZC_DT_FLOAT64;
        t[0].ndim = ZC_MAX_NDIM;
        for (int i = 0; i < (int)ZC_MAX_NDIM; i++) {
            t[0].shape[i] = 1;
            t[0].stride[i] = 1;
        }
        t[1].name = "broadcast";
        t[1].storage_index = 1;
        t[1].dtype = ZC_DT_FLOAT32;
        t[1].ndim = 3;
        t[1].shape[0] = 1000000;
        t[1].shape[1] = 4;
        t[1].shape[2] = 4;
        t[1].stride[1] = 4;
        t[1].stride[2] = 1;
        t[2].name = longname;
        t[2].storage_index = 1;
        t[2].dtype = ZC_DT_UINT8;
        t[2].ndim = 1;
        t[2].shape[0] = 64;
        t[2].stride[0] = 1;
        fails += write_arena(dir, "shapes", sizes, 2, t, 3);
    }
    { /* Many storages. */
        uint64_t sizes[40];
        za_tensor t[1] = {{.name = "last", .storage_index = 39, .dtype = ZC_DT_UINT8, .ndim = 1, .shape = {39},
                           .stride = {1}}};
        for (int i = 0; i < 40; i++) sizes[i] = (uint64_t)i;
        fails += write_arena(dir, "storages", sizes, 40, t, 1);
    }
    return fails ? 1 : 0;
}
