"""The coordinator on a one-node cluster (its own shards, called in-process): placing one model does not hold up
requests for another. Real ShardHost and engine processes on the committed fixtures (the tokens through a
split are checked against the single-node engine in test_cluster)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
from conftest import CHUNK, FIXTURES, TEST_TOKEN, reference

from cluster.chain import Cancellation, RequestCancelled
from cluster.coordinator import Coordinator, LocalShard
from cluster.discovery import Peer
from cluster.engine.runner import STREAM_WINDOW
from cluster.generation import GenerationResult, Prompt, generate
from cluster.host import ShardBusyError, ShardHost
from cluster.models.costs import model_costs
from cluster.tokenizer import Tokenizer

PROMPT = "The quick brown fox"


@pytest.fixture
def coordinator(tmp_path: Path):
    # one prompt chunk size: each costs seconds of warm-up per engine process (the engine tests cover several)
    host = ShardHost(tmp_path / "models", token=TEST_TOKEN, prefill_buckets=(CHUNK,), max_sessions=2)
    for name in ("llama32", "qwen3"):
        host.register_model(name, FIXTURES / name)
    me = Peer("self", "solo", "127.0.0.1", 1, 1, "CPU", "cpu", 8 << 30, 8 << 30, source="self")
    c = Coordinator(host, lambda: [me], token=TEST_TOKEN, self_id="self", self_address=me.address, max_context=128)
    yield c
    c.close()
    host.close()


def tokens(c: Coordinator, model: str, **kwargs) -> list[int]:
    prompt = c.encode(model, prompt=PROMPT, raw=True)
    *_, result = c.generate(model, prompt, max_tokens=6, sampling={"temperature": 0}, **kwargs)
    assert isinstance(result, GenerationResult)
    return result.tokens


@pytest.mark.slow  # make test-slow (CI runs it)
def test_placing_one_model_does_not_hold_up_requests_for_another(coordinator: Coordinator) -> None:
    expected = tokens(coordinator, "llama32")  # placed
    stalled, go = threading.Event(), threading.Event()

    def slow_progress(stage: str, node: str, done: int, total: int) -> None:
        stalled.set()
        assert go.wait(30), "the other request was held up until this placement gave up"

    other: list[list[int]] = []
    placing = threading.Thread(target=lambda: other.append(tokens(coordinator, "qwen3", progress=slow_progress)))
    placing.start()
    try:
        assert stalled.wait(60)  # qwen3's placement is under way and stuck
        assert tokens(coordinator, "llama32") == expected  # served meanwhile
    finally:
        go.set()
        placing.join(120)
    assert other and len(other[0]) == 6


def test_the_plan_counts_the_kv_cache_in_the_nodes_compute_dtype(coordinator: Coordinator) -> None:
    plan = coordinator.plan("llama32")  # one CPU node: the engine keeps its KV cache in float32
    assert coordinator.host.compute_dtype == "float32"
    assert plan.max_context == 128 and [(s.start, s.end) for s in plan.shards] == [(0, 4)]
    assert plan.shards[0].bytes == model_costs(FIXTURES / "llama32", max_context=128, kv_itemsize=4).total_bytes


def test_requests_beyond_the_engines_sessions_wait_their_turn(coordinator: Coordinator) -> None:
    """The engines hold 2 sessions here; 5 requests at once all finish, the later ones once a session ended."""
    expected = tokens(coordinator, "llama32")
    results: list[list[int] | BaseException] = [[] for _ in range(5)]

    def run(i: int) -> None:
        try:
            results[i] = tokens(coordinator, "llama32")
        except BaseException as e:  # noqa: BLE001
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [expected] * 5
    (shard,) = coordinator.host.live_shards()
    assert shard.sessions == set()


def test_a_request_that_waits_too_long_is_refused_as_busy(coordinator: Coordinator) -> None:
    tokens(coordinator, "llama32")
    (shard,) = coordinator.host.live_shards()
    shard.session_wait = 0.3  # `join --session-wait 0.3`
    shard.reserve("held-1")
    shard.reserve("held-2")
    try:
        with pytest.raises(ShardBusyError, match=r"^busy: all 2 sessions of llama32 .* stayed in use for 0.3 s"):
            tokens(coordinator, "llama32")
    finally:
        shard.release("held-1")
        shard.release("held-2")
    assert len(tokens(coordinator, "llama32")) == 6  # served again once sessions are free


def test_a_request_cancelled_while_it_waits_for_a_session_stops_at_once(coordinator: Coordinator) -> None:
    """The client went away (streaming.py cancels its request): the wait for a free session ends at once instead
    of taking the next free place and running a step for nobody."""
    expected = tokens(coordinator, "llama32")
    (shard,) = coordinator.host.live_shards()
    shard.reserve("held-1")
    shard.reserve("held-2")
    cancellation = Cancellation()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            tokens(coordinator, "llama32", cancellation=cancellation)
        except BaseException as e:  # noqa: BLE001
            outcome.append(e)

    waiter = threading.Thread(target=run)
    try:
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive()  # waiting: both sessions are held
        cancellation.cancel()
        waiter.join(5.0)
        assert not waiter.is_alive(), "the cancelled request kept waiting"
        assert len(outcome) == 1 and isinstance(outcome[0], RequestCancelled)
        assert shard.sessions == {"held-1", "held-2"}  # it took no place
    finally:
        shard.release("held-1")
        shard.release("held-2")
    assert tokens(coordinator, "llama32") == expected


def test_a_local_shard_takes_its_place_at_the_first_step(coordinator: Coordinator) -> None:
    """Places are taken in layer order as the first step reaches each shard, on this node's shards as on remote
    ones: two requests coordinated by different nodes then never each hold a place the other waits for."""
    tokens(coordinator, "llama32")
    (hosted,) = coordinator.host.live_shards()
    local = LocalShard(coordinator.host, hosted.shard_id, "self")
    sid = local.new_session("s")
    assert hosted.sessions == set()
    local.truncate(sid, 0)  # nothing to forget yet
    assert local.forward(sid, [1, 2, 3]).token is not None
    assert hosted.sessions == {"s"}
    local.end_session(sid)
    assert hosted.sessions == set()


def test_a_long_prompt_goes_in_chunks_that_the_caller_hears_of(coordinator: Coordinator, engines) -> None:
    """References: transformers' greedy ids for the fixture's 17-token prompt, here in chunks of 8; for a prompt of
    102 tokens, the in-process engine taking it whole (the same bits in float32 on CPU, whatever the chunks)."""
    ref = reference("llama32")

    def answer(ids: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        events: list[tuple[str, str, int, int]] = []
        chunks = coordinator.generate(
            "llama32", Prompt(ids), max_tokens=12, sampling={"temperature": 0}, progress=lambda *e: events.append(e)
        )
        *_, result = chunks
        assert isinstance(result, GenerationResult)
        return result.tokens, [(done, total) for stage, _, done, total in events if stage == "prompt"]

    assert answer(ref["prompt_ids"]) == (ref["greedy_ids"], [(8, 17), (16, 17), (17, 17)])
    # one shard has nothing to overlap: a long prompt goes in at most 8 chunks (each also runs the lm_head once)
    long = ref["prompt_ids"] * 6
    *_, whole = generate(
        [engines.get("llama32")], Tokenizer.from_dir(FIXTURES / "llama32"), long, max_tokens=12, context_limit=128
    )
    assert answer(long) == (whole.tokens, [(n, 102) for n in (16, 32, 48, 64, 80, 96, 102)])


def test_a_one_node_decode_streamed_from_the_engine_process_survives_its_death(coordinator: Coordinator) -> None:
    """The whole model on this node: the engine process decodes without waiting for the coordinator between tokens
    (generation.decode_steps; test_engine_process shows it running ahead). Killed mid-answer, its shard is placed
    again and the answer is the one the first request gave (the reference: the same greedy request before)."""
    prompt = coordinator.encode("llama32", prompt=PROMPT, raw=True)
    # longer than what the engine may decode ahead of 3 tokens read: the kill always lands mid-answer (with 16 the
    # engine could finish the answer before the kill, and then nothing was recovered)
    n = 3 + STREAM_WINDOW + 8
    expected = coordinator.generate("llama32", prompt, max_tokens=n, sampling={"temperature": 0})
    *_, reference = expected
    assert isinstance(reference, GenerationResult) and len(reference.tokens) == n
    (hosted,) = coordinator.host.live_shards()

    chunks = coordinator.generate("llama32", prompt, max_tokens=n, sampling={"temperature": 0})
    got = [next(chunks).id for _ in range(3)]  # the first token (the prompt's step), then two decoded ones
    os.kill(hosted.engine.runner.pid, signal.SIGKILL)
    *rest, result = chunks
    assert isinstance(result, GenerationResult)
    assert got + [c.id for c in rest] == result.tokens == reference.tokens
    (again,) = coordinator.host.live_shards()
    assert again is not hosted and again.engine.alive
