"""Hand-written AVX2 kernels for the products of narrow weights on x86 CPUs: MLX-quantized ones (4-bit and 8-bit) in
decode (one token) and prompt chunks, and bf16 ones in prompt chunks.

Decode. tinygrad's C for such a product converts every level to a float and multiplies it by its activation: about
six vector instructions for eight weights, so a 4-bit model's decode was bound by instruction issue, not by memory
(bench/RESULTS.md). Here AVX2's vpmaddwd multiplies two levels by two int16 activations and adds the products in
one instruction, in int32 sums that cannot overflow within a weight group. Each group's activations are written as
int16 twice: x = dx * (xq + xr / 65534), xq the rounded activation (dx = max|x| / 32767 per group) and xr its
rounding residual, so the products keep float32's precision (errors near 1e-7 of the largest output, as tinygrad's
float code; one int16 alone gave 3e-5, which moved the tests' logprobs by 5e-3). The group's integer sums are
scaled once: y = sum_g scale_g * dx_g * (sum(q xq) + sum(q xr) / 65534) + bias_g * sum(x_g).

Prompt chunks. A matmul is bound by multiply-adds, so the weights are made floats (q * scale + bias, or bf16 bits
widened, as tinygrad's code makes them) once per chunk in small panels in L1, and a GEMM register tile runs over
them (see _MATMUL_SOURCE): ~1.5-2.5x tinygrad's tiled matmul on the same layout (cpu_matmul), which CPUs without
AVX2 keep. (bf16 decode stays tinygrad's code, at 77% of the memory floor on the test VM: not measured against
this form.)

The weights stay as the loader keeps them on CPUs (blocks of 8 rows, decoder.CPU_NARROW_ROW_BLOCK): one 256-bit
load holds the same word of 8 rows, and masking a word with 0x000F000F (4-bit) puts level k and level k + 4 side
by side as int16s, a pair for vpmaddwd; shifting and masking it with 0xF gives level k of the 8 rows as int32s.

The kernels are C source handed to tinygrad as custom kernels (a PROGRAM with its own SOURCE): tinygrad compiles
them with its CPU compiler, captures them in TinyJits and graph files, and runs them as `core_id` slices like its
own kernels (cpu_threads runs those at once). `enable()` compiles a probe to check that the compiler targets AVX2
and FMA; elsewhere (older x86, ARM), or with CLUSTERCTL_CPU_QUANT=0, Linear and QuantLinear keep tinygrad's code.
"""

from __future__ import annotations

import logging
import os
import platform
from math import prod

from tinygrad import Device, Tensor, dtypes
from tinygrad.helpers import NUM_CPU_THREADS
from tinygrad.renderer import Estimates
from tinygrad.renderer.cstyle import ClangRenderer

from cluster.engine.c_kernel import run_c_kernel

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


# Y (T, OUT) = X (T, IN) W^T for a prompt chunk of T tokens, in float32 as tinygrad's code does (each level made the
# float q * scale + bias, each bf16 widened, so the products are the same). A GEMM's register tile: 2 row blocks x 6
# tokens, 12 sums in registers, two weight vectors and one broadcast activation a step (a broadcast per multiply-add,
# as one row block would take, left Zen 3's FMA pipes half idle). The weights are made in panels of KC inputs x 16
# rows in L1: the first tile of a panel makes them from the stored words and leaves them there, the other tiles of
# tokens load them. BITS 16: bf16 weights (uint16 bits, the same blocks of 8 rows), no scales or biases.
_MATMUL_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#define BITS %(bits)d
enum { T = %(tokens)d, IN = %(in)d, OUT = %(out)d, GS = %(group)d, THREADS = %(threads)d,
       KC = %(panel)d, PER_WORD = BITS == 16 ? 1 : 32 / BITS, WORDS = IN / PER_WORD, G = IN / GS, BLOCKS = OUT / 8,
       RB = 2, TILE = 6 };
#if BITS == 16
#define WEIGHTS const uint16_t* restrict w
#define WEIGHT_ARGS w
#else
#define WEIGHTS const uint32_t* restrict w, const float* restrict s, const float* restrict bi
#define WEIGHT_ARGS w, s, bi
#endif
typedef struct { __m256 v[RB][TILE]; } sums;
static inline __attribute__((always_inline)) void step(sums* acc, const __m256* wk, const float* restrict x,
    const int k, const int NT, const int NR) {
  for (int t = 0; t < NT; t++) {
    const __m256 xb = _mm256_broadcast_ss(x + (long)t*IN + k);
    for (int r = 0; r < NR; r++) acc->v[r][t] = _mm256_fmadd_ps(wk[r], xb, acc->v[r][t]);
  }
}
/* y (NT tokens, NR row blocks) += x w^T over the panel of inputs k0 .. k0 + KC; MAKE: make the weights from the
   stored ones and leave them in wp (KC, RB * 8), else read them there */
static inline __attribute__((always_inline)) void tile(float* restrict y, const float* restrict x, float* restrict wp,
    WEIGHTS, const int b0, const int k0, const int NT, const int NR, const int MAKE) {
  sums acc;
  for (int r = 0; r < NR; r++)
    for (int t = 0; t < NT; t++) acc.v[r][t] = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(y + (long)t*OUT + r*8);
#if BITS == 16
  for (int k = k0; k < k0 + KC; k++) {
    __m256 wk[RB];
    for (int r = 0; r < NR; r++) {
      float* slot = wp + (k - k0) * RB * 8 + r * 8;
      if (MAKE) {  /* bf16 bits are the top half of the float32 */
        __m128i bits = _mm_loadu_si128((const __m128i*)(w + ((long)(b0 + r) * IN + k) * 8));
        wk[r] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
        _mm256_store_ps(slot, wk[r]);
      } else
        wk[r] = _mm256_load_ps(slot);
    }
    step(&acc, wk, x, k, NT, NR);
  }
#else
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  for (int g = k0 / GS; g < (k0 + KC) / GS; g++) {
    __m256 scale[RB], bias[RB];
    if (MAKE)
      for (int r = 0; r < NR; r++) {
        scale[r] = _mm256_loadu_ps(s + ((long)(b0 + r) * G + g) * 8);
        bias[r] = _mm256_loadu_ps(bi + ((long)(b0 + r) * G + g) * 8);
      }
    for (int j = g * GS / PER_WORD; j < (g + 1) * GS / PER_WORD; j++) {
      __m256i v[RB];
      if (MAKE)
        for (int r = 0; r < NR; r++) v[r] = _mm256_loadu_si256((const __m256i*)(w + ((long)(b0 + r) * WORDS + j) * 8));
      for (int kk = 0; kk < PER_WORD; kk++) {
        const int k = j * PER_WORD + kk;
        __m256 wk[RB];
        for (int r = 0; r < NR; r++) {
          float* slot = wp + (k - k0) * RB * 8 + r * 8;
          if (MAKE) {
            __m256i q = _mm256_and_si256(_mm256_srli_epi32(v[r], kk * BITS), mask);
            wk[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), scale[r], bias[r]);
            _mm256_store_ps(slot, wk[r]);
          } else
            wk[r] = _mm256_load_ps(slot);
        }
        step(&acc, wk, x, k, NT, NR);
      }
    }
  }
#endif
  for (int r = 0; r < NR; r++)
    for (int t = 0; t < NT; t++) _mm256_storeu_ps(y + (long)t*OUT + r*8, acc.v[r][t]);
}
/* all T tokens times row blocks b .. b + NR - 1, panel by panel */
static inline __attribute__((always_inline)) void rows(float* restrict y, const float* restrict x, WEIGHTS,
    float* restrict wp, const int b, const int NR) {
  enum { FIRST = T < TILE ? T : TILE, REST = (T - FIRST) %% TILE };
  for (int k0 = 0; k0 < IN; k0 += KC) {
    tile(y + b*8, x, wp, WEIGHT_ARGS, b, k0, FIRST, NR, 1);
    int t = FIRST;
    for (; t + TILE <= T; t += TILE) tile(y + (long)t*OUT + b*8, x + (long)t*IN, wp, WEIGHT_ARGS, b, k0, TILE, NR, 0);
    if (REST) tile(y + (long)t*OUT + b*8, x + (long)t*IN, wp, WEIGHT_ARGS, b, k0, REST, NR, 0);
  }
}
void NAME(float* restrict y, const float* restrict x, WEIGHTS, const int core_id) {
  const int per = (BLOCKS + THREADS - 1) / THREADS, b0 = core_id * per, b1 = b0 + per < BLOCKS ? b0 + per : BLOCKS;
  float wp[KC * RB * 8] __attribute__((aligned(32)));
  int b = b0;
  for (; b + RB <= b1; b += RB) rows(y, x, WEIGHT_ARGS, wp, b, RB);
  for (; b < b1; b++) rows(y, x, WEIGHT_ARGS, wp, b, 1);
}
"""
PANEL = 256  # inputs of a weight panel: 256 x 16 floats, 16 KB of L1


def enable(device: str) -> bool:
    """Use the kernels for `device`'s quantized products from now on (process-wide, as tinygrad's compiler
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


def takes(x: Tensor) -> bool:
    """Whether the hand-written kernels (these, cpu_attention's, cpu_silu's) can take activations x: `enable`
    turned them on in this process, and x is float32 on tinygrad's CPU device."""
    return _enabled and x.dtype == dtypes.float32 and str(x.device).split(":")[0] == "CPU"


def applies(x: Tensor, packed: Tensor, scales: Tensor, bits: int, group_size: int) -> bool:
    """Whether `matvec` (one token) or `matmul` (a prompt chunk) computes this product: activations in float32,
    weights in blocks of 8 rows, a group whose integer sums fit in int32 (matvec's)."""
    if not takes(x) or packed.ndim != 3 or packed.shape[-1] != ROW_BLOCK:
        return False
    if bits not in (4, 8) or scales.dtype != dtypes.float32:
        return False
    n_in = int(x.shape[-1])
    per_word = 32 // bits
    return n_in % group_size == 0 and group_size % per_word == 0 and ((1 << bits) - 1) * INT16_MAX * group_size < 2**31


def matvec(x: Tensor, packed: Tensor, scales: Tensor, biases: Tensor, bits: int, group_size: int) -> Tensor:
    """x (..., 1, in) float32 times the (out, in) weight that packed, scales and biases hold (blocks of 8 rows):
    (..., 1, out)."""
    return _product(_SOURCE, f"q{bits}_matvec", x, [packed, scales, biases], bits, group_size)


def matmul(x: Tensor, packed: Tensor, scales: Tensor, biases: Tensor, bits: int, group_size: int) -> Tensor:
    """x (..., T, in) float32, a prompt chunk, times the same weight: (..., T, out)."""
    return _product(_MATMUL_SOURCE, f"q{bits}_matmul", x, [packed, scales, biases], bits, group_size)


def bf16_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether `bf16_matmul` computes this product: a prompt chunk in float32, bf16 bits in blocks of 8 rows."""
    return (
        takes(x)
        and isinstance(x.shape[-2], int)
        and x.shape[-2] > 1
        and weight.dtype == dtypes.uint16
        and weight.ndim == 3
        and weight.shape[-1] == ROW_BLOCK
    )


def bf16_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., T, in) float32 times a bf16 weight stored as (out/8, in, 8) uint16 bits: (..., T, out)."""
    return _product(_MATMUL_SOURCE, "bf16_matmul", x, [weight], 16, ROW_BLOCK)


def _product(template: str, form: str, x: Tensor, weights: list[Tensor], bits: int, group_size: int) -> Tensor:
    """One of the kernels as a tinygrad custom kernel over `x`'s rows (tokens), sliced by row blocks over the cores.
    `weights`: the stored weight (blocks of 8 rows) and, for MLX ones, its scales and biases."""
    n_in, n_out, tokens = int(x.shape[-1]), int(weights[0].shape[0]) * ROW_BLOCK, prod(int(d) for d in x.shape[:-1])
    threads = max(1, min(NUM_CPU_THREADS.value, n_out // ROW_BLOCK))
    name = f"{form}_{n_in}_{n_out}" + (f"_{group_size}" if bits < 16 else "") + (f"_{tokens}" if tokens > 1 else "")
    panel = max(p for p in range(group_size, min(PANEL, n_in) + 1, group_size) if n_in % p == 0)
    sizes = {"in": n_in, "out": n_out, "group": group_size, "bits": bits, "threads": threads, "tokens": tokens}
    sizes["panel"] = panel
    source = template.replace("NAME", name) % sizes
    weight_bytes = sum(w.nbytes() for w in weights)
    io_bytes = 4 * tokens * (n_in + n_out)
    estimates = Estimates(ops=2 * n_in * n_out * tokens, lds=weight_bytes + io_bytes, mem=weight_bytes + io_bytes)

    out = Tensor.empty(tokens * n_out, dtype=dtypes.float32, device=x.device)
    y = run_c_kernel(name, source, threads, estimates, out, x.reshape(tokens * n_in), *weights)
    return y.reshape(*x.shape[:-1], n_out)
