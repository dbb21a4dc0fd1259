"""Targets for tests/test_runner.py; a module of its own so the spawned child can import them."""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

Emit = Callable[[dict[str, Any]], None]


class CustomError(Exception):
    pass


class Target:
    def __init__(self, base: int = 0, *, emit: Emit | None = None, fail: bool = False) -> None:
        if fail:
            raise ValueError("construction failed on purpose")
        self.base = base
        self.emit = emit
        if emit is not None:
            emit({"stage": "init", "base": base})

    def add(self, x: int, y: int = 0) -> int:
        return self.base + x + y

    def arange(self, n: int) -> np.ndarray:
        return np.arange(n, dtype=np.float32).reshape(2, -1)

    def scale(self, a: np.ndarray, k: float) -> np.ndarray:
        return a * k

    def fail(self, message: str) -> None:
        raise KeyError(message)

    def fail_custom(self) -> None:
        raise CustomError("custom")

    def unpicklable(self) -> Any:
        return lambda: None

    def crash(self) -> None:
        ctypes.string_at(0)  # reads address 0: SIGSEGV

    def exit(self, code: int) -> None:
        os._exit(code)

    def getenv(self, name: str) -> str | None:
        return os.environ.get(name)

    def on_main_thread(self) -> bool:
        return threading.current_thread() is threading.main_thread()

    def pid(self) -> int:
        return os.getpid()

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def count(self, n: int, fail_at: int | None = None, crash_at: int | None = None) -> Iterator[int]:
        """A stream: 0..n-1, each recorded in `made` as it is made; `closed` once the generator is closed."""
        self.made, self.closed = 0, False
        try:
            for i in range(n):
                if i == fail_at:
                    raise KeyError(f"failed at {i}")
                if i == crash_at:
                    self.crash()
                if self.emit is not None:
                    self.emit({"stage": "item", "i": i})
                self.made += 1
                yield self.base + i
        finally:
            self.closed = True

    def stream_state(self) -> tuple[int, bool]:
        return self.made, self.closed

    def steps(self, n: int) -> int:
        assert self.emit is not None
        for i in range(n):
            self.emit({"stage": "step", "i": i})
        return n


class NoEmit:
    """Takes **kwargs but no `emit` parameter: the runner must not inject one."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def keys(self) -> list[str]:
        return sorted(self.kwargs)


def slow_target(seconds: float) -> Target:
    time.sleep(seconds)
    return Target()
