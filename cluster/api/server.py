"""The OpenAI-compatible HTTP API and the dashboard of a node (FastAPI, served by uvicorn in the node's loop).

Requests are served by the node's coordinator exactly like `clusterctl run`; the cluster token is the API key
(`Authorization: Bearer <token>`). Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from cluster.api.schemas import ChatCompletionRequest, CompletionRequest, sampling_of
from cluster.chain import ShardUnavailableError
from cluster.coordinator import Coordinator
from cluster.generation import GenerationResult, Prompt, PromptTooLongError, TokenChunk
from cluster.host import ShardBusyError
from cluster.partition import PlanError
from cluster.registry import REGISTRY, ModelNotFoundError
from cluster.streaming import Progress, stream_generation
from cluster.tokenizer import Tokenizer, TokenizerError
from cluster.tool_calls import AnswerSplitter, ToolCall, ToolCallFormat, ToolError, finish_reason, tool_use

log = logging.getLogger(__name__)
# No max_tokens: the answer ends at EOS, a stop string or the end of the context, as OpenAI's do
UNTIL_THE_CONTEXT_ENDS = 2**31 - 1
_HANG_UP_POLL_S = 0.25  # how often a request that waits for its answer checks that its client is still there


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def api_error(exc: BaseException) -> ApiError:
    """The HTTP status and OpenAI error type for what the coordinator raised."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (ModelNotFoundError, LookupError)):
        return ApiError(404, str(exc), "invalid_request_error", "model_not_found")
    if isinstance(exc, PlanError):
        return ApiError(507, str(exc), "server_error", "does_not_fit")
    if isinstance(exc, (PromptTooLongError, TokenizerError, ValueError)):
        return ApiError(400, str(exc), "invalid_request_error")
    if isinstance(exc, ShardUnavailableError):
        return ApiError(503, str(exc), "server_error", "node_unavailable")
    if isinstance(exc, ShardBusyError):
        return ApiError(503, str(exc), "server_error", "busy")
    log.exception("API request failed", exc_info=exc)
    return ApiError(500, f"{type(exc).__name__}: {exc}", "server_error")


class _Authorise:
    """Every call but the dashboard page needs the cluster token as the API key. Plain ASGI rather than
    `@app.middleware("http")`: that one hides from the endpoints that their client hung up."""

    def __init__(self, app: ASGIApp, expected: str):
        self.app, self.expected = app, expected.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # the page itself holds no data; everything it shows comes from calls that need the key
        if scope["type"] == "http" and scope["path"] not in ("/", "/favicon.ico"):
            given = Headers(scope=scope).get("authorization", "")
            if not hmac.compare_digest(given.encode(), self.expected):
                message = "not authorised: send the cluster token as the API key (Authorization: Bearer <token>)"
                response = ApiError(401, message, "invalid_request_error", "invalid_api_key").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    coordinator: Coordinator,
    token: str,
    status: Callable[[], Awaitable[dict[str, Any]]],
) -> FastAPI:
    """status: what the dashboard shows (nodes, plans, speed), gathered by the node."""
    app = FastAPI(title="clusterctl", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        # a validator's own message as it wrote it, without pydantic's "Value error, " in front
        cause = (first.get("ctx") or {}).get("error")
        message = str(cause) if first.get("type") == "value_error" and cause else first.get("msg", "invalid request")
        # a refusal of the whole request names its field at the start of the message ("n: one answer ...")
        named = re.match(r"(\w+): ", message) if not where else None
        return ApiError(400, f"{where}: {message}".strip(": "), param=where or (named and named[1])).response()

    app.add_middleware(_Authorise, expected=f"Bearer {token}")

    @app.get("/", response_class=HTMLResponse)
    async def dashboard() -> str:
        return resources.files("cluster.api").joinpath("static/dashboard.html").read_text()

    @app.get("/api/status")
    async def api_status() -> dict[str, Any]:
        return await status()

    def known() -> list[str]:
        """The models in use here, then the registry's names."""
        return list(dict.fromkeys([*coordinator.models, *REGISTRY]))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model(name) for name in known()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        # what the list holds; a repo id or directory not used yet is not looked up (that could mean a download)
        if name not in known():
            raise ApiError(
                404, f"model {name!r} is not in use on this cluster nor a registry name", code="model_not_found"
            )
        return _model(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request) -> Any:
        # the model's chat template tells how it takes tools, reads call ids of earlier turns and writes its calls
        template = await _tool_template(body.model) if body.tools or body.holds_calls else None
        choice = body.tool_choice if isinstance(body.tool_choice, str) else None
        try:
            use = tool_use(template, body.tool_dicts, choice, body.forced_tool, body.parallel_tool_calls is not False)
        except ToolError as e:
            raise ApiError(400, str(e), param=e.param) from None
        prompt = {
            "messages": [m.for_template(use.history_id) for m in body.messages],
            "tools": use.offered,
            "template_kwargs": body.chat_template_kwargs,
        }
        json_schema = use.json_schema or body.json_schema
        request = _request(body, json_schema=json_schema, logprobs=body.top_logprobs or (1 if body.logprobs else 0))
        respond = _respond(body.model, body.stream, body.include_usage, "chat.completion", prompt, request, use.reader)
        return await _while_connected(http, respond)

    async def _tool_template(model: str) -> str | None:
        try:
            ref = await asyncio.to_thread(coordinator.resolve, model)
        except Exception as e:  # noqa: BLE001
            raise api_error(e) from None
        return ref.tokenizer.tool_template()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> Any:
        request = _request(body, logprobs=body.logprobs or 0)
        prompt = {"prompt": body.prompt, "raw": True}
        return await _while_connected(
            http, _respond(body.model, body.stream, body.include_usage, "text_completion", prompt, request)
        )

    def _request(body: Any, **inputs: Any) -> dict[str, Any]:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return {"max_tokens": body.max_tokens, "sampling": sampling_of(body), "stop": stop, **inputs}

    async def _respond(
        model: str,
        stream: bool,
        include_usage: bool,
        kind: str,
        prompt: dict[str, Any],
        request: dict[str, Any],
        calls: ToolCallFormat | None = None,
    ) -> Any:
        """calls: how tool calls are read from the answer (after a thinking model's reasoning is parted from it)."""
        try:  # errors before the first token become a proper status code
            encoded = await asyncio.to_thread(coordinator.encode, model, **prompt)
        except Exception as e:  # noqa: BLE001
            raise api_error(e) from None
        chunks = _generation(model, encoded, request)
        first = await _first(chunks)
        tokenizer = coordinator.resolve(model).tokenizer
        splitter = AnswerSplitter(encoded.reasoning(), calls)
        if stream:
            return StreamingResponse(
                _sse(model, kind, first, chunks, tokenizer, include_usage, splitter), media_type="text/event-stream"
            )
        return await _whole(model, kind, first, chunks, tokenizer, splitter)

    async def _generation(
        model: str, prompt: Prompt, request: dict[str, Any]
    ) -> AsyncIterator[TokenChunk | GenerationResult]:
        request = {**request, "prompt": prompt, "max_tokens": request["max_tokens"] or UNTIL_THE_CONTEXT_ENDS}
        async for item in stream_generation(coordinator, model, **request):
            if not isinstance(item, Progress):
                yield item

    return app


async def _while_connected(http: Request, work: Awaitable[Any]) -> Any:
    """The answer of `work`, unless the client hangs up first (an OpenAI client's timeout closes its connection):
    then `work` is cancelled, which stops its generation, also while it waits for a free session. A streamed
    answer is covered only until its first token; from then on the streaming response stops it the same way."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_hung_up(http))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # its generation sees the cancellation and stops
    if task.cancelled():
        log.info("the client hung up before its answer was ready; its request was stopped")
        return Response(status_code=499)  # nobody reads it
    return task.result()


async def _hung_up(http: Request) -> None:
    while not await http.is_disconnected():
        await asyncio.sleep(_HANG_UP_POLL_S)


async def _first(chunks: AsyncIterator[TokenChunk | GenerationResult]) -> TokenChunk | GenerationResult:
    try:
        return await anext(chunks)
    except Exception as e:  # noqa: BLE001
        raise api_error(e) from None


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "clusterctl"}


def _logprob_entry(tokenizer: Tokenizer, chunk: TokenChunk, chat: bool) -> dict[str, Any]:
    text = tokenizer.decode([chunk.id])
    top = [
        {"token": tokenizer.decode([i]), "logprob": lp, "bytes": list(tokenizer.decode([i]).encode())}
        for i, lp in chunk.top
    ]
    if chat:
        return {"token": text, "logprob": chunk.logprob, "bytes": list(text.encode()), "top_logprobs": top}
    return {"token": text, "logprob": chunk.logprob, "top": {t["token"]: t["logprob"] for t in top}}


def _choice(
    kind: str,
    text: str,
    finish: str | None,
    logprobs: Any,
    stream: bool,
    calls: Sequence[ToolCall] = (),
    reasoning: str = "",
) -> dict[str, Any]:
    if kind.startswith("chat"):
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if reasoning:
            # DeepSeek's and llama.cpp's name for it, and vLLM's newer one: clients read one or the other
            message["reasoning_content"] = message["reasoning"] = reasoning
        if calls:
            # a streamed call comes whole in one delta, with the index OpenAI's deltas carry
            message["tool_calls"] = [c.to_openai(i if stream else None) for i, c in enumerate(calls)]
            if not text and not stream:
                message["content"] = None  # as OpenAI answers a turn that only calls tools
            finish = finish_reason(finish, calls)
        return {"index": 0, "delta" if stream else "message": message, "finish_reason": finish, "logprobs": logprobs}
    return {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}


def _completion_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [e["top"] for e in entries],
        "text_offset": [],
    }


async def _whole(
    model: str,
    kind: str,
    first: TokenChunk | GenerationResult,
    chunks: AsyncIterator[TokenChunk | GenerationResult],
    tokenizer: Tokenizer,
    answer: AnswerSplitter,
) -> dict[str, Any]:
    chat = kind.startswith("chat")
    entries: list[dict[str, Any]] = []
    item = first
    while isinstance(item, TokenChunk):
        entries.append(_logprob_entry(tokenizer, item, chat))
        item = await anext(chunks)
    result = item
    reasoning, text, calls = answer.close(result.text)
    logprobs = (
        ({"content": entries} if chat else _completion_logprobs(entries))
        if entries and first_has_logprobs(first)
        else None
    )
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [_choice(kind, text, result.finish_reason, logprobs, False, calls, reasoning)],
        "usage": result.usage(),
        "timing": result.timing(),
    }


def first_has_logprobs(first: TokenChunk | GenerationResult) -> bool:
    return isinstance(first, TokenChunk) and bool(first.top)


async def _sse(
    model: str,
    kind: str,
    first: TokenChunk | GenerationResult,
    chunks: AsyncIterator[TokenChunk | GenerationResult],
    tokenizer: Tokenizer,
    include_usage: bool,
    answer: AnswerSplitter,
) -> AsyncIterator[str]:
    chat = kind.startswith("chat")
    base = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
    }

    def event(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {**base, "choices": [choice] if choice else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    item = first
    try:
        while isinstance(item, TokenChunk):
            logprobs = None
            if item.top:
                entry = _logprob_entry(tokenizer, item, chat)
                logprobs = {"content": [entry]} if chat else _completion_logprobs([entry])
            reasoning, text = answer.push(item.text)  # what may open a call or end the reasoning is held back
            yield event(_choice(kind, text, None, logprobs, True, reasoning=reasoning))
            item = await anext(chunks)
        result = item
        reasoning, text, calls = answer.close(result.tail)
        yield event(_choice(kind, text, result.finish_reason, None, True, calls, reasoning))
        if include_usage:
            yield event(None, result.usage())
    except Exception as e:  # noqa: BLE001 - mid-stream: the status line is gone, say it in the stream
        err = api_error(e)
        yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.kind, 'code': err.code}})}\n\n"
    yield "data: [DONE]\n\n"
