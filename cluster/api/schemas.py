"""Request bodies of the OpenAI-compatible API (the subset clusterctl serves), validated by pydantic.

OpenAI fields that clusterctl cannot honour (several answers, tools, penalties on counts, logit bias, JSON mode)
are refused with a 400 that names them whenever they ask for something, never ignored; at their neutral values
(n=1, presence_penalty=0, ...), which many clients send every time, they are accepted. `top_k`, `min_p` and
`repetition_penalty` are accepted beside OpenAI's fields, as vLLM and llama.cpp's server accept them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    # accepted at their neutral value only (see the module's docstring)
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

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
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                refused.append(f"{name}: not supported (repetition_penalty, Hugging Face's kind, is)")
        if self.logit_bias:
            refused.append("logit_bias: not supported")
        return refused

    @model_validator(mode="after")
    def _supported(self) -> _Request:
        if refused := self._refused():
            raise ValueError("; ".join(refused))
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str = Field(min_length=1, max_length=32)
    # a string, or OpenAI's list of parts ([{"type": "text", "text": ...}]); an assistant turn may leave it out
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[Any] | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, role: str) -> str:
        return _ROLE_ALIASES.get(role, role)

    @model_validator(mode="after")
    def _text(self) -> Message:
        if self.tool_calls:
            raise ValueError("tool_calls: tool calling is not supported")
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


class ChatCompletionRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _max(self) -> ChatCompletionRequest:
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    def _refused(self) -> list[str]:
        refused = super()._refused()
        if self.tools or self.functions:
            refused.append("tools: tool calling is not supported")
        if (self.response_format or {}).get("type", "text") != "text":
            refused.append("response_format: only {'type': 'text'} is supported")
        return refused


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
        "seed": body.seed,
    }
    return {k: v for k, v in chosen.items() if v is not None}
