"""Closed to strangers: every RPC of a real node refuses callers without the cluster token, and clusters with
different tokens on one LAN (here: mDNS on loopback) never see or use each other."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import grpc
import pytest
from checkpoints import deepen
from cluster_nodes import ROOT, NodeProcess, member_names, wait_for
from conftest import FIXTURES, TEST_TOKEN
from grpc_health.v1 import health_pb2

from cluster import auth
from cluster.client import Client, NotAuthorised
from cluster.rpc.pb import cluster_pb2

SERVICES = [cluster_pb2.DESCRIPTOR.services_by_name["Worker"], cluster_pb2.DESCRIPTOR.services_by_name["Cluster"]]
SERVICES.append(health_pb2.DESCRIPTOR.services_by_name["Health"])
EVERY_RPC = [(s.full_name, m) for s in SERVICES for m in s.methods]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = NodeProcess("guarded", tmp_path_factory.mktemp("auth"), memory=1, mdns=False)
    n.wait_ready()
    yield n
    n.stop()


def _call(channel: grpc.Channel, service: str, method) -> list[bytes]:
    """Call METHOD with an empty request; return every response message received before the call ended."""
    path = f"/{service}/{method.name}"
    ident = (lambda b: b), (lambda b: b)
    if method.client_streaming and method.server_streaming:
        return list(channel.stream_stream(path, *ident)(iter([b""]), timeout=5))
    if method.client_streaming:
        return [channel.stream_unary(path, *ident)(iter([b""]), timeout=5)]
    if method.server_streaming:
        return list(channel.unary_stream(path, *ident)(b"", timeout=5))
    return [channel.unary_unary(path, *ident)(b"", timeout=5)]


def _cluster_tls(token: str) -> grpc.ChannelCredentials:
    """TLS with a certificate of the cluster but without the per-call bearer value."""
    ident = auth.tls_identity(token)
    return grpc.ssl_channel_credentials(ident.ca_pem, ident.key_pem, ident.cert_pem)


STRANGERS = {
    "plaintext": lambda addr: grpc.insecure_channel(addr),
    "cluster TLS, no bearer": lambda addr: grpc.secure_channel(addr, _cluster_tls(TEST_TOKEN), auth.channel_options()),
    "cluster TLS, wrong bearer": lambda addr: grpc.secure_channel(
        addr,
        grpc.composite_channel_credentials(_cluster_tls(TEST_TOKEN), grpc.access_token_call_credentials("guess")),
        auth.channel_options(),
    ),
    "another cluster's token": lambda addr: auth.secure_channel(addr, "another-token", []),
}


@pytest.mark.parametrize("who", sorted(STRANGERS))
def test_every_rpc_refuses_callers_without_the_token(node, who):
    refused = []
    with STRANGERS[who](node.address) as channel:
        for service, method in EVERY_RPC:
            with pytest.raises(grpc.RpcError) as err:
                got = _call(channel, service, method)
                pytest.fail(f"{service}/{method.name} answered {who}: {got!r}")
            code = err.value.code()
            # refused at the handshake, or by the bearer check before any handler ran
            assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED), (method.name, code)
            if code == grpc.StatusCode.UNAUTHENTICATED:
                assert "not authorised" in err.value.details()
            refused.append(method.name)
    assert len(refused) == len(EVERY_RPC) >= 13
    with node.client() as c:  # and the node still serves its own cluster
        assert [n.name for n in c.nodes()] == ["guarded"]


def test_a_wrong_token_gets_a_clear_not_authorised_error(node):
    with Client(node.address, token="wrong") as c, pytest.raises(NotAuthorised, match="not authorised"):
        c.nodes()
    p = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "nodes", "--node", node.address, "--token", "wrong"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert p.returncode == 1 and "not authorised" in p.stderr and "Traceback" not in p.stderr


def test_the_first_join_creates_a_private_token_and_prints_the_join_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CLUSTERCTL_TOKEN"}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    args = [sys.executable, "-m", "cluster.cli", "join", "--host", "127.0.0.1", "--port", "0", "--no-mdns", "--no-api"]
    args += ["--models-dir", str(tmp_path / "models")]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        lines = [proc.stderr.readline() for _ in range(2)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    path = tmp_path / "config" / "clusterctl" / "token"
    token = path.read_text().strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) >= 32
    assert str(path) in lines[0] and lines[1].strip() == f"clusterctl join --token {token}"


def test_a_node_of_another_cluster_is_not_listed_and_never_gets_a_shard(tmp_path):
    model = deepen(FIXTURES / "llama32", tmp_path / "model" / "llama32", 6)
    ours = [NodeProcess(f"ours{i}", tmp_path, memory=1) for i in (1, 2)]
    theirs = NodeProcess("theirs", tmp_path, memory=8, token="another-cluster")  # the biggest node on the LAN
    try:
        for n in (*ours, theirs):
            n.wait_ready()
        wait_for(lambda: member_names(ours[0]) == {"ours1", "ours2"}, 30, "our nodes to find each other")
        time.sleep(2)  # several announcement rounds of the other cluster's node have passed
        assert member_names(ours[0]) == {"ours1", "ours2"} and member_names(theirs) == {"theirs"}
        with ours[0].client() as c:
            assert {s["name"] for s in c.plan(str(model)).shards} == {"ours1", "ours2"}
            *_, last = c.generate(str(model), "Hello", raw=True, max_tokens=4, temperature=0)
            assert last.finish_reason == "length"
        with theirs.client() as c:
            assert [n.shards for n in c.nodes()] == [[]]
    finally:
        for n in (*ours, theirs):
            n.stop()
