"""ModelConfig parsing of the committed fixtures' config.json, its errors, and the RoPE frequencies."""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any

import numpy as np
import pytest
from conftest import FIXTURES

from cluster.models.config import ConfigError, ModelConfig, QuantConfig, QuantSpec, RopeConfig
from cluster.models.decoder import rope_inv_freq


def raw_config(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name / "config.json").read_text())


def with_changes(name: str, **changes: Any) -> dict[str, Any]:
    """A fixture's config dict with keys replaced (a value of ... deletes the key)."""
    raw = copy.deepcopy(raw_config(name))
    for key, value in changes.items():
        if value is ...:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


# ------------------------------------------------------------------------------------------ fixtures
# name -> (architecture, head_dim, tied, attention_bias, qk_norm, rope type, rope theta, torch_dtype)
EXPECTED = {
    "llama32": ("llama", 16, True, False, False, "llama3", 500000.0, "bfloat16"),
    "mistral": ("mistral", 16, False, False, False, "default", 1e6, "float16"),
    "qwen2": ("qwen2", 16, True, True, False, "default", 1e6, "float32"),
    "qwen3": ("qwen3", 32, False, False, True, "default", 1e6, "bfloat16"),
    "llama32-4bit": ("llama", 16, True, False, False, "llama3", 500000.0, "bfloat16"),
    "llama32-8bit": ("llama", 16, True, False, False, "llama3", 500000.0, "bfloat16"),
    "qwen3-4bit-mixed": ("qwen3", 32, False, False, True, "default", 1e6, "bfloat16"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_fixture_configs(name):
    cfg = ModelConfig.from_dir(FIXTURES / name)
    arch, head_dim, tied, bias, qk_norm, rope_type, theta, dtype = EXPECTED[name]
    assert cfg.architecture == arch
    assert cfg.head_dim == head_dim
    assert cfg.tie_word_embeddings is tied
    assert cfg.attention_bias is bias
    assert cfg.qk_norm is qk_norm
    assert cfg.rope.rope_type == rope_type
    assert cfg.rope.theta == theta
    assert cfg.torch_dtype == dtype
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (512, 64, 128)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (4, 4, 2)
    assert cfg.max_position_embeddings == 2048
    assert cfg.bos_token_id == 400


def test_qwen3_head_dim_is_explicit():
    cfg = ModelConfig.from_dir(FIXTURES / "qwen3")
    assert cfg.head_dim == 32 != cfg.hidden_size // cfg.num_heads
    # without the explicit field it falls back to hidden / heads
    assert ModelConfig.from_dict(with_changes("qwen3", head_dim=...)).head_dim == 16
    assert ModelConfig.from_dict(with_changes("qwen3", head_dim=None)).head_dim == 16


def test_llama32_classic_rope_scaling():
    rope = ModelConfig.from_dir(FIXTURES / "llama32").rope
    assert rope == RopeConfig(
        theta=500000.0,
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )


def test_qwen3_rope_parameters():
    raw = raw_config("qwen3")
    assert "rope_parameters" in raw and "rope_theta" not in raw
    assert ModelConfig.from_dict(raw).rope == RopeConfig(theta=1e6, rope_type="default")


def test_eos_token_ids():
    assert ModelConfig.from_dir(FIXTURES / "llama32").eos_token_ids == (401,)
    assert ModelConfig.from_dir(FIXTURES / "llama32-4bit").eos_token_ids == (401, 404)
    assert ModelConfig.from_dict(with_changes("llama32", eos_token_id=None)).eos_token_ids == ()


def test_float_models_have_no_quantization():
    for name in ("llama32", "mistral", "qwen2", "qwen3"):
        assert ModelConfig.from_dir(FIXTURES / name).quantization is None


def test_quantization_uniform():
    q = ModelConfig.from_dir(FIXTURES / "llama32-4bit").quantization
    assert q == QuantConfig(QuantSpec(group_size=32, bits=4), {})
    assert q.for_module("model.layers.3.self_attn.q_proj") == QuantSpec(32, 4)
    q8 = ModelConfig.from_dir(FIXTURES / "llama32-8bit").quantization
    assert q8 is not None and q8.default == QuantSpec(64, 8)


def test_quantization_mixed_per_module():
    q = ModelConfig.from_dir(FIXTURES / "qwen3-4bit-mixed").quantization
    assert q is not None
    assert q.default == QuantSpec(64, 4)
    assert q.overrides == {"lm_head": QuantSpec(32, 8), "model.layers.0.mlp.down_proj": QuantSpec(32, 8)}
    assert q.for_module("lm_head") == QuantSpec(32, 8)
    assert q.for_module("model.layers.0.mlp.down_proj") == QuantSpec(32, 8)
    assert q.for_module("model.layers.1.mlp.down_proj") == QuantSpec(64, 4)
    assert q.for_module("model.embed_tokens") == QuantSpec(64, 4)


def test_quantization_module_left_in_float():
    block = {"group_size": 64, "bits": 4, "lm_head": False}
    q = ModelConfig.from_dict(with_changes("qwen3", quantization=block)).quantization
    assert q is not None and q.for_module("lm_head") is None


def test_quantization_config_key_alone():
    # newer mlx-lm versions may write only "quantization_config"
    raw = with_changes("llama32-4bit", quantization=...)
    q = ModelConfig.from_dict(raw).quantization
    assert q is not None and q.default == QuantSpec(32, 4)


def test_mistral_sliding_window_caps_context():
    cfg = ModelConfig.from_dict(with_changes("mistral", sliding_window=1024))
    assert cfg.max_position_embeddings == 1024
    # a window at least as long as the context changes nothing
    assert ModelConfig.from_dict(with_changes("mistral", sliding_window=4096)).max_position_embeddings == 2048


def test_num_kv_heads_defaults_to_heads():
    cfg = ModelConfig.from_dict(with_changes("llama32", num_key_value_heads=...))
    assert cfg.num_kv_heads == cfg.num_heads == 4


def test_architecture_from_class_name():
    cfg = ModelConfig.from_dict(with_changes("mistral", model_type=...))
    assert cfg.architecture == "mistral"


# ------------------------------------------------------------------------------------------ rope forms
LLAMA3_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


def test_rope_forms_agree_llama3():
    classic = with_changes("llama32", rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING))
    new = with_changes(
        "llama32",
        rope_theta=...,
        rope_scaling=...,
        rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0},
    )
    a, b = ModelConfig.from_dict(classic).rope, ModelConfig.from_dict(new).rope
    assert a == b == RopeConfig(500000.0, "llama3", 8.0, 1.0, 4.0, 8192)


def test_rope_forms_agree_linear():
    # the old "type" key and the newer "rope_type" key
    classic = with_changes("mistral", rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0})
    new = with_changes(
        "mistral",
        rope_theta=...,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    )
    a, b = ModelConfig.from_dict(classic).rope, ModelConfig.from_dict(new).rope
    assert a == b
    assert (a.rope_type, a.factor, a.theta) == ("linear", 2.0, 10000.0)


def test_rope_parameters_takes_top_level_theta():
    raw = with_changes("qwen3", rope_theta=250000.0, rope_parameters={"rope_type": "default"})
    assert ModelConfig.from_dict(raw).rope.theta == 250000.0


def test_rope_defaults_without_any_rope_fields():
    raw = with_changes("mistral", rope_theta=...)
    assert ModelConfig.from_dict(raw).rope == RopeConfig()


# ------------------------------------------------------------------------------------------ errors
def test_unsupported_model_type():
    raw = with_changes("llama32", model_type="gemma2", architectures=["Gemma2ForCausalLM"])
    with pytest.raises(ConfigError, match=r"model_type='gemma2' is not supported \(supported: llama, mistral"):
        ModelConfig.from_dict(raw)


def test_unknown_architecture_without_model_type():
    raw = with_changes("llama32", model_type=..., architectures=["MambaForCausalLM"])
    with pytest.raises(ConfigError, match=r"MambaForCausalLM.*is not supported"):
        ModelConfig.from_dict(raw)


def test_rope_yarn_classic_form():
    raw = with_changes("llama32", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match=r"rope_scaling\.rope_type='yarn' is not supported"):
        ModelConfig.from_dict(raw)


def test_rope_yarn_old_type_key():
    raw = with_changes("llama32", rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match=r"rope_scaling\.rope_type='yarn'"):
        ModelConfig.from_dict(raw)


def test_rope_yarn_parameters_form():
    raw = with_changes("qwen3", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6})
    with pytest.raises(ConfigError, match=r"rope_parameters\.rope_type='yarn' is not supported"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("theta", [0, -1.0, float("inf")])
def test_rope_theta_must_be_positive(theta):
    raw = with_changes("qwen3", rope_parameters={"rope_type": "default", "rope_theta": theta})
    with pytest.raises(ConfigError, match=r"rope_parameters\.rope_theta=.* must be a positive number"):
        ModelConfig.from_dict(raw)


def test_rope_factor_must_be_positive():
    raw = with_changes("llama32", rope_scaling={**LLAMA3_SCALING, "factor": 0})
    with pytest.raises(ConfigError, match=r"rope_scaling\.factor=0\.0 must be positive"):
        ModelConfig.from_dict(raw)


def test_hidden_act_gelu():
    with pytest.raises(ConfigError, match=r"hidden_act='gelu' is not supported"):
        ModelConfig.from_dict(with_changes("llama32", hidden_act="gelu"))


def test_sliding_window_attention_rejected():
    with pytest.raises(ConfigError, match=r"use_sliding_window=true"):
        ModelConfig.from_dict(with_changes("qwen2", use_sliding_window=True))


def test_heads_not_multiple_of_kv_heads():
    raw = with_changes("llama32", num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ConfigError, match=r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize(
    "key", ["hidden_size", "vocab_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
)
def test_missing_required_field(key):
    with pytest.raises(ConfigError, match=f"missing field '{key}'"):
        ModelConfig.from_dict(with_changes("llama32", **{key: ...}))


@pytest.mark.parametrize(
    "key",
    [
        "hidden_size",
        "vocab_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
    ],
)
@pytest.mark.parametrize("value", [0, -4, 2.5, "64", True])
def test_non_positive_or_non_integer_field(key, value):
    with pytest.raises(ConfigError, match=rf"field '{key}'={re.escape(repr(value))} must be a positive integer"):
        ModelConfig.from_dict(with_changes("llama32", **{key: value}))


def test_head_dim_from_too_many_heads():
    # hidden 64 / 128 heads -> head_dim 0: nothing to rotate
    raw = with_changes("llama32", head_dim=..., num_attention_heads=128, num_key_value_heads=128)
    with pytest.raises(ConfigError, match=r"head_dim=0 must be positive and even"):
        ModelConfig.from_dict(raw)


def test_odd_head_dim():
    with pytest.raises(ConfigError, match=r"head_dim=15 must be positive and even"):
        ModelConfig.from_dict(with_changes("llama32", head_dim=15))


@pytest.mark.parametrize("eps", [0, -1e-5])
def test_rms_norm_eps_must_be_positive(eps):
    with pytest.raises(ConfigError, match=r"field 'rms_norm_eps'=.* must be positive"):
        ModelConfig.from_dict(with_changes("llama32", rms_norm_eps=eps))


def test_quantization_bits_3():
    block = {"group_size": 64, "bits": 3, "mode": "affine"}
    with pytest.raises(ConfigError, match=r"quantization\.bits=3 is not supported \(4 or 8\)"):
        ModelConfig.from_dict(with_changes("llama32-4bit", quantization=block, quantization_config=block))


def test_quantization_override_bits_3_names_module():
    block = {"group_size": 64, "bits": 4, "lm_head": {"group_size": 32, "bits": 3}}
    with pytest.raises(ConfigError, match=r"quantization\.bits=3 is not supported.*module 'lm_head'"):
        ModelConfig.from_dict(with_changes("qwen3", quantization=block))


def test_quantization_group_size_zero():
    block = {"group_size": 0, "bits": 4}
    with pytest.raises(ConfigError, match=r"quantization\.group_size=0 must be positive"):
        ModelConfig.from_dict(with_changes("qwen3", quantization=block))


def test_quantization_missing_bits():
    with pytest.raises(ConfigError, match=r"quantization block is missing 'bits'"):
        ModelConfig.from_dict(with_changes("qwen3", quantization={"group_size": 64}))


def test_quantization_other_mode():
    block = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    with pytest.raises(ConfigError, match=r"quantization\.mode='mxfp4' is not supported"):
        ModelConfig.from_dict(with_changes("qwen3", quantization=block))


def test_quantization_other_method():
    block = {"quant_method": "gptq", "group_size": 128, "bits": 4}
    with pytest.raises(ConfigError, match=r"quantization\.quant_method='gptq' is not supported"):
        ModelConfig.from_dict(with_changes("qwen3", quantization_config=block))


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError, match=rf"{re.escape(str(tmp_path / 'config.json'))} not found"):
        ModelConfig.from_dir(tmp_path)


def test_invalid_json_names_path(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ConfigError, match=rf"{re.escape(str(tmp_path / 'config.json'))} is not valid JSON"):
        ModelConfig.from_dir(tmp_path)


def test_json_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(tmp_path / 'config.json'))} must hold a JSON object"):
        ModelConfig.from_dir(tmp_path)


def test_from_dir_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(with_changes("llama32", hidden_act="gelu")))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'config.json'))}: hidden_act='gelu'"):
        ModelConfig.from_dir(tmp_path)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------------------------ rope_inv_freq
def llama31_inv_freq(head_dim: int, theta: float, factor: float, low: float, high: float, old: int) -> np.ndarray:
    """Meta's Llama 3.1 `apply_scaling`, one frequency at a time, in float64."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:  # high frequency: unchanged
            out.append(freq)
        elif wavelen > old / low:  # low frequency: divided by the factor
            out.append(freq / factor)
        else:  # in between: interpolate smoothly
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


@pytest.mark.parametrize(
    "head_dim, theta, factor, low, high, old",
    [
        (128, 500000.0, 8.0, 1.0, 4.0, 8192),  # Llama 3.1 8B
        (64, 500000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2 1B
        (16, 500000.0, 32.0, 1.0, 4.0, 8192),  # the llama32 fixture
        (128, 10000.0, 4.0, 2.0, 8.0, 4096),
    ],
)
def test_rope_inv_freq_llama3(head_dim, theta, factor, low, high, old):
    rope = RopeConfig(theta, "llama3", factor, low, high, old)
    got = rope_inv_freq(head_dim, rope)
    want = llama31_inv_freq(head_dim, theta, factor, low, high, old)
    assert got.dtype == np.float32 and got.shape == (head_dim // 2,)
    np.testing.assert_allclose(got, want, rtol=2e-6)


def test_rope_inv_freq_llama3_covers_all_three_bands():
    # the Llama 3.1 parameters put frequencies in every band, so the comparison above tests each branch
    old, low, high = 8192, 1.0, 4.0
    base = 1.0 / 500000.0 ** (np.arange(0, 128, 2, dtype=np.float64) / 128)
    wavelen = 2 * math.pi / base
    assert (wavelen < old / high).any() and (wavelen > old / low).any()
    assert ((wavelen >= old / high) & (wavelen <= old / low)).any()


def test_rope_inv_freq_default_and_linear():
    default = rope_inv_freq(64, RopeConfig(theta=10000.0))
    want = 1.0 / 10000.0 ** (np.arange(0, 64, 2, dtype=np.float64) / 64)
    np.testing.assert_allclose(default, want, rtol=2e-6)
    linear = rope_inv_freq(64, RopeConfig(theta=10000.0, rope_type="linear", factor=4.0))
    np.testing.assert_allclose(linear, default / 4.0, rtol=1e-7)
