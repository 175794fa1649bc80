"""A fake device for the shared-device-copy tests on machines without a GPU.

It stands behind the same seam as CUDA (ray_zerocopy.device_share.DeviceBackend):

- the "GPU" a process uses is named by the environment variable ``RZC_FAKE_GPU`` (default
  ``GPU-fake-0``), as a CUDA UUID names the physical GPU behind a remapped ``cuda:0``;
- a holder's "device allocation" is an anonymous shared-memory file (``memfd``) that lives as
  long as the holder process, and the handle is ``(pid, fd)``: another process opens it through
  ``/proc/<pid>/fd/<fd>`` and maps it (no copy), as CUDA IPC opens the holder's allocation.
  When the holder exits the file cannot be opened any more, and mappings already made stay
  valid (unlike CUDA, where they must not outlive the holder);
- every upload leaves a marker file in ``/dev/shm/rzc_fake_device/`` named after the GPU and
  the holder's pid, so tests count device copies per GPU across processes.

Select it in the wrapping process with
``RAY_ZEROCOPY_DEVICE_BACKEND=fake_device:FakeBackend`` (tests/ is on the workers' path).
"""

from __future__ import annotations

import mmap
import os

import torch

from ray_zerocopy import _zc
from ray_zerocopy.errors import DeviceError

LOG_DIR = "/dev/shm/rzc_fake_device"
#: A "GPU" whose holder fails to upload, to test how that failure reaches consumers.
BROKEN = "GPU-fake-broken"


def uploads(prefix: str) -> list[str]:
    """The upload markers of GPUs whose id starts with ``prefix``."""
    try:
        return sorted(f for f in os.listdir(LOG_DIR) if f.startswith(prefix))
    except FileNotFoundError:
        return []


class FakeBackend:
    def physical_id(self, device):
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type != "cuda":
            raise DeviceError(f"share_device_copy needs a CUDA device, got {device!r}")
        return os.environ.get("RZC_FAKE_GPU", "GPU-fake-0"), torch.device("cpu")

    def holder_env(self, physical_id):
        return {}

    def upload(self, mapping, offset, size, physical_id):
        if physical_id == BROKEN:
            raise DeviceError(f"fake device {physical_id} is out of memory")
        fd = os.memfd_create(f"rzc-fake-{physical_id}")
        os.ftruncate(fd, max(size, 1))
        mm = mmap.mmap(fd, max(size, 1))
        if size:
            _zc.copy(mm, 0, mapping, offset, size, 0)
        os.makedirs(LOG_DIR, exist_ok=True)
        with open(os.path.join(LOG_DIR, f"{physical_id}.{os.getpid()}.{fd}"), "w") as f:
            f.write(str(size))
        return (fd, mm), ("fake", physical_id, os.getpid(), fd, size)

    def open(self, handle, device):
        kind, physical_id, pid, fd, size = handle
        mine = os.environ.get("RZC_FAKE_GPU", "GPU-fake-0")
        if kind != "fake" or physical_id != mine:
            raise DeviceError(f"the shared device copy is on {physical_id}, this process uses {mine}")
        try:
            with open(f"/proc/{pid}/fd/{fd}", "r+b") as f:
                mm = mmap.mmap(f.fileno(), max(size, 1))
        except OSError as exc:
            raise DeviceError(f"cannot open the fake device copy of holder {pid}: {exc}") from exc
        return torch.frombuffer(mm, dtype=torch.uint8, count=size) if size else \
            torch.empty(0, dtype=torch.uint8)
