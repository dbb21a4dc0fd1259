"""The AVX2 kernel for a prompt chunk's attention on x86 CPUs (cluster/engine/cpu_attention.py).

Reference: numpy in float64, causal softmax attention of each query head over its KV head's cached positions
0 .. start + t (Hugging Face's grouped-query attention: query head h reads KV head h // G). The whole-model
references (transformers, mlx-lm) are in test_engine, whose prompts run through this kernel on such a CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import FIXTURES, jit_programs
from tinygrad import Device, Tensor, TinyJit
from tinygrad.uop.ops import UOp

from cluster.engine import cpu_attention, cpu_matmul, cpu_quant
from cluster.engine.shard import ShardEngine


@pytest.fixture(autouse=True)
def _kernel_on() -> None:
    if Device.DEFAULT != "CPU" or not cpu_matmul.enable() or not cpu_quant.enable("CPU"):
        pytest.skip("needs tinygrad's CPU device on an x86 CPU with AVX2 and FMA")


def reference(q: np.ndarray, cache: np.ndarray, start: int) -> np.ndarray:
    _, heads, tokens, hd = q.shape
    group = heads // cache.shape[2]
    out = np.zeros(q.shape)
    for h in range(heads):
        keys, values = cache[0, 0, h // group].astype(np.float64), cache[1, 0, h // group].astype(np.float64)
        for t in range(tokens):
            s = keys[: start + t + 1] @ q[0, h, t] / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[0, h, t] = p @ values[: start + t + 1] / p.sum()
    return out


def programs(jit: Any) -> list[str]:
    return [p.arg.name for p in jit_programs(jit)]


@pytest.mark.parametrize(
    ("heads", "kv", "tokens", "hd", "start"),
    [
        (32, 8, 64, 64, 100),  # a 1B model's chunk of 64 after 100 cached positions
        (32, 8, 16, 64, 0),  # a first chunk
        (4, 2, 13, 16, 7),  # rows that do not fill the last tile of 16
        (6, 6, 4, 8, 2),  # no grouping
        (8, 1, 3, 32, 30),  # all heads on one KV head
        (32, 8, 1, 64, 520),  # a decode step
    ],
)
def test_chunk_attention_matches_float64(heads: int, kv: int, tokens: int, hd: int, start: int) -> None:
    """Positions past each row's own are masked exactly: the cache beyond the chunk holds NaN, which a key or value
    that leaked into a sum would spread."""
    rng = np.random.default_rng(heads * 100 + tokens)
    length = 16 * (-(-(start + tokens + 20) // 16))
    q = rng.standard_normal((1, heads, tokens, hd)).astype(np.float32)
    cache = rng.standard_normal((2, 1, kv, length, hd)).astype(np.float32) * 2
    cache[:, :, :, start + tokens :] = np.nan
    step = TinyJit(lambda a, c, p: cpu_attention.attention(a, c, p).realize())
    pos = UOp.variable("start_pos", 0, length - tokens)
    for _ in range(3):  # the eager call, the capture, a replay
        got = step(Tensor(q).realize(), Tensor(cache).realize(), pos.bind(start)).numpy()
    ref = reference(q, cache, start)
    assert np.isfinite(got).all()
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 2e-6, f"relative error {err:.1e}"
    assert f"attention_{heads}_{kv}_{hd}_{tokens}" in programs(step)


def test_one_graph_serves_every_start_position() -> None:
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 4, 8, 16)).astype(np.float32)
    cache = rng.standard_normal((2, 1, 2, 64, 16)).astype(np.float32)
    step = TinyJit(lambda a, c, p: cpu_attention.attention(a, c, p).realize())
    pos = UOp.variable("start_pos", 0, 56)
    for start in (0, 5, 40, 3, 56):
        got = step(Tensor(q).realize(), Tensor(cache).realize(), pos.bind(start)).numpy()
        np.testing.assert_allclose(got, reference(q, cache, start), rtol=1e-5, atol=1e-6)


def test_other_dtypes_keep_tinygrads_code() -> None:
    q, cache = Tensor.zeros(1, 4, 8, 16).contiguous(), Tensor.zeros(2, 1, 2, 64, 16).contiguous()
    assert cpu_attention.applies(q, cache)
    assert cpu_attention.applies(q[:, :, :1], cache)  # one token: a decode step
    assert not cpu_attention.applies(q.half(), cache)
    assert not cpu_attention.applies(q, cache.half())
    assert not cpu_attention.applies(Tensor.zeros(1, 4, 8, 12), cache)  # head_dim no multiple of 8


def test_an_engine_runs_its_prompt_chunks_and_decode_steps_through_the_kernel() -> None:
    eng = ShardEngine(FIXTURES / "llama32", max_context=32, prefill_buckets=(4,))
    eng.new_session("s")
    token = eng.forward("s", [1, 2, 3, 4, 5, 6]).token  # two chunks of 4: the second reads the first's positions
    for _ in range(2):
        token = eng.forward("s", [token]).token
    names = programs(eng._prefill_jits[4])
    assert sum(name.startswith("attention_") for name in names) == eng.cfg.num_layers
    assert sum(name.startswith("attention_") for name in programs(eng._decode_jit)) == eng.cfg.num_layers
