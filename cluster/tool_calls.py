"""Tool calls in a model's answer: the format a model writes them in (its chat template tells), and a splitter
that separates them from the answer's text as tokens arrive, for the OpenAI API's `tool_calls`.

Formats, named as vLLM's parsers are:
- hermes (Qwen2.5, Qwen3, Hermes): one `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` block per call,
  possibly after some text.
- llama3_json (Llama 3.1 to 3.3): the whole answer is `{"name": ..., "parameters": {...}}`, optionally after
  `<|python_tag|>`; several calls are separated by `;`.
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v3 tokenizers) or `[TOOL_CALLS]name[ARGS]{...}`
  per call (v11 and later).

Calls a request forces (tool_choice "required" or a named function) are instead written as JSON that a constraint
holds the answer to (`forced`). `tool_use` decides, per request, which of these applies; the HTTP API and the
SDK's Cluster service both ask it. What cannot be read as calls stays text: nothing the model wrote is dropped.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.reasoning import ReasoningSplitter

_DECODER = json.JSONDecoder()
_ALPHANUMERIC = string.ascii_letters + string.digits
# (name, arguments) pairs and the text around them, or None when the calls do not parse
Read = tuple[list[tuple[str, Any]], str] | None


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {} if index is None else {"index": index}
        call.update(id=self.id, type="function", function={"name": self.name, "arguments": self.arguments})
        return call


def _same_id(call_id: str) -> str:
    return call_id


@dataclass(frozen=True)
class ToolCallFormat:
    name: str
    markers: tuple[str, ...]  # what opens the calls
    leading_only: bool  # a marker counts only at the very start of the answer (whitespace aside)
    read: Callable[[str], Read]  # the text from the first marker on -> calls and the text around them
    new_id: Callable[[], str]
    history_id: Callable[[str], str] = _same_id  # a client's call id as the chat template takes it

    def splitter(self) -> ToolCallSplitter:
        return ToolCallSplitter(self)


def _json_values(text: str, separators: str) -> list[Any] | None:
    """Consecutive JSON values separated by whitespace and `separators`; None unless all of `text` is such."""
    values: list[Any] = []
    at = 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] in separators):
            at += 1
        if at == len(text):
            return values
        try:
            value, at = _DECODER.raw_decode(text, at)
        except json.JSONDecodeError:
            return None
        values.append(value)


def _call(obj: Any, arguments_key: str = "arguments") -> tuple[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    return obj["name"], obj.get(arguments_key, obj.get("arguments", {}))


def _calls(objs: list[Any] | None, arguments_key: str = "arguments") -> list[tuple[str, Any]] | None:
    if not objs:
        return None
    calls = [_call(obj, arguments_key) for obj in objs]
    return None if any(c is None for c in calls) else [c for c in calls if c is not None]


_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


def _read_hermes(text: str) -> Read:
    # a last block without its closing tag still counts: the answer may end (EOS) right after the JSON
    calls = []
    for block in _HERMES_BLOCK.findall(text):
        values = _json_values(block, "")
        found = _calls(values) if values is not None and len(values) == 1 else None
        if found is None:
            return None
        calls += found
    return calls, _HERMES_BLOCK.sub("", text).strip()


def _read_llama3(text: str) -> Read:
    calls = _calls(_json_values(text.removeprefix("<|python_tag|>"), ";,"), arguments_key="parameters")
    return None if calls is None else (calls, "")


def _read_mistral(text: str) -> Read:
    calls: list[tuple[str, Any]] = []
    for part in text.split("[TOOL_CALLS]")[1:]:
        if part.lstrip().startswith("["):  # v3: a JSON list of {"name", "arguments"}
            values = _json_values(part, "")
            found = _calls(values[0]) if values and len(values) == 1 and isinstance(values[0], list) else None
        elif "[ARGS]" in part:  # v11+: name[ARGS]{...}, the name possibly followed by [CALL_ID]id
            name, args = part.split("[ARGS]", 1)
            values = _json_values(args, "")
            name = name.split("[CALL_ID]", 1)[0].strip()
            found = [(name, values[0])] if name and values is not None and len(values) == 1 else None
        else:
            found = None
        if found is None:
            return None
        calls += found
    return (calls, "") if calls else None


def _openai_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _mistral_id() -> str:
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


def _mistral_history_id(call_id: str) -> str:
    # Mistral's templates refuse ids that are not 9 letters or digits; other servers' ids are mapped, the same
    # way for the assistant's call and the tool's answer, so that the two still match
    if len(call_id) == 9 and call_id.isalnum():
        return call_id
    digest = hashlib.sha256(call_id.encode()).digest()
    return "".join(_ALPHANUMERIC[b % len(_ALPHANUMERIC)] for b in digest[:9])


HERMES = ToolCallFormat("hermes", ("<tool_call>",), False, _read_hermes, _openai_id)
LLAMA3_JSON = ToolCallFormat("llama3_json", ("<|python_tag|>", "{"), True, _read_llama3, _openai_id)
MISTRAL = ToolCallFormat("mistral", ("[TOOL_CALLS]",), False, _read_mistral, _mistral_id, _mistral_history_id)


def format_for(template: str) -> ToolCallFormat | None:
    """The format a chat template (the one used when tools are given) teaches its model, if it is a known one."""
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and '"parameters"' in template):
        return LLAMA3_JSON
    return None


def forced(
    tools: list[dict[str, Any]], name: str | None, parallel: bool = True
) -> tuple[dict[str, Any], ToolCallFormat]:
    """tool_choice "required" (name None) or a named function: the JSON schema the answer is held to
    (cluster/constraints.py), and how to read the calls from that answer. The model's own tool-call form plays no
    part: "required" answers a list of {"name", "parameters"} (one item unless `parallel`), a named function its
    arguments alone."""
    functions = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    if name is not None:
        if name not in functions:
            raise ToolError("tool_choice", f"no tool named {name!r} among the tools")

        def read_arguments(text: str) -> Read:
            values = _json_values(text, "")
            return ([(name, values[0])], "") if values and len(values) == 1 else None

        return functions[name], ToolCallFormat("forced", ("",), False, read_arguments, _openai_id)
    one_of = [
        {
            "type": "object",
            "properties": {"name": {"const": fn}, "parameters": parameters},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for fn, parameters in functions.items()
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
    if not parallel:
        schema["maxItems"] = 1

    def read_list(text: str) -> Read:
        values = _json_values(text, "")
        if not values or len(values) != 1 or not isinstance(values[0], list):
            return None
        calls = _calls(values[0], arguments_key="parameters")
        return None if calls is None else (calls, "")

    return schema, ToolCallFormat("required", ("",), False, read_list, _openai_id)


class ToolError(ValueError):
    """Tools a request offers that the model cannot be asked for; `param` names the request's field."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class ToolUse:
    """What a request's tools make of its answer."""

    offered: list[dict[str, Any]] | None  # the tools the chat template shows the model
    reader: ToolCallFormat | None  # how calls are read from the answer; None: the answer is text
    json_schema: dict[str, Any] | None  # what forced calls hold the answer to (constrained decoding)
    history_id: Callable[[str], str]  # a call id of an earlier turn as the chat template takes it


def tool_use(
    template: str | None,
    tools: list[dict[str, Any]] | None,
    choice: str | None = None,
    name: str | None = None,
    parallel: bool = True,
) -> ToolUse:
    """template: the model's chat template for tools (Tokenizer.tool_template(); None when it has no place for
    them); choice: "auto" (None too), "none" or "required"; name: the function a call is forced to, if any."""
    native = format_for(template) if template else None
    history = native.history_id if native else _same_id
    if not tools and (name is not None or choice == "required"):
        raise ToolError("tool_choice", "a call is asked for, but there are no tools")
    if not tools or choice == "none":  # "none": the model is not told of the tools, as vLLM does it
        return ToolUse(None, None, None, history)
    if template is None:
        raise ToolError("tools", "the model's chat template has no place for tools")
    if name is not None or choice == "required":
        schema, reader = forced(tools, name, parallel)
        return ToolUse(tools, reader, schema, history)
    if choice not in (None, "auto"):
        raise ToolError("tool_choice", f"{choice!r} is not 'auto', 'none' or 'required'")
    if native is None:
        raise ToolError(
            "tools",
            "the model's chat template teaches a tool-call format clusterctl cannot read (it reads <tool_call> "
            "blocks, Llama 3's JSON calls and Mistral's [TOOL_CALLS])",
        )
    return ToolUse(tools, native, None, history)


def template_calls(calls: list[tuple[str, str, str]], call_id: Callable[[str], str]) -> list[dict[str, Any]]:
    """An earlier turn's calls, (id, name, arguments as JSON text), as chat templates read them: the arguments as
    an object (templates write them with `tojson`), the id as `call_id` maps it for the model."""
    out = []
    for i, fn, arguments in calls:
        try:
            parsed = json.loads(arguments or "{}")
        except json.JSONDecodeError as e:
            raise ToolError("tool_calls", f"the arguments of call {i!r} are not JSON ({e})") from None
        out.append({"id": call_id(i), "type": "function", "function": {"name": fn, "arguments": parsed}})
    return out


class AnswerSplitter:
    """A chat answer's text as it arrives, parted into a thinking model's reasoning, the content, and the calls read
    from that content (without `reasoning` or `calls`, that part is left alone)."""

    def __init__(self, reasoning: ReasoningSplitter | None, calls: ToolCallFormat | None):
        self.reasoning, self.calls = reasoning, calls.splitter() if calls else None

    def push(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that can be shown now."""
        reasoning, content = self.reasoning.push(text) if self.reasoning else ("", text)
        return reasoning, self.calls.push(content) if self.calls else content

    def close(self, text: str) -> tuple[str, str, list[ToolCall]]:
        """The answer's last text (or all of it): the reasoning and content left to show, and the calls."""
        reasoning, content = self.reasoning.close(text) if self.reasoning else ("", text)
        content, calls = self.calls.close(content) if self.calls else (content, [])
        return reasoning, content, calls


def finish_reason(finish: str | None, calls: Sequence[ToolCall]) -> str | None:
    """OpenAI's finish_reason: "tool_calls" for an answer that ended by itself after calling tools."""
    return "tool_calls" if calls and finish == "stop" else finish


def _arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):  # some models write the arguments as a JSON string already
        return arguments
    return json.dumps({} if arguments is None else arguments, ensure_ascii=False)


class ToolCallSplitter:
    """Feed the answer's text as it arrives; get the text that can be shown now. Text that may open a call is
    held back; from the first marker on, everything is held until `finish`, which reads the calls."""

    def __init__(self, fmt: ToolCallFormat) -> None:
        self.format = fmt
        self._pending = ""  # text not shown yet that could still start a marker
        self._calls: str | None = None  # the text from the first marker on
        self._plain = False  # a leading-only format that has seen its answer start with text

    def push(self, text: str) -> str:
        if self._calls is not None:
            self._calls += text
            return ""
        if self._plain:
            return text
        self._pending += text
        markers = self.format.markers
        if self.format.leading_only:
            start = self._pending.lstrip()
            if start.startswith(markers):
                self._calls, self._pending = self._pending, ""
                return ""
            if not start or any(m.startswith(start) for m in markers):
                return ""
            self._plain = True
            shown, self._pending = self._pending, ""
            return shown
        found = [i for i in (self._pending.find(m) for m in markers) if i >= 0]
        if found:
            at = min(found)
            shown, self._calls, self._pending = self._pending[:at], self._pending[at:], ""
            return shown
        # keep the longest end of the text that is the beginning of a marker
        keep = max((n for m in markers for n in range(1, len(m)) if self._pending.endswith(m[:n])), default=0)
        shown = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(shown) :]
        return shown

    def close(self, text: str = "") -> tuple[str, list[ToolCall]]:
        """The answer's last text, then `finish`: all that is left to show, and the calls."""
        shown = self.push(text)
        rest, calls = self.finish()
        return shown + rest, calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The text still to show and the calls. Calls that do not parse are returned as text."""
        if self._calls is None:
            shown, self._pending = self._pending, ""
            return shown, []
        region, self._calls = self._calls, None
        read = self.format.read(region)
        if read is None:
            return region, []
        pairs, rest = read
        return rest, [ToolCall(self.format.new_id(), name, _arguments_text(args)) for name, args in pairs]
