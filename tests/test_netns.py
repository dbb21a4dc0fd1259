"""Three hosts in network namespaces on one bridge, made and removed by the test: only host 1 has the model's files,
hosts 2 and 3 pull the tensors of their layers from it, the nodes find each other over real mDNS inside the
namespaces, and the output equals a local run.

The network (scripts/netns.py): a "switch" namespace holding a bridge, and three host namespaces, each with one veth
pair whose other end is a port of that bridge. Nothing is created in the machine's own namespace, and a host
namespace holds only `lo` and its veth, so mDNS (and everything else the nodes send) can only reach the other hosts
through the bridge.

Reference: the single-node engine run locally, `clusterctl run MODEL PROMPT --raw --json --local` in the machine's
own namespace, greedy; the cluster's tokens must be the same.

Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and `ip` from iproute2; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from checkpoints import deepen
from cluster_nodes import ROOT
from conftest import FIXTURES

sys.path.insert(0, str(ROOT / "scripts"))  # scripts/netns.py: the namespaces, shared with demo/run_demo.py
from netns import NetnsError, Network, ip, stop, unavailable  # noqa: E402

pytestmark = pytest.mark.slow  # three hosts in network namespaces: make test-slow (CI runs it)

PROMPT = "The small river runs past"
MAX_TOKENS = 12
PORT = 50051
HOSTS = (1, 2, 3)
NUM_LAYERS = 6
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _links(ns: str | None) -> list[dict[str, Any]]:
    """`ip -s link` of a namespace (None: the machine's own) as JSON: names, states, counters."""
    return json.loads(ip(*(["-n", ns] if ns else []), "-j", "-s", "link", "show"))


@pytest.fixture
def network() -> Iterator[Network]:
    why = unavailable("cx")
    if why is not None:
        pytest.skip(f"network namespaces: {why}")
    net = Network("cx" + secrets.token_hex(3))
    try:
        net.build(len(HOSTS))  # removes what it made when it fails
    except (NetnsError, OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot make network namespaces here: {e}")
    try:
        yield net
    finally:
        net.remove()  # also kills what still runs inside (a node's engine process, say)


class HostNode:
    """`clusterctl join` inside host k's namespace, announcing and browsing mDNS only on its veth."""

    def __init__(self, net: Network, k: int, models_dir: Path, log_path: Path):
        self.net, self.k, self.name, self.models_dir, self.log_path = net, k, f"host{k}", models_dir, log_path
        models_dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "cluster.cli", "join", "--host", net.addr(k), "--port", str(PORT)]
        args += ["--name", self.name, "--memory", "1", "--mdns-interface", net.addr(k)]
        args += ["--models-dir", str(models_dir)]
        self._log = open(log_path, "w")
        # `ip netns exec` execs the command in place, so the pid is the node's own
        self.proc = subprocess.Popen(
            net.exec(k, *args),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            cwd=ROOT,
        )

    def stop(self) -> None:
        stop(self.proc)
        self._log.close()


def _cli(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def _summary(stdout: str) -> dict[str, Any]:
    """The last line of `run --json`: `{"done": true, "tokens": [...], ...}`."""
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert lines and lines[-1].get("done") is True, stdout
    assert [t["id"] for t in lines[:-1]] == lines[-1]["tokens"]
    return lines[-1]


def _poll(fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float, what: str) -> Any:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = fetch()
        if done(last):
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last answer: {last}")


def test_three_hosts_in_namespaces_pull_their_layers_and_give_the_local_tokens(network: Network, tmp_path: Path):
    net = network
    model = deepen(FIXTURES / "llama32", tmp_path / "host1-files" / "llama32", NUM_LAYERS)  # host 1's alone
    nodes: list[HostNode] = []
    cli = [sys.executable, "-m", "cluster.cli"]
    h1 = f"{net.addr(1)}:{PORT}"
    local: subprocess.Popen[str] | None = None
    try:
        for k in HOSTS:  # one at a time, so that teardown stops those started before a failure
            nodes.append(HostNode(net, k, tmp_path / f"host{k}-models", tmp_path / f"host{k}.log"))
        # the reference runs in the machine's own namespace while the nodes start
        local = subprocess.Popen(
            [*cli, "run", str(model), PROMPT, "--raw", "--json", "--max-tokens", str(MAX_TOKENS)]
            + ["--temperature", "0", "--local"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )

        def members() -> dict[str, Any]:
            for n in nodes:
                assert n.proc.poll() is None, f"{n.name} exited:\n{n.log_path.read_text()}"
            p = _cli(net.exec(1, *cli, "nodes", "--node", h1, "--json"), timeout=30)
            return {n["name"]: n for n in json.loads(p.stdout)} if p.returncode == 0 else {}

        # no --peer anywhere: host 1 can only learn of hosts 2 and 3 over mDNS on the bridge
        _poll(members, lambda m: set(m) == {"host1", "host2", "host3"}, 60, "mDNS discovery inside the namespaces")

        run = _cli(
            net.exec(1, *cli, "run", str(model), PROMPT, "--raw", "--json", "--max-tokens", str(MAX_TOKENS))
            + ["--temperature", "0", "--node", h1],
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        got = _summary(run.stdout)
        out, err = local.communicate(timeout=120)
        assert local.returncode == 0, err
        assert got["tokens"] == _summary(out)["tokens"] and len(got["tokens"]) == MAX_TOKENS

        # each host holds one shard of the model; together they cover every layer, two each (equal memory)
        held = {
            name: [tuple(s["layers"]) for s in n["shards"] if s["model_id"] == "llama32"]
            for name, n in members().items()
        }
        assert all(len(ranges) == 1 for ranges in held.values()), held
        ranges = {name: r[0] for name, r in held.items()}
        assert sorted(ranges.values()) == [(0, 2), (2, 4), (4, 6)], held

        # hosts 2 and 3 had no files: they pulled exactly their layers' tensors from host 1, into their own dirs
        for n in nodes[1:]:
            start, end = ranges[n.name]
            pulled_dir = n.models_dir / "llama32"
            assert list(pulled_dir.glob("pulled-*.safetensors")), sorted(p.name for p in n.models_dir.rglob("*"))
            assert not (pulled_dir / "model.safetensors").exists()
            names = set(json.loads((pulled_dir / "model.safetensors.index.json").read_text())["weight_map"])
            layers = {int(m.group(1)) for m in map(_LAYER.match, names) if m}
            assert layers == set(range(start, end)), (n.name, sorted(names))
            others = {name.rsplit(".", 1)[0] for name in names if not _LAYER.match(name)}
            expected = set()
            if start == 0 or end == NUM_LAYERS:  # the embedding table is tied to lm_head in this fixture
                expected.add("model.embed_tokens")
            if end == NUM_LAYERS:
                expected.add("model.norm")
            assert others == expected, (n.name, start, end, sorted(names))
        assert not list(nodes[0].models_dir.rglob("*.safetensors"))  # host 1 used its own files

        # the mDNS traffic stayed inside: the hosts have nothing but lo and their veth, the bridge carried
        # their multicast, and the machine's own namespace holds none of the test's interfaces
        for k in HOSTS:
            assert sorted(link["ifname"] for link in _links(net.hosts[k - 1])) == sorted(["lo", net.veth(k)])
        assert not [link["ifname"] for link in _links(None) if link["ifname"].startswith(net.tag)]
        switch = {link["ifname"]: link for link in _links(net.switch)}
        assert sorted(switch) == ["br0", "lo", "p1", "p2", "p3"]
        assert switch["br0"]["stats64"]["rx"]["multicast"] > 0  # the bridge floods link-local multicast to itself
    except BaseException:
        for n in nodes:
            print(f"----- {n.name} ({n.log_path}) -----\n{n.log_path.read_text()}", file=sys.stderr)
        raise
    finally:
        if local is not None and local.poll() is None:
            local.kill()
            local.wait()
        for n in nodes:
            n.stop()
