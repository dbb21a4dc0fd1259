"""Weights without the internet: a node that lacks a model's files pulls exactly the tensors it needs from a peer.

The peer answers with a Manifest (the small files whole, plus every tensor's name, dtype, shape and size) and
then streams the requested tensors in chunks, each tensor closed by the SHA-256 of its bytes. The receiver
appends the chunks straight into one new safetensors file (its header is known from the manifest before any
data arrives), checks sizes and digests, and merges the file into the models dir's index, so that several
pulls (layers [0, 2), later [2, 4)) read as one partial `Checkpoint`. Transport-agnostic: the gRPC servicer
and client call these functions; the server side yields chunks, the client side consumes any iterable.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from cluster.rpc.pb import cluster_pb2 as pb
from cluster.weights import Checkpoint, CheckpointError, TensorInfo, read_header

log = logging.getLogger(__name__)

SMALL_FILE_LIMIT = 64 * 2**20  # config, tokenizer, templates; anything larger is not a "small file"
CHUNK_BYTES = 2**20  # data per TensorChunk, far below gRPC's 4 MiB default message limit
INDEX = "model.safetensors.index.json"
_LOCK = ".transfer.lock"  # hidden, so manifests never list it


class TransferError(ValueError):
    """A pulled tensor stream is malformed: unexpected name, gap, wrong length or checksum."""


# ---------------------------------------------------------------------------------------------- sender


def build_manifest(model_dir: Path, model_id: str) -> pb.Manifest:
    """The small files of `model_dir` (whole) and every tensor of its checkpoint (name, dtype, shape, size)."""
    model_dir = Path(model_dir)
    manifest = pb.Manifest(model_id=model_id)
    for path in sorted(model_dir.iterdir()):
        # is_file follows links: Hugging Face cache snapshots are symlinks into a blob store
        if _is_weights_file(path.name) or path.name.startswith(".") or not path.is_file():
            continue
        if path.stat().st_size >= SMALL_FILE_LIMIT:
            log.info("manifest of %s leaves out %s (%d bytes)", model_id, path.name, path.stat().st_size)
            continue
        manifest.files.add(name=path.name, data=path.read_bytes())
    ckpt = Checkpoint(model_dir)
    # file order, then data order, so that a peer asking for tensors in manifest order is read sequentially
    for info in sorted(ckpt.tensors.values(), key=lambda i: (str(i.file), i.offset)):
        manifest.tensors.add(name=info.name, dtype=info.dtype, shape=info.shape, nbytes=info.nbytes)
    return manifest


def iter_tensor_chunks(
    model_dir: Path, names: Sequence[str], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[pb.TensorChunk]:
    """The tensors `names`, in order, as chunks of at most `chunk_bytes`; each tensor's last chunk carries its
    SHA-256 (a zero-byte tensor is one empty chunk). Unknown names raise CheckpointError here, before the
    first chunk, so that a servicer can answer with an error status instead of a broken stream."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, not {chunk_bytes}")
    ckpt = Checkpoint(model_dir)
    infos = [ckpt.info(n) for n in names]
    return _chunks(infos, chunk_bytes)


def _chunks(infos: list[TensorInfo], chunk_bytes: int) -> Iterator[pb.TensorChunk]:
    fds: dict[Path, int] = {}
    try:
        for info in infos:
            if info.file not in fds:
                fds[info.file] = os.open(info.file, os.O_RDONLY)
            fd, digest, done = fds[info.file], hashlib.sha256(), 0
            while True:
                # one pread per chunk: the file (possibly GBs) is never loaded whole
                data = os.pread(fd, min(chunk_bytes, info.nbytes - done), info.offset + done)
                if done + len(data) < info.nbytes and not data:
                    raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}")
                digest.update(data)
                last = done + len(data) == info.nbytes
                yield pb.TensorChunk(name=info.name, offset=done, data=data, sha256=digest.digest() if last else b"")
                done += len(data)
                if last:
                    break
    finally:
        for fd in fds.values():
            os.close(fd)


# -------------------------------------------------------------------------------------------- receiver


def layer_tensor_names(
    names: Iterable[str], start: int, end: int, num_layers: int, *, tie_word_embeddings: bool = False
) -> list[str]:
    """The tensors (of `names`, e.g. a manifest's) that a shard of layers [start, end) reads: its layers', the
    embedding table on the first shard (and on the last when tied), the final norm and lm_head on the last.
    Whole module prefixes are taken, so MLX scales/biases and attention biases come along."""
    is_last = end == num_layers
    prefixes = [f"model.layers.{i}." for i in range(start, end)]
    if start == 0 or (is_last and tie_word_embeddings):
        prefixes.append("model.embed_tokens.")
    if is_last:
        prefixes += ["model.norm.", "lm_head."]
    return [n for n in names if n.startswith(tuple(prefixes))]


def save_manifest_files(manifest: pb.Manifest, dest: Path) -> None:
    """Write the manifest's small files into `dest`, each atomically. Every name must be one plain path
    component (a peer cannot write outside `dest`, hidden files or over the weights): ValueError otherwise,
    raised before anything is written."""
    for f in manifest.files:
        _check_file_name(f.name)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in manifest.files:
        _atomic_write(dest / f.name, f.data)


def _check_file_name(name: str) -> None:
    if (
        not name
        or name != os.path.basename(name)
        or "\\" in name
        or "\0" in name
        or name.startswith(".")
        or os.path.isabs(name)
    ):
        raise ValueError(f"manifest file name {name!r} is not a plain file name")
    if _is_weights_file(name):
        raise ValueError(f"manifest file {name!r} would overwrite the checkpoint's weights or index")


def _is_weights_file(name: str) -> bool:
    return name.endswith(".safetensors") or name.endswith(".safetensors.index.json")


def missing_tensors(dest: Path, names: Iterable[str]) -> list[str]:
    """`names` (in order, once each) that `dest`'s partial checkpoint does not hold yet."""
    wanted = list(dict.fromkeys(names))
    dest = Path(dest)
    if not (dest / INDEX).exists() and not any(dest.glob("*.safetensors")):
        return wanted  # also when dest does not exist
    ckpt = Checkpoint(dest)
    return [n for n in wanted if n not in ckpt]


def receive_tensors(
    chunks: Iterable[pb.TensorChunk],
    entries: Mapping[str, pb.TensorEntry],
    dest: Path,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Assemble the tensors `entries` (exactly those requested, in request order) from `chunks` into one new
    safetensors file in `dest` and merge it into dest's index; returns the names written.

    Tensors may arrive in any order but one at a time, each with contiguous offsets and closed by a chunk that
    carries its SHA-256. Anything else (an unexpected name, a gap, too many or too few bytes, a bad checksum,
    a tensor that never came) raises TransferError naming the tensor, and leaves dest as it was.
    """
    dest = Path(dest)
    names = list(entries)
    if not names:
        return []
    header, starts = _header(entries)
    total = sum(entries[n].nbytes for n in names)
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    final = dest / f"pulled-{digest}.safetensors"
    dest.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{final.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        _pwrite_all(fd, header, 0)
        base = len(header)
        done = 0
        finished: set[str] = set()
        current: str | None = None  # the tensor whose chunks are arriving
        received, hasher = 0, hashlib.sha256()
        for chunk in chunks:
            name = chunk.name
            if name != current:
                if current is not None:
                    raise TransferError(
                        f"tensor {current!r} ended after {received} of {entries[current].nbytes} bytes "
                        f"without a checksum (next chunk is for {name!r})"
                    )
                if name not in entries:
                    raise TransferError(f"tensor {name!r} was not requested")
                if name in finished:
                    raise TransferError(f"tensor {name!r} was sent twice")
                current, received, hasher = name, 0, hashlib.sha256()
            expected = entries[name].nbytes
            if chunk.offset != received:
                raise TransferError(f"tensor {name!r}: chunk at offset {chunk.offset}, expected {received}")
            if received + len(chunk.data) > expected:
                raise TransferError(f"tensor {name!r}: more than its {expected} bytes were sent")
            # straight to its place in the file: at most one chunk is ever held in memory
            _pwrite_all(fd, chunk.data, base + starts[name] + received)
            hasher.update(chunk.data)
            received += len(chunk.data)
            done += len(chunk.data)
            if chunk.sha256:
                if received != expected:
                    raise TransferError(f"tensor {name!r}: {received} bytes were sent, its entry says {expected}")
                if chunk.sha256 != hasher.digest():
                    raise TransferError(f"tensor {name!r}: SHA-256 mismatch (corrupted in transfer)")
                finished.add(name)
                current = None
            if progress is not None:
                progress(done, total)
        if current is not None:
            raise TransferError(f"tensor {current!r}: the stream ended after {received} of its bytes")
        absent = [n for n in names if n not in finished]
        if absent:
            raise TransferError(f"the stream ended before tensor(s) {', '.join(map(repr, absent))}")
        os.fsync(fd)
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; the weights are as public as the model's other files
        os.close(fd)
        fd = -1
        with _locked(dest):
            # the old index is read (and checked) before the new file lands, so a bad one changes nothing
            weight_map, metadata, sizes = _read_index(dest, final.name)
            os.replace(tmp, final)
            weight_map.update(dict.fromkeys(names, final.name))
            sizes.update({n: entries[n].nbytes for n in names})
            metadata["total_size"] = sum(sizes.values())
            body = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
            _atomic_write(dest / INDEX, (json.dumps(body, indent=2) + "\n").encode())
        _fsync_dir(dest)
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
    log.info("pulled %d tensors (%d bytes) into %s", len(names), total, final)
    return names


def _header(entries: Mapping[str, pb.TensorEntry]) -> tuple[bytes, dict[str, int]]:
    """The safetensors prefix (length + JSON, space-padded to 8 bytes) for `entries` laid out back to back,
    and each tensor's start within the data."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    starts: dict[str, int] = {}
    offset = 0
    for name, e in entries.items():
        if e.name != name:
            raise TransferError(f"tensor {name!r}: its entry is named {e.name!r}")
        shape = tuple(int(d) for d in e.shape)
        try:
            nbytes = TensorInfo(name, Path(), e.dtype, shape).nbytes
        except KeyError:
            raise TransferError(f"tensor {name!r} has unsupported dtype {e.dtype!r}") from None
        if any(d < 0 for d in shape) or nbytes != e.nbytes:
            raise TransferError(f"tensor {name!r}: {e.nbytes} bytes do not match {e.dtype} {list(shape)}")
        meta[name] = {"dtype": e.dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        starts[name] = offset
        offset += nbytes
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, starts


def _read_index(dest: Path, new_file: str) -> tuple[dict[str, str], dict[str, object], dict[str, int]]:
    """dest's weight map and index metadata, and the size of each tensor it maps (leaving out `new_file`, which
    is about to be replaced). With no index yet, the safetensors files already there (they would vanish from
    Checkpoint's view once an index exists)."""
    index = dest / INDEX
    if index.exists():
        try:
            old = json.loads(index.read_text())
            weight_map = {str(k): str(v) for k, v in old["weight_map"].items()}
            metadata = dict(old.get("metadata") or {})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{index}: corrupt index ({e})") from None
    else:
        weight_map, metadata = {}, {}
        for path in sorted(dest.glob("*.safetensors")):
            weight_map.update(dict.fromkeys(read_header(path), path.name))
    weight_map = {n: f for n, f in weight_map.items() if f != new_file}
    sizes: dict[str, int] = {}
    for f in sorted(set(weight_map.values())):
        sizes.update({n: i.nbytes for n, i in read_header(dest / f).items() if weight_map.get(n) == f})
    return weight_map, metadata, sizes


# ---------------------------------------------------------------------------------------------- files


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are as public as the model
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """Serialize index merges of concurrent pulls into the same directory."""
    with open(dest / _LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
