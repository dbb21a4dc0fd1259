"""Build the tiny test checkpoints under tests/fixtures and their reference outputs.

Every fixture is a real Hugging Face (or mlx-lm) checkpoint directory with random weights, a tiny
byte-level BPE tokenizer trained here on a built-in corpus, and reference outputs computed by the
reference implementation:

    llama32           LlamaForCausalLM, tied, bf16, classic rope_theta + llama3 rope_scaling
    mistral           MistralForCausalLM, untied, fp16, sharded safetensors + index, classic rope_theta
    qwen2             Qwen2ForCausalLM, tied, fp32, non-zero q/k/v biases, rope_parameters form
    qwen3             Qwen3ForCausalLM, untied, bf16, head_dim 32, q/k norms, rope_parameters form
    llama32-4bit      llama32 through mlx_lm.convert, affine 4 bit, group 32
    llama32-8bit      llama32 through mlx_lm.convert, affine 8 bit, group 64
    qwen3-4bit-mixed  qwen3 through mlx_lm.convert, 4 bit / group 64 with 8 bit / group 32 overrides

Each directory also holds reference.json (prompt ids, 12 greedy ids, chat prompt rendered by
transformers) and reference_logits.npy (float32 logits for prompt + greedy[:-1], one forward pass).

Needs: torch (CPU is enough), transformers 5.x, mlx + mlx-lm (`mlx[cpu]` works on Linux), tokenizers,
safetensors, numpy. No network access is used. Run from the repository root:

    /work/refvenv/bin/python scripts/make_fixtures.py tests/fixtures
    # or: make fixtures REF_PY=/work/refvenv/bin/python

The output is deterministic (fixed seeds); existing fixture directories are replaced.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

VOCAB_SIZE = 512  # model vocab; the tokenizer has fewer entries (padded vocab, like real models)
BPE_SIZE = 400  # trained BPE entries before the special tokens are added
N_GREEDY = 12
MIN_DISTINCT = 6  # fewer means the model is stuck repeating and tests little
# A greedy step whose top-2 logits are closer than this could flip between implementations.
MIN_MARGIN = 0.02
PROMPT_TEXT = "The children like the old river and the morning sun."
CHAT_MESSAGES = [{"role": "user", "content": "Hi there"}]

CORPUS = """\
The small river runs past the old mill, and the children like to sing by the water.
In the morning the baker opens the shop, and the smell of fresh bread fills the street.
People walk to the market to buy apples, cheese, and flowers for the table.
The teacher reads a story about a brave fox who lived near the forest and the river.
When the rain stops, the sun comes out and the birds sing again over the houses.
She ordered a café au lait and a croissant; he was naïve enough to ask for a crème brûlée at nine.
Déjà vu in the façade of the old théâtre, jalapeño on the menu, and a piñata for the party.
我们在河边散步，天气很好。今天我想喝一杯咖啡。你好，世界！
Good morning! 😀 The party was great 🎉 and the cake was delicious 🍰. See you soon 👋.
Numbers like 2024, 3.14 and 1,000,000 appear in text too, as do symbols: #, @, %, & and $.
"""

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Llama 3 layout: bos, then one header block per message, each closed by <|eot_id|>. Every line
# opens with a whitespace-trimming tag, so the newlines between them never reach the output.
LLAMA3_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

# ChatML as in Qwen2: a default system message only when the conversation has none.
CHATML_TEMPLATE = """\
{%- for message in messages %}
    {%- if loop.first and message['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""


# ---------------------------------------------------------------- tokenizer


def train_bpe() -> Any:
    """Byte-level BPE: multi-byte characters (accents, CJK, emoji) may split across tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return tok


def build_tokenizer(flavour: str) -> Any:
    from tokenizers import AddedToken, processors

    tok = train_bpe()
    specials = LLAMA3_SPECIALS if flavour == "llama3" else CHATML_SPECIALS
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    byte_level = processors.ByteLevel(trim_offsets=False)
    if flavour == "llama3":
        bos = "<|begin_of_text|>"
        template = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level  # Qwen adds no BOS
    check_roundtrip(tok)
    return tok


def check_roundtrip(tok: Any) -> None:
    for line in CORPUS.splitlines() + [PROMPT_TEXT, "unseen: Zürich 東京 🚀"]:
        ids = tok.encode(line, add_special_tokens=False).ids
        assert tok.decode(ids) == line, f"tokenizer does not round-trip {line!r}"
    assert tok.get_vocab_size() <= VOCAB_SIZE


def special_ids(tok: Any, flavour: str) -> dict[str, Any]:
    """bos/eos/pad ids for config.json and generation_config.json."""
    t = tok.token_to_id
    if flavour == "llama3":
        return {
            "bos_token_id": t("<|begin_of_text|>"),
            "eos_token_id": t("<|end_of_text|>"),
            "gen_eos": [t("<|end_of_text|>"), t("<|eot_id|>")],
            "pad_token_id": None,
        }
    return {
        "bos_token_id": t("<|endoftext|>"),
        "eos_token_id": t("<|im_end|>"),
        "gen_eos": [t("<|im_end|>"), t("<|endoftext|>")],
        "pad_token_id": t("<|endoftext|>"),
    }


def first_special_id(tok: Any, flavour: str) -> int:
    specials = LLAMA3_SPECIALS if flavour == "llama3" else CHATML_SPECIALS
    first = min(tok.token_to_id(s) for s in specials)
    assert first == tok.get_vocab_size() - len(specials), "specials must follow the BPE entries"
    return first


def write_tokenizer(out: Path, tok: Any, flavour: str, template_file: bool) -> None:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja in the newer HF layout)."""
    tok.save(str(out / "tokenizer.json"))
    if flavour == "llama3":
        cfg: dict[str, Any] = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
        template = LLAMA3_TEMPLATE
    else:
        cfg = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        template = CHATML_TEMPLATE
    cfg |= {
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if template_file:
        (out / "chat_template.jinja").write_text(template)
    else:
        cfg["chat_template"] = template
    write_json(out / "tokenizer_config.json", cfg)


def write_generation_config(out: Path, ids: dict[str, Any]) -> None:
    cfg = {"bos_token_id": ids["bos_token_id"], "eos_token_id": ids["gen_eos"]}
    if ids["pad_token_id"] is not None:
        cfg["pad_token_id"] = ids["pad_token_id"]
    write_json(out / "generation_config.json", cfg)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- float checkpoints


@dataclass(frozen=True)
class HFSpec:
    name: str
    cls_name: str  # transformers model class
    flavour: str  # tokenizer flavour
    dtype: str  # storage dtype
    seed: int
    config: dict[str, Any]
    template_file: bool = False
    max_shard_size: str | None = None
    classic_rope: bool = False  # rewrite rope_parameters as top-level rope_theta + rope_scaling


COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 2048,
}

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

HF_SPECS = [
    HFSpec(
        "llama32",
        "LlamaForCausalLM",
        "llama3",
        "bfloat16",
        seed=1000,
        config=COMMON | {"rms_norm_eps": 1e-5, "tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE},
        classic_rope=True,
    ),
    HFSpec(
        "mistral",
        "MistralForCausalLM",
        "llama3",
        "float16",
        seed=2000,
        config=COMMON
        | {
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "sliding_window": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        max_shard_size="200KB",
        classic_rope=True,  # as on the Hub; mlx-lm's llama/mistral also ignore rope_parameters
    ),
    HFSpec(
        "qwen2",
        "Qwen2ForCausalLM",
        "chatml",
        "float32",
        seed=3000,
        config=COMMON
        | {
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    ),
    HFSpec(
        "qwen3",
        "Qwen3ForCausalLM",
        "chatml",
        "bfloat16",
        seed=4000,
        config=COMMON
        | {
            "head_dim": 32,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        template_file=True,
    ),
]


def init_weights(model: Any, seed: int, n_text: int) -> None:
    """Big enough weights that logits spread out; norms near 1 but not exactly 1.

    The layers must outweigh the embedding, or a tied model just echoes its last input token.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name or "lm_head" in name:
                noise[n_text:] *= 0.1  # padded vocab rows stay small, as untrained rows do
                p.copy_(0.4 * noise)
            else:
                p.copy_(0.2 * noise)


def build_hf_model(spec: HFSpec, ids: dict[str, Any], seed: int, n_text: int) -> Any:
    import torch
    import transformers

    cls = getattr(transformers, spec.cls_name)
    cfg_cls = cls.config_class
    config = cfg_cls(
        **spec.config,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
    )
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.set_attn_implementation("eager")
    init_weights(model, seed, n_text)
    # Round to the storage dtype now so the seed check sees the weights that get saved. Only the
    # parameters: model.to(bf16) would also round the rotary inv_freq buffer.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(getattr(torch, spec.dtype)).float())
    return model


def torch_forward(model: Any, ids: list[int]) -> np.ndarray:
    """float32 logits (L, V) for one forward pass without cache."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


def greedy(forward: Callable[[list[int]], np.ndarray], prompt: list[int]) -> list[int]:
    """Full re-forward each step: slow but the plainest possible reference."""
    seq = list(prompt)
    for _ in range(N_GREEDY):
        seq.append(int(np.argmax(forward(seq)[-1])))
    return seq[len(prompt) :]


def continuation_problems(logits: np.ndarray, n_prompt: int, out: list[int], n_text: int) -> list[str]:
    """Why a greedy continuation would make a poor fixture (empty list: it is fine)."""
    problems = []
    if len(set(out)) < MIN_DISTINCT:
        problems.append(f"only {len(set(out))} distinct tokens")
    if any(t >= n_text for t in out):
        problems.append("emits a special or padding token")  # an eos would end tests early
    margin = min_margin(logits, n_prompt)
    if margin < MIN_MARGIN:
        problems.append(f"top-2 margin {margin:.4f}")
    return problems


def min_margin(logits: np.ndarray, n_prompt: int) -> float:
    steps = np.sort(logits[n_prompt - 1 :], axis=-1)
    return float((steps[:, -1] - steps[:, -2]).min())


def save_hf(spec: HFSpec, model: Any, out: Path) -> None:
    import torch

    model = model.to(getattr(torch, spec.dtype))
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if spec.max_shard_size:
        kwargs["max_shard_size"] = spec.max_shard_size
    model.save_pretrained(out, **kwargs)
    if spec.max_shard_size:
        shards = list(out.glob("model-*.safetensors"))
        assert len(shards) >= 2 and (out / "model.safetensors.index.json").exists(), shards


def to_classic_rope(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes rope_parameters; Hub checkpoints of Llama 3.x use the older keys."""
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = rope  # plain-RoPE Hub configs carry no rope_scaling key at all
    return config


def load_reference(out: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()


def rewrite_classic_rope(out: Path, probe: list[int], rope: dict[str, Any]) -> None:
    """Rewrite config.json and prove transformers reads the rewrite to the same model."""
    before = torch_forward(load_reference(out), probe)
    path = out / "config.json"
    write_json(path, to_classic_rope(json.loads(path.read_text())))
    model = load_reference(out)
    assert model.config.rope_parameters == rope, model.config.rope_parameters
    after = torch_forward(model, probe)
    assert np.array_equal(before, after), "classic rope config changes the logits"


def make_family(spec: HFSpec, mlx_specs: list[MLXSpec], root: Path) -> None:
    """Reseed until the float fixture and every quantized fixture made from it are usable."""
    for seed in range(spec.seed, spec.seed + 50):
        problems = make_hf_fixture(spec, root, seed)
        for mlx_spec in mlx_specs if not problems else []:
            problems += [f"{mlx_spec.name}: {p}" for p in make_mlx_fixture(mlx_spec, root)]
        if not problems:
            return
        print(f"  seed {seed} rejected: {'; '.join(problems)}")
    raise RuntimeError(f"no usable seed for {spec.name}")


def make_hf_fixture(spec: HFSpec, root: Path, seed: int) -> list[str]:
    import transformers

    print(f"[{spec.name}] seed {seed}")
    out = fresh_dir(root / spec.name)
    tok = build_tokenizer(spec.flavour)
    ids = special_ids(tok, spec.flavour)
    n_text = first_special_id(tok, spec.flavour)

    save_hf(spec, build_hf_model(spec, ids, seed, n_text), out)
    write_tokenizer(out, tok, spec.flavour, spec.template_file)
    write_generation_config(out, ids)
    prompt = tok.encode(PROMPT_TEXT).ids
    assert (prompt[0] == ids["bos_token_id"]) == (spec.flavour == "llama3"), "only Llama adds a BOS"
    if spec.classic_rope:
        rewrite_classic_rope(out, prompt, spec.config["rope_parameters"])

    ref = load_reference(out)
    info = {
        "reference": f"transformers {transformers.__version__}, float32",
        "architecture": spec.cls_name,
        "storage_dtype": spec.dtype,
        "seed": seed,
    }
    return write_reference(out, lambda s: torch_forward(ref, s), prompt, n_text, info)


# ---------------------------------------------------------------- MLX quantized checkpoints


@dataclass(frozen=True)
class MLXSpec:
    name: str
    source: str  # float fixture it is converted from
    bits: int
    group_size: int
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # module path -> params


MLX_SPECS = [
    MLXSpec("llama32-4bit", "llama32", bits=4, group_size=32),
    MLXSpec("llama32-8bit", "llama32", bits=8, group_size=64),
    MLXSpec(
        "qwen3-4bit-mixed",
        "qwen3",
        bits=4,
        group_size=64,
        overrides={
            "lm_head": {"group_size": 32, "bits": 8, "mode": "affine"},
            "model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 8, "mode": "affine"},
        },
    ),
]


def make_mlx_fixture(spec: MLXSpec, root: Path) -> list[str]:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm import convert

    out = root / spec.name
    if out.exists():
        shutil.rmtree(out)  # convert refuses an existing directory

    def predicate(path: str, module: Any) -> bool | dict[str, Any]:
        # A dict makes mlx-lm record the module under config["quantization"][path].
        return dict(spec.overrides[path]) if path in spec.overrides else True

    convert(
        str(root / spec.source),
        str(out),
        quantize=True,
        q_group_size=spec.group_size,
        q_bits=spec.bits,
        quant_predicate=predicate if spec.overrides else None,
    )
    config = json.loads((out / "config.json").read_text())
    check_quantized_files(out, config, spec)

    model, _ = mlx_lm.load(str(out))
    model.set_dtype(mx.float32)  # bf16 scales/biases upcast exactly; packed weights untouched

    def forward(seq: list[int]) -> np.ndarray:
        logits = model(mx.array([seq]))[0].astype(mx.float32)
        return np.array(logits)

    src = json.loads((root / spec.source / "reference.json").read_text())
    info = {
        "reference": f"mlx-lm {mlx_lm.__version__}, float32",
        "architecture": src["architecture"],
        "source_fixture": spec.source,
        "seed": src["seed"],
        "quantization": config["quantization"],
    }
    return write_reference(out, forward, src["prompt_ids"], text_vocab(out), info)


def text_vocab(out: Path) -> int:
    """Number of ordinary tokens: the first id of an added (special) token."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    return min(tok.get_added_tokens_decoder())


def check_quantized_files(out: Path, config: dict[str, Any], spec: MLXSpec) -> None:
    """The quantized embedding (and every override) must really be in the files."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            names |= set(st.keys())
    for module in ["model.embed_tokens", *spec.overrides]:
        for part in ("weight", "scales", "biases"):
            assert f"{module}.{part}" in names, f"{spec.name}: {module}.{part} missing"
    for path in spec.overrides:
        assert path in config["quantization"], f"{spec.name}: no per-module entry for {path}"


# ---------------------------------------------------------------- reference outputs


def write_reference(
    out: Path,
    forward: Callable[[list[int]], np.ndarray],
    prompt: list[int],
    n_text: int,
    info: dict[str, Any],
) -> list[str]:
    """Greedy ids + one-pass logits + chat prompt; returns why they make a poor fixture, if so."""
    out_ids = greedy(forward, prompt)
    seq = prompt + out_ids[:-1]
    logits = forward(seq).astype(np.float32)
    assert logits.shape == (len(seq), VOCAB_SIZE), logits.shape
    # The one-pass logits must reproduce the step-by-step greedy choices.
    assert [int(i) for i in logits[len(prompt) - 1 :].argmax(-1)] == out_ids
    margin = min_margin(logits, len(prompt))
    np.save(out / "reference_logits.npy", logits)

    chat_text, chat_ids = render_chat(out)
    ref = info | {
        "prompt_text": PROMPT_TEXT,
        "prompt_ids": prompt,
        "greedy_ids": out_ids,
        "greedy_min_top2_margin": round(margin, 4),
        "logits_file": "reference_logits.npy",
        "logits_shape": list(logits.shape),
        "chat_messages": CHAT_MESSAGES,
        "chat_prompt_text": chat_text,
        "chat_prompt_ids": chat_ids,
    }
    write_json(out / "reference.json", ref)
    print(f"  {out.name}: prompt {len(prompt)} tokens, greedy {out_ids}, margin {margin:.3f}")
    return continuation_problems(logits, len(prompt), out_ids, n_text)


def render_chat(out: Path) -> tuple[str, list[int]]:
    """Chat prompt as transformers renders it; also checks it agrees with tokenizer.json."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(out)
    text = hf.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    enc = hf.apply_chat_template(CHAT_MESSAGES, tokenize=True, add_generation_prompt=True)
    ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert raw.encode(text, add_special_tokens=False).ids == ids, "transformers/tokenizers disagree"
    assert hf(PROMPT_TEXT)["input_ids"] == raw.encode(PROMPT_TEXT).ids
    return text, ids


# ---------------------------------------------------------------- main


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def quiet_progress_bars() -> None:
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    disable_progress_bars()
    logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output directory, e.g. tests/fixtures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    quiet_progress_bars()
    for spec in HF_SPECS:
        make_family(spec, [m for m in MLX_SPECS if m.source == spec.name], args.out)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
