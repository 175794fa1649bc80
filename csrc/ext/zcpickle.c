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
 * module_state and fresh_tensors are the unpickling side of a rebuild (a task call's fresh
 * pipeline): a module's state set without a Python frame per module, with the empty hook
 * containers the packer left out made here; and the fresh tensor objects of a rebuild made in one
 * C loop.
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

/*
 * The reader's side of module_state, registered by ray_zerocopy.pack at import
 * (set_module_table): its own table (from its torch), the nn.Module type, and the __setstate__
 * functions for which module_state may set the state itself (torch's own nn.Module and _ConvNd
 * ones). Strong references, kept for the life of the process.
 */
static PyObject *reader_table;     /* the reader's (keys, factories) */
static PyObject *reader_module;    /* torch.nn.Module */
static PyObject *reader_setstates; /* tuple of the __setstate__ functions module_state stands for */
static PyObject *last_equal_table; /* the last table found equal to reader_table (identity cache) */

static PyObject *set_module_table(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3 || !PyTuple_Check(args[0]) || !PyType_Check(args[1]) || !PyTuple_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "set_module_table(table, module_type, setstates): a tuple, a type, a tuple");
        return NULL;
    }
    Py_XSETREF(reader_table, Py_NewRef(args[0]));
    Py_XSETREF(reader_module, Py_NewRef(args[1]));
    Py_XSETREF(reader_setstates, Py_NewRef(args[2]));
    Py_CLEAR(last_equal_table);
    Py_RETURN_NONE;
}

/* 1 if `fn` is one of the registered __setstate__ functions, 0 if not, -1 on error. */
static int known_setstate(PyObject *type) {
    static PyObject *name;
    PyObject *fn;
    int found = 0;
    if (!name && !(name = PyUnicode_InternFromString("__setstate__"))) return -1;
    fn = PyObject_GetAttr(type, name);
    if (!fn) {
        PyErr_Clear();
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(reader_setstates); i++)
        if (PyTuple_GET_ITEM(reader_setstates, i) == fn) found = 1;
    Py_DECREF(fn);
    return found;
}

/* 1 if module_state may set the state of `obj` itself: the packer's table is this process's
 * and obj's __setstate__ (and nn.Module's, which _ConvNd's calls) are torch's own. */
static int fast_path(PyObject *table, PyObject *obj) {
    int eq, rc;
    if (!reader_table || !reader_module || !reader_setstates) return 0;
    if (table != last_equal_table) {
        eq = PyObject_RichCompareBool(table, reader_table, Py_EQ);
        if (eq <= 0) return eq;
        Py_XSETREF(last_equal_table, Py_NewRef(table));
    }
    rc = known_setstate((PyObject *)Py_TYPE(obj));
    if (rc <= 0) return rc;
    return known_setstate(reader_module);
}

/*
 * module_state(table, obj, state): what nn.Module.__setstate__ does for a state pickled from a
 * live module (obj.__dict__.update(state); its back-fill of missing hook dicts is a no-op then),
 * plus making the containers the packer left out of the state because they were empty.
 * table is (keys, factories): the first keys of every module's __dict__, in order, and for each
 * None (the state holds it) or a type called with no argument when the state lacks the key
 * (OrderedDict, dict, set). Those keys are inserted first, in table order, so the module's
 * __dict__ has the order the original had; then the rest of the state, in its order.
 * Where the table is not this process's own (another torch wrote the skeleton) or obj's
 * __setstate__ is not torch's own (replaced, e.g. by torch.compile's dynamo, or a type's own),
 * the full state is built the same way and handed to obj.__setstate__, as plain unpickling does.
 */
static PyObject *module_state(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *table, *obj, *state, *keys, *factories, *dict, *rv;
    int fast;
    (void)self;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "module_state() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    table = args[0], obj = args[1], state = args[2];
    if (!PyTuple_Check(table) || PyTuple_GET_SIZE(table) != 2 || !PyTuple_Check(PyTuple_GET_ITEM(table, 0)) ||
        !PyTuple_Check(PyTuple_GET_ITEM(table, 1)) ||
        PyTuple_GET_SIZE(PyTuple_GET_ITEM(table, 0)) != PyTuple_GET_SIZE(PyTuple_GET_ITEM(table, 1))) {
        PyErr_SetString(PyExc_TypeError, "module_state(): table must be a pair of tuples of one length");
        return NULL;
    }
    if (!PyDict_Check(state)) {
        PyErr_Format(PyExc_TypeError, "module_state(): state must be a dict, not %.100s", Py_TYPE(state)->tp_name);
        return NULL;
    }
    fast = fast_path(table, obj);
    if (fast < 0) return NULL;
    keys = PyTuple_GET_ITEM(table, 0), factories = PyTuple_GET_ITEM(table, 1);
    dict = fast ? PyObject_GenericGetDict(obj, NULL) : PyDict_New();
    if (!dict) return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(keys); i++) {
        PyObject *key = PyTuple_GET_ITEM(keys, i), *factory = PyTuple_GET_ITEM(factories, i), *value;
        int rc;
        value = PyDict_GetItemWithError(state, key); /* borrowed */
        if (value) {
            rc = PyDict_SetItem(dict, key, value);
        } else if (PyErr_Occurred()) {
            goto fail;
        } else if (factory == Py_None) {
            PyErr_Format(PyExc_KeyError, "module_state(): the state of a %.100s lacks %R", Py_TYPE(obj)->tp_name, key);
            goto fail;
        } else {
            value = PyObject_CallNoArgs(factory);
            if (!value) goto fail;
            rc = PyDict_SetItem(dict, key, value);
            Py_DECREF(value);
        }
        if (rc < 0) goto fail;
    }
    if (PyDict_Update(dict, state) < 0) goto fail;
    if (fast) {
        Py_DECREF(dict);
        Py_RETURN_NONE;
    }
    rv = PyObject_CallMethod(obj, "__setstate__", "O", dict);
    Py_DECREF(dict);
    return rv;
fail:
    Py_DECREF(dict);
    return NULL;
}

/*
 * fresh_tensors(views, kinds, make, param_type, param_kind): a list with, for every view,
 * make(param_type, view, False) where its kind is param_kind (torch.Tensor._make_subclass: an
 * nn.Parameter without requires_grad) and view.detach() otherwise. New tensor objects sharing
 * the views' bytes, made in one loop without a Python frame.
 */
static PyObject *fresh_tensors(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *views, *kinds, *make, *ptype, *pkind, *out, *detach;
    Py_ssize_t n;
    (void)self;
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "fresh_tensors() takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    views = args[0], kinds = args[1], make = args[2], ptype = args[3], pkind = args[4];
    if (!PyList_Check(views) || !PyList_Check(kinds) || PyList_GET_SIZE(views) != PyList_GET_SIZE(kinds)) {
        PyErr_SetString(PyExc_TypeError, "fresh_tensors(): views and kinds must be lists of one length");
        return NULL;
    }
    n = PyList_GET_SIZE(views);
    out = PyList_New(n);
    if (!out) return NULL;
    detach = PyUnicode_InternFromString("detach");
    if (!detach) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *view = PyList_GET_ITEM(views, i), *t;
        int is_param = PyObject_RichCompareBool(PyList_GET_ITEM(kinds, i), pkind, Py_EQ);
        if (is_param < 0) goto fail;
        if (is_param) {
            PyObject *margs[3] = {ptype, view, Py_False};
            t = PyObject_Vectorcall(make, margs, 3, NULL);
        } else {
            t = PyObject_CallMethodNoArgs(view, detach);
        }
        if (!t) goto fail;
        PyList_SET_ITEM(out, i, t);
    }
    Py_DECREF(detach);
    return out;
fail:
    Py_XDECREF(detach);
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef pickle_methods[] = {
    {"set_module_table", (PyCFunction)(void (*)(void))set_module_table, METH_FASTCALL,
     "set_module_table(table, module_type, setstates)\n--\n\n"
     "Registers this process's module table, nn.Module and the __setstate__ functions\n"
     "module_state may stand for (ray_zerocopy.pack does, at import)."},
    {"module_state", (PyCFunction)(void (*)(void))module_state, METH_FASTCALL,
     "module_state(table, obj, state)\n--\n\n"
     "Sets a module's state as nn.Module.__setstate__ does, first the keys of table[0] in order\n"
     "(from the state, or made by calling table[1][i] where the state lacks them), then the rest;\n"
     "through obj.__setstate__ where the table or the __setstate__ is not this process's own."},
    {"fresh_tensors", (PyCFunction)(void (*)(void))fresh_tensors, METH_FASTCALL,
     "fresh_tensors(views, kinds, make, param_type, param_kind)\n--\n\n"
     "New tensor objects over the views: make(param_type, v, False) where the kind is\n"
     "param_kind, v.detach() otherwise."},
    {NULL, NULL, 0, NULL},
};

int zc__ext_pickle_init(PyObject *m) {
    if (PyType_Ready(&TensorIdsType) < 0) return -1;
    if (PyModule_AddFunctions(m, pickle_methods) < 0) return -1;
    return PyModule_AddObjectRef(m, "TensorIds", (PyObject *)&TensorIdsType);
}
