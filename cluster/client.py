"""Python SDK: talk to any node of a cluster.

    from cluster import Client
    with Client("127.0.0.1:50051") as c:
        for chunk in c.chat("llama-3.2-1b", [{"role": "user", "content": "Hi"}]):
            print(chunk.text, end="", flush=True)

`generate` and `chat` stream Chunks: one per token, then a last one with finish_reason, usage and timing.
gRPC failures become a small set of typed exceptions (ClusterError and its subclasses).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypedDict, TypeVar

import grpc

from cluster import auth
from cluster.rpc import wire
from cluster.rpc.pb import cluster_pb2 as pb
from cluster.rpc.pb import cluster_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from typing_extensions import Unpack

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


class NodeBusy(ClusterError):
    """Every session of a shard the request needs stayed in use for the node's wait (5 minutes); try later."""


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
    if code == wire.EXHAUSTED and details.startswith(wire.BUSY):
        return NodeBusy(details)
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
    # ttft_ms, decode_tok_s, and shards: each shard's node, layers and mean ms of a decode step (engine, and the
    # coordinating node's wait for it)
    timing: dict[str, Any] | None = None
    tokens: list[int] | None = None  # every generated id, on the final chunk
    # on the final chunk of a chat that offered tools: the calls read from the answer, in OpenAI's form
    # ({"id", "type": "function", "function": {"name", "arguments"}}), and the answer's text without them
    tool_calls: list[dict[str, Any]] | None = None
    content: str | None = None  # also set (the answer without its thinking) when `reasoning` is
    reasoning: str | None = None  # on the final chunk of a thinking model's chat: its <think> block, without tags


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


class RequestOptions(TypedDict, total=False):
    """The keyword arguments that `generate` and `chat` take, on Client and AsyncClient alike. Unset (or None)
    sampling values take the model's generation_config.json defaults."""

    max_tokens: int  # default 256
    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    repetition_penalty: float | None
    presence_penalty: float | None  # OpenAI's, in [-2, 2]
    frequency_penalty: float | None
    logit_bias: Mapping[int, float] | None  # id -> bias in [-100, 100]
    seed: int | None
    stop: Sequence[str]  # default none
    logprobs: int  # the top K logprobs of each token; default 0
    json_schema: Mapping[str, Any] | None  # the answer is JSON that follows this schema (constrained decoding)


_SAMPLING = wire.SAMPLING_FIELDS


def _options(model: str, options: Mapping[str, Any]) -> pb.GenerationOptions:
    # checked here because **options accepts any name at run time, whatever the type checker says
    unknown = set(options) - RequestOptions.__optional_keys__
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {sorted(unknown)}")
    sampling = pb.SamplingParams(**{k: options[k] for k in _SAMPLING if options.get(k) is not None})
    return pb.GenerationOptions(
        model=model,
        max_tokens=options.get("max_tokens", 256),
        sampling=sampling,
        stop=list(options.get("stop", ())),
        logprobs=options.get("logprobs", 0),
        json_schema=json.dumps(schema) if (schema := options.get("json_schema")) is not None else "",
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
        shards = [
            {"node": t.node, "layers": [t.start, t.end], "engine_ms": t.engine_ms, "wait_ms": t.wait_ms}
            for t in d.timing.shards
        ]
        timing = {"ttft_ms": d.timing.ttft_ms, "decode_tok_s": d.timing.decode_tok_s, "shards": shards}
        calls = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in d.tool_calls
        ]
        return Chunk(
            tail,
            finish_reason=d.finish_reason,
            usage=usage,
            timing=timing,
            tokens=list(d.tokens),
            tool_calls=calls or None,
            content=d.content if calls or d.reasoning else None,
            reasoning=d.reasoning or None,
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


Stream = TypeVar("Stream")  # Iterator[Chunk] for Client, AsyncIterator[Chunk] for AsyncClient


class _Requests(Generic[Stream]):
    """`generate` and `chat`, written once for both clients; each client says how a request streams."""

    def _stream(self, method: str, request: Any, on_progress: ProgressCallback | None) -> Stream:
        raise NotImplementedError

    def generate(
        self,
        model: str,
        prompt: str,
        *,
        raw: bool = False,
        on_progress: ProgressCallback | None = None,
        **options: Unpack[RequestOptions],
    ) -> Stream:
        """Complete `prompt` (as one user message through the chat template; raw=True sends it as is).
        `options`: max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, logprobs."""
        request = pb.GenerateRequest(options=_options(model, options), prompt=prompt, raw=raw)
        return self._stream("Generate", request, on_progress)

    def chat(
        self,
        model: str,
        messages: Iterable[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
        on_progress: ProgressCallback | None = None,
        **options: Unpack[RequestOptions],
    ) -> Stream:
        """Answer `messages` ([{"role": ..., "content": ...}, ...]) through the model's chat template; `options`
        as for `generate`. `tools`, `tool_choice` and `parallel_tool_calls` as in OpenAI's API: the final chunk
        then holds the calls read from the answer (`tool_calls`) and the text around them (`content`); messages
        may hold an assistant turn's `tool_calls` and a tool message's `tool_call_id`, in OpenAI's form. A thinking
        model's final chunk holds its reasoning apart (`reasoning`, and `content` without it); the streamed text
        is the model's own, tags included. `template_kwargs`: extra variables for the chat template, such as
        Qwen3's {"enable_thinking": False}."""
        request = pb.ChatRequest(options=_options(model, options), messages=[_message(m) for m in messages])
        if tools:
            request.tools = json.dumps(list(tools))
        if isinstance(tool_choice, Mapping):  # {"type": "function", "function": {"name": ...}}
            request.tool_name = tool_choice["function"]["name"]
        elif tool_choice is not None:
            request.tool_choice = tool_choice
        request.one_tool_call = parallel_tool_calls is False
        if template_kwargs:
            request.template_kwargs = json.dumps(dict(template_kwargs))
        return self._stream("Chat", request, on_progress)


def _message(m: Mapping[str, Any]) -> pb.ChatMessage:
    calls = [
        pb.ToolCall(id=c["id"], name=c["function"]["name"], arguments=c["function"].get("arguments") or "{}")
        for c in m.get("tool_calls") or ()
    ]
    return pb.ChatMessage(
        role=m["role"],
        content=m.get("content") or "",
        tool_calls=calls,
        tool_call_id=m.get("tool_call_id") or "",
        name=m.get("name") or "",
        reasoning_content=m.get("reasoning_content") or m.get("reasoning") or "",
    )


class Client(_Requests[Iterator[Chunk]]):
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

    def nodes(self) -> list[NodeView]:
        try:
            return [
                NodeView(**wire.node_info_dict(n))
                for n in self._stub.Nodes(pb.NodesRequest(), timeout=self.timeout or 10).nodes
            ]
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


class AsyncClient(_Requests[AsyncIterator[Chunk]]):
    """The same calls for asyncio code (grpc.aio); `generate` and `chat` are async iterators."""

    def __init__(self, node: str = DEFAULT_NODE, *, token: str | None = None, timeout: float | None = None):
        self.node = node
        self.timeout = timeout
        options = wire.channel_options(wire.SERVER_MAX_MESSAGE)
        self._channel = auth.secure_aio_channel(node, _token(token), options)
        self._stub = pb_grpc.ClusterStub(self._channel)

    async def _stream(self, method: str, request: Any, on_progress: ProgressCallback | None) -> AsyncIterator[Chunk]:
        assemble = _Assembler(on_progress)
        stream = getattr(self._stub, method)(request, timeout=self.timeout)
        try:
            async for msg in stream:
                chunk = assemble(msg)
                if chunk is not None:
                    yield chunk
        except grpc.RpcError as e:
            raise map_error(e, self.node) from None
        finally:
            stream.cancel()

    async def nodes(self) -> list[NodeView]:
        try:
            response = await self._stub.Nodes(pb.NodesRequest(), timeout=self.timeout or 10)
        except grpc.RpcError as e:
            raise map_error(e, self.node) from None
        return [NodeView(**wire.node_info_dict(n)) for n in response.nodes]

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
