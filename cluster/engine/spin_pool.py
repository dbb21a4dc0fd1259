"""Threads in C that run a CPU kernel's core slices, waiting for the next kernel by spinning, not sleeping.

cpu_threads first handed slices to Python threads blocked on a queue. Waking a sleeping thread costs the
operating system's wake-up (on a VM, the hypervisor's too: 0.3 ms a kernel measured on the 2-vCPU test VM,
where a 1B decode step runs ~100 kernels worth splitting). Here the threads are C threads that, after a slice,
poll for the next kernel for up to CLUSTERCTL_SLICE_SPIN_US (default 1000 us: the gaps between a decode step's
kernels are far shorter) before they sleep on a futex, so within a step a hand-off costs a cache line's trip.
The caller runs slice 0 itself and polls until the others are done.

The library is C source compiled once with clang (which tinygrad's CPU backend needs anyway) into the user's
cache directory. A kernel is called with 32 uint64 arguments, its own first and zeros after them: x86-64 and
arm64 callers own their stack arguments, so a kernel that takes fewer reads only its own (tinygrad's own CPU
workers call kernels the same way). Not available (no clang, another OS): cpu_threads keeps its Python threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from cluster.engine import graph_cache

log = logging.getLogger(__name__)

MAX_ARGS = 32
DEFAULT_SPIN_US = 1000

_SOURCE = r"""
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/futex.h>

#define MAX_ARGS 32
typedef void (*kernel_t)(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t,
                         uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t,
                         uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t,
                         uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t);

static _Atomic uint32_t generation;  /* bumped for each kernel */
static _Atomic int pending;          /* workers yet to finish the current kernel */
static _Atomic int sleepers;         /* workers asleep on the futex */
static kernel_t job;
static const uint64_t *job_args;
static int job_slices, workers;
static uint32_t first_generation;  /* the generation a new worker waits past (read before it exists) */
static long spin_ns;

static void relax(void) {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void run_slice(int slice) {
  const uint64_t *a = job_args + (long)slice * MAX_ARGS;
  job(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15],
      a[16], a[17], a[18], a[19], a[20], a[21], a[22], a[23], a[24], a[25], a[26], a[27], a[28], a[29], a[30], a[31]);
}

static void *worker(void *arg) {
  int slice = (int)(intptr_t)arg;
  uint32_t seen = first_generation;
  for (;;) {
    long start = now_ns();
    unsigned spins = 0;
    uint32_t g;
    while ((g = atomic_load_explicit(&generation, memory_order_acquire)) == seen) {
      relax();
      if ((++spins & 255) == 0 && now_ns() - start > spin_ns) {
        atomic_fetch_add(&sleepers, 1);
        syscall(SYS_futex, &generation, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
        atomic_fetch_sub(&sleepers, 1);
        start = now_ns();
      }
    }
    seen = g;
    if (slice < job_slices) run_slice(slice);
    atomic_fetch_sub_explicit(&pending, 1, memory_order_release);
  }
  return NULL;
}

/* threads - 1 workers (slices 1 .. threads - 1); returns how many started */
int pool_start(int threads, long spin_us) {
  spin_ns = spin_us * 1000L;
  workers = 0;  /* a forked child has none of its parent's threads */
  first_generation = atomic_load(&generation);  /* a kernel sent before a worker runs is still its to do */
  for (int i = 1; i < threads; i++) {
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &attr, worker, (void *)(intptr_t)i) != 0) break;
    workers++;
  }
  return workers;
}

/* run `slices` (at most workers + 1) slices of `fn`, slice i's arguments at args[i * MAX_ARGS ...] */
void pool_run(void *fn, const uint64_t *args, int slices) {
  job = (kernel_t)fn;
  job_args = args;
  job_slices = slices;
  atomic_store(&pending, workers);
  atomic_fetch_add(&generation, 1);  /* sequentially consistent: a worker going to sleep sees it or is woken */
  if (atomic_load(&sleepers) > 0) syscall(SYS_futex, &generation, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
  run_slice(0);
  while (atomic_load_explicit(&pending, memory_order_acquire) > 0) relax();
}
"""


def _library_path() -> Path:
    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]
    return graph_cache.user_cache() / f"spin_pool-{digest}.so"


def _build(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src, out = Path(tmp) / "spin_pool.c", Path(tmp) / path.name
        src.write_text(_SOURCE)
        cc = os.environ.get("CC", "clang")
        cmd = [cc, "-O2", "-shared", "-fPIC", "-pthread", str(src), "-o", str(out)]
        subprocess.run(cmd, check=True, capture_output=True)
        os.replace(out, path)  # atomic: processes starting at once each build, one file wins


class SpinPool:
    """C threads that run slices 1.. of each kernel while the caller runs slice 0 (one kernel at a time)."""

    def __init__(self, lib: ctypes.CDLL, threads: int, spin_us: int):
        self.pid = os.getpid()
        self.handed_off = 0  # slices run on pool threads, for tests and curiosity
        self._lib = lib
        self._lock = threading.Lock()
        self.threads = 1 + lib.pool_start(threads, spin_us)

    def fits(self, slices: list[list[ctypes.c_uint64]]) -> bool:
        return len(slices) <= self.threads and all(len(args) <= MAX_ARGS for args in slices)

    def run(self, fxn: Any, slices: list[list[ctypes.c_uint64]]) -> None:
        if not self.fits(slices):
            raise ValueError(f"{len(slices)} slices of up to {max(map(len, slices))} arguments do not fit this pool")
        flat = (ctypes.c_uint64 * (MAX_ARGS * len(slices)))()
        for i, args in enumerate(slices):
            flat[i * MAX_ARGS : i * MAX_ARGS + len(args)] = [a.value for a in args]
        with self._lock:
            self.handed_off += len(slices) - 1
            self._lib.pool_run(ctypes.cast(fxn, ctypes.c_void_p), flat, len(slices))


def start(threads: int) -> SpinPool | None:
    """A pool of `threads` - 1 spinning C threads, or None where the library cannot be built or loaded."""
    if os.name != "posix" or threads < 2:
        return None
    path = _library_path()
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:
        log.info("CPU slices go to Python threads: the spinning pool could not be built (%s)", e)
        return None
    lib.pool_start.argtypes, lib.pool_start.restype = [ctypes.c_int, ctypes.c_long], ctypes.c_int
    lib.pool_run.argtypes, lib.pool_run.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int], None
    chosen = os.environ.get("CLUSTERCTL_SLICE_SPIN_US", "")
    try:
        spin_us = max(0, int(chosen)) if chosen else DEFAULT_SPIN_US
    except ValueError:
        log.warning("CLUSTERCTL_SLICE_SPIN_US=%r is not a number of microseconds; using %d", chosen, DEFAULT_SPIN_US)
        spin_us = DEFAULT_SPIN_US
    return SpinPool(lib, threads, spin_us)
