"""This project: ray_zerocopy.TaskWrapper / ActorWrapper (runs in .venv)."""


class OursActor:
    name, kind, copies_per_actor = "ours-actor", "actor", 0

    def wrap(self, pipeline, spec):
        from ray_zerocopy import ActorWrapper
        return ActorWrapper(pipeline)

    def load(self, handle, spec):
        return handle.load()


class OursTask:
    name, kind, copies_per_actor = "ours-task", "task", 0

    def wrap(self, pipeline, spec):
        from ray_zerocopy import TaskWrapper
        return TaskWrapper(pipeline)

    def task_callable(self, handle):
        return handle


ADAPTERS = {"ours-actor": OursActor, "ours-task": OursTask}
