"""Run an object (the tinygrad engine) in a child process and call its methods over a pipe.

tinygrad wants its own process: it reads DEV/JIT/BEAM from the environment, is happiest on the main
thread, and a driver crash (segfault, OOM kill) must not take the node down. `Runner("pkg.mod:Factory",
*args, **kwargs)` spawns a fresh interpreter (multiprocessing "spawn"), builds `Factory(*args, **kwargs)`
on the child's main thread and then serves `runner.call("method", ...)` requests one at a time.

Progress: when the factory has a parameter named `emit`, the child passes `emit=callable`; calling
`emit({"stage": "warmup", "step": 3})` in the child delivers the dict to the parent's `on_event`
callback, in order with results (on the thread that reads the reply of the call that emitted it).

Two pipes: on the *direct* one, the caller of a call reads its own reply (one at a time, a blocking `call`
or an awaited `acall`), so a step costs two wake-ups (child, then caller) instead of three. Calls made while
the direct pipe is in use, and `submit`, go over the main pipe, whose replies the reader thread delivers; it
also spawns the child and notices its death.

Streams: `runner.stream("method", ...)` iterates a generator method's items as the child makes them. The child
does not wait for the caller between items (a decode loop then costs no hand-off a token), but runs at most
STREAM_WINDOW items ahead of what the caller has read: a caller that stops reading stalls only its own stream.
The child serves calls, and other streams in turn, between a stream's items.

Messages are a kind byte, a call id and a payload (`_send`/`_recv`): payloads are pickled separately so that
a value one side cannot pickle or unpickle fails that one call, not the connection.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import inspect
import itertools
import logging
import multiprocessing
import multiprocessing.util
import os
import pickle
import queue
import select
import signal
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.connection import Connection, wait
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

EventCallback = Callable[[dict[str, Any]], None]

_PICKLE = pickle.HIGHEST_PROTOCOL
_PR_SET_PDEATHSIG = 1
_WATCHDOG_INTERVAL_S = 1.0
_KINDS = ("call", "close", "result", "error", "event", "ready", "init_error", "stream", "item", "more", "cancel")
_KIND_CODES = {kind: code for code, kind in enumerate(_KINDS)}
_HEADER = struct.Struct("<Bq")  # kind, call id (-1: none)
# Items a stream's child side may send beyond those its caller has read. Bounds the work wasted when the caller
# stops early (a stop string), and the pipe's fill when it stops reading (a slow client); twice the decode steps
# an engine queues at once (shard.DECODE_CHAIN), so the next queue runs while the caller reads the last one.
STREAM_WINDOW = 16
_COUNT = struct.Struct("<q")  # a "more" message's payload: items read


def spin_seconds() -> float:
    """How long a wait for the other side of an engine call polls before it sleeps: CLUSTERCTL_SPIN_US microseconds
    (default 0). A process that sleeps is woken by the kernel when data arrives, which on a virtual machine costs
    hundreds of microseconds a wake-up; one that polls sees it at once, at the price of a busy core meanwhile."""
    try:
        return max(0.0, float(os.environ.get("CLUSTERCTL_SPIN_US", "") or 0) / 1e6)
    except ValueError:
        raise ValueError("CLUSTERCTL_SPIN_US must be a number of microseconds") from None


def _spin(poller: select.poll, seconds: float) -> list[tuple[int, int]]:
    """poller.poll(), polling without sleeping for up to `seconds` first."""
    if seconds > 0:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            if ready := poller.poll(0):
                return ready
    return poller.poll()


class RunnerError(RuntimeError):
    """Base class for runner failures."""


class RemoteTraceback(Exception):
    """The child's formatted traceback, attached as `__cause__` so it prints with the parent's."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0]) if self.args else ""


class RunnerCallError(RunnerError):
    """The child raised; carries the remote type name, message and traceback text.

    `exception` is the original exception object when it survived pickling both ways, else None.
    """

    def __init__(
        self,
        remote_type: str,
        remote_message: str,
        remote_traceback: str,
        *,
        method: str | None = None,
        exception: BaseException | None = None,
    ) -> None:
        where = f" (in call {method!r})" if method else ""
        super().__init__(f"{remote_type}: {remote_message}{where}")
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.method = method
        self.exception = exception
        self.__cause__ = RemoteTraceback(remote_traceback)


class RunnerStartError(RunnerCallError):
    """Importing the target or constructing the object raised in the child."""


class RunnerDied(RunnerError):
    """The child process exited (crash, kill, exit) while it was expected to serve."""

    def __init__(self, message: str, exitcode: int | None) -> None:
        super().__init__(message)
        self.exitcode = exitcode

    @property
    def signal_name(self) -> str | None:
        return _signal_name(-self.exitcode) if self.exitcode is not None and self.exitcode < 0 else None


class RunnerClosed(RunnerError):
    """The runner was closed by its owner."""


class RunnerTimeout(RunnerError, TimeoutError):
    """The object was not constructed within start()'s timeout (the child is killed)."""


class Runner:
    """A child process that builds `target(*args, **kwargs)` and serves method calls on it.

    Thread-safe: calls from several threads are served one at a time by the child, in no set order between
    threads (a call's effects are visible to calls made after it returned). The keyword
    `on_event` belongs to the Runner; every other keyword goes to the target. The child inherits the
    parent's environment as it is at start(); set DEV/JIT/BEAM there (the child imports `cluster`, and so
    tinygrad, before the target, so environment changes made inside the child come too late).
    """

    def __init__(
        self,
        target: str,
        *args: Any,
        on_event: EventCallback | None = None,
        **kwargs: Any,
    ) -> None:
        if target.count(":") != 1 or not all(target.split(":")):
            raise ValueError(f"target must look like 'package.module:callable', got {target!r}")
        self.target = target
        self._on_event = on_event
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._direct, child_direct = ctx.Pipe()
        self._process = ctx.Process(
            target=_child_main,
            args=(child_conn, child_direct, target, args, kwargs, os.getpid()),
            name=f"runner:{target}",
        )
        self._child_conns: list[Connection] = [child_conn, child_direct]
        self._ready: Future[None] = Future()
        self._finished: Future[None] = Future()  # set once the child is gone and the pending calls failed
        self._direct_lock = threading.Lock()  # held by the one call whose caller reads the direct pipe
        self._spin_s = spin_seconds()
        self._pending: dict[int, tuple[str, Future[Any]]] = {}
        self._streams: dict[int, queue.SimpleQueue[tuple[str, Any]]] = {}  # streams whose messages the reader delivers
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _pending, _ended, _started
        self._send_lock = threading.Lock()  # one writer at a time; never held while waiting for a reply
        self._started = False
        self._closing = False
        self._ended: RunnerError | None = None
        self._exitcode: int | None = None
        self._thread = threading.Thread(target=self._run_reader, name=f"runner-reader:{target}", daemon=True)
        self._finalizer: multiprocessing.util.Finalize | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> Runner:
        """Spawn the child (once) and wait until the object is constructed."""
        with self._lock:
            closing, first = self._closing, not self._started
            self._started = True
        if closing:
            # After a failed start, keep reporting why it failed rather than just "closed".
            failure = self._ready.exception() if self._ready.done() else None
            raise failure or RunnerClosed(f"runner for {self.target} is closed")
        if first:
            # The reader thread spawns the child: PR_SET_PDEATHSIG fires when the *thread* that forked
            # the child exits, so the fork must come from a thread that lives as long as the child.
            self._thread.start()
            # Runs at interpreter exit before multiprocessing joins its (non-daemon) children.
            self._finalizer = multiprocessing.util.Finalize(
                self, _stop_process, args=(self._process, self._conn, self._send_lock), exitpriority=10
            )
        try:
            self._ready.result(timeout)
        except FutureTimeout:
            self.close(timeout=0)
            raise RunnerTimeout(f"{self.target} was not ready within {timeout} s; process killed") from None
        except RunnerError:
            self.close(timeout=1)
            raise
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Ask the child to exit, then terminate and finally kill it. Safe to call more than once."""
        if threading.current_thread() is self._thread:
            # Called from on_event: the reader cannot wait for itself, so close from another thread.
            threading.Thread(target=self.close, args=(timeout,), daemon=True).start()
            return
        with self._lock:
            self._closing = True
            started = self._started
        if self._finalizer is not None:
            self._finalizer.cancel()
        if started:
            _stop_process(self._process, self._conn, self._send_lock, timeout)
            self._thread.join()
        else:
            self._close_child_conns()
        self._fail_all(RunnerClosed(f"runner for {self.target} was closed"))
        self._conn.close()
        self._direct.close()  # a caller reading it sees the child's exit first, or an OSError

    def __enter__(self) -> Runner:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def alive(self) -> bool:
        """True while the child process is running and has not been closed."""
        if not self._started or self._ended is not None or self._closing or self._process.pid is None:
            return False
        # The sentinel turns ready at exit; unlike is_alive() it does not reap (the reader thread does).
        return not wait([self._process.sentinel], 0)

    @property
    def exitcode(self) -> int | None:
        return self._exitcode

    # -- calls -----------------------------------------------------------------------------------

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run `obj.method(*args, **kwargs)` in the child and return its result.

        Raises RunnerCallError when the method raised (the child keeps serving), RunnerDied when the
        child exited, RunnerClosed after close(). Starts the runner first if needed.
        """
        self.start()
        if not self._direct_lock.acquire(blocking=False):
            return self.submit(method, *args, **kwargs).result()  # another call reads the direct pipe
        try:
            call_id = self._send_direct(method, args, kwargs)
            poller = select.poll()
            for fd in (self._direct.fileno(), self._process.sentinel):
                poller.register(fd, select.POLLIN)
            while True:
                ready = [fd for fd, _ in _spin(poller, self._spin_s)]
                if ready == [self._process.sentinel]:
                    break  # exited; a reply it sent before that is read first
                try:
                    message = _recv(self._direct)
                except (EOFError, OSError):
                    break
                done, value = self._direct_reply(method, call_id, message)
                if done:
                    return value
            self._finished.result()  # the reader thread reaps the child and records why it ended
            raise self._ended_error(method)
        finally:
            self._direct_lock.release()

    async def acall(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """`call` for an event loop: the loop itself reads the reply, no thread waits on it or wakes it."""
        self.start()
        if not self._direct_lock.acquire(blocking=False):
            return await asyncio.wrap_future(self.submit(method, *args, **kwargs))
        try:
            call_id = self._send_direct(method, args, kwargs)
            loop = asyncio.get_running_loop()
            reply: asyncio.Future[tuple[bool, Any]] = loop.create_future()
            fd, sentinel = self._direct.fileno(), self._process.sentinel

            def readable() -> None:
                try:
                    message = _recv(self._direct)
                except (EOFError, OSError):  # the child's end is closed: no reply will come
                    if not reply.done():
                        reply.set_result((False, None))
                    return
                try:
                    done, value = self._direct_reply(method, call_id, message)
                except BaseException as exc:  # noqa: BLE001 - the remote error, raised in the awaiting task
                    if not reply.done():
                        reply.set_exception(exc)
                    return
                if done and not reply.done():
                    reply.set_result((True, value))

            def gone() -> None:
                try:
                    unread = self._direct.poll(0)  # readable() reads a last reply (or the end of the pipe)
                except OSError:
                    unread = False  # closed by close()
                if not reply.done() and not unread:
                    reply.set_result((False, None))

            loop.add_reader(fd, readable)
            loop.add_reader(sentinel, gone)
            try:
                answered, value = await reply
            finally:
                loop.remove_reader(fd)
                loop.remove_reader(sentinel)
            if answered:
                return value
            await asyncio.wrap_future(self._finished)
            raise self._ended_error(method)
        finally:
            # After a cancelled wait the reply still comes; the next reader skips it (another call id).
            self._direct_lock.release()

    def stream(self, method: str, *args: Any, **kwargs: Any) -> RunnerStream:
        """Iterate `obj.method(*args, **kwargs)`, a generator, in the child: its items as they come (module doc).

        Iterating raises what `call` raises; closing the stream (or leaving a `for` over it early) stops the
        generator in the child. The caller reads the items itself while no other call does; else the reader
        thread delivers them."""
        self.start()
        if self._direct_lock.acquire(blocking=False):
            try:
                call_id = self._send_direct(method, args, kwargs, kind="stream")
            except BaseException:
                self._direct_lock.release()
                raise
            return RunnerStream(self, method, call_id, None)
        request = pickle.dumps((method, args, kwargs), protocol=_PICKLE)
        inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        with self._lock:
            if self._ended is not None:
                raise self._ended_error(method)
            call_id = next(self._ids)
            self._streams[call_id] = inbox
        try:
            with self._send_lock:
                _send(self._conn, "stream", call_id, request)
        except (OSError, ValueError) as exc:  # most likely the child just died: the reader tells the inbox why
            log.debug("send to %s failed: %s", self.target, exc)
        return RunnerStream(self, method, call_id, inbox)

    def _stream_message(self, stream: RunnerStream) -> tuple[str, Any]:
        """The next message of `stream` (kind, payload): "item", "result", "error", or "ended" (the child is gone)."""
        if stream.inbox is not None:
            return stream.inbox.get()
        poller = select.poll()
        try:
            for fd in (self._direct.fileno(), self._process.sentinel):
                poller.register(fd, select.POLLIN)
        except (OSError, ValueError):  # closed by close()
            return "ended", None
        while True:
            ready = [fd for fd, _ in _spin(poller, self._spin_s)]
            if ready == [self._process.sentinel]:
                break
            try:
                kind, reply_id, payload = _recv(self._direct)
            except (EOFError, OSError):
                break
            if kind == "event":
                self._deliver_event(pickle.loads(payload))
            elif reply_id == stream.call_id and kind in ("item", "result", "error"):
                return kind, payload
        self._finished.result()  # the reader thread reaps the child and records why it ended
        return "ended", None

    def _stream_send(self, stream: RunnerStream, kind: str, payload: bytes) -> None:
        """A "more" or "cancel" message for `stream`, on the pipe it runs on; lost if the child is gone."""
        try:
            if stream.inbox is None:
                _send(self._direct, kind, stream.call_id, payload)  # only the stream's holder writes there now
            else:
                with self._send_lock:
                    _send(self._conn, kind, stream.call_id, payload)
        except (OSError, ValueError):
            pass  # the next read reports the child's end

    def _stream_done(self, stream: RunnerStream) -> None:
        if stream.inbox is None:
            self._direct_lock.release()
        else:
            with self._lock:
                self._streams.pop(stream.call_id, None)

    def _send_direct(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], kind: str = "call") -> int:
        request = pickle.dumps((method, args, kwargs), protocol=_PICKLE)
        with self._lock:
            if self._ended is not None:
                raise self._ended_error(method)
            call_id = next(self._ids)
        try:
            _send(self._direct, kind, call_id, request)
        except (OSError, ValueError) as exc:
            log.debug("send to %s failed: %s", self.target, exc)
            try:
                self._finished.result(timeout=5.0)  # most likely the child just died
            except FutureTimeout:
                raise RunnerError(f"could not send {method!r} to {self.target}: {exc}") from exc
            raise self._ended_error(method) from None
        return call_id

    def _direct_reply(self, method: str, call_id: int, message: tuple[str, int | None, memoryview]) -> tuple[bool, Any]:
        """(True, result) for the reply to `call_id`; raises its error; (False, None) for an event, or for
        the late reply of an earlier call whose caller stopped waiting."""
        kind, reply_id, payload = message
        if kind == "event":
            self._deliver_event(pickle.loads(payload))
        elif kind in ("result", "error") and reply_id == call_id:
            return True, _outcome(kind, payload, method)
        elif kind not in ("result", "error"):
            log.warning("%s sent an unknown message %r", self.target, kind)
        return False, None

    def submit(self, method: str, *args: Any, **kwargs: Any) -> Future[Any]:
        """Send the call and return at once; the future resolves as `call` would return or raise.

        The reply comes through the reader thread (one wake-up more than `call` or `acall`).
        """
        self.start()
        request = pickle.dumps((method, args, kwargs), protocol=_PICKLE)
        future: Future[Any] = Future()
        with self._lock:
            if self._ended is not None:
                raise self._ended_error(method)
            call_id = next(self._ids)
            self._pending[call_id] = (method, future)
        try:
            with self._send_lock:
                _send(self._conn, "call", call_id, request)
        except (OSError, ValueError) as exc:
            # Most likely the child just died: the reader will fail this future with the reason.
            log.debug("send to %s failed: %s", self.target, exc)
            try:
                future.result(timeout=5.0)
            except FutureTimeout:
                with self._lock:
                    self._pending.pop(call_id, None)
                raise RunnerError(f"could not send {method!r} to {self.target}: {exc}") from exc
            except BaseException:
                pass  # the future carries the reason
        return future

    # -- reader thread ---------------------------------------------------------------------------

    def _run_reader(self) -> None:
        try:
            self._process.start()
        except BaseException as exc:
            self._ready.set_exception(RunnerError(f"could not start the process for {self.target}: {exc}"))
            self._end(RunnerError(f"could not start the process for {self.target}: {exc}"))
            return
        finally:
            # The child holds its own copy; closing ours lets us see EOF when the child dies.
            self._close_child_conns()
        log.debug("started %s as pid %s", self.target, self._process.pid)
        self._serve_replies()
        self._exitcode = _reap(self._process)
        if self._closing:
            self._end(RunnerClosed(f"runner for {self.target} was closed"))
        else:
            self._end(RunnerDied(self._death_message(), self._exitcode))

    def _close_child_conns(self) -> None:
        for conn in self._child_conns:
            conn.close()
        self._child_conns = []

    def _serve_replies(self) -> None:
        sentinel = self._process.sentinel
        poller = select.poll()  # made once: multiprocessing's wait() builds a selector on every call
        for fd in (self._conn.fileno(), sentinel):
            poller.register(fd, select.POLLIN)
        while True:
            ready = [fd for fd, _ in poller.poll()]
            if ready == [sentinel]:
                self._drain()
                return
            try:
                message = _recv(self._conn)
            except (EOFError, OSError):
                return
            self._dispatch(message)

    def _drain(self) -> None:
        # Deliver what the child sent just before it exited (a last result or event).
        try:
            while self._conn.poll(0):
                self._dispatch(_recv(self._conn))
        except (EOFError, OSError):
            pass

    def _dispatch(self, message: tuple[str, int | None, memoryview]) -> None:
        kind, call_id, payload = message
        try:
            if kind == "event":
                self._deliver_event(pickle.loads(payload))
            elif kind == "ready":
                self._ready.set_result(None)
            elif kind == "init_error":
                self._ready.set_exception(_remote_error(payload, RunnerStartError, method=None))
            elif call_id is not None and (inbox := self._streams.get(call_id)) is not None:
                inbox.put((kind, bytes(payload)))  # an item or the end of a stream the reader delivers
            elif kind in ("result", "error") and call_id is not None:
                self._resolve(call_id, kind, payload)
            else:
                log.warning("%s sent an unknown message %r", self.target, kind)
        except Exception:
            log.exception("%s: could not handle a %r message", self.target, kind)

    def _deliver_event(self, event: dict[str, Any]) -> None:
        if self._on_event is None:
            log.debug("%s event: %s", self.target, event)
            return
        try:
            self._on_event(event)
        except Exception:
            log.exception("on_event callback of %s raised", self.target)

    def _resolve(self, call_id: int, kind: str, payload: memoryview) -> None:
        with self._lock:
            method, future = self._pending.pop(call_id, ("?", None))
        if future is None:
            log.warning("%s answered unknown call %s", self.target, call_id)
            return
        if not future.set_running_or_notify_cancel():
            return  # the caller gave up waiting (an awaiting task was cancelled); the answer is not needed
        try:
            future.set_result(_outcome(kind, payload, method))
        except RunnerError as exc:
            future.set_exception(exc)

    def _end(self, error: RunnerError) -> None:
        with self._lock:
            self._ended = error
        if not self._ready.done():
            self._ready.set_exception(self._ended_error(None, starting=True))
        self._fail_all(error)
        if not self._finished.done():
            self._finished.set_result(None)

    def _fail_all(self, error: RunnerError) -> None:
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
            inboxes = list(self._streams.values())
        for inbox in inboxes:
            inbox.put(("ended", None))
        for method, future in pending:
            if future.set_running_or_notify_cancel():  # skip calls whose caller stopped waiting
                future.set_exception(self._ended_error(method, base=error))

    def _ended_error(
        self, method: str | None, *, base: RunnerError | None = None, starting: bool = False
    ) -> RunnerError:
        # A fresh exception per caller: one instance raised in several threads would share a traceback.
        base = base or self._ended or RunnerClosed(f"runner for {self.target} was closed")
        when = " while starting" if starting else f" during call {method!r}" if method else ""
        if isinstance(base, RunnerDied):
            return RunnerDied(f"{base}{when}", base.exitcode)
        return type(base)(f"{base}{when}")

    def _death_message(self) -> str:
        code = self._exitcode
        who = f"engine process {self._process.pid} ({self.target})"
        if code is None:
            return f"{who} stopped answering"
        if code < 0:
            return f"{who} died with {_signal_name(-code)}"
        return f"{who} exited with code {code}"


class RunnerStream(Iterator[Any]):
    """The items of a generator method running in the child (`Runner.stream`). One thread reads it; close it
    (or read it to its end) before the runner's direct pipe serves other calls again."""

    def __init__(
        self, runner: Runner, method: str, call_id: int, inbox: queue.SimpleQueue[tuple[str, Any]] | None
    ) -> None:
        self.runner, self.method, self.call_id, self.inbox = runner, method, call_id, inbox
        self._done = False
        self._unacknowledged = 0  # items read since the child was last told

    def __iter__(self) -> RunnerStream:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        kind, payload = self.runner._stream_message(self)
        if kind == "item":
            self._unacknowledged += 1
            if self._unacknowledged >= STREAM_WINDOW // 2:  # the child may run this many items further ahead
                self.runner._stream_send(self, "more", _COUNT.pack(self._unacknowledged))
                self._unacknowledged = 0
            try:
                return pickle.loads(payload)
            except Exception as exc:
                self.close()
                raise RunnerError(f"could not unpickle an item of {self.method!r}: {exc!r}") from exc
        self._finish()
        if kind == "result":
            raise StopIteration
        if kind == "error":
            raise _remote_error(payload, RunnerCallError, method=self.method)
        raise self.runner._ended_error(self.method)

    def close(self) -> None:
        """Stop the generator in the child; the items it made meanwhile are dropped. Safe to call more than once."""
        if self._done:
            return
        self.runner._stream_send(self, "cancel", b"")
        try:
            while self.runner._stream_message(self)[0] == "item":
                pass
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self.runner._stream_done(self)

    def __enter__(self) -> RunnerStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _outcome(kind: str, payload: memoryview, method: str) -> Any:
    """A "result" reply's value; an "error" reply's RunnerCallError, raised (so is a result that cannot be
    unpickled)."""
    if kind == "error":
        raise _remote_error(payload, RunnerCallError, method=method)
    try:
        return pickle.loads(payload)
    except Exception as exc:
        raise RunnerError(f"could not unpickle the result of {method!r}: {exc!r}") from exc


def _remote_error(payload: memoryview, cls: type[RunnerCallError], *, method: str | None) -> RunnerCallError:
    info = pickle.loads(payload)
    original: BaseException | None = None
    if info.get("exception") is not None:
        try:
            original = pickle.loads(info["exception"])
        except Exception:
            original = None  # e.g. a custom exception class that only exists in the child
    return cls(info["type"], info["message"], info["traceback"], method=method, exception=original)


def _stop_process(
    process: multiprocessing.process.BaseProcess,
    conn: Connection,
    send_lock: threading.Lock,
    timeout: float = 5.0,
) -> None:
    """Graceful close message, then SIGTERM, then SIGKILL."""
    if process.pid is None or wait([process.sentinel], 0):
        return
    if timeout > 0 and send_lock.acquire(timeout=timeout):
        try:
            _send(conn, "close", None, b"")
        except (OSError, ValueError):
            pass  # already gone
        finally:
            send_lock.release()
    if wait([process.sentinel], timeout):
        return
    if timeout > 0:
        log.warning("%s did not exit within %.1f s; terminating it", process.name, timeout)
    process.terminate()
    if wait([process.sentinel], 2.0):
        return
    process.kill()
    wait([process.sentinel])


def _send(conn: Connection, kind: str, call_id: int | None, payload: bytes) -> None:
    conn.send_bytes(_HEADER.pack(_KIND_CODES[kind], -1 if call_id is None else call_id) + payload)


def _recv(conn: Connection) -> tuple[str, int | None, memoryview]:
    data = conn.recv_bytes()
    code, call_id = _HEADER.unpack_from(data)
    return _KINDS[code], None if call_id < 0 else call_id, memoryview(data)[_HEADER.size :]


def _reap(process: multiprocessing.process.BaseProcess) -> int | None:
    """Join and return the exit code (negative: killed by that signal)."""
    process.join()
    # multiprocessing.active_children() in another thread may reap the child first and leave join()
    # with no exit code for a moment; the code appears once that thread stores it.
    for _ in range(100):
        if process.exitcode is not None:
            break
        time.sleep(0.01)
    return process.exitcode


# -- child side -----------------------------------------------------------------------------------


class _Channel:
    """The child's ends of the pipes; `emit` may be called from any thread in the child.

    Events go where the reply of the call being served goes, so that they arrive before it."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.reply_to = conn
        self.lock = threading.Lock()

    def send(self, kind: str, call_id: int | None, payload: bytes, conn: Connection | None = None) -> None:
        with self.lock:
            _send(conn or self.conn, kind, call_id, payload)

    def emit(self, event: dict[str, Any]) -> None:
        self.send("event", None, pickle.dumps(event, protocol=_PICKLE), self.reply_to)


def _child_main(
    conn: Connection,
    direct: Connection,
    target: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    parent_pid: int,
) -> None:
    _die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group; the parent decides when the engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = _Channel(conn)
    try:
        factory = _import_target(target)
        if _accepts_emit(factory):
            kwargs = {**kwargs, "emit": channel.emit}
        obj = factory(*args, **kwargs)
    except BaseException as exc:
        channel.send("init_error", None, _error_payload(exc))
        return
    channel.send("ready", None, b"")
    _serve(conn, direct, channel, obj)


def _serve(conn: Connection, direct: Connection, channel: _Channel, obj: Any) -> None:
    """Serve calls and streams from both pipes, each answered on the pipe it came by. Between messages, every
    stream with items left in its window makes one, in turn."""
    sources = {conn.fileno(): conn, direct.fileno(): direct}
    poller = select.poll()
    for fd in sources:
        poller.register(fd, select.POLLIN)
    spin_s = spin_seconds()
    streams: dict[int, _ChildStream] = {}
    while True:
        runnable = any(st.window > 0 for st in streams.values())
        for fd, _ in poller.poll(0) if runnable else _spin(poller, spin_s):
            source = sources[fd]
            try:
                kind, call_id, payload = _recv(source)
            except (EOFError, OSError):
                return  # the parent is gone
            if kind == "close":
                return
            if kind in ("more", "cancel"):
                st = streams.get(call_id if call_id is not None else -1)
                if st is not None and kind == "more":
                    st.window += _COUNT.unpack(payload)[0]
                elif st is not None and call_id is not None:  # cancelled: its last message ends the stream
                    del streams[call_id]
                    _close_quietly(st.items)
                    channel.send("result", call_id, pickle.dumps(None, protocol=_PICKLE), st.source)
                continue
            channel.reply_to = source
            try:
                method, args, kwargs = pickle.loads(payload)
                value = getattr(obj, method)(*args, **kwargs)
                if kind == "stream" and call_id is not None:
                    streams[call_id] = _ChildStream(iter(value), source)
                    continue
                result = pickle.dumps(value, protocol=_PICKLE)
            except Exception as exc:
                channel.send("error", call_id, _error_payload(exc), source)
                continue
            finally:
                channel.reply_to = conn
            channel.send("result", call_id, result, source)
        for call_id, st in list(streams.items()):
            if st.window > 0:
                _advance(channel, call_id, st, streams)


class _ChildStream:
    """A stream being served: its items, the pipe they go by, and how many more may go before the caller reads."""

    def __init__(self, items: Iterator[Any], source: Connection) -> None:
        self.items, self.source, self.window = items, source, STREAM_WINDOW


def _advance(channel: _Channel, call_id: int, st: _ChildStream, streams: dict[int, _ChildStream]) -> None:
    """Send `st`'s next item, or its end (a result, or the error its generator raised)."""
    channel.reply_to = st.source  # events emitted while making the item go before it
    try:
        item = pickle.dumps(next(st.items), protocol=_PICKLE)
    except StopIteration:
        del streams[call_id]
        channel.send("result", call_id, pickle.dumps(None, protocol=_PICKLE), st.source)
        return
    except Exception as exc:
        del streams[call_id]
        _close_quietly(st.items)
        channel.send("error", call_id, _error_payload(exc), st.source)
        return
    finally:
        channel.reply_to = channel.conn
    st.window -= 1
    channel.send("item", call_id, item, st.source)


def _close_quietly(items: Iterator[Any]) -> None:
    close = getattr(items, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001 - a generator that fails while closing has nothing more to say
            log.debug("closing a stream's generator failed", exc_info=True)


def _import_target(target: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj  # type: ignore[no-any-return]


def _accepts_emit(factory: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    param = parameters.get("emit")
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


def _error_payload(exc: BaseException) -> bytes:
    try:
        original: bytes | None = pickle.dumps(exc, protocol=_PICKLE)
    except Exception:
        original = None
    info = {
        "type": _type_name(type(exc)),
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "exception": original,
    }
    return pickle.dumps(info, protocol=_PICKLE)


def _type_name(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the parent process dies, even while busy in a long call."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        except (OSError, AttributeError) as exc:
            log.warning("prctl unavailable (%s); relying on the parent watchdog", exc)
    # The parent may have died before prctl took effect; the watchdog also covers non-Linux hosts.
    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="runner-watchdog", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_WATCHDOG_INTERVAL_S)
    os._exit(1)
