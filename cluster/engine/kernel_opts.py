"""What cpu_matmul and gpu_matvec read off a tinygrad kernel before they choose its options: which buffer an
axis indexes, and where an axis went after an option renumbered them; and, for tests and benchmarks, the
kernels a tensor would run."""

from __future__ import annotations

from typing import Any

from tinygrad import Tensor
from tinygrad.codegen.opt.postrange import Scheduler
from tinygrad.uop.ops import Ops, UOp


def uses(buf: Any, rng: Any) -> bool:
    """Whether the range `rng` takes part in the index of the kernel buffer `buf`. An index that is `rng` itself does
    not count: cpu_matmul's choices were made and measured with this meaning (gpu_matvec.reduction_plan checks
    that case on its own)."""
    return rng in buf.src[1].get_idx().backward_slice


def unit_stride(buf: Any, rng: Any) -> bool:
    """Whether `buf` is indexed by `rng` itself (stride 1), as a term of its index."""
    return any(term is rng for term in buf.src[1].get_idx().split_uop(Ops.ADD))


def element_dtype(dtype: Any) -> Any:
    """The dtype of the elements a kernel buffer's (pointer) dtype points to; other dtypes as they are."""
    return getattr(dtype, "base", dtype)


def axis_named(k: Scheduler, arg: Any) -> int:
    """The axis of the range named `arg` (ranges are rebuilt, and axes renumbered, as options apply)."""
    return next(i for i, r in enumerate(k.rngs) if r.arg == arg)


def scheduled_kernels(t: Tensor) -> list[UOp]:
    """The ASTs of the kernels that realizing `t` would run, in order, without running them (for inspection:
    the inputs `t` was built from must be realized already, or they are left unfilled)."""
    return [c.src[0] for c in t.schedule_linear().src if c.src and c.src[0].op is Ops.SINK]
