"""Conversions between protobuf messages and the engine's values, message-size limits, and error codes."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import grpc
import numpy as np

from cluster.rpc.pb import cluster_pb2 as pb
from cluster.sampling import SamplingParams

PROTOCOL_VERSION = 1
MiB = 1 << 20
# The server's cap, fixed when it starts, before any model is known; each request is then checked against the
# loaded model's dimensions. A full-context prefill of a large model stays well below it.
SERVER_MAX_MESSAGE = 256 * MiB
# dtypes hidden states and token ids may travel in
HIDDEN_DTYPES = frozenset({"float32", "float16"})
TOKEN_DTYPES = frozenset({"int32", "int64"})


class WireError(ValueError):
    """A message that does not describe a valid tensor or parameter set."""


def message_limit(hidden_size: int, max_context: int) -> int:
    """Bytes a channel must accept: a whole-context prefill of float32 hidden states, plus room for the
    manifest's small files (tokenizers run to tens of MiB)."""
    return max(64 * MiB, max_context * hidden_size * 4 + MiB)


def channel_options(max_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        # a stream idles between chat turns; keepalives notice a peer that vanished without closing TCP
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options() -> list[tuple[str, Any]]:
    return [
        *channel_options(SERVER_MAX_MESSAGE),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.so_reuseport", 0),  # two nodes must never share a port by accident
    ]


def to_tensor(arr: np.ndarray) -> pb.Tensor:
    arr = np.ascontiguousarray(arr)
    return pb.Tensor(shape=list(arr.shape), dtype=arr.dtype.name, data=arr.tobytes())


def from_tensor(t: pb.Tensor, allowed: frozenset[str]) -> np.ndarray:
    """The tensor as numpy; dtype, shape and byte length are checked before anything is read."""
    if t.dtype not in allowed:
        raise WireError(f"tensor dtype {t.dtype!r} is not one of {sorted(allowed)}")
    shape = tuple(int(d) for d in t.shape)
    if not shape or any(d < 0 for d in shape):
        raise WireError(f"tensor shape {list(shape)} is not valid")
    dtype = np.dtype(t.dtype)
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(t.data):
        raise WireError(f"tensor of shape {list(shape)} and dtype {t.dtype} needs {expected} bytes, got {len(t.data)}")
    return np.frombuffer(t.data, dtype=dtype).reshape(shape)


def sampling_to_pb(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        logit_bias=dict(params.logit_bias),
    )
    if params.seed is not None:
        msg.seed = params.seed
    return msg


# SamplingParams' fields, named as SamplingParams (the dataclass) and the SDK's options name them
SAMPLING_FIELDS = tuple(pb.SamplingParams.DESCRIPTOR.fields_by_name)


def sampling_fields(msg: pb.SamplingParams) -> dict[str, Any]:
    """The fields the sender set (unset ones take defaults chosen by the receiver)."""
    fields = {name: getattr(msg, name) for name in SAMPLING_FIELDS if name != "logit_bias" and msg.HasField(name)}
    if msg.logit_bias:
        fields["logit_bias"] = tuple(sorted(msg.logit_bias.items()))
    return fields


def sampling_from_pb(msg: pb.SamplingParams, defaults: dict[str, Any] | None = None) -> SamplingParams:
    """Set fields over `defaults` over the neutral values; invalid values raise WireError."""
    try:
        return SamplingParams(**{**(defaults or {}), **sampling_fields(msg)})
    except (TypeError, ValueError) as e:
        raise WireError(f"bad sampling parameters: {e}") from None


def top_pairs(ids: Iterable[int], logprobs: Iterable[float]) -> list[tuple[int, float]]:
    return [(int(i), float(lp)) for i, lp in zip(ids, logprobs, strict=True)]


# gRPC status codes for the errors a node raises; the client maps them back to typed exceptions.
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
BUSY = "busy: "  # starts the details of an EXHAUSTED answer that means: every session in use, try later
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def node_info_dict(n: pb.NodeInfo) -> dict[str, Any]:
    """A member and its shards as plain data: the fields of the SDK's NodeView, and the dashboard's node rows."""
    shards = [
        {
            "model_id": s.model_id,
            "layers": [s.start, s.end],
            "device": s.device,
            "bytes": s.weight_bytes,
            "sessions": s.sessions,
            "max_sessions": s.max_sessions,
            "memory_used": s.memory_used,
            "warmup_s": round(s.warmup_s, 2),
            "graphs_from_cache": s.graphs_from_cache,
            "pipeline_chunk": s.pipeline_chunk,
        }
        for s in n.shards
    ]
    return {
        "node_id": n.node_id,
        "name": n.name,
        "address": f"{n.host}:{n.port}",
        "device": n.device,
        "device_kind": n.device_kind,
        "total_memory": n.total_memory,
        "free_memory": n.free_memory,
        "shards": shards,
    }
