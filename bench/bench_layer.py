"""One weight's product on the CPU, through the engine's own layer code (decoder.Linear / QuantLinear with the rows
blocked as the loader stores them, the engine's per-core slices and prompt tiles), checked against numpy.

    .venv/bin/python bench/bench_layer.py --weights q4 --tokens 1 --copies 8

`--copies N` cycles through N copies of the weight, so that with N large enough (8 of a 2048 x 8192 layer: 67 MB)
each call reads its weight from memory as a decode step does, not from the last-level cache. Prints one line:
median and best time a call, and weights (matvec) or FLOP (matmul) a second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("DEV", "CPU")

import numpy as np  # noqa: E402
from tinygrad import Device, Tensor, TinyJit, dtypes  # noqa: E402

from cluster.engine import cpu_matmul, cpu_quant, cpu_threads  # noqa: E402
from cluster.models.config import QuantSpec  # noqa: E402
from cluster.models.decoder import CPU_NARROW_ROW_BLOCK, Linear, QuantLinear  # noqa: E402

GROUP = 64


def blocked(a: np.ndarray) -> Tensor:
    """(out, cols) -> the loader's CPU layout (out/R, cols, R), realized."""
    out = a.shape[0]
    R = CPU_NARROW_ROW_BLOCK
    return Tensor(np.ascontiguousarray(a.reshape(out // R, R, -1).transpose(0, 2, 1))).realize()


def layer(kind: str, n_in: int, n_out: int, rng: np.random.Generator) -> tuple[Linear | QuantLinear, np.ndarray]:
    """The layer and its float64 (out, in) weight for the reference."""
    if kind == "bf16":
        w = (rng.standard_normal((n_out, n_in)) * 0.02).astype(np.float32)
        bits = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncated to bf16
        ref = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return Linear(blocked(bits), None, dtypes.float32, row_blocked=True), ref
    b = {"q4": 4, "q8": 8}[kind]
    per = 32 // b
    packed = rng.integers(0, 2**32, size=(n_out, n_in // per), dtype=np.uint32)
    scales = (rng.standard_normal((n_out, n_in // GROUP)) * 0.01).astype(np.float32)
    biases = (rng.standard_normal((n_out, n_in // GROUP)) * 0.01).astype(np.float32)
    levels = (packed[:, :, None] >> (np.arange(per, dtype=np.uint32) * b)) & ((1 << b) - 1)
    q = levels.reshape(n_out, n_in // GROUP, GROUP).astype(np.float64)
    ref = (q * scales[:, :, None] + biases[:, :, None]).reshape(n_out, n_in)
    lin = QuantLinear(
        blocked(packed), blocked(scales), blocked(biases), QuantSpec(GROUP, b), dtypes.float32, row_blocked=True
    )
    return lin, ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", choices=("bf16", "q4", "q8"), default="q4")
    ap.add_argument("--tokens", type=int, default=1, help="1: a decode matvec; more: a prompt chunk's matmul")
    ap.add_argument("--in", dest="n_in", type=int, default=2048)
    ap.add_argument("--out", dest="n_out", type=int, default=8192)
    ap.add_argument("--copies", type=int, default=1, help="weights cycled through (see above)")
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    if Device.DEFAULT != "CPU":
        raise SystemExit(f"this measures tinygrad's CPU backend, not {Device.DEFAULT}")
    cpu_threads.enable()
    cpu_matmul.enable()
    quant_kernel = cpu_quant.enable("CPU")  # as an engine on this CPU; CLUSTERCTL_CPU_QUANT=0: tinygrad's code
    rng = np.random.default_rng(0)
    layers = [layer(args.weights, args.n_in, args.n_out, rng) for _ in range(args.copies)]
    xn = rng.standard_normal((1, args.tokens, args.n_in)).astype(np.float32)
    x = Tensor(xn).realize()
    jits = [TinyJit(lambda x, lin=lin: lin(x).realize()) for lin, _ in layers]
    for f in jits:
        for _ in range(3):
            y = f(x)
    got = jits[0](x).numpy().reshape(args.tokens, args.n_out)
    ref = xn.reshape(args.tokens, args.n_in).astype(np.float64) @ layers[0][1].T
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    if err > 1e-4:
        raise SystemExit(f"wrong result: max error {err:.2e} of the largest value")
    times = []
    for i in range(args.calls):
        t = time.perf_counter()
        y = jits[i % len(jits)](x)
        Device["CPU"].synchronize()
        times.append(time.perf_counter() - t)
    del y
    med, best = statistics.median(times), min(times)
    work = args.n_in * args.n_out * (1 if args.tokens == 1 else 2 * args.tokens)
    unit = "G weights/s" if args.tokens == 1 else "GFLOP/s"
    print(
        f"{args.weights} {args.n_in}->{args.n_out} x{args.tokens} tokens, {args.copies} copies: "
        f"median {med * 1e3:.3f} ms ({work / med / 1e9:.1f} {unit}), best {best * 1e3:.3f} ms "
        f"({work / best / 1e9:.1f}), max error {err:.1e}"
        + (", cpu_quant kernel" if quant_kernel and (args.weights != "bf16" or args.tokens > 1) else "")
    )


if __name__ == "__main__":
    main()
