"""use_fast_load on the CPU: the page tables of the weights are populated during load."""

from __future__ import annotations

import mmap
import os

import pytest
import torch

import ray_zerocopy as rzc
from models import big_mlp
from ray_zerocopy.memory import rss


def _fresh_mapping(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def shm_arena(tmp_path_factory):
    model = big_mlp(48 << 20)
    skeleton, arena = rzc.pack(model)
    path = f"/dev/shm/rzc_test_fastload_{os.getpid()}"
    arena.tofile(path)
    yield skeleton, path, arena.nbytes, model
    os.unlink(path)


@pytest.mark.parametrize("fast", [False, True])
def test_fast_load_populates_page_tables(shm_arena, fast):
    skeleton, path, nbytes, model = shm_arena
    mm = _fresh_mapping(path)
    before = rss()
    clone = rzc.unpack(skeleton, memoryview(mm), fast_load=fast)
    grown = rss() - before
    if fast:
        assert grown > 0.9 * nbytes, f"fast load mapped only {grown / nbytes:.0%} of the arena"
    else:
        assert grown < 0.1 * nbytes, f"plain load touched {grown / nbytes:.0%} of the arena"
    x = torch.randn(1, 1024)
    with torch.inference_mode():
        torch.testing.assert_close(clone(x), model(x), rtol=1e-5, atol=1e-5)


def test_actor_load_leaves_no_young_objects_to_collect(ray_session):
    """ActorWrapper.load() makes thousands of objects (views, modules, their dicts) with the
    collector paused; they are moved to the oldest generation as the pause ends, so neither the
    load nor the actor's next allocations start a collection that traverses them (measured on
    gpt2-medium: a generation-1 collection of 1.5 - 3.9 ms in every load before)."""
    from torch import nn

    w = rzc.ActorWrapper(nn.Sequential(*[nn.Linear(8, 8) for _ in range(150)]))

    @ray_session.remote(num_cpus=0)
    class Loader:
        def load(self, w):
            import gc

            gc.collect()
            started = []
            gc.callbacks.append(lambda phase, info: phase == "start"
                                and started.append(info["generation"]))
            self.p = w.load()
            young = len(gc.get_objects(0)) + len(gc.get_objects(1))
            junk = [[] for _ in range(2000)]  # what the actor's next method might allocate
            del junk
            gc.callbacks.clear()
            n_modules = sum(1 for _ in self.p.modules())
            return started, young, n_modules

    started, young, n_modules = ray_session.get(Loader.remote().load.remote(w))
    assert n_modules > 100
    assert young < n_modules, young  # the pipeline's objects are not young
    # The load's own collection of the young generations comes first, before it makes any
    # object (ray_zerocopy._worker._built_old: garbage there is not moved past the collector);
    # after it, no collection beyond the youngest.
    assert started[:1] in ([], [0], [1]) and all(g == 0 for g in started[1:]), started
