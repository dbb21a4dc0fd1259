"""Constrained decoding: which ids a model may write next so that its answer follows a JSON schema (OpenAI's
`response_format`, and tool calls a client forces with `tool_choice`).

llguidance walks the grammar on the coordinating node, one token at a time (~50 us a step for a 128k
vocabulary); its mask, one bit per id, travels with each step to the last shard, whose sampler never picks a
masked id (cluster/sampling.py). The mask depends only on the tokens sampled so far, so a session replayed after
a lost node goes on with the same constraint.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

import llguidance

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
