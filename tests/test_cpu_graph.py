"""CPU JITs replay through CPUGraph (cluster/engine/cpu_graph.py).

References: numpy for a small JIT, and for the engine the same engine capturing its JITs without graphs
(tinygrad's own executor, as before CPUGraph).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BUCKETS, FIXTURES, graph_runners, two_sessions
from tinygrad import Device, GlobalCounters, Tensor, TinyJit, UOp
from tinygrad.engine import jit as tinygrad_jit
from tinygrad.engine import realize
from tinygrad.helpers import NUM_CPU_THREADS

from cluster.engine import cpu_graph, cpu_threads
from cluster.engine.shard import ShardEngine, uses_graphs

pytestmark = pytest.mark.skipif(Device.DEFAULT != "CPU", reason="needs tinygrad's CPU device")


def test_a_jit_replays_through_the_graph_with_new_inputs_and_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu_graph.enable()
    cpu_threads.enable()
    n = UOp.variable("n", 1, 64)

    @TinyJit
    def step(x: Tensor, w: Tensor, n: UOp) -> Tensor:
        # a product big enough to be split per core, and a sum over a variable number of columns
        return ((x * w).sum(-1) + x[:, :n].sum()).realize()

    rng = np.random.default_rng(0)
    w = Tensor(rng.standard_normal((4096, 512), dtype=np.float32)).realize()
    xs = [Tensor(rng.standard_normal((1, 512), dtype=np.float32)).realize() for _ in range(3)]
    monkeypatch.setattr(cpu_threads, "MIN_PARALLEL_S", 0.0)  # the product's slices go to the pool once proven
    before = cpu_threads.handed_off()
    for i in range(8):
        x, cols = xs[i % 3], 2 + 5 * i  # a different input buffer and a different bound value each call
        out = step(x, w, n.bind(cols)).numpy()
        ref = (w.numpy() * x.numpy()).sum(-1) + x.numpy()[:, :cols].sum()
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)

    assert uses_graphs(step)
    runners = graph_runners(step)
    assert runners and all(isinstance(r, cpu_graph.CPUGraph) for r in runners)
    assert sum(len(r.steps) for r in runners) >= 2
    if NUM_CPU_THREADS.value >= 2:
        assert cpu_threads.handed_off() > before, "the graph never ran a kernel's slices on the pool"
    # a replay counts its kernels but no ops or bytes: building the graph skips tinygrad's symbolic statistics
    # (seconds of every 1B shard's warm-up), and leaves tinygrad's estimator as it was for everything else
    GlobalCounters.reset()
    step(xs[0], w, n.bind(7))
    assert GlobalCounters.kernel_count >= 1 and GlobalCounters.global_ops == GlobalCounters.global_mem == 0
    assert tinygrad_jit.estimate_uop is realize.estimate_uop


@pytest.mark.parametrize("name", ["llama32", "llama32-4bit"])
def test_the_engine_gives_the_same_tokens_with_and_without_the_graph(engines, name: str) -> None:
    prompts = [list(range(1, 20)), [5, 9, 2, 7, 11, 3, 8]]  # chunks of 8 and 4 rows, then decode steps
    with_graph = engines.get(name)
    without = ShardEngine(FIXTURES / name, prefill_buckets=BUCKETS, max_context=128)
    without.jit_graphs = False  # tinygrad's own executor, kernel by kernel
    for engine in (with_graph, without):
        engine.warmup()

    assert uses_graphs(with_graph._decode_jit) and not uses_graphs(without._decode_jit)
    assert all(isinstance(r, cpu_graph.CPUGraph) for r in graph_runners(with_graph._decode_jit))
    got, want = two_sessions(with_graph, prompts, 12), two_sessions(without, prompts, 12)
    for g, w in zip(got, want, strict=True):
        assert [t for t, _ in g] == [t for t, _ in w]
        np.testing.assert_allclose([lp for _, lp in g], [lp for _, lp in w], rtol=1e-5, atol=1e-5)
