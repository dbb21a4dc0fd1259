"""The 4-bit decode product as nvcc compiles it for sm_90 (bench/sass_census.py): what bench/RESULTS.md and the
README say of its instructions a weight, checked against nvcc and nvdisasm themselves.

No GPU needed: the kernel is rendered as CUDA on the CPU (as in test_gpu_matvec), compiled to a cubin by nvcc and
disassembled by nvdisasm. Reference: the default form issues two conversions a weight in the 1B model's gate/up
(RMSNorm fused); with CLUSTERCTL_QUANT_UNPACK=float and CLUSTERCTL_MATVEC_ROWS=4, a quarter of one and far
fewer instructions. Skipped where nvcc or nvdisasm is missing (a CUDA toolkit; nvdisasm also comes with the
`nvidia-cuda-nvdisasm` wheel, which the dev install brings).
"""

from __future__ import annotations

import sys

import pytest
from cluster_nodes import ROOT
from test_gpu_matvec import normed_q4_product
from tinygrad.uop.ops import Ops

import cluster.models.decoder as decoder
from cluster.engine import gpu_matvec

sys.path.insert(0, str(ROOT / "bench"))
import sass_census  # noqa: E402

D, ROWS = 2048, 16384  # the 1B model's hidden size; gate and up stacked
pytestmark = pytest.mark.slow  # two nvcc compilations of a 1B-sized kernel


@pytest.fixture(scope="module")
def compiler() -> sass_census.Compiler:
    try:
        return sass_census.Compiler()
    except SystemExit as e:
        pytest.skip(str(e))


def _gate_up(monkeypatch: pytest.MonkeyPatch, **env: str) -> tuple[str, int]:
    """The CUDA source of the 4-bit gate/up product with the RMSNorm fused, and the rows each of its threads takes."""
    monkeypatch.setattr(decoder, "cpu_codegen", lambda t: False)
    assert gpu_matvec.enable()
    for key in ("CLUSTERCTL_QUANT_UNPACK", "CLUSTERCTL_MATVEC_ROWS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    product = normed_q4_product(ROWS, D)
    source = next(u.arg for u in product.src if u.op is Ops.SOURCE)
    return source, ROWS // (gpu_matvec.ROWS_PER_BLOCK * product.arg.launch_dims({})[0][0])


def test_the_float_unpack_with_4_rows_a_thread_issues_fewer_instructions_a_weight(monkeypatch, compiler):
    per_pass = 4 * 8  # weights a thread reads in one pass of the main loop, per row: one 16-byte load of words
    default, rows = _gate_up(monkeypatch)
    assert rows == 1
    loop = sass_census.loop_of(default, compiler)
    assert loop.conversions / per_pass >= 1.5  # a level converted to half, and the normalized input back to half
    best, rows = _gate_up(monkeypatch, CLUSTERCTL_QUANT_UNPACK="float", CLUSTERCTL_MATVEC_ROWS="4")
    assert rows == 4
    faster = sass_census.loop_of(best, compiler)
    assert faster.conversions / (per_pass * rows) <= 0.25  # only the input's, once for 4 rows
    assert faster.instructions / (per_pass * rows) <= 0.6 * loop.instructions / per_pass
