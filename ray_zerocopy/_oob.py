"""Out-of-band pickles of a wrapper: the pin Ray adds ends with the wrapper that was pickled.

Ray tracks an ``ObjectRef`` that travels in a task's or actor's arguments, or inside an object
in the store (in-band). When one is pickled any other way, as Ray Serve does with a deployment's
constructor arguments (``ray.cloudpickle.dumps``), Ray cannot know when the bytes die and pins
the object for the life of the pickling process: each redeploy with a new wrapper would keep the
old weights in the store until the driver exits.

So a wrapper pickled out of band pickles its ref itself, counts the pins Ray added for it, and
removes exactly those when the wrapper object that was pickled is garbage-collected. The weights
then live as long as that wrapper in the process that pickled it (and as long as any in-band
borrower), and are freed once it is dropped and the processes that mapped them are gone.
In-band pickles are left to Ray.
"""

from __future__ import annotations

from typing import Any

import ray

__all__ = ["pickle_ref", "unpickle_ref", "release"]

# id(holder) -> (ref, pins, the process's Ray session and worker); dict operations are atomic
# under the GIL, and release() runs from __del__, so no lock (a gc in pickle_ref could deadlock).
_PINS: dict[int, tuple[Any, int, Any]] = {}


class _Pickled:
    """An ObjectRef pickled out of band with ``ray.cloudpickle`` (Ray's own bytes for it)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def __reduce__(self):
        return (_Pickled, (self.data,))


def _in_band() -> bool:
    try:
        ctx = _global_worker().get_serialization_context()
        return bool(ctx.is_in_band_serialization())
    except Exception:  # not connected, or a Ray without the notion: leave the ref to Ray
        return True


def _global_worker() -> Any:  # Ray's private worker object (untyped attributes)
    return ray._private.worker.global_worker


def _worker_key() -> Any:
    w = _global_worker()
    return (getattr(getattr(w, "node", None), "session_name", None), w.worker_id)


def _local_refs(ref: Any) -> int | None:
    """This process's local reference count of ``ref`` (None if Ray does not say)."""
    try:
        counts = _global_worker().core_worker.get_all_reference_counts()
    except Exception:
        return None
    key = ref.hex()
    for oid, c in counts.items():  # keyed by the hex id (bytes) in Ray 2.x, by ObjectID before
        if (oid.decode() if isinstance(oid, bytes) else oid.hex()) == key:
            return int(c.get("local", 0))
    return 0


def pickle_ref(holder: object, ref: Any) -> Any:
    """What ``holder.__getstate__`` stores for ``ref``: the ref itself when Ray is pickling
    in-band, otherwise Ray's bytes for it, with the pins they added counted against ``holder``.
    """
    if not isinstance(ref, ray.ObjectRef) or _in_band():
        return ref
    from ray import cloudpickle

    before = _local_refs(ref)
    data = cloudpickle.dumps(ref)
    after = _local_refs(ref)
    if before is not None and after is not None and after > before:
        # One pickle adds one pin (Ray 2.x). A larger difference means another thread made a
        # reference to the same object meanwhile: removing that one as well would free the
        # weights under it, so at most one is counted (a reference dropped meanwhile can only
        # hide the pin, which then lasts as long as this process, as without this module).
        old = _PINS.get(id(holder))
        _PINS[id(holder)] = (ref, (old[1] if old else 0) + 1, _worker_key())
    return _Pickled(data)


def unpickle_ref(value: Any) -> Any:
    """The inverse of :func:`pickle_ref`."""
    if isinstance(value, _Pickled):
        from ray import cloudpickle

        return cloudpickle.loads(value.data)
    return value


def release(holder: object) -> None:
    """Removes the pins counted against ``holder``; called from its ``__del__``."""
    entry = _PINS.pop(id(holder), None)
    if entry is None:
        return
    ref, pins, key = entry
    try:
        if not ray.is_initialized() or _worker_key() != key:
            return  # Ray was shut down (and maybe started again): those pins went with it
        core_worker = _global_worker().core_worker
        for _ in range(pins):
            core_worker.remove_object_ref_reference(ref)
    except Exception:  # interpreter shutdown: nothing left to free
        pass
