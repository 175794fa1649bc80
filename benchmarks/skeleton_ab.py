"""Packing and rebuilding a pipeline with the module reducer on and off, alternated in one process.

The skeleton pickler reduces every module of a plain type through ``_module_reduce`` (its empty
hook containers left out, its state set by the C ``_zc.module_state``; see ``ray_zerocopy.pack``).
This script measures what that buys, without Ray: for each model, the plan (walk, skeleton
pickle, layout: what a wrap does before the store's copy) and the rebuild of a fresh pipeline
from a mapped arena (what a task call does on a warm worker, ``ray_zerocopy.unpack.rebuild``),
each with the reducer on ("new") and off ("old", every module pickled the plain way), in
alternated rounds with the order swapped every round, so that the machine's drift hits both.
Both variants make their fresh tensors with ``_zc.fresh_tensors``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/skeleton_ab.py \\
        --models small-5000,resnet50,stack-200t-d1024,gpt2-medium --rounds 15   # about 1 minute
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import bench_models as bm  # noqa: E402

pack_mod = importlib.import_module("ray_zerocopy.pack")
unpack_mod = importlib.import_module("ray_zerocopy.unpack")
P = time.perf_counter


def _plain(t, table):  # the reducer off: every module type pickled the plain way
    return None


def measure(name: str, rounds: int) -> dict:
    spec = bm.MODELS[name]
    torch.manual_seed(0)
    pipeline = bm.Pipeline(bm.build(spec))
    on = pack_mod._module_keys_needed
    switch = {"new": on, "old": _plain}
    built = {}
    for v, fn in switch.items():
        pack_mod._module_keys_needed = fn
        packed = pack_mod.pack(pipeline)
        built[v] = (packed.skeleton, unpack_mod.LoadedArena(packed.arena))
    plan = {"old": [], "new": []}
    rebuild = {"old": [], "new": []}
    try:
        for r in range(rounds):
            for v in ("old", "new") if r % 2 else ("new", "old"):
                pack_mod._module_keys_needed = switch[v]
                t0 = P()
                pack_mod._plan(pipeline)
                plan[v].append(P() - t0)
                skeleton, loaded = built[v]
                gc.collect()
                t0 = P()
                fresh = unpack_mod.rebuild(skeleton, loaded)
                rebuild[v].append(P() - t0)
                del fresh
    finally:
        pack_mod._module_keys_needed = on
    x = bm.make_input(spec)
    with torch.no_grad():  # both skeletons rebuild a pipeline that computes what the model does
        want = pipeline(x)
        for skeleton, loaded in built.values():
            assert torch.equal(unpack_mod.rebuild(skeleton, loaded)(x), want)
    m = statistics.median
    return {
        "tensors": len(built["new"][1].views),
        "skeleton_bytes": {v: len(built[v][0]) for v in built},
        "plan_ms": {v: m(plan[v]) * 1e3 for v in plan},
        "rebuild_ms": {v: m(rebuild[v]) * 1e3 for v in rebuild},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small-5000,resnet50,stack-200t-d1024,gpt2-medium")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    print(f"# {' '.join(sys.argv)}; torch {torch.__version__}, {os.cpu_count()} CPUs")
    print("| model | tensors | skeleton old -> new | plan old / new (ms) | new / old "
          "| rebuild old / new (ms) | new / old |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        r = measure(name, args.rounds)
        sk, pl, rb = r["skeleton_bytes"], r["plan_ms"], r["rebuild_ms"]
        print(f"| {name} | {r['tensors']:,} | {sk['old']:,} -> {sk['new']:,} B "
              f"| {pl['old']:.1f} / {pl['new']:.1f} | {pl['new'] / pl['old']:.2f}x "
              f"| {rb['old']:.2f} / {rb['new']:.2f} | {rb['new'] / rb['old']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
