"""The exception hierarchy of ray_zerocopy.

Every error the library raises on purpose derives from :class:`ZeroCopyError`.
:class:`ArenaError` comes from the C core (corrupt or hostile arena bytes) and is
defined in the extension so that the core's error codes map to it in one place.
"""

from __future__ import annotations

from ._zc import ArenaError, ZeroCopyError

__all__ = [
    "ZeroCopyError",
    "ArenaError",
    "PackError",
    "UnpackError",
    "WrapperError",
    "DeviceError",
    "OwnerDiedError",
    "ZeroCopyWarning",
]


class PackError(ZeroCopyError, ValueError):
    """A pipeline cannot be packed: a tensor or attribute that cannot be shared.

    The message names the attribute path (``pipeline.encoder.layers.0.weight``).
    """


class UnpackError(ZeroCopyError):
    """A skeleton does not match its arena, or a pipeline cannot be rebuilt."""


class WrapperError(ZeroCopyError):
    """A wrapper is used in a way it does not support (bad method, arguments, options)."""


class DeviceError(ZeroCopyError, ValueError):
    """A device string is malformed, or names a device that is not present."""


class OwnerDiedError(ZeroCopyError):
    """The process that wrapped the pipeline (the owner of its weights) has exited."""


class ZeroCopyWarning(UserWarning):
    """Something works, but not zero-copy: e.g. Ray laid an object's buffers out in a way this
    version does not expect, and the process fell back to a private copy of the weights."""
