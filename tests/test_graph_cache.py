"""The graph cache (cluster/engine/graph_cache.py): a shard's second start reads the graphs its first start
captured instead of capturing them again.

Reference: the same shard whose graphs were captured in this process (the first start). A later start in another
process, reading the saved graphs, must give the same tokens and the same logprobs, greedy and sampled: the
same compiled programs run on the same inputs.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import time

import numpy as np
import pytest
from conftest import BUCKETS, FIXTURES, two_sessions
from tinygrad import Tensor, TinyJit, dtypes

from cluster.engine import graph_cache
from cluster.engine.process import EngineProcess
from cluster.engine.shard import ShardEngine

PROMPTS = [list(range(1, 20)), [5, 9, 2, 7, 11, 3, 8]]


def greedy_run(engine, prompt: list[int], steps: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
    sid = engine.new_session()
    out = []
    r = engine.forward(sid, np.asarray(prompt, np.int32), logprobs=3)
    for _ in range(steps):
        out.append((r.token, r.logprob, r.top))
        r = engine.forward(sid, np.asarray([r.token], np.int32), logprobs=3)
    engine.end_session(sid)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLUSTERCTL_GRAPH_CACHE", str(tmp_path / "graphs"))
    return tmp_path / "graphs"


def test_a_second_start_reads_the_graphs_and_answers_the_same(cache, caplog) -> None:
    # each start in a process of its own, as a node's engine: in this process, the kernels other tests compiled
    # would make a capture here look nearly as quick as reading the graphs
    with EngineProcess(FIXTURES / "llama32", prefill_buckets=BUCKETS, max_context=128) as first:
        first.warmup()
        first_info = first.info()
        assert not first_info["graphs_from_cache"]
        files = list(cache.glob("*.graphs"))
        assert len(files) == 1
        want = greedy_run(first, PROMPTS[0], 8), two_sessions(first, PROMPTS, 6)

    # a new process, as a node restarted on the same machine
    with EngineProcess(FIXTURES / "llama32", prefill_buckets=BUCKETS, max_context=128) as second:
        second.warmup()
        info = second.info()
        assert info["graphs_from_cache"] is True, "the second start should read the first start's graphs"
        assert info["warmup_s"] < first_info["warmup_s"] / 2
        got = greedy_run(second, PROMPTS[0], 8), two_sessions(second, PROMPTS, 6)
    assert got == want

    # graphs that load but do not fit the shard (a stale or misplaced file: here another context length, so
    # other KV cache shapes) fail in the warm-up's own calls and are captured again
    other = ShardEngine(FIXTURES / "llama32", prefill_buckets=BUCKETS, max_context=64)
    path, _ = other._graph_file()
    assert path is not None and path != files[0]
    shutil.copy(files[0], path)
    with caplog.at_level(logging.WARNING, logger="cluster.engine.shard"):
        other.warmup()
    assert "capturing them again" in caplog.text
    assert not other.graphs_from_cache
    assert path.read_bytes() != files[0].read_bytes()  # the good graphs replaced the stale ones
    again = greedy_run(other, PROMPTS[0], 8)
    assert [t for t, _, _ in again] == [t for t, _, _ in want[0]]
    np.testing.assert_allclose([lp for _, lp, _ in again], [lp for _, lp, _ in want[0]], rtol=1e-5, atol=1e-5)


def test_a_damaged_file_is_dropped(tmp_path, caplog) -> None:
    path = tmp_path / "x.graphs"
    path.write_bytes(b"not a pickle")
    with caplog.at_level(logging.WARNING, logger="cluster.engine.graph_cache"):
        assert graph_cache.load(path, {}) is None
    assert "ignoring cached graphs" in caplog.text
    assert not path.exists()
    path.write_bytes(pickle.dumps({"format": graph_cache.FORMAT, "graphs": {"decode": "not a graph"}}))
    assert graph_cache.load(path, {}) is None
    assert graph_cache.load(tmp_path / "missing.graphs", {}) is None


def test_the_key_changes_with_what_shapes_a_graph(monkeypatch) -> None:
    w = Tensor.zeros(4, 4).contiguous().realize()
    shard = {"layers": (0, 2), "dtype": "float32", "env": graph_cache.engine_env()}
    key = graph_cache.graph_key("CPU", shard, {"w": w})

    def graph_key_now() -> str:
        return graph_cache.graph_key("CPU", {**shard, "env": graph_cache.engine_env()}, {"w": w})

    assert key == graph_cache.graph_key("CPU", dict(shard), {"w": w})
    assert key != graph_cache.graph_key("CPU", {**shard, "layers": (0, 3)}, {"w": w})
    assert key != graph_cache.graph_key("CPU", shard, {"w": w.cast(dtypes.float16).realize()})
    assert key != graph_cache.graph_key("CPU", shard, {"w": Tensor.zeros(4, 5).contiguous().realize()})
    assert key != graph_cache.graph_key("CPU", shard, {"v": w})
    monkeypatch.setenv("DEV", "CPU")  # a node sets it for its engine processes: the device is keyed as itself
    assert key == graph_key_now()
    monkeypatch.setenv("BEAM", "2")  # a kernel search finds other kernels
    assert key != graph_key_now()
    monkeypatch.delenv("BEAM")
    monkeypatch.setenv("CLUSTERCTL_GPU_MATVEC", "0")
    assert key != graph_key_now()


def test_where_the_cache_lives(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("CLUSTERCTL_GRAPH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert graph_cache.cache_dir() == tmp_path / "clusterctl" / "graphs"
    monkeypatch.setenv("CLUSTERCTL_GRAPH_CACHE", "off")
    assert graph_cache.cache_dir() is None
    monkeypatch.setenv("CLUSTERCTL_GRAPH_CACHE", str(tmp_path / "mine"))
    assert graph_cache.cache_dir() == tmp_path / "mine"


def test_only_the_most_recently_used_files_are_kept(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(graph_cache, "KEEP", 2)
    now = time.time()
    for age, name in ((20, "a"), (10, "b")):
        graph_cache.save(tmp_path / f"{name}.graphs", {}, {})
        os.utime(tmp_path / f"{name}.graphs", (now - age, now - age))
    assert graph_cache.load(tmp_path / "a.graphs", {}) == {}  # used again: now newer than b
    graph_cache.save(tmp_path / "c.graphs", {}, {})
    assert sorted(p.name for p in tmp_path.glob("*.graphs")) == ["a.graphs", "c.graphs"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_the_cache_off_writes_nothing(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CLUSTERCTL_GRAPH_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    engine = ShardEngine(FIXTURES / "llama32", 0, 1, prefill_buckets=BUCKETS, max_context=32)
    assert engine._graph_file() == (None, {})
    assert not list(tmp_path.rglob("*"))


def test_weights_are_tied_by_name_not_saved(tmp_path, caplog) -> None:
    # reference: numpy. A graph saved beside one weight and read back beside another of the same name computes
    # with the new one, and the file holds no copy of the weight.
    w = Tensor(np.full(65536, 1.0, np.float32)).contiguous().realize()

    @TinyJit
    def scale(x: Tensor) -> Tensor:
        return (x * w).sum().realize()

    x = Tensor(np.arange(65536, dtype=np.float32) / 65536).contiguous().realize()
    for _ in range(3):  # runs, captures, replays
        scale(x)
    path = tmp_path / "scale.graphs"
    size = graph_cache.save(path, {"scale": scale.captured}, {"w": w})
    assert size < w.nbytes() / 2

    other = Tensor(np.full(65536, 3.0, np.float32)).contiguous().realize()
    graphs = graph_cache.load(path, {"w": other})
    assert graphs is not None
    replay = type(scale)(None, graphs["scale"])  # a TinyJit with a captured graph and no function
    np.testing.assert_allclose(replay(x).item(), 3.0 * x.numpy().sum(), rtol=1e-5)

    with caplog.at_level(logging.WARNING, logger="cluster.engine.graph_cache"):
        assert graph_cache.load(path, {"w": Tensor.ones(65536) * 2}) is None  # lazy: no buffer to tie
    assert "no buffer" in caplog.text
