"""Request bodies of the OpenAI-compatible API (the subset clusterctl serves), validated by pydantic."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Request(BaseModel):
    # unknown OpenAI fields (n=1, user, presence_penalty 0, ...) are accepted and ignored
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    @model_validator(mode="after")
    def _stops(self) -> _Request:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop: at most 16 strings of 1 to 256 characters")
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str = Field(min_length=1, max_length=32)
    content: str


class ChatCompletionRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _max(self) -> ChatCompletionRequest:
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(_Request):
    prompt: str
    logprobs: int | None = Field(default=None, ge=0, le=20)


def sampling_of(body: _Request) -> dict[str, Any]:
    """The sampling fields the request set; unset ones take the model's generation_config.json defaults."""
    chosen = {"temperature": body.temperature, "top_p": body.top_p, "seed": body.seed}
    return {k: v for k, v in chosen.items() if v is not None}
