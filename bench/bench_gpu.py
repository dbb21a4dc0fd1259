"""Issue 5 in one call on a lent GPU: memory detection, correctness on the device, decode speed of every JIT
variant, two nodes against one, and a transformers peer, all in the same run on the same card.

    bash bench/gpu.sh              # on the GPU machine: installs the carried wheels, sets CUDA up, runs this
    bash bench/gpu.sh --dry-run    # the same pipeline on this machine's CPU with the tiny preset

Every step runs in its own subprocess with its own timeout, inside one overall budget, so a hang or a crash
costs that step only; the steps that matter most run first. A step prints its results as lines
`@@ {json}` as soon as it has them, so a step that times out still reports what it measured. The driver
writes gpu_results.md, gpu_results.json and gpu_log.txt to --out. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

SELF = Path(__file__).resolve()
BENCH_DIR = SELF.parent
ROOT = BENCH_DIR.parent
MARK = "@@ "
MIN_STEP_S = 20.0  # a step given less than this is skipped rather than started
TERM_GRACE_S = 20.0  # a timed-out step gets SIGTERM (the cluster step stops its nodes), then SIGKILL
REF_PYTHON_CPU = "/work/refvenv/bin/python"  # torch + transformers here; on the GPU machine python3 has them

FLOAT_UNPACK = {"CLUSTERCTL_QUANT_UNPACK": "float"}
ROWS_4 = {"CLUSTERCTL_MATVEC_ROWS": "4"}
TINYGRAD_GRAPHS = "fp16 tinygrad's graphs"  # without cluster/engine/cuda_graph.py (the engine's default on CUDA)
# (label, kind, timeout s, arguments) in order of importance: the budget cuts the tail. "{beam}" stands for the
# mode's BEAM setting; "beam": True runs the step with it.
PLAN: list[tuple[str, str, float, dict[str, Any]]] = [
    ("bandwidth", "bandwidth", 60, {}),
    ("memory", "memory", 60, {}),
    ("correctness", "correctness", 120, {}),
    ("fp16", "speed", 120, {"bits": 16}),
    ("fp16, second start", "speed", 90, {"bits": 16}),  # a new process reading the graph cache fp16 filled
    ("q4", "speed", 120, {"bits": 4}),
    # MLX levels made from their bits instead of integer conversions (decoder.float_unpack): the q4 target's candidate
    ("q4 float unpack", "speed", 120, {"bits": 4, "env": FLOAT_UNPACK}),
    # 4 rows a thread in the big products (gpu_matvec.rows_per_thread): a quarter of the instructions for the
    # fused RMSNorm and the activations' loads (bench/sass_census.py)
    ("q4 float unpack and 4 rows a thread", "speed", 120, {"bits": 4, "env": {**FLOAT_UNPACK, **ROWS_4}}),
    ("fp16 4 rows a thread", "speed", 120, {"bits": 16, "env": ROWS_4}),
    (TINYGRAD_GRAPHS, "speed", 120, {"bits": 16, "env": {"CLUSTERCTL_CUDA_GRAPH": "tinygrad"}}),
    ("profile", "profile", 90, {"bits": 16, "env": {"JIT": "2"}}),
    # q, k, v and gate, up as separate products (decoder.fused_projections): what stacking them gains
    ("fp16 separate projections", "speed", 120, {"bits": 16, "env": {"CLUSTERCTL_FUSED_PROJECTIONS": "0"}}),
    ("cluster", "cluster", 150, {"bits": 16}),  # with BEAM when "fp16 {beam}" filled the cache
    # the same under CUDA MPS: how much of a hop between two processes on one GPU is the GPU switching contexts
    ("cluster under CUDA MPS", "cluster", 150, {"bits": 16, "mps": True}),
    # engine calls waited for by polling, not sleeping (runner.spin_seconds): the wake-ups of a hand-off
    ("cluster with spinning hand-offs", "cluster", 150, {"bits": 16, "env": {"CLUSTERCTL_SPIN_US": "5000"}}),
    # decode with a long context: the attention's reductions walk every cached block (bench/RESULTS.md, session 19)
    ("fp16 at long context", "speed", 120, {"bits": 16, "long": True}),
    ("runner", "runner", 60, {}),  # an engine call's round trip without the device, on this machine
    # kernel by kernel: against the graph steps, what a CUDA graph's replay saves (or costs)
    ("fp16 without graphs", "speed", 120, {"bits": 16, "env": {"JIT": "2"}}),
    ("kernels", "kernels", 150, {}),
    ("peer", "peer", 90, {}),
    # the default chunks on CPUs (on NVIDIA GPUs the engine adds 512): what the 512 chunk gains
    ("fp16 prompt chunks of 16 and 64", "speed", 120, {"bits": 16, "buckets": [16, 64]}),
    ("fp16 tinygrad options", "speed", 120, {"bits": 16, "env": {"CLUSTERCTL_GPU_MATVEC": "0"}}),
    ("q4 tinygrad options", "speed", 120, {"bits": 4, "env": {"CLUSTERCTL_GPU_MATVEC": "0"}}),
    # BEAM last: on an H200 JITBEAM=2 had not finished the first prompt graph of the 1B model after 150 s
    ("fp16 {beam}", "speed", 150, {"bits": 16, "beam": True}),
    ("fp16 {beam}, second start", "speed", 90, {"bits": 16, "beam": True}),
    ("q4 {beam}", "speed", 150, {"bits": 4, "beam": True}),
    ("q4 {beam}, second start", "speed", 90, {"bits": 4, "beam": True}),
]
SECOND = ", second start"
FULL: dict[str, Any] = {
    "preset": "llama-3.2-1b",
    "prompt_len": 512,  # the TTFT target's prompt
    "long_prompt_len": 3840,  # "long": the prompt of the long-context step (the engine's default context is 4096)
    "tokens": 128,
    "peer_tokens": 64,
    "peer_dtypes": ["bfloat16", "float16"],
    "cluster_tokens": 128,
    "cluster_prompt_len": 64,
    "cluster_runs": 3,
    "runner_calls": 2000,
    "models": None,  # every fixture
    "dtypes": ["float16", "float32"],  # the GPU default first
    "split_models": ["llama32", "qwen2", "llama32-4bit"],
    "cuts": [[0, 2, 4], [0, 1, 3, 4]],
    "beam_label": "JITBEAM=2",
    "beam_env": {"JITBEAM": "2"},
    "budget": 450.0,
    "kernel_shapes": "full",
    "kernel_device": None,
    "kernel_repeats": 10,
    "profile_top": 25,
}
# the CPU has no GPU's speed: the same steps on the tiny preset, and a BEAM narrowed to one round of a few
# options per kernel (a full JITBEAM=2 takes minutes on two cores)
DRY: dict[str, Any] = FULL | {
    "preset": "tiny",
    "prompt_len": 64,
    "long_prompt_len": 192,
    "tokens": 16,
    "peer_tokens": 8,
    "peer_dtypes": ["float32"],
    "cluster_tokens": 16,
    "cluster_prompt_len": 16,
    "cluster_runs": 2,
    "runner_calls": 300,
    "models": ["llama32"],
    "dtypes": ["float32", "float16"],
    "split_models": ["llama32"],
    "cuts": [[0, 2, 4]],
    "beam_label": "JITBEAM=1 narrowed",
    "beam_env": {"JITBEAM": "1", "BEAM_UPCAST_MAX": "1", "BEAM_LOCAL_MAX": "1", "BEAM_MIN_PROGRESS": "1e9"},
    "budget": 240.0,
    "kernel_shapes": "dry",
    "kernel_device": "PYTHON",  # emulates a GPU's threads and shared memory on the CPU
    "kernel_repeats": 1,
    "profile_top": 10,
}
TARGETS = {"fp16_tok_s": 600, "q4_tok_s": 800, "ttft_ms": 100, "cluster_share": 0.85}


# ============================================================================================== worker side
def emit(**record: Any) -> None:
    print(MARK + json.dumps(record), flush=True)


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def is_host(device: str) -> bool:
    return device.split(":")[0] in ("CPU", "CLANG", "LLVM")


def no_site_env() -> dict[str, str]:
    """The environment without PYTHONPATH: torch and transformers run on the machine's own packages."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


TORCH_COPY = """
import json, time, torch
n = 1 << 30
a = torch.ones(n, dtype=torch.uint8, device="cuda"); b = torch.empty_like(a)
for _ in range(3): b.copy_(a)
torch.cuda.synchronize(); best = float("inf")
for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(10): b.copy_(a)
    torch.cuda.synchronize(); best = min(best, (time.perf_counter() - t0) / 10)
print(json.dumps({"copy": 2 * n / best, "name": torch.cuda.get_device_name(), "torch": torch.__version__}))
"""


def w_bandwidth(a: dict[str, Any]) -> None:
    from bench_engine import device_read_bandwidth, read_bandwidth

    if is_host(a["device"]):
        # every core reads, as for bench_engine's floor: the CPU engine computes on every core
        host_read = read_bandwidth(os.cpu_count() or 1)
        emit(host_read=host_read, floor_source="numpy sums over 512 MiB, all cores, best of 3")
        return
    cmd = [a["ref_python"], "-c", TORCH_COPY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=no_site_env())
    if proc.returncode == 0:
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        emit(torch_copy=r["copy"], torch=r["torch"], card=r["name"])
    else:
        note(f"torch copy failed:\n{proc.stderr[-2000:]}")
    from tinygrad import Context

    try:
        emit(tinygrad_read=device_read_bandwidth(a["device"]))
    except Exception as e:  # noqa: BLE001 - a failing device graph: the same sum without graphs
        note(f"tinygrad sum with graphs failed ({type(e).__name__}: {e}); again with JIT=2")
        with Context(JIT=2):
            emit(tinygrad_read=device_read_bandwidth(a["device"]), tinygrad_read_graphs=False)


def nvidia_smi_memory() -> tuple[int, int] | None:
    """(free, total) bytes of GPU 0 as nvidia-smi prints them (MiB)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    cmd = [exe, "--query-gpu=memory.free,memory.total", "--format=csv,noheader,nounits", "-i", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    free, total = (int(float(v)) << 20 for v in out.splitlines()[0].split(","))
    return free, total


def w_memory(a: dict[str, Any]) -> None:
    from cluster.memory import _nvml_memory, device_kind, device_memory

    dev = a["device"]
    kind = device_kind(dev)
    if kind != "nvidia":
        mem = device_memory(dev)
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        ref_free, ref_total = (int(info[k].split()[0]) * 1024 for k in ("MemAvailable", "MemTotal"))
        emit(kind=kind, planner_free=mem.free, planner_total=mem.total, ref_free=ref_free, ref_total=ref_total)
        emit(ref="/proc/meminfo MemAvailable / MemTotal")
        return
    from tinygrad import Device, Tensor, dtypes

    Tensor.ones(16, device=dev).contiguous().realize()  # the CUDA context exists before the first reading
    Device[dev].synchronize()
    mem, smi = device_memory(dev), nvidia_smi_memory()
    emit(kind=kind, planner_free=mem.free, planner_total=mem.total, source="NVML" if _nvml_memory(0) else "nvidia-smi")
    if smi is not None:
        emit(ref_free=smi[0], ref_total=smi[1], ref="nvidia-smi --query-gpu=memory.free,memory.total")
    size = 2 << 30  # a planner that sees tinygrad's allocations sees this much less free afterwards
    block = Tensor.zeros(size // 4, dtype=dtypes.float32, device=dev).contiguous().realize()  # int32 indices
    Device[dev].synchronize()
    after, smi_after = device_memory(dev), nvidia_smi_memory()
    ref_drop = None if smi is None or smi_after is None else smi[0] - smi_after[0]
    emit(alloc=size, planner_drop=mem.free - after.free, ref_drop=ref_drop)
    del block


def graph_state(eng: Any) -> str:
    """How the engine's decode step runs: as a device graph, kernel by kernel (the device has no graphs, or
    JIT=2), or kernel by kernel after a graph failed."""
    from tinygrad import Device

    from cluster.engine.shard import uses_graphs

    if not eng.jit_graphs:
        return "fell back"
    if not uses_graphs(eng._decode_jit):
        return "kernels"
    runner = Device[eng.device].graph
    return "graph" if getattr(runner, "__name__", "") != "ChangedNodesCUDAGraph" else "graph (changed nodes)"


def run_tokens(shards: list[Any], prompt: list[int], n: int) -> list[int]:
    from cluster.generation import step
    from cluster.sampling import SamplingParams

    sid = "check"
    for s in shards:
        s.new_session(sid)
    try:
        ids, out = list(prompt), []
        for _ in range(n):
            token = step(shards, sid, ids, SamplingParams(), 0).token
            assert token is not None
            out.append(token)
            ids = [token]
        return out
    finally:
        for s in shards:
            s.end_session(sid)


def w_correctness(a: dict[str, Any]) -> None:
    """The CPU tests' checks on the device: test_engine's reference and float16 cases, and the splits."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import ALL_MODELS, BUCKETS, FIXTURES, log_softmax, reference, reference_logits

    from cluster.engine.shard import ShardEngine

    dev = a["device"]

    def engine(name: str, dtype: str | None, start: int = 0, end: int | None = None) -> ShardEngine:
        return ShardEngine(
            FIXTURES / name, start, end, device=dev, dtype=dtype, prefill_buckets=BUCKETS, max_context=128
        )

    def logprobs(r: Any, vocab: int) -> np.ndarray:
        v = np.full(vocab, -np.inf)
        for i, lp in r.top:
            v[i] = lp
        return v

    def check_reference(name: str, dtype: str) -> None:
        ref, logits = reference(name), reference_logits(name)
        prompt, greedy, V = ref["prompt_ids"], ref["greedy_ids"], logits.shape[1]
        t0 = time.perf_counter()
        eng = engine(name, dtype)
        sid = eng.new_session()
        got, errs, want = [], [], []
        # float32: free-running greedy against the reference (test_matches_reference_logits_and_greedy);
        # float16: teacher-forced on the reference's tokens (test_float16_compute_stays_close_to_the_reference)
        forced = dtype != "float32"
        feed = greedy[:5] if forced else greedy[:-1]
        r = eng.forward(sid, np.array(prompt), logprobs=V)
        for i in range(len(feed) + 1):
            row = logits[len(prompt) - 1 + i]
            got.append(r.token)
            want.append(int(np.argmax(row)) if forced else greedy[i])
            errs.append(float(np.abs(logprobs(r, V) - log_softmax(row)).max()))
            if i < len(feed):
                r = eng.forward(sid, np.array([feed[i] if forced else got[-1]]), logprobs=V)
        tol = 0.15 if forced else 1e-3
        ok = got == want and max(errs) < tol
        record = {"check": "reference", "model": name, "dtype": dtype, "positions": len(got), "tokens_ok": got == want}
        emit(**record, max_err=max(errs), tol=tol, ok=ok, graphs=graph_state(eng), seconds=time.perf_counter() - t0)

    wholes: dict[str, list[int]] = {}

    def check_split(name: str, cuts: list[int]) -> None:
        t0 = time.perf_counter()
        prompt = reference(name)["prompt_ids"]
        if name not in wholes:
            wholes[name] = run_tokens([engine(name, None)], prompt, 12)
        shards = [engine(name, None, lo, hi) for lo, hi in zip(cuts, cuts[1:], strict=False)]
        same = run_tokens(shards, prompt, 12) == wholes[name]
        record = {"check": "split", "model": name, "dtype": shards[0].info()["dtype"], "cuts": cuts}
        emit(**record, ok=same, tokens_ok=same, seconds=time.perf_counter() - t0)

    # most telling first, so a timeout cuts the least: every model in the first dtype, the splits, then the rest
    models, (first, *rest) = a["models"] or ALL_MODELS, a["dtypes"]
    for name in models:
        check_reference(name, first)
    for name in a["split_models"]:
        check_split(name, a["cuts"][0])
    for dtype in rest:
        for name in models:
            check_reference(name, dtype)
    for cuts in a["cuts"][1:]:
        for name in a["split_models"]:
            check_split(name, cuts)


def w_speed(a: dict[str, Any]) -> None:
    import numpy as np
    from bench_engine import compile_count, decode_kernels, resident_bytes, sampled_tok_s

    from cluster.engine.shard import ShardEngine, dtype_name

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "warmup":  # how far a warm-up got, should the step time out in it (a long BEAM search)
            emit(warmup_progress=f"{done}/{total} graphs at {time.perf_counter() - t0:.0f}s")

    model_dir = Path(a["model_dir"])
    t0 = time.perf_counter()
    buckets = {"prefill_buckets": tuple(a["buckets"])} if a.get("buckets") else {}
    eng = ShardEngine(model_dir, device=a["device"], progress=progress, **buckets)
    emit(load_s=time.perf_counter() - t0, dtype=dtype_name(eng.dtype), resident_bytes=resident_bytes(eng))
    t0 = time.perf_counter()
    eng.warmup()
    emit(warmup_s=time.perf_counter() - t0, graphs=graph_state(eng), graphs_from_cache=eng.graphs_from_cache)
    compiled = compile_count()

    vocab = eng.cfg.vocab_size
    prompt = np.random.default_rng(0).integers(0, vocab, a["long_prompt_len" if a.get("long") else "prompt_len"])
    emit(prompt_len=len(prompt))
    ttfts = []
    for _ in range(3):  # fresh sessions; the median is reported
        sid = eng.new_session()
        t0 = time.perf_counter()
        token = eng.forward(sid, prompt).token
        ttfts.append(time.perf_counter() - t0)
        eng.end_session(sid)
    emit(ttft_ms=1e3 * statistics.median(ttfts), ttft_all_ms=[1e3 * t for t in ttfts])
    sid = eng.new_session()
    token = eng.forward(sid, prompt).token
    for _ in range(2):
        token = eng.forward(sid, np.array([token])).token
    steps, tokens = [], []
    for _ in range(a["tokens"]):
        t0 = time.perf_counter()
        token = eng.forward(sid, np.array([token])).token
        steps.append(time.perf_counter() - t0)
        tokens.append(token)
    assert token is not None
    emit(
        decode_tokens=tokens,  # greedy, from the same prompt: variants of the same kernels must agree
        decode_tok_s=len(steps) / sum(steps),
        step_ms_median=1e3 * statistics.median(steps),
        step_ms_min=1e3 * min(steps),
    )
    emit(sampled_tok_s=sampled_tok_s(eng, prompt, SAMPLED_TOKENS))  # as instruct models ship their sampling
    emit(**queued_decode(eng, prompt, a["tokens"]))
    kernels, launches = decode_kernels(eng, sid, token)
    emit(kernels=kernels, launches=launches, compiles_after_warmup=compile_count() - compiled, graphs=graph_state(eng))
    emit(**replay_split(eng, sid))
    emit(host_profile=host_profile(eng, sid, token))


def queued_decode(eng: Any, prompt: Any, tokens: int) -> dict[str, Any]:
    """The engine's own decode loop (`ShardEngine.decode`, what a one-node cluster and `run --local` use): steps
    queued eng.chain at a time on the device. Greedy tokens after the same prompt and 2 warm ones as the per-step
    figure (they must agree), sampled as instruct models ship, and sampled with OpenAI's presence and frequency
    penalties (their counts kept on the device)."""
    import dataclasses

    from bench_engine import SAMPLED

    penalised = dataclasses.replace(SAMPLED, presence_penalty=0.3, frequency_penalty=0.3)
    out: dict[str, Any] = {"chain": eng.chain}
    variants = (("queued", None, tokens), ("queued_sampled", SAMPLED, SAMPLED_TOKENS))
    for key, params, n in (*variants, ("queued_penalised", penalised, SAMPLED_TOKENS)):
        sid = eng.new_session(sampling=params)
        try:
            token = eng.forward(sid, prompt, sampling=params).token
            for result in eng.decode(sid, token, 2, sampling=params):
                token = result.token
            t0 = time.perf_counter()
            got = [r.token for r in eng.decode(sid, token, n, sampling=params)]
            out[f"{key}_tok_s"] = len(got) / (time.perf_counter() - t0)
            if params is None:
                out["queued_tokens"] = got
        finally:
            eng.end_session(sid)
    return out


HOST_PROFILE_STEPS = 30
SAMPLED_TOKENS = 64
HOST_PROFILE_TOP = 12


def host_profile(eng: Any, sid: str, token: int) -> list[list[Any]]:
    """Where the host's time goes in whole decode steps (graph replay, sampling, copies, syncs): cProfile over
    HOST_PROFILE_STEPS steps, the functions that took the most time themselves, as [function, µs per step, calls
    per step]. cProfile slows Python calls, so read the shares, not the sum."""
    import cProfile
    import pstats

    import numpy as np

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(HOST_PROFILE_STEPS):
        token = eng.forward(sid, np.array([token])).token
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = []
    for (path, line, name), (_, calls, own, _, _) in stats.items():
        where = f"{Path(path).parent.name}/{Path(path).name}:{line}" if line else path
        rows.append([f"{name} ({where})", 1e6 * own / HOST_PROFILE_STEPS, calls / HOST_PROFILE_STEPS])
    rows.sort(key=lambda r: -r[1])
    return [[name, round(us, 1), round(calls, 1)] for name, us, calls in rows[:HOST_PROFILE_TOP]]


def replay_split(eng: Any, sid: str) -> dict[str, float]:
    """The decode graph alone, replayed at the session's position (it rewrites the same cache slot): how long
    the host takes to hand it over (a device graph returns before the device is done) against the whole replay.
    Engine internals: a bench's look inside, not an API."""
    from tinygrad import Device

    from cluster.models.decoder import blocks_past_first

    s = eng._session(sid)
    pos = eng.v_pos.bind(s.length)
    blocks = eng.v_blocks.bind(blocks_past_first(s.length + 1))
    host, whole = [], []
    for _ in range(30):
        Device[eng.device].synchronize()
        t0 = time.perf_counter()
        eng._call_jit(eng._decode_jit, eng.inputs[1], s.cache, pos, blocks)
        t1 = time.perf_counter()
        Device[eng.device].synchronize()
        host.append(t1 - t0)
        whole.append(time.perf_counter() - t0)
    return {"replay_host_ms": 1e3 * statistics.median(host[5:]), "replay_ms": 1e3 * statistics.median(whole[5:])}


_KERNEL_LINE = re.compile(r"\*\*\* \S+\s+\d+ (\S+)\s.* tm\s+([\d.]+)(us|ms|s)/")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _kernel_times(text: str) -> list[tuple[str, float]]:
    """(kernel name, device µs) from tinygrad's DEBUG=2 lines, one per kernel run."""
    scale = {"us": 1.0, "ms": 1e3, "s": 1e6}
    found = (_KERNEL_LINE.search(_ANSI.sub("", line)) for line in text.splitlines())
    return [(m[1], float(m[2]) * scale[m[3]]) for m in found if m]


def w_profile(a: dict[str, Any]) -> None:
    """Where one decode step and one prompt go, kernel by kernel: the engine captured without device graphs
    (JIT=2, set by the step's env) and run under DEBUG=2, which syncs after each kernel and prints its device
    time. The wall time of that step includes a launch and a sync per kernel; the speed steps' graph replay
    does not, so compare their ms/token with the sum of kernel times here."""
    import contextlib
    import io

    import numpy as np
    from tinygrad import Context

    from cluster.engine.shard import ShardEngine

    eng = ShardEngine(Path(a["model_dir"]), device=a["device"])
    eng.warmup()
    prompt = np.random.default_rng(0).integers(0, eng.cfg.vocab_size, a["prompt_len"])

    def profiled(what: str, run: Any) -> None:
        out = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out), Context(DEBUG=2):
            run()
        wall = time.perf_counter() - t0
        times = _kernel_times(out.getvalue())
        by_name: dict[str, list[float]] = {}
        for name, us in times:
            by_name.setdefault(name, []).append(us)
        top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[: a["profile_top"]]
        emit(
            profile=what,
            wall_ms=1e3 * wall,
            kernel_ms=sum(us for _, us in times) / 1e3,
            kernels=len(times),
            top=[[name, round(sum(us), 1), len(us)] for name, us in top],
            sequence=[[name, round(us, 1)] for name, us in times],  # in launch order: which layer op is which
        )

    sid = eng.new_session()
    token = eng.forward(sid, prompt).token
    for _ in range(3):
        token = eng.forward(sid, np.array([token])).token
    step = {"token": token}

    def decode() -> None:
        step["token"] = eng.forward(sid, np.array([step["token"]])).token

    profiled(f"decode step at position {a['prompt_len'] + 4}", decode)
    sid2 = eng.new_session()
    profiled(f"prompt of {a['prompt_len']} tokens", lambda: eng.forward(sid2, prompt))


KERNEL_SHAPES = {  # (hidden, intermediate, vocab, prompt chunks): the 1B shape; the dry run's tiny one on PYTHON
    "full": (2048, 8192, 128256, (64, 512)),
    "dry": (64, 128, 256, (4,)),
}


def _opts(opts: Any) -> str:
    return " ".join(f"{o.op.name}({o.axis},{o.arg})" for o in opts) or "none"


def w_kernels(a: dict[str, Any]) -> None:
    """One decoder product at a time on the device, each with several kernel options: tinygrad's heuristic,
    gpu_matvec's (the engine's), and alternatives, timed by tinygrad's own BEAM timer (device time, best of
    10). Reports GB/s over the bytes the kernel's buffers hold and, for prompt chunks, TFLOP/s."""
    import dataclasses

    from tinygrad import Device, Tensor, dtypes
    from tinygrad.codegen import to_program
    from tinygrad.codegen.opt import OptOps, heuristic
    from tinygrad.codegen.opt.postrange import args_from_ast
    from tinygrad.codegen.opt.search import _time_program
    from tinygrad.uop.ops import Ops

    import cluster.models.decoder as dec
    from cluster.engine import gpu_matvec
    from cluster.engine.kernel_opts import element_dtype, scheduled_kernels
    from cluster.models.config import QuantSpec

    dev = a.get("kernel_device") or a["device"]
    ren = Device[dev].renderer
    if not ren.has_local:
        emit(skipped=f"{dev} has no local memory: gpu_matvec does not apply")
        return
    gpu_matvec.enable()
    if a["kernel_shapes"] == "dry":
        gpu_matvec.MIN_WEIGHT = 0  # the dry run's products are far smaller than a model's
    dec_codegen = dec.cpu_codegen
    dec.cpu_codegen = lambda t: False  # the GPU forms, also on the dry run's PYTHON device
    D, F, V, chunks = KERNEL_SHAPES[a["kernel_shapes"]]
    half = dtypes.half

    def quant(rows: int, cols: int, bits: int) -> Any:
        packed = Tensor.empty(rows, cols * bits // 32, dtype=dtypes.uint32, device=dev)
        scales = Tensor.empty(rows, cols // 64, dtype=half, device=dev)
        return dec.QuantLinear(
            packed,
            scales,
            Tensor.empty(rows, cols // 64, dtype=half, device=dev),
            QuantSpec(bits=bits, group_size=64),
            half,
        )

    def dense(rows: int, cols: int) -> Any:
        return dec.Linear(Tensor.empty(rows, cols, dtype=half, device=dev), dtype=half)

    def x(tokens: int, cols: int) -> Tensor:
        return Tensor.empty(1, tokens, cols, dtype=half, device=dev)

    def normed(cols: int) -> Tensor:
        return dec.RMSNorm(Tensor.empty(cols, dtype=half, device=dev), 1e-5)(x(1, cols))

    def float_unpack(layer: Any, given: Tensor) -> Tensor:
        """The product with levels made from their bits (decoder.dequantize_float, CLUSTERCTL_QUANT_UNPACK=float)."""
        os.environ["CLUSTERCTL_QUANT_UNPACK"] = "float"
        try:
            return layer(given)
        finally:
            del os.environ["CLUSTERCTL_QUANT_UNPACK"]

    cases: list[tuple[str, Tensor, int]] = [  # (name, output, multiply-adds)
        (f"matvec fp16 {F}x{D} (gate/up)", dense(F, D)(x(1, D)), F * D),
        (f"matvec fp16 {D}x{F} (down)", dense(D, F)(x(1, F)), F * D),
        (f"matvec fp16 {V}x{D} (lm_head)", dense(V, D)(x(1, D)), V * D),
        (f"matvec q4 {F}x{D}", quant(F, D, 4)(x(1, D)), F * D),
        (f"matvec q4 {F}x{D} (float unpack)", float_unpack(quant(F, D, 4), x(1, D)), F * D),
        (f"matvec q4 {D}x{F}", quant(D, F, 4)(x(1, F)), F * D),
        (f"matvec q4 {D}x{F} (float unpack)", float_unpack(quant(D, F, 4), x(1, F)), F * D),
        (f"matvec q4 {V}x{D} (tied lm_head)", quant(V, D, 4)(x(1, D)), V * D),
        (f"matvec q4 {V}x{D} (tied lm_head, float unpack)", float_unpack(quant(V, D, 4), x(1, D)), V * D),
        (f"matvec q8 {F}x{D}", quant(F, D, 8)(x(1, D)), F * D),
        (f"matvec q8 {F}x{D} (float unpack)", float_unpack(quant(F, D, 8), x(1, D)), F * D),
        # as the decoder runs gate/up: stacked, with the RMSNorm fused into the product (its input recomputed for
        # every row a thread computes: bench/sass_census.py)
        (f"matvec fp16 {2 * F}x{D} (gate/up stacked, RMSNorm fused)", dense(2 * F, D)(normed(D)), 2 * F * D),
        (f"matvec q4 {2 * F}x{D} (gate/up stacked, RMSNorm fused)", quant(2 * F, D, 4)(normed(D)), 2 * F * D),
        (
            f"matvec q4 {2 * F}x{D} (gate/up stacked, RMSNorm fused, float unpack)",
            float_unpack(quant(2 * F, D, 4), normed(D)),
            2 * F * D,
        ),
    ]
    q4 = quant(F, D, 4)
    cases.append((f"dequantize q4 {F}x{D} to fp16 (prompt chunks)", q4.dequantize(*q4.matrices()).contiguous(), 0))
    for t in chunks:
        cases.append((f"prompt fp16 {t}x{F}x{D}", dense(F, D)(x(t, D)), t * F * D))
        # the down projection: few outputs, a long reduction (tinygrad's tile left 16 blocks for 64 tokens)
        cases.append((f"prompt fp16 {t}x{D}x{F} (down)", dense(D, F)(x(t, F)), t * F * D))
        cases.append((f"prompt q4 {t}x{F}x{D}", quant(F, D, 4)(x(t, D)), t * F * D))

    seen: list[Any] = []
    current = heuristic.hand_coded_optimizations

    def spy(k: Any) -> Any:
        seen.append(k.copy())  # the kernel as apply_opts hands it over, before any option
        return current(k)

    for name, out, macs in cases:
        calls = scheduled_kernels(out)
        # the product: the biggest kernel that reduces (a prompt's quantized weight is dequantized by another)
        ast = max(
            calls,
            key=lambda s: (
                any(u.op is Ops.REDUCE for u in s.toposort()),
                sum(u.max_numel() for u in s.toposort() if u.op is Ops.PARAM),
            ),
        )
        nbytes = sum(
            u.max_numel() * element_dtype(u.dtype).itemsize
            for u in ast.toposort()
            if u.op is Ops.PARAM and u.arg.slot >= 0
        )
        seen.clear()
        heuristic.hand_coded_optimizations = spy
        try:
            to_program(ast, ren)
        finally:
            heuristic.hand_coded_optimizations = current
        if not seen:
            emit(kernel=name, skipped="compiled already: the same kernel as an earlier product")
            continue
        k = seen[0]
        variants: dict[str, Any] = {"tinygrad": gpu_matvec.default_options(k).applied_opts}
        ours = gpu_matvec.matvec_options(k)
        if ours is not None:
            variants["clusterctl"] = ours.applied_opts
            # rows a thread: the activations each thread loads serve that many rows (a 4-bit product loads 64 bytes
            # of them for every 16 bytes of weights); fewer threads a row: a shorter sum through shared memory
            for warp, rows, up in (
                (32, 2, 1),
                (32, 8, 1),
                (16, 4, 1),
                (32, 4, 2),
                (32, 1, 1),
                (32, 4, 4),
                (32, 8, 2),
                (8, 4, 1),
                (8, 4, 2),
            ):
                alt = gpu_matvec.matvec_options(k, warp, rows, up)
                if alt is not None:
                    variants[f"warp {warp}, {rows} rows/block" + (f", {up} rows/thread" if up > 1 else "")] = (
                        alt.applied_opts
                    )
        tc = next((o for o in variants["tinygrad"] if o.op is OptOps.TC), None)
        if tc is not None:  # prompt chunks: fewer tiles per block than tinygrad's 4x4 upcast, so more blocks
            chosen = gpu_matvec.tensor_core_options(k, gpu_matvec.default_options(k)).applied_opts
            if chosen != variants["tinygrad"]:
                variants["clusterctl"] = chosen  # the engine's (gpu_matvec.MIN_TC_BLOCKS)
            for upcasts in gpu_matvec.TC_TILE_UPCASTS:
                if (t := gpu_matvec.tensor_core_tile(k, tc, upcasts)) is not None:
                    variants[f"TC, {('', 'upcast 2, ', 'upcast 2x2, ')[upcasts]}local 4"] = t.applied_opts
        for label, opts in variants.items():
            try:
                a2 = ast.replace(arg=dataclasses.replace(ast.arg, opts_to_apply=tuple(opts)))
                prg = to_program(a2, ren)
                bufs, var_vals = args_from_ast(a2, dev)
                for b in bufs:
                    b.ensure_allocated()
                tm = min(_time_program(prg, var_vals, bufs, allow_test_size=False, cnt=a["kernel_repeats"]))
                launch = [list(prg.arg.global_size), list(prg.arg.local_size or [])]
                emit(
                    kernel=name,
                    variant=label,
                    opts=_opts(opts),
                    us=tm * 1e6,
                    gb_s=nbytes / tm / 1e9,
                    tflop_s=2 * macs / tm / 1e12,
                    launch=launch,
                )
            except Exception as e:  # noqa: BLE001 - one variant that fails to build or run is reported, not fatal
                emit(kernel=name, variant=label, opts=_opts(opts), error=f"{type(e).__name__}: {str(e)[:200]}")
    dec.cpu_codegen = dec_codegen


def w_cluster(a: dict[str, Any]) -> None:
    import secrets
    import tempfile

    from bench_cluster import _terminate, make_prompt, measure_clusters

    signal.signal(signal.SIGTERM, _terminate)  # a timeout unwinds through the code that stops the nodes
    os.environ.setdefault("CLUSTERCTL_TOKEN", secrets.token_urlsafe(32))
    model_dir = Path(a["model_dir"])
    prompt = make_prompt(model_dir, a["cluster_prompt_len"])
    log_dir = Path(tempfile.mkdtemp(prefix="gpu-bench-cluster-"))
    emit(log_dir=str(log_dir), jit=a["jit"])
    with contextlib.ExitStack() as stack:
        if a.get("mps"):
            # CUDA MPS: the nodes' processes share one GPU context, so the GPU does not switch between the two
            # processes' contexts at every hand-off of a step
            stack.enter_context(cuda_mps(log_dir))
        results = measure_clusters([1, 2], model_dir, prompt, a["cluster_tokens"], a["cluster_runs"], 1, log_dir, note)
    for r in results:
        emit(
            nodes=r.nodes,
            layers=r.layers,
            place_s=r.place_s,
            ttft_ms=r.ttft_ms,
            tok_s=r.tok_s,
            ms_per_token=r.ms_per_token,
            split=r.step_split(),
        )


@contextlib.contextmanager
def cuda_mps(log_dir: Path) -> Iterator[None]:
    """NVIDIA's multi-process service for the processes started inside (they find it through the environment);
    stopped after. Raises when the machine has no nvidia-cuda-mps-control."""
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        raise RuntimeError("nvidia-cuda-mps-control is not on this machine")
    pipes = log_dir / "mps-pipes"
    pipes.mkdir()
    os.environ["CUDA_MPS_PIPE_DIRECTORY"], os.environ["CUDA_MPS_LOG_DIRECTORY"] = str(pipes), str(log_dir)
    subprocess.run([control, "-d"], check=True, timeout=30)
    emit(mps="started")
    try:
        yield
    finally:
        subprocess.run([control], input="quit\n", text=True, timeout=30, check=False)


def w_runner(a: dict[str, Any]) -> None:
    """bench_runner.py on this machine: one engine-process call's round trip (no engine) next to a pipe's, the
    floor under every hand-off between a node and its shard, and a gRPC stream's round trip between two processes;
    a cluster's hop is those two and the device."""
    cmd = [sys.executable, str(BENCH_DIR / "bench_runner.py"), "--calls", str(a["runner_calls"]), "--rounds", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True, cwd=ROOT)
    emit(runner=out.stdout.strip().splitlines()[-12:])


def w_peer(a: dict[str, Any]) -> None:
    import numpy as np

    model_dir = Path(a["model_dir"])
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompt = np.random.default_rng(0).integers(0, vocab, a["prompt_len"])
    device = "cpu" if is_host(a["device"]) else "cuda"
    for dtype in a["peer_dtypes"]:
        cmd = [a["ref_python"], str(BENCH_DIR / "peer_transformers.py"), str(model_dir), "--dtype", dtype]
        cmd += [
            "--prompt",
            ",".join(str(int(t)) for t in prompt),
            "--tokens",
            str(a["peer_tokens"]),
            "--device",
            device,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=no_site_env())
        if proc.returncode != 0:
            note(f"peer {dtype} failed:\n{proc.stderr[-3000:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r.pop("tokens", None)
        emit(**r)


def w_build(a: dict[str, Any]) -> None:
    from random_checkpoint import ensure_checkpoint

    t0 = time.perf_counter()
    path, built = ensure_checkpoint(a["preset"], Path(a["cache_dir"]), 0, a["bits"])
    emit(model_dir=str(path), built=built, seconds=time.perf_counter() - t0)


WORKERS = {
    "bandwidth": w_bandwidth,
    "memory": w_memory,
    "correctness": w_correctness,
    "speed": w_speed,
    "kernels": w_kernels,
    "profile": w_profile,
    "cluster": w_cluster,
    "runner": w_runner,
    "peer": w_peer,
    "build": w_build,
}


# ============================================================================================== driver side
@dataclass
class StepResult:
    label: str
    kind: str
    status: str = "skipped"  # ok | failed (rc N) | timeout | skipped (budget) | skipped (...)
    seconds: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    tail: str = ""

    @property
    def merged(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for r in self.records:
            out.update(r)
        return out


class Driver:
    def __init__(self, args: argparse.Namespace, cfg: dict[str, Any]):
        self.args, self.cfg = args, cfg
        self.device = args.device
        self.deadline = time.monotonic() + args.budget
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "gpu_log.txt", "w")
        self.results: list[StepResult] = []
        self.builds: dict[int, subprocess.Popen[str]] = {}
        self.built: dict[int, Path | str] = {}  # bits -> checkpoint directory, or why it is missing
        self.cache_dir = Path(args.cache_dir)
        self.cachedb = self.cache_dir / "tinygrad-cache.db"
        self.graphs = self.cache_dir / "graphs"  # clusterctl's graph cache: a second start reads its graphs

    def say(self, msg: str) -> None:
        print(msg, flush=True)
        self.log.write(msg + "\n")
        self.log.flush()

    def env(self, beam: bool) -> dict[str, str]:
        env = {**os.environ, "DEV": self.device, "CACHEDB": str(self.cachedb), "PYTHONUNBUFFERED": "1"}
        env["CLUSTERCTL_GRAPH_CACHE"] = str(self.graphs)
        for key in ("JIT", "BEAM", "JITBEAM", *self.cfg["beam_env"]):
            env.pop(key, None)  # every step starts from tinygrad's defaults
        return env | (self.cfg["beam_env"] if beam else {})

    def start_builds(self) -> None:
        """Checkpoints are built on the CPU while the first steps use the device."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for bits in (16, 4):
            payload = {"preset": self.cfg["preset"], "bits": bits, "cache_dir": str(self.cache_dir)}
            cmd = [sys.executable, str(SELF), "--worker", "build", json.dumps(payload)]
            self.builds[bits] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def checkpoint(self, bits: int) -> Path:
        if bits not in self.built:
            proc = self.builds[bits]
            try:
                out, _ = proc.communicate(timeout=max(1.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                out = "not built within the budget"
            records = [json.loads(x[len(MARK) :]) for x in out.splitlines() if x.startswith(MARK)]
            if proc.returncode == 0 and records:
                self.built[bits] = Path(records[-1]["model_dir"])
                self.say(f"== checkpoint {self.built[bits]}: {'built' if records[-1]['built'] else 'reused'}")
            else:
                self.built[bits] = f"building the {bits}-bit checkpoint failed:\n{out[-2000:]}"
        got = self.built[bits]
        if isinstance(got, str):
            raise RuntimeError(got)
        return got

    def run(self, label: str, kind: str, timeout: float, args: dict[str, Any]) -> StepResult:
        res = StepResult(label, kind)
        self.results.append(res)
        left = self.deadline - time.monotonic()
        if left < MIN_STEP_S:
            res.status = "skipped (budget)"
            self.say(f"== {label}: skipped, {left:.0f}s of the budget left")
            return res
        t0 = time.monotonic()
        try:
            if "bits" in args:
                args = {**args, "model_dir": str(self.checkpoint(args["bits"]))}
            if kind == "peer":
                args = {**args, "model_dir": str(self.checkpoint(16))}
        except Exception as e:  # noqa: BLE001 - the report says why, the other steps go on
            res.status, res.tail = "failed (checkpoint)", str(e)
            self.say(f"== {label}: {e}")
            return res
        limit = min(timeout, self.deadline - time.monotonic())
        beam = bool(args.get("beam"))
        if kind == "cluster" and self.ok(f"fp16 {self.cfg['beam_label']}"):
            beam = True  # the nodes find every kernel's BEAM result in the cache the speed step filled
        payload = {**self.cfg, **args, "device": self.device, "ref_python": self.args.ref_python}
        payload["jit"] = self.cfg["beam_label"] if beam else "default JIT settings"
        self.say(f"== {label}: {kind}, limit {limit:.0f}s" + (f", {self.cfg['beam_label']}" if beam else ""))
        cmd = [sys.executable, str(SELF), "--worker", kind, json.dumps(payload)]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env(beam) | args.get("env", {}),
            cwd=ROOT,
            start_new_session=True,  # one process group: a timeout kills what the step started too
        )
        lines: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                if line.startswith(MARK):
                    try:
                        res.records.append(json.loads(line[len(MARK) :]))
                    except json.JSONDecodeError:
                        pass
                self.say(f"   {line}")

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=limit)
            res.status = "ok" if rc == 0 else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            res.status = f"timeout ({limit:.0f}s)"
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=TERM_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        reader.join(timeout=5)
        res.seconds = time.monotonic() - t0
        if res.status != "ok":
            res.tail = "\n".join(line for line in lines[-25:] if not line.startswith(MARK))
        self.say(f"== {label}: {res.status} in {res.seconds:.0f}s")
        return res

    def ok(self, label: str) -> bool:
        return any(r.label == label and r.status == "ok" for r in self.results)

    def result(self, label: str) -> StepResult | None:
        return next((r for r in self.results if r.label == label), None)


# ---------------------------------------------------------------------------------------------- report
def pkg(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "—"


def run_out(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def meta(d: Driver) -> dict[str, Any]:
    card = run_out(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    commit = run_out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) or "unknown"
    if run_out(["git", "-C", str(ROOT), "status", "--porcelain", "cluster", "bench"]):
        commit += " with uncommitted changes in cluster/ or bench/"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "dry run (CPU)" if d.args.dry_run else "GPU",
        "device": d.device,
        "card": card or f"{cpu_model()}, {os.cpu_count()} cores",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "clusterctl": commit,
        "packages": {n: pkg(n) for n in ("tinygrad", "numpy", "grpcio", "protobuf", "torch", "transformers")},
        "cuda_path": os.environ.get("CUDA_PATH", ""),
        "nvrtc_path": os.environ.get("NVRTC_PATH", ""),
        "budget_s": d.args.budget,
        "preset": d.cfg["preset"],
    }


def fmt(x: Any, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def num(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else "**pass**" if ok else "**FAIL**"


Section = tuple[list[str], list[tuple[str, bool | None]]]  # markdown lines, (target, met or None)


def floor_bandwidth(m: dict[str, Any]) -> tuple[float | None, str]:
    """The bandwidth a decode step's floor is computed from, and how it was measured."""
    if "torch_copy" in m:
        text = f"torch device copy {m['torch_copy'] / 1e12:.2f} TB/s (read + write counted)"
        if "tinygrad_read" in m:
            text += f"; tinygrad jitted sum {m['tinygrad_read'] / 1e12:.2f} TB/s (no BEAM)"
        return m["torch_copy"], text
    if "tinygrad_read" in m:
        return m["tinygrad_read"], f"tinygrad jitted sum {m['tinygrad_read'] / 1e12:.2f} TB/s (no BEAM: a lower bound)"
    if "host_read" in m:
        return m["host_read"], f"numpy read {m['host_read'] / 1e9:.1f} GB/s (all cores)"
    return None, "not measured"


def memory_section(m: dict[str, Any]) -> Section:
    if "planner_free" not in m:
        return [], []
    gib = 2**30
    line = f"Memory: the planner sees {m['planner_free'] / gib:.2f} GiB free of {m['planner_total'] / gib:.2f} GiB"
    line += f" (source {m['source']})" if "source" in m else ""
    if "ref_free" not in m:
        return [line, ""], []
    diff = (m["planner_free"] - m["ref_free"]) / 2**20
    line += f"; {m['ref']}: {m['ref_free'] / gib:.2f} of {m['ref_total'] / gib:.2f} GiB ({diff:+.0f} MiB)"
    ok = abs(diff) <= 256 and abs(m["planner_total"] - m["ref_total"]) <= 64 << 20
    if "planner_drop" in m:
        ref_drop = "—" if m["ref_drop"] is None else f"{m['ref_drop'] / gib:.2f}"
        line += (
            f"; after tinygrad allocates {m['alloc'] / gib:.0f} GiB, free drops {m['planner_drop'] / gib:.2f} GiB "
            f"(nvidia-smi: {ref_drop})"
        )
        ok = ok and abs(m["planner_drop"] - m["alloc"]) < 0.1 * m["alloc"]
    return [line, ""], [("free memory as the planner sees it matches the reference", ok)]


def correctness_section(step: StepResult | None) -> Section:
    checks = [r for r in (step.records if step else []) if "check" in r]
    if not checks or step is None:
        return [], []
    out = [
        "| check | model | dtype | positions / cuts | tokens equal | max logprob err | tol | graphs | ok |",
        "|" + "---|" * 9,
    ]
    for c in checks:
        where = c.get("positions") if c["check"] == "reference" else c.get("cuts")
        out.append(
            f"| {c['check']} | {c['model']} | {c['dtype']} | {where} | {c['tokens_ok']} "
            f"| {fmt(c.get('max_err'), '.1e')} | {c.get('tol', '—')} | {c.get('graphs', '—')} | {verdict(c['ok'])} |"
        )
    out += [
        "",
        "Reference: the fixtures' transformers / mlx-lm fp32 logits. float32: free-running greedy with the CPU "
        "tests' tolerance; float16: teacher-forced on the reference tokens, tolerance 0.15 as in test_engine; "
        "split: the shards in a chain give the whole model's greedy tokens (engine default dtype).",
        "",
    ]
    return out, [("correctness on the device", step.status == "ok" and all(c["ok"] for c in checks))]


def speed_section(rows: list[StepResult], bw: float | None, cfg: dict[str, Any]) -> Section:
    if not rows:
        return [], []
    out = [
        "| variant | dtype | load s | warm-up s | TTFT ms | decode tok/s | ms/token | sampled tok/s "
        "| queued decode tok/s (sampled; with penalties) | kernels/step (launches) | graphs | resident GB "
        "| achieved GB/s | floor tok/s | % of floor | compiles after warm-up |",
        "|" + "---|" * 16,
    ]
    for r in rows:
        s = r.merged
        tok_s, res_b = s.get("decode_tok_s"), s.get("resident_bytes")
        floor = bw / res_b if bw and res_b else None
        kern = f"{s['kernels']} ({s['launches']})" if "kernels" in s else "—"
        graphs = s.get("graphs", "—")
        out.append(
            f"| {r.label}{'' if r.status == 'ok' else f' ({r.status})'} | {s.get('dtype', '—')} "
            f"| {fmt(s.get('load_s'))} "
            f"| {fmt(s.get('warmup_s')) if 'warmup_s' in s else s.get('warmup_progress', '—')} "
            f"| {fmt(s.get('ttft_ms'))} | {fmt(tok_s)} "
            f"| {fmt(s.get('step_ms_median'), '.2f')} | {fmt(s.get('sampled_tok_s'))} "
            f"| {fmt(s.get('queued_tok_s'))} ({fmt(s.get('queued_sampled_tok_s'))}; "
            f"{fmt(s.get('queued_penalised_tok_s'))}) | {kern} | {graphs} "
            f"| {num(res_b and res_b / 1e9)} "
            f"| {num(tok_s and res_b and tok_s * res_b / 1e9)} | {num(floor)} "
            f"| {fmt(tok_s and floor and 100 * tok_s / floor, '.0f')}% | {s.get('compiles_after_warmup', '—')} |"
        )
    for r in rows:
        m = r.merged
        if "replay_ms" in m:
            out.append(
                f"- {r.label}: the decode graph alone replays in {m['replay_ms']:.2f} ms, of which the host takes "
                f"{m['replay_host_ms']:.2f} ms to hand it over (sampling and the copies of a step come on top)"
            )
    for r in rows:
        if "host_profile" in r.merged:
            out += [
                "",
                f"{r.label}: host time per decode step by function (cProfile over {HOST_PROFILE_STEPS} steps, time "
                "spent in the function itself; cProfile slows Python, so read the shares):",
                "",
                "| function | µs per step | calls per step |",
                "|---|---|---|",
                *[f"| `{name}` | {us:.1f} | {calls:g} |" for name, us, calls in r.merged["host_profile"]],
            ]
    out += [
        "",
        f"Decode: {cfg['tokens']} greedy tokens after 2 warm ones, wall clock per `forward`. Queued decode: the same "
        "through the engine's own loop (`ShardEngine.decode`: steps queued `CLUSTERCTL_DECODE_CHAIN` at a time, each "
        "fed from the last on the device; what a one-node cluster runs), greedy, sampled as below, and sampled with "
        "OpenAI's presence and frequency penalties at 0.3 (counted on the device). TTFT: a fresh "
        f"session's {cfg['prompt_len']}-token prompt, prefill plus the first token, median of 3. Sampled: "
        f"{SAMPLED_TOKENS} tokens at temperature 0.6, top-p 0.9 (as instruct models ship). Kernels/step: the "
        "decode + greedy JITs' kernels (graph batches expanded); launches as GlobalCounters counted them. Compiles: "
        "kernels lowered + programs loaded after warm-up. A second start is a new process on the same CACHEDB "
        "and graph cache.",
        "",
    ]

    def best(prefix: str, key: str, lowest: bool = False) -> float | None:
        vals = [r.merged[key] for r in rows if r.label.startswith(prefix) and key in r.merged]
        return (min(vals) if lowest else max(vals)) if vals else None

    def fastest(prefix: str) -> float | None:  # a step at a time or queued, whichever decoded faster
        vals = [v for v in (best(prefix, "decode_tok_s"), best(prefix, "queued_tok_s")) if v is not None]
        return max(vals) if vals else None

    fp16, q4, ttft = fastest("fp16"), fastest("q4"), best("", "ttft_ms", True)
    compiles = [r.merged["compiles_after_warmup"] for r in rows if "compiles_after_warmup" in r.merged]
    targets: list[tuple[str, bool | None]] = [
        (f"fp16 decode >= {TARGETS['fp16_tok_s']} tok/s (best {fmt(fp16)})", at_least(fp16, TARGETS["fp16_tok_s"])),
        (f"q4 decode >= {TARGETS['q4_tok_s']} tok/s (best {fmt(q4)})", at_least(q4, TARGETS["q4_tok_s"])),
        (f"TTFT <= {TARGETS['ttft_ms']} ms (best {fmt(ttft)})", None if ttft is None else ttft <= TARGETS["ttft_ms"]),
        ("zero compilations after warm-up", (max(compiles) == 0) if compiles else None),
    ]
    by_label = {r.label: r.merged for r in rows}
    for label, m in by_label.items():
        if "queued_tokens" in m and "decode_tokens" in m:  # the device-fed steps against one forward a step
            same = m["queued_tokens"] == m["decode_tokens"]
            targets.append((f"{label}: queued decode gives the greedy tokens of one forward a step", same))
    fp16_row, tinygrad_row = by_label.get("fp16", {}), by_label.get(TINYGRAD_GRAPHS, {})
    fp16_tokens = fp16_row.get("decode_tokens")
    if "decode_tokens" in tinygrad_row and fp16_tokens and fp16_row.get("graphs") == "graph (changed nodes)":
        same = tinygrad_row["decode_tokens"] == fp16_tokens  # the engine's graph against tinygrad's
        targets.append((f"fp16: the greedy tokens of {TINYGRAD_GRAPHS} ({len(fp16_tokens)})", same))
    for label, second in by_label.items():
        first = by_label.get(label.removesuffix(SECOND), {})
        if label.endswith(SECOND) and "warmup_s" in first and "warmup_s" in second:
            w1, w2 = first["warmup_s"], second["warmup_s"]
            name = f"{label.removesuffix(SECOND)}: a second start warms up in half the time ({w1:.1f} -> {w2:.1f} s)"
            targets.append((name, w2 < 0.5 * w1))
            targets.append((f"{label}: graphs read from the graph cache", second.get("graphs_from_cache")))
    return out, targets


def profile_section(step: StepResult | None) -> Section:
    rows = [r for r in (step.records if step else []) if "profile" in r]
    out: list[str] = []
    for r in rows:
        out += [
            f"Profile, {r['profile']} (16-bit checkpoint, JIT=2 and DEBUG=2: a sync after each kernel): "
            f"{r['kernels']} kernels, {r['kernel_ms']:.2f} ms of device time, {r['wall_ms']:.2f} ms wall",
            "",
            "| kernel | µs | runs |",
            "|---|---|---|",
            *[f"| `{name}` | {us:.1f} | {n} |" for name, us, n in r["top"]],
            "",
        ]
    return out, []


def kernel_section(step: StepResult | None) -> Section:
    rows = [r for r in (step.records if step else []) if "kernel" in r and "variant" in r]
    if not rows:
        return [], []
    out = [
        "Kernels one at a time (tinygrad's BEAM timer, best of the repeats; GB/s over the bytes its buffers hold):",
        "",
        "| product | options | µs | GB/s | TFLOP/s | blocks, threads | opts |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['kernel']} | {r['variant']} | — | — | — | — | {r['opts']}: {r['error']} |")
            continue
        out.append(
            f"| {r['kernel']} | {r['variant']} | {r['us']:.1f} | {r['gb_s']:.0f} | {r['tflop_s']:.2f} "
            f"| {r['launch'][0]}, {r['launch'][1]} | {r['opts']} |"
        )
    return out + [""], []


def cluster_section(step: StepResult | None, cfg: dict[str, Any]) -> Section:
    nodes = [r for r in (step.records if step else []) if "nodes" in r]
    if not nodes or step is None:
        return [], []
    base = next((r["tok_s"] for r in nodes if r["nodes"] == 1), None)
    out = [
        f"Cluster on one device ({step.label}): `clusterctl join` processes on 127.0.0.1 talking gRPC, the 16-bit "
        f"checkpoint, {step.merged.get('jit')}, {cfg['cluster_tokens']} tokens, median of {cfg['cluster_runs']} "
        "requests",
        "",
        "| nodes | layers | time to place s | TTFT ms | decode tok/s | vs 1 node |",
        "|---|---|---|---|---|---|",
    ]
    for r in nodes:
        share = f"{100 * r['tok_s'] / base:.0f}%" if base else "—"
        layers = ", ".join(r["layers"])
        out.append(
            f"| {r['nodes']} | {layers} | {r['place_s']:.1f} | {r['ttft_ms']:.0f} | {r['tok_s']:.1f} | {share} |"
        )
    split = [(r["nodes"], r["ms_per_token"], r["split"]) for r in nodes if "split" in r]
    if split:
        from bench_cluster import split_table

        out += ["", "Where a decode step went (medians of the runs):", "", split_table(split)]
    two = next((r["tok_s"] for r in nodes if r["nodes"] == 2), None)
    if not (base and two):
        return out + [""], []
    share = two / base
    name = f"{'' if step.label == 'cluster' else step.label + ': '}2 nodes keep >= 85% of 1 node ({100 * share:.0f}%)"
    return out + [""], [(name, share >= TARGETS["cluster_share"])]


def runner_section(step: StepResult | None) -> Section:
    lines = step.merged.get("runner") if step else None
    if not lines:
        return [], []
    title = "bench_runner.py on this machine (an engine-process call without the engine, a gRPC echo):"
    return [title, "", *lines, ""], []


def peer_section(step: StepResult | None) -> Section:
    peers = [r for r in (step.records if step else []) if "decode_tok_s" in r]
    if not peers:
        return [], []
    out = ["| peer | dtype | device | load s | TTFT ms | decode tok/s |", "|---|---|---|---|---|---|"]
    for p in peers:
        out.append(
            f"| HF transformers {p['transformers']} (torch {p['torch']}, {p['attn']}) | {p['dtype']} | {p['device']} "
            f"| {p['load_s']:.1f} | {p['ttft_ms']:.0f} | {p['decode_tok_s']:.1f} |"
        )
    return out + ["", "Peer: bench/peer_transformers.py, greedy over a DynamicCache, one token per forward.", ""], []


def report(d: Driver, info: dict[str, Any]) -> tuple[str, list[tuple[str, bool | None]]]:
    bw_step = d.result("bandwidth")
    bw, bw_text = floor_bandwidth(bw_step.merged if bw_step else {})
    p = info["packages"]
    out = [
        f"### GPU bench ({info['mode']}): {info['card']}, {info['date']}",
        "",
        f"- tinygrad {p['tinygrad']}, Python {info['python']}, numpy {p['numpy']}, torch {p['torch']}, "
        f"transformers {p['transformers']}; clusterctl {info['clusterctl']}; DEV={info['device']}",
        f"- bandwidth for the floor: {bw_text}",
        f"- checkpoint: `{info['preset']}` with random weights (bench/random_checkpoint.py), bf16 on disk, computed "
        "in the engine's default dtype; q4: its MLX affine 4-bit form, group 64",
        "",
        "| step | status | s |",
        "|---|---|---|",
        *[f"| {r.label} | {r.status} | {r.seconds:.0f} |" for r in d.results],
        "",
    ]
    mem = d.result("memory")
    sections = [
        memory_section(mem.merged if mem else {}),
        correctness_section(d.result("correctness")),
        speed_section([r for r in d.results if r.kind == "speed"], bw, d.cfg),
        profile_section(d.result("profile")),
        kernel_section(d.result("kernels")),
        *[cluster_section(r, d.cfg) for r in d.results if r.kind == "cluster"],
        runner_section(d.result("runner")),
        peer_section(d.result("peer")),
    ]
    targets = [t for _, ts in sections for t in ts]
    for lines, _ in sections:
        out += lines
    out += ["Targets (issue 5):", "", *[f"- {name}: {verdict(ok)}" for name, ok in targets]]
    if d.args.dry_run:
        out += ["", "Dry run: the speed targets are for a GPU; here the pipeline, the checks and the counts matter."]
    for r in d.results:
        if r.tail:
            out += ["", f"<details><summary>{r.label}: {r.status}</summary>", "", "```", r.tail, "```", "</details>"]
    return "\n".join(out) + "\n", targets


def at_least(x: float | None, bar: float) -> bool | None:
    return None if x is None else x >= bar


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="the CPU, tiny models, short counts")
    ap.add_argument("--device", help="tinygrad device (default CUDA, or CPU with --dry-run)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(BENCH_DIR / ".gpu-out"), help="results folder")
    ap.add_argument("--budget", type=float, help="seconds for every step together")
    ap.add_argument("--only", help="comma-separated step labels to run (default: all)")
    ap.add_argument("--cache-dir", default=str(BENCH_DIR / ".cache"), help="checkpoints and tinygrad's CACHEDB")
    ap.add_argument("--fresh-cache", action="store_true", help="delete the CACHEDB and graph cache first: a cold start")
    ap.add_argument("--correctness-dtypes", help="comma-separated compute dtypes of the correctness step")
    ap.add_argument("--ref-python", help="a Python with torch + transformers (default: this one on the GPU)")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = args.device or ("CPU" if args.dry_run else "CUDA")
    args.ref_python = args.ref_python or (REF_PYTHON_CPU if args.dry_run else sys.executable)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(BENCH_DIR))
    if args.worker:
        kind, payload = args.worker
        WORKERS[kind](json.loads(payload))
        return 0

    cfg = DRY if args.dry_run else FULL
    if args.correctness_dtypes:
        cfg = cfg | {"dtypes": args.correctness_dtypes.split(",")}
    args.budget = args.budget or cfg["budget"]
    # labels are comma-separated, but a second start's label has a comma of its own
    only = {x.strip() for x in re.split(f",(?!{SECOND[1:]})", args.only)} if args.only else None
    unknown = sorted((only or set()) - {label.format(beam=cfg["beam_label"]) for label, *_ in PLAN})
    if unknown:  # a misspelt label would cost its step silently, on a machine lent for minutes
        known = ", ".join(label.format(beam=cfg["beam_label"]) for label, *_ in PLAN)
        print(f"bench_gpu: no step named {', '.join(map(repr, unknown))}; the steps: {known}", file=sys.stderr)
        return 2
    d = Driver(args, cfg)
    if args.fresh_cache:
        d.cachedb.unlink(missing_ok=True)
        shutil.rmtree(d.graphs, ignore_errors=True)
    d.say(f"bench_gpu: {'dry run on ' if args.dry_run else ''}{d.device}, budget {args.budget:.0f}s, out {d.out}")
    d.say(f"CACHEDB {d.cachedb} ({'exists' if d.cachedb.exists() else 'new'}); checkpoints in {d.cache_dir}")
    d.start_builds()
    t0 = time.monotonic()
    for label, kind, timeout, step_args in PLAN:
        label = label.format(beam=cfg["beam_label"])
        if only is None or label in only:
            d.run(label, kind, timeout, step_args)
    for proc in d.builds.values():
        if proc.poll() is None:
            proc.kill()
    info = meta(d)
    text, targets = report(d, info)
    d.say("\n" + text)
    (d.out / "gpu_results.md").write_text(text)
    steps = [vars(r) for r in d.results]
    data = {"meta": info, "config": cfg, "steps": steps, "targets": [{"name": n, "ok": ok} for n, ok in targets]}
    (d.out / "gpu_results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    d.say(f"bench_gpu: {time.monotonic() - t0:.0f}s; wrote {d.out}/gpu_results.md, gpu_results.json, gpu_log.txt")
    d.log.close()
    ran = [r for r in d.results if not r.status.startswith("skipped")]
    return 0 if ran and all(r.status == "ok" for r in d.results) else 1


if __name__ == "__main__":
    sys.exit(main())
