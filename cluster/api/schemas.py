"""Request bodies of the OpenAI-compatible API (the subset clusterctl serves), validated by pydantic.

OpenAI fields that clusterctl cannot honour (several answers, audio and images, echo) are refused with a 400 that
names them whenever they ask for something, never ignored; at their neutral values (n=1, ...), which many clients
send every time, they are accepted. `top_k`, `min_p` and `repetition_penalty` are accepted beside OpenAI's fields,
as vLLM and llama.cpp's server accept them.

Tools are offered to the model through its chat template and its calls read back from its answer
(cluster/tool_calls.py). `response_format` json_object / json_schema and `tool_choice` "required" or a named
function hold the answer to a JSON schema by constrained decoding (cluster/constraints.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.sampling import MAX_LOGIT_BIAS
from cluster.tool_calls import template_calls

# OpenAI calls the system prompt of newer models "developer"; chat templates know only "system"
_ROLE_ALIASES = {"developer": "system"}


class _Request(BaseModel):
    # unknown fields (user, metadata, store, ...) change nothing about the answer: accepted and ignored
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    # accepted at its neutral value only (see the module's docstring)
    n: int | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias and (len(bias) > MAX_LOGIT_BIAS or not all(k.isdigit() and -100 <= v <= 100 for k, v in bias.items())):
            raise ValueError(f"at most {MAX_LOGIT_BIAS} token ids (as strings) with biases in [-100, 100]")
        return bias

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    @model_validator(mode="after")
    def _stops(self) -> _Request:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop: at most 16 strings of 1 to 256 characters")
        return self

    def _refused(self) -> list[str]:
        """What the request asks for that clusterctl does not do, one phrase each."""
        refused = []
        if self.n not in (None, 1):
            refused.append("n: one answer per request (n=1); send the request again for another")
        return refused

    @model_validator(mode="after")
    def _supported(self) -> _Request:
        if refused := self._refused():
            raise ValueError("; ".join(refused))
        return self


class FunctionCall(BaseModel):
    name: str = Field(min_length=1)
    arguments: str  # JSON text, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _json(cls, arguments: str) -> str:
        try:
            json.loads(arguments or "{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e})") from None
        return arguments


class ToolCallIn(BaseModel):
    """A call the assistant made in an earlier turn, as the client sends it back."""

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str = Field(min_length=1, max_length=32)
    # a string, or OpenAI's list of parts ([{"type": "text", "text": ...}]); an assistant turn may leave it out
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None  # a tool message: which call it answers
    # an assistant turn's thinking, as this API answered it (under either name): Qwen3's template reads it
    reasoning_content: str | None = None
    reasoning: str | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, role: str) -> str:
        return _ROLE_ALIASES.get(role, role)

    @model_validator(mode="after")
    def _text(self) -> Message:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message holds tool calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: a tool message names the call it answers")
        if isinstance(self.content, list):
            # the text parts, joined as vLLM joins them for a text-only model; other kinds have no reader here
            kinds = {str(part.get("type")) for part in self.content} - {"text"}
            if kinds:
                raise ValueError(f"content: parts of type {', '.join(sorted(kinds))} are not supported (text only)")
            if any(not isinstance(part.get("text"), str) for part in self.content):
                raise ValueError("content: every text part needs a 'text' string")
            self.content = "\n".join(part["text"] for part in self.content)
        elif self.content is None:
            if self.role != "assistant":
                raise ValueError(f"content: a {self.role} message needs content")
            self.content = ""
        return self

    def for_template(self, call_id: Callable[[str], str]) -> dict[str, Any]:
        """The message as chat templates read it (tool_calls.template_calls), call ids as `call_id` maps them."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = call_id(self.tool_call_id)
        if thinking := self.reasoning_content or self.reasoning:
            out["reasoning_content"] = thinking
        if self.tool_calls:
            out["tool_calls"] = template_calls(
                [(c.id, c.function.name, c.function.arguments) for c in self.tool_calls], call_id
            )
        return out


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class ChatCompletionRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # vLLM's extension: extra variables for the chat template, such as Qwen3's {"enable_thinking": false}
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # false: at most one call when tool_choice forces calls; under "auto" the model decides how many it makes
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _max(self) -> ChatCompletionRequest:
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    @property
    def tool_dicts(self) -> list[dict[str, Any]] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    @property
    def holds_calls(self) -> bool:
        """Whether earlier turns hold tool calls or their results."""
        return any(m.tool_calls or m.tool_call_id for m in self.messages)

    def _refused(self) -> list[str]:
        refused = super()._refused()
        if self.functions:
            refused.append("functions: the deprecated form of tools; send them as tools")
        if self.tool_choice not in (None, "auto", "none", "required") and self.forced_tool is None:
            refused.append("tool_choice: 'auto', 'none', 'required' or {'type': 'function', 'function': {'name'}}")
        if (self.forced_tool is not None or self.tool_choice == "required") and self.json_schema is not None:
            refused.append("response_format: JSON output cannot be combined with a forced tool call")
        taken = {"messages", "tools", "add_generation_prompt"} & set(self.chat_template_kwargs or {})
        if taken:
            refused.append(f"chat_template_kwargs: {', '.join(sorted(taken))} come from the request itself")
        kind = (self.response_format or {}).get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            refused.append("response_format: the type is text, json_object or json_schema")
        elif kind == "json_schema" and not isinstance(self.json_schema, dict):
            refused.append("response_format: json_schema.schema is a JSON schema object")
        return refused

    @property
    def forced_tool(self) -> str | None:
        """The function tool_choice names ({"type": "function", "function": {"name": ...}}), if it names one."""
        if isinstance(self.tool_choice, dict) and self.tool_choice.get("type") == "function":
            name = (self.tool_choice.get("function") or {}).get("name")
            return name if isinstance(name, str) else None
        return None

    @property
    def json_schema(self) -> Any:
        """The schema response_format holds the answer to: any object for json_object, the one given for
        json_schema (any object when it gives none); None for text."""
        format_ = self.response_format or {}
        if format_.get("type") == "json_object":
            return {"type": "object"}
        if format_.get("type") == "json_schema":
            return (format_.get("json_schema") or {}).get("schema", {"type": "object"})
        return None


class CompletionRequest(_Request):
    prompt: str  # a list holding one string is taken too
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if not isinstance(prompt, list):
            return prompt
        if prompt and all(isinstance(p, (int, list)) for p in prompt):
            raise ValueError("prompts of token ids are not supported: send the text")
        if len(prompt) != 1:
            raise ValueError(f"one prompt per request, not {len(prompt)}")
        return prompt[0]

    def _refused(self) -> list[str]:
        refused = super()._refused()
        if self.echo:
            refused.append("echo: not supported")
        if self.suffix:
            refused.append("suffix: not supported")
        if self.best_of not in (None, 1):
            refused.append("best_of: not supported")
        return refused


def sampling_of(body: _Request) -> dict[str, Any]:
    """The sampling fields the request set; unset ones take the model's generation_config.json defaults."""
    chosen = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "logit_bias": tuple(sorted((int(k), v) for k, v in body.logit_bias.items())) if body.logit_bias else None,
        "seed": body.seed,
    }
    return {k: v for k, v in chosen.items() if v is not None}
