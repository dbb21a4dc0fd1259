"""`make protos` output: the wire messages round-trip a hidden-state tensor exactly."""

from __future__ import annotations

import numpy as np

from cluster.rpc.pb import cluster_pb2, cluster_pb2_grpc


def test_forward_request_round_trips_hidden_states():
    hidden = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float16)
    msg = cluster_pb2.ForwardRequest(
        session_id="s1",
        start_pos=17,
        hidden=cluster_pb2.Tensor(shape=list(hidden.shape), dtype=str(hidden.dtype), data=hidden.tobytes()),
        sampling=cluster_pb2.SamplingParams(temperature=0.7, top_k=40, seed=5),
    )
    back = cluster_pb2.ForwardRequest.FromString(msg.SerializeToString())
    assert back.WhichOneof("input") == "hidden" and back.start_pos == 17
    got = np.frombuffer(back.hidden.data, dtype=back.hidden.dtype).reshape(tuple(back.hidden.shape))
    np.testing.assert_array_equal(got, hidden)
    assert back.sampling.HasField("seed") and back.sampling.seed == 5
    assert hasattr(cluster_pb2_grpc, "ShardStub") and hasattr(cluster_pb2_grpc, "ShardServicer")
