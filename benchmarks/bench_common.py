"""Helpers shared by every contender process (both venvs import this file by path).

No import of ray_zerocopy here: the published library's venv has a package of the same name.
Memory is measured by ``ray_zerocopy/memory.py`` (PSS summed over the node's Ray processes),
loaded from its file, so that every contender measures memory the same way.
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
# The package's own /proc accounting, loaded from its file: the published library's venv has a
# package of the same import name, so `import ray_zerocopy.memory` would find the wrong one.
# ray_zerocopy/memory.py imports nothing but the standard library.

def _load_memory_module():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ray_zerocopy",
                        "memory.py")
    spec = importlib.util.spec_from_file_location("_rzc_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_memory = _load_memory_module()
pss = _memory.pss
ray_node_pids = _memory.ray_node_pids
node_pss = _memory.node_pss


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


def script_env() -> str:
    """For a benchmark script run directly, before it imports torch or Ray: its Ray workers
    import the benchmark modules too (``PYTHONPATH``), every process computes on one thread,
    and Ray sends no usage stats. Returns the benchmarks directory."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [here] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return here


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


def emit_section(text: str, data, json_path: str = "", docs_path: str = "") -> None:
    """A benchmark script's section: printed, its data written to json_path, and the text
    appended to docs_path (each only if given)."""
    print(text)
    if json_path:
        write_json(json_path, data)
    if docs_path:
        with open(docs_path, "a") as f:
            f.write("\n" + text)


def memcpy_gbps(nbytes: int = 1 << 30, repeats: int = 3) -> float:
    """One-thread memcpy bandwidth of this machine (numpy copy of warm pages, best of repeats)."""
    import numpy as np

    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.ones(nbytes, dtype=np.uint8)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9
