"""Device placement: moving an arena's data region to a GPU as one allocation.

Two paths (docs/device.md):

- plain: one ``copy_`` of the whole data region from the (pageable) mapping;
- fast (``use_fast_load=True``): a pipeline of pinned staging buffers. A persistent thread
  pool of the C core copies the next chunk from the mapping into a pinned buffer (GIL
  released, non-temporal stores where they help) while the previous chunk moves host ->
  device asynchronously on a CUDA stream; events say when a staging buffer may be reused.
  This reaches PCIe speed without pinning (registering) the mapping itself.

The pipeline's loop (:func:`staged_copy`) talks to the device through one small seam,
:class:`StagingDevice`: allocate the destination, give the staging buffers, start an
asynchronous copy from a staging buffer, wait until a staging buffer is free again. The CUDA
implementation is :class:`CudaStaging`; the tests drive the same loop with a fake device on
the CPU (tests/test_staging.py).

A third path, ``register``, pins the mapping with ``cudaHostRegister`` for one copy; it is
kept for the benchmarks (it costs about 35 ms/GiB to register, every load).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Protocol

import torch

from . import _zc
from .errors import DeviceError

__all__ = [
    "resolve_device",
    "upload",
    "staged_copy",
    "StagingDevice",
    "CudaStaging",
    "host_pool",
    "STAGING_CHUNK",
    "STAGING_BUFFERS",
    "NT_STORES",
    "POOL_SPIN_US",
]

#: Bytes per pinned staging buffer of the fast path.
STAGING_CHUNK = int(os.environ.get("RAY_ZEROCOPY_STAGING_CHUNK", 64 << 20))
#: Number of pinned staging buffers in flight.
STAGING_BUFFERS = int(os.environ.get("RAY_ZEROCOPY_STAGING_BUFFERS", 3))
#: Stores of the host copy into staging buffers: "auto" (non-temporal stores for parts of
#: 256 KiB or more), "1" (always non-temporal), "0" (memcpy).
NT_STORES = os.environ.get("RAY_ZEROCOPY_NT_STORES", "auto")
#: Microseconds an idle pool thread polls for the next chunk before it sleeps.
POOL_SPIN_US = int(os.environ.get("RAY_ZEROCOPY_POOL_SPIN_US", 50))

_pools: dict[tuple[int, int, int], Any] = {}
_pools_lock = threading.Lock()
# The pinned staging buffers are per process: one staged upload at a time uses them.
_staging_lock = threading.Lock()

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
            f"device {device!r} is not a valid device: use None, 'cpu', 'cuda' or 'cuda:N'"
        ) from exc
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
            raise DeviceError(
                f"device {device!r} requested but CUDA is not available in this "
                f"process (torch {torch.__version__})"
            )
        n = torch.cuda.device_count()
        idx = 0 if dev.index is None else dev.index
        if idx >= n:
            raise DeviceError(
                f"device {device!r} requested but this process sees {n} CUDA "
                f"device(s) (cuda:0 .. cuda:{n - 1})"
            )
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


def copy_mode(nt: Any = None) -> int:
    """The C core's store mode for ``nt``: None (``NT_STORES``), "auto", True/"1" or False/"0"."""
    v = NT_STORES if nt is None else nt
    if v in ("auto", "AUTO"):
        return _zc.COPY_AUTO
    if v in (True, 1, "1", "true", "yes", "on"):
        return _zc.COPY_NT
    if v in (False, 0, "0", "false", "no", "off"):
        return _zc.COPY_PLAIN
    raise ValueError(f"non-temporal store setting {v!r}: use 'auto', '1' or '0'")


def host_pool(nthreads: int = 0, spin_us: int | None = None) -> Any:
    """This process's persistent thread pool of the C core with ``nthreads`` participants
    (0: up to 16, one per CPU), made on first use and kept (one per size and spin setting).
    A forked child makes its own."""
    n = nthreads or min(16, os.cpu_count() or 1)
    spin = POOL_SPIN_US if spin_us is None else spin_us
    key = (os.getpid(), n, spin)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            for k in [k for k in _pools if k[0] != key[0]]:
                del _pools[k]  # inherited over fork: its threads are not in this process
            pool = _pools[key] = _zc.Pool(n, spin)
    return pool


class StagingDevice(Protocol):
    """The seam between the staging loop and a device (CUDA, or a fake in the tests).

    The loop calls :meth:`alloc` once, :meth:`staging` once, then for every chunk: :meth:`wait`
    on the staging buffer it is about to fill (if that buffer was used before), the host copy
    into it, :meth:`copy_async` from it; and :meth:`finish` at the end.
    """

    def alloc(self, size: int) -> Any:
        """Returns the destination: ``size`` bytes on the device."""

    def staging(self, chunk: int, count: int) -> list[int]:
        """Returns the addresses of ``count`` host staging buffers of ``chunk`` bytes each."""

    def copy_async(self, dst: Any, pos: int, slot: int, n: int) -> None:
        """Starts copying ``n`` bytes of staging buffer ``slot`` to ``dst[pos:pos + n]`` and
        returns at once; a later :meth:`wait` on ``slot`` waits for this copy."""

    def wait(self, slot: int) -> None:
        """Returns when the last copy started from staging buffer ``slot`` has finished."""

    def finish(self) -> None:
        """Returns when every copy started has finished."""


class CudaStaging:
    """:class:`StagingDevice` for one CUDA device: pinned staging buffers (kept per process),
    copies on a side stream, one reusable event per staging buffer."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.events: list[torch.cuda.Event] = []
        self.bufs: list[torch.Tensor] = []

    def alloc(self, size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.uint8, device=self.device)

    def staging(self, chunk: int, count: int) -> list[int]:
        self.bufs = _staging(self.device, chunk, count)[:count]
        self.events = [torch.cuda.Event() for _ in range(count)]
        return [b.data_ptr() for b in self.bufs]

    def copy_async(self, dst: torch.Tensor, pos: int, slot: int, n: int) -> None:
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            dst[pos : pos + n].copy_(self.bufs[slot][:n], non_blocking=True)
            self.events[slot].record(self.stream)

    def wait(self, slot: int) -> None:
        self.events[slot].synchronize()

    def finish(self) -> None:
        self.stream.synchronize()


def staged_copy(
    dev: StagingDevice,
    mapping: Any,
    offset: int,
    size: int,
    *,
    chunk: int,
    nbuf: int,
    host_copy: Any,
) -> Any:
    """Copies ``size`` bytes at ``offset`` of ``mapping`` to a new allocation of ``dev`` through
    ``nbuf`` staging buffers of ``chunk`` bytes: while the device copies chunk k from one
    buffer, ``host_copy(address, mapping, src_offset, n)`` fills the next buffer with chunk
    k + 1. A buffer is refilled only after :meth:`StagingDevice.wait` says that the copy that
    last read it has finished. Returns the allocation."""
    if chunk <= 0 or nbuf < 2:
        raise ValueError(
            f"staging needs chunk > 0 and at least 2 buffers (chunk={chunk}, buffers={nbuf})"
        )
    dst = dev.alloc(size)
    if not size:
        return dst
    nbuf = min(nbuf, -(-size // chunk))  # no more buffers than chunks
    nbuf = max(nbuf, 1)
    addrs = dev.staging(chunk, nbuf)
    used = [False] * nbuf
    pos, k = 0, 0
    while pos < size:
        n = min(chunk, size - pos)
        slot = k % nbuf
        if used[slot]:
            dev.wait(slot)  # the copy that last read this staging buffer is done
        host_copy(addrs[slot], mapping, offset + pos, n)
        dev.copy_async(dst, pos, slot, n)
        used[slot] = True
        pos += n
        k += 1
    dev.finish()
    return dst


def host_copier(
    nthreads: int = 0, nt: Any = None, pool: str = "pool", spin_us: int | None = None
) -> Any:
    """The host copy of the staging loop: ``pool`` (the persistent pool, default) or
    ``threads`` (threads started per chunk, the earlier path; kept for the benchmarks)."""
    if pool == "threads":
        n = nthreads or min(16, os.cpu_count() or 1)

        def copy_threads(addr: int, mapping: Any, off: int, n_bytes: int) -> None:
            _zc.copy_to_ptr(addr, mapping, off, n_bytes, n)

        return copy_threads
    if pool != "pool":
        raise ValueError(f"unknown host copy {pool!r}: use 'pool' or 'threads'")
    p = host_pool(nthreads, spin_us)
    mode = copy_mode(nt)

    def copy_pool(addr: int, mapping: Any, off: int, n_bytes: int) -> None:
        p.copy_to_ptr(addr, mapping, off, n_bytes, 0, mode)

    return copy_pool


def upload_staged(
    mapping: Any,
    offset: int,
    size: int,
    device: torch.device,
    *,
    chunk: int | None = None,
    nbuf: int | None = None,
    nthreads: int = 0,
    nt: Any = None,
    host: str = "pool",
    spin_us: int | None = None,
) -> torch.Tensor:
    """Copies through pinned staging buffers, double (or more) buffered on a CUDA stream.

    Args:
        chunk, nbuf: staging buffer size and count (``STAGING_CHUNK``, ``STAGING_BUFFERS``).
        nthreads: host copy threads (0: up to 16, one per CPU; the host copy is the bottleneck).
        nt: non-temporal stores (None: ``NT_STORES``; "auto", True or False).
        host: "pool" (persistent thread pool) or "threads" (threads started per chunk).
    """
    chunk = chunk or STAGING_CHUNK
    nbuf = max(2, nbuf or STAGING_BUFFERS)
    copier = host_copier(nthreads, nt, host, spin_us)
    with _staging_lock:
        return staged_copy(
            CudaStaging(device), mapping, offset, size, chunk=chunk, nbuf=nbuf, host_copy=copier
        )


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


def upload(
    mapping: Any,
    offset: int,
    size: int,
    device: torch.device,
    *,
    fast: bool = False,
    nthreads: int = 0,
    method: str | None = None,
    **staging: Any,
) -> torch.Tensor:
    """Copies the data region of an arena to ``device``; returns one uint8 device tensor.

    Args:
        mapping: the arena's buffer (a ``_zc.Mapping``).
        offset, size: the data region.
        device: a resolved CUDA device.
        fast: use the pinned staging pipeline (``use_fast_load=True``).
        method: force ``"plain"``, ``"staged"`` or ``"register"`` (benchmarks).
        **staging: passed to :func:`upload_staged` (``chunk``, ``nbuf``, ``nt``, ``host``,
            ``spin_us``; benchmarks).
    """
    method = method or ("staged" if fast else "plain")
    if method == "staged":
        return upload_staged(mapping, offset, size, device, nthreads=nthreads, **staging)
    if method == "register":
        return upload_registered(mapping, offset, size, device)
    if method == "plain":
        return upload_plain(mapping, offset, size, device)
    raise ValueError(f"unknown upload method {method!r}")
