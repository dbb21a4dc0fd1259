"""A ShardEngine living in its own runner process, used through the same calls as an in-process one."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cluster.engine.runner import Runner, RunnerCallError
from cluster.engine.shard import ShardEngine, StepResult
from cluster.sampling import SamplingParams


def build_engine(
    model_dir: str, start: int, end: int | None, emit: Callable[[dict], None] | None = None, **options: Any
) -> ShardEngine:
    """Runner factory: build the engine in the child, reporting load/warm-up progress to the parent."""
    progress = None
    if emit is not None:

        def progress(stage: str, done: int, total: int) -> None:
            emit({"stage": stage, "done": done, "total": total})

    return ShardEngine(model_dir, start, end, progress=progress, **options)


class EngineProcess:
    """Shard calls forwarded to a ShardEngine in a child process; engine errors re-raised as themselves."""

    def __init__(
        self,
        model_dir: str | Path,
        start: int = 0,
        end: int | None = None,
        *,
        on_progress: Callable[[str, int, int], None] | None = None,
        **options: Any,
    ):
        on_event = None
        if on_progress is not None:

            def on_event(event: dict[str, Any]) -> None:
                on_progress(event["stage"], event["done"], event["total"])

        self.runner = Runner(
            "cluster.engine.process:build_engine", str(model_dir), start, end, on_event=on_event, **options
        )

    def start(self, timeout: float | None = None) -> EngineProcess:
        """Spawn the process and load the weights (construction errors re-raised as themselves)."""
        self._unwrap(lambda: self.runner.start(timeout))
        return self

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._unwrap(lambda: self.runner.call(method, *args, **kwargs))

    async def acall(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """`method` for an event loop: the loop reads the reply itself, no thread waits on it (a node's
        servicer calls its shards this way)."""
        try:
            return await self.runner.acall(method, *args, **kwargs)
        except RunnerCallError as e:
            if e.exception is not None:
                raise e.exception from e
            raise

    @staticmethod
    def _unwrap(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RunnerCallError as e:
            # the engine's own error types (EngineError, ConfigError, ...) reach the caller unchanged
            if e.exception is not None:
                raise e.exception from e
            raise

    def warmup(self) -> None:
        self._call("warmup")

    def info(self) -> dict[str, Any]:
        return self._call("info")

    @functools.cached_property
    def pipeline_chunk(self) -> int:
        """ShardEngine.pipeline_chunk_size: shards in processes of their own may pipeline a long prompt
        (generation.prompt_chunk); engines sharing one process may not, tinygrad runs one thing at a time."""
        return int(self.info().get("pipeline_chunk") or 0)

    def memory_used(self) -> int:
        return int(self._call("memory_used"))

    def new_session(self, session_id: str | None = None, sampling: SamplingParams | None = None) -> str:
        return self._call("new_session", session_id, sampling)

    def truncate(self, session_id: str, length: int) -> None:
        self._call("truncate", session_id, length)

    def end_session(self, session_id: str) -> None:
        self._call("end_session", session_id)

    def forward(self, session_id: str, inputs: Any, **kwargs: Any) -> StepResult:
        return self._call("forward", session_id, inputs, **kwargs)

    def decode(self, session_id: str, token: int, steps: int, **kwargs: Any) -> Iterator[StepResult]:
        """ShardEngine.decode in the engine process, its steps streamed (Runner.stream): the process goes on to the
        next step without waiting for this one's reader. Close the iterator to stop it early."""
        with self._unwrap(lambda: self.runner.stream("decode", session_id, token, steps, **kwargs)) as results:
            while True:
                try:
                    yield self._unwrap(lambda: next(results))
                except StopIteration:
                    return

    @property
    def alive(self) -> bool:
        return self.runner.alive

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> EngineProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
