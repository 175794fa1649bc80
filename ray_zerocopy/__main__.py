"""Command line: ``python -m ray_zerocopy {demo,inspect}``.

``demo`` runs the main job on an embedded local Ray: a GPT-2-shaped model built in code,
a few TaskWrapper calls, a Ray Data ``map_batches`` run with 2 actors sharing the weights,
and the figures (wrap time, load time in a worker, node memory against per-actor copies).
``inspect FILE`` validates an arena file (ray_zerocopy.save) or a bare arena and prints its
header and tensors.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _gpt2(size: str):
    import torch
    from torch import nn

    dims = {"tiny": (2048, 128, 2, 4), "small": (16384, 512, 6, 8), "gpt2": (50257, 768, 12, 12)}
    vocab, d, layers, heads = dims[size]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
            self.ln_2 = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x):
            h = self.ln_1(x)
            t = x.shape[1]
            mask = torch.full((t, t), float("-inf")).triu(1)
            x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
            return x + self.mlp(self.ln_2(x))

    class GPT2(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(vocab, d)
            self.wpe = nn.Embedding(1024, d)
            self.h = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f = nn.LayerNorm(d)
            self.lm_head = nn.Linear(d, vocab, bias=False)
            self.lm_head.weight = self.wte.weight

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for b in self.h:
                x = b(x)
            return self.lm_head(self.ln_f(x))

    class NextToken:
        """A pipeline: a GPT-2-shaped model plus settings."""

        def __init__(self):
            torch.manual_seed(0)
            self.model = GPT2().eval()
            self.temperature = 1.0

        def __call__(self, idx):
            with torch.inference_mode():
                return self.model(idx)[:, -1].argmax(-1)

        def next_tokens(self, batch):
            idx = torch.as_tensor(batch["tokens"])
            return {"next": self(idx).numpy()}

    return NextToken()


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging

    import numpy as np
    import ray
    import torch

    from . import ActorWrapper, TaskWrapper
    from .memory import node_pss
    from .pack import find_modules

    torch.set_num_threads(1)
    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        pipeline = _gpt2(args.size)
        model_bytes = sum(p.numel() * p.element_size() for p in pipeline.model.parameters())
        print(
            f"model: GPT-2-shaped '{args.size}', {len(list(find_modules(pipeline)))} modules, "
            f"{sum(p.numel() for p in pipeline.model.parameters()) / 1e6:.1f}M parameters, "
            f"{_mib(model_bytes)} (tied lm_head/wte stored once)"
        )

        idx = torch.randint(0, 1000, (2, 16))
        local = pipeline(idx)

        wrapped = TaskWrapper(pipeline)
        print(f"TaskWrapper: wrapped in {wrapped.wrap_seconds:.3f} s")
        t0 = time.perf_counter()
        out = wrapped(idx)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        refs = [wrapped.remote(idx) for _ in range(4)]
        outs = ray.get(refs)
        par = time.perf_counter() - t0
        ok = torch.equal(out, local) and all(torch.equal(o, local) for o in outs)
        print(
            f"  wrapped(idx) -> {out.tolist()} (first call {first * 1e3:.0f} ms, starting a "
            f"worker process included; "
            f"4 parallel calls {par * 1e3:.0f} ms); equal to local: {ok}"
        )

        @ray.remote(num_cpus=0)
        class Holder:
            def __init__(self):
                torch.set_num_threads(1)

            def load_shared(self, w):
                self.p = w.load()
                return self.p(idx), w.load_seconds

            def load_copy(self, box):
                t0 = time.perf_counter()
                self.p = ray.get(box[0])  # plain Ray: the tensors are copied into this process
                return self.p(idx), time.perf_counter() - t0

        def node_growth(load):
            # mypy ignores class decorators: it does not see that @ray.remote made an ActorClass.
            actors = [Holder.remote() for _ in range(2)]  # type: ignore[attr-defined]
            ray.get([a.__ray_ready__.remote() for a in actors])
            before = node_pss()
            results = load(actors)
            grown = node_pss() - before
            for a in actors:
                ray.kill(a)
            return grown, results

        def shared(actors):
            w = ActorWrapper(pipeline)  # the put is measured too
            return ray.get([a.load_shared.remote(w) for a in actors])

        grown, res = node_growth(shared)
        print(
            "ActorWrapper, 2 actors: load in the actor "
            f"{', '.join(f'{r[1] * 1e3:.1f} ms' for r in res)}; "
            f"node memory (PSS over Ray's processes) grew {_mib(grown)} "
            f"(= {grown / model_bytes:.2f} models, the object in the store included)"
        )
        grown_plain, res = node_growth(
            lambda actors: ray.get([a.load_copy.remote([ray.put(pipeline)]) for a in actors])
        )
        print(
            f"plain ray.put(pipeline), 2 actors: ray.get in the actor "
            f"{', '.join(f'{r[1] * 1e3:.1f} ms' for r in res)}; node memory grew "
            f"{_mib(grown_plain)} (= {grown_plain / model_bytes:.2f} models, "
            "the object in the store included)"
        )
        aw = ActorWrapper(pipeline)

        class InferenceActor:
            def __init__(self, actor_wrapper):
                self.pipeline = actor_wrapper.load()

            def __call__(self, batch):
                return self.pipeline.next_tokens(batch)

        rows = args.rows
        ds = ray.data.from_items([{"tokens": np.random.randint(0, 1000, 16)} for _ in range(rows)])
        t0 = time.perf_counter()
        result = ds.map_batches(
            InferenceActor,
            fn_constructor_kwargs={"actor_wrapper": aw},
            compute=ray.data.ActorPoolStrategy(size=2),
            batch_size=16,
            num_cpus=0.5,
        ).take_all()
        dt = time.perf_counter() - t0
        print(
            f"Ray Data map_batches, 2 actors sharing the weights: {len(result)} rows in "
            f"{dt:.2f} s ({len(result) / dt:.0f} rows/s); first: {result[0]['next']}"
        )
        return 0 if ok and len(result) == rows else 1
    finally:
        ray.shutdown()


def inspect_cmd(args: argparse.Namespace) -> int:
    import numpy as np

    from . import _zc
    from .errors import ArenaError
    from .files import ArenaFile

    with open(args.file, "rb") as f:
        magic = f.read(8)
    arena: memoryview | np.ndarray
    try:
        if magic == b"RZCAFILE":  # an arena file: header, metadata, skeleton, arena
            af = ArenaFile(args.file)
            arena, info, fi = af.arena, af.arena_info, af.info
            if args.verify:
                af.verify()
        else:  # a bare arena
            fi = None
            arena = np.fromfile(args.file, dtype=np.uint8)
            info = _zc.parse(arena)
            if args.verify:
                _zc.verify_data(arena)
    except ArenaError as exc:
        where = "" if str(exc).startswith(args.file) else f"{args.file}: "
        print(f"{where}invalid: {exc}" if where else f"invalid: {exc}", file=sys.stderr)
        return 1
    if fi is not None:
        print(
            f"{args.file}: arena file v{fi['version']}, {fi['file_size']:,} bytes; pipeline "
            f"{af.meta.get('module', '?')}.{af.meta.get('class', '?')}, skeleton "
            f"{fi['skeleton_size']:,} bytes (a pickle: trusted input only), arena at "
            f"{fi['arena_offset']:,}"
        )
        methods = [
            m for m in af.meta.get("methods", ()) if m == "__call__" or m in _own_methods(af)
        ]
        if methods:
            print(f"  methods: {', '.join(methods)}")
    crc = (
        "data CRC32C ok"
        if args.verify
        else "no data CRC32C"
        if info["flags"] & _zc.FLAG_NO_DATA_CRC
        else f"data CRC32C {info['data_crc']:#010x} (check with --verify)"
    )
    print(
        f"{'  ' if fi else args.file + ': '}arena v{info['version']}, {len(info['storages'])} "
        f"storages, {len(info['tensors'])} tensors, data {info['data_size']:,} bytes at "
        f"{info['data_offset']:,}; {crc}"
    )
    for t in info["tensors"][: args.limit]:
        name, sidx, dt, shape, stride, soff, kind, flags, boff = t
        print(
            f"  {name:50s} {_zc.dtype_name(dt):10s} {list(shape)} stride {list(stride)} "
            f"storage {sidx}+{soff}"
        )
    if len(info["tensors"]) > args.limit:
        print(f"  ... {len(info['tensors']) - args.limit} more (--limit)")
    return 0


def _own_methods(af) -> set[str]:
    """Method names other than torch.nn.Module's own (those are listed for every module)."""
    from torch import nn

    return {m for m in af.meta.get("methods", ()) if not hasattr(nn.Module, m)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ray_zerocopy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the main job on a local Ray")
    d.add_argument("--size", choices=["tiny", "small", "gpt2"], default="small")
    d.add_argument("--rows", type=int, default=256)
    d.set_defaults(fn=demo)
    i = sub.add_parser("inspect", help="validate an arena or arena file and list its tensors")
    i.add_argument("file")
    i.add_argument("--verify", action="store_true", help="also check the data CRC32C")
    i.add_argument("--limit", type=int, default=50)
    i.set_defaults(fn=inspect_cmd)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
