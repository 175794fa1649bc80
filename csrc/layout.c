/*
 * layout.c - planning an arena, writing its header and manifest, and finalizing its checksums.
 */
#include "internal.h"

static int64_t desc_dim(const void *dims, unsigned i) {
    const zc_tensor_desc *t = (const zc_tensor_desc *)dims;
    return i < t->ndim ? t->shape[i] : t->stride[i - t->ndim];
}

static void desc_fields(const zc_tensor_desc *t, uint32_t index, zc__tensor_fields *f) {
    f->index = index;
    f->name = t->name;
    f->name_len = t->name_len;
    f->storage_index = t->storage_index;
    f->dtype = t->dtype;
    f->ndim = t->ndim;
    f->kind = t->kind;
    f->flags = t->flags;
    f->storage_offset = t->storage_offset;
    f->dims = t;
    f->get = desc_dim;
}

int zc_plan(const uint64_t *storage_sizes, uint32_t n_storages, const zc_tensor_desc *tensors,
            uint32_t n_tensors, uint64_t *storage_offsets, zc_plan_t *plan, char *msg, size_t msg_cap) {
    uint64_t off = 0, n_dims = 0, strings = 0, manifest_size, data_offset, total;

    if (msg && msg_cap) msg[0] = '\0';
    if (!plan || (n_storages && (!storage_sizes || !storage_offsets)) || (n_tensors && !tensors))
        return zc__fail(ZC_EINVAL, msg, msg_cap, "plan: a required pointer argument is NULL");

    for (uint32_t i = 0; i < n_storages; i++) {
        uint64_t end;
        storage_offsets[i] = off;
        if (zc__add64(off, storage_sizes[i], &end) || zc__align_up64(end, ZC_STORAGE_ALIGN, &off))
            return zc__fail(ZC_EOVERFLOW, msg, msg_cap, "storage %u: length %llu overflows the data region", i,
                            (unsigned long long)storage_sizes[i]);
    }

    for (uint32_t i = 0; i < n_tensors; i++) {
        const zc_tensor_desc *t = &tensors[i];
        zc__tensor_fields f;
        uint64_t start, extent;
        int rc;
        if ((t->name_len && !t->name) || (t->ndim && (!t->shape || !t->stride)))
            return zc__fail(ZC_EINVAL, msg, msg_cap, "tensor %u: name, shape or stride pointer is NULL", i);
        desc_fields(t, i, &f);
        rc = zc__check_tensor(&f, n_storages, storage_sizes, NULL, &start, &extent, msg, msg_cap);
        if (rc) return rc;
        n_dims += 2u * (uint64_t)t->ndim;
        strings += t->name_len;
    }
    if (n_dims > UINT32_MAX)
        return zc__fail(ZC_ETOOBIG, msg, msg_cap, "manifest: %llu dims exceed the limit of %u",
                        (unsigned long long)n_dims, UINT32_MAX);
    if (strings > UINT32_MAX)
        return zc__fail(ZC_ETOOBIG, msg, msg_cap, "manifest: %llu bytes of names exceed the limit of %u",
                        (unsigned long long)strings, UINT32_MAX);

    /* No overflow: each term is below 2^37. */
    manifest_size = (uint64_t)ZC_STORAGE_ENTRY_SIZE * n_storages + (uint64_t)ZC_TENSOR_ENTRY_SIZE * n_tensors +
                    8u * n_dims + strings;
    if (zc__align_up64(ZC_HEADER_SIZE + manifest_size, ZC_DATA_ALIGN, &data_offset) ||
        zc__add64(data_offset, off, &total))
        return zc__fail(ZC_EOVERFLOW, msg, msg_cap, "arena: total size overflows 64 bits");

    plan->manifest_offset = ZC_HEADER_SIZE;
    plan->manifest_size = manifest_size;
    plan->data_offset = data_offset;
    plan->data_size = off;
    plan->total_size = total;
    plan->n_storages = n_storages;
    plan->n_tensors = n_tensors;
    plan->n_dims = (uint32_t)n_dims;
    plan->strings_size = (uint32_t)strings;
    return 0;
}

/* Checks that a plan and the arrays passed with it agree, so writing cannot overflow dst. */
static int check_plan(uint64_t need, size_t dst_cap, const zc_plan_t *plan, const uint64_t *storage_sizes,
                      const uint64_t *storage_offsets, const zc_tensor_desc *tensors) {
    uint64_t n_dims = 0, strings = 0, manifest_size, end = 0, data_offset;

    if (need > dst_cap || plan->manifest_offset != ZC_HEADER_SIZE) return ZC_EINVAL;
    if ((plan->n_storages && (!storage_sizes || !storage_offsets)) || (plan->n_tensors && !tensors))
        return ZC_EINVAL;
    for (uint32_t i = 0; i < plan->n_tensors; i++) {
        if ((tensors[i].name_len && !tensors[i].name) || tensors[i].name_len > ZC_MAX_NAME) return ZC_EINVAL;
        if (tensors[i].ndim > ZC_MAX_NDIM || (tensors[i].ndim && (!tensors[i].shape || !tensors[i].stride)))
            return ZC_EINVAL;
        n_dims += 2u * (uint64_t)tensors[i].ndim;
        strings += tensors[i].name_len;
    }
    if (n_dims != plan->n_dims || strings != plan->strings_size) return ZC_EINVAL;
    manifest_size = (uint64_t)ZC_STORAGE_ENTRY_SIZE * plan->n_storages +
                    (uint64_t)ZC_TENSOR_ENTRY_SIZE * plan->n_tensors + 8u * n_dims + strings;
    if (manifest_size != plan->manifest_size) return ZC_EINVAL;
    if (zc__align_up64(ZC_HEADER_SIZE + manifest_size, ZC_DATA_ALIGN, &data_offset) ||
        data_offset != plan->data_offset)
        return ZC_EINVAL;
    for (uint32_t i = 0; i < plan->n_storages; i++) {
        uint64_t e;
        if (storage_offsets[i] % ZC_STORAGE_ALIGN || storage_offsets[i] < end) return ZC_EINVAL;
        if (zc__add64(storage_offsets[i], storage_sizes[i], &e) || e > plan->data_size) return ZC_EINVAL;
        end = e;
    }
    if (plan->data_size % ZC_STORAGE_ALIGN || plan->data_offset + plan->data_size != plan->total_size)
        return ZC_EINVAL;
    return 0;
}

/* Writes the header and manifest of a checked plan into a, and the zero padding up to the data
 * region; with_data also zeroes the padding between storages inside the data region. */
static void write_meta(unsigned char *a, const zc_plan_t *plan, const uint64_t *storage_sizes,
                       const uint64_t *storage_offsets, const zc_tensor_desc *tensors, int with_data) {
    unsigned char *st, *tt, *dims, *strs, *data;
    uint32_t name_off = 0, dims_idx = 0;

    memset(a, 0, ZC_HEADER_SIZE);
    memcpy(a + ZC__H_MAGIC, ZC_MAGIC, 8);
    zc__wr32(a + ZC__H_VERSION, ZC_FORMAT_VERSION);
    zc__wr32(a + ZC__H_HEADER_SIZE, ZC_HEADER_SIZE);
    zc__wr32(a + ZC__H_STORAGE_ALIGN, ZC_STORAGE_ALIGN);
    zc__wr32(a + ZC__H_DATA_ALIGN, ZC_DATA_ALIGN);
    zc__wr32(a + ZC__H_N_STORAGES, plan->n_storages);
    zc__wr32(a + ZC__H_N_TENSORS, plan->n_tensors);
    zc__wr32(a + ZC__H_N_DIMS, plan->n_dims);
    zc__wr32(a + ZC__H_STRINGS_SIZE, plan->strings_size);
    zc__wr64(a + ZC__H_MANIFEST_OFFSET, ZC_HEADER_SIZE);
    zc__wr64(a + ZC__H_MANIFEST_SIZE, plan->manifest_size);
    zc__wr64(a + ZC__H_DATA_OFFSET, plan->data_offset);
    zc__wr64(a + ZC__H_DATA_SIZE, plan->data_size);
    zc__wr64(a + ZC__H_TOTAL_SIZE, plan->total_size);

    st = a + ZC_HEADER_SIZE;
    tt = st + (size_t)ZC_STORAGE_ENTRY_SIZE * plan->n_storages;
    dims = tt + (size_t)ZC_TENSOR_ENTRY_SIZE * plan->n_tensors;
    strs = dims + (size_t)8 * plan->n_dims;
    data = a + plan->data_offset;

    for (uint32_t i = 0; i < plan->n_storages; i++) {
        uint64_t end = storage_offsets[i] + storage_sizes[i];
        uint64_t next = i + 1 < plan->n_storages ? storage_offsets[i + 1] : plan->data_size;
        zc__wr64(st + (size_t)16 * i, storage_offsets[i]);
        zc__wr64(st + (size_t)16 * i + 8, storage_sizes[i]);
        if (with_data) memset(data + end, 0, (size_t)(next - end));
    }
    if (with_data && plan->n_storages == 0) memset(data, 0, (size_t)plan->data_size);

    for (uint32_t i = 0; i < plan->n_tensors; i++) {
        const zc_tensor_desc *t = &tensors[i];
        unsigned char *e = tt + (size_t)32 * i;
        zc__wr32(e + ZC__T_NAME_OFFSET, name_off);
        zc__wr32(e + ZC__T_NAME_LEN, t->name_len);
        zc__wr32(e + ZC__T_STORAGE_INDEX, t->storage_index);
        e[ZC__T_DTYPE] = t->dtype;
        e[ZC__T_NDIM] = t->ndim;
        e[ZC__T_KIND] = t->kind;
        e[ZC__T_FLAGS] = t->flags;
        zc__wr64(e + ZC__T_STORAGE_OFFSET, t->storage_offset);
        zc__wr32(e + ZC__T_DIMS_INDEX, dims_idx);
        zc__wr32(e + ZC__T_RESERVED, 0);
        for (unsigned d = 0; d < t->ndim; d++) {
            zc__wr64(dims + 8u * ((size_t)dims_idx + d), (uint64_t)t->shape[d]);
            zc__wr64(dims + 8u * ((size_t)dims_idx + t->ndim + d), (uint64_t)t->stride[d]);
        }
        if (t->name_len) memcpy(strs + name_off, t->name, t->name_len);
        name_off += t->name_len;
        dims_idx += 2u * t->ndim;
    }

    memset(a + ZC_HEADER_SIZE + plan->manifest_size, 0,
           (size_t)(plan->data_offset - ZC_HEADER_SIZE - plan->manifest_size));
    zc__wr32(a + ZC__H_MANIFEST_CRC, zc_crc32c(0, st, (size_t)plan->manifest_size));
}

int zc_write_manifest(void *dst, size_t dst_cap, const zc_plan_t *plan, const uint64_t *storage_sizes,
                      const uint64_t *storage_offsets, const zc_tensor_desc *tensors) {
    int rc;

    if (!dst || !plan) return ZC_EINVAL;
    rc = check_plan(plan->total_size, dst_cap, plan, storage_sizes, storage_offsets, tensors);
    if (rc) return rc;
    write_meta((unsigned char *)dst, plan, storage_sizes, storage_offsets, tensors, 1);
    return 0;
}

int zc_write_header(void *dst, size_t dst_cap, const zc_plan_t *plan, const uint64_t *storage_sizes,
                    const uint64_t *storage_offsets, const zc_tensor_desc *tensors) {
    unsigned char *a = (unsigned char *)dst;
    int rc;

    if (!dst || !plan) return ZC_EINVAL;
    rc = check_plan(plan->data_offset, dst_cap, plan, storage_sizes, storage_offsets, tensors);
    if (rc) return rc;
    write_meta(a, plan, storage_sizes, storage_offsets, tensors, 0);
    zc__wr32(a + ZC__H_FLAGS, ZC_FLAG_NO_DATA_CRC);
    zc__wr32(a + ZC__H_DATA_CRC, 0);
    zc__wr32(a + ZC__H_HEADER_CRC, zc_crc32c(0, a, ZC__H_HEADER_CRC));
    return 0;
}

int zc_finalize(void *arena, size_t arena_size, int nthreads) {
    unsigned char *a = (unsigned char *)arena;
    uint64_t data_offset, data_size, total, end;

    if (!arena) return ZC_EINVAL;
    if (arena_size < ZC_HEADER_SIZE) return ZC_ETRUNCATED;
    data_offset = zc__rd64(a + ZC__H_DATA_OFFSET);
    data_size = zc__rd64(a + ZC__H_DATA_SIZE);
    total = zc__rd64(a + ZC__H_TOTAL_SIZE);
    /* Only a sane header gets checksums; the validator below reports what is wrong otherwise. */
    if (!zc__add64(data_offset, data_size, &end) && end == total && total <= arena_size &&
        data_offset >= ZC_HEADER_SIZE) {
        zc__wr32(a + ZC__H_FLAGS, zc__rd32(a + ZC__H_FLAGS) & ~ZC_FLAG_NO_DATA_CRC);
        zc__wr32(a + ZC__H_DATA_CRC, zc_crc32c_mt(a + data_offset, (size_t)data_size, nthreads));
        zc__wr32(a + ZC__H_HEADER_CRC, zc_crc32c(0, a, ZC__H_HEADER_CRC));
    }
    return zc_validate(a, arena_size, NULL, NULL, 0);
}
