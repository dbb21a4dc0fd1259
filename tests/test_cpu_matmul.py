"""CPU prefill matmuls get a wider register tile, and quantized matvecs 8 rows per vector
(cluster/engine/cpu_matmul.py).

Reference: numpy in float64 on the same weights (bf16 bits widened, MLX words unpacked LSB first, value =
q * scale + bias), for the layers the decoder builds. The whole-model references (HF transformers, mlx-lm)
are in test_engine, whose fixtures run every projection through the tile as well.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import FIXTURES, mlx_layer, row_blocks
from tinygrad import Device, Tensor, dtypes
from tinygrad.helpers import Context

from cluster.engine import cpu_matmul, cpu_quant
from cluster.engine.shard import ShardEngine
from cluster.models.decoder import CPU_NARROW_ROW_BLOCK, CPU_ROW_BLOCK, Linear, QuantLinear, cpu_row_block

pytestmark = pytest.mark.skipif(Device.DEFAULT != "CPU", reason="needs tinygrad's CPU device")

IN, OUT, GROUP = 256, 64, 64


def _bf16_layer(rng: np.random.Generator, out: int = OUT, inputs: int = IN) -> tuple[Linear, np.ndarray]:
    bits = (rng.standard_normal((out, inputs), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    layer = Linear(row_blocks(bits, cpu_row_block(out, CPU_NARROW_ROW_BLOCK)), dtype=dtypes.float32, row_blocked=True)
    return layer, (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_layer(rng: np.random.Generator) -> tuple[Linear, np.ndarray]:
    w = rng.standard_normal((OUT, IN), dtype=np.float32)
    return Linear(row_blocks(w, CPU_ROW_BLOCK), dtype=dtypes.float32, row_blocked=True), w


def _quant_layer(
    bits: int, out: int = OUT, inputs: int = IN
) -> Callable[[np.random.Generator], tuple[QuantLinear, np.ndarray]]:
    return lambda rng: mlx_layer(rng, bits, GROUP, out, inputs)


LAYERS = {"bf16": _bf16_layer, "float32": _f32_layer, "mlx-4bit": _quant_layer(4), "mlx-8bit": _quant_layer(8)}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_prefill_matmul_is_tiled_and_right_decode_is_left_alone(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """(MLX words in tinygrad's code, as on CPUs without AVX2, not cpu_quant's kernels.)"""
    assert cpu_matmul.enable()
    monkeypatch.setattr(cpu_quant, "_enabled", False)
    tiled: list[tuple[Any, ...]] = []
    find = cpu_matmul.matmul_axes

    def spy(k: Any) -> Any:
        axes = find(k)
        if axes is not None:
            tiled.append(tuple(k.full_shape))
        return axes

    monkeypatch.setattr(cpu_matmul, "matmul_axes", spy)
    rng = np.random.default_rng(len(kind))
    layer, w = LAYERS[kind](rng)
    prompt = rng.standard_normal((1, 16, IN), dtype=np.float32)
    step = rng.standard_normal((1, 1, IN), dtype=np.float32)
    with Context(PARALLEL=0):  # lower kernels in this process, where the spy is
        out = layer(Tensor(prompt)).numpy()
        assert tiled, "the prefill matmul kept tinygrad's default tile"
        tiled.clear()
        one = layer(Tensor(step)).numpy()
        assert not tiled, f"a decode kernel was tiled: {tiled}"

    np.testing.assert_allclose(out, prompt.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(one, step.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kind", "vector"), [("mlx-4bit", "unsigned_int8"), ("mlx-8bit", "unsigned_int8"), ("bf16", "unsigned_short8")]
)
def test_narrow_decode_widens_a_whole_block_of_8_rows_per_vector(
    kind: str, vector: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The matvec of a step loads the 8 rows of a block of packed words or bf16 bits at once, where tinygrad
    alone loads 4; its values still equal numpy's. (A layer big enough for tinygrad to compute several rows
    together; MLX words in tinygrad's code, as on CPUs without AVX2, not cpu_quant's kernel.)"""
    from tinygrad.codegen import to_program_cache

    assert cpu_matmul.enable()
    monkeypatch.setattr(cpu_quant, "_enabled", False)
    rng = np.random.default_rng(7)
    if kind == "bf16":
        layer, w = _bf16_layer(rng, out=1024, inputs=512)
    else:
        layer, w = _quant_layer(int(kind[4]), out=1024, inputs=512)(rng)
    step = rng.standard_normal((1, 1, 512), dtype=np.float32)
    before = set(to_program_cache)
    with Context(PARALLEL=0):
        one = layer(Tensor(step)).numpy()
    sources = [u.src[2].arg for key, u in to_program_cache.items() if key not in before and len(u.src) > 2]
    assert any(f"{vector} " in src for src in sources), f"no kernel loads 8 rows at once ({vector})"
    np.testing.assert_allclose(one, step.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)


_PROBE = """
import json, re, sys
import numpy as np
from tinygrad import Tensor
from tinygrad.codegen import to_program_cache
from tinygrad.engine import worker
from cluster.engine import cpu_matmul, cpu_quant
if sys.argv[1] == "pool-first":
    worker.get_worker_pool()  # a compile pool that exists before enable()
if sys.argv[1] != "off":
    assert cpu_matmul.enable()
rng = np.random.default_rng(0)
x = Tensor(rng.standard_normal((16, 256), dtype=np.float32))
outs = []
for rows in (64, 128):  # two kernels to lower at once: tinygrad hands them to its compile pool
    w = Tensor(rng.standard_normal((rows // 4, 256, 4), dtype=np.float32))
    outs.append(x.linear(w.permute(0, 2, 1).reshape(rows, 256).T))
Tensor.realize(*outs)
names = sorted(re.sub(r"\\x1b\\[[0-9;]*m", "", p.arg.name) for p in to_program_cache.values())
print(json.dumps(names))
"""


def _kernels(mode: str, parallel: int) -> list[str]:
    env = {**os.environ, "PARALLEL": str(parallel)}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def test_compile_processes_give_the_same_tile_as_this_process() -> None:
    here = _kernels("on", 0)
    assert _kernels("on", 2) == here
    assert _kernels("pool-first", 2) == here, "a compile pool started before enable() kept the default tile"
    default = _kernels("off", 0)
    assert len(default) == len(here) == 2
    assert default != here, "enable() changed no kernel"
    assert all(re.match(r"r_\w+", name) for name in here)


def test_narrow_weights_go_in_blocks_of_8_only_where_cpu_matmul_is_active(monkeypatch: pytest.MonkeyPatch) -> None:
    """tinygrad alone computes 4 rows at once and is ~2x slower on blocks of 8 (bench/RESULTS.md): an engine on a
    tinygrad that cpu_matmul does not recognise keeps bf16 and MLX weights in blocks of 4. Outputs are the same."""

    def gate_block(engine: ShardEngine) -> int:
        gate = engine.model.blocks[0].m["gate"]
        weight = gate.weight if isinstance(gate, Linear) else gate.packed
        return int(weight.shape[-1])

    for name in ("llama32", "llama32-4bit"):
        active = ShardEngine(FIXTURES / name, max_context=32, prefill_buckets=(4,))
        with monkeypatch.context() as m:
            m.setattr(cpu_matmul, "enable", lambda: False)
            inactive = ShardEngine(FIXTURES / name, max_context=32, prefill_buckets=(4,))
        assert (gate_block(active), gate_block(inactive)) == (CPU_NARROW_ROW_BLOCK, CPU_ROW_BLOCK)
        for engine in (active, inactive):
            engine.new_session("s")
        assert active.forward("s", [1, 2, 3]).token == inactive.forward("s", [1, 2, 3]).token
