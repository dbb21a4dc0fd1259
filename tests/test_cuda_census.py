"""The CUDA kernels of a decode step and a prompt chunk, rendered without a GPU (bench/cuda_census.py on tinygrad's
NULL device).

Reference: the structure a GPU needs, not a time: no kernel of a decode step or of either sampler may leave a
handful of threads to walk a long loop of loads in turn (latency-bound: tens of microseconds each on a GPU, the
shapes the census found in RMSNorm, the V projection and both samplers), and a prompt chunk's products run on
tensor cores. The `small` bench preset has the real layout (hidden 512, vocabulary 32000) at a size that builds
in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from cluster_nodes import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from random_checkpoint import ensure_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def census(tmp_path_factory):
    model, _ = ensure_checkpoint("small", tmp_path_factory.mktemp("census"))
    env = {k: v for k, v in os.environ.items() if k not in ("DEV", "JIT", "BEAM")}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "cuda_census.py"),
            "--model",
            str(model),
            "--position",
            "300",
            "--prompt",
            "64",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_no_kernel_of_a_decode_step_or_a_sampler_is_latency_bound(census):
    graphs = {k["graph"] for k in census}
    assert graphs == {"prompt 64", "decode", "greedy", "sample"}
    step = [k for k in census if k["graph"] != "prompt 64"]
    slow = [(k["graph"], k["name"], k["threads"], k["loads"]) for k in step if k["latency_bound"]]
    assert not slow, slow


def test_a_prompt_chunks_products_run_on_tensor_cores(census):
    prompt = [k for k in census if k["graph"] == "prompt 64"]
    layers = 4  # the small preset
    # q/k/v, the scores, their weighted sum of V, o, gate/up and down, in every layer but the last one's down,
    # which computes only the last token's row (a matrix-vector product). o and the weighted sum had none while
    # o read the heads through a transpose (decoder.Block).
    on_tensor_cores = [k["name"] for k in prompt if k["tensor_cores"]]
    assert len(on_tensor_cores) == 6 * layers - 1, on_tensor_cores
    assert not any(k["tensor_cores"] for k in census if k["graph"] != "prompt 64")  # one token: no tiles to fill


def test_a_layer_runs_four_products_a_warp_per_row_and_norms_on_blocks_of_32(census):
    decode = [k for k in census if k["graph"] == "decode"]
    layers = 4  # the small preset
    # q, k and v stacked into one product, o, gate and up stacked into one, down (decoder.fused_projections),
    # and the lm_head: each a warp per row, 4 rows to a block (gpu_matvec)
    products = [k for k in decode if k["threads_per_block"] == 128 and k["name"].startswith("r_")]
    assert len(products) == 4 * layers + 1, [k["name"] for k in decode]
    # each RMSNorm's mean: one block of 32 threads (two norms a layer and the final one)
    norms = [k for k in decode if k["blocks"] == 1 and k["threads_per_block"] == 32 and k["name"].startswith("r_")]
    assert len(norms) == 2 * layers + 1, [k["name"] for k in decode]
    # 14 kernels a layer (16 before the stacked products), then the embedding, the final norm and the lm_head, and
    # the step's rotation angles (cos, sin) and its attention mask, made once for every layer
    assert len(decode) == 14 * layers + 6, [k["name"] for k in decode]


def test_a_decode_step_passes_its_position_to_the_kv_writes_and_few_other_kernels(census):
    # a CUDA graph re-sends each kernel that takes start_pos to the driver at every step
    # (cuGraphExecKernelNodeSetParams: a few µs of host time each, before the graph can launch): 3 a layer when
    # every layer's q rotation and scores computed their own angles and mask; now the KV-cache write of each
    # layer, and the angles and the mask once
    decode = [k for k in census if k["graph"] == "decode"]
    layers = 4  # the small preset
    takes_position = [k["name"] for k in decode if "start_pos" in k["variables"]]
    assert len(takes_position) == layers + 3, takes_position


def test_every_kernel_launches_with_its_variables_at_zero(census):
    # tinygrad's CUDA graph builds each kernel node with every variable at 0 and sets the real values at replay;
    # a grid that is 0 there made cuGraphAddKernelNode fail ("CUDA Error 1, invalid argument") and every graph
    # fall back to launching kernels one by one: 6.5 ms of host time a step on an H200 (bench/RESULTS.md)
    empty = [(k["graph"], k["name"], k["zero_vars_launch"]) for k in census if 0 in sum(k["zero_vars_launch"], [])]
    assert not empty, empty
    # the attention kernels' grids do depend on a variable: the check above covers them
    assert any("attention_blocks" in k["name"] for k in census if k["graph"] == "decode")
