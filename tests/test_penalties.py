"""OpenAI's presence and frequency penalties and logit_bias, on the llama32 checkpoint in-process.

Reference: the engine's own log-softmax over the whole vocabulary at each step (no penalty), with the penalties
added here in numpy from the tokens generated so far (logit - presence * [count > 0] - frequency * count + bias,
as OpenAI defines them): greedy decoding with them must take the argmax of that sum at every step. A session
replayed onto new shards after a lost one must go on counting: the same answer as without the loss."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES, reference

from cluster.chain import Chain, ShardUnavailableError
from cluster.generation import GenerationResult, generate
from cluster.sampling import SamplingParams
from cluster.tokenizer import Tokenizer

TOKENS = 16


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(FIXTURES / "llama32")


def tokens(shards, tok, sampling: SamplingParams) -> list[int]:
    prompt = reference("llama32")["prompt_ids"]
    *_, result = generate(shards, tok, prompt, max_tokens=TOKENS, sampling=sampling, context_limit=128)
    assert isinstance(result, GenerationResult)
    return result.tokens


def test_greedy_with_penalties_and_bias_takes_the_argmax_of_their_sum(engines, tok):
    engine = engines.get("llama32")
    vocab = engine.cfg.vocab_size
    plain = tokens([engine], tok, SamplingParams())
    banned, favoured = plain[1], plain[2] + 1
    params = SamplingParams(presence_penalty=1.5, frequency_penalty=1.0, logit_bias=((banned, -100.0), (favoured, 2.5)))
    penalised = tokens([engine], tok, params)
    assert penalised != plain and banned not in penalised

    bias = np.zeros(vocab)
    bias[banned], bias[favoured] = -100.0, 2.5
    counts = np.zeros(vocab)
    sid, ids = engine.new_session(), reference("llama32")["prompt_ids"]
    try:
        for token in penalised:
            logprobs = np.full(vocab, -np.inf)
            for i, lp in engine.forward(sid, np.asarray(ids, np.int32), logprobs=vocab).top:
                logprobs[i] = lp
            expected = logprobs - 1.5 * (counts > 0) - 1.0 * counts + bias
            assert token == int(np.argmax(expected))
            counts[token] += 1
            ids = [token]
    finally:
        engine.end_session(sid)


class _LostOnce:
    """A shard that is lost at its `at`-th step, as a node that dies mid-answer."""

    def __init__(self, shard, at: int):
        self.shard, self.at, self.steps = shard, at, 0

    def __getattr__(self, name):
        return getattr(self.shard, name)

    def forward(self, *args, **kwargs):
        self.steps += 1
        if self.steps == self.at:
            raise ShardUnavailableError("lost", "node-b")
        return self.shard.forward(*args, **kwargs)


def test_a_replayed_session_keeps_counting(engines, tok):
    first, last = engines.get("llama32", 0, 2), engines.get("llama32", 2, None)
    params = SamplingParams(temperature=0.9, seed=5, presence_penalty=0.8, frequency_penalty=1.5)
    uninterrupted = tokens([first, last], tok, params)
    # the whole model decodes queued, counting on the device: the same answer as two shards stepping one token at a time
    assert tokens([engines.get("llama32")], tok, params) == uninterrupted
    chain = Chain([first, _LostOnce(last, at=9)], lambda error: [first, last])
    assert tokens([chain], tok, params) == uninterrupted
    assert len(chain.recoveries) == 1
    # without the counts the replay would have to rebuild, the penalties change the answer
    assert tokens([first, last], tok, SamplingParams(temperature=0.9, seed=5)) != uninterrupted


def test_bad_values_are_refused():
    for bad in ({"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"logit_bias": ((1, 101.0),)}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
