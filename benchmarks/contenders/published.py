"""The published library, ray-zerocopy 0.2.0 from PyPI (runs in bench-venv, same import name)."""


class PublishedActor:
    name, kind, copies_per_actor = "published-actor", "actor", 0

    def __init__(self):
        import ray_zerocopy  # noqa: F401  (imported before the wrap is timed)

    def wrap(self, pipeline, spec):
        from ray_zerocopy import ModelWrapper
        return ModelWrapper.from_model(pipeline, mode="actor")

    def load(self, handle, spec):
        return handle.load()


class PublishedTask:
    name, kind, copies_per_actor = "published-task", "task", 0

    def __init__(self):
        import ray_zerocopy  # noqa: F401  (imported before the wrap is timed)

    def wrap(self, pipeline, spec):
        from ray_zerocopy import ModelWrapper
        return ModelWrapper.for_tasks(pipeline)

    def task_callable(self, handle):
        return handle


ADAPTERS = {"published-actor": PublishedActor, "published-task": PublishedTask}
