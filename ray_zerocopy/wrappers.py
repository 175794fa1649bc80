"""The Ray wrappers: TaskWrapper, ActorWrapper and ModelWrapper.

Wrapping packs the pipeline once (one gather copy, one checksum pass) and puts the skeleton
and the arena into Ray's object store as one object owned by the wrapping process. Workers on
the same node map that object's shared memory: every weight is a view, nothing is copied.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

import ray
from torch import nn

from . import _oob, _worker
from .device import parse_device
from .errors import DeviceError, PackError, WrapperError
from .files import FromFiles, Source
from .pack import find_modules, store_parts
from .unpack import arena_data_crc, verify_arena

__all__ = ["TaskWrapper", "ActorWrapper", "ModelWrapper", "public_methods"]


def public_methods(pipeline: Any) -> list[str]:
    """Names of the methods a wrapper forwards: public methods of the pipeline's class, plus
    ``__call__`` when the pipeline is callable."""
    names = []
    cls = type(pipeline)
    for name in dir(cls):
        if name.startswith("_"):
            continue
        try:
            attr = inspect.getattr_static(pipeline, name)
        except AttributeError:
            continue
        if (
            isinstance(attr, (staticmethod, classmethod))
            or inspect.isfunction(attr)
            or inspect.ismethoddescriptor(attr)
        ):
            names.append(name)
    if callable(pipeline):
        names.append("__call__")
    return names


class _Shared:
    """The driver's handle on one packed pipeline in the object store.

    Holds the ObjectRef (so the driver owns the object) and what the driver knows about the
    pipeline. Pickles to the ref plus metadata, never weights.
    """

    __slots__ = (
        "ref",
        "cls_name",
        "methods",
        "nbytes",
        "n_tensors",
        "wrap_seconds",
        "data_crc",
        "owner_pid",
    )

    def __init__(self, ref, cls_name, methods, nbytes, n_tensors, wrap_seconds, data_crc=None):
        self.ref = ref
        self.cls_name = cls_name
        self.methods = methods
        self.nbytes = nbytes
        self.n_tensors = n_tensors
        self.wrap_seconds = wrap_seconds
        self.data_crc = data_crc
        self.owner_pid = _worker_id()

    @classmethod
    def put(cls, pipeline: Any) -> _Shared:
        """Lays the pipeline out as an arena and puts it into the object store in one copy:
        Ray writes each weight byte once, straight from the tensor's memory (see
        ``pack.store_parts``)."""
        if not ray.is_initialized():
            ray.init()
        t0 = time.perf_counter()
        if isinstance(pipeline, Source):  # an arena file or a checkpoint, not built here (files.py)
            skeleton, arena, plan = pipeline.store_parts()
            name, methods, data_crc = pipeline.cls_name, pipeline.methods, pipeline.data_crc
        else:
            skeleton, arena, plan = store_parts(pipeline)
            name, methods, data_crc = type(pipeline).__qualname__, None, None
        capacity = _local_store_capacity()
        if capacity and arena.total > capacity:
            raise PackError(
                f"{name}: the packed weights ({arena.total / 2**20:,.1f} MiB) are larger than this "
                f"node's Ray object store ({capacity / 2**20:,.1f} MiB); start Ray with a larger "
                "object_store_memory (ray.init(object_store_memory=...)) or use a smaller model"
            )
        try:
            ref = ray.put((skeleton, arena))
        except ray.exceptions.ObjectStoreFullError as exc:
            raise PackError(
                f"{name}: the packed weights ({arena.total / 2**20:.1f} MiB) do not fit in Ray's "
                "object store; start Ray with a larger object_store_memory or use a smaller "
                "model"
            ) from exc
        seconds = time.perf_counter() - t0
        if methods is None:
            methods = frozenset(public_methods(pipeline))
        return cls(ref, name, methods, plan.weight_bytes, len(plan.tensor_names), seconds, data_crc)

    def checksum(self) -> int:
        """The CRC32C of the data region of the arena in the store (computed once, O(bytes))."""
        if self.data_crc is None:
            _, arena = _worker.fetch(self.ref)
            self.data_crc = arena_data_crc(arena)
        return self.data_crc

    def __getstate__(self):
        state = {k: getattr(self, k) for k in self.__slots__}
        state["ref"] = _oob.pickle_ref(self, self.ref)  # Ray Serve pickles out of band
        return state

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)
        self.ref = _oob.unpickle_ref(self.ref)

    def __del__(self):
        _oob.release(self)


def _worker_id() -> str:
    """Ray's id of this process (unique across the cluster), or "" outside Ray."""
    return ray.get_runtime_context().get_worker_id() if ray.is_initialized() else ""


#: Object store bytes by node id: fixed when a node starts, and asking the GCS for every node
#: (``ray.nodes()``) is a round trip on every wrap.
_store_capacity: dict[str, int] = {}


def _local_store_capacity() -> int:
    """Bytes of object store on this process's node (0 if unknown)."""
    try:
        node_id = ray.get_runtime_context().get_node_id()
        cached = _store_capacity.get(node_id)
        if cached is not None:
            return cached
        for node in ray.nodes():
            if node.get("NodeID") == node_id:
                cap = int(node.get("Resources", {}).get("object_store_memory", 0))
                if cap:
                    _store_capacity[node_id] = cap
                return cap
    except Exception:  # pragma: no cover - best effort; the put reports real failures
        return 0
    return 0


def _check_device_for_ray(device: Any, ray_options: dict) -> tuple[str | None, dict]:
    """Validates a device string for a Ray task and adds the GPU request it needs."""
    if device is None:
        return None, ray_options
    dev = parse_device(device)
    if dev.type == "cpu":
        return "cpu", ray_options
    opts = dict(ray_options)
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if gpus <= 0:
        raise DeviceError(
            f"device {device!r} requested but the Ray cluster has no GPU "
            f"(resources: {ray.cluster_resources() if ray.is_initialized() else {}})"
        )
    opts.setdefault("num_gpus", 1)
    # Ray assigns the GPU and makes it visible as cuda:0 in the worker unless the task asks
    # for several, in which case the index picks among them.
    local = "cuda" if opts["num_gpus"] <= 1 else str(dev)
    return local, opts


def _make_share(ref: Any, device: Any, share_device_copy: bool, writable: bool) -> Any:
    """``device_share.make_share``, imported only when ``share_device_copy`` asks for it (a
    wrap that does not share has no use for the module)."""
    if not share_device_copy:
        return None
    from .device_share import make_share

    return make_share(ref, device, share_device_copy, writable)


@ray.remote
def _run_method(_zc_spec: tuple, *args: Any, **kwargs: Any) -> Any:
    box, method, device, fast_load, writable = _zc_spec[:5]
    share = _zc_spec[5] if len(_zc_spec) > 5 else None
    if share is not None:  # share_device_copy=True: views into this GPU's one copy
        from .device_share import load_shared

        pipeline = load_shared(share, device)
        return getattr(pipeline, method)(*args, **kwargs)
    # A pipeline nobody has used (the worker's spare, ready at once if it had time to build
    # one); the next spare is rebuilt after the call, while the worker waits for its next task.
    return _worker.call_fresh(
        box[0],
        _call_method,
        "",
        method,
        args,
        kwargs,
        device=device,
        fast_load=fast_load,
        writable=writable,
    )


def _call_method(pipeline: Any, path: str, method: str, args: tuple, kwargs: dict) -> Any:
    """``pipeline.<path>.<method>(*args, **kwargs)``."""
    return getattr(_resolve_path(pipeline, path), method)(*args, **kwargs)


def _check_args_picklable(where: str, args: tuple, kwargs: dict) -> None:
    from ray import cloudpickle

    for label, value in [
        *((f"argument {i}", a) for i, a in enumerate(args)),
        *((f"keyword argument {k!r}", v) for k, v in kwargs.items()),
    ]:
        if isinstance(value, ray.ObjectRef):
            continue
        try:
            cloudpickle.dumps(value)
        except Exception as exc:
            raise WrapperError(
                f"{where}: {label} ({type(value).__qualname__}) cannot be sent to a Ray task: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


class _RemoteMethod:
    """One forwarded method: call it to run it in a Ray task and wait, or use ``.remote``."""

    def __init__(self, wrapper: TaskWrapper, name: str):
        self._wrapper = wrapper
        self._name = name

    def remote(self, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        """Starts the call in a Ray task and returns its ObjectRef at once."""
        w = self._wrapper
        spec = (
            [w._shared.ref],
            self._name,
            w._task_device,
            w.use_fast_load,
            w._writable,
            w._device_share,
        )
        fn = _run_method.options(**w._ray_options) if w._ray_options else _run_method
        try:
            return fn.remote(spec, *args, **kwargs)
        except TypeError as exc:
            if "serialize" in str(exc).lower() or "pickle" in str(exc).lower():
                _check_args_picklable(f"{w._shared.cls_name}.{self._name}()", args, kwargs)
            raise

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return ray.get(self.remote(*args, **kwargs))

    def __repr__(self) -> str:
        return f"<remote method {self._wrapper._shared.cls_name}.{self._name}>"


class _Handle:
    """What every wrapper knows about its packed pipeline (``self._shared``)."""

    _shared: _Shared

    @property
    def object_ref(self) -> ray.ObjectRef:
        """The ObjectRef of the packed pipeline in Ray's object store."""
        return self._shared.ref

    @property
    def methods(self) -> frozenset[str]:
        """The names of the pipeline's public methods (and ``__call__`` if callable)."""
        return self._shared.methods

    @property
    def wrap_seconds(self) -> float:
        """Seconds spent packing and putting the pipeline."""
        return self._shared.wrap_seconds

    @property
    def data_crc(self) -> int:
        """The CRC32C of the weights as they are in the object store.

        Wrapping does not checksum the weights (that would cost a pass over every byte on the
        critical path; docs/format.md, "What is checked when"). The first access computes it
        from the store's copy (O(bytes), multi-threaded) and keeps it: a handle pickled after
        that (an ``ActorWrapper`` sent to actors) carries it, and :meth:`verify` there checks
        the worker's mapping against it.
        """
        return self._shared.checksum()

    def verify(self) -> None:
        """Checks the weights this process maps from the object store against :attr:`data_crc`
        (O(bytes)).

        In the wrapping process, the first call computes :attr:`data_crc`. In a worker, the
        handle must carry it (read :attr:`data_crc` in the driver before sending the handle).

        Raises:
            ArenaError: the bytes differ from the checksum (``ZC_ECHECKSUM``), or the arena
                is malformed.
            WrapperError: this handle carries no checksum (computed after it was pickled).
        """
        _, arena = _worker.fetch(self._shared.ref)
        crc = self._shared.data_crc
        if crc is None:
            if self._shared.owner_pid == _worker_id():
                crc = self._shared.checksum()
            else:
                raise WrapperError(
                    "this handle carries no checksum of the weights: read wrapper.data_crc in "
                    "the process that wrapped the pipeline before sending the wrapper here"
                )
        verify_arena(arena, expected_data_crc=crc)


class TaskWrapper(_Handle, FromFiles):
    """Runs each method call of a pipeline in a Ray task that maps the weights with no copy.

    Wrapping packs the pipeline once and puts it into Ray's object store (owned by this
    process); it does not run the model. Every public method of the pipeline, and
    ``__call__``, is available on the wrapper with the same arguments. A call runs the whole
    method in one Ray task and returns its result; ``wrapped.method.remote(...)`` returns an
    ``ObjectRef`` at once instead, so many calls run in parallel. No state is kept between
    calls: each task rebuilds the pipeline as it was at wrap time (workers cache only the
    read-only weight views).

    Args:
        pipeline: an ``nn.Module`` or any object holding modules.
        device: ``None``/``"cpu"`` (weights stay in shared memory) or ``"cuda[:N]"`` (each
            task asks Ray for a GPU and puts the weights there).
        use_fast_load: CPU: prefault the page tables of the weights before running;
            GPU: copy through pinned staging buffers at PCIe speed.
        writable: give each task a private, writable copy of the weights (default: shared and
            read-only; a stray in-place write is stopped with an error naming the tensor).
        share_device_copy: with ``device="cuda"``: one copy of the weights per GPU, made by a
            holder actor and opened by every task on that GPU (CUDA IPC), instead of one copy
            per task; pass ``num_gpus=0.25`` etc. so tasks share GPUs (docs/device.md).
        **ray_options: passed to the task (``num_cpus``, ``num_gpus``, ``memory``,
            ``max_retries``, ...).

    Raises:
        PackError: the pipeline cannot be packed (message names the attribute).
        DeviceError: the device string is malformed, or no GPU is in the cluster.

    Example:
        >>> wrapped = TaskWrapper(pipeline)
        >>> result = wrapped(data)                      # blocks
        >>> refs = [wrapped.process.remote(x) for x in items]
        >>> results = ray.get(refs)                     # in parallel
    """

    def __init__(
        self,
        pipeline: Any,
        device: Any = None,
        use_fast_load: bool = False,
        writable: bool = False,
        share_device_copy: bool = False,
        **ray_options: Any,
    ):
        self.device = device
        self.use_fast_load = bool(use_fast_load)
        self._writable = bool(writable)
        self._device_share = None
        if not ray.is_initialized():
            ray.init()
        self._task_device, self._ray_options = _check_device_for_ray(device, ray_options)
        _make_share(None, device, share_device_copy, writable)  # checks before packing
        self._shared = _Shared.put(pipeline)
        self._device_share = _make_share(self._shared.ref, device, share_device_copy, writable)

    def __getattr__(self, name: str) -> _RemoteMethod:
        if name.startswith("__") or name == "_shared":
            raise AttributeError(name)
        shared = self.__dict__.get("_shared")
        if shared is None:
            raise AttributeError(name)
        if name not in shared.methods:
            raise AttributeError(
                f"{shared.cls_name!r} has no public method {name!r}; TaskWrapper forwards "
                f"methods only: {', '.join(sorted(m for m in shared.methods if m != '__call__'))}"
            )
        return _RemoteMethod(self, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "__call__" not in self._shared.methods:
            raise TypeError(f"{self._shared.cls_name!r} object is not callable")
        return _RemoteMethod(self, "__call__")(*args, **kwargs)

    @property
    def remote(self) -> Callable[..., ray.ObjectRef]:
        """``wrapped.remote(x)``: the non-blocking form of ``wrapped(x)``."""
        if "__call__" not in self._shared.methods:
            raise TypeError(f"{self._shared.cls_name!r} object is not callable")
        return _RemoteMethod(self, "__call__").remote

    def __dir__(self) -> Iterable[str]:
        return sorted(set(super().__dir__()) | set(self._shared.methods))

    def __repr__(self) -> str:
        return (
            f"TaskWrapper({self._shared.cls_name}, {self._shared.n_tensors} tensors, "
            f"{self._shared.nbytes / 2**20:.1f} MiB, device={self.device!r})"
        )

    def __reduce__(self):
        raise TypeError(
            "a TaskWrapper stays in the process that made it; pass an ActorWrapper "
            "to actors and Ray Data instead"
        )


class ActorWrapper(_Handle, FromFiles):
    """A small picklable handle on a pipeline in Ray's object store, for actors and Ray Data.

    Its pickle holds the ObjectRef and a few settings, never weights. Inside an actor, Ray
    Data UDF or task, :meth:`load` returns the pipeline with every weight a view into the
    node's shared copy.

    Args:
        pipeline: an ``nn.Module`` or any object holding modules.
        device: default device for :meth:`load` (``None``/``"cpu"`` or ``"cuda[:N]"``).
        use_fast_load: CPU: prefault the weights' page tables during load, so the first
            inference pays no page faults; GPU: copy through pinned staging buffers.
        writable: load private, writable copies instead of read-only shared views.
        share_device_copy: with ``device="cuda"``: one copy of the weights per GPU, made by a
            holder actor on the first load there and opened by every later load on that GPU
            (CUDA IPC), instead of one copy per actor (docs/device.md).

    Example:
        >>> wrapper = ActorWrapper(pipeline)
        >>> class InferenceActor:
        ...     def __init__(self, actor_wrapper):
        ...         self.pipeline = actor_wrapper.load()
        ...     def __call__(self, batch):
        ...         return {"y": self.pipeline(batch["x"])}
        >>> ds.map_batches(InferenceActor, fn_constructor_kwargs={"actor_wrapper": wrapper},
        ...                compute=ray.data.ActorPoolStrategy(size=2), batch_size=64)
    """

    def __init__(
        self,
        pipeline: Any,
        device: Any = None,
        use_fast_load: bool = False,
        writable: bool = False,
        share_device_copy: bool = False,
    ):
        if device is not None:
            parse_device(device)
        self.device = device
        self.use_fast_load = bool(use_fast_load)
        self.writable = bool(writable)
        _make_share(None, device, share_device_copy, writable)  # checks before packing
        self._shared = _Shared.put(pipeline)
        self._device_share = _make_share(self._shared.ref, device, share_device_copy, writable)
        self.load_seconds: float | None = None

    def load(self, device: Any = "default", use_fast_load: bool | None = None) -> Any:
        """Returns the pipeline, its weights mapped from the object store with no copy.

        Args:
            device: overrides the wrapper's device for this load.
            use_fast_load: overrides the wrapper's setting for this load.

        Raises:
            OwnerDiedError: the process that made the wrapper has exited.
            DeviceError: the device is malformed or not present in this process.
        """
        dev = self.device if device == "default" else device
        fast = self.use_fast_load if use_fast_load is None else use_fast_load
        t0 = time.perf_counter()
        share = getattr(self, "_device_share", None)
        if share is not None and share.applies_to(dev):
            from .device_share import load_shared

            pipeline = load_shared(share, dev)
        else:
            pipeline = _worker.load_pipeline(
                self._shared.ref, device=dev, fast_load=fast, writable=self.writable, cache=False
            )
        self.load_seconds = time.perf_counter() - t0
        return pipeline

    def __repr__(self) -> str:
        return (
            f"ActorWrapper({self._shared.cls_name}, {self._shared.n_tensors} tensors, "
            f"{self._shared.nbytes / 2**20:.1f} MiB, device={self.device!r})"
        )


class _RemoteModule:
    """Stands for one model of a pipeline in ModelWrapper's task mode: each allowed method
    call runs in a Ray task on the shared weights."""

    def __init__(self, shared: _Shared, path: str, method_names: Iterable[str]):
        self._shared = shared
        self._path = path
        self._methods = _with_call(method_names)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return ray.get(
            _run_module_method.remote(([self._shared.ref], self._path, method), *args, **kwargs)
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("__call__", *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self._methods:
            raise AttributeError(
                f"{self._path or 'model'}: {name!r} is not among the remote "
                f"methods {self._methods} (set method_names=)"
            )
        return lambda *a, **k: self._call(name, *a, **k)


def _with_call(method_names: Iterable[str]) -> tuple[str, ...]:
    """The remote methods of a model: ``method_names`` and ``__call__`` (a model is callable,
    and calling it runs in a task whatever ``method_names`` says, as in the published
    library)."""
    names = tuple(dict.fromkeys(method_names))
    return names if "__call__" in names else (*names, "__call__")


def _resolve_path(root: Any, path: str) -> Any:
    obj = root
    for part in [p for p in path.split(".") if p]:
        obj = getattr(obj, part)
    return obj


@ray.remote
def _run_module_method(_zc_spec: tuple, *args: Any, **kwargs: Any) -> Any:
    box, path, method = _zc_spec
    return _worker.call_fresh(box[0], _call_method, path, method, args, kwargs)


_MW = TypeVar("_MW", bound="ModelWrapper")


class ModelWrapper(_Handle):
    """The API of the published ``ray-zerocopy`` library, over this library's arena.

    ``ModelWrapper.from_model(p, mode="actor")`` behaves like :class:`ActorWrapper`;
    ``mode="task"`` returns a wrapper whose :meth:`load` gives a local pipeline in which each
    model attribute runs its ``method_names`` (and ``__call__``) in Ray tasks, each call on a
    pipeline nobody has used before (as the published library does).
    ``ModelWrapper.for_tasks(p)`` is ``from_model(p, mode="task").load()``. For whole-method
    tasks (all models of a method in one task) use :class:`TaskWrapper`.

    A wrapper pickles to a small handle (never weights); :meth:`serialize` and
    :meth:`deserialize` turn it into a dict and back, in this or any other process of the
    cluster.

    Attributes:
        _mode: ``"task"`` or ``"actor"``.
        _is_standalone_module: True when a bare ``nn.Module`` was wrapped, False for a
            pipeline (read by code written against the published library).
    """

    def __init__(
        self,
        shared: _Shared,
        mode: str,
        model_attr_names: list[str] | None,
        method_names: tuple[str, ...],
        is_module: bool,
        use_fast_load: bool = False,
        device_share: Any = None,
        model_names: list[str] | None = None,
        model_methods: dict[str, tuple[str, ...]] | None = None,
    ):
        self._device_share = device_share
        self._shared = shared
        self._mode = mode
        self._model_attr_names = model_attr_names
        self._method_names = method_names
        self._is_standalone_module = is_module
        self._use_fast_load = use_fast_load
        # The pipeline's model attributes (task mode: each becomes a remote model), and the
        # remote methods of each where they differ from method_names (from deserialize).
        self._model_names = model_names if model_names is not None else model_attr_names
        self._model_methods = model_methods or {}

    @classmethod
    def from_model(
        cls: type[_MW],
        model_or_pipeline: Any,
        mode: Literal["task", "actor"] = "actor",
        model_attr_names: list[str] | None = None,
        method_names: tuple[str, ...] | None = None,
        share_device_copy: bool = False,
    ) -> _MW:
        """Packs a model or pipeline into the object store.

        Args:
            model_or_pipeline: an ``nn.Module`` or an object holding modules.
            mode: ``"actor"`` (load zero-copy inside actors) or ``"task"`` (remote models).
            model_attr_names: the attributes that hold models (default: every attribute that
                holds an ``nn.Module``); each must exist and hold a module. All modules are
                shared either way.
            method_names: task mode: the model methods that run remotely (default
                ``("__call__",)``); ``__call__`` is always among them.
            share_device_copy: loads with ``device="cuda"`` open one copy per GPU, made by a
                holder actor, instead of one copy per process (docs/device.md).

        Raises:
            ValueError: unknown mode, or a model_attr_names entry that holds no module.
        """
        if mode not in ("task", "actor"):
            raise ValueError(f"Invalid mode: {mode!r} (use 'task' or 'actor')")
        is_module = isinstance(model_or_pipeline, nn.Module)
        if model_attr_names is not None:
            for name in model_attr_names:
                if not isinstance(getattr(model_or_pipeline, name, None), nn.Module):
                    raise ValueError(
                        f"model_attr_names: attribute {name!r} of "
                        f"{type(model_or_pipeline).__qualname__} holds no nn.Module"
                    )
            names = list(model_attr_names)
        elif is_module:
            names = None
        else:
            names = [
                p for p, _ in find_modules(model_or_pipeline) if p and "." not in p and "[" not in p
            ]
        shared = _Shared.put(model_or_pipeline)
        share = _make_share(shared.ref, "cuda", share_device_copy, False)
        return cls(
            shared,
            mode,
            list(model_attr_names) if model_attr_names else None,
            tuple(method_names) if method_names else ("__call__",),
            is_module,
            device_share=share,
            model_names=names,
        )

    @classmethod
    def for_tasks(cls, model_or_pipeline: Any, method_names: tuple[str, ...] | None = None) -> Any:
        """``from_model(model_or_pipeline, mode="task", method_names=...).load()``."""
        return cls.from_model(model_or_pipeline, mode="task", method_names=method_names).load()

    @property
    def model_refs(self) -> dict[str, ray.ObjectRef]:
        """One ObjectRef holds every model here; mapped under each model attribute name
        (``"model"`` for a bare module)."""
        return {name: self._shared.ref for name in self._names()}

    def _names(self) -> list[str]:
        if self._is_standalone_module or not self._model_names:
            return ["model"]
        return list(self._model_names)

    def _methods_of(self, name: str) -> tuple[str, ...]:
        return _with_call(self._model_methods.get(name, self._method_names))

    def serialize(self) -> dict[str, Any]:
        """The wrapper as a dict, for :meth:`deserialize` (here or in another process).

        As in the published library: ``{"skeleton", "model_info", "is_standalone_module",
        "mode"}``. ``model_info`` maps each model attribute (``"model"`` for a bare module) to
        its ObjectRef, and in task mode to ``(ref, set_of_remote_methods)``. ``skeleton`` is
        this library's handle on the packed pipeline (its ObjectRef and metadata; no
        weights). Picklable; the process that wrapped the pipeline must stay alive.

        Example:
            >>> state = wrapper.serialize()
            >>> again = ModelWrapper.deserialize(**state)
        """
        if self._mode == "task":
            info: dict[str, Any] = {
                n: (self._shared.ref, set(self._methods_of(n))) for n in self._names()
            }
        else:
            info = {n: self._shared.ref for n in self._names()}
        state = {
            "skeleton": self._shared,
            "model_info": info,
            "is_standalone_module": self._is_standalone_module,
            "mode": self._mode,
        }
        if self._device_share is not None:
            state["device_share"] = self._device_share
        return state

    @classmethod
    def deserialize(
        cls,
        skeleton: Any,
        model_info: dict[str, Any],
        is_standalone_module: bool = False,
        mode: Literal["task", "actor"] = "actor",
        device_share: Any = None,
    ) -> ModelWrapper:
        """Rebuilds a wrapper from :meth:`serialize`'s dict: ``deserialize(**state)``.

        Raises:
            ValueError: unknown mode.
            TypeError: ``skeleton`` is not what :meth:`serialize` returned.
        """
        if mode not in ("task", "actor"):
            raise ValueError(f"Invalid mode: {mode!r} (use 'task' or 'actor')")
        if not isinstance(skeleton, _Shared):
            raise TypeError(
                f"ModelWrapper.deserialize: skeleton is a {type(skeleton).__qualname__}, not "
                "the handle ModelWrapper.serialize() returns; pass deserialize(**state) the "
                "dict serialize() made"
            )
        methods: dict[str, tuple[str, ...]] = {}
        for name, value in model_info.items():
            if isinstance(value, tuple) and len(value) == 2 and value[1] is not None:
                methods[name] = tuple(sorted(value[1]))
        names = None if is_standalone_module else list(model_info)
        first = next(iter(methods.values()), ("__call__",))
        return cls(
            skeleton,
            mode,
            names,
            first,
            bool(is_standalone_module),
            device_share=device_share,
            model_names=names,
            model_methods=methods,
        )

    def load(self, _use_fast_load: bool = False, device: Any = None) -> Any:
        """Actor mode: the pipeline, zero-copy. Task mode: a local pipeline whose models run
        in Ray tasks."""
        if self._mode == "actor":
            return self.to_pipeline(device=device, use_fast_load=_use_fast_load)
        return self._task_pipeline()

    def to_pipeline(self, device: Any = None, use_fast_load: bool = False) -> Any:
        """The pipeline with its weights mapped from the object store (any mode)."""
        share = getattr(self, "_device_share", None)
        if share is not None and share.applies_to(device):
            from .device_share import load_shared

            return load_shared(share, device)
        return _worker.load_pipeline(
            self._shared.ref,
            device=device,
            fast_load=use_fast_load or self._use_fast_load,
            cache=False,
        )

    def _task_pipeline(self) -> Any:
        if self._is_standalone_module:
            return _RemoteModule(self._shared, "", self._methods_of("model"))
        # The pipeline's own code runs here; its models become remote models. Views of the
        # shared weights, read-only in this process.
        skeleton, loaded = _worker.load_arena(
            self._shared.ref, device=None, fast_load=False, protect=True, writable=False
        )
        from .unpack import rebuild

        pipeline = rebuild(skeleton, loaded)
        names = self._model_names
        if names is None:  # a wrapper made before model names were recorded
            names = [p for p, _ in find_modules(pipeline) if p and "." not in p and "[" not in p]
        for name in names:
            setattr(pipeline, name, _RemoteModule(self._shared, name, self._methods_of(name)))
        return pipeline

    def __repr__(self) -> str:
        return f"ModelWrapper({self._shared.cls_name}, mode={self._mode!r})"
