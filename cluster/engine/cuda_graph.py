"""CUDA graph replays that send the driver only the kernel nodes whose arguments changed since the last replay.

On every replay tinygrad 0.14's CUDAGraph re-sends (cuGraphExecKernelNodeSetParams) every node that takes a JIT
input or a variable: in the 1B model's decode step 99 of its 230 kernel nodes take a variable (counted on
tinygrad's NULL device). Only 19 take `start_pos`, which changes every token: each layer's KV-cache write, and
the step's rotation angles and attention mask. 5 a layer take only the count of attention blocks, which changes
once every ATTN_BLOCK tokens, and a session's KV caches are the same buffers step after step.
`ChangedNodesCUDAGraph` fills each node's argument struct as tinygrad does, compares its bytes with what the
executable graph was last sent, and sends only the nodes that differ.

On by default on CUDA; CLUSTERCTL_CUDA_GRAPH=tinygrad keeps tinygrad's graph. On an H200 (bench/RESULTS.md, session
18) a 1B fp16 decode step made 62 driver calls instead of 127, the host handed the graph over in 0.31 ms
instead of 0.44, and the 128 greedy tokens were tinygrad's graph's; sampled decode 598 against 563 tok/s.
"""

from __future__ import annotations

import ctypes
import logging

import tinygrad.runtime.autogen.cuda as cuda
from tinygrad import Device
from tinygrad.device import MultiBuffer
from tinygrad.runtime.graph.cuda import CUDAGraph
from tinygrad.runtime.ops_cuda import check, cu_time_execution
from tinygrad.uop.ops import UOp, sym_infer

log = logging.getLogger(__name__)


class ChangedNodesCUDAGraph(CUDAGraph):
    """tinygrad's CUDAGraph, replayed with only the changed nodes sent to the driver."""

    def __init__(self, linear: UOp, input_uops: tuple[UOp, ...] = ()):
        super().__init__(linear, input_uops)
        self.sent: dict[int, bytes] = {}  # node -> the bytes of the arguments the executable graph holds
        self.sends = 0  # nodes sent, for the bench and the tests

    def __call__(self, input_uops: tuple[UOp, ...], var_vals: dict[str, int], wait: bool = False) -> float | None:
        values = [var_vals[v] for v in self.vars]
        dims = [tuple(sym_infer(s, var_vals) for s in dim) for dim in self.symbolic_dims]
        for j in self.updatable:
            state = self.fill(j, input_uops, values, dims)
            if self.sent.get(j) == state:
                continue
            node, params, context, is_copy = self.nodes[j]
            if is_copy:
                check(cuda.cuGraphExecMemcpyNodeSetParams(self.instance, node, ctypes.byref(params), context))
            else:
                check(cuda.cuGraphExecKernelNodeSetParams(self.instance, node, ctypes.byref(params)))
            self.sent[j] = state
            self.sends += 1
        return cu_time_execution(lambda: check(cuda.cuGraphLaunch(self.instance, None)), enable=wait)

    def fill(self, j: int, input_uops: tuple[UOp, ...], values: list[int], dims: list[tuple[int, ...]]) -> bytes:
        """Write this call's buffers, variables and launch sizes into node j's structs; return their bytes."""
        (_, params, args, is_copy), device_index = self.nodes[j], self.calls[j][0]
        for position, slot in self.uop_replace[j]:
            buf = input_uops[slot].buffer
            handle = (buf.bufs[device_index] if isinstance(buf, MultiBuffer) else buf)._buf
            if is_copy:
                setattr(params, "srcDevice" if position == 1 else "dstDevice", handle)
            else:
                setattr(args, f"f{position}", handle)
        for i, v in self.var_vals_replace.get(j, ()):
            setattr(args, f"v{i}", values[v])
        if j in self.launch_dims_replace:
            g, local = self.launch_dims_replace[j]
            base_global, base_local = self.launch_dims_base[j]
            grid = dims[g] if g is not None else base_global
            block = dims[local] if local is not None else base_local
            params.blockDimX, params.blockDimY, params.blockDimZ = block
            params.gridDimX, params.gridDimY, params.gridDimZ = grid
        # a kernel node's params point at its argument struct; a copy node's hold the addresses themselves
        return bytes(params) if is_copy else bytes(params) + bytes(args)


def enable(device: str) -> bool:
    """Replay CUDA JITs on `device` through ChangedNodesCUDAGraph from now on, in this process (idempotent). False
    when the device does not replay through tinygrad's CUDA graph (another device, or graphs off)."""
    dev = Device[device]
    if dev.graph is ChangedNodesCUDAGraph:
        return True
    if dev.graph is not CUDAGraph:
        return False
    dev.graph = ChangedNodesCUDAGraph
    log.info("%s JITs replay through graphs that send only changed nodes", device)
    return True
