"""Split a model's transformer layers across nodes in proportion to their free memory: a pure planner, no I/O.

Layers [0, L) go out as contiguous ranges, one per node, in node order (most free memory first). The first
shard also holds the token embedding and the last the final norm and lm_head, so those fixed costs come out
of the first and last node's memory before the layers are shared out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

GIB, MIB, KIB = 2**30, 2**20, 2**10


class PlanError(ValueError):
    """The model does not fit on the nodes offered, or no nodes were offered."""


@dataclass(frozen=True)
class ModelCosts:
    """Device bytes each part of a model takes, weights as stored (quantized ones at their packed size)."""

    model_id: str
    layer_bytes: tuple[int, ...]  # weights of layer i
    kv_bytes_per_layer: int  # one session's KV cache of one layer at max_context positions
    embed_bytes: int  # model.embed_tokens.*
    head_bytes: int  # model.norm.* + lm_head.* (a copy of the embedding when the two are tied)
    max_context: int
    # bytes that head_bytes has in common with embed_bytes (a tied embedding): one node holding both loads them once
    shared_bytes: int = 0

    def __post_init__(self) -> None:
        if not self.layer_bytes:
            raise ValueError(f"{self.model_id}: a model needs at least one layer")
        if min(self.layer_bytes) < 0 or min(self.kv_bytes_per_layer, self.embed_bytes, self.head_bytes) < 0:
            raise ValueError(f"{self.model_id}: byte counts must not be negative")
        if not 0 <= self.shared_bytes <= min(self.embed_bytes, self.head_bytes):
            raise ValueError(f"{self.model_id}: shared_bytes={self.shared_bytes} exceeds the embedding or the head")
        if self.max_context <= 0:
            raise ValueError(f"{self.model_id}: max_context={self.max_context} must be positive")

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    def layer_cost(self, i: int) -> int:
        """Weights plus one session's KV cache of layer i."""
        return self.layer_bytes[i] + self.kv_bytes_per_layer

    def fixed_bytes(self, first: bool, last: bool) -> int:
        """What a shard holds besides its layers: the embedding if first, the norm and lm_head if last."""
        head = self.head_bytes - (self.shared_bytes if first else 0)
        return (self.embed_bytes if first else 0) + (head if last else 0)

    @property
    def total_bytes(self) -> int:
        """The whole model on one node, KV cache of one session included."""
        return sum(self.layer_cost(i) for i in range(self.num_layers)) + self.fixed_bytes(True, True)


@dataclass(frozen=True)
class NodeCapacity:
    node_id: str
    name: str
    address: str
    free_memory: int  # bytes the node offers for model weights and KV cache
    # one session's KV cache per layer on this node (its compute dtype: float32 on CPUs, half on GPUs); None: the
    # model's costs.kv_bytes_per_layer
    kv_bytes_per_layer: int | None = None

    def kv(self, costs: ModelCosts) -> int:
        return costs.kv_bytes_per_layer if self.kv_bytes_per_layer is None else self.kv_bytes_per_layer


@dataclass(frozen=True)
class Assignment:
    node_id: str
    name: str
    address: str
    start: int
    end: int  # layers [start, end)
    bytes: int  # weights + KV cache + embedding/head that this shard holds
    free_memory: int

    @property
    def num_layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Plan:
    model_id: str
    num_layers: int
    max_context: int
    shards: tuple[Assignment, ...]  # in pipeline order: shards[0] holds layer 0 and the embedding
    left_out: tuple[tuple[str, str], ...] = ()  # (node name, why it holds nothing)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "num_layers": self.num_layers,
            "max_context": self.max_context,
            "shards": [asdict(s) for s in self.shards],
            "left_out": [{"name": name, "reason": reason} for name, reason in self.left_out],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Plan:
        return cls(
            model_id=str(raw["model_id"]),
            num_layers=int(raw["num_layers"]),
            max_context=int(raw["max_context"]),
            shards=tuple(Assignment(**s) for s in raw["shards"]),
            left_out=tuple((str(o["name"]), str(o["reason"])) for o in raw.get("left_out", ())),
        )


def format_bytes(n: int) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / KIB:.1f} KiB" if n >= KIB else f"{n} B"


def format_plan(plan: Plan) -> str:
    """A small table: one row per shard, then the nodes left out and why."""
    header = ("node", "address", "layers", "count", "needed", "free", "share")
    rows = [
        (
            s.name,
            s.address,
            f"[{s.start}, {s.end})",
            str(s.num_layers),
            format_bytes(s.bytes),
            format_bytes(s.free_memory),
            f"{100 * s.num_layers / plan.num_layers:.1f}%",
        )
        for s in plan.shards
    ]
    widths = [max(len(r[c]) for r in (header, *rows)) for c in range(len(header))]
    lines = [f"{plan.model_id}: {plan.num_layers} layers on {len(plan.shards)} node(s), max context {plan.max_context}"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in (header, *rows)]
    lines += [f"left out: {name} ({reason})" for name, reason in plan.left_out]
    return "\n".join(lines)


@dataclass(frozen=True)
class HeldShard:
    """Layers of the model that a node holds already, loaded for this coordinator or for another one."""

    node_id: str
    start: int
    end: int
    bytes: int


def reuse_held(plan: Plan, held: Sequence[HeldShard]) -> Plan | None:
    """`plan` redrawn over shards its nodes hold already, when those cover every layer on exactly the plan's nodes.

    Requests through different nodes then share one copy of the model. Any other node set (a node joined or
    was lost) means a fresh plan, so the cluster's current members are used."""
    nodes = {a.node_id: a for a in plan.shards}
    starting: dict[int, list[HeldShard]] = {}
    for h in sorted(held, key=lambda h: (h.start, -h.end, h.node_id)):
        if h.node_id in nodes and 0 <= h.start < h.end <= plan.num_layers:
            starting.setdefault(h.start, []).append(h)

    def chain(position: int, used: frozenset[str]) -> list[HeldShard] | None:
        if position == plan.num_layers:
            return [] if len(used) == len(nodes) else None
        for h in starting.get(position, ()):
            if h.node_id not in used and (rest := chain(h.end, used | {h.node_id})) is not None:
                return [h, *rest]
        return None

    found = chain(0, frozenset())
    if found is None:
        return None
    shards = tuple(replace(nodes[h.node_id], start=h.start, end=h.end, bytes=h.bytes) for h in found)
    return replace(plan, shards=shards)


def usable_bytes(node: NodeCapacity, headroom: float) -> int:
    return max(int(node.free_memory * (1.0 - headroom)), 0)


def plan_layers(costs: ModelCosts, nodes: Sequence[NodeCapacity], *, headroom: float = 0.1) -> Plan:
    """Contiguous layer ranges, one per node, sized to each node's usable memory (free minus headroom)."""
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom={headroom} must lie in [0, 1)")
    if not nodes:
        raise PlanError(f"no nodes to place {costs.model_id} on: start one with `clusterctl join`")
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        raise ValueError(f"a node is listed twice: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    # every field in the key, so the same nodes in any order give the same plan
    ordered = sorted(nodes, key=lambda n: (-n.free_memory, n.node_id, n.name, n.address))
    usable = {n: usable_bytes(n, headroom) for n in ordered}
    kept, left_out = _select(costs, ordered, usable, headroom)

    L, k = costs.num_layers, len(kept)
    caps = [usable[n] for n in kept]
    kvs = [n.kv(costs) for n in kept]
    room = [cap - costs.fixed_bytes(j == 0, j == k - 1) for j, cap in enumerate(caps)]
    if len(set(kvs)) > 1:  # a layer costs more on some nodes (a wider KV dtype): share out layers, not bytes
        weights = sum(costs.layer_bytes)
        room = [max(r, 0) * L * 2**20 // max(weights + L * kv, 1) for r, kv in zip(room, kvs, strict=True)]
    bounds = _bounds(_proportional_counts(L, room))
    needs = [_need(costs, bounds[j], bounds[j + 1], kvs[j]) for j in range(k)]
    if any(need > cap for need, cap in zip(needs, caps, strict=True)):
        repaired = _repair(costs, caps, kvs, bounds)
        if repaired is None:
            raise PlanError(_does_not_fit(costs, kept, usable, bounds, needs, left_out, headroom))
        bounds = repaired
    shards = []
    for j, n in enumerate(kept):
        start, end = bounds[j], bounds[j + 1]
        if start == end:
            left_out.append(
                (n.name, f"no run of whole layers fits its {format_bytes(usable[n])} usable next to the others")
            )
            continue
        need = _need(costs, start, end, n.kv(costs))
        shards.append(Assignment(n.node_id, n.name, n.address, start, end, need, n.free_memory))
    return Plan(costs.model_id, L, costs.max_context, tuple(shards), tuple(left_out))


def _select(
    costs: ModelCosts, ordered: list[NodeCapacity], usable: dict[NodeCapacity, int], headroom: float
) -> tuple[list[NodeCapacity], list[tuple[str, str]]]:
    """The nodes worth a share (ordered, largest first) and the others with the reason they hold nothing."""
    L = costs.num_layers
    # a node after the first holds at least one of layers 1..L-1; the last one also holds layer L-1 and the head
    lightest = min(costs.layer_bytes[1:]) if L > 1 else costs.layer_bytes[0]

    def smallest(n: NodeCapacity) -> int:
        return lightest + n.kv(costs)

    def last_need(n: NodeCapacity) -> int:
        return costs.layer_bytes[L - 1] + n.kv(costs) + costs.fixed_bytes(False, True)

    def too_small(n: NodeCapacity, need: int, what: str) -> tuple[str, str]:
        room = f"{format_bytes(n.free_memory)} free, {format_bytes(usable[n])} usable at {headroom:.0%} headroom"
        return n.name, f"too small: {room}; {what} needs {format_bytes(need)}"

    kept, left_out = ordered[:1], []
    for n in ordered[1:]:
        if usable[n] >= smallest(n):
            kept.append(n)
        else:
            left_out.append(too_small(n, smallest(n), "one layer"))
    # each node holds at least one layer: with more nodes than layers the smallest ones sit out
    left_out += [(n.name, f"more nodes than the model's {L} layers") for n in kept[L:]]
    kept = kept[:L]
    while len(kept) > 1 and usable[kept[-1]] < last_need(kept[-1]):
        n = kept.pop()
        left_out.append(too_small(n, last_need(n), "the last layer with the final norm and lm_head"))
    return kept, left_out


def _proportional_counts(num_layers: int, room: list[int]) -> list[int]:
    """Layer counts in proportion to `room` by largest remainder (exact integer arithmetic), at least 1 each."""
    k = len(room)
    weights = [max(r, 0) for r in room]
    total = sum(weights)
    if total == 0:
        weights, total = [1] * k, k
    counts = [num_layers * w // total for w in weights]
    by_remainder = sorted(range(k), key=lambda j: (-(num_layers * weights[j] % total), j))
    for j in by_remainder[: num_layers - sum(counts)]:
        counts[j] += 1
    for j in range(k):
        if counts[j] == 0:
            # take the layer from the node furthest above its exact quota (callers ensure k <= num_layers)
            donor = max(
                (d for d in range(k) if counts[d] > 1), key=lambda d: (counts[d] * total - num_layers * weights[d], -d)
            )
            counts[donor] -= 1
            counts[j] += 1
    return counts


def _bounds(counts: list[int]) -> list[int]:
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return bounds


def _need(costs: ModelCosts, start: int, end: int, kv: int) -> int:
    """Bytes of a shard holding layers [start, end) with `kv` bytes of KV cache per layer, with the embedding
    and head where they fall to it."""
    layers = sum(costs.layer_bytes[start:end]) + (end - start) * kv
    return layers + costs.fixed_bytes(start == 0, end == costs.num_layers)


def _repair(costs: ModelCosts, caps: list[int], kvs: list[int], target: list[int]) -> list[int] | None:
    """Boundaries (node j holds [b[j], b[j+1]), empty when it is left out) that fit every node, leaving out the
    fewest nodes and then moving the fewest layers off the proportional split (sum of |b[j] - target[j]|); None
    when nothing fits. Dynamic programming over boundaries, so it is exact for the given node order."""
    L = costs.num_layers
    prefix = [0]  # weights only: each node adds its own KV per layer
    for i in range(L):
        prefix.append(prefix[-1] + costs.layer_bytes[i])
    # boundary after node j -> ((nodes left out, layers moved), boundary before node j)
    best: dict[int, tuple[tuple[int, int], int]] = {0: ((0, 0), -1)}
    steps = []
    for j, (cap, kv) in enumerate(zip(caps, kvs, strict=True)):
        nxt: dict[int, tuple[tuple[int, int], int]] = {}
        for s in sorted(best):
            (skipped, moved), _ = best[s]
            options = [(s, skipped + 1)]  # node j holds nothing
            for e in range(s + 1, L + 1):
                if prefix[e] - prefix[s] + (e - s) * kv + costs.fixed_bytes(s == 0, e == L) > cap:
                    break  # the need only grows with e
                options.append((e, skipped))
            for e, skips in options:
                score = (skips, moved + abs(e - target[j + 1]))
                if e not in nxt or score < nxt[e][0]:
                    nxt[e] = (score, s)
        steps.append(nxt)
        best = nxt
    if L not in best:
        return None
    bounds = [L]
    for step in reversed(steps):
        bounds.append(step[bounds[-1]][1])
    return bounds[::-1]


def _does_not_fit(
    costs: ModelCosts,
    kept: list[NodeCapacity],
    usable: dict[NodeCapacity, int],
    bounds: list[int],
    needs: list[int],
    left_out: list[tuple[str, str]],
    headroom: float,
) -> str:
    """Needed vs free per node, the proportional split that was tried, and what to change."""
    total_need = sum(needs)
    total_usable = sum(usable[n] for n in kept)
    lines = [
        f"{costs.model_id} does not fit: its {costs.num_layers} layers need {format_bytes(total_need)} "
        f"(weights plus the KV cache of one session at {costs.max_context} positions) across {len(kept)} node(s) "
        f"with {format_bytes(total_usable)} usable ({headroom:.0%} headroom kept free)"
        + ("; no split into whole layers fits" if total_need <= total_usable else "")
    ]
    for j, n in enumerate(kept):
        lines.append(
            f"  {n.name} ({n.address}): layers [{bounds[j]}, {bounds[j + 1]}) need {format_bytes(needs[j])}, "
            f"{format_bytes(n.free_memory)} free ({format_bytes(usable[n])} usable)"
        )
    lines += [f"  {name}: left out, {reason}" for name, reason in left_out]
    lines.append("use a quantized variant of the model (e.g. -4bit), a smaller --max-context, or add nodes")
    return "\n".join(lines)
