"""Unpacking: tensor views over an arena, attached to a freshly unpickled skeleton.

Loading is O(tensors): the C core validates the header and manifest, then every tensor
becomes a view into the buffer. No byte of the data region is copied, checksummed or
touched on this path (unless a device or ``fast_load`` asks for it).
"""

from __future__ import annotations

import contextlib
import gc
import io
import pickle
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import _zc
from .device import resolve_device, upload
from .dtypes import torch_dtype
from .errors import ArenaError, UnpackError, ZeroCopyWarning
from .pack import _SKELETON_HEADER, SKELETON_MAGIC, _aligned_empty

__all__ = ["unpack", "LoadedArena", "rebuild", "verify_arena", "arena_data_crc"]

_layout_warned = threading.Event()


def _assemble(_reserved: Any, parts: list, offsets: list[int], total: int) -> Any:
    """Unpickles a :class:`ray_zerocopy.pack.StoreArena`: one read-only buffer over the arena.

    ``ray.get`` hands the parts back as memoryviews into one object of the store, back to back
    as the arena's layout needs them: the result is then a span over that shared memory (no
    copy; O(parts) to check that every part lies exactly where the layout puts it). If they do
    not (a Ray release that lays out out-of-band buffers differently, or a pickle made without
    out-of-band buffers), the parts are copied into a private arena, with a
    :class:`ZeroCopyWarning` the first time in the process.
    """
    span = _zc.span(parts, offsets, total)
    if isinstance(span, _zc.Span):
        return span
    if len(parts) > 1 and not _layout_warned.is_set():
        _layout_warned.set()
        warnings.warn(
            f"ray_zerocopy: the arena's {len(parts)} buffers did not come back from the object "
            f"store back to back ({span}); this process uses a private copy of the weights "
            "(not shared with other processes). Report this with your Ray version "
            f"({_ray_version()}).",
            ZeroCopyWarning,
            stacklevel=2,
        )
    copy = _aligned_empty(total)
    for part, off in zip(parts, offsets):
        src = memoryview(part).cast("B")
        if off + len(src) > total:
            raise ArenaError(
                f"arena part at offset {off} ({len(src)} bytes) ends past the arena's {total} bytes"
            )
        _zc.copy(copy, off, src, 0, len(src))
    return copy


def _ray_version() -> str:
    import sys

    ray = sys.modules.get("ray")
    return getattr(ray, "__version__", "unknown")


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pauses the cyclic garbage collector while many small objects are made (manifest tuples,
    views, the skeleton's modules): in a process that imported torch, a full collection
    triggered there costs more than the whole O(tensors) load.

    Counted, so that pauses in several threads (a task's rebuild and the worker's background
    rebuild of a spare pipeline) nest: the last one out restores the collector's state.
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


def _extent(shape: tuple, stride: tuple, itemsize: int) -> int:
    last = 0
    for n, s in zip(shape, stride):
        if n == 0:
            return 0
        last += (n - 1) * s
    return (last + 1) * itemsize


def device_views(devbuf: torch.Tensor, entries: list, data_offset: int) -> list[torch.Tensor]:
    """Views of the manifest's tensors (``parse()["tensors"]``) into ``devbuf``, a uint8 tensor
    holding an arena's data region (on any device; the offsets are taken in bytes)."""
    storage = devbuf.untyped_storage()
    base = devbuf.storage_offset()
    views = []
    for name, sidx, dt, shape, stride, soff, kind, flags, boff in entries:
        t = torch.empty(0, dtype=torch_dtype(dt), device=devbuf.device)
        t.set_(storage, (base + boff - data_offset) // _zc.dtype_size(dt), shape, stride)
        views.append(t)
    return views


class LoadedArena:
    """The tensors of one arena, as views into its buffer (or into one device allocation).

    Rebuild any number of pipelines from it with :func:`rebuild`; they all share these views.

    Args:
        buffer: the arena (any buffer: numpy array, memoryview, bytes; read-only is fine).
        device: ``None``/``"cpu"`` for views into the buffer, ``"cuda[:N]"`` for one device
            allocation holding the data region, with every tensor a view into it.
        fast_load: on the CPU, prefault the page tables of the data region on several threads
            (``MADV_POPULATE_READ``) so the first inference pays no page faults; on a GPU,
            copy through pinned staging buffers at PCIe speed.
        protect: make the page-aligned interior of the data region read-only in this process,
            so a stray write ends in a clear error naming the tensor instead of changing the
            weights every process on the node sees (CPU only).
        writable: give this process a private, writable copy of the arena instead (O(bytes)).
        nthreads: threads for prefaulting and copies (0: one per CPU).

    Raises:
        ArenaError: the buffer is not a valid arena (the message names the field).
        DeviceError: the device string is malformed or the device is not present.
    """

    def __init__(
        self,
        buffer: Any,
        *,
        device: Any = None,
        fast_load: bool = False,
        protect: bool = False,
        writable: bool = False,
        nthreads: int = 0,
    ):
        with _gc_paused():
            self._load(buffer, device, fast_load, protect, writable, nthreads)

    def _load(
        self,
        buffer: Any,
        device: Any,
        fast_load: bool,
        protect: bool,
        writable: bool,
        nthreads: int,
    ) -> None:
        if writable:
            src = memoryview(buffer).cast("B")
            copy = _aligned_empty(len(src))
            _zc.copy(copy, 0, src, 0, len(src), nthreads)
            buffer = copy
            protect = False
        self.device = resolve_device(device)
        self.mapping = _zc.Mapping(buffer)
        info = _zc.parse(self.mapping)
        self.info = info
        self.manifest_crc: int = info["manifest_crc"]
        data_offset, data_size = info["data_offset"], info["data_size"]
        entries = info["tensors"]
        self.names = [e[0] for e in entries]
        self.kinds = [e[6] for e in entries]

        views: list[torch.Tensor] = []
        if self.device.type == "cpu":
            if fast_load and data_size:
                self.mapping.populate(data_offset, data_size, nthreads)
            storages = []
            for off, length in info["storages"]:
                if length:
                    base = torch.frombuffer(
                        self.mapping, dtype=torch.uint8, count=length, offset=off
                    )
                else:
                    base = torch.empty(0, dtype=torch.uint8)
                storages.append(base.untyped_storage())
            for name, sidx, dt, shape, stride, soff, kind, flags, boff in entries:
                t = torch.empty(0, dtype=torch_dtype(dt))
                t.set_(storages[sidx], soff, shape, stride)
                views.append(t)
            if protect and data_size:
                ranges = [(e[8], _extent(e[3], e[4], _zc.dtype_size(e[2])), e[0]) for e in entries]
                self.mapping.protect(data_offset, data_size, ranges)
        else:
            devbuf = upload(
                self.mapping, data_offset, data_size, self.device, fast=fast_load, nthreads=nthreads
            )
            self.device_buffer = devbuf
            views = device_views(devbuf, entries, data_offset)
            # The host mapping is no longer needed: the device holds the data. Dropping it
            # releases the buffer (and the Ray object) once nothing else uses it.
            self.mapping = None
        self.views = views

    def objects(self) -> list[torch.Tensor]:
        """Fresh tensor objects for one rebuild: parameters as ``nn.Parameter``
        (``requires_grad=False``), other tensors as plain views. Bytes are shared."""
        # What nn.Parameter(v, requires_grad=False) does for a plain tensor, without its
        # Python-level __new__ (about 40% of the cost of a fresh parameter), in one C loop.
        return _zc.fresh_tensors(
            self.views, self.kinds, torch.Tensor._make_subclass, nn.Parameter, _zc.KIND_PARAMETER
        )


def _bad_pid(pid: Any, n: int) -> UnpackError:
    return UnpackError(
        f"skeleton refers to tensor {pid!r} but the arena holds {n} tensors: the skeleton and "
        "the arena do not belong together"
    )


def rebuild(skeleton: bytes, loaded: LoadedArena) -> Any:
    """Unpickles a skeleton, attaching the tensors of ``loaded``. Returns the pipeline.

    Raises:
        UnpackError: the skeleton is not one, or belongs to another arena.
    """
    if len(skeleton) < _SKELETON_HEADER.size:
        raise UnpackError(f"skeleton is {len(skeleton)} bytes: too short to be one")
    magic, crc = _SKELETON_HEADER.unpack_from(skeleton)
    if magic != SKELETON_MAGIC:
        raise UnpackError(f"skeleton starts with {magic!r}, expected {SKELETON_MAGIC!r}")
    if crc != loaded.manifest_crc:
        raise UnpackError(
            f"skeleton was made for an arena with manifest CRC32C {crc:#010x}, this arena has "
            f"{loaded.manifest_crc:#010x}: the skeleton and the arena do not belong together"
        )
    f = io.BytesIO(skeleton)
    f.seek(_SKELETON_HEADER.size)
    with _gc_paused():
        objects = loaded.objects()
        table = dict(enumerate(objects))
        unpickler = pickle.Unpickler(f)
        # A C-level lookup: no Python frame per tensor (a Python persistent_load costs about
        # 0.7 us per tensor, 3 ms for 5,000). An id outside 0..n-1 raises KeyError.
        # Setting persistent_load on an instance is documented pickle API; typeshed declares it
        # a method only.
        unpickler.persistent_load = table.__getitem__  # type: ignore[method-assign]
        try:
            return unpickler.load()
        except KeyError as exc:
            # Raised by the lookup itself (no Python frame below this one), not by code the
            # skeleton runs.
            pid = exc.args[0] if exc.args else None
            if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
                raise _bad_pid(pid, len(objects)) from None
            raise


def unpack(
    skeleton: bytes,
    buffer: Any,
    *,
    device: Any = None,
    fast_load: bool = False,
    protect: bool = False,
    writable: bool = False,
    nthreads: int = 0,
) -> Any:
    """Rebuilds a pipeline whose tensors are views into ``buffer`` (no copy).

    ``buffer`` may be read-only (as ``ray.get`` returns it). The returned pipeline keeps the
    buffer alive. Parameters come back as ``nn.Parameter`` with ``requires_grad=False``;
    buffers keep their ``persistent`` flag; train/eval flags are as they were packed.
    See :class:`LoadedArena` for the keyword arguments.

    Example:
        >>> skeleton, arena = pack(model)
        >>> clone = unpack(skeleton, arena)
    """
    return rebuild(
        skeleton,
        LoadedArena(
            buffer,
            device=device,
            fast_load=fast_load,
            protect=protect,
            writable=writable,
            nthreads=nthreads,
        ),
    )


def arena_data_crc(buffer: Any, nthreads: int = 0) -> int:
    """Validates an arena and returns the CRC32C of its data region as it is now (O(bytes)),
    whatever its header says.

    Raises:
        ArenaError: the arena's header or manifest is malformed.
    """
    info = _zc.parse(buffer)
    data = memoryview(buffer).cast("B")[info["data_offset"] : info["total_size"]]
    return _zc.crc32c_mt(data, nthreads)


def verify_arena(buffer: Any, nthreads: int = 0, *, expected_data_crc: int | None = None) -> None:
    """Validates an arena and checks the CRC32C of its whole data region (O(bytes)).

    An arena made by :func:`ray_zerocopy.pack` (or saved to a file) carries the checksum of its
    data region. One that the wrappers wrote into Ray's object store does not (its header has
    ``FLAG_NO_DATA_CRC``: computing it would cost a pass over the weights at wrap time); check
    it against ``expected_data_crc``, which the wrapper's ``data_crc`` gives.

    Args:
        buffer: the arena.
        nthreads: threads for the checksum (0: one per CPU).
        expected_data_crc: the CRC32C the data region must have; required for an arena without
            a checksum of its own, and checked in addition to the header's otherwise.

    Raises:
        ArenaError: the arena is malformed, its data does not match the checksum, or it
            carries none and no ``expected_data_crc`` was given (code ``ZC_ENODATACRC``).
    """
    info = _zc.parse(buffer)
    if not info["flags"] & _zc.FLAG_NO_DATA_CRC:
        _zc.verify_data(buffer, nthreads)
        if expected_data_crc is None or expected_data_crc == info["data_crc"]:
            return
        actual = info["data_crc"]
    elif expected_data_crc is None:
        _zc.verify_data(buffer, nthreads)  # raises ArenaError(ZC_ENODATACRC)
        return
    else:
        actual = arena_data_crc(buffer, nthreads)
        if actual == expected_data_crc:
            return
    err = ArenaError(
        f"data region: CRC32C is {actual:#010x}, expected {expected_data_crc:#010x}: "
        "the weights differ from the ones that were checksummed"
    )
    err.code, err.code_name = _zc.ZC_ECHECKSUM, "ZC_ECHECKSUM"
    raise err
