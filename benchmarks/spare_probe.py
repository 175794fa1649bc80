"""Why a spare pipeline does not help task calls that come faster than a rebuild.

Calls a ``TaskWrapper`` back to back (or ``--pause`` seconds apart) three ways, the runs
alternated: spares built after every call (the behaviour before commit 490501d, forced in the
worker), the default (no spare while calls come faster than a rebuild:
``ray_zerocopy._worker._spare_in_time``), and ``RAY_ZEROCOPY_SPARE=0``. For each it prints,
medians over the calls:

- ``call``: the round trip seen by the driver;
- ``forward``: the thread CPU time of the pipeline's forward pass inside the worker;
- ``after build``: for calls that took a spare, the time from the end of its build to the
  call's start in the worker (Ray cannot start a task while the builder holds the interpreter
  lock, so back to back this is small: the call waited for the whole build);
- how many calls took a spare.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/spare_probe.py [--model small-5000]
        [--calls 30] [--rounds 2] [--pause 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402  (standard library only)

HERE = bc.script_env()

import bench_models as bm  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

P = time.perf_counter


class Probed:
    """The benchmark pipeline, returning what the worker saw of the call."""

    def __init__(self, pipeline, always_spare: bool):
        self.pipeline = pipeline
        self.always_spare = always_spare

    def __call__(self, x):
        from ray_zerocopy import _worker

        start = time.monotonic()
        original = _worker.__dict__.setdefault("_probe_policy", _worker._spare_in_time)
        # The policy before 490501d: a spare after every call.
        _worker._spare_in_time = (lambda entry: True) if self.always_spare else original
        entry = next(reversed(_worker._cache.values()))  # the arena this call used
        c0 = time.thread_time()
        self.pipeline(x)
        forward = time.thread_time() - c0
        return forward, start - entry.built_at, entry.taken


def run(kind: str, pipeline, x, calls: int, pause: float) -> dict:
    from ray_zerocopy import TaskWrapper

    # Workers of their own for each kind (a runtime_env's variables start a separate pool), so
    # that no kind inherits another's cached arenas, spares or heap.
    env_vars = {"RAY_ZEROCOPY_PROBE": kind}
    if kind == "off":
        env_vars["RAY_ZEROCOPY_SPARE"] = "0"
    wrapped = TaskWrapper(Probed(pipeline, kind == "always"), runtime_env={"env_vars": env_vars})
    for _ in range(3):
        wrapped(x)
    rows = []
    for _ in range(calls):
        if pause:
            time.sleep(pause)
        t0 = P()
        forward, after_build, taken = wrapped(x)
        rows.append((P() - t0, forward, after_build, taken))
    took = [r for prev, r in zip(rows, rows[1:]) if r[3] > prev[3]]
    return {"call": statistics.median(r[0] for r in rows),
            "forward": statistics.median(r[1] for r in rows),
            "after_build": statistics.median(r[2] for r in took) if took else None,
            "spares": len(took), "calls": len(rows) - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small-5000")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pause", type=float, default=0.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = bm.MODELS[args.model]
    torch.manual_seed(0)
    pipeline = bm.Pipeline(bm.build(spec))
    x = bm.make_input(spec)
    store = max(bm.model_bytes(pipeline.model)[0] * 4, 256 << 20)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=store,
             configure_logging=False)
    print("# OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(sys.argv))
    local = []
    for _ in range(10):
        c0 = time.thread_time()
        pipeline(x)
        local.append(time.thread_time() - c0)
    print(f"{args.model}: forward in the driver {statistics.median(local) * 1e3:.1f} ms "
          "(thread CPU time)")
    for r in range(args.rounds):
        for kind in ("always", "default", "off"):
            res = run(kind, pipeline, x, args.calls, args.pause)
            ab = res["after_build"]
            print(f"  round {r + 1} {kind:8s} call {res['call'] * 1e3:6.1f} ms, forward "
                  f"{res['forward'] * 1e3:5.1f} ms, spares {res['spares']}/{res['calls']}"
                  + (f", start after build {ab * 1e3:.2f} ms" if ab is not None else ""),
                  flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
