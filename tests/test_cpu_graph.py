"""CPU JITs replay through CPUGraph (cluster/engine/cpu_graph.py).

References: numpy for a small JIT, and for the engine the same engine capturing its JITs without graphs
(tinygrad's own executor, as before CPUGraph).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BUCKETS, FIXTURES
from tinygrad import Device, Tensor, TinyJit, UOp
from tinygrad.helpers import NUM_CPU_THREADS

from cluster.engine import cpu_graph, cpu_threads
from cluster.engine.shard import ShardEngine, uses_graphs
from cluster.sampling import SamplingParams

pytestmark = pytest.mark.skipif(Device.DEFAULT != "CPU", reason="needs tinygrad's CPU device")


def _graph_runners(jit: TinyJit) -> list[cpu_graph.CPUGraph]:
    from tinygrad.engine.realize import graph_cache

    captured = jit.captured
    assert captured is not None
    return [graph_cache[c.src[0]] for c in captured.linear.src if c.src[0].arg == "graph"]


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
    pool = cpu_threads._slice_pool() if NUM_CPU_THREADS.value >= 2 else None
    before = pool.handed_off if pool is not None else 0
    for i in range(8):
        x, cols = xs[i % 3], 2 + 5 * i  # a different input buffer and a different bound value each call
        out = step(x, w, n.bind(cols)).numpy()
        ref = (w.numpy() * x.numpy()).sum(-1) + x.numpy()[:, :cols].sum()
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)

    assert uses_graphs(step)
    runners = _graph_runners(step)
    assert runners and all(isinstance(r, cpu_graph.CPUGraph) for r in runners)
    assert sum(len(r.kernels) for r in runners) >= 2
    if pool is not None:
        assert pool.handed_off > before, "the graph never ran a kernel's slices on the pool"


def _run(engine: ShardEngine, prompts: list[list[int]], steps: int) -> list[list[tuple[int, float]]]:
    """Two sessions, prefilled and then decoded in turns, so each replay gets the other session's KV cache."""
    sampling = SamplingParams(temperature=0.8, top_k=20, seed=3)
    sids = [engine.new_session(f"s{i}", sampling) for i in range(len(prompts))]
    out: list[list[tuple[int, float]]] = [[] for _ in prompts]
    last = [0] * len(prompts)
    for i, (sid, prompt) in enumerate(zip(sids, prompts, strict=True)):
        r = engine.forward(sid, np.asarray(prompt, np.int32))
        out[i].append((int(r.token or 0), float(r.logprob or 0.0)))
        last[i] = int(r.token or 0)
    for _ in range(steps):
        for i, sid in enumerate(sids):
            r = engine.forward(sid, np.asarray([last[i]], np.int32))
            out[i].append((int(r.token or 0), float(r.logprob or 0.0)))
            last[i] = int(r.token or 0)
    for sid in sids:
        engine.end_session(sid)
    return out


@pytest.mark.parametrize("name", ["llama32", "llama32-4bit"])
def test_the_engine_gives_the_same_tokens_with_and_without_the_graph(engines, name: str) -> None:
    prompts = [list(range(1, 20)), [5, 9, 2, 7, 11, 3, 8]]  # chunks of 8 and 4 rows, then decode steps
    with_graph = engines.get(name)
    without = ShardEngine(FIXTURES / name, prefill_buckets=BUCKETS, max_context=128)
    without.jit_graphs = False  # tinygrad's own executor, kernel by kernel
    for engine in (with_graph, without):
        engine.warmup()

    assert uses_graphs(with_graph._decode_jit) and not uses_graphs(without._decode_jit)
    assert all(isinstance(r, cpu_graph.CPUGraph) for r in _graph_runners(with_graph._decode_jit))
    got, want = _run(with_graph, prompts, 12), _run(without, prompts, 12)
    for g, w in zip(got, want, strict=True):
        assert [t for t, _ in g] == [t for t, _ in w]
        np.testing.assert_allclose([lp for _, lp in g], [lp for _, lp in w], rtol=1e-5, atol=1e-5)
