"""Contender adapters: one module per library, each ADAPTERS = {name: class}.

An adapter has ``name``, ``kind`` ("actor" or "task"), ``copies_per_actor`` (how many private
copies of the weights an actor is expected to hold; used only to skip memory configurations
that cannot fit), ``wrap(pipeline, spec)`` (driver), ``load(handle, spec)`` (inside an actor,
returns a usable pipeline) and, for task adapters, ``task_callable(handle)``.
"""

import importlib

MODULES = {
    "ours-task": "ours", "ours-actor": "ours", "ours-actor-fastload": "ours",
    "published-task": "published", "published-actor": "published",
    "ray-zerocopy-tensors": "ray_native",
    "plain-put": "plain", "plain-file": "plain",
}


def get_adapter(name):
    mod = importlib.import_module(f"contenders.{MODULES[name]}")
    return mod.ADAPTERS[name]()
