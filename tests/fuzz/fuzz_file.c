/*
 * fuzz_file.c - libFuzzer harness: arbitrary bytes through the arena-file reader.
 *
 * Validates the input as a whole arena file; if it is accepted, checks that every section the
 * reader reports lies inside the buffer, reads the metadata and skeleton, and runs the arena
 * reader over the arena it points to.  Each input is tried twice: as given, and with the file
 * header's CRCs (metadata, skeleton, header) and the inner arena's CRCs recomputed, so that
 * mutations reach the checks behind them.
 * Built as a libFuzzer binary with -DZC_FUZZ=ON (clang), and replayed by replay.c otherwise.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "zerocopy/zc.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int fuzz_accepts(const uint8_t *data, size_t size);

/* For replay.c's summary: whether the reader accepts the input as it is. */
int fuzz_accepts(const uint8_t *data, size_t size) { return zc_file_validate(data, size, NULL, NULL, 0) == 0; }

static uint64_t rd64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void wr32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* Runs the reader over size bytes at buf (a heap block of exactly that size). */
static void check(const unsigned char *buf, size_t size) {
    zc_file_info info;
    char msg[512];
    if (zc_file_validate(buf, size, &info, msg, sizeof msg) == 0) {
        volatile uint32_t sink = 0;
        if (info.file_size != size || info.arena_offset % ZC_FILE_ARENA_ALIGN) abort();
        if (info.meta_offset + info.meta_size > info.skeleton_offset) abort();
        if (info.skeleton_offset + info.skeleton_size > info.arena_offset) abort();
        if (info.arena_offset + info.arena_size != size || info.arena.total_size != info.arena_size) abort();
        sink += zc_crc32c(0, buf + info.meta_offset, (size_t)info.meta_size);
        sink += zc_crc32c(0, buf + info.skeleton_offset, (size_t)info.skeleton_size);
        for (uint32_t i = 0; i < info.arena.n_tensors; i++) {
            zc_tensor_info t;
            if (zc_get_tensor(buf + info.arena_offset, (size_t)info.arena_size, i, &t) != 0) abort();
            if (t.byte_offset > info.arena_size || t.extent > info.arena_size - t.byte_offset) abort();
            if (t.extent) sink += buf[info.arena_offset + t.byte_offset + t.extent - 1];
        }
        (void)zc_verify_data(buf + info.arena_offset, (size_t)info.arena_size, 1);
        (void)sink;
    } else if (msg[0] == '\0') {
        abort(); /* Every failure explains itself. */
    }
}

/* Recomputes the CRCs a mutation broke, where the fields that locate them are in range. */
static void rehash(unsigned char *buf, size_t size) {
    uint64_t mo, ms, so, ss, ao;
    if (size < ZC_FILE_HEADER_SIZE) return;
    mo = rd64(buf + 24), ms = rd64(buf + 32), so = rd64(buf + 40), ss = rd64(buf + 48), ao = rd64(buf + 56);
    /* Inside out: the arena's CRCs, then the sections', then the file header's. */
    if (ao <= size && size - ao >= ZC_HEADER_SIZE) {
        unsigned char *a = buf + ao;
        uint64_t msize = rd64(a + 56);
        if (msize <= size - ao - ZC_HEADER_SIZE) wr32(a + 88, zc_crc32c(0, a + ZC_HEADER_SIZE, (size_t)msize));
        wr32(a + 96, zc_crc32c(0, a, 96));
    }
    if (mo <= size && ms <= size - mo) wr32(buf + 80, zc_crc32c(0, buf + mo, (size_t)ms));
    if (so <= size && ss <= size - so) wr32(buf + 84, zc_crc32c(0, buf + so, (size_t)ss));
    wr32(buf + 88, zc_crc32c(0, buf, 88));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* An exact-size heap copy, so that an overrun is an ASan report. */
    unsigned char *buf = (unsigned char *)calloc(1, size ? size : 1);
    if (!buf) return 0;
    if (size) memcpy(buf, data, size);
    check(buf, size);
    rehash(buf, size);
    check(buf, size);
    free(buf);
    return 0;
}
