"""ChangedNodesCUDAGraph's bookkeeping: which nodes a replay sends to the driver, and with which arguments.

This machine has no GPU, so the driver calls a replay makes are recorded instead of made; the node params are
tinygrad's own CUDA structs. The real replay is checked on a GPU by bench/gpu.sh: the same greedy tokens as
tinygrad's CUDAGraph, and the time per step.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import pytest
import tinygrad.runtime.autogen.cuda as cuda
from tinygrad.uop.ops import UOp

from cluster.engine import cuda_graph
from cluster.engine.cuda_graph import ChangedNodesCUDAGraph


def kernel_node(args: list[int], values: list[int]) -> tuple[object, object, ctypes.Structure, bool]:
    """(graph node, node params, argument struct, is a copy) as CUDAGraph keeps them. The argument struct is laid out
    as tinygrad's encode_args lays it out: 8-byte device pointers f0.., then int32 variables v0.."""
    fields = [(f"f{i}", ctypes.c_uint64) for i in range(len(args))] + [(f"v{i}", ctypes.c_int32) for i in values]
    c_args = type("Args", (ctypes.Structure,), {"_fields_": fields})(*args, *values)
    params = cuda.CUDA_KERNEL_NODE_PARAMS_v1(gridDimX=1, gridDimY=1, gridDimZ=1, blockDimX=32, blockDimY=1, blockDimZ=1)
    return object(), params, c_args, False


@pytest.fixture
def driver(monkeypatch):
    """The node sends a replay makes, in order: (node index, its argument struct's values as sent)."""
    sent: list[tuple[int, dict[str, int]]] = []
    graph_ref: dict[str, ChangedNodesCUDAGraph] = {}

    def set_params(instance, node, params_ref):
        graph = graph_ref["graph"]
        j = next(i for i, n in enumerate(graph.nodes) if n[0] is node)
        args = graph.nodes[j][2]
        params = params_ref._obj
        sent.append((j, {**{name: getattr(args, name) for name, _ in args._fields_}, "grid": params.gridDimX}))
        return 0

    monkeypatch.setattr(cuda, "cuGraphExecKernelNodeSetParams", set_params)
    monkeypatch.setattr(cuda, "cuGraphLaunch", lambda instance, stream: 0)
    return sent, graph_ref


def buffer(address: int) -> SimpleNamespace:
    """A JIT input as the graph reads it: `input_uops[slot].buffer._buf`, a device pointer."""
    return SimpleNamespace(buffer=SimpleNamespace(_buf=address))


def test_a_replay_sends_only_the_nodes_whose_arguments_changed(driver):
    sent, graph_ref = driver
    blocks = UOp.variable("attention_blocks", 1, 256)
    graph = ChangedNodesCUDAGraph.__new__(ChangedNodesCUDAGraph)  # the graph tinygrad would have built, by hand
    graph.nodes = [
        kernel_node([0xA0], [0]),  # 0: writes the KV cache (input 0) at start_pos
        kernel_node([0xB0], [0]),  # 1: attention: its grid is a number of blocks
        kernel_node([0xC0], []),  # 2: reads input 1 only
        kernel_node([0xD0], []),  # 3: neither: never sent
    ]
    graph.calls = [(0, None, [], {})] * 4
    graph.vars = ["attention_blocks", "start_pos"]
    graph.uop_replace = [[(0, 0)], [], [(0, 1)], []]
    graph.var_vals_replace = {0: [(0, 1)], 1: [(0, 0)]}
    graph.symbolic_dims = [(blocks * 4, 1, 1)]
    graph.launch_dims_replace = {1: (0, None)}
    graph.launch_dims_base = {1: ((1, 1, 1), (32, 1, 1))}
    graph.updatable = [0, 1, 2]
    graph.instance = object()
    graph.sent, graph.sends = {}, 0
    graph_ref["graph"] = graph
    cache, rows, other_cache = buffer(0x1000), buffer(0x2000), buffer(0x3000)

    graph((cache, rows), {"start_pos": 5, "attention_blocks": 1})
    assert [j for j, _ in sent] == [0, 1, 2]  # the first replay sends every node that takes inputs or variables
    assert sent[0][1] == {"f0": 0x1000, "v0": 5, "grid": 1} and sent[1][1]["grid"] == 4
    sent.clear()

    graph((cache, rows), {"start_pos": 6, "attention_blocks": 1})
    assert sent == [(0, {"f0": 0x1000, "v0": 6, "grid": 1})]  # the next token: only start_pos changed
    sent.clear()

    graph((cache, rows), {"start_pos": 16, "attention_blocks": 2})
    assert [j for j, _ in sent] == [0, 1] and sent[1][1] == {"f0": 0xB0, "v0": 2, "grid": 8}
    sent.clear()

    graph((other_cache, buffer(0x2000)), {"start_pos": 16, "attention_blocks": 2})  # another session, same place
    assert sent == [(0, {"f0": 0x3000, "v0": 16, "grid": 1})]
    assert graph.sends == 3 + 1 + 2 + 1
    del graph.instance  # CUDAGraph.__del__ would destroy it through the driver


def test_enable_replaces_only_tinygrad_s_cuda_graph(monkeypatch):
    from tinygrad.runtime.graph.cuda import CUDAGraph

    devices = {"CUDA": SimpleNamespace(graph=CUDAGraph), "CPU": SimpleNamespace(graph=None)}
    monkeypatch.setattr(cuda_graph, "Device", devices)
    assert cuda_graph.enable("CUDA") and devices["CUDA"].graph is ChangedNodesCUDAGraph
    assert cuda_graph.enable("CUDA")  # idempotent
    assert not cuda_graph.enable("CPU") and devices["CPU"].graph is None
