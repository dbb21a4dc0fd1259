"""Discovery over real zeroconf, kept on 127.0.0.1.

Several Discovery instances run in one process, each with its own AsyncZeroconf bound to loopback only. The
health probe is a dict lookup standing in for the gRPC Info call (the cluster tests cover that end to end).
Every test uses its own token fingerprint, so nodes of concurrent test runs on this host count as another
cluster and stay invisible.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from cluster.discovery import (
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    Discovery,
    Peer,
    _instance_label,
    host_ipv4_addresses,
    parse_address,
)

GIB = 1024**3
LOOPBACK = ["127.0.0.1"]


def _peer(fp: str, *, name: str = "node", proto: int = PROTOCOL_VERSION, free: int = 8 * GIB) -> Peer:
    # Nothing listens on these ports: the probe below is a dict lookup.
    return Peer(
        node_id=uuid.uuid4().hex,
        name=name,
        host="0.0.0.0",
        port=random.randrange(20000, 60000),
        protocol_version=proto,
        device="CPU",
        device_kind="cpu",
        total_memory=16 * GIB,
        free_memory=free,
        token_fingerprint=fp,
        source="self",
    )


class FakeNet:
    """Answers probes with the live record of each registered node, unless the test marked it dead."""

    def __init__(self) -> None:
        self.nodes: dict[str, Discovery] = {}
        self.dead: set[str] = set()

    def add(self, d: Discovery) -> Discovery:
        self.nodes[self.address(d)] = d
        return d

    @staticmethod
    def address(d: Discovery) -> str:
        return f"127.0.0.1:{d.me.port}"

    async def probe(self, address: str) -> Peer:
        await asyncio.sleep(0)
        if address in self.dead or address not in self.nodes:
            raise ConnectionError(f"connection refused: {address}")
        return self.nodes[address].me


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, event: str, peer: Peer) -> None:
        self.seen.append((event, peer.node_id))


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> float:
    """Poll `cond`; return the seconds it took, or fail the test after `timeout`."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def logged(caplog: pytest.LogCaptureFixture, *parts: str) -> Callable[[], bool]:
    return lambda: any(all(p in r.getMessage() for p in parts) for r in caplog.records)


def ids(d: Discovery) -> set[str]:
    return {p.node_id for p in d.peers()}


@contextlib.asynccontextmanager
async def running(*nodes: Discovery) -> AsyncIterator[None]:
    try:
        await asyncio.gather(*(n.start() for n in nodes))
        yield
    finally:
        await asyncio.gather(*(n.stop() for n in nodes))


def _mdns_node(
    net: FakeNet,
    fp: str,
    *,
    peer: Peer | None = None,
    health_interval: float = 1.0,
    drop_after: float = 3.0,
    on_change: Events | None = None,
) -> Discovery:
    d = Discovery(
        peer or _peer(fp),
        probe=net.probe,
        interfaces=LOOPBACK,
        health_interval=health_interval,
        drop_after=drop_after,
        on_change=on_change,
    )
    return net.add(d)


# --- records and helpers


def test_txt_round_trip() -> None:
    me = _peer("fp1", name="box one")
    txt = me.to_txt()
    assert set(txt) == {"id", "name", "proto", "device", "kind", "mem_total", "mem_free", "port", "fp"}
    raw = {k.encode(): v.encode() for k, v in txt.items()}  # what zeroconf hands over
    back = Peer.from_txt(raw, "10.0.0.7", me.port)
    assert back == dataclasses.replace(me, host="10.0.0.7", source="mdns")
    assert back.address == f"10.0.0.7:{me.port}"
    assert Peer.from_txt(txt, "10.0.0.7", source="peer").port == me.port  # port taken from TXT


@pytest.mark.parametrize(
    "change, match",
    [
        ({"id": None}, "lacks 'id'"),
        ({"mem_free": "lots"}, "not an integer"),
        ({"mem_total": "-1"}, "negative"),
        ({"proto": ""}, "lacks 'proto'"),
        ({"port": "70000"}, "bad port"),
    ],
)
def test_malformed_txt_raises(change: dict[str, str | None], match: str) -> None:
    txt: dict[str, str | None] = {**_peer("fp").to_txt(), **change}
    with pytest.raises(ValueError, match=match):
        Peer.from_txt({k: v for k, v in txt.items() if v is not None}, "127.0.0.1")


def test_undecodable_txt_raises() -> None:
    raw = {k.encode(): v.encode() for k, v in _peer("fp").to_txt().items()}
    raw[b"name"] = b"\xff\xfe"
    with pytest.raises(ValueError):
        Peer.from_txt(raw, "127.0.0.1", 1)


def test_addresses_and_labels() -> None:
    assert parse_address("10.0.0.2:50051") == ("10.0.0.2", 50051)
    assert parse_address("[::1]:50051") == ("::1", 50051)
    for bad in ("10.0.0.2", "10.0.0.2:x", ":50051", "h:0"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_address(bad)
    label = _instance_label("a.very." + "long" * 30, "0123456789abcdef")
    assert len(label.encode()) <= 63 and label.endswith("-01234567") and "." not in label
    assert all(not a.startswith("127.") for a in host_ipv4_addresses())
    with pytest.raises(ValueError, match="IPv4"):
        Discovery(_peer("fp"), probe=FakeNet().probe, interfaces=["::1"])


# --- real mDNS on loopback


def test_three_nodes_find_each_other() -> None:
    fp = uuid.uuid4().hex
    net = FakeNet()
    events = Events()
    a = _mdns_node(net, fp, health_interval=0.3, on_change=events)
    b = _mdns_node(net, fp, health_interval=0.3)
    c = _mdns_node(net, fp, health_interval=0.3)

    async def scenario() -> None:
        async with running(a, b, c):
            took = await wait_until(
                lambda: (
                    ids(a) == {b.me.node_id, c.me.node_id}
                    and ids(b) == {a.me.node_id, c.me.node_id}
                    and ids(c) == {a.me.node_id, b.me.node_id}
                )
            )
            print(f"three nodes found each other {took:.2f} s after start")
            seen_b = next(p for p in a.peers() if p.node_id == b.me.node_id)
            assert (seen_b.host, seen_b.port, seen_b.source) == ("127.0.0.1", b.me.port, "mdns")
            assert seen_b.free_memory == 8 * GIB and seen_b.token_fingerprint == fp
            assert [p.node_id for p in a.members()] == [a.me.node_id, *sorted([b.me.node_id, c.me.node_id])]
            assert a.members()[0].source == "self"
            assert ("joined", b.me.node_id) in events.seen and ("joined", c.me.node_id) in events.seen

    asyncio.run(scenario())


def test_txt_update_reaches_others() -> None:
    fp = uuid.uuid4().hex
    net = FakeNet()
    # Probes run once at start and then every 30 s, so the new number can only arrive by mDNS.
    a = _mdns_node(net, fp, health_interval=30, drop_after=60)
    events = Events()
    b = _mdns_node(net, fp, health_interval=30, drop_after=60, on_change=events)

    def free_seen_by_b() -> int | None:
        return next((p.free_memory for p in b.peers() if p.node_id == a.me.node_id), None)

    async def scenario() -> None:
        async with running(a, b):
            await wait_until(lambda: free_seen_by_b() == 8 * GIB)
            await a.update(dataclasses.replace(a.me, free_memory=3 * GIB))
            took = await wait_until(lambda: free_seen_by_b() == 3 * GIB)
            print(f"TXT update arrived after {took:.2f} s")
            assert ("updated", a.me.node_id) in events.seen

    asyncio.run(scenario())


def test_stop_sends_goodbye() -> None:
    fp = uuid.uuid4().hex
    net = FakeNet()
    # The probe keeps answering for the stopped node and drop_after is long: only the goodbye can drop it.
    events = Events()
    a = _mdns_node(net, fp, health_interval=0.3, drop_after=30, on_change=events)
    b, c = (_mdns_node(net, fp, health_interval=0.3, drop_after=30) for _ in range(2))

    async def scenario() -> None:
        async with running(a, b, c):
            await wait_until(lambda: len(ids(a)) == 2 and len(ids(b)) == 2)
            await c.stop()
            took = await wait_until(lambda: c.me.node_id not in ids(a) and c.me.node_id not in ids(b), 2.0)
            print(f"goodbye dropped the node after {took:.2f} s")
            assert ("left", c.me.node_id) in events.seen
            assert ids(a) == {b.me.node_id}
            await c.stop()  # idempotent

    asyncio.run(scenario())


def test_silent_peer_is_dropped_and_returns() -> None:
    fp = uuid.uuid4().hex
    net = FakeNet()
    a = _mdns_node(net, fp, health_interval=0.25, drop_after=1.0)
    b = _mdns_node(net, fp, health_interval=0.25, drop_after=1.0)

    async def scenario() -> None:
        async with running(a, b):
            await wait_until(lambda: ids(a) == {b.me.node_id})
            net.dead.add(net.address(b))  # still announced over mDNS, but no longer answering
            took = await wait_until(lambda: not ids(a), 1.0 + 1.5)
            print(f"silent node dropped after {took:.2f} s (drop_after 1.0 s)")
            assert took >= 0.7  # not before drop_after (less one probe interval)
            net.dead.clear()
            took = await wait_until(lambda: ids(a) == {b.me.node_id}, 2.0)
            print(f"node came back {took:.2f} s after answering again")

    asyncio.run(scenario())


def test_other_cluster_is_not_listed(caplog: pytest.LogCaptureFixture) -> None:
    net = FakeNet()
    fp = uuid.uuid4().hex
    a = _mdns_node(net, fp, health_interval=0.3)
    b = _mdns_node(net, fp, health_interval=0.3)
    stranger = _mdns_node(net, uuid.uuid4().hex, health_interval=0.3)

    async def scenario() -> None:
        with caplog.at_level(logging.INFO, logger="cluster.discovery"):
            async with running(a, b, stranger):
                await wait_until(lambda: ids(a) == {b.me.node_id} and ids(b) == {a.me.node_id})
                await wait_until(logged(caplog, stranger.me.node_id, "another cluster"))
                await asyncio.sleep(0.7)  # a few health rounds
                assert ids(a) == {b.me.node_id} and ids(b) == {a.me.node_id}
                assert stranger.peers() == []
        notes = [r.getMessage() for r in caplog.records if stranger.me.node_id in r.getMessage()]
        assert len([m for m in notes if "another cluster" in m]) <= 2  # once per observing node

    asyncio.run(scenario())


def test_other_protocol_version_and_malformed_records_are_not_listed(caplog: pytest.LogCaptureFixture) -> None:
    net = FakeNet()
    fp = uuid.uuid4().hex
    a = _mdns_node(net, fp, health_interval=0.3)
    b = _mdns_node(net, fp, health_interval=0.3)
    future = _mdns_node(net, fp, peer=_peer(fp, proto=PROTOCOL_VERSION + 1), health_interval=0.3)
    # A hand-made announcement of this cluster whose memory field is garbage.
    bad = _peer(fp, name="broken")
    bad_name = f"broken-{bad.node_id[:8]}.{SERVICE_TYPE}"
    bad_info = AsyncServiceInfo(
        SERVICE_TYPE,
        bad_name,
        port=bad.port,
        properties={**bad.to_txt(), "mem_free": "lots"},
        server=f"broken-{bad.node_id[:8]}.local.",
        parsed_addresses=LOOPBACK,
    )

    async def scenario() -> None:
        raw = AsyncZeroconf(interfaces=LOOPBACK)
        try:
            with caplog.at_level(logging.INFO, logger="cluster.discovery"):
                async with running(a, b, future):
                    await (await raw.async_register_service(bad_info))
                    await wait_until(lambda: ids(a) == {b.me.node_id})
                    await wait_until(logged(caplog, "protocol version", future.service_name))
                    await wait_until(logged(caplog, f"malformed mDNS record {bad_name}"))
                    await asyncio.sleep(0.7)
                    # (`future` itself runs this version's code, so only a and b are checked.)
                    assert ids(a) == {b.me.node_id} and ids(b) == {a.me.node_id}
        finally:
            await raw.async_close()

    asyncio.run(scenario())


def test_static_peers_without_mdns() -> None:
    fp = uuid.uuid4().hex
    net = FakeNet()
    b = net.add(Discovery(_peer(fp, name="b"), probe=net.probe, mdns=False, health_interval=0.2, drop_after=0.8))
    c = net.add(Discovery(_peer(fp, name="c"), probe=net.probe, mdns=False, health_interval=0.2, drop_after=0.8))
    other = net.add(Discovery(_peer("elsewhere"), probe=net.probe, mdns=False))
    old = net.add(Discovery(_peer(fp, proto=PROTOCOL_VERSION + 1), probe=net.probe, mdns=False))
    statics = [FakeNet.address(n) for n in (b, c, other, old)] + ["127.0.0.1:1"]  # the last: nobody there
    events = Events()
    a = net.add(
        Discovery(
            _peer(fp, name="a"),
            probe=net.probe,
            mdns=False,
            static_peers=statics,
            health_interval=0.2,
            drop_after=0.8,
            on_change=events,
        )
    )
    b_static = Discovery(b.me, probe=net.probe, mdns=False, static_peers=[FakeNet.address(a)], health_interval=0.2)
    net.add(b_static)

    async def scenario() -> None:
        async with running(a, b_static):
            took = await wait_until(lambda: ids(a) == {b.me.node_id, c.me.node_id}, 2.0)
            print(f"static peers joined after {took:.2f} s")
            assert {p.source for p in a.peers()} == {"peer"}
            assert {(p.host, p.port) for p in a.peers()} == {("127.0.0.1", b.me.port), ("127.0.0.1", c.me.port)}
            await wait_until(lambda: ids(b_static) == {a.me.node_id}, 2.0)
            await asyncio.sleep(0.5)
            assert ids(a) == {b.me.node_id, c.me.node_id}  # other cluster and other version stay out
            net.dead.add(FakeNet.address(c))
            took = await wait_until(lambda: ids(a) == {b.me.node_id}, 0.8 + 1.0)
            print(f"dead static peer dropped after {took:.2f} s")
            assert ("left", c.me.node_id) in events.seen
            net.dead.clear()
            await wait_until(lambda: ids(a) == {b.me.node_id, c.me.node_id}, 1.0)

    asyncio.run(scenario())


def test_dig_lists_announced_instances() -> None:
    dig = shutil.which("dig")
    if dig is None:
        pytest.skip("dig not installed (Debian/Ubuntu package bind9-dnsutils)")
    fp = uuid.uuid4().hex
    net = FakeNet()
    a = _mdns_node(net, fp, peer=_peer(fp, name="dig-a"))
    b = _mdns_node(net, fp, peer=_peer(fp, name="dig-b"))
    wanted = {a.service_name, b.service_name}

    async def query() -> set[str]:
        cmd = [dig, "-p", "5353", "@127.0.0.1", SERVICE_TYPE.rstrip("."), "PTR", "+short", "+time=2", "+tries=1"]
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await proc.communicate()
        return set(out.decode().split())

    async def scenario() -> None:
        async with running(a, b):
            await wait_until(lambda: ids(a) == {b.me.node_id})
            # Every responder in this process binds 127.0.0.1:5353 with SO_REUSEPORT, so the kernel hands each
            # unicast query to just one of them and one dig shows one node; separate hosts each answer their
            # own. A few queries (new source port each time) reach both.
            names: set[str] = set()
            for _ in range(30):
                names |= await query()
                if wanted <= names:
                    break
            assert wanted <= names, names

    asyncio.run(scenario())
