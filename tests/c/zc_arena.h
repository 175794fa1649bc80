/*
 * zc_arena.h - builds small arenas for the tests, the fuzz corpus and the golden file.
 */
#ifndef ZC_ARENA_H
#define ZC_ARENA_H

#include <stdlib.h>
#include <string.h>

#include "zerocopy/zc.h"

#define ZA_MAX 64

/* A tensor description with its own dims storage. */
typedef struct za_tensor {
    const char *name;
    uint32_t storage_index;
    uint8_t dtype, ndim, kind, flags;
    uint64_t storage_offset;
    int64_t shape[ZC_MAX_NDIM];
    int64_t stride[ZC_MAX_NDIM];
} za_tensor;

/* Fills a zc_tensor_desc array from za_tensor values. */
static inline void za_descs(const za_tensor *t, uint32_t n, zc_tensor_desc *out) {
    for (uint32_t i = 0; i < n; i++) {
        out[i].name = t[i].name;
        out[i].name_len = (uint32_t)strlen(t[i].name);
        out[i].storage_index = t[i].storage_index;
        out[i].dtype = t[i].dtype;
        out[i].ndim = t[i].ndim;
        out[i].kind = t[i].kind;
        out[i].flags = t[i].flags;
        out[i].storage_offset = t[i].storage_offset;
        out[i].shape = t[i].shape;
        out[i].stride = t[i].stride;
    }
}

/* Builds an arena whose storage i holds the bytes data[i] (sizes[i] bytes; NULL fills with
 * (i*31 + k) & 0xff).  Returns a malloc'd buffer (*size bytes) or NULL if planning or
 * finalizing fails (*rc receives the code, msg the message). */
static inline unsigned char *za_build(const uint64_t *sizes, const unsigned char *const *data, uint32_t ns,
                                      const za_tensor *tensors, uint32_t nt, size_t *size, int *rc, char *msg,
                                      size_t msg_cap) {
    zc_tensor_desc descs[ZA_MAX];
    uint64_t offsets[ZA_MAX];
    zc_copy copies[ZA_MAX];
    unsigned char *fill[ZA_MAX] = {0};
    unsigned char *a = NULL;
    zc_plan_t plan;
    int code;

    if (ns > ZA_MAX || nt > ZA_MAX) {
        *rc = ZC_EINVAL;
        return NULL;
    }
    za_descs(tensors, nt, descs);
    code = zc_plan(sizes, ns, descs, nt, offsets, &plan, msg, msg_cap);
    if (code) goto done;
    a = (unsigned char *)malloc((size_t)plan.total_size);
    if (!a) {
        code = ZC_ENOMEM;
        goto done;
    }
    memset(a, 0xA5, (size_t)plan.total_size);
    code = zc_write_manifest(a, (size_t)plan.total_size, &plan, sizes, offsets, descs);
    if (code) goto done;
    for (uint32_t i = 0; i < ns; i++) {
        const unsigned char *src = data ? data[i] : NULL;
        if (!src) {
            fill[i] = (unsigned char *)malloc(sizes[i] ? (size_t)sizes[i] : 1);
            for (uint64_t k = 0; k < sizes[i]; k++) fill[i][k] = (unsigned char)((i * 31 + k) & 0xff);
            src = fill[i];
        }
        copies[i].dst = a + plan.data_offset + offsets[i];
        copies[i].src = src;
        copies[i].n = (size_t)sizes[i];
    }
    code = zc_gather(copies, ns, 2);
    if (code) goto done;
    code = zc_finalize(a, (size_t)plan.total_size, 2);
    *size = (size_t)plan.total_size;
done:
    for (uint32_t i = 0; i < ns; i++) free(fill[i]);
    *rc = code;
    if (code) {
        free(a);
        return NULL;
    }
    return a;
}

/* Builds an arena file (docs/format.md, "Arena files") around an arena: the header, meta,
 * skeleton, zero padding and the arena.  Returns a malloc'd buffer (*size bytes) or NULL
 * (*rc receives the code). */
static inline unsigned char *za_build_file(const void *meta, size_t meta_size, const void *skeleton,
                                           size_t skeleton_size, const unsigned char *arena, size_t arena_size,
                                           size_t *size, int *rc) {
    zc_file_info f;
    unsigned char *buf;
    int code = zc_file_plan(meta_size, skeleton_size, arena_size, &f);
    if (code) {
        *rc = code;
        return NULL;
    }
    buf = (unsigned char *)calloc(1, (size_t)f.file_size);
    if (!buf) {
        *rc = ZC_ENOMEM;
        return NULL;
    }
    code = zc_file_write_header(buf, (size_t)f.file_size, meta, meta_size, skeleton, skeleton_size, arena_size);
    if (code) {
        free(buf);
        *rc = code;
        return NULL;
    }
    if (meta_size) memcpy(buf + f.meta_offset, meta, meta_size);
    if (skeleton_size) memcpy(buf + f.skeleton_offset, skeleton, skeleton_size);
    if (arena_size) memcpy(buf + f.arena_offset, arena, arena_size);
    *size = (size_t)f.file_size;
    *rc = 0;
    return buf;
}

#endif /* ZC_ARENA_H */
