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


def _chunk_to_pb(item: TokenChunk | GenerationResult) -> pb.GenerateChunk:
    if isinstance(item, TokenChunk):
        top = [pb.TopLogprob(id=i, logprob=lp) for i, lp in item.top]
        return pb.GenerateChunk(token=pb.Token(id=item.id, text=item.text, logprob=item.logprob, top=top))
    usage = item.usage()
    return pb.GenerateChunk(
        done=pb.Done(
            tokens=item.tokens,
            text=item.text,
            finish_reason=item.finish_reason,
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
        async for chunk in self._run(request.options, context, prompt=request.prompt, raw=request.raw):
            yield chunk

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        async for chunk in self._run(request.options, context, messages=messages):
            yield chunk

    async def _run(
        self, options: pb.GenerationOptions, context: grpc.aio.ServicerContext, **inputs: Any
    ) -> AsyncIterator[pb.GenerateChunk]:
        if not options.model:
            await context.abort(wire.INVALID, "no model given")
        if options.max_tokens < 0 or options.logprobs < 0 or options.logprobs > 20:
            await context.abort(wire.INVALID, "max_tokens must be >= 0 and logprobs in [0, 20]")
        if options.json_schema:
            try:
                inputs["json_schema"] = json.loads(options.json_schema)
            except json.JSONDecodeError as e:
                await context.abort(wire.INVALID, f"json_schema is not JSON: {e}")
        chunks = stream_generation(
            self.coordinator,
            options.model,
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
                    yield _chunk_to_pb(item)
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
