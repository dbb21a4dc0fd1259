"""Python SDK: talk to any node of a cluster.

    from cluster import Client
    with Client("127.0.0.1:50051") as c:
        for chunk in c.chat("llama-3.2-1b", [{"role": "user", "content": "Hi"}]):
            print(chunk.text, end="", flush=True)

`generate` and `chat` stream Chunks: one per token, then a last one with finish_reason, usage and timing.
gRPC failures become a small set of typed exceptions (ClusterError and its subclasses).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from cluster import auth
from cluster.rpc import wire
from cluster.rpc.pb import cluster_pb2 as pb
from cluster.rpc.pb import cluster_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
DEFAULT_NODE = "127.0.0.1:50051"
ProgressCallback = Callable[[str, str, int, int], None]  # (stage, node, done, total)


class ClusterError(RuntimeError):
    """A request the cluster could not serve."""


class ModelNotFound(ClusterError):
    pass


class InvalidRequest(ClusterError):
    pass


class DoesNotFit(ClusterError):
    """The model (or the request's context) does not fit the memory of the cluster."""


class NodeUnavailable(ClusterError):
    """No node answers at the address, or a node of the cluster stopped answering."""


class NotAuthorised(ClusterError):
    pass


_ERRORS: dict[grpc.StatusCode, type[ClusterError]] = {
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: DoesNotFit,
    grpc.StatusCode.UNAVAILABLE: NodeUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: NodeUnavailable,
    grpc.StatusCode.UNAUTHENTICATED: NotAuthorised,
    grpc.StatusCode.PERMISSION_DENIED: NotAuthorised,
}


def map_error(e: grpc.RpcError, node: str) -> ClusterError:
    code, details = e.code(), e.details()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNAVAILABLE and not details.startswith("node "):
        refused = auth.refused_message(details)
        if refused is not None:
            return NotAuthorised(f"{node}: {refused}")
        details = f"no clusterctl node answers at {node} ({details}); start one with `clusterctl join`"
    return _ERRORS.get(code, ClusterError)(details)


def _coordinator_gone(e: grpc.RpcError) -> bool:
    """The connection to the node we asked failed (not a failure it reported from inside the cluster)."""
    code, details = e.code(), e.details() or ""  # type: ignore[attr-defined]
    return code == grpc.StatusCode.UNAVAILABLE and not details.startswith("node ") and not auth.refused_message(details)


def _token(token: str | None) -> str:
    found = auth.resolve_token(token)
    if not found:
        raise NotAuthorised(
            f"no cluster token: pass token=..., set {auth.TOKEN_ENV}, or run on a host where `clusterctl join` "
            f"stored one ({auth.default_token_path()})"
        )
    return found


@dataclass
class Chunk:
    text: str
    token_id: int | None = None  # None on the final chunk
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # set on the final chunk: "stop" or "length"
    usage: dict[str, int] | None = None
    timing: dict[str, float] | None = None
    tokens: list[int] | None = None  # every generated id, on the final chunk


@dataclass(frozen=True)
class NodeView:
    node_id: str
    name: str
    address: str
    device: str
    device_kind: str
    total_memory: int
    free_memory: int
    shards: list[dict[str, Any]]


@dataclass(frozen=True)
class PlanView:
    model_id: str
    num_layers: int
    max_context: int
    shards: list[dict[str, Any]]
    left_out: list[str]


def _options(
    model: str,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    min_p: float | None,
    repetition_penalty: float | None,
    seed: int | None,
    stop: Sequence[str],
    logprobs: int,
) -> pb.GenerationOptions:
    sampling = pb.SamplingParams()
    chosen = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p}
    chosen |= {"repetition_penalty": repetition_penalty, "seed": seed}
    for name, value in chosen.items():
        if value is not None:
            setattr(sampling, name, value)
    return pb.GenerationOptions(
        model=model, max_tokens=max_tokens, sampling=sampling, stop=list(stop), logprobs=logprobs
    )


class _Assembler:
    """GenerateChunk messages -> Chunks; the final chunk carries the text released at the very end."""

    def __init__(self, on_progress: ProgressCallback | None):
        self.on_progress = on_progress
        self.text: list[str] = []

    def __call__(self, msg: pb.GenerateChunk) -> Chunk | None:
        kind = msg.WhichOneof("kind")
        if kind == "progress":
            if self.on_progress is not None:
                p = msg.progress
                self.on_progress(p.stage, p.node, p.done, p.total)
            return None
        if kind == "token":
            t = msg.token
            self.text.append(t.text)
            return Chunk(t.text, t.id, t.logprob, [(x.id, x.logprob) for x in t.top])
        d = msg.done
        tail = d.text[len("".join(self.text)) :]
        usage = {
            "prompt_tokens": d.usage.prompt_tokens,
            "completion_tokens": d.usage.completion_tokens,
            "total_tokens": d.usage.total_tokens,
        }
        timing = {"ttft_ms": d.timing.ttft_ms, "decode_tok_s": d.timing.decode_tok_s}
        return Chunk(tail, finish_reason=d.finish_reason, usage=usage, timing=timing, tokens=list(d.tokens))


def _node_view(n: pb.NodeInfo) -> NodeView:
    shards = [
        {
            "model_id": s.model_id,
            "layers": [s.start, s.end],
            "device": s.device,
            "bytes": s.weight_bytes,
            "sessions": s.sessions,
            "memory_used": s.memory_used,
        }
        for s in n.shards
    ]
    return NodeView(
        n.node_id, n.name, f"{n.host}:{n.port}", n.device, n.device_kind, n.total_memory, n.free_memory, shards
    )


def _plan_view(p: pb.PlanResponse) -> PlanView:
    shards = [
        {
            "node_id": s.node_id,
            "name": s.name,
            "address": s.address,
            "layers": [s.start, s.end],
            "bytes": s.bytes,
            "free_memory": s.free_memory,
        }
        for s in p.shards
    ]
    return PlanView(p.model_id, p.num_layers, p.max_context, shards, list(p.left_out))


def _messages(messages: Iterable[Mapping[str, str]]) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]


class Client:
    """Blocking client for one node (any node of the cluster coordinates the requests it receives)."""

    def __init__(
        self,
        node: str = DEFAULT_NODE,
        *,
        token: str | None = None,
        timeout: float | None = None,
        fallback_nodes: Sequence[str] = (),
    ):
        """token: the cluster token; default $CLUSTERCTL_TOKEN, else the one `clusterctl join` stored here.

        fallback_nodes: when the node coordinating a generation dies, send it again to the next of these; the
        tokens already received are not repeated (exact for greedy and seeded requests).
        """
        self.node = node
        self.timeout = timeout
        self.fallback_nodes = list(fallback_nodes)
        self._token = _token(token)
        self._channels: dict[str, grpc.Channel] = {}
        self._channel = self._open(node)
        self._stub = pb_grpc.ClusterStub(self._channel)

    def _open(self, address: str) -> grpc.Channel:
        if address not in self._channels:
            options = wire.channel_options(wire.SERVER_MAX_MESSAGE)
            self._channels[address] = auth.secure_channel(address, self._token, options)
        return self._channels[address]

    def wait_ready(self, timeout: float = 5.0) -> bool:
        """True once the node accepts connections (False after `timeout` seconds)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
            return True
        except grpc.FutureTimeoutError:
            return False

    def _stream(self, method: str, request: Any, on_progress: ProgressCallback | None) -> Iterator[Chunk]:
        delivered = 0  # token chunks the caller has had, from whichever node
        addresses = [self.node, *self.fallback_nodes]
        for i, address in enumerate(addresses):
            assemble = _Assembler(on_progress)
            stream = getattr(pb_grpc.ClusterStub(self._open(address)), method)(request, timeout=self.timeout)
            seen = 0
            try:
                for msg in stream:
                    chunk = assemble(msg)
                    if chunk is None:
                        continue
                    if chunk.finish_reason is None:
                        seen += 1
                        if seen <= delivered:
                            continue  # the node that died had sent it already
                        delivered += 1
                    yield chunk
                return
            except grpc.RpcError as e:
                error = map_error(e, address)
                if _coordinator_gone(e) and i + 1 < len(addresses):
                    log.warning("%s stopped answering (%s); retrying on %s", address, error, addresses[i + 1])
                    continue
                raise error from None
            finally:
                stream.cancel()  # a consumer that stops early ends the session on the cluster

    def generate(
        self,
        model: str,
        prompt: str,
        *,
        raw: bool = False,
        max_tokens: int = 256,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        logprobs: int = 0,
        on_progress: ProgressCallback | None = None,
    ) -> Iterator[Chunk]:
        """Complete `prompt` (as one user message through the chat template; raw=True sends it as is).
        Unset sampling values take the model's generation_config.json defaults."""
        options = _options(
            model, max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, logprobs
        )
        request = pb.GenerateRequest(options=options, prompt=prompt, raw=raw)
        return self._stream("Generate", request, on_progress)

    def chat(
        self,
        model: str,
        messages: Iterable[Mapping[str, str]],
        *,
        max_tokens: int = 256,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        logprobs: int = 0,
        on_progress: ProgressCallback | None = None,
    ) -> Iterator[Chunk]:
        """Answer `messages` ([{"role": ..., "content": ...}, ...]) through the model's chat template."""
        options = _options(
            model, max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, logprobs
        )
        request = pb.ChatRequest(options=options, messages=_messages(messages))
        return self._stream("Chat", request, on_progress)

    def nodes(self) -> list[NodeView]:
        try:
            return [_node_view(n) for n in self._stub.Nodes(pb.NodesRequest(), timeout=self.timeout or 10).nodes]
        except grpc.RpcError as e:
            raise map_error(e, self.node) from None

    def plan(self, model: str) -> PlanView:
        try:
            return _plan_view(self._stub.Plan(pb.PlanRequest(model=model), timeout=self.timeout))
        except grpc.RpcError as e:
            raise map_error(e, self.node) from None

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The same calls for asyncio code (grpc.aio); `generate` and `chat` are async iterators."""

    def __init__(self, node: str = DEFAULT_NODE, *, token: str | None = None, timeout: float | None = None):
        self.node = node
        self.timeout = timeout
        options = wire.channel_options(wire.SERVER_MAX_MESSAGE)
        self._channel = auth.secure_aio_channel(node, _token(token), options)
        self._stub = pb_grpc.ClusterStub(self._channel)

    async def _stream(self, call: Any, request: Any, on_progress: ProgressCallback | None) -> AsyncIterator[Chunk]:
        assemble = _Assembler(on_progress)
        stream = call(request, timeout=self.timeout)
        try:
            async for msg in stream:
                chunk = assemble(msg)
                if chunk is not None:
                    yield chunk
        except grpc.RpcError as e:
            raise map_error(e, self.node) from None
        finally:
            stream.cancel()

    def generate(self, model: str, prompt: str, *, raw: bool = False, **kwargs: Any) -> AsyncIterator[Chunk]:
        on_progress = kwargs.pop("on_progress", None)
        request = pb.GenerateRequest(options=_kwargs_options(model, kwargs), prompt=prompt, raw=raw)
        return self._stream(self._stub.Generate, request, on_progress)

    def chat(self, model: str, messages: Iterable[Mapping[str, str]], **kwargs: Any) -> AsyncIterator[Chunk]:
        on_progress = kwargs.pop("on_progress", None)
        request = pb.ChatRequest(options=_kwargs_options(model, kwargs), messages=_messages(messages))
        return self._stream(self._stub.Chat, request, on_progress)

    async def nodes(self) -> list[NodeView]:
        try:
            response = await self._stub.Nodes(pb.NodesRequest(), timeout=self.timeout or 10)
        except grpc.RpcError as e:
            raise map_error(e, self.node) from None
        return [_node_view(n) for n in response.nodes]

    async def plan(self, model: str) -> PlanView:
        try:
            return _plan_view(await self._stub.Plan(pb.PlanRequest(model=model), timeout=self.timeout))
        except grpc.RpcError as e:
            raise map_error(e, self.node) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _kwargs_options(model: str, kwargs: dict[str, Any]) -> pb.GenerationOptions:
    known = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop", "logprobs")
    unknown = set(kwargs) - set(known)
    if unknown:
        raise TypeError(f"unexpected arguments: {sorted(unknown)}")
    return _options(
        model,
        kwargs.get("max_tokens", 256),
        kwargs.get("temperature"),
        kwargs.get("top_p"),
        kwargs.get("top_k"),
        kwargs.get("min_p"),
        kwargs.get("repetition_penalty"),
        kwargs.get("seed"),
        kwargs.get("stop", ()),
        kwargs.get("logprobs", 0),
    )
