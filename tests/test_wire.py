"""cluster.rpc.wire: tensors and sampling parameters across the wire, checked before anything is read."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.rpc import wire
from cluster.rpc.pb import cluster_pb2 as pb
from cluster.sampling import SamplingParams


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_hidden_states_round_trip_through_serialised_messages(dtype):
    hidden = np.random.default_rng(0).standard_normal((3, 64)).astype(dtype)
    msg = pb.ForwardRequest(shard_id="s", session_id="x", hidden=wire.to_tensor(hidden), truncate=5)
    back = pb.ForwardRequest.FromString(msg.SerializeToString())
    assert back.WhichOneof("input") == "hidden" and back.HasField("truncate") and back.truncate == 5
    np.testing.assert_array_equal(wire.from_tensor(back.hidden, wire.HIDDEN_DTYPES), hidden)


def test_malformed_tensors_are_refused_with_the_reason():
    good = wire.to_tensor(np.zeros((2, 4), np.float32))
    short = pb.Tensor(shape=[2, 4], dtype="float32", data=good.data[:-1])
    with pytest.raises(wire.WireError, match="needs 32 bytes, got 31"):
        wire.from_tensor(short, wire.HIDDEN_DTYPES)
    with pytest.raises(wire.WireError, match="dtype 'object'"):
        wire.from_tensor(pb.Tensor(shape=[1], dtype="object", data=b"x"), wire.HIDDEN_DTYPES)
    with pytest.raises(wire.WireError, match="shape"):
        wire.from_tensor(pb.Tensor(shape=[-1, 4], dtype="float32", data=b""), wire.HIDDEN_DTYPES)
    with pytest.raises(wire.WireError, match="dtype"):  # token ids are never floats
        wire.from_tensor(good, wire.TOKEN_DTYPES)


def test_sampling_parameters_keep_what_was_set_and_default_the_rest():
    params = SamplingParams(temperature=0.75, top_k=40, top_p=0.875, seed=5)  # exact in float32
    assert wire.sampling_from_pb(wire.sampling_to_pb(params)) == params
    only_temperature = pb.SamplingParams(temperature=0.5)
    assert wire.sampling_fields(only_temperature) == {"temperature": 0.5}
    merged = wire.sampling_from_pb(only_temperature, defaults={"temperature": 0.25, "top_p": 0.9})
    assert merged == SamplingParams(temperature=0.5, top_p=0.9)
    with pytest.raises(wire.WireError, match="top_p"):
        wire.sampling_from_pb(pb.SamplingParams(top_p=0.0))


def test_message_limits_follow_the_model_dimensions():
    # a whole 4096-token prefill of 2048-wide float32 hidden states is 32 MiB: far above gRPC's 4 MiB default
    assert wire.message_limit(2048, 4096) >= 4096 * 2048 * 4
    assert wire.message_limit(64, 128) == 64 * wire.MiB  # small models still carry tokenizer files
    options = dict(wire.channel_options(123))
    assert options["grpc.max_receive_message_length"] == 123 == options["grpc.max_send_message_length"]


def test_node_info_becomes_the_node_view_the_sdk_and_dashboard_share():
    from cluster.client import NodeView

    shard = pb.ShardInfo(model_id="m", start=2, end=5, device="CPU", weight_bytes=10, sessions=1, memory_used=12)
    shard.max_sessions, shard.warmup_s, shard.graphs_from_cache, shard.pipeline_chunk = 3, 0.456, True, 64
    info = pb.NodeInfo(node_id="id", name="a", device="CPU", device_kind="cpu", host="10.0.0.1", port=50051)
    info.total_memory, info.free_memory = 8, 3
    info.shards.append(shard)
    view = wire.node_info_dict(info)
    assert view["address"] == "10.0.0.1:50051" and view["free_memory"] == 3
    assert view["shards"] == [
        {
            "model_id": "m",
            "layers": [2, 5],
            "device": "CPU",
            "bytes": 10,
            "sessions": 1,
            "max_sessions": 3,
            "memory_used": 12,
            "warmup_s": 0.46,
            "graphs_from_cache": True,
            "pipeline_chunk": 64,
        }
    ]
    assert NodeView(**view).shards == view["shards"]
