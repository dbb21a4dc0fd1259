"""silu(gate) * up, the MLP's activation, as a hand-written AVX2 kernel on x86 CPUs.

tinygrad's CPU code for it computes exp2 four lanes at a time with its range checks and a division per element, on
one core: 1.3 ms for a 16-token chunk of the 1B model (8192 wide, ~10 ns a value), ~6% of a short prompt's time
(bench/RESULTS.md). Here 8 lanes a step on every core, e^-|x| from c_kernel.EXP_NEG (so no overflow for either
sign): 0.10 ms for the same chunk. Decode steps use it too. Used where cpu_quant's kernels are (`cpu_quant.takes`).
"""

from __future__ import annotations

from math import prod

from tinygrad import Tensor, dtypes
from tinygrad.helpers import NUM_CPU_THREADS
from tinygrad.renderer import Estimates

from cluster.engine import cpu_quant
from cluster.engine.c_kernel import EXP_NEG, run_c_kernel

_SOURCE = r"""
#include <immintrin.h>
enum { N = %(n)d, THREADS = %(threads)d };
%(exp)s
void NAME(float* restrict y, const float* restrict gate, const float* restrict up, const int core_id) {
  const int per = (N / 8 + THREADS - 1) / THREADS * 8, i0 = core_id * per, i1 = i0 + per < N ? i0 + per : N;
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  for (int i = i0; i < i1; i += 8) {
    const __m256 x = _mm256_loadu_ps(gate + i);
    const __m256 e = exp_neg(_mm256_or_ps(x, sign));  /* e^-|x| */
    const __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, e));  /* sigmoid(|x|) */
    const __m256 sigmoid = _mm256_blendv_ps(s, _mm256_mul_ps(e, s), x);  /* x < 0: e^x / (1 + e^x) */
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(x, sigmoid), _mm256_loadu_ps(up + i)));
  }
}
"""


def applies(gate: Tensor) -> bool:
    """Whether `silu_mul` computes silu(gate) * up for this gate: float32 on the CPU, a multiple of 8 wide."""
    return cpu_quant.takes(gate) and all(isinstance(d, int) for d in gate.shape) and int(gate.shape[-1]) % 8 == 0


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, realized, of gate's shape."""
    n = prod(int(d) for d in gate.shape)
    threads = max(1, min(NUM_CPU_THREADS.value, n // 4096))  # a slice of a few thousand is worth a hand-off
    name = f"silu_mul_{n}"
    source = _SOURCE.replace("NAME", name) % {"n": n, "threads": threads, "exp": EXP_NEG}
    estimates = Estimates(ops=20 * n, lds=12 * n, mem=12 * n)
    out = Tensor.empty(n, dtype=dtypes.float32, device=gate.device)
    return run_c_kernel(name, source, threads, estimates, out, gate.reshape(n), up.reshape(n)).reshape(gate.shape)
