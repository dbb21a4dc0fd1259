"""Captured TinyJit graphs kept on disk, so that a shard's second start skips tinygrad's graph work.

Capturing a graph costs seconds of tinygrad's Python for every graph a shard compiles (scheduling, graph
rewrites, lowering; the compiler's own output is already cached by tinygrad), paid again by every process. A
captured graph is a tree of UOps holding its compiled programs, and tinygrad can pickle it. What it must not
carry is the shard's weights: those are pickled as names and tied to the new process's tensors of the same
names when the graph is read back (the key holds every name's shape and dtype). The memory planner's scratch
arena (int8 buffers) is recreated empty; any other buffer a graph holds keeps its contents.

The key covers everything that shapes a graph: the code of this package, tinygrad's version and settings, the
device and what its compiler targets, the host's CPU, the model's config, the shard's layers, dtype, context
and chunk sizes, and the name, shape and dtype of every tensor the graphs may read. A file that fails to load
is dropped and the graphs are captured again.

The files are pickles, read back only from the user's own cache directory (as tinygrad's own cache is):
`$CLUSTERCTL_GRAPH_CACHE`, or `$XDG_CACHE_HOME/clusterctl/graphs` (default `~/.cache/...`); `off` disables it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import platform
import tempfile
from collections.abc import Mapping
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import tinygrad.helpers
from tinygrad import Device, Tensor, dtypes
from tinygrad.device import Buffer
from tinygrad.engine.jit import CapturedJit
from tinygrad.helpers import ContextVar
from tinygrad.uop.ops import Ops, UOp, buffers

log = logging.getLogger(__name__)

FORMAT = 1
KEEP = 32  # files kept in the directory, the most recently used first
# tinygrad settings that do not shape a graph: what it prints or records, and DEV (the device, keyed as itself;
# a node sets DEV for its engine processes, and a process that set it after importing tinygrad reads it unchanged)
_NOT_SHAPING = {
    "DEBUG",
    "VIZ",
    "PROFILE",
    "NO_COLOR",
    "TRACEMETA",
    "TRACK_MATCH_STATS",
    "CAPTURE_PROCESS_REPLAY",
    "DEV",
}
# this package's switches that change which kernels or graph runners a shard uses
_ENGINE_ENV = (
    "CLUSTERCTL_REPLAY_GRAPH",
    "CLUSTERCTL_GPU_MATVEC",
    "CLUSTERCTL_CPU_QUANT",
    "CLUSTERCTL_CUDA_GRAPH",
    "CLUSTERCTL_FUSED_PROJECTIONS",
    "CLUSTERCTL_QUANT_UNPACK",
    "CLUSTERCTL_MATVEC_ROWS",
    "CLUSTERCTL_DECODE_CHAIN",  # whether a whole model's engine has the graph that feeds queued steps
    "JITBEAM",
)


def user_cache() -> Path:
    """clusterctl's folder in the user's cache directory ($XDG_CACHE_HOME, default ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "clusterctl"


def cache_dir() -> Path | None:
    """Where graphs are kept; None when the cache is turned off."""
    chosen = os.environ.get("CLUSTERCTL_GRAPH_CACHE", "")
    if chosen.lower() in ("off", "0", "false", "no"):
        return None
    if chosen:
        return Path(chosen).expanduser()
    return user_cache() / "graphs"


@cache
def _code_digest() -> str:
    """A digest of this package's source: any change to how graphs are built makes earlier files stale."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def engine_env() -> dict[str, str | None]:
    """The environment's switches that change a shard's kernels, as they are now (an engine reads them when
    it is built)."""
    return {k: os.environ.get(k) for k in _ENGINE_ENV}


def _settings() -> dict[str, str]:
    """tinygrad's settings that may shape kernels: those tinygrad.helpers defines, as they are now, and any other
    given in the environment. (Which settings exist depends on the modules a process has imported, so the ones
    other modules define count only when set: two processes must agree on the same shard's key.)"""
    settings = {v.key: repr(v.value) for v in vars(tinygrad.helpers).values() if isinstance(v, ContextVar)}
    settings.update({k: repr(os.environ[k]) for k in list(ContextVar._cache) if k in os.environ})
    return {k: v for k, v in sorted(settings.items()) if k not in _NOT_SHAPING}


def _cpu_identity() -> str:
    """What a CPU's compiled programs depend on (tinygrad compiles for -march=native): model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    lines = {line.split(":")[0].strip(): line for line in text.splitlines() if line.split(":")[0].strip() in wanted}
    return "\n".join(sorted(lines.values()))


def graph_key(device: str, description: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> str:
    """The file name of a shard's graphs: a digest of everything that shapes them (see the module's note).
    description: the shard's own choices (layers, dtype, context, chunk sizes, engine_env() when it was built)."""
    renderer = Device[device].renderer
    parts = {
        "format": FORMAT,
        "code": _code_digest(),
        "tinygrad": version("tinygrad"),
        "settings": _settings(),
        "device": device,
        "target": repr(getattr(renderer, "target", type(renderer).__name__)),
        "host": _cpu_identity(),  # CPU programs (and pocl's) are compiled for this CPU; harmless elsewhere
        "shard": {k: repr(v) for k, v in description.items()},
        "tensors": {name: [str(t.dtype), list(t.shape), str(t.device)] for name, t in sorted(tensors.items())},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


class _Saver(pickle.Pickler):
    """Pickles graphs with the shard's tensors as names and the scratch arena without its contents."""

    def __init__(self, file: io.BytesIO, names: dict[UOp, str]):
        super().__init__(file, protocol=5)
        self.names = names

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Buffer):
            raise pickle.PicklingError(f"a graph holds a device buffer outside a UOp: {obj}")
        if not isinstance(obj, UOp) or obj.op is not Ops.BUFFER:
            return None
        if obj in self.names:
            return ("tensor", self.names[obj])
        buf = buffers.get(obj)
        if buf is None:  # a kernel's own register or local buffer, part of its program
            return None
        if not isinstance(buf, Buffer):
            raise pickle.PicklingError(f"a graph holds a buffer over several devices: {buf}")
        keep = buf.is_allocated() and obj.dtype != dtypes.int8  # int8: the memory planner's scratch arena
        contents = bytes(buf.as_memoryview()) if keep else None
        return ("scratch", obj.arg.slot, obj.arg.device, buf.size, obj.dtype, contents)


class _Loader(pickle.Unpickler):
    """Reads graphs back, tying names to the shard's tensors and making fresh scratch buffers."""

    def __init__(self, file: io.BytesIO, tensors: Mapping[str, Tensor]):
        super().__init__(file)
        self.tensors = tensors
        self.scratch: dict[int, UOp] = {}

    def persistent_load(self, pid: Any) -> UOp:
        if pid[0] == "tensor":
            base = self.tensors[pid[1]].uop.base
            if base.op is not Ops.BUFFER or buffers.get(base) is None:  # not (yet) realized here: no buffer to tie
                raise pickle.UnpicklingError(f"tensor {pid[1]!r} has no buffer in this shard")
            return base
        _, slot, device, size, dtype, contents = pid
        if slot not in self.scratch:
            # a new slot number: the saved one may belong to an unrelated buffer of this process
            uop = UOp.new_buffer(device, size, dtype)
            buf = Buffer(device, size, dtype, initial_value=contents, preallocate=contents is None)
            buffers[uop] = buf.ref(1)
            self.scratch[slot] = uop
        return self.scratch[slot]


def _names(tensors: Mapping[str, Tensor]) -> dict[UOp, str]:
    names: dict[UOp, str] = {}
    for name, t in tensors.items():
        base = t.uop.base
        if base.op is Ops.BUFFER and buffers.get(base) is not None:  # a lazy tensor is no graph's buffer
            names.setdefault(base, name)
    return names


def save(path: Path, graphs: Mapping[str, CapturedJit], tensors: Mapping[str, Tensor]) -> int:
    """Write the captured graphs (atomically: a reader never sees half a file); returns the bytes written."""
    data = io.BytesIO()
    _Saver(data, _names(tensors)).dump({"format": FORMAT, "graphs": dict(graphs)})
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.getbuffer())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _prune(path.parent)
    return data.getbuffer().nbytes


def load(path: Path, tensors: Mapping[str, Tensor]) -> dict[str, CapturedJit] | None:
    """The graphs saved at `path`, tied to `tensors`; None when there is no file or it cannot be read (then
    it is removed, and the caller captures the graphs anew)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        saved = _Loader(io.BytesIO(data), tensors).load()
        if saved.get("format") != FORMAT or not all(isinstance(g, CapturedJit) for g in saved["graphs"].values()):
            raise ValueError("not a graph file of this version")
    except Exception as e:  # noqa: BLE001 - a stale or damaged file costs a capture, never a failed start
        log.warning("ignoring cached graphs %s (%s: %s); capturing them again", path, type(e).__name__, e)
        path.unlink(missing_ok=True)
        return None
    os.utime(path)  # recently used: kept by _prune
    return dict(saved["graphs"])


def _prune(directory: Path) -> None:
    """Keep the KEEP most recently used files (another process may be pruning too)."""
    files = []
    for p in directory.glob("*.graphs"):
        try:
            files.append((p.stat().st_mtime, p))
        except FileNotFoundError:
            continue
    for _, old in sorted(files, reverse=True)[KEEP:]:
        old.unlink(missing_ok=True)
