"""The cluster as users run it: `clusterctl join` processes on 127.0.0.1 finding each other over real mDNS on
loopback (or through --peer only), a memory-weighted plan, and generation through 1, 2 and 3 nodes.

Reference for every split: the single-node engine (ShardEngine over the whole model in this process), greedy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from checkpoints import deepen
from cluster_nodes import ROOT, NodeProcess, every_session_taken, member_names, open_sessions, shards_of, wait_for
from conftest import FIXTURES

from cluster.client import DoesNotFit, InvalidRequest, ModelNotFound

PROMPTS = ["The small river runs past", "In the morning the baker", "Numbers like 2024 appear", "Hello"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Six-layer checkpoints (so 1:2:3 splits are exact): a bf16 float model and an MLX 4-bit one."""
    root = tmp_path_factory.mktemp("models")
    return {name: deepen(FIXTURES / name, root / name, 6) for name in ("llama32", "llama32-4bit")}


@pytest.fixture(scope="module")
def single_node(models):
    """Greedy tokens of the single-node engine, per (model, prompt)."""
    from cluster.engine.shard import ShardEngine
    from cluster.generation import GenerationResult, generate
    from cluster.tokenizer import Tokenizer

    cache: dict[tuple[str, str], list[int]] = {}

    def tokens(model: str, prompt: str) -> list[int]:
        if (model, prompt) not in cache:
            engine = ShardEngine(models[model], max_context=256)
            tok = Tokenizer.from_dir(models[model])
            for p in {prompt, *PROMPTS}:
                ids = tok.encode(p, add_special_tokens=True)
                *_, result = generate([engine], tok, ids, max_tokens=MAX_TOKENS, context_limit=256)
                assert isinstance(result, GenerationResult)
                cache[(model, p)] = result.tokens
        return cache[(model, prompt)]

    return tokens


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """Three nodes offering 1, 2 and 3 GiB, announcing and browsing over mDNS on 127.0.0.1 only."""
    work = tmp_path_factory.mktemp("trio")
    nodes = [NodeProcess(f"mem{m}", work, memory=m) for m in (1, 2, 3)]
    try:
        for n in nodes:
            n.wait_ready()
        wait_for(lambda: all(member_names(n) == {"mem1", "mem2", "mem3"} for n in nodes), 30, "mDNS discovery")
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def cluster_tokens(node: NodeProcess, model: Path, prompt: str) -> list[int]:
    with node.client() as c:
        *_, last = c.generate(str(model), prompt, raw=True, max_tokens=MAX_TOKENS, temperature=0)
    assert last.finish_reason == "length" and last.tokens is not None
    return last.tokens


def test_three_nodes_find_each_other_over_mdns(trio):
    with trio[0].client() as c:
        nodes = {n.name: n for n in c.nodes()}
    assert set(nodes) == {"mem1", "mem2", "mem3"}
    assert nodes["mem3"].total_memory == 3 << 30 and nodes["mem1"].device == "CPU"


def test_plan_splits_layers_by_free_memory(trio, models):
    with trio[1].client() as c:
        plan = c.plan(str(models["llama32"]))
    assert plan.num_layers == 6
    assert [(s["name"], s["layers"]) for s in plan.shards] == [("mem3", [0, 3]), ("mem2", [3, 5]), ("mem1", [5, 6])]
    # the same plan from the CLI, as JSON
    p = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "plan", str(models["llama32"]), "--node", trio[2].address, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert [s["layers"] for s in json.loads(p.stdout)["shards"]] == [[0, 3], [3, 5], [5, 6]]


@pytest.mark.parametrize("model", ["llama32", pytest.param("llama32-4bit", marks=pytest.mark.slow)])
def test_three_nodes_give_the_single_node_tokens(trio, models, single_node, model):
    for prompt in PROMPTS[:2]:
        assert cluster_tokens(trio[0], models[model], prompt) == single_node(model, prompt)
    # every node pulled its layers from the coordinating node and holds one shard of the plan
    with trio[0].client() as c:
        held = {n.name: [s["layers"] for s in n.shards if s["model_id"] == model] for n in c.nodes()}
    assert held == {"mem3": [[0, 3]], "mem2": [[3, 5]], "mem1": [[5, 6]]}


def test_a_prompt_longer_than_a_prefill_chunk_is_pipelined_through_the_nodes(trio, models, single_node):
    """228 prompt ids in chunks of 64 (the nodes' prefill chunk), each node on its own chunk at once: the same
    tokens as the single-node engine taking the prompt whole."""
    long = " ".join(
        ["The small river runs past the old mill, and in the morning the baker counts numbers like 2024."] * 6
    )
    events: list[tuple[str, str, int, int]] = []
    with trio[0].client() as c:
        *_, last = c.generate(
            str(models["llama32"]),
            long,
            raw=True,
            max_tokens=MAX_TOKENS,
            temperature=0,
            on_progress=lambda *e: events.append(e),
        )
    assert last.tokens == single_node("llama32", long)
    # the client hears of each chunk as it leaves the last node (a progress bar in `clusterctl run`)
    assert [e for e in events if e[0] == "prompt"] == [("prompt", "", n, 228) for n in (64, 128, 192, 228)]
    with trio[0].client() as c:  # what the coordinator reads from each shard to cut the prompt
        chunks = {n.name: [s["pipeline_chunk"] for s in n.shards if s["model_id"] == "llama32"] for n in c.nodes()}
    assert chunks == {"mem1": [64], "mem2": [64], "mem3": [64]}


def test_requests_through_another_node_share_the_placed_shards(trio, models, single_node):
    """Each node coordinates what it is sent; the second coordinator finds the layers placed by the first and
    steps through the same shards instead of loading a second copy of the model."""
    cluster_tokens(trio[0], models["llama32"], PROMPTS[0])
    for coordinator in trio[1:]:
        assert cluster_tokens(coordinator, models["llama32"], PROMPTS[2]) == single_node("llama32", PROMPTS[2])
    with trio[2].client() as c:
        held = {n.name: [s["layers"] for s in n.shards if s["model_id"] == "llama32"] for n in c.nodes()}
    assert held == {"mem3": [[0, 3]], "mem2": [[3, 5]], "mem1": [[5, 6]]}


def test_concurrent_sessions_each_give_their_own_output(trio, models, single_node):
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def run(prompt: str) -> None:
        try:
            results[prompt] = cluster_tokens(trio[1], models["llama32"], prompt)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert results == {p: single_node("llama32", p) for p in PROMPTS}


def device_memory(node: NodeProcess) -> dict[str, int]:
    """Device bytes each node's shards hold now (weights and KV caches), as the engines count them."""
    with node.client() as c:
        return {n.name: sum(s["memory_used"] for s in n.shards) for n in c.nodes()}


def test_ten_concurrent_sessions_finish_and_memory_returns_to_its_baseline(trio, models, single_node):
    def memory() -> dict[str, int]:
        return device_memory(trio[0])

    # the engines hold up to 8 sessions each: the last requests wait on every node, local and remote, for a turn
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(10)]
    cluster_tokens(trio[0], models["llama32"], prompts[0])  # placed and warm
    baseline = memory()
    assert all(v > 0 for v in baseline.values()), baseline
    results: list[list[int] | BaseException] = [[] for _ in prompts]

    def run(i: int) -> None:
        try:
            results[i] = cluster_tokens(trio[0], models["llama32"], prompts[i])
        except BaseException as e:  # noqa: BLE001
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == [single_node("llama32", p) for p in prompts]
    # every shard freed the sessions' KV slices: device memory in use is back where it was
    wait_for(lambda: memory() == baseline, 20, "the KV caches to be freed")


def test_streamed_chunks_and_sampling_options(trio, models):
    with trio[2].client() as c:
        chunks = list(c.generate(str(models["llama32"]), "Hello", raw=True, max_tokens=5, temperature=0, logprobs=3))
        again = list(c.generate(str(models["llama32"]), "Hello", raw=True, max_tokens=5, temperature=0.8, seed=7))
        same = list(c.generate(str(models["llama32"]), "Hello", raw=True, max_tokens=5, temperature=0.8, seed=7))
    *tokens, last = chunks
    assert len(tokens) == 5 and all(len(t.top) == 3 and t.top[0][0] == t.token_id for t in tokens)
    assert last.usage == {
        "prompt_tokens": last.usage["prompt_tokens"],
        "completion_tokens": 5,
        "total_tokens": last.usage["prompt_tokens"] + 5,
    }
    assert last.timing["ttft_ms"] > 0 and last.tokens == [t.token_id for t in tokens]
    # each node's share of a decode step: its engine's time (measured on that node, carried in its answers) within
    # the coordinating node's wait for it, which adds the hand-offs and, for the other nodes, the network
    shards = last.timing["shards"]
    assert [(s["node"], s["layers"]) for s in shards] == [("mem3", [0, 3]), ("mem2", [3, 5]), ("mem1", [5, 6])]
    assert all(0 < s["engine_ms"] < s["wait_ms"] for s in shards), shards
    assert again[-1].tokens == same[-1].tokens  # same seed, same output, through three nodes


def test_async_client_streams_the_same_tokens(trio, models, single_node):
    import asyncio

    from cluster import AsyncClient

    async def main() -> tuple[list[int], list[str], int]:
        async with AsyncClient(trio[2].address) as c:
            chunks = [x async for x in c.generate(str(models["llama32"]), PROMPTS[1], raw=True, max_tokens=MAX_TOKENS)]
            nodes = await c.nodes()
            plan = await c.plan(str(models["llama32"]))
        assert chunks[-1].tokens is not None
        return chunks[-1].tokens, sorted(n.name for n in nodes), plan.num_layers

    tokens, names, layers = asyncio.run(main())
    assert tokens == single_node("llama32", PROMPTS[1])  # the fixture sets no sampling defaults: greedy
    assert names == ["mem1", "mem2", "mem3"] and layers == 6


def test_a_client_that_goes_away_ends_its_session_on_every_node(trio, models):
    cluster_tokens(trio[0], models["llama32"], "Hello")  # placed and warm
    baseline = device_memory(trio[0])
    with trio[0].client() as c:
        stream = c.generate(str(models["llama32"]), "Hello", raw=True, max_tokens=200, temperature=0)
        next(stream), next(stream)
        assert open_sessions(trio[0]) == 3  # one KV slice per shard
        during = device_memory(trio[0])
        assert all(during[name] > baseline[name] for name in baseline), (baseline, during)
        stream.close()  # the client stops reading: the call is cancelled
    wait_for(lambda: open_sessions(trio[0]) == 0, 10, "every shard to free the session")
    assert device_memory(trio[0]) == baseline


def test_a_client_that_goes_away_while_its_request_waits_frees_the_sessions_it_opened(trio, models):
    """Every session of the model's last shard is taken (by streams opened here, straight to its node), so a
    request through trio[0] opens sessions on the shards before it and waits there. Its client's deadline
    passes: the coordinator stops the wait and ends those sessions at once, while the places stay taken,
    instead of holding them until a place frees or 5 minutes pass."""
    from cluster.client import Client, ClusterError

    cluster_tokens(trio[0], models["llama32"], "Hello")  # placed and warm
    node, last = shards_of(trio, models["llama32"].name)[-1]
    with every_session_taken(node, last):
        assert open_sessions(trio[0]) == last.max_sessions
        failure: list[BaseException] = []

        def wait_in_vain() -> None:
            with Client(trio[0].address, timeout=4) as c:
                try:
                    list(c.generate(str(models["llama32"]), "Hello", raw=True, max_tokens=4, temperature=0))
                except ClusterError as e:
                    failure.append(e)

        request = threading.Thread(target=wait_in_vain)
        request.start()
        wait_for(lambda: open_sessions(trio[0]) > last.max_sessions, 10, "sessions on the shards before the full one")
        request.join(30)
        assert failure and "Deadline Exceeded" in str(failure[0]), failure
        wait_for(lambda: open_sessions(trio[0]) == last.max_sessions, 10, "the sessions of the request to end")
    wait_for(lambda: open_sessions(trio[0]) == 0, 10, "the held sessions to end")
    assert cluster_tokens(trio[0], models["llama32"], "Hello")  # serving as before


def test_bad_requests_get_clear_errors_and_the_node_keeps_serving(trio, models, tmp_path):
    with trio[0].client() as c:
        with pytest.raises(ModelNotFound):
            list(c.generate("no-such-model-here", "hi", raw=True))
        with pytest.raises(InvalidRequest, match="top_p"):
            list(c.generate(str(models["llama32"]), "hi", raw=True, top_p=2.0))
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
        with pytest.raises(InvalidRequest, match="gemma2"):
            list(c.generate(str(tmp_path), "hi", raw=True))
        *_, last = c.generate(str(models["llama32"]), "Hello", raw=True, max_tokens=2, temperature=0)
        assert last.finish_reason == "length"


def test_a_model_too_big_for_the_cluster_is_refused_with_the_numbers(tmp_path, models):
    node = NodeProcess("tiny", tmp_path, memory=0.0001, mdns=False)
    try:
        node.wait_ready()
        with node.client() as c, pytest.raises(DoesNotFit, match="tiny"):
            c.plan(str(models["llama32"]))
    finally:
        node.stop()


@pytest.mark.slow  # make test-slow (CI runs it)
def test_peers_only_join_and_leave(tmp_path, models, single_node):
    """--peer without mDNS: two nodes, then a third joins an idle cluster and is used by the next plan, then it
    leaves and is dropped. Requests go through both a and b: after every change the two coordinators end up
    sharing one copy of the model, and nothing of an old plan stays loaded."""
    a = NodeProcess("a", tmp_path, memory=2, mdns=False)
    b = NodeProcess("b", tmp_path, memory=1, mdns=False, peers=[a.address])
    c = None
    try:
        a.wait_ready()
        b.wait_ready()
        wait_for(lambda: member_names(a) == {"a", "b"} == member_names(b), 20, "peers to see each other")
        prompt = PROMPTS[0]
        assert cluster_tokens(a, models["llama32"], prompt) == single_node("llama32", prompt)
        assert cluster_tokens(b, models["llama32"], prompt) == single_node("llama32", prompt)

        def held() -> dict[str, list[list[int]]]:
            with a.client() as client:
                return {n.name: [s["layers"] for s in n.shards] for n in client.nodes()}

        with a.client() as client:
            assert [s["name"] for s in client.plan(str(models["llama32"])).shards] == ["a", "b"]
        assert sorted(map(len, held().values())) == [1, 1]
        c = NodeProcess("c", tmp_path, memory=3, mdns=False, peers=[b.address])
        c.wait_ready()
        wait_for(lambda: member_names(a) == {"a", "b", "c"} == member_names(b), 20, "every peer to know the new node")
        # both coordinators give back the idle placement planned over the old members at once
        wait_for(lambda: held() == {"a": [], "b": [], "c": []}, 20, "the stale placement to be released")
        assert cluster_tokens(a, models["llama32"], prompt) == single_node("llama32", prompt)
        assert cluster_tokens(b, models["llama32"], prompt) == single_node("llama32", prompt)
        assert held() == {"c": [[0, 3]], "a": [[3, 5]], "b": [[5, 6]]}  # one copy, shared
        c.stop()
        wait_for(lambda: member_names(a) == {"a", "b"} == member_names(b), 15, "the node that left to be dropped")
        assert cluster_tokens(a, models["llama32"], prompt) == single_node("llama32", prompt)
        assert cluster_tokens(b, models["llama32"], prompt) == single_node("llama32", prompt)
        wait_for(lambda: sorted(map(len, held().values())) == [1, 1], 20, "one copy over a and b")
    finally:
        for n in (a, b, c):
            if n is not None:
                n.stop()
