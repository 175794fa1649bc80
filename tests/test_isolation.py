"""No state between task calls, whatever a call does to its pipeline; the worker's spare
pipelines; and the three points of the published library's API that code written against
ray-zerocopy 0.2.0 relies on (serialize/deserialize, __call__ always remote,
_is_standalone_module)."""

from __future__ import annotations

import enum
import os
import time
import weakref

import pytest
import torch
from torch import nn

import ray_zerocopy as rzc

pytestmark = pytest.mark.ray

HOOK_OUTPUT = 1e6


class Net(nn.Module):
    """A model whose methods change it in every way a call can: each returns what the model
    looked like when the call began (so a call also shows what an earlier call left behind)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 3))
        self.scale = 1.0
        self.seen: list[int] = []
        self.eval()

    def forward(self, x):
        return self.body(x) * self.scale

    def state(self) -> dict:
        first = self.body[0]
        return {
            "pid": os.getpid(),
            "scale": self.scale,
            "seen": list(self.seen),
            "extra": hasattr(self, "extra"),
            "training": self.training or any(m.training for m in self.modules()),
            "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                         for m in self.modules()),
            "head": type(self.body[2]).__name__,
            "requires_grad": any(p.requires_grad for p in self.parameters()),
            "tensor_attr": hasattr(first.weight, "tag"),
        }

    def mutate(self, how: str) -> dict:
        before = self.state()
        if how == "attribute":
            self.scale = 100.0
            self.extra = "set by a call"
        elif how == "append":
            self.seen.append(len(self.seen))
        elif how == "submodule":
            self.body[2] = nn.Identity()
        elif how == "train":
            self.train()
        elif how == "hook":
            self.body[0].register_forward_hook(lambda m, i, o: o + HOOK_OUTPUT)
            self.register_forward_pre_hook(lambda m, args: None)
        elif how == "tensor":
            self.body[0].weight.requires_grad_(True)
            self.body[0].weight.tag = "set by a call"
        return before


class NetPipeline:
    """A pipeline (not a module) holding the model and a list of its own."""

    def __init__(self):
        self.model = Net()
        self.history: list[str] = []

    def __call__(self, x):
        with torch.no_grad():
            return self.model(x)

    def mutate(self, how: str) -> dict:
        before = {**self.model.state(), "history": list(self.history)}
        self.history.append(how)
        if how == "pipeline-attribute":
            self.model = nn.Identity()
        else:
            self.model.mutate(how)
        return before

    def state(self) -> dict:
        return {**self.model.state(), "history": list(self.history)}

    def worker_report(self, ref_hex: str) -> dict:
        """This worker's cache entry for the wrapper, and the collector's state."""
        import gc

        from ray_zerocopy import _worker

        entries = [e for k, e in _worker._cache.items() if k[0] == ref_hex]
        return {"pid": os.getpid(), "entries": len(entries),
                "taken": sum(e.taken for e in entries),
                "rebuilt": sum(e.rebuilt for e in entries),
                "gc_enabled": gc.isenabled(), "frozen": gc.get_freeze_count(),
                "graveyard": len(_worker._graveyard)}


CHANGES = ["attribute", "append", "submodule", "train", "hook", "tensor"]
PRISTINE = {"scale": 1.0, "seen": [], "extra": False, "training": False, "hooks": 0,
            "head": "Linear", "requires_grad": False, "tensor_attr": False}


def _pristine(state: dict) -> bool:
    return all(state[k] == v for k, v in PRISTINE.items())


@pytest.mark.parametrize("pause", [0.0, 0.3], ids=["back-to-back", "spare-ready"])
def test_task_wrapper_no_state_between_calls(ray_session, pause):
    p = NetPipeline()
    wrapped = rzc.TaskWrapper(p)
    x = torch.randn(4, 8)
    want = p(x)
    pids = []
    for how in CHANGES + ["pipeline-attribute"] + CHANGES:
        before = wrapped.mutate(how)
        assert _pristine(before) and before["history"] == [], (how, before)
        pids.append(before["pid"])
        time.sleep(pause)
        # A call after it sees the pipeline as it was wrapped, and computes what it computes
        # locally (the hook, train() mode or a replaced layer would change the output).
        torch.testing.assert_close(wrapped(x), want, rtol=1e-6, atol=1e-6)
        time.sleep(pause)
    # The point is the same worker: its spare and cache must not carry a change over.
    assert len(set(pids)) < len(pids), pids
    assert _pristine(wrapped.state()) and p.state()["history"] == []


def test_task_wrapper_remote_calls_in_parallel_are_isolated(ray_session):
    p = NetPipeline()
    wrapped = rzc.TaskWrapper(p)
    refs = [wrapped.mutate.remote(how) for how in CHANGES * 5]
    for before in ray_session.get(refs):
        assert _pristine(before) and before["history"] == [], before
    # Tasks queued on a worker run back to back: used pipelines must not pile up there.
    report = wrapped.worker_report(wrapped.object_ref.hex())
    assert report["graveyard"] <= 1, report


@pytest.mark.parametrize("standalone", [True, False], ids=["bare-module", "pipeline"])
def test_model_wrapper_task_mode_no_state_between_calls(ray_session, standalone):
    net = Net()
    x = torch.randn(4, 8)
    with torch.no_grad():
        want = net(x)
    if standalone:
        remote = rzc.ModelWrapper.for_tasks(net, method_names=("mutate", "state"))
        model = remote
    else:
        pipe = NetPipeline()
        remote = rzc.ModelWrapper.for_tasks(pipe, method_names=("mutate", "state"))
        model = remote.model
    pids = []
    for how in CHANGES * 2:
        before = model.mutate(how)
        assert _pristine(before), (how, before)
        pids.append(before["pid"])
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)
    assert len(set(pids)) < len(pids), pids
    assert _pristine(model.state())


@pytest.mark.parametrize("spare", [None, "0"], ids=["default", "RAY_ZEROCOPY_SPARE=0"])
def test_calls_take_the_spare_and_gc_is_left_as_it_was(ray_session, spare):
    """Spares are on by default: calls with time between them take the spare the worker built
    after the previous call; RAY_ZEROCOPY_SPARE=0 in the workers' environment turns them off."""
    p = NetPipeline()
    env = {} if spare is None else {"runtime_env": {"env_vars": {"RAY_ZEROCOPY_SPARE": spare}}}
    wrapped = rzc.TaskWrapper(p, **env)
    hexid = wrapped.object_ref.hex()
    x = torch.randn(2, 8)
    for _ in range(4):
        torch.testing.assert_close(wrapped(x), p(x), rtol=1e-6, atol=1e-6)
        time.sleep(0.3)  # time for the worker to build the next spare
    reports = [wrapped.worker_report(hexid) for _ in range(4)]
    if spare is None:
        assert any(r["taken"] >= 2 for r in reports), reports
    else:
        assert all(r["taken"] == 0 for r in reports) and any(r["rebuilt"] >= 2 for r in reports)
    for r in reports:
        assert r["entries"] == 1 and r["gc_enabled"] and r["frozen"] == 0, r


def test_call_fresh_new_pipeline_each_call_and_spare_failure(ray_session, monkeypatch):
    """Each call gets new objects (modules, tensors); a spare that cannot be built is built
    by the call that needs it instead, which then reports its own error if any."""
    import threading

    from ray_zerocopy import _worker

    monkeypatch.setattr(_worker, "SPARE", True)
    packed = rzc.pack(NetPipeline())
    ref = ray_session.put((packed.skeleton, packed.arena))
    seen = []

    def fn(pipeline, x):
        seen.append(pipeline)
        return pipeline(x)

    x = torch.randn(2, 8)
    a = _worker.call_fresh(ref, fn, x)
    time.sleep(0.3)
    b = _worker.call_fresh(ref, fn, x)
    assert torch.equal(a, b)
    first, second = seen
    assert first is not second and first.model is not second.model
    assert first.model.body[0].weight is not second.model.body[0].weight
    assert first.model.body[0].weight.data_ptr() == second.model.body[0].weight.data_ptr()

    real = _worker.rebuild

    def failing_on_builder(skeleton, loaded):
        if threading.current_thread().name == "ray_zerocopy-spare":
            raise RuntimeError("spare build failed")
        return real(skeleton, loaded)

    monkeypatch.setattr(_worker, "rebuild", failing_on_builder)
    for _ in range(3):
        time.sleep(0.3)
        assert torch.equal(_worker.call_fresh(ref, fn, x), a)
    assert len({id(q) for q in seen}) == len(seen) == 5
    seen.clear()

    # Calls back to back, faster than the builder keeps up: used pipelines do not pile up.
    def slow_on_builder(skeleton, loaded):
        if threading.current_thread().name == "ray_zerocopy-spare":
            time.sleep(0.05)
        return real(skeleton, loaded)

    monkeypatch.setattr(_worker, "rebuild", slow_on_builder)
    for _ in range(20):
        assert torch.equal(_worker.call_fresh(ref, lambda p, x: p(x), x), a)
        assert len(_worker._graveyard) <= 1


def test_spare_policy_follows_the_time_between_calls():
    """The decision itself: a spare the last call waited for, or idle time between calls
    shorter than half a rebuild, turns the next spare off."""
    from ray_zerocopy import _worker

    entry = _worker._Entry(b"", None, 0.0)
    assert _worker._spare_in_time(entry)  # nothing measured yet
    entry.build = 0.020
    assert _worker._spare_in_time(entry)
    entry.gap = _worker.START_DELAY + 0.009
    assert not _worker._spare_in_time(entry)
    entry.gap = _worker.START_DELAY + 0.011
    assert _worker._spare_in_time(entry)
    entry.late = True
    assert not _worker._spare_in_time(entry)


def test_no_spare_while_calls_come_faster_than_a_rebuild(ray_session, monkeypatch):
    """Calls 10 ms apart with a 30 ms rebuild: a spare would not be ready in time, so after the
    first call that waits for one the worker stops building them and each call rebuilds on its
    own thread (results unchanged); calls further apart get spares again."""
    from ray_zerocopy import _worker

    monkeypatch.setattr(_worker, "SPARE", True)
    real = _worker.rebuild

    def slow(skeleton, loaded):
        time.sleep(0.03)  # a rebuild of some 10,000 tensors
        return real(skeleton, loaded)

    monkeypatch.setattr(_worker, "rebuild", slow)
    p = NetPipeline()
    packed = rzc.pack(p)
    ref = ray_session.put((packed.skeleton, packed.arena))
    x = torch.randn(2, 8)
    want = p(x)
    calls = []

    def fn(pipeline, x):
        # A pipeline nobody has used before (marked here, not held: a used pipeline that
        # something still holds is taken for one in a reference cycle, see _worker._free).
        calls.append(hasattr(pipeline, "used_by_a_call"))
        pipeline.used_by_a_call = True
        return pipeline(x)

    torch.testing.assert_close(want, want.clone())  # imported now, not between the calls
    for _ in range(8):
        torch.testing.assert_close(_worker.call_fresh(ref, fn, x), want, rtol=1e-6, atol=1e-6)
        time.sleep(0.01)
    entry = _worker._entry(ref, None, False, True)
    # Without the policy every call from the third on waits some 20 ms for a spare.
    assert entry.taken <= 1 and entry.skipped >= 5, (entry.skipped, entry.taken, entry.rebuilt)
    assert entry.gap is not None and entry.gap < 0.017 and entry.build >= 0.03
    taken = entry.taken
    for _ in range(6):
        time.sleep(0.3)
        torch.testing.assert_close(_worker.call_fresh(ref, fn, x), want, rtol=1e-6, atol=1e-6)
    assert entry.taken - taken >= 3, (entry.skipped, entry.taken, entry.rebuilt)
    assert calls == [False] * 14
    assert not entry.cyclic


class _Mortal(NetPipeline):
    """Records the thread that frees it."""

    freed_on: list = []

    def __del__(self):
        import threading

        _Mortal.freed_on.append(threading.current_thread().name)


def test_used_pipeline_freed_in_idle_time_without_spares(ray_session, monkeypatch):
    """With spares off, the pipeline a call used is freed by the worker's background thread
    after the call (not before its result goes back), and a writable call's private copy is
    freed as the call returns."""
    from ray_zerocopy import _worker

    monkeypatch.setattr(_worker, "SPARE", False)
    packed = rzc.pack(_Mortal())
    ref = ray_session.put((packed.skeleton, packed.arena))
    x = torch.randn(2, 8)
    # The builder finishes what earlier tests in this process left it (spares queued, a used
    # pipeline, a full collection) first: with a pipeline still waiting, a call frees its own
    # as it returns.
    _settle()
    _Mortal.freed_on.clear()
    for _ in range(3):
        _worker.call_fresh(ref, lambda p, x: p(x), x)
        time.sleep(0.2)
    assert _Mortal.freed_on == ["ray_zerocopy-spare"] * 3, _Mortal.freed_on
    _Mortal.freed_on.clear()
    _worker.call_fresh(ref, lambda p, x: p(x), x, writable=True)
    assert _Mortal.freed_on == ["MainThread"], _Mortal.freed_on
    assert not _worker._queue  # no spare was queued


class _HookedNet(Net):
    def __init__(self):
        super().__init__()
        self.register_forward_hook(self.keep)

    def keep(self, module, inputs, output):
        return output


class _Litter:
    """Cyclic garbage a call leaves behind."""

    alive: weakref.WeakSet = weakref.WeakSet()

    def __init__(self):
        self.me = self
        _Litter.alive.add(self)


class _Mode(enum.Enum):
    FAST = 1


def _littering_free(y):
    return y


def _settle(seconds: float = 10.0) -> None:
    """Waits for the worker's builder to finish what is queued (spares, used pipelines)."""
    from ray_zerocopy import _worker

    deadline = time.monotonic() + seconds
    while ((_worker._graveyard or _worker._queue or _worker._collect_due)
           and time.monotonic() < deadline):
        time.sleep(0.02)
    time.sleep(0.05)


def test_used_pipelines_in_reference_cycles_are_collected(ray_session, monkeypatch):
    """New pipelines are moved to the oldest generation, where garbage does not count towards a
    full collection; pipelines held by reference cycles would pile up there, one per call.
    The release of a used one shows it: that arena's pipelines then stay young and the
    worker runs one full collection in idle time."""
    import gc

    from ray_zerocopy import _worker

    monkeypatch.setattr(_worker, "SPARE", True)
    p = NetPipeline()
    p.model = _HookedNet()
    packed = rzc.pack(p)
    ref = ray_session.put((packed.skeleton, packed.arena))
    x = torch.randn(2, 8)
    want = p(x)
    alive: weakref.WeakSet = weakref.WeakSet()

    def fn(pipeline, x):
        alive.add(pipeline)
        return pipeline(x)

    _settle()
    assert gc.isenabled()
    for _ in range(20):
        torch.testing.assert_close(_worker.call_fresh(ref, fn, x), want, rtol=1e-6, atol=1e-6)
        time.sleep(0.02)
    _settle()
    entry = _worker._entry(ref, None, False, True)
    assert entry.cyclic
    # Without the check all 20 stay until a full collection happens to run (none does here).
    assert len(alive) <= 3, len(alive)


def test_garbage_left_by_a_call_is_not_moved_out_of_the_collectors_reach(ray_session,
                                                                           monkeypatch):
    """The young generations are collected before a rebuild moves what is young to the
    oldest one: cyclic garbage a call left there is found by the collector as usual."""
    from ray_zerocopy import _worker

    monkeypatch.setattr(_worker, "SPARE", True)
    p = NetPipeline()
    # Objects every rebuild shares (not made anew): they outlive a release without a cycle.
    p.post, p.mode, p.lib = _littering_free, _Mode.FAST, os
    packed = rzc.pack(p)
    ref = ray_session.put((packed.skeleton, packed.arena))
    x = torch.randn(2, 8)

    def littering(pipeline, x):
        y = pipeline(x)
        _Litter()
        return y

    _settle()
    _Litter.alive.clear()
    for _ in range(20):
        _worker.call_fresh(ref, littering, x)
        time.sleep(0.02)
    _settle()
    entry = _worker._entry(ref, None, False, True)
    assert not entry.cyclic and entry.taken >= 10, (entry.taken, entry.rebuilt)
    # Without collecting the young generations first, each rebuild moved the last call's
    # litter to the oldest generation: all 20 stayed.
    assert len(_Litter.alive) <= 2, len(_Litter.alive)


def test_the_janitor_leaves_an_entry_a_call_is_using(ray_session, monkeypatch):
    """A call longer than RAY_ZEROCOPY_CACHE_TTL keeps its arena cached; an idle entry goes."""
    import threading

    from ray_zerocopy import _worker

    monkeypatch.setattr(_worker, "CACHE_TTL", 0.2)
    packed = rzc.pack(NetPipeline())
    ref = ray_session.put((packed.skeleton, packed.arena))
    x = torch.randn(2, 8)
    started, release = threading.Event(), threading.Event()

    def long_call(pipeline, x):
        started.set()
        release.wait(10)
        return pipeline(x)

    t = threading.Thread(target=_worker.call_fresh, args=(ref, long_call, x))
    t.start()
    assert started.wait(10)
    entry = _worker._entry(ref, None, False, True)
    time.sleep(0.3)
    _worker._expire()
    assert entry.cached, "dropped while a call was using it"
    release.set()
    t.join(10)
    assert entry.cached and entry.calls == 0
    entry.last_used = time.monotonic() - 1
    _worker._expire()
    assert not entry.cached


def test_no_thread_to_be_had_is_not_fatal(ray_session, monkeypatch):
    """When the builder thread cannot be started, calls still work: what waited for it (a
    queued spare, a used pipeline) is dropped or freed at once, and a later call tries again."""
    import threading

    from ray_zerocopy import _worker

    packed = rzc.pack(_Mortal())
    ref = ray_session.put((packed.skeleton, packed.arena))
    x = torch.randn(2, 8)
    want = _worker.call_fresh(ref, lambda p, x: p(x), x)
    _settle()

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(_worker, "_builder", None)  # as in a process that has none yet
    monkeypatch.setattr(threading.Thread, "start", no_thread)
    _Mortal.freed_on.clear()
    for _ in range(3):
        assert torch.equal(_worker.call_fresh(ref, lambda p, x: p(x), x), want)
    assert _worker._builder is None and not _worker._queue and not _worker._graveyard
    assert _Mortal.freed_on == ["MainThread"] * 3, _Mortal.freed_on


def test_calls_at_once_map_an_arena_once(ray_session, monkeypatch):
    """Calls that miss the cache at once (a threaded or async actor) map the arena once: the
    others wait for that mapping (on a GPU, a second one would be a second copy of the
    weights); if it fails, the next one tries and reports its own error."""
    import threading

    from ray_zerocopy import _worker

    packed = rzc.pack(NetPipeline())
    ref = ray_session.put((packed.skeleton, packed.arena))
    x = torch.randn(2, 8)
    real = _worker.load_arena
    loads = []
    fail = [True]

    def slow_load(*args, **kwargs):
        loads.append(threading.current_thread().name)
        time.sleep(0.3)
        if fail[0]:
            fail[0] = False
            raise RuntimeError("the first mapping failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(_worker, "load_arena", slow_load)
    results: dict[str, object] = {}

    def call(name):
        try:
            results[name] = _worker.call_fresh(ref, lambda p, x: p(x), x)
        except RuntimeError as exc:
            results[name] = exc

    threads = [threading.Thread(target=call, args=(f"t{i}",), name=f"t{i}") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    errors = [r for r in results.values() if isinstance(r, RuntimeError)]
    # One mapping failed (its call reports it), one more was made, for the other three calls.
    assert len(loads) == 2, loads
    assert len(errors) == 1 and "first mapping failed" in str(errors[0])
    want = NetPipeline()(x)
    for r in results.values():
        if not isinstance(r, RuntimeError):
            torch.testing.assert_close(r, want, rtol=1e-6, atol=1e-6)
    assert not _worker._loading


# --------------------------------------------------------------------------- published API
# ray-zerocopy 0.2.0 (model_wrappers.py, nn/rewrite.py, _internal/zerocopy.py): documented
# behaviour that code written against it relies on.


class Predictor:
    """A pipeline whose own method calls its model (the published README's pattern)."""

    def __init__(self):
        torch.manual_seed(1)
        self.model = nn.Linear(8, 3).eval()

    def predict(self, x):
        with torch.no_grad():
            return self.model(x).argmax(-1)


def test_published_call_is_always_remote(ray_session):
    """'Always include __call__ if the model is callable' (prepare_pipeline): a pipeline
    method that calls self.model(x) works whatever method_names lists."""
    p = Predictor()
    x = torch.randn(5, 8)
    remote = rzc.ModelWrapper.for_tasks(p, method_names=("predict",))
    assert torch.equal(remote.predict(x), p.predict(x))
    assert isinstance(remote.model, object) and not isinstance(remote.model, nn.Module)
    bare = rzc.ModelWrapper.for_tasks(p.model, method_names=("forward",))
    with torch.no_grad():
        torch.testing.assert_close(bare(x), p.model(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(bare.forward(x), p.model(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(AttributeError):
        _ = bare.state_dict  # only the listed methods (and __call__) are remote


def test_published_jit_call_is_always_remote(ray_session):
    p = Predictor()
    x = torch.randn(5, 8)
    p.model = torch.jit.trace(p.model, x)
    remote = rzc.JITModelWrapper.for_tasks(p, method_names=("forward",))
    assert torch.equal(remote.predict(x), p.predict(x))


def test_published_is_standalone_module_and_mode(ray_session):
    p = Predictor()
    assert rzc.ModelWrapper.from_model(p.model, mode="task")._is_standalone_module is True
    assert rzc.ModelWrapper.from_model(p.model, mode="actor")._is_standalone_module is True
    w = rzc.ModelWrapper.from_model(p, mode="actor")
    assert w._is_standalone_module is False and w._mode == "actor"
    assert rzc.ModelWrapper.from_model(p, mode="task")._mode == "task"


def _deserialize_and_run(state, x):
    from ray_zerocopy import ModelWrapper

    w = ModelWrapper.deserialize(**state)
    loaded = w.load()
    return w._mode, w._is_standalone_module, loaded.predict(x) if hasattr(loaded, "predict") \
        else loaded(x)


def test_published_serialize_deserialize(ray_session):
    """serialize() returns a dict with the published keys; deserialize(**that) rebuilds the
    wrapper, here and in another process."""
    p = Predictor()
    x = torch.randn(5, 8)
    with torch.no_grad():
        want_model = p.model(x)
    remote_fn = ray_session.remote(_deserialize_and_run)
    for obj, mode in [(p, "actor"), (p, "task"), (p.model, "actor"), (p.model, "task")]:
        w = rzc.ModelWrapper.from_model(obj, mode=mode)
        state = w.serialize()
        assert set(state) == {"skeleton", "model_info", "is_standalone_module", "mode"}
        assert state["mode"] == mode and state["is_standalone_module"] == (obj is p.model)
        assert list(state["model_info"]) == ["model"]
        info = state["model_info"]["model"]
        if mode == "task":
            ref, methods = info
            assert isinstance(ref, ray_session.ObjectRef) and "__call__" in methods
        else:
            assert isinstance(info, ray_session.ObjectRef)
        assert list(w.model_refs) == ["model"]
        again = rzc.ModelWrapper.deserialize(**state)
        assert again._mode == mode and again._is_standalone_module == (obj is p.model)
        assert again.serialize()["model_info"].keys() == state["model_info"].keys()
        want = p.predict(x) if obj is p else want_model
        here = again.load()
        got = here.predict(x) if obj is p else here(x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        mode_there, standalone_there, there = ray_session.get(remote_fn.remote(state, x))
        assert mode_there == mode and standalone_there == (obj is p.model)
        torch.testing.assert_close(there, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        rzc.ModelWrapper.deserialize(**{**state, "mode": "nope"})
    with pytest.raises(TypeError, match="serialize"):
        rzc.ModelWrapper.deserialize(**{**state, "skeleton": object()})


def test_published_task_mode_methods_per_model(ray_session):
    """model_info carries the remote methods of each model; deserialize keeps them."""

    class Two:
        def __init__(self):
            self.encoder = nn.Linear(4, 4).eval()
            self.decoder = nn.Linear(4, 2).eval()

        def __call__(self, x):
            return self.decoder(self.encoder(x))

    w = rzc.ModelWrapper.from_model(Two(), mode="task", method_names=("forward",))
    state = w.serialize()
    assert set(state["model_info"]) == {"encoder", "decoder"}
    assert all(m == {"forward", "__call__"} for _, m in state["model_info"].values())
    state["model_info"]["decoder"] = (state["model_info"]["decoder"][0], {"__call__"})
    loaded = rzc.ModelWrapper.deserialize(**state).load()
    x = torch.randn(3, 4)
    assert loaded(x).shape == (3, 2) and loaded.encoder.forward(x).shape == (3, 4)
    with pytest.raises(AttributeError):
        _ = loaded.decoder.forward
