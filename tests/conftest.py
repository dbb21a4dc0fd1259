"""Shared test helpers: the committed checkpoints and warm engines reused across tests.

tinygrad compiles kernels on first use (seconds on this CPU), so engines are built once per session.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
FLOAT_MODELS = ["llama32", "mistral", "qwen2", "qwen3"]
MLX_MODELS = ["llama32-4bit", "llama32-8bit", "qwen3-4bit-mixed"]
ALL_MODELS = FLOAT_MODELS + MLX_MODELS
CHUNK = 8  # small prefill chunks so the ~17-token prompts span several of them
BUCKETS = (4, CHUNK)


def reference(name: str) -> dict[str, Any]:
    """reference.json of a fixture: prompt ids, greedy ids from the reference implementation."""
    return json.loads((FIXTURES / name / "reference.json").read_text())


def reference_logits(name: str) -> np.ndarray:
    """(L, V) float32 logits for prompt + greedy[:-1], from transformers (float) or mlx-lm (MLX models)."""
    return np.load(FIXTURES / name / "reference_logits.npy")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - (np.log(np.exp(x - m).sum(-1, keepdims=True)) + m)


class EngineCache:
    def __init__(self) -> None:
        self._engines: dict[tuple, Any] = {}

    def get(self, name: str, start: int = 0, end: int | None = None, **opts: Any):
        from cluster.engine.shard import ShardEngine

        key = (name, start, end, tuple(sorted(opts.items())))
        if key not in self._engines:
            opts = {"prefill_buckets": BUCKETS, "max_context": 128, **opts}
            self._engines[key] = ShardEngine(FIXTURES / name, start, end, **opts)
        return self._engines[key]


# Fresh for every run: two test runs on one machine (their nodes share loopback mDNS) never form one cluster.
TEST_TOKEN = f"clusterctl-test-{secrets.token_hex(8)}"


@pytest.fixture(scope="session", autouse=True)
def cluster_token(tmp_path_factory):
    """One cluster token for every node and client of the run (child processes inherit it); the user's own
    ~/.config/clusterctl is never read or written."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
    patch.setenv("CLUSTERCTL_TOKEN", TEST_TOKEN)
    yield TEST_TOKEN
    patch.undo()


@pytest.fixture(scope="session")
def engines() -> EngineCache:
    return EngineCache()
