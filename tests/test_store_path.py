"""The one-copy wrap: the arena goes into Ray's object store as out-of-band buffers that Ray
writes back to back (pack.store_parts), and comes back as one zero-copy span (unpack._assemble).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import ray_zerocopy as rzc
from ray_zerocopy import _zc
from ray_zerocopy.pack import DIRECT_MIN, StoreArena, store_parts
from ray_zerocopy.unpack import _assemble

from models import mlp

# Header bytes that differ between pack() (one buffer, checksummed) and the store path:
# flags [12, 16), data_crc [92, 96) and header_crc [96, 100).
_HEADER_DIFF = ((12, 16), (92, 100))


def _flatten(arena: StoreArena) -> np.ndarray:
    flat = np.zeros(arena.total, dtype=np.uint8)
    for p, off in zip(arena.parts, arena.offsets):
        b = np.frombuffer(memoryview(p).cast("B"), dtype=np.uint8)
        flat[off:off + len(b)] = b
    return flat


def _contiguous_roundtrip(obj):
    """Pickles with out-of-band buffers and hands them back as views into one buffer laid out as
    Ray lays them out (each at the next multiple of 64 from the first; ours are all multiples
    of 64 long), read-only."""
    buffers = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    offs, pos = [], 0
    for r in raws:
        pos = -(-pos // 64) * 64 if len(r) >= 2048 else -(-pos // 8) * 8
        offs.append(pos)
        pos += len(r)
    flat = np.zeros(pos + 64, dtype=np.uint8)
    for r, o in zip(raws, offs):
        flat[o:o + len(r)] = np.frombuffer(r, dtype=np.uint8)
    views = [memoryview(flat)[o:o + len(r)].toreadonly() for r, o in zip(raws, offs)]
    return pickle.loads(data, buffers=views)


class Mixed(nn.Module):
    """Storages of awkward sizes and views: tiny, exactly 2,048 bytes, 2,047 and 2,049 bytes,
    a transposed (non-contiguous) and an offset view of one storage, bf16 and fp8, an empty
    tensor and a tied weight."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tiny = nn.Parameter(torch.randn(3, generator=g))
        self.exact = nn.Parameter(torch.randn(512, generator=g))          # 2,048 bytes
        self.under = nn.Parameter(torch.randint(0, 255, (2047,), generator=g, dtype=torch.uint8),
                                  requires_grad=False)
        self.over = nn.Parameter(torch.randint(0, 255, (2049,), generator=g, dtype=torch.uint8),
                                 requires_grad=False)
        base = torch.randn(64, 48, generator=g)
        self.register_buffer("transposed", base.t())
        self.register_buffer("offset_view", base[5:9, 3:40])
        self.bf16 = nn.Parameter(torch.randn(40, 70, generator=g).to(torch.bfloat16))
        self.fp8 = nn.Parameter(torch.randn(3000, generator=g).to(torch.float8_e4m3fn),
                                requires_grad=False)
        self.empty = nn.Parameter(torch.empty(0, 5))
        self.lin = nn.Linear(100, 100)
        self.head = nn.Linear(100, 100, bias=False)
        self.head.weight = self.lin.weight


PIPELINES = {
    "mixed": Mixed,
    "only_tiny": lambda: nn.Sequential(*[nn.Linear(2, 2) for _ in range(50)]),
    "mlp": lambda: mlp(width=256),
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_store_arena_is_the_packed_arena_byte_for_byte(name):
    p = PIPELINES[name]()
    packed = rzc.pack(p)
    skeleton, arena, _ = store_parts(p)
    assert skeleton == packed.skeleton
    flat = _flatten(arena)
    ref = packed.arena.copy()
    assert flat.nbytes == ref.nbytes
    for lo, hi in _HEADER_DIFF:
        flat[lo:hi] = ref[lo:hi] = 0
    assert np.array_equal(flat, ref)
    # Parts tile the arena, each starting and ending at a multiple of 64.
    ends = [o + memoryview(q).nbytes for q, o in zip(arena.parts, arena.offsets)]
    assert arena.offsets[0] == 0 and ends[-1] == arena.total
    assert all(a == b for a, b in zip(ends, arena.offsets[1:]))
    assert all(o % 64 == 0 and e % 64 == 0 for o, e in zip(arena.offsets, ends))
    info = _zc.parse(_flatten(arena))
    assert info["flags"] == _zc.FLAG_NO_DATA_CRC and info["data_crc"] == 0


def test_large_storages_are_handed_over_without_a_copy():
    m = mlp(width=256)
    _, arena, _ = store_parts(m)
    ptrs = {np.frombuffer(memoryview(q).cast("B"), np.uint8).ctypes.data for q in arena.parts}
    for lin in (m[0], m[2], m[4]):
        assert lin.weight.data_ptr() in ptrs  # 256 KiB weights go straight from the tensor
    assert arena.direct_bytes >= 3 * 256 * 256 * 4
    only_tiny = PIPELINES["only_tiny"]()
    assert store_parts(only_tiny)[1].direct_bytes == 0  # all staged: no body reaches DIRECT_MIN
    assert DIRECT_MIN == 2048


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_unpickled_as_one_zero_copy_span(name):
    p = PIPELINES[name]()
    skeleton, arena, _ = store_parts(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _contiguous_roundtrip(arena)
    assert isinstance(got, _zc.Span) and got.size == arena.total
    clone = rzc.unpack(skeleton, got)
    for (n1, a), (n2, b) in zip(p.state_dict(keep_vars=True).items(),
                                clone.state_dict(keep_vars=True).items()):
        assert n1 == n2 and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 and a.is_floating_point()
                           else a, b.view(torch.uint8) if b.dtype.itemsize == 1 and
                           b.is_floating_point() else b)
        if a.numel():
            assert got.address <= b.data_ptr() < got.address + got.size
    if name == "mixed":
        assert clone.head.weight is clone.lin.weight


def test_layout_that_differs_falls_back_to_a_private_copy_with_a_warning(monkeypatch):
    import importlib

    unpack_mod = importlib.import_module("ray_zerocopy.unpack")

    p = Mixed()
    skeleton, arena, _ = store_parts(p)
    monkeypatch.setattr(unpack_mod, "_layout_warned", type(unpack_mod._layout_warned)())
    buffers = []
    data = pickle.dumps(arena, protocol=5, buffer_callback=buffers.append)
    scattered = [memoryview(bytes(b.raw())) for b in buffers]  # each part somewhere else
    with pytest.warns(rzc.ZeroCopyWarning, match="private copy"):
        got = pickle.loads(data, buffers=scattered)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process
        pickle.loads(data, buffers=scattered)
    assert isinstance(got, np.ndarray) and got.nbytes == arena.total
    clone = rzc.unpack(skeleton, got)
    assert torch.equal(clone.lin.weight, p.lin.weight)
    assert torch.equal(clone.transposed, p.transposed)
    assert clone.head.weight is clone.lin.weight


def test_span_rejects_parts_that_do_not_tile():
    buf = np.zeros(256, np.uint8)
    m = memoryview(buf)
    assert isinstance(_zc.span([m[:64], m[64:]], [0, 64], 256), _zc.Span)
    assert "lies" in _zc.span([m[:64], m[128:]], [0, 64], 256)          # moved
    assert "expected offset" in _zc.span([m[:64], m[64:]], [0, 128], 256)  # hole
    assert "end at" in _zc.span([m[:64], m[64:128]], [0, 64], 256)     # short
    assert "expected offset" in _zc.span([m[:64], m[64:]], [0, 64], 100)  # past the end
    with pytest.raises(ValueError):
        _zc.span([], [], 0)
    with pytest.raises(ValueError):
        _zc.span([m], [0, 1], 256)
    assert "expected" in _zc.span([m[:0]], [0], 0)  # an empty part is never valid


def test_verify_arena_without_a_data_checksum():
    p = mlp()
    packed = rzc.pack(p)
    crc = _zc.parse(packed.arena)["data_crc"]
    _, arena, _ = store_parts(p)
    flat = _flatten(arena)
    with pytest.raises(rzc.ArenaError, match="no data checksum") as err:
        rzc.verify_arena(flat)
    assert err.value.code_name == "ZC_ENODATACRC"
    rzc.verify_arena(flat, expected_data_crc=crc)
    rzc.verify_arena(packed.arena, expected_data_crc=crc)
    flat[-100] ^= 1
    with pytest.raises(rzc.ArenaError, match="CRC32C"):
        rzc.verify_arena(flat, expected_data_crc=crc)
    # A data_crc under the NO_DATA_CRC flag is malformed, so is an unknown flag.
    bad = _flatten(arena)
    bad[92] = 1
    bad[96:100] = np.frombuffer(_zc.crc32c(bytes(bad[:96])).to_bytes(4, "little"), np.uint8)
    with pytest.raises(rzc.ArenaError, match="no data checksum but data_crc"):
        _zc.parse(bad)
    bad = _flatten(arena)
    bad[12] = 3
    bad[96:100] = np.frombuffer(_zc.crc32c(bytes(bad[:96])).to_bytes(4, "little"), np.uint8)
    with pytest.raises(rzc.ArenaError, match="unknown bits"):
        _zc.parse(bad)


# ---- through Ray ------------------------------------------------------------------------------

@pytest.mark.ray
def test_ray_lays_the_buffers_out_as_the_arena_needs(ray_session):
    """Pins the layout on the installed Ray: if a release places out-of-band buffers otherwise,
    this fails (and workers would warn and copy) instead of silently getting slower."""

    @ray_session.remote
    def fetch(box):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            arena = ray_session.get(box[0])[1]
        return type(arena).__name__, bytes(memoryview(arena))

    for name in sorted(PIPELINES):
        p = PIPELINES[name]()
        skeleton, arena, _ = store_parts(p)
        ref = ray_session.put((skeleton, arena))
        kind, data = ray_session.get(fetch.remote([ref]))
        assert kind == "Span", name
        assert data == _flatten(arena).tobytes(), name


@pytest.mark.ray
def test_wrapper_data_crc_and_verify_in_an_actor(ray_session):
    p = Mixed()
    w = rzc.ActorWrapper(p)
    packed_crc = _zc.parse(rzc.pack(p).arena)["data_crc"]
    assert w.data_crc == packed_crc  # the store holds the packed data region, byte for byte
    w.verify()

    @ray_session.remote(num_cpus=0)
    class Checker:
        def run(self, wrapper):
            wrapper.verify()
            return wrapper.data_crc

    assert ray_session.get(Checker.remote().run.remote(w)) == packed_crc

    fresh = rzc.ActorWrapper(mlp())  # pickled before any checksum was computed

    @ray_session.remote(num_cpus=0)
    def verify_remote(wrapper):
        try:
            wrapper.verify()
        except rzc.WrapperError as exc:
            return str(exc)
        return "verified"

    assert "carries no checksum" in ray_session.get(verify_remote.remote(fresh))


@pytest.mark.ray
def test_first_wrap_peak_memory_and_spill_restore(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "store_check.py")
    out = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # One copy: the store pages Ray writes; no private arena in the driver.
    assert r["peak"] <= 1.1 * r["weights"], r
    assert r["spilled_files"] >= 1, r
    assert r["restored_kind"] == "Span" and r["inside"] and r["equal"], r
