"""Several Ray nodes on this machine (ray.cluster_utils.Cluster): each node maps the weights
zero-copy from its own object store, and calls keep working when a node is removed.

Prints one JSON line; run by tests/test_reliability.py in its own process.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ray  # noqa: E402
import torch  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import ray_zerocopy as rzc  # noqa: E402
from models import mlp  # noqa: E402


def main() -> int:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 150 << 20, "resources": {"node0": 1}})
    second = cluster.add_node(num_cpus=1, object_store_memory=150 << 20, resources={"node1": 1})
    ray.init(address=cluster.address, include_dashboard=False)
    cluster.wait_for_nodes()
    try:
        model = mlp(width=256)
        aw = rzc.ActorWrapper(model)

        @ray.remote(num_cpus=0)
        class Probe:
            def check(self, w, x):
                p = w.load()
                arena = ray.get(w.object_ref)[1]
                lo, hi = arena.address, arena.address + arena.size
                inside = all(lo <= t.data_ptr() and t.data_ptr() + t.untyped_storage().nbytes() <= hi
                             for t in p.parameters())
                with torch.inference_mode():
                    y = p(x)
                return ray.get_runtime_context().get_node_id(), inside, y

        x = torch.randn(2, 256)
        want = model(x).detach()
        probes = [Probe.options(resources={f"node{i}": 0.01}).remote() for i in range(2)]
        results = ray.get([p.check.remote(aw, x) for p in probes])
        nodes = sorted({r[0] for r in results})
        inside = [r[1] for r in results]
        equal = all(torch.allclose(r[2], want, atol=1e-5) for r in results)

        wrapped = rzc.TaskWrapper(model)
        before = wrapped(x)
        for p in probes:
            ray.kill(p)
        cluster.remove_node(second)
        after = wrapped(x)
        ok = torch.allclose(before, want, atol=1e-5) and torch.allclose(after, want, atol=1e-5)
        print(json.dumps({"nodes": nodes, "inside": inside, "equal": equal,
                          "after_removal_ok": bool(ok and equal)}))
        return 0
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
