"""The Cluster service: what clients call (generate, chat, nodes, plan), served by the node's coordinator.

A generation runs in a thread (the coordinator blocks on engines and streams); its chunks cross into the event
loop through a queue. A client that goes away stops the generation at the next token and ends its session.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from pydantic import ValidationError

from cluster.api.schemas import Tool
from cluster.chain import ShardUnavailableError
from cluster.coordinator import Coordinator
from cluster.generation import GenerationResult, PromptTooLongError, TokenChunk
from cluster.partition import PlanError
from cluster.registry import ModelNotFoundError
from cluster.rpc import wire
from cluster.rpc.pb import cluster_pb2 as pb
from cluster.rpc.pb import cluster_pb2_grpc as pb_grpc
from cluster.rpc.worker import abort_with
from cluster.streaming import Progress, stream_generation
from cluster.tokenizer import TokenizerError
from cluster.tool_calls import AnswerSplitter, ToolCallFormat, ToolError, finish_reason, template_calls, tool_use

log = logging.getLogger(__name__)


def plan_to_pb(plan: Any) -> pb.PlanResponse:
    return pb.PlanResponse(
        model_id=plan.model_id,
        num_layers=plan.num_layers,
        max_context=plan.max_context,
        shards=[
            pb.PlanShard(
                node_id=a.node_id,
                name=a.name,
                address=a.address,
                start=a.start,
                end=a.end,
                bytes=a.bytes,
                free_memory=a.free_memory,
            )
            for a in plan.shards
        ],
        left_out=[f"{name}: {reason}" for name, reason in plan.left_out],
    )


def _message(m: pb.ChatMessage, call_id: Callable[[str], str]) -> dict[str, Any]:
    """A chat message as chat templates read it (the API's Message.for_template, from the wire)."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = template_calls([(c.id, c.name, c.arguments) for c in m.tool_calls], call_id)
    if m.tool_call_id:
        out["tool_call_id"] = call_id(m.tool_call_id)
    if m.name:
        out["name"] = m.name
    if m.reasoning_content:
        out["reasoning_content"] = m.reasoning_content
    return out


def _chunk_to_pb(item: TokenChunk | GenerationResult, answer: AnswerSplitter) -> pb.GenerateChunk:
    """A token, or the final Done; Done also holds what `answer` parts the whole answer into: a thinking model's
    reasoning, the content and the calls read from it."""
    if isinstance(item, TokenChunk):
        top = [pb.TopLogprob(id=i, logprob=lp) for i, lp in item.top]
        return pb.GenerateChunk(token=pb.Token(id=item.id, text=item.text, logprob=item.logprob, top=top))
    usage = item.usage()
    thinking, content, calls = answer.close(item.text)
    return pb.GenerateChunk(
        done=pb.Done(
            tokens=item.tokens,
            text=item.text,
            content=content,
            reasoning=thinking,
            tool_calls=[pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls],
            finish_reason=finish_reason(item.finish_reason, calls),
            usage=pb.Usage(**usage),
            timing=pb.Timing(
                ttft_ms=item.ttft_ms,
                decode_tok_s=item.decode_tok_s,
                shards=[
                    pb.ShardTiming(node=t.node, start=t.start, end=t.end, engine_ms=t.engine_ms, wait_ms=t.wait_ms)
                    for t in item.shards
                ],
            ),
        )
    )


async def _abort_request(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, (ModelNotFoundError, LookupError)):
        await context.abort(wire.NOT_FOUND, str(exc))
    if isinstance(exc, PlanError):
        await context.abort(wire.EXHAUSTED, str(exc))
    if isinstance(exc, (PromptTooLongError, TokenizerError, wire.WireError)):
        await context.abort(wire.INVALID, str(exc))
    if isinstance(exc, ShardUnavailableError):
        await context.abort(wire.UNAVAILABLE, str(exc))
    await abort_with(context, exc)


class ClusterService(pb_grpc.ClusterServicer):
    def __init__(self, coordinator: Coordinator, nodes: Callable[[], Awaitable[list[pb.NodeInfo]]]):
        self.coordinator = coordinator
        self.nodes = nodes

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        async for chunk in self._run(request.options, context, {"prompt": request.prompt, "raw": request.raw}):
            yield chunk

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        try:
            tools = [Tool.model_validate(t).model_dump(exclude_none=True) for t in json.loads(request.tools or "[]")]
        except (json.JSONDecodeError, TypeError, ValidationError) as e:
            await context.abort(wire.INVALID, f"tools: not a list of OpenAI tools: {e}")
        template = None
        if tools or any(m.tool_calls or m.tool_call_id for m in request.messages):
            try:  # the chat template tells how the model takes tools and call ids, and writes its calls
                tokenizer = (await asyncio.to_thread(self.coordinator.resolve, request.options.model)).tokenizer
                template = tokenizer.tool_template()
            except Exception as e:  # noqa: BLE001
                await _abort_request(context, e)
                raise
        try:
            use = tool_use(
                template,
                tools,
                request.tool_choice or None,
                request.tool_name or None,
                parallel=not request.one_tool_call,
            )
            messages = [_message(m, use.history_id) for m in request.messages]
        except ToolError as e:
            await context.abort(wire.INVALID, str(e))
        if use.json_schema is not None and request.options.json_schema:
            await context.abort(wire.INVALID, "json_schema: cannot be combined with a forced tool call")
        inputs: dict[str, Any] = {}
        if use.json_schema is not None:
            inputs["json_schema"] = use.json_schema
        try:
            template_kwargs = json.loads(request.template_kwargs or "{}")
        except json.JSONDecodeError as e:
            await context.abort(wire.INVALID, f"template_kwargs is not JSON: {e}")
        if not isinstance(template_kwargs, dict):
            await context.abort(wire.INVALID, "template_kwargs: a JSON object of chat template variables")
        prompt = {"messages": messages, "tools": use.offered, "template_kwargs": template_kwargs}
        async for chunk in self._run(request.options, context, prompt, use.reader, **inputs):
            yield chunk

    async def _run(
        self,
        options: pb.GenerationOptions,
        context: grpc.aio.ServicerContext,
        prompt: dict[str, Any],
        reader: ToolCallFormat | None = None,
        **inputs: Any,
    ) -> AsyncIterator[pb.GenerateChunk]:
        """prompt: Coordinator.encode's inputs; inputs: more of Coordinator.generate's."""
        if not options.model:
            await context.abort(wire.INVALID, "no model given")
        if options.max_tokens < 0 or options.logprobs < 0 or options.logprobs > 20:
            await context.abort(wire.INVALID, "max_tokens must be >= 0 and logprobs in [0, 20]")
        if options.json_schema:
            try:
                inputs["json_schema"] = json.loads(options.json_schema)
            except json.JSONDecodeError as e:
                await context.abort(wire.INVALID, f"json_schema is not JSON: {e}")
        try:
            encoded = await asyncio.to_thread(self.coordinator.encode, options.model, **prompt)
        except Exception as e:  # noqa: BLE001
            log.info("request failed: %s", e)
            await _abort_request(context, e)
            raise
        answer = AnswerSplitter(encoded.reasoning(), reader)
        chunks = stream_generation(
            self.coordinator,
            options.model,
            prompt=encoded,
            max_tokens=options.max_tokens or 256,
            sampling=wire.sampling_fields(options.sampling),
            stop=list(options.stop),
            logprobs=options.logprobs,
            **inputs,
        )
        try:
            async for item in chunks:
                if isinstance(item, Progress):
                    p = pb.Progress(stage=item.stage, node=item.node, done=item.done, total=item.total)
                    yield pb.GenerateChunk(progress=p)
                else:
                    yield _chunk_to_pb(item, answer)
        except Exception as e:  # noqa: BLE001 - every failure becomes a status the client maps to a type
            log.info("request failed: %s", e)
            await _abort_request(context, e)

    async def Nodes(self, request: pb.NodesRequest, context: grpc.aio.ServicerContext) -> pb.NodesResponse:
        return pb.NodesResponse(nodes=await self.nodes())

    async def Plan(self, request: pb.PlanRequest, context: grpc.aio.ServicerContext) -> pb.PlanResponse:
        try:
            plan = await asyncio.to_thread(self.coordinator.plan, request.model)
        except Exception as e:  # noqa: BLE001
            await _abort_request(context, e)
            raise
        return plan_to_pb(plan)
