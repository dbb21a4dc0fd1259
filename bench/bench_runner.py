"""What one call into an engine process costs, without the engine: the Runner's round trip next to its floor.

    .venv/bin/python bench/bench_runner.py [--calls 3000] [--rounds 3]

Every decode step crosses a process boundary twice per shard (the node asks its engine process, the engine
answers), so this hand-off is paid once per shard per token. Measured here, with a no-op target and a
(1, 2048) float32 array as the argument (one hidden state of the 1B model):

- floor: two processes passing the same pickled bytes back and forth over a multiprocessing Pipe;
- `Runner.call` from a thread (how a coordinating node calls its own shard);
- `Runner.acall` awaited in an event loop (how a node's gRPC servicer calls its shard).

Medians of `--calls` calls, `--rounds` times in turn. To time another checkout: `PYTHONPATH=<checkout>`.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import pickle
import statistics
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from cluster.engine.runner import Runner


class Echo:
    """The engine's stand-in: returns what it is given."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x


def _echo_bytes(conn: Connection) -> None:
    while data := conn.recv_bytes():
        conn.send_bytes(data)


def median_us(calls: int, once: Callable[[], object]) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def pipe_floor(calls: int, payload: bytes) -> float:
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_echo_bytes, args=(theirs,), daemon=True)
    child.start()
    try:

        def once() -> None:
            mine.send_bytes(payload)
            mine.recv_bytes()

        return median_us(calls, once)
    finally:
        mine.send_bytes(b"")
        child.join(5)


async def awaited_us(runner: Runner, calls: int, x: np.ndarray) -> float:
    acall = getattr(runner, "acall", None)  # older checkouts: the reader thread resolves a future
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await (acall("forward", x) if acall else asyncio.wrap_future(runner.submit("forward", x)))
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000, help="calls per figure (the median is reported)")
    ap.add_argument("--rounds", type=int, default=3, help="times each figure is taken, in turn")
    ap.add_argument("--width", type=int, default=2048, help="float32 values in the argument")
    args = ap.parse_args()
    x = np.zeros((1, args.width), np.float32)
    payload = pickle.dumps(("forward", (x,), {}), protocol=pickle.HIGHEST_PROTOCOL)
    import cluster

    print(f"cluster from {Path(cluster.__file__).parent}; argument {x.nbytes} bytes; medians of {args.calls} calls")
    print("| round | pipe floor us | Runner.call us | Runner.acall in a loop us |")
    print("|---|---|---|---|")
    with Runner("bench_runner:Echo") as runner:
        for i in range(args.rounds):
            floor = pipe_floor(args.calls, payload)
            blocking = median_us(args.calls, lambda: runner.call("forward", x))
            awaited = asyncio.run(awaited_us(runner, args.calls, x))
            print(f"| {i + 1} | {floor:.0f} | {blocking:.0f} | {awaited:.0f} |")


if __name__ == "__main__":
    main()
