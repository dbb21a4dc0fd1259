"""ShardHost: a shard asked for twice (two coordinators placing the same model over the same nodes) is loaded once
and shared; it stays loaded until the last placement lets go. Real engine processes on the tiny llama fixture."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

import pytest
from cluster_nodes import wait_for
from conftest import FIXTURES, TEST_TOKEN

from cluster.chain import RequestCancelled
from cluster.host import SessionOpenError, ShardBusyError, ShardHost, UnknownShardError


@pytest.fixture
def host(tmp_path: Path):
    h = ShardHost(tmp_path / "models", token=TEST_TOKEN, prefill_buckets=(2,), max_sessions=2)
    h.register_model("llama32", FIXTURES / "llama32")
    yield h
    h.close()


def test_the_same_layers_are_loaded_once_and_shared_until_the_last_unload(host: ShardHost) -> None:
    loaded: list = []

    def load(holder: str) -> None:
        loaded.append(host.load("llama32", 0, 2, max_context=32, holder=holder))

    threads = [threading.Thread(target=load, args=(holder,)) for holder in ("node-a", "node-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    first, second = loaded
    assert first is second and sorted(first.holders) == ["node-a", "node-b"] and len(host.shards) == 1
    assert first.to_pb().holders == 2

    other = host.load("llama32", 0, 2, max_context=16)  # another context: another shard
    assert other is not first and len(host.live_shards()) == 2
    host.unload(other.shard_id)

    host.unload(first.shard_id, "node-a")  # one placement lets go: the other still steps through it
    assert first.engine.alive and host.live_shards() == [first]
    sid = first.engine.new_session()
    assert first.engine.forward(sid, [1, 2, 3]).hidden.shape[-1] > 0
    host.unload(first.shard_id, "node-b")
    assert not host.shards and not first.engine.alive
    with pytest.raises(UnknownShardError):
        host.unload(first.shard_id)


def test_a_shard_whose_engine_died_is_not_shared_again(host: ShardHost) -> None:
    dead = host.load("llama32", 0, 2, max_context=32)
    os.kill(dead.engine.runner.pid, signal.SIGKILL)
    wait_for(lambda: not dead.engine.alive, 10, "the engine process to die")
    assert host.live_shards() == []
    fresh = host.load("llama32", 0, 2, max_context=32)
    assert fresh is not dead and fresh.engine.alive and fresh.holders == [""]
    # the new engine process read the graphs the dead one (or an earlier one) saved: no capture again
    assert fresh.to_pb().graphs_from_cache and 0 < fresh.to_pb().warmup_s
    host.unload(dead.shard_id)  # its placement lets go of the dead one
    assert host.live_shards() == [fresh] and list(host.shards) == [fresh.shard_id]


def test_a_coordinator_that_left_lets_go_of_its_shards(host: ShardHost) -> None:
    both = host.load("llama32", 0, 2, max_context=32, holder="node-a")
    assert host.load("llama32", 0, 2, max_context=32, holder="node-b") is both
    only_a = host.load("llama32", 2, 4, max_context=32, holder="node-a")
    host.release_holder("node-a")  # node-a left the cluster without unloading (killed, unplugged)
    assert host.live_shards() == [both] and both.holders == ["node-b"] and not only_a.engine.alive
    host.release_holder("node-b")
    assert not host.shards and not both.engine.alive


def test_a_full_shard_makes_new_sessions_wait_until_one_ends(host: ShardHost) -> None:
    shard = host.load("llama32", 0, 2, max_context=32)
    assert shard.max_sessions == 2  # the engine's limit, from the host's options
    shard.reserve("a")
    shard.reserve("b")
    with pytest.raises(SessionOpenError, match="already open"):  # one id, one session; checked under the lock
        shard.reserve("a", timeout=0)
    opened = threading.Event()
    waiter = threading.Thread(target=lambda: (shard.reserve("c"), opened.set()))
    waiter.start()
    assert not opened.wait(0.3), "a third session was counted while two were open"
    assert shard.release("a") and not shard.release("a")  # counted once
    assert opened.wait(5), "the waiting session did not get the freed place"
    waiter.join()
    assert shard.sessions == {"b", "c"}

    with pytest.raises(ShardBusyError, match=r"^busy: all 2 sessions of llama32 layers \[0, 2\)"):
        shard.reserve("d", timeout=0.2)

    async def wait_in_loop() -> None:
        with pytest.raises(ShardBusyError, match="^busy: "):
            await shard.areserve("d", timeout=0.1)
        later = asyncio.get_running_loop().call_later(0.2, shard.release, "b")
        await shard.areserve("d", timeout=5)  # polls until the release above
        later.cancel()

    asyncio.run(wait_in_loop())
    assert shard.sessions == {"c", "d"}

    # a request whose client went away stops waiting as soon as it is woken, and takes no place
    cancelled = threading.Event()
    outcome: list[BaseException] = []

    def wait_until_cancelled() -> None:
        try:
            shard.reserve("e", cancelled=cancelled.is_set)
        except BaseException as e:  # noqa: BLE001
            outcome.append(e)

    waiter = threading.Thread(target=wait_until_cancelled)
    waiter.start()
    assert not wait_for_thread(waiter, 0.3)  # still waiting: both places are taken
    cancelled.set()
    shard.wake()
    assert wait_for_thread(waiter, 2), "the cancelled wait went on"
    assert len(outcome) == 1 and isinstance(outcome[0], RequestCancelled)
    assert shard.sessions == {"c", "d"}


def wait_for_thread(thread: threading.Thread, timeout: float) -> bool:
    thread.join(timeout)
    return not thread.is_alive()
