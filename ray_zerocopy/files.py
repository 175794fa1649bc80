"""Arena files and safetensors checkpoints: pipelines that come from disk, not from the driver.

Two sources join the one data path (pipeline -> arena -> ``ray.put`` -> workers) at the put:

- **Arena files** (:func:`save`, :func:`load`, :class:`ArenaFile`): a pipeline's skeleton and
  arena in one file (docs/format.md, "Arena files"). :func:`load` maps the file and rebuilds the
  pipeline with every weight a view into the mapping; ``TaskWrapper.from_file(path)`` puts the
  file's arena into Ray's object store in one copy from the mapped file, without building the
  pipeline in the driver.
- **safetensors checkpoints** (``TaskWrapper.from_safetensors(pipeline, weights)``): a pipeline
  built on the meta device plus ``.safetensors`` files; every weight is copied once, from the
  file's pages straight into the store.

A file is untrusted input like an arena: the C core validates its header, sections and arena
before anything is used. The skeleton inside it is a pickle: load files from trusted sources
only, as with ``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, Union

import numpy as np
import torch
from torch import nn

from . import _zc
from .dtypes import code_of
from .errors import ArenaError, PackError, ZeroCopyWarning
from .pack import _lay_out, _plan, find_modules, store_parts

__all__ = [
    "save",
    "load",
    "ArenaFile",
    "FileSource",
    "CheckpointSource",
    "FromFiles",
    "FILE_SUFFIX",
]

logger = logging.getLogger(__name__)

#: The suffix this library gives arena files (nothing depends on it).
FILE_SUFFIX = ".rzc"

PathLike = Union[str, "os.PathLike[str]"]  # noqa: UP007 (a runtime alias, Python 3.10)


# ---- arena files ------------------------------------------------------------------------------


def _methods_of(pipeline: Any) -> list[str]:
    """The methods a wrapper forwards (needs the wrappers' rule; Ray is imported lazily)."""
    try:
        from .wrappers import public_methods
    except ImportError:  # pragma: no cover - no Ray: the file is still usable by load()
        return []
    names = set(public_methods(pipeline))
    try:
        from .jit_wrappers import script_methods

        names |= script_methods(pipeline)
    except ImportError:  # pragma: no cover
        pass
    return sorted(names)


@dataclass(frozen=True)
class FileInfo:
    """What :func:`save` wrote. Attributes: path, file_size, weight_bytes, n_tensors, data_crc."""

    path: str
    file_size: int
    weight_bytes: int
    n_tensors: int
    data_crc: int


def save(pipeline: Any, path: PathLike, *, nthreads: int = 0) -> FileInfo:
    """Writes a pipeline (skeleton and arena) to one arena file.

    Every weight byte is written once, straight from the tensors' memory to the file (no arena
    is assembled in memory); the CRC32C of the data region is computed on the way and stored in
    the arena's header, so :func:`ray_zerocopy.verify_arena` and ``python -m ray_zerocopy
    inspect --verify`` can check the weights later. The file appears atomically (written to a
    temporary name, then renamed).

    Args:
        pipeline: anything the wrappers accept (a module, or an object holding modules;
            TorchScript, ``torch.compile`` and exported models too).
        path: where to write (the suffix is up to you; this library uses ``.rzc``).
        nthreads: threads for staging small tensors (0: one per CPU).

    Returns:
        A :class:`FileInfo`.

    Raises:
        PackError: the pipeline cannot be packed (the message names the attribute).
        OSError: the file cannot be written.

    Example:
        >>> save(model, "model.rzc")
        >>> same = load("model.rzc")
    """
    path = os.fspath(path)
    skeleton, arena, plan = store_parts(pipeline, nthreads=nthreads)
    meta = json.dumps(
        {
            "format": "ray_zerocopy arena file",
            "class": type(pipeline).__qualname__,
            "module": type(pipeline).__module__,
            "methods": _methods_of(pipeline),
            "n_tensors": len(plan.tensor_names),
            "weight_bytes": plan.weight_bytes,
            "torch": torch.__version__,
        },
        sort_keys=True,
    ).encode()
    header = _zc.file_write_header(meta, skeleton, arena.total)
    layout = _zc.file_plan(len(meta), len(skeleton), arena.total)
    data_offset = plan.data_offset
    tmp = f"{path}.tmp-{os.getpid()}"
    crc = 0
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(meta)
            f.write(skeleton)
            f.write(bytes(layout["arena_offset"] - layout["skeleton_offset"] - len(skeleton)))
            for part, off in zip(arena.parts, arena.offsets, strict=True):
                view = memoryview(part).cast("B")
                skip = max(data_offset - off, 0)  # the header and manifest are not checksummed
                if skip < len(view):
                    crc = _zc.crc32c(view[skip:], crc)
                f.write(view)
            # The arena header, now with the data checksum (written first without it).
            head = np.frombuffer(
                memoryview(arena.parts[0]).cast("B")[: _zc.HEADER_SIZE], dtype=np.uint8
            ).copy()
            _zc.set_data_crc(head, crc)
            f.seek(layout["arena_offset"])
            f.write(head.tobytes())
        os.replace(tmp, path)
    except BaseException:
        with _suppress_oserror():
            os.unlink(tmp)
        raise
    return FileInfo(path, layout["file_size"], plan.weight_bytes, len(plan.tensor_names), crc)


class _suppress_oserror:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, OSError)


def _with_path(exc: ArenaError, path: str) -> ArenaError:
    err = ArenaError(f"{path}: {exc}")
    err.code, err.code_name = exc.code, exc.code_name
    return err


class ArenaFile:
    """An arena file, mapped and validated (header, sections, arena manifest; O(tensors)).

    The weights are not read: the data region is checked only by :meth:`verify`.

    Args:
        path: the file.
        writable_pages: map it copy-on-write (``MAP_PRIVATE``; a write changes this process's
            pages, never the file) instead of read-only shared (``MAP_SHARED``, ``PROT_READ``).
            Clean pages are the page cache's either way: every process that maps the file
            shares them.

    Attributes:
        path, info (the header fields, as ``_zc.file_parse`` returns them), meta (the metadata
        dict), skeleton (bytes), arena (a memoryview of the arena inside the mapping).

    Raises:
        ArenaError: the file is truncated, corrupt or not an arena file (the message names the
            file and the field).
        OSError: the file cannot be opened or mapped.
    """

    def __init__(self, path: PathLike, *, writable_pages: bool = False):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _zc.FILE_HEADER_SIZE:  # mmap refuses an empty file; let the core explain
                self._raise(f.read())
            self._mmap = mmap.mmap(
                f.fileno(), size, access=mmap.ACCESS_COPY if writable_pages else mmap.ACCESS_READ
            )
        try:
            self.info = _zc.file_parse(self._mmap)
        except ArenaError as exc:
            self._mmap.close()
            raise _with_path(exc, self.path) from None
        info = self.info
        mo, ms = info["meta_offset"], info["meta_size"]
        try:
            self.meta = json.loads(self._mmap[mo : mo + ms].decode()) if ms else {}
            if not isinstance(self.meta, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            err = ArenaError(f"{self.path}: file metadata is not a JSON object ({exc})")
            err.code, err.code_name = _zc.ZC_EHEADER, "ZC_EHEADER"
            self._mmap.close()
            raise err from None
        so, ss = info["skeleton_offset"], info["skeleton_size"]
        self.skeleton = self._mmap[so : so + ss]
        ao = info["arena_offset"]
        self.arena = memoryview(self._mmap)[ao : ao + info["arena_size"]]

    def _raise(self, data: bytes) -> None:
        try:
            _zc.file_parse(data)
        except ArenaError as exc:
            raise _with_path(exc, self.path) from None
        raise AssertionError("unreachable: a file shorter than its header validated")

    @property
    def arena_info(self) -> dict:
        """The arena's header and manifest (as ``_zc.parse`` returns them)."""
        return self.info["arena"]

    def verify(self, nthreads: int = 0) -> None:
        """Checks the CRC32C of the arena's data region (O(bytes)).

        Raises:
            ArenaError: the weights do not match the checksum the file was written with.
        """
        from .unpack import verify_arena

        try:
            verify_arena(self.arena, nthreads)
        except ArenaError as exc:
            raise _with_path(exc, self.path) from None

    def __repr__(self) -> str:
        return (
            f"ArenaFile({self.path!r}, {self.meta.get('class', '?')}, "
            f"{len(self.arena_info['tensors'])} tensors, {self.info['file_size']:,} bytes)"
        )


def load(
    path: PathLike,
    *,
    device: Any = None,
    fast_load: bool = False,
    writable: bool = False,
    nthreads: int = 0,
) -> Any:
    """Maps an arena file and rebuilds its pipeline, every weight a view into the mapping.

    Loading is O(tensors): the header and manifest are validated as untrusted bytes, no weight
    is read or copied (the first inference faults the pages in, from the page cache that every
    process mapping the file shares). The weights are read-only: a stray in-place write stops
    with an error naming the tensor (CPU), unless ``writable=True``, which maps the file
    copy-on-write instead (a write changes this process's copy of that page, never the file).

    The skeleton is a pickle: load files from trusted sources only.

    Args:
        path: a file written by :func:`save`.
        device: ``None``/``"cpu"`` (views into the mapping) or ``"cuda[:N]"`` (one device copy).
        fast_load: prefault the page tables (CPU) or copy through pinned buffers (GPU).
        writable: copy-on-write weights instead of read-only ones.
        nthreads: threads for prefaulting and copies (0: one per CPU).

    Raises:
        ArenaError: the file is truncated, corrupt or not an arena file.
        UnpackError: the skeleton does not belong to the arena.

    Example:
        >>> save(pipeline, "p.rzc")
        >>> p = load("p.rzc")
    """
    from .unpack import LoadedArena, rebuild

    f = ArenaFile(path, writable_pages=True)
    loaded = LoadedArena(
        f.arena, device=device, fast_load=fast_load, protect=not writable, nthreads=nthreads
    )
    return rebuild(f.skeleton, loaded)


# ---- sources for the wrappers -----------------------------------------------------------------


class Source:
    """Something the wrappers put into the object store without a pipeline built in the driver.

    ``_Shared.put`` calls :meth:`store_parts`, which returns what ``pack.store_parts`` returns
    (skeleton, ``StoreArena``, a plan with ``weight_bytes`` and ``tensor_names``).

    Attributes:
        cls_name: the pipeline's class name; methods: the names a wrapper forwards;
        data_crc: the CRC32C of the arena's data region when known (else None).
    """

    cls_name: str = "?"
    methods: frozenset = frozenset()
    data_crc: int | None = None

    def store_parts(self) -> tuple[bytes, Any, Any]:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class _FilePlan:
    weight_bytes: int
    tensor_names: list[str]


class FileSource(Source):
    """An arena file, put into the object store in one copy from the mapped file.

    Validated when made (the wrapper's errors come before anything is put); the pipeline is not
    built (its skeleton is not unpickled) in this process.
    """

    def __init__(self, path: PathLike):
        self.file = ArenaFile(path)
        meta = self.file.meta
        self.cls_name = str(meta.get("class", "pipeline"))
        self.methods = frozenset(str(m) for m in meta.get("methods", ()))
        ai = self.file.arena_info
        self.data_crc = None if ai["flags"] & _zc.FLAG_NO_DATA_CRC else ai["data_crc"]

    def store_parts(self) -> tuple[bytes, Any, Any]:
        from .pack import StoreArena

        f = self.file
        ai = f.arena_info
        weight_bytes = f.meta.get("weight_bytes")
        if not isinstance(weight_bytes, int):  # a file from another writer: count the storages
            weight_bytes = sum(n for _, n in ai["storages"])
        logger.info(
            "%s: putting %s arena (%d tensors) into the object store",
            f.path,
            _size(len(f.arena)),
            len(ai["tensors"]),
        )
        arena = StoreArena([f.arena], [0], len(f.arena), len(f.arena))
        return f.skeleton, arena, _FilePlan(weight_bytes, [t[0] for t in ai["tensors"]])


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


# ---- safetensors checkpoints ------------------------------------------------------------------

Weights = Union[PathLike, Iterable[PathLike], Mapping[str, Any]]  # noqa: UP007 (runtime alias)

INDEX_NAME = "model.safetensors.index.json"


def _conversion_note(converted: int, staged: int, dtype: Any) -> str:
    parts = []
    if converted:
        parts.append(f"{_size(converted)} converted to {dtype} on the way, in a bounded window")
    if staged:
        parts.append(f"{_size(staged)} converted to {dtype} in private memory")
    return f" ({'; '.join(parts)})" if parts else ""


def _shard_files(src: Any) -> list[Path]:
    """The .safetensors files of one source: a file, an index .json, a directory, or a list."""
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if p.is_dir():
            index = p / INDEX_NAME
            if index.is_file():
                return _index_files(index)
            files = sorted(p.glob("*.safetensors"))
            if not files:
                raise PackError(f"{p}: no {INDEX_NAME} and no .safetensors file in the directory")
            return files
        if p.suffix == ".json":
            return _index_files(p)
        if not p.is_file():
            raise PackError(f"{p}: no such checkpoint file")
        return [p]
    if isinstance(src, Iterable):
        out: list[Path] = []
        for s in src:
            out += [f for f in _shard_files(s) if f not in out]
        return out
    raise PackError(
        f"weights: expected a path, a list of paths or a dict of them, got {type(src).__qualname__}"
    )


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PackError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})") from exc
    files: list[Path] = []
    for name in weight_map.values():
        f = index.parent / str(name)
        if f not in files:
            files.append(f)
    return files


def _file_mapping(path: Path, ptr: int) -> bool:
    """Whether address ptr lies in a mapping of the file at path (Linux; True where unknown)."""
    try:
        real = os.path.realpath(path)
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= ptr < hi:
                    return len(fields) == 6 and fields[5].strip() == real
    except OSError:  # pragma: no cover - not Linux
        return True
    return False


_copy_warned = False

# dtype conversion window (see CheckpointSource._convert): 32 chunks, enough for every thread
# that reads the region at once (Ray's copy, the gather of small tensors) to hold its own; each
# chunk the largest power of two from 64 KiB to 1 MiB that keeps the window within 4% of the
# converted bytes (a window of 2 - 32 MiB).
_LAZY_CHUNKS = 32
_LAZY_CHUNK_MIN = 64 << 10
_LAZY_CHUNK_MAX = 1 << 20


def _lazy_chunk(size: int) -> int:
    chunk = _LAZY_CHUNK_MAX
    while chunk > _LAZY_CHUNK_MIN and chunk * _LAZY_CHUNKS > 0.04 * size:
        chunk //= 2
    return chunk


def _top_models(pipeline: Any) -> list[tuple[str, nn.Module]]:
    """The models of a pipeline whose state dicts name its weights: the pipeline itself if it
    is a module, else each module not inside another one (with its attribute path)."""
    if isinstance(pipeline, nn.Module):
        return [("", pipeline)]
    out: list[tuple[str, nn.Module]] = []
    for path, m in find_modules(pipeline):
        if not any(path.startswith(p + ".") for p, _ in out):
            out.append((path, m))
    return out


@dataclass
class _Key:
    shard: int
    name: str  # the key in the checkpoint


def _short(names: list[str], limit: int = 8, quote: bool = True) -> str:
    shown = ", ".join(repr(n) if quote else n for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class CheckpointSource(Source):
    """A meta-device pipeline plus safetensors files, laid out for the object store.

    See ``TaskWrapper.from_safetensors`` for the arguments. Nothing is read or put when the
    checks fail: missing and unexpected keys, shape and dtype mismatches are reported together,
    naming the keys.

    ``prepare`` (called by ``store_parts``) maps every shard (safetensors' own memory map:
    ``safe_open(...).get_tensor`` returns views of the file's pages, so no header is parsed
    here), checks every key and shape, and hands the views to ``pack._plan`` in place of the
    meta tensors: the store's copy reads the weights straight from the page cache.
    """

    def __init__(
        self,
        pipeline: Any,
        weights: Weights,
        *,
        dtype: torch.dtype | None = None,
        prefetch: bool = True,
        nthreads: int = 0,
    ):
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise PackError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.pipeline = pipeline
        self.weights = weights
        self.dtype = dtype
        self.prefetch = prefetch
        self.nthreads = nthreads
        self.cls_name = type(pipeline).__qualname__
        self.methods = frozenset(_methods_of(pipeline))
        self.staged_bytes = 0  # bytes converted to dtype in private memory (see _convert)
        self.converted_bytes = 0  # bytes converted to dtype through the lazy region

    # -- what the pipeline expects ----------------------------------------------------------

    def _expected(self) -> tuple[list[tuple[str, list[Path]]], dict[str, torch.Tensor]]:
        """(prefix, shard files) per source, and every state-dict name -> tensor it must fill."""
        models = _top_models(self.pipeline)
        if not models:
            raise PackError(f"{self.cls_name} object holds no torch.nn.Module")
        by_path = dict(models)
        if isinstance(self.weights, Mapping):
            sources = []
            for key, src in self.weights.items():
                if key not in by_path:
                    raise PackError(
                        f"weights: {key!r} is not a model of {self.cls_name} (models: "
                        f"{', '.join(repr(p) for p in by_path) or 'none'}); key the dict by the "
                        "attribute path of each model"
                    )
                sources.append((f"{key}." if key else "", _shard_files(src)))
        else:
            sources = [("", _shard_files(self.weights))]
        expected: dict[str, torch.Tensor] = {}
        for path, model in models:
            prefix = f"{path}." if path else ""
            for k, t in model.state_dict(keep_vars=True).items():
                if isinstance(t, torch.Tensor):
                    expected.setdefault(prefix + k, t)
        return sources, expected

    # -- the layout -------------------------------------------------------------------------

    def store_parts(self) -> tuple[bytes, Any, Any]:
        t0 = time.perf_counter()
        replace, n_files, n_bytes = self._map_and_check()
        plan = _plan(self.pipeline, replace=replace)
        header = np.zeros(plan.data_offset, dtype=np.uint8)
        _zc.write_header(header, plan.sizes, plan.tensors)
        arena = _lay_out(plan, header, self.nthreads)
        logger.info(
            "%s: %d tensors, %s from %d checkpoint file(s) checked and mapped in %.2f s%s; "
            "copying into the object store",
            self.cls_name,
            len(plan.tensor_names),
            _size(n_bytes),
            n_files,
            time.perf_counter() - t0,
            _conversion_note(self.converted_bytes, self.staged_bytes, self.dtype),
        )
        return plan.skeleton(header), arena, plan

    def _map_and_check(self) -> tuple[dict[int, torch.Tensor], int, int]:
        from safetensors import safe_open

        sources, expected = self._expected()
        # Every tensor object and the names it has (tied weights have several).
        names_of: dict[int, list[str]] = {}
        tensor_of: dict[int, torch.Tensor] = {}
        for name, t in expected.items():
            names_of.setdefault(id(t), []).append(name)
            tensor_of[id(t)] = t

        handles: list[Any] = []
        files: list[Path] = []
        found: dict[str, _Key] = {}  # pipeline name -> where it is
        unexpected: list[str] = []
        dup: list[str] = []
        for prefix, shard_files in sources:
            for f in shard_files:
                try:
                    h = safe_open(str(f), framework="pt")
                except Exception as exc:  # safetensors raises its own error types
                    raise PackError(
                        f"{f}: cannot open as safetensors ({type(exc).__name__}: {exc})"
                    ) from exc
                handles.append(h)
                files.append(f)
                for k in h.keys():
                    full = prefix + k
                    if full in found:
                        dup.append(full)
                    elif full in expected:
                        found[full] = _Key(len(handles) - 1, k)
                    else:
                        unexpected.append(full)

        missing: list[str] = []
        meta_ids: list[int] = []
        for tid, names in names_of.items():
            t = tensor_of[tid]
            if any(n in found for n in names):
                meta_ids.append(tid)
            elif t.device.type == "meta":
                missing.append(names[0])

        # Read the headers' dtypes and shapes (views of the pages: nothing is read yet).
        replace: dict[int, torch.Tensor] = {}
        shape_err: list[str] = []
        dtype_err: list[str] = []
        per_shard: list[list[torch.Tensor]] = [[] for _ in handles]
        global _copy_warned
        checked_zero_copy: set[int] = set()
        for tid in meta_ids:
            t = tensor_of[tid]
            name = next(n for n in names_of[tid] if n in found)
            key = found[name]
            src = handles[key.shard].get_tensor(key.name)
            if key.shard not in checked_zero_copy and src.numel():
                checked_zero_copy.add(key.shard)
                if not _file_mapping(files[key.shard], src.data_ptr()) and not _copy_warned:
                    _copy_warned = True
                    warnings.warn(
                        f"ray_zerocopy: safetensors returned a copy of {key.name!r} instead of a "
                        f"view of {files[key.shard]}'s pages: this safetensors release costs the "
                        "driver a private copy of every weight while wrapping",
                        ZeroCopyWarning,
                        stacklevel=4,
                    )
            if tuple(src.shape) != tuple(t.shape):
                shape_err.append(f"{name!r}: checkpoint {list(src.shape)}, model {list(t.shape)}")
                continue
            want = t.dtype
            have = self.dtype if (self.dtype is not None and src.is_floating_point()) else src.dtype
            if have != want:
                hint = (
                    f" (pass dtype={want} to convert)"
                    if src.is_floating_point() and want.is_floating_point and self.dtype is None
                    else ""
                )
                dtype_err.append(
                    f"{name!r}: checkpoint {src.dtype}"
                    + (f" -> {have}" if have != src.dtype else "")
                    + f", model {want}{hint}"
                )
                continue
            replace[tid] = src
            per_shard[key.shard].append(src)

        # Non-persistent buffers on the meta device: in no state dict, so in no checkpoint.
        from_checkpoint = set(replace)  # the rest are buffers the model initializes itself
        uncovered = self._init_meta_buffers(set(names_of), replace)
        problems = []
        if missing:
            problems.append(
                f"missing keys (in the model, on the meta device, not in the "
                f"checkpoint): {_short(sorted(missing))}"
            )
        if unexpected:
            problems.append(
                f"unexpected keys (in the checkpoint, not in the model): "
                f"{_short(sorted(unexpected))}"
            )
        if dup:
            problems.append(f"keys in more than one checkpoint file: {_short(sorted(dup))}")
        if shape_err:
            problems.append(f"shape mismatches: {_short(shape_err, quote=False)}")
        if dtype_err:
            problems.append(f"dtype mismatches: {_short(dtype_err, quote=False)}")
        if uncovered:
            problems.append(
                f"tensors on the meta device that no checkpoint holds and the model cannot "
                f"initialize: {_short(uncovered)}; give them values (build them outside "
                "torch.device('meta'))"
            )
        if problems:
            raise PackError(
                f"{self.cls_name}: the checkpoint does not fit the model: " + "; ".join(problems)
            )

        # Conversions (staged: each converted tensor is a new allocation) and read-ahead.
        n_bytes = 0
        for i, (f, tensors) in enumerate(zip(files, per_shard, strict=True)):
            t0 = time.perf_counter()
            shard_bytes = sum(s.numel() * s.element_size() for s in tensors)
            if self.prefetch:
                for s in tensors:
                    self._prefetch(s)
            n_bytes += shard_bytes
            logger.info(
                "checkpoint file %d/%d %s: %d tensors, %s%s (%.2f s)",
                i + 1,
                len(files),
                f.name,
                len(tensors),
                _size(shard_bytes),
                " read ahead" if self.prefetch else "",
                time.perf_counter() - t0,
            )
        if self.dtype is not None:
            self._convert(replace, from_checkpoint)
        self._handles = handles  # the mappings live until the put (held by the views too)
        return replace, len(files), n_bytes

    def _convert(self, replace: dict[int, torch.Tensor], tids: set[int]) -> None:
        """Puts tensors of ``self.dtype`` in place of the checkpoint's floating-point views
        (``replace[tid]`` for ``tid`` in ``tids``; a buffer the model initialized itself keeps
        the model's dtype).

        Every contiguous view of a dtype the core converts (float16, bfloat16, float32, float64)
        becomes a view of one lazy region (``_zc.LazyConvert``, ``csrc/convert.c``): read-only
        memory whose bytes are made from the checkpoint's pages when first read, a chunk at a
        time, with a window of at most ``_LAZY_CHUNKS`` chunks resident (``_lazy_chunk``). The
        store's copy reads the region front to back, so the driver never holds the converted
        model, only the window; the region goes with the put's parts. Any other view (float8,
        a non-contiguous one) is converted with ``Tensor.to`` and staged in private memory
        (``staged_bytes``).
        """
        assert self.dtype is not None
        dst_code = code_of(self.dtype)
        esz = self.dtype.itemsize
        lazy: list[tuple[int, torch.Tensor, int]] = []
        size = 0
        for tid, src in list(replace.items()):
            if tid not in tids or not src.is_floating_point() or src.dtype == self.dtype:
                continue
            src_code = code_of(src.dtype)
            if (
                src.numel()
                and src.is_contiguous()
                and dst_code is not None
                and src_code is not None
                and _zc.convert_supported(dst_code, src_code)
            ):
                lazy.append((tid, src, size))
                size += -(-src.numel() * esz // 64) * 64
            else:
                replace[tid] = src.to(self.dtype)
                self.staged_bytes += replace[tid].numel() * replace[tid].element_size()
        if not lazy:
            return
        region = _zc.LazyConvert(
            [(src.data_ptr(), code_of(src.dtype), src.numel(), off) for _, src, off in lazy],
            dst_code,
            size,
            _lazy_chunk(size),
            _LAZY_CHUNKS,
            [src for _, src, _ in lazy],
        )
        with warnings.catch_warnings():
            # The region is read-only; nothing writes to these tensors (they only feed the put).
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            for tid, src, off in lazy:
                replace[tid] = torch.frombuffer(
                    region, dtype=self.dtype, count=src.numel(), offset=off
                ).view(src.shape)
        self.converted_bytes += size

    def _prefetch(self, src: torch.Tensor) -> None:
        """Reads a tensor's pages into the page cache and maps them, on several threads."""
        n = src.numel() * src.element_size()
        if n < (1 << 20):
            return  # small ones: the store's copy faults them in
        raw = torch.empty(0, dtype=torch.uint8).set_(
            src.untyped_storage(), src.storage_offset() * src.element_size(), (n,), (1,)
        )
        with _zc.Mapping(raw.numpy()) as m:
            m.populate(0, n, self.nthreads)

    def _init_meta_buffers(self, covered: set[int], replace: dict[int, torch.Tensor]) -> list[str]:
        """Gives values to the pipeline's non-persistent buffers that are on the meta device.

        A model that initializes its own weights (a Hugging Face ``PreTrainedModel``: its
        ``_init_weights(module)``, as ``from_pretrained`` does after loading onto the meta
        device) fills a zeroed CPU buffer that goes into ``replace``; the pipeline keeps its meta
        buffer. Returns the paths of the buffers nothing can fill.
        """
        out = []
        seen: set[int] = set()
        for path, m in find_modules(self.pipeline):
            for n, b in list(m._buffers.items()):
                if b is None or b.device.type != "meta" or id(b) in covered or id(b) in seen:
                    continue
                seen.add(id(b))
                init = _initializer_for(self.pipeline, path)
                if init is None:
                    out.append(f"{path}.{n}" if path else n)
                    continue
                real = torch.zeros_like(b, device="cpu")
                m._buffers[n] = real
                try:
                    with torch.no_grad():
                        init(m)
                finally:
                    m._buffers[n] = b
                replace[id(b)] = real
        return sorted(out)


def _initializer_for(pipeline: Any, path: str) -> Any:
    """The ``_init_weights`` of the outermost model above the module at ``path`` that has one
    (a Hugging Face ``PreTrainedModel``), or None."""
    for p, m in sorted(find_modules(pipeline), key=lambda pm: len(pm[0])):
        if (
            (p == "" or path == p or path.startswith(p + "."))
            and callable(getattr(m, "_init_weights", None))
            and hasattr(m, "config")
        ):
            return m._init_weights
    return None


_W = TypeVar("_W")  # the wrapper class FromFiles is mixed into


class FromFiles:
    """The wrappers' constructors from files; mixed into ``TaskWrapper`` and ``ActorWrapper``
    (and so into the JIT wrappers)."""

    @classmethod
    def from_file(cls: Callable[..., _W], path: PathLike, **kwargs: Any) -> _W:
        """Wraps the pipeline saved in an arena file (:func:`ray_zerocopy.save`) without building
        it here: the file is mapped and validated, and its arena goes into the object store in
        one copy from the file's pages. The keyword arguments are the constructor's (``device``,
        ``use_fast_load``, Ray options, ...).

        Raises:
            ArenaError: the file is truncated, corrupt or not an arena file.

        Example:
            >>> ray_zerocopy.save(pipeline, "p.rzc")
            >>> wrapped = TaskWrapper.from_file("p.rzc")
        """
        return cls(FileSource(path), **kwargs)

    @classmethod
    def from_safetensors(
        cls: Callable[..., _W],
        pipeline: Any,
        weights: Weights,
        *,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> _W:
        """Wraps a pipeline built on the meta device with its weights from safetensors files.

        Every weight is copied once, from the checkpoint file's pages into the object store; the
        driver holds no copy (its private memory grows by a few MB of bookkeeping). Keys are the
        state-dict names of the pipeline (of each model, after its attribute path and a dot, for
        a pipeline object that holds several), or of one model each when ``weights`` is a dict.
        Tensors that are not on the meta device keep their values unless the checkpoint has them.

        Args:
            pipeline: the pipeline, its models built under ``with torch.device("meta"):`` (or
                ``transformers``' ``from_config`` under it). It is not changed.
            weights: a ``.safetensors`` file, a ``model.safetensors.index.json``, a directory
                holding either (as ``save_pretrained`` writes it), a list of files, or a dict
                ``{model attribute path: any of those}``.
            dtype: convert every floating-point checkpoint tensor to this dtype on the way
                (e.g. a bfloat16 checkpoint into a float32 model), as ``Tensor.to`` does. Between
                float16, bfloat16, float32 and float64 the conversion happens during the store's
                copy, within a window of at most 32 MiB of the driver's memory; anything else
                (float8) is converted whole and held in the driver until the put
                (docs/files.md).
            **kwargs: the constructor's (``device``, ``use_fast_load``, Ray options, ...).

        Raises:
            PackError: missing or unexpected keys, shape or dtype mismatches (all of them, naming
                the keys), before anything is read or put.

        Example:
            >>> with torch.device("meta"):
            ...     model = GPT2LMHeadModel(config)
            >>> wrapped = TaskWrapper.from_safetensors(model, "gpt2-dir/")
        """
        return cls(CheckpointSource(pipeline, weights, dtype=dtype), **kwargs)
