"""What one node holds: model files on disk and loaded shards, each a ShardEngine in its own process.

Blocking code, called from the node's gRPC servicer through threads and, for shards on the coordinating node,
directly by the coordinator (no network in between).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from cluster import auth, transfer
from cluster.chain import RequestCancelled
from cluster.engine.process import EngineProcess
from cluster.models.config import ModelConfig
from cluster.registry import ModelNotFoundError, resolve_model
from cluster.rpc import wire
from cluster.rpc.pb import cluster_pb2 as pb
from cluster.rpc.pb import cluster_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)
PARTIAL_MARKER = ".clusterctl-partial"  # a directory holding only the tensors pulled so far
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelUnavailableError(LookupError):
    """No local copy, no peer that has it and no download."""


class UnknownShardError(LookupError):
    pass


# A request for a shard whose sessions are all in use waits this long for one to end, then is refused as busy.
SESSION_WAIT_S = 300.0
_SLOT_POLL_S = 0.02  # how often a request waiting in the event loop looks for a free session


class ShardBusyError(RuntimeError):
    """Every session of a shard stayed in use while a request waited for one. Messages start with wire.BUSY."""


class SessionOpenError(ValueError):
    """A session id that is already open on the shard."""


def default_models_dir() -> Path:
    return Path(os.environ.get("CLUSTERCTL_MODELS", "~/.cache/clusterctl/models")).expanduser()


def check_model_id(model_id: str) -> str:
    """Model ids name directories on other nodes: a repo id ("org/name") or a directory name, nothing else."""
    if not _MODEL_ID.match(model_id) or ".." in model_id:
        raise ValueError(f"not a valid model id: {model_id!r}")
    return model_id


@dataclass
class HostedShard:
    shard_id: str
    model_id: str
    start: int
    end: int
    engine: EngineProcess
    info: dict[str, Any]
    key: tuple[Any, ...] = ()  # what load() asked for: a second load of the same key shares this shard
    # one entry per placement using it: the coordinating node's id (coordinators share shards); the engine closes
    # when the last one lets go, or when the nodes holding it have left
    holders: list[str] = field(default_factory=list)
    sessions: set[str] = field(default_factory=set)  # open on the engine, or about to be
    max_sessions: int = 8  # the engine's limit (lower than asked when memory holds fewer KV caches); more wait
    session_wait: float = SESSION_WAIT_S  # seconds a request waits for a free session before it is refused
    _slots: threading.Condition = field(default_factory=threading.Condition, repr=False, compare=False)

    def open_session(self, session_id: str, sampling: Any, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Open a session on the engine once fewer than max_sessions are open (blocking; for threads).
        `cancelled` ends the wait (with RequestCancelled) once it turns true and `wake()` is called."""
        self.reserve(session_id, cancelled=cancelled)
        try:
            self.engine.new_session(session_id, sampling)
        except BaseException:
            self.release(session_id)
            raise

    async def aopen_session(self, session_id: str, sampling: Any) -> None:
        """`open_session` for the event loop."""
        await self.areserve(session_id)
        try:
            await self.engine.acall("new_session", session_id, sampling)
        except BaseException:
            self.release(session_id)
            raise

    def end_session(self, session_id: str) -> None:
        # The place is freed once the engine has ended the session, so a session opened in it never finds
        # the engine still full (calls from different threads may reach the engine in any order).
        if self.counts(session_id):
            try:
                self.engine.end_session(session_id)
            finally:
                self.release(session_id)

    async def aend_session(self, session_id: str) -> None:
        if self.counts(session_id):
            try:
                await self.engine.acall("end_session", session_id)
            finally:
                self.release(session_id)

    def counts(self, session_id: str) -> bool:
        with self._slots:
            return session_id in self.sessions

    def reserve(
        self, session_id: str, timeout: float | None = None, cancelled: Callable[[], bool] = lambda: False
    ) -> None:
        """Count a new session, waiting until fewer than max_sessions are open (blocking; for threads)."""
        timeout = self.session_wait if timeout is None else timeout
        with self._slots:
            if not self._slots.wait_for(lambda: cancelled() or self._take(session_id), timeout):
                raise self._busy(timeout)
            if session_id not in self.sessions:  # woken because the request was cancelled, not by a free place
                raise RequestCancelled(f"the request for session {session_id!r} was cancelled while it waited")

    def wake(self) -> None:
        """Let waiting `reserve` calls check their `cancelled` again."""
        with self._slots:
            self._slots.notify_all()

    async def areserve(self, session_id: str, timeout: float | None = None) -> None:
        """`reserve` for the event loop: polls instead of parking one of the loop's worker threads per request."""
        timeout = self.session_wait if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            with self._slots:
                if self._take(session_id):
                    return
            if time.monotonic() >= deadline:
                raise self._busy(timeout)
            await asyncio.sleep(_SLOT_POLL_S)

    def release(self, session_id: str) -> bool:
        """Stop counting a session; True when it was counted (the caller then ends it on the engine)."""
        with self._slots:
            counted = session_id in self.sessions
            self.sessions.discard(session_id)
            self._slots.notify()
            return counted

    def _take(self, session_id: str) -> bool:
        """With the lock held: count the session if a place is free."""
        if session_id in self.sessions:  # checked under the lock: two streams cannot both open one id
            raise SessionOpenError(f"session {session_id!r} is already open on this shard")
        if len(self.sessions) >= self.max_sessions:
            return False
        self.sessions.add(session_id)
        return True

    def _busy(self, timeout: float) -> ShardBusyError:
        return ShardBusyError(
            f"{wire.BUSY}all {self.max_sessions} sessions of {self.model_id} layers [{self.start}, {self.end}) on "
            f"this node stayed in use for {timeout:g} s; try again later"
        )

    @property
    def held_bytes(self) -> int:
        """Weights plus one session's KV cache: what the planner counted for this shard."""
        return int(self.info["weight_bytes"]) + int(self.info["kv_bytes_per_session"])

    def to_pb(self) -> pb.ShardInfo:
        return pb.ShardInfo(
            shard_id=self.shard_id,
            model_id=self.model_id,
            start=self.start,
            end=self.end,
            num_layers=int(self.info["num_layers"]),
            device=str(self.info["device"]),
            dtype=str(self.info["dtype"]),
            weight_bytes=self.held_bytes,
            max_context=int(self.info["max_context"]),
            sessions=len(self.sessions),
            max_sessions=self.max_sessions,
            holders=len(self.holders),
            warmup_s=float(self.info.get("warmup_s") or 0.0),
            graphs_from_cache=bool(self.info.get("graphs_from_cache")),
            pipeline_chunk=int(self.info.get("pipeline_chunk") or 0),
        )


class ShardHost:
    def __init__(
        self,
        models_dir: Path,
        *,
        token: str,
        device: str | None = None,
        dtype: str | None = None,
        prefill_buckets: Sequence[int] | None = None,
        max_sessions: int = 8,
        session_wait: float = SESSION_WAIT_S,
        memory_budget: Callable[[], int | None] = lambda: None,
    ):
        self.models_dir = models_dir
        self.token = token
        self.device, self.dtype = device, dtype
        from cluster.engine.shard import default_device, default_dtype, dtype_name

        # the dtype the shards compute and keep their KV caches in: --dtype, else the device's default. Asked
        # here, on the constructing thread: tinygrad's device lookup uses a cache that its thread owns
        self.compute_dtype: str = dtype or dtype_name(default_dtype(device or default_device()))
        self.engine_options: dict[str, Any] = {"max_sessions": max_sessions}
        if prefill_buckets:
            self.engine_options["prefill_buckets"] = tuple(prefill_buckets)
        self.memory_budget = memory_budget
        self.session_wait = session_wait
        self.models: dict[str, Path] = {}  # model id -> a directory holding the whole checkpoint
        self.shards: dict[str, HostedShard] = {}
        self._loading: dict[tuple[Any, ...], Future[HostedShard]] = {}  # key -> a load under way
        self._lock = threading.Lock()
        self._pull_lock = threading.Lock()  # one pull at a time writes a model directory

    # ------------------------------------------------------------------------------------ files
    def register_model(self, model_id: str, path: Path) -> None:
        self.models[check_model_id(model_id)] = path

    def _pulled_dir(self, model_id: str) -> Path:
        return self.models_dir / check_model_id(model_id).replace("/", "--")

    def full_copy(self, model_id: str) -> Path | None:
        """A local directory with the whole checkpoint: registered, in --models-dir, or in the HF cache."""
        if model_id in self.models:
            return self.models[model_id]
        local = self._pulled_dir(model_id)
        if (local / "config.json").exists() and not (local / PARTIAL_MARKER).exists():
            return local
        if "/" in model_id:
            try:
                return resolve_model(model_id, offline=True, progress=False)
            except ModelNotFoundError:
                return None
        return None

    def served_copy(self, model_id: str) -> Path | None:
        """A directory whose tensors this node can send to a peer (whole, or pulled in part)."""
        full = self.full_copy(model_id)
        if full is not None:
            return full
        local = self._pulled_dir(model_id)
        return local if (local / "config.json").exists() else None

    def ensure_files(self, model_id: str, start: int, end: int, sources: Sequence[str], progress: Progress) -> Path:
        """A directory holding at least the tensors of layers [start, end): a local copy, else the tensors
        pulled from the first source that has them, else a Hugging Face download."""
        full = self.full_copy(model_id)
        if full is not None:
            return full
        errors = []
        for source in sources:
            try:
                return self._pull(model_id, start, end, source, progress)
            except (grpc.RpcError, transfer.TransferError, OSError, ValueError) as e:
                detail = e.details() if isinstance(e, grpc.RpcError) else str(e)  # type: ignore[attr-defined]
                log.warning("pulling %s from %s failed: %s", model_id, source, detail)
                errors.append(f"{source}: {detail}")
        if "/" in model_id:
            try:
                return resolve_model(model_id, progress=False)
            except ModelNotFoundError as e:
                errors.append(str(e))
        raise ModelUnavailableError(
            f"this node has no copy of {model_id} and could not get one ({'; '.join(errors) or 'no peer has it'})"
        )

    def _pull(self, model_id: str, start: int, end: int, source: str, progress: Progress) -> Path:
        dest = self._pulled_dir(model_id)
        with (
            self._pull_lock,
            auth.secure_channel(source, self.token, wire.channel_options(wire.SERVER_MAX_MESSAGE)) as ch,
        ):
            stub = pb_grpc.WorkerStub(ch)
            manifest = stub.GetManifest(pb.ManifestRequest(model_id=model_id), timeout=60)
            dest.mkdir(parents=True, exist_ok=True)
            (dest / PARTIAL_MARKER).touch()
            transfer.save_manifest_files(manifest, dest)
            cfg = ModelConfig.from_dir(dest)
            entries = {t.name: t for t in manifest.tensors}
            needed = transfer.layer_tensor_names(
                entries, start, end, cfg.num_layers, tie_word_embeddings=cfg.tie_word_embeddings
            )
            wanted = transfer.missing_tensors(dest, needed)
            if wanted:
                t0 = time.perf_counter()
                chunks = stub.PullTensors(pb.PullTensorsRequest(model_id=model_id, names=wanted))
                transfer.receive_tensors(
                    chunks, {n: entries[n] for n in wanted}, dest, progress=lambda d, t: progress("pull", d, t)
                )
                size = sum(entries[n].nbytes for n in wanted)
                log.info(
                    "pulled %d tensors (%.1f MiB) of %s from %s in %.1fs",
                    len(wanted),
                    size / wire.MiB,
                    model_id,
                    source,
                    time.perf_counter() - t0,
                )
        return dest

    # ------------------------------------------------------------------------------------ shards
    def load(
        self,
        model_id: str,
        start: int,
        end: int,
        *,
        max_context: int,
        sources: Sequence[str] = (),
        dtype: str | None = None,
        holder: str = "",
        progress: Progress = lambda stage, done, total: None,
    ) -> HostedShard:
        """Load and warm up layers [start, end); returns once the shard is ready to serve.

        A shard already loaded (or loading) with the same layers, context and dtype is shared instead: coordinators
        on different nodes place the same model over the same nodes, and one copy of it serves them all."""
        key = (model_id, start, end, max_context, dtype or "")
        while True:
            with self._lock:
                shared = next((s for s in self.shards.values() if s.key == key and s.engine.alive), None)
                if shared is not None:
                    shared.holders.append(holder)
                    log.info("sharing %s layers [%d, %d) (shard %s)", model_id, start, end, shared.shard_id[:8])
                    return shared
                pending = self._loading.get(key)
                if pending is None:
                    pending = self._loading[key] = Future()
                    break
            try:  # another placement is loading the same layers: use its shard, or load here if it failed
                pending.result()
            except Exception:  # noqa: BLE001 - its caller gets that error; this one tries for itself
                pass
        try:
            shard = self._load(key, sources, progress, holder)
            pending.set_result(shard)
            return shard
        except BaseException as e:
            pending.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._loading[key]

    def _load(self, key: tuple[Any, ...], sources: Sequence[str], progress: Progress, holder: str) -> HostedShard:
        model_id, start, end, max_context, dtype = key
        model_dir = self.ensure_files(model_id, start, end, sources, progress)
        options = {**self.engine_options, "max_context": max_context, "device": self.device}
        options["dtype"] = dtype or self.dtype
        budget = self.memory_budget()
        if budget is not None:
            options["memory_budget"] = budget
        engine = EngineProcess(model_dir, start, end, on_progress=progress, **options)
        try:
            engine.start()
            engine.warmup()
            info = engine.info()
        except BaseException:
            engine.close()
            raise
        # the engine lowers max_sessions to the KV caches its memory budget holds
        sessions = int(info["max_sessions"])
        shard = HostedShard(
            uuid.uuid4().hex,
            model_id,
            start,
            end,
            engine,
            info,
            key,
            [holder],
            max_sessions=sessions,
            session_wait=self.session_wait,
        )
        with self._lock:
            self.shards[shard.shard_id] = shard
        log.info("loaded %s layers [%d, %d) as shard %s", model_id, start, end, shard.shard_id[:8])
        return shard

    def shard(self, shard_id: str) -> HostedShard:
        try:
            return self.shards[shard_id]
        except KeyError:
            raise UnknownShardError(f"this node holds no shard {shard_id!r}") from None

    def live_shards(self) -> list[HostedShard]:
        """The shards that can serve: an engine process that died is left out (its placement loads it again)."""
        return [s for s in list(self.shards.values()) if s.engine.alive]

    def shard_infos(self) -> list[pb.ShardInfo]:
        """What Info reports of this node's shards (the live ones)."""
        return [s.to_pb() for s in self.live_shards()]

    def unload(self, shard_id: str, holder: str = "") -> None:
        """One placement of `holder` lets go of the shard; the engine closes when no placement holds it."""
        with self._lock:
            shard = self.shards.get(shard_id)
            if shard is None:
                raise UnknownShardError(f"this node holds no shard {shard_id!r}")
            # a hold of another (or an unnamed) holder goes when this one has none: nothing is held twice
            shard.holders.remove(holder if holder in shard.holders else shard.holders[0])
            if shard.holders:
                return
            del self.shards[shard_id]
        self._close(shard)

    def release_holder(self, holder: str) -> None:
        """A coordinating node left the cluster: its holds go, and shards nobody else holds are unloaded."""
        closing = []
        with self._lock:
            for shard in list(self.shards.values()):
                if holder in shard.holders:
                    shard.holders = [h for h in shard.holders if h != holder]
                    if not shard.holders:
                        closing.append(self.shards.pop(shard.shard_id))
        for shard in closing:
            log.info("%s layers [%d, %d): its coordinator left", shard.model_id, shard.start, shard.end)
            self._close(shard)

    def _close(self, shard: HostedShard) -> None:
        shard.engine.close()
        log.info("unloaded %s layers [%d, %d)", shard.model_id, shard.start, shard.end)

    def held_bytes(self) -> int:
        return sum(s.held_bytes for s in list(self.shards.values()))

    def close(self) -> None:
        with self._lock:
            shards, self.shards = list(self.shards.values()), {}
        for shard in shards:
            self._close(shard)
