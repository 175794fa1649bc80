"""The one-copy wrap in a fresh Ray of its own: the driver's peak extra memory on a first wrap,
and a wrapper whose object is spilled to disk and restored.

Prints one JSON line; run by tests/test_store_path.py in its own process (a fresh process and
object store, so that the store pages the wrap writes are new to the driver's RSS).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

import ray_zerocopy as rzc  # noqa: E402
from ray_zerocopy import wrappers  # noqa: E402,F401
from models import big_mlp, n_bytes  # noqa: E402


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> int:
    spill_dir = sys.argv[1]
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=200 << 20,
             _system_config={"object_spilling_config": json.dumps(
                 {"type": "filesystem", "params": {"directory_path": spill_dir}}),
                 "min_spilling_size": 0})
    try:
        model = big_mlp(48 << 20)
        weights = n_bytes(model)
        rzc.ActorWrapper(torch.nn.Linear(4, 4))  # imports and first-put set-up, not measured
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        before = _vm("VmRSS")
        w = rzc.ActorWrapper(model)
        peak = _vm("VmHWM") - before

        # Fill the store so that the wrapper's object (not in use: nothing maps it) is spilled.
        fillers = [ray.put(np.ones(60 << 20, dtype=np.uint8)) for _ in range(4)]
        spilled = sum(1 for _, _, files in os.walk(spill_dir) for _ in files)

        @ray.remote(num_cpus=0)
        def check(wrapper, x):
            p = wrapper.load()
            arena = ray.get(wrapper.object_ref)[1]
            lo, hi = arena.address, arena.address + arena.size
            inside = all(lo <= t.data_ptr() and t.data_ptr() + t.untyped_storage().nbytes() <= hi
                         for t in p.parameters())
            with torch.inference_mode():
                return type(arena).__name__, inside, p(x)

        del fillers
        x = torch.randn(2, model[0].in_features)
        kind, inside, y = ray.get(check.remote(w, x))
        with torch.inference_mode():
            equal = torch.allclose(y, model(x), atol=1e-5)
        print(json.dumps({"weights": weights, "peak": peak, "spilled_files": spilled,
                          "restored_kind": kind, "inside": inside, "equal": bool(equal)}))
        return 0
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
