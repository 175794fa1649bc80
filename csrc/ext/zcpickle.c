/*
 * zcpickle.c - TensorIds, the packer's persistent_id callback, in C.
 *
 * The C pickler calls a pickler's persistent_id for every object it saves (a pipeline of 5,000
 * tensors is some 170,000 objects: modules, their dicts, keys, values). A Python method costs a
 * frame per call; this type answers None for everything that is not an instance of the tensor
 * type it was made with, and for a tensor its index in the order tensors were first seen (one
 * index per tensor object, so tied tensors get one index). It holds no reference to anything
 * but its list of the tensors found (and the id -> index dict), so it does not keep objects of
 * the pipeline alive beyond the list.
 *
 * Kept apart from zcmodule.c; zcmodule.c's module init calls zc__ext_pickle_init().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

int zc__ext_pickle_init(PyObject *m);

typedef struct {
    PyObject_HEAD
    PyTypeObject *tensor_type; /* objects of this type (or a subtype) get an index */
    PyObject *index;           /* dict: id(tensor) -> index */
    PyObject *found;           /* list: the tensors, in index order */
} TensorIdsObject;

static int tensorids_init(TensorIdsObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"tensor_type", NULL};
    PyObject *type = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!:TensorIds", kwlist, &PyType_Type, &type)) return -1;
    if (self->found) {
        PyErr_SetString(PyExc_RuntimeError, "TensorIds is already initialized");
        return -1;
    }
    self->index = PyDict_New();
    self->found = PyList_New(0);
    if (!self->index || !self->found) return -1;
    Py_INCREF(type);
    self->tensor_type = (PyTypeObject *)type;
    return 0;
}

static PyObject *tensorids_call(TensorIdsObject *self, PyObject *args, PyObject *kw) {
    PyObject *obj, *key, *idx;
    if (kw && PyDict_GET_SIZE(kw)) {
        PyErr_SetString(PyExc_TypeError, "TensorIds takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "TensorIds", 1, 1, &obj)) return NULL;
    if (!self->tensor_type || !PyObject_TypeCheck(obj, self->tensor_type)) Py_RETURN_NONE;
    key = PyLong_FromVoidPtr(obj);
    if (!key) return NULL;
    idx = PyDict_GetItemWithError(self->index, key); /* borrowed */
    if (idx) {
        Py_DECREF(key);
        return Py_NewRef(idx);
    }
    if (PyErr_Occurred()) goto fail;
    idx = PyLong_FromSsize_t(PyList_GET_SIZE(self->found));
    if (!idx) goto fail;
    if (PyList_Append(self->found, obj) < 0 || PyDict_SetItem(self->index, key, idx) < 0) {
        Py_DECREF(idx);
        goto fail;
    }
    Py_DECREF(key);
    return idx;
fail:
    Py_DECREF(key);
    return NULL;
}

static int tensorids_traverse(TensorIdsObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->tensor_type);
    Py_VISIT(self->index);
    Py_VISIT(self->found);
    return 0;
}

static int tensorids_clear(TensorIdsObject *self) {
    Py_CLEAR(self->tensor_type);
    Py_CLEAR(self->index);
    Py_CLEAR(self->found);
    return 0;
}

static void tensorids_dealloc(TensorIdsObject *self) {
    PyObject_GC_UnTrack(self);
    tensorids_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *tensorids_found(TensorIdsObject *self, void *closure) {
    (void)closure;
    if (!self->found) return PyList_New(0);
    return Py_NewRef(self->found);
}

static PyGetSetDef tensorids_getset[] = {
    {"found", (getter)tensorids_found, NULL, "The tensors seen, in index order (a list; not a copy).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TensorIdsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ray_zerocopy._zc.TensorIds",
    .tp_basicsize = sizeof(TensorIdsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "TensorIds(tensor_type)\n--\n\n"
              "A pickler's persistent_id: returns None for an object that is not a tensor_type,\n"
              "and for a tensor the index of its first appearance (same object, same index).\n"
              "The attribute found lists the tensors in index order.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)tensorids_init,
    .tp_call = (ternaryfunc)tensorids_call,
    .tp_traverse = (traverseproc)tensorids_traverse,
    .tp_clear = (inquiry)tensorids_clear,
    .tp_dealloc = (destructor)tensorids_dealloc,
    .tp_getset = tensorids_getset,
};

int zc__ext_pickle_init(PyObject *m) {
    if (PyType_Ready(&TensorIdsType) < 0) return -1;
    return PyModule_AddObjectRef(m, "TensorIds", (PyObject *)&TensorIdsType);
}
