"""Device placement: moving an arena's data region to a GPU as one allocation.

Two paths (docs/device.md):

- plain: one ``copy_`` of the whole data region from the (pageable) mapping;
- fast (``use_fast_load=True``): a pipeline of pinned staging buffers. Threads of the C core
  copy the next chunk from the mapping into a pinned buffer (GIL released) while the previous
  chunk moves host -> device asynchronously on a CUDA stream; events say when a staging buffer
  may be reused. This reaches PCIe speed without pinning (registering) the mapping itself.

A third path, ``register``, pins the mapping with ``cudaHostRegister`` for one copy; it is
kept for the benchmarks (it costs about 35 ms/GiB to register, every load).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from . import _zc
from .errors import DeviceError

__all__ = ["resolve_device", "upload", "STAGING_CHUNK", "STAGING_BUFFERS"]

#: Bytes per pinned staging buffer of the fast path.
STAGING_CHUNK = int(os.environ.get("RAY_ZEROCOPY_STAGING_CHUNK", 64 << 20))
#: Number of pinned staging buffers in flight.
STAGING_BUFFERS = int(os.environ.get("RAY_ZEROCOPY_STAGING_BUFFERS", 3))

_staging_cache: dict[tuple[int, int], list[torch.Tensor]] = {}


def parse_device(device: Any) -> torch.device:
    """Parses a device string or object without checking that the device exists.

    Raises:
        DeviceError: the string is not a torch device, or names a type other than cpu/cuda.
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(
            f"device {device!r} is not a valid device: use None, 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {device!r}: only 'cpu' and 'cuda[:N]' are supported")
    return dev


def resolve_device(device: Any) -> torch.device:
    """Parses a device and checks that it is present in this process.

    Raises:
        DeviceError: malformed, or a CUDA device this process cannot see.
    """
    dev = parse_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but CUDA is not available in this "
                              f"process (torch {torch.__version__})")
        n = torch.cuda.device_count()
        idx = 0 if dev.index is None else dev.index
        if idx >= n:
            raise DeviceError(f"device {device!r} requested but this process sees {n} CUDA "
                              f"device(s) (cuda:0 .. cuda:{n - 1})")
        dev = torch.device("cuda", idx)
    return dev


def _host_view(mapping: Any, offset: int, size: int) -> torch.Tensor:
    return torch.frombuffer(mapping, dtype=torch.uint8, count=size, offset=offset)


def _staging(device: torch.device, chunk: int, count: int) -> list[torch.Tensor]:
    key = (device.index or 0, chunk)
    bufs = _staging_cache.get(key)
    if bufs is None or len(bufs) < count:
        bufs = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
        _staging_cache[key] = bufs
    return bufs


def upload_plain(mapping: Any, offset: int, size: int, device: torch.device) -> torch.Tensor:
    """One pageable copy of ``size`` bytes at ``offset`` of the mapping to a new device buffer."""
    dst = torch.empty(size, dtype=torch.uint8, device=device)
    if size:
        dst.copy_(_host_view(mapping, offset, size))
    return dst


def upload_staged(mapping: Any, offset: int, size: int, device: torch.device, *,
                  chunk: int | None = None, nbuf: int | None = None,
                  nthreads: int = 0) -> torch.Tensor:
    """Copies through pinned staging buffers, double (or more) buffered on a CUDA stream."""
    chunk = chunk or STAGING_CHUNK
    nbuf = max(2, nbuf or STAGING_BUFFERS)
    dst = torch.empty(size, dtype=torch.uint8, device=device)
    if not size:
        return dst
    # 16 host threads moved 29.5 GB/s on an H100 machine against 23 GB/s with 8 and 14 GB/s
    # with 4 (benchmarks/gpu_results): the host copy is the bottleneck, so use the cores.
    nthreads = nthreads or min(16, os.cpu_count() or 1)
    bufs = _staging(device, chunk, nbuf)
    events: list[torch.cuda.Event | None] = [None] * nbuf
    stream = torch.cuda.Stream(device=device)
    pos, k = 0, 0
    with torch.cuda.device(device):
        while pos < size:
            n = min(chunk, size - pos)
            slot = k % nbuf
            ev = events[slot]
            if ev is not None:
                ev.synchronize()  # the copy that last read this staging buffer is done
            _zc.copy_to_ptr(bufs[slot].data_ptr(), mapping, offset + pos, n, nthreads)
            with torch.cuda.stream(stream):
                dst[pos:pos + n].copy_(bufs[slot][:n], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            events[slot] = ev
            pos += n
            k += 1
        stream.synchronize()
    return dst


def upload_registered(mapping: Any, offset: int, size: int, device: torch.device) -> torch.Tensor:
    """Registers (pins) the mapping with CUDA, copies once, unregisters."""
    dst = torch.empty(size, dtype=torch.uint8, device=device)
    if not size:
        return dst
    host = _host_view(mapping, offset, size)
    cudart = torch.cuda.cudart()
    ptr = host.data_ptr()
    # cudaHostRegisterReadOnly (8): the device only reads, which also works on a read-only
    # mapping. (A failed registration leaves CUDA's last-error set, which torch would then
    # report at its next kernel launch, so don't probe with flags that may fail.)
    err = cudart.cudaHostRegister(ptr, size, 8)
    if int(err) != 0:
        # Registration can fail (e.g. read-only mappings on old drivers): fall back.
        dst.copy_(host)
        return dst
    try:
        dst.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
    finally:
        cudart.cudaHostUnregister(ptr)
    return dst


def upload(mapping: Any, offset: int, size: int, device: torch.device, *, fast: bool = False,
           nthreads: int = 0, method: str | None = None) -> torch.Tensor:
    """Copies the data region of an arena to ``device``; returns one uint8 device tensor.

    Args:
        mapping: the arena's buffer (a ``_zc.Mapping``).
        offset, size: the data region.
        device: a resolved CUDA device.
        fast: use the pinned staging pipeline (``use_fast_load=True``).
        method: force ``"plain"``, ``"staged"`` or ``"register"`` (benchmarks).
    """
    method = method or ("staged" if fast else "plain")
    if method == "staged":
        return upload_staged(mapping, offset, size, device, nthreads=nthreads)
    if method == "register":
        return upload_registered(mapping, offset, size, device)
    if method == "plain":
        return upload_plain(mapping, offset, size, device)
    raise ValueError(f"unknown upload method {method!r}")
