"""ray_zerocopy: zero-copy sharing of PyTorch models across Ray tasks and actors.

The weights of a pipeline go into Ray's object store once per node, in one arena (a
contiguous buffer laid out by the C core); every task and actor on the node maps them
with no copy.

Example:
    >>> from ray_zerocopy import TaskWrapper
    >>> wrapped = TaskWrapper(pipeline)
    >>> result = wrapped(data)
"""

from __future__ import annotations

from .errors import (
    ArenaError,
    DeviceError,
    OwnerDiedError,
    PackError,
    UnpackError,
    WrapperError,
    ZeroCopyError,
    ZeroCopyWarning,
)
from .files import ArenaFile, load, save
from .pack import Packed, find_modules, pack
from .unpack import LoadedArena, rebuild, unpack, verify_arena

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "TaskWrapper",
    "ActorWrapper",
    "ModelWrapper",
    "JITTaskWrapper",
    "JITActorWrapper",
    "JITModelWrapper",
    "pack",
    "unpack",
    "save",
    "load",
    "ArenaFile",
    "rebuild",
    "find_modules",
    "verify_arena",
    "Packed",
    "LoadedArena",
    "ZeroCopyError",
    "ArenaError",
    "PackError",
    "UnpackError",
    "WrapperError",
    "DeviceError",
    "OwnerDiedError",
    "ZeroCopyWarning",
]

_RAY_NAMES = {
    "TaskWrapper": "wrappers",
    "ActorWrapper": "wrappers",
    "ModelWrapper": "wrappers",
    "JITTaskWrapper": "jit_wrappers",
    "JITActorWrapper": "jit_wrappers",
    "JITModelWrapper": "jit_wrappers",
}


def __getattr__(name: str):
    # The wrappers import Ray; keep `import ray_zerocopy` usable without it (the GPU loader
    # and packing need only torch).
    if name in _RAY_NAMES:
        import importlib

        return getattr(importlib.import_module(f".{_RAY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'ray_zerocopy' has no attribute {name!r}")
