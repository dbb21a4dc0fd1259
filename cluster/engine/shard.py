"""ShardEngine: layers [start, end) of a model with a KV cache per session, under TinyJit.

A few compiled graphs serve every call: one prefill graph per chunk size ("bucket", e.g. 16 and 64 tokens;
a prompt is covered by chunks, the last one padded) and a decode graph for one token, all at a symbolic
position and all writing the session's KV cache in place. Chunk shapes are fixed because tinygrad tiles a
matmul of known size ~10x better than one over a symbolic length; padded rows write cache slots past the
real end, which the next call overwrites before anything attends to them. Inputs are copied into
preallocated buffers, so nothing compiles after `warmup()`.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from tinygrad import Context, Device, GlobalCounters, Tensor, TinyJit, UOp, dtypes
from tinygrad.dtype import DType
from tinygrad.engine.jit import JitError
from tinygrad.helpers import DEV, NUM_CPU_THREADS
from tinygrad.nn.state import get_state_dict
from tinygrad.uop.ops import Ops

from cluster.engine import cpu_graph, cpu_matmul, cpu_quant, cpu_threads, gpu_matvec, graph_cache, launch_graph
from cluster.engine.buffers import copy_into, copy_out
from cluster.engine.jit_replay import Replayer
from cluster.engine.sampler import greedy, penalised_bias, sample
from cluster.models.config import ModelConfig
from cluster.models.decoder import (
    ATTN_BLOCK,
    ATTN_BLOCKS_VAR,
    CPU_NARROW_ROW_BLOCK,
    CPU_ROW_BLOCK,
    ShardModel,
    attention_mask,
    attention_span,
    blocks_past_first,
    cpu_codegen,
    load_shard,
    rope_tables,
    span_of,
)
from cluster.sampling import SamplingParams, top_logprobs
from cluster.weights import Checkpoint

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class EngineError(RuntimeError):
    """A request the engine cannot serve (unknown session, bad shape, context full, ...)."""


class ContextFullError(EngineError):
    pass


@dataclass
class StepResult:
    """What one forward call returns: hidden states for the next shard, or the sampled token."""

    hidden: np.ndarray | None = None  # (T, D) from a non-last shard
    token: int | None = None  # from the last shard
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)
    engine_ms: float = 0.0  # the engine's own time for the step (inputs in, kernels, outputs out)
    times: list[ShardTime] = field(default_factory=list)  # set by generation.step: every shard's share


@dataclass
class ShardTime:
    """One shard's share of a step as its coordinator saw it: the engine's own time, and the wait for its answer
    (the engine plus the hand-off to its process and, for another node's shard, the network both ways)."""

    node: str  # the node's name; "local" for an engine of the calling process
    start: int
    end: int
    engine_ms: float
    wait_ms: float


def decode_stepwise(
    step: Callable[[int], StepResult], token: int, steps: int, stop_ids: Sequence[int] = ()
) -> Iterator[StepResult]:
    """Up to `steps` results of `step`, one call a token, each call's input the token sampled by the one before it;
    ends after a token in `stop_ids`. The loop of every decode that is not queued on a device."""
    stops = frozenset(int(i) for i in stop_ids)
    for _ in range(steps):
        result = step(token)
        yield result
        assert result.token is not None
        token = result.token
        if token in stops:
            return


def _one_hot(sampled: Tensor, like: Tensor) -> Tensor:
    """(V,) float32: 1 at the id of a sampler's (token, logprob) output, 0 elsewhere; `like` gives V and the device."""
    ids = Tensor.arange(like.shape[0], dtype=dtypes.int32).to(like.device)
    return (ids == sampled[0:1].cast(dtypes.int32)).float()


@dataclass
class _Session:
    id: str
    cache: list[Tensor]  # per layer (2, 1, n_kv, max_len, head_dim); separate buffers keep layers independent
    length: int = 0
    seed: int | None = None  # the uniform for the token at position p is drawn from (seed, p)
    seen: Tensor | None = None  # (V,) for the repetition penalty
    seen_host: np.ndarray | None = None
    counts: np.ndarray | None = None  # (V,) how often each id was generated in this answer (OpenAI's penalties)


def default_device() -> str:
    """tinygrad's default device, unless that is an OpenCL device that is the CPU itself (pocl, Intel's CPU
    runtime): tinygrad prefers OpenCL over its own CPU backend, which runs this engine's CPU kernels much faster.
    A device named in $DEV (as tinygrad read it at import; tinygrad writes its own pick there too, for children)
    is taken as it is. Where the pick is overruled, $DEV says so too: processes started from this one (engine
    processes, nodes a script starts) took tinygrad's OpenCL pick for a user's choice and computed on pocl, 6x
    slower on the tiny bench model."""
    device = Device.DEFAULT
    if not DEV.device and device.split(":")[0] == "CL" and _opencl_device_is_cpu(device):
        log.info("the OpenCL device is the CPU; using tinygrad's CPU backend (DEV=CL to use OpenCL anyway)")
        os.environ["DEV"] = "CPU"
        return "CPU"
    return device


def _opencl_device_is_cpu(device: str) -> bool:
    try:
        import ctypes

        import tinygrad.runtime.autogen.opencl as cl

        kind = ctypes.c_uint64()
        err = cl.clGetDeviceInfo(Device[device].cl_dev, cl.CL_DEVICE_TYPE, 8, ctypes.byref(kind), None)  # type: ignore[attr-defined]
        return err == 0 and bool(kind.value & cl.CL_DEVICE_TYPE_CPU)
    except Exception:  # noqa: BLE001 - cannot tell: keep tinygrad's choice
        return False


def default_dtype(device: str) -> DType:
    # fp16 math is slower than fp32 on CPUs; accelerators want half precision
    return dtypes.float32 if device.split(":")[0] in ("CPU", "CLANG", "LLVM", "PYTHON") else dtypes.float16


def default_prefill_buckets(device: str) -> tuple[int, ...]:
    """Prompt chunk sizes a shard compiles unless told: 16 and 64, and 512 as well on NVIDIA GPUs, where a 512-token
    prompt's first token came in 41 ms instead of 116 ms on an H200 at no cost in warm-up (bench/RESULTS.md). On a
    slow CPU each size costs seconds of warm-up, and a chunk of 512 no time to first token."""
    return (16, 64, 512) if device.split(":")[0] in ("CUDA", "NV") else (16, 64)


# Decode steps a whole-model engine queues on its device before it reads their tokens: each step's sampled token is
# fed to the next step's input on the device (`_feed`), so the host prepares step t+1 while an accelerator runs step
# t, instead of the device idling through each step's hand-over (0.3-0.9 ms of a 1.6 ms step on an H200,
# bench/RESULTS.md); on CPUs it saves each step's copies and checks. A stop token is read up to a queue late and the
# steps queued after it are wasted, so a queue holds at most QUEUE_S of steps (one step of a slow model).
DECODE_CHAIN = 8
QUEUE_S = 0.02


def decode_chain() -> int:
    """The longest queue of decode steps (CLUSTERCTL_DECODE_CHAIN, 0 to DECODE_CHAIN; 0: every step read before
    the next is run). Default DECODE_CHAIN."""
    value = os.environ.get("CLUSTERCTL_DECODE_CHAIN", "")
    if not value:
        return DECODE_CHAIN
    if not value.isdigit() or int(value) > DECODE_CHAIN:
        raise ValueError(f"CLUSTERCTL_DECODE_CHAIN must be a whole number of steps from 0 to {DECODE_CHAIN}")
    return int(value)


def dtype_name(dtype: DType) -> str:
    return {dtypes.float32: "float32", dtypes.float16: "float16", dtypes.bfloat16: "bfloat16"}.get(dtype, dtype.name)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def session_capacity(budget: int | None, weight_bytes: int, kv_bytes: int, max_sessions: int) -> int:
    """How many sessions may be open at once: max_sessions, or fewer when only that many KV caches fit in the
    budget beside the weights. At least one (the load check made sure one fits). Each session allocates its
    whole cache when it opens, so without this limit concurrent requests on a node loaded near its memory
    limit would run it out of memory; with it, they wait for a turn."""
    if budget is None or kv_bytes <= 0:
        return max_sessions
    return max(1, min(max_sessions, (budget - weight_bytes) // kv_bytes))


def uses_graphs(jit: Any) -> bool:
    """Whether a captured TinyJit replays batches of kernels as one device graph (CUDA graph, Metal ICB, ...)."""
    captured = jit.captured
    return captured is not None and any(
        call.src[0].op is Ops.CUSTOM_FUNCTION and call.src[0].arg == "graph" for call in captured.linear.src
    )


class ShardEngine:
    def __init__(
        self,
        model_dir: str | Path,
        start_layer: int = 0,
        end_layer: int | None = None,
        *,
        device: str | None = None,
        dtype: DType | str | None = None,
        max_context: int = 4096,
        prefill_buckets: Sequence[int] | None = None,
        max_sessions: int = 8,
        memory_budget: int | None = None,
        progress: Progress | None = None,
    ):
        """memory_budget: bytes this shard may use for its weights and the KV caches of its sessions; default on
        CPU devices: the memory the OS reports available (accelerators report no budget to tinygrad). With a
        budget, max_sessions is lowered to the sessions whose KV caches fit beside the weights."""
        self.model_dir = Path(model_dir)
        self.cfg = ModelConfig.from_dir(self.model_dir)
        self.device = device or default_device()
        self.dtype: DType = getattr(dtypes, dtype) if isinstance(dtype, str) else dtype or default_dtype(self.device)
        self.on_cpu = self.device.split(":")[0] == "CPU"  # tinygrad's CPU device, whichever renderer
        # blocks of 8 rows pay only with cpu_matmul's options; tinygrad alone computes 4 rows at once
        narrow_block = CPU_ROW_BLOCK
        # the environment's switches, read once: what is read here is what the graph files' key holds
        self._env = graph_cache.engine_env()
        chain = decode_chain()  # checked before the weights load
        # replays of a device tinygrad has no graph for (CPU, OpenCL) through ours; 0: its executor, for comparison
        replay_graph = self._env["CLUSTERCTL_REPLAY_GRAPH"] != "0"
        if self.on_cpu:
            cpu_threads.enable()
            if replay_graph:
                cpu_graph.enable()
            if cpu_matmul.enable():
                narrow_block = CPU_NARROW_ROW_BLOCK
                cpu_quant.enable(self.device)  # reads the blocks of 8 rows that cpu_matmul's layout gives
        else:
            if self._env["CLUSTERCTL_GPU_MATVEC"] != "0":  # 0: tinygrad's own options, for comparison
                gpu_matvec.enable()
            if replay_graph and self.device.split(":")[0] == "CL":
                launch_graph.enable(self.device)
            # tinygrad's own CUDA graph re-sends every node that takes an input or a variable at each replay
            if self.device.split(":")[0] == "CUDA" and self._env["CLUSTERCTL_CUDA_GRAPH"] != "tinygrad":
                from cluster.engine import cuda_graph  # loads tinygrad's CUDA bindings: only on CUDA

                cuda_graph.enable(self.device)
        end = self.cfg.num_layers if end_layer is None else end_layer
        self.max_context = min(max_context, self.cfg.max_position_embeddings)
        if prefill_buckets is None:
            prefill_buckets = default_prefill_buckets(self.device)
        self.buckets = tuple(sorted(set(prefill_buckets)))
        if not self.buckets or self.buckets[0] < 2:
            raise ValueError(f"prefill_buckets must be chunk sizes >= 2, got {prefill_buckets!r}")
        self.chunk = self.buckets[-1]
        self.positions = attention_span(self.max_context + self.chunk)  # KV cache length: whole blocks
        self._progress = progress or (lambda stage, done, total: None)
        checkpoint = Checkpoint(self.model_dir)
        self.model: ShardModel = load_shard(
            self.cfg, checkpoint, start_layer, end, self.device, self.dtype, narrow_block
        )
        weight_bytes, kv_bytes = checkpoint.pending_bytes(), self.kv_bytes_per_session()
        budget = self._check_fits(weight_bytes, kv_bytes, memory_budget)
        self.max_sessions = session_capacity(budget, weight_bytes, kv_bytes, max_sessions)
        if self.max_sessions < max_sessions:
            log.info(
                "layers [%d, %d): memory for the KV caches of %d of %d sessions (%s each); more requests wait",
                self.model.start,
                self.model.end,
                self.max_sessions,
                max_sessions,
                _size(kv_bytes),
            )
        checkpoint.materialize(lambda done, total: self._progress("load", done, total))
        self.start, self.end = self.model.start, self.model.end
        self.is_first, self.is_last = self.model.is_first, self.model.is_last

        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.rope, self.max_context + self.chunk)
        self.cos = Tensor(cos, device=self.device).cast(self.dtype).contiguous().realize()
        self.sin = Tensor(sin, device=self.device).cast(self.dtype).contiguous().realize()
        self.position_ids = Tensor(np.arange(self.positions, dtype=np.int32), device=self.device).contiguous().realize()
        D, V = self.cfg.hidden_size, self.cfg.vocab_size
        # preallocated inputs/outputs: host data is copied in and out, so every call reuses the same graphs
        # one input buffer per graph, sized to it, so a decode step copies one row, not a whole chunk
        row = () if self.is_first else (D,)
        in_dtype = dtypes.int32 if self.is_first else self.dtype
        self.inputs = {
            rows: Tensor.zeros(1, rows, *row, dtype=in_dtype, device=self.device).contiguous().realize()
            for rows in (1, *self.buckets)
        }
        self.out_hidden = Tensor.zeros(1, self.chunk, D, dtype=self.dtype, device=self.device).contiguous().realize()
        self.sample_params = Tensor.zeros(5, device=self.device).contiguous().realize()
        self.uniform = Tensor.zeros(1, device=self.device).contiguous().realize()
        self.no_seen = Tensor.zeros(V, device=self.device).contiguous().realize()
        self.no_bias = Tensor.zeros(V, device=self.device).contiguous().realize()
        # a biased step's logit_bias, its session's counts of generated ids, (presence, frequency), and the bias they
        # make (_bias: one graph for both decode paths, so a queued decode counts on the device as a step's does)
        self.logit_bias = Tensor.zeros(V, device=self.device).contiguous().realize()
        self.counts = Tensor.zeros(V, device=self.device).contiguous().realize()
        self.penalties = Tensor.zeros(2, device=self.device).contiguous().realize()
        self.bias = Tensor.zeros(V, device=self.device).contiguous().realize()
        self.all_allowed = Tensor.ones(V, device=self.device).contiguous().realize()
        self.allowed = Tensor.ones(V, device=self.device).contiguous().realize()  # a constrained step's ids
        self.v_pos = UOp.variable("start_pos", 0, self.max_context - 1)
        self.v_last = UOp.variable("last_row", 0, self.chunk - 1)
        self.v_blocks = UOp.variable(ATTN_BLOCKS_VAR, 0, self.positions // ATTN_BLOCK - 1)  # span_of(v_blocks)
        self._prefill_jits = {b: TinyJit(self._forward) for b in self.buckets}
        self._decode_jit = TinyJit(self._forward)
        self._greedy_jit = TinyJit(greedy)
        self._sample_jit = TinyJit(sample)
        self._bias_jit = TinyJit(self._bias)
        # a whole model's queued decode steps (decode_chain): each writes its (token, logprob) to a slot
        self.chain = chain if self.is_first and self.is_last else 0
        self.step_s = QUEUE_S  # a queued decode step's time, as last measured: a first queue holds one step
        self.chained = Tensor.zeros(DECODE_CHAIN, 2, device=self.device).contiguous().realize()
        self.unread_marks = Tensor.zeros(V, device=self.device).contiguous().realize()  # queued steps without penalty
        self.v_slot = UOp.variable("chain_slot", 0, DECODE_CHAIN - 1)
        self._feed_jit = TinyJit(self._feed)
        self._count_jit = TinyJit(self._count_sampled)
        samplers = (self._greedy_jit, self._sample_jit, self._bias_jit, self._feed_jit, self._count_jit)
        for jit in (*self._prefill_jits.values(), self._decode_jit, *samplers):
            # capture on the first call: every input is realized up front, so TinyJit's eager first run
            # would only schedule and compile the same kernels once more
            jit.cnt = 1
        # False once a device graph failed: from then on every JIT is captured as plain kernel launches
        self.jit_graphs = True
        self._replay = Replayer()
        self.sessions: dict[str, _Session] = {}
        self.ready = False
        self.warmup_s: float | None = None
        self.graphs_from_cache = False  # whether warm-up read its graphs from graph_cache's files

    # ------------------------------------------------------------------------------------ loading
    def kv_bytes_per_session(self) -> int:
        cfg = self.cfg
        return len(self.model.blocks) * 2 * cfg.num_kv_heads * self.positions * cfg.head_dim * self.dtype.itemsize

    def _check_fits(self, weight_bytes: int, kv_bytes: int, budget: int | None) -> int | None:
        """Fail before loading, with the numbers, rather than being killed by the OOM killer halfway.
        Returns the budget it checked against (None: unknown, on an accelerator with no budget given)."""
        if budget is None and self.on_cpu:
            budget = psutil.virtual_memory().available
        if budget is None:
            return None
        needed = weight_bytes + kv_bytes
        if needed > budget:
            raise EngineError(
                f"layers [{self.model.start}, {self.model.end}) of {self.model_dir.name} need {_size(needed)} "
                f"({_size(weight_bytes)} of weights computed in {dtype_name(self.dtype)}, plus the KV cache of "
                f"one session at {self.max_context} positions), but only {_size(budget)} is available; use "
                "fewer layers per node, a quantized model or a smaller --max-context"
            )
        return budget

    @property
    def weight_bytes(self) -> int:
        return self.model.weight_bytes

    def memory_used(self) -> int:
        """Device bytes tinygrad holds in this process: weights, graphs' buffers and every session's KV cache."""
        return int(GlobalCounters.mem_used)

    @property
    def layers(self) -> tuple[int, int]:
        """[start, end): the layers this shard holds."""
        return self.start, self.end

    @property
    def pipeline_chunk_size(self) -> int:
        """The prompt chunk a pipelined prefill (generation.step) should hand this engine. On CPU in float32 the
        smallest chunk size it compiled: a token costs the same in every size there and comes out the same to the
        bit (not so in float16), so small chunks overlap the shards most. Elsewhere the biggest, whose multiples
        run as the same graphs as the whole prompt (and a GPU's tensor cores want long chunks: 41 against 116 ms for
        a 512-token prompt on an H200)."""
        return self.buckets[0] if self.on_cpu and self.dtype == dtypes.float32 else self.chunk

    def info(self) -> dict[str, object]:
        """What a caller needs to drive this shard (plain values, so it crosses process boundaries)."""
        return {
            "architecture": self.cfg.architecture,
            "layers": [self.start, self.end],
            "num_layers": self.cfg.num_layers,
            "hidden_size": self.cfg.hidden_size,
            "vocab_size": self.cfg.vocab_size,
            "max_context": self.max_context,
            "device": self.device,
            "dtype": dtype_name(self.dtype),
            "weight_bytes": self.weight_bytes,
            "kv_bytes_per_session": self.kv_bytes_per_session(),
            "max_sessions": self.max_sessions,
            "pipeline_chunk": self.pipeline_chunk_size,
            "quantized": self.cfg.quantization is not None,
            "cpu_threads": NUM_CPU_THREADS.value if self.on_cpu else None,
            "ready": self.ready,
            "warmup_s": self.warmup_s,
            "graphs_from_cache": self.graphs_from_cache,
        }

    # ------------------------------------------------------------------------------------ graphs
    def _forward(
        self, x: Tensor, cache: list[Tensor], start_pos: int | UOp, blocks: int | UOp, last_row: int | UOp = 0
    ) -> Tensor:
        T = x.shape[1]
        h = self.model.embed_tokens(x) if self.is_first else x  # (1, T, D)
        cos, sin = self.cos[start_pos : start_pos + T], self.sin[start_pos : start_pos + T]
        mask = attention_mask(self.position_ids, start_pos, T, span_of(blocks), self.dtype)
        if T == 1 and not cpu_codegen(self.device):
            # a CUDA graph re-sends every kernel that takes start_pos to the driver at each replay: made once here,
            # the rotations and masks of every layer read buffers, and per layer only the KV-cache write takes it
            cos, sin, mask = cos.contiguous(), sin.contiguous(), mask.contiguous()
        for i, block in enumerate(self.model.blocks):
            h = block(h, cache[i], start_pos, mask, cos, sin)
        if self.is_last:
            assert self.model.norm is not None and self.model.lm_head is not None
            last = h[:, last_row : last_row + 1]  # only the last real position's logits are needed
            return self.model.lm_head(self.model.norm(last)).reshape(1, -1).float().realize()  # (1, V)
        self.out_hidden[:, 0:T].assign(h)
        return self.out_hidden.realize()

    def _feed(self, sampled: Tensor, slot: UOp, marks: Tensor) -> Tensor:
        """A queued decode step's last kernels: its sampled (token, logprob) kept in slot `slot` of `chained`, the
        token written to the next step's input, and marked in `marks` (the session's repetition-penalty marks, which
        cover every input so far), on the device."""
        self.inputs[1].assign(sampled[0:1].cast(dtypes.int32).reshape(1, 1))
        self.chained[slot : slot + 1].assign(sampled.reshape(1, 2))
        marks.assign(marks.maximum(_one_hot(sampled, marks)))
        Tensor.realize(self.inputs[1], self.chained, marks)
        return self.chained

    def _count_sampled(self, sampled: Tensor, counts: Tensor) -> Tensor:
        """A queued biased step's sampled token counted as generated, on the device, for the next step's bias."""
        counts.assign(counts + _one_hot(sampled, counts))
        return counts.realize()

    def _bias(self, base: Tensor, counts: Tensor, penalties: Tensor) -> Tensor:
        self.bias.assign(penalised_bias(base, counts, penalties))
        return self.bias.realize()

    def _load_bias(self, s: _Session, params: SamplingParams) -> None:
        """A biased step's inputs copied in: its logit_bias, penalties and the session's counts (the engine's
        buffers: other sessions' steps may have run since)."""
        V = self.cfg.vocab_size
        if any(i >= V for i, _ in params.logit_bias):
            raise EngineError(f"logit_bias names ids past the vocabulary of {V}")
        copy_into(self.logit_bias, params.logit_bias_array(V))
        copy_into(self.penalties, params.penalties_array())
        copy_into(self.counts, s.counts if s.counts is not None else np.zeros(V, np.float32))

    def _no_graphs(self) -> AbstractContextManager[Any]:
        # JIT=2: TinyJit captures kernels without batching them into device graphs
        return nullcontext() if self.jit_graphs else Context(JIT=2)

    def _call_jit(self, jit: Any, *args: Any) -> Any:
        """Call a JIT. When its device graph fails (tinygrad 0.14's CUDA graph rejected kernels in
        cuGraphAddKernelNode), capture it again without graphs and go on: slower launches, same results.
        Retrying is safe: a step only rewrites the same cache slots and output buffers from the same inputs."""
        try:
            with self._no_graphs():
                return self._replay(jit, *args)
        except JitError:
            raise  # inputs that do not fit the captured graph (a stale cached one): no fault of the device's
        except Exception as e:
            if not uses_graphs(jit):
                raise
            if self.jit_graphs:
                why = f"{type(e).__name__}: {e}"
                log.warning("device graph failed on %s (%s); running kernels without graphs", self.device, why)
                self.jit_graphs = False
            self._reset_jit(jit)
            with self._no_graphs():
                return self._replay(jit, *args)

    def _plan(self, n: int) -> list[tuple[int, int]]:
        """Cover n positions with (real rows, bucket) chunks: big buckets first, then the smallest bucket
        that holds the rest when that wastes less than one small chunk, else the biggest that fits."""
        plan, small = [], self.buckets[0]
        while n > 0:
            fits = [b for b in self.buckets if b <= n]
            holds = [b for b in self.buckets if b >= n]
            b = holds[0] if holds and (holds[0] - n < small or not fits) else fits[-1]
            plan.append((min(n, b), b))
            n -= min(n, b)
        return plan

    def _run_chunk(self, session: _Session, x: np.ndarray, bucket: int) -> Tensor:
        n = x.shape[0]
        rows = 1 if n == 1 else bucket
        padded = np.zeros((rows, *x.shape[1:]), dtype=x.dtype)  # padding rows: id 0 / zeros, never attended
        padded[:n] = x
        buf = self.inputs[rows]
        copy_into(buf, padded[None])
        pos = self.v_pos.bind(session.length)
        blocks = self.v_blocks.bind(blocks_past_first(session.length + rows))
        if n == 1:
            out = self._call_jit(self._decode_jit, buf, session.cache, pos, blocks)
        else:
            out = self._call_jit(self._prefill_jits[bucket], buf, session.cache, pos, blocks, self.v_last.bind(n - 1))
        session.length += n
        return out

    # ------------------------------------------------------------------------------------ sessions
    def new_session(self, session_id: str | None = None, sampling: SamplingParams | None = None) -> str:
        sid = session_id or uuid.uuid4().hex
        if sid in self.sessions:
            raise EngineError(f"session {sid!r} already exists")
        if len(self.sessions) >= self.max_sessions:
            raise EngineError(f"too many sessions ({self.max_sessions}); end one first")
        cfg = self.cfg
        shape = (2, 1, cfg.num_kv_heads, self.positions, cfg.head_dim)
        cache = [
            Tensor.zeros(*shape, dtype=self.dtype, device=self.device).contiguous().realize() for _ in self.model.blocks
        ]
        self.sessions[sid] = _Session(sid, cache)
        if sampling is not None:
            self.configure_sampling(sid, sampling)
        return sid

    def configure_sampling(self, session_id: str, sampling: SamplingParams) -> None:
        s = self._session(session_id)
        # unseeded sessions get a random seed of their own; any int seed (negative too) maps into SeedSequence's range
        s.seed = (secrets.randbits(64) if sampling.seed is None else sampling.seed) % 2**64
        if sampling.repetition_penalty != 1.0 and s.seen is None:
            s.seen_host = np.zeros(self.cfg.vocab_size, dtype=np.float32)
            s.seen = Tensor(s.seen_host, device=self.device).contiguous().realize()

    def truncate(self, session_id: str, length: int) -> None:
        """Forget positions >= length (cached K/V past the end stay until overwritten; attention masks them).
        The repetition-penalty marks are cleared: the next forward passes every id it should cover."""
        s = self._session(session_id)
        if not 0 <= length <= s.length:
            raise EngineError(f"session {session_id!r} holds {s.length} positions; cannot keep {length}")
        s.length = length
        if s.seen is not None and s.seen_host is not None:
            s.seen_host[:] = 0
            copy_into(s.seen, s.seen_host)
        s.counts = None  # a new answer: nothing generated in it yet

    def end_session(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)  # dropping the tensors frees the cache buffers

    def _session(self, session_id: str) -> _Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise EngineError(f"unknown session {session_id!r}") from None

    # ------------------------------------------------------------------------------------ stepping
    def forward(
        self,
        session_id: str,
        inputs: np.ndarray | Sequence[int],
        *,
        sampling: SamplingParams | None = None,
        token_ids: Sequence[int] | None = None,
        logprobs: int = 0,
        allowed: bytes | None = None,
        generated: Sequence[int] = (),
    ) -> StepResult:
        """Run `inputs` (token ids on the first shard, hidden states (T, D) otherwise) at the session's
        current position. The last shard samples one token from the final position's logits.

        token_ids: the ids of the positions processed, for the repetition penalty on the last shard
        (the first shard knows them already).
        allowed: the only ids the last shard may sample, one bit each (id i is bit i % 8 of byte i // 8), for
        constrained decoding; None allows every id.
        generated: the ids among `inputs` that this answer generated (OpenAI's presence and frequency penalties
        count them; a session replayed after a lost node passes all of them at once).
        """
        t0 = time.perf_counter()
        s = self._session(session_id)
        x = self._check_inputs(inputs)
        mask = self._check_allowed(allowed) if allowed is not None and self.is_last else None
        n = x.shape[0]
        if s.length + n > self.max_context:
            raise ContextFullError(
                f"session {session_id!r}: {s.length} + {n} positions exceed the context of {self.max_context}"
            )
        out: Tensor | None = None
        hidden: list[np.ndarray] = []
        i = 0
        for rows, bucket in self._plan(n):
            out = self._run_chunk(s, x[i : i + rows], bucket)
            if not self.is_last:
                hidden.append(copy_out(out, rows * self.cfg.hidden_size).reshape(rows, -1))  # (rows, D)
            i += rows
        if not self.is_last:
            result = StepResult(hidden=np.concatenate(hidden))
        else:
            assert out is not None
            ids = list(token_ids) if token_ids is not None else (list(x) if self.is_first else [])
            params = sampling or SamplingParams()
            if params.biased and len(generated):
                self._count(s, generated)
            result = self._sample(s, out, params, ids, logprobs, mask)
        result.engine_ms = 1e3 * (time.perf_counter() - t0)
        return result

    def decode(
        self,
        session_id: str,
        token: int,
        steps: int,
        *,
        sampling: SamplingParams | None = None,
        logprobs: int = 0,
        stop_ids: Sequence[int] = (),
    ) -> Iterator[StepResult]:
        """Decode up to `steps` tokens after `token`, each step's input the token sampled before it, and yield each
        step's result as `forward` would return it for that input (every input counts as generated, as a decode
        step's does). Ends early after a token in `stop_ids`. Only a shard with the whole model (first and last)
        decodes alone; in an engine process (Runner.stream) it runs without waiting for its caller between steps."""
        if not (self.is_first and self.is_last):
            raise EngineError(f"layers [{self.start}, {self.end}) are not the whole model: decode step by step")
        params = sampling or SamplingParams()
        # what the device alone can carry from step to step: no logprobs to read
        if self.chain and logprobs == 0:
            stops = frozenset(int(i) for i in stop_ids)
            yield from self._decode_chained(self._session(session_id), token, steps, params, stops)
            return

        def one(token: int) -> StepResult:
            return self.forward(
                session_id, [token], sampling=sampling, token_ids=[token], logprobs=logprobs, generated=[token]
            )

        yield from decode_stepwise(one, token, steps, stop_ids)

    def _decode_chained(
        self, s: _Session, token: int, steps: int, params: SamplingParams, stops: frozenset[int]
    ) -> Iterator[StepResult]:
        """decode's steps queued up to `self.chain` at a time (QUEUE_S of them), each step's input fed from the one
        before it on the device; the same tokens as one `forward` a step (the same graphs, the same draw for each
        position)."""
        self._check_inputs([token])
        if not params.greedy and (s.seed is None or (params.repetition_penalty != 1.0 and s.seen is None)):
            self.configure_sampling(s.id, params)
        marking = not params.greedy and s.seen is not None and s.seen_host is not None
        if params.biased:  # the first input counts as generated; each later one is counted by the step before it
            self._count(s, [token])
        done = 0
        while done < steps:
            queue = max(1, min(self.chain, int(QUEUE_S / self.step_s)))
            n = min(queue, steps - done, self.max_context - s.length)
            if n <= 0:
                raise ContextFullError(
                    f"session {s.id!r}: {s.length} + 1 positions exceed the context of {self.max_context}"
                )
            t0 = time.perf_counter()
            # the input and sampling buffers are the engine's, not the session's: other sessions' steps may have
            # run since this one's last queue (an engine process serves them between a stream's results)
            copy_into(self.inputs[1], np.array([[token]], dtype=np.int32))
            if not params.greedy:
                copy_into(self.sample_params, params.as_array())
            bias = self.no_bias
            if params.biased:
                self._load_bias(s, params)
            marks = self.unread_marks
            if marking:  # the queue's first input marked here, each later one by the step before it (_feed)
                assert s.seen is not None and s.seen_host is not None
                s.seen_host[token] = 1.0
                copy_into(s.seen, s.seen_host)
                marks = s.seen
            for slot in range(n):
                pos, blocks = self.v_pos.bind(s.length), self.v_blocks.bind(blocks_past_first(s.length + 1))
                logits = self._call_jit(self._decode_jit, self.inputs[1], s.cache, pos, blocks)
                s.length += 1
                if params.greedy:
                    sampled = self._call_jit(self._greedy_jit, logits)
                else:  # the draw _sample makes for this position, copied in behind the steps already queued
                    assert s.seed is not None
                    draw = np.random.default_rng([s.seed, s.length]).random()
                    copy_into(self.uniform, np.array([draw], dtype=np.float32))
                    seen = marks if marking else self.no_seen
                    if params.biased:
                        bias = self._call_jit(self._bias_jit, self.logit_bias, self.counts, self.penalties)
                    args = (self.sample_params, self.uniform, seen, bias, self.all_allowed)
                    sampled = self._call_jit(self._sample_jit, logits, *args)
                self._call_jit(self._feed_jit, sampled, self.v_slot.bind(slot), marks)
                if params.biased:
                    self._call_jit(self._count_jit, sampled, self.counts)
            values = copy_out(self.chained, 2 * n).reshape(n, 2)  # waits for the n steps queued
            if marking:  # the host's copy of the marks, as the device made them
                assert s.seen_host is not None
                s.seen_host[values[:, 0].astype(np.int64)] = 1.0
            if params.biased:  # and of the counts
                self._count(s, values[:, 0].astype(np.int64))
            self.step_s = (time.perf_counter() - t0) / n
            engine_ms = 1e3 * self.step_s
            for sampled_id, logprob in values.tolist():
                done, token = done + 1, int(sampled_id)
                yield StepResult(token=token, logprob=float(logprob), engine_ms=engine_ms)
                if token in stops:
                    return

    def _check_inputs(self, inputs: np.ndarray | Sequence[int]) -> np.ndarray:
        if self.is_first:
            x = np.asarray(inputs)
            if x.ndim != 1 or x.size == 0 or not np.issubdtype(x.dtype, np.integer):
                raise EngineError(f"first shard takes a non-empty 1-D array of token ids, got {x.dtype} {x.shape}")
            if x.min() < 0 or x.max() >= self.cfg.vocab_size:
                raise EngineError(f"token id out of range [0, {self.cfg.vocab_size})")
            return x.astype(np.int32)
        x = np.asarray(inputs)
        D = self.cfg.hidden_size
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != D or not np.issubdtype(x.dtype, np.floating):
            raise EngineError(f"shard {self.start} takes hidden states of shape (T, {D}), got {x.dtype} {x.shape}")
        if not np.isfinite(x).all():
            raise EngineError("hidden states contain NaN or Inf")
        return x.astype(np.float16 if self.dtype == dtypes.float16 else np.float32)

    def _count(self, s: _Session, generated: Sequence[int] | np.ndarray) -> None:
        V = self.cfg.vocab_size
        ids = np.asarray(generated, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= V:
            raise EngineError(f"generated ids out of range [0, {V})")
        if s.counts is None:
            s.counts = np.zeros(V, dtype=np.float32)
        np.add.at(s.counts, ids, 1.0)

    def _check_allowed(self, allowed: bytes) -> np.ndarray:
        """The bitmask of allowed ids as (V,) float32 0/1."""
        V = self.cfg.vocab_size
        if len(allowed) != -(-V // 8):
            raise EngineError(f"the allowed ids take {-(-V // 8)} bytes (one bit per id of {V}), got {len(allowed)}")
        mask = np.unpackbits(np.frombuffer(allowed, dtype=np.uint8), bitorder="little")[:V].astype(np.float32)
        if not mask.any():
            raise EngineError("the allowed ids allow no id")
        return mask

    def _sample(
        self,
        s: _Session,
        logits: Tensor,
        params: SamplingParams,
        ids: list[int],
        logprobs: int,
        mask: np.ndarray | None = None,
    ) -> StepResult:
        top = top_logprobs(copy_out(logits)[None], logprobs) if logprobs > 0 else []
        if params.greedy and mask is None:
            token, logprob = copy_out(self._call_jit(self._greedy_jit, logits)).tolist()
        else:
            if s.seed is None or (params.repetition_penalty != 1.0 and s.seen is None):
                self.configure_sampling(s.id, params)
            seen = self.no_seen
            if s.seen is not None and s.seen_host is not None:
                if ids:
                    s.seen_host[np.asarray(ids, dtype=np.int64)] = 1.0
                    copy_into(s.seen, s.seen_host)
                seen = s.seen
            assert s.seed is not None
            copy_into(self.sample_params, params.as_array())
            # a draw per position, not per call: a session rebuilt by replaying its tokens (after a node was
            # lost) draws exactly what the uninterrupted one would have
            draw = np.random.default_rng([s.seed, s.length]).random()
            copy_into(self.uniform, np.array([draw], dtype=np.float32))
            allowed, bias = self.all_allowed, self.no_bias
            if mask is not None:
                copy_into(self.allowed, mask)
                allowed = self.allowed
            if params.biased:
                self._load_bias(s, params)
                bias = self._call_jit(self._bias_jit, self.logit_bias, self.counts, self.penalties)
            token, logprob = copy_out(
                self._call_jit(self._sample_jit, logits, self.sample_params, self.uniform, seen, bias, allowed)
            ).tolist()
        return StepResult(token=int(token), logprob=float(logprob), top=top)

    # ------------------------------------------------------------------------------------ warm-up
    def warmup(self) -> None:
        """Compile every graph (prefill, decode, both samplers) before the engine reports ready. Graphs a
        previous start of the same shard captured are read from graph_cache's files instead, and checked by
        the same warm-up calls; if they fail there, they are captured anew."""
        t0 = time.perf_counter()
        path, tensors = self._graph_file()
        cached = graph_cache.load(path, tensors) if path is not None else None
        loaded = cached is not None and self._install_graphs(cached)
        total = 0
        if loaded:
            try:
                total = self._warm_calls(cached=True)
            except Exception as e:  # noqa: BLE001 - a cached graph that fails is captured again below
                log.warning(
                    "cached graphs of shard [%d, %d) failed (%s: %s); capturing them again",
                    self.start,
                    self.end,
                    type(e).__name__,
                    e,
                )
                self._reset_graphs()
                loaded = False
        if not loaded:
            total = self._warm_calls()
        # a cached device graph that failed was captured again without device graphs (_call_jit): save that
        self.graphs_from_cache = loaded and all(
            cached is not None and jit.captured is cached[name] for name, jit in self._jits().items()
        )
        if path is not None and not self.graphs_from_cache:
            self._save_graphs(path, tensors)
        self._progress("warmup", total, total)
        self.ready = True
        self.warmup_s = time.perf_counter() - t0
        how = "graphs read from the cache" if self.graphs_from_cache else "graphs captured"
        log.info("shard [%d, %d) warm in %.1fs (%s)", self.start, self.end, self.warmup_s, how)

    def _warm_calls(self, cached: bool = False) -> int:
        """Run every graph twice: call 1 captures (and runs) it, call 2 replays the captured graph. Graphs read
        from the cache are replayed from their first call, so once is enough. Returns the progress steps' total
        (the same either way)."""
        D = self.cfg.hidden_size
        steps, each = (1, 2) if cached else (2, 1)  # calls per graph; progress steps per call
        total, done = (len(self.buckets) + 2) * 2, 0

        def make(n: int) -> np.ndarray:  # what _check_inputs gives: ids, or hidden states in the compute dtype
            return self._check_inputs(np.zeros(n, np.int32) if self.is_first else np.zeros((n, D), np.float32))

        sid = self.new_session("__warmup__")
        try:
            session = self._session(sid)
            for bucket in self.buckets:
                for n in (bucket, 2)[:steps]:  # different real lengths, one graph
                    session.length = 0  # positions do not matter here; stay inside a small context
                    self._run_chunk(session, make(n), bucket)
                    done += each
                    self._progress("warmup", done, total)
            for _ in range(steps):
                session.length = 0
                self.forward(sid, make(1), token_ids=[0])
                done += each
                self._progress("warmup", done, total)
            # a biased sampled step (every sampler graph): its bias made from counts and OpenAI's penalties
            warm = SamplingParams(
                temperature=0.7, top_k=5, top_p=0.9, min_p=0.01, repetition_penalty=1.1, seed=0, presence_penalty=0.1
            )
            if self.chain:  # a queued step: the feed's and the count's graphs (the greedy one ran above)
                self.configure_sampling(sid, warm)
                for _ in range(steps):
                    session.length = 0
                    for _ in self._decode_chained(session, 0, 1, warm, frozenset()):
                        pass
            if self.is_last:
                self.configure_sampling(sid, warm)
                for _ in range(steps):
                    session.length = 0
                    self.forward(sid, make(1), sampling=warm, token_ids=[0])
                    done += each
                    self._progress("warmup", done, total)
        finally:
            self.end_session(sid)
        return total

    # ------------------------------------------------------------------------------------ graph files
    def _jits(self) -> dict[str, Any]:
        """This shard's TinyJits by name (the samplers only on the last shard, the only one calling them)."""
        jits = {"decode": self._decode_jit, **{f"prefill{b}": jit for b, jit in self._prefill_jits.items()}}
        if self.is_last:
            jits.update(greedy=self._greedy_jit, sample=self._sample_jit, bias=self._bias_jit)
        if self.chain:
            jits.update(feed=self._feed_jit, count=self._count_jit)
        return jits

    def _graph_tensors(self) -> dict[str, Tensor]:
        """Every long-lived tensor a graph may read or write, by a name that is the same in every process."""
        named = {f"model.{k}": t for k, t in get_state_dict(self.model).items()}
        for name in (
            *("cos", "sin", "position_ids", "out_hidden", "sample_params", "uniform"),
            *("no_seen", "no_bias", "logit_bias", "counts", "penalties", "bias", "all_allowed", "allowed"),
            *("chained", "unread_marks"),
        ):
            named[name] = getattr(self, name)
        named.update({f"inputs{rows}": t for rows, t in self.inputs.items()})
        return named

    def _graph_file(self) -> tuple[Path | None, dict[str, Tensor]]:
        directory = graph_cache.cache_dir()
        if directory is None:
            return None, {}
        tensors = self._graph_tensors()
        shard = {
            "config": self.cfg,
            "layers": (self.start, self.end),
            "dtype": dtype_name(self.dtype),
            "max_context": self.max_context,
            "positions": self.positions,
            "buckets": self.buckets,
            "graphs": self.jit_graphs,
            "env": self._env,
        }
        return directory / f"{graph_cache.graph_key(self.device, shard, tensors)}.graphs", tensors

    def _install_graphs(self, graphs: dict[str, Any]) -> bool:
        jits = self._jits()
        if set(graphs) != set(jits):
            return False
        for name, jit in jits.items():
            jit.captured, jit.cnt = graphs[name], 2  # replay from the first call
        return True

    def _reset_graphs(self) -> None:
        for jit in self._jits().values():
            self._reset_jit(jit)

    def _reset_jit(self, jit: Any) -> None:
        jit.reset()
        self._replay.forget(jit)
        jit.cnt = 1  # capture on the next call, as in __init__

    def _save_graphs(self, path: Path, tensors: dict[str, Tensor]) -> None:
        graphs = {name: jit.captured for name, jit in self._jits().items()}
        if any(g is None for g in graphs.values()):
            return
        try:
            size = graph_cache.save(path, graphs, tensors)
            log.info("saved the graphs of shard [%d, %d) to %s (%s)", self.start, self.end, path, _size(size))
        except Exception as e:  # noqa: BLE001 - the cache only saves time: a shard that cannot write it still serves
            log.warning(
                "could not save the graphs of shard [%d, %d) (%s: %s)", self.start, self.end, type(e).__name__, e
            )
