"""Plain copies: ray.put(pipeline) handed to every actor (ray.get copies the tensors), and every
actor torch.load-ing a state_dict file saved once (in the system's temp directory)."""

import os
import tempfile


class PlainPut:
    name, kind, copies_per_actor = "plain-put", "actor", 1

    def wrap(self, pipeline, spec):
        import ray
        return {"ref": ray.put(pipeline)}

    def load(self, handle, spec):
        import ray
        return ray.get(handle["ref"])


class PlainFile:
    name, kind, copies_per_actor = "plain-file", "actor", 1

    def wrap(self, pipeline, spec):
        import torch
        fd, path = tempfile.mkstemp(prefix="zc_bench_", suffix=".pt")
        os.close(fd)
        torch.save(pipeline.model.state_dict(), path)
        return {"path": path}

    def load(self, handle, spec):
        import torch
        from bench_models import Pipeline, build_skeleton
        sd = torch.load(handle["path"], map_location="cpu", weights_only=True)
        model = build_skeleton(spec)
        model.load_state_dict(sd, assign=True)
        model.tie()
        return Pipeline(model.eval())

    def release(self, handle):
        try:
            os.unlink(handle["path"])
        except OSError:
            pass


ADAPTERS = {"plain-put": PlainPut, "plain-file": PlainFile}
