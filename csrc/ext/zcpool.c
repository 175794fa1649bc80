/*
 * zcpool.c - the Pool type of ray_zerocopy._zc: a persistent thread pool of the C core
 * (zc_pool_*) and its chunked copy, with the GIL released while bytes move.
 *
 * Kept apart from zcmodule.c; zcmodule.c's module init calls zc__ext_pool_init().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>

#include "zerocopy/zc.h"

int zc__ext_pool_init(PyObject *m);

typedef struct {
    PyObject_HEAD
    zc_pool *pool;
    int busy; /* Copies in progress (the GIL is released during them). */
} PoolObject;

static PyObject *pool_error(int code) {
    if (code == ZC_EINVAL) return PyErr_Format(PyExc_ValueError, "invalid argument (%s)", zc_strerror(code));
    if (code == ZC_ENOMEM) return PyErr_NoMemory();
    errno = -code;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static int pool_init(PoolObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"nthreads", "spin_us", NULL};
    int nthreads = 0, spin_us = 0, rc;
    zc_pool *pool = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|ii:Pool", kwlist, &nthreads, &spin_us)) return -1;
    if (self->pool) {
        PyErr_SetString(PyExc_RuntimeError, "Pool is already initialized");
        return -1;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = zc_pool_create(nthreads, spin_us, &pool);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        pool_error(rc);
        return -1;
    }
    self->pool = pool;
    return 0;
}

static void pool_dealloc(PoolObject *self) {
    zc_pool *pool = self->pool;
    self->pool = NULL;
    if (pool) {
        Py_BEGIN_ALLOW_THREADS
        zc_pool_destroy(pool);
        Py_END_ALLOW_THREADS
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int get_pool(PoolObject *self) {
    if (!self->pool) {
        PyErr_SetString(PyExc_ValueError, "the Pool is closed");
        return -1;
    }
    return 0;
}

static int to_size(PyObject *o, const char *what, unsigned long long max, unsigned long long *out) {
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError) || PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s must be a non-negative integer", what);
        }
        return -1;
    }
    if (v > max) {
        PyErr_Format(PyExc_ValueError, "%s is too large (%llu)", what, v);
        return -1;
    }
    *out = v;
    return 0;
}

static int in_range(const char *what, unsigned long long off, unsigned long long n, Py_ssize_t len) {
    unsigned long long end;
    if (__builtin_add_overflow(off, n, &end) || end > (unsigned long long)len) {
        PyErr_Format(PyExc_ValueError, "%s range [%llu, %llu + %llu) lies outside the buffer (%zd bytes)", what, off,
                     off, n, len);
        return -1;
    }
    return 0;
}

static PyObject *run_copy(PoolObject *self, void *dst, const void *src, size_t n, int nparts, int mode) {
    int rc;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    rc = zc_pool_copy(self->pool, dst, src, n, nparts, mode);
    Py_END_ALLOW_THREADS
    self->busy--;
    if (rc != 0) return pool_error(rc);
    Py_RETURN_NONE;
}

static PyObject *pool_copy_to_ptr(PoolObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dst_ptr", "src", "src_offset", "nbytes", "nparts", "mode", NULL};
    Py_buffer src;
    PyObject *ptr_o, *off_o, *n_o, *res = NULL;
    unsigned long long ptr, off, n;
    int nparts = 0, mode = ZC_COPY_AUTO;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oy*OO|ii:copy_to_ptr", kwlist, &ptr_o, &src, &off_o, &n_o, &nparts,
                                     &mode))
        return NULL;
    if (get_pool(self) < 0 || to_size(ptr_o, "dst_ptr", UINTPTR_MAX, &ptr) < 0 ||
        to_size(off_o, "src_offset", UINT64_MAX, &off) < 0 || to_size(n_o, "nbytes", SIZE_MAX, &n) < 0 ||
        in_range("src", off, n, src.len) < 0)
        goto done;
    if (n && !ptr) {
        PyErr_SetString(PyExc_ValueError, "dst_ptr is 0");
        goto done;
    }
    res = run_copy(self, (void *)(uintptr_t)ptr, (const unsigned char *)src.buf + off, (size_t)n, nparts, mode);
done:
    PyBuffer_Release(&src);
    return res;
}

static PyObject *pool_copy(PoolObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dst", "dst_offset", "src", "src_offset", "nbytes", "nparts", "mode", NULL};
    Py_buffer dst, src;
    PyObject *doff_o, *soff_o, *n_o, *res = NULL;
    unsigned long long doff, soff, n;
    int nparts = 0, mode = ZC_COPY_AUTO;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "w*Oy*OO|ii:copy", kwlist, &dst, &doff_o, &src, &soff_o, &n_o, &nparts,
                                     &mode))
        return NULL;
    if (get_pool(self) < 0 || to_size(doff_o, "dst_offset", UINT64_MAX, &doff) < 0 ||
        to_size(soff_o, "src_offset", UINT64_MAX, &soff) < 0 || to_size(n_o, "nbytes", SIZE_MAX, &n) < 0 ||
        in_range("dst", doff, n, dst.len) < 0 || in_range("src", soff, n, src.len) < 0)
        goto done;
    res = run_copy(self, (unsigned char *)dst.buf + doff, (const unsigned char *)src.buf + soff, (size_t)n, nparts,
                   mode);
done:
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    return res;
}

static PyObject *pool_close(PoolObject *self, PyObject *unused) {
    zc_pool *pool = self->pool;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "the Pool is copying in another thread; close it afterwards");
        return NULL;
    }
    self->pool = NULL;
    if (pool) {
        Py_BEGIN_ALLOW_THREADS
        zc_pool_destroy(pool);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static PyObject *pool_get_size(PoolObject *self, void *closure) {
    return PyLong_FromLong(self->pool ? zc_pool_size(self->pool) : 0);
}

static PyObject *pool_get_closed(PoolObject *self, void *closure) { return PyBool_FromLong(self->pool == NULL); }

static PyMethodDef pool_methods[] = {
    {"copy_to_ptr", (PyCFunction)(void (*)(void))pool_copy_to_ptr, METH_VARARGS | METH_KEYWORDS,
     "copy_to_ptr(dst_ptr, src, src_offset, nbytes, nparts=0, mode=COPY_AUTO)\n--\n\n"
     "Copies nbytes of src (a buffer) at src_offset to the raw address dst_ptr on the pool's threads,\n"
     "in up to nparts parts (0: one per thread), with the GIL released. mode: COPY_PLAIN (memcpy),\n"
     "COPY_NT (non-temporal stores) or COPY_AUTO (non-temporal stores for parts of 256 KiB or more)."},
    {"copy", (PyCFunction)(void (*)(void))pool_copy, METH_VARARGS | METH_KEYWORDS,
     "copy(dst, dst_offset, src, src_offset, nbytes, nparts=0, mode=COPY_AUTO)\n--\n\n"
     "Bounds-checked copy between two buffers on the pool's threads (see copy_to_ptr)."},
    {"close", (PyCFunction)pool_close, METH_NOARGS, "close()\n--\n\nStops and joins the threads."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pool_getset[] = {
    {"size", (getter)pool_get_size, NULL, "Number of participants (worker threads + the caller); 0 once closed.",
     NULL},
    {"closed", (getter)pool_get_closed, NULL, "Whether close() has been called.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PoolType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ray_zerocopy._zc.Pool",
    .tp_basicsize = sizeof(PoolObject),
    .tp_dealloc = (destructor)pool_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Pool(nthreads=0, spin_us=0)\n--\n\n"
              "A persistent thread pool of the C core: nthreads participants (0: one per CPU), the\n"
              "calling thread included, started once. Idle threads poll for spin_us microseconds\n"
              "before they sleep. Copies from several Python threads take turns. In a child\n"
              "process after fork() the copies run on the calling thread.",
    .tp_methods = pool_methods,
    .tp_getset = pool_getset,
    .tp_init = (initproc)pool_init,
    .tp_new = PyType_GenericNew,
};

static PyObject *py_nt_stores_available(PyObject *self, PyObject *unused) {
    return PyBool_FromLong(zc_nt_stores_available());
}

static PyMethodDef pool_module_methods[] = {
    {"nt_stores_available", py_nt_stores_available, METH_NOARGS,
     "nt_stores_available()\n--\n\nWhether non-temporal stores are compiled in (else COPY_NT is memcpy)."},
    {NULL, NULL, 0, NULL},
};

int zc__ext_pool_init(PyObject *m) {
    if (PyType_Ready(&PoolType) < 0) return -1;
    if (PyModule_AddObjectRef(m, "Pool", (PyObject *)&PoolType) < 0) return -1;
    if (PyModule_AddFunctions(m, pool_module_methods) < 0) return -1;
    if (PyModule_AddIntConstant(m, "COPY_PLAIN", ZC_COPY_PLAIN) < 0 ||
        PyModule_AddIntConstant(m, "COPY_NT", ZC_COPY_NT) < 0 ||
        PyModule_AddIntConstant(m, "COPY_AUTO", ZC_COPY_AUTO) < 0 ||
        PyModule_AddIntConstant(m, "POOL_MAX_THREADS", ZC_POOL_MAX_THREADS) < 0)
        return -1;
    return 0;
}
