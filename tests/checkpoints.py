"""Deeper test checkpoints made from the committed fixtures: layer i of the copy is layer i % n of the fixture.

The cluster tests split layers 1:2:3, which needs 6 layers; the fixtures have 4. Tensors are copied byte for
byte (bf16, fp16 and MLX-packed alike) into one real safetensors file; the tokenizer and config come along.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

from cluster.weights import Checkpoint

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def deepen(src: Path, dst: Path, num_layers: int) -> Path:
    if (dst / "config.json").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    n = config["num_hidden_layers"]
    ckpt = Checkpoint(src)
    out: list[tuple[str, str]] = []  # (new name, source name)
    for name in sorted(ckpt.tensors):
        m = _LAYER.match(name)
        if m is None:
            out.append((name, name))
    for i in range(num_layers):
        for name in sorted(ckpt.tensors):
            m = _LAYER.match(name)
            if m is not None and int(m.group(1)) == i % n:
                out.append((f"model.layers.{i}.{m.group(2)}", name))
    header, offset = {}, 0
    for new, old in out:
        info = ckpt.info(old)
        header[new] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(dst / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, old in out:
            f.write(ckpt.read(ckpt.info(old)).tobytes())
    config["num_hidden_layers"] = num_layers
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src.iterdir():
        if extra.is_file() and not extra.name.endswith((".safetensors", ".json.index", ".npy")) and extra.suffix:
            if extra.name not in ("config.json", "model.safetensors.index.json", "reference.json"):
                shutil.copy(extra, dst / extra.name)
    return dst
