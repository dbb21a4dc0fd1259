"""Cluster benchmark on loopback: decode tok/s through 1, 2 and 3 nodes, and the latency each hop adds.

    .venv/bin/python bench/bench_cluster.py --out bench/RESULTS.md

For each node count N, starts N `clusterctl join` processes on 127.0.0.1 (same --memory, so the layers split
evenly; every node finds the checkpoint in the shared --models-dir, so no weights travel), sends one request
to place the shards, then times requests through the first node: decode tok/s and TTFT as that coordinating
node measures them. The clusters for every N are up at once and the timed requests take turns between them,
so other load on the machine falls on every N alike. Then the same over a tiny model, where a decode step is
mostly fixed cost, for the latency each extra node adds per token. The plain in-process ShardEngine and the
memory-bandwidth floor are measured in the same run. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from bench_engine import cpu_model, measure_engine, memory_gib, read_bandwidth
from random_checkpoint import CORPUS, PRESETS, ensure_checkpoint
from tokenizers import Tokenizer

from cluster.client import Client
from cluster.engine.shard import default_device

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
NODE_MEMORY_GIB = 4.0  # the same on every node: the planner then splits the layers evenly
PLACE_TIMEOUT_S = 1200.0  # the first request loads and compiles every shard (a minute or more for the 1B model)
REQUEST_TIMEOUT_S = 600.0
SPEED_BAR = 0.90  # N nodes keep at least this share of one node's decode tok/s
HOP_BAR_MS = 1.0  # each hop adds at most this per token


# ---------------------------------------------------------------------------------------------- nodes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    """One `clusterctl join` process on loopback, in its own process group with its engine processes."""

    def __init__(self, name: str, models_dir: Path, log_path: Path, peers: list[str], core: int | None = None):
        self.name = name
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        args = [sys.executable, "-m", "cluster.cli", "join", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--name", name, "--memory", str(NODE_MEMORY_GIB), "--models-dir", str(models_dir)]
        args += ["--no-mdns", "--no-api"]  # nodes meet through --peer; the HTTP API's port would collide
        for peer in peers:
            args += ["--peer", peer]
        if core is not None:  # a box of one core: the node and its engine process (which inherits this) on one
            args = ["taskset", "--cpu-list", str(core), *args, "--cpu-threads", "1"]
        self._log = open(self.log_path, "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the cluster token travels in $CLUSTERCTL_TOKEN (see main)
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:]

    def stop(self) -> None:
        """SIGTERM (the node unloads its shards), then SIGKILL to the whole group if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # engine processes left behind, if any
        self.proc.wait()
        self._log.close()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, nodes: list[Node]) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        for n in nodes:
            if n.proc.poll() is not None:
                raise RuntimeError(f"node {n.name} exited ({n.proc.returncode}):\n{n.log_tail()}")
        try:
            if predicate():
                return
        except Exception as e:  # noqa: BLE001 - a node still starting refuses; the last error is reported
            last = e
        time.sleep(0.25)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")


@contextlib.contextmanager
def cluster(n: int, models_dir: Path, log_dir: Path, pin: bool = False) -> Iterator[list[Node]]:
    """N nodes that all know the first (and no other cluster's); stopped on the way out, errors included.
    pin: node i (with its engine process) runs on core i alone, as if each node were a one-core machine."""
    nodes: list[Node] = []
    try:
        for i in range(n):
            log_path = log_dir / f"{n}-nodes-n{i + 1}.log"
            core = i % (os.cpu_count() or 1) if pin else None
            nodes.append(Node(f"n{i + 1}", models_dir, log_path, [nodes[0].address] if nodes else [], core))

        def all_members() -> bool:
            with Client(nodes[0].address) as c:
                return len(c.nodes()) == n

        wait_for(all_members, 120, f"{n} members at {nodes[0].name}", nodes)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class Run:
    ttft_ms: float
    decode_tok_s: float
    tokens: int
    prompt_tokens: int
    shards: list[dict[str, Any]]  # the coordinating node's timing of each shard: node, layers, engine_ms, wait_ms


@dataclass
class Result:
    nodes: int
    layers: list[str]  # "name [start, end)" per shard
    place_s: float
    runs: list[Run] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return statistics.median(r.decode_tok_s for r in self.runs)

    @property
    def ms_per_token(self) -> float:
        return statistics.median(1e3 / r.decode_tok_s for r in self.runs)

    @property
    def ttft_ms(self) -> float:
        return statistics.median(r.ttft_ms for r in self.runs)

    def step_split(self) -> list[dict[str, Any]]:
        """Per shard, medians over the runs of its engine's ms per decode step and of the coordinator's wait for it."""
        return [
            {
                "shard": f"{first['node']} [{first['layers'][0]}, {first['layers'][1]})",
                "engine_ms": statistics.median(run.shards[i]["engine_ms"] for run in self.runs),
                "wait_ms": statistics.median(run.shards[i]["wait_ms"] for run in self.runs),
            }
            for i, first in enumerate(self.runs[0].shards)
        ]


def request(address: str, model_dir: Path, prompt: str, tokens: int, timeout: float) -> Run:
    with Client(address, timeout=timeout) as c:
        chunks = list(c.generate(str(model_dir), prompt, raw=True, max_tokens=tokens, temperature=0))
    last = chunks[-1]
    assert last.timing is not None and last.usage is not None and last.tokens is not None
    t, prompt_tokens = last.timing, last.usage["prompt_tokens"]
    return Run(t["ttft_ms"], t["decode_tok_s"], len(last.tokens), prompt_tokens, t["shards"])


def placement(address: str, model_id: str) -> list[str]:
    with Client(address) as c:
        members = c.nodes()
    held = [(s["layers"], m.name) for m in members for s in m.shards if s["model_id"] == model_id]
    return [f"{name} [{a}, {b})" for (a, b), name in sorted(held)]


def measure_clusters(
    counts: list[int],
    model_dir: Path,
    prompt: str,
    tokens: int,
    runs: int,
    warm_runs: int,
    log_dir: Path,
    log: Callable[[str], None],
    pin: bool = False,
) -> list[Result]:
    """One cluster per node count, all up at once; the timed requests take turns between them, so load from
    other work on the machine falls on every node count alike instead of on whichever ran during it."""
    with contextlib.ExitStack() as stack:
        coordinators, results = [], []
        for n in counts:
            nodes = stack.enter_context(cluster(n, model_dir.parent, log_dir, pin))
            coordinator = nodes[0].address
            t0 = time.perf_counter()
            request(coordinator, model_dir, prompt, 2, PLACE_TIMEOUT_S)  # plans, loads and warms up every shard
            place_s = time.perf_counter() - t0
            results.append(Result(n, placement(coordinator, model_dir.name), place_s))
            coordinators.append(coordinator)
            log(f"  {n} node(s): placed in {place_s:.1f}s: {', '.join(results[-1].layers)}")
        for coordinator in coordinators:
            for _ in range(warm_runs):  # untimed: the first full-length requests run slower
                request(coordinator, model_dir, prompt, tokens, REQUEST_TIMEOUT_S)
        for _ in range(runs):
            for coordinator, result in zip(coordinators, results, strict=True):
                run = request(coordinator, model_dir, prompt, tokens, REQUEST_TIMEOUT_S)
                if run.tokens < tokens:
                    log(f"  warning: an end-of-text token after {run.tokens} of {tokens} tokens")
                result.runs.append(run)
                log(f"  {result.nodes} node(s): TTFT {run.ttft_ms:.0f} ms, decode {run.decode_tok_s:.2f} tok/s")
    return results


def make_prompt(model_dir: Path, length: int) -> str:
    """Text that the checkpoint's tokenizer encodes to about `length` tokens (the report gives the count)."""
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = " ".join(CORPUS)
    ids = tok.encode(text, add_special_tokens=False).ids
    while len(ids) < length:
        ids = ids + ids
    return tok.decode(ids[:length])


# ---------------------------------------------------------------------------------------------- report
def speed_table(results: list[Result], engine_tok_s: float | None, floor: float) -> str:
    base = results[0].tok_s if results and results[0].nodes == 1 else None
    lines = [
        "| path | layers per node | time to place s | TTFT ms | decode tok/s | vs 1 node | % of floor |",
        "|" + "---|" * 7,
    ]
    if engine_tok_s is not None:
        lines.append(
            f"| ShardEngine in-process (no cluster) | all | — | — | {engine_tok_s:.2f} | "
            f"{'—' if base is None else f'{100 * engine_tok_s / base:.0f}%'} | {100 * engine_tok_s / floor:.0f}% |"
        )
    for r in results:
        rel = "—" if base is None else f"{100 * r.tok_s / base:.0f}%"
        lines.append(
            f"| {r.nodes} node{'s' if r.nodes > 1 else ''} | {', '.join(r.layers)} | {r.place_s:.1f} | "
            f"{r.ttft_ms:.0f} | {r.tok_s:.2f} | {rel} | {100 * r.tok_s / floor:.0f}% |"
        )
    return "\n".join(lines)


def split_table(steps: list[tuple[int, float, list[dict[str, Any]]]]) -> str:
    """Where a decode step went: (node count, ms/token, Result.step_split()) per cluster."""
    lines = [
        "| nodes | shard | engine ms | wait for it ms | hand-offs and network ms |",
        "|---|---|---|---|---|",
    ]
    for nodes, ms_per_token, split in steps:
        for s in split:
            lines.append(
                f"| {nodes} | {s['shard']} | {s['engine_ms']:.2f} | {s['wait_ms']:.2f} "
                f"| {s['wait_ms'] - s['engine_ms']:.2f} |"
            )
        rest = ms_per_token - sum(s["wait_ms"] for s in split)
        lines.append(f"| {nodes} | rest of the step (the coordinator's loop, detokenizer, stream) | | | {rest:.2f} |")
    return "\n".join(lines)


def hop_table(results: list[Result]) -> tuple[str, list[float]]:
    base = results[0].ms_per_token
    lines = ["| nodes | ms/token (median) | runs ms/token | added per hop ms |", "|---|---|---|---|"]
    hops = []
    for r in results:
        per_hop = (r.ms_per_token - base) / (r.nodes - 1) if r.nodes > 1 else None
        if per_hop is not None:
            hops.append(per_hop)
        each = ", ".join(f"{1e3 / x.decode_tok_s:.2f}" for x in r.runs)
        lines.append(f"| {r.nodes} | {r.ms_per_token:.2f} | {each} | {'—' if per_hop is None else f'{per_hop:+.2f}'} |")
    return "\n".join(lines), hops


def verdict(ok: bool) -> str:
    return "**pass**" if ok else "**FAIL**"


def code_version() -> str:
    """The commit the nodes ran, and whether cluster/ had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "cluster"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + (" with uncommitted changes in cluster/" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3.2-1b", choices=sorted(PRESETS), help="model for the tok/s table")
    ap.add_argument("--bits", type=int, default=4, choices=(4, 16), help="4: MLX affine 4-bit (group 64); 16: bf16")
    ap.add_argument("--nodes", default="1,2,3", help="node counts to time, comma-separated (1 first)")
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per timed request")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="timed requests per node count (medians are reported)")
    ap.add_argument("--warm-runs", type=int, default=1, help="untimed full-length requests before the timed ones")
    ap.add_argument("--hop-preset", default="tiny", choices=sorted(PRESETS), help="model for the hop latency")
    ap.add_argument("--hop-tokens", type=int, default=100, help="decode tokens per hop-latency request")
    ap.add_argument("--hop-runs", type=int, default=5, help="timed requests per node count for the hop latency")
    ap.add_argument("--no-hop", action="store_true", help="skip the hop latency")
    ap.add_argument("--no-engine", action="store_true", help="skip the in-process ShardEngine reference")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="node i and its engine process on core i alone (--cpu-threads 1): each node as a one-core machine",
    )
    ap.add_argument("--out", type=Path, help="append the markdown to this file")
    ap.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".cache")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.node_counts = sorted({int(x) for x in args.nodes.split(",")})
    if args.node_counts[0] != 1:
        ap.error("--nodes must include 1: every figure is relative to one node")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # progress on stderr keeps stdout the report alone


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `finally` that stops the nodes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    signal.signal(signal.SIGTERM, _terminate)
    # a fresh cluster token for this run: the nodes inherit it, the clients read it from the environment
    os.environ.setdefault("CLUSTERCTL_TOKEN", secrets.token_urlsafe(32))
    log_dir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    t0 = time.perf_counter()
    model_dir, built = ensure_checkpoint(args.preset, args.cache_dir, args.seed, args.bits)
    log(f"checkpoint {model_dir} ({'built in %.0fs' % (time.perf_counter() - t0) if built else 'reused'})")
    disk_bytes = (model_dir / "model.safetensors").stat().st_size
    prompt = make_prompt(model_dir, args.prompt_len)
    bandwidth = read_bandwidth(os.cpu_count() or 1)  # the engine computes on every core
    log(f"memory read {bandwidth / 1e9:.1f} GB/s; node logs in {log_dir}")

    engine_tok_s, resident = None, disk_bytes
    notes: list[str] = []
    if not args.no_engine:
        log("in-process ShardEngine ...")
        ids = np.array(Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(prompt).ids)
        row, extra = measure_engine(model_dir, default_device(), None, ids, args.tokens, bandwidth)
        engine_tok_s, resident = row.decode_tok_s, row.resident_bytes
        notes.append(
            f"ShardEngine in-process: bench_engine's measure_engine in this process (no node, no runner process), "
            f"{args.tokens} tokens, decode step median {extra['step_ms_median']:.1f} ms, TTFT {row.ttft_ms:.0f} ms"
        )
        gc.collect()  # its buffers go before the nodes load their own copies

    log(f"{model_dir.name}: nodes {args.node_counts} ...")
    results = measure_clusters(
        args.node_counts, model_dir, prompt, args.tokens, args.runs, args.warm_runs, log_dir, log, args.pin
    )
    hops: list[Result] = []
    if not args.no_hop:
        hop_dir, _ = ensure_checkpoint(args.hop_preset, args.cache_dir, args.seed, args.bits)
        hop_prompt = make_prompt(hop_dir, args.prompt_len)
        log(f"hop latency on {hop_dir.name}: nodes {args.node_counts} ...")
        hops = measure_clusters(
            args.node_counts,
            hop_dir,
            hop_prompt,
            args.hop_tokens,
            args.hop_runs,
            args.warm_runs,
            log_dir,
            log,
            args.pin,
        )

    notes.append(
        f"load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end: other work "
        "on the cores makes every figure noisier, the hop latency most"
    )
    text = report(args, model_dir, results, hops, engine_tok_s, bandwidth, disk_bytes, resident, notes)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    return 0


def report(
    args: argparse.Namespace,
    model_dir: Path,
    results: list[Result],
    hops: list[Result],
    engine_tok_s: float | None,
    bandwidth: float,
    disk_bytes: int,
    resident: int,
    notes: list[str],
) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cores = os.cpu_count() or 1
    prompt_tokens = results[0].runs[0].prompt_tokens
    out = [
        f"### Cluster on loopback: {model_dir.name}, prompt {prompt_tokens} tokens, "
        f"decode {args.tokens} tokens ({now})",
        "",
        f"- machine: {cpu_model()}, {cores} cores, {memory_gib():.0f} GiB RAM, "
        f"Python {sys.version.split()[0]}, tinygrad {version('tinygrad')}, clusterctl {code_version()}",
        f"- nodes: `clusterctl join` processes on 127.0.0.1, --memory {NODE_MEMORY_GIB:g} each (an even split), "
        "--no-mdns, --no-api, --peer the first; requests go to n1, which coordinates; each node runs its shard "
        "in its own engine process",
        f"- decode tok/s and TTFT: the coordinating node's figures, median of {args.runs} requests; before them "
        f"one request places the shards (time to place: plan, load, warm-up, on every node at once) and "
        f"{args.warm_runs} untimed full-length one(s) follow it; the clusters of every node count are up at once "
        "(separate, idle but for health checks) and the timed requests take turns between them",
        f"- floor: {bandwidth / 1e9:.1f} GB/s memory read (all cores) / {resident / 1e9:.3g} GB resident "
        f"({disk_bytes / 1e9:.3g} GB on disk) = {bandwidth / resident:.1f} tok/s",
        (
            "- pinned (--pin): node i and its engine process run on core i alone with --cpu-threads 1, as on "
            "separate one-core machines (one node: one core; two: two)"
            if args.pin
            else f"- {cores} cores: N nodes run N node processes plus N engine processes on the same {cores} cores; "
            "one token visits the shards in turn, so a split adds no compute here, only hops"
        ),
        *[f"- {n}" for n in notes],
        "",
        speed_table(results, engine_tok_s, bandwidth / resident),
        "",
        "Where a decode step went (the coordinating node's timing, medians of the runs): each shard's engine, and "
        "the coordinator's wait for it, which adds the hand-off to the engine process and, for another node, "
        "gRPC both ways",
        "",
        split_table([(r.nodes, r.ms_per_token, r.step_split()) for r in results]),
        "",
    ]
    base = results[0]
    for r in results[1:]:
        share = r.tok_s / base.tok_s
        out.append(
            f"- bar: {r.nodes} nodes keep >= {100 * SPEED_BAR:.0f}% of one node's decode tok/s: "
            f"{100 * share:.0f}% {verdict(share >= SPEED_BAR)}"
        )
    if hops:
        table, per_hop = hop_table(hops)
        shape = ", ".join(f"{k} {v}" for k, v in PRESETS[args.hop_preset].items() if k != "max_position_embeddings")
        out += [
            "",
            f"Added latency per hop: {hops[0].runs[0].prompt_tokens}-token prompt, {args.hop_tokens} decode tokens, "
            f"{args.hop_runs} requests per node count on `{args.hop_preset}` "
            f"({shape}); "
            "per hop = (ms/token(N) - ms/token(1)) / (N - 1), from the medians",
            "",
            table,
            "",
            f"- bar: each hop adds <= {HOP_BAR_MS:g} ms per token: worst {max(per_hop):+.2f} ms "
            f"{verdict(max(per_hop) <= HOP_BAR_MS)}",
        ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
