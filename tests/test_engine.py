"""ShardEngine against the references: transformers fp32 logits for the float checkpoints, mlx-lm fp32
logits for the MLX-quantized ones, and the whole single-node model for every split."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    ALL_MODELS,
    BUCKETS,
    CHUNK,
    FIXTURES,
    check_float16_against_reference,
    full_logprobs,
    log_softmax,
    reference,
    reference_logits,
)
from tinygrad import Device, Tensor, dtypes
from tinygrad.engine.jit import GraphRunner
from tinygrad.engine.realize import run_linear
from tinygrad.uop.ops import Ops, UOp

from cluster.engine.shard import (
    ContextFullError,
    EngineError,
    ShardEngine,
    copy_into,
    copy_out,
    default_prefill_buckets,
    session_capacity,
    uses_graphs,
)
from cluster.generation import prompt_chunk, step
from cluster.models.config import ModelConfig
from cluster.models.decoder import _Loader
from cluster.sampling import SamplingParams
from cluster.weights import Checkpoint

TOL = 1e-3  # max |logprob difference|; observed ~5e-5 in fp32 on CPU


def run_tokens(shards, prompt, n, sampling=None):
    sid = "s"
    for s in shards:
        s.new_session(sid, sampling)
    try:
        ids, out = list(prompt), []
        for _ in range(n):
            r = step(shards, sid, ids, sampling or SamplingParams(), 0, generated=out[-1:])  # the prompt is not
            out.append(r.token)
            ids = [r.token]
        return out
    finally:
        for s in shards:
            s.end_session(sid)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_matches_reference_logits_and_greedy(engines, name):
    ref, logits = reference(name), reference_logits(name)
    eng = engines.get(name)
    prompt, greedy = ref["prompt_ids"], ref["greedy_ids"]
    sid = eng.new_session()
    try:
        r = eng.forward(sid, np.array(prompt), logprobs=512)
        got, errs = [r.token], [np.abs(full_logprobs(r) - log_softmax(logits[len(prompt) - 1])).max()]
        assert abs(r.logprob - log_softmax(logits[len(prompt) - 1])[r.token]) < TOL
        for i in range(len(greedy) - 1):
            r = eng.forward(sid, np.array([got[-1]]), logprobs=512)
            got.append(r.token)
            errs.append(np.abs(full_logprobs(r) - log_softmax(logits[len(prompt) + i])).max())
    finally:
        eng.end_session(sid)
    assert got == greedy
    assert max(errs) < TOL, f"{name}: logprob error {max(errs):.2e}"


@pytest.mark.parametrize("name", ["qwen2", "llama32-4bit", "qwen3-4bit-mixed"])
def test_stacked_projections_match_the_reference(monkeypatch, name):
    """GPUs compute a layer's q, k and v in one product and gate and up in another (decoder.fused_projections).
    Forced on here on the CPU, the stacked weights (with qwen2's biases, MLX words, scales and biases) give the
    reference's logits (transformers / mlx-lm) and its greedy tokens."""
    monkeypatch.setenv("CLUSTERCTL_FUSED_PROJECTIONS", "1")
    ref, logits = reference(name), reference_logits(name)
    eng = ShardEngine(FIXTURES / name, prefill_buckets=BUCKETS, max_context=64)
    assert {"qkv", "gate_up"} <= set(eng.model.blocks[0].m) and "q" not in eng.model.blocks[0].m
    prompt, greedy = ref["prompt_ids"], ref["greedy_ids"]
    sid = eng.new_session()
    r = eng.forward(sid, np.array(prompt), logprobs=512)
    got, errs = [r.token], [np.abs(full_logprobs(r) - log_softmax(logits[len(prompt) - 1])).max()]
    for i in range(len(greedy) - 1):
        r = eng.forward(sid, np.array([got[-1]]), logprobs=512)
        got.append(r.token)
        errs.append(np.abs(full_logprobs(r) - log_softmax(logits[len(prompt) + i])).max())
    assert got == greedy
    assert max(errs) < TOL, f"{name}: logprob error {max(errs):.2e}"


def test_products_quantized_differently_are_not_stacked():
    cfg = ModelConfig.from_dir(FIXTURES / "qwen3-4bit-mixed")  # layer 0's down_proj: 8-bit, groups of 32
    loader = _Loader(cfg, Checkpoint(FIXTURES / "qwen3-4bit-mixed"), "CPU", dtypes.float32, 4)
    paths = ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert loader.stacked_linear(paths, cfg.hidden_size) is None and not loader.used  # nothing loaded


@pytest.mark.parametrize("name", ["llama32", "qwen3-4bit-mixed"])
def test_prefill_positions_match_reference(engines, name):
    """Prompts ending inside, at and across chunk boundaries give the reference's next-token logits."""
    ref, logits = reference(name), reference_logits(name)
    eng = engines.get(name)
    sequence = ref["prompt_ids"] + ref["greedy_ids"][:-1]  # what the reference logits were computed over
    for k in (1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1, 3 * CHUNK):
        sid = eng.new_session()
        r = eng.forward(sid, np.array(sequence[:k]), logprobs=512)
        eng.end_session(sid)
        assert np.abs(full_logprobs(r) - log_softmax(logits[k - 1])).max() < TOL, f"prefix length {k}"


@pytest.mark.parametrize("name", ["llama32", "qwen2", "llama32-4bit"])
def test_split_into_2_and_3_shards_gives_the_whole_models_tokens(engines, name):
    ref = reference(name)
    whole = run_tokens([engines.get(name)], ref["prompt_ids"], 12)
    for cuts in ([0, 2, 4], [0, 1, 3, 4]):
        shards = [engines.get(name, a, b) for a, b in zip(cuts, cuts[1:], strict=False)]
        assert [s.is_first for s in shards] == [True] + [False] * (len(shards) - 1)
        assert run_tokens(shards, ref["prompt_ids"], 12) == whole
        sampled = SamplingParams(temperature=0.9, top_p=0.95, seed=7)
        assert run_tokens(shards, ref["prompt_ids"], 8, sampled) == run_tokens(
            [engines.get(name)], ref["prompt_ids"], 8, sampled
        )


def test_shard_holds_only_its_own_weights(engines):
    whole = engines.get("mistral")
    first, last = engines.get("mistral", 0, 2), engines.get("mistral", 2, 4)
    assert first.model.lm_head is None and first.model.norm is None and first.model.embed is not None
    assert last.model.embed is None and last.model.lm_head is not None
    # untied model: the shards partition the checkpoint's bytes exactly
    assert first.weight_bytes + last.weight_bytes == whole.weight_bytes
    assert first.weight_bytes < whole.weight_bytes


def test_no_compilation_after_warmup(engines):
    from tinygrad.engine import realize

    eng = ShardEngine(FIXTURES / "qwen2", prefill_buckets=BUCKETS, max_context=128)
    eng.warmup()
    before = (len(realize.runtime_cache), all(j.cnt > 1 for j in eng._prefill_jits.values()), eng._decode_jit.cnt > 1)
    assert before[1] and before[2], "warm-up must capture both graphs"
    prompts = [[5], [5, 6, 7], list(range(10, 10 + CHUNK)), list(range(20, 20 + 3 * CHUNK + 2))]
    for p in prompts:
        run_tokens([eng], p, 4)
    run_tokens([eng], [1, 2, 3], 60)  # a long generation across many positions
    run_tokens(
        [eng],
        [9, 8],
        5,
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=3),
    )
    assert len(realize.runtime_cache) == before[0], "a kernel was compiled after warm-up"


def test_sessions_are_isolated(engines):
    eng = engines.get("llama32")
    ref = reference("llama32")
    a_prompt, b_prompt = ref["prompt_ids"], ref["prompt_ids"][:5]
    alone_a, alone_b = run_tokens([eng], a_prompt, 6), run_tokens([eng], b_prompt, 6)
    eng.new_session("a")
    eng.new_session("b")
    ra = eng.forward("a", np.array(a_prompt))
    rb = eng.forward("b", np.array(b_prompt))
    ta, tb = [ra.token], [rb.token]
    for _ in range(5):  # interleaved decode steps
        ta.append(eng.forward("a", np.array([ta[-1]])).token)
        tb.append(eng.forward("b", np.array([tb[-1]])).token)
    eng.end_session("a")
    eng.end_session("b")
    assert (ta, tb) == (alone_a, alone_b)
    assert "a" not in eng.sessions and "b" not in eng.sessions


def test_bad_input_gets_a_clear_error_and_the_engine_keeps_serving(engines):
    first, last = engines.get("llama32", 0, 2), engines.get("llama32", 2, 4)
    sid = first.new_session()
    with pytest.raises(EngineError, match="out of range"):
        first.forward(sid, np.array([1, 99999]))
    with pytest.raises(EngineError, match="token ids"):
        first.forward(sid, np.zeros((2, 64), np.float32))
    with pytest.raises(EngineError, match="unknown session"):
        first.forward("nope", np.array([1]))
    last.new_session(sid)
    with pytest.raises(EngineError, match=r"shape \(T, 64\)"):
        last.forward(sid, np.zeros((3, 63), np.float32))
    with pytest.raises(EngineError, match="NaN"):
        last.forward(sid, np.full((1, 64), np.nan, np.float32))
    with pytest.raises(EngineError, match="already exists"):
        first.new_session(sid)
    first.end_session(sid)
    last.end_session(sid)
    ref = reference("llama32")
    assert run_tokens([first, last], ref["prompt_ids"], 12) == ref["greedy_ids"]


def test_context_full_is_an_error_not_a_crash(engines):
    eng = engines.get("llama32", max_context=24)
    sid = eng.new_session()
    eng.forward(sid, np.arange(20))
    with pytest.raises(ContextFullError):
        eng.forward(sid, np.arange(5))
    for _ in range(4):
        eng.forward(sid, np.array([3]))
    with pytest.raises(ContextFullError):
        eng.forward(sid, np.array([3]))
    eng.end_session(sid)


def test_too_many_sessions(engines):
    eng = engines.get("llama32", max_sessions=2)
    eng.new_session("x")
    eng.new_session("y")
    with pytest.raises(EngineError, match="too many sessions"):
        eng.new_session("z")


def test_session_capacity_counts_kv_caches_that_fit_beside_the_weights():
    GB = 1 << 30
    assert session_capacity(None, 5 * GB, GB, 8) == 8  # no budget known (an accelerator without --memory)
    assert session_capacity(100 * GB, 5 * GB, GB, 8) == 8  # plenty: the asked number
    assert session_capacity(7 * GB + GB // 2, 5 * GB, GB, 8) == 2  # two whole caches fit
    assert session_capacity(5 * GB + GB // 2, 5 * GB, GB, 8) == 1  # never below one: the load check covers it


def test_memory_budget_lowers_max_sessions(engines):
    """A budget with room for the weights and two and a half KV caches gives two sessions: the third is refused
    by the engine (on a node it waits for a turn instead, tests/test_cli.py)."""
    plain = engines.get("llama32")
    assert plain.max_sessions == 8 and plain.info()["max_sessions"] == 8  # this machine's free memory holds 8
    kv = plain.kv_bytes_per_session()
    eng = engines.get("llama32", memory_budget=plain.weight_bytes + 2 * kv + kv // 2)
    assert eng.max_sessions == 2 and eng.info()["max_sessions"] == 2
    eng.new_session("x")
    eng.new_session("y")
    with pytest.raises(EngineError, match=r"too many sessions \(2\)"):
        eng.new_session("z")
    for sid in ("x", "y"):
        eng.end_session(sid)
    with pytest.raises(EngineError, match="need"):
        engines.get("llama32", memory_budget=plain.weight_bytes + kv - 1)
    eng.end_session("x")
    eng.new_session("z")
    eng.end_session("y")
    eng.end_session("z")


def test_prompt_chunk_plan(engines):
    eng = engines.get("llama32")  # buckets (4, 8)
    assert eng._plan(1) == [(1, 4)]
    assert eng._plan(5) == [(5, 8)]  # one padded 8-chunk beats 4 + a padded 4
    assert eng._plan(11) == [(8, 8), (3, 4)]
    assert eng._plan(17) == [(8, 8), (8, 8), (1, 4)]
    assert sum(rows for rows, _ in eng._plan(100)) == 100


@pytest.mark.parametrize("name", ["llama32", "llama32-4bit"])
def test_a_prompt_in_pipeline_chunks_gives_the_whole_prompts_numbers_to_the_bit(engines, name):
    """What lets a pipelined prefill (generation.step) hand a CPU shard its smallest chunks: in float32 they give
    the hidden states, and the cache the next step reads, of the prompt taken whole (its plan: 8, 8, then 4).
    Not so in float16, where the engine asks for its biggest chunk instead."""
    eng = engines.get(name, 0, 2)
    ids = np.asarray(reference(name)["prompt_ids"])
    assert eng.pipeline_chunk_size == 4 and engines.get(name, dtype="float16").pipeline_chunk_size == CHUNK

    def run(size: int) -> tuple[np.ndarray, np.ndarray]:
        sid = eng.new_session()
        hidden = np.concatenate([eng.forward(sid, ids[i : i + size]).hidden for i in range(0, len(ids), size)])
        after = eng.forward(sid, ids[:1]).hidden
        eng.end_session(sid)
        return hidden, after

    whole, chunked = run(len(ids)), run(eng.pipeline_chunk_size)
    assert np.array_equal(whole[0], chunked[0]) and np.array_equal(whole[1], chunked[1])
    # engines in the caller's process are never cut into chunks (threads would run two of them at once)
    assert prompt_chunk([eng]) == 0 and prompt_chunk([eng, engines.get(name, 2, None)]) == 0


@pytest.mark.parametrize("name", ["llama32", "qwen2", "llama32-4bit"])
def test_float16_compute_stays_close_to_the_reference(engines, name):
    """The accelerator default (float16 compute, fp16 KV cache), exercised on CPU against the same fp32
    references with a tolerance fitting half precision."""
    check_float16_against_reference(engines.get(name, dtype="float16"), name)


def test_float16_shards_warm_up_and_chain_like_the_whole_model(engines):
    """The accelerator default on CPU: shards after the first take hidden states in fp16, and their warm-up
    copies fp16 into their input buffers as a request does (it once copied fp32, twice the buffer's bytes:
    CUDA refused it on an H200). Reference: the whole fp16 engine's greedy tokens."""
    prompt = reference("llama32")["prompt_ids"]
    whole = engines.get("llama32", dtype="float16")
    shards = [engines.get("llama32", lo, hi, dtype="float16") for lo, hi in ((0, 2), (2, 4))]
    for shard in shards:
        shard.warmup()
    assert run_tokens(shards, prompt, 8) == run_tokens([whole], prompt, 8)


def test_a_truncated_session_goes_on_like_a_fresh_one(engines):
    """K/V that truncate leaves past the end lie inside the last block of positions attention reads; the mask
    must hide them. Reference: a fresh session fed the same tokens (logprobs over the whole vocabulary)."""
    eng = engines.get("llama32")
    prompt = reference("llama32")["prompt_ids"]

    def continue_from(sid, first):
        r, out = first, [full_logprobs(first)]
        for _ in range(4):
            r = eng.forward(sid, np.array([r.token]), logprobs=512)
            out.append(full_logprobs(r))
        return np.array(out)

    fresh, used = eng.new_session(), eng.new_session()
    try:
        want = continue_from(fresh, eng.forward(fresh, np.array(prompt), logprobs=512))
        r = eng.forward(used, np.array(prompt))
        for _ in range(12):  # positions past the prompt, then forgotten
            r = eng.forward(used, np.array([(r.token + 7) % 512]))
        eng.truncate(used, len(prompt) - 2)
        got = continue_from(used, eng.forward(used, np.array(prompt[-2:]), logprobs=512))
    finally:
        eng.end_session(fresh)
        eng.end_session(used)
    # not to the bit: the two sessions split attention over other chunks, which moves float32 logprobs by ~1e-5
    # (8e-6 through tinygrad's prompt matmuls, 1.4e-5 through cpu_quant's on x86)
    np.testing.assert_allclose(got, want, atol=5e-5)


def test_copying_host_data_of_the_wrong_size_into_an_engine_buffer_is_refused():
    t = Tensor.zeros(1, 4, 8, dtype=dtypes.float16).contiguous().realize()
    with pytest.raises(ValueError, match="copy of 128 bytes .* into a 64-byte"):
        copy_into(t, np.zeros((1, 4, 8), np.float32))
    copy_into(t, np.ones((1, 4, 8), np.float16))
    assert t.numpy().sum() == 32


def test_copy_out_reads_what_numpy_reads():
    # reference: Tensor.numpy(), which copy_out replaces on the engine's per-step reads
    data = np.arange(32, dtype=np.float16).reshape(1, 4, 8)
    t = Tensor(data).contiguous().realize()
    full, head = copy_out(t), copy_out(t, 8)
    assert full.dtype == np.float16 and full.shape == (32,) and head.shape == (8,)
    np.testing.assert_array_equal(full, t.numpy().reshape(-1))
    np.testing.assert_array_equal(head, data.reshape(-1)[:8])
    view = Tensor(np.arange(10, dtype=np.float32)).contiguous().realize()[2:6].contiguous().realize()
    np.testing.assert_array_equal(copy_out(view), [2, 3, 4, 5])


def test_a_shard_that_does_not_fit_is_refused_before_loading():
    with pytest.raises(EngineError, match=r"need 0\.\d MiB .* float32.* only 0\.1 MiB is available"):
        ShardEngine(FIXTURES / "llama32", 0, 2, max_context=64, memory_budget=100_000)
    eng = ShardEngine(FIXTURES / "llama32", 0, 2, max_context=64, memory_budget=10 * 2**20)
    assert eng.weight_bytes < 10 * 2**20


class _FailingGraph(GraphRunner):
    """A device graph that fails as tinygrad 0.14's CUDA graph did on an H200: when built (fail_after 0), or
    after `fail_after` replays in all (until then it launches its kernels one by one)."""

    fail_after = 0
    replays = 0

    def __init__(self, linear, input_uops=()):
        if self.fail_after == 0:
            raise RuntimeError("CUDA Error 1, invalid argument (cuGraphAddKernelNode)")
        super().__init__(linear, input_uops)

    def __call__(self, input_uops, var_vals, wait=False):
        type(self).replays += 1
        if type(self).replays > self.fail_after:
            raise RuntimeError("CUDA Error 1, invalid argument (cuGraphExecKernelNodeSetParams)")
        run_linear(UOp(Ops.LINEAR, src=self.linear.src), var_vals, input_uops=input_uops, jit=True)
        return None


@pytest.mark.parametrize("fail_after", [0, 5], ids=["fails-when-built", "fails-at-replay"])
def test_a_failing_device_graph_falls_back_to_plain_kernels(engines, monkeypatch, caplog, fail_after, tmp_path):
    # a graph cache of its own: the run's shared one may hold this shard's graphs, which would not be captured
    monkeypatch.setenv("CLUSTERCTL_GRAPH_CACHE", str(tmp_path))
    ref = reference("llama32")
    sampled = SamplingParams(temperature=0.9, top_p=0.95, seed=7)
    plain = engines.get("llama32")  # built before the patch: no graphs
    want = run_tokens([plain], ref["prompt_ids"], 6, sampled), run_tokens([plain], ref["prompt_ids"][:3], 4)
    graph = type("Graph", (_FailingGraph,), {"fail_after": fail_after, "replays": 0})
    monkeypatch.setattr(Device["CPU"], "graph", graph)  # the CPU device has no graph of its own
    eng = ShardEngine(FIXTURES / "llama32", prefill_buckets=BUCKETS, max_context=128, device="CPU")
    with caplog.at_level("WARNING", logger="cluster.engine.shard"):
        eng.warmup()  # captures every graph: where a node meets the failure
        assert run_tokens([eng], ref["prompt_ids"], 12) == ref["greedy_ids"]
        assert run_tokens([eng], ref["prompt_ids"], 12) == ref["greedy_ids"]  # replays of the rebuilt graphs
        # sampled, and a prompt in the smaller bucket: every graph is replayed after the failure
        assert (run_tokens([eng], ref["prompt_ids"], 6, sampled), run_tokens([eng], ref["prompt_ids"][:3], 4)) == want
    assert not eng.jit_graphs and graph.replays >= fail_after
    jits = [*eng._prefill_jits.values(), eng._decode_jit, eng._greedy_jit, eng._sample_jit]
    assert all(j.captured is not None and not uses_graphs(j) for j in jits)
    warnings = [r.message for r in caplog.records]
    assert len(warnings) == 1 and "device graph failed" in warnings[0], warnings


def test_prompt_chunks_default_to_512_tokens_on_nvidia_only():
    # on an H200 one chunk of 512 took a 512-token prompt's first token from 116 to 41 ms at the same warm-up
    # (bench/RESULTS.md); on a slow CPU each chunk size costs seconds of warm-up and 512 wins nothing
    assert default_prefill_buckets("CUDA") == default_prefill_buckets("NV:1") == (16, 64, 512)
    assert [default_prefill_buckets(d) for d in ("CPU", "CL:0", "AMD")] == [(16, 64)] * 3
    eng = ShardEngine(FIXTURES / "llama32", max_context=64, device="CPU")  # no warm-up: only its settings are read
    assert eng.buckets == (16, 64) and eng.chunk == 64


def test_decode_steps_queued_on_the_device_give_the_tokens_of_one_forward_a_step(monkeypatch):
    """A whole model's decode steps queued a few at a time (CLUSTERCTL_DECODE_CHAIN at most), each step's input fed
    from the one before on the device. References: transformers' greedy ids, and for seeded sampling the same engine
    called one forward a step."""
    from tinygrad.engine import realize

    import cluster.engine.shard as shard

    monkeypatch.setenv("CLUSTERCTL_DECODE_CHAIN", "4")
    monkeypatch.setattr(shard, "QUEUE_S", 60.0)  # queues as long as allowed, however slow this machine is today
    eng = ShardEngine(FIXTURES / "llama32", prefill_buckets=BUCKETS, max_context=40)
    eng.warmup()
    assert eng.chain == 4 and "feed" in eng._jits()
    compiled = len(realize.runtime_cache)
    ref = reference("llama32")
    prompt, greedy_ids = ref["prompt_ids"], ref["greedy_ids"]

    def decoded(params: SamplingParams, n: int, stop_ids: tuple[int, ...] = ()) -> tuple[list[int], int]:
        sid = eng.new_session(sampling=params)
        first = eng.forward(sid, prompt, sampling=params).token
        out = [first] + [r.token for r in eng.decode(sid, first, n, sampling=params, stop_ids=stop_ids)]
        length = eng.sessions[sid].length
        eng.end_session(sid)
        return out, length

    assert decoded(SamplingParams(), 11) == (greedy_ids, len(prompt) + 11)
    sampled = SamplingParams(temperature=0.9, top_p=0.95, seed=5)
    assert decoded(sampled, 9)[0] == run_tokens([eng], prompt, 10, sampled)
    # the repetition penalty's marks kept on the device, sampled and at temperature 0
    for penalised in (
        SamplingParams(temperature=0.9, seed=5, repetition_penalty=1.5),
        SamplingParams(repetition_penalty=2.0),
    ):
        fed = eng._feed_jit.cnt
        assert decoded(penalised, 11)[0] == run_tokens([eng], prompt, 12, penalised)
        assert eng._feed_jit.cnt == fed + 11  # queued, not one forward a step
    # OpenAI's penalties and logit_bias: the generated ids counted on the device, the bias made there from them (a
    # negative frequency penalty makes the sampled answer repeat ids inside a queue: counts left stale there fail it)
    banned = greedy_ids[2]
    answers = []
    for biased in (
        SamplingParams(presence_penalty=-2.0, frequency_penalty=1.5, logit_bias=((banned, -100.0),)),
        SamplingParams(temperature=0.9, seed=5, frequency_penalty=-2.0, repetition_penalty=1.2),
    ):
        fed = eng._feed_jit.cnt
        answers.append(decoded(biased, 11)[0])
        assert answers[-1] == run_tokens([eng], prompt, 12, biased) and eng._feed_jit.cnt == fed + 11
    assert banned not in answers[0] and answers[0] != greedy_ids
    # a stop id read in the middle of a queue of 4 ends the tokens there; the queue's other steps ran
    assert greedy_ids[3] not in greedy_ids[:3]
    assert decoded(SamplingParams(), 11, (greedy_ids[3],)) == (greedy_ids[:4], len(prompt) + 4)
    # a queue holds the steps QUEUE_S takes: with steps slower than that, one at a time, and nothing is wasted
    monkeypatch.setattr(shard, "QUEUE_S", 1e-9)
    assert decoded(SamplingParams(), 11, (greedy_ids[3],)) == (greedy_ids[:4], len(prompt) + 3)
    monkeypatch.setattr(shard, "QUEUE_S", 60.0)
    # two sessions' decodes read in turns (as an engine process serves two streams): each queue starts from its own
    # session's token and sampling, whatever the other session ran since
    sessions = [(eng.new_session(sampling=p), p) for p in (SamplingParams(), sampled)]
    streams = [eng.decode(sid, eng.forward(sid, prompt, sampling=p).token, 9, sampling=p) for sid, p in sessions]
    turns = [[r.token for r in pair] for pair in zip(*streams, strict=True)]
    assert [t[0] for t in turns] == greedy_ids[1:10] and [t[1] for t in turns] == run_tokens(
        [eng], prompt, 10, sampled
    )[1:]
    for sid, _ in sessions:
        eng.end_session(sid)
    # a context that fills up mid-queue: every step that fits, then the error
    sid = eng.new_session()
    first = eng.forward(sid, prompt).token
    got: list[int] = []
    with pytest.raises(ContextFullError):
        for r in eng.decode(sid, first, 100):
            got.append(r.token)
    assert len(got) == 40 - len(prompt) and got[:11] == greedy_ids[1:]
    eng.end_session(sid)
    assert len(realize.runtime_cache) == compiled, "a kernel was compiled after warm-up"
    monkeypatch.setenv("CLUSTERCTL_DECODE_CHAIN", "9")
    with pytest.raises(ValueError, match="from 0 to 8"):
        ShardEngine(FIXTURES / "llama32", prefill_buckets=BUCKETS, max_context=40)
