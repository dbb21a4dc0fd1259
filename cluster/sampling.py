"""Token sampling on the device.

Every knob arrives as a tensor, never as a Python number, so one compiled graph serves every request. Only
the chosen id and its logprob come back to the host; the one host input per step is a uniform random number
drawn from the session's seed and the token's position (same seed, same tokens, whatever else runs and however
the session's cache was built: a session replayed onto new shards after a lost node draws the same numbers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tinygrad import Tensor, dtypes

# Bisection steps for the top-k / top-p thresholds: resolution max_prob / 2**20, far below any real gap.
_BISECT_STEPS = 20


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0 and math.isfinite(self.temperature), "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (
                self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty),
                "repetition_penalty must be > 0",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        """Plain argmax: no temperature and no penalty, so the cheap graph suffices."""
        return self.temperature == 0 and self.repetition_penalty == 1.0

    def as_array(self) -> np.ndarray:
        return np.array(
            [self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty], dtype=np.float32
        )


def _pick(logits: Tensor, token: Tensor) -> Tensor:
    """(2,) float32: the chosen id and its logprob under the raw logits."""
    logprobs = logits.log_softmax(-1)  # (V,)
    onehot = Tensor.arange(logits.shape[-1]).to(logits.device) == token
    return Tensor.stack(token.float(), onehot.where(logprobs, 0.0).sum())


def greedy(logits: Tensor) -> Tensor:
    # logits: (1, V) float32
    flat = logits.reshape(-1)
    return _pick(flat, flat.argmax().cast(dtypes.int32))


def _threshold(probs: Tensor, enough) -> Tensor:
    """Largest t in [0, max(probs)] with enough(probs >= t) true, by bisection (enough is monotone)."""
    lo, hi = probs.max() * 0, probs.max()
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        ok = enough(probs >= mid)
        lo, hi = ok.where(mid, lo), ok.where(hi, mid)
    return lo


def sample(logits: Tensor, params: Tensor, uniform: Tensor, seen: Tensor) -> Tensor:
    """Temperature / top-k / top-p / min-p / repetition-penalty sampling in one graph.

    logits (1, V) float32; params (5,) = temperature, top_k, top_p, min_p, repetition_penalty;
    uniform (1,) in [0, 1); seen (V,) float 0/1 marks the ids the penalty applies to. Returns (2,).
    """
    flat = logits.reshape(-1)
    V = int(flat.shape[0])
    temp, top_k, top_p, min_p, penalty = (params[i] for i in range(5))
    # HF semantics: positive logits divided by the penalty, negative ones multiplied
    penalised = (seen > 0).where((flat > 0).where(flat / penalty, flat * penalty), flat)
    probs = (penalised / temp.maximum(1e-6)).softmax(-1)
    t_k = (top_k > 0).where(_threshold(probs, lambda keep: keep.sum() >= top_k), 0.0)
    t_p = (top_p < 1).where(_threshold(probs, lambda keep: keep.where(probs, 0.0).sum() >= top_p), 0.0)
    t_min = min_p * probs.max()
    kept = (probs >= t_k.maximum(t_p).maximum(t_min)).where(probs, 0.0)
    cdf = kept.cumsum()
    drawn = (cdf < uniform * cdf[-1]).sum().minimum(V - 1).cast(dtypes.int32)
    token = (temp > 0).where(drawn, penalised.argmax().cast(dtypes.int32))
    return _pick(flat, token)


def top_logprobs(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely ids with their log-softmax values (host side; only when a client asks)."""
    x = logits.astype(np.float64).reshape(-1)
    lp = x - (np.log(np.exp(x - x.max()).sum()) + x.max())
    idx = np.argpartition(-lp, min(k, lp.size - 1))[:k]
    idx = idx[np.argsort(-lp[idx], kind="stable")]
    return [(int(i), float(lp[i])) for i in idx]
