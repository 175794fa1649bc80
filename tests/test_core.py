"""The extension ray_zerocopy._zc: every function, the Mapping type, and hostile arena bytes."""

from __future__ import annotations

import mmap
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_zerocopy import _zc

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = (ROOT / "tests" / "data" / "golden_small.arena").read_bytes()
F32 = _zc.DTYPE_CODES["float32"]
U8 = _zc.DTYPE_CODES["uint8"]


def build(storages: list[bytes], tensors: list[tuple], nthreads: int = 0) -> bytearray:
    sizes = [len(s) for s in storages]
    data_offset, total, offsets = _zc.plan(sizes, tensors)
    arena = bytearray(total)
    _zc.write_manifest(arena, sizes, tensors)
    arrays = [np.frombuffer(s, dtype=np.uint8) if s else np.empty(0, np.uint8) for s in storages]
    _zc.gather(arena, [(data_offset + o, a.ctypes.data if a.nbytes else 0, a.nbytes)
                       for o, a in zip(offsets, arrays)], nthreads)
    _zc.finalize(arena, nthreads)
    return arena


def rehash(a: bytearray) -> None:
    """Recomputes the manifest and header CRCs after an edit."""
    msize = struct.unpack_from("<Q", a, 56)[0]
    if msize <= len(a) - 128:
        struct.pack_into("<I", a, 88, _zc.crc32c(bytes(a[128:128 + msize])))
    struct.pack_into("<I", a, 96, _zc.crc32c(bytes(a[:96])))


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, cwd=str(ROOT))


# ---- constants and dtypes ----------------------------------------------------------------------

def test_constants():
    assert _zc.FORMAT_VERSION == 1
    assert (_zc.HEADER_SIZE, _zc.STORAGE_ALIGN, _zc.DATA_ALIGN, _zc.MAX_NDIM) == (128, 64, 4096, 32)
    assert (_zc.KIND_PARAMETER, _zc.KIND_BUFFER, _zc.KIND_OTHER) == (0, 1, 2)
    assert (_zc.TFLAG_PERSISTENT, _zc.TFLAG_REQUIRES_GRAD) == (1, 2)
    assert len(_zc.DTYPE_CODES) == 22
    assert _zc.DTYPE_CODES["bool"] == 1 and _zc.DTYPE_CODES["float4_e2m1fn_x2"] == 22
    assert sorted(_zc.DTYPE_CODES.values()) == list(range(1, 23))


def test_dtypes():
    for name, code in _zc.DTYPE_CODES.items():
        assert _zc.dtype_name(code) == name
        size = _zc.dtype_size(code)
        dt = getattr(torch, name, None)
        if isinstance(dt, torch.dtype):
            assert dt.itemsize == size, name
    for bad in (0, 23, 255, 1000, -1):
        with pytest.raises(ValueError):
            _zc.dtype_size(bad)
        with pytest.raises(ValueError):
            _zc.dtype_name(bad)
    with pytest.raises(TypeError):
        _zc.dtype_size("float32")


def test_exception_hierarchy():
    assert issubclass(_zc.ArenaError, _zc.ZeroCopyError)
    assert issubclass(_zc.ArenaError, ValueError)
    assert issubclass(_zc.ZeroCopyError, Exception)
    e = _zc.ArenaError("made by hand")
    assert e.code is None and e.code_name is None


# ---- CRC32C ------------------------------------------------------------------------------------

VECTORS = [
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"", 0),
]


@pytest.mark.parametrize("data,expected", VECTORS)
def test_crc_vectors(data, expected):
    assert _zc.crc32c(data) == expected
    assert _zc.crc32c_portable(data) == expected
    assert _zc.crc32c_mt(data) == expected
    assert _zc.crc32c_mt(data, nthreads=3) == expected


def test_crc_incremental_and_types():
    assert _zc.crc32c(b"56789", _zc.crc32c(b"1234")) == 0xE3069283
    assert _zc.crc32c_portable(b"56789", crc=_zc.crc32c_portable(b"1234")) == 0xE3069283
    assert _zc.crc32c(memoryview(b"123456789")) == 0xE3069283
    assert _zc.crc32c(np.frombuffer(b"123456789", np.uint8)) == 0xE3069283
    assert _zc.crc32c_impl() in ("sse4.2", "portable")
    with pytest.raises(ValueError):
        _zc.crc32c(b"x", 1 << 32)
    with pytest.raises(TypeError):
        _zc.crc32c("text")


@pytest.mark.parametrize("size", [1, 7, 4097, (1 << 20) + 3, (5 << 20) + 13])
def test_crc_implementations_agree(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    ref = _zc.crc32c_portable(data)
    assert _zc.crc32c(data) == ref
    for n in (0, 1, 2, 3, 16):
        assert _zc.crc32c_mt(data, n) == ref


# ---- plan / write_manifest / gather / finalize ------------------------------------------------

def test_plan_layout():
    data_offset, total, offsets = _zc.plan([1, 64, 65, 0, 3], [])
    assert offsets == [0, 64, 128, 256, 256]
    assert data_offset == 4096 and total == 4096 + 320
    assert _zc.plan([], []) == (4096, 4096, [])
    # Sequences other than lists, shapes as lists.
    t = ("w", 0, F32, [2, 2], [2, 1], 0, 0, 0)
    assert _zc.plan((16,), (t,))[2] == [0]


def test_plan_errors_name_the_tensor():
    with pytest.raises(_zc.ArenaError) as ei:
        _zc.plan([12, 4096], [("decoder.weight", 1, F32, (1040,), (1,), 0, 0, 0)])
    assert str(ei.value) == "tensor 0 ('decoder.weight'): extent 4160 bytes exceeds storage 1 length 4096"
    assert ei.value.code == _zc.ZC_ETENSOR and ei.value.code_name == "ZC_ETENSOR"
    cases = [
        (("w", 5, F32, (1,), (1,), 0, 0, 0), "ZC_ETENSOR", "storage_index 5"),
        (("w", 0, 0, (1,), (1,), 0, 0, 0), "ZC_ETENSOR", "dtype code 0"),
        (("w", 0, F32, (-1,), (1,), 0, 0, 0), "ZC_ETENSOR", "size[0] is negative"),
        (("w", 0, F32, (2,), (-1,), 0, 0, 0), "ZC_ETENSOR", "stride[0] is negative"),
        (("w", 0, F32, (1,), (1,), 0, 3, 0), "ZC_ETENSOR", "kind 3"),
        (("w", 0, F32, (1,), (1,), 0, 0, 8), "ZC_ETENSOR", "flags 0x08"),
        (("w", 0, U8, (1,) * 33, (1,) * 33, 0, 0, 0), "ZC_ETOOBIG", "ndim 33"),
        (("w", 0, U8, (2 ** 62, 4), (4, 1), 0, 0, 0), "ZC_EOVERFLOW", "overflows"),
        (("n" * 4097, 0, U8, (1,), (1,), 0, 0, 0), "ZC_ETOOBIG", "name_len 4097"),
    ]
    for t, code_name, part in cases:
        with pytest.raises(_zc.ArenaError) as ei:
            _zc.plan([16], [t])
        assert ei.value.code_name == code_name, t
        assert part in str(ei.value)
        assert getattr(_zc, code_name) == ei.value.code


def test_plan_argument_errors():
    with pytest.raises(TypeError):
        _zc.plan([16], [("w", 0, F32)])
    with pytest.raises(TypeError):
        _zc.plan([16], [(1, 0, F32, (1,), (1,), 0, 0, 0)])
    with pytest.raises(ValueError):
        _zc.plan([-1], [])
    with pytest.raises(ValueError):
        _zc.plan([1 << 64], [])
    with pytest.raises(ValueError):
        _zc.plan([16], [("w", 0, F32, (1, 1), (1,), 0, 0, 0)])
    with pytest.raises(ValueError):
        _zc.plan([16], [("w", 0, 300, (1,), (1,), 0, 0, 0)])
    with pytest.raises(TypeError):
        _zc.plan(5, [])


def test_write_manifest_and_finalize_errors():
    t = [("w", 0, U8, (4,), (1,), 0, 0, 0)]
    _, total, _ = _zc.plan([4], t)
    with pytest.raises(ValueError, match="arena needs"):
        _zc.write_manifest(bytearray(total - 1), [4], t)
    with pytest.raises(TypeError):
        _zc.write_manifest(bytes(total), [4], t)  # Read-only destination.
    with pytest.raises(_zc.ArenaError) as ei:
        _zc.finalize(bytearray(total))
    assert ei.value.code == _zc.ZC_EMAGIC
    with pytest.raises(_zc.ArenaError) as ei:
        _zc.finalize(bytearray(10))
    assert ei.value.code == _zc.ZC_ETRUNCATED


def test_gather_bounds_and_threads():
    dst = bytearray(100)
    src = np.arange(10, dtype=np.uint8)
    _zc.gather(dst, [(90, src.ctypes.data, 10), (0, 0, 0), (100, 0, 0)])
    assert dst[90:] == bytes(range(10))
    with pytest.raises(ValueError):
        _zc.gather(dst, [(91, src.ctypes.data, 10)])
    with pytest.raises(ValueError):
        _zc.gather(dst, [(0, 0, 5)])
    with pytest.raises(ValueError):
        _zc.gather(dst, [(-1, src.ctypes.data, 1)])
    with pytest.raises(TypeError):
        _zc.gather(dst, [(0, src.ctypes.data)])
    with pytest.raises(TypeError):
        _zc.gather(b"readonly", [])
    # Large copies split over threads, small ones batched; torch storages by address.
    big = torch.arange(3 << 20, dtype=torch.int32)
    small = [torch.full((k,), k, dtype=torch.uint8) for k in range(1, 200)]
    out = np.zeros(big.numel() * 4 + sum(t.numel() for t in small), dtype=np.uint8)
    copies, pos = [(0, big.data_ptr(), big.numel() * 4)], big.numel() * 4
    for t in small:
        copies.append((pos, t.data_ptr(), t.numel()))
        pos += t.numel()
    for n in (0, 1, 3):
        out[:] = 0
        _zc.gather(out, copies, n)
        assert np.array_equal(out[:big.numel() * 4].view(np.int32), big.numpy())
        assert out[big.numel() * 4:].tobytes() == b"".join(t.numpy().tobytes() for t in small)


def test_build_roundtrip_many_tensors():
    storages = [bytes([i]) * (i * 7) for i in range(30)]
    tensors = [(f"m.{i}.weight", i, U8, (i * 7,), (1,), 0, i % 3, i % 4) for i in range(30)]
    arena = build(storages, tensors, 2)
    info = _zc.parse(arena)
    assert len(info["tensors"]) == 30
    for (name, sidx, dt, shape, stride, soff, kind, flags, boff), t, s in zip(info["tensors"], tensors, storages):
        assert (name, sidx, dt, shape, stride, soff, kind, flags) == t
        assert bytes(arena[boff:boff + len(s)]) == s
        assert boff % 64 == 0
    _zc.verify_data(arena, 3)


# ---- parse / verify_data -----------------------------------------------------------------------

def test_parse_readonly_sources():
    info = _zc.parse(GOLDEN)
    assert _zc.parse(memoryview(GOLDEN).toreadonly()) == info
    assert _zc.parse(np.frombuffer(GOLDEN, np.uint8)) == info
    assert _zc.parse(bytearray(GOLDEN) + b"trailing bytes") == info
    assert set(info) == {"version", "flags", "manifest_size", "data_offset", "data_size", "total_size",
                         "manifest_crc", "data_crc", "header_crc", "storages", "tensors"}


def test_parse_every_flipped_byte_of_header_and_manifest():
    info = _zc.parse(GOLDEN)
    end = 128 + info["manifest_size"]
    for i in range(info["data_offset"]):
        bad = bytearray(GOLDEN)
        bad[i] ^= 0xFF
        with pytest.raises(_zc.ArenaError) as ei:
            _zc.parse(bad)
        assert ei.value.code < 0 and ei.value.code_name.startswith("ZC_E")
    # Bit flips with fresh CRCs either fail cleanly or leave a consistent arena.
    for i in range(end):
        for bit in (0, 7):
            bad = bytearray(GOLDEN)
            bad[i] ^= 1 << bit
            rehash(bad)
            try:
                parsed = _zc.parse(bad)
            except _zc.ArenaError:
                continue
            for entry in parsed["tensors"]:
                assert entry[8] <= parsed["total_size"]


def test_parse_truncations():
    for n in list(range(0, 200)) + list(range(4096, len(GOLDEN))):
        with pytest.raises(_zc.ArenaError) as ei:
            _zc.parse(GOLDEN[:n])
        assert ei.value.code == _zc.ZC_ETRUNCATED
    with pytest.raises(_zc.ArenaError, match=r"buffer is 4223 bytes but the arena needs 4224 \(total_size\)"):
        _zc.parse(GOLDEN[:-1])


def test_parse_messages():
    bad = bytearray(GOLDEN)
    bad[0:8] = b"NOTARENA"
    with pytest.raises(_zc.ArenaError, match="^header: bad magic$") as ei:
        _zc.parse(bad)
    assert ei.value.code == _zc.ZC_EMAGIC and ei.value.code_name == "ZC_EMAGIC"
    bad = bytearray(GOLDEN)
    struct.pack_into("<I", bad, 8, 7)
    rehash(bad)
    with pytest.raises(_zc.ArenaError, match="version 7") as ei:
        _zc.parse(bad)
    assert ei.value.code == _zc.ZC_EVERSION
    bad = bytearray(GOLDEN)
    struct.pack_into("<Q", bad, 128 + 16, 128)  # storage 1 offset
    rehash(bad)
    with pytest.raises(_zc.ArenaError) as ei:
        _zc.parse(bad)
    assert str(ei.value) == "storage 1: offset 128 is not where the layout puts it (expected 64)"
    assert ei.value.code == _zc.ZC_ESTORAGE


def test_parse_invalid_utf8_name():
    arena = build([b"abcd"], [("xy", 0, U8, (4,), (1,), 0, 0, 0)])
    info = _zc.parse(arena)
    name_at = 128 + info["manifest_size"] - 2
    assert arena[name_at:name_at + 2] == b"xy"
    arena[name_at] = 0xC3  # A lead byte followed by an ASCII byte.
    rehash(arena)
    with pytest.raises(_zc.ArenaError, match="not valid UTF-8") as ei:
        _zc.parse(arena)
    assert ei.value.code == _zc.ZC_EMANIFEST


def test_parse_unicode_names():
    names = ["caf\u00e9.weight", "\u6a21\u578b.bias", "emoji\U0001F600"]
    arena = build([bytes(8)], [(n, 0, U8, (8,), (1,), 0, 0, 0) for n in names])
    assert [t[0] for t in _zc.parse(arena)["tensors"]] == names


def test_verify_data():
    _zc.verify_data(GOLDEN)
    _zc.verify_data(GOLDEN, nthreads=4)
    bad = bytearray(GOLDEN)
    bad[4100] ^= 1
    _zc.parse(bad)  # Loading does not read the data region.
    with pytest.raises(_zc.ArenaError, match="data_crc") as ei:
        _zc.verify_data(bad)
    assert ei.value.code == _zc.ZC_ECHECKSUM and ei.value.code_name == "ZC_ECHECKSUM"
    with pytest.raises(_zc.ArenaError) as ei:
        _zc.verify_data(GOLDEN[:100])
    assert ei.value.code == _zc.ZC_ETRUNCATED


# ---- copies ------------------------------------------------------------------------------------

def test_copy():
    src = np.random.default_rng(0).integers(0, 256, (3 << 20) + 5, dtype=np.uint8)
    dst = np.zeros_like(src)
    for n in (0, 1, 4):
        dst[:] = 0
        _zc.copy(dst, 0, src, 0, src.nbytes, n)
        assert np.array_equal(dst, src)
    _zc.copy(dst, 10, memoryview(b"hello").toreadonly(), 1, 4)
    assert dst[10:14].tobytes() == b"ello"
    _zc.copy(dst, 0, src, 0, 0)
    with pytest.raises(ValueError):
        _zc.copy(dst, dst.nbytes - 1, src, 0, 2)
    with pytest.raises(ValueError):
        _zc.copy(dst, 0, src, src.nbytes, 1)
    with pytest.raises(ValueError):
        _zc.copy(dst, -1, src, 0, 1)
    with pytest.raises(TypeError):
        _zc.copy(b"readonly", 0, src, 0, 1)
    # Overlapping regions of one buffer behave like memmove.
    buf = bytearray(b"0123456789")
    _zc.copy(buf, 2, buf, 0, 6)
    assert buf == bytearray(b"0101234589")


def test_copy_to_ptr():
    src = bytes(range(256)) * 10
    dst = np.zeros(100, np.uint8)
    _zc.copy_to_ptr(dst.ctypes.data, src, 5, 100)
    assert dst.tobytes() == src[5:105]
    t = torch.zeros(2 << 20, dtype=torch.uint8)
    big = np.random.default_rng(1).integers(0, 256, t.numel(), dtype=np.uint8)
    _zc.copy_to_ptr(t.data_ptr(), big, 0, t.numel(), 3)
    assert np.array_equal(t.numpy(), big)
    _zc.copy_to_ptr(0, src, 0, 0)
    with pytest.raises(ValueError):
        _zc.copy_to_ptr(dst.ctypes.data, src, len(src) - 10, 11)
    with pytest.raises(ValueError):
        _zc.copy_to_ptr(0, src, 0, 1)


def test_gil_released_during_checksum():
    data = bytes(64 << 20)
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(1)

    th = threading.Thread(target=tick)
    th.start()
    try:
        before = len(ticks)
        for _ in range(3):
            _zc.crc32c_mt(data, 1)
        during = len(ticks) - before
    finally:
        stop.set()
        th.join()
    assert during > 0


def test_page_size():
    p = _zc.page_size()
    assert p >= 4096 and p & (p - 1) == 0
    assert p == mmap.PAGESIZE


# ---- Mapping -----------------------------------------------------------------------------------

def test_mapping_exports_writable_view_of_readonly_source():
    src = bytes(GOLDEN)
    m = _zc.Mapping(src)
    assert m.size == len(src) == len(m)
    assert m.address == np.frombuffer(src, np.uint8).ctypes.data
    assert not m.protected and not m.released and m.exports == 0
    info = _zc.parse(m)
    off, length = info["storages"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns about non-writable buffers; the export is writable.
        t = torch.frombuffer(m, dtype=torch.uint8, count=length, offset=off)
    assert t.tolist() == list(range(12))
    assert t.data_ptr() == m.address + off
    # torch.frombuffer keeps a reference to the Mapping, not a buffer export.
    refs = sys.getrefcount(m)
    t2 = torch.frombuffer(m, dtype=torch.uint8)
    assert sys.getrefcount(m) == refs + 1
    del t, t2
    view = memoryview(m)
    assert not view.readonly and m.exports == 1
    arr = np.frombuffer(m, np.uint8)
    assert m.exports == 2
    with pytest.raises(BufferError, match="still open"):
        m.release()
    del view, arr
    assert m.exports == 0
    m.release()
    assert m.released and m.size == 0 and m.address == 0
    m.release()  # Idempotent.
    with pytest.raises(BufferError):
        memoryview(m)
    with pytest.raises(ValueError):
        m.populate()
    assert "released" in repr(m)


def test_mapping_context_manager_and_populate():
    buf = mmap.mmap(-1, 8 << 20)
    with _zc.Mapping(buf) as m:
        m.populate()
        m.populate(4096, 4096, 2)
        m.populate(1, 3 << 20, 0)
        with pytest.raises(ValueError):
            m.populate(0, (8 << 20) + 1)
        with pytest.raises(ValueError):
            m.populate(-1)
        assert "Mapping address=" in repr(m)
    assert m.released
    buf.close()  # No export left.


def test_mapping_protect_in_process():
    page = _zc.page_size()
    buf = mmap.mmap(-1, 8 * page)
    m = _zc.Mapping(buf)
    ranges = [(2 * page, 2 * page, "enc.weight"), (4 * page + 8, 16, "enc.bias")]
    assert m.protect(100, 8 * page - 100, ranges) == 7 * page
    assert m.protected
    assert _zc.describe_address(m.address + 2 * page + 5) == "enc.weight"
    assert _zc.describe_address(m.address + 4 * page + 10) == "enc.bias"
    assert _zc.describe_address(m.address + 6 * page) == ""
    assert _zc.describe_address(m.address + 10) is None
    # Reads still work.
    assert bytes(memoryview(m)[2 * page:2 * page + 4]) == bytes(4)
    with pytest.raises(ValueError, match="already protected"):
        m.protect(0, page, [])
    m.unprotect()
    assert not m.protected
    assert _zc.describe_address(m.address + 2 * page + 5) is None
    buf[2 * page] = 7  # Writable again.
    assert m.protect(1, page, []) == 0  # No whole page inside: nothing protected.
    assert not m.protected
    with pytest.raises(ValueError):
        m.protect(0, 9 * page, [])
    with pytest.raises(ValueError):
        m.protect(0, page, [(0, 9 * page, "x")])
    with pytest.raises(TypeError):
        m.protect(0, page, [(0, 1)])
    _zc.install_fault_handler()
    m.release()
    buf.close()


PROTECT_CHILD = """
import mmap, sys
import torch
from ray_zerocopy import _zc
page = _zc.page_size()
buf = mmap.mmap(-1, 8 * page)
m = _zc.Mapping(buf)
t = torch.frombuffer(m, dtype=torch.float32)
n = m.protect(0, 8 * page, [(2 * page, 2 * page, "decoder.layers.0.weight")])
assert n == 8 * page, n
sys.stderr.write("protected\\n"); sys.stderr.flush()
{action}
sys.stderr.write("survived\\n")
"""


def test_protect_write_kills_with_named_tensor():
    r = run_python(PROTECT_CHILD.format(action="t[(2 * page + 64) // 4] = 1.0"))
    assert r.returncode == -signal.SIGSEGV, r.stderr
    assert "protected" in r.stderr and "survived" not in r.stderr
    assert ("ray_zerocopy: write to shared read-only weight 'decoder.layers.0.weight' at 0x"
            in r.stderr), r.stderr
    assert "load with writable=True to get a private copy" in r.stderr


def test_protect_write_outside_tensors_names_the_arena():
    r = run_python(PROTECT_CHILD.format(action="t[(6 * page) // 4] = 1.0"))
    assert r.returncode == -signal.SIGSEGV, r.stderr
    assert "inside a protected arena" in r.stderr


def test_unprotect_restores_writability():
    r = run_python(PROTECT_CHILD.format(action="m.unprotect(); t[(2 * page) // 4] = 1.0; t.add_(1)"))
    assert r.returncode == 0, r.stderr
    assert "survived" in r.stderr


def test_dealloc_unprotects_before_release():
    r = run_python(PROTECT_CHILD.format(
        action="del t; del m; import gc; gc.collect(); buf[2 * page] = 1; buf.close()"))
    assert r.returncode == 0, r.stderr
    assert "survived" in r.stderr


def test_release_unprotects():
    r = run_python(PROTECT_CHILD.format(action="del t; m.release(); buf[3 * page] = 1; buf.close()"))
    assert r.returncode == 0, r.stderr
    assert "survived" in r.stderr
