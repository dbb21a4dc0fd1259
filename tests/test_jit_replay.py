"""Replays skip TinyJit's per-call input check once a replay of the same layout passed it
(cluster/engine/jit_replay.py). Reference: numpy, and TinyJit's own errors for inputs that do not fit."""

from __future__ import annotations

import numpy as np
import pytest
from tinygrad import Tensor, TinyJit, UOp
from tinygrad.engine import jit as tinygrad_jit
from tinygrad.engine.jit import JitError

from cluster.engine.jit_replay import Replayer


def _step(x: Tensor, caches: list[Tensor], pos: UOp) -> Tensor:
    # like a decode step: writes one row of each cache in place at a bound position, reads the rows so far
    for cache in caches:
        cache[pos : pos + 1].assign(x)
    return sum(c[: pos + 1].sum(0) for c in caches).realize()  # type: ignore[return-value]


def test_replays_take_the_fast_path_and_give_tinygrads_results(monkeypatch: pytest.MonkeyPatch) -> None:
    checks = 0
    original = tinygrad_jit._prepare_jit_inputs

    def counting(args, kwargs):  # type: ignore[no-untyped-def]
        nonlocal checks
        checks += 1
        return original(args, kwargs)

    monkeypatch.setattr(tinygrad_jit, "_prepare_jit_inputs", counting)
    jit, replay = TinyJit(_step), Replayer()
    pos = UOp.variable("pos", 0, 15)
    x = Tensor.zeros(1, 4).contiguous().realize()
    sessions = [[Tensor.zeros(16, 4).contiguous().realize() for _ in range(3)] for _ in range(2)]
    want = [np.zeros((16, 4), np.float32) for _ in range(2)]
    rng = np.random.default_rng(0)
    for i in range(10):
        s, p = i % 2, i // 2  # two sessions in turns: a different set of cache buffers on every call
        row = rng.standard_normal((1, 4)).astype(np.float32)
        x.assign(Tensor(row)).realize()
        out = replay(jit, x, sessions[s], pos.bind(p)).numpy()
        want[s][p] = row
        np.testing.assert_allclose(out, 3 * want[s][: p + 1].sum(0), rtol=1e-5, atol=1e-5)
    # calls 1-2 run and capture, call 3 is TinyJit's checked replay; the other 7 skip the check
    assert checks == 3
    assert jit.cnt == 10


def test_another_layout_goes_through_tinygrads_check() -> None:
    jit, replay = TinyJit(_step), Replayer()
    pos = UOp.variable("pos", 0, 15)
    x = Tensor.zeros(1, 4).contiguous().realize()
    caches = [Tensor.zeros(16, 4).contiguous().realize()]
    for p in range(3):
        replay(jit, x, caches, pos.bind(p))
    wrong = [Tensor.zeros(8, 4).contiguous().realize()]  # a cache of another length than the captured one
    with pytest.raises(JitError):
        replay(jit, x, wrong, pos.bind(3))
    lazy = Tensor.ones(1, 4) * 2  # not realized: TinyJit realizes it, the fast path does not take it
    out = replay(jit, lazy, caches, pos.bind(3)).numpy()
    np.testing.assert_allclose(out, [2.0] * 4)
