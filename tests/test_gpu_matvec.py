"""gpu_matvec: the warp-per-row options for matrix-vector products on devices with local memory.

No GPU here: the kernels run on tinygrad's PYTHON device, which emulates a GPU's threads, local (shared)
memory and barriers, and lowers kernels through the same optimizer path as CUDA. Reference: numpy in float64.
The CUDA source for the same kernels is rendered here too (no compiler needed) to check the loads are vectors.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from tinygrad import Device, Tensor, dtypes
from tinygrad.codegen import do_to_program
from tinygrad.codegen.opt import tc
from tinygrad.codegen.opt.postrange import Scheduler
from tinygrad.device import Compiler
from tinygrad.helpers import Context, Target
from tinygrad.renderer.cstyle import CUDARenderer
from tinygrad.uop.ops import Ops, UOp

import cluster.models.decoder as decoder
from cluster.engine import gpu_matvec
from cluster.engine.kernel_opts import element_dtype, scheduled_kernels
from cluster.models.config import QuantSpec

ROWS, K = 128, 512  # 65536 fp16 weights: the smallest product gpu_matvec takes on


@pytest.fixture(autouse=True)
def gpu_forms(monkeypatch):
    """The decoder's GPU forms (plain x @ w.T, lazy dequantization), the options on, and a record of the plans."""
    assert gpu_matvec.enable()
    monkeypatch.setattr(decoder, "cpu_codegen", lambda t: False)
    plans: list = []
    real = gpu_matvec.matvec_plan

    def record(k, *args):
        plans.append(plan := real(k, *args))
        return plan

    monkeypatch.setattr(gpu_matvec, "matvec_plan", record)
    return plans


def _quantized(rng, rows, cols, bits):
    levels = rng.integers(0, 1 << bits, size=(rows, cols), dtype=np.uint64)
    per_word = 32 // bits
    words = (levels.reshape(rows, cols // per_word, per_word) << (np.arange(per_word, dtype=np.uint64) * bits)).sum(-1)
    scales = rng.uniform(0.01, 0.05, size=(rows, cols // 64)).astype(np.float16)
    biases = rng.uniform(-0.2, 0.2, size=(rows, cols // 64)).astype(np.float16)
    dense = levels * np.repeat(scales, 64, 1).astype(np.float64) + np.repeat(biases, 64, 1).astype(np.float64)
    return words.astype(np.uint32), scales, biases, dense


def test_an_fp16_matvec_runs_a_warp_per_row_and_equals_numpy(gpu_forms):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, K)).astype(np.float16)
    w = (rng.standard_normal((ROWS, K)) * 0.05).astype(np.float16)
    out = decoder.Linear(Tensor(w, device="PYTHON"), dtype=dtypes.half)(Tensor(x, device="PYTHON")).numpy()
    np.testing.assert_allclose(out[0, 0], w.astype(np.float64) @ x[0, 0].astype(np.float64), atol=2e-3, rtol=2e-3)
    # unroll 8 fp16 (16 bytes), 32 threads per row, 4 rows to a block
    assert [p[1:3] for p in gpu_forms if p is not None] == [(8, 32)]


@pytest.mark.parametrize("unpack", ["convert", "float"])
@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_matvec_runs_a_warp_per_row_and_equals_numpy(gpu_forms, monkeypatch, bits, unpack):
    monkeypatch.setattr(gpu_matvec, "MIN_WEIGHT", 1024)  # the packed words of a test-sized weight are few
    monkeypatch.setenv("CLUSTERCTL_QUANT_UNPACK", unpack)  # float: levels made from their bits (dequantize_float)
    rng = np.random.default_rng(bits)
    rows, cols = 32, 4096  # a row of 4096 values: 512 (4-bit) or 1024 (8-bit) words, a whole warp's worth
    words, scales, biases, dense = _quantized(rng, rows, cols, bits)
    x = (rng.standard_normal((1, 1, cols)) * 0.1).astype(np.float16)
    layer = decoder.QuantLinear(
        *(Tensor(a, device="PYTHON") for a in (words, scales, biases)), QuantSpec(bits=bits, group_size=64), dtypes.half
    )
    out = layer(Tensor(x, device="PYTHON")).numpy()
    np.testing.assert_allclose(out[0, 0], dense @ x[0, 0].astype(np.float64), atol=2e-2, rtol=2e-2)
    plans = [p for p in gpu_forms if p is not None]
    assert len(plans) == 1 and plans[0][2] == 32, plans


def test_rows_a_thread_compute_the_same_products(gpu_forms, monkeypatch):
    """CLUSTERCTL_MATVEC_ROWS=4: each thread takes 4 rows (the activations it loads serve all of them), here with
    the RMSNorm fused into the product as in the decoder and the float unpack it is meant to go with.
    Reference: numpy in float64."""
    monkeypatch.setattr(gpu_matvec, "MIN_WEIGHT", 1024)
    monkeypatch.setattr(gpu_matvec, "MIN_UPCAST_BLOCKS", 2)  # a test-sized product has few blocks
    monkeypatch.setenv("CLUSTERCTL_QUANT_UNPACK", "float")
    monkeypatch.setenv("CLUSTERCTL_MATVEC_ROWS", "4")
    rng = np.random.default_rng(3)
    rows, cols = 32, 1024  # not 2048: the long-reduction test must compile its RMSNorm itself (tinygrad caches it)
    words, scales, biases, dense = _quantized(rng, rows, cols, 4)
    x = rng.standard_normal((1, 1, cols)).astype(np.float16)
    gain = rng.uniform(0.5, 1.5, cols).astype(np.float16)
    layer = decoder.QuantLinear(
        *(Tensor(a, device="PYTHON") for a in (words, scales, biases)), QuantSpec(bits=4, group_size=64), dtypes.half
    )
    norm = decoder.RMSNorm(Tensor(gain, device="PYTHON"), 1e-5)
    with Context(PARALLEL=0):  # compiled here: tinygrad's compile processes would not see the patched limits
        out = layer(norm(Tensor(x, device="PYTHON"))).numpy()
    x64 = x[0, 0].astype(np.float64)
    normed = x64 / np.sqrt(np.mean(x64**2) + 1e-5) * gain
    np.testing.assert_allclose(out[0, 0], dense @ normed, atol=5e-2, rtol=2e-2)
    assert len([p for p in gpu_forms if p is not None]) == 1, gpu_forms  # the product took the warp-per-row form
    # the same product rendered for CUDA: 32 rows, 4 to a block, 4 to a thread: 2 blocks (8 with one row a thread)
    assert math.prod(normed_q4_product(rows, cols).arg.launch_dims({})[0]) == 2


def test_rows_a_thread_go_only_where_enough_blocks_remain(gpu_forms, monkeypatch):
    """The 1B model's gate/up (16384 rows) and lm_head take 4 rows a thread; q/k/v (3072 rows) and the 2048-row
    products would be left fewer than MIN_UPCAST_BLOCKS blocks, and keep one. Unset, every product keeps one."""
    x = Tensor.empty(1, 1, 2048, dtype=dtypes.half, device="CPU")

    def launched(rows: int) -> int:
        w = Tensor.empty(rows, 2048, dtype=dtypes.half, device="CPU")
        return math.prod(_cuda_programs(decoder.Linear(w, dtype=dtypes.half)(x))[-1].arg.launch_dims({})[0])

    monkeypatch.setenv("CLUSTERCTL_MATVEC_ROWS", "4")
    assert [launched(r) for r in (16384, 128256, 3072, 2048)] == [1024, 8016, 768, 512]
    monkeypatch.delenv("CLUSTERCTL_MATVEC_ROWS")
    assert [launched(r) for r in (16384, 2048)] == [4096, 512]
    monkeypatch.setenv("CLUSTERCTL_MATVEC_ROWS", "3")
    with pytest.raises(ValueError, match="1, 2 or 4"):
        gpu_matvec.rows_per_thread()


def test_a_prompt_matmul_and_cpu_kernels_keep_tinygrads_options(gpu_forms):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((ROWS, K)) * 0.05).astype(np.float16)
    prompt = rng.standard_normal((1, 2, K)).astype(np.float16)  # two tokens: a prompt chunk all the same
    out = decoder.Linear(Tensor(w, device="PYTHON"), dtype=dtypes.half)(Tensor(prompt, device="PYTHON")).numpy()
    np.testing.assert_allclose(out[0], prompt[0].astype(np.float64) @ w.T.astype(np.float64), atol=2e-3, rtol=2e-3)
    assert gpu_forms and all(p is None for p in gpu_forms)  # a token axis does not index the weight
    seen = len(gpu_forms)
    x = Tensor(rng.standard_normal((1, 1, K)).astype(np.float32), device="CPU")
    decoder.Linear(Tensor(w.astype(np.float32), device="CPU"))(x).realize()
    assert len(gpu_forms) > seen and all(p is None for p in gpu_forms[seen:])  # no local memory: not a GPU kernel


def _cuda_programs(t: Tensor) -> list[UOp]:
    """The CUDA programs of every kernel realizing `t` would run, in order."""
    ren = CUDARenderer.__new__(CUDARenderer)  # rendering needs no NVRTC: no compiler is made
    ren.target, ren.compiler, ren.tensor_cores = Target(device="CUDA", arch="sm_90"), Compiler(), tc.get_cuda("sm_90")
    out = []
    for ast in scheduled_kernels(t):
        assert Scheduler(ast, ren).ren.has_local
        out.append(do_to_program(ast.replace(arg=dataclasses.replace(ast.arg)), ren))
    return out


def _cuda_sources(t: Tensor) -> list[str]:
    """The CUDA source of every kernel realizing `t` would run, in order."""
    return [next(u for u in prg.src if u.op is Ops.SOURCE).arg for prg in _cuda_programs(t)]


def normed_q4_product(rows: int, cols: int) -> UOp:
    """The CUDA program of a 4-bit product (empty weights) with the RMSNorm fused into it, as the decoder runs
    q/k/v, gate/up and lm_head."""
    empty = {"device": "CPU", "dtype": dtypes.half}
    layer = decoder.QuantLinear(
        Tensor.empty(rows, cols // 8, dtype=dtypes.uint32, device="CPU"),
        Tensor.empty(rows, cols // 64, **empty),
        Tensor.empty(rows, cols // 64, **empty),
        QuantSpec(bits=4, group_size=64),
        dtypes.half,
    )
    return _cuda_programs(layer(decoder.RMSNorm(Tensor.empty(cols, **empty), 1e-5)(Tensor.empty(1, 1, cols, **empty))))[
        -1
    ]


def _cuda_source(t: Tensor) -> str:
    return _cuda_sources(t)[-1]


def test_the_cuda_kernel_of_a_1b_sized_matvec_loads_16_bytes_a_thread(gpu_forms):
    x = Tensor.empty(1, 1, 2048, dtype=dtypes.half, device="CPU")
    w = Tensor.empty(8192, 2048, dtype=dtypes.half, device="CPU")
    src = _cuda_source(decoder.Linear(w, dtype=dtypes.half)(x))
    assert "__shared__" in src and "__launch_bounds__(128)" in src  # 32 threads x 4 rows, reduced in shared memory
    assert "half4 val" in src  # vector loads, 2 per step (tinygrad's CUDA half vectors stop at 4)
    packed = Tensor.empty(8192, 256, dtype=dtypes.uint32, device="CPU")
    scales = Tensor.empty(8192, 32, dtype=dtypes.half, device="CPU")
    q4 = decoder.QuantLinear(packed, scales, scales, QuantSpec(bits=4, group_size=64), dtypes.half)
    assert "uint4 val" in _cuda_source(q4(x))  # 4 words (32 values) in one 128-bit load
    assert Device.DEFAULT == "CPU"  # nothing here ran on a GPU


def test_a_long_reduction_to_one_value_is_spread_over_a_block_and_equals_numpy(gpu_forms, monkeypatch):
    """RMSNorm's mean of squares over 2048 values: 32 threads of 8 values a load, not tinygrad's 16 threads that
    each walk 128 values one at a time (latency-bound on a GPU, bench/cuda_census.py)."""
    plans: list = []
    real = gpu_matvec.reduction_plan
    monkeypatch.setattr(gpu_matvec, "reduction_plan", lambda k: plans.append(p := real(k)) or p)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 1, 2048)).astype(np.float16)
    w = rng.uniform(0.5, 1.5, 2048).astype(np.float16)
    with Context(PARALLEL=0):  # two kernels: compiled in this process, where the plans are recorded
        out = decoder.RMSNorm(Tensor(w, device="PYTHON"), 1e-5)(Tensor(x, device="PYTHON")).numpy()
    xf = x[0, 0].astype(np.float64)
    np.testing.assert_allclose(out[0, 0], xf / np.sqrt((xf**2).mean() + 1e-5) * w, atol=5e-3, rtol=5e-3)
    assert [p[1:] for p in plans if p is not None] == [(8, 32)]  # 8 fp16 a load (16 bytes), 32 threads
    norm = decoder.RMSNorm(Tensor.empty(2048, dtype=dtypes.half, device="CPU"), 1e-5)
    mean = _cuda_sources(norm(Tensor.empty(1, 1, 2048, dtype=dtypes.half, device="CPU")))[0]
    assert "__launch_bounds__(32)" in mean and "half4 val" in mean  # one block of 32 threads, vector loads


def test_a_quantized_prompt_chunk_is_dequantized_first_and_equals_numpy(gpu_forms):
    """On a GPU a prompt chunk multiplies a plain fp16 weight (tensor cores), dequantized by a kernel of its own."""
    rng = np.random.default_rng(4)
    rows, cols = 64, 256
    words, scales, biases, dense = _quantized(rng, rows, cols, 4)
    x = (rng.standard_normal((1, 4, cols)) * 0.1).astype(np.float16)
    layer = decoder.QuantLinear(
        *(Tensor(a, device="PYTHON") for a in (words, scales, biases)), QuantSpec(bits=4, group_size=64), dtypes.half
    )
    out = layer(Tensor(x, device="PYTHON")).numpy()
    np.testing.assert_allclose(out[0], x[0].astype(np.float64) @ dense.T, atol=2e-2, rtol=2e-2)
    scheduled = layer(Tensor(x, device="PYTHON").realize())
    kernels = scheduled_kernels(scheduled)
    matmul = kernels[-1]
    reads = {element_dtype(u.dtype) for u in matmul.toposort() if u.op is Ops.PARAM and u.arg.slot > 0}
    assert len(kernels) == 2 and dtypes.uint32 not in reads and dtypes.half in reads  # the matmul reads no words


@pytest.mark.parametrize(
    ("tokens", "rows", "cols", "least_blocks"),
    [
        (64, 2048, 8192, 128),  # the 1B model's down projection: tinygrad's 4x4 tiles a warp left it 16 blocks
        (64, 3072, 2048, 128),  # q, k and v stacked: 24 blocks
        (512, 8192, 2048, 512),  # gate/up for 512 tokens: tinygrad's own tile, 512 blocks (its best on an H200)
    ],
)
def test_a_prompt_chunks_product_runs_on_tensor_cores_in_enough_blocks(gpu_forms, tokens, rows, cols, least_blocks):
    """Structure, not values: no GPU and no emulated tensor cores here (the GPU bench's correctness step runs the
    fixtures' prompts on the device against transformers). tinygrad's tile for 512 tokens is kept as it is."""
    x = Tensor.empty(1, tokens, cols, dtype=dtypes.half, device="CPU")
    w = Tensor.empty(rows, cols, dtype=dtypes.half, device="CPU")
    prg = _cuda_programs(decoder.Linear(w, dtype=dtypes.half)(x))[-1]
    source = next(u for u in prg.src if u.op is Ops.SOURCE).arg
    assert "mma.sync" in source  # tensor cores
    blocks = math.prod(prg.arg.launch_dims({})[0])
    assert least_blocks <= blocks <= 4 * least_blocks, blocks
    if tokens == 512:
        assert blocks == least_blocks and gpu_matvec.MIN_TC_BLOCKS <= least_blocks


@pytest.mark.parametrize("bits", [4, 8])
def test_a_float_unpack_makes_levels_from_bits_not_conversions(gpu_forms, monkeypatch, bits):
    # CLUSTERCTL_QUANT_UNPACK=float: the CUDA source ORs each level into 2^23's bits (1258291200, read once from a
    # buffer so nvcc can mask and OR in one instruction) and reads that as a float, where the default form converts
    # each level from an integer (slower than a multiply-add on GPUs)
    monkeypatch.setattr(gpu_matvec, "MIN_WEIGHT", 1024)
    rows, cols, mask = 64, 4096, (1 << bits) - 1
    words, scales, biases, _ = _quantized(np.random.default_rng(0), rows, cols, bits)
    layer = decoder.QuantLinear(
        *(Tensor(a, device="NULL") for a in (words, scales, biases)), QuantSpec(bits=bits, group_size=64), dtypes.half
    )
    x = Tensor.empty(1, 1, cols, dtype=dtypes.half, device="NULL")
    monkeypatch.setenv("CLUSTERCTL_QUANT_UNPACK", "float")
    (src,) = _cuda_sources(layer(x))
    per_thread = 16 // 4 * 32 // bits  # a 16-byte load of words
    magic = re.search(r"uint (val\d+) = \(\*\(data\d+_1\+0\)\);", src)  # the (1,) buffer of 2^23's bits
    assert magic is not None, src
    assert src.count(f"{mask}u)|{magic.group(1)})") == per_thread and "(half)((val" not in src, src
    monkeypatch.delenv("CLUSTERCTL_QUANT_UNPACK")
    (src,) = _cuda_sources(layer(x))
    assert "_1+0)" not in src and src.count("(half)(") >= per_thread, src
