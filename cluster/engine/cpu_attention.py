"""A hand-written AVX2 kernel for attention on x86 CPUs: causal, grouped-query, read straight from the KV cache,
for prompt chunks and decode steps alike.

tinygrad's code for attention against a symbolic span of cached positions (RoPE and the grouped heads folded into
its index arithmetic) read every key element alone: ~4 GFLOP/s on the test VM, so attention grew to a third of the
time to the first token at a few hundred positions, and a 1B decode step at 1000 positions took 121 ms against
~50 ms at the start (bench/RESULTS.md). This kernel is a flash-attention loop: for a tile of 16 query rows (the
heads that share a KV head, token by token) it walks the cached keys in blocks of 5, keeps the scores of the block
in registers with the 16 rows across the vector lanes (the tile's queries transposed once into L1, so each key
element is one broadcast for 16 rows), updates each row's running maximum and sum (online softmax) and adds the
block's values into the tile's output, also transposed in L1. Float32 throughout, as the engine's attention on
CPUs; exp is c_kernel.EXP_NEG. A decode step fills 4 of a tile's 16 rows for a model with 4 query heads per KV
head: wasteful, and still ~2x faster than tinygrad's code at 1000 positions.

Query row r of KV head h is query head h * G + r // T at token r % T, at absolute position start + r % T, and sees
keys 0 .. start + r % T (the causal mask attention_mask makes); start is read from a one-element buffer, since a
C kernel handed to tinygrad cannot take its symbolic variables. Used where cpu_quant's kernels are
(`cpu_quant.takes`: x86 with AVX2 and FMA, CLUSTERCTL_CPU_QUANT not 0).
"""

from __future__ import annotations

import math

from tinygrad import Tensor, dtypes
from tinygrad.helpers import NUM_CPU_THREADS
from tinygrad.renderer import Estimates
from tinygrad.uop.ops import UOp

from cluster.engine import cpu_quant
from cluster.engine.c_kernel import EXP_NEG, run_c_kernel

ROWS = 16  # query rows of a tile: two vectors

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
enum { H = %(heads)d, KV = %(kv)d, G = H / KV, T = %(tokens)d, HD = %(hd)d, L = %(length)d, THREADS = %(threads)d,
       ROWS = G * T, TILES = (ROWS + 15) / 16, KB = 5 };
%(exp)s
/* y (T, H, HD) = softmax(q k^T * scale, causal) v for q (H, T, HD) and cache (2, KV, L, HD); pos[0]: the chunk's
   first position */
void NAME(float* restrict y, const float* restrict q, const float* restrict cache, const int* restrict pos,
          const int core_id) {
  const int start = pos[0];
  const __m256 scale = _mm256_set1_ps(%(scale).9ef), ninf = _mm256_set1_ps(-__builtin_inff());
  for (int item = core_id; item < KV * TILES; item += THREADS) {
    const int kh = item / TILES, r0 = (item %% TILES) * 16;
    const float* K = cache + (long)kh * L * HD;
    const float* V = cache + ((long)KV + kh) * L * HD;
    float qt[HD][16] __attribute__((aligned(32))), ot[HD][16] __attribute__((aligned(32)));
    int lim[16] __attribute__((aligned(32)));
    int last = 0;
    for (int i = 0; i < 16; i++) {  /* rows past the last see key 0 only: computed, never written */
      const int r = r0 + i, present = r < ROWS;
      lim[i] = present ? start + r %% T : 0;
      last = lim[i] > last ? lim[i] : last;
      for (int d = 0; d < HD; d++) {
        qt[d][i] = present ? q[((long)kh * ROWS + r) * HD + d] : 0.f;
        ot[d][i] = 0.f;
      }
    }
    const __m256i lim0 = _mm256_load_si256((const __m256i*)lim), lim1 = _mm256_load_si256((const __m256i*)(lim + 8));
    __m256 m0 = ninf, m1 = ninf, l0 = _mm256_setzero_ps(), l1 = _mm256_setzero_ps();
    for (int j0 = 0; j0 <= last; j0 += KB) {
      const float *kr[KB], *vr[KB];
      for (int k = 0; k < KB; k++) {  /* keys past the last any row sees are masked: read that one instead */
        const long j = j0 + k < last ? j0 + k : last;
        kr[k] = K + j * HD;
        vr[k] = V + j * HD;
      }
      __m256 s[KB][2];
      for (int k = 0; k < KB; k++) s[k][0] = s[k][1] = _mm256_setzero_ps();
      for (int d = 0; d < HD; d++) {
        const __m256 a0 = _mm256_load_ps(qt[d]), a1 = _mm256_load_ps(qt[d] + 8);
        for (int k = 0; k < KB; k++) {
          const __m256 b = _mm256_broadcast_ss(kr[k] + d);
          s[k][0] = _mm256_fmadd_ps(a0, b, s[k][0]);
          s[k][1] = _mm256_fmadd_ps(a1, b, s[k][1]);
        }
      }
      __m256 n0 = m0, n1 = m1, hide[KB][2];
      for (int k = 0; k < KB; k++) {
        const __m256i j = _mm256_set1_epi32(j0 + k);
        hide[k][0] = _mm256_castsi256_ps(_mm256_cmpgt_epi32(j, lim0));
        hide[k][1] = _mm256_castsi256_ps(_mm256_cmpgt_epi32(j, lim1));
        s[k][0] = _mm256_blendv_ps(_mm256_mul_ps(s[k][0], scale), ninf, hide[k][0]);
        s[k][1] = _mm256_blendv_ps(_mm256_mul_ps(s[k][1], scale), ninf, hide[k][1]);
        n0 = _mm256_max_ps(n0, s[k][0]);
        n1 = _mm256_max_ps(n1, s[k][1]);
      }
      const __m256 c0 = exp_neg(_mm256_sub_ps(m0, n0)), c1 = exp_neg(_mm256_sub_ps(m1, n1));
      m0 = n0, m1 = n1;
      l0 = _mm256_mul_ps(l0, c0), l1 = _mm256_mul_ps(l1, c1);
      for (int k = 0; k < KB; k++) {
        s[k][0] = _mm256_andnot_ps(hide[k][0], exp_neg(_mm256_sub_ps(s[k][0], m0)));
        s[k][1] = _mm256_andnot_ps(hide[k][1], exp_neg(_mm256_sub_ps(s[k][1], m1)));
        l0 = _mm256_add_ps(l0, s[k][0]);
        l1 = _mm256_add_ps(l1, s[k][1]);
      }
      for (int d = 0; d < HD; d++) {
        __m256 o0 = _mm256_mul_ps(_mm256_load_ps(ot[d]), c0), o1 = _mm256_mul_ps(_mm256_load_ps(ot[d] + 8), c1);
        for (int k = 0; k < KB; k++) {
          const __m256 b = _mm256_broadcast_ss(vr[k] + d);
          o0 = _mm256_fmadd_ps(s[k][0], b, o0);
          o1 = _mm256_fmadd_ps(s[k][1], b, o1);
        }
        _mm256_store_ps(ot[d], o0);
        _mm256_store_ps(ot[d] + 8, o1);
      }
    }
    float l[16] __attribute__((aligned(32)));
    _mm256_store_ps(l, l0);
    _mm256_store_ps(l + 8, l1);
    for (int i = 0; i < 16 && r0 + i < ROWS; i++) {
      const float inv = 1.f / l[i];
      const int r = r0 + i;  /* query head kh * G + r / T, token r %% T */
      for (int d = 0; d < HD; d++) y[((long)(r %% T) * H + kh * G + r / T) * HD + d] = ot[d][i] * inv;
    }
  }
}
"""


def applies(q: Tensor, cache: Tensor) -> bool:
    """Whether `attention` computes this attention: queries in float32 of one sequence, a float32 cache on the CPU,
    heads a multiple of 8 wide."""
    return (
        cpu_quant.takes(q)
        and isinstance(q.shape[-2], int)
        and q.shape[0] == 1
        and cache.dtype == dtypes.float32
        and int(q.shape[-1]) % 8 == 0
    )


def attention(q: Tensor, cache: Tensor, start_pos: int | UOp) -> Tensor:
    """q (1, heads, T, head_dim) float32, rotated; cache (2, 1, kv_heads, L, head_dim) float32 holding positions
    0 .. start_pos + T - 1 (this chunk's keys and values written): (1, heads, T, head_dim), causal."""
    _, heads, tokens, hd = (int(d) for d in q.shape)
    kv, length = int(cache.shape[2]), int(cache.shape[3])
    rows = heads // kv * tokens
    tiles = -(-rows // ROWS)
    threads = max(1, min(NUM_CPU_THREADS.value, kv * tiles))
    name = f"attention_{heads}_{kv}_{hd}_{tokens}"
    sizes = {"heads": heads, "kv": kv, "tokens": tokens, "hd": hd, "length": length, "threads": threads}
    source = _SOURCE.replace("NAME", name) % {**sizes, "scale": 1 / math.sqrt(hd), "exp": EXP_NEG}
    # estimates for a full cache (the span is not known here): scores and weighted sums
    estimates = Estimates(ops=4 * heads * tokens * length * hd, lds=cache.nbytes(), mem=cache.nbytes())
    out = Tensor.empty(heads * tokens * hd, dtype=dtypes.float32, device=q.device)
    pos = Tensor.full((1,), start_pos, dtype=dtypes.int32, device=q.device).contiguous()
    y = run_c_kernel(name, source, threads, estimates, out, q.reshape(heads * tokens * hd), cache, pos)
    # written token by token, so the heads' concatenation that o's product reads is this buffer as it is
    return y.reshape(1, tokens, heads, hd).permute(0, 2, 1, 3)
