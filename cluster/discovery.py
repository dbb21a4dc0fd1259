"""Cluster membership: mDNS announcements (zeroconf), static `--peer` addresses and health probes.

Discovery only knows addresses and TXT records. Whether a peer is alive is decided by `probe`, an async function
the node supplies (a gRPC Info call); a peer whose probe keeps failing for `drop_after` seconds is dropped even
when it never sent an mDNS goodbye.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ifaddr
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_clusterctl._tcp.local."
PROTOCOL_VERSION = 1
SOURCES = ("mdns", "peer", "self")
EVENTS = ("joined", "left", "updated")

_RESOLVE_TIMEOUT_MS = 3000
_WILDCARD_HOSTS = ("", "0.0.0.0")
_MAX_LABEL = 63  # bytes in one DNS label


@dataclass(frozen=True)
class Peer:
    node_id: str
    name: str
    host: str
    port: int
    protocol_version: int
    device: str
    device_kind: str
    total_memory: int  # bytes
    free_memory: int  # bytes
    token_fingerprint: str = ""
    source: str = "mdns"  # "mdns", "peer" (static --peer) or "self"

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def to_txt(self) -> dict[str, str]:
        return {
            "id": self.node_id,
            "name": self.name,
            "proto": str(self.protocol_version),
            "device": self.device,
            "kind": self.device_kind,
            "mem_total": str(self.total_memory),
            "mem_free": str(self.free_memory),
            "port": str(self.port),
            "fp": self.token_fingerprint,
        }

    @classmethod
    def from_txt(
        cls,
        props: Mapping[bytes, bytes | None] | Mapping[str, str | None],
        host: str,
        port: int | None = None,
        source: str = "mdns",
    ) -> Peer:
        """Parse a TXT record; `port` (from SRV) wins over the TXT copy. Raises ValueError when malformed."""
        txt = _decode_txt(props)

        def text(key: str) -> str:
            value = txt.get(key)
            if not value:
                raise ValueError(f"TXT record lacks {key!r}")
            return value

        def number(key: str) -> int:
            raw = text(key)
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"TXT {key}={raw!r} is not an integer") from None
            if value < 0:
                raise ValueError(f"TXT {key}={raw!r} is negative")
            return value

        port = number("port") if port is None else port
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        if source not in SOURCES:
            raise ValueError(f"bad source {source!r}")
        node_id = text("id")
        return cls(
            node_id=node_id,
            name=txt.get("name") or node_id[:8],
            host=host,
            port=port,
            protocol_version=number("proto"),
            device=txt.get("device") or "",
            device_kind=txt.get("kind") or "other",
            total_memory=number("mem_total"),
            free_memory=number("mem_free"),
            token_fingerprint=txt.get("fp") or "",
            source=source,
        )


Probe = Callable[[str], Awaitable[Peer]]
OnChange = Callable[[str, Peer], None]


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(address: str) -> tuple[str, int]:
    """Split "HOST:PORT" (or "[V6]:PORT"); raises ValueError with the bad input in the message."""
    host, sep, port_text = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not host or not 0 < port < 65536:
        raise ValueError(f"bad peer address {address!r}: expected HOST:PORT")
    return host, port


@dataclass
class _Member:
    peer: Peer
    last_ok: float  # loop time of the last sign of life (probe answer or mDNS announcement)


class Discovery:
    """Tracks the other nodes of this cluster; see the module docstring."""

    def __init__(
        self,
        me: Peer,
        *,
        probe: Probe,
        mdns: bool = True,
        interfaces: Sequence[str] | None = None,
        static_peers: Sequence[str] = (),
        health_interval: float = 1.0,
        drop_after: float = 3.0,
        on_change: OnChange | None = None,
    ) -> None:
        if health_interval <= 0 or drop_after <= 0:
            raise ValueError("health_interval and drop_after must be positive")
        for addr in interfaces or ():
            if ipaddress.ip_address(addr).version != 4:
                raise ValueError(f"mDNS interface {addr!r} is not an IPv4 address")
        self._me = dataclasses.replace(me, source="self")
        self._probe = probe
        self._mdns = mdns
        self._interfaces = list(interfaces) if interfaces else None  # None: zeroconf's default, all interfaces
        self._static: dict[str, tuple[str, int]] = {}
        for addr in static_peers:
            host, port = parse_address(addr)
            self._static[format_address(host, port)] = (host, port)
        # addresses other nodes told us about (--peer networks learn their members from each other); forgotten
        # again when they stop answering
        self._learned: dict[str, tuple[str, int]] = {}
        self._health_interval = health_interval
        self._drop_after = drop_after
        self._on_change = on_change

        label = _instance_label(me.name, me.node_id)
        self._service_name = f"{label}.{SERVICE_TYPE}"
        self._server_name = f"{_host_label(label)}.local."
        self._members: dict[str, _Member] = {}
        # mDNS instance name -> last resolved record of this cluster; kept after a health drop so the
        # peer is probed again and comes back when it answers.
        self._services: dict[str, Peer] = {}
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Future[Any]] = set()  # strong references: the loop keeps only weak ones
        self._ignored: set[tuple[str, str]] = set()
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = False

    # --- public API

    @property
    def me(self) -> Peer:
        return self._me

    @property
    def service_name(self) -> str:
        """This node's mDNS instance name."""
        return self._service_name

    def peers(self) -> list[Peer]:
        return sorted((m.peer for m in self._members.values()), key=lambda p: p.node_id)

    def members(self) -> list[Peer]:
        return [self._me, *self.peers()]

    def add_peer(self, address: str) -> None:
        """Probe ADDRESS from the next health round on (a node another member knows, or one that called)."""
        try:
            host, port = parse_address(address)
        except ValueError:
            logger.debug("ignoring peer address %r", address)
            return
        key = format_address(host, port)
        known = {m.peer.address for m in self._members.values()} | set(self._static) | {self._me.address}
        if key not in known:
            self._learned[key] = (host, port)

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("Discovery.start() called twice")
        self._started = True
        if self._mdns:
            choice = self._interfaces if self._interfaces is not None else InterfaceChoice.All
            self._aiozc = AsyncZeroconf(interfaces=choice, ip_version=IPVersion.V4Only)
            self._info = self._service_info()
            # Awaiting registration runs the RFC 6762 name probe (raises on a name clash); the returned
            # announcement broadcast runs on in the background.
            try:
                announced = await self._aiozc.async_register_service(self._info)
            except BaseException:
                await self._aiozc.async_close()
                self._aiozc = None
                raise
            self._keep(asyncio.ensure_future(announced))
            self._browser = AsyncServiceBrowser(
                self._aiozc.zeroconf, [SERVICE_TYPE], handlers=[self._on_service_state_change]
            )
            logger.info("announcing %s on %s", self._service_name, ", ".join(self._announce_addresses()))
        self._health_task = asyncio.create_task(self._health_loop(), name=f"discovery-health-{self._me.node_id[:8]}")

    async def update(self, me: Peer) -> None:
        """Replace this node's record and re-announce it when what others see changed."""
        if me.node_id != self._me.node_id:
            raise ValueError("update() cannot change the node id")
        old, self._me = self._me, dataclasses.replace(me, source="self")
        if self._aiozc is None or self._stopped or (old.to_txt() == self._me.to_txt() and old.host == me.host):
            return
        self._info = self._service_info()
        self._keep(asyncio.ensure_future(await self._aiozc.async_update_service(self._info)))

    async def stop(self) -> None:
        """Say goodbye, stop browsing and probing. Safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        pending = [*self._tasks, *self._resolving.values()]
        if self._health_task is not None:
            pending.append(self._health_task)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._aiozc is not None:
            if self._info is not None:
                try:
                    await (await self._aiozc.async_unregister_service(self._info))  # waits until goodbyes are out
                except Exception:  # closing below still sends goodbyes for whatever is registered
                    logger.debug("unregistering %s failed", self._service_name, exc_info=True)
            await self._aiozc.async_close()

    # --- announcing

    def _announce_addresses(self) -> list[str]:
        host = self._me.host
        if host not in _WILDCARD_HOSTS:
            try:
                return [str(ipaddress.ip_address(host))]
            except ValueError:
                return [socket.gethostbyname(host)]
        if self._interfaces is not None:
            return list(self._interfaces)
        return host_ipv4_addresses() or ["127.0.0.1"]

    def _service_info(self) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            self._service_name,
            port=self._me.port,
            properties=self._me.to_txt(),
            server=self._server_name,
            parsed_addresses=self._announce_addresses(),
        )

    # --- mDNS events

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if self._stopped or name.lower() == self._service_name.lower():
            return
        previous = self._resolving.pop(name, None)
        if previous is not None:
            previous.cancel()  # the newest record wins
        if state_change is ServiceStateChange.Removed:
            self._on_goodbye(name)
            return
        task = asyncio.create_task(self._resolve(name), name=f"discovery-resolve-{name}")
        self._resolving[name] = task
        task.add_done_callback(lambda t: self._resolved(name, t))

    def _resolved(self, name: str, task: asyncio.Task[None]) -> None:
        if self._resolving.get(name) is task:
            del self._resolving[name]
        if not task.cancelled() and task.exception() is not None:
            logger.error("resolving %s failed", name, exc_info=task.exception())

    async def _resolve(self, name: str) -> None:
        assert self._aiozc is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._aiozc.zeroconf, _RESOLVE_TIMEOUT_MS):
            logger.debug("no answer resolving %s", name)
            return
        host = _pick_host(info.parsed_addresses(IPVersion.V4Only))
        if host is None or info.port is None:
            logger.debug("%s has no IPv4 address or port yet", name)
            return
        try:
            txt = _decode_txt(info.properties or {})
        except ValueError as e:
            self._ignore_once(name, "malformed", "ignoring malformed mDNS record %s: %s", name, e)
            return
        proto = txt.get("proto", "")
        if proto != str(PROTOCOL_VERSION):
            # Checked before the full parse: another version may not even share the TXT layout.
            self._ignore_once(
                name, "protocol", "ignoring %s: protocol version %r, this node speaks %d", name, proto, PROTOCOL_VERSION
            )
            return
        try:
            peer = Peer.from_txt(txt, host, info.port, source="mdns")
        except ValueError as e:
            self._ignore_once(name, "malformed", "ignoring malformed mDNS record %s: %s", name, e)
            return
        if not self._accept(peer):
            return
        self._services[name] = peer
        now = asyncio.get_running_loop().time()
        member = self._members.get(peer.node_id)
        if member is None:
            self._join(peer, now)
        elif member.peer.source == "mdns":
            self._refresh(member, peer, now)
        else:  # known as a static peer: keep the address the operator gave
            self._refresh(member, dataclasses.replace(peer, host=member.peer.host, port=member.peer.port), now)

    def _on_goodbye(self, name: str) -> None:
        peer = self._services.pop(name, None)
        if peer is not None and peer.node_id in self._members:
            self._leave(peer.node_id, "said goodbye")

    # --- health

    async def _health_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self._health_round()
            except Exception:
                logger.exception("discovery health round failed")
            await asyncio.sleep(max(0.0, self._health_interval - (loop.time() - started)))

    async def _health_round(self) -> None:
        # Every address is probed once per round: members, static peers and mDNS peers dropped for silence.
        targets: dict[str, None] = {}
        for member in self._members.values():
            targets[member.peer.address] = None
        for addr in [*self._static, *self._learned]:
            targets[addr] = None
        for peer in self._services.values():
            if peer.node_id not in self._members:
                targets[peer.address] = None
        addrs = list(targets)
        answers = dict(zip(addrs, await asyncio.gather(*(self._probe_one(a) for a in addrs)), strict=True))
        if self._stopped:
            return
        now = asyncio.get_running_loop().time()

        for node_id, member in list(self._members.items()):
            if member.peer.address not in answers:
                continue  # joined while this round ran
            answer = answers[member.peer.address]
            if answer is not None and answer.node_id == node_id and self._accept(answer):
                self._refresh(member, _at(answer, member.peer), now)
            elif now - member.last_ok >= self._drop_after:
                self._leave(node_id, f"no answer for {now - member.last_ok:.1f} s")

        for peer in list(self._services.values()):
            answer = answers.get(peer.address)
            if answer is not None and answer.node_id == peer.node_id and peer.node_id not in self._members:
                if self._accept(answer):
                    self._join(_at(answer, peer), now)
        for addr, (host, port) in [*self._static.items(), *self._learned.items()]:
            answer = answers.get(addr)
            if answer is not None and answer.node_id not in self._members and self._accept(answer):
                self._join(dataclasses.replace(answer, host=host, port=port, source="peer"), now)
        for addr in list(self._learned):
            if addr in answers and answers[addr] is None:  # probed this round, and silent
                del self._learned[addr]

    async def _probe_one(self, address: str) -> Peer | None:
        try:
            return await asyncio.wait_for(self._probe(address), timeout=self._health_interval)
        except Exception as e:  # any failure, timeouts included, counts as no answer
            logger.debug("probe of %s failed: %r", address, e)
            return None

    # --- membership bookkeeping

    def _accept(self, peer: Peer) -> bool:
        if peer.node_id == self._me.node_id:
            return False
        if peer.protocol_version != PROTOCOL_VERSION:
            self._ignore_once(
                peer.node_id,
                "protocol",
                "ignoring node %s at %s: protocol version %d, this node speaks %d",
                peer.node_id,
                peer.address,
                peer.protocol_version,
                PROTOCOL_VERSION,
            )
            return False
        if peer.token_fingerprint != self._me.token_fingerprint:
            msg = "ignoring node %s (%s at %s): another cluster"
            self._ignore_once(peer.node_id, "cluster", msg, peer.node_id, peer.name, peer.address, level=logging.INFO)
            return False
        return True

    def _ignore_once(self, key: str, reason: str, msg: str, *args: object, level: int = logging.WARNING) -> None:
        if (key, reason) in self._ignored:
            return
        self._ignored.add((key, reason))
        logger.log(level, msg, *args)

    def _join(self, peer: Peer, now: float) -> None:
        self._members[peer.node_id] = _Member(peer=peer, last_ok=now)
        logger.debug("node %s (%s) joined via %s at %s", peer.node_id, peer.name, peer.source, peer.address)
        self._emit("joined", peer)

    def _refresh(self, member: _Member, peer: Peer, now: float) -> None:
        member.last_ok = now
        if peer != member.peer:
            member.peer = peer
            self._emit("updated", peer)

    def _leave(self, node_id: str, why: str) -> None:
        member = self._members.pop(node_id)
        logger.debug("node %s (%s) left: %s", node_id, member.peer.name, why)
        self._emit("left", member.peer)

    def _emit(self, event: str, peer: Peer) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(event, peer)
        except Exception:  # a faulty listener must not stop membership tracking
            logger.exception("on_change(%r) listener failed", event)

    def _keep(self, future: asyncio.Future[Any]) -> None:
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)


def host_ipv4_addresses() -> list[str]:
    """Non-loopback, non-link-local IPv4 addresses of this host."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):
                continue  # IPv6 entries are tuples
            addr = ipaddress.IPv4Address(ip.ip)
            if not (addr.is_loopback or addr.is_link_local) and ip.ip not in found:
                found.append(ip.ip)
    return found


def _at(answer: Peer, known: Peer) -> Peer:
    # A probe answer describes the node; where we reach it and how we learned of it stay ours.
    return dataclasses.replace(answer, host=known.host, port=known.port, source=known.source)


def _pick_host(addresses: list[str]) -> str | None:
    for addr in addresses:
        if not ipaddress.ip_address(addr).is_loopback:
            return addr
    return addresses[0] if addresses else None


def _decode_txt(props: Mapping[bytes, bytes | None] | Mapping[str, str | None]) -> dict[str, str]:
    # UnicodeDecodeError is a ValueError, so undecodable records count as malformed.
    out: dict[str, str] = {}
    for key, value in props.items():
        k = key.decode() if isinstance(key, bytes) else key
        v = value.decode() if isinstance(value, bytes) else value
        out[k] = "" if v is None else v
    return out


def _instance_label(name: str, node_id: str) -> str:
    # Dots would split the instance label; the id suffix keeps names unique per node.
    suffix = f"-{node_id[:8]}"
    base = (name.replace(".", "-") or "node").encode()[: _MAX_LABEL - len(suffix.encode())]
    return base.decode(errors="ignore") + suffix


def _host_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", label).strip("-")[:_MAX_LABEL] or "clusterctl"
