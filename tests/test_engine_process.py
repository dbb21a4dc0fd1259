"""ShardEngine in its own runner process: same tokens as in-process (reference: transformers greedy ids),
engine errors keep their type, and a killed engine is a clear error after which a new one starts."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from conftest import BUCKETS, FIXTURES, reference
from tinygrad.helpers import NUM_CPU_THREADS

from cluster.engine.process import EngineProcess
from cluster.engine.runner import STREAM_WINDOW, RunnerDied
from cluster.engine.shard import EngineError
from cluster.generation import Conversation, GenerationResult, generate, step
from cluster.sampling import SamplingParams
from cluster.tokenizer import Tokenizer


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


class StepByStep:
    """An engine without `decode`: generate() then runs every step through `forward` (a reference)."""

    def __init__(self, engine):
        self.engine = engine

    def new_session(self, *args, **kwargs):
        return self.engine.new_session(*args, **kwargs)

    def truncate(self, *args):
        self.engine.truncate(*args)

    def end_session(self, sid):
        self.engine.end_session(sid)

    def forward(self, *args, **kwargs):
        return self.engine.forward(*args, **kwargs)


@pytest.mark.slow  # make test-slow (CI runs it); test_coordinator streams a decode in make test
def test_an_engine_process_decodes_ahead_of_its_caller_with_the_tokens_of_step_by_step_calls(engines):
    """References: transformers' greedy ids; for sampling with penalties and logprobs, and for a conversation cut
    by a stop string, the in-process engine driven one forward call a step."""
    ref, tok = reference("llama32"), Tokenizer.from_dir(FIXTURES / "llama32")
    prompt, greedy_ids = ref["prompt_ids"], ref["greedy_ids"]
    stepwise = StepByStep(engines.get("llama32"))

    def answer(shard, ids, **kwargs):
        *chunks, result = generate([shard], tok, ids, context_limit=128, **kwargs)
        assert isinstance(result, GenerationResult)
        return chunks, result

    with EngineProcess(FIXTURES / "llama32", prefill_buckets=BUCKETS, max_context=128) as proc:
        # the engine process runs a window ahead of a reader that stops reading, and no further
        sid = proc.new_session()
        first = proc.forward(sid, prompt).token
        steps = proc.decode(sid, first, 3 * STREAM_WINDOW)
        assert next(steps).token == greedy_ids[1]
        time.sleep(1.0)
        steps.close()
        proc.truncate(sid, len(prompt) + STREAM_WINDOW)  # held: the prompt, `first` and what it decoded unread
        with pytest.raises(EngineError, match="cannot keep"):
            proc.truncate(sid, len(prompt) + STREAM_WINDOW + 1)
        proc.truncate(sid, len(prompt) + 1)  # back to what was read; decoding again from there
        assert [r.token for r in proc.decode(sid, greedy_ids[1], 4)] == greedy_ids[2:6]
        proc.end_session(sid)

        assert answer(proc, prompt, max_tokens=12)[1].tokens == greedy_ids
        params = SamplingParams(temperature=0.9, top_p=0.95, seed=11, repetition_penalty=1.3, frequency_penalty=0.4)
        streamed, expected = (
            answer(s, prompt, max_tokens=10, sampling=params, logprobs=2)[0] for s in [proc, stepwise]
        )
        assert [c.id for c in streamed] == [c.id for c in expected]
        assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in expected], abs=1e-4)
        assert [[i for i, _ in c.top] for c in streamed] == [[i for i, _ in c.top] for c in expected]

        # a stop string ends the answer while the engine process has decoded past it; the next turn still gives
        # what fresh step-by-step sessions give
        texts = [tok.decode(greedy_ids[:n]) for n in range(len(greedy_ids) + 1)]
        piece = next(p for n in range(3, 8) if (p := texts[n][len(texts[n - 1]) :].strip()) not in texts[n - 1])
        conv = Conversation()
        first_turn = answer(proc, prompt, max_tokens=12, stop=[piece], conversation=conv)[1]
        assert first_turn.finish_reason == "stop" and len(first_turn.tokens) < 12
        assert first_turn.tokens == answer(stepwise, prompt, max_tokens=12, stop=[piece])[1].tokens
        follow_up = prompt + first_turn.tokens + [7, 8, 9]
        second_turn = answer(proc, follow_up, max_tokens=6, conversation=conv)[1]
        assert second_turn.tokens == answer(stepwise, follow_up, max_tokens=6)[1].tokens
        conv.close([proc])

        # two requests at once with different prompts: one stream read by its caller, the other through the runner's
        # reader thread, their steps served in turns by the one engine process (whose input buffers they share)
        prompts = [prompt, prompt[3:] + [5, 6]]
        queued = SamplingParams(temperature=0.9, top_p=0.95, seed=11, repetition_penalty=1.3)  # queued on the device
        answers: dict[int, list[int]] = {}

        def request(i: int) -> None:
            answers[i] = answer(proc, prompts[i], max_tokens=30, sampling=queued)[1].tokens

        threads = [threading.Thread(target=request, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        expected = {i: answer(stepwise, p, max_tokens=30, sampling=queued)[1].tokens for i, p in enumerate(prompts)}
        assert answers == expected and expected[0][:10] != greedy_ids[:10]


class Recording:
    """A shard whose forward calls are timed (start, end): shows which calls overlapped."""

    def __init__(self, shard):
        self.shard, self.calls = shard, []
        self.pipeline_chunk = shard.pipeline_chunk

    def __getattr__(self, name):
        return getattr(self.shard, name)

    def forward(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.shard.forward(*args, **kwargs)
        finally:
            self.calls.append((t0, time.perf_counter()))


def test_a_long_prompt_is_pipelined_through_shards_in_processes_of_their_own(engines):
    """References: transformers' greedy ids, and the whole model in this process stepping one forward a step
    (seeded sampling with the repetition penalty and logprobs). The prompt (17 ids) goes in five chunks of 4 (the
    engines' smallest chunk size: float32 on CPU)."""
    ref, tok = reference("llama32"), Tokenizer.from_dir(FIXTURES / "llama32")
    prompt = ref["prompt_ids"]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=5, repetition_penalty=1.3)
    *expected, _ = generate(
        [StepByStep(engines.get("llama32"))], tok, prompt, context_limit=128, max_tokens=6, sampling=params, logprobs=2
    )
    with (
        EngineProcess(FIXTURES / "llama32", 0, 1, prefill_buckets=BUCKETS, max_context=128) as head,
        EngineProcess(FIXTURES / "llama32", 1, None, prefill_buckets=BUCKETS, max_context=128) as tail,
    ):
        shards = [Recording(head), Recording(tail)]
        assert [s.pipeline_chunk for s in shards] == [BUCKETS[0], BUCKETS[0]]
        *_, result = generate(shards, tok, prompt, context_limit=128, max_tokens=12)
        assert result.tokens == ref["greedy_ids"]
        # the prompt step: the head's second chunk ran while the tail worked on the first
        (h0, h1), (t0, _) = shards[0].calls[:2], shards[1].calls[:2]
        assert len(shards[0].calls) == 5 + 11 and h1[0] < t0[1] and t0[0] >= h0[1]

        *sampled, _ = generate(shards, tok, prompt, context_limit=128, max_tokens=6, sampling=params, logprobs=2)
        assert [c.id for c in sampled] == [c.id for c in expected]
        assert [c.logprob for c in sampled] == pytest.approx([c.logprob for c in expected], abs=1e-4)
        assert [[i for i, _ in c.top] for c in sampled] == [[i for i, _ in c.top] for c in expected]
        assert [lp for c in sampled for _, lp in c.top] == pytest.approx(
            [lp for c in expected for _, lp in c.top], abs=1e-4
        )

        # the caller hears of each chunk as it leaves the last shard
        events: list[tuple[int, int]] = []
        for shard in shards:
            shard.new_session("progress")
        first = step(shards, "progress", prompt, SamplingParams(), 0, progress=lambda *e: events.append(e))
        assert first.token == ref["greedy_ids"][0] and events == [(4, 17), (8, 17), (12, 17), (16, 17), (17, 17)]
        for shard in shards:
            shard.end_session("progress")

        # a stage that fails ends the step with its error, and every stage's thread with it
        threads = threading.active_count()
        head.new_session("only-on-the-head")
        with pytest.raises(EngineError, match="unknown session"):
            step(shards, "only-on-the-head", prompt, SamplingParams(), 0)
        assert threading.active_count() == threads
        head.end_session("only-on-the-head")
        *_, again = generate(shards, tok, prompt, context_limit=128, max_tokens=3)  # both still serve
        assert again.tokens == ref["greedy_ids"][:3]
