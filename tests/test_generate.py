"""The generation loop: stops, limits and streamed text, on the llama32 checkpoint (reference: its
transformers greedy continuation in reference.json)."""

from __future__ import annotations

import pytest
from conftest import FIXTURES, reference

from cluster.generate import GenerationResult, PromptTooLongError, TokenChunk, generate
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
