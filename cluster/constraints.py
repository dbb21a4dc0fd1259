"""Constrained decoding: which ids a model may write next so that its answer follows a JSON schema (OpenAI's
`response_format`, and tool calls a client forces with `tool_choice`).

llguidance walks the grammar on the coordinating node, one token at a time (~50 us a step for a 128k
vocabulary); its mask, one bit per id, travels with each step to the last shard, whose sampler never picks a
masked id (cluster/engine/sampler.py). The mask depends only on the tokens sampled so far, so a session replayed after
a lost node goes on with the same constraint.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

from cluster.tokenizer import Tokenizer

# JSON written as json.dumps writes it, with no room for other whitespace: a model that may put whitespace
# anywhere can fill its whole answer with it (small models do). A schema's own "x-guidance" options win.
_JSON_STYLE: JsonCompileOptions = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class ConstraintError(ValueError):
    """A schema that cannot be compiled into a grammar, or an answer that left it."""


@functools.lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    # llguidance reads the vocabulary from tokenizer.json; ids past it (a padded vocabulary) are never allowed
    return llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=sorted(tokenizer.eos_ids))


class Constraint:
    """One answer's walk through a grammar: `allowed()` before each step, `accept(token)` after it."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, schema: dict[str, Any]) -> None:
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_STYLE)
        except ValueError as e:
            raise ConstraintError(f"the JSON schema cannot be used: {e}") from None
        self._matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
        if self._matcher.is_error():
            raise ConstraintError(f"the JSON schema cannot be used: {self._matcher.get_error()}")
        self._bytes = -(-vocab_size // 8)

    def allowed(self) -> bytes:
        """The ids the next token may be, one bit each (id i is bit i % 8 of byte i // 8)."""
        mask = self._matcher.compute_bitmask()[: self._bytes]  # llguidance rounds up to whole 32-bit words
        if self._matcher.is_error() or not any(mask):
            raise ConstraintError(f"the grammar allows no next token: {self._matcher.get_error() or 'dead end'}")
        return mask

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise ConstraintError(f"token {token} left the grammar: {self._matcher.get_error()}")


class ThinkingFirst:
    """A thinking model's answer held to a grammar: its <think> block is free, the answer after it follows the
    grammar (as vLLM holds only a reasoning model's answer to one). The block may open the answer (its first token
    may be <think>, beside what the grammar allows), or the prompt opened it already. While it thinks, the model
    may write anything but EOS, so that an answer follows."""

    def __init__(
        self, constraint: Constraint, tags: tuple[int, int], eos_ids: frozenset[int], vocab_size: int, opened: bool
    ) -> None:
        """tags: the ids of <think> and </think>; opened: the prompt opened the block (Prompt.opened)."""
        self._constraint, (self._open, self._close) = constraint, tags
        self._state = "thinking" if opened else "start"
        free = np.ones(vocab_size, bool)
        free[[i for i in eos_ids if i < vocab_size]] = False
        self._free = np.packbits(free, bitorder="little").tobytes()  # the bits past the vocabulary are 0

    def allowed(self) -> bytes:
        if self._state == "thinking":
            return self._free
        mask = self._constraint.allowed()
        if self._state == "start":
            opening = bytearray(mask)
            opening[self._open // 8] |= 1 << (self._open % 8)
            return bytes(opening)
        return mask

    def accept(self, token: int) -> None:
        if self._state == "start" and token == self._open:
            self._state = "thinking"
        elif self._state == "thinking":
            self._state = "answer" if token == self._close else "thinking"
        else:
            self._state = "answer"
            self._constraint.accept(token)


def answer_constraint(
    tokenizer: Tokenizer, vocab_size: int, schema: dict[str, Any], tags: tuple[int, int] | None, opened: bool
) -> Constraint | ThinkingFirst:
    """What holds an answer to `schema`; a thinking model's (`tags`: reasoning.thinking_tags, `opened`: its prompt
    opened the block) thinks freely first."""
    constraint = Constraint(tokenizer, vocab_size, schema)
    return ThinkingFirst(constraint, tags, tokenizer.eos_ids, vocab_size, opened) if tags else constraint
