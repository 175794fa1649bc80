"""TorchScript, torch.compile and torch.export models: packed zero-copy, with and without Ray."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import ray_zerocopy as rzc
from conftest import ray_like_roundtrip
from models import GPT2ish, ResNetish, big_mlp, mlp, n_bytes
from ray_zerocopy import jit as rzc_jit


def roundtrip(pipeline, **kw):
    packed = rzc.pack(pipeline)
    skeleton, arena = ray_like_roundtrip(tuple(packed))
    assert not arena.flags.writeable
    return rzc.unpack(skeleton, arena, **kw), arena


def inside(t: torch.Tensor, buf) -> bool:
    lo = buf.address if hasattr(buf, "address") else buf.ctypes.data
    return lo <= t.data_ptr() and t.data_ptr() + t.untyped_storage().nbytes() <= lo + buf.nbytes


def tensors_of(m: nn.Module) -> list[torch.Tensor]:
    return list(m.parameters()) + list(m.buffers())


def snapshot(m: nn.Module) -> list[tuple]:
    return [(n, t.data_ptr(), tuple(t.shape), t.stride(), t.storage_offset(), t._version,
             t.clone()) for n, t in [*m.named_parameters(), *m.named_buffers()]]


def assert_same_snapshot(before, after):
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert b[:6] == a[:6], (b[:6], a[:6])
        assert torch.equal(b[6], a[6]), b[0]


MODELS = {
    "mlp": (lambda: mlp(), lambda: torch.randn(4, 64)),
    "conv": (lambda: ResNetish(), lambda: torch.randn(2, 3, 16, 16)),
    "transformer": (lambda: GPT2ish(), lambda: torch.randint(0, 512, (2, 16))),
}


def compiled_model(name: str, how: str):
    torch.manual_seed(0)
    make, inp = MODELS[name]
    model, x = make(), inp()
    jit = torch.jit.trace(model, x) if how == "trace" else torch.jit.script(model)
    return model, jit, x


# Tracing nn.MultiheadAttention warns (TracerWarning) about shape checks it turns into
# constants; torch's own code, unavoidable when tracing a transformer block.
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("name", list(MODELS))
def test_script_roundtrip_zero_copy_and_original_untouched(name, how):
    model, jit, x = compiled_model(name, how)
    before = snapshot(jit)
    with torch.inference_mode():
        want = jit(x)
    clone, arena = roundtrip(jit, protect=True)
    assert isinstance(clone, torch.jit.ScriptModule)
    assert_same_snapshot(before, snapshot(jit))  # the packer restored every tensor exactly
    for t in tensors_of(clone):
        assert inside(t, arena), "tensor data not inside the shared buffer"
        assert not t.requires_grad
    for (n, a), (m, b) in zip(jit.state_dict().items(), clone.state_dict().items()):
        assert n == m and torch.equal(a, b)
    with torch.inference_mode():
        got = clone(x)
    # Weights are bit-identical, but the parameters of the clone do not require grad, which
    # lets nn.MultiheadAttention take its fused path: compare with the original in that state.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for t in jit.parameters():
        t.requires_grad_(False)
    with torch.inference_mode():
        torch.testing.assert_close(got, jit(x), rtol=1e-6, atol=1e-6)
    if name == "transformer":  # tied lm_head / wte stay tied
        assert clone.lm_head.weight.data_ptr() == clone.wte.weight.data_ptr()


def test_skeleton_is_small_and_weights_stored_once():
    model = big_mlp(4 << 20)
    jit = torch.jit.script(model)
    packed = rzc.pack(jit)
    assert packed.weight_bytes == n_bytes(model)
    assert len(packed.skeleton) < 0.05 * packed.weight_bytes, len(packed.skeleton)
    # A pipeline that holds the eager model and its scripted twin (they share tensors)
    # stores the weights once, and both come back over the same bytes.
    both = {"eager": model, "scripted": jit}
    packed2 = rzc.pack(both)
    assert packed2.weight_bytes == n_bytes(model)
    clone, arena = roundtrip(both)
    for a, b in zip(clone["eager"].parameters(), clone["scripted"].parameters()):
        assert a.data_ptr() == b.data_ptr() and inside(b, arena)


class Mixed:
    """A pipeline with a scripted encoder, a traced head, an eager decoder and a script fn."""

    def __init__(self):
        torch.manual_seed(0)
        self.encoder = torch.jit.script(nn.Sequential(nn.Linear(16, 32), nn.ReLU()).eval())
        self.decoder = nn.Linear(32, 32).eval()
        self.head = torch.jit.trace(nn.Linear(32, 4).eval(), torch.randn(1, 32))
        self.post = _double
        self.scale = 0.5

    def __call__(self, x):
        with torch.inference_mode():
            return self.post(self.head(self.decoder(self.encoder(x)))) * self.scale

    def kinds(self):
        return [type(m).__name__ for m in (self.encoder, self.decoder, self.head)]


@torch.jit.script
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_pipeline_mixing_scripted_traced_and_eager():
    p = Mixed()
    x = torch.randn(3, 16)
    clone, arena = roundtrip(p)
    torch.testing.assert_close(clone(x), p(x), rtol=1e-6, atol=1e-6)
    assert clone.kinds() == ["RecursiveScriptModule", "Linear", "RecursiveScriptModule"]
    for m in (clone.encoder, clone.decoder, clone.head):
        assert all(inside(t, arena) for t in tensors_of(m))
    assert rzc.pack(p).tensor_names == ["encoder.0.weight", "encoder.0.bias", "decoder.weight",
                                        "decoder.bias", "head.weight", "head.bias"]


def test_script_exported_methods_and_reduce_is_not_implemented_for_the_rest():
    class WithExport(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

        @torch.jit.export
        def twice(self, x):
            return self.lin(self.lin(x))

    jit = torch.jit.script(WithExport())
    clone, _ = roundtrip(jit)
    x = torch.randn(2, 4)
    torch.testing.assert_close(clone.twice(x), jit.twice(x), rtol=1e-6, atol=1e-6)
    for obj in (nn.Linear(2, 2), torch.zeros(2), [1], "s", 3, None, WithExport()):
        assert rzc_jit.reduce(obj) is NotImplemented


class Branchy(nn.Module):
    """Python control flow on a shape: tracing bakes in the branch taken by the example."""

    def forward(self, x):
        if x.shape[0] > 2:
            return x * 2
        return x - 1


# Tracing Branchy warns that the branch is baked in (TracerWarning): that is the point here.
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_traced_model_with_other_input_shapes_behaves_as_torchscript():
    traced = torch.jit.trace(Branchy(), torch.randn(4, 3))
    clone, _ = roundtrip({"m": traced})
    small = torch.ones(1, 3)
    # The traced graph took the "> 2" branch for every shape; eager Python would not.
    assert torch.equal(clone["m"](small), traced(small))
    assert torch.equal(clone["m"](small), small * 2)
    assert torch.equal(Branchy()(small), small - 1)
    # Shapes flow through recorded size ops: a traced MLP runs at any batch size.
    model, jit, _ = compiled_model("mlp", "trace")
    clone2, _ = roundtrip(jit)
    x = torch.randn(9, 64)
    torch.testing.assert_close(clone2(x), model(x).detach(), rtol=1e-6, atol=1e-6)


def test_compiled_module_is_compiled_again_lazily():
    model = mlp()
    compiled = torch.compile(model, backend="eager", dynamic=False)
    p = {"compiled": compiled, "other": nn.Linear(2, 2)}
    clone, arena = roundtrip(p)
    c = clone["compiled"]
    assert type(c).__name__ == "OptimizedModule"
    assert rzc_jit.compile_kwargs(c) == {"backend": "eager", "dynamic": False,
                                         "fullgraph": False}
    assert all(inside(t, arena) for t in tensors_of(c._orig_mod))
    x = torch.randn(3, 64)
    torch.testing.assert_close(c(x), model(x), rtol=1e-6, atol=1e-6)
    # The default backend's settings are recovered too (not run here: inductor is slow).
    assert rzc_jit.compile_kwargs(torch.compile(model, mode="max-autotune-no-cudagraphs")) == {
        "backend": "inductor", "fullgraph": False, "dynamic": None,
        "options": {"max_autotune": True, "coordinate_descent_tuning": True}}


def test_exported_program_zero_copy_with_dynamic_shapes():
    torch.manual_seed(0)
    model = GPT2ish()
    idx = torch.randint(0, 512, (2, 16))
    ep = torch.export.export(model, (idx,),
                             dynamic_shapes={"idx": {1: torch.export.Dim("t", max=63)}})
    clone, arena = roundtrip(ep)
    assert isinstance(clone, torch.export.ExportedProgram)
    assert all(inside(t, arena) for t in clone.state_dict.values())
    assert all(inside(t, arena) for t in clone.constants.values())
    m = clone.module()
    assert all(inside(t, arena) for t in tensors_of(m))
    for (n, a), (k, b) in zip(ep.state_dict.items(), clone.state_dict.items()):
        assert n == k and torch.equal(a, b)
    # Outputs to 1e-5: the clone's parameters do not require grad, which changes the kernels
    # that the attention takes (last-bit differences), as for TorchScript above.
    for x in (idx, idx[:, :5]):
        torch.testing.assert_close(m(x), ep.module()(x), rtol=1e-5, atol=1e-5)


def test_unserializable_exported_program_raises_pack_error(monkeypatch):
    import torch._export.serde.serialize as serde

    def refuse(*a, **k):
        raise RuntimeError("custom op without a serializer")

    monkeypatch.setattr(serde, "serialize", refuse)
    ep = torch.export.export(nn.Linear(2, 2), (torch.randn(1, 2),))
    with pytest.raises(rzc.PackError, match=r"ep\.module\(\) instead"):
        rzc.pack({"ep": ep, "m": nn.Linear(2, 2)})


def test_saved_torchscript_archive_without_weights_loads_nothing_big():
    jit = torch.jit.script(big_mlp(2 << 20))
    data = rzc_jit.strip_script_module(jit)
    full = io.BytesIO()
    torch.jit.save(jit, full)
    assert len(data) < 0.05 * len(full.getvalue())
    assert all(t.numel() == 0 for t in torch.jit.load(io.BytesIO(data)).parameters())


# ----------------------------------------------------------------------------- with Ray


class _Loader:
    """A plain Ray actor that loads a JITActorWrapper and reports on its tensors."""

    def __init__(self, wrapper, x):
        from ray_zerocopy.memory import uss

        torch.set_num_threads(1)
        self.uss0 = uss()
        self.model = wrapper.load()
        self.wrapper = wrapper
        with torch.inference_mode():
            self.out = self.model(x)
        self.uss1 = uss()

    def report(self):
        import ray

        arena = ray.get(self.wrapper.object_ref)[1]
        ts = tensors_of(self.model)
        return {"inside": bool(ts) and all(inside(t, arena) for t in ts), "out": self.out,
                "uss_growth": self.uss1 - self.uss0, "type": type(self.model).__name__}

    def run(self, x):
        with torch.inference_mode():
            return self.model(x)


@pytest.mark.ray
def test_jit_task_wrapper_calls_and_method_forwarding(ray_session):
    model, jit, x = compiled_model("mlp", "script")
    w = rzc.JITTaskWrapper(jit)
    assert "forward" in w.methods and "__call__" in w.methods
    want = model(x).detach()
    torch.testing.assert_close(w(x), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.forward(x), want, rtol=1e-6, atol=1e-6)
    refs = [w.remote(x) for _ in range(3)]
    for r in ray_session.get(refs):
        torch.testing.assert_close(r, want, rtol=1e-6, atol=1e-6)
    assert repr(w).startswith("JITTaskWrapper(")
    # A pipeline mixing compiled and eager modules; a compiled module inside it.
    p = Mixed()
    p.compiled = torch.compile(nn.Linear(4, 4), backend="eager")
    wp = rzc.JITTaskWrapper(p)
    xs = torch.randn(2, 16)
    torch.testing.assert_close(wp(xs), p(xs), rtol=1e-6, atol=1e-6)
    assert wp.kinds() == ["RecursiveScriptModule", "Linear", "RecursiveScriptModule"]
    # torch.export: a bare ExportedProgram is callable through the wrapper.
    ep = torch.export.export(model, (x,))
    torch.testing.assert_close(rzc.JITTaskWrapper(ep)(x), want, rtol=1e-6, atol=1e-6)


class _CompiledPipeline:
    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.compile(mlp(), backend="eager")

    def __call__(self, x):
        return type(self.model).__name__, self.model(x).detach()


@pytest.mark.ray
def test_compiled_module_runs_compiled_in_the_worker(ray_session):
    p = _CompiledPipeline()
    x = torch.randn(2, 64)
    kind, y = rzc.JITTaskWrapper(p)(x)
    assert kind == "OptimizedModule"
    torch.testing.assert_close(y, p.model._orig_mod(x).detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.ray
def test_jit_actor_wrapper_zero_copy_uss_growth_under_10_percent(ray_session):
    model = big_mlp(48 << 20)
    jit = torch.jit.trace(model, torch.randn(1, 1024))
    x = torch.randn(2, 1024)
    aw = rzc.JITActorWrapper(jit)
    packed_ref = ray_session.get(aw.object_ref)
    assert len(packed_ref[0]) < 0.05 * n_bytes(model)  # the skeleton: code, no weights
    assert packed_ref[1].nbytes < 1.01 * n_bytes(model)  # the arena: the weights once
    del packed_ref
    Loader = ray_session.remote(num_cpus=0)(_Loader)
    a = Loader.remote(aw, x)
    rep = ray_session.get(a.report.remote())
    assert rep["inside"], rep
    assert rep["type"] == "RecursiveScriptModule"
    torch.testing.assert_close(rep["out"], model(x).detach(), rtol=1e-6, atol=1e-6)
    assert rep["uss_growth"] < 0.10 * n_bytes(model), rep["uss_growth"]
    ray_session.kill(a)


@pytest.mark.ray
def test_exported_program_and_model_wrapper(ray_session, tmp_path):
    model, jit, x = compiled_model("mlp", "script")
    want = model(x).detach()
    ep = torch.export.export(model, (x,))
    Loader = ray_session.remote(num_cpus=0)(_Loader)
    a = Loader.remote(rzc.JITActorWrapper(ep), x)
    rep = ray_session.get(a.report.remote())
    assert rep["inside"], rep
    torch.testing.assert_close(rep["out"], want, rtol=1e-6, atol=1e-6)
    ray_session.kill(a)

    path = tmp_path / "model.pt"
    torch.jit.save(jit, str(path))
    mw = rzc.JITModelWrapper.from_model(path, mode="actor")
    loaded = mw.load()
    assert isinstance(loaded, torch.jit.ScriptModule)
    torch.testing.assert_close(loaded(x), want, rtol=1e-6, atol=1e-6)
    remote = rzc.JITModelWrapper.for_tasks(jit)
    torch.testing.assert_close(remote(x), want, rtol=1e-6, atol=1e-6)
