/*
 * internal.h - declarations shared by the core's source files; not installed, not exported.
 *
 * Everything here is prefixed zc__ (two underscores) and has hidden visibility: the
 * extension and the tests link the static core and may use it, nothing else should.
 */
#ifndef ZEROCOPY_INTERNAL_H
#define ZEROCOPY_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "zerocopy/zc.h"

/* ---- header field offsets (docs/format.md, "Header") --------------------- */

#define ZC__H_MAGIC 0u
#define ZC__H_VERSION 8u
#define ZC__H_FLAGS 12u
#define ZC__H_HEADER_SIZE 16u
#define ZC__H_STORAGE_ALIGN 20u
#define ZC__H_DATA_ALIGN 24u
#define ZC__H_N_STORAGES 28u
#define ZC__H_N_TENSORS 32u
#define ZC__H_N_DIMS 36u
#define ZC__H_STRINGS_SIZE 40u
#define ZC__H_RESERVED0 44u
#define ZC__H_MANIFEST_OFFSET 48u
#define ZC__H_MANIFEST_SIZE 56u
#define ZC__H_DATA_OFFSET 64u
#define ZC__H_DATA_SIZE 72u
#define ZC__H_TOTAL_SIZE 80u
#define ZC__H_MANIFEST_CRC 88u
#define ZC__H_DATA_CRC 92u
#define ZC__H_HEADER_CRC 96u
#define ZC__H_RESERVED1 100u
#define ZC__H_RESERVED1_SIZE 28u

/* Tensor entry field offsets (docs/format.md, "Tensor entry"). */
#define ZC__T_NAME_OFFSET 0u
#define ZC__T_NAME_LEN 4u
#define ZC__T_STORAGE_INDEX 8u
#define ZC__T_DTYPE 12u
#define ZC__T_NDIM 13u
#define ZC__T_KIND 14u
#define ZC__T_FLAGS 15u
#define ZC__T_STORAGE_OFFSET 16u
#define ZC__T_DIMS_INDEX 24u
#define ZC__T_RESERVED 28u

/* Largest number of threads any parallel operation uses. */
#define ZC__MAX_THREADS 16

/* Smallest piece of work handed to a thread by copies, checksums and populate. */
#define ZC__MIN_CHUNK ((size_t)1 << 20)

/* ---- little-endian access, safe for unaligned addresses ------------------ */

static inline uint32_t zc__rd32(const void *p) {
    const unsigned char *b = (const unsigned char *)p;
    return (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) | ((uint32_t)b[3] << 24);
}

static inline uint64_t zc__rd64(const void *p) {
    const unsigned char *b = (const unsigned char *)p;
    return (uint64_t)zc__rd32(b) | ((uint64_t)zc__rd32(b + 4) << 32);
}

static inline void zc__wr32(void *p, uint32_t v) {
    unsigned char *b = (unsigned char *)p;
    b[0] = (unsigned char)v;
    b[1] = (unsigned char)(v >> 8);
    b[2] = (unsigned char)(v >> 16);
    b[3] = (unsigned char)(v >> 24);
}

static inline void zc__wr64(void *p, uint64_t v) {
    unsigned char *b = (unsigned char *)p;
    zc__wr32(b, (uint32_t)v);
    zc__wr32(b + 4, (uint32_t)(v >> 32));
}

/* ---- overflow-checked arithmetic: each returns 1 on overflow ------------- */

static inline int zc__add64(uint64_t a, uint64_t b, uint64_t *out) { return __builtin_add_overflow(a, b, out); }
static inline int zc__mul64(uint64_t a, uint64_t b, uint64_t *out) { return __builtin_mul_overflow(a, b, out); }

/* Rounds v up to a multiple of align (a power of two); returns 1 on overflow. */
static inline int zc__align_up64(uint64_t v, uint64_t align, uint64_t *out) {
    uint64_t t;
    if (zc__add64(v, align - 1, &t)) return 1;
    *out = t & ~(align - 1);
    return 0;
}

/* ---- errors -------------------------------------------------------------- */

/* Formats a message into msg (msg_cap bytes, may be 0) like snprintf, and returns code. */
int zc__fail(int code, char *msg, size_t msg_cap, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Copies at most max bytes of an untrusted name into dst (cap bytes, NUL-terminated),
 * replacing control characters and quotes with '?', and marking truncation with "...". */
void zc__quote_name(char *dst, size_t cap, const char *name, size_t name_len);

/* ---- tensor checks (validate.c), shared by the planner and the validator ---- */

/* Reads value i of a tensor's dims: i < ndim gives size i, ndim <= i < 2*ndim stride i-ndim. */
typedef int64_t (*zc__dim_getter)(const void *dims, unsigned i);

/* The fields of one tensor, from a zc_tensor_desc or from a tensor entry. */
typedef struct zc__tensor_fields {
    uint32_t index; /* Position in the tensor table, for messages. */
    const char *name;
    uint32_t name_len;
    uint32_t storage_index;
    unsigned dtype, ndim, kind, flags;
    uint64_t storage_offset;
    const void *dims;
    zc__dim_getter get;
} zc__tensor_fields;

/* Checks a tensor as docs/format.md prescribes: name length, storage index, dtype, rank, kind,
 * flags, non-negative sizes and strides, and its extent inside its storage, with overflow
 * checks.  Storage lengths come from storage_sizes (when not NULL) or from the storage table
 * of an arena (storage_table, 16-byte entries).  On success sets *start to the byte offset of
 * element 0 in its storage and *extent to the bytes it spans from the storage start (0 if it
 * is empty) and returns 0; otherwise writes a message naming the tensor and returns
 * ZC_ETENSOR, ZC_ETOOBIG or ZC_EOVERFLOW. */
int zc__check_tensor(const zc__tensor_fields *t, uint32_t n_storages, const uint64_t *storage_sizes,
                     const unsigned char *storage_table, uint64_t *start, uint64_t *extent, char *msg,
                     size_t msg_cap);

/* ---- threads ------------------------------------------------------------- */

/* Returns the number of threads to use for a request: nthreads if > 0, otherwise the online
 * CPUs; never more than ZC__MAX_THREADS and never less than 1. */
int zc__resolve_threads(int nthreads);

/* Runs fn(arg, part) for every part in [0, nparts) (nparts <= ZC__MAX_THREADS), part 0 on the
 * calling thread and the others on new threads.  A part whose thread fails to start runs on
 * the calling thread.  Returns 0 or -errno of the first failed thread start. */
int zc__run_parallel(int nparts, void (*fn)(void *arg, int part), void *arg);

/* ---- platform (platform_linux.c) ----------------------------------------- */

/* Returns the number of online CPUs (at least 1). */
int zc__plat_online_cpus(void);
/* Returns the page size. */
size_t zc__plat_page_size(void);
/* Populates page tables for reading [addr, addr+len) (page-aligned addr) with
 * MADV_POPULATE_READ.  Returns 0, or -errno (-EINVAL where the kernel lacks it). */
int zc__plat_populate_read(void *addr, size_t len);

/* convert.c: handles a read fault at addr if it lies in a lazy region (returns 1), else 0.
 * Async-signal-safe; called by the fault handler. */
int zc__lazy_fault(uintptr_t addr, const void *uctx);

/* mapping.c: makes the core's fault handler the current SIGSEGV/SIGBUS disposition (installing
 * it, or putting it back on top of whatever replaced it).  Returns 0 or -errno. */
int zc__fault_handler_current(void);

#endif /* ZEROCOPY_INTERNAL_H */
