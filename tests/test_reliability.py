"""Safety and reliability on Ray: read-only shared weights, bad input, faults, leaks, nodes."""

from __future__ import annotations

import gc
import glob
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import ray_zerocopy as rzc
from models import big_mlp, mlp
from test_wrappers import _store_used_bytes

pytestmark = pytest.mark.ray


class Net:
    """A pipeline whose methods try to write into its weights in the ways users do by accident."""

    def __init__(self):
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512)).eval()

    def __call__(self, x):
        with torch.inference_mode():
            return self.encoder(x)

    def add_inplace(self):
        with torch.inference_mode():
            self.encoder[0].weight.add_(1)

    def reinit(self):
        nn.init.zeros_(self.encoder[0].weight)

    def train_step(self, x):
        self.encoder.train()  # BatchNorm updates running stats in place
        with torch.no_grad():
            self.encoder(x)

    def poke(self):
        import ctypes

        w = self.encoder[0].weight
        ctypes.memset(w.data_ptr(), 0, 64)

    def write_private(self):
        with torch.inference_mode():
            self.encoder[0].weight.add_(1)
        return self.encoder[0].weight.sum().item()


def _packed_data_crc(pipeline) -> int:
    from ray_zerocopy import _zc

    return _zc.parse(rzc.pack(pipeline).arena)["data_crc"]


def _logs_mention(text: str, timeout: float = 10.0) -> bool:
    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in glob.glob(os.path.join(logs, "*.err")) + glob.glob(os.path.join(logs, "*.out")):
            try:
                with open(path, errors="replace") as f:
                    if text in f.read():
                        return True
            except OSError:
                pass
        time.sleep(0.3)
    return False


@pytest.mark.parametrize("method,tensor", [
    ("add_inplace", "encoder.0.weight"),
    ("reinit", "encoder.0.weight"),
    ("train_step", "encoder.1."),  # num_batches_tracked is bumped first
    ("poke", "encoder.0.weight"),
])
def test_write_to_shared_weight_is_stopped_and_named(ray_session, method, tensor):
    net = Net()
    wrapped = rzc.TaskWrapper(net, max_retries=0)
    args = (torch.randn(4, 512),) if method == "train_step" else ()
    with pytest.raises(ray_session.exceptions.WorkerCrashedError):
        getattr(wrapped, method)(*args)
    assert _logs_mention(f"write to shared read-only weight '{tensor}"), \
        "the worker's error output does not name the tensor"
    # The bytes every other worker sees did not change: they are still, byte for byte, the
    # data region pack() lays out for this pipeline.
    skeleton, arena = ray_session.get(wrapped.object_ref)
    rzc.verify_arena(arena, expected_data_crc=_packed_data_crc(net))
    x = torch.randn(2, 512)
    torch.testing.assert_close(wrapped(x), net(x), rtol=1e-6, atol=1e-6)


def test_writable_opt_out_gives_private_copy(ray_session):
    net = Net()
    w = rzc.TaskWrapper(net, writable=True)
    want = (net.encoder[0].weight + 1).sum().item()
    assert abs(w.write_private() - want) < 1e-2
    assert abs(w.write_private() - want) < 1e-2  # the shared copy never changed
    rzc.verify_arena(ray_session.get(w.object_ref)[1], expected_data_crc=_packed_data_crc(net))


def test_protection_lifted_before_release_memory_reused(ray_session):
    import numpy as np

    @ray_session.remote(num_cpus=0)
    class Reuser:
        def load(self, box):
            p = box[0].load()
            arena = ray_session.get(box[0].object_ref)[1]
            self.range = (arena.address, arena.address + arena.size)
            return sum(t.numel() for t in p.parameters())

        def put_until_reused(self, nbytes, tries):
            gc.collect()
            refs = []
            lo, hi = self.range
            for _ in range(tries):
                a = np.ones(nbytes, dtype=np.uint8)
                ref = ray_session.put(a)  # this worker writes into the store's shared memory
                refs.append(ref)
                got = ray_session.get(ref)
                start = got.ctypes.data
                del got
                if start < hi and start + nbytes > lo:
                    return True
            return False

    model = big_mlp(32 << 20)
    w = rzc.ActorWrapper(model)
    r = Reuser.remote()
    assert ray_session.get(r.load.remote([w])) > 0
    nbytes = w._shared.nbytes
    del w
    gc.collect()
    time.sleep(1.0)
    assert ray_session.get(r.put_until_reused.remote(nbytes, 20)), \
        "the store never reused the released arena's memory"
    ray_session.kill(r)


def test_bad_api_input_messages(ray_session):
    class NoModules:
        x = 1

    with pytest.raises(rzc.PackError, match="holds no torch.nn.Module"):
        rzc.TaskWrapper(NoModules())
    import threading

    p = Net()
    p.lock = threading.Lock()
    with pytest.raises(rzc.PackError, match="attribute lock"):
        rzc.ActorWrapper(p)
    with pytest.raises(rzc.PackError, match="meta"):
        rzc.TaskWrapper(nn.Linear(3, 3, device="meta"))
    w = rzc.TaskWrapper(Net())
    with pytest.raises(AttributeError, match="no public method 'predict'"):
        w.predict(1)
    with pytest.raises(rzc.WrapperError, match="argument 0"):
        w(threading.Lock())
    with pytest.raises(rzc.DeviceError):
        rzc.TaskWrapper(Net(), device="cuda:x")


def test_pipeline_too_big_for_object_store(ray_session):
    from conftest import OBJECT_STORE_BYTES

    m = nn.Module()
    m.w = nn.Parameter(torch.empty(OBJECT_STORE_BYTES // 4 + (16 << 20)), requires_grad=False)
    with pytest.raises(rzc.PackError, match="larger than this node's Ray object store"):
        rzc.TaskWrapper(m)


def test_store_capacity_asked_once_per_node(ray_session, monkeypatch):
    """The node's object store size is read from the GCS once; later wraps (and the check that
    refuses a pipeline too big for it) use the cached figure."""
    from conftest import OBJECT_STORE_BYTES

    from ray_zerocopy import wrappers

    wrappers._store_capacity.clear()
    calls = []
    real_nodes = ray_session.nodes
    monkeypatch.setattr(ray_session, "nodes", lambda: calls.append(1) or real_nodes())
    for _ in range(3):
        rzc.TaskWrapper(nn.Linear(4, 2))
    assert len(calls) == 1
    assert wrappers._local_store_capacity() == OBJECT_STORE_BYTES
    m = nn.Module()
    m.w = nn.Parameter(torch.empty(OBJECT_STORE_BYTES // 4 + (16 << 20)), requires_grad=False)
    with pytest.raises(rzc.PackError, match="larger than this node's Ray object store"):
        rzc.TaskWrapper(m)
    assert len(calls) == 1


class Flaky:
    def __init__(self, marker):
        self.model = nn.Linear(4, 2).eval()
        self.marker = marker

    def __call__(self, x):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)  # the worker dies in the middle of the call, once
        with torch.inference_mode():
            return self.model(x)


def test_worker_killed_mid_call_retry_gives_right_result(ray_session, tmp_path):
    p = Flaky(str(tmp_path / "died-once"))
    w = rzc.TaskWrapper(p, max_retries=2)
    x = torch.randn(3, 4)
    torch.testing.assert_close(w(x), p.model(x), rtol=1e-6, atol=1e-6)
    assert os.path.exists(p.marker)


def test_200_wrap_use_drop_cycles_no_leak(ray_session):
    from ray_zerocopy.memory import rss

    gc.collect()
    time.sleep(0.5)
    store0 = _store_used_bytes()
    x = torch.randn(1, 64)

    def cycle():
        w = rzc.TaskWrapper(mlp())
        w(x)
        del w

    for _ in range(20):  # warm-up: imports, caches, worker start
        cycle()
    gc.collect()
    rss0 = rss()
    for _ in range(200):
        cycle()
    gc.collect()
    grown = rss() - rss0
    assert grown < 32 << 20, f"driver RSS grew {grown / 2**20:.1f} MiB over 200 cycles"
    deadline = time.time() + 30
    while time.time() < deadline and _store_used_bytes() > store0 + (2 << 20):
        time.sleep(0.5)
    assert _store_used_bytes() <= store0 + (2 << 20)


def test_500_concurrent_remote_calls(ray_session):
    p = Net()
    w = rzc.TaskWrapper(p, num_cpus=0.25)
    xs = [torch.full((1, 512), float(i)) for i in range(500)]
    refs = [w.remote(x) for x in xs]
    ready, pending = ray_session.wait(refs, num_returns=len(refs), timeout=240)
    assert not pending, f"{len(pending)} calls still pending"
    outs = ray_session.get(refs)
    for i in (0, 123, 499):
        torch.testing.assert_close(outs[i], p(xs[i]), rtol=1e-5, atol=1e-5)


def test_several_nodes_each_maps_its_own_copy():
    """Runs in a subprocess: a Cluster of raylets cannot share this process with ray_session."""
    script = os.path.join(os.path.dirname(__file__), "multinode_check.py")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    r = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(result["nodes"]) == 2, result
    assert all(result["inside"]), result
    assert result["after_removal_ok"], result
