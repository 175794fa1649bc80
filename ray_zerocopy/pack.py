"""Packing: a pipeline becomes a skeleton (its structure, no tensor data) and an arena.

The skeleton is a cloudpickle of the pipeline in which every tensor is replaced by a
persistent reference to its entry in the arena's manifest, so pickling never touches tensor
bytes, the original pipeline is left untouched, and objects that appear twice (tied weights, a
module referenced by two attributes) appear once in the pickle and come back shared.
The arena (docs/format.md) holds each unique storage once, laid out and filled by the C core.
"""

from __future__ import annotations

import copyreg
import functools
import io
import itertools
import mmap
import operator
import pickle
import struct
import sys
import types
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, SupportsIndex

import cloudpickle
import numpy as np
import torch
from torch import nn

from . import _zc
from .dtypes import code_of
from .errors import PackError

__all__ = ["pack", "store_parts", "StoreArena", "find_modules", "Packed", "SKELETON_MAGIC"]

_jit_reduce: Callable[[Any], Any] | None
try:  # the JIT reducers (TorchScript, torch.compile, torch.export); optional module
    from .jit import reduce as _jit_reduce
except ImportError:  # pragma: no cover - only while ray_zerocopy.jit does not exist
    _jit_reduce = None

#: First bytes of every skeleton; followed by the manifest CRC32C of its arena (u32 LE).
SKELETON_MAGIC = b"RZCSKEL1"
_SKELETON_HEADER = struct.Struct("<8sI")

#: Bytes of the zero guard storages before and after the weights (one page).
GUARD_BYTES = 4096

# Values that cannot hold a module or tensor; the walker does not look inside them.
_ATOMIC = (
    str,
    bytes,
    bytearray,
    int,
    float,
    complex,
    bool,
    type(None),
    type,
    range,
    slice,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.ModuleType,
    types.MethodType,
    torch.dtype,
    torch.device,
    torch.Size,
    np.ndarray,
    np.generic,
)

_ALLOWED_TENSOR_TYPES = (torch.Tensor, nn.Parameter) + (
    (nn.Buffer,) if hasattr(nn, "Buffer") else ()
)


# What the walker records of a tensor: (attribute path, _zc.KIND_*, persistent buffer). A plain
# tuple: a pipeline has thousands of tensors, and a dataclass costs a Python call for each.
_TensorName = tuple[str, int, bool]


@dataclass
class Packed:
    """The result of :func:`pack`: unpack with ``skeleton, arena = packed``.

    Attributes:
        skeleton: the pickled structure of the pipeline (bytes, no tensor data).
        arena: the weights as one uint8 numpy array in the arena format.
        tensor_names: attribute path of every tensor, in manifest order.
        weight_bytes: bytes of tensor storage in the arena (without padding).
    """

    skeleton: bytes
    arena: np.ndarray
    tensor_names: list[str]
    weight_bytes: int

    def __iter__(self):
        return iter((self.skeleton, self.arena))


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


_ATOMIC_TYPES = frozenset(_ATOMIC) | {bool}
_CONTAINER_TYPES = (dict, list, tuple, set, frozenset)
# Containers the walker drops when empty: the exact types above, and OrderedDict (a module's
# dozen hook dicts, nearly always empty). The walker never looks at a container's attributes.
_EMPTY_DROPPED = frozenset((*_CONTAINER_TYPES, OrderedDict))
_MODULE_SLOTS = frozenset(("_parameters", "_buffers", "_modules"))


def _path(parent: str, key: Any, style: int) -> str:
    if style == 0:
        return f"{parent}.{key}" if parent else key
    if style == 1:
        return f"{parent}[{key}]"
    if style == 2:
        return f"{parent}[{key!r}]"
    return f"{parent}{{}}"


def _walk(root: Any) -> tuple[list[tuple[str, nn.Module]], dict[int, _TensorName]]:
    """Finds every module and tensor reachable from root, with its first attribute path.

    Depth-first, children in attribute order. Values that cannot hold a module or tensor
    (numbers, strings, empty containers, ...) are dropped before they are pushed, and paths
    are made only for what is visited: a module holds a dozen hook dicts, mostly empty.
    """
    modules: list[tuple[str, nn.Module]] = []
    names: dict[int, _TensorName] = {}
    seen: set[int] = set()
    # (value, parent path, key, path style): 0 attribute, 1 index, 2 dict key, 3 set member.
    stack: list[tuple[Any, str, Any, int]] = [(root, "", "", 0)]
    atomic, dropped, tensor_t, module_t = _ATOMIC_TYPES, _EMPTY_DROPPED, torch.Tensor, nn.Module

    def record(t: Any, path: str, kind: int, persistent: bool) -> None:
        prev = names.get(id(t))
        if prev is None or (prev[1] == _zc.KIND_OTHER and kind != _zc.KIND_OTHER):
            names[id(t)] = (path, kind, persistent)

    def keep(v: Any) -> bool:
        tv = type(v)
        if tv in atomic:
            return False
        return not (tv in dropped and not v)

    while stack:
        obj, parent, key, style = stack.pop()
        if isinstance(obj, tensor_t):
            record(obj, _path(parent, key, style), _zc.KIND_OTHER, False)
            continue
        if isinstance(obj, _ATOMIC) or id(obj) in seen:
            continue
        seen.add(id(obj))
        path = _path(parent, key, style)
        children: list[tuple[Any, str, Any, int]]
        if isinstance(obj, module_t):
            modules.append((path, obj))
            for n, p in obj._parameters.items():
                if p is not None:
                    record(p, _join(path, n), _zc.KIND_PARAMETER, False)
            nonpersistent = getattr(obj, "_non_persistent_buffers_set", ())
            for n, b in obj._buffers.items():
                if b is not None:
                    record(b, _join(path, n), _zc.KIND_BUFFER, n not in nonpersistent)
            children = [(m, path, n, 0) for n, m in obj._modules.items() if m is not None]
            children += [
                (v, path, k, 0) for k, v in vars(obj).items() if k not in _MODULE_SLOTS and keep(v)
            ]
        elif isinstance(obj, (list, tuple)):
            children = [(v, path, i, 1) for i, v in enumerate(obj) if keep(v)]
        elif isinstance(obj, dict):
            children = [(v, path, k, 2) for k, v in obj.items() if keep(v)]
        elif isinstance(obj, (set, frozenset)):
            children = [(v, path, None, 3) for v in obj if keep(v)]
        else:
            children = []
            d = getattr(obj, "__dict__", None)
            if isinstance(d, dict):
                children += [(v, path, k, 0) for k, v in d.items() if keep(v)]
            for slot in getattr(type(obj), "__slots__", ()) or ():
                if isinstance(slot, str) and hasattr(obj, slot):
                    children.append((getattr(obj, slot), path, slot, 0))
        stack.extend(reversed(children))
    return modules, names


def find_modules(pipeline: Any) -> list[tuple[str, nn.Module]]:
    """Returns every ``nn.Module`` reachable from ``pipeline`` with its attribute path.

    The pipeline itself (path ``""``), attributes at any depth, modules inside lists, tuples,
    dicts, ``ModuleList``/``ModuleDict`` and plain objects are found; each module once, under
    the first path that reaches it.

    Example:
        >>> class P:
        ...     def __init__(self):
        ...         self.heads = [nn.Linear(2, 2)]
        >>> [p for p, _ in find_modules(P())]
        ['heads[0]']
    """
    return _walk(pipeline)[0]


def _module_table() -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """The attributes ``nn.Module.__init__`` gives every module, in their order, and for each
    the type of the empty container it starts as (``None`` where it is not one): the table of
    :func:`ray_zerocopy._zc.module_state`. Read from the installed torch, not written down."""
    fresh = vars(nn.Module())
    factories = tuple(
        type(v) if type(v) in (OrderedDict, dict, set) and not v else None for v in fresh.values()
    )
    return tuple(fresh), factories


_MODULE_TABLE = _module_table()
_MODULE_KEYS = _MODULE_TABLE[0]
_MODULE_EMPTY = tuple((k, f) for k, f in zip(*_MODULE_TABLE) if f is not None)
# Pickled once per skeleton (then memoized): the state setter of every module pickled through
# _module_reduce. The table travels with it, so the reader never depends on its own torch's.
_MODULE_SETTER = functools.partial(_zc.module_state, _MODULE_TABLE)
# What object.__reduce_ex__ names for NEWOBJ (cls.__new__(cls)); typeshed does not declare it.
_NEWOBJ = copyreg.__newobj__  # type: ignore[attr-defined]

# __setstate__ methods whose only work beyond nn.Module's (which updates __dict__, then fills in
# hook dicts a module pickled by an older torch lacks) is to fill in missing attributes: for a
# state taken from a live module that has these keys, module_state does the same. Recognized
# by where torch defines them, not by identity: torch.compile (dynamo) replaces
# nn.Module.__setstate__ with a wrapper that also tags the module, and that one is not ours to
# stand for.
_TORCH_SETSTATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("torch.nn.modules.module", "Module.__setstate__"): (),
    ("torch.nn.modules.conv", "_ConvNd.__setstate__"): ("padding_mode",),
}


def _torch_setstate_keys(fn: Any) -> tuple[str, ...] | None:
    """For torch's own ``__setstate__`` of nn.Module or _ConvNd, the keys it fills in if
    missing; None for any other function (a replacement, a type's own)."""
    key = (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None))
    return _TORCH_SETSTATES.get(key)  # type: ignore[arg-type]


def _register_module_table() -> tuple[Any, ...]:
    """Tells _zc.module_state, the reader's side, this process's table and the torch-own
    ``__setstate__`` functions it may stand for (found now: a replacement made later is seen
    by identity at every call)."""
    fns = [getattr(nn.Module, "__setstate__", None)]
    try:
        from torch.nn.modules.conv import _ConvNd

        fns.append(getattr(_ConvNd, "__setstate__", None))
    except ImportError:  # pragma: no cover - torch without _ConvNd
        pass
    own = tuple(f for f in fns if _torch_setstate_keys(f) is not None)
    _zc.set_module_table(_MODULE_TABLE, nn.Module, own)
    return own


_OWN_SETSTATES = _register_module_table()


def _sole_refs() -> int:
    """What ``sys.getrefcount`` says, in a loop shaped as :func:`_module_reduce`'s, of an empty
    container that nothing but its module holds (the module's ``__dict__``, the state's copy,
    the loop variable, the call's argument: 4 on CPython 3.11; measured, not assumed, since
    interpreters differ in which of these count)."""
    m = nn.Module()
    state = m.__getstate__()
    refs = sys.getrefcount
    for k, _ in _MODULE_EMPTY:
        v = state[k]
        return refs(v)
    return 0


_SOLE_REFS = _sole_refs()


def _module_keys_needed(t: type, dispatch_table: Any) -> tuple[str, ...] | None:
    """For a module type that pickles the plain way (``object.__reduce_ex__``, nn.Module's
    ``__getstate__``, a known ``__setstate__``, no reducer registered for it), the state keys
    its ``__setstate__`` would fill in if missing; ``None`` for any other type."""
    if (
        getattr(t, "__reduce_ex__", None) is not object.__reduce_ex__
        or getattr(t, "__reduce__", None) is not object.__reduce__
        or getattr(t, "__getstate__", None) is not nn.Module.__getstate__
        or hasattr(t, "__getnewargs_ex__")
        or hasattr(t, "__getnewargs__")
        or issubclass(t, (list, dict))
        or t in dispatch_table
        or t in copyreg.dispatch_table
        # _ConvNd's calls nn.Module's: both must be torch's own
        or _torch_setstate_keys(getattr(nn.Module, "__setstate__", None)) is None
    ):
        return None
    return _torch_setstate_keys(getattr(t, "__setstate__", None))


class _SkeletonPickler(cloudpickle.Pickler):
    """cloudpickle that replaces every tensor by a persistent id (its manifest index).

    The pickler consults ``persistent_id`` for every object and ``reducer_override`` for every
    object that is not of a basic type (a pipeline of 5,000 tensors: some 170,000 and 30,000
    calls), so both are kept cheap: ``persistent_id`` is :class:`ray_zerocopy._zc.TensorIds`
    (C; tensors get the index of their first appearance, anything else None), and
    ``reducer_override`` remembers the types for which neither the JIT reducers nor cloudpickle
    have anything to say, and answers ``NotImplemented`` for them at once (classes and functions
    excepted: cloudpickle pickles some by reference and others by value). A plain
    ``OrderedDict`` is reduced as its own ``__reduce__`` would, minus the slot-name lookup
    CPython repeats for it on every call (``copyreg._slotnames`` cannot cache its answer on a
    built-in type); the bytes written are the same.

    A module whose type pickles the plain way (see :func:`_module_keys_needed`) is reduced as
    ``object.__reduce_ex__`` would, with two changes that make it cheaper to pickle and to
    unpickle (a task call unpickles a fresh pipeline every time): the empty containers
    ``nn.Module.__init__`` makes (a dozen hook dicts, and often ``_buffers``, ``_modules``) are
    left out of the state when nothing else refers to them, and the state is set by
    :func:`ray_zerocopy._zc.module_state` (C), which makes them again, empty, in their place in
    ``__dict__``'s order. The rebuilt module is the one plain pickling gives.
    """

    def __init__(self, file: io.BytesIO):
        super().__init__(file, protocol=5)
        self._ids = _zc.TensorIds(torch.Tensor)
        self.persistent_id = self._ids
        self._plain: set[type] = set()
        self._modules_ok: dict[type, tuple[str, ...] | None] = {}

    @property
    def found(self) -> list[torch.Tensor]:
        """Every tensor pickled, in persistent-id order."""
        return self._ids.found

    def reducer_override(self, obj: Any) -> Any:
        t = type(obj)
        if t in self._plain:
            return NotImplemented
        if t is OrderedDict and not obj.__dict__:
            return OrderedDict, (), None, None, iter(obj.items())
        # Modules that plain pickling cannot share zero-copy (TorchScript, torch.compile,
        # torch.export) reduce through ray_zerocopy.jit; their tensors still become
        # persistent ids, i.e. arena entries.
        if _jit_reduce is not None:
            rv = _jit_reduce(obj)
            if rv is not NotImplemented:
                return rv
        if isinstance(obj, nn.Module):
            try:
                needed = self._modules_ok[t]
            except KeyError:
                needed = self._modules_ok[t] = _module_keys_needed(t, self.dispatch_table)
            if needed is not None:
                # NotImplemented for a module whose __dict__ is not as nn.Module.__init__ made
                # it: pickled the plain way, as cloudpickle would (it has no reducer for
                # instances).
                return _module_reduce(obj, needed)
        rv = super().reducer_override(obj)
        # cloudpickle decides per object for classes and functions (by reference or by value)
        if rv is NotImplemented and not issubclass(t, (type, types.FunctionType)):
            self._plain.add(t)
        return rv


def _module_reduce(obj: nn.Module, needed: tuple[str, ...]) -> Any:
    """The reduce tuple of a module of a type :func:`_module_keys_needed` accepts (see
    :class:`_SkeletonPickler`), or ``NotImplemented`` if its state does not start with the keys
    ``nn.Module.__init__`` makes, in their order, or lacks a key its ``__setstate__`` needs."""
    state = obj.__getstate__()
    if tuple(itertools.islice(state, len(_MODULE_KEYS))) != _MODULE_KEYS or not all(
        k in state for k in needed
    ):
        return NotImplemented
    refs = sys.getrefcount
    for k, f in _MODULE_EMPTY:
        v = state[k]
        # Left out only when empty, of the exact type, and held by nothing but the module
        # (another holder must get the same object back, so it is pickled as it is).
        if (
            type(v) is f
            and not v
            and refs(v) <= _SOLE_REFS
            and (f is not OrderedDict or not v.__dict__)
        ):
            del state[k]
    return _NEWOBJ, (type(obj),), state, None, None, _MODULE_SETTER


def _find_unpicklable(root: Any) -> str | None:
    """Returns the attribute path of the deepest value under root that cannot be pickled."""

    def fails(value: Any) -> bool:
        try:
            _SkeletonPickler(io.BytesIO()).dump(value)
            return False
        except Exception:
            return True

    path, obj, seen = "", root, set()
    while id(obj) not in seen:
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            items = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
        elif isinstance(obj, dict):
            items = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
        elif isinstance(obj, nn.Module):
            items = [(_join(path, k), v) for k, v in obj._modules.items()]
            items += [
                (_join(path, k), v)
                for k, v in vars(obj).items()
                if k not in ("_parameters", "_buffers", "_modules")
            ]
        elif isinstance(getattr(obj, "__dict__", None), dict):
            items = [(_join(path, k), v) for k, v in vars(obj).items()]
        else:
            break
        for p, v in items:
            if fails(v):
                path, obj = p, v
                break
        else:
            break
    return path or None


def _check_tensor(t: torch.Tensor, name: str, device: torch.device | None = None) -> None:
    if type(t) not in _ALLOWED_TENSOR_TYPES:
        raise PackError(
            f"{name}: tensors of type {type(t).__module__}.{type(t).__qualname__} cannot be shared "
            "(only plain tensors, nn.Parameter and buffers); materialize it first"
        )
    if t.layout != torch.strided:
        raise PackError(f"{name}: {t.layout} tensors cannot be shared; convert with .to_dense()")
    if t.is_quantized:
        raise PackError(
            f"{name}: quantized tensors ({t.dtype}) cannot be shared; dequantize them or use a "
            "weight-only dtype such as bfloat16 / float8"
        )
    if (device or t.device).type == "meta":
        raise PackError(
            f"{name}: tensor is on the meta device and holds no data; load real weights first "
            "(e.g. load_state_dict(..., assign=True) or to_empty())"
        )
    if code_of(t.dtype) is None:
        raise PackError(f"{name}: dtype {t.dtype} cannot be stored in an arena")


def _aligned_empty(nbytes: int, align: int = 4096) -> np.ndarray:
    """A page-aligned uint8 array. Large ones are an anonymous mapping with transparent huge
    pages requested: the gather copy is the first write to every page of the arena, and on the
    development VM its 4 KiB page faults cost more than the copy itself
    (`benchmarks/load_breakdown.py` measures pack() with both allocations)."""
    if nbytes >= (4 << 20) and hasattr(mmap, "MADV_HUGEPAGE"):
        mm = mmap.mmap(-1, nbytes)
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # pragma: no cover - THP disabled: plain pages
            pass
        return np.frombuffer(mm, dtype=np.uint8)
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + nbytes]


@dataclass
class _Plan:
    """A pipeline laid out as an arena, before any weight byte is copied."""

    pickle_bytes: bytes  # the skeleton's pickle, without its header
    sizes: list[int]  # bytes of every storage, the two guards included
    tensors: list[tuple]  # manifest entries as _zc.plan takes them
    storages: list[torch.UntypedStorage]  # the real storages (sizes[1:-1])
    data_offset: int
    total: int
    offsets: list[int]  # of every storage, from the data region
    tensor_names: list[str]
    weight_bytes: int

    def skeleton(self, header: Any) -> bytes:
        """The skeleton for an arena whose header (and manifest CRC) is ``header``."""
        return _SKELETON_HEADER.pack(SKELETON_MAGIC, _read_manifest_crc(header)) + self.pickle_bytes


def _plan(pipeline: Any, replace: dict[int, torch.Tensor] | None = None) -> _Plan:
    """Walks and pickles the pipeline and plans its arena (O(tensors); no weight is read).

    ``replace`` maps ``id()`` of tensors of the pipeline (e.g. on the meta device) to the tensors
    whose bytes, dtype and layout the arena takes in their place (e.g. views into a mapped
    checkpoint, see ``ray_zerocopy.files``); the pipeline itself is not changed.
    """
    modules, names = _walk(pipeline)
    if not modules:
        raise PackError(
            f"{type(pipeline).__qualname__} object holds no torch.nn.Module (looked through "
            "attributes, lists, tuples and dicts at any depth); pass a model or a pipeline "
            "object that holds models"
        )

    buf = io.BytesIO()
    pickler = _SkeletonPickler(buf)
    try:
        pickler.dump(pipeline)
    except PackError:
        raise
    except Exception as exc:
        where = _find_unpicklable(pipeline)
        raise PackError(
            f"attribute {where or '<pipeline>'!s} of {type(pipeline).__qualname__} cannot be "
            f"pickled ({type(exc).__name__}: {exc}); remove it or make it picklable "
            "(e.g. create it lazily inside the method that needs it)"
        ) from exc
    found = pickler.found

    storage_keys: dict[tuple, int] = {}
    storages: list[torch.UntypedStorage] = []  # each unique storage once
    tensors: list[tuple] = []
    tensor_names: list[str] = []
    other, persistent_flag, grad_flag = (
        _zc.KIND_OTHER,
        _zc.TFLAG_PERSISTENT,
        _zc.TFLAG_REQUIRES_GRAD,
    )
    for i, t in enumerate(found):
        path, kind, persistent = names.get(id(t)) or (f"<tensor {i}>", other, False)
        requires_grad = t.requires_grad
        if replace:
            t = replace.get(id(t), t)
        device = t.device
        _check_tensor(t, path or "<pipeline>", device)
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        st = t.untyped_storage()
        nbytes = st.nbytes()
        key = (device, st.data_ptr()) if nbytes else ("empty", i)
        sidx = storage_keys.get(key)
        if sidx is None:
            sidx = len(storages)
            storage_keys[key] = sidx
            storages.append(st)
        elif storages[sidx].nbytes() < nbytes:
            storages[sidx] = st
        flags = (persistent_flag if persistent else 0) | (grad_flag if requires_grad else 0)
        # Storage index + 1: the first storage is the leading guard.
        tensors.append(
            (
                path or "<pipeline>",
                sidx + 1,
                code_of(t.dtype),
                tuple(t.shape),
                t.stride(),
                t.storage_offset(),
                kind,
                flags,
            )
        )
        tensor_names.append(path)

    # A zero guard storage of one page first and last: Ray places objects at 64-byte alignment
    # only, so the data region's first and last pages may be shared with other objects and can't
    # be write-protected; the guards make sure no tensor byte lies in them.
    real_sizes = [s.nbytes() for s in storages]
    sizes = [GUARD_BYTES, *real_sizes, GUARD_BYTES]
    data_offset, total, offsets = _zc.plan(sizes, tensors)
    return _Plan(
        buf.getvalue(),
        sizes,
        tensors,
        storages,
        data_offset,
        total,
        offsets,
        tensor_names,
        int(sum(real_sizes)),
    )


def pack(pipeline: Any, *, nthreads: int = 0) -> Packed:
    """Packs a pipeline into a skeleton and an arena.

    The pipeline is any object that holds ``nn.Module`` s (or a bare module). It is not
    modified. The driver holds one extra copy of the weights (the arena) while packing.
    Tensors on a GPU are copied to the host. The arena carries the CRC32C of its data region.
    (The wrappers do not call this: they hand the weights to Ray's object store directly,
    see :func:`store_parts`.)

    Args:
        pipeline: the object to pack.
        nthreads: threads for the gather copy and checksum (0: one per CPU).

    Returns:
        A :class:`Packed`; ``skeleton, arena = pack(p)`` works.

    Raises:
        PackError: an unsupported tensor (sparse, quantized, meta, unknown dtype or subclass),
            an attribute that cannot be pickled, or an object that holds no module; the message
            names the attribute path.

    Example:
        >>> skeleton, arena = pack(nn.Linear(4, 2))
        >>> model = unpack(skeleton, arena)
    """
    plan = _plan(pipeline)
    data_offset, offsets = plan.data_offset, plan.offsets
    arena = _aligned_empty(plan.total)
    _zc.write_manifest(arena, plan.sizes, plan.tensors)
    for i in (0, len(plan.sizes) - 1):
        arena[data_offset + offsets[i] : data_offset + offsets[i] + GUARD_BYTES] = 0
    copies = []
    for s, off in zip(plan.storages, offsets[1:]):
        n = s.nbytes()
        if n == 0:
            continue
        if s.device.type == "cpu":
            copies.append((data_offset + off, s.data_ptr(), n))
        else:
            host = torch.from_numpy(arena[data_offset + off : data_offset + off + n])
            host.copy_(_bytes_of(s))
    _zc.gather(arena, copies, nthreads)
    _zc.finalize(arena, nthreads)
    return Packed(
        skeleton=plan.skeleton(arena),
        arena=arena,
        tensor_names=plan.tensor_names,
        weight_bytes=plan.weight_bytes,
    )


#: Storages whose 64-byte-aligned body is at least this many bytes go to the object store
#: straight from the tensor's memory; smaller ones are gathered into staging chunks. Ray places
#: an out-of-band buffer of 2,048 bytes or more at the next multiple of 64 (smaller ones at the
#: next multiple of 8), which is what the arena's layout needs.
DIRECT_MIN = 2048


class StoreArena:
    """An arena as a sequence of buffers that Ray's object store writes back to back.

    Made by :func:`store_parts`. Pickled with protocol 5 and out-of-band buffers (as
    ``ray.put`` does), every part becomes one ``pickle.PickleBuffer``: Ray copies each into
    the object once, in order, and the parts together are the arena of docs/format.md, byte
    for byte, without the driver ever holding a copy of the weights. Unpickled,
    it becomes one read-only buffer over the whole arena (see :func:`ray_zerocopy.unpack`'s
    ``_assemble``).

    Attributes:
        parts: the buffers, in arena order (header and manifest first).
        offsets: where each part starts in the arena; every part starts and ends at a
            multiple of 64, and together they cover ``[0, total)`` with no gap.
        total: bytes in the arena.
        direct_bytes: bytes handed over straight from the tensors' memory (not staged).
    """

    __slots__ = ("parts", "offsets", "total", "direct_bytes")

    def __init__(self, parts: list, offsets: list[int], total: int, direct_bytes: int):
        self.parts = parts
        self.offsets = offsets
        self.total = total
        self.direct_bytes = direct_bytes

    @property
    def nbytes(self) -> int:
        return self.total

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        from .unpack import _assemble

        if operator.index(protocol) < 5:  # no out-of-band buffers: one contiguous copy
            return _assemble, (
                None,
                [b"".join(bytes(memoryview(p)) for p in self.parts)],
                [0],
                self.total,
            )
        return _assemble, (
            None,
            [pickle.PickleBuffer(p) for p in self.parts],
            self.offsets,
            self.total,
        )


def store_parts(pipeline: Any, *, nthreads: int = 0) -> tuple[bytes, StoreArena, _Plan]:
    """Lays a pipeline out for Ray's object store: the skeleton and a :class:`StoreArena`.

    No weight byte is copied by this function except those of small storages (bodies under
    :data:`DIRECT_MIN` bytes and the last, unaligned, under-64-byte tail of the others),
    which are gathered into staging chunks; every other byte reaches the store in the one
    copy ``ray.put`` makes from the tensor's own memory. Tensors on a GPU are copied to the
    host one storage at a time. The arena's header carries ``FLAG_NO_DATA_CRC``: no pass over
    the weights is made to checksum them (docs/format.md, "What is checked when").

    Returns:
        ``(skeleton, store_arena, plan)``.

    Raises:
        PackError: as :func:`pack`.
    """
    plan = _plan(pipeline)
    header = np.zeros(plan.data_offset, dtype=np.uint8)
    _zc.write_header(header, plan.sizes, plan.tensors)
    return plan.skeleton(header), _lay_out(plan, header, nthreads), plan


def _lay_out(plan: _Plan, header: np.ndarray, nthreads: int) -> StoreArena:
    """Splits the arena into parts that start and end at multiples of 64 and tile it."""
    data_offset = plan.data_offset
    parts: list = []
    offsets: list[int] = []
    direct = 0
    # The staging chunk being built: starts at pstart, holds (offset, ptr, n, owner) pieces.
    pstart = 0
    pieces: list[tuple[int, int, int, Any]] = []
    keep: list[Any] = []  # host copies of device storages, alive until the put

    def flush(end: int) -> None:
        if end <= pstart:
            return
        chunk = np.zeros(end - pstart, dtype=np.uint8)
        copies = [(off - pstart, ptr, n) for off, ptr, n, _ in pieces if n]
        if copies:
            _zc.gather(chunk, copies, nthreads)
        parts.append(chunk)
        offsets.append(pstart)

    pieces.append((0, header.ctypes.data, data_offset, header))
    sources = [None, *plan.storages, None]
    for src, off, size in zip(sources, plan.offsets, plan.sizes):
        a = data_offset + off
        if src is None or size == 0:  # a guard (zeros) or an empty storage
            continue
        if src.device.type != "cpu":
            src = src.cpu()
            keep.append(src)
        body = size - size % 64
        if body >= DIRECT_MIN:
            flush(a)
            arr = _bytes_of(src).numpy()
            parts.append(arr[:body])
            offsets.append(a)
            direct += body
            pstart, pieces = a + body, []
            if body < size:
                pieces.append((a + body, src.data_ptr() + body, size - body, src))
        else:
            pieces.append((a, src.data_ptr(), size, src))
    flush(plan.total)
    return StoreArena(parts, offsets, plan.total, direct)


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over the whole of ``storage`` (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _read_manifest_crc(arena: np.ndarray) -> int:
    """Returns the manifest CRC32C field of a header (docs/format.md, offset 88)."""
    return int.from_bytes(arena[88:92].tobytes(), "little")
