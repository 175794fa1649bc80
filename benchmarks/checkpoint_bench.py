"""'From checkpoint': a checkpoint file on /dev/shm to N Ray actors answering, five ways.

Contenders (each in its own process, with its own Ray, one after another):

- ``ours-from-safetensors``: ``ActorWrapper.from_safetensors(meta_model, ckpt)`` in the driver
  (nothing built there; one copy from the file's pages into the store), ``w.load()`` in actors;
- ``ours-from-file``: ``ActorWrapper.from_file(path)`` of an arena file saved once beforehand
  (``ray_zerocopy.save``, not timed);
- ``load-then-wrap`` (what a user of this library would do without from_safetensors): build the
  model on the CPU, ``load_state_dict(safetensors.torch.load_file(ckpt))``, ``ActorWrapper(model)``;
- ``actors-load-safetensors`` (without this library): nothing in the driver; every actor builds
  the model on the meta device and ``load_state_dict(load_file(ckpt), assign=True)`` (safetensors
  maps the file: actors on a node share its page-cache pages);
- ``actors-torch-load-mmap`` (without this library): the same from a ``torch.save``d state dict
  (written beforehand, not timed): every actor does ``load_state_dict(torch.load(path,
  mmap=True, weights_only=True), assign=True)`` on a meta-device model (shared pages too).

A model named ``NAME@bf16`` (e.g. ``gpt2-medium@bf16``) is the float32 model NAME with a
bfloat16 checkpoint: its weights are rounded to bfloat16 and saved so, and every contender
converts them back to float32 on the way: ``ours-from-safetensors`` with ``dtype=torch.float32``
(during the store's copy, in a bounded window), ``load-then-wrap`` through ``load_state_dict``'s
copy into the float32 model, the ``actors-*`` with ``.float()`` on each tensor in each actor (each
actor's own float32 copy); ``ours-from-file`` does not apply. The reference output is the float32
model with the rounded weights.

Every file (safetensors, .pt, arena file) lives in a temporary folder under /dev/shm, removed at
the end, also on error. Figures, per contender:

- time from the file to N actors answering, end to end: the driver's wrap, creating N fresh
  actors, each loading and answering one call (``ray.get`` of all N answers); the driver's
  imports (torch's meta kernels included) are done before, the actors' are in it;
- of which the wrap, and the load in an actor (median of the actors, imports not counted);
- the driver's peak private (anonymous) memory growth over that span (RssAnon, sampled every
  millisecond);
- node memory: PSS over this Ray's processes and the driver with the N actors loaded, minus the
  same with N idle actors that imported the same modules (stopped before the timed span);
- the N answers compared with the model's output.

Usage:
    .venv/bin/python benchmarks/checkpoint_bench.py [--model gpt2-small[,gpt2-medium,...]]
        [--actors 4] [--only a,b] [--json out.json] [--append-docs docs/benchmarks.md]

``benchmarks/run.py`` runs it after the main benchmark (gpt2-medium and gpt-1.3b-bf16 in full and
focus mode, gpt2-small in quick mode) and appends its section to docs/benchmarks.md. Never part
of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402  (standard library only)

HERE = bc.script_env()

CONTENDERS = ["ours-from-safetensors", "ours-from-file", "load-then-wrap",
              "actors-load-safetensors", "actors-torch-load-mmap"]
# The ones a user would pick instead of this library: the ratios are against the best of them.
WITHOUT_US = ["actors-load-safetensors", "actors-torch-load-mmap"]
SHM = "/dev/shm"


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

    def mark(self) -> int:
        """The peak growth so far."""
        self.peak = max(self.peak, _anon())
        return self.peak - self.base

    def __exit__(self, *exc):
        self._done.set()
        self._t.join()
        self.peak = max(self.peak, _anon())
        self.growth = self.peak - self.base


def _spec(spec_name: str) -> tuple[dict, str | None]:
    """The model spec of NAME or NAME@DTYPE, and the checkpoint's dtype if it differs."""
    import bench_models as bm

    base, _, ckpt_dtype = spec_name.partition("@")
    short = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    return bm.MODELS[base], short.get(ckpt_dtype, ckpt_dtype) or None


def prepare(spec_name: str, folder: str, contenders: list) -> dict:
    """Writes the model's files (not timed): the safetensors checkpoint (tied weights once), and
    where a contender needs them the arena file and the torch.save'd state dict."""
    import bench_models as bm
    import torch
    from safetensors.torch import save_model

    import ray_zerocopy

    spec, ckpt_dtype = _spec(spec_name)
    model = bm.build(spec)
    out = {"ckpt": os.path.join(folder, "model.safetensors")}
    if ckpt_dtype:
        with torch.no_grad():  # the float32 model with the weights the checkpoint holds
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.to(getattr(torch, ckpt_dtype)))
        ckpt_model = bm.build_skeleton(spec).to(getattr(torch, ckpt_dtype)).to_empty(device="cpu")
        ckpt_model.tie()
        ckpt_model.load_state_dict(model.state_dict())
        save_model(ckpt_model, out["ckpt"])
        out["convert"] = spec["dtype"]
    else:
        ckpt_model = model
        save_model(model, out["ckpt"])
    if "ours-from-file" in contenders and not ckpt_dtype:
        out["file"] = os.path.join(folder, "model.rzc")
        ray_zerocopy.save(bm.Pipeline(model), out["file"])
    if "actors-torch-load-mmap" in contenders:
        out["pt"] = os.path.join(folder, "model.pt")
        torch.save(ckpt_model.state_dict(), out["pt"])
    x = bm.make_input(spec)
    out["ref"] = os.path.join(folder, "ref.pt")
    torch.save({"x": x, "y": bm.Pipeline(model)(x)}, out["ref"])
    out["bytes"] = os.path.getsize(out["ckpt"])
    out["model_bytes"] = bm.model_bytes(model)[0]
    out["n_params"] = bm.n_params(model)
    out["dtype"] = f"{spec['dtype']} model, {ckpt_dtype} checkpoint" if ckpt_dtype else spec["dtype"]
    return out


def _meta_pipeline(spec):
    import bench_models as bm

    m = bm.build_skeleton(spec)
    if hasattr(m, "tie"):
        m.tie()
    return bm.Pipeline(m)


def _tied_groups(model) -> list:
    """Names that share one tensor (a tied embedding and lm_head), from a model before
    ``to_empty`` (which unties)."""
    by_id: dict = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        by_id.setdefault(id(t), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _fill_tied(sd: dict, groups: list) -> dict:
    """safetensors stores a tied tensor once, under one of its names: give it all of them (what a
    user's loading code has to do too, so that ``strict`` loading finds every key)."""
    for names in groups:
        have = [n for n in names if n in sd]
        for n in names:
            if have:
                sd.setdefault(n, sd[have[0]])
    return sd


def _meta_kernels() -> None:
    """Imports torch's Python meta kernels (sympy and others, 820 modules, about 67 MiB private
    and 2 s here with torch 2.13), which the first model built on the meta device imports: an
    import, done before the timers start."""
    import torch

    torch.empty(1, device="meta").normal_()


def _node_pss() -> int:
    """PSS of this driver and the Ray processes it started (not other Ray instances on the
    machine): the minimum of three samples 0.3 s apart (workers settle)."""

    vals = []
    for _ in range(3):
        time.sleep(0.3)
        vals.append(bc.node_pss(root=os.getpid()))
    return min(vals)


def _wait_gone(pids, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < end:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except OSError:
                break
            time.sleep(0.05)


def run_one(name: str, spec_name: str, files: dict, actors: int) -> dict:
    import bench_models as bm
    import ray
    import torch

    spec, _ = _spec(spec_name)
    ref = torch.load(files["ref"])
    store = min(int(files["bytes"] * 2.5) + (256 << 20), int(0.8 * bc.shm_available()))
    ray.init(num_cpus=max(2, actors), include_dashboard=False, log_to_driver=False,
             object_store_memory=store)
    try:
        import safetensors.torch  # noqa: F401  (the driver's imports are not timed)

        import ray_zerocopy.wrappers  # noqa: F401
        from ray_zerocopy import ActorWrapper

        if name in ("ours-from-safetensors", "load-then-wrap"):  # they build on meta
            _meta_kernels()

        @ray.remote(num_cpus=0)
        class Holder:
            def warm(self):
                """The modules a loaded actor has imported; the pid."""
                import importlib

                for mod in ("torch", "safetensors.torch", "bench_models", "ray_zerocopy.wrappers"):
                    importlib.import_module(mod)
                return os.getpid()

            def load(self, handle, spec_name, files):
                # Imports are not in the load time (the handle's were done while unpickling
                # it); they are in the end-to-end time.
                import torch as t2
                from safetensors.torch import load_file

                if handle is None:
                    _meta_kernels()
                t0 = time.perf_counter()
                if handle is not None:
                    self.p = handle.load()
                else:  # actors-*: the actor reads the file itself
                    p = _meta_pipeline(_spec(spec_name)[0])
                    if "pt" in files:
                        sd = t2.load(files["pt"], mmap=True, weights_only=True)
                    else:
                        sd = _fill_tied(load_file(files["ckpt"]), _tied_groups(p.model))
                    if "convert" in files:  # each actor its own converted copy
                        to = getattr(t2, files["convert"])
                        sd = {k: v.to(to) if v.is_floating_point() else v for k, v in sd.items()}
                    p.model.load_state_dict(sd, assign=True)
                    if hasattr(p.model, "tie"):
                        p.model.tie()
                    self.p = p
                return time.perf_counter() - t0

            def run(self, x):
                return self.p(x)

        # Baseline for node memory: N actors that imported what a loaded one has, then stopped
        # (so that the timed span starts N fresh actors, as a user's deployment would).
        idle = [Holder.remote() for _ in range(actors)]
        pids = ray.get([h.warm.remote() for h in idle])
        before = _node_pss()
        for h in idle:
            ray.kill(h)
        _wait_gone(pids)
        del idle
        time.sleep(0.5)

        mine = {k: v for k, v in files.items()
                if k in (("pt",) if name == "actors-torch-load-mmap" else ("ckpt",))
                or k == "convert"}
        convert = {"dtype": getattr(torch, files["convert"])} if "convert" in files else {}
        t0 = time.perf_counter()
        with _PeakAnon() as peak:
            if name == "ours-from-safetensors":
                handle = ActorWrapper.from_safetensors(_meta_pipeline(spec),
                                                       {"model": files["ckpt"]}, **convert)
            elif name == "ours-from-file":
                handle = ActorWrapper.from_file(files["file"])
            elif name == "load-then-wrap":
                from safetensors.torch import load_file

                skeleton = bm.build_skeleton(spec)
                groups = _tied_groups(skeleton)
                model = skeleton.to_empty(device="cpu")
                model.load_state_dict(_fill_tied(load_file(files["ckpt"]), groups))
                if hasattr(model, "tie"):
                    model.tie()
                handle = ActorWrapper(bm.Pipeline(model.eval()))
                del model
            else:
                handle = None
            wrap_s = time.perf_counter() - t0
            wrap_peak = peak.mark()
            hs = [Holder.remote() for _ in range(actors)]
            loads = [h.load.remote(handle, spec_name, mine) for h in hs]
            outs = ray.get([h.run.remote(ref["x"]) for h in hs])
        total_s = time.perf_counter() - t0
        load_s = ray.get(loads)
        grown = _node_pss() - before
        y = ref["y"].float()
        equal = all(torch.allclose(o.float(), y, atol=1e-4, rtol=1e-3) for o in outs)
        return {"total_s": total_s, "wrap_s": wrap_s, "load_s": load_s,
                "driver_anon_peak": peak.growth, "driver_anon_peak_wrap": wrap_peak,
                "driver_shmem": _anon("RssShmem"),
                "node_pss": grown, "equal": bool(equal), "store_bytes": store}
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- report


def _mib(x: float) -> str:
    return f"{x / 2**20:,.0f} MiB" if abs(x) >= 10 * 2**20 else f"{x / 2**20:,.1f} MiB"


def _secs(x: float) -> str:
    return f"{x:.2f} s" if x >= 1 else f"{x * 1e3:,.0f} ms"


def _best(results: dict, key: str):
    vals = [results[n][key] for n in WITHOUT_US if n in results and "error" not in results[n]]
    return min(vals) if vals else None


def _ratio(x, best) -> str:
    return "-" if not best or best <= 0 else f"{x / best:.2f}x"


def _ways(data: dict) -> str:
    names = {r for md in data["models"].values() for r in md.get("results", {})}
    words = ["no", "one", "two", "three", "four", "five"]
    k = len(names) or len(data["meta"].get("contenders", CONTENDERS))
    return words[k] if k < len(words) else str(k)


def markdown(data: dict) -> str:
    """The 'From checkpoint' section: one table per model."""
    meta = data["meta"]
    m = meta.get("machine", {})
    n = meta["actors"]
    converting = [m for m in data["models"] if "@" in m]
    lines = [
        "## From checkpoint"
        + (", converting the dtype" if converting and len(converting) == len(data["models"])
           else "") + "\n",
        ("A model named `NAME@bf16` is the float32 model NAME with a bfloat16 checkpoint: every "
         "contender converts, ours during the store's copy (`dtype=torch.float32`), the "
         "`actors-*` each in its own memory (`.float()`), `load-then-wrap` in the driver's "
         "`load_state_dict`; `ours-from-file` does not apply. Its memory ratios are in float32 "
         "models.\n" if converting else ""),
        f"A checkpoint file on `/dev/shm` to {n} Ray actors answering, {_ways(data)} ways "
        "(`benchmarks/checkpoint_bench.py`; each contender in its own process and Ray, one "
        "after another; files written beforehand, not timed). **File to "
        f"{n} answering**: end to end, the driver's wrap, starting {n} fresh actors, each "
        "loading and answering one call. Of which: the wrap, and the load in an actor (median "
        "of the actors, imports not counted; the actors start together, so a load shares the "
        "CPUs with the others' start-up). **Driver private peak**: the driver's peak "
        "anonymous memory (RssAnon) growth during the wrap, and over the whole span (Ray's "
        "own allocations for starting actors included). **Node memory**: PSS of this Ray's "
        "processes and the driver "
        f"with the {n} actors loaded, minus the same with {n} idle actors that imported the same "
        "modules. The checkpoint file's own pages are RAM for every contender while it stays in "
        "`/dev/shm`: the `actors-*` contenders map them (PSS counts them once), ours copy them "
        "into the object store (PSS counts the store's copy, not the unmapped file). The first "
        "model built on the meta device in a process imports torch's Python meta kernels "
        "(sympy and others, about 67 MiB private and 2 s on 2 busy cores with torch 2.13): the "
        "driver imports them before the clock starts (with its other imports), the `actors-*`"
        " contenders' actors in the end-to-end time and their node memory (not in their load "
        "time). Ratios are "
        "against the best of the two contenders without ray_zerocopy (`actors-load-safetensors`"
        ", `actors-torch-load-mmap`), per column.\n",
        f"- Command: `{meta['command']}`" + (f" (run by `{meta['via']}`)" if meta.get("via")
                                              else "") + f", {meta.get('date', '')}",
        f"- Machine: {m.get('cpu_model', '?')}, {m.get('cpus')} CPUs, "
        f"{m.get('ram_bytes', 0) / 2**30:.1f} GiB RAM, /dev/shm "
        f"{m.get('shm_bytes', 0) / 2**30:.1f} GiB, Linux {m.get('kernel')}; "
        + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
        "- Contenders: `ours-from-safetensors` = `ActorWrapper.from_safetensors(meta_model, "
        "ckpt)`, `w.load()` in the actors; `ours-from-file` = `ActorWrapper.from_file()` of an "
        "arena file (`ray_zerocopy.save`); `load-then-wrap` = model built in the driver, "
        "`load_state_dict(load_file(ckpt))`, `ActorWrapper(model)`; `actors-load-safetensors` = "
        "each actor: meta-device model, `load_state_dict(safetensors.torch.load_file(ckpt), "
        "assign=True)`; `actors-torch-load-mmap` = each actor: meta-device model, "
        "`load_state_dict(torch.load(pt, mmap=True, weights_only=True), assign=True)`.",
        ""]
    for model, md in data["models"].items():
        if "error" in md:
            lines += [f"**{model}**: failed before the contenders ran: {md['error'][-300:]}", ""]
            continue
        size = md.get("model_bytes", md["bytes"])  # "models" are of the model as it runs
        res = md["results"]
        lines.append(f"**{model}** ({md['n_params'] / 1e6:,.0f}M parameters, {md['dtype']}, "
                     f"safetensors file {md['bytes'] / 2**20:,.0f} MiB"
                     + (f", model {size / 2**20:,.0f} MiB: every contender converts"
                        if "model_bytes" in md else "") + f"), {n} actors\n")
        head = ["contender", f"file to {n} answering", "vs best without us", "wrap",
                "load in actor", "driver private peak: wrap / all", "node memory",
                "vs best without us", "output"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        bt, bm_ = _best(res, "total_s"), _best(res, "node_pss")
        for name, r in res.items():
            if "error" in r:
                err = r["error"].strip().splitlines()[-1][-160:].replace("|", "/")
                lines.append(f"| {name} | failed: {err} |" + " |" * (len(head) - 2))
                continue
            lines.append(
                f"| {name} | {_secs(r['total_s'])} | {_ratio(r['total_s'], bt)} | "
                f"{_secs(r['wrap_s'])} | {_secs(statistics.median(r['load_s']))} | "
                f"{_mib(r['driver_anon_peak_wrap']) if 'driver_anon_peak_wrap' in r else '-'} / "
                f"{_mib(r['driver_anon_peak'])} "
                f"({r['driver_anon_peak'] / size:.2f} models) | "
                f"{_mib(r['node_pss'])} ({r['node_pss'] / size:.2f} models) | "
                f"{_ratio(r['node_pss'], bm_)} | {'same' if r['equal'] else 'DIFFERS'} |")
        lines.append("")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- driver


def _contender(name, model, files, actors, timeout) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--model", model, "--actors", str(actors),
           "--_one", name, "--_files", json.dumps(files)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if line:
        return json.loads(line[-1][7:])
    return {"error": f"exit {p.returncode}: " + (p.stderr.strip() or p.stdout.strip())[-600:]}


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # so that the finally blocks remove the files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2-small", help="one or more, comma-separated")
    ap.add_argument("--actors", type=int, default=4)
    ap.add_argument("--only", default="", help="comma-separated contenders")
    ap.add_argument("--json", default="")
    ap.add_argument("--append-docs", default="")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per contender")
    ap.add_argument("--via", default="", help="the command that ran this one (for the docs)")
    ap.add_argument("--_one", default="", help=argparse.SUPPRESS)
    ap.add_argument("--_files", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:  # a contender's own process
        res = run_one(args._one, args.model, json.loads(args._files), args.actors)
        print("RESULT " + json.dumps(res))
        return 0
    signal.signal(signal.SIGTERM, _on_sigterm)

    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(CONTENDERS))
    if unknown:
        ap.error(f"unknown contenders {unknown}; known: {CONTENDERS}")
    contenders = [c for c in CONTENDERS if not only or c in only]
    models = [s for s in args.model.split(",") if s]
    command = (f"python benchmarks/checkpoint_bench.py --model {shlex.quote(','.join(models))} "
               f"--actors {args.actors}" + (f" --only {shlex.quote(args.only)}" if only else ""))
    vers = {k: v for k, v in bc.versions().items() if k in ("python", "torch", "ray")}
    try:
        from importlib import metadata

        vers["safetensors"] = metadata.version("safetensors")
    except Exception:  # noqa: BLE001 - best effort
        pass
    data = {"meta": {"command": command, "via": args.via, "actors": args.actors,
                     "date": time.strftime("%Y-%m-%d %H:%M"), "machine": bc.machine_info(),
                     "versions": vers, "contenders": contenders},
            "models": {}}
    folder = tempfile.mkdtemp(prefix="rzc-ckpt-bench-", dir=SHM)
    try:
        for model in models:
            sub = os.path.join(folder, model)
            os.mkdir(sub)
            print(f"== {model}: writing the files into {sub}", flush=True)
            p = subprocess.run(
                [sys.executable, "-c",
                 f"import json, sys; sys.path.insert(0, {HERE!r}); import checkpoint_bench as c; "
                 f"print(json.dumps(c.prepare({model!r}, {sub!r}, {contenders!r})))"],
                capture_output=True, text=True)
            if p.returncode != 0:
                data["models"][model] = {"error": p.stderr.strip()[-600:]}
                print("   prepare failed:", p.stderr.strip()[-600:], flush=True)
                shutil.rmtree(sub, ignore_errors=True)
                continue
            files = json.loads(p.stdout.strip().splitlines()[-1])
            md = {k: files[k] for k in ("bytes", "n_params", "dtype")}
            md["results"] = {}
            data["models"][model] = md
            paths = {k: v for k, v in files.items()
                     if k in ("ckpt", "file", "pt", "ref", "bytes", "convert")}
            if "convert" in files:
                md["model_bytes"] = files["model_bytes"]
            for name in contenders:
                if name == "ours-from-file" and "file" not in files:
                    continue  # a converting checkpoint: no arena file of it
                print(f"-- {model} / {name}", flush=True)
                t = time.perf_counter()
                md["results"][name] = r = _contender(name, model, paths, args.actors,
                                                     args.timeout)
                print(f"   ({time.perf_counter() - t:.0f} s) {r}", flush=True)
            shutil.rmtree(sub, ignore_errors=True)  # frees /dev/shm before the next model
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    bc.emit_section(markdown(data), data, args.json, args.append_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
