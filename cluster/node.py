"""`clusterctl join`: one node of the cluster. It serves the Worker and Cluster gRPC services and the standard
health service, announces itself over mDNS, keeps the member list, and coordinates the requests it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cluster import __version__, auth
from cluster.coordinator import Coordinator
from cluster.discovery import PROTOCOL_VERSION, Discovery, Peer
from cluster.host import SESSION_WAIT_S, ShardHost, default_models_dir
from cluster.memory import DeviceMemory, device_kind, device_memory
from cluster.partition import Plan, format_plan
from cluster.rpc import wire
from cluster.rpc.cluster_service import ClusterService
from cluster.rpc.pb import cluster_pb2 as pb
from cluster.rpc.pb import cluster_pb2_grpc as pb_grpc
from cluster.rpc.worker import WorkerService

log = logging.getLogger(__name__)
GiB = 1 << 30


@dataclass(frozen=True)
class NodeSettings:
    host: str = "0.0.0.0"
    port: int = 50051  # 0: any free port
    name: str = field(default_factory=socket.gethostname)
    device: str | None = None
    dtype: str | None = None
    memory_gib: float | None = None
    models_dir: Path = field(default_factory=default_models_dir)
    peers: tuple[str, ...] = ()
    mdns: bool = True
    mdns_interfaces: tuple[str, ...] | None = None  # None: every interface of the host
    max_context: int = 4096
    max_sessions: int = 8  # per shard; more requests wait for a session to end
    session_wait: float = SESSION_WAIT_S  # seconds a request waits for a free session before it is refused as busy
    prefill_buckets: tuple[int, ...] | None = None
    session_timeout: float = 600.0
    health_interval: float = 1.0
    drop_after: float = 3.0
    token: str = ""  # the cluster token (required): TLS, per-call auth and the mDNS fingerprint derive from it
    api_port: int | None = 8000  # the OpenAI-compatible API and dashboard; None: off


def _advertised_host(settings: NodeSettings) -> str:
    if settings.mdns_interfaces:
        return settings.mdns_interfaces[0]
    if settings.host not in ("", "0.0.0.0", "::"):
        return settings.host
    try:  # the address this host uses to reach others (no packet is sent by a UDP connect)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


class Node:
    def __init__(self, settings: NodeSettings):
        if not settings.token:
            raise ValueError("a node needs the cluster token")
        self.settings = settings
        self.fingerprint = auth.fingerprint(settings.token)
        self.node_id = uuid.uuid4().hex
        self.device = settings.device or _default_device()  # --device, else $DEV, else tinygrad's pick
        self.kind = device_kind(self.device)
        os.environ["DEV"] = self.device  # engine processes inherit it, so they compute where the node says
        self.host = ShardHost(
            settings.models_dir,
            token=settings.token,
            device=settings.device,
            dtype=settings.dtype,
            prefill_buckets=settings.prefill_buckets,
            max_sessions=settings.max_sessions,
            session_wait=settings.session_wait,
            memory_budget=self._budget,
        )
        self.server: grpc.aio.Server | None = None
        self.port = settings.port
        self.discovery: Discovery | None = None
        self.coordinator: Coordinator | None = None
        self.worker: WorkerService | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._last_free = -1
        self._known: dict[str, pb.NodeInfo] = {}  # the last Info each peer answered
        self.health: health.aio.HealthServicer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.api: Any = None  # the uvicorn server

    # ------------------------------------------------------------------------------------ facts
    def _device_memory(self) -> DeviceMemory:
        override = int(self.settings.memory_gib * GiB) if self.settings.memory_gib is not None else None
        return device_memory(self.device, override=override, used=self.host.held_bytes())

    def _memory(self) -> tuple[int, int]:
        mem = self._device_memory()
        return mem.total, mem.free

    def _budget(self) -> int | None:
        """What a new shard may use: what the user granted with --memory, else what the device reports free.
        The engine refuses a shard that does not fit and serves no more sessions than their KV caches fit."""
        mem = self._device_memory()
        return mem.free if mem.of_device else None

    @property
    def address(self) -> str:
        return f"{_advertised_host(self.settings)}:{self.port}"

    def me(self) -> Peer:
        total, free = self._memory()
        return Peer(
            node_id=self.node_id,
            name=self.settings.name,
            host=_advertised_host(self.settings),
            port=self.port,
            protocol_version=PROTOCOL_VERSION,
            device=self.device,
            device_kind=self.kind,
            total_memory=total,
            free_memory=free,
            token_fingerprint=self.fingerprint,
            source="self",
        )

    def info(self) -> pb.NodeInfo:
        me = self.me()
        return pb.NodeInfo(
            node_id=me.node_id,
            name=me.name,
            protocol_version=PROTOCOL_VERSION,
            version=__version__,
            device=me.device,
            device_kind=me.device_kind,
            total_memory=me.total_memory,
            free_memory=me.free_memory,
            host=me.host,
            port=me.port,
            shards=self.host.shard_infos(),
            token_fingerprint=me.token_fingerprint,
            peers=[p.address for p in self.discovery.peers()] if self.discovery else [],
            dtype=self.host.compute_dtype,
        )

    def learn(self, address: str) -> None:
        """A node called us or a peer knows it: probe it, so that --peer networks find every member."""
        if self.discovery is not None and address and address != self.address:
            self.discovery.add_peer(address)

    def members(self) -> list[Peer]:
        peers = self.discovery.peers() if self.discovery else []
        return [self.me(), *peers]

    async def nodes(self) -> list[pb.NodeInfo]:
        """What `clusterctl nodes` shows: this node, then every peer as it answers now (its last known record
        if it does not answer in time)."""
        peers = self.discovery.peers() if self.discovery else []

        async def ask(peer: Peer) -> pb.NodeInfo:
            try:
                return await self._info_of(peer.address, live_memory=True)
            except (grpc.RpcError, asyncio.TimeoutError):
                return self._known.get(peer.node_id) or _peer_info(peer)

        own = self.info()
        if self.worker is not None:
            try:
                await asyncio.wait_for(self.worker.add_live_memory(own), timeout=5)
            except asyncio.TimeoutError:
                pass  # an engine busy with a long step: show the node without its live figures
        return [own, *await asyncio.gather(*(ask(p) for p in peers))]

    # ------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        s = self.settings
        # every call, the health service's included, must carry the cluster's bearer value over mutual TLS
        self.server = grpc.aio.server(options=wire.server_options(), interceptors=[auth.BearerCheck(s.token)])
        self.coordinator = Coordinator(
            self.host,
            self.members,
            token=s.token,
            self_id=self.node_id,
            self_address=f"127.0.0.1:{self.port}",  # set again below once the port is known
            max_context=s.max_context,
        )
        self.coordinator.on_plan = _log_plan
        self.worker = WorkerService(self.host, self.info, learn=self.learn, session_timeout=s.session_timeout)
        pb_grpc.add_WorkerServicer_to_server(self.worker, self.server)
        pb_grpc.add_ClusterServicer_to_server(ClusterService(self.coordinator, self.nodes), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_secure_port(f"{s.host}:{s.port}", auth.server_credentials(s.token))
        if self.port == 0:
            raise OSError(f"cannot listen on {s.host}:{s.port} (in use?)")
        self.coordinator.self_address = self.address
        await self.server.start()
        self.discovery = Discovery(
            self.me(),
            probe=self._probe,
            mdns=s.mdns,
            interfaces=list(s.mdns_interfaces) if s.mdns_interfaces else None,
            static_peers=s.peers,
            health_interval=s.health_interval,
            drop_after=s.drop_after,
            on_change=self._member_changed,
        )
        await self.discovery.start()
        if s.api_port is not None:
            try:
                await self._start_api(s.api_port)
            except OSError as e:  # e.g. a second node on this host: it still serves the cluster, without an API
                log.warning("%s; this node serves no HTTP API (choose another with --api-port)", e)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        task = asyncio.ensure_future(self._announce_memory())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info("node %s (%s, %s) listening on %s", s.name, self.device, _gib(self.me().free_memory), self.address)

    def _member_changed(self, event: str, peer: Peer) -> None:
        _log_member(event, peer)
        if event == "left":
            # shards placed for a coordinator that left are nobody's now (closing an engine takes a moment)
            threading.Thread(target=self.host.release_holder, args=(peer.node_id,), daemon=True).start()
            if self.coordinator is not None:
                self.coordinator.node_left(peer.node_id)
        if event in ("joined", "left") and self.coordinator is not None:
            self.coordinator.release_stale()

    async def _info_of(self, address: str, live_memory: bool = False) -> pb.NodeInfo:
        channel = self._channels.get(address)
        if channel is None:
            options = wire.channel_options(64 << 20)
            channel = self._channels[address] = auth.secure_aio_channel(address, self.settings.token, options)
        request = pb.NodeInfoRequest(caller=self.address, live_memory=live_memory)
        timeout = 5.0 if live_memory else self.settings.health_interval * 2
        info = await pb_grpc.WorkerStub(channel).Info(request, timeout=timeout)
        self._known[info.node_id] = info
        return info

    async def _probe(self, address: str) -> Peer:
        info = await self._info_of(address)
        for known in info.peers:
            self.learn(known)
        host, _, port = address.rpartition(":")
        return replace(_peer_from_info(info), host=host, port=int(port))

    async def _announce_memory(self) -> None:
        """Re-announce when free memory moves by more than 1% (planners read it from the TXT record)."""
        while True:
            await asyncio.sleep(self.settings.health_interval)
            me = self.me()
            if abs(me.free_memory - self._last_free) > max(me.total_memory // 100, 1):
                self._last_free = me.free_memory
                if self.discovery is not None:
                    await self.discovery.update(me)

    async def _start_api(self, port: int) -> None:
        from cluster.api.server import create_app

        assert self.coordinator is not None
        app = create_app(self.coordinator, self.settings.token, self.status)
        # bound here, so that a port in use is this node's error, not uvicorn's exit
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.host, port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot serve the HTTP API on {self.settings.host}:{port}: {e.strerror}") from None
        self.api_port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.api = _QuietServer(config)
        task = asyncio.ensure_future(self.api.serve(sockets=[sock]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info("HTTP API and dashboard on http://%s:%d/", _advertised_host(self.settings), self.api_port)

    async def status(self) -> dict[str, Any]:
        """What the dashboard shows: members with their shards, the current plans, speed per model."""
        nodes = [wire.node_info_dict(n) for n in await self.nodes()]
        assert self.coordinator is not None
        plans = [
            {
                "model_id": p.model_id,
                "num_layers": p.plan.num_layers,
                "sessions": p.active,
                "shards": [{"name": s.name, "address": s.address, "layers": [s.start, s.end]} for s in p.shards],
            }
            for p in list(self.coordinator.placements.values())
        ]
        stats = {m: dataclasses.asdict(st) for m, st in self.coordinator.stats.items()}
        return {
            "node": {"name": self.settings.name, "address": self.address},
            "nodes": nodes,
            "plans": plans,
            "models": stats,
        }

    async def stop(self, grace: float = 2.0) -> None:
        if self.api is not None:
            self.api.should_exit = True
        for task in list(self._tasks):
            task.cancel()
        if self.discovery is not None:
            await self.discovery.stop()  # says goodbye
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        if self.coordinator is not None:
            await asyncio.to_thread(self.coordinator.close)
        await asyncio.to_thread(self.host.close)
        for channel in self._channels.values():
            await channel.close()

    async def serve(self, stopped: asyncio.Event) -> None:
        await self.start()
        try:
            await stopped.wait()
        finally:
            await self.stop()


def _default_device() -> str:
    from cluster.engine.shard import default_device

    return default_device()


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB free"


def _peer_from_info(info: pb.NodeInfo) -> Peer:
    return Peer(
        node_id=info.node_id,
        name=info.name,
        host=info.host,
        port=info.port,
        protocol_version=info.protocol_version,
        device=info.device,
        device_kind=info.device_kind,
        total_memory=info.total_memory,
        free_memory=info.free_memory,
        token_fingerprint=info.token_fingerprint,
        source="peer",
    )


def _peer_info(peer: Peer) -> pb.NodeInfo:
    return pb.NodeInfo(
        node_id=peer.node_id,
        name=peer.name,
        protocol_version=peer.protocol_version,
        device=peer.device,
        device_kind=peer.device_kind,
        total_memory=peer.total_memory,
        free_memory=peer.free_memory,
        host=peer.host,
        port=peer.port,
        token_fingerprint=peer.token_fingerprint,
    )


def _log_member(event: str, peer: Peer) -> None:
    if event in ("joined", "left"):  # info: `join` shows it; the node inside `run` keeps quiet
        log.info(
            "node %s %s: %s (%s, %s) at %s",
            peer.name,
            event,
            peer.node_id[:8],
            peer.device,
            _gib(peer.free_memory),
            peer.address,
        )


def _log_plan(plan: Plan) -> None:
    ranges = ", ".join(f"{a.name} [{a.start},{a.end})" for a in plan.shards)
    log.info("plan for %s: %s", plan.model_id, ranges)


class _QuietServer(uvicorn.Server):
    """uvicorn inside the node's event loop: the node, not uvicorn, handles SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class NodeThread:
    """A node running in a background thread of this process (what `clusterctl run` starts when no node answers)."""

    def __init__(self, settings: NodeSettings):
        self.node = Node(settings)
        self._loop = asyncio.new_event_loop()
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="node", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stopped = asyncio.Event()
            try:
                await self.node.start()
            except BaseException as e:  # noqa: BLE001
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            try:
                await self._stopped.wait()
            finally:
                await self.node.stop(grace=0.5)

        self._loop.run_until_complete(main())

    def start(self) -> NodeThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._stopped is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(timeout=30)


__all__ = ["Node", "NodeSettings", "NodeThread", "format_plan"]
