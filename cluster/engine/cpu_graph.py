"""Replay a captured CPU JIT as a loop over kernel calls prepared once, like a device graph.

tinygrad 0.14 batches a JIT's kernels into device graphs on CUDA, Metal and HCQ devices, not on CPU: there a
replay goes through the generic executor, which resolves every kernel's buffers, variables and launch size
again, about 20 us of Python a kernel. A decode step of a small model is a hundred-odd kernels with little
work each, so that was most of its time. This graph resolves everything at capture; a replay only patches the
JIT's inputs (the session's KV cache, the input rows) and the bound variables (position, attention span) into
each kernel's argument list and calls the compiled functions, their core slices through cpu_threads.
"""

from __future__ import annotations

import ctypes
from typing import Any

from tinygrad.device import Buffer, Compiled
from tinygrad.engine.jit import GraphRunner
from tinygrad.uop.ops import UOp

from cluster.engine import launch_graph
from cluster.engine.cpu_threads import run_slices
from cluster.engine.launch_graph import LaunchGraph, input_arguments


class _Kernel:
    """One kernel of the graph: its program, one argument list per core slice, and where inputs and
    variables go in those lists."""

    def __init__(self, runtime: Any, info: Any, bufs: list[Buffer], replace: list[tuple[int, int]]):
        self.runtime = runtime
        args = [b.get_buf(b.device).va_addr for b in (bufs[i] for i in info.globals)]
        self.inputs = input_arguments(info, replace)  # (argument, JIT input slot)
        core = runtime.runtimevars.get("core_id")
        self.vars = []  # (argument, variable name)
        for i, v in enumerate(info.vars):
            args.append(0)
            if v.expr != "core_id":
                self.vars.append((len(info.globals) + i, v.expr))
        slices = int(info.global_size[0]) if core is not None else 1
        self.slices = [[ctypes.c_uint64(x) for x in args] for _ in range(slices)]
        if core is not None:
            for tid, slice_args in enumerate(self.slices):
                slice_args[core].value = tid

    def run(self, inputs: dict[int, int], var_vals: dict[str, int]) -> None:
        for arg, slot in self.inputs:
            for slice_args in self.slices:
                slice_args[arg].value = inputs[slot]
        for arg, name in self.vars:
            for slice_args in self.slices:
                slice_args[arg].value = var_vals[name]
        run_slices(self.runtime, self.slices)


class CPUGraph(LaunchGraph):
    def prepare(self, runtime: Any, info: Any, bufs: list[Buffer], replace: list[tuple[int, int]]) -> _Kernel:
        return _Kernel(runtime, info, bufs, replace)

    def input_handle(self, buf: Buffer) -> int:
        return int(buf.get_buf(buf.device).va_addr)

    @staticmethod
    def supports_uop(batch_devs: list[Compiled], new_call: UOp) -> bool:
        """Compiled kernels of one CPU device with a fixed number of core slices (what `_Kernel` prepares)."""
        if not GraphRunner.supports_uop(batch_devs, new_call):  # a compiled kernel (PROGRAM) on one device
            return False
        info = new_call.src[0].arg
        return all(isinstance(d, int) for d in info.global_size) and info.target.renderer != "LVP"


def enable() -> bool:
    """Batch the kernels of CPU JITs into CPUGraph replays from now on, in this process (idempotent)."""
    return launch_graph.enable("CPU", CPUGraph)
