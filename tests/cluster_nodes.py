"""Real `clusterctl join` processes on 127.0.0.1 for the cluster tests (mDNS, when used, stays on loopback)."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cluster.client import Client

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NodeProcess:
    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        memory: float | None = None,
        peers: Sequence[str] = (),
        mdns: bool = True,
        token: str | None = None,
        api_port: int | None = None,
        extra_args: Sequence[str] = (),
    ):
        """token: this node's cluster token (default: the test run's, from $CLUSTERCTL_TOKEN); extra_args: more
        `join` flags."""
        self.token = token
        self.name = name
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        args = [sys.executable, "-m", "cluster.cli", "join", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--name", name, "--models-dir", str(workdir / f"{name}-models")]
        if memory is not None:
            args += ["--memory", str(memory)]
        args += ["--mdns-interface", "127.0.0.1"] if mdns else ["--no-mdns"]
        for peer in peers:
            args += ["--peer", peer]
        args += ["--api-port", str(api_port)] if api_port is not None else ["--no-api"]
        args += list(extra_args)
        self.api_port = api_port
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if token is not None:
            env["CLUSTERCTL_TOKEN"] = token
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def client(self) -> Client:
        return Client(self.address, token=self.token)

    def wait_ready(self, timeout: float = 60) -> None:
        with self.client() as c:
            if not c.wait_ready(timeout):
                raise RuntimeError(f"{self.name} did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def member_names(node: NodeProcess) -> set[str]:
    with node.client() as c:
        return {n.name for n in c.nodes()}


def shards_of(nodes: Sequence[NodeProcess], model_id: str) -> list[tuple[NodeProcess, Any]]:
    """(node, ShardInfo) of every shard of the model on these nodes, in layer order (the chain's order)."""
    from cluster import auth
    from cluster.rpc.pb import cluster_pb2 as pb
    from cluster.rpc.pb import cluster_pb2_grpc as pb_grpc

    found = []
    for node in nodes:
        with auth.secure_channel(node.address, node.token or os.environ["CLUSTERCTL_TOKEN"], []) as channel:
            info = pb_grpc.WorkerStub(channel).Info(pb.NodeInfoRequest(), timeout=5)
        found += [(node, s) for s in info.shards if s.model_id == model_id]
    return sorted(found, key=lambda ns: ns[1].start)


@contextmanager
def every_session_taken(node: NodeProcess, shard: Any) -> Iterator[None]:
    """Take every place among the shard's sessions with Forward streams of our own, straight to its node (each
    opens its session with a message that carries no input); they end when the block does."""
    from cluster import auth
    from cluster.rpc.pb import cluster_pb2 as pb
    from cluster.rpc.pb import cluster_pb2_grpc as pb_grpc

    channel = auth.secure_channel(node.address, node.token or os.environ["CLUSTERCTL_TOKEN"], [])
    held: list[tuple[queue.SimpleQueue, Any]] = []
    try:
        for _ in range(shard.max_sessions):
            requests: queue.SimpleQueue = queue.SimpleQueue()
            responses = pb_grpc.WorkerStub(channel).Forward(iter(requests.get, None))
            requests.put(pb.ForwardRequest(shard_id=shard.shard_id, session_id=uuid.uuid4().hex))
            next(responses)  # answered once the session is open
            held.append((requests, responses))
        yield
    finally:
        for requests, responses in held:
            requests.put(None)
            responses.cancel()
        channel.close()


def open_sessions(node: NodeProcess) -> int:
    """Sessions open on every shard of the cluster, as `node` sees its members."""
    with node.client() as c:
        return sum(s["sessions"] for n in c.nodes() for s in n.shards)
