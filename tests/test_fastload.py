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
