"""Arena files (docs/format.md, "Arena files"; docs/files.md): the golden file byte for byte,
save -> load round trips of every pipeline shape, truncated and corrupted files, inspect, and the
wrappers' from_file."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from models import GPT2ish, Pipeline, ResNetish, mlp
from test_format import STORAGES, TENSORS, crc32c_reference, reference_arena
from torch import nn

import ray_zerocopy as rzc
from ray_zerocopy import _zc
from ray_zerocopy.errors import ArenaError
from ray_zerocopy.files import ArenaFile

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_FILE = ROOT / "tests" / "data" / "golden_small.rzc"
GOLDEN_META = b'{"class":"Golden"}'


def _align(v: int, a: int) -> int:
    return (v + a - 1) // a * a


def reference_file(meta: bytes, skeleton: bytes, arena: bytes) -> bytes:
    """Writes an arena file following docs/format.md's field table with struct only."""
    so = 128 + len(meta)
    ao = _align(so + len(skeleton), 4096)
    h = b"RZCAFILE" + struct.pack("<4I", 1, 0, 128, 4096)
    h += struct.pack("<7Q", 128, len(meta), so, len(skeleton), ao, len(arena), ao + len(arena))
    h += struct.pack("<II", crc32c_reference(meta), crc32c_reference(skeleton))
    h += struct.pack("<I", crc32c_reference(h)) + bytes(36)
    assert len(h) == 128
    return h + meta + skeleton + bytes(ao - so - len(skeleton)) + arena


def golden_parts() -> tuple[bytes, bytes, bytes]:
    arena = reference_arena(STORAGES, TENSORS)
    skeleton = b"RZCSKEL1" + arena[88:92] + b"golden skeleton"
    return GOLDEN_META, skeleton, arena


# ---- the format -------------------------------------------------------------------------------

def test_golden_file_matches_reference_and_extension():
    golden = GOLDEN_FILE.read_bytes()
    meta, skeleton, arena = golden_parts()
    assert reference_file(meta, skeleton, arena) == golden
    layout = _zc.file_plan(len(meta), len(skeleton), len(arena))
    built = bytearray(layout["file_size"])
    built[:128] = _zc.file_write_header(meta, skeleton, len(arena))
    built[layout["meta_offset"]:layout["meta_offset"] + len(meta)] = meta
    built[layout["skeleton_offset"]:layout["skeleton_offset"] + len(skeleton)] = skeleton
    built[layout["arena_offset"]:] = arena
    assert bytes(built) == golden
    assert len(golden) == 8320


def test_golden_file_fields():
    g = GOLDEN_FILE.read_bytes()
    info = _zc.file_parse(g)
    meta, skeleton, arena = golden_parts()
    assert {k: v for k, v in info.items() if k != "arena"} == {
        "version": 1, "flags": 0, "meta_offset": 128, "meta_size": 18, "skeleton_offset": 146,
        "skeleton_size": 27, "arena_offset": 4096, "arena_size": 4224, "file_size": 8320,
        "meta_crc": crc32c_reference(meta), "skeleton_crc": crc32c_reference(skeleton),
        "header_crc": crc32c_reference(g[:88])}
    assert info["arena"] == _zc.parse(arena)
    assert g[92:128] == bytes(36) and g[173:4096] == bytes(4096 - 173)
    assert "golden_small.rzc" in (ROOT / "docs" / "format.md").read_text()


@pytest.fixture
def saved(tmp_path):
    model = GPT2ish()
    info = rzc.save(model, tmp_path / "gpt.rzc")
    return model, Path(info.path), info


def _corrupt(path: Path, edit) -> Path:
    data = bytearray(path.read_bytes())
    edit(data)
    out = path.with_suffix(".bad")
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("cut", [0, 1, 8, 127, 128, 4095, 4096, -4097, -1])
def test_truncated_file_is_a_clear_error(saved, cut):
    _, path, _ = saved
    data = path.read_bytes()
    bad = path.with_suffix(".cut")
    bad.write_bytes(data[:cut])
    with pytest.raises(ArenaError) as ei:
        rzc.load(bad)
    assert str(bad) in str(ei.value)
    assert ei.value.code_name == "ZC_ETRUNCATED", str(ei.value)


@pytest.mark.parametrize("where,code,needle", [
    (0, "ZC_EMAGIC", "bad magic"),
    (30, "ZC_ECHECKSUM", "header_crc"),          # a header field
    ("meta+2", "ZC_ECHECKSUM", "meta_crc"),      # the metadata
    ("skeleton+50", "ZC_ECHECKSUM", "skeleton_crc"),  # the skeleton
    ("pad", "ZC_EHEADER", "padding"),            # zero padding before the arena
    ("arena+40", "ZC_ECHECKSUM", "arena: header"),  # the arena's header
    ("arena+200", "ZC_ECHECKSUM", "arena: manifest"),  # its manifest
])
def test_corrupted_file_is_a_clear_error(saved, where, code, needle):
    _, path, _ = saved
    info = _zc.file_parse(path.read_bytes())

    def edit(d):
        if where == "pad":
            d[info["skeleton_offset"] + info["skeleton_size"] + 1] ^= 1
        elif isinstance(where, str):
            section, off = where.split("+")
            d[info[f"{section}_offset"] + int(off)] ^= 0x40
        else:
            d[where] ^= 0x40

    bad = _corrupt(path, edit)
    with pytest.raises(ArenaError) as ei:
        rzc.load(bad)
    assert ei.value.code_name == code and needle in str(ei.value), str(ei.value)


def test_corrupted_weights_load_but_fail_verify(saved):
    model, path, _ = saved
    info = _zc.file_parse(path.read_bytes())
    bad = _corrupt(path, lambda d: d.__setitem__(
        info["arena_offset"] + info["arena"]["data_offset"] + 5000, 0x55))
    rzc.load(bad)  # loading never reads the weights
    with pytest.raises(ArenaError) as ei:
        ArenaFile(bad).verify()
    assert ei.value.code_name == "ZC_ECHECKSUM"
    ArenaFile(path).verify()
    rzc.verify_arena(ArenaFile(path).arena)


def test_not_an_arena_file_and_bad_metadata(tmp_path):
    other = tmp_path / "x.bin"
    other.write_bytes(b"\x00" * 9000)
    with pytest.raises(ArenaError, match="bad magic"):
        rzc.load(other)
    meta, skeleton, arena = golden_parts()
    bad = tmp_path / "meta.rzc"
    bad.write_bytes(reference_file(b"[not json", skeleton, arena))
    with pytest.raises(ArenaError, match="metadata is not a JSON object"):
        ArenaFile(bad)
    with pytest.raises(FileNotFoundError):
        rzc.load(tmp_path / "missing.rzc")


def test_random_corruptions_never_crash(saved):
    """Byte flips anywhere before the data region: an ArenaError (or a load that works, for
    bytes no check covers: none before the data region)."""
    _, path, _ = saved
    data = path.read_bytes()
    info = _zc.file_parse(data)
    end = info["arena_offset"] + info["arena"]["data_offset"]
    rng = np.random.default_rng(0)
    for pos in rng.integers(0, end, 60):
        d = bytearray(data)
        d[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(ArenaError):
            _zc.file_parse(bytes(d))


# ---- round trips ------------------------------------------------------------------------------

class Scripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(x) * 2


class Mixed(nn.Module):
    """bf16 and fp8 weights, an int buffer, a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16).to(torch.bfloat16)
        self.q = nn.Parameter(torch.randn(32, 16).to(torch.float8_e4m3fn), requires_grad=False)
        self.register_buffer("steps", torch.arange(5))
        self.register_buffer("scratch", torch.ones(7), persistent=False)

    def forward(self, x):
        return self.a(x.to(torch.bfloat16)).float() + self.q.float().sum() + self.scratch.sum()


def _shapes():
    torch.manual_seed(0)
    return {
        "mlp": (mlp(), lambda: torch.randn(4, 64)),
        "gpt2-ties-nonpersistent": (GPT2ish(), lambda: torch.randint(0, 512, (2, 8))),
        "resnet-buffers": (ResNetish(), lambda: torch.randn(1, 3, 16, 16)),
        "pipeline-nested": (Pipeline(), lambda: torch.randn(3, 32)),
        "bf16-fp8": (Mixed(), lambda: torch.randn(2, 16)),
        "torchscript": (torch.jit.script(Scripted().eval()), lambda: torch.randn(2, 8)),
    }


def _same(a, b):
    if isinstance(a, (list, tuple)):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    return torch.allclose(a.float(), b.float(), atol=1e-5)


def _state(p):
    if isinstance(p, nn.Module):
        return p.state_dict()
    return {f"{n}.{k}": v for n, m in rzc.find_modules(p) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", list(_shapes()))
def test_save_load_round_trip(tmp_path, name):
    model, make_x = _shapes()[name]
    info = rzc.save(model, tmp_path / f"{name}.rzc")
    assert info.file_size == os.path.getsize(info.path)
    loaded = rzc.load(info.path)
    x = make_x()
    with torch.inference_mode():
        assert _same(model(x), loaded(x))
    a, b = _state(model), _state(loaded)
    assert list(a) == list(b)
    for k in a:
        raw_a, raw_b = (t.reshape(-1).view(torch.uint8) for t in (a[k], b[k]))
        assert a[k].dtype == b[k].dtype and torch.equal(raw_a, raw_b), k
    if name == "gpt2-ties-nonpersistent":
        assert loaded.lm_head.weight is loaded.wte.weight
        assert "causal_mask" not in loaded.state_dict()
    if name == "pipeline-nested":
        assert loaded.shared is loaded.also_shared and loaded.threshold == 0.5
    if name == "bf16-fp8":
        assert loaded.q.dtype == torch.float8_e4m3fn and "scratch" not in loaded.state_dict()
    ArenaFile(info.path).verify()


def _maps_of(path: str) -> list[tuple[int, int, dict]]:
    """(start, end, smaps fields) of this process's mappings of path."""
    real = os.path.realpath(path)
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                cur = (lo, hi, {}) if len(head) == 6 and head[5] == real else None
                if cur:
                    out.append(cur)
            elif cur is not None and head[0].endswith(":") and len(head) >= 2 and head[1].isdigit():
                cur[2][head[0][:-1]] = int(head[1])
    return out


def test_load_maps_the_file_with_no_copy(tmp_path):
    model = mlp(width=512, depth=4)
    path = rzc.save(model, tmp_path / "m.rzc").path
    loaded = rzc.load(path)
    total = 0
    maps = _maps_of(path)
    assert maps, "the file is not mapped"
    for p in loaded.parameters():
        total += float(p.float().sum())  # touch every page
        assert any(lo <= p.data_ptr() < hi for lo, hi, _ in maps), "a weight outside the mapping"
    fields = _maps_of(path)
    # Every page read comes from the page cache (clean, file-backed): nothing was copied.
    # (Private_Dirty may count page-cache pages not yet written back: the file is new.)
    assert sum(f.get("Anonymous", 0) for _, _, f in fields) == 0, fields
    assert sum(f.get("Rss", 0) for _, _, f in fields) * 1024 >= 4 * 512 * 512 * 4


def test_load_writable_is_copy_on_write(tmp_path):
    model = mlp()
    path = rzc.save(model, tmp_path / "m.rzc").path
    w = rzc.load(path, writable=True)
    with torch.no_grad():
        w[0].weight.add_(1)
    fresh = rzc.load(path)
    assert torch.equal(fresh[0].weight, model[0].weight)
    assert torch.equal(w[0].weight, model[0].weight + 1)
    # The written pages became this process's own (what test_load_maps_the_file_with_no_copy
    # checks does not happen on reads).
    assert sum(f.get("Anonymous", 0) for _, _, f in _maps_of(path)) > 0
    ArenaFile(path).verify()


def test_inspect_reads_files(tmp_path, saved):
    _, path, _ = saved
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "ray_zerocopy", "inspect", str(path), "--verify",
                          "--limit", "2"], capture_output=True, text=True, env=env, check=True)
    assert "arena file v1" in out.stdout and "GPT2ish" in out.stdout
    assert "data CRC32C ok" in out.stdout and "wte.weight" in out.stdout
    bad = tmp_path / "cut.rzc"
    bad.write_bytes(path.read_bytes()[:5000])
    out = subprocess.run([sys.executable, "-m", "ray_zerocopy", "inspect", str(bad)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 1 and "truncated" in out.stderr


def test_save_writes_atomically_and_reports(tmp_path):
    info = rzc.save(mlp(), tmp_path / "m.rzc")
    assert os.listdir(tmp_path) == ["m.rzc"]
    meta = ArenaFile(info.path).meta
    assert meta["class"] == "Sequential" and "__call__" in meta["methods"]
    assert json.loads(json.dumps(meta)) == meta
    with pytest.raises(rzc.PackError):
        rzc.save(nn.Linear(2, 2, device="meta"), tmp_path / "meta.rzc")
    assert sorted(os.listdir(tmp_path)) == ["m.rzc"]


# ---- the wrappers -----------------------------------------------------------------------------

def test_wrappers_from_file(ray_session, tmp_path, saved):
    model, path, info = saved
    x = torch.randint(0, 512, (2, 8))
    with torch.inference_mode():
        ref = model(x)
    w = rzc.TaskWrapper.from_file(path)
    assert w._shared.data_crc == info.data_crc  # known from the file, not recomputed
    assert _same(w(x), ref)
    w.verify()
    aw = rzc.ActorWrapper.from_file(path)

    @ray_session.remote(num_cpus=0)
    def run(aw, x):
        p = aw.load()
        with torch.inference_mode():
            return p(x), p.lm_head.weight.data_ptr() == p.wte.weight.data_ptr()

    out, tied = ray_session.get(run.remote(aw, x))
    assert _same(out, ref) and tied
    with pytest.raises(ArenaError):
        rzc.TaskWrapper.from_file(_corrupt(path, lambda d: d.__setitem__(130, 0)))


def test_jit_wrapper_from_file(ray_session, tmp_path):
    from ray_zerocopy import JITTaskWrapper

    scripted = torch.jit.script(Scripted().eval())
    path = rzc.save(scripted, tmp_path / "s.rzc").path
    w = JITTaskWrapper.from_file(path)
    x = torch.randn(3, 8)
    assert "forward" in w.methods
    assert _same(w(x), scripted(x)) and _same(w.forward(x), scripted(x))
