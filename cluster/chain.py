"""A session's shards driven as one shard, which survives losing a node.

Every token id whose K/V the shards hold is remembered. When a shard's node is lost mid-session, `replace`
returns shards over the nodes left (the coordinator plans again and places the missing layers); the chain
opens the session on them, rebuilds every KV slice by replaying the remembered ids as one prefill, and runs
the failed step again. The output is the same as without the failure: greedy, and seeded sampling too (the
engine draws each token's random number from the seed and the token's position).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from cluster.engine.shard import StepResult
from cluster.generation import Shard, decode_steps, step
from cluster.sampling import SamplingParams

log = logging.getLogger(__name__)


class ShardUnavailableError(RuntimeError):
    """A node holding a shard stopped answering (or its engine process died)."""

    def __init__(self, message: str, node_id: str = ""):
        super().__init__(message)
        self.node_id = node_id


class RequestCancelled(RuntimeError):
    """The request's client went away: nothing more runs for it."""


class Cancellation:
    """Set once, from any thread, when a request's client goes away. The parts of the request that block (a wait
    for a free session, a step on another node) register a callback that makes them give up at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._callbacks: list[Callable[[], None]] = []

    def is_set(self) -> bool:
        return self._set

    def cancel(self) -> None:
        with self._lock:
            if self._set:
                return
            self._set = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the request is cancelled (now, when it already is)."""
        with self._lock:
            if not self._set:
                self._callbacks.append(callback)
                return
        callback()


class Chain:
    def __init__(
        self,
        shards: Sequence[Shard],
        replace: Callable[[ShardUnavailableError], Sequence[Shard]],
        *,
        max_recoveries: int = 3,
        cancellation: Cancellation | None = None,
    ):
        self.shards = list(shards)
        self.replace = replace
        self.max_recoveries = max_recoveries
        self.cancellation = cancellation or Cancellation()
        self.cancellation.on_cancel(self._cancel_shards)
        self.history: list[int] = []  # ids whose K/V the shards hold, in position order
        self.generated: list[int] = []  # the ids of the current answer among them, for OpenAI's penalties
        self.recoveries: list[float] = []  # seconds each recovery took
        self.sid = ""
        self.sampling = SamplingParams()
        # (stage, done, total) for each chunk of a long prompt ("prompt") or of a lost node's replay ("replay")
        self.progress: Callable[[str, int, int], None] = lambda stage, done, total: None

    def new_session(self, session_id: str | None = None, sampling: SamplingParams | None = None) -> str:
        self.sampling = sampling or SamplingParams()
        self.sid = session_id or self.sid or uuid.uuid4().hex
        for attempt in range(self.max_recoveries + 1):
            self._check_cancelled()
            try:
                for shard in self.shards:
                    shard.new_session(self.sid, self.sampling)
                return self.sid
            except ShardUnavailableError as e:  # a shard was lost (or unloaded) between requests
                self._check_cancelled(e)
                if attempt == self.max_recoveries:
                    raise
                self._recover(self.sid, e)
                return self.sid
        raise AssertionError("unreachable")

    def truncate(self, session_id: str, length: int) -> None:
        for shard in self.shards:
            shard.truncate(session_id, length)
        del self.history[length:]
        self.generated = []  # truncating starts an answer

    def end_session(self, session_id: str) -> None:
        for shard in self.shards:
            try:
                shard.end_session(session_id)
            except Exception:  # noqa: BLE001 - a lost node cannot end anything; the others still should
                log.debug("ending session %s on a shard failed", session_id, exc_info=True)

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
        ids = [int(i) for i in np.asarray(inputs).reshape(-1)]
        params = sampling or self.sampling
        for attempt in range(self.max_recoveries + 1):
            self._check_cancelled()
            try:
                result = step(
                    self.shards,
                    session_id,
                    ids,
                    params,
                    logprobs,
                    list(token_ids or ids),
                    allowed,
                    generated,
                    lambda done, total: self.progress("prompt", done, total),
                )
                self.history += ids
                self.generated += generated
                return result
            except ShardUnavailableError as e:
                self._check_cancelled(e)  # a stream cancelled because the client left is no lost node
                if attempt == self.max_recoveries:
                    raise
                self._recover(session_id, e)
        raise AssertionError("unreachable")

    def decode(
        self,
        session_id: str,
        token: int,
        steps: int,
        *,
        sampling: SamplingParams | None = None,
        logprobs: int = 0,
        stop_ids: Sequence[int] = (),
    ) -> Iterator[StepResult]:
        """generation.decode_steps through the chain's shards (streamed from a lone shard that decodes on its own),
        each result's input remembered as it is read. A lost node: recover, then go on from the last token read."""
        params = sampling or self.sampling
        stops = frozenset(stop_ids)
        recoveries = 0
        while steps > 0:
            self._check_cancelled()
            results = decode_steps(self.shards, session_id, token, steps, params, logprobs, list(stops))
            try:
                for result in results:
                    self._check_cancelled()
                    self.history.append(token)
                    self.generated.append(token)
                    yield result
                    assert result.token is not None
                    steps, token = steps - 1, result.token
                    if token in stops:
                        return
                return
            except ShardUnavailableError as e:
                self._check_cancelled(e)
                if recoveries == self.max_recoveries:
                    raise
                recoveries += 1
                self._recover(session_id, e)
            finally:
                results.close()

    def _check_cancelled(self, cause: BaseException | None = None) -> None:
        if self.cancellation.is_set():
            raise RequestCancelled("the client went away") from cause

    def _cancel_shards(self) -> None:
        """Wake whatever this request waits on: a free session on a local shard, a remote shard's answer."""
        for shard in list(self.shards):
            cancel = getattr(shard, "cancel", None)  # in-process engines (tests, `run --local`) have nothing to wake
            if cancel is not None:
                cancel()

    def _recover(self, session_id: str, error: ShardUnavailableError) -> None:
        t0 = time.perf_counter()
        log.warning("session %s lost a shard (%s); placing it again", session_id[:8], error)
        self.end_session(session_id)
        self.shards = list(self.replace(error))
        for shard in self.shards:
            shard.new_session(session_id, self.sampling)
        if self.history:  # one prefill rebuilds every shard's KV slice; its sampled token is not needed
            step(
                self.shards,
                session_id,
                self.history,
                self.sampling,
                0,
                self.history,
                None,
                self.generated,
                lambda done, total: self.progress("replay", done, total),
            )
        took = time.perf_counter() - t0
        self.recoveries.append(took)
        log.warning(
            "session %s recovered in %.2f s (replayed %d positions over %d shards)",
            session_id[:8],
            took,
            len(self.history),
            len(self.shards),
        )
