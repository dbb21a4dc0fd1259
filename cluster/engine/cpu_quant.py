"""A hand-written AVX2 kernel for the decode products of MLX-quantized weights (4-bit and 8-bit) on x86 CPUs.

tinygrad's C for such a product converts every level to a float and multiplies it by its activation: about six
vector instructions for eight weights, so a 4-bit model's decode was bound by instruction issue, not by memory
(bench/RESULTS.md). Here AVX2's vpmaddwd multiplies two levels by two int16 activations and adds the products in
one instruction, in int32 sums that cannot overflow within a weight group. Each group's activations are written as
int16 twice: x = dx * (xq + xr / 65534), xq the rounded activation (dx = max|x| / 32767 per group) and xr its
rounding residual, so the products keep float32's precision (errors near 1e-7 of the largest output, as tinygrad's
float code; one int16 alone gave 3e-5, which moved the tests' logprobs by 5e-3). The group's integer sums are
scaled once: y = sum_g scale_g * dx_g * (sum(q xq) + sum(q xr) / 65534) + bias_g * sum(x_g).

The weights stay as the loader keeps them on CPUs (blocks of 8 rows, decoder.CPU_NARROW_ROW_BLOCK): one 256-bit
load holds the same word of 8 rows, and masking a word with 0x000F000F (4-bit) puts level k and level k + 4 side
by side as int16s, a pair for vpmaddwd. Prompt chunks keep tinygrad's matmuls (cpu_matmul), which read the same
layout.

The kernel is C source handed to tinygrad as a custom kernel (a PROGRAM with its own SOURCE): tinygrad compiles
it with its CPU compiler, captures it in TinyJits and graph files, and runs it as `core_id` slices like its own
kernels (cpu_threads runs those at once). `enable()` compiles a probe to check that the compiler targets AVX2 and
FMA; elsewhere (older x86, ARM), or with CLUSTERCTL_CPU_QUANT=0, QuantLinear keeps tinygrad's code.
"""

from __future__ import annotations

import logging
import os
import platform

from tinygrad import Device, Tensor, dtypes
from tinygrad.dtype import AddrSpace
from tinygrad.helpers import NUM_CPU_THREADS
from tinygrad.renderer import Estimates
from tinygrad.renderer.cstyle import ClangRenderer
from tinygrad.uop.ops import KernelInfo, Ops, UOp

log = logging.getLogger(__name__)

ROW_BLOCK = 8  # rows a 256-bit load covers: the loader's CPU_NARROW_ROW_BLOCK
INT16_MAX = 32767
_enabled = False

_PROBE = """
#include <immintrin.h>
#if !defined(__AVX2__) || !defined(__FMA__)
#error "needs AVX2 and FMA"
#endif
void cpu_quant_probe(int* out) {
  *out = _mm256_cvtsi256_si32(_mm256_madd_epi16(_mm256_set1_epi32(1), _mm256_set1_epi32(1)));
}
"""

# y (OUT) = W x for W stored as (OUT/8, IN*BITS/32, 8) uint32 words, scales and biases as (OUT/8, IN/GS, 8) floats.
# Each core_id slice quantizes x itself (a few microseconds) and computes its share of the row blocks.
_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
void NAME(float* restrict y, const float* restrict x, const uint32_t* restrict w, const float* restrict s,
          const float* restrict bi, const int core_id) {
  enum { IN = %(in)d, OUT = %(out)d, GS = %(group)d, BITS = %(bits)d, THREADS = %(threads)d,
         PER_WORD = 32 / BITS, HALF = PER_WORD / 2, WORDS = IN / PER_WORD, G = IN / GS, WPG = GS / PER_WORD,
         BLOCKS = OUT / 8 };
  /* activations as int16 pairs: pair k of word j holds inputs j*PER_WORD + k and j*PER_WORD + k + HALF, the
     levels a word's mask puts in one 32-bit lane; xq the rounded activations, xr their rounding residuals */
  int32_t xq[IN / 2], xr[IN / 2];
  float dx[G], xsum[G];
  for (int g = 0; g < G; g++) {
    float m = 0.f, sum = 0.f;
    for (int i = 0; i < GS; i++) { float v = x[g*GS + i], a = v < 0.f ? -v : v; m = a > m ? a : m; sum += v; }
    float d = m > 0.f ? m / 32767.f : 1.f, inv = 1.f / d;
    dx[g] = d; xsum[g] = sum;
    for (int j = g*WPG; j < (g + 1)*WPG; j++)
      for (int k = 0; k < HALF; k++) {
        float a = x[j*PER_WORD + k] * inv, b = x[j*PER_WORD + k + HALF] * inv;
        float qa = __builtin_rintf(a), qb = __builtin_rintf(b);
        int ra = (int)__builtin_rintf((a - qa) * 65534.f), rb = (int)__builtin_rintf((b - qb) * 65534.f);
        xq[j*HALF + k] = (int32_t)((uint32_t)(uint16_t)(int)qa | ((uint32_t)(uint16_t)(int)qb << 16));
        xr[j*HALF + k] = (int32_t)((uint32_t)(uint16_t)ra | ((uint32_t)(uint16_t)rb << 16));
      }
  }
  const int per = (BLOCKS + THREADS - 1) / THREADS, b0 = core_id * per, b1 = b0 + per < BLOCKS ? b0 + per : BLOCKS;
  const __m256i mask = _mm256_set1_epi32(((1 << BITS) - 1) * 0x10001);
  for (int b = b0; b < b1; b++) {
    __m256 acc = _mm256_setzero_ps();
    const uint32_t* wb = w + (long)b * WORDS * 8;
    for (int g = 0; g < G; g++) {
      __m256i sq = _mm256_setzero_si256(), sr = _mm256_setzero_si256();
      for (int j = g*WPG; j < (g + 1)*WPG; j++) {
        __m256i v = _mm256_loadu_si256((const __m256i*)(wb + (long)j * 8));
        for (int k = 0; k < HALF; k++) {
          __m256i pair = _mm256_and_si256(_mm256_srli_epi32(v, k * BITS), mask);
          sq = _mm256_add_epi32(sq, _mm256_madd_epi16(pair, _mm256_set1_epi32(xq[j*HALF + k])));
          sr = _mm256_add_epi32(sr, _mm256_madd_epi16(pair, _mm256_set1_epi32(xr[j*HALF + k])));
        }
      }
      long o = ((long)b*G + g) * 8;
      __m256 sums = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sr), _mm256_set1_ps(1.f / 65534.f), _mm256_cvtepi32_ps(sq));
      acc = _mm256_fmadd_ps(sums, _mm256_mul_ps(_mm256_loadu_ps(s + o), _mm256_set1_ps(dx[g])), acc);
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(bi + o), _mm256_set1_ps(xsum[g]), acc);
    }
    _mm256_storeu_ps(y + b*8, acc);
  }
}
"""


def enable(device: str) -> bool:
    """Use the kernel for `device`'s quantized decode products from now on (process-wide, as tinygrad's compiler
    is), where the device is tinygrad's CPU with its C renderer, the compiler targets AVX2 and FMA and
    CLUSTERCTL_CPU_QUANT is not 0. Returns whether it is on."""
    global _enabled
    if _enabled:
        return True
    if os.environ.get("CLUSTERCTL_CPU_QUANT", "") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    dev = Device[device]
    if not isinstance(dev.renderer, ClangRenderer):
        return False
    try:
        dev.compiler.compile_cached(_PROBE)
    except Exception as e:  # noqa: BLE001 - any compiler failure means: keep tinygrad's code
        log.info("CPU quantized kernel off: the compiler does not target AVX2 and FMA (%s)", str(e).splitlines()[0])
        return False
    _enabled = True
    return True


def applies(x: Tensor, packed: Tensor, scales: Tensor, bits: int, group_size: int) -> bool:
    """Whether `matvec` computes this product: one token in float32, weights in blocks of 8 rows, a group whose
    integer sums fit in int32."""
    if not _enabled or x.shape[-2] != 1 or packed.ndim != 3 or packed.shape[-1] != ROW_BLOCK:
        return False
    if bits not in (4, 8) or x.dtype != dtypes.float32 or scales.dtype != dtypes.float32:
        return False
    n_in = int(x.shape[-1])
    per_word = 32 // bits
    return (
        n_in % group_size == 0
        and group_size % per_word == 0
        and ((1 << bits) - 1) * INT16_MAX * group_size < 2**31
        and str(x.device).split(":")[0] == "CPU"
    )


def matvec(x: Tensor, packed: Tensor, scales: Tensor, biases: Tensor, bits: int, group_size: int) -> Tensor:
    """x (..., 1, in) float32 times the (out, in) weight that packed, scales and biases hold (blocks of 8 rows):
    (..., 1, out)."""
    n_in, n_out = int(x.shape[-1]), int(packed.shape[0]) * ROW_BLOCK
    threads = max(1, min(NUM_CPU_THREADS.value, n_out // ROW_BLOCK))
    name = f"q{bits}_matvec_{n_in}_{n_out}_{group_size}"
    sizes = {"in": n_in, "out": n_out, "group": group_size, "bits": bits, "threads": threads}
    source = _SOURCE.replace("NAME", name) % sizes
    weight_bytes = packed.nbytes() + scales.nbytes() + biases.nbytes()
    estimates = Estimates(ops=2 * n_in * n_out, lds=weight_bytes, mem=weight_bytes + 4 * (n_in + n_out))

    def kernel(y: UOp, xs: UOp, w: UOp, s: UOp, b: UOp) -> UOp:
        # what tinygrad reads of a kernel before running it: its buffers (y written, the rest read) and core_id
        core = UOp.param(5, dtypes.int, vmin_vmax=(0, threads - 1), name="core_id", addrspace=AddrSpace.ALU)
        reads = xs.flatten()[0] + s.flatten()[0] + b.flatten()[0] + w.flatten()[0].cast(dtypes.float32)
        sink = y.flatten()[core.cast(dtypes.weakint)].store(reads).sink(arg=KernelInfo(name=name, estimates=estimates))
        return UOp(Ops.PROGRAM, src=(sink, UOp(Ops.LINEAR, src=()), UOp(Ops.SOURCE, arg=source)))

    out = Tensor.empty(n_out, dtype=dtypes.float32, device=x.device)
    y = Tensor.custom_kernel(out, x.reshape(n_in).contiguous(), packed, scales, biases, fxn=kernel)[0]
    return y.reshape(*x.shape[:-1], n_out)
