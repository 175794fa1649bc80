"""How much a forward pass depends on where its weights sit within a memory page.

Zero-copy weights sit wherever Ray's object store placed the arena: the offset of every tensor
within a 4 KiB page follows from the object's address, which neither the wrapper nor the user
chooses. A private copy sits where the allocator put it. This script, in one process and
without Ray, runs the same model with its weights copied to one anonymous mapping at a chosen
offset within a page (every tensor starting at that offset), and with the weights where
``torch`` allocated them, the runs alternated over rounds (medians). A memory-bound model (a
stack of large ``Linear`` layers at batch 4) shows the spread this alone causes: a part of a
task call's ``call - local`` (benchmarks/task_overhead.py) that is not the call's overhead.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/placement_probe.py \
        [--model stack-200t-d1024] [--offsets 0,64,128,1024,1088,2048] [--rounds 6]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402  (standard library only)

HERE = bc.script_env()

import bench_models as bm  # noqa: E402
import torch  # noqa: E402

P = time.perf_counter
PAGE = 4096


def placed(spec, params, skew: int):
    """The model with a copy of ``params`` in one mapping, each tensor at ``skew`` in a page."""
    total = sum(p.numel() * p.element_size() + 2 * PAGE for p in params)
    buf = mmap.mmap(-1, total)
    base = torch.frombuffer(buf, dtype=torch.uint8)
    model = bm.build(spec).eval()
    off = 0
    with torch.no_grad():
        for p, q in zip(model.parameters(), params):
            n = q.numel() * q.element_size()
            start = off + skew
            t = base[start : start + n].view(q.dtype).view(q.shape)
            t.copy_(q)
            p.data = t
            off = (start + n + PAGE - 1) // PAGE * PAGE
    return model, buf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stack-200t-d1024")
    ap.add_argument("--offsets", default="0,64,128,1024,1088,2048")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("# OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(sys.argv))
    spec = bm.MODELS[args.model]
    torch.manual_seed(0)
    model = bm.build(spec).eval()
    x = bm.make_input(spec)
    params = [p.detach() for p in model.parameters()]
    offsets = sorted({p.data_ptr() % PAGE for p in params})
    print(f"{args.model}: torch's own allocation puts its {len(params)} tensors at "
          f"{len(offsets)} offsets within a page ({', '.join(map(str, offsets[:6]))}"
          f"{', ...' if len(offsets) > 6 else ''})")
    kinds = {"torch's allocation": (model, None)}
    for skew in (int(s) for s in args.offsets.split(",")):
        kinds[f"page + {skew}"] = placed(spec, params, skew)
    ref = model(x)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for k, (m, _) in kinds.items():
                assert torch.equal(m(x), ref), k
                for _ in range(3):
                    t0 = P()
                    m(x)
                    times[k].append(P() - t0)
    base_m = statistics.median(times["torch's allocation"])
    for k, v in times.items():
        m = statistics.median(v)
        print(f"  {k:20s} {m * 1e3:7.2f} ms (min {min(v) * 1e3:.2f})  {m / base_m:.2f}x")


if __name__ == "__main__":
    main()
