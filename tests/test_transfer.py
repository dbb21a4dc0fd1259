"""Weights without the internet: manifests, chunked tensor streams with checksums, partial checkpoints that
grow pull by pull, rejected corrupt streams and file names, and a pull over a real gRPC channel."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import FIXTURES
from safetensors import safe_open
from safetensors.numpy import save_file
from tinygrad import dtypes

from cluster import transfer
from cluster.models.config import ModelConfig
from cluster.models.decoder import load_shard
from cluster.rpc.pb import cluster_pb2 as pb
from cluster.rpc.pb import cluster_pb2_grpc
from cluster.transfer import (
    INDEX,
    TransferError,
    build_manifest,
    iter_tensor_chunks,
    layer_tensor_names,
    missing_tensors,
    receive_tensors,
    save_manifest_files,
)
from cluster.weights import Checkpoint, CheckpointError

MODELS = ["llama32", "mistral", "llama32-4bit"]  # bf16 tied, fp16 in 3 files, MLX 4-bit (uint32 + scales/biases)
SMALL_CHUNK = 1000  # forces most tensors into several chunks


# ------------------------------------------------------------------------------------------ helpers


def layer_names(model: str, start: int, end: int, *, embed: bool = False) -> list[str]:
    """The tensor names a shard [start, end) of a fixture reads (plus the embedding table on request)."""
    cfg = ModelConfig.from_dir(FIXTURES / model)
    names = list(Checkpoint(FIXTURES / model).tensors)
    wanted = set(layer_tensor_names(names, start, end, cfg.num_layers, tie_word_embeddings=cfg.tie_word_embeddings))
    if embed:
        wanted |= {n for n in names if n.startswith("model.embed_tokens.")}
    return [n for n in names if n in wanted]


def pull(
    model: str,
    names: list[str],
    dest: Path,
    mutate: Callable[[list[pb.TensorChunk]], list[pb.TensorChunk]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """What a node does, without the network: manifest, then the tensors it lacks, into dest."""
    src = FIXTURES / model
    manifest = build_manifest(src, model)
    by_name = {e.name: e for e in manifest.tensors}
    chunks: Iterator[pb.TensorChunk] | list[pb.TensorChunk] = iter_tensor_chunks(src, names, SMALL_CHUNK)
    if mutate is not None:
        chunks = mutate(list(chunks))
    written = receive_tensors(chunks, {n: by_name[n] for n in names}, dest, progress=progress)
    save_manifest_files(manifest, dest)
    return written


def assert_same_tensors(model: str, dest: Path, names: list[str]) -> None:
    src, got = Checkpoint(FIXTURES / model), Checkpoint(dest)
    assert set(got.tensors) == set(names)
    for n in names:
        a, b = src.read(src.info(n)), got.read(got.info(n))
        assert (a.dtype, a.shape, got.info(n).dtype) == (b.dtype, b.shape, src.info(n).dtype), n
        assert a.tobytes() == b.tobytes(), n


def listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.exists() else {}


# ------------------------------------------------------------------------------------------ manifest


@pytest.mark.parametrize("model", MODELS)
def test_manifest_lists_small_files_and_every_tensor(model: str) -> None:
    src = FIXTURES / model
    manifest = build_manifest(src, model)
    assert manifest.model_id == model
    files = {f.name: f.data for f in manifest.files}
    assert "config.json" in files and "tokenizer.json" in files
    assert files == {
        p.name: p.read_bytes()
        for p in src.iterdir()
        if not p.name.endswith(".safetensors") and p.name != INDEX and not p.name.startswith(".")
    }
    ckpt = Checkpoint(src)
    assert [e.name for e in manifest.tensors] != [] and {e.name for e in manifest.tensors} == set(ckpt.tensors)
    assert len(manifest.tensors) == len(ckpt.tensors)
    for e in manifest.tensors:
        info = ckpt.info(e.name)
        assert (e.dtype, tuple(e.shape), e.nbytes) == (info.dtype, info.shape, info.nbytes)
    if model == "llama32-4bit":
        assert {e.dtype for e in manifest.tensors} >= {"U32", "BF16"}


def test_manifest_skips_hidden_and_large_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "llama32", d)
    (d / ".partial.tmp").write_bytes(b"x")
    (d / "big.bin").write_bytes(b"\0" * 3000)
    (d / "sub").mkdir()
    monkeypatch.setattr(transfer, "SMALL_FILE_LIMIT", 2000)
    names = {f.name for f in build_manifest(d, "m").files}
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= names
    assert not names & {".partial.tmp", "big.bin", "sub", "tokenizer.json", "model.safetensors"}


# ------------------------------------------------------------------------------------------ chunks


def test_chunks_are_contiguous_and_carry_the_digest_last() -> None:
    names = layer_names("mistral", 1, 2)
    chunks = list(iter_tensor_chunks(FIXTURES / "mistral", names, SMALL_CHUNK))
    assert list(dict.fromkeys(c.name for c in chunks)) == names  # request order, one tensor after the other
    ckpt = Checkpoint(FIXTURES / "mistral")
    for n in names:
        mine = [c for c in chunks if c.name == n]
        assert [c.offset for c in mine] == list(range(0, ckpt.info(n).nbytes, SMALL_CHUNK))
        assert all(len(c.data) <= SMALL_CHUNK for c in mine)
        assert all(not c.sha256 for c in mine[:-1]) and len(mine[-1].sha256) == 32
    assert max(sum(c.name == n for c in chunks) for n in names) > 1


def test_unknown_tensor_fails_before_the_first_chunk() -> None:
    with pytest.raises(CheckpointError, match="model.layers.99.mlp.up_proj.weight"):
        iter_tensor_chunks(FIXTURES / "llama32", ["model.norm.weight", "model.layers.99.mlp.up_proj.weight"])


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("model", MODELS)
def test_round_trip_of_a_layer_range(model: str, tmp_path: Path) -> None:
    dest = tmp_path / model
    names = layer_names(model, 1, 3, embed=True)
    seen: list[tuple[int, int]] = []
    assert pull(model, names, dest, progress=lambda done, total: seen.append((done, total))) == names
    assert_same_tensors(model, dest, names)
    total = Checkpoint(FIXTURES / model).nbytes(names)
    assert seen[-1] == (total, total) and [d for d, _ in seen] == sorted(d for d, _ in seen)

    (pulled,) = dest.glob("*.safetensors")
    assert pulled.name.startswith("pulled-") and not list(dest.glob(".*.tmp"))
    with safe_open(str(pulled), framework="numpy") as f:  # the reference reader accepts the file as written
        assert list(f.keys()) == sorted(names)
    index = json.loads((dest / INDEX).read_text())
    assert index["weight_map"] == dict.fromkeys(sorted(names), pulled.name)
    assert index["metadata"]["total_size"] == total

    # the decoder finds every tensor of layers [1, 3) with its shape; layer 0 was never pulled
    cfg = ModelConfig.from_dir(dest)
    load_shard(cfg, Checkpoint(dest), 1, 3, "CPU", dtypes.float32)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\."):
        load_shard(cfg, Checkpoint(dest), 0, 2, "CPU", dtypes.float32)
    assert (dest / "config.json").read_bytes() == (FIXTURES / model / "config.json").read_bytes()


def test_successive_pulls_merge_into_one_index(tmp_path: Path) -> None:
    dest, model = tmp_path / "llama32", "llama32"
    first, second = layer_names(model, 0, 2), layer_names(model, 2, 4)
    everything = list(Checkpoint(FIXTURES / model).tensors)
    assert set(first) | set(second) == set(everything)  # tied: the last shard reads the embedding table too

    assert missing_tensors(dest, first) == first  # dest does not exist yet
    pull(model, first, dest)
    assert missing_tensors(dest, second) == [n for n in second if n not in first]
    pull(model, missing_tensors(dest, second), dest)
    assert missing_tensors(dest, first + second) == []

    assert len(list(dest.glob("*.safetensors"))) == 2
    weight_map = json.loads((dest / INDEX).read_text())["weight_map"]
    assert set(weight_map) == set(everything) and len(set(weight_map.values())) == 2
    assert_same_tensors(model, dest, everything)
    load_shard(ModelConfig.from_dir(dest), Checkpoint(dest), 0, 4, "CPU", dtypes.float32)


def test_first_index_keeps_safetensors_that_were_already_there(tmp_path: Path) -> None:
    dest = tmp_path / "m"
    dest.mkdir()
    save_file({"extra": np.arange(6, dtype=np.float32)}, str(dest / "local.safetensors"))
    names = layer_names("mistral", 3, 4)
    pull("mistral", names, dest)
    ckpt = Checkpoint(dest)
    assert set(ckpt.tensors) == {*names, "extra"}
    np.testing.assert_array_equal(ckpt.read(ckpt.info("extra")), np.arange(6, dtype=np.float32))


def test_zero_byte_tensor_round_trips(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    arrays: dict[str, np.ndarray] = {
        "empty": np.zeros((0, 3), np.float16),
        "w": np.arange(12, dtype=np.int32).reshape(3, 4),
    }
    save_file(arrays, str(src / "model.safetensors"))
    chunks = list(iter_tensor_chunks(src, ["empty", "w"]))
    assert [(c.name, len(c.data), len(c.sha256)) for c in chunks] == [("empty", 0, 32), ("w", 48, 32)]
    entries = {e.name: e for e in build_manifest(src, "m").tensors}
    receive_tensors(chunks, entries, dest)
    ckpt = Checkpoint(dest)
    assert ckpt.read(ckpt.info("empty")).shape == (0, 3)
    np.testing.assert_array_equal(ckpt.read(ckpt.info("w")), arrays["w"])


# ------------------------------------------------------------------------------------------ bad streams


def flip_byte(chunks: list[pb.TensorChunk]) -> list[pb.TensorChunk]:
    c = chunks[len(chunks) // 2]
    c.data = bytes([c.data[0] ^ 0x01]) + c.data[1:]
    return chunks


def drop_last_byte(chunks: list[pb.TensorChunk]) -> list[pb.TensorChunk]:
    c = next(c for c in chunks if c.sha256 and len(c.data) > 1)
    c.data = c.data[:-1]
    return chunks


def extra_bytes(chunks: list[pb.TensorChunk]) -> list[pb.TensorChunk]:
    c = next(c for c in chunks if c.sha256)
    c.data += b"\0\0"
    return chunks


def rename_one(chunks: list[pb.TensorChunk]) -> list[pb.TensorChunk]:
    for c in chunks:
        if c.name == chunks[-1].name:
            c.name = "model.layers.7.mlp.up_proj.weight"
    return chunks


def gap(chunks: list[pb.TensorChunk]) -> list[pb.TensorChunk]:
    second = [c for c in chunks if c.offset > 0][0]
    second.offset += 1
    return chunks


def no_digest(chunks: list[pb.TensorChunk]) -> list[pb.TensorChunk]:
    next(c for c in chunks if c.sha256).sha256 = b""
    return chunks


def stops_early(chunks: list[pb.TensorChunk]) -> list[pb.TensorChunk]:
    last = chunks[-1].name
    return [c for c in chunks if c.name != last]


def sent_twice(chunks: list[pb.TensorChunk]) -> list[pb.TensorChunk]:
    first = chunks[0].name
    return chunks + [c for c in chunks if c.name == first]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (flip_byte, "SHA-256 mismatch"),
        (drop_last_byte, "bytes were sent"),
        (extra_bytes, "more than its"),
        (rename_one, "model.layers.7.mlp.up_proj.weight' was not requested"),
        (gap, "offset"),
        (no_digest, "without a checksum"),
        (stops_early, "stream ended before"),
        (sent_twice, "sent twice"),
    ],
)
def test_bad_stream_leaves_dest_as_it_was(
    tmp_path: Path, mutate: Callable[[list[pb.TensorChunk]], list[pb.TensorChunk]], match: str
) -> None:
    dest = tmp_path / "llama32"
    pull("llama32", layer_names("llama32", 0, 2), dest)
    before = listing(dest)
    names = layer_names("llama32", 2, 4)

    # the error names the tensor at fault (the renamed chunk names the unexpected tensor)
    chunks = mutate(list(iter_tensor_chunks(FIXTURES / "llama32", names, SMALL_CHUNK)))
    at_fault: set[str] = set()
    try:
        pull("llama32", names, dest, mutate=lambda _: chunks)
    except TransferError as e:
        assert match in str(e)
        at_fault = {n for n in [*names, "model.layers.7.mlp.up_proj.weight"] if repr(n) in str(e)}
    else:
        pytest.fail("the bad stream was accepted")
    assert at_fault
    assert listing(dest) == before  # no new safetensors, no tmp file, the index unchanged


def test_bad_manifest_entry_is_rejected(tmp_path: Path) -> None:
    names = layer_names("llama32", 3, 4)
    entries = {e.name: e for e in build_manifest(FIXTURES / "llama32", "llama32").tensors if e.name in names}
    entries[names[0]].nbytes += 2
    with pytest.raises(TransferError, match=repr(names[0])):
        receive_tensors(iter_tensor_chunks(FIXTURES / "llama32", names), entries, tmp_path / "d")
    assert listing(tmp_path / "d") == {}


def test_corrupt_index_is_reported_before_the_new_file_lands(tmp_path: Path) -> None:
    dest = tmp_path / "llama32"
    pull("llama32", layer_names("llama32", 0, 1), dest)
    (dest / INDEX).write_text('{"weight_map": ')
    before = listing(dest)
    with pytest.raises(CheckpointError, match="corrupt index"):
        pull("llama32", layer_names("llama32", 1, 2), dest)
    assert listing(dest) == before


def test_nothing_requested_writes_nothing(tmp_path: Path) -> None:
    assert receive_tensors(iter([]), {}, tmp_path / "d") == []
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------------------ file names


@pytest.mark.parametrize(
    "name", ["../x", "/etc/passwd", "a/b", ".hidden", "..", "", "a\\b", "model.safetensors", INDEX]
)
def test_unsafe_file_names_are_refused(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "models" / "m"
    manifest = pb.Manifest(model_id="m")
    manifest.files.add(name="config.json", data=b"{}")
    manifest.files.add(name=name, data=b"pwned")
    with pytest.raises(ValueError, match="manifest file"):
        save_manifest_files(manifest, dest)
    # nothing written anywhere: not the bad file, not even the good one before it
    assert [p for p in tmp_path.rglob("*")] == []


# ------------------------------------------------------------------------------------------ over gRPC

MESSAGE_LIMIT = 64 * 2**20  # manifests carry tokenizer.json whole
GRPC_OPTIONS = [("grpc.max_send_message_length", MESSAGE_LIMIT), ("grpc.max_receive_message_length", MESSAGE_LIMIT)]


class TransferServicer(cluster_pb2_grpc.WorkerServicer):
    """Only the two RPCs of a pull, serving the committed fixtures by name."""

    def _dir(self, model_id: str, context: grpc.ServicerContext) -> Path:
        if model_id not in MODELS:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {model_id!r} here")
        return FIXTURES / model_id

    def GetManifest(self, request: pb.ManifestRequest, context: grpc.ServicerContext) -> pb.Manifest:
        return build_manifest(self._dir(request.model_id, context), request.model_id)

    def PullTensors(self, request: pb.PullTensorsRequest, context: grpc.ServicerContext) -> Iterator[pb.TensorChunk]:
        try:
            return iter_tensor_chunks(self._dir(request.model_id, context), list(request.names), SMALL_CHUNK)
        except CheckpointError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            raise  # abort raises; this line only tells the type checker


@pytest.fixture
def stub() -> Iterator[cluster_pb2_grpc.WorkerStub]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS)
    cluster_pb2_grpc.add_WorkerServicer_to_server(TransferServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
    try:
        yield cluster_pb2_grpc.WorkerStub(channel)
    finally:
        channel.close()
        server.stop(None)


def test_pull_over_grpc(stub: cluster_pb2_grpc.WorkerStub, tmp_path: Path) -> None:
    model, dest = "mistral", tmp_path / "mistral"
    manifest = stub.GetManifest(pb.ManifestRequest(model_id=model))
    save_manifest_files(manifest, dest)
    cfg = ModelConfig.from_dir(dest)
    by_name = {e.name: e for e in manifest.tensors}
    needed = layer_tensor_names(by_name, 2, 4, cfg.num_layers, tie_word_embeddings=cfg.tie_word_embeddings)
    names = missing_tensors(dest, needed)
    assert names == needed and "lm_head.weight" in names and "model.norm.weight" in names

    seen: list[int] = []
    stream = stub.PullTensors(pb.PullTensorsRequest(model_id=model, names=names))
    receive_tensors(stream, {n: by_name[n] for n in names}, dest, progress=lambda done, _: seen.append(done))
    assert len(seen) > len(names)  # several chunks per tensor crossed the channel
    assert missing_tensors(dest, needed) == []
    assert_same_tensors(model, dest, names)

    shard = load_shard(cfg, Checkpoint(dest), 2, 4, "CPU", dtypes.float32)
    assert shard.is_last and not shard.is_first

    # a name the peer lacks is a clear error status, and the peer keeps serving
    with pytest.raises(grpc.RpcError) as err:
        list(stub.PullTensors(pb.PullTensorsRequest(model_id=model, names=["model.layers.9.mlp.up_proj.weight"])))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "model.layers.9.mlp.up_proj.weight" in err.value.details()
    assert stub.GetManifest(pb.ManifestRequest(model_id=model)).model_id == model
