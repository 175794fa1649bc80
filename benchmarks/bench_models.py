"""Model shapes built in code with random weights (no downloads), and the pipeline wrapper.

Every contender process and its Ray workers import this module (``benchmarks/`` is on
PYTHONPATH), so classes pickle by reference and ``build_skeleton`` can rebuild a model on the
meta device for ``load_state_dict(..., assign=True)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# name -> spec. "roles" says which figures the model is used for.
MODELS = {
    # GPT-2 medium: 24 layers, d=1024, 16 heads, vocab 50257, 1024 positions, tied lm_head.
    "gpt2-medium": dict(kind="gpt", vocab=50257, pos=1024, d=1024, layers=24, heads=16,
                        dtype="float32", seq=8),
    # GPT-2 small shape (124M), used where the quick mode needs a smaller model.
    "gpt2-small": dict(kind="gpt", vocab=50257, pos=1024, d=768, layers=12, heads=12,
                       dtype="float32", seq=8),
    # A 1.3B-parameter decoder (GPT-3 XL / OPT-1.3B shape) in bfloat16.
    "gpt-1.3b-bf16": dict(kind="gpt", vocab=50257, pos=2048, d=2048, layers=24, heads=16,
                          dtype="bfloat16", seq=8),
    "resnet50": dict(kind="resnet50", dtype="float32", image=64),
    # 5,000 small tensors: 2,500 Linear(8, 8) (weight + bias).
    "small-5000": dict(kind="small", n_layers=2500, width=8, dtype="float32"),
    # Same tensor count (200), 4x the bytes: 100 Linear(d, d) with d and 2d.
    "stack-200t-d512": dict(kind="stack", n_layers=100, width=512, dtype="float32"),
    "stack-200t-d1024": dict(kind="stack", n_layers=100, width=1024, dtype="float32"),
    "stack-200t-d2048": dict(kind="stack", n_layers=100, width=2048, dtype="float32"),
}


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, pos, d, layers, heads):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(pos, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.tie()

    def tie(self):
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x[:, -1, :]))


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + idt)


class ResNet50(nn.Module):
    def __init__(self, classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for width, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(2048, classes)

    def tie(self):
        pass

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Stack(nn.Module):
    def __init__(self, n_layers, width):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n_layers))

    def tie(self):
        pass

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _construct(spec):
    kind = spec["kind"]
    if kind == "gpt":
        return GPT(spec["vocab"], spec["pos"], spec["d"], spec["layers"], spec["heads"])
    if kind == "resnet50":
        return ResNet50()
    if kind in ("small", "stack"):
        return Stack(spec["n_layers"], spec["width"])
    raise ValueError(kind)


def build_skeleton(spec) -> nn.Module:
    """The model on the meta device (no storage), in its dtype, in eval mode."""
    with torch.device("meta"):
        m = _construct(spec)
    return m.to(getattr(torch, spec["dtype"])).eval()


def build(spec, seed: int = 0) -> nn.Module:
    """The model with random weights on the CPU (fast fill; tied weights tied)."""
    m = build_skeleton(spec).to_empty(device="cpu")
    m.tie()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        seen = set()
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            if t.dtype in (torch.int64, torch.long):
                t.zero_()
            elif name.endswith("running_var") or (t.dim() == 1 and name.endswith("weight")):
                t.fill_(1.0)
            elif name.endswith("running_mean") or t.dim() == 1:
                t.uniform_(-0.01, 0.01, generator=g)
            else:
                t.uniform_(-0.02, 0.02, generator=g)
    return m.eval()


def model_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of unique storages, number of tensors) of a model's parameters and buffers."""
    seen, total, n = set(), 0, 0
    for t in list(model.parameters()) + list(model.buffers()):
        n += 1
        # Meta tensors (the skeletons used for sizing) have no address: tell them apart by
        # object identity instead, which still counts a tied weight once.
        key = id(t) if t.is_meta else t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total, n


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_input(spec, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kind = spec["kind"]
    if kind == "gpt":
        return torch.randint(0, spec["vocab"], (batch, spec.get("seq", 8)), generator=g)
    if kind == "resnet50":
        s = spec.get("image", 64)
        return torch.randn(batch, 3, s, s, generator=g)
    return torch.randn(batch * 4, spec["width"], generator=g)


class Pipeline:
    """What the wrappers wrap: a plain object holding the model, callable on a batch."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x):
        with torch.inference_mode():
            return self.model(x)
