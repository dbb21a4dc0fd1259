"""safetensors checkpoints: validate headers, then read only the tensors a shard needs.

`load` hands out placeholders; `materialize` then reads each tensor's byte range and moves it to the device,
one tensor at a time, so host memory holds at most one tensor beyond what the shard keeps and nothing else in
the file is touched (files may be read-only).

Tensors are laid out by numpy (bf16 widened, cast to the compute dtype, rows interleaved in blocks, tensors
stacked) and copied straight into the device buffer, on a CPU device written in place. numpy rounds to float16
as devices do (to nearest even). A tinygrad kernel per tensor would cost its scheduling and code generation
(seconds for a 1B model) and write every byte to fresh memory twice more. Other conversions run on the device.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tinygrad import Device, Tensor, dtypes
from tinygrad.device import Buffer
from tinygrad.dtype import DType, _to_np_dtype
from tinygrad.helpers import NUM_CPU_THREADS

from cluster.engine.buffers import copy_into

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or lacks a tensor the model needs."""


# safetensors dtype name -> (numpy dtype the bytes are read as, bytes per element); bf16 is read as its bits
# (numpy has no bfloat16) and widened to float32 by a shift
_DTYPES: dict[str, tuple[str, int]] = {
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("uint16", 2),
    "U32": ("uint32", 4),
    "I32": ("int32", 4),
    "I64": ("int64", 8),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors name: "BF16", "F16", "F32", "U32", ...
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        n = _DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header against the file's real size."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{file}: truncated (no safetensors header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8 or header_len > 100 * 2**20:
                raise CheckpointError(f"{file}: corrupt header length {header_len} (file has {size} bytes)")
            header = json.loads(f.read(header_len))
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = (
                meta["dtype"],
                tuple(int(d) for d in meta["shape"]),
                meta["data_offsets"],
            )
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name!r} has a malformed header entry") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
        info = TensorInfo(name, file, dtype, shape, 8 + header_len + start)
        if end - start != info.nbytes or start < 0:
            raise CheckpointError(f"{file}: tensor {name!r} spans {end - start} bytes, its shape needs {info.nbytes}")
        if end > data_size:
            raise CheckpointError(
                f"{file}: truncated: tensor {name!r} ends at byte {end} but the file holds {data_size} data bytes"
            )
        infos[name] = info
    return infos


class Checkpoint:
    """All safetensors files of a model directory, indexed by tensor name."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.files = self._files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            self.tensors.update(read_header(file))
        # placeholder, the tensors it stacks (usually one), raw, row_block
        self._pending: list[tuple[Tensor, tuple[TensorInfo, ...], bool, int]] = []

    def _files(self) -> list[Path]:
        index = self.model_dir / "model.safetensors.index.json"
        self._weight_map: dict[str, str] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: corrupt index ({e})") from None
            self._weight_map = weight_map
            files = sorted({self.model_dir / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{index} names {f.name}, which is missing")
            return files
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.model_dir}: no *.safetensors files")
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            # name the file that should hold it: the index's entry, else the checkpoint's files
            where = self._weight_map.get(name) or ", ".join(f.name for f in self.files)
            raise CheckpointError(
                f"{self.model_dir}: tensor {name!r} is missing from the checkpoint (looked in {where})"
            ) from None

    def load(
        self,
        name: str,
        device: str,
        dtype: DType | None = None,
        shape: Iterable[int] | None = None,
        *,
        raw: bool = False,
        row_block: int = 1,
    ) -> Tensor:
        """A placeholder on `device` that `materialize()` fills from the file: cast to `dtype` (default: float32
        for bf16, else the stored dtype), or with raw=True the stored values as they are (bf16 as uint16 bits).

        row_block=R stores a 2-D (out, in) tensor as (out/R, in, R): each run of R rows interleaved, element
        by element (`row_blocked` is the inverse view)."""
        info = self.info(name)
        if shape is not None and tuple(shape) != info.shape:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has shape {list(info.shape)}, the config needs {list(shape)}"
            )
        dtype = _placeholder_dtype(info, dtype, raw)
        layout = info.shape
        if row_block > 1:
            if len(info.shape) != 2:
                raise ValueError(f"{name}: row_block needs a 2-D tensor, not shape {list(info.shape)}")
            out, cols = info.shape
            if out % row_block:
                raise ValueError(f"{name}: {out} rows do not split into blocks of {row_block}")
            layout = (out // row_block, cols, row_block)
        placeholder = Tensor.empty(*layout, dtype=dtype, device=device)
        self._pending.append((placeholder, (info,), raw, row_block))
        return placeholder

    def load_rows(self, names: Sequence[str], device: str, dtype: DType | None = None, *, raw: bool = False) -> Tensor:
        """One placeholder holding several tensors stacked along their first axis, in order (a layer's q, k and v
        projections as one weight, say: one kernel computes them all on a GPU). They must agree in stored dtype
        and in every other axis; `dtype` and `raw` as for `load`. Stacked on the host while materializing, so
        the device never holds the parts and the whole at once."""
        infos = tuple(self.info(n) for n in names)
        first = infos[0]
        for info in infos[1:]:
            if info.dtype != first.dtype or info.shape[1:] != first.shape[1:]:
                raise CheckpointError(
                    f"{self.model_dir}: {info.name!r} ({info.dtype} {list(info.shape)}) does not stack under "
                    f"{first.name!r} ({first.dtype} {list(first.shape)})"
                )
        dtype = _placeholder_dtype(first, dtype, raw)
        rows = sum(info.shape[0] for info in infos)
        placeholder = Tensor.empty(rows, *first.shape[1:], dtype=dtype, device=device)
        self._pending.append((placeholder, infos, raw, 1))
        return placeholder

    def read(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as numpy (bf16 as uint16 bit patterns)."""
        raw = self._read_into([info], np.empty(info.nbytes, dtype=np.uint8))
        return raw.view(_DTYPES[info.dtype][0]).reshape(info.shape)

    def pending_bytes(self) -> int:
        """Device bytes the placeholders handed out so far will take once materialized."""
        return sum(t.nbytes() for t, *_ in self._pending)

    def materialize(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Read every placeholder handed out by `load` into its device buffer, one tensor at a time."""
        pending, self._pending = self._pending, []
        devices = {str(placeholder.device) for placeholder, *_ in pending}
        on_host = [_converts_on_host(infos[0], placeholder.dtype, raw) for placeholder, infos, raw, _ in pending]
        # one host buffer that every read reuses: fresh memory costs a page fault per 4 KiB on first touch
        sizes = [sum(info.nbytes for info in infos) for _, infos, *_ in pending]
        largest = max((size for size, host in zip(sizes, on_host, strict=True) if host), default=0)
        scratch = np.empty(largest, dtype=np.uint8)
        for i, (placeholder, infos, raw, row_block) in enumerate(pending):
            if placeholder.numel() == 0:
                pass  # nothing to read (tinygrad allocates no buffer for it)
            elif on_host[i]:
                self._fill_from_host(placeholder, infos, raw, row_block, scratch)
            else:
                self._fill_on_device(placeholder, infos, raw, row_block)
            if progress is not None:
                progress(i + 1, len(pending))
        for device in devices:
            # a conversion on the device staged its tensor in a buffer tinygrad keeps for reuse: give those back
            free_cache = getattr(Device[device].allocator, "free_cache", None)
            if free_cache is not None:
                free_cache()

    def _fill_on_device(self, placeholder: Tensor, infos: tuple[TensorInfo, ...], raw: bool, row_block: int) -> None:
        info = infos[0]
        host = self.read(info) if len(infos) == 1 else np.concatenate([self.read(i) for i in infos])
        t = Tensor(host, device=placeholder.device)
        if info.dtype == "BF16" and not raw:
            t = widen_bf16(t)
        if row_block > 1:  # (out, in) -> (out/R, in, R)
            out, cols = info.shape
            t = t.reshape(out // row_block, row_block, cols).permute(0, 2, 1)
        placeholder.replace(t.cast(placeholder.dtype).contiguous().realize())

    def _fill_from_host(
        self, placeholder: Tensor, infos: tuple[TensorInfo, ...], raw: bool, row_block: int, scratch: np.ndarray
    ) -> None:
        buffer = placeholder.uop.base.buffer
        assert isinstance(buffer, Buffer), "a placeholder lives on one device"
        shape = tuple(int(d) for d in placeholder.shape)
        in_place = _host_array(buffer.ensure_allocated(), shape)  # None: the device has memory of its own
        stored_dtype = _DTYPES[infos[0].dtype][0]
        bf16 = infos[0].dtype == "BF16" and not raw  # read as uint16 bits
        if in_place is not None and row_block == 1 and in_place.dtype == stored_dtype:
            self._read_into(infos, in_place.reshape(-1).view(np.uint8))  # the file's bytes are the layout
            return
        nbytes = sum(i.nbytes for i in infos)
        stored = self._read_into(infos, scratch[:nbytes]).view(stored_dtype)
        stored = stored.reshape(shape if row_block == 1 else infos[0].shape)  # row blocks: one (out, in) tensor
        target = in_place if in_place is not None else np.empty(shape, _to_np_dtype(placeholder.dtype))
        out = target
        if row_block > 1:  # (out, in) -> (out/R, in, R), written in the order it is read (numpy is faster so)
            rows, cols = stored.shape
            stored, out = stored.reshape(rows // row_block, row_block, cols), target.transpose(0, 2, 1)
        _copy_rows(out, stored, bf16)
        if in_place is None:
            copy_into(placeholder, target)

    def _read_into(self, infos: Sequence[TensorInfo], out: np.ndarray) -> np.ndarray:
        """The stored bytes of `infos`, one after another, read into `out` (uint8, exactly their size)."""
        view, pos = memoryview(out), 0  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
        for info in infos:
            try:
                with open(info.file, "rb") as f:
                    f.seek(info.offset)
                    got = f.readinto(view[pos : pos + info.nbytes])
            except OSError as e:
                raise CheckpointError(f"{info.file}: cannot read tensor {info.name!r} ({e})") from None
            if got != info.nbytes:
                raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}")
            pos += info.nbytes
        return out

    def nbytes(self, names: Iterable[str]) -> int:
        return sum(self.info(n).nbytes for n in names)


def _placeholder_dtype(info: TensorInfo, dtype: DType | None, raw: bool) -> DType:
    """What a placeholder holds: the stored dtype when raw (bf16 as its uint16 bits), else `dtype`, by default
    float32 for bf16 and the stored dtype otherwise."""
    stored = getattr(dtypes, _DTYPES[info.dtype][0])
    if raw:
        return stored
    return dtype or (dtypes.float32 if info.dtype == "BF16" else stored)


def _converts_on_host(info: TensorInfo, dtype: DType, raw: bool) -> bool:
    """Whether numpy makes the placeholder's values exactly as the device would: the stored bytes, or a float
    checkpoint (bf16, float16, float32) in float16 or float32, rounded to nearest even like a device cast."""
    stored = getattr(dtypes, _DTYPES[info.dtype][0])
    floats = info.dtype in ("BF16", "F16", "F32") and dtype in (dtypes.float16, dtypes.float32)
    return raw or dtype == stored or floats


def _copy_rows(out: np.ndarray, stored: np.ndarray, bf16: bool) -> None:
    """out[...] = stored, cast to out's dtype (bf16 bits widened first when `bf16`), in slices of the first axis
    on the cores the engine computes on (`--cpu-threads`): writing memory for the first time is slow, and numpy
    copies and casts on one thread."""
    if stored.ndim == 0:  # a scalar: one slice of one
        out, stored = out.reshape(1), stored.reshape(1)
    parts = max(1, min(NUM_CPU_THREADS.value, stored.nbytes >> 23, len(stored)))  # slices of at least 8 MiB

    @np.errstate(over="ignore")  # beyond float16's range is inf, as a device's cast makes it
    def copy(rows: slice) -> None:
        if bf16 and out.dtype == np.float32:  # bf16 bits are the high half of the float32
            np.left_shift(stored[rows], 16, out=out[rows].view(np.uint32), dtype=np.uint32)
        elif bf16:
            np.copyto(out[rows], (stored[rows].astype(np.uint32) << 16).view(np.float32), casting="same_kind")
        else:
            np.copyto(out[rows], stored[rows], casting="same_kind")

    bounds = np.linspace(0, len(stored), parts + 1).astype(int)
    slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if parts == 1:
        copy(slices[0])
        return
    with ThreadPoolExecutor(parts) as pool:
        list(pool.map(copy, slices))


def _host_array(buffer: Buffer, shape: tuple[int, ...]) -> np.ndarray | None:
    """The device buffer's own memory as numpy (devices in host memory: the CPU), else None."""
    if not hasattr(buffer.allocator, "_as_buffer"):
        return None
    memory = buffer.as_memoryview(force_zero_copy=True)
    return np.frombuffer(memory, dtype=_to_np_dtype(buffer.dtype)).reshape(shape)


def row_blocked(t: Tensor) -> Tensor:
    """The (out, in) view of a tensor loaded with row_block (stored (out/R, in, R))."""
    blocks, cols, block = t.shape
    return t.permute(0, 2, 1).reshape(blocks * block, cols)


def widen_bf16(bits: Tensor) -> Tensor:
    """bf16 bit patterns (uint16) -> float32, exactly; fuses into whatever kernel reads the weight."""
    return (bits.cast(dtypes.uint32) << 16).bitcast(dtypes.float32)
