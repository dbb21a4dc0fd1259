"""The Worker service: a node's shards as seen by the coordinators of the cluster (grpc.aio).

Engine calls block (they go to an engine process), so they run in threads; the event loop only moves messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np

from cluster import transfer
from cluster.discovery import parse_address
from cluster.engine.runner import RunnerError
from cluster.engine.shard import ContextFullError, EngineError
from cluster.host import (
    HostedShard,
    ModelUnavailableError,
    SessionOpenError,
    ShardBusyError,
    ShardHost,
    UnknownShardError,
    check_model_id,
)
from cluster.models.config import ConfigError
from cluster.rpc import wire
from cluster.rpc.pb import cluster_pb2 as pb
from cluster.rpc.pb import cluster_pb2_grpc as pb_grpc
from cluster.weights import CheckpointError

log = logging.getLogger(__name__)
_CHUNKS_DONE = object()
MAX_ID = 128  # characters in a session or shard id
MAX_CONTEXT = 1 << 20
MAX_SOURCES = 32
MAX_TOP_LOGPROBS = 20


def check_id(value: str, what: str) -> str:
    if not value or len(value) > MAX_ID or not value.isprintable():
        raise wire.WireError(f"{what} must be 1 to {MAX_ID} printable characters")
    return value


def check_load(request: pb.LoadShardRequest) -> None:
    check_model_id(request.model_id)
    if not 0 <= request.start < request.end:
        raise wire.WireError(f"bad layer range [{request.start}, {request.end})")
    if not 16 <= request.max_context <= MAX_CONTEXT:
        raise wire.WireError(f"max_context must be in [16, {MAX_CONTEXT}], got {request.max_context}")
    if request.dtype not in ("", "float32", "float16"):
        raise wire.WireError(f"dtype must be float32 or float16, got {request.dtype!r}")
    if len(request.holder) > MAX_ID or not request.holder.isprintable():
        raise wire.WireError(f"holder must be at most {MAX_ID} printable characters")
    if len(request.sources) > MAX_SOURCES:
        raise wire.WireError(f"at most {MAX_SOURCES} sources")
    for source in request.sources:
        parse_address(source)  # ValueError names it


def check_step(shard: HostedShard, request: pb.ForwardRequest) -> None:
    """Everything of a step the engine does not check itself."""
    limit = int(shard.info["max_context"])
    vocab = int(shard.info["vocab_size"])
    if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
        raise wire.WireError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
    if request.HasField("truncate") and not 0 <= request.truncate <= limit:
        raise wire.WireError(f"truncate must be in [0, {limit}]")
    if len(request.context_ids) > limit or any(not 0 <= i < vocab for i in request.context_ids):
        raise wire.WireError(f"context_ids must be at most {limit} ids in [0, {vocab})")
    if len(request.generated_ids) > limit or any(not 0 <= i < vocab for i in request.generated_ids):
        raise wire.WireError(f"generated_ids must be at most {limit} ids in [0, {vocab})")
    if request.allowed_ids and len(request.allowed_ids) != -(-vocab // 8):
        raise wire.WireError(f"allowed_ids must be {-(-vocab // 8)} bytes, one bit per id of {vocab}")


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC code a node answers an exception with (the client maps codes back to typed errors)."""
    if isinstance(exc, (ContextFullError, ShardBusyError)):
        return wire.EXHAUSTED
    if isinstance(exc, EngineError) and "need" in str(exc) and "available" in str(exc):
        return wire.EXHAUSTED  # the shard does not fit this node's memory
    if isinstance(exc, (UnknownShardError, ModelUnavailableError)):
        return wire.NOT_FOUND
    if isinstance(exc, (EngineError, wire.WireError, ConfigError, CheckpointError, transfer.TransferError, ValueError)):
        return wire.INVALID
    return grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("internal error", exc_info=exc)
    await context.abort(code, str(exc) or type(exc).__name__)


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(
        self,
        host: ShardHost,
        node_info: Callable[[], pb.NodeInfo],
        *,
        learn: Callable[[str], None] = lambda address: None,
        session_timeout: float = 600.0,
    ):
        self.host = host
        self.node_info = node_info
        self.learn = learn
        self.session_timeout = session_timeout

    async def Info(self, request: pb.NodeInfoRequest, context: grpc.aio.ServicerContext) -> pb.NodeInfo:
        if request.caller:
            self.learn(request.caller)
        info = self.node_info()
        if request.live_memory:
            await self.add_live_memory(info)
        return info

    async def add_live_memory(self, info: pb.NodeInfo) -> None:
        for s in info.shards:
            try:
                s.memory_used = await self.host.shard(s.shard_id).engine.acall("memory_used")
            except (UnknownShardError, EngineError, RunnerError):
                pass  # unloaded meanwhile

    async def LoadShard(
        self, request: pb.LoadShardRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LoadProgress]:
        try:
            check_load(request)
        except ValueError as e:
            await context.abort(wire.INVALID, str(e))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[pb.LoadProgress] = asyncio.Queue()

        def progress(stage: str, done: int, total: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, pb.LoadProgress(stage=stage, done=done, total=total))

        load = asyncio.ensure_future(
            asyncio.to_thread(
                self.host.load,
                request.model_id,
                request.start,
                request.end,
                max_context=request.max_context,
                sources=list(request.sources),
                dtype=request.dtype or None,
                holder=request.holder,
                progress=progress,
            )
        )
        try:
            while not load.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({load, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            shard = load.result()
        except asyncio.CancelledError:
            # the coordinator went away: a shard loaded for nobody is unloaded as soon as it is ready
            def unload_orphan(f: asyncio.Future[HostedShard]) -> None:
                if not f.cancelled() and f.exception() is None:
                    self.host.unload(f.result().shard_id, request.holder)

            load.add_done_callback(unload_orphan)
            raise
        except Exception as e:  # noqa: BLE001 - every failure goes back to the coordinator as a status
            await abort_with(context, e)
            return
        yield pb.LoadProgress(stage="ready", done=1, total=1, shard=shard.to_pb())

    async def UnloadShard(
        self, request: pb.UnloadShardRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadShardResponse:
        try:
            await asyncio.to_thread(self.host.unload, request.shard_id, request.holder)
        except UnknownShardError as e:
            await abort_with(context, e)
        return pb.UnloadShardResponse()

    async def Forward(
        self, request_iterator: AsyncIterator[pb.ForwardRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ForwardResponse]:
        shard: HostedShard | None = None
        sid = ""
        sampling = None
        requests = aiter(request_iterator)
        try:
            while True:
                try:
                    # a session nobody drives for session_timeout seconds is ended and its KV slice freed
                    request = await asyncio.wait_for(anext(requests), self.session_timeout)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"session {sid!r} idle for too long")
                    return
                if shard is None:
                    shard = self.host.shard(check_id(request.shard_id, "shard_id"))
                    sid = check_id(request.session_id, "the first message's session_id")
                    sampling = wire.sampling_from_pb(request.sampling)
                    try:
                        await shard.aopen_session(sid, sampling)  # waits while every session is in use
                    except SessionOpenError:
                        sid = ""  # not ours to end
                        raise
                elif request.session_id not in ("", sid):
                    raise wire.WireError(f"this stream carries session {sid!r}, not {request.session_id!r}")
                yield await self._step(shard, sid, request, sampling)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)
        finally:
            if shard is not None and sid:
                try:
                    await shard.aend_session(sid)
                except (EngineError, RunnerError):
                    log.debug("ending session %s on a closed shard", sid)

    async def _step(
        self, shard: HostedShard, sid: str, request: pb.ForwardRequest, sampling: Any
    ) -> pb.ForwardResponse:
        check_step(shard, request)
        if request.HasField("truncate"):
            await shard.engine.acall("truncate", sid, request.truncate)
        which = request.WhichOneof("input")
        if which is None:
            return pb.ForwardResponse()
        if which == "tokens":
            x = wire.from_tensor(request.tokens, wire.TOKEN_DTYPES)
        else:
            x = wire.from_tensor(request.hidden, wire.HIDDEN_DTYPES)
            if x.ndim != 2 or x.shape[0] > int(shard.info["max_context"]):
                raise wire.WireError(f"hidden states of shape {list(x.shape)} do not fit this shard")
        kwargs: dict[str, Any] = {}
        if shard.end == int(shard.info["num_layers"]):
            kwargs = {"sampling": sampling, "logprobs": request.top_logprobs}
            if request.context_ids:
                kwargs["token_ids"] = list(request.context_ids)
            if request.allowed_ids:
                kwargs["allowed"] = request.allowed_ids
            if request.generated_ids:
                kwargs["generated"] = list(request.generated_ids)
        result = await shard.engine.acall("forward", sid, x, **kwargs)
        if result.hidden is not None:
            return pb.ForwardResponse(hidden=wire.to_tensor(np.asarray(result.hidden)), engine_ms=result.engine_ms)
        assert result.token is not None and result.logprob is not None
        return pb.ForwardResponse(
            token=result.token,
            logprob=result.logprob,
            top_ids=[i for i, _ in result.top],
            top_logprobs=[lp for _, lp in result.top],
            engine_ms=result.engine_ms,
        )

    async def EndSession(
        self, request: pb.EndSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.EndSessionResponse:
        try:
            shard = self.host.shard(request.shard_id)
        except UnknownShardError as e:
            await abort_with(context, e)
            raise
        await shard.aend_session(request.session_id)
        return pb.EndSessionResponse()

    async def GetManifest(self, request: pb.ManifestRequest, context: grpc.aio.ServicerContext) -> pb.Manifest:
        try:
            check_model_id(request.model_id)
        except ValueError as e:
            await context.abort(wire.INVALID, str(e))
        path = self.host.full_copy(request.model_id)
        if path is None:
            await context.abort(wire.NOT_FOUND, f"this node has no full copy of {request.model_id!r}")
        assert path is not None
        try:
            return await asyncio.to_thread(transfer.build_manifest, path, request.model_id)
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)
            raise

    async def PullTensors(
        self, request: pb.PullTensorsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TensorChunk]:
        try:
            check_model_id(request.model_id)
            if len(request.names) > 100_000 or any(len(n) > 1024 for n in request.names):
                raise wire.WireError("too many tensor names, or a name longer than 1024 characters")
        except ValueError as e:
            await context.abort(wire.INVALID, str(e))
        path = self.host.served_copy(request.model_id)
        if path is None:
            await context.abort(wire.NOT_FOUND, f"this node has no copy of {request.model_id!r}")
        assert path is not None
        try:
            chunks = await asyncio.to_thread(transfer.iter_tensor_chunks, path, list(request.names))
            while True:
                chunk = await asyncio.to_thread(next, chunks, _CHUNKS_DONE)
                if chunk is _CHUNKS_DONE:
                    return
                assert isinstance(chunk, pb.TensorChunk)
                yield chunk
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)
