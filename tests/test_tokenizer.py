"""Tokenizer loading, chat templates and streaming detokenization, on real tokenizers trained here."""

from __future__ import annotations

import json
import random
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from cluster.tokenizer import StreamingDetokenizer, Tokenizer, TokenizerError

FIXTURES = Path(__file__).parent / "fixtures"

CORPUS = [
    "The café served crème brûlée and a piña colada to the naïve señor.",
    "Ångström, façade, jalapeño, über, déjà vu, Zoë and Björk met in Malmö.",
    "我们今天去北京吃烤鸭，然后去长城。中文分词很有意思。",
    "東京の天気は晴れです。日本語のテキストも少し。",
    "한국어 문장도 있습니다. 안녕하세요!",
    "Emoji time 😀🎉🚀 and flags 🇫🇷 plus hearts ❤️ and hands 👍🏽.",
    "Mixed: naïve 中文 😀 text with spaces   and\ttabs\nand newlines.",
    "Hello world, how are you doing today? I am fine, thank you.",
]
# Text the tokenizers never saw in training, so rare characters fall back to bytes.
SAMPLES = [
    "Hello world",
    "crème brûlée 😀 中文",
    "北京烤鸭🎉🚀 and 안녕하세요",
    "  leading spaces and trailing  ",
    "emoji only 🦄🦀🧪 plus 🇯🇵",
    "rare: ǅ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ⽇",
    "",
]
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there, ça va? 😀"},
]


def _train_byte_level() -> HFTokenizer:
    """Llama 3 style: byte-level BPE with a small vocab, so multi-byte characters span tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=LLAMA3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return tok


def _train_byte_fallback() -> HFTokenizer:
    """Llama 2 style: SentencePiece-like BPE on "▁" with <0xNN> byte fallback and a Strip decoder."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60, show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    # Add the 256 byte tokens to the model vocab and switch byte fallback on, as SentencePiece does.
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    base = tok.get_vocab_size(with_added_tokens=True)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = base + b
    data["model"]["byte_fallback"] = True
    data["model"]["fuse_unk"] = True
    tok = HFTokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _train_unigram() -> HFTokenizer:
    """SentencePiece Unigram with a Metaspace pre-tokenizer and decoder (leading "▁" is a space)."""
    tok = HFTokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


BUILDERS = {"byte_level": _train_byte_level, "byte_fallback": _train_byte_fallback, "unigram": _train_unigram}


@pytest.fixture(scope="module")
def backends() -> dict[str, HFTokenizer]:
    return {name: build() for name, build in BUILDERS.items()}


def write_model_dir(
    root: Path,
    tok: HFTokenizer,
    tokenizer_config: dict[str, Any] | None = None,
    *,
    generation_config: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    jinja: str | None = None,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    if tokenizer_config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if generation_config is not None:
        (root / "generation_config.json").write_text(json.dumps(generation_config))
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    if jinja is not None:
        (root / "chat_template.jinja").write_text(jinja)
    return root


@pytest.fixture
def llama3(tmp_path: Path, backends: dict[str, HFTokenizer]) -> Tokenizer:
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}
    return Tokenizer.from_dir(write_model_dir(tmp_path / "m", backends["byte_level"], cfg))


def _with_template(tmp_path: Path, backends: dict[str, HFTokenizer], template: str) -> Tokenizer:
    cfg = {"bos_token": "<|begin_of_text|>", "chat_template": template}
    return Tokenizer.from_dir(write_model_dir(tmp_path / "t", backends["byte_level"], cfg))


# --- loading and special tokens ---


def test_missing_tokenizer_json_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_files_raise_tokenizer_error(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    d = write_model_dir(tmp_path / "m", backends["byte_level"])
    (d / "generation_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="generation_config.json"):
        Tokenizer.from_dir(d)


def test_encode_follows_post_processor_and_decodes_back(llama3: Tokenizer) -> None:
    bos = llama3.token_to_id("<|begin_of_text|>")
    ids = llama3.encode("crème brûlée 😀")
    assert ids[0] == bos and llama3.bos_id == bos
    assert llama3.encode("crème brûlée 😀", add_special_tokens=False) == ids[1:]
    assert llama3.decode(ids) == "<|begin_of_text|>crème brûlée 😀"
    assert llama3.decode(ids, skip_special_tokens=True) == "crème brûlée 😀"
    assert llama3.id_to_token(bos) == "<|begin_of_text|>"
    assert llama3.vocab_size == 420


def test_special_tokens_from_tokenizer_config(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    tok = backends["byte_level"]
    cfg = {
        "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "special": True},
        "eos_token": "<|eot_id|>",
    }
    t = Tokenizer.from_dir(write_model_dir(tmp_path, tok, cfg))
    assert t.bos_id == tok.token_to_id("<|begin_of_text|>")
    assert t.eos_ids == {tok.token_to_id("<|eot_id|>")}
    assert t.bos_token == "<|begin_of_text|>" and t.eos_token == "<|eot_id|>"


def test_eos_ids_are_the_union_of_all_sources(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    tok = backends["byte_level"]
    eot, eot_text = tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")
    d = write_model_dir(
        tmp_path,
        tok,
        {"eos_token": "<|eot_id|>"},
        generation_config={"bos_token_id": 0, "eos_token_id": [eot_text, eot]},
        config={"bos_token_id": 7, "eos_token_id": 5},
    )
    t = Tokenizer.from_dir(d)
    assert t.eos_ids == {eot, eot_text, 5}
    assert t.bos_id == 0  # generation_config wins over config.json


def test_generation_config_single_int(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    d = write_model_dir(tmp_path, backends["byte_level"], generation_config={"eos_token_id": 4})
    t = Tokenizer.from_dir(d)
    assert t.eos_ids == {4} and t.bos_id is None


def test_config_json_is_the_fallback(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    d = write_model_dir(tmp_path, backends["byte_level"], config={"bos_token_id": 0, "eos_token_id": [1, 4]})
    t = Tokenizer.from_dir(d)
    assert t.bos_id == 0 and t.eos_ids == {1, 4}
    nested = write_model_dir(
        tmp_path / "vlm",
        backends["byte_level"],
        config={"text_config": {"bos_token_id": 0, "eos_token_id": 1}},
    )
    t = Tokenizer.from_dir(nested)
    assert t.bos_id == 0 and t.eos_ids == {1}


def test_no_special_tokens_anywhere(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    t = Tokenizer.from_dir(write_model_dir(tmp_path, backends["unigram"]))
    assert t.bos_id is None and t.eos_ids == frozenset()
    assert not t.has_chat_template


# --- chat templates ---


def test_chat_template_string(llama3: Tokenizer) -> None:
    text = llama3.apply_chat_template(MESSAGES)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there, ça va? 😀<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    no_prompt = llama3.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert text.startswith(no_prompt) and no_prompt.endswith("<|eot_id|>")


def test_encode_chat_has_exactly_one_bos(llama3: Tokenizer) -> None:
    ids = llama3.encode_chat(MESSAGES)
    assert ids.count(llama3.bos_id) == 1 and ids[0] == llama3.bos_id
    assert llama3.decode(ids) == llama3.apply_chat_template(MESSAGES)


def test_named_template_list(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    cfg = {
        "chat_template": [
            {"name": "default", "template": "D:{{ messages[0]['content'] }}"},
            {"name": "tool_use", "template": "T:{{ tools | length }}"},
        ]
    }
    t = Tokenizer.from_dir(write_model_dir(tmp_path, backends["byte_level"], cfg))
    assert t.apply_chat_template(MESSAGES) == "D:Be brief."
    assert t.apply_chat_template(MESSAGES, tools=[{"type": "function"}]) == "T:1"
    assert set(t.chat_templates) == {"default", "tool_use"}


def test_tools_need_a_template_that_has_a_place_for_them(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    # rendered by a template that never reads `tools`, the model would not learn of them: refused, not dropped
    plain = _with_template(tmp_path / "plain", backends, "{{ messages[0]['content'] }}")
    assert plain.tool_template() is None
    assert plain.apply_chat_template(MESSAGES) == "Be brief."
    with pytest.raises(TokenizerError, match="no place for tools"):
        plain.apply_chat_template(MESSAGES, tools=[{"type": "function"}])
    source = "{% if tools is defined and tools %}T{% endif %}{{ messages[0]['content'] }}"
    offered = _with_template(tmp_path / "offered", backends, source)
    assert offered.tool_template() == source
    assert offered.apply_chat_template(MESSAGES, tools=[{"type": "function"}]) == "TBe brief."


def test_named_template_list_without_default(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    cfg = {"chat_template": [{"name": "rag", "template": "R"}]}
    t = Tokenizer.from_dir(write_model_dir(tmp_path, backends["byte_level"], cfg))
    with pytest.raises(TokenizerError, match="default"):
        t.apply_chat_template(MESSAGES)


def test_jinja_file_wins_over_tokenizer_config(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    cfg = {"chat_template": "from config"}
    d = write_model_dir(tmp_path, backends["byte_level"], cfg, jinja="from file {{ messages | length }}")
    assert Tokenizer.from_dir(d).apply_chat_template(MESSAGES) == "from file 2"
    only_file = write_model_dir(tmp_path / "f", backends["byte_level"], jinja="{{ eos_token }}")
    assert Tokenizer.from_dir(only_file).apply_chat_template(MESSAGES) == ""


def test_template_sees_special_tokens_and_kwargs(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    template = "{{ bos_token }}|{{ eos_token }}|{{ enable_thinking }}|{{ add_generation_prompt }}"
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": template}
    t = Tokenizer.from_dir(write_model_dir(tmp_path, backends["byte_level"], cfg))
    rendered = t.apply_chat_template(MESSAGES, add_generation_prompt=False, enable_thinking=True)
    assert rendered == "<|begin_of_text|>|<|eot_id|>|True|False"


def test_tojson_matches_hf(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    t = _with_template(tmp_path, backends, "{{ tools | tojson }}\n{{ tools[0] | tojson(indent=2) }}")
    tools = [{"name": "<café>", "n": 1}]
    first, second = t.apply_chat_template(MESSAGES, tools=tools).split("\n", 1)
    assert first == '[{"name": "<café>", "n": 1}]'  # no HTML escaping, no \u escapes
    assert second == json.dumps(tools[0], ensure_ascii=False, indent=2)


def test_strftime_now_and_loop_controls(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    template = (
        "{{ strftime_now('%Y') }}:{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}"
        "{{ m.role }}{% break %}{% endfor %}"
    )
    t = _with_template(tmp_path, backends, template)
    assert t.apply_chat_template(MESSAGES) == f"{datetime.now().year}:user"


def test_generation_tag_renders_its_body(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    t = _with_template(tmp_path, backends, "{% generation %}A{{ 1 + 1 }}{% endgeneration %}")
    assert t.apply_chat_template(MESSAGES) == "A2"


def test_trim_and_lstrip_blocks(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    t = _with_template(tmp_path, backends, "  {% for m in messages %}\n[{{ m.role }}]\n  {% endfor %}\n")
    assert t.apply_chat_template(MESSAGES) == "[system]\n[user]\n"


def test_raise_exception_becomes_tokenizer_error(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    template = "{% if messages[0].role == 'system' %}{{ raise_exception('No system role') }}{% endif %}"
    t = _with_template(tmp_path, backends, template)
    with pytest.raises(TokenizerError, match="No system role"):
        t.apply_chat_template(MESSAGES)


def test_template_errors_become_tokenizer_errors(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    with pytest.raises(TokenizerError, match="does not parse"):
        _with_template(tmp_path, backends, "{% for %}").apply_chat_template(MESSAGES)
    with pytest.raises(TokenizerError, match="TypeError"):
        _with_template(tmp_path / "b", backends, "{{ 1 + messages }}").apply_chat_template(MESSAGES)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{% set x = [] %}{{ x.append(1) }}",
        "{{ messages[0].update({'role': 'x'}) }}",
    ],
)
def test_sandbox_blocks_unsafe_access(template: str, tmp_path: Path, backends: dict) -> None:
    with pytest.raises(TokenizerError):
        _with_template(tmp_path, backends, template).apply_chat_template(MESSAGES)


def test_sandbox_hides_dunder_attributes(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    assert _with_template(tmp_path, backends, "[{{ ''.__class__ }}]").apply_chat_template(MESSAGES) == "[]"


def test_no_template_says_use_raw_mode(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    cfg = {"bos_token": "<|begin_of_text|>"}
    t = Tokenizer.from_dir(write_model_dir(tmp_path, backends["byte_level"], cfg))
    with pytest.raises(TokenizerError, match="raw"):
        t.apply_chat_template(MESSAGES)
    with pytest.raises(TokenizerError, match="raw"):
        t.encode_chat(MESSAGES)


def test_bad_template_type_in_config(tmp_path: Path, backends: dict[str, HFTokenizer]) -> None:
    with pytest.raises(TokenizerError, match="chat_template"):
        Tokenizer.from_dir(write_model_dir(tmp_path, backends["byte_level"], {"chat_template": 3}))


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [["user", "hi"]],
        [{"content": "hi"}],
        [{"role": "user"}],
        [{"role": "user", "content": 3}],
    ],
)
def test_messages_are_validated(messages: Any, llama3: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="message"):
        llama3.apply_chat_template(messages)


def test_tool_call_messages_may_omit_content(llama3: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": []}]
    assert "assistant" in llama3.apply_chat_template(msgs)


# --- streaming detokenizer ---


def _stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    detok = StreamingDetokenizer(tok, skip_special_tokens=skip)
    return [detok.add(i) for i in ids] + [detok.flush()]


@pytest.fixture(scope="module")
def stream_tokenizers(backends: dict[str, HFTokenizer], tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("stream")
    return {name: Tokenizer.from_dir(write_model_dir(root / name, tok)) for name, tok in backends.items()}


def test_training_splits_characters_across_tokens(stream_tokenizers: dict[str, Tokenizer]) -> None:
    # Guards the tests below: some tokens must hold only part of a UTF-8 character.
    for name in ("byte_level", "byte_fallback"):
        tok = stream_tokenizers[name]
        partial = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]
        assert partial, name
    assert stream_tokenizers["byte_fallback"].byte_fallback
    ids = stream_tokenizers["byte_fallback"].encode("🦄", add_special_tokens=False)
    assert all(stream_tokenizers["byte_fallback"].id_to_token(i).startswith("<0x") for i in ids[-4:])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_stream_of_valid_text_never_yields_replacement_chars(name: str, stream_tokenizers: dict) -> None:
    tok = stream_tokenizers[name]
    for text in SAMPLES + CORPUS:
        for special in (True, False):
            ids = tok.encode(text, add_special_tokens=special)
            chunks = _stream(tok, ids)
            assert "".join(chunks) == tok.decode(ids), (name, text)
            assert not any("\ufffd" in c for c in chunks), (name, text, chunks)


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("skip", [False, True])
def test_stream_equals_full_decode_for_random_ids(name: str, skip: bool, stream_tokenizers: dict) -> None:
    tok = stream_tokenizers[name]
    rng = random.Random(1234)
    for _ in range(400):
        n = rng.randint(1, 40)
        ids = [rng.randrange(tok.vocab_size) for _ in range(n)]
        chunks = _stream(tok, ids, skip)
        assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip), (name, ids)
        # U+FFFD only leaves mid-stream once a later character shows it can never complete.
        assert all(not c.endswith("\ufffd") for c in chunks[:-1]), (name, ids, chunks)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_stream_of_mixed_text_and_random_ids(name: str, stream_tokenizers: dict) -> None:
    tok = stream_tokenizers[name]
    rng = random.Random(99)
    pool = [i for text in CORPUS for i in tok.encode(text, add_special_tokens=False)]
    for _ in range(200):
        ids = [rng.choice(pool) if rng.random() < 0.8 else rng.randrange(tok.vocab_size) for _ in range(60)]
        assert "".join(_stream(tok, ids)) == tok.decode(ids), (name, ids)


def test_split_character_is_held_until_complete(stream_tokenizers: dict[str, Tokenizer]) -> None:
    tok = stream_tokenizers["byte_level"]
    ids = tok.encode("a🦄", add_special_tokens=False)
    assert len(ids) >= 3  # "a" plus a 4-byte emoji the vocab cannot hold whole
    chunks = _stream(tok, ids)
    assert chunks[-2:] == ["🦄", ""] and all(c in ("", "a") for c in chunks[:-2])


def test_complete_characters_before_a_split_one_are_not_held(stream_tokenizers: dict[str, Tokenizer]) -> None:
    tok = stream_tokenizers["byte_level"]
    # A token such as "brÃ": "br" plus the first byte of "û"; "br" is final at once.
    tid = next(i for i in range(tok.vocab_size) if tok.decode([i]) == "br\ufffd")
    detok = StreamingDetokenizer(tok)
    assert detok.add(tid) == "br"
    rest = tok.encode("brûlée", add_special_tokens=False)
    assert rest[0] == tid
    assert "".join(detok.add(i) for i in rest[1:]) + detok.flush() == "ûlée"


def test_invalid_bytes_come_out_at_flush(stream_tokenizers: dict[str, Tokenizer]) -> None:
    tok = stream_tokenizers["byte_level"]
    lead = tok.token_to_id("ð")  # byte 0xF0: the start of a 4-byte sequence, never finished
    detok = StreamingDetokenizer(tok)
    assert detok.add(tok.token_to_id("a")) == "a"
    assert detok.add(lead) == ""
    assert detok.flush() == "\ufffd"
    # Once a following character shows the sequence cannot complete, it is released mid-stream.
    detok = StreamingDetokenizer(tok)
    assert detok.add(lead) == ""
    assert detok.add(tok.token_to_id("a")) == "\ufffda"


def test_sentencepiece_spaces_follow_context(stream_tokenizers: dict[str, Tokenizer]) -> None:
    for name in ("unigram", "byte_fallback"):
        tok = stream_tokenizers[name]
        ids = tok.encode("Hello world how are you", add_special_tokens=False)
        chunks = _stream(tok, ids)
        assert "".join(chunks) == "Hello world how are you", name
        assert not chunks[0].startswith(" ")


def test_window_stays_short(stream_tokenizers: dict[str, Tokenizer]) -> None:
    tok = stream_tokenizers["byte_level"]
    detok = StreamingDetokenizer(tok)
    ids = tok.encode(" ".join(CORPUS) * 3, add_special_tokens=False)
    for i in ids:
        detok.add(i)
        assert detok.window <= 8  # decode cost is per window, not per sequence


# --- committed reference checkpoints, when present ---


def _fixture_dirs() -> list[Path]:
    refs = FIXTURES.glob("*/reference.json")
    return sorted(p.parent for p in refs if (p.parent / "tokenizer.json").is_file())


@pytest.mark.parametrize("model_dir", _fixture_dirs(), ids=lambda p: p.name)
def test_fixture_chat_prompt_matches_transformers(model_dir: Path) -> None:
    ref = json.loads((model_dir / "reference.json").read_text())
    if "chat_messages" not in ref or "chat_prompt_text" not in ref:
        pytest.skip("reference.json has no chat prompt")
    tok = Tokenizer.from_dir(model_dir)
    assert tok.apply_chat_template(ref["chat_messages"]) == ref["chat_prompt_text"]
    if "chat_prompt_ids" in ref:
        assert tok.encode_chat(ref["chat_messages"]) == ref["chat_prompt_ids"]
    if "prompt_text" in ref and "prompt_ids" in ref:  # raw mode: encode with the post-processor
        assert tok.encode(ref["prompt_text"]) == ref["prompt_ids"]


@pytest.mark.parametrize("model_dir", _fixture_dirs(), ids=lambda p: p.name)
def test_fixture_streaming_matches_decode(model_dir: Path) -> None:
    tok = Tokenizer.from_dir(model_dir)
    rng = random.Random(7)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert "".join(_stream(tok, ids)) == tok.decode(ids)
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]
        assert "".join(_stream(tok, ids)) == tok.decode(ids)
