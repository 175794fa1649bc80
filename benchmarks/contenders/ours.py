"""This project: ray_zerocopy.TaskWrapper / ActorWrapper (runs in .venv)."""


class OursActor:
    name, kind, copies_per_actor = "ours-actor", "actor", 0

    def __init__(self):
        import ray_zerocopy.wrappers  # noqa: F401  (imported before the wrap is timed)

    def wrap(self, pipeline, spec):
        from ray_zerocopy import ActorWrapper
        return ActorWrapper(pipeline)

    def load(self, handle, spec):
        return handle.load()


class OursTask:
    name, kind, copies_per_actor = "ours-task", "task", 0

    def __init__(self):
        import ray_zerocopy.wrappers  # noqa: F401  (imported before the wrap is timed)

    def wrap(self, pipeline, spec):
        from ray_zerocopy import TaskWrapper
        return TaskWrapper(pipeline)

    def task_callable(self, handle):
        return handle


class OursActorFast(OursActor):
    """use_fast_load=True: the page tables are populated while loading (first inference
    without page faults), so load latency grows with the bytes and first inference shrinks."""

    name = "ours-actor-fastload"

    def wrap(self, pipeline, spec):
        from ray_zerocopy import ActorWrapper
        return ActorWrapper(pipeline, use_fast_load=True)


ADAPTERS = {"ours-actor": OursActor, "ours-task": OursTask, "ours-actor-fastload": OursActorFast}
