"""In-process microbenchmarks behind figures quoted in the notes and docs (no Ray).

1. Load (validate + views, then skeleton unpickle) of arenas with the same tensor count and
   4x the bytes, each mapped afresh from /dev/shm: loading must be O(tensors).
2. pack() of 1.25 GiB in a fresh process with the arena on 4 KiB pages against transparent
   huge pages (what pack() allocates): the gather copy is the first write to every page.

Usage: .venv/bin/python benchmarks/load_breakdown.py
"""

from __future__ import annotations

import mmap
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import ray_zerocopy as rzc
from ray_zerocopy.unpack import LoadedArena, rebuild

PACK = r"""
import sys, time, numpy as np, torch
from torch import nn
import ray_zerocopy as rzc
P = sys.modules["ray_zerocopy.pack"]
if sys.argv[1] == "4k":  # what pack() did before: a plain numpy allocation
    def alloc(n, align=4096):
        raw = np.empty(n + align, dtype=np.uint8)
        s = (-raw.ctypes.data) % align
        return raw[s:s + n]
    P._aligned_empty = alloc
m = nn.Module()
m.ps = nn.ParameterList(nn.Parameter(torch.empty(1 << 22).fill_(1.0)) for _ in range(80))
t = time.perf_counter()
rzc.pack(m)
print(time.perf_counter() - t)
"""


def load_scaling(repeats: int = 15) -> None:
    print("load of 200 tensors, median of", repeats, "(fresh /dev/shm mapping each time)")
    for d in (362, 724):
        m = nn.Module()
        m.ps = nn.ParameterList(nn.Parameter(torch.empty(d, d)) for _ in range(200))
        skeleton, arena = rzc.pack(m)
        path = f"/dev/shm/rzc_load_breakdown_{os.getpid()}"
        arena.tofile(path)
        for protect in (False, True):
            views, unpickle = [], []
            for _ in range(repeats):
                fd = os.open(path, os.O_RDONLY)
                mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
                os.close(fd)
                t0 = time.perf_counter()
                loaded = LoadedArena(memoryview(mm), protect=protect)
                t1 = time.perf_counter()
                p = rebuild(skeleton, loaded)
                t2 = time.perf_counter()
                views.append(t1 - t0)
                unpickle.append(t2 - t1)
                del p, loaded
            print(f"  {arena.nbytes >> 20:4d} MiB protect={protect!s:5}: validate+views "
                  f"{statistics.median(views) * 1e3:.2f} ms, unpickle "
                  f"{statistics.median(unpickle) * 1e3:.2f} ms")
        os.unlink(path)


def pack_allocation(repeats: int = 3) -> None:
    print("pack() of 1.25 GiB (80 fp32 tensors) in a fresh process, arena on 4 KiB pages "
          "against transparent huge pages (the default)")
    for kind in ("4k", "huge"):
        times = [float(subprocess.run([sys.executable, "-c", PACK, kind], capture_output=True,
                                      text=True, check=True).stdout) for _ in range(repeats)]
        print(f"  {kind:4s}: median {statistics.median(times):.3f} s "
              f"(min {min(times):.3f}, max {max(times):.3f})")


if __name__ == "__main__":
    load_scaling()
    pack_allocation()
