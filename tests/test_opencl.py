"""The engine on OpenCL, tinygrad's path to Intel iGPUs and AMD cards without ROCm, run here on pocl (an OpenCL
implementation on the CPU; .ci/run installs it). The device has local memory and barriers like a GPU, so the
GPU kernel options (gpu_matvec) and the float16 default apply. Reference: transformers fp32 logits and mlx-lm's
for the MLX checkpoint, with the float16 tolerance of test_engine.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import BUCKETS, FIXTURES, check_float16_against_reference, graph_runners, two_sessions
from tinygrad import Device, GlobalCounters, Tensor, dtypes

from cluster.engine.launch_graph import LaunchGraph
from cluster.engine.shard import DECODE_CHAIN, ShardEngine
from cluster.models.config import QuantSpec
from cluster.models.decoder import Linear, QuantLinear, lookup
from cluster.sampling import SamplingParams


def _has_opencl() -> bool:
    try:
        Device["CL"]
    except Exception:  # noqa: BLE001 - no ICD loader, no platform, no device: all mean "not here"
        return False
    return True


pytestmark = pytest.mark.skipif(not _has_opencl(), reason="no OpenCL device (apt-get install pocl-opencl-icd)")


@pytest.mark.parametrize(
    ("name", "env"),
    [
        ("llama32", {}),
        ("llama32-4bit", {}),
        # MLX levels made from their bits (decoder.float_unpack), several rows a thread where products allow
        ("llama32-4bit", {"CLUSTERCTL_QUANT_UNPACK": "float", "CLUSTERCTL_MATVEC_ROWS": "4"}),
    ],
)
def test_engine_on_opencl_matches_the_reference(name: str, env: dict[str, str], monkeypatch) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    eng = ShardEngine(FIXTURES / name, device="CL", prefill_buckets=BUCKETS, max_context=128)
    assert eng.dtype == dtypes.float16  # what an accelerator computes in by default
    eng.warmup()
    check_float16_against_reference(eng, name)
    # decode steps queued on the device, each fed from the one before (on by default): the tokens of one forward
    # call a step on the same engine, greedy, sampled, and with the repetition penalty's marks kept on the device
    assert eng.chain == DECODE_CHAIN
    penalised = SamplingParams(temperature=0.8, seed=3, repetition_penalty=1.3)
    for params in (SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=3), penalised):
        queued, stepped = (eng.new_session(sampling=params) for _ in range(2))
        first = eng.forward(queued, list(range(1, 12)), sampling=params).token
        assert eng.forward(stepped, list(range(1, 12)), sampling=params).token == first
        want, token = [], first
        for _ in range(2 * DECODE_CHAIN + 3):  # more than two queues
            token = eng.forward(stepped, [token], sampling=params).token
            want.append(token)
        assert [r.token for r in eng.decode(queued, first, len(want), sampling=params)] == want
        eng.end_session(queued)
        eng.end_session(stepped)


def test_opencl_replays_give_the_executors_tokens() -> None:
    # reference: the same engine capturing its JITs without graphs (tinygrad's generic executor, kernel by kernel)
    prompts = [list(range(1, 20)), [5, 9, 2, 7, 11, 3, 8]]
    with_graph = ShardEngine(FIXTURES / "llama32", device="CL", prefill_buckets=BUCKETS, max_context=128)
    without = ShardEngine(FIXTURES / "llama32", device="CL", prefill_buckets=BUCKETS, max_context=128)
    without.jit_graphs = False
    for engine in (with_graph, without):
        engine.warmup()
    runners = graph_runners(with_graph._decode_jit)
    assert runners and all(isinstance(r, LaunchGraph) for r in runners)
    assert not graph_runners(without._decode_jit)
    got, want = two_sessions(with_graph, prompts, 10), two_sessions(without, prompts, 10)
    for g, w in zip(got, want, strict=True):
        assert [t for t, _ in g] == [t for t, _ in w]
        np.testing.assert_allclose([lp for _, lp in g], [lp for _, lp in w], rtol=1e-4, atol=1e-4)


def _default_device(**env: str) -> str:
    """default_device() in a new process, and the $DEV it leaves for the processes it starts: 'device DEV'."""
    child_env = {k: v for k, v in os.environ.items() if k != "DEV"} | env
    code = "import os; from cluster.engine.shard import default_device; print(default_device(), os.environ['DEV'])"
    out = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_an_opencl_device_that_is_the_cpu_is_not_the_default() -> None:
    import ctypes

    import tinygrad.runtime.autogen.opencl as cl

    kind = ctypes.c_uint64()
    cl.clGetDeviceInfo(Device["CL"].cl_dev, cl.CL_DEVICE_TYPE, 8, ctypes.byref(kind), None)  # type: ignore[attr-defined]
    if not kind.value & cl.CL_DEVICE_TYPE_CPU:
        pytest.skip("this OpenCL device is a real GPU: tinygrad's pick stands")
    # tinygrad picks OpenCL over its CPU backend; the engine does not when the OpenCL device is the CPU (pocl), and
    # the processes it starts inherit its choice, not tinygrad's (which tinygrad writes into $DEV)
    assert _default_device() == "CPU CPU"
    assert _default_device(DEV="CL") == "CL CL"  # asked for by name: taken as it is


@pytest.mark.slow  # make test-slow (CI runs it)
def test_a_node_with_no_device_named_computes_on_the_cpu_backend(tmp_path, monkeypatch) -> None:
    """A real `join` node with neither --device nor DEV, beside a CPU OpenCL device: its engine process computes
    where the node says (tinygrad's CPU backend), not on the OpenCL pick tinygrad leaves in DEV."""
    from cluster_nodes import NodeProcess

    if _default_device().split()[0] != "CPU":
        pytest.skip("this OpenCL device is a real GPU: tinygrad's pick stands")
    monkeypatch.delenv("DEV")  # the suite's pin; the node must decide for itself
    node = NodeProcess("nodev", tmp_path, mdns=False)
    try:
        node.wait_ready()
        with node.client() as client:
            *_, done = client.generate(str(FIXTURES / "llama32"), "Once upon", raw=True, max_tokens=2, temperature=0)
            assert done.finish_reason == "length"
            [view] = client.nodes()
        assert view.device == "CPU"
        assert [s["device"] for s in view.shards] == ["CPU"]  # the engine process reports its own device
    finally:
        node.stop()


@pytest.mark.parametrize("bits", [16, 4])
def test_a_large_vocabulary_is_looked_up_on_opencl(bits: int) -> None:
    # tinygrad splits a lookup in a table of 32768 ids or more into partial sums, and its OpenCL code for their sum
    # failed to compile: every real model (Llama 3.2: 128256 ids) failed its warm-up. Reference: numpy's rows.
    vocab, dim, group = 40000, 128, 64
    rng = np.random.default_rng(0)
    ids = np.array([[5, vocab - 1, 7, 123] * 4], np.int32)  # a prompt chunk of 16 tokens
    if bits == 16:
        weight = rng.standard_normal((vocab, dim)).astype(np.float16)
        table: Linear | QuantLinear = Linear(Tensor(weight, device="CL"), dtype=dtypes.float16)
        want = weight[ids]
    else:
        packed = rng.integers(0, 2**32, (vocab, dim * bits // 32), dtype=np.uint64).astype(np.uint32)
        scales, biases = (rng.standard_normal((vocab, dim // group)).astype(np.float16) for _ in range(2))
        spec = QuantSpec(group_size=group, bits=bits)
        table = QuantLinear(*(Tensor(a, device="CL") for a in (packed, scales, biases)), spec, dtypes.float16)
        levels = (packed[..., None] >> (np.arange(32 // bits, dtype=np.uint32) * bits)) & ((1 << bits) - 1)
        levels = levels.reshape(vocab, dim // group, group).astype(np.float32)
        want = (levels * scales[..., None] + biases[..., None]).reshape(vocab, dim)[ids]
    on_device = Tensor(ids, device="CL").realize()
    Tensor.realize(*table.params())
    GlobalCounters.reset()
    got = lookup(table, on_device).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    # a gather: about the rows' bytes, not the partial sums that the split wrote (32 float32 values per value here)
    assert GlobalCounters.global_mem < 4 * got.nbytes + ids.nbytes


def test_weights_are_copied_in_from_the_host(tmp_path) -> None:
    """OpenCL buffers are not host memory: tensors are laid out by numpy and copied in. Reference: numpy (the
    fixture's bf16 bits, widened) and the device's own cast to float16."""
    from cluster.weights import Checkpoint

    ckpt = Checkpoint(FIXTURES / "llama32")
    names = [f"model.layers.0.self_attn.{p}_proj.weight" for p in ("q", "k")]
    bits = [ckpt.read(ckpt.info(n)) for n in names]
    raw = ckpt.load(names[0], "CL", raw=True)
    stacked = ckpt.load_rows(names, "CL", dtypes.float32)
    half = ckpt.load(names[1], "CL", dtypes.float16)
    ckpt.materialize()
    widened = [(b.astype(np.uint32) << 16).view(np.float32) for b in bits]
    np.testing.assert_array_equal(raw.numpy(), bits[0])
    np.testing.assert_array_equal(stacked.numpy(), np.concatenate(widened))
    np.testing.assert_array_equal(half.numpy(), Tensor(widened[1], device="CL").cast(dtypes.float16).numpy())
