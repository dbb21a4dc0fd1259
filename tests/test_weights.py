"""safetensors checkpoints: headers, sharded files, errors that name the file and tensor, bf16 decoding,
and a shard that reads (and keeps in memory) only its own tensors."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES
from safetensors import safe_open
from safetensors.numpy import save_file
from tinygrad import GlobalCounters, Tensor, dtypes

from cluster.models.config import ModelConfig
from cluster.models.decoder import CPU_NARROW_ROW_BLOCK, Linear, QuantLinear, load_shard
from cluster.weights import Checkpoint, CheckpointError, read_header, row_blocked

ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "I64": 8, "U8": 1, "I8": 1}


# ------------------------------------------------------------------------------------------ helpers


def loaded(ckpt: Checkpoint, *args) -> np.ndarray:
    """Load one tensor the way a shard does (placeholder, then materialize) and return its values."""
    t = ckpt.load(*args)
    ckpt.materialize()
    return t.numpy()


def read_raw(path: Path) -> tuple[dict[str, tuple[str, list[int], bytes]], dict | None]:
    """A safetensors file parsed by hand: name -> (dtype, shape, raw bytes), and its __metadata__."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    body = data[8 + n :]
    tensors = {
        k: (v["dtype"], v["shape"], body[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in header.items()
    }
    return tensors, meta


def write_raw(path: Path, tensors: dict[str, tuple[str, list[int], bytes]], meta: dict | None = None) -> None:
    """Write a safetensors file by hand (any dtype, bf16 included)."""
    header: dict = {"__metadata__": meta} if meta else {}
    offset = 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(raw for _, _, raw in tensors.values()))


def copy_fixture(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def header_nbytes(model_dir: Path) -> dict[str, int]:
    """name -> bytes, from the safetensors library's own header parsing."""
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "np") as s:
            for k in s.keys():
                sl = s.get_slice(k)
                out[k] = ITEMSIZE[sl.get_dtype()] * int(np.prod(sl.get_shape(), dtype=np.int64))
    return out


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def shard_of(name: str, start: int, end: int, model_dir: Path | None = None):
    d = model_dir or FIXTURES / name
    ckpt = Checkpoint(d)
    shard = load_shard(ModelConfig.from_dir(d), ckpt, start, end, "CPU", dtypes.float32)
    ckpt.materialize()
    return shard


# ------------------------------------------------------------------------------------------ headers
@pytest.mark.parametrize("name", ["llama32", "mistral", "qwen3", "qwen3-4bit-mixed"])
def test_read_header_agrees_with_safetensors(name):
    for f in sorted((FIXTURES / name).glob("*.safetensors")):
        infos = read_header(f)
        with safe_open(str(f), "np") as s:
            assert set(infos) == set(s.keys())
            for k in s.keys():
                sl = s.get_slice(k)
                assert (infos[k].dtype, list(infos[k].shape), infos[k].file) == (
                    sl.get_dtype(),
                    sl.get_shape(),
                    f,
                )


def test_sharded_checkpoint_follows_index():
    d = FIXTURES / "mistral"
    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    ckpt = Checkpoint(d)
    assert [f.name for f in ckpt.files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert set(ckpt.tensors) == set(weight_map)
    for name, file in weight_map.items():
        assert name in ckpt
        assert ckpt.info(name).file == d / file
    assert ckpt.nbytes(weight_map) == sum(header_nbytes(d).values())


def test_sharded_checkpoint_loads_from_each_file():
    d = FIXTURES / "mistral"
    ckpt = Checkpoint(d)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        with safe_open(str(ckpt.info(name).file), "np") as s:
            want = s.get_tensor(name).astype(np.float32)  # fp16 file
        np.testing.assert_array_equal(loaded(ckpt, name, "CPU", dtypes.float32), want)


# ------------------------------------------------------------------------------------------ bf16 / dtypes
def test_bf16_matches_numpy_bits(tmp_path):
    special = [
        0x3F80,
        0xC020,
        0x0000,
        0x8000,
        0x0001,
        0x8001,
        0x007F,
        0x0080,
        0x7F7F,
        0xFF7F,
        0x7F80,
        0xFF80,
        0x7FC0,
    ]
    rng = np.random.default_rng(1)
    bits = np.concatenate([np.array(special, np.uint16), rng.integers(0, 2**16, 3 * 64 - len(special), np.uint16)])
    bits = bits.reshape(3, 64)
    write_raw(tmp_path / "model.safetensors", {"w": ("BF16", [3, 64], bits.tobytes())})
    got = loaded(Checkpoint(tmp_path), "w", "CPU")
    want = bf16_to_f32(bits)
    assert got.dtype == np.float32 and got.shape == (3, 64)
    # bit-exact, NaN payloads and subnormals included
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert got[0, 0] == 1.0 and got[0, 1] == -2.5 and np.isinf(got[0, 10]) and np.isnan(got[0, 12])


def test_bf16_fixture_matches_numpy():
    d = FIXTURES / "llama32"
    tensors, _ = read_raw(d / "model.safetensors")
    dtype, shape, raw = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert dtype == "BF16"
    want = bf16_to_f32(np.frombuffer(raw, np.uint16)).reshape(shape)
    got = loaded(Checkpoint(d), "model.layers.0.self_attn.q_proj.weight", "CPU", dtypes.float32, shape)
    np.testing.assert_array_equal(got, want)


def test_stacked_rows_are_the_tensors_in_order_and_mismatches_are_refused(tmp_path):
    """load_rows (a layer's q, k and v as one weight on GPUs): the rows of each tensor, in the order named, read
    exactly as load reads each alone; tensors of another dtype or width are refused by name."""
    d = FIXTURES / "llama32"
    names = [f"model.layers.0.self_attn.{p}_proj.weight" for p in ("q", "k", "v")]
    ckpt = Checkpoint(d)
    stacked = ckpt.load_rows(names, "CPU", dtypes.float32)
    ckpt.materialize()
    parts = [loaded(Checkpoint(d), n, "CPU", dtypes.float32) for n in names]
    np.testing.assert_array_equal(stacked.numpy(), np.concatenate(parts))
    bits = Checkpoint(d).load_rows(names[:2], "CPU", raw=True)  # bf16 kept as its bits
    assert bits.dtype == dtypes.uint16 and bits.shape == (parts[0].shape[0] + parts[1].shape[0], parts[0].shape[1])
    with pytest.raises(CheckpointError, match="does not stack"):
        Checkpoint(d).load_rows([names[0], "model.layers.0.mlp.down_proj.weight"], "CPU")  # another width


def test_float_dtypes_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {
        "f32": rng.standard_normal((4, 8)).astype(np.float32),
        "f16": rng.standard_normal((8,)).astype(np.float16),
        "u32": rng.integers(0, 2**32, (2, 4), dtype=np.uint32),
    }
    save_file(arrays, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    np.testing.assert_array_equal(loaded(ckpt, "f32", "CPU"), arrays["f32"])
    np.testing.assert_array_equal(loaded(ckpt, "f16", "CPU", dtypes.float32), arrays["f16"].astype(np.float32))
    np.testing.assert_array_equal(loaded(ckpt, "u32", "CPU", dtypes.uint32), arrays["u32"])


@pytest.mark.parametrize("shape", [[], [0, 4], [3, 0]])
def test_scalars_and_empty_tensors_load(tmp_path, shape):
    bits = np.full(shape, 0x3F80, np.uint16)  # bf16 1.0
    write_raw(tmp_path / "model.safetensors", {"w": ("BF16", shape, bits.tobytes())})
    for dtype in (dtypes.float32, dtypes.float16):
        got = loaded(Checkpoint(tmp_path), "w", "CPU", dtype)
        assert got.shape == tuple(shape) and (got == 1.0).all()


@pytest.mark.parametrize("raw", [False, True])
def test_row_block_interleaves_rows_and_row_blocked_undoes_it(tmp_path, raw):
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**16, (8, 6), dtype=np.uint16) & 0x7F7F  # finite bf16 values
    write_raw(tmp_path / "model.safetensors", {"w": ("BF16", [8, 6], bits.tobytes())})
    ckpt = Checkpoint(tmp_path)
    t = ckpt.load("w", "CPU", row_block=4, raw=raw)
    ckpt.materialize()
    stored = bits if raw else bf16_to_f32(bits)
    assert t.shape == (2, 6, 4)
    # element [b, k, r] is row 4b + r, column k
    np.testing.assert_array_equal(t.numpy(), stored.reshape(2, 4, 6).transpose(0, 2, 1))
    np.testing.assert_array_equal(row_blocked(t).numpy(), stored)
    with pytest.raises(ValueError, match="do not split into blocks of 3"):
        ckpt.load("w", "CPU", row_block=3)
    write_raw(tmp_path / "model.safetensors", {"v": ("BF16", [8], bits.reshape(-1)[:8].tobytes())})
    with pytest.raises(ValueError, match="needs a 2-D tensor"):
        Checkpoint(tmp_path).load("v", "CPU", row_block=4)


def test_loads_are_laid_out_on_the_host_and_written_into_the_device_buffer(tmp_path):
    """Stored bytes, bf16 widened, rows interleaved, tensors stacked: numpy lays them out and they are written into
    the device buffer without a tinygrad kernel (none to schedule or compile). Reference: numpy (the widened bits)."""
    rng = np.random.default_rng(4)
    bits = rng.integers(0, 2**16, (3, 8, 6), dtype=np.uint16) & 0x3FFF  # finite bf16 values
    words = rng.integers(0, 2**32, (8, 2), dtype=np.uint32)
    tensors = {f"w{i}": ("BF16", [8, 6], bits[i].tobytes()) for i in range(3)}
    write_raw(tmp_path / "model.safetensors", {**tensors, "q": ("U32", [8, 2], words.tobytes())})
    ckpt = Checkpoint(tmp_path)
    raw_blocked = ckpt.load("w0", "CPU", raw=True, row_block=4)
    widened_blocked = ckpt.load("w1", "CPU", row_block=2)
    stacked = ckpt.load_rows(["w0", "w1", "w2"], "CPU")
    stacked_bits = ckpt.load_rows(["w2", "w0"], "CPU", raw=True)
    quant = ckpt.load("q", "CPU", row_block=4)
    kernels = GlobalCounters.kernel_count
    ckpt.materialize()
    assert GlobalCounters.kernel_count == kernels
    widened = bf16_to_f32(bits)
    np.testing.assert_array_equal(raw_blocked.numpy(), bits[0].reshape(2, 4, 6).transpose(0, 2, 1))
    np.testing.assert_array_equal(widened_blocked.numpy(), widened[1].reshape(4, 2, 6).transpose(0, 2, 1))
    np.testing.assert_array_equal(stacked.numpy(), widened.reshape(24, 6))
    np.testing.assert_array_equal(stacked_bits.numpy(), np.concatenate([bits[2], bits[0]]))
    np.testing.assert_array_equal(quant.numpy(), words.reshape(2, 4, 2).transpose(0, 2, 1))


def test_float16_loads_round_as_the_device_casts(tmp_path):
    """bf16 and float32 checkpoints computed in float16 are rounded on the host; the reference is tinygrad's own cast
    on the device, over normal values, values that become float16 subnormals (rounded), ties and overflows."""
    rng = np.random.default_rng(5)
    scales = np.array([1e-9, 1e-7, 3e-6, 6e-5, 1e-2, 1.0, 300.0, 7e4], np.float32)
    values = (rng.standard_normal((8, 64)).astype(np.float32) * scales[:, None]).astype(np.float32)
    values[0, :4] = [2049.0, 2051.0, 65520.0, -65519.0]  # ties to even, overflow to inf, largest finite
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    write_raw(
        tmp_path / "model.safetensors",
        {"b": ("BF16", [8, 64], bits.tobytes()), "f": ("F32", [8, 64], values.tobytes())},
    )
    ckpt = Checkpoint(tmp_path)
    from_bf16 = ckpt.load("b", "CPU", dtypes.float16)
    from_f32 = ckpt.load_rows(["f", "f"], "CPU", dtypes.float16)
    kernels = GlobalCounters.kernel_count
    ckpt.materialize()
    assert GlobalCounters.kernel_count == kernels
    device = {
        "b": Tensor(bf16_to_f32(bits), device="CPU").cast(dtypes.float16).numpy(),
        "f": Tensor(values, device="CPU").cast(dtypes.float16).numpy(),
    }
    np.testing.assert_array_equal(from_bf16.numpy().view(np.uint16), device["b"].view(np.uint16))
    np.testing.assert_array_equal(from_f32.numpy().view(np.uint16), np.concatenate([device["f"]] * 2).view(np.uint16))
    assert np.isinf(from_f32.numpy()[0, 2]) and (from_bf16.numpy()[:3] != 0).any()


def test_other_casts_run_on_the_device(tmp_path):
    ints = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    write_raw(tmp_path / "model.safetensors", {"i": ("I32", [3, 4], ints.tobytes())})
    ckpt = Checkpoint(tmp_path)
    as_float = ckpt.load("i", "CPU", dtypes.float32)
    kernels = GlobalCounters.kernel_count
    ckpt.materialize()
    assert GlobalCounters.kernel_count > kernels
    np.testing.assert_array_equal(as_float.numpy(), ints.astype(np.float32))


def test_file_cut_after_its_header_was_read_names_file_and_tensor(tmp_path):
    write_raw(tmp_path / "model.safetensors", {"w": ("F32", [4, 4], np.ones((4, 4), np.float32).tobytes())})
    ckpt = Checkpoint(tmp_path)
    ckpt.load("w", "CPU")
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(f))}: truncated while reading tensor 'w'"):
        ckpt.materialize()


# ------------------------------------------------------------------------------------------ errors
def test_missing_tensor_names_tensor_and_file(tmp_path):
    d = copy_fixture("llama32", tmp_path)
    tensors, meta = read_raw(d / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    write_raw(d / "model.safetensors", tensors, meta)
    # a shard that does not need the tensor loads fine
    assert len(shard_of("llama32", 0, 2, d).blocks) == 2
    pattern = r"tensor 'model\.layers\.2\.mlp\.up_proj\.weight' is missing .*model\.safetensors"
    with pytest.raises(CheckpointError, match=pattern):
        shard_of("llama32", 2, 4, d)
    from cluster.engine.shard import ShardEngine

    with pytest.raises(CheckpointError, match=pattern):
        ShardEngine(d, 1, 3, device="CPU", max_context=16, prefill_buckets=(2, 4))


def test_missing_tensor_in_sharded_checkpoint_names_index_file(tmp_path):
    d = copy_fixture("mistral", tmp_path)
    f = d / "model-00002-of-00003.safetensors"
    tensors, meta = read_raw(f)
    del tensors["model.layers.2.self_attn.o_proj.weight"]
    write_raw(f, tensors, meta)
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model\.layers\.2\.self_attn\.o_proj\.weight' is missing "
        r".*model-00002-of-00003\.safetensors",
    ):
        shard_of("mistral", 0, 4, d)


def test_wrong_shape_names_tensor_file_and_both_shapes(tmp_path):
    d = copy_fixture("llama32", tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors, meta = read_raw(d / "model.safetensors")
    dtype, shape, raw = tensors[name]
    assert shape == [32, 64]
    tensors[name] = (dtype, [16, 64], raw[: len(raw) // 2])
    write_raw(d / "model.safetensors", tensors, meta)
    pattern = (
        rf"{re.escape(str(d / 'model.safetensors'))}: tensor '{re.escape(name)}' has shape \[16, 64\], "
        r"the config needs \[32, 64\]"
    )
    with pytest.raises(CheckpointError, match=pattern):
        shard_of("llama32", 0, 4, d)


def test_truncated_file_names_file_and_tensor(tmp_path):
    d = copy_fixture("llama32", tmp_path)
    f = d / "model.safetensors"
    header = read_header(f)
    # the tensor stored last is the one the cut reaches
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        raw_header = json.loads(fh.read(n))
    last = max((k for k in raw_header if k != "__metadata__"), key=lambda k: raw_header[k]["data_offsets"][1])
    assert last in header
    f.write_bytes(f.read_bytes()[:-10])
    pattern = rf"{re.escape(str(f))}: truncated: tensor '{re.escape(last)}' ends at byte"
    with pytest.raises(CheckpointError, match=pattern):
        read_header(f)
    with pytest.raises(CheckpointError, match=pattern):
        Checkpoint(d)


def test_file_shorter_than_header_prefix(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(f))}: truncated \(no safetensors header\)"):
        Checkpoint(tmp_path)


def test_garbage_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(f))}: corrupt header length \d+ \(file has 4096 bytes\)"
    ):
        read_header(f)


def test_header_length_past_end_of_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 1000) + b'{"a": 1}')
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(f))}: corrupt header length 1000 \(file has 16 bytes\)"
    ):
        read_header(f)


@pytest.mark.parametrize("header", [b'{"w": {"dtype": "F32", ', b"\xff\xfe\xfd\xfc garbage", b""])
def test_header_not_json(tmp_path, header):
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(f))}: corrupt safetensors header"):
        read_header(f)


def test_header_json_not_an_object(tmp_path):
    f = tmp_path / "model.safetensors"
    header = b"[1, 2, 3]"
    f.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(f))}: corrupt safetensors header \(not a JSON object\)"
    ):
        read_header(f)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"dtype": "F32", "shape": [2]}, r"tensor 'w' has a malformed header entry"),
        (
            {"dtype": "F32", "shape": [2], "data_offsets": ["a", "b"]},
            r"tensor 'w' has a malformed header entry",
        ),
        (
            {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]},
            r"tensor 'w' has a malformed header entry",
        ),
        (
            {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]},
            r"tensor 'w' has unsupported dtype F8_E4M3",
        ),
        (
            {"dtype": "F32", "shape": [2], "data_offsets": [0, 6]},
            r"tensor 'w' spans 6 bytes, its shape needs 8",
        ),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}, r"truncated: tensor 'w' ends at byte 16"),
    ],
)
def test_bad_header_entries(tmp_path, entry, message):
    f = tmp_path / "model.safetensors"
    header = json.dumps({"w": entry}).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(f))}: {message}"):
        read_header(f)


def test_index_names_missing_file(tmp_path):
    d = copy_fixture("mistral", tmp_path)
    (d / "model-00002-of-00003.safetensors").unlink()
    index = re.escape(str(d / "model.safetensors.index.json"))
    pattern = rf"{index} names model-00002-of-00003\.safetensors, which is missing"
    with pytest.raises(CheckpointError, match=pattern):
        Checkpoint(d)


@pytest.mark.parametrize("text", ["{not json", '{"metadata": {}}', '{"weight_map": [1]}', "[]"])
def test_corrupt_index(tmp_path, text):
    d = copy_fixture("mistral", tmp_path)
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(d / 'model.safetensors.index.json'))}: corrupt index"):
        Checkpoint(d)


def test_dir_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tmp_path))}: no \*\.safetensors files"):
        Checkpoint(tmp_path)


def test_quantized_weights_without_quantization_config(tmp_path):
    d = copy_fixture("llama32-4bit", tmp_path)
    raw = json.loads((d / "config.json").read_text())
    del raw["quantization"], raw["quantization_config"]
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj is quantized but config\.json has no"
    ):
        shard_of("llama32-4bit", 0, 1, d)


def test_quantization_bits_disagree_with_file(tmp_path):
    # config says 8-bit, the file holds 4-bit words: the packed weight has the wrong shape
    d = copy_fixture("llama32-4bit", tmp_path)
    raw = json.loads((d / "config.json").read_text())
    raw["quantization"] = raw["quantization_config"] = {"group_size": 32, "bits": 8}
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model\.layers\.1\.self_attn\.q_proj\.weight' has shape \[64, 8\], "
        r"the config needs \[64, 16\]",
    ):
        shard_of("llama32-4bit", 1, 2, d)


def test_group_size_must_divide_input(tmp_path):
    d = copy_fixture("llama32-4bit", tmp_path)
    raw = json.loads((d / "config.json").read_text())
    raw["quantization"] = raw["quantization_config"] = {"group_size": 48, "bits": 4}
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"self_attn\.q_proj: input size 64 is not a multiple of group_size 48"):
        shard_of("llama32-4bit", 1, 2, d)


def test_layer_range_outside_model():
    with pytest.raises(ValueError, match=r"layer range \[2, 5\) is outside the model's 4 layers"):
        shard_of("llama32", 2, 5)
    with pytest.raises(ValueError, match=r"layer range \[2, 2\)"):
        shard_of("llama32", 2, 2)


# ------------------------------------------------------------------------------------------ shard contents
def layer_names(all_names, start: int, end: int) -> set[str]:
    return {n for n in all_names if any(n.startswith(f"model.layers.{i}.") for i in range(start, end))}


@pytest.mark.parametrize("name", ["llama32", "mistral", "qwen2", "qwen3", "qwen3-4bit-mixed"])
def test_middle_shard_reads_only_its_layers(name):
    sizes = header_nbytes(FIXTURES / name)
    own = layer_names(sizes, 1, 3)
    shard = shard_of(name, 1, 3)
    assert shard.embed is None and shard.lm_head is None and shard.norm is None
    assert shard.weight_bytes == sum(sizes[n] for n in own)
    assert len(shard.params()) == len(own)


def test_first_shard_has_embedding_but_no_head():
    sizes = header_nbytes(FIXTURES / "mistral")
    shard = shard_of("mistral", 0, 2)
    assert shard.is_first and not shard.is_last
    assert shard.embed is not None and shard.lm_head is None and shard.norm is None
    assert shard.weight_bytes == sum(sizes[n] for n in layer_names(sizes, 0, 2)) + sizes["model.embed_tokens.weight"]


def test_last_shard_untied_has_lm_head():
    sizes = header_nbytes(FIXTURES / "mistral")
    shard = shard_of("mistral", 2, 4)
    assert shard.embed is None and shard.lm_head is not None and shard.norm is not None
    extra = sizes["model.norm.weight"] + sizes["lm_head.weight"]
    assert shard.weight_bytes == sum(sizes[n] for n in layer_names(sizes, 2, 4)) + extra


def test_last_shard_tied_uses_embedding_as_lm_head():
    d = FIXTURES / "llama32"
    sizes = header_nbytes(d)
    assert "lm_head.weight" not in sizes
    shard = shard_of("llama32", 2, 4)
    assert shard.embed is None and shard.lm_head is not None and shard.norm is not None
    extra = sizes["model.norm.weight"] + sizes["model.embed_tokens.weight"]
    assert shard.weight_bytes == sum(sizes[n] for n in layer_names(sizes, 2, 4)) + extra
    tensors, _ = read_raw(d / "model.safetensors")
    _, shape, raw = tensors["model.embed_tokens.weight"]
    embed = bf16_to_f32(np.frombuffer(raw, np.uint16)).reshape(shape)
    # kept as stored (bf16 bits), rows interleaved in blocks of 8 on CPU, widened exactly in the kernels
    assert shard.lm_head.weight.dtype == dtypes.uint16
    assert isinstance(shard.lm_head, Linear) and shard.lm_head.row_blocked
    assert shard.lm_head.weight.shape == (shape[0] // CPU_NARROW_ROW_BLOCK, shape[1], CPU_NARROW_ROW_BLOCK)
    np.testing.assert_array_equal(shard.lm_head.widen(shard.lm_head.matrix()).numpy(), embed)


def test_single_shard_tied_counts_embedding_once():
    sizes = header_nbytes(FIXTURES / "llama32")
    shard = shard_of("llama32", 0, 4)
    assert shard.weight_bytes == sum(sizes.values())
    assert shard.lm_head is shard.embed


def test_quantized_tied_last_shard():
    sizes = header_nbytes(FIXTURES / "llama32-4bit")
    shard = shard_of("llama32-4bit", 3, 4)
    assert isinstance(shard.lm_head, QuantLinear) and shard.embed is None
    embed = {n for n in sizes if n.startswith("model.embed_tokens.")}
    assert embed == {f"model.embed_tokens.{p}" for p in ("weight", "scales", "biases")}
    own = layer_names(sizes, 3, 4) | embed | {"model.norm.weight"}
    assert shard.weight_bytes == sum(sizes[n] for n in own)


# ------------------------------------------------------------------------------------------ memory
D, F, LAYERS, VOCAB, HEADS, KV_HEADS = 1024, 4096, 8, 8192, 16, 4


def llama_shapes() -> dict[str, tuple[int, ...]]:
    hd = D // HEADS
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, D)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (HEADS * hd, D),
            p + "self_attn.k_proj.weight": (KV_HEADS * hd, D),
            p + "self_attn.v_proj.weight": (KV_HEADS * hd, D),
            p + "self_attn.o_proj.weight": (D, HEADS * hd),
            p + "post_attention_layernorm.weight": (D,),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        }
    return shapes | {"model.norm.weight": (D,), "lm_head.weight": (VOCAB, D)}


def write_big_checkpoint(d: Path) -> None:
    """~550 MB fp32 Llama checkpoint in one file, streamed tensor by tensor so the test stays small."""
    d.mkdir()
    shapes = llama_shapes()
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    rng = np.random.default_rng(0)
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for shape in shapes.values():
            f.write((rng.standard_normal(shape, dtype=np.float32) * 0.02).tobytes())
    config = {
        "model_type": "llama",
        "hidden_size": D,
        "intermediate_size": F,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "torch_dtype": "float32",
    }
    (d / "config.json").write_text(json.dumps(config))


MEASURE = textwrap.dedent(
    """
    import gc, json, sys
    from tinygrad import Tensor, dtypes
    from cluster.engine.shard import ShardEngine
    from cluster.models.config import ModelConfig
    from cluster.models.decoder import load_shard
    from cluster.weights import Checkpoint

    def status():
        keys = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
        lines = open("/proc/self/status").read().splitlines()
        return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in lines if l.startswith(keys)}

    (Tensor([1.0, 2.0], device="CPU") + 1).realize()  # CPU device up, its first kernel compiled
    # ru_maxrss survives execve (it starts at the forking pytest's size), so reset and read the mm's own peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status()
    if sys.argv[2] == "engine":
        eng = ShardEngine(sys.argv[1], 2, 4, device="CPU", dtype="float32", max_context=64, prefill_buckets=(4, 8))
        weight_bytes, loaded = eng.weight_bytes, status()
    else:  # the same steps as the engine, with the checkpoint kept open to see which pages are resident
        ckpt = Checkpoint(sys.argv[1])
        shard = load_shard(ModelConfig.from_dir(sys.argv[1]), ckpt, 2, 4, "CPU", dtypes.float32)
        ckpt.materialize()
        weight_bytes, loaded = shard.weight_bytes, status()
        del ckpt
        gc.collect()
    after = status()
    delta = lambda s, k: s[k] - base[k]
    print(json.dumps({"weight_bytes": weight_bytes, "peak": after["VmHWM"] - base["VmRSS"],
                      "after": delta(after, "VmRSS"), "file": delta(loaded, "RssFile"),
                      "copies": delta(loaded, "RssAnon") + delta(loaded, "RssShmem")}))
    """
)


def measure(model_dir: Path, mode: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(model_dir), mode], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_shard_peak_rss_tracks_its_own_weights(tmp_path):
    d = tmp_path / "big"
    write_big_checkpoint(d)
    try:
        total = (d / "model.safetensors").stat().st_size
        sizes = header_nbytes(d)
        shard_bytes = sum(sizes[n] for n in layer_names(sizes, 2, 4))
        eng, split = measure(d, "engine"), measure(d, "split")
    finally:
        shutil.rmtree(d)
    MiB = 2**20
    print(
        f"checkpoint {total / MiB:.0f} MiB, shard {shard_bytes / MiB:.0f} MiB; ShardEngine: peak RSS "
        f"+{eng['peak'] / MiB:.0f} MiB, after load +{eng['after'] / MiB:.0f} MiB; with the checkpoint open: "
        f"file pages +{split['file'] / MiB:.0f} MiB, copies +{split['copies'] / MiB:.0f} MiB"
    )
    assert eng["weight_bytes"] == split["weight_bytes"] == shard_bytes
    assert total > 4 * shard_bytes
    # Each tensor is read with one pread into host memory and moved to the device before the next is read, so
    # no file pages stay mapped and the peak is the shard plus about one tensor in flight. Touching the rest
    # of the file would add up to the whole checkpoint (>4x the shard).
    assert split["file"] < 16 * MiB
    assert split["copies"] < 1.1 * shard_bytes + 16 * MiB
    assert eng["peak"] < 1.25 * shard_bytes + 32 * MiB
    assert eng["peak"] < 0.4 * total
    # once loaded, only the shard's copies remain
    assert eng["after"] < 1.1 * shard_bytes + 32 * MiB
    assert split["after"] < 1.1 * shard_bytes + 32 * MiB
