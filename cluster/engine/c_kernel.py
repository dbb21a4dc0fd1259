"""Hand-written C kernels handed to tinygrad's CPU device, and C pieces they share.

tinygrad compiles such a kernel (a PROGRAM whose SOURCE is ours) with its CPU compiler, captures it in TinyJits and
graph files, and runs it as `core_id` slices like its own kernels (cpu_threads runs the slices at once). Whether the
AVX2 kernels are on is cpu_quant.enable's decision (a probe compile; CLUSTERCTL_CPU_QUANT=0 turns them off).
"""

from __future__ import annotations

from tinygrad import Tensor, dtypes
from tinygrad.dtype import AddrSpace
from tinygrad.renderer import Estimates
from tinygrad.uop.ops import KernelInfo, Ops, UOp

# e^x for x <= 0 (a softmax's scores minus their maximum, a sigmoid's -|x|) on 8 floats: 2^n p(r) with Cephes'
# expf polynomial, errors of ~1e-7 relative; below -87 it gives ~1e-38, not 0
EXP_NEG = r"""
static inline __m256 exp_neg(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
"""


def run_c_kernel(name: str, source: str, threads: int, estimates: Estimates, out: Tensor, *inputs: Tensor) -> Tensor:
    """`out` written by the C function `name` in `source`, called as name(out, *inputs, core_id) once for each
    core_id in [0, threads) (cpu_threads runs them at once): tinygrad compiles it and captures it like its own."""

    def kernel(y: UOp, *xs: UOp) -> UOp:
        # what tinygrad reads of a kernel before running it: its buffers (y written, the rest read) and core_id
        core = UOp.param(1 + len(xs), dtypes.int, vmin_vmax=(0, threads - 1), name="core_id", addrspace=AddrSpace.ALU)
        reads = xs[0].flatten()[0].cast(dtypes.float32)
        for x in xs[1:]:
            reads = reads + x.flatten()[0].cast(dtypes.float32)
        sink = y.flatten()[core.cast(dtypes.weakint)].store(reads).sink(arg=KernelInfo(name=name, estimates=estimates))
        return UOp(Ops.PROGRAM, src=(sink, UOp(Ops.LINEAR, src=()), UOp(Ops.SOURCE, arg=source)))

    return Tensor.custom_kernel(out, *inputs, fxn=kernel)[0]
