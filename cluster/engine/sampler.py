"""Token sampling on the device.

Every knob arrives as a tensor, never as a Python number, so one compiled graph serves every request. Only
the chosen id and its logprob come back to the host; the one host input per step is a uniform random number
drawn from the session's seed and the token's position (same seed, same tokens, whatever else runs and however
the session's cache was built: a session replayed onto new shards after a lost node draws the same numbers).
"""

from __future__ import annotations

from tinygrad import Tensor, dtypes

# The vocabulary is laid out as rows (the last ones padded): every pass over it is then a reduction of each row
# (long and contiguous, so a GPU block shares one: gpu_matvec.reduction_plan) and a short one over the rows.
# Reduced whole, a vocabulary of 128256 split into 256 parts of 501 ids, each walked by one GPU thread in turn
# (bench/cuda_census.py).
ROW = 1024  # the longest row
ROWS_ALIGN = 32  # rows come in whole groups of this many, so the reductions over them split evenly too
# Thresholds for top-k and top-p are searched SEARCH_WAYS ways per pass over the vocabulary, SEARCH_ROUNDS
# passes: a resolution of max_prob / 16**5 = max_prob / 2**20, far below any real gap, in 5 passes, not 20.
SEARCH_WAYS, SEARCH_ROUNDS = 16, 5


def layout(vocab: int) -> tuple[int, int]:
    """(rows, row length) for a vocabulary: rows of up to ROW ids, a power of two, in whole groups of ROWS_ALIGN
    rows, so at most twice the vocabulary (128256 -> 128 x 1024, 32000 -> 32 x 1024, 512 -> 32 x 16)."""
    width = min(ROW, 1 << max(0, (-(-vocab // ROWS_ALIGN) - 1).bit_length()))
    return -(-vocab // (width * ROWS_ALIGN)) * ROWS_ALIGN, width


def _rows(flat: Tensor, fill: float) -> Tensor:
    """(V,) -> layout(V), the ids past V filled with `fill`."""
    V = int(flat.shape[0])
    R, C = layout(V)
    return flat.pad((0, R * C - V), value=fill).reshape(R, C)


def _ids(rows: Tensor) -> Tensor:
    """(R, C) int32: each entry's id."""
    R, C = (int(n) for n in rows.shape)
    return Tensor.arange(R * C, dtype=dtypes.int32).to(rows.device).reshape(R, C)


# Every reduction below ends its row step with .contiguous(): a kernel boundary. Without it tinygrad fuses the row
# step into whatever reads the (R,) result and recomputes it there, by a handful of threads (the greedy argmax ran
# as one thread walking every id 3 times).


def _max(rows: Tensor) -> Tensor:
    """The maximum of an (R, C) tensor, as a realized scalar."""
    return rows.max(-1).contiguous().max().contiguous()


def _total(x: Tensor) -> Tensor:
    """The sum of an (..., R, C) tensor's last two axes: each row's sum, then theirs."""
    return x.sum(-1).contiguous().sum(-1).contiguous()


def _prefix(x: Tensor) -> Tensor:
    """(N,) -> (N,) inclusive prefix sums, as N sums over a triangle: each a reduction a GPU block shares, where
    tinygrad's cumsum walks up to 256 values a thread in turn."""
    n = int(x.shape[0])
    i = Tensor.arange(n).to(x.device)
    return (i.unsqueeze(0) <= i.unsqueeze(1)).where(x.unsqueeze(0), 0.0).sum(-1).contiguous()


def _first_max(rows: Tensor, top: Tensor) -> Tensor:
    """int32: the first id whose value equals `top` (the maximum): the smallest id among the rows' hits."""
    return (rows == top).where(_ids(rows), 2**31 - 1).min(-1).contiguous().min().contiguous()


def _logprob(rows: Tensor, top: Tensor, token: Tensor) -> Tensor:
    """log-softmax of the raw logits at `token`; `top` is their maximum."""
    at = _total((_ids(rows) == token).where(rows, 0.0))
    return at - top - _total((rows - top).exp()).log()


def greedy(logits: Tensor) -> Tensor:
    """(2,) float32: the argmax id (the first, on ties) and its logprob. logits (1, V) float32."""
    rows = _rows(logits.reshape(-1), float("-inf"))
    top = _max(rows)
    # the chosen id holds the maximum: its logprob is -log(sum(exp(logits - max))), no lookup needed
    return Tensor.stack(_first_max(rows, top).float(), -_total((rows - top).exp()).log())


def _thresholds(probs: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """(2,): the largest t in [0, max(probs)], on a grid of max / 2**20, with at least top_k ids at or above it, and
    the largest with at least top_p of the mass at or above it. Both fall as t rises, so each is searched by
    measuring SEARCH_WAYS - 1 candidates a pass and keeping the interval that holds the answer; the two searches
    share their passes (a count is a mass with every weight 1)."""
    top = _max(probs)
    lo, hi = top.reshape(1).expand(2) * 0, top.reshape(1).expand(2)  # (2,)
    steps = Tensor.arange(1, SEARCH_WAYS, dtype=dtypes.float32).to(probs.device)  # (W-1,)
    weights = Tensor.stack(probs.ones_like(), probs).unsqueeze(1)  # (2, 1, R, C): counts for top-k, mass for top-p
    targets = Tensor.stack(top_k, top_p).reshape(2, 1)
    for _ in range(SEARCH_ROUNDS):
        width = (hi - lo) / SEARCH_WAYS  # (2,)
        candidates = (lo.unsqueeze(1) + width.unsqueeze(1) * steps).reshape(2, -1, 1, 1)  # (2, W-1, 1, 1), rising
        measured = _total((probs >= candidates).where(weights, 0.0))  # (2, W-1)
        below = (measured >= targets).sum(-1).float()  # a prefix passes: the answer is in [lo + below*width, +width)
        bounds = Tensor.stack(lo + below * width, lo + (below + 1) * width).contiguous()  # one kernel for all four
        lo, hi = bounds[0], bounds[1]
    return lo


def sample(logits: Tensor, params: Tensor, uniform: Tensor, seen: Tensor, bias: Tensor, allowed: Tensor) -> Tensor:
    """Temperature / top-k / top-p / min-p / repetition-penalty sampling in one graph.

    logits (1, V) float32; params (5,) = temperature, top_k, top_p, min_p, repetition_penalty;
    uniform (1,) in [0, 1); seen (V,) float 0/1 marks the ids the repetition penalty applies to; bias (V,) is added
    after it (SamplingParams.bias: logit_bias and OpenAI's penalties); allowed (V,) float 0/1 marks the ids that may
    be chosen (all but for constrained decoding: cluster/constraints.py). Returns (2,); the logprob is that of the
    raw logits.
    """
    V = int(logits.shape[-1])
    temp, top_k, top_p, min_p, penalty = (params[i] for i in range(5))
    rows = _rows(logits.reshape(-1), float("-inf"))  # (R, C)
    seen_rows = _rows(seen, 0.0)
    # HF semantics: positive logits divided by the penalty, negative ones multiplied
    penalised = (seen_rows > 0).where((rows > 0).where(rows / penalty, rows * penalty), rows) + _rows(bias, 0.0)
    penalised = (_rows(allowed, 0.0) > 0).where(penalised, float("-inf"))
    top = _max(penalised)
    weights = ((penalised - top) / temp.maximum(1e-6)).exp().contiguous()  # padding: exp(-inf) = 0
    probs = (weights / _total(weights)).contiguous()
    found = _thresholds(probs, top_k, top_p)
    t_k, t_p = (top_k > 0).where(found[0], 0.0), (top_p < 1).where(found[1], 0.0)
    t_min = min_p * _max(probs)
    kept = (probs >= t_k.maximum(t_p).maximum(t_min)).where(probs, 0.0).contiguous()  # (R, C)
    # inverse CDF in two steps: the rows wholly below the draw, then the ids below it inside the next row
    row_mass = kept.sum(-1).contiguous()  # (R,)
    row_cdf = _prefix(row_mass)
    target = (uniform[0] * row_cdf[-1]).contiguous()
    below = row_cdf < target  # the rows wholly below the draw
    full = below.sum().contiguous()
    row = (Tensor.arange(int(rows.shape[0])).to(rows.device).unsqueeze(1) == full).where(kept, 0.0).sum(0)  # (C,)
    before = below.where(row_mass, 0.0).sum().contiguous()
    inside = (before + _prefix(row.contiguous()) < target).sum().contiguous()
    drawn = (full * int(rows.shape[1]) + inside).minimum(V - 1).cast(dtypes.int32)
    token = (temp > 0).where(drawn, _first_max(penalised, top))
    return Tensor.stack(token.float(), _logprob(rows, _max(rows), token.contiguous()))


def penalised_bias(base: Tensor, counts: Tensor, penalties: Tensor) -> Tensor:
    """(V,) added to the logits: `base` (logit_bias) less OpenAI's penalties for the ids generated so far (`counts`:
    how often each id was generated in this answer; `penalties`: presence, then frequency)."""
    return base - (penalties[0] * (counts > 0).float() + penalties[1] * counts)
