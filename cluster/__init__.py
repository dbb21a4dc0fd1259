"""clusterctl: a peer-to-peer, heterogeneous LLM inference cluster for Linux.

Names are imported on first use, so that `import cluster.engine.runner` in a fresh engine process does not
load tinygrad before the process has set its environment.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("clusterctl")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

_EXPORTS = {
    "AsyncClient": "cluster.client",
    "Chunk": "cluster.client",
    "Client": "cluster.client",
    "ClusterError": "cluster.client",
    "DoesNotFit": "cluster.client",
    "InvalidRequest": "cluster.client",
    "ModelNotFound": "cluster.client",
    "NodeBusy": "cluster.client",
    "NodeUnavailable": "cluster.client",
    "NotAuthorised": "cluster.client",
    "Checkpoint": "cluster.weights",
    "Conversation": "cluster.generation",
    "CheckpointError": "cluster.weights",
    "ConfigError": "cluster.models.config",
    "ContextFullError": "cluster.engine.shard",
    "EngineError": "cluster.engine.shard",
    "EngineProcess": "cluster.engine.process",
    "GenerationResult": "cluster.generation",
    "ModelConfig": "cluster.models.config",
    "SamplingParams": "cluster.sampling",
    "ShardEngine": "cluster.engine.shard",
    "StepResult": "cluster.engine.shard",
    "StreamingDetokenizer": "cluster.tokenizer",
    "TokenChunk": "cluster.generation",
    "Tokenizer": "cluster.tokenizer",
    "TokenizerError": "cluster.tokenizer",
    "generate": "cluster.generation",
    "resolve_model": "cluster.registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cluster' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
