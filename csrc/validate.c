/*
 * validate.c - checking untrusted arena bytes, and reading a validated arena.
 *
 * The checks follow docs/format.md, "What a reader checks", in its order.  No byte outside
 * [buf, buf+size) is read: the header is read only once the size covers it, and the manifest
 * only once the header's sizes are consistent and covered.
 */
#include <stdio.h>

#include "internal.h"

#define LLU(x) ((unsigned long long)(x))

/* Fails with a message prefixed by "tensor <i> ('<name>'): ". */
__attribute__((format(printf, 5, 6))) static int tensor_fail(const zc__tensor_fields *t, int code, char *msg,
                                                              size_t msg_cap, const char *fmt, ...) {
    char q[112];
    int n;
    if (!msg || msg_cap == 0) return code;
    zc__quote_name(q, sizeof q, t->name, t->name ? t->name_len : 0);
    n = snprintf(msg, msg_cap, "tensor %u ('%s'): ", t->index, q);
    if (n >= 0 && (size_t)n < msg_cap) {
        va_list ap;
        va_start(ap, fmt);
        (void)vsnprintf(msg + n, msg_cap - (size_t)n, fmt, ap);
        va_end(ap);
    }
    return code;
}

int zc__check_tensor(const zc__tensor_fields *t, uint32_t n_storages, const uint64_t *storage_sizes,
                     const unsigned char *storage_table, uint64_t *start, uint64_t *extent, char *msg,
                     size_t msg_cap) {
    size_t itemsize = zc_dtype_size(t->dtype);
    uint64_t len, first, last, ext;
    int empty = 0;

    if (t->name_len > ZC_MAX_NAME)
        return tensor_fail(t, ZC_ETOOBIG, msg, msg_cap, "name_len %u exceeds the limit of %u", t->name_len,
                           ZC_MAX_NAME);
    if (t->storage_index >= n_storages)
        return tensor_fail(t, ZC_ETENSOR, msg, msg_cap, "storage_index %u is out of range (%u storages)",
                           t->storage_index, n_storages);
    if (itemsize == 0) return tensor_fail(t, ZC_ETENSOR, msg, msg_cap, "dtype code %u is unknown", t->dtype);
    if (t->ndim > ZC_MAX_NDIM)
        return tensor_fail(t, ZC_ETOOBIG, msg, msg_cap, "ndim %u exceeds the limit of %u", t->ndim, ZC_MAX_NDIM);
    if (t->kind > ZC_KIND_OTHER)
        return tensor_fail(t, ZC_ETENSOR, msg, msg_cap, "kind %u is not 0, 1 or 2", t->kind);
    if (t->flags & ~ZC_TFLAG_MASK)
        return tensor_fail(t, ZC_ETENSOR, msg, msg_cap, "flags 0x%02x has unknown bits", t->flags);
    for (unsigned i = 0; i < 2 * t->ndim; i++) {
        int64_t v = t->get(t->dims, i);
        if (v < 0)
            return tensor_fail(t, ZC_ETENSOR, msg, msg_cap, "%s[%u] is negative (%lld)",
                               i < t->ndim ? "size" : "stride", i < t->ndim ? i : i - t->ndim, (long long)v);
        if (i < t->ndim && v == 0) empty = 1;
    }

    len = storage_sizes ? storage_sizes[t->storage_index]
                        : zc__rd64(storage_table + (size_t)ZC_STORAGE_ENTRY_SIZE * t->storage_index + 8);
    if (zc__mul64(t->storage_offset, itemsize, &first))
        return tensor_fail(t, ZC_EOVERFLOW, msg, msg_cap, "storage_offset %llu overflows 64 bits in bytes",
                           LLU(t->storage_offset));
    if (empty) {
        if (first > len)
            return tensor_fail(t, ZC_ETENSOR, msg, msg_cap,
                               "storage_offset %llu (byte %llu) lies past storage %u length %llu",
                               LLU(t->storage_offset), LLU(first), t->storage_index, LLU(len));
        ext = 0;
    } else {
        last = t->storage_offset;
        for (unsigned i = 0; i < t->ndim; i++) {
            uint64_t span;
            uint64_t size = (uint64_t)t->get(t->dims, i), stride = (uint64_t)t->get(t->dims, t->ndim + i);
            if (zc__mul64(size - 1, stride, &span) || zc__add64(last, span, &last))
                return tensor_fail(t, ZC_EOVERFLOW, msg, msg_cap, "extent overflows 64 bits (dim %u)", i);
        }
        if (zc__add64(last, 1, &last) || zc__mul64(last, itemsize, &ext))
            return tensor_fail(t, ZC_EOVERFLOW, msg, msg_cap, "extent overflows 64 bits");
        if (ext > len)
            return tensor_fail(t, ZC_ETENSOR, msg, msg_cap, "extent %llu bytes exceeds storage %u length %llu",
                               LLU(ext), t->storage_index, LLU(len));
    }
    *start = first;
    *extent = ext;
    return 0;
}

static int64_t arena_dim(const void *dims, unsigned i) {
    return (int64_t)zc__rd64((const unsigned char *)dims + (size_t)8 * i);
}

/* Offsets of the four manifest tables, from a header that validated. */
typedef struct tables {
    uint64_t storages, tensors, dims, strings;
} tables;

static void table_offsets(const unsigned char *a, tables *t) {
    uint64_t ns = zc__rd32(a + ZC__H_N_STORAGES), nt = zc__rd32(a + ZC__H_N_TENSORS);
    uint64_t nd = zc__rd32(a + ZC__H_N_DIMS);
    t->storages = ZC_HEADER_SIZE;
    t->tensors = t->storages + ZC_STORAGE_ENTRY_SIZE * ns;
    t->dims = t->tensors + ZC_TENSOR_ENTRY_SIZE * nt;
    t->strings = t->dims + 8u * nd;
}

static void tensor_entry_fields(const unsigned char *a, const tables *tb, uint32_t i, zc__tensor_fields *f) {
    const unsigned char *e = a + tb->tensors + (uint64_t)ZC_TENSOR_ENTRY_SIZE * i;
    f->index = i;
    f->name = (const char *)(a + tb->strings + zc__rd32(e + ZC__T_NAME_OFFSET));
    f->name_len = zc__rd32(e + ZC__T_NAME_LEN);
    f->storage_index = zc__rd32(e + ZC__T_STORAGE_INDEX);
    f->dtype = e[ZC__T_DTYPE];
    f->ndim = e[ZC__T_NDIM];
    f->kind = e[ZC__T_KIND];
    f->flags = e[ZC__T_FLAGS];
    f->storage_offset = zc__rd64(e + ZC__T_STORAGE_OFFSET);
    f->dims = a + tb->dims + 8u * (uint64_t)zc__rd32(e + ZC__T_DIMS_INDEX);
    f->get = arena_dim;
}

static int validate_header(const unsigned char *a, size_t size, char *msg, size_t cap) {
    static const struct {
        unsigned off;
        uint32_t value;
        const char *name;
    } fixed[] = {{ZC__H_HEADER_SIZE, ZC_HEADER_SIZE, "header_size"},
                 {ZC__H_STORAGE_ALIGN, ZC_STORAGE_ALIGN, "storage_align"},
                 {ZC__H_DATA_ALIGN, ZC_DATA_ALIGN, "data_align"}};
    uint32_t v, crc;
    uint64_t ns, nt, nd, ss, msize, doff, dsize, total, want;

    if (size < ZC_HEADER_SIZE)
        return zc__fail(ZC_ETRUNCATED, msg, cap, "buffer is %zu bytes, shorter than the %u-byte header", size,
                        ZC_HEADER_SIZE);
    if (memcmp(a + ZC__H_MAGIC, ZC_MAGIC, 8) != 0) return zc__fail(ZC_EMAGIC, msg, cap, "header: bad magic");
    v = zc__rd32(a + ZC__H_VERSION);
    if (v != ZC_FORMAT_VERSION)
        return zc__fail(ZC_EVERSION, msg, cap, "header: version %u is not supported (expected %u)", v,
                        ZC_FORMAT_VERSION);
    v = zc__rd32(a + ZC__H_FLAGS);
    if (v & ~ZC_FLAG_MASK) return zc__fail(ZC_EHEADER, msg, cap, "header: flags 0x%08x have unknown bits", v);
    if ((v & ZC_FLAG_NO_DATA_CRC) && zc__rd32(a + ZC__H_DATA_CRC) != 0)
        return zc__fail(ZC_EHEADER, msg, cap, "header: flags say no data checksum but data_crc is 0x%08x",
                        zc__rd32(a + ZC__H_DATA_CRC));
    if (zc__rd32(a + ZC__H_RESERVED0) != 0)
        return zc__fail(ZC_EHEADER, msg, cap, "header: reserved bytes [44, 48) are not zero");
    for (unsigned i = 0; i < ZC__H_RESERVED1_SIZE; i++)
        if (a[ZC__H_RESERVED1 + i] != 0)
            return zc__fail(ZC_EHEADER, msg, cap, "header: reserved byte %u is not zero", ZC__H_RESERVED1 + i);
    for (unsigned i = 0; i < sizeof fixed / sizeof fixed[0]; i++) {
        v = zc__rd32(a + fixed[i].off);
        if (v != fixed[i].value)
            return zc__fail(ZC_EHEADER, msg, cap, "header: %s is %u (expected %u)", fixed[i].name, v,
                            fixed[i].value);
    }
    v = zc__rd32(a + ZC__H_HEADER_CRC);
    crc = zc_crc32c(0, a, ZC__H_HEADER_CRC);
    if (v != crc)
        return zc__fail(ZC_ECHECKSUM, msg, cap, "header: header_crc 0x%08x does not match the header (computed 0x%08x)",
                        v, crc);

    /* Step 2: sizes and offsets. */
    if (zc__rd64(a + ZC__H_MANIFEST_OFFSET) != ZC_HEADER_SIZE)
        return zc__fail(ZC_EHEADER, msg, cap, "header: manifest_offset is %llu (expected %u)",
                        LLU(zc__rd64(a + ZC__H_MANIFEST_OFFSET)), ZC_HEADER_SIZE);
    ns = zc__rd32(a + ZC__H_N_STORAGES);
    nt = zc__rd32(a + ZC__H_N_TENSORS);
    nd = zc__rd32(a + ZC__H_N_DIMS);
    ss = zc__rd32(a + ZC__H_STRINGS_SIZE);
    want = ZC_STORAGE_ENTRY_SIZE * ns + ZC_TENSOR_ENTRY_SIZE * nt + 8u * nd + ss; /* < 2^38 */
    msize = zc__rd64(a + ZC__H_MANIFEST_SIZE);
    if (msize != want)
        return zc__fail(ZC_EHEADER, msg, cap, "header: manifest_size %llu does not match the table sizes (expected %llu)",
                        LLU(msize), LLU(want));
    (void)zc__align_up64(ZC_HEADER_SIZE + msize, ZC_DATA_ALIGN, &want); /* Cannot overflow: msize < 2^38. */
    doff = zc__rd64(a + ZC__H_DATA_OFFSET);
    if (doff != want)
        return zc__fail(ZC_EHEADER, msg, cap, "header: data_offset %llu is not where the layout puts it (expected %llu)",
                        LLU(doff), LLU(want));
    dsize = zc__rd64(a + ZC__H_DATA_SIZE);
    if (dsize % ZC_STORAGE_ALIGN != 0)
        return zc__fail(ZC_EHEADER, msg, cap, "header: data_size %llu is not a multiple of %u", LLU(dsize),
                        ZC_STORAGE_ALIGN);
    total = zc__rd64(a + ZC__H_TOTAL_SIZE);
    if (zc__add64(doff, dsize, &want) || total != want)
        return zc__fail(ZC_EHEADER, msg, cap, "header: total_size %llu is not data_offset + data_size", LLU(total));
    if ((uint64_t)size < total)
        return zc__fail(ZC_ETRUNCATED, msg, cap, "buffer is %zu bytes but the arena needs %llu (total_size)", size,
                        LLU(total));
    return 0;
}

int zc_validate(const void *buf, size_t size, zc_arena_info *info, char *msg, size_t msg_cap) {
    const unsigned char *a = (const unsigned char *)buf;
    tables tb;
    uint32_t ns, nt, nd, ss, crc, want_crc, name_run = 0, dims_run = 0;
    uint64_t msize, doff, dsize, expected = 0;
    int rc;

    if (msg && msg_cap) msg[0] = '\0';
    if (!a) return zc__fail(ZC_EINVAL, msg, msg_cap, "buffer is NULL");
    rc = validate_header(a, size, msg, msg_cap);
    if (rc) return rc;

    ns = zc__rd32(a + ZC__H_N_STORAGES);
    nt = zc__rd32(a + ZC__H_N_TENSORS);
    nd = zc__rd32(a + ZC__H_N_DIMS);
    ss = zc__rd32(a + ZC__H_STRINGS_SIZE);
    msize = zc__rd64(a + ZC__H_MANIFEST_SIZE);
    doff = zc__rd64(a + ZC__H_DATA_OFFSET);
    dsize = zc__rd64(a + ZC__H_DATA_SIZE);
    table_offsets(a, &tb);

    /* Step 3: manifest checksum and the zero padding before the data region. */
    want_crc = zc__rd32(a + ZC__H_MANIFEST_CRC);
    crc = zc_crc32c(0, a + ZC_HEADER_SIZE, (size_t)msize);
    if (crc != want_crc)
        return zc__fail(ZC_ECHECKSUM, msg, msg_cap,
                        "manifest: manifest_crc 0x%08x does not match the manifest (computed 0x%08x)", want_crc, crc);
    for (uint64_t p = ZC_HEADER_SIZE + msize; p < doff; p++)
        if (a[p] != 0)
            return zc__fail(ZC_EMANIFEST, msg, msg_cap, "manifest: padding byte at offset %llu is not zero", LLU(p));

    /* Step 4: storages follow the layout rule and lie inside the data region. */
    for (uint32_t i = 0; i < ns; i++) {
        const unsigned char *e = a + tb.storages + (uint64_t)ZC_STORAGE_ENTRY_SIZE * i;
        uint64_t off = zc__rd64(e), len = zc__rd64(e + 8), end;
        if (off != expected)
            return zc__fail(ZC_ESTORAGE, msg, msg_cap, "storage %u: offset %llu is not where the layout puts it (expected %llu)",
                            i, LLU(off), LLU(expected));
        if (zc__add64(off, len, &end) || end > dsize)
            return zc__fail(ZC_ESTORAGE, msg, msg_cap, "storage %u: offset %llu + length %llu exceeds data_size %llu", i,
                            LLU(off), LLU(len), LLU(dsize));
        (void)zc__align_up64(end, ZC_STORAGE_ALIGN, &expected); /* end <= dsize, a multiple of 64. */
    }
    if (expected != dsize)
        return zc__fail(ZC_EHEADER, msg, msg_cap,
                        "header: data_size %llu is not the end of the last storage rounded up to %u (%llu)", LLU(dsize),
                        ZC_STORAGE_ALIGN, LLU(expected));

    /* Step 5: tensors. */
    for (uint32_t i = 0; i < nt; i++) {
        const unsigned char *e = a + tb.tensors + (uint64_t)ZC_TENSOR_ENTRY_SIZE * i;
        uint32_t name_off = zc__rd32(e + ZC__T_NAME_OFFSET), name_len = zc__rd32(e + ZC__T_NAME_LEN);
        uint32_t dims_idx = zc__rd32(e + ZC__T_DIMS_INDEX);
        zc__tensor_fields f;
        uint64_t start, extent;

        if (name_off != name_run)
            return zc__fail(ZC_EMANIFEST, msg, msg_cap,
                            "tensor %u: name_offset %u is not where the previous names end (%u)", i, name_off, name_run);
        if (name_len > ZC_MAX_NAME)
            return zc__fail(ZC_ETOOBIG, msg, msg_cap, "tensor %u: name_len %u exceeds the limit of %u", i, name_len,
                            ZC_MAX_NAME);
        if ((uint64_t)name_off + name_len > ss)
            return zc__fail(ZC_EMANIFEST, msg, msg_cap,
                            "tensor %u: name (offset %u, length %u) extends past the string table (%u bytes)", i,
                            name_off, name_len, ss);
        name_run += name_len;
        tensor_entry_fields(a, &tb, i, &f);
        if (zc__rd32(e + ZC__T_RESERVED) != 0)
            return tensor_fail(&f, ZC_EMANIFEST, msg, msg_cap, "reserved bytes [28, 32) are not zero");
        if (f.ndim > ZC_MAX_NDIM)
            return tensor_fail(&f, ZC_ETOOBIG, msg, msg_cap, "ndim %u exceeds the limit of %u", f.ndim, ZC_MAX_NDIM);
        if (dims_idx != dims_run)
            return tensor_fail(&f, ZC_EMANIFEST, msg, msg_cap,
                               "dims_index %u is not where the previous dims end (%u)", dims_idx, dims_run);
        if ((uint64_t)dims_idx + (uint64_t)2 * f.ndim > nd)
            return tensor_fail(&f, ZC_EMANIFEST, msg, msg_cap, "dims [%u, %llu) extend past the dims table (%u values)",
                               dims_idx, LLU((uint64_t)dims_idx + (uint64_t)2 * f.ndim), nd);
        dims_run += 2u * f.ndim;
        rc = zc__check_tensor(&f, ns, NULL, a + tb.storages, &start, &extent, msg, msg_cap);
        if (rc) return rc;
    }
    if (name_run != ss)
        return zc__fail(ZC_EMANIFEST, msg, msg_cap, "manifest: the names use %u bytes but strings_size is %u", name_run,
                        ss);
    if (dims_run != nd)
        return zc__fail(ZC_EMANIFEST, msg, msg_cap, "manifest: the tensors use %u dims but n_dims is %u", dims_run, nd);

    if (info) {
        info->version = zc__rd32(a + ZC__H_VERSION);
        info->flags = zc__rd32(a + ZC__H_FLAGS);
        info->manifest_offset = ZC_HEADER_SIZE;
        info->manifest_size = msize;
        info->data_offset = doff;
        info->data_size = dsize;
        info->total_size = zc__rd64(a + ZC__H_TOTAL_SIZE);
        info->n_storages = ns;
        info->n_tensors = nt;
        info->n_dims = nd;
        info->strings_size = ss;
        info->manifest_crc = want_crc;
        info->data_crc = zc__rd32(a + ZC__H_DATA_CRC);
        info->header_crc = zc__rd32(a + ZC__H_HEADER_CRC);
    }
    return 0;
}

int zc_get_storage(const void *buf, size_t size, uint32_t i, zc_storage_info *out) {
    const unsigned char *a = (const unsigned char *)buf;
    uint64_t entry;
    if (!a || !out || size < ZC_HEADER_SIZE || i >= zc__rd32(a + ZC__H_N_STORAGES)) return ZC_EINVAL;
    entry = ZC_HEADER_SIZE + (uint64_t)ZC_STORAGE_ENTRY_SIZE * i;
    if (entry + ZC_STORAGE_ENTRY_SIZE > size) return ZC_EINVAL;
    out->offset = zc__rd64(a + ZC__H_DATA_OFFSET) + zc__rd64(a + entry);
    out->length = zc__rd64(a + entry + 8);
    return 0;
}

int zc_get_tensor(const void *buf, size_t size, uint32_t i, zc_tensor_info *out) {
    const unsigned char *a = (const unsigned char *)buf;
    zc__tensor_fields f;
    tables tb;
    uint64_t start, extent;
    if (!a || !out || size < ZC_HEADER_SIZE || i >= zc__rd32(a + ZC__H_N_TENSORS)) return ZC_EINVAL;
    table_offsets(a, &tb);
    if (tb.strings + zc__rd32(a + ZC__H_STRINGS_SIZE) > size) return ZC_EINVAL;
    tensor_entry_fields(a, &tb, i, &f);
    if (zc__check_tensor(&f, zc__rd32(a + ZC__H_N_STORAGES), NULL, a + tb.storages, &start, &extent, NULL, 0))
        return ZC_EINVAL;
    out->name = f.name;
    out->name_len = f.name_len;
    out->storage_index = f.storage_index;
    out->dtype = (uint8_t)f.dtype;
    out->ndim = (uint8_t)f.ndim;
    out->kind = (uint8_t)f.kind;
    out->flags = (uint8_t)f.flags;
    out->storage_offset = f.storage_offset;
    out->byte_offset = zc__rd64(a + ZC__H_DATA_OFFSET) +
                       zc__rd64(a + tb.storages + (uint64_t)ZC_STORAGE_ENTRY_SIZE * f.storage_index) + start;
    out->extent = extent ? extent - start : 0;
    out->dims = (const unsigned char *)f.dims;
    return 0;
}

int64_t zc_dim(const zc_tensor_info *t, unsigned i) {
    if (!t || i >= 2u * t->ndim) return 0;
    return (int64_t)zc__rd64(t->dims + (size_t)8 * i);
}

int zc_verify_data(const void *buf, size_t size, int nthreads) {
    const unsigned char *a = (const unsigned char *)buf;
    zc_arena_info info = {0};
    int rc = zc_validate(buf, size, &info, NULL, 0);
    if (rc) return rc;
    if (info.flags & ZC_FLAG_NO_DATA_CRC) return ZC_ENODATACRC;
    if (zc_crc32c_mt(a + info.data_offset, (size_t)info.data_size, nthreads) != info.data_crc) return ZC_ECHECKSUM;
    return 0;
}
