"""Wrappers for compiled models: TorchScript, ``torch.compile`` and ``torch.export``.

The plain wrappers (:mod:`ray_zerocopy.wrappers`) already share compiled models zero-copy: the
packer reduces them through :mod:`ray_zerocopy.jit`. These subclasses add what a compiled model
needs on top:

- a bare TorchScript module forwards its script methods (``forward`` and every
  ``@torch.jit.export`` method), which ``inspect`` does not see on the class;
- a path to a file saved with ``torch.jit.save`` (or ``torch.export.save``, suffix ``.pt2``) is
  loaded on the CPU and wrapped;
- a bare ``ExportedProgram`` is callable: a call runs ``ep.module()(*args, **kwargs)`` over the
  shared weights, and ``JITActorWrapper.load()`` returns ``ep.module()``.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch

from .wrappers import ActorWrapper, ModelWrapper, TaskWrapper

__all__ = [
    "JITTaskWrapper",
    "JITActorWrapper",
    "JITModelWrapper",
    "ExportedRunner",
    "script_methods",
]


class ExportedRunner:
    """A callable over an ``ExportedProgram``: ``runner(*args)`` is ``ep.module()(*args)``.

    The unlifted module is built at the first call and kept by this object (a task gets a fresh
    runner for every call, so nothing survives between task calls).

    Attributes:
        program: the ``ExportedProgram`` (its state dict: views of the shared weights).
    """

    def __init__(self, program: Any):
        self.program = program
        self._module: torch.nn.Module | None = None

    def module(self) -> torch.nn.Module:
        """``program.module()``, built once per runner: an ``nn.Module`` over the same tensors."""
        if self._module is None:
            self._module = self.program.module()
        return self._module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module()(*args, **kwargs)

    def __getstate__(self):
        return {"program": self.program, "_module": None}


def _as_pipeline(pipeline: Any) -> Any:
    """Loads a saved model given by path; wraps a bare ExportedProgram in a runner."""
    if isinstance(pipeline, (str, os.PathLike)):
        path = os.fspath(pipeline)
        if path.endswith(".pt2"):
            pipeline = torch.export.load(path)
        else:
            pipeline = torch.jit.load(path, map_location="cpu")
    if isinstance(pipeline, torch.export.ExportedProgram):
        return ExportedRunner(pipeline)
    return pipeline


def script_methods(pipeline: Any) -> set[str]:
    """Public methods of a TorchScript module (``forward``, ``@torch.jit.export`` methods)."""
    if isinstance(pipeline, torch.jit.ScriptModule):
        return {n for n in pipeline._c._method_names() if not n.startswith("_")}
    return set()


def _unwrap(pipeline: Any) -> Any:
    return pipeline.module() if isinstance(pipeline, ExportedRunner) else pipeline


class JITTaskWrapper(TaskWrapper):
    """:class:`~ray_zerocopy.TaskWrapper` for pipelines that hold compiled models.

    Same semantics as ``TaskWrapper``: every call runs in a Ray task over the shared weights,
    ``.remote`` returns an ``ObjectRef``, and no state is kept between calls. In addition a
    bare TorchScript module forwards its script methods, ``pipeline`` may be the path of a saved
    TorchScript (or ``.pt2`` exported) model, and a bare ``ExportedProgram`` is callable
    (``ep.module()(*args)``).

    Args:
        pipeline: a TorchScript module, ``torch.compile``'d module, ``ExportedProgram``, path,
            or any object (or ``nn.Module``) holding such models and eager ones.
        device: ``None``/``"cpu"`` or ``"cuda[:N]"`` (TorchScript modules are loaded on the
            device of their weights).
        use_fast_load: prefault (CPU) or pinned copies (GPU), as for ``TaskWrapper``.
        writable: give each task a private, writable copy of the weights.
        share_device_copy: with ``device="cuda"``: one copy of the weights per GPU, shared by
            every task on it, as for ``TaskWrapper`` (docs/device.md).
        **ray_options: passed to the task (``num_cpus``, ``num_gpus``, ...).

    Raises:
        PackError: the pipeline cannot be packed (message names the attribute).

    Example:
        >>> scripted = torch.jit.script(model)
        >>> wrapped = JITTaskWrapper(scripted)
        >>> y = wrapped(x)                        # scripted forward in a Ray task
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
        pipeline = _as_pipeline(pipeline)
        super().__init__(
            pipeline,
            device=device,
            use_fast_load=use_fast_load,
            writable=writable,
            share_device_copy=share_device_copy,
            **ray_options,
        )
        extra = script_methods(pipeline)
        if extra:
            self._shared.methods = frozenset(self._shared.methods | extra)

    def __repr__(self) -> str:
        return "JIT" + super().__repr__()


class JITActorWrapper(ActorWrapper):
    """:class:`~ray_zerocopy.ActorWrapper` for pipelines that hold compiled models.

    A small picklable handle; :meth:`load` inside an actor returns the pipeline with every
    weight a view of the node's shared copy: TorchScript modules as loaded ScriptModules,
    ``torch.compile``'d modules compiled again (lazily), and a bare ``ExportedProgram`` as
    ``ep.module()``.

    Args:
        pipeline: as for :class:`JITTaskWrapper`.
        device: default device for :meth:`load`.
        use_fast_load: prefault the weights during load (CPU) or pinned copies (GPU).
        writable: load private, writable copies instead of read-only shared views.
        share_device_copy: with ``device="cuda"``: one copy of the weights per GPU, shared by
            every actor on it, as for ``ActorWrapper`` (docs/device.md).

    Example:
        >>> aw = JITActorWrapper(torch.jit.trace(model, x))
        >>> @ray.remote
        ... class Server:
        ...     def __init__(self, aw):
        ...         self.model = aw.load()
    """

    def __init__(
        self,
        pipeline: Any,
        device: Any = None,
        use_fast_load: bool = False,
        writable: bool = False,
        share_device_copy: bool = False,
    ):
        pipeline = _as_pipeline(pipeline)
        super().__init__(
            pipeline,
            device=device,
            use_fast_load=use_fast_load,
            writable=writable,
            share_device_copy=share_device_copy,
        )
        extra = script_methods(pipeline)
        if extra:
            self._shared.methods = frozenset(self._shared.methods | extra)

    def load(self, device: Any = "default", use_fast_load: bool | None = None) -> Any:
        """Returns the pipeline, its weights mapped from the object store with no copy.

        A bare ``ExportedProgram`` comes back as ``ep.module()`` (an ``nn.Module`` over the
        shared weights). See :meth:`ActorWrapper.load` for the arguments.
        """
        return _unwrap(super().load(device=device, use_fast_load=use_fast_load))

    def __repr__(self) -> str:
        return "JIT" + super().__repr__()


class JITModelWrapper(ModelWrapper):
    """:class:`~ray_zerocopy.ModelWrapper` for compiled models (same API).

    ``JITModelWrapper.from_model(m, mode="actor").load()`` returns the model zero-copy
    (a bare ``ExportedProgram`` as ``ep.module()``); ``mode="task"`` returns a stand-in whose
    calls (and ``method_names``) run in Ray tasks. ``m`` may also be a saved model's path.
    """

    @classmethod
    def from_model(
        cls,
        model_or_pipeline: Any,
        mode: Literal["task", "actor"] = "actor",
        model_attr_names: list[str] | None = None,
        method_names: tuple[str, ...] | None = None,
        share_device_copy: bool = False,
    ) -> JITModelWrapper:
        """Packs a compiled model or a pipeline into the object store.

        See :meth:`ModelWrapper.from_model` for the arguments.
        """
        pipeline = _as_pipeline(model_or_pipeline)
        wrapper = super().from_model(
            pipeline,
            mode=mode,
            model_attr_names=model_attr_names,
            method_names=method_names,
            share_device_copy=share_device_copy,
        )
        if isinstance(pipeline, ExportedRunner):
            wrapper._is_standalone_module = True  # task mode: one remote model
        return wrapper

    @classmethod
    def for_tasks(cls, model_or_pipeline: Any, method_names: tuple[str, ...] | None = None) -> Any:
        """``from_model(model_or_pipeline, mode="task", method_names=...).load()``."""
        return cls.from_model(model_or_pipeline, mode="task", method_names=method_names).load()

    def to_pipeline(self, device: Any = None, use_fast_load: bool = False) -> Any:
        """The pipeline with its weights mapped from the object store (any mode)."""
        return _unwrap(super().to_pipeline(device=device, use_fast_load=use_fast_load))

    def __repr__(self) -> str:
        return "JIT" + super().__repr__()
