"""Hosts in network namespaces on one machine, for demo/run_demo.py and tests/test_netns.py.

The network: a "switch" namespace holding a bridge, and one namespace per host with one veth pair whose other end
is a port of that bridge; host k has address 10.S.0.k and a multicast route (for mDNS) through its veth. Every
interface is created straight inside a namespace made here, so the machine's own namespace never sees one, and a
host holds only `lo` and its veth: whatever the hosts send can only reach each other through the bridge.
`Network.remove` kills what still runs inside and deletes the namespaces; callers run it in a `finally`.

Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and `ip` from iproute2. The demo runs as a plain script, so both
users put this folder on sys.path rather than import it from a package.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field


class NetnsError(RuntimeError):
    """An `ip` command failed; the message says which and why."""


def ip(*args: str) -> str:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def unavailable(prefix: str) -> str | None:
    """None when this process may make network namespaces, else why not. The probe namespace starts with `prefix`,
    so that whoever looks for leftovers by name also sees it."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no `ip` (iproute2)"
    probe = f"{prefix}{secrets.token_hex(3)}pr"
    try:
        ip("netns", "add", probe)
    except (NetnsError, OSError, subprocess.SubprocessError) as e:
        return f"cannot make a network namespace here ({e})"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 20) -> None:
    """SIGTERM a host's process (a node says goodbye and unloads its shards), SIGKILL if it does not exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _kill_processes(ns: str) -> None:
    """Whatever still runs in a namespace made here (a node's engine process, say) was started by its caller."""
    p = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    for pid in p.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@dataclass
class Network:
    """A bridge in namespace `switch`; host k (1-based) lives in namespace `hosts[k - 1]` at `addr(k)`."""

    tag: str  # every namespace and interface made here starts with it
    subnet: int = field(default_factory=lambda: 16 + secrets.randbelow(200))
    hosts: list[str] = field(default_factory=list)
    made: list[str] = field(default_factory=list)  # in creation order, for removal

    @property
    def switch(self) -> str:
        return f"{self.tag}sw"

    def addr(self, k: int) -> str:
        return f"10.{self.subnet}.0.{k}"

    def veth(self, k: int) -> str:
        return f"{self.tag}v{k}"  # interface names have at most 15 characters

    def exec(self, k: int, *args: str) -> list[str]:
        """The command line that runs `args` in host k (`ip netns exec` execs in place: the pid is the command's)."""
        return ["ip", "netns", "exec", self.hosts[k - 1], *args]

    def build(self, count: int) -> None:
        """Make the switch and hosts 1..count. On any failure, an interrupt included, whatever was made is removed
        before the exception goes on."""
        try:
            ip("netns", "add", self.switch)
            self.made.append(self.switch)
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "br0", "up")
            ip("-n", self.switch, "link", "set", "lo", "up")
            for k in range(1, count + 1):
                ns = f"{self.tag}h{k}"
                ip("netns", "add", ns)
                self.made.append(ns)
                self.hosts.append(ns)
                # both veth ends are created straight inside their namespaces: the machine's own sees nothing
                veth, peer = self.veth(k), f"p{k}"
                ip("link", "add", veth, "netns", ns, "type", "veth", "peer", "name", peer, "netns", self.switch)
                ip("-n", self.switch, "link", "set", peer, "master", "br0", "up")
                ip("-n", ns, "addr", "add", f"{self.addr(k)}/24", "dev", veth)
                ip("-n", ns, "link", "set", "lo", "up")
                ip("-n", ns, "link", "set", veth, "up")
                # mDNS (224.0.0.251) leaves through the veth; there is no default route at all
                ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", veth)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Kill what still runs in the namespaces made here, then delete them (idempotent)."""
        for ns in reversed(self.made):
            _kill_processes(ns)
            # deleting a namespace deletes the veth ends inside it, and with them their peers on the bridge
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made.clear()
