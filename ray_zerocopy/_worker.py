"""Worker side: fetching an arena from Ray's object store and rebuilding pipelines from it.

Each process keeps a small cache of mapped arenas (the views) and, for task calls, at most one
*spare* pipeline per arena: a pipeline rebuilt from the skeleton that no call has used yet. A
task call takes the spare at once (:func:`call_fresh`); after the call a daemon thread
rebuilds the next spare while the worker waits for its next task, so the O(tensors) skeleton
unpickle is off the critical path whenever the worker has that much idle time between calls
(and no spare is built while calls come faster than that: :func:`_spare_in_time`).
Every call still gets a pipeline nobody has used before: no state survives between calls.

Entries unused for ``RAY_ZEROCOPY_CACHE_TTL`` seconds (default 30) are dropped, spare and all,
by a daemon thread, so that an arena whose wrapper was dropped in the driver is released by
idle workers and the object store can free it. ``RAY_ZEROCOPY_SPARE=0`` turns the spare
pipelines off (every call then rebuilds on its critical path).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import ray

from .errors import OwnerDiedError
from .unpack import LoadedArena, _gc_paused, rebuild

CACHE_TTL = float(os.environ.get("RAY_ZEROCOPY_CACHE_TTL", "30"))
CACHE_MAX = int(os.environ.get("RAY_ZEROCOPY_CACHE_MAX", "4"))

# On by default; RAY_ZEROCOPY_SPARE=0 turns them off (every call then unpickles its pipeline on
# its critical path).
SPARE = os.environ.get("RAY_ZEROCOPY_SPARE", "1") != "0"
#: Seconds the spare builder waits after a call ends before it starts, so as not to compete
#: with Ray returning that call's result (measured on the 2-vCPU VM, 200 tensors: the result
#: reached the driver 0.8 ms later when the builder started at once, 0.4 ms with 1 ms, none
#: with 2.5 ms; the spare was still ready for the next call back to back).
START_DELAY = 0.002
#: Weight of the newest sample in an arena's running averages of the idle time before a call
#: and of the time a rebuild takes (see :func:`_spare_in_time`).
AVERAGE_WEIGHT = 0.3
#: A call that starts less than this after its spare was finished most likely waited for the
#: builder to release the interpreter lock (see :func:`_take`).
LATE_WINDOW = 0.002

_lock = threading.Lock()
_cond = threading.Condition(_lock)  # guards everything below; signalled on every change
_cache: OrderedDict[tuple, _Entry] = OrderedDict()
_janitor: threading.Thread | None = None
_builder: threading.Thread | None = None
_queue: deque[_Entry] = deque()  # entries waiting for a spare to be built
_graveyard: list[Any] = []  # a pipeline used by a call, to be freed by the builder
_tasks_running = 0  # call_fresh calls running in this process
_last_end = 0.0  # time.monotonic() when the last of them ended


class _Entry:
    """One mapped arena in this process's cache, and at most one spare pipeline over it."""

    __slots__ = (
        "skeleton",
        "loaded",
        "last_used",
        "spare",
        "state",
        "cached",
        "taken",
        "rebuilt",
        "skipped",
        "ended",
        "gap",
        "build",
        "late",
        "built_at",
    )

    def __init__(self, skeleton: bytes, loaded: LoadedArena, now: float):
        self.skeleton = skeleton
        self.loaded = loaded
        self.last_used = now
        self.spare: Any = None
        self.state = "idle"  # "queued" for the builder, or "building"
        self.cached = True
        self.taken = 0  # calls that got the spare
        self.rebuilt = 0  # calls that rebuilt on their critical path
        self.skipped = 0  # calls after which no spare was built: it would not have been ready
        self.ended: float | None = None  # time.monotonic() when the last call on it ended
        # Running average of the idle time before a call (s), sampled when no spare was being
        # built in it (the builder holds the interpreter lock and delays the call's start).
        self.gap: float | None = None
        self.build: float | None = None  # running average of a rebuild's duration (s)
        self.late = False  # the last call came before its spare was (nearly) ready
        self.built_at = 0.0  # time.monotonic() when the builder finished the last spare


def _average(old: float | None, sample: float) -> float:
    return sample if old is None else old + AVERAGE_WEIGHT * (sample - old)


def _spare_in_time(entry: _Entry) -> bool:
    """Whether to build a spare after a call: whether it is expected to be ready, or nearly,
    when the next call comes. Called with _lock held.

    When calls come faster than a rebuild (a 5,000-tensor pipeline back to back: a 12 ms
    rebuild against a 2.3 ms bare task round trip, benchmarks/task_overhead.py --breakdown), a
    spare saves nothing: the builder holds the interpreter lock, Ray cannot start the next task
    until the spare is finished (the call started about 1 ms after the build's end), and the
    forward pass that followed cost 26 - 28 ms of CPU against 21 ms on a pipeline the call built
    itself (benchmarks/spare_probe.py).
    So a call that came before its spare was ready (``late``, see :func:`_take`) turns the next
    one off, and spares stay off while the running average of the idle time before a call
    (sampled only when no spare was built in it) is under half a rebuild. They come back as
    soon as calls are further apart.
    """
    if entry.late:
        return False
    if entry.gap is None or entry.build is None:
        return True
    return entry.gap >= START_DELAY + entry.build / 2


def _drop(entry: _Entry) -> None:
    """Forgets an entry evicted from the cache (called with _lock held)."""
    entry.cached = False
    entry.spare = None
    if entry.state == "queued":
        _queue.remove(entry)
        entry.state = "idle"


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
            "wrap the pipeline again"
        ) from exc
    return skeleton, arena


def load_arena(
    ref: ray.ObjectRef, *, device: Any, fast_load: bool, protect: bool, writable: bool
) -> tuple[bytes, LoadedArena]:
    """Maps the arena of ``ref`` (no copy) and returns (skeleton, views)."""
    skeleton, arena = fetch(ref)
    loaded = LoadedArena(
        arena,
        device=device,
        fast_load=fast_load,
        protect=protect and not writable,
        writable=writable,
    )
    return skeleton, loaded


def load_pipeline(
    ref: ray.ObjectRef,
    *,
    device: Any = None,
    fast_load: bool = False,
    protect: bool = True,
    writable: bool = False,
    cache: bool = True,
) -> Any:
    """Returns a fresh pipeline over the (cached) mapped arena of ``ref``.

    Every call returns a pipeline no one has used before (the spare if one is ready, else a
    new unpickle), so no state survives between calls; only the read-only views are shared.
    """
    if not cache or writable:  # a private copy is per call: it may be written to
        with _gc_paused():  # one pause for both steps, the new objects kept old (see _fresh)
            skeleton, loaded = load_arena(
                ref, device=device, fast_load=fast_load, protect=protect, writable=writable
            )
            pipeline = rebuild(skeleton, loaded)
            _promote_young()
        return pipeline
    return _take(_entry(ref, device, fast_load, protect))


def call_fresh(
    ref: ray.ObjectRef,
    fn: Callable[..., Any],
    *args: Any,
    device: Any = None,
    fast_load: bool = False,
    writable: bool = False,
) -> Any:
    """Returns ``fn(pipeline, *args)`` for one task call, on a pipeline nobody has used before.

    The pipeline is the arena's spare if one is ready (no unpickle on the critical path), else
    a fresh rebuild. After the call, a daemon thread frees the used pipeline and (with spares
    on) rebuilds the next spare; it starts only when no call is running in this process, so
    that it uses the time the worker waits for its next task rather than delaying a call.
    """
    global _tasks_running, _last_end
    with _cond:
        _tasks_running += 1
    entry = None
    held: list[Any] = []  # the only reference once fn returns: freed on the builder thread
    try:
        if writable:
            held.append(load_pipeline(ref, device=device, fast_load=fast_load, writable=True))
        else:
            entry = _entry(ref, device, fast_load, True)
            held.append(_take(entry))
        return fn(held[0], *args)
    finally:
        # A pipeline over the cached read-only views is freed by the builder thread in idle
        # time, spares or not (some 8 objects per tensor: 3 ms for 5,000 tensors here, which
        # would otherwise pass before Ray sends this call's result); a private writable copy
        # is freed at once (it holds a copy of the weights).
        background = entry is not None
        with _cond:
            _tasks_running -= 1
            _last_end = time.monotonic()
            # At most one used pipeline waits for the builder: when calls come faster than it
            # frees them (tasks queued on this worker), a call frees its own as it returns.
            if background and not _graveyard:
                _graveyard.extend(held)
                held.clear()
            if entry is not None:
                entry.ended = _last_end
            if SPARE and entry is not None:
                if entry.cached and entry.spare is None and entry.state == "idle":
                    if _spare_in_time(entry):
                        entry.state = "queued"
                        _queue.append(entry)
                    else:
                        entry.skipped += 1
            _cond.notify_all()
        if background:
            _start_builder()


def _entry(ref: ray.ObjectRef, device: Any, fast_load: bool, protect: bool) -> _Entry:
    """The cache entry of ``ref`` on ``device``, mapping the arena on a miss."""
    key = (ref.hex(), str(device), bool(protect))
    now = time.monotonic()
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            hit.last_used = now
            return hit
    skeleton, loaded = load_arena(
        ref, device=device, fast_load=fast_load, protect=protect, writable=False
    )
    entry = _Entry(skeleton, loaded, now)
    with _lock:
        old = _cache.get(key)
        if old is not None:  # another thread mapped it meanwhile
            _drop(old)
        _cache[key] = entry
        while len(_cache) > CACHE_MAX:
            _drop(_cache.popitem(last=False)[1])
    _start_janitor()
    return entry


def _take(entry: _Entry) -> Any:
    """A pipeline over ``entry`` no one has used: its spare (waiting for one being built),
    else a rebuild in this thread. Also samples the idle time before this call and whether
    a spare came late (see :func:`_spare_in_time`)."""
    with _cond:
        now = time.monotonic()
        pending = entry.state != "idle"  # a spare queued or being built when the call came
        # The idle time since the last call is a sample only if no spare was built in it.
        if entry.ended is not None and not pending and entry.built_at <= entry.ended:
            entry.gap = _average(entry.gap, max(0.0, now - entry.ended))
        entry.late = False
        while True:
            if entry.spare is not None:
                pipeline, entry.spare = entry.spare, None
                entry.taken += 1
                if entry.build is not None:
                    # The call came while the spare was built (it waited here), or it started
                    # just as the build ended: the builder held the interpreter lock and Ray
                    # could not start the task before (the usual case; about 1 ms after the
                    # build's end back to back in benchmarks/spare_probe.py).
                    waited = time.monotonic() - now if pending else 0.0
                    entry.late = waited > entry.build / 2 or (
                        not pending and now - entry.built_at < LATE_WINDOW
                    )
                return pipeline
            if entry.state != "building":
                break
            _cond.wait()
        if entry.state == "queued":  # not started: cheaper to build it here than to wait
            _queue.remove(entry)
            entry.state = "idle"
            entry.late = True  # the call came within START_DELAY (or the builder was busy)
        entry.rebuilt += 1
    return _fresh(entry)


def _fresh(entry: _Entry) -> Any:
    """Rebuilds a pipeline over ``entry``, its objects kept out of the young generations.

    A pipeline of N tensors is some 8N new container objects (modules, their dicts, hook
    dicts, tensors). Left young, the next allocation after the rebuild starts a collection
    that traverses every one of them (measured: 6 - 13 ms for 5,000 tensors in a worker,
    as much as the rebuild), and they are traversed again when promoted. A task's pipeline
    lives for one call and is freed by reference counting, so that work finds nothing:
    ``gc.freeze(); gc.unfreeze()`` moves the young objects straight to the oldest generation
    instead (a list splice; see the gc module docs), where only full collections, which this
    does not make more frequent, look at them. Skipped if the process has frozen objects of
    its own (``gc.freeze`` before a fork), which ``unfreeze`` would release.
    """
    t0 = time.perf_counter()
    with _gc_paused():
        pipeline = rebuild(entry.skeleton, entry.loaded)
        _promote_young()
    spent = time.perf_counter() - t0
    with _lock:
        entry.build = _average(entry.build, spent)
    return pipeline


def _promote_young() -> None:
    """Moves the young objects to the oldest generation without a collection (see _fresh)."""
    if gc.get_freeze_count() == 0:
        gc.freeze()
        gc.unfreeze()


def _start_builder() -> None:
    global _builder
    with _lock:
        if _builder is not None:
            return
        _builder = threading.Thread(target=_builder_loop, name="ray_zerocopy-spare", daemon=True)
    _builder.start()


def _builder_loop() -> None:
    """Rebuilds spares and frees used pipelines, one at a time, while no call is running."""
    while True:
        with _cond:
            while True:
                if (_queue or _graveyard) and not _tasks_running:
                    # Let Ray send the result of the call that just ended before competing
                    # with it for the interpreter lock.
                    wait = _last_end + START_DELAY - time.monotonic()
                    if wait <= 0:
                        break
                    _cond.wait(wait)
                else:
                    _cond.wait()
            if _queue:  # the next call needs the spare; freeing can wait
                entry, used = _queue.popleft(), None
                entry.state = "building"
            else:
                entry, used = None, _graveyard.pop()
        if entry is None:
            del used  # some 8 objects per tensor to deallocate: not on a call's critical path
            continue
        try:
            pipeline = _fresh(entry)
        except BaseException:  # the call that needs it rebuilds it and reports the error
            pipeline = None
        with _cond:
            entry.state = "idle"
            entry.built_at = time.monotonic()
            if entry.cached and pipeline is not None:
                entry.spare = pipeline
            _cond.notify_all()
        del entry, pipeline


def _start_janitor() -> None:
    global _janitor
    with _lock:
        if _janitor is not None or CACHE_TTL <= 0:
            return
        _janitor = threading.Thread(target=_janitor_loop, name="ray_zerocopy-cache", daemon=True)
    _janitor.start()


def _janitor_loop() -> None:
    while True:
        time.sleep(max(0.05, CACHE_TTL / 4))
        cutoff = time.monotonic() - CACHE_TTL
        with _lock:
            stale = [k for k, v in _cache.items() if v.last_used < cutoff]
            for k in stale:
                _drop(_cache.pop(k))
        if stale:
            # Pipelines of a dropped arena that ended in reference cycles hold its views (and
            # the object store's memory) until a full collection: run it now, in idle time.
            gc.collect()
