"""share_device_copy=True on a real GPU, through Ray (marked gpu; skipped without CUDA, Ray
or a GPU in the Ray cluster). The same Ray-side logic runs on the CPU in
tests/test_device_share.py with a fake device; this file checks what only a GPU can: that the
consumers' weights really are CUDA IPC views of one allocation made by the holder.

Run by `make gpu-check` (benchmarks/gpu_check.sh) on the GPU machine, with Ray brought there
as wheels (../shared/tools/ray-wheels-for-device).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.gpu, pytest.mark.ray,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MIB = 2**20


def _model() -> nn.Module:
    """Two 4096 x 4096 fp32 layers: 128 MiB of weights, enough to see in device memory."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096)).eval()


@pytest.fixture(scope="module")
def gpu_ray(ray_session):
    if ray_session.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the Ray cluster has no GPU")
    return ray_session


def _consumer(ray):
    @ray.remote(num_gpus=0.25, num_cpus=0)
    class Consumer:
        def __init__(self, wrapper):
            self.before = torch.cuda.memory_allocated()  # 0: nothing on the device yet
            self.p = wrapper.load()
            torch.cuda.synchronize()
            self.after_load = torch.cuda.memory_allocated()

        def run(self, x):
            with torch.inference_mode():
                y = self.p(x.cuda()).cpu()
            w = next(self.p.parameters())
            from ray_zerocopy.device_share import _cuda_uuid

            return {"pid": os.getpid(), "y": y, "weights_allocated": self.after_load - self.before,
                    "device": str(w.device), "uuid": _cuda_uuid(w.device.index or 0),
                    "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

    return Consumer


def test_four_actors_share_one_device_copy(gpu_ray):
    import ray_zerocopy as rzc
    from ray_zerocopy.device_share import NAMESPACE, holder_name

    ray = gpu_ray
    model = _model()
    x = torch.randn(8, 4096)
    want = model(x)
    wrapper = rzc.ActorWrapper(model, device="cuda", share_device_copy=True)
    t0 = time.perf_counter()
    actors = [_consumer(ray).remote(wrapper) for _ in range(4)]
    reports = ray.get([a.run.remote(x) for a in actors])
    seconds = time.perf_counter() - t0
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())

    for r in reports:
        assert torch.allclose(r["y"], want, rtol=1e-3, atol=1e-3)
        assert r["device"].startswith("cuda")
        # the consumer allocated nothing for the weights: they are views of the holder's copy
        assert r["weights_allocated"] < nbytes // 100, r
    assert len({r["pid"] for r in reports}) == 4
    assert len({r["uuid"] for r in reports}) == 1  # one GPU here
    info = wrapper._device_share.holder_info()
    assert info["created"] == 1
    holder = ray.get_actor(holder_name(wrapper.object_ref.hex(), reports[0]["uuid"]),
                           namespace=NAMESPACE)
    st = ray.get(holder.stats.remote())
    assert st["cuda_allocated"] >= nbytes  # the one copy lives in the holder
    print(f"\n4 actors (num_gpus=0.25) on one shared copy of {nbytes / MIB:.0f} MiB: holder "
          f"allocated {st['cuda_allocated'] / MIB:.0f} MiB (upload {st['upload_seconds']:.3f} s), "
          f"each consumer {max(r['weights_allocated'] for r in reports) / MIB:.1f} MiB; "
          f"4 actors started and ran in {seconds:.1f} s")
    for a in actors:
        ray.kill(a)


def test_task_wrapper_shares_one_copy(gpu_ray):
    import ray_zerocopy as rzc

    model = _model()
    x = torch.randn(4, 4096)
    want = model(x)
    wrapped = rzc.TaskWrapper(model, device="cuda", share_device_copy=True, num_gpus=0.25,
                              num_cpus=0)
    outs = gpu_ray.get([wrapped.remote(x.cuda()) for _ in range(4)])
    for y in outs:
        assert torch.allclose(y.cpu(), want, rtol=1e-3, atol=1e-3)
    assert wrapped._device_share.holder_info()["created"] == 1


def test_holder_goes_with_the_wrapper(gpu_ray):
    import gc

    import ray_zerocopy as rzc
    from ray_zerocopy import device_share
    from ray_zerocopy.device_share import NAMESPACE, holder_name

    ray = gpu_ray
    wrapper = rzc.ActorWrapper(_model(), device="cuda", share_device_copy=True)
    p = wrapper.load()  # the driver is a consumer too
    uuid = device_share._cuda_uuid(0)
    name = holder_name(wrapper.object_ref.hex(), uuid)
    ray.get_actor(name, namespace=NAMESPACE)
    del wrapper, p
    device_share._leases.clear()
    gc.collect()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.2)
    pytest.fail("the holder outlived its wrapper")
