"""The AVX2 kernel for the MLP's silu(gate) * up on x86 CPUs (cluster/engine/cpu_silu.py).

Reference: numpy in float64, x / (1 + e^-x) * up. The whole-model references are in test_engine, whose layers run
through this kernel on such a CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES, jit_programs
from tinygrad import Device, Tensor, TinyJit

from cluster.engine import cpu_matmul, cpu_quant, cpu_silu
from cluster.engine.shard import ShardEngine


@pytest.fixture(autouse=True)
def _kernel_on() -> None:
    if Device.DEFAULT != "CPU" or not cpu_matmul.enable() or not cpu_quant.enable("CPU"):
        pytest.skip("needs tinygrad's CPU device on an x86 CPU with AVX2 and FMA")


@pytest.mark.parametrize("shape", [(1, 16, 8192), (1, 1, 8192), (1, 3, 24)])
def test_silu_mul_matches_float64(shape: tuple[int, ...]) -> None:
    """Large gates of either sign (e^-x overflows float32 below -88) and signed zero included."""
    rng = np.random.default_rng(len(shape) + shape[-1])
    gate = (rng.standard_normal(shape) * 6).astype(np.float32)
    gate.flat[:5] = [0.0, -0.0, -100.0, 100.0, -30.0]
    up = rng.standard_normal(shape).astype(np.float32)
    step = TinyJit(lambda g, u: cpu_silu.silu_mul(g, u).realize())
    for _ in range(3):
        got = step(Tensor(gate).realize(), Tensor(up).realize()).numpy()
    g = gate.astype(np.float64)
    ref = g / (1 + np.exp(-g)) * up
    assert got.shape == shape
    np.testing.assert_allclose(got, ref, rtol=3e-6, atol=1e-30)
    assert f"silu_mul_{np.prod(shape)}" in [p.arg.name for p in jit_programs(step)]


def test_other_gates_keep_tinygrads_code() -> None:
    assert cpu_silu.applies(Tensor.zeros(1, 4, 64))
    assert not cpu_silu.applies(Tensor.zeros(1, 4, 60))  # no multiple of 8
    assert not cpu_silu.applies(Tensor.zeros(1, 4, 64).half())


def test_an_engine_runs_its_mlp_through_the_kernel() -> None:
    eng = ShardEngine(FIXTURES / "llama32", max_context=32, prefill_buckets=(4,))
    eng.new_session("s")
    token = eng.forward("s", [1, 2, 3]).token
    for _ in range(2):
        token = eng.forward("s", [token]).token
    for jit, rows in ((eng._prefill_jits[4], 4), (eng._decode_jit, 1)):
        names = [p.arg.name for p in jit_programs(jit)]
        assert names.count(f"silu_mul_{rows * eng.cfg.intermediate_size}") == eng.cfg.num_layers
