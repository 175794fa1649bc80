"""Memory accounting: PSS summed over a Ray node's processes, and per-process figures.

PSS (proportional set size) splits every shared page among the processes that map it, so the
sum over a node counts one shared copy of the weights once. RSS would count it once per
process; USS would hide it. Linux only (reads ``/proc``).
"""

from __future__ import annotations

import os

__all__ = ["pss", "uss", "rss", "ray_node_pids", "node_pss", "object_store_bytes"]


def _rollup(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[-1] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def pss(pid: int | None = None) -> int:
    """Proportional set size of a process in bytes (0 if it is gone)."""
    return _rollup(pid or os.getpid()).get("Pss", 0)


def uss(pid: int | None = None) -> int:
    """Unique set size (private clean + dirty pages) of a process in bytes."""
    r = _rollup(pid or os.getpid())
    return r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)


def rss(pid: int | None = None) -> int:
    """Resident set size of a process in bytes."""
    return _rollup(pid or os.getpid()).get("Rss", 0)


_RAY_MARKERS = ("raylet", "gcs_server", "plasma_store", "default_worker.py", "ray::",
                "dashboard", "log_monitor.py", "monitor.py", "runtime_env/agent")


def ray_node_pids(include_self: bool = True) -> list[int]:
    """PIDs of this machine's Ray processes (raylet, GCS, workers, ...), and this process."""
    pids = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == me:
            if include_self:
                pids.append(pid)
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(m in cmd for m in _RAY_MARKERS):
            pids.append(pid)
    return pids


def node_pss(include_self: bool = True) -> int:
    """PSS summed over the node's Ray processes (and this one), in bytes."""
    return sum(pss(p) for p in ray_node_pids(include_self))


def object_store_bytes() -> int:
    """Bytes in use in the connected Ray cluster's object store, as Ray counts them.

    The figure ``ray memory --stats-only`` prints, read through Ray's internal API (there is no
    public one without the dashboard); needs ``ray.init()`` first. It drops when an object is
    freed, which PSS need not show: the store keeps its pages mapped for reuse.
    """
    import ray
    from ray._private import internal_api

    node = ray._private.worker._global_node
    address = node.gcs_address if node is not None else ray.get_runtime_context().gcs_address
    state = internal_api.get_state_from_address(address)
    return int(internal_api.get_memory_info_reply(state).store_stats.object_store_bytes_used)
