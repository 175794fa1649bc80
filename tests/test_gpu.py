"""GPU placement and fast load (marked gpu; skipped without CUDA). No Ray needed."""

from __future__ import annotations

import pytest
import torch

import ray_zerocopy as rzc
from conftest import ray_like_roundtrip
from models import GPT2ish, ResNetish

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("fast", [False, True])
def test_unpack_to_cuda_one_allocation_ties_dtype(fast):
    torch.manual_seed(0)
    m = GPT2ish(dtype=torch.bfloat16)
    skeleton, arena = ray_like_roundtrip(tuple(rzc.pack(m)))
    g = rzc.unpack(skeleton, arena, device="cuda:0", fast_load=fast)
    ts = list(g.parameters()) + list(g.buffers())
    assert all(t.device.type == "cuda" for t in ts)
    assert len({t.untyped_storage().data_ptr() for t in ts}) == 1  # one device allocation
    assert g.lm_head.weight is g.wte.weight
    assert g.wte.weight.dtype == torch.bfloat16
    x = torch.randint(0, 512, (2, 8))
    with torch.inference_mode():
        assert torch.allclose(g(x.cuda()).float().cpu(), m.cuda()(x.cuda()).float().cpu())


def test_fast_plain_register_bytes_equal():
    from ray_zerocopy import _zc
    from ray_zerocopy.device import upload

    m = ResNetish()
    _, arena = rzc.pack(m)
    info = _zc.parse(arena)
    mp = _zc.Mapping(arena)
    outs = [upload(mp, info["data_offset"], info["data_size"], torch.device("cuda", 0), method=k)
            for k in ("plain", "staged", "register")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    # staging with chunks smaller than the data, to exercise buffer reuse
    from ray_zerocopy.device import upload_staged

    small = upload_staged(mp, info["data_offset"], info["data_size"], torch.device("cuda", 0),
                          chunk=4096 * 3, nbuf=2)
    assert torch.equal(outs[0], small)


def test_missing_cuda_device_is_clear():
    n = torch.cuda.device_count()
    _, arena = rzc.pack(ResNetish())
    with pytest.raises(rzc.DeviceError, match="sees"):
        rzc.LoadedArena(arena, device=f"cuda:{n + 3}")


def test_cuda_ipc_shared_views_single_process():
    from ray_zerocopy import cuda_ipc

    m = ResNetish()
    _, arena = rzc.pack(m)
    holder = cuda_ipc.DeviceCopy(arena, "cuda:0")
    assert holder.buffer.numel() == holder.info["data_size"]
