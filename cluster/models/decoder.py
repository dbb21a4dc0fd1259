"""One tinygrad decoder for every supported architecture, built for a contiguous range of layers.

A shard holds layers [start, end); the first shard also holds the token embedding, the last the final
norm and lm_head. Weight names follow the Hugging Face layout (MLX checkpoints use it too).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from tinygrad import Context, Device, Tensor, UOp, dtypes
from tinygrad.dtype import DType

from cluster.engine import cpu_attention, cpu_quant, cpu_silu
from cluster.models.config import ModelConfig, QuantSpec, RopeConfig
from cluster.weights import Checkpoint, CheckpointError, row_blocked, widen_bf16

# our attribute -> HF module path inside "model.layers.{i}."
LAYER_MODULES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
    "mlp_norm": "post_attention_layernorm",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens", "model.norm", "lm_head"


# ---------------------------------------------------------------------------------------------- layers
_LANES = 8


def cpu_codegen(t: Tensor | str) -> bool:
    """True on backends without local memory (tinygrad's CPU): there the matvec forms below beat the plain
    one; GPU backends keep the plain form their matvec heuristics are written for."""
    return not Device[t if isinstance(t, str) else str(t.device)].renderer.has_local


# Attention reads the KV cache in whole blocks of positions, the unused end of the last one masked: over a length
# that 16 divides, tinygrad can split the softmax's and the weighted sum's reductions over positions across a
# GPU's threads. Over start_pos + T it could not (a symbolic length it cannot divide), and one block of 8
# threads walked every cached position in turn (the CUDA source, bench/RESULTS.md).
ATTN_BLOCK = 16


def attention_span(positions: int) -> int:
    """Positions attention reads for `positions` filled ones: rounded up to whole blocks."""
    return -(-positions // ATTN_BLOCK) * ATTN_BLOCK


# The graphs' variable counts the blocks past the first, so that its 0 still sizes real kernels: tinygrad's CUDA (and
# Metal) graph builds every kernel node with all variables at 0, and a grid of `blocks * 16` blocks would be 0 there,
# which cuGraphAddKernelNode rejects ("CUDA Error 1, invalid argument") and the engine fell back to plain launches.
ATTN_BLOCKS_VAR = "attention_blocks_past_first"


def blocks_past_first(positions: int) -> int:
    """The value of ATTN_BLOCKS_VAR when attention reads `positions` filled ones."""
    return attention_span(positions) // ATTN_BLOCK - 1


def span_of(blocks_past_first: int | UOp) -> int | UOp:
    """Positions attention reads, from ATTN_BLOCKS_VAR's value (never 0, whatever the value)."""
    return (blocks_past_first + 1) * ATTN_BLOCK


def attention_mask(position_ids: Tensor, start_pos: int | UOp, T: int | UOp, span: int | UOp, dtype: DType) -> Tensor:
    """(1, 1, T, span): 0 where query i (at absolute position start_pos + i) may look, -inf elsewhere: later
    positions, and the rest of the last block (not written yet, or left from a truncated past).
    position_ids: a realized arange over the cache's positions; sliced, not built, so no kernel counts to span."""
    keys = position_ids[0:span].unsqueeze(0)  # (1, span)
    queries = position_ids[start_pos : start_pos + T].unsqueeze(1)  # (T, 1)
    return (keys > queries).where(float("-inf"), 0.0).cast(dtype).reshape(1, 1, T, span)


# Rows of a CPU weight are stored interleaved in blocks (Checkpoint.load's row_block). tinygrad's CPU matvec
# computes the rows of a block at once and clang vectorizes across them; with the rows interleaved that is one
# contiguous load instead of gathered ones: with blocks of 4, a bf16 matvec ran 2.3x faster per core, fp32
# 1.5x, MLX 4-bit 1.4x (bench/RESULTS.md). Weights kept narrow (bf16 bits, MLX-quantized words) go in blocks
# of 8: widening or unpacking is what bounds their kernels, and cpu_matmul has it done on 8 rows per AVX2
# instruction (MLX 4/8-bit decode 1.45-1.5x faster, prefill 1.3-1.5x; bf16 decode ~1.2x).
CPU_ROW_BLOCK = 4  # float32 weights (fp16 checkpoints widened at load)
CPU_NARROW_ROW_BLOCK = 8  # bf16 bits and MLX-quantized words


def cpu_row_block(out_dim: int, preferred: int) -> int:
    """Rows per interleaved block of a CPU weight: `preferred`, else CPU_ROW_BLOCK where that does not divide
    the rows, else 1 (stored as it is)."""
    for block in (preferred, CPU_ROW_BLOCK):
        if out_dim % block == 0:
            return block
    return 1


def _matvec(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """x (..., 1, in) @ w.T as _LANES independent partial sums then one short sum: tinygrad's CPU code for the
    plain form adds every product into one running sum, which stalls on that dependency (~1.2x slower)."""
    out, n = w.shape
    parts = (x.reshape(*x.shape[:-1], 1, n // _LANES, _LANES) * w.reshape(out, n // _LANES, _LANES)).sum(-2)
    y = parts.sum(-1)  # (..., 1, out)
    return y if bias is None else y + bias


class Linear:
    """A dense weight, kept in its stored dtype (bf16 as uint16 bits) and widened to the compute dtype inside
    the kernel that reads it: half the bytes of a float32 copy, and faster on CPUs."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None = None, dtype: DType | None = None, row_blocked: bool = False
    ):
        self.weight, self.bias = weight, bias  # (out, in), or (out/R, in, R) when row_blocked; (out,)
        self.dtype = dtype or weight.dtype
        self.row_blocked = row_blocked

    def matrix(self) -> Tensor:
        """The weight as (out, in) in its stored dtype."""
        return row_blocked(self.weight) if self.row_blocked else self.weight

    def widen(self, w: Tensor) -> Tensor:
        if w.dtype == dtypes.uint16:
            w = widen_bf16(w)
        return w if w.dtype == self.dtype else w.cast(self.dtype)

    def __call__(self, x: Tensor) -> Tensor:
        if self.row_blocked and cpu_quant.bf16_applies(x, self.weight):
            # a prompt chunk on x86 with AVX2: cpu_quant's GEMM widens each bf16 weight once for a tile of tokens
            y = cpu_quant.bf16_matmul(x, self.weight)
            return y if self.bias is None else y + self.bias
        w = self.widen(self.matrix())
        if x.shape[-2] == 1 and w.shape[1] % _LANES == 0 and cpu_codegen(w):
            return _matvec(x, w, self.bias)
        return x.linear(w.T, self.bias)

    def rows(self, ids: Tensor) -> Tensor:
        """Rows `ids` in the compute dtype (an embedding lookup)."""
        return self.widen(self.matrix()[ids])

    def params(self) -> list[Tensor]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])


class QuantLinear:
    """MLX affine-quantized weight; dequantized lazily inside the matmul so only packed bytes are read."""

    def __init__(
        self,
        packed: Tensor,
        scales: Tensor,
        biases: Tensor,
        spec: QuantSpec,
        dtype: DType,
        bias: Tensor | None = None,
        row_blocked: bool = False,
    ):
        # (out, in*bits/32), (out, groups) x2; each stored as (out/R, cols, R) when row_blocked
        self.packed, self.scales, self.biases = packed, scales, biases
        self.spec, self.dtype, self.bias = spec, dtype, bias
        self.row_blocked = row_blocked

    def matrices(self) -> tuple[Tensor, Tensor, Tensor]:
        """packed, scales and biases as (out, cols)."""
        if not self.row_blocked:
            return self.packed, self.scales, self.biases
        return row_blocked(self.packed), row_blocked(self.scales), row_blocked(self.biases)

    def levels(self, packed: Tensor) -> Tensor:
        """uint32 words -> (..., words, values per word) uint32 integer levels, LSB first."""
        bits = self.spec.bits
        shifts = Tensor.arange(32 // bits, dtype=dtypes.uint32).to(packed.device) * bits
        return (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)

    def unpack(self, packed: Tensor, groups: int) -> Tensor:
        """uint32 words -> (..., groups, group_size) integer levels in the compute dtype, LSB first."""
        return self.levels(packed).reshape(*packed.shape[:-1], groups, self.spec.group_size).cast(self.dtype)

    def dequantize(self, packed: Tensor, scales: Tensor, biases: Tensor) -> Tensor:
        return _affine(self.unpack(packed, int(scales.shape[-1])), scales, biases)

    def dequantize_float(self, packed: Tensor, scales: Tensor, biases: Tensor) -> Tensor:
        """dequantize's weights in float32, each level made from its bits: a level OR-ed into the bits of 2^23 is the
        float 2^23 + level, exactly. GPUs issue integer-to-float conversions at a fraction of their multiply-add rate,
        and a 4-bit matvec converts one per weight."""
        magic = float_2_23_bits(packed.device)
        q = (self.levels(packed) | magic).bitcast(dtypes.float32) - 2.0**23  # (..., words, per word)
        q = q.reshape(*packed.shape[:-1], int(scales.shape[-1]), self.spec.group_size)
        return _affine(q, scales.float(), biases.float())

    def __call__(self, x: Tensor) -> Tensor:
        packed, scales, biases = self.matrices()
        prompt, gpu = x.shape[-2] != 1, not cpu_codegen(packed)
        if gpu and not prompt and float_unpack():
            w = self.dequantize_float(packed, scales, biases)
            return x.float().linear(w.T, None if self.bias is None else self.bias.float()).cast(self.dtype)
        bits, group = self.spec.bits, self.spec.group_size
        if not gpu and self.row_blocked and cpu_quant.applies(x, self.packed, self.scales, bits, group):
            # x86 with AVX2, hand-written kernels (cpu_quant): a decode product in integer multiply-adds, ~2x
            # tinygrad's code below; a prompt chunk's matmul making each weight once for a tile of tokens, ~2x
            product = cpu_quant.matmul if prompt else cpu_quant.matvec
            y = product(x, self.packed, self.scales, self.biases, bits, group)
            return y if self.bias is None else y + self.bias
        if prompt or gpu:
            w = self.dequantize(packed, scales, biases)
            if prompt and gpu:
                # GPU prompt chunk: the weight dequantized in a kernel of its own, so the matmul reads plain fp16
                # and tinygrad gives it tensor cores (an H200: 213 us fused vs 87 us + the dequant for 64 tokens
                # x 8192x2048, bench/RESULTS.md); decode (one row) keeps it fused, gpu_matvec's form
                w = w.contiguous()
            return x.linear(w.T, self.bias)
        # CPU decode: sum(w x) = sum_g scale_g * sum(q x) + bias_g * sum(x), one multiply per weight instead of
        # three (~2x faster, bench/). Each group's sum runs as one partial sum per position in a word, then
        # a short sum: a constant shift per partial sum and independent adds (1.6x faster than one sum).
        groups, per_word = int(scales.shape[-1]), 32 // self.spec.bits
        words = self.spec.group_size // per_word
        xg = x.reshape(*x.shape[:-1], 1, groups, words, per_word)  # (..., 1, 1, groups, words, per_word)
        q = self.unpack(packed, groups).reshape(*packed.shape[:-1], groups, words, per_word)
        dots = (q * xg).sum(-2).sum(-1)  # (..., 1, out, groups)
        y = (dots * scales).sum(-1) + (xg.sum((-2, -1)) * biases).sum(-1)  # (..., 1, out)
        return y if self.bias is None else y + self.bias

    def rows(self, ids: Tensor) -> Tensor:
        """Dequantized rows `ids` (an embedding lookup on a quantized table)."""
        packed, scales, biases = self.matrices()
        return self.dequantize(packed[ids], scales[ids], biases[ids])

    def params(self) -> list[Tensor]:
        return [self.packed, self.scales, self.biases] + ([self.bias] if self.bias is not None else [])


def _affine(q: Tensor, scales: Tensor, biases: Tensor) -> Tensor:
    """(..., groups, group) levels -> (..., groups * group) weights: level * scale + bias, per group."""
    w = q * scales.unsqueeze(-1) + biases.unsqueeze(-1)
    return w.reshape(*q.shape[:-2], q.shape[-2] * q.shape[-1])


def lookup(table: Linear | QuantLinear, ids: Tensor) -> Tensor:
    """Rows `ids` of an embedding table in the compute dtype, realized. tinygrad computes a lookup as a sum over
    the vocabulary of the rows that match, and splits a sum that long into two kernels (partial sums, then their
    sum) when it is 32768 or more long. Unsplit, its code generator turns the sum into a plain gather, one small
    kernel per table. Split, it wrote 32 to 256 float32 partial sums for every value looked up, and on OpenCL the
    second kernel failed to compile (tinygrad 0.14: "UOp verification failed ... Ops.AFTER"): every model with a
    vocabulary that large failed its warm-up there."""
    with Context(SPLIT_REDUCEOP=0):  # read when the lookup is scheduled: realized inside
        return table.rows(ids).realize()


class RMSNorm:
    def __init__(self, weight: Tensor, eps: float):
        self.weight, self.eps = weight, eps

    def __call__(self, x: Tensor) -> Tensor:
        # normalise in float32 like the reference implementations, then scale in the compute dtype
        xf = x.float()
        return (xf * (xf.square().mean(-1, keepdim=True) + self.eps).rsqrt()).cast(x.dtype) * self.weight


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> np.ndarray:
    """Inverse RoPE frequencies (head_dim/2,) in float32, with linear or Llama-3 scaling applied."""
    inv = (1.0 / (np.float32(rope.theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(
        np.float32
    )
    if rope.rope_type == "linear":
        return (inv / rope.factor).astype(np.float32)
    if rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_tables(head_dim: int, rope: RopeConfig, length: int) -> tuple[np.ndarray, np.ndarray]:
    freqs = np.arange(length, dtype=np.float32)[:, None] * rope_inv_freq(head_dim, rope)[None, :]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)  # (length, head_dim/2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: (B, H, T, head_dim) in the half-split layout HF uses; cos/sin: (T, head_dim/2)
    x1, x2 = x.chunk(2, dim=-1)
    return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)


# ---------------------------------------------------------------------------------------------- blocks
class Block:
    def __init__(self, cfg: ModelConfig, mods: dict[str, Linear | QuantLinear | RMSNorm]):
        self.cfg, self.m = cfg, mods

    def __call__(
        self, x: Tensor, cache: Tensor, start_pos: int | UOp, mask: Tensor, cos: Tensor, sin: Tensor
    ) -> Tensor:
        # x: (B, T, D); cache: (2, B, n_kv, max_len, head_dim) written in place at [start_pos, start_pos+T);
        # mask: (1, 1, T, span), attention_mask's; attention reads the cache's positions [0, span)
        cfg, m = self.cfg, self.m
        B, T, _ = x.shape
        h = m["attn_norm"](x)
        if "qkv" in m:  # one product for the three (fused_projections)
            q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            qkv = m["qkv"](h).contiguous()  # (B, T, q_dim + 2 * kv_dim), realized once
            q, k, v = qkv[..., :q_dim], qkv[..., q_dim : q_dim + kv_dim], qkv[..., q_dim + kv_dim :]
        else:
            q, k, v = m["q"](h), m["k"](h), m["v"](h)
            if not cpu_codegen(v):
                # on GPUs realized on its own: left lazy, it was computed inside the cache write below, once for each
                # of k's and v's slots, by 16 threads a row reading strided (bench/cuda_census.py); CPUs lost ~3%
                v = v.contiguous()
        q = q.reshape(B, T, cfg.num_heads, cfg.head_dim)
        k = k.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = m["q_norm"](q), m["k_norm"](k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if T == 1 and not cpu_codegen(q):
            # a GPU decode step rotates q in a kernel of its own: left lazy, the scores kernel rotated it again in each
            # of its blocks (1B: 18944 blocks, 21 loads a thread instead of 10; bench/cuda_census.py)
            q = q.contiguous()
        cache[:, :, :, start_pos : start_pos + T, :].assign(Tensor.stack(k, v).cast(cache.dtype))
        span = mask.shape[-1]
        keys = cache[0, :, :, 0:span, :]  # (B, n_kv, span, head_dim)
        values = cache[1, :, :, 0:span, :]
        # scores, softmax and weighted sum in float32, as transformers does for half models (and tinygrad 0.14's
        # OpenCL renderer cannot compile a max over half values)
        if cpu_attention.applies(q, cache):
            # x86 with AVX2: a flash-attention kernel reading the cache itself (tinygrad's code: ~4 GFLOP/s)
            attn = cpu_attention.attention(q, cache, start_pos)
        else:
            attn = q.float().scaled_dot_product_attention(keys.float(), values.float(), attn_mask=mask, enable_gqa=True)
        attn = attn.cast(x.dtype).transpose(1, 2).reshape(B, T, cfg.num_heads * cfg.head_dim)
        if T > 1 and not cpu_codegen(attn):
            # on GPUs a prompt chunk's heads are written token by token, so o's product reads plain rows and gets
            # tensor cores; read through the transpose, tinygrad gave it none (bench/cuda_census.py --prompt)
            attn = attn.contiguous()
        x = x + m["o"](attn)
        h = m["mlp_norm"](x)
        if "gate_up" in m:
            gate_up = m["gate_up"](h).contiguous()  # (B, T, 2 * intermediate)
            F = cfg.intermediate_size
            gate, up = gate_up[..., :F], gate_up[..., F:]
        else:
            gate, up = m["gate"](h), m["up"](h)
        if cpu_silu.applies(gate):  # x86 with AVX2: 8 lanes on every core, ~12x tinygrad's code
            return x + m["down"](cpu_silu.silu_mul(gate, up))  # it realizes gate and up on their own
        if "gate_up" not in m:
            # realized separately: fused into one kernel, tinygrad's CPU matvecs run ~1.6x slower (bench/)
            gate, up = gate.contiguous(), up.contiguous()
        return x + m["down"]((gate.silu() * up).contiguous())


@dataclass
class ShardModel:
    """Tensors and callables for layers [start, end) of a model."""

    cfg: ModelConfig
    start: int
    end: int
    dtype: DType
    blocks: list[Block]
    embed: Linear | QuantLinear | None  # first shard only
    norm: RMSNorm | None  # last shard only
    lm_head: Linear | QuantLinear | None  # last shard only
    weight_bytes: int

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.cfg.num_layers

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        assert self.embed is not None
        return lookup(self.embed, tokens)  # (B, T) int32 -> (B, T, D)

    def params(self) -> list[Tensor]:
        out: list[Tensor] = []
        for b in self.blocks:
            for mod in b.m.values():
                out += mod.params() if isinstance(mod, Linear | QuantLinear) else [mod.weight]
        if self.embed is not None:
            out += self.embed.params()
        if self.norm is not None:
            out.append(self.norm.weight)
        if self.lm_head is not None and self.lm_head is not self.embed:
            out += self.lm_head.params()
        return out


# ---------------------------------------------------------------------------------------------- loading
class _Loader:
    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, device: str, dtype: DType, narrow_block: int):
        self.cfg, self.ckpt, self.device, self.dtype = cfg, ckpt, device, dtype
        self.narrow_block = narrow_block
        self.used: list[str] = []

    def tensor(
        self, name: str, shape: tuple[int, ...], dtype: DType | None = None, raw: bool = False, row_block: int = 1
    ) -> Tensor:
        self.used.append(name)
        dtype = self.dtype if dtype is None else dtype
        return self.ckpt.load(name, self.device, dtype, shape, raw=raw, row_block=row_block)

    def linear(self, path: str, out_dim: int, in_dim: int, bias: bool = False) -> Linear | QuantLinear:
        b = self.tensor(f"{path}.bias", (out_dim,)) if bias else None
        cpu = cpu_codegen(self.device)
        if f"{path}.scales" not in self.ckpt:
            name = f"{path}.weight"
            keep_bf16 = self.keeps_bf16(name)
            row_block = cpu_row_block(out_dim, self.narrow_block if keep_bf16 else CPU_ROW_BLOCK) if cpu else 1
            weight = self.tensor(name, (out_dim, in_dim), raw=keep_bf16, row_block=row_block)
            return Linear(weight, b, self.dtype, row_blocked=row_block > 1)
        q = self.cfg.quantization
        spec = q.for_module(path) if q is not None else None
        if spec is None:
            raise CheckpointError(
                f"{self.ckpt.model_dir}: {path} is quantized but config.json has no quantization for it"
            )
        if in_dim % spec.group_size:
            raise CheckpointError(f"{path}: input size {in_dim} is not a multiple of group_size {spec.group_size}")
        words, groups = in_dim * spec.bits // 32, in_dim // spec.group_size
        row_block = cpu_row_block(out_dim, self.narrow_block) if cpu else 1
        return QuantLinear(
            self.tensor(f"{path}.weight", (out_dim, words), dtypes.uint32, row_block=row_block),
            self.tensor(f"{path}.scales", (out_dim, groups), row_block=row_block),
            self.tensor(f"{path}.biases", (out_dim, groups), row_block=row_block),
            spec,
            self.dtype,
            b,
            row_blocked=row_block > 1,
        )

    def keeps_bf16(self, name: str) -> bool:
        """Whether the weight `name` is kept as bf16 bits: float32 compute keeps bf16 weights narrow and widens them
        in-kernel (two integer ops); fp16 is widened once at load, since CPU backends convert it ~10x slower."""
        return self.dtype == dtypes.float32 and self.ckpt.info(name).dtype == "BF16"

    def rows(self, names: list[str], dtype: DType | None = None, raw: bool = False) -> Tensor:
        self.used += names
        return self.ckpt.load_rows(names, self.device, self.dtype if dtype is None else dtype, raw=raw)

    def stacked_linear(self, paths: list[str], in_dim: int, bias: bool = False) -> Linear | QuantLinear | None:
        """The products of `paths` (one input) as one weight, their rows stacked in order; None where they cannot
        share one: some quantized and some not, or quantized differently."""
        quantized = {f"{p}.scales" in self.ckpt for p in paths}
        q = self.cfg.quantization
        specs = {q.for_module(p) if q is not None else None for p in paths}
        if len(quantized) != 1 or len(specs) != 1:
            return None
        is_quantized, spec = quantized.pop(), specs.pop()
        if is_quantized and (spec is None or in_dim % spec.group_size):
            return None  # linear() gives the clear error
        b = self.rows([f"{p}.bias" for p in paths]) if bias else None
        if not is_quantized:
            weights = [f"{p}.weight" for p in paths]
            return Linear(self.rows(weights, raw=self.keeps_bf16(weights[0])), b, self.dtype)
        assert spec is not None  # a quantized product without a spec returned above
        packed = self.rows([f"{p}.weight" for p in paths], dtypes.uint32)
        scales, biases = self.rows([f"{p}.scales" for p in paths]), self.rows([f"{p}.biases" for p in paths])
        return QuantLinear(packed, scales, biases, spec, self.dtype, b)

    def norm(self, path: str, dim: int) -> RMSNorm:
        return RMSNorm(self.tensor(f"{path}.weight", (dim,)), self.cfg.rms_norm_eps)


FLOAT_2_23_BITS = 0x4B000000  # the float32 2^23: its lowest mantissa bits count units
_FLOAT_2_23: dict[str, Tensor] = {}


def float_2_23_bits(device: str | tuple[str, ...] | None) -> Tensor:
    """FLOAT_2_23_BITS as a realized (1,) uint32 on `device`. Read from a buffer, not written as a literal: a SASS
    instruction takes one 32-bit immediate, so nvcc makes `(level & 15) | 0x4B000000` two instructions with a literal
    and one with the constant in a register (sm_90, a 4-bit product: 7.5 -> 6.75 instructions a weight;
    bench/sass_census.py)."""
    key = str(device)
    if key not in _FLOAT_2_23:
        _FLOAT_2_23[key] = Tensor([FLOAT_2_23_BITS], dtype=dtypes.uint32, device=device).realize()
    return _FLOAT_2_23[key]


def float_unpack() -> bool:
    """Whether GPU decode products unpack MLX levels to float32 by their bits (QuantLinear.dequantize_float)
    instead of converting them to the compute dtype: CLUSTERCTL_QUANT_UNPACK=float. Off until bench/gpu.sh has
    timed it against the conversions on a GPU (its kernel step and its `q4 float unpack` speed step)."""
    return os.environ.get("CLUSTERCTL_QUANT_UNPACK", "") == "float"


def fused_projections(device: str) -> bool:
    """Whether a layer's q, k and v products share one stacked weight, and gate and up another: on GPUs, where
    each kernel of a decode step costs microseconds of launch and tail whatever its size (two fewer a layer in the
    attention, one fewer in the MLP). CPUs keep them apart: their matvec kernels are tuned per weight
    (cpu_matmul, row blocks). CLUSTERCTL_FUSED_PROJECTIONS=0 keeps them apart everywhere and =1 stacks them
    everywhere, for comparisons and tests."""
    chosen = os.environ.get("CLUSTERCTL_FUSED_PROJECTIONS", "")
    return chosen == "1" or (chosen != "0" and not cpu_codegen(device))


def load_shard(
    cfg: ModelConfig,
    ckpt: Checkpoint,
    start: int,
    end: int,
    device: str,
    dtype: DType,
    narrow_block: int = CPU_NARROW_ROW_BLOCK,
) -> ShardModel:
    """Build layers [start, end) reading only their tensors; nothing is realized here.

    narrow_block: rows per block of the CPU weights kept narrow; CPU_ROW_BLOCK where cpu_matmul is not active
    (tinygrad alone computes 4 rows at once, and is 2x slower on blocks of 8)."""
    if not 0 <= start < end <= cfg.num_layers:
        raise ValueError(f"layer range [{start}, {end}) is outside the model's {cfg.num_layers} layers")
    ld = _Loader(cfg, ckpt, device, dtype, narrow_block)
    fused = fused_projections(device)
    D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_dim, kv_dim = cfg.num_heads * hd, cfg.num_kv_heads * hd
    blocks = []
    for i in range(start, end):
        p = f"model.layers.{i}."
        mods: dict[str, Linear | QuantLinear | RMSNorm] = {"attn_norm": ld.norm(p + LAYER_MODULES["attn_norm"], D)}
        qkv = [p + LAYER_MODULES[m] for m in ("q", "k", "v")]
        gate_up = [p + LAYER_MODULES[m] for m in ("gate", "up")]
        if fused and (stacked := ld.stacked_linear(qkv, D, cfg.attention_bias)) is not None:
            mods["qkv"] = stacked
        else:
            mods["q"] = ld.linear(qkv[0], q_dim, D, cfg.attention_bias)
            mods["k"] = ld.linear(qkv[1], kv_dim, D, cfg.attention_bias)
            mods["v"] = ld.linear(qkv[2], kv_dim, D, cfg.attention_bias)
        mods["o"] = ld.linear(p + LAYER_MODULES["o"], D, q_dim)
        mods["mlp_norm"] = ld.norm(p + LAYER_MODULES["mlp_norm"], D)
        if fused and (stacked := ld.stacked_linear(gate_up, D)) is not None:
            mods["gate_up"] = stacked
        else:
            mods["gate"] = ld.linear(gate_up[0], F, D)
            mods["up"] = ld.linear(gate_up[1], F, D)
        mods["down"] = ld.linear(p + LAYER_MODULES["down"], D, F)
        if cfg.qk_norm:
            mods["q_norm"] = ld.norm(p + LAYER_MODULES["q_norm"], hd)
            mods["k_norm"] = ld.norm(p + LAYER_MODULES["k_norm"], hd)
        blocks.append(Block(cfg, mods))

    is_first, is_last = start == 0, end == cfg.num_layers
    table = ld.linear(EMBED, cfg.vocab_size, D) if is_first or (is_last and cfg.tie_word_embeddings) else None
    embed = table if is_first else None
    norm = ld.norm(FINAL_NORM, D) if is_last else None
    lm_head: Linear | QuantLinear | None = None
    if is_last:
        lm_head = table if cfg.tie_word_embeddings else ld.linear(LM_HEAD, cfg.vocab_size, D)
    return ShardModel(cfg, start, end, dtype, blocks, embed, norm, lm_head, ckpt.nbytes(ld.used))
