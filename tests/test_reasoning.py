"""Separating a thinking model's reasoning from its answer (cluster/reasoning.py).

Reference: each case's expected (reasoning, content), written out by hand from the rule the module states (the
text inside `<think> ... </think>`, stripped, is reasoning; the text after it, without leading whitespace, is the
answer); and the whole text split at once, for the same text fed in pieces."""

from __future__ import annotations

import pytest
import tokenizers
from conftest import FIXTURES
from scripted_model import HERMES_TEMPLATE

from cluster.reasoning import ReasoningSplitter, opened_by, split_reasoning, thinking_tags
from cluster.tokenizer import Tokenizer

CASES = [
    # (answer, the prompt opened the block, expected (reasoning, content))
    ("<think>\nThe user asks 2+2.\n</think>\n\nIt is 4.", False, ("The user asks 2+2.", "It is 4.")),
    ("  <think>a < b </think> Yes.", False, ("a < b", "Yes.")),
    ("The user asks 2+2.\n</think>\n\nIt is 4.", True, ("The user asks 2+2.", "It is 4.")),
    ("It is 4.", False, ("", "It is 4.")),
    ("\n\nIt is 4.", False, ("", "It is 4.")),
    ("<think>\n\n</think>\n\nIt is 4.", False, ("", "It is 4.")),
    # cut off while thinking (max_tokens): all reasoning, also a tag's beginning at the very end
    ("<think>\nFirst, the sum", False, ("First, the sum", "")),
    ("still thinking </thi", True, ("still thinking </thi", "")),
    # only a block that opens the answer counts; a later one, or a near-tag, is the answer's text
    ("Answer: <think>no</think>", False, ("", "Answer: <think>no</think>")),
    ("<thinking> is a tag", False, ("", "<thinking> is a tag")),
    ("<thin", False, ("", "<thin")),
    ("<think>x</think>", False, ("x", "")),
    ("x</think>y</think>z", True, ("x", "y</think>z")),
]


@pytest.mark.parametrize(("text", "inside", "expected"), CASES)
def test_whole_answers(text, inside, expected):
    assert split_reasoning(text, inside) == expected


@pytest.mark.parametrize("size", [1, 2, 3, 5])
@pytest.mark.parametrize(("text", "inside", "expected"), CASES)
def test_pieces_give_what_the_whole_answer_gives(text, inside, expected, size):
    splitter = ReasoningSplitter(inside)
    reasoning = content = ""
    for at in range(0, len(text), size):
        r, c = splitter.push(text[at : at + size])
        reasoning, content = reasoning + r, content + c
        # nothing shown can be taken back: what was shown is a beginning of the final parts
        assert expected[0].startswith(reasoning) and expected[1].startswith(content)
    r, c = splitter.finish()
    assert (reasoning + r, content + c) == expected


def test_reasoning_streams_before_the_block_closes():
    splitter = ReasoningSplitter(inside=False)
    assert splitter.push("<think>\nLet me") == ("Let me", "")
    assert splitter.push(" think.\n") == (" think.", "")  # the newline waits: it may end the reasoning
    assert splitter.push("More.") == ("\nMore.", "")
    assert splitter.push("</think>\n\nIt") == ("", "It")
    assert splitter.push(" is 4.") == ("", " is 4.")
    assert splitter.finish() == ("", "")


def test_which_prompts_open_the_block():
    assert opened_by("<|im_start|>assistant\n<think>\n") and not opened_by("<|im_start|>assistant\n")
    assert not opened_by("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def _tokenizer(template: str, tags: list[str]) -> Tokenizer:
    tok = tokenizers.Tokenizer.from_file(str(FIXTURES / "qwen2" / "tokenizer.json"))
    tok.add_tokens(tags)
    return Tokenizer(tok, chat_templates={"default": template})


def test_a_thinking_model_is_told_by_its_template_and_its_tags():
    """A thinking model: the template knows </think> (the Qwen3-style one of tests/scripted_model.py), and each tag
    is one token. The Llama 3.2 fixture's template does not think; tags that are several tokens are not used."""
    tags = _tokenizer(HERMES_TEMPLATE, ["<think>", "</think>"])
    assert thinking_tags(tags) == (tags.token_to_id("<think>"), tags.token_to_id("</think>"))
    assert thinking_tags(_tokenizer(HERMES_TEMPLATE, [])) is None
    assert thinking_tags(_tokenizer("{{ messages }}", ["<think>", "</think>"])) is None
    assert thinking_tags(Tokenizer.from_dir(FIXTURES / "llama32")) is None
