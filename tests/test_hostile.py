"""Hostile input: a bounded fuzz run (hypothesis) throws random and malformed messages at every RPC of a real
node, from a caller that holds the token (a buggy or hostile member). Every answer must be a clear error, never
a crash; afterwards the node still generates exactly what it generated before the fuzzing (a one-node cluster
runs the single-node engine, whose tokens the other suites check against transformers)."""

from __future__ import annotations

import math

import grpc
import pytest
from checkpoints import deepen
from cluster_nodes import NodeProcess
from conftest import FIXTURES, TEST_TOKEN
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster import auth
from cluster.rpc import wire
from cluster.rpc.pb import cluster_pb2 as pb
from cluster.rpc.pb import cluster_pb2_grpc as pb_grpc

SERVICES = [pb.DESCRIPTOR.services_by_name["Worker"], pb.DESCRIPTOR.services_by_name["Cluster"]]
# fields that would make the node dial an address: a member may name peers, but the fuzzer must never make
# this machine send traffic anywhere but loopback
NO_FUZZ = {"caller", "sources"}
# a clear refusal; INTERNAL or UNKNOWN would mean an exception the node did not expect
CLEAR = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
PROMPT, TOKENS = "The small river runs past", 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return deepen(FIXTURES / "llama32", tmp_path_factory.mktemp("model") / "llama32", 6)


@pytest.fixture(scope="module")
def node(tmp_path_factory, model):
    n = NodeProcess("target", tmp_path_factory.mktemp("hostile"), memory=1, mdns=False)
    n.wait_ready()
    with n.client() as c:  # place the model, so that shard ids exist to aim at
        *_, last = c.generate(str(model), PROMPT, raw=True, max_tokens=TOKENS, temperature=0)
        n.reference = last.tokens  # type: ignore[attr-defined]
        n.shard_ids = [sid for sid, _ in _shards(n)]  # type: ignore[attr-defined]
    yield n
    n.stop()


def _shards(n: NodeProcess) -> list[tuple[str, dict]]:
    with auth.secure_channel(n.address, TEST_TOKEN, []) as channel:
        info = pb_grpc.WorkerStub(channel).Info(pb.NodeInfoRequest(), timeout=5)
    return [(s.shard_id, {"layers": [s.start, s.end]}) for s in info.shards]


def field_values(field: FieldDescriptor, known: list[str], depth: int) -> st.SearchStrategy:
    if _is_map(field):  # map<K, V>: a dict of the entry's key and value kinds
        key, value = (field_values(field.message_type.fields_by_name[n], known, depth) for n in ("key", "value"))
        return st.dictionaries(key, value, max_size=4)
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        value: st.SearchStrategy = st.one_of(st.text(max_size=40), st.sampled_from(known))
    elif t == FieldDescriptor.TYPE_BYTES:
        value = st.binary(max_size=300)
    elif t == FieldDescriptor.TYPE_BOOL:
        value = st.booleans()
    elif t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        value = st.floats(width=32, allow_nan=True, allow_infinity=True)
    elif t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32):
        value = st.integers(-(2**31), 2**31 - 1)
    elif t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        value = st.integers(-(2**63), 2**63 - 1)
    elif t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64):
        value = st.integers(0, 2**32 - 1)
    elif t == FieldDescriptor.TYPE_MESSAGE:
        value = messages(field.message_type, known, depth + 1)
    else:
        raise AssertionError(f"no strategy for field type {t}")
    if field.is_repeated:
        return st.lists(value, max_size=4)
    return value


def messages(desc, known: list[str], depth: int = 0) -> st.SearchStrategy:
    if depth > 2:
        return st.just({})
    fields = {f.name: field_values(f, known, depth) for f in desc.fields if f.name not in NO_FUZZ}
    return st.fixed_dictionaries({}, optional=fields)


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def build(desc, values: dict):
    cls = getattr(pb, desc.name)
    msg = cls()
    for name, value in values.items():
        field = desc.fields_by_name[name]
        if _is_map(field):
            getattr(msg, name).update(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            items = value if field.is_repeated else [value]
            for item in items:
                sub = build(field.message_type, item)
                if field.is_repeated:
                    getattr(msg, name).append(sub)
                else:
                    getattr(msg, name).CopyFrom(sub)
        elif field.is_repeated:
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    return msg


def call(channel: grpc.Channel, service: str, method, request) -> None:
    path = f"/{service}/{method.name}"
    ser, de = (lambda m: m.SerializeToString()), (lambda b: b)
    if method.client_streaming:
        list(channel.stream_stream(path, ser, de)(iter(request), timeout=20))
    elif method.server_streaming:
        list(channel.unary_stream(path, ser, de)(request, timeout=20))
    else:
        channel.unary_unary(path, ser, de)(request, timeout=20)


# Generate/Chat are fuzzed with model names that do not exist (a real model would run a real generation of up
# to 2^31 tokens); their hostile parameters on a real model have their own test below.
FUZZED = [(s.full_name, m) for s in SERVICES for m in s.methods]


@pytest.mark.parametrize("service,method", FUZZED, ids=[m.name for _, m in FUZZED])
def test_random_messages_get_clear_errors(node, service, method):
    known = [*node.shard_ids, "s1", "llama32", "no-such/model", "../../etc", "\x00", ""]
    desc = method.input_type
    outcomes: dict[str, int] = {}
    with auth.secure_channel(node.address, TEST_TOKEN, wire.channel_options(64 << 20)) as channel:

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(st.lists(messages(desc, known), min_size=1, max_size=3))
        def run(values: list[dict]) -> None:
            requests = [build(desc, v) for v in values]
            if method.name in ("Generate", "Chat"):
                for r in requests:
                    r.options.model = "no-such-model-" + r.options.model[:8]
            try:
                call(channel, service, method, requests if method.client_streaming else requests[0])
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except grpc.RpcError as e:
                assert e.code() in CLEAR or e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (e.code(), e.details())
                outcomes[e.code().name] = outcomes.get(e.code().name, 0) + 1

        run()
    print(f"\n{method.name}: {outcomes}")
    assert sum(outcomes.values()) >= (20 if desc.fields else 1)  # hypothesis skips duplicate examples


def test_a_home_directory_of_no_user_is_a_clear_error(node):
    """`~0` reads as user 0's home directory; this host has no such user, so expanding it fails. The fuzzer
    found it answered INTERNAL; the name is looked up as a model name instead, and is not found."""
    with auth.secure_channel(node.address, TEST_TOKEN, wire.channel_options(64 << 20)) as channel:
        for model in ("~0", "~no-such-user-0/model"):
            for method, request in (
                ("Plan", pb.PlanRequest(model=model)),
                ("Generate", pb.GenerateRequest(options=pb.GenerationOptions(model=model), prompt="hi")),
            ):
                desc = pb.DESCRIPTOR.services_by_name["Cluster"].methods_by_name[method]
                with pytest.raises(grpc.RpcError) as err:
                    call(channel, "clusterctl.v1.Cluster", desc, request)
                assert err.value.code() in CLEAR, (model, method, err.value.code(), err.value.details())
                assert "home directory" not in err.value.details()


def test_undecodable_and_oversized_messages_are_refused(node):
    with auth.secure_channel(node.address, TEST_TOKEN, wire.channel_options(1 << 30)) as channel:
        for service in SERVICES:
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                raw = channel.unary_unary(path, lambda b: b, lambda b: b)
                if not method.client_streaming and not method.server_streaming:
                    with pytest.raises(grpc.RpcError):
                        raw(b"\xff\xff\xff\xff garbage", timeout=10)
        big = pb.NodeInfoRequest(caller="x" * (wire.SERVER_MAX_MESSAGE + 1024))
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/clusterctl.v1.Worker/Info", lambda m: m.SerializeToString(), lambda b: b)(
                big, timeout=30
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_hostile_generation_parameters_on_a_real_model(node, model):
    from cluster.client import InvalidRequest

    with node.client() as c:
        for bad in (
            {"temperature": math.nan},
            {"top_p": 0.0},
            {"top_k": -3},
            {"repetition_penalty": -1.0},
            {"logprobs": 1000},
            {"max_tokens": -5},
        ):
            with pytest.raises(InvalidRequest):
                list(c.generate(str(model), PROMPT, raw=True, **bad))
        with pytest.raises(InvalidRequest, match="context"):
            list(c.generate(str(model), "word " * 5000, raw=True, max_tokens=2))


def test_the_node_still_generates_correctly_after_the_fuzzing(node, model):
    with node.client() as c:
        *_, last = c.generate(str(model), PROMPT, raw=True, max_tokens=TOKENS, temperature=0)
    assert last.tokens == node.reference
