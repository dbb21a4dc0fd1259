"""What one call into an engine process costs, without the engine: the Runner's round trip next to its floor.

    .venv/bin/python bench/bench_runner.py [--calls 3000] [--rounds 3]

Every decode step crosses a process boundary twice per shard (the node asks its engine process, the engine
answers), so this hand-off is paid once per shard per token. Measured here, with a no-op target and a
(1, 2048) float32 array as the argument (one hidden state of the 1B model):

- floor: two processes passing the same pickled bytes back and forth over a multiprocessing Pipe;
- `Runner.call` from a thread (how a coordinating node calls its own shard);
- `Runner.acall` awaited in an event loop (how a node's gRPC servicer calls its shard);
- a gRPC stream's round trip: a synchronous client stream (how a coordinator drives another node's shard) to a
  grpc.aio server in another process that echoes each message at once, with the nodes' channel options.

A hop to another node's shard costs about the gRPC round trip plus an awaited call, on top of the engine.

Medians of `--calls` calls, `--rounds` times in turn. To time another checkout: `PYTHONPATH=<checkout>`.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import pickle
import queue
import socket
import statistics
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from cluster.engine.runner import Runner
from cluster.rpc import wire


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


def _echo_server(port: int, ready: Any) -> None:
    async def echo(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async for request in requests:
            yield request

    async def serve() -> None:
        server = grpc.aio.server(options=wire.server_options())
        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(echo)}
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(serve())


def grpc_stream_us(calls: int, payload: bytes) -> float:
    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=_echo_server, args=(port, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the echo server did not start")
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.channel_options(wire.SERVER_MAX_MESSAGE)) as ch:
            requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
            responses = ch.stream_stream("/bench.Echo/Echo")(iter(requests.get, None))

            def once() -> None:
                requests.put(payload)
                next(responses)

            for _ in range(min(calls, 200)):  # the stream's first messages set it up
                once()
            result = median_us(calls, once)
            requests.put(None)
            return result
    finally:
        server.kill()
        server.join(5)


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
    print("| round | pipe floor us | Runner.call us | Runner.acall in a loop us | gRPC stream us |")
    print("|---|---|---|---|---|")
    with Runner("bench_runner:Echo") as runner:
        for i in range(args.rounds):
            floor = pipe_floor(args.calls, payload)
            blocking = median_us(args.calls, lambda: runner.call("forward", x))
            awaited = asyncio.run(awaited_us(runner, args.calls, x))
            stream = grpc_stream_us(args.calls, x.astype(np.float16).tobytes())  # a hidden state as nodes send it
            print(f"| {i + 1} | {floor:.0f} | {blocking:.0f} | {awaited:.0f} | {stream:.0f} |")


if __name__ == "__main__":
    main()
