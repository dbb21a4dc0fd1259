"""The CPU engine runs tinygrad's per-core kernel slices at once (cluster/engine/cpu_threads.py).

Reference: the same kernel run slice after slice on one thread, as tinygrad 0.14 does by itself; the
parallel run must give the same bits, and numpy the same values.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from tinygrad import Device, Tensor
from tinygrad.helpers import NUM_CPU_THREADS

from cluster.engine import cpu_threads

pytestmark = pytest.mark.skipif(
    Device.DEFAULT != "CPU" or NUM_CPU_THREADS.value < 2, reason="needs tinygrad's CPU device and 2+ cores"
)


def _matvec(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    # (out, in) * (1, in) summed over in: one kernel big enough (8 MiB of weights) to be split per core
    return (Tensor(x) * Tensor(w)).sum(-1).numpy()


def test_parallel_slices_give_the_serial_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu_threads.enable()
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((4096, 512), dtype=np.float32), rng.standard_normal((1, 512), dtype=np.float32)

    monkeypatch.setattr(cpu_threads, "MIN_PARALLEL_S", float("inf"))  # every kernel stays on this thread
    serial = _matvec(w, x)
    monkeypatch.setattr(cpu_threads, "MIN_PARALLEL_S", 0.0)
    before = cpu_threads.handed_off()
    for _ in range(cpu_threads.SERIAL_TRIALS - 1):  # timed on one thread until the kernel is marked
        _matvec(w, x)
    assert cpu_threads.handed_off() == before, "one slow run must not be enough to go parallel"
    _matvec(w, x)
    parallel = _matvec(w, x)

    assert cpu_threads.handed_off() > before, "no slice ran on a pool thread"
    assert parallel.tobytes() == serial.tobytes()
    np.testing.assert_allclose(parallel, (w * x).sum(-1), rtol=1e-4, atol=1e-4)


def test_small_kernels_stay_on_the_calling_thread() -> None:
    assert cpu_threads.enable()
    a = Tensor(np.arange(64, dtype=np.float32)).realize()
    before = cpu_threads.handed_off()
    for _ in range(3):
        out = (a * 2 + 1).sum().numpy()  # microseconds of work: never worth a hand-off
    assert out == pytest.approx(float((np.arange(64) * 2 + 1).sum()))
    assert cpu_threads.handed_off() == before


def test_a_failing_slice_is_raised_after_every_slice_finished() -> None:
    pool = cpu_threads._SlicePool(2)
    finished: list[int] = []
    lock = threading.Lock()

    def slice_fn(tid: object) -> None:
        if tid == 1:
            raise ValueError("slice 1 failed")
        with lock:
            finished.append(int(tid))  # type: ignore[call-overload]

    with pytest.raises(ValueError, match="slice 1 failed"):
        pool.run(slice_fn, [[0], [1], [2]])  # type: ignore[list-item]
    assert sorted(finished) == [0, 2]
    pool.run(slice_fn, [[3], [4]])  # the pool still serves after a failure  # type: ignore[list-item]
    assert sorted(finished) == [0, 2, 3, 4]


def test_slices_go_to_spinning_c_threads() -> None:
    """The threads that take slices poll for the next kernel (spin_pool): a hand-off costs microseconds, where
    waking a Python thread blocked on a queue cost ~0.3 ms on the test VM. Same bits as one thread."""
    assert cpu_threads.enable()
    pool = cpu_threads._spinning_pool()
    assert pool is not None, "the spinning pool could not be built here (clang?)"
    rng = np.random.default_rng(1)
    w, x = rng.standard_normal((4096, 512), dtype=np.float32), rng.standard_normal((1, 512), dtype=np.float32)
    before = pool.handed_off
    results = [_matvec(w, x) for _ in range(cpu_threads.SERIAL_TRIALS + 2)]
    assert pool.handed_off > before, "no slice went to the spinning pool"
    assert all(r.tobytes() == results[0].tobytes() for r in results)
    np.testing.assert_allclose(results[-1], (w * x).sum(-1), rtol=1e-4, atol=1e-4)


_SLEEPING = """
import numpy as np
from tinygrad import Tensor
from cluster.engine import cpu_threads
cpu_threads.enable()
cpu_threads.MIN_PARALLEL_S = 0.0
rng = np.random.default_rng(2)
w, x = rng.standard_normal((4096, 512), dtype=np.float32), rng.standard_normal((1, 512), dtype=np.float32)
outs = [(Tensor(x) * Tensor(w)).sum(-1).numpy() for _ in range(6)]
ok = all(np.allclose(o, (w * x).sum(-1), rtol=1e-4, atol=1e-4) for o in outs)
print(ok, cpu_threads._spinning_pool().handed_off)
"""


def test_threads_that_sleep_between_kernels_are_woken() -> None:
    """CLUSTERCTL_SLICE_SPIN_US=0: the pool's threads sleep right after each slice, so every kernel wakes them."""
    env = {**os.environ, "CLUSTERCTL_SLICE_SPIN_US": "0"}
    run = subprocess.run(
        [sys.executable, "-c", _SLEEPING], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    ok, handed = run.stdout.split()
    assert ok == "True" and int(handed) > 0
