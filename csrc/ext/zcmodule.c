/*
 * zcmodule.c - ray_zerocopy._zc, a thin CPython layer over the C core.
 *
 * Buffers come in through the buffer protocol; every copy, checksum and populate runs with the
 * GIL released; core error codes become Python exceptions in one function, raise_code().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "zerocopy/zc.h"

#define MSG_CAP 1024

static PyObject *ZeroCopyError; /* Exception */
static PyObject *ArenaError;    /* (ZeroCopyError, ValueError) */

/* ---- errors --------------------------------------------------------------- */

/* Sets the Python exception for a core error code and returns NULL.  msg (may be NULL or empty)
 * is the core's message; the code's description is used without one.
 * ZC_EINVAL -> ValueError, ZC_ENOMEM -> MemoryError, -errno -> OSError, every other code
 * (arena bytes or limits) -> ArenaError with .code and .code_name. */
static PyObject *raise_code(int code, const char *msg) {
    const char *text = msg && msg[0] ? msg : zc_strerror(code);
    PyObject *exc, *val;

    if (code == ZC_EINVAL) {
        PyErr_SetString(PyExc_ValueError, text);
        return NULL;
    }
    if (code == ZC_ENOMEM) {
        PyErr_SetString(PyExc_MemoryError, text);
        return NULL;
    }
    if (code < 0 && code > ZC_EINVAL) {
        errno = -code;
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    val = PyUnicode_DecodeUTF8(text, (Py_ssize_t)strlen(text), "replace");
    if (!val) return NULL;
    exc = PyObject_CallOneArg(ArenaError, val);
    Py_DECREF(val);
    if (!exc) return NULL;
    val = PyLong_FromLong(code);
    if (!val || PyObject_SetAttrString(exc, "code", val) < 0) goto fail;
    Py_DECREF(val);
    val = PyUnicode_FromString(zc_error_name(code));
    if (!val || PyObject_SetAttrString(exc, "code_name", val) < 0) goto fail;
    Py_DECREF(val);
    PyErr_SetObject(ArenaError, exc);
    Py_DECREF(exc);
    return NULL;
fail:
    Py_XDECREF(val);
    Py_DECREF(exc);
    return NULL;
}

/* ---- argument helpers ----------------------------------------------------- */

/* Converts an int to uint64; ValueError if negative or too large.  Returns 0 or -1. */
static int to_u64(PyObject *obj, const char *what, uint64_t *out) {
    PyObject *idx = PyNumber_Index(obj);
    int ovf = 0;
    long long v;
    if (!idx) return -1;
    v = PyLong_AsLongLongAndOverflow(idx, &ovf);
    if (v == -1 && PyErr_Occurred()) goto fail;
    if (ovf < 0 || (ovf == 0 && v < 0)) {
        PyErr_Format(PyExc_ValueError, "%s must be >= 0", what);
        goto fail;
    }
    if (ovf > 0) {
        unsigned long long u = PyLong_AsUnsignedLongLong(idx);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s does not fit in 64 bits", what);
            goto fail;
        }
        *out = u;
    } else {
        *out = (uint64_t)v;
    }
    Py_DECREF(idx);
    return 0;
fail:
    Py_DECREF(idx);
    return -1;
}

/* Converts an int to an unsigned value of at most max; ValueError otherwise. */
static int to_bounded(PyObject *obj, const char *what, uint64_t max, uint64_t *out) {
    if (to_u64(obj, what, out) < 0) return -1;
    if (*out > max) {
        PyErr_Format(PyExc_ValueError, "%s is %llu, more than %llu", what, (unsigned long long)*out,
                     (unsigned long long)max);
        return -1;
    }
    return 0;
}

/* Converts an int to int64 (negative allowed: the core reports negative sizes by name). */
static int to_i64(PyObject *obj, const char *what, int64_t *out) {
    PyObject *idx = PyNumber_Index(obj);
    int ovf = 0;
    long long v;
    if (!idx) return -1;
    v = PyLong_AsLongLongAndOverflow(idx, &ovf);
    Py_DECREF(idx);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (ovf) {
        PyErr_Format(PyExc_ValueError, "%s does not fit in 64 bits", what);
        return -1;
    }
    *out = (int64_t)v;
    return 0;
}

static int get_nthreads(int nthreads) { return nthreads < 0 ? 0 : nthreads; }

/* Storage sizes and tensor descriptions parsed from Python, for plan and write_manifest. */
typedef struct layout_input {
    PyObject *tensors_seq; /* Keeps the names' UTF-8 buffers alive. */
    uint64_t *sizes;
    uint64_t *offsets;
    uint32_t n_storages;
    zc_tensor_desc *descs;
    int64_t *dims;
    uint32_t n_tensors;
} layout_input;

static void layout_free(layout_input *in) {
    Py_XDECREF(in->tensors_seq);
    PyMem_Free(in->sizes);
    PyMem_Free(in->offsets);
    PyMem_Free(in->descs);
    PyMem_Free(in->dims);
    memset(in, 0, sizeof *in);
}

/* Parses one tensor tuple (name, storage_index, dtype, shape, stride, storage_offset, kind, flags).
 * dims receives shape then stride.  Returns 0 or -1. */
static int parse_tensor(PyObject *item, Py_ssize_t i, zc_tensor_desc *d, int64_t *dims) {
    PyObject *shape = NULL, *stride = NULL;
    const char *name;
    Py_ssize_t name_len, ndim;
    uint64_t v;
    int rc = -1;

    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 8) {
        PyErr_Format(PyExc_TypeError,
                     "tensors[%zd] must be a tuple (name, storage_index, dtype, shape, stride, storage_offset, "
                     "kind, flags)",
                     i);
        return -1;
    }
    if (!PyUnicode_Check(PyTuple_GET_ITEM(item, 0))) {
        PyErr_Format(PyExc_TypeError, "tensors[%zd]: name must be a str", i);
        return -1;
    }
    name = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(item, 0), &name_len);
    if (!name) return -1;
    if (name_len > ZC_MAX_NAME) {
        char msg[MSG_CAP];
        (void)snprintf(msg, sizeof msg, "tensor %zd ('%.96s...'): name_len %zd exceeds the limit of %u", i, name, name_len,
                 ZC_MAX_NAME);
        raise_code(ZC_ETOOBIG, msg);
        return -1;
    }
    d->name = name;
    d->name_len = (uint32_t)name_len;
    if (to_bounded(PyTuple_GET_ITEM(item, 1), "storage_index", UINT32_MAX, &v) < 0) return -1;
    d->storage_index = (uint32_t)v;
    if (to_bounded(PyTuple_GET_ITEM(item, 2), "dtype", 255, &v) < 0) return -1;
    d->dtype = (uint8_t)v;
    if (to_u64(PyTuple_GET_ITEM(item, 5), "storage_offset", &v) < 0) return -1;
    d->storage_offset = v;
    if (to_bounded(PyTuple_GET_ITEM(item, 6), "kind", 255, &v) < 0) return -1;
    d->kind = (uint8_t)v;
    if (to_bounded(PyTuple_GET_ITEM(item, 7), "flags", 255, &v) < 0) return -1;
    d->flags = (uint8_t)v;

    shape = PySequence_Fast(PyTuple_GET_ITEM(item, 3), "shape must be a sequence of ints");
    if (!shape) goto cleanup;
    stride = PySequence_Fast(PyTuple_GET_ITEM(item, 4), "stride must be a sequence of ints");
    if (!stride) goto cleanup;
    ndim = PySequence_Fast_GET_SIZE(shape);
    if (PySequence_Fast_GET_SIZE(stride) != ndim) {
        PyErr_Format(PyExc_ValueError, "tensor %zd ('%s'): shape has %zd dims but stride has %zd", i, name, ndim,
                     PySequence_Fast_GET_SIZE(stride));
        goto cleanup;
    }
    if (ndim > (Py_ssize_t)ZC_MAX_NDIM) {
        char msg[MSG_CAP];
        (void)snprintf(msg, sizeof msg, "tensor %zd ('%.96s'): ndim %zd exceeds the limit of %u", i, name, ndim,
                 ZC_MAX_NDIM);
        raise_code(ZC_ETOOBIG, msg);
        goto cleanup;
    }
    d->ndim = (uint8_t)ndim;
    for (Py_ssize_t k = 0; k < ndim; k++) {
        if (to_i64(PySequence_Fast_GET_ITEM(shape, k), "shape value", &dims[k]) < 0) goto cleanup;
        if (to_i64(PySequence_Fast_GET_ITEM(stride, k), "stride value", &dims[ndim + k]) < 0) goto cleanup;
    }
    d->shape = dims;
    d->stride = dims + ndim;
    rc = 0;
cleanup:
    Py_XDECREF(shape);
    Py_XDECREF(stride);
    return rc;
}

static int layout_parse(PyObject *sizes_obj, PyObject *tensors_obj, layout_input *in) {
    PyObject *sizes = NULL;
    Py_ssize_t ns, nt;
    int rc = -1;

    memset(in, 0, sizeof *in);
    sizes = PySequence_Fast(sizes_obj, "storage_sizes must be a sequence of ints");
    if (!sizes) goto cleanup;
    in->tensors_seq = PySequence_Fast(tensors_obj, "tensors must be a sequence of tuples");
    if (!in->tensors_seq) goto cleanup;
    ns = PySequence_Fast_GET_SIZE(sizes);
    nt = PySequence_Fast_GET_SIZE(in->tensors_seq);
    if ((uint64_t)ns > UINT32_MAX || (uint64_t)nt > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "too many storages or tensors");
        goto cleanup;
    }
    in->n_storages = (uint32_t)ns;
    in->n_tensors = (uint32_t)nt;
    in->sizes = PyMem_Calloc((size_t)ns + 1, sizeof *in->sizes);
    in->offsets = PyMem_Calloc((size_t)ns + 1, sizeof *in->offsets);
    in->descs = PyMem_Calloc((size_t)nt + 1, sizeof *in->descs);
    in->dims = PyMem_Calloc((size_t)nt * 2 * ZC_MAX_NDIM + 1, sizeof *in->dims);
    if (!in->sizes || !in->offsets || !in->descs || !in->dims) {
        PyErr_NoMemory();
        goto cleanup;
    }
    for (Py_ssize_t i = 0; i < ns; i++)
        if (to_u64(PySequence_Fast_GET_ITEM(sizes, i), "storage size", &in->sizes[i]) < 0) goto cleanup;
    for (Py_ssize_t i = 0; i < nt; i++)
        if (parse_tensor(PySequence_Fast_GET_ITEM(in->tensors_seq, i), i, &in->descs[i],
                         in->dims + (size_t)i * 2 * ZC_MAX_NDIM) < 0)
            goto cleanup;
    rc = 0;
cleanup:
    Py_XDECREF(sizes);
    if (rc) layout_free(in);
    return rc;
}

/* Parses the input and plans the layout.  Returns 0 or -1 with an exception set. */
static int layout_plan(PyObject *sizes_obj, PyObject *tensors_obj, layout_input *in, zc_plan_t *plan) {
    char msg[MSG_CAP];
    int code;
    if (layout_parse(sizes_obj, tensors_obj, in) < 0) return -1;
    code = zc_plan(in->sizes, in->n_storages, in->descs, in->n_tensors, in->offsets, plan, msg, sizeof msg);
    if (code) {
        raise_code(code, msg);
        layout_free(in);
        return -1;
    }
    return 0;
}

/* ---- dtypes --------------------------------------------------------------- */

static PyObject *py_dtype_size(PyObject *self, PyObject *arg) {
    long code = PyLong_AsLong(arg);
    if (code == -1 && PyErr_Occurred()) return NULL;
    if (code < 0 || code > 255 || zc_dtype_size((unsigned)code) == 0)
        return PyErr_Format(PyExc_ValueError, "unknown dtype code %ld", code);
    return PyLong_FromSize_t(zc_dtype_size((unsigned)code));
}

static PyObject *py_dtype_name(PyObject *self, PyObject *arg) {
    long code = PyLong_AsLong(arg);
    if (code == -1 && PyErr_Occurred()) return NULL;
    if (code < 0 || code > 255 || !zc_dtype_name((unsigned)code))
        return PyErr_Format(PyExc_ValueError, "unknown dtype code %ld", code);
    return PyUnicode_FromString(zc_dtype_name((unsigned)code));
}

/* ---- layout and writing -------------------------------------------------- */

static PyObject *py_plan(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"storage_sizes", "tensors", NULL};
    PyObject *sizes, *tensors, *offsets = NULL, *res = NULL;
    layout_input in;
    zc_plan_t plan;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:plan", kwlist, &sizes, &tensors)) return NULL;
    if (layout_plan(sizes, tensors, &in, &plan) < 0) return NULL;
    offsets = PyList_New(in.n_storages);
    if (!offsets) goto cleanup;
    for (uint32_t i = 0; i < in.n_storages; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(in.offsets[i]);
        if (!v) goto cleanup;
        PyList_SET_ITEM(offsets, i, v);
    }
    res = Py_BuildValue("(KKO)", (unsigned long long)plan.data_offset, (unsigned long long)plan.total_size, offsets);
cleanup:
    Py_XDECREF(offsets);
    layout_free(&in);
    return res;
}

/* write_manifest() and write_header(): plan from the Python inputs, check dst, write.  header_only
 * writes just the first data_offset bytes (zc_write_header, flag NO_DATA_CRC). */
static PyObject *write_meta(PyObject *args, PyObject *kw, int header_only) {
    static char *kwlist[] = {"dst", "storage_sizes", "tensors", NULL};
    const char *fmt = header_only ? "w*OO:write_header" : "w*OO:write_manifest";
    PyObject *sizes, *tensors, *res = NULL;
    Py_buffer dst;
    layout_input in;
    zc_plan_t plan;
    uint64_t need;
    int code;

    memset(&in, 0, sizeof in); /* layout_free() of a zeroed input is a no-op. */
    if (!PyArg_ParseTupleAndKeywords(args, kw, fmt, kwlist, &dst, &sizes, &tensors)) return NULL;
    if (layout_plan(sizes, tensors, &in, &plan) < 0) goto cleanup;
    need = header_only ? plan.data_offset : plan.total_size;
    if ((uint64_t)dst.len < need) {
        PyErr_Format(PyExc_ValueError, "dst is %zd bytes but the %s needs %llu", dst.len,
                     header_only ? "header and manifest" : "arena", (unsigned long long)need);
        goto cleanup;
    }
    code = header_only ? zc_write_header(dst.buf, (size_t)dst.len, &plan, in.sizes, in.offsets, in.descs)
                       : zc_write_manifest(dst.buf, (size_t)dst.len, &plan, in.sizes, in.offsets, in.descs);
    if (code) {
        raise_code(code, header_only ? "write_header: the plan and its inputs disagree"
                                     : "write_manifest: the plan and its inputs disagree");
        goto cleanup;
    }
    res = Py_NewRef(Py_None);
cleanup:
    layout_free(&in);
    PyBuffer_Release(&dst);
    return res;
}

static PyObject *py_write_manifest(PyObject *self, PyObject *args, PyObject *kw) { return write_meta(args, kw, 0); }

static PyObject *py_write_header(PyObject *self, PyObject *args, PyObject *kw) { return write_meta(args, kw, 1); }

static PyObject *py_gather(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dst", "copies", "nthreads", NULL};
    PyObject *copies_obj, *seq = NULL, *res = NULL;
    Py_buffer dst;
    zc_copy *copies = NULL;
    Py_ssize_t n;
    int nthreads = 0, code;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "w*O|i:gather", kwlist, &dst, &copies_obj, &nthreads)) return NULL;
    seq = PySequence_Fast(copies_obj, "copies must be a sequence of (dst_offset, src_ptr, nbytes) tuples");
    if (!seq) goto cleanup;
    n = PySequence_Fast_GET_SIZE(seq);
    copies = PyMem_Calloc((size_t)n + 1, sizeof *copies);
    if (!copies) {
        PyErr_NoMemory();
        goto cleanup;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        uint64_t off, ptr, nbytes, end;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
            PyErr_Format(PyExc_TypeError, "copies[%zd] must be a tuple (dst_offset, src_ptr, nbytes)", i);
            goto cleanup;
        }
        if (to_u64(PyTuple_GET_ITEM(item, 0), "dst_offset", &off) < 0 ||
            to_bounded(PyTuple_GET_ITEM(item, 1), "src_ptr", UINTPTR_MAX, &ptr) < 0 ||
            to_u64(PyTuple_GET_ITEM(item, 2), "nbytes", &nbytes) < 0)
            goto cleanup;
        if (__builtin_add_overflow(off, nbytes, &end) || end > (uint64_t)dst.len) {
            PyErr_Format(PyExc_ValueError, "copies[%zd]: [%llu, %llu + %llu) lies outside dst (%zd bytes)", i,
                         (unsigned long long)off, (unsigned long long)off, (unsigned long long)nbytes, dst.len);
            goto cleanup;
        }
        if (nbytes && !ptr) {
            PyErr_Format(PyExc_ValueError, "copies[%zd]: src_ptr is 0 but nbytes is %llu", i,
                         (unsigned long long)nbytes);
            goto cleanup;
        }
        copies[i].dst = (unsigned char *)dst.buf + off;
        copies[i].src = (const void *)(uintptr_t)ptr;
        copies[i].n = (size_t)nbytes;
    }
    Py_BEGIN_ALLOW_THREADS
    code = zc_gather(copies, (size_t)n, get_nthreads(nthreads));
    Py_END_ALLOW_THREADS
    /* A failed thread start is not an error: the calling thread completed the copies. */
    if (code && !(code < 0 && code > ZC_EINVAL)) {
        raise_code(code, NULL);
        goto cleanup;
    }
    res = Py_NewRef(Py_None);
cleanup:
    PyMem_Free(copies);
    Py_XDECREF(seq);
    PyBuffer_Release(&dst);
    return res;
}

static PyObject *py_finalize(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dst", "nthreads", NULL};
    Py_buffer dst;
    int nthreads = 0, code;
    char msg[MSG_CAP];

    if (!PyArg_ParseTupleAndKeywords(args, kw, "w*|i:finalize", kwlist, &dst, &nthreads)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    code = zc_finalize(dst.buf, (size_t)dst.len, get_nthreads(nthreads));
    Py_END_ALLOW_THREADS
    if (code) {
        msg[0] = '\0';
        zc_validate(dst.buf, (size_t)dst.len, NULL, msg, sizeof msg);
        PyBuffer_Release(&dst);
        return raise_code(code, msg);
    }
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

/* ---- reading --------------------------------------------------------------- */

static PyObject *dims_tuple(const zc_tensor_info *t, unsigned first) {
    PyObject *tup = PyTuple_New(t->ndim);
    if (!tup) return NULL;
    for (unsigned k = 0; k < t->ndim; k++) {
        PyObject *v = PyLong_FromLongLong(zc_dim(t, first + k));
        if (!v) {
            Py_DECREF(tup);
            return NULL;
        }
        PyTuple_SET_ITEM(tup, k, v);
    }
    return tup;
}

static int set_item(PyObject *d, const char *key, PyObject *v) {
    int rc;
    if (!v) return -1;
    rc = PyDict_SetItemString(d, key, v);
    Py_DECREF(v);
    return rc;
}

/* Builds parse()'s dict from a validated arena.  Returns a new reference or NULL. */
static PyObject *arena_dict(const void *buf, size_t size, const zc_arena_info *info) {
    PyObject *d = PyDict_New(), *storages = NULL, *tensors = NULL;
    if (!d) return NULL;
    if (set_item(d, "version", PyLong_FromUnsignedLong(info->version)) < 0 ||
        set_item(d, "flags", PyLong_FromUnsignedLong(info->flags)) < 0 ||
        set_item(d, "manifest_size", PyLong_FromUnsignedLongLong(info->manifest_size)) < 0 ||
        set_item(d, "data_offset", PyLong_FromUnsignedLongLong(info->data_offset)) < 0 ||
        set_item(d, "data_size", PyLong_FromUnsignedLongLong(info->data_size)) < 0 ||
        set_item(d, "total_size", PyLong_FromUnsignedLongLong(info->total_size)) < 0 ||
        set_item(d, "manifest_crc", PyLong_FromUnsignedLong(info->manifest_crc)) < 0 ||
        set_item(d, "data_crc", PyLong_FromUnsignedLong(info->data_crc)) < 0 ||
        set_item(d, "header_crc", PyLong_FromUnsignedLong(info->header_crc)) < 0)
        goto fail;

    storages = PyList_New(info->n_storages);
    if (!storages) goto fail;
    for (uint32_t i = 0; i < info->n_storages; i++) {
        zc_storage_info s;
        PyObject *t;
        if (zc_get_storage(buf, size, i, &s)) {
            raise_code(ZC_EMANIFEST, "storage entry unreadable");
            goto fail;
        }
        t = Py_BuildValue("(KK)", (unsigned long long)s.offset, (unsigned long long)s.length);
        if (!t) goto fail;
        PyList_SET_ITEM(storages, i, t);
    }
    if (PyDict_SetItemString(d, "storages", storages) < 0) goto fail;

    tensors = PyList_New(info->n_tensors);
    if (!tensors) goto fail;
    for (uint32_t i = 0; i < info->n_tensors; i++) {
        zc_tensor_info t;
        PyObject *name, *shape, *stride, *tup;
        if (zc_get_tensor(buf, size, i, &t)) {
            raise_code(ZC_EMANIFEST, "tensor entry unreadable");
            goto fail;
        }
        name = PyUnicode_DecodeUTF8(t.name, (Py_ssize_t)t.name_len, "strict");
        if (!name) {
            char msg[MSG_CAP];
            if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) goto fail;
            PyErr_Clear();
            (void)snprintf(msg, sizeof msg, "tensor %u: name is not valid UTF-8", i);
            raise_code(ZC_EMANIFEST, msg);
            goto fail;
        }
        shape = dims_tuple(&t, 0);
        stride = shape ? dims_tuple(&t, t.ndim) : NULL;
        if (!stride) {
            Py_DECREF(name);
            Py_XDECREF(shape);
            goto fail;
        }
        tup = Py_BuildValue("(NIINNKIIK)", name, (unsigned)t.storage_index, (unsigned)t.dtype, shape, stride,
                            (unsigned long long)t.storage_offset, (unsigned)t.kind, (unsigned)t.flags,
                            (unsigned long long)t.byte_offset);
        if (!tup) goto fail;
        PyList_SET_ITEM(tensors, i, tup);
    }
    if (PyDict_SetItemString(d, "tensors", tensors) < 0) goto fail;
    Py_DECREF(storages);
    Py_DECREF(tensors);
    return d;
fail:
    Py_XDECREF(storages);
    Py_XDECREF(tensors);
    Py_DECREF(d);
    return NULL;
}

static PyObject *py_parse(PyObject *self, PyObject *arg) {
    Py_buffer view;
    zc_arena_info info;
    char msg[MSG_CAP];
    PyObject *res;
    int code;

    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    code = zc_validate(view.buf, (size_t)view.len, &info, msg, sizeof msg);
    res = code ? raise_code(code, msg) : arena_dict(view.buf, (size_t)view.len, &info);
    PyBuffer_Release(&view);
    return res;
}

static PyObject *py_verify_data(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"buf", "nthreads", NULL};
    Py_buffer view;
    zc_arena_info info;
    char msg[MSG_CAP];
    int nthreads = 0, code;
    uint32_t crc;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*|i:verify_data", kwlist, &view, &nthreads)) return NULL;
    code = zc_validate(view.buf, (size_t)view.len, &info, msg, sizeof msg);
    if (code) {
        PyBuffer_Release(&view);
        return raise_code(code, msg);
    }
    if (info.flags & ZC_FLAG_NO_DATA_CRC) {
        PyBuffer_Release(&view);
        return raise_code(ZC_ENODATACRC, "data: the arena carries no data checksum (flag NO_DATA_CRC: it was written "
                                         "into Ray's object store without one); pass the expected CRC32C instead");
    }
    Py_BEGIN_ALLOW_THREADS
    crc = zc_crc32c_mt((const unsigned char *)view.buf + info.data_offset, (size_t)info.data_size,
                       get_nthreads(nthreads));
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (crc != info.data_crc) {
        (void)snprintf(msg, sizeof msg, "data: data_crc 0x%08x does not match the data region (computed 0x%08x)",
                 info.data_crc, crc);
        return raise_code(ZC_ECHECKSUM, msg);
    }
    Py_RETURN_NONE;
}

/* ---- checksums -------------------------------------------------------------- */

static PyObject *crc_common(PyObject *args, PyObject *kw, const char *fmt,
                            uint32_t (*fn)(uint32_t, const void *, size_t)) {
    static char *kwlist[] = {"buf", "crc", NULL};
    Py_buffer view;
    unsigned long long crc = 0;
    uint32_t out;
    if (!PyArg_ParseTupleAndKeywords(args, kw, fmt, kwlist, &view, &crc)) return NULL;
    if (crc > UINT32_MAX) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "crc must fit in 32 bits");
    }
    if (view.len >= (1 << 16)) {
        Py_BEGIN_ALLOW_THREADS
        out = fn((uint32_t)crc, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    } else {
        out = fn((uint32_t)crc, view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(out);
}

static PyObject *py_crc32c(PyObject *self, PyObject *args, PyObject *kw) {
    return crc_common(args, kw, "y*|K:crc32c", zc_crc32c);
}

static PyObject *py_crc32c_portable(PyObject *self, PyObject *args, PyObject *kw) {
    return crc_common(args, kw, "y*|K:crc32c_portable", zc_crc32c_portable);
}

static PyObject *py_crc32c_impl(PyObject *self, PyObject *unused) { return PyUnicode_FromString(zc_crc32c_impl()); }

static PyObject *py_crc32c_mt(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"buf", "nthreads", NULL};
    Py_buffer view;
    int nthreads = 0;
    uint32_t out;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*|i:crc32c_mt", kwlist, &view, &nthreads)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    out = zc_crc32c_mt(view.buf, (size_t)view.len, get_nthreads(nthreads));
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(out);
}

/* ---- copies ------------------------------------------------------------------ */

/* Checks [off, off+n) against a buffer of len bytes; ValueError naming what otherwise. */
static int check_range(const char *what, uint64_t off, uint64_t n, Py_ssize_t len) {
    uint64_t end;
    if (__builtin_add_overflow(off, n, &end) || end > (uint64_t)len) {
        PyErr_Format(PyExc_ValueError, "%s range [%llu, %llu + %llu) lies outside the buffer (%zd bytes)", what,
                     (unsigned long long)off, (unsigned long long)off, (unsigned long long)n, len);
        return -1;
    }
    return 0;
}

/* Copies n bytes on threads; overlapping regions are moved on this thread. */
static void copy_bytes(void *dst, const void *src, size_t n, int nthreads) {
    zc_copy c;
    uintptr_t d = (uintptr_t)dst, s = (uintptr_t)src;
    if (n == 0) return;
    if ((d < s && s - d < n) || (s <= d && d - s < n)) {
        memmove(dst, src, n);
        return;
    }
    c.dst = dst;
    c.src = src;
    c.n = n;
    (void)zc_gather(&c, 1, nthreads); /* A failed thread start still completes the copy. */
}

static PyObject *py_copy(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dst", "dst_offset", "src", "src_offset", "nbytes", "nthreads", NULL};
    Py_buffer dst, src;
    PyObject *dst_off_o, *src_off_o, *n_o, *res = NULL;
    uint64_t dst_off, src_off, n;
    int nthreads = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "w*Oy*OO|i:copy", kwlist, &dst, &dst_off_o, &src, &src_off_o, &n_o,
                                     &nthreads))
        return NULL;
    if (to_u64(dst_off_o, "dst_offset", &dst_off) < 0 || to_u64(src_off_o, "src_offset", &src_off) < 0 ||
        to_u64(n_o, "nbytes", &n) < 0 || check_range("dst", dst_off, n, dst.len) < 0 ||
        check_range("src", src_off, n, src.len) < 0)
        goto cleanup;
    Py_BEGIN_ALLOW_THREADS
    copy_bytes((unsigned char *)dst.buf + dst_off, (const unsigned char *)src.buf + src_off, (size_t)n,
               get_nthreads(nthreads));
    Py_END_ALLOW_THREADS
    res = Py_NewRef(Py_None);
cleanup:
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    return res;
}

static PyObject *py_copy_to_ptr(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dst_ptr", "src", "src_offset", "nbytes", "nthreads", NULL};
    Py_buffer src;
    PyObject *ptr_o, *src_off_o, *n_o, *res = NULL;
    uint64_t ptr, src_off, n;
    int nthreads = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oy*OO|i:copy_to_ptr", kwlist, &ptr_o, &src, &src_off_o, &n_o,
                                     &nthreads))
        return NULL;
    if (to_bounded(ptr_o, "dst_ptr", UINTPTR_MAX, &ptr) < 0 || to_u64(src_off_o, "src_offset", &src_off) < 0 ||
        to_u64(n_o, "nbytes", &n) < 0 || check_range("src", src_off, n, src.len) < 0)
        goto cleanup;
    if (n && !ptr) {
        PyErr_SetString(PyExc_ValueError, "dst_ptr is 0");
        goto cleanup;
    }
    Py_BEGIN_ALLOW_THREADS
    copy_bytes((void *)(uintptr_t)ptr, (const unsigned char *)src.buf + src_off, (size_t)n, get_nthreads(nthreads));
    Py_END_ALLOW_THREADS
    res = Py_NewRef(Py_None);
cleanup:
    PyBuffer_Release(&src);
    return res;
}

static PyObject *py_page_size(PyObject *self, PyObject *unused) { return PyLong_FromSize_t(zc_page_size()); }

static PyObject *py_install_fault_handler(PyObject *self, PyObject *unused) {
    int code = zc_install_fault_handler();
    if (code) return raise_code(code, NULL);
    Py_RETURN_NONE;
}

static PyObject *py_describe_address(PyObject *self, PyObject *arg) {
    char name[ZC_MAX_NAME + 1];
    uint64_t addr;
    if (to_bounded(arg, "addr", UINTPTR_MAX, &addr) < 0) return NULL;
    if (!zc_describe_address((uintptr_t)addr, name, sizeof name)) Py_RETURN_NONE;
    return PyUnicode_DecodeUTF8(name, (Py_ssize_t)strlen(name), "replace");
}

/* ---- Mapping ----------------------------------------------------------------- */

typedef struct MappingObject {
    PyObject_HEAD
    Py_buffer view;  /* The underlying buffer; valid while has_view. */
    int has_view;
    Py_ssize_t exports;
    uint64_t protect_id;
    int is_protected;
    PyObject *weakreflist;
} MappingObject;

static PyTypeObject MappingType;

static int mapping_check_open(MappingObject *m) {
    if (!m->has_view) {
        PyErr_SetString(PyExc_ValueError, "the mapping has been released");
        return -1;
    }
    return 0;
}

static int mapping_init(MappingObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"buf", NULL};
    PyObject *buf;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O:Mapping", kwlist, &buf)) return -1;
    if (self->has_view) {
        PyErr_SetString(PyExc_TypeError, "Mapping is already initialized");
        return -1;
    }
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_SIMPLE) < 0) return -1;
    self->has_view = 1;
    return 0;
}

/* Lifts the protection, if any.  Returns 0 or -1 with an exception set. */
static int mapping_unprotect_impl(MappingObject *m) {
    int code;
    if (!m->is_protected) return 0;
    code = zc_unprotect(m->protect_id);
    m->is_protected = 0;
    m->protect_id = 0;
    if (code) {
        raise_code(code, NULL);
        return -1;
    }
    return 0;
}

static void mapping_dealloc(MappingObject *self) {
    if (self->weakreflist) PyObject_ClearWeakRefs((PyObject *)self);
    if (self->is_protected) {
        /* Writable again before the store can hand the memory to someone else. */
        (void)zc_unprotect(self->protect_id);
        self->is_protected = 0;
    }
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int mapping_getbuffer(MappingObject *self, Py_buffer *view, int flags) {
    if (!self->has_view) {
        PyErr_SetString(PyExc_BufferError, "the mapping has been released");
        view->obj = NULL;
        return -1;
    }
    /* Exported as writable even over a read-only source: torch.frombuffer needs a writable
     * buffer, and protect() is what stops writes. */
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->view.buf, self->view.len, 0, flags) < 0) return -1;
    self->exports++;
    return 0;
}

static void mapping_releasebuffer(MappingObject *self, Py_buffer *view) { self->exports--; }

static PyBufferProcs mapping_as_buffer = {
    (getbufferproc)mapping_getbuffer,
    (releasebufferproc)mapping_releasebuffer,
};

static PyObject *mapping_populate(MappingObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"offset", "length", "nthreads", NULL};
    long long offset = 0, length = -1;
    int nthreads = 0, code;
    const unsigned char *base;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|LLi:populate", kwlist, &offset, &length, &nthreads)) return NULL;
    if (mapping_check_open(self) < 0) return NULL;
    if (offset < 0 || offset > self->view.len) return PyErr_Format(PyExc_ValueError, "offset %lld is out of range", offset);
    if (length < 0) length = self->view.len - offset;
    if (check_range("populate", (uint64_t)offset, (uint64_t)length, self->view.len) < 0) return NULL;
    base = (const unsigned char *)self->view.buf + offset;
    self->exports++; /* Counted as an export: release() from another thread refuses meanwhile. */
    Py_BEGIN_ALLOW_THREADS
    code = zc_populate(base, (size_t)length, get_nthreads(nthreads));
    Py_END_ALLOW_THREADS
    self->exports--;
    if (code) return raise_code(code, NULL);
    Py_RETURN_NONE;
}

static PyObject *mapping_protect(MappingObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"offset", "length", "ranges", NULL};
    PyObject *off_o, *len_o, *ranges_o, *seq = NULL, *res = NULL;
    zc_named_range *ranges = NULL;
    uint64_t offset, length, id = 0;
    Py_ssize_t n;
    size_t page = zc_page_size();
    uintptr_t lo, hi;
    int code;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO:protect", kwlist, &off_o, &len_o, &ranges_o)) return NULL;
    if (mapping_check_open(self) < 0) return NULL;
    if (self->is_protected) {
        PyErr_SetString(PyExc_ValueError, "the mapping is already protected; call unprotect() first");
        return NULL;
    }
    if (to_u64(off_o, "offset", &offset) < 0 || to_u64(len_o, "length", &length) < 0 ||
        check_range("protect", offset, length, self->view.len) < 0)
        return NULL;
    seq = PySequence_Fast(ranges_o, "ranges must be a sequence of (start_offset, length, name) tuples");
    if (!seq) return NULL;
    n = PySequence_Fast_GET_SIZE(seq);
    ranges = PyMem_Calloc((size_t)n + 1, sizeof *ranges);
    if (!ranges) {
        PyErr_NoMemory();
        goto cleanup;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        uint64_t start, len;
        Py_ssize_t name_len;
        const char *name;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3 || !PyUnicode_Check(PyTuple_GET_ITEM(item, 2))) {
            PyErr_Format(PyExc_TypeError, "ranges[%zd] must be a tuple (start_offset, length, name)", i);
            goto cleanup;
        }
        if (to_u64(PyTuple_GET_ITEM(item, 0), "start_offset", &start) < 0 ||
            to_u64(PyTuple_GET_ITEM(item, 1), "length", &len) < 0 ||
            check_range("ranges item", start, len, self->view.len) < 0)
            goto cleanup;
        name = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(item, 2), &name_len);
        if (!name) goto cleanup;
        ranges[i].start = (uintptr_t)self->view.buf + (uintptr_t)start;
        ranges[i].len = (size_t)len;
        ranges[i].name = name;
        ranges[i].name_len = name_len > (Py_ssize_t)ZC_MAX_NAME ? ZC_MAX_NAME : (uint32_t)name_len;
    }
    code = zc_install_fault_handler();
    if (code) {
        raise_code(code, NULL);
        goto cleanup;
    }
    code = zc_protect((unsigned char *)self->view.buf + offset, (size_t)length, ranges, (size_t)n, &id);
    if (code) {
        raise_code(code, NULL);
        goto cleanup;
    }
    lo = ((uintptr_t)self->view.buf + offset + page - 1) & ~(uintptr_t)(page - 1);
    hi = ((uintptr_t)self->view.buf + offset + length) & ~(uintptr_t)(page - 1);
    self->protect_id = id;
    self->is_protected = id != 0;
    res = PyLong_FromSize_t(id != 0 && hi > lo ? (size_t)(hi - lo) : 0);
cleanup:
    PyMem_Free(ranges);
    Py_XDECREF(seq);
    return res;
}

static PyObject *mapping_unprotect(MappingObject *self, PyObject *unused) {
    if (mapping_unprotect_impl(self) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *mapping_release(MappingObject *self, PyObject *unused) {
    if (!self->has_view) Py_RETURN_NONE;
    if (self->exports > 0)
        return PyErr_Format(PyExc_BufferError, "cannot release the mapping: %zd buffer export(s) still open",
                            self->exports);
    if (mapping_unprotect_impl(self) < 0) return NULL;
    PyBuffer_Release(&self->view);
    self->has_view = 0;
    Py_RETURN_NONE;
}

static PyObject *mapping_enter(MappingObject *self, PyObject *unused) { return Py_NewRef(self); }

static PyObject *mapping_exit(MappingObject *self, PyObject *args) { return mapping_release(self, NULL); }

static PyObject *mapping_get_address(MappingObject *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->has_view ? (unsigned long long)(uintptr_t)self->view.buf : 0);
}

static PyObject *mapping_get_size(MappingObject *self, void *closure) {
    return PyLong_FromSsize_t(self->has_view ? self->view.len : 0);
}

static PyObject *mapping_get_protected(MappingObject *self, void *closure) { return PyBool_FromLong(self->is_protected); }

static PyObject *mapping_get_exports(MappingObject *self, void *closure) { return PyLong_FromSsize_t(self->exports); }

static PyObject *mapping_get_released(MappingObject *self, void *closure) { return PyBool_FromLong(!self->has_view); }

static PyObject *mapping_repr(MappingObject *self) {
    if (!self->has_view) return PyUnicode_FromString("<ray_zerocopy._zc.Mapping released>");
    return PyUnicode_FromFormat("<ray_zerocopy._zc.Mapping address=%p size=%zd protected=%s exports=%zd>",
                                self->view.buf, self->view.len, self->is_protected ? "True" : "False", self->exports);
}

static Py_ssize_t mapping_len(MappingObject *self) { return self->has_view ? self->view.len : 0; }

static PySequenceMethods mapping_as_sequence = {.sq_length = (lenfunc)mapping_len};

static PyMethodDef mapping_methods[] = {
    {"populate", (PyCFunction)(void (*)(void))mapping_populate, METH_VARARGS | METH_KEYWORDS,
     "populate(offset=0, length=-1, nthreads=0)\n--\n\nPrefaults the page tables of [offset, offset+length) "
     "for reading (MADV_POPULATE_READ, on threads, GIL released)."},
    {"protect", (PyCFunction)(void (*)(void))mapping_protect, METH_VARARGS | METH_KEYWORDS,
     "protect(offset, length, ranges)\n--\n\nMakes the page-aligned interior of [offset, offset+length) read-only "
     "and registers ranges, (start_offset, length, name) tuples, so that a stray write is reported with the name "
     "of the tensor it hit. Installs the fault handler. Returns the number of bytes protected."},
    {"unprotect", (PyCFunction)mapping_unprotect, METH_NOARGS,
     "unprotect()\n--\n\nRestores read-write access to exactly the pages protect() made read-only."},
    {"release", (PyCFunction)mapping_release, METH_NOARGS,
     "release()\n--\n\nUnprotects, then releases the underlying buffer. Raises BufferError while exports "
     "(e.g. tensors from torch.frombuffer) are still alive."},
    {"__enter__", (PyCFunction)mapping_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)mapping_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef mapping_getset[] = {
    {"address", (getter)mapping_get_address, NULL, "Start address of the mapped bytes (0 once released).", NULL},
    {"size", (getter)mapping_get_size, NULL, "Number of mapped bytes (0 once released).", NULL},
    {"protected", (getter)mapping_get_protected, NULL, "Whether protect() is in effect.", NULL},
    {"exports", (getter)mapping_get_exports, NULL, "Number of buffer exports still open.", NULL},
    {"released", (getter)mapping_get_released, NULL, "Whether release() has been called.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject MappingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ray_zerocopy._zc.Mapping",
    .tp_basicsize = sizeof(MappingObject),
    .tp_dealloc = (destructor)mapping_dealloc,
    .tp_repr = (reprfunc)mapping_repr,
    .tp_as_sequence = &mapping_as_sequence,
    .tp_as_buffer = &mapping_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Mapping(buf)\n--\n\n"
              "Holds a view of an arena's bytes (read-only sources allowed) and exports the same memory\n"
              "through the buffer protocol, flagged writable: torch.frombuffer needs a writable buffer,\n"
              "and protect() is what stops writes. Deallocation unprotects before releasing the source.\n\n"
              "release() refuses while buffer exports (memoryview, numpy) are open, but torch.frombuffer\n"
              "holds a reference to the Mapping rather than an export: drop such tensors before release().",
    .tp_weaklistoffset = offsetof(MappingObject, weakreflist),
    .tp_methods = mapping_methods,
    .tp_getset = mapping_getset,
    .tp_init = (initproc)mapping_init,
    .tp_new = PyType_GenericNew,
};

/* ---- Span ---------------------------------------------------------------------- */

/* A read-only buffer over [first part, first part + total): built from parts that lie back to back
 * in one piece of memory (Ray's object store writes the out-of-band buffers of one object that
 * way).  It holds a view of every part, so the memory stays alive (and the object pinned) while
 * the span or anything exported from it lives.  Every byte of the span belongs to one of the
 * parts: construction fails unless the parts tile [0, total) exactly, at the offsets given. */
typedef struct SpanObject {
    PyObject_HEAD
    Py_buffer *views;
    Py_ssize_t n_views;
    char *base;
    Py_ssize_t size;
    Py_ssize_t exports;
} SpanObject;

static PyTypeObject SpanType;

static void span_clear_views(SpanObject *self) {
    for (Py_ssize_t i = 0; i < self->n_views; i++) PyBuffer_Release(&self->views[i]);
    PyMem_Free(self->views);
    self->views = NULL;
    self->n_views = 0;
}

static void span_dealloc(SpanObject *self) {
    span_clear_views(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int span_getbuffer(SpanObject *self, Py_buffer *view, int flags) {
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->base, self->size, 1, flags) < 0) return -1;
    self->exports++;
    return 0;
}

static void span_releasebuffer(SpanObject *self, Py_buffer *view) { self->exports--; }

static PyBufferProcs span_as_buffer = {(getbufferproc)span_getbuffer, (releasebufferproc)span_releasebuffer};

static PyObject *span_get_address(SpanObject *self, void *closure) {
    return PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)self->base);
}

static PyObject *span_get_size(SpanObject *self, void *closure) { return PyLong_FromSsize_t(self->size); }

static PyObject *span_get_parts(SpanObject *self, void *closure) { return PyLong_FromSsize_t(self->n_views); }

static PyGetSetDef span_getset[] = {
    {"address", (getter)span_get_address, NULL, "Start address of the span.", NULL},
    {"size", (getter)span_get_size, NULL, "Bytes in the span.", NULL},
    {"nbytes", (getter)span_get_size, NULL, "Bytes in the span (as memoryview.nbytes).", NULL},
    {"parts", (getter)span_get_parts, NULL, "Number of parts the span was built from.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SpanType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ray_zerocopy._zc.Span",
    .tp_basicsize = sizeof(SpanObject),
    .tp_dealloc = (destructor)span_dealloc,
    .tp_as_buffer = &span_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A read-only buffer over parts that lie back to back in memory; made by span().",
    .tp_getset = span_getset,
};

/* span(parts, offsets, total): returns a Span, or a str saying why the parts are not back to back
 * (the caller falls back to a copy).  Malformed arguments raise. */
static PyObject *py_span(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"parts", "offsets", "total", NULL};
    PyObject *parts_obj, *offsets_obj, *parts = NULL, *offsets = NULL, *res = NULL;
    unsigned long long total, expect = 0;
    SpanObject *span = NULL;
    Py_ssize_t n;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOK:span", kwlist, &parts_obj, &offsets_obj, &total)) return NULL;
    parts = PySequence_Fast(parts_obj, "parts must be a sequence of buffers");
    if (!parts) goto cleanup;
    offsets = PySequence_Fast(offsets_obj, "offsets must be a sequence of ints");
    if (!offsets) goto cleanup;
    n = PySequence_Fast_GET_SIZE(parts);
    if (n == 0 || n != PySequence_Fast_GET_SIZE(offsets)) {
        PyErr_Format(PyExc_ValueError, "span: %zd parts and %zd offsets (need the same number, at least one)", n,
                     PySequence_Fast_GET_SIZE(offsets));
        goto cleanup;
    }
    if (total > (unsigned long long)PY_SSIZE_T_MAX) {
        PyErr_SetString(PyExc_ValueError, "span: total is too large");
        goto cleanup;
    }
    span = PyObject_New(SpanObject, &SpanType);
    if (!span) goto cleanup;
    span->views = PyMem_Calloc((size_t)n, sizeof(Py_buffer));
    span->n_views = 0;
    span->exports = 0;
    span->size = (Py_ssize_t)total;
    if (!span->views) {
        PyErr_NoMemory();
        goto cleanup;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_buffer *v = &span->views[i];
        uint64_t off;
        if (to_u64(PySequence_Fast_GET_ITEM(offsets, i), "offset", &off) < 0) goto cleanup;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(parts, i), v, PyBUF_C_CONTIGUOUS) < 0) goto cleanup;
        span->n_views++;
        if (i == 0) span->base = (char *)v->buf;
        if (off != expect || v->len <= 0 || off + (uint64_t)v->len > total) {
            res = PyUnicode_FromFormat("part %zd: offset %llu, %zd bytes; expected offset %llu inside %llu bytes", i,
                                       (unsigned long long)off, v->len, expect, total);
            goto cleanup;
        }
        if ((char *)v->buf != span->base + off) {
            res = PyUnicode_FromFormat("part %zd (offset %llu, %zd bytes) lies %lld bytes from where the layout "
                                       "puts it", i, (unsigned long long)off, v->len,
                                       (long long)((char *)v->buf - (span->base + off)));
            goto cleanup;
        }
        expect = off + (uint64_t)v->len;
    }
    if (expect != total) {
        res = PyUnicode_FromFormat("the parts end at %llu, not at %llu", expect, total);
        goto cleanup;
    }
    res = (PyObject *)span;
    span = NULL;
cleanup:
    if (span) {
        span_clear_views(span);
        Py_DECREF(span);
    }
    Py_XDECREF(parts);
    Py_XDECREF(offsets);
    return res;
}

/* ---- arena files ---------------------------------------------------------------- */

static PyObject *file_dict(const zc_file_info *f) {
    return Py_BuildValue("{s:I,s:I,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:I,s:I,s:I}", "version", (unsigned)f->version,
                         "flags", (unsigned)f->flags, "meta_offset", (unsigned long long)f->meta_offset, "meta_size",
                         (unsigned long long)f->meta_size, "skeleton_offset", (unsigned long long)f->skeleton_offset,
                         "skeleton_size", (unsigned long long)f->skeleton_size, "arena_offset",
                         (unsigned long long)f->arena_offset, "arena_size", (unsigned long long)f->arena_size,
                         "file_size", (unsigned long long)f->file_size, "meta_crc", (unsigned)f->meta_crc,
                         "skeleton_crc", (unsigned)f->skeleton_crc, "header_crc", (unsigned)f->header_crc);
}

static PyObject *py_file_plan(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"meta_size", "skeleton_size", "arena_size", NULL};
    unsigned long long ms, ss, as;
    zc_file_info f;
    int code;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KKK:file_plan", kwlist, &ms, &ss, &as)) return NULL;
    code = zc_file_plan(ms, ss, as, &f);
    if (code) return raise_code(code, code == ZC_ETOOBIG ? "file: the metadata is larger than 16 MiB" : NULL);
    return file_dict(&f);
}

static PyObject *py_file_write_header(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"meta", "skeleton", "arena_size", NULL};
    Py_buffer meta, skel;
    unsigned long long as;
    char header[ZC_FILE_HEADER_SIZE];
    int code;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*y*K:file_write_header", kwlist, &meta, &skel, &as)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    code = zc_file_write_header(header, sizeof header, meta.buf, (size_t)meta.len, skel.buf, (size_t)skel.len, as);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&meta);
    PyBuffer_Release(&skel);
    if (code) return raise_code(code, code == ZC_ETOOBIG ? "file: the metadata is larger than 16 MiB" : NULL);
    return PyBytes_FromStringAndSize(header, sizeof header);
}

static PyObject *py_file_parse(PyObject *self, PyObject *arg) {
    Py_buffer view;
    zc_file_info f;
    char msg[MSG_CAP];
    PyObject *res = NULL, *arena;
    int code;

    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    code = zc_file_validate(view.buf, (size_t)view.len, &f, msg, sizeof msg);
    Py_END_ALLOW_THREADS
    if (code) {
        raise_code(code, msg);
        goto done;
    }
    res = file_dict(&f);
    if (!res) goto done;
    arena = arena_dict((const unsigned char *)view.buf + f.arena_offset, (size_t)f.arena_size, &f.arena);
    if (!arena || PyDict_SetItemString(res, "arena", arena) < 0) Py_CLEAR(res);
    Py_XDECREF(arena);
done:
    PyBuffer_Release(&view);
    return res;
}

static PyObject *py_set_data_crc(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dst", "data_crc", NULL};
    Py_buffer dst;
    unsigned long long crc;
    int code;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "w*K:set_data_crc", kwlist, &dst, &crc)) return NULL;
    if (crc > UINT32_MAX) {
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "data_crc must fit in 32 bits");
        return NULL;
    }
    code = zc_set_data_crc(dst.buf, (size_t)dst.len, (uint32_t)crc);
    PyBuffer_Release(&dst);
    if (code) return raise_code(code, code == ZC_EMAGIC ? "set_data_crc: dst does not start with an arena header" : NULL);
    Py_RETURN_NONE;
}

/* ---- module ------------------------------------------------------------------- */

#define KWFN(f) (PyCFunction)(void (*)(void))(f)

static PyMethodDef module_methods[] = {
    {"dtype_size", py_dtype_size, METH_O, "dtype_size(code)\n--\n\nElement size in bytes of a dtype code."},
    {"dtype_name", py_dtype_name, METH_O, "dtype_name(code)\n--\n\nCanonical name of a dtype code."},
    {"plan", KWFN(py_plan), METH_VARARGS | METH_KEYWORDS,
     "plan(storage_sizes, tensors)\n--\n\nPlans an arena. Returns (data_offset, total_size, storage_offsets), "
     "the offsets relative to the data region."},
    {"write_manifest", KWFN(py_write_manifest), METH_VARARGS | METH_KEYWORDS,
     "write_manifest(dst, storage_sizes, tensors)\n--\n\nWrites the header and manifest into dst."},
    {"write_header", KWFN(py_write_header), METH_VARARGS | METH_KEYWORDS,
     "write_header(dst, storage_sizes, tensors)\n--\n\nWrites the first data_offset bytes of an arena whose data "
     "region is written elsewhere (flag NO_DATA_CRC)."},
    {"span", KWFN(py_span), METH_VARARGS | METH_KEYWORDS,
     "span(parts, offsets, total)\n--\n\nA read-only Span over parts lying back to back at the given offsets, or "
     "a str saying why they do not."},
    {"gather", KWFN(py_gather), METH_VARARGS | METH_KEYWORDS,
     "gather(dst, copies, nthreads=0)\n--\n\nCopies (dst_offset, src_ptr, nbytes) triples into dst on threads."},
    {"finalize", KWFN(py_finalize), METH_VARARGS | METH_KEYWORDS,
     "finalize(dst, nthreads=0)\n--\n\nWrites the data and header CRCs, then validates the arena."},
    {"parse", py_parse, METH_O,
     "parse(buf)\n--\n\nValidates an arena's header and manifest and returns its fields as a dict."},
    {"verify_data", KWFN(py_verify_data), METH_VARARGS | METH_KEYWORDS,
     "verify_data(buf, nthreads=0)\n--\n\nChecks the data region against data_crc."},
    {"crc32c", KWFN(py_crc32c), METH_VARARGS | METH_KEYWORDS, "crc32c(buf, crc=0)\n--\n\nCRC32C of buf, extending crc."},
    {"crc32c_portable", KWFN(py_crc32c_portable), METH_VARARGS | METH_KEYWORDS,
     "crc32c_portable(buf, crc=0)\n--\n\nCRC32C with the portable table implementation."},
    {"crc32c_impl", py_crc32c_impl, METH_NOARGS, "crc32c_impl()\n--\n\n'sse4.2' or 'portable'."},
    {"crc32c_mt", KWFN(py_crc32c_mt), METH_VARARGS | METH_KEYWORDS,
     "crc32c_mt(buf, nthreads=0)\n--\n\nCRC32C of buf computed on threads."},
    {"copy", KWFN(py_copy), METH_VARARGS | METH_KEYWORDS,
     "copy(dst, dst_offset, src, src_offset, nbytes, nthreads=0)\n--\n\nBounds-checked threaded copy."},
    {"copy_to_ptr", KWFN(py_copy_to_ptr), METH_VARARGS | METH_KEYWORDS,
     "copy_to_ptr(dst_ptr, src, src_offset, nbytes, nthreads=0)\n--\n\nCopies from a buffer to a raw address."},
    {"page_size", py_page_size, METH_NOARGS, "page_size()\n--\n\nThe system page size."},
    {"install_fault_handler", py_install_fault_handler, METH_NOARGS,
     "install_fault_handler()\n--\n\nInstalls the SIGSEGV/SIGBUS handler that names protected tensors."},
    {"describe_address", py_describe_address, METH_O,
     "describe_address(addr)\n--\n\nName of the protected tensor at addr, '' inside a protected arena but no "
     "tensor, None if addr is not protected."},
    {"file_plan", KWFN(py_file_plan), METH_VARARGS | METH_KEYWORDS,
     "file_plan(meta_size, skeleton_size, arena_size)\n--\n\nOffsets and sizes of an arena file's sections (dict)."},
    {"file_write_header", KWFN(py_file_write_header), METH_VARARGS | METH_KEYWORDS,
     "file_write_header(meta, skeleton, arena_size)\n--\n\nThe 128-byte header of an arena file (bytes)."},
    {"file_parse", py_file_parse, METH_O,
     "file_parse(buf)\n--\n\nValidates a whole arena file; returns its header fields and, under 'arena', the "
     "arena's (as parse())."},
    {"set_data_crc", KWFN(py_set_data_crc), METH_VARARGS | METH_KEYWORDS,
     "set_data_crc(dst, data_crc)\n--\n\nStores a data checksum in the arena header at the start of dst."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef zc_module = {
    PyModuleDef_HEAD_INIT, "ray_zerocopy._zc", "C core of ray_zerocopy (arena format, copies, CRC32C, mappings).", -1,
    module_methods,
};

static PyObject *new_exception(const char *name, const char *doc, PyObject *bases) {
    PyObject *dict = PyDict_New(), *exc;
    if (!dict) return NULL;
    if (PyDict_SetItemString(dict, "code", Py_None) < 0 || PyDict_SetItemString(dict, "code_name", Py_None) < 0) {
        Py_DECREF(dict);
        return NULL;
    }
    exc = PyErr_NewExceptionWithDoc(name, doc, bases, dict);
    Py_DECREF(dict);
    return exc;
}

static int add_int(PyObject *m, const char *name, long v) { return PyModule_AddIntConstant(m, name, v); }

/* The Pool type and its constants (zcpool.c). */
int zc__ext_pool_init(PyObject *m);
/* The TensorIds type, the packer's persistent_id (zcpickle.c). */
int zc__ext_pickle_init(PyObject *m);
/* The LazyConvert type, convert() and convert_supported() (zcconvert.c). */
int zc__ext_convert_init(PyObject *m);

PyMODINIT_FUNC PyInit__zc(void) {
    PyObject *m = NULL, *codes = NULL, *bases = NULL;

    if (PyType_Ready(&MappingType) < 0 || PyType_Ready(&SpanType) < 0) return NULL;
    m = PyModule_Create(&zc_module);
    if (!m) return NULL;

    if (!ZeroCopyError) {
        ZeroCopyError = new_exception("ray_zerocopy._zc.ZeroCopyError",
                                      "Base class of every error ray_zerocopy raises on purpose.", PyExc_Exception);
        if (!ZeroCopyError) goto fail;
    }
    if (!ArenaError) {
        bases = PyTuple_Pack(2, ZeroCopyError, PyExc_ValueError);
        if (!bases) goto fail;
        ArenaError = new_exception("ray_zerocopy._zc.ArenaError",
                                   "Arena bytes are corrupt or inconsistent, or a format limit is exceeded.\n\n"
                                   "Attributes: code (int, a ZC_E* code) and code_name (str).",
                                   bases);
        Py_CLEAR(bases);
        if (!ArenaError) goto fail;
    }
    if (PyModule_AddObjectRef(m, "ZeroCopyError", ZeroCopyError) < 0 ||
        PyModule_AddObjectRef(m, "ArenaError", ArenaError) < 0 ||
        PyModule_AddObjectRef(m, "Mapping", (PyObject *)&MappingType) < 0 ||
        PyModule_AddObjectRef(m, "Span", (PyObject *)&SpanType) < 0)
        goto fail;

    if (add_int(m, "FORMAT_VERSION", ZC_FORMAT_VERSION) < 0 || add_int(m, "HEADER_SIZE", ZC_HEADER_SIZE) < 0 ||
        add_int(m, "STORAGE_ALIGN", ZC_STORAGE_ALIGN) < 0 || add_int(m, "DATA_ALIGN", ZC_DATA_ALIGN) < 0 ||
        add_int(m, "MAX_NDIM", ZC_MAX_NDIM) < 0 || add_int(m, "MAX_NAME", ZC_MAX_NAME) < 0 ||
        add_int(m, "KIND_PARAMETER", ZC_KIND_PARAMETER) < 0 || add_int(m, "KIND_BUFFER", ZC_KIND_BUFFER) < 0 ||
        add_int(m, "KIND_OTHER", ZC_KIND_OTHER) < 0 || add_int(m, "TFLAG_PERSISTENT", ZC_TFLAG_PERSISTENT) < 0 ||
        add_int(m, "TFLAG_REQUIRES_GRAD", ZC_TFLAG_REQUIRES_GRAD) < 0 ||
        add_int(m, "FLAG_NO_DATA_CRC", ZC_FLAG_NO_DATA_CRC) < 0 ||
        add_int(m, "FILE_HEADER_SIZE", ZC_FILE_HEADER_SIZE) < 0 || add_int(m, "FILE_ARENA_ALIGN", ZC_FILE_ARENA_ALIGN) < 0)
        goto fail;
    {
        static const struct {
            const char *name;
            int code;
        } errs[] = {{"ZC_EINVAL", ZC_EINVAL},       {"ZC_ETRUNCATED", ZC_ETRUNCATED}, {"ZC_EMAGIC", ZC_EMAGIC},
                    {"ZC_EVERSION", ZC_EVERSION},   {"ZC_EHEADER", ZC_EHEADER},       {"ZC_EMANIFEST", ZC_EMANIFEST},
                    {"ZC_ESTORAGE", ZC_ESTORAGE},   {"ZC_ETENSOR", ZC_ETENSOR},       {"ZC_ECHECKSUM", ZC_ECHECKSUM},
                    {"ZC_EOVERFLOW", ZC_EOVERFLOW}, {"ZC_ENOMEM", ZC_ENOMEM},         {"ZC_ETOOBIG", ZC_ETOOBIG},
                    {"ZC_ENODATACRC", ZC_ENODATACRC}};
        for (size_t i = 0; i < sizeof errs / sizeof errs[0]; i++)
            if (add_int(m, errs[i].name, errs[i].code) < 0) goto fail;
    }

    codes = PyDict_New();
    if (!codes) goto fail;
    for (unsigned c = 1; c <= ZC_DT_MAX_; c++) {
        PyObject *v = PyLong_FromUnsignedLong(c);
        int rc = v ? PyDict_SetItemString(codes, zc_dtype_name(c), v) : -1;
        Py_XDECREF(v);
        if (rc < 0) goto fail;
    }
    if (PyModule_AddObjectRef(m, "DTYPE_CODES", codes) < 0) goto fail;
    Py_DECREF(codes);
    if (zc__ext_pool_init(m) < 0 || zc__ext_pickle_init(m) < 0 || zc__ext_convert_init(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
fail:
    Py_XDECREF(codes);
    Py_XDECREF(bases);
    Py_DECREF(m);
    return NULL;
}
