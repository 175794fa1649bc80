/*
 * replay.c - runs the fuzz harness without libFuzzer: every file of a corpus directory, then a
 * fixed number of deterministic mutations of them (bit flips, byte sets, truncations, header and
 * manifest fields set to boundary values), half of them with the checksums recomputed so that
 * the mutations reach the checks behind the CRCs.
 *
 * Usage: fuzz_replay CORPUS_DIR [MUTATIONS]
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "zerocopy/zc.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
/* Defined by the harness: 1 if its reader accepts the input as it is (for the summary line). */
int fuzz_accepts(const uint8_t *data, size_t size);

typedef struct input {
    unsigned char *data;
    size_t size;
} input;

static uint64_t g_rng = 0x243F6A8885A308D3ull; /* Fixed seed: the same mutations every run. */

static uint64_t rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return g_rng;
}

static uint64_t rd64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void wr(unsigned char *p, uint64_t v, int n) {
    for (int i = 0; i < n; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static const uint64_t k_boundary[] = {0, 1, 2, 7, 8, 31, 32, 33, 63, 64, 65, 127, 128, 255, 256, 4095, 4096, 4097,
                                      0x7fff, 0xffff, 0x7fffffff, 0x80000000u, 0xffffffffu, 0x100000000ull,
                                      0x7fffffffffffffffull, 0x8000000000000000ull, UINT64_MAX - 4095,
                                      UINT64_MAX - 63, UINT64_MAX - 1, UINT64_MAX};

/* Header fields (offset, width). */
static const struct {
    unsigned off, width;
} k_fields[] = {{8, 4},  {12, 4}, {16, 4}, {20, 4}, {24, 4}, {28, 4}, {32, 4}, {36, 4}, {40, 4},
                {44, 4}, {48, 8}, {56, 8}, {64, 8}, {72, 8}, {80, 8}, {88, 4}, {92, 4}, {96, 4}};

static uint64_t boundary(uint64_t old) {
    uint64_t r = rnd() % (sizeof k_boundary / sizeof k_boundary[0] + 4);
    if (r < sizeof k_boundary / sizeof k_boundary[0]) return k_boundary[r];
    return r & 1 ? old + 1 : old - 1;
}

/* Recomputes the manifest CRC (if the header's manifest_size fits) and the header CRC. */
static void rehash(unsigned char *a, size_t size) {
    if (size < 128) return;
    if (rd64(a + 56) <= size - 128) wr(a + 88, zc_crc32c(0, a + 128, (size_t)rd64(a + 56)), 4);
    wr(a + 96, zc_crc32c(0, a, 96), 4);
}

static void mutate(unsigned char *a, size_t *size) {
    int n = 1 + (int)(rnd() % 4);
    for (int k = 0; k < n && *size > 0; k++) {
        size_t pos;
        switch (rnd() % 7) {
        case 0: /* Bit flip, biased towards header and manifest. */
            pos = rnd() % 2 ? (*size < 512 ? *size : 512) : *size;
            pos = (size_t)(rnd() % pos);
            a[pos] ^= (unsigned char)(1u << (rnd() % 8));
            break;
        case 1: /* Byte set. */
            pos = (size_t)(rnd() % *size);
            a[pos] = (unsigned char)k_boundary[rnd() % 10];
            break;
        case 2: /* Truncation. */
            *size = (size_t)(rnd() % (*size + 1));
            break;
        case 3: /* Header field to a boundary value. */
            if (*size >= 128) {
                unsigned f = (unsigned)(rnd() % (sizeof k_fields / sizeof k_fields[0]));
                uint64_t old = k_fields[f].width == 8 ? rd64(a + k_fields[f].off)
                                                      : (rd64(a + k_fields[f].off) & 0xffffffffu);
                wr(a + k_fields[f].off, boundary(old), (int)k_fields[f].width);
            }
            break;
        case 4: /* An aligned 4- or 8-byte manifest word to a boundary value. */
            if (*size >= 144) {
                size_t span = *size - 136 < 4096 ? *size - 136 : 4096;
                int width = rnd() % 2 ? 8 : 4;
                pos = 128 + (size_t)(rnd() % span) / 4 * 4;
                if (pos + (size_t)width <= *size) wr(a + pos, boundary(rd64(a + pos)), width);
            }
            break;
        case 5: /* One manifest byte (dtype, ndim, kind, flags) to a small or extreme value. */
            if (*size > 128) {
                pos = 128 + (size_t)(rnd() % (*size - 128 < 4096 ? *size - 128 : 4096));
                a[pos] = (unsigned char)(rnd() % 3 == 0 ? 255 : rnd() % 40);
            }
            break;
        default: /* Copy a chunk over another place. */
            if (*size > 16) {
                size_t len = 1 + (size_t)(rnd() % 16), from = (size_t)(rnd() % (*size - len)),
                       to = (size_t)(rnd() % (*size - len));
                memmove(a + to, a + from, len);
            }
            break;
        }
    }
    if (rnd() % 2) rehash(a, *size);
}

static int load_dir(const char *path, input **out, size_t *count) {
    DIR *d = opendir(path);
    struct dirent *e;
    size_t cap = 0;
    if (!d) return -1;
    while ((e = readdir(d)) != NULL) {
        char file[4096];
        FILE *f;
        long n;
        if (e->d_name[0] == '.') continue;
        snprintf(file, sizeof file, "%s/%s", path, e->d_name);
        f = fopen(file, "rb");
        if (!f) continue;
        if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0) {
            unsigned char *buf = (unsigned char *)malloc((size_t)n + 1);
            if (buf && fread(buf, 1, (size_t)n, f) == (size_t)n) {
                if (*count == cap) {
                    cap = cap ? 2 * cap : 16;
                    *out = (input *)realloc(*out, cap * sizeof **out);
                }
                (*out)[*count].data = buf;
                (*out)[*count].size = (size_t)n;
                (*count)++;
            } else {
                free(buf);
            }
        }
        fclose(f);
    }
    closedir(d);
    return 0;
}

int main(int argc, char **argv) {
    input *inputs = NULL;
    size_t count = 0, valid = 0, accepted = 0;
    long mutations = argc > 2 ? strtol(argv[2], NULL, 10) : 20000;
    if (argc < 2) {
        fprintf(stderr, "usage: fuzz_replay CORPUS_DIR [MUTATIONS]\n");
        return 2;
    }
    if (load_dir(argv[1], &inputs, &count) != 0 || count == 0) {
        fprintf(stderr, "fuzz_replay: no corpus files in %s\n", argv[1]);
        return 1;
    }
    for (size_t i = 0; i < count; i++) {
        LLVMFuzzerTestOneInput(inputs[i].data, inputs[i].size);
        if (fuzz_accepts(inputs[i].data, inputs[i].size)) valid++;
    }
    for (long m = 0; m < mutations; m++) {
        const input *src = &inputs[rnd() % count];
        size_t size = src->size;
        unsigned char *buf = (unsigned char *)malloc(size ? size : 1);
        memcpy(buf, src->data, size);
        mutate(buf, &size);
        LLVMFuzzerTestOneInput(buf, size);
        if (fuzz_accepts(buf, size)) accepted++;
        free(buf);
    }
    printf("fuzz_replay: %zu corpus files (%zu valid), %ld mutations (%zu still valid)\n", count, valid, mutations,
           accepted);
    for (size_t i = 0; i < count; i++) free(inputs[i].data);
    free(inputs);
    return 0;
}
