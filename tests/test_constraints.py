"""Constrained decoding (cluster/constraints.py) on the llama32 checkpoint, in-process.

Reference: the unconstrained engine's log-softmax over the whole vocabulary at every step of the same token
sequence. The constrained greedy answer must take, at each step, the most likely id among those the grammar
allows, as a second, independent walk of the grammar computes them; a split over two shards gives the same
tokens as one (the mask goes to the last shard only)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import FIXTURES, reference

from cluster.constraints import Constraint, ConstraintError
from cluster.engine.shard import EngineError
from cluster.generation import GenerationResult, generate
from cluster.sampling import SamplingParams
from cluster.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "river": {"enum": ["Rhine", "Danube", "Loire"]},
        "navigable": {"type": "boolean"},
        "bridges": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["river", "navigable", "bridges"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(FIXTURES / "llama32")


def answer(shards, tok, prompt, constraint, sampling=None) -> GenerationResult:
    limit = shards[0].max_context
    *_, result = generate(
        shards, tok, prompt, max_tokens=90, context_limit=limit, constraint=constraint, sampling=sampling
    )
    assert isinstance(result, GenerationResult)
    return result


def follows_schema(text: str) -> bool:
    value = json.loads(text)
    return (
        set(value) == {"river", "navigable", "bridges"}
        and value["river"] in ("Rhine", "Danube", "Loire")
        and isinstance(value["navigable"], bool)
        and isinstance(value["bridges"], int)
        and 0 <= value["bridges"] <= 99
    )


def bits(mask: bytes, vocab: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(mask, np.uint8), bitorder="little")[:vocab].astype(bool)


def test_greedy_takes_the_most_likely_allowed_id_at_every_step(engines, tok):
    engine = engines.get("llama32")
    vocab = engine.cfg.vocab_size
    prompt = reference("llama32")["prompt_ids"]
    result = answer([engine], tok, prompt, Constraint(tok, vocab, SCHEMA))
    assert result.finish_reason == "stop" and follows_schema(result.text), result.text
    unconstrained = answer([engine], tok, prompt, None)
    assert not unconstrained.text.startswith("{")  # the constraint changed the answer

    walk, sid, ids = Constraint(tok, vocab, SCHEMA), engine.new_session(), list(prompt)
    try:
        for token in result.tokens:
            full = engine.forward(sid, np.asarray(ids, np.int32), logprobs=vocab).top  # every id's logprob
            allowed = bits(walk.allowed(), vocab)
            best = max((lp, -i) for i, lp in full if allowed[i])
            assert token == -best[1]
            walk.accept(token)
            ids = [token]
    finally:
        engine.end_session(sid)


def test_a_split_gives_the_same_answer_and_sampling_stays_inside_the_grammar(engines, tok):
    vocab = engines.get("llama32").cfg.vocab_size
    prompt = reference("llama32")["prompt_ids"]
    whole = answer([engines.get("llama32")], tok, prompt, Constraint(tok, vocab, SCHEMA))
    split = [engines.get("llama32", 0, 2), engines.get("llama32", 2, None)]
    assert answer(split, tok, prompt, Constraint(tok, vocab, SCHEMA)).tokens == whole.tokens
    for seed in range(3):
        sampled = answer(split, tok, prompt, Constraint(tok, vocab, SCHEMA), SamplingParams(temperature=1.5, seed=seed))
        assert follows_schema(sampled.text), sampled.text


def test_bad_schemas_and_masks_are_refused(engines, tok):
    engine = engines.get("llama32")
    vocab = engine.cfg.vocab_size
    with pytest.raises(ConstraintError, match="JSON schema"):
        Constraint(tok, vocab, {"type": "no-such-type"})
    walk = Constraint(tok, vocab, SCHEMA)
    (brace,) = np.nonzero(bits(walk.allowed(), vocab))[0]  # the answer can only open with "{"
    assert tok.decode([int(brace)]) == "{"
    with pytest.raises(ConstraintError, match="left the grammar"):
        walk.accept(tok.encode("x", add_special_tokens=False)[0])
    sid = engine.new_session()
    try:
        for mask, message in ((b"\xff", "bytes"), (bytes(-(-vocab // 8)), "no id")):
            with pytest.raises(EngineError, match=message):
                engine.forward(sid, np.asarray([1, 2], np.int32), allowed=mask)
    finally:
        engine.end_session(sid)


def test_a_thinking_model_thinks_freely_then_its_answer_follows_the_schema(tmp_path):
    """ThinkingFirst: the first token may open <think> beside what the grammar allows; inside the block anything but
    EOS may follow (so that an answer does); after </think> the grammar's own masks come back. Reference: a second,
    plain walk of the grammar over the answer's tokens alone."""
    from cluster.constraints import ThinkingFirst

    src = Tokenizer.from_dir(FIXTURES / "qwen2")
    backend = src.backend
    backend.add_tokens(["<think>", "</think>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    shutil.copy(FIXTURES / "qwen2" / "tokenizer_config.json", tmp_path)  # its EOS
    tok = Tokenizer.from_dir(tmp_path)
    vocab = 512
    tags = (tok.token_to_id("<think>"), tok.token_to_id("</think>"))
    plain = Constraint(tok, vocab, SCHEMA)
    thinking = ThinkingFirst(Constraint(tok, vocab, SCHEMA), tags, tok.eos_ids, vocab, opened=False)

    first = bits(thinking.allowed(), vocab)
    assert first[tags[0]] and (first ^ bits(plain.allowed(), vocab)).sum() == 1  # the grammar's ids and <think>
    thinking.accept(tags[0])
    for token in tok.encode("The user wants JSON.", add_special_tokens=False):
        free = bits(thinking.allowed(), vocab)
        assert free.sum() == vocab - len(tok.eos_ids) and not any(free[i] for i in tok.eos_ids)
        thinking.accept(token)
    thinking.accept(tags[1])
    for token in tok.encode(json.dumps({"river": "Rhine", "navigable": True, "bridges": 7}), add_special_tokens=False):
        assert thinking.allowed() == plain.allowed()  # the answer alone walks the grammar
        thinking.accept(token)
        plain.accept(token)
    with pytest.raises(ConstraintError):  # and is held to it
        thinking.accept(tags[0])

    opened = ThinkingFirst(Constraint(tok, vocab, SCHEMA), tags, tok.eos_ids, vocab, opened=True)
    assert bits(opened.allowed(), vocab).sum() == vocab - len(tok.eos_ids)  # the prompt opened it: free at once
