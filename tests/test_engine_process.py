"""ShardEngine in its own runner process: same tokens as in-process (reference: transformers greedy ids),
engine errors keep their type, and a killed engine is a clear error after which a new one starts."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from conftest import BUCKETS, FIXTURES, reference
from tinygrad.helpers import NUM_CPU_THREADS

from cluster.engine.process import EngineProcess
from cluster.engine.runner import RunnerDied
from cluster.engine.shard import EngineError
from cluster.generation import step
from cluster.sampling import SamplingParams


def greedy(shard, prompt, n):
    sid = shard.new_session()
    ids, out = list(prompt), []
    for _ in range(n):
        out.append(step([shard], sid, ids, SamplingParams(), 0).token)
        ids = [out[-1]]
    shard.end_session(sid)
    return out


@pytest.mark.slow  # make test-slow (CI runs it)
def test_engine_process_generates_recovers_from_errors_and_from_death(monkeypatch):
    ref = reference("llama32")
    events: list[tuple[str, int, int]] = []
    proc = EngineProcess(
        FIXTURES / "llama32", on_progress=lambda *e: events.append(e), prefill_buckets=BUCKETS, max_context=64
    ).start(timeout=120)
    try:
        proc.warmup()
        assert {e[0] for e in events} == {"load", "warmup"}
        assert events[-1][1] == events[-1][2]  # the last warm-up event says done
        assert proc.info()["ready"] is True
        assert proc.info()["cpu_threads"] == NUM_CPU_THREADS.value  # every core by default
        assert greedy(proc, ref["prompt_ids"], 12) == ref["greedy_ids"]
        with pytest.raises(EngineError, match="unknown session"):
            proc.forward("missing", np.array([1]))
        assert greedy(proc, ref["prompt_ids"], 3) == ref["greedy_ids"][:3]  # still serving

        os.kill(proc.runner.pid, signal.SIGKILL)  # e.g. the kernel's OOM killer
        with pytest.raises(RunnerDied, match="SIGKILL"):
            proc.new_session()
    finally:
        proc.close()
    # what `--cpu-threads 1` does: the engine process inherits NUM_CPU_THREADS and its kernels stay whole
    monkeypatch.setenv("NUM_CPU_THREADS", "1")
    with EngineProcess(FIXTURES / "llama32", prefill_buckets=BUCKETS, max_context=64) as fresh:
        assert fresh.info()["cpu_threads"] == 1
        assert greedy(fresh, ref["prompt_ids"], 4) == ref["greedy_ids"][:4]


def test_construction_errors_arrive_as_themselves(tmp_path):
    from cluster.models.config import ConfigError

    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    with pytest.raises(ConfigError, match="num_attention_heads"):
        EngineProcess(tmp_path).start(timeout=60)
