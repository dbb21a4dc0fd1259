"""Host <-> device copies into and out of realized tinygrad buffers, without building a tinygrad graph."""

from __future__ import annotations

import numpy as np
from tinygrad import Tensor
from tinygrad.device import Buffer
from tinygrad.dtype import _to_np_dtype


def copy_into(t: Tensor, arr: np.ndarray) -> None:
    """Overwrite a realized tensor's buffer with host data (microseconds, no new graph)."""
    dst = t.uop.base.buffer
    assert isinstance(dst, Buffer), "engine buffers live on one device"
    data = memoryview(np.ascontiguousarray(arr)).cast("B")  # type: ignore[arg-type]
    if data.nbytes != dst.nbytes:  # a raw copy of the wrong size would overrun the buffer (or fail on CUDA)
        raise ValueError(
            f"copy of {data.nbytes} bytes ({arr.dtype} {arr.shape}) into a {dst.nbytes}-byte {dst.dtype} buffer"
        )
    if hasattr(dst.allocator, "_copyin"):
        dst.allocator._copyin(dst._buf, data)
    else:
        dst.copy_from(Buffer("PYTHON", dst.size, dst.dtype, opaque=memoryview(bytearray(data))))


def copy_out(t: Tensor, elements: int | None = None) -> np.ndarray:
    """The first `elements` values (default all) of a realized tensor's buffer, flat, on the host. Microseconds:
    Tensor.numpy() and .tolist() schedule a copy kernel on every call, ~0.2 ms of host time a step."""
    buf = t.uop.base.buffer
    assert isinstance(buf, Buffer), "engine buffers live on one device"
    buf = buf.ensure_allocated()  # a view of a realized buffer gets its device handle here
    np_dtype = _to_np_dtype(buf.dtype)
    if not hasattr(buf.allocator, "_copyout") or np_dtype is None:
        return t.numpy().reshape(-1)[:elements].copy()
    out: np.ndarray = np.empty(buf.size if elements is None else elements, dtype=np_dtype)
    buf.allocator._copyout(memoryview(out).cast("B"), buf._buf)  # type: ignore[arg-type]  # the first out.nbytes
    return out
