"""One device copy of a wrapper's weights per GPU, shared by every actor and task on that GPU.

Opt-in: ``ActorWrapper(p, device="cuda", share_device_copy=True)`` (and the same keyword on
``TaskWrapper`` and ``ModelWrapper.from_model``). Design and safety argument: docs/device.md,
"One device copy per GPU, through Ray". In short:

- Wrapping makes one small *registry* actor per wrapper (owned by the wrapping process, no CPU
  or GPU reserved). Its handle travels inside the wrapper's pickle.
- A consumer (an actor or task loading with ``device="cuda..."``) identifies the **physical**
  GPU behind its device (its UUID: Ray remaps indices through ``CUDA_VISIBLE_DEVICES``, so
  ``cuda:0`` names a different GPU in every actor) and looks up the *holder* actor named
  ``rzc-<object id of the wrapper's weights>-<GPU UUID>``. If there is none yet, the registry
  creates it, on the consumer's node, pinned to that GPU. The holder uploads the arena once
  and exports the allocation (CUDA IPC); consumers open it and build views: no device copy.
- Lifetime: holders are owned by the registry, the registry by the wrapping process. Dropping
  the wrapper (and every copy of it, and every pipeline loaded from it) or the exit of its
  owner ends the registry, and with it the holders and their device memory. A consumer whose
  holder or registry is gone gets :class:`OwnerDiedError` (or :class:`DeviceError`) on its next
  load, never a crash there.

Every device-specific step sits behind one small seam, :class:`DeviceBackend`;
:class:`CudaBackend` is the real one. The tests run the Ray side (naming, one upload for many
consumers, lifetime, errors) with a fake backend on the CPU (tests/fake_device.py), chosen with
``RAY_ZEROCOPY_DEVICE_BACKEND=module:attribute`` in the wrapping process.
"""

from __future__ import annotations

import importlib
import inspect
import os
import threading
import time
from typing import Any, Protocol

import ray
import torch

from . import _zc
from .device import parse_device, resolve_device, upload
from .errors import DeviceError, OwnerDiedError, WrapperError
from .unpack import LoadedArena, device_views, rebuild

__all__ = [
    "DeviceShare",
    "DeviceBackend",
    "CudaBackend",
    "load_shared",
    "holder_name",
    "NAMESPACE",
    "BACKEND_ENV",
]

#: The Ray namespace of registries and holders (so that any job can look them up by name).
NAMESPACE = "ray_zerocopy"
#: Environment variable (read when a wrapper is made) naming the device backend.
BACKEND_ENV = "RAY_ZEROCOPY_DEVICE_BACKEND"
DEFAULT_BACKEND = "ray_zerocopy.device_share:CudaBackend"
#: Seconds a consumer waits for a holder to answer (its first answer includes the upload).
HOLDER_TIMEOUT = float(os.environ.get("RAY_ZEROCOPY_HOLDER_TIMEOUT", "600"))
#: Seconds an opened copy stays cached in a process after its last load (as for arenas).
CACHE_TTL = float(os.environ.get("RAY_ZEROCOPY_CACHE_TTL", "30"))


# ---- the seam -------------------------------------------------------------------------------


class DeviceBackend(Protocol):
    """What the sharing needs from a device, in four calls. Implementations must be importable
    by name (``module:attribute``) in every process and constructible without arguments."""

    def physical_id(self, device: Any) -> tuple[str, torch.device]:
        """In a consumer: the physical identity (e.g. ``GPU-<uuid>``) of the GPU that ``device``
        names in this process, and the resolved local device.

        Raises:
            DeviceError: the device is malformed or not present here.
        """

    def holder_env(self, physical_id: str) -> dict[str, str]:
        """The environment variables of a holder process for that GPU (e.g.
        ``CUDA_VISIBLE_DEVICES``): it starts with them and applies them again first thing."""

    def upload(self, mapping: Any, offset: int, size: int, physical_id: str) -> tuple[Any, Any]:
        """In the holder: copies ``size`` bytes at ``offset`` of ``mapping`` into one allocation
        on that GPU. Returns (the allocation, which the holder keeps alive; a picklable handle
        that :meth:`open` accepts in another process on the same GPU)."""

    def open(self, handle: Any, device: torch.device) -> torch.Tensor:
        """In a consumer: a uint8 tensor over the holder's allocation, on ``device``, no copy.

        Raises:
            DeviceError: the handle belongs to another GPU or cannot be opened.
        """


class CudaBackend:
    """The real backend: GPU UUIDs from torch, upload through the staging pipeline, CUDA IPC."""

    def physical_id(self, device: Any) -> tuple[str, torch.device]:
        dev = resolve_device(device)
        if dev.type != "cuda":
            raise DeviceError(f"share_device_copy needs a CUDA device, got {device!r}")
        return _cuda_uuid(dev.index or 0), dev

    def holder_env(self, physical_id: str) -> dict[str, str]:
        # The holder reserves no GPU in Ray (see docs/device.md), so Ray does not choose its
        # device: it sees exactly the consumers' GPU, by UUID, as cuda:0.
        return {"CUDA_VISIBLE_DEVICES": physical_id}

    def upload(self, mapping: Any, offset: int, size: int, physical_id: str) -> tuple[Any, Any]:
        from torch.multiprocessing.reductions import reduce_tensor

        index = _cuda_index(physical_id)
        buf = upload(mapping, offset, size, torch.device("cuda", index), fast=True)
        torch.cuda.synchronize(index)
        return buf, ("cuda", physical_id, reduce_tensor(buf))

    def open(self, handle: Any, device: torch.device) -> torch.Tensor:
        kind, physical_id, (rebuild_fn, args) = handle
        mine = _cuda_uuid(device.index or 0)
        if kind != "cuda" or physical_id != mine:
            raise DeviceError(
                f"the shared device copy is on GPU {physical_id}, this process's "
                f"{device} is GPU {mine}"
            )
        # The holder's device index means nothing here: open on this process's index of the GPU.
        names = list(inspect.signature(rebuild_fn).parameters)
        args = list(args)
        args[names.index("storage_device")] = device.index or 0
        with torch.cuda.device(device):
            return rebuild_fn(*args)


def _cuda_uuid(index: int) -> str:
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    if uuid is None:  # pragma: no cover - torch before 2.1
        raise DeviceError(
            "this torch cannot tell the GPU's UUID (torch.cuda device properties "
            "have no 'uuid'): share_device_copy needs torch >= 2.1"
        )
    s = str(uuid)
    return s if s.startswith(("GPU-", "MIG-")) else f"GPU-{s}"


def _cuda_index(physical_id: str) -> int:
    seen = []
    for i in range(torch.cuda.device_count()):
        u = _cuda_uuid(i)
        if u == physical_id:
            return i
        seen.append(u)
    raise DeviceError(
        f"the holder process cannot see GPU {physical_id}; it sees {seen} "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
    )


def load_backend(spec: str) -> DeviceBackend:
    """Imports ``module:attribute`` and returns an instance (cached per process)."""
    b = _backends.get(spec)
    if b is None:
        mod, _, attr = spec.partition(":")
        try:
            b = getattr(importlib.import_module(mod), attr)()
        except (ImportError, AttributeError) as exc:
            raise DeviceError(
                f"device backend {spec!r} cannot be loaded in this process: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        _backends[spec] = b
    return b


_backends: dict[str, Any] = {}


# ---- names ------------------------------------------------------------------------------------


def holder_name(key: str, physical_id: str) -> str:
    """The Ray actor name of the holder of the weights ``key`` (their object id) on one GPU."""
    return f"rzc-{key}-{physical_id}"


def registry_name(key: str) -> str:
    return f"rzc-{key}-registry"


# ---- actors -----------------------------------------------------------------------------------


class _Holder:
    """One device copy of one wrapper's weights on one GPU (a Ray actor)."""

    def __init__(self, box: list, physical_id: str, backend_spec: str):
        from ._worker import fetch

        backend = load_backend(backend_spec)
        # Before CUDA starts in this process; also where Ray set CUDA_VISIBLE_DEVICES to "" for
        # an actor without GPUs (releases before 2.48).
        os.environ.update(backend.holder_env(physical_id))
        self.physical_id = physical_id
        skeleton, arena = fetch(box[0])
        mapping = _zc.Mapping(arena)
        info = _zc.parse(mapping)
        t0 = time.perf_counter()
        self.allocation, handle = backend.upload(
            mapping, info["data_offset"], info["data_size"], physical_id
        )
        self.upload_seconds = time.perf_counter() - t0
        self.nbytes = info["data_size"]
        self.payload = (
            handle,
            physical_id,
            info["data_offset"],
            info["manifest_crc"],
            info["tensors"],
            skeleton,
        )
        del mapping, arena  # the host copy is not needed any more

    def get(self) -> tuple:
        return self.payload

    def ping(self) -> bool:
        return True

    def stats(self) -> dict:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        return {
            "pid": os.getpid(),
            "physical_id": self.physical_id,
            "nbytes": self.nbytes,
            "upload_seconds": self.upload_seconds,
            "node_id": ray.get_runtime_context().get_node_id(),
            "cuda_allocated": torch.cuda.memory_allocated() if cuda else 0,
        }


class _Registry:
    """Creates and owns the holders of one wrapper (a Ray actor, owned by the wrapping process)."""

    def __init__(self, box: list, key: str, backend_spec: str):
        self.box = box
        self.key = key
        self.backend_spec = backend_spec
        self.holders: dict[str, Any] = {}
        self.created = 0

    def holder(self, physical_id: str, node_id: str) -> Any:
        """The holder for a GPU, created on ``node_id`` if there is none."""
        h = self.holders.get(physical_id)
        if h is None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            env = load_backend(self.backend_spec).holder_env(physical_id)
            opts = dict(
                name=holder_name(self.key, physical_id),
                namespace=NAMESPACE,
                num_cpus=0,
                num_gpus=0,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                runtime_env={"env_vars": env} if env else None,
            )
            deadline = time.monotonic() + 30
            while True:
                try:
                    h = _HolderActor.options(**opts).remote(
                        self.box, physical_id, self.backend_spec
                    )
                    break
                except ValueError:
                    # The name of a holder that just died is released a moment later.
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            self.holders[physical_id] = h
            self.created += 1
        return h

    def forget(self, physical_id: str, actor_id: str) -> None:
        """Drops a holder that died, so that the next request makes a new one."""
        h = self.holders.get(physical_id)
        if h is not None and h._actor_id.hex() == actor_id:
            del self.holders[physical_id]
            ray.kill(h)

    def info(self) -> dict:
        return {"holders": sorted(self.holders), "created": self.created}


_HolderActor = ray.remote(_Holder)
_RegistryActor = ray.remote(_Registry)


# ---- the driver's handle ----------------------------------------------------------------------


class DeviceShare:
    """What a wrapper carries when ``share_device_copy=True``: the registry's handle, the
    weights' ObjectRef and the backend's name. Small and picklable."""

    __slots__ = ("key", "box", "registry", "backend_spec")

    def __init__(self, key: str, box: list, registry: Any, backend_spec: str):
        self.key = key
        self.box = box
        self.registry = registry
        self.backend_spec = backend_spec

    @classmethod
    def create(cls, ref: ray.ObjectRef) -> DeviceShare:
        """Makes the registry actor of a wrapper's weights (in the wrapping process)."""
        spec = os.environ.get(BACKEND_ENV) or DEFAULT_BACKEND
        key = ref.hex()
        box = [ref]  # in a list: passed as an argument, a bare ObjectRef would be fetched
        registry = _RegistryActor.options(
            name=registry_name(key), namespace=NAMESPACE, num_cpus=0, num_gpus=0, max_restarts=0
        ).remote(box, key, spec)
        return cls(key, box, registry, spec)

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)

    def applies_to(self, device: Any) -> bool:
        """Whether a load on ``device`` uses the shared copy (a CUDA device; CPU loads map the
        object store as usual)."""
        return device is not None and parse_device(device).type == "cuda"

    def holder_info(self) -> dict:
        """Which GPUs have a holder (``{"holders": [...], "created": n}``)."""
        try:
            return ray.get(self.registry.info.remote())
        except ray.exceptions.RayActorError as exc:
            raise _gone(exc) from exc


def _gone(exc: BaseException) -> OwnerDiedError:
    return OwnerDiedError(
        "the shared device copy of this wrapper is gone: the wrapper was dropped or the process "
        f"that made it has exited, which ends the holders of its device copies "
        f"({type(exc).__name__}); wrap the pipeline again in a live process"
    )


# ---- the consumer's side ----------------------------------------------------------------------


class _SharedArena(LoadedArena):
    """Views into a holder's device allocation, in the form :func:`rebuild` takes."""

    def __init__(self, devbuf: torch.Tensor, payload: tuple):
        _handle, _pid, data_offset, manifest_crc, entries, _skeleton = payload
        self.device = devbuf.device
        self.mapping = None
        self.device_buffer = devbuf
        self.manifest_crc = manifest_crc
        self.names = [e[0] for e in entries]
        self.kinds = [e[6] for e in entries]
        self.views = device_views(devbuf, entries, data_offset)


class _Lease:
    """An opened device copy in this process, with the handles that keep its holder alive."""

    def __init__(self, arena: _SharedArena, skeleton: bytes, holder: Any, registry: Any):
        from torch.multiprocessing.reductions import StorageWeakRef

        self.arena: _SharedArena | None = arena
        self.skeleton = skeleton
        self.holder = holder
        self.registry = registry
        self.storage = StorageWeakRef(arena.device_buffer.untyped_storage())
        self.last_used = time.monotonic()


_leases: dict[tuple[str, str], _Lease] = {}
_lock = threading.Lock()
_janitor: threading.Thread | None = None


def load_shared(share: DeviceShare, device: Any) -> Any:
    """Returns the pipeline with its weights as views into the shared device copy of the GPU
    that ``device`` names in this process, making that copy (one holder) if it is the first.

    Raises:
        OwnerDiedError: the wrapper's registry (its owner, or the wrapper) is gone.
        DeviceError: the device is not present, or the holder could not make the copy.
    """
    backend = load_backend(share.backend_spec)
    physical_id, local = backend.physical_id(device)
    key = (share.key, physical_id)
    with _lock:
        lease = _leases.get(key)
    # A reference of this call's own: the janitor may drop lease.arena at any time.
    arena: _SharedArena | None = None
    if lease is not None:
        try:  # one round trip: the holder is alive, so the cached views are valid
            ray.get(lease.holder.ping.remote(), timeout=HOLDER_TIMEOUT)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            with _lock:
                _leases.pop(key, None)
            lease = None
        else:
            arena = lease.arena
            if arena is None:  # released by the janitor; reopen from the handle
                lease = None
    if lease is None:
        lease = _open(share, backend, physical_id, local)
        arena = lease.arena  # set by _open; the janitor cannot see the lease yet
        with _lock:
            _leases[key] = lease
        _start_janitor()
    assert arena is not None
    lease.last_used = time.monotonic()
    return rebuild(lease.skeleton, arena)


def _open(
    share: DeviceShare, backend: DeviceBackend, physical_id: str, local: torch.device
) -> _Lease:
    name = holder_name(share.key, physical_id)
    for attempt in range(3):
        holder = None
        if attempt == 0:  # the usual case: the holder exists, found by name
            try:
                holder = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                pass
        if holder is None:
            try:
                node = ray.get_runtime_context().get_node_id()
                holder = ray.get(
                    share.registry.holder.remote(physical_id, node), timeout=HOLDER_TIMEOUT
                )
            except ray.exceptions.RayActorError as exc:
                raise _gone(exc) from exc
            except ray.exceptions.RayTaskError as exc:
                raise DeviceError(
                    f"no holder of the shared device copy could be made for GPU "
                    f"{physical_id}: {exc}"
                ) from exc
        try:
            payload = ray.get(holder.get.remote(), timeout=HOLDER_TIMEOUT)
        except ray.exceptions.GetTimeoutError as exc:
            raise DeviceError(
                f"the holder of the shared device copy on GPU {physical_id} did "
                f"not answer in {HOLDER_TIMEOUT:.0f} s "
                "(RAY_ZEROCOPY_HOLDER_TIMEOUT)"
            ) from exc
        except ray.exceptions.RayActorError as exc:
            # The holder died (killed, lost, or its upload failed). Let the registry forget
            # it; if the upload failed, say why; otherwise try again with a new holder.
            try:
                ray.get(share.registry.forget.remote(physical_id, holder._actor_id.hex()))
            except ray.exceptions.RayActorError as exc2:
                raise _gone(exc2) from exc2
            cause = _init_error(exc)
            if cause is not None or attempt == 2:
                raise DeviceError(
                    f"the holder of the shared device copy on GPU {physical_id} "
                    f"failed: {cause or exc}"
                ) from exc
            continue
        devbuf = backend.open(payload[0], local)
        return _Lease(_SharedArena(devbuf, payload), payload[5], holder, share.registry)
    raise AssertionError("unreachable")  # pragma: no cover


def _init_error(exc: BaseException) -> str | None:
    """The error a holder's constructor raised (its last line), if that is why it died."""
    if not getattr(exc, "_actor_init_failed", False) and "creation task" not in str(exc):
        return None
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else None


def _start_janitor() -> None:
    global _janitor
    if _janitor is not None or CACHE_TTL <= 0:
        return
    _janitor = threading.Thread(target=_janitor_loop, name="ray_zerocopy-device-share", daemon=True)
    _janitor.start()


def _janitor_loop() -> None:
    """Drops the cache's own reference to opened copies unused for ``CACHE_TTL`` seconds, and
    the holder handles of copies that no tensor uses any more (so that, once the wrapper is
    dropped too, the holder and its device memory can go)."""
    while True:
        time.sleep(max(0.05, CACHE_TTL / 4))
        _sweep(time.monotonic() - CACHE_TTL)


def _sweep(cutoff: float) -> None:
    # A function of its own: a loop variable left in the janitor's frame would keep the last
    # lease, and with it the holder, alive while the janitor sleeps.
    with _lock:
        for key, lease in list(_leases.items()):
            if lease.arena is not None and lease.last_used < cutoff:
                lease.arena = None
            if lease.arena is None and lease.storage.expired():
                del _leases[key]


def make_share(
    ref: ray.ObjectRef | None, device: Any, share_device_copy: bool, writable: bool
) -> DeviceShare | None:
    """For the wrappers: checks the options of ``share_device_copy=True`` (``ref`` None: check
    only) and makes the registry of the weights ``ref``. Returns None when not asked for.

    Raises:
        DeviceError: the device is not a CUDA device.
        WrapperError: ``writable=True`` too (a shared copy cannot be private).
    """
    if not share_device_copy:
        return None
    dev = parse_device(device) if device is not None else None
    if dev is None or dev.type != "cuda":
        raise DeviceError(
            f"share_device_copy=True shares one copy per GPU: pass device='cuda' "
            f"(got device={device!r})"
        )
    if writable:
        raise WrapperError(
            "share_device_copy=True and writable=True exclude each other: every "
            "process on a GPU uses the same device copy"
        )
    return None if ref is None else DeviceShare.create(ref)
