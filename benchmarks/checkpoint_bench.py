"""'From checkpoint': a safetensors checkpoint into Ray actors, four ways, side by side.

Contenders (each in its own process, with its own Ray, one after another):

- ``ours-from-safetensors``: ``ActorWrapper.from_safetensors(meta_model, ckpt)`` in the driver
  (nothing built there; one copy from the file's pages into the store), ``w.load()`` in actors;
- ``ours-from-file``: ``ActorWrapper.from_file(path)`` of an arena file saved once beforehand
  (``ray_zerocopy.save``, not timed);
- ``load-then-wrap`` (what a user would do without this feature): build the model on the CPU,
  ``load_state_dict(safetensors.torch.load_file(ckpt))``, ``ActorWrapper(model)``;
- ``actors-load-safetensors`` (what a user would do without this library): nothing in the driver;
  every actor builds the model on the meta device and ``load_state_dict(load_file(ckpt),
  assign=True)`` (safetensors maps the file: actors on a node share its page-cache pages).

Figures: wrap time and the driver's peak private (anonymous) memory growth during it (RssAnon,
sampled every millisecond), load latency in a fresh actor (median of the actors), node memory
(PSS over Ray's processes and the driver) with N actors loaded, minus before, and the first
output compared with the model loaded normally.

Usage:
    .venv/bin/python benchmarks/checkpoint_bench.py [--model gpt2-small] [--actors 2]
        [--only a,b] [--json out.json] [--append-docs docs/benchmarks.md]

``benchmarks/run.py`` runs it after the main benchmark and appends its section to
docs/benchmarks.md. Never part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in [os.environ.get("PYTHONPATH")] if p])
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

CONTENDERS = ["ours-from-safetensors", "ours-from-file", "load-then-wrap",
              "actors-load-safetensors"]


def _anon(field: str = "RssAnon") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class _PeakAnon:
    """Samples RssAnon every millisecond while active; .growth is the peak over the start."""

    def __enter__(self):
        self.base = self.peak = _anon()
        self._done = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, _anon())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._done.set()
        self._t.join()
        self.peak = max(self.peak, _anon())
        self.growth = self.peak - self.base


def prepare(spec_name: str, folder: str) -> dict:
    """Writes the checkpoint (safetensors, tied weights once) and the arena file of the model."""
    import bench_models as bm
    import torch
    from safetensors.torch import save_model

    import ray_zerocopy

    spec = bm.MODELS[spec_name]
    model = bm.build(spec)
    ckpt = os.path.join(folder, "model.safetensors")
    save_model(model, ckpt)
    rzc = os.path.join(folder, "model.rzc")
    ray_zerocopy.save(bm.Pipeline(model), rzc)
    x = bm.make_input(spec)
    ref = bm.Pipeline(model)(x)
    torch_path = os.path.join(folder, "ref.pt")
    torch.save({"x": x, "y": ref}, torch_path)
    return {"ckpt": ckpt, "file": rzc, "ref": torch_path, "bytes": os.path.getsize(ckpt)}


def _meta_pipeline(spec):
    import bench_models as bm

    m = bm.build_skeleton(spec)
    if hasattr(m, "tie"):
        m.tie()
    return bm.Pipeline(m)


def run_one(name: str, spec_name: str, files: dict, actors: int) -> dict:
    import bench_common as bc
    import bench_models as bm
    import ray
    import torch

    spec = bm.MODELS[spec_name]
    ref = torch.load(files["ref"])
    ray.init(num_cpus=max(2, actors), include_dashboard=False, log_to_driver=False,
             object_store_memory=int(files["bytes"] * 2.5) + (256 << 20))
    try:
        from safetensors.torch import load_file

        import ray_zerocopy.wrappers  # noqa: F401  (imports are not timed)

        @ray.remote(num_cpus=0)
        class Holder:
            def ready(self):
                return True

            def load(self, handle, spec_name, ckpt):
                import bench_models as bm2

                t0 = time.perf_counter()
                if handle is not None:
                    self.p = handle.load()
                else:  # actors-load-safetensors: the actor reads the file itself
                    p = _meta_pipeline(bm2.MODELS[spec_name])
                    p.model.load_state_dict(load_file(ckpt), assign=True)
                    if hasattr(p.model, "tie"):
                        p.model.tie()
                    self.p = p
                return time.perf_counter() - t0

            def run(self, x):
                return self.p(x)

        hs = [Holder.remote() for _ in range(actors)]
        ray.get([h.ready.remote() for h in hs])
        before = bc.settle_node_pss()
        t0 = time.perf_counter()
        with _PeakAnon() as peak:
            if name == "ours-from-safetensors":
                from ray_zerocopy import ActorWrapper

                handle = ActorWrapper.from_safetensors(_meta_pipeline(spec), {"model": files["ckpt"]})
            elif name == "ours-from-file":
                from ray_zerocopy import ActorWrapper

                handle = ActorWrapper.from_file(files["file"])
            elif name == "load-then-wrap":
                from ray_zerocopy import ActorWrapper

                model = bm.build_skeleton(spec).to_empty(device="cpu")
                model.load_state_dict(load_file(files["ckpt"]), strict=False)
                if hasattr(model, "tie"):
                    model.tie()
                handle = ActorWrapper(bm.Pipeline(model.eval()))
                del model
            else:
                handle = None
        wrap_s = time.perf_counter() - t0
        loads = ray.get([h.load.remote(handle, spec_name, files["ckpt"]) for h in hs])
        out = ray.get(hs[0].run.remote(ref["x"]))
        grown = bc.settle_node_pss() - before
        return {"wrap_s": wrap_s, "driver_anon_peak": peak.growth, "load_s": loads,
                "driver_shmem": _anon("RssShmem"),
                "node_pss": grown, "equal": bool(torch.allclose(out, ref["y"], atol=1e-4))}
    finally:
        ray.shutdown()


def markdown(res: dict, meta: dict) -> str:
    size = meta["bytes"]
    lines = [
        "## From checkpoint\n",
        f"A `{meta['model']}` safetensors checkpoint ({size / 2**20:,.0f} MiB) into {meta['actors']} "
        "actors (`benchmarks/checkpoint_bench.py`; each contender in its own process and Ray). "
        "Wrap: the driver's time and its peak private (anonymous) memory growth; load: median "
        "in a fresh actor; node memory: PSS of Ray's processes and the driver after the loads, "
        f"minus before. Command: `{meta['command']}`.\n",
        "| contender | wrap | driver private peak | load in actor | node memory | output |",
        "|---|---|---|---|---|---|"]
    for name, r in res.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | | |")
            continue
        lines.append(
            f"| {name} | {r['wrap_s']:.3f} s | {r['driver_anon_peak'] / 2**20:,.1f} MiB "
            f"({r['driver_anon_peak'] / size:.1%}) | {statistics.median(r['load_s']) * 1e3:,.1f} ms "
            f"| {r['node_pss'] / 2**20:,.0f} MiB ({r['node_pss'] / size:.2f} models) | "
            f"{'same' if r['equal'] else 'DIFFERS'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--only", default="")
    ap.add_argument("--json", default="")
    ap.add_argument("--append-docs", default="")
    ap.add_argument("--_one", default="", help=argparse.SUPPRESS)
    ap.add_argument("--_files", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:  # a contender's own process
        res = run_one(args._one, args.model, json.loads(args._files), args.actors)
        print("RESULT " + json.dumps(res))
        return 0
    command = "python benchmarks/checkpoint_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    folder = tempfile.mkdtemp(prefix="rzc-ckpt-bench-")
    out = subprocess.run([sys.executable, "-c",
                          "import json, sys; sys.path.insert(0, %r); import checkpoint_bench as c; "
                          "print(json.dumps(c.prepare(%r, %r)))" % (HERE, args.model, folder)],
                         capture_output=True, text=True, check=True)
    files = json.loads(out.stdout.strip().splitlines()[-1])
    only = [s for s in args.only.split(",") if s]
    results = {}
    for name in CONTENDERS:
        if only and name not in only:
            continue
        print(f"-- {name}", flush=True)
        p = subprocess.run([sys.executable, __file__, "--model", args.model, "--actors",
                            str(args.actors), "--_one", name, "--_files", json.dumps(files)],
                           capture_output=True, text=True, timeout=1800)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        results[name] = json.loads(line[-1][7:]) if line else {"error": p.stderr.strip()[-300:]}
        print("   ", results[name], flush=True)
    meta = {"model": args.model, "actors": args.actors, "bytes": files["bytes"],
            "command": command}
    text = markdown(results, meta)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    if args.append_docs:
        with open(args.append_docs, "a") as f:
            f.write("\n" + text)
    for name in ("model.safetensors", "model.rzc", "ref.pt"):
        os.unlink(os.path.join(folder, name))
    os.rmdir(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
