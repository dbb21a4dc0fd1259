"""`clusterctl` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from cluster.partition import format_bytes
from cluster.reasoning import CLOSE as CLOSE_THINKING
from cluster.reasoning import OPEN as OPEN_THINKING

if TYPE_CHECKING:  # the engine's modules load tinygrad and numpy: client commands import them only when they run
    from cluster.sampling import SamplingParams

DEFAULT_NODE = "127.0.0.1:50051"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """clusterctl: one fast local LLM across the Linux boxes you already have."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command("models")
def models_cmd() -> None:
    """List the registry names `run` accepts."""
    from cluster.registry import list_models

    for name, repo in list_models().items():
        click.echo(f"{name:24s} {repo}")


class _Bars:
    """tqdm bars for load, pull and warm-up progress (on stderr), one per stage and node."""

    STAGES = {
        "load": "loading weights",
        "warmup": "compiling",
        "pull": "pulling weights",
        "plan": "planning",
        "prompt": "reading the prompt",
        "replay": "replaying the session",
    }

    def __init__(self, enabled: bool):
        self.enabled, self.bars = enabled, {}  # type: ignore[var-annotated]

    def __call__(self, stage: str, done: int, total: int, node: str = "") -> None:
        if not self.enabled or total <= 0:
            return
        from tqdm import tqdm

        desc = self.STAGES.get(stage, stage) + (f" on {node}" if node else "")
        bar = self.bars.get((stage, node))
        if bar is None:
            unit, scale = {"pull": ("B", True), "prompt": ("token", False), "replay": ("token", False)}.get(
                stage, ("step", False)
            )
            bar = self.bars[(stage, node)] = tqdm(
                total=total, desc=desc, unit=unit, unit_scale=scale, file=sys.stderr, leave=False
            )
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self.bars[(stage, node)]  # the next turn's long prompt gets a bar of its own

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _node_option(f: Any) -> Any:
    f = click.option(
        "--token-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="File holding the cluster token.",
    )(f)
    f = click.option(
        "--token",
        default=None,
        help="The cluster token. Default: $CLUSTERCTL_TOKEN, else the one `clusterctl join` stored on this host.",
    )(f)
    return click.option(
        "--node",
        default=DEFAULT_NODE,
        show_default=True,
        metavar="HOST:PORT",
        help="The node to ask (any node of the cluster).",
    )(f)


def _engine_options(*, envvars: bool, dtype_help: str, models_dir_help: str) -> Callable[[Any], Any]:
    """--device, --dtype, --max-context, --prefill-chunks, --cpu-threads, --graph-cache and --models-dir, for `join`
    and for `run` (the node or the local engine it starts). envvars: also read from CLUSTERCTL_* environment
    variables, as `join` does (--graph-cache always is: the engine reads that variable itself)."""

    def env(name: str) -> dict[str, Any]:
        return {"envvar": f"CLUSTERCTL_{name}", "show_envvar": True} if envvars else {}

    options = [
        click.option(
            "--device",
            **env("DEVICE"),
            default=None,
            help="tinygrad device (CPU, CUDA, AMD, CL, ...). Default: tinygrad's.",
        ),
        click.option(
            "--dtype", **env("DTYPE"), type=click.Choice(["float32", "float16"]), default=None, help=dtype_help
        ),
        click.option(
            "--max-context", **env("MAX_CONTEXT"), type=click.IntRange(min=16), default=4096, show_default=True
        ),
        click.option(
            "--prefill-chunks",
            **env("PREFILL_CHUNKS"),
            callback=lambda ctx, param, value: None if value is None else _chunk_sizes(value),
            default=None,
            metavar="N,N,...",
            help="Prompt chunk sizes each shard compiles while it warms up; a prompt is prefilled in chunks of the "
            "largest. Each size costs seconds of warm-up on a slow CPU: one size starts faster.  "
            "[default: 16,64; 16,64,512 on NVIDIA GPUs]",
        ),
        click.option(
            "--cpu-threads",
            **env("CPU_THREADS"),
            type=click.IntRange(min=1),
            default=None,
            help="CPU cores a CPU engine computes on (tinygrad's NUM_CPU_THREADS). Default: all of them.",
        ),
        click.option(
            "--graph-cache",
            envvar="CLUSTERCTL_GRAPH_CACHE",
            show_envvar=True,
            expose_value=False,
            callback=_use_graph_cache,
            metavar="DIR|off",
            help="Where shards keep the graphs they compiled, so that their next start skips most of the warm-up; "
            "off: compile at every start. Default: ~/.cache/clusterctl/graphs.",
        ),
        click.option(
            "--models-dir",
            **env("MODELS_DIR"),
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help=models_dir_help,
        ),
    ]

    def decorate(f: Any) -> Any:
        for option in reversed(options):  # the last applied is listed first
            f = option(f)
        return f

    return decorate


def _limit_cpu_threads(threads: int | None) -> None:
    """--cpu-threads: tinygrad's NUM_CPU_THREADS for this process and the engine processes it starts (they
    inherit the environment), so kernels are split into that many per-core slices."""
    if threads is None:
        return
    os.environ["NUM_CPU_THREADS"] = str(threads)
    if "tinygrad.helpers" in sys.modules:  # already imported: its setting was read from the environment
        from tinygrad.helpers import NUM_CPU_THREADS

        NUM_CPU_THREADS.value = threads


def _use_graph_cache(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """--graph-cache: the engine reads CLUSTERCTL_GRAPH_CACHE, here and in the engine processes (which inherit the
    environment)."""
    if value:
        os.environ["CLUSTERCTL_GRAPH_CACHE"] = value


def _resolve_token(token: str | None, token_file: Path | None) -> str | None:
    from cluster.auth import TokenError, resolve_token

    try:
        return resolve_token(token, token_file)
    except TokenError as e:
        _fail(e)


def _client(node: str, token: str | None, token_file: Path | None) -> Any:
    from cluster.client import Client, ClusterError

    try:
        return Client(node, token=_resolve_token(token, token_file))
    except ClusterError as e:
        _fail(e)


def _token_for_node(token: str | None, token_file: Path | None) -> str:
    """A node's token: the one given, else the stored one, else a new one stored now (announced once)."""
    from cluster.auth import default_token_path, new_token, write_token

    found = _resolve_token(token, token_file)
    if found:
        return found
    path = default_token_path()
    found = new_token()
    write_token(path, found)
    click.echo(
        f"Created a cluster token in {path} (mode 0600). To add another host to this cluster, run there:", err=True
    )
    click.echo(f"  clusterctl join --token {found}", err=True)
    return found


def _listening(node: str) -> bool:
    """Whether anything accepts TCP connections at HOST:PORT (a node with another token still counts)."""
    import socket

    host, _, port = node.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def _fail(e: Exception) -> NoReturn:
    raise click.ClickException(str(e)) from None


@main.command("run")
@click.argument("model")
@click.argument("prompt", required=False)
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    default=None,
    help="0 = greedy. Default: the model's generation_config.json, else 0.",
)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None)
@click.option("--top-k", type=click.IntRange(min=0), default=None)
@click.option("--min-p", type=click.FloatRange(0, 1), default=None)
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option(
    "--presence-penalty",
    type=click.FloatRange(-2, 2),
    default=None,
    help="OpenAI's: taken from the logit of every token the answer already holds.",
)
@click.option(
    "--frequency-penalty",
    type=click.FloatRange(-2, 2),
    default=None,
    help="OpenAI's: taken from a token's logit once per time the answer holds it.",
)
@click.option("--seed", type=int, default=None, help="Same seed, same output.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option(
    "--json-schema",
    "json_schema",
    metavar="SCHEMA",
    callback=lambda ctx, param, value: _json_schema(value),
    help="The answer is JSON that follows this JSON schema (constrained decoding): the schema's text, or @FILE. "
    '\'{"type": "object"}\' takes any object.',
)
@click.option("--raw", is_flag=True, help="No chat template: encode PROMPT as is, with the tokenizer's special tokens.")
@click.option(
    "--no-thinking",
    is_flag=True,
    help="Thinking models whose chat template can turn it off (Qwen3): answer without a <think> block first "
    "(the template's enable_thinking=false).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per token, then a summary.")
@click.option("--logprobs", type=click.IntRange(min=0, max=20), default=0, help="With --json: the top K logprobs.")
@_node_option
@click.option("--local", is_flag=True, help="Run the whole model inside this process, with no cluster at all.")
@click.option(
    "--no-mdns",
    is_flag=True,
    help="When this command starts its own node: do not use mDNS (it then works alone or with --peer).",
)
@click.option("--peer", "peers", multiple=True, metavar="HOST:PORT", help="For the node this command starts.")
@_engine_options(
    envvars=False,
    dtype_help="Compute dtype. Default: float32 on CPU, float16 on accelerators.",
    models_dir_help="Where models live (--local: the Hugging Face cache by default; a node: "
    "~/.cache/clusterctl/models).",
)
def run_cmd(
    model: str,
    prompt: str | None,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    min_p: float | None,
    repetition_penalty: float | None,
    presence_penalty: float | None,
    frequency_penalty: float | None,
    seed: int | None,
    stop: tuple[str, ...],
    json_schema: dict[str, Any] | None,
    raw: bool,
    no_thinking: bool,
    as_json: bool,
    logprobs: int,
    node: str,
    token: str | None,
    token_file: Path | None,
    local: bool,
    no_mdns: bool,
    peers: tuple[str, ...],
    device: str | None,
    dtype: str | None,
    max_context: int,
    prefill_chunks: tuple[int, ...] | None,
    cpu_threads: int | None,
    models_dir: Path | None,
) -> None:
    """Generate with MODEL: a registry name (see `clusterctl models`), an HF repo id or a local directory.

    Without PROMPT, starts an interactive chat. The request goes to the node at --node; when none answers
    there, this command starts a node inside its own process (it joins the cluster like `clusterctl join`).
    """
    _limit_cpu_threads(cpu_threads)
    sampling = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "repetition_penalty": repetition_penalty,
        "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty,
        "seed": seed,
    }
    sampling = {k: v for k, v in sampling.items() if v is not None}
    if raw and no_thinking:
        raise click.UsageError("--no-thinking switches a chat template; --raw uses none")
    template_kwargs = {"enable_thinking": False} if no_thinking else {}
    bars = _Bars(enabled=sys.stderr.isatty() or not as_json)
    out = _Output(as_json, logprobs)
    if local:
        _run_local(
            model,
            prompt,
            raw,
            max_tokens,
            sampling,
            stop,
            json_schema,
            template_kwargs,
            logprobs,
            out,
            bars,
            device,
            dtype,
            max_context,
            prefill_chunks,
            models_dir,
        )
        return
    from cluster.client import ClusterError

    own = None
    if not _listening(node):
        node_token = _token_for_node(token, token_file)
        own = _start_own_node(node, node_token, no_mdns, peers, device, dtype, max_context, prefill_chunks, models_dir)
        token, token_file = node_token, None
    client = _client(node, token, token_file)
    try:
        turn = _ClusterTurns(
            client, model, raw, max_tokens, sampling, stop, json_schema, template_kwargs, logprobs, out, bars
        )
        if prompt is not None:
            turn(prompt)
        else:
            _chat_loop(turn)
    except ClusterError as e:
        _fail(e)
    finally:
        bars.close()
        client.close()
        if own is not None:
            own.stop()


def _start_own_node(
    node: str,
    token: str,
    no_mdns: bool,
    peers: tuple[str, ...],
    device: str | None,
    dtype: str | None,
    max_context: int,
    prefill_chunks: tuple[int, ...] | None,
    models_dir: Path | None,
) -> Any:
    from cluster.node import NodeSettings, NodeThread

    host, _, port = node.rpartition(":")
    loopback = host in ("127.0.0.1", "localhost", "::1")
    options: dict[str, Any] = {
        # reachable from other nodes only when it may be part of a cluster
        "host": "127.0.0.1" if no_mdns and not peers and loopback else "0.0.0.0",
        "port": int(port) if port.isdigit() else 50051,
        "device": device,
        "dtype": dtype,
        "mdns": not no_mdns,
        "peers": peers,
        "max_context": max_context,
        "prefill_buckets": prefill_chunks,
        "token": token,
        "api_port": None,  # a node that lives as long as this command serves no API
    }
    if models_dir is not None:
        options["models_dir"] = models_dir
    try:
        return NodeThread(NodeSettings(**options)).start()
    except OSError as e:
        _fail(OSError(f"no node answers at {node} and this command could not start one: {e}"))


class _Output:
    """What `run` prints: text as it streams, or one JSON object per token and a summary (DESIGN's format).
    On a terminal a thinking model's <think> block is dimmed (`color`: None asks click whether it is one)."""

    def __init__(self, as_json: bool, logprobs: int, color: bool | None = None):
        self.as_json, self.logprobs, self.color = as_json, logprobs, color
        self._thinking = False  # inside a <think> block of the answer

    def token(self, token_id: int, text: str, logprob: float, top: list[tuple[int, float]]) -> None:
        if self.as_json:
            obj: dict[str, Any] = {"id": token_id, "text": text, "logprob": logprob}
            if self.logprobs:
                obj["top"] = [[i, lp] for i, lp in top]
            click.echo(json.dumps(obj, ensure_ascii=False))
        else:
            click.echo(self._styled(text), nl=False, color=self.color)
            sys.stdout.flush()

    def _styled(self, text: str) -> str:
        if OPEN_THINKING in text:
            self._thinking = True
        shown = click.style(text, dim=True) if self._thinking else text
        if CLOSE_THINKING in text:
            self._thinking = False
        return shown

    def summary(
        self,
        tokens: list[int],
        text: str,
        tail: str,
        finish: str,
        usage: dict[str, int],
        timing: dict[str, Any],
        reasoning: tuple[str, str] | None = None,
    ) -> None:
        """reasoning: a thinking model's (reasoning, content), parted as the HTTP API parts them."""
        shards = timing.get("shards", [])
        self._thinking = False
        if self.as_json:
            summary: dict[str, Any] = {
                "done": True,
                "tokens": tokens,
                "text": text,
                **({"reasoning": reasoning[0], "content": reasoning[1]} if reasoning and reasoning[0] else {}),
                "finish_reason": finish,
                "usage": usage,
                "timing": {
                    "ttft_ms": round(timing["ttft_ms"], 2),
                    "decode_tok_s": round(timing["decode_tok_s"], 2),
                    "shards": [
                        {**t, "engine_ms": round(t["engine_ms"], 3), "wait_ms": round(t["wait_ms"], 3)} for t in shards
                    ],
                },
            }
            click.echo(json.dumps(summary, ensure_ascii=False))
            return
        click.echo(tail)
        rate = f"TTFT {timing['ttft_ms']:.0f} ms, {timing['decode_tok_s']:.1f} tok/s"
        click.echo(f"[{len(tokens)} tokens, {finish}; {rate}]", err=True)
        if shards:
            click.echo(f"[per token: {describe_shard_times(shards)}]", err=True)


def describe_shard_times(shards: list[dict[str, Any]]) -> str:
    """Where a decode step's time went, shard by shard: "n1 layers 0-8 2.9 ms (engine 2.1 ms), ..."."""
    return ", ".join(
        f"{t['node']} layers {t['layers'][0]}-{t['layers'][1]} {t['wait_ms']:.1f} ms (engine {t['engine_ms']:.1f} ms)"
        for t in shards
    )


class _ClusterTurns:
    """Chat turns sent to a node of the cluster."""

    def __init__(
        self,
        client: Any,
        model: str,
        raw: bool,
        max_tokens: int,
        sampling: dict[str, Any],
        stop: tuple[str, ...],
        json_schema: dict[str, Any] | None,
        template_kwargs: dict[str, Any],
        logprobs: int,
        out: _Output,
        bars: _Bars,
    ):
        self.client, self.model, self.raw, self.out, self.bars = client, model, raw, out, bars
        self.template_kwargs = template_kwargs
        self.options = {"max_tokens": max_tokens, "stop": stop, "logprobs": logprobs, **sampling}
        if json_schema is not None:
            self.options["json_schema"] = json_schema
        self.messages: list[dict[str, str]] = []

    def __call__(self, text: str) -> None:
        def progress(stage: str, node: str, done: int, total: int) -> None:
            self.bars(stage, done, total, node)

        if self.raw:
            chunks = self.client.generate(self.model, text, raw=True, on_progress=progress, **self.options)
        else:
            self.messages.append({"role": "user", "content": text})
            chunks = self.client.chat(
                self.model, self.messages, template_kwargs=self.template_kwargs, on_progress=progress, **self.options
            )
        parts = []
        for chunk in chunks:
            if chunk.finish_reason is None:
                self.bars.close()
                parts.append(chunk.text)
                self.out.token(chunk.token_id, chunk.text, chunk.logprob, chunk.top)
            else:
                parts.append(chunk.text)
                answer = "".join(parts)
                split = (chunk.reasoning, chunk.content or "") if chunk.reasoning is not None else None
                self.out.summary(
                    chunk.tokens, answer, chunk.text, chunk.finish_reason, chunk.usage, chunk.timing, split
                )
                if not self.raw:
                    self.messages.append({"role": "assistant", "content": answer})


def _chat_loop(turn: Callable[[str], Any]) -> None:
    click.echo("Chat started; an empty line or Ctrl-D ends it.", err=True)
    while True:
        try:
            text = click.prompt(">", prompt_suffix=" ", default="", show_default=False, err=True)
        except (EOFError, click.Abort):
            break
        if not text.strip():
            break
        turn(text)


def _run_local(
    model: str,
    prompt: str | None,
    raw: bool,
    max_tokens: int,
    sampling_options: dict[str, Any],
    stop: tuple[str, ...],
    json_schema: dict[str, Any] | None,
    template_kwargs: dict[str, Any],
    logprobs: int,
    out: _Output,
    bars: _Bars,
    device: str | None,
    dtype: str | None,
    max_context: int,
    prefill_chunks: tuple[int, ...] | None,
    models_dir: Path | None,
) -> None:
    """The whole model in this process: no node, no network."""
    from cluster.constraints import Constraint
    from cluster.engine.shard import EngineError, ShardEngine
    from cluster.generation import generation_defaults
    from cluster.models.config import ConfigError, ModelConfig
    from cluster.registry import ModelNotFoundError, resolve_model
    from cluster.sampling import SamplingParams
    from cluster.tokenizer import Tokenizer, TokenizerError
    from cluster.weights import CheckpointError

    user_errors = (ModelNotFoundError, ConfigError, CheckpointError, TokenizerError, EngineError, ValueError)
    try:
        model_dir = resolve_model(model, models_dir=models_dir)
        config = ModelConfig.from_dir(model_dir)  # an unsupported model fails here, before anything loads
        tokenizer = Tokenizer.from_dir(model_dir)
        if json_schema is not None:
            Constraint(tokenizer, config.vocab_size, json_schema)  # so does a schema that cannot be used
        sampling = SamplingParams(**{**generation_defaults(model_dir), **sampling_options})
        if not raw and not tokenizer.has_chat_template:
            raise TokenizerError(f"{model_dir} has no chat template; use --raw to send the prompt as plain text")
        engine = ShardEngine(
            model_dir,
            progress=bars,
            device=device,
            dtype=dtype,
            max_context=max_context,
            prefill_buckets=prefill_chunks,
        )
        engine.warmup()
        bars.close()
        session = _LocalTurns(
            engine, tokenizer, sampling, max_tokens, stop, json_schema, template_kwargs, logprobs, out, raw, bars
        )
        if prompt is not None:
            session(prompt)
        else:
            _chat_loop(session)
            session.conversation.close([engine])
    except user_errors as e:
        _fail(e)


def _chunk_sizes(value: str) -> tuple[int, ...]:
    """--prefill-chunks: comma-separated sizes of at least 2."""
    try:
        sizes = tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError:
        sizes = ()
    if not sizes or sizes[0] < 2:
        raise click.BadParameter(f"{value!r}: comma-separated chunk sizes of at least 2 tokens, such as 16,64")
    return sizes


def _json_schema(value: str | None) -> dict[str, Any] | None:
    """--json-schema: the schema's text, or @FILE."""
    if value is None:
        return None
    try:
        text = Path(value[1:]).read_text() if value.startswith("@") else value
        schema = json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise click.BadParameter(f"not a JSON schema: {e}") from None
    if not isinstance(schema, dict):
        raise click.BadParameter("a JSON schema is a JSON object")
    return schema


class _LocalTurns:
    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        sampling: SamplingParams,
        max_tokens: int,
        stop: tuple[str, ...],
        json_schema: dict[str, Any] | None,
        template_kwargs: dict[str, Any],
        logprobs: int,
        out: _Output,
        raw: bool,
        bars: _Bars,
    ):
        from cluster.generation import Conversation

        self.engine, self.tok, self.sampling, self.max_tokens = engine, tokenizer, sampling, max_tokens
        self.bars = bars  # a long prompt's chunks
        self.json_schema, self.template_kwargs = json_schema, template_kwargs
        self.stop, self.logprobs, self.out, self.raw = stop, logprobs, out, raw
        self.context = int(engine.info()["max_context"])  # type: ignore[attr-defined]
        self.messages: list[dict[str, str]] = []
        self.conversation = Conversation()  # chat turns reuse the KV cache of the conversation so far

    def __call__(self, text: str) -> None:
        from cluster.constraints import answer_constraint
        from cluster.generation import TokenChunk, encode_prompt, generate

        if self.raw:
            prompt = encode_prompt(self.tok, prompt=text, raw=True)
        else:
            self.messages.append({"role": "user", "content": text})
            prompt = encode_prompt(self.tok, messages=self.messages, template_kwargs=self.template_kwargs)
        vocab, schema = self.engine.cfg.vocab_size, self.json_schema
        constraint = None
        if schema is not None:
            constraint = answer_constraint(self.tok, vocab, schema, prompt.tags, prompt.opened)
        for item in generate(
            [self.engine],
            self.tok,
            prompt.ids,
            max_tokens=self.max_tokens,
            sampling=self.sampling,
            stop=self.stop,
            logprobs=self.logprobs,
            context_limit=self.context,
            conversation=self.conversation,
            constraint=constraint,
            progress=lambda done, total: self.bars("prompt", done, total),
        ):
            self.bars.close()
            if isinstance(item, TokenChunk):
                self.out.token(item.id, item.text, item.logprob, item.top)
            else:
                splitter = prompt.reasoning()
                parts = splitter.close(item.text) if splitter else None
                self.out.summary(
                    item.tokens, item.text, item.tail, item.finish_reason, item.usage(), item.timing(), parts
                )
                if not self.raw:
                    self.messages.append({"role": "assistant", "content": item.text})


# ------------------------------------------------------------------------------------------------ cluster
@main.command("join")
@click.option(
    "--host",
    envvar="CLUSTERCTL_HOST",
    show_envvar=True,
    default="0.0.0.0",
    show_default=True,
    help="Address to listen on.",
)
@click.option(
    "--port",
    envvar="CLUSTERCTL_PORT",
    show_envvar=True,
    type=click.IntRange(0, 65535),
    default=50051,
    show_default=True,
    help="gRPC port (0: any).",
)
@click.option(
    "--name",
    envvar="CLUSTERCTL_NAME",
    show_envvar=True,
    default=None,
    help="Node name shown to the cluster. Default: the host name.",
)
@_engine_options(
    envvars=True,
    dtype_help="Compute dtype.",
    models_dir_help="Where models pulled from peers are kept. Default: ~/.cache/clusterctl/models.",
)
@click.option(
    "--memory",
    envvar="CLUSTERCTL_MEMORY",
    show_envvar=True,
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="GiB",
    help="Memory this node offers, instead of what its device reports free.",
)
@click.option(
    "--max-sessions",
    envvar="CLUSTERCTL_MAX_SESSIONS",
    show_envvar=True,
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Sessions each shard serves at once, each with its own KV cache (fewer when the memory left beside the "
    "weights holds fewer); more requests wait for a turn.",
)
@click.option(
    "--session-wait",
    envvar="CLUSTERCTL_SESSION_WAIT",
    show_envvar=True,
    type=click.FloatRange(min=0),
    default=300,
    show_default=True,
    metavar="SECONDS",
    help="How long a request waits for a free session on this node's shards before it is refused as busy.",
)
@click.option(
    "--peer",
    "peers",
    envvar="CLUSTERCTL_PEERS",
    show_envvar=True,
    multiple=True,
    metavar="HOST:PORT",
    help="A node to join directly (repeatable).",
)
@click.option(
    "--no-mdns",
    envvar="CLUSTERCTL_NO_MDNS",
    show_envvar=True,
    is_flag=True,
    help="Neither announce nor browse over mDNS (use --peer).",
)
@click.option(
    "--mdns-interface",
    "mdns_interfaces",
    envvar="CLUSTERCTL_MDNS_INTERFACES",
    show_envvar=True,
    multiple=True,
    metavar="ADDR",
    help="Announce and browse only on the interface with this IPv4 address (repeatable). Default: all.",
)
@click.option(
    "--api-port",
    envvar="CLUSTERCTL_API_PORT",
    show_envvar=True,
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port of the OpenAI-compatible HTTP API and the dashboard (0: any).",
)
@click.option(
    "--no-api", envvar="CLUSTERCTL_NO_API", show_envvar=True, is_flag=True, help="Serve no HTTP API or dashboard."
)
@click.option(
    "--token",
    default=None,
    help="The cluster token. Default: $CLUSTERCTL_TOKEN, else the stored one; the first join creates one.",
)
@click.option(
    "--token-file",
    envvar="CLUSTERCTL_TOKEN_FILE",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
)
def join_cmd(
    host: str,
    port: int,
    name: str | None,
    device: str | None,
    dtype: str | None,
    memory: float | None,
    max_sessions: int,
    session_wait: float,
    prefill_chunks: tuple[int, ...] | None,
    models_dir: Path | None,
    peers: tuple[str, ...],
    no_mdns: bool,
    mdns_interfaces: tuple[str, ...],
    max_context: int,
    cpu_threads: int | None,
    api_port: int,
    no_api: bool,
    token: str | None,
    token_file: Path | None,
) -> None:
    """Run a node of the cluster until interrupted (Ctrl-C or SIGTERM)."""
    import asyncio
    import signal

    _limit_cpu_threads(cpu_threads)
    from cluster.node import Node, NodeSettings

    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)  # membership changes and plans are what `join` shows
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "device": device,
        "dtype": dtype,
        "memory_gib": memory,
        "peers": peers,
        "mdns": not no_mdns,
        "mdns_interfaces": mdns_interfaces or None,
        "max_context": max_context,
        "max_sessions": max_sessions,
        "session_wait": session_wait,
        "prefill_buckets": prefill_chunks,
        "token": _token_for_node(token, token_file),
        "api_port": None if no_api else api_port,
    }
    if name:
        options["name"] = name
    if models_dir is not None:
        options["models_dir"] = models_dir

    async def serve() -> None:
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopped.set)
        await Node(NodeSettings(**options)).serve(stopped)

    try:
        asyncio.run(serve())
    except OSError as e:
        _fail(e)


@main.command("nodes")
@_node_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def nodes_cmd(node: str, token: str | None, token_file: Path | None, as_json: bool) -> None:
    """The members of the cluster: device, memory, and the layers each holds."""
    from cluster.client import ClusterError

    with _client(node, token, token_file) as client:
        try:
            nodes = client.nodes()
        except ClusterError as e:
            _fail(e)
    if as_json:
        click.echo(json.dumps([n.__dict__ for n in nodes], indent=2))
        return
    click.echo(f"{'NAME':16s} {'ADDRESS':22s} {'DEVICE':10s} {'FREE':>10s} {'TOTAL':>10s}  SHARDS")
    for n in nodes:
        shards = ", ".join(
            f"{s['model_id']} [{s['layers'][0]},{s['layers'][1]}) {s['sessions']}/{s['max_sessions']} sessions"
            for s in n.shards
        )
        free, total = format_bytes(n.free_memory), format_bytes(n.total_memory)
        click.echo(f"{n.name:16s} {n.address:22s} {n.device:10s} {free:>10s} {total:>10s}  {shards or '-'}")


@main.command("plan")
@click.argument("model")
@_node_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan_cmd(model: str, node: str, token: str | None, token_file: Path | None, as_json: bool) -> None:
    """How MODEL's layers would be split over the cluster now (memory-weighted)."""
    from cluster.client import ClusterError

    with _client(node, token, token_file) as client:
        try:
            plan = client.plan(model)
        except ClusterError as e:
            _fail(e)
    if as_json:
        click.echo(json.dumps(plan.__dict__, indent=2))
        return
    click.echo(f"{plan.model_id}: {plan.num_layers} layers, context {plan.max_context}")
    for s in plan.shards:
        start, end = s["layers"]
        click.echo(
            f"  {s['name']:16s} {s['address']:22s} layers [{start:3d}, {end:3d})  {end - start:3d} layers  "
            f"needs {format_bytes(s['bytes'])} of {format_bytes(s['free_memory'])} free"
        )
    for line in plan.left_out:
        click.echo(f"  left out: {line}")


if __name__ == "__main__":
    main()
