"""What a decode step asks of an NVIDIA GPU's instruction issue, read without a GPU: each kernel that
`cuda_census.py` renders is compiled for sm_90 by nvcc and disassembled by nvdisasm, and its main loop counted.

A decode product reads each weight once; when the instructions it issues per weight take longer than the weight's
bytes take to arrive, the product is bound by instruction issue, not by memory. Conversions (integer to float,
float to half, ...) and special functions issue at 16 per clock and SM on compute capability 9.0 against 128 for
a float multiply-add (CUDA C++ Programming Guide, arithmetic instruction throughput), so each counts 8 slots here.

For each kernel: the SASS instructions of one pass of its main loop (the first loop of its source, kept rolled
with `#pragma unroll 1` so one pass is one body), the conversions among them, the passes a thread makes through
it at the position, and from those an issue time for the whole kernel on an H200 (132 SMs, 4
schedulers each, 1.98 GHz) next to its bytes' time at the floor's bandwidth. These are estimates from static
counts, to compare forms of the same kernels (e.g. `CLUSTERCTL_QUANT_UNPACK=float`, `CLUSTERCTL_MATVEC_ROWS=4`);
the GPU bench measures the kernels themselves.

    .venv/bin/python bench/sass_census.py --preset llama-3.2-1b --bits 4
    CLUSTERCTL_QUANT_UNPACK=float CLUSTERCTL_MATVEC_ROWS=4 .venv/bin/python bench/sass_census.py --bits 4

Needs nvcc (a CUDA toolkit) and nvdisasm (a CUDA toolkit's, or `pip install nvidia-cuda-nvdisasm`): found on
PATH, in /usr/local/cuda/bin, in an installed nvidia-* wheel, or named by $NVCC / $NVDISASM.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cuda_census import Kernel

SMS, SCHEDULERS, CLOCK_HZ = 132, 4, 1.98e9  # an H200 SXM
BANDWIDTH = 4.26e12  # bytes/s: the floor's device copy bandwidth on an H200 (PERF.md)
SLOW = frozenset({"I2F", "I2FP", "F2F", "F2I", "F2FP", "MUFU"})  # conversions and special functions
SLOW_COST = 8  # issue slots each, against a multiply-add's 1 (16 vs 128 lanes a clock and SM)
ARCH = "sm_90"


def find_tool(name: str) -> str:
    candidates = [os.environ.get(name.upper(), ""), shutil.which(name) or "", f"/usr/local/cuda/bin/{name}"]
    for entry in sys.path:  # pip's nvidia-* wheels put the toolkit's programs under nvidia/<part>/bin
        candidates += glob.glob(os.path.join(entry, "nvidia", "*", "bin", name))
    found = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if found is None:
        raise SystemExit(f"sass_census: {name} not found (install a CUDA toolkit, or `pip install nvidia-cuda-{name}`)")
    return found


@dataclass
class Loop:
    instructions: int  # a pass of the main loop
    conversions: int
    outside: int  # the kernel's other instructions, each issued once
    outside_conversions: int


_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z0-9_]+)(.*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")


def main_loop(sass: str) -> Loop:
    """The body between the longest backward branch and its label, and everything else."""
    labels: dict[str, int] = {}
    ops: list[str] = []
    loops: list[tuple[int, int]] = []
    for line in sass.splitlines():
        if m := _LABEL.match(line):
            labels[m.group(1)] = len(ops)
        elif m := _INSTRUCTION.match(line):
            if m.group(1) == "NOP":
                continue
            ops.append(m.group(1))
            target = re.search(r"\((\.L_x_\d+)\)", m.group(2)) if m.group(1) == "BRA" else None
            if target and target.group(1) in labels:
                loops.append((labels[target.group(1)], len(ops)))
    start, end = max(loops, key=lambda r: r[1] - r[0], default=(0, 0))
    body, rest = ops[start:end], ops[:start] + ops[end:]
    return Loop(len(body), sum(o in SLOW for o in body), len(rest), sum(o in SLOW for o in rest))


def loop_of(source: str, compiler: Compiler | None = None) -> Loop:
    """The main loop's counts of one CUDA kernel's source."""
    return main_loop((compiler or Compiler()).sass(rolled(source)))


class Compiler:
    def __init__(self) -> None:
        self.nvcc, self.nvdisasm = find_tool("nvcc"), find_tool("nvdisasm")
        self.dir = Path(tempfile.mkdtemp(prefix="sass-census-"))

    def sass(self, source: str) -> str:
        name = self.dir / hashlib.sha256(source.encode()).hexdigest()[:16]
        cu, cubin, sass = (name.with_suffix(s) for s in (".cu", ".cubin", ".sass"))
        if not sass.exists():
            cu.write_text(source)
            cmd = [self.nvcc, "-cubin", f"-arch={ARCH}", "-O3", "-o", cubin, cu]
            subprocess.run(cmd, check=True, capture_output=True)
            sass.write_bytes(subprocess.run([self.nvdisasm, "-c", cubin], check=True, capture_output=True).stdout)
        return sass.read_text()


def rolled(source: str) -> str:
    """The source with its first loop kept rolled: one pass of it is one body in the SASS."""
    i = source.find("for (int ")
    return source if i < 0 else source[:i] + "#pragma unroll 1\n  " + source[i:]


@dataclass
class Row:
    kernel: Kernel
    loop: Loop
    passes: int

    @property
    def per_thread(self) -> tuple[int, int]:
        """(instructions, conversions) one thread issues."""
        loop = self.loop
        return loop.outside + loop.instructions * self.passes, loop.outside_conversions + loop.conversions * self.passes

    @property
    def issue_us(self) -> float:
        instructions, conversions = self.per_thread
        warps = self.kernel.blocks * -(-self.kernel.threads_per_block // 32)
        slots = warps * (instructions + (SLOW_COST - 1) * conversions)
        return 1e6 * slots / (SMS * SCHEDULERS * CLOCK_HZ)

    @property
    def bytes_us(self) -> float:
        return self.kernel.mbytes * 1e6 / BANDWIDTH * 1e6


def measure(kernels: list[Kernel], compiler: Compiler) -> list[Row]:
    return [Row(k, loop_of(k.source, compiler), k.loops[0] if k.loops else 0) for k in kernels]


def table(rows: list[Row], title: str) -> str:
    lines = [
        f"### SASS ({ARCH}, nvcc -O3): {title}",
        "",
        "| graph | kernel | count | blocks x threads | loop ins / pass | conversions / pass | passes |"
        " ins / thread | issue us (est.) | bytes us | bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: Counter[tuple[str, str, str]] = Counter()
    first: dict[tuple[str, str, str], Row] = {}
    for r in rows:
        key = (r.kernel.graph, r.kernel.name, r.kernel.source)
        groups[key] += 1
        first.setdefault(key, r)
    for key, n in groups.items():
        r = first[key]
        k, loop = r.kernel, r.loop
        bound = "issue" if r.issue_us > r.bytes_us else "bytes"
        lines.append(
            f"| {k.graph} | `{k.name}` | {n} | {k.blocks} x {k.threads_per_block} | {loop.instructions} |"
            f" {loop.conversions} | {r.passes} | {r.per_thread[0]} | {r.issue_us:.2f} | {r.bytes_us:.2f} | {bound} |"
        )
    lines.append("")
    for graph in dict.fromkeys(r.kernel.graph for r in rows):
        mine = [r for r in rows if r.kernel.graph == graph]
        issue, nbytes = sum(r.issue_us for r in mine), sum(r.bytes_us for r in mine)
        slower = sum(max(r.issue_us, r.bytes_us) for r in mine)
        lines.append(
            f"- {graph}: {len(mine)} kernels, issue {issue:.0f} us, bytes {nbytes:.0f} us,"
            f" the slower of the two per kernel {slower:.0f} us"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import cuda_census  # sets the NULL device with the CUDA renderer before tinygrad is imported

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda_census.add_model_arguments(ap)
    args = ap.parse_args(argv)
    compiler = Compiler()  # nvcc and nvdisasm found before the minutes the census takes
    checkpoint = cuda_census.model_dir(args)
    kernels = [k for k in cuda_census.census(checkpoint, args.position) if k.graph in ("decode", "greedy")]
    knobs = ", ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("CLUSTERCTL_")) or "defaults"
    print(table(measure(kernels, compiler), f"{checkpoint.name}, position {args.position}, {knobs}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
