from __future__ import annotations

import importlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import psutil
import pytest

from cluster.engine.runner import (
    STREAM_WINDOW,
    Runner,
    RunnerCallError,
    RunnerClosed,
    RunnerDied,
    RunnerStartError,
    RunnerTimeout,
)

# Import the targets under whatever name this test module has, so the spawned child finds them too.
_targets_name = f"{__name__.rpartition('.')[0]}.runner_targets".lstrip(".")
targets = importlib.import_module(_targets_name)
TARGET = f"{_targets_name}:Target"


@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    with Runner(TARGET, 10) as r:
        yield r


def _wait_until(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_calls_return_values(runner: Runner) -> None:
    assert runner.alive and runner.pid is not None
    assert runner.call("add", 1) == 11
    assert runner.call("add", 1, y=5) == 16
    assert runner.call("pid") == runner.pid != os.getpid()


def test_numpy_arrays_cross_both_ways(runner: Runner) -> None:
    a = runner.call("arange", 6)
    np.testing.assert_array_equal(a, np.arange(6, dtype=np.float32).reshape(2, 3))
    assert a.dtype == np.float32
    np.testing.assert_array_equal(runner.call("scale", a, 2.0), a * 2.0)


def test_target_runs_on_child_main_thread(runner: Runner) -> None:
    assert runner.call("on_main_thread") is True


def test_exception_is_reraised_and_child_keeps_serving(runner: Runner) -> None:
    with pytest.raises(RunnerCallError) as info:
        runner.call("fail", "boom")
    err = info.value
    assert err.remote_type == "KeyError"
    assert err.remote_message == "'boom'"
    assert err.method == "fail"
    assert "in fail" in err.remote_traceback and "KeyError: 'boom'" in err.remote_traceback
    assert isinstance(err.exception, KeyError)
    assert "KeyError" in str(err) and "'fail'" in str(err)
    assert runner.call("add", 2) == 12


def test_custom_exception_type_name(runner: Runner) -> None:
    with pytest.raises(RunnerCallError) as info:
        runner.call("fail_custom")
    assert info.value.remote_type == f"{_targets_name}.CustomError"
    assert isinstance(info.value.exception, targets.CustomError)


def test_unknown_method_is_a_remote_error(runner: Runner) -> None:
    with pytest.raises(RunnerCallError, match="AttributeError"):
        runner.call("no_such_method")
    assert runner.call("add", 0) == 10


def test_unpicklable_result_fails_only_that_call(runner: Runner) -> None:
    with pytest.raises(RunnerCallError) as info:
        runner.call("unpicklable")
    assert "pickle" in str(info.value).lower() or "pickle" in info.value.remote_traceback.lower()
    assert runner.call("add", 3) == 13


def test_unpicklable_argument_fails_in_parent(runner: Runner) -> None:
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        runner.call("add", lambda: 1)
    assert runner.call("add", 4) == 14


def test_calls_from_many_threads(runner: Runner) -> None:
    results: dict[int, list[int]] = {}

    def worker(t: int) -> None:
        results[t] = [runner.call("add", t, y=i) for i in range(25)]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {t: [10 + t + i for i in range(25)] for t in range(8)}


def test_an_awaited_call_whose_task_is_cancelled_leaves_the_runner_serving(
    runner: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    async def cancel_while_waiting() -> None:
        task = asyncio.ensure_future(asyncio.wrap_future(runner.submit("sleep", 0.3)))
        await asyncio.sleep(0.05)
        task.cancel()  # e.g. a client went away while its step ran in the engine
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_while_waiting())
    assert runner.call("add", 2, 3) == 15  # (base 10) queued behind the abandoned call, answered normally
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_acall_returns_values_and_raises_the_remote_error(runner: Runner) -> None:
    import asyncio

    async def calls() -> None:
        assert await runner.acall("add", 1, y=2) == 13
        np.testing.assert_array_equal(await runner.acall("arange", 4), np.arange(4, dtype=np.float32).reshape(2, 2))
        with pytest.raises(RunnerCallError) as info:
            await runner.acall("fail", "boom")
        assert info.value.method == "fail" and isinstance(info.value.exception, KeyError)
        assert await runner.acall("add", 0) == 10

    asyncio.run(calls())


def test_a_cancelled_acall_leaves_its_late_reply_to_no_one(runner: Runner) -> None:
    import asyncio

    async def cancel_then_call() -> None:
        task = asyncio.ensure_future(runner.acall("sleep", 0.3))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The next readers of the direct pipe find the abandoned reply first and pass over it.
        assert await runner.acall("add", 5) == 15
        assert runner.call("add", 6) == 16

    asyncio.run(cancel_then_call())


def test_calls_and_acalls_at_once(runner: Runner) -> None:
    """Threads calling while an event loop awaits: whoever holds the direct pipe reads it, the others' replies
    come through the reader thread, and every caller gets its own answer."""
    import asyncio

    results: dict[int, list[int]] = {}

    def worker(t: int) -> None:
        results[t] = [runner.call("add", t, y=i) for i in range(20)]

    async def awaited() -> list[int]:
        async def one(i: int) -> int:
            return int(await runner.acall("add", 100, y=i))

        return list(await asyncio.gather(*(one(i) for i in range(20))))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    from_loop = asyncio.run(awaited())
    for thread in threads:
        thread.join()
    assert results == {t: [10 + t + i for i in range(20)] for t in range(4)}
    assert from_loop == [110 + i for i in range(20)]


def test_the_caller_reads_its_own_reply() -> None:
    """A blocking call's events (and so its reply, which follows them on the same pipe) are read on the
    calling thread, an awaited call's on the event loop's: no reader thread wakes in between."""
    import asyncio

    seen: list[str] = []
    with Runner(TARGET, on_event=lambda e: seen.append(threading.current_thread().name)) as r:
        seen.clear()
        threading.Thread(target=r.call, args=("steps", 2), name="caller").start()
        assert _wait_until(lambda: len(seen) == 2)

        async def awaited() -> None:
            threading.current_thread().name = "loop"
            await r.acall("steps", 2)

        thread = threading.Thread(target=asyncio.run, args=(awaited(),))
        thread.start()
        thread.join(10)
    assert seen == ["caller", "caller", "loop", "loop"]


def test_a_stream_yields_its_items_in_order_and_the_runner_serves_on(runner: Runner) -> None:
    assert list(runner.stream("count", 5)) == [10, 11, 12, 13, 14]
    assert runner.call("stream_state") == (5, True)
    assert runner.call("add", 1) == 11  # the direct pipe is free again
    assert list(runner.stream("count", 0)) == []


def test_an_error_inside_a_stream_ends_it_after_the_items_before(runner: Runner) -> None:
    items = runner.stream("count", 5, fail_at=2)
    assert [next(items), next(items)] == [10, 11]
    with pytest.raises(RunnerCallError, match="failed at 2") as info:
        next(items)
    assert isinstance(info.value.exception, KeyError) and "'count'" in str(info.value)
    with pytest.raises(StopIteration):
        next(items)
    assert runner.call("add", 2) == 12


def test_closing_a_stream_stops_its_generator_which_never_runs_more_than_a_window_ahead(runner: Runner) -> None:
    items = runner.stream("count", 1000)
    assert next(items) == 10
    time.sleep(0.3)  # the child makes what its window allows meanwhile, then waits for the reader
    made, closed = runner.call("stream_state")  # served between the stream's items, over the main pipe
    assert 1 < made <= 1 + STREAM_WINDOW and not closed  # ran ahead of the reader, by a window at most
    items.close()
    assert runner.call("stream_state") == (made, True)
    items.close()  # twice is harmless
    with pytest.raises(StopIteration):
        next(items)


def test_a_long_stream_is_read_to_its_end_past_many_windows(runner: Runner) -> None:
    assert sum(1 for _ in runner.stream("count", 20 * STREAM_WINDOW)) == 20 * STREAM_WINDOW


def test_streams_and_calls_from_several_threads_interleave(runner: Runner) -> None:
    """Two streams at once (one read by its caller, one through the reader thread) and calls meanwhile."""
    results: dict[str, Any] = {}

    def read(name: str, n: int) -> None:
        results[name] = list(runner.stream("count", n))

    threads = [threading.Thread(target=read, args=(f"s{i}", 50 + i)) for i in range(2)]
    for t in threads:
        t.start()
    calls = [runner.call("add", i) for i in range(20)]
    for t in threads:
        t.join(30)
    assert calls == [10 + i for i in range(20)]
    assert results == {"s0": list(range(10, 60)), "s1": list(range(10, 61))}


def test_a_stream_reports_the_death_of_its_child_and_events_reach_on_event() -> None:
    seen: list[dict[str, Any]] = []
    with Runner(TARGET, on_event=seen.append) as r:
        items = r.stream("count", 10, crash_at=3)
        assert [next(items) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(RunnerDied, match="SIGSEGV") as info:
            next(items)
        assert "'count'" in str(info.value)
    assert [e["i"] for e in seen if e.get("stage") == "item"] == [0, 1, 2]


def test_death_during_an_acall() -> None:
    import asyncio

    with Runner(TARGET) as r:
        with pytest.raises(RunnerDied, match="SIGSEGV") as info:
            asyncio.run(r.acall("crash"))
        assert "'crash'" in str(info.value)
        with pytest.raises(RunnerDied, match="SIGSEGV"):
            asyncio.run(r.acall("add", 1))


def test_close_during_an_acall() -> None:
    import asyncio

    r = Runner(TARGET).start(timeout=60)

    async def close_while_waiting() -> None:
        task = asyncio.ensure_future(r.acall("sleep", 30))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(r.close, 0.5)  # the child is busy, so it is terminated
        with pytest.raises(RunnerClosed):
            await asyncio.wait_for(task, 5)

    asyncio.run(close_while_waiting())
    assert not r.alive


def test_construction_failure_is_raised_in_parent() -> None:
    r = Runner(TARGET, fail=True)
    with pytest.raises(RunnerStartError) as info:
        r.start(timeout=60)
    assert info.value.remote_type == "ValueError"
    assert "construction failed on purpose" in str(info.value)
    assert "__init__" in info.value.remote_traceback
    assert not r.alive
    with pytest.raises(RunnerStartError, match="construction failed"):
        r.call("add", 1)


def test_missing_target_module() -> None:
    with pytest.raises(RunnerStartError, match="ModuleNotFoundError"):
        Runner("no_such_module_xyz:Thing").start(timeout=60)


def test_bad_target_string() -> None:
    with pytest.raises(ValueError, match="package.module:callable"):
        Runner("no-colon-here")


def test_segfault_raises_runner_died_and_a_new_runner_works() -> None:
    r = Runner(TARGET).start(timeout=60)
    with pytest.raises(RunnerDied, match="SIGSEGV") as info:
        r.call("crash")
    assert info.value.exitcode == -signal.SIGSEGV
    assert info.value.signal_name == "SIGSEGV"
    assert "'crash'" in str(info.value)
    assert not r.alive
    with pytest.raises(RunnerDied, match="SIGSEGV"):
        r.call("add", 1)  # later calls fail fast with the same cause
    r.close()
    with Runner(TARGET, 1) as fresh:
        assert fresh.call("add", 1) == 2


def test_os_exit_reports_exit_code() -> None:
    with Runner(TARGET) as r:
        with pytest.raises(RunnerDied, match="exited with code 3") as info:
            r.call("exit", 3)
        assert info.value.exitcode == 3
        assert r.exitcode == 3


def test_death_while_idle_is_noticed() -> None:
    with Runner(TARGET) as r:
        assert r.pid is not None
        os.kill(r.pid, signal.SIGKILL)
        assert _wait_until(lambda: not r.alive)
        with pytest.raises(RunnerDied, match="SIGKILL"):
            r.call("add", 1)


def test_close_stops_the_child_and_fails_pending_calls() -> None:
    r = Runner(TARGET).start(timeout=60)
    pid = r.pid
    assert pid is not None
    errors: list[BaseException] = []

    def busy() -> None:
        try:
            r.call("sleep", 30)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=busy)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    r.close(timeout=0.5)  # the child is busy, so it is terminated
    thread.join(5)
    assert time.monotonic() - started < 5
    assert len(errors) == 1 and isinstance(errors[0], RunnerClosed)
    assert _gone(pid) and not r.alive
    r.close()  # idempotent
    with pytest.raises(RunnerClosed):
        r.call("add", 1)


def test_start_timeout_kills_the_child() -> None:
    r = Runner(f"{_targets_name}:slow_target", 30)
    with pytest.raises(RunnerTimeout):
        r.start(timeout=0.5)
    assert r.pid is not None and _wait_until(lambda: _gone(r.pid or 0), 5)


def test_environment_reaches_the_child(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLUSTERCTL_TEST_INHERITED", "from-parent")
    monkeypatch.setenv("BEAM", "0")
    with Runner(TARGET) as r:
        assert r.call("getenv", "CLUSTERCTL_TEST_INHERITED") == "from-parent"
        assert r.call("getenv", "BEAM") == "0"


def test_spinning_waits_serve_calls_and_notice_deaths_then_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLUSTERCTL_SPIN_US: the caller polls for its reply and the engine process for the next call before either
    sleeps. Replies, errors and a death while the caller spins come through as without it, and once the spin is
    over an idle engine process sleeps instead of holding a core."""
    monkeypatch.setenv("CLUSTERCTL_SPIN_US", "50000")
    with Runner(TARGET) as r:
        assert [r.call("add", i) for i in range(50)] == list(range(50))  # each reply arrives while the caller spins
        assert r.call("sleep", 0.2) == 0.2  # a reply later than the caller's spin
        with pytest.raises(RunnerCallError, match="boom"):
            r.call("fail", "boom")
        assert r.pid is not None
        idle = psutil.Process(r.pid)
        time.sleep(0.2)  # past the spin after the last call
        before = sum(idle.cpu_times()[:2])
        time.sleep(1.0)
        assert sum(idle.cpu_times()[:2]) - before < 0.2  # asleep, not polling
        with pytest.raises(RunnerDied, match="SIGSEGV"):
            r.call("crash")
    monkeypatch.setenv("CLUSTERCTL_SPIN_US", "soon")
    with pytest.raises(ValueError, match="CLUSTERCTL_SPIN_US"):
        Runner(TARGET)


def test_events_reach_on_event() -> None:
    events: list[dict[str, Any]] = []
    with Runner(TARGET, 5, on_event=events.append) as r:
        assert events == [{"stage": "init", "base": 5}]  # sent before "ready"
        assert r.call("steps", 3) == 3
        # Events travel in order with results, so they have all arrived by the time call() returns.
        assert events[1:] == [{"stage": "step", "i": i} for i in range(3)]


def test_emit_is_only_passed_when_accepted() -> None:
    with Runner(f"{_targets_name}:NoEmit", a=1) as r:
        assert r.call("keys") == ["a"]


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_child_exits_when_parent_is_killed(busy: bool) -> None:
    paths = [p for p in sys.path if p]
    code = "\n".join(
        [
            "import sys, time",
            f"sys.path[:0] = {paths!r}",
            "from cluster.engine.runner import Runner",
            f"r = Runner({TARGET!r}).start(timeout=60)",
            "print(r.pid, flush=True)",
            "r.call('sleep', 120)" if busy else "time.sleep(120)",
        ]
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not _gone(child)
        time.sleep(0.2)  # let the busy parent send its call
    finally:
        parent.kill()
        parent.wait()
    assert _wait_until(lambda: _gone(child), 5), f"runner child {child} outlived its parent"


def test_runner_started_from_a_short_lived_thread_survives_it() -> None:
    # PR_SET_PDEATHSIG fires when the forking *thread* exits; the runner must not die with it.
    holder: list[Runner] = []
    thread = threading.Thread(target=lambda: holder.append(Runner(TARGET, 7).start(timeout=60)))
    thread.start()
    thread.join()
    with holder[0] as r:
        time.sleep(0.3)
        assert r.alive
        assert r.call("add", 1) == 8


def test_unclosed_runner_does_not_block_interpreter_exit() -> None:
    paths = [p for p in sys.path if p]
    code = "\n".join(
        [
            "import sys",
            f"sys.path[:0] = {paths!r}",
            "from cluster.engine.runner import Runner",
            f"r = Runner({TARGET!r}).start(timeout=60)",
            "print(r.pid, flush=True)",
        ]
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert _wait_until(lambda: _gone(int(result.stdout)), 5)
