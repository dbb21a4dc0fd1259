"""The coordinator: the node that receives a request plans the layers over the cluster, places the shards and
drives each step's hidden states through them in order.

Blocking code (each request runs in its own thread). Shards on this node are called in-process through the
node's ShardHost; shards elsewhere through one gRPC stream per session and shard.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from cluster import auth
from cluster.chain import Cancellation, Chain, ShardUnavailableError
from cluster.constraints import answer_constraint
from cluster.discovery import Peer
from cluster.engine.runner import RunnerError
from cluster.engine.shard import ContextFullError, EngineError, StepResult
from cluster.generation import (
    GenerationResult,
    Prompt,
    TokenChunk,
    encode_prompt,
    generate,
    generation_defaults,
    shard_times_dicts,
)
from cluster.host import ShardBusyError, ShardHost, UnknownShardError, check_model_id
from cluster.models.config import ModelConfig
from cluster.models.costs import kv_bytes_per_layer, model_costs, tensor_costs
from cluster.partition import HeldShard, ModelCosts, NodeCapacity, Plan, PlanError, plan_layers, reuse_held
from cluster.registry import REGISTRY, local_path, resolve_model
from cluster.rpc import wire
from cluster.rpc.pb import cluster_pb2 as pb
from cluster.rpc.pb import cluster_pb2_grpc as pb_grpc
from cluster.sampling import SamplingParams
from cluster.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Progress = Callable[[str, str, int, int], None]  # (stage, node name, done, total)
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}  # a dtype not listed counts as 4 bytes


@dataclass
class ModelRef:
    """A model the coordinator can serve: its files (at least config and tokenizer) and what each layer costs."""

    model_id: str
    path: Path
    cfg: ModelConfig
    tokenizer: Tokenizer
    costs: ModelCosts
    defaults: dict[str, Any]


@dataclass
class ModelStats:
    """What the dashboard shows per model: how many requests, and how fast the last one went."""

    requests: int = 0
    tokens: int = 0
    ttft_ms: float = 0.0
    decode_tok_s: float = 0.0
    shards: list[dict[str, Any]] = field(default_factory=list)  # the last decode's split, as in `run --json`

    def record(self, result: GenerationResult) -> None:
        self.requests += 1
        self.tokens += len(result.tokens)
        self.ttft_ms = result.ttft_ms
        if len(result.tokens) > 1:
            self.decode_tok_s = result.decode_tok_s
            self.shards = shard_times_dicts(result.shards)


@dataclass
class PlacedShard:
    node_id: str
    name: str
    address: str
    shard_id: str
    start: int
    end: int
    bytes: int
    local: bool
    pipeline_chunk: int = 0  # the prompt chunk its engine takes in a pipelined prefill (generation.prompt_chunk)


@dataclass
class Placement:
    model_id: str
    plan: Plan
    shards: list[PlacedShard]
    members: frozenset[str]
    limit: int  # message bytes the model's hidden states need
    active: int = 0  # sessions running on it

    def outdated(self, members: frozenset[str]) -> bool:
        """Planned over other members and idle: to be given back, and the model planned again."""
        return not self.active and self.members != members


def model_id_for(model: str) -> str:
    """The name other nodes know a model by: its HF repo id, or a local directory's name."""
    repo = REGISTRY.get(model.lower())
    if repo:
        return repo
    path = local_path(model)
    if path.is_dir():
        return check_model_id(path.resolve().name)
    return check_model_id(model)


class RemoteShard:
    """One session on a shard of another node: a bidirectional stream, one response per request."""

    def __init__(
        self,
        stub: pb_grpc.WorkerStub,
        shard_id: str,
        node: str,
        node_id: str = "",
        layers: tuple[int, int] = (0, 0),
        pipeline_chunk: int = 0,
    ):
        self.stub, self.shard_id, self.node, self.node_id = stub, shard_id, node, node_id
        self.layers = layers  # for the timing summary
        self.pipeline_chunk = pipeline_chunk  # its engine's chunk of a pipelined prefill (0: not known)
        self._requests: queue.SimpleQueue[pb.ForwardRequest | None] = queue.SimpleQueue()
        self._responses: Any = None
        self._first: pb.ForwardRequest | None = None
        self._truncate: int | None = None

    def new_session(self, session_id: str | None = None, sampling: SamplingParams | None = None) -> str:
        sid = session_id or uuid.uuid4().hex
        self._first = pb.ForwardRequest(
            shard_id=self.shard_id, session_id=sid, sampling=wire.sampling_to_pb(sampling or SamplingParams())
        )
        self._responses = self.stub.Forward(iter(self._requests.get, None))
        return sid

    def truncate(self, session_id: str, length: int) -> None:
        self._truncate = length  # travels with the next input

    def forward(
        self,
        session_id: str,
        inputs: Any,
        *,
        sampling: SamplingParams | None = None,
        token_ids: Sequence[int] | None = None,
        logprobs: int = 0,
        allowed: bytes | None = None,
        generated: Sequence[int] = (),
    ) -> StepResult:
        request, self._first = self._first or pb.ForwardRequest(), None
        if self._truncate is not None:
            request.truncate, self._truncate = self._truncate, None
        x = np.asarray(inputs)
        if x.ndim == 1:
            request.tokens.CopyFrom(wire.to_tensor(x.astype(np.int32)))
        else:
            request.hidden.CopyFrom(wire.to_tensor(x))
        if token_ids is not None:
            request.context_ids.extend(token_ids)
        request.top_logprobs = logprobs
        if allowed is not None:
            request.allowed_ids = allowed
        request.generated_ids.extend(generated)
        self._requests.put(request)
        try:
            response = next(self._responses)
        except grpc.RpcError as e:
            raise _shard_error(e, self.node, self.node_id) from None
        except StopIteration:
            raise ShardUnavailableError(f"node {self.node} closed the session", self.node_id) from None
        if response.WhichOneof("output") == "hidden":
            hidden = wire.from_tensor(response.hidden, wire.HIDDEN_DTYPES)
            return StepResult(hidden=hidden, engine_ms=response.engine_ms)
        top = wire.top_pairs(response.top_ids, response.top_logprobs)
        return StepResult(token=response.token, logprob=response.logprob, top=top, engine_ms=response.engine_ms)

    def end_session(self, session_id: str) -> None:
        self._requests.put(None)  # closing the stream ends the session there
        self.cancel()

    def cancel(self) -> None:
        """Abandon the stream: a step waiting on it fails at once (the node was declared lost)."""
        if self._responses is not None:
            self._responses.cancel()


class LocalShard:
    """A shard of this node, called in-process (no network); its sessions are counted like remote ones.

    Like a remote shard, it takes its place among the shard's sessions at the session's first step, not when the
    session is opened: every request then waits for places in layer order, whichever node coordinates it, so
    two requests never wait on each other in a circle."""

    def __init__(
        self,
        host: ShardHost,
        shard_id: str,
        node_id: str,
        node: str = "",
        layers: tuple[int, int] = (0, 0),
        pipeline_chunk: int = 0,
    ):
        self.host, self.shard_id, self.node_id = host, shard_id, node_id
        self.node, self.layers = node, layers  # for the timing summary
        self.pipeline_chunk = pipeline_chunk  # its engine's chunk of a pipelined prefill (0: not known)
        self._opening: tuple[str, SamplingParams | None] | None = None  # opened on the engine at the first step
        self._cancelled = threading.Event()

    def new_session(self, session_id: str | None = None, sampling: SamplingParams | None = None) -> str:
        try:
            self.hosted = self.host.shard(self.shard_id)
        except UnknownShardError as e:  # unloaded since it was placed
            raise ShardUnavailableError(str(e), self.node_id) from None
        self.engine = self.hosted.engine
        sid = session_id or uuid.uuid4().hex
        self._opening = (sid, sampling)
        return sid

    def truncate(self, session_id: str, length: int) -> None:
        if self._opening is None:  # a session not opened yet holds no positions to forget
            self.engine.truncate(session_id, length)

    def forward(self, session_id: str, inputs: Any, **kwargs: Any) -> StepResult:
        try:
            self._open(session_id)
            return self.engine.forward(session_id, inputs, **kwargs)
        except RunnerError as e:  # the engine process died: this node places the shard again
            raise ShardUnavailableError(f"the engine process of this node's shard failed: {e}", self.node_id) from e

    def _open(self, session_id: str) -> None:
        """Open the session on the engine at its first step (waits while every session is in use)."""
        if self._opening is not None:
            sid, sampling = self._opening
            self.hosted.open_session(sid, sampling, self._cancelled.is_set)
            self._opening = None

    def decode(self, session_id: str, token: int, steps: int, **kwargs: Any) -> Iterator[StepResult]:
        """The engine process's decode, streamed (a shard that holds the whole model): it runs ahead of the caller."""
        try:
            self._open(session_id)
            yield from self.engine.decode(session_id, token, steps, **kwargs)
        except RunnerError as e:
            raise ShardUnavailableError(f"the engine process of this node's shard failed: {e}", self.node_id) from e

    def end_session(self, session_id: str) -> None:
        self._opening = None
        self.hosted.end_session(session_id)

    def cancel(self) -> None:
        """The client went away: a wait for a free session here ends with RequestCancelled."""
        self._cancelled.set()
        hosted = getattr(self, "hosted", None)
        if hosted is not None:
            hosted.wake()


def _shard_error(e: grpc.RpcError, node: str, node_id: str = "") -> Exception:
    code, details = e.code(), e.details()  # type: ignore[attr-defined]
    if code == wire.EXHAUSTED and details.startswith(wire.BUSY):
        return ShardBusyError(details)
    if code == wire.EXHAUSTED:
        return ContextFullError(details)
    if code in (wire.INVALID, wire.PRECONDITION):
        return EngineError(f"{node}: {details}")
    # unreachable, cancelled because it left, restarted without our shard, ...: the shard is gone
    return ShardUnavailableError(f"node {node} failed: {code.name} {details}", node_id)


class Coordinator:
    def __init__(
        self,
        host: ShardHost,
        members: Callable[[], list[Peer]],
        *,
        token: str,
        self_id: str,
        self_address: str,
        max_context: int = 4096,
        headroom: float = 0.1,
    ):
        """members: every node to plan over, this one included (the node's discovery)."""
        self.host = host
        self.token = token
        self.members = members
        self.self_id, self.self_address = self_id, self_address
        self.max_context = max_context
        self.headroom = headroom
        self.models: dict[str, ModelRef] = {}
        self.placements: dict[str, Placement] = {}
        self.stats: dict[str, ModelStats] = {}
        self._lock = threading.Lock()  # guards the dicts above
        self._placing: dict[str, threading.Lock] = {}  # model id -> held while that model is placed
        self._channels: dict[tuple[str, int], grpc.Channel] = {}
        self._channels_lock = threading.Lock()  # placements and sessions open channels from many threads
        self._lost: set[str] = set()  # node ids that failed mid-session (a restarted node has a new id)
        self._streams: dict[str, weakref.WeakSet[RemoteShard]] = {}  # node id -> its open session streams
        self.on_plan: Callable[[Plan], None] = lambda plan: None

    def _members(self) -> list[Peer]:
        return [p for p in self.members() if p.node_id not in self._lost]

    def node_left(self, node_id: str) -> None:
        """Discovery dropped a node: steps waiting on it fail now instead of waiting for TCP to notice."""
        for shard in list(self._streams.get(node_id, ())):
            shard.cancel()

    def release_stale(self) -> None:
        """The members changed: give back idle placements planned over the old ones now, so that the next plan
        (this coordinator's or another's that shares the shards) finds their memory free."""
        ids = frozenset(p.node_id for p in self._members())
        with self._lock:
            placements = list(self.placements.items())
        for model_id, placement in placements:
            model_lock = self._placing[model_id]
            if not model_lock.acquire(blocking=False):
                continue  # being placed right now: that placement decides
            try:
                if not placement.outdated(ids) or self.placements.get(model_id) is not placement:
                    continue
                with self._lock:
                    del self.placements[model_id]
            finally:
                model_lock.release()
            self._unload_later(placement.shards)

    def _confirm_lost(self, error: ShardUnavailableError) -> None:
        """Exclude the node from plans unless it still answers (then the failure was its shard, not itself)."""
        if not error.node_id or error.node_id == self.self_id:
            return
        address = next((p.address for p in self.members() if p.node_id == error.node_id), None)
        if address is not None:
            try:
                self._stub(address).Info(pb.NodeInfoRequest(), timeout=2)
                return
            except grpc.RpcError:
                pass
        log.warning("node %s is lost; planning without it", error.node_id[:8])
        self._lost.add(error.node_id)

    # ------------------------------------------------------------------------------------ models
    def resolve(self, model: str) -> ModelRef:
        """Find MODEL's files here, else the config/tokenizer from a peer (weights come later, per shard)."""
        model_id = model_id_for(model)
        with self._lock:
            ref = self.models.get(model_id)
        if ref is not None:
            return ref
        path = self.host.full_copy(model_id)
        if path is None and (local_path(model).is_dir() or "/" in model_id):
            path = resolve_model(model)  # a local directory, or a download / the HF cache
        if path is not None:
            self.host.register_model(model_id, path)
            cfg = ModelConfig.from_dir(path)
            costs = model_costs(path, max_context=self.max_context, model_id=model_id)
        else:
            path, cfg, costs = self._manifest_from_peers(model_id)
        ref = ModelRef(model_id, path, cfg, Tokenizer.from_dir(path), costs, generation_defaults(path))
        with self._lock:
            self.models[model_id] = ref
        return ref

    def _manifest_from_peers(self, model_id: str) -> tuple[Path, ModelConfig, ModelCosts]:
        from cluster import transfer
        from cluster.host import PARTIAL_MARKER

        for peer in self.members():
            if peer.node_id == self.self_id:
                continue
            try:
                manifest = self._stub(peer.address).GetManifest(pb.ManifestRequest(model_id=model_id), timeout=30)
            except grpc.RpcError:
                continue
            dest = self.host._pulled_dir(model_id)
            dest.mkdir(parents=True, exist_ok=True)
            (dest / PARTIAL_MARKER).touch()
            transfer.save_manifest_files(manifest, dest)
            cfg = ModelConfig.from_dir(dest)
            sizes = {t.name: t.nbytes for t in manifest.tensors}
            costs = tensor_costs(cfg, sizes, max_context=self.max_context, model_id=model_id)
            return dest, cfg, costs
        raise LookupError(f"no node of the cluster has {model_id!r} and it is not a Hugging Face repo id")

    # ------------------------------------------------------------------------------------ planning
    def plan(self, model: str) -> Plan:
        ref = self.resolve(model)
        current = self.placements.get(ref.model_id)
        return self._plan(ref, self._members(), {s.shard_id for s in current.shards} if current else set())

    def _plan(self, ref: ModelRef, members: list[Peer], releasing: set[str]) -> Plan:
        """A plan over the members' live free memory. Where they hold the model already (placed through any
        node) and those shards cover it on the plan's nodes, the plan is those shards: one copy serves every
        coordinator. `releasing`: shard ids of this coordinator's placement that is being given back."""
        survey = self._survey(members)
        # each node's KV cache of one session in its own compute dtype (float32 on CPUs, half on GPUs)
        kvs = [kv_bytes_per_layer(ref.cfg, ref.costs.max_context, _ITEMSIZE.get(dtype, 4)) for _, _, dtype in survey]
        held = [
            (HeldShard(peer.node_id, s.start, s.end, s.weight_bytes), s.shard_id in releasing and s.holders <= 1)
            for peer, (_, shards, _) in zip(members, survey, strict=True)
            for s in shards
            if s.model_id == ref.model_id and s.max_context == ref.costs.max_context
        ]

        def plan_counting(freed: list[HeldShard]) -> Plan:
            extra: dict[str, int] = {}
            for h in freed:
                extra[h.node_id] = extra.get(h.node_id, 0) + h.bytes
            nodes = [
                NodeCapacity(p.node_id, p.name, p.address, free + extra.get(p.node_id, 0), kv)
                for p, (free, _, _), kv in zip(members, survey, kvs, strict=True)
            ]
            return plan_layers(ref.costs, nodes, headroom=self.headroom)

        # as if the memory this model holds were free: the plan every coordinator would make, reused if held
        try:
            reused = reuse_held(plan_counting([h for h, _ in held]), [h for h, _ in held])
        except PlanError:
            reused = None
        # else new shards beside the ones other placements keep: only this coordinator's last copy goes away
        return reused or plan_counting([h for h, freed in held if freed])

    def _survey(self, members: list[Peer]) -> list[tuple[int, list[pb.ShardInfo], str]]:
        """Each member's free memory, shards and compute dtype, asked now: discovery's figure may predate a load."""

        def ask(peer: Peer) -> tuple[int, list[pb.ShardInfo], str]:
            if peer.node_id == self.self_id:  # members() measured this node just now
                return peer.free_memory, self.host.shard_infos(), self.host.compute_dtype
            try:
                info = self._stub(peer.address).Info(pb.NodeInfoRequest(), timeout=2)
            except grpc.RpcError:
                return peer.free_memory, [], ""  # not answering: placing on it fails and plans without it
            return info.free_memory, list(info.shards), info.dtype

        with ThreadPoolExecutor(max_workers=max(1, len(members))) as pool:
            return list(pool.map(ask, members))

    def _stub(self, address: str, limit: int = wire.SERVER_MAX_MESSAGE) -> pb_grpc.WorkerStub:
        key = (address, limit)
        with self._channels_lock:
            channel = self._channels.get(key)
            if channel is None:
                channel = auth.secure_channel(address, self.token, wire.channel_options(limit))
                self._channels[key] = channel
        return pb_grpc.WorkerStub(channel)

    def placement(self, ref: ModelRef, progress: Progress, failed: Placement | None = None) -> Placement:
        """The model's shards, placed now unless a placement over the same members exists. A new member or a
        lost one gives a new plan once the old placement has no sessions left. Placing one model (minutes for
        a big one) does not hold up requests for the others."""
        with self._lock:
            model_lock = self._placing.setdefault(ref.model_id, threading.Lock())
        with model_lock:
            members = self._members()
            ids = frozenset(p.node_id for p in members)
            current = self.placements.get(ref.model_id)
            if current is not None:
                alive = {s.node_id for s in current.shards} <= ids and current is not failed
                if alive and not current.outdated(ids):
                    current.active += 1
                    return current
                with self._lock:
                    del self.placements[ref.model_id]
            stale = list(current.shards) if current else []  # the old placement's, let go below
            for attempt in range(3):
                progress("plan", "", 0, 1)
                try:  # planned while the stale shards are held, so their holder counts are exact
                    plan = self._plan(ref, members, {s.shard_id for s in stale})
                except BaseException:
                    self._unload_later(stale)
                    raise
                # shards the new plan reuses are let go once it holds them (no reload); the others now, before the
                # loads need their memory
                reused = {(a.node_id, a.start, a.end) for a in plan.shards}
                self._unload_later([s for s in stale if (s.node_id, s.start, s.end) not in reused])
                stale = [s for s in stale if (s.node_id, s.start, s.end) in reused]
                progress("plan", "", 1, 1)
                self.on_plan(plan)
                try:
                    placed = self._load(ref, plan, progress)
                except ShardUnavailableError as e:  # a member died before discovery noticed: plan without it
                    if attempt == 2:
                        self._unload_later(stale)
                        raise
                    self._confirm_lost(e)
                    members = self._members()
                    ids = frozenset(p.node_id for p in members)
                    continue
                except BaseException:
                    self._unload_later(stale)
                    raise
                self._unload_later(stale)
                break
            limit = wire.message_limit(ref.cfg.hidden_size, plan.max_context)
            placement = Placement(ref.model_id, plan, placed, ids, limit, active=1)
            with self._lock:
                self.placements[ref.model_id] = placement
            return placement

    def _load(self, ref: ModelRef, plan: Plan, progress: Progress) -> list[PlacedShard]:
        sources = [self.self_address] if self.host.full_copy(ref.model_id) else []
        sources += [a.address for a in plan.shards if a.node_id != self.self_id and a.address not in sources]

        def load_one(a: Any) -> PlacedShard:
            def report(stage: str, done: int, total: int) -> None:
                progress(stage, a.name, done, total)

            if a.node_id == self.self_id:
                shard = self.host.load(
                    ref.model_id,
                    a.start,
                    a.end,
                    max_context=plan.max_context,
                    sources=sources,
                    holder=self.self_id,
                    progress=report,
                )
                chunk = int(shard.info.get("pipeline_chunk") or 0)
                return PlacedShard(a.node_id, a.name, a.address, shard.shard_id, a.start, a.end, a.bytes, True, chunk)
            request = pb.LoadShardRequest(
                model_id=ref.model_id,
                start=a.start,
                end=a.end,
                max_context=plan.max_context,
                sources=sources,
                holder=self.self_id,
            )
            try:
                for event in self._stub(a.address).LoadShard(request):
                    if event.HasField("shard"):
                        info = event.shard
                        return PlacedShard(
                            a.node_id,
                            a.name,
                            a.address,
                            info.shard_id,
                            a.start,
                            a.end,
                            a.bytes,
                            False,
                            info.pipeline_chunk,
                        )
                    report(event.stage, event.done, event.total)
            except grpc.RpcError as e:
                raise _shard_error(e, a.name, a.node_id) from None
            raise ShardUnavailableError(f"node {a.name} ended the load of layers [{a.start}, {a.end}) without a shard")

        with ThreadPoolExecutor(max_workers=max(1, len(plan.shards))) as pool:
            futures = [pool.submit(load_one, a) for a in plan.shards]
            placed, errors = [], []
            for f in futures:
                try:
                    placed.append(f.result())
                except Exception as e:  # noqa: BLE001 - every failure is reported after the others are undone
                    errors.append(e)
        if errors:
            self._unload(placed)
            raise errors[0]
        return placed

    def _unload_later(self, shards: Sequence[PlacedShard]) -> None:
        # a lost node may not answer for seconds: nothing waits for it
        if shards:
            threading.Thread(target=self._unload, args=(list(shards),), name="unload", daemon=True).start()

    def _unload(self, shards: Sequence[PlacedShard]) -> None:
        for s in shards:
            try:
                if s.local:
                    self.host.unload(s.shard_id, self.self_id)
                else:
                    request = pb.UnloadShardRequest(shard_id=s.shard_id, holder=self.self_id)
                    self._stub(s.address).UnloadShard(request, timeout=10)
            except Exception as e:  # noqa: BLE001 - a node that left took its shard with it
                log.info("unloading shard on %s: %s", s.name, e)

    def release(self, placement: Placement) -> None:
        with self._placing[placement.model_id]:
            placement.active -= 1

    def shards_for_session(self, placement: Placement) -> list[Any]:
        shards: list[Any] = []
        for s in placement.shards:
            if s.local:
                shards.append(LocalShard(self.host, s.shard_id, s.node_id, s.name, (s.start, s.end), s.pipeline_chunk))
            else:
                stub = self._stub(s.address, placement.limit)
                remote = RemoteShard(stub, s.shard_id, s.name, s.node_id, (s.start, s.end), s.pipeline_chunk)
                self._streams.setdefault(s.node_id, weakref.WeakSet()).add(remote)
                shards.append(remote)
        return shards

    # ------------------------------------------------------------------------------------ requests
    def encode(self, model: str, **request: Any) -> Prompt:
        """The prompt of a request (generation.encode_prompt's keywords: prompt, messages, tools, template_kwargs,
        raw), with MODEL's tokenizer."""
        return encode_prompt(self.resolve(model).tokenizer, **request)

    def generate(
        self,
        model: str,
        prompt: Prompt,
        *,
        json_schema: dict[str, Any] | None = None,
        max_tokens: int = 256,
        sampling: dict[str, Any] | None = None,
        stop: Sequence[str] = (),
        logprobs: int = 0,
        progress: Progress = lambda stage, node, done, total: None,
        cancellation: Cancellation | None = None,
    ) -> Generator[TokenChunk | GenerationResult, None, None]:
        """Chunks of one generation of `prompt` (from `encode`); closing the iterator ends the session on every
        shard. `cancellation`, set from another thread, stops a request that waits for a free session or a remote
        step at once. `json_schema`: the answer is JSON that follows it (constrained decoding)."""
        ref = self.resolve(model)
        params = SamplingParams(**{**ref.defaults, **(sampling or {})})
        if any(i >= ref.cfg.vocab_size for i, _ in params.logit_bias):
            raise ValueError(f"logit_bias: ids are below the vocabulary size of {ref.cfg.vocab_size}")
        constraint = None
        if json_schema is not None:
            vocab = ref.cfg.vocab_size
            constraint = answer_constraint(ref.tokenizer, vocab, json_schema, prompt.tags, prompt.opened)
        current = [self.placement(ref, progress)]

        def replace(error: ShardUnavailableError) -> list[Any]:
            """A node was lost mid-session: plan over the nodes left and place the layers again."""
            self._confirm_lost(error)
            try:
                placement = self.placement(ref, progress, failed=current[0])
            except PlanError as e:
                raise PlanError(
                    f"a node was lost mid-generation ({error}) and the nodes left cannot hold the model: {e}"
                ) from e
            self.release(current[0])
            current[0] = placement
            return self.shards_for_session(placement)

        chain = Chain(self.shards_for_session(current[0]), replace, cancellation=cancellation)
        chain.progress = lambda stage, done, total: progress(stage, "", done, total)
        try:
            for item in generate(
                [chain],
                ref.tokenizer,
                prompt.ids,
                max_tokens=max_tokens,
                sampling=params,
                stop=stop,
                logprobs=logprobs,
                context_limit=current[0].plan.max_context,
                constraint=constraint,
            ):
                if isinstance(item, GenerationResult):
                    self.stats.setdefault(ref.model_id, ModelStats()).record(item)
                yield item
        finally:
            self.release(current[0])

    def close(self) -> None:
        with self._lock:
            for placement in self.placements.values():
                self._unload(placement.shards)
            self.placements.clear()
        for channel in self._channels.values():
            channel.close()
