"""Random-weight Hugging Face checkpoints of real model shapes, for timing only.

Weights are normal(0, 0.02) stored as bf16 in one safetensors file written by hand (numpy has no
bfloat16: the values go out as uint16 bit patterns under a "BF16" header entry), so building one needs
neither torch nor a download. A directory is reused while its config.json matches the preset.

`bits=4` (or 8) writes the MLX affine-quantized form of the same weights instead (what mlx-lm's convert
writes): every Linear weight of the layers and the embedding as uint32 words of 32/bits levels, least
significant first, with per-group `.scales` and `.biases` (bf16, one per `group_size` inputs); value =
q * scale + bias. The random draws are the same as the bf16 checkpoint's, so the quantized model is the
bf16 one quantized (group min/max: scale = (max - min) / (2^bits - 1), bias = min).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np

STD = 0.02
CHUNK = 1 << 24  # elements generated at a time: bounds the float32 scratch to 64 MiB
GROUP_SIZE = 64  # MLX's default quantization group

LLAMA3_ROPE = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

# preset -> the config.json keys that differ between presets
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
    },
    # same architecture at about 1/25 of the bytes: seconds to build and run
    "small": {
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 32000,
        "max_position_embeddings": 131072,
    },
    # a really tiny model: a decode step is mostly fixed per-step cost, so transport overheads show
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 512,
        "max_position_embeddings": 131072,
    },
}

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
CORPUS = [
    "The small river runs past the old mill, and the children sing by the water.",
    "In the morning the baker opens the shop and the smell of bread fills the street.",
    "Numbers like 2024, 3.14 and 1,000,000 appear in text too.",
]


def model_config(preset: str, bos: int, eos: int, bits: int = 16) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "initializer_range": STD,
        "mlp_bias": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        **PRESETS[preset],
    }
    if bits != 16:
        quant = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
        cfg |= {"quantization": quant, "quantization_config": dict(quant)}
    return cfg


def checkpoint_name(preset: str, bits: int = 16) -> str:
    """The directory (and so the cluster's model id) of a preset at a precision."""
    return preset if bits == 16 else f"{preset}-q{bits}"


def tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF Llama names and (out, in) shapes; tied embeddings, so no lm_head.weight."""
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (q, D),
            p + "self_attn.k_proj.weight": (kv, D),
            p + "self_attn.v_proj.weight": (kv, D),
            p + "self_attn.o_proj.weight": (D, q),
            p + "post_attention_layernorm.weight": (D,),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        }
    shapes["model.norm.weight"] = (D,)
    return shapes


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (what torch's cast does)."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def quantize(w: np.ndarray, bits: int, group_size: int = GROUP_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MLX affine quantization of rows w (rows, in) -> (packed uint32 (rows, in*bits/32), scales and biases as
    bf16 bits (rows, in/group_size)). Levels are computed against the bf16-rounded scale and bias, the values
    a reader sees."""
    rows, n = w.shape
    g = w.reshape(rows, n // group_size, group_size)
    lo, hi = g.min(-1), g.max(-1)  # (rows, groups)
    levels = (1 << bits) - 1
    scales, biases = to_bf16_bits((hi - lo) / levels), to_bf16_bits(lo)
    s, b = from_bf16_bits(scales)[..., None], from_bf16_bits(biases)[..., None]
    q = np.rint((g - b) / np.where(s == 0, 1, s)).clip(0, levels).astype(np.uint32)
    words = q.reshape(rows, n * bits // 32, 32 // bits)  # (rows, words, values per word)
    shifts = np.arange(32 // bits, dtype=np.uint32) * bits  # least significant value first
    packed = np.bitwise_or.reduce(words << shifts, axis=-1).astype(np.uint32)
    return packed, scales, biases


def tensor_entries(shapes: dict[str, tuple[int, ...]], bits: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """safetensors name -> (dtype, shape) as written: bf16 everywhere, or each 2-D weight (the layers' Linears
    and the embedding; norms stay bf16) as its packed words, scales and biases."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        if bits == 16 or len(shape) != 2:
            out[name] = ("BF16", shape)
            continue
        rows, n = shape
        base = name.removesuffix(".weight")
        out[name] = ("U32", (rows, n * bits // 32))
        out[base + ".scales"] = ("BF16", (rows, n // GROUP_SIZE))
        out[base + ".biases"] = ("BF16", (rows, n // GROUP_SIZE))
    return out


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], seed: int, bits: int = 16) -> None:
    entries = tensor_entries(shapes, bits)
    header: dict[str, Any] = {"__metadata__": {"format": "pt" if bits == 16 else "mlx"}}
    offset = 0
    for name, (dtype, shape) in entries.items():
        n = (4 if dtype == "U32" else 2) * int(np.prod(shape))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            size = int(np.prod(shape))
            if name.endswith("norm.weight"):  # RMSNorm gains start at one, as HF initialises them
                f.write(to_bf16_bits(np.ones(size, np.float32)).tobytes())
                continue
            if bits == 16:
                for start in range(0, size, CHUNK):
                    chunk = rng.standard_normal(min(CHUNK, size - start), dtype=np.float32) * STD
                    f.write(to_bf16_bits(chunk).tobytes())
                continue
            # whole rows at a time; the draws match the bf16 writer's whenever the row length divides CHUNK
            rows, n = shape
            step = max(1, CHUNK // n) * n
            scales, biases = [], []
            for start in range(0, size, step):
                chunk = rng.standard_normal(min(step, size - start), dtype=np.float32) * STD
                w = from_bf16_bits(to_bf16_bits(chunk)).reshape(-1, n)  # the bf16 checkpoint's values
                packed, s, b = quantize(w, bits)
                f.write(packed.tobytes())
                scales.append(s)
                biases.append(b)
            f.write(np.concatenate(scales).tobytes())  # header order: weight, scales, biases
            f.write(np.concatenate(biases).tobytes())


def write_tokenizer(out: Path) -> dict[str, int]:
    """A tiny byte-level BPE (tokens do not matter for timing); returns the special tokens' ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(str(out / "tokenizer.json"))
    cfg = {"bos_token": SPECIALS[0], "eos_token": SPECIALS[2], "tokenizer_class": "PreTrainedTokenizerFast"}
    write_json(out / "tokenizer_config.json", cfg)
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    return {s: i for s, i in ids.items() if i is not None}


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def is_current(out: Path, preset: str, bits: int = 16) -> bool:
    try:
        cfg = json.loads((out / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    want = model_config(preset, cfg.get("bos_token_id", 0), cfg.get("eos_token_id", 0), bits)
    return cfg == want and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def ensure_checkpoint(preset: str, cache_dir: Path, seed: int = 0, bits: int = 16) -> tuple[Path, bool]:
    """The preset's checkpoint directory, built unless a current one exists; (path, built).

    bits: 16 (bf16), or 4 / 8 for the MLX affine-quantized form of the same weights (group size 64)."""
    if bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, not {bits}")
    name = checkpoint_name(preset, bits)
    out = cache_dir / name
    if is_current(out, preset, bits):
        return out, False
    tmp = cache_dir / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ids = write_tokenizer(tmp)
    bos, eos, eot = (ids[s] for s in SPECIALS)
    cfg = model_config(preset, bos, eos, bits)
    write_safetensors(tmp / "model.safetensors", tensor_shapes(cfg), seed, bits)
    write_json(tmp / "generation_config.json", {"bos_token_id": bos, "eos_token_id": [eos, eot]})
    write_json(tmp / "config.json", cfg)  # last: its presence marks a complete directory
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a crash mid-build leaves only the .partial directory behind
    return out, True
