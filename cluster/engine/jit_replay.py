"""Replay captured TinyJits without tinygrad re-deriving their inputs on every call.

On every replay TinyJit 0.14 rebuilds a description of each input tensor (a graph rewrite of its view) and
compares it with the captured one. That costs tens of microseconds an input, and a decode step passes every
layer's KV cache: on the tiny test model the check took longer than the step's kernels. The engine always
passes preallocated, realized buffers. So once TinyJit has checked one replay of a given input layout (the
inputs' shapes, dtypes and devices and the variables bound), later calls with that layout go straight to
the captured graph.
"""

from __future__ import annotations

from typing import Any

from tinygrad import Tensor
from tinygrad.device import Buffer
from tinygrad.engine.jit import _TinyJit as TinyJit  # the class behind the TinyJit decorator
from tinygrad.uop.ops import Ops, UOp, buffers

Layout = tuple[Any, ...]


def _inputs(args: tuple[Any, ...]) -> tuple[list[Tensor], dict[str, int], Layout] | None:
    """The JIT's input tensors in TinyJit's order, the bound variables' values, and the layout to compare;
    None when an argument is of a kind this fast path does not handle."""
    tensors: list[Tensor] = []
    var_vals: dict[str, int] = {}
    shape: list[Any] = []
    listed: list[Tensor] = []
    for arg in args:
        if isinstance(arg, Tensor):
            tensors.append(arg)
            shape.append("tensor")
        elif isinstance(arg, UOp):
            var, value = arg.unbind()
            var_vals[var.expr] = value
            shape.append(var.expr)
        elif isinstance(arg, (list, tuple)) and all(isinstance(t, Tensor) for t in arg):
            listed += arg  # TinyJit takes tensors inside lists after the positional ones
            shape.append(len(arg))
        else:
            return None
    tensors += listed
    layout: list[Any] = [tuple(shape)]
    for t in tensors:
        base = t.uop.base
        buf = buffers.get(base) if base.op is Ops.BUFFER else None
        if not isinstance(buf, Buffer) or not buf.is_allocated():
            return None  # a lazy or computed input: TinyJit realizes it, so let it
        layout.append((t.shape, t.dtype, t.device))
    if len({id(t) for t in tensors}) != len(tensors):
        return None
    return tensors, var_vals, tuple(layout)


class Replayer:
    """Calls TinyJits; a replay with the input layout of a replay TinyJit already checked skips the check."""

    def __init__(self) -> None:
        self._checked: dict[int, Layout] = {}

    def __call__(self, jit: TinyJit[Any], *args: Any) -> Any:
        found = _inputs(args)
        captured = jit.captured
        if found is not None and captured is not None and self._checked.get(id(jit)) == found[2]:
            tensors, var_vals, _ = found
            ret = captured([t.uop.base for t in tensors], var_vals)
            jit.cnt += 1
            return ret
        ret = jit(*args)
        if found is not None and captured is not None:  # this call was a replay, checked by TinyJit
            self._checked[id(jit)] = found[2]
        return ret

    def forget(self, jit: TinyJit[Any]) -> None:
        """The JIT was reset: its next captured graph must be checked again."""
        self._checked.pop(id(jit), None)
