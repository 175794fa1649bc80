"""Models built in code with random weights (no downloads), shaped like real ones."""

from __future__ import annotations

import math

import torch
from torch import nn


def mlp(width: int = 64, depth: int = 3, out: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers).eval()


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNetish(nn.Module):
    """A small ResNet-shaped conv net (BatchNorm buffers, eval mode)."""

    def __init__(self, widths=(16, 32, 64), classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, 1 if i == 0 else 2))
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        self.eval()

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT2ish(nn.Module):
    """A GPT-2-shaped decoder: token + position embeddings, blocks, tied lm_head."""

    def __init__(self, vocab: int = 512, d: int = 64, layers: int = 2, heads: int = 4,
                 ctx: int = 64, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        mask = torch.full((ctx, ctx), float("-inf")).triu(1)
        self.register_buffer("causal_mask", mask, persistent=False)
        self.to(dtype).eval()

    def forward(self, idx):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        mask = self.causal_mask[:t, :t].to(x.dtype)
        for blk in self.h:
            x = blk(x, mask)
        return self.lm_head(self.ln_f(x))


class Pipeline:
    """An encoder, a decoder, a list of heads, a dict of modules, one module under two names."""

    def __init__(self, d: int = 32):
        self.encoder = nn.Sequential(nn.Linear(d, d), nn.Tanh()).eval()
        self.decoder = nn.Linear(d, d).eval()
        self.heads = [nn.Linear(d, 3), nn.Linear(d, 5)]
        self.extra = {"proj": nn.Linear(d, d), "norm": nn.LayerNorm(d)}
        self.shared = nn.Linear(d, d)
        self.also_shared = self.shared
        self.threshold = 0.5

    def __call__(self, x):
        h = self.decoder(self.encoder(x))
        h = self.extra["norm"](self.extra["proj"](h)) + self.also_shared(self.shared(h))
        return [head(h) for head in self.heads]

    def predict(self, x):
        return self(x)[0]

    def predict_proba(self, x):
        return torch.softmax(self.predict(x), dim=-1)

    def set_threshold(self, t):
        self.threshold = t

    def get_threshold(self):
        return self.threshold


def n_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def big_mlp(target_bytes: int = 100 << 20) -> nn.Module:
    width = 1024
    per_layer = width * width * 4
    depth = max(1, math.ceil(target_bytes / per_layer))
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]).eval()
