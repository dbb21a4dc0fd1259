"""A thinking model's reasoning, separated from its answer, for the OpenAI API's `reasoning_content`.

Models whose chat template knows `<think>` blocks (Qwen3, QwQ, DeepSeek-R1's distillations) think inside
`<think> ... </think>` before they answer. Either the answer opens the block itself (Qwen3), or the generation
prompt already opened it and the answer starts inside the thinking and only closes it (DeepSeek-R1, QwQ,
Qwen3's thinking-only models); `opened_by` tells which from the prompt. An answer that ends before `</think>`
(max_tokens, a stop string) was all reasoning. Nothing is dropped but the tags and the whitespace around them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.tokenizer import Tokenizer

OPEN, CLOSE = "<think>", "</think>"


def thinking_tags(tokenizer: Tokenizer, tools: Sequence[Mapping[str, Any]] | None = None) -> tuple[int, int] | None:
    """The ids of <think> and </think> when the chat template a request with `tools` is rendered with is a thinking
    model's (it knows the blocks, and each tag is one token, as in Qwen3, QwQ and DeepSeek-R1); else None."""
    template = tokenizer.template_for(tools)
    ids = tokenizer.token_to_id(OPEN), tokenizer.token_to_id(CLOSE)
    if template is None or CLOSE not in template or ids[0] is None or ids[1] is None:
        return None
    return ids[0], ids[1]


def opened_by(prompt: str) -> bool:
    """Whether a rendered prompt ends inside a thinking block that the model's answer is to close."""
    return prompt.rstrip().endswith(OPEN)


def _partial(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (it may be completed by what follows)."""
    return max((n for n in range(1, len(marker)) if text.endswith(marker[:n])), default=0)


class ReasoningSplitter:
    """Feed the answer's text as it arrives; get (reasoning, content) that can be shown now. Text that may still
    be a tag, and whitespace that may turn out to border one, is held back until what follows decides."""

    def __init__(self, inside: bool) -> None:
        """inside: the prompt opened the block (`opened_by`), so the answer starts in its reasoning."""
        self._state = "reasoning" if inside else "start"
        self._pending = ""
        self._began = False  # some reasoning or content was shown (leading whitespace is dropped before that)

    def push(self, text: str) -> tuple[str, str]:
        self._pending += text
        reasoning = content = ""
        if self._state == "start":
            head = self._pending.lstrip()
            if head.startswith(OPEN):
                self._state, self._pending = "reasoning", head[len(OPEN) :]
            elif OPEN.startswith(head):  # still empty or a beginning of the tag
                return "", ""
            else:
                self._state = "content"
        if self._state == "reasoning":
            at = self._pending.find(CLOSE)
            if at >= 0:
                reasoning = self._shown(self._pending[:at].rstrip())
                self._state, self._pending, self._began = "after", self._pending[at + len(CLOSE) :], False
            else:
                body = self._pending[: len(self._pending) - _partial(self._pending, CLOSE)]
                kept = body.rstrip()  # trailing whitespace may end the reasoning
                self._pending = self._pending[len(kept) :]
                return self._shown(kept), ""
        if self._state == "after":
            self._pending = self._pending.lstrip()  # between the block and the answer
            if not self._pending:
                return reasoning, ""
            self._state = "content"
        if self._state == "content":
            content, self._pending = self._shown(self._pending), ""
        return reasoning, content

    def _shown(self, text: str) -> str:
        if not self._began:
            text = text.lstrip()
            self._began = bool(text)
        return text

    def finish(self) -> tuple[str, str]:
        """What is left to show: an unclosed block is reasoning; a beginning of a tag that never came, content."""
        rest, self._pending = self._pending, ""
        if self._state == "reasoning":
            return self._shown(rest.rstrip()), ""
        if self._state == "start":
            return "", self._shown(rest)
        return "", ""  # "after": whitespace between the block and an answer that never came

    def close(self, text: str = "") -> tuple[str, str]:
        """The answer's last text, then `finish`."""
        reasoning, content = self.push(text)
        more_reasoning, more_content = self.finish()
        return reasoning + more_reasoning, content + more_content


def split_reasoning(text: str, inside: bool) -> tuple[str, str]:
    """A whole answer's (reasoning, content)."""
    return ReasoningSplitter(inside).close(text)
