"""The arena format, byte for byte: the golden file of docs/format.md, built three ways.

1. through the extension (plan, write_manifest, gather, finalize),
2. by a pure-Python reference writer that follows the field tables of docs/format.md,
3. as committed in tests/data/golden_small.arena,

and all three must be identical. The C test tests/c/test_golden.c checks the same file.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest

from ray_zerocopy import _zc

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "golden_small.arena"
FORMAT_MD = ROOT / "docs" / "format.md"

STORAGES = [bytes(range(12)), bytes([0xFF, 0xFE, 0xFD])]
# (name, storage_index, dtype, shape, stride, storage_offset, kind, flags)
TENSORS = [
    ("a", 0, _zc.DTYPE_CODES["float32"], (3,), (1,), 0, _zc.KIND_PARAMETER, _zc.TFLAG_REQUIRES_GRAD),
    ("b", 0, _zc.DTYPE_CODES["int32"], (2,), (1,), 1, _zc.KIND_BUFFER, _zc.TFLAG_PERSISTENT),
    ("c", 1, _zc.DTYPE_CODES["uint8"], (3,), (1,), 0, _zc.KIND_OTHER, 0),
]


def crc32c_reference(data: bytes, crc: int = 0) -> int:
    """Bit-at-a-time CRC32C (reflected polynomial 0x82F63B78), independent of the C code."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _align(v: int, a: int) -> int:
    return (v + a - 1) // a * a


def reference_arena(storages: list[bytes], tensors: list[tuple]) -> bytes:
    """Writes an arena following docs/format.md with struct only."""
    offsets, pos = [], 0
    for s in storages:
        offsets.append(pos)
        pos = _align(pos + len(s), 64)
    data_size = pos
    storage_table = b"".join(struct.pack("<QQ", o, len(s)) for o, s in zip(offsets, storages))
    tensor_table, dims, strings = b"", b"", b""
    for name, sidx, dtype, shape, stride, soff, kind, flags in tensors:
        raw = name.encode()
        tensor_table += struct.pack("<IIIBBBBQII", len(strings), len(raw), sidx, dtype, len(shape), kind, flags,
                                    soff, len(dims) // 8, 0)
        dims += struct.pack(f"<{2 * len(shape)}q", *shape, *stride)
        strings += raw
    manifest = storage_table + tensor_table + dims + strings
    data = bytearray(data_size)
    for o, s in zip(offsets, storages):
        data[o:o + len(s)] = s
    data_offset = _align(128 + len(manifest), 4096)
    header = b"RZCARENA" + struct.pack("<10I", 1, 0, 128, 64, 4096, len(storages), len(tensors), len(dims) // 8,
                                       len(strings), 0)
    header += struct.pack("<5Q", 128, len(manifest), data_offset, data_size, data_offset + data_size)
    header += struct.pack("<II", crc32c_reference(manifest), crc32c_reference(bytes(data)))
    header += struct.pack("<I", crc32c_reference(header)) + bytes(28)
    assert len(header) == 128
    return header + manifest + bytes(data_offset - 128 - len(manifest)) + bytes(data)


def build_with_extension(storages: list[bytes], tensors: list[tuple]) -> bytearray:
    sizes = [len(s) for s in storages]
    data_offset, total, offsets = _zc.plan(sizes, tensors)
    arena = bytearray(total)
    _zc.write_manifest(arena, sizes, tensors)
    arrays = [np.frombuffer(s, dtype=np.uint8) for s in storages]
    _zc.gather(arena, [(data_offset + o, a.ctypes.data, a.nbytes) for o, a in zip(offsets, arrays)], 2)
    _zc.finalize(arena, 2)
    return arena


def test_golden_file_matches_extension_and_reference():
    golden = GOLDEN.read_bytes()
    built = build_with_extension(STORAGES, TENSORS)
    ref = reference_arena(STORAGES, TENSORS)
    assert len(golden) == 4224
    assert bytes(built) == golden
    assert ref == golden


def test_golden_parse_every_field():
    golden = GOLDEN.read_bytes()
    info = _zc.parse(golden)
    manifest_size = 2 * 16 + 3 * 32 + 6 * 8 + 3
    assert info["version"] == _zc.FORMAT_VERSION == 1
    assert info["flags"] == 0
    assert info["manifest_size"] == manifest_size
    assert info["data_offset"] == 4096
    assert info["data_size"] == 128
    assert info["total_size"] == 4224
    assert info["manifest_crc"] == crc32c_reference(golden[128:128 + manifest_size])
    assert info["data_crc"] == crc32c_reference(golden[4096:4224])
    assert info["header_crc"] == crc32c_reference(golden[:96])
    assert info["storages"] == [(4096, 12), (4160, 3)]
    assert info["tensors"] == [
        ("a", 0, 9, (3,), (1,), 0, 0, 2, 4096),
        ("b", 0, 5, (2,), (1,), 1, 1, 1, 4100),
        ("c", 1, 2, (3,), (1,), 0, 2, 0, 4160),
    ]
    _zc.verify_data(golden)
    # The bytes the tensors point at.
    assert np.frombuffer(golden, np.float32, 3, 4096).tobytes() == bytes(range(12))
    assert np.frombuffer(golden, np.int32, 2, 4100).tobytes() == bytes(range(4, 12))
    assert golden[4160:4163] == b"\xff\xfe\xfd"


def test_golden_header_fields_by_offset():
    g = GOLDEN.read_bytes()
    assert g[0:8] == b"RZCARENA"
    (version, flags, header_size, storage_align, data_align, n_storages, n_tensors, n_dims, strings_size,
     reserved) = struct.unpack_from("<10I", g, 8)
    assert (version, flags, header_size, storage_align, data_align) == (1, 0, 128, 64, 4096)
    assert (n_storages, n_tensors, n_dims, strings_size, reserved) == (2, 3, 6, 3, 0)
    assert struct.unpack_from("<5Q", g, 48) == (128, 179, 4096, 128, 4224)
    assert g[100:128] == bytes(28)
    assert g[128 + 179:4096] == bytes(4096 - 128 - 179)
    assert g[4096 + 12:4096 + 64] == bytes(52) and g[4163:4224] == bytes(61)
    # Tensor b's entry.
    entry = struct.unpack_from("<IIIBBBBQII", g, 128 + 32 + 32)
    assert entry == (1, 1, 0, 5, 1, 1, 1, 1, 2, 0)


@pytest.mark.parametrize("seed", range(5))
def test_reference_writer_agrees_on_random_arenas(seed):
    rng = np.random.default_rng(seed)
    storages = [rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes() for _ in range(4)]
    tensors = []
    for i, s in enumerate(storages):
        n = len(s) // 4
        tensors.append((f"layer.{i}.w\u00e9", i, _zc.DTYPE_CODES["float32"], (n,), (1,), 0, i % 3, i % 4))
        if n >= 2:
            tensors.append((f"layer.{i}.T", i, _zc.DTYPE_CODES["int16"], (2, n), (1, 2), 0, 2, 0))
    assert bytes(build_with_extension(storages, tensors)) == reference_arena(storages, tensors)


def test_docs_dtype_table_matches_code():
    text = FORMAT_MD.read_text()
    rows = re.findall(r"\|\s*(\d+)\s*\|\s*([a-z0-9_]+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*([a-z0-9_]+)\s*\|\s*(\d+)\s*\|",
                      text)
    table = {}
    for c1, n1, b1, c2, n2, b2 in rows:
        table[n1] = (int(c1), int(b1))
        table[n2] = (int(c2), int(b2))
    assert len(table) == 22
    assert {name: code for name, (code, _) in table.items()} == _zc.DTYPE_CODES
    for name, (code, size) in table.items():
        assert _zc.dtype_size(code) == size
        assert _zc.dtype_name(code) == name


def test_docs_constants_match_code():
    text = FORMAT_MD.read_text()
    assert "ASCII `RZCARENA`" in text
    assert _zc.HEADER_SIZE == 128 and "header (128 B)" in text
    assert _zc.STORAGE_ALIGN == 64 and _zc.DATA_ALIGN == 4096
    assert _zc.MAX_NDIM == 32 and "at most 32" in text
    assert "0xE3069283" in text and _zc.crc32c(b"123456789") == 0xE3069283
