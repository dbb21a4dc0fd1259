"""How tinygrad's GPU code computes the decoder's matrix-vector products (decode at batch 1): one warp per
weight row, each thread loading 16 contiguous bytes of the row per step.

tinygrad 0.14's heuristic has a matvec rule (threads that share a row, reduced through shared memory), but it
matches only a multiply of two plain loads. The decoder's products multiply in fp16 and sum in fp32 (a cast
between the multiply and the sum), read MLX-quantized words through shifts, or take the RMSNorm fused into
the input, so none of them matched: each thread then summed 4 whole rows alone, neighbouring threads read
addresses a row apart, and the 1B model decoded at 75 tok/s on an H200 (185 GB/s). With the options below it
decoded at 155 tok/s on the same card, its products running at 2.2-4.3 TB/s (bench/RESULTS.md).

Here a kernel that reduces a vector against a weight row by row gets: the trailing reduce axes a weight word
holds (the values of an MLX-quantized word) unrolled whole, the weight's contiguous axis unrolled to 16 bytes
(8 fp16 values or 4 words: one vector load), that axis split over a warp (GROUP: partial sums meet in shared
memory), and 4 rows to a block. Every other kernel keeps tinygrad's choices, and BEAM, where it is asked
for, searches as before. `enable()` installs it in this process and in tinygrad's compile processes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from math import prod
from typing import Any

from tinygrad.codegen.opt import KernelOptError, Opt, OptOps, heuristic
from tinygrad.codegen.opt.postrange import Scheduler
from tinygrad.engine import worker
from tinygrad.uop.ops import AxisType, Ops

from cluster.engine.kernel_opts import axis_named, element_dtype, unit_stride, uses

log = logging.getLogger(__name__)

WARP = 32  # threads that share one row
LOAD_BYTES = 16  # per thread and step: one 128-bit load
ROWS_PER_BLOCK = 4
# Rows each thread computes (CLUSTERCTL_MATVEC_ROWS, rows_per_thread()) where the product keeps this many blocks:
# the activations a thread loads, and what the decoder fused into them (the RMSNorm of qkv, gate/up and lm_head),
# then serve that many rows
MIN_UPCAST_BLOCKS = 512
MIN_WEIGHT = 1 << 16  # elements; smaller products are not worth a special case
REDUCTION_MAX_OUTPUTS = 4096  # a block of threads for each output: up to ~130k threads, half an H200
REDUCTION_MIN_LENGTH = 128  # shorter ones walk at most 8 values a thread already
REDUCTION_STEPS = 8  # loads per thread a long reduction is spread to
# blocks a prompt chunk's tensor-core product should launch: about one per SM of a big GPU (an H200 has 132)
MIN_TC_BLOCKS = 128

_default_heuristic: Callable[[Scheduler], Scheduler] | None = None
_default_worker_init: Callable[[], None] | None = None


def _itemsize(buf: Any) -> int:
    return int(element_dtype(buf.src[0].dtype).itemsize)


def matvec_plan(
    k: Scheduler, warp: int = WARP, rows_per_block: int = ROWS_PER_BLOCK
) -> tuple[int, int, int, list[int], int | None] | None:
    """(contiguous weight axis, its unroll, threads per row, reduce axes to unroll whole, row axis for the
    block or None) when `k` (before any options) is a GPU matrix-vector product; None for every other kernel."""
    if not (k.ren.has_local and k.ren.has_shared) or k.reduceop is None or k.reduceop.arg[0] is not Ops.ADD:
        return None
    shape = k.full_shape
    if not all(isinstance(s, int) for s in shape):
        return None  # symbolic sizes: attention over the cached positions
    reduces, rows = k.axes_of(AxisType.REDUCE), k.axes_of(AxisType.GLOBAL)
    if not reduces or not rows:
        return None
    weights = [
        b
        for b in k.bufs
        if all(uses(b, k.rngs[a]) for a in rows)  # every output axis indexes the weight: no token axis
        and any(uses(b, k.rngs[a]) for a in reduces)
        and _itemsize(b) in (2, 4)
        and b.src[0].max_numel() >= MIN_WEIGHT
    ]
    if not weights:
        return None
    weight = max(weights, key=lambda b: b.src[0].max_numel())
    word = max(a for a in reduces if uses(weight, k.rngs[a]))  # the weight's innermost reduce axis
    before, after = [a for a in reduces if a < word], [a for a in reduces if a > word]
    if before or any(shape[a] > 8 for a in after):
        return None  # only the values inside one word may follow it
    # values of the reduction per weight element along `word`: 1 for fp16, 8 for 4-bit words read along a
    # merged axis; axes in `after` hold a word's values apart
    values = prod(shape[a] for a in (*rows, word)) / weight.src[0].max_numel()
    if values < 1 or values != int(values):
        return None
    unroll = LOAD_BYTES // _itemsize(weight) * int(values)
    group = next((g for g in (warp, warp // 2, warp // 4) if g and shape[word] % (unroll * g) == 0), None)
    if group is None:
        return None
    row = next((a for a in reversed(rows) if shape[a] % rows_per_block == 0), None) if rows_per_block > 1 else None
    return word, unroll, group, after, row


def rows_per_thread() -> int:
    """Rows each thread of a decode product computes where MIN_UPCAST_BLOCKS blocks remain: CLUSTERCTL_MATVEC_ROWS
    (1, 2 or 4; default 1). With one row a thread, a product the RMSNorm is fused into normalizes its input again
    for every row (a float-to-half conversion a weight): nvcc's sm_90 code for the 1B model's 4-bit gate/up issues
    12 instructions a weight, 6.6 with 4 rows a thread and the float unpack (bench/sass_census.py). Off until
    bench/gpu.sh has timed it on a GPU."""
    value = os.environ.get("CLUSTERCTL_MATVEC_ROWS", "") or "1"
    if value not in ("1", "2", "4"):
        raise ValueError(f"CLUSTERCTL_MATVEC_ROWS must be 1, 2 or 4, not {value!r}")
    return int(value)


def matvec_options(
    k: Scheduler, warp: int = WARP, rows_per_block: int = ROWS_PER_BLOCK, row_upcast: int | None = None
) -> Scheduler | None:
    """`k` with the warp-per-row options applied (on a copy), or None when `k` is no matrix-vector product or
    they do not apply. `row_upcast`: rows a thread; None: up to rows_per_thread(), as many as leave the product
    MIN_UPCAST_BLOCKS blocks. The arguments other than `k` are for benchmarks (bench/bench_gpu.py's kernel step)."""
    if row_upcast is None:
        upcasts = [r for r in (4, 2) if r <= rows_per_thread()]
        for r in upcasts:
            out = matvec_options(k, warp, rows_per_block, r)
            if out is not None and (blocks(out) or 0) >= MIN_UPCAST_BLOCKS:
                return out
        row_upcast = 1
    plan = matvec_plan(k, warp, rows_per_block)
    if plan is None:
        return None
    word, unroll, group, whole, row = plan
    names = {a: k.rngs[a].arg for a in (word, *whole, *([row] if row is not None else []))}
    out = k.copy()
    try:
        for a in whole:
            out.apply_opt(Opt(OptOps.UNROLL, out.unrollable_dims.index(axis_named(out, names[a])), 0))
        out.apply_opt(Opt(OptOps.UNROLL, out.unrollable_dims.index(axis_named(out, names[word])), unroll))
        out.apply_opt(Opt(OptOps.GROUP, out.axes_of(AxisType.REDUCE).index(axis_named(out, names[word])), group))
        if row is not None:
            out.apply_opt(Opt(OptOps.LOCAL, axis_named(out, names[row]), rows_per_block))
            if row_upcast > 1:
                out.apply_opt(Opt(OptOps.UPCAST, axis_named(out, names[row]), row_upcast))
        elif row_upcast > 1:
            return None
    except KernelOptError as e:
        log.debug("tinygrad's options for %s: %s", k.full_shape, e)
        return None
    return out


def reduction_plan(k: Scheduler) -> tuple[int, int, int] | None:
    """(reduce axis, its unroll, threads per output) when `k` is a long reduction to few outputs that tinygrad
    would give 16 threads each (RMSNorm's mean of squares, a sampler's maximum or sum over the vocabulary);
    None for every other kernel. 16 threads walking 2048 values in turn are bound by memory latency, not
    bandwidth: one such kernel runs per norm, 33 in the 1B model's decode step (bench/cuda_census.py)."""
    if not (k.ren.has_local and k.ren.has_shared) or k.reduceop is None:
        return None
    if k.reduceop.arg[0] not in (Ops.ADD, Ops.MAX) or not all(isinstance(s, int) for s in k.full_shape):
        return None
    reduces, outputs = k.axes_of(AxisType.REDUCE), k.axes_of(AxisType.GLOBAL, AxisType.LOOP)
    if len(reduces) != 1 or prod(k.full_shape[a] for a in outputs) > REDUCTION_MAX_OUTPUTS:
        return None
    axis, length = reduces[0], int(k.full_shape[reduces[0]])
    if length < REDUCTION_MIN_LENGTH:
        return None
    rng = k.rngs[axis]
    reads = [b for b in k.bufs if b.src[1].get_idx() is rng or uses(b, rng)]  # a 1-D input is indexed by rng alone
    # 16 bytes a load where every buffer the axis walks holds its values side by side (coalesced across threads)
    vector = bool(reads) and all(unit_stride(b, rng) for b in reads)
    unroll = LOAD_BYTES // max(_itemsize(b) for b in reads) if vector else 1
    if length % unroll:
        unroll = 1
    steps = length // unroll
    # the fewest threads that leave each at most REDUCTION_STEPS loads: the partial sums meet in shared memory,
    # which every thread then walks, so more threads than that cost more than they save
    group = next((g for g in (32, 64, 128, 256) if steps % g == 0 and steps // g <= REDUCTION_STEPS), None)
    return None if group is None else (axis, unroll, group)


def reduction_options(k: Scheduler) -> Scheduler | None:
    """`k` with reduction_plan's options applied (on a copy), or None where the plan does not apply."""
    plan = reduction_plan(k)
    if plan is None:
        return None
    axis, unroll, group = plan
    name = k.rngs[axis].arg
    out = k.copy()
    try:
        if unroll > 1:
            out.apply_opt(Opt(OptOps.UNROLL, out.unrollable_dims.index(axis_named(out, name)), unroll))
        out.apply_opt(Opt(OptOps.GROUP, out.axes_of(AxisType.REDUCE).index(axis_named(out, name)), group))
    except KernelOptError as e:
        log.debug("tinygrad's options for %s: %s", k.full_shape, e)
        return None
    return out


def blocks(k: Scheduler) -> int | None:
    """The blocks `k` launches with the options applied so far; None where that depends on a position."""
    sizes = [k.full_shape[a] for a in k.axes_of(AxisType.GLOBAL)]
    return prod(sizes) if all(isinstance(s, int) for s in sizes) else None


TC_TILE_UPCASTS = (2, 1, 0)  # tiles a warp computes, as twofold upcasts of the tile: 2x2, 2x1, 1x1


def tensor_core_tile(k: Scheduler, tc: Opt, upcasts: int) -> Scheduler | None:
    """`k` (on a copy) with the tensor-core option `tc`, `upcasts` twofold upcasts of its tile, and 4 warps a
    block; None where these do not apply to its shape."""
    out = k.copy()
    try:
        for o in (tc, *[Opt(OptOps.UPCAST, 1, 2)] * upcasts, Opt(OptOps.LOCAL, 0, 4)):
            out.apply_opt(o)
    except KernelOptError:
        return None
    return out


def tensor_core_options(k: Scheduler, chosen: Scheduler) -> Scheduler:
    """`chosen` (tinygrad's options for `k`), unless they run `k` on tensor cores in fewer than MIN_TC_BLOCKS blocks:
    then the same tensor-core tile with fewer tiles a warp, the first choice that launches enough blocks (else the
    one that launches most). tinygrad gives every warp 4x4 tiles; for a prompt chunk of 64 tokens that left the
    1B model's down projection 16 blocks (16 of an H200's 132 SMs busy), q/k/v 24 and gate/up 64. On an H200,
    gate/up on 256 blocks (2x2 tiles) ran in 78.5 us against 86.8 us with tinygrad's (bench/RESULTS.md, run 2);
    a chunk of 512 tokens already launches 128-512 blocks and keeps tinygrad's tile (232 us there, its best)."""
    tc = next((o for o in chosen.applied_opts if o.op is OptOps.TC), None)
    if tc is None or (launched := blocks(chosen)) is None or launched >= MIN_TC_BLOCKS:
        return chosen
    best, most = chosen, launched
    for upcasts in TC_TILE_UPCASTS:
        out = tensor_core_tile(k, tc, upcasts)
        if out is None:
            continue
        n = blocks(out) or 0
        if n >= MIN_TC_BLOCKS:
            return out
        if n > most:
            best, most = out, n
    return best


def _optimize(k: Scheduler) -> Scheduler:
    """tinygrad's hand_coded_optimizations, with the warp-per-row form for matrix-vector products, a block of
    threads for each output of a long reduction, and enough blocks for a prompt chunk's tensor-core products."""
    assert _default_heuristic is not None
    # tinygrad's heuristic works on a copy of k
    return matvec_options(k) or reduction_options(k) or tensor_core_options(k, _default_heuristic(k))


def default_options(k: Scheduler) -> Scheduler:
    """tinygrad's own choices for `k`, whether or not enable() ran (for comparisons)."""
    return (_default_heuristic or heuristic.hand_coded_optimizations)(k)


def _compile_worker_init() -> None:
    """Initializer of tinygrad's compile processes: tinygrad's own, then the same options as here."""
    (_default_worker_init or worker._init_worker)()  # in a fresh compile process this is tinygrad's own
    enable()


def enable() -> bool:
    """Give GPU matrix-vector products the warp-per-row form from now on, in this process and in the compile
    processes that tinygrad starts (idempotent). False where this tinygrad's optimizer is not the one this was
    written for: then nothing changes."""
    global _default_heuristic, _default_worker_init
    if _default_heuristic is not None:
        return True
    needed = ("full_shape", "rngs", "bufs", "axes_of", "unrollable_dims", "apply_opt", "copy")
    if not all(hasattr(Scheduler, name) for name in needed) or not hasattr(worker, "_init_worker"):
        log.warning("tinygrad's kernel optimizer changed shape: GPU matrix-vector products keep its defaults")
        return False
    _default_heuristic = heuristic.hand_coded_optimizations
    heuristic.hand_coded_optimizations = _optimize  # apply_opts looks it up at every call
    if worker._init_worker is not _compile_worker_init:
        _default_worker_init = worker._init_worker
        worker._init_worker = _compile_worker_init  # a pool made from now on runs it in each process
        worker.terminate_worker_pool()  # a pool made before would lower kernels with the default options
    return True
