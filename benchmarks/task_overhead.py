"""Per-call overhead of a TaskWrapper call against a bare Ray task, and where it goes.

A small, rerunnable companion to figure 3 of ``benchmarks/run.py`` (which the full benchmark
reports): the same models, the same definition (wrapped call minus the same computation done
locally, divided by a bare ``ray.get(f.remote(x))`` round trip), the calls of each kind back to
back as there, in blocks rotated over several rounds so that a drifting machine load hits every
kind alike. Also ``call - in worker``: the round trip minus the time the method took inside
the worker, measured in the same call, which leaves out the spread of the computation itself
(on a shared 2-vCPU machine it is far larger than the overhead).
Also prints the worker-side cost of getting a fresh pipeline (``--breakdown``) and, with
``--profile``, a cProfile of that step inside a worker.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/task_overhead.py \
        [--models small-5000,stack-200t-d512,resnet50] [--calls 60] [--block 10] \
        [--compare] [--breakdown] [--profile] [--pause SECONDS]
"""

from __future__ import annotations

import argparse
import os
import platform
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


@ray.remote
def bare_task(x):
    return x


@ray.remote
def busy_task(x, seconds):
    """A bare task that computes for ``seconds`` (spinning) before returning its input: Ray's
    own round trip for a task as long as the wrapped call (longer than for an empty task)."""
    t0 = P()
    end = t0 + seconds
    while P() < end:
        pass
    return x, P() - t0


@ray.remote
def rebuild_each_call(box, method, *args):
    """A task call as it was before spare pipelines: the skeleton is unpickled on the critical
    path of every call (``--compare``)."""
    from ray_zerocopy import _worker

    return getattr(_worker.load_pipeline(box[0]), method)(*args)


@ray.remote
def worker_breakdown(box, repeats: int, profile: bool):
    """Times, inside a worker, what a task call does besides running the method."""
    import cProfile
    import io
    import pstats

    from ray_zerocopy import _worker

    ref = box[0]
    _worker.load_pipeline(ref)  # maps the arena (first call), then cached
    times = []
    for _ in range(repeats):
        t0 = P()
        _worker.load_pipeline(ref)
        times.append(P() - t0)
        time.sleep(0.01)  # as between calls: lets any work deferred to the idle time run
    text = ""
    if profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(repeats):
            _worker.load_pipeline(ref)
            pr.disable()
            time.sleep(0.01)
            pr.enable()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(12)
        text = s.getvalue()
    return times, text


class Timed:
    """The benchmark pipeline, also returning how long the call took inside the worker, so
    that the overhead of a call is measured without the (much larger, noisier) spread of the
    computation: overhead = round trip - time inside."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __call__(self, x):
        t0 = P()
        y = self.pipeline(x)
        return y, P() - t0


def summary(xs):
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) >= 4 else [xs[0], xs[len(xs) // 2], xs[-1]]
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q[0], "q3": q[2]}


def fmt(s, scale=1e3, unit="ms"):
    return (f"{s['median'] * scale:7.2f} {unit} (min {s['min'] * scale:.2f}, "
            f"IQR {s['q1'] * scale:.2f}-{s['q3'] * scale:.2f}, max {s['max'] * scale:.2f})")


def run_model(name: str, calls: int, per_block: int, breakdown: bool, profile: bool,
              compare: bool, pause: float = 0.0) -> dict:
    from ray_zerocopy import TaskWrapper

    spec = bm.MODELS[name]
    torch.manual_seed(0)
    pipeline = bm.Pipeline(bm.build(spec))
    x = bm.make_input(spec)
    wrapped = TaskWrapper(Timed(pipeline))
    for _ in range(3):  # warm-up: workers started, arena mapped, caches filled
        wrapped(x)
        ray.get(bare_task.remote(x))
        pipeline(x)
    assert torch.equal(wrapped(x)[0], pipeline(x))
    work = statistics.median(wrapped(x)[1] for _ in range(5))

    def busy():
        t0 = P()
        _, t_in = ray.get(busy_task.remote(x, work))
        return P() - t0 - t_in

    def call():
        t0 = P()
        _, t_in = wrapped(x)
        return P() - t0 - t_in  # the round trip without the time inside the worker

    fns = {"local": lambda: pipeline(x), "bare": lambda: ray.get(bare_task.remote(x)),
           "busy": busy, "call": call}
    if compare:
        # The same pipeline wrapped again (its own arena, so no spare pipelines), called as
        # before spare pipelines existed.
        other = TaskWrapper(Timed(pipeline))
        box = [other.object_ref]
        def call_other():
            t0 = P()
            _, t_in = ray.get(rebuild_each_call.remote(box, "__call__", x))
            return P() - t0 - t_in

        fns["rebuild-each-call"] = call_other
        for _ in range(3):
            fns["rebuild-each-call"]()
    times: dict[str, list[float]] = {k: [] for k in fns}
    direct: dict[str, list[float]] = {k: [] for k in fns}
    # As benchmarks/run.py does: each kind back to back (a worker gets no more idle time
    # between wrapped calls than the round trip leaves it), in blocks of `per_block`, the
    # blocks rotated over `calls // per_block` rounds so that a drifting machine load hits
    # every kind alike.
    labels = list(fns)
    for r in range(max(1, calls // per_block)):
        k = r % len(labels)
        for label in labels[k:] + labels[:k]:
            fns[label]()  # first of a block: after another kind, not timed
            for _ in range(per_block):
                if pause:  # calls apart, as a worker serving sporadic requests sees them
                    time.sleep(pause)
                t0 = P()
                d = fns[label]()
                times[label].append(P() - t0)
                if d is not None:
                    direct[label].append(d)
    lm = statistics.median(times["local"])
    res = {k: summary(v) for k, v in times.items()}
    _, n = bm.model_bytes(pipeline.model)
    print(f"\n{name} ({n} tensors)" + (f", {pause * 1e3:g} ms between calls" if pause else ""))
    print(f"  local     {fmt(res['local'])}")
    print(f"  bare task {fmt(res['bare'])}")
    busy_rt = summary(direct["busy"])
    print(f"  bare task computing {work * 1e3:.1f} ms: round trip - computing {fmt(busy_rt)}")
    bare_m = res["bare"]["median"]
    for label in labels[3:]:
        over = summary([c - lm for c in times[label]])
        own = summary(direct[label])
        res[label + " overhead"] = over
        res[label + " overhead direct"] = own
        pad = " " * len(label)
        print(f"  {label}: call {fmt(res[label])}")
        print(f"  {pad}  call - local     {fmt(over)}  -> {over['median'] / bare_m:.2f}x bare")
        print(f"  {pad}  call - in worker {fmt(own)}  -> {own['median'] / bare_m:.2f}x bare; "
              f"{(own['median'] - busy_rt['median']) * 1e3:+.2f} ms over the computing task")
    if breakdown or profile:
        times, text = ray.get(worker_breakdown.remote([wrapped.object_ref], 20, profile))
        print("  in the worker, fresh pipeline (load_pipeline, cached arena): "
              f"{fmt(summary(times))}")
        if text:
            print(text)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small-5000,stack-200t-d512,resnet50")
    ap.add_argument("--calls", type=int, default=60, help="timed calls of each kind")
    ap.add_argument("--block", type=int, default=10, help="calls of one kind back to back")
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--compare", action="store_true",
                    help="also time calls that unpickle the skeleton on every call")
    ap.add_argument("--pause", type=float, default=0.0,
                    help="seconds between calls (not timed; default: back to back)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = args.models.split(",")
    store = max(bm.model_bytes(bm.build_skeleton(bm.MODELS[n]))[0] for n in names)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=max(store * 3, 256 << 20),
             configure_logging=False)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}")
    print("# " + " ".join(["OMP_NUM_THREADS=1", ".venv/bin/python"] + sys.argv))
    for name in names:
        run_model(name, args.calls, args.block, args.breakdown, args.profile, args.compare,
                  args.pause)
    ray.shutdown()


if __name__ == "__main__":
    main()
