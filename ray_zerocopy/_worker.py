"""Worker side: fetching an arena from Ray's object store and rebuilding pipelines from it.

Each process keeps a small cache of mapped arenas (the views, never a pipeline): a task
call on a worker that has already mapped an arena costs a Ray task plus a skeleton unpickle.
Entries unused for ``RAY_ZEROCOPY_CACHE_TTL`` seconds (default 30) are dropped by a daemon
thread, so that an arena whose wrapper was dropped in the driver is released by idle workers
and the object store can free it.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from typing import Any

import ray

from .errors import OwnerDiedError
from .unpack import LoadedArena, rebuild

CACHE_TTL = float(os.environ.get("RAY_ZEROCOPY_CACHE_TTL", "30"))
CACHE_MAX = int(os.environ.get("RAY_ZEROCOPY_CACHE_MAX", "4"))

_lock = threading.Lock()
_cache: "OrderedDict[tuple, tuple[bytes, LoadedArena, list[float]]]" = OrderedDict()
_janitor: threading.Thread | None = None


def fetch(ref: ray.ObjectRef) -> tuple[bytes, Any]:
    """``ray.get`` of a wrapper's payload, with the owner's death explained.

    Raises:
        OwnerDiedError: the driver that wrapped the pipeline has exited.
    """
    try:
        skeleton, arena = ray.get(ref)
    except ray.exceptions.OwnerDiedError as exc:
        raise OwnerDiedError(
            "the weights of this wrapper are gone: the process that wrapped the pipeline (their "
            "owner in Ray's object store) has exited; wrap the pipeline again in a live process"
        ) from exc
    except ray.exceptions.ObjectLostError as exc:
        raise OwnerDiedError(
            f"the weights of this wrapper were lost from the object store ({type(exc).__name__}); "
            "wrap the pipeline again") from exc
    return skeleton, arena


def load_arena(ref: ray.ObjectRef, *, device: Any, fast_load: bool, protect: bool,
               writable: bool) -> tuple[bytes, LoadedArena]:
    """Maps the arena of ``ref`` (no copy) and returns (skeleton, views)."""
    skeleton, arena = fetch(ref)
    loaded = LoadedArena(arena, device=device, fast_load=fast_load,
                         protect=protect and not writable, writable=writable)
    return skeleton, loaded


def load_pipeline(ref: ray.ObjectRef, *, device: Any = None, fast_load: bool = False,
                  protect: bool = True, writable: bool = False, cache: bool = True) -> Any:
    """Returns a fresh pipeline over the (cached) mapped arena of ``ref``.

    Every call unpickles a new pipeline object, so no state survives between calls; only
    the read-only views are cached.
    """
    if not cache or writable:  # a private copy is per call: it may be written to
        skeleton, loaded = load_arena(ref, device=device, fast_load=fast_load,
                                      protect=protect, writable=writable)
        return rebuild(skeleton, loaded)
    key = (ref.hex(), str(device), bool(writable), bool(protect))
    now = time.monotonic()
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            hit[2][0] = now
    if hit is None:
        skeleton, loaded = load_arena(ref, device=device, fast_load=fast_load,
                                      protect=protect, writable=writable)
        hit = (skeleton, loaded, [now])
        with _lock:
            _cache[key] = hit
            while len(_cache) > CACHE_MAX:
                _cache.popitem(last=False)
        _start_janitor()
    return rebuild(hit[0], hit[1])


def _start_janitor() -> None:
    global _janitor
    if _janitor is not None or CACHE_TTL <= 0:
        return
    _janitor = threading.Thread(target=_janitor_loop, name="ray_zerocopy-cache", daemon=True)
    _janitor.start()


def _janitor_loop() -> None:
    while True:
        time.sleep(max(0.05, CACHE_TTL / 4))
        cutoff = time.monotonic() - CACHE_TTL
        with _lock:
            stale = [k for k, v in _cache.items() if v[2][0] < cutoff]
            for k in stale:
                del _cache[k]
