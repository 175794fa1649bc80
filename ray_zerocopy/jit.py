"""Reducers for compiled models: TorchScript, ``torch.compile`` and ``torch.export``.

:func:`reduce` is called by the packer (``_SkeletonPickler.reducer_override``) for every object
it pickles. For the three kinds of compiled model that plain pickling cannot share zero-copy it
returns a ``(callable, args)`` pair whose args hold the model's tensors as they are, so that the
packer turns each of them into an arena entry; everything else gets ``NotImplemented`` (the
ordinary cloudpickle path).

- **TorchScript** (``torch.jit.script`` / ``torch.jit.trace`` modules, and loaded ones): the
  module is saved with ``torch.jit.save`` *without its weight bytes* (every parameter and buffer
  is set, for the duration of the save, to an empty tensor and then restored exactly), so the
  skeleton holds only code and structure. In the worker the archive is loaded on the device of
  the arena views and every parameter and buffer is ``set_`` to its view: no copy.
- **torch.compile** (``OptimizedModule``): the original module is packed as usual and compiled
  again in the worker with the same backend, ``mode``/``options``, ``dynamic`` and
  ``fullgraph``. Compilation is lazy, so it happens at the first call in each worker. When the
  settings cannot be recovered (a module made by ``torch._dynamo.optimize`` with a custom
  context) or ``torch.compile`` fails in the worker, the worker gets the original, eager module.
- **torch.export** (``ExportedProgram``): the program is serialized with ``torch.export``'s own
  serializer without its state dict, constants and example inputs; these travel as tensors,
  i.e. arena views, and the program is deserialized around them in the worker: no copy.
"""

from __future__ import annotations

import io
import sys
import threading
from typing import Any, cast

import torch
from torch import nn

from .errors import PackError, UnpackError

__all__ = ["reduce", "strip_script_module"]

_ScriptModule = torch.jit.ScriptModule
_ScriptFunction = torch.jit.ScriptFunction
_ExportedProgram: type | None
try:
    from torch.export import ExportedProgram as _ExportedProgram
except ImportError:  # pragma: no cover - torch without torch.export
    _ExportedProgram = None

# Stripping mutates the module for the duration of one torch.jit.save; serialize strippers so
# that two threads packing the same module cannot interleave their set_/restore steps.
_strip_lock = threading.Lock()

_set_version = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)


def reduce(obj: Any) -> Any:
    """Returns a reduce value for a compiled model, ``NotImplemented`` for anything else.

    Called for every object the packer pickles, so the common case (not a compiled model)
    costs three ``isinstance`` checks (modules: two and a ``sys.modules`` lookup).

    Raises:
        PackError: a compiled model that cannot be packed (the message says why).
    """
    if isinstance(obj, nn.Module):
        if isinstance(obj, _ScriptModule):
            return _reduce_script(obj)
        ef = sys.modules.get("torch._dynamo.eval_frame")  # no OptimizedModule without it
        if ef is not None and isinstance(obj, ef.OptimizedModule):
            return _reduce_compiled(obj)
        return NotImplemented
    if isinstance(obj, _ScriptFunction):
        # A scripted function holds no weights; it comes back as a loaded ScriptModule whose
        # forward is the function (call it the same way).
        # _extra_files={} is the binding's default; the stub declares it without one.
        return _rebuild_script_function, (obj.save_to_buffer(_extra_files={}),)
    if _ExportedProgram is not None and isinstance(obj, _ExportedProgram):
        return _reduce_exported(obj)
    return NotImplemented


# --------------------------------------------------------------------------- TorchScript


def _script_tensors(module: Any) -> tuple[list[str], list[torch.Tensor]]:
    """Qualified names and tensors of every parameter and buffer, ties listed under each name."""
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    for n, t in module.named_parameters(remove_duplicate=False):
        names.append(n)
        tensors.append(t)
    for n, t in module.named_buffers(remove_duplicate=False):
        if t is not None:
            names.append(n)
            tensors.append(t)
    return names, tensors


def strip_script_module(module: Any) -> bytes:
    """``torch.jit.save`` of a TorchScript module without the bytes of its parameters and buffers.

    Every parameter and buffer is set to an empty tensor of its dtype for the duration of the
    save, and restored exactly afterwards (same storage, offset, shape, stride and autograd
    version counter), even if the save fails. The module must not run in another thread
    meanwhile. Tensors that are neither parameters nor buffers (constants baked into traced
    code, plain tensor attributes of a scripted module) stay in the archive.

    Returns:
        The archive bytes (code, structure, constants; no weight data).
    """
    _, tensors = _script_tensors(module)
    unique = list({id(t): t for t in tensors}.values())
    saved: list[tuple] = []
    with _strip_lock, torch.no_grad():
        try:
            for t in unique:
                saved.append(
                    (t, t.untyped_storage(), t.storage_offset(), t.size(), t.stride(), t._version)
                )
                # set_(Tensor) exists at runtime; torch's stub lists only the Storage overloads.
                t.set_(torch.empty(0, dtype=t.dtype, device=t.device))  # type: ignore[call-overload]
            buf = io.BytesIO()
            torch.jit.save(module, buf)
            return buf.getvalue()
        finally:
            for t, storage, offset, size, stride, version in reversed(saved):
                t.set_(storage, offset, size, stride)
                if _set_version is not None:
                    _set_version((t,), (version,))


def _reduce_script(module: Any) -> tuple:
    names, tensors = _script_tensors(module)
    try:
        data = strip_script_module(module)
    except Exception as exc:
        raise PackError(
            f"TorchScript module {module.original_name!r} cannot be saved by torch.jit.save "
            f"({type(exc).__name__}: {exc}); fix the module or pass the eager nn.Module instead"
        ) from exc
    return _rebuild_script, (data, names, tensors)


def _rebuild_script(data: bytes, names: list[str], tensors: list[torch.Tensor]) -> Any:
    """Loads a stripped TorchScript archive and sets every parameter and buffer to its view."""
    device = tensors[0].device if tensors else torch.device("cpu")
    module = torch.jit.load(io.BytesIO(data), map_location=device)
    targets = dict(module.named_parameters(remove_duplicate=False))
    targets.update((n, b) for n, b in module.named_buffers(remove_duplicate=False) if b is not None)
    with torch.no_grad():
        for name, view in zip(names, tensors):
            target = targets.get(name)
            if target is None:
                raise UnpackError(
                    f"TorchScript module has no parameter or buffer {name!r} after loading: the "
                    "skeleton was made by another version of torch or of the module"
                )
            target.set_(view)
            if target.requires_grad:
                target.requires_grad_(False)
    return module


def _rebuild_script_function(data: bytes) -> Any:
    return torch.jit.load(io.BytesIO(data), map_location="cpu")


# --------------------------------------------------------------------------- torch.compile


def compile_kwargs(compiled: Any) -> dict[str, Any] | None:
    """The ``torch.compile`` keyword arguments that made an ``OptimizedModule``, if they can be
    recovered (``backend``, ``mode``/``options``, ``dynamic``, ``fullgraph``); else ``None``."""
    from torch._dynamo.eval_frame import DisableContext, innermost_backend

    ctx = getattr(compiled, "dynamo_ctx", None)
    if ctx is None or isinstance(ctx, DisableContext):
        return None
    backend = innermost_backend(ctx.callback)
    kwargs: dict[str, Any] = {"fullgraph": bool(getattr(ctx, "fullgraph", False))}
    if isinstance(backend, torch._TorchCompileInductorWrapper):
        kwargs["backend"] = "inductor"
        if backend.config:
            kwargs["options"] = dict(backend.config)
        kwargs["dynamic"] = backend.dynamic
    elif isinstance(backend, torch._TorchCompileWrapper):
        from torch._dynamo.backends.registry import list_backends

        name = backend.compiler_name
        kwargs["backend"] = name if name in list_backends(exclude_tags=()) else backend.compiler_fn
        kwargs.update(backend.kwargs)
        kwargs["dynamic"] = backend.dynamic
    else:
        return None
    return kwargs


def _reduce_compiled(compiled: Any) -> tuple:
    return _rebuild_compiled, (compiled._orig_mod, compile_kwargs(compiled))


def _rebuild_compiled(module: nn.Module, kwargs: dict[str, Any] | None) -> nn.Module:
    """``torch.compile(module, **kwargs)`` (lazy: compiles at the first call); the module itself
    when the settings were not recoverable or torch.compile refuses."""
    if kwargs is None:
        return module
    try:
        # torch.compile of an nn.Module returns an OptimizedModule (an nn.Module); the stub
        # only says "a callable with the same signature".
        return cast(nn.Module, torch.compile(module, **kwargs))
    except Exception:  # e.g. a backend this worker lacks: run eagerly, results are the same
        return module


# --------------------------------------------------------------------------- torch.export


def _reduce_exported(ep: Any) -> tuple:
    from torch._export.serde.serialize import serialize

    constants = dict(ep.constants)
    tensor_constants = all(isinstance(v, torch.Tensor) for v in constants.values())
    try:
        artifact = serialize(
            ep,
            serialize_state_dict=False,
            serialize_constants=not tensor_constants,
            serialize_example_inputs=False,
        )
    except Exception as exc:
        raise PackError(
            f"ExportedProgram cannot be serialized by torch.export ({type(exc).__name__}: {exc}); "
            "pack ep.module() instead (an nn.Module over the same weights)"
        ) from exc
    params = [n for n in ep.graph_signature.parameters]
    return _rebuild_exported, (
        artifact.exported_program,
        dict(ep.state_dict),
        params,
        constants if tensor_constants else artifact.constants,
        ep.example_inputs,
    )


def _rebuild_exported(
    program: bytes, state_dict: dict, params: list[str], constants: Any, example_inputs: Any
) -> Any:
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    state_dict = dict(state_dict)
    for n in params:  # parameters must be nn.Parameter in an ExportedProgram; wrapping is free
        t = state_dict.get(n)
        if t is not None and not isinstance(t, nn.Parameter):
            state_dict[n] = nn.Parameter(t, requires_grad=False)
    # SerializedArtifact's fields are annotated bytes, but deserialize_torch_artifact also takes
    # an already-deserialized dict (returned as is), which is what the state dict is here.
    artifact = SerializedArtifact(program, state_dict, constants, example_inputs)  # type: ignore[arg-type]
    return deserialize(artifact)
