"""Packing and unpacking without Ray: the round-trip matrix of the foundation issue."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import threading

import cloudpickle
import numpy as np
import pytest
import torch
from torch import nn

import ray_zerocopy as rzc
from conftest import ray_like_roundtrip
from models import GPT2ish, Pipeline, ResNetish, big_mlp, mlp, n_bytes


def roundtrip(pipeline, **kw):
    skeleton, arena = rzc.pack(pipeline)
    skeleton2, arena2 = ray_like_roundtrip((skeleton, arena))
    assert not arena2.flags.writeable
    return rzc.unpack(skeleton2, arena2, **kw), arena2


def inside(t: torch.Tensor, buf: np.ndarray) -> bool:
    start = buf.ctypes.data
    p = t.data_ptr()
    return start <= p and p + t.untyped_storage().nbytes() <= start + buf.nbytes


def all_tensors(m: nn.Module):
    return list(m.parameters()) + list(m.buffers())


@pytest.mark.parametrize("make,inp", [
    (lambda: mlp(), lambda: torch.randn(4, 64)),
    (lambda: ResNetish(), lambda: torch.randn(2, 3, 16, 16)),
    (lambda: GPT2ish(dtype=torch.bfloat16), lambda: torch.randint(0, 512, (2, 16))),
    (lambda: GPT2ish(dtype=torch.float32), lambda: torch.randint(0, 512, (2, 16))),
])
def test_roundtrip_models_identical_and_zero_copy(make, inp):
    torch.manual_seed(0)
    model = make()
    x = inp()
    with torch.inference_mode():
        want = model(x)
    clone, arena = roundtrip(model)
    with torch.inference_mode():
        got = clone(x)
    # Weights are bit-identical; outputs equal up to the run-to-run variation that torch's CPU
    # kernels show between two copies of one model at different addresses (~1e-6 for fp32).
    for a, b in zip(model.state_dict().values(), clone.state_dict().values()):
        assert torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for t in all_tensors(clone):
        assert inside(t, arena), "tensor data not inside the shared buffer"
    assert type(clone) is type(model) and clone.training == model.training


def test_tied_weights_stay_tied_bf16():
    model = GPT2ish(dtype=torch.bfloat16)
    clone, arena = roundtrip(model)
    assert clone.lm_head.weight is clone.wte.weight
    assert clone.wte.weight.dtype == torch.bfloat16
    names = [n for n, _ in clone.named_parameters()]
    assert names == [n for n, _ in model.named_parameters()]
    # stored once: the arena is not bigger than the model's unique storages plus padding
    assert arena.nbytes < n_bytes(model) + 4096 * 4 + 64 * 64


def test_pipeline_with_lists_dicts_and_shared_module():
    torch.manual_seed(1)
    p = Pipeline()
    x = torch.randn(3, 32)
    with torch.inference_mode():
        want = p(x)
    q, arena = roundtrip(p)
    with torch.inference_mode():
        got = q(x)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert q.shared is q.also_shared
    assert q.threshold == 0.5
    for m in [q.encoder, q.decoder, *q.heads, *q.extra.values(), q.shared]:
        for t in all_tensors(m):
            assert inside(t, arena)
    paths = [p for p, _ in rzc.find_modules(p)]
    assert {"encoder", "decoder", "heads[0]", "heads[1]", "extra['proj']", "extra['norm']",
            "shared"} <= set(paths)
    assert "also_shared" not in paths  # found once, under the first path


def test_parameters_buffers_flags_kept():
    m = ResNetish()
    m.layers.train()  # mixed training flags
    m.register_buffer("scratch", torch.zeros(3), persistent=False)
    clone, _ = roundtrip(m)
    for (n1, a), (n2, b) in zip(m.named_modules(), clone.named_modules()):
        assert n1 == n2 and a.training == b.training
    for p in clone.parameters():
        assert isinstance(p, nn.Parameter) and not p.requires_grad
    assert set(clone.state_dict()) == set(m.state_dict())
    assert "scratch" not in clone.state_dict()
    assert torch.equal(clone.layers[0].bn1.num_batches_tracked, m.layers[0].bn1.num_batches_tracked)


ALL_DTYPES = [d for d in [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex32,
    torch.complex64, torch.complex128, torch.bool, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, getattr(torch, "uint16", None), getattr(torch, "uint32", None),
    getattr(torch, "uint64", None), getattr(torch, "float8_e4m3fn", None),
    getattr(torch, "float8_e5m2", None), getattr(torch, "float8_e4m3fnuz", None),
    getattr(torch, "float8_e5m2fnuz", None), getattr(torch, "float8_e8m0fnu", None),
    getattr(torch, "float4_e2m1fn_x2", None),
] if d is not None]


# torch warns that complex32 is experimental whenever one is created; that is torch's
# warning about torch's dtype, not about this library.
@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_bytes_identical(dtype):
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (7, 5 * itemsize), dtype=torch.uint8)
    t = raw.view(dtype)
    m = nn.Module()
    m.register_buffer("t", t)
    clone, arena = roundtrip(m)
    assert clone.t.dtype == dtype and clone.t.shape == t.shape
    assert torch.equal(clone.t.view(torch.uint8), t.view(torch.uint8))
    assert inside(clone.t, arena)


def test_non_contiguous_keep_shape_strides_and_sharing():
    m = nn.Module()
    base = torch.randn(6, 4)
    m.register_buffer("base", base)
    m.register_buffer("t", base.t())                   # transposed view of the same storage
    m.register_buffer("sl", base[1:5:2, 1:])           # strided slice with an offset
    m.register_buffer("ex", torch.randn(1, 3).expand(5, 3))  # zero stride
    m.w = nn.Parameter(torch.randn(3, 8)[:, ::2])      # non-contiguous parameter
    clone, _ = roundtrip(m)
    for name in ["base", "t", "sl", "ex", "w"]:
        a, b = getattr(m, name), getattr(clone, name)
        assert a.shape == b.shape and a.stride() == b.stride(), name
        assert a.storage_offset() == b.storage_offset(), name
        assert torch.equal(a, b), name
    assert clone.t.untyped_storage().data_ptr() == clone.base.untyped_storage().data_ptr()


def test_original_untouched_and_usable():
    m = GPT2ish()
    before = {n: (p.data_ptr(), p.clone()) for n, p in m.named_parameters()}
    rzc.pack(m)
    for n, p in m.named_parameters():
        assert p.data_ptr() == before[n][0] and torch.equal(p, before[n][1])
    assert m.lm_head.weight is m.wte.weight
    m(torch.randint(0, 512, (1, 4)))


def test_skeleton_small_for_100mb_model():
    m = big_mlp(100 << 20)
    packed = rzc.pack(m)
    assert packed.weight_bytes >= 100 << 20
    assert len(packed.skeleton) < 0.01 * packed.weight_bytes


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def test_driver_holds_at_most_one_extra_copy():
    m = big_mlp(64 << 20)
    weights = n_bytes(m)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    before = _vm("VmRSS")
    packed = rzc.pack(m)
    peak = _vm("VmHWM") - before
    assert packed.arena.nbytes >= weights
    assert weights <= peak < 1.1 * weights + (8 << 20), \
        f"peak extra RSS {peak / 2**20:.1f} MiB for {weights / 2**20:.1f} MiB of weights"


def test_local_class_pickled_by_value():
    class Local(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x) * 2

    m = Local()
    clone, _ = roundtrip(m)
    x = torch.randn(2, 3)
    assert torch.equal(clone(x), m(x))


def test_main_module_class_in_another_process(tmp_path):
    """A pipeline class defined in a script's __main__ unpacks in a process that lacks it."""
    script = tmp_path / "producer.py"
    script.write_text(textwrap.dedent("""
        import sys, torch
        from torch import nn
        import ray_zerocopy as rzc

        class MyPipe:
            def __init__(self):
                torch.manual_seed(0)
                self.enc = nn.Linear(4, 4)
            def run(self, x):
                return self.enc(x).sum().item()

        p = MyPipe()
        skeleton, arena = rzc.pack(p)
        open(sys.argv[1], "wb").write(skeleton)
        arena.tofile(sys.argv[2])
        print(p.run(torch.ones(1, 4)))
    """))
    sk, ar = tmp_path / "sk", tmp_path / "ar"
    want = subprocess.run([sys.executable, str(script), str(sk), str(ar)], check=True,
                          capture_output=True, text=True).stdout.strip()
    consumer = textwrap.dedent(f"""
        import numpy as np, torch, ray_zerocopy as rzc
        p = rzc.unpack(open({str(sk)!r}, "rb").read(), np.fromfile({str(ar)!r}, dtype=np.uint8))
        print(p.run(torch.ones(1, 4)))
    """)
    got = subprocess.run([sys.executable, "-c", consumer], check=True, capture_output=True,
                         text=True).stdout.strip()
    assert got == want


def test_no_modules_is_a_clear_error():
    class Empty:
        x = 1
    with pytest.raises(rzc.PackError, match="holds no torch.nn.Module"):
        rzc.pack(Empty())


def test_unpicklable_attribute_named():
    p = Pipeline()
    p.extra["lock"] = threading.Lock()
    with pytest.raises(rzc.PackError, match=r"extra\['lock'\]"):
        rzc.pack(p)


# torch 2.13 deprecates creating quantized tensors; users still have them, so we test the refusal.
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_meta_sparse_quantized_rejected_with_path():
    m = nn.Module()
    m.enc = nn.Linear(2, 2, device="meta")
    with pytest.raises(rzc.PackError, match=r"enc\.weight.*meta"):
        rzc.pack(m)
    m = nn.Module()
    m.lin = nn.Linear(2, 2)
    m.lin.register_buffer("sp", torch.eye(3).to_sparse())
    with pytest.raises(rzc.PackError, match=r"lin\.sp.*sparse"):
        rzc.pack(m)
    m = nn.Module()
    m.lin = nn.Linear(2, 2)
    m.lin.register_buffer("q", torch.quantize_per_tensor(torch.rand(3), 0.1, 0, torch.quint8))
    with pytest.raises(rzc.PackError, match=r"lin\.q.*quantized"):
        rzc.pack(m)


def test_corrupt_header_or_manifest_byte_is_a_clear_error():
    m = Pipeline()
    skeleton, arena = rzc.pack(m)
    data_offset = int.from_bytes(arena[64:72].tobytes(), "little")
    for i in range(data_offset):
        bad = arena.copy()
        bad[i] ^= 0x5A
        with pytest.raises(rzc.ArenaError):
            rzc.unpack(skeleton, bad)


def test_truncated_arena_and_wrong_skeleton():
    skeleton, arena = rzc.pack(mlp())
    for n in [0, 10, 127, 128, 4095, arena.nbytes - 1]:
        with pytest.raises(rzc.ArenaError):
            rzc.unpack(skeleton, arena[:n])
    other_skeleton, _ = rzc.pack(mlp(width=8))
    with pytest.raises(rzc.UnpackError, match="do not belong together"):
        rzc.unpack(other_skeleton, arena)
    with pytest.raises(rzc.UnpackError):
        rzc.unpack(b"nonsense", arena)


def test_verify_arena_detects_data_corruption():
    skeleton, arena = rzc.pack(mlp())
    rzc.verify_arena(arena)
    bad = arena.copy()
    bad[-1] ^= 1
    rzc.unpack(skeleton, bad)  # loading does not read the data region (O(tensors))
    with pytest.raises(rzc.ArenaError, match="(?i)checksum|crc"):
        rzc.verify_arena(bad)


def test_writable_gives_private_copy():
    m = mlp()
    skeleton, arena = rzc.pack(m)
    ro = ray_like_roundtrip(arena)
    clone = rzc.unpack(skeleton, ro, writable=True)
    with torch.no_grad():
        clone[0].weight.add_(1)
    assert not inside(clone[0].weight, ro)
    assert torch.equal(rzc.unpack(skeleton, ro)[0].weight, m[0].weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_tensors_copied_to_host_while_packing():
    m = mlp().cuda()
    clone, arena = roundtrip(m)
    assert clone[0].weight.device.type == "cpu" and inside(clone[0].weight, arena)
    assert torch.equal(clone[0].weight, m[0].weight.cpu())


def test_tensor_ids_persistent_id():
    """The packer's C persistent_id: None for non-tensors, one index per tensor object."""
    from ray_zerocopy import _zc

    ids = _zc.TensorIds(torch.Tensor)
    a, b = torch.zeros(2), nn.Parameter(torch.ones(3))
    view = a[1:]
    for obj in (1, "x", [a], {"k": a}, None, nn.Linear(1, 1), object()):
        assert ids(obj) is None
    assert [ids(a), ids(b), ids(a), ids(view), ids(b)] == [0, 1, 0, 2, 1]
    assert ids.found == [a, b, view] and ids.found[2] is view
    with pytest.raises(TypeError):
        _zc.TensorIds(42)
    with pytest.raises(TypeError):
        ids()
    assert _zc.TensorIds(torch.Tensor).found == []


def test_skeleton_pickler_fast_paths_keep_semantics():
    """OrderedDicts (filled, empty, with attributes, subclasses), hooks, and functions pickled by
    value after one pickled by reference all come back as plain cloudpickle would have them."""
    from collections import OrderedDict

    class ODSub(OrderedDict):
        pass

    def local_fn(x):  # a local function: pickled by value
        return x + 1

    od_attr = OrderedDict(a=1)
    od_attr.note = "kept"
    m = mlp()
    m.register_forward_hook(lambda mod, inp, out: None)
    p = Pipeline()
    p.model = m
    p.tables = [OrderedDict(b=2, a=1), OrderedDict(), ODSub(z=3), od_attr]
    p.fns = [torch.relu, mlp, local_fn, np.add, local_fn]  # mlp: a function by reference
    clone, _ = roundtrip(p)
    assert [list(t.items()) for t in clone.tables] == [[("b", 2), ("a", 1)], [], [("z", 3)],
                                                        [("a", 1)]]
    assert [type(t).__name__ for t in clone.tables] == ["OrderedDict"] * 2 + ["ODSub", "OrderedDict"]
    assert type(clone.tables[0]) is OrderedDict and isinstance(clone.tables[2], OrderedDict)
    assert clone.tables[3].note == "kept"
    assert clone.fns[0] is torch.relu and clone.fns[1] is mlp and clone.fns[3] is np.add
    assert clone.fns[2](1) == 2 and clone.fns[2] is clone.fns[4]
    assert len(clone.model._forward_hooks) == 1
    x = torch.randn(4, 64)
    assert torch.equal(clone.model(x), m(x))


def _dict_shape(m: nn.Module) -> list:
    """A module's __dict__ as keys, value types and (for containers) contents, in order."""
    return [
        (k, type(v), list(v.items()) if isinstance(v, dict) else sorted(v) if isinstance(v, set) else None)
        for k, v in vars(m).items()
    ]


class _OwnSetstate(nn.Linear):
    def __setstate__(self, state):
        super().__setstate__(state)
        self.restored = True


@pytest.fixture
def torch_setstate(monkeypatch):
    """nn.Module.__setstate__ as torch defines it. torch.compile (test_jit, earlier in the
    suite) replaces it for good with a wrapper that also tags the module for dynamo; the packer
    then pickles every module the plain way (see the next tests)."""
    import importlib

    pack_mod = importlib.import_module("ray_zerocopy.pack")
    original = next(f for f in pack_mod._OWN_SETSTATES if f.__qualname__ == "Module.__setstate__")
    monkeypatch.setattr(nn.Module, "__setstate__", original)
    return pack_mod


def test_module_state_leaves_out_empty_containers_and_rebuilds_the_same_modules(torch_setstate):
    """Plain modules are pickled without their empty hook containers and rebuilt by
    _zc.module_state: every module's __dict__ comes back as plain pickling gives it (same keys,
    same order, same types, same contents), with fresh containers in every rebuild; a container
    something else also holds, a hook, a type with its own __setstate__ and a module whose
    __dict__ lost a key nn.Module.__init__ makes are pickled as they are."""
    conv = nn.Conv2d(3, 4, 3)
    hooked = nn.Linear(4, 4)
    hooked.register_forward_pre_hook(lambda mod, inp: None)
    odd = nn.Linear(4, 4)
    del odd._backward_hooks  # not the __dict__ nn.Module.__init__ made
    p = Pipeline()
    p.model = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LayerNorm(4 * 6 * 6))
    p.others = [hooked, odd, _OwnSetstate(2, 2), nn.TransformerEncoderLayer(8, 2, 16)]
    p.alias = p.model[2]._forward_hooks  # an empty hook dict held twice
    skeleton, arena = rzc.pack(p)
    plain = pickle.loads(cloudpickle.dumps(p))
    a, b = rzc.unpack(skeleton, arena), rzc.unpack(skeleton, arena)
    for clone in (a, b):
        mods = list(clone.model) + clone.others
        for got, want in zip(mods, list(plain.model) + plain.others, strict=True):
            assert [k for k, *_ in _dict_shape(got)] == [k for k, *_ in _dict_shape(want)]
            for (k, t, items), (_, t2, items2) in zip(_dict_shape(got), _dict_shape(want)):
                assert t is t2, k
                if k not in ("_parameters", "_buffers", "_modules", "_forward_pre_hooks"):
                    assert items == items2, k
        assert clone.alias is clone.model[2]._forward_hooks
        assert len(clone.others[0]._forward_pre_hooks) == 1
        assert "_backward_hooks" not in vars(clone.others[1])
        assert clone.others[2].restored
    # Fresh containers in each rebuild: a hook registered on one is not on the other.
    a.model[0].register_forward_hook(lambda mod, inp, out: None)
    assert len(a.model[0]._forward_hooks) == 1 and len(b.model[0]._forward_hooks) == 0
    assert a.model[0]._buffers is not b.model[0]._buffers
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(b.model.eval()(x), p.model.eval()(x))



def test_module_state_makes_the_skeleton_smaller(torch_setstate, monkeypatch):
    """The empty containers are not in the skeleton: pickled the plain way, a stack of Linear
    layers' skeleton is over twice as long. With nn.Module.__setstate__ replaced (as
    torch.compile does), every module is pickled the plain way, and unpickling calls the
    replacement."""
    stack = nn.Sequential(*[nn.Linear(2, 2) for _ in range(50)])
    short = len(rzc.pack(stack).skeleton)
    with monkeypatch.context() as m:
        m.setattr(torch_setstate, "_module_keys_needed", lambda t, table: None)
        plain = len(rzc.pack(stack).skeleton)
    assert short * 2 < plain, (short, plain)

    original = nn.Module.__setstate__
    calls = []

    def patched(self, state):
        calls.append(type(self).__name__)
        original(self, state)

    # A skeleton made with the fast path, rebuilt where __setstate__ has been replaced since:
    # module_state hands each module's full state to the replacement.
    fast = rzc.pack(stack)
    monkeypatch.setattr(nn.Module, "__setstate__", patched)
    clone = rzc.unpack(fast.skeleton, fast.arena)
    assert calls.count("Linear") == 50
    assert list(vars(clone[0])) == list(vars(stack[0]))
    calls.clear()
    packed = rzc.pack(stack)
    assert len(packed.skeleton) == plain
    rzc.unpack(packed.skeleton, packed.arena)
    assert calls.count("Linear") == 50


def test_module_state_rejects_bad_arguments():
    from ray_zerocopy import _zc

    # A table that is not this process's (another torch packed it): the full state goes
    # through the reader's nn.Module.__setstate__, which fills in what its torch's modules have.
    table = (("training", "_forward_hooks"), (None, dict))
    m = nn.Module.__new__(nn.Module)
    _zc.module_state(table, m, {"training": False, "extra": 1})
    assert list(vars(m))[:3] == ["training", "_forward_hooks", "extra"] and m._forward_hooks == {}
    assert "_forward_pre_hooks" in vars(m) and "_backward_pre_hooks" in vars(m)
    with pytest.raises(KeyError, match="lacks 'training'"):
        _zc.module_state(table, nn.Module.__new__(nn.Module), {})
    with pytest.raises(TypeError, match="state must be a dict"):
        _zc.module_state(table, m, [("training", True)])
    with pytest.raises(TypeError, match="pair of tuples"):
        _zc.module_state((("a",), ()), m, {})
    with pytest.raises(TypeError, match="takes 3 arguments"):
        _zc.module_state(table, m)
    with pytest.raises(TypeError, match="lists of one length"):
        _zc.fresh_tensors([torch.zeros(1)], [], torch.Tensor._make_subclass, nn.Parameter, 1)
