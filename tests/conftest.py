"""Shared fixtures: one Ray instance for the whole session, started only if a test needs it."""

from __future__ import annotations

import os
import pickle
import sys

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Idle workers drop cached arenas quickly, so lifecycle tests need not wait long.
os.environ.setdefault("RAY_ZEROCOPY_CACHE_TTL", "2")
sys.path.insert(0, os.path.dirname(__file__))
# Ray workers inherit the driver's environment: let them import the test modules (and
# models.py), whose classes cloudpickle pickles by reference, as a user's own modules would be.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [os.path.dirname(os.path.abspath(__file__))] + [p for p in [os.environ.get("PYTHONPATH")] if p])

OBJECT_STORE_BYTES = 1 << 30


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
                 log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()


def ray_like_roundtrip(obj):
    """Pickles with protocol 5 and hands the out-of-band buffers back read-only, as ray.get does."""
    buffers = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    ro = [memoryview(b.raw()).toreadonly() for b in buffers]
    return pickle.loads(data, buffers=ro)
