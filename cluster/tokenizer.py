"""Tokenizer for a Hugging Face model directory: tokenizer.json, special-token ids, chat templates,
and a streaming detokenizer that turns token ids into text one token at a time."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import tokenizers
from jinja2 import meta, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

log = logging.getLogger(__name__)

_DEFAULT_TEMPLATE = "default"
_TOOL_TEMPLATE = "tool_use"
# Special-token names HF passes into chat templates (its special_tokens_map).
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class TokenizerError(ValueError):
    """A tokenizer or chat template that cannot be loaded or applied."""


class _TemplateException(jinja2.TemplateError):
    """Raised by a template's own `raise_exception(...)` call."""


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateException(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # HF overrides jinja's tojson: no HTML escaping, non-ASCII kept, indent/separators exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (HF marks assistant spans with it); renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return list(parser.parse_statements(("name:endgeneration",), drop_needle=True))


def _template_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} does not hold a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """A special token given as a string or as an AddedToken dict `{"content": ...}`."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _id_list(value: Any) -> list[int]:
    """`eos_token_id` and friends: an int, a list of ints, or null."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _parse_templates(raw: Any, source: Path) -> dict[str, str]:
    """tokenizer_config's chat_template: one string, or a list of {"name", "template"}."""
    if raw is None:
        return {}
    if isinstance(raw, str):
        return {_DEFAULT_TEMPLATE: raw}
    if isinstance(raw, list):
        named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
        templates = {k: v for k, v in named.items() if isinstance(k, str) and isinstance(v, str)}
        if templates:
            return templates
    raise TokenizerError(f"{source}: chat_template must be a string or a list of {{name, template}}")


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TokenizerError(f"message {i} is a {type(m).__name__}, not a dict")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise TokenizerError(f"message {i} has no 'role' string")
        # Assistant turns that only call tools may leave content out.
        if "content" not in m and "tool_calls" not in m:
            raise TokenizerError(f"message {i} ({m['role']}) has no 'content'")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise TokenizerError(f"message {i} content must be a string or a list of parts")
    return list(messages)


class Tokenizer:
    """tokenizer.json plus what the surrounding HF config files say about special tokens and chat."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        bos_id: int | None = None,
        eos_ids: Iterable[int] = (),
        chat_templates: Mapping[str, str] | None = None,
    ) -> None:
        self._tok = tokenizer
        # Passed to chat templates as bos_token, eos_token, ... like HF's special_tokens_map.
        self._special = dict(special_tokens or {})
        self.bos_token = self._special.get("bos_token")
        self.eos_token = self._special.get("eos_token")
        if bos_id is None and self.bos_token is not None:
            bos_id = tokenizer.token_to_id(self.bos_token)
        self._bos_id = bos_id
        eos = set(eos_ids)
        if self.eos_token is not None and (tid := tokenizer.token_to_id(self.eos_token)) is not None:
            eos.add(tid)
        self._eos_ids = frozenset(eos)
        self._templates = dict(chat_templates or {})
        self._compiled: dict[str, jinja2.Template] = {}
        self._env: ImmutableSandboxedEnvironment | None = None
        self._byte_fallback = _uses_byte_fallback(tokenizer)
        self._special_ids = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a Hugging Face model directory (tokenizer.json and its config files)."""
        root = Path(path)
        tok_path = root / "tokenizer.json"
        if not tok_path.is_file():
            raise TokenizerError(f"no tokenizer.json in {root} (expected {tok_path})")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_path))
        except Exception as e:  # the Rust side raises plain Exception on malformed files
            raise TokenizerError(f"cannot load {tok_path}: {e}") from e

        tok_cfg = _read_json(root / "tokenizer_config.json")
        # Older repos keep special tokens only in special_tokens_map.json.
        tok_map = _read_json(root / "special_tokens_map.json")
        gen_cfg = _read_json(root / "generation_config.json")
        model_cfg = _read_json(root / "config.json")
        text_cfg = model_cfg.get("text_config")
        if isinstance(text_cfg, dict):  # multimodal configs nest the language model's ids
            model_cfg = {**text_cfg, **{k: v for k, v in model_cfg.items() if v is not None}}

        special: dict[str, str] = {}
        for name in _SPECIAL_TOKEN_NAMES:
            value = _token_content(tok_cfg.get(name)) or _token_content(tok_map.get(name))
            if value is not None:
                special[name] = value

        bos_id = _first(_id_list(gen_cfg.get("bos_token_id")))
        if bos_id is None and "bos_token" in special:
            bos_id = tok.token_to_id(special["bos_token"])
        if bos_id is None:
            bos_id = _first(_id_list(model_cfg.get("bos_token_id")))
        eos_ids = _id_list(gen_cfg.get("eos_token_id")) + _id_list(model_cfg.get("eos_token_id"))

        templates = _parse_templates(tok_cfg.get("chat_template"), root / "tokenizer_config.json")
        jinja_path = root / "chat_template.jinja"
        if jinja_path.is_file():  # the newer HF layout; it takes precedence like in transformers
            templates[_DEFAULT_TEMPLATE] = jinja_path.read_text(encoding="utf-8")
        log.debug("loaded tokenizer from %s (bos=%s, eos=%s)", root, bos_id, sorted(eos_ids))
        return cls(tok, special_tokens=special, bos_id=bos_id, eos_ids=eos_ids, chat_templates=templates)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos_ids

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of added tokens marked special (the ones `skip_special_tokens` drops)."""
        return self._special_ids

    @property
    def byte_fallback(self) -> bool:
        """Whether the decoder turns `<0xNN>` tokens into raw bytes (SentencePiece byte fallback)."""
        return self._byte_fallback

    @property
    def chat_template(self) -> str | None:
        return self._templates.get(_DEFAULT_TEMPLATE)

    @property
    def chat_templates(self) -> dict[str, str]:
        return dict(self._templates)

    @property
    def has_chat_template(self) -> bool:
        return bool(self._templates)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """Render messages with the model's chat template the way transformers does."""
        msgs = _validate_messages(messages)
        template = self._template(tools)
        context: dict[str, Any] = {**self._special, **extra}
        context.update(messages=msgs, tools=tools, add_generation_prompt=add_generation_prompt)
        context.setdefault("documents", None)
        try:
            return template.render(**context)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template error: {e}") from e
        except Exception as e:  # a template can fail in plain Python ways (None + str, bad index)
            raise TokenizerError(f"chat template failed: {type(e).__name__}: {e}") from e

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> list[int]:
        return self.render_chat(messages, add_generation_prompt, tools, **extra)[1]

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> tuple[str, list[int]]:
        """The prompt's text as the chat template writes it, and its ids."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools, **extra)
        # Templates write their own BOS, so the post-processor must not add another (as in HF).
        return text, self.encode(text, add_special_tokens=False)

    def tool_template(self) -> str | None:
        """The chat template used when tools are given, if it has a place for them; else None."""
        source = self._templates.get(self._template_name(with_tools=True))
        if source is None:
            return None
        try:
            read = meta.find_undeclared_variables(self._environment().parse(source))
        except jinja2.TemplateSyntaxError:
            return None
        return source if "tools" in read else None

    def _environment(self) -> ImmutableSandboxedEnvironment:
        if self._env is None:
            self._env = _template_env()
        return self._env

    def template_for(self, tools: Sequence[Mapping[str, Any]] | None = None) -> str | None:
        """The source of the chat template a request with `tools` is rendered with (None: no such template)."""
        return self._templates.get(self._template_name(with_tools=bool(tools)))

    def _template_name(self, with_tools: bool) -> str:
        # Same choice as transformers: "tool_use" when tools are given and it exists, else "default".
        return _TOOL_TEMPLATE if with_tools and _TOOL_TEMPLATE in self._templates else _DEFAULT_TEMPLATE

    def _template(self, tools: Sequence[Mapping[str, Any]] | None) -> jinja2.Template:
        if not self._templates:
            raise TokenizerError("this model has no chat template; use raw mode (--raw) and pass the prompt text as is")
        if tools and self.tool_template() is None:
            # rendered without them, the model would never see the tools it was given
            raise TokenizerError("this model's chat template has no place for tools")
        name = self._template_name(with_tools=bool(tools))
        if name not in self._templates:
            raise TokenizerError(f"no 'default' chat template among {sorted(self._templates)}; use raw mode (--raw)")
        if name not in self._compiled:
            try:
                self._compiled[name] = self._environment().from_string(self._templates[name])
            except jinja2.TemplateSyntaxError as e:
                raise TokenizerError(f"chat template {name!r} does not parse: {e}") from e
        return self._compiled[name]


def _first(ids: list[int]) -> int | None:
    return ids[0] if ids else None


def _uses_byte_fallback(tok: tokenizers.Tokenizer) -> bool:
    # The decoder's own JSON, not tok.to_str(), which would serialize the whole vocabulary.
    decoder = tok.decoder
    return decoder is not None and b'"ByteFallback"' in decoder.__getstate__()


class StreamingDetokenizer:
    """Incremental decode: feed token ids one by one, get the text they complete.

    Decodes a short window that starts at `_prefix` (a token index where the bytes are known to
    start a character) instead of the whole sequence. Text is held back while it ends in U+FFFD,
    which is how an incomplete UTF-8 sequence decodes, so split characters come out whole.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # the ids that reach the decoder
        self._prefix = 0  # window start
        self._read = 0  # end of the last window that decoded without a pending byte sequence
        self._emitted = 0  # characters of decode(ids[_prefix:]) already returned

    @property
    def window(self) -> int:
        """How many tokens the next `add` decodes, besides the new one."""
        return len(self._ids) - self._prefix

    def add(self, token_id: int) -> str:
        """Add one token; return the text that is now final (often "", never a partial character)."""
        if self._skip and token_id in self._tok.special_ids:
            # Dropped before decoding, as decode() does; kept out of the window so it never
            # stands in as the context token that decides SentencePiece's leading space.
            return ""
        self._ids.append(token_id)
        text = self._decode(self._prefix)
        stable = self._stable_end(text)
        out = text[self._emitted : stable] if stable > self._emitted else ""
        self._emitted = max(self._emitted, stable)
        if stable == len(text):
            self._slide()
        return out

    def flush(self) -> str:
        """The text still held back at the end of the stream (invalid bytes come out as U+FFFD)."""
        text = self._decode(self._prefix)
        out = text[self._emitted :]
        self._emitted = len(text)
        return out

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tok.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def _stable_end(self, text: str) -> int:
        end = len(text.rstrip("\ufffd"))
        # Byte fallback decodes a run of <0xNN> tokens as a unit (all U+FFFD if any byte is bad), so
        # text from such a run is final only once a normal token ends the run.
        if self._tok.byte_fallback:
            run = self._byte_run_start()
            if run < len(self._ids):
                end = min(end, len(self._decode(self._prefix, run)))
        return end

    def _byte_run_start(self) -> int:
        i = len(self._ids)
        while i > self._prefix:
            token = self._tok.id_to_token(self._ids[i - 1])
            if token is None or not _BYTE_TOKEN.fullmatch(token):
                break
            i -= 1
        return i

    def _slide(self) -> None:
        # Everything so far is final: restart the window at the previous clean boundary so the
        # first token keeps one token of context (SentencePiece drops a leading space only there).
        self._prefix, self._read = self._read, len(self._ids)
        self._emitted = len(self._decode(self._prefix))
