"""How tinygrad's CPU code computes the matmuls of the decoder: wider register tiles and vectors than its
defaults.

Prefill: tinygrad 0.14's heuristic gives a CPU matmul of a prompt chunk (T tokens x a row-blocked weight, see
decoder.CPU_ROW_BLOCK) a tile of 4 tokens x 4 weight rows with the reduction unrolled by 4. clang vectorizes
that across the 4 rows only, and each accumulator waits on a chain of 4 dependent multiply-adds: 45-60
GFLOP/s on 2 cores. A tile of 8 tokens x 8 rows (two row blocks) keeps 16 independent accumulators busy,
and for MLX-quantized weights the values of one packed word are unrolled whole, so each word is unpacked
once for 8 tokens: 85-110 GFLOP/s on the same matmuls, bf16 and 4/8-bit alike (bench/RESULTS.md).

Narrow weights: widening bf16 bits or unpacking MLX-quantized words bounds the kernels that read them. Such
weights are stored in blocks of 8 rows (decoder.CPU_NARROW_ROW_BLOCK), the 8 rows of a block are computed
together, and tinygrad is let to load 8 lanes at once in those kernels (its coalescer stops at 4 on CPUs), so
clang widens or unpacks 8 rows per AVX2 instruction instead of 4: a 4-bit or 8-bit matvec ~1.55x faster, a
quantized prefill matmul ~1.7x.

`enable()` wraps tinygrad's `hand_coded_optimizations` and its memory coalescing. Every other kernel
(attention included) gets tinygrad's own choices. tinygrad also lowers kernels in a pool of spawned compile
processes, so their initializer installs the same wrappers there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from math import prod
from typing import Any

import tinygrad.codegen
from tinygrad import dtypes
from tinygrad.codegen.late import coalesce
from tinygrad.codegen.opt import KernelOptError, Opt, OptOps, heuristic
from tinygrad.codegen.opt.postrange import Scheduler
from tinygrad.engine import worker
from tinygrad.uop.ops import AxisType, Ops, UOp

from cluster.engine.kernel_opts import axis_named, element_dtype, unit_stride, uses
from cluster.models.decoder import CPU_NARROW_ROW_BLOCK, CPU_ROW_BLOCK

log = logging.getLogger(__name__)

TOKEN_TILE = 8  # prompt rows per register tile
ROW_BLOCKS = 2  # row blocks (of CPU_ROW_BLOCK rows) per register tile
REDUCE_UNROLL = 2
WHOLE_UNROLL = 8  # a reduce axis this short (the values of one quantized word) is unrolled whole
# Shorter reductions gain nothing, and clang unrolls their short loops whole around the bigger tile, which
# made the warm-up of the tests' tiny models twice as long.
MIN_REDUCE = 256

_default_heuristic: Callable[[Scheduler], Scheduler] | None = None
_default_coalescing: Callable[[UOp, Any], UOp] | None = None
_default_worker_init: Callable[[], None] | None = None


def matmul_axes(k: Scheduler) -> tuple[int, int, int | None] | None:
    """(token axis, row-block axis, another weight axis or None) when the kernel `k` (before any options) is a
    CPU matmul of several prompt rows against a row-blocked weight; None for every other kernel."""
    if k.ren.has_local or k.reduceop is None or k.reduceop.arg[0] is not Ops.ADD:
        return None
    shape = k.full_shape
    if not all(isinstance(s, int) for s in shape):
        return None  # symbolic sizes: attention over the cached positions
    reduces = k.axes_of(AxisType.REDUCE)
    if not reduces or prod(shape[a] for a in reduces) < MIN_REDUCE:
        return None
    free = k.upcastable_dims
    for block in (a for a in free if shape[a] in (CPU_ROW_BLOCK, CPU_NARROW_ROW_BLOCK)):
        rng = k.rngs[block]
        for weight in (b for b in k.bufs if unit_stride(b, rng)):
            for token in (a for a in free if a != block and shape[a] % TOKEN_TILE == 0):
                if uses(weight, k.rngs[token]):
                    continue
                acts = [b for b in k.bufs if uses(b, k.rngs[token]) and not uses(b, rng)]
                if not any(uses(b, k.rngs[r]) for b in acts for r in reduces):
                    continue  # the token axis must index an input that is reduced against the weight
                others = [  # a second row block beside a block of 4 rows; a block of 8 fills the tile alone
                    a
                    for a in free
                    if shape[block] == CPU_ROW_BLOCK
                    and a not in (block, token)
                    and shape[a] % ROW_BLOCKS == 0
                    and uses(weight, k.rngs[a])
                    and not any(uses(b, k.rngs[a]) for b in acts)
                ]
                return token, block, max(others, key=lambda a: shape[a]) if others else None
    return None


def _narrow(dtype: Any) -> bool:
    """A buffer of a weight kept narrow: bf16 bits (uint16) or MLX-quantized words (uint32)."""
    return element_dtype(dtype) in (dtypes.uint16, dtypes.uint32)


def narrow_block_axis(k: Scheduler) -> int | None:
    """The axis of the 8 rows of a block of a narrow weight, when `k` (before any options) is a CPU kernel that
    reduces against one; None for every other kernel."""
    if k.ren.has_local or k.reduceop is None or not all(isinstance(s, int) for s in k.full_shape):
        return None
    for axis in (a for a in k.upcastable_dims if k.full_shape[a] == CPU_NARROW_ROW_BLOCK):
        if any(_narrow(b.src[0].dtype) and unit_stride(b, k.rngs[axis]) for b in k.bufs):
            return axis
    return None


def _optimize(k: Scheduler) -> Scheduler:
    """tinygrad's hand_coded_optimizations, with the wider tile for prefill matmuls."""
    assert _default_heuristic is not None
    axes = matmul_axes(k)
    if axes is None:
        return _whole_block(k, _default_heuristic(k))  # tinygrad's heuristic works on a copy of k
    token, block, other = axes
    names = {a: k.rngs[a].arg for a in (token, block, other) if a is not None}
    tiled = k.copy()
    try:
        tiled.apply_opt(Opt(OptOps.UPCAST, axis_named(tiled, names[block]), 0))
        tiled.apply_opt(Opt(OptOps.UPCAST, axis_named(tiled, names[token]), TOKEN_TILE))
        if other is not None:
            tiled.apply_opt(Opt(OptOps.UPCAST, axis_named(tiled, names[other]), ROW_BLOCKS))
        last = len(tiled.unrollable_dims) - 1
        size = tiled.full_shape[tiled.unrollable_dims[last]]
        if size <= WHOLE_UNROLL:
            tiled.apply_opt(Opt(OptOps.UNROLL, last, 0))
        elif size % REDUCE_UNROLL == 0:
            tiled.apply_opt(Opt(OptOps.UNROLL, last, REDUCE_UNROLL))
        _add_threads(tiled)
    except KernelOptError as e:
        log.debug("tinygrad's options for %s: %s", k.full_shape, e)
        return _default_heuristic(k)
    return tiled


def _whole_block(k: Scheduler, chosen: Scheduler) -> Scheduler:
    """tinygrad's options `chosen` for `k`, with the 8 rows of a narrow weight's block computed together where
    tinygrad computes 4 of them at once (its upcasts stop at 4)."""
    axis = narrow_block_axis(k)
    opts = list(chosen.applied_opts)
    split = Opt(OptOps.UPCAST, axis, CPU_ROW_BLOCK)
    if axis is None or split not in opts:
        return chosen
    whole = k.copy()
    try:
        for opt in opts:
            whole.apply_opt(Opt(OptOps.UPCAST, axis, CPU_NARROW_ROW_BLOCK) if opt == split else opt)
    except KernelOptError as e:
        log.debug("keeping tinygrad's options for %s: %s", k.full_shape, e)
        return chosen
    return whole


def _coalesce(sink: UOp, ren: Any) -> UOp:
    """tinygrad's memory coalescing, letting the kernels that read narrow weights load 8 lanes at once: it
    gives 8 lanes only to fp16 loads (ALLOW_HALF8), so for the length of the call its `getenv` says yes to
    that and its `dtypes.half` stands for each dtype it would give 4 lanes, and for bf16 bits. (tinygrad lowers
    kernels one at a time per process: on the main thread, or in its compile processes.)"""
    assert _default_coalescing is not None
    if ren.has_local or not any(u.op is Ops.PARAM and _narrow(u.dtype) for u in sink.toposort()):
        return _default_coalescing(sink, ren)
    names = _default_coalescing.__globals__
    real_dtypes, real_getenv = names["dtypes"], names["getenv"]
    names["dtypes"] = _EightLanes(real_dtypes)
    names["getenv"] = lambda key, default=0: 1 if key == "ALLOW_HALF8" else real_getenv(key, default)
    try:
        return _default_coalescing(sink, ren)
    finally:
        names["dtypes"], names["getenv"] = real_dtypes, real_getenv


class _AnyOf:
    """Equal to each of the given dtypes (stands in for `dtypes.half` in tinygrad's coalescing)."""

    def __init__(self, *choices: Any) -> None:
        self.choices = choices

    def __eq__(self, other: object) -> bool:
        return any(other == c for c in self.choices)

    def __hash__(self) -> int:
        return hash(self.choices)


class _EightLanes:
    """tinygrad's `dtypes` as its coalescing sees it while it may load 8 lanes."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.half = _AnyOf(real.float, real.half, real.int, real.uint, real.ushort)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _add_threads(k: Scheduler) -> None:
    """Split the kernel over the CPU cores the way tinygrad's heuristic does (about 128K operations a thread,
    on the first axis that the thread count divides)."""
    if not k.ren.has_threads or k.ren.global_max is None:
        return
    for threads in (32, 16, 12, 8, 6, 5, 4, 3, 2):
        if threads > k.ren.global_max[0] or prod(k.full_shape) // (128 << 10) < threads:
            continue
        axis = next((a for a in k.axes_of(AxisType.WEAK) if k.full_shape[a] % threads == 0), None)
        if axis is not None:
            k.apply_opt(Opt(OptOps.THREAD, axis, threads))
            return


def _compile_worker_init() -> None:
    """Initializer of tinygrad's compile processes: tinygrad's own, then the same options as here."""
    (_default_worker_init or worker._init_worker)()  # in a fresh compile process this is tinygrad's own
    enable()


def enable() -> bool:
    """Give CPU prefill matmuls the wider tile and narrow weights' kernels 8 rows per vector from now on, in this
    process and in the compile processes that tinygrad starts (idempotent). False where this tinygrad's
    optimizer is not the one this was written for: then nothing changes, and weights go in blocks of 4."""
    global _default_heuristic, _default_coalescing, _default_worker_init
    if _default_heuristic is not None:
        return True
    needed = ("full_shape", "rngs", "bufs", "axes_of", "upcastable_dims", "unrollable_dims", "apply_opt", "copy")
    coalescing = getattr(tinygrad.codegen, "memory_coalescing", None)
    if (
        not all(hasattr(Scheduler, name) for name in needed)
        or not hasattr(worker, "_init_worker")
        or coalescing is not coalesce.memory_coalescing
        or not {"dtypes", "getenv"} <= set(coalescing.__code__.co_names)
        or "ALLOW_HALF8" not in coalescing.__code__.co_consts
    ):
        log.warning("tinygrad's kernel optimizer changed shape: CPU matmuls keep tinygrad's default tiles")
        return False
    _default_heuristic = heuristic.hand_coded_optimizations
    heuristic.hand_coded_optimizations = _optimize  # apply_opts looks it up at every call
    _default_coalescing = coalescing
    tinygrad.codegen.memory_coalescing = _coalesce  # type: ignore[assignment]  # looked up at every call, too
    if worker._init_worker is not _compile_worker_init:
        _default_worker_init = worker._init_worker
        worker._init_worker = _compile_worker_init  # a pool made from now on runs it in each process
        worker.terminate_worker_pool()  # a pool made before would lower kernels with the default tiles
    return True
