"""Ray's own zero-copy torch tensors: RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1 (set by run.py for the
whole contender process and its workers), ray.put(state_dict), load_state_dict(assign=True) on a
meta-device skeleton in the worker."""

import os


def available():
    from ray._private import ray_constants
    return hasattr(ray_constants, "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS")


class RayZeroCopyTensors:
    name, kind, copies_per_actor = "ray-zerocopy-tensors", "actor", 0

    def wrap(self, pipeline, spec):
        import ray
        if os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS") != "1":
            raise RuntimeError("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1 is not set")
        return {"ref": ray.put(pipeline.model.state_dict())}

    def load(self, handle, spec):
        import ray
        from bench_models import Pipeline, build_skeleton
        sd = ray.get(handle["ref"])
        model = build_skeleton(spec)
        model.load_state_dict(sd, assign=True)
        model.tie()
        return Pipeline(model.eval())


ADAPTERS = {"ray-zerocopy-tensors": RayZeroCopyTensors}
