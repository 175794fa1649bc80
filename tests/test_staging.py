"""The GPU fast-load pipeline on the CPU: the C core's persistent pool and its chunked copy,
and the staging loop (double buffering, waits before reuse, overlap) driven with a fake
device behind the same seam as CUDA (ray_zerocopy.device.StagingDevice). No GPU, no Ray."""

from __future__ import annotations

import os
import queue
import threading
import time
import warnings

import numpy as np
import pytest

from ray_zerocopy import _zc
from ray_zerocopy.device import copy_mode, host_copier, host_pool, staged_copy


class FakeDevice:
    """A device whose copies run later on a thread of their own, as a DMA engine would.

    Each copy reads its staging buffer only when it runs (after ``delay`` seconds), so a loop
    that refills a buffer before waiting for the copy that reads it delivers wrong bytes.
    Records when each copy was started (enqueued) and when it finished.
    """

    def __init__(self, delay: float = 0.002, honour_waits: bool = True):
        self.delay = delay
        self.honour_waits = honour_waits
        self.q: queue.Queue = queue.Queue()
        self.slot_done: dict[int, threading.Event] = {}
        self.log: list[tuple[str, int, float]] = []
        self.copies = 0
        self.waits = 0
        threading.Thread(target=self._engine, daemon=True).start()

    def alloc(self, size):
        return np.zeros(size, dtype=np.uint8)

    def staging(self, chunk, count):
        self.bufs = [np.full(chunk, 0xEE, dtype=np.uint8) for _ in range(count)]
        return [b.ctypes.data for b in self.bufs]

    def copy_async(self, dst, pos, slot, n):
        ev = threading.Event()
        self.slot_done[slot] = ev
        k = self.copies
        self.copies += 1
        self.log.append(("start", k, time.perf_counter()))
        self.q.put((k, dst, pos, slot, n, ev))

    def _engine(self):
        while True:
            k, dst, pos, slot, n, ev = self.q.get()
            time.sleep(self.delay)
            dst[pos:pos + n] = self.bufs[slot][:n]
            self.log.append(("done", k, time.perf_counter()))
            ev.set()
            self.q.task_done()

    def wait(self, slot):
        self.waits += 1
        if self.honour_waits:
            self.slot_done[slot].wait()

    def finish(self):
        self.q.join()


@pytest.fixture(scope="module")
def arena_like():
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(3 << 20) + 4099, dtype=np.uint8)


@pytest.mark.parametrize("chunk,nbuf", [(1 << 20, 2), (1 << 20, 3), (300_001, 4), (8 << 20, 2),
                                        (65536, 2)])
def test_staged_copy_exact_bytes(arena_like, chunk, nbuf):
    offset = 4096
    size = arena_like.nbytes - offset - 3
    dev = FakeDevice(delay=0.0005)
    out = staged_copy(dev, arena_like, offset, size, chunk=chunk, nbuf=nbuf,
                      host_copy=host_copier(2))
    assert np.array_equal(out, arena_like[offset:offset + size])
    n_chunks = -(-size // chunk)
    assert dev.copies == n_chunks
    # every refill of a buffer waited for the copy that last read it
    assert dev.waits == max(0, n_chunks - min(nbuf, n_chunks))


def test_staged_copy_overlaps_host_and_device(arena_like):
    dev = FakeDevice(delay=0.01)
    staged_copy(dev, arena_like, 0, arena_like.nbytes, chunk=512 << 10, nbuf=3,
                host_copy=host_copier(2))
    start = {k: t for e, k, t in dev.log if e == "start"}
    done = {k: t for e, k, t in dev.log if e == "done"}
    # chunk k + 1 was copied into its staging buffer and started while chunk k was in flight
    overlapped = [k for k in done if k + 1 in start and start[k + 1] < done[k]]
    assert len(overlapped) >= len(done) - 2


def test_fake_device_detects_a_loop_that_does_not_wait(arena_like):
    """The check above has teeth: without the waits, refilled buffers corrupt the copy."""
    dev = FakeDevice(delay=0.003, honour_waits=False)
    out = staged_copy(dev, arena_like, 0, arena_like.nbytes, chunk=256 << 10, nbuf=2,
                      host_copy=host_copier(2))
    assert not np.array_equal(out, arena_like)


def test_staged_copy_empty_and_bad_arguments(arena_like):
    dev = FakeDevice()
    assert staged_copy(dev, arena_like, 0, 0, chunk=1024, nbuf=2,
                       host_copy=host_copier(1)).nbytes == 0
    with pytest.raises(ValueError, match="at least 2"):
        staged_copy(dev, arena_like, 0, 10, chunk=1024, nbuf=1, host_copy=host_copier(1))


@pytest.mark.parametrize("host,nt", [("pool", "auto"), ("pool", True), ("pool", False),
                                     ("threads", None)])
def test_host_copiers_agree(arena_like, host, nt):
    dst = np.zeros(arena_like.nbytes, dtype=np.uint8)
    host_copier(2, nt=nt, pool=host)(dst.ctypes.data + 5, arena_like, 0, arena_like.nbytes - 5)
    assert np.array_equal(dst[5:], arena_like[:-5])


def test_pool_copy_checks_and_close():
    pool = _zc.Pool(3, 0)
    assert pool.size == 3 and not pool.closed
    src = bytes(range(256)) * 4096
    dst = bytearray(len(src))
    pool.copy(dst, 0, src, 0, len(src), 0, _zc.COPY_NT)
    assert dst == src
    with pytest.raises(ValueError, match="outside"):
        pool.copy(dst, 10, src, 0, len(src))
    with pytest.raises(ValueError, match="outside"):
        pool.copy_to_ptr(1, src, 1, len(src))
    with pytest.raises(ValueError, match="dst_ptr is 0"):
        pool.copy_to_ptr(0, src, 0, 10)
    with pytest.raises(ValueError, match="invalid"):
        pool.copy(dst, 0, src, 0, 10, 0, 9)  # unknown store mode
    with pytest.raises(TypeError):
        pool.copy(b"read-only", 0, src, 0, 4)
    pool.close()
    assert pool.closed and pool.size == 0
    with pytest.raises(ValueError, match="closed"):
        pool.copy(dst, 0, src, 0, 10)
    pool.close()  # twice is fine


def test_copy_mode_and_process_pool():
    assert copy_mode("auto") == _zc.COPY_AUTO
    assert copy_mode(True) == copy_mode("1") == _zc.COPY_NT
    assert copy_mode(False) == copy_mode("0") == _zc.COPY_PLAIN
    with pytest.raises(ValueError, match="non-temporal"):
        copy_mode("sometimes")
    assert host_pool(2) is host_pool(2)
    assert host_pool(2).size == 2
    with pytest.raises(ValueError, match="unknown host copy"):
        host_copier(1, pool="fibers")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_in_forked_child():
    pool = host_pool(2)
    src = np.arange(1 << 20, dtype=np.uint8)
    r, w = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12 warns that fork() in a process with threads may deadlock: the point here
        # is that the pool does not (its child runs copies on the calling thread).
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            dst = np.zeros_like(src)
            pool.copy_to_ptr(dst.ctypes.data, src, 0, src.nbytes)   # inherited: runs inline
            dst2 = np.zeros_like(src)
            host_pool(2).copy_to_ptr(dst2.ctypes.data, src, 0, src.nbytes)  # a fresh pool
            ok = np.array_equal(dst, src) and np.array_equal(dst2, src) and host_pool(2) is not pool
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    os.close(r)
