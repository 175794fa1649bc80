"""dtype conversion in the C core (csrc/convert.c), without Ray: convert() against torch's
Tensor.to() bit for bit (a NaN only has to stay a NaN), and LazyConvert regions (converted on
first read, chunk by chunk, within a window) read from several threads."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

from ray_zerocopy import _zc
from ray_zerocopy.dtypes import code_of

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _values() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    scale = 10.0 ** torch.randint(-12, 12, (20000,), generator=g).double()
    special = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65520.0, 65519.99,
               2.0**-24, 2.0**-25, 3e-8, 3.4e38, 1e39, -1e39, 1e-40, 1e-45, 1.00390625, 1.01171875]
    return torch.cat([torch.randn(20000, generator=g, dtype=torch.float64) * scale,
                      torch.tensor(special, dtype=torch.float64)])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, except that a NaN only has to be a NaN."""
    nan = torch.isnan(b)
    if not torch.equal(torch.isnan(a), nan):
        return False
    ai, bi = a.view(INT_OF_SIZE[a.element_size()]), b.view(INT_OF_SIZE[b.element_size()])
    return bool(((ai == bi) | nan).all())


@pytest.mark.parametrize("src_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("dst_dtype", FLOATS, ids=str)
def test_convert_matches_tensor_to(src_dtype, dst_dtype):
    src = _values().to(src_dtype)
    ref = src.to(dst_dtype)
    out = torch.empty_like(ref)
    _zc.convert(out.view(torch.uint8).numpy(), code_of(dst_dtype), src.view(torch.uint8).numpy(),
                code_of(src_dtype))
    assert _same_bits(out, ref)


def test_convert_refuses_what_it_does_not_convert():
    a = torch.zeros(4, dtype=torch.float32)
    b = torch.zeros(4, dtype=torch.float8_e4m3fn)
    assert not _zc.convert_supported(code_of(torch.float32), code_of(torch.float8_e4m3fn))
    assert not _zc.convert_supported(code_of(torch.int32), code_of(torch.float32))
    with pytest.raises(ValueError):
        _zc.convert(a.view(torch.uint8).numpy(), code_of(torch.float32),
                    b.view(torch.uint8).numpy(), code_of(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="exactly the elements"):
        _zc.convert(a.view(torch.uint8).numpy(), code_of(torch.float32),
                    torch.zeros(3, dtype=torch.bfloat16).view(torch.uint8).numpy(),
                    code_of(torch.bfloat16))


def _region(sources, dst_dtype, chunk=4096, max_chunks=3):
    """A LazyConvert over sources (tensors), each at the next multiple of 64; and the offsets."""
    esz = dst_dtype.itemsize
    segs, offsets, off = [], [], 0
    for s in sources:
        segs.append((s.data_ptr(), code_of(s.dtype), s.numel(), off))
        offsets.append(off)
        off += -(-s.numel() * esz // 64) * 64
    region = _zc.LazyConvert(segs, code_of(dst_dtype), off, chunk, max_chunks, list(sources))
    return region, offsets


def _views(region, sources, offsets, dst_dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only buffer
        return [torch.frombuffer(region, dtype=dst_dtype, count=s.numel(), offset=o).view(s.shape)
                for s, o in zip(sources, offsets)]


def test_lazy_region_gives_the_converted_bytes_within_its_window():
    g = torch.Generator().manual_seed(1)
    sources = [torch.randn(300, 41, generator=g).to(torch.bfloat16),
               torch.randn(7, generator=g).to(torch.float16),
               torch.randn(5000, generator=g, dtype=torch.float64),
               torch.randn(3, 3, generator=g)]
    before = _zc.lazy_totals()
    region, offsets = _region(sources, torch.float32)
    assert memoryview(region).readonly
    assert _zc.lazy_totals()["regions_alive"] == before["regions_alive"] + 1
    assert region.stats()["fills"] == 0  # nothing is converted before it is read
    views = _views(region, sources, offsets, torch.float32)
    for v, s in zip(views, sources):
        assert _same_bits(v.clone(), s.to(torch.float32))
    st = region.stats()
    assert st["n_chunks"] > st["max_chunks"] == 3
    assert st["fills"] >= st["n_chunks"] and st["evictions"] > 0
    assert st["peak_resident"] <= 3

    # Several threads at once, each reading every view many times (chunks evicted and made
    # again under them).
    errors = []

    def read(k):
        for i in range(30):
            for v, s in zip(views[k % 4:] + views[:k % 4], sources[k % 4:] + sources[:k % 4]):
                if not _same_bits(v.clone(), s.to(torch.float32)):
                    errors.append((k, i))

    threads = [threading.Thread(target=read, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert region.stats()["peak_resident"] <= 3
    del views, region, v
    assert _zc.lazy_totals()["regions_alive"] == before["regions_alive"]


def test_lazy_region_keeps_its_sources_alive():
    src = torch.randn(10000).to(torch.bfloat16)
    expect = src.to(torch.float32)
    region, offsets = _region([src], torch.float32)
    del src  # the region holds it
    (view,) = _views(region, [expect], offsets, torch.float32)
    assert torch.equal(view, expect)


def test_lazy_region_refuses_bad_segments():
    src = torch.randn(100)
    code = code_of(torch.float32)
    ok = [(src.data_ptr(), code, 100, 0)]
    _zc.LazyConvert(ok, code_of(torch.bfloat16), 256, 4096, 2, [src])
    bad = {
        "past the end": ([(src.data_ptr(), code, 100, 64)], 256),
        "overlapping": ([(src.data_ptr(), code, 100, 0), (src.data_ptr(), code, 10, 128)], 512),
        "odd offset": ([(src.data_ptr(), code, 100, 1)], 512),
        "unsupported source": ([(src.data_ptr(), code_of(torch.int32), 100, 0)], 512),
        "null source": ([(0, code, 100, 0)], 512),
    }
    for what, (segs, size) in bad.items():
        with pytest.raises(ValueError):
            _zc.LazyConvert(segs, code_of(torch.bfloat16), size, 4096, 2, [src])
            pytest.fail(what)
    with pytest.raises(ValueError):
        _zc.LazyConvert(ok, code_of(torch.int8), 256, 4096, 2, [src])
    with pytest.raises(ValueError):
        _zc.LazyConvert(ok, code_of(torch.bfloat16), 256, 4097, 2, [src])  # not whole pages
    with pytest.raises(ValueError):
        _zc.LazyConvert(ok, code_of(torch.bfloat16), 0, 4096, 2, [src])
    with pytest.raises(TypeError):
        _zc.LazyConvert([("x",)], code_of(torch.bfloat16), 256, 4096, 2, [src])


def test_lazy_region_puts_the_handler_back_on_top(tmp_path):
    """faulthandler.enable() after a region was made replaces the core's fault handler; the next
    region puts it back on top, so its reads are served without faulthandler seeing them (which
    would print a 'Fatal Python error' and disable itself). In a fresh process."""
    import subprocess
    import sys

    code = """
import faulthandler, sys, warnings
import torch
from ray_zerocopy import _zc
from ray_zerocopy.dtypes import code_of

def region(n):
    src = torch.arange(n, dtype=torch.float32).to(torch.bfloat16)
    r = _zc.LazyConvert([(src.data_ptr(), code_of(torch.bfloat16), n, 0)], code_of(torch.float32),
                        4 * n, 4096, 2, [src])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return r, torch.frombuffer(r, dtype=torch.float32, count=n), src.float()

faulthandler.disable()
r1, v1, e1 = region(10000)
assert torch.equal(v1, e1)
faulthandler.enable()  # on top of the core's handler now
r2, v2, e2 = region(20000)  # puts it back on top
assert torch.equal(v2, e2) and torch.equal(v1, e1)
assert faulthandler.is_enabled()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert "Fatal Python error" not in out.stderr, out.stderr[-2000:]
