/*
 * file.c - arena files: a file header, a metadata blob, the skeleton and an arena, in one file
 * (docs/format.md, "Arena files").  Writing the header, validating untrusted files, and storing a
 * streamed data checksum in an arena header.
 */
#include "internal.h"

#define LLU(x) ((unsigned long long)(x))

/* File header field offsets (docs/format.md, "File header"). */
#define F_MAGIC 0u
#define F_VERSION 8u
#define F_FLAGS 12u
#define F_HEADER_SIZE 16u
#define F_ARENA_ALIGN 20u
#define F_META_OFFSET 24u
#define F_META_SIZE 32u
#define F_SKELETON_OFFSET 40u
#define F_SKELETON_SIZE 48u
#define F_ARENA_OFFSET 56u
#define F_ARENA_SIZE 64u
#define F_FILE_SIZE 72u
#define F_META_CRC 80u
#define F_SKELETON_CRC 84u
#define F_HEADER_CRC 88u
#define F_RESERVED 92u
#define F_RESERVED_SIZE 36u

int zc_file_plan(uint64_t meta_size, uint64_t skeleton_size, uint64_t arena_size, zc_file_info *out) {
    zc_file_info f;
    uint64_t end;

    if (!out) return ZC_EINVAL;
    memset(&f, 0, sizeof f);
    if (meta_size > ZC_FILE_MAX_META) return ZC_ETOOBIG;
    f.version = ZC_FILE_VERSION;
    f.meta_offset = ZC_FILE_HEADER_SIZE;
    f.meta_size = meta_size;
    f.skeleton_offset = ZC_FILE_HEADER_SIZE + meta_size; /* meta_size <= 16 MiB: no overflow. */
    f.skeleton_size = skeleton_size;
    f.arena_size = arena_size;
    if (zc__add64(f.skeleton_offset, skeleton_size, &end) || zc__align_up64(end, ZC_FILE_ARENA_ALIGN, &f.arena_offset) ||
        zc__add64(f.arena_offset, arena_size, &f.file_size))
        return ZC_EOVERFLOW;
    *out = f;
    return 0;
}

int zc_file_write_header(void *dst, size_t dst_cap, const void *meta, size_t meta_size, const void *skeleton,
                         size_t skeleton_size, uint64_t arena_size) {
    unsigned char *h = (unsigned char *)dst;
    zc_file_info f;
    int rc;

    if (!dst || dst_cap < ZC_FILE_HEADER_SIZE || (meta_size && !meta) || (skeleton_size && !skeleton))
        return ZC_EINVAL;
    rc = zc_file_plan(meta_size, skeleton_size, arena_size, &f);
    if (rc) return rc;
    memset(h, 0, ZC_FILE_HEADER_SIZE);
    memcpy(h + F_MAGIC, ZC_FILE_MAGIC, 8);
    zc__wr32(h + F_VERSION, ZC_FILE_VERSION);
    zc__wr32(h + F_FLAGS, 0);
    zc__wr32(h + F_HEADER_SIZE, ZC_FILE_HEADER_SIZE);
    zc__wr32(h + F_ARENA_ALIGN, ZC_FILE_ARENA_ALIGN);
    zc__wr64(h + F_META_OFFSET, f.meta_offset);
    zc__wr64(h + F_META_SIZE, f.meta_size);
    zc__wr64(h + F_SKELETON_OFFSET, f.skeleton_offset);
    zc__wr64(h + F_SKELETON_SIZE, f.skeleton_size);
    zc__wr64(h + F_ARENA_OFFSET, f.arena_offset);
    zc__wr64(h + F_ARENA_SIZE, f.arena_size);
    zc__wr64(h + F_FILE_SIZE, f.file_size);
    zc__wr32(h + F_META_CRC, zc_crc32c(0, meta, meta_size));
    zc__wr32(h + F_SKELETON_CRC, zc_crc32c(0, skeleton, skeleton_size));
    zc__wr32(h + F_HEADER_CRC, zc_crc32c(0, h, F_HEADER_CRC));
    return 0;
}

/* Checks the header fields that need nothing past the header (steps 1 and 2 of the reader). */
static int validate_file_header(const unsigned char *h, size_t size, zc_file_info *f, char *msg, size_t cap) {
    uint32_t v, crc;
    zc_file_info want;
    int rc;

    if (size < ZC_FILE_HEADER_SIZE)
        return zc__fail(ZC_ETRUNCATED, msg, cap, "file is %zu bytes, shorter than the %u-byte file header", size,
                        ZC_FILE_HEADER_SIZE);
    if (memcmp(h + F_MAGIC, ZC_FILE_MAGIC, 8) != 0)
        return zc__fail(ZC_EMAGIC, msg, cap, "file header: bad magic (not a ray_zerocopy arena file)");
    v = zc__rd32(h + F_VERSION);
    if (v != ZC_FILE_VERSION)
        return zc__fail(ZC_EVERSION, msg, cap, "file header: version %u is not supported (expected %u)", v,
                        ZC_FILE_VERSION);
    if ((v = zc__rd32(h + F_FLAGS)) != 0)
        return zc__fail(ZC_EHEADER, msg, cap, "file header: flags 0x%08x have unknown bits", v);
    if ((v = zc__rd32(h + F_HEADER_SIZE)) != ZC_FILE_HEADER_SIZE)
        return zc__fail(ZC_EHEADER, msg, cap, "file header: header_size is %u (expected %u)", v, ZC_FILE_HEADER_SIZE);
    if ((v = zc__rd32(h + F_ARENA_ALIGN)) != ZC_FILE_ARENA_ALIGN)
        return zc__fail(ZC_EHEADER, msg, cap, "file header: arena_align is %u (expected %u)", v, ZC_FILE_ARENA_ALIGN);
    for (unsigned i = 0; i < F_RESERVED_SIZE; i++)
        if (h[F_RESERVED + i] != 0)
            return zc__fail(ZC_EHEADER, msg, cap, "file header: reserved byte %u is not zero", F_RESERVED + i);
    v = zc__rd32(h + F_HEADER_CRC);
    crc = zc_crc32c(0, h, F_HEADER_CRC);
    if (v != crc)
        return zc__fail(ZC_ECHECKSUM, msg, cap,
                        "file header: header_crc 0x%08x does not match the header (computed 0x%08x)", v, crc);

    memset(f, 0, sizeof *f);
    f->version = ZC_FILE_VERSION;
    f->meta_offset = zc__rd64(h + F_META_OFFSET);
    f->meta_size = zc__rd64(h + F_META_SIZE);
    f->skeleton_offset = zc__rd64(h + F_SKELETON_OFFSET);
    f->skeleton_size = zc__rd64(h + F_SKELETON_SIZE);
    f->arena_offset = zc__rd64(h + F_ARENA_OFFSET);
    f->arena_size = zc__rd64(h + F_ARENA_SIZE);
    f->file_size = zc__rd64(h + F_FILE_SIZE);
    f->meta_crc = zc__rd32(h + F_META_CRC);
    f->skeleton_crc = zc__rd32(h + F_SKELETON_CRC);
    f->header_crc = v;

    if (f->meta_offset != ZC_FILE_HEADER_SIZE)
        return zc__fail(ZC_EHEADER, msg, cap, "file header: meta_offset is %llu (expected %u)", LLU(f->meta_offset),
                        ZC_FILE_HEADER_SIZE);
    if (f->meta_size > ZC_FILE_MAX_META)
        return zc__fail(ZC_ETOOBIG, msg, cap, "file header: meta_size %llu exceeds the limit of %u bytes",
                        LLU(f->meta_size), ZC_FILE_MAX_META);
    rc = zc_file_plan(f->meta_size, f->skeleton_size, f->arena_size, &want);
    if (rc)
        return zc__fail(ZC_EOVERFLOW, msg, cap,
                        "file header: skeleton_size %llu and arena_size %llu overflow 64 bits", LLU(f->skeleton_size),
                        LLU(f->arena_size));
    if (f->skeleton_offset != want.skeleton_offset)
        return zc__fail(ZC_EHEADER, msg, cap, "file header: skeleton_offset is %llu (expected %llu)",
                        LLU(f->skeleton_offset), LLU(want.skeleton_offset));
    if (f->arena_offset != want.arena_offset)
        return zc__fail(ZC_EHEADER, msg, cap, "file header: arena_offset is %llu (expected %llu)",
                        LLU(f->arena_offset), LLU(want.arena_offset));
    if (f->file_size != want.file_size)
        return zc__fail(ZC_EHEADER, msg, cap, "file header: file_size is %llu (expected %llu)", LLU(f->file_size),
                        LLU(want.file_size));
    return 0;
}

int zc_file_validate(const void *buf, size_t size, zc_file_info *info, char *msg, size_t msg_cap) {
    const unsigned char *h = (const unsigned char *)buf;
    zc_file_info f;
    uint32_t crc;
    uint64_t pad_start;
    char inner[512];
    int rc;

    if (msg && msg_cap) msg[0] = '\0';
    memset(&f, 0, sizeof f);
    if (!buf && size) return zc__fail(ZC_EINVAL, msg, msg_cap, "buffer is NULL");
    if (!buf)
        return zc__fail(ZC_ETRUNCATED, msg, msg_cap, "file is 0 bytes, shorter than the %u-byte header",
                        ZC_FILE_HEADER_SIZE);
    rc = validate_file_header(h, size, &f, msg, msg_cap);
    if (rc) return rc;

    /* Step 3: the file's size. */
    if ((uint64_t)size < f.file_size)
        return zc__fail(ZC_ETRUNCATED, msg, msg_cap, "file is %zu bytes but the header needs %llu (file_size): "
                        "truncated", size, LLU(f.file_size));
    if ((uint64_t)size > f.file_size)
        return zc__fail(ZC_EHEADER, msg, msg_cap, "file is %zu bytes, %llu more than its file_size %llu", size,
                        LLU((uint64_t)size - f.file_size), LLU(f.file_size));

    /* Step 4: metadata, skeleton, padding. */
    crc = zc_crc32c(0, h + f.meta_offset, (size_t)f.meta_size);
    if (crc != f.meta_crc)
        return zc__fail(ZC_ECHECKSUM, msg, msg_cap, "file: meta_crc 0x%08x does not match the metadata (computed 0x%08x)",
                        f.meta_crc, crc);
    crc = zc_crc32c(0, h + f.skeleton_offset, (size_t)f.skeleton_size);
    if (crc != f.skeleton_crc)
        return zc__fail(ZC_ECHECKSUM, msg, msg_cap,
                        "file: skeleton_crc 0x%08x does not match the skeleton (computed 0x%08x)", f.skeleton_crc, crc);
    pad_start = f.skeleton_offset + f.skeleton_size;
    for (uint64_t i = pad_start; i < f.arena_offset; i++)
        if (h[i] != 0)
            return zc__fail(ZC_EHEADER, msg, msg_cap, "file: padding byte %llu before the arena is not zero", LLU(i));

    /* Step 5: the arena. */
    rc = zc_validate(h + f.arena_offset, (size_t)f.arena_size, &f.arena, inner, sizeof inner);
    if (rc) return zc__fail(rc, msg, msg_cap, "arena: %s", inner);
    if (f.arena.total_size != f.arena_size)
        return zc__fail(ZC_EHEADER, msg, msg_cap, "file header: arena_size %llu differs from the arena's total_size %llu",
                        LLU(f.arena_size), LLU(f.arena.total_size));
    if (info) *info = f;
    return 0;
}

int zc_set_data_crc(void *arena, size_t header_size, uint32_t data_crc) {
    unsigned char *a = (unsigned char *)arena;

    if (!arena || header_size < ZC_HEADER_SIZE) return ZC_EINVAL;
    if (memcmp(a + ZC__H_MAGIC, ZC_MAGIC, 8) != 0) return ZC_EMAGIC;
    zc__wr32(a + ZC__H_FLAGS, zc__rd32(a + ZC__H_FLAGS) & ~ZC_FLAG_NO_DATA_CRC);
    zc__wr32(a + ZC__H_DATA_CRC, data_crc);
    zc__wr32(a + ZC__H_HEADER_CRC, zc_crc32c(0, a, ZC__H_HEADER_CRC));
    return 0;
}
