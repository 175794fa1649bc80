"""Helpers shared by every contender process (both venvs import this file by path).

No import of ray_zerocopy here: the published library's venv has a package of the same name.
The /proc logic below is the same as ``ray_zerocopy.memory`` (PSS summed over the node's Ray
processes), copied so that every contender measures memory the same way.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

# --------------------------------------------------------------------------- memory (/proc)


def _rollup(pid: int) -> dict:
    out = {}
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
    return _rollup(pid or os.getpid()).get("Pss", 0)


_RAY_MARKERS = ("raylet", "gcs_server", "plasma_store", "default_worker.py", "ray::",
                "dashboard", "log_monitor.py", "monitor.py", "runtime_env/agent")


def ray_node_pids(include_self: bool = True) -> list:
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
    """PSS summed over this machine's Ray processes and this one, in bytes."""
    return sum(pss(p) for p in ray_node_pids(include_self))


def core_pids() -> list:
    """This process, the raylet (which holds the object store) and the GCS."""
    pids = [os.getpid()]
    for pid in ray_node_pids(include_self=False):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "raylet" in cmd.split(" ")[0] or "gcs_server" in cmd.split(" ")[0]:
            pids.append(pid)
    return pids


def pss_of(pids) -> int:
    return sum(pss(p) for p in pids)


def settle_pss_of(pids, samples: int = 3, pause: float = 0.3) -> int:
    vals = []
    for _ in range(samples):
        time.sleep(pause)
        vals.append(pss_of(pids))
    return min(vals)


def settle_node_pss(samples: int = 3, pause: float = 0.3) -> int:
    """node_pss after a short pause; the minimum of a few samples (workers settle)."""
    vals = []
    for _ in range(samples):
        time.sleep(pause)
        vals.append(node_pss())
    return min(vals)


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_hwm() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def shm_available() -> int:
    st = os.statvfs("/dev/shm")
    return st.f_bavail * st.f_frsize


# --------------------------------------------------------------------------- stats


def summary(values) -> dict:
    values = [float(v) for v in values]
    if not values:
        return {"n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values), "values": values}


def quartiles(values):
    v = sorted(values)
    if len(v) < 4:
        return v[0], v[-1]
    q = statistics.quantiles(v, n=4)
    return q[0], q[2]


# --------------------------------------------------------------------------- machine


def machine_info() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
    except Exception:  # noqa: BLE001 - best effort
        pass
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                info["ram_bytes"] = int(line.split()[1]) * 1024
    info["shm_bytes"] = os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize
    info["kernel"] = platform.release()
    return info


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "executable": sys.executable}
    for dist in ("torch", "ray", "ray-zerocopy", "ray_zerocopy", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)
