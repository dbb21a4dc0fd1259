"""Hugging Face config.json -> one frozen ModelConfig for the shared decoder.

Llama, Mistral, Qwen2 and Qwen3 dense models differ only in a few switches (q/k/v biases, q/k RMSNorm,
RoPE scaling, tied embeddings), so every supported architecture maps onto the same ModelConfig.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """config.json names an architecture or a value the engine does not support."""


# model_type -> (q/k/v bias default, q/k RMSNorm)
ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (True, False),
    "qwen3": (False, True),
}
_ARCH_CLASSES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class QuantSpec:
    """MLX affine quantization of one module: uint32 words of 32/bits values, per-group scale + bias."""

    group_size: int
    bits: int

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"quantization.bits={self.bits} is not supported (4 or 8)")
        if self.group_size <= 0:
            raise ConfigError(f"quantization.group_size={self.group_size} must be positive")


@dataclass(frozen=True)
class QuantConfig:
    default: QuantSpec
    # module path (e.g. "model.layers.0.mlp.down_proj") -> its own spec, or None when left unquantized
    overrides: dict[str, QuantSpec | None] = field(default_factory=dict)

    def for_module(self, path: str) -> QuantSpec | None:
        return self.overrides[path] if path in self.overrides else self.default


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    torch_dtype: str = "float32"
    quantization: QuantConfig | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: a model directory needs config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object, not {type(raw).__name__}")
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        arch = _architecture(raw)
        bias_default, qk_norm = ARCHITECTURES[arch]
        if raw.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ConfigError(f"hidden_act={raw['hidden_act']!r} is not supported (only 'silu')")
        for key in ("use_sliding_window",):
            if raw.get(key):
                raise ConfigError(f"{key}=true (sliding-window attention) is not supported")
        hidden, heads = _req(raw, "hidden_size"), _req(raw, "num_attention_heads")
        head_dim = _opt(raw, "head_dim", hidden // heads)
        if head_dim <= 0 or head_dim % 2:
            raise ConfigError(f"head_dim={head_dim} must be positive and even for RoPE")
        max_pos = _opt(raw, "max_position_embeddings", 4096)
        rms_norm_eps = float(raw.get("rms_norm_eps", 1e-6))
        if not rms_norm_eps > 0:
            raise ConfigError(f"field 'rms_norm_eps'={rms_norm_eps!r} must be positive")
        window = raw.get("sliding_window")
        if arch == "mistral" and window and window < max_pos:
            # Mistral v0.1 attends within a window; capping the context keeps every attention in-window.
            log.warning("sliding_window=%d: context capped at the window", window)
            max_pos = int(window)
        eos = raw.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=_req(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_req(raw, "intermediate_size"),
            num_layers=_req(raw, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=_opt(raw, "num_key_value_heads", heads),
            head_dim=head_dim,
            rms_norm_eps=rms_norm_eps,
            rope=_rope(raw),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", bias_default)),
            qk_norm=qk_norm,
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            quantization=_quantization(raw),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        )

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )


def _req(raw: dict[str, Any], key: str) -> int:
    if key not in raw:
        raise ConfigError(f"missing field {key!r}")
    value = raw[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"field {key!r}={value!r} must be a positive integer")
    return value


def _opt(raw: dict[str, Any], key: str, default: int) -> int:
    # optional positive integer: absent or null means the default (HF writes null for derived values)
    return default if raw.get(key) is None else _req(raw, key)


def _architecture(raw: dict[str, Any]) -> str:
    model_type = raw.get("model_type")
    if model_type in ARCHITECTURES:
        return str(model_type)
    for name in raw.get("architectures") or []:
        if name in _ARCH_CLASSES:
            return _ARCH_CLASSES[name]
    supported = ", ".join(sorted(ARCHITECTURES))
    found = model_type or raw.get("architectures")
    raise ConfigError(f"model_type={found!r} is not supported (supported: {supported})")


def _rope(raw: dict[str, Any]) -> RopeConfig:
    # Two forms in the wild: classic rope_theta + rope_scaling, and the newer rope_parameters dict.
    params = raw.get("rope_parameters")
    field_name = "rope_parameters"
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
        field_name = "rope_scaling"
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    elif "rope_theta" not in params and "rope_theta" in raw:
        params = {**params, "rope_theta": raw["rope_theta"]}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{field_name}.rope_type={rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    theta = float(params.get("rope_theta", 10000.0))
    if not math.isfinite(theta) or theta <= 0:
        raise ConfigError(f"{field_name}.rope_theta={theta!r} must be a positive number")
    factor = float(params.get("factor", 1.0))
    if rope_type != "default" and factor <= 0:
        raise ConfigError(f"{field_name}.factor={factor!r} must be positive")
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _quantization(raw: dict[str, Any]) -> QuantConfig | None:
    # mlx-lm writes "quantization" (and newer versions also "quantization_config"): group_size, bits and
    # per-module entries keyed by module path (a dict, or false for a module left in float).
    block = raw.get("quantization") or raw.get("quantization_config")
    if not block:
        return None
    if "quant_method" in block and block.get("quant_method") not in (None, "mlx", "affine"):
        raise ConfigError(f"quantization.quant_method={block['quant_method']!r} is not supported (MLX affine only)")
    if block.get("mode", "affine") != "affine":
        raise ConfigError(f"quantization.mode={block['mode']!r} is not supported (only 'affine')")
    try:
        default = QuantSpec(int(block["group_size"]), int(block["bits"]))
    except KeyError as e:
        raise ConfigError(f"quantization block is missing {e.args[0]!r}") from None
    overrides: dict[str, QuantSpec | None] = {}
    for key, value in block.items():
        if isinstance(value, dict):
            try:
                overrides[key] = QuantSpec(
                    int(value.get("group_size", default.group_size)), int(value.get("bits", default.bits))
                )
            except ConfigError as e:
                raise ConfigError(f"{e} (module {key!r})") from None
        elif value is False:
            overrides[key] = None
    return QuantConfig(default, overrides)
