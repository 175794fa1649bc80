/*
 * zcconvert.c - the LazyConvert type (a read-only buffer over a lazy region of the core,
 * convert.c) and convert()/convert_supported().  Used by ray_zerocopy.files to convert a
 * checkpoint's dtype on its way into the object store within a bounded window of memory.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <string.h>

#include "zerocopy/zc.h"

static PyObject *convert_error(int code, const char *what) {
    if (code == ZC_ENOMEM) return PyErr_NoMemory();
    if (code < 0 && code > ZC_EINVAL) {
        errno = -code;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyErr_Format(PyExc_ValueError, "%s: %s", what, zc_strerror(code));
    return NULL;
}

typedef struct {
    PyObject_HEAD
    zc_lazy *lazy;
    PyObject *owners; /* Whatever keeps the sources mapped (a list), until the region goes. */
} LazyObject;

static void lazy_dealloc(LazyObject *self) {
    zc_lazy_destroy(self->lazy);
    Py_XDECREF(self->owners);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* LazyConvert(segments, dst_code, size, chunk, max_chunks, owners)
 * segments: a sequence of (src_address, src_code, count, dst_offset). */
static int lazy_init(LazyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"segments", "dst_code", "size", "chunk", "max_chunks", "owners", NULL};
    PyObject *segs_obj, *owners, *seq = NULL;
    unsigned dst_code, max_chunks;
    Py_ssize_t size, chunk, n;
    zc_convert_seg *segs = NULL;
    int code, rc = -1;

    if (self->lazy) {
        PyErr_SetString(PyExc_RuntimeError, "LazyConvert is already initialized");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OInnIO:LazyConvert", kwlist, &segs_obj, &dst_code, &size,
                                     &chunk, &max_chunks, &owners))
        return -1;
    if (size <= 0 || chunk <= 0) {
        PyErr_SetString(PyExc_ValueError, "LazyConvert: size and chunk must be positive");
        return -1;
    }
    seq = PySequence_Fast(segs_obj, "segments must be a sequence of (address, src_code, count, offset)");
    if (!seq) return -1;
    n = PySequence_Fast_GET_SIZE(seq);
    segs = (zc_convert_seg *)PyMem_Calloc(n ? (size_t)n : 1, sizeof *segs);
    if (!segs) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long addr, count, offset;
        unsigned src_code;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KIKK:segment", &addr, &src_code, &count, &offset))
            goto done;
        segs[i].src = (const void *)(uintptr_t)addr;
        segs[i].src_dtype = src_code;
        segs[i].count = count;
        segs[i].dst_offset = offset;
    }
    code = zc_lazy_create(segs, (size_t)n, dst_code, (size_t)size, (size_t)chunk, max_chunks, &self->lazy);
    if (code) {
        convert_error(code, "LazyConvert");
        goto done;
    }
    Py_INCREF(owners);
    self->owners = owners;
    rc = 0;
done:
    PyMem_Free(segs);
    Py_XDECREF(seq);
    return rc;
}

static int lazy_getbuffer(LazyObject *self, Py_buffer *view, int flags) {
    if (!self->lazy) {
        PyErr_SetString(PyExc_ValueError, "LazyConvert is not initialized");
        view->obj = NULL;
        return -1;
    }
    /* The export holds a reference: the region outlives every view of it. */
    return PyBuffer_FillInfo(view, (PyObject *)self, (void *)zc_lazy_data(self->lazy),
                             (Py_ssize_t)zc_lazy_size(self->lazy), 1, flags);
}

static PyBufferProcs lazy_as_buffer = {(getbufferproc)lazy_getbuffer, NULL};

static PyObject *lazy_stats(LazyObject *self, PyObject *unused) {
    zc_lazy_stats st;
    if (!self->lazy) return PyDict_New();
    zc_lazy_get_stats(self->lazy, &st);
    return Py_BuildValue("{sKsKsIsIsKsIsK}", "fills", (unsigned long long)st.fills, "evictions",
                         (unsigned long long)st.evictions, "peak_resident", st.peak_resident, "resident",
                         st.resident, "chunk", (unsigned long long)st.chunk, "max_chunks", st.max_chunks,
                         "n_chunks", (unsigned long long)st.n_chunks);
}

static PyMethodDef lazy_methods[] = {
    {"stats", (PyCFunction)lazy_stats, METH_NOARGS,
     "stats()\n--\n\nfills, evictions, peak_resident, resident, chunk, max_chunks, n_chunks."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LazyType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ray_zerocopy._zc.LazyConvert",
    .tp_basicsize = sizeof(LazyObject),
    .tp_dealloc = (destructor)lazy_dealloc,
    .tp_as_buffer = &lazy_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "LazyConvert(segments, dst_code, size, chunk, max_chunks, owners)\n--\n\n"
              "A read-only buffer of size bytes whose content is each segment's (address, src_code,\n"
              "count, offset) source elements converted to dst_code, made on first read chunk by\n"
              "chunk with at most max_chunks chunks resident. owners is kept alive with it.",
    .tp_methods = lazy_methods,
    .tp_init = (initproc)lazy_init,
    .tp_new = PyType_GenericNew,
};

/* convert(dst, dst_code, src, src_code): converts every element of src into dst. */
static PyObject *py_convert(PyObject *self, PyObject *args) {
    Py_buffer dst, src;
    unsigned dst_code, src_code;
    size_t dsz, ssz, n;
    int code;
    if (!PyArg_ParseTuple(args, "w*Iy*I:convert", &dst, &dst_code, &src, &src_code)) return NULL;
    dsz = zc_dtype_size(dst_code);
    ssz = zc_dtype_size(src_code);
    n = ssz ? (size_t)src.len / ssz : 0;
    if (!zc_convert_supported(dst_code, src_code) || ssz == 0) {
        code = ZC_EINVAL;
    } else if ((size_t)src.len % ssz || (size_t)dst.len != n * dsz) {
        PyBuffer_Release(&dst);
        PyBuffer_Release(&src);
        PyErr_SetString(PyExc_ValueError, "convert: dst must hold exactly the elements of src");
        return NULL;
    } else {
        Py_BEGIN_ALLOW_THREADS code = zc_convert(dst.buf, dst_code, src.buf, src_code, n);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    if (code) return convert_error(code, "convert");
    Py_RETURN_NONE;
}

static PyObject *py_lazy_totals(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"reset_peak", NULL};
    int reset = 0;
    zc_lazy_totals t;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p:lazy_totals", kwlist, &reset)) return NULL;
    zc_lazy_get_totals(&t, reset);
    return Py_BuildValue("{sKsKsKsKsKsK}", "regions_created", (unsigned long long)t.regions_created,
                         "regions_alive", (unsigned long long)t.regions_alive, "fills",
                         (unsigned long long)t.fills, "evictions", (unsigned long long)t.evictions,
                         "resident_bytes", (unsigned long long)t.resident_bytes, "peak_resident_bytes",
                         (unsigned long long)t.peak_resident_bytes);
}

static PyObject *py_convert_supported(PyObject *self, PyObject *args) {
    unsigned dst_code, src_code;
    if (!PyArg_ParseTuple(args, "II:convert_supported", &dst_code, &src_code)) return NULL;
    return PyBool_FromLong(zc_convert_supported(dst_code, src_code));
}

static PyMethodDef convert_methods[] = {
    {"convert", py_convert, METH_VARARGS,
     "convert(dst, dst_code, src, src_code)\n--\n\nConverts src's elements into dst as Tensor.to() does."},
    {"convert_supported", py_convert_supported, METH_VARARGS,
     "convert_supported(dst_code, src_code)\n--\n\nWhether convert() and LazyConvert handle the pair."},
    {"lazy_totals", (PyCFunction)(void (*)(void))py_lazy_totals, METH_VARARGS | METH_KEYWORDS,
     "lazy_totals(reset_peak=False)\n--\n\nCounters over every LazyConvert region of the process\n"
     "(regions_created, regions_alive, fills, evictions, resident_bytes, peak_resident_bytes);\n"
     "reset_peak starts peak_resident_bytes again from resident_bytes."},
    {NULL, NULL, 0, NULL},
};

int zc__ext_convert_init(PyObject *m);

int zc__ext_convert_init(PyObject *m) {
    if (PyType_Ready(&LazyType) < 0) return -1;
    if (PyModule_AddObjectRef(m, "LazyConvert", (PyObject *)&LazyType) < 0) return -1;
    return PyModule_AddFunctions(m, convert_methods);
}
