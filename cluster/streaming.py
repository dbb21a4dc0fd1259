"""One generation as an async iterator: the coordinator blocks (engines, streams), so it runs in a thread and
its chunks cross into the event loop through a queue. A consumer that stops iterating (a client that went away)
stops the generation at the next token, which ends the session on every shard; a request still waiting for a
free session, or for another node's step, gives up at once.

Used by the gRPC Cluster service and the HTTP API alike.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from cluster.chain import Cancellation
from cluster.coordinator import Coordinator
from cluster.generation import GenerationResult, TokenChunk

_END = object()


@dataclass(frozen=True)
class Progress:
    stage: str
    node: str
    done: int
    total: int


async def stream_generation(
    coordinator: Coordinator, model: str, **request: Any
) -> AsyncIterator[TokenChunk | GenerationResult | Progress]:
    """Progress events while shards are placed, a TokenChunk per token, then the GenerationResult. Errors
    (unknown model, bad parameters, a model that does not fit) are raised here, in the event loop."""
    loop = asyncio.get_running_loop()
    out: asyncio.Queue[Any] = asyncio.Queue()
    cancellation = Cancellation()

    def put(item: Any) -> None:
        loop.call_soon_threadsafe(out.put_nowait, item)

    def progress(stage: str, node: str, done: int, total: int) -> None:
        put(Progress(stage, node, done, total))

    def work() -> None:
        try:
            chunks = coordinator.generate(model, progress=progress, cancellation=cancellation, **request)
            try:
                for item in chunks:
                    if cancellation.is_set():
                        break
                    put(item)
            finally:
                chunks.close()  # ends the session on every shard
            put(_END)
        except BaseException as e:  # noqa: BLE001 - raised again in the event loop
            put(e)

    threading.Thread(target=work, name="generate", daemon=True).start()
    try:
        while True:
            item = await out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancellation.cancel()  # also ends a wait for a free session or for another node's step
