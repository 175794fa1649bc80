"""A wrapper pickled out of band (``ray.cloudpickle.dumps``, as Ray Serve does with a deployment's
constructor arguments) must not pin its weights forever: the pin ends with the wrapper."""

from __future__ import annotations

import gc
import time

import torch
from ray import cloudpickle
from torch import nn

import ray_zerocopy as rzc
from ray_zerocopy import _oob
from ray_zerocopy.memory import object_store_bytes


def _wait_store_at_most(limit: int, seconds: float = 20.0) -> int:
    deadline = time.time() + seconds
    used = object_store_bytes()
    while used > limit and time.time() < deadline:
        time.sleep(0.25)
        used = object_store_bytes()
    return used


def test_out_of_band_pickle_pins_until_the_wrapper_is_dropped(ray_session):
    gc.collect()
    base = _wait_store_at_most(object_store_bytes())
    model = nn.Linear(1024, 2048)  # 8 MiB
    aw = rzc.ActorWrapper(model)
    data = cloudpickle.dumps(aw)  # out of band: Ray pins the ref in this process
    data2 = cloudpickle.dumps([aw])
    assert _oob._PINS, "the out-of-band pickle was not seen"
    assert object_store_bytes() >= base + (8 << 20)

    # The bytes load in a worker (the ref inside is Ray's own) and give the same model.
    @ray_session.remote(num_cpus=0)
    def run(blob, x):
        return cloudpickle.loads(blob).load()(x)

    x = torch.randn(2, 1024)
    with torch.inference_mode():
        assert torch.equal(ray_session.get(run.remote(data, x)), model(x))
    assert cloudpickle.loads(data2)[0].object_ref == aw.object_ref

    del aw
    gc.collect()
    assert not _oob._PINS
    assert _wait_store_at_most(base + (1 << 20)) <= base + (1 << 20), "weights still pinned"


def test_in_band_pickle_is_left_to_ray(ray_session):
    aw = rzc.ActorWrapper(nn.Linear(8, 8))

    @ray_session.remote(num_cpus=0)
    def ref_of(box):
        return box[0].object_ref.hex()

    assert ray_session.get(ref_of.remote([aw])) == aw.object_ref.hex()
    assert not _oob._PINS


def test_a_reference_made_meanwhile_is_not_counted_as_a_pin(ray_session, monkeypatch):
    """Another thread that makes a reference to the same object while the wrapper is pickled
    must not have it removed with the pin: one pickle counts one pin, and the object stays
    readable through that reference after the wrapper is dropped."""
    import ray

    aw = rzc.ActorWrapper(nn.Linear(8, 8))
    ref = aw.object_ref
    others = []
    real = cloudpickle.dumps

    def dumps_with_a_reference_made_meanwhile(obj, *args, **kwargs):
        data = real(obj, *args, **kwargs)
        if isinstance(obj, ray.ObjectRef):
            others.append(ray.ObjectRef(obj.binary()))  # as another thread might, meanwhile
        return data

    monkeypatch.setattr(cloudpickle, "dumps", dumps_with_a_reference_made_meanwhile)
    data = cloudpickle.dumps(aw)
    monkeypatch.undo()
    assert others, "the ref was not pickled through ray.cloudpickle.dumps"
    assert [pins for r, pins, _ in _oob._PINS.values() if r == ref] == [1]
    del aw, data
    gc.collect()
    assert not _oob._PINS
    assert _oob._local_refs(ref) >= 2  # `ref` and the other thread's reference
    skeleton, arena = ray_session.get(others[0], timeout=10)
    assert len(skeleton) > 0 and memoryview(arena).nbytes > 0
