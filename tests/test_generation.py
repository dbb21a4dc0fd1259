"""The generation loop: stops, limits and streamed text, on the llama32 checkpoint (reference: its
transformers greedy continuation in reference.json)."""

from __future__ import annotations

import pytest
from conftest import FIXTURES, reference

from cluster.generation import Conversation, GenerationResult, PromptTooLongError, TokenChunk, generate
from cluster.sampling import SamplingParams
from cluster.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(FIXTURES / "llama32")


def run(engine, tok, prompt, **kw):
    kw.setdefault("context_limit", engine.max_context)
    items = list(generate([engine], tok, prompt, **kw))
    chunks, result = items[:-1], items[-1]
    assert all(isinstance(c, TokenChunk) for c in chunks) and isinstance(result, GenerationResult)
    return chunks, result


def test_max_tokens_and_streamed_text(engines, tok):
    ref = reference("llama32")
    chunks, result = run(engines.get("llama32"), tok, ref["prompt_ids"], max_tokens=12)
    assert result.tokens == ref["greedy_ids"] == [c.id for c in chunks]
    assert result.finish_reason == "length"
    # nothing dropped, nothing broken: the streamed pieces add up to the full decode
    assert "".join(c.text for c in chunks) + result.tail == result.text == tok.decode(result.tokens)
    assert result.usage() == {"prompt_tokens": 17, "completion_tokens": 12, "total_tokens": 29}
    assert result.ttft_ms > 0 and result.decode_tok_s > 0


def test_eos_stops_without_emitting_its_text(engines, tok):
    ref = reference("llama32")
    eos = ref["greedy_ids"][3]
    custom = Tokenizer(tok.backend, bos_id=tok.bos_id, eos_ids=[eos])
    chunks, result = run(engines.get("llama32"), custom, ref["prompt_ids"], max_tokens=12)
    assert result.tokens == ref["greedy_ids"][:4]
    assert result.finish_reason == "stop"
    assert chunks[-1].text == ""
    assert result.text == tok.decode(ref["greedy_ids"][:3])


def test_stop_string_cuts_the_text(engines, tok):
    ref = reference("llama32")
    full = tok.decode(ref["greedy_ids"])
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    chunks, result = run(engines.get("llama32"), tok, ref["prompt_ids"], max_tokens=12, stop=[stop])
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index(stop)]
    assert len(result.tokens) < 12


def test_context_limit_finishes_with_length(engines, tok):
    ref = reference("llama32")
    prompt = ref["prompt_ids"]
    chunks, result = run(engines.get("llama32"), tok, prompt, max_tokens=100, context_limit=len(prompt) + 3)
    # positions 0..limit-1 are filled; the token sampled at the last position is still returned
    assert result.tokens == ref["greedy_ids"][:4]
    assert result.finish_reason == "length"


def test_prompt_errors(engines, tok):
    with pytest.raises(PromptTooLongError, match="context holds 10"):
        run(engines.get("llama32"), tok, list(range(10)), context_limit=10)
    with pytest.raises(PromptTooLongError, match="empty"):
        run(engines.get("llama32"), tok, [])
    assert not engines.get("llama32").sessions  # nothing leaked


class Recorder:
    """A real engine, with the number of positions each forward call ran recorded."""

    def __init__(self, engine):
        self.engine, self.ran = engine, []

    def forward(self, sid, inputs, **kw):
        self.ran.append(len(inputs))
        return self.engine.forward(sid, inputs, **kw)

    def __getattr__(self, name):
        return getattr(self.engine, name)


@pytest.mark.parametrize("sampling", [None, SamplingParams(temperature=0.0, repetition_penalty=1.5)])
def test_conversation_reuses_the_cached_prefix(engines, tok, sampling):
    """Reference: the same prompts generated from scratch in fresh sessions."""
    eng = engines.get("llama32")
    prompt = reference("llama32")["prompt_ids"]
    fresh = lambda p: run(eng, tok, p, max_tokens=5, sampling=sampling)[1].tokens  # noqa: E731
    shard, conv = Recorder(eng), Conversation()
    first = run(shard, tok, prompt, max_tokens=5, sampling=sampling, conversation=conv)[1].tokens
    assert first == fresh(prompt)
    assert conv.open and conv.tokens == prompt + first[:-1]  # the last sampled id was never run

    follow_up = prompt + first + [7, 8, 9]  # the next turn extends the conversation
    shard.ran.clear()
    second = run(shard, tok, follow_up, max_tokens=5, sampling=sampling, conversation=conv)[1].tokens
    assert second == fresh(follow_up)
    assert shard.ran[0] == 4  # only first[-1] and the three new ids were prefilled

    diverged = prompt[:6] + [11, 12]  # a prompt that leaves the conversation: the cache is cut back to 6
    shard.ran.clear()
    third = run(shard, tok, diverged, max_tokens=5, sampling=sampling, conversation=conv)[1].tokens
    assert third == fresh(diverged)
    assert shard.ran[0] == 2
    conv.close([eng])
    assert conv.session_id not in eng.sessions


def test_the_result_times_every_shard_of_a_split(engines, tok):
    """Two in-process shards (the single-node engine's tokens are the reference): the result says what each shard's
    engine took per decode step and how long the loop waited for it, which includes the engine."""
    ref = reference("llama32")
    shards = [engines.get("llama32", 0, 2), engines.get("llama32", 2)]
    items = list(generate(shards, tok, ref["prompt_ids"], max_tokens=5, context_limit=128))
    result = items[-1]
    assert result.tokens == ref["greedy_ids"][:5]
    assert [(t.node, t.start, t.end) for t in result.shards] == [("local", 0, 2), ("local", 2, 4)]
    assert all(0 < t.engine_ms <= t.wait_ms for t in result.shards)
    timing = result.timing()
    assert timing["shards"][1] == {
        "node": "local",
        "layers": [2, 4],
        "engine_ms": result.shards[1].engine_ms,
        "wait_ms": result.shards[1].wait_ms,
    }
    # the steps' own split: the last token's step carried both shares
    steps = 1 / result.decode_tok_s * 1e3  # mean ms of a decode step
    assert sum(t.wait_ms for t in result.shards) <= steps * 1.05
