"""Shared test helpers: the committed checkpoints and warm engines reused across tests.

tinygrad compiles kernels on first use (seconds on this CPU), so engines are built once per session.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# The suite runs on tinygrad's CPU backend (the OpenCL tests name their device): with an OpenCL platform
# installed (pocl, for tests/test_opencl.py), tinygrad would otherwise default to it. Child processes inherit this.
os.environ.setdefault("DEV", "CPU")
# Nodes the tests start (`clusterctl join`) compile one prompt chunk size, the largest of the default, so that a KV
# cache is as long as in use: each size costs seconds of warm-up per shard here, and the engine tests cover several.
os.environ.setdefault("CLUSTERCTL_PREFILL_CHUNKS", "64")

FIXTURES = Path(__file__).parent / "fixtures"
FLOAT_MODELS = ["llama32", "mistral", "qwen2", "qwen3"]
MLX_MODELS = ["llama32-4bit", "llama32-8bit", "qwen3-4bit-mixed"]
ALL_MODELS = FLOAT_MODELS + MLX_MODELS
CHUNK = 8  # small prefill chunks so the ~17-token prompts span several of them
BUCKETS = (4, CHUNK)


def reference(name: str) -> dict[str, Any]:
    """reference.json of a fixture: prompt ids, greedy ids from the reference implementation."""
    return json.loads((FIXTURES / name / "reference.json").read_text())


def reference_logits(name: str) -> np.ndarray:
    """(L, V) float32 logits for prompt + greedy[:-1], from transformers (float) or mlx-lm (MLX models)."""
    return np.load(FIXTURES / name / "reference_logits.npy")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - (np.log(np.exp(x - m).sum(-1, keepdims=True)) + m)


def full_logprobs(result: Any) -> np.ndarray:
    """A step's logprobs over the fixtures' 512-token vocabulary (from logprobs=512)."""
    v = np.full(512, -np.inf)
    for i, lp in result.top:
        v[i] = lp
    return v


def check_float16_against_reference(eng: Any, name: str) -> None:
    """A float16 engine's prompt and 5 teacher-forced steps (the reference's own tokens fed back) against the
    fp32 reference logits, with a tolerance fitting half precision; its greedy picks must be the reference's."""
    ref, logits = reference(name), reference_logits(name)
    prompt = ref["prompt_ids"]
    sid = eng.new_session()
    try:
        r = eng.forward(sid, np.array(prompt), logprobs=512)
        results = [(r, logits[len(prompt) - 1])]
        for i, token in enumerate(ref["greedy_ids"][:5]):
            r = eng.forward(sid, np.array([token]), logprobs=512)
            results.append((r, logits[len(prompt) + i]))
    finally:
        eng.end_session(sid)
    # logits reach ~12 here, where one fp16 step is ~0.008: allow ~20 steps of drift over 4 layers
    errs = [np.abs(full_logprobs(r) - log_softmax(want)).max() for r, want in results]
    assert max(errs) < 0.15, f"{name}: float16 logprob error {max(errs):.3f}"
    assert [r.token for r, _ in results] == [int(np.argmax(want)) for _, want in results]


def row_blocks(a: np.ndarray, block: int) -> Any:
    """(out, cols) -> a Tensor (out/R, cols, R), as Checkpoint.load(row_block=R) stores a CPU weight."""
    from tinygrad import Tensor

    rows, cols = a.shape
    return Tensor(np.ascontiguousarray(a.reshape(rows // block, block, cols).transpose(0, 2, 1)))


def mlx_layer(
    rng: np.random.Generator, bits: int, group: int, out: int, inputs: int, scales: tuple[float, float] = (0.01, 0.1)
) -> tuple[Any, np.ndarray]:
    """A QuantLinear of random MLX levels (uint32 words, LSB first), scales drawn from `scales` and biases from
    (-0.5, 0.5) per group, its rows blocked as the loader stores them on CPUs; and its (out, in) float64 weight."""
    from tinygrad import dtypes

    from cluster.models.config import QuantSpec
    from cluster.models.decoder import CPU_NARROW_ROW_BLOCK, QuantLinear, cpu_row_block

    per_word = 32 // bits
    levels = rng.integers(0, 1 << bits, size=(out, inputs), dtype=np.uint32)
    words = levels.reshape(out, inputs // per_word, per_word) << (np.arange(per_word, dtype=np.uint32) * bits)
    packed = np.bitwise_or.reduce(words, axis=-1)
    scale = rng.uniform(*scales, size=(out, inputs // group)).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, size=(out, inputs // group)).astype(np.float32)
    w = levels.reshape(out, -1, group) * scale[..., None] + bias[..., None]  # float64: uint32 * float32
    block = cpu_row_block(out, CPU_NARROW_ROW_BLOCK)
    blocked = [row_blocks(a, block) for a in (packed, scale, bias)]
    layer = QuantLinear(*blocked, QuantSpec(group, bits), dtypes.float32, row_blocked=True)
    return layer, w.reshape(out, inputs)


def jit_programs(jit: Any) -> list[Any]:
    """The programs (PROGRAM uops) one replay of a captured TinyJit runs, in order (graph batches expanded)."""
    from tinygrad.uop.ops import Ops

    calls = []
    for call in jit.captured.linear.src:
        ast = call.src[0]
        calls.extend(ast.src[0].src if ast.op is Ops.CUSTOM_FUNCTION and ast.arg == "graph" else [call])
    return [c.src[0] for c in calls if c.src[0].op is Ops.PROGRAM]


def graph_runners(jit: Any) -> list[Any]:
    """The graph runners a captured TinyJit replays through."""
    from tinygrad.engine.realize import graph_cache

    captured = jit.captured
    assert captured is not None
    return [graph_cache[c.src[0]] for c in captured.linear.src if c.src[0].arg == "graph"]


def two_sessions(engine: Any, prompts: list[list[int]], steps: int) -> list[list[tuple[int, float]]]:
    """Two sessions, prefilled and then decoded in turns, so each replay gets the other session's KV cache."""
    from cluster.sampling import SamplingParams

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


class EngineCache:
    def __init__(self) -> None:
        self._engines: dict[tuple, Any] = {}

    def get(self, name: str, start: int = 0, end: int | None = None, **opts: Any):
        from cluster.engine.shard import ShardEngine

        key = (name, start, end, tuple(sorted(opts.items())))
        if key not in self._engines:
            opts = {"prefill_buckets": BUCKETS, "max_context": 128, **opts}
            self._engines[key] = ShardEngine(FIXTURES / name, start, end, **opts)
        return self._engines[key]


# Fresh for every run: two test runs on one machine (their nodes share loopback mDNS) never form one cluster.
TEST_TOKEN = f"clusterctl-test-{secrets.token_hex(8)}"


@pytest.fixture(scope="session", autouse=True)
def cluster_token(tmp_path_factory):
    """One cluster token and one graph cache for every node and client of the run (child processes inherit
    them); the user's own ~/.config/clusterctl and ~/.cache/clusterctl/graphs are never read or written."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
    patch.setenv("CLUSTERCTL_TOKEN", TEST_TOKEN)
    # the run's own graph cache: its first shard of each kind captures graphs, later ones (other modules'
    # nodes included) read them; the user's ~/.cache is never touched and every run starts cold
    patch.setenv("CLUSTERCTL_GRAPH_CACHE", str(tmp_path_factory.mktemp("graphs")))
    yield TEST_TOKEN
    patch.undo()


@pytest.fixture(scope="session")
def engines() -> EngineCache:
    return EngineCache()
