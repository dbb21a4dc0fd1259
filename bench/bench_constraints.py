"""What constrained decoding and OpenAI's penalties cost a decode step, on the single-node engine.

    .venv/bin/python bench/bench_constraints.py --preset llama-3.2-1b --steps 24

Variants take turns step by step in one session, so that they share the machine's state: greedy (the greedy
graph), greedy with a mask that allows every id (the sampler graph, plus the mask's upload), greedy with
frequency and presence penalties one forward a step (the sampler graph, plus the upload of the counts and the
kernel that makes the bias from them; a decode queued on the device uploads them once a queue), and sampling at
temperature 0.6.
Also times llguidance on the host: building a JSON-schema constraint (first, with the tokenizer, and again) and
computing one mask. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from random_checkpoint import PRESETS, ensure_checkpoint

from cluster.constraints import Constraint
from cluster.engine.shard import ShardEngine
from cluster.sampling import SamplingParams
from cluster.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}, "sure": {"type": "boolean"}}}


def ms(seconds: list[float]) -> str:
    return f"{1e3 * statistics.median(seconds):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.2-1b")
    parser.add_argument("--steps", type=int, default=24, help="decode steps per variant")
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).parent / ".cache")
    args = parser.parse_args()

    model_dir, _ = ensure_checkpoint(args.preset, args.cache_dir)
    engine = ShardEngine(model_dir)
    engine.warmup()
    vocab = engine.cfg.vocab_size
    tokenizer = Tokenizer.from_dir(model_dir)

    t0 = time.perf_counter()
    constraint = Constraint(tokenizer, vocab, SCHEMA)
    first_build = time.perf_counter() - t0
    builds, masks = [], []
    for _ in range(20):
        t0 = time.perf_counter()
        constraint = Constraint(tokenizer, vocab, SCHEMA)
        builds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        constraint.allowed()
        masks.append(time.perf_counter() - t0)

    every_id = bytes([255]) * -(-vocab // 8)
    variants: dict[str, tuple[SamplingParams, dict]] = {
        "greedy": (SamplingParams(), {}),
        "greedy, mask of every id": (SamplingParams(), {"allowed": every_id}),
        "greedy, frequency 0.5 + presence 0.5": (SamplingParams(frequency_penalty=0.5, presence_penalty=0.5), {}),
        "sampled (temperature 0.6, top-p 0.9)": (SamplingParams(temperature=0.6, top_p=0.9, seed=0), {}),
    }
    sid = engine.new_session()
    token = engine.forward(sid, np.arange(1, 9), sampling=SamplingParams()).token
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.steps):
        for name, (params, extra) in variants.items():
            generated = [token] if params.biased else ()
            t0 = time.perf_counter()
            token = engine.forward(sid, np.array([token]), sampling=params, generated=generated, **extra).token
            times[name].append(time.perf_counter() - t0)
    engine.end_session(sid)

    print(f"### Constrained decoding and penalties: {args.preset} on {engine.device} ({time.strftime('%Y-%m-%d')})\n")
    print("| what | median ms |")
    print("|---|---|")
    for name, values in times.items():
        print(f"| decode step, {name} | {ms(values)} |")
    print(f"| JSON-schema constraint, first build (with llguidance's tokenizer) | {1e3 * first_build:.1f} |")
    print(f"| JSON-schema constraint, later builds | {ms(builds)} |")
    print(f"| one mask on the host ({vocab} ids) | {ms(masks)} |")


if __name__ == "__main__":
    main()
