"""Side-by-side benchmarks: ray_zerocopy against the published library, Ray's own zero-copy
torch tensors and plain copies. Each contender runs in its own process (the published library in
its own venv, bench-venv/), one after another; this script collects their JSON, computes every
contender's ratio against ours, checks the targets, and writes docs/benchmarks.md and the plots.

    make bench-quick        # python benchmarks/run.py --mode quick   (under 10 minutes here)
    make bench              # python benchmarks/run.py --mode full

Options: --only a,b (subset of contenders), --no-docs (JSON only), --results DIR,
--no-checkpoint (skip the 'From checkpoint' section, benchmarks/checkpoint_bench.py, which runs
after the main contenders, also with --only, and is appended to docs/benchmarks.md),
--no-alternated (skip the section of benchmarks/wrap_alternated.py, ours and Ray's wrap
alternated in one process, appended before it).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import bench_common as bc  # noqa: E402
import bench_models as bm  # noqa: E402

OURS_PY = os.path.join(ROOT, ".venv", "bin", "python")
PUB_PY = os.path.join(ROOT, "bench-venv", "bin", "python")

CONTENDERS = [  # name, python, extra env
    ("ours-actor", OURS_PY, {}),
    ("ours-task", OURS_PY, {}),
    ("ours-actor-fastload", OURS_PY, {}),
    ("published-actor", PUB_PY, {}),
    ("published-task", PUB_PY, {}),
    ("ray-zerocopy-tensors", OURS_PY, {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}),
    ("plain-put", OURS_PY, {}),
    ("plain-file", OURS_PY, {}),
]
LABELS = {
    "ours-actor": "ours: ActorWrapper",
    "ours-task": "ours: TaskWrapper",
    "ours-actor-fastload": "ours: ActorWrapper, use_fast_load=True",
    "published-actor": "ray-zerocopy 0.2.0: ModelWrapper actor",
    "published-task": "ray-zerocopy 0.2.0: ModelWrapper task",
    "ray-zerocopy-tensors": "Ray: RAY_ENABLE_ZERO_COPY_TORCH_TENSORS",
    "plain-put": "plain: ray.put(model)",
    "plain-file": "plain: torch.load(file)",
}
ALL_FIGS = ["wrap", "memory", "load", "inference", "data", "task"]

PLANS = {
    "quick": {
        "models": [
            {"model": "gpt2-medium", "figures": ALL_FIGS, "actors": [1, 2, 4, 8]},
            {"model": "stack-200t-d512", "figures": ["wrap", "load", "task"]},
            {"model": "stack-200t-d1024", "figures": ["wrap", "load"]},
        ],
        "main": "gpt2-medium", "bytes_pair": ["stack-200t-d512", "stack-200t-d1024"],
        "load_repeats": 3, "steady_calls": 3, "wrap_repeats": 1, "task_calls": 10,
        "data_rows": 16, "data_batch": 8, "copy_actor_cap": 4,
        "contender_figures": {"ours-actor-fastload": ["load", "inference"]},
        "checkpoint_models": ["gpt2-small"],
    },
    "smoke": {  # a fast check of the harness itself, not a benchmark
        "models": [
            {"model": "stack-200t-d512", "figures": ALL_FIGS, "actors": [1, 2]},
            {"model": "stack-200t-d1024", "figures": ["wrap", "load"]},
        ],
        "main": "stack-200t-d512", "bytes_pair": ["stack-200t-d512", "stack-200t-d1024"],
        "load_repeats": 2, "steady_calls": 4, "wrap_repeats": 1, "task_calls": 5,
        "data_rows": 16, "data_batch": 8,
        "contender_figures": {"ours-actor-fastload": ["load", "inference"]},
        "checkpoint_models": ["stack-200t-d512"],
    },
    # The figures the open issues are judged on (one-copy wrap, task overhead), in about a third
    # of the full run's time; one process per contender and model, as in full.
    "focus": {
        "models": [
            {"model": "gpt2-medium", "figures": ["wrap", "memory", "load", "task"],
             "actors": [1, 4]},
            {"model": "resnet50", "figures": ["wrap", "task"]},
            {"model": "small-5000", "figures": ["wrap", "load", "task"]},
            {"model": "gpt-1.3b-bf16", "figures": ["wrap", "load"]},
            {"model": "stack-200t-d1024", "figures": ["wrap", "load", "task"]},
            {"model": "stack-200t-d2048", "figures": ["wrap", "load"]},
        ],
        "main": "gpt2-medium", "bytes_pair": ["stack-200t-d1024", "stack-200t-d2048"],
        "load_repeats": 5, "steady_calls": 5, "wrap_repeats": 4, "task_calls": 30,
        "data_rows": 16, "data_batch": 8, "copy_actor_cap": 4,
        "contender_figures": {"ours-actor-fastload": ["load"]},
        "checkpoint_models": ["gpt2-medium", "gpt-1.3b-bf16", "gpt2-medium@bf16"],
    },
    "full": {
        "models": [
            {"model": "gpt2-medium", "figures": ALL_FIGS, "actors": [1, 2, 4, 8]},
            {"model": "resnet50", "figures": ["wrap", "memory", "load", "inference", "task"],
             "actors": [1, 2, 4, 8]},
            {"model": "small-5000", "figures": ["wrap", "memory", "load", "inference", "task"],
             "actors": [1, 2, 4, 8]},
            {"model": "gpt-1.3b-bf16", "figures": ["wrap", "memory", "load", "inference", "task"],
             "actors": [1, 2, 4, 8]},
            {"model": "stack-200t-d1024", "figures": ["wrap", "load", "task"]},
            {"model": "stack-200t-d2048", "figures": ["wrap", "load"]},
        ],
        "main": "gpt2-medium", "bytes_pair": ["stack-200t-d1024", "stack-200t-d2048"],
        "load_repeats": 7, "steady_calls": 20, "wrap_repeats": 4, "task_calls": 30,
        "data_rows": 128, "data_batch": 8,
        "contender_figures": {"ours-actor-fastload": ["load", "inference"]},
        "checkpoint_models": ["gpt2-medium", "gpt-1.3b-bf16", "gpt2-medium@bf16"],
    },
}
CHECKPOINT_ACTORS = 4  # the 'From checkpoint' section: a file on /dev/shm to 4 actors answering
ALTERNATED_ROUNDS = 7  # rounds of benchmarks/wrap_alternated.py


def model_nbytes(name):
    spec = bm.MODELS[name]
    m = bm.build_skeleton(spec)
    return bm.model_bytes(m)[0]


def run_contender(name, python, extra_env, plan_path, out_path, log_path, timeout):
    env = dict(os.environ)
    env.pop("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", None)
    env.update(extra_env)
    env["PYTHONPATH"] = HERE + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["OMP_NUM_THREADS"] = "1"  # the same in the driver, the tasks and the actors
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [python, os.path.join(HERE, "contender.py"), "--adapter", name, "--plan", plan_path,
           "--out", out_path]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=os.path.dirname(out_path))
        try:
            for line in proc.stdout:
                log.write(line)
                if line.startswith("["):
                    print("   ", line.rstrip(), flush=True)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    rc = proc.returncode
    return rc, time.perf_counter() - t0


# --------------------------------------------------------------------------- report helpers


def fmt_s(x):
    if x is None:
        return "-"
    if abs(x) < 1e-3:  # the unit by magnitude: an overhead below the noise can be negative
        return f"{x * 1e6:.0f} µs"
    if abs(x) < 1:
        return f"{x * 1e3:.1f} ms"
    return f"{x:.2f} s"


def fmt_b(x):
    return "-" if x is None else f"{x / 2**20:,.0f} MiB"


def fmt_r(x):
    return "-" if x is None else f"{x:.2f}x"


def get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def stat_row(s, fmt):
    if not s or not s.get("n"):
        return ["-", "-", "-"]
    return [fmt(s["median"]), fmt(s["min"]), fmt(s["max"])]


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def errors_of(results, name, model):
    return get(results, name, "models", model, "errors") or []


# --------------------------------------------------------------------------- analysis


def analyse(results, plan):
    """Ratios against ours and the targets, from the collected results."""
    main = plan["main"]
    targets = []

    def add(what, value, limit, ok, detail):
        targets.append({"target": what, "value": value, "limit": limit,
                        "met": None if ok is None else bool(ok), "detail": detail})

    ours_load = get(results, "ours-actor", "models", main, "load", "median")
    for other in ("published-actor", "ray-zerocopy-tensors"):
        o = get(results, other, "models", main, "load", "median")
        r = ratio(ours_load, o)
        add(f"load latency in an actor <= 0.5x {LABELS[other]} ({main})", r, 0.5,
            None if r is None else r <= 0.5,
            f"ours {fmt_s(ours_load)}, theirs {fmt_s(o)}"
            + ("" if o is not None else "; theirs not measured: "
               + ("; ".join(errors_of(results, other, main)) or "contender not run")))
    a, b = plan["bytes_pair"]
    la = get(results, "ours-actor", "models", a, "load", "median")
    lb = get(results, "ours-actor", "models", b, "load", "median")
    r = ratio(lb, la)
    add(f"load latency unchanged (within 10%) at 4x the bytes, same tensor count ({a} -> {b})",
        r, 1.10, None if r is None else r <= 1.10, f"{fmt_s(la)} -> {fmt_s(lb)}")
    def task_target(model, key, qualifier):
        """The 1.5x target line of figure 3's measurement ``key`` ("task", "task_sporadic")."""
        t = get(results, "ours-task", "models", model, key)
        if not t:
            return
        ov = t["overhead_vs_bare"]
        pub = get(results, "published-task", "models", model, key, "overhead_vs_bare")
        loc = get(t, "local", "values") or []
        o_med = get(t, "overhead", "median")
        noise = None
        if len(loc) >= 2:
            q1, q3 = bc.quartiles(loc)
            noise = q3 - q1
        below = o_med is not None and noise is not None and abs(o_med) < noise
        add(f"task call overhead <= 1.5x a bare Ray task round trip ({model}{qualifier})", ov,
            1.5, None if ov is None or below else ov <= 1.5,
            ("not measurable here: the overhead is below the spread (IQR "
             f"{fmt_s(noise)}) of the computation itself; " if below else "") +
            f"ours overhead {fmt_s(o_med)}, bare task {fmt_s(get(t, 'bare_task', 'median'))}"
            f"; published: {fmt_r(pub)} of its bare task")

    for model in [m["model"] for m in plan["models"] if "task" in m["figures"]]:
        task_target(model, "task", "")
        pause = get(results, "ours-task", "models", model, "task_sporadic", "pause") or 0
        task_target(model, "task_sporadic", f", calls {pause * 1e3:g} ms apart")
    for model in [m["model"] for m in plan["models"] if "memory" in m["figures"]]:
        for n in ("4", "8"):
            v = get(results, "ours-actor", "models", model, "memory", "by_actors", n, "models")
            plain = get(results, "plain-put", "models", model, "memory", "by_actors", n, "models")
            add(f"node memory with {n} actors <= 1.1x one model ({model})", v, 1.1,
                None if v is None else v <= 1.1,
                f"plain ray.put copies: {fmt_r(plain)} models")
    for model in [m["model"] for m in plan["models"]]:
        for c in ("ours-actor", "ours-task"):
            w = get(results, c, "models", model, "wrap_first")
            nb = get(results, c, "models", model, "model_bytes")
            if not w or not nb or not w.get("first_in_process", True):
                continue
            v = w["peak_extra_rss"] / nb
            pw = get(results, c.replace("ours", "published"), "models", model, "wrap_first")
            pv = pw["peak_extra_rss"] / nb if pw and pw.get("first_in_process", True) else None
            add(f"driver peak extra memory while wrapping <= 1.1x the model ({LABELS[c]}, {model})",
                v, 1.1, v <= 1.1, f"published: {fmt_r(pv)} the model")
    for model in [m["model"] for m in plan["models"]]:
        rz = "ray-zerocopy-tensors"
        for label, path in (("first wrap", ("wrap_first", "seconds")),
                            ("later wraps, median", ("wrap_repeat", "seconds", "median"))):
            o = get(results, "ours-actor", "models", model, *path)
            t = get(results, rz, "models", model, *path)
            r = ratio(o, t)
            if r is None:
                continue
            add(f"wrap time <= Ray's zero-copy tensors' put ({label}, {model})", r, 1.0, r <= 1.0,
                f"ours (ActorWrapper) {fmt_s(o)}, Ray {fmt_s(t)}")
    for model in [m["model"] for m in plan["models"] if "inference" in m["figures"]]:
        st = get(results, "ours-actor", "models", model, "steady")
        if st:
            add(f"steady-state inference equal to a locally loaded model within noise ({model})",
                st["ratio"], None, st["within_noise"],
                f"loaded {fmt_s(st['loaded']['median'])} vs local {fmt_s(st['local']['median'])}, "
                f"noise {fmt_s(st['noise'])}, outputs equal: {st['outputs_equal']}")
    return targets


# --------------------------------------------------------------------------- docs + plots


def plots(results, plan, img_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return [f"plots skipped: {exc}"]
    os.makedirs(img_dir, exist_ok=True)
    written = []
    main = plan["main"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in results:
        mem = get(results, name, "models", main, "memory", "by_actors")
        if not mem:
            continue
        xs = sorted(int(k) for k in mem)
        ax.plot(xs, [mem[str(x)]["models"] for x in xs], marker="o", label=LABELS[name])
    ax.set_xlabel("actors holding the model")
    ax.set_ylabel(f"node PSS above baseline (models of {main})")
    ax.set_xticks([1, 2, 4, 8])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Node memory against number of actors ({main})")
    fig.tight_layout()
    p = os.path.join(img_dir, "bench_memory.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    models = [m["model"] for m in plan["models"] if "load" in m["figures"]]
    names = [n for n in results if get(results, n, "kind") == "actor"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        meds, lo, hi, labels = [], [], [], []
        for n in names:
            s = get(results, n, "models", model, "load")
            if not s or not s.get("n"):
                continue
            meds.append(s["median"] * 1e3)
            lo.append((s["median"] - s["min"]) * 1e3)
            hi.append((s["max"] - s["median"]) * 1e3)
            labels.append(LABELS[n].replace(": ", ":\n"))
        ax.bar(range(len(meds)), meds, yerr=[lo, hi], capsize=3,
               color=["C0" if "ours" in lb else "C7" for lb in labels])
        ax.set_xticks(range(len(meds)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("load latency in a fresh actor (ms, log)")
        ax.set_title(model, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    p = os.path.join(img_dir, "bench_load.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    return written


def write_docs(path, results, plan, targets, meta):
    L = []
    w = L.append
    w("# Benchmarks\n")
    w("Generated by `benchmarks/run.py`; do not edit by hand. Every figure below comes from one "
      "run, contenders side by side, each in its own process (the published library in its own "
      "venv), medians with min and max over the repeats, and each contender's ratio against ours. "
      "See [benchmarks/README.md](../benchmarks/README.md) for what each figure measures.\n")
    w(f"- Command: `{meta['command']}` (mode `{meta['mode']}`, {meta['date']}, "
      f"{meta['seconds'] / 60:.1f} minutes)")
    m = meta["machine"]
    w(f"- Machine: {m.get('cpu_model', '?')}, {m.get('cpus')} CPUs, "
      f"{m.get('ram_bytes', 0) / 2**30:.1f} GiB RAM, /dev/shm {m.get('shm_bytes', 0) / 2**30:.1f} GiB, "
      f"Linux {m.get('kernel')}, no GPU used")
    for name, v in meta["versions"].items():
        vs = ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "ray", "ray-zerocopy", "ray_zerocopy")
                       if k in v)
        w(f"- {name} ({v.get('executable', '?').replace(ROOT + '/', '')}): {vs}")
    w("- Every process runs with `OMP_NUM_THREADS=1` (so the driver, the tasks and the actors "
      "compute alike on 2 cores) and `RAY_USAGE_STATS_ENABLED=0`; Ray is started by each "
      "contender with `num_cpus=2`, no dashboard, and an object store sized to the models.")
    if meta.get("spare", "1") == "0":
        w("- Ours: `RAY_ZEROCOPY_SPARE=0` (task calls without spare pipelines; they are on by "
          "default, see docs/tasks.md).")
    models_desc = []
    for item in plan["models"]:
        name = item["model"]
        for c in results.values():
            mm = get(c, "models", name)
            if mm and mm.get("model_bytes"):
                models_desc.append(f"`{name}` ({mm['n_params'] / 1e6:,.1f}M parameters, "
                                   f"{mm['model_bytes'] / 2**20:,.0f} MiB, {mm['n_tensors']} tensors, "
                                   f"{bm.MODELS[name]['dtype']})")
                break
    w("- Models (built in code, random weights): " + "; ".join(models_desc))
    if meta.get("skipped"):
        w("- Not run: " + "; ".join(meta["skipped"]))
    w("")

    w("## Targets\n")
    rows = []
    for t in targets:
        met = {True: "**met**", False: "**missed**", None: "not measured / inconclusive"}[t["met"]]
        v = "-" if t["value"] is None else f"{t['value']:.2f}"
        rows.append([t["target"], v, met, t["detail"]])
    w(table(["target", "value", "result", "detail"], rows))
    if meta.get("alternated_json"):
        w("\nThe wrap-time lines without a qualifier compare figure 1's two processes, run "
          "one after another minutes apart, so they also carry the machine's drift; those "
          "marked \"alternated in one process\" and \"fresh processes in swapped pairs\" "
          "compare the same wraps side by side (section \"Wrap time, ours and Ray's alternated "
          "in one process\" below).")
    w("")

    names = list(results)
    actor_names = [n for n in names if get(results, n, "kind") == "actor"]
    task_names = [n for n in names if get(results, n, "kind") == "task"]

    w("## 1. Wrapping in the driver\n")
    w("Wall time of the wrap call (first wrap in the process, then the spread of further wraps, "
      "which reuse the object store's pages), and the driver's peak extra RSS during the first "
      "wrap (VmHWM reset before; RSS includes the object store pages the driver writes; every "
      "contender's driver has made one 4 KiB `ray.put` first, because Ray's first put in a "
      "process adds about 29 MiB of RSS whatever its size), in "
      "models; memory is shown only where the wrap was the first in its process (a driver that "
      "has wrapped before keeps freed heap and store pages mapped, so its RSS does not grow). "
      "Ratios are against ours of the same kind (ActorWrapper for actor contenders, "
      "TaskWrapper for task contenders). GB/s is the model's bytes over the median later wrap; "
      f"this machine's one-thread memcpy measured in the same run: "
      f"{meta.get('memcpy_gbps') or 0:.2f} GB/s (1 GiB, numpy, best of 3).\n")
    for item in plan["models"]:
        model = item["model"]
        rows = []
        for n in names:
            res = get(results, n, "models", model)
            if not res:
                continue
            ref = "ours-task" if get(results, n, "kind") == "task" else "ours-actor"
            wf = res.get("wrap_first")
            if not wf:
                rows.append([LABELS[n], "failed: " + "; ".join(res.get("errors", []))[:160],
                             "", "", "", "", "", "", ""])
                continue
            rw = get(res, "wrap_repeat", "seconds") or {}
            rwf = get(results, ref, "models", model, "wrap_first")
            fresh = wf.get("first_in_process", True) and rwf and rwf.get("first_in_process", True)
            na = "n/a (driver not fresh)"
            later = rw.get("median")
            rows.append([LABELS[n], fmt_s(wf["seconds"]),
                         " / ".join(stat_row(rw, fmt_s)),
                         f"{res['model_bytes'] / later / 1e9:.2f}" if later else "-",
                         fmt_r(ratio(wf["seconds"], rwf and rwf["seconds"])),
                         fmt_b(wf["peak_extra_rss"]) if fresh else na,
                         fmt_r(wf["peak_extra_rss"] / res["model_bytes"]) if fresh else na,
                         fmt_r(ratio(wf["peak_extra_rss"], rwf and rwf["peak_extra_rss"]))
                         if fresh else na,
                         fmt_b(wf["extra_rss_after"]) if fresh else na])
        w(f"**{model}**\n")
        w(table(["contender", "first wrap", "later wraps median / min / max",
                 "GB/s (later, median)", "vs ours",
                 "peak extra RSS", "in models", "vs ours", "extra RSS after"], rows))
        w("")

    w("## 2. Load latency in a fresh actor\n")
    w("The actor is started and ready (process start and imports not counted); the timed method "
      "receives the handle and returns a usable pipeline. A new actor for every repeat.\n")
    for item in plan["models"]:
        model = item["model"]
        if "load" not in item["figures"]:
            continue
        rows = []
        ours = get(results, "ours-actor", "models", model, "load", "median")
        for n in actor_names:
            s = get(results, n, "models", model, "load")
            if not s:
                errs = errors_of(results, n, model)
                if errs:
                    rows.append([LABELS[n], "failed: " + "; ".join(errs)[:160], "", "", ""])
                continue
            rows.append([LABELS[n]] + stat_row(s, fmt_s) + [fmt_r(ratio(s["median"], ours))])
        w(f"**{model}**\n")
        w(table(["contender", "median", "min", "max", "vs ours"], rows))
        w("")
    a, b = plan["bytes_pair"]
    rows = []
    for n in actor_names:
        la = get(results, n, "models", a, "load", "median")
        lb = get(results, n, "models", b, "load", "median")
        rows.append([LABELS[n], fmt_s(la), fmt_s(lb), fmt_r(ratio(lb, la))])
    w(f"Same tensor count (200), 4x the bytes: `{a}` -> `{b}`\n")
    w(table(["contender", a, b, "change"], rows))
    w("\n![load latency](img/bench_load.png)\n")

    w("## 3. Per-call overhead of a task call\n")
    w("Overhead = wrapped call minus the same computation done locally in the driver (medians, "
      "after 2 warm-up calls so workers and caches are warm; the first call is shown apart), "
      "against a bare Ray task round trip (`ray.get(f.remote(x))` returning its input) measured "
      "in the same process. The kinds are measured in blocks of 5 back-to-back calls, rotated "
      "over rounds, so that a drift of the machine's speed hits them alike. Rows marked "
      "\"calls apart\" measure the same with 50 ms of idle time before every call (half as "
      "many calls), as a worker serving sporadic requests sees them: the worker's spare "
      "pipeline is ready for the call then (docs/tasks.md). The last two columns: a bare task "
      "that spins as long as the local computation took, and the wrapped call's median minus "
      "its median. Ray's own round trip grows with the task's length, so this is what a call "
      "costs beyond a bare task doing the same work; the 1.5x target is set against the empty "
      "bare task.\n")
    for item in plan["models"]:
        model = item["model"]
        if "task" not in item["figures"]:
            continue
        rows = []
        # back to back, then with idle time before every call ("task_sporadic")
        for key in ("task", "task_sporadic"):
            ours = get(results, "ours-task", "models", model, key, "overhead", "median")
            for n in task_names:
                t = get(results, n, "models", model, key)
                if not t:
                    errs = errors_of(results, n, model) if key == "task" else None
                    if errs:
                        rows.append([LABELS[n], "failed: " + "; ".join(errs)[:160]] + [""] * 8)
                    continue
                label = LABELS[n] + (f", calls {t['pause'] * 1e3:g} ms apart" if t.get("pause")
                                     else "")
                first = fmt_s(t["first_call"]) if "first_call" in t else ""
                rows.append([label, fmt_s(t["local"]["median"]), first,
                             " / ".join(stat_row(t["wrapped"], fmt_s)),
                             " / ".join(stat_row(t["overhead"], fmt_s)),
                             fmt_s(t["bare_task"]["median"]), fmt_r(t["overhead_vs_bare"]),
                             fmt_r(ratio(t["overhead"]["median"], ours)),
                             fmt_s(get(t, "busy_task", "median")), fmt_s(t.get("beyond_busy"))])
        w(f"**{model}**\n")
        w(table(["contender", "local", "first call", "call median / min / max",
                 "overhead median / min / max", "bare task", "overhead / bare", "vs ours",
                 "bare task computing as long", "call - that"], rows))
        w("")

    w("## 4. Node memory with 1, 2, 4 and 8 actors\n")
    w("PSS summed over the driver, the raylet (object store), the GCS and the actors, minus the "
      "same sum with the model built in the driver and the actors started but before wrapping; "
      "each actor has loaded the model and run one inference. In models (1.00 = one copy). The "
      "last column is the same sum over every Ray process of the node (idle pooled workers "
      "included; noisier).\n")
    for item in plan["models"]:
        model = item["model"]
        if "memory" not in item["figures"]:
            continue
        rows = []
        for n in actor_names:
            mem = get(results, n, "models", model, "memory")
            if not mem:
                errs = errors_of(results, n, model)
                if errs:
                    rows.append([LABELS[n], "failed: " + "; ".join(errs)[:160], "", "", "", "", ""])
                continue
            by = mem["by_actors"]
            cells = []
            for k in ("1", "2", "4", "8"):
                cells.append(f"{by[k]['models']:.2f} ({fmt_b(by[k]['extra_pss'])})" if k in by
                             else "skipped")
            last = max(by, key=int) if by else None
            allp = (f"{by[last]['extra_pss_all_ray_processes'] / get(results, n, 'models', model, 'model_bytes'):.2f} at {last}"
                    if last else "-")
            rows.append([LABELS[n]] + cells + [allp, "; ".join(mem.get("skipped", [])) or ""])
        w(f"**{model}**\n")
        w(table(["contender", "1 actor", "2 actors", "4 actors", "8 actors",
                 "all Ray processes", "skipped"], rows))
        w("")
    w("![node memory](img/bench_memory.png)\n")

    w("## 5. Inference after load\n")
    w("First inference right after the load (page faults on shared pages are paid here), and "
      "steady-state latency of the loaded pipeline against a private copy of the same weights "
      "in the same actor (a locally loaded model), calls alternated. \"Within noise\": the "
      "difference of the medians is at most the local copy's interquartile range or 5%, "
      "whichever is larger.\n")
    for item in plan["models"]:
        model = item["model"]
        if "inference" not in item["figures"]:
            continue
        rows = []
        ours = get(results, "ours-actor", "models", model, "first_inference", "median")
        for n in actor_names:
            res = get(results, n, "models", model)
            if not res or not res.get("first_inference"):
                continue
            st = res.get("steady") or {}
            rows.append([LABELS[n]] + stat_row(res["first_inference"], fmt_s)
                        + [fmt_r(ratio(res["first_inference"]["median"], ours)),
                           fmt_s(get(st, "loaded", "median")), fmt_s(get(st, "local", "median")),
                           fmt_r(st.get("ratio")),
                           {True: "yes", False: "no", None: "-"}[st.get("within_noise")]])
        w(f"**{model}**\n")
        w(table(["contender", "first inference median", "min", "max", "vs ours",
                 "steady loaded", "steady local", "loaded / local", "within noise"], rows))
        w("")

    w("## 6. Ray Data `map_batches` with 2 actors\n")
    w("`ray.data.range(N).map_batches(cls, compute=ActorPoolStrategy(size=2), num_cpus=0.5)`, "
      "the class loading the model in its constructor; time from starting iteration to the "
      "first batch and rows per second over the whole run (actor start-up included, after one "
      "warm-up run of Ray Data without a model).\n")
    for item in plan["models"]:
        model = item["model"]
        if "data" not in item["figures"]:
            continue
        rows = []
        ours = get(results, "ours-actor", "models", model, "data")
        for n in actor_names:
            d = get(results, n, "models", model, "data")
            if not d:
                continue
            rows.append([LABELS[n], d["rows"], f"{d['rows_per_s']:.1f}",
                         fmt_r(ratio(d["rows_per_s"], ours and ours["rows_per_s"])),
                         fmt_s(d["time_to_first_batch"]),
                         fmt_r(ratio(d["time_to_first_batch"], ours and ours["time_to_first_batch"]))])
        w(f"**{model}** (one run per contender)\n")
        w(table(["contender", "rows", "rows/s", "vs ours", "time to first batch", "vs ours"], rows))
        w("")

    errs = []
    for n in names:
        for model, res in (get(results, n, "models") or {}).items():
            for e in res.get("errors", []):
                errs.append(f"- {LABELS[n]}, {model}: {e}")
    if errs:
        w("## Failures and skipped measurements\n")
        w("\n".join(errs))
        w("")
    gpu_section(w)
    with open(path, "w") as f:
        f.write("\n".join(L))


def gpu_section(w):
    """The GPU figures: every benchmarks/gpu_results/*.json written by gpu_bench.py (run by
    `make gpu-check` on a machine with a GPU; this machine has none)."""
    w("## GPU\n")
    files = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "gpu_results", "*.json")))
    if not files:
        w("No GPU results yet: run `make gpu-check` on a machine with a GPU and copy its JSON "
          "into `benchmarks/gpu_results/`.\n")
        return
    w("Host shared memory (a `/dev/shm` file mapped afresh per trial, as a worker maps an object "
      "it has not touched) to one GPU, no Ray (`benchmarks/gpu_bench.py`, run by "
      "`make gpu-check`). Medians with min-max; ratios against per-tensor `.to(\"cuda\")`. "
      "Target of the GPU issue: at least 50 GB/s for 2 GiB or more; see docs/device.md for "
      "what was learned.\n")
    for path in files:
        with open(path) as f:
            d = json.load(f)
        meta = d.get("meta", {})
        w(f"**{meta.get('device')}**, {meta.get('cpus')} CPUs, torch {meta.get('torch')}, CUDA "
          f"{meta.get('cuda')}; command: `{meta.get('command')}` "
          f"(`{os.path.relpath(path, ROOT)}`)\n")
        for size in d.get("sizes", []):
            res = size["results"]
            base = res["per-tensor .to(cuda)"]["median_s"]
            w(f"{size['bytes'] / 2**30:.2f} GiB, {size['tensors']} fp16 tensors\n")
            w("| method | seconds | GB/s | vs per-tensor |\n|---|---|---|---|")
            for name, v in res.items():
                w(f"| {name} | {v['median_s']:.4f} ({v['min_s']:.4f} - {v['max_s']:.4f}) | "
                  f"{v['GBps']:.1f} | {base / v['median_s']:.2f}x |")
            met = max(v["GBps"] for k, v in res.items() if "prefaulted" not in k) >= 50
            w(f"\n50 GB/s target: **{'met' if met else 'missed'}**.\n")


def run_checkpoint(models, json_path, log_path, docs_path, via):
    """The 'From checkpoint' section (benchmarks/checkpoint_bench.py, its own contenders)."""
    return run_section("checkpoint_bench.py", "From checkpoint",
                       ["--model", ",".join(models), "--actors", str(CHECKPOINT_ACTORS),
                        "--via", via], json_path, log_path, docs_path)


def run_alternated(models, rounds, json_path, log_path, docs_path):
    """The 'Wrap time, alternated' section (benchmarks/wrap_alternated.py, with --first)."""
    return run_section("wrap_alternated.py", "Wrap time, ours and Ray's alternated in one process",
                       ["--model", ",".join(models), "--rounds", str(rounds), "--first"],
                       json_path, log_path, docs_path)


def alternated_targets(path):
    """Wrap-time targets from wrap_alternated.py's JSON: later wraps alternated in one process
    (ratio of the medians), first wraps in fresh processes in swapped pairs (medians)."""
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        data = json.load(f)
    out = []
    for model, r in data.get("models", {}).items():
        if "error" in r:
            continue
        v = r["ratio_of_medians"]
        out.append({"target": f"wrap time <= Ray's zero-copy tensors' put (later wraps, "
                              f"alternated in one process, {model})",
                    "value": v, "limit": 1.0, "met": v <= 1.0,
                    "detail": f"ours {fmt_s(r['ours']['median'])}, Ray {fmt_s(r['ray']['median'])}"
                              f", {data['meta']['rounds']} rounds; per-round ratio median "
                              f"{r['per_round_ratio']['median']:.2f}"})
        f1 = r.get("first")
        if f1:
            v = f1["ours"] / f1["ray"]
            n = len(f1.get("values", {}).get("ours", [0]))
            out.append({"target": f"wrap time <= Ray's zero-copy tensors' put (first wrap, "
                                  f"fresh processes in swapped pairs, {model})",
                        "value": v, "limit": 1.0, "met": v <= 1.0,
                        "detail": f"ours {fmt_s(f1['ours'])}, Ray {fmt_s(f1['ray'])}, medians "
                                  f"of {n} each"})
    return out


def run_section(script, title, args, json_path, log_path, docs_path):
    """Runs a benchmark script that writes its own section, streams its progress, and appends
    the section to docs_path (if any). Returns its exit status; where it left no JSON, appends
    a line saying so, so that a missing section is seen."""
    cmd = [OURS_PY, os.path.join(HERE, script), *args, "--json", json_path]
    if docs_path:
        cmd += ["--append-docs", docs_path]
    print(f"-- {script}: " + " ".join(shlex.quote(c.replace(ROOT + "/", "")) for c in cmd),
          flush=True)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.pop("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", None)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=ROOT)
        for line in proc.stdout:
            log.write(line)
            if line.startswith(("==", "--", "   (")):
                print("   ", line.rstrip()[:200], flush=True)
        rc = proc.wait()
    print(f"   {script}: exit {rc}, {time.perf_counter() - t0:.0f} s", flush=True)
    if docs_path and not os.path.exists(json_path):
        with open(docs_path, "a") as f:
            f.write(f"\n## {title}\n\nNot measured: `benchmarks/{script}` "
                    f"exited {rc} (log: `{os.path.relpath(log_path, ROOT)}`).\n")
    return rc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=sorted(PLANS), default="quick")
    ap.add_argument("--only", default="", help="comma-separated contenders")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--no-checkpoint", action="store_true",
                    help="skip the 'From checkpoint' section (benchmarks/checkpoint_bench.py)")
    ap.add_argument("--no-alternated", action="store_true",
                    help="skip the 'Wrap time, alternated' section (benchmarks/wrap_alternated.py)")
    ap.add_argument("--report-only", default="", help="rebuild docs from a summary JSON")
    args = ap.parse_args()
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    if args.report_only:
        with open(args.report_only) as f:
            summary = json.load(f)
        plan = summary["plan"]
        docs = os.path.join(ROOT, "docs", "benchmarks.md")
        write_docs(docs, summary["results"], plan, summary["targets"], summary["meta"])
        import checkpoint_bench
        import wrap_alternated

        # the sections of their own, from their JSON, in the order a run appends them
        for key, mod in (("alternated_json", wrap_alternated),
                         ("checkpoint_json", checkpoint_bench)):
            path = summary["meta"].get(key)
            if path and os.path.exists(path):
                with open(path) as f:
                    text = mod.markdown(json.load(f))
                with open(docs, "a") as f:
                    f.write("\n" + text)
        print("\n".join(plots(summary["results"], plan, os.path.join(ROOT, "docs", "img"))))
        return 0

    plan = dict(PLANS[args.mode])
    only = [s for s in args.only.split(",") if s]
    contenders = [c for c in CONTENDERS if not only or c[0] in only]
    biggest = max(model_nbytes(m["model"]) for m in plan["models"])
    plan["object_store_bytes"] = int(min(max(2.5 * biggest + 2**30, 2 * 2**30),
                                         0.8 * bc.shm_available()))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.join(args.results, f"{stamp}-{args.mode}")
    os.makedirs(run_dir, exist_ok=True)
    plan_path = os.path.join(run_dir, "plan.json")
    bc.write_json(plan_path, plan)
    machine = bc.machine_info()
    print(f"== ray_zerocopy benchmarks, mode {args.mode}")
    print(f"   command: {command}")
    print(f"   machine: {machine.get('cpu_model')}, {machine.get('cpus')} CPUs, "
          f"{machine['ram_bytes'] / 2**30:.1f} GiB RAM, /dev/shm {machine['shm_bytes'] / 2**30:.1f} GiB")
    print(f"   results: {run_dir}")

    # The .pyc of the benchmark modules and of the package, written now: with
    # PYTHONDONTWRITEBYTECODE=1 in the environment (as on the development VM) no process
    # writes them, and every actor then compiled bench_models.py from source in its first
    # load: 2.5 ms for that import against 0.35 ms with a .pyc (benchmarks/README.md, fig. 2).
    subprocess.run([sys.executable, "-m", "compileall", "-q", HERE,
                    os.path.join(ROOT, "ray_zerocopy")], cwd=ROOT, capture_output=True)
    # warm-up: imports of both venvs (file caches), before anything is timed
    skipped = []
    for py in sorted({c[1] for c in contenders}):
        if not os.path.exists(py):
            continue
        subprocess.run([py, "-c", "import torch, ray, ray.data, ray_zerocopy"], cwd=ROOT,
                       capture_output=True)
    memcpy = bc.memcpy_gbps()
    print(f"   one-thread memcpy: {memcpy:.2f} GB/s")
    t0 = time.perf_counter()
    results, versions = {}, {}
    timeout = 1800 if args.mode == "quick" else 7200
    for name, py, env in contenders:
        if not os.path.exists(py):
            msg = f"{name}: {py} missing (run `make bench-venv`)"
            print("   SKIP", msg)
            skipped.append(msg)
            continue
        # quick: one process per contender; full: one per contender and model, so that every
        # model's wrap starts from a fresh driver (peak RSS is then comparable for all models)
        parts = [(name, plan_path)]
        if args.mode in ("full", "focus"):
            parts = []
            for i, item in enumerate(plan["models"]):
                sub = dict(plan, models=[item])
                p = os.path.join(run_dir, f"plan-{i}.json")
                bc.write_json(p, sub)
                parts.append((f"{name}.{i}", p))
        for tag, ppath in parts:
            out = os.path.join(run_dir, f"{tag}.json")
            print(f"-- {tag} ({py.replace(ROOT + '/', '')})", flush=True)
            rc, dt = run_contender(name, py, env, ppath, out, os.path.join(run_dir, f"{tag}.log"),
                                   timeout)
            print(f"   {tag}: exit {rc}, {dt:.0f} s", flush=True)
            if not os.path.exists(out):
                skipped.append(f"{tag}: no result (exit {rc}; see {out[:-5]}.log)")
                continue
            with open(out) as f:
                part = json.load(f)
            if name not in results:
                results[name] = part
            else:
                results[name]["models"].update(part["models"])
            if part.get("skipped"):
                skipped.append(f"{name}: {part['skipped']}")
            if rc != 0:
                skipped.append(f"{tag}: exited {rc} (partial results; see {out[:-5]}.log)")
            versions[py] = part["versions"]
    seconds = time.perf_counter() - t0
    ckpt_json = os.path.join(run_dir, "checkpoint.json")
    alt_json = os.path.join(run_dir, "alternated.json")
    if not args.no_alternated:
        # wrap time of ours and Ray's zero-copy tensors alternated in one process (figure 1
        # runs them one after another, each in its own process); appended to the docs below
        run_alternated([m["model"] for m in plan["models"] if "wrap" in m["figures"]],
                       ALTERNATED_ROUNDS, alt_json,
                       os.path.join(run_dir, "alternated.log"), "")
    targets = analyse(results, plan) + alternated_targets(
        "" if args.no_alternated else alt_json)
    venv_names = {OURS_PY: ".venv (ours, Ray, plain)", PUB_PY: "bench-venv (published)"}
    meta = {"command": command, "mode": args.mode, "date": time.strftime("%Y-%m-%d %H:%M"),
            "seconds": seconds, "machine": machine, "skipped": skipped, "memcpy_gbps": memcpy,
            "versions": {venv_names[k]: v for k, v in versions.items()},
            "spare": os.environ.get("RAY_ZEROCOPY_SPARE", "1")}
    if not args.no_alternated:
        meta["alternated_json"] = alt_json  # for --report-only
    if not args.no_checkpoint:
        meta["checkpoint_json"] = ckpt_json  # for --report-only
    summary = {"meta": meta, "plan": plan, "targets": targets, "results": results}
    bc.write_json(os.path.join(run_dir, "summary.json"), summary)
    bc.write_json(os.path.join(args.results, f"latest-{args.mode}.json"), summary)
    print(f"== done in {seconds / 60:.1f} minutes; targets:")
    for t in targets:
        met = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        v = "-" if t["value"] is None else f"{t['value']:.2f}"
        print(f"   [{met}] {t['target']}: {v} ({t['detail']})")
    if not args.no_docs:
        write_docs(os.path.join(ROOT, "docs", "benchmarks.md"), results, plan, targets, meta)
        for p in plots(results, plan, os.path.join(ROOT, "docs", "img")):
            print("   wrote", p)
        print("   wrote docs/benchmarks.md")
    if not args.no_alternated and not args.no_docs and os.path.exists(alt_json):
        import wrap_alternated

        with open(alt_json) as f:
            text = wrap_alternated.markdown(json.load(f))
        with open(os.path.join(ROOT, "docs", "benchmarks.md"), "a") as f:
            f.write("\n" + text)
    if not args.no_checkpoint:
        # 'From checkpoint': its own contenders, run whatever --only says (--only picks among
        # the main contenders above), appended to the docs just written.
        run_checkpoint(plan["checkpoint_models"], ckpt_json,
                       os.path.join(run_dir, "checkpoint.log"),
                       "" if args.no_docs else os.path.join(ROOT, "docs", "benchmarks.md"),
                       command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
