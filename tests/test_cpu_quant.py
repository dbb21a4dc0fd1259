"""The AVX2 kernels for MLX-quantized products on x86 CPUs (cluster/engine/cpu_quant.py): decode (one token) and
prompt chunks.

Reference: numpy in float64 on the same weights (MLX words unpacked LSB first, value = q * scale + bias per group),
for layers stored as the loader stores them on CPUs (blocks of 8 rows). The whole-model references (mlx-lm) are in
test_engine, whose 4-bit and mixed 4/8-bit fixtures decode through this kernel on such a CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import FIXTURES, mlx_layer, row_blocks
from conftest import jit_programs as programs
from tinygrad import Device, Tensor, TinyJit, dtypes
from tinygrad.helpers import NUM_CPU_THREADS

from cluster.engine import cpu_matmul, cpu_quant
from cluster.engine.shard import ShardEngine
from cluster.models.decoder import Linear


@pytest.fixture(autouse=True)
def _kernel_on() -> None:
    if Device.DEFAULT != "CPU" or not cpu_matmul.enable() or not cpu_quant.enable("CPU"):
        pytest.skip("needs tinygrad's CPU device on an x86 CPU with AVX2 and FMA")


@pytest.mark.parametrize(
    ("bits", "group", "out", "inputs"),
    [(4, 64, 1024, 2048), (4, 32, 64, 64), (4, 128, 256, 512), (8, 64, 512, 1024), (8, 32, 128, 64), (8, 128, 64, 256)],
)
def test_decode_product_matches_float64(bits: int, group: int, out: int, inputs: int) -> None:
    """float32's precision, not int16's: the rounding residual's second pass keeps the error near 1e-7 of the
    largest output (one int16 pass alone: ~3e-5). Activations with an outlier in each group, as real ones have."""
    rng = np.random.default_rng(bits * 1000 + group)
    layer, w = mlx_layer(rng, bits, group, out, inputs, scales=(-0.05, 0.05))
    x = rng.standard_normal((1, 1, inputs)).astype(np.float32)
    x[..., ::group] *= 40.0
    step = TinyJit(lambda t: layer(t).realize())
    for _ in range(3):  # the eager call, the capture, a replay
        got = step(Tensor(x).realize()).numpy()
    assert got.shape == (1, 1, out)
    ref = x.reshape(-1).astype(np.float64) @ w.T
    err = np.abs(got.reshape(-1) - ref).max() / np.abs(ref).max()
    assert err < 2e-6, f"relative error {err:.1e}"
    assert f"q{bits}_matvec_{inputs}_{out}_{group}" in [p.arg.name for p in programs(step)]


def test_the_kernel_runs_in_slices_one_per_core() -> None:
    """tinygrad hands the kernel its core_id like its own kernels (cpu_threads runs the slices at once); the rows
    are shared out so that every slice writes its own and together they write them all."""
    rng = np.random.default_rng(3)
    layer, w = mlx_layer(rng, 4, 64, 8 * 5, 128, scales=(-0.05, 0.05))  # 5 row blocks: slices of unequal size
    x = rng.standard_normal((1, 1, 128)).astype(np.float32)
    step = TinyJit(lambda t: layer(t).realize())
    for _ in range(3):
        got = step(Tensor(x).realize()).numpy().reshape(-1)
    np.testing.assert_allclose(got, x.reshape(-1).astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5)
    (program,) = [p for p in programs(step) if p.arg.name.startswith("q4_matvec")]
    assert program.arg.global_size[0] == min(NUM_CPU_THREADS.value, 5)


@pytest.mark.parametrize(
    ("bits", "group", "blocks", "inputs", "tokens"),
    [
        (4, 64, 128, 2048, 16),  # a 1B model's q projection, a 16-token chunk
        (4, 64, 4, 512, 64),  # 64 tokens: a first tile, 9 more of 6, a last of 4
        (4, 32, 5, 64, 13),  # 5 row blocks: two pairs and one alone; a last tile of one token
        (4, 128, 3, 384, 5),  # fewer tokens than a tile; a panel of 128 (384 is no multiple of 256)
        (8, 64, 6, 1024, 16),
        (8, 32, 1, 96, 7),
    ],
)
def test_prompt_chunk_matches_float64(bits: int, group: int, blocks: int, inputs: int, tokens: int) -> None:
    """float32 multiply-adds of the same dequantized weights as tinygrad's matmul: float32's error, any number of
    tokens, row blocks and panels."""
    rng = np.random.default_rng(bits * 100 + tokens)
    layer, w = mlx_layer(rng, bits, group, 8 * blocks, inputs, scales=(-0.05, 0.05))
    x = rng.standard_normal((1, tokens, inputs)).astype(np.float32)
    x[..., ::group] *= 40.0
    step = TinyJit(lambda t: layer(t).realize())
    for _ in range(3):
        got = step(Tensor(x).realize()).numpy()
    assert got.shape == (1, tokens, 8 * blocks)
    ref = x[0].astype(np.float64) @ w.T
    err = np.abs(got[0] - ref).max() / np.abs(ref).max()
    assert err < 2e-6, f"relative error {err:.1e}"
    assert f"q{bits}_matmul_{inputs}_{8 * blocks}_{group}_{tokens}" in [p.arg.name for p in programs(step)]


@pytest.mark.parametrize(("blocks", "inputs", "tokens"), [(128, 2048, 16), (5, 72, 13), (3, 512, 64)])
def test_bf16_prompt_chunk_matches_float64(blocks: int, inputs: int, tokens: int) -> None:
    """The same GEMM over bf16 weights (uint16 bits in blocks of 8 rows, as the loader stores them on CPUs), each
    widened to the float32 it stands for: float32's error."""
    rng = np.random.default_rng(tokens)
    bits = (rng.standard_normal((8 * blocks, inputs)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    w = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    layer = Linear(row_blocks(bits, 8).realize(), None, dtypes.float32, row_blocked=True)
    x = rng.standard_normal((1, tokens, inputs)).astype(np.float32)
    step = TinyJit(lambda t: layer(t).realize())
    for _ in range(3):
        got = step(Tensor(x).realize()).numpy()
    ref = x[0].astype(np.float64) @ w.T
    err = np.abs(got[0] - ref).max() / np.abs(ref).max()
    assert err < 2e-6, f"relative error {err:.1e}"
    assert f"bf16_matmul_{inputs}_{8 * blocks}_{tokens}" in [p.arg.name for p in programs(step)]
    assert not cpu_quant.bf16_applies(Tensor(x[:, :1]), layer.weight)  # decode keeps decoder._matvec


def test_other_layouts_keep_tinygrads_code() -> None:
    rng = np.random.default_rng(5)
    layer, w = mlx_layer(rng, 4, 64, 64, 256, scales=(-0.05, 0.05))
    x = Tensor(rng.standard_normal((1, 1, 256)).astype(np.float32))
    assert cpu_quant.applies(x, layer.packed, layer.scales, 4, 64)
    prompt = Tensor(rng.standard_normal((1, 4, 256)).astype(np.float32))
    assert cpu_quant.applies(prompt, layer.packed, layer.scales, 4, 64)
    assert not cpu_quant.applies(x, layer.packed.reshape(64, -1), layer.scales, 4, 64)  # not in blocks of 8
    assert not cpu_quant.applies(x.half(), layer.packed, layer.scales, 4, 64)
    assert not cpu_quant.applies(x, layer.packed, layer.scales, 3, 64)
    # 8-bit sums of a 512-wide group could overflow int32 (256 fit)
    assert not cpu_quant.applies(Tensor.zeros(1, 1, 1024), layer.packed, layer.scales, 8, 512)
    assert cpu_quant.applies(Tensor.zeros(1, 1, 1024), layer.packed, layer.scales, 8, 256)


def test_the_switch_turns_it_off_for_a_new_engine() -> None:
    """CLUSTERCTL_CPU_QUANT=0 keeps tinygrad's code (the engine's kernel list says which ran); the same tokens."""
    probe = """
import sys
import numpy as np
from cluster.engine.shard import ShardEngine
from cluster.models.decoder import Linear
eng = ShardEngine(sys.argv[1], max_context=32, prefill_buckets=(4,))
eng.new_session("s")
ids = [eng.forward("s", [1, 2, 3]).token]
for _ in range(4):
    ids.append(eng.forward("s", [ids[-1]]).token)
linear = eng._decode_jit.captured.linear
print(ids, any(u.op.name == "PROGRAM" and "matvec" in u.arg.name for u in linear.toposort()))
"""
    outs = {}
    for switch in ("1", "0"):
        env = {**os.environ, "CLUSTERCTL_CPU_QUANT": switch, "CLUSTERCTL_GRAPH_CACHE": "off"}
        run = subprocess.run(
            [sys.executable, "-c", probe, str(FIXTURES / "llama32-4bit")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        outs[switch] = run.stdout.strip().splitlines()[-1]
    ids_on, used_on = outs["1"].rsplit(" ", 1)
    ids_off, used_off = outs["0"].rsplit(" ", 1)
    assert (used_on, used_off) == ("True", "False")
    assert ids_on == ids_off


def test_an_engine_runs_prompts_and_decodes_through_the_kernels() -> None:
    eng = ShardEngine(FIXTURES / "llama32-4bit", max_context=32, prefill_buckets=(4,))
    eng.new_session("s")
    token = eng.forward("s", [1, 2, 3]).token
    eng.forward("s", [token])
    eng.forward("s", [token])
    names = [p.arg.name for p in programs(eng._decode_jit)]
    # q, k, v, o, gate, up, down in each of 4 layers, and the (tied, quantized) lm_head
    assert sum(name.startswith("q4_matvec") for name in names) == 4 * 7 + 1
    # the prompt chunk: the same 28 products as matmuls of 4 tokens, the lm_head on its last row
    names = [p.arg.name for p in programs(eng._prefill_jits[4])]
    assert sum(name.startswith("q4_matmul") and name.endswith("_4") for name in names) == 4 * 7
    assert sum(name.startswith("q4_matvec") for name in names) == 1


def test_a_bf16_engine_runs_its_prompts_through_the_kernel() -> None:
    eng = ShardEngine(FIXTURES / "llama32", max_context=32, prefill_buckets=(4,))
    eng.new_session("s")
    eng.forward("s", [1, 2, 3])
    names = [p.arg.name for p in programs(eng._prefill_jits[4])]
    # q, k, v, o, gate, up, down in each of 4 layers (the tied lm_head runs on the last row only)
    assert sum(name.startswith("bf16_matmul") and name.endswith("_4") for name in names) == 4 * 7
