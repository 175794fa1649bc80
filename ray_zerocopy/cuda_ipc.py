"""One device copy of an arena shared by several processes on one GPU, through CUDA IPC.

A *holder* process uploads the arena's data region into one device allocation and exports
it with one IPC handle (torch's ``reduce_tensor``: one handle for the whole arena, not one per
tensor). *Consumers* on the same GPU open the handle and build their tensor views into the
holder's allocation: no device copy, no host-to-device transfer.

Lifetime: the holder must outlive its consumers (CUDA IPC memory is owned by the exporting
process); when the holder drops its :class:`DeviceCopy`, the device memory is freed once the
consumers have closed it.

This module needs no Ray. The Ray integration (a holder actor per wrapper and GPU, opted into
with ``share_device_copy=True``) is :mod:`ray_zerocopy.device_share`; see docs/device.md.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from . import _zc
from .device import resolve_device, upload
from .unpack import device_views

__all__ = ["DeviceCopy", "export_handle", "open_views", "measure_shared_copy"]


class DeviceCopy:
    """The holder's side: the data region of an arena in one device allocation.

    Args:
        buffer: the arena (host memory, e.g. from ``ray.get``).
        device: a CUDA device.
        fast_load: copy through pinned staging buffers.
    """

    def __init__(self, buffer: Any, device: Any = "cuda", fast_load: bool = True):
        self.device = resolve_device(device)
        if self.device.type != "cuda":
            raise ValueError("DeviceCopy needs a CUDA device")
        mapping = _zc.Mapping(buffer)
        info = _zc.parse(mapping)
        self.info = {k: info[k] for k in ("data_offset", "data_size", "manifest_crc")}
        self.tensors = info["tensors"]
        self.buffer = upload(
            mapping, info["data_offset"], info["data_size"], self.device, fast=fast_load
        )
        del mapping

    def handle(self) -> tuple:
        """A picklable description: the IPC handle of the allocation plus the manifest."""
        return export_handle(self.buffer), self.info, self.tensors


def export_handle(device_buffer: torch.Tensor) -> tuple:
    """Returns a picklable (rebuild function, args) pair for one CUDA tensor (CUDA IPC)."""
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(device_buffer)


def open_views(handle: tuple) -> list[torch.Tensor]:
    """The consumer's side: opens a :meth:`DeviceCopy.handle` and returns the tensor views
    (parameters as ``nn.Parameter``), in manifest order, all inside the holder's allocation."""
    (rebuild_fn, args), info, tensors = handle
    views = device_views(rebuild_fn(*args), tensors, info["data_offset"])
    return [
        nn.Parameter(v, requires_grad=False) if e[6] == _zc.KIND_PARAMETER else v
        for v, e in zip(views, tensors)
    ]


def _consumer(handle, q, n_tensors):  # pragma: no cover - runs in a child process
    torch.cuda.init()
    views = open_views(handle)
    torch.cuda.synchronize()
    x = sum(float(v.float().sum().item()) for v in views[:4])
    q.put((os.getpid(), len(views) == n_tensors, torch.cuda.memory_allocated(), x))
    q.get()  # wait until the parent has measured


def _private(buffer_path, q):  # pragma: no cover - runs in a child process
    import numpy as np

    torch.cuda.init()
    arena = np.fromfile(buffer_path, dtype=np.uint8)
    m = _zc.Mapping(arena)
    info = _zc.parse(m)
    dev = upload(m, info["data_offset"], info["data_size"], torch.device("cuda", 0))
    torch.cuda.synchronize()
    q.put((os.getpid(), True, torch.cuda.memory_allocated(), float(dev.numel())))
    q.get()


def measure_shared_copy(gib: float = 2.0, consumers: int = 4) -> dict:
    """Device memory for ``consumers`` processes using one model: one shared IPC copy against
    one private copy each. Returns figures in GiB (device-wide used memory, from
    ``cudaMemGetInfo``, minus the same with idle CUDA contexts)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    nbytes = int(gib * 2**30)
    m = nn.Module()
    m.w = nn.Parameter(torch.ones(nbytes // 2, dtype=torch.float16), requires_grad=False)
    from .pack import pack

    arena = pack(m).arena
    del m
    dev = torch.device("cuda", 0)

    def used() -> int:
        free, total = torch.cuda.mem_get_info(dev)
        return total - free

    def collect(q, procs, timeout=120.0) -> list:
        """Reports from every child, or an error naming the children that died or hung."""
        import queue
        import time

        reports: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(reports) < len(procs):
            try:
                reports.append(q.get(timeout=1.0))
            except queue.Empty:
                dead = [(p.pid, p.exitcode) for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    for p in procs:
                        p.kill()
                    raise RuntimeError(
                        f"CUDA IPC measurement: {len(reports)}/{len(procs)} child "
                        f"processes reported; died (pid, exit code): {dead}"
                    ) from None
        return reports

    def run(target, args_for) -> tuple[int, list]:
        q = ctx.Queue()
        procs = [ctx.Process(target=target, args=args_for(q)) for _ in range(consumers)]
        for p in procs:
            p.start()
        reports = collect(q, procs)
        u = used()
        for _ in procs:
            q.put("done")
        for p in procs:
            p.join(timeout=60)
        return u, reports

    torch.cuda.init()
    base = used()
    # CUDA contexts alone: consumers that open nothing.
    q0 = ctx.Queue()
    idle = [ctx.Process(target=_idle, args=(q0,)) for _ in range(consumers)]
    for p in idle:
        p.start()
    collect(q0, idle)
    contexts = used() - base
    for _ in idle:
        q0.put("done")
    for p in idle:
        p.join(timeout=60)

    holder: DeviceCopy | None  # None once the shared copy is freed, below
    handle: tuple | None
    holder = DeviceCopy(arena, dev)
    handle = holder.handle()
    n_tensors = len(holder.tensors)
    shared_used, rep = run(_consumer, lambda q: (handle, q, n_tensors))
    shared = shared_used - base - contexts
    consumer_alloc = max(r[2] for r in rep)
    ok = all(r[1] for r in rep)
    holder = handle = None  # frees the shared copy (the consumers have exited)
    torch.cuda.empty_cache()

    path = f"/dev/shm/rzc_ipc_{os.getpid()}.arena"
    arena.tofile(path)
    base2 = used()
    private_used, _ = run(_private, lambda q: (path, q))
    private = private_used - base2 - contexts
    os.unlink(path)
    g = 2**30
    return {
        "consumers": consumers,
        "model_GiB": round(arena.nbytes / g, 3),
        "contexts_GiB": round(contexts / g, 3),
        "shared_copy_weights_GiB": round(shared / g, 3),
        "private_copies_weights_GiB": round(private / g, 3),
        "shared_over_model": round(shared / arena.nbytes, 3),
        "private_over_model": round(private / arena.nbytes, 3),
        "consumer_allocator_bytes": consumer_alloc,
        "views_ok": ok,
    }


def _idle(q):  # pragma: no cover - runs in a child process
    torch.cuda.init()
    torch.empty(1, device="cuda")
    q.put(os.getpid())
    q.get()
