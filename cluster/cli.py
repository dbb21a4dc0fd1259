"""`clusterctl` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from cluster.generation import Conversation, GenerationResult, Shard, TokenChunk, generate
from cluster.sampling import SamplingParams


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


def _generation_defaults(model_dir: Path) -> dict[str, Any]:
    """Sampling defaults from generation_config.json, the way the model's authors ship them."""
    path = model_dir / "generation_config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if not raw.get("do_sample", True):
        return {"temperature": 0.0}
    return {k: raw[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty") if k in raw}


class _Bars:
    """tqdm bars for the engine's load and warm-up progress (on stderr)."""

    def __init__(self, enabled: bool):
        self.enabled, self.bars = enabled, {}  # type: ignore[var-annotated]

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        desc = {"load": "loading weights", "warmup": "compiling"}.get(stage, stage)
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


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
@click.option("--seed", type=int, default=None, help="Same seed, same output.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--raw", is_flag=True, help="No chat template: encode PROMPT as is, with the tokenizer's special tokens.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per token, then a summary.")
@click.option("--logprobs", type=click.IntRange(min=0), default=0, help="With --json: the top K logprobs per token.")
@click.option("--local", is_flag=True, help="Run the model inside this process (no engine process).")
@click.option("--device", default=None, help="tinygrad device (CPU, CUDA, AMD, CL, ...). Default: tinygrad's.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default=None,
    help="Compute dtype. Default: float32 on CPU, float16 on accelerators.",
)
@click.option("--max-context", type=click.IntRange(min=16), default=4096, show_default=True)
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where downloaded models live (default: the Hugging Face cache).",
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
    seed: int | None,
    stop: tuple[str, ...],
    raw: bool,
    as_json: bool,
    logprobs: int,
    local: bool,
    device: str | None,
    dtype: str | None,
    max_context: int,
    models_dir: Path | None,
) -> None:
    """Generate with MODEL: a registry name (see `clusterctl models`), an HF repo id or a local directory.

    Without PROMPT, starts an interactive chat.
    """
    from cluster.engine.process import EngineProcess
    from cluster.engine.runner import RunnerError
    from cluster.engine.shard import EngineError, ShardEngine
    from cluster.models.config import ConfigError, ModelConfig
    from cluster.registry import ModelNotFoundError, resolve_model
    from cluster.tokenizer import Tokenizer, TokenizerError
    from cluster.weights import CheckpointError

    user_errors = (ModelNotFoundError, ConfigError, CheckpointError, TokenizerError, EngineError, ValueError)
    try:
        model_dir = resolve_model(model, models_dir=models_dir)
        ModelConfig.from_dir(model_dir)  # an unsupported model fails here, before anything loads
        tokenizer = Tokenizer.from_dir(model_dir)
        defaults = _generation_defaults(model_dir)
        chosen = {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "min_p": min_p,
            "repetition_penalty": repetition_penalty,
        }
        params = {**defaults, **{k: v for k, v in chosen.items() if v is not None}}
        sampling = SamplingParams(**params, seed=seed)
        if not raw and not tokenizer.has_chat_template:
            raise TokenizerError(f"{model_dir} has no chat template; use --raw to send the prompt as plain text")
    except user_errors as e:
        raise click.ClickException(str(e)) from None

    bars = _Bars(enabled=sys.stderr.isatty() or not as_json)
    options: dict[str, Any] = {"device": device, "dtype": dtype, "max_context": max_context}
    engine: Any = None
    try:
        if local:
            engine = ShardEngine(model_dir, progress=bars, **options)
        else:
            if device:  # the engine process's default device, so everything tinygrad builds lands there
                os.environ["DEV"] = device
            engine = EngineProcess(model_dir, on_progress=bars, **options).start()
        engine.warmup()
        bars.close()
        context = engine.info()["max_context"]
        session = _Session(engine, tokenizer, sampling, max_tokens, stop, logprobs, as_json, raw, context)
        if prompt is not None:
            session.turn(prompt)
        else:
            session.chat()
    except user_errors as e:
        raise click.ClickException(str(e)) from None
    except RunnerError as e:
        raise click.ClickException(f"the engine process failed: {e}") from None
    finally:
        bars.close()
        if engine is not None and hasattr(engine, "close"):
            engine.close()


class _Session:
    def __init__(
        self,
        engine: Shard,
        tokenizer: Any,
        sampling: SamplingParams,
        max_tokens: int,
        stop: tuple[str, ...],
        logprobs: int,
        as_json: bool,
        raw: bool,
        context: int,
    ):
        self.engine, self.tok, self.sampling, self.max_tokens = engine, tokenizer, sampling, max_tokens
        self.stop, self.logprobs, self.as_json, self.raw, self.context = stop, logprobs, as_json, raw, context
        self.messages: list[dict[str, str]] = []
        self.conversation = Conversation()  # chat turns reuse the KV cache of the conversation so far

    def turn(self, text: str) -> str:
        if self.raw:
            ids = self.tok.encode(text, add_special_tokens=True)
        else:
            self.messages.append({"role": "user", "content": text})
            ids = self.tok.encode_chat(self.messages, add_generation_prompt=True)
        result = None
        for item in generate(
            [self.engine],
            self.tok,
            ids,
            max_tokens=self.max_tokens,
            sampling=self.sampling,
            stop=self.stop,
            logprobs=self.logprobs,
            context_limit=self.context,
            conversation=self.conversation,
        ):
            if isinstance(item, TokenChunk):
                self._emit_token(item)
            else:
                result = item
        assert result is not None
        self._emit_summary(result)
        if not self.raw:
            self.messages.append({"role": "assistant", "content": result.text})
        return result.text

    def _emit_token(self, chunk: TokenChunk) -> None:
        if self.as_json:
            obj: dict[str, Any] = {"id": chunk.id, "text": chunk.text, "logprob": chunk.logprob}
            if self.logprobs:
                obj["top"] = [[i, lp] for i, lp in chunk.top]
            click.echo(json.dumps(obj, ensure_ascii=False))
        else:
            click.echo(chunk.text, nl=False)
            sys.stdout.flush()

    def _emit_summary(self, r: GenerationResult) -> None:
        if self.as_json:
            click.echo(
                json.dumps(
                    {
                        "done": True,
                        "tokens": r.tokens,
                        "text": r.text,
                        "finish_reason": r.finish_reason,
                        "usage": r.usage(),
                        "timing": {"ttft_ms": round(r.ttft_ms, 2), "decode_tok_s": round(r.decode_tok_s, 2)},
                    },
                    ensure_ascii=False,
                )
            )
            return
        click.echo(r.tail)
        timing = f"TTFT {r.ttft_ms:.0f} ms, {r.decode_tok_s:.1f} tok/s"
        click.echo(f"[{len(r.tokens)} tokens, {r.finish_reason}; {timing}]", err=True)

    def chat(self) -> None:
        click.echo("Chat started; an empty line or Ctrl-D ends it.", err=True)
        while True:
            try:
                text = click.prompt(">", prompt_suffix=" ", default="", show_default=False, err=True)
            except (EOFError, click.Abort):
                break
            if not text.strip():
                break
            self.turn(text)
        self.conversation.close([self.engine])


if __name__ == "__main__":
    main()
