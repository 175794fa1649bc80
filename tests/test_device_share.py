"""One device copy per GPU shared through Ray (share_device_copy=True), on the CPU.

The device parts run behind ray_zerocopy.device_share.DeviceBackend with the fake of
tests/fake_device.py: each process's "GPU" comes from RZC_FAKE_GPU, a holder's "device
allocation" is a memfd that other processes open through /proc (as CUDA IPC opens the
holder's allocation), and every upload leaves a marker file, so the tests count device copies
per GPU across processes. What is tested is the Ray side: naming, one upload per GPU for
several consumers, lifetime, and the errors. tests/test_gpu_ray.py runs the real path.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
import uuid

import pytest
import torch

import ray_zerocopy as rzc
from fake_device import BROKEN, LOG_DIR, uploads
from models import mlp
from ray_zerocopy import device_share
from ray_zerocopy.device_share import NAMESPACE, holder_name

pytestmark = pytest.mark.ray


@pytest.fixture
def fake_backend(monkeypatch):
    monkeypatch.setenv(device_share.BACKEND_ENV, "fake_device:FakeBackend")
    tag = f"GPU-fake-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("RZC_FAKE_GPU", f"{tag}-A")
    yield tag
    device_share._leases.clear()
    for f in uploads(tag):
        os.unlink(os.path.join(LOG_DIR, f))


def _consumer_cls(ray):
    @ray.remote(num_cpus=0)
    class Consumer:
        """An actor that loads on the fake GPU it is told, as an actor on a real GPU would."""

        def load(self, wrapper, gpu, x):
            os.environ["RZC_FAKE_GPU"] = gpu
            self.p = wrapper.load()
            w = next(self.p.parameters())
            with torch.inference_mode():
                return os.getpid(), self.p(x), w.untyped_storage().data_ptr()

        def forget(self):
            self.p = None
            device_share._leases.clear()
            gc.collect()

    return Consumer


def _within(done, seconds: float = 30.0) -> bool:
    """Polls ``done()`` until it is true (returns True) or ``seconds`` pass (returns False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.2)
    return False


def _gone_within(name: str, seconds: float = 30.0) -> bool:
    """True once no actor of that name is found."""
    import ray

    def gone():
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return True
        return False

    return _within(gone, seconds)


def _dead_within(handle, seconds: float = 30.0) -> bool:
    """True once the actor answers no more. ray.kill is asynchronous: the name is released by
    the GCS before the process has stopped, and a call that reaches it in between is answered."""
    import ray

    def dead():
        try:
            ray.get(handle.ping.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return True
        except ray.exceptions.GetTimeoutError:
            pass
        return False

    return _within(dead, seconds)


def test_options_are_checked_before_packing():
    with pytest.raises(rzc.DeviceError, match="device='cuda'"):
        rzc.ActorWrapper(mlp(), share_device_copy=True)
    with pytest.raises(rzc.DeviceError, match="device='cuda'"):
        rzc.ActorWrapper(mlp(), device="cpu", share_device_copy=True)
    with pytest.raises(rzc.WrapperError, match="writable"):
        rzc.ActorWrapper(mlp(), device="cuda", writable=True, share_device_copy=True)


def test_one_copy_per_gpu_shared_by_every_consumer(ray_session, fake_backend):
    ray = ray_session
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(4, 64)
    want = model(x)
    wrapper = rzc.ActorWrapper(model, device="cuda", share_device_copy=True)
    gpu_a, gpu_b = f"{fake_backend}-A", f"{fake_backend}-B"

    Consumer = _consumer_cls(ray)
    actors = [Consumer.remote() for _ in range(2)]
    # two actors on GPU A, then the same two on GPU B (as num_gpus=1 actors on other GPUs)
    on_a = ray.get([a.load.remote(wrapper, gpu_a, x) for a in actors])
    on_b = ray.get([a.load.remote(wrapper, gpu_b, x) for a in actors])
    here = wrapper.load()  # the driver is a consumer on GPU A too

    for _, y, _ in on_a + on_b:
        assert torch.equal(y, want)
    assert torch.equal(here(x), want)
    assert len({pid for pid, _, _ in on_a}) == 2
    # exactly one device copy per GPU, made by a holder, not by the consumers
    made = uploads(fake_backend)
    assert len(made) == 2, made
    assert {m.rsplit(".", 2)[0] for m in made} == {gpu_a, gpu_b}
    consumer_pids = {pid for pid, _, _ in on_a} | {os.getpid()}
    assert not consumer_pids & {int(m.rsplit(".", 2)[1]) for m in made}
    # holders are found by name: the weights' object id and the GPU's physical id
    key = wrapper.object_ref.hex()
    for gpu in (gpu_a, gpu_b):
        h = ray.get_actor(holder_name(key, gpu), namespace=NAMESPACE)
        st = ray.get(h.stats.remote())
        assert st["physical_id"] == gpu and st["nbytes"] > 0
    assert wrapper._device_share.holder_info() == {"holders": sorted([gpu_a, gpu_b]),
                                                   "created": 2}
    # a CPU load of the same wrapper maps the object store as usual
    assert torch.equal(wrapper.load(device="cpu")(x), want)
    for a in actors:
        ray.kill(a)


def test_lifetime_and_errors(ray_session, fake_backend, monkeypatch):
    ray = ray_session
    wrapper = rzc.ActorWrapper(mlp(), device="cuda", share_device_copy=True)
    x = torch.randn(2, 64)
    p = wrapper.load()
    y = p(x)
    key = wrapper.object_ref.hex()
    name = holder_name(key, f"{fake_backend}-A")
    holder = ray.get_actor(name, namespace=NAMESPACE)

    # a holder that fails to make its copy: the consumer gets its error, the registry forgets it
    monkeypatch.setenv("RZC_FAKE_GPU", BROKEN)
    with pytest.raises(rzc.DeviceError, match="out of memory"):
        wrapper.load()
    assert wrapper._device_share.holder_info()["holders"] == [f"{fake_backend}-A"]
    monkeypatch.setenv("RZC_FAKE_GPU", f"{fake_backend}-A")

    # a holder that dies (killed, node trouble) is replaced on the next load: one more upload
    ray.kill(holder)
    assert _gone_within(name)
    assert _dead_within(holder)  # else the cached copy's check may still reach it
    assert torch.equal(wrapper.load()(x), y)
    made = uploads(fake_backend)
    assert len(made) == 2, made

    # dropping the wrapper and what was loaded from it ends the registry and the holders (the
    # process's cache lets go of an opened copy RAY_ZEROCOPY_CACHE_TTL = 2 s after its last use)
    del wrapper, p
    gc.collect()
    assert _gone_within(name), "the holder outlived its wrapper"
    assert _gone_within(device_share.registry_name(key))


def test_owner_exit_gives_a_clear_error_on_the_next_load(ray_session, fake_backend):
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Owner:
        def wrap(self, backend):
            os.environ[device_share.BACKEND_ENV] = backend
            self.w = rzc.ActorWrapper(mlp(), device="cuda", share_device_copy=True)
            return self.w

    owner = Owner.remote()
    wrapper = ray.get(owner.wrap.remote("fake_device:FakeBackend"))
    x = torch.randn(2, 64)
    p = wrapper.load()
    y = p(x)
    name = holder_name(wrapper.object_ref.hex(), f"{fake_backend}-A")
    holder = ray.get_actor(name, namespace=NAMESPACE)
    ray.kill(owner)  # the wrapping process exits: its registry and holders go with it
    assert _gone_within(name)
    assert _dead_within(holder)
    with pytest.raises(rzc.OwnerDiedError, match="shared device copy of this wrapper is gone"):
        wrapper.load()
    # the pipeline loaded before is not a crash with this fake (its mapping stays valid);
    # with CUDA its device memory is gone, which is why loads check the holder first
    assert torch.equal(p(x), y)


def test_model_wrapper_and_task_plumbing(ray_session, fake_backend):
    from ray_zerocopy import wrappers

    torch.manual_seed(1)
    model = mlp()
    x = torch.randn(3, 64)
    mw = rzc.ModelWrapper.from_model(model, mode="actor", share_device_copy=True)
    assert torch.equal(mw.load(device="cuda")(x), model(x))
    assert torch.equal(mw.load()(x), model(x))  # device=None: the object store, as before
    # what a TaskWrapper task runs, called in this process (this cluster has no GPU to ask for)
    spec = ([mw.object_ref], "__call__", "cuda", False, False, mw._device_share)
    assert torch.equal(wrappers._run_method._function(spec, x), model(x))
    assert len(uploads(fake_backend)) == 1


def test_jit_wrappers_share_one_device_copy(ray_session, fake_backend, monkeypatch):
    """JITTaskWrapper and JITActorWrapper take share_device_copy as their eager siblings do
    (before, JITTaskWrapper passed it on to Ray as a task option, failing every call)."""
    from ray_zerocopy import wrappers

    torch.manual_seed(2)
    model = mlp()
    x = torch.randn(3, 64)
    scripted = torch.jit.script(model)
    want = model(x)
    for cls in (rzc.JITTaskWrapper, rzc.JITActorWrapper):
        with pytest.raises(rzc.DeviceError, match="device='cuda'"):
            cls(scripted, share_device_copy=True)
    aw = rzc.JITActorWrapper(scripted, device="cuda", share_device_copy=True)
    loaded = aw.load()
    assert isinstance(loaded, torch.jit.ScriptModule)
    assert torch.equal(loaded(x), want)
    # this cluster has no GPU for the task to ask for: let the wrap go ahead without one
    monkeypatch.setattr(wrappers, "_check_device_for_ray", lambda d, opts: ("cuda", dict(opts)))
    tw = rzc.JITTaskWrapper(scripted, device="cuda", share_device_copy=True)
    assert tw._device_share is not None and "share_device_copy" not in tw._ray_options
    # what its task runs, called in this process (this cluster has no GPU to ask for)
    spec = ([tw.object_ref], "__call__", "cuda", False, False, tw._device_share)
    assert torch.equal(wrappers._run_method._function(spec, x), want)
    # one upload per wrapper on this GPU, made by its holder
    assert len(uploads(fake_backend)) == 2


def teardown_module():
    shutil.rmtree(LOG_DIR, ignore_errors=True)
