"""Host-side copy of the GPU staging path, on the CPU: threads started per chunk against the
C core's persistent pool, memcpy against non-temporal stores. No GPU needed.

Source: an arena-sized file in /dev/shm (what Ray's object store is), mapped read-only,
either with its page tables populated beforehand ("populated") or mapped afresh for every
trial ("fresh": the copy pays the page faults). Destination: staging buffers allocated and
touched once, reused round-robin, as the pinned buffers of the GPU path are.
Each contender runs in its own process; a warm-up trial first; median (min-max) of the trials.

Also: the cost of one small parallel copy (2 MiB) with threads started per call against the
pool, and the staging loop of ray_zerocopy.device with a fake device
whose copies run on a thread of their own (the overlap logic, end to end).

Usage:
    python benchmarks/pool_bench.py [--mib 512] [--chunk-mib 64,8] [--threads 0] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ray_zerocopy import _zc  # noqa: E402
from ray_zerocopy.device import host_copier, staged_copy  # noqa: E402

NBUF = 3


def map_file(path: str, populate: bool):
    fd = os.open(path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    m = _zc.Mapping(mm)
    if populate:
        m.populate(0, m.size, 0)
    return mm, m


def copier(name: str, nthreads: int):
    host, _, nt = name.partition("-")
    return host_copier(nthreads, nt={"plain": False, "nt": True, "auto": "auto", "": None}[nt],
                       pool=host, spin_us=50)


def run_one(args) -> dict:
    """One contender in this process: copy the whole file chunk by chunk into the buffers."""
    name, chunk = args.one, args.chunk_mib << 20
    bufs = [np.ones(chunk, dtype=np.uint8) for _ in range(NBUF)]  # touched: like pinned memory
    addrs = [b.ctypes.data for b in bufs]
    copy = copier(name, args.threads)
    size = os.path.getsize(args.path)
    times = []
    for r in range(args.repeats + 1):
        mm, m = map_file(args.path, populate=args.state == "populated")
        t0 = time.perf_counter()
        pos, k = 0, 0
        while pos < size:
            n = min(chunk, size - pos)
            copy(addrs[k % NBUF], m, pos, n)
            pos += n
            k += 1
        t = time.perf_counter() - t0
        m.release()
        mm.close()
        if r:
            times.append(t)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "GBps": size / statistics.median(times) / 1e9}


def dispatch_cost(nthreads: int, calls: int = 2000) -> dict:
    """Microseconds per copy of 2 MiB in ``nthreads`` parts: one thread, threads started per
    call (the earlier path), and the persistent pool with idle threads sleeping at once
    (spin 0) or polling for 50 us first (the default)."""
    src = np.ones(2 << 20, dtype=np.uint8)
    dst = np.zeros_like(src)
    n = max(2, nthreads)
    out = {}
    pools = {spin: _zc.Pool(n, spin) for spin in (0, 50)}
    for label, fn in [
        ("one thread (memcpy)", lambda: _zc.copy_to_ptr(dst.ctypes.data, src, 0, src.nbytes, 1)),
        ("threads started per call", lambda: _zc.copy_to_ptr(dst.ctypes.data, src, 0, src.nbytes, n)),
        ("persistent pool, spin 0 us", lambda: pools[0].copy_to_ptr(
            dst.ctypes.data, src, 0, src.nbytes, n, _zc.COPY_PLAIN)),
        ("persistent pool, spin 50 us", lambda: pools[50].copy_to_ptr(
            dst.ctypes.data, src, 0, src.nbytes, n, _zc.COPY_PLAIN)),
    ]:
        for _ in range(100):
            fn()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out[label] = (time.perf_counter() - t0) / calls * 1e6
    for p in pools.values():
        p.close()
    return out


class EngineDevice:
    """StagingDevice whose copies (numpy, GIL released) run on an engine thread."""

    def __init__(self):
        import queue
        self.q = queue.Queue()
        self.done = {}
        threading.Thread(target=self._run, daemon=True).start()

    def alloc(self, size):
        return self.dst

    def staging(self, chunk, count):
        return self.addrs[:count]

    def copy_async(self, dst, pos, slot, n):
        ev = threading.Event()
        self.done[slot] = ev
        self.q.put((dst, pos, slot, n, ev))

    def _run(self):
        while True:
            dst, pos, slot, n, ev = self.q.get()
            np.copyto(dst[pos:pos + n], self.bufs[slot][:n])
            ev.set()
            self.q.task_done()

    def wait(self, slot):
        self.done[slot].wait()

    def finish(self):
        self.q.join()


def pipeline(args) -> dict:
    size = os.path.getsize(args.path)
    chunk = args.chunk_mib << 20
    dev = EngineDevice()
    dev.bufs = [np.ones(chunk, dtype=np.uint8) for _ in range(NBUF)]
    dev.addrs = [b.ctypes.data for b in dev.bufs]
    dev.dst = np.ones(size, dtype=np.uint8)
    copy = copier(args.one, args.threads)
    times = []
    mm, m = map_file(args.path, populate=True)
    for r in range(args.repeats + 1):
        t0 = time.perf_counter()
        staged_copy(dev, m, 0, size, chunk=chunk, nbuf=NBUF, host_copy=copy)
        if r:
            times.append(time.perf_counter() - t0)
    m.release()
    mm.close()
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "GBps": size / statistics.median(times) / 1e9}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--chunk-mib", default="64,8")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="copy", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        args.chunk_mib = int(args.chunk_mib)
        res = pipeline(args) if args.mode == "pipeline" else run_one(args)
        print(json.dumps(res))
        return 0

    nthreads = args.threads or min(16, os.cpu_count() or 1)
    print(f"# pool_bench on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{nthreads} copy threads, python {platform.python_version()}, "
          f"non-temporal stores compiled in: {_zc.nt_stores_available()}")
    print("# " + " ".join([sys.executable] + sys.argv))
    path = f"/dev/shm/rzc_pool_bench_{os.getpid()}"
    rng = np.random.default_rng(0)
    rng.integers(0, 256, size=args.mib << 20, dtype=np.uint8).tofile(path)
    out = {"mib": args.mib, "threads": nthreads, "cpus": os.cpu_count(),
           "command": " ".join([sys.executable] + sys.argv), "copy": {}, "pipeline": {}}
    names = ["threads", "pool-plain", "pool-nt", "pool-auto"]
    try:
        d = dispatch_cost(nthreads)
        out["dispatch_us"] = d
        print(f"\n## one 2 MiB copy in {max(2, nthreads)} parts (source and destination in cache), "
              "microseconds per call")
        for k, v in d.items():
            print(f"- {k}: {v:.1f} us")
        for chunk in [int(c) for c in args.chunk_mib.split(",") if c]:
            for state in ("populated", "fresh"):
                print(f"\n## host copy {args.mib} MiB from /dev/shm into {NBUF} x {chunk} MiB "
                      f"staging buffers, source {state} (median of {args.repeats}, min-max)")
                print("| host copy | seconds | GB/s | vs threads |\n|---|---:|---:|---:|")
                base = None
                for name in names:
                    r = json.loads(subprocess.run(
                        [sys.executable, __file__, "--one", name, "--state", state, "--path", path,
                         "--chunk-mib", str(chunk), "--threads", str(nthreads),
                         "--repeats", str(args.repeats)],
                        check=True, capture_output=True, text=True).stdout)
                    out["copy"][f"{chunk}MiB/{state}/{name}"] = r
                    base = base or r["median_s"]
                    print(f"| {name} | {r['median_s']:.4f} ({r['min_s']:.4f}-{r['max_s']:.4f}) | "
                          f"{r['GBps']:.2f} | {base / r['median_s']:.2f}x |")
        chunk = int(args.chunk_mib.split(",")[-1])
        print(f"\n## staging loop (ray_zerocopy.device.staged_copy), fake device copying on its "
              f"own thread, {NBUF} x {chunk} MiB, populated source")
        print("| host copy | seconds | GB/s |\n|---|---:|---:|")
        for name in ["threads", "pool-auto"]:
            r = json.loads(subprocess.run(
                [sys.executable, __file__, "--one", name, "--mode", "pipeline", "--path", path,
                 "--chunk-mib", str(chunk), "--threads", str(nthreads),
                 "--repeats", str(args.repeats)],
                check=True, capture_output=True, text=True).stdout)
            out["pipeline"][name] = r
            print(f"| {name} | {r['median_s']:.4f} ({r['min_s']:.4f}-{r['max_s']:.4f}) | "
                  f"{r['GBps']:.2f} |")
    finally:
        os.unlink(path)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
