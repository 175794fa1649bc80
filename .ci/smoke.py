"""Smoke test of an installed ray_zerocopy (a wheel or an sdist build), run outside the source tree.

Checks that the installed package (not the source tree) is imported, that its version is the one
in the metadata, that py.typed ships, that pack/unpack round-trips, and that one TaskWrapper call
on a local Ray returns what the model returns.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata, resources

import torch
from torch import nn

import ray_zerocopy as rzc

here = os.path.dirname(os.path.abspath(rzc.__file__))
assert "site-packages" in here, f"imported from {here}, not from the installed package"
assert metadata.version("ray_zerocopy") == rzc.__version__, (
    metadata.version("ray_zerocopy"),
    rzc.__version__,
)
assert (resources.files("ray_zerocopy") / "py.typed").is_file(), "py.typed is missing"

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
x = torch.randn(3, 16)
with torch.inference_mode():
    want = model(x)

skeleton, arena = rzc.pack(model)
with torch.inference_mode():
    assert torch.equal(rzc.unpack(skeleton, arena)(x), want), "pack/unpack changed the outputs"

import ray  # noqa: E402

ray.init(
    num_cpus=1,
    include_dashboard=False,
    object_store_memory=100 << 20,
    configure_logging=False,
    log_to_driver=False,
)
try:
    with torch.inference_mode():
        assert torch.equal(rzc.TaskWrapper(model)(x), want), "TaskWrapper changed the outputs"
finally:
    ray.shutdown()
print(
    f"smoke: ray_zerocopy {rzc.__version__} from {here}: pack/unpack and TaskWrapper OK "
    f"(python {sys.version.split()[0]}, torch {torch.__version__}, ray {ray.__version__})"
)
