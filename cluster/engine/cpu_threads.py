"""Run tinygrad's per-core slices of a CPU kernel on every core at once.

tinygrad 0.14 compiles each large CPU kernel split into `core_id` slices, one per core (its THREAD
optimization, sized by NUM_CPU_THREADS), but its runtime calls the slices one after another on the calling
thread, so a decode step used one core. The slices write disjoint parts of the output, so running them at
once on a few threads gives the same bits; ctypes releases the GIL while a kernel runs. On a 2-core machine
this took the 1B model from 4.1 to 7.6 tok/s (bench/RESULTS.md).

The slices go to spin_pool's C threads, which poll for the next kernel instead of sleeping (waking a sleeping
thread cost 0.3 ms a kernel on the test VM); where that pool cannot be built, to Python threads blocked on a
queue. A kernel stays on the calling thread until `SERIAL_TRIALS` serial runs all took at least `MIN_PARALLEL_S`:
a hand-off costs more than a small kernel saves, and the fastest of a few runs is not fooled by one run the
scheduler happened to interrupt.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading
import time
from typing import Any

from tinygrad.helpers import NUM_CPU_THREADS

from cluster.engine import spin_pool

log = logging.getLogger(__name__)

MIN_PARALLEL_S = 100e-6
SERIAL_TRIALS = 3

_Job = tuple[Any, list[ctypes.c_uint64], Any]  # kernel, its arguments, the caller's done queue


class _SlicePool:
    """Threads that each run one kernel slice at a time; the caller runs slice 0 itself."""

    def __init__(self, threads: int):
        self.pid = os.getpid()
        self.handed_off = 0  # slices run on pool threads, for tests and curiosity
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()  # one kernel at a time
        for i in range(threads):
            threading.Thread(target=self._work, name=f"cpu-slices-{i}", daemon=True).start()

    def _work(self) -> None:
        while True:
            fxn, args, done = self._jobs.get()
            try:
                fxn(*args)
                done.put(None)
            except BaseException as exc:  # handed back to the caller, which re-raises it
                done.put(exc)

    def run(self, fxn: Any, slices: list[list[ctypes.c_uint64]]) -> None:
        # a done queue per kernel: a caller interrupted while waiting leaves no stale signal for the next one
        done: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        with self._lock:
            self.handed_off += len(slices) - 1
            for args in slices[1:]:
                self._jobs.put((fxn, args, done))
            error: BaseException | None = None
            try:
                fxn(*slices[0])
            finally:
                for _ in slices[1:]:  # wait for every slice even if ours failed: they write shared buffers
                    error = done.get() or error
            if error is not None:
                raise error


_pool: _SlicePool | None = None
_spin: spin_pool.SpinPool | None = None
_spin_pid = 0  # the process whose spinning pool `_spin` is (None there: none could be built)
_pool_lock = threading.Lock()
_serial_call: Any = None


def _slice_pool() -> _SlicePool:
    """Python threads blocked on a queue: slices of kernels the spinning pool cannot call."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid():  # threads do not survive a fork
            _pool = _SlicePool(max(1, NUM_CPU_THREADS.value - 1))
        return _pool


def handed_off() -> int:
    """Slices this process ran on pool threads so far (for tests and curiosity)."""
    pools: list[Any] = [_pool, _spin]
    return sum(p.handed_off for p in pools if p is not None and p.pid == os.getpid())  # a parent's count is not ours


def _spinning_pool() -> spin_pool.SpinPool | None:
    global _spin, _spin_pid
    with _pool_lock:
        if _spin_pid != os.getpid():
            _spin, _spin_pid = spin_pool.start(NUM_CPU_THREADS.value), os.getpid()
        return _spin


def run_slices(prg: Any, slices: list[list[ctypes.c_uint64]]) -> None:
    """Run a compiled CPU kernel's core slices (each a full argument list): on the calling thread until the kernel
    proved big enough to gain from the pool, then at once on the pool. Serial without the pool."""
    if len(slices) < 2 or _serial_call is None or not getattr(prg, "_slices_in_parallel", False):
        st = time.perf_counter()
        for args in slices:
            prg.fxn(*args)
        if len(slices) >= 2 and _serial_call is not None:
            trials = getattr(prg, "_serial_trials", 0) + 1 if time.perf_counter() - st >= MIN_PARALLEL_S else 0
            prg._serial_trials = trials  # consecutive slow runs; one fast run starts the count again
            prg._slices_in_parallel = trials >= SERIAL_TRIALS
        return
    spinning = _spinning_pool()
    if spinning is not None and spinning.fits(slices):
        spinning.run(prg.fxn, slices)
    else:
        _slice_pool().run(prg.fxn, slices)


def _call(
    self: Any,
    *bufs: Any,
    global_size: tuple[int, int, int] = (1, 1, 1),
    local_size: tuple[int, int, int] = (1, 1, 1),
    vals: tuple[int | None, ...] = (),
    wait: bool = False,
    timeout: int | None = None,
) -> float | None:
    """CPUProgram.__call__ that runs a kernel's slices at once after the kernel proved big enough to gain."""
    slot = self.runtimevars.get("core_id")
    if slot is None or self.lvp or global_size[0] < 2:
        return _serial_call(
            self, *bufs, global_size=global_size, local_size=local_size, vals=vals, wait=wait, timeout=timeout
        )
    st = time.perf_counter()
    args = [*(b.va_addr for b in bufs), *vals]
    slices = []
    for tid in range(global_size[0]):
        args[slot] = tid
        slices.append([ctypes.c_uint64(x) for x in args])
    run_slices(self, slices)
    return time.perf_counter() - st if wait else None


def enable() -> bool:
    """Run CPU kernel slices in parallel from now on in this process (idempotent). False where this tinygrad's
    CPU runtime is not the one this was written for, or only one core is in use."""
    global _serial_call
    if _serial_call is not None:
        return True
    if NUM_CPU_THREADS.value < 2:
        return False
    try:
        from tinygrad.runtime.ops_cpu import CPUProgram
    except ImportError:
        return False
    original = CPUProgram.__call__
    code = getattr(original, "__code__", None)
    if code is None or not {"global_size", "vals", "wait"} <= set(code.co_varnames):
        log.warning("tinygrad's CPU runtime changed shape: CPU kernels run on one core")
        return False
    _serial_call = original
    CPUProgram.__call__ = _call  # type: ignore[method-assign]
    log.debug("CPU kernel slices run on up to %d threads", NUM_CPU_THREADS.value)
    return True
