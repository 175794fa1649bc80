/*
 * fuzz_arena.c - libFuzzer harness: arbitrary bytes through the arena reader.
 *
 * Validates the input; if it is accepted, reads every storage, tensor and dim and checks that
 * everything the reader reports lies inside the buffer, then recomputes the data CRC.  Each input
 * is tried twice: as given, and with its manifest and header CRCs recomputed.
 * Built as a libFuzzer binary with -DZC_FUZZ=ON (clang), and replayed by replay.c otherwise.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "zerocopy/zc.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int fuzz_accepts(const uint8_t *data, size_t size);

/* For replay.c's summary: whether the reader accepts the input as it is. */
int fuzz_accepts(const uint8_t *data, size_t size) { return zc_validate(data, size, NULL, NULL, 0) == 0; }

static uint64_t rd64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void wr32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* Runs the reader over size bytes at buf (a heap block of exactly that size). */
static void check(unsigned char *buf, size_t size) {
    zc_arena_info info;
    char msg[256];
    if (zc_validate(buf, size, &info, msg, sizeof msg) == 0) {
        if (info.total_size > size || info.data_offset + info.data_size != info.total_size) abort();
        for (uint32_t i = 0; i < info.n_storages; i++) {
            zc_storage_info s;
            if (zc_get_storage(buf, size, i, &s) != 0) abort();
            if (s.offset < info.data_offset || s.offset + s.length > info.total_size || s.offset % 64) abort();
        }
        for (uint32_t i = 0; i < info.n_tensors; i++) {
            zc_tensor_info t;
            volatile uint64_t sink = 0;
            if (zc_get_tensor(buf, size, i, &t) != 0) abort();
            if (t.byte_offset > info.total_size || t.extent > info.total_size - t.byte_offset) abort();
            if (t.ndim > ZC_MAX_NDIM || zc_dtype_size(t.dtype) == 0) abort();
            if ((const unsigned char *)t.name < buf || (const unsigned char *)t.name + t.name_len > buf + size) abort();
            for (unsigned d = 0; d < 2u * t.ndim; d++) {
                int64_t v = zc_dim(&t, d);
                if (v < 0) abort();
                sink += (uint64_t)v;
            }
            if (t.extent) sink += ((const volatile unsigned char *)buf)[t.byte_offset + t.extent - 1];
            (void)sink;
        }
        (void)zc_verify_data(buf, size, 1);
    } else if (msg[0] == '\0') {
        abort(); /* Every failure explains itself. */
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* An exact-size heap copy, so that an overrun is an ASan report. */
    unsigned char *buf = (unsigned char *)malloc(size ? size : 1);
    if (!buf) return 0;
    if (size) memcpy(buf, data, size);
    check(buf, size);
    if (size >= ZC_HEADER_SIZE) {
        /* Again with both checksums made to match, so that mutations reach the checks behind them. */
        uint64_t msize = rd64(buf + 56);
        if (msize <= size - ZC_HEADER_SIZE) wr32(buf + 88, zc_crc32c(0, buf + ZC_HEADER_SIZE, (size_t)msize));
        wr32(buf + 96, zc_crc32c(0, buf, 96));
        check(buf, size);
    }
    free(buf);
    return 0;
}
