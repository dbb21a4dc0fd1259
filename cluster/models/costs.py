"""What each part of a model costs in device memory, from tensor names and byte counts alone.

A remote node's manifest lists tensor names and sizes without the files, so `tensor_costs` works on that
mapping; `model_costs` adds reading a local directory's config.json and safetensors headers (no tensor data).
Weights count at their stored size, so MLX 4/8-bit packed weights with their scales and biases cost what
they take on disk.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from cluster.models.config import ModelConfig
from cluster.models.decoder import EMBED, FINAL_NORM, LAYER_MODULES, LM_HEAD
from cluster.partition import ModelCosts
from cluster.weights import Checkpoint, CheckpointError

# "model.layers.{i}.{module}.{leaf}" for the modules the decoder loads; anything else in a layer
# (e.g. a stored rotary_emb.inv_freq) is never read and costs nothing on the device
_LAYER_TENSOR = re.compile(
    r"model\.layers\.(\d+)\.(?:" + "|".join(re.escape(m) for m in LAYER_MODULES.values()) + r")\.[^.]+"
)


def kv_bytes_per_layer(cfg: ModelConfig, max_context: int, kv_itemsize: int = 2) -> int:
    """One session's keys and values of one layer at max_context positions."""
    return 2 * cfg.num_kv_heads * max_context * cfg.head_dim * kv_itemsize


def tensor_costs(
    cfg: ModelConfig,
    tensor_bytes: Mapping[str, int],
    *,
    max_context: int,
    kv_itemsize: int = 2,
    model_id: str,
) -> ModelCosts:
    """Per-layer, embedding and head bytes of a checkpoint given as tensor name -> stored bytes."""
    max_context = min(max_context, cfg.max_position_embeddings)  # as the engine caps it
    layers = [0] * cfg.num_layers
    embed = norm = lm_head = 0
    for name, n in tensor_bytes.items():
        if m := _LAYER_TENSOR.fullmatch(name):
            i = int(m.group(1))
            if i < cfg.num_layers:  # layers past num_hidden_layers (e.g. draft heads) are never loaded
                layers[i] += n
        elif name.startswith(EMBED + "."):  # .weight, plus .scales/.biases when MLX-quantized
            embed += n
        elif name.startswith(FINAL_NORM + "."):
            norm += n
        elif name.startswith(LM_HEAD + "."):
            lm_head += n
    missing = [i for i, b in enumerate(layers) if b == 0]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        raise CheckpointError(f"{model_id}: no tensors for layer(s) {shown} of {cfg.num_layers}")
    for what, n in ((f"{EMBED}.*", embed), (f"{FINAL_NORM}.*", norm)):
        if not n:
            raise CheckpointError(f"{model_id}: tensor {what} is missing")
    # the decoder builds a tied lm_head from the embedding table (any stored lm_head is not read)
    if cfg.tie_word_embeddings:
        head, shared = norm + embed, embed
    elif lm_head:
        head, shared = norm + lm_head, 0
    else:
        raise CheckpointError(f"{model_id}: tensor {LM_HEAD}.* is missing and the config does not tie embeddings")
    return ModelCosts(
        model_id=model_id,
        layer_bytes=tuple(layers),
        kv_bytes_per_layer=kv_bytes_per_layer(cfg, max_context, kv_itemsize),
        embed_bytes=embed,
        head_bytes=head,
        max_context=max_context,
        shared_bytes=shared,
    )


def model_costs(
    model_dir: str | Path, *, max_context: int, kv_itemsize: int = 2, model_id: str | None = None
) -> ModelCosts:
    """`tensor_costs` of a local model directory, read from config.json and the safetensors headers."""
    cfg = ModelConfig.from_dir(model_dir)
    tensors = Checkpoint(model_dir).tensors
    return tensor_costs(
        cfg,
        {name: info.nbytes for name, info in tensors.items()},
        max_context=max_context,
        kv_itemsize=kv_itemsize,
        model_id=model_id or Path(model_dir).resolve().name,
    )
