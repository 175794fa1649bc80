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


def pss(pid: int | None = None, files: bool = True) -> int:
    """Proportional set size of a process in bytes (0 if it is gone).

    ``files=False`` leaves out file-backed pages (the interpreter, torch's and Ray's libraries):
    every process on the machine that maps the same files shares them, so a process's share
    moves whenever an unrelated process starts or exits. What is left is anonymous memory and
    shared memory (``/dev/shm``, where Ray's object store keeps the weights).
    """
    r = _rollup(pid or os.getpid())
    if files or "Pss_Anon" not in r:  # Pss_Anon and Pss_Shmem: Linux 5.9 and later
        return r.get("Pss", 0)
    return r["Pss_Anon"] + r.get("Pss_Shmem", 0)


def uss(pid: int | None = None) -> int:
    """Unique set size (private clean + dirty pages) of a process in bytes."""
    r = _rollup(pid or os.getpid())
    return r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)


def rss(pid: int | None = None) -> int:
    """Resident set size of a process in bytes."""
    return _rollup(pid or os.getpid()).get("Rss", 0)


_RAY_MARKERS = (
    "raylet",
    "gcs_server",
    "plasma_store",
    "default_worker.py",
    "ray::",
    "dashboard",
    "log_monitor.py",
    "monitor.py",
    "runtime_env/agent",
)


def _descendants(root: int) -> set[int]:
    """``root`` and every process below it in the process tree."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces
        children.setdefault(ppid, []).append(int(name))
    out, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def ray_node_pids(include_self: bool = True, root: int | None = None) -> list[int]:
    """PIDs of this machine's Ray processes (raylet, GCS, workers, ...), and this process.

    Args:
        include_self: count this process too.
        root: only processes below this PID in the process tree. A driver that started Ray with
            ``ray.init()`` is the ancestor of its node's raylet, GCS and workers: pass
            ``os.getpid()`` there to leave out other Ray instances on the same machine.
    """
    pids = []
    me = os.getpid()
    tree = _descendants(root) if root is not None else None
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == me:
            if include_self:
                pids.append(pid)
            continue
        if tree is not None and pid not in tree:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(m in cmd for m in _RAY_MARKERS):
            pids.append(pid)
    return pids


def node_pss(include_self: bool = True, root: int | None = None, files: bool = True) -> int:
    """PSS summed over the node's Ray processes (and this one), in bytes; ``root`` as in
    :func:`ray_node_pids`, ``files`` as in :func:`pss`."""
    return sum(pss(p, files) for p in ray_node_pids(include_self, root))


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
