"""`make demo`: the shipped demo model, and the demo itself end to end (three nodes, mDNS, plan, a streamed answer),
including that it leaves nothing behind, also when interrupted.

As root (with `ip`) the demo's nodes are hosts in network namespaces, otherwise processes on loopback; these tests
run whichever the machine allows, like `make demo` does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from cluster_nodes import ROOT

DEMO = ROOT / "demo" / "run_demo.py"
MODEL = ROOT / "demo" / "pydoc-llama"
NS_PREFIX = "ccdemo"  # demo/run_demo.py's namespace prefix
COMMON = {"the", "a", "an", "of", "to", "is", "and", "in", "for", "if", "be", "it", "or", "not", "with", "as", "by"}
COMMON |= {"that", "this", "are", "on", "from", "return", "returns", "value", "object", "list", "file", "name"}


# ---------------------------------------------------------------------------------------------- the model
def test_demo_model_is_small_and_in_the_llama_layout():
    from cluster.models.config import ModelConfig
    from cluster.weights import Checkpoint

    cfg = ModelConfig.from_dir(MODEL)
    assert cfg.architecture == "llama" and cfg.num_layers == 6 and cfg.tie_word_embeddings
    size = (MODEL / "model.safetensors").stat().st_size
    assert 1 << 20 < size < 12 << 20, size
    names = set(Checkpoint(MODEL).tensors)
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names and "lm_head.weight" not in names
    assert {f"model.layers.5.mlp.{m}_proj.weight" for m in ("gate", "up", "down")} <= names
    assert (MODEL / "README.md").read_text().count("PSF") >= 1  # where the training text comes from


def test_demo_tokenizer_round_trips_and_has_a_chat_template():
    from cluster.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(MODEL)
    text = "Return the number of items in a sequence.\n\nIf *key* is given, it is called on each item: üñí."
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id  # raw prompts start with <|begin_of_text|>, as Llama 3's do
    assert tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Open a file."}], add_generation_prompt=True)
    assert chat == "<|begin_of_text|>Open a file.\n\n"
    assert tok.eos_ids == {tok.token_to_id("<|end_of_text|>")}
    generation = json.loads((MODEL / "generation_config.json").read_text())
    assert generation["do_sample"] and 0 < generation["temperature"] <= 1


def _sample(engine: Any, sid: str, ids: list[int], sampling: Any) -> int:
    token = engine.forward(sid, np.array(ids), sampling=sampling).token
    assert token is not None
    return int(token)


def test_demo_model_writes_english_words():
    """Text sampled from the engine with the model's own defaults is made of common English words: the weights
    are trained, not noise."""
    from cluster.engine.shard import ShardEngine
    from cluster.generation import generation_defaults
    from cluster.sampling import SamplingParams
    from cluster.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(MODEL)
    engine = ShardEngine(MODEL, max_context=64, prefill_buckets=(16,), dtype="float32")
    text = ""
    for seed in range(3):
        sampling = SamplingParams(**{**generation_defaults(MODEL), "seed": seed})
        sid = engine.new_session(sampling=sampling)
        out: list[int] = []
        try:
            token = _sample(engine, sid, tok.encode("The function returns"), sampling)
            while len(out) < 24 and token not in tok.eos_ids:
                out.append(token)
                token = _sample(engine, sid, [token], sampling)
        finally:
            engine.end_session(sid)
        text += tok.decode(out) + "\n"
    words = re.findall(r"[a-z]+", text.lower())
    assert len(words) >= 12 and sum(w in COMMON for w in words) >= 0.3 * len(words), text


# ---------------------------------------------------------------------------------------------- the demo
def _demo_command() -> list[str]:
    """`make demo` where make and the project's .venv are there (CI), else the script it runs."""
    if shutil.which("make") and Path(sys.executable).resolve() == (ROOT / ".venv" / "bin" / "python").resolve():
        return ["make", "-s", "demo"]
    return [sys.executable, str(DEMO)]


def _namespaces() -> list[str]:
    if shutil.which("ip") is None or os.geteuid() != 0:
        return []
    p = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True, timeout=30)
    return [ns["name"] for ns in json.loads(p.stdout or "[]") if ns["name"].startswith(NS_PREFIX)]


def _namespaces_possible() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"{NS_PREFIX}probe{os.getpid() % 1000}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True, timeout=30).returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return True


def _demo_workdirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("clusterctl-demo-*"))


def _demo_processes() -> list[str]:
    """Processes started by a demo: every node names its models dir under the demo's temporary directory."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "clusterctl-demo-" in cmdline and "cluster.cli" in cmdline:
            found.append(f"{proc.info['pid']}: {cmdline}")
    return found


def _assert_nothing_left(workdirs_before: set[Path]) -> None:
    assert not _namespaces(), "the demo left network namespaces behind"
    assert not _demo_processes(), "the demo left processes behind"
    assert _demo_workdirs() <= workdirs_before, "the demo left its temporary directory behind"


def _section(stdout: str, title: str) -> str:
    """The output between the `==> {title}...` line and the next `==>` line."""
    m = re.search(rf"^==> {re.escape(title)}.*?\n(.*?)(?=^==> |\Z)", stdout, re.S | re.M)
    assert m, f"no {title!r} section in:\n{stdout}"
    return m.group(1)


@pytest.mark.slow  # make test-slow (CI runs it)
@pytest.mark.parametrize("mode", ["auto", "loopback"])
def test_make_demo_streams_an_answer_from_three_nodes_and_cleans_up(mode: str):
    """auto: `make demo` as it is (namespaces as root); loopback: the non-root way, run here too when root."""
    if mode == "loopback" and os.geteuid() != 0:
        pytest.skip("not root: the auto case already ran the loopback demo")
    command = _demo_command() if mode == "auto" else [sys.executable, str(DEMO), "--mode", "loopback"]
    before = _demo_workdirs()
    t0 = time.monotonic()
    p = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    took = time.monotonic() - t0
    assert p.returncode == 0, f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    if mode == "loopback":
        assert "processes on 127.0.0.1" in p.stdout
    elif _namespaces_possible():
        assert "network namespaces on one bridge" in p.stdout

    nodes = _section(p.stdout, "clusterctl nodes")
    assert {"host1", "host2", "host3"} <= set(re.findall(r"^(host\d)\s", nodes, re.M)), nodes
    plan = _section(p.stdout, "clusterctl plan")
    assert re.search(r"pydoc-llama: 6 layers", plan), plan
    layers = sorted(tuple(map(int, m)) for m in re.findall(r"layers \[\s*(\d+),\s*(\d+)\)", plan))
    assert len(layers) == 3 and layers[0][0] == 0 and layers[-1][1] == 6, plan  # the three hosts share the six

    answer = _section(p.stdout, "clusterctl run")
    words = re.findall(r"[A-Za-z]+", answer)
    pieces = answer.split()
    assert len(words) >= 5, answer
    assert sum(bool(re.search(r"[A-Za-z]", s)) for s in pieces) >= 0.6 * len(pieces), answer  # words, not noise
    assert any(w.lower() in COMMON for w in words), answer
    assert re.search(r"\[\d+ tokens, (stop|length); TTFT", p.stderr), p.stderr  # `run`'s summary line
    assert "Done in" in p.stdout
    _assert_nothing_left(before)
    print(f"make demo took {took:.0f} s")


@pytest.mark.slow  # make test-slow (CI runs it)
@pytest.mark.parametrize(
    ("sig", "stage"),
    [(signal.SIGINT, "==> Waiting for the nodes"), (signal.SIGTERM, "==> clusterctl run")],
    ids=["SIGINT-while-nodes-start", "SIGTERM-while-answering"],
)
def test_interrupted_demo_cleans_up(sig: signal.Signals, stage: str):
    """Interrupted while its nodes start or while the answer streams, the demo stops everything it started and
    removes what it made."""
    before = _demo_workdirs()
    proc = subprocess.Popen(
        [sys.executable, str(DEMO), "--max-tokens", "200"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(stage):
                break
        assert _demo_processes(), "".join(lines)
        time.sleep(1)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, f"{''.join(lines)}{out}\n{err}"
    assert "interrupted" in err and "cleaning up" in err
    _assert_nothing_left(before)
