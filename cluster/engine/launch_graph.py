"""Replay a captured JIT on a device without a graph of its own (OpenCL) as a loop of prepared launches.

tinygrad 0.14 has no OpenCL graph: there a replay goes through the generic executor, which resolves every
kernel's buffers, variables and launch sizes again before calling the program. On pocl that executor work was
about half of each kernel's host time. `LaunchGraph` resolves the buffers at capture and, on a replay, patches
in the JIT's inputs (the session's KV cache, the input rows), then calls each program with the launch sizes and
variable values of this call. (The CPU has its own, leaner runner: cpu_graph.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tinygrad import Device
from tinygrad.device import Buffer
from tinygrad.engine import jit as tinygrad_jit
from tinygrad.engine.jit import GraphRunner
from tinygrad.renderer import Estimates
from tinygrad.uop.ops import UOp

log = logging.getLogger(__name__)


def input_arguments(info: Any, replace: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(program argument, JIT input slot) for each of a kernel's buffers that is a JIT input."""
    position = {call_arg: k for k, call_arg in enumerate(info.globals)}
    return [(position[p], slot) for p, slot in replace if p in position]


class _Launch:
    def __init__(self, runtime: Any, info: Any, bufs: list[Buffer], replace: list[tuple[int, int]]):
        self.runtime, self.info = runtime, info
        self.handles = [b.get_buf(b.device) for b in (bufs[i] for i in info.globals)]
        self.inputs = input_arguments(info, replace)
        fixed = all(isinstance(d, int) for d in (*info.global_size, *(info.local_size or ())))
        self.dims = info.launch_dims({}) if fixed else None  # symbolic sizes (attention blocks) per call

    def run(self, inputs: dict[int, Any], var_vals: dict[str, int]) -> None:
        handles = self.handles
        if self.inputs:
            handles = list(handles)
            for arg, slot in self.inputs:
                handles[arg] = inputs[slot]
        global_size, local_size = self.dims or self.info.launch_dims(var_vals)
        self.runtime(*handles, global_size=global_size, local_size=local_size, vals=self.info.vals(var_vals))


@contextmanager
def _without_estimates() -> Iterator[None]:
    """GraphRunner.__init__ sums every kernel's symbolic op and byte counts and simplifies the sum, for tinygrad's
    statistics (GlobalCounters.global_ops/global_mem, DEBUG lines): 1.5 s of a 1B CPU shard's warm-up here, on
    every start. These graphs count as no ops and no bytes instead; their kernels are still counted."""
    counted = tinygrad_jit.estimate_uop
    tinygrad_jit.estimate_uop = lambda call: Estimates()
    try:
        yield
    finally:
        tinygrad_jit.estimate_uop = counted


class LaunchGraph(GraphRunner):
    """A graph runner for devices without one: the steps are prepared once, a replay only feeds them this
    call's inputs and variables. Subclasses prepare steps of their own (cpu_graph)."""

    def __init__(self, linear: UOp, input_uops: tuple[UOp, ...] = ()):
        with _without_estimates():
            super().__init__(linear, input_uops)
        self.steps = [
            self.prepare(runtime, ast.arg, bufs, replace)
            for (_, ast, bufs, _), runtime, replace in zip(self.calls, self.runtimes, self.uop_replace, strict=True)
        ]
        self.slots = sorted({slot for step in self.steps for _, slot in step.inputs})

    def prepare(self, runtime: Any, info: Any, bufs: list[Buffer], replace: list[tuple[int, int]]) -> Any:
        """One kernel's step: has `inputs` ((argument, JIT input slot) pairs) and `run(inputs, var_vals)`."""
        return _Launch(runtime, info, bufs, replace)

    def input_handle(self, buf: Buffer) -> Any:
        """What a step's argument holds for a JIT input buffer: the device's handle."""
        return buf.get_buf(buf.device)

    def __call__(self, input_uops: tuple[UOp, ...], var_vals: dict[str, int], wait: bool = False) -> float | None:
        st = time.perf_counter()
        inputs = {}
        for slot in self.slots:
            buf = input_uops[slot].buffer
            assert isinstance(buf, Buffer), "a graph's inputs live on one device"
            inputs[slot] = self.input_handle(buf.ensure_allocated())
        for step in self.steps:
            step.run(inputs, var_vals)
        if not wait:
            return None
        Device[self.device].synchronize()
        return time.perf_counter() - st


def enable(device: str, runner: type[LaunchGraph] = LaunchGraph) -> bool:
    """Batch the kernels of JITs on `device` into `runner` replays from now on, in this process, where tinygrad
    has no graph for it (idempotent). False when the device already replays through another graph."""
    dev = Device[device]
    if dev.graph is None:
        dev.graph = runner
        log.debug("%s JITs replay through %s", device, runner.__name__)
    return dev.graph is runner
