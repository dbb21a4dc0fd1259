"""The generation loop: drive a chain of shards token by token, detokenise, apply stops.

Shards are anything with the ShardEngine calling convention (an in-process engine, an engine in a runner
process, later a remote node): hidden states flow from shard to shard, the last one samples a token.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any, Protocol

import numpy as np

from cluster.constraints import Constraint, ThinkingFirst
from cluster.engine.shard import ShardTime, StepResult, decode_stepwise
from cluster.reasoning import ReasoningSplitter, opened_by, thinking_tags
from cluster.sampling import SamplingParams
from cluster.stop_strings import StopStringFilter
from cluster.tokenizer import StreamingDetokenizer, Tokenizer

log = logging.getLogger(__name__)
PROGRESS_REPORTS = 8  # a prompt through one shard is cut in at most this many chunks


class Shard(Protocol):
    def new_session(self, session_id: str | None = None, sampling: SamplingParams | None = None) -> str: ...
    def end_session(self, session_id: str) -> None: ...
    def truncate(self, session_id: str, length: int) -> None: ...
    def forward(
        self,
        session_id: str,
        inputs: Any,
        *,
        sampling: SamplingParams | None = ...,
        token_ids: Sequence[int] | None = ...,
        logprobs: int = ...,
        allowed: bytes | None = ...,
        generated: Sequence[int] = ...,
    ) -> StepResult: ...


def generation_defaults(model_dir: Path) -> dict[str, Any]:
    """Sampling defaults from generation_config.json, the way the model's authors ship them."""
    try:
        raw = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(raw, dict):
        return {}
    if not raw.get("do_sample", True):
        return {"temperature": 0.0}
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    return {k: raw[k] for k in keys if isinstance(raw.get(k), (int, float))}


class PromptTooLongError(ValueError):
    pass


@dataclass(frozen=True)
class Prompt:
    """A request's prompt as the model reads it (encode_prompt)."""

    ids: list[int]
    # rendered with a thinking model's chat template: the ids of its <think> and </think> (reasoning.thinking_tags)
    tags: tuple[int, int] | None = None
    opened: bool = False  # the prompt itself opened the thinking block, so the answer starts inside it

    def reasoning(self) -> ReasoningSplitter | None:
        """What separates the answer's reasoning from its content (cluster/reasoning.py); None: no reasoning."""
        return ReasoningSplitter(self.opened) if self.tags else None


def encode_prompt(
    tokenizer: Tokenizer,
    *,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
    raw: bool = False,
) -> Prompt:
    """`messages` through the model's chat template (with `tools` and `template_kwargs`, extra variables such as
    Qwen3's `enable_thinking`), or `prompt` as one user message, or with `raw` as the text itself."""
    if raw:
        return Prompt(tokenizer.encode(prompt or "", add_special_tokens=True))
    if messages is None:
        messages = [{"role": "user", "content": prompt or ""}]
    text, ids = tokenizer.render_chat(messages, add_generation_prompt=True, tools=tools, **(template_kwargs or {}))
    return Prompt(ids, thinking_tags(tokenizer, tools), opened_by(text))


@dataclass
class TokenChunk:
    """One generated token and the text it completed (may be "" while UTF-8 or a stop string is pending)."""

    id: int
    text: str
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length" (max tokens or context)
    prompt_tokens: int
    ttft_ms: float
    decode_tok_s: float
    tail: str = ""  # text released at the very end (held back until then); already part of `text`
    shards: list[ShardTime] = field(default_factory=list)  # each shard's mean share of a decode step

    def timing(self) -> dict[str, Any]:
        """The `timing` object of `run --json`, the SDK's last chunk and the HTTP API's responses."""
        return {"ttft_ms": self.ttft_ms, "decode_tok_s": self.decode_tok_s, "shards": shard_times_dicts(self.shards)}

    def usage(self) -> dict[str, int]:
        n = len(self.tokens)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": self.prompt_tokens + n,
        }


@dataclass
class Conversation:
    """A session kept open across turns: the next prompt reuses the KV cache of the longest prefix it shares
    with what the shards already hold, so a chat turn prefills only its new tokens."""

    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tokens: list[int] = field(default_factory=list)  # ids whose K/V the shards hold, in order
    open: bool = False

    def close(self, shards: Sequence[Shard]) -> None:
        if self.open:
            _end(shards, self.session_id)
        self.open, self.tokens = False, []


def _end(shards: Sequence[Shard], sid: str) -> None:
    for shard in shards:
        try:
            shard.end_session(sid)
        except Exception:  # a dead shard must not hide the real error
            log.exception("ending session %s failed", sid)


def _reusable(cached: list[int], prompt: list[int]) -> int:
    """How many leading positions of the cache serve `prompt` (at least one prompt token is always re-run,
    since the last position's logits are not kept)."""
    return min(len(os.path.commonprefix([cached, prompt])), len(prompt) - 1)


def shard_time(shard: Any, result: StepResult, wait_ms: float) -> list[ShardTime]:
    """What a shard's step cost, for the timing summary. A shard made of shards (a Chain) reports theirs."""
    if result.times:
        return result.times
    start, end = getattr(shard, "layers", (0, 0))
    return [ShardTime(getattr(shard, "node", "") or "local", start, end, result.engine_ms, wait_ms)]


def shard_times_dicts(times: Sequence[ShardTime]) -> list[dict[str, Any]]:
    return [{"node": t.node, "layers": [t.start, t.end], "engine_ms": t.engine_ms, "wait_ms": t.wait_ms} for t in times]


def mean_shard_times(steps: Sequence[Sequence[ShardTime]]) -> list[ShardTime]:
    """Each shard's mean share over `steps`, in layer order. A shard replaced mid-generation (a lost node) counts
    over the steps it served."""
    served: dict[tuple[str, int, int], list[ShardTime]] = {}
    for t in (t for times in steps for t in times):
        served.setdefault((t.node, t.start, t.end), []).append(t)
    means = [
        ShardTime(*shard, fmean(t.engine_ms for t in ts), fmean(t.wait_ms for t in ts)) for shard, ts in served.items()
    ]
    return sorted(means, key=lambda t: t.start)


def step(
    shards: Sequence[Shard],
    sid: str,
    ids: list[int],
    sampling: SamplingParams,
    logprobs: int,
    context_ids: list[int] | None = None,
    allowed: bytes | None = None,
    generated: Sequence[int] = (),
    progress: Callable[[int, int], None] | None = None,
) -> StepResult:
    """Push token ids through every shard; the last returns the sampled token, with every shard's time in `times`.
    A prompt longer than one chunk (`prompt_chunk`) goes through them in chunks, pipelined (`_pipelined`), and
    `progress(done, total)` hears of each chunk that came out of the last shard.

    context_ids: the ids the repetition penalty covers when they are more than `ids` (a reused prefix).
    allowed: the ids the last shard may sample (a constraint's bitmask), or None for all.
    generated: the ids among `ids` that the answer generated (OpenAI's penalties count them)."""
    chunk = prompt_chunk(shards)
    if not chunk and len(shards) == 1 and progress is not None:  # an engine in this process: on this thread
        chunk = int(getattr(shards[0], "pipeline_chunk_size", 0) or 0)
    if chunk and len(ids) > chunk:
        if len(shards) == 1:  # nothing to overlap: cut only for `progress`, in at most PROGRESS_REPORTS chunks,
            chunk *= -(-len(ids) // (chunk * PROGRESS_REPORTS))  # since every chunk also runs the lm_head once
        return _pipelined(shards, sid, ids, chunk, sampling, logprobs, context_ids, allowed, generated, progress)
    x: Any = np.asarray(ids, dtype=np.int32)
    times: list[ShardTime] = []
    for i, shard in enumerate(shards):
        last = i == len(shards) - 1
        kwargs = _last_kwargs(sampling, logprobs, ids if context_ids is None else context_ids, allowed, generated)
        t0 = time.perf_counter()
        result = shard.forward(sid, x, **(kwargs if last else {}))
        times += shard_time(shard, result, 1e3 * (time.perf_counter() - t0))
        if last:
            result.times = times
            return result
        x = result.hidden
    raise ValueError("no shards")


def _last_kwargs(
    sampling: SamplingParams, logprobs: int, penalised: list[int], allowed: bytes | None, generated: Sequence[int]
) -> dict[str, Any]:
    """What the last shard's forward takes besides its input."""
    kwargs: dict[str, Any] = {"sampling": sampling, "token_ids": penalised, "logprobs": logprobs}
    if allowed is not None:
        kwargs["allowed"] = allowed
    if len(generated) and sampling.biased:
        kwargs["generated"] = list(generated)
    return kwargs


def prompt_chunk(shards: Sequence[Any]) -> int:
    """Prompt positions a pipelined prefill hands from shard to shard at once: the biggest `pipeline_chunk` among
    the shards (each engine says what suits it: ShardEngine.pipeline_chunk_size). 0: the prompt goes whole, when a shard
    does not say: an engine in the caller's process (tests, `run --local`), since engines sharing a process must
    not run at once (tinygrad runs one thing at a time in a process)."""
    # a ShardEngine itself has no `pipeline_chunk` (only its `pipeline_chunk_size`): engines in this process stay whole
    chunks = [int(getattr(shard, "pipeline_chunk", 0) or 0) for shard in shards]
    return max(chunks) if chunks and all(chunks) else 0


_END = object()  # the end of a stage's inputs


def _pipelined(
    shards: Sequence[Shard],
    sid: str,
    ids: list[int],
    chunk: int,
    sampling: SamplingParams,
    logprobs: int,
    context_ids: list[int] | None,
    allowed: bytes | None,
    generated: Sequence[int],
    progress: Callable[[int, int], None] | None,
) -> StepResult:
    """`step` for a long prompt: its chunks flow through the shards like an assembly line, each shard on its own
    thread working on chunk k+1 while the next shard works on chunk k, so on separate machines the prompt takes
    about the slowest shard's time instead of the sum of all of them (one shard: its chunks in turn, so that
    `progress` can follow a long prompt). Each engine's chunk is one it computes exactly as it would the whole
    prompt (ShardEngine.pipeline_chunk_size), so the caches and the sampled token are those of one call.

    The last shard samples after every chunk (a prompt step always does); only the last chunk's token counts,
    and since a sampled draw depends on the position alone, the earlier ones change nothing. The repetition
    penalty's marks accumulate, so each chunk marks its own ids and the last one the whole context."""
    pieces = [ids[i : i + chunk] for i in range(0, len(ids), chunk)]
    penalised = ids if context_ids is None else context_ids
    inboxes: list[queue.SimpleQueue[Any]] = [queue.SimpleQueue() for _ in shards]
    for piece in pieces:
        inboxes[0].put(np.asarray(piece, dtype=np.int32))
    inboxes[0].put(_END)
    engine_ms, wait_ms = [0.0] * len(shards), [0.0] * len(shards)
    errors: list[BaseException] = []
    out: list[StepResult] = []

    def run(i: int) -> None:
        shard, last = shards[i], i == len(shards) - 1
        try:
            for k in range(len(pieces)):
                x = inboxes[i].get()
                if x is _END or errors:
                    break  # a stage before this one failed (or another did): the step is lost
                final = k == len(pieces) - 1
                kwargs: dict[str, Any] = {}
                if last:
                    kwargs = (
                        _last_kwargs(sampling, logprobs, penalised, allowed, generated)
                        if final
                        else {"sampling": sampling, "token_ids": pieces[k], "logprobs": 0}
                    )
                t0 = time.perf_counter()
                result = shard.forward(sid, x, **kwargs)
                engine_ms[i] += result.engine_ms
                wait_ms[i] += 1e3 * (time.perf_counter() - t0)
                if not last:
                    inboxes[i + 1].put(result.hidden)
                    continue
                if progress is not None:
                    progress(min((k + 1) * chunk, len(ids)), len(ids))
                if final:
                    out.append(result)
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            errors.append(e)
        finally:
            if not last:
                inboxes[i + 1].put(_END)  # the next stage stops too, after what it was given

    if len(shards) == 1:
        run(0)  # nothing to overlap, and an engine in this process stays on its thread
    else:
        threads = [
            threading.Thread(target=run, args=(i,), name=f"prefill-{i}", daemon=True) for i in range(len(shards))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    result = out[0]
    result.times = [
        t for i, shard in enumerate(shards) for t in shard_time(shard, StepResult(engine_ms=engine_ms[i]), wait_ms[i])
    ]
    return result


def decode_steps(
    shards: Sequence[Shard],
    sid: str,
    token: int,
    steps: int,
    sampling: SamplingParams,
    logprobs: int,
    stop_ids: Sequence[int] = (),
) -> Generator[StepResult, None, None]:
    """Up to `steps` decode steps after `token`, each step's input the token sampled before it; ends early after a
    token in `stop_ids`. A lone shard that decodes on its own (a whole model: ShardEngine.decode, an engine process,
    a Chain) runs ahead of this loop, its results streamed; otherwise each step is a `step` through the shards.
    Close the iterator to stop early: the shards may then hold a few positions past the last result read."""
    lone = len(shards) == 1
    decode: Callable[..., Iterator[StepResult]] | None = getattr(shards[0], "decode", None) if lone else None
    if decode is None:
        yield from decode_stepwise(
            lambda token: step(shards, sid, [token], sampling, logprobs, None, None, [token]), token, steps, stop_ids
        )
        return
    results = decode(sid, token, steps, sampling=sampling, logprobs=logprobs, stop_ids=list(stop_ids))
    try:
        t0 = time.perf_counter()
        for result in results:
            t1 = time.perf_counter()
            if not result.times:
                result.times = shard_time(shards[0], result, 1e3 * (t1 - t0))
            t0 = t1
            yield result
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()


def generate(
    shards: Sequence[Shard],
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop: Sequence[str] = (),
    logprobs: int = 0,
    context_limit: int,
    conversation: Conversation | None = None,
    constraint: Constraint | ThinkingFirst | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[TokenChunk | GenerationResult]:
    """Yield a TokenChunk per generated token, then one GenerationResult.

    Without `conversation` the session lives for this call only; with one it stays open for the next turn.
    With `constraint`, every token is one its grammar allows (constrained decoding). `progress(done, total)`
    hears of a long prompt's chunks (`step`); a Chain reports its own.
    """
    sampling = sampling or SamplingParams()
    prompt = list(prompt_ids)
    if not prompt:
        raise PromptTooLongError("the prompt is empty")
    if len(prompt) >= context_limit:
        raise PromptTooLongError(f"the prompt has {len(prompt)} tokens; the context holds {context_limit}")
    conv = conversation or Conversation()
    sid = conv.session_id
    if not conv.open:
        for shard in shards:
            shard.new_session(sid, sampling)
        conv.open, conv.tokens = True, []
    reused = _reusable(conv.tokens, prompt)
    for shard in shards:
        shard.truncate(sid, reused)
    conv.tokens = prompt[:reused]
    detok, stops = StreamingDetokenizer(tokenizer), StopStringFilter(stop)
    tokens: list[int] = []
    text: list[str] = []
    finish = "length"
    hit = False
    t0 = time.perf_counter()
    t_first = t_last = t0
    decode_times: list[list[ShardTime]] = []  # the shards' shares of every step after the first
    decoding: Generator[StepResult, None, None] | None = None
    ok = False
    try:
        ids = prompt[reused:]
        position = reused
        context: list[int] | None = prompt if reused else None  # the penalty covers the reused prefix too
        while len(tokens) < max_tokens and position + len(ids) <= context_limit:
            # after the prompt, each step's input is the token generated before it; without a grammar to consult
            # between steps, the steps after the first run ahead of this loop where the shards can (decode_steps)
            if tokens and constraint is None:
                if decoding is None:
                    budget = min(max_tokens - len(tokens), context_limit - position)
                    decoding = decode_steps(shards, sid, ids[0], budget, sampling, logprobs, list(tokenizer.eos_ids))
                if (decoded := next(decoding, None)) is None:
                    break
                result = decoded
            else:
                allowed = constraint.allowed() if constraint is not None else None
                prompt_progress = None if tokens else progress
                result = step(
                    shards, sid, ids, sampling, logprobs, context, allowed, ids if tokens else (), prompt_progress
                )
            context = None
            conv.tokens += ids
            position += len(ids)
            t_last = time.perf_counter()
            if not tokens:
                t_first = t_last
            else:
                decode_times.append(result.times)
            assert result.token is not None and result.logprob is not None
            token = result.token
            tokens.append(token)
            if constraint is not None:
                constraint.accept(token)
            if token in tokenizer.eos_ids:
                finish = "stop"
                yield TokenChunk(token, "", result.logprob, result.top)
                break
            piece, hit = stops.push(detok.add(token))
            text.append(piece)
            yield TokenChunk(token, piece, result.logprob, result.top)
            if hit:
                finish = "stop"
                break
            ids = [token]
        ok = True
    finally:
        if decoding is not None:
            decoding.close()  # stops shards that run ahead before their session ends or serves another turn
        if conversation is None or not ok:
            conv.close(shards)
    tail = ""
    if not hit:  # after a stop string everything that follows it is discarded
        tail, _ = stops.push(detok.flush())
        tail += stops.flush()
    text.append(tail)
    decode_s = t_last - t_first
    return_rate = (len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0
    yield GenerationResult(
        tokens=tokens,
        text="".join(text),
        finish_reason=finish,
        prompt_tokens=len(prompt),
        ttft_ms=(t_first - t0) * 1000,
        decode_tok_s=return_rate,
        tail=tail,
        shards=mean_shard_times(decode_times),
    )
