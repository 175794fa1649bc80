"""Wrapping from safetensors checkpoints (docs/files.md): Hugging Face GPT-2 and BERT built from a
small config, saved with save_pretrained (one file and sharded), wrapped from the files into
meta-device models; key, shape and dtype mismatches; dtype conversion; ties; multi-model
pipelines; the driver's private memory at its peak (in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ray_zerocopy as rzc
from ray_zerocopy import PackError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

HERE = Path(__file__).resolve().parent


def _gpt2_config():
    return transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                   bos_token_id=0, eos_token_id=0)


def _bert_config():
    return transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64,
                                   max_position_embeddings=64)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """GPT-2 and BERT saved with save_pretrained: one file, and sharded (index + shards)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    out = {}
    for name, cls, cfg in [("gpt2", transformers.GPT2LMHeadModel, _gpt2_config()),
                           ("bert", transformers.BertModel, _bert_config())]:
        model = cls(cfg).eval()
        model.save_pretrained(root / name)
        model.save_pretrained(root / f"{name}-sharded", max_shard_size="40KB")
        out[name] = (cls, cfg, root / name, root / f"{name}-sharded")
    return out


def _meta(cls, cfg):
    with torch.device("meta"):
        return cls(cfg).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, 12), generator=g)


class HFRunner:
    """A pipeline: an HF model and what to return."""

    def __init__(self, model):
        self.model = model

    def __call__(self, ids):
        with torch.inference_mode():
            out = self.model(input_ids=ids)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", ["gpt2", "bert"])
@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_hf_model_from_safetensors_matches_from_pretrained(ray_session, hf_dirs, name, sharded):
    cls, cfg, one, shards = hf_dirs[name]
    src = shards if sharded else one
    if sharded:
        assert (src / "model.safetensors.index.json").is_file()
        assert len(list(src.glob("*.safetensors"))) > 1
    ids = _inputs()
    expected = HFRunner(cls.from_pretrained(src).eval())(ids)
    w = rzc.TaskWrapper.from_safetensors(HFRunner(_meta(cls, cfg)), {"model": src})
    assert torch.allclose(w(ids), expected, atol=1e-5)


def test_gpt2_ties_stay_tied_one_copy(ray_session, hf_dirs):
    cls, cfg, src, _ = hf_dirs["gpt2"]
    meta = _meta(cls, cfg)
    assert meta.lm_head.weight is meta.transformer.wte.weight
    keys = json.loads((src / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (src / "model.safetensors").read_bytes()[:8], "little")])
    assert "lm_head.weight" not in keys  # save_pretrained drops the tied copy
    aw = rzc.ActorWrapper.from_safetensors(meta, src)
    real = cls.from_pretrained(src)
    n = sum(p.numel() * p.element_size() for p in real.parameters())  # tied counted once
    assert aw._shared.nbytes == n

    @ray_session.remote(num_cpus=0)
    def check(aw):
        m = aw.load()
        return m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()

    assert ray_session.get(check.remote(aw))


def test_bert_nonpersistent_buffers_come_from_the_model_init(hf_dirs):
    from ray_zerocopy.files import CheckpointSource

    cls, cfg, src, _ = hf_dirs["bert"]
    meta = _meta(cls, cfg)
    assert meta.embeddings.position_ids.device.type == "meta"
    replace, _, _ = CheckpointSource(meta, src)._map_and_check()
    pos = replace[id(meta.embeddings.position_ids)]
    assert torch.equal(pos[0], torch.arange(64))
    assert meta.embeddings.position_ids.device.type == "meta"  # the pipeline is not changed


def _save(tensors: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_mismatches_name_the_keys_before_anything_is_put(ray_session, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    sd = model.state_dict()
    bad = dict(sd)
    del bad["2.bias"]                       # missing
    bad["9.weight"] = torch.zeros(3)        # unexpected
    bad["0.weight"] = torch.zeros(8, 5)     # shape
    bad["2.weight"] = sd["2.weight"].half()  # dtype
    path = _save(bad, tmp_path / "bad.safetensors")
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    puts = []
    monkeypatch.setattr(ray_session, "put", lambda *a, **k: puts.append(a))
    with pytest.raises(PackError) as ei:
        rzc.TaskWrapper.from_safetensors(meta, path)
    msg = str(ei.value)
    assert "missing keys" in msg and "'2.bias'" in msg
    assert "unexpected keys" in msg and "'9.weight'" in msg
    assert "shape mismatches" in msg and "'0.weight': checkpoint [8, 5], model [8, 4]" in msg
    assert "dtype mismatches" in msg and "pass dtype=torch.float32" in msg
    assert "'2.weight': checkpoint torch.float16, model torch.float32" in msg
    assert puts == []


def test_dtype_conversion_bf16_checkpoint_into_fp32(ray_session, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    path = _save(bf16, tmp_path / "bf16.safetensors")
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    with pytest.raises(PackError, match="pass dtype=torch.float32"):
        rzc.TaskWrapper.from_safetensors(meta, path)
    w = rzc.TaskWrapper.from_safetensors(meta, path, dtype=torch.float32)
    ref = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    ref.load_state_dict({k: v.float() for k, v in bf16.items()})
    x = torch.randn(3, 16)
    with torch.inference_mode():
        assert torch.equal(w(x), ref(x))


def test_dtype_conversion_mixed_checkpoint_matches_tensor_to(ray_session, tmp_path):
    """A checkpoint of float16, bfloat16, float64 and float8 tensors, one of them tied, into a
    float32 model: the float8 one is staged (the core does not convert it), the rest go through
    the lazy region; every weight equals torch's own .to(float32), bit for bit."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 64)
            self.b = nn.Linear(64, 64)
            self.c = nn.Linear(64, 8)
            self.c2 = nn.Linear(64, 8)
            self.c2.weight = self.c.weight  # tied: stored once

        def forward(self, x):
            return self.c(self.b(self.a(x))) + self.c2(x)

    src = {
        "a.weight": torch.randn(64, 64).to(torch.float16),
        "a.bias": torch.randn(64).to(torch.bfloat16),
        "b.weight": torch.randn(64, 64, dtype=torch.float64) * 1e3,
        "b.bias": torch.randn(64),  # already float32: straight from the file
        "c.weight": torch.randn(8, 64).to(torch.float8_e4m3fn),
        "c.bias": torch.randn(8).to(torch.bfloat16),
        "c2.bias": torch.randn(8).to(torch.float16),
    }
    path = _save(src, tmp_path / "mixed.safetensors")
    with torch.device("meta"):
        meta = Net().eval()
    from ray_zerocopy.files import CheckpointSource

    source = CheckpointSource(meta, path, dtype=torch.float32)
    w = rzc.ActorWrapper(source)
    assert source.staged_bytes == 8 * 64 * 4  # the float8 weight
    assert source.converted_bytes >= (64 * 64 * 2 + 64) * 4

    @ray_session.remote(num_cpus=0)
    def state(aw):
        m = aw.load()
        return {k: v.clone() for k, v in m.state_dict().items()}, (
            m.c.weight.data_ptr() == m.c2.weight.data_ptr())

    got, tied = ray_session.get(state.remote(w))
    assert tied
    for k, v in src.items():
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k].view(torch.int32), v.to(torch.float32).view(torch.int32)), k
    assert torch.equal(got["c2.weight"], src["c.weight"].to(torch.float32))


class TwoModels:
    def __init__(self, device=None):
        with torch.device(device or "cpu"):
            self.encoder = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)
        self.scale = 2.0

    def __call__(self, x):
        with torch.inference_mode():
            return self.head(self.encoder(x)) * self.scale


def test_multi_model_pipeline_with_prefixes_and_per_model_files(ray_session, tmp_path):
    torch.manual_seed(0)
    real = TwoModels()
    x = torch.randn(2, 8)
    # One checkpoint with prefixed keys...
    flat = {f"encoder.{k}": v for k, v in real.encoder.state_dict().items()}
    flat.update({f"head.{k}": v for k, v in real.head.state_dict().items()})
    one = _save(flat, tmp_path / "all.safetensors")
    assert torch.equal(rzc.TaskWrapper.from_safetensors(TwoModels("meta"), one)(x), real(x))
    # ... or one checkpoint per model, keyed by its attribute path.
    enc = _save(real.encoder.state_dict(), tmp_path / "enc.safetensors")
    head = _save(real.head.state_dict(), tmp_path / "head.safetensors")
    w = rzc.TaskWrapper.from_safetensors(TwoModels("meta"), {"encoder": enc, "head": [head]})
    assert torch.equal(w(x), real(x))
    with pytest.raises(PackError, match="'decoder' is not a model of TwoModels"):
        rzc.TaskWrapper.from_safetensors(TwoModels("meta"), {"decoder": enc})
    with pytest.raises(PackError, match=r"missing keys .*'head.bias', 'head.weight'"):
        rzc.TaskWrapper.from_safetensors(TwoModels("meta"), {"encoder": enc})


def test_meta_buffer_nobody_fills_is_an_error(tmp_path):
    class WithMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("mask", torch.ones(2), persistent=False)

    path = _save(WithMask().state_dict(), tmp_path / "m.safetensors")
    with torch.device("meta"):
        meta = WithMask()
    from ray_zerocopy.files import CheckpointSource

    with pytest.raises(PackError, match="'mask'; give them values"):
        CheckpointSource(meta, path).store_parts()


def test_bad_sources_are_clear(tmp_path):
    with torch.device("meta"):
        meta = nn.Linear(2, 2)
    from ray_zerocopy.files import CheckpointSource

    with pytest.raises(PackError, match="no such checkpoint file"):
        CheckpointSource(meta, tmp_path / "nope.safetensors").store_parts()
    with pytest.raises(PackError, match="no model.safetensors.index.json and no .safetensors"):
        CheckpointSource(meta, tmp_path).store_parts()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(PackError, match="cannot open as safetensors"):
        CheckpointSource(meta, junk).store_parts()
    with pytest.raises(PackError, match="floating-point torch.dtype"):
        CheckpointSource(meta, junk, dtype=torch.int8)


@pytest.mark.parametrize("convert", [False, True], ids=["same-dtype", "bf16-to-fp32"])
def test_driver_private_memory_stays_small(tmp_path, convert):
    """Wrapping a ~96 MiB checkpoint: the driver's private (anonymous) memory grows by at most
    5% of the model at its peak; the store's pages are the only full-size memory
    (tests/checkpoint_check.py, in fresh processes). Converting a bfloat16 checkpoint into a
    float32 model (dtype=) goes through the lazy region: nothing is staged, the region never holds
    more than 5% of the converted model and is gone after the put."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
    out = subprocess.run([sys.executable, str(HERE / "checkpoint_check.py"), str(tmp_path),
                          str(96 << 20)] + (["--bf16-to-fp32"] if convert else []),
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["equal"], r
    model = r["converted"] if convert else r["weights"]
    assert r["anon_peak"] <= 0.05 * model, r
    if convert:
        assert r["staged"] == 0 and r["converted"] > 1.9 * r["weights"], r
        lazy = r["lazy"]
        assert lazy["regions_created"] == 1 and lazy["regions_alive"] == 0, r
        assert 0 < lazy["peak_resident_bytes"] <= 0.05 * model, r
        assert lazy["fills"] * 65536 >= r["converted"], r  # every chunk was made


def test_dtype_conversion_leaves_buffers_the_model_initializes(tmp_path):
    """dtype= converts the checkpoint's tensors only: a float32 non-persistent buffer that the
    model fills itself (as a Hugging Face rotary embedding's inv_freq, kept in float32 in a
    bfloat16 model) keeps its dtype and values."""
    from ray_zerocopy.files import CheckpointSource

    class Rotary(nn.Module):
        config = {}  # what marks a model whose _init_weights fills meta buffers

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8, dtype=torch.bfloat16)
            self.register_buffer("inv_freq", torch.empty(4, dtype=torch.float32),
                                 persistent=False)

        def _init_weights(self, m):
            if m is self:
                self.inv_freq.copy_(1.0 / (10000 ** (torch.arange(4, dtype=torch.float32) / 4)))

    torch.manual_seed(0)
    path = _save({"proj.weight": torch.randn(8, 8), "proj.bias": torch.randn(8)},
                 tmp_path / "fp32.safetensors")
    with torch.device("meta"):
        meta = Rotary()
    source = CheckpointSource(meta, path, dtype=torch.bfloat16)
    replace, _, _ = source._map_and_check()
    inv = replace[id(meta.inv_freq)]
    assert inv.dtype == torch.float32
    assert torch.equal(inv, 1.0 / (10000 ** (torch.arange(4, dtype=torch.float32) / 4)))
    assert replace[id(meta.proj.weight)].dtype == torch.bfloat16
    assert source.converted_bytes > 0 and source.staged_bytes == 0
