"""clusterctl: a peer-to-peer, heterogeneous LLM inference cluster for Linux."""

from cluster.engine.shard import ContextFullError, EngineError, ShardEngine, StepResult
from cluster.generate import GenerationResult, TokenChunk, generate
from cluster.models.config import ConfigError, ModelConfig
from cluster.sampling import SamplingParams
from cluster.tokenizer import StreamingDetokenizer, Tokenizer, TokenizerError
from cluster.weights import Checkpoint, CheckpointError

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "ContextFullError",
    "EngineError",
    "GenerationResult",
    "ModelConfig",
    "SamplingParams",
    "ShardEngine",
    "StepResult",
    "StreamingDetokenizer",
    "TokenChunk",
    "Tokenizer",
    "TokenizerError",
    "generate",
]
