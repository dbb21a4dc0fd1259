"""The layer planner (pure: hand-made costs and nodes) and the per-layer costs read from the committed fixtures."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import ALL_MODELS, FIXTURES

from cluster.models.config import ModelConfig
from cluster.models.costs import kv_bytes_per_layer, model_costs, tensor_costs
from cluster.partition import (
    GIB,
    MIB,
    Assignment,
    HeldShard,
    ModelCosts,
    NodeCapacity,
    Plan,
    PlanError,
    format_bytes,
    format_plan,
    plan_layers,
    reuse_held,
    usable_bytes,
)
from cluster.weights import Checkpoint, CheckpointError


def costs(layers: list[int] | int = 6, *, layer: int = 1000, kv: int = 0, embed: int = 0, head: int = 0) -> ModelCosts:
    layer_bytes = tuple(layers) if isinstance(layers, list) else (layer,) * layers
    return ModelCosts("m", layer_bytes, kv, embed, head, max_context=16)


def node(name: str, free: int) -> NodeCapacity:
    return NodeCapacity(f"id-{name}", name, f"10.0.0.{len(name)}:50051", free)


def counts(plan: Plan) -> dict[str, int]:
    return {s.name: s.num_layers for s in plan.shards}


def ranges(plan: Plan) -> list[tuple[str, int, int]]:
    return [(s.name, s.start, s.end) for s in plan.shards]


# ------------------------------------------------------------------------------------------------ planner
def test_splits_in_proportion_to_free_memory() -> None:
    few_mb = costs(6, layer=MIB, embed=2 * MIB, head=2 * MIB)
    plan = plan_layers(few_mb, [node("one", 1 * GIB), node("two", 2 * GIB), node("three", 3 * GIB)])
    assert ranges(plan) == [("three", 0, 3), ("two", 3, 5), ("one", 5, 6)]
    assert plan.shards[0].bytes == 3 * MIB + 2 * MIB and plan.shards[-1].bytes == MIB + 2 * MIB
    assert plan.left_out == ()


def test_equal_pair_splits_evenly() -> None:
    assert counts(plan_layers(costs(4), [node("a", GIB), node("b", GIB)])) == {"a": 2, "b": 2}
    # the tied fixture: the last node also holds a copy of the embedding as its lm_head
    tied = model_costs(FIXTURES / "llama32", max_context=64)
    plan = plan_layers(tied, [node("b", 4 * MIB), node("a", 4 * MIB)])
    assert ranges(plan) == [("a", 0, 2), ("b", 2, 4)]


def test_same_plan_whatever_the_input_order() -> None:
    nodes = [node("a", 5 * GIB), node("b", 3 * GIB), node("c", 3 * GIB), node("d", 8 * GIB)]
    plans = {plan_layers(costs(10, embed=300), list(p)) for p in itertools.permutations(nodes)}
    assert len(plans) == 1
    (plan,) = plans
    # ties on free memory are broken by node id, and the largest node comes first
    assert [s.name for s in plan.shards] == ["d", "a", "b", "c"]


def test_every_node_gets_at_least_one_layer() -> None:
    plan = plan_layers(costs(8), [node("big", 1000 * GIB), node("small", 10 * MIB)])
    assert counts(plan) == {"big": 7, "small": 1}


def test_more_nodes_than_layers_leaves_the_smallest_out() -> None:
    nodes = [node(f"n{i}", (i + 1) * GIB) for i in range(6)]
    plan = plan_layers(costs(4), nodes)
    assert [s.name for s in plan.shards] == ["n5", "n4", "n3", "n2"]
    assert [name for name, _ in plan.left_out] == ["n1", "n0"]
    assert all("more nodes than" in reason for _, reason in plan.left_out)


def test_too_small_node_is_left_out_with_a_reason() -> None:
    plan = plan_layers(costs(4, layer=100 * MIB), [node("big", 4 * GIB), node("tiny", 50 * MIB)])
    assert counts(plan) == {"big": 4}
    ((name, reason),) = plan.left_out
    assert name == "tiny" and "too small" in reason and "100.0 MiB" in reason and "50.0 MiB free" in reason


def test_last_node_must_hold_the_head_as_well() -> None:
    # "small" could hold one layer, but the last node also carries the final norm and lm_head
    model = costs(4, layer=100 * MIB, embed=200 * MIB, head=200 * MIB)
    plan = plan_layers(model, [node("big", 4 * GIB), node("small", 250 * MIB)], headroom=0.0)
    assert counts(plan) == {"big": 4}
    assert "lm_head" in plan.left_out[0][1] and "300.0 MiB" in plan.left_out[0][1]


def test_does_not_fit_lists_needed_and_free_per_node() -> None:
    model = costs(8, layer=GIB, embed=GIB // 2, head=GIB // 2)
    with pytest.raises(PlanError) as err:
        plan_layers(model, [node("alpha", 4 * GIB), node("beta", 3 * GIB), node("gamma", 10 * MIB)])
    message = str(err.value)
    assert "does not fit" in message
    assert "alpha" in message and "4.00 GiB free" in message and "3.60 GiB usable" in message
    assert "beta" in message and "3.00 GiB free" in message
    assert "gamma: left out, too small" in message
    assert "quantized" in message and "--max-context" in message


def test_no_nodes() -> None:
    with pytest.raises(PlanError, match="no nodes"):
        plan_layers(costs(), [])


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="headroom"):
        plan_layers(costs(), [node("a", GIB)], headroom=1.0)
    with pytest.raises(ValueError, match="listed twice"):
        plan_layers(costs(), [node("a", GIB), node("a", 2 * GIB)])
    with pytest.raises(ValueError, match="at least one layer"):
        costs([])


def test_headroom_is_kept_free() -> None:
    model = costs(10, layer=100 * MIB, kv=10 * MIB, embed=50 * MIB, head=60 * MIB)
    nodes = [node("a", 700 * MIB), node("b", 660 * MIB)]
    # whole layers of 110 MiB: "a" holds 5 with the embedding (600 MiB), "b" needs room for 5 with the head (610)
    assert counts(plan_layers(model, nodes, headroom=0.0)) == {"a": 5, "b": 5}
    with pytest.raises(PlanError, match="no split into whole layers fits"):
        plan_layers(model, nodes, headroom=0.1)  # "b" has 594 MiB usable: room for 4
    for headroom in (0.0, 0.05):
        for s, n in zip(plan_layers(model, nodes, headroom=headroom).shards, nodes, strict=True):
            assert s.bytes <= usable_bytes(n, headroom)


def test_repair_moves_layers_to_nodes_with_room() -> None:
    # by count the 2:2 split would put both heavy layers on "b" (600 > 500): one moves to "a"
    model = costs([100, 100, 300, 300])
    plan = plan_layers(model, [node("a", 700), node("b", 500)], headroom=0.0)
    assert ranges(plan) == [("a", 0, 3), ("b", 3, 4)]
    assert [s.bytes for s in plan.shards] == [500, 300]


def test_repair_leaves_out_a_node_no_range_fits() -> None:
    # "b" has room for layer 0 or 2 but sits between them: layer 1 (250 B) is the only one it could take
    model = ModelCosts("m", (27, 245, 115), 5, 40, 43, max_context=16, shared_bytes=40)
    plan = plan_layers(model, [node("a", 620), node("b", 197), node("c", 181)], headroom=0.0)
    assert ranges(plan) == [("a", 0, 2), ("c", 2, 3)]
    assert plan.left_out == (("b", "no run of whole layers fits its 197 B usable next to the others"),)


def test_uneven_layers() -> None:
    model = costs([50, 400, 10, 10, 10, 400, 50], kv=5, embed=30, head=40)
    plan = plan_layers(model, [node("a", 600), node("b", 500), node("c", 200)], headroom=0.0)
    for s in plan.shards:
        assert s.bytes <= s.free_memory
    assert sum(s.bytes for s in plan.shards) == sum(model.layer_bytes) + 7 * 5 + 30 + 40


def test_single_node_loads_a_tied_embedding_once() -> None:
    tied = model_costs(FIXTURES / "llama32", max_context=64)
    (shard,) = plan_layers(tied, [node("solo", GIB)]).shards
    assert shard.bytes == tied.total_bytes
    assert (
        shard.bytes == sum(tied.layer_cost(i) for i in range(4)) + tied.embed_bytes + tied.head_bytes - tied.embed_bytes
    )


def test_plan_to_dict_and_table() -> None:
    plan = plan_layers(costs(6, layer=MIB), [node("one", GIB), node("three", 3 * GIB), node("tiny", 1)])
    raw = json.loads(json.dumps(plan.to_dict()))
    assert raw["shards"][0] == {
        "node_id": "id-three",
        "name": "three",
        "address": "10.0.0.5:50051",
        "start": 0,
        "end": 5,
        "bytes": 5 * MIB,
        "free_memory": 3 * GIB,
    }
    assert raw["left_out"][0]["name"] == "tiny"
    assert Plan.from_dict(raw) == plan
    table = format_plan(plan)
    assert "[0, 5)" in table and "[5, 6)" in table and "3.00 GiB" in table and "83.3%" in table
    assert "left out: tiny (too small" in table
    assert [format_bytes(n) for n in (512, 1536, 5 * MIB // 2, 3 * GIB // 2)] == [
        "512 B",
        "1.5 KiB",
        "2.5 MiB",
        "1.50 GiB",
    ]


def _fits(model: ModelCosts, nodes: list[NodeCapacity], caps: list[int], bounds: list[int]) -> bool:
    k = len(caps)
    for j in range(k):
        layers = sum(model.layer_bytes[i] + nodes[j].kv(model) for i in range(bounds[j], bounds[j + 1]))
        if layers + model.fixed_bytes(j == 0, j == k - 1) > caps[j]:
            return False
    return True


def _any_plan_fits(model: ModelCosts, nodes: list[NodeCapacity], headroom: float) -> bool:
    """Brute force: some subset of the nodes (in plan order) and some contiguous split fit."""
    ordered = sorted(nodes, key=lambda n: (-n.free_memory, n.node_id))
    L = model.num_layers
    for m in range(1, min(len(ordered), L) + 1):
        for subset in itertools.combinations(ordered, m):
            caps = [usable_bytes(n, headroom) for n in subset]
            for cuts in itertools.combinations(range(1, L), m - 1):
                if _fits(model, list(subset), caps, [0, *cuts, L]):
                    return True
    return False


@pytest.mark.parametrize(
    ("uniform", "mixed_kv"),
    [(True, False), (False, False), (False, True)],
    ids=["uniform-layers", "uneven-layers", "uneven-layers-per-node-kv"],
)
def test_invariants_on_random_inputs(uniform: bool, mixed_kv: bool) -> None:
    rng = np.random.default_rng(1234 if uniform else 4321 + mixed_kv)
    planned = refused = 0
    for _ in range(300):
        L = int(rng.integers(1, 9))
        layer_bytes = [int(rng.integers(50, 150))] * L if uniform else [int(b) for b in rng.integers(0, 300, L)]
        embed = int(rng.integers(0, 200))
        model = ModelCosts(
            "m", tuple(layer_bytes), int(rng.integers(0, 30)), embed, embed + int(rng.integers(0, 5)), 16, embed
        )
        k = int(rng.integers(1, 6))
        nodes = [node(f"n{i}", int(rng.integers(0, 900))) for i in range(k)]
        if mixed_kv:  # some nodes keep their KV cache in a wider dtype (a CPU next to GPUs)
            nodes = [replace(n, kv_bytes_per_layer=int(rng.choice([0, 10, 40]))) for n in nodes]
        headroom = float(rng.choice([0.0, 0.1, 0.25]))
        try:
            plan = plan_layers(model, nodes, headroom=headroom)
        except PlanError:
            refused += 1
            assert not _any_plan_fits(model, nodes, headroom)  # the planner misses no plan
            continue
        planned += 1
        shards = plan.shards
        assert plan_layers(model, nodes[::-1], headroom=headroom) == plan
        assert shards[0].start == 0 and shards[-1].end == L
        assert all(a.end == b.start for a, b in itertools.pairwise(shards))
        assert all(s.num_layers >= 1 for s in shards)
        assert sorted([s.name for s in shards] + [name for name, _ in plan.left_out]) == sorted(n.name for n in nodes)
        assert [s.free_memory for s in shards] == sorted((s.free_memory for s in shards), reverse=True)
        by_id = {n.node_id: n for n in nodes}
        for j, s in enumerate(shards):
            assert s.bytes <= usable_bytes(by_id[s.node_id], headroom)
            fixed = model.fixed_bytes(j == 0, j == len(shards) - 1)
            kv = by_id[s.node_id].kv(model)
            assert s.bytes == sum(model.layer_bytes[i] + kv for i in range(s.start, s.end)) + fixed
    assert planned > 50 and refused > 10  # both branches exercised


def test_a_node_with_a_wider_kv_dtype_gets_fewer_layers() -> None:
    model = costs(8, layer=MIB, kv=MIB)  # the KV cache weighs as much as the weights (long context)
    gpu = replace(node("gpu", 10 * MIB), node_id="gpu")  # half-precision KV: the model's figure
    cpu = replace(node("cpu", 9 * MIB), node_id="cpu", kv_bytes_per_layer=2 * MIB)  # float32 KV
    plan = plan_layers(model, [gpu, cpu], headroom=0.0)
    assert ranges(plan) == [("gpu", 0, 5), ("cpu", 5, 8)]
    assert [s.bytes for s in plan.shards] == [5 * 2 * MIB, 3 * 3 * MIB]
    # counted in half precision on both, the CPU would get 4 layers: 12 MiB, more than it has
    assert counts(plan_layers(model, [gpu, replace(cpu, kv_bytes_per_layer=None)], headroom=0.0)) == {
        "gpu": 4,
        "cpu": 4,
    }


# ------------------------------------------------------------------------------------------------ reuse
def test_reuse_takes_the_held_ranges_when_they_cover_the_plans_nodes() -> None:
    plan = plan_layers(costs(6), [node("a", 3 * MIB), node("bb", 2 * MIB), node("ccc", MIB)])
    assert ranges(plan) == [("a", 0, 3), ("bb", 3, 5), ("ccc", 5, 6)]
    # loaded through another node when free memory read a little differently: the boundaries moved by one
    held = [HeldShard("id-bb", 2, 5, 77), HeldShard("id-a", 0, 2, 66), HeldShard("id-ccc", 5, 6, 55)]
    reused = reuse_held(plan, held)
    assert reused is not None
    assert ranges(reused) == [("a", 0, 2), ("bb", 2, 5), ("ccc", 5, 6)]
    assert [s.bytes for s in reused.shards] == [66, 77, 55]
    assert [s.free_memory for s in reused.shards] == [s.free_memory for s in plan.shards]
    assert reused.model_id == plan.model_id and reused.max_context == plan.max_context
    assert reuse_held(plan, [HeldShard(s.node_id, s.start, s.end, s.bytes) for s in plan.shards]) == plan


def test_reuse_finds_a_chain_among_several_copies() -> None:
    plan = plan_layers(costs(6), [node("a", MIB), node("bb", MIB)])
    held = [
        HeldShard("id-a", 0, 4, 1),  # a dead end: bb holds nothing from layer 4
        HeldShard("id-a", 0, 3, 1),
        HeldShard("id-bb", 3, 6, 1),
        HeldShard("id-bb", 0, 6, 1),  # one node holding everything does not use the plan's two nodes
    ]
    reused = reuse_held(plan, held)
    assert reused is not None and ranges(reused) == [("a", 0, 3), ("bb", 3, 6)]


def test_no_reuse_unless_held_shards_cover_every_layer_on_exactly_the_plans_nodes() -> None:
    plan = plan_layers(costs(6), [node("a", 3 * MIB), node("bb", 2 * MIB), node("ccc", MIB)])
    two_nodes = [HeldShard("id-a", 0, 3, 1), HeldShard("id-bb", 3, 6, 1)]  # before ccc joined: ccc is used now
    gap = [HeldShard("id-a", 0, 3, 1), HeldShard("id-bb", 3, 4, 1), HeldShard("id-ccc", 5, 6, 1)]
    stranger = [HeldShard("id-a", 0, 3, 1), HeldShard("id-zz", 3, 5, 1), HeldShard("id-ccc", 5, 6, 1)]
    twice = [HeldShard("id-a", 0, 2, 1), HeldShard("id-bb", 2, 4, 1), HeldShard("id-a", 4, 6, 1)]
    for held in (two_nodes, gap, stranger, twice, []):
        assert reuse_held(plan, held) is None, held


# ------------------------------------------------------------------------------------------------ costs
def file_bytes(name: str) -> int:
    return sum(info.nbytes for info in Checkpoint(FIXTURES / name).tensors.values())


def test_costs_of_a_tied_checkpoint() -> None:
    c = model_costs(FIXTURES / "llama32", max_context=128)
    tensors = Checkpoint(FIXTURES / "llama32").tensors
    assert c.model_id == "llama32" and c.num_layers == 4 and c.max_context == 128
    for i, b in enumerate(c.layer_bytes):
        assert b == sum(t.nbytes for n, t in tensors.items() if n.startswith(f"model.layers.{i}."))
    assert c.embed_bytes == tensors["model.embed_tokens.weight"].nbytes
    assert c.head_bytes == c.embed_bytes + tensors["model.norm.weight"].nbytes
    assert c.shared_bytes == c.embed_bytes


def test_costs_of_an_untied_checkpoint_cover_every_tensor() -> None:
    c = model_costs(FIXTURES / "mistral", max_context=128, model_id="mistral-tiny")
    assert c.model_id == "mistral-tiny" and c.shared_bytes == 0
    assert sum(c.layer_bytes) + c.embed_bytes + c.head_bytes == file_bytes("mistral")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_costs_count_each_stored_tensor_once(name: str) -> None:
    c = model_costs(FIXTURES / name, max_context=32)
    assert sum(c.layer_bytes) + c.embed_bytes + c.head_bytes - c.shared_bytes == file_bytes(name)


def test_quantized_costs_are_the_stored_bytes() -> None:
    full = model_costs(FIXTURES / "llama32", max_context=32)
    q4 = model_costs(FIXTURES / "llama32-4bit", max_context=32)
    q8 = model_costs(FIXTURES / "llama32-8bit", max_context=32)
    tensors = Checkpoint(FIXTURES / "llama32-4bit").tensors
    assert q4.embed_bytes == sum(
        tensors[f"model.embed_tokens.{leaf}"].nbytes for leaf in ("weight", "scales", "biases")
    )
    for part in ("embed_bytes", "head_bytes"):
        assert getattr(q4, part) < getattr(q8, part) < getattr(full, part)
    assert sum(q4.layer_bytes) < 0.4 * sum(full.layer_bytes)
    assert q4.kv_bytes_per_layer == full.kv_bytes_per_layer  # the cache is kept in the compute dtype
    # mixed precision: layer 0 keeps some modules at 8 bits, so it costs more than the others
    mixed = model_costs(FIXTURES / "qwen3-4bit-mixed", max_context=32)
    assert mixed.layer_bytes[0] > mixed.layer_bytes[1] == mixed.layer_bytes[-1]


def test_kv_bytes_per_layer() -> None:
    cfg = ModelConfig.from_dir(FIXTURES / "llama32")
    c = model_costs(FIXTURES / "llama32", max_context=1000)
    assert c.kv_bytes_per_layer == 2 * cfg.num_kv_heads * 1000 * cfg.head_dim * 2 == 2 * 2 * 1000 * 16 * 2
    assert kv_bytes_per_layer(cfg, 1000, kv_itemsize=4) == 2 * c.kv_bytes_per_layer
    assert c.layer_cost(3) == c.layer_bytes[3] + c.kv_bytes_per_layer
    assert model_costs(FIXTURES / "llama32", max_context=500).kv_bytes_per_layer == c.kv_bytes_per_layer // 2


def test_context_is_capped_at_the_models_positions_as_the_engine_caps_it() -> None:
    cfg = ModelConfig.from_dir(FIXTURES / "llama32")
    beyond = model_costs(FIXTURES / "llama32", max_context=cfg.max_position_embeddings * 4)
    assert beyond.max_context == cfg.max_position_embeddings
    assert beyond.kv_bytes_per_layer == kv_bytes_per_layer(cfg, cfg.max_position_embeddings)


def test_tensor_costs_from_a_manifest() -> None:
    cfg = ModelConfig.from_dir(FIXTURES / "mistral")
    manifest = {name: info.nbytes for name, info in Checkpoint(FIXTURES / "mistral").tensors.items()}
    base = tensor_costs(cfg, manifest, max_context=64, model_id="m")
    # tensors the decoder never loads cost nothing
    extra = {
        **manifest,
        "model.layers.0.self_attn.rotary_emb.inv_freq": 999,
        "model.layers.99.mlp.up_proj.weight": 999,
        "unrelated.weight": 999,
    }
    assert tensor_costs(cfg, extra, max_context=64, model_id="m") == base
    with pytest.raises(CheckpointError, match="layer"):
        tensor_costs(cfg, {n: b for n, b in manifest.items() if ".layers.2." not in n}, max_context=64, model_id="m")
    with pytest.raises(CheckpointError, match="lm_head"):
        tensor_costs(cfg, {n: b for n, b in manifest.items() if n != "lm_head.weight"}, max_context=64, model_id="m")


def test_planning_a_fixture_with_its_costs() -> None:
    c = model_costs(FIXTURES / "mistral", max_context=64)
    plan = plan_layers(c, [node("a", MIB), node("b", MIB // 2)], headroom=0.0)
    assert [(s.start, s.end) for s in plan.shards] == [(0, 3), (3, 4)]
    assert plan.shards[0].bytes == c.embed_bytes + sum(c.layer_cost(i) for i in range(3))
    assert plan.shards[1].bytes == c.head_bytes + c.layer_cost(3)
    assert isinstance(plan.shards[0], Assignment)
