"""Single-node engine benchmark: ShardEngine next to the memory-bandwidth floor and a peer, in one run.

    .venv/bin/python bench/bench_engine.py --preset llama-3.2-1b --out bench/RESULTS.md

Builds (or reuses) a random-weight checkpoint of a real shape, times the engine (load, warm-up, TTFT,
decode tok/s, kernels per decode step, resident weight bytes), measures memory read bandwidth, then times
Hugging Face transformers on the same checkpoint and prompt in the reference venv (a subprocess, so torch
never enters this process), and prints one markdown table. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from random_checkpoint import PRESETS, ensure_checkpoint
from tinygrad import Device, Tensor, TinyJit, dtypes
from tinygrad.codegen import to_program_cache
from tinygrad.dtype import DType
from tinygrad.engine.jit import CapturedJit
from tinygrad.engine.realize import runtime_cache
from tinygrad.helpers import GlobalCounters
from tinygrad.uop.ops import Ops

from cluster.engine.shard import ShardEngine, default_device
from cluster.sampling import SamplingParams

BENCH_DIR = Path(__file__).resolve().parent
# a Python with torch + transformers (never the project's venv); override with --ref-python or $REF_PY
REF_PYTHON = os.environ.get("REF_PY", "/work/refvenv/bin/python")
WARM_TOKENS = 2
TTFT_RUNS = 3  # TTFT is the median of fresh sessions
BW_BYTES = 512 << 20
PEER_DTYPES = ("float32", "bfloat16")


@dataclass
class Row:
    implementation: str
    dtype: str
    load_s: float | None  # None: the peer does not report it
    warmup_s: float | None
    ttft_ms: float
    decode_tok_s: float
    resident_bytes: int
    bandwidth: float  # bytes/s of the memory the weights live in: the row's floor
    kernels: int | None = None
    sampled_tok_s: float | None = None  # decode as instruct models ship their sampling (SAMPLED)


# ---------------------------------------------------------------------------------------------- floor
def read_bandwidth(threads: int = 1, nbytes: int = BW_BYTES, repeats: int = 3) -> float:
    """Memory read bandwidth in bytes/s: numpy sum over a buffer far larger than the caches, best of 3.
    With threads > 1 each thread sums its own slice (numpy drops the GIL inside the reduction)."""
    a = np.ones(nbytes // 4, dtype=np.float32)  # ones, not empty: the pages must exist before timing
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


def device_read_bandwidth(device: str, nbytes: int = BW_BYTES, repeats: int = 3) -> float:
    """Read bandwidth of an accelerator: a jitted tinygrad sum (no BEAM, so a lower bound on the peak)."""
    a = Tensor.ones(nbytes // 4, device=device).contiguous().realize()
    total = TinyJit(lambda x: x.sum().realize())
    for _ in range(3):  # eager, capture, first replay
        total(a)
    Device[device].synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(10):  # ten replays per timing: one is shorter than the launch overhead on a GPU
            total(a)
        Device[device].synchronize()
        best = min(best, (time.perf_counter() - t0) / 10)
    return a.nbytes() / best


def is_host(device: str) -> bool:
    return device.split(":")[0] in ("CPU", "CLANG", "LLVM")


# ---------------------------------------------------------------------------------------------- engine
def jit_kernels(captured: CapturedJit | None) -> int:
    """Kernels one replay of a captured JIT launches. A graph runner (CUDA graph, Metal ICB, ...) appears
    as one call that GlobalCounters counts once, so count the kernels batched inside it instead."""
    if captured is None:
        return 0
    n = 0
    for call in captured.linear.src:
        ast = call.src[0]
        if ast.op is Ops.CUSTOM_FUNCTION and ast.arg == "graph":
            n += len(ast.src[0].src)
        elif ast.op is Ops.CUSTOM_FUNCTION and ast.arg == "hcq":
            n += len(call.arg.aux.kernels)
        else:
            n += 1
    return n


def decode_kernels(engine: ShardEngine, sid: str, token: int) -> tuple[int, int]:
    """(kernels in the decode + greedy graphs, launches GlobalCounters saw during one decode step)."""
    GlobalCounters.reset()
    engine.forward(sid, np.array([token]))
    counted = GlobalCounters.kernel_count
    # the engine keeps its graphs private; a benchmark may look inside
    captured = jit_kernels(engine._decode_jit.captured) + jit_kernels(engine._greedy_jit.captured)
    return captured, counted


def compile_count() -> int:
    """Kernels lowered and compiled (BEAM searched, when on) plus programs loaded in this process so far.
    Both caches only grow, so a difference over a span counts the compilations in it."""
    return len(to_program_cache) + len(runtime_cache)


def dtype_name(dt: DType) -> str:
    # tinygrad names fp32 "float" and fp16 "half"; the table uses torch's names
    names = {dtypes.float32: "float32", dtypes.float16: "float16", dtypes.bfloat16: "bfloat16"}
    return names.get(dt, dt.name)


def resident_bytes(engine: ShardEngine) -> int:
    params = {id(p): p for p in engine.model.params()}.values()  # a tied table counts once
    return sum(p.nbytes() for p in params)


# temperature 0.6 and top-p 0.9, as Llama 3.2 Instruct's generation_config.json sets them: what `clusterctl run`
# samples with by default for such a model, through the sampler graph instead of the greedy one
SAMPLED = SamplingParams(temperature=0.6, top_p=0.9, seed=0)


def sampled_tok_s(engine: ShardEngine, prompt: np.ndarray, tokens: int) -> float:
    """Decode tok/s of `tokens` steps sampled with SAMPLED, after the prompt, in a session of its own."""
    sid = engine.new_session(sampling=SAMPLED)
    try:
        token = engine.forward(sid, prompt, sampling=SAMPLED).token
        t0 = time.perf_counter()
        for _ in range(tokens):
            token = engine.forward(sid, np.array([token]), sampling=SAMPLED).token
        return tokens / (time.perf_counter() - t0)
    finally:
        engine.end_session(sid)


def measure_engine(
    model_dir: Path, device: str, dtype: str | None, prompt: np.ndarray, tokens: int, bandwidth: float
) -> tuple[Row, dict[str, Any]]:
    t0 = time.perf_counter()
    engine = ShardEngine(model_dir, device=device, dtype=dtype)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.warmup()
    warmup_s = time.perf_counter() - t0
    compiled = compile_count()

    ttfts = []
    for _ in range(TTFT_RUNS):
        sid = engine.new_session()
        t0 = time.perf_counter()
        token = engine.forward(sid, prompt).token
        ttfts.append(time.perf_counter() - t0)
        if len(ttfts) < TTFT_RUNS:
            engine.end_session(sid)
    assert token is not None
    for _ in range(WARM_TOKENS):
        token = engine.forward(sid, np.array([token])).token
    steps, generated = [], []
    for _ in range(tokens):
        t0 = time.perf_counter()
        token = engine.forward(sid, np.array([token])).token
        steps.append(time.perf_counter() - t0)
        generated.append(token)
    assert token is not None
    captured, counted = decode_kernels(engine, sid, token)
    row = Row(
        implementation=f"clusterctl ShardEngine (tinygrad {version('tinygrad')}, {engine.device})",
        dtype=dtype_name(engine.dtype),
        load_s=load_s,
        warmup_s=warmup_s,
        ttft_ms=1e3 * statistics.median(ttfts),
        decode_tok_s=tokens / sum(steps),
        resident_bytes=resident_bytes(engine),
        bandwidth=bandwidth,
        kernels=captured,
        sampled_tok_s=sampled_tok_s(engine, prompt, tokens),
    )
    extra = {
        "weight_bytes": engine.weight_bytes,
        "kernels_counted": counted,
        "step_ms_median": 1e3 * statistics.median(steps),
        "step_ms_min": 1e3 * min(steps),
        "tokens": generated,
        "compiles_after_warmup": compile_count() - compiled,
    }
    engine.end_session(sid)
    return row, extra


# ---------------------------------------------------------------------------------------------- peer
def measure_peer(
    model_dir: Path, dtype: str, prompt: np.ndarray, tokens: int, bandwidth: float, ref_python: str
) -> tuple[Row, dict[str, Any]]:
    cmd = [
        ref_python,
        str(BENCH_DIR / "peer_transformers.py"),
        str(model_dir),
        "--dtype",
        dtype,
        "--prompt",
        ",".join(str(int(t)) for t in prompt),
        "--tokens",
        str(tokens),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"peer failed ({dtype}):\n{proc.stderr[-4000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    row = Row(
        implementation=f"HF transformers {r['transformers']} (torch {r['torch']}, {r['attn']})",
        dtype=dtype,
        load_s=r["load_s"],
        warmup_s=r["warmup_s"],
        ttft_ms=r["ttft_ms"],
        decode_tok_s=r["decode_tok_s"],
        resident_bytes=r["resident_bytes"],
        bandwidth=bandwidth,
    )
    return row, r


def measure_llama_cpp(llama_bench: Path, gguf: Path, prompt_len: int, tokens: int, bandwidth: float) -> Row:
    """llama.cpp's own benchmark on a GGUF of the same checkpoint (converted and quantized with llama.cpp's
    tools): prompt processing of prompt_len tokens and generation of `tokens`, on every core, 3 repetitions."""
    cmd = [str(llama_bench), "-m", str(gguf), "-p", str(prompt_len), "-n", str(tokens)]
    cmd += ["-t", str(os.cpu_count() or 1), "-r", "3", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed on {gguf}:\n{proc.stderr[-4000:]}")
    tests = json.loads(proc.stdout)
    prompt = next(t for t in tests if t["n_prompt"] > 0)
    gen = next(t for t in tests if t["n_gen"] > 0)
    return Row(
        implementation=f"llama.cpp {gen['build_commit']} (llama-bench, {gen['backends']})",
        dtype=gen["model_type"].split(" ", 2)[-1] if gen["model_type"] else gguf.stem,  # "llama 1B Q4_0" -> Q4_0
        load_s=None,
        warmup_s=None,
        ttft_ms=1e3 * prompt_len / prompt["avg_ts"],  # prompt processing only: llama-bench samples no token
        decode_tok_s=gen["avg_ts"],
        resident_bytes=int(gen["model_size"]),
        bandwidth=bandwidth,
    )


# ---------------------------------------------------------------------------------------------- report
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def table(rows: list[Row]) -> str:
    head = (
        "| implementation | dtype | load s | warm-up s | TTFT ms | decode tok/s | sampled tok/s | kernels/step "
        "| resident GB | floor tok/s | % of floor |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        floor = r.bandwidth / r.resident_bytes
        kernels = "—" if r.kernels is None else str(r.kernels)
        sampled = "—" if r.sampled_tok_s is None else f"{r.sampled_tok_s:.2f}"
        load = "—" if r.load_s is None else f"{r.load_s:.1f}"
        warmup = "—" if r.warmup_s is None else f"{r.warmup_s:.1f}"
        lines.append(
            f"| {r.implementation} | {r.dtype} | {load} | {warmup} | {r.ttft_ms:.0f} "
            f"| {r.decode_tok_s:.2f} | {sampled} | {kernels} | {r.resident_bytes / 1e9:.2f} | {floor:.2f} "
            f"| {100 * r.decode_tok_s / floor:.0f}% |"
        )
    return "\n".join(lines)


def report(args: argparse.Namespace, rows: list[Row], notes: list[str]) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = [
        f"### {args.model_dir or args.preset}, prompt {args.prompt_len} tokens, decode {args.tokens} tokens ({now})",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, {memory_gib():.0f} GiB RAM, "
        f"Python {platform.python_version()}, tinygrad {version('tinygrad')}",
        *[f"- {n}" for n in notes],
        "",
        "",
    ]
    return "\n".join(header) + table(rows) + "\n"


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3.2-1b", choices=sorted(PRESETS))
    ap.add_argument(
        "--model-dir", type=Path, help="time this checkpoint instead of a preset (e.g. an MLX-quantized one)"
    )
    ap.add_argument("--device", default=None, help="tinygrad device (default: the engine's, as a node picks it)")
    ap.add_argument("--dtype", default=None, help="engine compute dtype (default: per device)")
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens timed after 2 warm ones")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--no-peer", action="store_true", help="skip HF transformers")
    ap.add_argument("--ref-python", default=REF_PYTHON, help="Python with torch + transformers for the peer")
    ap.add_argument("--llama-bench", type=Path, help="llama.cpp's llama-bench binary: time it on each --gguf too")
    ap.add_argument("--gguf", type=Path, action="append", default=[], help="a GGUF of the same checkpoint (repeatable)")
    ap.add_argument("--out", type=Path, help="append the table to this markdown file")
    ap.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".cache")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # progress on stderr keeps stdout the table alone


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # a cold warm-up: graphs a previous run saved are not read (bench_start.py times a second start)
    graphs = tempfile.TemporaryDirectory(prefix="bench-graphs-")
    os.environ["CLUSTERCTL_GRAPH_CACHE"] = graphs.name  # removed with `graphs` when main returns
    if not args.no_peer and not Path(args.ref_python).exists():
        sys.exit(f"{args.ref_python} not found: pass --ref-python (a venv with torch + transformers) or --no-peer")
    t0 = time.perf_counter()
    if args.model_dir:
        model_dir, vocab = args.model_dir, int(json.loads((args.model_dir / "config.json").read_text())["vocab_size"])
    else:
        model_dir, built = ensure_checkpoint(args.preset, args.cache_dir, args.seed)
        log(f"checkpoint {model_dir} ({'built in %.0fs' % (time.perf_counter() - t0) if built else 'reused'})")
        vocab = int(PRESETS[args.preset]["vocab_size"])
    prompt = np.random.default_rng(args.seed).integers(0, vocab, args.prompt_len)
    host_bw, all_cores = read_bandwidth(), read_bandwidth(os.cpu_count() or 1)
    log(f"memory read {host_bw / 1e9:.1f} GB/s, all cores {all_cores / 1e9:.1f} GB/s")
    notes = [
        f"memory read with {os.cpu_count()} threads: {all_cores / 1e9:.1f} GB/s (numpy sums over "
        f"{BW_BYTES >> 20} MiB, one slice per thread, best of 3); floor tok/s = this bandwidth / resident weight "
        "bytes, since the engine and the peer both compute on every core",
        f"memory read with one thread: {host_bw / 1e9:.1f} GB/s (the figure PERF.md quotes; floors "
        f"x{host_bw / all_cores:.2f})",
        f"sampled tok/s: {args.tokens} tokens sampled at temperature {SAMPLED.temperature}, top-p {SAMPLED.top_p} "
        "(as Llama 3.2 Instruct ships them), in a session of their own; decode tok/s is greedy",
    ]

    device = args.device or default_device()  # tinygrad's default, but a CPU behind OpenCL is the CPU backend
    engine_bw = all_cores
    if not is_host(device):
        engine_bw = device_read_bandwidth(device)
        notes.append(f"{device} read: {engine_bw / 1e9:.0f} GB/s (jitted tinygrad sum, no BEAM): the engine's floor")
    log(f"engine on {device} ...")
    row, extra = measure_engine(model_dir, device, args.dtype, prompt, args.tokens, engine_bw)
    rows = [row]
    gc.collect()  # drop the engine's buffers before the peer loads its own copy
    notes += [
        f"engine: {extra['weight_bytes'] / 1e9:.2f} GB on disk -> {row.resident_bytes / 1e9:.2f} GB "
        f"resident as {row.dtype}; decode step median {extra['step_ms_median']:.1f} ms, "
        f"min {extra['step_ms_min']:.1f} ms",
        f"kernels/step: kernels in the captured decode + greedy-sampler JITs (graph batches expanded); "
        f"GlobalCounters.kernel_count saw {extra['kernels_counted']} launches in one decode step",
    ]
    if not args.no_peer:
        peers: dict[str, dict[str, Any]] = {}
        for dtype in PEER_DTYPES:
            log(f"peer transformers {dtype} ...")
            peer, peers[dtype] = measure_peer(model_dir, dtype, prompt, args.tokens, all_cores, args.ref_python)
            rows.append(peer)
        # a cheap sanity check that both decode the same sequence
        same = sum(a == b for a, b in zip(extra["tokens"], peers["float32"]["tokens"], strict=True))
        notes.append(
            f"peer: torch threads {peers['float32']['threads']}, greedy decode with a manual DynamicCache loop; "
            f"the engine's decoded tokens equal HF float32's at {same}/{args.tokens} positions"
        )
    for gguf in args.gguf if args.llama_bench else []:
        log(f"peer llama.cpp {gguf.name} ...")
        rows.append(measure_llama_cpp(args.llama_bench, gguf, args.prompt_len, args.tokens, all_cores))
    if args.llama_bench and args.gguf:
        notes.append(
            "llama.cpp: llama-bench on GGUFs of the same checkpoint (llama.cpp's convert_hf_to_gguf.py, then "
            "llama-quantize), every core, 3 repetitions; its TTFT is prompt processing alone (no token sampled)"
        )
    text = report(args, rows, notes)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
