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

import contextlib
import gc
import os
import threading
import time
import types
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Any

import ray
import torch
from torch import nn

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
#: Every this many rebuilds of an arena (and its 2nd to 4th), the used pipeline's release is
#: checked for a reference cycle that outlives it (see :func:`_free`).
CYCLE_CHECK_EVERY = 16

_lock = threading.Lock()
_cond = threading.Condition(_lock)  # guards everything below; signalled on every change
_cache: OrderedDict[tuple, _Entry] = OrderedDict()
_loading: dict[tuple, threading.Event] = {}  # keys a thread is mapping now (see _entry)
_janitor: threading.Thread | None = None
_builder: threading.Thread | None = None
_queue: deque[_Entry] = deque()  # entries waiting for a spare to be built
_graveyard: list[list[Any]] = []  # [entry, pipeline, check] a call used, to be freed
_tasks_running = 0  # call_fresh calls running in this process
_last_end = 0.0  # time.monotonic() when the last of them ended
_collect_due = False  # a full collection for the builder to run in idle time (see _free)


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
        "calls",
        "builds",
        "cyclic",
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
        self.calls = 0  # call_fresh calls using this entry now (the janitor leaves it alone)
        self.builds = 0  # pipelines rebuilt over it so far
        # Its used pipelines were found held by reference cycles: they are no longer moved
        # to the oldest generation (see _fresh, _free), so that the collector finds them.
        self.cyclic = False


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
        # One pause for both steps. The new objects are kept old (see _fresh), except those
        # of a private copy: it holds a copy of the weights, which a reference cycle must not
        # keep out of reach of the collector's young passes. A load made once (an actor's)
        # collects only the youngest generation first: in a fresh actor the next one holds
        # thousands of objects from its start-up, and collecting them would lengthen every
        # load to keep at most that much garbage from being moved, once.
        with _built_old(not writable, young=0):
            skeleton, loaded = load_arena(
                ref, device=device, fast_load=fast_load, protect=protect, writable=writable
            )
            return rebuild(skeleton, loaded)
    return _take(_entry(ref, device, fast_load, protect))[0]


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
    # [entry, pipeline, check]: the only reference to the pipeline once fn returns
    held: list[Any] = []
    returned = False
    try:
        if writable:
            pipeline = load_pipeline(ref, device=device, fast_load=fast_load, writable=True)
            held[:] = [None, pipeline, False]
            del pipeline
        else:
            entry = _entry(ref, device, fast_load, True)
            with _lock:
                entry.calls += 1
            held[:] = [entry, *_take(entry)]
        result = fn(held[1], *args)
        returned = True
        return result
    finally:
        if not returned and held:
            held[2] = False  # an exception's traceback may still hold the pipeline: no check
        with _cond:
            _tasks_running -= 1
            _last_end = time.monotonic()
            if entry is not None:
                entry.calls -= 1
                entry.ended = entry.last_used = _last_end
            # A pipeline over the cached read-only views is freed by the builder thread in
            # idle time, spares or not (some 8 objects per tensor: 2.3 ms for 5,000 tensors,
            # benchmarks/floor_probe.py, which would otherwise pass before Ray sends this
            # call's result). At most one waits for it: when calls come faster than it frees
            # them (tasks queued on this worker), a call frees its own as it returns, as it
            # does a private writable copy (it holds a copy of the weights) and a pipeline
            # over views the cache has dropped meanwhile (so that they are released now).
            if entry is not None and entry.cached and held and not _graveyard:
                _graveyard.append(held[:])
                held.clear()
            elif held:
                held[2] = False  # freed on this call's path: no cycle check (the builder's are)
            if SPARE and entry is not None:
                if entry.cached and entry.spare is None and entry.state == "idle":
                    if _spare_in_time(entry):
                        entry.state = "queued"
                        _queue.append(entry)
                    else:
                        entry.skipped += 1
            _cond.notify_all()
        if held:
            _free(held)
        if entry is not None:
            _start_builder()


def _entry(ref: ray.ObjectRef, device: Any, fast_load: bool, protect: bool) -> _Entry:
    """The cache entry of ``ref`` on ``device``, mapping the arena on a miss."""
    key = (ref.hex(), str(device), bool(protect))
    while True:
        with _lock:
            hit = _cache.get(key)
            if hit is not None:
                _cache.move_to_end(key)
                hit.last_used = time.monotonic()
                return hit
            loading = _loading.get(key)
            if loading is None:  # this thread maps it
                loading = _loading[key] = threading.Event()
                break
        # Another thread is mapping it (calls at once in a threaded or async actor): wait for
        # that rather than make a second mapping (on a GPU, a second copy of the weights), then
        # look again (if that load failed, this thread tries, and reports its own error).
        loading.wait()
    try:
        skeleton, loaded = load_arena(
            ref, device=device, fast_load=fast_load, protect=protect, writable=False
        )
        entry = _Entry(skeleton, loaded, time.monotonic())
        with _lock:
            _cache[key] = entry
            while len(_cache) > CACHE_MAX:
                _drop(_cache.popitem(last=False)[1])
    finally:
        with _lock:
            del _loading[key]
        loading.set()
    _start_janitor()
    return entry


def _take(entry: _Entry) -> tuple[Any, bool]:
    """A pipeline over ``entry`` no one has used: its spare (waiting for one being built),
    else a rebuild in this thread, and whether its release is to be checked for a reference
    cycle (see :func:`_fresh`). Also samples the idle time before this call and whether a
    spare came late (see :func:`_spare_in_time`)."""
    with _cond:
        now = time.monotonic()
        pending = entry.state != "idle"  # a spare queued or being built when the call came
        # The idle time since the last call is a sample only if no spare was built in it.
        if entry.ended is not None and not pending and entry.built_at <= entry.ended:
            entry.gap = _average(entry.gap, max(0.0, now - entry.ended))
        entry.late = False
        while True:
            if entry.spare is not None:
                spare, entry.spare = entry.spare, None
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
                return spare
            if entry.state != "building":
                break
            _cond.wait()
        if entry.state == "queued":  # not started: cheaper to build it here than to wait
            _queue.remove(entry)
            entry.state = "idle"
            entry.late = True  # the call came within START_DELAY (or the builder was busy)
        entry.rebuilt += 1
    return _fresh(entry)


def _fresh(entry: _Entry) -> tuple[Any, bool]:
    """Rebuilds a pipeline over ``entry``, its objects kept out of the young generations.
    Returns it and whether :func:`_free` is to check its release for a reference cycle.

    A pipeline of N tensors is some 8N new container objects (modules, their dicts, hook
    dicts, tensors). Left young, the next allocation after the rebuild starts a collection
    that traverses every one of them (measured: 6 - 13 ms for 5,000 tensors in a worker,
    as much as the rebuild), and they are traversed again when promoted. A task's pipeline
    lives for one call and is freed by reference counting, so that work finds nothing:
    ``gc.freeze(); gc.unfreeze()`` moves the young objects straight to the oldest generation
    instead (a list splice; see the gc module docs), where only full collections, which this
    does not make more frequent, look at them. Skipped if the process has frozen objects of
    its own (``gc.freeze`` before a fork), which ``unfreeze`` would release.

    That is only right for objects that reference counting frees: garbage moved there is not
    counted towards the next full collection. So the young generations are collected first
    (the garbage other code left there; they hold little, as every rebuild empties them), and
    a pipeline whose release shows that a reference cycle held it (:func:`_free`) turns this
    off for its arena.
    """
    t0 = time.perf_counter()
    promote = not entry.cyclic
    with _built_old(promote):
        pipeline = rebuild(entry.skeleton, entry.loaded)
    spent = time.perf_counter() - t0
    with _lock:
        entry.build = _average(entry.build, spent)
        entry.builds += 1
        n = entry.builds
    return pipeline, promote and (2 <= n <= 4 or n % CYCLE_CHECK_EVERY == 0)


_ATOMIC = (str, bytes, int, float, bool, type(None), torch.Tensor)
# Not searched: values that hold no module, and objects every pipeline shares (pickled by
# reference, or the interpreter's own).
_SKIPPED = (
    *_ATOMIC,
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    weakref.ref,
)
#: Objects :func:`_weak_refs` visits at most (a pipeline holding, say, a logger could lead it
#: far into the interpreter's own objects).
WALK_LIMIT = 200_000


def _weak_refs(pipeline: Any) -> list[weakref.ref]:
    """Weak references to ``pipeline`` (if it takes one) and to every module it holds, found
    through containers and plain objects; a module's submodules through ``Module.modules``
    (far cheaper than the packer's full walk, which also visits every module's attributes
    and tensors). Only these: they are made anew by every rebuild, whereas other objects a
    pipeline refers to may be shared (enum members, functions pickled by reference)."""
    refs: list[weakref.ref] = []
    with contextlib.suppress(TypeError):
        refs.append(weakref.ref(pipeline))
    seen: set[int] = set()
    stack = [pipeline]
    budget = WALK_LIMIT
    while stack and budget:
        obj = stack.pop()
        budget -= 1
        if isinstance(obj, _SKIPPED) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            refs.extend(weakref.ref(m) for m in obj.modules() if m is not pipeline)
            continue
        if isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(v for v in obj if not isinstance(v, _ATOMIC))
        elif isinstance(obj, dict):
            stack.extend(v for v in obj.values() if not isinstance(v, _ATOMIC))
        else:
            d = getattr(obj, "__dict__", None)
            if isinstance(d, dict):
                stack.extend(v for v in d.values() if not isinstance(v, _ATOMIC))
    return refs


@contextlib.contextmanager
def _built_old(promote: bool, young: int = 1) -> Iterator[None]:
    """Pauses the collector while a pipeline is made; with ``promote``, collects the young
    generations up to ``young`` first and moves the objects made to the oldest one after
    (see _fresh)."""
    with _gc_paused():
        promote = promote and gc.get_freeze_count() == 0
        if promote:
            gc.collect(young)
        yield
        if promote:
            gc.freeze()
            gc.unfreeze()


def _free(item: list[Any]) -> None:
    """Releases a used pipeline: ``item`` is ``[entry, pipeline, check]`` and holds the last
    reference to it. With ``check``, weak references to the pipeline and each of its modules
    show whether any outlives it: held by a reference cycle (a module holding a bound method
    of itself as a hook, a child pointing to its parent) or by a reference the call left
    behind. Its objects sit in the oldest generation (:func:`_fresh`), where garbage does not
    count towards a full collection, so every call would add to what only one finds: the
    arena's later pipelines stay young instead, and the builder runs one full collection in
    idle time for those already moved."""
    global _collect_due
    entry, refs = item[0], []
    if item[2]:
        try:
            refs = _weak_refs(item[1])
        except Exception:  # an object that will not show its __dict__: no check this time
            refs = []
    item.clear()
    if any(r() is not None for r in refs):
        with _cond:
            if not entry.cyclic:
                entry.cyclic = True
                _collect_due = True
                _cond.notify_all()


def _start_builder() -> None:
    global _builder
    with _lock:
        if _builder is not None:
            return
        thread = _builder = threading.Thread(
            target=_builder_loop, name="ray_zerocopy-spare", daemon=True
        )
    try:
        thread.start()
    except RuntimeError:  # no thread to be had: calls rebuild and free on their own thread
        with _cond:
            _builder = None
            for entry in _queue:
                entry.state = "idle"
            _queue.clear()
            used = _graveyard[:]
            _graveyard.clear()
        for item in used:
            _free(item)


def _builder_loop() -> None:
    """Rebuilds spares and frees used pipelines, one at a time, while no call is running."""
    global _collect_due
    while True:
        with _cond:
            while True:
                if (_queue or _graveyard or _collect_due) and not _tasks_running:
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
            elif _graveyard:
                entry, used = None, _graveyard.pop()
            else:  # _collect_due: cleared once the collection is done
                entry, used = None, None
        if used is not None:
            _free(used)  # some 8 objects per tensor to deallocate: not on a call's critical path
            del used
            continue
        if entry is None:
            gc.collect()  # pipelines of an arena found in reference cycles (see _free)
            with _cond:
                _collect_due = False
            continue
        try:
            spare: tuple[Any, bool] | None = _fresh(entry)
        except BaseException:  # the call that needs it rebuilds it and reports the error
            spare = None
        with _cond:
            entry.state = "idle"
            entry.built_at = time.monotonic()
            if entry.cached and spare is not None:
                entry.spare = spare
            _cond.notify_all()
        del entry, spare


def _start_janitor() -> None:
    global _janitor
    with _lock:
        if _janitor is not None or CACHE_TTL <= 0:
            return
        thread = _janitor = threading.Thread(
            target=_janitor_loop, name="ray_zerocopy-cache", daemon=True
        )
    try:
        thread.start()
    except RuntimeError:  # no thread to be had now: entries expire once a later call starts it
        with _lock:
            _janitor = None


def _janitor_loop() -> None:
    while True:
        time.sleep(max(0.05, CACHE_TTL / 4))
        _expire()


def _expire() -> None:
    """Drops the entries unused for CACHE_TTL seconds (not those a call is using)."""
    cutoff = time.monotonic() - CACHE_TTL
    with _lock:
        stale = [k for k, v in _cache.items() if v.last_used < cutoff and not v.calls]
        for k in stale:
            _drop(_cache.pop(k))
    if stale:
        # Pipelines of a dropped arena that ended in reference cycles hold its views (and
        # the object store's memory) until a full collection: run it now, in idle time.
        gc.collect()
