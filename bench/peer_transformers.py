"""Peer measurement: Hugging Face transformers (torch) on the same checkpoint and prompt.

Runs in the reference environment, never in the project's, and prints one JSON object on its last line:

    /work/refvenv/bin/python bench/peer_transformers.py MODEL_DIR --dtype bfloat16 --prompt 1,2,3 --tokens 32

`--device cuda` runs it on the GPU (every step ends in `int(argmax)`, which waits for the device).

Decoding is a manual greedy loop over the model's own KV cache (DynamicCache), one token per forward,
the same work the engine does per step; `generate` adds its logits processors and stopping checks on top.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

WARM_TOKENS = 2
TTFT_RUNS = 3


def prefill(model: Any, prompt: torch.Tensor) -> tuple[DynamicCache, int]:
    cache = DynamicCache(config=model.config)
    # logits_to_keep=1: only the last position's logits, as generate() and the engine compute
    out = model(prompt, cache=cache, use_cache=True, logits_to_keep=1)
    return cache, int(out.logits[0, -1].argmax())


def step(model: Any, cache: DynamicCache, token: int) -> int:
    out = model(torch.tensor([[token]], device=model.device), cache=cache, use_cache=True)
    return int(out.logits[0, -1].argmax())


def measure(model_dir: str, dtype: str, prompt_ids: list[int], tokens: int, device: str = "cpu") -> dict[str, Any]:
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    load_s = time.perf_counter() - t0
    prompt = torch.tensor([prompt_ids], device=device)
    with torch.inference_mode():
        # warm-up: first calls pick kernels and allocate caches; the engine's warm-up is its counterpart
        t0 = time.perf_counter()
        cache, token = prefill(model, prompt)
        for _ in range(WARM_TOKENS):
            token = step(model, cache, token)
        warmup_s = time.perf_counter() - t0

        ttfts = []
        for _ in range(TTFT_RUNS):
            t0 = time.perf_counter()
            cache, token = prefill(model, prompt)
            ttfts.append(time.perf_counter() - t0)
        for _ in range(WARM_TOKENS):
            token = step(model, cache, token)
        generated = []
        t0 = time.perf_counter()
        for _ in range(tokens):
            token = step(model, cache, token)
            generated.append(token)
        decode_s = time.perf_counter() - t0
    # parameters() yields a tied weight once, so this is the bytes one decode step reads
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "dtype": dtype,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "ttft_ms": 1e3 * statistics.median(ttfts),
        "decode_tok_s": tokens / decode_s,
        "resident_bytes": resident,
        "tokens": generated,
        "threads": torch.get_num_threads(),
        "attn": model.config._attn_implementation,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(model.device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompt", required=True, help="comma-separated token ids")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    args = ap.parse_args()
    prompt = [int(t) for t in args.prompt.split(",")]
    print(json.dumps(measure(args.model_dir, args.dtype, prompt, args.tokens, args.device)))


if __name__ == "__main__":
    main()
