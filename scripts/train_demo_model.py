"""Train the demo model that `make demo` runs: a tiny Llama-layout checkpoint, trained on this machine.

The text is the documentation that ships inside Python itself: the prose paragraphs of the docstrings of the
standard library's modules, classes and functions, and of the help topics in `pydoc_data` (Python's
documentation is under the PSF License). A byte-level BPE tokenizer (2048 entries) is trained on it with
`tokenizers`, then a 6-layer Llama (hidden 192, 6 heads / 2 KV heads, SwiGLU, RoPE, tied embeddings, 2.8M
parameters) is trained with tinygrad, AdamW on random 128-token windows, and saved in the Hugging Face layout
the engine loads: config.json, model.safetensors (bf16, 5.5 MB), tokenizer.json, tokenizer_config.json (with a
chat template), generation_config.json (the sampling defaults `clusterctl run` uses).

After training the script loads the saved files with the project's own ShardEngine and checks that its
log-probabilities agree with the training forward's, position by position.

Deterministic for a given Python version (the corpus is that version's docstrings): fixed seeds, a fixed
number of steps. About 14 minutes on 2 CPU cores (230 steps of 2048 tokens, ~3.5 s each). Run from the
repository root:

    .venv/bin/python scripts/train_demo_model.py                           # writes demo/pydoc-llama
    .venv/bin/python scripts/train_demo_model.py --steps 5 --out /tmp/m   # a quick smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import math
import pkgutil
import re
import struct
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinygrad import Context, Tensor, TinyJit  # noqa: E402
from tinygrad.nn.optim import AdamW  # noqa: E402

from cluster.models.config import RopeConfig  # noqa: E402
from cluster.models.decoder import apply_rope, rope_tables  # noqa: E402

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Modules whose import does something besides defining things (opens a browser, prints, starts a GUI).
SKIP_MODULES = {"antigravity", "this", "__hello__", "__phello__", "idlelib", "turtledemo", "tkinter", "turtle"}
# A chat turn is a paragraph: the user's text, then a blank line after which the model writes its own.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] | trim }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}{% endfor %}"
)
GENERATION = {"do_sample": True, "temperature": 0.7, "top_k": 40, "repetition_penalty": 1.15}


@dataclass(frozen=True)
class Shape:
    vocab: int = 2048
    hidden: int = 192
    layers: int = 6  # a three-node demo splits them 2/2/2
    heads: int = 6
    kv_heads: int = 2
    intermediate: int = 512
    context: int = 256
    rope_theta: float = 10000.0
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# ---------------------------------------------------------------------------------------------- corpus
_UNDERLINE = re.compile(r"\s*[-=*~^\"'#+.]{3,}\s*")
_WORD = re.compile(r"[A-Za-z][a-z]*[,.;:]?")


def _paragraphs(doc: str) -> Iterator[str]:
    """Prose paragraphs of a docstring, each on one line. Indented blocks (code, tables, doctests) are left out,
    and so are paragraphs thick with identifiers: a model this small, trained this briefly, learns to write
    English far sooner from plain sentences."""
    for para in re.split(r"\n\s*\n", doc):
        # reST headings' underlines go; a paragraph with indented lines is code, a table or a doctest
        lines = [line for line in para.strip("\n").split("\n") if not _UNDERLINE.fullmatch(line)]
        if not lines or any(line[:1].isspace() or line.lstrip().startswith((">>>", "..", "--")) for line in lines):
            continue
        text = " ".join(line.strip() for line in lines).strip()
        pieces = text.split()
        if len(pieces) >= 4 and sum(bool(_WORD.fullmatch(w)) for w in pieces) >= 0.9 * len(pieces):
            yield text


def _quiet_import(name: str) -> ModuleType | None:
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return importlib.import_module(name)
    except BaseException:  # an optional C extension missing, a platform-only module, SystemExit, ...
        return None


def _walk(names: list[str]) -> Iterator[ModuleType]:
    """Every standard-library module and submodule that imports cleanly (no tests, no `__main__`s)."""
    for name in names:
        module = _quiet_import(name)
        if module is None:
            continue
        yield module
        path = getattr(module, "__path__", None)
        if path is None:
            continue
        for info in sorted(pkgutil.iter_modules(path, name + "."), key=lambda i: i.name):
            last = info.name.rsplit(".", 1)[-1]
            if last in SKIP_MODULES or last.startswith(("test", "_")):
                continue
            yield from _walk([info.name])


def _docstrings(module: ModuleType) -> Iterator[str]:
    yield inspect.getdoc(module) or ""
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            yield inspect.getdoc(obj) or ""
            for _, member in sorted(vars(obj).items()):
                if inspect.isfunction(member) or inspect.ismethoddescriptor(member):
                    yield inspect.cleandoc(member.__doc__ or "")
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            yield inspect.getdoc(obj) or ""


def collect_corpus() -> list[str]:
    """Documents (one per docstring or help topic), paragraphs joined by blank lines, duplicates dropped."""
    names = sorted(n for n in sys.stdlib_module_names if n not in SKIP_MODULES and not n.startswith("_"))
    names = ["builtins", *names]
    docs: list[str] = []
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        modules = list(_walk(names))
    for module in modules:
        for doc in _docstrings(module):
            paras = [p for p in _paragraphs(doc) if p not in seen]
            seen.update(paras)
            if paras:
                docs.append("\n\n".join(paras))
    import pydoc_data.topics

    for _, text in sorted(pydoc_data.topics.topics.items()):
        paras = [p for p in _paragraphs(text) if p not in seen]
        seen.update(paras)
        if paras:
            docs.append("\n\n".join(paras))
    return docs


# ---------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: list[str], vocab: int) -> Tokenizer:

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    bos = tok.token_to_id(BOS)
    # `encode(text)` with special tokens starts with BOS, as Llama 3's tokenizer does
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos)]
    )
    return tok


def token_stream(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    assert bos is not None and eos is not None
    ids: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids += [bos, *enc.ids, eos]
    return np.array(ids, dtype=np.int32)


# ---------------------------------------------------------------------------------------------- model
def init_params(shape: Shape, seed: int) -> dict[str, np.ndarray]:
    """HF tensor names -> float32 arrays: normal(0, 0.02), residual outputs scaled down by depth (GPT-2)."""
    rng = np.random.default_rng(seed)
    D, F, hd = shape.hidden, shape.intermediate, shape.head_dim
    out_std = 0.02 / math.sqrt(2 * shape.layers)

    def normal(std: float, *dims: int) -> np.ndarray:
        return (rng.standard_normal(dims) * std).astype(np.float32)

    p = {"model.embed_tokens.weight": normal(0.02, shape.vocab, D)}
    for i in range(shape.layers):
        pre = f"model.layers.{i}."
        p[pre + "input_layernorm.weight"] = np.ones(D, np.float32)
        p[pre + "self_attn.q_proj.weight"] = normal(0.02, shape.heads * hd, D)
        p[pre + "self_attn.k_proj.weight"] = normal(0.02, shape.kv_heads * hd, D)
        p[pre + "self_attn.v_proj.weight"] = normal(0.02, shape.kv_heads * hd, D)
        p[pre + "self_attn.o_proj.weight"] = normal(out_std, D, shape.heads * hd)
        p[pre + "post_attention_layernorm.weight"] = np.ones(D, np.float32)
        p[pre + "mlp.gate_proj.weight"] = normal(0.02, F, D)
        p[pre + "mlp.up_proj.weight"] = normal(0.02, F, D)
        p[pre + "mlp.down_proj.weight"] = normal(out_std, D, F)
    p["model.norm.weight"] = np.ones(D, np.float32)
    return p


def _rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    return x * (x.square().mean(-1, keepdim=True) + eps).rsqrt() * w


def _kept(x: Tensor) -> Tensor:
    """Realized in the forward and in the backward pass: fused, tinygrad recomputes matmuls inside the weight
    gradients' reductions (~20x slower training on a CPU)."""
    return x.contiguous().contiguous_backward()


def forward(p: dict[str, Tensor], tokens: Tensor, shape: Shape, cos: Tensor, sin: Tensor) -> Tensor:
    """(B, T) token ids -> (B, T, V) logits; the same computation as cluster/models/decoder.py's Block."""
    B, T = tokens.shape
    H, KV, hd = shape.heads, shape.kv_heads, shape.head_dim
    embed = p["model.embed_tokens.weight"]  # (V, D), also the lm_head (tied)
    x = _kept(embed[tokens])  # (B, T, D)
    cos, sin = cos[:T], sin[:T]  # (T, hd/2)
    for i in range(shape.layers):
        pre = f"model.layers.{i}."
        h = _kept(_rms_norm(x, p[pre + "input_layernorm.weight"], shape.eps))
        q = (h @ p[pre + "self_attn.q_proj.weight"].T).reshape(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = (h @ p[pre + "self_attn.k_proj.weight"].T).reshape(B, T, KV, hd).transpose(1, 2)  # (B, KV, T, hd)
        v = _kept((h @ p[pre + "self_attn.v_proj.weight"].T).reshape(B, T, KV, hd).transpose(1, 2))
        q, k = _kept(apply_rope(q, cos, sin)), _kept(apply_rope(k, cos, sin))
        attn = _kept(q.scaled_dot_product_attention(k, v, is_causal=True, enable_gqa=True))  # (B, H, T, hd)
        x = _kept(x + attn.transpose(1, 2).reshape(B, T, H * hd) @ p[pre + "self_attn.o_proj.weight"].T)
        h = _kept(_rms_norm(x, p[pre + "post_attention_layernorm.weight"], shape.eps))
        gate = _kept(h @ p[pre + "mlp.gate_proj.weight"].T)  # (B, T, F)
        up = _kept(h @ p[pre + "mlp.up_proj.weight"].T)
        x = _kept(x + _kept(gate.silu() * up) @ p[pre + "mlp.down_proj.weight"].T)
    return _kept(_kept(_rms_norm(x, p["model.norm.weight"], shape.eps)) @ embed.T)  # (B, T, V)


def _rope(shape: Shape) -> tuple[Tensor, Tensor]:
    cos, sin = rope_tables(shape.head_dim, RopeConfig(theta=shape.rope_theta), shape.context)
    return Tensor(cos).realize(), Tensor(sin).realize()


def train(
    tokens: np.ndarray, shape: Shape, steps: int, batch: int, seq: int, lr: float, seed: int
) -> tuple[dict[str, np.ndarray], float, float]:
    """AdamW on random windows; returns the trained weights, the final training loss and a held-out loss."""
    split = int(len(tokens) * 0.98)  # the last 2% of the stream is held out
    train_ids, val_ids = tokens[:split], tokens[split:]
    p = {k: Tensor(v).realize() for k, v in init_params(shape, seed).items()}
    decay = [t for k, t in p.items() if not k.endswith("norm.weight")]
    no_decay = [t for k, t in p.items() if k.endswith("norm.weight")]
    opt_decay, opt_plain = AdamW(decay, lr=lr, weight_decay=0.1, b2=0.99), AdamW(no_decay, lr=lr, weight_decay=0.0)
    cos, sin = _rope(shape)
    rng = np.random.default_rng(seed + 1)

    def windows(ids: np.ndarray, n: int) -> tuple[Tensor, Tensor]:
        starts = rng.integers(0, len(ids) - seq - 1, n)
        w = np.stack([ids[s : s + seq + 1] for s in starts])
        return Tensor(w[:, :-1].copy()), Tensor(w[:, 1:].copy())

    @TinyJit
    def step(x: Tensor, y: Tensor) -> Tensor:
        for o in (opt_decay, opt_plain):
            o.zero_grad()
        loss = forward(p, x, shape, cos, sin).sparse_categorical_crossentropy(y).backward()
        return loss.realize(*opt_decay.schedule_step(), *opt_plain.schedule_step())

    warmup, t0, avg = max(1, steps // 20), time.perf_counter(), float("nan")
    with Context(TRAINING=1):
        for i in range(steps):
            # linear warm-up, then cosine decay to a tenth
            frac = (
                (i + 1) / warmup
                if i < warmup
                else 0.1 + 0.45 * (1 + math.cos(math.pi * (i - warmup) / (steps - warmup)))
            )
            for o in (opt_decay, opt_plain):
                o.lr.assign(Tensor([lr * frac], dtype=o.lr.dtype)).realize()
            loss = float(step(*windows(train_ids, batch)).item())
            avg = loss if math.isnan(avg) else 0.95 * avg + 0.05 * loss
            if i % 25 == 0 or i == steps - 1:
                elapsed = time.perf_counter() - t0
                eta = elapsed / (i + 1) * (steps - i - 1)
                print(
                    f"step {i:5d}/{steps}  loss {loss:.3f}  avg {avg:.3f}  {elapsed:6.0f}s  eta {eta:4.0f}s", flush=True
                )
    val = []
    for _ in range(8):
        x, y = windows(val_ids, batch)
        val.append(float(forward(p, x, shape, cos, sin).sparse_categorical_crossentropy(y).item()))
    return {k: t.numpy() for k, t in p.items()}, avg, float(np.mean(val))


# ---------------------------------------------------------------------------------------------- files
def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even like torch's cast."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def write_bf16_safetensors(path: Path, weights: dict[str, np.ndarray]) -> None:
    """A safetensors file of bf16 tensors (numpy has no bf16 type, and this machine's clang no __bf16)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name in sorted(weights):
        blob = to_bf16_bits(weights[name]).tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(weights[name].shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.writelines(blobs)


def read_bf16_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The file written above, widened to float32 (exactly)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        bits = np.frombuffer(raw[8 + n + start : 8 + n + end], dtype=np.uint16).reshape(info["shape"])
        out[name] = from_bf16_bits(bits)
    return out


def save(out: Path, weights: dict[str, np.ndarray], tok: Tokenizer, shape: Shape) -> None:
    out.mkdir(parents=True, exist_ok=True)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    write_bf16_safetensors(out / "model.safetensors", weights)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": shape.context,
        "mlp_bias": False,
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": shape.eps,
        "rope_scaling": None,
        "rope_theta": shape.rope_theta,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": shape.vocab,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    tok_config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "clean_up_tokenization_spaces": False,
        "model_max_length": shape.context,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    generation = {"bos_token_id": bos, "eos_token_id": eos, **GENERATION}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def check_against_engine(out: Path, shape: Shape, sample: list[int]) -> float:
    """Largest |log-prob difference| between ShardEngine (the saved bf16 file) and the training forward."""
    from cluster.engine.shard import ShardEngine

    engine = ShardEngine(out, max_context=shape.context, prefill_buckets=(8,), dtype="float32")
    sid = engine.new_session()
    got = np.stack([engine.forward(sid, np.array([t]), logprobs=shape.vocab).top for t in sample])  # (T, V, 2)
    engine.end_session(sid)
    engine_lp = np.full((len(sample), shape.vocab), -np.inf)
    for row, top in enumerate(got):
        engine_lp[row, top[:, 0].astype(int)] = top[:, 1]
    p = {k: Tensor(v).realize() for k, v in read_bf16_safetensors(out / "model.safetensors").items()}
    cos, sin = _rope(shape)
    logits = forward(p, Tensor([sample]), shape, cos, sin)[0].float().numpy().astype(np.float64)  # (T, V)
    ours = logits - logits.max(-1, keepdims=True)
    ours -= np.log(np.exp(ours).sum(-1, keepdims=True))
    return float(np.abs(engine_lp - ours).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "demo" / "pydoc-llama")
    ap.add_argument("--steps", type=int, default=230)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128, help="Training window (the model's context is 256).")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shape = Shape()
    t0 = time.perf_counter()
    docs = collect_corpus()
    text_bytes = sum(len(d.encode()) for d in docs)
    print(
        f"corpus: {len(docs)} docstrings and help topics, {text_bytes / 1e6:.1f} MB ({time.perf_counter() - t0:.0f}s)"
    )
    tok = train_tokenizer(docs, shape.vocab)
    tokens = token_stream(tok, docs)
    assert tok.get_vocab_size() <= shape.vocab
    print(
        f"tokenizer: {tok.get_vocab_size()} entries; {len(tokens)} tokens ({text_bytes / len(tokens):.2f} bytes each)"
    )
    n_params = sum(v.size for v in init_params(shape, args.seed).values())
    print(f"model: {asdict(shape)}, {n_params / 1e6:.2f}M parameters")
    t1 = time.perf_counter()
    weights, loss, val = train(tokens, shape, args.steps, args.batch, args.seq, args.lr, args.seed)
    minutes = (time.perf_counter() - t1) / 60
    print(f"trained {args.steps} steps in {minutes:.1f} min: loss {loss:.3f}, held-out loss {val:.3f}")
    save(args.out, weights, tok, shape)
    err = check_against_engine(args.out, shape, tok.encode("The function returns a list of the names").ids)
    print(f"ShardEngine vs training forward: max |log-prob difference| {err:.2e}")
    if err > 1e-2:
        raise SystemExit("the engine does not compute what was trained")
    size = (args.out / "model.safetensors").stat().st_size
    print(f"wrote {args.out} (model.safetensors {size / 1e6:.1f} MB) in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
