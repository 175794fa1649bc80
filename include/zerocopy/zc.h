/*
 * zc.h - public API of the ray_zerocopy C core.
 *
 * The core owns everything about bytes: the arena format (see docs/format.md),
 * validation of untrusted arenas, multi-threaded gather copies, CRC32C, and the
 * memory management of a mapped arena (prefault, write protection, fault reporting).
 * It is plain C11 + POSIX and knows nothing about Python, torch or Ray.
 *
 * Conventions:
 * - Every function that can fail returns 0 on success or a negative zc error code
 *   (ZC_E*), or -errno for a failed POSIX call.  zc_strerror() names any of them.
 * - Buffers come in (dst, dst_cap) and (src, src_size) pairs.
 * - All multi-byte integers in an arena are little-endian.
 */
#ifndef ZEROCOPY_ZC_H
#define ZEROCOPY_ZC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define ZC_API __attribute__((visibility("default")))
#else
#define ZC_API
#endif

/* ---- format constants -------------------------------------------------- */

#define ZC_MAGIC "RZCARENA"          /* 8 bytes, no terminator in the arena. */
#define ZC_FORMAT_VERSION 1u
#define ZC_HEADER_SIZE 128u          /* Fixed size of the arena header. */
#define ZC_STORAGE_ALIGN 64u         /* Every storage starts at a multiple of this. */
#define ZC_DATA_ALIGN 4096u          /* The data region starts at a multiple of this. */
#define ZC_STORAGE_ENTRY_SIZE 16u    /* Bytes per storage table entry. */
#define ZC_TENSOR_ENTRY_SIZE 32u     /* Bytes per tensor table entry. */
#define ZC_MAX_NDIM 32u              /* Largest tensor rank an arena may hold. */
#define ZC_MAX_NAME 4096u            /* Longest tensor name, in bytes. */

/* Tensor kinds (tensor entry byte 14). */
enum { ZC_KIND_PARAMETER = 0, ZC_KIND_BUFFER = 1, ZC_KIND_OTHER = 2 };

/* Tensor flags (tensor entry byte 15). */
#define ZC_TFLAG_PERSISTENT 0x01u    /* A buffer that belongs in state_dict(). */
#define ZC_TFLAG_REQUIRES_GRAD 0x02u /* requires_grad of the original tensor. */
#define ZC_TFLAG_MASK 0x03u

/* Header flags (header offset 12). */
#define ZC_FLAG_NO_DATA_CRC 0x01u    /* No data checksum was computed when the arena was written:
                                      * data_crc is 0 and zc_verify_data() returns ZC_ENODATACRC. */
#define ZC_FLAG_MASK 0x01u

/* dtype codes (tensor entry byte 12).  The element size of each is fixed. */
enum {
    ZC_DT_BOOL = 1,
    ZC_DT_UINT8 = 2,
    ZC_DT_INT8 = 3,
    ZC_DT_INT16 = 4,
    ZC_DT_INT32 = 5,
    ZC_DT_INT64 = 6,
    ZC_DT_FLOAT16 = 7,
    ZC_DT_BFLOAT16 = 8,
    ZC_DT_FLOAT32 = 9,
    ZC_DT_FLOAT64 = 10,
    ZC_DT_COMPLEX32 = 11,
    ZC_DT_COMPLEX64 = 12,
    ZC_DT_COMPLEX128 = 13,
    ZC_DT_UINT16 = 14,
    ZC_DT_UINT32 = 15,
    ZC_DT_UINT64 = 16,
    ZC_DT_FLOAT8_E4M3FN = 17,
    ZC_DT_FLOAT8_E5M2 = 18,
    ZC_DT_FLOAT8_E4M3FNUZ = 19,
    ZC_DT_FLOAT8_E5M2FNUZ = 20,
    ZC_DT_FLOAT8_E8M0FNU = 21,
    ZC_DT_FLOAT4_E2M1FN_X2 = 22,
    ZC_DT_MAX_ = 22
};

/* ---- error codes -------------------------------------------------------- */

/* Error codes; -errno values (POSIX failures) are also possible returns. */
enum {
    ZC_OK = 0,
    ZC_EINVAL = -1000,     /* Invalid argument from the caller (not from arena bytes). */
    ZC_ETRUNCATED = -1001, /* The buffer is shorter than the arena claims. */
    ZC_EMAGIC = -1002,     /* Wrong magic bytes: not an arena. */
    ZC_EVERSION = -1003,   /* Unsupported format version. */
    ZC_EHEADER = -1004,    /* A header field is inconsistent. */
    ZC_EMANIFEST = -1005,  /* A manifest entry is inconsistent. */
    ZC_ESTORAGE = -1006,   /* A storage is misaligned, out of range, overlapping or leaves a hole. */
    ZC_ETENSOR = -1007,    /* A tensor's dtype, shape, strides or offset are out of range. */
    ZC_ECHECKSUM = -1008,  /* A CRC32C does not match. */
    ZC_EOVERFLOW = -1009,  /* A size computation overflows 64 bits. */
    ZC_ENOMEM = -1010,     /* Allocation failed. */
    ZC_ETOOBIG = -1011,    /* A count or size exceeds a format limit. */
    ZC_ENODATACRC = -1012, /* The arena carries no data checksum (ZC_FLAG_NO_DATA_CRC). */
    ZC_ECODE_MIN_ = -1011
};

/* Returns the symbolic name of a code ("ZC_ECHECKSUM", "EINVAL" for -EINVAL,...). Never NULL. */
ZC_API const char *zc_error_name(int code);
/* Returns a one-sentence description of a code.  Never NULL; static storage. */
ZC_API const char *zc_strerror(int code);

/* ---- dtypes ------------------------------------------------------------- */

/* Returns the element size in bytes of a dtype code, or 0 for an unknown code. */
ZC_API size_t zc_dtype_size(unsigned code);
/* Returns the canonical name of a dtype code ("float32", ...), or NULL if unknown. */
ZC_API const char *zc_dtype_name(unsigned code);

/* ---- CRC32C ------------------------------------------------------------- */

/* Extends crc (0 to start) with len bytes of buf; CRC32C (Castagnoli), as in iSCSI.
 * Uses the SSE4.2 instruction where the CPU has it, the portable table otherwise. */
ZC_API uint32_t zc_crc32c(uint32_t crc, const void *buf, size_t len);
/* The portable implementation, always available (for tests). */
ZC_API uint32_t zc_crc32c_portable(uint32_t crc, const void *buf, size_t len);
/* Returns "sse4.2" or "portable": what zc_crc32c uses on this CPU. */
ZC_API const char *zc_crc32c_impl(void);
/* CRC32C of len bytes using up to nthreads threads (blocks combined exactly). */
ZC_API uint32_t zc_crc32c_mt(const void *buf, size_t len, int nthreads);

/* ---- layout and writing ------------------------------------------------- */

/* One tensor as the writer describes it.  shape and stride point to ndim values. */
typedef struct zc_tensor_desc {
    const char *name;       /* UTF-8, not necessarily NUL-terminated. */
    uint32_t name_len;      /* Bytes in name, <= ZC_MAX_NAME. */
    uint32_t storage_index; /* Index into the storage table. */
    uint8_t dtype;          /* ZC_DT_* */
    uint8_t ndim;           /* <= ZC_MAX_NDIM */
    uint8_t kind;           /* ZC_KIND_* */
    uint8_t flags;          /* ZC_TFLAG_* */
    uint64_t storage_offset;/* In elements of dtype, from the start of the storage. */
    const int64_t *shape;   /* ndim sizes, each >= 0. */
    const int64_t *stride;  /* ndim strides in elements, each >= 0. */
} zc_tensor_desc;

/* A planned arena: where everything goes.  Filled by zc_plan(). */
typedef struct zc_plan_t {
    uint64_t manifest_offset; /* Always ZC_HEADER_SIZE. */
    uint64_t manifest_size;
    uint64_t data_offset;     /* Multiple of ZC_DATA_ALIGN. */
    uint64_t data_size;
    uint64_t total_size;      /* data_offset + data_size. */
    uint32_t n_storages;
    uint32_t n_tensors;
    uint32_t n_dims;          /* Number of int64 values in the dims table. */
    uint32_t strings_size;
} zc_plan_t;

/* Plans an arena for n_storages storages of the given byte sizes and n_tensors tensors.
 * Writes each storage's offset relative to the data region into storage_offsets
 * (caller-allocated, n_storages entries) and the totals into *plan.
 * Every tensor is checked as the validator would check it (dtype, rank, extent inside
 * its storage): a plan that succeeds yields an arena that validates.
 * Returns 0, ZC_EINVAL, ZC_ETENSOR, ZC_ETOOBIG or ZC_EOVERFLOW; on failure writes a
 * NUL-terminated message naming the tensor or storage into msg (msg_cap bytes, may be 0). */
ZC_API int zc_plan(const uint64_t *storage_sizes, uint32_t n_storages,
                   const zc_tensor_desc *tensors, uint32_t n_tensors,
                   uint64_t *storage_offsets, zc_plan_t *plan, char *msg, size_t msg_cap);

/* Writes the header and manifest of a planned arena into dst (dst_cap >= plan->total_size)
 * and zeroes the padding between the manifest and the data region and between storages.
 * The data region's storage bytes are not touched; the data CRC and header CRC are written
 * by zc_finalize() once the data is in place.  Returns 0 or ZC_EINVAL. */
ZC_API int zc_write_manifest(void *dst, size_t dst_cap, const zc_plan_t *plan,
                             const uint64_t *storage_sizes, const uint64_t *storage_offsets,
                             const zc_tensor_desc *tensors);

/* Writes the first plan->data_offset bytes of a planned arena into dst (dst_cap >=
 * plan->data_offset): header, manifest and the zero padding up to the data region, complete
 * and final, for an arena whose data region is written by someone else (Ray's object store
 * copies it from the tensors).  The header carries ZC_FLAG_NO_DATA_CRC and a data_crc of 0;
 * the manifest and header CRCs are written.  Nothing past data_offset is touched.
 * Returns 0 or ZC_EINVAL. */
ZC_API int zc_write_header(void *dst, size_t dst_cap, const zc_plan_t *plan,
                           const uint64_t *storage_sizes, const uint64_t *storage_offsets,
                           const zc_tensor_desc *tensors);

/* One copy of a gather: n bytes from src to dst. */
typedef struct zc_copy {
    void *dst;
    const void *src;
    size_t n;
} zc_copy;

/* Performs n_copies copies on up to nthreads threads (nthreads <= 0: one per online CPU,
 * at most 16).  Large copies are split so the threads share the bytes evenly.
 * The regions must not overlap.  Returns 0, ZC_EINVAL or -errno if a thread fails to start
 * (the copies are then completed on the calling thread). */
ZC_API int zc_gather(const zc_copy *copies, size_t n_copies, int nthreads);

/* Computes the data region's CRC32C and then the header CRC, and stores both in the arena.
 * The header and manifest must already be written.  Returns 0 or a validation error. */
ZC_API int zc_finalize(void *arena, size_t arena_size, int nthreads);

/* ---- reading ------------------------------------------------------------ */

/* Header fields of a validated arena. */
typedef struct zc_arena_info {
    uint32_t version;
    uint32_t flags;
    uint64_t manifest_offset, manifest_size;
    uint64_t data_offset, data_size;
    uint64_t total_size;
    uint32_t n_storages, n_tensors, n_dims, strings_size;
    uint32_t manifest_crc, data_crc, header_crc;
} zc_arena_info;

/* One storage as read from a validated arena; offset is relative to the arena start. */
typedef struct zc_storage_info {
    uint64_t offset;
    uint64_t length;
} zc_storage_info;

/* One tensor as read from a validated arena.  name/shape/stride point into the arena
 * (shape and stride are little-endian int64 arrays, possibly unaligned: use zc_dim()). */
typedef struct zc_tensor_info {
    const char *name;
    uint32_t name_len;
    uint32_t storage_index;
    uint8_t dtype, ndim, kind, flags;
    uint64_t storage_offset;       /* Elements. */
    uint64_t byte_offset;          /* Offset of element 0 from the arena start. */
    uint64_t extent;               /* Bytes from element 0 to the end of the last element (0 if empty). */
    const unsigned char *dims;     /* 2*ndim little-endian int64: shape then stride. */
} zc_tensor_info;

/* Returns dimension i of a tensor: i < ndim gives shape[i], ndim <= i < 2*ndim gives stride[i-ndim],
 * and any other i gives 0. */
ZC_API int64_t zc_dim(const zc_tensor_info *t, unsigned i);

/* Validates size bytes at buf as an untrusted arena: header fields and header CRC, manifest
 * CRC, every storage (alignment, bounds, order, no overlap, no hole beyond padding) and every
 * tensor (dtype, rank, shape, strides and offset inside its storage, name bounds), with
 * overflow-checked arithmetic.  Does not read the data region (see zc_verify_data).
 * Never reads outside [buf, buf+size).  On success fills *info (may be NULL) and returns 0.
 * On failure returns a negative code and writes a NUL-terminated message naming the field
 * into msg (msg_cap bytes, may be 0). */
ZC_API int zc_validate(const void *buf, size_t size, zc_arena_info *info, char *msg, size_t msg_cap);

/* Reads storage i / tensor i of an arena that zc_validate() accepted.  Returns 0 or ZC_EINVAL. */
ZC_API int zc_get_storage(const void *buf, size_t size, uint32_t i, zc_storage_info *out);
ZC_API int zc_get_tensor(const void *buf, size_t size, uint32_t i, zc_tensor_info *out);

/* Recomputes the data region's CRC32C (nthreads as in zc_gather) and compares it with the
 * header.  Returns 0, ZC_ECHECKSUM, ZC_ENODATACRC (the header has ZC_FLAG_NO_DATA_CRC: there is
 * nothing to compare with), or a validation error. */
ZC_API int zc_verify_data(const void *buf, size_t size, int nthreads);

/* ---- memory management of a mapping ------------------------------------ */

/* Returns the system page size. */
ZC_API size_t zc_page_size(void);

/* Populates the page tables for [addr, addr+len) for reading, on up to nthreads threads,
 * using MADV_POPULATE_READ where the kernel has it and touching one byte per page otherwise.
 * Returns 0 or -errno. */
ZC_API int zc_populate(const void *addr, size_t len, int nthreads);

/* Makes the page-aligned interior of [addr, addr+len) read-only (mprotect PROT_READ) and
 * registers it, with the names and byte ranges of the tensors in it, for the fault handler.
 * ranges holds n triples (start address, length, name); names are copied.
 * *out_id receives a handle for zc_unprotect.  If the interior is empty nothing is protected
 * and 0 is returned with *out_id = 0.  Protections may overlap (the same arena mapped twice).
 * The registry holds a fixed number of protections; ZC_ENOMEM also means it is full.
 * Returns 0, ZC_ENOMEM, ZC_EINVAL or -errno. */
typedef struct zc_named_range {
    uintptr_t start;
    size_t len;
    const char *name;
    uint32_t name_len;
} zc_named_range;
ZC_API int zc_protect(void *addr, size_t len, const zc_named_range *ranges, size_t n, uint64_t *out_id);

/* Restores PROT_READ|PROT_WRITE on exactly the pages zc_protect(id) protected, except pages that
 * another active protection still covers, and forgets them.  id 0 (nothing was protected) is
 * accepted and does nothing.  Returns 0, ZC_EINVAL (unknown id) or -errno. */
ZC_API int zc_unprotect(uint64_t id);

/* Installs (once, idempotent) a SIGSEGV/SIGBUS handler that, for a fault at an address inside
 * a protected range, writes "ray_zerocopy: write to shared read-only weight '<name>' ..." to
 * stderr (async-signal-safe) and re-raises the signal with the previous disposition; faults
 * elsewhere go to the previous handler unchanged.  Returns 0 or -errno. */
ZC_API int zc_install_fault_handler(void);

/* Writes into msg (msg_cap bytes, NUL-terminated, may be 0) the name of the tensor registered at
 * addr, or "" if addr is protected but in no tensor's range.  Async-signal-safe lookups back it.
 * Returns 1 if addr is in a protected range, 0 otherwise. */
ZC_API int zc_describe_address(uintptr_t addr, char *msg, size_t msg_cap);

/* ---- persistent thread pool and chunked copies (pool.c) ----------------- */

/* Largest number of threads a pool may have. */
#define ZC_POOL_MAX_THREADS 64

/* A fixed set of threads that run the parts of one job at a time (opaque). */
typedef struct zc_pool zc_pool;

/* Creates a pool of nthreads participants (nthreads <= 0: one per online CPU; at most
 * ZC_POOL_MAX_THREADS): the thread calling zc_pool_run is one of them, so nthreads - 1 worker
 * threads are started, once.  An idle worker polls for new work for spin_us microseconds
 * (0 to 1,000,000; 0: it sleeps at once) before it sleeps.  On success stores the pool in *out
 * and returns 0; otherwise returns ZC_EINVAL, ZC_ENOMEM or -errno of a failed thread start
 * (the threads already started are stopped) and stores NULL. */
ZC_API int zc_pool_create(int nthreads, int spin_us, zc_pool **out);

/* Stops and joins the workers and frees the pool (NULL is accepted).  No run may be in progress.
 * In a child process after fork(), which has none of the workers, only the memory is freed. */
ZC_API void zc_pool_destroy(zc_pool *pool);

/* Returns the number of participants of a pool (1 for NULL). */
ZC_API int zc_pool_size(const zc_pool *pool);

/* Runs fn(arg, part) for every part in [0, nparts) on the pool's threads and the calling thread,
 * and returns when every part has finished.  Parts are claimed one at a time, so nparts may
 * exceed the pool's size.  Runs from several threads on one pool take turns.  The parts run on
 * the calling thread alone, in order, when pool is NULL, when called from inside a part of the
 * same pool (no deadlock), and in a child process after fork().  Returns 0, or ZC_EINVAL if fn
 * is NULL. */
ZC_API int zc_pool_run(zc_pool *pool, int nparts, void (*fn)(void *arg, int part), void *arg);

/* Store modes of zc_pool_copy. */
enum {
    ZC_COPY_PLAIN = 0, /* memcpy. */
    ZC_COPY_NT = 1,    /* Non-temporal (streaming) stores where compiled in, else memcpy. */
    ZC_COPY_AUTO = 2   /* Non-temporal stores for parts of at least 256 KiB, memcpy for others. */
};

/* Returns 1 if non-temporal stores are compiled in (x86-64), 0 if ZC_COPY_NT means memcpy. */
ZC_API int zc_nt_stores_available(void);

/* Copies n bytes from src to dst on the pool (NULL: on the calling thread), split into up to
 * nparts parts (nparts <= 0: the pool's size; never parts under 64 KiB) whose boundaries lie
 * on 64-byte lines of dst, so no two threads write one cache line.  mode is a ZC_COPY_* value.
 * No alignment is required.  Returns 0, or ZC_EINVAL for a NULL pointer with n > 0, an unknown
 * mode, a range that wraps around, or overlapping regions. */
ZC_API int zc_pool_copy(zc_pool *pool, void *dst, const void *src, size_t n, int nparts, int mode);

/* ---- arena files (file.c) ------------------------------------------------ */

/* An arena file (docs/format.md, "Arena files") holds one pipeline: a 128-byte file header, a
 * metadata blob (UTF-8 JSON, opaque to the core), the skeleton (opaque bytes: a pickle that only
 * trusted input may be unpickled from), zero padding, and an arena (the format above) starting at
 * a multiple of ZC_FILE_ARENA_ALIGN, so that a mapping of the whole file has a page-aligned data
 * region. Every integer is little-endian. */
#define ZC_FILE_MAGIC "RZCAFILE"     /* 8 bytes, no terminator in the file. */
#define ZC_FILE_VERSION 1u
#define ZC_FILE_HEADER_SIZE 128u     /* Fixed size of the file header. */
#define ZC_FILE_ARENA_ALIGN 4096u    /* The arena starts at a multiple of this. */
#define ZC_FILE_MAX_META (16u << 20) /* Largest metadata blob, in bytes. */

/* The fields of a file header, and of the arena inside a file that zc_file_validate() accepted.
 * Offsets are from the start of the file. */
typedef struct zc_file_info {
    uint32_t version;
    uint32_t flags;
    uint64_t meta_offset, meta_size;         /* meta_offset is ZC_FILE_HEADER_SIZE. */
    uint64_t skeleton_offset, skeleton_size; /* skeleton_offset is meta_offset + meta_size. */
    uint64_t arena_offset, arena_size;       /* arena_offset: the skeleton's end rounded up to 4096. */
    uint64_t file_size;                      /* arena_offset + arena_size. */
    uint32_t meta_crc, skeleton_crc, header_crc;
    zc_arena_info arena;                     /* Header fields of the arena (zc_validate). */
} zc_file_info;

/* Computes where the parts of a file with the given section sizes go, into *out (its offset and
 * size fields; CRCs and arena fields are zeroed).  Returns 0, ZC_ETOOBIG (meta_size over
 * ZC_FILE_MAX_META) or ZC_EOVERFLOW. */
ZC_API int zc_file_plan(uint64_t meta_size, uint64_t skeleton_size, uint64_t arena_size, zc_file_info *out);

/* Writes the ZC_FILE_HEADER_SIZE-byte header of a file holding meta (meta_size bytes), skeleton
 * (skeleton_size bytes) and an arena of arena_size bytes into dst (dst_cap >= ZC_FILE_HEADER_SIZE),
 * with the CRC32C of meta and skeleton and the header CRC.  The caller writes the sections at the
 * offsets zc_file_plan() gives, with zero bytes between the skeleton and the arena.
 * Returns 0, ZC_EINVAL, ZC_ETOOBIG or ZC_EOVERFLOW. */
ZC_API int zc_file_write_header(void *dst, size_t dst_cap, const void *meta, size_t meta_size,
                                const void *skeleton, size_t skeleton_size, uint64_t arena_size);

/* Validates size bytes at buf as an untrusted arena file (the whole file): header fields and
 * header CRC, section offsets (overflow-checked), the file's exact size, the metadata and
 * skeleton CRCs, the zero padding, then the arena with zc_validate() (whose total_size must equal
 * arena_size).  Does not read the arena's data region.  Never reads outside [buf, buf+size).
 * On success fills *info (may be NULL) and returns 0; on failure returns a negative code
 * (ZC_ETRUNCATED, ZC_EMAGIC, ZC_EVERSION, ZC_EHEADER, ZC_ECHECKSUM, ZC_ETOOBIG, ZC_EOVERFLOW, or
 * an arena code) and writes a NUL-terminated message naming the field into msg (msg_cap bytes,
 * may be 0); messages about the arena start with "arena: ". */
ZC_API int zc_file_validate(const void *buf, size_t size, zc_file_info *info, char *msg, size_t msg_cap);

/* Stores data_crc as the data checksum of the arena whose header is the first header_size bytes
 * at arena (header_size >= ZC_HEADER_SIZE): clears ZC_FLAG_NO_DATA_CRC, writes data_crc and the
 * header CRC.  For a writer that computed the CRC32C of the data region while streaming it (an
 * arena file is written part by part).  Nothing else is checked or changed.
 * Returns 0, ZC_EINVAL or ZC_EMAGIC (not an arena header). */
ZC_API int zc_set_data_crc(void *arena, size_t header_size, uint32_t data_crc);

/* ---- dtype conversion (convert.c) ---------------------------------------------------- */

/* Returns 1 if zc_convert() and lazy regions convert src_dtype elements to dst_dtype: both are
 * among float16 (where the compiler has _Float16), bfloat16, float32 and float64. */
ZC_API int zc_convert_supported(unsigned dst_dtype, unsigned src_dtype);

/* Converts n elements from src (src_dtype) to dst (dst_dtype) as torch's Tensor.to() does on the
 * CPU (round to nearest even; float64 reaches 16-bit types through float32; NaN stays NaN).
 * No alignment is required; the buffers must not overlap.  Returns 0 or ZC_EINVAL. */
ZC_API int zc_convert(void *dst, unsigned dst_dtype, const void *src, unsigned src_dtype, size_t n);

/* One run of converted elements in a lazy region: count elements of src_dtype at src become
 * count elements of the region's dtype at dst_offset (a multiple of that dtype's size). */
typedef struct zc_convert_seg {
    const void *src;
    uint64_t dst_offset;
    uint64_t count;
    uint32_t src_dtype;
} zc_convert_seg;

typedef struct zc_lazy_stats {
    uint64_t fills;         /* Chunks converted (a chunk evicted and read again counts again). */
    uint64_t evictions;     /* Chunks dropped to keep the window. */
    uint32_t peak_resident; /* Most chunks resident at once (<= max_chunks). */
    uint32_t resident;      /* Chunks resident now. */
    uint64_t chunk;         /* Bytes per chunk. */
    uint32_t max_chunks;    /* The window, in chunks. */
    uint64_t n_chunks;      /* Chunks in the region. */
} zc_lazy_stats;

/* A read-only region of size bytes whose content is its segments' source elements converted to
 * dst_dtype (zeros between them), made on first read a chunk (chunk bytes, a multiple of the
 * page size) at a time, with at most max_chunks chunks resident: the process holds a window,
 * never the whole.  Reads fault into the core's fault handler, which this call installs (or
 * puts back on top if something replaced it).  The sources must stay mapped and unchanged until
 * zc_lazy_destroy(); writes to the region are not allowed.  Linux only (memfd).  At most 64
 * regions exist at once.  Returns 0, ZC_EINVAL (a bad size, chunk, dtype pair, a segment out of
 * range or overlapping another), ZC_ENOMEM, ZC_EOVERFLOW, ZC_ETOOBIG or -errno. */
typedef struct zc_lazy zc_lazy;
ZC_API int zc_lazy_create(const zc_convert_seg *segs, size_t n_segs, unsigned dst_dtype,
                          size_t size, size_t chunk, unsigned max_chunks, zc_lazy **out);

/* The region's first byte and its size (NULL / 0 for NULL). */
ZC_API const void *zc_lazy_data(const zc_lazy *z);
ZC_API size_t zc_lazy_size(const zc_lazy *z);

/* Copies the region's counters into *out. */
ZC_API void zc_lazy_get_stats(const zc_lazy *z, zc_lazy_stats *out);

/* Unmaps and frees a region (NULL is accepted).  No thread may be reading it. */
ZC_API void zc_lazy_destroy(zc_lazy *z);

/* Counters over every lazy region of the process. */
typedef struct zc_lazy_totals {
    uint64_t regions_created, regions_alive;
    uint64_t fills, evictions;
    uint64_t resident_bytes;      /* Chunks resident now, in bytes, over all regions. */
    uint64_t peak_resident_bytes; /* The most resident_bytes has been (since the last reset). */
} zc_lazy_totals;

/* Copies the totals into *out; with reset_peak, then starts peak_resident_bytes again from
 * resident_bytes. */
ZC_API void zc_lazy_get_totals(zc_lazy_totals *out, int reset_peak);

#ifdef __cplusplus
}
#endif
#endif /* ZEROCOPY_ZC_H */
