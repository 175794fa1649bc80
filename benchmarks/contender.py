"""One contender, one process: starts its own Ray, runs the measurements of a plan, writes JSON.

Run by benchmarks/run.py (never by hand unless debugging):
    python benchmarks/contender.py --adapter ours-actor --plan PLAN.json --out OUT.json

The plan (JSON) holds the models and the figures to measure on each, and the repeat counts.
benchmarks/ must be on PYTHONPATH (run.py sets it) so that Ray workers import the same modules.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench_common as bc  # noqa: E402
import bench_models as bm  # noqa: E402
from contenders import get_adapter  # noqa: E402

import ray  # noqa: E402

P = time.perf_counter


def short(exc) -> str:
    """One line for an exception: its type and the last line that names an error."""
    import re
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    named = [ln for ln in lines if "Error" in ln or "error" in ln]
    line = (named[-1] if named else (lines[0] if lines else ""))[:240]
    return f"{type(exc).__name__}: {line}"


def log(msg):
    print(f"[{ADAPTER_NAME} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


ADAPTER_NAME = "?"


# --------------------------------------------------------------------------- actors


@ray.remote(num_cpus=0)
class Host:
    """An actor that loads a pipeline through the adapter and runs it."""

    def __init__(self, adapter_name):
        import bench_models  # noqa: F401  (imports paid before any timing)
        torch.set_num_threads(1)
        self.adapter = get_adapter(adapter_name)
        if self.adapter.kind == "actor":
            # import the library now, so that load() times only the load
            try:
                self.adapter.load  # noqa: B018
                mod = type(self.adapter).__module__
                if mod.endswith("ours") or mod.endswith("published"):
                    import ray_zerocopy  # noqa: F401
            except Exception:  # noqa: BLE001
                pass
        self.pipeline = None

    def pid(self):
        return os.getpid()

    def load(self, boxed, spec):
        t0 = P()
        pipeline = self.adapter.load(boxed[0], spec)
        dt = P() - t0
        self.pipeline = pipeline
        return dt

    def first_inference(self, spec):
        x = bm.make_input(spec)
        t0 = P()
        self.pipeline(x)
        return P() - t0

    def steady(self, spec, n):
        """Alternates the loaded pipeline and a private copy (a locally loaded model)."""
        x = bm.make_input(spec)
        with torch.no_grad():
            sd = {k: v.clone() for k, v in self.pipeline.model.state_dict().items()}
        local_model = bm.build_skeleton(spec)
        local_model.load_state_dict(sd, assign=True)
        local_model.tie()
        local = bm.Pipeline(local_model.eval())
        for _ in range(2):
            self.pipeline(x)
            local(x)
        shared_t, local_t = [], []
        for i in range(n):
            order = (self.pipeline, local) if i % 2 == 0 else (local, self.pipeline)
            for p in order:
                t0 = P()
                p(x)
                (shared_t if p is self.pipeline else local_t).append(P() - t0)
        same = torch.equal(self.pipeline(x), local(x))
        del local, local_model, sd
        gc.collect()
        return {"shared": shared_t, "local": local_t, "outputs_equal": bool(same)}

    def drop(self):
        self.pipeline = None
        gc.collect()
        return True


class DataInfer:
    """Ray Data callable class: loads through the adapter in its constructor."""

    def __init__(self, adapter_name, boxed, spec):
        torch.set_num_threads(1)
        self.spec = spec
        self.pipeline = get_adapter(adapter_name).load(boxed[0], spec) if boxed else None

    def __call__(self, batch):
        n = len(batch["id"])
        if self.pipeline is not None:
            self.pipeline(bm.make_input(self.spec, batch=n, seed=int(batch["id"][0])))
        return {"id": batch["id"]}


@ray.remote
def bare_task(x):
    return x


@ray.remote
def busy_task(x, seconds):
    """A bare task that spins for ``seconds`` before returning its input: Ray's own round trip
    for a task as long as the wrapped call's computation (longer than for an empty task)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return x


def start_actors(n):
    actors = [Host.remote(ADAPTER_NAME) for _ in range(n)]
    ray.get([a.__ray_ready__.remote() for a in actors])
    ray.get([a.pid.remote() for a in actors])
    return actors


def kill_actors(actors):
    for a in actors:
        ray.kill(a)
    time.sleep(0.5)


# --------------------------------------------------------------------------- figures


def do_wrap(adapter, pipeline, spec):
    """Figure 1: wrap time and the driver's peak extra RSS (VmHWM reset before)."""
    gc.collect()
    hwm_reset = bc.reset_hwm()
    rss0 = bc.status_kb("VmRSS")
    t0 = P()
    handle = adapter.wrap(pipeline, spec)
    dt = P() - t0
    peak = bc.status_kb("VmHWM") if hwm_reset else bc.status_kb("VmRSS")
    rss1 = bc.status_kb("VmRSS")
    return handle, {"seconds": dt, "peak_extra_rss": peak - rss0, "extra_rss_after": rss1 - rss0,
                    "hwm_reset": hwm_reset}


def release(adapter, handle):
    rel = getattr(adapter, "release", None)
    if rel:
        rel(handle)


def do_memory(adapter, actors, handle, spec, counts, baseline, model_nbytes, res):
    pids = baseline["pids"]
    """Figure 4: node PSS minus the baseline, with 1, 2, 4, 8 actors holding a loaded pipeline."""
    out, skipped = {}, list(res.pop("_capped", []))
    loaded = 0
    for n in counts:
        if n > len(actors):
            skipped.append(f"{n} actors: not started (memory)")
            continue
        need = (n - loaded) * (adapter.copies_per_actor * model_nbytes + 200 * 2**20)
        if bc.mem_available() - need < 2 * 2**30:
            skipped.append(f"{n} actors: needs about {need / 2**30:.1f} GiB more, "
                           f"{bc.mem_available() / 2**30:.1f} GiB available")
            break
        for a in actors[loaded:n]:
            ray.get(a.load.remote([handle], spec))
            ray.get(a.first_inference.remote(spec))  # touch the weights as a user would
        loaded = n
        extra = bc.settle_pss_of(pids) - baseline["pss"]
        extra_all = bc.node_pss() - baseline["pss_all"]
        out[str(n)] = {"extra_pss": extra, "models": extra / model_nbytes,
                       "extra_pss_all_ray_processes": extra_all}
        log(f"  memory {n} actors: +{extra / 2**20:,.0f} MiB = {extra / model_nbytes:.2f} models")
    res["memory"] = {"by_actors": out, "skipped": skipped}


def do_load(adapter, handle, spec, repeats, steady_n, res, with_steady):
    """Figures 2 and 5: load latency in a fresh actor, first and steady-state inference."""
    loads, firsts, steady = [], [], None
    # all fresh actors are started together and are ready before the first load is timed;
    # then each loads once, one after another (a new actor for every repeat)
    fresh = start_actors(repeats)
    for r, a in enumerate(fresh):
        loads.append(ray.get(a.load.remote([handle], spec)))
        firsts.append(ray.get(a.first_inference.remote(spec)))
        if with_steady and r == 0:
            steady = ray.get(a.steady.remote(spec, steady_n))
        ray.get(a.drop.remote())
    kill_actors(fresh)
    res["load"] = bc.summary(loads)
    res["first_inference"] = bc.summary(firsts)
    log(f"  load median {res['load']['median'] * 1e3:.1f} ms, first inference "
        f"{res['first_inference']['median'] * 1e3:.1f} ms")
    if steady:
        s, l_ = bc.summary(steady["shared"]), bc.summary(steady["local"])
        q1, q3 = bc.quartiles(steady["local"])
        diff = s["median"] - l_["median"]
        noise = max(q3 - q1, 0.05 * l_["median"])
        res["steady"] = {"loaded": s, "local": l_, "ratio": s["median"] / l_["median"],
                         "noise": noise, "within_noise": abs(diff) <= noise,
                         "outputs_equal": steady["outputs_equal"]}
        log(f"  steady {s['median'] * 1e3:.2f} ms vs local {l_['median'] * 1e3:.2f} ms")


def do_data(adapter, handle, spec, rows, batch, res):
    """Figure 6: Ray Data map_batches with 2 actors: rows/s and time to first batch."""
    import ray.data
    from ray.data import ActorPoolStrategy

    def run(boxed):
        ds = ray.data.range(rows, override_num_blocks=max(2, rows // batch))
        ds = ds.map_batches(DataInfer, fn_constructor_kwargs={
            "adapter_name": ADAPTER_NAME, "boxed": boxed, "spec": spec},
            compute=ActorPoolStrategy(size=2), batch_size=batch, num_cpus=0.5)
        t0 = P()
        it = iter(ds.iter_batches(batch_size=batch))
        first = next(it)
        ttfb = P() - t0
        n = len(first["id"])
        for b in it:
            n += len(b["id"])
        total = P() - t0
        return ttfb, total, n

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    run(None)  # warm-up: Ray Data's own start-up, no model
    ttfb, total, n = run([handle])
    res["data"] = {"rows": n, "batch_size": batch, "seconds": total, "rows_per_s": n / total,
                   "time_to_first_batch": ttfb}
    log(f"  data {n / total:.1f} rows/s, first batch {ttfb:.2f} s")


def do_task(adapter, handle, spec, pipeline, calls, res, per_block=5):
    """Figure 3: per-call overhead = wrapped call - same computation locally, vs a bare task.

    The four kinds (local computation, bare task, a bare task spinning as long as the local
    computation took, wrapped call) run in blocks of ``per_block``
    back-to-back calls, the blocks rotated over ``calls // per_block`` rounds (the first call of
    a block, after another kind, not timed), so that a drift of the machine's speed over the
    measurement hits them alike instead of biasing the difference. Then the same, half as
    many calls, with ``SPORADIC_PAUSE`` seconds of idle time before each call
    (``res["task_sporadic"]``)."""
    x = bm.make_input(spec)
    fn = adapter.task_callable(handle)
    for _ in range(2):
        pipeline(x)
    for _ in range(3):
        ray.get(bare_task.remote(x))
    t0 = P()
    out = fn(x)
    first = P() - t0
    equal = bool(torch.equal(out, pipeline(x)))
    for _ in range(2):
        fn(x)
    warm = []
    for _ in range(3):
        t0 = P()
        pipeline(x)
        warm.append(P() - t0)
    work = sorted(warm)[1]
    kinds = {"local": lambda: pipeline(x), "bare": lambda: ray.get(bare_task.remote(x)),
             "busy": lambda: ray.get(busy_task.remote(x, work)), "wrapped": lambda: fn(x)}
    res["task"] = _task_rounds(kinds, calls, per_block, 0.0)
    res["task"].update(first_call=first, outputs_equal=equal)
    # The same with SPORADIC_PAUSE seconds before each call (not timed): a worker serving
    # sporadic requests has that idle time between calls, back-to-back calls do not.
    res["task_sporadic"] = _task_rounds(kinds, max(per_block, calls // 2), per_block,
                                        SPORADIC_PAUSE)


#: Seconds between calls in figure 3's "calls apart" measurement.
SPORADIC_PAUSE = 0.05


def _task_rounds(kinds, calls, per_block, pause):
    times = {k: [] for k in kinds}
    order = list(kinds)
    for r in range(max(1, calls // per_block)):
        for k in order[r % len(order):] + order[:r % len(order)]:
            kinds[k]()
            for _ in range(per_block):
                if pause:
                    time.sleep(pause)
                t0 = P()
                kinds[k]()
                times[k].append(P() - t0)
    local, bare, wrapped = times["local"], times["bare"], times["wrapped"]
    lm = bc.summary(local)["median"]
    over = [w - lm for w in wrapped]
    bm_ = bc.summary(bare)["median"]
    out = {"local": bc.summary(local), "bare_task": bc.summary(bare),
           "wrapped": bc.summary(wrapped), "overhead": bc.summary(over),
           "overhead_vs_bare": bc.summary(over)["median"] / bm_, "pause": pause,
           # a bare task computing as long as the local computation took
           "busy_task": bc.summary(times["busy"])}
    out["beyond_busy"] = out["wrapped"]["median"] - out["busy_task"]["median"]
    log(f"  task{f' ({pause * 1e3:g} ms apart)' if pause else ''}: local {lm * 1e3:.2f} ms, "
        f"wrapped {bc.summary(wrapped)['median'] * 1e3:.2f} ms, bare {bm_ * 1e3:.2f} ms, "
        f"overhead/bare {out['overhead_vs_bare']:.2f}")
    return out


# --------------------------------------------------------------------------- main


def run_model(adapter, name, item, plan, out):
    spec = bm.MODELS[name]
    figs = set(item["figures"])
    only = plan.get("contender_figures", {}).get(adapter.name)
    if only is not None:  # a variant measured on a few figures only
        figs &= set(only)
    res = out["models"].setdefault(name, {"spec": spec, "errors": []})
    t_model = P()
    torch.manual_seed(0)
    model = bm.build(spec)
    nbytes, ntensors = bm.model_bytes(model)
    res.update(model_bytes=nbytes, n_tensors=ntensors, n_params=bm.n_params(model),
               build_seconds=P() - t_model)
    pipeline = bm.Pipeline(model)
    log(f"{name}: {nbytes / 2**20:,.0f} MiB, {ntensors} tensors, built in "
        f"{res['build_seconds']:.1f} s")
    actors = []
    counts = [c for c in item.get("actors", []) if "memory" in figs and adapter.kind == "actor"]
    cap = plan.get("copy_actor_cap")
    capped = []
    if cap and adapter.copies_per_actor:
        # Quick mode: contenders that copy the model per actor stop at `cap` actors (their
        # N+1 growth is plain by then; 8 copies cost minutes of this machine's two cores).
        capped = [f"{c} actors: skipped in this mode (copy_actor_cap={cap})" for c in counts if c > cap]
        counts = [c for c in counts if c <= cap]
    if capped:
        res["_capped"] = capped
    if counts:
        k = max(counts)
        # start only as many actors as can hold their copies (plain copies) with 2 GiB to spare
        per = adapter.copies_per_actor * nbytes + 200 * 2**20
        fit = int((bc.mem_available() - 2 * 2**30 - nbytes) // per)
        k = max(0, min(k, fit))
        actors = start_actors(k) if k else []
    gc.collect()
    pids = bc.core_pids() + (ray.get([a.pid.remote() for a in actors]) if actors else [])
    baseline = {"pids": pids, "pss": bc.settle_pss_of(pids), "pss_all": bc.node_pss()}
    try:
        handle, w = do_wrap(adapter, pipeline, spec)
    except Exception as exc:  # noqa: BLE001
        res["errors"].append(f"wrap: {short(exc)}")
        log(f"  wrap failed: {res['errors'][-1]}")
        kill_actors(actors)
        return
    w["first_in_process"] = not out.get("_wrapped_before")
    out["_wrapped_before"] = True
    res["wrap_first"] = w
    log(f"  wrap {w['seconds']:.2f} s, peak extra RSS {w['peak_extra_rss'] / 2**20:,.0f} MiB "
        f"({w['peak_extra_rss'] / nbytes:.2f} models)")
    steps = [("memory", lambda: do_memory(adapter, actors, handle, spec, counts, baseline,
                                          nbytes, res))]
    if adapter.kind == "actor":
        steps.append(("load", lambda: do_load(adapter, handle, spec, plan["load_repeats"],
                                              plan["steady_calls"], res,
                                              "inference" in figs)))
        steps.append(("data", lambda: do_data(adapter, handle, spec, plan["data_rows"],
                                              plan["data_batch"], res)))
    else:
        steps.append(("task", lambda: do_task(adapter, handle, spec, pipeline,
                                              plan["task_calls"], res)))
    for fig, fn in steps:
        if fig not in figs or (fig == "memory" and not counts):
            continue
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            res["errors"].append(f"{fig}: {short(exc)}")
            log(f"  {fig} failed: {res['errors'][-1]}")
            traceback.print_exc()
    kill_actors(actors)
    release(adapter, handle)
    del handle
    gc.collect()
    time.sleep(0.5)
    # more wraps, for the spread of the wrap time (pages of the store are reused now)
    times, peaks = [], []
    for _ in range(plan["wrap_repeats"]):
        try:
            h, w = do_wrap(adapter, pipeline, spec)
        except Exception as exc:  # noqa: BLE001
            res["errors"].append(f"wrap repeat: {short(exc)}")
            break
        times.append(w["seconds"])
        peaks.append(w["peak_extra_rss"])
        release(adapter, h)
        del h
        gc.collect()
    res["wrap_repeat"] = {"seconds": bc.summary(times), "peak_extra_rss": bc.summary(peaks)}
    res["seconds_total"] = P() - t_model
    del pipeline, model
    gc.collect()


def main():
    global ADAPTER_NAME
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    ADAPTER_NAME = args.adapter
    with open(args.plan) as f:
        plan = json.load(f)
    adapter = get_adapter(args.adapter)
    torch.set_num_threads(1)
    out = {"adapter": args.adapter, "kind": adapter.kind, "versions": bc.versions(),
           "machine": bc.machine_info(), "argv": sys.argv, "plan": plan, "models": {},
           "env": {k: os.environ.get(k) for k in ("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS",
                                                   "OMP_NUM_THREADS")}}
    if args.adapter == "ray-zerocopy-tensors":
        from contenders.ray_native import available
        if not available():
            out["skipped"] = "this Ray has no RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"
            bc.write_json(args.out, out)
            return
    store = int(plan["object_store_bytes"])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=store,
             logging_level="WARNING", log_to_driver=True)
    # The first ray.put of a process costs Ray about 29 MiB of driver RSS whatever its size
    # (measured: a 4 KiB put, 28.6 MiB; the next one, 0): Ray's own start-up, paid by every
    # contender alike. Pay it here so that figure 1's peak is the wrap's.
    ray.get(ray.put(np.zeros(4096, dtype=np.uint8)))
    try:
        import ray_zerocopy
        out["versions"]["ray_zerocopy_module"] = getattr(ray_zerocopy, "__version__", "?")
        out["versions"]["ray_zerocopy_path"] = os.path.dirname(ray_zerocopy.__file__)
    except Exception:  # noqa: BLE001
        pass
    t0 = P()
    for item in plan["models"]:
        if adapter.kind == "task" and "task" not in item["figures"] and "wrap" not in item["figures"]:
            continue
        if adapter.kind == "actor" and item.get("task_only"):
            continue
        try:
            run_model(adapter, item["model"], item, plan, out)
        except Exception as exc:  # noqa: BLE001
            out["models"].setdefault(item["model"], {"errors": []})["errors"].append(
                short(exc))
            traceback.print_exc()
        bc.write_json(args.out, out)
    out["seconds"] = P() - t0
    bc.write_json(args.out, out)
    ray.shutdown()


if __name__ == "__main__":
    main()
