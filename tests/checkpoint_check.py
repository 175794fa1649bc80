"""The driver's memory while it wraps a safetensors checkpoint, in a fresh process and Ray.

Usage: checkpoint_check.py DIR BYTES [--no-prefetch] [--bf16-to-fp32 [--staged]]

Writes a checkpoint of an MLP of about BYTES (in a child process, so that this one never holds
the weights), then, in this process: builds the MLP on the meta device, wraps it with
``TaskWrapper.from_safetensors`` while a thread samples /proc/self/status every millisecond,
runs it once and compares with the model loaded normally. Prints one JSON line:

- ``anon_peak``: peak growth of RssAnon (the driver's private, anonymous memory: what a copy of
  the weights in the driver would show up in) over its value before the wrap;
- ``file_peak``: peak growth of RssFile (the checkpoint's page-cache pages mapped while Ray copies
  them; clean, shared with the page cache, dropped when the wrap ends);
- ``shmem_peak``: peak growth of RssShmem (the object store's pages this process wrote);
- ``uss_after``: growth of USS (Private_Clean + Private_Dirty of smaps_rollup) once the wrap is
  done: the object store's pages this process wrote are counted there while no other process
  maps them (``shmem_after``); ``file_after``: the checkpoint's pages still mapped (none: the
  mapping ends with the wrap); ``weights``, ``seconds``, ``equal``.

Run by tests/test_checkpoints.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def _uss() -> int:
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


def write(path: str, nbytes: int, bf16: bool) -> None:
    import torch
    from models import big_mlp
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = big_mlp(nbytes).state_dict()
    if bf16:
        sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    save_file(sd, path)


def main() -> int:
    bf16 = "--bf16-to-fp32" in sys.argv
    if sys.argv[1] == "--write":
        write(sys.argv[2], int(sys.argv[3]), bf16)
        return 0
    folder, nbytes = sys.argv[1], int(sys.argv[2])
    prefetch = "--no-prefetch" not in sys.argv
    path = os.path.join(folder, "model.safetensors")
    subprocess.run([sys.executable, os.path.abspath(__file__), "--write", path, str(nbytes)]
                   + (["--bf16-to-fp32"] if bf16 else []), check=True)
    weights = os.path.getsize(path)

    import ray
    import torch
    from models import big_mlp
    from safetensors.torch import load_file

    from ray_zerocopy import TaskWrapper, _zc

    if "--staged" in sys.argv:
        _zc.convert_supported = lambda dst, src: False
    from ray_zerocopy.files import CheckpointSource

    torch.set_num_threads(1)
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=int(weights * 2.5) + (64 << 20),
             log_to_driver=False)
    try:
        # Imports and the first put's set-up, not measured.
        small = os.path.join(folder, "small.safetensors")
        from safetensors.torch import save_file

        save_file(torch.nn.Linear(4, 4).state_dict(), small)
        with torch.device("meta"):
            warm = torch.nn.Linear(4, 4)
        TaskWrapper.from_safetensors(warm, small)

        with torch.device("meta"):
            meta = big_mlp(nbytes)
        base, base_uss = _status(), _uss()
        _zc.lazy_totals(reset_peak=True)
        peak = dict(base)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for k, v in _status().items():
                    peak[k] = max(peak[k], v)
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        source = CheckpointSource(meta, path, prefetch=prefetch,
                                  dtype=torch.float32 if bf16 else None)
        w = TaskWrapper(source)
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
        for k, v in _status().items():
            peak[k] = max(peak[k], v)
        staged, converted = source.staged_bytes, source.converted_bytes
        del source  # holds the checkpoint's mappings, as a wrap from a temporary would not
        lazy = _zc.lazy_totals()
        uss_after = _uss() - base_uss
        after = _status()

        x = torch.randn(2, 1024)
        got = w(x)
        sd = load_file(path)
        ref = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(len(sd) // 2)])
        ref.load_state_dict({k: v.float() for k, v in sd.items()})
        with torch.inference_mode():
            equal = torch.allclose(got, ref.eval()(x), atol=1e-5)
        print(json.dumps({
            "weights": weights, "seconds": round(seconds, 3), "prefetch": prefetch,
            "anon_peak": peak["RssAnon"] - base["RssAnon"],
            "file_peak": peak["RssFile"] - base["RssFile"],
            "shmem_peak": peak["RssShmem"] - base["RssShmem"],
            "uss_after": uss_after, "file_after": after["RssFile"] - base["RssFile"],
            "shmem_after": after["RssShmem"] - base["RssShmem"], "equal": bool(equal),
            "staged": staged, "converted": converted, "lazy": lazy}))
        return 0
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
