"""What a request asks of the sampler: its parameters, checked, in the form the device sampler reads
(`cluster.engine.sampler`), and the host-side top logprobs. Free of tinygrad, so that clients load quickly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None
    # OpenAI's: subtracted from the logit of every id already generated in this answer, once (presence) or once
    # per time (frequency); logit_bias adds to chosen ids' logits ((id, bias) pairs)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

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
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (len(self.logit_bias) <= MAX_LOGIT_BIAS, f"logit_bias takes at most {MAX_LOGIT_BIAS} ids"),
            (
                all(i >= 0 and -100 <= b <= 100 for i, b in self.logit_bias),
                "logit_bias: ids >= 0, biases in [-100, 100]",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def biased(self) -> bool:
        """Whether logits get an additive bias (OpenAI's penalties or logit_bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    @property
    def greedy(self) -> bool:
        """Plain argmax: no temperature and no penalty, so the cheap graph suffices."""
        return self.temperature == 0 and self.repetition_penalty == 1.0 and not self.biased

    def logit_bias_array(self, vocab: int) -> np.ndarray:
        """(V,) float32: logit_bias as a vector (an id named twice gets both biases). The device sampler adds it to
        the logits, less OpenAI's penalties for the ids generated so far (engine.sampler.penalised_bias)."""
        out = np.zeros(vocab, dtype=np.float32)
        for i, b in self.logit_bias:
            out[i] += b
        return out

    def penalties_array(self) -> np.ndarray:
        return np.array([self.presence_penalty, self.frequency_penalty], dtype=np.float32)

    def as_array(self) -> np.ndarray:
        return np.array(
            [self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty], dtype=np.float32
        )


MAX_LOGIT_BIAS = 300  # ids in one logit_bias, as OpenAI allows


def top_logprobs(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely ids with their log-softmax values (host side; only when a client asks)."""
    x = logits.astype(np.float64).reshape(-1)
    lp = x - (np.log(np.exp(x - x.max()).sum()) + x.max())
    idx = np.argpartition(-lp, min(k, lp.size - 1))[:k]
    idx = idx[np.argsort(-lp[idx], kind="stable")]
    return [(int(i), float(lp[i])) for i in idx]
