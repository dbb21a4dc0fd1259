"""The kernels a decode step (or a prompt chunk) would launch on an NVIDIA GPU, read on any machine without one.

The engine runs on tinygrad's NULL device with the CUDA renderer (`DEV=NULL:CUDA:sm_90`): every kernel is
scheduled, optimized (gpu_matvec included) and rendered as CUDA exactly as on a GPU, but nothing is compiled
or run. For each kernel of the captured decode and greedy-sampler graphs this prints the launch (blocks x
threads), the steps each thread walks in its loops, its loads per thread, the bytes it touches and whether
it uses tensor cores, at a chosen position. A kernel of few threads that each walk a long loop is bound by
memory latency, not bandwidth: on a GPU it costs tens of microseconds however few bytes it reads. `--prompt N`
adds the graph of a prompt chunk of N tokens (a prefill bucket) written at that position.

    .venv/bin/python bench/cuda_census.py --preset llama-3.2-1b --position 576
    .venv/bin/python bench/cuda_census.py --preset llama-3.2-1b --position 448 --prompt 64
    .venv/bin/python bench/cuda_census.py --model DIR --json

This is structure, not time: the GPU bench (bench_gpu.py's profile step) measures the kernels themselves.
"""

from __future__ import annotations

import os
import sys

# before tinygrad is imported: the NULL device with the CUDA renderer, compiled in this process (below)
os.environ.setdefault("DEV", "NULL:CUDA:sm_90")
os.environ.setdefault("NULL_ALLOW_COPYOUT", "1")  # the engine reads its (meaningless) outputs back
os.environ.setdefault("PARALLEL", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from tinygrad.device import Compiler  # noqa: E402
from tinygrad.helpers import ansistrip  # noqa: E402
from tinygrad.renderer.cstyle import CUDARenderer  # noqa: E402
from tinygrad.uop.ops import AddrSpace, Ops, UOp, sym_infer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# many loads in turn by few threads: latency-bound on a GPU (an H200 holds ~270k resident threads)
FEW_THREADS, LONG_LOOP = 32768, 64


def render_only() -> None:
    """CUDA kernels rendered without a compiler: NVRTC need not be installed, and the NULL device runs nothing."""
    init = CUDARenderer.__init__
    if getattr(init, "render_only", False):
        return

    def no_compiler(self: CUDARenderer, target: Any, use_nvcc: bool = False) -> None:
        init(self, target, use_nvcc=True)  # NVCCCompiler only remembers its arguments; NVRTC would load a library
        self.compiler = Compiler()

    no_compiler.render_only = True  # type: ignore[attr-defined]
    CUDARenderer.__init__ = no_compiler  # type: ignore[method-assign]


@dataclass
class Kernel:
    graph: str  # decode, greedy, sample, or prompt N
    name: str
    blocks: int
    threads_per_block: int
    loop_steps: int  # loop iterations one thread walks, nested loops multiplied out
    loads: int  # loads from global memory one thread issues (a vector load counts once)
    shared_loads: int  # loads from shared memory one thread issues
    mbytes: float  # distinct bytes the kernel reads and writes (tinygrad's estimate)
    tensor_cores: bool  # its products run on tensor cores (mma instructions)
    source: str
    # its launch with every variable at 0, as tinygrad's CUDA graph first builds its node: a 0 there fails the graph
    zero_vars_launch: tuple[tuple[int, ...], tuple[int, ...]] = ((1,), (1,))
    # the variables it takes as arguments: a CUDA graph sends the driver a kernel's node again when one changes
    variables: tuple[str, ...] = ()
    loops: tuple[int, ...] = ()  # each loop's passes, in the order of the source's loops

    @property
    def threads(self) -> int:
        return self.blocks * self.threads_per_block

    @property
    def latency_bound(self) -> bool:
        return self.threads < FEW_THREADS and self.loads >= LONG_LOOP


def calls(captured: Any) -> list[UOp]:
    """The kernel calls of a captured JIT, graph batches expanded."""
    out: list[UOp] = []
    for call in captured.linear.src:
        ast = call.src[0]
        out += list(ast.src[0].src) if ast.op is Ops.CUSTOM_FUNCTION and ast.arg == "graph" else [call]
    return out


def _size(u: UOp | int, var_vals: dict[str, int]) -> int:
    return int(sym_infer(u.ssimplify() if isinstance(u, UOp) else u, var_vals))


def describe(graph: str, call: UOp, var_vals: dict[str, int]) -> Kernel | None:
    from tinygrad.renderer import Estimates

    prg = call.src[0]
    if prg.op is not Ops.PROGRAM:
        return None  # a copy
    info, linear = prg.arg, prg.src[1].src
    global_size, local_size = info.launch_dims(var_vals)
    steps, loads, mult, loops = 0, Counter[AddrSpace](), [1], []
    for u in linear:
        if u.op is Ops.RANGE:
            loops.append(_size(u.src[0], var_vals))
            mult.append(mult[-1] * loops[-1])
            steps += mult[-1]
        elif u.op is Ops.END:
            mult.pop()
        elif u.op is Ops.LOAD:
            loads[u.src[0].addrspace] += mult[-1]
    mem = Estimates.from_uops(linear).mem
    source = next(u.arg for u in prg.src if u.op is Ops.SOURCE)
    tensor_cores = any(u.op is Ops.WMMA for u in linear)
    zero_global, zero_local = info.launch_dims(dict.fromkeys(var_vals, 0))
    return Kernel(
        graph,
        ansistrip(info.name),
        math.prod(global_size),
        math.prod(local_size or (1,)),
        steps,
        loads[AddrSpace.GLOBAL],
        loads[AddrSpace.LOCAL],
        _size(mem, var_vals) / 1e6,
        tensor_cores,
        source,
        (tuple(zero_global), tuple(zero_local or (1,))),
        tuple(sorted(v.expr for v in info.vars)),
        tuple(loops),
    )


def census(model_dir: str | Path, position: int, max_context: int = 1024, prompt: int | None = None) -> list[Kernel]:
    """Every kernel of one decode step (decode graph, then the greedy and the sampling samplers') at `position`
    filled ones; with `prompt`, first the graph of a chunk of that many prompt tokens written from `position`."""
    render_only()
    from cluster.engine.shard import ShardEngine
    from cluster.models.decoder import ATTN_BLOCKS_VAR, blocks_past_first

    chunk = prompt or 2
    buckets = {} if prompt is None else {"prefill_buckets": (16, prompt) if prompt > 16 else (prompt,)}
    eng = ShardEngine(model_dir, device="NULL", max_context=max(max_context, position + chunk), **buckets)
    eng.warmup()
    out = []

    def add(graph: str, jit: Any, rows: int) -> None:
        var_vals = {"start_pos": position, ATTN_BLOCKS_VAR: blocks_past_first(position + rows), "last_row": rows - 1}
        if jit.captured is not None:
            out.extend(k for c in calls(jit.captured) if (k := describe(graph, c, var_vals)) is not None)

    if prompt is not None:
        add(f"prompt {prompt}", eng._prefill_jits[prompt], prompt)
    for graph, jit in (("decode", eng._decode_jit), ("greedy", eng._greedy_jit), ("sample", eng._sample_jit)):
        add(graph, jit, 1)
    return out


def table(kernels: list[Kernel], model: str, position: int) -> str:
    graphs = list(dict.fromkeys(k.graph for k in kernels))
    counts = ", ".join(f"{sum(k.graph == g for k in kernels)} {g}" for g in graphs)
    lines = [
        f"### CUDA kernels: {model}, position {position} (sm_90, rendered on the NULL device)",
        "",
        f"Kernels per graph: {counts}; latency-bound (fewer than {FEW_THREADS} threads, {LONG_LOOP}+ global loads"
        f" each): {sum(k.latency_bound for k in kernels)}; on tensor cores: {sum(k.tensor_cores for k in kernels)}",
        "",
        "| graph | kernel | count | blocks x threads | loop steps / thread | global loads / thread |"
        " shared loads / thread | MB | tensor cores | latency-bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    seen: Counter[tuple[str, str, int, int, int, int, int]] = Counter()
    first: dict[tuple[str, str, int, int, int, int, int], Kernel] = {}
    for k in kernels:
        key = (k.graph, k.name, k.blocks, k.threads_per_block, k.loop_steps, k.loads, k.shared_loads)
        seen[key] += 1
        first.setdefault(key, k)
    for key, n in seen.items():
        k = first[key]
        lines.append(
            f"| {k.graph} | `{k.name}` | {n} | {k.blocks} x {k.threads_per_block} | {k.loop_steps} | {k.loads} |"
            f" {k.shared_loads} | {k.mbytes:.3f} | {'yes' if k.tensor_cores else ''} |"
            f" {'**yes**' if k.latency_bound else ''} |"
        )
    return "\n".join(lines)


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """--preset/--model, --bits, --position and --cache-dir (this census's and sass_census.py's)."""
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default="llama-3.2-1b", help="a bench checkpoint (built when missing)")
    src.add_argument("--model", help="a checkpoint directory")
    ap.add_argument("--bits", type=int, choices=(4, 8, 16), default=16, help="the preset's 4/8-bit MLX form")
    ap.add_argument("--position", type=int, default=576, help="positions already in the cache")
    ap.add_argument("--cache-dir", default=str(Path(__file__).resolve().parent / ".cache"))


def model_dir(args: argparse.Namespace) -> Path:
    """The checkpoint add_model_arguments' arguments name (a preset is built when missing)."""
    if args.model:
        return Path(args.model)
    from random_checkpoint import ensure_checkpoint

    return ensure_checkpoint(args.preset, Path(args.cache_dir), bits=args.bits)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(ap)
    ap.add_argument("--prompt", type=int, help="also the graph of a prompt chunk of this many tokens (a bucket)")
    ap.add_argument("--sources", help="write each distinct kernel's CUDA source to this directory")
    ap.add_argument("--json", action="store_true", help="one JSON object per kernel instead of the table")
    args = ap.parse_args(argv)
    checkpoint = model_dir(args)
    kernels = census(checkpoint, args.position, prompt=args.prompt)
    if args.sources:
        out = Path(args.sources)
        out.mkdir(parents=True, exist_ok=True)
        for i, k in enumerate(kernels):
            name = "".join(c if c.isalnum() or c in "_-" else "_" for c in k.name)
            (out / f"{i:03d}_{k.graph.replace(' ', '_')}_{name}.cu").write_text(k.source)
    if args.json:
        for k in kernels:
            fields = {f: v for f, v in asdict(k).items() if f != "source"}
            print(json.dumps({**fields, "threads": k.threads, "latency_bound": k.latency_bound}))
    else:
        print(table(kernels, checkpoint.name, args.position))
    return 0


if __name__ == "__main__":
    sys.exit(main())
