"""`make demo`: three clusterctl nodes on this machine find each other over mDNS, plan a model and stream an answer.

As root, with `ip` (iproute2) and network namespaces available, every node is a host of its own: a namespace
with one veth on a shared bridge (itself in a namespace), address 10.X.0.K, mDNS confined to that veth. Nothing
is created in the machine's own namespace. Otherwise the nodes are three processes on 127.0.0.1 with mDNS
kept on loopback. Only host 1 is given the model; hosts 2 and 3 pull the tensors of their layers from it.

The default model is the tiny one in demo/pydoc-llama (trained on Python's own docstrings by
scripts/train_demo_model.py), so the demo needs no network; `--model qwen3-0.6b` (or any registry name, HF repo
id or model directory) runs a real model, which the nodes download.

Everything the demo starts (nodes, namespaces, temporary files, a throwaway cluster token) is removed when it
ends, also on Ctrl-C or SIGTERM. Exit status 0 when the answer was streamed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # scripts/netns.py: the namespaces, shared with tests/test_netns.py
from netns import NetnsError, Network, stop, unavailable  # noqa: E402

DEMO_MODEL = ROOT / "demo" / "pydoc-llama"
NS_PREFIX = "ccdemo"  # every namespace the demo makes starts with this
PORT = 50051
HOSTS = (1, 2, 3)
PROMPT = "Return the number of items in a sequence."
CLI = [sys.executable, "-m", "cluster.cli"]


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


class _Stop(BaseException):
    """SIGTERM (or SIGHUP) arrived: unwind like Ctrl-C does, so `finally` cleans up."""


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


# ---------------------------------------------------------------------------------------------- processes
def _die_with_parent() -> None:
    """In a node, before exec: SIGTERM when the demo itself dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------- nodes
@dataclass
class Node:
    name: str
    address: str  # HOST:PORT
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        stop(self.proc)


class Demo:
    def __init__(self, model: str, prompt: str, max_tokens: int, seed: int | None, mode: str):
        self.model, self.prompt, self.max_tokens, self.seed, self.mode = model, prompt, max_tokens, seed, mode
        self.workdir = Path(tempfile.mkdtemp(prefix="clusterctl-demo-"))
        self.net: Network | None = None
        self.nodes: list[Node] = []
        self.descendants: set[int] = set()  # engine processes of loopback nodes, seen while they ran
        local_model = Path(model).expanduser().is_dir()
        self.env = {
            **os.environ,
            # a throwaway cluster: its own token, and nothing read from or written to ~/.config/clusterctl
            "CLUSTERCTL_TOKEN": secrets.token_urlsafe(32),
            "XDG_CONFIG_HOME": str(self.workdir / "config"),
            "PYTHONUNBUFFERED": "1",
        }
        if local_model:
            self.env["HF_HUB_OFFLINE"] = "1"  # the demo model needs no network
        self.hub_model = not local_model

    # -------------------------------------------------------------------------------------------- steps
    def run(self) -> None:
        if self.hub_model:
            self._download()
        if self.mode == "netns":
            self.net = Network(f"{NS_PREFIX}{secrets.token_hex(2)}")
            say(
                f"Three hosts in network namespaces on one bridge (10.{self.net.subnet}.0.0/24), mDNS only between them"
            )
            self.net.build(len(HOSTS))
        else:
            say("Three nodes as processes on 127.0.0.1, mDNS kept on loopback")
        for k in HOSTS:
            self.nodes.append(self._start_node(k))
        self._wait_for_members()
        entry = self.nodes[0].address
        say(f"clusterctl nodes --node {entry}")
        self._show(["nodes", "--node", entry])
        say(f"clusterctl plan {self.model_name} --node {entry}")
        self._show(["plan", self.model_arg, "--node", entry], timeout=120)
        say(f'clusterctl run {self.model_name} "{self.prompt}" --node {entry}')
        self._stream_answer(entry)

    def _download(self) -> None:
        """Fetch a Hub model here, where the network is: the hosts in namespaces have none. Host 1 then finds it in
        the Hugging Face cache, and hosts 2 and 3 pull their layers from host 1 like they do with a local model."""
        from cluster.registry import ModelNotFoundError, resolve_model

        say(f"Downloading {self.model} from the Hugging Face Hub (once; cached for later runs)")
        try:
            print(f"  {resolve_model(self.model)}", flush=True)
        except ModelNotFoundError as e:
            raise DemoError(str(e)) from None
        self.env["HF_HUB_OFFLINE"] = "1"

    @property
    def model_arg(self) -> str:
        path = Path(self.model).expanduser()
        return str(path.resolve()) if path.is_dir() else self.model

    @property
    def model_name(self) -> str:
        path = Path(self.model).expanduser()
        if path.is_dir():
            try:
                return str(path.resolve().relative_to(ROOT))
            except ValueError:
                return str(path)
        return self.model

    def _in_host(self, k: int, args: list[str]) -> list[str]:
        return self.net.exec(k, *args) if self.net else args

    def _start_node(self, k: int) -> Node:
        name = f"host{k}"
        if self.net:
            host, port, mdns = self.net.addr(k), PORT, self.net.addr(k)
        else:
            host, port, mdns = "127.0.0.1", _free_port(), "127.0.0.1"
        args = ["join", "--host", host, "--port", str(port), "--name", name, "--mdns-interface", mdns]
        args += ["--models-dir", str(self.workdir / name), "--no-api"]
        log_path = self.workdir / f"{name}.log"
        print(f"  {name}: clusterctl {' '.join(args)}", flush=True)
        with open(log_path, "wb") as log:
            # its own session: Ctrl-C in the terminal reaches the demo, which then stops the nodes in order
            proc = subprocess.Popen(
                self._in_host(k, [*CLI, *args]),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=ROOT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        return Node(name, f"{host}:{port}", proc, log_path)

    def _cli(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._in_host(1, [*CLI, *args]), capture_output=True, text=True, timeout=timeout, env=self.env, cwd=ROOT
        )

    def _check_nodes_alive(self) -> None:
        for n in self.nodes:
            if n.proc.poll() is not None:
                raise DemoError(f"{n.name} exited with status {n.proc.returncode}; its log ends:\n{n.log_tail()}")
        self._note_descendants()

    def _wait_for_members(self, timeout: float = 90) -> None:
        say("Waiting for the nodes to find each other over mDNS (no --peer anywhere)")
        names = {n.name for n in self.nodes}
        deadline, last = time.monotonic() + timeout, ""

        def members() -> set[str]:
            nonlocal last
            self._check_nodes_alive()
            try:
                p = self._cli(["nodes", "--node", self.nodes[0].address, "--json"], timeout=30)
            except subprocess.TimeoutExpired:
                return set()
            last = p.stderr.strip() or p.stdout.strip()
            return {m["name"] for m in json.loads(p.stdout)} if p.returncode == 0 else set()

        t0 = time.monotonic()
        while time.monotonic() < deadline:
            if members() >= names:
                print(f"  all three joined after {time.monotonic() - t0:.1f} s", flush=True)
                return
            time.sleep(0.5)
        raise DemoError(f"the nodes did not all find each other within {timeout:.0f} s; last answer: {last}")

    def _show(self, args: list[str], timeout: float = 60) -> None:
        self._check_nodes_alive()
        p = self._cli(args, timeout=timeout)
        if p.returncode != 0:
            raise DemoError(f"clusterctl {args[0]} failed: {p.stderr.strip() or p.stdout.strip()}")
        print(p.stdout, end="", flush=True)

    def _stream_answer(self, entry: str) -> None:
        args = ["run", self.model_arg, self.prompt, "--node", entry, "--max-tokens", str(self.max_tokens)]
        if self.seed is not None:
            args += ["--seed", str(self.seed)]
        # stdout and stderr pass straight through: the answer streams token by token, progress bars on stderr
        proc = subprocess.Popen(self._in_host(1, [*CLI, *args]), env=self.env, cwd=ROOT)
        try:
            while proc.poll() is None:
                self._note_descendants()
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        if proc.returncode != 0:
            self._check_nodes_alive()
            raise DemoError(f"clusterctl run exited with status {proc.returncode}")

    # -------------------------------------------------------------------------------------------- cleanup
    def _note_descendants(self) -> None:
        """Remember the nodes' child processes (engine runners), so that none can outlive the demo."""
        import psutil

        for n in self.nodes:
            try:
                self.descendants.update(c.pid for c in psutil.Process(n.proc.pid).children(recursive=True))
            except psutil.Error:
                pass

    def cleanup(self) -> None:
        import psutil

        self._note_descendants()
        for n in self.nodes:
            n.stop()
        for pid in self.descendants:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        if self.net is not None:
            self.net.remove()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def dump_logs(self) -> None:
        for n in self.nodes:
            print(f"----- {n.name} log (last lines) -----\n{n.log_tail()}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEMO_MODEL), help="Registry name, HF repo id or model directory.")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=1, help="Sampling seed (same seed, same answer).")
    ap.add_argument(
        "--mode", choices=["auto", "netns", "loopback"], default="auto", help="auto: namespaces as root, else loopback."
    )
    args = ap.parse_args(argv)

    if args.model == str(DEMO_MODEL) and not (DEMO_MODEL / "model.safetensors").is_file():
        print(f"demo: {DEMO_MODEL} is missing; rebuild it with scripts/train_demo_model.py", file=sys.stderr)
        return 2
    mode = args.mode
    if mode != "loopback":
        why = unavailable(NS_PREFIX)
        if why is not None:
            if mode == "netns":
                print(f"demo: network namespaces are not available: {why}", file=sys.stderr)
                return 2
            print(f"(network namespaces not available: {why}; using loopback processes)", flush=True)
            mode = "loopback"
        else:
            mode = "netns"
    if shutil.which("clang") is None:
        print(
            "demo: warning: no clang on PATH; tinygrad's CPU backend needs it (apt-get install clang)", file=sys.stderr
        )

    stopping: list[str] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        # only the first signal unwinds; later ones (a second Ctrl-C, make passing it on) must not cut the cleanup
        if not stopping:
            stopping.append(signal.Signals(signum).name)
            raise _Stop(stopping[0])

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    status, t0 = 1, time.monotonic()
    demo = Demo(args.model, args.prompt, args.max_tokens, args.seed, mode)
    try:
        demo.run()
        status = 0
    except _Stop as e:
        print(f"\ndemo: interrupted ({e}); cleaning up", file=sys.stderr)
        status = 130
    except (DemoError, NetnsError, OSError, subprocess.SubprocessError, json.JSONDecodeError) as e:
        demo.dump_logs()
        print(f"\ndemo failed: {e}", file=sys.stderr)
    finally:
        stopping.append("cleanup")
        demo.cleanup()
    if status == 0:
        say(f"Done in {time.monotonic() - t0:.0f} s; nodes stopped, namespaces and temporary files removed")
    return status


if __name__ == "__main__":
    sys.exit(main())
