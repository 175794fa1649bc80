"""The wrappers on a local Ray: the seed's semantics, zero-copy proofs, lifecycle."""

from __future__ import annotations

import gc
import os
import re
import time

import numpy as np
import pytest
import torch
from torch import nn

import ray_zerocopy as rzc
from models import GPT2ish, Pipeline, big_mlp, mlp, n_bytes

pytestmark = pytest.mark.ray


class EncDec:
    """The seed's MyPipeline: an encoder and a decoder."""

    def __init__(self):
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU()).eval()
        self.decoder = nn.Linear(32, 4).eval()
        self.threshold = 0.0

    def __call__(self, data):
        with torch.inference_mode():
            return self.decoder(self.encoder(data))

    def process(self, item):
        return self(item).argmax(-1)

    def predict(self, data):
        return self(data) > self.threshold

    def set_threshold(self, t):
        self.threshold = t

    def weight_pointers(self):
        """(data_ptr, nbytes) of every weight, and the arena's address range in this process."""
        import ray

        ptrs = [(p.data_ptr(), p.untyped_storage().nbytes())
                for m in (self.encoder, self.decoder) for p in m.parameters()]
        return ptrs, os.getpid(), ray.get_runtime_context().get_assigned_resources()


def _shared_mapping_of(addr: int) -> str | None:
    """The path of the shared mapping of this process that contains addr, if any."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                return parts[5] if len(parts) > 5 else ""
    return None


def test_seed_basic_usage_and_method_forwarding(ray_session):
    p = EncDec()
    data = torch.randn(5, 16)
    wrapped = rzc.TaskWrapper(p)
    # Bit-identical weights; torch's CPU matmul may differ in the last bit between copies of a
    # model at different addresses, so outputs are compared to 1e-6.
    torch.testing.assert_close(wrapped(data), p(data), rtol=1e-6, atol=1e-6)
    assert torch.equal(wrapped.process(data), p.process(data))


def test_simple_parallelism_remote(ray_session):
    p = EncDec()
    wrapped = rzc.TaskWrapper(p)
    items = [torch.randn(2, 16) for _ in range(8)]
    refs = [wrapped.process.remote(x) for x in items]
    assert all(isinstance(r, ray_session.ObjectRef) for r in refs)
    results = ray_session.get(refs)
    assert all(torch.equal(r, p.process(x)) for r, x in zip(results, items))
    assert torch.equal(ray_session.get(wrapped.remote(items[0])), p(items[0]))


def test_no_state_between_calls_and_wrap_time_attributes(ray_session):
    p = EncDec()
    wrapped = rzc.TaskWrapper(p)
    p.threshold = 100.0  # after wrapping: the tasks see the wrap-time value
    data = torch.randn(3, 16)
    wrapped.set_threshold(1e9)
    assert torch.equal(wrapped.predict(data), p(data) > 0.0)


def test_missing_method_raises_at_once():
    p = EncDec()

    class NotCallable:
        def __init__(self):
            self.m = nn.Linear(2, 2)

    import ray

    if not ray.is_initialized():
        pytest.skip("needs the Ray session")
    wrapped = rzc.TaskWrapper(p)
    with pytest.raises(AttributeError, match="no public method 'nope'"):
        wrapped.nope
    with pytest.raises(AttributeError, match="'threshold'"):
        wrapped.threshold  # data attributes are not forwarded
    w2 = rzc.TaskWrapper(NotCallable())
    with pytest.raises(TypeError, match="not callable"):
        w2(1)


def test_task_weights_are_views_into_shared_memory_and_options_pass(ray_session):
    p = EncDec()
    wrapped = rzc.TaskWrapper(p, num_cpus=0.5)

    ptrs, pid, resources = wrapped.weight_pointers()
    assert resources.get("CPU") == 0.5
    assert pid != os.getpid()

    # Pointers are process-local: check inside a worker that loads the same object.
    ok = ray_session.get(_check_views.remote([wrapped.object_ref]))
    assert ok["all_inside"] and ok["n"] == 4
    assert all(m and ("plasma" in m or "/dev/shm" in m or "ray" in m) for m in ok["maps"]), ok


def _make_check():
    import ray

    @ray.remote
    def check_views(box):
        from ray_zerocopy import _worker

        pipeline = _worker.load_pipeline(box[0])
        arena = ray.get(box[0])[1]
        lo, hi = arena.address, arena.address + arena.size
        ptrs = [(p.data_ptr(), p.untyped_storage().nbytes())
                for m in (pipeline.encoder, pipeline.decoder) for p in m.parameters()]
        return {"n": len(ptrs), "all_inside": all(lo <= a and a + n <= hi for a, n in ptrs),
                "maps": [_shared_mapping_of(a) for a, _ in ptrs]}

    return check_views


_check_views = _make_check()


class _Loader:
    """A plain Ray actor that receives an ActorWrapper."""

    def __init__(self, wrapper, run_input=None):
        from ray_zerocopy.memory import uss

        torch.set_num_threads(1)
        self.uss0 = uss()
        self.pipeline = wrapper.load()
        self.wrapper = wrapper
        self.out = None
        if run_input is not None:
            with torch.inference_mode():
                self.out = self.pipeline(run_input)
        self.uss1 = uss()

    def report(self):
        import ray

        arena = ray.get(self.wrapper.object_ref)[1]
        lo, hi = arena.address, arena.address + arena.size
        ts = list(self.pipeline.parameters()) + list(self.pipeline.buffers())
        inside = all(lo <= t.data_ptr() and t.data_ptr() + t.untyped_storage().nbytes() <= hi
                     for t in ts)
        return {"inside": inside, "uss_growth": self.uss1 - self.uss0, "out": self.out,
                "maps": {_shared_mapping_of(t.data_ptr()) for t in ts}}

    def run(self, x):
        with torch.inference_mode():
            return self.pipeline(x)


def test_actor_zero_copy_uss_growth_under_10_percent(ray_session):
    model = big_mlp(48 << 20)
    x = torch.randn(2, 1024)
    aw = rzc.ActorWrapper(model)
    Loader = ray_session.remote(num_cpus=0)(_Loader)
    a = Loader.remote(aw, x)
    rep = ray_session.get(a.report.remote())
    assert rep["inside"], rep
    assert torch.equal(rep["out"], model(x).detach())
    assert rep["uss_growth"] < 0.10 * n_bytes(model), rep["uss_growth"]
    ray_session.kill(a)


def test_four_actors_node_memory_grows_by_one_model(ray_session):
    from ray_zerocopy.memory import node_pss

    model = big_mlp(64 << 20)
    size = n_bytes(model)
    x = torch.randn(1, 1024)

    @ray_session.remote(num_cpus=0)
    class Idle:
        def __init__(self):
            torch.set_num_threads(1)

        def load(self, w):
            self.p = w.load()
            with torch.inference_mode():
                return self.p(x).sum().item()

    actors = [Idle.remote() for _ in range(4)]
    ray_session.get([a.__ray_ready__.remote() for a in actors])
    gc.collect()
    before = node_pss()
    aw = rzc.ActorWrapper(model)
    want = model(x).sum().item()
    got = ray_session.get([a.load.remote(aw) for a in actors])
    assert all(abs(g - want) < 1e-3 for g in got)
    grown = node_pss() - before
    assert grown < 1.35 * size, f"node PSS grew {grown / size:.2f} models with 4 actors"
    for a in actors:
        ray_session.kill(a)


def test_ray_data_map_batches_seed_pattern(ray_session):
    import ray

    p = EncDec()
    aw = rzc.ActorWrapper(p)

    class InferenceActor:
        def __init__(self, actor_wrapper):
            self.pipeline = actor_wrapper.load()

        def __call__(self, batch):
            x = torch.as_tensor(np.stack(batch["x"]), dtype=torch.float32)
            return {"y": self.pipeline.process(x).numpy()}

    rows = [{"x": np.random.randn(16).astype(np.float32)} for _ in range(64)]
    ds = ray.data.from_items(rows)
    out = ds.map_batches(InferenceActor, fn_constructor_kwargs={"actor_wrapper": aw},
                         compute=ray.data.ActorPoolStrategy(size=2), batch_size=16,
                         num_cpus=0.5).take_all()
    want = p.process(torch.as_tensor(np.stack([r["x"] for r in rows]))).numpy()
    assert sorted(int(r["y"]) for r in out) == sorted(want.tolist())


def test_actor_wrapper_pickle_holds_no_weights(ray_session):
    from ray import cloudpickle

    model = big_mlp(8 << 20)
    aw = rzc.ActorWrapper(model)
    assert len(cloudpickle.dumps(aw)) < 16 << 10


def test_model_wrapper_published_api(ray_session):
    p = EncDec()
    data = torch.randn(2, 16)
    w = rzc.ModelWrapper.from_model(p, mode="actor")
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # noqa: E731
    close(w.load()(data), p(data))
    close(w.to_pipeline()(data), p(data))
    tp = rzc.ModelWrapper.for_tasks(p)
    close(tp(data), p(data))  # models run as remote tasks
    bare = mlp(width=16, out=3)
    remote_model = rzc.ModelWrapper.for_tasks(bare)
    close(remote_model(data), bare(data).detach())
    with pytest.raises(ValueError, match="mode"):
        rzc.ModelWrapper.from_model(p, mode="nope")
    with pytest.raises(ValueError, match="threshold"):
        rzc.ModelWrapper.from_model(p, mode="actor", model_attr_names=["threshold"])
    am = rzc.ModelWrapper.from_model(bare, mode="actor")
    Loader = ray_session.remote(num_cpus=0)(_Loader)
    a = Loader.remote(am, data)
    assert ray_session.get(a.report.remote())["inside"]
    ray_session.kill(a)


def _store_used_bytes() -> int:
    import ray
    from ray._private.internal_api import memory_summary

    # Name this session's GCS: another Ray instance on the machine must not confuse it.
    s = memory_summary(address=ray._private.worker._global_node.gcs_address, stats_only=True)
    m = re.search(r"Plasma memory usage (\d+) MiB", s)
    return int(m.group(1)) << 20 if m else 0


def test_dropping_wrapper_frees_object_store(ray_session):
    gc.collect()
    time.sleep(0.5)
    base = _store_used_bytes()
    model = big_mlp(64 << 20)
    wrapped = rzc.TaskWrapper(model)
    wrapped(torch.randn(1, 1024))
    assert _store_used_bytes() >= base + (60 << 20)
    del wrapped
    gc.collect()
    deadline = time.time() + 30  # workers drop idle cached arenas after RAY_ZEROCOPY_CACHE_TTL
    while time.time() < deadline and _store_used_bytes() > base + (4 << 20):
        time.sleep(0.5)
    assert _store_used_bytes() <= base + (4 << 20)


def test_owner_gone_error_says_so(ray_session):
    @ray_session.remote(num_cpus=0)
    class Owner:
        def make(self):
            return [rzc.ActorWrapper(EncDec())]

    @ray_session.remote(num_cpus=0, max_restarts=0)
    class User:
        def load(self, box):
            try:
                box[0].load()
                return "loaded"
            except rzc.OwnerDiedError as exc:
                return str(exc)

    owner = Owner.remote()
    box = ray_session.get(owner.make.remote())
    ray_session.kill(owner)
    time.sleep(1.0)
    user = User.remote()
    msg = ray_session.get(user.load.remote(box))
    assert "exited" in msg and "owner" in msg, msg
    ray_session.kill(user)


def test_bad_devices_are_clear_errors(ray_session):
    p = EncDec()
    with pytest.raises(rzc.DeviceError, match="no GPU"):
        rzc.TaskWrapper(p, device="cuda:0")
    with pytest.raises(rzc.DeviceError, match="not a valid device"):
        rzc.TaskWrapper(p, device="gpu-please")
    with pytest.raises(rzc.DeviceError):
        rzc.ActorWrapper(p, device="tpu")


def test_unpicklable_argument_named(ray_session):
    import threading

    wrapped = rzc.TaskWrapper(EncDec())
    with pytest.raises(rzc.WrapperError, match="argument 0"):
        wrapped.process(threading.Lock())
