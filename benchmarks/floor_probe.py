"""What a pipeline nobody has used costs, per task call, against the interpreter's own floor.

Issue 12's isolation rule gives every task call a pipeline nobody has used before. Back to back
a worker has no idle time to build it in (benchmarks/spare_probe.py), so the rebuild and the
freeing of the used pipeline are interpreter-lock time on the call's path. This script, in one
process and without Ray, measures for each model (medians over ``--repeats``):

- ``rebuild``: ``ray_zerocopy.unpack.rebuild`` over a mapped arena, as a worker does it
  (``_worker._fresh``: gc paused, the young generations collected first, the new objects moved
  to the oldest generation), split into
  ``fresh tensors`` (``LoadedArena.objects``, one C loop) and the skeleton's unpickle (the
  rest);
- ``free``: dropping the used pipeline (what the worker's builder thread does after a call);
- ``cycle check``: the weak references the builder takes before some of those releases, to
  see whether a reference cycle outlives it (``_worker._weak_refs``; 3 of the first 4 and
  every 16th release of an arena);
- what was made: the new objects the collector tracks (modules, their dicts, tensors) and, of
  those, the ``OrderedDict`` s;
- the floor: creating and then freeing as many empty ``OrderedDict`` s and (separately)
  ``nn.Parameter`` objects over the same views as there are tensors, with the cheapest calls
  CPython and torch offer (a C-level ``OrderedDict()`` per object;
  ``Tensor._make_subclass``, which ``fresh_tensors`` also uses). A rebuild that makes the
  same objects cannot cost much less than this.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/floor_probe.py \
        [--models small-5000,stack-200t-d1024,resnet50] [--repeats 30]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402  (standard library only)

HERE = bc.script_env()

import bench_models as bm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

P = time.perf_counter


def med_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def probe(name: str, repeats: int) -> None:
    from ray_zerocopy import pack
    from ray_zerocopy._worker import _built_old, _weak_refs
    from ray_zerocopy.unpack import LoadedArena, _gc_paused, rebuild

    spec = bm.MODELS[name]
    torch.manual_seed(0)
    skeleton, arena = pack(bm.Pipeline(bm.build(spec)))
    loaded = LoadedArena(arena, protect=True)
    n_tensors = len(loaded.views)

    def fresh():
        with _built_old(True):
            return rebuild(skeleton, loaded)

    # What one rebuild makes (objects the collector tracks, kept alive by the pipeline).
    gc.collect()
    before = gc.get_objects()
    ids = {id(o) for o in before}
    del before
    keep = fresh()
    made = [o for o in gc.get_objects() if id(o) not in ids]
    n_made = len(made)
    n_odict = sum(type(o) is OrderedDict for o in made)
    del made, keep, ids
    gc.collect()

    rebuild_t, objects_t, free_t, odict_t, odict_free_t, param_t, param_free_t, check_t = (
        [] for _ in range(8))
    views = loaded.views
    make = torch.Tensor._make_subclass
    for _ in range(repeats):
        t0 = P()
        p = fresh()
        rebuild_t.append(P() - t0)
        with _gc_paused():
            t0 = P()
            refs = _weak_refs(p)
            check_t.append(P() - t0)
            del refs
            t0 = P()
            del p
            free_t.append(P() - t0)
            t0 = P()
            objs = loaded.objects()
            objects_t.append(P() - t0)
            del objs
            # The floor: as many empty OrderedDicts as the rebuild made containers ...
            t0 = P()
            ods = [OrderedDict() for _ in range(n_made)]
            odict_t.append(P() - t0)
            t0 = P()
            del ods
            odict_free_t.append(P() - t0)
            # ... and one Parameter object per tensor, the cheapest way torch offers.
            t0 = P()
            ps = [make(nn.Parameter, v, False) for v in views]
            param_t.append(P() - t0)
            t0 = P()
            del ps
            param_free_t.append(P() - t0)
    r, o, f = med_ms(rebuild_t), med_ms(objects_t), med_ms(free_t)
    floor_make = med_ms(odict_t) + med_ms(param_t)
    floor_free = med_ms(odict_free_t) + med_ms(param_free_t)
    print(f"\n{name}: {n_tensors} tensors; a rebuild makes {n_made} tracked objects "
          f"({n_odict} OrderedDicts, {n_made / max(1, n_tensors):.1f} per tensor)")
    print(f"  rebuild         {r:7.2f} ms  (fresh tensors {o:.2f} ms, unpickle {r - o:.2f} ms)")
    print(f"  free            {f:7.2f} ms")
    print(f"  cycle check     {med_ms(check_t):7.2f} ms (some releases only)")
    print(f"  per call        {r + f:7.2f} ms of interpreter time")
    print(f"  floor: {n_made} empty OrderedDicts {med_ms(odict_t):.2f} ms + {n_tensors} "
          f"Parameters {med_ms(param_t):.2f} ms = {floor_make:.2f} ms to make, "
          f"{floor_free:.2f} ms to free: {floor_make + floor_free:.2f} ms "
          f"({(r + f) / (floor_make + floor_free):.2f}x of it)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small-5000,stack-200t-d1024,resnet50")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("# OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(sys.argv))
    for name in args.models.split(","):
        probe(name, args.repeats)


if __name__ == "__main__":
    main()
