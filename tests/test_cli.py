"""`clusterctl run` as a user runs it: a real subprocess, real checkpoint, engine in its own process.

Reference: the transformers greedy continuation in each fixture's reference.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_nodes import free_port
from conftest import FIXTURES, TEST_TOKEN, reference

CLI = [sys.executable, "-m", "cluster.cli"]


def clusterctl(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 300):
    """Run the CLI. `run` without --local starts its own node: keep it off mDNS and on a port of its own. Its engine
    compiles one prompt chunk size, as the suite's nodes do (tests/conftest.py)."""
    if args[0] == "run" and "--local" not in args and "--node" not in args:
        args = (*args, "--no-mdns", "--node", f"127.0.0.1:{free_port()}")
    if args[0] == "run" and "--prefill-chunks" not in args:
        args = (*args, "--prefill-chunks", os.environ["CLUSTERCTL_PREFILL_CHUNKS"])
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        input=input,
        env=full_env,
        timeout=timeout,
        cwd=Path(__file__).parent.parent,
    )


def json_lines(stdout: str) -> tuple[list[dict], dict]:
    objs = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert objs[-1]["done"] is True
    return objs[:-1], objs[-1]


def test_run_raw_json_gives_the_reference_tokens():
    ref = reference("llama32")
    p = clusterctl(
        "run",
        str(FIXTURES / "llama32"),
        ref["prompt_text"],
        "--raw",
        "--json",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
    )
    assert p.returncode == 0, p.stderr
    tokens, summary = json_lines(p.stdout)
    assert [t["id"] for t in tokens] == ref["greedy_ids"][:6] == summary["tokens"]
    assert all(set(t) == {"id", "text", "logprob"} and t["logprob"] <= 0 for t in tokens)
    assert summary["finish_reason"] == "length"
    assert summary["usage"] == {
        "prompt_tokens": len(ref["prompt_ids"]),
        "completion_tokens": 6,
        "total_tokens": len(ref["prompt_ids"]) + 6,
    }
    assert summary["timing"]["ttft_ms"] > 0 and summary["timing"]["decode_tok_s"] > 0
    # one shard, on the node `run` started: its engine's time and the wait for it, per decode step
    (shard,) = summary["timing"]["shards"]
    assert shard["layers"] == [0, 4] and 0 < shard["engine_ms"] <= shard["wait_ms"]
    # the node `run` started keeps its routine lines (membership, the plan) to `join`'s log level
    assert "WARNING" not in p.stderr and "plan for" not in p.stderr, p.stderr


def test_run_chat_with_logprobs_in_process(tmp_path):
    ref = reference("qwen3")
    p = clusterctl(
        "run",
        str(FIXTURES / "qwen3"),
        ref["chat_messages"][0]["content"],
        "--json",
        "--logprobs",
        "3",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--local",
        "--graph-cache",
        str(tmp_path / "graphs"),
    )
    assert p.returncode == 0, p.stderr
    assert len(list((tmp_path / "graphs").glob("*.graphs"))) == 1  # the engine saved its graphs where it was told
    tokens, summary = json_lines(p.stdout)
    assert summary["usage"]["prompt_tokens"] == len(ref["chat_prompt_ids"])  # the chat template was applied
    for t in tokens:
        assert len(t["top"]) == 3
        assert t["top"][0][0] == t["id"]  # greedy picks the most likely id
        assert t["top"][0][1] == pytest.approx(t["logprob"], abs=1e-4)


@pytest.mark.slow  # make test-slow (CI runs it)
def test_run_local_shows_a_long_prompt_being_read():
    """The whole model in this process takes a long prompt in chunks on its own thread, for the bar alone (the
    tokens are those of the prompt taken whole: test_engine checks the bits)."""
    long = " ".join(["the river runs past the mill"] * 20)
    p = clusterctl(
        "run", str(FIXTURES / "llama32"), long, "--raw", "--local", "--max-tokens", "3", "--temperature", "0"
    )
    assert p.returncode == 0, p.stderr
    assert re.search(r"reading the prompt:.*?\| *\d+/\d+ \[", p.stderr), p.stderr
    assert "tokens, length" in p.stderr


@pytest.mark.slow  # make test-slow (CI runs it); the API and SDK cases in make test cover the same paths
def test_run_json_schema_and_openai_penalties_in_process(tmp_path, engines):
    """--json-schema @FILE holds the answer to the schema; --frequency-penalty and --presence-penalty count its
    tokens. Reference: the generation loop with the same constraint and penalties on the in-process engine."""
    from cluster.constraints import Constraint
    from cluster.generation import GenerationResult, generate
    from cluster.sampling import SamplingParams
    from cluster.tokenizer import Tokenizer

    schema = {
        "type": "object",
        "properties": {"river": {"enum": ["Rhine", "Danube"]}, "bridges": {"type": "integer", "maximum": 99}},
        "required": ["river", "bridges"],
        "additionalProperties": False,
    }
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    penalties = ("--frequency-penalty", "1.2", "--presence-penalty", "0.4")
    p = clusterctl(
        "run", str(FIXTURES / "llama32"), "Hello", "--json", "--max-tokens", "80", "--temperature", "0", "--local",
        "--json-schema", f"@{tmp_path / 'schema.json'}", *penalties,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    _, summary = json_lines(p.stdout)
    answer = json.loads(summary["text"])
    assert answer["river"] in ("Rhine", "Danube") and 0 <= answer["bridges"] <= 99

    engine, tok = engines.get("llama32"), Tokenizer.from_dir(FIXTURES / "llama32")
    ids = tok.encode_chat([{"role": "user", "content": "Hello"}])
    params = SamplingParams(frequency_penalty=1.2, presence_penalty=0.4)
    constraint = Constraint(tok, engine.cfg.vocab_size, schema)
    *_, result = generate([engine], tok, ids, max_tokens=80, sampling=params, context_limit=128, constraint=constraint)
    assert isinstance(result, GenerationResult) and summary["tokens"] == result.tokens

    bad = clusterctl("run", str(FIXTURES / "llama32"), "Hi", "--local", "--json-schema", '{"type": "nope"}')
    assert bad.returncode != 0 and "JSON schema" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow  # make test-slow (CI runs it)
def test_interactive_chat_reads_turns_until_an_empty_line():
    long = " ".join(["the river runs past the mill"] * 20)  # a turn of more than one prompt chunk (64 tokens here)
    turns = f"Hi\nMore\n{long}\n\n"
    p = clusterctl("run", str(FIXTURES / "llama32"), "--max-tokens", "3", "--temperature", "0", input=turns)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("tokens, length") == 3  # one summary per turn
    assert "TTFT" in p.stderr and "tok/s" in p.stderr
    assert p.stderr.count(" layers 0-4 ") == 3 and "(engine " in p.stderr  # where each turn's decode steps went
    assert re.search(r"reading the prompt:.*?\| *\d+/\d+ \[", p.stderr), p.stderr  # the long turn's chunks
    # the warm-up compiled what --prefill-chunks 64 asks (clusterctl() adds it): one chunk size, decode and the
    # sampler, each called twice (the default 16,64 makes it 8 steps)
    assert re.search(r"compiling on [^:\n]+:.*?\| *\d+/6 \[", p.stderr), p.stderr


def test_clear_errors_without_a_traceback(tmp_path):
    p = clusterctl("run", "llama-3.2-1bb", "hi")
    assert p.returncode != 0 and "llama-3.2-1b" in p.stderr and "Traceback" not in p.stderr
    p = clusterctl("run", "some-org/some-model", "hi")
    assert p.returncode != 0 and "offline" in p.stderr.lower() and "Traceback" not in p.stderr
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    p = clusterctl("run", str(tmp_path), "hi", "--raw")
    assert p.returncode != 0 and "gemma2" in p.stderr and "Traceback" not in p.stderr
    p = clusterctl("run", str(FIXTURES / "llama32"), "hi", "--top-p", "0")
    assert p.returncode == 2 and "top-p" in p.stderr

    from click.testing import CliRunner

    from cluster.cli import main

    # refused before anything starts (in this process: nothing would load)
    r = CliRunner().invoke(main, ["run", str(FIXTURES / "llama32"), "hi", "--raw", "--no-thinking"])
    assert r.exit_code == 2 and "--no-thinking" in r.output
    for chunks in ("1", "16,x", ""):  # the suite's nodes run with --prefill-chunks 64 (tests/conftest.py)
        r = CliRunner().invoke(main, ["join", "--no-mdns", "--prefill-chunks", chunks])
        assert r.exit_code == 2 and "--prefill-chunks" in r.output, r.output


def test_client_commands_do_not_load_the_engine():
    """`nodes` and `plan` only talk to a node: they must not pay for importing tinygrad (0.1-0.4 s a command)."""
    for command in (["nodes"], ["plan", "llama-3.2-1b"]):
        args = [*command, "--node", f"127.0.0.1:{free_port()}", "--token", TEST_TOKEN]
        p = subprocess.run([sys.executable, "-X", "importtime", *CLI[1:], *args], capture_output=True, text=True)
        assert p.returncode == 1 and "no clusterctl node answers" in p.stderr, p.stderr[-2000:]  # nothing listens
        imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time")}
        assert "cluster.client" in imported and "tinygrad" not in imported


def test_cpu_threads_sets_tinygrads_thread_count_here_and_for_engine_processes(monkeypatch):
    from tinygrad.helpers import NUM_CPU_THREADS

    from cluster import cli

    # setenv first so that monkeypatch puts the variable back as it was (absent) after the test
    monkeypatch.setenv("NUM_CPU_THREADS", "0")
    monkeypatch.delenv("NUM_CPU_THREADS")
    before = NUM_CPU_THREADS.value
    try:
        cli._limit_cpu_threads(None)  # the default leaves tinygrad's own choice (every core)
        assert "NUM_CPU_THREADS" not in os.environ and NUM_CPU_THREADS.value == before
        cli._limit_cpu_threads(1)
        assert os.environ["NUM_CPU_THREADS"] == "1"  # inherited by the engine processes a node spawns
        assert NUM_CPU_THREADS.value == 1  # and read by kernels this process compiles (`run --local`)
    finally:
        NUM_CPU_THREADS.value = before


def _three_at_once(node, model: str) -> tuple[list[int], list[list[int]], list[int]]:
    """The tokens of one request alone, then of three sent at once, and the open-session counts the node
    reported for its shard while the three ran."""
    import threading

    with node.client() as c:
        *_, alone = c.generate(model, "Once upon", raw=True, max_tokens=16, temperature=0)
    results: list[list[int]] = []
    seen: list[int] = []

    def run() -> None:
        with node.client() as c:
            *_, last = c.generate(model, "Once upon", raw=True, max_tokens=16, temperature=0)
            results.append(last.tokens)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    with node.client() as c:
        while any(t.is_alive() for t in threads):
            seen += [s["sessions"] for n in c.nodes() for s in n.shards]
    for t in threads:
        t.join(timeout=120)
    return alone.tokens, results, seen


@pytest.mark.slow  # make test-slow (CI runs it)
def test_join_max_sessions_makes_requests_take_turns(tmp_path):
    """`join --max-sessions 1`: three requests at once all finish with the tokens of one alone, and the node
    never reports more than one open session on its shard while they run."""
    from cluster_nodes import NodeProcess

    node = NodeProcess("solo", tmp_path, mdns=False, extra_args=["--max-sessions", "1"])
    try:
        node.wait_ready()
        alone, results, seen = _three_at_once(node, str(FIXTURES / "llama32"))
        assert results == [alone] * 3
        assert seen and max(seen) == 1
    finally:
        node.stop()


@pytest.mark.slow  # make test-slow (CI runs it)
def test_join_session_wait_refuses_a_request_as_busy_through_the_sdk_and_the_api(tmp_path):
    """`join --max-sessions 1 --session-wait 1`: with the one session of the shard taken, a request waits 1 s
    and is refused: `NodeBusy` in the SDK, HTTP 503 with code "busy" from the API. The node serves the next
    request once the session is free."""
    import openai
    from cluster_nodes import NodeProcess, every_session_taken, shards_of

    from cluster.client import NodeBusy

    model = str(FIXTURES / "llama32")
    extra = ["--max-sessions", "1", "--session-wait", "1"]
    node = NodeProcess("busy", tmp_path, mdns=False, api_port=free_port(), extra_args=extra)
    try:
        node.wait_ready()
        with node.client() as c:
            *_, alone = c.generate(model, "Once upon", raw=True, max_tokens=8, temperature=0)  # placed
        [(_, shard)] = shards_of([node], "llama32")
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{node.api_port}/v1", api_key=TEST_TOKEN, max_retries=0)
        with every_session_taken(node, shard):
            with node.client() as c, pytest.raises(NodeBusy, match=r"busy: all 1 sessions .* for 1 s"):
                list(c.generate(model, "Once upon", raw=True, max_tokens=8, temperature=0))
            with pytest.raises(openai.APIStatusError) as refused:
                api.completions.create(model=model, prompt="Once upon", max_tokens=8, temperature=0)
            assert refused.value.status_code == 503 and refused.value.body["code"] == "busy"
        with node.client() as c:
            *_, again = c.generate(model, "Once upon", raw=True, max_tokens=8, temperature=0)
        assert again.tokens == alone.tokens
    finally:
        node.stop()


@pytest.mark.slow  # make test-slow (CI runs it)
def test_join_memory_limits_sessions_to_kv_caches_that_fit(tmp_path):
    """`join --memory` with room for the weights and two and a half KV caches (and `--max-sessions` left at 8):
    the shard serves two sessions at once, three requests at once take turns and all give the tokens of one
    alone (the reference), and `nodes` shows the limit."""
    from cluster_nodes import NodeProcess

    from cluster.engine.shard import ShardEngine

    model = str(FIXTURES / "llama32")
    sizes = ShardEngine(model, max_context=256)  # the node's engine: same device, dtype and buckets; not warmed
    budget = sizes.weight_bytes + 2 * sizes.kv_bytes_per_session() + sizes.kv_bytes_per_session() // 2
    node = NodeProcess("small", tmp_path, mdns=False, memory=budget / 2**30, extra_args=["--max-context", "256"])
    try:
        node.wait_ready()
        alone, results, seen = _three_at_once(node, model)
        assert results == [alone] * 3
        assert seen and max(seen) == 2  # two at once, never three
        out = clusterctl("nodes", "--node", node.address)
        assert "0/2 sessions" in out.stdout, out.stdout + out.stderr
    finally:
        node.stop()


def test_a_thinking_block_is_dimmed_on_a_terminal(capsys):
    """What `run` prints for a thinking model's answer on a terminal: the <think> block dim (ANSI 2), the answer as
    is; every piece of the text stays. Without a terminal the text is plain (click strips the styles)."""
    from cluster.cli import _Output

    pieces = ["<think>", "\nIt asks", "\n</think>", "\n\n", "Yes."]
    for color, want in (
        (True, "\x1b[2m<think>\x1b[0m\x1b[2m\nIt asks\x1b[0m\x1b[2m\n</think>\x1b[0m\n\nYes."),
        (False, "".join(pieces)),
    ):
        out = _Output(as_json=False, logprobs=0, color=color)
        for i, piece in enumerate(pieces):
            out.token(i, piece, 0.0, [])
        assert capsys.readouterr().out == want
