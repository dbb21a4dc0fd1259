"""Start-up benchmark: a shard's first start (graphs captured) next to its second (graphs read from the graph cache).

    .venv/bin/python bench/bench_start.py --preset llama-3.2-1b --out bench/RESULTS.md

Each start is a new process, as a restarted node's engine is, on one fresh graph cache: load the checkpoint, warm
up, then one prompt and a few greedy tokens, which must be the same in every start (the reference: the first
start, whose graphs were captured in its own process). The peer, Hugging Face transformers (eager, nothing to
compile), is timed from load to its first token on the same checkpoint and prompt. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
from bench_engine import REF_PYTHON, cpu_model, measure_peer, memory_gib
from random_checkpoint import PRESETS, ensure_checkpoint

BENCH_DIR = Path(__file__).resolve().parent


def start_once(model_dir: str, prompt: list[int], tokens: int) -> dict[str, object]:
    """One start in this process: what a node's engine process does before it serves, then a first answer."""
    t0 = time.perf_counter()
    from cluster.engine.shard import ShardEngine  # tinygrad's import counts as part of a start

    engine = ShardEngine(model_dir)
    load_s = time.perf_counter() - t0
    engine.warmup()
    warm_s = time.perf_counter() - t0 - load_s
    sid = engine.new_session()
    t1 = time.perf_counter()
    token = engine.forward(sid, np.asarray(prompt, np.int32)).token
    ttft_ms = 1e3 * (time.perf_counter() - t1)
    out = [token]
    for _ in range(tokens - 1):
        out.append(engine.forward(sid, np.asarray([out[-1]], np.int32)).token)
    return {
        "load_s": load_s,
        "warmup_s": warm_s,
        "ttft_ms": ttft_ms,
        "ready_s": load_s + warm_s,
        "from_cache": engine.graphs_from_cache,
        "device": engine.device,
        "dtype": str(engine.dtype.name),
        "tokens": out,
    }


def run_start(model_dir: Path, prompt: list[int], tokens: int, cache: Path) -> dict[str, object]:
    env = {**os.environ, "CLUSTERCTL_GRAPH_CACHE": str(cache)}
    cmd = [sys.executable, __file__, "--worker", json.dumps([str(model_dir), prompt, tokens])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=BENCH_DIR.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"start failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0  # the interpreter's start and imports included
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3.2-1b", choices=sorted(PRESETS))
    ap.add_argument("--starts", type=int, default=2, help="starts on one graph cache (the first captures)")
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--no-peer", action="store_true", help="skip HF transformers")
    ap.add_argument("--ref-python", default=REF_PYTHON, help="Python with torch + transformers for the peer")
    ap.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".cache")
    ap.add_argument("--out", type=Path, help="append the table to this markdown file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        model_dir, prompt, tokens = json.loads(args.worker)
        print(json.dumps(start_once(model_dir, prompt, tokens)))
        return 0

    model_dir, _ = ensure_checkpoint(args.preset, args.cache_dir, 0)
    prompt = np.random.default_rng(0).integers(0, int(PRESETS[args.preset]["vocab_size"]), args.prompt_len).tolist()
    starts = []
    with tempfile.TemporaryDirectory(prefix="graphs-") as cache:
        for i in range(args.starts):
            print(f"start {i + 1} ...", file=sys.stderr, flush=True)
            starts.append(run_start(model_dir, prompt, args.tokens, Path(cache)))
        files = sorted(Path(cache).glob("*.graphs"))
        cache_bytes = sum(f.stat().st_size for f in files)
    same = all(s["tokens"] == starts[0]["tokens"] for s in starts)
    rows = [
        "| start | graphs | process s | load s | warm-up s | ready s | TTFT ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(starts):
        rows.append(
            f"| clusterctl ShardEngine, start {i + 1} | {'read from the cache' if s['from_cache'] else 'captured'} "
            f"| {s['process_s']:.1f} | {s['load_s']:.1f} | {s['warmup_s']:.1f} | {s['ready_s']:.1f} "
            f"| {s['ttft_ms']:.0f} |"
        )
    if not args.no_peer:
        print("peer ...", file=sys.stderr, flush=True)
        _, peer = measure_peer(model_dir, "float32", np.asarray(prompt), args.tokens, 1.0, args.ref_python)
        rows.append(
            f"| HF transformers {peer['transformers']} float32 (eager) | none | — | {peer['load_s']:.1f} "
            f"| {peer['warmup_s']:.1f} | {peer['load_s'] + peer['warmup_s']:.1f} | {peer['ttft_ms']:.0f} |"
        )
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    first = starts[0]
    text = "\n".join(
        [
            f"### Start-up: {args.preset}, {first['device']} {first['dtype']}, prompt {args.prompt_len} tokens ({now})",
            "",
            f"- machine: {cpu_model()}, {os.cpu_count()} cores, {memory_gib():.0f} GiB RAM, "
            f"tinygrad {version('tinygrad')}",
            "- each start a new process on one fresh graph cache (default prefill chunks 16,64, context 4096); "
            "ready = load + warm-up; process = the whole run, interpreter start and a first answer included",
            f"- graph cache: {len(files)} file(s), {cache_bytes / 2**20:.1f} MiB; the starts' {args.tokens} greedy "
            f"tokens are {'the same' if same else 'NOT the same'} in every start",
            "",
            *rows,
            "",
        ]
    )
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
